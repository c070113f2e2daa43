"""Withdrawals: requested, worked on by the processor worker (leases, attempts, batches), moved
through their statuses, with their event history."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.clock import utc
from runtime.sql import Statement, Tx
from services.payout.storage.tables import (
    ENDINGS,
    EVENT_KINDS,
    NOT_COUNTED,
    withdrawal_events,
    withdrawals,
)


@dataclass(frozen=True)
class WithdrawalRecord:
    withdrawal_id: str
    creator_id: str
    diamonds: int
    gross_minor: int
    fee_minor: int
    currency_code: str
    method: str
    destination_token: str
    status: str
    failure_reason: str
    processor_reference: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    attempts: int = 0
    """Processor calls that failed (timed out, errored) so far."""
    next_attempt_at: dt.datetime | None = None
    last_error: str = ""
    method_id: str | None = None
    """The registered payout method it pays (None: a one-off destination)."""
    hold_id: str | None = None
    """The ledger hold on its diamonds (None: accepted before holds; its diamonds are in the
    in-flight account)."""
    submitted_at: dt.datetime | None = None
    parked_at: dt.datetime | None = None
    leased_until: dt.datetime | None = None
    sender_batch_id: str | None = None

    @property
    def net_minor(self) -> int:
        return self.gross_minor - self.fee_minor

    @property
    def parked(self) -> bool:
        """With the processor, its sends all lost: the worker leaves it for an admin."""
        return self.parked_at is not None and self.status == "processing"


def _withdrawal(row: object) -> WithdrawalRecord:
    data = row._asdict()  # type: ignore[attr-defined]
    data["created_at"] = utc(data["created_at"])
    data["updated_at"] = utc(data["updated_at"])
    for name in ("next_attempt_at", "submitted_at", "parked_at", "leased_until"):
        if data[name] is not None:
            data[name] = utc(data[name])
    return WithdrawalRecord(**data)


_WITHDRAWAL_TOTALS = Statement(
    "payout.withdrawal_totals",
    "SELECT coalesce(sum(CASE WHEN status IN ('requested', 'in_review', 'approved', 'processing') "
    "THEN diamonds ELSE 0 END), "
    "0), coalesce(sum(CASE WHEN status = 'paid' THEN diamonds ELSE 0 END), 0) "
    "FROM withdrawals WHERE creator_id = :creator_id",
)


async def withdrawal_totals(tx: Tx, creator_id: str) -> tuple[int, int]:
    """(diamonds in withdrawals on their way out, diamonds paid out) of a creator."""
    row = await tx.one(_WITHDRAWAL_TOTALS, creator_id=creator_id)
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


async def insert_withdrawal(conn: AsyncConnection, withdrawal: WithdrawalRecord) -> None:
    await conn.execute(withdrawals.insert().values(**withdrawal.__dict__))


async def get_withdrawal(conn: AsyncConnection, withdrawal_id: str) -> WithdrawalRecord | None:
    row = (
        await conn.execute(select(withdrawals).where(withdrawals.c.withdrawal_id == withdrawal_id))
    ).first()
    return None if row is None else _withdrawal(row)


async def withdrawn_since(conn: AsyncConnection, creator_id: str, since: dt.datetime) -> int:
    """Gross cash of a creator's withdrawals since `since`, but for those whose money never left
    or came back (for the daily cap)."""
    total = await conn.scalar(
        select(func.coalesce(func.sum(withdrawals.c.gross_minor), 0)).where(
            withdrawals.c.creator_id == creator_id,
            withdrawals.c.created_at >= since,
            withdrawals.c.status.not_in(NOT_COUNTED),
        )
    )
    return int(total or 0)


async def list_withdrawals(
    conn: AsyncConnection,
    creator_id: str,
    *,
    limit: int,
    before: tuple[dt.datetime, str] | None,
) -> list[WithdrawalRecord]:
    query = (
        select(withdrawals)
        .where(withdrawals.c.creator_id == creator_id)
        .order_by(withdrawals.c.created_at.desc(), withdrawals.c.withdrawal_id.desc())
        .limit(limit)
    )
    if before is not None:
        at, withdrawal_id = before
        query = query.where(
            (withdrawals.c.created_at < at)
            | ((withdrawals.c.created_at == at) & (withdrawals.c.withdrawal_id < withdrawal_id))
        )
    return [_withdrawal(row) for row in (await conn.execute(query)).all()]


def _due(now: dt.datetime) -> tuple[ColumnElement[bool], ...]:
    """Due for the worker: not parked, its pause over, no live lease."""
    return (
        withdrawals.c.parked_at.is_(None),
        (withdrawals.c.next_attempt_at.is_(None)) | (withdrawals.c.next_attempt_at <= now),
        (withdrawals.c.leased_until.is_(None)) | (withdrawals.c.leased_until <= now),
    )


FOLLOWED_BY_THE_WORKER = ("approved", "processing")
"""The statuses whose withdrawals the processor worker sends or follows until they end
(`due_withdrawals`). A paid one is only looked up again for a return, every
`PAYOUT_RETURN_POLL_SECONDS` for `PAYOUT_RETURN_WATCH_DAYS` (its `next_attempt_at`, migration
0025); a return's callback usually comes first."""


