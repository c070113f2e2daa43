"""A withdrawal's history records what happened, not only status changes (`withdrawal_events.kind`):
"status_changed", "parked" (the worker gave up reaching the processor, with the last error) and
"retried" (an admin handed it back to the worker).

The column has a constant default, so every event written before it, and every one written by pods
of the previous release during a rolling deploy (they only record status changes), reads as
"status_changed". Adding it rewrites nothing: PostgreSQL 11+ keeps a constant default in the catalog
(no table rewrite, a brief ACCESS EXCLUSIVE lock only), SQLite appends it to the schema.

Revision ID: 0027
Revises: 0026
"""

import sqlalchemy as sa
from alembic import op

revision = "0027"
down_revision = "0026"


def upgrade() -> None:
    with op.batch_alter_table("withdrawal_events", recreate="never") as batch:
        batch.add_column(
            sa.Column("kind", sa.String(16), nullable=False, server_default="status_changed")
        )


def downgrade() -> None:
    # Parkings and retries are kept: the previous release reads them as moves to the status the
    # withdrawal was in (with their actor, reason and time), which loses less than deleting them.
    with op.batch_alter_table("withdrawal_events") as batch:
        batch.drop_column("kind")
