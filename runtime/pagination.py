"""Cursor pagination (AIP-158): opaque page tokens that carry the last row's sort key.

Keyset pagination keeps every page an index range scan, however deep the caller pages. A token also
carries what the service cannot recompute cheaply (the rank of a leaderboard page's last row), so it
is signed: an HMAC under a key derived from the service's private TLS key (`use_token_key`, set at
start; every replica of a service mounts the same key), so an altered token is INVALID_PAGE_TOKEN,
never a page with made-up ranks.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from runtime.clock import utc
from runtime.errors import FieldViolation, InvalidArgument


def page_size(requested: int, default: int = 50, maximum: int = 1000) -> int:
    """0 means the default; the proto rules already refuse negatives and sizes above the maximum."""
    return min(requested or default, maximum)


_key = hashlib.sha256(b"coins page tokens\0development").digest()
"""Until a service sets its own (tools and tests that serve nothing)."""


def use_token_key(secret: bytes) -> None:
    """Sign and check page tokens with a key derived from `secret` (the service's private key)."""
    global _key
    _key = hashlib.sha256(b"coins page tokens\0" + secret).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(raw: bytes) -> bytes:
    return hmac.new(_key, raw, hashlib.sha256).digest()[:16]


def encode_token(kind: str, *key: Any) -> str:
    raw = json.dumps([kind, *key], separators=(",", ":")).encode()
    return f"{_b64(raw)}.{_b64(_mac(raw))}"


def int64(value: Any) -> int:
    """A page-token key that must be a 64-bit integer."""
    if type(value) is not int or not -(2**63) <= value < 2**63:
        raise ValueError(value)
    return value


def text(value: Any) -> str:
    """A page-token key that must be a string."""
    if not isinstance(value, str):
        raise ValueError(value)
    return value


def instant(value: Any) -> dt.datetime:
    """A page-token key that must be an ISO 8601 time (naive means UTC, as SQLite stores it)."""
    moment = dt.datetime.fromisoformat(text(value))
    return utc(moment)


def decode_token(token: str, kind: str, *keys: Callable[[Any], Any]) -> list[Any] | None:
    """The sort key a token carries, each part checked by its converter in `keys` (int64, text,
    instant); None for an empty token; INVALID_ARGUMENT for a foreign, altered or forged one. Tokens
    are not secret (they carry only what the caller may see), but they are never trusted."""
    if not token:
        return None
    try:
        body, _, signature = token.partition(".")
        raw = _unb64(body)
        if not hmac.compare_digest(_unb64(signature), _mac(raw)):
            raise ValueError(token)
        data = json.loads(raw)
        if not isinstance(data, list) or len(data) != len(keys) + 1 or data[0] != kind:
            raise ValueError(token)
        return [convert(value) for convert, value in zip(keys, data[1:], strict=True)]
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError):
        raise InvalidArgument(
            "INVALID_PAGE_TOKEN",
            "page_token is not a next_page_token of this listing; start again without one",
            violations=(FieldViolation("page_token", "not a token issued by this listing"),),
        ) from None


T = TypeVar("T")


PAGE_BYTES = 512 * 1024
"""What the records of one page may weigh, for listings of records that can be large: half the
largest message a service sends (1 MiB by default). A page of audit records of 500-id reversals
(~130 KB each) failed RESOURCE_EXHAUSTED at the default size, with no way to page past it."""


def next_page(
    rows: list[T],
    size: int,
    kind: str,
    key: Callable[[T], Sequence[Any]],
    *,
    weigh: Callable[[T], int] | None = None,
) -> tuple[list[T], str]:
    """A page read with `size + 1` rows (the extra one says whether another page follows): its
    `size` rows, and the token for the next one from the last row's sort `key` ("" on the last).
    With `weigh` (a record's bytes, roughly), the page also ends once it holds `PAGE_BYTES`,
    after at least one record."""
    page = rows[:size]
    if weigh is not None:
        total = 0
        for held, row in enumerate(page):
            total += weigh(row)
            if total > PAGE_BYTES and held:
                return page[:held], encode_token(kind, *key(page[held - 1]))
    if len(rows) <= size:
        return rows, ""
    return page, encode_token(kind, *key(page[-1]))


@dataclass(frozen=True)
class RankedPage:
    """A page of a ranking (coins, then id), whose token also carries the rank of its last row:
    a rank cannot be recomputed without counting every row before it."""

    kind: str
    size: int
    after: tuple[int, str] | None
    """The sort key (coins, id) the page starts after; None for the first page."""
    first_rank: int

    @classmethod
    def of(cls, token: str, kind: str, size: int) -> RankedPage:
        after = decode_token(token, kind, int64, text, int64)
        if after is None:
            return cls(kind, size, None, 1)
        return cls(kind, size, (after[0], after[1]), after[2] + 1)

    def rows(self, rows: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], str]:
        """The page of (id, coins) rows read with `size + 1`, and the next page's token."""
        last_rank = self.first_rank + self.size - 1
        return next_page(rows, self.size, self.kind, lambda row: (row[1], row[0], last_rank))
