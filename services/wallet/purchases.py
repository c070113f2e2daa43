"""Finishing purchases: settle a charge's outcome exactly once, whoever learns it first.

A purchase is charged under its own id as the provider's idempotency key. The outcome is settled (and
the coins credited) in one transaction together with the answer of the request that created it, so
the request's retry, or the reconciler after a crash or a lost answer, can finish it, once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncConnection

from coins.wallet.v1 import wallet_pb2
from runtime import deadlines
from runtime.clock import Clock
from runtime.db import Database
from runtime.errors import (
    Aborted,
    DomainError,
    FailedPrecondition,
    FailedPreconditionYet,
    NotFoundYet,
    Unavailable,
    enum_name,
)
from runtime.idempotency import Idempotency
from runtime.ids import time_ordered_id
from runtime.outages import settle_each
from services.wallet import storage
from services.wallet.convert import balance_pb, purchase_pb
from services.wallet.domain import Coins, Wallet
from services.wallet.payments import (
    VOIDED_KEY,
    ChargeResult,
    PaymentOutcomeUnknown,
    PaymentProvider,
)

PAYMENT_RETRY_AFTER_SECONDS = 2.0
"""The wait suggested (RetryInfo) when the payment provider's answer was lost: long enough for the
provider to settle the charge the retry then reads back."""

log = logging.getLogger("coins.wallet.purchases")


@dataclass(frozen=True)
class PurchaseOrder:
    """What a buyer asks for: a package, or a custom amount of coins, paid with a provider token."""

    user_id: str
    package_id: str
    custom_coins: int
    payment_token: str
    request_id: str


class Purchases:
    def __init__(
        self,
        db: Database,
        idempotency: Idempotency,
        clock: Clock,
        wallet: Wallet,
        payments: PaymentProvider,
        *,
        charge_timeout: float = 10.0,
    ) -> None:
        self._db, self._idempotency, self._clock = db, idempotency, clock
        self._wallet, self._payments = wallet, payments
        self._charge_timeout = charge_timeout
        """A provider call's bound, well under the reconciler's threshold: by the time a purchase
        is reconciled, no charge call of ours for it can still be waiting."""

    async def buy(self, request: Message, order: PurchaseOrder) -> wallet_pb2.PurchaseCoinsResponse:
        """A purchase, once per request id (`request` is what the caller sent, for its fingerprint):
        priced, checked and recorded pending; charged under its own id; settled and credited. A retry
        resumes an unfinished purchase (never charging twice) or replays the answer."""
        scope = purchase_scope(order.user_id)

        async def start(conn: AsyncConnection) -> str:
            return await self._open(conn, order)

        claim = await self._idempotency.begin(scope, request, start)
        if claim.finished:
            return claim.replay(wallet_pb2.PurchaseCoinsResponse)
        assert claim.resource_id is not None
        try:
            # The ledger's request id is the purchase's own: a client's request id may come back
            # after its record is purged (a new request by then), the purchase id never does.
            return await self._complete(claim.resource_id, f"purchase:{claim.resource_id}")
        except Aborted as error:  # a concurrent duplicate settled it first: its answer
            twin = await self._idempotency.twin_answer(scope, request)
            if error.reason != "CONCURRENT_RETRY" or twin is None:
                raise
            return twin.replay(wallet_pb2.PurchaseCoinsResponse)

    async def _open(self, conn: AsyncConnection, order: PurchaseOrder) -> str:
        """Check the buyer may buy it (age, region, package) within the limits, and record the
        purchase pending. The buyer's and the payment method's locks make the limit checks exact."""
        now = self._clock.now()
        wallet = self._wallet
        account = await wallet.account(conn, order.user_id)
        package = await wallet.what_to_buy(conn, account, order.package_id, order.custom_coins)
        wallet.check_can_buy(account, package, now.date())
        await storage.lock_account(conn, account.user_id)
        await storage.lock_payment_method(conn, order.payment_token)
        await wallet.check_limits(conn, account, package, order.payment_token, now)
        purchase_id = time_ordered_id()
        await storage.insert_purchase(
            conn,
            storage.PurchaseRecord(
                purchase_id=purchase_id,
                user_id=account.user_id,
                package_id=package.package_id,
                region=package.region,
                channel=package.channel,
                coins=package.coins,
                price_minor=package.price_minor,
                currency_code=package.currency_code,
                payment_token=order.payment_token,
                status="pending",
                provider_transaction_id=None,
                created_at=now,
                updated_at=now,
            ),
        )
        return purchase_id

    async def _complete(
        self, purchase_id: str, ledger_request_id: str
    ) -> wallet_pb2.PurchaseCoinsResponse:
        """Charge (idempotently, keyed by the purchase id), then settle and credit in one transaction."""
        async with self._db.read() as conn:
            purchase = await storage.get_purchase(conn, purchase_id)
        assert purchase is not None
        # No card is charged for a caller who has stopped waiting (review r9: 12 of 20 purchases
        # with 5-41 ms deadlines were charged, answered DEADLINE_EXCEEDED, and credited minutes
        # later by the reconciler). The purchase stays pending: a retry charges it, else the
        # reconciler voids its key at the provider.
        deadlines.check("the card was charged")
        try:
            charge = await self.charge(purchase)
        except PaymentOutcomeUnknown:
            # The purchase stays pending and the request id open: a retry (or the reconciler) asks
            # the provider again under the same key, which never charges twice.
            raise Unavailable(
                "PAYMENT_OUTCOME_UNKNOWN",
                "the payment provider did not answer in time; retry with the same request_id "
                "(you will not be charged twice)",
                retry_after=PAYMENT_RETRY_AFTER_SECONDS,
                purchase_id=purchase_id,
            ) from None
        outcome = await self.settle(purchase_id, charge, ledger_request_id)
        if isinstance(outcome, DomainError):
            raise outcome
        return outcome

    async def charge(self, purchase: storage.PurchaseRecord) -> ChargeResult:
        """Charge (or, for a key the provider has seen, read back the outcome); may raise
        PaymentOutcomeUnknown."""
        try:
            return await asyncio.wait_for(
                self._payments.charge(
                    idempotency_key=purchase.purchase_id,
                    token=purchase.payment_token,
                    amount_minor=purchase.price_minor,
                    currency=purchase.currency_code,
                ),
                timeout=self._charge_timeout,
            )
        except TimeoutError:  # the charge may still happen: the key settles it (see reconcile)
            raise PaymentOutcomeUnknown(purchase.purchase_id) from None

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
            declined = (
                FailedPrecondition(
                    "PURCHASE_VOIDED",
                    "the purchase was left unfinished (no retry came in time) and voided: the card "
                    "was never charged and no coins moved; buy again with a new request_id",
                    purchase_id=purchase_id,
                )
                if charge.decline_reason in (NEVER_CHARGED, VOIDED_KEY)
                else FailedPrecondition(
                    "PAYMENT_DECLINED",
                    f"the payment provider declined the payment ({charge.decline_reason})",
                    decline_reason=charge.decline_reason,
                    purchase_id=purchase_id,
                )
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
        return await settle_each(
            log, stale, self._reconcile_one, lambda p: f"cannot settle purchase {p.purchase_id}"
        )

    async def _reconcile_one(self, purchase: storage.PurchaseRecord) -> int:
        """1 if this pending purchase was settled now, 0 if not (yet)."""
        try:
            charge = await asyncio.wait_for(
                self._payments.void(purchase.purchase_id), timeout=self._charge_timeout
            )
        except (PaymentOutcomeUnknown, TimeoutError):
            return 0  # the provider is not answering; next round
        if charge is None:
            charge = ChargeResult(False, f"none:{purchase.purchase_id}", NEVER_CHARGED)
        try:
            await self.settle(purchase.purchase_id, charge, f"reconcile/{purchase.purchase_id}")
        except Aborted:
            return 0  # the request's own retry settled it
        return 1


NEVER_CHARGED = "never_charged"
"""The reconciler's outcome for a purchase the provider never charged (voided there first)."""
_REVERSALS = {"refund": "refunded", "chargeback": "charged_back"}


