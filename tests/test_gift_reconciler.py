"""A gift whose debit happened but was never recorded (the gifting process died, the wallet's answer
was lost) is settled by the reconciler: recorded and credited to the creator, or failed if the wallet
never debited, and the debit voided so it can never happen late. No coin is lost either way."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.errors import Unavailable
from runtime.server import RECONCILE_PAGE
from runtime.status import error_info
from services.gifting import storage
from services.gifting.clients import WalletDebiter
from tests.helpers import (
    eventually,
    expect_error,
    funded_user,
    live_gift,
    live_of,
    new_creator,
    new_id,
    rpc_error,
)
from tests.suite import Suite, start_suite


@pytest.fixture(scope="module")
async def reconciling(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Suite]:
    suite = await start_suite(
        backend,
        tmp_path_factory.mktemp(f"gifts-{backend}"),
        overrides={"gifting": {"reconcile_every_seconds": 0.1, "reconcile_after_seconds": 0.3}},
    )
    yield suite
    await suite.stop()


async def pending_gift(suite: Suite, sender: str) -> str:
    """A gift left pending before its debit (the gifting process died): the reconciler's work."""
    return (await pending_gifts(suite, sender, 1))[0]


async def pending_gifts(suite: Suite, sender: str, count: int) -> list[str]:
    """`count` such gifts, written at once (one transaction)."""
    made = [uuid.uuid4().hex for _ in range(count)]
    now = dt.datetime.now(dt.UTC)
    async with suite.services["gifting"].runtime.db.transaction() as conn:
        for sent_gift_id in made:
            await storage.insert_sent_gift(
                conn,
                storage.SentGiftRecord(
                    sent_gift_id=sent_gift_id,
                    sender_id=sender,
                    creator_id=new_id("creator"),
                    gift_id="rose",
                    count=1,
                    coins=1,
                    live_id="live-x",
                    video_id=None,
                    status="pending",
                    wallet_transaction_id=None,
                    created_at=now,
                    updated_at=now,
                ),
            )
    return made


async def status_of(suite: Suite, sent_gift_id: str) -> str:
    async with suite.services["gifting"].runtime.db.read() as conn:
        gift = await storage.get_sent_gift(conn, sent_gift_id)
    assert gift is not None
    return gift.status


async def test_wallet_resolves_debits_it_did_refused_or_never_saw(reconciling: Suite) -> None:
    suite = reconciling
    gifting = suite.as_caller("gifting").wallet
    user, coins = await funded_user(suite)
    done = wallet_pb2.DebitCoinsRequest(
        request_id=new_id("gift:"),
        user_id=user,
        coins=5,
        reason=wallet_pb2.DEBIT_REASON_GIFT,
        reference="g",
    )
    debited = await gifting.DebitCoins(done)
    resolved = await gifting.ResolveDebit(
        wallet_pb2.ResolveDebitRequest(request_id=done.request_id, user_id=user)
    )
    assert resolved.outcome == wallet_pb2.DEBIT_OUTCOME_DEBITED and resolved.debit == debited

    lost = new_id("gift:")
    resolve_lost = wallet_pb2.ResolveDebitRequest(request_id=lost, user_id=user)
    assert (await gifting.ResolveDebit(resolve_lost)).outcome == wallet_pb2.DEBIT_OUTCOME_VOIDED
    late = wallet_pb2.DebitCoinsRequest(
        request_id=lost, user_id=user, coins=5, reason=wallet_pb2.DEBIT_REASON_GIFT, reference="g"
    )
    voided = await expect_error(  # the void, not "used with different parameters": they match
        gifting.DebitCoins(late), grpc.StatusCode.FAILED_PRECONDITION, "DEBIT_VOIDED"
    )
    assert "voided by a reconciliation" in (voided.details() or "")
    assert (await gifting.ResolveDebit(resolve_lost)).outcome == wallet_pb2.DEBIT_OUTCOME_VOIDED
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=user))
    assert balance.balance.coins == coins - 5  # the late debit never happened


