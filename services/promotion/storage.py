"""Promotion tables and their SQL."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    case,
    delete,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.clock import utc
from runtime.idempotency import idempotency_keys
from runtime.sql import Statement, Tx

metadata = MetaData()

promotions = Table(
    "promotions",
    metadata,
    Column("promotion_id", String(40), primary_key=True),
    Column("user_id", String(64), nullable=False),
    Column("video_id", String(64), nullable=False),
    Column("goal", String(32), nullable=False),
    Column("budget_coins", BigInteger, nullable=False),
    Column("spent_coins", BigInteger, nullable=False),
    Column("duration_days", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    # funding "debit" (promotions created before budgets were held): the debit that paid it all.
    Column("wallet_transaction_id", String(40)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # funding "hold": the wallet hold of the budget, captured as delivered, released at the end.
    Column("hold_id", String(64)),
    # When delivery stops: created_at + duration_days, or earlier if ended or spent before.
    Column("ends_at", DateTime(timezone=True)),
    Column("funding", String(8), nullable=False),
)

promotion_deliveries = Table(
    "promotion_deliveries",
    metadata,
    Column("promotion_id", String(40), primary_key=True),
    # The ReportDelivery request id: a delivery is counted once, whatever the retries.
    Column("request_id", String(128), primary_key=True),
    Column("coins", BigInteger, nullable=False),
    # The wallet's capture (none for a promotion paid up front).
    Column("wallet_transaction_id", String(40)),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class PromotionRecord:
    promotion_id: str
    user_id: str
    video_id: str
    goal: str
    budget_coins: int
    spent_coins: int
    duration_days: int
    status: str
    wallet_transaction_id: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    hold_id: str | None
    ends_at: dt.datetime
    funding: str


def _record(row: object) -> PromotionRecord:
    data = row._asdict()  # type: ignore[attr-defined]
    if data["ends_at"] is None:  # not backfilled: the end it was created with
        data["ends_at"] = data["created_at"] + dt.timedelta(days=data["duration_days"])
    for key in ("created_at", "updated_at", "ends_at"):
        data[key] = utc(data[key])
    return PromotionRecord(**data)


async def insert_promotion(conn: AsyncConnection, promotion: PromotionRecord) -> None:
    await conn.execute(promotions.insert().values(**promotion.__dict__))


async def get_promotion(conn: AsyncConnection, promotion_id: str) -> PromotionRecord | None:
    row = (
        await conn.execute(select(promotions).where(promotions.c.promotion_id == promotion_id))
    ).first()
    return None if row is None else _record(row)


async def lock_promotion(conn: AsyncConnection, promotion_id: str) -> None:
    """Hold the promotion's row until the transaction ends (PostgreSQL; SQLite's writes take turns
    already): transactions deciding about one promotion decide one after another."""
    await conn.execute(
        select(promotions.c.promotion_id)
        .where(promotions.c.promotion_id == promotion_id)
        .with_for_update()
    )


async def pending_promotions(
    conn: AsyncConnection, created_before: dt.datetime, *, limit: int
) -> list[PromotionRecord]:
    rows = await conn.execute(
        select(promotions)
        .where(
            promotions.c.status == "pending",
            promotions.c.funding == "hold",
            promotions.c.created_at < created_before,
        )
        .order_by(promotions.c.created_at)
        .limit(limit)
    )
    return [_record(row) for row in rows]


async def list_promotions(
    conn: AsyncConnection,
    user_id: str,
    *,
    limit: int,
    before: tuple[dt.datetime, str] | None,
    status: str | None = None,
    now: dt.datetime | None = None,
) -> list[PromotionRecord]:
    """A page of the user's promotions, newest first; with `status`, only those in that status as
    read at `now` (an active promotion past its end reads completed: see domain.status_at)."""
    query = (
        select(promotions)
        .where(promotions.c.user_id == user_id)
        .order_by(promotions.c.created_at.desc(), promotions.c.promotion_id.desc())
        .limit(limit)
    )
    if status is not None:
        assert now is not None, "a status filter reads statuses at a time"
        ended = (promotions.c.status == "active") & (promotions.c.ends_at <= now)
        if status == "active":
            query = query.where((promotions.c.status == "active") & (promotions.c.ends_at > now))
        elif status == "completed":
            query = query.where((promotions.c.status == "completed") | ended)
        else:
            query = query.where(promotions.c.status == status)
    if before is not None:
        at, promotion_id = before
        query = query.where(
            (promotions.c.created_at < at)
            | ((promotions.c.created_at == at) & (promotions.c.promotion_id < promotion_id))
        )
    return [_record(row) for row in (await conn.execute(query)).all()]


async def move_promotion(
    conn: AsyncConnection,
    promotion_id: str,
    *,
    from_status: str,
    to_status: str,
    now: dt.datetime,
    wallet_transaction_id: str | None = None,
    hold_id: str | None = None,
) -> bool:
    values: dict[str, object] = {"status": to_status, "updated_at": now}
    if wallet_transaction_id is not None:
        values["wallet_transaction_id"] = wallet_transaction_id
    if hold_id is not None:
        values["hold_id"] = hold_id
    result = await conn.execute(
        update(promotions)
        .where(promotions.c.promotion_id == promotion_id, promotions.c.status == from_status)
        .values(**values)
    )
    return result.rowcount == 1


async def end_promotion(conn: AsyncConnection, promotion_id: str, *, now: dt.datetime) -> bool:
    """An active promotion becomes completed, ending now (or when it was due, if that was earlier)."""
    result = await conn.execute(
        update(promotions)
        .where(promotions.c.promotion_id == promotion_id, promotions.c.status == "active")
        .values(
            status="completed",
            ends_at=case(
                (promotions.c.ends_at > now, literal(now, DateTime(timezone=True))),
                else_=promotions.c.ends_at,
            ),
            updated_at=now,
        )
    )
    return result.rowcount == 1


pending_captures = Table(
    "pending_captures",
    metadata,
    Column("promotion_id", String(40), primary_key=True),
    Column("request_id", String(128), primary_key=True),
    Column("coins", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class PendingCapture:
    promotion_id: str
    request_id: str
    coins: int


async def add_pending_capture(
    conn: AsyncConnection, promotion_id: str, request_id: str, coins: int, now: dt.datetime
) -> bool:
    """A delivery report is about to capture `coins` from the promotion's hold; False if a report
    of this id is pending already (another caller's, committed since this transaction looked)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    result = await conn.execute(
        dialect.insert(pending_captures)
        .values(promotion_id=promotion_id, request_id=request_id, coins=coins, created_at=now)
        .on_conflict_do_nothing()
    )
    return result.rowcount == 1


