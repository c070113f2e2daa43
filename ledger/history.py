"""Reading an account's history at any depth: pages of entries, balances at a past time, statements.

Every query is an index range on one account (ledger v6): entries by (account, time, id) and by
(account, kind, time, id). A page with a kind filter reads one index range per kind, each stopping
at the page size, and merges them, so a page costs what it returns however many entries the account
holds or the filters skip. Pages are keyset-paged on (time, entry id), newest first.

Balances at a past time come from the entries' running balances (`balance_after`): an account's
entries are written in time order (the ledger reads the clock with the account locked), so the
balance at T is the running balance of its last entry before T, one index probe.

A query that still runs long (a statement over years of a busy account) is cancelled after its
budget and answered RESOURCE_EXHAUSTED, so no caller can keep the database's cores busy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from runtime.clock import utc
from runtime.errors import ResourceExhausted
from runtime.sql import Statement, Tx

PAGE_BUDGET_SECONDS = 2.0
STATEMENT_BUDGET_SECONDS = 10.0

_ENTRY = "entry_id, transaction_id, kind, amount, balance_after, created_at, account_id"


@dataclass(frozen=True)
class HistoryEntry:
    entry_id: int
    transaction_id: str
    kind: str
    amount: int
    balance_after: int | None
    reference: str
    created_at: dt.datetime
    account_id: str = ""

    @property
    def cursor(self) -> tuple[dt.datetime, int]:
        """Where the next page starts (exclusive): this entry's sort key."""
        return self.created_at, self.entry_id


@dataclass(frozen=True)
class Movement:
    """What one kind of entry did to an account over a period."""

    kind: str
    credited: int
    debited: int
    """As a positive number."""
    entries: int


@dataclass(frozen=True)
class Period:
    """An account's statement for [since, until): opening + sum of movements = closing."""

    opening: int
    closing: int
    movements: tuple[Movement, ...]


def moment(value: object) -> dt.datetime:
    """A stored time as an aware UTC datetime (SQLite hands back its text)."""
    if isinstance(value, dt.datetime):
        return utc(value)
    return utc(dt.datetime.fromisoformat(str(value)))


@cache
def _page_statement(accounts: int, kinds: int, since: bool, until: bool, cursor: bool) -> Statement:
    """One statement per filter shape, built once: a range per account and kind, merged, with the
    references."""

    def branch(account: int, kind: int | None) -> str:
        where = [f"account_id = :account_{account}"]
        if kind is not None:
            where.append(f"kind = :kind_{kind}")
        if since:
            where.append("created_at >= :since")
        if until:
            where.append("created_at < :until")
        if cursor:
            where.append("created_at <= :cursor_at")
            where.append("(created_at < :cursor_at OR entry_id < :cursor_id)")
        return (
            f"SELECT {_ENTRY} FROM ledger_entries WHERE {' AND '.join(where)} "
            "ORDER BY created_at DESC, entry_id DESC LIMIT :limit"
        )

    branches = [branch(a, k) for a in range(accounts) for k in (range(kinds) if kinds else [None])]
    if len(branches) > 1:
        merged = " UNION ALL ".join(f"SELECT * FROM ({b}) AS b{n}" for n, b in enumerate(branches))
        page = f"SELECT * FROM ({merged}) AS m ORDER BY created_at DESC, entry_id DESC LIMIT :limit"
    else:
        page = branches[0]
    return Statement(
        f"ledger.history_{accounts}a{kinds}{'s' * since}{'u' * until}{'c' * cursor}",
        f"SELECT p.entry_id, p.transaction_id, p.kind, p.amount, p.balance_after, t.reference, "
        f"p.created_at, p.account_id FROM ({page}) AS p "
        "JOIN ledger_transactions AS t ON t.transaction_id = p.transaction_id "
        "ORDER BY p.created_at DESC, p.entry_id DESC",
    )


