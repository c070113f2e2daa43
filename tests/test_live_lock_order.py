"""The credit relay and the streak sweep never deadlock over LIVEs (regression for 3a3cb17).

Marking a batch of credits delivered (`storage.mark_delivered`, the relay's last step) changes every
LIVE of the batch (diamonds earned) and the creators' rankings and gifters; the streak sweep
(`Lives.end_due_streaks`) changes every LIVE with a streak it ends (the feed counter, one event per
streak). Each changes several LIVEs' rows in one transaction, so each must take them in one order
(LIVE id order), or two of them deadlock, one is rolled back, and on the benchmark the relay
crash-looped with a growing backoff. These tests run them against each other on one PostgreSQL
database migrated by gifting's own Alembic history, round after round: two delivered batches over
the same LIVEs, one listing them in ascending order and one in descending order, and a sweep of
streaks due in every one of those LIVEs, oldest in the last LIVE (so a sweep that ended them in the
order it found them would go through the LIVEs from last to first). No transaction may fail with a
deadlock (SQLSTATE 40P01) or a serialization failure (40001), and every credit must be marked and
every due streak ended. A second test does the same with gifts outside any LIVE (to videos), where
only the order of the rankings upserts keeps two deliveries apart. Before 3a3cb17 each fails with a
deadlock within the first few rounds (so does each of the three changes undone alone: the sweep's
LIVE order, the relay's FOR UPDATE ORDER BY live_id, the rankings' key order).

The storage functions are driven directly (no gRPC server, no payout): the shared suite's gifting
service runs a sweep and a relay of its own, which would take the work from under the test.

On SQLite the tests are skipped: its writes are serialized (one writer at a time, under the
process's write lock), so there is no deadlock to find there.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa

from runtime.db import Database
from runtime.migrations import upgrade
from services.gifting import storage
from services.gifting.lives import Lives
from tests.suite import PG_ADMIN_URL, create_pg_database, drop_pg_database, require_postgres

MIGRATIONS = Path(__file__).resolve().parents[1] / "services" / "gifting" / "migrations"
LIVES = 6
ROUNDS = 120
PAUSE = dt.timedelta(seconds=5)
GIFT = "rose"
COINS = 10
DIAMONDS = 7
VIEWERS = ("viewer-a", "viewer-b")
TRANSIENT = {"40P01": "deadlock", "40001": "serialization failure"}

Batch = list[storage.OutboxRecord]


def live_id(i: int) -> str:
    return f"live-{i:02d}"


def creator_id(i: int) -> str:
    return f"creator-{i:02d}"


@pytest.fixture
async def gifting_db(backend: str) -> AsyncIterator[Database]:
    """A PostgreSQL database of its own, migrated to gifting's head, with the shared LIVEs (LIVE i
    is creator i's), written last first: a statement that scans the table (not the index) meets
    them in the opposite of id order, so only an explicit ORDER BY locks them in id order."""
    if backend == "sqlite":
        pytest.skip("SQLite serializes writes: two transactions cannot deadlock there")
    await require_postgres()
    name = f"coins_lock_order_{uuid.uuid4().hex[:12]}"
    url = await create_pg_database(name)
    # A deadlock is found after deadlock_timeout (1 s by default): report it sooner. Without
    # deadlocks (the fixed code) this changes nothing.
    admin = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await admin.execute(f"ALTER DATABASE \"{name}\" SET deadlock_timeout = '100ms'")
    finally:
        await admin.close()
    db = Database(url)
    try:
        await upgrade(db, MIGRATIONS)
        started = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        async with db.transaction() as conn:
            for i in range(LIVES, 0, -1):
                inserted = await storage.insert_live(
                    conn,
                    storage.LiveRecord(
                        live_id=live_id(i),
                        creator_id=creator_id(i),
                        title=f"LIVE {i}",
                        gifts_enabled=True,
                        started_at=started,
                        ended_at=None,
                        last_seq=0,
                        coins_received=0,
                        gifts_sent=0,
                    ),
                )
                assert inserted
        yield db
    finally:
        await db.close()
        await drop_pg_database(name)


async def prepare_round(
    db: Database, r: int, now: dt.datetime, *, in_lives: bool
) -> tuple[Batch, Batch, dict[str, int]]:
    """Round `r`'s work: batch A, a debited gift (from viewer A) to every creator in ascending
    order (ids and rows in that order), batch B, one (from viewer B) to every creator in descending
    order; `in_lives`: each sent in its creator's LIVE (else to a video), and a streak due to end
    in every LIVE, the last LIVE's oldest (rows in descending order). Returns the two batches (as
    the relay claims them) and what payout credited for each gift."""
    order = {"a": list(range(1, LIVES + 1)), "b": list(range(LIVES, 0, -1))}
    ids: dict[str, list[str]] = {"a": [], "b": []}
    sent_at = now - dt.timedelta(seconds=1)
    async with db.driver.transaction() as tx:
        for (batch, creators), viewer in zip(order.items(), VIEWERS, strict=True):
            for n, i in enumerate(creators):
                sent_gift_id = f"r{r:04d}-{batch}-{n:02d}"
                ids[batch].append(sent_gift_id)
                await storage.insert_sent_gift(
                    tx,
                    storage.SentGiftRecord(
                        sent_gift_id=sent_gift_id,
                        sender_id=viewer,
                        creator_id=creator_id(i),
                        gift_id=GIFT,
                        count=1,
                        coins=COINS,
                        live_id=live_id(i) if in_lives else None,
                        video_id=None if in_lives else f"video-{i:02d}",
                        status="pending",
                        wallet_transaction_id=None,
                        created_at=sent_at,
                        updated_at=sent_at,
                        streakable=True,
                    ),
                )
                await storage.move_sent_gift(
                    tx,
                    sent_gift_id,
                    from_status="pending",
                    to_status="debited",
                    now=sent_at,
                    wallet_transaction_id=f"wtx-{sent_gift_id}",
                )
                await storage.enqueue_credit(
                    tx,
                    sent_gift_id=sent_gift_id,
                    creator_id=creator_id(i),
                    coins=COINS,
                    traceparent="",
                    now=sent_at,
                )
        for i in range(LIVES, 0, -1) if in_lives else ():
            last_at = now - 2 * PAUSE - dt.timedelta(milliseconds=10 * i)
            await storage.extend_streak(
                tx,
                live_id=live_id(i),
                sender_id=f"streaker-{r:04d}",
                gift_id=GIFT,
                count=1,
                now=last_at,
                cutoff=last_at - PAUSE,
                new_streak_id=f"r{r:04d}-streak-{i:02d}",
            )
    outbox = storage.credit_outbox
    async with db.read() as conn:
        rows = (
            await conn.execute(
                sa.select(
                    outbox.c.outbox_id,
                    outbox.c.sent_gift_id,
                    outbox.c.creator_id,
                    outbox.c.coins,
                    outbox.c.traceparent,
                    outbox.c.attempts,
                ).where(outbox.c.sent_gift_id.in_(ids["a"] + ids["b"]))
            )
        ).all()
    by_id = {
        str(row.sent_gift_id): storage.OutboxRecord(
            int(row.outbox_id),
            str(row.sent_gift_id),
            str(row.creator_id),
            int(row.coins),
            str(row.traceparent),
            int(row.attempts),
        )
        for row in rows
    }
    diamonds = {sent_gift_id: DIAMONDS for sent_gift_id in by_id}
    # As claim_due_credits answers a batch: by outbox id (here also the order written).
    batch_a = sorted((by_id[i] for i in ids["a"]), key=lambda c: c.outbox_id)
    batch_b = sorted((by_id[i] for i in ids["b"]), key=lambda c: c.outbox_id)
    return batch_a, batch_b, diamonds


async def deliver(db: Database, batch: Batch, diamonds: dict[str, int], now: dt.datetime) -> int:
    """The relay's step after payout credited a batch (one transaction, as CreditRelay runs it)."""
    async with db.driver.transaction() as tx:
        return await storage.mark_delivered(tx, batch, now, diamonds)


