"""Promotions and idempotency keys.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

from runtime.idempotency import create_idempotency_table_v1

revision = "0001"
down_revision = None


def upgrade() -> None:
    create_idempotency_table_v1(op)
    op.create_table(
        "promotions",
        sa.Column("promotion_id", sa.String(40), primary_key=True),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("video_id", sa.String(64), nullable=False),
        sa.Column("goal", sa.String(32), nullable=False),
        sa.Column("budget_coins", sa.BigInteger, nullable=False),
        sa.Column("spent_coins", sa.BigInteger, nullable=False),
        sa.Column("duration_days", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("wallet_transaction_id", sa.String(40)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "spent_coins >= 0 AND spent_coins <= budget_coins", name="ck_promotions_spent"
        ),
    )
    op.create_index(
        "ix_promotions_user_created", "promotions", ["user_id", "created_at", "promotion_id"]
    )


def downgrade() -> None:
    op.drop_table("promotions")
    op.drop_table("idempotency_keys")
