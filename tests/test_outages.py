"""Outages answer as outages: while a service's PostgreSQL cannot be reached, its calls are refused
UNAVAILABLE DATABASE_UNAVAILABLE with a RetryInfo (which clients and gRPC retry policies retry), with
no stack trace logged; a caller of that service sees UNAVAILABLE too; once the database is back, the
same request ids complete, once."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from coins.gifting.v1 import gifting_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.backoff import backoff
from runtime.status import retry_info
from tests.conftest import _require_postgres
from tests.faults import TcpProxy
from tests.helpers import eventually, expect_error, funded_user, new_creator, new_id
from tests.suite import Suite, create_pg_database, drop_pg_database, start_suite


@pytest.fixture
async def wallet_behind_proxy(tmp_path: Path) -> AsyncIterator[tuple[Suite, TcpProxy]]:
    """The suite on PostgreSQL, the wallet reaching its database through a proxy the test cuts."""
    await _require_postgres()
    name = f"coins_test_outage_{new_id('w').split('-')[1]}"
    url = await create_pg_database(name)
    host_port = url.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    proxy = await TcpProxy(host, int(port)).start()
    proxied = url.replace(f"@{host_port}/", f"@127.0.0.1:{proxy.port}/")
    suite = await start_suite("postgres", tmp_path, overrides={"wallet": {"database_url": proxied}})
    try:
        yield suite, proxy
    finally:
        await suite.stop()
        await proxy.close()
        await drop_pg_database(name)


async def test_a_database_outage_is_unavailable_and_heals(
    wallet_behind_proxy: tuple[Suite, TcpProxy], caplog: pytest.LogCaptureFixture
) -> None:
    suite, proxy = wallet_behind_proxy
    sender, coins = await funded_user(suite)
    creator = await new_creator(suite)
    gift = gifting_pb2.SendGiftRequest(
        request_id=new_id("gift"),
        sender_id=sender,
        creator_id=creator,
        gift_id="rose",
        count=2,
        live_id="live-outage",
    )
    caplog.set_level(logging.WARNING)
    proxy.cut()
    error = await expect_error(
        suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender)),
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
    )
    delay = retry_info(error)
    assert delay is not None and delay.retry_delay.ToMilliseconds() > 0
    await expect_error(  # gifting's caller learns the wallet is out, and may retry
        suite.gifting.SendGift(gift), grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE"
    )
    assert not [r for r in caplog.records if r.exc_info], "an outage logged a stack trace"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    proxy.heal()

    async def healed() -> bool:
        try:
            await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))
        except grpc.aio.AioRpcError:
            return False
        return True

    await eventually(healed, "the wallet serving again")
    sent = await suite.gifting.SendGift(gift)  # the same request id completes, once
    assert sent.sender_balance_coins == coins - 2
    again = await suite.gifting.SendGift(gift)
    assert again == sent
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))
    assert balance.balance.coins == coins - 2


def test_backoff_doubles_is_capped_and_never_overflows() -> None:
    assert [backoff(n, first=0.1, cap=5) for n in range(5)] == [0.0, 0.1, 0.2, 0.4, 0.8]
    assert backoff(30, first=0.1, cap=5) == 5
    assert backoff(100_000, first=0.1, cap=5) == 5  # 0.1 * 2**100000 would overflow
