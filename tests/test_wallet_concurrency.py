"""Many parallel debits and holds at one account: none overspends, none is lost, on SQLite and
PostgreSQL (conditional updates, no read-then-write). Rate limits and load shedding are lifted on this
suite of its own, so every call reaches the ledger."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest

from coins.common.v1 import ledger_audit_pb2, ledger_audit_pb2_grpc
from coins.wallet.v1 import wallet_pb2
from tests.helpers import funded_user, new_id
from tests.suite import PG_ADMIN_URL, Suite, start_suite


@pytest.fixture(scope="module")
async def unlimited(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    suite = await start_suite(
        backend,
        tmp_path_factory.mktemp(f"concurrency-{backend}"),
        overrides={
            "security": {"user_rate_per_second": 1e9, "user_rate_burst": 10**9},
            # 200 calls at once on a machine busy with other work may queue past the 2 s at which
            # the wallet starts shedding (OVERLOADED); this test is about the ledger, not shedding.
            "wallet": {"max_queue_seconds": 30.0},
        },
    )
    yield suite
    await suite.stop()


async def test_two_hundred_parallel_debits_and_holds_never_overspend(unlimited: Suite) -> None:
    suite = unlimited
    user, coins = await funded_user(suite)  # 700
    gifting, promotion = suite.as_caller("gifting").wallet, suite.as_caller("promotion").wallet
    debits = [
        gifting.DebitCoins(
            wallet_pb2.DebitCoinsRequest(
                request_id=new_id("d"),
                user_id=user,
                coins=5,
                reason=wallet_pb2.DEBIT_REASON_GIFT,
                reference="race",
            )
        )
        for _ in range(160)
    ]
    holds = [
        promotion.PlaceHold(
            wallet_pb2.PlaceHoldRequest(
                request_id=new_id("h"),
                user_id=user,
                coins=20,
                reason=wallet_pb2.DEBIT_REASON_PROMOTION,
                reference="race",
            )
        )
        for _ in range(40)
    ]
    results = await asyncio.gather(*debits, *holds, return_exceptions=True)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert {e.code() for e in refused} <= {grpc.StatusCode.FAILED_PRECONDITION}, refused[:3]
    spent = 5 * sum(isinstance(r, wallet_pb2.DebitCoinsResponse) for r in results)
    held = 20 * sum(isinstance(r, wallet_pb2.PlaceHoldResponse) for r in results)
    assert spent + held <= coins
    assert (
        coins - spent - held < 5
    )  # 160 x 5 > 700: debits were refused only once too little was left
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    assert (balance.balance.coins, balance.balance.available_coins) == (
        coins - spent,
        coins - spent - held,
    )
    history = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=user, page_size=1000)
    )
    assert sum(e.amount for e in history.entries) == coins - spent  # no debit lost or doubled
    report = await ledger_audit_pb2_grpc.LedgerAuditServiceStub(  # type: ignore[misc]
        suite.channel("wallet")
    ).AuditLedger(ledger_audit_pb2.AuditLedgerRequest(), metadata=suite.token("ops", admin=True))
    assert report.ok, report


async def test_a_statement_adds_up_while_the_account_is_written(unlimited: Suite) -> None:
    """Opening + movements = closing in every answer, however busy the account: the three are read
    at one moment. A review saw 7 in 150 statements on PostgreSQL whose closing balance counted a
    debit their lines left out."""
    suite = unlimited
    user, coins = await funded_user(suite, "us-web-1400")
    writing = True

    async def spend() -> None:
        while writing:
            await suite.as_caller("gifting").wallet.DebitCoins(
                wallet_pb2.DebitCoinsRequest(
                    request_id=new_id("d"),
                    user_id=user,
                    coins=1,
                    reason=wallet_pb2.DEBIT_REASON_GIFT,
                    reference=new_id(),
                )
            )

    spenders = [asyncio.create_task(spend()) for _ in range(4)]
    try:
        statements = []
        for _ in range(60):
            statements.append(
                await suite.wallet.GetCoinStatement(
                    wallet_pb2.GetCoinStatementRequest(user_id=user)
                )
            )
    finally:
        writing = False
        await asyncio.gather(*spenders)
    for s in statements:
        moved = sum(line.credited - line.debited for line in s.lines)
        assert s.opening_balance + moved == s.closing_balance, s
    assert statements[-1].closing_balance < coins  # the spenders did spend meanwhile


async def test_a_service_opens_no_more_connections_than_it_is_allowed(
    unlimited: Suite, backend: str
) -> None:
    """<SVC>_DATABASE_CONNECTIONS bounds each of a service's two pools (the test suite runs with 5:
    several suites share one server's 100 connections): 150 calls at once, reads and money moves,
    never hold more than twice that on the wallet's database."""
    if backend != "postgres":
        return  # SQLite: one writer and one reader connection, in process
    user, _ = await funded_user(unlimited)  # 700 coins: the 50 debits take 50
    database = next(d for d in unlimited.pg_databases if d.startswith("coins_test_wallet_"))
    admin = await asyncpg.connect(PG_ADMIN_URL)
    seen: list[int] = []
    busy = True

    async def watch() -> None:
        while busy:
            seen.append(
                await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database
                )
            )
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        reads = [
            unlimited.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
            for _ in range(100)
        ]
        debits = [
            unlimited.as_caller("gifting").wallet.DebitCoins(
                wallet_pb2.DebitCoinsRequest(
                    request_id=new_id("d"),
                    user_id=user,
                    coins=1,
                    reason=wallet_pb2.DEBIT_REASON_GIFT,
                    reference="r",
                )
            )
            for _ in range(50)
        ]
        await asyncio.gather(*reads, *debits)
    finally:
        busy = False
        await watcher
        await admin.close()
    assert seen and max(seen) <= 2 * 5, max(seen)
