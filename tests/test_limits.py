"""Floods are refused before they cost anything: rate limits on the RPCs that move money, request size
limits, and a bounded number of concurrent RPCs per server.

Limits live in memory, not storage, so these run on one backend (SQLite), on a suite of their own
with tight limits.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from coins.gifting.v1 import gifting_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.errors import ResourceExhausted
from runtime.ratelimit import RateLimiter, TokenBuckets, buckets
from runtime.status import error_info, retry_info
from tests.helpers import expect_error, funded_user, live_of, new_creator, new_id, start_live
from tests.suite import Suite, start_suite

BURST = 3


@pytest.fixture(scope="module")
async def tight(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    suite = await start_suite(
        "sqlite",
        tmp_path_factory.mktemp("limits"),
        overrides={
            "security": {
                "user_rate_per_second": 0.5,
                "user_rate_burst": BURST,
                "caller_rate_per_second": 1000,
                "caller_rate_burst": 1000,
            },
            "wallet": {"max_message_bytes": 64 * 1024, "max_concurrent_rpcs": 8},
        },
    )
    yield suite
    await suite.stop()


def gift(sender: str, creator: str) -> gifting_pb2.SendGiftRequest:
    return gifting_pb2.SendGiftRequest(
        request_id=new_id(),
        sender_id=sender,
        creator_id=creator,
        gift_id="rose",
        count=1,
        live_id=live_of(creator),
    )


async def test_a_user_sending_too_fast_is_told_to_wait(tight: Suite) -> None:
    sender, coins = await funded_user(tight)
    creator = await new_creator(tight)
    for _ in range(BURST):
        await tight.gifting.SendGift(gift(sender, creator))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tight.gifting.SendGift(gift(sender, creator))
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(error)
    assert info is not None and info.reason == "RATE_LIMITED"
    assert info.metadata["scope"] == "user"
    delay = retry_info(error)
    assert delay is not None
    assert 0 < delay.retry_delay.ToTimedelta().total_seconds() <= 2.0  # one token at 0.5/s
    balance = await tight.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))
    assert balance.balance.coins == coins - BURST  # the refused gift moved nothing

    # Another user is not slowed down by the first one's limit, and reads are never limited.
    other, _ = await funded_user(tight)
    await tight.gifting.SendGift(gift(other, creator))
    for _ in range(BURST * 3):
        await tight.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))


async def test_writes_that_move_no_money_are_limited_too(tight: Suite) -> None:
    """A user flooding StartLive/EndLive (or payout methods, accounts) creates records as fast as
    it can call: a user's writes have the same limit as money (a security review)."""
    creator = await new_creator(tight, live=False)
    refused = None
    for _ in range(BURST + 1):
        try:
            live_id = await start_live(tight, creator)
        except grpc.aio.AioRpcError as error:
            refused = error
            break
        await tight.gifting.EndLive(
            gifting_pb2.EndLiveRequest(request_id=new_id("end"), live_id=live_id),
            metadata=tight.token(creator),
        )
    assert refused is not None, f"{BURST + 1} LIVEs started without a limit"
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(refused)
    assert info is not None and info.reason == "RATE_LIMITED"


async def test_a_retry_the_rate_limit_refuses_gets_its_stored_answer(tight: Suite) -> None:
    """The limit holds back new work: a retry of a request already answered gets that answer (the
    gift, or its refusal) as it would without the limit; a new request still waits, and the same
    id with other parameters is still REQUEST_ID_REUSED. Nothing moves twice."""
    sender, coins = await funded_user(tight)
    creator = await new_creator(tight)
    too_dear = gift(sender, creator)
    too_dear.gift_id = "lion"  # 29,999 coins: more than the sender has
    await expect_error(
        tight.gifting.SendGift(too_dear), grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS"
    )
    first = gift(sender, creator)
    sent = await tight.gifting.SendGift(first)
    for _ in range(BURST - 2):
        await tight.gifting.SendGift(gift(sender, creator))
    await expect_error(
        tight.gifting.SendGift(gift(sender, creator)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
    )

    assert await tight.gifting.SendGift(first) == sent
    await expect_error(
        tight.gifting.SendGift(too_dear), grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS"
    )
    changed = gifting_pb2.SendGiftRequest()
    changed.CopyFrom(first)
    changed.count = 2
    await expect_error(
        tight.gifting.SendGift(changed), grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"
    )
    balance = await tight.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))
    assert balance.balance.coins == coins - (BURST - 1)  # one rose per gift sent, once each

    # The same for a purchase (funded_user bought once: the burst's first token).
    buys = [
        wallet_pb2.PurchaseCoinsRequest(
            request_id=new_id(),
            user_id=sender,
            package_id="us-web-700",
            payment_token=f"tok_visa_{sender}",
        )
        for _ in range(BURST - 1)
    ]
    bought = [await tight.wallet.PurchaseCoins(buy) for buy in buys]
    assert await tight.wallet.PurchaseCoins(buys[0]) == bought[0]
    await expect_error(
        tight.wallet.PurchaseCoins(
            wallet_pb2.PurchaseCoinsRequest(
                request_id=new_id(),
                user_id=sender,
                package_id="us-web-700",
                payment_token=f"tok_visa_{sender}",
            )
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
    )
    balance = await tight.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))
    assert balance.balance.coins == bought[-1].balance.coins  # each purchase credited once