async def clear_pending_capture(conn: AsyncConnection, promotion_id: str, request_id: str) -> None:
    await conn.execute(
        delete(pending_captures).where(
            pending_captures.c.promotion_id == promotion_id,
            pending_captures.c.request_id == request_id,
        )
    )


async def pending_captures_of(conn: AsyncConnection, promotion_id: str) -> list[PendingCapture]:
    """A promotion's reports whose capture is not counted yet (its primary key's prefix)."""
    rows = await conn.execute(
        select(
            pending_captures.c.promotion_id, pending_captures.c.request_id, pending_captures.c.coins
        )
        .where(pending_captures.c.promotion_id == promotion_id)
        .order_by(pending_captures.c.created_at)
    )
    return [PendingCapture(r.promotion_id, r.request_id, int(r.coins)) for r in rows]


async def stale_pending_captures(
    conn: AsyncConnection, created_before: dt.datetime, *, limit: int
) -> list[PendingCapture]:
    """Reports whose capture was never counted, oldest first (ix_pending_captures_created)."""
    rows = await conn.execute(
        select(
            pending_captures.c.promotion_id, pending_captures.c.request_id, pending_captures.c.coins
        )
        .where(pending_captures.c.created_at < created_before)
        .order_by(pending_captures.c.created_at)
        .limit(limit)
    )
    return [PendingCapture(r.promotion_id, r.request_id, int(r.coins)) for r in rows]


@dataclass(frozen=True)
class AbandonedEnd:
    """An EndPromotion that claimed its request id and never answered (its process died, or it
    could not count a report after the release), on a promotion still active or ended since (a
    delivery report meeting the released hold, or another EndPromotion, recorded the end)."""

    scope: str
    request_id: str
    promotion_id: str


async def abandoned_ends(
    conn: AsyncConnection, claimed_before: dt.datetime, *, limit: int
) -> list[AbandonedEnd]:
    """Unanswered EndPromotion claims older than `claimed_before` of promotions active or ended
    (from the few unanswered claims, by ix_idempotency_keys_unanswered)."""
    rows = await conn.execute(
        select(idempotency_keys.c.scope, idempotency_keys.c.request_id, promotions.c.promotion_id)
        .join(promotions, promotions.c.promotion_id == idempotency_keys.c.resource_id)
        .where(
            idempotency_keys.c.response.is_(None),
            idempotency_keys.c.error.is_(None),
            idempotency_keys.c.created_at < claimed_before,
            idempotency_keys.c.scope.contains("EndPromotion:"),
            promotions.c.status.in_(("active", "completed")),
        )
        .order_by(idempotency_keys.c.created_at)
        .limit(limit)
    )
    return [AbandonedEnd(r.scope, r.request_id, r.promotion_id) for r in rows]


