"""One valid, admissible sample request per RPC, for the security tests (tests/test_security.py).

Every RPC the four services serve needs an entry here, keyed by its method path: the security tests
enumerate the RPCs from the protobuf descriptors and fail for any RPC without a sample, so an RPC cannot
be added without its security test. A sample is what the right caller, with the right token, may send
and get served (the tests check that too): so when the same request is refused for a missing token, a
foreign certificate or another user, the refusal is the guard's doing, never validation's. Samples of
mutating RPCs would change the books if admitted, so "nothing changed" after a refusal means something.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import sqlalchemy as sa
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from coins.common.v1 import admin_audit_pb2, ledger_audit_pb2, money_pb2
from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from coins.promotion.v1 import promotion_pb2
from coins.wallet.v1 import wallet_pb2
from services.payout import storage as payout_storage
from services.payout.sandbox import sign
from tests.helpers import (
    adult_birth_date,
    eventually,
    funded_user,
    live_of,
    new_creator,
    new_id,
    open_account,
    verify_creator,
)
from tests.suite import PAYOUT_WEBHOOK_SECRET, Suite


@dataclass(frozen=True)
class Sample:
    """A request the right caller may make, and what it takes to make it."""

    request: Message
    user: str | None
    """The token's user that makes the request admissible; None: the RPC acts for no user."""
    admin: bool = False
    """The admissible token carries the admin role (admin RPCs)."""
    mutates: bool = False
    """Admitted, the call changes a database (a refused one must not)."""
    settle: Callable[[Message], Awaitable[None]] | None = None
    """Given the admitted call's response, waits for the background work it started (an outbox
    credit, a payout), so that the next test starts from quiet databases."""


SampleBuilder = Callable[[Suite], Awaitable[Sample]]


@dataclass(frozen=True)
class Entry:
    build: SampleBuilder
    record_owned: bool
    """A read by id of a record owned by the sample's user: the record is loaded, then its owner is
    checked against the token (another user: PERMISSION_DENIED NOT_ACCOUNT_OWNER)."""
    any_user: bool
    """Open to every signed-in user (the gift catalog, a LIVE's leaderboard): no account is named."""


WALLET = wallet_pb2.DESCRIPTOR.services_by_name["WalletService"].full_name
GIFTING = gifting_pb2.DESCRIPTOR.services_by_name["GiftingService"].full_name
PAYOUT = payout_pb2.DESCRIPTOR.services_by_name["PayoutService"].full_name
PROMOTION = promotion_pb2.DESCRIPTOR.services_by_name["PromotionService"].full_name
ADMIN_AUDIT = admin_audit_pb2.DESCRIPTOR.services_by_name["AdminAuditService"].full_name
LEDGER_AUDIT = ledger_audit_pb2.DESCRIPTOR.services_by_name["LedgerAuditService"].full_name

SAMPLES: dict[str, Entry] = {}
"""Method path (`/coins.wallet.v1.WalletService/GetBalance`) -> how to build its sample."""


def sample(
    service: str, method: str, *, record_owned: bool = False, any_user: bool = False
) -> Callable[[SampleBuilder], SampleBuilder]:
    """Register the sample of `/service/method`. An RPC that acts for a user but names no account
    in its access rule (no `owner_field`) must say which it is: `record_owned` or `any_user`."""

    def register(build: SampleBuilder) -> SampleBuilder:
        path = f"/{service}/{method}"
        assert path not in SAMPLES, f"two samples for {path}"
        SAMPLES[path] = Entry(build, record_owned, any_user)
        return build

    return register


# ---------------------------------------------------------------------------------------------- waits


def gift_credited(suite: Suite, sent_gift_id: str, sender: str) -> Callable[[], Awaitable[None]]:
    async def wait() -> None:
        async def credited() -> bool:
            response = await suite.gifting.GetGift(
                gifting_pb2.GetGiftRequest(sent_gift_id=sent_gift_id), metadata=suite.token(sender)
            )
            return response.sent_gift.credit_status == gifting_pb2.CREDIT_STATUS_CREDITED

        await eventually(credited, f"the creator's credit for gift {sent_gift_id}")

    return wait


