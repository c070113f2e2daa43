"""Streaks: repeated sends of a streakable gift by one viewer in one LIVE, each within the pause, are
acknowledged with their running count; the streak ends when the pause passes (on the clock the test
moves) or the LIVE ends, with an event in the feed and in the gifts' records. Streakable is what the
admin set, not the price."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest

from coins.gifting.v1 import gifting_pb2
from tests.helpers import (
    ShiftedClock,
    eventually,
    funded_user,
    new_creator,
    new_id,
    start_live,
)
from tests.suite import Suite, require_postgres, start_suite

G = gifting_pb2
PAUSE = 5.0


@pytest.fixture(scope="module")
async def streaking(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Suite, ShiftedClock]]:
    """The suite with a 5 s streak pause swept every 50 ms, on a clock the tests move."""
    if backend == "postgres":
        await require_postgres()
    clock = ShiftedClock()
    suite = await start_suite(
        backend,
        tmp_path_factory.mktemp(f"streaks-{backend}"),
        overrides={"gifting": {"streak_pause_seconds": PAUSE, "streak_sweep_seconds": 0.05}},
        clock=clock,
    )
    yield suite, clock
    await suite.stop()


def gift(sender: str, creator: str, live: str, gift_id: str, count: int = 1) -> Any:
    return G.SendGiftRequest(
        request_id=new_id("g"),
        sender_id=sender,
        creator_id=creator,
        gift_id=gift_id,
        count=count,
        live_id=live,
    )


async def feed(suite: Suite, live: str) -> list[G.WatchLiveResponse]:
    """The LIVE's feed up to now (a watcher that reads what is there and leaves)."""
    events: list[G.WatchLiveResponse] = []
    stream = suite.stub("gifting").WatchLive(
        G.WatchLiveRequest(live_id=live), metadata=suite.token(new_id("viewer"))
    )
    last = (await suite.gifting.GetLive(G.GetLiveRequest(live_id=live))).summary.last_cursor
    while not events or events[-1].cursor < last:
        events.append(await stream.read())
    stream.cancel()
    return events


async def test_sends_within_the_pause_form_a_streak_that_ends_when_the_pause_passes(
    streaking: tuple[Suite, ShiftedClock],
) -> None:
    suite, clock = streaking
    creator = await new_creator(suite, live=False)
    live = await start_live(suite, creator)
    sender, _ = await funded_user(suite)
    counts = []
    for taps in (1, 3, 1):  # rose is streakable; a send of 3 roses adds 3
        sent = await suite.gifting.SendGift(gift(sender, creator, live, "rose", taps))
        counts.append((sent.sent_gift.streak.streak_id, sent.sent_gift.streak.count))
        clock.shift += dt.timedelta(seconds=PAUSE - 1)  # each within the pause of the one before
    streak_id = counts[0][0]
    assert counts == [(streak_id, 1), (streak_id, 4), (streak_id, 5)]
    # A gift that does not streak (concert) has no streak; another viewer has a streak of their own.
    other, _ = await funded_user(suite)
    concert = await suite.gifting.SendGift(gift(other, creator, live, "concert"))
    assert not concert.sent_gift.HasField("streak")
    theirs = await suite.gifting.SendGift(gift(other, creator, live, "rose"))
    assert theirs.sent_gift.streak.streak_id != streak_id and theirs.sent_gift.streak.count == 1

    clock.shift += dt.timedelta(seconds=PAUSE + 1)  # the pause passes for both

    async def ended() -> bool:
        kinds = [e.WhichOneof("event") for e in await feed(suite, live)]
        return kinds.count("streak_ended") == 2

    await eventually(ended, "both streaks ended by the sweep")
    events = await feed(suite, live)
    ends = {e.streak_ended.streak_id: e.streak_ended for e in events if e.HasField("streak_ended")}
    assert (ends[streak_id].sender_id, ends[streak_id].gift_id, ends[streak_id].count) == (
        sender,
        "rose",
        5,
    )
    gifts = [e.gift for e in events if e.HasField("gift")]
    assert [(g.streak_id, g.streak_count) for g in gifts if g.sender_id == sender] == [
        (streak_id, 1),
        (streak_id, 4),
        (streak_id, 5),
    ]
    # The gift's record says its streak ended.
    record = await suite.gifting.GetGift(
        G.GetGiftRequest(sent_gift_id=gifts[0].sent_gift_id), metadata=suite.token(sender)
    )
    assert record.sent_gift.streak.count == 1 and record.sent_gift.streak.HasField("end_time")
    # The next send starts a new streak.
    again = await suite.gifting.SendGift(gift(sender, creator, live, "rose"))
    assert again.sent_gift.streak.streak_id != streak_id and again.sent_gift.streak.count == 1