async def sweep(db: Database, now: dt.datetime) -> set[str]:
    """One streak sweep (one transaction, as the gifting service's sweep job runs it)."""
    async with db.driver.transaction() as tx:
        return await Lives(PAUSE).end_due_streaks(tx, now, limit=500)


async def run_together(r: int, work: dict[str, Coroutine[Any, Any, Any]]) -> list[Any]:
    """Run the round's transactions at once, each in turn started first (asyncio starts tasks in
    the order gathered); their results in the order given. Fails on a deadlock or serialization
    failure, saying which transaction PostgreSQL rolled back and why."""
    names, coroutines = list(work), list(work.values())
    shift = r % len(coroutines)
    started = await asyncio.gather(*coroutines[shift:], *coroutines[:shift], return_exceptions=True)
    results = started[-shift:] + started[:-shift] if shift else started
    for name, result in zip(names, results, strict=True):
        if isinstance(result, BaseException):
            why = TRANSIENT.get(str(getattr(result, "sqlstate", "")))
            if why is not None:
                detail = getattr(result, "detail", None) or ""
                pytest.fail(
                    f"round {r + 1}/{ROUNDS}: {why} while {name}: {result!r} {detail}\n"
                    "(transactions changing several LIVEs, rankings or gifters must take their "
                    "rows in key order: LIVEs by live_id)",
                    pytrace=False,
                )
            raise result
    return list(results)


