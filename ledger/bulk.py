"""Appending many movements of one account at once (imports, backfills, the ledger benchmark).

Each movement becomes exactly what `Ledger.post` writes for a two-leg posting between the account and
a passive counter account: a transaction row with its digest, the account's entry chained to the
previous one (seq, prev_hash, hash, running balance) and the counter account's unchained entry, both
carrying the kind. Rows go in with COPY (PostgreSQL, where ledgers grow large), a chunk per
transaction that also moves the account's head, so the books are whole after every chunk and the
audit verifies them like any other (the two paths are held to each other by
tests/test_ledger_at_scale.py::test_the_bulk_path_writes_what_posting_writes).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from ledger.chain import entry_hash, transaction_digest
from runtime.clock import utc
from runtime.ids import time_ordered_id

_TX_COLUMNS = (
    "transaction_id",
    "kind",
    "reference",
    "request_id",
    "caller",
    "policy_version",
    "trace_id",
    "created_at",
    "digest",
    "acting_user",
)
_ENTRY_COLUMNS = (
    "transaction_id",
    "account_id",
    "amount",
    "balance_after",
    "created_at",
    "seq",
    "prev_hash",
    "hash",
    "kind",
)


@dataclass(frozen=True)
class Movement:
    kind: str
    amount: int
    """Added to the account (negative: taken); the counter account takes the opposite."""
    counter_account: str
    """A passive (system) account."""
    reference: str
    at: dt.datetime


@dataclass
class Head:
    seq: int
    hash: str
    balance: int


def chain_rows(
    account_id: str, head: Head, movements: Iterable[Movement], *, caller: str
) -> Iterator[tuple[tuple[Any, ...], tuple[Any, ...], tuple[Any, ...]]]:
    """(transaction row, account entry row, counter entry row) per movement, moving `head`."""
    for m in movements:
        at = utc(m.at)
        transaction_id = time_ordered_id()
        request_id = f"bulk:{transaction_id}"
        balance = head.balance + m.amount
        if balance < 0:
            raise ValueError(f"{account_id} would go below zero at {at.isoformat()}")
        digest = transaction_digest(
            transaction_id=transaction_id,
            kind=m.kind,
            reference=m.reference,
            request_id=request_id,
            caller=caller,
            policy_version="",
            trace_id="",
            created_at=at,
            entries=[(account_id, m.amount, balance, at), (m.counter_account, -m.amount, None, at)],
        )
        seq = head.seq + 1
        link = entry_hash(
            prev_hash=head.hash,
            account_id=account_id,
            seq=seq,
            amount=m.amount,
            balance_after=balance,
            transaction_id=transaction_id,
            digest=digest,
        )
        yield (
            (transaction_id, m.kind, m.reference, request_id, caller, "", "", at, digest, ""),
            (transaction_id, account_id, m.amount, balance, at, seq, head.hash, link, m.kind),
            (transaction_id, m.counter_account, -m.amount, None, at, None, None, None, m.kind),
        )
        head.seq, head.hash, head.balance = seq, link, balance


async def append_postgres(
    conn: asyncpg.Connection,
    account_id: str,
    movements: Iterable[Movement],
    *,
    caller: str = "bulk",
    chunk: int = 50_000,
) -> Head:
    """Append `movements` to an existing balance-keeping account, `chunk` per transaction."""
    batch: list[Movement] = []
    head: Head | None = None
    for movement in movements:
        batch.append(movement)
        if len(batch) >= chunk:
            head = await _append_chunk(conn, account_id, batch, caller)
            batch = []
    if batch or head is None:
        head = await _append_chunk(conn, account_id, batch, caller)
    return head


async def _append_chunk(
    conn: asyncpg.Connection, account_id: str, batch: Sequence[Movement], caller: str
) -> Head:
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT seq, head_hash, balance FROM ledger_accounts "
            "WHERE account_id = $1 AND keeps_balance AND held = 0 FOR UPDATE",
            account_id,
        )
        if row is None:
            raise ValueError(f"{account_id}: no balance-keeping account without holds")
        head = Head(int(row[0]), str(row[1]), int(row[2]))
        transactions: list[tuple[Any, ...]] = []
        entries: list[tuple[Any, ...]] = []
        for tx, mine, theirs in chain_rows(account_id, head, batch, caller=caller):
            transactions.append(tx)
            entries.append(mine)
            entries.append(theirs)
        await conn.copy_records_to_table(
            "ledger_transactions", records=transactions, columns=_TX_COLUMNS
        )
        await conn.copy_records_to_table("ledger_entries", records=entries, columns=_ENTRY_COLUMNS)
        await conn.execute(
            "UPDATE ledger_accounts SET seq = $2, head_hash = $3, balance = $4, "
            "head_at = GREATEST(head_at, $5) WHERE account_id = $1",
            account_id,
            head.seq,
            head.hash,
            head.balance,
            max((m.at for m in batch), default=None),
        )
    return head
