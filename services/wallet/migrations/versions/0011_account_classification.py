"""An account's classification: personal, government or political. Government and political accounts
may neither send nor receive gifts (the platform's rule); an admin sets it (SetAccountClassification,
audited). Existing accounts are personal.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    with op.batch_alter_table("wallet_accounts", recreate="never") as batch:
        batch.add_column(
            sa.Column("classification", sa.String(16), nullable=False, server_default="personal")
        )


def downgrade() -> None:
    with op.batch_alter_table("wallet_accounts") as batch:
        batch.drop_column("classification")
