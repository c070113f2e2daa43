"""Payout rules for diamonds: crediting gifts (in batches, each exactly once), reversing them and
the debts that leaves, maturation, balances, revenue and statements. Withdrawals and their limits
are in withdrawals.py, the processor worker in processor.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger import Ledger, Posting
from ledger.history import HistoryEntry, Period, entries_page, period
from runtime.errors import (
    Aborted,
    FieldViolation,
    InvalidArgument,
    request_id_reused,
)
from runtime.sql import Driver, Tx, as_tx, is_conflict
from services.payout import policy, storage
from services.payout.methods import PayoutMethods
from services.payout.settings import PayoutSettings

ISSUANCE = "system:diamond_issuance"
IN_FLIGHT = "system:withdrawals_in_flight"
PAID_OUT = "system:paid_out"


def creator_account(creator_id: str) -> str:
    """The ledger account that holds a creator's available diamonds (what can be withdrawn)."""
    return f"creator:{creator_id}"


def pending_account(creator_id: str) -> str:
    """The ledger account that holds a creator's pending diamonds: credited, not yet matured."""
    return f"pending:{creator_id}"


def bucket_of(account_id: str) -> str:
    """Which of a creator's balances an account is: "pending", "available" or "debt"."""
    prefix = account_id.split(":", 1)[0]
    return {"pending": "pending", "debt": "debt"}.get(prefix, "available")


def creator_accounts(creator_id: str) -> list[str]:
    """All of a creator's diamond accounts: what their statements and listings cover."""
    return [creator_account(creator_id), pending_account(creator_id), debt_account(creator_id)]


def debt_account(creator_id: str) -> str:
    """The ledger account of what a creator owes back after reversals (never above zero)."""
    return f"debt:{creator_id}"


@dataclass(frozen=True)
class Reversal:
    """What reversing one gift's credit did."""

    gift_id: str
    creator_id: str
    diamonds: int
    """What the gift had credited."""
    taken: int
    """What its reversal took back: from_pending + from_available + to_debt - to_available (see
    `_taken_back`)."""
    from_pending: int = 0
    from_available: int = 0
    to_debt: int = 0
    to_available: int = 0
    """What a pending credit gave up beyond what was taken (at most a diamond): now available."""
    already_reversed: bool = False


@dataclass(frozen=True)
class CreatorDiamonds:
    """Where a creator's diamonds are."""

    pending: int
    """Credited for gifts, maturing (`maturation_days` after each gift)."""
    available: int
    """Matured: what can be withdrawn."""
    held: int = 0
    """Taken for withdrawals that are on their way out."""
    paid_out: int = 0
    debt: int = 0
    next_available_at: dt.datetime | None = None
    """When the oldest pending diamonds become available (None: nothing pending)."""

    @property
    def total(self) -> int:
        return self.pending + self.available


@dataclass(frozen=True)
class GiftCredit:
    """One gift's credit as asked for: `key` is its request id in the caller's scope and the
    creator's (exactly once), `request` the same without the creator (one creator per request id),
    `fingerprint` its parameters (a reused key with other parameters is refused), `also` the other
    fingerprints a record of the same request may carry (runtime.idempotency.fingerprints)."""

    key: str
    request: str
    fingerprint: str
    creator_id: str
    coins: int
    reference: str
    also: tuple[str, ...] = ()


Answer = Callable[[str, int, CreatorDiamonds], bytes]
"""Renders a credit's answer from (creator, diamonds credited, the creator's diamonds right after
it): the gRPC layer's."""


