"""Delivery reports on their way: a report's capture is recorded as pending when the report is
claimed and cleared when it is counted, so a capture whose answer was lost is found and counted by
the reconciler even if the reporter never retries.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.create_table(
        "pending_captures",
        sa.Column("promotion_id", sa.String(40), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("coins", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_pending_captures_created", "pending_captures", ["created_at"])


def downgrade() -> None:
    op.drop_table("pending_captures")
