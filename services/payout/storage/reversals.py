"""Credits reversed (a gift's coins refunded after its credit) and the platform's revenue by day."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from runtime.sql import Statement, Tx
from services.payout.storage.credits import CreatorTotals, totals_of

_CREDIT_OF_GIFT_COLUMNS = (
    "credit_key, creator_id, diamonds, matured_at IS NULL, reference, reversed_at IS NOT NULL, "
    "coins, rate_segment, reversed_diamonds"
)


_CREDITS_OF_GIFTS = Statement(
    "payout.credits_of_gifts",
    f"SELECT {_CREDIT_OF_GIFT_COLUMNS} "
    "FROM gift_credits WHERE reference IN (SELECT value FROM json_each(:references)) "
    "ORDER BY creator_id, credit_key",
    postgres=f"SELECT {_CREDIT_OF_GIFT_COLUMNS} "
    "FROM gift_credits WHERE reference = ANY(:references::text[]) "
    "ORDER BY creator_id, credit_key FOR UPDATE",
)


_LOCK_TOTALS = Statement(
    "payout.lock_creator_totals",
    "SELECT creator_id, coins_received, diamonds_credited, rate_numerator, rate_denominator, "
    "coins_at_rate, diamonds_at_rate, rate_segment FROM creators "
    "WHERE creator_id IN (SELECT value FROM json_each(:creator_ids)) ORDER BY creator_id",
    postgres="SELECT creator_id, coins_received, diamonds_credited, rate_numerator, "
    "rate_denominator, coins_at_rate, diamonds_at_rate, rate_segment FROM creators "
    "WHERE creator_id = ANY(:creator_ids::text[]) ORDER BY creator_id FOR UPDATE",
)
"""In creator order, as a credit batch locks them (`accrue_coins_many`)."""


_TAKE_BACK = Statement(
    "payout.take_back_totals",
    "UPDATE creators SET coins_received = coins_received - :coins, "
    "diamonds_credited = diamonds_credited - :diamonds, "
    "coins_at_rate = coins_at_rate - :earlier_coins, "
    "diamonds_at_rate = diamonds_at_rate - :earlier_diamonds WHERE creator_id = :creator_id",
)
"""What earlier segments lose moves the current one's start down with it: it converts the same
coins as before."""


_CLOSED_SEGMENTS = Statement(
    "payout.closed_segments",
    "SELECT rate_segment, rate_numerator, rate_denominator, coins FROM closed_segments "
    "WHERE creator_id = :creator_id AND rate_segment IN (SELECT value FROM json_each(:segments))",
    postgres="SELECT rate_segment, rate_numerator, rate_denominator, coins FROM closed_segments "
    "WHERE creator_id = :creator_id AND rate_segment = ANY(:segments::integer[])",
)


_TAKE_OFF_CLOSED = Statement(
    "payout.take_off_closed_segment",
    "UPDATE closed_segments SET coins = coins - :coins "
    "WHERE creator_id = :creator_id AND rate_segment = :segment",
)


_MARK_REVERSED = Statement(
    "payout.mark_reversed",
    "UPDATE gift_credits SET reversed_at = :now, reversal_transaction_id = :transaction_id, "
    "matured_at = coalesce(matured_at, :now), reversal_seq = :seq, "
    "reversed_diamonds = :diamonds, reversed_coins = :coins "
    "WHERE credit_key = :credit_key AND reversed_at IS NULL",
)


_NEXT_REVERSAL_SEQS = Statement(
    "payout.next_reversal_seqs",
    "UPDATE reversal_sequence SET last = last + :n WHERE id = 1 RETURNING last",
)
"""The counter's row stays locked until the reversal commits: numbers commit in order."""


_REVERSED_CREDITS = Statement(
    "payout.reversed_credits",
    "SELECT reversal_seq, reference, creator_id, diamonds, coalesce(reversed_diamonds, diamonds) "
    "FROM gift_credits "
    "WHERE reversal_seq > :after ORDER BY reversal_seq LIMIT :limit",
)


@dataclass
class TakenBack:
    """What reversals take off a creator's totals: the coins and diamonds in all, those of them
    from ended segments, and each ended segment's coins."""

    coins: int = 0
    diamonds: int = 0
    earlier_coins: int = 0
    earlier_diamonds: int = 0
    closed: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class CreditOfGift:
    credit_key: str
    creator_id: str
    diamonds: int
    pending: bool
    reference: str
    reversed: bool
    coins: int
    segment: int | None
    """The creator's rate segment it was credited in (-1: credited under the rule before migration
    0033, reversed by its own share)."""
    reversed_diamonds: int | None
    """What its reversal took back (None: not reversed)."""


@dataclass(frozen=True)
class RevenueDay:
    day: str
    gifts: int
    coins: int
    diamonds: int
    gifts_value: int
    creators_value: int
    platform: int


