"""The wallet's payment-event RPC (refunds and chargebacks from the provider), mixed into WalletApi."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from coins.wallet.v1 import wallet_pb2
from runtime.clock import Clock
from runtime.errors import FailedPrecondition, NotFound
from runtime.idempotency import Idempotency
from runtime.protos import RpcContext
from services.wallet import storage
from services.wallet.convert import balance_pb, purchase_pb
from services.wallet.domain import Wallet

_REVERSALS = {
    wallet_pb2.PAYMENT_EVENT_TYPE_REFUND: ("refund", "refunded"),
    wallet_pb2.PAYMENT_EVENT_TYPE_CHARGEBACK: ("chargeback", "charged_back"),
}


class PaymentEventRpcs:
    _idempotency: Idempotency
    _clock: Clock
    _wallet: Wallet

    async def RecordPaymentEvent(
        self, request: wallet_pb2.RecordPaymentEventRequest, context: RpcContext
    ) -> wallet_pb2.RecordPaymentEventResponse:
        kind, status = _REVERSALS[request.type]

        async def effect(conn: AsyncConnection) -> wallet_pb2.RecordPaymentEventResponse:
            purchase = await storage.get_purchase_by_provider_transaction(
                conn, request.provider_transaction_id
            )
            if purchase is None:
                raise NotFound(
                    "PURCHASE_NOT_FOUND",
                    f"no purchase was paid with {request.provider_transaction_id!r}",
                    provider_transaction_id=request.provider_transaction_id,
                )
            if purchase.status in ("refunded", "charged_back"):
                raise FailedPrecondition(
                    "PURCHASE_ALREADY_REVERSED",
                    f"purchase {purchase.purchase_id} is already {purchase.status}",
                    purchase_id=purchase.purchase_id,
                    status=purchase.status,
                )
            if not await storage.reverse_purchase(
                conn, purchase.purchase_id, status, self._clock.now()
            ):
                raise FailedPrecondition(
                    "PURCHASE_NOT_COMPLETED",
                    f"purchase {purchase.purchase_id} is {purchase.status}; redeliver the event "
                    "once it has completed",
                    purchase_id=purchase.purchase_id,
                    status=purchase.status,
                )
            coins = await self._wallet.reverse_purchase(conn, purchase, kind, request.request_id)
            reversed_ = await storage.get_purchase(conn, purchase.purchase_id)
            assert reversed_ is not None
            return wallet_pb2.RecordPaymentEventResponse(
                purchase=purchase_pb(reversed_), balance=balance_pb(coins)
            )

        return await self._idempotency.once(
            "RecordPaymentEvent", request, wallet_pb2.RecordPaymentEventResponse, effect
        )
