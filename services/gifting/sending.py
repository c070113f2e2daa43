"""Sending a gift, step by step (the saga in `domain`): claim and price, debit the sender in the
wallet, record the debit with the creator's credit and the request's answer. The reconciler finishes
gifts whose process died between the debit and its record."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Callable
from dataclasses import replace

from google.protobuf.message import Message
from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncConnection

from coins.gifting.v1 import gifting_pb2
from runtime import deadlines
from runtime.clock import Clock
from runtime.db import Database
from runtime.errors import DEBIT_VOIDED, VOIDED_BY_WALLET, Aborted, DomainError, FailedPrecondition
from runtime.idempotency import Idempotency, KeyClaim
from runtime.outages import log_failure, settle_each
from runtime.sql import Tx
from services.gifting import storage
from services.gifting.convert import send_gift_response
from services.gifting.domain import CoinDebiter, Gifting, GiftOrder
from services.gifting.feed import LiveFeed
from services.gifting.lives import Lives, ended_before_the_debit, live_ended

log = logging.getLogger("coins.gifting.sending")


class GiftSender:
    def __init__(
        self,
        db: Database,
        idempotency: Idempotency,
        clock: Clock,
        gifting: Gifting,
        wallet: CoinDebiter,
        wake_relay: Callable[[], None],
        lives: Lives,
        feed: LiveFeed,
    ) -> None:
        self._db, self._idempotency, self._clock = db, idempotency, clock
        self._gifting, self._wallet, self._wake_relay = gifting, wallet, wake_relay
        self._lives, self._feed = lives, feed

    async def send(
        self, request: Message, order: GiftOrder, *, time_limit: float
    ) -> gifting_pb2.SendGiftResponse:
        """Send `order` once per request id (`request` is what the caller sent, for its fingerprint):
        a retry resumes where an earlier attempt stopped, or replays its answer."""
        scope = send_scope(order.sender_id)
        sent_gift_id = self._gifting.new_sent_gift_id()

        async def start(tx: Tx, claim: KeyClaim) -> storage.SentGiftRecord | None:
            return await self._gifting.start(tx, claim, sent_gift_id, order, self._clock.now())

        async def refusal(tx: Tx) -> DomainError:
            live_refusal = await self._lives.refusal(tx, order)
            return live_refusal or await self._gifting.refusal(tx, order.gift_id, order.count)

        claim, sent = await self._idempotency.begin_direct(
            scope, request, sent_gift_id, start, refusal
        )
        if claim.finished:
            return await self.with_streak(claim.replay(gifting_pb2.SendGiftResponse))
        debited: tuple[str, int] | None = None
        if sent is None:  # an earlier attempt started this gift: resume it
            assert claim.resource_id is not None
            async with self._db.driver.read() as tx:
                sent = await storage.get_sent_gift(tx, claim.resource_id)
                assert sent is not None
                sent = replace(sent, offered_in=await self._gifting.offered_in(tx, sent))
                live = await storage.get_live(tx, sent.live_id) if sent.live_id else None
            if live is not None and live.ended_at is not None:
                debited = await self._resume_in_an_ended_live(
                    scope, request, sent, live, time_limit
                )
        # On the span before the debit: a refused gift's trace is found by its id too.
        trace.get_current_span().set_attribute("coins.sent_gift_id", sent.sent_gift_id)
        try:
            transaction_id, balance = debited or await self._wallet.debit_for_gift(
                sent_gift_id=sent.sent_gift_id,
                sender_id=sent.sender_id,
                creator_id=sent.creator_id,
                coins=sent.coins,
                offered_in=sent.offered_in,
                time_limit=time_limit,
            )
        except DomainError as refused:
            error = _voided(sent.sent_gift_id) if refused.reason in VOIDED_BY_WALLET else refused
            if not error.retryable:
                answer = self._idempotency.answer(scope, request, error=error)
                async with self._db.driver.transaction() as tx:
                    await self._gifting.record_failure(
                        tx, sent.sent_gift_id, self._clock.now(), answer
                    )
            raise error from None
        streaks = sent.live_id is not None and sent.streakable
        fed: set[str] = set()
        recorded = False
        if streaks and self._db.driver.is_postgres:
            # One statement: the gift joins its streak and is recorded (the stored answer leaves
            # the streak out; a replay reads it from the gift).
            now = self._clock.now()
            response = send_gift_response(replace(sent, status="debited"), balance)
            answer = self._idempotency.answer(scope, request, response=response)
            async with self._db.driver.transaction(single_statement=True) as tx:
                joined = await self._gifting.record_debit_in_streak(
                    tx,
                    sent,
                    transaction_id,
                    now,
                    answer,
                    new_streak_id=uuid.uuid4().hex,
                    cutoff=self._lives.streak_cutoff(now),
                )
            if joined.recorded:
                sent = replace(sent, streak_id=joined.streak_id, streak_count=joined.streak_count)
                response = send_gift_response(replace(sent, status="debited"), balance)
                recorded = True
            elif not joined.paused:
                return await self._twin_answer(scope, request)
        if not recorded:
            # One statement on PostgreSQL for a gift outside a streak; a streaking gift whose
            # open streak paused (the sweep has not ended it yet) ends it here first.
            try:
                async with self._db.driver.transaction(single_statement=not streaks) as tx:
                    now = self._clock.now()
                    sent, fed = await self._lives.streak(tx, sent, now)
                    response = send_gift_response(replace(sent, status="debited"), balance)
                    answer = self._idempotency.answer(scope, request, response=response)
                    if not await self._gifting.record_debit(tx, sent, transaction_id, now, answer):
                        raise _concurrent_retry()  # the streak's step is rolled back with it
            except Aborted as error:
                if error.reason != "CONCURRENT_RETRY":
                    raise
                return await self._twin_answer(scope, request)
        self._wake_relay()
        for live_id in {*fed, *([sent.live_id] if sent.live_id else [])}:
            self._feed.notify(live_id)
        return response

    async def _resume_in_an_ended_live(
        self,
        scope: str,
        request: Message,
        sent: storage.SentGiftRecord,
        live: storage.LiveRecord,
        time_limit: float,
    ) -> tuple[str, int]:
        """A retry of a gift started before its LIVE ended: the wallet says whether the first
        attempt's debit happened (then it is recorded, as the reconciler would: the coins were
        taken while the LIVE was on). If not, it is voided there and the gift fails LIVE_ENDED:
        no viewer is charged for a gift into a LIVE that is over, which no feed would show."""
        outcome = await self._wallet.resolve_gift_debit(
            sent_gift_id=sent.sent_gift_id, sender_id=sent.sender_id, time_limit=time_limit
        )
        if isinstance(outcome, tuple):
            return outcome
        error = live_ended(live)
        answer = self._idempotency.answer(scope, request, error=error)
        async with self._db.driver.transaction() as tx:
            await self._gifting.record_failure(tx, sent.sent_gift_id, self._clock.now(), answer)
        raise error

    async def _twin_answer(self, scope: str, request: Message) -> gifting_pb2.SendGiftResponse:
        """A concurrent duplicate recorded the gift first: its answer (CONCURRENT_RETRY if it has
        none stored yet)."""
        twin = await self._idempotency.twin_answer(scope, request)
        if twin is None:
            raise _concurrent_retry()
        return await self.with_streak(twin.replay(gifting_pb2.SendGiftResponse))

    async def with_streak(
        self, response: gifting_pb2.SendGiftResponse
    ) -> gifting_pb2.SendGiftResponse:
        """A replayed answer of a gift that joined its streak in the statement recording it
        (PostgreSQL) gets the streak from the gift's record, as the first answer had it."""
        gift = response.sent_gift
        if not gift.live_id or gift.HasField("streak"):
            return response
        async with self._db.driver.read() as tx:
            recorded = await storage.get_sent_gift(tx, gift.sent_gift_id)
        if recorded is not None and recorded.streak_id:
            gift.streak.CopyFrom(
                gifting_pb2.Streak(streak_id=recorded.streak_id, count=recorded.streak_count or 0)
            )
        return response

    async def close_live(self, live_id: str, *, patience: float, time_limit: float) -> None:
        """EndLive's first step: the LIVE takes no new gift and the gifts in flight are recorded
        (`Lives.close_to_gifts`); then the gifts it still has pending are settled with the wallet
        as the reconciler would, before the LIVE ends: those of a gifting process that died (their
        retries would otherwise record them after the end, in its totals but not its feed, and
        EndLive's summary would not be final) and those still waiting on the wallet after the
        wait, which the settling voids if the wallet never took the coins. Only gifts pending for
        `_SETTLE_AFTER` are settled (a younger one is on its way: a short deadline cut the wait);
        the whole step has one time budget (`time_limit`, within the caller's deadline), and what
        it cannot settle in it (the wallet slow or down) is left to the reconciler."""
        await self._lives.close_to_gifts(self._db, live_id, self._clock, patience=patience)
        started_before = self._clock.now() - _SETTLE_AFTER
        async with self._db.read() as conn:
            pending = [
                sent
                for sent in await storage.pending_gifts_of_live(
                    conn, live_id, limit=_SETTLED_AT_END
                )
                if sent.created_at < started_before
            ]
        if not pending:
            return
        left = deadlines.remaining()  # what the wait left of the caller's deadline
        budget = time_limit if left is None else min(time_limit, left - 0.2)
        if budget <= 0:
            return
        at_once = asyncio.Semaphore(16)
        settled = 0

        async def settle(sent: storage.SentGiftRecord) -> None:
            nonlocal settled
            async with at_once:
                try:
                    settled += await self._reconcile_one(
                        sent, budget, voided=ended_before_the_debit(live_id)
                    )
                except Exception as error:  # left to the reconciler; the LIVE still ends
                    log_failure(
                        log, error, "cannot settle gift %s before its LIVE ends", sent.sent_gift_id
                    )

        log.info("settling %d gifts left pending in LIVE %s before it ends", len(pending), live_id)
        try:
            async with asyncio.timeout(budget):
                await asyncio.gather(*(settle(sent) for sent in pending))
        except TimeoutError:
            log.warning(
                "LIVE %s ends with gifts still pending (the wallet did not answer in %.1fs): the "
                "reconciler settles them",
                live_id,
                budget,
            )
        if settled:
            self._wake_relay()

    async def reconcile(
        self, older_than: dt.timedelta, *, time_limit: float, limit: int = 100
    ) -> int:
        """Settle gifts left pending: the process died, or the wallet's answer was lost, between the
        debit and recording it. The wallet is asked what became of the gift's debit (its request id is
        derived from the gift): debited gifts are recorded and credited like any other, refused ones
        fail, and a debit the wallet never received is voided there first, so it can never happen
        later. The request that opened the gift gets its answer either way."""
        async with self._db.read() as conn:
            stale = await storage.pending_sent_gifts(
                conn, self._clock.now() - older_than, limit=limit
            )
        settled = await settle_each(
            log,
            stale,
            lambda sent: self._reconcile_one(sent, time_limit),
            lambda sent: f"cannot settle gift {sent.sent_gift_id}",
        )
        if settled:
            self._wake_relay()
        return settled

    async def _live_over(self, conn: AsyncConnection, live_id: str | None) -> bool:
        if not live_id:
            return False
        live = await storage.get_live(conn, live_id)
        return live is not None and live.ended_at is not None

    async def _reconcile_one(
        self,
        sent: storage.SentGiftRecord,
        time_limit: float,
        *,
        voided: FailedPrecondition | None = None,
    ) -> int:
        """1 if this pending gift was settled now, 0 if not (yet). `voided`: the request's answer
        if the wallet never took its coins (DEBIT_VOIDED by default)."""
        try:
            outcome = await self._wallet.resolve_gift_debit(
                sent_gift_id=sent.sent_gift_id, sender_id=sent.sender_id, time_limit=time_limit
            )
        except DomainError as error:
            log.warning("cannot resolve gift %s yet: %s", sent.sent_gift_id, error.reason)
            return 0
        async with self._db.transaction() as conn:
            now = self._clock.now()
            if isinstance(outcome, tuple):
                transaction_id, balance = outcome
                if not await self._gifting.record_debit(conn, sent, transaction_id, now):
                    return 0  # the request's own retry recorded it meanwhile
                if sent.live_id:
                    self._feed.notify(sent.live_id)
                recorded = await storage.get_sent_gift(conn, sent.sent_gift_id)
                assert recorded is not None
                await self._idempotency.complete_resource(
                    conn, sent.sent_gift_id, response=send_gift_response(recorded, balance)
                )
            else:
                await self._gifting.record_failure(conn, sent.sent_gift_id, now)
                if outcome != DEBIT_VOIDED:
                    refusal = FailedPrecondition(
                        outcome, f"the gift was not sent: the wallet answered {outcome}"
                    )
                elif voided is None and await self._live_over(conn, sent.live_id):
                    # "Send it again" would only meet LIVE_ENDED: say that, as EndLive would.
                    refusal = ended_before_the_debit(str(sent.live_id))
                else:
                    refusal = voided or _voided(sent.sent_gift_id)
                await self._idempotency.complete_resource(conn, sent.sent_gift_id, error=refusal)
        return 1


_SETTLED_AT_END = 500
"""At most this many pending gifts are settled by EndLive itself (more: the reconciler's)."""
_SETTLE_AFTER = dt.timedelta(seconds=1)
"""EndLive settles a gift pending this long (a healthy wallet answers in milliseconds); a younger
one is still on its way and is not voided under its sender."""


def send_scope(sender_id: str) -> str:
    """Where a sender's SendGift request ids are kept (runtime.idempotency)."""
    return f"SendGift:{sender_id}"


def _concurrent_retry() -> Aborted:
    return Aborted(
        "CONCURRENT_RETRY",
        "another attempt with this request_id completed the gift; retry to read it",
    )


def _voided(sent_gift_id: str) -> FailedPrecondition:
    """The gift's answer when its debit was voided by reconciliation (the wallet never took the coins,
    and never will under that gift)."""
    return FailedPrecondition(
        DEBIT_VOIDED,
        "the gift was not sent: it was left unfinished and settled as failed (no coins moved); "
        "send it again with a new request_id",
        sent_gift_id=sent_gift_id,
    )
