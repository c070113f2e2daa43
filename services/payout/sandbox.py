"""A local simulation of a PayPal-Payouts-like processor: no money moves, nothing leaves the machine.

What it simulates, so that the payout path meets the real thing's behaviour here:
- batches of items, created once per `sender_batch_id` (the idempotency key, as at PayPal); a
  batch id seen before is answered with its items; an item is *not* deduped by its
  `sender_item_id`: sent again in a new batch it is paid again (counted in `payments`, logged as
  an error), so a test sees any double payment the worker would cause;
- every call takes `PAYOUT_PROCESSOR_LATENCY_MS`; items settle `PAYOUT_PROCESSOR_SETTLE_MS` after
  submission;
- outcomes chosen by the receiver (a PayPal email or a bank token), so tests and demos pick them:
  `fail…` fails (`dest_fail_account_closed` with that reason), `unclaimed…` stays UNCLAIMED and is
  returned after `PAYOUT_PROCESSOR_UNCLAIMED_RETURN_MS`, `returned…` succeeds and is returned after
  that long (failure after success), `hang…` records the items and then never answers (a lost
  answer), `drop…` never answers and records nothing (a lost request); anything else succeeds;
- callbacks (webhook events) for every status change, signed with HMAC-SHA256, each delivered after
  a random delay (so out of order), `PAYOUT_PROCESSOR_DUPLICATE_CALLBACK_PERCENT` of them twice, and
  redelivered with backoff while our endpoint fails, as PayPal does.

Its records live in memory: a restart of payout forgets them, as if the processor had never received
what it was sent, and the worker (which looks items up before any resend) sends them again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import logging
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from runtime.backoff import backoff
from runtime.clock import Clock
from services.payout.processor import ItemStatus, PayoutItem
from services.payout.settings import PayoutSettings

log = logging.getLogger("coins.payout.sandbox")

Deliver = Callable[[bytes, str], Awaitable[None]]
"""Sends one callback (body, signature) to our webhook endpoint; raises if it was not accepted."""

EVENT_TYPES = {
    "PENDING": "PAYMENT.PAYOUTS-ITEM.PENDING",
    "UNCLAIMED": "PAYMENT.PAYOUTS-ITEM.UNCLAIMED",
    "SUCCESS": "PAYMENT.PAYOUTS-ITEM.SUCCEEDED",
    "FAILED": "PAYMENT.PAYOUTS-ITEM.FAILED",
    "RETURNED": "PAYMENT.PAYOUTS-ITEM.RETURNED",
}


def sign(secret: bytes, body: bytes) -> str:
    """The callback signature: lowercase hex HMAC-SHA256 of the body."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class SandboxItem:
    item: ItemStatus
    receiver: str
    batch_id: str


