"""Gift credits: stored once per request, accrued to their creators, matured when due."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.clock import utc
from runtime.sql import Statement, Tx
from services.payout.storage.tables import creators

_STORED_CREDITS = Statement(
    "payout.stored_credits",
    "SELECT credit_key, fingerprint, response, request_key FROM gift_credits "
    "WHERE credit_key IN (SELECT value FROM json_each(:keys)) "
    "OR request_key IN (SELECT value FROM json_each(:requests))",
    postgres="SELECT credit_key, fingerprint, response, request_key FROM gift_credits "
    "WHERE credit_key = ANY(:keys::text[]) OR request_key = ANY(:requests::text[])",
)


_ACCRUE = Statement(
    "payout.accrue_coins",
    "INSERT INTO creators (creator_id, coins_received, diamonds_credited, created_at) "
    "VALUES (:creator_id, :coins, 0, :now) ON CONFLICT (creator_id) DO UPDATE "
    "SET coins_received = creators.coins_received + excluded.coins_received "
    "RETURNING creator_id, coins_received, diamonds_credited, rate_numerator, rate_denominator, "
    "coins_at_rate, diamonds_at_rate, rate_segment",
)


_ACCRUE_MANY_PG = Statement(
    "payout.accrue_coins",
    "",
    postgres="INSERT INTO creators (creator_id, coins_received, diamonds_credited, created_at) "
    "SELECT c.creator_id, c.coins, 0, :now::timestamptz "
    "FROM unnest(:creator_ids::text[], :coins::bigint[]) AS c(creator_id, coins) "
    "ON CONFLICT (creator_id) DO UPDATE "
    "SET coins_received = creators.coins_received + excluded.coins_received "
    "RETURNING creator_id, coins_received, diamonds_credited, rate_numerator, rate_denominator, "
    "coins_at_rate, diamonds_at_rate, rate_segment",
)


_SET_CREDITED = Statement(
    "payout.set_diamonds_credited",
    "UPDATE creators SET diamonds_credited = :owed, rate_numerator = :numerator, "
    "rate_denominator = :denominator, coins_at_rate = :coins_at, diamonds_at_rate = :diamonds_at, "
    "rate_segment = :segment WHERE creator_id = :creator_id",
)


_SET_CREDITED_MANY_PG = Statement(
    "payout.set_diamonds_credited",
    "",
    postgres="UPDATE creators AS c SET diamonds_credited = d.owed, "
    "rate_numerator = :numerator::integer, rate_denominator = :denominator::integer, "
    "coins_at_rate = d.coins_at, diamonds_at_rate = d.diamonds_at, rate_segment = d.segment "
    "FROM unnest(:creator_ids::text[], :owed::bigint[], :coins_at::bigint[], "
    ":diamonds_at::bigint[], :segments::integer[]) "
    "AS d(creator_id, owed, coins_at, diamonds_at, segment) "
    "WHERE c.creator_id = d.creator_id",
)


_CLOSE_SEGMENT = Statement(
    "payout.close_segment",
    "INSERT INTO closed_segments (creator_id, rate_segment, rate_numerator, rate_denominator, "
    "coins) VALUES (:creator_id, :segment, :numerator, :denominator, :coins)",
)


_CREDIT_COLUMNS = (
    "credit_key, request_key, fingerprint, creator_id, coins, diamonds, transaction_id, response, "
    "reference, created_at, matured_at, rate_numerator, rate_denominator, coin_value_micros, "
    "diamond_value_micros, platform_micros, rate_segment"
)


_INSERT_CREDIT = Statement(
    "payout.insert_credit",
    f"INSERT INTO gift_credits ({_CREDIT_COLUMNS}) VALUES (:credit_key, :request_key, "
    ":fingerprint, :creator_id, "
    ":coins, :diamonds, :transaction_id, :response, :reference, :now, :matured_at, :numerator, "
    ":denominator, :coin_value, :diamond_value, :coins * :coin_value - :diamonds * :diamond_value, "
    ":segment) "
    "ON CONFLICT DO NOTHING",
)


_INSERT_CREDITS_PG = Statement(
    "payout.insert_credits",
    "",
    postgres=f"INSERT INTO gift_credits ({_CREDIT_COLUMNS}) "
    "SELECT c.key, c.request_key, c.fingerprint, c.creator_id, c.coins, c.diamonds, "
    "c.transaction_id, c.response, c.reference, :now::timestamptz, :matured_at::timestamptz, "
    ":numerator::integer, :denominator::integer, :coin_value::bigint, :diamond_value::bigint, "
    "c.coins * :coin_value::bigint - c.diamonds * :diamond_value::bigint, c.segment "
    "FROM unnest(:keys::text[], :request_keys::text[], "
    ":fingerprints::text[], :creator_ids::text[], :coins::bigint[], :diamonds::bigint[], "
    ":transaction_ids::text[], :responses::bytea[], :references::text[], :segments::integer[]) "
    "AS c(key, request_key, fingerprint, creator_id, coins, diamonds, transaction_id, response, "
    "reference, segment) "
    "ON CONFLICT DO NOTHING",
)


_MATURING_CREDITS = Statement(
    "payout.lock_maturing_credits",
    "SELECT credit_key, creator_id, diamonds FROM gift_credits "
    "WHERE matured_at IS NULL AND created_at <= :due ORDER BY created_at LIMIT :limit",
    postgres="SELECT credit_key, creator_id, diamonds FROM gift_credits "
    "WHERE matured_at IS NULL AND created_at <= :due ORDER BY created_at LIMIT :limit "
    "FOR UPDATE SKIP LOCKED",
)


_MARK_MATURED = Statement(
    "payout.mark_matured",
    "UPDATE gift_credits SET matured_at = :now "
    "WHERE credit_key IN (SELECT value FROM json_each(:keys))",
    postgres="UPDATE gift_credits SET matured_at = :now WHERE credit_key = ANY(:keys::text[])",
)


_NEXT_MATURING = Statement(
    "payout.next_maturing",
    "SELECT min(created_at) FROM gift_credits WHERE creator_id = :creator_id AND matured_at IS NULL",
)


@dataclass(frozen=True)
class CreditRow:
    """One applied gift credit: its request key, what it was, and the answer it got."""

    credit_key: str
    request_key: str
    fingerprint: str
    creator_id: str
    coins: int
    diamonds: int
    transaction_id: str | None
    response: bytes
    reference: str
    segment: int
    """The creator's rate segment it was credited in (`creators.rate_segment`)."""


