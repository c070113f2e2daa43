"""The async database: one engine per service, transactions that are safe on SQLite and PostgreSQL.

SQLite allows one writer at a time; rather than have concurrent transactions fail with "database is
locked", writes in a process are queued on an asyncio lock (SQLite's default is one process per file).
On PostgreSQL, transactions run concurrently and correctness comes from conditional updates and unique
constraints, never from read-then-write.

`driver` is the same database for the hot paths, without SQLAlchemy in between (see runtime.sql).
No pre-ping on checkout: it cost a round trip per transaction; a connection broken by a database restart
fails its call once (UNAVAILABLE, retried by the caller) and is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from opentelemetry.trace import TracerProvider
from sqlalchemy import Table, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from runtime import deadlines
from runtime.metrics import close_commit_scope, open_commit_scope
from runtime.outages import refused_connection
from runtime.sql import Driver
from runtime.telemetry import trace_engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _connect_or_refused(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
    """SQLAlchemy's `do_connect` hook: the server refusing a new connection (an error PostgreSQL
    sent while it opened) is the database unavailable to the service, an outage
    (runtime.outages.DatabaseRefused), not a bug."""
    try:
        return dialect.connect(*cargs, **cparams)
    except asyncpg.PostgresError as error:
        if (refused := refused_connection(error)) is None:
            raise
        raise refused from error


class Database:
    """A service's database: `transaction()` for writes, `read()` for reads."""

    def __init__(
        self,
        url: str,
        tracer_provider: TracerProvider | None = None,
        *,
        role: str = "",
        connections: int = 10,
        idle_transaction_timeout: float | None = None,
    ) -> None:
        """`role`: on PostgreSQL, the role every connection acts as (see ServiceSettings.database_role);
        `connections`: at most this many for the calls (ServiceSettings.database_connections);
        `idle_transaction_timeout`: seconds (ServiceSettings.database_idle_transaction_timeout_seconds)."""
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        # A failed statement's error names its SQL, never its bound values (payment tokens,
        # payout e-mail addresses, user ids): they would reach logs and spans.
        options: dict[str, Any] = {"hide_parameters": True}
        server_settings = {"role": role} if role and not self.is_sqlite else {}
        if idle_transaction_timeout and not self.is_sqlite:
            milliseconds = str(max(1, round(idle_transaction_timeout * 1000)))
            server_settings["idle_in_transaction_session_timeout"] = milliseconds
        if not self.is_sqlite:
            slow_paths = min(4, connections)
            options.update(pool_size=slow_paths, max_overflow=connections - slow_paths)
            if server_settings:
                options.update(connect_args={"server_settings": server_settings})
        self.engine = create_async_engine(url, **options)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            event.listen(self.engine.sync_engine, "do_connect", _connect_or_refused)
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        if tracer_provider is not None:
            trace_engine(self.engine, tracer_provider)
        self.driver = Driver(
            url,
            sqlite_path=self.engine.url.database if self.is_sqlite else None,
            write_lock=self._write_lock,
            tracer_provider=tracer_provider,
            server_settings=server_settings,
            pool_size=connections,
        )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A read-write transaction, committed when the block ends and rolled back if it raises;
        what it counted (runtime.metrics.after_commit) is counted once it has committed."""
        token = open_commit_scope()
        committed = False
        try:
            async with self._write_lock or contextlib.nullcontext(), self.engine.begin() as conn:
                yield conn
                deadlines.check("the transaction committed")
            committed = True
        finally:
            close_commit_scope(token, committed=committed)

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[AsyncConnection]:
        """Reads that all see one moment of the database while writes go on (a LIVE's summary, an
        audit comparing one table with another): a read-only REPEATABLE READ transaction on
        PostgreSQL; on SQLite a deferred transaction, which in WAL mode reads one snapshot from its
        first statement on without holding writers back (each statement outside one is its own
        moment: the driver opens no transaction for a read)."""
        async with self.engine.connect() as conn:
            if self._write_lock is None:
                await conn.execution_options(isolation_level="REPEATABLE READ")
                async with conn.begin():
                    await conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                    yield conn
                return
            await conn.exec_driver_sql("BEGIN")
            try:
                yield conn
            finally:
                await conn.rollback()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    async def close(self) -> None:
        await self.driver.close()
        await self.engine.dispose()


async def lock_name(conn: AsyncConnection, name: str) -> None:
    """Serialize the transactions that take the same `name` until each ends: a transaction-scoped
    advisory lock on PostgreSQL (for what has no row to lock: a payment card, a creator's payout
    methods before the first); SQLite serializes every write already."""
    if conn.dialect.name == "postgresql":
        await conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:name, 0))"), {"name": name}
        )


async def insert_new(conn: AsyncConnection, table: Table, values: Mapping[str, Any]) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING: False if a row with that key exists (a concurrent insert
    included), never a unique-violation error."""
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)
    result = await conn.execute(insert.values(**values).on_conflict_do_nothing())
    return result.rowcount == 1


async def upsert(
    conn: AsyncConnection, table: Table, values: Mapping[str, Any], keys: Sequence[str]
) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE: one statement, safe against a concurrent insert."""
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)
    statement = insert.values(**values)
    await conn.execute(
        statement.on_conflict_do_update(
            index_elements=list(keys),
            set_={name: statement.excluded[name] for name in values if name not in keys},
        )
    )