_REVENUE_BY_DAY = Statement(
    "payout.revenue_by_day",
    "SELECT substr(created_at, 1, 10) AS day, count(*), sum(coins), sum(diamonds), "
    "sum(coins * coin_value_micros), sum(diamonds * diamond_value_micros), sum(platform_micros) "
    "FROM gift_credits WHERE created_at >= :since AND created_at < :until GROUP BY day ORDER BY day",
    postgres="SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, count(*), "
    "sum(coins), sum(diamonds), sum(coins * coin_value_micros), "
    "sum(diamonds * diamond_value_micros), sum(platform_micros) "
    "FROM gift_credits WHERE created_at >= :since AND created_at < :until GROUP BY day ORDER BY day",
)


async def revenue_by_day(tx: Tx, since: dt.datetime, until: dt.datetime) -> list[RevenueDay]:
    """The gift credits applied in [since, until), summed per UTC day (ix_gift_credits_day)."""
    rows = await tx.all(_REVENUE_BY_DAY, since=since, until=until)
    return [RevenueDay(str(day), *(int(v) for v in values)) for day, *values in rows]


async def credits_of_gifts(tx: Tx, references: Sequence[str]) -> list[CreditOfGift]:
    """The credits of these gifts, by creator (locked until the transaction ends, on PostgreSQL)."""
    rows = await tx.all(_CREDITS_OF_GIFTS, references=list(references))
    return [
        CreditOfGift(
            str(k),
            str(c),
            int(d),
            bool(p),
            str(r),
            bool(v),
            int(coins),
            None if segment is None else int(segment),
            None if taken is None else int(taken),
        )
        for k, c, d, p, r, v, coins, segment, taken in rows
    ]


async def lock_creator_totals(tx: Tx, creator_ids: Sequence[str]) -> dict[str, CreatorTotals]:
    """These creators' running totals, their rows locked (PostgreSQL) in creator order."""
    rows = await tx.all(_LOCK_TOTALS, creator_ids=sorted(creator_ids))
    return {str(row[0]): totals_of(row[1:]) for row in rows}


async def take_back(tx: Tx, creator_id: str, back: TakenBack) -> None:
    """Lower a creator's totals by reversed coins and the diamonds taken back for them, and their
    ended segments' coins."""
    if back.coins:
        await tx.run(
            _TAKE_BACK,
            creator_id=creator_id,
            coins=back.coins,
            diamonds=back.diamonds,
            earlier_coins=back.earlier_coins,
            earlier_diamonds=back.earlier_diamonds,
        )
    if back.closed:
        await tx.run_many(
            _TAKE_OFF_CLOSED,
            [
                {"creator_id": creator_id, "segment": segment, "coins": coins}
                for segment, coins in sorted(back.closed.items())
            ],
        )


async def closed_segments(
    tx: Tx, creator_id: str, segments: Sequence[int]
) -> dict[int, tuple[tuple[int, int], int]]:
    """These ended segments of a creator: number -> ((numerator, denominator), coins)."""
    if not segments:
        return {}
    rows = await tx.all(_CLOSED_SEGMENTS, creator_id=creator_id, segments=sorted(set(segments)))
    return {int(n): ((int(num), int(den)), int(coins)) for n, num, den, coins in rows}


async def next_reversal_seqs(tx: Tx, n: int) -> list[int]:
    """`n` new reversal numbers, higher than any committed before (see `_NEXT_REVERSAL_SEQS`)."""
    row = await tx.one(_NEXT_REVERSAL_SEQS, n=n)
    assert row is not None, "migration 0021 seeds the counter"
    last = int(row[0])
    return list(range(last - n + 1, last + 1))


async def mark_reversed(
    tx: Tx,
    credit_key: str,
    transaction_id: str,
    now: dt.datetime,
    seq: int,
    *,
    diamonds: int,
    coins: int,
) -> bool:
    """Mark a credit reversed (and no longer pending) as reversal number `seq`, with the `diamonds`
    taken back and the `coins` taken off its segment; False if it was reversed already."""
    return (
        await tx.run(
            _MARK_REVERSED,
            credit_key=credit_key,
            transaction_id=transaction_id,
            now=now,
            seq=seq,
            diamonds=diamonds,
            coins=coins,
        )
        == 1
    )


@dataclass(frozen=True)
class ReversedCreditRecord:
    sequence: int
    gift_id: str
    creator_id: str
    diamonds: int
    taken: int


async def reversed_credits(tx: Tx, after: int, limit: int) -> list[ReversedCreditRecord]:
    """The credits reversed after reversal number `after`, in number order (its unique index)."""
    rows = await tx.all(_REVERSED_CREDITS, after=after, limit=limit)
    return [
        ReversedCreditRecord(int(q), str(g or ""), str(c), int(d), int(t)) for q, g, c, d, t in rows
    ]
