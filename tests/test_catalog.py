"""A versioned catalog: every change of a gift is its next version, kept with who made it and why;
a sent gift keeps the version and price it was sent at; gifts carry the regions where they are
offered and an animation length, and ListGifts filters by the viewer's region."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from coins.gifting.v1 import gifting_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.errors import Unavailable
from services.gifting.clients import WalletDebiter, debit_request
from tests.helpers import (
    expect_error,
    field_violations,
    funded_user,
    live_gift,
    live_of,
    new_creator,
    new_id,
)
from tests.suite import Suite

G = gifting_pb2
W = wallet_pb2


def set_gift(gift_id: str, coins: int, *, reason: str, **fields: object) -> G.SetGiftRequest:
    return G.SetGiftRequest(
        request_id=new_id("set"),
        gift_id=gift_id,
        name=gift_id.title(),
        coins=coins,
        active=fields.pop("active", True),  # type: ignore[arg-type]
        reason=reason,
        **fields,  # type: ignore[arg-type]
    )


async def test_a_repriced_gift_is_a_new_version_and_sent_gifts_keep_theirs(
    private_suite: Suite,
) -> None:
    suite = private_suite  # the catalog every other test sees stays as seeded
    admin = suite.token("catalog-admin", admin=True)
    gift_id = new_id("lantern").lower()
    first = await suite.gifting.SetGift(
        set_gift(gift_id, 40, reason="new gift", animation_ms=2500), metadata=admin
    )
    assert (first.gift.version, first.gift.animation_ms, list(first.gift.regions)) == (1, 2500, [])
    sender, _ = await funded_user(suite)
    creator = await new_creator(suite)

    async def send() -> G.SentGift:
        answer = await suite.gifting.SendGift(
            G.SendGiftRequest(
                request_id=new_id("g"),
                sender_id=sender,
                creator_id=creator,
                gift_id=gift_id,
                count=2,
                live_id=live_of(creator),
            )
        )
        return answer.sent_gift

    before = await send()
    assert (before.coins, before.gift_version) == (80, 1)
    repriced = await suite.gifting.SetGift(set_gift(gift_id, 55, reason="reprice"), metadata=admin)
    assert (repriced.gift.version, repriced.gift.coins) == (2, 55)
    assert repriced.gift.animation_ms == 2500  # unsaid: unchanged
    # The same values again make no new version.
    again = await suite.gifting.SetGift(set_gift(gift_id, 55, reason="again"), metadata=admin)
    assert again.gift.version == 2
    after = await send()
    assert (after.coins, after.gift_version) == (110, 2)
    # The gift sent before keeps its version and price.
    kept = await suite.gifting.GetGift(
        G.GetGiftRequest(sent_gift_id=before.sent_gift_id), metadata=suite.token(sender)
    )
    assert (kept.sent_gift.coins, kept.sent_gift.gift_version) == (80, 1)
    retired = await suite.gifting.SetGift(
        set_gift(gift_id, 55, reason="retired", active=False), metadata=admin
    )
    assert retired.gift.version == 3 and not retired.active
    history = await suite.gifting.ListGiftVersions(G.ListGiftVersionsRequest(gift_id=gift_id))
    assert [(v.gift.version, v.gift.coins, v.active, v.reason) for v in history.versions] == [
        (3, 55, False, "retired"),
        (2, 55, True, "reprice"),
        (1, 40, True, "new gift"),
    ]
    assert all(v.changed_by == "catalog-admin" for v in history.versions)
    newest = await suite.gifting.ListGiftVersions(
        G.ListGiftVersionsRequest(gift_id=gift_id, page_size=2)
    )
    assert [v.gift.version for v in newest.versions] == [3, 2] and newest.next_page_token
    rest = await suite.gifting.ListGiftVersions(
        G.ListGiftVersionsRequest(gift_id=gift_id, page_size=2, page_token=newest.next_page_token)
    )
    assert [v.gift.version for v in rest.versions] == [1] and not rest.next_page_token
    await expect_error(  # a token continues the listing of its own gift only
        suite.gifting.ListGiftVersions(
            G.ListGiftVersionsRequest(gift_id="rose", page_token=newest.next_page_token)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
    await expect_error(
        suite.gifting.ListGiftVersions(G.ListGiftVersionsRequest(gift_id="no-such-gift")),
        grpc.StatusCode.NOT_FOUND,
        "GIFT_NOT_FOUND",
    )


async def test_the_catalog_lists_the_gifts_offered_in_the_viewers_region(
    private_suite: Suite,
) -> None:
    suite = private_suite
    admin = suite.token("catalog-admin", admin=True)
    british = new_id("teapot").lower()
    await suite.gifting.SetGift(
        set_gift(british, 7, reason="UK only", regions=["GB"]), metadata=admin
    )

    async def listed(region: str) -> set[str]:
        found: set[str] = set()
        token = ""
        while True:
            page = await suite.gifting.ListGifts(
                G.ListGiftsRequest(page_size=100, page_token=token, region=region)
            )
            found |= {g.gift_id for g in page.gifts}
            token = page.next_page_token
            if not token:
                return found

    assert british in await listed("GB") and "rose" in await listed("GB")
    assert british not in await listed("US") and "rose" in await listed("US")
    assert british in await listed("")  # no region: the whole catalog
    # The seeded catalog is version 1 of each gift, offered everywhere, animated by price.
    history = await suite.gifting.ListGiftVersions(G.ListGiftVersionsRequest(gift_id="universe"))
    first = history.versions[-1].gift
    assert (first.version, first.coins, first.animation_ms) == (1, 44_999, 6000)


async def test_a_gift_not_offered_in_the_senders_country_is_refused_and_nothing_moves(
    private_suite: Suite,
) -> None:
    """The wallet knows the sender's country, so it refuses the debit of a gift not offered there;
    the gift fails, and no coin moves."""
    suite = private_suite
    admin = suite.token("catalog-admin", admin=True)
    british, anglo = new_id("teapot").lower(), new_id("kettle").lower()
    await suite.gifting.SetGift(
        set_gift(british, 7, reason="UK only", regions=["GB"]), metadata=admin
    )
    await suite.gifting.SetGift(
        set_gift(anglo, 9, reason="UK and US", regions=["GB", "US"]), metadata=admin
    )
    sender, coins = await funded_user(suite)  # a US account
    creator = await new_creator(suite)

    def send(gift_id: str, request_id: str) -> G.SendGiftRequest:
        return live_gift(sender, creator, gift_id, request_id=request_id)

    refused_id = new_id("g")
    error = await expect_error(
        suite.gifting.SendGift(send(british, refused_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_OFFERED_IN_REGION",
    )
    assert "US" in (error.details() or "")
    balance = await suite.wallet.GetBalance(W.GetBalanceRequest(user_id=sender))
    assert balance.balance.coins == coins  # nothing moved
    # The refusal is the request's answer: a retry gets it again and still moves nothing.
    await expect_error(
        suite.gifting.SendGift(send(british, refused_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_OFFERED_IN_REGION",
    )
    sent = await suite.gifting.SendGift(send(anglo, new_id("g")))
    assert sent.sent_gift.coins == 9
    after = await suite.wallet.GetBalance(W.GetBalanceRequest(user_id=sender))
    assert after.balance.coins == coins - 9


async def test_regions_are_checked_for_a_known_sender_and_for_a_resumed_gift(
    private_suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two paths the first test does not take: a sender the wallet already knows eligible (its
    country cached, the debit answered without a read) and a gift resumed by the request's retry
    after the wallet could not be reached (its regions read back from the version it priced)."""
    suite = private_suite
    admin = suite.token("catalog-admin", admin=True)
    british = new_id("crumpet").lower()
    await suite.gifting.SetGift(
        set_gift(british, 6, reason="UK only", regions=["GB"]), metadata=admin
    )
    sender, coins = await funded_user(suite)  # a US account
    creator = await new_creator(suite)

    def send(gift_id: str, request_id: str) -> G.SendGiftRequest:
        return live_gift(sender, creator, gift_id, request_id=request_id)

    await suite.gifting.SendGift(send("rose", new_id("g")))  # the wallet now knows the sender
    await expect_error(
        suite.gifting.SendGift(send(british, new_id("g"))),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_OFFERED_IN_REGION",
    )

    # The wallet unreachable once: the gift stays pending, and the request's retry resumes it.
    original = WalletDebiter.debit_for_gift
    failures = {"left": 1}

    async def unreachable_once(self: WalletDebiter, **kwargs: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise Unavailable("WALLET_UNAVAILABLE", "the wallet did not answer")
        return await original(self, **kwargs)

    monkeypatch.setattr(WalletDebiter, "debit_for_gift", unreachable_once)
    resumed_id = new_id("g")
    await expect_error(
        suite.gifting.SendGift(send(british, resumed_id)),
        grpc.StatusCode.UNAVAILABLE,
        "WALLET_UNAVAILABLE",
    )
    assert failures["left"] == 0
    await expect_error(
        suite.gifting.SendGift(send(british, resumed_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_OFFERED_IN_REGION",
    )
    balance = await suite.wallet.GetBalance(W.GetBalanceRequest(user_id=sender))
    assert balance.balance.coins == coins - 1  # the rose only


async def test_a_debit_retried_with_or_without_regions_is_one_debit(suite: Suite) -> None:
    """Two gifting versions may send one gift's debit with and without its regions (a rolling
    deploy): the retry replays the first answer, never REQUEST_ID_REUSED (which gifting would take
    as voided, failing a gift whose coins were taken)."""
    sender, coins = await funded_user(suite)
    creator = await new_creator(suite)
    wallet = suite.as_caller("gifting").wallet
    gift = new_id("gift")
    first = await wallet.DebitCoins(
        debit_request(gift, sender, creator, 5), metadata=suite.token(sender)
    )
    again = await wallet.DebitCoins(
        debit_request(gift, sender, creator, 5, ["US", "GB"]), metadata=suite.token(sender)
    )
    assert again.transaction_id == first.transaction_id
    assert again.balance.coins == first.balance.coins == coins - 5


async def test_an_audit_reason_of_spaces_only_is_refused_and_changes_nothing(
    private_suite: Suite,
) -> None:
    suite = private_suite
    admin = suite.token("catalog-admin", admin=True)
    gift_id = new_id("blank").lower()
    error = await expect_error(
        suite.gifting.SetGift(set_gift(gift_id, 40, reason="   \t "), metadata=admin),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
    )
    assert field_violations(error) == {"reason"}
    assert "say why" in (error.details() or "")
    listed = await suite.gifting.ListGifts(G.ListGiftsRequest(page_size=500))
    assert gift_id not in {g.gift_id for g in listed.gifts}
