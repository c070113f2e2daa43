"""Gifting tables and their SQL."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.clock import utc
from runtime.db import upsert

metadata = MetaData()

gifts = Table(
    "gifts",
    metadata,
    Column("gift_id", String(64), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("coins", BigInteger, nullable=False),
    Column("streakable", Boolean, nullable=False),
    Column("active", Boolean, nullable=False),
)

sent_gifts = Table(
    "sent_gifts",
    metadata,
    Column("sent_gift_id", String(40), primary_key=True),
    Column("sender_id", String(64), nullable=False),
    Column("creator_id", String(64), nullable=False),
    Column("gift_id", String(64), nullable=False),
    Column("count", Integer, nullable=False),
    Column("coins", BigInteger, nullable=False),
    Column("live_id", String(64)),
    Column("video_id", String(64)),
    Column("status", String(16), nullable=False),
    Column("wallet_transaction_id", String(40)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

live_gifters = Table(
    "live_gifters",
    metadata,
    Column("live_id", String(64), primary_key=True),
    Column("sender_id", String(64), primary_key=True),
    Column("coins", BigInteger, nullable=False),
)

credit_outbox = Table(
    "credit_outbox",
    metadata,
    Column("outbox_id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    Column("sent_gift_id", String(40), nullable=False, unique=True),
    Column("creator_id", String(64), nullable=False),
    Column("coins", BigInteger, nullable=False),
    Column("traceparent", String(128), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("delivered_at", DateTime(timezone=True)),
    Column("dead", Boolean, nullable=False),
    Column("last_error", String(256), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class GiftRecord:
    gift_id: str
    name: str
    coins: int
    streakable: bool
    active: bool


@dataclass(frozen=True)
class SentGiftRecord:
    sent_gift_id: str
    sender_id: str
    creator_id: str
    gift_id: str
    count: int
    coins: int
    live_id: str | None
    video_id: str | None
    status: str
    wallet_transaction_id: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True)
class OutboxRecord:
    outbox_id: int
    sent_gift_id: str
    creator_id: str
    coins: int
    traceparent: str
    attempts: int


async def list_gifts(
    conn: AsyncConnection, *, limit: int, after: tuple[int, str] | None
) -> list[GiftRecord]:
    query = (
        select(gifts).where(gifts.c.active).order_by(gifts.c.coins, gifts.c.gift_id).limit(limit)
    )
    if after is not None:
        query = query.where(tuple_(gifts.c.coins, gifts.c.gift_id) > after)
    return [GiftRecord(**row._asdict()) for row in (await conn.execute(query)).all()]


async def put_gift(conn: AsyncConnection, gift: GiftRecord) -> None:
    await upsert(conn, gifts, gift.__dict__, ["gift_id"])


async def get_gift(conn: AsyncConnection, gift_id: str) -> GiftRecord | None:
    row = (await conn.execute(select(gifts).where(gifts.c.gift_id == gift_id))).first()
    return None if row is None else GiftRecord(**row._asdict())


async def insert_sent_gift(conn: AsyncConnection, sent: SentGiftRecord) -> None:
    await conn.execute(sent_gifts.insert().values(**sent.__dict__))


def _sent_gift(row: Any) -> SentGiftRecord:
    data = row._asdict()
    data["created_at"] = utc(data["created_at"])
    data["updated_at"] = utc(data["updated_at"])
    return SentGiftRecord(**data)


async def get_sent_gift(conn: AsyncConnection, sent_gift_id: str) -> SentGiftRecord | None:
    row = (
        await conn.execute(select(sent_gifts).where(sent_gifts.c.sent_gift_id == sent_gift_id))
    ).first()
    return None if row is None else _sent_gift(row)


async def pending_sent_gifts(
    conn: AsyncConnection, created_before: dt.datetime, *, limit: int
) -> list[SentGiftRecord]:
    rows = await conn.execute(
        select(sent_gifts)
        .where(sent_gifts.c.status == "pending", sent_gifts.c.created_at < created_before)
        .order_by(sent_gifts.c.created_at)
        .limit(limit)
    )
    return [_sent_gift(row) for row in rows]


async def move_sent_gift(
    conn: AsyncConnection,
    sent_gift_id: str,
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
        update(sent_gifts)
        .where(sent_gifts.c.sent_gift_id == sent_gift_id, sent_gifts.c.status == from_status)
        .values(**values)
    )
    return result.rowcount == 1


async def add_to_leaderboard(
    conn: AsyncConnection, live_id: str, sender_id: str, coins: int
) -> None:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(live_gifters).values(
        live_id=live_id, sender_id=sender_id, coins=coins
    )
    await conn.execute(
        statement.on_conflict_do_update(
            index_elements=[live_gifters.c.live_id, live_gifters.c.sender_id],
            set_={"coins": live_gifters.c.coins + statement.excluded.coins},
        )
    )


async def top_gifters(
    conn: AsyncConnection, live_id: str, *, limit: int, after: tuple[int, str] | None
) -> list[tuple[str, int]]:
    """(sender, coins), most coins first, ties by sender id; `after` is the last row of the previous page."""
    query = (
        select(live_gifters.c.sender_id, live_gifters.c.coins)
        .where(live_gifters.c.live_id == live_id)
        .order_by(live_gifters.c.coins.desc(), live_gifters.c.sender_id)
        .limit(limit)
    )
    if after is not None:
        coins, sender = after
        query = query.where(
            (live_gifters.c.coins < coins)
            | ((live_gifters.c.coins == coins) & (live_gifters.c.sender_id > sender))
        )
    return [(row.sender_id, int(row.coins)) for row in (await conn.execute(query)).all()]


async def enqueue_credit(
    conn: AsyncConnection,
    *,
    sent_gift_id: str,
    creator_id: str,
    coins: int,
    traceparent: str,
    now: dt.datetime,
) -> None:
    await conn.execute(
        credit_outbox.insert().values(
            sent_gift_id=sent_gift_id,
            creator_id=creator_id,
            coins=coins,
            traceparent=traceparent,
            attempts=0,
            next_attempt_at=now,
            delivered_at=None,
            dead=False,
            last_error="",
            created_at=now,
        )
    )


async def due_credits(conn: AsyncConnection, now: dt.datetime, limit: int) -> list[OutboxRecord]:
    query = (
        select(
            credit_outbox.c.outbox_id,
            credit_outbox.c.sent_gift_id,
            credit_outbox.c.creator_id,
            credit_outbox.c.coins,
            credit_outbox.c.traceparent,
            credit_outbox.c.attempts,
        )
        .where(
            credit_outbox.c.delivered_at.is_(None),
            credit_outbox.c.dead.is_(False),
            credit_outbox.c.next_attempt_at <= now,
        )
        .order_by(credit_outbox.c.outbox_id)
        .limit(limit)
    )
    return [OutboxRecord(**row._asdict()) for row in (await conn.execute(query)).all()]


async def mark_delivered(conn: AsyncConnection, outbox_id: int, now: dt.datetime) -> None:
    await conn.execute(
        update(credit_outbox)
        .where(credit_outbox.c.outbox_id == outbox_id)
        .values(delivered_at=now, attempts=credit_outbox.c.attempts + 1)
    )


async def mark_failed_attempt(
    conn: AsyncConnection, outbox_id: int, *, retry_at: dt.datetime, error: str, dead: bool
) -> None:
    await conn.execute(
        update(credit_outbox)
        .where(credit_outbox.c.outbox_id == outbox_id)
        .values(
            attempts=credit_outbox.c.attempts + 1,
            next_attempt_at=retry_at,
            last_error=error[:256],
            dead=dead,
        )
    )
