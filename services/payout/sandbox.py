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

Its records live in a SQLite file (`PAYOUT_SANDBOX_FILE`, default `<data_dir>/sandbox-payouts.sqlite3`)
shared by every payout process on the machine and kept across restarts, as a real processor keeps its
records whoever asks: a replica looks up what another sent, and a restart forgets nothing. An item's
status follows from its receiver and the time since it arrived (computed when asked), so it settles
whichever process looks; its callbacks are sent by the process that received it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import random
import sqlite3
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

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


class _Store:
    """The sandbox's records: in a SQLite file shared by every payout process on the machine (and
    kept across restarts), as a real processor keeps its records whoever asks; `:memory:` for one
    process alone. `payments` has one row per item created (an item sent again in a new batch is a
    second row: a double payment); an item's record is its first row."""

    def __init__(self, path: Path | None) -> None:
        target = ":memory:"
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            target = str(path)
        self._db = sqlite3.connect(target, isolation_level=None, timeout=5)
        if path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS payments (seq INTEGER PRIMARY KEY, sender_item_id TEXT NOT "
            "NULL, payout_item_id TEXT NOT NULL, batch_id TEXT NOT NULL, receiver TEXT NOT NULL, "
            "amount_minor INTEGER NOT NULL, currency TEXT NOT NULL, created_at REAL NOT NULL, "
            "status TEXT, reason TEXT NOT NULL DEFAULT '', changed_at REAL);"
            "CREATE INDEX IF NOT EXISTS ix_payments_item ON payments (sender_item_id, seq);"
            "CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY, items TEXT NOT NULL);"
        )

    def batch(self, batch_id: str) -> list[str] | None:
        row = self._db.execute(
            "SELECT items FROM batches WHERE batch_id = ?", (batch_id,)
        ).fetchone()
        return None if row is None else list(json.loads(row[0]))

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """One transaction: a batch is recorded with all its payments or not at all, as a real
        processor's is (a payout process killed between the two left a batch without its items,
        which every resend under its id then answered without them)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def add_batch(self, batch_id: str, items: Sequence[str]) -> bool:
        """False if the batch id was taken (by another process too)."""
        done = self._db.execute(
            "INSERT OR IGNORE INTO batches VALUES (?, ?)", (batch_id, json.dumps(list(items)))
        )
        return done.rowcount == 1

    def add_payment(self, record: _Payment) -> None:
        self._db.execute(
            "INSERT INTO payments (sender_item_id, payout_item_id, batch_id, receiver, "
            "amount_minor, currency, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                record.sender_item_id,
                record.payout_item_id,
                record.batch_id,
                record.receiver,
                record.amount_minor,
                record.currency,
                record.created_at,
            ),
        )

    def first(self, sender_item_id: str) -> _Payment | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM payments WHERE sender_item_id = ? ORDER BY seq LIMIT 1",
            (sender_item_id,),
        ).fetchone()
        return None if row is None else _Payment(*row)

    def every_payment(self) -> list[_Payment]:
        """Every row, in the order the payments were made."""
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM payments ORDER BY seq").fetchall()
        return [_Payment(*row) for row in rows]

    def close(self) -> None:
        self._db.close()

    def override(
        self, sender_item_id: str, status: str, reason: str, amount: int, at: float
    ) -> None:
        self._db.execute(
            "UPDATE payments SET status = ?, reason = ?, amount_minor = ?, changed_at = ? "
            "WHERE seq = (SELECT min(seq) FROM payments WHERE sender_item_id = ?)",
            (status, reason, amount, at, sender_item_id),
        )

    def payments(self) -> Counter[str]:
        rows = self._db.execute("SELECT sender_item_id, count(*) FROM payments GROUP BY 1")
        return Counter({item: int(n) for item, n in rows.fetchall()})


_COLUMNS = (
    "sender_item_id, payout_item_id, batch_id, receiver, amount_minor, currency, created_at, "
    "status, reason, changed_at"
)


@dataclass(frozen=True)
class _Payment:
    sender_item_id: str
    payout_item_id: str
    batch_id: str
    receiver: str
    amount_minor: int
    currency: str
    created_at: float
    """When the processor received it (epoch seconds, on the service's clock)."""
    status: str | None = None
    """Set by `set_status` (a test breaking things); None: the receiver's story, by time."""
    reason: str = ""
    changed_at: float | None = None


def status_at(payment: _Payment, settings: PayoutSettings, now: float) -> ItemStatus:
    """A payment as the processor has it at `now` (epoch seconds): what a test set (`set_status`),
    else its receiver's story."""
    status, reason, at = _story(payment, settings, now)
    if payment.status is not None and payment.changed_at is not None:
        status, reason, at = payment.status, payment.reason, payment.changed_at
    return ItemStatus(
        sender_item_id=payment.sender_item_id,
        payout_item_id=payment.payout_item_id,
        status=status,
        amount_minor=payment.amount_minor,
        currency=payment.currency,
        failure_reason=reason,
        updated_at=dt.datetime.fromtimestamp(at, dt.UTC),
    )


def _story(payment: _Payment, settings: PayoutSettings, now: float) -> tuple[str, str, float]:
    """(status, reason, since when) of an item at `now`, by its receiver: it settles
    `PAYOUT_PROCESSOR_SETTLE_MS` after it arrived; an unclaimed one is returned, and a
    `returned…` one taken back after it was paid, `PAYOUT_PROCESSOR_UNCLAIMED_RETURN_MS` later."""
    settled = payment.created_at + settings.processor_settle_ms / 1000
    later = settled + settings.processor_unclaimed_return_ms / 1000
    receiver = payment.receiver
    if now < settled:
        return "PENDING", "", payment.created_at
    if receiver.startswith("fail"):
        reason = receiver.removeprefix("fail").strip("_").split("@")[0] or "payment_failed"
        return "FAILED", reason, settled
    if receiver.startswith("unclaimed"):
        if now < later:
            return "UNCLAIMED", "", settled
        return "RETURNED", "unclaimed: returned to the sender", later
    if receiver.startswith("returned"):
        if now < later:
            return "SUCCESS", "", settled
        return "RETURNED", "returned by the receiver's provider", later
    return "SUCCESS", "", settled


def recorded_payments(path: Path, settings: PayoutSettings, now: dt.datetime) -> list[ItemStatus]:
    """Every payment a sandbox file records, in the order they were made (an item sent again in a
    new batch is a second payment), each as the sandbox would answer at `now` with `settings` (its
    statuses are not stored but follow from the receiver and the time, `status_at`). For audits: it
    reads the file and changes nothing."""
    with contextlib.closing(_Store(path)) as store:
        payments = store.every_payment()
    return [status_at(payment, settings, now.timestamp()) for payment in payments]


class PayPalSandbox:
    def __init__(
        self,
        settings: PayoutSettings,
        clock: Clock,
        seed: int | None = None,
        store_path: Path | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._random = random.Random(seed)
        self._store = _Store(store_path)
        self._tasks: set[asyncio.Task[None]] = set()
        self.deliver: Deliver | None = None
        """Where callbacks go (set once the service listens); None: callbacks are not sent."""
        self.delivered = 0
        """Callbacks our endpoint accepted (duplicates included)."""

    @property
    def payments(self) -> Counter[str]:
        """Items created per sender_item_id: more than 1 is a double payment."""
        return self._store.payments()

    @property
    def _secret(self) -> bytes:
        return self._settings.processor_webhook_secret.get_secret_value().encode()

    async def _latency(self) -> None:
        await asyncio.sleep(self._settings.processor_latency_ms / 1000)

    async def submit(self, sender_batch_id: str, items: Sequence[PayoutItem]) -> list[ItemStatus]:
        await self._latency()
        if any(i.receiver.startswith(("drop", "dest_drop")) for i in items):
            await asyncio.Event().wait()  # the request is lost: nothing recorded, no answer
        self._accept(sender_batch_id, items)
        answer = [self._status(i) for i in self._batch_items(sender_batch_id)]
        if any(i.receiver.startswith(("hang", "dest_hang")) for i in items):
            await asyncio.Event().wait()  # recorded, but the answer is lost
        return answer

    def arrive_late(self, sender_batch_id: str, items: Sequence[PayoutItem]) -> None:
        """A request that was lost on its way arrives after all (tests): recorded, called back."""
        self._accept(sender_batch_id, items)

    def _accept(self, sender_batch_id: str, items: Sequence[PayoutItem]) -> None:
        """Record a batch once per batch id; each of its items is a payment (a second one for an
        item some earlier batch had: a double payment, logged)."""
        with self._store.atomic():
            told = self._record(sender_batch_id, items)
        for sender_item_id in told:
            self._background(self._tell(sender_item_id))

    def _record(self, sender_batch_id: str, items: Sequence[PayoutItem]) -> list[str]:
        """The batch and its payments (in the caller's transaction); the items paid for the first
        time, to be called back about."""
        if not self._store.add_batch(sender_batch_id, [i.sender_item_id for i in items]):
            return []
        told: list[str] = []
        for payout in items:
            first_time = self._store.first(payout.sender_item_id) is None
            if not first_time:
                log.error(
                    "sandbox: item %s paid AGAIN in batch %s (a double payment)",
                    payout.sender_item_id,
                    sender_batch_id,
                )
            self._store.add_payment(
                _Payment(
                    payout.sender_item_id,
                    f"SBXITEM{uuid.uuid4().hex[:17].upper()}",
                    sender_batch_id,
                    payout.receiver.removeprefix("dest_"),
                    payout.amount_minor,
                    payout.currency,
                    self._clock.now().timestamp(),
                )
            )
            if first_time:
                told.append(payout.sender_item_id)
        return told

    def _batch_items(self, batch_id: str) -> list[_Payment]:
        found = [self._store.first(i) for i in self._store.batch(batch_id) or []]
        return [p for p in found if p is not None]

    async def lookup(self, sender_item_id: str) -> ItemStatus | None:
        await self._latency()
        found = self._store.first(sender_item_id)
        return None if found is None else self._status(found)

    async def items_since(self, since: dt.datetime) -> list[ItemStatus]:
        await self._latency()
        statuses = [self._status(p) for p in self._store.every_payment()]
        return [s for s in statuses if s.updated_at >= since]

    def _status(self, payment: _Payment) -> ItemStatus:
        return status_at(payment, self._settings, self._clock.now().timestamp())

    async def _tell(self, sender_item_id: str) -> None:
        """Call back at each change of the item's story (best effort: the process that received
        the item tells; the worker's polls cover a callback that never comes)."""
        settings = self._settings
        self._emit(sender_item_id)
        await asyncio.sleep(settings.processor_settle_ms / 1000)
        self._emit(sender_item_id)
        payment = self._store.first(sender_item_id)
        if payment is not None and payment.receiver.startswith(("unclaimed", "returned")):
            await asyncio.sleep(settings.processor_unclaimed_return_ms / 1000)
            self._emit(sender_item_id)

    def _background(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        current = self._store.first(sender_item_id)
        assert current is not None, sender_item_id
        amount = current.amount_minor if amount_minor is None else amount_minor
        self._store.override(sender_item_id, status, reason, amount, self._clock.now().timestamp())
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
        batch_id = f"foreign-{uuid.uuid4().hex[:12]}"
        self._store.add_batch(batch_id, [sender_item_id])
        self._store.add_payment(
            _Payment(
                sender_item_id,
                f"SBXITEM{uuid.uuid4().hex[:17].upper()}",
                batch_id,
                "someone@example.com",
                amount_minor,
                currency,
                self._clock.now().timestamp(),
            )
        )
        return sender_item_id

    def _emit(self, sender_item_id: str) -> None:
        payment = self._store.first(sender_item_id)
        if payment is None:
            return
        item = self._status(payment)
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
