"""Ledger tables. The Table objects serve queries; `create_ledger_tables_v1`, `upgrade_ledger_tables_v2`
and so on are the frozen DDL of each version, called by the services' migrations."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.engine import Connection

from ledger.chain import GENESIS, entry_hash, transaction_digest

if TYPE_CHECKING:  # alembic (~11 MB) is loaded only by a process that migrates
    from alembic.operations import Operations

metadata = MetaData()

EntryId = BigInteger().with_variant(
    Integer(), "sqlite"
)  # SQLite autoincrements INTEGER PRIMARY KEY only


def _accounts_columns() -> list[Column[Any]]:
    return [
        Column("account_id", String(96), primary_key=True),
        Column("kind", String(16), nullable=False),
        Column("balance", BigInteger, nullable=False),
        Column("allow_negative", Boolean, nullable=False),
        Column("keeps_balance", Boolean, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    ]


def _transactions_columns() -> list[Column[Any]]:
    return [
        Column("transaction_id", String(40), primary_key=True),
        Column("kind", String(32), nullable=False),
        Column("reference", String(128), nullable=False),
        Column("request_id", String(256), nullable=False),
        Column("caller", String(64), nullable=False),
        Column("policy_version", String(32), nullable=False),
        Column("trace_id", String(32), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    ]


def _entries_columns() -> list[Column[Any]]:
    return [
        Column("entry_id", EntryId, primary_key=True, autoincrement=True),
        Column(
            "transaction_id",
            String(40),
            ForeignKey("ledger_transactions.transaction_id"),
            nullable=False,
        ),
        Column("account_id", String(96), ForeignKey("ledger_accounts.account_id"), nullable=False),
        Column("amount", BigInteger, nullable=False),
        Column("balance_after", BigInteger),
        Column("created_at", DateTime(timezone=True), nullable=False),
    ]


# Version 2: the hash chain (see ledger.chain). Kept apart from the v1 columns, whose DDL is frozen.


def _accounts_chain_columns() -> list[Column[Any]]:
    # seq: entries in the account's chain (stays 0 on a passive account: it is not chained);
    # head_hash: the hash of its last entry, GENESIS before the first.
    return [
        Column("seq", BigInteger, nullable=False, server_default="0"),
        Column("head_hash", String(64), nullable=False, server_default=GENESIS),
    ]


def _transactions_chain_columns() -> list[Column[Any]]:
    return [Column("digest", String(64), nullable=False, server_default="")]


def _entries_chain_columns() -> list[Column[Any]]:
    # NULL on the entries of passive accounts, which are not chained.
    return [
        Column("seq", BigInteger),
        Column("prev_hash", String(64)),
        Column("hash", String(64)),
    ]


# Version 3: holds (two-phase movements). `held` is the sum of what active holds still reserve.


def _accounts_hold_columns() -> list[Column[Any]]:
    return [Column("held", BigInteger, nullable=False, server_default="0")]


def _holds_columns() -> list[Column[Any]]:
    return [
        Column("hold_id", String(40), primary_key=True),
        Column("account_id", String(96), ForeignKey("ledger_accounts.account_id"), nullable=False),
        Column("counter_account_id", String(96), nullable=False),
        Column("amount", BigInteger, nullable=False),
        Column("captured", BigInteger, nullable=False),
        Column("status", String(16), nullable=False),
        Column("owner", String(64), nullable=False),
        Column("kind", String(32), nullable=False),
        Column("reference", String(128), nullable=False),
        Column("expires_at", DateTime(timezone=True)),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    ]


# Version 4: frozen accounts (an account in clawback debt may not spend).


def _accounts_freeze_columns() -> list[Column[Any]]:
    return [Column("frozen", Boolean, nullable=False, server_default=sa.false())]


_BALANCE_RULE = "allow_negative OR balance >= 0"
_HOLD_RULES = ("amount > 0", "captured >= 0 AND captured <= amount")


def _accounts_head_time_columns() -> list[Column[Any]]:
    # Version 10: the time of the account's newest entry (NULL: none since v10), so a posting is
    # never dated before it, whichever replica's clock it was read from.
    return [Column("head_at", DateTime(timezone=True))]


accounts = Table(
    "ledger_accounts",
    metadata,
    *_accounts_columns(),
    *_accounts_chain_columns(),
    *_accounts_hold_columns(),
    *_accounts_freeze_columns(),
    *_accounts_head_time_columns(),
    CheckConstraint(_BALANCE_RULE),
)


# Version 7: a hold keeps the request that placed it (`<scope>/<request id>`, unique where set), so the
# same request sent again after the service purged its idempotency record finds the hold it placed
# instead of placing a second one.
_HOLDS_PLACED_UNDER = "ix_ledger_holds_placed_under"
_PLACED_UNDER_SET = sa.text("placed_under IS NOT NULL")


def _holds_request_columns() -> list[Column[Any]]:
    return [Column("placed_under", String(320))]


holds = Table(
    "ledger_holds",
    metadata,
    *_holds_columns(),
    *_holds_request_columns(),
    *(CheckConstraint(rule) for rule in _HOLD_RULES),
    Index("ix_ledger_holds_account", "account_id", "status"),
    Index("ix_ledger_holds_expiry", "status", "expires_at"),
)


def _transactions_actor_columns() -> list[Column[Any]]:
    # Version 5: the user the calling service acted for ("" when it acted on its own).
    return [Column("acting_user", String(64), nullable=False, server_default="")]


transactions = Table(
    "ledger_transactions",
    metadata,
    *_transactions_columns(),
    *_transactions_chain_columns(),
    *_transactions_actor_columns(),
)


# Version 6: the ledger at scale. Each entry carries its transaction's kind (so a kind filter is an index
# range, not a walk of the account), history is indexed by time, entries by transaction (the audit
# fetches a page's legs), and the audit keeps its runs and the chain heads it verified.


def _entries_kind_columns() -> list[Column[Any]]:
    # NULL only before migration 6 backfills it; the audit checks it against the transaction's kind
    # (a NULL since is a finding: it would drop the entry from kind filters and statements).
    return [Column("kind", String(32))]


_ENTRY_INDEXES_V6 = {
    "ix_ledger_entries_account_time": ["account_id", "created_at", "entry_id"],
    "ix_ledger_entries_account_kind_time": ["account_id", "kind", "created_at", "entry_id"],
    "ix_ledger_entries_transaction": ["transaction_id"],
}


def _audit_checkpoints_columns() -> list[Column[Any]]:
    # The head of each chain as of the last clean audit: where the next incremental audit starts.
    return [
        Column("account_id", String(96), primary_key=True),
        Column("seq", BigInteger, nullable=False),
        Column("hash", String(64), nullable=False),
        Column("balance", BigInteger, nullable=False),
        Column("verified_at", DateTime(timezone=True), nullable=False),
    ]


def _audit_runs_columns() -> list[Column[Any]]:
    return [
        Column("run_id", String(40), primary_key=True),
        Column("mode", String(16), nullable=False),
        Column("started_at", DateTime(timezone=True), nullable=False),
        Column("finished_at", DateTime(timezone=True), nullable=False),
        Column("ok", Boolean, nullable=False),
        # Whether the checkpoints were moved to the heads this run verified (a clean run whose
        # write did not collide with another audit's).
        Column("checkpointed", Boolean, nullable=False),
        Column("entries_checked", BigInteger, nullable=False),
        Column("transactions_checked", BigInteger, nullable=False),
        # The newest entry id at the run's snapshot: where the next incremental run starts reading.
        Column("entry_watermark", BigInteger, nullable=False),
        Column("report", Text, nullable=False),  # the findings, as JSON
    ]


entries = Table(
    "ledger_entries",
    metadata,
    *_entries_columns(),
    *_entries_chain_columns(),
    *_entries_kind_columns(),
    CheckConstraint("amount <> 0"),
    Index("ux_ledger_entries_account_seq", "account_id", "seq", unique=True),
    *(Index(name, *columns) for name, columns in _ENTRY_INDEXES_V6.items()),
)
audit_checkpoints = Table("ledger_audit_checkpoints", metadata, *_audit_checkpoints_columns())
audit_runs = Table(
    "ledger_audit_runs",
    metadata,
    *_audit_runs_columns(),
    Index("ix_ledger_audit_runs_finished", "finished_at"),
)


def create_ledger_tables_v1(op: Operations) -> None:
    """Frozen DDL of the ledger's first version, for a service's first migration."""
    op.create_table(
        "ledger_accounts",
        *_accounts_columns(),
        CheckConstraint(_BALANCE_RULE, name="ck_ledger_accounts_balance"),
    )
    op.create_table(
        "ledger_transactions",
        *_transactions_columns(),
    )
    op.create_index(
        "ux_ledger_transactions_request",
        "ledger_transactions",
        ["caller", "request_id"],
        unique=True,
    )
    op.create_table(
        "ledger_entries",
        *_entries_columns(),
        CheckConstraint("amount <> 0", name="ck_ledger_entries_amount"),
    )
    op.create_index("ix_ledger_entries_account_entry", "ledger_entries", ["account_id", "entry_id"])


def upgrade_ledger_tables_v2(op: Operations) -> None:
    """Frozen DDL of the ledger's second version (the hash chain), for a service's migration 0002.

    Adds the chain columns, backfills them over the existing rows (each transaction's digest; each
    balance-keeping account's entries chained in entry order) and adds the unique (account_id, seq)
    index. Works on SQLite (batch mode; adding columns needs no table copy) and PostgreSQL.
    """
    with op.batch_alter_table("ledger_accounts") as batch:
        for column in _accounts_chain_columns():
            batch.add_column(column)
    with op.batch_alter_table("ledger_transactions") as batch:
        for column in _transactions_chain_columns():
            batch.add_column(column)
    with op.batch_alter_table("ledger_entries") as batch:
        for column in _entries_chain_columns():
            batch.add_column(column)
    _backfill_chain_v2(op.get_bind())
    op.create_index(
        "ux_ledger_entries_account_seq", "ledger_entries", ["account_id", "seq"], unique=True
    )


def _backfill_chain_v2(bind: Connection) -> None:
    """Digest every existing transaction and chain every keeping account's entries, in entry order."""
    ledger_accounts = sa.table(
        "ledger_accounts",
        sa.column("account_id", String),
        sa.column("keeps_balance", Boolean),
        sa.column("seq", BigInteger),
        sa.column("head_hash", String),
    )
    ledger_transactions = sa.table(
        "ledger_transactions",
        sa.column("transaction_id", String),
        sa.column("kind", String),
        sa.column("reference", String),
        sa.column("request_id", String),
        sa.column("caller", String),
        sa.column("policy_version", String),
        sa.column("trace_id", String),
        sa.column("created_at", DateTime(timezone=True)),
        sa.column("digest", String),
    )
    ledger_entries = sa.table(
        "ledger_entries",
        sa.column("entry_id", BigInteger),
        sa.column("transaction_id", String),
        sa.column("account_id", String),
        sa.column("amount", BigInteger),
        sa.column("balance_after", BigInteger),
        sa.column("created_at", DateTime(timezone=True)),
        sa.column("seq", BigInteger),
        sa.column("prev_hash", String),
        sa.column("hash", String),
    )
    rows = bind.execute(
        sa.select(
            ledger_entries.c.entry_id,
            ledger_entries.c.transaction_id,
            ledger_entries.c.account_id,
            ledger_entries.c.amount,
            ledger_entries.c.balance_after,
            ledger_entries.c.created_at,
        ).order_by(ledger_entries.c.entry_id)
    ).all()
    legs: dict[str, list[tuple[str, int, int | None, Any]]] = {}
    for row in rows:
        legs.setdefault(row.transaction_id, []).append(
            (row.account_id, row.amount, row.balance_after, row.created_at)
        )
    digests = {
        tx.transaction_id: transaction_digest(
            transaction_id=tx.transaction_id,
            kind=tx.kind,
            reference=tx.reference,
            request_id=tx.request_id,
            caller=tx.caller,
            policy_version=tx.policy_version,
            trace_id=tx.trace_id,
            created_at=tx.created_at,
            entries=legs.get(tx.transaction_id, []),
        )
        for tx in bind.execute(sa.select(ledger_transactions))
    }
    if digests:
        bind.execute(
            sa.update(ledger_transactions)
            .where(ledger_transactions.c.transaction_id == sa.bindparam("b_id"))
            .values(digest=sa.bindparam("b_digest")),
            [{"b_id": tid, "b_digest": digest} for tid, digest in digests.items()],
        )
    chained = set(
        bind.execute(
            sa.select(ledger_accounts.c.account_id).where(ledger_accounts.c.keeps_balance)
        ).scalars()
    )
    heads: dict[str, tuple[int, str]] = {}
    links: list[dict[str, Any]] = []
    for row in rows:
        if row.account_id not in chained:
            continue
        seq, prev_hash = heads.get(row.account_id, (0, GENESIS))
        seq += 1
        digest = digests.get(row.transaction_id, "")
        link = entry_hash(
            prev_hash=prev_hash,
            account_id=row.account_id,
            seq=seq,
            amount=row.amount,
            balance_after=row.balance_after,
            transaction_id=row.transaction_id,
            digest=digest,
        )
        heads[row.account_id] = (seq, link)
        links.append({"b_id": row.entry_id, "b_seq": seq, "b_prev": prev_hash, "b_hash": link})
    if links:
        bind.execute(
            sa.update(ledger_entries)
            .where(ledger_entries.c.entry_id == sa.bindparam("b_id"))
            .values(
                seq=sa.bindparam("b_seq"),
                prev_hash=sa.bindparam("b_prev"),
                hash=sa.bindparam("b_hash"),
            ),
            links,
        )
    if heads:
        bind.execute(
            sa.update(ledger_accounts)
            .where(ledger_accounts.c.account_id == sa.bindparam("b_id"))
            .values(seq=sa.bindparam("b_seq"), head_hash=sa.bindparam("b_head")),
            [
                {"b_id": account, "b_seq": seq, "b_head": head}
                for account, (seq, head) in heads.items()
            ],
        )


def upgrade_ledger_tables_v3(op: Operations) -> None:
    """Frozen DDL of the ledger's third version (holds), for a service's migration 0003."""
    with op.batch_alter_table("ledger_accounts") as batch:
        for column in _accounts_hold_columns():
            batch.add_column(column)
    op.create_table(
        "ledger_holds",
        *_holds_columns(),
        CheckConstraint(_HOLD_RULES[0], name="ck_ledger_holds_amount"),
        CheckConstraint(_HOLD_RULES[1], name="ck_ledger_holds_captured"),
    )
    op.create_index("ix_ledger_holds_account", "ledger_holds", ["account_id", "status"])
    op.create_index("ix_ledger_holds_expiry", "ledger_holds", ["status", "expires_at"])


def downgrade_ledger_tables_v3(op: Operations) -> None:
    op.drop_table("ledger_holds")
    op.drop_column("ledger_accounts", "held")


def upgrade_ledger_tables_v4(op: Operations) -> None:
    """Frozen DDL of the ledger's fourth version (frozen accounts), for a service's migration 0005.
    A plain ADD COLUMN (no table copy: other tables' foreign keys point at this one)."""
    with op.batch_alter_table("ledger_accounts", recreate="never") as batch:
        for column in _accounts_freeze_columns():
            batch.add_column(column)


def downgrade_ledger_tables_v4(op: Operations) -> None:
    op.drop_column("ledger_accounts", "frozen")


def upgrade_ledger_tables_v5(op: Operations) -> None:
    """Frozen DDL of the ledger's fifth version (who a transaction was for)."""
    with op.batch_alter_table("ledger_transactions", recreate="never") as batch:
        for column in _transactions_actor_columns():
            batch.add_column(column)


def downgrade_ledger_tables_v5(op: Operations) -> None:
    op.drop_column("ledger_transactions", "acting_user")


def upgrade_ledger_tables_v6(op: Operations) -> None:
    """Frozen DDL of the ledger's sixth version (the ledger at scale), for a service's migration.

    The backfill of each entry's kind is one set-based UPDATE, run by the owner with the append-only
    triggers off around it (PostgreSQL: disabled inside the migration's transaction; SQLite: dropped
    and remade). Indexes are built after the backfill, once.
    """
    with op.batch_alter_table("ledger_entries", recreate="never") as batch:
        for column in _entries_kind_columns():
            batch.add_column(column)
    backfill = (
        "UPDATE ledger_entries SET kind = (SELECT t.kind FROM ledger_transactions t "
        "WHERE t.transaction_id = ledger_entries.transaction_id) WHERE kind IS NULL"
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE ledger_entries DISABLE TRIGGER USER")
        op.execute(
            "UPDATE ledger_entries AS e SET kind = t.kind FROM ledger_transactions AS t "
            "WHERE t.transaction_id = e.transaction_id AND e.kind IS NULL"
        )
        op.execute("ALTER TABLE ledger_entries ENABLE TRIGGER USER")
    else:
        from runtime.migrations import drop_append_only, make_append_only  # alembic: see above

        drop_append_only(op, "ledger_entries")
        op.execute(backfill)
        make_append_only(op, "ledger_entries")
    for name, columns in _ENTRY_INDEXES_V6.items():
        op.create_index(name, "ledger_entries", columns)
    op.drop_index("ix_ledger_entries_account_entry", "ledger_entries")
    op.create_table("ledger_audit_checkpoints", *_audit_checkpoints_columns())
    op.create_table("ledger_audit_runs", *_audit_runs_columns())
    op.create_index("ix_ledger_audit_runs_finished", "ledger_audit_runs", ["finished_at"])


def downgrade_ledger_tables_v6(op: Operations) -> None:
    op.drop_table("ledger_audit_runs")
    op.drop_table("ledger_audit_checkpoints")
    op.create_index("ix_ledger_entries_account_entry", "ledger_entries", ["account_id", "entry_id"])
    for name in _ENTRY_INDEXES_V6:
        op.drop_index(name, "ledger_entries")
    with op.batch_alter_table("ledger_entries", recreate="never") as batch:
        batch.drop_column("kind")


def upgrade_ledger_tables_v7(op: Operations) -> None:
    """Frozen DDL of the ledger's seventh version (a hold keeps the request that placed it)."""
    with op.batch_alter_table("ledger_holds", recreate="never") as batch:
        for column in _holds_request_columns():
            batch.add_column(column)
    op.create_index(
        _HOLDS_PLACED_UNDER,
        "ledger_holds",
        ["placed_under"],
        unique=True,
        postgresql_where=_PLACED_UNDER_SET,
        sqlite_where=_PLACED_UNDER_SET,
    )


def downgrade_ledger_tables_v7(op: Operations) -> None:
    op.drop_index(_HOLDS_PLACED_UNDER, table_name="ledger_holds")
    with op.batch_alter_table("ledger_holds", recreate="never") as batch:
        batch.drop_column("placed_under")


def upgrade_ledger_tables_v8(op: Operations) -> None:
    """Frozen DDL of the ledger's eighth version: the key that makes entry ids opaque to callers
    (ledger.entry_ids), random per database and written once: append-only, since a changed key
    would rename every entry."""
    import secrets

    from runtime.migrations import make_append_only  # alembic: see upgrade_ledger_tables_v6

    table = op.create_table(
        "ledger_secrets",
        Column("name", String(32), primary_key=True),
        Column("value", sa.LargeBinary, nullable=False),
    )
    assert table is not None
    op.bulk_insert(table, [{"name": "entry_ids", "value": secrets.token_bytes(16)}])
    make_append_only(op, "ledger_secrets")


def downgrade_ledger_tables_v8(op: Operations) -> None:
    from runtime.migrations import drop_append_only

    drop_append_only(op, "ledger_secrets")
    op.drop_table("ledger_secrets")


_V9_UPDATABLE = ("balance", "seq", "head_hash", "held", "frozen")
ACCOUNT_COLUMNS_POSTINGS_CHANGE = (*_V9_UPDATABLE, "head_at")
"""What postings, holds and freezes change on an account: all the service role may update."""


def upgrade_ledger_tables_v9(op: Operations) -> None:
    """Frozen DDL of the ledger's ninth version (PostgreSQL): the service role may update only
    `_V9_UPDATABLE` of an account, not `allow_negative`, which the audit's
    negative-balance check reads (a review set it as the service role: a user went below zero and
    the audit stayed clean), nor `kind` or `keeps_balance`, all written once when it opens."""
    if op.get_bind().dialect.name != "postgresql":
        return
    from runtime.migrations import SERVICE_ROLE  # alembic: see upgrade_ledger_tables_v6

    columns = ", ".join(_V9_UPDATABLE)
    op.execute(
        f"""DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{SERVICE_ROLE}') THEN
    REVOKE UPDATE ON ledger_accounts FROM {SERVICE_ROLE};
    GRANT UPDATE ({columns}) ON ledger_accounts TO {SERVICE_ROLE};
  END IF;
END $$"""
    )


def downgrade_ledger_tables_v9(op: Operations) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    from runtime.migrations import SERVICE_ROLE

    columns = ", ".join(_V9_UPDATABLE)
    op.execute(
        f"""DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{SERVICE_ROLE}') THEN
    REVOKE UPDATE ({columns}) ON ledger_accounts FROM {SERVICE_ROLE};
    GRANT UPDATE ON ledger_accounts TO {SERVICE_ROLE};
  END IF;
END $$"""
    )


def upgrade_ledger_tables_v10(op: Operations) -> None:
    """Frozen DDL of the ledger's tenth version: each account keeps the time of its newest entry
    (`head_at`), and a posting is dated no earlier, so an account's entries are in time order
    whatever the skew between the replicas' clocks (a review's two replicas 15 ms apart gave a
    statement whose opening and movements did not add up to its closing). NULL until the
    account's next posting: expand-only, nothing rewritten."""
    with op.batch_alter_table("ledger_accounts", recreate="never") as batch:
        for column in _accounts_head_time_columns():
            batch.add_column(column)
    if op.get_bind().dialect.name == "postgresql":
        from runtime.migrations import SERVICE_ROLE  # alembic: see upgrade_ledger_tables_v6

        op.execute(
            f"""DO $$ BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{SERVICE_ROLE}') THEN
    GRANT UPDATE (head_at) ON ledger_accounts TO {SERVICE_ROLE};
  END IF;
END $$"""
        )


def downgrade_ledger_tables_v10(op: Operations) -> None:
    with op.batch_alter_table("ledger_accounts", recreate="never") as batch:
        batch.drop_column("head_at")
