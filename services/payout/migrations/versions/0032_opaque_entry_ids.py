"""Entry ids are opaque to callers (ledger v8): a random key per database, from which every replica
shows the same encrypted id (ledger.entry_ids) instead of the table's platform-wide sequence.

Revision ID: 0032
Revises: 0031
"""

from alembic import op

from ledger import downgrade_ledger_tables_v8, upgrade_ledger_tables_v8

revision = "0032"
down_revision = "0031"


def upgrade() -> None:
    upgrade_ledger_tables_v8(op)


def downgrade() -> None:
    downgrade_ledger_tables_v8(op)
