"""A reversal takes back what the creator's standing coins no longer earn (review r11 #1).

A reversal took back each gift's own share of floor(cumulative coins x rate), so after reversals of
gifts worth a fraction of a diamond a creator held more or less than floor(standing coins x rate).
A reversal now lowers the creator's totals by the gift's coins and takes back what that moved
floor(...) by, in the rate segment the gift was credited in. For that each credit keeps the number of
its creator's rate segment (`rate_segment`, counted on `creators`), and a reversed one what was taken
(`reversed_diamonds`) and the coins that came off the creator's totals with it (`reversed_coins`; 0:
reversed by its own share, the rule before, as credits of an earlier segment still are).

Credits made before this migration are known to be in their creator's current segment when that
segment began at the first coin at the credit's rate; the others (NULL) keep the old rule.

Revision ID: 0033
Revises: 0032
"""

import sqlalchemy as sa
from alembic import op

revision = "0033"
down_revision = "0032"


def upgrade() -> None:
    with op.batch_alter_table("creators") as table:
        table.add_column(
            sa.Column("rate_segment", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("gift_credits") as table:
        table.add_column(sa.Column("rate_segment", sa.Integer()))
        table.add_column(sa.Column("reversed_diamonds", sa.BigInteger()))
        table.add_column(sa.Column("reversed_coins", sa.BigInteger()))
    op.execute(
        "UPDATE gift_credits SET rate_segment = 0 WHERE reversed_at IS NULL AND EXISTS ("
        "SELECT 1 FROM creators c WHERE c.creator_id = gift_credits.creator_id "
        "AND c.coins_at_rate = 0 AND c.diamonds_at_rate = 0 "
        "AND c.rate_numerator = gift_credits.rate_numerator "
        "AND c.rate_denominator = gift_credits.rate_denominator)"
    )
    op.execute(
        "UPDATE gift_credits SET reversed_diamonds = diamonds, reversed_coins = 0 "
        "WHERE reversed_at IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("gift_credits") as table:
        for name in ("reversed_coins", "reversed_diamonds", "rate_segment"):
            table.drop_column(name)
    with op.batch_alter_table("creators") as table:
        table.drop_column("rate_segment")
