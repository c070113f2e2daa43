"""Cursor pagination (AIP-158): opaque page tokens that carry the last row's sort key.

Keyset pagination keeps every page an index range scan, however deep the caller pages.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

from runtime.clock import utc
from runtime.errors import FieldViolation, InvalidArgument


def page_size(requested: int, default: int = 50, maximum: int = 1000) -> int:
    """0 means the default; the proto rules already refuse negatives and sizes above the maximum."""
    return min(requested or default, maximum)


def encode_token(kind: str, *key: Any) -> str:
    raw = json.dumps([kind, *key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


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
    instant); None for an empty token; INVALID_ARGUMENT for a foreign or forged one. Tokens are
    not secret (they carry only what the caller may see), but they are never trusted."""
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(data, list) or len(data) != len(keys) + 1 or data[0] != kind:
            raise ValueError(token)
        return [convert(value) for convert, value in zip(keys, data[1:], strict=True)]
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError):
        raise InvalidArgument(
            "INVALID_PAGE_TOKEN",
            "page_token is not a next_page_token of this listing; start again without one",
            violations=(FieldViolation("page_token", "not a token issued by this listing"),),
        ) from None
