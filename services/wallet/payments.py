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

    async def lookup(self, idempotency_key: str) -> ChargeResult | None:
        """The outcome of the charge made under this key, None if the provider never saw one."""
        ...


class SandboxPaymentProvider:
    """A local stand-in for a card/app-store provider.

    Tokens: anything starting `tok_decline` is declined (`tok_decline_insufficient_funds` gives that
    reason); `tok_timeout...` is approved but the first answer for a key is lost on the way (the
    caller sees PaymentOutcomeUnknown, and asking again returns the approval); other tokens are
    approved. Each charge takes `latency_ms`, like a real network call.
    """

    def __init__(self, latency_ms: int = 20) -> None:
        self._latency = latency_ms / 1000
        self._charges: dict[str, ChargeResult] = {}

    async def lookup(self, idempotency_key: str) -> ChargeResult | None:
        await asyncio.sleep(self._latency)
        return self._charges.get(idempotency_key)

    async def charge(
        self, *, idempotency_key: str, token: str, amount_minor: int, currency: str
    ) -> ChargeResult:
        await asyncio.sleep(self._latency)
        if idempotency_key in self._charges:
            return self._charges[idempotency_key]
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