async def due_withdrawals(
    conn: AsyncConnection, now: dt.datetime, limit: int
) -> list[WithdrawalRecord]:
    """Withdrawals the processor worker has to send or follow up now, oldest first
    (ix_withdrawals_work); one whose last attempt failed waits for its next attempt, a parked one
    for an admin, a leased one for its worker."""
    query = (
        select(withdrawals)
        .where(withdrawals.c.status.in_(FOLLOWED_BY_THE_WORKER), *_due(now))
        .order_by(withdrawals.c.created_at)
        .limit(limit)
    )
    watched = (  # ix_withdrawals_return_watch
        select(withdrawals)
        .where(withdrawals.c.status == "paid", withdrawals.c.next_attempt_at <= now)
        .order_by(withdrawals.c.next_attempt_at)
        .limit(limit)
    )
    return [_withdrawal(row) for q in (query, watched) for row in (await conn.execute(q)).all()]


async def watch_for_return(
    conn: AsyncConnection,
    withdrawal_id: str,
    at: dt.datetime | None,
    *,
    due_by: dt.datetime | None = None,
) -> bool:
    """A paid withdrawal is next looked up for a return at `at` (None: no longer). With `due_by`,
    only if its check was due by then: a worker taking the check (another took it: False). False
    too if it is no longer paid."""
    due = () if due_by is None else (withdrawals.c.next_attempt_at <= due_by,)
    result = await conn.execute(
        update(withdrawals)
        .where(withdrawals.c.withdrawal_id == withdrawal_id, withdrawals.c.status == "paid", *due)
        .values(next_attempt_at=at)
    )
    return result.rowcount == 1


async def note_failed_attempt(
    conn: AsyncConnection,
    withdrawal_id: str,
    *,
    retry_at: dt.datetime,
    error: str,
    park_at: dt.datetime | None = None,
) -> bool:
    """The processor call failed: count it, give the lease back, and leave the withdrawal until
    `retry_at` (or, with `park_at`, until an admin retries it). False if it is no longer
    processing (it ended meanwhile: nothing noted)."""
    result = await conn.execute(
        update(withdrawals)
        .where(withdrawals.c.withdrawal_id == withdrawal_id, withdrawals.c.status == "processing")
        .values(
            attempts=withdrawals.c.attempts + 1,
            next_attempt_at=retry_at,
            last_error=error[:256],
            parked_at=park_at,
            leased_until=None,
        )
    )
    return result.rowcount == 1


async def schedule_follow_up(conn: AsyncConnection, withdrawal_id: str, at: dt.datetime) -> None:
    """The worker's call succeeded and the payment is still on its way: look again at `at`; the
    count of failed attempts starts over and the lease is given back."""
    await conn.execute(
        update(withdrawals)
        .where(withdrawals.c.withdrawal_id == withdrawal_id, withdrawals.c.status == "processing")
        .values(next_attempt_at=at, attempts=0, last_error="", leased_until=None)
    )


async def nudge(conn: AsyncConnection, withdrawal_id: str, now: dt.datetime) -> None:
    """Ask for a prompt look (a callback the worker could not confirm): due now, but a live lease,
    the count of attempts and a parking stay as they are."""
    await conn.execute(
        update(withdrawals)
        .where(withdrawals.c.withdrawal_id == withdrawal_id, withdrawals.c.status == "processing")
        .values(next_attempt_at=now)
    )


