"""Wallet tables and the SQL that reads and writes them (Core, no ORM: these are hot paths)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    MetaData,
    String,
    Table,
    func,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.clock import utc
from runtime.db import lock_name, upsert
from runtime.sql import Statement, Tx, as_tx

metadata = MetaData()

wallet_accounts = Table(
    "wallet_accounts",
    metadata,
    Column("user_id", String(64), primary_key=True),
    Column("country_code", String(2), nullable=False),
    Column("currency_code", String(3), nullable=False),
    Column("birth_date", Date, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("classification", String(16), nullable=False, server_default="personal"),
)
"""`classification` (migration 0011): personal, government or political."""

coin_packages = Table(
    "coin_packages",
    metadata,
    Column("package_id", String(64), primary_key=True),
    Column("region", String(2), nullable=False),
    Column("channel", String(16), nullable=False),
    Column("currency_code", String(3), nullable=False),
    Column("coins", BigInteger, nullable=False),
    Column("price_minor", BigInteger, nullable=False),
    Column("active", Boolean, nullable=False),
)

purchases = Table(
    "purchases",
    metadata,
    Column("purchase_id", String(40), primary_key=True),
    Column("user_id", String(64), nullable=False),
    Column("package_id", String(64), nullable=False),
    Column("region", String(2), nullable=False),
    Column("channel", String(16), nullable=False),
    Column("coins", BigInteger, nullable=False),
    Column("price_minor", BigInteger, nullable=False),
    Column("currency_code", String(3), nullable=False),
    Column("payment_token", String(256), nullable=False),
    Column("status", String(16), nullable=False),
    Column("provider_transaction_id", String(128), unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class AccountRecord:
    user_id: str
    country_code: str
    currency_code: str
    birth_date: dt.date
    created_at: dt.datetime
    classification: str = "personal"


@dataclass(frozen=True)
class PackageRecord:
    package_id: str
    region: str
    channel: str
    currency_code: str
    coins: int
    price_minor: int
    active: bool


@dataclass(frozen=True)
class PurchaseRecord:
    purchase_id: str
    user_id: str
    package_id: str
    region: str
    channel: str
    coins: int
    price_minor: int
    currency_code: str
    payment_token: str
    status: str
    provider_transaction_id: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


async def insert_account(conn: AsyncConnection, account: AccountRecord) -> bool:
    """Insert unless the user has an account already (a concurrent open); True if inserted."""
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(
        wallet_accounts
    )
    result = await conn.execute(insert.values(**account.__dict__).on_conflict_do_nothing())
    return result.rowcount == 1


_COIN_STATE = Statement(
    "wallet.coin_state",
    "SELECT a.balance, a.held, a.frozen, d.balance FROM wallet_accounts w "
    "LEFT JOIN ledger_accounts a ON a.account_id = :account "
    "LEFT JOIN ledger_accounts d ON d.account_id = :debt_account "
    "WHERE w.user_id = :user_id",
)


@dataclass(frozen=True)
class CoinState:
    balance: int
    held: int
    frozen: bool
    debt_balance: int
    """The debt account's balance (negative while the user owes coins), 0 without one."""


async def coin_state(
    conn: AsyncConnection | Tx, user_id: str, account: str, debt_account: str
) -> CoinState | None:
    """A user's coin account and debt in one indexed read; None if the user has no wallet account."""
    row = await as_tx(conn).one(
        _COIN_STATE, user_id=user_id, account=account, debt_account=debt_account
    )
    if row is None:
        return None
    balance, held, frozen, debt = row
    return CoinState(int(balance or 0), int(held or 0), bool(frozen), int(debt or 0))


_PARTY = Statement(
    "wallet.party",
    "SELECT birth_date, country_code, classification FROM wallet_accounts WHERE user_id = :user_id",
)


@dataclass(frozen=True)
class Party:
    """What decides whether a user may send or receive gifts."""

    birth_date: dt.date
    country_code: str
    classification: str


async def party(conn: AsyncConnection | Tx, user_id: str) -> Party | None:
    """A user's birth date, country and classification; None if the user has no wallet account."""
    row = await as_tx(conn).one(_PARTY, user_id=user_id)
    if row is None:
        return None
    born, country, classification = row
    return Party(
        dt.date.fromisoformat(born) if isinstance(born, str) else born,
        str(country),
        str(classification),
    )


async def set_classification(conn: AsyncConnection, user_id: str, classification: str) -> bool:
    """False if the user has no wallet account."""
    result = await conn.execute(
        update(wallet_accounts)
        .where(wallet_accounts.c.user_id == user_id)
        .values(classification=classification)
    )
    return result.rowcount == 1


async def get_account(conn: AsyncConnection, user_id: str) -> AccountRecord | None:
    row = (
        await conn.execute(select(wallet_accounts).where(wallet_accounts.c.user_id == user_id))
    ).first()
    if row is None:
        return None
    data = row._asdict()
    data["created_at"] = utc(data["created_at"])
    return AccountRecord(**data)


async def get_package(conn: AsyncConnection, package_id: str) -> PackageRecord | None:
    row = (
        await conn.execute(select(coin_packages).where(coin_packages.c.package_id == package_id))
    ).first()
    return None if row is None else PackageRecord(**row._asdict())


