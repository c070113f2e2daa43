"""Rankings: creators by the coins of their credited gifts per day, per ISO week and all time, and each
creator's top gifters.

The sums are kept by the outbox relay as it marks credits delivered: the mark is conditional (a
credit delivered once adds once, whichever replica delivered it), and a batch adds each creator's
and each gifter's coins once per period (one row update per creator, however many of its gifts the
batch holds). Gifts credited before this revision are added here.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    op.create_table(
        "creator_rankings",
        sa.Column("period", sa.String(8), primary_key=True),
        sa.Column("period_key", sa.String(16), primary_key=True),
        sa.Column("creator_id", sa.String(64), primary_key=True),
        sa.Column("coins", sa.BigInteger, nullable=False),
    )
    op.create_index(
        "ix_creator_rankings_rank",
        "creator_rankings",
        ["period", "period_key", "coins", "creator_id"],
    )
    op.create_table(
        "creator_gifters",
        sa.Column("creator_id", sa.String(64), primary_key=True),
        sa.Column("sender_id", sa.String(64), primary_key=True),
        sa.Column("coins", sa.BigInteger, nullable=False),
    )
    op.create_index(
        "ix_creator_gifters_rank", "creator_gifters", ["creator_id", "coins", "sender_id"]
    )
    credited = (
        "FROM sent_gifts s JOIN credit_outbox o ON o.sent_gift_id = s.sent_gift_id "
        "WHERE o.delivered_at IS NOT NULL"
    )
    op.execute(
        "INSERT INTO creator_rankings (period, period_key, creator_id, coins) "
        f"SELECT 'all', 'all', s.creator_id, sum(s.coins) {credited} GROUP BY s.creator_id"
    )
    op.execute(
        "INSERT INTO creator_gifters (creator_id, sender_id, coins) "
        f"SELECT s.creator_id, s.sender_id, sum(s.coins) {credited} "
        "GROUP BY s.creator_id, s.sender_id"
    )


def downgrade() -> None:
    op.drop_index("ix_creator_gifters_rank", table_name="creator_gifters")
    op.drop_table("creator_gifters")
    op.drop_index("ix_creator_rankings_rank", table_name="creator_rankings")
    op.drop_table("creator_rankings")
