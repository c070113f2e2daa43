"""Wallet: accounts, regional packages, purchases through the sandbox provider, debits and the ledger."""

from __future__ import annotations

import datetime as dt

import grpc
from google.type import date_pb2

from coins.wallet.v1 import wallet_pb2
from runtime.status import error_info
from tests.helpers import expect_error, funded_user, new_id, open_account
from tests.suite import Suite


def purchase(user: str, package: str, token: str = "tok_visa") -> wallet_pb2.PurchaseCoinsRequest:
    return wallet_pb2.PurchaseCoinsRequest(
        request_id=new_id("buy"), user_id=user, package_id=package, payment_token=token
    )


async def coins_of(suite: Suite, user: str) -> int:
    response = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    return response.balance.coins


async def test_an_opened_account_has_no_coins_and_its_regions_currency(suite: Suite) -> None:
    user = new_id()
    account = await open_account(suite, user, country="GB")
    assert (account.user_id, account.country_code, account.currency_code) == (user, "GB", "GBP")
    assert account.balance.coins == 0
    fetched = await suite.wallet.GetAccount(wallet_pb2.GetAccountRequest(user_id=user))
    assert fetched.account == account


async def test_opening_an_account_again_with_other_details_is_refused(suite: Suite) -> None:
    user = new_id()
    await open_account(suite, user, country="US")
    assert (await open_account(suite, user, country="US")).country_code == "US"  # same: no-op
    await expect_error(
        suite.wallet.OpenAccount(
            wallet_pb2.OpenAccountRequest(
                request_id=new_id(),
                user_id=user,
                country_code="GB",
                birth_date=date_pb2.Date(year=1990, month=5, day=17),
            )
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "ACCOUNT_EXISTS",
    )


async def test_packages_follow_the_accounts_region_and_channel(suite: Suite) -> None:
    gb = new_id()
    await open_account(suite, gb, country="GB")
    listed = await suite.wallet.ListCoinPackages(
        wallet_pb2.ListCoinPackagesRequest(user_id=gb, channel=wallet_pb2.CHANNEL_IN_APP)
    )
    assert [(p.coins, p.price.amount_minor) for p in listed.packages][:2] == [(65, 89), (330, 449)]
    assert {p.price.currency_code for p in listed.packages} == {"GBP"}
    us = new_id()
    await open_account(suite, us)
    web = await suite.wallet.ListCoinPackages(
        wallet_pb2.ListCoinPackagesRequest(user_id=us, channel=wallet_pb2.CHANNEL_WEB, page_size=3)
    )
    assert [p.coins for p in web.packages] == [70, 350, 700]
    rest = await suite.wallet.ListCoinPackages(
        wallet_pb2.ListCoinPackagesRequest(
            user_id=us, channel=wallet_pb2.CHANNEL_WEB, page_token=web.next_page_token
        )
    )
    assert [p.coins for p in rest.packages] == [1400, 3500, 7000, 17500]
    assert rest.next_page_token == ""


async def test_a_purchase_credits_the_packages_coins(suite: Suite) -> None:
    user = new_id()
    await open_account(suite, user)
    response = await suite.wallet.PurchaseCoins(purchase(user, "us-in-app-330"))
    assert response.purchase.status == wallet_pb2.PURCHASE_STATUS_COMPLETED
    assert response.purchase.package.price.amount_minor == 499
    assert response.purchase.provider_transaction_id.startswith("sbx_")
    assert response.balance.coins == 330
    assert await coins_of(suite, user) == 330


async def test_a_declined_payment_credits_nothing_and_retries_get_the_same_answer(
    suite: Suite,
) -> None:
    user = new_id()
    await open_account(suite, user)
    request = purchase(user, "us-web-700", token="tok_decline_insufficient_funds")
    error = await expect_error(
        suite.wallet.PurchaseCoins(request), grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_DECLINED"
    )
    again = await expect_error(
        suite.wallet.PurchaseCoins(request), grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_DECLINED"
    )
    assert error.details() == again.details()
    assert await coins_of(suite, user) == 0


async def test_minors_cannot_buy_coins(suite: Suite) -> None:
    user = new_id("teen")
    today = dt.date.today()
    await suite.wallet.OpenAccount(
        wallet_pb2.OpenAccountRequest(
            request_id=new_id(),
            user_id=user,
            country_code="US",
            birth_date=date_pb2.Date(year=today.year - 17, month=1, day=1),
        )
    )
    await expect_error(
        suite.wallet.PurchaseCoins(purchase(user, "us-web-70")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "AGE_RESTRICTED",
    )
    assert await coins_of(suite, user) == 0


async def test_unsupported_regions_cannot_buy(suite: Suite) -> None:
    user = new_id()
    await open_account(suite, user, country="CA")
    await expect_error(
        suite.wallet.PurchaseCoins(purchase(user, "us-web-70")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "REGION_UNSUPPORTED",
    )


async def test_another_regions_package_is_not_for_sale(suite: Suite) -> None:
    user = new_id()
    await open_account(suite, user, country="GB")
    await expect_error(
        suite.wallet.PurchaseCoins(purchase(user, "us-web-70")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PACKAGE_NOT_AVAILABLE",
    )
    await expect_error(
        suite.wallet.PurchaseCoins(purchase(user, "no-such-package")),
        grpc.StatusCode.NOT_FOUND,
        "PACKAGE_NOT_FOUND",
    )


async def test_unknown_accounts_are_not_found(suite: Suite) -> None:
    ghost = new_id("ghost")
    await expect_error(
        suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=ghost)),
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )
    await expect_error(
        suite.wallet.PurchaseCoins(purchase(ghost, "us-web-70")),
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )


def debit(user: str, coins: int, request_id: str | None = None) -> wallet_pb2.DebitCoinsRequest:
    return wallet_pb2.DebitCoinsRequest(
        request_id=request_id or new_id("debit"),
        user_id=user,
        coins=coins,
        reason=wallet_pb2.DEBIT_REASON_GIFT,
        reference="gift-ref",
    )


async def test_a_debit_returns_the_new_balance_and_never_overdraws(suite: Suite) -> None:
    user, coins = await funded_user(suite)
    response = await suite.as_caller("gifting").wallet.DebitCoins(debit(user, 100))
    assert response.balance.coins == coins - 100
    error = await expect_error(
        suite.as_caller("gifting").wallet.DebitCoins(debit(user, coins)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_FUNDS",
    )
    info = error_info(error)
    assert info is not None
    assert info.metadata["balance"] == str(coins - 100)
    assert info.metadata["required"] == str(coins)
    assert await coins_of(suite, user) == coins - 100


async def test_the_ledger_lists_entries_newest_first_with_running_balances(suite: Suite) -> None:
    user, coins = await funded_user(suite)
    assert coins == 700
    for amount in (10, 20, 30):
        await suite.as_caller("gifting").wallet.DebitCoins(debit(user, amount))
    page = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=user, page_size=2)
    )
    assert [(e.amount, e.balance_after) for e in page.entries] == [(-30, 640), (-20, 670)]
    rest = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=user, page_token=page.next_page_token)
    )
    assert [(e.amount, e.balance_after, e.kind) for e in rest.entries] == [
        (-10, 690, wallet_pb2.ENTRY_KIND_GIFT),
        (700, 700, wallet_pb2.ENTRY_KIND_PURCHASE),
    ]
    assert rest.next_page_token == ""
    assert all(e.transaction_id and e.create_time.seconds for e in page.entries)


