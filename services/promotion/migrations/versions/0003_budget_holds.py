"""Budgets held, not debited: the wallet hold of each promotion, its end, and its deliveries.

Promotions created before this revision were paid with one debit (`wallet_transaction_id`, funding
`debit`); new ones hold their budget (`hold_id`, funding `hold`) and consume it as delivered. `ends_at`
is backfilled from `created_at + duration_days`.

Revision ID: 0003
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.add_column("promotions", sa.Column("hold_id", sa.String(64)))
    op.add_column("promotions", sa.Column("ends_at", sa.DateTime(timezone=True)))
    op.add_column(
        "promotions",
        sa.Column("funding", sa.String(8), nullable=False, server_default="debit"),
    )
    promotions = sa.table(
        "promotions",
        sa.column("promotion_id", sa.String),
        sa.column("duration_days", sa.Integer),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("ends_at", sa.DateTime(timezone=True)),
    )
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(promotions.c.promotion_id, promotions.c.created_at, promotions.c.duration_days)
    ).all()
    for row in rows:
        bind.execute(
            promotions.update()
            .where(promotions.c.promotion_id == row.promotion_id)
            .values(ends_at=row.created_at + dt.timedelta(days=row.duration_days))
        )
    op.create_table(
        "promotion_deliveries",
        sa.Column("promotion_id", sa.String(40), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("coins", sa.BigInteger, nullable=False),
        sa.Column("wallet_transaction_id", sa.String(40)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("coins > 0", name="ck_promotion_deliveries_coins"),
    )


def downgrade() -> None:
    op.drop_table("promotion_deliveries")
    with op.batch_alter_table("promotions") as batch:
        batch.drop_column("funding")
        batch.drop_column("ends_at")
        batch.drop_column("hold_id")
