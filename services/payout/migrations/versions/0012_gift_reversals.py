"""Gift reversals: each credit keeps its gift's reference (to be found by it) and, once reversed, when
and by which ledger transaction. Credits made before this migration have no reference and cannot be
named for a reversal.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"


def upgrade() -> None:
    with op.batch_alter_table("gift_credits", recreate="never") as batch:
        batch.add_column(sa.Column("reference", sa.String(128)))
        batch.add_column(sa.Column("reversed_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("reversal_transaction_id", sa.String(40)))
    op.create_index("ix_gift_credits_reference", "gift_credits", ["reference"])


def downgrade() -> None:
    op.drop_index("ix_gift_credits_reference", "gift_credits")
    with op.batch_alter_table("gift_credits", recreate="never") as batch:
        batch.drop_column("reversal_transaction_id")
        batch.drop_column("reversed_at")
        batch.drop_column("reference")
