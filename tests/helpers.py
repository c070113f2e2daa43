"""Small helpers that keep the tests reading like the specification."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from typing import Any

import grpc
import grpc.aio
import pytest
from google.type import date_pb2

from coins.wallet.v1 import wallet_pb2
from runtime.status import bad_request, error_info
from tests.suite import Suite


def new_id(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def adult_birth_date() -> date_pb2.Date:
    return date_pb2.Date(year=1990, month=5, day=17)


async def open_account(suite: Suite, user_id: str, country: str = "US") -> wallet_pb2.Account:
    response = await suite.wallet.OpenAccount(
        wallet_pb2.OpenAccountRequest(
            request_id=new_id("open"),
            user_id=user_id,
            country_code=country,
            birth_date=adult_birth_date(),
        )
    )
    return response.account


async def funded_user(suite: Suite, package_id: str = "us-web-700") -> tuple[str, int]:
    """A new adult US user who bought one package; returns (user id, coins)."""
    user_id = new_id("viewer")
    await open_account(suite, user_id)
    bought = await suite.wallet.PurchaseCoins(
        wallet_pb2.PurchaseCoinsRequest(
            request_id=new_id("buy"),
            user_id=user_id,
            package_id=package_id,
            payment_token="tok_visa",
        )
    )
    return user_id, bought.balance.coins


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def expect_error(
    call: Awaitable[Any], code: grpc.StatusCode, reason: str
) -> grpc.aio.AioRpcError:
    """Assert the call fails with `code` and exactly this ErrorInfo reason; returns the error."""
    error = await rpc_error(call)
    assert error.code() == code, f"{error.code()} {error.details()}"
    info = error_info(error)
    assert info is not None, "no ErrorInfo in the status details"
    assert info.reason == reason, f"reason {info.reason}: {error.details()}"
    return error


def field_violations(error: grpc.RpcError) -> set[str]:
    found = bad_request(error)
    return {v.field for v in found.field_violations} if found else set()
