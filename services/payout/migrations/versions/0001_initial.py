"""Creators' gift accrual, withdrawals, the diamond ledger and idempotency keys.

Revision ID: 0001
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

from ledger import create_ledger_tables_v1
from runtime.idempotency import create_idempotency_table_v1

revision = "0001"
down_revision = None

SYSTEM_ACCOUNTS = ["system:diamond_issuance", "system:withdrawals_in_flight", "system:paid_out"]


def upgrade() -> None:
    create_ledger_tables_v1(op)
    create_idempotency_table_v1(op)
    op.create_table(
        "creators",
        sa.Column("creator_id", sa.String(64), primary_key=True),
        sa.Column("coins_received", sa.BigInteger, nullable=False),
        sa.Column("diamonds_credited", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "withdrawals",
        sa.Column("withdrawal_id", sa.String(40), primary_key=True),
        sa.Column("creator_id", sa.String(64), nullable=False),
        sa.Column("diamonds", sa.BigInteger, nullable=False),
        sa.Column("gross_minor", sa.BigInteger, nullable=False),
        sa.Column("fee_minor", sa.BigInteger, nullable=False),
        sa.Column("currency_code", sa.String(3), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("destination_token", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("failure_reason", sa.String(128), nullable=False),
        sa.Column("processor_reference", sa.String(128)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_withdrawals_creator_created", "withdrawals", ["creator_id", "created_at"])
    op.create_index("ix_withdrawals_status_created", "withdrawals", ["status", "created_at"])
    ledger_accounts = sa.table(
        "ledger_accounts",
        sa.column("account_id", sa.String),
        sa.column("kind", sa.String),
        sa.column("balance", sa.BigInteger),
        sa.column("allow_negative", sa.Boolean),
        sa.column("keeps_balance", sa.Boolean),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    now = dt.datetime.now(dt.UTC)
    op.bulk_insert(
        ledger_accounts,
        [
            {
                "account_id": account,
                "kind": "system",
                "balance": 0,
                "allow_negative": True,
                "keeps_balance": False,
                "created_at": now,
            }
            for account in SYSTEM_ACCOUNTS
        ],
    )


def downgrade() -> None:
    for table in (
        "withdrawals",
        "creators",
        "idempotency_keys",
        "ledger_entries",
        "ledger_transactions",
        "ledger_accounts",
    ):
        op.drop_table(table)
