"""The withdrawal worker never stalls and never pays twice: a lost answer is looked up, not resent;
a lost (or only delayed) request is resent as the same batch, under the same key; what cannot be
finished is parked for an admin; reconciliation names a payment made twice."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from opentelemetry.trace import StatusCode
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection

from coins.payout.v1 import payout_pb2
from runtime.clock import SystemClock
from services.payout import storage as payout_storage
from services.payout.processor import ItemStatus, PayoutItem, WithdrawalWorker
from services.payout.sandbox import PayPalSandbox
from services.payout.settings import PayoutSettings
from services.payout.withdrawals import Withdrawals
from tests.helpers import eventually, expect_error, new_id, verify_creator
from tests.suite import Suite, require_postgres, start_suite
from tests.test_payout import creator_with_diamonds, settled, withdrawal


@pytest.fixture(scope="module")
async def impatient(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    if backend == "postgres":
        await require_postgres()
    suite = await start_suite(
        backend,
        tmp_path_factory.mktemp(f"payout-worker-{backend}"),
        only=("payout",),
        overrides={
            "payout": {
                "processor_timeout_seconds": 0.3,
                "processor_max_backoff_seconds": 1.0,
                "processor_max_attempts": 3,
                "processor_unclaimed_return_ms": 600_000,  # an unclaimed payment stays so
            }
        },
    )
    yield suite
    await suite.stop()


def sandbox(suite: Suite) -> PayPalSandbox:
    processor = suite.services["payout"].runtime.parts["processor"]
    assert isinstance(processor, PayPalSandbox)
    return processor


async def read(suite: Suite, withdrawal_id: str, creator: str) -> payout_pb2.Withdrawal:
    found = await suite.payout.GetWithdrawal(
        payout_pb2.GetWithdrawalRequest(withdrawal_id=withdrawal_id), metadata=suite.token(creator)
    )
    return found.withdrawal


async def parked_withdrawal(suite: Suite, creator: str, receiver: str) -> str:
    """A withdrawal of 2,000 diamonds to a receiver whose requests are lost, once it is parked."""
    made = await suite.payout.RequestWithdrawal(
        withdrawal(creator, 2_000, receiver), metadata=suite.token(creator)
    )
    withdrawal_id = made.withdrawal.withdrawal_id

    async def parked() -> bool:
        return (await read(suite, withdrawal_id, creator)).parked

    await eventually(parked, "the withdrawal parked", seconds=15)
    return withdrawal_id


def retry_request(withdrawal_id: str, reason: str = "") -> payout_pb2.RetryWithdrawalRequest:
    """An admin's RetryWithdrawal of `withdrawal_id`, under a request id of its own."""
    return payout_pb2.RetryWithdrawalRequest(
        request_id=new_id("retry"), withdrawal_id=withdrawal_id, reason=reason
    )


