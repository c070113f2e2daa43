"""A reversal takes back what the creator's kept coins no longer earn (review r11 #1).

A reversal took back each gift's own share of floor(cumulative coins x rate), so after reversals of
gifts worth a fraction of a diamond a creator held more or less than floor(kept coins x rate). A
reversal now takes the gift's coins off the coins its rate segment converted and takes back what that
moves floor(...) by. For that each credit keeps the number of its creator's rate segment
(`rate_segment`, counted on `creators`), a segment that ended keeps the coins it converted
(`closed_segments`), and a reversed credit what was taken (`reversed_diamonds`) and the coins that
came off its segment with it (`reversed_coins`; 0: reversed by its own share, the old rule). A
credit still pending gives its share up from pending diamonds, so none is left pending to mature.

The rules must not mix within a segment (a review: a gift reversed by its own share leaves its coins
in the segment's sum, and a later gift's rounding takes their diamonds). So credits made before this
migration join their creator's current segment only where it holds exactly them: it began at the
first coin, every credit is at its rate and none was reversed. Every other creator starts a new
segment at their totals now (as a changed rate would: the fraction of a diamond not yet paid stays
the platform's), and their earlier credits keep the old rule.

Credits of the old rule are numbered -1. No payout older than this migration may write beside it (a
rolling update: its credits would carry no segment, its reversals the old rule, inside segments that
round): the database refuses a credit without a segment and a reversal without what it took, so
such a payout's batch fails whole and gifting's relay delivers it again to a new one.

Revision ID: 0033
Revises: 0032
"""

import sqlalchemy as sa
from alembic import op

revision = "0033"
down_revision = "0032"

_MIXED = (
    "SELECT g.creator_id FROM gift_credits g JOIN creators c ON c.creator_id = g.creator_id "
    "WHERE g.reversed_at IS NOT NULL OR g.rate_numerator <> c.rate_numerator "
    "OR g.rate_denominator <> c.rate_denominator"
)
"""Creators with a credit reversed, or at another rate than their current one. Each statement below
reads the tables once (no per-creator lookups: gift_credits has no index by creator alone)."""


def upgrade() -> None:
    with op.batch_alter_table("creators") as table:
        table.add_column(
            sa.Column("rate_segment", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("gift_credits") as table:
        table.add_column(sa.Column("rate_segment", sa.Integer()))
        table.add_column(sa.Column("reversed_diamonds", sa.BigInteger()))
        table.add_column(sa.Column("reversed_coins", sa.BigInteger()))
    op.create_table(
        "closed_segments",
        sa.Column("creator_id", sa.String(64), primary_key=True),
        sa.Column("rate_segment", sa.Integer(), primary_key=True),
        sa.Column("rate_numerator", sa.Integer(), nullable=False),
        sa.Column("rate_denominator", sa.Integer(), nullable=False),
        sa.Column("coins", sa.BigInteger(), nullable=False),
    )
    op.execute(
        "UPDATE gift_credits SET reversed_diamonds = diamonds, reversed_coins = 0 "
        "WHERE reversed_at IS NOT NULL"
    )
    # Segment 1, from their totals now, for every creator whose current segment does not hold
    # exactly their recorded credits (or who has no rate yet: their last credit's, so the next
    # credit does not count again from the first coin); the others' credits join segment 0.
    op.execute(
        "UPDATE creators SET rate_segment = 1 WHERE rate_numerator IS NULL "
        f"OR coins_at_rate <> 0 OR diamonds_at_rate <> 0 OR creator_id IN ({_MIXED})"
    )
    op.execute(
        "UPDATE gift_credits SET rate_segment = 0 "
        "WHERE creator_id IN (SELECT creator_id FROM creators WHERE rate_segment = 0)"
    )
    op.execute(
        "UPDATE creators SET rate_numerator = (SELECT g.rate_numerator FROM gift_credits g "
        "WHERE g.creator_id = creators.creator_id ORDER BY g.created_at DESC LIMIT 1), "
        "rate_denominator = (SELECT g.rate_denominator FROM gift_credits g "
        "WHERE g.creator_id = creators.creator_id ORDER BY g.created_at DESC LIMIT 1) "
        "WHERE rate_numerator IS NULL"
    )  # credited before migration 0020 and not since: none where payout ran since
    op.execute(
        "UPDATE creators SET coins_at_rate = coins_received, diamonds_at_rate = diamonds_credited "
        "WHERE rate_segment = 1"
    )
    op.execute("UPDATE gift_credits SET rate_segment = -1 WHERE rate_segment IS NULL")
    _refuse_older_payouts()


_OLDER_PAYOUT = (
    "written by a payout older than migration 0033 (a rolling update: finish it, the credit or "
    "reversal is sent again to a new payout)"
)


def _refuse_older_payouts() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "CREATE TRIGGER gift_credits_numbered BEFORE INSERT ON gift_credits "
            "WHEN NEW.rate_segment IS NULL "
            f"BEGIN SELECT RAISE(ABORT, 'a gift credit without its rate segment, {_OLDER_PAYOUT}'); END"
        )
        op.execute(
            "CREATE TRIGGER gift_credits_reversal_recorded BEFORE UPDATE ON gift_credits "
            "WHEN NEW.reversed_at IS NOT NULL AND NEW.reversed_diamonds IS NULL "
            f"BEGIN SELECT RAISE(ABORT, 'a reversal without what it took, {_OLDER_PAYOUT}'); END"
        )
        return
    op.execute("ALTER TABLE gift_credits ALTER COLUMN rate_segment SET NOT NULL")
    op.execute(
        "ALTER TABLE gift_credits ADD CONSTRAINT ck_gift_credits_reversal_recorded "
        "CHECK (reversed_at IS NULL OR reversed_diamonds IS NOT NULL)"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER gift_credits_numbered")
        op.execute("DROP TRIGGER gift_credits_reversal_recorded")
    else:
        op.execute("ALTER TABLE gift_credits DROP CONSTRAINT ck_gift_credits_reversal_recorded")
    op.drop_table("closed_segments")
    with op.batch_alter_table("gift_credits") as table:
        for name in ("reversed_coins", "reversed_diamonds", "rate_segment"):
            table.drop_column(name)
    with op.batch_alter_table("creators") as table:
        table.drop_column("rate_segment")
