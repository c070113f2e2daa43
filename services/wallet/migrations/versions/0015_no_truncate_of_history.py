"""History cannot be emptied with TRUNCATE by the tables' owner either (review A1).

Row triggers refuse UPDATE and DELETE to every connection, but PostgreSQL's TRUNCATE fires only
statement triggers: the login user that owns the tables (the one migrations run as) could empty the
admin audit trail. The service's own role never had the right. SQLite has no TRUNCATE.

Revision ID: 0015
Revises: 0014
"""

from alembic import op

from runtime.migrations import allow_truncate, forbid_truncate

revision = "0015"
down_revision = "0014"
TABLES = ("admin_audit",)


def upgrade() -> None:
    forbid_truncate(op, *TABLES)


def downgrade() -> None:
    allow_truncate(op, *TABLES)