def _taken_back(
    totals: storage.CreatorTotals,
    closed: dict[int, tuple[tuple[int, int], int]],
    credits: Sequence[storage.CreditOfGift],
) -> tuple[dict[str, tuple[int, int]], storage.TakenBack]:
    """Per credit (its key): the diamonds to take back and the coins that come off its segment
    with them; and what that takes off the creator's totals.

    A credit takes back what its coins moved floor(segment's coins x rate) by, each in turn from
    what its rate segment converted: the current one (`totals`) or one that ended (`closed`).
    One-coin gifts credited 0 and 1 alternately (rate 1/2) take back 1 every other gift whichever
    ones are reversed, so the creator keeps floor(coins kept x rate) in each segment. A credit of
    the rule before segments were numbered (-1, migration 0033) takes back its own share and leaves
    the totals alone: its segment never mixes the two rules."""
    taken: dict[str, tuple[int, int]] = {}
    back = storage.TakenBack()
    coins = {n: c for n, (_, c) in closed.items()}
    rates = {n: rate for n, (rate, _) in closed.items()}
    if totals.rate is not None:
        coins[totals.segment] = totals.coins_received - totals.coins_at_rate
        rates[totals.segment] = totals.rate
    for credit in credits:
        n = credit.segment
        if n is None or n not in coins or coins[n] < credit.coins:
            taken[credit.credit_key] = (credit.diamonds, 0)
            continue
        before = policy.owed_at(coins[n], rates[n], (0, 0))
        coins[n] -= credit.coins
        diamonds = before - policy.owed_at(coins[n], rates[n], (0, 0))
        taken[credit.credit_key] = (diamonds, credit.coins)
        back.coins += credit.coins
        back.diamonds += diamonds
        if n != totals.segment:
            back.earlier_coins += credit.coins
            back.earlier_diamonds += diamonds
            back.closed[n] = back.closed.get(n, 0) + credit.coins
    return taken, back


