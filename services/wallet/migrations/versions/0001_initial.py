"""Wallet accounts, coin packages (seeded with the public price lists), purchases, ledger, idempotency.

Revision ID: 0001
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

from ledger import create_ledger_tables_v1
from runtime.idempotency import create_idempotency_table_v1

revision = "0001"
down_revision = None

# Public price lists (see the README's "Coin packages"): (region, channel, currency, [(coins, minor)]).
PRICE_LISTS = [
    (
        "US",
        "in_app",
        "USD",
        [
            (65, 99),
            (330, 499),
            (660, 999),
            (1321, 1999),
            (3303, 4999),
            (6607, 9999),
            (16500, 24999),
        ],
    ),
    (
        "US",
        "web",
        "USD",
        [
            (70, 99),
            (350, 499),
            (700, 999),
            (1400, 1999),
            (3500, 4999),
            (7000, 9999),
            (17500, 24999),
        ],
    ),
    ("GB", "in_app", "GBP", [(65, 89), (330, 449), (660, 899), (1321, 1799), (16500, 21999)]),
]
SYSTEM_ACCOUNTS = ["system:coin_sales", "system:gift_spend", "system:promotion_spend"]


def upgrade() -> None:
    create_ledger_tables_v1(op)
    create_idempotency_table_v1(op)
    op.create_table(
        "wallet_accounts",
        sa.Column("user_id", sa.String(64), primary_key=True),
        sa.Column("country_code", sa.String(2), nullable=False),
        sa.Column("currency_code", sa.String(3), nullable=False),
        sa.Column("birth_date", sa.Date, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    packages = op.create_table(
        "coin_packages",
        sa.Column("package_id", sa.String(64), primary_key=True),
        sa.Column("region", sa.String(2), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("currency_code", sa.String(3), nullable=False),
        sa.Column("coins", sa.BigInteger, nullable=False),
        sa.Column("price_minor", sa.BigInteger, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.CheckConstraint("coins > 0 AND price_minor > 0", name="ck_coin_packages_positive"),
    )
    op.create_index(
        "ix_coin_packages_listing", "coin_packages", ["region", "channel", "coins", "package_id"]
    )
    op.create_table(
        "purchases",
        sa.Column("purchase_id", sa.String(40), primary_key=True),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("package_id", sa.String(64), nullable=False),
        sa.Column("region", sa.String(2), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("coins", sa.BigInteger, nullable=False),
        sa.Column("price_minor", sa.BigInteger, nullable=False),
        sa.Column("currency_code", sa.String(3), nullable=False),
        sa.Column("payment_token", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("provider_transaction_id", sa.String(128), unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_purchases_user_created", "purchases", ["user_id", "created_at"])
    op.bulk_insert(
        packages,
        [
            {
                "package_id": f"{region.lower()}-{channel.replace('_', '-')}-{coins}",
                "region": region,
                "channel": channel,
                "currency_code": currency,
                "coins": coins,
                "price_minor": minor,
                "active": True,
            }
            for region, channel, currency, prices in PRICE_LISTS
            for coins, minor in prices
        ],
    )
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
        "purchases",
        "coin_packages",
        "wallet_accounts",
        "idempotency_keys",
        "ledger_entries",
        "ledger_transactions",
        "ledger_accounts",
    ):
        op.drop_table(table)
