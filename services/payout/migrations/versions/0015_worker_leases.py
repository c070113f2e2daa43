"""The withdrawal worker's lease gets its own column, and each withdrawal keeps its batch id.

`leased_until`: a worker (of any replica) works the withdrawal until then; a callback that asks for a
prompt look moves `next_attempt_at` only, never a live lease (before, both shared `next_attempt_at`).
`sender_batch_id`: the processor batch the withdrawal was first sent in (PayPal dedupes batches by
it; a resend goes under a batch id derived from the withdrawal, so a repeated resend is deduped too).
Withdrawals that were processing before revision 0014 get `submitted_at` (their `updated_at`), so
reconciliation sees them and the worker looks them up before any resend.

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"


def upgrade() -> None:
    with op.batch_alter_table("withdrawals", recreate="never") as batch:
        batch.add_column(sa.Column("leased_until", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("sender_batch_id", sa.String(64)))
    op.execute(
        "UPDATE withdrawals SET submitted_at = updated_at "
        "WHERE status = 'processing' AND submitted_at IS NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("withdrawals") as batch:
        batch.drop_column("sender_batch_id")
        batch.drop_column("leased_until")
