"""A gift whose credit payout reverses (ReverseGiftCredits: the coins were found fraudulent) leaves
everything in gifting that counted it: its LIVE's sums and top gifters, the rankings and the
creator's top gifters; GetGift reads REVERSED. Gifting follows payout's reversals in the order they
committed, each gift once."""

from __future__ import annotations

import logging

import grpc
import pytest

from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from runtime.errors import Unavailable
from runtime.server import _run_worker
from services.gifting.clients import PayoutCrediter
from services.gifting.reversals import FEED, ReversedGifts
from services.gifting.storage import followed_position
from tests.helpers import eventually, funded_user, live_of, new_creator, new_id
from tests.suite import Suite
from tests.test_rankings import send

G = gifting_pb2


async def status_of(suite: Suite, sent_gift_id: str) -> int:
    found = await suite.gifting.GetGift(
        G.GetGiftRequest(sent_gift_id=sent_gift_id), metadata=suite.token("ops", admin=True)
    )
    return found.sent_gift.credit_status


async def ranked_coins(suite: Suite, creator: str) -> int | None:
    """The creator's coins in the all-time ranking (None: not ranked), however far down."""
    token = ""
    while True:
        page = await suite.gifting.ListCreatorRankings(
            G.ListCreatorRankingsRequest(
                period=G.RANKING_PERIOD_ALL_TIME, page_size=100, page_token=token
            )
        )
        found = next((c.coins for c in page.creators if c.creator_id == creator), None)
        if found is not None or not page.next_page_token:
            return found
        token = page.next_page_token


async def test_a_reversed_gift_leaves_the_rankings_the_top_gifters_and_its_live(
    suite: Suite,
) -> None:
    creator = await new_creator(suite)
    fraud, honest = (await funded_user(suite, "us-web-1400"))[0], (await funded_user(suite))[0]
    big = await send(suite, fraud, creator, "concert")  # 500 coins
    small = await send(suite, fraud, creator, "rose", 3)  # 3
    kept = await send(suite, honest, creator, "rose", 2)  # 2

    async def credited() -> bool:
        return {await status_of(suite, g) for g in (big, small, kept)} == {G.CREDIT_STATUS_CREDITED}

    await eventually(credited, "the three gifts credited")
    assert await ranked_coins(suite, creator) == 505
    before = await suite.gifting.GetLive(G.GetLiveRequest(live_id=live_of(creator)))
    assert (before.summary.coins_received, before.summary.gifts_sent) == (505, 6)
    assert before.summary.diamonds_earned == 250 + 1 + 1  # floor(500/2), then 501, 503... 505

    admin = suite.token(new_id("risk"), admin=True)
    reverse = payout_pb2.ReverseGiftCreditsRequest(
        request_id=new_id("rev"), gift_ids=[big], reason="chargeback fraud"
    )
    reversed_ = await suite.payout.ReverseGiftCredits(reverse, metadata=admin)
    assert [r.diamonds for r in reversed_.reversals] == [250]

    async def reversed_in_gifting() -> bool:
        return await status_of(suite, big) == G.CREDIT_STATUS_REVERSED

    await eventually(reversed_in_gifting, "the reversal followed by gifting")
    assert await status_of(suite, small) == G.CREDIT_STATUS_CREDITED
    assert await ranked_coins(suite, creator) == 5
    live = await suite.gifting.GetLive(G.GetLiveRequest(live_id=live_of(creator)))
    assert (live.summary.coins_received, live.summary.gifts_sent) == (5, 5)
    assert live.summary.diamonds_earned == 2
    assert [(g.user_id, g.coins) for g in live.summary.top_gifters] == [(fraud, 3), (honest, 2)]
    top = await suite.gifting.ListCreatorTopGifters(
        G.ListCreatorTopGiftersRequest(creator_id=creator)
    )
    assert [(g.user_id, g.coins) for g in top.gifters] == [(fraud, 3), (honest, 2)]

    # Reversing the small one too takes the fraudulent viewer off the boards altogether.
    await suite.payout.ReverseGiftCredits(
        payout_pb2.ReverseGiftCreditsRequest(
            request_id=new_id("rev"), gift_ids=[small, big], reason="the rest of it"
        ),
        metadata=admin,
    )

    async def both_reversed() -> bool:
        return await status_of(suite, small) == G.CREDIT_STATUS_REVERSED

    await eventually(both_reversed, "the second reversal followed")
    live = await suite.gifting.GetLive(G.GetLiveRequest(live_id=live_of(creator)))
    assert (live.summary.coins_received, live.summary.unique_gifters) == (2, 1)
    assert [(g.user_id, g.coins) for g in live.summary.top_gifters] == [(honest, 2)]
    assert await ranked_coins(suite, creator) == 2  # the big one was not taken off twice


