"""The purchase reconciler: find stale pending purchases, and the request that opened each.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    op.create_index("ix_purchases_status_created", "purchases", ["status", "created_at"])
    op.create_index("ix_idempotency_keys_resource", "idempotency_keys", ["resource_id"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_resource", table_name="idempotency_keys")
    op.drop_index("ix_purchases_status_created", table_name="purchases")
