"""Health checking: the standard grpc.health.v1 service on the API port and the plaintext probe port,
SERVING only while the service's database answers; `LIVENESS` answers SERVING while the process
runs (a liveness probe: restarting a process does not bring a database back, and one that cannot
reach it at start exits, which would keep pods crash-looping through an outage)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2
from opentelemetry import trace

from runtime.db import Database
from runtime.outages import outage_cause
from runtime.sql import Statement
from runtime.telemetry import background_pass

log = logging.getLogger("coins.server")

SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
CHECK, LIST, WATCH = (f"/{SERVICE}/{method}" for method in ("Check", "List", "Watch"))
LIVENESS = "liveness"
"""The health service name a liveness probe asks for: SERVING from start to shutdown, whatever
the database does."""


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """grpcio's servicer, with `List` (grpc.health.v1 has it and reflection lists it; grpcio's
    servicer answered it with an ERROR and its stack trace)."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._server_status.items()
            }
        )


_PING = Statement("runtime.ping", "SELECT 1")


async def _ping(db: Database, seconds: float, tracer: trace.Tracer) -> None:
    with background_pass(tracer, "health ping"):  # exported only when it fails
        db.driver.check_room()
        async with asyncio.timeout(seconds):
            async with db.driver.read() as tx:
                await tx.one(_PING)


async def watch_database(
    name: str,
    servicer: HealthServicer,
    names: Sequence[str],
    db: Database,
    every: float,
    tracer: trace.Tracer,
) -> None:
    """Health says NOT_SERVING while the service's database cannot be reached or, on SQLite, its
    disk has no room for writes (a readiness probe
    then takes the replica out of rotation, instead of sending it calls it can only refuse), and
    SERVING again once it answers.

    The ping runs as a task of its own, waited on for `every` seconds at most: against a database
    that hangs (packets held, not refused), cancelling a query does not return until the driver
    gives its connection back, which can take as long as the hang. A ping still out is no answer;
    the next one starts when it returns."""
    serving = True
    ping: asyncio.Task[None] | None = None
    try:
        while True:
            await asyncio.sleep(every)
            if ping is None:
                ping = asyncio.create_task(_ping(db, every, tracer))
            done, _ = await asyncio.wait({ping}, timeout=every)
            if not done:
                answers, why = False, f"no answer to a ping in {every:g}s"
            else:
                error, ping = ping.exception(), None
                answers = error is None
                why = "" if error is None else outage_cause(error)
            if answers == serving:
                continue
            serving = answers
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if answers
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for service in ("", *names):
                await servicer.set(service, status)
            if answers:
                log.info("%s: the database answers again: health SERVING", name)
            else:
                log.warning("%s: the database does not answer (%s): health NOT_SERVING", name, why)
    finally:
        if ping is not None:
            ping.cancel()
