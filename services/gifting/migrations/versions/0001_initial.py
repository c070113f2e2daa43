"""Gift catalog (seeded), sent gifts, LIVE leaderboards, the diamond-credit outbox, idempotency keys.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

from runtime.idempotency import create_idempotency_table_v1

revision = "0001"
down_revision = None

# The public catalog (README, "Gift catalog"): (gift id, name, coins). Gifts under 100 coins streak.
CATALOG = [
    ("rose", "Rose", 1),
    ("panda", "Panda", 5),
    ("love-bang", "Love Bang", 25),
    ("sun-cream", "Sun Cream", 50),
    ("hat-and-mustache", "Hat and Mustache", 99),
    ("rainbow-puke", "Rainbow Puke", 100),
    ("concert", "Concert", 500),
    ("im-very-rich", "I'm Very Rich", 1000),
    ("drama-queen", "Drama Queen", 5000),
    ("interstellar", "Interstellar", 10000),
    ("planet", "Planet", 15000),
    ("rocket", "Rocket", 20000),
    ("lion", "Lion", 29999),
    ("universe", "Universe", 44999),
]


def upgrade() -> None:
    create_idempotency_table_v1(op)
    gifts = op.create_table(
        "gifts",
        sa.Column("gift_id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("coins", sa.BigInteger, nullable=False),
        sa.Column("streakable", sa.Boolean, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.CheckConstraint("coins > 0", name="ck_gifts_coins"),
    )
    op.create_index("ix_gifts_listing", "gifts", ["coins", "gift_id"])
    op.create_table(
        "sent_gifts",
        sa.Column("sent_gift_id", sa.String(40), primary_key=True),
        sa.Column("sender_id", sa.String(64), nullable=False),
        sa.Column("creator_id", sa.String(64), nullable=False),
        sa.Column("gift_id", sa.String(64), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("coins", sa.BigInteger, nullable=False),
        sa.Column("live_id", sa.String(64)),
        sa.Column("video_id", sa.String(64)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("wallet_transaction_id", sa.String(40)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_sent_gifts_live_created", "sent_gifts", ["live_id", "created_at"])
    op.create_table(
        "live_gifters",
        sa.Column("live_id", sa.String(64), primary_key=True),
        sa.Column("sender_id", sa.String(64), primary_key=True),
        sa.Column("coins", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_live_gifters_rank", "live_gifters", ["live_id", "coins", "sender_id"])
    op.create_table(
        "credit_outbox",
        sa.Column(
            "outbox_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("sent_gift_id", sa.String(40), nullable=False, unique=True),
        sa.Column("creator_id", sa.String(64), nullable=False),
        sa.Column("coins", sa.BigInteger, nullable=False),
        sa.Column("traceparent", sa.String(128), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True)),
        sa.Column("dead", sa.Boolean, nullable=False),
        sa.Column("last_error", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_credit_outbox_due", "credit_outbox", ["delivered_at", "dead", "next_attempt_at"]
    )
    op.bulk_insert(
        gifts,
        [
            {
                "gift_id": gift_id,
                "name": name,
                "coins": coins,
                "streakable": coins < 100,
                "active": True,
            }
            for gift_id, name, coins in CATALOG
        ],
    )


def downgrade() -> None:
    for table in ("credit_outbox", "live_gifters", "sent_gifts", "gifts", "idempotency_keys"):
        op.drop_table(table)