def withdrawal_settled(
    suite: Suite, withdrawal_id: str, creator: str
) -> Callable[[], Awaitable[None]]:
    async def wait() -> None:
        async def settled() -> bool:
            response = await suite.payout.GetWithdrawal(
                payout_pb2.GetWithdrawalRequest(withdrawal_id=withdrawal_id),
                metadata=suite.token(creator),
            )
            return response.withdrawal.status in (
                payout_pb2.WITHDRAWAL_STATUS_PAID,
                payout_pb2.WITHDRAWAL_STATUS_FAILED,
                payout_pb2.WITHDRAWAL_STATUS_RETURNED,
                payout_pb2.WITHDRAWAL_STATUS_REJECTED,
                payout_pb2.WITHDRAWAL_STATUS_CANCELLED,
            )

        await eventually(settled, f"withdrawal {withdrawal_id} to be paid")

    return wait


# -------------------------------------------------------------------------------------------- helpers


async def creator_with_diamonds(suite: Suite, diamonds: int) -> str:
    creator = new_id("creator")
    await suite.as_caller("gifting").payout.CreditDiamonds(
        payout_pb2.CreditDiamondsRequest(
            request_id=new_id("gift"), creator_id=creator, coins=diamonds * 2, reference="seed"
        )
    )
    await verify_creator(suite, creator)
    return creator


def withdrawal_request(creator: str) -> payout_pb2.RequestWithdrawalRequest:
    return payout_pb2.RequestWithdrawalRequest(
        request_id=new_id("wd"),
        creator_id=creator,
        diamonds=2_000,  # $10.00, the minimum
        method=payout_pb2.PAYOUT_METHOD_PAYPAL,
        destination_token="dest_paypal_ok",
    )


def gift_request(sender: str, creator: str) -> gifting_pb2.SendGiftRequest:
    return gifting_pb2.SendGiftRequest(
        request_id=new_id("gift"),
        sender_id=sender,
        creator_id=creator,
        gift_id="rose",
        count=3,
        live_id=live_of(creator),
    )


def promotion_request(user: str) -> promotion_pb2.CreatePromotionRequest:
    return promotion_pb2.CreatePromotionRequest(
        request_id=new_id("promo"),
        user_id=user,
        video_id=new_id("video"),
        goal=promotion_pb2.GOAL_VIDEO_VIEWS,
        budget_coins=100,
        duration_days=1,
    )


# --------------------------------------------------------------------------------------------- wallet


@sample(WALLET, "OpenAccount")
async def _open_account(suite: Suite) -> Sample:
    user = new_id("viewer")
    request = wallet_pb2.OpenAccountRequest(
        request_id=new_id("open"), user_id=user, country_code="US", birth_date=adult_birth_date()
    )
    return Sample(request, user, mutates=True)


@sample(WALLET, "GetAccount")
async def _get_account(suite: Suite) -> Sample:
    user, _ = await funded_user(suite)
    return Sample(wallet_pb2.GetAccountRequest(user_id=user), user)


@sample(WALLET, "GetBalance")
async def _get_balance(suite: Suite) -> Sample:
    user, _ = await funded_user(suite)
    return Sample(wallet_pb2.GetBalanceRequest(user_id=user), user)


@sample(WALLET, "ListCoinPackages")
async def _list_coin_packages(suite: Suite) -> Sample:
    user = new_id("viewer")
    await open_account(suite, user)
    request = wallet_pb2.ListCoinPackagesRequest(user_id=user, channel=wallet_pb2.CHANNEL_WEB)
    return Sample(request, user)


@sample(WALLET, "PurchaseCoins")
async def _purchase_coins(suite: Suite) -> Sample:
    user = new_id("viewer")
    await open_account(suite, user)
    request = wallet_pb2.PurchaseCoinsRequest(
        request_id=new_id("buy"), user_id=user, package_id="us-web-70", payment_token="tok_visa"
    )
    return Sample(request, user, mutates=True)


