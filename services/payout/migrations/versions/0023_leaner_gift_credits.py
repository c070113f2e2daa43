"""Two index updates fewer on every gift credit: `ix_gift_credits_creator` served no query (a
creator's pending credits are read through `ix_gift_credits_creator_maturing`), and the reversal
order is indexed only where there is one (`reversal_seq` is NULL on all but reversed credits).

Settlement writes a row per gift here; each index is a B-tree insert at a random leaf.

Revision ID: 0023
Revises: 0022
"""

import sqlalchemy as sa
from alembic import op

revision = "0023"
down_revision = "0022"

REVERSED = sa.text("reversal_seq IS NOT NULL")


def upgrade() -> None:
    op.drop_index("ix_gift_credits_creator", table_name="gift_credits")
    op.drop_index("ix_gift_credits_reversal_seq", table_name="gift_credits")
    op.create_index(
        "ix_gift_credits_reversal_seq",
        "gift_credits",
        ["reversal_seq"],
        unique=True,
        postgresql_where=REVERSED,
        sqlite_where=REVERSED,
    )


def downgrade() -> None:
    op.drop_index("ix_gift_credits_reversal_seq", table_name="gift_credits")
    op.create_index("ix_gift_credits_reversal_seq", "gift_credits", ["reversal_seq"], unique=True)
    op.create_index("ix_gift_credits_creator", "gift_credits", ["creator_id", "created_at"])
