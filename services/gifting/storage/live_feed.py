"""LIVEs, their feed events and gift streaks."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.clock import utc
from runtime.db import insert_new
from runtime.sql import Statement, Tx, as_tx
from services.gifting.storage.sends import SentGiftRecord, sent_gift_of_row
from services.gifting.storage.tables import live_events, live_gifters, lives, sent_gifts

LOCK_LIVES = Statement(
    "gifting.lock_lives",
    "SELECT live_id FROM lives WHERE live_id IN (SELECT value FROM json_each(:rows)) "
    "ORDER BY live_id",
    postgres="SELECT live_id FROM lives WHERE live_id = ANY(:live_ids::text[]) "
    "ORDER BY live_id FOR UPDATE",
)
"""Several LIVEs' rows, locked in id order: every transaction that changes more than one LIVE
(a delivery, the streak sweep) takes them in that order, so two such can never deadlock."""


@dataclass(frozen=True)
class LiveRecord:
    live_id: str
    creator_id: str
    title: str
    gifts_enabled: bool
    started_at: dt.datetime
    ended_at: dt.datetime | None
    last_seq: int
    coins_received: int
    gifts_sent: int
    diamonds_earned: int = 0


async def insert_live(conn: AsyncConnection, live: LiveRecord) -> bool:
    """A new LIVE; False if its id is taken or its creator has a LIVE running (by a concurrent
    StartLive too: the partial unique index of migration 0013)."""
    return await insert_new(conn, lives, live.__dict__)


_RUNNING_LIVE = Statement(
    "gifting.running_live",
    "SELECT live_id FROM lives WHERE creator_id = :creator_id AND ended_at IS NULL",
)


async def running_live_of(conn: AsyncConnection, creator_id: str) -> str | None:
    """The creator's LIVE that has not ended, if any (at most one)."""
    row = await as_tx(conn).one(_RUNNING_LIVE, creator_id=creator_id)
    return None if row is None else str(row[0])


_GET_LIVE = Statement(
    "gifting.get_live",
    "SELECT live_id, creator_id, title, gifts_enabled, started_at, ended_at, last_seq, "
    "coins_received, gifts_sent, diamonds_earned FROM lives WHERE live_id = :live_id",
)


async def get_live(conn: AsyncConnection | Tx, live_id: str) -> LiveRecord | None:
    row = await as_tx(conn).one(_GET_LIVE, live_id=live_id)
    if row is None:
        return None
    live, creator, title, enabled, started, ended, seq, coins, gifts, diamonds = row
    return LiveRecord(
        live_id=live,
        creator_id=creator,
        title=title,
        gifts_enabled=bool(enabled),
        started_at=utc(started),
        ended_at=None if ended is None else utc(ended),
        last_seq=int(seq),
        coins_received=int(coins),
        gifts_sent=int(gifts),
        diamonds_earned=int(diamonds),
    )


async def end_live(conn: AsyncConnection, live_id: str, now: dt.datetime) -> int | None:
    """End a LIVE (its open streaks first, each with its event); the cursor its feed's last event
    takes (`feed_ended`), or None if it had ended already."""
    tx = as_tx(conn)
    await feed_streak_ends(tx, await end_live_streaks(tx, live_id, now), now)
    ended = await conn.execute(
        update(lives)
        .where(lives.c.live_id == live_id, lives.c.ended_at.is_(None))
        .values(ended_at=now, last_seq=lives.c.last_seq + 1)
        .returning(lives.c.last_seq)
    )
    seq: int | None = ended.scalar()
    return seq


async def feed_ended(
    conn: AsyncConnection, live_id: str, seq: int, now: dt.datetime, summary: str
) -> None:
    """The feed's last event, with the LIVE's summary at its end, in the transaction that ended it."""
    await conn.execute(
        live_events.insert().values(
            live_id=live_id, seq=seq, kind="ended", created_at=now, summary=summary
        )
    )
    if conn.dialect.name == "postgresql":
        await conn.execute(select(func.pg_notify("live_feed", live_id)))