async def test_a_gift_debited_but_never_recorded_is_credited(reconciling: Suite) -> None:
    suite = reconciling
    sender, coins = await funded_user(suite)
    creator = await new_creator(suite)
    # Make recording the debit fail once, as if the process died right after the wallet answered.
    from services.gifting.domain import Gifting

    original, in_streak = Gifting.record_debit, Gifting.record_debit_in_streak
    calls = {"n": 0}

    def crashing_once(record: Any) -> Any:
        async def crash_once(self: Gifting, *args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("the process died here")
            return await record(self, *args, **kwargs)

        return crash_once

    # Either way of recording it (panda streaks: on PostgreSQL it joins its streak in one statement).
    Gifting.record_debit = crashing_once(original)  # type: ignore[method-assign]
    Gifting.record_debit_in_streak = crashing_once(in_streak)  # type: ignore[method-assign]
    try:
        request = gifting_pb2.SendGiftRequest(
            request_id=new_id(),
            sender_id=sender,
            creator_id=creator,
            gift_id="panda",
            count=2,
            live_id=live_of(creator),
        )
        await expect_error(
            suite.gifting.SendGift(request), grpc.StatusCode.INTERNAL, "INTERNAL_ERROR"
        )

        async def credited() -> bool:
            answer = await suite.payout.GetDiamondBalance(
                payout_pb2.GetDiamondBalanceRequest(creator_id=creator)
            )
            return answer.balance.diamonds == 5  # 10 coins -> 5 diamonds

        await eventually(credited, "the gift's credit")
    finally:
        Gifting.record_debit = original  # type: ignore[method-assign]
        Gifting.record_debit_in_streak = in_streak  # type: ignore[method-assign]
    replayed = await suite.gifting.SendGift(request)  # the original request id gets its answer
    assert replayed.sent_gift.coins == 10
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))
    assert balance.balance.coins == coins - 10


async def test_a_gift_the_wallet_never_debited_fails_and_can_never_debit(
    reconciling: Suite,
) -> None:
    suite = reconciling
    sender, coins = await funded_user(suite)
    sent_gift_id = await pending_gift(suite, sender)  # died before the debit

    async def failed() -> bool:
        async with suite.services["gifting"].runtime.db.read() as conn:
            gift = await storage.get_sent_gift(conn, sent_gift_id)
        return gift is not None and gift.status == "failed"

    await eventually(failed, "the gift to fail")
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))
    assert balance.balance.coins == coins


async def test_a_gift_voided_after_its_live_ended_says_the_live_ended(
    reconciling: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconciler voids a gift whose debit never happened, after its LIVE ended: its answer is
    LIVE_ENDED, no coins moved, as when EndLive settles it, not DEBIT_VOIDED's "send it again",
    which could only meet LIVE_ENDED (review C)."""
    from services.gifting import sending

    suite = reconciling
    sender, coins = await funded_user(suite)
    creator = await new_creator(suite)

    async def stopped_before_the_debit(self: WalletDebiter, **kwargs: Any) -> Any:
        raise Unavailable("DEPENDENCY_UNAVAILABLE", "the attempt stopped before the debit")

    async def wallet_unreachable(self: WalletDebiter, **kwargs: Any) -> Any:
        raise Unavailable("DEPENDENCY_UNAVAILABLE", "the wallet cannot be reached yet")

    request = live_gift(sender, creator, "rose")
    monkeypatch.setattr(WalletDebiter, "debit_for_gift", stopped_before_the_debit)
    monkeypatch.setattr(WalletDebiter, "resolve_gift_debit", wallet_unreachable)  # not settled yet
    await expect_error(
        suite.gifting.SendGift(request), grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE"
    )
    # EndLive leaves it (as it leaves a gift still on its way), so the reconciler settles it.
    monkeypatch.setattr(sending, "_SETTLE_AFTER", dt.timedelta(days=1))
    await suite.gifting.EndLive(
        gifting_pb2.EndLiveRequest(request_id=new_id("end"), live_id=live_of(creator)),
        metadata=suite.token(creator),
    )
    monkeypatch.undo()

    async def failed() -> bool:
        async with suite.services["gifting"].runtime.db.read() as conn:
            statuses = (
                await conn.execute(
                    sa.select(storage.sent_gifts.c.status).where(
                        storage.sent_gifts.c.sender_id == sender
                    )
                )
            ).scalars()
            return list(statuses) == ["failed"]

    await eventually(failed, "the reconciler to settle the gift as failed")
    error = await rpc_error(suite.gifting.SendGift(request))  # the retry reads the answer
    info = error_info(error)
    assert info is not None and info.reason == "LIVE_ENDED", error.details()
    assert "no coins moved" in (error.details() or "")
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))
    assert balance.balance.coins == coins


async def test_a_debit_resolved_after_the_wallet_purged_its_request_id_is_still_a_debit(
    reconciling: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wallet debited, its answer was lost, and gifting could not ask until the wallet had
    purged the debit's request id (WALLET_IDEMPOTENCY_RETENTION_HOURS): the ledger, which keeps
    every transaction under its request id for ever, still says it was debited, so the gift is
    recorded and credited (it was voided and failed: the sender's coins gone, the creator unpaid)."""
    suite = reconciling
    sender, coins = await funded_user(suite)
    creator = await new_creator(suite)
    real_debit, real_resolve = WalletDebiter.debit_for_gift, WalletDebiter.resolve_gift_debit
    reachable = asyncio.Event()

    async def answer_lost(self: WalletDebiter, **kwargs: Any) -> Any:
        await real_debit(self, **kwargs)  # the wallet debits, and its answer never arrives
        raise Unavailable("DEPENDENCY_UNAVAILABLE", "the wallet's answer was lost")

    async def once_reachable(self: WalletDebiter, **kwargs: Any) -> Any:
        if not reachable.is_set():
            raise Unavailable("DEPENDENCY_UNAVAILABLE", "the wallet is unreachable")
        return await real_resolve(self, **kwargs)

    monkeypatch.setattr(WalletDebiter, "debit_for_gift", answer_lost)
    monkeypatch.setattr(WalletDebiter, "resolve_gift_debit", once_reachable)
    request = live_gift(sender, creator, "panda", count=2)  # 10 coins
    await expect_error(
        suite.gifting.SendGift(request), grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE"
    )
    monkeypatch.setattr(WalletDebiter, "debit_for_gift", real_debit)
    # Two days pass: the wallet's purge forgets its answered request ids.
    assert await suite.services["wallet"].runtime.idempotency.purge(dt.timedelta(0)) > 0
    reachable.set()

    async def credited() -> bool:
        answer = await suite.payout.GetDiamondBalance(
            payout_pb2.GetDiamondBalanceRequest(creator_id=creator)
        )
        return answer.balance.diamonds == 5  # 10 coins -> 5 diamonds

    await eventually(credited, "the gift recorded by the reconciler and credited")
    replayed = await suite.gifting.SendGift(request)  # the request's own retry: its answer
    assert (replayed.sent_gift.coins, replayed.sent_gift.sender_id) == (10, sender)
    balance = await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=sender))
    assert balance.balance.coins == coins - 10  # debited once


