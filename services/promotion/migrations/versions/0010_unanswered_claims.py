"""Unanswered request ids, indexed: the abandoned-end sweep finds an EndPromotion cut short after
its release on a completed promotion too (review r20: a delivery report, or another EndPromotion,
recorded the end first, and the sweep, which read active promotions only, never answered it).

Expand only, safe in a rolling deploy: a partial index of the rows still claimed (no response, no
error), a handful at any time, which the previous release neither reads nor minds. Built inside the
migration's transaction: `idempotency_keys` holds a retention period's requests (a day by default).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
UNANSWERED = "response IS NULL AND error IS NULL"


def upgrade() -> None:
    op.create_index(
        "ix_idempotency_keys_unanswered",
        "idempotency_keys",
        ["created_at"],
        postgresql_where=sa.text(UNANSWERED),
        sqlite_where=sa.text(UNANSWERED),
    )


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_unanswered", table_name="idempotency_keys")
