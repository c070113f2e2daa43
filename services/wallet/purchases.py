"""Finishing purchases: settle a charge's outcome exactly once, whoever learns it first.

A purchase is charged under its own id as the provider's idempotency key. The outcome is settled (and
the coins credited) in one transaction together with the answer of the request that created it, so
the request's retry, or the reconciler after a crash or a lost answer, can finish it, once.
"""

from __future__ import annotations

import datetime as dt
import logging

from coins.wallet.v1 import wallet_pb2
from runtime.clock import Clock
from runtime.db import Database
from runtime.errors import Aborted, DomainError, FailedPrecondition
from runtime.idempotency import Idempotency
from services.wallet import storage
from services.wallet.convert import balance_pb, purchase_pb
from services.wallet.domain import Wallet
from services.wallet.payments import ChargeResult, PaymentOutcomeUnknown, PaymentProvider

log = logging.getLogger("coins.wallet.purchases")


class Purchases:
    def __init__(
        self,
        db: Database,
        idempotency: Idempotency,
        clock: Clock,
        wallet: Wallet,
        payments: PaymentProvider,
    ) -> None:
        self._db, self._idempotency, self._clock = db, idempotency, clock
        self._wallet, self._payments = wallet, payments

    async def charge(self, purchase: storage.PurchaseRecord) -> ChargeResult:
        """Charge (or, for a key the provider has seen, read back the outcome); may raise
        PaymentOutcomeUnknown."""
        return await self._payments.charge(
            idempotency_key=purchase.purchase_id,
            token=purchase.payment_token,
            amount_minor=purchase.price_minor,
            currency=purchase.currency_code,
        )

    async def settle(
        self, purchase_id: str, charge: ChargeResult, ledger_request_id: str
    ) -> wallet_pb2.PurchaseCoinsResponse | DomainError:
        """Record the outcome: credit an approved charge, or the decline; answer the purchase's
        request with it. Aborted if someone else settled the purchase first."""
        async with self._db.transaction() as conn:
            settled = await storage.settle_purchase(
                conn,
                purchase_id,
                status="completed" if charge.approved else "failed",
                provider_transaction_id=charge.provider_transaction_id,
                now=self._clock.now(),
            )
            if not settled:
                raise Aborted(
                    "CONCURRENT_RETRY",
                    "another attempt is completing this purchase; retry with the same request_id",
                )
            purchase = await storage.get_purchase(conn, purchase_id)
            assert purchase is not None
            if charge.approved:
                coins = await self._wallet.credit_purchase(conn, purchase, ledger_request_id)
                response = wallet_pb2.PurchaseCoinsResponse(
                    purchase=purchase_pb(purchase), balance=balance_pb(coins)
                )
                await self._idempotency.complete_resource(conn, purchase_id, response=response)
                return response
            declined = FailedPrecondition(
                "PAYMENT_DECLINED",
                f"the payment provider declined the payment ({charge.decline_reason})",
                decline_reason=charge.decline_reason,
                purchase_id=purchase_id,
            )
            await self._idempotency.complete_resource(conn, purchase_id, error=declined)
            return declined

    async def reconcile(self, older_than: dt.timedelta, *, limit: int = 100) -> int:
        """Finish purchases left pending longer than `older_than` (a crash, a lost answer, a client
        that never retried): ask the provider under the purchase's key and settle what it says. A
        payment the provider never saw is failed, never charged now. Returns how many were settled."""
        async with self._db.read() as conn:
            stale = await storage.pending_purchases(
                conn, self._clock.now() - older_than, limit=limit
            )
        settled = 0
        for purchase in stale:
            try:
                charge = await self._payments.lookup(purchase.purchase_id)
            except PaymentOutcomeUnknown:
                continue  # the provider is not answering; next round
            if charge is None:
                charge = ChargeResult(False, f"none:{purchase.purchase_id}", "never_charged")
            try:
                await self.settle(purchase.purchase_id, charge, f"reconcile/{purchase.purchase_id}")
                settled += 1
            except Aborted:
                continue  # the request's own retry settled it
        return settled