@sample(WALLET, "ListLedgerEntries")
async def _list_ledger_entries(suite: Suite) -> Sample:
    user, _ = await funded_user(suite)
    return Sample(wallet_pb2.ListLedgerEntriesRequest(user_id=user, page_size=10), user)


@sample(WALLET, "GetCoinStatement")
async def _get_coin_statement(suite: Suite) -> Sample:
    user, _ = await funded_user(suite)
    until = Timestamp(seconds=4_102_444_800)  # a fixed end (2100): the same answer to every caller
    return Sample(wallet_pb2.GetCoinStatementRequest(user_id=user, end_time=until), user)


@sample(WALLET, "DebitCoins")
async def _debit_coins(suite: Suite) -> Sample:
    user, _ = await funded_user(suite)
    request = wallet_pb2.DebitCoinsRequest(
        request_id=new_id("gift:sec"),
        user_id=user,
        coins=25,
        reason=wallet_pb2.DEBIT_REASON_GIFT,
        reference=new_id("gift"),
    )
    return Sample(request, user, mutates=True)


async def placed_hold(suite: Suite, coins: int = 100) -> str:
    """A hold the promotion service placed on a new funded user's coins; returns its id."""
    user, _ = await funded_user(suite)
    response = await suite.as_caller("promotion").wallet.PlaceHold(hold_request(user, coins))
    return response.hold.hold_id


def hold_request(user: str, coins: int = 100) -> wallet_pb2.PlaceHoldRequest:
    return wallet_pb2.PlaceHoldRequest(
        request_id=new_id("promotion:sec"),
        user_id=user,
        coins=coins,
        reason=wallet_pb2.DEBIT_REASON_PROMOTION,
        reference=new_id("promo"),
    )


@sample(WALLET, "PlaceHold")
async def _place_hold(suite: Suite) -> Sample:
    user, _ = await funded_user(suite)
    return Sample(hold_request(user), user, mutates=True)


@sample(WALLET, "CaptureHold")
async def _capture_hold(suite: Suite) -> Sample:
    request = wallet_pb2.CaptureHoldRequest(
        request_id=new_id("capture"), hold_id=await placed_hold(suite), coins=40
    )
    return Sample(request, None, mutates=True)


@sample(WALLET, "ReleaseHold")
async def _release_hold(suite: Suite) -> Sample:
    request = wallet_pb2.ReleaseHoldRequest(
        request_id=new_id("release"), hold_id=await placed_hold(suite)
    )
    return Sample(request, None, mutates=True)


@sample(WALLET, "GetHold")
async def _get_hold(suite: Suite) -> Sample:
    return Sample(wallet_pb2.GetHoldRequest(hold_id=await placed_hold(suite)), None)


@sample(WALLET, "RecordPaymentEvent")
async def _record_payment_event(suite: Suite) -> Sample:
    user = new_id("buyer")
    await open_account(suite, user)
    bought = await suite.wallet.PurchaseCoins(
        wallet_pb2.PurchaseCoinsRequest(
            request_id=new_id("buy"),
            user_id=user,
            package_id="us-web-700",
            payment_token="tok_visa",
        )
    )
    request = wallet_pb2.RecordPaymentEventRequest(
        request_id=new_id("evt"),
        type=wallet_pb2.PAYMENT_EVENT_TYPE_REFUND,
        provider_transaction_id=bought.purchase.provider_transaction_id,
    )
    return Sample(request, None, mutates=True)


@sample(WALLET, "ResolveDebit")
async def _resolve_debit(suite: Suite) -> Sample:
    user, _ = await funded_user(suite)
    request = wallet_pb2.ResolveDebitRequest(request_id=new_id("gift:lost"), user_id=user)
    return Sample(request, None, mutates=True)  # an unknown id: voided


