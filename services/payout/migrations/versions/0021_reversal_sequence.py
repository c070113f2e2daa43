"""Reversed gift credits numbered in the order their reversals commit, for gifting to follow.

Gifting takes a reversed gift out of its rankings and LIVE summaries by reading the reversals after
the last one it applied (ListReversedCredits). A timestamp cannot be that cursor (a reversal that
commits later may carry an earlier time); a counter row that every reversal increments can: its row
lock holds until the reversal commits, so numbers commit in order. Credits reversed before this
migration are numbered now, oldest first.

Revision ID: 0021
Revises: 0020
"""

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0020"


def upgrade() -> None:
    with op.batch_alter_table("gift_credits") as table:
        table.add_column(sa.Column("reversal_seq", sa.BigInteger()))
    op.create_table(
        "reversal_sequence",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("last", sa.BigInteger(), nullable=False),
    )
    conn = op.get_bind()
    reversed_ = conn.execute(
        sa.text(
            "SELECT credit_key FROM gift_credits WHERE reversed_at IS NOT NULL "
            "ORDER BY reversed_at, credit_key"
        )
    ).all()
    for seq, (credit_key,) in enumerate(reversed_, start=1):
        conn.execute(
            sa.text("UPDATE gift_credits SET reversal_seq = :seq WHERE credit_key = :key"),
            {"seq": seq, "key": credit_key},
        )
    conn.execute(
        sa.text("INSERT INTO reversal_sequence (id, last) VALUES (1, :last)"),
        {"last": len(reversed_)},
    )
    op.create_index("ix_gift_credits_reversal_seq", "gift_credits", ["reversal_seq"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_gift_credits_reversal_seq", table_name="gift_credits")
    op.drop_table("reversal_sequence")
    with op.batch_alter_table("gift_credits") as table:
        table.drop_column("reversal_seq")
