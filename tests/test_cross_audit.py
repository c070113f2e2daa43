"""The cross-service audit (tools/cross_audit.py): after real traffic the four services' books tell
one story, and a difference planted in one database is reported with the ids involved."""

from __future__ import annotations

import sqlalchemy as sa

from coins.gifting.v1 import gifting_pb2
from coins.promotion.v1 import promotion_pb2
from tests.helpers import eventually, funded_user, live_of, new_creator, new_id, rewrite_history
from tests.suite import Suite
from tools.cross_audit import cross_audit


def urls(suite: Suite) -> dict[str, str]:
    return {name: running.runtime.db.url for name, running in suite.services.items()}


async def test_the_books_of_all_services_agree_and_a_lost_credit_is_named(
    private_suite: Suite,
) -> None:
    suite = private_suite
    sender, _ = await funded_user(suite, "us-web-1400")
    creator = await new_creator(suite)
    sent = []
    for gift in ("rose", "panda", "concert"):
        answer = await suite.gifting.SendGift(
            gifting_pb2.SendGiftRequest(
                request_id=new_id("g"),
                sender_id=sender,
                creator_id=creator,
                gift_id=gift,
                count=1,
                live_id=live_of(creator),
            )
        )
        sent.append(answer.sent_gift.sent_gift_id)
    made = await suite.promotion.CreatePromotion(
        promotion_pb2.CreatePromotionRequest(
            request_id=new_id("p"),
            user_id=sender,
            video_id="v",
            goal=promotion_pb2.GOAL_VIDEO_VIEWS,
            budget_coins=200,
            duration_days=1,
        ),
        metadata=suite.token(sender),
    )
    await suite.ad_delivery.ReportDelivery(
        promotion_pb2.ReportDeliveryRequest(
            request_id=new_id("d"), promotion_id=made.promotion.promotion_id, coins=70
        )
    )

    async def settled() -> bool:
        return not (await cross_audit(urls(suite))).in_flight

    await eventually(settled, "every credit delivered")
    report = await cross_audit(urls(suite))
    assert report.ok, report.differences
    assert report.gifts_checked == 3 and report.promotions_checked == 1

    # Lose one gift's credit in payout, as a faulty migration or a hand edit might.
    lost = sent[1]
    await rewrite_history(
        suite.services["payout"].runtime.db.url,
        sa.text("DELETE FROM gift_credits WHERE credit_key LIKE :key"),
        {"key": f"%/gift:{lost}"},
    )
    report = await cross_audit(urls(suite))
    assert [(d["what"], d["sent_gift_id"]) for d in report.differences] == [
        ("gift sent but not credited once", lost)
    ]
