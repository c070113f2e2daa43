"""Promotion: a video promotion is paid in coins through the wallet, once, or not at all."""

from __future__ import annotations

import grpc

from coins.promotion.v1 import promotion_pb2
from coins.wallet.v1 import wallet_pb2
from tests.helpers import expect_error, field_violations, funded_user, new_id, rpc_error
from tests.suite import Suite


def promotion(
    user: str, budget: int, video: str = "video-1"
) -> promotion_pb2.CreatePromotionRequest:
    return promotion_pb2.CreatePromotionRequest(
        request_id=new_id("promo"),
        user_id=user,
        video_id=video,
        goal=promotion_pb2.GOAL_VIDEO_VIEWS,
        budget_coins=budget,
        duration_days=3,
    )


async def coins_of(suite: Suite, user: str) -> int:
    response = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    return response.balance.coins


async def test_a_promotion_is_paid_and_active(suite: Suite) -> None:
    user, coins = await funded_user(suite)
    request = promotion(user, 300)
    created = await suite.promotion.CreatePromotion(request)
    assert created.promotion.status == promotion_pb2.PROMOTION_STATUS_ACTIVE
    assert created.promotion.budget_coins == 300
    assert created.payer_balance_coins == coins - 300
    assert await suite.promotion.CreatePromotion(request) == created  # a retry pays nothing more
    assert await coins_of(suite, user) == coins - 300
    fetched = await suite.promotion.GetPromotion(
        promotion_pb2.GetPromotionRequest(promotion_id=created.promotion.promotion_id),
        metadata=suite.token(user),
    )
    assert fetched.promotion == created.promotion
    ledger = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=user, page_size=1)
    )
    assert ledger.entries[0].kind == wallet_pb2.ENTRY_KIND_PROMOTION
    assert ledger.entries[0].reference == created.promotion.promotion_id


async def test_a_promotion_without_enough_coins_charges_nothing(suite: Suite) -> None:
    user, coins = await funded_user(suite)
    await expect_error(
        suite.promotion.CreatePromotion(promotion(user, coins + 1)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_FUNDS",
    )
    assert await coins_of(suite, user) == coins


async def test_budgets_below_the_minimum_charge_are_invalid(suite: Suite) -> None:
    user, coins = await funded_user(suite)
    error = await rpc_error(suite.promotion.CreatePromotion(promotion(user, 99)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error) == {"budget_coins"}
    assert await coins_of(suite, user) == coins


async def test_a_users_promotions_are_listed_newest_first(suite: Suite) -> None:
    user, _ = await funded_user(suite)
    for video in ("v1", "v2", "v3"):
        await suite.promotion.CreatePromotion(promotion(user, 100, video))
    first = await suite.promotion.ListPromotions(
        promotion_pb2.ListPromotionsRequest(user_id=user, page_size=2)
    )
    rest = await suite.promotion.ListPromotions(
        promotion_pb2.ListPromotionsRequest(user_id=user, page_token=first.next_page_token)
    )
    assert [p.video_id for p in [*first.promotions, *rest.promotions]] == ["v3", "v2", "v1"]


async def test_an_unknown_promotion_is_not_found(suite: Suite) -> None:
    await expect_error(
        suite.promotion.GetPromotion(promotion_pb2.GetPromotionRequest(promotion_id="nope")),
        grpc.StatusCode.NOT_FOUND,
        "PROMOTION_NOT_FOUND",
    )