async def mark_submitted(
    conn: AsyncConnection,
    withdrawal_id: str,
    now: dt.datetime,
    lease_until: dt.datetime,
    sender_batch_id: str,
) -> None:
    """About to be sent to the processor in `sender_batch_id`: from now on its outcome is looked up
    before any resend; this worker holds it until `lease_until`."""
    await conn.execute(
        update(withdrawals)
        .where(withdrawals.c.withdrawal_id == withdrawal_id)
        .values(
            submitted_at=func.coalesce(withdrawals.c.submitted_at, now),
            sender_batch_id=func.coalesce(withdrawals.c.sender_batch_id, sender_batch_id),
            leased_until=lease_until,
            next_attempt_at=None,
        )
    )


async def lease(
    conn: AsyncConnection, withdrawal_id: str, now: dt.datetime, until: dt.datetime
) -> bool:
    """Claim a due processing withdrawal for one follow-up until `until`: False if another worker
    (another replica) holds it, it is parked, not yet due, or no longer processing."""
    result = await conn.execute(
        update(withdrawals)
        .where(
            withdrawals.c.withdrawal_id == withdrawal_id,
            withdrawals.c.status == "processing",
            *_due(now),
        )
        .values(leased_until=until)
    )
    return result.rowcount == 1


async def unpark(conn: AsyncConnection, withdrawal_id: str) -> bool:
    """Hand a parked withdrawal that is still processing back to the worker, due now."""
    result = await conn.execute(
        update(withdrawals)
        .where(
            withdrawals.c.withdrawal_id == withdrawal_id,
            withdrawals.c.status == "processing",
            withdrawals.c.parked_at.is_not(None),
        )
        .values(parked_at=None, attempts=0, next_attempt_at=None, leased_until=None, last_error="")
    )
    return result.rowcount == 1


async def queue(
    conn: AsyncConnection, name: str, *, limit: int, after: tuple[dt.datetime, str] | None
) -> list[WithdrawalRecord]:
    """An admin queue, oldest first: "in_review", "processing" (not parked; both by request time,
    ix_withdrawals_status_created) or "parked" (by parking time, ix_withdrawals_parked)."""
    order = withdrawals.c.parked_at if name == "parked" else withdrawals.c.created_at
    query = select(withdrawals).order_by(order, withdrawals.c.withdrawal_id).limit(limit)
    if name == "in_review":
        query = query.where(withdrawals.c.status == "in_review")
    elif name == "processing":
        query = query.where(withdrawals.c.status == "processing", withdrawals.c.parked_at.is_(None))
    else:
        query = query.where(withdrawals.c.parked_at.is_not(None))
    if after is not None:
        at, withdrawal_id = after
        query = query.where(
            (order > at) | ((order == at) & (withdrawals.c.withdrawal_id > withdrawal_id))
        )
    return [_withdrawal(row) for row in (await conn.execute(query)).all()]


async def submitted_since(conn: AsyncConnection, since: dt.datetime) -> list[WithdrawalRecord]:
    """Withdrawals sent to the processor since `since` (reconciliation)."""
    query = select(withdrawals).where(withdrawals.c.submitted_at >= since)
    return [_withdrawal(row) for row in (await conn.execute(query)).all()]


async def withdrawals_in_batch(
    conn: AsyncConnection, sender_batch_id: str
) -> list[WithdrawalRecord]:
    """The withdrawals first sent in `sender_batch_id`, i.e. that batch's items, in withdrawal-id
    order (ix_withdrawals_sender_batch)."""
    query = (
        select(withdrawals)
        .where(withdrawals.c.sender_batch_id == sender_batch_id)
        .order_by(withdrawals.c.withdrawal_id)
    )
    return [_withdrawal(row) for row in (await conn.execute(query)).all()]


async def batch_mate_leased(
    conn: AsyncConnection, withdrawal: WithdrawalRecord, now: dt.datetime
) -> str | None:
    """A withdrawal of `withdrawal`'s batch, other than it, that a worker holds now (its follow-up
    may be sending the batch again): its id, None if there is none."""
    if withdrawal.sender_batch_id is None:
        return None
    found = await conn.scalar(
        select(withdrawals.c.withdrawal_id)
        .where(
            withdrawals.c.sender_batch_id == withdrawal.sender_batch_id,
            withdrawals.c.withdrawal_id != withdrawal.withdrawal_id,
            withdrawals.c.status == "processing",
            withdrawals.c.leased_until > now,
        )
        .limit(1)
    )
    return None if found is None else str(found)


