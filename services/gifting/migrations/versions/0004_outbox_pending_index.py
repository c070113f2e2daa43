"""The relay's query reads only undelivered credits: a partial index on them, in delivery order, stays
as small as the backlog however many credits were ever delivered.

Revision ID: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_index(
        "ix_credit_outbox_pending",
        "credit_outbox",
        ["outbox_id"],
        postgresql_where=sa.text("delivered_at IS NULL AND NOT dead"),
        sqlite_where=sa.text("delivered_at IS NULL AND NOT dead"),
    )


def downgrade() -> None:
    op.drop_index("ix_credit_outbox_pending", table_name="credit_outbox")
