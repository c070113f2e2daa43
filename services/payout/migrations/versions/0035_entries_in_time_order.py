"""Each account keeps the time of its newest entry, and a posting is never dated before it (ledger
v10): an account's entries stay in time order whatever the skew between the replicas' clocks.

Revision ID: 0035
Revises: 0034
"""

from alembic import op

from ledger import downgrade_ledger_tables_v10, upgrade_ledger_tables_v10

revision = "0035"
down_revision = "0034"


def upgrade() -> None:
    upgrade_ledger_tables_v10(op)


def downgrade() -> None:
    downgrade_ledger_tables_v10(op)
