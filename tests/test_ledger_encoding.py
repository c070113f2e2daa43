"""The chain's hand-built encoding is byte for byte the frozen reference: compact, ASCII-only JSON.

Every digest and link already stored was written with json.dumps; a faster encoder may only replace it
if it produces the same bytes for every input, unicode, quotes, control characters and all.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.chain import canonical_time, entry_hash, transaction_digest


def reference(fields: list[Any]) -> str:
    encoded = json.dumps(fields, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(encoded.encode("ascii")).hexdigest()


def reference_digest(
    tid: str,
    kind: str,
    ref: str,
    at: dt.datetime,
    legs: list[tuple[str, int, int | None, dt.datetime]],
    acting: str,
) -> str:
    encoded_legs = sorted(
        json.dumps([account, amount, after, canonical_time(when)])
        for account, amount, after, when in legs
    )
    return reference(
        [
            "coins.ledger.transaction/v1",
            tid,
            kind,
            ref,
            "req",
            "caller",
            "v1",
            "t" * 32,
            canonical_time(at),
            encoded_legs,
            *([f"acting_user={acting}"] if acting else []),
        ]
    )


texts = st.text(max_size=40)
amounts = st.integers(min_value=-(2**63), max_value=2**63 - 1)
times = st.datetimes(
    min_value=dt.datetime(1970, 1, 1), max_value=dt.datetime(2200, 1, 1), timezones=st.just(dt.UTC)
)
legs = st.lists(st.tuples(texts, amounts, st.none() | amounts, times), max_size=4)


@settings(max_examples=300, deadline=None)
@given(tid=texts, kind=texts, ref=texts, at=times, entries=legs, acting=texts)
def test_transaction_digest_matches_the_reference_encoding(
    tid: str,
    kind: str,
    ref: str,
    at: dt.datetime,
    entries: list[tuple[str, int, int | None, dt.datetime]],
    acting: str,
) -> None:
    ours = transaction_digest(
        transaction_id=tid,
        kind=kind,
        reference=ref,
        request_id="req",
        caller="caller",
        policy_version="v1",
        trace_id="t" * 32,
        created_at=at,
        entries=entries,
        acting_user=acting,
    )
    assert ours == reference_digest(tid, kind, ref, at, entries, acting)


@settings(max_examples=300, deadline=None)
@given(prev=texts, account=texts, seq=amounts, amount=amounts, after=st.none() | amounts, tid=texts)
def test_entry_hash_matches_the_reference_encoding(
    prev: str, account: str, seq: int, amount: int, after: int | None, tid: str
) -> None:
    ours = entry_hash(
        prev_hash=prev,
        account_id=account,
        seq=seq,
        amount=amount,
        balance_after=after,
        transaction_id=tid,
        digest="d" * 64,
    )
    expected = reference(
        ["coins.ledger.entry/v1", prev, account, seq, amount, after, tid, "d" * 64]
    )
    assert ours == expected
