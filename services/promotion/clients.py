"""Adapter from the promotion domain's wallet port to the wallet's gRPC contract.

The request builders below are what promotion sends; contracts/wallet.json pins them (and what
promotion reads from the answers), and tests/test_consumer_contracts.py checks that against the wallet.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import grpc
from google.protobuf import duration_pb2

from coins.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from runtime.clients import answer_of
from runtime.errors import DEBIT_VOIDED
from services.promotion.domain import (
    Captured,
    HeldBudget,
    Released,
    capture_request_id,
    debit_request_id,
    hold_lifetime,
    hold_request_id,
    release_request_id,
)

R = TypeVar("R")


def budget_request(promotion_id: str, user_id: str, coins: int) -> wallet_pb2.DebitCoinsRequest:
    """The debit of a whole budget (promotions created before budgets were held, resumed)."""
    return wallet_pb2.DebitCoinsRequest(
        request_id=debit_request_id(promotion_id),
        user_id=user_id,
        coins=coins,
        reason=wallet_pb2.DEBIT_REASON_PROMOTION,
        reference=promotion_id,
    )


def hold_request(
    promotion_id: str, user_id: str, coins: int, duration_days: int
) -> wallet_pb2.PlaceHoldRequest:
    """The hold of a promotion's budget, until its end and a grace day."""
    lifetime = duration_pb2.Duration()
    lifetime.FromTimedelta(hold_lifetime(duration_days))
    return wallet_pb2.PlaceHoldRequest(
        request_id=hold_request_id(promotion_id),
        user_id=user_id,
        coins=coins,
        reason=wallet_pb2.DEBIT_REASON_PROMOTION,
        reference=promotion_id,
        expire_after=lifetime,
    )


def capture_request(
    promotion_id: str, hold_id: str, report_request_id: str, coins: int
) -> wallet_pb2.CaptureHoldRequest:
    """The capture of one delivery report."""
    return wallet_pb2.CaptureHoldRequest(
        request_id=capture_request_id(promotion_id, report_request_id),
        hold_id=hold_id,
        coins=coins,
    )


def release_request(promotion_id: str, hold_id: str) -> wallet_pb2.ReleaseHoldRequest:
    """The release of what a promotion's hold has left when it is ended."""
    return wallet_pb2.ReleaseHoldRequest(
        request_id=release_request_id(promotion_id), hold_id=hold_id
    )


def _call(call: Awaitable[R]) -> Awaitable[R]:
    return answer_of(call, "wallet")


class WalletBudget:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._wallet = wallet_pb2_grpc.WalletServiceStub(channel)

    async def hold_budget(
        self,
        *,
        promotion_id: str,
        user_id: str,
        coins: int,
        duration_days: int,
        time_limit: float,
    ) -> HeldBudget:
        request = hold_request(promotion_id, user_id, coins, duration_days)
        response = await _call(self._wallet.PlaceHold(request, timeout=time_limit))
        return HeldBudget(response.hold.hold_id, response.balance.available_coins)

    async def resolve_budget_hold(
        self, *, promotion_id: str, user_id: str, time_limit: float
    ) -> HeldBudget | str:
        request = wallet_pb2.ResolveHoldRequest(
            request_id=hold_request_id(promotion_id), user_id=user_id
        )
        response = await _call(self._wallet.ResolveHold(request, timeout=time_limit))
        if response.outcome == wallet_pb2.HOLD_OUTCOME_PLACED:
            placed = response.placed
            return HeldBudget(placed.hold.hold_id, placed.balance.available_coins)
        if response.outcome == wallet_pb2.HOLD_OUTCOME_VOIDED:
            return DEBIT_VOIDED
        return response.reason

    async def capture(
        self,
        *,
        promotion_id: str,
        hold_id: str,
        report_request_id: str,
        coins: int,
        time_limit: float,
    ) -> Captured:
        request = capture_request(promotion_id, hold_id, report_request_id, coins)
        response = await _call(self._wallet.CaptureHold(request, timeout=time_limit))
        return Captured(response.transaction_id)

    async def release(self, *, promotion_id: str, hold_id: str, time_limit: float) -> Released:
        request = release_request(promotion_id, hold_id)
        response = await _call(self._wallet.ReleaseHold(request, timeout=time_limit))
        return Released(response.hold.amount_coins - response.hold.captured_coins)

    async def pay_budget(
        self, *, promotion_id: str, user_id: str, coins: int, time_limit: float
    ) -> tuple[str, int]:
        request = budget_request(promotion_id, user_id, coins)
        response = await _call(self._wallet.DebitCoins(request, timeout=time_limit))
        return response.transaction_id, response.balance.available_coins
