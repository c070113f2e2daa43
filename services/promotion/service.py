"""How the promotion service is put together."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from coins.promotion.v1 import promotion_pb2, promotion_pb2_grpc
from runtime.metrics import Gauges, attrs
from runtime.server import RECONCILE_PAGE, Runtime, ServiceSpec
from services.promotion import storage
from services.promotion.api import ACCESS, PromotionApi
from services.promotion.campaigns import Campaigns
from services.promotion.clients import WalletBudget
from services.promotion.domain import Promotions
from services.promotion.reconciler import PromotionReconciler
from services.promotion.settings import PromotionSettings


async def setup(runtime: Runtime[PromotionSettings]) -> None:
    wallet = WalletBudget(runtime.channel(runtime.settings.wallet_address, peer="wallet"))
    promotions = Promotions()
    reconciler = PromotionReconciler(runtime, promotions, wallet)
    stale = dt.timedelta(seconds=runtime.settings.reconcile_after_seconds)
    runtime.add_periodic(
        "settled pending promotions",
        runtime.settings.reconcile_every_seconds,
        lambda: reconciler.reconcile(stale, limit=RECONCILE_PAGE),
        batch=RECONCILE_PAGE,
    )
    campaigns = Campaigns(runtime.db, runtime.idempotency, runtime.clock, promotions, wallet)
    runtime.add_periodic(
        "counted lost delivery captures",
        runtime.settings.reconcile_every_seconds,
        lambda: campaigns.reconcile_captures(
            stale, time_limit=runtime.settings.downstream_timeout_seconds, limit=RECONCILE_PAGE
        ),
        batch=RECONCILE_PAGE,
    )
    runtime.add_periodic(
        "finished abandoned ends",
        runtime.settings.reconcile_every_seconds,
        lambda: campaigns.finish_abandoned_ends(
            stale, time_limit=runtime.settings.downstream_timeout_seconds, limit=RECONCILE_PAGE
        ),
        batch=RECONCILE_PAGE,
    )
    _measure(runtime)
    promotion_pb2_grpc.add_PromotionServiceServicer_to_server(
        PromotionApi(runtime, campaigns),
        runtime.server,
    )


def _measure(runtime: Runtime[PromotionSettings]) -> None:
    """Promotion's gauges (runtime.metrics); the coins it spends are counted where they move, in
    the wallet (coins.spent, purpose promotion)."""
    gauges = runtime.metrics.gauges
    gauges.declare("coins.promotions.open", "Promotions pending or active, by status")
    gauges.declare("coins.promotions.pending_captures", "Deliveries whose capture is unconfirmed")
    gauges.declare(
        "coins.promotions.pending_captures_age", "Age of the oldest unconfirmed capture", "s"
    )

    async def sample(gauges: Gauges) -> None:
        async with runtime.db.driver.read() as tx:
            by_status, captures, oldest = await storage.promotion_gauges(tx)
        gauges.set(
            "coins.promotions.open",
            {attrs(status=s): by_status.get(s, 0) for s in ("pending", "active")},
        )
        gauges.set("coins.promotions.pending_captures", {(): captures})
        gauges.set_age("coins.promotions.pending_captures_age", oldest, runtime.clock.now())

    runtime.add_sampler(sample)


SPEC = ServiceSpec(
    name="promotion",
    settings_type=PromotionSettings,
    error_domain="promotion.coins",
    grpc_services=(promotion_pb2.DESCRIPTOR.services_by_name["PromotionService"].full_name,),
    migrations_dir=Path(__file__).parent / "migrations",
    setup=setup,
    access=ACCESS,
)
