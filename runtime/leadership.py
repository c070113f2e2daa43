"""One replica at a time runs a service's periodic jobs (sweeps, reconcilers, maturation, purges).

Every job is safe to run twice (conditional updates, request ids), but with N replicas each would
run N times. The leader holds a lease in the service's own database (`job_leases`, one row per
service): it renews it every `retry_every` seconds for `lease` seconds ahead; a replica that dies or
stops renewing loses it when it runs out, and another takes it at its next try. No connection is
held for it. On SQLite there is one process: it leads.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING

import sqlalchemy as sa
from opentelemetry import trace

from runtime.sql import Driver, Statement
from runtime.telemetry import background_pass

if TYPE_CHECKING:  # alembic (~11 MB) is loaded only by a process that migrates
    from alembic.operations import Operations

log = logging.getLogger("coins.leadership")

_CLAIM = Statement(
    "runtime.claim_leadership",
    "INSERT INTO job_leases (name, holder, until) VALUES (:name, :holder, :until) "
    "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until "
    "WHERE job_leases.until < :now OR job_leases.holder = excluded.holder RETURNING holder",
)
_RELEASE = Statement(
    "runtime.release_leadership",
    "DELETE FROM job_leases WHERE name = :name AND holder = :holder",
)


def upgrade_job_leases(op: Operations) -> None:
    """The lease table, for a service's migration (every service has one)."""
    op.create_table(
        "job_leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade_job_leases(op: Operations) -> None:
    op.drop_table("job_leases")


class Leadership:
    def __init__(
        self,
        service: str,
        driver: Driver | None,
        *,
        lease: float = 10.0,
        retry_every: float = 2.0,
        tracer: trace.Tracer | None = None,
    ) -> None:
        """`driver`: the service's database (None, or SQLite: one process, always the leader)."""
        self._service = service
        self._driver = driver if driver is not None and driver.is_postgres else None
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lease = dt.timedelta(seconds=lease)
        self._retry_every = retry_every
        self._tracer = tracer or trace.get_tracer(__name__)
        self._leading = self._driver is None
        self._valid_until = 0.0
        """When (time.monotonic) the lease last claimed runs out, as this process counts."""
        self.tries = 0
        """Claims that found the lease held by another replica."""

    @property
    def leading(self) -> bool:
        """Whether this replica holds the lease now: claimed, and not run out since. A replica
        frozen past its lease (SIGSTOP, a long pause) leads no more when it wakes, though its
        last claim said so (a review saw one run five passes after another had taken over)."""
        if self._driver is None:
            return True
        return self._leading and time.monotonic() < self._valid_until

    async def release(self) -> None:
        """Give the lease up (a replica stopping, its jobs' tasks ended): another replica takes
        over at its next try, not when the lease runs out (a rolling restart of the leader left
        no replica running the jobs for 9-11 s). Best effort: the lease runs out anyway."""
        driver, self._leading = self._driver, False
        if driver is None:
            return
        try:
            async with asyncio.timeout(1.0), driver.transaction(single_statement=True) as tx:
                await tx.run(_RELEASE, name=self._service, holder=self._holder)
        except Exception as error:
            log.info("%s: did not give the periodic jobs' lease up (%r)", self._service, error)

    async def run(self) -> None:
        """Claim or renew the lease every `retry_every` seconds, forever."""
        driver = self._driver
        if driver is None:
            await asyncio.Event().wait()
            return
        try:
            while True:
                with background_pass(self._tracer, "periodic jobs' lease"):  # exported if it fails
                    await self._claim(driver)
                await asyncio.sleep(self._retry_every)
        finally:
            self._leading = False  # stopped: it renews no more

    async def _claim(self, driver: Driver) -> None:
        was = self._leading
        sent = time.monotonic()  # the lease counts from before the claim was sent, to be safe
        try:
            now = dt.datetime.now(dt.UTC)
            async with driver.transaction(single_statement=True) as tx:
                row = await tx.one(
                    _CLAIM,
                    name=self._service,
                    holder=self._holder,
                    now=now,
                    until=now + self._lease,
                )
            self._leading = row is not None
            self._valid_until = sent + self._lease.total_seconds()
        except Exception as error:
            self._leading = False
            if was:
                log.warning("%s: cannot renew the periodic jobs' lease (%r)", self._service, error)
        if not self._leading:
            self.tries += 1
        if self._leading != was:
            log.info(
                "%s: this replica %s the periodic jobs",
                self._service,
                "runs" if self._leading else "no longer runs",
            )
