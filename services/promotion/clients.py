"""Adapter from the promotion domain's wallet port to the wallet's gRPC contract."""

from __future__ import annotations

import grpc

from coins.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from runtime.status import from_rpc_error
from services.promotion.domain import debit_request_id


def budget_request(promotion_id: str, user_id: str, coins: int) -> wallet_pb2.DebitCoinsRequest:
    """What promotion asks of the wallet for one budget (pinned by contracts/wallet.json)."""
    return wallet_pb2.DebitCoinsRequest(
        request_id=debit_request_id(promotion_id),
        user_id=user_id,
        coins=coins,
        reason=wallet_pb2.DEBIT_REASON_PROMOTION,
        reference=promotion_id,
    )


class WalletBudgetPayer:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._wallet = wallet_pb2_grpc.WalletServiceStub(channel)

    async def pay_budget(
        self, *, promotion_id: str, user_id: str, coins: int, time_limit: float
    ) -> tuple[str, int]:
        try:
            response = await self._wallet.DebitCoins(
                budget_request(promotion_id, user_id, coins), timeout=time_limit
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, dependency="wallet") from None
        return response.transaction_id, response.balance.coins
