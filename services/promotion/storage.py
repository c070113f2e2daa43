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
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

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
    Column("wallet_transaction_id", String(40)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
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


def _record(row: object) -> PromotionRecord:
    data = row._asdict()  # type: ignore[attr-defined]
    for key in ("created_at", "updated_at"):
        if data[key].tzinfo is None:
            data[key] = data[key].replace(tzinfo=dt.UTC)
    return PromotionRecord(**data)


async def insert_promotion(conn: AsyncConnection, promotion: PromotionRecord) -> None:
    await conn.execute(promotions.insert().values(**promotion.__dict__))


async def get_promotion(conn: AsyncConnection, promotion_id: str) -> PromotionRecord | None:
    row = (
        await conn.execute(select(promotions).where(promotions.c.promotion_id == promotion_id))
    ).first()
    return None if row is None else _record(row)


async def list_promotions(
    conn: AsyncConnection, user_id: str, *, limit: int, before: tuple[dt.datetime, str] | None
) -> list[PromotionRecord]:
    query = (
        select(promotions)
        .where(promotions.c.user_id == user_id)
        .order_by(promotions.c.created_at.desc(), promotions.c.promotion_id.desc())
        .limit(limit)
    )
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
) -> bool:
    values: dict[str, object] = {"status": to_status, "updated_at": now}
    if wallet_transaction_id is not None:
        values["wallet_transaction_id"] = wallet_transaction_id
    result = await conn.execute(
        update(promotions)
        .where(promotions.c.promotion_id == promotion_id, promotions.c.status == from_status)
        .values(**values)
    )
    return result.rowcount == 1
