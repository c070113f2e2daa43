"""Diamonds mature: a gift credit's diamonds are pending until `matured_at`, then available.

Credits made before this migration went straight to the creator's available balance: they count as
matured when they were made. The partial indexes hold only the pending credits (a chargeback window's
worth), for the sweep (oldest first) and for a creator's next maturation time.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"

PENDING = sa.text("matured_at IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("gift_credits", recreate="never") as batch:
        batch.add_column(sa.Column("matured_at", sa.DateTime(timezone=True)))
    op.execute("UPDATE gift_credits SET matured_at = created_at")
    op.create_index(
        "ix_gift_credits_maturing",
        "gift_credits",
        ["created_at"],
        postgresql_where=PENDING,
        sqlite_where=PENDING,
    )
    op.create_index(
        "ix_gift_credits_creator_maturing",
        "gift_credits",
        ["creator_id", "created_at"],
        postgresql_where=PENDING,
        sqlite_where=PENDING,
    )


def downgrade() -> None:
    op.drop_index("ix_gift_credits_creator_maturing", "gift_credits")
    op.drop_index("ix_gift_credits_maturing", "gift_credits")
    with op.batch_alter_table("gift_credits", recreate="never") as batch:
        batch.drop_column("matured_at")