@sample(WALLET, "ResolveHold")
async def _resolve_hold(suite: Suite) -> Sample:
    user, _ = await funded_user(suite)
    request = wallet_pb2.ResolveHoldRequest(request_id=new_id("promotion:lost"), user_id=user)
    return Sample(request, None, mutates=True)  # an unknown id: voided


@sample(WALLET, "SetCoinPackage")
async def _set_coin_package(suite: Suite) -> Sample:
    request = wallet_pb2.SetCoinPackageRequest(
        request_id=new_id("pkg"),
        package_id=new_id("us-web-sec").lower(),
        region="US",
        channel=wallet_pb2.CHANNEL_WEB,
        coins=123,
        price=money_pb2.Money(currency_code="USD", amount_minor=199),
        active=False,  # off sale: the business tests' price lists stay as they are
        reason="security test sample",
    )
    return Sample(request, new_id("admin"), admin=True, mutates=True)


@sample(WALLET, "SetAccountClassification")
async def _set_account_classification(suite: Suite) -> Sample:
    user = new_id("viewer")
    await open_account(suite, user)
    request = wallet_pb2.SetAccountClassificationRequest(
        request_id=new_id("class"),
        user_id=user,
        classification=wallet_pb2.ACCOUNT_CLASSIFICATION_POLITICAL,
        reason="security test sample",
    )
    return Sample(request, new_id("admin"), admin=True, mutates=True)


# -------------------------------------------------------------------------------------------- gifting


@sample(GIFTING, "ListGifts", any_user=True)
async def _list_gifts(suite: Suite) -> Sample:
    return Sample(gifting_pb2.ListGiftsRequest(page_size=5), new_id("viewer"))


@sample(GIFTING, "ListGiftVersions", any_user=True)
async def _list_gift_versions(suite: Suite) -> Sample:
    return Sample(gifting_pb2.ListGiftVersionsRequest(gift_id="rose"), new_id("viewer"))


@sample(GIFTING, "SendGift")
async def _send_gift(suite: Suite) -> Sample:
    sender, _ = await funded_user(suite)
    request = gift_request(sender, await new_creator(suite))

    async def settle(response: Message) -> None:
        # The admitted gift's credit leaves through the outbox; wait until it reached payout.
        assert isinstance(response, gifting_pb2.SendGiftResponse)
        await gift_credited(suite, response.sent_gift.sent_gift_id, sender)()

    return Sample(request, sender, mutates=True, settle=settle)


@sample(GIFTING, "GetGift", record_owned=True)
async def _get_gift(suite: Suite) -> Sample:
    sender, _ = await funded_user(suite)
    sent = await suite.gifting.SendGift(gift_request(sender, await new_creator(suite)))
    sent_gift_id = sent.sent_gift.sent_gift_id
    await gift_credited(suite, sent_gift_id, sender)()
    request = gifting_pb2.GetGiftRequest(sent_gift_id=sent_gift_id)
    return Sample(request, sender)


@sample(GIFTING, "ListTopGifters", any_user=True)
async def _list_top_gifters(suite: Suite) -> Sample:
    creator = await new_creator(suite)
    request = gifting_pb2.ListTopGiftersRequest(live_id=live_of(creator), page_size=5)
    return Sample(request, new_id("viewer"))


@sample(GIFTING, "SetGift")
async def _set_gift(suite: Suite) -> Sample:
    request = gifting_pb2.SetGiftRequest(
        request_id=new_id("setgift"),
        gift_id=new_id("sec").lower(),
        name="Security sample",
        coins=7,
        active=False,  # retired: the business tests' catalog stays as it is
        reason="security test sample",
    )
    return Sample(request, new_id("admin"), admin=True, mutates=True)


@sample(GIFTING, "ListParkedCredits")
async def _list_parked_credits(suite: Suite) -> Sample:
    request = gifting_pb2.ListParkedCreditsRequest(page_size=5)
    return Sample(request, new_id("admin"), admin=True)


