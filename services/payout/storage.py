"""Payout tables and their SQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    Row,
    String,
    Table,
    Text,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.clock import utc
from runtime.db import lock_name, upsert
from runtime.sql import Statement, Tx

metadata = MetaData()

creators = Table(
    "creators",
    metadata,
    Column("creator_id", String(64), primary_key=True),
    Column("coins_received", BigInteger, nullable=False),
    Column("diamonds_credited", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("rate_numerator", Integer),
    Column("rate_denominator", Integer),
    Column("coins_at_rate", BigInteger, nullable=False, server_default="0"),
    Column("diamonds_at_rate", BigInteger, nullable=False, server_default="0"),
)
"""A creator's running totals. The rate of their current segment (migration 0020; none yet for a
creator not credited since) applies from `coins_at_rate` received, when `diamonds_at_rate` had been
credited."""

withdrawals = Table(
    "withdrawals",
    metadata,
    Column("withdrawal_id", String(40), primary_key=True),
    Column("creator_id", String(64), nullable=False),
    Column("diamonds", BigInteger, nullable=False),
    Column("gross_minor", BigInteger, nullable=False),
    Column("fee_minor", BigInteger, nullable=False),
    Column("currency_code", String(3), nullable=False),
    Column("method", String(16), nullable=False),
    Column("destination_token", String(256), nullable=False),
    Column("status", String(16), nullable=False),
    Column("failure_reason", String(128), nullable=False),
    Column("processor_reference", String(128)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("last_error", String(256), nullable=False),
    Column("method_id", String(40)),
    Column("hold_id", String(40)),
    Column("submitted_at", DateTime(timezone=True)),
    Column("parked_at", DateTime(timezone=True)),
    Column("leased_until", DateTime(timezone=True)),
    Column("sender_batch_id", String(64)),
)
"""A withdrawal holds its diamonds (`hold_id`, a ledger hold; migration 0014) from its request to
its ending; `submitted_at`: first sent to the processor (in batch `sender_batch_id`); `parked_at`:
given up on until an admin retries it; `leased_until`: a worker of some replica works it until
then; `next_attempt_at`: when it is next due (a poll, a retry after a pause)."""

ON_ITS_WAY = ("requested", "in_review", "approved", "processing")
"""Statuses of a withdrawal whose diamonds are held."""
NOT_COUNTED = ("failed", "rejected", "cancelled", "returned")
"""Endings whose money never left (or came back): they do not count against the daily cap."""
ENDINGS = ("paid", *NOT_COUNTED)
"""Where a withdrawal ends (a paid one may still move on to returned)."""

withdrawal_events = Table(
    "withdrawal_events",
    metadata,
    Column("withdrawal_id", String(40), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("status", String(16), nullable=False),
    Column("actor", String(64), nullable=False),
    Column("reason", String(256), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
"""Every status a withdrawal went through (migration 0014)."""

processor_events = Table(
    "processor_events",
    metadata,
    Column("event_id", String(128), primary_key=True),
    Column("item_reference", String(128), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)
"""Processor callbacks handled, by their event id: a redelivered one changes nothing."""

reconciliation_runs = Table(
    "reconciliation_runs",
    metadata,
    Column("run_id", String(40), primary_key=True),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("checked", BigInteger, nullable=False),
    Column("report", Text, nullable=False),
)
"""Reconciliation reports (the mismatches as JSON), newest by `started_at`."""

payout_methods = Table(
    "payout_methods",
    metadata,
    Column("method_id", String(40), primary_key=True),
    Column("creator_id", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("destination_token", String(256), nullable=False),
    Column("display", String(128), nullable=False),
    Column("is_default", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("removed_at", DateTime(timezone=True)),
)
"""Where a creator's withdrawals go (migration 0013); removed ones are kept for the history."""

