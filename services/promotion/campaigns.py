"""A promotion's life as saga steps (see the README, "The money flow"): created and its budget held in
the wallet, deliveries captured from the hold as reported, ended early with the rest released. Each
step is idempotent by its request id; the wallet calls are keyed by the promotion, so a retry after a
crash resumes where the first attempt stopped and never moves coins twice."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from sqlalchemy.ext.asyncio import AsyncConnection

from coins.promotion.v1 import promotion_pb2
from runtime.access import require_owner, require_reason
from runtime.clock import Clock
from runtime.db import Database
from runtime.errors import (
    DEBIT_VOIDED,
    VOIDED_BY_WALLET,
    Aborted,
    DomainError,
    FailedPrecondition,
    Unavailable,
)
from runtime.idempotency import Idempotency, acting_scope
from runtime.outages import settle_each
from services.promotion import storage
from services.promotion.convert import GOALS, promotion_pb
from services.promotion.domain import BudgetWallet, Promotions, not_found, unpaid

log = logging.getLogger("coins.promotion.campaigns")


class Campaigns:
    def __init__(
        self,
        db: Database,
        idempotency: Idempotency,
        clock: Clock,
        promotions: Promotions,
        wallet: BudgetWallet,
    ) -> None:
        self._db, self._idempotency, self._clock = db, idempotency, clock
        self._promotions, self._wallet = promotions, wallet

    async def promotion(self, promotion_id: str) -> storage.PromotionRecord:
        """A promotion by id; NOT_FOUND PROMOTION_NOT_FOUND if there is none."""
        async with self._db.read() as conn:
            promotion = await storage.get_promotion(conn, promotion_id)
        if promotion is None:
            raise not_found(promotion_id)
        return promotion

    async def of_user(
        self,
        user_id: str,
        *,
        limit: int,
        before: tuple[dt.datetime, str] | None,
        status: str | None = None,
        now: dt.datetime,
    ) -> list[storage.PromotionRecord]:
        """The user's promotions, newest first, from just before `before` (created_at, id): a
        page boundary that stays put while new promotions arrive. With `status`, only those that
        read so at `now`."""
        async with self._db.read() as conn:
            return await storage.list_promotions(
                conn, user_id, limit=limit, before=before, status=status, now=now
            )

    async def create(
        self, request: promotion_pb2.CreatePromotionRequest, *, time_limit: float
    ) -> promotion_pb2.CreatePromotionResponse:
        """Claim the request and record the promotion pending; hold its budget in the wallet (the
        pivot); activate it with the request's answer. Refused by the wallet: rejected, answered."""
        scope = create_scope(request.user_id)

        async def start(conn: AsyncConnection) -> str:
            return await self._promotions.create(
                conn,
                user_id=request.user_id,
                video_id=request.video_id,
                goal=GOALS[request.goal],
                budget_coins=request.budget_coins,
                duration_days=request.duration_days,
                now=self._clock.now(),
            )

        claim = await self._idempotency.begin(scope, request, start)
        if claim.finished:
            return claim.replay(promotion_pb2.CreatePromotionResponse)
        promotion_id = claim.resource_id
        assert promotion_id is not None
        promotion = await self.promotion(promotion_id)
        hold_id = transaction_id = None
        try:
            if promotion.funding == "debit":  # created before budgets were held, resumed
                transaction_id, available = await self._wallet.pay_budget(
                    promotion_id=promotion_id,
                    user_id=request.user_id,
                    coins=request.budget_coins,
                    time_limit=time_limit,
                )
            else:
                held = await self._wallet.hold_budget(
                    promotion_id=promotion_id,
                    user_id=request.user_id,
                    coins=request.budget_coins,
                    duration_days=request.duration_days,
                    time_limit=time_limit,
                )
                hold_id, available = held.hold_id, held.available_coins
        except DomainError as refused:
            error = refused
            if refused.reason in VOIDED_BY_WALLET:
                # The reconciler voided the hold's request id before this late attempt reached the
                # wallet.
                error = unpaid(DEBIT_VOIDED, promotion_id)
            if not error.retryable:
                # The promotion stays, REJECTED (ListPromotions shows it): the refusal names it.
                error.metadata["promotion_id"] = promotion_id
                async with self._db.transaction() as conn:
                    await self._promotions.reject(conn, promotion_id, self._clock.now())
                    await self._idempotency.complete(conn, scope, request, error=error)
            raise error from None
        async with self._db.transaction() as conn:
            now = self._clock.now()
            if not await self._promotions.activate(
                conn, promotion_id, now, hold_id=hold_id, wallet_transaction_id=transaction_id
            ):
                again = await self._idempotency.claim(conn, scope, request)
                if again.finished:  # a concurrent duplicate activated it first: its answer
                    return again.replay(promotion_pb2.CreatePromotionResponse)
                raise Aborted(
                    "CONCURRENT_RETRY",
                    "another attempt with this request_id completed the promotion; retry to read it",
                )
            activated = await storage.get_promotion(conn, promotion_id)
            assert activated is not None
            response = promotion_pb2.CreatePromotionResponse(
                promotion=promotion_pb(activated, now), payer_balance_coins=available
            )
            await self._idempotency.complete(conn, scope, request, response=response)
        return response

    async def report_delivery(
        self, request: promotion_pb2.ReportDeliveryRequest, *, time_limit: float
    ) -> promotion_pb2.ReportDeliveryResponse:
        """Checked once (the claim); resumed after a crash by re-sending the same capture, which the
        wallet answers from its idempotency store, so a capture is counted exactly once."""
        scope = acting_scope("ReportDelivery")
        response_type = promotion_pb2.ReportDeliveryResponse

        async def start(conn: AsyncConnection) -> str:
            promotion = await storage.get_promotion(conn, request.promotion_id)
            if promotion is None:
                raise not_found(request.promotion_id)
            on_record = await storage.reported_coins(
                conn, promotion.promotion_id, request.request_id
            )
            self._promotions.check_report_id(
                promotion.promotion_id, request.request_id, request.coins, on_record
            )
            if on_record is not None:  # counted already (another actor's report): answered so
                return promotion.promotion_id
            now = self._clock.now()
            self._promotions.check_delivery(promotion, request.coins, now)
            if not await storage.add_pending_capture(
                conn, promotion.promotion_id, request.request_id, request.coins, now
            ):
                raise self._promotions.report_in_flight(promotion.promotion_id, request.request_id)
            return promotion.promotion_id

        claim = await self._idempotency.begin(scope, request, start)
        if claim.finished:
            return claim.replay(response_type)
        async with self._db.read() as conn:
            promotion = await storage.get_promotion(conn, request.promotion_id)
            counted = await storage.delivery_coins(conn, request.promotion_id, request.request_id)
        if promotion is None:
            raise not_found(request.promotion_id)
        if counted is not None:  # by another actor's report of this id, or by a twin of this one
            return await self._answer_counted(scope, request)
        try:
            transaction_id = await self._capture(
                promotion, request.request_id, request.coins, time_limit
            )
        except DomainError as error:
            if not error.retryable:  # nothing was captured, nor will be
                async with self._db.transaction() as conn:
                    await storage.clear_pending_capture(
                        conn, promotion.promotion_id, request.request_id
                    )
                    if self._promotions.hold_over(error):
                        # Released or expired: the promotion is over even if its end was not
                        # recorded (an EndPromotion cut short after its release): record it now.
                        promotion = await self._record_end(conn, promotion)
            refusal = self._promotions.capture_refused(promotion, request.coins, error)
            await self._idempotency.record_error(scope, request, refusal)
            raise refusal from None
        try:
            async with self._db.transaction() as conn:
                now = self._clock.now()
                counted = await self._promotions.record_delivery(
                    conn,
                    promotion,
                    request_id=request.request_id,
                    coins=request.coins,
                    wallet_transaction_id=transaction_id,
                    now=now,
                )
                await storage.clear_pending_capture(
                    conn, promotion.promotion_id, request.request_id
                )
                if not counted:  # a concurrent attempt (or the reconciler) counted it
                    again = await self._idempotency.claim(conn, scope, request)
                    if again.finished:
                        return again.replay(response_type)
                current = await storage.get_promotion(conn, promotion.promotion_id)
                assert current is not None
                response = response_type(promotion=promotion_pb(current, now))
                await self._idempotency.complete(conn, scope, request, response=response)
        except DomainError as error:
            if transaction_id is None and not error.retryable:
                # Nothing was captured (a budget paid up front) and this report will never count
                # (BUDGET_EXCEEDED): its pending capture goes, or the reconciler would retry it.
                async with self._db.transaction() as conn:
                    await storage.clear_pending_capture(
                        conn, promotion.promotion_id, request.request_id
                    )
            await self._idempotency.record_error(scope, request, error)
            raise
        return response

    async def _answer_counted(
        self, scope: str, request: promotion_pb2.ReportDeliveryRequest
    ) -> promotion_pb2.ReportDeliveryResponse:
        """A report whose delivery is counted already: answered with the promotion as it is now
        (a concurrent twin's answer if it stored one first), whatever the promotion took since."""
        response_type = promotion_pb2.ReportDeliveryResponse
        async with self._db.transaction() as conn:
            again = await self._idempotency.claim(conn, scope, request)
            if again.finished:
                return again.replay(response_type)
            current = await storage.get_promotion(conn, request.promotion_id)
            assert current is not None
            response = response_type(promotion=promotion_pb(current, self._clock.now()))
            await self._idempotency.complete(conn, scope, request, response=response)
        return response

    async def end(
        self, request: promotion_pb2.EndPromotionRequest, *, time_limit: float
    ) -> promotion_pb2.EndPromotionResponse:
        """End early: release what is left of the held budget, then record the end with the answer."""
        promotion = await self.promotion(request.promotion_id)
        require_owner(promotion.user_id, record=f"promotion {promotion.promotion_id}")  # first
        require_reason(
            promotion.user_id, request.reason, record=f"promotion {promotion.promotion_id}"
        )
        scope = f"EndPromotion:{promotion.user_id}"
        response_type = promotion_pb2.EndPromotionResponse

        async def start(conn: AsyncConnection) -> str:
            current = await storage.get_promotion(conn, promotion.promotion_id)
            assert current is not None
            self._promotions.check_end(current, self._clock.now())
            return current.promotion_id

        claim = await self._idempotency.begin(scope, request, start)
        if claim.finished:
            return claim.replay(response_type)
        promotion = await self.promotion(promotion.promotion_id)  # its hold, if it has one now
        # The release comes first: from then on no capture succeeds, so spending stops the moment
        # the owner asks (counting the reports in flight first held an end back for up to a
        # minute under busy delivery while they kept spending: a review).
        try:
            released = await self._release_rest(promotion, time_limit)
        except DomainError as error:
            if self._promotions.release_refused(promotion, error):
                # The hold is resolved already (expired, or captured in full): the promotion is over.
                async with self._db.transaction() as conn:
                    error = await self._end_over(conn, promotion)
            await self._idempotency.record_error(scope, request, error)
            twin = await self._idempotency.twin_answer(scope, request)
            if twin is not None:  # the first answer (a concurrent duplicate's, or this error)
                return twin.replay(response_type)
            raise error from None
        # Every report that captured before the release, counted now (after the release no capture
        # can succeed, so this count is the last): the answer's spent and released add up to the
        # budget, and spent does not grow after the end.
        await self._count_pending_deliveries(promotion.promotion_id, time_limit)
        async with self._db.transaction() as conn:
            await self._promotions.lock(conn, promotion.promotion_id)
            now = self._clock.now()
            ended = await self._promotions.end(conn, promotion.promotion_id, now)
            current = await storage.get_promotion(conn, promotion.promotion_id)
            assert current is not None
            ended_by_another = False
            if not ended:
                again = await self._idempotency.claim(conn, scope, request)
                if again.finished:  # a concurrent duplicate ended it first: its answer
                    return again.replay(response_type)
                # Another EndPromotion (its own request id) ended it first: that one answers
                # what was released, this one that the promotion is over.
                ended_by_another = await self._idempotency.answered_another(
                    conn, scope, promotion.promotion_id, request
                )
            # Not recorded by this request but ended by its release all the same: a delivery
            # report that met the released hold records the end too, and may do it first.
            if ended or (promotion.hold_id is not None and not ended_by_another):
                response = response_type(
                    promotion=promotion_pb(current, now), released_coins=released
                )
                await self._idempotency.complete(conn, scope, request, response=response)
                return response
        # Ended meanwhile by another request (or paid up front, nothing to release, and ended).
        refusal = self._promotions.ended(current)
        await self._idempotency.record_error(scope, request, refusal)
        raise refusal

    async def _release_rest(self, promotion: storage.PromotionRecord, time_limit: float) -> int:
        """Release what is left of the promotion's hold (the wallet answers a repeat from its
        store); nothing for a budget paid up front."""
        if promotion.hold_id is None:
            return 0
        released = await self._wallet.release(
            promotion_id=promotion.promotion_id, hold_id=promotion.hold_id, time_limit=time_limit
        )
        return released.released_coins

    async def _end_over(
        self, conn: AsyncConnection, promotion: storage.PromotionRecord
    ) -> FailedPrecondition:
        """The release was refused because the hold is resolved already: record the end (if a
        report has not) and answer that the promotion is over, as of when it ended (its budget
        spent meanwhile, or now), not when it was to end."""
        return self._promotions.ended(await self._record_end(conn, promotion))

    async def _record_end(
        self, conn: AsyncConnection, promotion: storage.PromotionRecord
    ) -> storage.PromotionRecord:
        """Record the promotion's end now (unless a report or another end did) and read it back:
        what a refusal names is when it ended, not when it was to end."""
        await self._promotions.end(conn, promotion.promotion_id, self._clock.now())
        return await storage.get_promotion(conn, promotion.promotion_id) or promotion

    async def _count_pending_deliveries(self, promotion_id: str, time_limit: float) -> None:
        """EndPromotion's step after the release: reports whose capture may have happened but is
        not counted (their reporter died between the two, or is on its way) are captured again
        (nothing twice: a capture after the release is refused) and counted, as the reconciler
        would. A report whose own capture is still at the wallet is tried again for a moment (the
        wallet answers CONCURRENT_RETRY until it finishes). If the wallet cannot answer, the end
        waits for it: UNAVAILABLE, and the same request later (the release is not repeated)."""
        for attempt in range(_SETTLE_ROUNDS):
            async with self._db.read() as conn:
                pending = await storage.pending_captures_of(conn, promotion_id)
            unsettled = [
                report for report in pending if not await self._settle_capture(report, time_limit)
            ]
            if not unsettled:
                return
            if attempt < _SETTLE_ROUNDS - 1:
                await asyncio.sleep(0.05 * 2**attempt)
        raise Unavailable(
            "DEPENDENCY_UNAVAILABLE",
            f"promotion {promotion_id} has a delivery report whose capture the wallet "
            "cannot confirm now; it is counted before the promotion ends: retry the same "
            "request",
            retry_after=1.0,
            promotion_id=promotion_id,
        )

    async def _capture(
        self,
        promotion: storage.PromotionRecord,
        report_request_id: str,
        coins: int,
        time_limit: float,
    ) -> str | None:
        """A delivery report's capture from the promotion's hold (keyed by the report, so sending it
        again captures nothing twice); the wallet transaction, or None for a budget paid up front."""
        if promotion.hold_id is None:
            return None
        captured = await self._wallet.capture(
            promotion_id=promotion.promotion_id,
            hold_id=promotion.hold_id,
            report_request_id=report_request_id,
            coins=coins,
            time_limit=time_limit,
        )
        return captured.transaction_id

    async def finish_abandoned_ends(
        self, older_than: dt.timedelta, *, time_limit: float, limit: int = 100
    ) -> int:
        """Finish EndPromotion requests that released the budget, or may have, and never recorded
        the end: their process died between the two, or a report could not be counted after the
        release and the owner never sent the request again. The promotion read ACTIVE with its hold
        released until its end time (a review). Each is finished as the request's own retry would
        (the release again: the wallet answers it from its store; the count; the end) and its
        request id answered. One that cannot be finished yet never holds up the others."""
        async with self._db.read() as conn:
            abandoned = await storage.abandoned_ends(
                conn, self._clock.now() - older_than, limit=limit
            )
        return await settle_each(
            log,
            abandoned,
            lambda end: self._finish_end(end, time_limit),
            lambda end: f"cannot finish ending promotion {end.promotion_id}",
        )

    async def _finish_end(self, end: storage.AbandonedEnd, time_limit: float) -> int:
        promotion = await self.promotion(end.promotion_id)
        try:
            released = await self._release_rest(promotion, time_limit)
        except DomainError as error:
            if not self._promotions.release_refused(promotion, error):
                raise
            async with self._db.transaction() as conn:  # resolved already: the end is over
                refusal = await self._end_over(conn, promotion)
                await self._idempotency.answer_stored(
                    conn, end.scope, end.request_id, error=refusal
                )
            return 1
        await self._count_pending_deliveries(promotion.promotion_id, time_limit)
        async with self._db.transaction() as conn:
            await self._promotions.lock(conn, promotion.promotion_id)
            now = self._clock.now()
            ended = await self._promotions.end(conn, promotion.promotion_id, now)
            current = await storage.get_promotion(conn, promotion.promotion_id)
            assert current is not None
            another = not ended and await storage.another_end_answered(
                conn, end.scope, promotion.promotion_id, end.request_id
            )
            if ended or (promotion.hold_id is not None and not another):  # as `end` decides
                answer = promotion_pb2.EndPromotionResponse(
                    promotion=promotion_pb(current, now), released_coins=released
                )
                await self._idempotency.answer_stored(
                    conn, end.scope, end.request_id, response=answer
                )
            else:
                await self._idempotency.answer_stored(
                    conn, end.scope, end.request_id, error=self._promotions.ended(current)
                )
        log.info("finished ending promotion %s (released %d coins)", end.promotion_id, released)
        return 1

    async def reconcile_captures(
        self, older_than: dt.timedelta, *, time_limit: float, limit: int = 100
    ) -> int:
        """Count delivery reports whose capture answer was lost and whose reporter never came back:
        the same capture is sent again (the wallet answers it from its store, capturing nothing
        twice) and the delivery counted once, so the promotion's spent coins never fall behind the
        wallet's captures. A report the wallet refuses captured nothing and is dropped, and so is
        one paid up front that no longer fits its budget; the report request itself is answered
        when its reporter retries. One report that cannot be settled never holds up the others."""
        async with self._db.read() as conn:
            stale = await storage.stale_pending_captures(
                conn, self._clock.now() - older_than, limit=limit
            )
        return await settle_each(
            log,
            stale,
            lambda pending: self._settle_capture(pending, time_limit),
            lambda pending: (
                f"cannot count delivery {pending.request_id} of promotion {pending.promotion_id}"
            ),
        )

    async def _settle_capture(self, pending: storage.PendingCapture, time_limit: float) -> int:
        """One lost report: captured again (nothing twice) and counted, and its request id answered
        as its reporter's retry would be (one that never retries left it claimed for good: a
        review); 1 if settled, 0 if not yet."""
        async with self._db.read() as conn:
            promotion = await storage.get_promotion(conn, pending.promotion_id)
        transaction_id = None
        refused: DomainError | None = None
        if promotion is not None:
            try:
                transaction_id = await self._capture(
                    promotion, pending.request_id, pending.coins, time_limit
                )
            except DomainError as error:
                if error.retryable:
                    return 0  # the wallet is out: next round
                refused = error  # nothing was captured
        refusal: DomainError | None = None
        try:
            async with self._db.transaction() as conn:
                if promotion is not None and refused is not None:
                    if self._promotions.hold_over(refused):
                        # Released or expired: the promotion is over, as the report's own retry
                        # would record it, and answered as of its end (review r23: the end time
                        # it was to have, days ahead, was stored as the report's answer).
                        promotion = await self._record_end(conn, promotion)
                    refusal = self._promotions.capture_refused(promotion, pending.coins, refused)
                elif promotion is not None:
                    await self._promotions.record_delivery(
                        conn,
                        promotion,
                        request_id=pending.request_id,
                        coins=pending.coins,
                        wallet_transaction_id=transaction_id,
                        now=self._clock.now(),
                    )
                await storage.clear_pending_capture(conn, pending.promotion_id, pending.request_id)
                await self._answer_lost_report(conn, pending, refusal)
        except DomainError as error:
            if transaction_id is not None or error.retryable:
                raise
            # Paid up front and over its budget: nothing was captured and it can never count.
            async with self._db.transaction() as conn:
                await storage.clear_pending_capture(conn, pending.promotion_id, pending.request_id)
                await self._answer_lost_report(conn, pending, error)
        return 1

    async def _answer_lost_report(
        self, conn: AsyncConnection, pending: storage.PendingCapture, refusal: DomainError | None
    ) -> None:
        """The open ReportDelivery claim of a report the reconciler settled: counted (the promotion
        as it is now, as `_answer_counted` answers a retry) or refused."""
        response = None
        if refusal is None:
            current = await storage.get_promotion(conn, pending.promotion_id)
            if current is None:  # never: the report names a promotion on record
                return
            response = promotion_pb2.ReportDeliveryResponse(
                promotion=promotion_pb(current, self._clock.now())
            )
        for scope in await storage.open_report_claims(
            conn, pending.promotion_id, pending.request_id
        ):
            await self._idempotency.answer_stored(
                conn, scope, pending.request_id, response=response, error=refusal
            )


_SETTLE_ROUNDS = 4
"""Rounds over an ending promotion's uncounted reports (0.05, 0.1, 0.2 s apart) before its end
waits for a retry."""


def create_scope(user_id: str) -> str:
    """Where a user's CreatePromotion request ids are kept (runtime.idempotency)."""
    return f"CreatePromotion:{user_id}"
