"""A LIVE says until when some process has watchers of its feed (`watched_until`), so that the
statement recording a gift sends a NOTIFY only for a LIVE someone watches: NOTIFY takes a lock shared
by the whole database at commit, which every gift paid for when every gift notified. And a LIVE
keeps the diamonds its gifts earned its creator (`diamonds_earned`), added as payout credits them
(LIVEs before this revision start from 0).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    with op.batch_alter_table("lives", recreate="never") as batch:
        batch.add_column(sa.Column("watched_until", sa.DateTime(timezone=True)))
        batch.add_column(
            sa.Column("diamonds_earned", sa.BigInteger, nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("lives") as batch:
        batch.drop_column("diamonds_earned")
        batch.drop_column("watched_until")