async def send_alone(conn: AsyncConnection, withdrawal_id: str, sender_batch_id: str) -> None:
    """From now on `withdrawal_id` is sent (and sent again) in a batch of its own."""
    await conn.execute(
        update(withdrawals)
        .where(withdrawals.c.withdrawal_id == withdrawal_id, withdrawals.c.status == "processing")
        .values(sender_batch_id=sender_batch_id)
    )


async def withdrawals_by_id(
    conn: AsyncConnection, withdrawal_ids: Sequence[str]
) -> dict[str, WithdrawalRecord]:
    rows = await conn.execute(
        select(withdrawals).where(withdrawals.c.withdrawal_id.in_(withdrawal_ids))
    )
    return {row.withdrawal_id: _withdrawal(row) for row in rows}


@dataclass(frozen=True)
class WithdrawalEvent:
    status: str
    """The status it moved to (a status change), or the one it was in (a parking, a retry)."""
    actor: str
    reason: str
    at: dt.datetime
    kind: str = "status_changed"
    """One of EVENT_KINDS."""


async def add_event(
    conn: AsyncConnection,
    withdrawal_id: str,
    status: str,
    actor: str,
    reason: str,
    now: dt.datetime,
    *,
    kind: str = "status_changed",
) -> None:
    """Append an event to the withdrawal's history (its seq follows the last one): by default a
    move to `status`; a parking or a retry (`kind`, one of EVENT_KINDS) names the status it was
    in."""
    assert kind in EVENT_KINDS, kind
    seq = await conn.scalar(
        select(func.coalesce(func.max(withdrawal_events.c.seq), 0)).where(
            withdrawal_events.c.withdrawal_id == withdrawal_id
        )
    )
    await conn.execute(
        withdrawal_events.insert().values(
            withdrawal_id=withdrawal_id,
            seq=int(seq or 0) + 1,
            status=status,
            actor=actor[:64],
            reason=reason[:500],  # what CancelWithdrawal accepts (a processor's error: cut)
            created_at=now,
            kind=kind,
        )
    )


async def events_of(
    conn: AsyncConnection, withdrawal_ids: Sequence[str]
) -> dict[str, list[WithdrawalEvent]]:
    """The histories of these withdrawals, each oldest first."""
    rows = await conn.execute(
        select(withdrawal_events)
        .where(withdrawal_events.c.withdrawal_id.in_(withdrawal_ids))
        .order_by(withdrawal_events.c.withdrawal_id, withdrawal_events.c.seq)
    )
    found: dict[str, list[WithdrawalEvent]] = {}
    for row in rows:
        found.setdefault(row.withdrawal_id, []).append(
            WithdrawalEvent(row.status, row.actor, row.reason, utc(row.created_at), row.kind)
        )
    return found


async def move_withdrawal(
    conn: AsyncConnection,
    withdrawal_id: str,
    *,
    from_status: str | Sequence[str],
    to_status: str,
    now: dt.datetime,
    failure_reason: str = "",
    processor_reference: str | None = None,
    parked_only: bool = False,
) -> bool:
    """A conditional status change: False if the withdrawal was no longer in (one of)
    `from_status` (or, `parked_only`, no longer parked)."""
    values: dict[str, object] = {"status": to_status, "updated_at": now}
    if to_status in ENDINGS:
        # Nothing left for the worker: no lease, no schedule, off the parked queue, and no failed
        # attempts in a row (an ending is the processor's answer, or an admin's decision).
        values.update(
            parked_at=None, leased_until=None, next_attempt_at=None, attempts=0, last_error=""
        )
    if failure_reason:
        values["failure_reason"] = failure_reason
    if processor_reference is not None:
        values["processor_reference"] = processor_reference
    result = await conn.execute(
        update(withdrawals)
        .where(
            withdrawals.c.withdrawal_id == withdrawal_id,
            withdrawals.c.status.in_(
                [from_status] if isinstance(from_status, str) else from_status
            ),
            *((withdrawals.c.parked_at.is_not(None),) if parked_only else ()),
        )
        .values(**values)
    )
    return result.rowcount == 1
