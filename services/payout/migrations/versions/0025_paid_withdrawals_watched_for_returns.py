"""Paid withdrawals are looked up again for a return while they are watched
(`PAYOUT_RETURN_WATCH_DAYS`): the worker finds the due ones by this index. Withdrawals paid before
this migration are not watched (their returns still arrive by callback).

Revision ID: 0025
Revises: 0024
"""

import sqlalchemy as sa
from alembic import op

revision = "0025"
down_revision = "0024"

WATCHED = sa.text("status = 'paid' AND next_attempt_at IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_withdrawals_return_watch",
        "withdrawals",
        ["next_attempt_at"],
        postgresql_where=WATCHED,
        sqlite_where=WATCHED,
    )


def downgrade() -> None:
    op.drop_index("ix_withdrawals_return_watch", table_name="withdrawals")