async def reverse(
    conn: AsyncConnection,
    wallet: Wallet,
    *,
    provider_transaction_id: str,
    kind: str,
    event_id: str,
    now: dt.datetime,
) -> tuple[storage.PurchaseRecord, Coins]:
    """A provider's refund or chargeback (`kind`) of the purchase it paid: only a completed purchase
    is reversed, once; the coins come back as `Wallet.reverse_purchase` says. Returns the reversed
    purchase and the buyer's coins afterwards."""
    purchase = await storage.get_purchase_by_provider_transaction(conn, provider_transaction_id)
    if purchase is None:
        # Not final: a purchase whose charge answer was lost learns its provider transaction id
        # only when it is settled (a retry, the reconciler); the event, redelivered, applies then.
        raise NotFoundYet(
            "PURCHASE_NOT_FOUND",
            f"no purchase was paid with {provider_transaction_id!r} (yet: a purchase still being "
            "settled gets it then); redeliver the event later",
            provider_transaction_id=provider_transaction_id,
        )
    if purchase.status == _REVERSALS[kind] and await wallet.reversed_by(conn, event_id):
        # This very event reversed it, and its request id has since been forgotten (the
        # retention): the providers redeliver for days. Its answer again, as of now.
        return purchase, await wallet.coins(conn, purchase.user_id)
    _refuse_unless_reversible(purchase, completed_only=False)
    if not await storage.reverse_purchase(conn, purchase.purchase_id, _REVERSALS[kind], now):
        # Its status moved since it was read: a concurrent event reversed it, or it settled.
        current = await storage.get_purchase(conn, purchase.purchase_id)
        assert current is not None
        _refuse_unless_reversible(current, completed_only=True)
        raise Aborted(
            "CONCURRENT_UPDATE",
            f"purchase {purchase.purchase_id} changed while this event applied; redeliver it",
        )
    coins = await wallet.reverse_purchase(conn, purchase, kind, event_id)
    reversed_ = await storage.get_purchase(conn, purchase.purchase_id)
    assert reversed_ is not None
    return reversed_, coins


