"""Purchases left pending (a lost provider answer, a crash, a client that never retried) are finished
by the reconciler, which asks the provider under the purchase's key: charged ones are credited once
and answer the original request id; ones the provider never saw fail, and nobody is charged."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from coins.wallet.v1 import wallet_pb2
from runtime.status import error_info, retry_info
from services.wallet import storage
from services.wallet.payments import ChargeResult, SandboxPaymentProvider, _ChargeStore
from services.wallet.purchases import Purchases
from tests.helpers import eventually, expect_error, new_id, open_account, rpc_error
from tests.suite import Suite, start_suite


@pytest.fixture(scope="module")
async def reconciling(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Suite]:
    suite = await start_suite(
        backend,
        tmp_path_factory.mktemp(f"reconcile-{backend}"),
        overrides={
            "wallet": {
                "reconcile_every_seconds": 0.1,
                "reconcile_after_seconds": 0.3,
                "payment_timeout_seconds": 0.2,
            }
        },
    )
    yield suite
    await suite.stop()


async def test_a_purchase_with_a_lost_answer_is_credited_once_without_a_retry(
    reconciling: Suite,
) -> None:
    suite = reconciling
    user = new_id()
    await open_account(suite, user)
    request = wallet_pb2.PurchaseCoinsRequest(
        request_id=new_id(), user_id=user, package_id="us-web-700", payment_token="tok_timeout"
    )
    lost = await expect_error(
        suite.wallet.PurchaseCoins(request), grpc.StatusCode.UNAVAILABLE, "PAYMENT_OUTCOME_UNKNOWN"
    )
    assert retry_info(lost) is not None  # how long to wait before the retry, as UNAVAILABLE says

    async def credited() -> bool:
        balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
        return balance.balance.coins == 700

    await eventually(credited, "the purchase to be credited")
    late_retry = await suite.wallet.PurchaseCoins(request)  # the original request id's answer
    assert late_retry.purchase.status == wallet_pb2.PURCHASE_STATUS_COMPLETED
    assert late_retry.balance.coins == 700
    history = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=user)
    )
    assert [e.amount for e in history.entries] == [700]


async def test_a_pending_purchase_the_provider_never_saw_fails_without_a_charge(
    reconciling: Suite,
) -> None:
    suite = reconciling
    user = new_id()
    await open_account(suite, user)
    purchase_id = uuid.uuid4().hex
    now = dt.datetime.now(dt.UTC)
    async with suite.services["wallet"].runtime.db.transaction() as conn:  # a crash before charging
        await storage.insert_purchase(
            conn,
            storage.PurchaseRecord(
                purchase_id=purchase_id,
                user_id=user,
                package_id="us-web-700",
                region="US",
                channel="web",
                coins=700,
                price_minor=999,
                currency_code="USD",
                payment_token="tok_visa",
                status="pending",
                provider_transaction_id=None,
                created_at=now,
                updated_at=now,
            ),
        )

    async def failed() -> bool:
        async with suite.services["wallet"].runtime.db.read() as conn:
            found = await storage.get_purchase(conn, purchase_id)
        return found is not None and found.status == "failed"

    await eventually(failed, "the purchase to fail")
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    assert balance.balance.coins == 0


async def unanswered_purchase(
    suite: Suite, token: str
) -> tuple[str, wallet_pb2.PurchaseCoinsRequest, str, SandboxPaymentProvider]:
    """A new user's purchase whose provider answer did not come in time (PAYMENT_OUTCOME_UNKNOWN):
    (user, the request, the purchase id, the sandbox provider)."""
    user = new_id()
    await open_account(suite, user)
    request = wallet_pb2.PurchaseCoinsRequest(
        request_id=new_id(), user_id=user, package_id="us-web-700", payment_token=token
    )
    error = await expect_error(
        suite.wallet.PurchaseCoins(request), grpc.StatusCode.UNAVAILABLE, "PAYMENT_OUTCOME_UNKNOWN"
    )
    info = error_info(error)
    assert info is not None
    provider = suite.services["wallet"].runtime.parts["payments"]
    assert isinstance(provider, SandboxPaymentProvider)
    return user, request, info.metadata["purchase_id"], provider


async def test_a_charge_still_on_its_way_when_reconciled_can_never_charge(
    reconciling: Suite,
) -> None:
    """The provider is slower than our timeout: the purchase is reconciled as never charged, and the
    key is voided at the provider first, so the late charge is refused there: nobody pays for coins
    they did not get."""
    suite = reconciling
    user, request, purchase_id, provider = await unanswered_purchase(suite, "tok_late")

    async def reconciled_and_late_charge_refused() -> bool:
        # Both must have happened: the purchase failed in the wallet (before, a retry would rightly
        # resume it) and the late charge reached the provider (the void alone also leaves a record).
        async with suite.services["wallet"].runtime.db.read() as conn:
            found = await storage.get_purchase(conn, purchase_id)
        failed = found is not None and found.status == "failed"
        return failed and provider.late_charges_in_flight() == 0

    await eventually(
        reconciled_and_late_charge_refused, "the reconciliation and the late charge", seconds=5
    )
    charge = provider.charged(purchase_id)
    assert charge is not None and not charge.approved and charge.decline_reason == "voided"
    error = (
        await expect_error(  # the request's answer: voided (not the card's decline), nothing bought
            suite.wallet.PurchaseCoins(request),
            grpc.StatusCode.FAILED_PRECONDITION,
            "PURCHASE_VOIDED",
        )
    )
    assert "never charged" in (error.details() or "")
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    assert balance.balance.coins == 0


async def test_a_chargeback_that_arrives_before_its_purchase_is_settled_applies_when_redelivered(
    reconciling: Suite,
) -> None:
    """The provider charged, its answer was lost, and the buyer disputes at once: the chargeback
    names a payment the wallet cannot match yet (the purchase learns its provider transaction id
    when it is settled). That refusal is not the event's final answer: redelivered after the
    reconciler settled the purchase, the event takes the coins back (it replayed the refusal)."""
    suite = reconciling
    user, _, purchase_id, provider = await unanswered_purchase(suite, "tok_timeout")
    charge = provider.charged(purchase_id)
    assert charge is not None and charge.approved  # the buyer paid
    webhooks = suite.as_caller("payment-webhooks").wallet
    chargeback = wallet_pb2.RecordPaymentEventRequest(
        request_id=new_id("evt"),
        type=wallet_pb2.PAYMENT_EVENT_TYPE_CHARGEBACK,
        provider_transaction_id=charge.provider_transaction_id,
    )
    await expect_error(
        webhooks.RecordPaymentEvent(chargeback), grpc.StatusCode.NOT_FOUND, "PURCHASE_NOT_FOUND"
    )

    async def credited() -> bool:
        balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
        return balance.balance.coins == 700

    await eventually(credited, "the purchase reconciled and credited")
    reversed_ = await webhooks.RecordPaymentEvent(chargeback)  # the provider redelivers
    assert reversed_.purchase.status == wallet_pb2.PURCHASE_STATUS_CHARGED_BACK
    assert reversed_.balance.coins == 0
    again = await webhooks.RecordPaymentEvent(chargeback)  # and again: the same answer
    assert again == reversed_


async def test_a_request_id_reused_after_its_record_was_purged_is_a_new_purchase(
    reconciling: Suite,
) -> None:
    """After WALLET_IDEMPOTENCY_RETENTION_HOURS a request id is forgotten, and a request that
    reuses it is a new purchase: charged and credited like any other (its credit collided with the
    first purchase's ledger request id, and the charged buyer got INTERNAL)."""
    suite = reconciling
    user = new_id()
    await open_account(suite, user)
    request = wallet_pb2.PurchaseCoinsRequest(
        request_id=new_id(), user_id=user, package_id="us-web-700", payment_token="tok_visa_r"
    )
    first = await suite.wallet.PurchaseCoins(request)
    assert first.balance.coins == 700
    await suite.services["wallet"].runtime.idempotency.purge(dt.timedelta(0))
    second = await suite.wallet.PurchaseCoins(request)
    assert second.purchase.purchase_id != first.purchase.purchase_id
    assert second.balance.coins == 1_400


async def test_a_void_racing_a_charge_in_another_process_returns_the_charge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas share the sandbox's file. A void read the key (nothing), the other process charged
    it, and the void's write kept the charge, yet it answered "never charged": the reconciler
    failed a purchase whose card was charged (review r8, 1-8 keys in 3,000). It answers what the
    key holds once its write is done."""
    store = tmp_path / "sandbox-payments.sqlite3"
    voiding = SandboxPaymentProvider(latency_ms=0, store=store)
    charging = SandboxPaymentProvider(latency_ms=0, store=store)
    key = f"purchase:{uuid.uuid4().hex}"
    read = _ChargeStore.get
    charged: list[ChargeResult] = []

    def the_other_process_charges_after_this_read(self: _ChargeStore, k: str) -> Any:
        found = read(self, k)
        if self is voiding._charges and not charged:  # between the void's read and its write
            charged.append(charging._apply(k, "tok_visa"))
        return found

    monkeypatch.setattr(_ChargeStore, "get", the_other_process_charges_after_this_read)
    answer = await voiding.void(key)
    assert charged and charged[0].approved
    assert answer == charged[0]  # the charge, not "never charged"
    assert charging.charged(key) == charged[0]


async def test_no_card_is_charged_for_a_caller_whose_deadline_passed(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The purchase was recorded pending, the caller's deadline passed, and the card was charged
    anyway: the caller read DEADLINE_EXCEEDED and was credited minutes later by the reconciler
    (review r9: 12 of 20 purchases with short deadlines). Now nothing is charged; a retry with the
    same request id charges it, once (the suite's reconciler waits minutes to void it)."""
    user = new_id()
    await open_account(suite, user)
    provider = suite.services["wallet"].runtime.parts["payments"]
    assert isinstance(provider, SandboxPaymentProvider)

    def charged() -> int:  # cards charged (a key the reconciler voids is no charge)
        return sum(c.approved for c in provider.charges().values())

    charges_before = charged()
    complete = Purchases._complete

    stopped = asyncio.Event()

    async def slow_to_charge(self: Purchases, *args: Any) -> Any:
        await asyncio.sleep(0.5)  # the caller's 0.2 s pass meanwhile
        try:
            return await complete(self, *args)
        finally:
            stopped.set()

    monkeypatch.setattr(Purchases, "_complete", slow_to_charge)
    request = wallet_pb2.PurchaseCoinsRequest(
        request_id=new_id(), user_id=user, package_id="us-web-700", payment_token="tok_visa"
    )
    late = await rpc_error(suite.wallet.PurchaseCoins(request, timeout=0.2))
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(stopped.wait(), 10)  # the work it left went on to the charge, no further
    assert charged() == charges_before
    monkeypatch.setattr(Purchases, "_complete", complete)
    bought = await suite.wallet.PurchaseCoins(request)  # the retry: charged and credited once
    assert bought.purchase.status == wallet_pb2.PURCHASE_STATUS_COMPLETED
    assert charged() == charges_before + 1
    assert bought.balance.coins == 700


async def test_an_event_about_a_declined_purchase_says_nothing_was_paid(
    reconciling: Suite,
) -> None:
    """A refund or chargeback naming a purchase that failed: final (stored, replayed), and said as
    such, not "redeliver the event once it has completed", which it never will (a review's)."""
    suite = reconciling
    user = new_id()
    await open_account(suite, user)
    error = await expect_error(
        suite.wallet.PurchaseCoins(
            wallet_pb2.PurchaseCoinsRequest(
                request_id=new_id(),
                user_id=user,
                package_id="us-web-700",
                payment_token="tok_decline",
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PAYMENT_DECLINED",
    )
    info = error_info(error)
    assert info is not None
    provider = suite.services["wallet"].runtime.parts["payments"]
    assert isinstance(provider, SandboxPaymentProvider)
    charge = provider.charged(info.metadata["purchase_id"])
    assert charge is not None and not charge.approved
    refund = wallet_pb2.RecordPaymentEventRequest(
        request_id=new_id("evt"),
        type=wallet_pb2.PAYMENT_EVENT_TYPE_REFUND,
        provider_transaction_id=charge.provider_transaction_id,
    )
    webhooks = suite.as_caller("payment-webhooks").wallet
    refused = await expect_error(
        webhooks.RecordPaymentEvent(refund),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PURCHASE_NOT_COMPLETED",
    )
    assert "never paid" in (refused.details() or "") and "once it has" not in (
        refused.details() or ""
    )
    await expect_error(  # the event's answer: the redelivery replays it
        webhooks.RecordPaymentEvent(refund),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PURCHASE_NOT_COMPLETED",
    )
