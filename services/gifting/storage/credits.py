"""The credit outbox: due credits claimed and delivered (into the rankings), failed attempts,
parked credits; its gauges."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.clock import utc
from runtime.sql import Statement, Tx
from services.gifting.storage.live_feed import LOCK_LIVES
from services.gifting.storage.tables import creator_gifters, creator_rankings, credit_outbox


@dataclass(frozen=True)
class OutboxRecord:
    outbox_id: int
    sent_gift_id: str
    creator_id: str
    coins: int
    traceparent: str
    attempts: int


_CLAIM_DUE_CREDITS = Statement(
    "gifting.claim_due_credits",
    "UPDATE credit_outbox SET next_attempt_at = :lease_until WHERE outbox_id IN ("
    "SELECT outbox_id FROM credit_outbox WHERE delivered_at IS NULL AND NOT dead "
    "AND next_attempt_at <= :now ORDER BY outbox_id LIMIT :limit) "
    "RETURNING outbox_id, sent_gift_id, creator_id, coins, traceparent, attempts",
    postgres="UPDATE credit_outbox SET next_attempt_at = :lease_until WHERE outbox_id IN ("
    "SELECT outbox_id FROM credit_outbox WHERE delivered_at IS NULL AND NOT dead "
    "AND next_attempt_at <= :now ORDER BY outbox_id LIMIT :limit FOR UPDATE SKIP LOCKED) "
    "RETURNING outbox_id, sent_gift_id, creator_id, coins, traceparent, attempts",
)
"""Claim a batch of due credits for one relay until `lease_until` (pushing their next attempt
there): with several gifting replicas each takes rows the others have not (SKIP LOCKED), and a
relay that dies mid-delivery leaves its batch to be retried after the lease."""
_MARK_DELIVERED = Statement(
    "gifting.mark_delivered",
    "UPDATE credit_outbox SET delivered_at = :now, attempts = attempts + 1 "
    "WHERE outbox_id IN (SELECT value FROM json_each(:outbox_ids)) AND delivered_at IS NULL "
    "RETURNING sent_gift_id",
    postgres="UPDATE credit_outbox SET delivered_at = :now, attempts = attempts + 1 "
    "WHERE outbox_id = ANY(:outbox_ids::bigint[]) AND delivered_at IS NULL RETURNING sent_gift_id",
)
_CREDITED_GIFTS = Statement(
    "gifting.credited_gifts",
    "SELECT creator_id, sender_id, coins, created_at, live_id, sent_gift_id FROM sent_gifts "
    "WHERE sent_gift_id IN (SELECT value FROM json_each(:sent_gift_ids)) AND status <> 'reversed'",
    postgres="SELECT creator_id, sender_id, coins, created_at, live_id, sent_gift_id "
    "FROM sent_gifts WHERE sent_gift_id = ANY(:sent_gift_ids::text[]) AND status <> 'reversed'",
)
"""A gift reversed before its credit's delivery was acknowledged never joins the rankings."""


_ADD_DIAMONDS_EARNED = Statement(
    "gifting.add_diamonds_earned",
    "UPDATE lives SET diamonds_earned = diamonds_earned + json_extract(value, '$[1]') "
    "FROM json_each(:rows) WHERE lives.live_id = json_extract(value, '$[0]')",
    postgres="UPDATE lives SET diamonds_earned = diamonds_earned + d.diamonds "
    "FROM unnest(:live_ids::text[], :amounts::bigint[]) AS d(live_id, diamonds) "
    "WHERE lives.live_id = d.live_id",
)
_ADD_TO_RANKINGS = Statement(
    "gifting.add_to_rankings",
    "INSERT INTO creator_rankings (period, period_key, creator_id, coins) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), "
    "json_extract(value, '$[3]') FROM json_each(:rows) WHERE true "
    "ON CONFLICT (period, period_key, creator_id) "
    "DO UPDATE SET coins = creator_rankings.coins + excluded.coins",
    postgres="INSERT INTO creator_rankings (period, period_key, creator_id, coins) "
    "SELECT * FROM unnest(:periods::text[], :keys::text[], :creators::text[], :amounts::bigint[]) "
    "ON CONFLICT (period, period_key, creator_id) "
    "DO UPDATE SET coins = creator_rankings.coins + excluded.coins",
)
_ADD_TO_GIFTERS = Statement(
    "gifting.add_to_creator_gifters",
    "INSERT INTO creator_gifters (creator_id, sender_id, coins) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]') "
    "FROM json_each(:rows) WHERE true ON CONFLICT (creator_id, sender_id) "
    "DO UPDATE SET coins = creator_gifters.coins + excluded.coins",
    postgres="INSERT INTO creator_gifters (creator_id, sender_id, coins) "
    "SELECT * FROM unnest(:creators::text[], :senders::text[], :amounts::bigint[]) "
    "ON CONFLICT (creator_id, sender_id) "
    "DO UPDATE SET coins = creator_gifters.coins + excluded.coins",
)


