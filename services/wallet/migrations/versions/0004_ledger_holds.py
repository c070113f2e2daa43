"""Ledger holds: an account's `held` amount and the holds that reserve it.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

from ledger import downgrade_ledger_tables_v3, upgrade_ledger_tables_v3

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    upgrade_ledger_tables_v3(op)


def downgrade() -> None:
    downgrade_ledger_tables_v3(op)
