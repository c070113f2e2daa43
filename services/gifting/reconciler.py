"""Settling gifts left pending: the process died, or the wallet's answer was lost, between the debit
and recording it. The wallet is asked what became of the gift's debit (its request id is derived from
the gift): debited gifts are recorded and credited to the creator like any other, refused ones fail,
and a debit the wallet never received is voided there first, so it can never happen later. The
request that opened the gift gets its answer either way."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from coins.gifting.v1 import gifting_pb2
from runtime.errors import DomainError, FailedPrecondition
from runtime.server import Runtime
from services.gifting import storage
from services.gifting.api import sent_gift_pb
from services.gifting.domain import CoinDebiter, Gifting
from services.gifting.settings import GiftingSettings

log = logging.getLogger("coins.gifting.reconciler")


class GiftReconciler:
    def __init__(
        self,
        runtime: Runtime[GiftingSettings],
        gifting: Gifting,
        wallet: CoinDebiter,
        wake_relay: Callable[[], None],
    ) -> None:
        self._rt, self._gifting, self._wallet = runtime, gifting, wallet
        self._wake_relay = wake_relay

    async def reconcile(self, older_than: dt.timedelta, *, limit: int = 100) -> int:
        rt = self._rt
        async with rt.db.read() as conn:
            stale = await storage.pending_sent_gifts(conn, rt.clock.now() - older_than, limit=limit)
        settled = 0
        for sent in stale:
            try:
                outcome = await self._wallet.resolve_gift_debit(
                    sent_gift_id=sent.sent_gift_id,
                    sender_id=sent.sender_id,
                    time_limit=rt.settings.downstream_timeout_seconds,
                )
            except DomainError as error:
                log.warning("cannot resolve gift %s yet: %s", sent.sent_gift_id, error.reason)
                continue
            async with rt.db.transaction() as conn:
                if isinstance(outcome, tuple):
                    transaction_id, balance = outcome
                    if not await self._gifting.record_debit(
                        conn, sent, transaction_id, rt.clock.now()
                    ):
                        continue  # the request's own retry recorded it meanwhile
                    recorded = await storage.get_sent_gift(conn, sent.sent_gift_id)
                    assert recorded is not None
                    await rt.idempotency.complete_resource(
                        conn,
                        sent.sent_gift_id,
                        response=gifting_pb2.SendGiftResponse(
                            sent_gift=sent_gift_pb(recorded), sender_balance_coins=balance
                        ),
                    )
                else:
                    await self._gifting.record_failure(conn, sent.sent_gift_id, rt.clock.now())
                    await rt.idempotency.complete_resource(
                        conn,
                        sent.sent_gift_id,
                        error=FailedPrecondition(
                            outcome, f"the gift was not sent: the wallet answered {outcome}"
                        ),
                    )
            settled += 1
        if settled:
            self._wake_relay()
        return settled