async def test_a_lives_ended_event_reads_as_endlive_answered_whatever_happens_later(
    suite: Suite,
) -> None:
    """The feed's `ended` event keeps the summary EndLive answered: read again after the LIVE's
    credits landed and after one of its gifts was reversed, it is the same event, while GetLive's
    summary moves on (R4: the event was rebuilt from the LIVE at every read)."""
    creator = await new_creator(suite)
    viewer = (await funded_user(suite))[0]
    big = await send(suite, viewer, creator, "concert")  # 500 coins
    small = await send(suite, viewer, creator, "rose", 2)
    live_id = live_of(creator)
    ended = await suite.gifting.EndLive(
        G.EndLiveRequest(request_id=new_id("end"), live_id=live_id), metadata=suite.token(creator)
    )
    assert ended.summary.coins_received == 502

    async def ended_event() -> G.WatchLiveResponse:
        after = ended.summary.last_cursor - 1
        request = G.WatchLiveRequest(live_id=live_id, after_cursor=after)
        call = suite.gifting.WatchLive(request, metadata=suite.token(viewer))
        events = [event async for event in call]
        assert [e.WhichOneof("event") for e in events] == ["ended"], events
        return events[0]

    first = await ended_event()
    assert first.ended.summary == ended.summary

    async def credited() -> bool:
        return {await status_of(suite, g) for g in (big, small)} == {G.CREDIT_STATUS_CREDITED}

    await eventually(credited, "the LIVE's gifts credited")
    await suite.payout.ReverseGiftCredits(
        payout_pb2.ReverseGiftCreditsRequest(
            request_id=new_id("rev"), gift_ids=[big], reason="chargeback fraud"
        ),
        metadata=suite.token(new_id("risk"), admin=True),
    )

    async def reversed_in_gifting() -> bool:
        return await status_of(suite, big) == G.CREDIT_STATUS_REVERSED

    await eventually(reversed_in_gifting, "the reversal followed by gifting")
    now = await suite.gifting.GetLive(G.GetLiveRequest(live_id=live_id))
    assert (now.summary.coins_received, now.summary.diamonds_earned) == (2, 1)
    assert await ended_event() == first


async def test_payout_lists_reversals_in_commit_order_and_gifting_passes_a_foreign_one(
    suite: Suite,
) -> None:
    """Payout numbers reversals as they commit; a credit gifting never sent (a direct
    CreditDiamonds) is read and passed over."""
    admin = suite.token(new_id("risk"), admin=True)
    foreign = new_id("elsewhere")
    await suite.as_caller("gifting").payout.CreditDiamonds(
        payout_pb2.CreditDiamondsRequest(
            request_id=new_id("credit"), creator_id=new_id("creator"), coins=10, reference=foreign
        )
    )
    await suite.payout.ReverseGiftCredits(
        payout_pb2.ReverseGiftCreditsRequest(
            request_id=new_id("rev"), gift_ids=[foreign], reason="not a gift of gifting's"
        ),
        metadata=admin,
    )
    listed = await suite.as_caller("gifting").payout.ListReversedCredits(
        payout_pb2.ListReversedCreditsRequest(page_size=1000)
    )
    numbers = [c.sequence for c in listed.credits]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert foreign in {c.gift_id for c in listed.credits}
    later = await suite.as_caller("gifting").payout.ListReversedCredits(
        payout_pb2.ListReversedCreditsRequest(after_sequence=numbers[-1])
    )
    assert list(later.credits) == []
    gifting_db = suite.services["gifting"].runtime.db

    async def passed_over() -> bool:  # gifting's position moves past it; nothing of gifting's moved
        async with gifting_db.driver.read() as tx:
            return await followed_position(tx, FEED) >= numbers[-1]

    await eventually(passed_over, "gifting following past the foreign reversal")


async def test_payout_out_of_reach_is_one_warning_and_the_next_period_tries_again(
    suite: Suite, caplog: pytest.LogCaptureFixture
) -> None:
    """As at `make up` before payout listens: no stack trace, nothing moved; the pass fails (a
    failed run in the job's metrics, an ERROR on its trace: it read as an idle pass, review r24)
    and its worker says so in one line and tries again."""
    runtime = suite.services["gifting"].runtime
    async with runtime.db.driver.read() as tx:
        before = await followed_position(tx, FEED)
    async with grpc.aio.insecure_channel("127.0.0.1:1") as nowhere:
        follower = ReversedGifts(
            runtime.db, runtime.clock, PayoutCrediter(nowhere), page=10, time_limit=1.0
        )
        with pytest.raises(Unavailable) as raised:
            await follower.follow()
    assert raised.value.reason == "DEPENDENCY_UNAVAILABLE"
    async with runtime.db.driver.read() as tx:
        assert await followed_position(tx, FEED) == before
    attempts = 0

    async def follows() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise raised.value

    with caplog.at_level(logging.WARNING, logger="coins.server"):
        await _run_worker("reversed gifts", follows)
    assert attempts == 2  # tried again
    (line,) = [r for r in caplog.records if "reversed gifts" in r.getMessage()]
    assert line.levelno == logging.WARNING and line.exc_info is None
    assert "(DEPENDENCY_UNAVAILABLE); attempt 1" in line.getMessage()
