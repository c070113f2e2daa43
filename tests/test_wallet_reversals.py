"""Refunds and chargebacks claw purchased coins back. Coins already spent become a debt that freezes the
account for spending until later purchases pay it off. Events are idempotent on the provider's event
id, and the books stay exact throughout."""

from __future__ import annotations

import asyncio
import datetime as dt

import grpc

from coins.common.v1 import ledger_audit_pb2, ledger_audit_pb2_grpc
from coins.wallet.v1 import wallet_pb2
from runtime.status import error_info
from tests.helpers import error_metadata, expect_error, new_id, open_account
from tests.suite import Suite


async def buy(suite: Suite, user: str, package: str = "us-web-700") -> wallet_pb2.Purchase:
    response = await suite.wallet.PurchaseCoins(
        wallet_pb2.PurchaseCoinsRequest(
            request_id=new_id("buy"), user_id=user, package_id=package, payment_token="tok_visa"
        )
    )
    return response.purchase


def event(
    purchase: wallet_pb2.Purchase,
    kind: wallet_pb2.PaymentEventType.ValueType = wallet_pb2.PAYMENT_EVENT_TYPE_REFUND,
) -> wallet_pb2.RecordPaymentEventRequest:
    return wallet_pb2.RecordPaymentEventRequest(
        request_id=new_id("evt"),
        type=kind,
        provider_transaction_id=purchase.provider_transaction_id,
    )


async def spend(suite: Suite, user: str, coins: int) -> None:
    await suite.as_caller("gifting").wallet.DebitCoins(
        wallet_pb2.DebitCoinsRequest(
            request_id=new_id("gift"),
            user_id=user,
            coins=coins,
            reason=wallet_pb2.DEBIT_REASON_GIFT,
            reference=new_id(),
        )
    )


async def balance(suite: Suite, user: str) -> wallet_pb2.Balance:
    return (await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))).balance


async def books_are_exact(suite: Suite) -> None:
    stub = ledger_audit_pb2_grpc.LedgerAuditServiceStub(suite.channel("wallet"))
    report = await stub.AuditLedger(  # type: ignore[misc]
        ledger_audit_pb2.AuditLedgerRequest(), metadata=suite.token(new_id("ops"), admin=True)
    )
    assert report.ok, report


async def test_a_refund_of_unspent_coins_takes_them_back(suite: Suite) -> None:
    user = new_id()
    await open_account(suite, user)
    purchase = await buy(suite, user)
    webhooks = suite.as_caller("payment-webhooks").wallet
    request = event(purchase)
    refunded = await webhooks.RecordPaymentEvent(request)
    assert refunded.purchase.status == wallet_pb2.PURCHASE_STATUS_REFUNDED
    assert (refunded.balance.coins, refunded.balance.debt_coins, refunded.balance.frozen) == (
        0,
        0,
        False,
    )
    assert await webhooks.RecordPaymentEvent(request) == refunded  # the provider redelivers
    refused = await expect_error(
        webhooks.RecordPaymentEvent(event(purchase, wallet_pb2.PAYMENT_EVENT_TYPE_CHARGEBACK)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PURCHASE_ALREADY_REVERSED",
    )
    assert error_metadata(refused)["status"] == "PURCHASE_STATUS_REFUNDED"
    history = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=user)
    )
    assert [(e.kind, e.amount) for e in history.entries] == [
        (wallet_pb2.ENTRY_KIND_REFUND, -700),
        (wallet_pb2.ENTRY_KIND_PURCHASE, 700),
    ]
    await books_are_exact(suite)


