"""The wallet's hold RPCs (two-phase coin movements), mixed into WalletApi.

Holds are placed for a user (whose token the calling service passes on) and afterwards captured or
released by the service that placed them, without a user token: a promotion is delivered, and its
budget consumed, long after the viewer created it.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from coins.wallet.v1 import wallet_pb2
from ledger import Hold
from runtime.auth import current_principal
from runtime.db import Database
from runtime.idempotency import Idempotency
from runtime.protos import RpcContext, timestamp
from services.wallet.domain import Wallet

_HOLD_STATUS = {
    "active": wallet_pb2.HOLD_STATUS_ACTIVE,
    "captured": wallet_pb2.HOLD_STATUS_CAPTURED,
    "released": wallet_pb2.HOLD_STATUS_RELEASED,
    "expired": wallet_pb2.HOLD_STATUS_EXPIRED,
}
_REASONS = {wallet_pb2.DEBIT_REASON_GIFT: "gift", wallet_pb2.DEBIT_REASON_PROMOTION: "promotion"}


def hold_pb(hold: Hold) -> wallet_pb2.Hold:
    message = wallet_pb2.Hold(
        hold_id=hold.hold_id,
        user_id=hold.account_id.removeprefix("user:"),
        amount_coins=hold.amount,
        captured_coins=hold.captured,
        status=_HOLD_STATUS[hold.status],
        owner_service=hold.owner,
        reference=hold.reference,
        create_time=timestamp(hold.created_at),
        update_time=timestamp(hold.updated_at),
    )
    if hold.expires_at is not None:
        message.expire_time.CopyFrom(timestamp(hold.expires_at))
    return message


class HoldRpcs:
    _db: Database
    _idempotency: Idempotency
    _wallet: Wallet

    async def _coins(self, conn: AsyncConnection, account_id: str) -> wallet_pb2.Balance:
        balance, available = await self._wallet.coins(conn, account_id.removeprefix("user:"))
        return wallet_pb2.Balance(coins=balance, available_coins=available)

    async def PlaceHold(
        self, request: wallet_pb2.PlaceHoldRequest, context: RpcContext
    ) -> wallet_pb2.PlaceHoldResponse:
        caller = current_principal().service
        expire_after = (
            request.expire_after.ToTimedelta() if request.HasField("expire_after") else None
        )

        async def effect(conn: AsyncConnection) -> wallet_pb2.PlaceHoldResponse:
            hold = await self._wallet.place_hold(
                conn,
                user_id=request.user_id,
                coins=request.coins,
                reason=_REASONS[request.reason],
                reference=request.reference,
                owner=caller,
                expire_after=expire_after,
            )
            return wallet_pb2.PlaceHoldResponse(
                hold=hold_pb(hold), balance=await self._coins(conn, hold.account_id)
            )

        return await self._idempotency.once(
            f"PlaceHold:{caller}:{request.user_id}", request, wallet_pb2.PlaceHoldResponse, effect
        )

    async def CaptureHold(
        self, request: wallet_pb2.CaptureHoldRequest, context: RpcContext
    ) -> wallet_pb2.CaptureHoldResponse:
        caller = current_principal().service

        async def effect(conn: AsyncConnection) -> wallet_pb2.CaptureHoldResponse:
            hold, posted = await self._wallet.holds.capture(
                conn,
                request.hold_id,
                request.coins,
                owner=caller,
                request_id=f"CaptureHold:{request.hold_id}/{request.request_id}",
                caller=caller,
                policy_version=self._wallet.settings.policy_version,
            )
            account = hold.account_id
            return wallet_pb2.CaptureHoldResponse(
                hold=hold_pb(hold),
                transaction_id=posted.transaction_id,
                balance=wallet_pb2.Balance(
                    coins=posted.balances[account], available_coins=posted.available[account]
                ),
            )

        return await self._idempotency.once(
            f"CaptureHold:{caller}:{request.hold_id}",
            request,
            wallet_pb2.CaptureHoldResponse,
            effect,
        )

    async def ReleaseHold(
        self, request: wallet_pb2.ReleaseHoldRequest, context: RpcContext
    ) -> wallet_pb2.ReleaseHoldResponse:
        caller = current_principal().service

        async def effect(conn: AsyncConnection) -> wallet_pb2.ReleaseHoldResponse:
            hold = await self._wallet.holds.release(conn, request.hold_id, owner=caller)
            return wallet_pb2.ReleaseHoldResponse(
                hold=hold_pb(hold), balance=await self._coins(conn, hold.account_id)
            )

        return await self._idempotency.once(
            f"ReleaseHold:{caller}:{request.hold_id}",
            request,
            wallet_pb2.ReleaseHoldResponse,
            effect,
        )

    async def GetHold(
        self, request: wallet_pb2.GetHoldRequest, context: RpcContext
    ) -> wallet_pb2.GetHoldResponse:
        caller = current_principal().service
        async with self._db.read() as conn:
            hold = await self._wallet.holds.owned(conn, request.hold_id, caller)
        return wallet_pb2.GetHoldResponse(hold=hold_pb(hold))
