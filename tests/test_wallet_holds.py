"""Holds through the wallet's gRPC API: the promotion service reserves a user's coins, captures them as
delivered and releases the rest; every step is idempotent and resolves exactly once."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from coins.wallet.v1 import wallet_pb2
from tests.helpers import (
    ShiftedClock,
    error_metadata,
    eventually,
    expect_error,
    field_violations,
    funded_user,
    new_id,
    rpc_error,
)
from tests.suite import Suite, require_postgres, start_suite


def place(user: str, coins: int, **extra: object) -> wallet_pb2.PlaceHoldRequest:
    request = wallet_pb2.PlaceHoldRequest(
        request_id=new_id("promotion:hold"),
        user_id=user,
        coins=coins,
        reason=wallet_pb2.DEBIT_REASON_PROMOTION,
        reference=new_id("promo"),
    )
    for name, value in extra.items():
        getattr(request, name).CopyFrom(value) if isinstance(value, Duration) else setattr(
            request, name, value
        )
    return request


def capture(hold_id: str, coins: int) -> wallet_pb2.CaptureHoldRequest:
    return wallet_pb2.CaptureHoldRequest(request_id=new_id("cap"), hold_id=hold_id, coins=coins)


async def balance(suite: Suite, user: str) -> tuple[int, int]:
    response = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    return response.balance.coins, response.balance.available_coins


async def test_a_budget_is_held_captured_as_delivered_and_the_rest_released(suite: Suite) -> None:
    promotion = suite.as_caller("promotion").wallet
    user, coins = await funded_user(suite)  # 700 coins
    placed = await promotion.PlaceHold(place(user, 500))
    hold = placed.hold
    assert (hold.status, hold.amount_coins, hold.owner_service) == (
        wallet_pb2.HOLD_STATUS_ACTIVE,
        500,
        "promotion",
    )
    assert (placed.balance.coins, placed.balance.available_coins) == (coins, coins - 500)

    first = await promotion.CaptureHold(capture(hold.hold_id, 120))
    assert (first.hold.captured_coins, first.balance.coins) == (120, coins - 120)
    assert first.balance.available_coins == coins - 500
    second = capture(hold.hold_id, 80)
    assert await promotion.CaptureHold(second) == await promotion.CaptureHold(second)  # a retry

    await expect_error(
        promotion.CaptureHold(capture(hold.hold_id, 301)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "CAPTURE_EXCEEDS_HOLD",
    )
    release = wallet_pb2.ReleaseHoldRequest(request_id=new_id("rel"), hold_id=hold.hold_id)
    released = await promotion.ReleaseHold(release)
    assert released.hold.status == wallet_pb2.HOLD_STATUS_RELEASED
    assert (released.balance.coins, released.balance.available_coins) == (coins - 200,) * 2
    assert await promotion.ReleaseHold(release) == released  # the same request: its first answer
    await expect_error(
        promotion.ReleaseHold(
            wallet_pb2.ReleaseHoldRequest(request_id=new_id(), hold_id=hold.hold_id)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "HOLD_RELEASED",
    )
    await expect_error(
        promotion.CaptureHold(capture(hold.hold_id, 1)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "HOLD_RELEASED",
    )
    assert await balance(suite, user) == (coins - 200, coins - 200)
    history = await suite.wallet.ListLedgerEntries(
        wallet_pb2.ListLedgerEntriesRequest(user_id=user)
    )
    assert [e.amount for e in history.entries][:2] == [-80, -120]


async def test_held_coins_cannot_be_spent_twice(suite: Suite) -> None:
    user, coins = await funded_user(suite)
    await suite.as_caller("promotion").wallet.PlaceHold(place(user, coins - 10))
    await expect_error(
        suite.as_caller("gifting").wallet.DebitCoins(
            wallet_pb2.DebitCoinsRequest(
                request_id=new_id("gift"),
                user_id=user,
                coins=11,
                reason=wallet_pb2.DEBIT_REASON_GIFT,
                reference="r",
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_FUNDS",
    )
    await expect_error(
        suite.as_caller("promotion").wallet.PlaceHold(place(user, 11)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_FUNDS",
    )
    assert await balance(suite, user) == (coins, 10)


async def test_twenty_concurrent_places_with_one_request_id_hold_once(suite: Suite) -> None:
    user, coins = await funded_user(suite)
    request = place(user, 100)
    responses = await asyncio.gather(
        *(suite.as_caller("promotion").wallet.PlaceHold(request) for _ in range(20)),
        return_exceptions=True,
    )
    holds = {r.hold.hold_id for r in responses if isinstance(r, wallet_pb2.PlaceHoldResponse)}
    assert len(holds) == 1
    assert await balance(suite, user) == (coins, coins - 100)


async def test_a_request_id_sent_again_for_another_hold_moves_nothing(suite: Suite) -> None:
    """Request ids belong to the caller and the RPC, never to the record named: a caller re-using
    a capture's or a release's id for another hold has a bug, told REQUEST_ID_REUSED. The review
    that found it saw the other hold captured, and released."""
    promotion = suite.as_caller("promotion").wallet
    user, coins = await funded_user(suite)
    first = (await promotion.PlaceHold(place(user, 100))).hold
    other = (await promotion.PlaceHold(place(user, 100))).hold
    captured = capture(first.hold_id, 5)
    await promotion.CaptureHold(captured)
    reused = capture(other.hold_id, 5)
    reused.request_id = captured.request_id
    await expect_error(
        promotion.CaptureHold(reused), grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"
    )
    released = wallet_pb2.ReleaseHoldRequest(request_id=new_id("release"), hold_id=first.hold_id)
    await promotion.ReleaseHold(released)
    await expect_error(
        promotion.ReleaseHold(
            wallet_pb2.ReleaseHoldRequest(request_id=released.request_id, hold_id=other.hold_id)
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )
    held = await promotion.GetHold(wallet_pb2.GetHoldRequest(hold_id=other.hold_id))
    assert (held.hold.status, held.hold.captured_coins) == (wallet_pb2.HOLD_STATUS_ACTIVE, 0)
    assert await balance(suite, user) == (coins - 5, coins - 5 - 100)


async def test_only_the_service_that_placed_a_hold_may_resolve_it(suite: Suite) -> None:
    user, _ = await funded_user(suite)
    hold = (await suite.as_caller("promotion").wallet.PlaceHold(place(user, 50))).hold
    await expect_error(
        suite.as_caller("gifting").wallet.CaptureHold(capture(hold.hold_id, 10)),
        grpc.StatusCode.PERMISSION_DENIED,
        "CALLER_NOT_ALLOWED",
    )
    got = await suite.as_caller("promotion").wallet.GetHold(
        wallet_pb2.GetHoldRequest(hold_id=hold.hold_id)
    )
    assert got.hold == hold


@pytest.fixture(scope="module")
async def timed(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Suite, ShiftedClock]]:
    """A wallet on a clock the tests move."""
    if backend == "postgres":
        await require_postgres()
    clock = ShiftedClock()
    running = await start_suite(
        backend, tmp_path_factory.mktemp(f"holds-time-{backend}"), only=("wallet",), clock=clock
    )
    yield running, clock
    await running.stop()


async def test_a_hold_past_its_expiry_releases_itself(timed: tuple[Suite, ShiftedClock]) -> None:
    suite, clock = timed
    user, coins = await funded_user(suite)
    promotion = suite.as_caller("promotion").wallet
    hold = (await promotion.PlaceHold(place(user, 300, expire_after=Duration(seconds=60)))).hold
    assert hold.HasField("expire_time")
    clock.shift += dt.timedelta(seconds=61)
    expired = await expect_error(
        promotion.CaptureHold(capture(hold.hold_id, 10)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "HOLD_EXPIRED",
    )
    assert error_metadata(expired)["status"] == "HOLD_STATUS_EXPIRED"

    got = await promotion.GetHold(wallet_pb2.GetHoldRequest(hold_id=hold.hold_id))
    assert got.hold.status == wallet_pb2.HOLD_STATUS_EXPIRED  # as the capture said, swept or not

    async def swept() -> bool:  # the sweeper runs every hold_sweep_seconds (0.2 s in the tests)
        return await balance(suite, user) == (coins, coins)

    await eventually(swept, "the sweeper giving the held coins back")
    got = await promotion.GetHold(wallet_pb2.GetHoldRequest(hold_id=hold.hold_id))
    assert got.hold.status == wallet_pb2.HOLD_STATUS_EXPIRED


async def test_a_hold_placed_again_after_its_request_id_was_purged_is_the_same_hold(
    timed: tuple[Suite, ShiftedClock],
) -> None:
    """CreatePromotion retried after the wallet purged the PlaceHold's request id
    (WALLET_IDEMPOTENCY_RETENTION_HOURS): the hold kept the request that placed it and is answered,
    in the state it is in now; a second hold was placed before (ledger v7). The same request id
    for another amount is refused and reserves nothing."""
    suite, _ = timed
    user, coins = await funded_user(suite)
    promotion = suite.as_caller("promotion").wallet
    request = place(user, 300)
    first = (await promotion.PlaceHold(request)).hold
    await promotion.CaptureHold(capture(first.hold_id, 100))
    assert await suite.services["wallet"].runtime.idempotency.purge(dt.timedelta(0)) > 0
    again = await promotion.PlaceHold(request)
    assert again.hold.hold_id == first.hold_id
    assert (again.hold.captured_coins, again.hold.amount_coins) == (100, 300)
    assert (again.balance.coins, again.balance.available_coins) == (coins - 100, coins - 300)
    assert await balance(suite, user) == (coins - 100, coins - 300)

    assert await suite.services["wallet"].runtime.idempotency.purge(dt.timedelta(0)) > 0
    # Another amount, another reference, or an expiry it had not: another request, refused; the
    # original, sent again, is still answered (a review's changed request took the id over).
    changes: list[Callable[[wallet_pb2.PlaceHoldRequest], None]] = [
        lambda r: setattr(r, "coins", 50),
        lambda r: setattr(r, "reference", "another-promotion"),
        lambda r: r.expire_after.CopyFrom(Duration(seconds=600)),
    ]
    for change in changes:
        other = wallet_pb2.PlaceHoldRequest()
        other.CopyFrom(request)
        change(other)
        refused = await expect_error(
            promotion.PlaceHold(other), grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"
        )
        assert first.hold_id in (refused.details() or "")
        assert await balance(suite, user) == (coins - 100, coins - 300)
    assert (await promotion.PlaceHold(request)).hold.hold_id == first.hold_id


async def test_resolving_a_hold_whose_request_id_was_purged_finds_it_in_the_ledger(
    timed: tuple[Suite, ShiftedClock],
) -> None:
    """The promotion reconciler asks what became of a PlaceHold after the wallet purged its request
    id: the hold it placed is answered PLACED, not voided (which left it reserving the budget of a
    promotion that then failed, until it expired); a request that placed nothing is voided, and
    the same request arriving late is refused and reserves nothing."""
    suite, _ = timed
    user, coins = await funded_user(suite)
    promotion = suite.as_caller("promotion").wallet
    request = place(user, 300)
    placed = (await promotion.PlaceHold(request)).hold
    assert await suite.services["wallet"].runtime.idempotency.purge(dt.timedelta(0)) > 0
    resolved = await promotion.ResolveHold(
        wallet_pb2.ResolveHoldRequest(request_id=request.request_id, user_id=user)
    )
    assert resolved.outcome == wallet_pb2.HOLD_OUTCOME_PLACED
    assert resolved.placed.hold.hold_id == placed.hold_id
    assert resolved.placed.balance.available_coins == coins - 300

    never = place(user, 100)
    resolved = await promotion.ResolveHold(
        wallet_pb2.ResolveHoldRequest(request_id=never.request_id, user_id=user)
    )
    assert resolved.outcome == wallet_pb2.HOLD_OUTCOME_VOIDED
    await rpc_error(promotion.PlaceHold(never))
    assert await balance(suite, user) == (coins, coins - 300)


async def test_a_capture_sent_again_after_its_request_id_was_purged_is_not_captured_twice(
    timed: tuple[Suite, ShiftedClock],
) -> None:
    """Promotion re-sends a capture it never heard back about, possibly after the wallet purged
    the request id (WALLET_IDEMPOTENCY_RETENTION_HOURS): the ledger, which keeps its transactions,
    answers it; it captured again up to the unique request id, then answered INTERNAL for ever."""
    suite, _ = timed
    user, coins = await funded_user(suite)
    promotion = suite.as_caller("promotion").wallet
    hold = (await promotion.PlaceHold(place(user, 300))).hold
    request = capture(hold.hold_id, 120)
    first = await promotion.CaptureHold(request)
    assert await suite.services["wallet"].runtime.idempotency.purge(dt.timedelta(0)) > 0
    again = await promotion.CaptureHold(request)
    assert again.transaction_id == first.transaction_id
    assert (again.hold.captured_coins, again.hold.amount_coins) == (120, 300)
    assert await balance(suite, user) == (coins - 120, coins - 300)


async def test_a_call_whose_caller_gives_up_mid_transaction_finishes_its_work_whole(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller's deadline passes while PlaceHold is inside its transaction: the caller gets
    DEADLINE_EXCEEDED at once, but the work is not cut off mid-statement; it reaches its next safe
    point, rolls back whole (nothing held) and frees the database for the next write. Cut off
    inside an aiosqlite statement, it could leave the SQLite write lock held for minutes."""
    from services.wallet.domain import Wallet

    place_hold = Wallet.place_hold
    reached: list[str] = []

    async def slow_place_hold(self: Wallet, *args: object, **kwargs: object) -> object:
        await asyncio.sleep(0.3)  # inside the transaction, past the caller's deadline
        reached.append("placed")
        return await place_hold(self, *args, **kwargs)  # type: ignore[arg-type]

    promotion = suite.as_caller("promotion").wallet
    user, coins = await funded_user(suite)
    monkeypatch.setattr(Wallet, "place_hold", slow_place_hold)
    error = await rpc_error(promotion.PlaceHold(place(user, 100), timeout=0.1))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def went_on() -> bool:
        return reached == ["placed"]

    await eventually(went_on, "the work went on to its safe point")
    monkeypatch.undo()
    placed = await promotion.PlaceHold(place(user, 50))  # the database takes the next write
    assert placed.balance.available_coins == coins - 50  # the first one rolled back whole


async def test_a_malformed_expiry_is_refused_and_holds_nothing(suite: Suite) -> None:
    """A Duration whose nanos have the other sign than its seconds, or a second or more of them,
    is no duration (the range rule let `{1 s, -5 ns}` through, a review)."""
    user, coins = await funded_user(suite)
    promotion = suite.as_caller("promotion").wallet
    for odd in (
        Duration(seconds=1, nanos=-5),
        Duration(seconds=-1, nanos=5),
        Duration(nanos=10**9),
    ):
        error = await expect_error(
            promotion.PlaceHold(place(user, 300, expire_after=odd)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REQUEST",
        )
        assert field_violations(error) == {"expire_after"}, odd
    assert await balance(suite, user) == (coins, coins)
