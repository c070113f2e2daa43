"""The service role may no longer change an account's flags (ledger v9): only what postings, holds
and freezes change (its balance, chain head, held coins, frozen).

Revision ID: 0017
Revises: 0016
"""

from alembic import op

from ledger import downgrade_ledger_tables_v9, upgrade_ledger_tables_v9

revision = "0017"
down_revision = "0016"


def upgrade() -> None:
    upgrade_ledger_tables_v9(op)


def downgrade() -> None:
    downgrade_ledger_tables_v9(op)
