"""How the payout service is put together."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from coins.payout.v1 import payout_pb2, payout_pb2_grpc
from ledger import Ledger
from ledger import api as ledger_api
from ledger import metrics as ledger_metrics
from ledger.entry_ids import load_entry_ids
from runtime.metrics import Gauges, attrs
from runtime.server import Runtime, ServiceSpec
from services.payout import storage
from services.payout.api import ACCESS, PayoutApi
from services.payout.callbacks import Callbacks
from services.payout.domain import Payouts
from services.payout.processor import WithdrawalWorker
from services.payout.reconciliation import Reconciler
from services.payout.sandbox import PayPalSandbox
from services.payout.settings import PayoutSettings
from services.payout.withdrawals import Withdrawals

WEBHOOKS_IDENTITY = "payout-webhooks"
OPEN = storage.OPEN_WITHDRAWAL_STATUSES


def sandbox(runtime: Runtime[PayoutSettings]) -> PayPalSandbox:
    """The PayPal-like sandbox, its callbacks relayed to this service as the webhook receiver
    (the `payout-webhooks` identity) would relay the real processor's."""
    settings = runtime.settings
    processor = PayPalSandbox(
        settings,
        runtime.clock,
        store_path=settings.sandbox_file or settings.data_dir / "sandbox-payouts.sqlite3",
    )
    stubs: list[Any] = []  # the async stub, made at the first callback (the port is bound then)

    async def deliver(body: bytes, signature: str) -> None:
        if not stubs:
            channel = runtime.channel(f"127.0.0.1:{runtime.port}", identity=WEBHOOKS_IDENTITY)
            stubs.append(payout_pb2_grpc.PayoutServiceStub(channel))
        await stubs[0].HandleProcessorEvent(
            payout_pb2.HandleProcessorEventRequest(body=body, signature=signature), timeout=10
        )

    processor.deliver = deliver
    return processor


async def setup(runtime: Runtime[PayoutSettings]) -> None:
    payouts = Payouts(runtime.settings, Ledger(runtime.clock, unit="diamonds"))
    withdrawals = Withdrawals(payouts)
    processor = sandbox(runtime)
    worker = WithdrawalWorker(runtime, withdrawals, processor)
    reconciler = Reconciler(runtime, processor)
    runtime.add_worker(worker.run)
    runtime.parts.update(
        payouts=payouts, withdrawals=withdrawals, processor=processor, worker=worker
    )

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
    runtime.add_periodic(
        "withdrawal reconciliation mismatches",
        runtime.settings.reconcile_every_seconds,
        reconciler.periodic,
        first_after=runtime.settings.reconcile_every_seconds,
    )
    callbacks = Callbacks(runtime, withdrawals, processor)
    runtime.add_periodic("forgotten processor events", 3600.0, callbacks.forget_old, batch=1000)
    ledger_api.serve_ledger_audit(runtime, payouts.ledger)
    _measure(runtime, payouts)
    payout_pb2_grpc.add_PayoutServiceServicer_to_server(
        PayoutApi(
            runtime,
            payouts,
            withdrawals,
            callbacks,
            reconciler,
            worker.wake.set,
            worker.received,
            await load_entry_ids(runtime.db),
        ),
        runtime.server,
    )


def _measure(runtime: Runtime[PayoutSettings], payouts: Payouts) -> None:
    """Payout's business metrics and gauges (runtime.metrics)."""
    ledger_metrics.instrument(
        runtime,
        payouts.ledger,
        {
            "gift": ("coins.diamonds.credited", "Diamonds credited to creators for gifts", {}),
            "withdrawal": ("coins.diamonds.paid_out", "Diamonds paid out by withdrawals", {}),
            "withdrawal_returned": (
                "coins.diamonds.returned",
                "Diamonds back in balances from withdrawals returned after payment",
                {},
            ),
            "reversal": ("coins.diamonds.reversed", "Diamonds taken back for reversed gifts", {}),
        },
        hold_kinds=("withdrawal",),
    )
    gauges = runtime.metrics.gauges
    gauges.declare("coins.withdrawals.open", "Withdrawals not yet ended, by status")
    gauges.declare(
        "coins.withdrawals.open_amount", "Gross amount of open withdrawals, by status", "{minor}"
    )
    gauges.declare("coins.withdrawals.parked", "Withdrawals parked for an operator")
    gauges.declare(
        "coins.withdrawals.processing_oldest_age",
        "Time since the oldest withdrawal with the processor (not parked) was first sent",
        "s",
    )
    gauges.declare(
        "coins.reconciliation.mismatches", "Mismatches the last withdrawal reconciliation found"
    )

    async def sample(gauges: Gauges) -> None:
        async with runtime.db.driver.read() as tx:
            now = await storage.payout_gauges(tx)
        gauges.set(
            "coins.withdrawals.open",
            {attrs(status=s): now.open_withdrawals.get(s, (0, 0))[0] for s in OPEN},
        )
        gauges.set(
            "coins.withdrawals.open_amount",
            {attrs(status=s): now.open_withdrawals.get(s, (0, 0))[1] for s in OPEN},
        )
        gauges.set("coins.withdrawals.parked", {(): now.parked})
        gauges.set_age(
            "coins.withdrawals.processing_oldest_age", now.oldest_processing, runtime.clock.now()
        )
        if now.reconciliation is not None:
            gauges.set(
                "coins.reconciliation.mismatches",
                {(): len(json.loads(now.reconciliation[1]))},
            )

    runtime.add_sampler(sample)


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