_BALANCE_BEFORE = Statement(
    "ledger.balance_before",
    "SELECT balance_after FROM ledger_entries WHERE account_id = :account_id "
    "AND created_at < :at ORDER BY created_at DESC, entry_id DESC LIMIT 1",
)
_MOVEMENTS = Statement(
    "ledger.movements",
    "SELECT kind, sum(CASE WHEN amount > 0 THEN amount ELSE 0 END), "
    "sum(CASE WHEN amount < 0 THEN -amount ELSE 0 END), count(*) FROM ledger_entries "
    "WHERE account_id IN (SELECT value FROM json_each(:accounts)) "
    "AND created_at >= :since AND created_at < :until GROUP BY kind ORDER BY kind",
    postgres="SELECT kind, sum(CASE WHEN amount > 0 THEN amount ELSE 0 END), "
    "sum(CASE WHEN amount < 0 THEN -amount ELSE 0 END), count(*) FROM ledger_entries "
    "WHERE account_id = ANY(:accounts::text[]) "
    "AND created_at >= :since AND created_at < :until GROUP BY kind ORDER BY kind",
)


async def _bounded(
    what: str, budget: float, tx: Tx, statement: Statement, **params: object
) -> Sequence[Sequence[Any]]:
    try:
        async with asyncio.timeout(budget):
            return await tx.all(statement, **params)
    except TimeoutError:
        raise ResourceExhausted(
            "QUERY_TOO_EXPENSIVE",
            f"the {what} took more than {budget:g} s and was stopped (the database was busy, or "
            "the filters match little of a long history): retry later, or narrow it with a "
            "shorter period",
            budget_seconds=budget,
        ) from None


def _accounts(account_ids: str | Sequence[str]) -> list[str]:
    return [account_ids] if isinstance(account_ids, str) else list(account_ids)


async def entries_page(
    tx: Tx,
    account_ids: str | Sequence[str],
    *,
    limit: int,
    cursor: tuple[dt.datetime, int] | None = None,
    kinds: Sequence[str] = (),
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> list[HistoryEntry]:
    """The entries of an account (or of a few, merged: a creator's pending and available diamonds),
    newest first, after `cursor` (a previous page's last `cursor`); optionally only of `kinds`, and
    created in [since, until)."""
    accounts = _accounts(account_ids)
    statement = _page_statement(
        len(accounts), len(kinds), since is not None, until is not None, cursor is not None
    )
    params: dict[str, object] = {"limit": limit}
    params.update({f"account_{i}": account for i, account in enumerate(accounts)})
    params.update({f"kind_{i}": kind for i, kind in enumerate(kinds)})
    if since is not None:
        params["since"] = utc(since)
    if until is not None:
        params["until"] = utc(until)
    if cursor is not None:
        params["cursor_at"], params["cursor_id"] = utc(cursor[0]), cursor[1]
    rows = await _bounded("history page", PAGE_BUDGET_SECONDS, tx, statement, **params)
    return [
        HistoryEntry(
            entry_id=int(r[0]),
            transaction_id=str(r[1]),
            kind=str(r[2]),
            amount=int(r[3]),
            balance_after=None if r[4] is None else int(r[4]),
            reference=str(r[5]),
            created_at=moment(r[6]),
            account_id=str(r[7]),
        )
        for r in rows
    ]


async def balance_at(tx: Tx, account_ids: str | Sequence[str], at: dt.datetime) -> int:
    """The balance of balance-keeping accounts (summed) just before `at` (0 before the first
    entry)."""
    total = 0
    for account_id in _accounts(account_ids):
        row = await tx.one(_BALANCE_BEFORE, account_id=account_id, at=utc(at))
        total += 0 if row is None or row[0] is None else int(row[0])
    return total


async def period(
    tx: Tx, account_ids: str | Sequence[str], since: dt.datetime, until: dt.datetime
) -> Period:
    """Opening balance at `since`, closing balance at `until`, and each kind's movements between
    (of one account, or of a few taken together)."""
    accounts = _accounts(account_ids)
    rows = await _bounded(
        "statement",
        STATEMENT_BUDGET_SECONDS,
        tx,
        _MOVEMENTS,
        accounts=accounts,
        since=utc(since),
        until=utc(until),
    )
    return Period(
        opening=await balance_at(tx, accounts, since),
        closing=await balance_at(tx, accounts, until),
        movements=tuple(
            Movement(kind=str(k), credited=int(c), debited=int(d), entries=int(n))
            for k, c, d, n in rows
        ),
    )
