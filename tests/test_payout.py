"""Payout: diamonds from gift coins, withdrawals with a minimum, a daily cap and a processor."""

from __future__ import annotations

import grpc

from coins.payout.v1 import payout_pb2
from tests.helpers import (
    error_metadata,
    eventually,
    expect_error,
    field_violations,
    new_id,
    verify_creator,
)
from tests.suite import Suite


async def creator_with_diamonds(suite: Suite, diamonds: int) -> str:
    creator = new_id("creator")
    await suite.as_caller("gifting").payout.CreditDiamonds(
        payout_pb2.CreditDiamondsRequest(
            request_id=new_id("gift"), creator_id=creator, coins=diamonds * 2, reference="seed"
        )
    )
    await verify_creator(suite, creator)
    return creator


def withdrawal(
    creator: str, diamonds: int, destination: str = "dest_paypal_ok"
) -> payout_pb2.RequestWithdrawalRequest:
    return payout_pb2.RequestWithdrawalRequest(
        request_id=new_id("wd"),
        creator_id=creator,
        diamonds=diamonds,
        method=payout_pb2.PAYOUT_METHOD_PAYPAL,
        destination_token=destination,
    )


async def diamonds_of(suite: Suite, creator: str) -> int:
    response = await suite.payout.GetDiamondBalance(
        payout_pb2.GetDiamondBalanceRequest(creator_id=creator)
    )
    return response.balance.diamonds


async def settled(suite: Suite, withdrawal_id: str, creator: str) -> payout_pb2.Withdrawal:
    """The processor worker pays in the background; wait (bounded) for the outcome."""
    final = (
        payout_pb2.WITHDRAWAL_STATUS_PAID,
        payout_pb2.WITHDRAWAL_STATUS_FAILED,
        payout_pb2.WITHDRAWAL_STATUS_RETURNED,
    )

    async def read() -> payout_pb2.Withdrawal:
        response = await suite.payout.GetWithdrawal(
            payout_pb2.GetWithdrawalRequest(withdrawal_id=withdrawal_id),
            metadata=suite.token(creator),
        )
        return response.withdrawal

    async def done() -> bool:
        return (await read()).status in final

    await eventually(done, f"withdrawal {withdrawal_id} settled")
    return await read()


async def test_a_creators_balance_shows_its_cash_value(suite: Suite) -> None:
    creator = await creator_with_diamonds(suite, 2_001)
    response = await suite.payout.GetDiamondBalance(
        payout_pb2.GetDiamondBalanceRequest(creator_id=creator)
    )
    assert response.balance.diamonds == 2_001
    assert (
        response.balance.available_value.amount_minor == 1_000
    )  # 200 diamonds = $1; half cent kept
    assert response.balance.available_value.currency_code == "USD"


async def test_a_creator_who_never_received_gifts_has_nothing(suite: Suite) -> None:
    assert await diamonds_of(suite, new_id("nobody")) == 0


async def test_a_withdrawal_takes_the_diamonds_and_gets_paid(suite: Suite) -> None:
    creator = await creator_with_diamonds(suite, 5_000)
    response = await suite.payout.RequestWithdrawal(withdrawal(creator, 3_001))
    w = response.withdrawal
    # 3,001 diamonds are worth $15.005: $15.00 is paid and the odd diamond stays with the creator.
    assert (w.diamonds, w.gross.amount_minor, w.fee.amount_minor, w.net.amount_minor) == (
        3_000,
        1_500,
        0,
        1_500,
    )
    # $15 is at most the auto-approve threshold ($100): approved at once; the diamonds are held.
    assert w.status == payout_pb2.WITHDRAWAL_STATUS_APPROVED
    assert [e.status for e in w.history] == [
        payout_pb2.WITHDRAWAL_STATUS_REQUESTED,
        payout_pb2.WITHDRAWAL_STATUS_APPROVED,
    ]
    assert (response.balance.diamonds, response.balance.held_diamonds) == (2_000, 3_000)
    paid = await settled(suite, w.withdrawal_id, creator)
    assert paid.status == payout_pb2.WITHDRAWAL_STATUS_PAID
    assert paid.processor_reference.startswith("SBXITEM")
    assert [e.status for e in paid.history][2:] == [
        payout_pb2.WITHDRAWAL_STATUS_PROCESSING,
        payout_pb2.WITHDRAWAL_STATUS_PAID,
    ]
    balance = (
        await suite.payout.GetDiamondBalance(
            payout_pb2.GetDiamondBalanceRequest(creator_id=creator)
        )
    ).balance
    assert (balance.diamonds, balance.held_diamonds, balance.paid_out_diamonds) == (2_000, 0, 3_000)