@sample(GIFTING, "RedeliverParkedCredits")
async def _redeliver_parked_credits(suite: Suite) -> Sample:
    request = gifting_pb2.RedeliverParkedCreditsRequest(
        request_id=new_id("redeliver"),
        sent_gift_ids=[new_id("gift")],  # none parked: the audit trail is what changes
        reason="security test sample",
    )
    return Sample(request, new_id("admin"), admin=True, mutates=True)


@sample(GIFTING, "StartLive")
async def _start_live(suite: Suite) -> Sample:
    creator = new_id("creator")
    request = gifting_pb2.StartLiveRequest(
        request_id=new_id("live"), creator_id=creator, title="security test sample"
    )
    return Sample(request, creator, mutates=True)


@sample(GIFTING, "EndLive", record_owned=True)
async def _end_live(suite: Suite) -> Sample:
    creator = await new_creator(suite)
    request = gifting_pb2.EndLiveRequest(
        request_id=new_id("end"), live_id=live_of(creator), reason="security test sample"
    )
    return Sample(request, creator, mutates=True)


@sample(GIFTING, "SetLiveGifts", record_owned=True)
async def _set_live_gifts(suite: Suite) -> Sample:
    creator = await new_creator(suite)
    request = gifting_pb2.SetLiveGiftsRequest(
        request_id=new_id("gifts"),
        live_id=live_of(creator),
        gifts_enabled=False,
        reason="security test sample",
    )
    return Sample(request, creator, mutates=True)


@sample(GIFTING, "GetLive", any_user=True)
async def _get_live(suite: Suite) -> Sample:
    creator = await new_creator(suite)
    return Sample(gifting_pb2.GetLiveRequest(live_id=live_of(creator)), new_id("viewer"))


@sample(GIFTING, "ListCreatorRankings", any_user=True)
async def _list_creator_rankings(suite: Suite) -> Sample:
    request = gifting_pb2.ListCreatorRankingsRequest(
        period=gifting_pb2.RANKING_PERIOD_ALL_TIME, page_size=5
    )
    return Sample(request, new_id("viewer"))


@sample(GIFTING, "ListCreatorTopGifters", any_user=True)
async def _list_creator_top_gifters(suite: Suite) -> Sample:
    request = gifting_pb2.ListCreatorTopGiftersRequest(creator_id=new_id("creator"), page_size=5)
    return Sample(request, new_id("viewer"))


@sample(GIFTING, "WatchLive", any_user=True)
async def _watch_live(suite: Suite) -> Sample:
    creator = await new_creator(suite)
    return Sample(gifting_pb2.WatchLiveRequest(live_id=live_of(creator)), new_id("viewer"))


# --------------------------------------------------------------------------------------------- payout


@sample(PAYOUT, "GetDiamondBalance")
async def _get_diamond_balance(suite: Suite) -> Sample:
    creator = await creator_with_diamonds(suite, 100)
    return Sample(payout_pb2.GetDiamondBalanceRequest(creator_id=creator), creator)


@sample(PAYOUT, "CreditDiamonds")
async def _credit_diamonds(suite: Suite) -> Sample:
    request = payout_pb2.CreditDiamondsRequest(
        request_id=new_id("gift"), creator_id=new_id("creator"), coins=40, reference=new_id("gift")
    )
    return Sample(request, None, mutates=True)


@sample(PAYOUT, "BatchCreditDiamonds")
async def _batch_credit_diamonds(suite: Suite) -> Sample:
    request = payout_pb2.BatchCreditDiamondsRequest(
        requests=[
            payout_pb2.CreditDiamondsRequest(
                request_id=new_id("gift"), creator_id=creator, coins=40, reference=new_id("gift")
            )
            for creator in (new_id("creator"), new_id("creator"))
        ]
    )
    return Sample(request, None, mutates=True)


@sample(PAYOUT, "ListReversedCredits")
async def _list_reversed_credits(suite: Suite) -> Sample:
    return Sample(payout_pb2.ListReversedCreditsRequest(page_size=5), None)


