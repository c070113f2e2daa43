"""The value of every gift on the books: each gift credit keeps the rates it was converted at (the
diamonds per coin, the value of a coin and of a diamond) and the platform's share, so that for every
gift: coins x coin value = diamonds x diamond value + platform revenue, exactly, in millionths of the
currency; the revenue report reads them by day (ix_gift_credits_day).

Credits applied before this revision are valued at the rates shipped with it (1/2 diamond per coin,
a coin at $0.0099 — 100 coins = $0.99, a diamond at $0.005), the only policy in force until now.

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"

_COLUMNS = (
    ("rate_numerator", sa.Integer, "1"),
    ("rate_denominator", sa.Integer, "2"),
    ("coin_value_micros", sa.BigInteger, "9900"),
    ("diamond_value_micros", sa.BigInteger, "5000"),
    ("platform_micros", sa.BigInteger, "0"),
)


def upgrade() -> None:
    with op.batch_alter_table("gift_credits", recreate="never") as batch:
        for name, kind, default in _COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=False, server_default=default))
    op.execute("UPDATE gift_credits SET platform_micros = coins * 9900 - diamonds * 5000")
    op.create_index("ix_gift_credits_day", "gift_credits", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_gift_credits_day", table_name="gift_credits")
    with op.batch_alter_table("gift_credits") as batch:
        for name, _, _ in reversed(_COLUMNS):
            batch.drop_column(name)
