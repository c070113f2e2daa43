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