@sample(PAYOUT, "RequestWithdrawal")
async def _request_withdrawal(suite: Suite) -> Sample:
    creator = await creator_with_diamonds(suite, 5_000)
    request = withdrawal_request(creator)

    async def settle(response: Message) -> None:
        assert isinstance(response, payout_pb2.RequestWithdrawalResponse)
        await withdrawal_settled(suite, response.withdrawal.withdrawal_id, creator)()

    return Sample(request, creator, mutates=True, settle=settle)


@sample(PAYOUT, "GetWithdrawal", record_owned=True)
async def _get_withdrawal(suite: Suite) -> Sample:
    creator = await creator_with_diamonds(suite, 5_000)
    made = await suite.payout.RequestWithdrawal(withdrawal_request(creator))
    withdrawal_id = made.withdrawal.withdrawal_id
    await withdrawal_settled(suite, withdrawal_id, creator)()
    request = payout_pb2.GetWithdrawalRequest(withdrawal_id=withdrawal_id)
    return Sample(request, creator)


async def withdrawal_in_review(suite: Suite) -> tuple[str, str]:
    """(creator, withdrawal id) of a withdrawal above the auto-approve threshold: it waits."""
    creator = await creator_with_diamonds(suite, 50_000)
    made = await suite.payout.RequestWithdrawal(
        payout_pb2.RequestWithdrawalRequest(
            request_id=new_id("wd"),
            creator_id=creator,
            diamonds=40_000,  # $200
            method=payout_pb2.PAYOUT_METHOD_PAYPAL,
            destination_token="dest_paypal_ok",
        )
    )
    assert made.withdrawal.status == payout_pb2.WITHDRAWAL_STATUS_IN_REVIEW
    return creator, made.withdrawal.withdrawal_id


@sample(PAYOUT, "CancelWithdrawal", record_owned=True)
async def _cancel_withdrawal(suite: Suite) -> Sample:
    creator, withdrawal_id = await withdrawal_in_review(suite)
    request = payout_pb2.CancelWithdrawalRequest(
        request_id=new_id("cancel"), withdrawal_id=withdrawal_id, reason="the creator asked support"
    )  # the reason an admin cancelling it must give (a creator may give one too)
    return Sample(request, creator, mutates=True)


@sample(PAYOUT, "ReviewWithdrawal")
async def _review_withdrawal(suite: Suite) -> Sample:
    _, withdrawal_id = await withdrawal_in_review(suite)
    request = payout_pb2.ReviewWithdrawalRequest(
        request_id=new_id("review"),
        withdrawal_id=withdrawal_id,
        decision=payout_pb2.REVIEW_DECISION_REJECT,
        reason="security test sample",
    )
    return Sample(request, new_id("admin"), admin=True, mutates=True)


@sample(PAYOUT, "ListWithdrawalQueue")
async def _list_withdrawal_queue(suite: Suite) -> Sample:
    request = payout_pb2.ListWithdrawalQueueRequest(
        queue=payout_pb2.WITHDRAWAL_QUEUE_PARKED, page_size=5
    )
    return Sample(request, new_id("admin"), admin=True)


