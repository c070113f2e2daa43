"""Sending gifts: coins leave the sender, diamonds reach the creator, once, and LIVE rankings follow."""

from __future__ import annotations

import datetime as dt

import grpc
from google.type import date_pb2

from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.status import error_info
from tests.helpers import (
    eventually,
    expect_error,
    funded_user,
    live_of,
    new_creator,
    new_id,
    open_account,
    start_live,
)
from tests.suite import Suite


async def diamonds_of(suite: Suite, creator_id: str) -> int:
    response = await suite.payout.GetDiamondBalance(
        payout_pb2.GetDiamondBalanceRequest(creator_id=creator_id)
    )
    return response.balance.diamonds


async def wait_for_diamonds(suite: Suite, creator_id: str, expected: int) -> int:
    """The credit is delivered by the outbox relay just after SendGift answers; wait for it (bounded)."""

    async def arrived() -> bool:
        return await diamonds_of(suite, creator_id) >= expected

    await eventually(arrived, f"{expected} diamonds for {creator_id}")
    return await diamonds_of(suite, creator_id)


async def wait_until_credited(suite: Suite, sent: gifting_pb2.SentGift) -> None:
    """Wait until the relay has delivered the gift's credit and payout acknowledged it."""

    async def credited() -> bool:
        gift = await suite.gifting.GetGift(
            gifting_pb2.GetGiftRequest(sent_gift_id=sent.sent_gift_id),
            metadata=suite.token(sent.creator_id),
        )
        return gift.sent_gift.credit_status == gifting_pb2.CREDIT_STATUS_CREDITED

    await eventually(credited, f"gift {sent.sent_gift_id} credited")


def gift_request(
    sender: str, creator: str, gift_id: str = "rose", count: int = 1, live_id: str = ""
) -> gifting_pb2.SendGiftRequest:
    """A gift in the creator's LIVE (`live_of(creator)`, started by `new_creator`), or in `live_id`."""
    return gifting_pb2.SendGiftRequest(
        request_id=new_id("gift"),
        sender_id=sender,
        creator_id=creator,
        gift_id=gift_id,
        count=count,
        live_id=live_id or live_of(creator),
    )


async def test_catalog_lists_the_public_gifts_cheapest_first(suite: Suite) -> None:
    response = await suite.gifting.ListGifts(gifting_pb2.ListGiftsRequest(page_size=100))
    prices = {g.gift_id: g.coins for g in response.gifts}
    assert prices["rose"] == 1
    assert prices["lion"] == 29_999
    assert prices["universe"] == 44_999
    assert len(prices) == 14
    coins = [g.coins for g in response.gifts]
    assert coins == sorted(coins)
    assert {g.gift_id for g in response.gifts if g.streakable} >= {"rose", "panda"}


async def test_catalog_pages_with_a_cursor(suite: Suite) -> None:
    seen: list[str] = []
    token = ""
    while True:
        page = await suite.gifting.ListGifts(
            gifting_pb2.ListGiftsRequest(page_size=5, page_token=token)
        )
        seen += [g.gift_id for g in page.gifts]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == 14


async def test_a_gift_debits_the_sender_and_credits_the_creator(suite: Suite) -> None:
    sender, coins = await funded_user(suite)
    creator = await new_creator(suite)
    response = await suite.gifting.SendGift(gift_request(sender, creator, "concert", count=1))
    assert response.sent_gift.coins == 500
    assert response.sender_balance_coins == coins - 500
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))
    assert balance.balance.coins == coins - 500
    assert await wait_for_diamonds(suite, creator, 250) == 250  # 2 coins = 1 diamond
    # The relay marks the credit delivered once payout has answered: just after the diamonds show.
    await wait_until_credited(suite, response.sent_gift)


async def test_one_coin_gifts_accumulate_into_whole_diamonds(suite: Suite) -> None:
    sender, _ = await funded_user(suite)
    creator = await new_creator(suite)
    for _ in range(3):
        await suite.gifting.SendGift(gift_request(sender, creator, "rose"))
    # 3 coins are worth 1.5 diamonds: 1 is credited, the half is carried, not lost.
    assert await wait_for_diamonds(suite, creator, 1) == 1
    await suite.gifting.SendGift(gift_request(sender, creator, "rose"))
    assert await wait_for_diamonds(suite, creator, 2) == 2


async def test_a_retried_gift_is_sent_once(suite: Suite) -> None:
    sender, coins = await funded_user(suite)
    creator = await new_creator(suite)
    request = gift_request(sender, creator, "panda", count=2)
    first = await suite.gifting.SendGift(request)
    again = await suite.gifting.SendGift(request)
    assert again == first
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))
    assert balance.balance.coins == coins - 10
    await wait_until_credited(suite, first.sent_gift)  # delivered (and acknowledged) once
    assert await diamonds_of(suite, creator) == 5


async def test_self_gifting_is_refused(suite: Suite) -> None:
    sender, coins = await funded_user(suite)
    await expect_error(
        suite.gifting.SendGift(gift_request(sender, sender)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "SELF_GIFTING",
    )
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))
    assert balance.balance.coins == coins


async def test_unknown_gift_is_not_found(suite: Suite) -> None:
    sender, _ = await funded_user(suite)
    await expect_error(
        suite.gifting.SendGift(gift_request(sender, await new_creator(suite), "unicorn")),
        grpc.StatusCode.NOT_FOUND,
        "GIFT_NOT_FOUND",
    )


