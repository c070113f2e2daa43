"""LIVE rooms: a creator's LIVE, the rules for gifts to it, and its gift feed.

The feed is gifting's database: each gift recorded in a LIVE takes the LIVE's next number in the
same statement that records it (`storage.record_debited`), so the feed's order is the database's,
any replica can serve any watcher, and a watcher that reconnects after cursor N reads N+1... with no
gap and no duplicate. Watchers are woken at once in the process that recorded the gift and, on
PostgreSQL, in every replica by LISTEN/NOTIFY (NOTIFY is delivered at commit); a poll every
`GIFTING_FEED_POLL_SECONDS` covers a lost notification. Each watcher reads in pages of its own, so a
slow one holds one page in memory and slows no one else; one that falls more than
`GIFTING_FEED_MAX_BACKLOG` events behind, and still losing ground, is told to resume from its
cursor (ABORTED FEED_TOO_SLOW); one reconnecting far behind may catch up at its own pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import asyncpg
from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.db import Database
from runtime.errors import Aborted, AlreadyExists, DomainError, FailedPrecondition, NotFound
from runtime.sql import Tx
from services.gifting import storage
from services.gifting.domain import GiftOrder

log = logging.getLogger("coins.gifting.lives")
CHANNEL = "live_feed"
TOP_GIFTERS = 10


@dataclass(frozen=True)
class LiveSummary:
    coins_received: int
    gifts_sent: int
    unique_gifters: int
    top_gifters: list[tuple[str, int]]
    last_cursor: int


def _ended(live: storage.LiveRecord) -> FailedPrecondition:
    assert live.ended_at is not None
    return FailedPrecondition(
        "LIVE_ENDED",
        f"LIVE {live.live_id} ended at {live.ended_at.isoformat(timespec='seconds')}",
        live_id=live.live_id,
    )


class Lives:
    def __init__(self, streak_pause: dt.timedelta) -> None:
        self.streak_pause = streak_pause

    async def streak(
        self, tx: Tx, sent: storage.SentGiftRecord, now: dt.datetime
    ) -> tuple[storage.SentGiftRecord, set[str]]:
        """A streakable gift sent in a LIVE joins its viewer's streak of that gift, if the last send
        was within the pause, else starts a new one (ending the old one, with its feed event, if the
        sweep has not yet). Returns the gift with its streak and running count, and the LIVEs whose
        feeds gained an event. Runs in the transaction that records the gift: if that fails, so
        does this."""
        if sent.live_id is None or not sent.streakable:
            return sent, set()
        streak_id, count, ended = await storage.extend_streak(
            tx,
            live_id=sent.live_id,
            sender_id=sent.sender_id,
            gift_id=sent.gift_id,
            count=sent.count,
            now=now,
            cutoff=now - self.streak_pause,
            new_streak_id=uuid.uuid4().hex,
        )
        fed = await storage.feed_streak_ends(tx, ended, now)
        return replace(sent, streak_id=streak_id, streak_count=count), fed

    async def end_due_streaks(self, tx: Tx, now: dt.datetime, limit: int) -> set[str]:
        """End the streaks whose pause has passed (each with its feed event); the LIVEs fed."""
        ended = await storage.end_due_streaks(tx, now, now - self.streak_pause, limit)
        return await storage.feed_streak_ends(tx, ended, now)

    async def start(
        self, conn: AsyncConnection, creator_id: str, title: str, live_id: str, now: dt.datetime
    ) -> storage.LiveRecord:
        live = storage.LiveRecord(
            live_id=live_id or f"live-{uuid.uuid4().hex[:16]}",
            creator_id=creator_id,
            title=title,
            gifts_enabled=True,
            started_at=now,
            ended_at=None,
            last_seq=0,
            coins_received=0,
            gifts_sent=0,
        )
        if not await storage.insert_live(conn, live):
            raise AlreadyExists(
                "LIVE_ID_TAKEN",
                f"a LIVE {live.live_id} exists already: choose another id, or leave it empty",
                live_id=live.live_id,
            )
        return live

    async def get(self, conn: AsyncConnection, live_id: str) -> storage.LiveRecord:
        live = await storage.get_live(conn, live_id)
        if live is None:
            raise NotFound("LIVE_NOT_FOUND", f"no LIVE {live_id!r}", live_id=live_id)
        return live

    async def end(
        self, conn: AsyncConnection, live_id: str, now: dt.datetime
    ) -> storage.LiveRecord:
        """End the LIVE once (its feed's last event is written with it)."""
        if not await storage.end_live(conn, live_id, now):
            raise _ended(await self.get(conn, live_id))
        return await self.get(conn, live_id)

    async def set_gifts(
        self, conn: AsyncConnection, live_id: str, enabled: bool
    ) -> storage.LiveRecord:
        live = await self.get(conn, live_id)
        if live.ended_at is not None:
            raise _ended(live)
        await storage.set_live_gifts(conn, live_id, enabled)
        return await self.get(conn, live_id)

    async def summary(self, conn: AsyncConnection, live: storage.LiveRecord) -> LiveSummary:
        return LiveSummary(
            coins_received=live.coins_received,
            gifts_sent=live.gifts_sent,
            unique_gifters=await storage.unique_gifters(conn, live.live_id),
            top_gifters=await storage.top_gifters(
                conn, live.live_id, limit=TOP_GIFTERS, after=None
            ),
            last_cursor=live.last_seq,
        )

    async def refusal(self, conn: AsyncConnection | Tx, order: GiftOrder) -> DomainError | None:
        """Why a gift to this LIVE is refused (None: the LIVE takes it)."""
        live_id = order.target.live_id
        if live_id is None:
            return None
        live = await storage.get_live(conn, live_id)
        if live is None:
            return NotFound(
                "LIVE_NOT_FOUND",
                f"no LIVE {live_id!r}: gifts go to a LIVE its creator started (StartLive)",
                live_id=live_id,
            )
        if live.creator_id != order.creator_id:
            return FailedPrecondition(
                "LIVE_NOT_CREATORS",
                f"LIVE {live_id} is {live.creator_id}'s, not {order.creator_id}'s",
                live_id=live_id,
                creator_id=live.creator_id,
            )
        if live.ended_at is not None:
            return _ended(live)
        if not live.gifts_enabled:
            return FailedPrecondition(
                "LIVE_GIFTS_OFF",
                f"the creator turned gifts off for LIVE {live_id}",
                live_id=live_id,
            )
        return None


class LiveFeed:
    def __init__(self, db: Database, *, poll_seconds: float, max_backlog: int, page: int) -> None:
        self._db = db
        self._poll = poll_seconds
        self._max_backlog = max_backlog
        self._page = page
        self._watchers: dict[str, set[asyncio.Event]] = {}

    @property
    def watchers(self) -> int:
        return sum(len(events) for events in self._watchers.values())

    def notify(self, live_id: str) -> None:
        """New events in a LIVE: wake its watchers in this process."""
        for event in self._watchers.get(live_id, ()):
            event.set()

    async def listen(self, database_url: str) -> None:
        """Wake this process's watchers for events recorded by any replica (PostgreSQL NOTIFY)."""
        url = make_url(database_url)
        if url.get_backend_name() != "postgresql":
            return
        dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.add_listener(CHANNEL, lambda _c, _pid, _ch, live_id: self.notify(live_id))
            while not conn.is_closed():
                await asyncio.sleep(5)
                await conn.execute("SELECT 1")  # a dead connection ends the worker: it restarts
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    async def watch(self, live_id: str, after: int) -> AsyncIterator[storage.LiveEventRecord]:
        """The LIVE's events after cursor `after`, as they are recorded, until it ends."""
        woken = asyncio.Event()
        self._watchers.setdefault(live_id, set()).add(woken)
        cursor = after
        first_backlog: int | None = None
        try:
            while True:
                woken.clear()
                async with self._db.read() as conn:
                    events = await storage.live_events_after(conn, live_id, cursor, self._page)
                    if len(events) == self._page:  # behind: is it catching up or losing ground?
                        live = await storage.get_live(conn, live_id)
                        backlog = 0 if live is None else live.last_seq - cursor
                        if first_backlog is None:
                            first_backlog = backlog
                        if backlog > self._max_backlog and backlog > first_backlog + self._page:
                            raise Aborted(
                                "FEED_TOO_SLOW",
                                f"this watcher is {backlog} events behind LIVE "
                                f"{live_id}; reconnect with after_cursor={cursor}",
                                live_id=live_id,
                                resume_after=str(cursor),
                            )
                for event in events:
                    yield event
                    cursor = event.seq
                    if event.kind == "ended":
                        return
                if len(events) < self._page:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(woken.wait(), self._poll)
        finally:
            waiting = self._watchers.get(live_id, set())
            waiting.discard(woken)
            if not waiting:
                self._watchers.pop(live_id, None)
