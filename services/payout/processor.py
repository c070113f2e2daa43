"""The payout-processor port (shaped like PayPal Payouts) and the worker that sends approved
withdrawals and follows them to their outcome.

Sending is exactly once by the processor's idempotency key, the batch id (`sender_batch_id`, as
PayPal dedupes; the item's `sender_item_id` is the withdrawal id). Before a withdrawal is first sent
it is marked submitted with its batch id, in the same transaction that moves it to processing; from
then on a timeout or a lost answer is never followed by a blind resend: the worker looks the item up,
and if the processor has never heard of it sends the SAME batch again (the same batch id and the
same items, read back from the withdrawals that kept that id). A request that was only delayed, not
lost, then arrives as a repeat of a batch the processor already has and pays nothing more; and two
resends (two replicas, a lost answer) are one payment.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.backoff import backoff
from runtime.errors import Unavailable
from runtime.outages import RETRY_AFTER_SECONDS, log_failure
from runtime.server import Runtime, wait_for_wake
from runtime.telemetry import ITEMS, background_pass
from services.payout import storage
from services.payout.settings import PayoutSettings
from services.payout.withdrawals import Withdrawals

log = logging.getLogger("coins.payout.processor")

_OUTCOMES = {
    "SUCCESS": "paid",
    "FAILED": "failed",
    "DENIED": "failed",
    "BLOCKED": "failed",
    "RETURNED": "returned",
    "REFUNDED": "returned",
    "REVERSED": "returned",
}
"""The processor's final statuses; any other (PENDING, UNCLAIMED, ONHOLD, or one it adds later) is
still on its way and is asked about again."""


@dataclass(frozen=True)
class PayoutItem:
    """One payment to send."""

    sender_item_id: str
    """Our idempotency key: the withdrawal id."""
    receiver: str
    amount_minor: int
    currency: str


@dataclass(frozen=True)
class ItemStatus:
    """The processor's record of one payment."""

    sender_item_id: str
    payout_item_id: str
    status: str
    """PENDING, UNCLAIMED, ONHOLD (still in flight); SUCCESS; FAILED, DENIED, BLOCKED; RETURNED,
    REFUNDED, REVERSED (the money came back)."""
    amount_minor: int
    currency: str
    failure_reason: str
    updated_at: dt.datetime


def outcome_of(item: ItemStatus) -> str | None:
    """Our outcome for the processor's status: "paid", "failed", "returned"; None while in flight."""
    return _OUTCOMES.get(item.status)


async def record_outcome(
    withdrawals: Withdrawals,
    conn: AsyncConnection,
    withdrawal_id: str,
    item: ItemStatus,
    now: dt.datetime,
) -> storage.WithdrawalRecord:
    """Apply the outcome the processor's item tells (it has one: `outcome_of` is not None), with
    its item id and failure reason: the worker's follow-ups and return checks and the callbacks."""
    outcome = outcome_of(item)
    assert outcome is not None, item
    return await withdrawals.resolve(
        conn,
        withdrawal_id,
        outcome,
        processor_reference=item.payout_item_id,
        reason=item.failure_reason,
        now=now,
    )


class PayoutProcessor(Protocol):
    async def submit(self, sender_batch_id: str, items: Sequence[PayoutItem]) -> list[ItemStatus]:
        """Send a batch, once per `sender_batch_id`: a batch id seen before is answered with that
        batch's items and creates nothing. Items are not deduped (as at PayPal): the same
        sender_item_id in a new batch is a second payment."""
        ...

    async def lookup(self, sender_item_id: str) -> ItemStatus | None:
        """The processor's record of an item, None if it never received it."""
        ...

    async def items_since(self, since: dt.datetime) -> list[ItemStatus]:
        """Every item created since `since` (for reconciliation)."""
        ...


def resend_batch_id(withdrawal: storage.WithdrawalRecord) -> str:
    """The batch id a withdrawal is sent again under: the batch it was first sent in, so that the
    first request, if it was only delayed, and every resend are one batch at the processor. (A
    withdrawal submitted before batch ids were kept, migration 0015, has a batch id of its own.)"""
    return withdrawal.sender_batch_id or f"resend-{withdrawal.withdrawal_id}"


