"""History cannot be emptied or rewritten by the tables' owner either (review A1).

Row triggers refuse UPDATE and DELETE of the admin audit trail to every connection, but PostgreSQL's
TRUNCATE fires only statement triggers: the login user that owns the tables (the one migrations run
as) could empty it. The LIVE feed (`live_events`) was kept append-only by the service role's rights
alone; it gets the triggers the ledgers have (UPDATE, DELETE, and TRUNCATE on PostgreSQL), so a
recorded feed event stays as watchers read it. SQLite has no TRUNCATE.

Revision ID: 0017
Revises: 0016
"""

from alembic import op

from runtime.migrations import allow_truncate, drop_append_only, forbid_truncate, make_append_only

revision = "0017"
down_revision = "0016"


def upgrade() -> None:
    forbid_truncate(op, "admin_audit")
    make_append_only(op, "live_events")


def downgrade() -> None:
    drop_append_only(op, "live_events")
    allow_truncate(op, "admin_audit")
