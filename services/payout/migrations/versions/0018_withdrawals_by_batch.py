"""Withdrawals by the processor batch they were first sent in: a resend sends that batch again,
whole (the worker reads its items back by `sender_batch_id`).

Revision ID: 0018
Revises: 0017
"""

from alembic import op

revision = "0018"
down_revision = "0017"


def upgrade() -> None:
    op.create_index("ix_withdrawals_sender_batch", "withdrawals", ["sender_batch_id"])


def downgrade() -> None:
    op.drop_index("ix_withdrawals_sender_batch", table_name="withdrawals")
