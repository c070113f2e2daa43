"""LIVE rooms and their gift feed.

A creator starts and ends a LIVE (`lives`); gifts may be sent to a LIVE only while it is live, to its
creator, with gifts on. Every gift recorded in a LIVE, and its end, is an event of the LIVE's feed
(`live_events`), numbered 1, 2, ... by the LIVE's own counter (`last_seq`), which the gift's record
advances in the same statement: the feed's order is gifting's database order, so any replica serves
any watcher and a cursor resumes with no gap and no duplicate. The summary's sums are kept on the row.

Gifts recorded before this revision named free-form LIVE ids; their leaderboards stay readable
(ListTopGifters) but such ids are not LIVEs and take no new gifts.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

from runtime.migrations import grant_service_role

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.create_table(
        "lives",
        sa.Column("live_id", sa.String(64), primary_key=True),
        sa.Column("creator_id", sa.String(64), nullable=False),
        sa.Column("title", sa.String(128), nullable=False),
        sa.Column("gifts_enabled", sa.Boolean, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("coins_received", sa.BigInteger, nullable=False),
        sa.Column("gifts_sent", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_lives_creator", "lives", ["creator_id", "started_at"])
    op.create_table(
        "live_events",
        sa.Column("live_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("sent_gift_id", sa.String(40)),
        sa.Column("sender_id", sa.String(64)),
        sa.Column("gift_id", sa.String(64)),
        sa.Column("count", sa.Integer),
        sa.Column("coins", sa.BigInteger),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    grant_service_role(op, append_only=("admin_audit", "live_events"))  # the feed is history


def downgrade() -> None:
    op.drop_table("live_events")
    op.drop_index("ix_lives_creator", table_name="lives")
    op.drop_table("lives")
