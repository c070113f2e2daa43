"""One running LIVE per creator: a partial unique index on the creators of unended LIVEs.

A creator broadcasts one LIVE at a time; before this, StartLive let a creator open several and
gifts, rankings and summaries split between them. A database that already holds several running
LIVEs of one creator keeps the newest running and ends the others (each with its feed's "ended"
event, as EndLive writes it) before the index is built.

Revision ID: 0013
Revises: 0012
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"

_OLDER_RUNNING = (
    "SELECT l.live_id FROM lives l WHERE l.ended_at IS NULL AND EXISTS ("
    "SELECT 1 FROM lives n WHERE n.creator_id = l.creator_id AND n.ended_at IS NULL "
    "AND (n.started_at > l.started_at OR (n.started_at = l.started_at AND n.live_id > l.live_id)))"
)


def upgrade() -> None:
    conn = op.get_bind()
    now = dt.datetime.now(dt.UTC)
    at = sa.bindparam("now", type_=sa.DateTime(timezone=True))
    for (live_id,) in conn.execute(sa.text(_OLDER_RUNNING)).all():
        seq = conn.execute(
            sa.text(
                "UPDATE lives SET ended_at = :now, last_seq = last_seq + 1 "
                "WHERE live_id = :live_id RETURNING last_seq"
            ).bindparams(at),
            {"live_id": live_id, "now": now},
        ).scalar_one()
        conn.execute(
            sa.text(
                "INSERT INTO live_events (live_id, seq, kind, created_at) "
                "VALUES (:live_id, :seq, 'ended', :now)"
            ).bindparams(at),
            {"live_id": live_id, "seq": seq, "now": now},
        )
    op.create_index(
        "ix_lives_running_creator",
        "lives",
        ["creator_id"],
        unique=True,
        postgresql_where=sa.text("ended_at IS NULL"),
        sqlite_where=sa.text("ended_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_lives_running_creator", table_name="lives")
