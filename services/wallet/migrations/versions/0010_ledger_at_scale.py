"""The ledger at scale: each entry's kind, history indexed by time and kind, entries by transaction,
and the audit's runs and checkpoints (ledger v6).

Revision ID: 0010
Revises: 0009
"""

from alembic import op

from ledger import downgrade_ledger_tables_v6, upgrade_ledger_tables_v6

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    upgrade_ledger_tables_v6(op)


def downgrade() -> None:
    downgrade_ledger_tables_v6(op)