async def test_a_services_calls_for_a_user_count_against_its_own_limit_not_the_users(
    tight: Suite,
) -> None:
    """The user's limit is taken where the user's request comes in: calls a service makes on the
    user's behalf (gifting's debits, a promotion's re-captures) count against that service's limit
    only. Here more debits for one user than the user's burst all pass."""
    user, coins = await funded_user(tight)
    for _ in range(BURST * 2):
        await tight.as_caller("gifting").wallet.DebitCoins(
            wallet_pb2.DebitCoinsRequest(
                request_id=new_id(),
                user_id=user,
                coins=1,
                reason=wallet_pb2.DEBIT_REASON_GIFT,
                reference="r",
            )
        )
    balance = await tight.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    assert balance.balance.coins == coins - BURST * 2


def test_token_buckets_refill_at_their_rate() -> None:
    now = [100.0]
    buckets = TokenBuckets(rate=2.0, burst=2, clock=lambda: now[0])
    assert buckets.take_now("k") == 0.0
    assert buckets.take_now("k") == 0.0
    assert buckets.take_now("k") == pytest.approx(0.5)  # empty: the next token in 1/2 s
    now[0] += 0.5
    assert buckets.take_now("k") == 0.0
    now[0] += 100
    assert [buckets.take_now("k") for _ in range(3)][:2] == [0.0, 0.0]  # refills only up to burst


REDIS_URL = os.environ.get("COINS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def test_replicas_share_their_rate_limits_through_redis() -> None:
    """Two replicas' limiters on one Redis: the burst is the suite's, not each replica's (Redis is
    on the machine; a run without it fails here, loudly)."""
    prefix = f"coins:test:{uuid.uuid4().hex}:"
    first, second = (
        RateLimiter(
            buckets(0.0, 5, redis_url=REDIS_URL, prefix=prefix),
            buckets(1000.0, 1000, redis_url=REDIS_URL, prefix=prefix + "caller:"),
        )
        for _ in range(2)
    )
    granted, refused = 0, 0
    for limiter in (first, second) * 4:
        try:
            await limiter.check("/coins.gifting.v1.GiftingService/SendGift", "gateway", "ava")
            granted += 1
        except ResourceExhausted as refusal:
            assert refusal.reason == "RATE_LIMITED"
            refused += 1
    assert (granted, refused) == (5, 3)


async def test_a_burst_of_calls_all_take_from_the_shared_bucket() -> None:
    """600 calls at once on one replica: every take is Redis's, so exactly the burst is granted
    (review A4: redis-py's pool refused the 101st connection at once and those calls fell back to
    this replica's own buckets, which granted more)."""
    prefix = f"coins:test:{uuid.uuid4().hex}:"
    shared = buckets(0.0, 50, redis_url=REDIS_URL, prefix=prefix)
    waits = await asyncio.gather(*(shared.take("burst") for _ in range(600)))
    assert sum(1 for wait in waits if wait == 0.0) == 50


async def test_a_replica_whose_redis_is_gone_keeps_its_own_limits() -> None:
    limiter = RateLimiter(
        buckets(0.0, 2, redis_url="redis://127.0.0.1:1/0", prefix="coins:test:"),
        buckets(1000.0, 1000),
    )
    await limiter.check("/m", "gateway", "bob")
    await limiter.check("/m", "gateway", "bob")
    with pytest.raises(ResourceExhausted):
        await limiter.check("/m", "gateway", "bob")


async def test_an_oversized_request_is_refused_before_any_handler(tight: Suite) -> None:
    """Above the wallet's 64 KiB: REQUEST_TOO_LARGE naming the limit, before any handler. Above
    4x that, gRPC's core refuses it unread (the same code, its own message). Nothing moves."""
    user, coins = await funded_user(tight)

    def purchase(token_bytes: int) -> wallet_pb2.PurchaseCoinsRequest:
        return wallet_pb2.PurchaseCoinsRequest(
            request_id=new_id(),
            user_id=user,
            package_id="us-web-700",
            payment_token="t" * token_bytes,
        )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tight.wallet.PurchaseCoins(purchase(100_000))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(caught.value)
    assert info is not None and info.reason == "REQUEST_TOO_LARGE", caught.value.details()
    assert info.metadata["max_bytes"] == str(64 * 1024)
    assert int(info.metadata["size_bytes"]) > 100_000
    assert "at most 65,536" in (caught.value.details() or "")
    assert retry_info(caught.value) is None  # the same request never passes later

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tight.wallet.PurchaseCoins(purchase(300_000))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(caught.value) is None  # the core's refusal
    balance = await tight.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    assert balance.balance.coins == coins


async def test_a_flood_beyond_the_concurrency_limit_is_shed_not_queued(tight: Suite) -> None:
    """300 concurrent reads at a server that runs at most 8 RPCs at once: the excess is refused at
    once with RESOURCE_EXHAUSTED (the caller may retry), the rest answered; nothing fails otherwise.
    (GetAccount, a read that waits on its database: GetBalance on SQLite can finish without ever
    yielding, so it would never have 8 in flight.)"""
    user, _ = await funded_user(tight)
    calls = [
        tight.wallet.GetAccount(wallet_pb2.GetAccountRequest(user_id=user)) for _ in range(300)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    codes = {
        r.code() if isinstance(r, grpc.aio.AioRpcError) else grpc.StatusCode.OK for r in results
    }
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert any(not isinstance(r, BaseException) and r.account.user_id == user for r in results)
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, "the concurrency limit shed nothing"
