"""Batched settlement: many gifts' credits in one BatchCreditDiamonds call and one transaction, each
applied exactly once by its request id (across batches and single CreditDiamonds alike), with a hot
creator's credits aggregated into one ledger posting and the books still exact."""

from __future__ import annotations

import asyncio

import grpc

from coins.common.v1 import ledger_audit_pb2, ledger_audit_pb2_grpc
from coins.payout.v1 import payout_pb2
from tests.helpers import expect_error, new_id
from tests.suite import Suite


def credit(
    creator: str, coins: int, request_id: str | None = None
) -> payout_pb2.CreditDiamondsRequest:
    gift = request_id or new_id("gift")
    return payout_pb2.CreditDiamondsRequest(
        request_id=gift, creator_id=creator, coins=coins, reference=gift
    )


def batch(*credits: payout_pb2.CreditDiamondsRequest) -> payout_pb2.BatchCreditDiamondsRequest:
    return payout_pb2.BatchCreditDiamondsRequest(requests=list(credits))


async def diamonds_of(suite: Suite, creator: str) -> int:
    response = await suite.payout.GetDiamondBalance(
        payout_pb2.GetDiamondBalanceRequest(creator_id=creator)
    )
    return response.balance.diamonds


async def audit_ok(suite: Suite) -> None:
    stub = ledger_audit_pb2_grpc.LedgerAuditServiceStub(suite.channel("payout"))
    report = await stub.AuditLedger(
        ledger_audit_pb2.AuditLedgerRequest(), metadata=suite.token(new_id("ops"), admin=True)
    )
    assert report.ok, report


async def test_a_batch_credits_every_gift_and_answers_each_in_order(suite: Suite) -> None:
    hot, other = new_id("creator"), new_id("creator")
    credits = [credit(hot, 1) for _ in range(7)] + [credit(other, 10), credit(hot, 4)]
    payout = suite.as_caller("gifting").payout

    response = await payout.BatchCreditDiamonds(batch(*credits))

    assert len(response.responses) == len(credits)
    # One coin is half a diamond: the hot creator's seven 1-coin gifts and a 4-coin gift make
    # floor(11 / 2) = 5 diamonds, each gift answered with its own share and the balance after it.
    hot_answers = [
        r for c, r in zip(credits, response.responses, strict=True) if c.creator_id == hot
    ]
    assert [r.diamonds_credited for r in hot_answers] == [0, 1, 0, 1, 0, 1, 0, 2]
    assert [r.balance.diamonds for r in hot_answers] == [0, 1, 1, 2, 2, 3, 3, 5]
    assert response.responses[7].diamonds_credited == 5
    assert await diamonds_of(suite, hot) == 5
    assert await diamonds_of(suite, other) == 5
    await audit_ok(suite)


async def test_a_redelivered_credit_is_answered_not_applied_again(suite: Suite) -> None:
    creator = new_id("creator")
    payout = suite.as_caller("gifting").payout
    first, second = credit(creator, 40), credit(creator, 60)
    single = await payout.CreditDiamonds(first)

    again = await payout.BatchCreditDiamonds(batch(first, second))
    once_more = await payout.BatchCreditDiamonds(batch(second, first))
    alone = await payout.CreditDiamonds(second)

    assert again.responses[0] == single  # the first answer, replayed
    assert once_more.responses[1] == single
    assert once_more.responses[0] == again.responses[1] == alone
    assert await diamonds_of(suite, creator) == 50
    await audit_ok(suite)


async def test_concurrent_deliveries_of_one_batch_credit_it_once(suite: Suite) -> None:
    creators = [new_id("creator") for _ in range(5)]
    credits = batch(*(credit(c, 2) for c in creators for _ in range(4)))
    payout = suite.as_caller("gifting").payout

    answers = await asyncio.gather(*(payout.BatchCreditDiamonds(credits) for _ in range(6)))

    assert all(a == answers[0] for a in answers)
    for creator in creators:
        assert await diamonds_of(suite, creator) == 4
    await audit_ok(suite)


async def test_a_reused_request_id_fails_the_whole_batch_and_changes_nothing(
    suite: Suite,
) -> None:
    creator, bystander = new_id("creator"), new_id("creator")
    payout = suite.as_caller("gifting").payout
    used = credit(creator, 40)
    await payout.CreditDiamonds(used)

    await expect_error(
        payout.BatchCreditDiamonds(
            batch(credit(bystander, 100), credit(creator, 999, request_id=used.request_id))
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )
    assert await diamonds_of(suite, creator) == 20
    assert await diamonds_of(suite, bystander) == 0


async def test_one_request_id_twice_in_a_batch_is_refused(suite: Suite) -> None:
    twice = credit(new_id("creator"), 10)
    await expect_error(
        suite.as_caller("gifting").payout.BatchCreditDiamonds(batch(twice, twice)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "DUPLICATE_REQUEST_ID",
    )


async def test_only_gifting_may_credit_in_batches(suite: Suite) -> None:
    await expect_error(
        suite.as_caller("promotion").payout.BatchCreditDiamonds(batch(credit(new_id("c"), 2))),
        grpc.StatusCode.PERMISSION_DENIED,
        "CALLER_NOT_ALLOWED",
    )
