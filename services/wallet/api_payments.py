"""The wallet's payment-event RPC (refunds and chargebacks from the provider), mixed into WalletApi."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from coins.wallet.v1 import wallet_pb2
from runtime.clock import Clock
from runtime.idempotency import Idempotency
from runtime.protos import RpcContext
from services.wallet import purchases
from services.wallet.convert import balance_pb, purchase_pb
from services.wallet.domain import Wallet

_REVERSALS = {
    wallet_pb2.PAYMENT_EVENT_TYPE_REFUND: "refund",
    wallet_pb2.PAYMENT_EVENT_TYPE_CHARGEBACK: "chargeback",
}


class PaymentEventRpcs:
    _idempotency: Idempotency
    _clock: Clock
    _wallet: Wallet

    async def RecordPaymentEvent(
        self, request: wallet_pb2.RecordPaymentEventRequest, context: RpcContext
    ) -> wallet_pb2.RecordPaymentEventResponse:
        async def effect(conn: AsyncConnection) -> wallet_pb2.RecordPaymentEventResponse:
            purchase, coins = await purchases.reverse(
                conn,
                self._wallet,
                provider_transaction_id=request.provider_transaction_id,
                kind=_REVERSALS[request.type],
                event_id=request.request_id,
                now=self._clock.now(),
            )
            return wallet_pb2.RecordPaymentEventResponse(
                purchase=purchase_pb(purchase), balance=balance_pb(coins)
            )

        return await self._idempotency.once(
            "RecordPaymentEvent", request, wallet_pb2.RecordPaymentEventResponse, effect
        )