creator_verifications = Table(
    "creator_verifications",
    metadata,
    Column("creator_id", String(64), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("reason", String(256), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("time_zone", String(64), nullable=False, server_default="UTC"),
)
"""KYC status per creator, set by admins; a creator without a row is unverified. The time zone
(migration 0014) sets the calendar day of the daily withdrawal cap."""

gift_credits = Table(
    "gift_credits",
    metadata,
    Column("credit_key", String(320), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("creator_id", String(64), nullable=False),
    Column("coins", BigInteger, nullable=False),
    Column("diamonds", BigInteger, nullable=False),
    Column("transaction_id", String(40)),
    Column("response", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("matured_at", DateTime(timezone=True)),
    Column("reference", String(128)),
    Column("reversed_at", DateTime(timezone=True)),
    Column("reversal_transaction_id", String(40)),
    Column("rate_numerator", Integer, nullable=False),
    Column("rate_denominator", Integer, nullable=False),
    Column("coin_value_micros", BigInteger, nullable=False),
    Column("diamond_value_micros", BigInteger, nullable=False),
    Column("platform_micros", BigInteger, nullable=False),
    Column("reversal_seq", BigInteger),
    Column("request_key", String(320)),
)
"""One row per applied gift credit (migration 0007): the exactly-once record and its answer; its
diamonds are pending until `matured_at` (migration 0011); the rates it was converted at and the
platform's share, coins x coin value - diamonds x diamond value, in millionths (migration 0016).
`credit_key` names the creator, `request_key` (unique, migration 0026) does not: one request id is
one creator's credit."""


@dataclass(frozen=True)
class WithdrawalRecord:
    withdrawal_id: str
    creator_id: str
    diamonds: int
    gross_minor: int
    fee_minor: int
    currency_code: str
    method: str
    destination_token: str
    status: str
    failure_reason: str
    processor_reference: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    attempts: int = 0
    """Processor calls that failed (timed out, errored) so far."""
    next_attempt_at: dt.datetime | None = None
    last_error: str = ""
    method_id: str | None = None
    """The registered payout method it pays (None: a one-off destination)."""
    hold_id: str | None = None
    """The ledger hold on its diamonds (None: accepted before holds; its diamonds are in the
    in-flight account)."""
    submitted_at: dt.datetime | None = None
    parked_at: dt.datetime | None = None
    leased_until: dt.datetime | None = None
    sender_batch_id: str | None = None

    @property
    def net_minor(self) -> int:
        return self.gross_minor - self.fee_minor


def _withdrawal(row: object) -> WithdrawalRecord:
    data = row._asdict()  # type: ignore[attr-defined]
    data["created_at"] = utc(data["created_at"])
    data["updated_at"] = utc(data["updated_at"])
    for name in ("next_attempt_at", "submitted_at", "parked_at", "leased_until"):
        if data[name] is not None:
            data[name] = utc(data[name])
    return WithdrawalRecord(**data)


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
    "coins_at_rate, diamonds_at_rate",
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
    "coins_at_rate, diamonds_at_rate",
)
_SET_CREDITED = Statement(
    "payout.set_diamonds_credited",
    "UPDATE creators SET diamonds_credited = :owed, rate_numerator = :numerator, "
    "rate_denominator = :denominator, coins_at_rate = :coins_at, diamonds_at_rate = :diamonds_at "
    "WHERE creator_id = :creator_id",
)
_SET_CREDITED_MANY_PG = Statement(
    "payout.set_diamonds_credited",
    "",
    postgres="UPDATE creators AS c SET diamonds_credited = d.owed, "
    "rate_numerator = :numerator::integer, rate_denominator = :denominator::integer, "
    "coins_at_rate = d.coins_at, diamonds_at_rate = d.diamonds_at "
    "FROM unnest(:creator_ids::text[], :owed::bigint[], :coins_at::bigint[], "
    ":diamonds_at::bigint[]) AS d(creator_id, owed, coins_at, diamonds_at) "
    "WHERE c.creator_id = d.creator_id",
)
_CREDIT_COLUMNS = (
    "credit_key, request_key, fingerprint, creator_id, coins, diamonds, transaction_id, response, "
    "reference, created_at, matured_at, rate_numerator, rate_denominator, coin_value_micros, "
    "diamond_value_micros, platform_micros"
)
_INSERT_CREDIT = Statement(
    "payout.insert_credit",
    f"INSERT INTO gift_credits ({_CREDIT_COLUMNS}) VALUES (:credit_key, :request_key, "
    ":fingerprint, :creator_id, "
    ":coins, :diamonds, :transaction_id, :response, :reference, :now, :matured_at, :numerator, "
    ":denominator, :coin_value, :diamond_value, :coins * :coin_value - :diamonds * :diamond_value) "
    "ON CONFLICT DO NOTHING",
)
_INSERT_CREDITS_PG = Statement(
    "payout.insert_credits",
    "",
    postgres=f"INSERT INTO gift_credits ({_CREDIT_COLUMNS}) "
    "SELECT c.*, :now::timestamptz, :matured_at::timestamptz, :numerator::integer, "
    ":denominator::integer, :coin_value::bigint, :diamond_value::bigint, "
    "c.coins * :coin_value::bigint - c.diamonds * :diamond_value::bigint "
    "FROM unnest(:keys::text[], :request_keys::text[], "
    ":fingerprints::text[], :creator_ids::text[], :coins::bigint[], :diamonds::bigint[], "
    ":transaction_ids::text[], :responses::bytea[], :references::text[]) "
    "AS c(key, request_key, fingerprint, creator_id, coins, diamonds, transaction_id, response, "
    "reference) "
    "ON CONFLICT DO NOTHING",
)
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
_DUE_CREDITS = Statement(
    "payout.due_credits",
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
_WITHDRAWAL_TOTALS = Statement(
    "payout.withdrawal_totals",
    "SELECT coalesce(sum(CASE WHEN status IN ('requested', 'in_review', 'approved', 'processing') "
    "THEN diamonds ELSE 0 END), "
    "0), coalesce(sum(CASE WHEN status = 'paid' THEN diamonds ELSE 0 END), 0) "
    "FROM withdrawals WHERE creator_id = :creator_id",
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
    return {
        str(creator): CreatorTotals(
            int(received),
            int(credited),
            None if numerator is None else (int(numerator), int(denominator)),
            int(coins_at),
            int(diamonds_at),
        )
        for creator, received, credited, numerator, denominator, coins_at, diamonds_at in rows
    }


async def set_diamonds_credited_many(
    tx: Tx, owed: dict[str, int], segments: dict[str, tuple[int, int]], rate: tuple[int, int]
) -> None:
    """Creators' diamonds credited in total, each with the segment (coins_at_rate,
    diamonds_at_rate) its `rate` runs from."""
    numerator, denominator = rate
    creators_ = list(owed)
    if tx.dialect == "postgresql":
        await tx.run(
            _SET_CREDITED_MANY_PG,
            creator_ids=creators_,
            owed=[owed[c] for c in creators_],
            coins_at=[segments[c][0] for c in creators_],
            diamonds_at=[segments[c][1] for c in creators_],
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
            }
            for creator_id in creators_
        ],
    )


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
            now=now,
            matured_at=matured_at,
            **snapshot,
        )
    return await tx.run_many(
        _INSERT_CREDIT,
        [{**r.__dict__, "now": now, "matured_at": matured_at, **snapshot} for r in rows],
    )


async def claim_due_credits(tx: Tx, due: dt.datetime, limit: int) -> list[tuple[str, str, int]]:
    """Pending credits made at or before `due`, oldest first: (key, creator, diamonds). On
    PostgreSQL they stay locked until the transaction ends, and a concurrent sweep (another
    replica) skips them."""
    rows = await tx.all(_DUE_CREDITS, due=due, limit=limit)
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


async def withdrawal_totals(tx: Tx, creator_id: str) -> tuple[int, int]:
    """(diamonds in withdrawals on their way out, diamonds paid out) of a creator."""
    row = await tx.one(_WITHDRAWAL_TOTALS, creator_id=creator_id)
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


async def creator_exists(conn: AsyncConnection, creator_id: str) -> bool:
    found = await conn.scalar(
        select(creators.c.creator_id).where(creators.c.creator_id == creator_id)
    )
    return found is not None


async def insert_withdrawal(conn: AsyncConnection, withdrawal: WithdrawalRecord) -> None:
    await conn.execute(withdrawals.insert().values(**withdrawal.__dict__))


async def get_withdrawal(conn: AsyncConnection, withdrawal_id: str) -> WithdrawalRecord | None:
    row = (
        await conn.execute(select(withdrawals).where(withdrawals.c.withdrawal_id == withdrawal_id))
    ).first()
    return None if row is None else _withdrawal(row)


async def withdrawn_since(conn: AsyncConnection, creator_id: str, since: dt.datetime) -> int:
    """Gross cash of a creator's withdrawals since `since`, but for those whose money never left
    or came back (for the daily cap)."""
    total = await conn.scalar(
        select(func.coalesce(func.sum(withdrawals.c.gross_minor), 0)).where(
            withdrawals.c.creator_id == creator_id,
            withdrawals.c.created_at >= since,
            withdrawals.c.status.not_in(NOT_COUNTED),
        )
    )
    return int(total or 0)


async def list_withdrawals(
    conn: AsyncConnection,
    creator_id: str,
    *,
    limit: int,
    before: tuple[dt.datetime, str] | None,
) -> list[WithdrawalRecord]:
    query = (
        select(withdrawals)
        .where(withdrawals.c.creator_id == creator_id)
        .order_by(withdrawals.c.created_at.desc(), withdrawals.c.withdrawal_id.desc())
        .limit(limit)
    )
    if before is not None:
        at, withdrawal_id = before
        query = query.where(
            (withdrawals.c.created_at < at)
            | ((withdrawals.c.created_at == at) & (withdrawals.c.withdrawal_id < withdrawal_id))
        )
    return [_withdrawal(row) for row in (await conn.execute(query)).all()]


def _due(now: dt.datetime) -> tuple[ColumnElement[bool], ...]:
    """Due for the worker: not parked, its pause over, no live lease."""
    return (
        withdrawals.c.parked_at.is_(None),
        (withdrawals.c.next_attempt_at.is_(None)) | (withdrawals.c.next_attempt_at <= now),
        (withdrawals.c.leased_until.is_(None)) | (withdrawals.c.leased_until <= now),
    )


FOLLOWED_BY_THE_WORKER = ("approved", "processing")
"""The statuses whose withdrawals the processor worker sends or follows until they end
(`due_withdrawals`). A paid one is only looked up again for a return, every
`PAYOUT_RETURN_POLL_SECONDS` for `PAYOUT_RETURN_WATCH_DAYS` (its `next_attempt_at`, migration
0025); a return's callback usually comes first."""


async def due_withdrawals(
    conn: AsyncConnection, now: dt.datetime, limit: int
) -> list[WithdrawalRecord]:
    """Withdrawals the processor worker has to send or follow up now, oldest first
    (ix_withdrawals_work); one whose last attempt failed waits for its next attempt, a parked one
    for an admin, a leased one for its worker."""
    query = (
        select(withdrawals)
        .where(withdrawals.c.status.in_(FOLLOWED_BY_THE_WORKER), *_due(now))
        .order_by(withdrawals.c.created_at)
        .limit(limit)
    )
    watched = (  # ix_withdrawals_return_watch
        select(withdrawals)
        .where(withdrawals.c.status == "paid", withdrawals.c.next_attempt_at <= now)
        .order_by(withdrawals.c.next_attempt_at)
        .limit(limit)
    )
    return [_withdrawal(row) for q in (query, watched) for row in (await conn.execute(q)).all()]


async def watch_for_return(
    conn: AsyncConnection,
    withdrawal_id: str,
    at: dt.datetime | None,
    *,
    due_by: dt.datetime | None = None,
) -> bool:
    """A paid withdrawal is next looked up for a return at `at` (None: no longer). With `due_by`,
    only if its check was due by then: a worker taking the check (another took it: False). False
    too if it is no longer paid."""
    due = () if due_by is None else (withdrawals.c.next_attempt_at <= due_by,)
    result = await conn.execute(
        update(withdrawals)
        .where(withdrawals.c.withdrawal_id == withdrawal_id, withdrawals.c.status == "paid", *due)
        .values(next_attempt_at=at)
    )
    return result.rowcount == 1


async def note_failed_attempt(
    conn: AsyncConnection,
    withdrawal_id: str,
    *,
    retry_at: dt.datetime,
    error: str,
    park_at: dt.datetime | None = None,
) -> None:
    """The processor call failed: count it, give the lease back, and leave the withdrawal until
    `retry_at` (or, with `park_at`, until an admin retries it)."""
    await conn.execute(
        update(withdrawals)
        .where(withdrawals.c.withdrawal_id == withdrawal_id, withdrawals.c.status == "processing")
        .values(
            attempts=withdrawals.c.attempts + 1,
            next_attempt_at=retry_at,
            last_error=error[:256],
            parked_at=park_at,
            leased_until=None,
        )
    )


async def schedule_follow_up(conn: AsyncConnection, withdrawal_id: str, at: dt.datetime) -> None:
    """The worker's call succeeded and the payment is still on its way: look again at `at`; the
    count of failed attempts starts over and the lease is given back."""
    await conn.execute(
        update(withdrawals)
        .where(withdrawals.c.withdrawal_id == withdrawal_id, withdrawals.c.status == "processing")
        .values(next_attempt_at=at, attempts=0, last_error="", leased_until=None)
    )


async def nudge(conn: AsyncConnection, withdrawal_id: str, now: dt.datetime) -> None:
    """Ask for a prompt look (a callback the worker could not confirm): due now, but a live lease,
    the count of attempts and a parking stay as they are."""
    await conn.execute(
        update(withdrawals)
        .where(withdrawals.c.withdrawal_id == withdrawal_id, withdrawals.c.status == "processing")
        .values(next_attempt_at=now)
    )


async def mark_submitted(
    conn: AsyncConnection,
    withdrawal_id: str,
    now: dt.datetime,
    lease_until: dt.datetime,
    sender_batch_id: str,
) -> None:
    """About to be sent to the processor in `sender_batch_id`: from now on its outcome is looked up
    before any resend; this worker holds it until `lease_until`."""
    await conn.execute(
        update(withdrawals)
        .where(withdrawals.c.withdrawal_id == withdrawal_id)
        .values(
            submitted_at=func.coalesce(withdrawals.c.submitted_at, now),
            sender_batch_id=func.coalesce(withdrawals.c.sender_batch_id, sender_batch_id),
            leased_until=lease_until,
            next_attempt_at=None,
        )
    )


async def lease(
    conn: AsyncConnection, withdrawal_id: str, now: dt.datetime, until: dt.datetime
) -> bool:
    """Claim a due processing withdrawal for one follow-up until `until`: False if another worker
    (another replica) holds it, it is parked, not yet due, or no longer processing."""
    result = await conn.execute(
        update(withdrawals)
        .where(
            withdrawals.c.withdrawal_id == withdrawal_id,
            withdrawals.c.status == "processing",
            *_due(now),
        )
        .values(leased_until=until)
    )
    return result.rowcount == 1


async def unpark(conn: AsyncConnection, withdrawal_id: str) -> bool:
    """Hand a parked withdrawal that is still processing back to the worker, due now."""
    result = await conn.execute(
        update(withdrawals)
        .where(
            withdrawals.c.withdrawal_id == withdrawal_id,
            withdrawals.c.status == "processing",
            withdrawals.c.parked_at.is_not(None),
        )
        .values(parked_at=None, attempts=0, next_attempt_at=None, leased_until=None)
    )
    return result.rowcount == 1


async def queue(
    conn: AsyncConnection, name: str, *, limit: int, after: tuple[dt.datetime, str] | None
) -> list[WithdrawalRecord]:
    """An admin queue, oldest first: "in_review" (by request time) or "parked" (by parking time)."""
    order = withdrawals.c.created_at if name == "in_review" else withdrawals.c.parked_at
    query = select(withdrawals).order_by(order, withdrawals.c.withdrawal_id).limit(limit)
    if name == "in_review":
        query = query.where(withdrawals.c.status == "in_review")
    else:
        query = query.where(withdrawals.c.parked_at.is_not(None))
    if after is not None:
        at, withdrawal_id = after
        query = query.where(
            (order > at) | ((order == at) & (withdrawals.c.withdrawal_id > withdrawal_id))
        )
    return [_withdrawal(row) for row in (await conn.execute(query)).all()]


async def submitted_since(conn: AsyncConnection, since: dt.datetime) -> list[WithdrawalRecord]:
    """Withdrawals sent to the processor since `since` (reconciliation)."""
    query = select(withdrawals).where(withdrawals.c.submitted_at >= since)
    return [_withdrawal(row) for row in (await conn.execute(query)).all()]


async def withdrawals_in_batch(
    conn: AsyncConnection, sender_batch_id: str
) -> list[WithdrawalRecord]:
    """The withdrawals first sent in `sender_batch_id`, i.e. that batch's items, in withdrawal-id
    order (ix_withdrawals_sender_batch)."""
    query = (
        select(withdrawals)
        .where(withdrawals.c.sender_batch_id == sender_batch_id)
        .order_by(withdrawals.c.withdrawal_id)
    )
    return [_withdrawal(row) for row in (await conn.execute(query)).all()]


async def withdrawals_by_id(
    conn: AsyncConnection, withdrawal_ids: Sequence[str]
) -> dict[str, WithdrawalRecord]:
    rows = await conn.execute(
        select(withdrawals).where(withdrawals.c.withdrawal_id.in_(withdrawal_ids))
    )
    return {row.withdrawal_id: _withdrawal(row) for row in rows}


@dataclass(frozen=True)
class WithdrawalEvent:
    status: str
    actor: str
    reason: str
    at: dt.datetime


async def add_event(
    conn: AsyncConnection,
    withdrawal_id: str,
    status: str,
    actor: str,
    reason: str,
    now: dt.datetime,
) -> None:
    """Append a status change to the withdrawal's history (its seq follows the last one)."""
    seq = await conn.scalar(
        select(func.coalesce(func.max(withdrawal_events.c.seq), 0)).where(
            withdrawal_events.c.withdrawal_id == withdrawal_id
        )
    )
    await conn.execute(
        withdrawal_events.insert().values(
            withdrawal_id=withdrawal_id,
            seq=int(seq or 0) + 1,
            status=status,
            actor=actor[:64],
            reason=reason[:256],
            created_at=now,
        )
    )


async def events_of(
    conn: AsyncConnection, withdrawal_ids: Sequence[str]
) -> dict[str, list[WithdrawalEvent]]:
    """The histories of these withdrawals, each oldest first."""
    rows = await conn.execute(
        select(withdrawal_events)
        .where(withdrawal_events.c.withdrawal_id.in_(withdrawal_ids))
        .order_by(withdrawal_events.c.withdrawal_id, withdrawal_events.c.seq)
    )
    found: dict[str, list[WithdrawalEvent]] = {}
    for row in rows:
        found.setdefault(row.withdrawal_id, []).append(
            WithdrawalEvent(row.status, row.actor, row.reason, utc(row.created_at))
        )
    return found


async def processor_event_item(conn: AsyncConnection, event_id: str) -> str | None:
    """The item a processor callback kept before was about; None if it was not kept."""
    found = await conn.scalar(
        select(processor_events.c.item_reference).where(processor_events.c.event_id == event_id)
    )
    return None if found is None else str(found)


async def forget_processor_events(conn: AsyncConnection, before: dt.datetime, limit: int) -> int:
    """Forget up to `limit` processor callbacks received before `before`, oldest first (migration
    0022's index); returns how many."""
    oldest = (
        select(processor_events.c.event_id)
        .where(processor_events.c.received_at < before)
        .order_by(processor_events.c.received_at)
        .limit(limit)
    )
    result = await conn.execute(
        processor_events.delete().where(processor_events.c.event_id.in_(oldest.scalar_subquery()))
    )
    return int(result.rowcount)


async def record_processor_event(
    conn: AsyncConnection, event_id: str, item_reference: str, event_type: str, now: dt.datetime
) -> bool:
    """Keep a processor callback by its id; False if it was kept before (a concurrent copy that
    inserted first waits for it: ON CONFLICT DO NOTHING)."""
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(
        processor_events
    )
    result = await conn.execute(
        insert.values(
            event_id=event_id, item_reference=item_reference, event_type=event_type, received_at=now
        ).on_conflict_do_nothing(index_elements=["event_id"])
    )
    return result.rowcount == 1


async def save_reconciliation(
    conn: AsyncConnection,
    run_id: str,
    started_at: dt.datetime,
    finished_at: dt.datetime,
    checked: int,
    report: str,
) -> None:
    await conn.execute(
        reconciliation_runs.insert().values(
            run_id=run_id,
            started_at=started_at,
            finished_at=finished_at,
            checked=checked,
            report=report,
        )
    )


async def latest_reconciliation(conn: AsyncConnection) -> Row[Any] | None:
    return (
        await conn.execute(
            select(reconciliation_runs).order_by(reconciliation_runs.c.started_at.desc()).limit(1)
        )
    ).first()


async def move_withdrawal(
    conn: AsyncConnection,
    withdrawal_id: str,
    *,
    from_status: str | Sequence[str],
    to_status: str,
    now: dt.datetime,
    failure_reason: str = "",
    processor_reference: str | None = None,
    parked_only: bool = False,
) -> bool:
    """A conditional status change: False if the withdrawal was no longer in (one of)
    `from_status` (or, `parked_only`, no longer parked)."""
    values: dict[str, object] = {"status": to_status, "updated_at": now}
    if to_status in ENDINGS:
        # Nothing left for the worker: no lease, no schedule, off the parked queue.
        values.update(parked_at=None, leased_until=None, next_attempt_at=None)
    if failure_reason:
        values["failure_reason"] = failure_reason
    if processor_reference is not None:
        values["processor_reference"] = processor_reference
    result = await conn.execute(
        update(withdrawals)
        .where(
            withdrawals.c.withdrawal_id == withdrawal_id,
            withdrawals.c.status.in_(
                [from_status] if isinstance(from_status, str) else from_status
            ),
            *((withdrawals.c.parked_at.is_not(None),) if parked_only else ()),
        )
        .values(**values)
    )
    return result.rowcount == 1


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


@dataclass(frozen=True)
class PayoutMethodRecord:
    method_id: str
    creator_id: str
    kind: str
    destination_token: str
    display: str
    is_default: bool
    created_at: dt.datetime
    removed_at: dt.datetime | None = None


def _method(row: object) -> PayoutMethodRecord:
    data = row._asdict()  # type: ignore[attr-defined]
    data["created_at"] = utc(data["created_at"])
    if data["removed_at"] is not None:
        data["removed_at"] = utc(data["removed_at"])
    return PayoutMethodRecord(**data)


Lock = Literal["share", "update"] | None
"""A row lock taken with a read, held until the transaction ends (PostgreSQL; SQLite serializes
writes already): "share" for a withdrawal paying through a method (several may at once), "update"
for removing it (waits for them, and they for it)."""


async def payout_methods_of(
    conn: AsyncConnection, creator_id: str, *, lock: Lock = None
) -> list[PayoutMethodRecord]:
    """A creator's payout methods in use (not removed), oldest first."""
    query = (
        select(payout_methods)
        .where(payout_methods.c.creator_id == creator_id, payout_methods.c.removed_at.is_(None))
        .order_by(payout_methods.c.created_at, payout_methods.c.method_id)
    )
    if lock is not None:
        query = query.with_for_update(read=lock == "share")
    return [_method(row) for row in await conn.execute(query)]


async def lock_creator_methods(conn: AsyncConnection, creator_id: str) -> None:
    """Serialize changes to one creator's payout methods until the transaction ends (a creator may
    have no row to lock yet)."""
    await lock_name(conn, f"payout-methods:{creator_id}")


async def insert_payout_method(conn: AsyncConnection, method: PayoutMethodRecord) -> None:
    await conn.execute(payout_methods.insert().values(**method.__dict__))


async def set_default_method(conn: AsyncConnection, creator_id: str, method_id: str) -> None:
    """Make one method the creator's default, and none of the others."""
    await conn.execute(
        update(payout_methods)
        .where(payout_methods.c.creator_id == creator_id, payout_methods.c.removed_at.is_(None))
        .values(is_default=payout_methods.c.method_id == method_id)
    )


async def remove_method(conn: AsyncConnection, method_id: str, now: dt.datetime) -> None:
    await conn.execute(
        update(payout_methods)
        .where(payout_methods.c.method_id == method_id)
        .values(removed_at=now, is_default=False)
    )


async def open_withdrawals_on(conn: AsyncConnection, method_id: str) -> int:
    """Withdrawals on their way out through this method."""
    found = await conn.scalar(
        select(func.count())
        .select_from(withdrawals)
        .where(
            withdrawals.c.method_id == method_id,
            withdrawals.c.status.in_(ON_ITS_WAY),
        )
    )
    return int(found or 0)


async def verification_of(
    conn: AsyncConnection, creator_id: str, *, lock: Lock = None
) -> tuple[str, str]:
    """(status, reason) of a creator's verification; ("unverified", "") without a record."""
    query = select(creator_verifications.c.status, creator_verifications.c.reason).where(
        creator_verifications.c.creator_id == creator_id
    )
    if lock is not None:
        query = query.with_for_update(read=lock == "share")
    row = (await conn.execute(query)).first()
    return ("unverified", "") if row is None else (str(row[0]), str(row[1]))


async def set_verification(
    conn: AsyncConnection,
    creator_id: str,
    status: str,
    reason: str,
    now: dt.datetime,
    time_zone: str = "",
) -> None:
    """Set a creator's KYC status (and time zone, unless empty: then the one set before stays)."""
    values: dict[str, object] = {
        "creator_id": creator_id,
        "status": status,
        "reason": reason,
        "updated_at": now,
    }
    if time_zone:
        values["time_zone"] = time_zone
    await upsert(conn, creator_verifications, values, ["creator_id"])


async def time_zone_of(conn: AsyncConnection, creator_id: str) -> str:
    """The IANA time zone of a creator's calendar day ("UTC" unless verification set one)."""
    found = await conn.scalar(
        select(creator_verifications.c.time_zone).where(
            creator_verifications.c.creator_id == creator_id
        )
    )
    return str(found) if found else "UTC"


OPEN_WITHDRAWAL_STATUSES = ("requested", "in_review", "approved", "processing")
_GAUGE_WITHDRAWALS = Statement(
    "payout.gauge_withdrawals",
    "SELECT status, COUNT(*), COALESCE(SUM(gross_minor), 0) FROM withdrawals "
    "WHERE status IN ('requested', 'in_review', 'approved', 'processing') "  # ..._status_created
    "GROUP BY status",
)
_GAUGE_PARKED = Statement(
    "payout.gauge_parked",
    "SELECT COUNT(*) FROM withdrawals WHERE parked_at IS NOT NULL",  # ix_withdrawals_parked
)
_GAUGE_RECONCILIATION = Statement(
    "payout.gauge_reconciliation",
    "SELECT finished_at, report FROM reconciliation_runs ORDER BY started_at DESC LIMIT 1",
)


@dataclass(frozen=True)
class PayoutGauges:
    open_withdrawals: dict[str, tuple[int, int]]
    """status -> (how many, gross minor units), for the statuses a withdrawal passes through."""
    parked: int
    reconciliation: tuple[dt.datetime, str] | None
    """The last reconciliation run: when it finished, its mismatches as JSON."""


async def payout_gauges(tx: Tx) -> PayoutGauges:
    rows = await tx.all(_GAUGE_WITHDRAWALS)
    parked = await tx.one(_GAUGE_PARKED)
    last = await tx.one(_GAUGE_RECONCILIATION)
    assert parked is not None
    return PayoutGauges(
        {str(r[0]): (int(r[1]), int(r[2])) for r in rows},
        int(parked[0]),
        (utc(last[0]), str(last[1])) if last is not None else None,
    )