@dataclass(frozen=True)
class StoredCredits:
    """What is on record for a batch's credits (one statement)."""

    answers: dict[str, tuple[str, bytes]]
    """Credits applied before, by credit key: (fingerprint, response)."""
    requests_taken: set[str]
    """Request keys already credited (to whichever creator)."""


async def stored_credits(tx: Tx, keys: Sequence[str], requests: Sequence[str]) -> StoredCredits:
    rows = await tx.all(_STORED_CREDITS, keys=list(keys), requests=list(requests))
    return StoredCredits(
        answers={str(row[0]): (str(row[1]), bytes(row[2])) for row in rows},
        requests_taken={str(row[3]) for row in rows if row[3] is not None},
    )


@dataclass(frozen=True)
class CreatorTotals:
    """A creator's running totals right after a batch's coins were added (see `creators`)."""

    coins_received: int
    diamonds_credited: int
    rate: tuple[int, int] | None
    """(numerator, denominator) of the current segment; None: not credited since migration 0020."""
    coins_at_rate: int
    diamonds_at_rate: int
    segment: int
    """The number of the current segment (`rate_segment`)."""


async def accrue_coins_many(
    tx: Tx, coins_by_creator: dict[str, int], now: dt.datetime
) -> dict[str, CreatorTotals]:
    """Add gift coins to creators' running totals (creating creators) in creator order, which is
    also the order their rows are locked in; returns each creator's totals after it."""
    creators_ = sorted(coins_by_creator)
    if tx.dialect == "postgresql":
        rows = await tx.all(
            _ACCRUE_MANY_PG,
            creator_ids=creators_,
            coins=[coins_by_creator[c] for c in creators_],
            now=now,
        )
    else:
        rows = [
            row
            for c in creators_
            if (row := await tx.one(_ACCRUE, creator_id=c, coins=coins_by_creator[c], now=now))
        ]
    return {str(row[0]): totals_of(row[1:]) for row in rows}


def totals_of(row: Sequence[Any]) -> CreatorTotals:
    """A creator's totals from (coins_received, diamonds_credited, rate_numerator,
    rate_denominator, coins_at_rate, diamonds_at_rate, rate_segment)."""
    received, credited, numerator, denominator, coins_at, diamonds_at, segment = row
    return CreatorTotals(
        int(received),
        int(credited),
        None if numerator is None else (int(numerator), int(denominator)),
        int(coins_at),
        int(diamonds_at),
        int(segment),
    )


