"""Telling an outage from a bug: a database that cannot be reached (down, restarting, out of
connections, a connection cut mid-statement, SQLite's write lock held too long, its disk full) is
UNAVAILABLE, which
clients and gRPC retry policies retry with the same request id; only real bugs are INTERNAL.

A statement cut off while committing may or may not have been applied: every mutating RPC is
idempotent by its request id, so the same advice holds either way: retry with the same request_id.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TypeVar

import asyncpg
from sqlalchemy import exc as sa_exc

from runtime.errors import Unavailable

T = TypeVar("T")

RETRY_AFTER_SECONDS = 1.0
"""What an outage answer suggests waiting (google.rpc.RetryInfo) before the retry."""

_POSTGRES_OUTAGES = (
    asyncpg.exceptions.PostgresConnectionError,  # 08xxx: the connection failed or is gone
    asyncpg.exceptions.OperatorInterventionError,  # 57xxx: shutting down, starting, cancelled
    asyncpg.exceptions.InsufficientResourcesError,  # 53xxx: out of connections, disk full
    # 25P03: the server ended a session idle in its transaction too long (a replica that froze:
    # ServiceSettings.database_idle_transaction_timeout_seconds): the connection is gone.
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
)


class DatabaseRefused(Exception):
    """The database server refused a new connection: it is not accepting connections right now
    (`ALLOW_CONNECTIONS false`, SQLSTATE 55000; starting or shutting down, 57P03), or no longer lets
    the service in (its database dropped or renamed, the login or CONNECT right revoked). Whatever
    the reason, the service cannot reach its data, so it is an outage: UNAVAILABLE, retried with the
    same request id, never INTERNAL (review A4). Raised from the server's own error."""


def refused_connection(error: BaseException) -> DatabaseRefused | None:
    """`error`, raised while opening a connection, as a DatabaseRefused if it is the server's
    refusal (an error PostgreSQL sent); None for anything else (unreachable: already an outage)."""
    for cause in causes(error):
        if isinstance(cause, asyncpg.PostgresError) and not isinstance(cause, _POSTGRES_OUTAGES):
            text = str(cause).strip().splitlines()
            sqlstate = getattr(cause, "sqlstate", "?")
            return DatabaseRefused(
                f"{text[0][:200] if text else type(cause).__name__} ({sqlstate})"
            )
    return None


def sqlite_busy(error: sqlite3.OperationalError) -> bool:
    """SQLite's write lock is held by another connection ("database is locked" / "busy")."""
    return "locked" in str(error) or "busy" in str(error)


def sqlite_full(error: sqlite3.OperationalError) -> bool:
    """SQLite cannot grow its file: the disk is full ("database or disk is full", SQLITE_FULL).
    Nothing was written; the same call succeeds once there is room."""
    return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "is full" in str(
        error
    )


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error` and everything that caused it (SQLAlchemy's `orig`, `__cause__`, `__context__`)."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for inner in (getattr(current, "orig", None), current.__cause__, current.__context__):
            if isinstance(inner, BaseException):
                stack.append(inner)


def _is_outage(cause: BaseException) -> bool:
    if isinstance(cause, (*_POSTGRES_OUTAGES, DatabaseRefused, ConnectionError, TimeoutError)):
        return True
    if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError | PermissionError):
        return True  # refused, unreachable, reset (a missing file is a configuration bug)
    if isinstance(cause, asyncpg.exceptions.InterfaceError):
        return "connection" in str(cause) and "closed" in str(cause)
    if isinstance(cause, asyncpg.exceptions.InternalClientError):
        # A pooled connection whose server process was terminated mid-operation (a restart,
        # pg_terminate_backend): "cannot switch to state ...; another operation is in progress".
        return "another operation" in str(cause)
    if isinstance(cause, sqlite3.OperationalError):
        return sqlite_busy(cause) or sqlite_full(cause)
    if isinstance(cause, sa_exc.DBAPIError) and cause.connection_invalidated:
        return True
    return isinstance(cause, sa_exc.TimeoutError)  # no pooled connection came in time


def connection_dropped(error: BaseException) -> bool:
    """Whether `error` is a database connection that was lost (the server closed or terminated
    it), not a wait that ran out: the one outage worth trying again at once on another
    connection (a timeout would only double the wait and the load)."""
    for cause in causes(error):
        if isinstance(cause, asyncio.TimeoutError | sa_exc.TimeoutError):
            return False
    return any(
        _is_outage(cause)
        and not isinstance(
            cause,
            sqlite3.OperationalError | asyncpg.InsufficientResourcesError | DatabaseRefused,
        )
        for cause in causes(error)
    )


def outage_cause(error: BaseException) -> str:
    """What made `error` an outage, for one log line: the cause's type and its first line (the
    driver's words: "Connection refused"), never the statement wrapped around it, whose bound
    parameters may hold payment tokens or e-mail addresses."""
    for cause in causes(error):
        if _is_outage(cause):
            text = str(cause).strip().splitlines()
            return f"{type(cause).__name__}: {text[0][:200]}" if text else type(cause).__name__
    return type(error).__name__


def outage_of(error: BaseException) -> Unavailable | None:
    """UNAVAILABLE DATABASE_UNAVAILABLE (with a suggested wait) if `error` is the database being
    unreachable, anywhere in its chain of causes; None if it is something else (a bug)."""
    for cause in causes(error):
        if _is_outage(cause):
            return Unavailable(
                "DATABASE_UNAVAILABLE",
                "the service's database is unreachable right now; retry after the suggested delay (a "
                "call with a request_id: with the same one; one that was applied is answered, never "
                "applied twice)",
                retry_after=RETRY_AFTER_SECONDS,
                cause=type(cause).__name__,
            )
    return None


async def settle_each(
    log: logging.Logger,
    items: Iterable[T],
    settle: Callable[[T], Awaitable[int]],
    failed: Callable[[T], str],
) -> int:
    """A reconciler's pass: `settle` each item (how many it settled: 0 or 1), one that fails
    logged (`failed`: what could not be done, to log) and never holding up the others; returns
    how many were settled."""
    settled = 0
    for item in items:
        try:
            settled += await settle(item)
        except Exception as error:
            log_failure(log, error, "%s yet; the others go on", failed(item))
    return settled


def log_failure(log: logging.Logger, error: BaseException, message: str, *args: object) -> None:
    """A failure of background work or bookkeeping, logged as what it is: an outage (the database
    unreachable, locked or full, or another service unavailable: a refusal the caller would retry)
    as one WARNING line naming its cause, every attempt; anything else, a bug, at ERROR with its
    stack trace."""
    if outage_of(error) is not None:
        log.warning(f"{message}: database unavailable (%s)", *args, outage_cause(error))
    elif isinstance(error, Unavailable):
        log.warning(f"{message}: %s (%s)", *args, error.message, error.reason)
    else:
        log.error(message, *args, exc_info=error)
