"""Diamonds mature: a gift's diamonds are pending for the maturation period, then available, moved by
the payout service's own sweep (no one calls), each credit exactly once, on an injected clock."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from pathlib import Path

import grpc
import pytest

from coins.payout.v1 import payout_pb2
from ledger.book import Ledger
from ledger.chain import GENESIS
from runtime.clock import SystemClock
from runtime.db import Database
from runtime.migrations import upgrade
from services.payout.domain import GiftCredit, Payouts
from services.payout.service import SPEC as PAYOUT
from tests.helpers import ShiftedClock, eventually, expect_error, new_id, verify_creator
from tests.suite import Suite
from tests.test_payout import settled

DAYS = 15
PENDING, AVAILABLE = payout_pb2.DIAMOND_BUCKET_PENDING, payout_pb2.DIAMOND_BUCKET_AVAILABLE


async def credit(suite: Suite, creator: str, diamonds: int) -> payout_pb2.CreditDiamondsResponse:
    return await suite.as_caller("gifting").payout.CreditDiamonds(
        payout_pb2.CreditDiamondsRequest(
            request_id=new_id("gift"), creator_id=creator, coins=diamonds * 2, reference=new_id("g")
        )
    )


async def balance_of(suite: Suite, creator: str) -> payout_pb2.DiamondBalance:
    response = await suite.payout.GetDiamondBalance(
        payout_pb2.GetDiamondBalanceRequest(creator_id=creator)
    )
    return response.balance


def withdrawal(creator: str, diamonds: int) -> payout_pb2.RequestWithdrawalRequest:
    return payout_pb2.RequestWithdrawalRequest(
        request_id=new_id("wd"),
        creator_id=creator,
        diamonds=diamonds,
        method=payout_pb2.PAYOUT_METHOD_PAYPAL,
        destination_token="dest_paypal_ok",
    )


async def test_diamonds_wait_pending_then_become_available_by_themselves(
    maturing: tuple[Suite, ShiftedClock],
) -> None:
    suite, clock = maturing
    creator = new_id("creator")
    answer = await credit(suite, creator, 3_000)
    await verify_creator(suite, creator)
    assert (answer.balance.pending_diamonds, answer.balance.available_diamonds) == (3_000, 0)
    before = await balance_of(suite, creator)
    assert (before.diamonds, before.pending_diamonds, before.available_diamonds) == (
        3_000,
        3_000,
        0,
    )
    matures = before.next_available_time.ToDatetime(dt.UTC)
    assert abs(matures - (clock.now() + dt.timedelta(days=DAYS))) < dt.timedelta(seconds=5)

    # Pending diamonds cannot leave: the refusal says what is pending and until when.
    refused = await expect_error(
        suite.payout.RequestWithdrawal(withdrawal(creator, 2_000)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_FUNDS",
    )
    assert "3000 more are pending" in (refused.details() or "")

    clock.shift += dt.timedelta(days=DAYS, seconds=1)

    async def matured() -> bool:
        return (await balance_of(suite, creator)).available_diamonds == 3_000

    await eventually(matured, "the maturation sweep")
    after = await balance_of(suite, creator)
    assert (after.pending_diamonds, after.available_diamonds, after.diamonds) == (0, 3_000, 3_000)
    assert not after.HasField("next_available_time")

    taken = await suite.payout.RequestWithdrawal(withdrawal(creator, 2_000))
    assert taken.balance.available_diamonds == 1_000
    # The hold becomes a ledger entry when the processor has paid.
    paid = await settled(suite, taken.withdrawal.withdrawal_id, creator)
    assert paid.status == payout_pb2.WITHDRAWAL_STATUS_PAID

    entries = await suite.payout.ListDiamondEntries(
        payout_pb2.ListDiamondEntriesRequest(creator_id=creator)
    )
    seen = [(e.kind, e.diamonds, e.bucket) for e in entries.entries]
    assert seen[0] == (payout_pb2.DIAMOND_ENTRY_KIND_WITHDRAWAL, -2_000, AVAILABLE)
    assert sorted(seen[1:3]) == sorted(
        [
            (payout_pb2.DIAMOND_ENTRY_KIND_MATURATION, 3_000, AVAILABLE),
            (payout_pb2.DIAMOND_ENTRY_KIND_MATURATION, -3_000, PENDING),
        ]
    )
    assert seen[3] == (payout_pb2.DIAMOND_ENTRY_KIND_GIFT, 3_000, PENDING)
    # Opaque ids (ledger.entry_ids), one per entry of both buckets.
    ids = {e.entry_id for e in entries.entries}
    assert len(ids) == 4 and all(len(i) == 32 and not i.isdigit() for i in ids), ids
    statement = await suite.payout.GetDiamondStatement(
        payout_pb2.GetDiamondStatementRequest(creator_id=creator)
    )
    assert (statement.opening_balance, statement.closing_balance) == (0, 1_000)
    lines = {line.kind: (line.credited, line.debited) for line in statement.lines}
    assert lines[payout_pb2.DIAMOND_ENTRY_KIND_MATURATION] == (3_000, 3_000)


async def test_each_gift_matures_on_its_own_day(maturing: tuple[Suite, ShiftedClock]) -> None:
    suite, clock = maturing
    creator = new_id("creator")
    await credit(suite, creator, 1_000)
    clock.shift += dt.timedelta(days=10)
    await credit(suite, creator, 400)
    clock.shift += dt.timedelta(days=5, seconds=1)

    async def first_matured() -> bool:
        return (await balance_of(suite, creator)).available_diamonds == 1_000

    await eventually(first_matured, "the first gift's maturation")
    now = await balance_of(suite, creator)
    assert (now.pending_diamonds, now.available_diamonds) == (400, 1_000)
    left = now.next_available_time.ToDatetime(dt.UTC) - clock.now()
    assert dt.timedelta(days=9) < left < dt.timedelta(days=10)


async def test_concurrent_sweeps_mature_each_credit_once(
    maturing: tuple[Suite, ShiftedClock],
) -> None:
    """Several sweeps at once (replicas, a restart mid-sweep): every credit matures exactly once
    and the audit of the diamond ledger stays clean."""
    suite, clock = maturing
    creators = [new_id("creator") for _ in range(6)]
    for n, creator in enumerate(creators):
        for _ in range(5):
            await credit(suite, creator, 100 + n)
    clock.shift += dt.timedelta(days=DAYS, seconds=1)
    runtime = suite.services["payout"].runtime
    payouts = runtime.parts["payouts"]
    assert isinstance(payouts, Payouts)
    # Four sweeps at once, besides the service's own: none fails, and (below) none matures a
    # credit twice: each creator ends with exactly its credits available and nothing pending.
    await asyncio.gather(*(payouts.mature(runtime.db.driver, clock.now()) for _ in range(4)))
    for n, creator in enumerate(creators):

        async def done(creator: str = creator, n: int = n) -> bool:
            return (await balance_of(suite, creator)).available_diamonds == 5 * (100 + n)

        await eventually(done, "every credit matured")
        assert (await balance_of(suite, creator)).pending_diamonds == 0
    async with runtime.db.read() as conn:
        report = await payouts.ledger.audit(conn)
    assert report.ok, report


async def test_reversals_take_pending_then_available_then_leave_a_debt(
    maturing: tuple[Suite, ShiftedClock],
) -> None:
    """Fraud found later: a pending gift is taken from pending and never matures; a matured one from
    what is available, the rest becomes a debt that blocks withdrawals until later diamonds repay it.
    Each gift is reversed once, however often it is named."""
    suite, clock = maturing
    creator = new_id("creator")
    gifting = suite.as_caller("gifting").payout

    async def gift(diamonds: int) -> str:
        gift_id = new_id("g")
        await gifting.CreditDiamonds(
            payout_pb2.CreditDiamondsRequest(
                request_id=f"gift:{gift_id}",
                creator_id=creator,
                coins=diamonds * 2,
                reference=gift_id,
            )
        )
        return gift_id

    old, older = await gift(3_000), await gift(1_000)
    await verify_creator(suite, creator)
    clock.shift += dt.timedelta(days=DAYS, seconds=1)

    async def matured() -> bool:
        return (await balance_of(suite, creator)).available_diamonds == 4_000

    await eventually(matured, "the first gifts maturing")
    made = await suite.payout.RequestWithdrawal(withdrawal(creator, 2_500))  # 1,500 left

    async def status() -> int:
        got = await suite.payout.GetWithdrawal(
            payout_pb2.GetWithdrawalRequest(withdrawal_id=made.withdrawal.withdrawal_id),
            metadata=suite.token(creator),
        )
        return got.withdrawal.status

    async def sent() -> bool:  # an approved one not yet sent would go back to review
        return await status() in (
            payout_pb2.WITHDRAWAL_STATUS_PROCESSING,
            payout_pb2.WITHDRAWAL_STATUS_PAID,
        )

    await eventually(sent, "the withdrawal with the processor")
    fresh = await gift(700)  # still pending
    admin = suite.token(new_id("risk"), admin=True)
    request = payout_pb2.ReverseGiftCreditsRequest(
        request_id=new_id("rev"), gift_ids=[old, fresh, "no-such-gift"], reason="chargeback fraud"
    )
    reversed_ = await suite.payout.ReverseGiftCredits(request, metadata=admin)
    by_gift = {r.gift_id: r for r in reversed_.reversals}
    assert list(reversed_.not_found) == ["no-such-gift"]
    assert (by_gift[fresh].from_pending, by_gift[fresh].to_debt) == (700, 0)
    assert (by_gift[old].from_available, by_gift[old].to_debt) == (1_500, 1_500)
    after = await balance_of(suite, creator)
    assert (after.pending_diamonds, after.available_diamonds, after.debt_diamonds) == (0, 0, 1_500)
    # The same request again answers the same; naming a gift again moves nothing.
    assert await suite.payout.ReverseGiftCredits(request, metadata=admin) == reversed_
    again = await suite.payout.ReverseGiftCredits(
        payout_pb2.ReverseGiftCreditsRequest(
            request_id=new_id("rev"), gift_ids=[old], reason="named twice"
        ),
        metadata=admin,
    )
    assert again.reversals[0].already_reversed
    assert (await balance_of(suite, creator)).debt_diamonds == 1_500

    refused = await expect_error(
        suite.payout.RequestWithdrawal(withdrawal(creator, 2_000)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "DEBT_OUTSTANDING",
    )
    assert "1500" in (refused.details() or "")
    # The reversed pending gift never matures; a later gift repays the debt when it does.
    await gift(2_000)
    clock.shift += dt.timedelta(days=DAYS, seconds=1)

    async def repaid() -> bool:
        now = await balance_of(suite, creator)
        return (now.debt_diamonds, now.available_diamonds, now.pending_diamonds) == (0, 500, 0)

    await eventually(repaid, "the debt repaid by the next matured gift")
    listed = await suite.payout.ListDiamondEntries(
        payout_pb2.ListDiamondEntriesRequest(creator_id=creator, page_size=100)
    )
    moves = {(e.kind, e.bucket, e.diamonds) for e in listed.entries}
    assert (payout_pb2.DIAMOND_ENTRY_KIND_REVERSAL, payout_pb2.DIAMOND_BUCKET_DEBT, -1_500) in moves
    # The reversal's entries name the gifts taken back (they named the admin's reason).
    assert {
        e.reference for e in listed.entries if e.kind == payout_pb2.DIAMOND_ENTRY_KIND_REVERSAL
    } == {f"2 gifts: {', '.join(sorted([old, fresh]))}"}
    assert (payout_pb2.DIAMOND_ENTRY_KIND_DEBT_REPAYMENT, AVAILABLE, -1_500) in moves
    assert (
        payout_pb2.DIAMOND_ENTRY_KIND_DEBT_REPAYMENT,
        payout_pb2.DIAMOND_BUCKET_DEBT,
        1_500,
    ) in (moves)

    # The withdrawal's diamonds stay on the account, held, until the processor pays it (the
    # sandbox's settle time; slower on a loaded machine): then the statement closes at 500.
    async def paid() -> bool:
        return await status() == payout_pb2.WITHDRAWAL_STATUS_PAID

    await eventually(paid, "the withdrawal paid")
    statement = await suite.payout.GetDiamondStatement(
        payout_pb2.GetDiamondStatementRequest(creator_id=creator)
    )
    assert statement.closing_balance == 500  # available 500, nothing pending, no debt
    assert older  # untouched: still part of what matured
    runtime = suite.services["payout"].runtime
    async with runtime.db.read() as conn:
        report = await runtime.parts["payouts"].ledger.audit(conn)  # type: ignore[attr-defined]
    assert report.ok, report


async def test_every_debtor_is_repaid_however_many_owe_with_nothing_to_repay(
    maturing: tuple[Suite, ShiftedClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep looks at debtors a page at a time (PAYOUT_MATURATION_BATCH, here 1) in id order:
    a first page of debtors with nothing available does not keep the later ones from repaying.
    Before, it read the first 500 by id on every sweep and no other."""
    suite, clock = maturing
    payouts = suite.services["payout"].runtime.parts["payouts"]
    assert isinstance(payouts, Payouts)
    monkeypatch.setattr(
        payouts, "settings", payouts.settings.model_copy(update={"maturation_batch": 1})
    )
    admin = suite.token(new_id("risk"), admin=True)
    run = uuid.uuid4().hex[:10]

    async def debtor(name: str, *, rejected: bool) -> str:
        """A creator owing 40,000 diamonds: a matured gift reversed while a withdrawal of all of
        it waits in review (held diamonds are not taken); the withdrawal then stays in review, or
        is rejected, which makes the diamonds available to repay the debt."""
        creator, gift = f"{name}-{run}", new_id("g")
        await suite.as_caller("gifting").payout.CreditDiamonds(
            payout_pb2.CreditDiamondsRequest(
                request_id=f"gift:{gift}", creator_id=creator, coins=80_000, reference=gift
            )
        )
        await verify_creator(suite, creator)
        clock.shift += dt.timedelta(days=DAYS, seconds=1)

        async def matured() -> bool:
            return (await balance_of(suite, creator)).available_diamonds == 40_000

        await eventually(matured, f"{creator}'s gift maturing")
        made = (await suite.payout.RequestWithdrawal(withdrawal(creator, 40_000))).withdrawal
        assert made.status == payout_pb2.WITHDRAWAL_STATUS_IN_REVIEW
        await suite.payout.ReverseGiftCredits(
            payout_pb2.ReverseGiftCreditsRequest(
                request_id=new_id("rev"), gift_ids=[gift], reason="chargeback fraud"
            ),
            metadata=admin,
        )
        assert (await balance_of(suite, creator)).debt_diamonds == 40_000
        if rejected:
            await suite.payout.ReviewWithdrawal(
                payout_pb2.ReviewWithdrawalRequest(
                    request_id=new_id("review"),
                    withdrawal_id=made.withdrawal_id,
                    decision=payout_pb2.REVIEW_DECISION_REJECT,
                    reason="its gift was reversed",
                ),
                metadata=admin,
            )
        return creator

    stuck = await debtor("aaa", rejected=False)  # first by id, nothing available
    owing = await debtor("zzz", rejected=True)

    async def repaid() -> bool:
        now = await balance_of(suite, owing)
        return (now.debt_diamonds, now.available_diamonds) == (0, 0)

    await eventually(repaid, "the second page's debtor repaid")
    assert (await balance_of(suite, stuck)).debt_diamonds == 40_000


