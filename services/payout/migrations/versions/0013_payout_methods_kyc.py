"""Payout methods and creator verification (KYC).

A creator registers where withdrawals go (PayPal: an email, shown masked; bank: the processor's token
and the last four digits, never the account number) and must be verified by an admin before the
first withdrawal. A withdrawal records the method it was paid to.

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"


def upgrade() -> None:
    op.create_table(
        "payout_methods",
        sa.Column("method_id", sa.String(40), primary_key=True),
        sa.Column("creator_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("destination_token", sa.String(256), nullable=False),
        sa.Column("display", sa.String(128), nullable=False),
        sa.Column("is_default", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("removed_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_payout_methods_creator", "payout_methods", ["creator_id", "created_at"])
    op.create_table(
        "creator_verifications",
        sa.Column("creator_id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(256), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("withdrawals", recreate="never") as batch:
        batch.add_column(sa.Column("method_id", sa.String(40)))
    op.create_index("ix_withdrawals_method", "withdrawals", ["method_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_withdrawals_method", "withdrawals")
    with op.batch_alter_table("withdrawals", recreate="never") as batch:
        batch.drop_column("method_id")
    op.drop_table("creator_verifications")
    op.drop_index("ix_payout_methods_creator", "payout_methods")
    op.drop_table("payout_methods")
