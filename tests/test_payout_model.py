"""A seeded random walk over payout against a model of it: credits, the clock moving (maturation and
debt repayment by the service's own sweep), reversals, quotes, withdrawals to receivers the sandbox
processor pays, fails, leaves unclaimed or returns after paying (its callbacks late, out of order and
some twice), reviews and cancels; each step checked against what the model says every balance must be
and what every refusal must say; the diamond ledger's audit clean at the end. COINS_MODEL_SEED
replays a walk."""

from __future__ import annotations

import datetime as dt
import os
import random
from dataclasses import dataclass, field

import grpc

from coins.payout.v1 import payout_pb2
from runtime.status import error_info
from tests.helpers import ShiftedClock, eventually, new_id, rpc_error, verify_creator
from tests.suite import Suite
from tests.test_payout_maturation import DAYS

STEPS = 120
MINIMUM_DIAMONDS = 2_000  # $10.00 at 200 diamonds a dollar


@dataclass
class Credit:
    gift_id: str
    diamonds: int
    at: dt.datetime
    matured: bool = False
    reversed: bool = False


OUTCOMES = {  # receiver -> what the sandbox processor does with the payment
    "ok@example.com": "paid",
    "fail_card_declined@example.com": "failed",
    "unclaimed@example.com": "returned",
    "returned@example.com": "paid then returned",
}
AUTO_APPROVE_MINOR = 10_000  # $100 a day


@dataclass
class Withdrawal:
    withdrawal_id: str
    diamonds: int
    receiver: str
    status: str  # "in_review", "approved" (on to its outcome), "rejected", "cancelled"
    day: dt.date = dt.date.min
    """The UTC calendar day it was requested (the creators' time zone is UTC here)."""

    @property
    def counts_today(self) -> bool:
        """Counted in its day's total (auto-approval): not failed, returned, rejected or
        cancelled (outcomes have settled when the next step runs: the walk waits for them)."""
        return self.status == "in_review" or (
            self.status == "approved" and OUTCOMES[self.receiver] == "paid"
        )


@dataclass
class Creator:
    name: str
    credits: list[Credit] = field(default_factory=list)
    available: int = 0
    debt: int = 0
    withdrawals: list[Withdrawal] = field(default_factory=list)

    @property
    def held(self) -> int:
        return sum(w.diamonds for w in self.withdrawals if w.status == "in_review")

    @property
    def paid_out(self) -> int:
        return sum(
            w.diamonds
            for w in self.withdrawals
            if w.status == "approved" and OUTCOMES[w.receiver] == "paid"
        )

    @property
    def pending(self) -> int:
        return sum(c.diamonds for c in self.credits if not c.matured and not c.reversed)


class Model:
    def __init__(self, creators: list[str]) -> None:
        self.creators = {name: Creator(name) for name in creators}

    def mature(self, now: dt.datetime) -> None:
        """What the sweep does: due credits become available, then debts are repaid from it."""
        for creator in self.creators.values():
            for credit in creator.credits:
                due = credit.at + dt.timedelta(days=DAYS) <= now
                if due and not credit.matured and not credit.reversed:
                    credit.matured = True
                    creator.available += credit.diamonds
        self.repay()

    def repay(self) -> None:
        """The sweep (every 0.2 s) repays debts from whatever became available."""
        for creator in self.creators.values():
            repay = min(creator.debt, creator.available)
            creator.debt -= repay
            creator.available -= repay

    @staticmethod
    def approved(withdrawal: Withdrawal, creator: Creator) -> None:
        """On to the processor: what comes back (failed, unclaimed, returned after paid) is
        available again once the processor says so."""
        withdrawal.status = "approved"
        if OUTCOMES[withdrawal.receiver] != "paid":
            creator.available += withdrawal.diamonds

    def reverse(self, creator: Creator, credit: Credit) -> None:
        credit.reversed = True
        if not credit.matured:
            return  # taken from pending
        taken = min(credit.diamonds, creator.available)
        creator.available -= taken
        creator.debt += credit.diamonds - taken

    @staticmethod
    def refusal(creator: Creator, diamonds: int) -> str:
        taken = diamonds - diamonds % 2  # whole cents only
        if creator.debt:
            return "DEBT_OUTSTANDING"
        if taken < MINIMUM_DIAMONDS:
            return "BELOW_MINIMUM"
        if taken > creator.available:
            return "INSUFFICIENT_FUNDS"
        return ""