def item_of(withdrawal: storage.WithdrawalRecord) -> PayoutItem:
    return PayoutItem(
        withdrawal.withdrawal_id,
        withdrawal.destination_token,
        withdrawal.net_minor,
        withdrawal.currency_code,
    )


class WithdrawalWorker:
    """Sends approved withdrawals in batches and follows processing ones until they end.

    The worker shape every background worker here follows: each outside call has a timeout
    (`PAYOUT_PROCESSOR_TIMEOUT_SECONDS`); a failed call is counted on its withdrawals and retried
    after a capped, growing pause (1 s doubling to `PAYOUT_PROCESSOR_MAX_BACKOFF_SECONDS`); after
    `PAYOUT_PROCESSOR_MAX_ATTEMPTS` the withdrawal is parked where an admin sees it
    (ListWithdrawalQueue PARKED) and can retry it (RetryWithdrawal); calls run side by side
    (`PAYOUT_PROCESSOR_CALLS_AT_ONCE`), so one that hangs never holds up the rest. A parked
    withdrawal keeps its hold: its diamonds stay reserved until its outcome is known.
    """

    def __init__(
        self, runtime: Runtime[PayoutSettings], withdrawals: Withdrawals, processor: PayoutProcessor
    ) -> None:
        self._rt = runtime
        self._withdrawals = withdrawals
        self.processor = processor
        self.wake = asyncio.Event()
        self._calls = asyncio.Semaphore(runtime.settings.processor_calls_at_once)
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            while True:
                await wait_for_wake(self.wake, 1.0)
                await self.work_due()
        finally:
            for task in self._tasks:
                task.cancel()

    async def work_due(self) -> None:
        """Start work on what is due; each piece takes its withdrawals' lease only once it has a
        call slot, so a lease never runs out while the work waits its turn."""
        with background_pass(self._rt.tracer, "payout.processor.poll") as span:
            async with self._rt.db.read() as conn:
                due = await storage.due_withdrawals(conn, self._rt.clock.now(), limit=500)
            due = [w for w in due if w.withdrawal_id not in self._busy]
            span.set_attribute(ITEMS, len(due))
        fresh = [w for w in due if w.status == "approved"]
        for withdrawal in due:
            if withdrawal.status == "processing":
                self._spawn([withdrawal], self._follow_up(withdrawal))
            elif withdrawal.status == "paid":
                self._spawn([withdrawal], self._check_for_return(withdrawal))
        size = self._rt.settings.processor_batch_size
        for start in range(0, len(fresh), size):
            batch = fresh[start : start + size]
            self._spawn(batch, self._send(batch))

    def _spawn(
        self,
        withdrawals: Sequence[storage.WithdrawalRecord],
        work: Coroutine[Any, Any, None],
    ) -> None:
        ids = [w.withdrawal_id for w in withdrawals]
        self._busy.update(ids)

        async def traced() -> None:
            try:
                async with self._calls:
                    with self._rt.tracer.start_as_current_span("payout.processor") as span:
                        span.set_attribute("coins.withdrawal_ids", ids)
                        await work
            except Exception as error:
                log_failure(log, error, "processor work on %s failed; it is retried", ids)
            finally:
                self._busy.difference_update(ids)
                work.close()  # never started (cancelled at shutdown while waiting for a slot)

        task = asyncio.create_task(traced())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def _timeout(self) -> float:
        return self._rt.settings.processor_timeout_seconds

    def _lease_until(self) -> dt.datetime:
        """Long enough for the two calls a follow-up may make (a lookup and a resend)."""
        return self._rt.clock.now() + dt.timedelta(seconds=2 * self._timeout + 1)

    async def _send(self, batch: Sequence[storage.WithdrawalRecord]) -> None:
        """approved -> processing (the lease, and the batch id kept with each), then one submit."""
        batch_id = f"batch-{uuid.uuid4().hex}"
        now, until = self._rt.clock.now(), self._lease_until()
        async with self._rt.db.transaction() as conn:
            claimed = [
                w
                for w in batch
                if await self._withdrawals.start_processing(conn, w, now, until, batch_id)
            ]
        if not claimed:
            return
        try:
            items = await asyncio.wait_for(
                self.processor.submit(batch_id, [item_of(w) for w in claimed]), self._timeout
            )
        except Exception as error:
            await self._failed(claimed, error)
            return
        found = {item.sender_item_id: item for item in items}
        for withdrawal in claimed:
            item = found.get(withdrawal.withdrawal_id)
            if item is None:
                missing = LookupError(f"not in the processor's answer to batch {batch_id}")
                await self._failed([withdrawal], missing)
            else:
                await self._apply(withdrawal, item)

    async def _follow_up(self, withdrawal: storage.WithdrawalRecord) -> None:
        """Look a processing withdrawal up; send it again only if the processor has never heard of
        it, as the batch it was first sent in, whole (a processor dedupes batches by id and knows a
        batch whole or not at all, so the late original, a resend repeated by another worker and
        the resends of the batch's other withdrawals are all one payment each)."""
        async with self._rt.db.transaction() as conn:
            leased = await self._withdrawals.follow_up(
                conn, withdrawal.withdrawal_id, self._rt.clock.now(), self._lease_until()
            )
        if not leased:
            return
        try:
            item = await asyncio.wait_for(
                self.processor.lookup(withdrawal.withdrawal_id), self._timeout
            )
            if item is None:
                batch_id = resend_batch_id(withdrawal)
                log.info(
                    "processor has no item %s: sending its batch %s again",
                    withdrawal.withdrawal_id,
                    batch_id,
                )
                async with self._rt.db.read() as conn:
                    batch = await storage.withdrawals_in_batch(conn, batch_id)
                # Only what is still processing and not parked: a parked one is in an admin's
                # hands, who may be giving it up as never received at this moment (resent with
                # this one, it was paid after it was cancelled).
                resend = [
                    item_of(w)
                    for w in batch
                    if w.status == "processing"
                    and (w.parked_at is None or w.withdrawal_id == withdrawal.withdrawal_id)
                ] or [item_of(withdrawal)]
                items = await asyncio.wait_for(
                    self.processor.submit(batch_id, resend), self._timeout
                )
                item = next(
                    (i for i in items if i.sender_item_id == withdrawal.withdrawal_id), None
                )
                if item is None:
                    item = await self._send_alone(withdrawal)
        except Exception as error:
            await self._failed([withdrawal], error)
            return
        await self._apply(withdrawal, item)

    async def _send_alone(self, withdrawal: storage.WithdrawalRecord) -> ItemStatus:
        """The processor has the withdrawal's batch without it (the batch went again while it was
        parked): it can never join that batch, so it goes in one of its own, whose id is the same
        on every attempt (a batch id the processor has seen pays nothing more)."""
        alone = f"alone-{withdrawal.withdrawal_id}"
        log.info(
            "processor has batch %s without %s: sending it alone as %s",
            withdrawal.sender_batch_id,
            withdrawal.withdrawal_id,
            alone,
        )
        async with self._rt.db.transaction() as conn:
            await storage.send_alone(conn, withdrawal.withdrawal_id, alone)
        items = await asyncio.wait_for(
            self.processor.submit(alone, [item_of(withdrawal)]), self._timeout
        )
        item = next((i for i in items if i.sender_item_id == withdrawal.withdrawal_id), None)
        if item is None:
            raise LookupError(f"not in the processor's answer to batch {alone}")
        return item

    async def received(self, withdrawal_id: str) -> bool:
        """Whether the processor has a record of the withdrawal, asked now (UNAVAILABLE
        PROCESSOR_UNAVAILABLE when it does not answer): an admin may cancel a parked withdrawal
        only once the processor says it never received it."""
        try:
            item = await asyncio.wait_for(self.processor.lookup(withdrawal_id), self._timeout)
        except Exception as error:
            raise Unavailable(
                "PROCESSOR_UNAVAILABLE",
                f"could not ask the processor about withdrawal {withdrawal_id} "
                f"({type(error).__name__}): try again",
                retry_after=RETRY_AFTER_SECONDS,
                withdrawal_id=withdrawal_id,
            ) from None
        return item is not None

    async def _check_for_return(self, withdrawal: storage.WithdrawalRecord) -> None:
        """Look a paid withdrawal up again while it is watched (`PAYOUT_RETURN_WATCH_DAYS`): a
        return whose callback was lost (the process sending it died) still gives the diamonds
        back. A failed lookup is simply tried at the next poll: nothing waits on it."""
        settings, now = self._rt.settings, self._rt.clock.now()
        watched_until = withdrawal.updated_at + dt.timedelta(days=settings.return_watch_days)
        next_at = now + dt.timedelta(seconds=settings.return_poll_seconds)
        async with self._rt.db.transaction() as conn:
            if not await storage.watch_for_return(
                conn, withdrawal.withdrawal_id, next_at, due_by=now
            ):
                return
        try:
            item = await asyncio.wait_for(
                self.processor.lookup(withdrawal.withdrawal_id), self._timeout
            )
        except Exception as error:
            log.info(
                "return check of paid %s failed (%s); next poll", withdrawal.withdrawal_id, error
            )
            return
        outcome = None if item is None else outcome_of(item)
        async with self._rt.db.transaction() as conn:
            if item is not None and outcome in ("failed", "returned"):
                log.info(
                    "paid withdrawal %s was returned by the processor", withdrawal.withdrawal_id
                )
                await record_outcome(self._withdrawals, conn, withdrawal.withdrawal_id, item, now)
            elif next_at >= watched_until:
                await storage.watch_for_return(conn, withdrawal.withdrawal_id, None)

    async def _apply(self, withdrawal: storage.WithdrawalRecord, item: ItemStatus) -> None:
        """Record the processor's answer: an outcome ends the withdrawal; in flight, it is looked
        up again after `PAYOUT_PROCESSOR_POLL_SECONDS` (a callback usually comes first). A failure
        to record it counts as a failed attempt."""
        now = self._rt.clock.now()
        outcome = outcome_of(item)
        try:
            async with self._rt.db.transaction() as conn:
                if outcome is not None:
                    await record_outcome(
                        self._withdrawals, conn, withdrawal.withdrawal_id, item, now
                    )
                else:
                    poll = dt.timedelta(seconds=self._rt.settings.processor_poll_seconds)
                    await self._withdrawals.still_on_its_way(
                        conn, withdrawal.withdrawal_id, now + poll
                    )
        except Exception as error:
            await self._failed([withdrawal], error)

    async def _failed(
        self, withdrawals: Sequence[storage.WithdrawalRecord], error: Exception
    ) -> None:
        settings, now = self._rt.settings, self._rt.clock.now()
        why = "timed out" if isinstance(error, TimeoutError) else type(error).__name__
        # The failure on the work's trace, where an SRE searching for errors finds it (its log
        # lines alone told it; review r24).
        span = trace.get_current_span()
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"processor call {why}"))
        span.set_attribute(
            "coins.reason",
            "PROCESSOR_TIMEOUT" if isinstance(error, TimeoutError) else "PROCESSOR_FAILED",
        )
        async with self._rt.db.transaction() as conn:
            for withdrawal in withdrawals:
                attempts = withdrawal.attempts + 1
                pause = backoff(attempts, first=1.0, cap=settings.processor_max_backoff_seconds)
                parked = attempts >= settings.processor_max_attempts
                log.warning(
                    "processor call for %s %s (attempt %d); %s",
                    withdrawal.withdrawal_id,
                    why,
                    attempts,
                    "parked for an admin" if parked else f"retrying in {pause:.0f}s",
                )
                await self._withdrawals.attempt_failed(
                    conn,
                    withdrawal.withdrawal_id,
                    retry_at=now + dt.timedelta(seconds=pause),
                    error=f"{why}: {str(error) or f'no answer within {self._timeout:g}s'}",
                    park_at=now if parked else None,
                )