async def pending_gifts_in_live(conn: AsyncConnection, live_id: str, since: dt.datetime) -> int:
    """Gifts to the LIVE started since `since` and not yet recorded or failed
    (ix_sent_gifts_live_created: a range of the LIVE's newest gifts)."""
    found = await conn.scalar(
        select(func.count())
        .select_from(sent_gifts)
        .where(
            sent_gifts.c.live_id == live_id,
            sent_gifts.c.created_at >= since,
            sent_gifts.c.status == "pending",
        )
    )
    return int(found or 0)


async def pending_gifts_of_live(
    conn: AsyncConnection, live_id: str, *, limit: int
) -> list[SentGiftRecord]:
    """The LIVE's gifts not yet recorded or failed, oldest first (ix_sent_gifts_status_created:
    pending gifts are few)."""
    rows = await conn.execute(
        select(sent_gifts)
        .where(sent_gifts.c.status == "pending", sent_gifts.c.live_id == live_id)
        .order_by(sent_gifts.c.created_at)
        .limit(limit)
    )
    return [sent_gift_of_row(row) for row in rows]


async def set_live_gifts(conn: AsyncConnection, live_id: str, enabled: bool) -> None:
    await conn.execute(
        update(lives).where(lives.c.live_id == live_id).values(gifts_enabled=enabled)
    )


async def unique_gifters(conn: AsyncConnection, live_id: str) -> int:
    found = await conn.scalar(
        select(func.count()).select_from(live_gifters).where(live_gifters.c.live_id == live_id)
    )
    return int(found or 0)


@dataclass(frozen=True)
class LiveEventRecord:
    seq: int
    kind: str
    sent_gift_id: str | None
    sender_id: str | None
    gift_id: str | None
    count: int | None
    coins: int | None
    created_at: dt.datetime
    streak_id: str | None = None
    streak_count: int | None = None
    summary: str | None = None
    """An `ended` event's summary (JSON) as EndLive answered it; None for one written before
    migration 0015."""


_MARK_WATCHED = Statement(
    "gifting.mark_watched",
    "UPDATE lives SET watched_until = :until WHERE live_id = :live_id AND ended_at IS NULL "
    "AND (watched_until IS NULL OR watched_until < :until)",
)


async def mark_watched(tx: Tx, live_id: str, until: dt.datetime) -> None:
    """Some process has watchers of the LIVE's feed until `until` (gifts NOTIFY until then)."""
    await tx.run(_MARK_WATCHED, live_id=live_id, until=until)


async def live_events_after(
    conn: AsyncConnection, live_id: str, after: int, limit: int
) -> list[LiveEventRecord]:
    """A LIVE's feed events after cursor `after`, in order (its primary key's order)."""
    rows = await conn.execute(
        select(
            live_events.c.seq,
            live_events.c.kind,
            live_events.c.sent_gift_id,
            live_events.c.sender_id,
            live_events.c.gift_id,
            live_events.c.count,
            live_events.c.coins,
            live_events.c.created_at,
            live_events.c.streak_id,
            live_events.c.streak_count,
            live_events.c.summary,
        )
        .where(live_events.c.live_id == live_id, live_events.c.seq > after)
        .order_by(live_events.c.seq)
        .limit(limit)
    )
    return [
        LiveEventRecord(
            int(seq),
            kind,
            gift,
            sender,
            gift_id,
            count,
            coins,
            utc(at),
            streak,
            streak_count,
            summary,
        )
        for seq, kind, gift, sender, gift_id, count, coins, at, streak, streak_count, summary in rows
    ]


@dataclass(frozen=True)
class StreakEnd:
    streak_id: str
    live_id: str
    sender_id: str
    gift_id: str
    count: int


