"""A LIVE's `ended` feed event keeps the summary EndLive answered.

The event was built from the LIVE's row each time it was read, so one event read differently as
credits landed or gifts were reversed later. Events written before this revision have no summary and
are still read from the LIVE's row (nothing to backfill: their summary at the end is not known).

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"


def upgrade() -> None:
    op.add_column("live_events", sa.Column("summary", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("live_events") as batch:
        batch.drop_column("summary")