class PayPalSandbox:
    def __init__(self, settings: PayoutSettings, clock: Clock, seed: int | None = None) -> None:
        self._settings = settings
        self._clock = clock
        self._random = random.Random(seed)
        self._items: dict[str, SandboxItem] = {}
        """The first item created for each sender_item_id (what lookups answer)."""
        self._batches: dict[str, list[ItemStatus]] = {}
        self.payments: Counter[str] = Counter()
        """Items created per sender_item_id: more than 1 is a double payment."""
        self._tasks: set[asyncio.Task[None]] = set()
        self.deliver: Deliver | None = None
        """Where callbacks go (set once the service listens); None: callbacks are not sent."""
        self.delivered = 0
        """Callbacks our endpoint accepted (duplicates included)."""

    @property
    def _secret(self) -> bytes:
        return self._settings.processor_webhook_secret.get_secret_value().encode()

    async def _latency(self) -> None:
        await asyncio.sleep(self._settings.processor_latency_ms / 1000)

    async def submit(self, sender_batch_id: str, items: Sequence[PayoutItem]) -> list[ItemStatus]:
        await self._latency()
        if any(i.receiver.startswith(("drop", "dest_drop")) for i in items):
            await asyncio.Event().wait()  # the request is lost: nothing recorded, no answer
        if sender_batch_id not in self._batches:
            self._batches[sender_batch_id] = [self._create(i, sender_batch_id) for i in items]
        answer = [self._items[i.sender_item_id].item for i in self._batches[sender_batch_id]]
        if any(i.receiver.startswith(("hang", "dest_hang")) for i in items):
            await asyncio.Event().wait()  # recorded, but the answer is lost
        return answer

    def arrive_late(self, sender_batch_id: str, items: Sequence[PayoutItem]) -> None:
        """A request that was lost on its way arrives after all (tests): recorded, called back."""
        if sender_batch_id not in self._batches:
            self._batches[sender_batch_id] = [self._create(i, sender_batch_id) for i in items]

    async def lookup(self, sender_item_id: str) -> ItemStatus | None:
        await self._latency()
        found = self._items.get(sender_item_id)
        return None if found is None else found.item

    async def items_since(self, since: dt.datetime) -> list[ItemStatus]:
        await self._latency()
        return [s.item for s in self._items.values() if s.item.updated_at >= since]

    def _create(self, payout: PayoutItem, batch_id: str) -> ItemStatus:
        self.payments[payout.sender_item_id] += 1
        if payout.sender_item_id in self._items:
            log.error(
                "sandbox: item %s paid AGAIN in batch %s (a double payment)",
                payout.sender_item_id,
                batch_id,
            )
            return self._items[payout.sender_item_id].item
        item = ItemStatus(
            sender_item_id=payout.sender_item_id,
            payout_item_id=f"SBXITEM{uuid.uuid4().hex[:17].upper()}",
            status="PENDING",
            amount_minor=payout.amount_minor,
            currency=payout.currency,
            failure_reason="",
            updated_at=self._clock.now(),
        )
        self._items[payout.sender_item_id] = SandboxItem(item, payout.receiver, batch_id)
        self._background(self._progress(payout.sender_item_id))
        return item

    def _background(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _progress(self, sender_item_id: str) -> None:
        """The item's life at the processor, by its receiver."""
        settings = self._settings
        receiver = self._items[sender_item_id].receiver.removeprefix("dest_")
        self._emit(sender_item_id)
        await asyncio.sleep(settings.processor_settle_ms / 1000)
        if receiver.startswith("fail"):
            reason = receiver.removeprefix("fail").strip("_").split("@")[0] or "payment_failed"
            self.set_status(sender_item_id, "FAILED", reason)
        elif receiver.startswith("unclaimed"):
            self.set_status(sender_item_id, "UNCLAIMED")
            await asyncio.sleep(settings.processor_unclaimed_return_ms / 1000)
            self.set_status(sender_item_id, "RETURNED", "unclaimed: returned to the sender")
        elif receiver.startswith("returned"):
            self.set_status(sender_item_id, "SUCCESS")
            await asyncio.sleep(settings.processor_unclaimed_return_ms / 1000)
            self.set_status(sender_item_id, "RETURNED", "returned by the receiver's provider")
        else:
            self.set_status(sender_item_id, "SUCCESS")

    def set_status(
        self,
        sender_item_id: str,
        status: str,
        reason: str = "",
        *,
        amount_minor: int | None = None,
        notify: bool = True,
    ) -> None:
        """Change an item at the processor and (unless `notify` is False: a lost callback) send its
        callback. Tests use it to break things: a payment reversed, an amount that differs."""
        current = self._items[sender_item_id]
        item = replace(
            current.item,
            status=status,
            failure_reason=reason,
            updated_at=self._clock.now(),
            amount_minor=current.item.amount_minor if amount_minor is None else amount_minor,
        )
        self._items[sender_item_id] = replace(current, item=item)
        if notify:
            self._emit(sender_item_id)

    @property
    def busy(self) -> int:
        """Items still settling and callbacks still on their way."""
        return len(self._tasks)

    async def drain(self) -> None:
        """Wait until every item has settled and every callback sent so far was delivered."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def add_foreign_item(self, amount_minor: int, currency: str = "USD") -> str:
        """An item the processor has that we never sent (for reconciliation tests)."""
        sender_item_id = f"foreign-{uuid.uuid4().hex[:12]}"
        self._items[sender_item_id] = SandboxItem(
            ItemStatus(
                sender_item_id,
                f"SBXITEM{uuid.uuid4().hex[:17].upper()}",
                "SUCCESS",
                amount_minor,
                currency,
                "",
                self._clock.now(),
            ),
            "someone@example.com",
            "foreign",
        )
        return sender_item_id

    def _emit(self, sender_item_id: str) -> None:
        item = self._items[sender_item_id].item
        body = json.dumps(
            {
                "id": f"WH-{uuid.uuid4().hex.upper()}",
                "event_type": EVENT_TYPES.get(item.status, "PAYMENT.PAYOUTS-ITEM.UPDATED"),
                "create_time": item.updated_at.isoformat(),
                "resource": {
                    "payout_item_id": item.payout_item_id,
                    "sender_item_id": item.sender_item_id,
                    "transaction_status": item.status,
                    "amount": {"value_minor": item.amount_minor, "currency": item.currency},
                },
            },
            separators=(",", ":"),
        ).encode()
        copies = (
            2
            if self._random.randrange(100) < self._settings.processor_duplicate_callback_percent
            else 1
        )
        for _ in range(copies):
            self._background(self._deliver(body))

    async def _deliver(self, body: bytes) -> None:
        """Deliver one callback late (a random delay), retrying with backoff while it fails."""
        await asyncio.sleep(
            self._random.uniform(0, self._settings.processor_callback_delay_ms / 1000)
        )
        signature = sign(self._secret, body)
        for attempt in range(1, 9):
            if self.deliver is None:
                return
            try:
                await self.deliver(body, signature)
                self.delivered += 1
                return
            except Exception as error:
                # PayPal retries for days; the simulation retries within seconds.
                pause = backoff(attempt, first=0.2, cap=2.0)
                log.warning("sandbox callback not accepted (%s); again in %.1fs", error, pause)
                await asyncio.sleep(pause)
