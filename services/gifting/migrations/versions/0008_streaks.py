"""Streaks: repeated sends of a streakable gift by one viewer in one LIVE, each within the pause.

A streak is a row of `streaks` (its running count and last send); the sends it counts keep its id and
their running count (`sent_gifts.streak_id`, `streak_count`), and so do their feed events. A streak ends
when the pause passes (a sweep) or its LIVE ends: `ended_at` is set and a `streak_ended` event joins the
feed. At most one streak per (LIVE, viewer, gift) is open (a partial unique index). Whether a gift
streaks is the catalog's own attribute (an admin sets it); gifts already in the catalog keep theirs.
`sent_gifts.streakable` records it per send, so every step of a send (a retry included) knows.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"

_OPEN = "ended_at IS NULL"


def upgrade() -> None:
    op.create_table(
        "streaks",
        sa.Column("streak_id", sa.String(40), primary_key=True),
        sa.Column("live_id", sa.String(64), nullable=False),
        sa.Column("sender_id", sa.String(64), nullable=False),
        sa.Column("gift_id", sa.String(64), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
    )
    op.create_index(
        "ux_streaks_open",
        "streaks",
        ["live_id", "sender_id", "gift_id"],
        unique=True,
        postgresql_where=sa.text(_OPEN),
        sqlite_where=sa.text(_OPEN),
    )
    op.create_index(
        "ix_streaks_due",
        "streaks",
        ["last_at"],
        postgresql_where=sa.text(_OPEN),
        sqlite_where=sa.text(_OPEN),
    )
    with op.batch_alter_table("sent_gifts", recreate="never") as batch:
        batch.add_column(sa.Column("streakable", sa.Boolean, nullable=False, server_default="0"))
        batch.add_column(sa.Column("streak_id", sa.String(40)))
        batch.add_column(sa.Column("streak_count", sa.Integer))
    with op.batch_alter_table("live_events", recreate="never") as batch:
        batch.add_column(sa.Column("streak_id", sa.String(40)))
        batch.add_column(sa.Column("streak_count", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("live_events") as batch:
        batch.drop_column("streak_count")
        batch.drop_column("streak_id")
    with op.batch_alter_table("sent_gifts") as batch:
        batch.drop_column("streak_count")
        batch.drop_column("streak_id")
        batch.drop_column("streakable")
    op.drop_index("ix_streaks_due", table_name="streaks")
    op.drop_index("ux_streaks_open", table_name="streaks")
    op.drop_table("streaks")
