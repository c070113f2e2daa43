"""Where gifting is in the feeds it follows: the last of payout's reversed credits it applied.

A gift whose credit payout reversed (ReverseGiftCredits: coins found fraudulent) leaves gifting's
rankings, top gifters and LIVE summaries, and reads REVERSED (sent_gifts.status 'reversed').

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"


def upgrade() -> None:
    op.create_table(
        "followed_positions",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("position", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("followed_positions")
