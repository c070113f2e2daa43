"""The relay that delivers queued diamond credits to the payout service (transactional outbox).

A credit is written in the same transaction that records the gift's debit, so it can never be lost; the
relay delivers it until payout acknowledges it, and payout applies it once (its request id is the gift's).
Delivery is off the gift's request path: SendGift answers after the debit, and the relay, woken at once,
lingers `relay_linger_seconds` (0.05) for more credits to join the batch, then credits the creator.

Credits travel in batches: everything due (up to `relay_batch_size`) goes in one BatchCreditDiamonds
call, which payout applies in one transaction, and is marked delivered, its coins added to the
creators' rankings (one row per creator and period, however many of its gifts the batch holds), in
one transaction of four statements. Under load a
batch simply grows while the previous one is in flight, so the cost per credit falls as the rate rises.
A batch refused for good is split into single credits, so one bad credit never holds back the others;
a credit refused on its own is parked (dead) for an operator, and transient failures back off.

Tracing: a batch's delivery span continues the trace of its first gift and links every other gift's
trace (OpenTelemetry's batch pattern), so a gift's trace reaches the payout span that credited it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from opentelemetry import propagate, trace
from opentelemetry.trace import Link

from runtime.backoff import backoff
from runtime.errors import DomainError, ErrorKind
from runtime.server import Runtime, wait_for_wake
from runtime.sql import is_transient
from runtime.telemetry import ITEMS, background_pass
from services.gifting import storage
from services.gifting.domain import DiamondCrediter, PendingCredit
from services.gifting.settings import GiftingSettings

log = logging.getLogger("coins.gifting.outbox")
_CONFIGURATION_FAULTS = (ErrorKind.PERMISSION_DENIED, ErrorKind.UNAUTHENTICATED)
_LISTED = 500
"""Gift ids a delivery span lists: a whole batch at the default `relay_batch_size`."""


def _context(item: storage.OutboxRecord) -> trace.SpanContext:
    ctx = propagate.extract({"traceparent": item.traceparent} if item.traceparent else {})
    return trace.get_current_span(ctx).get_span_context()


class CreditRelay:
    def __init__(self, runtime: Runtime[GiftingSettings], payout: DiamondCrediter) -> None:
        self._rt = runtime
        self._payout = payout
        self.wake = asyncio.Event()

    async def run(self) -> None:
        while True:
            await wait_for_wake(self.wake, 0.5)
            if self._rt.settings.relay_linger_seconds > 0:
                await asyncio.sleep(self._rt.settings.relay_linger_seconds)
            while await self.deliver_due() == self._rt.settings.relay_batch_size:
                pass  # a full batch: there may be more waiting

    async def deliver_due(self) -> int:
        """Deliver the credits that are due now (one batch, claimed by this relay for a lease
        longer than a delivery may take); returns how many were attempted."""
        now = self._rt.clock.now()
        lease = dt.timedelta(seconds=self._rt.settings.downstream_timeout_seconds + 2)
        with background_pass(self._rt.tracer, "gifting.credit_outbox.claim") as span:
            async with self._rt.db.driver.transaction(single_statement=True) as tx:
                due = await storage.claim_due_credits(
                    tx, now, self._rt.settings.relay_batch_size, now + lease
                )
            span.set_attribute(ITEMS, len(due))
        if due:
            await self._deliver(due)
        return len(due)

    async def _deliver(self, items: list[storage.OutboxRecord]) -> None:
        first = propagate.extract(
            {"traceparent": items[0].traceparent} if items[0].traceparent else {}
        )
        links = [Link(_context(item)) for item in items[1:] if item.traceparent]
        with self._rt.tracer.start_as_current_span(
            "gifting.credit_outbox.deliver",
            context=first,
            kind=trace.SpanKind.PRODUCER,
            links=links,
        ) as span:
            span.set_attribute("coins.credits", len(items))
            span.set_attribute("coins.sent_gift_id", items[0].sent_gift_id)
            # Every gift's id: a ticket naming any gift of the batch finds its delivery.
            span.set_attribute("coins.sent_gift_ids", [i.sent_gift_id for i in items[:_LISTED]])
            span.set_attribute("coins.attempt", max(item.attempts for item in items) + 1)
            try:
                diamonds = await self._payout.credit_gifts(
                    [PendingCredit(i.sent_gift_id, i.creator_id, i.coins) for i in items],
                    time_limit=self._rt.settings.downstream_timeout_seconds,
                )
            except DomainError as error:
                span.set_status(trace.Status(trace.StatusCode.ERROR, error.reason))
                span.set_attribute("coins.reason", error.reason)
                if not error.retryable and len(items) > 1:
                    log.warning(
                        "a batch of %d credits was refused (%s); delivering them one by one",
                        len(items),
                        error.reason,
                    )
                    for item in items:
                        await self._deliver([item])
                    return
                await self._retry_later(items, error)
                return
            for attempt in range(1, 4):
                try:
                    async with self._rt.db.driver.transaction() as tx:
                        await storage.mark_delivered(tx, items, self._rt.clock.now(), diamonds)
                    break
                except Exception as error:
                    # Payout has the credits: marking them is worth another go at once (a
                    # redelivery after the lease would also be answered, but later).
                    if not is_transient(error) or attempt == 3:
                        raise
                    log.info("marking %d credits delivered: %r; again", len(items), error)

    async def _retry_later(self, items: list[storage.OutboxRecord], error: DomainError) -> None:
        # A business refusal will not change on retry: park it (dead) and say so loudly. A refusal
        # of *us* (certificate, access rule, token) is a configuration fault an operator fixes:
        # keep retrying, so the credits flow again once it is fixed.
        dead = not error.retryable and error.kind not in _CONFIGURATION_FAULTS
        if dead:  # each parked credit by name: an operator looks at each
            for item in items:
                log.error("credit for gift %s refused by payout: %r", item.sent_gift_id, error)
        else:  # one line per batch, not per gift: an outage of payout would flood the log
            log.warning(
                "%d credits not delivered (%s; first: gift %s, attempt %d); retrying",
                len(items),
                error.reason,
                items[0].sent_gift_id,
                max(item.attempts for item in items) + 1,
            )
        now, cap = self._rt.clock.now(), self._rt.settings.relay_max_backoff_seconds
        retry_at = {
            item.outbox_id: now
            + dt.timedelta(seconds=backoff(item.attempts + 1, first=0.1, cap=cap))
            for item in items
        }
        async with self._rt.db.transaction() as conn:
            await storage.mark_failed_attempts(
                conn, retry_at, error=f"{error.reason}: {error.message}", dead=dead
            )
