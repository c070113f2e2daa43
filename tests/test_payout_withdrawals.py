"""Withdrawals with review on ledger holds, a processor that behaves like PayPal Payouts (callbacks
late, twice and out of order; unclaimed items returned; a payment returned after it was paid), and
reconciliation. Each ending moves the held diamonds exactly once."""

from __future__ import annotations

import datetime as dt
import json
import zoneinfo
from collections.abc import AsyncIterator

import grpc
import pytest
import sqlalchemy as sa

from coins.payout.v1 import payout_pb2
from runtime.db import Database
from runtime.errors import InvalidArgument
from services.payout import storage as payout_storage
from services.payout.callbacks import parse
from services.payout.processor import WithdrawalWorker
from services.payout.sandbox import PayPalSandbox, sign
from tests.helpers import (
    ShiftedClock,
    error_metadata,
    eventually,
    expect_error,
    migrated,
    new_id,
    verify_creator,
)
from tests.suite import PAYOUT_WEBHOOK_SECRET, Suite, require_postgres, start_suite
from tests.test_payout import creator_with_diamonds, settled, withdrawal

S = payout_pb2


@pytest.fixture(scope="module")
async def payout(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Suite, ShiftedClock]]:
    """Payout alone (reconciliation reads every item: a module's own), on a clock tests move."""
    if backend == "postgres":
        await require_postgres()
    clock = ShiftedClock()
    suite = await start_suite(
        backend,
        tmp_path_factory.mktemp(f"withdrawals-{backend}"),
        only=("payout",),
        overrides={"payout": {"reconcile_grace_seconds": 0}},
        clock=clock,
    )
    yield suite, clock
    await suite.stop()


def sandbox(suite: Suite) -> PayPalSandbox:
    processor = suite.services["payout"].runtime.parts["processor"]
    assert isinstance(processor, PayPalSandbox)
    return processor


async def balance_of(suite: Suite, creator: str) -> tuple[int, int, int, int]:
    """(diamonds, available, held, paid out)."""
    b = (
        await suite.payout.GetDiamondBalance(S.GetDiamondBalanceRequest(creator_id=creator))
    ).balance
    return b.diamonds, b.available_diamonds, b.held_diamonds, b.paid_out_diamonds


async def status_of(suite: Suite, withdrawal_id: str, creator: str) -> payout_pb2.Withdrawal:
    return (
        await suite.payout.GetWithdrawal(
            S.GetWithdrawalRequest(withdrawal_id=withdrawal_id), metadata=suite.token(creator)
        )
    ).withdrawal


def admin(suite: Suite) -> tuple[tuple[str, str], ...]:
    return suite.token("reviewer-1", admin=True)


def review(withdrawal_id: str, approve: bool, reason: str = "checked") -> S.ReviewWithdrawalRequest:
    return S.ReviewWithdrawalRequest(
        request_id=new_id("review"),
        withdrawal_id=withdrawal_id,
        decision=S.REVIEW_DECISION_APPROVE if approve else S.REVIEW_DECISION_REJECT,
        reason=reason,
    )


def verification(
    creator: str, status: S.KycStatus.ValueType, reason: str, *, time_zone: str = ""
) -> S.SetCreatorVerificationRequest:
    return S.SetCreatorVerificationRequest(
        request_id=new_id("kyc"),
        creator_id=creator,
        status=status,
        reason=reason,
        time_zone=time_zone,
    )