async def test_payout_matches_its_model_through_a_random_walk(
    maturing: tuple[Suite, ShiftedClock],
) -> None:
    suite, clock = maturing
    seed = int(os.environ.get("COINS_MODEL_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    print(f"model walk, seed {seed} (COINS_MODEL_SEED={seed} replays it)")  # shown on a failure
    names = [new_id("creator") for _ in range(3)]
    model = Model(names)
    admin = suite.token(new_id("risk"), admin=True)
    gifting = suite.as_caller("gifting").payout
    verified: set[str] = set()
    outcomes: dict[str, int] = {}

    async def matches() -> bool:
        for creator in model.creators.values():
            got = (
                await suite.payout.GetDiamondBalance(
                    payout_pb2.GetDiamondBalanceRequest(creator_id=creator.name)
                )
            ).balance
            expected = (
                creator.pending,
                creator.available,
                creator.debt,
                creator.held,
                creator.paid_out,
            )
            if (
                got.pending_diamonds,
                got.available_diamonds,
                got.debt_diamonds,
                got.held_diamonds,
                got.paid_out_diamonds,
            ) != expected:
                return False
        return True

    for step in range(STEPS):
        creator = model.creators[rng.choice(names)]
        action = rng.choices(
            ["credit", "advance", "reverse", "withdraw", "review", "cancel"],
            weights=[5, 2, 2, 3, 1, 1],
        )[0]
        where = f"seed {seed}, step {step}: {action} {creator.name}"
        if action == "credit":
            gift_id, diamonds = new_id("g"), rng.randrange(1, 4_000)
            await gifting.CreditDiamonds(
                payout_pb2.CreditDiamondsRequest(
                    request_id=f"gift:{gift_id}",
                    creator_id=creator.name,
                    coins=diamonds * 2,
                    reference=gift_id,
                )
            )
            creator.credits.append(Credit(gift_id, diamonds, clock.now()))
        elif action == "advance":
            clock.shift += dt.timedelta(days=rng.choice([1, 7, 16]))
            model.mature(clock.now())
        elif action == "reverse":
            live = [c for c in creator.credits if not c.reversed]
            if not live:
                continue
            matured = [c for c in live if c.matured]
            credit = rng.choice(matured if matured and rng.random() < 0.7 else live)
            await suite.payout.ReverseGiftCredits(
                payout_pb2.ReverseGiftCreditsRequest(
                    request_id=new_id("rev"), gift_ids=[credit.gift_id], reason=where
                ),
                metadata=admin,
            )
            model.reverse(creator, credit)
            outcomes["reversal"] = outcomes.get("reversal", 0) + 1
        elif action in ("review", "cancel"):
            waiting = [w for w in creator.withdrawals if w.status == "in_review"]
            if not waiting:
                continue
            withdrawal = rng.choice(waiting)
            if action == "cancel":
                await suite.payout.CancelWithdrawal(
                    payout_pb2.CancelWithdrawalRequest(
                        request_id=new_id("cancel"), withdrawal_id=withdrawal.withdrawal_id
                    ),
                    metadata=suite.token(creator.name),
                )
                withdrawal.status = "cancelled"
                creator.available += withdrawal.diamonds
            else:
                approve = rng.random() < 0.6
                review = suite.payout.ReviewWithdrawal(
                    payout_pb2.ReviewWithdrawalRequest(
                        request_id=new_id("review"),
                        withdrawal_id=withdrawal.withdrawal_id,
                        decision=payout_pb2.REVIEW_DECISION_APPROVE
                        if approve
                        else payout_pb2.REVIEW_DECISION_REJECT,
                        reason=where,
                    ),
                    metadata=admin,
                )
                if approve and creator.debt:  # owed back first: the withdrawal stays in review
                    info = error_info(await rpc_error(review))
                    assert info is not None and info.reason == "DEBT_OUTSTANDING", where
                    action = "review refused for a debt"
                elif approve:
                    await review
                    model.approved(withdrawal, creator)
                else:
                    await review
                    withdrawal.status = "rejected"
                    creator.available += withdrawal.diamonds
            outcomes[action] = outcomes.get(action, 0) + 1
            model.repay()
        else:
            if not creator.credits:
                continue  # payout has never heard of this creator
            if creator.name not in verified:
                await verify_creator(suite, creator.name)
                verified.add(creator.name)
            # Often all that is available: later reversals of matured gifts then leave debts.
            everything = max(creator.available - creator.available % 2, 1)
            diamonds = rng.choice(
                [rng.randrange(1_000, 6_000), rng.randrange(20_000, 30_000), everything, everything]
            )
            receiver = rng.choice(list(OUTCOMES))
            expected = model.refusal(creator, diamonds)
            quote = await suite.payout.QuoteWithdrawal(
                payout_pb2.QuoteWithdrawalRequest(creator_id=creator.name, diamonds=diamonds)
            )
            assert quote.refusal == expected, where  # debts included
            request = payout_pb2.RequestWithdrawalRequest(
                request_id=new_id("wd"),
                creator_id=creator.name,
                diamonds=diamonds,
                method=payout_pb2.PAYOUT_METHOD_PAYPAL,
                destination_token=receiver,
            )
            outcome = expected or OUTCOMES[receiver]
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if expected:
                error = await rpc_error(suite.payout.RequestWithdrawal(request))
                info = error_info(error)
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, where
                assert info is not None and info.reason == expected, (where, error.details())
            else:
                taken = await suite.payout.RequestWithdrawal(request)
                assert taken.withdrawal.diamonds == quote.diamonds, where
                creator.available -= quote.diamonds
                today = clock.now().astimezone(dt.UTC).date()
                day_total = sum(
                    w.diamonds // 2
                    for w in creator.withdrawals
                    if w.day == today and w.counts_today
                )
                withdrawal = Withdrawal(
                    taken.withdrawal.withdrawal_id, quote.diamonds, receiver, "in_review", today
                )
                creator.withdrawals.append(withdrawal)
                if day_total + quote.diamonds // 2 <= AUTO_APPROVE_MINOR:
                    assert taken.withdrawal.status == payout_pb2.WITHDRAWAL_STATUS_APPROVED, where
                    model.approved(withdrawal, creator)
                else:
                    assert taken.withdrawal.status == payout_pb2.WITHDRAWAL_STATUS_IN_REVIEW, where
                model.repay()
        await eventually(matches, f"the balances the model expects ({where})")

    runtime = suite.services["payout"].runtime
    async with runtime.db.read() as conn:
        report = await runtime.parts["payouts"].ledger.audit(conn)  # type: ignore[attr-defined]
    assert report.ok, (seed, report)
    print(f"model walk, seed {seed}: {sorted(outcomes.items())}")  # shown with -s
