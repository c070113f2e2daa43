"""Withdrawals: requested -> in_review -> approved -> processing -> paid | failed | returned.

A withdrawal holds its diamonds with a ledger hold (`ledger.holds`) from the request on: held
diamonds stay on the creator's balance but cannot be spent, withdrawn again or reversed. Each move
is a conditional UPDATE from the statuses it may leave, so concurrent reviewers, cancels, callbacks
and workers resolve it once; the hold is captured (paid) or released (every other ending) in the same
database transaction as the move, so exactly once too. A payment the processor returns after it paid
gives the diamonds back by a ledger transaction of its own (kind `withdrawal_returned`).

Withdrawals accepted before holds existed (no `hold_id`) moved their diamonds to the in-flight
account; they settle from there.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import zoneinfo
from collections.abc import Awaitable, Callable, Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from ledger import Posting
from ledger.holds import Holds
from runtime.access import require_another_admin
from runtime.auth import current_principal
from runtime.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
    enum_name,
    request_id_reused,
)
from runtime.ids import time_ordered_id
from runtime.protos import money_text
from runtime.sql import as_tx
from services.payout import policy, storage
from services.payout.domain import (
    IN_FLIGHT,
    PAID_OUT,
    CreatorDiamonds,
    Payouts,
    creator_account,
    debt_account,
)
from services.payout.methods import refuse_account_number

log = logging.getLogger("coins.payout.withdrawals")

HOLD_OWNER = "payout"
REVIEWABLE = ("requested", "in_review")
CANCELLABLE = ("requested", "in_review", "approved")


def debt_outstanding(creator_id: str, debt: int, *, reviewing: bool = False) -> FailedPrecondition:
    """DEBT_OUTSTANDING: diamonds owed back (reversed gifts, or a withdrawal given up that the
    processor paid after all) come before any withdrawal."""
    then = (
        "reject the withdrawal, or approve it once later diamonds repay the debt"
        if reviewing
        else "withdrawals wait until later diamonds repay it"
    )
    return FailedPrecondition(
        "DEBT_OUTSTANDING",
        f"creator {creator_id} owes {debt} diamonds (taken back after they were spent: reversed "
        f"gifts, or a withdrawal given up that the processor paid after all); {then}",
        creator_id=creator_id,
        debt=debt,
    )


def check_one_off_destination(method: str, destination_token: str) -> None:
    """`method` and `destination_token` name a one-off destination together: half of one is bad
    input, refused before the request id is claimed (so the corrected request may reuse it; review
    r23), never paid to a registered method instead (review r21: `method` alone was ignored and
    the default method paid)."""
    if bool(method) == bool(destination_token):
        return
    missing, given = ("destination_token", "method") if method else ("method", "destination_token")
    raise InvalidArgument(
        "INVALID_REQUEST",
        f"{given} names a one-off destination, which needs {missing} too; to pay a registered "
        "payout method, send neither (payout_method_id, or the default)",
        violations=(FieldViolation(missing, f"required with {given}"),),
    )


_HOST_FILES = frozenset({"localtime", "posixrules", "Factory"})
"""Files a host's zoneinfo folder may hold that are not IANA zones (the first is whatever zone the
host is set to)."""


@functools.cache
def _iana_names() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) - _HOST_FILES


def time_zone(name: str) -> zoneinfo.ZoneInfo:
    """An IANA time zone; INVALID_ARGUMENT UNKNOWN_TIME_ZONE for a name that is not one (a file
    the host happens to have, "localtime" or "posixrules", means what the host says: refused)."""
    try:
        if name not in _iana_names():
            raise ValueError(name)
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise InvalidArgument(
            "UNKNOWN_TIME_ZONE",
            f"{name!r} is not an IANA time zone (for example 'Europe/Paris' or 'UTC')",
            violations=(FieldViolation("time_zone", "must be an IANA time zone name"),),
        ) from None


def day_start(now: dt.datetime, zone: zoneinfo.ZoneInfo) -> dt.datetime:
    """The start of `now`'s calendar day in `zone`, as a UTC instant (DST-safe)."""
    local_day = now.astimezone(zone).date()
    return dt.datetime.combine(local_day, dt.time(0), tzinfo=zone).astimezone(dt.UTC)