async def test_a_large_withdrawal_waits_for_review_and_is_paid_once_approved(
    payout: tuple[Suite, ShiftedClock],
) -> None:
    suite, _ = payout
    creator = await creator_with_diamonds(suite, 50_000)
    made = (await suite.payout.RequestWithdrawal(withdrawal(creator, 40_000))).withdrawal  # $200
    assert made.status == S.WITHDRAWAL_STATUS_IN_REVIEW
    assert await balance_of(suite, creator) == (10_000, 10_000, 40_000, 0)
    queue = await suite.payout.ListWithdrawalQueue(
        S.ListWithdrawalQueueRequest(queue=S.WITHDRAWAL_QUEUE_IN_REVIEW), metadata=admin(suite)
    )
    assert made.withdrawal_id in [w.withdrawal_id for w in queue.withdrawals]
    # Held diamonds cannot be withdrawn again.
    await expect_error(
        suite.payout.RequestWithdrawal(withdrawal(creator, 20_000)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_FUNDS",
    )
    approved = await suite.payout.ReviewWithdrawal(
        review(made.withdrawal_id, True), metadata=admin(suite)
    )
    assert approved.withdrawal.status == S.WITHDRAWAL_STATUS_APPROVED
    assert approved.withdrawal.history[-1].actor == "reviewer-1"
    paid = await settled(suite, made.withdrawal_id, creator)
    assert paid.status == S.WITHDRAWAL_STATUS_PAID
    assert [(e.kind, e.status, e.actor) for e in paid.history] == [
        (S.WITHDRAWAL_EVENT_KIND_STATUS_CHANGED, status, actor)
        for status, actor in (
            (S.WITHDRAWAL_STATUS_REQUESTED, creator),
            (S.WITHDRAWAL_STATUS_IN_REVIEW, "policy"),
            (S.WITHDRAWAL_STATUS_APPROVED, "reviewer-1"),
            (S.WITHDRAWAL_STATUS_PROCESSING, "worker"),
            (S.WITHDRAWAL_STATUS_PAID, "processor"),
        )
    ]
    assert await balance_of(suite, creator) == (10_000, 10_000, 0, 40_000)
    # A decision on a withdrawal no longer in review changes nothing.
    await expect_error(
        suite.payout.ReviewWithdrawal(review(made.withdrawal_id, False), metadata=admin(suite)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "WITHDRAWAL_NOT_IN_REVIEW",
    )
    assert await balance_of(suite, creator) == (10_000, 10_000, 0, 40_000)


async def test_a_withdrawal_is_not_approved_once_its_creators_verification_is_revoked(
    payout: tuple[Suite, ShiftedClock],
) -> None:
    """KYC revoked while a withdrawal waits in review: approving it is KYC_REQUIRED (it was
    approved and paid), and it stays in review, its diamonds held, until the creator is verified
    again or a reviewer rejects it."""
    suite, _ = payout
    creator = await creator_with_diamonds(suite, 50_000)
    made = (await suite.payout.RequestWithdrawal(withdrawal(creator, 40_000))).withdrawal  # $200
    await suite.payout.SetCreatorVerification(
        verification(creator, S.KYC_STATUS_REJECTED, "document forged"),
        metadata=admin(suite),
    )
    refused = await expect_error(
        suite.payout.ReviewWithdrawal(review(made.withdrawal_id, True), metadata=admin(suite)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "KYC_REQUIRED",
    )
    assert "document forged" in (refused.details() or "")
    assert (await status_of(suite, made.withdrawal_id, creator)).status == (
        S.WITHDRAWAL_STATUS_IN_REVIEW
    )
    assert await balance_of(suite, creator) == (10_000, 10_000, 40_000, 0)
    await verify_creator(suite, creator)
    await suite.payout.ReviewWithdrawal(review(made.withdrawal_id, True), metadata=admin(suite))
    assert (await settled(suite, made.withdrawal_id, creator)).status == S.WITHDRAWAL_STATUS_PAID


async def test_an_admin_never_decides_on_their_own_withdrawal_or_verification(
    payout: tuple[Suite, ShiftedClock],
) -> None:
    """Separation of duties: an admin who is also a creator cannot verify themself nor approve
    their own withdrawal (both were accepted, audited only); another admin can."""
    suite, _ = payout
    creator = await creator_with_diamonds(suite, 50_000)  # verified by another admin
    made = (await suite.payout.RequestWithdrawal(withdrawal(creator, 40_000))).withdrawal
    themself = suite.token(creator, admin=True)
    await expect_error(
        suite.payout.ReviewWithdrawal(review(made.withdrawal_id, True), metadata=themself),
        grpc.StatusCode.PERMISSION_DENIED,
        "OWN_DECISION",
    )
    await expect_error(
        suite.payout.SetCreatorVerification(
            verification(creator, S.KYC_STATUS_VERIFIED, "it is me"),
            metadata=themself,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "OWN_DECISION",
    )
    assert (await status_of(suite, made.withdrawal_id, creator)).status == (
        S.WITHDRAWAL_STATUS_IN_REVIEW
    )
    await suite.payout.ReviewWithdrawal(review(made.withdrawal_id, True), metadata=admin(suite))
    assert (await settled(suite, made.withdrawal_id, creator)).status == S.WITHDRAWAL_STATUS_PAID


async def test_a_rejection_and_a_cancel_release_the_hold_once(
    payout: tuple[Suite, ShiftedClock],
) -> None:
    suite, _ = payout
    creator = await creator_with_diamonds(suite, 100_000)
    big = (await suite.payout.RequestWithdrawal(withdrawal(creator, 60_000))).withdrawal
    small = (await suite.payout.RequestWithdrawal(withdrawal(creator, 30_000))).withdrawal
    assert await balance_of(suite, creator) == (10_000, 10_000, 90_000, 0)
    rejected = await suite.payout.ReviewWithdrawal(
        review(big.withdrawal_id, False, "payout method under investigation"), metadata=admin(suite)
    )
    assert rejected.withdrawal.status == S.WITHDRAWAL_STATUS_REJECTED
    assert rejected.withdrawal.failure_reason == "payout method under investigation"
    cancel = S.CancelWithdrawalRequest(request_id=new_id("c"), withdrawal_id=small.withdrawal_id)
    silent = S.CancelWithdrawalRequest(request_id=new_id("c"), withdrawal_id=small.withdrawal_id)
    await expect_error(  # an admin cancelling a creator's withdrawal says why
        suite.payout.CancelWithdrawal(silent, metadata=admin(suite)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REASON_REQUIRED",
    )
    # As long a reason as the API takes (500 characters) is kept whole in the history.
    cancel.reason = "the creator asked support to stop it; " + "é" * 462
    assert len(cancel.reason) == 500
    cancelled = await suite.payout.CancelWithdrawal(cancel, metadata=admin(suite))
    assert cancelled.withdrawal.status == S.WITHDRAWAL_STATUS_CANCELLED
    last = cancelled.withdrawal.history[-1]
    assert (last.actor, last.reason) == ("reviewer-1", cancel.reason)
    # The same request again is answered from its record; a new one is refused; nothing moves.
    again = await suite.payout.CancelWithdrawal(cancel, metadata=admin(suite))
    assert again == cancelled
    refused = await expect_error(
        suite.payout.CancelWithdrawal(
            S.CancelWithdrawalRequest(request_id=new_id("c"), withdrawal_id=big.withdrawal_id),
            metadata=suite.token(creator),
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "WITHDRAWAL_NOT_CANCELLABLE",
    )
    # Its state in the contract's words, as GetWithdrawal names it.
    assert error_metadata(refused)["status"] == "WITHDRAWAL_STATUS_REJECTED"
    assert await balance_of(suite, creator) == (100_000, 100_000, 0, 0)
    # Another creator cannot cancel it.
    await expect_error(
        suite.payout.CancelWithdrawal(
            S.CancelWithdrawalRequest(request_id=new_id("c"), withdrawal_id=small.withdrawal_id),
            metadata=suite.token("someone-else"),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_ACCOUNT_OWNER",
    )


async def test_the_daily_cap_counts_the_calendar_day_in_the_creators_time_zone(
    payout: tuple[Suite, ShiftedClock],
) -> None:
    suite, clock = payout
    creator = await creator_with_diamonds(suite, 500_000)
    await suite.payout.SetCreatorVerification(
        verification(
            creator, S.KYC_STATUS_VERIFIED, "documents checked", time_zone="America/Los_Angeles"
        ),
        metadata=admin(suite),
    )
    listed = await suite.payout.ListPayoutMethods(
        S.ListPayoutMethodsRequest(creator_id=creator), metadata=suite.token(creator)
    )
    assert listed.time_zone == "America/Los_Angeles"
    # 23:00 in Los Angeles: 07:00 UTC the next day. The whole $1,000 of the local day is used...
    zone = zoneinfo.ZoneInfo("America/Los_Angeles")
    late = dt.datetime.now(zone).replace(hour=23, minute=0, second=0, microsecond=0)
    clock.shift = late.astimezone(dt.UTC) - dt.datetime.now(dt.UTC)
    try:
        await suite.payout.RequestWithdrawal(withdrawal(creator, 200_000))  # $1,000
        await expect_error(
            suite.payout.RequestWithdrawal(withdrawal(creator, 2_000)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "DAILY_LIMIT_EXCEEDED",
        )
        # ...and an hour and a bit later it is a new day there (still the same UTC day).
        clock.shift += dt.timedelta(hours=1, minutes=5)
        await suite.payout.RequestWithdrawal(withdrawal(creator, 2_000))
    finally:
        clock.shift = dt.timedelta(0)
    # Not a zone; and files of the host's zoneinfo folder that mean whatever the host is set to.
    for name in ("Mars/Olympus_Mons", "localtime", "posixrules"):
        await expect_error(
            suite.payout.SetCreatorVerification(
                verification(creator, S.KYC_STATUS_VERIFIED, "moved", time_zone=name),
                metadata=admin(suite),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNKNOWN_TIME_ZONE",
        )


async def test_an_unclaimed_payment_is_returned_and_the_diamonds_come_back(
    payout: tuple[Suite, ShiftedClock],
) -> None:
    suite, _ = payout
    creator = await creator_with_diamonds(suite, 5_000)
    made = (
        await suite.payout.RequestWithdrawal(withdrawal(creator, 4_000, "unclaimed@example.com"))
    ).withdrawal
    returned = await settled(suite, made.withdrawal_id, creator)
    assert returned.status == S.WITHDRAWAL_STATUS_RETURNED
    assert "unclaimed" in returned.failure_reason
    assert await balance_of(suite, creator) == (5_000, 5_000, 0, 0)


async def test_a_payment_returned_after_it_was_paid_gives_the_diamonds_back_once(
    payout: tuple[Suite, ShiftedClock],
) -> None:
    """Paid, then returned by the receiver's provider, the return told twice. The test sets the
    return once the withdrawal reads PAID: with the sandbox's own `returned@` story (returned 300 ms
    after it settles) a callback handled later than that on a loaded CI machine saw the payment
    returned without ever seeing it paid, a path with no ledger entries (the hold is released)."""
    suite, _ = payout
    processor = sandbox(suite)
    creator = await creator_with_diamonds(suite, 5_000)
    made = (await suite.payout.RequestWithdrawal(withdrawal(creator, 4_000))).withdrawal
    assert (await settled(suite, made.withdrawal_id, creator)).status == S.WITHDRAWAL_STATUS_PAID
    await processor.drain()
    processor.set_status(made.withdrawal_id, "RETURNED", "returned by the receiver's provider")

    async def returned() -> bool:
        found = await status_of(suite, made.withdrawal_id, creator)
        return found.status == S.WITHDRAWAL_STATUS_RETURNED

    await eventually(returned, "the payment returned")
    # Told again (a callback delivered twice): the diamonds are not given back a second time.
    processor.set_status(made.withdrawal_id, "RETURNED", "returned by the receiver's provider")
    await processor.drain()
    assert await balance_of(suite, creator) == (5_000, 5_000, 0, 0)
    entries = await suite.payout.ListDiamondEntries(
        S.ListDiamondEntriesRequest(creator_id=creator), metadata=suite.token(creator)
    )
    kinds = [e.kind for e in entries.entries if e.reference == made.withdrawal_id]
    # Paid (the hold captured) once, returned once: not a second payment, not a second return.
    assert sorted(kinds) == sorted(
        [S.DIAMOND_ENTRY_KIND_WITHDRAWAL, S.DIAMOND_ENTRY_KIND_WITHDRAWAL_RETURNED]
    )


def _event(withdrawal_id: str, status: str, event_id: str | None = None) -> bytes:
    return json.dumps(
        {
            "id": event_id or new_id("WH"),
            "event_type": f"PAYMENT.PAYOUTS-ITEM.{status}",
            "resource": {"sender_item_id": withdrawal_id, "transaction_status": status},
        }
    ).encode()


async def test_callbacks_are_verified_deduplicated_and_taken_from_the_processor(
    payout: tuple[Suite, ShiftedClock],
) -> None:
    suite, _ = payout
    webhooks = suite.as_caller("payout-webhooks").payout
    secret = PAYOUT_WEBHOOK_SECRET.encode()
    creator = await creator_with_diamonds(suite, 5_000)
    made = (await suite.payout.RequestWithdrawal(withdrawal(creator, 4_000))).withdrawal
    paid = await settled(suite, made.withdrawal_id, creator)
    assert paid.status == S.WITHDRAWAL_STATUS_PAID
    # A forged "failed" with a bad signature is refused and changes nothing.
    forged = _event(made.withdrawal_id, "FAILED")
    await expect_error(
        webhooks.HandleProcessorEvent(
            S.HandleProcessorEventRequest(body=forged, signature=sign(b"wrong", forged))
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "BAD_SIGNATURE",
    )
    # A hex digest may hold a Luhn-valid run of digits: it is a signature, not card data.
    await expect_error(
        webhooks.HandleProcessorEvent(
            S.HandleProcessorEventRequest(body=forged, signature="4111111111111111" + "a" * 48)
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "BAD_SIGNATURE",
    )
    # A correctly signed but stale "failed" (the processor's record says SUCCESS) pays nothing back.
    stale = _event(made.withdrawal_id, "FAILED", event_id="WH-stale-1")
    first = await webhooks.HandleProcessorEvent(
        S.HandleProcessorEventRequest(body=stale, signature=sign(secret, stale))
    )
    assert (first.duplicate, first.status) == (False, S.WITHDRAWAL_STATUS_PAID)
    again = await webhooks.HandleProcessorEvent(
        S.HandleProcessorEventRequest(body=stale, signature=sign(secret, stale))
    )
    assert (again.duplicate, again.status) == (True, S.WITHDRAWAL_STATUS_PAID)
    assert await balance_of(suite, creator) == (1_000, 1_000, 0, 4_000)
    # An event about a withdrawal never sent (in review: the processor has no such item) is
    # answered, nothing applied; it was UNAVAILABLE "deliver it again", for ever.
    waiting = await creator_with_diamonds(suite, 50_000)
    unsent = (await suite.payout.RequestWithdrawal(withdrawal(waiting, 40_000))).withdrawal
    assert unsent.status == S.WITHDRAWAL_STATUS_IN_REVIEW
    stray = _event(unsent.withdrawal_id, "SUCCESS")
    answered = await webhooks.HandleProcessorEvent(
        S.HandleProcessorEventRequest(body=stray, signature=sign(secret, stray))
    )
    assert (answered.withdrawal_id, answered.status) == (
        unsent.withdrawal_id,
        S.WITHDRAWAL_STATUS_IN_REVIEW,
    )
    assert await balance_of(suite, waiting) == (10_000, 10_000, 40_000, 0)
    # A known event id sent again with another body is answered about what it was first about.
    other = _event(unsent.withdrawal_id, "FAILED", event_id="WH-stale-1")
    repeated = await webhooks.HandleProcessorEvent(
        S.HandleProcessorEventRequest(body=other, signature=sign(secret, other))
    )
    assert (repeated.duplicate, repeated.withdrawal_id, repeated.status) == (
        True,
        made.withdrawal_id,
        S.WITHDRAWAL_STATUS_PAID,
    )
    # Only the webhook receiver may call it.
    await expect_error(
        suite.payout.HandleProcessorEvent(
            S.HandleProcessorEventRequest(body=stale, signature=sign(secret, stale))
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "CALLER_NOT_ALLOWED",
    )
    # Malformed bodies are refused.
    junk = b"{not json"
    await expect_error(
        webhooks.HandleProcessorEvent(
            S.HandleProcessorEventRequest(body=junk, signature=sign(secret, junk))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "MALFORMED_EVENT",
    )
    assert sandbox(suite).delivered > 0  # the sandbox's own callbacks came through the same RPC


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe{", "not JSON"),  # json.loads takes it for UTF-16, and fails
        (b"[1, 2]", "not an object"),
        (b'{"id": "e1", "event_type": "X"}', "resource is missing"),
        (b'{"id": "e1", "event_type": "X", "resource": []}', "resource is missing"),
        (b'{"event_type": "X", "resource": {"sender_item_id": "w"}}', "id is missing"),
        (b'{"id": 7, "event_type": "X", "resource": {"sender_item_id": "w"}}', "id is missing"),
        (b'{"id": "e1", "event_type": "X", "resource": {}}', "resource.sender_item_id is missing"),
        # NUL, which PostgreSQL cannot store (it answered INTERNAL): refused as malformed.
        (
            b'{"id": "e\\u0000", "event_type": "X", "resource": {"sender_item_id": "w"}}',
            "id contains",
        ),
        (
            b'{"id": "e", "event_type": "X\\u0000", "resource": {"sender_item_id": "w"}}',
            "event_type",
        ),
        (
            b'{"id": "e", "event_type": "X", "resource": {"sender_item_id": "\\u0000"}}',
            "item_id contains",
        ),
        # A lone surrogate, which no database stores (it answered INTERNAL, and a processor
        # redelivers such an event forever): malformed too.
        (
            b'{"id": "e\\ud800", "event_type": "X", "resource": {"sender_item_id": "w"}}',
            "id contains a lone",
        ),
        (
            b'{"id": "e", "event_type": "\\udfff", "resource": {"sender_item_id": "w"}}',
            "event_type contains a lone",
        ),
        (
            b'{"id": "e", "event_type": "X", "resource": {"sender_item_id": "w\\udbff"}}',
            "item_id contains a lone",
        ),
    ],
)
def test_a_malformed_event_is_refused_naming_what_is_wrong(body: bytes, named: str) -> None:
    """The refusal says which field is missing or wrong and the shape expected, never a Python
    exception's text (KeyError: 'resource', a codec error)."""
    with pytest.raises(InvalidArgument) as refused:
        parse(body)
    assert refused.value.reason == "MALFORMED_EVENT"
    assert named in refused.value.message
    assert "Error" not in refused.value.message
    assert any(part in refused.value.message for part in ('"sender_item_id"', "128", "NUL"))


async def test_reconciliation_reports_every_mismatch(payout: tuple[Suite, ShiftedClock]) -> None:
    suite, _ = payout
    processor = sandbox(suite)
    creator = await creator_with_diamonds(suite, 20_000)
    made = []
    for _ in range(3):
        w = (await suite.payout.RequestWithdrawal(withdrawal(creator, 4_000))).withdrawal
        made.append(w.withdrawal_id)
    for withdrawal_id in made:
        assert (await settled(suite, withdrawal_id, creator)).status == S.WITHDRAWAL_STATUS_PAID
    clean = await suite.payout.ReconcileWithdrawals(
        S.ReconcileWithdrawalsRequest(run_now=True), metadata=admin(suite)
    )
    assert [m for m in clean.mismatches if m.withdrawal_id in made] == []
    # The processor's records drift from ours and no callback tells us (the late copies of the
    # earlier callbacks delivered first: each makes payout look the item up).
    await processor.drain()
    processor.set_status(made[0], "SUCCESS", amount_minor=1_999, notify=False)
    processor.set_status(made[1], "FAILED", "reversed by the bank", notify=False)
    foreign = processor.add_foreign_item(12_345)
    report = await suite.payout.ReconcileWithdrawals(
        S.ReconcileWithdrawalsRequest(run_now=True), metadata=admin(suite)
    )
    found = {(m.kind, m.withdrawal_id) for m in report.mismatches}
    assert (S.MISMATCH_KIND_AMOUNT_DIFFERS, made[0]) in found
    assert (S.MISMATCH_KIND_PAID_HERE_NOT_THERE, made[1]) in found
    assert (S.MISMATCH_KIND_UNKNOWN_AT_PROCESSOR, "") in found
    assert not any(m.withdrawal_id == made[2] for m in report.mismatches)
    assert any(m.processor_amount_minor == 12_345 for m in report.mismatches)
    latest = await suite.payout.ReconcileWithdrawals(
        S.ReconcileWithdrawalsRequest(run_now=False), metadata=admin(suite)
    )
    assert latest.run_id == report.run_id and len(latest.mismatches) == len(report.mismatches)
    assert foreign  # reported without a withdrawal id: we never sent it
    # Reconciliation reports; it moves nothing.
    assert await balance_of(suite, creator) == (8_000, 8_000, 0, 12_000)


async def test_only_an_admin_reviews(
    payout: tuple[Suite, ShiftedClock],
) -> None:
    suite, _ = payout
    creator = await creator_with_diamonds(suite, 50_000)
    made = (await suite.payout.RequestWithdrawal(withdrawal(creator, 40_000))).withdrawal
    await expect_error(
        suite.payout.ReviewWithdrawal(
            review(made.withdrawal_id, True), metadata=suite.token(creator)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_ROLE_REQUIRED",
    )
    assert (await status_of(suite, made.withdrawal_id, creator)).status == (
        S.WITHDRAWAL_STATUS_IN_REVIEW
    )


async def test_a_failure_after_success_takes_back_the_payment_once(
    payout: tuple[Suite, ShiftedClock],
) -> None:
    suite, _ = payout
    processor = sandbox(suite)
    creator = await creator_with_diamonds(suite, 5_000)
    made = (await suite.payout.RequestWithdrawal(withdrawal(creator, 4_000))).withdrawal
    assert (await settled(suite, made.withdrawal_id, creator)).status == S.WITHDRAWAL_STATUS_PAID
    await processor.drain()
    # The bank reverses the payment after the processor reported success; its callbacks (some
    # twice) reach payout.
    processor.set_status(made.withdrawal_id, "FAILED", "reversed by the receiving bank")

    async def returned() -> bool:
        found = await status_of(suite, made.withdrawal_id, creator)
        return found.status == S.WITHDRAWAL_STATUS_RETURNED

    await eventually(returned, "the payment taken back")
    await processor.drain()
    assert await balance_of(suite, creator) == (5_000, 5_000, 0, 0)
    entries = await suite.payout.ListDiamondEntries(
        S.ListDiamondEntriesRequest(creator_id=creator), metadata=suite.token(creator)
    )
    kinds = sorted(e.kind for e in entries.entries if e.reference == made.withdrawal_id)
    assert kinds == sorted(
        [S.DIAMOND_ENTRY_KIND_WITHDRAWAL, S.DIAMOND_ENTRY_KIND_WITHDRAWAL_RETURNED]
    )
    history = [e.status for e in (await status_of(suite, made.withdrawal_id, creator)).history]
    assert history[-2:] == [S.WITHDRAWAL_STATUS_PAID, S.WITHDRAWAL_STATUS_RETURNED]


async def test_a_return_that_cannot_be_confirmed_yet_is_applied_when_delivered_again(
    payout: tuple[Suite, ShiftedClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A return after payment comes only by callback (the worker follows a withdrawal only until
    it is paid). While the processor's API cannot confirm it, the callback is answered UNAVAILABLE
    and nothing is recorded, so the processor's redelivery applies it; recorded as seen, it was lost
    and the creator's diamonds stayed paid out for good."""
    suite, _ = payout
    processor = sandbox(suite)
    creator = await creator_with_diamonds(suite, 5_000)
    made = (await suite.payout.RequestWithdrawal(withdrawal(creator, 4_000))).withdrawal
    assert (await settled(suite, made.withdrawal_id, creator)).status == S.WITHDRAWAL_STATUS_PAID
    await processor.drain()
    lookup, refused = processor.lookup, 0

    async def unreachable_twice(sender_item_id: str) -> object:
        nonlocal refused
        if refused < 2:
            refused += 1
            raise TimeoutError("the processor's API timed out")
        return await lookup(sender_item_id)

    monkeypatch.setattr(processor, "lookup", unreachable_twice)
    processor.set_status(made.withdrawal_id, "RETURNED", "returned by the bank")

    async def returned() -> bool:
        found = await status_of(suite, made.withdrawal_id, creator)
        return found.status == S.WITHDRAWAL_STATUS_RETURNED

    await eventually(returned, "the return, redelivered after the lookups failed")
    await processor.drain()
    assert refused == 2
    assert await balance_of(suite, creator) == (5_000, 5_000, 0, 0)


async def test_a_return_whose_callback_was_lost_is_found_by_looking_the_payment_up_again(
    payout: tuple[Suite, ShiftedClock],
) -> None:
    """The processor returns a paid withdrawal and its callback never comes (the sandbox's die with
    the process sending them: a review saw four withdrawals stay PAID for good across restarts). A
    paid withdrawal is looked up again every PAYOUT_RETURN_POLL_SECONDS while it is watched, and the
    return gives the diamonds back; once the watch is over it is no longer looked up."""
    suite, clock = payout
    settings = suite.services["payout"].runtime.settings
    worker = suite.services["payout"].runtime.parts["worker"]
    assert isinstance(worker, WithdrawalWorker)
    processor = sandbox(suite)
    creator = await creator_with_diamonds(suite, 5_000)
    made = (await suite.payout.RequestWithdrawal(withdrawal(creator, 4_000))).withdrawal
    assert (await settled(suite, made.withdrawal_id, creator)).status == S.WITHDRAWAL_STATUS_PAID
    await processor.drain()
    processor.set_status(made.withdrawal_id, "RETURNED", "returned by the bank", notify=False)
    try:
        clock.shift += dt.timedelta(seconds=settings.return_poll_seconds + 1)
        worker.wake.set()

        async def returned() -> bool:
            found = await status_of(suite, made.withdrawal_id, creator)
            return found.status == S.WITHDRAWAL_STATUS_RETURNED

        await eventually(returned, "the return, found by the watch")
        assert await balance_of(suite, creator) == (5_000, 5_000, 0, 0)

        kept = (await suite.payout.RequestWithdrawal(withdrawal(creator, 2_000))).withdrawal
        assert (await settled(suite, kept.withdrawal_id, creator)).status == (
            S.WITHDRAWAL_STATUS_PAID
        )
        db = suite.services["payout"].runtime.db

        async def watched_until() -> dt.datetime | None:
            async with db.read() as conn:
                row = await payout_storage.get_withdrawal(conn, kept.withdrawal_id)
            assert row is not None and row.status == "paid"
            return row.next_attempt_at

        assert await watched_until() is not None
        clock.shift += dt.timedelta(days=settings.return_watch_days, seconds=1)
        worker.wake.set()

        async def no_longer_watched() -> bool:
            return await watched_until() is None

        await eventually(no_longer_watched, "the last look after the watch, then none")
    finally:
        clock.shift = dt.timedelta(0)


async def test_small_withdrawals_of_one_day_add_up_to_a_review(
    payout: tuple[Suite, ShiftedClock],
) -> None:
    suite, _ = payout
    creator = await creator_with_diamonds(suite, 60_000)
    first = (await suite.payout.RequestWithdrawal(withdrawal(creator, 12_000))).withdrawal  # $60
    assert first.status == S.WITHDRAWAL_STATUS_APPROVED
    second = (await suite.payout.RequestWithdrawal(withdrawal(creator, 12_000))).withdrawal
    assert second.status == S.WITHDRAWAL_STATUS_IN_REVIEW  # $120 today: above $100
    assert "$120.00 today" in second.history[-1].reason
    third = (await suite.payout.RequestWithdrawal(withdrawal(creator, 12_000))).withdrawal
    assert third.status == S.WITHDRAWAL_STATUS_IN_REVIEW
    # A reviewer's request id is the reviewer's: sent again for another withdrawal it is refused,
    # and that one is decided by a request of its own.
    decision = review(second.withdrawal_id, True)
    approved = await suite.payout.ReviewWithdrawal(decision, metadata=admin(suite))
    other = S.ReviewWithdrawalRequest()
    other.CopyFrom(decision)
    other.withdrawal_id = third.withdrawal_id
    other.decision = S.REVIEW_DECISION_REJECT
    await expect_error(
        suite.payout.ReviewWithdrawal(other, metadata=admin(suite)),
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )
    other.request_id = new_id("review")
    rejected = await suite.payout.ReviewWithdrawal(other, metadata=admin(suite))
    assert rejected.withdrawal.status == S.WITHDRAWAL_STATUS_REJECTED
    again = await suite.payout.ReviewWithdrawal(decision, metadata=admin(suite))
    assert again.withdrawal.withdrawal_id == approved.withdrawal.withdrawal_id
    assert approved.withdrawal.status == S.WITHDRAWAL_STATUS_APPROVED
    for made in (first, second):
        assert (await settled(suite, made.withdrawal_id, creator)).status == (
            S.WITHDRAWAL_STATUS_PAID
        )
    assert await balance_of(suite, creator) == (36_000, 36_000, 0, 24_000)


async def test_diamonds_owed_back_are_never_paid_out_by_a_withdrawal_already_asked_for(
    payout: tuple[Suite, ShiftedClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gifts reversed after a withdrawal was asked for leave a debt: the withdrawal is not sent
    while it stands (an approved one goes back to review), and a reviewer cannot approve it; it was
    approved and paid with the debt unpaid."""
    suite, _ = payout
    worker = suite.services["payout"].runtime.parts["worker"]
    assert isinstance(worker, WithdrawalWorker)

    async def paused() -> None:
        return None

    monkeypatch.setattr(worker, "work_due", paused)  # nothing is sent for now
    creator, gifts = new_id("creator"), [new_id("g"), new_id("g")]
    for gift, coins in zip(gifts, (4_000, 6_000), strict=True):
        await suite.as_caller("gifting").payout.CreditDiamonds(
            S.CreditDiamondsRequest(
                request_id=f"gift:{gift}", creator_id=creator, coins=coins, reference=gift
            )
        )
    await verify_creator(suite, creator)
    made = (await suite.payout.RequestWithdrawal(withdrawal(creator, 4_000))).withdrawal
    assert made.status == S.WITHDRAWAL_STATUS_APPROVED  # $20: approved at once, not yet sent
    await suite.payout.ReverseGiftCredits(
        S.ReverseGiftCreditsRequest(
            request_id=new_id("rev"), gift_ids=[gifts[1]], reason="chargeback fraud"
        ),
        metadata=admin(suite),
    )
    standing = (
        await suite.payout.GetDiamondBalance(S.GetDiamondBalanceRequest(creator_id=creator))
    ).balance
    assert (standing.available_diamonds, standing.held_diamonds, standing.debt_diamonds) == (
        0,
        4_000,
        2_000,
    )  # of the 3,000 reversed, the 1,000 available were taken and 2,000 are owed
    monkeypatch.undo()
    worker.wake.set()

    async def back_in_review() -> bool:
        found = await status_of(suite, made.withdrawal_id, creator)
        return found.status == S.WITHDRAWAL_STATUS_IN_REVIEW

    await eventually(back_in_review, "the worker sending it back to review")
    found = await status_of(suite, made.withdrawal_id, creator)
    assert "owes 2000 diamonds" in found.history[-1].reason
    await expect_error(
        suite.payout.ReviewWithdrawal(review(made.withdrawal_id, True), metadata=admin(suite)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "DEBT_OUTSTANDING",
    )
    waiting = await expect_error(
        suite.payout.RetryWithdrawal(
            S.RetryWithdrawalRequest(request_id=new_id("retry"), withdrawal_id=made.withdrawal_id),
            metadata=admin(suite),
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "WITHDRAWAL_NOT_PARKED",
    )
    assert "it waits for a reviewer" in (waiting.details() or "")
    await suite.payout.ReviewWithdrawal(
        review(made.withdrawal_id, False, "owes diamonds"), metadata=admin(suite)
    )
    assert (await balance_of(suite, creator))[3] == 0  # nothing was paid out


async def test_processor_callbacks_are_forgotten_after_their_retention_oldest_first(
    database: Database,
) -> None:
    """They were kept for ever; a redelivery after PAYOUT_PROCESSOR_EVENT_RETENTION_DAYS is looked
    up at the processor again, which resolves nothing twice."""
    db = await migrated(database, "payout")
    now = dt.datetime(2026, 12, 6, tzinfo=dt.UTC)
    async with db.transaction() as conn:
        for event_id, days in (("old-1", 40), ("old-2", 31), ("recent", 2)):
            assert await payout_storage.record_processor_event(
                conn,
                event_id,
                "wd-1",
                "PAYMENT.PAYOUTS-ITEM.SUCCEEDED",
                now - dt.timedelta(days=days),
            )
    cut = now - dt.timedelta(days=30)
    async with db.transaction() as conn:
        assert await payout_storage.forget_processor_events(conn, cut, limit=1) == 1
    async with db.transaction() as conn:
        assert (
            await payout_storage.processor_event_item(conn, "old-2") is not None
        )  # the older went first
        assert await payout_storage.processor_event_item(conn, "old-1") is None
        assert await payout_storage.forget_processor_events(conn, cut, limit=10) == 1
        assert await payout_storage.processor_event_item(conn, "recent") is not None
        assert await payout_storage.processor_event_item(conn, "old-2") is None


async def test_history_written_before_event_kinds_reads_as_status_changes(
    database: Database, backend: str
) -> None:
    """Migration 0027 gives withdrawal events a kind: the events already stored read as status
    changes, and the column is added without rewriting the table (PostgreSQL keeps its constant
    default in the catalog: the table's file stays the same)."""
    db = await migrated(database, "payout", "0026")
    at = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    async with db.transaction() as conn:
        for seq, status, actor in ((1, "requested", "ann"), (2, "approved", "auto-approve")):
            await conn.execute(
                sa.text(
                    "INSERT INTO withdrawal_events (withdrawal_id, seq, status, actor, reason, "
                    "created_at) VALUES ('wd-old', :seq, :status, :actor, '', :at)"
                ),
                {"seq": seq, "status": status, "actor": actor, "at": at},
            )
    file_of_table = sa.text("SELECT relfilenode FROM pg_class WHERE relname = 'withdrawal_events'")
    before = await _scalar(db, file_of_table) if backend == "postgres" else None
    await migrated(database, "payout")
    if backend == "postgres":
        assert await _scalar(db, file_of_table) == before
    async with db.read() as conn:
        events = (await payout_storage.events_of(conn, ["wd-old"]))["wd-old"]
    assert [(e.kind, e.status, e.actor) for e in events] == [
        ("status_changed", "requested", "ann"),
        ("status_changed", "approved", "auto-approve"),
    ]


async def _scalar(db: Database, query: sa.TextClause) -> object:
    async with db.read() as conn:
        return await conn.scalar(query)


async def test_tables_updated_on_every_credit_batch_leave_room_on_their_pages(
    database: Database, backend: str
) -> None:
    """Migration 0028: a creator's totals and the diamond accounts' balances change on every batch
    of credits; on PostgreSQL their pages keep room for the rows' new versions (fillfactor), so
    updates stay on the page and dead versions are pruned without autovacuum (the settlement
    benchmark: 30 -> 118 ms of PostgreSQL CPU per batch as they piled up, flat at ~24 with room)."""
    db = await migrated(database, "payout")
    if backend != "postgres":
        return  # SQLite rewrites a page in place on every change: nothing to tune
    options = sa.text(
        "SELECT relname, reloptions FROM pg_class "
        "WHERE relname IN ('creators', 'ledger_accounts') AND relkind = 'r'"
    )
    async with db.read() as conn:
        found = {name: sorted(opts or []) for name, opts in (await conn.execute(options)).all()}
    assert found == {"creators": ["fillfactor=50"], "ledger_accounts": ["fillfactor=70"]}


async def test_a_withdrawal_request_sent_again_after_its_record_was_purged_makes_no_second_one(
    payout: tuple[Suite, ShiftedClock],
) -> None:
    """Request ids are forgotten after PAYOUT_IDEMPOTENCY_RETENTION_HOURS; the withdrawal's hold
    keeps its request for good, so a client retrying days later is answered the withdrawal it made
    (review R2: a second withdrawal was held and paid), and the id with another amount is refused."""
    suite, _ = payout
    creator = await creator_with_diamonds(suite, 10_000)
    request = withdrawal(creator, 4_000)
    first = (await suite.payout.RequestWithdrawal(request)).withdrawal
    await settled(suite, first.withdrawal_id, creator)
    idempotency = suite.services["payout"].runtime.idempotency
    while await idempotency.purge(dt.timedelta(0)):  # every answered request id forgotten
        pass
    again = await suite.payout.RequestWithdrawal(request)
    assert again.withdrawal.withdrawal_id == first.withdrawal_id
    assert again.withdrawal.status == S.WITHDRAWAL_STATUS_PAID  # as it is now
    assert await balance_of(suite, creator) == (6_000, 6_000, 0, 4_000)
    other = S.RequestWithdrawalRequest()
    other.CopyFrom(request)
    other.diamonds = 2_000
    await expect_error(
        suite.payout.RequestWithdrawal(other), grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"
    )
    assert await balance_of(suite, creator) == (6_000, 6_000, 0, 4_000)
