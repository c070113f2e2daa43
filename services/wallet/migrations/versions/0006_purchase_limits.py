"""Purchase limits: index the per-payment-method window query (the per-user one uses
ix_purchases_user_created).

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.create_index("ix_purchases_token_created", "purchases", ["payment_token", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_purchases_token_created", table_name="purchases")
