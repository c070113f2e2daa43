"""The ledger audit over gRPC: admins of the wallet and the payout service can have the books
recomputed at any time, and a tampered entry shows up in the answer."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import pytest
import sqlalchemy as sa

from coins.common.v1 import ledger_audit_pb2, ledger_audit_pb2_grpc
from coins.payout.v1 import payout_pb2
from coins.wallet.v1 import wallet_pb2
from ledger import entries
from runtime.status import error_info, retry_info
from tests.helpers import expect_error, funded_user, new_id, rewrite_history
from tests.suite import Suite

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from coins.common.v1.ledger_audit_pb2_grpc import LedgerAuditServiceAsyncStub


def auditor(suite: Suite, service: str) -> LedgerAuditServiceAsyncStub:
    return ledger_audit_pb2_grpc.LedgerAuditServiceStub(suite.channel(service))  # type: ignore[return-value]


@pytest.mark.parametrize("service", ["wallet", "payout"])
async def test_the_books_balance_after_the_suites_work(suite: Suite, service: str) -> None:
    await funded_user(suite)  # a wallet account with coins
    await suite.as_caller("gifting").payout.CreditDiamonds(  # a creator account with diamonds
        payout_pb2.CreditDiamondsRequest(
            request_id=new_id("gift"), creator_id=new_id("creator"), coins=10, reference="audit"
        )
    )
    report = await auditor(suite, service).AuditLedger(
        ledger_audit_pb2.AuditLedgerRequest(), metadata=suite.token(new_id("ops"), admin=True)
    )
    assert report.ok, report
    assert report.total == 0
    assert report.accounts_checked > 0 and report.transactions_checked > 0


async def test_only_admins_audit(suite: Suite) -> None:
    await expect_error(
        auditor(suite, "wallet").AuditLedger(
            ledger_audit_pb2.AuditLedgerRequest(), metadata=suite.token(new_id("viewer"))
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_ROLE_REQUIRED",
    )


async def test_a_tampered_entry_is_reported(private_suite: Suite) -> None:
    suite = private_suite
    user, _ = await funded_user(suite)
    await rewrite_history(
        suite.services["wallet"].runtime.db.url,
        sa.update(entries).where(entries.c.account_id == f"user:{user}").values(amount=10_000),
    )
    report = await auditor(suite, "wallet").AuditLedger(
        ledger_audit_pb2.AuditLedgerRequest(), metadata=suite.token(new_id("ops"), admin=True)
    )
    assert not report.ok
    assert [d.account_id for d in report.balance_differences] == [f"user:{user}"]
    assert report.total != 0
    assert f"user:{user}" in {f.id for f in report.broken_chains}


async def test_an_audit_during_heavy_posting_sees_one_moment(suite: Suite) -> None:
    """Balances and entries are read from one snapshot: postings that commit while the audit runs
    never show up as differences that are not there."""
    users = [await funded_user(suite) for _ in range(4)]
    gifting = suite.as_caller("gifting").wallet
    admin = suite.token(new_id("ops"), admin=True)
    stop = asyncio.Event()

    async def spend(user: str) -> None:
        while not stop.is_set():
            try:
                await gifting.DebitCoins(
                    wallet_pb2.DebitCoinsRequest(
                        request_id=new_id("gift:"),
                        user_id=user,
                        coins=1,
                        reason=wallet_pb2.DEBIT_REASON_GIFT,
                        reference="race",
                    )
                )
            except grpc.aio.AioRpcError as error:  # the per-user rate limit: wait as told
                if (info := error_info(error)) and info.reason == "INSUFFICIENT_FUNDS":
                    return  # spent it all (slow audits on a busy machine): this spender is done
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
                delay = retry_info(error)
                await asyncio.sleep(
                    delay.retry_delay.ToTimedelta().total_seconds() if delay else 0.05
                )

    spenders = [asyncio.create_task(spend(user)) for user, _ in users for _ in range(3)]
    try:
        for _ in range(6):
            report = await auditor(suite, "wallet").AuditLedger(
                ledger_audit_pb2.AuditLedgerRequest(), metadata=admin
            )
            assert report.ok, report
    finally:
        stop.set()
        await asyncio.gather(*spenders)
