"""The payment-provider port and the local sandbox provider.

The wallet never sees card data: it sends the provider's payment token and our purchase id, which the
provider uses as its idempotency key, so asking twice about one purchase never charges twice.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
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
    goes on after the caller's timeout, as a real one's would); other tokens are approved. A key
    the provider has already recorded (charged, declined or voided) is answered from that record at
    once, as a real provider replays an idempotency key. Each call takes `latency_ms`, like a real
    network call.
    """

    LATE_SECONDS = 2.0

    def __init__(self, latency_ms: int = 20, store: Path | None = None) -> None:
        self._latency = latency_ms / 1000
        self._charges = _ChargeStore(store)
        self._late: set[asyncio.Task[ChargeResult]] = set()

    def charged(self, idempotency_key: str) -> ChargeResult | None:
        """What the provider recorded under the key (for tests that count charges)."""
        return self._charges.get(idempotency_key)

    def late_charges_in_flight(self) -> int:
        """`tok_late` charges the provider is still working on (for tests that wait for them)."""
        return len(self._late)

    def charges(self) -> dict[str, ChargeResult]:
        """Everything the provider recorded, by idempotency key (for tests that count charges)."""
        return self._charges.all()

    async def void(self, idempotency_key: str) -> ChargeResult | None:
        await asyncio.sleep(self._latency)
        recorded = self._charges.get(idempotency_key)
        if recorded is not None and recorded.decline_reason != VOIDED_KEY:
            return recorded
        # What the key holds once the void is written: another process sharing the file may
        # have charged it between the read and the write (review r8: the void answered "never
        # charged" for an approved charge, and the purchase failed with the card charged).
        kept = self._charges.put(
            idempotency_key, ChargeResult(False, f"sbx_void_{idempotency_key}", VOIDED_KEY)
        )
        return None if kept.decline_reason == VOIDED_KEY else kept

    async def charge(
        self, *, idempotency_key: str, token: str, amount_minor: int, currency: str
    ) -> ChargeResult:
        await asyncio.sleep(self._latency)
        recorded = self._charges.get(idempotency_key)
        if recorded is not None:  # a repeat, or a key voided (reconciled as never charged)
            return recorded
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
        recorded = self._charges.get(idempotency_key)
        if recorded is not None:  # a repeat, or a key voided (reconciled as never charged)
            return recorded
        provider_id = f"sbx_{uuid.uuid4().hex[:20]}"
        if token.startswith("tok_decline"):
            reason = token.removeprefix("tok_decline").strip("_") or "card_declined"
            result = ChargeResult(False, provider_id, reason)
        else:
            result = ChargeResult(True, provider_id)
        result = self._charges.put(idempotency_key, result)
        if token.startswith("tok_timeout"):
            raise PaymentOutcomeUnknown(idempotency_key)
        return result


VOIDED_KEY = "voided"
"""The decline reason of a charge under a key `void` voided: the platform's doing, not the card's."""


class _ChargeStore:
    """The sandbox provider's record of charges by idempotency key: in memory, or in a SQLite file
    (`WALLET_SANDBOX_PAYMENTS_FILE`) so that, like a real provider, it remembers what it charged when
    the wallet restarts or runs as several processes. The first result recorded for a key wins."""

    def __init__(self, path: Path | None) -> None:
        self._memory: dict[str, ChargeResult] = {}
        self._db: sqlite3.Connection | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, timeout=5)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS charges (idempotency_key TEXT PRIMARY KEY, "
                "approved INTEGER NOT NULL, provider_transaction_id TEXT NOT NULL, "
                "decline_reason TEXT NOT NULL)"
            )

    def get(self, key: str) -> ChargeResult | None:
        if self._db is None:
            return self._memory.get(key)
        row = self._db.execute(
            "SELECT approved, provider_transaction_id, decline_reason FROM charges "
            "WHERE idempotency_key = ?",
            (key,),
        ).fetchone()
        return None if row is None else ChargeResult(bool(row[0]), row[1], row[2])

    def put(self, key: str, result: ChargeResult) -> ChargeResult:
        """Record `result` unless the key has one; returns the key's result either way."""
        if self._db is None:
            return self._memory.setdefault(key, result)
        self._db.execute(
            "INSERT OR IGNORE INTO charges VALUES (?, ?, ?, ?)",
            (key, int(result.approved), result.provider_transaction_id, result.decline_reason),
        )
        found = self.get(key)
        assert found is not None
        return found

    def all(self) -> dict[str, ChargeResult]:
        if self._db is None:
            return dict(self._memory)
        rows = self._db.execute("SELECT * FROM charges").fetchall()
        return {r[0]: ChargeResult(bool(r[1]), r[2], r[3]) for r in rows}