async def test_a_failed_payout_returns_the_diamonds(suite: Suite) -> None:
    creator = await creator_with_diamonds(suite, 5_000)
    response = await suite.payout.RequestWithdrawal(
        withdrawal(creator, 4_000, destination="dest_fail_account_closed")
    )
    final = await settled(suite, response.withdrawal.withdrawal_id, creator)
    assert final.status == payout_pb2.WITHDRAWAL_STATUS_FAILED
    assert final.failure_reason == "account_closed"
    assert await diamonds_of(suite, creator) == 5_000


async def test_withdrawals_below_the_minimum_are_refused(suite: Suite) -> None:
    creator = await creator_with_diamonds(suite, 5_000)
    await expect_error(
        suite.payout.RequestWithdrawal(withdrawal(creator, 1_999)),  # $9.995 < $10
        grpc.StatusCode.FAILED_PRECONDITION,
        "BELOW_MINIMUM",
    )
    assert await diamonds_of(suite, creator) == 5_000


async def test_withdrawals_beyond_the_balance_are_refused(suite: Suite) -> None:
    creator = await creator_with_diamonds(suite, 3_000)
    await expect_error(
        suite.payout.RequestWithdrawal(withdrawal(creator, 4_000)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_FUNDS",
    )
    assert await diamonds_of(suite, creator) == 3_000


async def test_the_daily_cap_limits_what_a_creator_withdraws_in_a_day(suite: Suite) -> None:
    creator = await creator_with_diamonds(suite, 300_000)  # $1,500
    await suite.payout.RequestWithdrawal(withdrawal(creator, 180_000))  # $900
    error = await expect_error(
        suite.payout.RequestWithdrawal(withdrawal(creator, 40_000)),  # $200 more > $1,000
        grpc.StatusCode.FAILED_PRECONDITION,
        "DAILY_LIMIT_EXCEEDED",
    )
    assert "$100.00 remain today" in (error.details() or "")
    assert await diamonds_of(suite, creator) == 120_000
    quoted = await suite.payout.QuoteWithdrawal(  # the quote says so too
        payout_pb2.QuoteWithdrawalRequest(creator_id=creator, diamonds=40_000)
    )
    assert quoted.refusal == "DAILY_LIMIT_EXCEEDED"
    quoted = await suite.payout.QuoteWithdrawal(
        payout_pb2.QuoteWithdrawalRequest(creator_id=creator, diamonds=20_000)
    )
    assert quoted.refusal == ""
    await suite.payout.RequestWithdrawal(withdrawal(creator, 20_000))  # exactly the $100 left


async def test_a_creator_never_credited_is_refused_as_the_quote_says(suite: Suite) -> None:
    """A creator with no gifts yet exists as far as every other payout call goes (zero diamonds,
    payout methods, verification): a withdrawal is refused as QuoteWithdrawal predicts, never
    NOT_FOUND (a gateway would tell a real creator they do not exist)."""
    creator = new_id("newcomer")

    async def quoted_and_refused(reason: str) -> None:
        quote = await suite.payout.QuoteWithdrawal(
            payout_pb2.QuoteWithdrawalRequest(creator_id=creator, diamonds=5_000)
        )
        assert (quote.refusal, quote.available_diamonds) == (reason, 0)
        await expect_error(
            suite.payout.RequestWithdrawal(withdrawal(creator, 5_000)),
            grpc.StatusCode.FAILED_PRECONDITION,
            reason,
        )

    await quoted_and_refused("KYC_REQUIRED")
    await verify_creator(suite, creator)
    await quoted_and_refused("INSUFFICIENT_FUNDS")
    listed = await suite.payout.ListWithdrawals(
        payout_pb2.ListWithdrawalsRequest(creator_id=creator)
    )
    assert list(listed.withdrawals) == []


async def test_withdrawals_are_listed_newest_first(suite: Suite) -> None:
    creator = await creator_with_diamonds(suite, 10_000)
    ids = []
    for _ in range(3):
        response = await suite.payout.RequestWithdrawal(withdrawal(creator, 2_000))
        ids.append(response.withdrawal.withdrawal_id)
    first = await suite.payout.ListWithdrawals(
        payout_pb2.ListWithdrawalsRequest(creator_id=creator, page_size=2)
    )
    rest = await suite.payout.ListWithdrawals(
        payout_pb2.ListWithdrawalsRequest(creator_id=creator, page_token=first.next_page_token)
    )
    listed = [w.withdrawal_id for w in [*first.withdrawals, *rest.withdrawals]]
    assert sorted(listed) == sorted(ids)
    assert len(first.withdrawals) == 2 and rest.next_page_token == ""
    times = [w.create_time.ToNanoseconds() for w in [*first.withdrawals, *rest.withdrawals]]
    assert times == sorted(times, reverse=True)


async def test_an_unknown_withdrawal_is_not_found(suite: Suite) -> None:
    await expect_error(
        suite.payout.GetWithdrawal(payout_pb2.GetWithdrawalRequest(withdrawal_id="nope")),
        grpc.StatusCode.NOT_FOUND,
        "WITHDRAWAL_NOT_FOUND",
    )


async def test_a_quote_is_what_the_withdrawal_then_charges(suite: Suite) -> None:
    creator = await creator_with_diamonds(suite, 5_000)
    quoted = await suite.payout.QuoteWithdrawal(
        payout_pb2.QuoteWithdrawalRequest(creator_id=creator, diamonds=3_001)
    )
    # 3,001 diamonds are worth $15.005: the quote takes 3,000, and the odd one stays.
    assert (quoted.diamonds, quoted.gross.amount_minor, quoted.net.amount_minor) == (
        3_000,
        1_500,
        1_500,
    )
    assert (quoted.available_diamonds, quoted.refusal) == (5_000, "")
    taken = (await suite.payout.RequestWithdrawal(withdrawal(creator, 3_001))).withdrawal
    assert (taken.diamonds, taken.gross, taken.fee, taken.net) == (
        quoted.diamonds,
        quoted.gross,
        quoted.fee,
        quoted.net,
    )
    too_small = await suite.payout.QuoteWithdrawal(
        payout_pb2.QuoteWithdrawalRequest(creator_id=creator, diamonds=1_999)
    )
    assert (too_small.refusal, too_small.minimum.amount_minor) == ("BELOW_MINIMUM", 1_000)
    too_many = await suite.payout.QuoteWithdrawal(
        payout_pb2.QuoteWithdrawalRequest(creator_id=creator, diamonds=2_002)
    )
    assert (too_many.refusal, too_many.available_diamonds) == ("INSUFFICIENT_FUNDS", 2_000)
    assert await diamonds_of(suite, creator) == 2_000  # quoting moved nothing
    unverified = new_id("creator")  # what the request would say first, as it says it
    await suite.as_caller("gifting").payout.CreditDiamonds(
        payout_pb2.CreditDiamondsRequest(
            request_id=new_id("gift"), creator_id=unverified, coins=10_000, reference="seed"
        )
    )
    first = await suite.payout.QuoteWithdrawal(
        payout_pb2.QuoteWithdrawalRequest(creator_id=unverified, diamonds=10_000)
    )
    assert first.refusal == "KYC_REQUIRED"
    await expect_error(
        suite.payout.RequestWithdrawal(withdrawal(unverified, 2_000)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "KYC_REQUIRED",
    )


async def add_paypal(suite: Suite, creator: str, email: str, *, default: bool = False) -> str:
    added = await suite.payout.AddPayoutMethod(
        payout_pb2.AddPayoutMethodRequest(
            request_id=new_id("pm"),
            creator_id=creator,
            paypal=payout_pb2.PayPalAccount(email=email),
            make_default=default,
        )
    )
    return added.payout_method.payout_method_id


def to_method(
    creator: str, diamonds: int, method_id: str = ""
) -> payout_pb2.RequestWithdrawalRequest:
    return payout_pb2.RequestWithdrawalRequest(
        request_id=new_id("wd"), creator_id=creator, diamonds=diamonds, payout_method_id=method_id
    )


async def test_withdrawals_wait_for_verification(suite: Suite) -> None:
    creator = new_id("creator")
    await suite.as_caller("gifting").payout.CreditDiamonds(
        payout_pb2.CreditDiamondsRequest(
            request_id=new_id("gift"), creator_id=creator, coins=10_000, reference="seed"
        )
    )
    await add_paypal(suite, creator, "kyc@example.com")
    unverified = await expect_error(
        suite.payout.RequestWithdrawal(to_method(creator, 2_000)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "KYC_REQUIRED",
    )
    assert "unverified" in (unverified.details() or "")
    assert error_metadata(unverified)["kyc_status"] == "KYC_STATUS_UNVERIFIED"
    admin = suite.token(new_id("ops"), admin=True)
    await suite.payout.SetCreatorVerification(
        payout_pb2.SetCreatorVerificationRequest(
            request_id=new_id("kyc"),
            creator_id=creator,
            status=payout_pb2.KYC_STATUS_REJECTED,
            reason="document expired",
        ),
        metadata=admin,
    )
    rejected = await expect_error(
        suite.payout.RequestWithdrawal(to_method(creator, 2_000)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "KYC_REQUIRED",
    )
    assert "document expired" in (rejected.details() or "")
    listed = await suite.payout.ListPayoutMethods(
        payout_pb2.ListPayoutMethodsRequest(creator_id=creator)
    )
    assert listed.kyc_status == payout_pb2.KYC_STATUS_REJECTED
    await verify_creator(suite, creator)
    paid = await suite.payout.RequestWithdrawal(to_method(creator, 2_000))
    assert paid.withdrawal.method == payout_pb2.PAYOUT_METHOD_PAYPAL
    assert await diamonds_of(suite, creator) == 3_000


async def test_a_bank_account_number_is_refused_and_stored_nowhere(suite: Suite) -> None:
    creator = await creator_with_diamonds(suite, 5_000)
    for token in ("acct_12345678", "bank_00001234567"):
        await expect_error(
            suite.payout.AddPayoutMethod(
                payout_pb2.AddPayoutMethodRequest(
                    request_id=new_id("pm"),
                    creator_id=creator,
                    bank=payout_pb2.BankAccount(processor_token=token, last4="3000"),
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "BANK_ACCOUNT_NUMBER_REFUSED",
        )
    listed = await suite.payout.ListPayoutMethods(
        payout_pb2.ListPayoutMethodsRequest(creator_id=creator)
    )
    assert list(listed.payout_methods) == []
    for token in ("12345678", "dest_12345678", "acct 1234 5678"):  # a one-off destination too
        one_off = withdrawal(creator, 2_000, destination=token)
        one_off.method = payout_pb2.PAYOUT_METHOD_BANK
        error = await expect_error(
            suite.payout.RequestWithdrawal(one_off),
            grpc.StatusCode.INVALID_ARGUMENT,
            "BANK_ACCOUNT_NUMBER_REFUSED",
        )
        assert field_violations(error) == {"destination_token"}
    assert await diamonds_of(suite, creator) == 5_000
