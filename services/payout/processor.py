"""The payment-processor port, its local sandbox, and the worker that pays pending withdrawals.

Paying happens off the request path: RequestWithdrawal takes the diamonds and answers PENDING; the worker
sends each withdrawal to the processor with the withdrawal id as the processor's idempotency key (so a
retry after a crash or a timeout never pays twice) and records the outcome.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from dataclasses import dataclass
from typing import Protocol

from runtime.backoff import backoff
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

    Destinations starting `dest_fail` fail (`dest_fail_account_closed` gives that reason); those
    starting `dest_hang` never answer (a hung processor call); others pay. PayPal emails work alike:
    `fail…@` fails, `hang…@` hangs.
    """

    def __init__(self, latency_ms: int) -> None:
        self._latency = latency_ms / 1000
        self._results: dict[str, PayoutResult] = {}

    async def pay(
        self, *, idempotency_key: str, destination_token: str, amount_minor: int, currency: str
    ) -> PayoutResult:
        await asyncio.sleep(self._latency)
        if destination_token.startswith(("dest_hang", "hang")):
            await asyncio.Event().wait()  # forever: the worker's timeout must end it
        if idempotency_key not in self._results:
            reference = f"sbx_po_{uuid.uuid4().hex[:16]}"
            if destination_token.startswith(("dest_fail", "fail")):
                reason = destination_token.removeprefix("dest_fail").strip("_") or "payment_failed"
                self._results[idempotency_key] = PayoutResult(False, reference, reason)
            else:
                self._results[idempotency_key] = PayoutResult(True, reference)
        return self._results[idempotency_key]


class WithdrawalWorker:
    """Pays due withdrawals; woken at once by new requests, and every second for retries.

    The worker shape every background worker here follows: each outside call has a timeout
    (`PAYOUT_PROCESSOR_TIMEOUT_SECONDS`), a failed call is counted on its withdrawal and retried after
    a capped, growing pause (1 s doubling to `PAYOUT_PROCESSOR_MAX_BACKOFF_SECONDS`), and withdrawals
    are paid side by side (`PAYOUT_PROCESSOR_CALLS_AT_ONCE`), so one that hangs never holds up the rest.
    A withdrawal is never given up: its diamonds are held until the processor answers.
    """

    def __init__(
        self, runtime: Runtime[PayoutSettings], payouts: Payouts, processor: PayoutProcessor
    ) -> None:
        self._rt = runtime
        self._payouts = payouts
        self._processor = processor
        self.wake = asyncio.Event()
        self._calls = asyncio.Semaphore(runtime.settings.processor_calls_at_once)
        self._paying: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            while True:
                await wait_for_wake(self.wake, 1.0)
                await self.pay_due()
        finally:
            for task in self._tasks:
                task.cancel()

    async def pay_due(self) -> None:
        async with self._rt.db.read() as conn:
            due = await storage.due_withdrawals(conn, self._rt.clock.now(), limit=50)
        for withdrawal in due:
            if withdrawal.withdrawal_id in self._paying:
                continue  # still with the processor
            self._paying.add(withdrawal.withdrawal_id)
            task = asyncio.create_task(self._pay_traced(withdrawal))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pay_traced(self, withdrawal: storage.WithdrawalRecord) -> None:
        try:
            async with self._calls:
                with self._rt.tracer.start_as_current_span("payout.pay_withdrawal") as span:
                    span.set_attribute("coins.withdrawal_id", withdrawal.withdrawal_id)
                    span.set_attribute("coins.attempt", withdrawal.attempts + 1)
                    await self._pay(withdrawal)
        except Exception:
            log.exception("paying withdrawal %s failed; retrying", withdrawal.withdrawal_id)
        finally:
            self._paying.discard(withdrawal.withdrawal_id)

    async def _pay(self, withdrawal: storage.WithdrawalRecord) -> None:
        clock, settings = self._rt.clock, self._rt.settings
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
            result = await asyncio.wait_for(
                self._processor.pay(
                    idempotency_key=withdrawal.withdrawal_id,
                    destination_token=withdrawal.destination_token,
                    amount_minor=withdrawal.gross_minor - withdrawal.fee_minor,
                    currency=withdrawal.currency_code,
                ),
                timeout=settings.processor_timeout_seconds,
            )
        except Exception as error:
            attempts = withdrawal.attempts + 1
            pause = backoff(attempts, first=1.0, cap=settings.processor_max_backoff_seconds)
            why = "timed out" if isinstance(error, TimeoutError) else type(error).__name__
            log.warning(
                "processor call for %s %s (attempt %d); retrying in %.0fs",
                withdrawal.withdrawal_id,
                why,
                attempts,
                pause,
            )
            async with self._rt.db.transaction() as conn:
                await storage.note_failed_attempt(
                    conn,
                    withdrawal.withdrawal_id,
                    retry_at=clock.now() + dt.timedelta(seconds=pause),
                    error=f"{why}: {error}",
                )
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
