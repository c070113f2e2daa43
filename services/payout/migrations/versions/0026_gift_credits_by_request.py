"""Each gift credit also records its caller's request id without the creator (`request_key`,
"<caller>|CreditDiamonds/<request id>"), unique: one request id sent again for another creator is
REQUEST_ID_REUSED (a review credited one gift's coins to three creators under one id, because the
exactly-once key, kept as it was, names the creator).

Safe in a rolling deploy: `credit_key` keeps its form, so a retried credit is found by either
version; pods of the previous release leave `request_key` empty (NULLs do not collide) and go on
as before until they are replaced. Existing credits get theirs here; where earlier calls left one
request id with several creators, the first credited takes it (a retry for another is then
refused) and the others keep none. Credits written by old pods during the deploy get theirs from
a later migration running the same statement (it keys only credits without a key, and never a
request key taken already). The statements run under the migration's one transaction: on a large
`gift_credits` table, add the column, backfill in batches and build the index CONCURRENTLY instead.

Revision ID: 0026
Revises: 0025
"""

import sqlalchemy as sa
from alembic import op

revision = "0026"
down_revision = "0025"


def upgrade() -> None:
    with op.batch_alter_table("gift_credits", recreate="never") as batch:
        batch.add_column(sa.Column("request_key", sa.String(320)))
    find = "instr" if op.get_bind().dialect.name == "sqlite" else "strpos"
    request_key = (
        f"substr(credit_key, 1, {find}(credit_key, ':') - 1) "
        f"|| substr(credit_key, {find}(credit_key, '/'))"
    )
    op.execute(  # one pass, joined on the primary key (UPDATE ... FROM: PostgreSQL, SQLite 3.33+)
        f"""
        WITH keyed AS (
            SELECT credit_key AS credit, {request_key} AS request,
                   row_number() OVER (PARTITION BY {request_key} ORDER BY created_at, credit_key) AS n
            FROM gift_credits WHERE credit_key LIKE '%|CreditDiamonds:%/%'
        )
        UPDATE gift_credits SET request_key = keyed.request
        FROM keyed WHERE keyed.credit = gift_credits.credit_key AND keyed.n = 1
        AND gift_credits.request_key IS NULL
        AND NOT EXISTS (SELECT 1 FROM gift_credits taken WHERE taken.request_key = keyed.request)
        """
    )
    op.create_index("ux_gift_credits_request", "gift_credits", ["request_key"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_gift_credits_request", table_name="gift_credits")
    with op.batch_alter_table("gift_credits", recreate="never") as batch:
        batch.drop_column("request_key")
