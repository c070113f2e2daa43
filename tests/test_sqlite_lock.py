"""SQLite's write lock held by another process (an operator's `sqlite3` shell, a tool) never freezes
a service: its writes wait on the event loop, not inside SQLite, so reads, health checks and streams
go on; a lock held past the service's patience answers UNAVAILABLE, with nothing applied."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from runtime import sql
from runtime.db import Database
from runtime.errors import Unavailable
from runtime.outages import outage_of
from runtime.sql import Statement

_INSERT = Statement("test.insert", "INSERT INTO t (x) VALUES (:x)")
_COUNT = Statement("test.count", "SELECT count(*) FROM t")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "locked.db"
    setup = sqlite3.connect(path)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE t (x INTEGER)")
    setup.commit()
    setup.close()
    return path


@pytest.fixture
async def db(path: Path) -> AsyncIterator[Database]:
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
def other_process(path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding the write lock (as another process would: SQLite's locks are
    the file's, not the process's)."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield holder
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()


async def insert(db: Database, x: int) -> None:
    async with db.driver.transaction() as tx:
        await tx.run(_INSERT, x=x)


async def count(db: Database) -> int:
    async with db.driver.read() as tx:
        row = await tx.one(_COUNT)
    assert row is not None
    return int(row[0])


async def test_a_write_waiting_for_the_lock_lets_reads_through_then_applies(
    db: Database, other_process: sqlite3.Connection
) -> None:
    await count(db)  # the service's connections are open
    write = asyncio.create_task(insert(db, 1))
    await asyncio.sleep(0)  # the write starts, finds the lock taken, and waits
    assert await count(db) == 0  # the event loop turns: a read is answered meanwhile
    assert not write.done()
    other_process.execute("COMMIT")
    await write
    assert await count(db) == 1


async def test_a_lock_held_past_the_patience_is_unavailable_and_applies_nothing(
    db: Database, other_process: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql, "SQLITE_LOCK_PATIENCE", 0.05)
    with pytest.raises(sqlite3.OperationalError) as raised:
        await insert(db, 1)
    outage = outage_of(raised.value)
    assert isinstance(outage, Unavailable) and outage.reason == "DATABASE_UNAVAILABLE"
    other_process.execute("COMMIT")
    assert await count(db) == 0
    await insert(db, 2)  # the lock is free: writes go on
    assert await count(db) == 1
