"""The processor's callbacks (webhook events): verified, handled once, applied from the source.

A callback is a signed nudge, not the truth: it is verified (HMAC-SHA256 over the body with the
shared secret; a bad signature is refused and changes nothing), kept by its event id (a redelivered
event changes nothing), and then the item it names is looked up at the processor and that status is
applied. So events that arrive late, twice or out of order all converge on the processor's current
record, and an old "succeeded" arriving after "returned" cannot pay again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import json
from dataclasses import dataclass

from runtime.errors import FieldViolation, InvalidArgument, Unauthenticated, Unavailable
from runtime.outages import RETRY_AFTER_SECONDS
from runtime.server import Runtime
from services.payout import storage
from services.payout.processor import PayoutProcessor, outcome_of, record_outcome
from services.payout.sandbox import sign
from services.payout.settings import PayoutSettings
from services.payout.withdrawals import Withdrawals


@dataclass(frozen=True)
class Handled:
    event_id: str
    duplicate: bool
    withdrawal_id: str
    status: str
    """The withdrawal's status after the event ("" when the item is not ours)."""


def _malformed(why: str) -> InvalidArgument:
    return InvalidArgument(
        "MALFORMED_EVENT",
        f"the processor event is not one payout understands: {why}",
        violations=(FieldViolation("body", why),),
    )


_SHAPE = (
    'a JSON object {"id": ..., "event_type": ..., "resource": {"sender_item_id": ...}}, '
    "each a string"
)


def parse(body: bytes) -> tuple[str, str, str]:
    """(event id, event type, sender_item_id) of a callback body; MALFORMED_EVENT naming what is
    missing or wrong (never a Python exception's text)."""
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):
        raise _malformed(f"the body is not JSON (UTF-8, -16 or -32); expected {_SHAPE}") from None
    if not isinstance(event, dict):
        raise _malformed(f"the body is JSON but not an object; expected {_SHAPE}")
    resource = event.get("resource")
    if not isinstance(resource, dict):
        raise _malformed(f"resource is missing or not an object; expected {_SHAPE}")
    fields = {
        "id": event.get("id"),
        "event_type": event.get("event_type"),
        "resource.sender_item_id": resource.get("sender_item_id"),
    }
    for name, value in fields.items():
        if not isinstance(value, str) or not value:
            raise _malformed(f"{name} is missing or not a non-empty string; expected {_SHAPE}")
    event_id, event_type, item = (str(v) for v in fields.values())
    for name, value in (("id", event_id), ("resource.sender_item_id", item)):
        if len(value) > 128:
            raise _malformed(f"{name} is longer than 128 characters")
    for name, value in (
        ("id", event_id),
        ("event_type", event_type),
        ("resource.sender_item_id", item),
    ):
        if "\x00" in value:  # no identifier holds one, and PostgreSQL cannot store it
            raise _malformed(f"{name} contains a NUL character (U+0000)")
        if not _encodable(value):  # JSON's "\ud800" escape: no database can store it
            raise _malformed(
                f"{name} contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text; "
                f"expected {_SHAPE}"
            )
    return event_id, event_type[:64], item


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class Callbacks:
    def __init__(
        self,
        runtime: Runtime[PayoutSettings],
        withdrawals: Withdrawals,
        processor: PayoutProcessor,
    ) -> None:
        self._rt = runtime
        self._withdrawals = withdrawals
        self._processor = processor

    async def forget_old(self, limit: int = 1000) -> int:
        """Forget callbacks older than `PAYOUT_PROCESSOR_EVENT_RETENTION_DAYS` (a periodic job): a
        redelivery after that is looked up at the processor again, and resolving a withdrawal twice
        with the same outcome changes nothing."""
        days = self._rt.settings.processor_event_retention_days
        before = self._rt.clock.now() - dt.timedelta(days=days)
        async with self._rt.db.transaction() as conn:
            return await storage.forget_processor_events(conn, before, limit)

    def verify(self, body: bytes, signature: str) -> None:
        secret = self._rt.settings.processor_webhook_secret.get_secret_value().encode()
        given = signature.strip().lower().encode("utf-8", "replace")
        if not hmac.compare_digest(sign(secret, body).encode(), given):
            raise Unauthenticated(
                "BAD_SIGNATURE",
                "the event's signature does not match its body (HMAC-SHA256 with the webhook "
                "secret): refused, nothing changed",
            )

    async def handle(self, body: bytes, signature: str) -> Handled:
        self.verify(body, signature)
        event_id, event_type, item_id = parse(body)
        db, now = self._rt.db, self._rt.clock.now()
        async with db.read() as conn:
            seen_for = await storage.processor_event_item(conn, event_id)
            if seen_for is not None:  # a duplicate: answered about what it was first about
                item_id = seen_for
            withdrawal = await storage.get_withdrawal(conn, item_id)
        if seen_for is not None or withdrawal is None:
            first = False
            if seen_for is None:
                async with db.transaction() as conn:
                    first = await storage.record_processor_event(
                        conn, event_id, item_id, event_type, now
                    )
            return (
                Handled(event_id, not first, "", "")
                if withdrawal is None
                else Handled(event_id, True, item_id, withdrawal.status)
            )
        # The truth is the processor's record, read outside any database transaction.
        looked_up = False
        try:
            item = await asyncio.wait_for(
                self._processor.lookup(item_id), self._rt.settings.processor_timeout_seconds
            )
            looked_up = True
        except Exception:
            item = None  # not now: the worker looks it up soon (below)
        async with db.transaction() as conn:
            if item is None and not looked_up:
                current = await self._withdrawals.get(conn, item_id)
                if current.status not in storage.FOLLOWED_BY_THE_WORKER:
                    # Nothing will look this withdrawal up again (a return after it was paid):
                    # recording the event now would lose it. The processor redelivers.
                    raise Unavailable(
                        "PROCESSOR_UNAVAILABLE",
                        f"could not confirm event {event_id} with the processor for withdrawal "
                        f"{item_id} ({current.status}); nothing was recorded: deliver it again",
                        retry_after=RETRY_AFTER_SECONDS,
                        event_id=event_id,
                    )
            if not await storage.record_processor_event(conn, event_id, item_id, event_type, now):
                current = await self._withdrawals.get(conn, item_id)
                return Handled(event_id, True, item_id, current.status)
            outcome = None if item is None else outcome_of(item)
            if item is not None and outcome is not None:
                current = await record_outcome(self._withdrawals, conn, item_id, item, now)
            else:
                current = await self._withdrawals.get(conn, item_id)
                if item is None and current.status == "processing":
                    await self._withdrawals.nudge(conn, item_id, now)
        return Handled(event_id, False, item_id, current.status)
