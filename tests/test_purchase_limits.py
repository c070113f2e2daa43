"""Purchase limits per user (hourly and daily, coins and money) and per payment method: a purchase
that would pass one is refused with RESOURCE_EXHAUSTED, naming the limit and what remains, and
charges nothing. Tight limits need a suite of their own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from coins.wallet.v1 import wallet_pb2
from runtime.status import error_info
from tests.helpers import expect_error, new_id, open_account
from tests.suite import Suite, start_suite
from tests.test_coinsctl import coinsctl


@pytest.fixture(scope="module")
async def limited(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    suite = await start_suite(
        backend,
        tmp_path_factory.mktemp(f"limits-{backend}"),
        overrides={
            "wallet": {
                "limit_hourly_coins": 1_500,
                "limit_daily_coins": 100_000,
                "limit_hourly_minor": 100_000,
                "limit_daily_minor": 1_500,
                "limit_payment_method_daily_minor": 1_200,
            }
        },
    )
    yield suite
    await suite.stop()


def buy(user: str, package: str, token: str = "tok_visa") -> wallet_pb2.PurchaseCoinsRequest:
    return wallet_pb2.PurchaseCoinsRequest(
        request_id=new_id("buy"), user_id=user, package_id=package, payment_token=token
    )


async def test_the_hourly_coin_limit_names_what_remains(limited: Suite) -> None:
    user = new_id()
    await open_account(limited, user)
    await limited.wallet.PurchaseCoins(buy(user, "us-web-700", new_id("tok")))  # 700 coins, $9.99
    error = await expect_error(
        limited.wallet.PurchaseCoins(buy(user, "us-web-1400", new_id("tok"))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "PURCHASE_LIMIT_EXCEEDED",
    )
    info = error_info(error)
    assert info is not None
    assert (info.metadata["limit"], info.metadata["remaining"]) == ("hourly_coins", "800")
    balance = await limited.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    assert balance.balance.coins == 700  # the refused purchase charged and credited nothing
    await limited.wallet.PurchaseCoins(buy(user, "us-web-350", new_id("tok")))  # 800 left: fits


async def test_the_daily_money_limit(limited: Suite) -> None:
    user = new_id()
    await open_account(limited, user)
    for _ in range(3):
        await limited.wallet.PurchaseCoins(buy(user, "us-web-70", new_id("tok")))  # $0.99 each
    await limited.wallet.PurchaseCoins(buy(user, "us-web-700", new_id("tok")))  # $9.99: $12.96
    error = await expect_error(
        limited.wallet.PurchaseCoins(buy(user, "us-web-350", new_id("tok"))),  # $4.99 more
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "PURCHASE_LIMIT_EXCEEDED",
    )
    info = error_info(error)
    assert info is not None
    assert (info.metadata["limit"], info.metadata["remaining"], info.metadata["unit"]) == (
        "daily_money",
        str(1_500 - 3 * 99 - 999),
        "USD",
    )


async def test_a_payment_method_is_limited_across_users(limited: Suite) -> None:
    card = new_id("tok_card")
    first, second = new_id(), new_id()
    for user in (first, second):
        await open_account(limited, user)
    await limited.wallet.PurchaseCoins(buy(first, "us-web-700", card))  # $9.99
    error = await expect_error(
        limited.wallet.PurchaseCoins(buy(second, "us-web-350", card)),  # $4.99 more on the card
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "PURCHASE_LIMIT_EXCEEDED",
    )
    info = error_info(error)
    assert info is not None and info.metadata["limit"] == "payment_method_daily_money"
    await limited.wallet.PurchaseCoins(buy(second, "us-web-350", new_id("tok_other")))


async def test_a_payment_method_limit_holds_under_concurrent_purchases(limited: Suite) -> None:
    """Purchases by several users with one card at once: their total stays within the card's limit."""
    card = new_id("tok_shared")
    users = [new_id() for _ in range(4)]
    for user in users:
        await open_account(limited, user)
    results = await asyncio.gather(
        *(limited.wallet.PurchaseCoins(buy(user, "us-web-350", card)) for user in users),
        return_exceptions=True,
    )
    approved = [r for r in results if isinstance(r, wallet_pb2.PurchaseCoinsResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(approved) * 499 <= 1_200 < (len(approved) + 1) * 499  # exactly as many as fit
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)


async def test_coinsctl_buys_with_each_users_own_card_and_gives_no_retry_advice_for_a_limit(
    limited: Suite,
) -> None:
    """Its default payment token is the user's own sandbox card (two users' $9.99 purchases fit the
    $12 per-card limit); a limit reached is an answer, not an outage: no "retry with the same
    request id" advice."""
    first, second = new_id("viewer"), new_id("viewer")
    for user in (first, second):
        await open_account(limited, user)
        code, output = await coinsctl(limited, "buy", user, "us-web-700")
        assert code == 0, output
    code, output = await coinsctl(limited, "buy", first, "us-web-1400")
    assert code == 1 and "PURCHASE_LIMIT_EXCEEDED" in output, output
    assert "may or may not" not in output and "--request-id" not in output, output


async def test_a_cards_daily_money_is_counted_per_currency(limited: Suite) -> None:
    """A card that bought $9.99 in the US and is then used in the UK: the pounds have a window of
    their own ($9.99 counted as 999 pence refused a £4.49 purchase under a £12 limit)."""
    card = new_id("tok_travel")
    american, british = new_id(), new_id()
    await open_account(limited, american)
    await open_account(limited, british, "GB")
    await limited.wallet.PurchaseCoins(buy(american, "us-web-700", card))  # 999 cents
    bought = await limited.wallet.PurchaseCoins(buy(british, "gb-in-app-330", card))  # £4.49
    assert bought.purchase.package.price.currency_code == "GBP"
