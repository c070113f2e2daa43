"""The payment-provider port and the local sandbox provider.

The wallet never sees card data: it sends the provider's payment token and our purchase id, which the
provider uses as its idempotency key, so asking twice about one purchase never charges twice.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ChargeResult:
    approved: bool
    provider_transaction_id: str
    decline_reason: str = ""


class PaymentOutcomeUnknown(Exception):
    """The provider did not answer in time: the payment may or may not have gone through. Asking
    again with the same idempotency key tells (and never charges twice)."""


class PaymentProvider(Protocol):
    async def charge(
        self, *, idempotency_key: str, token: str, amount_minor: int, currency: str
    ) -> ChargeResult:
        """Charge once per idempotency key; a repeated key returns the first result."""
        ...

    async def void(self, idempotency_key: str) -> ChargeResult | None:
        """Settle a key whose charge we lost track of: the charge made under it, if there is one;
        otherwise the key is voided (None), so that a charge still on its way is refused when it
        arrives and the customer can never be charged for a purchase we failed."""
        ...


class SandboxPaymentProvider:
    """A local stand-in for a card/app-store provider.

    Tokens: anything starting `tok_decline` is declined (`tok_decline_insufficient_funds` gives that
    reason); `tok_timeout...` is approved but the first answer for a key is lost on the way (the
    caller sees PaymentOutcomeUnknown, and asking again returns the approval); `tok_late...` is
    approved after two seconds, whether the caller still waits or not (a slow provider: the charge
    goes on after the caller's timeout, as a real one's would); other tokens are approved. Each
    call takes `latency_ms`, like a real network call.
    """

    LATE_SECONDS = 2.0

    def __init__(self, latency_ms: int = 20) -> None:
        self._latency = latency_ms / 1000
        self._charges: dict[str, ChargeResult] = {}
        self._voided: set[str] = set()
        self._late: set[asyncio.Task[ChargeResult]] = set()

    def charged(self, idempotency_key: str) -> ChargeResult | None:
        """What the provider recorded under the key (for tests that count charges)."""
        return self._charges.get(idempotency_key)

    async def void(self, idempotency_key: str) -> ChargeResult | None:
        await asyncio.sleep(self._latency)
        if idempotency_key in self._charges:
            return self._charges[idempotency_key]
        self._voided.add(idempotency_key)
        return None

    async def charge(
        self, *, idempotency_key: str, token: str, amount_minor: int, currency: str
    ) -> ChargeResult:
        await asyncio.sleep(self._latency)
        if token.startswith("tok_late"):
            # Runs on at the provider even if the caller stops waiting (hence shield).
            task = asyncio.create_task(self._late_charge(idempotency_key, token))
            self._late.add(task)
            task.add_done_callback(self._late.discard)
            return await asyncio.shield(task)
        return self._apply(idempotency_key, token)

    async def _late_charge(self, idempotency_key: str, token: str) -> ChargeResult:
        await asyncio.sleep(self.LATE_SECONDS)
        return self._apply(idempotency_key, token)

    def _apply(self, idempotency_key: str, token: str) -> ChargeResult:
        if idempotency_key in self._charges:
            return self._charges[idempotency_key]
        if idempotency_key in self._voided:  # reconciled as never charged: refused, for good
            refused = ChargeResult(False, f"sbx_void_{uuid.uuid4().hex[:16]}", "voided")
            self._charges[idempotency_key] = refused
            return refused
        provider_id = f"sbx_{uuid.uuid4().hex[:20]}"
        if token.startswith("tok_decline"):
            reason = token.removeprefix("tok_decline").strip("_") or "card_declined"
            result = ChargeResult(False, provider_id, reason)
        else:
            result = ChargeResult(True, provider_id)
        self._charges[idempotency_key] = result
        if token.startswith("tok_timeout"):
            raise PaymentOutcomeUnknown(idempotency_key)
        return result
