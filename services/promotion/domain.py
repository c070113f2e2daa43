"""Promotion rules.

A promotion's coin budget is held in the wallet, consumed as it is delivered, and the rest released when
it ends:
- CreatePromotion records the promotion `pending`, places a wallet hold of the budget with a request id
  derived from the promotion's id (so retries hold once) that expires a grace day after the promotion's
  end, and makes it `active`, or `rejected` when the wallet refuses (nothing held).
- ReportDelivery (the ad-delivery system) captures the delivered coins from the hold, with a request id
  derived from the promotion and the report, and adds them to `spent_coins` once: the delivery row, keyed
  by (promotion, report request id), is written in the same transaction as the spent coins, and a retry
  after a crash re-sends the same capture, which the wallet answers from its idempotency store. The whole
  budget spent, the promotion is `completed`.
- EndPromotion (the owner) releases what is left and completes it. A promotion past its end reads
  `completed` without anyone ending it: the wallet's hold expires by itself a day later.

Promotions created before budgets were held (funding `debit`) paid their whole budget up front; their
deliveries are only counted, and ending them releases nothing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, replace
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.errors import (
    DEBIT_VOIDED,
    Aborted,
    DomainError,
    FailedPrecondition,
    NotFound,
    enum_name,
    request_id_reused,
)
from runtime.ids import time_ordered_id
from services.promotion import storage

GRACE = dt.timedelta(days=1)
"""How long a promotion's hold outlives the promotion: the wallet releases it by itself then."""

_MAX_REQUEST_ID = 128


@dataclass(frozen=True)
class HeldBudget:
    hold_id: str
    available_coins: int
    """The payer's available coins after the hold."""


@dataclass(frozen=True)
class Captured:
    transaction_id: str
    """The wallet transaction that moved the delivered coins."""


@dataclass(frozen=True)
class Released:
    released_coins: int
    """What the hold had not captured, now available to the payer again."""


class BudgetWallet(Protocol):
    """The wallet, as the promotion service needs it."""

    async def hold_budget(
        self,
        *,
        promotion_id: str,
        user_id: str,
        coins: int,
        duration_days: int,
        time_limit: float,
    ) -> HeldBudget:
        """Hold the budget until the promotion's end and a grace day (acting for the payer)."""
        ...

    async def capture(
        self,
        *,
        promotion_id: str,
        hold_id: str,
        report_request_id: str,
        coins: int,
        time_limit: float,
    ) -> Captured:
        """Capture delivered coins from the hold."""
        ...

    async def release(self, *, promotion_id: str, hold_id: str, time_limit: float) -> Released:
        """Release what the hold has left."""
        ...

    async def resolve_budget_hold(
        self, *, promotion_id: str, user_id: str, time_limit: float
    ) -> HeldBudget | str:
        """What became of a budget hold whose answer was lost: the hold, or the refusal's reason (a
        hold the wallet never received is voided there: DEBIT_VOIDED)."""
        ...

    async def pay_budget(
        self, *, promotion_id: str, user_id: str, coins: int, time_limit: float
    ) -> tuple[str, int]:
        """Debit the whole budget (promotions created before budgets were held, resumed after a
        crash); returns (wallet transaction id, payer's available coins after)."""
        ...


def debit_request_id(promotion_id: str) -> str:
    """The request id of the debit that paid a promotion created before budgets were held."""
    return f"promotion:{promotion_id}"


def hold_request_id(promotion_id: str) -> str:
    return f"promotion:{promotion_id}"


def release_request_id(promotion_id: str) -> str:
    """One per promotion: two EndPromotion requests release the hold once."""
    return f"promotion:{promotion_id}:end"


def capture_request_id(promotion_id: str, report_request_id: str) -> str:
    """One per delivery report; a report id too long to fit is replaced by its digest (a distinct
    prefix keeps the two forms apart)."""
    readable = f"promotion:{promotion_id}:delivery:{report_request_id}"
    if len(readable) <= _MAX_REQUEST_ID:
        return readable
    digest = hashlib.sha256(report_request_id.encode()).hexdigest()[:48]
    return f"promotion:{promotion_id}:delivery-sha256:{digest}"


def hold_lifetime(duration_days: int) -> dt.timedelta:
    return dt.timedelta(days=duration_days) + GRACE


def status_at(promotion: storage.PromotionRecord, now: dt.datetime) -> str:
    """The promotion's status as callers see it: an active promotion past its end is completed."""
    if promotion.status == "active" and now >= promotion.ends_at:
        return "completed"
    return promotion.status