async def test_not_enough_coins_sends_nothing(suite: Suite) -> None:
    sender, coins = await funded_user(suite)  # 700 coins
    creator = await new_creator(suite)
    request = gift_request(sender, creator, "lion")
    error = await expect_error(
        suite.gifting.SendGift(request), grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS"
    )
    assert "29999" in (error.details() or "")
    info = error_info(error)  # the sender, not the wallet's ledger account id (`user:<id>`)
    assert info is not None and info.metadata["user_id"] == sender
    assert "account_id" not in info.metadata
    # The refusal is the request's answer: a retry gets it again and nothing moves.
    await expect_error(
        suite.gifting.SendGift(request), grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS"
    )
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))
    assert balance.balance.coins == coins
    assert await diamonds_of(suite, creator) == 0  # a refused gift never queues a credit


async def test_a_gift_to_a_user_without_an_account_is_refused_and_moves_nothing(
    suite: Suite,
) -> None:
    sender, coins = await funded_user(suite)
    nobody = new_id("creator")  # well-formed, but never opened a wallet account
    await start_live(suite, nobody, live_of(nobody))  # the wallet, not gifting, knows accounts
    request = gift_request(sender, nobody, "concert")
    error = await expect_error(
        suite.gifting.SendGift(request), grpc.StatusCode.NOT_FOUND, "RECIPIENT_NOT_FOUND"
    )
    assert nobody in (error.details() or "")
    await expect_error(  # the refusal is the request's answer
        suite.gifting.SendGift(request), grpc.StatusCode.NOT_FOUND, "RECIPIENT_NOT_FOUND"
    )
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))
    assert balance.balance.coins == coins
    assert await diamonds_of(suite, nobody) == 0
    await open_account(suite, nobody)  # once the creator has an account, a new gift goes through
    sent = await suite.gifting.SendGift(gift_request(sender, nobody, "concert"))
    assert sent.sender_balance_coins == coins - 500


async def test_a_gift_to_a_minor_is_refused_and_moves_nothing(suite: Suite) -> None:
    sender, coins = await funded_user(suite)
    minor = new_id("creator")
    await suite.wallet.OpenAccount(
        wallet_pb2.OpenAccountRequest(
            request_id=new_id("open"),
            user_id=minor,
            country_code="US",
            birth_date=date_pb2.Date(year=dt.date.today().year - 15, month=1, day=1),
        )
    )
    await start_live(suite, minor, live_of(minor))
    error = await expect_error(
        suite.gifting.SendGift(gift_request(sender, minor, "concert")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "RECIPIENT_NOT_ELIGIBLE",
    )
    info = error_info(error)
    assert info is not None and dict(info.metadata) == {"user_id": minor}
    said = (error.details() or "").replace(minor, "<creator>")  # a random id may hold "18"
    assert "18" not in said and "US" not in said, said
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))
    assert balance.balance.coins == coins
    assert await diamonds_of(suite, minor) == 0


async def test_sender_without_account_is_not_found(suite: Suite) -> None:
    ghost = new_id("ghost")
    error = await expect_error(
        suite.gifting.SendGift(gift_request(ghost, await new_creator(suite))),
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )
    # In the caller's terms (the user, what to do), not the ledger's account id "user:<id>".
    assert error.details() == f"user {ghost} has no wallet account; open one first"
    info = error_info(error)
    assert info is not None and info.metadata["user_id"] == ghost


async def test_top_gifters_of_a_live_rank_by_coins(suite: Suite) -> None:
    creator = await new_creator(suite, live=False)
    live = await start_live(suite, creator)
    elsewhere = await new_creator(suite)  # live in live_of(elsewhere)
    big, _ = await funded_user(suite)
    small, _ = await funded_user(suite)
    other = new_id("viewer")
    await open_account(suite, other)
    await suite.gifting.SendGift(gift_request(big, creator, "concert", live_id=live))
    await suite.gifting.SendGift(gift_request(small, creator, "panda", count=3, live_id=live))
    await suite.gifting.SendGift(gift_request(small, creator, "rose", live_id=live))
    await suite.gifting.SendGift(gift_request(big, elsewhere, "rose", live_id=live_of(elsewhere)))
    top = await suite.gifting.ListTopGifters(gifting_pb2.ListTopGiftersRequest(live_id=live))
    assert [(g.user_id, g.coins, g.rank) for g in top.gifters] == [(big, 500, 1), (small, 16, 2)]
    first = await suite.gifting.ListTopGifters(
        gifting_pb2.ListTopGiftersRequest(live_id=live, page_size=1)
    )
    second = await suite.gifting.ListTopGifters(
        gifting_pb2.ListTopGiftersRequest(
            live_id=live, page_size=1, page_token=first.next_page_token
        )
    )
    assert [(g.user_id, g.rank) for g in second.gifters] == [(small, 2)]
    assert second.next_page_token == ""


async def test_video_gifts_are_not_ranked_in_a_live(suite: Suite) -> None:
    sender, _ = await funded_user(suite)
    request = gift_request(sender, await new_creator(suite))
    request.video_id = "video-1"  # the oneof now targets a video
    response = await suite.gifting.SendGift(request)
    assert response.sent_gift.video_id == "video-1"
    assert not response.sent_gift.HasField("live_id")


async def test_the_leaderboard_of_a_live_that_does_not_exist_is_not_found(suite: Suite) -> None:
    """An empty leaderboard is a LIVE nobody gifted in yet; no LIVE at all is NOT_FOUND, as GetLive
    says (a typo in the id should not look like a quiet room)."""
    creator = await new_creator(suite)
    quiet = await suite.gifting.ListTopGifters(
        gifting_pb2.ListTopGiftersRequest(live_id=live_of(creator))
    )
    assert list(quiet.gifters) == []
    await expect_error(
        suite.gifting.ListTopGifters(gifting_pb2.ListTopGiftersRequest(live_id=new_id("nope"))),
        grpc.StatusCode.NOT_FOUND,
        "LIVE_NOT_FOUND",
    )