async def no_longer_parked(
    suite: Suite, withdrawal_id: str, admin: tuple[tuple[str, str], ...]
) -> None:
    """Off the parked queue, and not handed back to the worker (WITHDRAWAL_NOT_PARKED)."""
    queue = await suite.payout.ListWithdrawalQueue(
        payout_pb2.ListWithdrawalQueueRequest(queue=payout_pb2.WITHDRAWAL_QUEUE_PARKED),
        metadata=admin,
    )
    assert withdrawal_id not in [w.withdrawal_id for w in queue.withdrawals]
    await expect_error(
        suite.payout.RetryWithdrawal(
            retry_request(withdrawal_id),
            metadata=admin,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "WITHDRAWAL_NOT_PARKED",
    )


async def test_a_lost_answer_is_looked_up_and_paid_once_while_others_are_paid(
    impatient: Suite,
) -> None:
    suite = impatient
    lost_creator = await creator_with_diamonds(suite, 5_000)
    other_creator = await creator_with_diamonds(suite, 5_000)
    # The processor records this payment, but its answer never comes back (the call times out).
    lost = await suite.payout.RequestWithdrawal(
        withdrawal(lost_creator, 2_000, "dest_hang_answer_lost"), metadata=suite.token(lost_creator)
    )
    other = await suite.payout.RequestWithdrawal(
        withdrawal(other_creator, 2_000), metadata=suite.token(other_creator)
    )
    assert (
        await settled(suite, other.withdrawal.withdrawal_id, other_creator)
    ).status == payout_pb2.WITHDRAWAL_STATUS_PAID
    paid = await settled(suite, lost.withdrawal.withdrawal_id, lost_creator)
    assert paid.status == payout_pb2.WITHDRAWAL_STATUS_PAID
    # Exactly one item at the processor, and the diamonds left once.
    items = [
        i
        for i in await sandbox(suite).items_since(paid.create_time.ToDatetime().astimezone())
        if i.sender_item_id == paid.withdrawal_id
    ]
    assert [(i.status, i.amount_minor) for i in items] == [("SUCCESS", 1_000)]
    assert sandbox(suite).payments[paid.withdrawal_id] == 1
    balance = (
        await suite.payout.GetDiamondBalance(
            payout_pb2.GetDiamondBalanceRequest(creator_id=lost_creator)
        )
    ).balance
    assert (balance.diamonds, balance.held_diamonds, balance.paid_out_diamonds) == (3_000, 0, 2_000)


async def test_a_withdrawal_the_processor_never_answers_is_parked_and_retried_by_an_admin(
    impatient: Suite,
) -> None:
    suite = impatient
    creator = await creator_with_diamonds(suite, 5_000)
    # Every request to this receiver is lost: nothing recorded, no answer.
    withdrawal_id = await parked_withdrawal(suite, creator, "dest_drop_everything")
    found = await read(suite, withdrawal_id, creator)
    assert found.status == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
    assert found.attempts == 3 and "timed out: no answer within 0.3s" in found.last_error
    # Each failed attempt is an error on its trace, where an SRE looks (review r24: only the log).
    failed = [
        s
        for s in suite.spans.get_finished_spans()
        if s.name == "payout.processor"
        and withdrawal_id in tuple((s.attributes or {}).get("coins.withdrawal_ids", ()))  # type: ignore[arg-type]
        and s.status.status_code == StatusCode.ERROR
    ]
    assert len(failed) >= 3, failed
    assert {(s.attributes or {}).get("coins.reason") for s in failed} == {"PROCESSOR_TIMEOUT"}
    admin = suite.token("ops-1", admin=True)
    queue = await suite.payout.ListWithdrawalQueue(
        payout_pb2.ListWithdrawalQueueRequest(queue=payout_pb2.WITHDRAWAL_QUEUE_PARKED),
        metadata=admin,
    )
    assert withdrawal_id in [w.withdrawal_id for w in queue.withdrawals]
    # Its diamonds stay held while its outcome is unknown.
    balance = (
        await suite.payout.GetDiamondBalance(
            payout_pb2.GetDiamondBalanceRequest(creator_id=creator)
        )
    ).balance
    assert (balance.diamonds, balance.held_diamonds) == (3_000, 2_000)
    await expect_error(  # not by its creator as an admin: a resend is a new payment (review r5)
        suite.payout.RetryWithdrawal(
            retry_request(withdrawal_id), metadata=suite.token(creator, admin=True)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "OWN_DECISION",
    )
    first_retry = retry_request(withdrawal_id, reason="processor says it is back")
    retried = await suite.payout.RetryWithdrawal(first_retry, metadata=admin)
    assert (retried.withdrawal.parked, retried.withdrawal.attempts) == (False, 0)
    # Its history says when it was parked and why, and who retried it and why.
    *moves, parked, retry = retried.withdrawal.history
    assert [(e.kind, e.status) for e in moves] == [
        (payout_pb2.WITHDRAWAL_EVENT_KIND_STATUS_CHANGED, status)
        for status in (
            payout_pb2.WITHDRAWAL_STATUS_REQUESTED,
            payout_pb2.WITHDRAWAL_STATUS_APPROVED,
            payout_pb2.WITHDRAWAL_STATUS_PROCESSING,
        )
    ]  # no event per failed attempt: the withdrawal counts them
    assert (parked.kind, parked.status, parked.actor, parked.reason) == (
        payout_pb2.WITHDRAWAL_EVENT_KIND_PARKED,
        payout_pb2.WITHDRAWAL_STATUS_PROCESSING,
        "worker",
        found.last_error,
    )
    assert (retry.kind, retry.status, retry.actor, retry.reason) == (
        payout_pb2.WITHDRAWAL_EVENT_KIND_RETRIED,
        payout_pb2.WITHDRAWAL_STATUS_PROCESSING,
        "ops-1",
        "processor says it is back",
    )
    assert parked.time.ToDatetime() <= retry.time.ToDatetime()
    await expect_error(
        suite.payout.RetryWithdrawal(
            retry_request(withdrawal_id),
            metadata=admin,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "WITHDRAWAL_NOT_PARKED",
    )

    async def parked_again() -> bool:
        return (await read(suite, withdrawal_id, creator)).parked

    await eventually(parked_again, "the retried withdrawal parked again", seconds=15)
    again = await read(suite, withdrawal_id, creator)
    assert again.status == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
    assert [e.kind for e in again.history[-3:]] == [
        payout_pb2.WITHDRAWAL_EVENT_KIND_PARKED,
        payout_pb2.WITHDRAWAL_EVENT_KIND_RETRIED,
        payout_pb2.WITHDRAWAL_EVENT_KIND_PARKED,
    ]
    assert len(again.history) == 6 and again.history[-1].reason == again.last_error
    # The first retry repeated now, its creator no longer verified: its first answer (it was
    # checked again and refused KYC_REQUIRED, review r5), nothing sent.
    await verify_creator(suite, creator, rejected=True, reason="fraud suspected")
    assert await suite.payout.RetryWithdrawal(first_retry, metadata=admin) == retried
    assert (await read(suite, withdrawal_id, creator)).parked


async def test_a_parking_is_written_with_its_history_event_or_not_at_all(
    impatient: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker parks a withdrawal and records it in its history in one transaction: when the
    event cannot be written, the withdrawal is not parked (nor its last attempt counted), and the
    worker's next attempt parks it, recorded once."""
    suite = impatient
    creator = await creator_with_diamonds(suite, 5_000)
    record_event = payout_storage.add_event
    refused: list[str] = []

    async def history_fails_on_parking(
        conn: AsyncConnection,
        withdrawal_id: str,
        status: str,
        actor: str,
        reason: str,
        now: dt.datetime,
        *,
        kind: str = "status_changed",
    ) -> None:
        if kind == "parked":
            refused.append(withdrawal_id)
            raise RuntimeError("the history table is unavailable")
        await record_event(conn, withdrawal_id, status, actor, reason, now, kind=kind)

    monkeypatch.setattr(payout_storage, "add_event", history_fails_on_parking)
    made = await suite.payout.RequestWithdrawal(
        withdrawal(creator, 2_000, "dest_drop_history_fails"), metadata=suite.token(creator)
    )
    withdrawal_id = made.withdrawal.withdrawal_id

    async def parking_refused() -> bool:
        return withdrawal_id in refused

    await eventually(parking_refused, "the worker trying to park it", seconds=15)
    found = await read(suite, withdrawal_id, creator)
    assert (found.parked, found.attempts) == (False, 2)  # the third attempt rolled back with it
    assert payout_pb2.WITHDRAWAL_EVENT_KIND_PARKED not in [e.kind for e in found.history]
    monkeypatch.setattr(payout_storage, "add_event", record_event)

    async def parked() -> bool:
        return (await read(suite, withdrawal_id, creator)).parked

    await eventually(parked, "the withdrawal parked once the history can be written", seconds=15)
    found = await read(suite, withdrawal_id, creator)
    assert found.attempts == 3
    assert [e.kind for e in found.history].count(payout_pb2.WITHDRAWAL_EVENT_KIND_PARKED) == 1
    assert found.history[-1].reason == found.last_error


async def test_an_admin_gives_up_a_parked_withdrawal_and_a_late_payment_takes_it_again(
    impatient: Suite,
) -> None:
    """Every send lost: parked, its diamonds held, and the worker's retries park it again (it
    stayed held for good: nothing could end it). Once the processor says it has no record of it,
    another admin cancels it, saying why, and the diamonds come back. Should the send have been
    only delayed and the payment land after all, the withdrawal reads paid and its diamonds leave
    the balance again: what is available, the rest a debt."""
    suite = impatient
    creator = await creator_with_diamonds(suite, 5_000)
    withdrawal_id = await parked_withdrawal(suite, creator, "dest_drop_then_late")

    def cancel(reason: str = "") -> payout_pb2.CancelWithdrawalRequest:
        return payout_pb2.CancelWithdrawalRequest(
            request_id=new_id("cancel"), withdrawal_id=withdrawal_id, reason=reason
        )

    await expect_error(  # its creator cannot: whether it is lost is the processor's to say
        suite.payout.CancelWithdrawal(cancel(), metadata=suite.token(creator)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "WITHDRAWAL_NOT_CANCELLABLE",
    )
    await expect_error(  # nor the creator as an admin: another admin decides
        suite.payout.CancelWithdrawal(cancel("mine"), metadata=suite.token(creator, admin=True)),
        grpc.StatusCode.PERMISSION_DENIED,
        "OWN_DECISION",
    )
    admin = suite.token("ops-1", admin=True)
    await expect_error(
        suite.payout.CancelWithdrawal(cancel(), metadata=admin),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REASON_REQUIRED",
    )
    given_up = await suite.payout.CancelWithdrawal(
        cancel("the processor never received it (3 sends lost)"), metadata=admin
    )
    assert (given_up.withdrawal.status, given_up.withdrawal.parked) == (
        payout_pb2.WITHDRAWAL_STATUS_CANCELLED,
        False,
    )
    assert given_up.withdrawal.history[-1].reason.startswith("the processor never received it")
    assert await diamonds(suite, creator) == (5_000, 5_000, 0, 0)
    await no_longer_parked(suite, withdrawal_id, admin)

    # The creator withdraws most of it again, and is paid...
    again = await suite.payout.RequestWithdrawal(
        withdrawal(creator, 4_000), metadata=suite.token(creator)
    )
    await settled(suite, again.withdrawal.withdrawal_id, creator)
    assert await diamonds(suite, creator) == (1_000, 1_000, 0, 0)
    # ...then the first send, only delayed, reaches the processor and is paid.
    sandbox(suite).arrive_late(
        new_id("late-batch"), [PayoutItem(withdrawal_id, "dest_drop_then_late", 1_000, "USD")]
    )
    paid = await settled(suite, withdrawal_id, creator)
    assert paid.status == payout_pb2.WITHDRAWAL_STATUS_PAID
    assert await diamonds(suite, creator) == (0, 0, 0, 1_000)  # 1,000 taken, 1,000 owed
    await expect_error(
        suite.payout.RequestWithdrawal(withdrawal(creator, 2_000), metadata=suite.token(creator)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "DEBT_OUTSTANDING",
    )
    assert sandbox(suite).payments[withdrawal_id] == 1


async def diamonds(suite: Suite, creator: str) -> tuple[int, int, int, int]:
    """(diamonds, available, held, debt) of a creator."""
    b = (
        await suite.payout.GetDiamondBalance(
            payout_pb2.GetDiamondBalanceRequest(creator_id=creator)
        )
    ).balance
    return b.diamonds, b.available_diamonds, b.held_diamonds, b.debt_diamonds


async def test_a_parked_withdrawal_that_ends_after_all_leaves_the_parked_queue(
    impatient: Suite,
) -> None:
    suite = impatient
    creator = await creator_with_diamonds(suite, 5_000)
    withdrawal_id = await parked_withdrawal(suite, creator, "dest_drop_then_late")
    # The lost request reaches the processor after all: it pays and calls back.
    sandbox(suite).arrive_late(
        new_id("late-batch"), [PayoutItem(withdrawal_id, "dest_drop_then_late", 1_000, "USD")]
    )
    admin = suite.token("ops-1", admin=True)
    await expect_error(  # the processor has it now (on its way or paid): not to be given up
        suite.payout.CancelWithdrawal(
            payout_pb2.CancelWithdrawalRequest(
                request_id=new_id("cancel"), withdrawal_id=withdrawal_id, reason="stuck for days"
            ),
            metadata=admin,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "WITHDRAWAL_NOT_CANCELLABLE",
    )
    paid = await settled(suite, withdrawal_id, creator)
    assert paid.status == payout_pb2.WITHDRAWAL_STATUS_PAID
    assert not paid.parked
    # The processor answered: no failed attempts in a row left on it (review r22: attempts=3 and
    # the timeout's error stayed on a paid withdrawal).
    assert (paid.attempts, paid.last_error) == (0, "")
    await no_longer_parked(suite, withdrawal_id, admin)  # nor handed back to the worker
    assert sandbox(suite).payments[withdrawal_id] == 1


async def test_a_processor_that_does_not_answer_reconciliation_is_unavailable(
    impatient: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    suite = impatient

    async def hangs(since: object) -> list[object]:
        await asyncio.Event().wait()
        return []

    monkeypatch.setattr(sandbox(suite), "items_since", hangs)
    await expect_error(
        suite.payout.ReconcileWithdrawals(
            payout_pb2.ReconcileWithdrawalsRequest(run_now=True),
            metadata=suite.token("ops-1", admin=True),
        ),
        grpc.StatusCode.UNAVAILABLE,
        "PROCESSOR_UNAVAILABLE",
    )


async def approved_together(
    suite: Suite, creators: Sequence[str], monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """A withdrawal of 2,000 diamonds for each creator, all approved before the worker looks, so
    that it sends them in one batch; their ids."""
    worker = suite.services["payout"].runtime.parts["worker"]
    assert isinstance(worker, WithdrawalWorker)

    async def later() -> None:
        return None

    with monkeypatch.context() as held:
        held.setattr(worker, "work_due", later)
        made = [
            (
                await suite.payout.RequestWithdrawal(
                    withdrawal(creator, 2_000, "dest_paypal_ok"), metadata=suite.token(creator)
                )
            ).withdrawal.withdrawal_id
            for creator in creators
        ]
    worker.wake.set()
    return made


async def test_a_delayed_batch_and_its_resend_pay_each_of_its_withdrawals_once(
    impatient: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request of a two-withdrawal batch is delayed, not lost: the worker times out, finds
    neither item at the processor and sends the batch again, whole, under its own batch id; when
    the original then arrives it is a repeat of a batch the processor has, and pays nothing more.
    (Resent under a new batch id, each withdrawal was paid twice.)"""
    suite = impatient
    box = sandbox(suite)
    creators = [await creator_with_diamonds(suite, 5_000) for _ in range(2)]
    real_submit = box.submit
    delayed: list[tuple[str, list[PayoutItem]]] = []

    async def slow_link(batch_id: str, items: Sequence[PayoutItem]) -> list[ItemStatus]:
        if not delayed:  # the first request: still on its way when the worker stops waiting
            delayed.append((batch_id, list(items)))
            await asyncio.Event().wait()
        return await real_submit(batch_id, items)

    monkeypatch.setattr(box, "submit", slow_link)

    made = await approved_together(suite, creators, monkeypatch)
    for withdrawal_id, creator in zip(made, creators, strict=True):
        found = await settled(suite, withdrawal_id, creator)
        assert found.status == payout_pb2.WITHDRAWAL_STATUS_PAID
    (batch_id, items) = delayed[0]
    assert sorted(i.sender_item_id for i in items) == sorted(made)  # one batch of two
    box.arrive_late(batch_id, items)  # the original reaches the processor after all
    assert {w: box.payments[w] for w in made} == {w: 1 for w in made}
    report = await suite.payout.ReconcileWithdrawals(
        payout_pb2.ReconcileWithdrawalsRequest(run_now=True),
        metadata=suite.token("ops-1", admin=True),
    )
    assert [m for m in report.mismatches if m.withdrawal_id in made] == []


async def test_reconciliation_names_a_withdrawal_paid_twice(impatient: Suite) -> None:
    """Whatever the cause (here the sandbox is handed a second batch with the same item), a second
    live item for one withdrawal is a mismatch of its own, naming the extra item."""
    suite = impatient
    creator = await creator_with_diamonds(suite, 5_000)
    made = await suite.payout.RequestWithdrawal(
        withdrawal(creator, 2_000), metadata=suite.token(creator)
    )
    withdrawal_id = made.withdrawal.withdrawal_id
    paid = await settled(suite, withdrawal_id, creator)
    assert paid.status == payout_pb2.WITHDRAWAL_STATUS_PAID
    sandbox(suite).arrive_late(
        f"another-{withdrawal_id}", [PayoutItem(withdrawal_id, "dest_paypal_ok", 1_000, "USD")]
    )
    assert sandbox(suite).payments[withdrawal_id] == 2
    report = await suite.payout.ReconcileWithdrawals(
        payout_pb2.ReconcileWithdrawalsRequest(run_now=True),
        metadata=suite.token("ops-1", admin=True),
    )
    mine = [m for m in report.mismatches if m.withdrawal_id == withdrawal_id]
    assert [m.kind for m in mine] == [payout_pb2.MISMATCH_KIND_PAID_MORE_THAN_ONCE]
    (double,) = mine
    assert double.processor_reference and double.processor_reference != paid.processor_reference
    assert (double.our_amount_minor, double.processor_amount_minor) == (1_000, 1_000)


@pytest.fixture(scope="module")
async def crowded(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    """One call at a time to a slow processor, one withdrawal per batch: sends queue up for
    longer than a withdrawal's lease lasts."""
    if backend == "postgres":
        await require_postgres()
    suite = await start_suite(
        backend,
        tmp_path_factory.mktemp(f"payout-crowded-{backend}"),
        only=("payout",),
        overrides={
            "payout": {
                "processor_timeout_seconds": 0.3,
                "processor_latency_ms": 150,
                "processor_calls_at_once": 1,
                "processor_batch_size": 1,
                "auto_approve_max_minor": 10**9,
                "daily_withdrawal_cap_minor": 10**9,
            }
        },
    )
    yield suite
    await suite.stop()


async def test_two_workers_with_queued_sends_pay_each_withdrawal_once(crowded: Suite) -> None:
    """A second replica's worker (on the same database and processor) must never resend what the
    first has queued: a lease is taken only when its call can start, so it cannot run out while
    the send waits its turn; and a resend goes under a batch id of its own, deduped."""
    suite = crowded
    runtime = suite.services["payout"].runtime
    withdrawals = runtime.parts["withdrawals"]
    assert isinstance(withdrawals, Withdrawals)
    second = WithdrawalWorker(runtime, withdrawals, sandbox(suite))
    replica = asyncio.create_task(second.run())
    try:
        creator = await creator_with_diamonds(suite, 40_000)
        made = [
            (
                await suite.payout.RequestWithdrawal(
                    withdrawal(creator, 2_000), metadata=suite.token(creator)
                )
            ).withdrawal.withdrawal_id
            for _ in range(16)
        ]
        for withdrawal_id in made:
            found = await settled(suite, withdrawal_id, creator)
            assert found.status == payout_pb2.WITHDRAWAL_STATUS_PAID
    finally:
        replica.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await replica
    assert {w: sandbox(suite).payments[w] for w in made} == {w: 1 for w in made}
    balance = (
        await suite.payout.GetDiamondBalance(
            payout_pb2.GetDiamondBalanceRequest(creator_id=creator)
        )
    ).balance
    assert (balance.diamonds, balance.held_diamonds, balance.paid_out_diamonds) == (
        8_000,
        0,
        32_000,
    )


async def test_the_sandbox_processor_keeps_its_records_for_every_payout_process(
    tmp_path: Path,
) -> None:
    """Two payout processes (or one restarted) see one processor, as with PayPal: what one sent the
    other looks up, a batch id is deduped across them, and a second payment is visible to both."""
    settings = PayoutSettings().model_copy(
        update={"processor_latency_ms": 0, "processor_settle_ms": 0}
    )
    store = tmp_path / "sandbox-payouts.sqlite3"
    first = PayPalSandbox(settings, SystemClock(), store_path=store)
    second = PayPalSandbox(settings, SystemClock(), store_path=store)
    item = PayoutItem("w-1", "dest_paypal_ok", 1_000, "USD")
    (sent,) = await first.submit("batch-1", [item])
    found = await second.lookup("w-1")
    assert found is not None and found.payout_item_id == sent.payout_item_id
    assert found.status == "SUCCESS"  # settled, whichever process looks
    (again,) = await second.submit("batch-1", [item])  # the same batch id: nothing new
    assert again.payout_item_id == sent.payout_item_id and first.payments["w-1"] == 1
    await second.submit("batch-2", [item])  # a new batch: paid again, and both can tell
    assert first.payments["w-1"] == second.payments["w-1"] == 2
    await first.drain()
    await second.drain()


async def test_a_batch_is_recorded_with_its_payments_or_not_at_all(tmp_path: Path) -> None:
    """The sandbox's process dying between a batch and its payments (a chaos run's kill -9) left the
    batch without its items: every resend under its id was answered without them, for good."""
    settings = PayoutSettings().model_copy(
        update={"processor_latency_ms": 0, "processor_settle_ms": 0}
    )
    sandbox = PayPalSandbox(settings, SystemClock(), store_path=tmp_path / "sandbox.sqlite3")
    item = PayoutItem("w-1", "dest_paypal_ok", 1_000, "USD")
    store = sandbox._store  # the fault is injected between its two writes

    def dies(*_: object) -> None:
        raise KeyboardInterrupt  # the process going away mid-request

    real_add_payment, store.add_payment = store.add_payment, dies  # type: ignore[method-assign,assignment]
    with pytest.raises(KeyboardInterrupt):
        await sandbox.submit("batch-1", [item])
    store.add_payment = real_add_payment  # type: ignore[method-assign]
    (sent,) = await sandbox.submit("batch-1", [item])  # the resend: recorded now, whole
    assert sent.sender_item_id == "w-1" and sandbox.payments["w-1"] == 1
    await sandbox.drain()


async def lost_batch_of_two(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], list[str], asyncio.Event]:
    """Two withdrawals approved together, sent in one batch whose requests are all lost until the
    returned event is set: (their ids, their creators, the event), once both are parked."""
    box = sandbox(suite)
    creators = [await creator_with_diamonds(suite, 5_000) for _ in range(2)]
    real_submit = box.submit
    link_up = asyncio.Event()

    async def lossy_link(batch_id: str, items: Sequence[PayoutItem]) -> list[ItemStatus]:
        if not link_up.is_set():
            await asyncio.Event().wait()  # lost: the processor records nothing
        return await real_submit(batch_id, items)

    monkeypatch.setattr(box, "submit", lossy_link)

    made = await approved_together(suite, creators, monkeypatch)
    for withdrawal_id, creator in zip(made, creators, strict=True):

        async def parked(withdrawal_id: str = withdrawal_id, creator: str = creator) -> bool:
            return (await read(suite, withdrawal_id, creator)).parked

        await eventually(parked, "the withdrawal parked", seconds=20)
    return made, creators, link_up


async def test_a_retry_resends_its_batch_without_the_parked_withdrawals_in_it(
    impatient: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of two is lost and both park. Retrying one sends the batch again without the other,
    which is in an admin's hands (review R2: it went along, and an admin who gave it up as never
    received at that moment saw it paid after all). The other, given up meanwhile, is never paid;
    retried instead, it goes in a batch of its own (the processor has its batch without it)."""
    suite = impatient
    box = sandbox(suite)
    admin = suite.token("ops-1", admin=True)
    (first, second), (first_creator, second_creator), link_up = await lost_batch_of_two(
        suite, monkeypatch
    )
    link_up.set()
    # While a follow-up of its batch-mate holds its lease, the second is not given up.
    async with suite.services["payout"].runtime.db.transaction() as conn:
        await conn.execute(
            update(payout_storage.withdrawals)
            .where(payout_storage.withdrawals.c.withdrawal_id == first)
            .values(leased_until=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))
        )

    def give_up(withdrawal_id: str) -> payout_pb2.CancelWithdrawalRequest:
        return payout_pb2.CancelWithdrawalRequest(
            request_id=new_id("cancel"), withdrawal_id=withdrawal_id, reason="never received"
        )

    await expect_error(
        suite.payout.CancelWithdrawal(give_up(second), metadata=admin),
        grpc.StatusCode.UNAVAILABLE,
        "BATCH_BEING_SENT",
    )
    async with suite.services["payout"].runtime.db.transaction() as conn:
        await conn.execute(
            update(payout_storage.withdrawals)
            .where(payout_storage.withdrawals.c.withdrawal_id == first)
            .values(leased_until=None)
        )

    retried = await suite.payout.RetryWithdrawal(retry_request(first), metadata=admin)
    assert retried.withdrawal.last_error == ""  # a retry starts over
    assert (await settled(suite, first, first_creator)).status == payout_pb2.WITHDRAWAL_STATUS_PAID
    assert box.payments.get(second, 0) == 0 and box.payments[first] == 1
    assert (await read(suite, second, second_creator)).parked
    # Retried in its turn, the second cannot join its batch any more: it is sent alone, once.
    await suite.payout.RetryWithdrawal(retry_request(second), metadata=admin)
    paid = await settled(suite, second, second_creator)
    assert paid.status == payout_pb2.WITHDRAWAL_STATUS_PAID
    assert (box.payments[first], box.payments[second]) == (1, 1)
    report = await suite.payout.ReconcileWithdrawals(
        payout_pb2.ReconcileWithdrawalsRequest(run_now=True), metadata=admin
    )
    assert [m for m in report.mismatches if m.withdrawal_id in (first, second)] == []


async def test_a_parked_withdrawal_the_processor_never_had_is_not_sent_to_an_unverified_creator(
    impatient: Suite,
) -> None:
    """A retry would send it as a new payment: the creator must still be verified, as approving it
    required (review R2: a creator rejected for fraud meanwhile was paid). Given up instead, the
    diamonds come back; verified again, a retry would have sent it."""
    suite = impatient
    creator = await creator_with_diamonds(suite, 5_000)
    withdrawal_id = await parked_withdrawal(suite, creator, "dest_drop_forever")
    admin = suite.token("ops-1", admin=True)
    await verify_creator(suite, creator, rejected=True, reason="fraud suspected")
    refused = await expect_error(
        suite.payout.RetryWithdrawal(
            retry_request(withdrawal_id),
            metadata=admin,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "KYC_REQUIRED",
    )
    assert "never reached the processor" in (refused.details() or "")
    assert (await read(suite, withdrawal_id, creator)).parked  # nothing changed
    given_up = await suite.payout.CancelWithdrawal(
        payout_pb2.CancelWithdrawalRequest(
            request_id=new_id("cancel"), withdrawal_id=withdrawal_id, reason="creator rejected"
        ),
        metadata=admin,
    )
    assert given_up.withdrawal.status == payout_pb2.WITHDRAWAL_STATUS_CANCELLED
    assert sandbox(suite).payments.get(withdrawal_id, 0) == 0


async def test_a_payment_the_processor_holds_is_in_the_processing_queue_not_the_parked_one(
    impatient: Suite,
) -> None:
    """An unclaimed payment waits at the processor without failing, so it never parks; an admin
    still sees it, with how long it has waited (review R2: it was visible nowhere)."""
    suite = impatient
    creator = await creator_with_diamonds(suite, 5_000)
    made = await suite.payout.RequestWithdrawal(
        withdrawal(creator, 2_000, "dest_unclaimed_inbox"), metadata=suite.token(creator)
    )
    withdrawal_id = made.withdrawal.withdrawal_id
    admin = suite.token("ops-1", admin=True)

    async def queued(queue: payout_pb2.WithdrawalQueue.ValueType) -> list[str]:
        listed = await suite.payout.ListWithdrawalQueue(
            payout_pb2.ListWithdrawalQueueRequest(queue=queue, page_size=1000), metadata=admin
        )
        return [w.withdrawal_id for w in listed.withdrawals]

    async def with_the_processor() -> bool:
        return withdrawal_id in await queued(payout_pb2.WITHDRAWAL_QUEUE_PROCESSING)

    await eventually(with_the_processor, "the processor holds the payment")
    found = await read(suite, withdrawal_id, creator)
    assert (found.status, found.parked) == (payout_pb2.WITHDRAWAL_STATUS_PROCESSING, False)
    assert withdrawal_id not in await queued(payout_pb2.WITHDRAWAL_QUEUE_PARKED)
    assert withdrawal_id not in await queued(payout_pb2.WITHDRAWAL_QUEUE_IN_REVIEW)
    # And the gauge an alert watches counts from when the oldest such withdrawal was sent.
    async with suite.services["payout"].runtime.db.driver.read() as tx:
        gauges = await payout_storage.payout_gauges(tx)
    assert gauges.oldest_processing is not None
    assert gauges.oldest_processing <= dt.datetime.now(dt.UTC)