async def put_package(conn: AsyncConnection, package: PackageRecord) -> None:
    await upsert(conn, coin_packages, package.__dict__, ["package_id"])


async def list_packages(
    conn: AsyncConnection, region: str, channel: str, *, limit: int, after: tuple[int, str] | None
) -> list[PackageRecord]:
    query = (
        select(coin_packages)
        .where(
            coin_packages.c.region == region,
            coin_packages.c.channel == channel,
            coin_packages.c.active,
        )
        .order_by(coin_packages.c.coins, coin_packages.c.package_id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(tuple_(coin_packages.c.coins, coin_packages.c.package_id) > after)
    return [PackageRecord(**row._asdict()) for row in (await conn.execute(query)).all()]


async def insert_purchase(conn: AsyncConnection, purchase: PurchaseRecord) -> None:
    await conn.execute(purchases.insert().values(**purchase.__dict__))


def _purchase(row: Any) -> PurchaseRecord:
    data = row._asdict()
    data["created_at"] = utc(data["created_at"])
    data["updated_at"] = utc(data["updated_at"])
    return PurchaseRecord(**data)


async def get_purchase(conn: AsyncConnection, purchase_id: str) -> PurchaseRecord | None:
    row = (
        await conn.execute(select(purchases).where(purchases.c.purchase_id == purchase_id))
    ).first()
    return None if row is None else _purchase(row)


async def purchased_since(
    conn: AsyncConnection,
    since: dt.datetime,
    *,
    user_id: str | None = None,
    token: str | None = None,
    currency: str | None = None,
) -> tuple[int, int]:
    """(coins, money in minor units) of a user's (or a payment method's) purchases since `since`
    that are pending or completed, in one `currency` if given (minor units of two currencies do
    not add up): what counts against the purchase limits."""
    query = select(
        func.coalesce(func.sum(purchases.c.coins), 0),
        func.coalesce(func.sum(purchases.c.price_minor), 0),
    ).where(purchases.c.created_at >= since, purchases.c.status.in_(("pending", "completed")))
    if user_id is not None:
        query = query.where(purchases.c.user_id == user_id)
    if token is not None:
        query = query.where(purchases.c.payment_token == token)
    if currency is not None:
        query = query.where(purchases.c.currency_code == currency)
    coins, minor = (await conn.execute(query)).one()
    return int(coins), int(minor)


async def lock_payment_method(conn: AsyncConnection, token: str) -> None:
    """Serialize purchases with one payment method across users (its limit spans them)."""
    await lock_name(conn, token)


async def lock_account(conn: AsyncConnection, user_id: str) -> None:
    """Serialize a user's purchases (PostgreSQL row lock; SQLite writes are serialized already)."""
    await conn.execute(
        select(wallet_accounts.c.user_id)
        .where(wallet_accounts.c.user_id == user_id)
        .with_for_update()
    )


async def get_purchase_by_provider_transaction(
    conn: AsyncConnection, provider_transaction_id: str
) -> PurchaseRecord | None:
    purchase_id = await conn.scalar(
        select(purchases.c.purchase_id).where(
            purchases.c.provider_transaction_id == provider_transaction_id
        )
    )
    return None if purchase_id is None else await get_purchase(conn, purchase_id)


async def reverse_purchase(
    conn: AsyncConnection, purchase_id: str, status: str, now: dt.datetime
) -> bool:
    """Move a completed purchase to refunded / charged_back; False if it is not completed (any more)."""
    result = await conn.execute(
        update(purchases)
        .where(purchases.c.purchase_id == purchase_id, purchases.c.status == "completed")
        .values(status=status, updated_at=now)
    )
    return result.rowcount == 1


async def pending_purchases(
    conn: AsyncConnection, created_before: dt.datetime, *, limit: int
) -> list[PurchaseRecord]:
    rows = await conn.execute(
        select(purchases)
        .where(purchases.c.status == "pending", purchases.c.created_at < created_before)
        .order_by(purchases.c.created_at)
        .limit(limit)
    )
    return [_purchase(row) for row in rows]


async def settle_purchase(
    conn: AsyncConnection,
    purchase_id: str,
    *,
    status: str,
    provider_transaction_id: str | None,
    now: dt.datetime,
) -> bool:
    """Move a pending purchase to its outcome; False if another attempt settled it first."""
    result = await conn.execute(
        update(purchases)
        .where(purchases.c.purchase_id == purchase_id, purchases.c.status == "pending")
        .values(status=status, provider_transaction_id=provider_transaction_id, updated_at=now)
    )
    return result.rowcount == 1


_GAUGE_PENDING_PURCHASES = Statement(
    "wallet.gauge_pending_purchases",
    "SELECT COUNT(*), MIN(created_at) FROM purchases "
    "WHERE status = 'pending'",  # ix_purchases_status_created
)


async def unsettled_purchases(tx: Tx) -> tuple[int, dt.datetime | None]:
    """Purchases whose charge is not settled yet, and the oldest one's start."""
    row = await tx.one(_GAUGE_PENDING_PURCHASES)
    assert row is not None
    return int(row[0]), utc(row[1]) if row[1] is not None else None
