"""Fixtures: the real suite, on SQLite and on PostgreSQL.

PostgreSQL is required: without it the run fails loudly (CI starts it). Set COINS_TEST_BACKENDS=sqlite to
run only the SQLite half on a machine without PostgreSQL; CI never sets it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runtime.db import Database
from tests.faults import TcpProxy, suite_with_wallet_db_behind_proxy
from tests.helpers import ShiftedClock
from tests.suite import (
    Suite,
    create_pg_database,
    drop_pg_database,
    require_postgres,
    start_suite,
)

BACKENDS = [b for b in os.environ.get("COINS_TEST_BACKENDS", "sqlite,postgres").split(",") if b]


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
async def suite(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    """All four services, started once per backend for the whole session."""
    if backend == "postgres":
        await require_postgres()
    data_dir: Path = tmp_path_factory.mktemp(f"suite-{backend}")
    running = await start_suite(backend, data_dir)
    yield running
    await running.stop()


@pytest.fixture(scope="module")
async def private_suite(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Suite]:
    """A suite of the module's own, for tests that change what every other test sees (the gift
    catalog, the price lists, rate limits)."""
    if backend == "postgres":
        await require_postgres()
    running = await start_suite(backend, tmp_path_factory.mktemp(f"private-{backend}"))
    yield running
    await running.stop()


@pytest.fixture
async def database(backend: str, tmp_path: Path) -> AsyncIterator[Database]:
    """An empty database of the session's backend (not migrated: `helpers.migrated`), dropped after."""
    name = f"coins_test_{uuid.uuid4().hex[:12]}"
    if backend == "postgres":
        url = await create_pg_database(name)
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    db = Database(url)
    try:
        yield db
    finally:
        await db.close()
        if backend == "postgres":
            await drop_pg_database(name)


@pytest.fixture
async def wallet_behind_proxy(tmp_path: Path) -> AsyncIterator[tuple[Suite, TcpProxy]]:
    """The suite on PostgreSQL with the wallet's database behind a proxy the test cuts or holds."""
    async with suite_with_wallet_db_behind_proxy(tmp_path) as running:
        yield running


@pytest.fixture(scope="module")
async def maturing(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Suite, ShiftedClock]]:
    """Payout alone, with a 15-day maturation period swept every 0.2 s, on a clock the tests move
    (a module's own: the tests move its clock)."""
    if backend == "postgres":
        await require_postgres()
    clock = ShiftedClock()
    running = await start_suite(
        backend,
        tmp_path_factory.mktemp(f"maturing-{backend}"),
        only=("payout",),
        overrides={"payout": {"maturation_days": 15, "maturation_every_seconds": 0.2}},
        clock=clock,
    )
    yield running, clock
    await running.stop()
