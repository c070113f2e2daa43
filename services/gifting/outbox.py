"""The relay that delivers queued diamond credits to the payout service (transactional outbox).

A credit is written in the same transaction that records the gift's debit, so it can never be lost; the
relay delivers it until payout acknowledges it, and payout applies it once (its request id is the gift's).
Delivery is off the gift's request path: SendGift answers after the debit, and the relay, woken at once,
credits the creator a few milliseconds later. Each delivery continues the gift's trace.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from opentelemetry import propagate, trace

from runtime.errors import DomainError
from runtime.server import Runtime, wait_for_wake
from services.gifting import storage
from services.gifting.domain import DiamondCrediter
from services.gifting.settings import GiftingSettings

log = logging.getLogger("coins.gifting.outbox")


class CreditRelay:
    def __init__(self, runtime: Runtime[GiftingSettings], payout: DiamondCrediter) -> None:
        self._rt = runtime
        self._payout = payout
        self._limit = asyncio.Semaphore(runtime.settings.relay_concurrency)
        self.wake = asyncio.Event()

    async def run(self) -> None:
        while True:
            await wait_for_wake(self.wake, 0.5)
            while await self.deliver_due() == self._rt.settings.relay_batch_size:
                pass  # a full batch: there may be more waiting

    async def deliver_due(self) -> int:
        """Deliver every credit that is due now; returns how many were attempted."""
        async with self._rt.db.read() as conn:
            due = await storage.due_credits(
                conn, self._rt.clock.now(), self._rt.settings.relay_batch_size
            )
        await asyncio.gather(*(self._deliver(item) for item in due))
        return len(due)

    async def _deliver(self, item: storage.OutboxRecord) -> None:
        parent = propagate.extract({"traceparent": item.traceparent} if item.traceparent else {})
        async with self._limit:
            with self._rt.tracer.start_as_current_span(
                "gifting.credit_outbox.deliver", context=parent, kind=trace.SpanKind.PRODUCER
            ) as span:
                span.set_attribute("coins.sent_gift_id", item.sent_gift_id)
                span.set_attribute("coins.attempt", item.attempts + 1)
                try:
                    await self._payout.credit_for_gift(
                        sent_gift_id=item.sent_gift_id,
                        creator_id=item.creator_id,
                        coins=item.coins,
                        time_limit=self._rt.settings.downstream_timeout_seconds,
                    )
                except DomainError as error:
                    await self._retry_later(item, error)
                    return
                now = self._rt.clock.now()
                async with self._rt.db.transaction() as conn:
                    await storage.mark_delivered(conn, item.outbox_id, now)
                    await storage.move_sent_gift(
                        conn,
                        item.sent_gift_id,
                        from_status="debited",
                        to_status="credited",
                        now=now,
                    )

    async def _retry_later(self, item: storage.OutboxRecord, error: DomainError) -> None:
        # A business refusal will not change on retry: park it (dead) and say so loudly.
        dead = not error.retryable
        delay = min(self._rt.settings.relay_max_backoff_seconds, 0.1 * 2**item.attempts)
        if dead:
            log.error("credit for gift %s refused by payout: %r", item.sent_gift_id, error)
        else:
            log.warning(
                "credit for gift %s not delivered (%s); retrying", item.sent_gift_id, error.reason
            )
        async with self._rt.db.transaction() as conn:
            await storage.mark_failed_attempt(
                conn,
                item.outbox_id,
                retry_at=self._rt.clock.now() + dt.timedelta(seconds=delay),
                error=f"{error.reason}: {error.message}",
                dead=dead,
            )
