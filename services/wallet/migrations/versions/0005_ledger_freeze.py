"""Ledger: frozen accounts (no debits or holds while a clawback debt is open).

Revision ID: 0005
Revises: 0004
"""

from alembic import op

from ledger import downgrade_ledger_tables_v4, upgrade_ledger_tables_v4

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    upgrade_ledger_tables_v4(op)


def downgrade() -> None:
    downgrade_ledger_tables_v4(op)