_STREAK_COLUMNS = "streak_id, live_id, sender_id, gift_id, count"
_JOIN_STREAK = Statement(
    "gifting.join_streak",
    "INSERT INTO streaks (streak_id, live_id, sender_id, gift_id, count, last_at, ended_at) "
    "VALUES (:streak_id, :live_id, :sender_id, :gift_id, :count, :now, NULL) "
    "ON CONFLICT (live_id, sender_id, gift_id) WHERE ended_at IS NULL DO UPDATE "
    "SET count = streaks.count + excluded.count, last_at = excluded.last_at "
    "WHERE streaks.last_at >= :cutoff RETURNING streak_id, count",
)
"""Open a streak, or join the open one if its last send was within the pause (a concurrent send of
the same viewer and gift waits on the open-streak index and then joins); nothing if the open one
has paused (it must end first)."""
_END_OPEN_STREAK = Statement(
    "gifting.end_open_streak",
    "UPDATE streaks SET ended_at = :now WHERE live_id = :live_id AND sender_id = :sender_id "
    f"AND gift_id = :gift_id AND ended_at IS NULL RETURNING {_STREAK_COLUMNS}",
)
_END_DUE_STREAKS = Statement(
    "gifting.end_due_streaks",
    "UPDATE streaks SET ended_at = :now WHERE streak_id IN (SELECT streak_id FROM streaks "
    "WHERE ended_at IS NULL AND last_at < :cutoff ORDER BY last_at LIMIT :limit) "
    f"RETURNING {_STREAK_COLUMNS}",
    postgres="UPDATE streaks SET ended_at = :now WHERE streak_id IN (SELECT streak_id FROM streaks "
    "WHERE ended_at IS NULL AND last_at < :cutoff ORDER BY last_at LIMIT :limit "
    "FOR UPDATE SKIP LOCKED) "
    f"RETURNING {_STREAK_COLUMNS}",
)
_END_LIVE_STREAKS = Statement(
    "gifting.end_live_streaks",
    "UPDATE streaks SET ended_at = :now WHERE live_id = :live_id AND ended_at IS NULL "
    f"RETURNING {_STREAK_COLUMNS}",
)
_BUMP_SEQS = Statement(
    "gifting.bump_seqs",
    "UPDATE lives SET last_seq = last_seq + json_extract(value, '$[1]') FROM json_each(:rows) "
    "WHERE lives.live_id = json_extract(value, '$[0]') AND lives.ended_at IS NULL "
    "RETURNING live_id, last_seq",
    postgres="UPDATE lives SET last_seq = lives.last_seq + d.n "
    "FROM unnest(:live_ids::text[], :counts::bigint[]) AS d(live_id, n) "
    "WHERE lives.live_id = d.live_id AND lives.ended_at IS NULL "
    "RETURNING lives.live_id, lives.last_seq",
)
"""Take the next `n` feed numbers of each LIVE still on air (its last one returned)."""
_STREAK_ENDED_EVENTS = Statement(
    "gifting.streak_ended_events",
    "INSERT INTO live_events (live_id, seq, kind, sender_id, gift_id, count, created_at, "
    "streak_id, streak_count) SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
    "'streak_ended', json_extract(value, '$[2]'), json_extract(value, '$[3]'), "
    "json_extract(value, '$[4]'), :now, json_extract(value, '$[5]'), json_extract(value, '$[4]') "
    "FROM json_each(:rows) WHERE true",
    postgres="INSERT INTO live_events (live_id, seq, kind, sender_id, gift_id, count, created_at, "
    "streak_id, streak_count) SELECT e.live_id, e.seq, 'streak_ended', e.sender_id, e.gift_id, "
    "e.count, :now, e.streak_id, e.count FROM unnest(:live_ids::text[], :seqs::bigint[], "
    ":sender_ids::text[], :gift_ids::text[], :counts::bigint[], :streak_ids::text[]) "
    "AS e(live_id, seq, sender_id, gift_id, count, streak_id)",
)
_NOTIFY = Statement(
    "gifting.notify",
    "",
    postgres="SELECT pg_notify('live_feed', live_id) FROM lives "
    "WHERE live_id = ANY(:live_ids::text[]) AND watched_until > :now",
)


