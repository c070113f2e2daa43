"""A promotion whose budget hold was placed but never recorded (the promotion service died, the
wallet's answer was lost) is settled by the reconciler: activated on its hold, or rejected if the
wallet never placed one, whose request id is then voided so it can never hold coins late."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from coins.promotion.v1 import promotion_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.idempotency import idempotency_keys
from runtime.status import error_info
from services.promotion import storage
from services.promotion.campaigns import Campaigns
from services.promotion.domain import Promotions
from tests.helpers import eventually, expect_error, funded_user, new_id, rpc_error
from tests.suite import Suite, start_suite
from tests.test_promotion import (
    captured_not_counted,
    delivery,
    hold_of,
    paid_up_front,
    promotion,
    read,
)


@pytest.fixture(scope="module")
async def reconciling(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Suite]:
    suite = await start_suite(
        backend,
        tmp_path_factory.mktemp(f"promotions-{backend}"),
        overrides={"promotion": {"reconcile_every_seconds": 0.1, "reconcile_after_seconds": 0.3}},
    )
    yield suite
    await suite.stop()


async def available(suite: Suite, user: str) -> int:
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    return balance.balance.available_coins


async def test_a_hold_placed_but_never_recorded_activates_the_promotion(reconciling: Suite) -> None:
    suite = reconciling
    user, coins = await funded_user(suite)
    original = Promotions.activate
    calls = {"n": 0}

    async def crash_once(self: Promotions, *args: Any, **kwargs: Any) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("the process died here")
        return await original(self, *args, **kwargs)

    Promotions.activate = crash_once  # type: ignore[method-assign]
    try:
        request = promotion_pb2.CreatePromotionRequest(
            request_id=new_id(),
            user_id=user,
            video_id="v1",
            goal=promotion_pb2.GOAL_VIDEO_VIEWS,
            budget_coins=300,
            duration_days=2,
        )
        await expect_error(
            suite.promotion.CreatePromotion(request), grpc.StatusCode.INTERNAL, "INTERNAL_ERROR"
        )

        async def active() -> bool:
            listed = await suite.promotion.ListPromotions(
                promotion_pb2.ListPromotionsRequest(user_id=user)
            )
            return [p.status for p in listed.promotions] == [promotion_pb2.PROMOTION_STATUS_ACTIVE]

        await eventually(active, "the promotion to activate")
    finally:
        Promotions.activate = original  # type: ignore[method-assign]
    replayed = await suite.promotion.CreatePromotion(request)  # the original request's answer
    assert replayed.promotion.status == promotion_pb2.PROMOTION_STATUS_ACTIVE
    assert await available(suite, user) == coins - 300  # held once


async def test_a_promotion_the_wallet_never_held_is_rejected_and_never_holds(
    reconciling: Suite,
) -> None:
    suite = reconciling
    user, coins = await funded_user(suite)
    promotion_id = uuid.uuid4().hex
    now = dt.datetime.now(dt.UTC)
    async with suite.services["promotion"].runtime.db.transaction() as conn:  # died before the hold
        await storage.insert_promotion(
            conn,
            storage.PromotionRecord(
                promotion_id=promotion_id,
                user_id=user,
                video_id="v2",
                goal="video_views",
                budget_coins=200,
                spent_coins=0,
                duration_days=1,
                status="pending",
                wallet_transaction_id=None,
                created_at=now,
                updated_at=now,
                hold_id=None,
                ends_at=now + dt.timedelta(days=1),
                funding="hold",
            ),
        )

    async def rejected() -> bool:
        async with suite.services["promotion"].runtime.db.read() as conn:
            found = await storage.get_promotion(conn, promotion_id)
        return found is not None and found.status == "rejected"

    await eventually(rejected, "the promotion to be rejected")
    assert await available(suite, user) == coins


async def test_a_delivery_captured_but_never_counted_is_counted_without_a_retry(
    reconciling: Suite,
) -> None:
    """The wallet captured a report's coins but the answer never reached the promotion service (it
    died), and the reporter never retries: the reconciler counts the delivery, once."""
    suite = reconciling
    user, _ = await funded_user(suite)
    made = await suite.promotion.CreatePromotion(promotion(user, 300), metadata=suite.token(user))
    promotion_id = made.promotion.promotion_id
    await captured_not_counted(suite, promotion_id, 60)
    assert (await hold_of(suite, promotion_id)).captured_coins == 60  # the wallet took them

    async def counted() -> bool:
        return (await read(suite, promotion_id, user)).spent_coins == 60

    await eventually(counted, "the lost capture counted by the reconciler")
    async with suite.services["promotion"].runtime.db.read() as conn:
        assert await storage.stale_pending_captures(conn, dt.datetime.now(dt.UTC), limit=10) == []
        # Its request id answered as a retry would be, not claimed for good (review r20).
        keys = idempotency_keys
        report_keys = (
            await conn.execute(
                sa.select(keys.c.response, keys.c.error).where(
                    keys.c.resource_id == promotion_id, keys.c.scope.contains("ReportDelivery:")
                )
            )
        ).all()
    assert len(report_keys) == 1 and report_keys[0].error is None
    answer = promotion_pb2.ReportDeliveryResponse.FromString(report_keys[0].response)
    assert (answer.promotion.promotion_id, answer.promotion.spent_coins) == (promotion_id, 60)
    assert (await hold_of(suite, promotion_id)).captured_coins == 60  # captured once


async def pending_captures_of(suite: Suite, promotion_id: str) -> list[storage.PendingCapture]:
    async with suite.services["promotion"].runtime.db.read() as conn:
        stale = await storage.stale_pending_captures(
            conn, dt.datetime.now(dt.UTC) + dt.timedelta(days=1), limit=1000
        )
    return [p for p in stale if p.promotion_id == promotion_id]


async def test_a_report_refused_over_an_up_front_budget_leaves_nothing_to_reconcile(
    reconciling: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report that fitted the budget at its claim, but not once another report counted first, is
    refused BUDGET_EXCEEDED, and its pending capture goes with it (it stayed, and the reconciler
    failed on it every round)."""
    suite = reconciling
    user, _ = await funded_user(suite)
    upfront = await paid_up_front(suite, user, 200)
    original = Promotions.record_delivery

    async def another_counted_first(
        self: Promotions, conn: Any, promotion: storage.PromotionRecord, **kwargs: Any
    ) -> bool:
        assert await storage.add_spent(conn, promotion.promotion_id, 150, now=kwargs["now"])
        return await original(self, conn, promotion, **kwargs)

    monkeypatch.setattr(Promotions, "record_delivery", another_counted_first)
    await expect_error(
        suite.ad_delivery.ReportDelivery(delivery(upfront.promotion_id, 150)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "BUDGET_EXCEEDED",
    )
    monkeypatch.setattr(Promotions, "record_delivery", original)
    assert (await read(suite, upfront.promotion_id, user)).spent_coins == 0  # rolled back
    assert await pending_captures_of(suite, upfront.promotion_id) == []


async def test_a_report_the_reconciler_cannot_settle_holds_up_no_other(
    reconciling: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two older lost reports the reconciler cannot count (one over an up-front budget, one whose
    count fails) and a newer one captured but never counted: the newer one is counted, the one
    that can never count is dropped, and the failing one waits for the next round."""
    suite = reconciling
    user, _ = await funded_user(suite)
    over = await paid_up_front(suite, user, 100)
    failing = await paid_up_front(suite, user, 100)
    original = Promotions.record_delivery
    dies_once: set[str] = set()

    async def patched(
        self: Promotions, conn: Any, promotion: storage.PromotionRecord, **kwargs: Any
    ) -> bool:
        if promotion.promotion_id == failing.promotion_id:
            raise RuntimeError("this one cannot be counted yet")
        if promotion.promotion_id in dies_once:
            dies_once.discard(promotion.promotion_id)
            raise RuntimeError("the process died here")
        return await original(self, conn, promotion, **kwargs)

    monkeypatch.setattr(Promotions, "record_delivery", patched)  # before the reconciler sees any
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    async with suite.services["promotion"].runtime.db.transaction() as conn:
        await storage.add_pending_capture(conn, over.promotion_id, new_id("d"), 150, long_ago)
        await storage.add_pending_capture(conn, failing.promotion_id, new_id("d"), 50, long_ago)
    made = await suite.promotion.CreatePromotion(promotion(user, 300), metadata=suite.token(user))
    held_id = made.promotion.promotion_id
    dies_once.add(held_id)
    await expect_error(
        suite.ad_delivery.ReportDelivery(delivery(held_id, 60)),
        grpc.StatusCode.INTERNAL,
        "INTERNAL_ERROR",
    )

    async def counted() -> bool:
        return (await read(suite, held_id, user)).spent_coins == 60

    await eventually(counted, "the newer lost capture counted past the two it cannot settle")
    assert await pending_captures_of(suite, over.promotion_id) == []
    assert [p.coins for p in await pending_captures_of(suite, failing.promotion_id)] == [50]
    assert (await read(suite, over.promotion_id, user)).spent_coins == 0
    monkeypatch.setattr(Promotions, "record_delivery", original)

    async def settled() -> bool:
        return await pending_captures_of(suite, failing.promotion_id) == []

    await eventually(settled, "the failing report counted once it can be")
    assert (await read(suite, failing.promotion_id, user)).spent_coins == 50


async def test_a_create_whose_hold_never_reached_the_wallet_answers_that_nothing_was_held(
    reconciling: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CreatePromotion stopped before its hold reached the wallet; the reconciler voids the hold's
    request and rejects the promotion. The same CreatePromotion again answers HOLD_VOIDED, saying
    nothing is held and to use a new request id (it answered DEBIT_VOIDED, "not paid", naming a
    debit for what is a hold)."""
    from services.promotion.clients import WalletBudget

    suite = reconciling
    user, coins = await funded_user(suite)

    async def stopped_before_the_hold(self: Any, **kwargs: Any) -> Any:
        from runtime.errors import Unavailable

        raise Unavailable("DEPENDENCY_UNAVAILABLE", "the attempt stopped before the hold")

    request = promotion(user, 200)
    monkeypatch.setattr(WalletBudget, "hold_budget", stopped_before_the_hold)
    await expect_error(
        suite.promotion.CreatePromotion(request),
        grpc.StatusCode.UNAVAILABLE,
        "DEPENDENCY_UNAVAILABLE",
    )
    monkeypatch.undo()

    async def rejected() -> bool:
        async with suite.services["promotion"].runtime.db.read() as conn:
            statuses = (
                await conn.execute(
                    sa.select(storage.promotions.c.status).where(
                        storage.promotions.c.user_id == user
                    )
                )
            ).scalars()
            return list(statuses) == ["rejected"]

    await eventually(rejected, "the reconciler to void the hold and reject the promotion")
    error = await expect_error(
        suite.promotion.CreatePromotion(request), grpc.StatusCode.FAILED_PRECONDITION, "HOLD_VOIDED"
    )
    assert "nothing is held" in (error.details() or "")
    info = error_info(
        error
    )  # it names the promotion, REJECTED and listed, as a direct refusal does
    listing = await suite.promotion.ListPromotions(
        promotion_pb2.ListPromotionsRequest(user_id=user)
    )
    (rejected_id,) = [p.promotion_id for p in listing.promotions]
    assert info is not None and info.metadata["promotion_id"] == rejected_id
    assert await available(suite, user) == coins


async def test_an_end_that_released_the_budget_and_never_recorded_it_is_finished(
    reconciling: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An EndPromotion released the budget and then died (here: it could not count a report, and
    the owner never sent it again): the promotion read ACTIVE with its hold released until its end
    time (a review). The reconciler finishes it as the request's retry would: the end recorded,
    the request id answered with what was released."""
    suite = reconciling
    user, coins = await funded_user(suite)
    made = (await suite.promotion.CreatePromotion(promotion(user, 300))).promotion
    await suite.ad_delivery.ReportDelivery(delivery(made.promotion_id, 100))

    async def the_count_fails(self: Campaigns, *args: Any) -> None:
        raise RuntimeError("the process died here")

    monkeypatch.setattr(Campaigns, "_count_pending_deliveries", the_count_fails)
    request = promotion_pb2.EndPromotionRequest(
        request_id=new_id("end"), promotion_id=made.promotion_id
    )
    error = await rpc_error(suite.promotion.EndPromotion(request, metadata=suite.token(user)))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert (await hold_of(suite, made.promotion_id)).status == wallet_pb2.HOLD_STATUS_RELEASED
    monkeypatch.undo()

    async def finished() -> bool:
        return (await read(suite, made.promotion_id, user)).status == (
            promotion_pb2.PROMOTION_STATUS_COMPLETED
        )

    await eventually(finished, "the reconciler finishing the end")
    answer = await suite.promotion.EndPromotion(request, metadata=suite.token(user))
    assert (answer.promotion.spent_coins, answer.released_coins) == (100, 200)
    assert await available(suite, user) == coins - 100


async def test_an_end_cut_short_is_answered_after_a_report_or_another_end_recorded_it(
    reconciling: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An EndPromotion released the budget and died, and before the sweep came something else
    recorded the end: a delivery report meeting the released hold, or another EndPromotion (its
    own request id). The promotion reads COMPLETED, and the sweep, which read active promotions
    only, left the first request id unanswered for good (review r20). It answers it now: what was
    released, where no other end answered that; PROMOTION_ENDED where another did."""
    suite = reconciling
    user, coins = await funded_user(suite)
    by_report = (await suite.promotion.CreatePromotion(promotion(user, 300))).promotion
    by_another = (await suite.promotion.CreatePromotion(promotion(user, 300))).promotion
    for made in (by_report, by_another):
        await suite.ad_delivery.ReportDelivery(delivery(made.promotion_id, 100))

    async def the_count_fails(self: Campaigns, *args: Any) -> None:
        raise RuntimeError("the process died here")

    cut_short = {}
    for made in (by_report, by_another):
        monkeypatch.setattr(Campaigns, "_count_pending_deliveries", the_count_fails)
        cut_short[made.promotion_id] = request = promotion_pb2.EndPromotionRequest(
            request_id=new_id("end"), promotion_id=made.promotion_id
        )
        error = await rpc_error(suite.promotion.EndPromotion(request, metadata=suite.token(user)))
        assert error.code() == grpc.StatusCode.INTERNAL
        monkeypatch.undo()
    await expect_error(  # meets the released hold: records the end
        suite.ad_delivery.ReportDelivery(delivery(by_report.promotion_id, 50)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PROMOTION_ENDED",
    )
    other = await suite.promotion.EndPromotion(
        promotion_pb2.EndPromotionRequest(
            request_id=new_id("end"), promotion_id=by_another.promotion_id
        ),
        metadata=suite.token(user),
    )
    assert (other.promotion.spent_coins, other.released_coins) == (100, 200)
    db = suite.services["promotion"].runtime.db

    async def answered() -> bool:
        ids = [r.request_id for r in cut_short.values()]
        async with db.read() as conn:
            rows = await conn.execute(
                sa.select(idempotency_keys.c.response, idempotency_keys.c.error).where(
                    idempotency_keys.c.request_id.in_(ids)
                )
            )
            return all(r.response is not None or r.error is not None for r in rows)

    await eventually(answered, "the sweep answering both cut-short ends")
    first = cut_short[by_report.promotion_id]
    answer = await suite.promotion.EndPromotion(first, metadata=suite.token(user))
    assert (answer.promotion.spent_coins, answer.released_coins) == (100, 200)
    await expect_error(  # the other end answered the release
        suite.promotion.EndPromotion(
            cut_short[by_another.promotion_id], metadata=suite.token(user)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PROMOTION_ENDED",
    )
    assert await available(suite, user) == coins - 200
