"""The promotion service's gRPC layer."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from coins.promotion.v1 import promotion_pb2, promotion_pb2_grpc
from runtime.access import Access, method_rules, require_owner
from runtime.clients import downstream_timeout
from runtime.errors import Aborted, DomainError, NotFound
from runtime.pagination import decode_token, encode_token, instant, page_size, text
from runtime.protos import RpcContext, timestamp
from runtime.server import Runtime
from services.promotion import storage
from services.promotion.domain import BudgetPayer, Promotions
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
}


def _promotion_pb(p: storage.PromotionRecord) -> promotion_pb2.Promotion:
    return promotion_pb2.Promotion(
        promotion_id=p.promotion_id,
        user_id=p.user_id,
        video_id=p.video_id,
        goal=_GOAL_ENUM[p.goal],
        budget_coins=p.budget_coins,
        spent_coins=p.spent_coins,
        duration_days=p.duration_days,
        status=_STATUS[p.status],
        create_time=timestamp(p.created_at),
    )


ACCESS = method_rules(
    promotion_pb2.DESCRIPTOR.services_by_name["PromotionService"].full_name,
    {
        "CreatePromotion": Access.user("user_id", moves_money=True),
        "GetPromotion": Access.record_owner(),
        "ListPromotions": Access.user("user_id", admin_may_read=True),
    },
)
"""Who may call each RPC (see runtime.access): the account acted on is always the token's user."""


class PromotionApi(promotion_pb2_grpc.PromotionServiceServicer):
    def __init__(
        self, runtime: Runtime[PromotionSettings], promotions: Promotions, wallet: BudgetPayer
    ) -> None:
        self._rt = runtime
        self._db = runtime.db
        self._idempotency = runtime.idempotency
        self._clock = runtime.clock
        self._promotions = promotions
        self._wallet = wallet

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
        try:
            transaction_id, balance = await self._wallet.pay_budget(
                promotion_id=promotion_id,
                user_id=request.user_id,
                coins=request.budget_coins,
                time_limit=downstream_timeout(
                    context, self._rt.settings.downstream_timeout_seconds
                ),
            )
        except DomainError as error:
            if not error.retryable:
                async with self._db.transaction() as conn:
                    await self._promotions.reject(conn, promotion_id, self._clock.now())
                    await self._idempotency.complete(conn, scope, request, error=error)
            raise
        async with self._db.transaction() as conn:
            if not await self._promotions.activate(
                conn, promotion_id, transaction_id, self._clock.now()
            ):
                raise Aborted(
                    "CONCURRENT_RETRY",
                    "another attempt with this request_id completed the promotion; retry to read it",
                )
            promotion = await storage.get_promotion(conn, promotion_id)
            assert promotion is not None
            response = promotion_pb2.CreatePromotionResponse(
                promotion=_promotion_pb(promotion), payer_balance_coins=balance
            )
            await self._idempotency.complete(conn, scope, request, response=response)
        return response

    async def GetPromotion(
        self, request: promotion_pb2.GetPromotionRequest, context: RpcContext
    ) -> promotion_pb2.GetPromotionResponse:
        async with self._db.read() as conn:
            promotion = await storage.get_promotion(conn, request.promotion_id)
        if promotion is None:
            raise NotFound(
                "PROMOTION_NOT_FOUND",
                f"no promotion {request.promotion_id!r}",
                promotion_id=request.promotion_id,
            )
        require_owner(promotion.user_id)
        return promotion_pb2.GetPromotionResponse(promotion=_promotion_pb(promotion))

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
        return promotion_pb2.ListPromotionsResponse(
            promotions=[_promotion_pb(p) for p in rows], next_page_token=token
        )
