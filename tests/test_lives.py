"""LIVE rooms: a creator starts and ends a LIVE, gifts go only to an open LIVE of its creator with
gifts on, its summary is exact, and its feed gives every watcher every gift once and in order, across
replicas, after reconnects, and whatever a slow watcher does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from coins.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from coins.wallet.v1 import wallet_pb2
from runtime.server import RunningService, start_service
from runtime.telemetry import make_tracer_provider
from services.gifting.lives import LiveFeed
from services.gifting.service import SPEC as GIFTING
from tests.helpers import (
    eventually,
    expect_error,
    funded_user,
    live_of,
    new_creator,
    new_id,
    start_live,
)
from tests.suite import Suite

G = gifting_pb2


def gift(sender: str, creator: str, live_id: str, gift_id: str = "rose", count: int = 1) -> Any:
    return G.SendGiftRequest(
        request_id=new_id("gift"),
        sender_id=sender,
        creator_id=creator,
        gift_id=gift_id,
        count=count,
        live_id=live_id,
    )


async def coins_of(suite: Suite, user: str) -> int:
    answer = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    return answer.balance.coins


async def test_a_live_starts_takes_gifts_and_ends_with_an_exact_summary(suite: Suite) -> None:
    creator = await new_creator(suite)
    started = await suite.gifting.StartLive(
        G.StartLiveRequest(request_id=new_id("s"), creator_id=creator, title="Friday night")
    )
    live = started.live
    assert (live.creator_id, live.title, live.gifts_enabled) == (creator, "Friday night", True)
    assert not live.HasField("end_time")
    big, _ = await funded_user(suite)
    small, _ = await funded_user(suite)
    await suite.gifting.SendGift(gift(big, creator, live.live_id, "concert"))  # 500 coins
    await suite.gifting.SendGift(gift(small, creator, live.live_id, "panda", count=3))  # 15
    await suite.gifting.SendGift(gift(small, creator, live.live_id))  # 1
    got = await suite.gifting.GetLive(G.GetLiveRequest(live_id=live.live_id))
    summary = got.summary
    assert (summary.coins_received, summary.gifts_sent, summary.unique_gifters) == (516, 5, 2)
    assert [(g.user_id, g.coins, g.rank) for g in summary.top_gifters] == [
        (big, 500, 1),
        (small, 16, 2),
    ]
    assert summary.last_cursor >= 3  # three gifts, and the end of a streak that has paused
    ended = await suite.gifting.EndLive(
        G.EndLiveRequest(request_id=new_id("e"), live_id=live.live_id),
        metadata=suite.token(creator),
    )
    assert ended.live.HasField("end_time") and not ended.live.gifts_enabled
    # Three gifts, the ends of small's two streaks (panda, rose: their pause, or the LIVE's end) and
    # the LIVE's end.
    assert ended.summary.coins_received == 516 and ended.summary.last_cursor == 6
    await expect_error(
        suite.gifting.EndLive(
            G.EndLiveRequest(request_id=new_id("e"), live_id=live.live_id),
            metadata=suite.token(creator),
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "LIVE_ENDED",
    )


async def test_gifts_go_only_to_the_creators_open_live_with_gifts_on(suite: Suite) -> None:
    creator = await new_creator(suite)
    other = await new_creator(suite)
    sender, coins = await funded_user(suite)
    live = live_of(creator)

    async def refused(request: Any, code: grpc.StatusCode, reason: str) -> None:
        await expect_error(suite.gifting.SendGift(request), code, reason)
        assert await coins_of(suite, sender) == coins  # nothing moved

    await refused(
        gift(sender, creator, "no-such-live"), grpc.StatusCode.NOT_FOUND, "LIVE_NOT_FOUND"
    )
    await refused(
        gift(sender, other, live), grpc.StatusCode.FAILED_PRECONDITION, "LIVE_NOT_CREATORS"
    )
    off = await suite.gifting.SetLiveGifts(
        G.SetLiveGiftsRequest(request_id=new_id("g"), live_id=live, gifts_enabled=False),
        metadata=suite.token(creator),
    )
    assert not off.live.gifts_enabled
    await refused(
        gift(sender, creator, live), grpc.StatusCode.FAILED_PRECONDITION, "LIVE_GIFTS_OFF"
    )
    await suite.gifting.SetLiveGifts(
        G.SetLiveGiftsRequest(request_id=new_id("g"), live_id=live, gifts_enabled=True),
        metadata=suite.token(creator),
    )
    sent = await suite.gifting.SendGift(gift(sender, creator, live))
    coins -= sent.sent_gift.coins
    # Only the creator (or an admin) ends or switches their LIVE.
    await expect_error(
        suite.gifting.EndLive(
            G.EndLiveRequest(request_id=new_id("e"), live_id=live), metadata=suite.token(sender)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_ACCOUNT_OWNER",
    )
    await suite.gifting.EndLive(
        G.EndLiveRequest(request_id=new_id("e"), live_id=live), metadata=suite.token(creator)
    )
    await refused(gift(sender, creator, live), grpc.StatusCode.FAILED_PRECONDITION, "LIVE_ENDED")
    # A gift with no LIVE (on a video) is not a LIVE's business.
    await suite.gifting.SendGift(
        G.SendGiftRequest(
            request_id=new_id("gift"),
            sender_id=sender,
            creator_id=creator,
            gift_id="rose",
            count=1,
            video_id="video-1",
        )
    )


async def collect(
    stub: Any, token: Any, live_id: str, after: int = 0, *, limit: int | None = None
) -> list[G.WatchLiveResponse]:
    """Watch a LIVE until it ends (or `limit` events), from after cursor `after`."""
    seen: list[G.WatchLiveResponse] = []
    call = stub.WatchLive(G.WatchLiveRequest(live_id=live_id, after_cursor=after), metadata=token)
    async for event in call:
        seen.append(event)
        if limit is not None and len(seen) == limit:
            call.cancel()
            break
    return seen


def gift_ids(events: list[G.WatchLiveResponse]) -> list[str]:
    return [e.gift.sent_gift_id for e in events if e.HasField("gift")]


@pytest.fixture
async def replica(suite: Suite) -> AsyncIterator[RunningService[Any]]:
    """A second gifting process on the same database (PostgreSQL; on SQLite, the same one)."""
    if suite.backend != "postgres":
        yield suite.services["gifting"]
        return
    settings = suite.services["gifting"].runtime.settings.model_copy(
        update={"port": 0, "health_port": 0}
    )
    running = await start_service(
        GIFTING, settings, tracer_provider=make_tracer_provider("gifting-2", exporter=suite.spans)
    )
    yield running
    await running.stop(grace=0.5)


async def test_every_watcher_sees_every_gift_once_in_order_across_replicas(
    suite: Suite, replica: RunningService[Any]
) -> None:
    creator = await new_creator(suite)
    live = await start_live(suite, creator)
    senders = [(await funded_user(suite))[0] for _ in range(3)]
    first = suite.stub("gifting")
    second = (
        first
        if replica is suite.services["gifting"]
        else gifting_pb2_grpc.GiftingServiceStub(_channel_to(suite, replica))
    )
    viewer = suite.token(new_id("viewer"))
    watchers = [
        asyncio.create_task(collect(stub, viewer, live)) for stub in (first, second, first, second)
    ]
    # One watcher reads 3 events and goes away; it comes back with its cursor later.
    leaver = asyncio.create_task(collect(first, viewer, live, limit=3))
    await eventually(lambda: _watching(suite, replica, 5), "the watchers subscribed")
    sent: list[str] = []
    for i in range(30):  # through both replicas
        stub = suite.gifting if i % 2 == 0 else second
        sender = senders[i % 3]
        answer = await stub.SendGift(gift(sender, creator, live), metadata=suite.token(sender))
        sent.append(answer.sent_gift.sent_gift_id)
    await suite.gifting.EndLive(
        G.EndLiveRequest(request_id=new_id("e"), live_id=live), metadata=suite.token(creator)
    )
    streams = await asyncio.wait_for(asyncio.gather(*watchers), timeout=20)
    for events in streams:
        assert gift_ids(events) == sent  # every gift, once, in the order recorded
        assert [e.cursor for e in events] == list(range(1, len(events) + 1))
        assert events[-1].HasField("ended") and events[-1].ended.summary.gifts_sent == 30
    seen = await leaver
    assert [e.cursor for e in seen] == [1, 2, 3]
    rest = await collect(second, viewer, live, after=seen[-1].cursor)
    assert gift_ids(seen) + gift_ids(rest) == sent  # no gap, no duplicate
    assert rest[-1].HasField("ended")


def _channel_to(suite: Suite, replica: RunningService[Any]) -> grpc.aio.Channel:
    certs = suite.security.certs_dir
    credentials = grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(),
        (certs / "gateway-key.pem").read_bytes(),
        (certs / "gateway.pem").read_bytes(),
    )
    channel = grpc.aio.secure_channel(replica.address, credentials)
    suite.channels.append(channel)
    return channel


async def _watching(suite: Suite, replica: RunningService[Any], count: int) -> bool:
    feeds = {
        id(s.runtime.parts["feed"]): s.runtime.parts["feed"]
        for s in (suite.services["gifting"], replica)
    }
    return sum(f.watchers for f in feeds.values() if isinstance(f, LiveFeed)) >= count


async def test_a_slow_watcher_holds_up_neither_senders_nor_other_watchers(suite: Suite) -> None:
    creator = await new_creator(suite)
    live = await start_live(suite, creator)
    senders = [(await funded_user(suite))[0] for _ in range(10)]  # within each one's rate limit
    stub = suite.stub("gifting")
    viewer = suite.token(new_id("viewer"))
    # The slow watcher takes one event and then stops reading (its stream stays open).
    slow = stub.WatchLive(G.WatchLiveRequest(live_id=live), metadata=viewer)
    fast = asyncio.create_task(collect(stub, viewer, live))
    sent = [
        (await suite.gifting.SendGift(gift(senders[i % 10], creator, live))).sent_gift.sent_gift_id
        for i in range(250)
    ]
    first = await slow.read()
    assert first.gift.sent_gift_id == sent[0]
    await suite.gifting.EndLive(
        G.EndLiveRequest(request_id=new_id("e"), live_id=live), metadata=suite.token(creator)
    )
    assert gift_ids(await asyncio.wait_for(fast, timeout=10)) == sent
    slow.cancel()


async def test_watching_a_live_that_does_not_exist_is_not_found(suite: Suite) -> None:
    stub = suite.stub("gifting")
    call = stub.WatchLive(
        G.WatchLiveRequest(live_id="no-such-live"), metadata=suite.token(new_id("viewer"))
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # And a watcher needs a signed-in user, like every user-facing RPC.
    anonymous = stub.WatchLive(G.WatchLiveRequest(live_id="no-such-live"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await anonymous.read()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
