"""Batched settlement: many gifts' credits in one BatchCreditDiamonds call and one transaction, each
applied exactly once by its request id (across batches and single CreditDiamonds alike), with a hot
creator's credits aggregated into one ledger posting and the books still exact."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from pathlib import Path

import grpc
import sqlalchemy as sa

from coins.common.v1 import ledger_audit_pb2, ledger_audit_pb2_grpc
from coins.payout.v1 import payout_pb2
from runtime.db import Database
from runtime.migrations import upgrade
from services.payout.service import SPEC as PAYOUT
from services.payout.storage import gift_credits
from tests.helpers import expect_error, new_id
from tests.suite import Suite, create_pg_database, drop_pg_database


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


async def test_a_request_id_sent_again_for_another_creator_is_refused(suite: Suite) -> None:
    """A credit's request id is one gift's, whoever it names: sent again for another creator (a
    caller's bug) it is REQUEST_ID_REUSED, alone, in a batch or twice in one batch. A review
    credited one gift's coins to three creators under one id (ids were kept per creator)."""
    first, second, third = new_id("creator"), new_id("creator"), new_id("creator")
    payout = suite.as_caller("gifting").payout
    gift = credit(first, 10_000)
    await payout.CreditDiamonds(gift)
    await expect_error(
        payout.CreditDiamonds(credit(second, 10_000, request_id=gift.request_id)),
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )
    await expect_error(
        payout.BatchCreditDiamonds(
            batch(credit(third, 10), credit(third, 10_000, request_id=gift.request_id))
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )
    fresh = new_id("gift")
    await expect_error(
        payout.BatchCreditDiamonds(
            batch(credit(second, 10, request_id=fresh), credit(third, 10, request_id=fresh))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "DUPLICATE_REQUEST_ID",
    )
    assert [await diamonds_of(suite, c) for c in (first, second, third)] == [5_000, 0, 0]
    assert (await payout.CreditDiamonds(gift)).diamonds_credited == 5_000  # its own retry: answered


async def test_one_request_id_for_two_creators_at_once_credits_one(suite: Suite) -> None:
    """Sent at the same moment for two creators, the same request id credits exactly one of them;
    the other is refused (its insert loses on the unique request key, and the retry reads why)."""
    payout = suite.as_caller("gifting").payout
    for _ in range(5):
        creators = [new_id("creator") for _ in range(4)]
        gift = new_id("gift")
        results = await asyncio.gather(
            *(payout.CreditDiamonds(credit(c, 1_000, request_id=gift)) for c in creators),
            return_exceptions=True,
        )
        credited = [r for r in results if isinstance(r, payout_pb2.CreditDiamondsResponse)]
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(credited) == 1 and len(refused) == 3, results
        assert {r.code() for r in refused} == {grpc.StatusCode.ALREADY_EXISTS}
        assert sorted([await diamonds_of(suite, c) for c in creators]) == [0, 0, 0, 500]
    await audit_ok(suite)


async def test_the_migration_gives_each_request_id_to_its_first_credit(
    backend: str, tmp_path: Path
) -> None:
    """Existing credits get their request key; of one id credited to two creators (before this
    migration), the first credited takes it, so a retry for the other is refused. Credit keys keep
    their form (a retry during the deploy finds its credit on either version)."""
    name = f"coins_request_key_{uuid.uuid4().hex[:12]}"
    url = (
        await create_pg_database(name)
        if backend == "postgres"
        else f"sqlite+aiosqlite:///{tmp_path / 'payout.db'}"
    )
    db = Database(url)
    t0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    try:
        await upgrade(db, PAYOUT.migrations_dir, "0025")
        rows = [
            ("gifting|CreditDiamonds:ann/gift:1", "ann", t0),
            ("gifting|CreditDiamonds:bob/gift:1", "bob", t0 + dt.timedelta(seconds=1)),
            ("gifting|CreditDiamonds:ann/gift:2", "ann", t0),
        ]
        async with db.transaction() as conn:
            for key, creator, at in rows:
                await conn.execute(
                    sa.insert(gift_credits).values(
                        credit_key=key,
                        fingerprint="f",
                        creator_id=creator,
                        coins=2,
                        diamonds=1,
                        response=b"",
                        created_at=at,
                        rate_numerator=1,
                        rate_denominator=2,
                        coin_value_micros=5_000,
                        diamond_value_micros=5_000,
                        platform_micros=5_000,
                    )
                )
        await upgrade(db, PAYOUT.migrations_dir, "0026")
        async with db.read() as conn:
            keys = (
                await conn.execute(
                    sa.select(gift_credits.c.credit_key, gift_credits.c.request_key).order_by(
                        gift_credits.c.credit_key
                    )
                )
            ).all()
        assert [tuple(k) for k in keys] == [
            ("gifting|CreditDiamonds:ann/gift:1", "gifting|CreditDiamonds/gift:1"),
            ("gifting|CreditDiamonds:ann/gift:2", "gifting|CreditDiamonds/gift:2"),
            ("gifting|CreditDiamonds:bob/gift:1", None),
        ]
    finally:
        await db.close()
        if backend == "postgres":
            await drop_pg_database(name)


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
