"""Settling promotions left pending: the process died, or the wallet's answer was lost, between placing
the budget hold and recording it. The wallet is asked what became of the hold (its request id is
derived from the promotion): a placed hold activates the promotion, a refusal rejects it, and a hold
the wallet never received is voided there first, so it can never be placed late. The request that
created the promotion gets its answer either way."""

from __future__ import annotations

import datetime as dt
import logging

from coins.promotion.v1 import promotion_pb2
from runtime.errors import DomainError
from runtime.server import Runtime
from services.promotion import storage
from services.promotion.convert import promotion_pb
from services.promotion.domain import BudgetWallet, Promotions, unpaid
from services.promotion.settings import PromotionSettings

log = logging.getLogger("coins.promotion.reconciler")


class PromotionReconciler:
    def __init__(
        self, runtime: Runtime[PromotionSettings], promotions: Promotions, wallet: BudgetWallet
    ) -> None:
        self._rt, self._promotions, self._wallet = runtime, promotions, wallet

    async def reconcile(self, older_than: dt.timedelta, *, limit: int = 100) -> int:
        rt = self._rt
        async with rt.db.read() as conn:
            stale = await storage.pending_promotions(conn, rt.clock.now() - older_than, limit=limit)
        settled = 0
        for promotion in stale:
            try:
                outcome = await self._wallet.resolve_budget_hold(
                    promotion_id=promotion.promotion_id,
                    user_id=promotion.user_id,
                    time_limit=rt.settings.downstream_timeout_seconds,
                )
            except DomainError as error:
                log.warning("cannot resolve promotion %s yet: %s", promotion.promotion_id, error)
                continue
            async with rt.db.transaction() as conn:
                now = rt.clock.now()
                if isinstance(outcome, str):
                    await self._promotions.reject(conn, promotion.promotion_id, now)
                    await rt.idempotency.complete_resource(
                        conn,
                        promotion.promotion_id,
                        error=unpaid(outcome, promotion.promotion_id),
                    )
                elif await self._promotions.activate(
                    conn, promotion.promotion_id, now, hold_id=outcome.hold_id
                ):
                    activated = await storage.get_promotion(conn, promotion.promotion_id)
                    assert activated is not None
                    await rt.idempotency.complete_resource(
                        conn,
                        promotion.promotion_id,
                        response=promotion_pb2.CreatePromotionResponse(
                            promotion=promotion_pb(activated, now),
                            payer_balance_coins=outcome.available_coins,
                        ),
                    )
                else:
                    continue  # the request's own retry activated it meanwhile
            settled += 1
        return settled