async def test_a_custom_amount_is_priced_at_the_regions_rate_rounded_up(suite: Suite) -> None:
    user = new_id()
    await open_account(suite, user)
    bought = await suite.wallet.PurchaseCoins(
        wallet_pb2.PurchaseCoinsRequest(
            request_id=new_id(), user_id=user, custom_coins=1_234, payment_token="tok_visa"
        )
    )
    package = bought.purchase.package
    assert (package.package_id, package.coins) == ("custom", 1_234)
    assert package.price.amount_minor == 1_765  # 1,234 x $1.43 / 100 = $17.6462, rounded up
    assert bought.balance.coins == 1_234


async def test_a_custom_amount_outside_the_bounds_or_with_a_package_is_refused(
    suite: Suite,
) -> None:
    user = new_id()
    await open_account(suite, user)
    for coins, package, reason in (
        (29, "", "CUSTOM_AMOUNT_OUT_OF_BOUNDS"),
        (2_500_001, "", "CUSTOM_AMOUNT_OUT_OF_BOUNDS"),
        (100, "us-web-70", "INVALID_REQUEST"),
        (0, "", "INVALID_REQUEST"),
    ):
        await expect_error(
            suite.wallet.PurchaseCoins(
                wallet_pb2.PurchaseCoinsRequest(
                    request_id=new_id(),
                    user_id=user,
                    package_id=package,
                    custom_coins=coins,
                    payment_token="tok_visa",
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            reason,
        )
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    assert balance.balance.coins == 0
