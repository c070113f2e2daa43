"""The gift catalog: gifts, their versions, prices and regions."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.clock import utc
from runtime.db import insert_new
from runtime.sql import Statement, Tx
from services.gifting.storage.tables import gift_versions, gifts


@dataclass(frozen=True)
class GiftRecord:
    gift_id: str
    name: str
    coins: int
    streakable: bool
    active: bool
    version: int = 0
    """0 until saved (`save_gift` numbers it)."""
    regions: tuple[str, ...] = ()
    """Where it is offered; empty: everywhere."""
    animation_ms: int = 1000

    def same_as(self, other: GiftRecord) -> bool:
        """The same catalog entry, whatever the version numbers."""
        return replace(self, version=0) == replace(other, version=0)


@dataclass(frozen=True)
class GiftVersionRecord:
    gift: GiftRecord
    created_at: dt.datetime
    changed_by: str
    reason: str


def _regions_text(regions: Sequence[str]) -> str:
    return f",{','.join(sorted(regions))}," if regions else ""


def _gift(row: Any) -> GiftRecord:
    return GiftRecord(
        gift_id=row.gift_id,
        name=row.name,
        coins=int(row.coins),
        streakable=bool(row.streakable),
        active=bool(row.active),
        version=int(row.version),
        regions=tuple(r for r in str(row.regions).split(",") if r),
        animation_ms=int(row.animation_ms),
    )


async def list_gifts(
    conn: AsyncConnection, *, limit: int, after: tuple[int, str] | None, region: str = ""
) -> list[GiftRecord]:
    """Active gifts, cheapest first; with `region`, only those offered there."""
    query = (
        select(gifts).where(gifts.c.active).order_by(gifts.c.coins, gifts.c.gift_id).limit(limit)
    )
    if region:
        query = query.where((gifts.c.regions == "") | gifts.c.regions.contains(f",{region},"))
    if after is not None:
        query = query.where(tuple_(gifts.c.coins, gifts.c.gift_id) > after)
    return [_gift(row) for row in (await conn.execute(query)).all()]


async def get_gift(conn: AsyncConnection, gift_id: str, *, lock: bool = False) -> GiftRecord | None:
    """A catalog gift as it is now (`lock`: held until the transaction ends, for a change)."""
    query = select(gifts).where(gifts.c.gift_id == gift_id)
    if lock:
        query = query.with_for_update()
    row = (await conn.execute(query)).first()
    return None if row is None else _gift(row)


async def save_gift(
    conn: AsyncConnection, gift: GiftRecord, *, now: dt.datetime, changed_by: str, reason: str
) -> GiftRecord:
    """Add a gift (version 1) or change it (its next version); every version is kept. The same
    values again change nothing. Concurrent changes of one gift are serialised by its row lock."""
    values = {
        "name": gift.name,
        "coins": gift.coins,
        "streakable": gift.streakable,
        "active": gift.active,
        "regions": _regions_text(gift.regions),
        "animation_ms": gift.animation_ms,
    }
    current = await get_gift(conn, gift.gift_id, lock=True)
    if current is None and await insert_new(
        conn, gifts, {"gift_id": gift.gift_id, "version": 1, **values}
    ):
        saved = replace(gift, version=1)
    else:
        current = current or await get_gift(conn, gift.gift_id, lock=True)
        assert current is not None
        if current.same_as(gift):
            return current
        saved = replace(gift, version=current.version + 1)
        await conn.execute(
            update(gifts)
            .where(gifts.c.gift_id == gift.gift_id)
            .values(version=saved.version, **values)
        )
    await conn.execute(
        gift_versions.insert().values(
            gift_id=saved.gift_id,
            version=saved.version,
            created_at=now,
            changed_by=changed_by[:64],
            reason=reason[:500],
            **values,
        )
    )
    return saved


async def gift_versions_of(
    conn: AsyncConnection, gift_id: str, *, limit: int, before: int | None = None
) -> list[GiftVersionRecord]:
    """At most `limit` versions of a gift, newest first, older than version `before` if given."""
    query = (
        select(gift_versions)
        .where(gift_versions.c.gift_id == gift_id)
        .order_by(gift_versions.c.version.desc())
        .limit(limit)
    )
    if before is not None:
        query = query.where(gift_versions.c.version < before)
    rows = await conn.execute(query)
    return [
        GiftVersionRecord(_gift(row), utc(row.created_at), row.changed_by, row.reason)
        for row in rows.all()
    ]


_GIFT_PRICE = Statement(
    "gifting.gift_price", "SELECT coins, active FROM gifts WHERE gift_id = :gift_id"
)


def regions_of(text: str) -> tuple[str, ...]:
    return tuple(r for r in str(text).split(",") if r)


_VERSION_REGIONS = Statement(
    "gifting.version_regions",
    "SELECT regions FROM gift_versions WHERE gift_id = :gift_id AND version = :version",
)


async def version_regions(tx: Tx, gift_id: str, version: int) -> tuple[str, ...]:
    row = await tx.one(_VERSION_REGIONS, gift_id=gift_id, version=version)
    return () if row is None else regions_of(row[0])


async def gift_price(tx: Tx, gift_id: str) -> tuple[int, bool] | None:
    """(coins, active) of a catalog gift, None if there is no such gift."""
    row = await tx.one(_GIFT_PRICE, gift_id=gift_id)
    return None if row is None else (int(row[0]), bool(row[1]))
