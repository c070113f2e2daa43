"""Processor callbacks by age, for the sweep that forgets them after
`PAYOUT_PROCESSOR_EVENT_RETENTION_DAYS` (they were kept for ever).

Revision ID: 0022
Revises: 0021
"""

from alembic import op

revision = "0022"
down_revision = "0021"


def upgrade() -> None:
    op.create_index("ix_processor_events_received_at", "processor_events", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_processor_events_received_at", table_name="processor_events")