async def test_a_gift_the_reconciler_cannot_settle_holds_up_no_other(
    reconciling: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asking the wallet about one gift fails with something unexpected (a bug, a bad row): the
    reconciler logs it and settles the next gift in the same round (the round ended there)."""
    suite = reconciling
    sender, _ = await funded_user(suite)
    stuck = await pending_gift(suite, sender)
    real_resolve = WalletDebiter.resolve_gift_debit

    async def fails_for_one(self: WalletDebiter, **kwargs: Any) -> Any:
        if kwargs["sent_gift_id"] == stuck:
            raise RuntimeError("unexpected")
        return await real_resolve(self, **kwargs)

    monkeypatch.setattr(WalletDebiter, "resolve_gift_debit", fails_for_one)
    later = await pending_gift(suite, sender)

    async def later_failed() -> bool:
        return await status_of(suite, later) == "failed"  # never debited: failed, voided

    await eventually(later_failed, "the later gift settled past the one that fails")
    assert await status_of(suite, stuck) == "pending"
    monkeypatch.setattr(WalletDebiter, "resolve_gift_debit", real_resolve)

    async def stuck_failed() -> bool:
        return await status_of(suite, stuck) == "failed"

    await eventually(stuck_failed, "the stuck gift settled once it can be")


async def test_a_backlog_of_pending_gifts_drains_in_one_period(
    backend: str, tmp_path: Path
) -> None:
    """After a burst of abandoned calls (or an outage), hundreds of gifts wait pending. The
    reconciler took one page (100) per period, so 250 took three periods (minutes with the shipped
    30 s); a pass that settles a full page now runs again at once."""
    every = 5.0
    suite = await start_suite(
        backend,
        tmp_path,
        overrides={"gifting": {"reconcile_every_seconds": every, "reconcile_after_seconds": 0.3}},
    )
    try:
        sender, _ = await funded_user(suite)
        await pending_gifts(suite, sender, 2 * RECONCILE_PAGE + RECONCILE_PAGE // 2)

        async def none_pending() -> bool:
            async with suite.services["gifting"].runtime.db.read() as conn:
                pending = await conn.execute(
                    sa.text("SELECT count(*) FROM sent_gifts WHERE status = 'pending'")
                )
                return int(pending.scalar_one()) == 0

        # The first pass comes within one period; three pages one period apart would take two more.
        await eventually(none_pending, "the whole backlog settled", seconds=every + 4)
    finally:
        await suite.stop()
