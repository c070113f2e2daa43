"""The withdrawal worker counts attempts and backs off: when a withdrawal may be tried next, how many
times it was tried, and why the last try failed; due withdrawals are found by a partial index.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"

_OPEN = "status IN ('pending', 'processing')"


def upgrade() -> None:
    with op.batch_alter_table("withdrawals") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("last_error", sa.String(256), nullable=False, server_default=""))
    op.create_index(
        "ix_withdrawals_open",
        "withdrawals",
        ["created_at"],
        postgresql_where=sa.text(_OPEN),
        sqlite_where=sa.text(_OPEN),
    )


def downgrade() -> None:
    op.drop_index("ix_withdrawals_open", table_name="withdrawals")
    with op.batch_alter_table("withdrawals") as batch:
        batch.drop_column("last_error")
        batch.drop_column("next_attempt_at")
        batch.drop_column("attempts")
