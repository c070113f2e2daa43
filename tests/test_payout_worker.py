"""The withdrawal worker never stalls and never pays twice: a lost answer is looked up, not resent;
a lost request is resent under the same key; what cannot be finished is parked for an admin."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from coins.payout.v1 import payout_pb2
from services.payout.sandbox import PayPalSandbox
from tests.helpers import eventually, expect_error, new_id
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
    made = await suite.payout.RequestWithdrawal(
        withdrawal(creator, 2_000, "dest_drop_everything"), metadata=suite.token(creator)
    )
    withdrawal_id = made.withdrawal.withdrawal_id

    async def parked() -> bool:
        return (await read(suite, withdrawal_id, creator)).parked

    await eventually(parked, "the withdrawal parked", seconds=15)
    found = await read(suite, withdrawal_id, creator)
    assert found.status == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
    assert found.attempts == 3 and "timed out" in found.last_error
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
    retried = await suite.payout.RetryWithdrawal(
        payout_pb2.RetryWithdrawalRequest(request_id=new_id("retry"), withdrawal_id=withdrawal_id),
        metadata=admin,
    )
    assert (retried.withdrawal.parked, retried.withdrawal.attempts) == (False, 0)
    await expect_error(
        suite.payout.RetryWithdrawal(
            payout_pb2.RetryWithdrawalRequest(
                request_id=new_id("retry"), withdrawal_id=made.withdrawal.withdrawal_id
            ),
            metadata=admin,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "WITHDRAWAL_NOT_PARKED",
    )
    await eventually(parked, "the retried withdrawal parked again", seconds=15)
    assert (await read(suite, withdrawal_id, creator)).status == (
        payout_pb2.WITHDRAWAL_STATUS_PROCESSING
    )
