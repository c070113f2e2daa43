"""Alembic migrations, one history per service, run at start-up or from the alembic CLI.

Each service keeps its revisions in `services/<name>/migrations/versions/` and a two-line env.py that
calls `run_env()`. At start-up `upgrade()` shares the service's async engine with Alembic (the cookbook's
"connection sharing" recipe), so there is no second database driver.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import command, context
from alembic.config import Config
from alembic.operations import Operations
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from runtime.db import Database


def alembic_config(migrations_dir: Path, url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


async def upgrade(db: Database, migrations_dir: Path, revision: str = "head") -> None:
    """Bring the service's database to `revision` (idempotent: nothing happens when it is there)."""
    config = alembic_config(migrations_dir, db.url)

    def run(connection: Connection) -> None:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    async with db.engine.begin() as conn:
        await conn.run_sync(run)


_MIGRATION_LOCK = 0x636F696E5F6D6967  # "coins_mig": one advisory lock key, per database
"""Replicas starting at once each migrate their service's database: the first takes this lock, the
others wait for its commit and then find the schema at head (without it they failed on the tables
the first was creating)."""


async def behind(db: Database, migrations_dir: Path) -> tuple[str | None, str] | None:
    """(the database's revision, the code's head) when the database is behind the code (never
    migrated, or at an older revision); None when it is at head, or at a revision this code does
    not know (newer: a rollback of the code after an additive migration still runs)."""

    script = ScriptDirectory.from_config(alembic_config(migrations_dir, db.url))
    head = script.get_current_head()
    assert head is not None

    def read(connection: Connection) -> str | None:
        if not sa.inspect(connection).has_table("alembic_version"):
            return None
        value = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        return None if value is None else str(value)

    async with db.engine.connect() as conn:
        current = await conn.run_sync(read)
    known = {revision.revision for revision in script.walk_revisions()}
    if current == head or (current is not None and current not in known):
        return None
    return current, head


def _migrate(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None, render_as_batch=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":  # held until the migration commits
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        context.run_migrations()


async def _migrate_url(url: str) -> None:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(_migrate)
    await engine.dispose()


def run_env() -> None:
    """The body of every service's env.py."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
    else:
        url = context.config.get_main_option("sqlalchemy.url")
        if not url:
            raise SystemExit(
                "set sqlalchemy.url (alembic -x or alembic.ini) to migrate from the CLI"
            )
        asyncio.run(_migrate_url(url))


SERVICE_ROLE = "coins_service"
"""The PostgreSQL role a service's connections act as (`ServiceSettings.database_role`): every right on
its tables except rewriting history (UPDATE, DELETE, TRUNCATE of the append-only ones)."""


_APPEND_ONLY_FUNCTION = (
    "CREATE OR REPLACE FUNCTION coins_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION '% is append-only', TG_TABLE_NAME "
    "USING ERRCODE = 'insufficient_privilege'; END $$"
)


def make_append_only(op: Operations, *tables: str) -> None:
    """Refuse UPDATE and DELETE of `tables` in the database itself (and TRUNCATE on PostgreSQL), for
    every connection, the service's own included: history is corrected by new rows, never rewritten."""
    if op.get_bind().dialect.name == "sqlite":
        for table in tables:
            for action in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                )
        return
    op.execute(_APPEND_ONLY_FUNCTION)
    for table in tables:
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION coins_append_only()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION coins_append_only()"
        )


def forbid_truncate(op: Operations, *tables: str) -> None:
    """On PostgreSQL, refuse TRUNCATE of `tables` to every connection, the tables' owner included
    (row triggers do not fire on TRUNCATE). SQLite has no TRUNCATE: its `DELETE` without a `WHERE`
    fires the row triggers."""
    if op.get_bind().dialect.name == "sqlite":
        return
    op.execute(_APPEND_ONLY_FUNCTION)
    for table in tables:
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION coins_append_only()"
        )


def allow_truncate(op: Operations, *tables: str) -> None:
    if op.get_bind().dialect.name != "sqlite":
        for table in tables:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")


def drop_append_only(op: Operations, *tables: str) -> None:
    for table in tables:
        if op.get_bind().dialect.name == "sqlite":
            for action in ("update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{action}")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")


def grant_service_role(op: Operations, *, append_only: Sequence[str]) -> None:
    """On PostgreSQL, create SERVICE_ROLE if missing (when the migrating user may) and grant it this
    database's tables, present and future, without UPDATE, DELETE or TRUNCATE on `append_only`.
    Migrations keep running as the login user, which owns the tables."""
    if op.get_bind().dialect.name != "postgresql":
        return
    role = SERVICE_ROLE
    op.execute(
        f"""DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN
    CREATE ROLE {role} NOLOGIN;
  END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$"""
    )
    revoked = ", ".join(append_only)
    for statement in (
        f"GRANT USAGE ON SCHEMA public TO {role}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
        f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {role}",
        "ALTER DEFAULT PRIVILEGES IN SCHEMA public "
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role}",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {role}",
        f"REVOKE UPDATE, DELETE, TRUNCATE ON {revoked} FROM {role}",
    ):
        op.execute(statement)


def leave_room_for_updates(op: Operations, fillfactors: Mapping[str, int]) -> None:
    """On PostgreSQL, keep `100 - fillfactor`% of each page of these tables free, for tables whose
    rows are updated all the time (a creator's totals on every batch of credits, an account's
    balance on every posting). A row's new version then fits on its own page (a HOT update: no new
    index entries), and the next statement to read the page prunes the dead versions, between
    autovacuum's visits (a minute apart by default) or without it: measured on payout's `creators`
    (200 rows, 500-credit batches, autovacuum off), dead versions grew without bound at the default
    fillfactor (185k after 30 s; PostgreSQL CPU per batch 30 -> 118 ms) and leveled off at ~16k at
    30. Pages written from now on leave the room; a table's existing pages get it when it is next
    rewritten (VACUUM FULL, pg_repack). Only a table setting changes: no rewrite, and its lock
    (SHARE UPDATE EXCLUSIVE) blocks no read or write."""
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, fillfactor in fillfactors.items():
        op.execute(f"ALTER TABLE {table} SET (fillfactor = {int(fillfactor)})")


def restore_default_fill(op: Operations, *tables: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in tables:
        op.execute(f"ALTER TABLE {table} RESET (fillfactor)")


def merge_edge_request_ids(op: Operations) -> None:
    """Request ids the admin console's calls recorded join the gateway's, where a user's own
    requests are kept whichever edge carries them (`runtime.idempotency.caller_scope`), so a retry
    of one sent before the upgrade is still answered, not applied again. A request id both edges
    recorded (the defect this fixes) keeps the gateway's record."""
    op.execute(
        "UPDATE idempotency_keys SET scope = 'gateway|' || substr(scope, 15) "
        "WHERE scope LIKE 'admin-console|%' AND NOT EXISTS (SELECT 1 FROM idempotency_keys k "
        "WHERE k.scope = 'gateway|' || substr(idempotency_keys.scope, 15) "
        "AND k.request_id = idempotency_keys.request_id)"
    )
