"""AIP-155 request ids: a retry returns the first answer and changes nothing, even when retries race."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2
from google.protobuf.message import Message
from google.type import date_pb2

from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from coins.promotion.v1 import promotion_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.idempotency import Idempotency, fingerprint, fingerprints
from runtime.status import error_info
from tests.helpers import (
    expect_error,
    funded_user,
    live_gift,
    live_of,
    new_creator,
    new_id,
    rpc_error,
    start_live,
)
from tests.suite import Suite
from tests.test_payout import creator_with_diamonds, withdrawal
from tests.test_promotion import delivery, ending, promotion
from tests.test_promotion import read as read_promotion


async def coins_of(suite: Suite, user: str) -> int:
    response = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    return response.balance.coins


async def test_a_debit_retried_after_its_request_id_was_purged_is_answered_from_the_ledger(
    suite: Suite,
) -> None:
    """The wallet forgets answered request ids after WALLET_IDEMPOTENCY_RETENTION_HOURS, the ledger
    keeps its transactions under theirs for good: a retry after the purge (gifting re-sending a
    gift's debit two days on) is answered from the ledger and debits nothing twice; with other coins
    it is refused (review r15: INTERNAL on every retry, the unique request id colliding)."""
    user, coins = await funded_user(suite)
    gifting = suite.as_caller("gifting").wallet
    request = wallet_pb2.DebitCoinsRequest(
        request_id=new_id("r"),
        user_id=user,
        coins=30,
        reason=wallet_pb2.DEBIT_REASON_GIFT,
        reference="a gift",
    )
    first = await gifting.DebitCoins(request)
    assert await suite.services["wallet"].runtime.idempotency.purge(dt.timedelta(0)) > 0
    again = await gifting.DebitCoins(request)
    assert (again.transaction_id, again.balance.coins) == (first.transaction_id, coins - 30)
    other = wallet_pb2.DebitCoinsRequest()
    other.CopyFrom(request)
    other.coins = 31
    await expect_error(
        gifting.DebitCoins(other), grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"
    )
    assert await coins_of(suite, user) == coins - 30


async def test_a_retried_debit_returns_the_first_response(suite: Suite) -> None:
    user, coins = await funded_user(suite)
    request = wallet_pb2.DebitCoinsRequest(
        request_id=new_id("r"),
        user_id=user,
        coins=50,
        reason=wallet_pb2.DEBIT_REASON_GIFT,
        reference="x",
    )
    first = await suite.as_caller("gifting").wallet.DebitCoins(request)
    second = await suite.as_caller("gifting").wallet.DebitCoins(request)
    assert second == first
    assert await coins_of(suite, user) == coins - 50


async def test_a_retry_carrying_a_field_this_service_does_not_know_is_the_same_request(
    suite: Suite,
) -> None:
    """A newer client (or a replica of the next release, relaying) sends a field this release does
    not know: the retry is the request this service already answered, not a reuse of its id
    (review r21: REQUEST_ID_REUSED told a genuine retry to take a new id and be applied twice)."""
    user, coins = await funded_user(suite)
    request = wallet_pb2.DebitCoinsRequest(
        request_id=new_id("r"),
        user_id=user,
        coins=7,
        reason=wallet_pb2.DEBIT_REASON_GIFT,
        reference="unknown-field",
    )
    first = await suite.as_caller("gifting").wallet.DebitCoins(request)
    field_99 = bytes([(99 << 3) & 0x7F | 0x80, 99 >> 4, 1])  # tag 99 (varint), value 1
    retry = wallet_pb2.DebitCoinsRequest.FromString(request.SerializeToString() + field_99)
    assert retry.SerializeToString().endswith(field_99)  # sent on the wire as it came
    assert await suite.as_caller("gifting").wallet.DebitCoins(retry) == first
    assert await coins_of(suite, user) == coins - 7


def test_a_request_is_one_request_whichever_release_reads_it() -> None:
    """In a rolling update a retry can reach a release that does not know a field the first
    attempt's release knew, or the other way round (review r23: discarding unknown fields made the
    two releases' fingerprints differ: REQUEST_ID_REUSED for a genuine retry). A release that knows
    none of the fields (Empty) fingerprints the bytes as they came exactly as one that knows them
    all; and a retry is matched by that or by its known fields alone."""
    full = wallet_pb2.DebitCoinsRequest(
        user_id="u1", coins=7, reason=wallet_pb2.DEBIT_REASON_GIFT, reference="x"
    )  # no request_id: Empty could not leave it out
    unaware = empty_pb2.Empty.FromString(full.SerializeToString())
    assert fingerprint(unaware) == fingerprint(full)  # stored by either: the same
    assert fingerprints(full) == (fingerprint(full),)  # nothing unknown: one fingerprint
    assert fingerprints(unaware) == (fingerprint(full), fingerprint(empty_pb2.Empty()))
    other = wallet_pb2.DebitCoinsRequest()
    other.CopyFrom(full)
    other.coins = 8
    assert fingerprint(other) not in fingerprints(unaware)  # other parameters stay refused


async def test_reusing_a_request_id_with_other_parameters_is_refused(suite: Suite) -> None:
    user, coins = await funded_user(suite)
    request = wallet_pb2.DebitCoinsRequest(
        request_id=new_id("r"),
        user_id=user,
        coins=5,
        reason=wallet_pb2.DEBIT_REASON_GIFT,
        reference="a",
    )
    await suite.as_caller("gifting").wallet.DebitCoins(request)
    request.coins = 6
    await expect_error(
        suite.as_caller("gifting").wallet.DebitCoins(request),
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )
    assert await coins_of(suite, user) == coins - 5


async def test_twenty_concurrent_debits_with_one_id_take_the_coins_once(suite: Suite) -> None:
    user, coins = await funded_user(suite)
    request = wallet_pb2.DebitCoinsRequest(
        request_id=new_id("r"),
        user_id=user,
        coins=7,
        reason=wallet_pb2.DEBIT_REASON_GIFT,
        reference="race",
    )
    responses = await asyncio.gather(
        *(suite.as_caller("gifting").wallet.DebitCoins(request) for _ in range(20))
    )
    assert len({r.transaction_id for r in responses}) == 1
    assert await coins_of(suite, user) == coins - 7
    entries = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=user)
    )
    assert [e.amount for e in entries.entries] == [-7, coins]


async def test_concurrent_distinct_debits_never_overdraw(suite: Suite) -> None:
    user, coins = await funded_user(suite)  # 700 coins
    requests = [
        wallet_pb2.DebitCoinsRequest(
            request_id=new_id("r"),
            user_id=user,
            coins=100,
            reason=wallet_pb2.DEBIT_REASON_GIFT,
            reference="many",
        )
        for _ in range(12)
    ]
    results = await asyncio.gather(
        *(suite.as_caller("gifting").wallet.DebitCoins(r) for r in requests), return_exceptions=True
    )
    succeeded = [r for r in results if isinstance(r, wallet_pb2.DebitCoinsResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(succeeded) == coins // 100
    assert all(e.code() == grpc.StatusCode.FAILED_PRECONDITION for e in refused)
    assert len(succeeded) + len(refused) == len(requests)
    assert await coins_of(suite, user) == coins - 100 * len(succeeded)


async def test_concurrent_retries_of_one_gift_send_it_once(suite: Suite) -> None:
    sender, coins = await funded_user(suite)
    creator = await new_creator(suite)
    request = gifting_pb2.SendGiftRequest(
        request_id=new_id("g"),
        sender_id=sender,
        creator_id=creator,
        gift_id="sun-cream",
        count=1,
        live_id=live_of(creator),
    )
    results = await asyncio.gather(
        *(suite.gifting.SendGift(request) for _ in range(10)), return_exceptions=True
    )
    sent = {
        r.sent_gift.sent_gift_id for r in results if isinstance(r, gifting_pb2.SendGiftResponse)
    }
    assert len(sent) == 1
    for result in results:  # a racing attempt may be told to retry; never anything else
        if isinstance(result, grpc.aio.AioRpcError):
            assert result.code() == grpc.StatusCode.ABORTED
    assert (await suite.gifting.SendGift(request)).sent_gift.sent_gift_id in sent
    assert await coins_of(suite, sender) == coins - 50


async def test_a_retried_credit_credits_once(suite: Suite) -> None:
    creator = new_id("creator")
    request = payout_pb2.CreditDiamondsRequest(
        request_id=new_id("gift"), creator_id=creator, coins=1000, reference="g"
    )
    first, second = await asyncio.gather(
        suite.as_caller("gifting").payout.CreditDiamonds(request),
        suite.as_caller("gifting").payout.CreditDiamonds(request),
    )
    assert first == second
    assert first.diamonds_credited == 500
    balance = await suite.payout.GetDiamondBalance(
        payout_pb2.GetDiamondBalanceRequest(creator_id=creator)
    )
    assert balance.balance.diamonds == 500


async def test_request_ids_are_scoped_to_the_user(suite: Suite) -> None:
    a, coins_a = await funded_user(suite)
    b, coins_b = await funded_user(suite)
    shared_id = new_id("same")
    for user in (a, b):
        await suite.as_caller("gifting").wallet.DebitCoins(
            wallet_pb2.DebitCoinsRequest(
                request_id=shared_id,
                user_id=user,
                coins=1,
                reason=wallet_pb2.DEBIT_REASON_GIFT,
                reference="scoped",
            )
        )
    assert await coins_of(suite, a) == coins_a - 1
    assert await coins_of(suite, b) == coins_b - 1
    error = await rpc_error(
        suite.as_caller("gifting").wallet.DebitCoins(
            wallet_pb2.DebitCoinsRequest(
                request_id=shared_id,
                user_id=a,
                coins=2,
                reason=wallet_pb2.DEBIT_REASON_GIFT,
                reference="scoped",
            )
        )
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_racing_duplicates_of_every_saga_all_get_the_first_answer(suite: Suite) -> None:
    """A client that retries before its first attempt answered (a timeout, a hedged request) sends
    duplicates that race each other through the saga: each gets the first answer, as a later
    retry does, never a CONCURRENT_RETRY or PROMOTION_ENDED of its own."""
    user, coins = await funded_user(suite)
    creator = await new_creator(suite)
    token = suite.token(user)

    async def all_alike(call: Callable[[], Awaitable[Message]]) -> Message:
        results = await asyncio.gather(*(call() for _ in range(12)), return_exceptions=True)
        answers = [a for a in results if isinstance(a, Message)]
        assert len(answers) == len(results), results
        assert len({a.SerializeToString(deterministic=True) for a in answers}) == 1, answers
        later = await call()
        assert later == answers[0]
        return answers[0]

    buy = wallet_pb2.PurchaseCoinsRequest(
        request_id=new_id("buy"), user_id=user, package_id="us-web-700", payment_token="tok_visa_2"
    )
    bought = await all_alike(lambda: suite.wallet.PurchaseCoins(buy))
    assert isinstance(bought, wallet_pb2.PurchaseCoinsResponse)
    assert bought.balance.coins == coins + 700
    gift = gifting_pb2.SendGiftRequest(
        request_id=new_id("g"),
        sender_id=user,
        creator_id=creator,
        gift_id="sun-cream",
        count=1,
        live_id=live_of(creator),
    )
    await all_alike(lambda: suite.gifting.SendGift(gift))
    create = promotion_pb2.CreatePromotionRequest(
        request_id=new_id("promo"),
        user_id=user,
        video_id="v1",
        goal=promotion_pb2.GOAL_VIDEO_VIEWS,
        budget_coins=100,
        duration_days=3,
    )
    made = await all_alike(lambda: suite.promotion.CreatePromotion(create, metadata=token))
    assert isinstance(made, promotion_pb2.CreatePromotionResponse)
    end = promotion_pb2.EndPromotionRequest(
        request_id=new_id("end"), promotion_id=made.promotion.promotion_id
    )
    ended = await all_alike(lambda: suite.promotion.EndPromotion(end, metadata=token))
    assert isinstance(ended, promotion_pb2.EndPromotionResponse)
    assert ended.released_coins == 100
    assert await coins_of(suite, user) == coins + 700 - 50


async def test_a_request_id_sent_again_for_another_record_is_refused_not_run_again(
    suite: Suite,
) -> None:
    """Request ids belong to the caller and the user it acts for, not to the record a request
    names: the id of an EndLive, a ReportDelivery or a CancelWithdrawal sent again for another LIVE,
    promotion or withdrawal is REQUEST_ID_REUSED, and that record is left as it was."""
    reused = (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    admin = suite.token(new_id("ops"), admin=True)

    creator = await new_creator(suite)  # LIVE in live_of(creator)
    creators = suite.token(creator)
    switch, end = new_id("switch"), new_id("end")
    await suite.gifting.SetLiveGifts(
        gifting_pb2.SetLiveGiftsRequest(
            request_id=switch, live_id=live_of(creator), gifts_enabled=False
        ),
        metadata=creators,
    )
    await suite.gifting.EndLive(
        gifting_pb2.EndLiveRequest(request_id=end, live_id=live_of(creator)), metadata=creators
    )
    later = await start_live(suite, creator)
    await expect_error(
        suite.gifting.SetLiveGifts(
            gifting_pb2.SetLiveGiftsRequest(request_id=switch, live_id=later, gifts_enabled=False),
            metadata=creators,
        ),
        *reused,
    )
    await expect_error(
        suite.gifting.EndLive(
            gifting_pb2.EndLiveRequest(request_id=end, live_id=later), metadata=creators
        ),
        *reused,
    )
    untouched = await suite.gifting.GetLive(gifting_pb2.GetLiveRequest(live_id=later))
    assert untouched.live.gifts_enabled and not untouched.live.HasField("end_time")

    user, coins = await funded_user(suite)
    token = suite.token(user)
    p1, p2 = [
        (await suite.promotion.CreatePromotion(promotion(user, 100), metadata=token)).promotion
        for _ in range(2)
    ]
    report = new_id("delivery")
    await suite.ad_delivery.ReportDelivery(delivery(p1.promotion_id, 10, report))
    await expect_error(
        suite.ad_delivery.ReportDelivery(delivery(p2.promotion_id, 10, report)), *reused
    )
    stop = new_id("end")
    await suite.promotion.EndPromotion(ending(p1.promotion_id, stop), metadata=token)
    await expect_error(
        suite.promotion.EndPromotion(ending(p2.promotion_id, stop), metadata=token), *reused
    )
    p2_now = await read_promotion(suite, p2.promotion_id, user)
    assert (p2_now.spent_coins, p2_now.status) == (0, promotion_pb2.PROMOTION_STATUS_ACTIVE)
    assert await coins_of(suite, user) == coins - 10  # p1's delivery; p2's budget still held

    creator = await creator_with_diamonds(suite, 100_000)
    w1, w2 = [
        (await suite.payout.RequestWithdrawal(withdrawal(creator, 40_000))).withdrawal
        for _ in range(2)
    ]
    review = new_id("review")
    for made in (w1, w2):
        decision = payout_pb2.ReviewWithdrawalRequest(
            request_id=review,
            withdrawal_id=made.withdrawal_id,
            decision=payout_pb2.REVIEW_DECISION_REJECT,
            reason="duplicate request",
        )
        if made is w1:
            await suite.payout.ReviewWithdrawal(decision, metadata=admin)
        else:
            await expect_error(suite.payout.ReviewWithdrawal(decision, metadata=admin), *reused)
    w3 = (await suite.payout.RequestWithdrawal(withdrawal(creator, 10_000))).withdrawal
    cancel = new_id("cancel")
    owner = suite.token(creator)
    for made in (w2, w3):
        withdrawn = payout_pb2.CancelWithdrawalRequest(
            request_id=cancel, withdrawal_id=made.withdrawal_id
        )
        if made is w2:
            await suite.payout.CancelWithdrawal(withdrawn, metadata=owner)
        else:
            await expect_error(suite.payout.CancelWithdrawal(withdrawn, metadata=owner), *reused)
    left = await suite.payout.GetWithdrawal(
        payout_pb2.GetWithdrawalRequest(withdrawal_id=w3.withdrawal_id), metadata=owner
    )
    assert left.withdrawal.status != payout_pb2.WITHDRAWAL_STATUS_CANCELLED


async def test_a_refusal_and_a_void_in_its_gap_tell_one_story(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused effect rolls back, then its refusal is stored in a transaction of its own. A
    ResolveDebit in between voided the request id: the caller was told INSUFFICIENT_FUNDS, the
    resolver "never received", and the retry DEBIT_VOIDED (review r8). Whatever is stored first is
    everyone's answer."""
    user, coins = await funded_user(suite)
    gifting = suite.as_caller("gifting").wallet
    request = wallet_pb2.DebitCoinsRequest(
        request_id=new_id("r"),
        user_id=user,
        coins=coins + 1,
        reason=wallet_pb2.DEBIT_REASON_GIFT,
        reference="x",
    )
    resolved: list[wallet_pb2.ResolveDebitResponse] = []
    record_error = Idempotency.record_error

    async def void_in_the_gap(self: Idempotency, *args: Any) -> Any:
        if not resolved:  # the resolver runs once, in the gap
            resolved.append(
                await gifting.ResolveDebit(
                    wallet_pb2.ResolveDebitRequest(request_id=request.request_id, user_id=user)
                )
            )
        return await record_error(self, *args)

    monkeypatch.setattr(Idempotency, "record_error", void_in_the_gap)
    first = await rpc_error(gifting.DebitCoins(request))
    assert [r.outcome for r in resolved] == [wallet_pb2.DEBIT_OUTCOME_VOIDED]
    again = await rpc_error(gifting.DebitCoins(request))
    assert (first.code(), first.details()) == (again.code(), again.details())
    assert error_info(first) == error_info(again)
    info = error_info(first)
    assert info is not None and info.reason == "DEBIT_VOIDED", first
    assert await coins_of(suite, user) == coins


async def test_invalid_input_leaves_the_request_id_free_for_the_corrected_request(
    suite: Suite,
) -> None:
    """Input a handler finds invalid (a birth date in the future, a self-gift) did nothing, as
    what the proto rules refuse: its request id is not used up, so the corrected request may be
    sent under it (a review found one kind of bad input used the id up, the other not)."""
    user = new_id("viewer")
    request_id = new_id("open")
    invalid = wallet_pb2.OpenAccountRequest(
        request_id=request_id,
        user_id=user,
        country_code="US",
        birth_date=date_pb2.Date(year=2099, month=1, day=1),
    )
    error = await rpc_error(suite.wallet.OpenAccount(invalid))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    corrected = wallet_pb2.OpenAccountRequest()
    corrected.CopyFrom(invalid)
    corrected.birth_date.year = 1990
    opened = await suite.wallet.OpenAccount(corrected)
    assert opened.account.user_id == user
    # A refusal that is not about the input is the id's answer, as before.
    sender, _ = await funded_user(suite)
    self_gift = live_gift(sender, sender, "rose")
    refused = await rpc_error(suite.gifting.SendGift(self_gift))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
    creator = await new_creator(suite)
    fixed = live_gift(sender, creator, "rose", request_id=self_gift.request_id)
    assert (await suite.gifting.SendGift(fixed)).sent_gift.creator_id == creator
