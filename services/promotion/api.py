"""The promotion service's gRPC layer."""

from __future__ import annotations

import datetime as dt

from sqlalchemy.ext.asyncio import AsyncConnection

from coins.promotion.v1 import promotion_pb2, promotion_pb2_grpc
from runtime.access import Access, method_rules, require_owner
from runtime.clients import downstream_timeout
from runtime.errors import Aborted, DomainError, NotFound
from runtime.pagination import decode_token, encode_token, instant, page_size, text
from runtime.protos import RpcContext, timestamp
from runtime.server import Runtime
from services.promotion import storage
from services.promotion.domain import BudgetWallet, Promotions, status_at
from services.promotion.settings import PromotionSettings

_GOALS = {
    promotion_pb2.GOAL_VIDEO_VIEWS: "video_views",
    promotion_pb2.GOAL_PROFILE_VISITS: "profile_visits",
    promotion_pb2.GOAL_FOLLOWERS: "followers",
    promotion_pb2.GOAL_WEBSITE_VISITS: "website_visits",
}
_GOAL_ENUM = {name: value for value, name in _GOALS.items()}
_STATUS = {
    "pending": promotion_pb2.PROMOTION_STATUS_PENDING,
    "active": promotion_pb2.PROMOTION_STATUS_ACTIVE,
    "rejected": promotion_pb2.PROMOTION_STATUS_REJECTED,
    "completed": promotion_pb2.PROMOTION_STATUS_COMPLETED,
}


def promotion_pb(p: storage.PromotionRecord, now: dt.datetime) -> promotion_pb2.Promotion:
    return promotion_pb2.Promotion(
        promotion_id=p.promotion_id,
        user_id=p.user_id,
        video_id=p.video_id,
        goal=_GOAL_ENUM[p.goal],
        budget_coins=p.budget_coins,
        spent_coins=p.spent_coins,
        duration_days=p.duration_days,
        status=_STATUS[status_at(p, now)],
        create_time=timestamp(p.created_at),
        end_time=timestamp(p.ends_at),
    )


def _not_found(promotion_id: str) -> NotFound:
    return NotFound(
        "PROMOTION_NOT_FOUND", f"no promotion {promotion_id!r}", promotion_id=promotion_id
    )


ACCESS = method_rules(
    promotion_pb2.DESCRIPTOR.services_by_name["PromotionService"].full_name,
    {
        "CreatePromotion": Access.user("user_id", moves_money=True),
        "GetPromotion": Access.record_owner(),
        "ListPromotions": Access.user("user_id", admin_may_read=True),
        "ReportDelivery": Access.internal({"ad-delivery"}),
        "EndPromotion": Access.record_owner(),
    },
)
"""Who may call each RPC (see runtime.access): a user acts on their own promotions (EndPromotion
checks the record's owner), and only the ad-delivery system reports deliveries."""