async def scalar(db: Database, sql: str, **params: Any) -> int:
    async with db.read() as conn:
        return int((await conn.execute(sa.text(sql), params)).scalar_one())


async def check_credited(db: Database, *, ranked: int, gave: int) -> None:
    """Every credit marked, every gift reads credited, each creator ranked and each viewer's coins
    to each creator counted once per credit."""
    assert await scalar(db, "SELECT count(*) FROM credit_outbox WHERE delivered_at IS NULL") == 0
    assert await scalar(db, "SELECT count(*) FROM credit_outbox") == 2 * LIVES * ROUNDS
    async with db.read() as conn:
        for sent_gift_id in ("r0000-a-00", f"r{ROUNDS - 1:04d}-b-{LIVES - 1:02d}"):
            sent = await storage.get_sent_gift(conn, sent_gift_id)
            assert sent is not None and sent.status == "credited", sent
    for i in range(1, LIVES + 1):
        coins = await scalar(
            db,
            "SELECT coins FROM creator_rankings WHERE period = 'all' AND creator_id = :c",
            c=creator_id(i),
        )
        assert coins == ranked
        for viewer in VIEWERS:
            given = await scalar(
                db,
                "SELECT coins FROM creator_gifters WHERE creator_id = :c AND sender_id = :s",
                c=creator_id(i),
                s=viewer,
            )
            assert given == gave


async def test_relay_and_streak_sweep_lock_lives_in_one_order(gifting_db: Database) -> None:
    db = gifting_db
    every_live = {live_id(i) for i in range(1, LIVES + 1)}
    for r in range(ROUNDS):
        now = dt.datetime.now(dt.UTC)
        batch_a, batch_b, diamonds = await prepare_round(db, r, now, in_lives=True)
        marked_a, marked_b, fed = await run_together(
            r,
            {
                "delivering batch A (LIVEs ascending)": deliver(db, batch_a, diamonds, now),
                "delivering batch B (LIVEs descending)": deliver(db, batch_b, diamonds, now),
                "the streak sweep": sweep(db, now),
            },
        )
        assert (marked_a, marked_b) == (LIVES, LIVES), f"round {r + 1}: not every credit marked"
        assert fed == every_live, f"round {r + 1}: not every due streak ended"

    await check_credited(db, ranked=2 * COINS * ROUNDS, gave=COINS * ROUNDS)
    assert await scalar(db, "SELECT count(*) FROM streaks WHERE ended_at IS NULL") == 0
    assert await scalar(db, "SELECT count(*) FROM streaks") == LIVES * ROUNDS
    async with db.read() as conn:
        for i in range(1, LIVES + 1):
            live = await storage.get_live(conn, live_id(i))
            # Two credited gifts a round, and one streak-ended event a round in its feed.
            assert live is not None
            assert live.diamonds_earned == 2 * DIAMONDS * ROUNDS, live
            assert live.last_seq == ROUNDS, live


async def test_deliveries_upsert_rankings_in_one_order(gifting_db: Database) -> None:
    """Gifts to videos: no LIVE row to lock first, so two deliveries to the same creators meet
    first at the rankings rows. (Two deliveries sharing a gifters row share that creator's rankings
    rows too, and take those first, so the gifters' order cannot be caught out here.)"""
    db = gifting_db
    for r in range(ROUNDS):
        now = dt.datetime.now(dt.UTC)
        batch_a, batch_b, diamonds = await prepare_round(db, r, now, in_lives=False)
        marked = await run_together(
            r,
            {
                "delivering batch A (creators ascending)": deliver(db, batch_a, diamonds, now),
                "delivering batch B (creators descending)": deliver(db, batch_b, diamonds, now),
            },
        )
        assert marked == [LIVES, LIVES], f"round {r + 1}: not every credit marked"

    await check_credited(db, ranked=2 * COINS * ROUNDS, gave=COINS * ROUNDS)
