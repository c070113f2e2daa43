"""Gift credits: one row per credited gift, the exactly-once record of batched and single credits.

Credits used to be deduplicated by the generic request-id store, which forgets answers after the
retention period; a gift's credit must never apply twice, however late it is redelivered. The answers
already stored for CreditDiamonds are carried over.

Revision ID: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.create_table(
        "gift_credits",
        sa.Column("credit_key", sa.String(320), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("creator_id", sa.String(64), nullable=False),
        sa.Column("coins", sa.BigInteger, nullable=False),
        sa.Column("diamonds", sa.BigInteger, nullable=False),
        sa.Column("transaction_id", sa.String(40)),
        sa.Column("response", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_gift_credits_creator", "gift_credits", ["creator_id", "created_at"])
    # Earlier single credits: scope "<caller>|CreditDiamonds:<creator>", answered. Their coins and
    # diamonds live in their ledger transactions; here they are kept only to replay their answers.
    op.execute(
        "INSERT INTO gift_credits (credit_key, fingerprint, creator_id, coins, diamonds, "
        "transaction_id, response, created_at) "
        "SELECT scope || '/' || request_id, fingerprint, "
        "substr(scope, instr(scope, 'CreditDiamonds:') + 15), 0, 0, NULL, response, created_at "
        "FROM idempotency_keys WHERE scope LIKE '%CreditDiamonds:%' AND response IS NOT NULL"
        if op.get_bind().dialect.name == "sqlite"
        else "INSERT INTO gift_credits (credit_key, fingerprint, creator_id, coins, diamonds, "
        "transaction_id, response, created_at) "
        "SELECT scope || '/' || request_id, fingerprint, "
        "substr(scope, strpos(scope, 'CreditDiamonds:') + 15), 0, 0, NULL, response, created_at "
        "FROM idempotency_keys WHERE scope LIKE '%CreditDiamonds:%' AND response IS NOT NULL"
    )


def downgrade() -> None:
    op.drop_index("ix_gift_credits_creator", "gift_credits")
    op.drop_table("gift_credits")