async def set_diamonds_credited_many(
    tx: Tx,
    owed: dict[str, int],
    segments: dict[str, tuple[int, int, int]],
    rate: tuple[int, int],
) -> None:
    """Creators' diamonds credited in total, each with the segment (coins_at_rate,
    diamonds_at_rate, its number) its `rate` runs from."""
    numerator, denominator = rate
    creators_ = list(owed)
    if tx.dialect == "postgresql":
        await tx.run(
            _SET_CREDITED_MANY_PG,
            creator_ids=creators_,
            owed=[owed[c] for c in creators_],
            coins_at=[segments[c][0] for c in creators_],
            diamonds_at=[segments[c][1] for c in creators_],
            segments=[segments[c][2] for c in creators_],
            numerator=numerator,
            denominator=denominator,
        )
        return
    await tx.run_many(
        _SET_CREDITED,
        [
            {
                "creator_id": creator_id,
                "owed": owed[creator_id],
                "numerator": numerator,
                "denominator": denominator,
                "coins_at": segments[creator_id][0],
                "diamonds_at": segments[creator_id][1],
                "segment": segments[creator_id][2],
            }
            for creator_id in creators_
        ],
    )


@dataclass(frozen=True)
class ClosedSegment:
    """A creator's rate segment that a new one follows: its rate and the coins it converted."""

    creator_id: str
    segment: int
    numerator: int
    denominator: int
    coins: int


async def close_segments(tx: Tx, ended: Sequence[ClosedSegment]) -> None:
    """Keep segments that ended (rare: a creator's first credit after a rate change)."""
    await tx.run_many(_CLOSE_SEGMENT, [segment.__dict__ for segment in ended])


@dataclass(frozen=True)
class Rates:
    """The conversion policy a credit is applied at, kept with it."""

    numerator: int
    denominator: int
    """Diamonds per coin: numerator / denominator."""
    coin_value: int
    diamond_value: int
    """What a coin and a diamond are worth, in millionths of the currency unit."""


async def insert_credits(
    tx: Tx, rows: Sequence[CreditRow], now: dt.datetime, *, matured: bool, rates: Rates
) -> int:
    """Record applied credits, pending (or `matured` at once), each with the rates it was applied
    at and the platform's share; returns how many were new (fewer: a concurrent twin applied
    some)."""
    matured_at = now if matured else None
    snapshot = rates.__dict__
    if tx.dialect == "postgresql":
        return await tx.run(
            _INSERT_CREDITS_PG,
            keys=[r.credit_key for r in rows],
            request_keys=[r.request_key for r in rows],
            fingerprints=[r.fingerprint for r in rows],
            creator_ids=[r.creator_id for r in rows],
            coins=[r.coins for r in rows],
            diamonds=[r.diamonds for r in rows],
            transaction_ids=[r.transaction_id for r in rows],
            responses=[r.response for r in rows],
            references=[r.reference for r in rows],
            segments=[r.segment for r in rows],
            now=now,
            matured_at=matured_at,
            **snapshot,
        )
    return await tx.run_many(
        _INSERT_CREDIT,
        [{**r.__dict__, "now": now, "matured_at": matured_at, **snapshot} for r in rows],
    )


async def lock_maturing_credits(tx: Tx, due: dt.datetime, limit: int) -> list[tuple[str, str, int]]:
    """Pending credits made at or before `due`, oldest first: (key, creator, diamonds). On
    PostgreSQL they stay locked until the transaction ends, and a concurrent sweep (another
    replica) skips them."""
    rows = await tx.all(_MATURING_CREDITS, due=due, limit=limit)
    return [(str(k), str(c), int(d)) for k, c, d in rows]


async def mark_matured(tx: Tx, keys: Sequence[str], now: dt.datetime) -> None:
    await tx.run(_MARK_MATURED, keys=list(keys), now=now)


async def next_maturing(tx: Tx, creator_id: str) -> dt.datetime | None:
    """When the creator's oldest pending credit was made (None: nothing pending)."""
    row = await tx.one(_NEXT_MATURING, creator_id=creator_id)
    if row is None or row[0] is None:
        return None
    value = row[0]
    return utc(value)  # a datetime, or text from SQLite's driver


async def creator_exists(conn: AsyncConnection, creator_id: str) -> bool:
    found = await conn.scalar(
        select(creators.c.creator_id).where(creators.c.creator_id == creator_id)
    )
    return found is not None
