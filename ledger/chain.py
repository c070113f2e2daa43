"""Tamper evidence: transaction digests and per-account hash chains of entries (sha256, hashlib only).

- Every transaction carries a `digest`: sha256 over a canonical encoding of its own fields and of ALL its
  entries (account, amount, balance after, time), sorted, so no entry of it, on any account, can change
  without the digest failing to recompute.
- Every entry of a balance-keeping account carries its account's sequence number `seq` (1, 2, 3 ...), the
  `prev_hash` of that account's previous entry (GENESIS for the first) and its own `hash`, computed over
  (prev_hash, account, seq, amount, balance after, transaction id, transaction digest). The account row
  keeps the head (`seq`, `head_hash`), so a truncated tail shows too.

Passive (system) accounts are not chained: chaining them would serialize every write on one hot row, which
is exactly what they exist to avoid. Their entries are protected by the digest of their transaction, and
through it by the chain of the user account on the other side: editing or deleting a system entry changes
its transaction's digest, which no longer matches the hash of the user's entry in the same transaction.

The encodings below are frozen (migration 0002 backfills with them); a change of scheme takes a new tag
and a migration that re-hashes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable
from json.encoder import encode_basestring_ascii as _text  # type: ignore[attr-defined]

GENESIS = "0" * 64
"""The `prev_hash` of an account's first entry, and the head of an account without entries."""

_TRANSACTION_TAG = "coins.ledger.transaction/v1"
_ENTRY_TAG = "coins.ledger.entry/v1"


def canonical_time(value: dt.datetime) -> str:
    """A timestamp as UTC microseconds; a naive value (SQLite returns them) is taken as UTC."""
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value.isoformat(sep="T", timespec="microseconds") + "Z"


# The encoding is compact JSON, ASCII only, built by hand with json's own C string encoder and `repr` of
# ints, as json.dumps builds it, but a third faster (an audit of millions of entries feels it);
# tests/test_ledger_chain.py holds it byte for byte to json.dumps.


def _number(value: int | None) -> str:
    return "null" if value is None else repr(int(value))


def transaction_digest(
    *,
    transaction_id: str,
    kind: str,
    reference: str,
    request_id: str,
    caller: str,
    policy_version: str,
    trace_id: str,
    created_at: dt.datetime,
    entries: Iterable[tuple[str, int, int | None, dt.datetime]],
    acting_user: str = "",
) -> str:
    """sha256 of a transaction and all of its entries, given as (account, amount, balance after, time).
    The acting user (ledger v5) is hashed when there is one, so digests written before stay valid."""
    legs = sorted(
        f"[{_text(str(account))}, {int(amount)!r}, {_number(after)}, {_text(canonical_time(at))}]"
        for account, amount, after, at in entries
    )
    parts = [
        _text(_TRANSACTION_TAG),
        _text(str(transaction_id)),
        _text(str(kind)),
        _text(str(reference)),
        _text(str(request_id)),
        _text(str(caller)),
        _text(str(policy_version)),
        _text(str(trace_id)),
        _text(canonical_time(created_at)),
        "[" + ",".join(_text(leg) for leg in legs) + "]",
    ]
    if acting_user:
        parts.append(_text(f"acting_user={acting_user}"))
    return hashlib.sha256(("[" + ",".join(parts) + "]").encode("ascii")).hexdigest()


def entry_hash(
    *,
    prev_hash: str,
    account_id: str,
    seq: int,
    amount: int,
    balance_after: int | None,
    transaction_id: str,
    digest: str,
) -> str:
    """sha256 of one link of an account's chain."""
    encoded = (
        f"[{_text(_ENTRY_TAG)},{_text(str(prev_hash))},{_text(str(account_id))},{int(seq)!r},"
        f"{int(amount)!r},{_number(balance_after)},{_text(str(transaction_id))},{_text(str(digest))}]"
    )
    return hashlib.sha256(encoded.encode("ascii")).hexdigest()