async def test_a_chargeback_of_spent_coins_leaves_a_debt_that_freezes_spending(
    suite: Suite,
) -> None:
    user = new_id()
    await open_account(suite, user)
    purchase = await buy(suite, user)  # 700
    await spend(suite, user, 500)
    charged = await suite.as_caller("payment-webhooks").wallet.RecordPaymentEvent(
        event(purchase, wallet_pb2.PAYMENT_EVENT_TYPE_CHARGEBACK)
    )
    assert charged.purchase.status == wallet_pb2.PURCHASE_STATUS_CHARGED_BACK
    b = charged.balance
    assert (b.coins, b.available_coins, b.debt_coins, b.frozen) == (0, 0, 500, True)
    await expect_error(
        suite.as_caller("gifting").wallet.DebitCoins(
            wallet_pb2.DebitCoinsRequest(
                request_id=new_id(),
                user_id=user,
                coins=1,
                reason=wallet_pb2.DEBIT_REASON_GIFT,
                reference="r",
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ACCOUNT_FROZEN",
    )
    frozen = await expect_error(
        suite.as_caller("promotion").wallet.PlaceHold(
            wallet_pb2.PlaceHoldRequest(
                request_id=new_id(),
                user_id=user,
                coins=1,
                reason=wallet_pb2.DEBIT_REASON_PROMOTION,
                reference="p",
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ACCOUNT_FROZEN",
    )
    # In the user's terms, not the ledger's account id (`user:<id>`), which callers pass on.
    info = error_info(frozen)
    assert info is not None and dict(info.metadata) == {"user_id": user}
    assert (
        frozen.details() == f"user {user}'s coins are frozen until their clawback debt is paid off"
    )
    # The next purchase pays the debt off first; the account thaws once it is paid.
    await buy(suite, user, "us-web-350")
    b = await balance(suite, user)
    assert (b.coins, b.debt_coins, b.frozen) == (0, 150, True)
    await buy(suite, user, "us-web-350")
    b = await balance(suite, user)
    assert (b.coins, b.available_coins, b.debt_coins, b.frozen) == (200, 200, 0, False)
    await spend(suite, user, 200)
    history = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(
            user_id=user, kinds=[wallet_pb2.ENTRY_KIND_DEBT_SETTLEMENT]
        )
    )
    assert [e.amount for e in history.entries] == [-150, -350]
    await books_are_exact(suite)


async def bought_and_held(
    suite: Suite, coins: int
) -> tuple[str, wallet_pb2.Purchase, wallet_pb2.Hold]:
    """A new user who bought 700 coins, `coins` of them held by the promotion service."""
    user = new_id()
    await open_account(suite, user)
    purchase = await buy(suite, user)
    placed = await suite.as_caller("promotion").wallet.PlaceHold(
        wallet_pb2.PlaceHoldRequest(
            request_id=new_id(),
            user_id=user,
            coins=coins,
            reason=wallet_pb2.DEBIT_REASON_PROMOTION,
            reference="p",
        )
    )
    return user, purchase, placed.hold


async def test_held_coins_stay_held_through_a_refund(suite: Suite) -> None:
    _, purchase, hold = await bought_and_held(suite, 600)  # 700 bought
    promotion = suite.as_caller("promotion").wallet
    refunded = await suite.as_caller("payment-webhooks").wallet.RecordPaymentEvent(event(purchase))
    b = refunded.balance
    assert (b.coins, b.debt_coins, b.frozen) == (600, 600, True)  # took the 100 available
    captured = await promotion.CaptureHold(
        wallet_pb2.CaptureHoldRequest(request_id=new_id(), hold_id=hold.hold_id, coins=600)
    )
    assert (captured.balance.coins, captured.balance.debt_coins) == (0, 600)
    await books_are_exact(suite)


async def test_coins_a_released_hold_gives_back_pay_the_debt_first(suite: Suite) -> None:
    """A refund while coins were held leaves a debt and a frozen account; what the hold gives back
    pays the debt at once (and thaws the account once paid), as a purchase's coins would. Before,
    they sat in the frozen account, the debt unpaid, until the next purchase."""
    user, purchase, hold = await bought_and_held(suite, 600)  # 700 bought
    promotion = suite.as_caller("promotion").wallet
    await promotion.CaptureHold(
        wallet_pb2.CaptureHoldRequest(request_id=new_id(), hold_id=hold.hold_id, coins=50)
    )
    refunded = await suite.as_caller("payment-webhooks").wallet.RecordPaymentEvent(event(purchase))
    b = refunded.balance
    assert (b.coins, b.debt_coins, b.frozen) == (550, 600, True)  # took the 100 available
    released = await promotion.ReleaseHold(
        wallet_pb2.ReleaseHoldRequest(request_id=new_id(), hold_id=hold.hold_id)
    )
    b = released.balance
    assert (b.coins, b.debt_coins, b.frozen) == (0, 50, True)  # 550 back, all of it to the debt
    await buy(suite, user, "us-web-70")  # 70 more: pays the last 50, 20 left, thawed
    b = await balance(suite, user)
    assert (b.coins, b.debt_coins, b.frozen) == (20, 0, False)
    await books_are_exact(suite)


async def test_events_for_unknown_or_unfinished_payments_are_refused(suite: Suite) -> None:
    webhooks = suite.as_caller("payment-webhooks").wallet
    await expect_error(
        webhooks.RecordPaymentEvent(
            wallet_pb2.RecordPaymentEventRequest(
                request_id=new_id(),
                type=wallet_pb2.PAYMENT_EVENT_TYPE_REFUND,
                provider_transaction_id="sbx_never_seen",
            )
        ),
        grpc.StatusCode.NOT_FOUND,
        "PURCHASE_NOT_FOUND",
    )


async def test_duplicate_events_delivered_at_once_reverse_once(suite: Suite) -> None:
    user = new_id()
    await open_account(suite, user)
    purchase = await buy(suite, user)
    request = event(purchase)
    webhooks = suite.as_caller("payment-webhooks").wallet
    results = await asyncio.gather(
        *(webhooks.RecordPaymentEvent(request) for _ in range(10)), return_exceptions=True
    )
    ok = [r for r in results if isinstance(r, wallet_pb2.RecordPaymentEventResponse)]
    assert ok and all(r == ok[0] for r in ok)
    history = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=user)
    )
    assert [e.amount for e in history.entries] == [-700, 700]
    await books_are_exact(suite)


async def test_different_events_racing_for_one_purchase_apply_one_and_refuse_the_rest_for_good(
    suite: Suite,
) -> None:
    """A refund and chargebacks of one purchase, each its own event, all at once: one applies, the
    others are PURCHASE_ALREADY_REVERSED, also when redelivered. A review saw losers told the
    completed purchase was "not completed" (its status read before the winner's update), a refusal
    then replayed for good."""
    user = new_id()
    await open_account(suite, user)
    purchase = await buy(suite, user)
    kinds = [wallet_pb2.PAYMENT_EVENT_TYPE_REFUND, wallet_pb2.PAYMENT_EVENT_TYPE_CHARGEBACK] * 4
    requests = [event(purchase, kind) for kind in kinds]
    webhooks = suite.as_caller("payment-webhooks").wallet
    results = await asyncio.gather(
        *(webhooks.RecordPaymentEvent(r) for r in requests), return_exceptions=True
    )
    applied = [r for r in results if isinstance(r, wallet_pb2.RecordPaymentEventResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(applied) == 1 and len(refused) == len(requests) - 1, results
    for error in refused:
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
        info = error_info(error)
        assert info is not None and info.reason == "PURCHASE_ALREADY_REVERSED", error
    for request, result in zip(requests, results, strict=True):
        if isinstance(result, grpc.aio.AioRpcError):  # redelivered: the same refusal
            await expect_error(
                webhooks.RecordPaymentEvent(request),
                grpc.StatusCode.FAILED_PRECONDITION,
                "PURCHASE_ALREADY_REVERSED",
            )
    history = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=user)
    )
    assert [e.amount for e in history.entries] == [-700, 700]
    await books_are_exact(suite)


async def test_a_payment_whose_outcome_is_unknown_is_resolved_by_asking_again(
    suite: Suite,
) -> None:
    user = new_id()
    await open_account(suite, user)
    request = wallet_pb2.PurchaseCoinsRequest(
        request_id=new_id("buy"), user_id=user, package_id="us-web-700", payment_token="tok_timeout"
    )
    await expect_error(
        suite.wallet.PurchaseCoins(request), grpc.StatusCode.UNAVAILABLE, "PAYMENT_OUTCOME_UNKNOWN"
    )
    assert (await balance(suite, user)).coins == 0  # pending: nothing credited yet
    retried = await suite.wallet.PurchaseCoins(request)  # the same request id: the provider tells
    assert retried.purchase.status == wallet_pb2.PURCHASE_STATUS_COMPLETED
    assert retried.balance.coins == 700
    assert await suite.wallet.PurchaseCoins(request) == retried
    history = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=user)
    )
    assert [e.amount for e in history.entries] == [700]  # charged and credited once


