"""Value on the books: every gift credit keeps the rates it was converted at and the platform's
share, so that for every gift coins x coin value = diamonds x diamond value + platform revenue,
exactly; the revenue report sums them per UTC day; a LIVE's summary shows the diamonds its gifts
earned."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import grpc
import pytest
import sqlalchemy as sa

from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from services.payout import storage as payout_storage
from tests.helpers import eventually, expect_error, funded_user, new_creator, new_id, start_live
from tests.suite import Suite, require_postgres, start_suite


@pytest.fixture(scope="module")
async def books(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    """A suite of its own: the report's totals are this module's gifts only."""
    if backend == "postgres":
        await require_postgres()
    suite = await start_suite(backend, tmp_path_factory.mktemp(f"revenue-{backend}"))
    yield suite
    await suite.stop()


def report_request(
    start: dt.datetime, end: dt.datetime | None = None
) -> payout_pb2.GetRevenueReportRequest:
    request = payout_pb2.GetRevenueReportRequest()
    request.start_time.FromDatetime(start)
    if end is not None:
        request.end_time.FromDatetime(end)
    return request


async def test_every_gift_is_valued_exactly_and_the_report_adds_them_up(books: Suite) -> None:
    suite = books
    creator = await new_creator(suite, live=False)
    live = await start_live(suite, creator)
    sender, _ = await funded_user(suite)
    sends = [("rose", 1), ("rose", 3), ("panda", 1), ("rainbow-puke", 1), ("rose", 1)]
    for gift_id, count in sends:
        await suite.gifting.SendGift(
            gifting_pb2.SendGiftRequest(
                request_id=new_id("g"),
                sender_id=sender,
                creator_id=creator,
                gift_id=gift_id,
                count=count,
                live_id=live,
            )
        )
    coins = 1 + 3 + 5 + 100 + 1  # 110 coins: 55 diamonds, however the halves fell gift by gift

    async def all_credited() -> bool:
        answer = await suite.payout.GetDiamondBalance(
            payout_pb2.GetDiamondBalanceRequest(creator_id=creator)
        )
        return answer.balance.diamonds == 55  # pending and available

    await eventually(all_credited, "every gift credited")
    # Gift by gift: the rates are kept with it, and value = creator's value + platform's, exactly.
    t = payout_storage.gift_credits
    async with suite.services["payout"].runtime.db.read() as conn:
        rows = (
            await conn.execute(
                sa.select(
                    t.c.coins,
                    t.c.diamonds,
                    t.c.rate_numerator,
                    t.c.rate_denominator,
                    t.c.coin_value_micros,
                    t.c.diamond_value_micros,
                    t.c.platform_micros,
                ).where(t.c.creator_id == creator)
            )
        ).all()
    assert len(rows) == len(sends)
    for gift_coins, diamonds, num, den, coin_value, diamond_value, platform in rows:
        assert (num, den, coin_value, diamond_value) == (1, 2, 9_900, 5_000)
        assert gift_coins * coin_value == diamonds * diamond_value + platform
        assert platform > 0
    assert sum(r.coins for r in rows) == coins and sum(r.diamonds for r in rows) == 55
    # The day's report is the sum of the gifts' own books.
    now = dt.datetime.now(dt.UTC)
    report = await suite.payout.GetRevenueReport(
        report_request(now - dt.timedelta(days=1), now + dt.timedelta(minutes=1)),
        metadata=suite.token("finance-1", admin=True),
    )
    assert report.currency_code == "USD"
    total = report.total
    assert (total.gifts, total.coins, total.diamonds) == (len(sends), coins, 55)
    assert total.gifts_value_micros == coins * 9_900
    assert total.creators_value_micros == 55 * 5_000
    assert total.platform_revenue_micros == coins * 9_900 - 55 * 5_000
    assert [d.day for d in report.days] == [now.date().isoformat()] or len(report.days) == 2
    assert sum(d.platform_revenue_micros for d in report.days) == total.platform_revenue_micros
    # The LIVE's summary shows what its gifts earned the creator.

    async def earned() -> bool:
        got = await suite.gifting.GetLive(gifting_pb2.GetLiveRequest(live_id=live))
        return got.summary.diamonds_earned == 55

    await eventually(earned, "the LIVE's diamonds earned")


async def test_a_revenue_report_needs_an_admin_and_a_sane_period(books: Suite) -> None:
    suite = books
    now = dt.datetime.now(dt.UTC)
    await expect_error(
        suite.payout.GetRevenueReport(
            report_request(now - dt.timedelta(days=1)), metadata=suite.token(new_id("creator"))
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_ROLE_REQUIRED",
    )
    admin = suite.token("finance-1", admin=True)
    await expect_error(
        suite.payout.GetRevenueReport(report_request(now - dt.timedelta(days=200)), metadata=admin),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BAD_REPORT_PERIOD",
    )
    await expect_error(
        suite.payout.GetRevenueReport(
            report_request(now, now - dt.timedelta(days=1)), metadata=admin
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BAD_REPORT_PERIOD",
    )
    await suite.payout.GetRevenueReport(  # exactly 92 days: the most, not refused
        report_request(now - dt.timedelta(days=92), now), metadata=admin
    )
    await expect_error(
        suite.payout.GetRevenueReport(
            report_request(now - dt.timedelta(days=92, seconds=1), now), metadata=admin
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BAD_REPORT_PERIOD",
    )
    empty = await suite.payout.GetRevenueReport(
        report_request(now - dt.timedelta(days=40), now - dt.timedelta(days=39)), metadata=admin
    )
    assert list(empty.days) == [] and empty.total.gifts == 0
