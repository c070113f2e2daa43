"""A versioned catalog: each gift has a version (1 when added, one more per change), the regions where
it is offered (",US,GB," — empty: everywhere) and how long its animation plays; every version is kept
in `gift_versions` with who made it and why; a sent gift keeps the version it was priced at
(`sent_gifts.gift_version`; gifts sent before this revision have none). The seeded catalog becomes
version 1 of each gift, offered everywhere, its animation by price (1 s under 100 coins, 3 s under
1,000, else 6 s).

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    with op.batch_alter_table("gifts", recreate="never") as batch:
        batch.add_column(sa.Column("version", sa.Integer, nullable=False, server_default="1"))
        batch.add_column(sa.Column("regions", sa.String(1024), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("animation_ms", sa.Integer, nullable=False, server_default="1000")
        )
    op.execute(
        "UPDATE gifts SET animation_ms = CASE WHEN coins < 100 THEN 1000 "
        "WHEN coins < 1000 THEN 3000 ELSE 6000 END"
    )
    op.create_table(
        "gift_versions",
        sa.Column("gift_id", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("coins", sa.BigInteger, nullable=False),
        sa.Column("streakable", sa.Boolean, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("regions", sa.String(1024), nullable=False),
        sa.Column("animation_ms", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("changed_by", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
    )
    op.execute(
        "INSERT INTO gift_versions (gift_id, version, name, coins, streakable, active, regions, "
        "animation_ms, created_at, changed_by, reason) SELECT gift_id, version, name, coins, "
        "streakable, active, regions, animation_ms, CURRENT_TIMESTAMP, '', 'the catalog as it was' "
        "FROM gifts"
    )
    with op.batch_alter_table("sent_gifts", recreate="never") as batch:
        batch.add_column(sa.Column("gift_version", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("sent_gifts") as batch:
        batch.drop_column("gift_version")
    op.drop_table("gift_versions")
    with op.batch_alter_table("gifts") as batch:
        batch.drop_column("animation_ms")
        batch.drop_column("regions")
        batch.drop_column("version")