async def test_every_transaction_records_who_asked_and_for_whom(suite: Suite) -> None:
    import sqlalchemy as sa

    from ledger import transactions

    user = new_id()
    await open_account(suite, user)
    purchase = await buy(suite, user)
    await spend(suite, user, 10)
    async with suite.services["wallet"].runtime.db.read() as conn:
        rows = (
            await conn.execute(
                sa.select(transactions.c.kind, transactions.c.caller, transactions.c.acting_user)
                .where(transactions.c.reference.in_([purchase.purchase_id]))
                .union_all(
                    sa.select(
                        transactions.c.kind, transactions.c.caller, transactions.c.acting_user
                    ).where(
                        transactions.c.kind == "gift",
                        transactions.c.acting_user == user,
                    )
                )
            )
        ).all()
    assert sorted(tuple(r) for r in rows) == [
        ("gift", "gifting", user),
        ("purchase", "wallet", user),
    ]


async def test_concurrent_chargebacks_each_take_back_their_coins(suite: Suite) -> None:
    for _ in range(4):
        user = new_id()
        await open_account(suite, user)
        first, second = await buy(suite, user), await buy(suite, user)  # 1,400
        await spend(suite, user, 1_000)  # 400 left
        webhooks = suite.as_caller("payment-webhooks").wallet
        results = await asyncio.gather(
            webhooks.RecordPaymentEvent(event(first, wallet_pb2.PAYMENT_EVENT_TYPE_CHARGEBACK)),
            webhooks.RecordPaymentEvent(event(second, wallet_pb2.PAYMENT_EVENT_TYPE_CHARGEBACK)),
        )
        assert {r.purchase.status for r in results} == {wallet_pb2.PURCHASE_STATUS_CHARGED_BACK}
        b = await balance(suite, user)
        assert (b.coins, b.debt_coins, b.frozen) == (0, 1_000, True)  # 1,400 back: 400 + 1,000 owed
    await books_are_exact(suite)


