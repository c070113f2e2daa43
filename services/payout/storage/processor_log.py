"""What the payment processor told us: its callbacks (kept once each) and reconciliation runs."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from services.payout.storage.tables import processor_events, reconciliation_runs


async def processor_event_item(conn: AsyncConnection, event_id: str) -> str | None:
    """The item a processor callback kept before was about; None if it was not kept."""
    found = await conn.scalar(
        select(processor_events.c.item_reference).where(processor_events.c.event_id == event_id)
    )
    return None if found is None else str(found)


async def forget_processor_events(conn: AsyncConnection, before: dt.datetime, limit: int) -> int:
    """Forget up to `limit` processor callbacks received before `before`, oldest first (migration
    0022's index); returns how many."""
    oldest = (
        select(processor_events.c.event_id)
        .where(processor_events.c.received_at < before)
        .order_by(processor_events.c.received_at)
        .limit(limit)
    )
    result = await conn.execute(
        processor_events.delete().where(processor_events.c.event_id.in_(oldest.scalar_subquery()))
    )
    return int(result.rowcount)


async def record_processor_event(
    conn: AsyncConnection, event_id: str, item_reference: str, event_type: str, now: dt.datetime
) -> bool:
    """Keep a processor callback by its id; False if it was kept before (a concurrent copy that
    inserted first waits for it: ON CONFLICT DO NOTHING)."""
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(
        processor_events
    )
    result = await conn.execute(
        insert.values(
            event_id=event_id, item_reference=item_reference, event_type=event_type, received_at=now
        ).on_conflict_do_nothing(index_elements=["event_id"])
    )
    return result.rowcount == 1


async def save_reconciliation(
    conn: AsyncConnection,
    run_id: str,
    started_at: dt.datetime,
    finished_at: dt.datetime,
    checked: int,
    report: str,
) -> None:
    await conn.execute(
        reconciliation_runs.insert().values(
            run_id=run_id,
            started_at=started_at,
            finished_at=finished_at,
            checked=checked,
            report=report,
        )
    )


async def latest_reconciliation(conn: AsyncConnection) -> Row[Any] | None:
    return (
        await conn.execute(
            select(reconciliation_runs).order_by(reconciliation_runs.c.started_at.desc()).limit(1)
        )
    ).first()
