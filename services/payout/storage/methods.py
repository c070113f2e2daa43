"""Creators' payout methods and verification (identity, tax form, time zone)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.clock import utc
from runtime.db import lock_name, upsert
from services.payout.storage.tables import (
    ON_ITS_WAY,
    creator_verifications,
    payout_methods,
    withdrawals,
)


@dataclass(frozen=True)
class PayoutMethodRecord:
    method_id: str
    creator_id: str
    kind: str
    destination_token: str
    display: str
    is_default: bool
    created_at: dt.datetime
    removed_at: dt.datetime | None = None


def _method(row: object) -> PayoutMethodRecord:
    data = row._asdict()  # type: ignore[attr-defined]
    data["created_at"] = utc(data["created_at"])
    if data["removed_at"] is not None:
        data["removed_at"] = utc(data["removed_at"])
    return PayoutMethodRecord(**data)


Lock = Literal["share", "update"] | None
"""A row lock taken with a read, held until the transaction ends (PostgreSQL; SQLite serializes
writes already): "share" for a withdrawal paying through a method (several may at once), "update"
for removing it (waits for them, and they for it)."""


async def payout_methods_of(
    conn: AsyncConnection, creator_id: str, *, lock: Lock = None
) -> list[PayoutMethodRecord]:
    """A creator's payout methods in use (not removed), oldest first."""
    query = (
        select(payout_methods)
        .where(payout_methods.c.creator_id == creator_id, payout_methods.c.removed_at.is_(None))
        .order_by(payout_methods.c.created_at, payout_methods.c.method_id)
    )
    if lock is not None:
        query = query.with_for_update(read=lock == "share")
    return [_method(row) for row in await conn.execute(query)]


async def lock_creator_methods(conn: AsyncConnection, creator_id: str) -> None:
    """Serialize changes to one creator's payout methods until the transaction ends (a creator may
    have no row to lock yet)."""
    await lock_name(conn, f"payout-methods:{creator_id}")


async def insert_payout_method(conn: AsyncConnection, method: PayoutMethodRecord) -> None:
    await conn.execute(payout_methods.insert().values(**method.__dict__))


async def set_default_method(conn: AsyncConnection, creator_id: str, method_id: str) -> None:
    """Make one method the creator's default, and none of the others."""
    await conn.execute(
        update(payout_methods)
        .where(payout_methods.c.creator_id == creator_id, payout_methods.c.removed_at.is_(None))
        .values(is_default=payout_methods.c.method_id == method_id)
    )


async def remove_method(conn: AsyncConnection, method_id: str, now: dt.datetime) -> None:
    await conn.execute(
        update(payout_methods)
        .where(payout_methods.c.method_id == method_id)
        .values(removed_at=now, is_default=False)
    )


async def open_withdrawals_on(conn: AsyncConnection, method_id: str) -> int:
    """Withdrawals on their way out through this method."""
    found = await conn.scalar(
        select(func.count())
        .select_from(withdrawals)
        .where(
            withdrawals.c.method_id == method_id,
            withdrawals.c.status.in_(ON_ITS_WAY),
        )
    )
    return int(found or 0)


async def verification_of(
    conn: AsyncConnection, creator_id: str, *, lock: Lock = None
) -> tuple[str, str]:
    """(status, reason) of a creator's verification; ("unverified", "") without a record."""
    query = select(creator_verifications.c.status, creator_verifications.c.reason).where(
        creator_verifications.c.creator_id == creator_id
    )
    if lock is not None:
        query = query.with_for_update(read=lock == "share")
    row = (await conn.execute(query)).first()
    return ("unverified", "") if row is None else (str(row[0]), str(row[1]))


async def set_verification(
    conn: AsyncConnection,
    creator_id: str,
    status: str,
    reason: str,
    now: dt.datetime,
    time_zone: str = "",
) -> None:
    """Set a creator's KYC status (and time zone, unless empty: then the one set before stays)."""
    values: dict[str, object] = {
        "creator_id": creator_id,
        "status": status,
        "reason": reason,
        "updated_at": now,
    }
    if time_zone:
        values["time_zone"] = time_zone
    await upsert(conn, creator_verifications, values, ["creator_id"])


async def time_zone_of(conn: AsyncConnection, creator_id: str) -> str:
    """The IANA time zone of a creator's calendar day ("UTC" unless verification set one)."""
    found = await conn.scalar(
        select(creator_verifications.c.time_zone).where(
            creator_verifications.c.creator_id == creator_id
        )
    )
    return str(found) if found else "UTC"
