"""What became of a debit or a hold whose caller lost the answer (ResolveDebit, ResolveHold).

Gifting's and promotion's reconcilers ask about a request they sent and never heard back from. The
answer must be final: the request took effect (its answer, or what the ledger kept of it once its
request-id record was purged), it was refused (the reason), or it never arrived and is voided now,
so that, should it still arrive, it is refused and never takes effect (DEBIT_VOIDED)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import Message

from ledger.holds import Hold
from runtime.db import Database
from runtime.errors import DEBIT_VOIDED
from runtime.idempotency import Idempotency
from services.wallet.domain import Coins, Debit, Wallet, voided

T = TypeVar("T")


@dataclass(frozen=True)
class Resolution(Generic[T]):
    """One of: done (`kept`: what the ledger kept of it, or `answer`: its stored answer), refused
    (`reason`), or voided (`reason` DEBIT_VOIDED, now or before)."""

    kept: T | None = None
    answer: bytes | None = None
    reason: str = ""

    @property
    def voided(self) -> bool:
        return self.reason == DEBIT_VOIDED


class Resolver:
    def __init__(self, db: Database, idempotency: Idempotency, wallet: Wallet) -> None:
        self._db, self._idempotency, self._wallet = db, idempotency, wallet

    async def debit(
        self, scope: str, request: Message, *, caller: str, user_id: str
    ) -> Resolution[Debit]:
        """A debit request (`request` carries its request id) sent to `scope`."""
        if not await self._idempotency.is_recorded(scope, request):
            # Never received, or its record purged after the retention: the ledger, which never
            # forgets, tells them apart before the request id is voided.
            async with self._db.driver.read() as tx:
                debit = await self._wallet.debit_on_record(
                    tx, caller=caller, user_id=user_id, request_id=_ledger_id(scope, request)
                )
            if debit is not None:
                return Resolution(kept=debit)
        return await self._stored(scope, request)

    async def hold(
        self, scope: str, request: Message, *, user_id: str
    ) -> Resolution[tuple[Hold, Coins]]:
        """A hold request sent to `scope`: a hold placed is answered in the state it is in now."""
        if not await self._idempotency.is_recorded(scope, request):
            # Never received, or its record purged: the hold, if it was placed, kept the request
            # (ledger v7).
            async with self._db.read() as conn:
                hold = await self._wallet.holds.placed_under(conn, _ledger_id(scope, request))
                if hold is not None:
                    return Resolution(kept=(hold, await self._wallet.coins(conn, user_id)))
        return await self._stored(scope, request)

    async def _stored(self, scope: str, request: Message) -> Resolution[T]:
        """The request's stored answer or refusal; a request never received is voided now."""
        answer, reason = await self._idempotency.outcome(
            scope, request, voided(getattr(request, "request_id", ""))
        )
        return Resolution(answer=answer, reason=reason)


def _ledger_id(scope: str, request: Message) -> str:
    """The request id the ledger keeps with what the request did: `<scope>/<request id>`."""
    return f"{scope}/{getattr(request, 'request_id', '')}"
