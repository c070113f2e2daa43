"""Periodic jobs run in one replica at a time: the holder of the service's lease; when it stops
renewing it, another takes over."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from runtime.leadership import Leadership
from tests.helpers import eventually
from tests.suite import Suite


async def test_one_replica_leads_and_another_takes_over_when_it_goes(suite: Suite) -> None:
    driver = suite.services["wallet"].runtime.db.driver
    if not driver.is_postgres:  # one process: it leads
        assert Leadership("wallet", driver).leading
        return
    service = f"test-{uuid.uuid4().hex[:12]}"
    first = Leadership(service, driver, lease=0.5, retry_every=0.05)
    second = Leadership(service, driver, lease=0.5, retry_every=0.05)
    leading = asyncio.create_task(first.run())

    async def first_leads() -> bool:
        return first.leading

    await eventually(first_leads, "the first replica leading")
    waiting = asyncio.create_task(second.run())

    async def second_tried() -> bool:
        return second.tries >= 3

    await eventually(second_tried, "the second replica finding the lease held")
    assert first.leading and not second.leading
    leading.cancel()  # the leader goes: it renews no more
    with contextlib.suppress(asyncio.CancelledError):
        await leading

    async def second_leads() -> bool:
        return second.leading

    await eventually(second_leads, "the second replica taking over once the lease ran out")
    assert not first.leading
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting


async def _lead(leadership: Leadership) -> asyncio.Task[None]:
    task = asyncio.create_task(leadership.run())

    async def leads() -> bool:
        return leadership.leading

    await eventually(leads, "the replica leading")
    return task


async def _stop(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_leader_that_stopped_renewing_leads_no_more_once_its_lease_ran_out(
    suite: Suite,
) -> None:
    """A replica frozen past its lease (here: renewing too late) does not go on as the leader
    when it wakes, as its last claim said: a review saw one run five passes after another had
    taken over."""
    driver = suite.services["wallet"].runtime.db.driver
    if not driver.is_postgres:
        return  # one process: it leads
    service = f"test-{uuid.uuid4().hex[:12]}"
    frozen = Leadership(service, driver, lease=0.3, retry_every=60)  # renews a minute later
    task = await _lead(frozen)
    other = Leadership(service, driver, lease=0.3, retry_every=0.05)
    waiting = asyncio.create_task(other.run())

    async def taken_over() -> bool:
        return other.leading

    await eventually(taken_over, "another replica taking the lease that ran out")
    assert not frozen.leading
    await _stop(task, waiting)


async def test_a_leader_that_stops_gives_its_lease_up(suite: Suite) -> None:
    """A stopping replica gives the lease up, so the next takes over at its next try rather than
    when the lease runs out (a rolling restart left no replica running the jobs for 9-11 s)."""
    driver = suite.services["wallet"].runtime.db.driver
    if not driver.is_postgres:
        return  # one process: it leads
    service = f"test-{uuid.uuid4().hex[:12]}"
    leader = Leadership(service, driver, lease=60, retry_every=0.05)
    task = await _lead(leader)
    other = Leadership(service, driver, lease=60, retry_every=0.05)
    waiting = asyncio.create_task(other.run())

    async def tried() -> bool:
        return other.tries >= 3

    await eventually(tried, "the other replica finding the lease held")
    await _stop(task)
    await leader.release()

    async def taken_over() -> bool:
        return other.leading

    await eventually(taken_over, "the other replica taking over at once, not in a minute")
    await _stop(waiting)
