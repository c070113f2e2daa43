"""History cannot be rewritten with the service's own credentials.

The diamond ledger's transactions and entries refuse UPDATE and DELETE (triggers, both back ends),
and on PostgreSQL the service acts as a role without UPDATE, DELETE or TRUNCATE on them and on the
admin audit trail.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

from runtime.migrations import drop_append_only, grant_service_role, make_append_only

revision = "0008"
down_revision = "0007"
APPEND_ONLY = ("ledger_transactions", "ledger_entries", "admin_audit")


def upgrade() -> None:
    make_append_only(op, "ledger_transactions", "ledger_entries")
    grant_service_role(op, append_only=APPEND_ONLY)


def downgrade() -> None:
    drop_append_only(op, "ledger_transactions", "ledger_entries")
