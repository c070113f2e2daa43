"""Ledger tables. The Table objects serve queries; `create_ledger_tables_v1` is the frozen first DDL."""

from __future__ import annotations

from typing import Any

from alembic.operations import Operations
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
)

metadata = MetaData()

EntryId = BigInteger().with_variant(
    Integer(), "sqlite"
)  # SQLite autoincrements INTEGER PRIMARY KEY only


def _accounts_columns() -> list[Column[Any]]:
    return [
        Column("account_id", String(96), primary_key=True),
        Column("kind", String(16), nullable=False),
        Column("balance", BigInteger, nullable=False),
        Column("allow_negative", Boolean, nullable=False),
        Column("keeps_balance", Boolean, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    ]


def _transactions_columns() -> list[Column[Any]]:
    return [
        Column("transaction_id", String(40), primary_key=True),
        Column("kind", String(32), nullable=False),
        Column("reference", String(128), nullable=False),
        Column("request_id", String(256), nullable=False),
        Column("caller", String(64), nullable=False),
        Column("policy_version", String(32), nullable=False),
        Column("trace_id", String(32), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    ]


def _entries_columns() -> list[Column[Any]]:
    return [
        Column("entry_id", EntryId, primary_key=True, autoincrement=True),
        Column(
            "transaction_id",
            String(40),
            ForeignKey("ledger_transactions.transaction_id"),
            nullable=False,
        ),
        Column("account_id", String(96), ForeignKey("ledger_accounts.account_id"), nullable=False),
        Column("amount", BigInteger, nullable=False),
        Column("balance_after", BigInteger),
        Column("created_at", DateTime(timezone=True), nullable=False),
    ]


_BALANCE_RULE = "allow_negative OR balance >= 0"

accounts = Table("ledger_accounts", metadata, *_accounts_columns(), CheckConstraint(_BALANCE_RULE))
transactions = Table("ledger_transactions", metadata, *_transactions_columns())
entries = Table(
    "ledger_entries",
    metadata,
    *_entries_columns(),
    CheckConstraint("amount <> 0"),
    Index("ix_ledger_entries_account_entry", "account_id", "entry_id"),
)


def create_ledger_tables_v1(op: Operations) -> None:
    """Frozen DDL of the ledger's first version, for a service's first migration."""
    op.create_table(
        "ledger_accounts",
        *_accounts_columns(),
        CheckConstraint(_BALANCE_RULE, name="ck_ledger_accounts_balance"),
    )
    op.create_table(
        "ledger_transactions",
        *_transactions_columns(),
    )
    op.create_index(
        "ux_ledger_transactions_request",
        "ledger_transactions",
        ["caller", "request_id"],
        unique=True,
    )
    op.create_table(
        "ledger_entries",
        *_entries_columns(),
        CheckConstraint("amount <> 0", name="ck_ledger_entries_amount"),
    )
    op.create_index("ix_ledger_entries_account_entry", "ledger_entries", ["account_id", "entry_id"])