def _not_active(promotion: storage.PromotionRecord) -> FailedPrecondition:
    return FailedPrecondition(
        "PROMOTION_NOT_ACTIVE",
        f"promotion {promotion.promotion_id} is {promotion.status}: "
        + (
            "its budget hold is not settled yet (CreatePromotion did not finish); retry "
            "CreatePromotion with its request_id, or wait for the reconciler (about a minute)"
            if promotion.status == "pending"
            else "its budget was never held"
        ),
        promotion_id=promotion.promotion_id,
        status=enum_name("PROMOTION_STATUS", promotion.status),
    )


def _ended(promotion: storage.PromotionRecord) -> FailedPrecondition:
    return FailedPrecondition(
        "PROMOTION_ENDED",
        f"promotion {promotion.promotion_id} ended at {promotion.ends_at:%Y-%m-%d %H:%M:%S} UTC",
        promotion_id=promotion.promotion_id,
        end_time=promotion.ends_at.isoformat(),
    )


def _exceeded(promotion: storage.PromotionRecord, coins: int) -> FailedPrecondition:
    remaining = promotion.budget_coins - promotion.spent_coins
    return FailedPrecondition(
        "BUDGET_EXCEEDED",
        f"promotion {promotion.promotion_id} has {remaining} coins of its budget left; "
        f"a delivery worth {coins} exceeds it",
        promotion_id=promotion.promotion_id,
        remaining=remaining,
        requested=coins,
    )


