"""Payout tables and their SQL."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import BigInteger, Column, DateTime, MetaData, String, Table, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.clock import utc

metadata = MetaData()

creators = Table(
    "creators",
    metadata,
    Column("creator_id", String(64), primary_key=True),
    Column("coins_received", BigInteger, nullable=False),
    Column("diamonds_credited", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

withdrawals = Table(
    "withdrawals",
    metadata,
    Column("withdrawal_id", String(40), primary_key=True),
    Column("creator_id", String(64), nullable=False),
    Column("diamonds", BigInteger, nullable=False),
    Column("gross_minor", BigInteger, nullable=False),
    Column("fee_minor", BigInteger, nullable=False),
    Column("currency_code", String(3), nullable=False),
    Column("method", String(16), nullable=False),
    Column("destination_token", String(256), nullable=False),
    Column("status", String(16), nullable=False),
    Column("failure_reason", String(128), nullable=False),
    Column("processor_reference", String(128)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
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


def _withdrawal(row: object) -> WithdrawalRecord:
    data = row._asdict()  # type: ignore[attr-defined]
    data["created_at"] = utc(data["created_at"])
    data["updated_at"] = utc(data["updated_at"])
    return WithdrawalRecord(**data)


async def accrue_coins(
    conn: AsyncConnection, creator_id: str, coins: int, now: dt.datetime
) -> tuple[int, int]:
    """Add gift coins to a creator's running total (creating the creator); returns (coins, credited).

    One upsert: it also locks the creator's row until the transaction ends, so concurrent credits to one
    creator are applied one after another and the diamonds owed are computed from a settled total.
    """
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(creators).values(
        creator_id=creator_id, coins_received=coins, diamonds_credited=0, created_at=now
    )
    statement = statement.on_conflict_do_update(
        index_elements=[creators.c.creator_id],
        set_={"coins_received": creators.c.coins_received + statement.excluded.coins_received},
    ).returning(creators.c.coins_received, creators.c.diamonds_credited)
    row = (await conn.execute(statement)).one()
    return int(row.coins_received), int(row.diamonds_credited)


async def set_diamonds_credited(conn: AsyncConnection, creator_id: str, diamonds: int) -> None:
    await conn.execute(
        update(creators)
        .where(creators.c.creator_id == creator_id)
        .values(diamonds_credited=diamonds)
    )


async def creator_exists(conn: AsyncConnection, creator_id: str) -> bool:
    found = await conn.scalar(
        select(creators.c.creator_id).where(creators.c.creator_id == creator_id)
    )
    return found is not None


async def insert_withdrawal(conn: AsyncConnection, withdrawal: WithdrawalRecord) -> None:
    await conn.execute(withdrawals.insert().values(**withdrawal.__dict__))


async def get_withdrawal(conn: AsyncConnection, withdrawal_id: str) -> WithdrawalRecord | None:
    row = (
        await conn.execute(select(withdrawals).where(withdrawals.c.withdrawal_id == withdrawal_id))
    ).first()
    return None if row is None else _withdrawal(row)


async def withdrawn_since(conn: AsyncConnection, creator_id: str, since: dt.datetime) -> int:
    """Gross cash of a creator's withdrawals since `since` that did not fail (for the daily cap)."""
    total = await conn.scalar(
        select(func.coalesce(func.sum(withdrawals.c.gross_minor), 0)).where(
            withdrawals.c.creator_id == creator_id,
            withdrawals.c.created_at >= since,
            withdrawals.c.status != "failed",
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


async def due_withdrawals(conn: AsyncConnection, limit: int) -> list[WithdrawalRecord]:
    """Withdrawals the processor worker still has to pay or finish, oldest first."""
    query = (
        select(withdrawals)
        .where(withdrawals.c.status.in_(("pending", "processing")))
        .order_by(withdrawals.c.created_at)
        .limit(limit)
    )
    return [_withdrawal(row) for row in (await conn.execute(query)).all()]


async def move_withdrawal(
    conn: AsyncConnection,
    withdrawal_id: str,
    *,
    from_status: str,
    to_status: str,
    now: dt.datetime,
    failure_reason: str = "",
    processor_reference: str | None = None,
) -> bool:
    """A conditional status change: False if the withdrawal was no longer in `from_status`."""
    values: dict[str, object] = {"status": to_status, "updated_at": now}
    if failure_reason:
        values["failure_reason"] = failure_reason
    if processor_reference is not None:
        values["processor_reference"] = processor_reference
    result = await conn.execute(
        update(withdrawals)
        .where(withdrawals.c.withdrawal_id == withdrawal_id, withdrawals.c.status == from_status)
        .values(**values)
    )
    return result.rowcount == 1