@sample(PAYOUT, "GetRevenueReport")
async def _get_revenue_report(suite: Suite) -> Sample:
    request = payout_pb2.GetRevenueReportRequest()
    request.start_time.FromDatetime(dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    return Sample(request, new_id("admin"), admin=True)


@sample(PAYOUT, "RetryWithdrawal")
async def _retry_withdrawal(suite: Suite) -> Sample:
    _, withdrawal_id = await withdrawal_in_review(suite)
    # As the worker parks one it could not send (only a processing withdrawal is parked).
    async with suite.services["payout"].runtime.db.transaction() as conn:
        await conn.execute(
            sa.update(payout_storage.withdrawals)
            .where(payout_storage.withdrawals.c.withdrawal_id == withdrawal_id)
            .values(status="processing", submitted_at=sa.func.now(), parked_at=sa.func.now())
        )
    request = payout_pb2.RetryWithdrawalRequest(
        request_id=new_id("retry"), withdrawal_id=withdrawal_id
    )
    return Sample(request, new_id("admin"), admin=True, mutates=True)


@sample(PAYOUT, "HandleProcessorEvent")
async def _handle_processor_event(suite: Suite) -> Sample:
    body = json.dumps(
        {
            "id": new_id("WH"),
            "event_type": "PAYMENT.PAYOUTS-ITEM.SUCCEEDED",
            "resource": {"sender_item_id": new_id("not-ours"), "transaction_status": "SUCCESS"},
        }
    ).encode()
    secret = PAYOUT_WEBHOOK_SECRET.encode()
    request = payout_pb2.HandleProcessorEventRequest(body=body, signature=sign(secret, body))
    return Sample(request, None, mutates=True)


@sample(PAYOUT, "ReconcileWithdrawals")
async def _reconcile_withdrawals(suite: Suite) -> Sample:
    request = payout_pb2.ReconcileWithdrawalsRequest(run_now=False)
    return Sample(request, new_id("admin"), admin=True)


@sample(PAYOUT, "ListWithdrawals")
async def _list_withdrawals(suite: Suite) -> Sample:
    creator = await creator_with_diamonds(suite, 100)
    return Sample(payout_pb2.ListWithdrawalsRequest(creator_id=creator, page_size=5), creator)


@sample(PAYOUT, "QuoteWithdrawal")
async def _quote_withdrawal(suite: Suite) -> Sample:
    creator = await creator_with_diamonds(suite, 3_000)
    return Sample(payout_pb2.QuoteWithdrawalRequest(creator_id=creator, diamonds=2_001), creator)


@sample(PAYOUT, "SetCreatorVerification")
async def _set_creator_verification(suite: Suite) -> Sample:
    request = payout_pb2.SetCreatorVerificationRequest(
        request_id=new_id("kyc"),
        creator_id=new_id("creator"),
        status=payout_pb2.KYC_STATUS_PENDING,
        reason="security test sample",
    )
    return Sample(request, new_id("admin"), admin=True, mutates=True)


async def creator_with_method(suite: Suite) -> tuple[str, str]:
    creator = await creator_with_diamonds(suite, 100)
    added = await suite.payout.AddPayoutMethod(
        payout_pb2.AddPayoutMethodRequest(
            request_id=new_id("pm"),
            creator_id=creator,
            paypal=payout_pb2.PayPalAccount(email=f"{creator}@example.com"),
        )
    )
    return creator, added.payout_method.payout_method_id


@sample(PAYOUT, "AddPayoutMethod")
async def _add_payout_method(suite: Suite) -> Sample:
    creator = await creator_with_diamonds(suite, 100)
    request = payout_pb2.AddPayoutMethodRequest(
        request_id=new_id("pm"),
        creator_id=creator,
        bank=payout_pb2.BankAccount(processor_token="btok_sample_1", last4="6789"),
    )
    return Sample(request, creator, mutates=True)


@sample(PAYOUT, "ListPayoutMethods")
async def _list_payout_methods(suite: Suite) -> Sample:
    creator, _ = await creator_with_method(suite)
    return Sample(payout_pb2.ListPayoutMethodsRequest(creator_id=creator), creator)


@sample(PAYOUT, "SetDefaultPayoutMethod")
async def _set_default_payout_method(suite: Suite) -> Sample:
    creator, method_id = await creator_with_method(suite)
    request = payout_pb2.SetDefaultPayoutMethodRequest(
        request_id=new_id("pm"), creator_id=creator, payout_method_id=method_id
    )
    return Sample(request, creator, mutates=True)


@sample(PAYOUT, "RemovePayoutMethod")
async def _remove_payout_method(suite: Suite) -> Sample:
    creator, method_id = await creator_with_method(suite)
    request = payout_pb2.RemovePayoutMethodRequest(
        request_id=new_id("pm"), creator_id=creator, payout_method_id=method_id
    )
    return Sample(request, creator, mutates=True)


@sample(PAYOUT, "ReverseGiftCredits")
async def _reverse_gift_credits(suite: Suite) -> Sample:
    request = payout_pb2.ReverseGiftCreditsRequest(
        request_id=new_id("reverse"),
        gift_ids=[new_id("gift")],  # never credited: the audit trail is what changes
        reason="security test sample",
    )
    return Sample(request, new_id("admin"), admin=True, mutates=True)


@sample(PAYOUT, "ListDiamondEntries")
async def _list_diamond_entries(suite: Suite) -> Sample:
    creator = await creator_with_diamonds(suite, 100)
    return Sample(payout_pb2.ListDiamondEntriesRequest(creator_id=creator, page_size=5), creator)


@sample(PAYOUT, "GetDiamondStatement")
async def _get_diamond_statement(suite: Suite) -> Sample:
    creator = await creator_with_diamonds(suite, 100)
    until = Timestamp(seconds=4_102_444_800)  # a fixed end (2100): the same answer to every caller
    return Sample(
        payout_pb2.GetDiamondStatementRequest(creator_id=creator, end_time=until), creator
    )


# ------------------------------------------------------------------------------------------ promotion


@sample(PROMOTION, "CreatePromotion")
async def _create_promotion(suite: Suite) -> Sample:
    user, _ = await funded_user(suite)
    return Sample(promotion_request(user), user, mutates=True)


@sample(PROMOTION, "GetPromotion", record_owned=True)
async def _get_promotion(suite: Suite) -> Sample:
    user, _ = await funded_user(suite)
    made = await suite.promotion.CreatePromotion(promotion_request(user))
    request = promotion_pb2.GetPromotionRequest(promotion_id=made.promotion.promotion_id)
    return Sample(request, user)


@sample(PROMOTION, "ListPromotions")
async def _list_promotions(suite: Suite) -> Sample:
    user, _ = await funded_user(suite)
    return Sample(promotion_pb2.ListPromotionsRequest(user_id=user, page_size=5), user)


async def active_promotion(suite: Suite) -> tuple[str, str]:
    """A new funded user's promotion, its budget held; returns (owner, promotion id)."""
    user, _ = await funded_user(suite)
    made = await suite.promotion.CreatePromotion(promotion_request(user))
    return user, made.promotion.promotion_id


@sample(PROMOTION, "ReportDelivery")
async def _report_delivery(suite: Suite) -> Sample:
    _, promotion_id = await active_promotion(suite)
    request = promotion_pb2.ReportDeliveryRequest(
        request_id=new_id("delivery"), promotion_id=promotion_id, coins=40
    )
    return Sample(request, None, mutates=True)


@sample(PROMOTION, "EndPromotion", record_owned=True)
async def _end_promotion(suite: Suite) -> Sample:
    user, promotion_id = await active_promotion(suite)
    request = promotion_pb2.EndPromotionRequest(
        request_id=new_id("end"), promotion_id=promotion_id, reason="ended at the owner's request"
    )  # the reason an admin ending it must give (an owner may give one too)
    return Sample(request, user, mutates=True)


# ------------------------------------------------------------------------- admin audit (every service)


@sample(LEDGER_AUDIT, "AuditLedger")
async def _audit_ledger(suite: Suite) -> Sample:
    # Incremental: who may run an audit is the same for every mode, and a full audit of the shared
    # suite's ledger, which every test grows, can outlast the call's timeout on a busy machine.
    request = ledger_audit_pb2.AuditLedgerRequest(mode=ledger_audit_pb2.AUDIT_MODE_INCREMENTAL)
    return Sample(request, new_id("admin"), admin=True)


@sample(ADMIN_AUDIT, "ListAdminActions")
async def _list_admin_actions(suite: Suite) -> Sample:
    request = admin_audit_pb2.ListAdminActionsRequest(page_size=5)
    return Sample(request, new_id("admin"), admin=True)
