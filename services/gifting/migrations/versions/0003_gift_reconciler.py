"""The gift reconciler: find gifts left pending, and the request that opened each.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_index("ix_sent_gifts_status_created", "sent_gifts", ["status", "created_at"])
    op.create_index("ix_idempotency_keys_resource", "idempotency_keys", ["resource_id"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_resource", table_name="idempotency_keys")
    op.drop_index("ix_sent_gifts_status_created", table_name="sent_gifts")