async def test_a_live_that_ends_ends_its_streaks_first(
    streaking: tuple[Suite, ShiftedClock],
) -> None:
    suite, _ = streaking
    creator = await new_creator(suite, live=False)
    live = await start_live(suite, creator)
    sender, _ = await funded_user(suite)
    await suite.gifting.SendGift(gift(sender, creator, live, "panda", 2))
    await suite.gifting.EndLive(
        G.EndLiveRequest(request_id=new_id("e"), live_id=live), metadata=suite.token(creator)
    )
    events = await feed(suite, live)
    assert [e.WhichOneof("event") for e in events] == ["gift", "streak_ended", "ended"]
    assert events[1].streak_ended.count == 2


async def test_whether_a_gift_streaks_is_the_admins_to_say(
    private_suite: Suite,
) -> None:
    suite = private_suite
    admin = suite.token(new_id("admin"), admin=True)
    # Concert (500 coins) made streakable; its price changed later without a word on streaks.
    for coins, streakable in ((500, True), (600, None)):
        request = G.SetGiftRequest(
            request_id=new_id("set"),
            gift_id="concert",
            name="Concert",
            coins=coins,
            active=True,
            reason="streak campaign",
        )
        if streakable is not None:
            request.streakable = streakable
        answer = await suite.gifting.SetGift(request, metadata=admin)
        assert answer.gift.streakable
    creator = await new_creator(suite)
    sender, _ = await funded_user(suite, "us-web-3500")
    sent = await suite.gifting.SendGift(gift(sender, creator, f"live-{creator}", "concert"))
    assert sent.sent_gift.streak.count == 1


async def test_concurrent_sends_join_one_streak_and_each_count_once(
    streaking: tuple[Suite, ShiftedClock],
) -> None:
    suite, _ = streaking
    creator = await new_creator(suite, live=False)
    live = await start_live(suite, creator)
    sender, _ = await funded_user(suite)
    answers = await asyncio.gather(
        *(suite.gifting.SendGift(gift(sender, creator, live, "rose")) for _ in range(10))
    )
    streaks = {a.sent_gift.streak.streak_id for a in answers}
    assert len(streaks) == 1
    assert sorted(a.sent_gift.streak.count for a in answers) == list(range(1, 11))


@pytest.fixture(scope="module")
async def unswept(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Suite, ShiftedClock]]:
    """Streaks that no sweep ends (it runs once an hour): a send after the pause finds its open
    streak paused and must end it itself."""
    if backend == "postgres":
        await require_postgres()
    clock = ShiftedClock()
    suite = await start_suite(
        backend,
        tmp_path_factory.mktemp(f"unswept-{backend}"),
        only=("wallet", "gifting"),
        overrides={"gifting": {"streak_pause_seconds": PAUSE, "streak_sweep_seconds": 3600}},
        clock=clock,
    )
    yield suite, clock
    await suite.stop()


async def test_a_send_after_the_pause_ends_the_paused_streak_and_a_replay_keeps_its_count(
    unswept: tuple[Suite, ShiftedClock],
) -> None:
    suite, clock = unswept
    creator = await new_creator(suite, live=False)
    live = await start_live(suite, creator)
    sender, _ = await funded_user(suite)
    first = await suite.gifting.SendGift(gift(sender, creator, live, "rose", 2))
    second_request = gift(sender, creator, live, "rose")
    second = await suite.gifting.SendGift(second_request)
    streak = second.sent_gift.streak
    assert (streak.streak_id, streak.count) == (first.sent_gift.streak.streak_id, 3)
    # The same request again is answered as the first time: its streak and running count.
    assert await suite.gifting.SendGift(second_request) == second
    clock.shift += dt.timedelta(seconds=PAUSE + 1)
    third = await suite.gifting.SendGift(gift(sender, creator, live, "rose"))
    assert third.sent_gift.streak.streak_id != streak.streak_id
    assert third.sent_gift.streak.count == 1
    kinds = [(e.WhichOneof("event"), e.cursor) for e in await feed(suite, live)]
    # The paused streak's end comes before the gift that started the next one.
    assert [k for k, _ in kinds] == ["gift", "gift", "streak_ended", "gift"]
