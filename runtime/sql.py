"""The hot paths' SQL, built once and run on the database driver itself.

Profiles of the gift path showed SQLAlchemy statement building, compiling and result handling taking
55-67% of each service's CPU, and one round trip per statement plus BEGIN, COMMIT and a pre-ping per
checkout. The storage functions on the money path therefore write their SQL once, as a `Statement`, and
run it through a `Tx`:

- on PostgreSQL, straight on an asyncpg connection from a pool of the service's own (asyncpg prepares
  and caches each statement per connection, so a call is one Bind/Execute round trip);
- on SQLite, on a `sqlite3` connection called directly on the event loop: a statement on a local WAL
  file takes microseconds (commits do not fsync with synchronous=NORMAL), far less than the thread hop
  per cursor operation that aiosqlite costs; writes still queue on the process's one write lock;
- inside a transaction that SQLAlchemy already opened (`ConnTx`), so code shared with the slower paths
  (the ledger's postings, request ids) has one implementation of its SQL.

Storage modules stay the only place that knows SQL: a `Statement` lives beside the functions that run
it. Each unit of work is one span (`db.transaction` / `db.query`) naming its statements in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import json
import logging
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, cast

import asyncpg
from opentelemetry import trace

from runtime import deadlines
from runtime.metrics import close_commit_scope, open_commit_scope
from runtime.outages import refused_connection, sqlite_busy

if TYPE_CHECKING:  # not imported at run time: the audit job uses this module without SQLAlchemy
    from sqlalchemy.ext.asyncio import AsyncConnection

_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")
TRACER_SCOPE = "coins.db"


class Statement:
    """One SQL statement with `:name` parameters, translated once per dialect.

    `postgres=` gives PostgreSQL its own text where the portable one would be slower (a data-modifying
    CTE that saves round trips, `unnest` arrays for batches); SQLite then runs `sql`.
    """

    def __init__(self, name: str, sql: str, *, postgres: str | None = None) -> None:
        self.name = name
        self.sqlite = sql
        pg = postgres if postgres is not None else sql
        order: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) not in order:
                order.append(match.group(1))
            return f"${order.index(match.group(1)) + 1}"

        self.postgres = _PARAM.sub(number, pg)
        self.order = tuple(order)

    def pg_args(self, params: Mapping[str, Any]) -> list[Any]:
        return [params[name] for name in self.order]

    def __repr__(self) -> str:
        return f"Statement({self.name!r})"


def sqlite_value(value: Any) -> Any:
    """A parameter as SQLAlchemy stores it on SQLite (so both paths read each other's rows); a list
    as JSON text, for `IN (SELECT value FROM json_each(:list))` where PostgreSQL takes `= ANY(:list)`."""
    if isinstance(value, list):
        return json.dumps(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.isoformat(sep=" ", timespec="microseconds")
    return value


def _sqlite_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {key: sqlite_value(value) for key, value in params.items()}


class Tx(Protocol):
    """Statements in one unit of work (a transaction, or a single read)."""

    dialect: str
    """'postgresql' or 'sqlite': for the few storage functions that shape a batch per dialect."""

    async def one(self, statement: Statement, **params: Any) -> Sequence[Any] | None:
        """The first row (a tuple-like record), or None."""
        ...

    async def all(self, statement: Statement, **params: Any) -> Sequence[Sequence[Any]]: ...

    async def run(self, statement: Statement, **params: Any) -> int:
        """Execute; the number of rows it changed."""
        ...

    async def run_many(self, statement: Statement, rows: Sequence[Mapping[str, Any]]) -> int:
        """Execute once per parameter set, in one call to the driver (SQLite's executemany loops in
        C); the number of rows changed in all. PostgreSQL's hot paths send arrays to one statement
        instead, which is one round trip."""
        ...


class _Traced:
    def __init__(self) -> None:
        self.statements: list[str] = []


class PgTx(_Traced):
    dialect = "postgresql"

    def __init__(self, conn: asyncpg.Connection) -> None:
        super().__init__()
        self._conn = conn

    async def one(self, statement: Statement, **params: Any) -> Sequence[Any] | None:
        self.statements.append(statement.name)
        row: Sequence[Any] | None = await self._conn.fetchrow(
            statement.postgres, *statement.pg_args(params)
        )
        return row

    async def all(self, statement: Statement, **params: Any) -> Sequence[Sequence[Any]]:
        self.statements.append(statement.name)
        rows: Sequence[Sequence[Any]] = await self._conn.fetch(
            statement.postgres, *statement.pg_args(params)
        )
        return rows

    async def run(self, statement: Statement, **params: Any) -> int:
        self.statements.append(statement.name)
        status: str = await self._conn.execute(statement.postgres, *statement.pg_args(params))
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def run_many(self, statement: Statement, rows: Sequence[Mapping[str, Any]]) -> int:
        changed = 0
        for params in rows:  # asyncpg's executemany answers no row counts
            changed += await self.run(statement, **params)
        return changed


class SqliteTx(_Traced):
    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        super().__init__()
        self._conn = conn

    async def one(self, statement: Statement, **params: Any) -> Sequence[Any] | None:
        self.statements.append(statement.name)
        row: Sequence[Any] | None = self._conn.execute(
            statement.sqlite, _sqlite_params(params)
        ).fetchone()
        return row

    async def all(self, statement: Statement, **params: Any) -> Sequence[Sequence[Any]]:
        self.statements.append(statement.name)
        return self._conn.execute(statement.sqlite, _sqlite_params(params)).fetchall()

    async def run(self, statement: Statement, **params: Any) -> int:
        self.statements.append(statement.name)
        return self._conn.execute(statement.sqlite, _sqlite_params(params)).rowcount

    async def run_many(self, statement: Statement, rows: Sequence[Mapping[str, Any]]) -> int:
        self.statements.append(f"{statement.name} x{len(rows)}")
        return self._conn.executemany(statement.sqlite, map(_sqlite_params, rows)).rowcount


class ConnTx:
    """A `Tx` inside a transaction SQLAlchemy opened (traced by SQLAlchemy's instrumentation)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.dialect = conn.dialect.name

    async def _execute(self, statement: Statement, params: Mapping[str, Any]) -> Any:
        if self.dialect == "postgresql":
            return await self.conn.exec_driver_sql(
                statement.postgres, tuple(statement.pg_args(params))
            )
        return await self.conn.exec_driver_sql(statement.sqlite, _sqlite_params(params))

    async def one(self, statement: Statement, **params: Any) -> Sequence[Any] | None:
        row: Sequence[Any] | None = (await self._execute(statement, params)).first()
        return row

    async def all(self, statement: Statement, **params: Any) -> Sequence[Sequence[Any]]:
        rows: Sequence[Sequence[Any]] = (await self._execute(statement, params)).all()
        return rows

    async def run(self, statement: Statement, **params: Any) -> int:
        return int((await self._execute(statement, params)).rowcount)

    async def run_many(self, statement: Statement, rows: Sequence[Mapping[str, Any]]) -> int:
        changed = 0
        for params in rows:
            changed += await self.run(statement, **params)
        return changed


def as_tx(conn: AsyncConnection | Tx) -> Tx:
    """Shared SQL takes either an SQLAlchemy connection (slow paths) or a driver `Tx` (hot paths)."""
    if isinstance(conn, PgTx | SqliteTx | ConnTx):
        return conn
    return ConnTx(cast("AsyncConnection", conn))


def is_conflict(error: BaseException) -> bool:
    """A unique key taken by a concurrent transaction: retrying reads what that one committed."""
    if isinstance(error, asyncpg.UniqueViolationError):
        return True
    return isinstance(error, sqlite3.IntegrityError) and "UNIQUE" in str(error)


def is_transient(error: BaseException) -> bool:
    """A deadlock or serialization failure: PostgreSQL rolled the transaction back, and running it
    again may well succeed."""
    return isinstance(error, (asyncpg.DeadlockDetectedError, asyncpg.SerializationError))


SQLITE_MIN_FREE_BYTES = 4 << 20
"""Below this much room on a SQLite file's disk the service reports NOT_SERVING: its writes fail
(SQLITE_FULL) while its reads still answer."""

SQLITE_LOCK_PATIENCE = 5.0
"""Seconds a write waits for SQLite's write lock held by another process (an operator's `sqlite3`
shell, a tool) before the call is answered UNAVAILABLE."""


def _sqlite_connect(path: str, *, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    return conn


async def _begin_immediate(conn: sqlite3.Connection, patience: float) -> None:
    """Take the write lock without blocking the event loop: the writer's busy timeout is 0, so a lock
    held by another process fails at once and is tried again after an asyncio sleep (1 ms doubling to
    50 ms), until `patience` runs out (then SQLite's "database is locked": UNAVAILABLE) or the
    call's deadline does. With SQLite's own busy wait, that process would freeze every call, health
    check and stream of this service for up to the busy timeout."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + patience
    delay = 0.001
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as error:
            if not sqlite_busy(error) or loop.time() >= give_up:
                raise
        deadlines.check("the database's write lock was free")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def _reset(conn: asyncpg.Connection) -> None:
    """Pool release: roll back a transaction left open (a cancelled call), nothing else. asyncpg's
    default reset is a round trip on every release (advisory unlock, CLOSE ALL, RESET ALL)."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


class _UnitSpan:
    """One span per unit of work, naming its statements in order (a plain context manager: this is
    on every hot call, and an async generator per call costs more than the span)."""

    __slots__ = ("_span", "_unit")

    def __init__(self, span: trace.Span, system: str, unit: PgTx | SqliteTx) -> None:
        span.set_attribute("db.system", system)
        self._span, self._unit = span, unit

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            self._span.set_attribute("db.outcome", kind.__name__)
        self._span.set_attribute("db.statements", self._unit.statements)
        self._span.end()


logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)
"""While the database is down, asyncpg's pool logs a stack trace at each try to reconnect in the
background; the service itself says the database is unreachable, once per failed call or job."""


class Driver:
    """The driver-level access to one service database (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        sqlite_path: str | None,
        write_lock: asyncio.Lock | None,
        tracer_provider: trace.TracerProvider | None,
        pool_size: int = 10,
        server_settings: dict[str, str] | None = None,
    ) -> None:
        self._dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
        self._sqlite_path = sqlite_path
        self._write_lock = write_lock
        self._pool_size = pool_size
        self._server_settings = server_settings or {}
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._tracer = trace.get_tracer(TRACER_SCOPE, tracer_provider=tracer_provider)
        self._system = "sqlite" if sqlite_path is not None else "postgresql"

    @property
    def is_postgres(self) -> bool:
        return self._sqlite_path is None

    def check_room(self) -> None:
        """On SQLite, raise the outage a (nearly) full disk is (ENOSPC): health then says
        NOT_SERVING while every write would fail, though reads, and so a read ping, still answer.
        PostgreSQL reports its own full disk to every write."""
        if self._sqlite_path is None:
            return
        folder = os.path.dirname(os.path.abspath(self._sqlite_path))
        stats = os.statvfs(folder)
        if stats.f_bavail * stats.f_frsize < SQLITE_MIN_FREE_BYTES:
            raise OSError(errno.ENOSPC, f"no room left on the disk of {folder}")

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled PostgreSQL connection; the server refusing a new one is an outage
        (runtime.outages.DatabaseRefused), not a bug."""
        try:
            pool = await self._pg()
            conn = await pool.acquire()
        except asyncpg.PostgresError as error:
            if (refused := refused_connection(error)) is None:
                raise
            raise refused from error
        try:
            yield conn
        finally:
            await pool.release(conn)

    async def _pg(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=1,
                        max_size=self._pool_size,
                        # A burst's extra connections close after half a minute idle, not five:
                        # each holds a PostgreSQL backend (memory, a max_connections slot).
                        max_inactive_connection_lifetime=30.0,
                        reset=_reset,
                        server_settings=self._server_settings,
                    )
        return self._pool

    def _sqlite(self, *, write: bool) -> sqlite3.Connection:
        assert self._sqlite_path is not None
        if write:
            if self._writer is None:  # never waits inside SQLite: see _begin_immediate
                self._writer = _sqlite_connect(self._sqlite_path, busy_timeout_ms=0)
            return self._writer
        if self._reader is None:
            self._reader = _sqlite_connect(self._sqlite_path)
        return self._reader

    def _span(self, name: str, unit: PgTx | SqliteTx) -> _UnitSpan:
        return _UnitSpan(
            self._tracer.start_span(name, kind=trace.SpanKind.CLIENT), self._system, unit
        )

    @asynccontextmanager
    async def transaction(self, *, single_statement: bool = False) -> AsyncIterator[Tx]:
        """A read-write transaction: committed when the block ends, rolled back if it raises;
        what it counted (runtime.metrics.after_commit) is counted once it has committed.

        `single_statement`: on PostgreSQL the block runs one statement (a data-modifying CTE), which
        is a transaction by itself: no BEGIN and COMMIT round trips. SQLite ignores it (its statements
        cost no round trip, and the storage may run several where PostgreSQL runs one).
        """
        token = open_commit_scope()
        committed = False
        try:
            async with self._transaction(single_statement) as unit:
                yield unit
            committed = True
        finally:
            close_commit_scope(token, committed=committed)

    @asynccontextmanager
    async def _transaction(self, single_statement: bool) -> AsyncIterator[Tx]:
        if self._sqlite_path is None:
            async with self._connection() as conn:
                deadlines.check("the write was sent")
                unit: PgTx | SqliteTx = PgTx(conn)
                if single_statement:
                    with self._span("db.statement", unit):
                        yield unit
                    if len(unit.statements) > 1:
                        raise AssertionError(f"not a single statement: {unit.statements}")
                    return
                with self._span("db.transaction", unit):
                    async with conn.transaction():
                        yield unit
                        deadlines.check("the transaction committed")
            return
        assert self._write_lock is not None
        async with self._write_lock:
            conn = self._sqlite(write=True)
            unit = SqliteTx(conn)
            with self._span("db.transaction", unit):
                await _begin_immediate(conn, SQLITE_LOCK_PATIENCE)
                try:
                    yield unit
                    deadlines.check("the transaction committed")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Tx]:
        """Reads outside a transaction (each statement sees the latest commit; no BEGIN/COMMIT)."""
        if self._sqlite_path is None:
            async with self._connection() as conn:
                unit: PgTx | SqliteTx = PgTx(conn)
                with self._span("db.query", unit):
                    yield unit
            return
        unit = SqliteTx(self._sqlite(write=False))
        with self._span("db.query", unit):
            yield unit

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Tx]:
        """A long read of one moment of the database that may write at its end (an audit recording
        what it verified): REPEATABLE READ on PostgreSQL; on SQLite a deferred transaction on a
        connection of its own (WAL readers see one snapshot; a write at the end fails with
        SQLITE_BUSY if the file changed meanwhile, and the caller decides what that means)."""
        if self._sqlite_path is None:
            async with self._connection() as conn:
                unit: PgTx | SqliteTx = PgTx(conn)
                async with conn.transaction(isolation="repeatable_read"):
                    yield unit
            return
        conn = _sqlite_connect(self._sqlite_path)
        try:
            conn.execute("BEGIN")
            try:
                yield SqliteTx(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    async def listen(
        self,
        channel: str,
        on_notify: Callable[[str], None],
        *,
        on_connect: Callable[[], None] | None = None,
        check_every: float = 5.0,
    ) -> NoReturn:
        """Call `on_notify(payload)` for every PostgreSQL NOTIFY on `channel`, on a connection of
        its own (LISTEN holds it). Never returns: when the connection is lost it raises
        ConnectionError, so the worker running it restarts it; notifications sent meanwhile are
        lost, so `on_connect` runs after each (re)connection to cover the gap."""
        if not self.is_postgres:
            raise RuntimeError("LISTEN/NOTIFY needs PostgreSQL")
        try:
            conn = await asyncpg.connect(self._dsn, server_settings=self._server_settings)
        except Exception as error:  # the server refusing us is an outage, not a bug (review r24)
            if (refused := refused_connection(error)) is None:
                raise
            raise refused from error
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(channel, lambda _c, _pid, _ch, payload: on_notify(payload))
            if on_connect is not None:
                on_connect()
            while True:
                try:
                    await asyncio.wait_for(lost.wait(), check_every)
                except TimeoutError:
                    await conn.execute("SELECT 1")  # a silently dead connection raises here
                else:
                    raise ConnectionError(f"the connection listening on {channel!r} was lost")
        finally:
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        for conn in (self._writer, self._reader):
            if conn is not None:
                conn.close()
        self._writer = self._reader = None
