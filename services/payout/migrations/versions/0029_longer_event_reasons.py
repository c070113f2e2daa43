"""A withdrawal event's reason holds what the API accepts: CancelWithdrawal takes a reason of up to
500 characters, kept in the withdrawal's history, whose column held 256 (the rest was cut).

On PostgreSQL, making a varchar longer changes the catalog only (no rewrite, no scan). SQLite does
not enforce a declared length: nothing to do there.

Revision ID: 0029
Revises: 0028
"""

import sqlalchemy as sa
from alembic import op

revision = "0029"
down_revision = "0028"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column(
            "withdrawal_events", "reason", type_=sa.String(500), existing_type=sa.String(256)
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("UPDATE withdrawal_events SET reason = left(reason, 256)")
        op.alter_column(
            "withdrawal_events", "reason", type_=sa.String(256), existing_type=sa.String(500)
        )
