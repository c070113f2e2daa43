"""Holds: two-phase movements. Reserve an amount now, capture it (in parts) later, release the rest.

A hold reduces the account's available balance (balance - held) without moving anything: the
`held` column of the account row is raised with a conditional UPDATE, so holds and debits together
can never reserve more than the balance, under any concurrency. Capturing posts an ordinary ledger
transaction from the account to the hold's counter account; releasing (or expiring) gives back what
was not captured. A hold's state only ever moves forward (active -> captured | released | expired),
each by a conditional UPDATE on the hold row, so it resolves exactly once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

from sqlalchemy import Row, and_, case, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger.book import Ledger, Posted, Posting, frozen, insufficient
from ledger.schema import accounts, holds
from runtime.clock import utc
from runtime.errors import (
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    enum_name,
    request_id_reused,
)
from runtime.ids import time_ordered_id
from runtime.sql import as_tx

ACTIVE, CAPTURED, RELEASED, EXPIRED = "active", "captured", "released", "expired"
_HOLD_COLUMNS = [c for c in holds.c if c.name != "placed_under"]
"""What `Hold` carries (the request that placed a hold is only looked up by)."""


@dataclass(frozen=True)
class Hold:
    hold_id: str
    account_id: str
    counter_account_id: str
    amount: int
    captured: int
    status: str
    owner: str
    kind: str
    reference: str
    expires_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime

    @property
    def remaining(self) -> int:
        return self.amount - self.captured if self.status == ACTIVE else 0

    @staticmethod
    def of(row: Row[tuple[object, ...]]) -> Hold:
        data = row._asdict()
        for name in ("expires_at", "created_at", "updated_at"):
            if data[name] is not None:
                data[name] = utc(data[name])
        return Hold(**data)


class Holds:
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._clock = ledger.clock

    async def place(
        self,
        conn: AsyncConnection,
        account_id: str,
        amount: int,
        *,
        counter_account_id: str,
        owner: str,
        kind: str,
        reference: str,
        expires_at: dt.datetime | None = None,
        placed_under: str | None = None,
    ) -> Hold:
        """Reserve `amount` of the account's available balance; INSUFFICIENT_FUNDS if it is short.

        `placed_under` names the request (`<scope>/<request id>`): the hold keeps it, and the same
        request again, after the service purged its idempotency record, answers that hold (in
        whatever state it is now) instead of reserving a second time."""
        if amount <= 0:
            raise ValueError("a hold must be positive")
        if placed_under is not None:
            placed = await self.placed_under(conn, placed_under)
            if placed is not None:
                # The same request: what it reserves and for what (an expiry is a duration from
                # when it was sent, so only whether it has one can be compared).
                if (
                    placed.account_id,
                    placed.amount,
                    placed.counter_account_id,
                    placed.owner,
                    placed.kind,
                    placed.reference,
                    placed.expires_at is None,
                ) != (
                    account_id,
                    amount,
                    counter_account_id,
                    owner,
                    kind,
                    reference,
                    expires_at is None,
                ):
                    raise request_id_reused(
                        placed_under.rsplit("/", 1)[-1],
                        f"it placed hold {placed.hold_id} of {placed.amount}",
                        hold_id=placed.hold_id,
                    )
                return placed
        reserved = await conn.execute(
            update(accounts)
            .where(
                accounts.c.account_id == account_id,
                accounts.c.keeps_balance,
                accounts.c.frozen.is_(False),
                accounts.c.balance - accounts.c.held >= amount,
            )
            .values(held=accounts.c.held + literal(amount))
        )
        if reserved.rowcount != 1:
            found = await self._ledger.available(conn, account_id)
            if found is None:
                raise NotFound(
                    "ACCOUNT_NOT_FOUND",
                    f"account {account_id} does not exist",
                    account_id=account_id,
                )
            if await self._ledger.is_frozen(conn, account_id):
                raise frozen(account_id)
            balance, available = found
            raise insufficient(self._ledger.unit, account_id, balance, balance - available, amount)
        now = self._clock.now()
        hold = Hold(
            hold_id=time_ordered_id(),
            account_id=account_id,
            counter_account_id=counter_account_id,
            amount=amount,
            captured=0,
            status=ACTIVE,
            owner=owner,
            kind=kind,
            reference=reference,
            expires_at=expires_at,
            created_at=now,
            updated_at=now,
        )
        await conn.execute(holds.insert().values(**hold.__dict__, placed_under=placed_under))
        return hold

    async def placed_under(self, conn: AsyncConnection, placed_under: str) -> Hold | None:
        """The hold the request `placed_under` placed, if any (kept for good, unlike idempotency
        records)."""
        row = (
            await conn.execute(select(*_HOLD_COLUMNS).where(holds.c.placed_under == placed_under))
        ).first()
        return None if row is None else Hold.of(row)

    async def get(self, conn: AsyncConnection, hold_id: str) -> Hold:
        row = (await conn.execute(select(*_HOLD_COLUMNS).where(holds.c.hold_id == hold_id))).first()
        if row is None:
            raise NotFound("HOLD_NOT_FOUND", f"no hold {hold_id!r}", hold_id=hold_id)
        return Hold.of(row)

    async def as_it_stands(self, conn: AsyncConnection, hold_id: str, owner: str) -> Hold:
        """`owner`'s hold as it stands now: an active one past its expiry is expired, as capture
        and release already say, though the sweep records it only moments later (GetHold
        answered ACTIVE until then: a review's)."""
        hold = await self.owned(conn, hold_id, owner)
        if hold.status == ACTIVE and _expired(hold, self._clock.now()):
            return replace(hold, status=EXPIRED)
        return hold

    async def owned(self, conn: AsyncConnection, hold_id: str, owner: str) -> Hold:
        hold = await self.get(conn, hold_id)
        if hold.owner != owner:
            raise PermissionDenied(
                "HOLD_NOT_OWNED", f"hold {hold_id} belongs to {hold.owner}", hold_id=hold_id
            )
        return hold

    def _unresolvable(self, hold: Hold, now: dt.datetime) -> FailedPrecondition:
        status = EXPIRED if hold.status == ACTIVE and _expired(hold, now) else hold.status
        return FailedPrecondition(
            f"HOLD_{status.upper()}",
            f"hold {hold.hold_id} is {status}: nothing more can be captured or released",
            hold_id=hold.hold_id,
            status=enum_name("HOLD_STATUS", status),
        )

    async def capture(
        self,
        conn: AsyncConnection,
        hold_id: str,
        amount: int,
        *,
        owner: str,
        request_id: str,
        caller: str,
        policy_version: str = "",
    ) -> tuple[Hold, Posted]:
        """Move `amount` of the hold to its counter account; the hold stays active until fully
        captured. CAPTURE_EXCEEDS_HOLD past its amount; HOLD_<STATUS> once it is resolved."""
        hold = await self.owned(conn, hold_id, owner)
        # The same capture again after its request-id record was purged (the services keep those
        # for a while, the ledger its transactions for good): answered from the ledger, never
        # captured twice (the unique request id would refuse the posting: INTERNAL, for ever).
        done = await self._ledger.posted_under(
            as_tx(conn), caller=caller, request_id=request_id, account_id=hold.account_id
        )
        if done is not None:
            transaction_id, balance, moved = done
            if moved != -amount:
                raise request_id_reused(
                    request_id.rsplit("/", 1)[-1],
                    f"it captured {-moved} from hold {hold_id}",
                    hold_id=hold_id,
                )
            return hold, Posted(transaction_id, {hold.account_id: balance})
        now = self._clock.now()
        taken = await conn.execute(
            update(holds)
            .where(
                holds.c.hold_id == hold_id,
                holds.c.status == ACTIVE,
                holds.c.captured + amount <= holds.c.amount,
                or_(holds.c.expires_at.is_(None), holds.c.expires_at > now),
            )
            .values(
                captured=holds.c.captured + amount,
                status=case(
                    (holds.c.captured + amount == holds.c.amount, literal(CAPTURED)),
                    else_=literal(ACTIVE),
                ),
                updated_at=now,
            )
        )
        if taken.rowcount != 1:
            current = await self.get(conn, hold_id)
            if current.status == ACTIVE and not _expired(current, now):
                raise FailedPrecondition(
                    "CAPTURE_EXCEEDS_HOLD",
                    f"hold {hold_id} has {current.remaining} left; {amount} cannot be captured",
                    hold_id=hold_id,
                    remaining=current.remaining,
                    requested=amount,
                )
            raise self._unresolvable(current, now)
        await self._unreserve(conn, hold.account_id, amount)
        posted = await self._ledger.post(
            conn,
            # Forced: reserved coins stay capturable even if the account was frozen since.
            [
                Posting(hold.account_id, -amount, forced=True),
                Posting(hold.counter_account_id, amount),
            ],
            kind=hold.kind,
            reference=hold.reference,
            request_id=request_id,
            caller=caller,
            policy_version=policy_version,
        )
        return await self.get(conn, hold_id), posted

    async def release(self, conn: AsyncConnection, hold_id: str, *, owner: str) -> Hold:
        """Give back what the hold has not captured; HOLD_<STATUS> if it is already resolved."""
        await self.owned(conn, hold_id, owner)
        return await self._resolve(conn, hold_id, RELEASED)

    async def _resolve(self, conn: AsyncConnection, hold_id: str, status: str) -> Hold:
        now = self._clock.now()
        condition = [holds.c.hold_id == hold_id, holds.c.status == ACTIVE]
        if status == RELEASED:  # an expired hold is the sweeper's to resolve, as EXPIRED
            condition.append(or_(holds.c.expires_at.is_(None), holds.c.expires_at > now))
        resolved = await conn.execute(
            update(holds).where(and_(*condition)).values(status=status, updated_at=now)
        )
        hold = await self.get(conn, hold_id)
        if resolved.rowcount != 1:
            raise self._unresolvable(hold, now)
        if hold.amount > hold.captured:
            await self._unreserve(conn, hold.account_id, hold.amount - hold.captured)
        return hold

    async def expire_due(self, conn: AsyncConnection, *, limit: int = 100) -> list[Hold]:
        """Release, as EXPIRED, up to `limit` active holds past their expiry."""
        now = self._clock.now()
        due = (
            await conn.execute(
                select(holds.c.hold_id)
                .where(holds.c.status == ACTIVE, holds.c.expires_at <= now)
                .order_by(holds.c.expires_at)
                .limit(limit)
            )
        ).scalars()
        expired = []
        for hold_id in list(due):
            try:
                expired.append(await self._resolve(conn, hold_id, EXPIRED))
            except FailedPrecondition:
                continue  # resolved meanwhile
        return expired

    async def _unreserve(self, conn: AsyncConnection, account_id: str, amount: int) -> None:
        await conn.execute(
            update(accounts)
            .where(accounts.c.account_id == account_id)
            .values(held=accounts.c.held - literal(amount))
        )


def _expired(hold: Hold, now: dt.datetime) -> bool:
    return hold.expires_at is not None and hold.expires_at <= now
