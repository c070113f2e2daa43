"""A gift credit is keyed by its caller's request id alone, no longer by the creator too: the same
request id sent again for another creator is REQUEST_ID_REUSED (a review credited one gift's coins to
three creators under one request id). Existing keys "<caller>|CreditDiamonds:<creator>/<request id>"
become "<caller>|CreditDiamonds/<request id>"; where earlier calls left one request id for several
creators, the first credited takes the new key (so a retry for another creator is refused, never
applied again) and the others keep theirs, as the record of what was credited.

Revision ID: 0026
Revises: 0025
"""

from alembic import op

revision = "0026"
down_revision = "0025"


def upgrade() -> None:
    find = "instr" if op.get_bind().dialect.name == "sqlite" else "strpos"
    new_key = (
        f"substr(credit_key, 1, {find}(credit_key, ':') - 1) "
        f"|| substr(credit_key, {find}(credit_key, '/'))"
    )
    op.execute(  # one pass, joined on the primary key (UPDATE ... FROM: PostgreSQL, SQLite 3.33+)
        f"""
        WITH renamed AS (
            SELECT credit_key AS old, {new_key} AS new,
                   row_number() OVER (PARTITION BY {new_key} ORDER BY created_at, credit_key) AS n
            FROM gift_credits WHERE credit_key LIKE '%|CreditDiamonds:%/%'
        )
        UPDATE gift_credits SET credit_key = renamed.new
        FROM renamed WHERE renamed.old = gift_credits.credit_key AND renamed.n = 1
        """
    )


def downgrade() -> None:
    find = "instr" if op.get_bind().dialect.name == "sqlite" else "strpos"
    op.execute(
        "UPDATE gift_credits SET credit_key = "
        f"substr(credit_key, 1, {find}(credit_key, '/') - 1) || ':' || creator_id "
        f"|| substr(credit_key, {find}(credit_key, '/')) "
        "WHERE credit_key LIKE '%|CreditDiamonds/%'"
    )