async def test_an_event_redelivered_after_its_request_id_was_purged_gets_its_answer_again(
    suite: Suite,
) -> None:
    """Payment providers redeliver webhooks for days, past the request ids' retention: the event
    that reversed the purchase is answered as it was (the purchase reversed, the balance now),
    not refused PURCHASE_ALREADY_REVERSED, which a receiver would alert on (a review's). Another
    event for it is still refused, and nothing moves twice."""
    user = new_id()
    await open_account(suite, user)
    purchase = await buy(suite, user)
    webhooks = suite.as_caller("payment-webhooks").wallet
    request = event(purchase)
    refunded = await webhooks.RecordPaymentEvent(request)
    assert await suite.services["wallet"].runtime.idempotency.purge(dt.timedelta(0)) > 0
    again = await webhooks.RecordPaymentEvent(request)
    assert again.purchase == refunded.purchase and again.balance == refunded.balance
    await expect_error(
        webhooks.RecordPaymentEvent(event(purchase)),  # another refund event: not this one's
        grpc.StatusCode.FAILED_PRECONDITION,
        "PURCHASE_ALREADY_REVERSED",
    )
    chargeback = wallet_pb2.RecordPaymentEventRequest()
    chargeback.CopyFrom(request)
    chargeback.type = wallet_pb2.PAYMENT_EVENT_TYPE_CHARGEBACK  # its id, another kind
    await expect_error(  # its answer is stored again: another kind is another request
        webhooks.RecordPaymentEvent(chargeback),
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )
    await suite.services["wallet"].runtime.idempotency.purge(dt.timedelta(0))
    await expect_error(  # and once forgotten again: not the kind that reversed it
        webhooks.RecordPaymentEvent(chargeback),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PURCHASE_ALREADY_REVERSED",
    )
    await books_are_exact(suite)
