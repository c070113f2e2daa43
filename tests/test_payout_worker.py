"""The withdrawal worker never stalls: a processor call that hangs times out, is counted and retried
after a growing pause, while the other withdrawals are paid."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from coins.payout.v1 import payout_pb2
from services.payout import storage
from tests.helpers import eventually
from tests.suite import Suite, require_postgres, start_suite
from tests.test_payout import creator_with_diamonds, withdrawal


@pytest.fixture(scope="module")
async def impatient(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Suite]:
    if backend == "postgres":
        await require_postgres()
    suite = await start_suite(
        backend,
        tmp_path_factory.mktemp(f"payout-worker-{backend}"),
        overrides={"payout": {"processor_timeout_seconds": 0.3}},
    )
    yield suite
    await suite.stop()


async def test_a_hung_processor_call_is_retried_and_holds_up_no_one(impatient: Suite) -> None:
    suite = impatient
    stuck_creator = await creator_with_diamonds(suite, 5_000)
    other_creator = await creator_with_diamonds(suite, 5_000)
    stuck = await suite.payout.RequestWithdrawal(
        withdrawal(stuck_creator, 2_000, "dest_hang_forever"), metadata=suite.token(stuck_creator)
    )
    other = await suite.payout.RequestWithdrawal(
        withdrawal(other_creator, 2_000), metadata=suite.token(other_creator)
    )

    async def status(answer: payout_pb2.RequestWithdrawalResponse, creator: str) -> int:
        found = await suite.payout.GetWithdrawal(
            payout_pb2.GetWithdrawalRequest(withdrawal_id=answer.withdrawal.withdrawal_id),
            metadata=suite.token(creator),
        )
        return int(found.withdrawal.status)

    async def other_paid() -> bool:
        return await status(other, other_creator) == payout_pb2.WITHDRAWAL_STATUS_PAID

    await eventually(other_paid, "the other withdrawal paid")

    async def attempts() -> tuple[int, str]:
        async with suite.services["payout"].runtime.db.read() as conn:
            row = (
                await conn.execute(
                    sa.select(
                        storage.withdrawals.c.attempts, storage.withdrawals.c.last_error
                    ).where(storage.withdrawals.c.withdrawal_id == stuck.withdrawal.withdrawal_id)
                )
            ).one()
        return int(row[0]), str(row[1])

    async def retried() -> bool:
        return (await attempts())[0] >= 2  # timed out, paused a second, tried and timed out again

    await eventually(retried, "the hung call retried", seconds=10)
    assert "timed out" in (await attempts())[1]
    assert await status(stuck, stuck_creator) == payout_pb2.WITHDRAWAL_STATUS_PROCESSING