def period_keys(at: dt.datetime) -> dict[str, str]:
    """The ranking periods a moment belongs to: its UTC day, its ISO week, all time."""
    day = at.astimezone(dt.UTC).date()
    year, week, _ = day.isocalendar()
    return {"day": day.isoformat(), "week": f"{year}-W{week:02d}", "all": "all"}


async def claim_due_credits(
    tx: Tx, now: dt.datetime, limit: int, lease_until: dt.datetime
) -> list[OutboxRecord]:
    """Undelivered credits whose next attempt is due, oldest first (the outbox's partial index),
    claimed by this relay until `lease_until` (`_CLAIM_DUE_CREDITS`)."""
    rows = await tx.all(_CLAIM_DUE_CREDITS, now=now, limit=limit, lease_until=lease_until)
    records = [
        OutboxRecord(int(r[0]), str(r[1]), str(r[2]), int(r[3]), str(r[4]), int(r[5])) for r in rows
    ]
    return sorted(records, key=lambda r: r.outbox_id)


async def mark_delivered(
    tx: Tx,
    credits: Sequence[OutboxRecord],
    now: dt.datetime,
    diamonds: Mapping[str, int] | None = None,
) -> int:
    """Payout acknowledged these credits: their outbox rows are done, so their gifts read `credited`,
    their coins join the rankings and the `diamonds` payout credited for each (by sent gift id) join
    its LIVE's, each credit once (one marked by another delivery is skipped). A batch adds one row
    per (period, creator), per (creator, gifter) and per LIVE. Returns how many it marked."""
    marked = await tx.all(_MARK_DELIVERED, outbox_ids=[c.outbox_id for c in credits], now=now)
    if not marked:
        return 0
    gifts = await tx.all(_CREDITED_GIFTS, sent_gift_ids=[str(row[0]) for row in marked])
    ranked: dict[tuple[str, str, str], int] = {}
    gifters: dict[tuple[str, str], int] = {}
    earned: dict[str, int] = {}
    for *_, live_id, sent_gift_id in gifts:
        if live_id and diamonds and diamonds.get(sent_gift_id):
            earned[live_id] = earned.get(live_id, 0) + diamonds[sent_gift_id]
    if earned:
        earned = dict(sorted(earned.items()))
        if len(earned) > 1 and tx.dialect == "postgresql":
            await tx.all(LOCK_LIVES, rows=list(earned), live_ids=list(earned))
        await tx.run(
            _ADD_DIAMONDS_EARNED,
            rows=[[live, n] for live, n in earned.items()],
            live_ids=list(earned),
            amounts=list(earned.values()),
        )
    for creator, sender, coins, created, *_ in gifts:
        for period, key in period_keys(utc(created)).items():
            ranked[period, key, creator] = ranked.get((period, key, creator), 0) + int(coins)
        gifters[creator, sender] = gifters.get((creator, sender), 0) + int(coins)
    await add_to_rankings(tx, ranked, gifters)
    return len(marked)


async def add_to_rankings(
    tx: Tx, ranked: Mapping[tuple[str, str, str], int], gifters: Mapping[tuple[str, str], int]
) -> None:
    """Add coins (negative: take them off) to the rankings, by (period, period key, creator), and
    to the creators' top gifters, by (creator, sender): one statement each, upserted in key order,
    so that two transactions (two replicas) lock shared rows alike."""
    rows = [[p, k, c, n] for (p, k, c), n in sorted(ranked.items())]
    await tx.run(
        _ADD_TO_RANKINGS,
        rows=rows,
        periods=[r[0] for r in rows],
        keys=[r[1] for r in rows],
        creators=[r[2] for r in rows],
        amounts=[r[3] for r in rows],
    )
    pairs = [[c, s, n] for (c, s), n in sorted(gifters.items())]
    await tx.run(
        _ADD_TO_GIFTERS,
        rows=pairs,
        creators=[r[0] for r in pairs],
        senders=[r[1] for r in pairs],
        amounts=[r[2] for r in pairs],
    )


async def creator_rankings_page(
    conn: AsyncConnection,
    period: str,
    key: str,
    *,
    limit: int,
    after: tuple[int, str] | None,
) -> list[tuple[str, int]]:
    """(creator, coins) of a period, most coins first, ties by creator id."""
    t = creator_rankings
    query = (
        select(t.c.creator_id, t.c.coins)
        .where(t.c.period == period, t.c.period_key == key)
        .order_by(t.c.coins.desc(), t.c.creator_id)
        .limit(limit)
    )
    if after is not None:
        coins, creator = after
        query = query.where(
            (t.c.coins < coins) | ((t.c.coins == coins) & (t.c.creator_id > creator))
        )
    return [(row.creator_id, int(row.coins)) for row in (await conn.execute(query)).all()]


