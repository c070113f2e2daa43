"""Credits reversed (a gift's coins refunded after its credit) and the platform's revenue by day."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from runtime.sql import Statement, Tx

_CREDITS_OF_GIFTS = Statement(
    "payout.credits_of_gifts",
    "SELECT credit_key, creator_id, diamonds, matured_at IS NULL, reference, reversed_at IS NOT NULL "
    "FROM gift_credits WHERE reference IN (SELECT value FROM json_each(:references)) "
    "ORDER BY creator_id, credit_key",
    postgres="SELECT credit_key, creator_id, diamonds, matured_at IS NULL, reference, "
    "reversed_at IS NOT NULL FROM gift_credits WHERE reference = ANY(:references::text[]) "
    "ORDER BY creator_id, credit_key FOR UPDATE",
)


_MARK_REVERSED = Statement(
    "payout.mark_reversed",
    "UPDATE gift_credits SET reversed_at = :now, reversal_transaction_id = :transaction_id, "
    "matured_at = coalesce(matured_at, :now), reversal_seq = :seq "
    "WHERE credit_key = :credit_key AND reversed_at IS NULL",
)


_NEXT_REVERSAL_SEQS = Statement(
    "payout.next_reversal_seqs",
    "UPDATE reversal_sequence SET last = last + :n WHERE id = 1 RETURNING last",
)
"""The counter's row stays locked until the reversal commits: numbers commit in order."""


_REVERSED_CREDITS = Statement(
    "payout.reversed_credits",
    "SELECT reversal_seq, reference, creator_id, diamonds FROM gift_credits "
    "WHERE reversal_seq > :after ORDER BY reversal_seq LIMIT :limit",
)


@dataclass(frozen=True)
class CreditOfGift:
    credit_key: str
    creator_id: str
    diamonds: int
    pending: bool
    reference: str
    reversed: bool


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
        CreditOfGift(str(k), str(c), int(d), bool(p), str(r), bool(v)) for k, c, d, p, r, v in rows
    ]


async def next_reversal_seqs(tx: Tx, n: int) -> list[int]:
    """`n` new reversal numbers, higher than any committed before (see `_NEXT_REVERSAL_SEQS`)."""
    row = await tx.one(_NEXT_REVERSAL_SEQS, n=n)
    assert row is not None, "migration 0021 seeds the counter"
    last = int(row[0])
    return list(range(last - n + 1, last + 1))


async def mark_reversed(
    tx: Tx, credit_key: str, transaction_id: str, now: dt.datetime, seq: int
) -> bool:
    """Mark a credit reversed (and no longer pending) as reversal number `seq`; False if it was
    reversed already."""
    return (
        await tx.run(
            _MARK_REVERSED, credit_key=credit_key, transaction_id=transaction_id, now=now, seq=seq
        )
        == 1
    )


@dataclass(frozen=True)
class ReversedCreditRecord:
    sequence: int
    gift_id: str
    creator_id: str
    diamonds: int


async def reversed_credits(tx: Tx, after: int, limit: int) -> list[ReversedCreditRecord]:
    """The credits reversed after reversal number `after`, in number order (its unique index)."""
    rows = await tx.all(_REVERSED_CREDITS, after=after, limit=limit)
    return [ReversedCreditRecord(int(q), str(g or ""), str(c), int(d)) for q, g, c, d in rows]
