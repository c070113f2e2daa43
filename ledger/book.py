"""Posting transactions, reading balances and history, and auditing the books."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry import trace
from sqlalchemy import Row, func, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.schema import accounts, entries, transactions
from runtime.clock import Clock
from runtime.errors import FailedPrecondition, NotFound

MAX_BALANCE = 2**63 - 1


@dataclass(frozen=True)
class Posting:
    """One leg of a transaction: `amount` added to (positive) or taken from (negative) an account."""

    account_id: str
    amount: int


@dataclass(frozen=True)
class Posted:
    """A written transaction and the balances of its balance-keeping accounts right after it."""

    transaction_id: str
    balances: dict[str, int]


@dataclass(frozen=True)
class AuditReport:
    """Result of recomputing every balance from the entries."""

    accounts_checked: int
    mismatches: dict[str, tuple[int, int]]
    """account id -> (kept balance, sum of entries), for every account where they differ."""
    total: int
    """Sum of all entries over all accounts; zero in a correct book."""

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.total == 0


class Ledger:
    def __init__(self, clock: Clock, *, unit: str) -> None:
        self._clock = clock
        self.unit = unit
        """What the amounts count ("coins", "diamonds"), for error messages."""
        self._passive: set[str] = set()
        """Accounts known to keep no balance row: postings to them skip the UPDATE."""

    async def open_account(
        self,
        conn: AsyncConnection,
        account_id: str,
        *,
        kind: str = "user",
        allow_negative: bool = False,
        keeps_balance: bool = True,
    ) -> None:
        """Create the account if it does not exist (concurrent opens are safe)."""
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        await conn.execute(
            dialect.insert(accounts)
            .values(
                account_id=account_id,
                kind=kind,
                balance=0,
                allow_negative=allow_negative,
                keeps_balance=keeps_balance,
                created_at=self._clock.now(),
            )
            .on_conflict_do_nothing()
        )
        if not keeps_balance:
            self._passive.add(account_id)

    async def post(
        self,
        conn: AsyncConnection,
        postings: Sequence[Posting],
        *,
        kind: str,
        reference: str,
        request_id: str,
        caller: str,
        policy_version: str = "",
    ) -> Posted:
        """Write one balanced transaction, or raise and write nothing (the caller's transaction rolls back).

        Raises NotFound (ACCOUNT_NOT_FOUND) or FailedPrecondition (INSUFFICIENT_FUNDS).
        """
        if sum(p.amount for p in postings) != 0 or any(p.amount == 0 for p in postings):
            raise ValueError(f"unbalanced or empty postings: {postings}")
        now = self._clock.now()
        balances: dict[str, int] = {}
        # Lock order by account id, so two transactions touching the same accounts cannot deadlock.
        for posting in sorted(postings, key=lambda p: p.account_id):
            new_balance = await self._apply(conn, posting)
            if new_balance is not None:
                balances[posting.account_id] = new_balance
        transaction_id = uuid.uuid4().hex
        span_context = trace.get_current_span().get_span_context()
        await conn.execute(
            transactions.insert().values(
                transaction_id=transaction_id,
                kind=kind,
                reference=reference,
                request_id=request_id,
                caller=caller,
                policy_version=policy_version,
                trace_id=format(span_context.trace_id, "032x") if span_context.is_valid else "",
                created_at=now,
            )
        )
        await conn.execute(
            entries.insert(),
            [
                {
                    "transaction_id": transaction_id,
                    "account_id": p.account_id,
                    "amount": p.amount,
                    "balance_after": balances.get(p.account_id),
                    "created_at": now,
                }
                for p in postings
            ],
        )
        return Posted(transaction_id, balances)

    async def _apply(self, conn: AsyncConnection, posting: Posting) -> int | None:
        """Move a keeping account's balance with one conditional UPDATE; None for a non-keeping account."""
        if posting.account_id in self._passive:
            return None
        amount = posting.amount
        guard = (
            or_(accounts.c.allow_negative, accounts.c.balance >= -amount)
            if amount < 0
            else accounts.c.balance <= MAX_BALANCE - amount
        )
        row = (
            await conn.execute(
                update(accounts)
                .where(accounts.c.account_id == posting.account_id, accounts.c.keeps_balance, guard)
                .values(balance=accounts.c.balance + literal(amount))
                .returning(accounts.c.balance)
            )
        ).first()
        if row is not None:
            return int(row.balance)
        found = (
            await conn.execute(
                select(accounts.c.balance, accounts.c.keeps_balance).where(
                    accounts.c.account_id == posting.account_id
                )
            )
        ).first()
        if found is None:
            raise NotFound(
                "ACCOUNT_NOT_FOUND",
                f"account {posting.account_id} does not exist",
                account_id=posting.account_id,
            )
        if not found.keeps_balance:
            self._passive.add(posting.account_id)
            return None
        if amount > 0:
            raise FailedPrecondition(
                "BALANCE_LIMIT_EXCEEDED",
                f"account {posting.account_id} cannot hold more {self.unit}",
                account_id=posting.account_id,
            )
        raise FailedPrecondition(
            "INSUFFICIENT_FUNDS",
            f"not enough {self.unit}: the balance is {found.balance}, {-amount} are needed",
            account_id=posting.account_id,
            balance=found.balance,
            required=-amount,
            unit=self.unit,
        )

    async def balance(self, conn: AsyncConnection, account_id: str) -> int | None:
        """The kept balance of an account, None if there is no such account."""
        value = await conn.scalar(
            select(accounts.c.balance).where(accounts.c.account_id == account_id)
        )
        return None if value is None else int(value)

    async def history(
        self,
        conn: AsyncConnection,
        account_id: str,
        *,
        limit: int,
        before_entry_id: int | None = None,
    ) -> Sequence[Row[tuple[int, str, str, int, int | None, str, object]]]:
        """An account's entries, newest first, with their transaction's kind and reference."""
        query = (
            select(
                entries.c.entry_id,
                entries.c.transaction_id,
                transactions.c.kind,
                entries.c.amount,
                entries.c.balance_after,
                transactions.c.reference,
                entries.c.created_at,
            )
            .join(transactions, transactions.c.transaction_id == entries.c.transaction_id)
            .where(entries.c.account_id == account_id)
            .order_by(entries.c.entry_id.desc())
            .limit(limit)
        )
        if before_entry_id is not None:
            query = query.where(entries.c.entry_id < before_entry_id)
        return (await conn.execute(query)).all()

    async def audit(self, conn: AsyncConnection) -> AuditReport:
        """Recompute every balance from the entries and compare with the kept balances."""
        totals = await conn.execute(
            select(entries.c.account_id, func.sum(entries.c.amount)).group_by(entries.c.account_id)
        )
        sums = {str(account_id): int(total) for account_id, total in totals}
        kept = (
            await conn.execute(
                select(accounts.c.account_id, accounts.c.balance).where(accounts.c.keeps_balance)
            )
        ).all()
        mismatches = {
            row.account_id: (int(row.balance), sums.get(row.account_id, 0))
            for row in kept
            if int(row.balance) != sums.get(row.account_id, 0)
        }
        total = sum(sums.values())
        return AuditReport(len(kept), mismatches, total)
