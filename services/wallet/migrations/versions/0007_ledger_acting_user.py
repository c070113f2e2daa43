"""Ledger: each transaction records the user the calling service acted for.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

from ledger import downgrade_ledger_tables_v5, upgrade_ledger_tables_v5

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    upgrade_ledger_tables_v5(op)


def downgrade() -> None:
    downgrade_ledger_tables_v5(op)