class Payouts:
    def __init__(self, settings: PayoutSettings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self.methods = PayoutMethods()
        self._crediting = asyncio.Semaphore(settings.credit_batches_at_once)
        """Batches lock the same creators' rows: more at once only queue inside the database,
        holding connections and memory."""

    async def withdrawals_of(
        self,
        conn: AsyncConnection,
        creator_id: str,
        *,
        limit: int,
        before: tuple[dt.datetime, str] | None,
    ) -> list[storage.WithdrawalRecord]:
        """A page of a creator's withdrawals, newest first."""
        return await storage.list_withdrawals(conn, creator_id, limit=limit, before=before)

    async def credit(
        self, driver: Driver, batch: Iterable[GiftCredit], now: dt.datetime, answer: Answer
    ) -> list[bytes]:
        """`credit_gifts` in its own transaction, a few batches at a time (a waiting batch stays
        unbuilt: pass a generator). A concurrent delivery of some of these credits may commit first:
        then once more, which answers those from their record and applies the rest."""
        async with self._crediting:
            credits = list(batch)
            try:
                async with driver.transaction() as tx:
                    return await self.credit_gifts(tx, credits, now, answer)
            except Exception as error:
                if not (is_conflict(error) or getattr(error, "reason", "") == "CONCURRENT_CREDIT"):
                    raise
            async with driver.transaction() as tx:
                return await self.credit_gifts(tx, credits, now, answer)

    async def credit_gifts(
        self, tx: Tx, credits: Sequence[GiftCredit], now: dt.datetime, answer: Answer
    ) -> list[bytes]:
        """Turn gifts' coins into diamonds, each gift exactly once, in one transaction.

        A creator is owed floor(all coins received x rate): a batch adds its creators' coins at once
        (their rows locked in creator order), and each creator gets ONE ledger transaction for all their
        gifts in the batch, so a hot creator's row is touched once per batch, not once per gift. Each
        gift's own share (what it moved floor(total x rate) by) and the balance after it are its answer,
        kept with it; a credit applied before is answered with its first answer.
        """
        if len({c.request for c in credits}) != len(credits):
            raise InvalidArgument(
                "DUPLICATE_REQUEST_ID",
                "each credit in a batch needs its own request_id",
                violations=(FieldViolation("requests", "request ids must be unique"),),
            )
        stored = await storage.stored_credits(
            tx, [c.key for c in credits], [c.request for c in credits]
        )
        fresh: dict[str, list[GiftCredit]] = {}
        for c in credits:
            if c.key in stored.answers:
                if stored.answers[c.key][0] not in (c.fingerprint, *c.also):
                    raise request_id_reused(c.key.rsplit("/", 1)[-1])
            elif c.request in stored.requests_taken:  # credited to another creator
                raise request_id_reused(c.request.rsplit("/", 1)[-1], "a credit to another creator")
            else:
                fresh.setdefault(c.creator_id, []).append(c)
        answers = {key: response for key, (_, response) in stored.answers.items()}
        if fresh:
            answers.update(await self._apply_credits(tx, fresh, now, answer))
        return [answers[c.key] for c in credits]

    async def _apply_credits(
        self, tx: Tx, fresh: dict[str, list[GiftCredit]], now: dt.datetime, answer: Answer
    ) -> dict[str, bytes]:
        totals = await storage.accrue_coins_many(
            tx, {creator: sum(c.coins for c in items) for creator, items in fresh.items()}, now
        )
        new = [creator for creator, t in totals.items() if not t.diamonds_credited]
        if new:  # both, whatever the maturation period: it may be changed later (migration 0019)
            await self.ledger.open_accounts(
                tx, [creator_account(c) for c in new] + [pending_account(c) for c in new]
            )
        credited_to = pending_account if self.maturing else creator_account
        owed: dict[str, int] = {}
        shares: dict[str, int] = {}
        segments: dict[str, tuple[int, int, int]] = {}
        ended: list[storage.ClosedSegment] = []
        for creator, items in fresh.items():
            t = totals[creator]
            running = t.coins_received - sum(c.coins for c in items)
            segment = policy.segment_for(
                t.rate,
                (t.coins_at_rate, t.diamonds_at_rate),
                running,
                t.diamonds_credited,
                self.settings,
            )
            # The same segment runs on while the creator's rate is the one in force; one that ends
            # keeps what it converted, for reversals of its gifts.
            number = t.segment if t.rate == policy.rate(self.settings) else t.segment + 1
            segments[creator] = (*segment, number)
            if number != t.segment and t.rate is not None:
                ended.append(
                    storage.ClosedSegment(creator, t.segment, *t.rate, running - t.coins_at_rate)
                )
            before = t.diamonds_credited
            for c in items:  # each gift's share: how far it moved what the creator is owed
                running += c.coins
                after = policy.diamonds_owed(running, self.settings, segment)
                shares[c.key], before = after - before, after
            owed[creator] = before
        await storage.set_diamonds_credited_many(tx, owed, segments, policy.rate(self.settings))
        if ended:
            await storage.close_segments(tx, ended)
        gained = {
            credited_to(c): owed[c] - totals[c].diamonds_credited
            for c in fresh
            if owed[c] > totals[c].diamonds_credited
        }
        balances: dict[str, int] = {}
        transaction_id: str | None = None
        if gained:  # one ledger transaction for the whole batch: issuance -> every creator
            first = next(iter(fresh.values()))[0]
            posted = await self.ledger.credit_many(
                tx,
                ISSUANCE,
                gained,
                kind="gift",
                reference=first.reference
                if len(shares) == 1
                else f"{len(shares)} gifts from {first.reference}",
                request_id=first.key if len(shares) == 1 else f"batch:{uuid.uuid4().hex}",
                caller="internal",
                policy_version=self.settings.policy_version,
            )
            balances, transaction_id = posted.balances, posted.transaction_id
        unchanged = [credited_to(c) for c in fresh if credited_to(c) not in gained]
        if unchanged:
            balances.update(await self.ledger.balances(tx, unchanged))
        available = (
            await self.ledger.balances(tx, [creator_account(c) for c in fresh])
            if self.maturing
            else {}
        )
        rows: list[storage.CreditRow] = []
        answers: dict[str, bytes] = {}
        for creator, items in fresh.items():
            running_balance = balances.get(credited_to(creator), 0) - gained.get(
                credited_to(creator), 0
            )
            for c in items:
                running_balance += shares[c.key]
                standing = (
                    CreatorDiamonds(running_balance, available.get(creator_account(creator), 0))
                    if self.maturing
                    else CreatorDiamonds(0, running_balance)
                )
                answers[c.key] = answer(creator, shares[c.key], standing)
                rows.append(
                    storage.CreditRow(
                        c.key,
                        c.request,
                        c.fingerprint,
                        creator,
                        c.coins,
                        shares[c.key],
                        transaction_id,
                        answers[c.key],
                        c.reference,
                        segments[creator][2],
                    )
                )
        rates = storage.Rates(
            numerator=self.settings.diamonds_per_coin_numerator,
            denominator=self.settings.diamonds_per_coin_denominator,
            coin_value=self.settings.coin_value_micros,
            diamond_value=self.settings.diamond_value_micros,
        )
        inserted = await storage.insert_credits(
            tx, rows, now, matured=not self.maturing, rates=rates
        )
        if inserted != len(rows):
            raise Aborted(
                "CONCURRENT_CREDIT",
                "another delivery of some of these credits committed first; retry to read its answers",
            )
        return answers

    async def revenue(
        self, tx: Tx, since: dt.datetime, until: dt.datetime
    ) -> list[storage.RevenueDay]:
        """The platform's revenue from gifts per UTC day in [since, until) (at most 92 days), each
        gift valued at the rates kept with it."""
        day = dt.timedelta(days=1)
        start = dt.datetime.combine(since.astimezone(dt.UTC).date(), dt.time(0), tzinfo=dt.UTC)
        # The length asked for, not the whole days it is widened to (92 days back from now is 92).
        if until <= start or until - since > 92 * day:
            raise InvalidArgument(
                "BAD_REPORT_PERIOD",
                f"a revenue report covers 1 to 92 days; this one runs from {start.isoformat()} "
                f"(start_time's UTC day) to {until.isoformat()} (end_time, or now when it is not "
                "given): move start_time or end_time",
                violations=(
                    FieldViolation("start_time", "within 92 days before end_time"),
                    FieldViolation("end_time", "after start_time, within 92 days"),
                ),
            )
        return await storage.revenue_by_day(tx, start, until)

    async def entries(
        self,
        tx: Tx,
        creator_id: str,
        *,
        limit: int,
        cursor: tuple[dt.datetime, int] | None,
        kinds: Sequence[str],
        since: dt.datetime | None,
        until: dt.datetime | None,
    ) -> list[HistoryEntry]:
        """A creator's diamond entries (pending, available, debt), newest first (none for a
        creator never credited)."""
        return await entries_page(
            tx,
            creator_accounts(creator_id),
            limit=limit,
            cursor=cursor,
            kinds=kinds,
            since=since,
            until=until,
        )

    async def statement(
        self, tx: Tx, creator_id: str, since: dt.datetime, until: dt.datetime
    ) -> Period:
        """A creator's diamonds (pending, available, less any debt) over [since, until): opening,
        each kind's movements, closing."""
        return await period(tx, creator_accounts(creator_id), since, until)

    @property
    def maturing(self) -> bool:
        """Whether credits wait as pending diamonds (a maturation period is set)."""
        return self.settings.maturation_days > 0

    async def diamonds(self, conn: AsyncConnection | Tx, creator_id: str) -> CreatorDiamonds:
        """Where a creator's diamonds are (all zero for a creator never credited)."""
        tx = as_tx(conn)
        accounts = [creator_account(creator_id), pending_account(creator_id)]
        balances = await self.ledger.available_balances(tx, [*accounts, debt_account(creator_id)])
        held, paid_out = await storage.withdrawal_totals(tx, creator_id)
        oldest = await storage.next_maturing(tx, creator_id) if self.maturing else None
        return CreatorDiamonds(
            pending=balances.get(accounts[1], 0),
            available=balances.get(accounts[0], 0),
            held=held,
            paid_out=paid_out,
            debt=-balances.get(debt_account(creator_id), 0),
            next_available_at=None
            if oldest is None
            else oldest + dt.timedelta(days=self.settings.maturation_days),
        )

    async def reverse_gifts(
        self, tx: Tx, gift_ids: Sequence[str], *, now: dt.datetime
    ) -> list[Reversal]:
        """Take back the diamonds of these gifts' credits, each exactly once, one ledger transaction
        (kind `reversal`) per creator. Gifts payout never credited are left out of the answer.

        What is taken back is what the creator's standing coins no longer earn: their totals lose
        each gift's coins, and each gift takes back what that moved floor(coins x rate) by, so after
        any reversals a creator holds what the policy gives for the coins they keep (not the
        reversed gifts' own shares, which carried the rounding of other gifts: see
        `_taken_back`). A credit still pending gives up its pending diamonds (it never matures; what
        they are more than is taken, at most a diamond, becomes available); what else is taken
        comes from the available balance, and what that lacks becomes a debt that blocks
        withdrawals until later diamonds repay it."""
        found = await storage.credits_of_gifts(tx, gift_ids)
        reversals: list[Reversal] = []
        by_creator: dict[str, list[storage.CreditOfGift]] = {}
        for credit in found:
            if credit.reversed:
                was_taken = credit.reversed_diamonds
                reversals.append(
                    Reversal(
                        credit.reference,
                        credit.creator_id,
                        credit.diamonds,
                        credit.diamonds if was_taken is None else was_taken,
                        already_reversed=True,
                    )
                )
            else:
                by_creator.setdefault(credit.creator_id, []).append(credit)
        # Locked as a credit batch locks them: the creators' totals in creator order, then every
        # account these reversals touch in id order, before any is posted to.
        totals = await storage.lock_creator_totals(tx, list(by_creator))
        balances = await self.ledger.lock_available(
            tx,
            [
                account(creator)
                for creator in by_creator
                for account in (creator_account, pending_account, debt_account)
            ],
        )
        numbers = iter(
            await storage.next_reversal_seqs(tx, sum(len(c) for c in by_creator.values()))
            if by_creator
            else []
        )
        for creator, credits in sorted(by_creator.items()):
            closed = await storage.closed_segments(
                tx,
                creator,
                [
                    c.segment
                    for c in credits
                    if c.segment is not None and 0 <= c.segment != totals[creator].segment
                ],
            )
            taken, back = _taken_back(totals[creator], closed, credits)
            await storage.take_back(tx, creator, back)
            # A pending credit gives up its whole share, and what that is more than is taken
            # becomes available (counted first, so the others can take from it).
            given_up = {c.credit_key: c.diamonds if c.pending else 0 for c in credits}
            returned = {key: max(given - taken[key][0], 0) for key, given in given_up.items()}
            budget = max(balances.get(creator_account(creator), 0), 0) + sum(returned.values())
            moves: list[Reversal] = []
            for credit in credits:
                diamonds = taken[credit.credit_key][0]
                from_pending = given_up[credit.credit_key]
                rest = max(diamonds - from_pending, 0)
                from_available = min(rest, budget)
                budget -= from_available
                moves.append(
                    Reversal(
                        credit.reference,
                        creator,
                        credit.diamonds,
                        diamonds,
                        from_pending=from_pending,
                        from_available=from_available,
                        to_debt=rest - from_available,
                        to_available=returned[credit.credit_key],
                    )
                )
            transaction_id = await self._post_reversal(tx, creator, credits, moves)
            for credit, move in zip(credits, moves, strict=True):
                if not await storage.mark_reversed(
                    tx,
                    credit.credit_key,
                    transaction_id,
                    now,
                    next(numbers),
                    diamonds=move.taken,
                    coins=taken[credit.credit_key][1],
                ):
                    raise Aborted("CONCURRENT_REVERSAL", "these gifts are being reversed already")
            reversals.extend(moves)
        _annotate_reversals(reversals)
        return reversals

    async def _post_reversal(
        self,
        tx: Tx,
        creator: str,
        credits: Sequence[storage.CreditOfGift],
        moves: Sequence[Reversal],
    ) -> str:
        """The creator's ledger transaction for these reversals ("" when they take nothing)."""
        from_pending = sum(m.from_pending for m in moves)
        from_available = sum(m.from_available - m.to_available for m in moves)
        to_debt = sum(m.to_debt for m in moves)
        legs = [
            (pending_account(creator), -from_pending),
            (creator_account(creator), -from_available),
            (debt_account(creator), -to_debt),
            (ISSUANCE, from_pending + from_available + to_debt),
        ]
        postings = [Posting(a, d) for a, d in legs if d]
        if not postings:
            return ""
        if to_debt:
            await self.ledger.open_account(tx, debt_account(creator), allow_negative=True)
        gifts = sorted(c.reference for c in credits)
        posted = await self.ledger.post(
            tx,
            postings,
            kind="reversal",
            # The gifts it takes back, as a credit's entry names its gift (the reason is in the
            # admin audit trail).
            reference=(gifts[0] if len(gifts) == 1 else f"{len(gifts)} gifts: {', '.join(gifts)}")[
                :128
            ],
            request_id=f"reversal:{uuid.uuid4().hex}",
            caller="payout",
            policy_version=self.settings.policy_version,
        )
        return posted.transaction_id

    async def reversed_credits(
        self, tx: Tx, after: int, limit: int
    ) -> list[storage.ReversedCreditRecord]:
        """Gift credits reversed after reversal number `after`, in the order they committed (what
        gifting follows to take reversed gifts out of its rankings)."""
        return await storage.reversed_credits(tx, after, limit)

    async def repay_debts(self, driver: Driver) -> int:
        """Repay creators' reversal debts from their available diamonds (kind `debt_repayment`):
        run after each maturation, so later credits repay the debt before they can be withdrawn.
        Every debtor is looked at, `PAYOUT_MATURATION_BATCH` per transaction in id order (debtors
        with nothing available would otherwise hold the first page for good). Returns how many
        creators repaid something."""
        repaid, after, page = 0, "", self.settings.maturation_batch
        while True:
            async with driver.transaction() as tx:
                debtors = await self.ledger.below_zero(tx, "debt:", after=after, limit=page)
                repaid += await self._repay(tx, [a.removeprefix("debt:") for a in debtors])
            if len(debtors) < page:
                return repaid
            after = debtors[-1]

    async def _repay(self, tx: Tx, owing: list[str]) -> int:
        """Each of these creators repays what they can of their debt now (their rows locked)."""
        repaid = 0
        balances = await self.ledger.lock_available(
            tx, [a(c) for c in owing for a in (creator_account, debt_account)]
        )
        for creator in sorted(owing):
            owed = -balances.get(debt_account(creator), 0)
            amount = min(owed, balances.get(creator_account(creator), 0))
            if amount <= 0:
                continue
            await self.ledger.post(
                tx,
                [
                    Posting(creator_account(creator), -amount),
                    Posting(debt_account(creator), amount),
                ],
                kind="debt_repayment",
                reference="reversal debt",
                request_id=f"repay:{uuid.uuid4().hex}",
                caller="payout",
                policy_version=self.settings.policy_version,
                acting_user="",
            )
            repaid += 1
        return repaid

    async def mature(self, driver: Driver, now: dt.datetime) -> int:
        """Move the diamonds of credits older than the maturation period from pending to available:
        one ledger transaction (kind `maturation`) per sweep batch, the credits marked matured in the
        same database transaction, so each credit matures exactly once, after restarts and with
        several replicas sweeping (PostgreSQL: each claims rows the others skip). Returns how many
        credits matured. With no maturation period (`PAYOUT_MATURATION_DAYS=0`) new credits are
        available at once, and what was still pending when the period was removed matures now."""
        due = now - dt.timedelta(days=self.settings.maturation_days)
        async with driver.transaction() as tx:
            claimed = await storage.lock_maturing_credits(tx, due, self.settings.maturation_batch)
            if not claimed:
                return 0
            by_creator: dict[str, int] = {}
            for _, creator, diamonds in claimed:
                by_creator[creator] = by_creator.get(creator, 0) + diamonds
            postings = [
                posting
                for creator, diamonds in sorted(by_creator.items())
                if diamonds > 0
                for posting in (
                    Posting(pending_account(creator), -diamonds),
                    Posting(creator_account(creator), diamonds),
                )
            ]
            if postings:
                await self.ledger.post(
                    tx,
                    postings,
                    kind="maturation",
                    reference=f"{len(claimed)} gift credits made by {due.isoformat()}",
                    request_id=f"maturation:{uuid.uuid4().hex}",
                    caller="payout",
                    policy_version=self.settings.policy_version,
                    acting_user="",
                )
            await storage.mark_matured(tx, [key for key, _, _ in claimed], now)
        return len(claimed)


def _annotate_reversals(reversals: Sequence[Reversal]) -> None:
    """Put what a reversal took back on its RPC's span: the diamonds taken now (a gift reversed by
    an earlier request adds nothing) and the creators they came from, which is what an SRE searches
    by when a creator asks where diamonds went."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("coins.diamonds", sum(r.taken for r in reversals if not r.already_reversed))
    span.set_attribute("coins.creator_ids", sorted({r.creator_id for r in reversals})[:100])
