"""The wallet's hold RPCs (two-phase coin movements), mixed into WalletApi.

Holds are placed for a user (whose token the calling service passes on) and afterwards captured or
released by the service that placed them, without a user token: a promotion is delivered, and its
budget consumed, long after the viewer created it.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from coins.wallet.v1 import wallet_pb2
from runtime.auth import current_principal
from runtime.db import Database
from runtime.idempotency import Idempotency
from runtime.protos import RpcContext, to_timedelta
from services.wallet.convert import DEBIT_REASONS, balance_pb, hold_pb
from services.wallet.domain import Wallet, user_of


class HoldRpcs:
    _db: Database
    _idempotency: Idempotency
    _wallet: Wallet

    async def _coins(self, conn: AsyncConnection, account_id: str) -> wallet_pb2.Balance:
        return balance_pb(await self._wallet.coins(conn, user_of(account_id)))

    async def PlaceHold(
        self, request: wallet_pb2.PlaceHoldRequest, context: RpcContext
    ) -> wallet_pb2.PlaceHoldResponse:
        caller = current_principal().service
        expire_after = (
            to_timedelta(request.expire_after, "expire_after")
            if request.HasField("expire_after")
            else None
        )
        scope = f"PlaceHold:{caller}:{request.user_id}"

        async def effect(conn: AsyncConnection) -> wallet_pb2.PlaceHoldResponse:
            hold = await self._wallet.place_hold(
                conn,
                user_id=request.user_id,
                coins=request.coins,
                reason=DEBIT_REASONS[request.reason],
                reference=request.reference,
                owner=caller,
                expire_after=expire_after,
                placed_under=f"{scope}/{request.request_id}",
            )
            return wallet_pb2.PlaceHoldResponse(
                hold=hold_pb(hold), balance=await self._coins(conn, hold.account_id)
            )

        return await self._idempotency.once(scope, request, wallet_pb2.PlaceHoldResponse, effect)

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
                balance=await self._coins(conn, account),
            )

        return await self._idempotency.once(
            f"CaptureHold:{caller}",  # never the hold: an id reused for another is REQUEST_ID_REUSED
            request,
            wallet_pb2.CaptureHoldResponse,
            effect,
        )

    async def ReleaseHold(
        self, request: wallet_pb2.ReleaseHoldRequest, context: RpcContext
    ) -> wallet_pb2.ReleaseHoldResponse:
        caller = current_principal().service

        async def effect(conn: AsyncConnection) -> wallet_pb2.ReleaseHoldResponse:
            hold = await self._wallet.release_hold(conn, request.hold_id, owner=caller)
            return wallet_pb2.ReleaseHoldResponse(
                hold=hold_pb(hold), balance=await self._coins(conn, hold.account_id)
            )

        return await self._idempotency.once(
            f"ReleaseHold:{caller}",  # never the hold: an id reused for another is REQUEST_ID_REUSED
            request,
            wallet_pb2.ReleaseHoldResponse,
            effect,
        )

    async def GetHold(
        self, request: wallet_pb2.GetHoldRequest, context: RpcContext
    ) -> wallet_pb2.GetHoldResponse:
        caller = current_principal().service
        async with self._db.read() as conn:
            hold = await self._wallet.holds.as_it_stands(conn, request.hold_id, caller)
        return wallet_pb2.GetHoldResponse(hold=hold_pb(hold))
