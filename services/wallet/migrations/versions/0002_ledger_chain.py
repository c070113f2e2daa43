"""Tamper-evident ledger: transaction digests and per-account hash chains of entries (backfilled).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

from ledger import upgrade_ledger_tables_v2

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    upgrade_ledger_tables_v2(op)


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35): a batch copy of these tables would trip their foreign keys.
    op.drop_index("ux_ledger_entries_account_seq", table_name="ledger_entries")
    for table, columns in (
        ("ledger_entries", ("hash", "prev_hash", "seq")),
        ("ledger_transactions", ("digest",)),
        ("ledger_accounts", ("head_hash", "seq")),
    ):
        for column in columns:
            op.drop_column(table, column)
