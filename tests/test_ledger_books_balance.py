"""After a busy run of gifts, purchases, promotions (held, then delivered) and withdrawals, both ledgers
audit clean."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable

import grpc

from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from coins.promotion.v1 import promotion_pb2
from ledger import Ledger
from runtime.clock import SystemClock
from runtime.status import error_info
from tests.helpers import funded_user, live_of, new_creator, new_id, verify_creator
from tests.suite import Suite
from tests.test_fuzz import wait_until_idle


async def test_the_books_balance_after_a_mixed_concurrent_run(suite: Suite) -> None:
    rng = random.Random(7)
    viewers = [await funded_user(suite, "us-web-3500") for _ in range(4)]
    creators = [await new_creator(suite) for _ in range(2)]
    gifts = ["rose", "panda", "love-bang", "concert", "im-very-rich"]

    async def gift(sender: str) -> None:
        creator = rng.choice(creators)
        await suite.gifting.SendGift(
            gifting_pb2.SendGiftRequest(
                request_id=new_id("g"),
                sender_id=sender,
                creator_id=creator,
                gift_id=rng.choice(gifts),
                count=rng.randint(1, 3),
                live_id=live_of(creator),
            )
        )

    calls: list[Awaitable[object]] = [gift(user) for user, _ in viewers for _ in range(8)]
    calls += [
        suite.promotion.CreatePromotion(
            promotion_pb2.CreatePromotionRequest(
                request_id=new_id("p"),
                user_id=user,
                video_id="v",
                goal=promotion_pb2.GOAL_FOLLOWERS,
                budget_coins=100,
                duration_days=1,
            )
        )
        for user, _ in viewers
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    # Then the promotions are delivered (their held budgets captured in part), among more gifts.
    more: list[Awaitable[object]] = [gift(user) for user, _ in viewers for _ in range(2)]
    more += [
        suite.ad_delivery.ReportDelivery(
            promotion_pb2.ReportDeliveryRequest(
                request_id=new_id("d"), promotion_id=made.promotion.promotion_id, coins=60
            )
        )
        for made in results
        if isinstance(made, promotion_pb2.CreatePromotionResponse)
    ]
    results += await asyncio.gather(*more, return_exceptions=True)
    # Some gifts may be refused for lack of coins; nothing else may fail.
    for result in results:
        if isinstance(result, BaseException):
            info = error_info(result) if isinstance(result, grpc.RpcError) else None
            assert info is not None and info.reason == "INSUFFICIENT_FUNDS", result
    await wait_until_idle(suite)  # the outbox relay delivers the last credits
    balance = await suite.payout.GetDiamondBalance(
        payout_pb2.GetDiamondBalanceRequest(creator_id=creators[0])
    )
    if balance.balance.diamonds >= 2000:
        await verify_creator(suite, creators[0])
        await suite.payout.RequestWithdrawal(
            payout_pb2.RequestWithdrawalRequest(
                request_id=new_id("w"),
                creator_id=creators[0],
                diamonds=2000,
                method=payout_pb2.PAYOUT_METHOD_BANK,
                destination_token="dest_bank_ok",
            )
        )
    await wait_until_idle(suite)  # the withdrawal settled
    for service, unit in (("wallet", "coins"), ("payout", "diamonds")):
        db = suite.services[service].runtime.db
        async with db.snapshot() as conn:  # other tests' background work may still post
            report = await Ledger(SystemClock(), unit=unit).audit(conn)
        assert report.mismatches == {}, f"{service}: kept balances differ from their entries"
        assert report.total == 0, f"{service}: the books do not sum to zero"
        assert report.accounts_checked > 0
