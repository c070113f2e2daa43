"""How the promotion service is put together."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from coins.promotion.v1 import promotion_pb2, promotion_pb2_grpc
from runtime.server import Runtime, ServiceSpec
from services.promotion.api import ACCESS, PromotionApi
from services.promotion.campaigns import Campaigns
from services.promotion.clients import WalletBudget
from services.promotion.domain import Promotions
from services.promotion.reconciler import PromotionReconciler
from services.promotion.settings import PromotionSettings


async def setup(runtime: Runtime[PromotionSettings]) -> None:
    wallet = WalletBudget(runtime.channel(runtime.settings.wallet_address))
    promotions = Promotions()
    reconciler = PromotionReconciler(runtime, promotions, wallet)
    stale = dt.timedelta(seconds=runtime.settings.reconcile_after_seconds)
    runtime.add_periodic(
        "settled pending promotions",
        runtime.settings.reconcile_every_seconds,
        lambda: reconciler.reconcile(stale),
    )
    campaigns = Campaigns(runtime.db, runtime.idempotency, runtime.clock, promotions, wallet)
    runtime.add_periodic(
        "counted lost delivery captures",
        runtime.settings.reconcile_every_seconds,
        lambda: campaigns.reconcile_captures(
            stale, time_limit=runtime.settings.downstream_timeout_seconds
        ),
    )
    promotion_pb2_grpc.add_PromotionServiceServicer_to_server(
        PromotionApi(runtime, campaigns),
        runtime.server,
    )


SPEC = ServiceSpec(
    name="promotion",
    settings_type=PromotionSettings,
    error_domain="promotion.coins",
    grpc_services=(promotion_pb2.DESCRIPTOR.services_by_name["PromotionService"].full_name,),
    migrations_dir=Path(__file__).parent / "migrations",
    setup=setup,
    access=ACCESS,
)
