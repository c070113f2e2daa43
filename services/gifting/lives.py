"""LIVE rooms: a creator's LIVE, the rules for gifts to it, and its streaks (its gift feed is
`services.gifting.feed`)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from dataclasses import asdict, dataclass, replace

from sqlalchemy.ext.asyncio import AsyncConnection

from runtime import deadlines
from runtime.clock import Clock
from runtime.db import Database
from runtime.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FailedPreconditionYet,
    NotFound,
)
from runtime.sql import Tx
from services.gifting import storage
from services.gifting.domain import GiftOrder

TOP_GIFTERS = 10


@dataclass(frozen=True)
class LiveSummary:
    coins_received: int
    gifts_sent: int
    unique_gifters: int
    top_gifters: list[tuple[str, int]]
    last_cursor: int
    diamonds_earned: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> LiveSummary:
        fields = json.loads(text)
        fields["top_gifters"] = [(str(user), int(coins)) for user, coins in fields["top_gifters"]]
        return cls(**fields)


def live_ended(live: storage.LiveRecord) -> FailedPrecondition:
    """LIVE_ENDED: gifts to a LIVE that is over are refused."""
    assert live.ended_at is not None
    return FailedPrecondition(
        "LIVE_ENDED",
        f"LIVE {live.live_id} ended at {live.ended_at.isoformat(timespec='seconds')}",
        live_id=live.live_id,
    )


def ended_before_the_debit(live_id: str) -> FailedPrecondition:
    """LIVE_ENDED for a gift its LIVE's end settled as failed: its debit had not happened (and now
    never will: it was voided in the wallet)."""
    return FailedPrecondition(
        "LIVE_ENDED",
        f"LIVE {live_id} ended before this gift's coins were taken: no coins moved",
        live_id=live_id,
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

    def streak_cutoff(self, now: dt.datetime) -> dt.datetime:
        """A streak whose last send was before this has paused."""
        return now - self.streak_pause

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
        if await storage.insert_live(conn, live):
            return live
        running = await storage.running_live_of(conn, creator_id)
        if running is not None and running != live.live_id:
            # Holds until that LIVE ends: not kept as this request's answer (the same request,
            # retried after EndLive, starts the LIVE).
            raise FailedPreconditionYet(
                "LIVE_ALREADY_RUNNING",
                f"creator {creator_id} is LIVE already in {running}: end it (EndLive) before "
                "starting another",
                live_id=running,
                creator_id=creator_id,
            )
        raise AlreadyExists(
            "LIVE_ID_TAKEN",
            f"a LIVE {live.live_id} exists already: choose another id, or leave it empty",
            live_id=live.live_id,
        )

    async def get(self, conn: AsyncConnection, live_id: str) -> storage.LiveRecord:
        live = await storage.get_live(conn, live_id)
        if live is None:
            raise NotFound("LIVE_NOT_FOUND", f"no LIVE {live_id!r}", live_id=live_id)
        return live

    async def end(
        self, conn: AsyncConnection, live_id: str, now: dt.datetime
    ) -> tuple[storage.LiveRecord, LiveSummary]:
        """End the LIVE once. Its feed's last event is written with it and keeps the summary
        answered here, so the event reads the same whenever it is read (GetLive's summary goes on
        counting credits that land later, and reversals)."""
        seq = await storage.end_live(conn, live_id, now)
        if seq is None:
            raise live_ended(await self.get(conn, live_id))
        live = await self.get(conn, live_id)
        summary = await self.summary(conn, live)
        await storage.feed_ended(conn, live_id, seq, now, summary.to_json())
        return live, summary

    async def close_to_gifts(
        self, db: Database, live_id: str, clock: Clock, *, patience: float
    ) -> None:
        """EndLive's first step: the LIVE takes no new gift (gifts off), and the gifts it took
        already, debited or being debited, are recorded before it ends, so that every gift it
        took is in its feed and the summary EndLive answers is final. A gift still pending after
        `patience` seconds (its wallet call is slow or down: the reconciler's) does not hold up
        the end; it is then counted in the LIVE's totals but not fed."""
        async with db.transaction() as conn:
            live = await storage.get_live(conn, live_id)
            if live is None or live.ended_at is not None:
                return
            if live.gifts_enabled:
                await storage.set_live_gifts(conn, live_id, False)
        left = deadlines.remaining()  # the caller's deadline bounds the wait too
        if left is not None:
            patience = min(patience, max(0.0, left - 0.2))
        give_up = time.monotonic() + patience
        since = clock.now() - dt.timedelta(seconds=patience)
        pause = 0.002
        while time.monotonic() < give_up:
            async with db.read() as conn:
                if not await storage.pending_gifts_in_live(conn, live_id, since):
                    return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    async def set_gifts(
        self, conn: AsyncConnection, live_id: str, enabled: bool
    ) -> storage.LiveRecord:
        live = await self.get(conn, live_id)
        if live.ended_at is not None:
            raise live_ended(live)
        await storage.set_live_gifts(conn, live_id, enabled)
        return await self.get(conn, live_id)

    async def ended_summary(
        self, db: Database, live_id: str, event: storage.LiveEventRecord
    ) -> LiveSummary:
        """An `ended` event's summary: the one EndLive answered (an event written before migration
        0015 kept none, and reads the LIVE's summary now)."""
        if event.summary is not None:
            return LiveSummary.from_json(event.summary)
        async with db.read() as conn:
            return await self.summary(conn, await self.get(conn, live_id))

    async def summary(self, conn: AsyncConnection, live: storage.LiveRecord) -> LiveSummary:
        return LiveSummary(
            coins_received=live.coins_received,
            gifts_sent=live.gifts_sent,
            unique_gifters=await storage.unique_gifters(conn, live.live_id),
            top_gifters=await storage.top_gifters(
                conn, live.live_id, limit=TOP_GIFTERS, after=None
            ),
            last_cursor=live.last_seq,
            diamonds_earned=live.diamonds_earned,
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
            return live_ended(live)
        if not live.gifts_enabled:
            return FailedPrecondition(
                "LIVE_GIFTS_OFF",
                f"the creator turned gifts off for LIVE {live_id}",
                live_id=live_id,
            )
        return None