async def open_report_claims(
    conn: AsyncConnection, promotion_id: str, request_id: str
) -> list[str]:
    """The scopes of unanswered ReportDelivery claims of this report (by
    ix_idempotency_keys_unanswered; one, normally: a report is scoped by its caller)."""
    rows = await conn.execute(
        select(idempotency_keys.c.scope).where(
            idempotency_keys.c.response.is_(None),
            idempotency_keys.c.error.is_(None),
            idempotency_keys.c.request_id == request_id,
            idempotency_keys.c.resource_id == promotion_id,
            idempotency_keys.c.scope.contains("ReportDelivery:"),
        )
    )
    return [row.scope for row in rows]


async def another_end_answered(
    conn: AsyncConnection, stored_scope: str, promotion_id: str, request_id: str
) -> bool:
    """Whether another EndPromotion of the promotion (its own request id) answered success."""
    found = await conn.scalar(
        select(idempotency_keys.c.request_id)
        .where(
            idempotency_keys.c.scope == stored_scope,
            idempotency_keys.c.resource_id == promotion_id,
            idempotency_keys.c.request_id != request_id,
            idempotency_keys.c.response.is_not(None),
        )
        .limit(1)
    )
    return found is not None


async def insert_delivery(
    conn: AsyncConnection,
    *,
    promotion_id: str,
    request_id: str,
    coins: int,
    wallet_transaction_id: str | None,
    now: dt.datetime,
) -> bool:
    """Record a delivery; False if this (promotion, request id) is already recorded."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    result = await conn.execute(
        dialect.insert(promotion_deliveries)
        .values(
            promotion_id=promotion_id,
            request_id=request_id,
            coins=coins,
            wallet_transaction_id=wallet_transaction_id,
            created_at=now,
        )
        .on_conflict_do_nothing()
    )
    return result.rowcount == 1


async def reported_coins(
    conn: AsyncConnection, promotion_id: str, request_id: str
) -> tuple[int, bool] | None:
    """What a delivery report id of a promotion is on record for, whoever reported it: (coins,
    still pending), or None."""
    pending = await conn.scalar(
        select(pending_captures.c.coins).where(
            pending_captures.c.promotion_id == promotion_id,
            pending_captures.c.request_id == request_id,
        )
    )
    if pending is not None:
        return int(pending), True
    counted = await delivery_coins(conn, promotion_id, request_id)
    return None if counted is None else (counted, False)


async def delivery_coins(conn: AsyncConnection, promotion_id: str, request_id: str) -> int | None:
    """The coins a recorded delivery report counted (None: no such report)."""
    found = await conn.scalar(
        select(promotion_deliveries.c.coins).where(
            promotion_deliveries.c.promotion_id == promotion_id,
            promotion_deliveries.c.request_id == request_id,
        )
    )
    return None if found is None else int(found)


async def add_spent(
    conn: AsyncConnection, promotion_id: str, coins: int, *, now: dt.datetime
) -> bool:
    """Add delivered coins to what the promotion spent, within its budget; a promotion whose whole
    budget is spent is completed, ending now. False if that would exceed the budget."""
    spent = promotions.c.spent_coins + coins
    spent_out = spent == promotions.c.budget_coins
    result = await conn.execute(
        update(promotions)
        .where(
            promotions.c.promotion_id == promotion_id,
            promotions.c.status.in_(("active", "completed")),
            spent <= promotions.c.budget_coins,
        )
        .values(
            spent_coins=spent,
            status=case((spent_out, literal("completed")), else_=promotions.c.status),
            ends_at=case(
                (spent_out & (promotions.c.ends_at > now), literal(now, DateTime(timezone=True))),
                else_=promotions.c.ends_at,
            ),
            updated_at=now,
        )
    )
    return result.rowcount == 1


_GAUGE_PROMOTIONS = Statement(
    "promotion.gauge_promotions",
    "SELECT status, COUNT(*) FROM promotions "
    "WHERE status IN ('pending', 'active') GROUP BY status",  # ix_promotions_status_created
)
_GAUGE_PENDING_CAPTURES = Statement(
    "promotion.gauge_pending_captures",
    "SELECT COUNT(*), MIN(created_at) FROM pending_captures",  # ix_pending_captures_created
)


async def promotion_gauges(tx: Tx) -> tuple[dict[str, int], int, dt.datetime | None]:
    """Promotions waiting or running by status; delivery captures not yet confirmed by the wallet,
    and the oldest one's start."""
    rows = await tx.all(_GAUGE_PROMOTIONS)
    captures = await tx.one(_GAUGE_PENDING_CAPTURES)
    assert captures is not None
    return (
        {str(r[0]): int(r[1]) for r in rows},
        int(captures[0]),
        utc(captures[1]) if captures[1] is not None else None,
    )