class PromotionApi(promotion_pb2_grpc.PromotionServiceServicer):
    def __init__(
        self, runtime: Runtime[PromotionSettings], promotions: Promotions, wallet: BudgetWallet
    ) -> None:
        self._rt = runtime
        self._db = runtime.db
        self._idempotency = runtime.idempotency
        self._clock = runtime.clock
        self._promotions = promotions
        self._wallet = wallet

    def _time_limit(self, context: RpcContext) -> float:
        return downstream_timeout(context, self._rt.settings.downstream_timeout_seconds)

    async def _promotion(self, promotion_id: str) -> storage.PromotionRecord:
        async with self._db.read() as conn:
            promotion = await storage.get_promotion(conn, promotion_id)
        if promotion is None:
            raise _not_found(promotion_id)
        return promotion

    async def CreatePromotion(
        self, request: promotion_pb2.CreatePromotionRequest, context: RpcContext
    ) -> promotion_pb2.CreatePromotionResponse:
        scope = f"CreatePromotion:{request.user_id}"

        async def start(conn: AsyncConnection) -> str:
            return await self._promotions.create(
                conn,
                user_id=request.user_id,
                video_id=request.video_id,
                goal=_GOALS[request.goal],
                budget_coins=request.budget_coins,
                duration_days=request.duration_days,
                now=self._clock.now(),
            )

        claim = await self._idempotency.begin(scope, request, start)
        if claim.finished:
            return claim.replay(promotion_pb2.CreatePromotionResponse)
        promotion_id = claim.resource_id
        assert promotion_id is not None
        promotion = await self._promotion(promotion_id)
        hold_id = transaction_id = None
        try:
            if promotion.funding == "debit":  # created before budgets were held, resumed
                transaction_id, available = await self._wallet.pay_budget(
                    promotion_id=promotion_id,
                    user_id=request.user_id,
                    coins=request.budget_coins,
                    time_limit=self._time_limit(context),
                )
            else:
                held = await self._wallet.hold_budget(
                    promotion_id=promotion_id,
                    user_id=request.user_id,
                    coins=request.budget_coins,
                    duration_days=request.duration_days,
                    time_limit=self._time_limit(context),
                )
                hold_id, available = held.hold_id, held.available_coins
        except DomainError as error:
            if not error.retryable:
                async with self._db.transaction() as conn:
                    await self._promotions.reject(conn, promotion_id, self._clock.now())
                    await self._idempotency.complete(conn, scope, request, error=error)
            raise
        async with self._db.transaction() as conn:
            now = self._clock.now()
            if not await self._promotions.activate(
                conn, promotion_id, now, hold_id=hold_id, wallet_transaction_id=transaction_id
            ):
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

    async def GetPromotion(
        self, request: promotion_pb2.GetPromotionRequest, context: RpcContext
    ) -> promotion_pb2.GetPromotionResponse:
        promotion = await self._promotion(request.promotion_id)
        require_owner(promotion.user_id)
        return promotion_pb2.GetPromotionResponse(
            promotion=promotion_pb(promotion, self._clock.now())
        )

    async def ListPromotions(
        self, request: promotion_pb2.ListPromotionsRequest, context: RpcContext
    ) -> promotion_pb2.ListPromotionsResponse:
        size = page_size(request.page_size)
        kind = f"promotions:{request.user_id}"
        before = decode_token(request.page_token, kind, instant, text)
        async with self._db.read() as conn:
            rows = await storage.list_promotions(
                conn,
                request.user_id,
                limit=size + 1,
                before=(before[0], before[1]) if before else None,
            )
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = encode_token(kind, rows[-1].created_at.isoformat(), rows[-1].promotion_id)
        now = self._clock.now()
        return promotion_pb2.ListPromotionsResponse(
            promotions=[promotion_pb(p, now) for p in rows], next_page_token=token
        )

    async def ReportDelivery(
        self, request: promotion_pb2.ReportDeliveryRequest, context: RpcContext
    ) -> promotion_pb2.ReportDeliveryResponse:
        """Checked here once (the claim); resumed after a crash by re-sending the same capture,
        which the wallet answers from its idempotency store, so a capture is counted exactly once."""
        scope = f"ReportDelivery:{request.promotion_id}"
        response_type = promotion_pb2.ReportDeliveryResponse

        async def start(conn: AsyncConnection) -> str:
            promotion = await storage.get_promotion(conn, request.promotion_id)
            if promotion is None:
                raise _not_found(request.promotion_id)
            self._promotions.check_delivery(promotion, request.coins, self._clock.now())
            return promotion.promotion_id

        claim = await self._idempotency.begin(scope, request, start)
        if claim.finished:
            return claim.replay(response_type)
        promotion = await self._promotion(request.promotion_id)
        transaction_id = None
        try:
            if promotion.hold_id is not None:
                captured = await self._wallet.capture(
                    promotion_id=promotion.promotion_id,
                    hold_id=promotion.hold_id,
                    report_request_id=request.request_id,
                    coins=request.coins,
                    time_limit=self._time_limit(context),
                )
                transaction_id = captured.transaction_id
        except DomainError as error:
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
                if not counted:  # a concurrent attempt of this request counted it
                    again = await self._idempotency.claim(conn, scope, request)
                    if again.finished:
                        return again.replay(response_type)
                current = await storage.get_promotion(conn, promotion.promotion_id)
                assert current is not None
                response = response_type(promotion=promotion_pb(current, now))
                await self._idempotency.complete(conn, scope, request, response=response)
        except DomainError as error:
            await self._idempotency.record_error(scope, request, error)
            raise
        return response

    async def EndPromotion(
        self, request: promotion_pb2.EndPromotionRequest, context: RpcContext
    ) -> promotion_pb2.EndPromotionResponse:
        promotion = await self._promotion(request.promotion_id)
        require_owner(promotion.user_id)  # before anything is written
        scope = f"EndPromotion:{promotion.promotion_id}"
        response_type = promotion_pb2.EndPromotionResponse

        async def start(conn: AsyncConnection) -> str:
            current = await storage.get_promotion(conn, promotion.promotion_id)
            assert current is not None
            self._promotions.check_end(current, self._clock.now())
            return current.promotion_id

        claim = await self._idempotency.begin(scope, request, start)
        if claim.finished:
            return claim.replay(response_type)
        released = 0
        try:
            if promotion.hold_id is not None:
                released = (
                    await self._wallet.release(
                        promotion_id=promotion.promotion_id,
                        hold_id=promotion.hold_id,
                        time_limit=self._time_limit(context),
                    )
                ).released_coins
        except DomainError as error:
            if self._promotions.release_refused(promotion, error):
                # The hold is resolved already (expired, or captured in full): the promotion is over.
                async with self._db.transaction() as conn:
                    await self._promotions.end(conn, promotion.promotion_id, self._clock.now())
                error = self._promotions.ended(promotion)
            await self._idempotency.record_error(scope, request, error)
            raise error from None
        async with self._db.transaction() as conn:
            now = self._clock.now()
            ended = await self._promotions.end(conn, promotion.promotion_id, now)
            current = await storage.get_promotion(conn, promotion.promotion_id)
            assert current is not None
            if ended:
                response = response_type(
                    promotion=promotion_pb(current, now), released_coins=released
                )
                await self._idempotency.complete(conn, scope, request, response=response)
                return response
        # Ended meanwhile, by another request (the release was the same one) or spent in full.
        refusal = self._promotions.ended(current)
        await self._idempotency.record_error(scope, request, refusal)
        raise refusal
