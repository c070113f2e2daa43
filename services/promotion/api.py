"""The promotion service's gRPC layer."""

from __future__ import annotations

from coins.promotion.v1 import promotion_pb2, promotion_pb2_grpc
from runtime.access import Access, method_rules, require_owner
from runtime.clients import downstream_timeout
from runtime.pagination import decode_token, instant, next_page, page_size, text
from runtime.protos import RpcContext
from runtime.server import Runtime
from services.promotion.campaigns import Campaigns, create_scope
from services.promotion.convert import STATUSES, promotion_pb
from services.promotion.settings import PromotionSettings

SERVICE = promotion_pb2.DESCRIPTOR.services_by_name["PromotionService"].full_name
ACCESS = method_rules(
    SERVICE,
    {
        "CreatePromotion": Access.user("user_id", moves_money=True),
        "GetPromotion": Access.record_owner(),
        "ListPromotions": Access.user("user_id", admin_may_read=True),
        "ReportDelivery": Access.internal({"ad-delivery"}),
        "EndPromotion": Access.record_owner(writes=True),
    },
)
"""Who may call each RPC (see runtime.access): a user acts on their own promotions (EndPromotion
checks the record's owner), and only the ad-delivery system reports deliveries."""


class PromotionApi(promotion_pb2_grpc.PromotionServiceServicer):
    def __init__(self, runtime: Runtime[PromotionSettings], campaigns: Campaigns) -> None:
        self._rt = runtime
        self._clock = runtime.clock
        self._campaigns = campaigns
        runtime.replay_stored(
            f"/{SERVICE}/CreatePromotion",
            lambda request: create_scope(request.user_id),
            promotion_pb2.CreatePromotionResponse,
        )

    def _time_limit(self, context: RpcContext) -> float:
        return downstream_timeout(context, self._rt.settings.downstream_timeout_seconds)

    async def CreatePromotion(
        self, request: promotion_pb2.CreatePromotionRequest, context: RpcContext
    ) -> promotion_pb2.CreatePromotionResponse:
        return await self._campaigns.create(request, time_limit=self._time_limit(context))

    async def GetPromotion(
        self, request: promotion_pb2.GetPromotionRequest, context: RpcContext
    ) -> promotion_pb2.GetPromotionResponse:
        promotion = await self._campaigns.promotion(request.promotion_id)
        require_owner(promotion.user_id, record=f"promotion {promotion.promotion_id}")
        return promotion_pb2.GetPromotionResponse(
            promotion=promotion_pb(promotion, self._clock.now())
        )

    async def ListPromotions(
        self, request: promotion_pb2.ListPromotionsRequest, context: RpcContext
    ) -> promotion_pb2.ListPromotionsResponse:
        size = page_size(request.page_size)
        status = STATUSES.get(request.status)
        kind = f"promotions:{request.user_id}" + (f":{status}" if status else "")
        before = decode_token(request.page_token, kind, instant, text)
        now = self._clock.now()
        rows = await self._campaigns.of_user(
            request.user_id,
            limit=size + 1,
            before=(before[0], before[1]) if before else None,
            status=status,
            now=now,
        )
        rows, token = next_page(
            rows, size, kind, lambda p: (p.created_at.isoformat(), p.promotion_id)
        )
        return promotion_pb2.ListPromotionsResponse(
            promotions=[promotion_pb(p, now) for p in rows], next_page_token=token
        )

    async def ReportDelivery(
        self, request: promotion_pb2.ReportDeliveryRequest, context: RpcContext
    ) -> promotion_pb2.ReportDeliveryResponse:
        return await self._campaigns.report_delivery(request, time_limit=self._time_limit(context))

    async def EndPromotion(
        self, request: promotion_pb2.EndPromotionRequest, context: RpcContext
    ) -> promotion_pb2.EndPromotionResponse:
        return await self._campaigns.end(request, time_limit=self._time_limit(context))
