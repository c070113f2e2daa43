"""A ledger hold keeps the request that placed it (ledger v7): the same request sent again after its
idempotency record was purged answers the hold it placed instead of placing a second one.

Revision ID: 0024
Revises: 0023
"""

from alembic import op

from ledger import downgrade_ledger_tables_v7, upgrade_ledger_tables_v7

revision = "0024"
down_revision = "0023"


def upgrade() -> None:
    upgrade_ledger_tables_v7(op)


def downgrade() -> None:
    downgrade_ledger_tables_v7(op)
