"""A SQLite database whose disk is full is an outage, not a bug (R5: callers got INTERNAL, which a
client does not retry, while health said SERVING): writes answer UNAVAILABLE DATABASE_UNAVAILABLE
with a RetryInfo and change nothing, the same request id applies once there is room, and health
says NOT_SERVING while the folder has no room. SQLite's own SQLITE_FULL is produced with
`PRAGMA max_page_count` on the service's write connection, as a full disk makes it."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coins.wallet.v1 import wallet_pb2
from runtime import sql
from runtime.status import error_info, retry_info
from tests.helpers import eventually, funded_user, new_id
from tests.suite import Suite, start_suite

UNLIMITED_PAGES = 1_073_741_823


@pytest.fixture(scope="module")
async def wallet_on_sqlite(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Suite]:
    if backend != "sqlite":
        pytest.skip("SQLite's full disk; PostgreSQL's (53100) is an outage by its error class")
    suite = await start_suite(
        "sqlite",
        tmp_path_factory.mktemp("full-disk"),
        only=("wallet",),
        overrides={"wallet": {"health_check_seconds": 0.1}},
    )
    yield suite
    await suite.stop()


@contextmanager
def full_disk(suite: Suite) -> Iterator[sqlite3.Connection]:
    """The wallet's write connection for the money path, its file unable to grow by a page."""
    writer = suite.services["wallet"].runtime.db.driver._sqlite(write=True)
    (pages,) = writer.execute("PRAGMA page_count").fetchone()
    writer.execute(f"PRAGMA max_page_count = {pages}")
    try:
        yield writer
    finally:
        writer.execute(f"PRAGMA max_page_count = {UNLIMITED_PAGES}")


async def test_a_write_on_a_full_disk_is_unavailable_and_applies_once_there_is_room(
    wallet_on_sqlite: Suite, caplog: pytest.LogCaptureFixture
) -> None:
    suite = wallet_on_sqlite
    user, coins = await funded_user(suite)
    debits = suite.as_caller("gifting").wallet
    caplog.set_level(logging.WARNING)
    refused: tuple[wallet_pb2.DebitCoinsRequest, grpc.aio.AioRpcError] | None = None
    with full_disk(suite) as writer:
        for _ in range(coins):  # until a debit needs a page the file cannot have
            request = wallet_pb2.DebitCoinsRequest(
                request_id=new_id("d"),
                user_id=user,
                coins=1,
                reason=wallet_pb2.DEBIT_REASON_GIFT,
                reference=f"gift:{new_id('g')}",
            )
            try:
                await debits.DebitCoins(request)
            except grpc.aio.AioRpcError as failed:
                refused = request, failed
                break
        assert refused is not None, f"{coins} debits fit in the pages the file had"
        request, error = refused
        info = error_info(error)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert info is not None and info.reason == "DATABASE_UNAVAILABLE", error
        hint = retry_info(error)
        assert hint is not None and hint.retry_delay.ToMilliseconds() > 0
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "an outage is no bug"
        before = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
        writer.execute(f"PRAGMA max_page_count = {UNLIMITED_PAGES}")  # room again
    debited = await debits.DebitCoins(request)  # the same request id: applied now, once
    assert debited == await debits.DebitCoins(request)
    after = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    assert after.balance.coins == before.balance.coins - 1


async def test_health_says_not_serving_while_the_disk_has_no_room(
    wallet_on_sqlite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = health_pb2_grpc.HealthStub(wallet_on_sqlite.health_channel("wallet"))

    async def health_is(status: int) -> bool:
        answer = await probe.Check(health_pb2.HealthCheckRequest())
        return bool(answer.status == status)

    # More room asked for than any disk here has: the real free space, read as too little.
    monkeypatch.setattr(sql, "SQLITE_MIN_FREE_BYTES", 1 << 62)
    await eventually(lambda: health_is(health_pb2.HealthCheckResponse.NOT_SERVING), "NOT_SERVING")
    monkeypatch.setattr(sql, "SQLITE_MIN_FREE_BYTES", 4 << 20)
    await eventually(lambda: health_is(health_pb2.HealthCheckResponse.SERVING), "SERVING again")
