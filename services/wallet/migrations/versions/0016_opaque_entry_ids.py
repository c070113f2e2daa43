"""Entry ids are opaque to callers (ledger v8): a random key per database, from which every replica
shows the same encrypted id (ledger.entry_ids) instead of the table's platform-wide sequence.

Revision ID: 0016
Revises: 0015
"""

from alembic import op

from ledger import downgrade_ledger_tables_v8, upgrade_ledger_tables_v8

revision = "0016"
down_revision = "0015"


def upgrade() -> None:
    upgrade_ledger_tables_v8(op)


def downgrade() -> None:
    downgrade_ledger_tables_v8(op)
