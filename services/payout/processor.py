"""The payment-processor port, its local sandbox, and the worker that pays pending withdrawals.

Paying happens off the request path: RequestWithdrawal takes the diamonds and answers PENDING; the worker
sends each withdrawal to the processor with the withdrawal id as the processor's idempotency key (so a
retry after a crash or a timeout never pays twice) and records the outcome.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Protocol

from runtime.server import Runtime, wait_for_wake
from services.payout import storage
from services.payout.domain import Payouts
from services.payout.settings import PayoutSettings

log = logging.getLogger("coins.payout.processor")


@dataclass(frozen=True)
class PayoutResult:
    paid: bool
    reference: str
    failure_reason: str = ""


class PayoutProcessor(Protocol):
    async def pay(
        self, *, idempotency_key: str, destination_token: str, amount_minor: int, currency: str
    ) -> PayoutResult: ...


class SandboxProcessor:
    """Like PayPal Payouts or a bank rail, locally: it takes time, and some destinations fail.

    Destinations starting `dest_fail` fail (`dest_fail_account_closed` gives that reason); others pay.
    """

    def __init__(self, latency_ms: int) -> None:
        self._latency = latency_ms / 1000
        self._results: dict[str, PayoutResult] = {}

    async def pay(
        self, *, idempotency_key: str, destination_token: str, amount_minor: int, currency: str
    ) -> PayoutResult:
        await asyncio.sleep(self._latency)
        if idempotency_key not in self._results:
            reference = f"sbx_po_{uuid.uuid4().hex[:16]}"
            if destination_token.startswith("dest_fail"):
                reason = destination_token.removeprefix("dest_fail").strip("_") or "payment_failed"
                self._results[idempotency_key] = PayoutResult(False, reference, reason)
            else:
                self._results[idempotency_key] = PayoutResult(True, reference)
        return self._results[idempotency_key]


class WithdrawalWorker:
    """Pays due withdrawals; woken at once by new requests, and every second to retry."""

    def __init__(
        self, runtime: Runtime[PayoutSettings], payouts: Payouts, processor: PayoutProcessor
    ) -> None:
        self._rt = runtime
        self._payouts = payouts
        self._processor = processor
        self.wake = asyncio.Event()

    async def run(self) -> None:
        while True:
            await wait_for_wake(self.wake, 1.0)
            await self.pay_due()

    async def pay_due(self) -> None:
        async with self._rt.db.read() as conn:
            due = await storage.due_withdrawals(conn, limit=50)
        for withdrawal in due:
            with self._rt.tracer.start_as_current_span("payout.pay_withdrawal") as span:
                span.set_attribute("coins.withdrawal_id", withdrawal.withdrawal_id)
                await self._pay(withdrawal)

    async def _pay(self, withdrawal: storage.WithdrawalRecord) -> None:
        clock = self._rt.clock
        if withdrawal.status == "pending":
            async with self._rt.db.transaction() as conn:
                await storage.move_withdrawal(
                    conn,
                    withdrawal.withdrawal_id,
                    from_status="pending",
                    to_status="processing",
                    now=clock.now(),
                )
        try:
            result = await self._processor.pay(
                idempotency_key=withdrawal.withdrawal_id,
                destination_token=withdrawal.destination_token,
                amount_minor=withdrawal.gross_minor - withdrawal.fee_minor,
                currency=withdrawal.currency_code,
            )
        except Exception:
            log.warning("processor call for %s failed; will retry", withdrawal.withdrawal_id)
            return
        async with self._rt.db.transaction() as conn:
            await self._payouts.settle(
                conn,
                withdrawal,
                paid=result.paid,
                processor_reference=result.reference,
                failure_reason=result.failure_reason,
                now=clock.now(),
            )
