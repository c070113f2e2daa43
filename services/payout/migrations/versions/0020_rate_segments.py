"""A conversion rate applies to the coins received while it is in force, never to earlier ones.

Diamonds were floor(all coins ever received x the rate now), so a lower rate took back diamonds
already credited (a negative share, taken from pending diamonds the sweep then could not mature) and
a higher one paid the new rate on every past coin. Each creator now keeps the rate of their current
segment and where it began: owed = diamonds_at_rate + floor((coins received - coins_at_rate) x rate).
A creator credited before this migration has no rate yet: the first credit after it starts their
segment (see `Payouts._apply_credits`).

Revision ID: 0020
Revises: 0019
"""

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"


def upgrade() -> None:
    with op.batch_alter_table("creators") as table:
        table.add_column(sa.Column("rate_numerator", sa.Integer()))
        table.add_column(sa.Column("rate_denominator", sa.Integer()))
        table.add_column(
            sa.Column("coins_at_rate", sa.BigInteger(), nullable=False, server_default="0")
        )
        table.add_column(
            sa.Column("diamonds_at_rate", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("creators") as table:
        for name in ("diamonds_at_rate", "coins_at_rate", "rate_denominator", "rate_numerator"):
            table.drop_column(name)
