"""How the payout service is put together."""

from __future__ import annotations

from pathlib import Path

from coins.payout.v1 import payout_pb2, payout_pb2_grpc
from ledger import Ledger
from ledger import api as ledger_api
from runtime.server import Runtime, ServiceSpec
from services.payout.api import ACCESS, PayoutApi
from services.payout.domain import Payouts
from services.payout.processor import SandboxProcessor, WithdrawalWorker
from services.payout.settings import PayoutSettings


async def setup(runtime: Runtime[PayoutSettings]) -> None:
    payouts = Payouts(runtime.settings, Ledger(runtime.clock, unit="diamonds"))
    worker = WithdrawalWorker(
        runtime, payouts, SandboxProcessor(runtime.settings.processor_latency_ms)
    )
    runtime.add_worker(worker.run)
    runtime.parts["payouts"] = payouts

    async def mature() -> int:
        matured = await payouts.mature(runtime.db.driver, runtime.clock.now())
        await payouts.repay_debts(runtime.db.driver)  # later diamonds repay reversal debts first
        return matured

    runtime.add_periodic(
        "matured gift credits",
        runtime.settings.maturation_every_seconds,
        mature,
        batch=runtime.settings.maturation_batch,
    )
    ledger_api.serve_ledger_audit(runtime, payouts.ledger)
    payout_pb2_grpc.add_PayoutServiceServicer_to_server(
        PayoutApi(runtime, payouts, worker.wake.set), runtime.server
    )


SPEC = ServiceSpec(
    name="payout",
    settings_type=PayoutSettings,
    error_domain="payout.coins",
    grpc_services=(
        payout_pb2.DESCRIPTOR.services_by_name["PayoutService"].full_name,
        ledger_api.FULL_NAME,
    ),
    migrations_dir=Path(__file__).parent / "migrations",
    setup=setup,
    access={**ACCESS, **ledger_api.ACCESS},
)
