"""A LIVE's gift feed: every watcher gets every event of the LIVE once, in order, from its cursor.

The feed is gifting's database: each gift recorded in a LIVE takes the LIVE's next number in the
same statement that records it (`storage.record_debited`), so the feed's order is the database's,
any replica can serve any watcher, and a watcher that reconnects after cursor N reads N+1... with no
gap and no duplicate.

In each process, one reader per LIVE (a `_Tail`) reads the new events once and keeps the last
`GIFTING_FEED_KEEP` in memory for all of that LIVE's watchers: a LIVE with thousands of watchers
costs one query per new batch of events, not one per watcher. The reader is woken at once by a gift
recorded in this process and, on PostgreSQL, by LISTEN/NOTIFY from every replica (NOTIFY is
delivered at commit); it polls every `GIFTING_FEED_POLL_SECONDS` in case a notification was lost.

A watcher behind the kept events (a reconnect from an old cursor, or a slow reader whose events
rolled out) reads pages of its own from the database until it is back in the kept window; one
that is more than `GIFTING_FEED_MAX_BACKLOG` events behind and still losing ground is told to
resume from its cursor (ABORTED FEED_TOO_SLOW). So a slow watcher slows no sender and no other
watcher. Watchers are capped per process and per user (RESOURCE_EXHAUSTED TOO_MANY_WATCHERS).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from runtime.backoff import backoff
from runtime.clock import Clock
from runtime.db import Database
from runtime.errors import Aborted, NotFound, OutOfRange, ResourceExhausted, Unavailable
from services.gifting import storage

log = logging.getLogger("coins.gifting.feed")
CHANNEL = "live_feed"


@dataclass(frozen=True)
class FeedLimits:
    poll_seconds: float
    page: int
    """Events a watcher behind the kept window reads (and holds) at a time."""
    keep: int
    """Recent events kept in memory per LIVE (per process) for all its watchers."""
    max_backlog: int
    max_watchers: int
    """Watchers one process serves at once."""
    max_watchers_per_user: int
    """Watchers of one user one process serves at once."""
    watch_lease_seconds: float = 30.0
    """A LIVE with a reader is marked watched this far ahead (renewed at a third of it): gifts
    NOTIFY other replicas only for a watched LIVE."""


class _Tail:
    """One LIVE's newest events in this process, read once for all its watchers."""

    def __init__(self, live_id: str, last_seq: int, ended: bool, keep: int) -> None:
        self.live_id = live_id
        self.last_seq = last_seq
        """Every event up to this cursor has been read (those not in `recent` rolled out)."""
        self.recent: collections.deque[storage.LiveEventRecord] = collections.deque(maxlen=keep)
        self.ended = ended
        self.changed = asyncio.Event()
        """Set (and replaced) when events are added."""
        self.woken = asyncio.Event()
        self.watchers = 0
        self.reader: asyncio.Task[None] | None = None
        self.marked_until: dt.datetime | None = None
        """Until when this process has marked the LIVE watched in the database."""

    def after(self, cursor: int) -> list[storage.LiveEventRecord] | None:
        """The kept events after `cursor`; None if some it needs rolled out (read them from the
        database)."""
        if cursor >= self.last_seq:
            return []
        if not self.recent or self.recent[0].seq > cursor + 1:
            return None
        start = cursor + 1 - self.recent[0].seq
        if start < len(self.recent) and self.recent[start].seq == cursor + 1:
            return list(self.recent)[start:]  # cursors are consecutive: the usual case
        return [e for e in self.recent if e.seq > cursor]

    def add(self, events: list[storage.LiveEventRecord]) -> None:
        self.recent.extend(events)
        self.last_seq = events[-1].seq
        self.ended = self.ended or events[-1].kind == "ended"
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class LiveFeed:
    def __init__(self, db: Database, clock: Clock, limits: FeedLimits) -> None:
        self._db = db
        self._clock = clock
        self._limits = limits
        self._tails: dict[str, _Tail] = {}
        self._per_user: collections.Counter[str] = collections.Counter()
        self._closing = False

    @property
    def watchers(self) -> int:
        return sum(tail.watchers for tail in self._tails.values())

    def read_up_to(self, live_id: str) -> int:
        """The cursor up to which this process has read a watched LIVE's events (-1: unwatched)."""
        tail = self._tails.get(live_id)
        return -1 if tail is None else tail.last_seq

    def notify(self, live_id: str) -> None:
        """New events in a LIVE: its reader in this process reads them now."""
        tail = self._tails.get(live_id)
        if tail is not None:
            tail.woken.set()

    def close(self) -> None:
        """The process is stopping: every watcher is told to reconnect (to another replica, or to
        this one restarted) from its cursor, now rather than when the grace period runs out."""
        self._closing = True
        for tail in self._tails.values():
            changed, tail.changed = tail.changed, asyncio.Event()
            changed.set()

    def notify_all(self) -> None:
        """Notifications may have been missed (a reconnect): every reader looks now."""
        for tail in self._tails.values():
            tail.woken.set()

    async def listen(self) -> None:
        """Wake this process's readers for events recorded by any replica (PostgreSQL NOTIFY);
        raises when the connection is lost, so its worker restarts it. On SQLite there is one
        process, whose gifts wake the readers directly: nothing to listen to."""
        if not self._db.driver.is_postgres:
            await asyncio.Event().wait()
        await self._db.driver.listen(CHANNEL, self.notify, on_connect=self.notify_all)

    async def watch(
        self, live_id: str, after: int, viewer: str
    ) -> AsyncGenerator[storage.LiveEventRecord, None]:
        """The LIVE's events after cursor `after`, as they are recorded, until it ends. Checked
        before the first event: NOT_FOUND for no such LIVE, OUT_OF_RANGE for a cursor past its
        last event; a cursor at or past the end of an ended LIVE ends at once."""
        async with self._db.read() as conn:
            live = await storage.get_live(conn, live_id)
        if live is None:
            raise NotFound("LIVE_NOT_FOUND", f"no LIVE {live_id!r}", live_id=live_id)
        if after > live.last_seq:
            raise OutOfRange(
                "CURSOR_BEYOND_END",
                f"LIVE {live_id}'s feed "
                f"{'ended' if live.ended_at is not None else 'is so far'} at cursor "
                f"{live.last_seq}; after_cursor={after} is past it (a cursor comes from an event "
                "of this LIVE)",
                live_id=live_id,
                last_cursor=live.last_seq,
            )
        if live.ended_at is not None and after >= live.last_seq:
            return
        tail = self._join(live, viewer)
        try:
            cursor = after
            first_backlog: int | None = None
            while True:
                if self._closing:
                    raise Unavailable(
                        "SHUTTING_DOWN",
                        f"this gifting process is stopping; reconnect with after_cursor={cursor}",
                        retry_after=0.5,
                        live_id=live_id,
                        resume_after=str(cursor),
                    )
                changed = tail.changed
                events = tail.after(cursor)
                if events is not None:
                    first_backlog = None  # in the kept window: caught up
                else:  # behind the kept events: pages of its own
                    backlog = tail.last_seq - cursor
                    first_backlog = backlog if first_backlog is None else first_backlog
                    if backlog > self._limits.max_backlog and backlog > (
                        first_backlog + self._limits.page
                    ):
                        raise Aborted(
                            "FEED_TOO_SLOW",
                            f"this watcher is {backlog} events behind LIVE {live_id}; reconnect "
                            f"with after_cursor={cursor}",
                            live_id=live_id,
                            resume_after=str(cursor),
                        )
                    async with self._db.read() as conn:
                        events = await storage.live_events_after(
                            conn, live_id, cursor, self._limits.page
                        )
                for event in events:
                    yield event
                    cursor = event.seq
                    if event.kind == "ended":
                        return
                if not events:
                    await changed.wait()
        finally:
            self._leave(tail, viewer)

    def _join(self, live: storage.LiveRecord, viewer: str) -> _Tail:
        limits = self._limits
        if self.watchers >= limits.max_watchers:
            raise ResourceExhausted(
                "TOO_MANY_WATCHERS",
                f"this gifting process serves {limits.max_watchers} watchers already; try again "
                "(another replica may take you)",
                retry_after=1.0,
            )
        if self._per_user[viewer] >= limits.max_watchers_per_user:
            raise ResourceExhausted(
                "TOO_MANY_WATCHERS",
                f"{viewer} watches {limits.max_watchers_per_user} feeds already: close one first",
                retry_after=1.0,
                limit=limits.max_watchers_per_user,
            )
        tail = self._tails.get(live.live_id)
        if tail is None:
            tail = _Tail(live.live_id, live.last_seq, live.ended_at is not None, limits.keep)
            self._tails[live.live_id] = tail
        if tail.reader is None and not tail.ended:
            tail.reader = asyncio.create_task(self._read(tail), name=f"feed:{live.live_id}")
        tail.watchers += 1
        self._per_user[viewer] += 1
        return tail

    def _leave(self, tail: _Tail, viewer: str) -> None:
        tail.watchers -= 1
        self._per_user[viewer] -= 1
        if self._per_user[viewer] <= 0:
            del self._per_user[viewer]
        if tail.watchers == 0:
            self._tails.pop(tail.live_id, None)
            if tail.reader is not None:
                tail.reader.cancel()

    async def _mark_watched(self, tail: _Tail) -> None:
        """Keep the LIVE marked watched while this reader runs, so gifts recorded by any replica
        NOTIFY (a gift checks the mark in its own statement). SQLite has one process: no NOTIFY."""
        if not self._db.driver.is_postgres:
            return
        now = self._clock.now()
        lease = dt.timedelta(seconds=self._limits.watch_lease_seconds)
        if tail.marked_until is not None and tail.marked_until - now > lease * 2 / 3:
            return
        until = now + lease
        async with self._db.driver.transaction(single_statement=True) as tx:
            await storage.mark_watched(tx, tail.live_id, until)
        tail.marked_until = until

    async def _read(self, tail: _Tail) -> None:
        """The LIVE's reader: reads new events when woken (or every poll) until the LIVE ends."""
        failures = 0
        while not tail.ended:
            tail.woken.clear()
            try:
                await self._mark_watched(tail)
                async with self._db.read() as conn:
                    events = await storage.live_events_after(
                        conn, tail.live_id, tail.last_seq, self._limits.page
                    )
                failures = 0
            except Exception as error:
                failures += 1
                pause = backoff(failures, cap=self._limits.poll_seconds * 5)
                log.warning(
                    "feed of %s: read failed (%r); again in %.1fs", tail.live_id, error, pause
                )
                await asyncio.sleep(pause)
                continue
            if events:
                tail.add(events)
                if len(events) == self._limits.page:
                    continue  # more are waiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tail.woken.wait(), self._limits.poll_seconds)
