"""Every creator gets a pending-diamonds account, whatever the maturation period.

Creators first credited while `PAYOUT_MATURATION_DAYS` was 0 had only `creator:<id>`; when the period
was later set, every gift credited to them was refused (no `pending:<id>` account) and parked in
gifting for good. New creators now get both accounts; this opens the missing ones (empty, at the
chain's genesis, as `Ledger.open_account` does).

Revision ID: 0019
Revises: 0018
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

from ledger.chain import GENESIS

revision = "0019"
down_revision = "0018"

_ACCOUNTS = sa.table(
    "ledger_accounts",
    sa.column("account_id", sa.String),
    sa.column("kind", sa.String),
    sa.column("balance", sa.BigInteger),
    sa.column("allow_negative", sa.Boolean),
    sa.column("keeps_balance", sa.Boolean),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("seq", sa.BigInteger),
    sa.column("head_hash", sa.String),
)


def upgrade() -> None:
    bind = op.get_bind()
    creators = bind.execute(
        sa.text(
            "SELECT substr(a.account_id, 9) FROM ledger_accounts a "
            "WHERE a.account_id LIKE 'creator:%' AND NOT EXISTS (SELECT 1 FROM ledger_accounts p "
            "WHERE p.account_id = 'pending:' || substr(a.account_id, 9)) ORDER BY 1"
        )
    ).scalars()
    now = dt.datetime.now(dt.UTC)
    rows = [
        {
            "account_id": f"pending:{creator}",
            "kind": "user",
            "balance": 0,
            "allow_negative": False,
            "keeps_balance": True,
            "created_at": now,
            "seq": 0,
            "head_hash": GENESIS,
        }
        for creator in creators
    ]
    if rows:
        op.bulk_insert(_ACCOUNTS, rows)


def downgrade() -> None:
    """Nothing to undo: an empty pending account is what a creator gets today."""
