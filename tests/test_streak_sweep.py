"""One streak sweep ends hundreds of streaks in a few statements: each still gets its feed event, numbered
in its LIVE's feed after what was there, in streak id order; a LIVE that has ended gets none."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from runtime.db import Database
from services.gifting import storage
from services.gifting.lives import Lives
from tests.helpers import migrated

PAUSE = dt.timedelta(seconds=5)
NOW = dt.datetime(2026, 12, 5, 12, tzinfo=dt.UTC)


def live(i: int, *, last_seq: int, ended: bool = False) -> storage.LiveRecord:
    return storage.LiveRecord(
        live_id=f"live-{i}",
        creator_id=f"creator-{i}",
        title=f"LIVE {i}",
        gifts_enabled=True,
        started_at=NOW - dt.timedelta(hours=1),
        ended_at=NOW - dt.timedelta(minutes=1) if ended else None,
        last_seq=last_seq,
        coins_received=0,
        gifts_sent=0,
    )


async def test_one_sweep_numbers_every_ended_streak_in_its_live_feed(database: Database) -> None:
    db = await migrated(database, "gifting")
    on_air = {"live-1": 7, "live-2": 0, "live-3": 41}  # feed numbers used so far
    async with db.transaction() as conn:
        for i, (_, seq) in enumerate(on_air.items(), start=1):
            assert await storage.insert_live(conn, live(i, last_seq=seq))
        assert await storage.insert_live(conn, live(4, last_seq=3, ended=True))
    paused = NOW - 2 * PAUSE
    async with db.driver.transaction() as tx:
        for i in (3, 1, 4, 2):  # written out of order on purpose
            for viewer in ("c", "a", "b"):
                await storage.extend_streak(
                    tx,
                    live_id=f"live-{i}",
                    sender_id=f"viewer-{viewer}",
                    gift_id="rose",
                    count=i,
                    now=paused,
                    cutoff=paused - PAUSE,
                    new_streak_id=f"s{i}-{viewer}",
                )
    async with db.driver.transaction() as tx:
        fed = await Lives(PAUSE).end_due_streaks(tx, NOW, limit=500)
    assert fed == set(on_air)

    events, lives, streaks = storage.live_events, storage.lives, storage.streaks
    async with db.read() as conn:
        rows = (
            await conn.execute(
                sa.select(
                    events.c.live_id,
                    events.c.seq,
                    events.c.kind,
                    events.c.streak_id,
                    events.c.sender_id,
                    events.c.count,
                ).order_by(events.c.live_id, events.c.seq)
            )
        ).all()
        last_seqs = dict(
            (await conn.execute(sa.select(lives.c.live_id, lives.c.last_seq))).tuples().all()
        )
        still_open = (
            await conn.execute(sa.select(sa.func.count()).where(streaks.c.ended_at.is_(None)))
        ).scalar_one()
    expected = [
        (f"live-{i}", seq + n, "streak_ended", f"s{i}-{viewer}", f"viewer-{viewer}", i)
        for i, seq in ((1, 7), (2, 0), (3, 41))
        for n, viewer in enumerate("abc", start=1)
    ]
    assert [tuple(r) for r in rows] == expected
    assert last_seqs == {"live-1": 10, "live-2": 3, "live-3": 44, "live-4": 3}
    assert still_open == 0  # the ended LIVE's streaks end too, without an event