class Promotions:
    async def create(
        self,
        conn: AsyncConnection,
        *,
        user_id: str,
        video_id: str,
        goal: str,
        budget_coins: int,
        duration_days: int,
        now: dt.datetime,
    ) -> str:
        promotion_id = time_ordered_id()
        await storage.insert_promotion(
            conn,
            storage.PromotionRecord(
                promotion_id=promotion_id,
                user_id=user_id,
                video_id=video_id,
                goal=goal,
                budget_coins=budget_coins,
                spent_coins=0,
                duration_days=duration_days,
                status="pending",
                wallet_transaction_id=None,
                created_at=now,
                updated_at=now,
                hold_id=None,
                ends_at=now + dt.timedelta(days=duration_days),
                funding="hold",
            ),
        )
        return promotion_id

    async def activate(
        self,
        conn: AsyncConnection,
        promotion_id: str,
        now: dt.datetime,
        *,
        hold_id: str | None = None,
        wallet_transaction_id: str | None = None,
    ) -> bool:
        return await storage.move_promotion(
            conn,
            promotion_id,
            from_status="pending",
            to_status="active",
            now=now,
            hold_id=hold_id,
            wallet_transaction_id=wallet_transaction_id,
        )

    async def reject(self, conn: AsyncConnection, promotion_id: str, now: dt.datetime) -> None:
        await storage.move_promotion(
            conn, promotion_id, from_status="pending", to_status="rejected", now=now
        )

    def check_delivery(
        self, promotion: storage.PromotionRecord, coins: int, now: dt.datetime
    ) -> None:
        """A delivery may be reported for an active promotion before its end, within its budget."""
        if promotion.status in ("pending", "rejected"):
            raise _not_active(promotion)
        if promotion.spent_coins == promotion.budget_coins:
            raise FailedPrecondition(  # completed: nothing more can be delivered (PROMOTION_ENDED)
                "PROMOTION_ENDED",
                f"promotion {promotion.promotion_id} is completed: all {promotion.budget_coins} "
                "coins of its budget are spent",
                promotion_id=promotion.promotion_id,
                budget_coins=promotion.budget_coins,
            )
        if status_at(promotion, now) == "completed":
            raise _ended(promotion)
        if promotion.spent_coins + coins > promotion.budget_coins:
            raise _exceeded(promotion, coins)

    def check_report_id(
        self, promotion_id: str, request_id: str, coins: int, on_record: tuple[int, bool] | None
    ) -> None:
        """A report id names one delivery of a promotion, whoever reports it (reports are kept per
        caller and the user it acts for, so two of them can send the same id): one on record for
        other coins is REQUEST_ID_REUSED before anything is captured; one for the same coins still
        being captured is CONCURRENT_RETRY (retried, it reads as counted)."""
        if on_record is None:
            return
        recorded, pending = on_record
        if recorded != coins:
            raise request_id_reused(request_id, f"a report of {recorded} coins delivered")
        if pending:
            raise self.report_in_flight(promotion_id, request_id)

    def report_in_flight(self, promotion_id: str, request_id: str) -> Aborted:
        return Aborted(
            "CONCURRENT_RETRY",
            f"delivery report {request_id!r} of promotion {promotion_id} is being counted now: "
            "retry to read its answer",
            promotion_id=promotion_id,
        )

    def check_end(self, promotion: storage.PromotionRecord, now: dt.datetime) -> None:
        """Only an active promotion before its end can be ended."""
        if promotion.status in ("pending", "rejected"):
            raise _not_active(promotion)
        if status_at(promotion, now) == "completed":
            raise _ended(promotion)

    def capture_refused(
        self, promotion: storage.PromotionRecord, coins: int, error: DomainError
    ) -> DomainError:
        """The wallet's refusal of a capture, in the promotion's terms: a hold released or expired
        means the promotion ended; one captured in full, or with less left than this delivery
        (CAPTURE_EXCEEDS_HOLD: concurrent reports overtook the promotion's own check), that its
        budget is exceeded, as the check would have said (the ad-delivery system branches on one
        reason, whichever check caught it). Other errors pass through."""
        if self.hold_over(error):
            return _ended(promotion)
        if error.reason == "HOLD_CAPTURED":
            return _exceeded(replace(promotion, spent_coins=promotion.budget_coins), coins)
        if error.reason == "CAPTURE_EXCEEDS_HOLD" and error.metadata.get("remaining", "").isdigit():
            spent = promotion.budget_coins - int(error.metadata["remaining"])
            return _exceeded(replace(promotion, spent_coins=spent), coins)
        return error

    def hold_over(self, error: DomainError) -> bool:
        """The wallet's refusal says the budget's hold was released or expired: the promotion is
        over, whatever its own record says."""
        return error.reason in ("HOLD_RELEASED", "HOLD_EXPIRED")

    def release_refused(self, promotion: storage.PromotionRecord, error: DomainError) -> bool:
        """True if the wallet refused the release because the hold is resolved already (expired,
        captured in full, or released): the promotion is over."""
        return self.hold_over(error) or error.reason == "HOLD_CAPTURED"

    def ended(self, promotion: storage.PromotionRecord) -> FailedPrecondition:
        return _ended(promotion)

    async def record_delivery(
        self,
        conn: AsyncConnection,
        promotion: storage.PromotionRecord,
        *,
        request_id: str,
        coins: int,
        wallet_transaction_id: str | None,
        now: dt.datetime,
    ) -> bool:
        """Count a delivery once: False if this report was counted already. BUDGET_EXCEEDED if it
        does not fit the budget (only possible for a promotion paid up front: the wallet never
        captures more than a hold)."""
        recorded = await storage.insert_delivery(
            conn,
            promotion_id=promotion.promotion_id,
            request_id=request_id,
            coins=coins,
            wallet_transaction_id=wallet_transaction_id,
            now=now,
        )
        if not recorded:
            counted = await storage.delivery_coins(conn, promotion.promotion_id, request_id)
            if counted is not None and counted != coins:  # a request id reused after its purge
                raise request_id_reused(request_id, f"it reported {counted} coins delivered")
            return False
        if not await storage.add_spent(conn, promotion.promotion_id, coins, now=now):
            current = await storage.get_promotion(conn, promotion.promotion_id)
            raise _exceeded(current or promotion, coins)
        return True

    async def end(self, conn: AsyncConnection, promotion_id: str, now: dt.datetime) -> bool:
        """Complete an active promotion now; False if it is not active (ended meanwhile)."""
        return await storage.end_promotion(conn, promotion_id, now=now)

    async def lock(self, conn: AsyncConnection, promotion_id: str) -> None:
        """Decide about the promotion alone until `conn`'s transaction ends: of ends racing under
        their own request ids, the one that answers the release commits before the others look
        (an end recorded by a delivery report leaves no row for them to wait on otherwise)."""
        await storage.lock_promotion(conn, promotion_id)


def not_found(promotion_id: str) -> NotFound:
    return NotFound(
        "PROMOTION_NOT_FOUND", f"no promotion {promotion_id!r}", promotion_id=promotion_id
    )


def unpaid(outcome: str, promotion_id: str) -> DomainError:
    """CreatePromotion's answer when its budget hold was never placed (found by the reconciler, or
    by the request's own late hold): the wallet's refusal with the code a direct call gets, or, for
    a hold the wallet voided (never received), HOLD_VOIDED, which says nothing was held. It names
    the promotion, REJECTED and listed, as a direct refusal does."""
    if outcome == DEBIT_VOIDED:
        return FailedPrecondition(
            "HOLD_VOIDED",
            "the promotion was not paid: its budget hold never reached the wallet, so nothing is "
            "held; send CreatePromotion again with a new request_id",
            promotion_id=promotion_id,
        )
    message = f"the promotion was not paid: the wallet answered {outcome}"
    if outcome == "ACCOUNT_NOT_FOUND":
        return NotFound(outcome, message, promotion_id=promotion_id)
    return FailedPrecondition(outcome, message, promotion_id=promotion_id)
