"""LIVE rooms: a creator starts and ends a LIVE, gifts go only to an open LIVE of its creator with
gifts on, its summary is exact, and its feed gives every watcher every gift once and in order, across
replicas, after reconnects, and whatever a slow watcher does."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from coins.common.v1 import admin_audit_pb2, admin_audit_pb2_grpc
from coins.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from coins.wallet.v1 import wallet_pb2
from runtime.db import Database
from runtime.errors import Aborted, Unavailable
from runtime.migrations import upgrade
from runtime.server import KEEPALIVE_PING_FLOOR_MS, RunningService, start_service
from runtime.status import error_info
from runtime.telemetry import make_tracer_provider
from services.gifting import sending
from services.gifting import storage as gifting_storage
from services.gifting.clients import WalletDebiter
from services.gifting.feed import FeedLimits, LiveFeed
from services.gifting.service import SPEC as GIFTING
from services.gifting.storage import live_events, lives
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
    creator = await new_creator(suite, live=False)
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


async def test_a_live_summary_is_read_at_one_moment_while_gifts_arrive(suite: Suite) -> None:
    """GetLive reads the LIVE's sums and its gifters in one snapshot of gifting's database, which
    never sees a gift committed after its first read (review r19: three statements each saw their
    own moment, coins_received 200 beside top gifters summing to 300)."""
    creator = await new_creator(suite)
    live_id = live_of(creator)
    sender, _ = await funded_user(suite)
    await suite.gifting.SendGift(gift(sender, creator, live_id))  # 1 coin
    async with suite.services["gifting"].runtime.db.snapshot() as conn:
        live = await gifting_storage.get_live(conn, live_id)
        assert live is not None and live.coins_received == 1
        await suite.gifting.SendGift(gift(sender, creator, live_id, "panda"))  # 5, committed
        gifters = await gifting_storage.top_gifters(conn, live_id, limit=10, after=None)
        assert gifters == [(sender, 1)]  # the moment of the snapshot's first read
    summary = (await suite.gifting.GetLive(G.GetLiveRequest(live_id=live_id))).summary
    assert summary.coins_received == sum(g.coins for g in summary.top_gifters) == 6
    # And through the RPC while five gifters send at once (fewer than ten: all of them are in the
    # top gifters, so their coins add up to the LIVE's).
    senders = [sender] + [(await funded_user(suite))[0] for _ in range(4)]
    sending_done = asyncio.Event()

    async def send_all(user: str) -> None:
        for _ in range(15):
            await suite.gifting.SendGift(gift(user, creator, live_id))

    async def read_until_done() -> int:
        reads = 0
        while not sending_done.is_set() or reads < 5:
            s = (await suite.gifting.GetLive(G.GetLiveRequest(live_id=live_id))).summary
            assert s.coins_received == sum(g.coins for g in s.top_gifters), s
            assert s.unique_gifters == len(s.top_gifters), s
            reads += 1
        return reads

    reader = asyncio.create_task(read_until_done())
    await asyncio.gather(*(send_all(user) for user in senders))
    sending_done.set()
    assert await reader >= 5


async def test_a_creator_runs_one_live_at_a_time(suite: Suite) -> None:
    """A second StartLive while one runs is refused with the running LIVE's id and writes nothing;
    the same request, retried once that LIVE has ended, starts the new one (the refusal held only
    until then, so it is not kept as the request's answer)."""
    creator = await new_creator(suite)  # LIVE in live_of(creator)
    second = G.StartLiveRequest(
        request_id=new_id("s"), creator_id=creator, title="again", live_id=new_id("l")
    )
    error = await expect_error(
        suite.gifting.StartLive(second), grpc.StatusCode.FAILED_PRECONDITION, "LIVE_ALREADY_RUNNING"
    )
    info = error_info(error)
    assert info is not None and info.metadata["live_id"] == live_of(creator)
    await expect_error(
        suite.gifting.GetLive(G.GetLiveRequest(live_id=second.live_id)),
        grpc.StatusCode.NOT_FOUND,
        "LIVE_NOT_FOUND",
    )
    await suite.gifting.EndLive(
        G.EndLiveRequest(request_id=new_id("e"), live_id=live_of(creator)),
        metadata=suite.token(creator),
    )
    started = await suite.gifting.StartLive(second)
    assert (started.live.live_id, started.live.creator_id) == (second.live_id, creator)
    assert await suite.gifting.StartLive(second) == started


async def test_racing_starts_of_one_creator_open_one_live(suite: Suite) -> None:
    creator = await new_creator(suite, live=False)
    starts = [
        G.StartLiveRequest(request_id=new_id("s"), creator_id=creator, title="race")
        for _ in range(8)
    ]
    answers = await asyncio.gather(
        *(suite.gifting.StartLive(r) for r in starts), return_exceptions=True
    )
    started = [a for a in answers if isinstance(a, G.StartLiveResponse)]
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(started) == 1 and len(refused) == 7, answers
    for error in refused:
        info = error_info(error)
        assert info is not None and info.reason == "LIVE_ALREADY_RUNNING", error.details()
        assert info.metadata["live_id"] == started[0].live.live_id


async def test_the_migration_ends_all_but_the_newest_running_live_of_a_creator(
    database: Database,
) -> None:
    """Before migration 0013 a creator could run several LIVEs: the newest keeps running, the
    others end with their feed's "ended" event, and the index then holds one running per creator."""
    await upgrade(database, GIFTING.migrations_dir, "0012")
    t0 = dt.datetime(2026, 12, 1, 20, 0, tzinfo=dt.UTC)
    rows = [  # (live, creator, started, ended)
        ("a-old", "ann", t0, None),
        ("a-new", "ann", t0 + dt.timedelta(minutes=5), None),
        ("a-done", "ann", t0 - dt.timedelta(hours=1), t0),
        ("b-only", "bob", t0, None),
    ]
    async with database.transaction() as conn:
        for live_id, creator, started, ended_at in rows:
            await conn.execute(
                lives.insert().values(
                    live_id=live_id,
                    creator_id=creator,
                    title="t",
                    gifts_enabled=True,
                    started_at=started,
                    ended_at=ended_at,
                    last_seq=3,
                    coins_received=0,
                    gifts_sent=0,
                )
            )
    await upgrade(database, GIFTING.migrations_dir)
    async with database.read() as conn:
        running = (
            (
                await conn.execute(
                    select(lives.c.live_id)
                    .where(lives.c.ended_at.is_(None))
                    .order_by(lives.c.live_id)
                )
            )
            .scalars()
            .all()
        )
        ended = (
            await conn.execute(select(live_events.c.live_id, live_events.c.seq, live_events.c.kind))
        ).all()
        seq = await conn.scalar(select(lives.c.last_seq).where(lives.c.live_id == "a-old"))
    assert running == ["a-new", "b-only"]
    assert [tuple(r) for r in ended] == [("a-old", 4, "ended")] and seq == 4
    with pytest.raises(IntegrityError):
        async with database.transaction() as conn:
            await conn.execute(
                lives.insert().values(
                    live_id="b-second",
                    creator_id="bob",
                    title="t",
                    gifts_enabled=True,
                    started_at=t0,
                    last_seq=0,
                    coins_received=0,
                    gifts_sent=0,
                )
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
    """A second gifting process on the same database (PostgreSQL; on SQLite, the same one). It
    polls its feeds once a minute: gifts recorded by the other process reach its watchers in time
    only by NOTIFY."""
    if suite.backend != "postgres":
        yield suite.services["gifting"]
        return
    settings = suite.services["gifting"].runtime.settings.model_copy(
        update={"port": 0, "health_port": 0, "feed_poll_seconds": 60.0}
    )
    running = await start_service(
        GIFTING, settings, tracer_provider=make_tracer_provider("gifting-2", exporter=suite.spans)
    )
    yield running
    await running.stop(grace=0.5)


async def test_every_watcher_sees_every_gift_once_in_order_across_replicas(
    suite: Suite, replica: RunningService[Any]
) -> None:
    creator = await new_creator(suite, live=False)
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
    for round_ in range(6):  # five at once, through both replicas
        answers = await asyncio.gather(
            *(
                (suite.gifting if (round_ + i) % 2 == 0 else second).SendGift(
                    gift(senders[i % 3], creator, live), metadata=suite.token(senders[i % 3])
                )
                for i in range(5)
            )
        )
        sent.extend(a.sent_gift.sent_gift_id for a in answers)
    # Every watcher has every gift before the LIVE ends (the replica's by NOTIFY: it polls once a
    # minute).
    recorded = (await suite.gifting.GetLive(G.GetLiveRequest(live_id=live))).summary.last_cursor
    await eventually(lambda: _fed(suite, replica, live, recorded), "every feed read", seconds=10)
    await suite.gifting.EndLive(
        G.EndLiveRequest(request_id=new_id("e"), live_id=live), metadata=suite.token(creator)
    )
    streams = await asyncio.wait_for(asyncio.gather(*watchers), timeout=20)
    order = gift_ids(streams[0])
    assert sorted(order) == sorted(sent)  # every gift, once
    for events in streams:
        assert gift_ids(events) == order  # in the one order recorded
        assert [e.cursor for e in events] == list(range(1, len(events) + 1))
        assert events[-1].HasField("ended") and events[-1].ended.summary.gifts_sent == 30
    seen = await leaver
    assert [e.cursor for e in seen] == [1, 2, 3]
    rest = await collect(second, viewer, live, after=seen[-1].cursor)
    assert gift_ids(seen) + gift_ids(rest) == order  # no gap, no duplicate
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


def _feeds(suite: Suite, replica: RunningService[Any]) -> list[LiveFeed]:
    feeds = {
        id(s.runtime.parts["feed"]): s.runtime.parts["feed"]
        for s in (suite.services["gifting"], replica)
    }
    return [f for f in feeds.values() if isinstance(f, LiveFeed)]


async def _fed(suite: Suite, replica: RunningService[Any], live_id: str, cursor: int) -> bool:
    """Each process's reader of the LIVE has read its events up to `cursor`."""
    return all(f.read_up_to(live_id) >= cursor for f in _feeds(suite, replica))


async def _watching(suite: Suite, replica: RunningService[Any], count: int) -> bool:
    return sum(f.watchers for f in _feeds(suite, replica)) >= count


async def test_a_slow_watcher_holds_up_neither_senders_nor_other_watchers(suite: Suite) -> None:
    creator = await new_creator(suite, live=False)
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


async def test_a_quiet_feed_outlives_client_keepalive_pings_every_5s_but_not_every_second(
    suite: Suite,
) -> None:
    """A watcher behind a load balancer pings its idle stream every 10-30 s (grpc-js and Envoy
    users often set 5-20 s); gRPC's default server policy (one ping in 5 minutes without data)
    cut such a feed after its third ping. Pings every 5 s are allowed; faster is refused."""
    if suite.backend == "postgres":
        pytest.skip("the ping policy is the gRPC server's, whatever its database")
    creator = await new_creator(suite, live=False)
    live = await start_live(suite, creator)
    viewer = suite.token(new_id("viewer"))

    def watch(ping_ms: int) -> Any:
        pings = [
            ("grpc.keepalive_time_ms", ping_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        stub = suite.stub("gifting", options=pings)
        return stub.WatchLive(G.WatchLiveRequest(live_id=live), metadata=viewer)

    polite, eager = watch(KEEPALIVE_PING_FLOOR_MS), watch(1_000)
    with pytest.raises(grpc.aio.AioRpcError) as cut:
        await asyncio.wait_for(eager.read(), timeout=15)
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "too many pings" in (cut.value.details() or "").lower()
    # Without the policy the polite watcher was cut at its fourth ping (20 s); wait past that.
    first = asyncio.ensure_future(polite.read())
    done, _ = await asyncio.wait([first], timeout=22)
    assert not done, f"the polite watcher's feed ended with nothing in the LIVE: {first.result()}"
    await suite.gifting.EndLive(
        G.EndLiveRequest(request_id=new_id("e"), live_id=live), metadata=suite.token(creator)
    )
    assert (await asyncio.wait_for(first, timeout=10)).HasField("ended")


async def test_a_cursor_at_the_end_ends_at_once_and_one_beyond_it_is_out_of_range(
    suite: Suite,
) -> None:
    creator = await new_creator(suite, live=False)
    live = await start_live(suite, creator)
    sender, _ = await funded_user(suite)
    viewer = suite.token(new_id("viewer"))
    stub = suite.stub("gifting")
    await suite.gifting.SendGift(gift(sender, creator, live, "rainbow-puke"))  # not streakable
    call = stub.WatchLive(G.WatchLiveRequest(live_id=live, after_cursor=2), metadata=viewer)
    with pytest.raises(grpc.aio.AioRpcError) as beyond:
        await call.read()
    assert beyond.value.code() == grpc.StatusCode.OUT_OF_RANGE
    ended = await suite.gifting.EndLive(
        G.EndLiveRequest(request_id=new_id("e"), live_id=live), metadata=suite.token(creator)
    )
    last = ended.summary.last_cursor
    everything = await collect(stub, viewer, live)
    assert [e.cursor for e in everything] == [1, last] and everything[-1].HasField("ended")
    # A watcher that saw the end and reconnects with its cursor gets an empty feed that ends.
    assert await asyncio.wait_for(collect(stub, viewer, live, after=last), timeout=5) == []


async def test_two_creators_racing_for_one_live_id_get_it_once(suite: Suite) -> None:
    first, second = new_id("creator"), new_id("creator")
    live_id = new_id("live")
    answers = await asyncio.gather(
        *(
            suite.gifting.StartLive(
                G.StartLiveRequest(
                    request_id=new_id("s"), creator_id=c, live_id=live_id, title="race"
                )
            )
            for c in (first, second, first, second)
        ),
        return_exceptions=True,
    )
    won = [a for a in answers if not isinstance(a, BaseException)]
    lost = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(won) == 1 and len(lost) == 3
    for error in lost:
        info = error_info(error)
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS, error.details()
        assert info is not None and info.reason == "LIVE_ID_TAKEN"
    owner = (await suite.gifting.GetLive(G.GetLiveRequest(live_id=live_id))).live.creator_id
    assert owner == won[0].live.creator_id


async def test_a_watcher_that_keeps_losing_ground_is_told_to_resume(suite: Suite) -> None:
    """A feed with small limits on the suite's gifting database: the watcher reads one event for
    every three gifts, falls out of the kept events, and is ended with its cursor; resuming from
    it gives the rest with no gap."""
    creator = await new_creator(suite, live=False)
    live = await start_live(suite, creator)
    senders = [(await funded_user(suite))[0] for _ in range(8)]
    runtime = suite.services["gifting"].runtime
    feed = LiveFeed(
        runtime.db,
        runtime.clock,
        FeedLimits(
            poll_seconds=0.05,
            page=5,
            keep=5,
            max_backlog=10,
            max_watchers=10,
            max_watchers_per_user=10,
        ),
    )
    sent = 0

    async def send(n: int) -> None:
        nonlocal sent
        for _ in range(n):
            sender = senders[sent % len(senders)]
            await suite.gifting.SendGift(gift(sender, creator, live, "panda"))
            sent += 1

    await send(1)
    watcher = feed.watch(live, 0, "slow-viewer")
    seen = [await anext(watcher)]
    with pytest.raises(Aborted) as told:
        for _ in range(60):
            await send(3)
            seen.append(await anext(watcher))
    await watcher.aclose()
    assert told.value.reason == "FEED_TOO_SLOW"
    resume = int(told.value.metadata["resume_after"])
    assert resume == seen[-1].seq
    assert [e.seq for e in seen] == list(range(1, resume + 1))
    assert feed.watchers == 0
    last = (await suite.gifting.GetLive(G.GetLiveRequest(live_id=live))).summary.last_cursor
    rest = feed.watch(live, resume, "slow-viewer")
    more = [await anext(rest) for _ in range(last - resume)]
    await rest.aclose()
    assert [e.seq for e in more] == list(range(resume + 1, last + 1))
    assert sum(1 for e in seen + more if e.kind == "gift") == sent


async def test_gifts_racing_the_end_of_a_live_are_refused_or_fed_before_its_end(
    suite: Suite,
) -> None:
    """EndLive turns the LIVE's gifts off, lets the gifts it took already be recorded, then ends
    it: every gift answered OK is in the feed before `ended`, EndLive's summary is final (GetLive
    reads the same later), and a refused gift moved no coin. Before, a gift accepted just before
    the end and recorded just after it was charged and counted, but never fed (9 of 144 in a
    review's run), and EndLive's summary went stale."""
    creator = await new_creator(suite, live=False)
    live = await start_live(suite, creator)
    senders = [(await funded_user(suite)) for _ in range(5)]
    viewer = suite.token(new_id("viewer"))
    watcher = asyncio.create_task(collect(suite.stub("gifting"), viewer, live))
    await eventually(lambda: _watching(suite, suite.services["gifting"], 1), "subscribed")
    sends = [
        suite.gifting.SendGift(gift(senders[i % 5][0], creator, live, "panda")) for i in range(20)
    ]
    end = suite.gifting.EndLive(
        G.EndLiveRequest(request_id=new_id("e"), live_id=live), metadata=suite.token(creator)
    )
    results = await asyncio.gather(*sends[:10], end, *sends[10:], return_exceptions=True)
    ended = results.pop(10)
    assert isinstance(ended, G.EndLiveResponse)
    accepted = [a for a in results if isinstance(a, G.SendGiftResponse)]
    refused = [a for a in results if isinstance(a, grpc.aio.AioRpcError)]
    assert len(accepted) + len(refused) == 20
    for error in refused:
        info = error_info(error)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        assert info is not None and info.reason in {"LIVE_ENDED", "LIVE_GIFTS_OFF"}
    events = await asyncio.wait_for(watcher, timeout=10)
    assert events[-1].HasField("ended")  # the end is the feed's last event
    assert set(gift_ids(events)) == {a.sent_gift.sent_gift_id for a in accepted}
    summary = (await suite.gifting.GetLive(G.GetLiveRequest(live_id=live))).summary
    assert (ended.summary.gifts_sent, ended.summary.coins_received) == (
        summary.gifts_sent,
        summary.coins_received,
    )
    assert summary.gifts_sent == len(accepted)
    assert summary.coins_received == sum(a.sent_gift.coins for a in accepted)
    spent = sum(coins for _, coins in senders) - sum(
        [await coins_of(suite, user) for user, _ in senders]
    )
    assert spent == summary.coins_received


async def test_a_gift_retried_after_its_live_ended_is_never_charged_into_it(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gift's first attempt stopped before its debit (a deadline, a lost connection); the LIVE
    ends (settling it: the debit never happened, so it is voided); the client retries with the same
    request id and the gift fails LIVE_ENDED: nobody pays for a gift into a LIVE that is over, which
    no feed would show, and the summary EndLive answered stays true (it was charged and counted
    after the end)."""
    creator = await new_creator(suite, live=False)
    live_id = await start_live(suite, creator)
    sender, coins = await funded_user(suite)

    async def stopped_before_the_debit(self: WalletDebiter, **kwargs: Any) -> Any:
        raise Unavailable("DEPENDENCY_UNAVAILABLE", "the attempt stopped before the debit")

    request = gift(sender, creator, live_id, "panda")
    monkeypatch.setattr(WalletDebiter, "debit_for_gift", stopped_before_the_debit)
    await expect_error(
        suite.gifting.SendGift(request), grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE"
    )
    monkeypatch.undo()
    ended = await suite.gifting.EndLive(
        G.EndLiveRequest(request_id=new_id("e"), live_id=live_id), metadata=suite.token(creator)
    )
    for _ in range(2):  # the retry, and the same answer again
        await expect_error(
            suite.gifting.SendGift(request), grpc.StatusCode.FAILED_PRECONDITION, "LIVE_ENDED"
        )
    assert await coins_of(suite, sender) == coins
    after = await suite.gifting.GetLive(G.GetLiveRequest(live_id=live_id))
    assert after.summary == ended.summary


async def test_gifts_left_pending_are_settled_by_endlive_into_its_summary_and_feed(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gifts whose attempts stopped after the wallet took the coins (their answers lost, as when the
    gifting process dies) and one that stopped before: EndLive settles them with the wallet before
    the LIVE ends. The debited ones are in its summary and in the feed before `ended`; the other is
    voided and fails LIVE_ENDED. Their retries replay those answers; nothing is debited twice. A
    review saw a third of the gifts answered OK on retries after a gifting crash land after the end:
    counted in GetLive, missing from the feed, and EndLive's summary not final."""
    creator = await new_creator(suite, live=False)
    live_id = await start_live(suite, creator)
    sender, coins = await funded_user(suite)
    real_debit = WalletDebiter.debit_for_gift

    async def answer_lost(self: WalletDebiter, **kwargs: Any) -> Any:
        await real_debit(self, **kwargs)
        raise Unavailable("DEPENDENCY_UNAVAILABLE", "the wallet's answer was lost")

    async def stopped_before_the_debit(self: WalletDebiter, **kwargs: Any) -> Any:
        raise Unavailable("DEPENDENCY_UNAVAILABLE", "the attempt stopped before the debit")

    debited = [gift(sender, creator, live_id, "panda") for _ in range(3)]
    monkeypatch.setattr(WalletDebiter, "debit_for_gift", answer_lost)
    for request in debited:
        await expect_error(
            suite.gifting.SendGift(request), grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE"
        )
    never = gift(sender, creator, live_id, "panda")
    monkeypatch.setattr(WalletDebiter, "debit_for_gift", stopped_before_the_debit)
    await expect_error(
        suite.gifting.SendGift(never), grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE"
    )
    monkeypatch.undo()
    # (EndLive settles gifts pending for a second or more, younger ones being on their way: these
    # are as old as a crashed process's would be.)
    monkeypatch.setattr(sending, "_SETTLE_AFTER", dt.timedelta(0))
    ended = await suite.gifting.EndLive(
        G.EndLiveRequest(request_id=new_id("e"), live_id=live_id), metadata=suite.token(creator)
    )
    assert (ended.summary.gifts_sent, ended.summary.coins_received) == (3, 15)
    events = await asyncio.wait_for(
        collect(suite.stub("gifting"), suite.token(new_id("viewer")), live_id), timeout=10
    )
    assert events[-1].HasField("ended")
    answers = [await suite.gifting.SendGift(request) for request in debited]
    assert sorted(gift_ids(events)) == sorted(a.sent_gift.sent_gift_id for a in answers)
    assert [await suite.gifting.SendGift(request) for request in debited] == answers
    refused = await expect_error(
        suite.gifting.SendGift(never), grpc.StatusCode.FAILED_PRECONDITION, "LIVE_ENDED"
    )
    assert "no coins moved" in (refused.details() or "")
    assert await coins_of(suite, sender) == coins - 15
    after = (await suite.gifting.GetLive(G.GetLiveRequest(live_id=live_id))).summary
    after.ClearField("diamonds_earned")  # the creator's credits arrive after the end
    ended.summary.ClearField("diamonds_earned")
    assert after == ended.summary


async def test_an_admin_ends_or_switches_a_creators_live_only_saying_why(suite: Suite) -> None:
    """As for a promotion or a withdrawal: an admin acting on a creator's LIVE gives a reason, kept
    in the audit trail; its creator need not (a review found admin ends with an empty reason)."""
    creator = await new_creator(suite, live=False)
    live_id = await start_live(suite, creator)
    admin = suite.token("moderator-1", admin=True)
    for call in (
        suite.gifting.SetLiveGifts(
            G.SetLiveGiftsRequest(request_id=new_id("g"), live_id=live_id, gifts_enabled=False),
            metadata=admin,
        ),
        suite.gifting.EndLive(
            G.EndLiveRequest(request_id=new_id("e"), live_id=live_id, reason="ok"), metadata=admin
        ),
    ):
        error = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "REASON_REQUIRED")
        assert creator in (error.details() or "")
    live = (await suite.gifting.GetLive(G.GetLiveRequest(live_id=live_id))).live
    assert live.gifts_enabled and not live.HasField("end_time")
    await suite.gifting.SetLiveGifts(  # its creator, no reason
        G.SetLiveGiftsRequest(request_id=new_id("g"), live_id=live_id, gifts_enabled=False),
        metadata=suite.token(creator),
    )
    why = "community guidelines: dangerous acts"
    ended = await suite.gifting.EndLive(
        G.EndLiveRequest(request_id=new_id("e"), live_id=live_id, reason=why), metadata=admin
    )
    assert ended.live.HasField("end_time")
    trail = await admin_audit_pb2_grpc.AdminAuditServiceStub(
        suite.channel("gifting")
    ).ListAdminActions(admin_audit_pb2.ListAdminActionsRequest(page_size=50), metadata=admin)
    assert why in {
        a.reason
        for a in trail.actions
        if a.method.endswith("EndLive") and live_id in a.request_json
    }


async def test_a_stopping_gifting_ends_its_watchers_at_once_with_their_cursor(
    backend: str, tmp_path: Path
) -> None:
    """A watch never ends by itself: it held a stopping gifting for its whole grace period, then was
    cut with "Cancelling all calls" (an operator review). Now it ends when the stop begins, with
    UNAVAILABLE SHUTTING_DOWN and the cursor to reconnect from (to another replica, or this one
    restarted)."""
    from tests.suite import start_suite

    suite = await start_suite(backend, tmp_path, only=("wallet", "payout", "gifting"))
    try:
        creator = await new_creator(suite)
        sender, _ = await funded_user(suite)
        await suite.gifting.SendGift(gift(sender, creator, live_of(creator)))
        watch = suite.stub("gifting").WatchLive(
            G.WatchLiveRequest(live_id=live_of(creator)), metadata=suite.token(new_id("viewer"))
        )
        first = await watch.read()
        gifting = suite.services.pop("gifting")
        stopping = asyncio.create_task(gifting.stop(grace=60))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(watch.read(), timeout=30)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value.details()
        info = error_info(ended.value)
        assert info is not None and info.reason == "SHUTTING_DOWN"
        assert info.metadata["resume_after"] == str(first.cursor)
        await asyncio.wait_for(stopping, timeout=30)  # not the 60 s grace
    finally:
        await suite.stop()
