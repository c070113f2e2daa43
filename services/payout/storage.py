"""Payout tables and their SQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    func,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.clock import utc
from runtime.db import upsert
from runtime.sql import Statement, Tx

metadata = MetaData()

creators = Table(
    "creators",
    metadata,
    Column("creator_id", String(64), primary_key=True),
    Column("coins_received", BigInteger, nullable=False),
    Column("diamonds_credited", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

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
)

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
)
"""KYC status per creator, set by admins; a creator without a row is unverified."""

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
)
"""One row per applied gift credit (migration 0007): the exactly-once record and its answer; its
diamonds are pending until `matured_at` (migration 0011)."""


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


def _withdrawal(row: object) -> WithdrawalRecord:
    data = row._asdict()  # type: ignore[attr-defined]
    data["created_at"] = utc(data["created_at"])
    data["updated_at"] = utc(data["updated_at"])
    if data["next_attempt_at"] is not None:
        data["next_attempt_at"] = utc(data["next_attempt_at"])
    return WithdrawalRecord(**data)


_STORED_CREDITS = Statement(
    "payout.stored_credits",
    "SELECT credit_key, fingerprint, response FROM gift_credits "
    "WHERE credit_key IN (SELECT value FROM json_each(:keys))",
    postgres="SELECT credit_key, fingerprint, response FROM gift_credits "
    "WHERE credit_key = ANY(:keys::text[])",
)
_ACCRUE = Statement(
    "payout.accrue_coins",
    "INSERT INTO creators (creator_id, coins_received, diamonds_credited, created_at) "
    "VALUES (:creator_id, :coins, 0, :now) ON CONFLICT (creator_id) DO UPDATE "
    "SET coins_received = creators.coins_received + excluded.coins_received "
    "RETURNING creator_id, coins_received, diamonds_credited",
)
_ACCRUE_MANY_PG = Statement(
    "payout.accrue_coins",
    "",
    postgres="INSERT INTO creators (creator_id, coins_received, diamonds_credited, created_at) "
    "SELECT c.creator_id, c.coins, 0, :now::timestamptz "
    "FROM unnest(:creator_ids::text[], :coins::bigint[]) AS c(creator_id, coins) "
    "ON CONFLICT (creator_id) DO UPDATE "
    "SET coins_received = creators.coins_received + excluded.coins_received "
    "RETURNING creator_id, coins_received, diamonds_credited",
)
_SET_CREDITED = Statement(
    "payout.set_diamonds_credited",
    "UPDATE creators SET diamonds_credited = :owed WHERE creator_id = :creator_id",
)
_SET_CREDITED_MANY_PG = Statement(
    "payout.set_diamonds_credited",
    "",
    postgres="UPDATE creators AS c SET diamonds_credited = d.owed "
    "FROM unnest(:creator_ids::text[], :owed::bigint[]) AS d(creator_id, owed) "
    "WHERE c.creator_id = d.creator_id",
)
_CREDIT_COLUMNS = (
    "credit_key, fingerprint, creator_id, coins, diamonds, transaction_id, response, reference, "
    "created_at, matured_at"
)
_INSERT_CREDIT = Statement(
    "payout.insert_credit",
    f"INSERT INTO gift_credits ({_CREDIT_COLUMNS}) VALUES (:credit_key, :fingerprint, :creator_id, "
    ":coins, :diamonds, :transaction_id, :response, :reference, :now, :matured_at) "
    "ON CONFLICT DO NOTHING",
)
_INSERT_CREDITS_PG = Statement(
    "payout.insert_credits",
    "",
    postgres=f"INSERT INTO gift_credits ({_CREDIT_COLUMNS}) "
    "SELECT c.*, :now::timestamptz, :matured_at::timestamptz FROM unnest(:keys::text[], "
    ":fingerprints::text[], :creator_ids::text[], :coins::bigint[], :diamonds::bigint[], "
    ":transaction_ids::text[], :responses::bytea[], :references::text[]) AS c "
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
    "matured_at = coalesce(matured_at, :now) WHERE credit_key = :credit_key AND reversed_at IS NULL",
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
    "SELECT coalesce(sum(CASE WHEN status IN ('pending', 'processing') THEN diamonds ELSE 0 END), "
    "0), coalesce(sum(CASE WHEN status = 'paid' THEN diamonds ELSE 0 END), 0) "
    "FROM withdrawals WHERE creator_id = :creator_id",
)


@dataclass(frozen=True)
class CreditRow:
    """One applied gift credit: its request key, what it was, and the answer it got."""

    credit_key: str
    fingerprint: str
    creator_id: str
    coins: int
    diamonds: int
    transaction_id: str | None
    response: bytes
    reference: str


async def stored_credits(tx: Tx, keys: Sequence[str]) -> dict[str, tuple[str, bytes]]:
    """Credits applied before, by key: (fingerprint, response)."""
    rows = await tx.all(_STORED_CREDITS, keys=list(keys))
    return {str(row[0]): (str(row[1]), bytes(row[2])) for row in rows}


async def accrue_coins_many(
    tx: Tx, coins_by_creator: dict[str, int], now: dt.datetime
) -> dict[str, tuple[int, int]]:
    """Add gift coins to creators' running totals (creating creators) in creator order, which is
    also the order their rows are locked in; returns creator -> (coins received, diamonds credited)."""
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
    return {str(row[0]): (int(row[1]), int(row[2])) for row in rows}


async def set_diamonds_credited_many(tx: Tx, owed: dict[str, int]) -> None:
    if tx.dialect == "postgresql":
        await tx.run(_SET_CREDITED_MANY_PG, creator_ids=list(owed), owed=list(owed.values()))
        return
    for creator_id, diamonds in owed.items():
        await tx.run(_SET_CREDITED, creator_id=creator_id, owed=diamonds)


async def insert_credits(
    tx: Tx, rows: Sequence[CreditRow], now: dt.datetime, *, matured: bool
) -> int:
    """Record applied credits, pending (or `matured` at once); returns how many were new (fewer: a
    concurrent twin applied some)."""
    matured_at = now if matured else None
    if tx.dialect == "postgresql":
        return await tx.run(
            _INSERT_CREDITS_PG,
            keys=[r.credit_key for r in rows],
            fingerprints=[r.fingerprint for r in rows],
            creator_ids=[r.creator_id for r in rows],
            coins=[r.coins for r in rows],
            diamonds=[r.diamonds for r in rows],
            transaction_ids=[r.transaction_id for r in rows],
            responses=[r.response for r in rows],
            references=[r.reference for r in rows],
            now=now,
            matured_at=matured_at,
        )
    inserted = 0
    for r in rows:
        inserted += await tx.run(_INSERT_CREDIT, **r.__dict__, now=now, matured_at=matured_at)
    return inserted


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
    return utc(value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value)))


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
    """Gross cash of a creator's withdrawals since `since` that did not fail (for the daily cap)."""
    total = await conn.scalar(
        select(func.coalesce(func.sum(withdrawals.c.gross_minor), 0)).where(
            withdrawals.c.creator_id == creator_id,
            withdrawals.c.created_at >= since,
            withdrawals.c.status != "failed",
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


async def due_withdrawals(
    conn: AsyncConnection, now: dt.datetime, limit: int
) -> list[WithdrawalRecord]:
    """Withdrawals the processor worker has to pay or finish now, oldest first (ix_withdrawals_open);
    one whose last attempt failed waits for its next attempt."""
    query = (
        select(withdrawals)
        .where(
            withdrawals.c.status.in_(("pending", "processing")),
            (withdrawals.c.next_attempt_at.is_(None)) | (withdrawals.c.next_attempt_at <= now),
        )
        .order_by(withdrawals.c.created_at)
        .limit(limit)
    )
    return [_withdrawal(row) for row in (await conn.execute(query)).all()]


async def note_failed_attempt(
    conn: AsyncConnection, withdrawal_id: str, *, retry_at: dt.datetime, error: str
) -> None:
    """The processor call failed: count it, and leave the withdrawal until `retry_at`."""
    await conn.execute(
        update(withdrawals)
        .where(withdrawals.c.withdrawal_id == withdrawal_id)
        .values(
            attempts=withdrawals.c.attempts + 1, next_attempt_at=retry_at, last_error=error[:256]
        )
    )


async def move_withdrawal(
    conn: AsyncConnection,
    withdrawal_id: str,
    *,
    from_status: str,
    to_status: str,
    now: dt.datetime,
    failure_reason: str = "",
    processor_reference: str | None = None,
) -> bool:
    """A conditional status change: False if the withdrawal was no longer in `from_status`."""
    values: dict[str, object] = {"status": to_status, "updated_at": now}
    if failure_reason:
        values["failure_reason"] = failure_reason
    if processor_reference is not None:
        values["processor_reference"] = processor_reference
    result = await conn.execute(
        update(withdrawals)
        .where(withdrawals.c.withdrawal_id == withdrawal_id, withdrawals.c.status == from_status)
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


async def credits_of_gifts(tx: Tx, references: Sequence[str]) -> list[CreditOfGift]:
    """The credits of these gifts, by creator (locked until the transaction ends, on PostgreSQL)."""
    rows = await tx.all(_CREDITS_OF_GIFTS, references=list(references))
    return [
        CreditOfGift(str(k), str(c), int(d), bool(p), str(r), bool(v)) for k, c, d, p, r, v in rows
    ]


async def mark_reversed(tx: Tx, credit_key: str, transaction_id: str, now: dt.datetime) -> bool:
    """Mark a credit reversed (and no longer pending); False if it was reversed already."""
    return (
        await tx.run(_MARK_REVERSED, credit_key=credit_key, transaction_id=transaction_id, now=now)
        == 1
    )


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


async def payout_methods_of(conn: AsyncConnection, creator_id: str) -> list[PayoutMethodRecord]:
    """A creator's payout methods in use (not removed), oldest first."""
    rows = await conn.execute(
        select(payout_methods)
        .where(payout_methods.c.creator_id == creator_id, payout_methods.c.removed_at.is_(None))
        .order_by(payout_methods.c.created_at, payout_methods.c.method_id)
    )
    return [_method(row) for row in rows]


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
            withdrawals.c.status.in_(("pending", "processing")),
        )
    )
    return int(found or 0)


async def verification_of(conn: AsyncConnection, creator_id: str) -> tuple[str, str]:
    """(status, reason) of a creator's verification; ("unverified", "") without a record."""
    row = (
        await conn.execute(
            select(creator_verifications.c.status, creator_verifications.c.reason).where(
                creator_verifications.c.creator_id == creator_id
            )
        )
    ).first()
    return ("unverified", "") if row is None else (str(row[0]), str(row[1]))


async def set_verification(
    conn: AsyncConnection, creator_id: str, status: str, reason: str, now: dt.datetime
) -> None:
    await upsert(
        conn,
        creator_verifications,
        {"creator_id": creator_id, "status": status, "reason": reason, "updated_at": now},
        ["creator_id"],
    )