def _streak_ends(rows: Sequence[Sequence[Any]]) -> list[StreakEnd]:
    return [StreakEnd(str(i), str(lv), str(s), str(g), int(c)) for i, lv, s, g, c in rows]


async def extend_streak(
    tx: Tx,
    *,
    live_id: str,
    sender_id: str,
    gift_id: str,
    count: int,
    now: dt.datetime,
    cutoff: dt.datetime,
    new_streak_id: str,
) -> tuple[str, int, list[StreakEnd]]:
    """Add a send to the open streak of (LIVE, viewer, gift) if its last send was at `cutoff` or
    later; else end that streak (if the sweep has not yet) and open a new one. Returns (streak id,
    running count, the streaks it ended)."""
    keys = {"live_id": live_id, "sender_id": sender_id, "gift_id": gift_id}
    ended: list[StreakEnd] = []
    for _ in range(3):
        row = await tx.one(
            _JOIN_STREAK, streak_id=new_streak_id, count=count, now=now, cutoff=cutoff, **keys
        )
        if row is not None:
            return str(row[0]), int(row[1]), ended
        ended += _streak_ends(await tx.all(_END_OPEN_STREAK, now=now, **keys))
    raise RuntimeError(f"could not open a streak for {keys}")  # pragma: no cover - needs 3 races


async def end_due_streaks(
    tx: Tx, now: dt.datetime, cutoff: dt.datetime, limit: int
) -> list[StreakEnd]:
    """End up to `limit` streaks whose last send was before `cutoff` (with several replicas each
    takes rows the others skip)."""
    return _streak_ends(await tx.all(_END_DUE_STREAKS, now=now, cutoff=cutoff, limit=limit))


async def end_live_streaks(tx: Tx, live_id: str, now: dt.datetime) -> list[StreakEnd]:
    return _streak_ends(await tx.all(_END_LIVE_STREAKS, live_id=live_id, now=now))


async def feed_streak_ends(tx: Tx, ended: Sequence[StreakEnd], now: dt.datetime) -> set[str]:
    """Each ended streak's event in its LIVE's feed (none once the LIVE has ended); the LIVEs
    whose watchers are to be woken (on PostgreSQL, every replica's, at commit). A sweep ends
    hundreds at once: a few statements for all of them, not two round trips per streak."""
    if not ended:
        return set()
    by_live: dict[str, list[StreakEnd]] = {}
    for streak in sorted(ended, key=lambda s: (s.live_id, s.streak_id)):
        by_live.setdefault(streak.live_id, []).append(streak)
    lives_ = list(by_live)  # in id order
    if len(lives_) > 1 and tx.dialect == "postgresql":
        # Several LIVEs' rows, locked in id order as a delivery locks them (`LOCK_LIVES`).
        await tx.all(LOCK_LIVES, rows=lives_, live_ids=lives_)
    counts = [len(by_live[live]) for live in lives_]
    bumped = await tx.all(
        _BUMP_SEQS,
        rows=[[live, n] for live, n in zip(lives_, counts, strict=True)],
        live_ids=lives_,
        counts=counts,
    )
    rows: list[list[Any]] = []
    for live_id, last_seq in sorted((str(r[0]), int(r[1])) for r in bumped):
        streaks = by_live[live_id]
        first = last_seq - len(streaks) + 1
        for seq, streak in enumerate(streaks, start=first):
            rows.append(
                [live_id, seq, streak.sender_id, streak.gift_id, streak.count, streak.streak_id]
            )
    if not rows:
        return set()
    await tx.run(
        _STREAK_ENDED_EVENTS,
        rows=rows,
        now=now,
        live_ids=[r[0] for r in rows],
        seqs=[r[1] for r in rows],
        sender_ids=[r[2] for r in rows],
        gift_ids=[r[3] for r in rows],
        counts=[r[4] for r in rows],
        streak_ids=[r[5] for r in rows],
    )
    fed = {str(r[0]) for r in bumped}
    if tx.dialect == "postgresql":
        await tx.all(_NOTIFY, live_ids=sorted(fed), now=now)
    return fed