async def creator_gifters_page(
    conn: AsyncConnection, creator_id: str, *, limit: int, after: tuple[int, str] | None
) -> list[tuple[str, int]]:
    """(sender, coins) of a creator's gifters, most coins first, ties by sender id."""
    t = creator_gifters
    query = (
        select(t.c.sender_id, t.c.coins)
        .where(t.c.creator_id == creator_id)
        .order_by(t.c.coins.desc(), t.c.sender_id)
        .limit(limit)
    )
    if after is not None:
        coins, sender = after
        query = query.where((t.c.coins < coins) | ((t.c.coins == coins) & (t.c.sender_id > sender)))
    return [(row.sender_id, int(row.coins)) for row in (await conn.execute(query)).all()]


_MARK_FAILED = (
    update(credit_outbox)
    .where(credit_outbox.c.outbox_id == bindparam("failed_id"))
    .values(
        attempts=credit_outbox.c.attempts + 1,
        next_attempt_at=bindparam("retry_at"),
        last_error=bindparam("error"),
        dead=bindparam("dead"),
    )
)


async def mark_failed_attempts(
    conn: AsyncConnection, retry_at: dict[int, dt.datetime], *, error: str, dead: bool
) -> None:
    """A failed delivery's credits (outbox id -> when to try again), in one statement (executemany):
    an outage's every retry of a 500-credit batch wrote 500 statements, each a span in the first
    gift's trace."""
    await conn.execute(
        _MARK_FAILED,
        [
            {"failed_id": outbox_id, "retry_at": when, "error": error[:256], "dead": dead}
            for outbox_id, when in retry_at.items()
        ],
    )


@dataclass(frozen=True)
class ParkedCreditRecord:
    outbox_id: int
    sent_gift_id: str
    creator_id: str
    coins: int
    attempts: int
    last_error: str
    created_at: dt.datetime


async def parked_credits(
    conn: AsyncConnection, *, limit: int, after_outbox_id: int | None
) -> list[ParkedCreditRecord]:
    """Credits parked for an operator, oldest first (partial index ix_credit_outbox_parked)."""
    query = (
        select(
            credit_outbox.c.outbox_id,
            credit_outbox.c.sent_gift_id,
            credit_outbox.c.creator_id,
            credit_outbox.c.coins,
            credit_outbox.c.attempts,
            credit_outbox.c.last_error,
            credit_outbox.c.created_at,
        )
        .where(credit_outbox.c.dead, credit_outbox.c.delivered_at.is_(None))
        .order_by(credit_outbox.c.outbox_id)
        .limit(limit)
    )
    if after_outbox_id is not None:
        query = query.where(credit_outbox.c.outbox_id > after_outbox_id)
    return [
        ParkedCreditRecord(
            int(r.outbox_id),
            r.sent_gift_id,
            r.creator_id,
            int(r.coins),
            int(r.attempts),
            r.last_error,
            utc(r.created_at),
        )
        for r in await conn.execute(query)
    ]


async def unpark_credits(
    conn: AsyncConnection, sent_gift_ids: Sequence[str], now: dt.datetime
) -> set[str]:
    """Put these gifts' parked credits back on the outbox, due now; returns the gifts whose credits
    were parked."""
    result = await conn.execute(
        update(credit_outbox)
        .where(
            credit_outbox.c.sent_gift_id.in_(sent_gift_ids),
            credit_outbox.c.dead,
            credit_outbox.c.delivered_at.is_(None),
        )
        .values(dead=False, next_attempt_at=now)
        .returning(credit_outbox.c.sent_gift_id)
    )
    return {str(row[0]) for row in result}


_GAUGE_OUTBOX = Statement(
    "gifting.gauge_outbox",
    "SELECT COUNT(*), MIN(created_at) FROM credit_outbox "
    "WHERE delivered_at IS NULL AND NOT dead",  # ix_credit_outbox_pending
)
_GAUGE_PARKED = Statement(
    "gifting.gauge_parked",
    "SELECT COUNT(*) FROM credit_outbox WHERE dead AND delivered_at IS NULL",  # ..._parked
)
_GAUGE_PENDING_GIFTS = Statement(
    "gifting.gauge_pending_gifts",
    "SELECT COUNT(*) FROM sent_gifts WHERE status = 'pending'",  # ix_sent_gifts_status_created
)


@dataclass(frozen=True)
class OutboxGauges:
    backlog: int
    oldest: dt.datetime | None
    parked: int
    pending_gifts: int


async def outbox_gauges(tx: Tx) -> OutboxGauges:
    """Credits waiting for delivery (and since when), parked credits, gifts not yet settled."""
    backlog = await tx.one(_GAUGE_OUTBOX)
    parked = await tx.one(_GAUGE_PARKED)
    pending = await tx.one(_GAUGE_PENDING_GIFTS)
    assert backlog is not None and parked is not None and pending is not None
    return OutboxGauges(
        int(backlog[0]),
        utc(backlog[1]) if backlog[1] is not None else None,
        int(parked[0]),
        int(pending[0]),
    )