ProcessorHas = Callable[[str], Awaitable[bool]]
"""Whether the processor has a withdrawal (`WithdrawalWorker.received`): asked outside any
transaction, on every attempt of the call that needs it."""


class Withdrawals:
    def __init__(self, payouts: Payouts) -> None:
        self._payouts = payouts
        self.settings = payouts.settings
        self.ledger = payouts.ledger
        self.holds = Holds(payouts.ledger)

    async def quote(
        self, conn: AsyncConnection, creator_id: str, diamonds: int, now: dt.datetime
    ) -> tuple[policy.Quote, CreatorDiamonds, str]:
        """What a withdrawal of `diamonds` would pay, the creator's diamonds, and the reason
        `request` would refuse it now, in the order it checks, the daily cap included ("" if none;
        not a payout method, which the request may name or bring)."""
        settings = self.settings
        quote = policy.quote(diamonds, settings)
        standing = await self._payouts.diamonds(conn, creator_id)
        verification, _ = await self._payouts.methods.verification(conn, creator_id)
        refusal = ""
        if verification != "verified":
            refusal = "KYC_REQUIRED"
        elif standing.debt > 0:
            refusal = "DEBT_OUTSTANDING"
        elif quote.gross_minor < settings.min_withdrawal_minor or quote.net_minor <= 0:
            refusal = "BELOW_MINIMUM"
        elif quote.diamonds > standing.available:
            refusal = "INSUFFICIENT_FUNDS"
        if not refusal:  # the day's total is read only for a withdrawal it may stop
            today, _ = await self._withdrawn_today(conn, creator_id, now)
            if today + quote.gross_minor > settings.daily_withdrawal_cap_minor:
                refusal = "DAILY_LIMIT_EXCEEDED"
        return quote, standing, refusal

    async def _withdrawn_today(
        self, conn: AsyncConnection, creator_id: str, now: dt.datetime
    ) -> tuple[int, zoneinfo.ZoneInfo]:
        """Cash (minor units) the creator's withdrawals take on `now`'s calendar day in their time
        zone (the daily cap's day), and that zone."""
        zone = zoneinfo.ZoneInfo(await storage.time_zone_of(conn, creator_id))  # checked when set
        return await storage.withdrawn_since(conn, creator_id, day_start(now, zone)), zone

    async def request(
        self,
        conn: AsyncConnection,
        *,
        creator_id: str,
        diamonds: int,
        method: str,
        destination_token: str,
        request_id: str,
        now: dt.datetime,
        payout_method_id: str = "",
    ) -> tuple[storage.WithdrawalRecord, CreatorDiamonds]:
        """Check the request, hold the diamonds and record the withdrawal: approved at once when
        the auto-approve policy allows it, else in review. It pays the payout method named (else the
        creator's default; else the one-off `method` and `destination_token`, which a creator with a
        registered method may not name: REGISTERED_METHOD_REQUIRED)."""
        settings = self.settings
        check_one_off_destination(method, destination_token)
        if placed := await self.holds.placed_under(conn, request_id):
            # The request again after its idempotency record was purged: the withdrawal it made.
            return await self._made_by(
                conn, placed.reference, request_id, diamonds, payout_method_id, destination_token
            ), await self._payouts.diamonds(conn, creator_id)
        if method == "bank" and destination_token:  # one-off: a token, as a registered one is
            refuse_account_number(destination_token, "destination_token")
        methods = self._payouts.methods
        await methods.require_verified(conn, creator_id)
        registered = await methods.for_withdrawal(conn, creator_id, payout_method_id)
        if registered is not None and destination_token:
            # Never pay elsewhere than asked: the one-off destination is refused, not ignored.
            raise FailedPrecondition(
                "REGISTERED_METHOD_REQUIRED",
                f"creator {creator_id} has a registered payout method: a withdrawal pays one "
                "(payout_method_id, or the default when unset), not a one-off destination; to pay "
                "this destination, register it with AddPayoutMethod",
                violations=(
                    FieldViolation("destination_token", "leave unset: pay a registered method"),
                ),
                creator_id=creator_id,
            )
        if registered is not None:
            method, destination_token = registered.kind, registered.destination_token
        elif not (method and destination_token):
            raise FailedPrecondition(
                "NO_PAYOUT_METHOD",
                f"creator {creator_id} has no payout method: add one (AddPayoutMethod) first",
                creator_id=creator_id,
            )
        if debt := await self._debt_of(conn, creator_id):
            raise debt_outstanding(creator_id, debt)
        quote = policy.quote(diamonds, settings)
        minimum = settings.min_withdrawal_minor

        def cash(minor: int) -> str:
            return money_text(settings.currency_code, minor)

        if quote.gross_minor < minimum or quote.net_minor <= 0:
            raise FailedPrecondition(
                "BELOW_MINIMUM",
                f"{diamonds} diamonds are worth {cash(quote.gross_minor)}; the minimum withdrawal "
                f"is {cash(minimum)} ({minimum * settings.diamonds_per_minor_unit} diamonds)",
                minimum_minor=minimum,
                requested_minor=quote.gross_minor,
            )
        if not await storage.creator_exists(conn, creator_id):  # nothing credited yet: nothing
            raise await self._not_available(conn, creator_id, quote.diamonds)  # to hold, as quoted
        withdrawal_id = time_ordered_id()
        # Holding first locks the creator's balance row, so the daily-cap sum below sees every
        # concurrent withdrawal of this creator that committed before us.
        try:
            hold = await self.holds.place(
                conn,
                creator_account(creator_id),
                quote.diamonds,
                counter_account_id=PAID_OUT,
                owner=HOLD_OWNER,
                kind="withdrawal",
                reference=withdrawal_id,
                placed_under=request_id,  # kept for good: the request never makes a second one
            )
        except FailedPrecondition as refused:
            if refused.reason != "INSUFFICIENT_FUNDS":
                raise
            raise await self._not_available(conn, creator_id, quote.diamonds) from None
        today, zone = await self._withdrawn_today(conn, creator_id, now)
        cap = settings.daily_withdrawal_cap_minor
        if today + quote.gross_minor > cap:
            raise FailedPrecondition(
                "DAILY_LIMIT_EXCEEDED",
                f"withdrawals are capped at {cash(cap)} a calendar day ({zone.key}); "
                f"{cash(max(0, cap - today))} remain today",
                cap_minor=cap,
                remaining_minor=max(0, cap - today),
                time_zone=zone.key,
            )
        # Auto-approval counts the day's withdrawals too: ten small ones are one large one.
        auto = today + quote.gross_minor <= settings.auto_approve_max_minor
        withdrawal = storage.WithdrawalRecord(
            withdrawal_id=withdrawal_id,
            creator_id=creator_id,
            diamonds=quote.diamonds,
            gross_minor=quote.gross_minor,
            fee_minor=quote.fee_minor,
            currency_code=settings.currency_code,
            method=method,
            destination_token=destination_token,
            status="approved" if auto else "in_review",
            failure_reason="",
            processor_reference=None,
            created_at=now,
            updated_at=now,
            method_id=registered.method_id if registered is not None else None,
            hold_id=hold.hold_id,
        )
        await storage.insert_withdrawal(conn, withdrawal)
        await storage.add_event(conn, withdrawal_id, "requested", creator_id, "", now)
        if auto:
            why = f"at most {cash(settings.auto_approve_max_minor)} today from a verified creator"
            await storage.add_event(conn, withdrawal_id, "approved", "auto-approve", why, now)
        else:
            why = (
                f"{cash(today + quote.gross_minor)} today, above "
                f"{cash(settings.auto_approve_max_minor)}: a reviewer decides"
            )
            await storage.add_event(conn, withdrawal_id, "in_review", "policy", why, now)
        return withdrawal, await self._payouts.diamonds(conn, creator_id)

    async def _not_available(
        self, conn: AsyncConnection, creator_id: str, needed: int
    ) -> FailedPrecondition:
        """INSUFFICIENT_FUNDS for a withdrawal, saying what is available and what is still pending."""
        diamonds = await self._payouts.diamonds(conn, creator_id)
        pending = ""
        if diamonds.pending and diamonds.next_available_at is not None:
            pending = (
                f"; {diamonds.pending} more are pending (each gift's diamonds become available "
                f"{self.settings.maturation_days:g} days after it; the next at "
                f"{diamonds.next_available_at.isoformat(timespec='seconds')})"
            )
        held = f"; {diamonds.held} are held for withdrawals on their way" if diamonds.held else ""
        return FailedPrecondition(
            "INSUFFICIENT_FUNDS",
            f"not enough available diamonds: {diamonds.available} are available, {needed} are "
            f"needed{held}{pending}",
            available=diamonds.available,
            pending=diamonds.pending,
            required=needed,
            unit="diamonds",
        )

    async def get(self, conn: AsyncConnection, withdrawal_id: str) -> storage.WithdrawalRecord:
        """A withdrawal by id; NOT_FOUND WITHDRAWAL_NOT_FOUND if there is none."""
        withdrawal = await storage.get_withdrawal(conn, withdrawal_id)
        if withdrawal is None:
            raise NotFound(
                "WITHDRAWAL_NOT_FOUND",
                f"no withdrawal {withdrawal_id!r}",
                withdrawal_id=withdrawal_id,
            )
        return withdrawal

    async def histories(
        self, conn: AsyncConnection, withdrawal_ids: Sequence[str]
    ) -> dict[str, list[storage.WithdrawalEvent]]:
        """Each withdrawal's history, oldest first: its status changes, parkings and retries."""
        return await storage.events_of(conn, withdrawal_ids)

    async def queue(
        self, conn: AsyncConnection, name: str, *, limit: int, after: tuple[dt.datetime, str] | None
    ) -> list[storage.WithdrawalRecord]:
        """An admin queue, oldest first: "in_review" or "parked"."""
        return await storage.queue(conn, name, limit=limit, after=after)

    async def retry(
        self,
        conn: AsyncConnection,
        withdrawal_id: str,
        *,
        actor: str,
        reason: str,
        now: dt.datetime,
    ) -> storage.WithdrawalRecord:
        """Hand a parked withdrawal back to the worker (which looks it up first), recorded in its
        history as retried by `actor`; WITHDRAWAL_NOT_PARKED otherwise. Never by the admin it
        pays (OWN_DECISION): it may send a new payment, as approving it would."""
        withdrawal = await self.get(conn, withdrawal_id)
        require_another_admin(withdrawal.creator_id, "retry a withdrawal")
        if not await storage.unpark(conn, withdrawal_id):  # only a parked one, still processing
            status = withdrawal.status
            who = (
                "the worker is on it"
                if status in storage.FOLLOWED_BY_THE_WORKER
                else "it waits for a reviewer (ReviewWithdrawal)"
                if status in REVIEWABLE
                else "it has ended"
            )
            raise FailedPrecondition(
                "WITHDRAWAL_NOT_PARKED",
                f"withdrawal {withdrawal_id} is not parked ({status}): {who}",
                withdrawal_id=withdrawal_id,
                status=enum_name("WITHDRAWAL_STATUS", status),
            )
        await storage.add_event(
            conn, withdrawal_id, "processing", actor, reason, now, kind="retried"
        )
        return await self.get(conn, withdrawal_id)

    async def _made_by(
        self,
        conn: AsyncConnection,
        withdrawal_id: str,
        request_id: str,
        diamonds: int,
        payout_method_id: str,
        destination_token: str,
    ) -> storage.WithdrawalRecord:
        """The withdrawal `request_id` made (as it is now); REQUEST_ID_REUSED if this request asks
        for another amount or destination than that one did."""
        made = await self.get(conn, withdrawal_id)
        if (
            made.diamonds != policy.quote(diamonds, self.settings).diamonds
            or (payout_method_id and made.method_id != payout_method_id)
            or (destination_token and made.destination_token != destination_token)
        ):
            raise request_id_reused(
                request_id.rsplit("/", 1)[-1], f"it made withdrawal {withdrawal_id}"
            )
        return made

    async def gives_up(
        self, withdrawal: storage.WithdrawalRecord, processor_has: ProcessorHas
    ) -> bool:
        """Whether this cancel gives up a parked withdrawal (`cancel(never_received=...)`): that is
        an admin's (not the one who asked for it), and only once the processor says it never
        received it; for anyone else, or one not parked, the cancel's own rules decide."""
        if not withdrawal.parked or not current_principal().is_admin:
            return False
        require_another_admin(withdrawal.creator_id, "give up a withdrawal")
        return not await processor_has(withdrawal.withdrawal_id)

    async def check_resend(
        self, conn: AsyncConnection, withdrawal_id: str, processor_has: ProcessorHas
    ) -> None:
        """Before `retry`: a retry may send a parked withdrawal again, as a new payment if the
        processor never received it; then the creator must still be verified and owe nothing, as
        approving it required (review R2: retries paid a creator rejected for fraud, and one in
        debt). One the processor has is only followed up: that learns its outcome and sends
        nothing."""
        withdrawal = await self.get(conn, withdrawal_id)
        require_another_admin(withdrawal.creator_id, "retry a withdrawal")
        barred = await self.why_not_pay(conn, withdrawal) if withdrawal.parked else None
        if barred is None or await processor_has(withdrawal_id):
            return
        refusal = FailedPrecondition(
            barred.reason,
            f"withdrawal {withdrawal_id} never reached the processor, and {barred.message}: "
            "give it up (CancelWithdrawal) rather than send it",
            withdrawal_id=withdrawal_id,
        )
        refusal.metadata.update(barred.metadata)
        raise refusal

    async def why_not_pay(
        self, conn: AsyncConnection, withdrawal: storage.WithdrawalRecord
    ) -> FailedPrecondition | None:
        """What forbids paying the withdrawal's creator now, as approving it would be refused:
        verification no longer `verified` (KYC_REQUIRED) or a debt (DEBT_OUTSTANDING); None if
        nothing does."""
        creator = withdrawal.creator_id
        status, _ = await storage.verification_of(conn, creator)
        if status != "verified":
            return FailedPrecondition(
                "KYC_REQUIRED",
                f"creator {creator} is no longer verified ({status})",
                creator_id=creator,
                kyc_status=enum_name("KYC_STATUS", status),
            )
        debt = await self._debt_of(conn, creator)
        return debt_outstanding(creator, debt) if debt else None

    async def review(
        self,
        conn: AsyncConnection,
        withdrawal_id: str,
        *,
        approve: bool,
        reason: str,
        reviewer: str,
        now: dt.datetime,
    ) -> storage.WithdrawalRecord:
        """A reviewer's decision on a withdrawal in review: approved goes on to the processor,
        rejected releases the hold. WITHDRAWAL_NOT_IN_REVIEW otherwise."""
        withdrawal = await self.get(conn, withdrawal_id)
        require_another_admin(withdrawal.creator_id, "review a withdrawal")
        to = "approved" if approve else "rejected"
        # A debt (gifts reversed after the request) is owed back before anything is paid out.
        debt = await self._debt_of(conn, withdrawal.creator_id) if approve else 0
        if debt and withdrawal.status in REVIEWABLE:
            raise debt_outstanding(withdrawal.creator_id, debt, reviewing=True)
        if approve and withdrawal.status in REVIEWABLE:  # verification revoked since the request
            await self._payouts.methods.require_verified(conn, withdrawal.creator_id)
        if not await self._move(conn, withdrawal, REVIEWABLE, to, reviewer, reason, now):
            current = await self.get(conn, withdrawal_id)
            raise FailedPrecondition(
                "WITHDRAWAL_NOT_IN_REVIEW",
                f"withdrawal {withdrawal_id} is {current.status}: only a withdrawal in review can "
                "be approved or rejected",
                withdrawal_id=withdrawal_id,
                status=enum_name("WITHDRAWAL_STATUS", current.status),
            )
        if not approve:
            await self._give_back(conn, withdrawal, now)
        return await self.get(conn, withdrawal_id)

    async def cancel(
        self,
        conn: AsyncConnection,
        withdrawal_id: str,
        *,
        actor: str,
        now: dt.datetime,
        reason: str = "",
        never_received: bool = False,
    ) -> storage.WithdrawalRecord:
        """Cancel a withdrawal that has not gone to the processor; its hold is released. With
        `never_received` (the processor just said it has no record of it), a parked one too: its
        sends were all lost, and it is not sent again (see WithdrawalWorker.received)."""
        withdrawal = await self.get(conn, withdrawal_id)
        moved = await self._move(conn, withdrawal, CANCELLABLE, "cancelled", actor, reason, now)
        if not moved and never_received:
            if mate := await storage.batch_mate_leased(conn, withdrawal, now):
                raise Unavailable(  # its follow-up may be sending the batch again (this one too)
                    "BATCH_BEING_SENT",
                    f"withdrawal {mate}, of the same batch as {withdrawal_id}, is being followed "
                    "up with the processor now: give it up again in a few seconds",
                    retry_after=5.0,
                    withdrawal_id=withdrawal_id,
                )
            moved = await self._move(
                conn, withdrawal, ("processing",), "cancelled", actor, reason, now, parked_only=True
            )
        if not moved:
            current = await self.get(conn, withdrawal_id)
            raise FailedPrecondition(
                "WITHDRAWAL_NOT_CANCELLABLE",
                f"withdrawal {withdrawal_id} is {current.status}: only a withdrawal that has not "
                "gone to the processor (requested, in review, approved) can be cancelled, or a "
                "parked one the processor has no record of, by an admin",
                withdrawal_id=withdrawal_id,
                status=enum_name("WITHDRAWAL_STATUS", current.status),
            )
        await self._give_back(conn, withdrawal, now)
        return await self.get(conn, withdrawal_id)

    async def start_processing(
        self,
        conn: AsyncConnection,
        withdrawal: storage.WithdrawalRecord,
        now: dt.datetime,
        lease_until: dt.datetime,
        sender_batch_id: str,
    ) -> bool:
        """approved -> processing, just before the worker sends it in `sender_batch_id` (False:
        cancelled, or taken by another replica, meanwhile); the worker holds it until
        `lease_until`. A creator who owes diamonds by now (gifts reversed since it was approved)
        has it sent back to review instead, and so does one no longer verified (KYC revoked): a
        reviewer rejects it, or approves it once the debt is repaid or the creator verified again."""
        if debt := await self._debt_of(conn, withdrawal.creator_id):
            await self._move(
                conn,
                withdrawal,
                ("approved",),
                "in_review",
                "worker",
                f"the creator owes {debt} diamonds from gifts reversed since it was approved",
                now,
            )
            return False
        status, _ = await storage.verification_of(conn, withdrawal.creator_id, lock="share")
        if status != "verified":  # revoked since it was approved: no money leaves unverified
            await self._move(
                conn,
                withdrawal,
                ("approved",),
                "in_review",
                "worker",
                f"the creator's verification is {status} since it was approved",
                now,
            )
            return False
        moved = await self._move(conn, withdrawal, ("approved",), "processing", "worker", "", now)
        if moved:
            await storage.mark_submitted(
                conn, withdrawal.withdrawal_id, now, lease_until, sender_batch_id
            )
        return moved

    async def follow_up(
        self, conn: AsyncConnection, withdrawal_id: str, now: dt.datetime, lease_until: dt.datetime
    ) -> bool:
        """Lease a processing withdrawal that is due for a look at the processor (False: another
        worker holds it, or it ended meanwhile)."""
        return await storage.lease(conn, withdrawal_id, now, lease_until)

    async def still_on_its_way(
        self, conn: AsyncConnection, withdrawal_id: str, look_again_at: dt.datetime
    ) -> None:
        """The processor answered and the payment is still in flight: look again later."""
        await storage.schedule_follow_up(conn, withdrawal_id, look_again_at)

    async def nudge(self, conn: AsyncConnection, withdrawal_id: str, now: dt.datetime) -> None:
        """A callback the processor could not confirm right now: the worker looks soon (a live
        lease, the attempt count and a parking are kept)."""
        await storage.nudge(conn, withdrawal_id, now)

    async def attempt_failed(
        self,
        conn: AsyncConnection,
        withdrawal_id: str,
        *,
        retry_at: dt.datetime,
        error: str,
        park_at: dt.datetime | None,
    ) -> None:
        """A processor call for it failed: counted; retried at `retry_at`, or parked, which its
        history records (by "worker", the error as the reason). A single failed attempt is not
        recorded there: the withdrawal counts the ones in a row (`attempts`, `last_error`)."""
        noted = await storage.note_failed_attempt(
            conn, withdrawal_id, retry_at=retry_at, error=error, park_at=park_at
        )
        if noted and park_at is not None:
            await storage.add_event(
                conn, withdrawal_id, "processing", "worker", error, park_at, kind="parked"
            )

    async def resolve(
        self,
        conn: AsyncConnection,
        withdrawal_id: str,
        outcome: str,
        *,
        processor_reference: str,
        reason: str,
        now: dt.datetime,
    ) -> storage.WithdrawalRecord:
        """Apply the processor's outcome ("paid", "failed" or "returned") once:
        - processing -> paid captures the hold (the diamonds leave the balance);
        - processing -> failed | returned releases it;
        - paid -> returned (failed or returned after it was paid) gives the diamonds back;
        - cancelled -> paid (given up by an admin as never received, then paid after all: its send
          was only delayed) takes the diamonds again, from what is available and the rest as a
          debt, as a reversed gift does.
        Anything else (an outcome seen before, an older one arriving late) changes nothing."""
        withdrawal = await self.get(conn, withdrawal_id)
        if withdrawal.status == "processing":
            if await self._move(
                conn,
                withdrawal,
                ("processing",),
                outcome,
                "processor",
                reason,
                now,
                processor_reference=processor_reference,
            ):
                if outcome == "paid":
                    await self._capture(conn, withdrawal)
                    if self.settings.return_watch_days > 0:  # a return's callback may be lost
                        poll = dt.timedelta(seconds=self.settings.return_poll_seconds)
                        await storage.watch_for_return(conn, withdrawal_id, now + poll)
                else:
                    await self._give_back(conn, withdrawal, now)
        elif withdrawal.status == "paid" and outcome in ("failed", "returned"):
            why = reason or "the processor returned the payment"
            if await self._move(conn, withdrawal, ("paid",), "returned", "processor", why, now):
                await self.ledger.post(
                    conn,
                    [
                        Posting(PAID_OUT, -withdrawal.diamonds),
                        Posting(creator_account(withdrawal.creator_id), withdrawal.diamonds),
                    ],
                    kind="withdrawal_returned",
                    reference=withdrawal_id,
                    request_id=f"returned:{withdrawal_id}",
                    caller="payout",
                    policy_version=self.settings.policy_version,
                )
        elif withdrawal.status == "cancelled" and outcome == "paid":
            why = "paid after it was given up: its diamonds are taken again"
            if await self._move(
                conn,
                withdrawal,
                ("cancelled",),
                "paid",
                "processor",
                why,
                now,
                processor_reference=processor_reference,
            ):
                log.warning("withdrawal %s was paid after it was given up", withdrawal_id)
                await self._take_again(conn, withdrawal)
        return await self.get(conn, withdrawal_id)

    async def _take_again(
        self, conn: AsyncConnection, withdrawal: storage.WithdrawalRecord
    ) -> None:
        """A withdrawal paid after its diamonds were given back: they leave the balance again, what
        is available first, the rest a debt that blocks withdrawals until later diamonds repay it."""
        creator = withdrawal.creator_id
        available_account, owed_account = creator_account(creator), debt_account(creator)
        available = (
            await self.ledger.lock_available(as_tx(conn), [available_account, owed_account])
        ).get(available_account, 0)
        from_available = min(withdrawal.diamonds, max(available, 0))
        to_debt = withdrawal.diamonds - from_available
        if to_debt:
            await self.ledger.open_account(conn, owed_account, allow_negative=True)
        legs = [(available_account, -from_available), (owed_account, -to_debt)]
        await self.ledger.post(
            conn,
            [*(Posting(a, d) for a, d in legs if d), Posting(PAID_OUT, withdrawal.diamonds)],
            kind="withdrawal",
            reference=withdrawal.withdrawal_id,
            request_id=f"paid-after-cancel:{withdrawal.withdrawal_id}",
            caller="payout",
            policy_version=self.settings.policy_version,
        )

    async def _debt_of(self, conn: AsyncConnection, creator_id: str) -> int:
        """Diamonds the creator owes (reversed gifts, a given-up withdrawal paid after all; 0: none)."""
        account = debt_account(creator_id)
        return -(await self.ledger.balances(as_tx(conn), [account])).get(account, 0)

    async def _move(
        self,
        conn: AsyncConnection,
        withdrawal: storage.WithdrawalRecord,
        from_statuses: tuple[str, ...],
        to: str,
        actor: str,
        reason: str,
        now: dt.datetime,
        *,
        processor_reference: str | None = None,
        parked_only: bool = False,
    ) -> bool:
        moved = await storage.move_withdrawal(
            conn,
            withdrawal.withdrawal_id,
            from_status=from_statuses,
            to_status=to,
            now=now,
            failure_reason=reason if to in ("failed", "returned", "rejected") else "",
            processor_reference=processor_reference or None,
            parked_only=parked_only,
        )
        if moved:
            await storage.add_event(conn, withdrawal.withdrawal_id, to, actor, reason, now)
        return moved

    async def _capture(self, conn: AsyncConnection, withdrawal: storage.WithdrawalRecord) -> None:
        if withdrawal.hold_id is None:  # accepted before holds: its diamonds are in flight
            await self._settle_in_flight(conn, withdrawal, PAID_OUT, "withdrawal_paid")
            return
        await self.holds.capture(
            conn,
            withdrawal.hold_id,
            withdrawal.diamonds,
            owner=HOLD_OWNER,
            request_id=f"paid:{withdrawal.withdrawal_id}",
            caller="payout",
            policy_version=self.settings.policy_version,
        )

    async def _give_back(
        self, conn: AsyncConnection, withdrawal: storage.WithdrawalRecord, now: dt.datetime
    ) -> None:
        if withdrawal.hold_id is None:
            await self._settle_in_flight(
                conn, withdrawal, creator_account(withdrawal.creator_id), "withdrawal_returned"
            )
            return
        await self.holds.release(conn, withdrawal.hold_id, owner=HOLD_OWNER)

    async def _settle_in_flight(
        self, conn: AsyncConnection, withdrawal: storage.WithdrawalRecord, to: str, kind: str
    ) -> None:
        await self.ledger.post(
            conn,
            [Posting(IN_FLIGHT, -withdrawal.diamonds), Posting(to, withdrawal.diamonds)],
            kind=kind,
            reference=withdrawal.withdrawal_id,
            request_id=f"settle:{withdrawal.withdrawal_id}",
            caller="payout",
            policy_version=self.settings.policy_version,
        )