def _refuse_unless_reversible(purchase: storage.PurchaseRecord, *, completed_only: bool) -> None:
    """PURCHASE_ALREADY_REVERSED for a reversed purchase; with `completed_only`, PURCHASE_NOT_COMPLETED
    for any other that is not completed (final for a failed one; a pending one may still complete,
    and the event, redelivered, applies then)."""
    if purchase.status in _REVERSALS.values():
        raise FailedPrecondition(
            "PURCHASE_ALREADY_REVERSED",
            f"purchase {purchase.purchase_id} is already {purchase.status}",
            purchase_id=purchase.purchase_id,
            status=enum_name("PURCHASE_STATUS", purchase.status),
        )
    if completed_only and purchase.status != "completed":
        pending = purchase.status == "pending"
        raise (FailedPreconditionYet if pending else FailedPrecondition)(
            "PURCHASE_NOT_COMPLETED",
            f"purchase {purchase.purchase_id} is {purchase.status}; "
            + (
                "redeliver the event once it has completed"
                if pending
                else "it was never paid, so there is nothing to take back: check which purchase "
                "the provider's event is about"
            ),
            purchase_id=purchase.purchase_id,
            status=enum_name("PURCHASE_STATUS", purchase.status),
        )


def purchase_scope(user_id: str) -> str:
    """Where a user's PurchaseCoins request ids are kept (runtime.idempotency)."""
    return f"PurchaseCoins:{user_id}"
