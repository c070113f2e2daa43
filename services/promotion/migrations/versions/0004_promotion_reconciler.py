"""The promotion reconciler: find promotions left pending, and the request that opened each.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_index("ix_promotions_status_created", "promotions", ["status", "created_at"])
    op.create_index("ix_idempotency_keys_resource", "idempotency_keys", ["resource_id"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_resource", table_name="idempotency_keys")
    op.drop_index("ix_promotions_status_created", table_name="promotions")
