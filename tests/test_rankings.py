"""Creator rankings (today, this week, all time) and each creator's top gifters: exact sums of the
credited gifts, highest first, paged; a credit marked delivered twice counts once."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from coins.gifting.v1 import gifting_pb2
from runtime.sql import Statement
from services.gifting import storage
from tests.helpers import eventually, expect_error, funded_user, live_of, new_creator, new_id
from tests.suite import Suite

G = gifting_pb2


async def send(suite: Suite, sender: str, creator: str, gift_id: str, count: int = 1) -> str:
    sent = await suite.gifting.SendGift(
        G.SendGiftRequest(
            request_id=new_id("g"),
            sender_id=sender,
            creator_id=creator,
            gift_id=gift_id,
            count=count,
            live_id=live_of(creator),
        )
    )
    return sent.sent_gift.sent_gift_id


async def ranking(
    suite: Suite, period: G.RankingPeriod.ValueType, size: int = 100
) -> list[tuple[str, int, int]]:
    answer = await suite.gifting.ListCreatorRankings(
        G.ListCreatorRankingsRequest(period=period, page_size=size)
    )
    return [(c.creator_id, c.coins, c.rank) for c in answer.creators]


@pytest.mark.parametrize(
    "period", [G.RANKING_PERIOD_DAY, G.RANKING_PERIOD_WEEK, G.RANKING_PERIOD_ALL_TIME]
)
async def test_rankings_are_exact_for_credited_gifts(
    private_suite: Suite, period: G.RankingPeriod.ValueType
) -> None:
    suite = private_suite
    before = {c: coins for c, coins, _ in await ranking(suite, period)}
    top, middle, low = [await new_creator(suite) for _ in range(3)]
    ava, _ = await funded_user(suite, "us-web-3500")
    ben, _ = await funded_user(suite, "us-web-3500")
    await send(suite, ava, top, "concert", 2)  # 1,000
    await send(suite, ben, top, "concert")  # 500
    await send(suite, ben, middle, "concert")  # 500
    await send(suite, ava, middle, "rose", 3)  # 3
    await send(suite, ava, low, "panda")  # 5
    expected = {top: 1_500, middle: 503, low: 5}

    async def counted() -> bool:
        now = {c: coins for c, coins, _ in await ranking(suite, period)}
        return all(now.get(c, 0) - before.get(c, 0) == n for c, n in expected.items())

    await eventually(counted, "the credited gifts in the ranking")
    rows = await ranking(suite, period)
    ours = [(c, coins) for c, coins, _ in rows if c in expected]
    assert ours == sorted(ours, key=lambda r: (-r[1], r[0]))  # highest first
    assert [rank for _, _, rank in rows] == list(range(1, len(rows) + 1))
    # Paged: two pages of one, then the rest, add up to the whole.
    first = await suite.gifting.ListCreatorRankings(
        G.ListCreatorRankingsRequest(period=period, page_size=1)
    )
    second = await suite.gifting.ListCreatorRankings(
        G.ListCreatorRankingsRequest(period=period, page_size=1, page_token=first.next_page_token)
    )
    assert [(c.creator_id, c.rank) for c in [*first.creators, *second.creators]] == [
        (c, r) for c, _, r in rows[:2]
    ]
    today = dt.datetime.now(dt.UTC).date()
    assert first.period_key in {
        today.isoformat(),
        storage.period_keys(dt.datetime.now(dt.UTC))["week"],
        "all",
    }
    gifters = await suite.gifting.ListCreatorTopGifters(
        G.ListCreatorTopGiftersRequest(creator_id=middle)
    )
    if period == G.RANKING_PERIOD_DAY:  # the gifters are all time: check them once
        assert [(g.user_id, g.coins, g.rank) for g in gifters.gifters] == [
            (ben, 500, 1),
            (ava, 3, 2),
        ]


async def test_a_credit_marked_delivered_twice_counts_once(private_suite: Suite) -> None:
    suite = private_suite
    creator = await new_creator(suite)
    viewer, _ = await funded_user(suite)
    sent_gift_id = await send(suite, viewer, creator, "panda", 2)

    async def all_time() -> int:
        rows = await ranking(suite, G.RANKING_PERIOD_ALL_TIME)
        return next((coins for c, coins, _ in rows if c == creator), 0)

    async def credited() -> bool:
        return await all_time() == 10

    await eventually(credited, "the gift credited and ranked")
    # A second delivery of the same credit (another relay, a retry after a lost acknowledgement).
    runtime = suite.services["gifting"].runtime
    async with runtime.db.driver.read() as tx:
        row = await tx.one(
            Statement(
                "test.outbox_row",
                "SELECT outbox_id, sent_gift_id, creator_id, coins, traceparent, attempts "
                "FROM credit_outbox WHERE sent_gift_id = :sent_gift_id",
            ),
            sent_gift_id=sent_gift_id,
        )
    assert row is not None
    again = storage.OutboxRecord(int(row[0]), row[1], row[2], int(row[3]), row[4], int(row[5]))
    async with runtime.db.driver.transaction() as tx:
        assert await storage.mark_delivered(tx, [again], runtime.clock.now()) == 0
    assert await all_time() == 10


async def test_an_unset_period_is_refused(private_suite: Suite) -> None:
    await expect_error(
        private_suite.gifting.ListCreatorRankings(G.ListCreatorRankingsRequest()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_REQUEST",
    )