async def test_a_new_rate_applies_to_coins_received_from_then_on(
    maturing: tuple[Suite, ShiftedClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Diamonds credited stand when the rate changes: a cut used to take the difference back from
    pending diamonds (a negative share, which then stopped every creator's maturation sweep, and
    refused a small gift to a creator with nothing pending), and a raise paid the new rate on every
    past coin. Each creator's current rate now runs from where it came in."""
    suite, clock = maturing
    payouts = suite.services["payout"].runtime.parts["payouts"]
    assert isinstance(payouts, Payouts)
    cut, other, matured = new_id("creator"), new_id("creator"), new_id("creator")
    gifting = suite.as_caller("gifting").payout

    async def gift(creator: str, coins: int) -> int:
        answer = await gifting.CreditDiamonds(
            payout_pb2.CreditDiamondsRequest(
                request_id=new_id("gift"), creator_id=creator, coins=coins, reference=new_id("g")
            )
        )
        return answer.diamonds_credited

    assert await gift(cut, 101) == 50  # 1/2: half a diamond not paid yet
    assert await gift(other, 1_000) == 500
    assert await gift(matured, 100) == 50
    clock.shift += dt.timedelta(days=DAYS, seconds=1)

    async def all_matured() -> bool:
        return (await balance_of(suite, matured)).available_diamonds == 50

    await eventually(all_matured, "the first credits maturing")
    clock.shift -= dt.timedelta(days=DAYS, seconds=1)  # what follows is credited later
    monkeypatch.setattr(
        payouts,
        "settings",
        payouts.settings.model_copy(update={"diamonds_per_coin_denominator": 3}),
    )
    assert [await gift(cut, 2), await gift(cut, 1), await gift(cut, 3)] == [0, 1, 1]
    assert await gift(matured, 2) == 0  # was refused: "not enough diamonds"
    assert await gift(matured, 1) == 1
    monkeypatch.setattr(
        payouts,
        "settings",
        payouts.settings.model_copy(update={"diamonds_per_coin_denominator": 1}),
    )
    assert await gift(cut, 4) == 4  # 1 a coin from now on, nothing more for the past 107 coins
    clock.shift += dt.timedelta(days=2 * DAYS)

    async def matured_in_full() -> bool:
        standing = [await balance_of(suite, c) for c in (cut, other, matured)]
        return [(b.pending_diamonds, b.available_diamonds) for b in standing] == [
            (0, 56),
            (0, 500),
            (0, 51),
        ]

    await eventually(matured_in_full, "every credit maturing, none negative")
    runtime = suite.services["payout"].runtime
    async with runtime.db.read() as conn:
        report = await payouts.ledger.audit(conn)
        negative = await conn.exec_driver_sql(
            "SELECT count(*) FROM gift_credits WHERE diamonds < 0"
        )
        assert negative.scalar_one() == 0
    assert report.ok, report


def without_maturation(suite: Suite) -> Payouts:
    """The same payout, configured with `PAYOUT_MATURATION_DAYS=0` (as before or after a change)."""
    payouts = suite.services["payout"].runtime.parts["payouts"]
    assert isinstance(payouts, Payouts)
    settings = payouts.settings.model_copy(update={"maturation_days": 0})
    return Payouts(settings, payouts.ledger)


async def test_a_maturation_period_set_later_still_credits_creators_credited_without_one(
    maturing: tuple[Suite, ShiftedClock],
) -> None:
    """A creator first credited with no maturation period, then credited once it is set: the gift
    goes to their pending diamonds (it was refused, ACCOUNT_NOT_FOUND, and parked for good)."""
    suite, clock = maturing
    creator = new_id("creator")
    runtime = suite.services["payout"].runtime
    await without_maturation(suite).credit(
        runtime.db.driver,
        [GiftCredit(key := new_id("gift-key"), key, "fp", creator, 2_000, "before the change")],
        clock.now(),
        lambda creator_id, diamonds, balance: b"",
    )
    await verify_creator(suite, creator)
    assert (await balance_of(suite, creator)).available_diamonds == 1_000
    answer = await credit(suite, creator, 300)
    assert (answer.balance.pending_diamonds, answer.balance.available_diamonds) == (300, 1_000)


async def test_pending_diamonds_mature_at_once_when_the_maturation_period_is_removed(
    maturing: tuple[Suite, ShiftedClock],
) -> None:
    suite, clock = maturing
    creator = new_id("creator")
    await credit(suite, creator, 700)
    await verify_creator(suite, creator)
    runtime = suite.services["payout"].runtime
    matured = await without_maturation(suite).mature(runtime.db.driver, clock.now())
    assert matured >= 1
    after = await balance_of(suite, creator)
    assert (after.pending_diamonds, after.available_diamonds) == (0, 700)


async def test_the_migration_opens_a_pending_account_for_every_creator_without_one(
    tmp_path: Path,
) -> None:
    """Creators first credited with no maturation period had no pending account (see above)."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'payout.db'}")
    try:
        await upgrade(db, PAYOUT.migrations_dir, "0018")
        ledger = Ledger(SystemClock(), unit="diamonds")
        async with db.transaction() as conn:
            for account in ("creator:old-1", "creator:old-2", "pending:old-2", "issuance"):
                await ledger.open_account(conn, account)
        await upgrade(db, PAYOUT.migrations_dir)
        async with db.read() as conn:
            rows = (
                await conn.exec_driver_sql(
                    "SELECT account_id, balance, seq, head_hash, keeps_balance "
                    "FROM ledger_accounts WHERE account_id LIKE 'pending:%' ORDER BY 1"
                )
            ).all()
            report = await ledger.audit(conn)
        assert [tuple(r) for r in rows] == [
            ("pending:old-1", 0, 0, GENESIS, 1),
            ("pending:old-2", 0, 0, GENESIS, 1),
        ]
        assert report.ok, report
    finally:
        await db.close()
