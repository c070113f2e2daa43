"""Parked credits are listed for an operator (ListParkedCredits): a partial index on them, in queue
order, as small as the set of parked credits.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.create_index(
        "ix_credit_outbox_parked",
        "credit_outbox",
        ["outbox_id"],
        postgresql_where=sa.text("dead AND delivered_at IS NULL"),
        sqlite_where=sa.text("dead AND delivered_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_credit_outbox_parked", table_name="credit_outbox")
