"""How the wallet is put together: its spec for the shared runtime and its wiring."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from coins.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from ledger import Ledger
from ledger import api as ledger_api
from ledger import metrics as ledger_metrics
from ledger.entry_ids import load_entry_ids
from runtime.metrics import Gauges
from runtime.server import RECONCILE_PAGE, Runtime, ServiceSpec
from services.wallet import storage
from services.wallet.api import ACCESS, WalletApi
from services.wallet.domain import Wallet
from services.wallet.payments import SandboxPaymentProvider
from services.wallet.purchases import Purchases
from services.wallet.settings import WalletSettings

HOLD_SWEEP_PAGE = 200
"""Holds one sweep expires; a sweep that expires a full page runs again at once (add_periodic)."""


async def setup(runtime: Runtime[WalletSettings]) -> None:
    wallet = Wallet(runtime.settings, Ledger(runtime.clock, unit="coins"))
    payments = SandboxPaymentProvider(
        runtime.settings.payment_latency_ms,
        runtime.settings.sandbox_payments_file
        or runtime.settings.data_dir / "sandbox-payments.sqlite3",
    )

    settings = runtime.settings

    async def expire_holds() -> int:
        async with runtime.db.transaction() as conn:
            return await wallet.expire_holds(conn, limit=HOLD_SWEEP_PAGE)

    runtime.add_periodic(
        "expired holds", settings.hold_sweep_seconds, expire_holds, batch=HOLD_SWEEP_PAGE
    )
    purchases = Purchases(
        runtime.db,
        runtime.idempotency,
        runtime.clock,
        wallet,
        payments,
        charge_timeout=settings.payment_timeout_seconds,
    )
    runtime.parts["payments"] = payments
    stale = dt.timedelta(seconds=settings.reconcile_after_seconds)
    runtime.add_periodic(
        "reconciled purchases",
        settings.reconcile_every_seconds,
        lambda: purchases.reconcile(stale, limit=RECONCILE_PAGE),
        batch=RECONCILE_PAGE,
    )
    ledger_api.serve_ledger_audit(runtime, wallet.ledger)
    _measure(runtime, wallet)
    wallet_pb2_grpc.add_WalletServiceServicer_to_server(
        WalletApi(runtime, wallet, purchases, await load_entry_ids(runtime.db)), runtime.server
    )


def _measure(runtime: Runtime[WalletSettings], wallet: Wallet) -> None:
    """The wallet's business metrics and gauges (runtime.metrics)."""
    spent = "Coins spent, by purpose"
    ledger_metrics.instrument(
        runtime,
        wallet.ledger,
        {
            "purchase": ("coins.purchased", "Coins issued to buyers by completed purchases", {}),
            "gift": ("coins.spent", spent, {"purpose": "gift"}),
            "promotion": ("coins.spent", spent, {"purpose": "promotion"}),
        },
        hold_kinds=("promotion",),
    )
    gauges = runtime.metrics.gauges
    gauges.declare("coins.purchases.pending", "Purchases whose charge is not settled yet")
    gauges.declare("coins.purchases.pending_age", "Age of the oldest unsettled purchase", unit="s")

    async def sample(gauges: Gauges) -> None:
        async with runtime.db.driver.read() as tx:
            count, oldest = await storage.unsettled_purchases(tx)
        gauges.set("coins.purchases.pending", {(): count})
        gauges.set_age("coins.purchases.pending_age", oldest, runtime.clock.now())

    runtime.add_sampler(sample)


SPEC = ServiceSpec(
    name="wallet",
    settings_type=WalletSettings,
    error_domain="wallet.coins",
    grpc_services=(
        wallet_pb2.DESCRIPTOR.services_by_name["WalletService"].full_name,
        ledger_api.FULL_NAME,
    ),
    migrations_dir=Path(__file__).parent / "migrations",
    setup=setup,
    access={**ACCESS, **ledger_api.ACCESS},
)
