"""Room on each page for the new versions of rows updated on every batch of credits: a creator's
totals (`creators`, twice per batch) and the diamond accounts' balances (`ledger_accounts`). See
`runtime.migrations.leave_room_for_updates` (PostgreSQL only; a table setting, no rewrite).

Revision ID: 0028
Revises: 0027
"""

from alembic import op

from runtime.migrations import leave_room_for_updates, restore_default_fill

revision = "0028"
down_revision = "0027"

FILLFACTORS = {"creators": 50, "ledger_accounts": 70}


def upgrade() -> None:
    leave_room_for_updates(op, FILLFACTORS)


def downgrade() -> None:
    restore_default_fill(op, *FILLFACTORS)
