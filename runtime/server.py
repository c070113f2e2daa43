"""Server bootstrap shared by every service: one `ServiceSpec` in, a running gRPC server out.

`start_service()` opens the database (and migrates it), builds the grpc.aio server with tracing and the
request guard, registers the service's servicers, health checking and reflection, and starts the
service's background workers. `main()` runs that until SIGINT/SIGTERM, then shuts down gracefully: health
turns NOT_SERVING, calls still arriving are refused UNAVAILABLE SHUTTING_DOWN until none has come for a
tenth of a second (at most a second: `RequestGuard.drain`), in-flight calls get `grace_seconds` to
finish, workers stop, the database closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import gc
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio
import pydantic
import uvloop
from google.protobuf import descriptor_pool
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace import TracerProvider

from coins.common.v1 import admin_audit_pb2_grpc
from runtime import pagination, pki, startup
from runtime.access import Access
from runtime.audit import AdminAudit, AdminAuditApi
from runtime.auth import TokenVerifier
from runtime.backoff import backoff
from runtime.clients import service_channel
from runtime.clock import Clock, SystemClock
from runtime.config import SecuritySettings, ServiceSettings
from runtime.db import Database
from runtime.errors import Unavailable
from runtime.health import CHECK, LIST, LIVENESS, HealthServicer, watch_database
from runtime.health import SERVICE as HEALTH
from runtime.idempotency import Idempotency
from runtime.interceptors import Replay, RequestGuard, finish_unfinished
from runtime.leadership import Leadership
from runtime.metrics import (
    MetricsEndpoint,
    Sampler,
    ServiceMetrics,
    make_meter_provider,
    sample_round,
)
from runtime.outages import outage_of
from runtime.ratelimit import RateLimiter, buckets
from runtime.reflection import enable_reflection
from runtime.shedding import LoadShedder
from runtime.telemetry import (
    ITEMS,
    TELEMETRY_FLUSH_SECONDS,
    background_pass,
    configure_logging,
    flush_within,
    make_tracer_provider,
    server_tracing,
    service_resource_name,
)
from runtime.tls import private_key, server_credentials

log = logging.getLogger("coins.server")

S = TypeVar("S", bound=ServiceSettings)


class Runtime(Generic[S]):
    """What the shared runtime hands a service while it sets itself up."""

    def __init__(
        self,
        settings: S,
        server: grpc.aio.Server,
        db: Database,
        tracer_provider: TracerProvider,
        clock: Clock,
        metrics: ServiceMetrics,
        replays: dict[str, Replay] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        """The service's instruments (runtime.metrics): its meter, gauges, RPC and job metrics."""
        self.server = server
        self.db = db
        self.tracer_provider = tracer_provider
        self.tracer = tracer_provider.get_tracer(f"coins.{settings.service_name}")
        self.clock = clock
        self.idempotency = Idempotency(db, clock)
        self.parts: dict[str, object] = {}
        """The service's parts by name (its payment provider, say), for tools and tests to reach."""
        self.port = settings.port
        """The port the server listens on (known once it is bound: settings may say 0)."""
        self._channels: list[grpc.aio.Channel] = []
        self._workers: list[Callable[[], Awaitable[None]]] = []
        self._on_stopping: list[Callable[[], None]] = []
        self.leadership = Leadership(settings.service_name, db.driver, tracer=self.tracer)
        """Whether this replica runs the periodic jobs (see runtime.leadership)."""
        self.replays: dict[str, Replay] = {} if replays is None else replays
        """Per RPC path, the stored answer of a request the rate limit refuses (`replay_stored`)."""

    def channel(
        self, address: str, identity: str | None = None, *, peer: str | None = None
    ) -> grpc.aio.Channel:
        """A traced, retrying channel to another service (`peer`, e.g. "wallet"), presenting this
        service's certificate (or `identity`'s: a simulated outside party's); closed when this
        service stops. See runtime.clients.service_channel for the forms `address` takes."""
        channel = service_channel(
            address,
            self.settings.security,
            identity or self.settings.service_name,
            self.tracer_provider,
            peer=peer,
        )
        self._channels.append(channel)
        return channel

    def replay_stored(
        self,
        rpc: str,
        scope: Callable[[Any], str],
        response_type: type[Message],
        *,
        fingerprinted: Callable[[Any], Message] = lambda request: request,
        then: Callable[[Any], Awaitable[Any]] | None = None,
    ) -> None:
        """A request of `rpc` (its path) refused by the rate limit is answered from the store when
        its request id was answered before (under `scope(request)`, as the handler keys it): a
        client's retry of work already done gets that answer, not RATE_LIMITED. The limit exists
        to hold back new work; this read happens only on its refusals. `fingerprinted`: the
        request as the handler fingerprints it; `then`: what the handler adds to a replay."""

        async def replay(request: Any) -> Any | None:
            claim = await self.idempotency.twin_answer(scope(request), fingerprinted(request))
            if claim is None:
                return None
            response = claim.replay(response_type)  # a stored refusal is raised again
            return response if then is None else await then(response)

        self.replays[rpc] = replay

    def on_stopping(self, hook: Callable[[], None]) -> None:
        """Called when the service starts to stop, before calls in flight get their grace: what
        would hold the stop for all of it (an open stream that never ends by itself) ends now."""
        self._on_stopping.append(hook)

    def stopping(self) -> None:
        for hook in self._on_stopping:
            hook()

    def add_worker(self, run: Callable[[], Awaitable[None]]) -> None:
        """A background loop (an outbox relay, a processor poller) started with the server, cancelled at stop."""
        self._workers.append(run)

    def add_periodic(
        self,
        name: str,
        every: float,
        work: Callable[[], Awaitable[int]],
        *,
        batch: int | None = None,
        first_after: float = 0.0,
    ) -> None:
        """Run `work` every `every` seconds (sweeps, reconcilers), the first time `first_after`
        seconds after start, in one replica at a time (the leader: runtime.leadership); it
        returns how much it did, which is logged; when it did a full `batch`, it runs again at
        once to drain a backlog."""

        async def periodically() -> None:
            await asyncio.sleep(first_after)
            while True:
                if not self.leadership.leading:
                    await asyncio.sleep(min(every, 1.0))
                    continue
                started = time.perf_counter()
                try:
                    with background_pass(self.tracer, f"job {name}") as span:
                        done = await work()
                        span.set_attribute(ITEMS, done)
                        if done:  # inside the pass's span: the line carries its trace id
                            log.info(
                                "%s: %d", name, done, extra={"fields": {"job": name, "items": done}}
                            )
                except asyncio.CancelledError:
                    raise  # the service stopping: not a failed run
                except BaseException:
                    self.metrics.job(name, "failed", 0, time.perf_counter() - started)
                    raise
                self.metrics.job(name, "ok", done, time.perf_counter() - started)
                if batch is None or done < batch:
                    await asyncio.sleep(every)

        periodically.__name__ = name.replace(" ", "_")
        self._workers.append(periodically)

    def add_sampler(self, sample: Sampler) -> None:
        """Read the service's gauges from its database every `metrics_sample_seconds`, in the
        replica that runs the periodic jobs (the others report none: see runtime.metrics.Gauges)."""
        gauges = self.metrics.gauges

        owned: set[str] = set()

        async def sampling() -> None:
            while True:
                started = time.perf_counter()
                with background_pass(self.tracer, "sampled gauges"):
                    outcome = await sample_round(
                        gauges, sample, leading=self.leadership.leading, owned=owned
                    )
                if outcome != "idle":  # a sample failing again and again raises an alert
                    self.metrics.job("sampled gauges", outcome, 0, time.perf_counter() - started)
                await asyncio.sleep(self.settings.metrics_sample_seconds)

        sampling.__name__ = "sampled_gauges"
        self._workers.append(sampling)


@dataclass(frozen=True)
class ServiceSpec(Generic[S]):
    """Everything the runtime needs to know about one service."""

    name: str
    settings_type: type[S]
    error_domain: str
    grpc_services: tuple[str, ...]
    migrations_dir: Path
    setup: Callable[[Runtime[S]], Awaitable[None]]
    access: Mapping[str, Access]
    """The access rule of every method the service serves (see runtime.access)."""


@dataclass
class RunningService(Generic[S]):
    spec: ServiceSpec[S]
    runtime: Runtime[S]
    port: int
    health_port: int
    health: HealthServicer
    health_server: grpc.aio.Server
    shedder: LoadShedder
    guard: RequestGuard
    metrics_endpoint: MetricsEndpoint | None = None
    """The Prometheus scrape endpoint, when `<SVC>_METRICS_PORT` is set."""
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.runtime.settings.host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        rt = self.runtime
        await self.health.enter_graceful_shutdown()
        rt.stopping()
        await self.guard.drain()
        await rt.server.stop(rt.settings.grace_seconds if grace is None else grace)
        await self.health_server.stop(0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await rt.leadership.release()  # its jobs have ended: the next leader need not wait
        await finish_unfinished(rt.settings.grace_seconds if grace is None else grace)
        for channel in rt._channels:
            await channel.close()
        await rt.db.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        flush_within(
            TELEMETRY_FLUSH_SECONDS,
            "spans and metrics",
            rt.tracer_provider.force_flush,
            rt.metrics.shutdown,
        )


WORKER_BACKOFF_CAP_SECONDS = 30.0
RECONCILE_PAGE = 100
"""Items a reconciler takes per pass (pending gifts, purchases, promotions, lost captures); a pass
that settles a full page runs again at once, so a backlog (after a burst of abandoned calls, an
outage) drains in seconds rather than a page per period."""


async def _run_worker(name: str, run: Callable[[], Awaitable[None]]) -> None:
    """Keep a worker alive: a crash is logged (an unreachable database as one line, a bug with its
    stack trace) and the worker restarts after a capped, growing pause."""
    failures = 0
    while True:
        started = time.monotonic()
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if time.monotonic() - started > WORKER_BACKOFF_CAP_SECONDS:
                failures = 0  # it ran a good while: a new problem, not the same one
            failures += 1
            pause = backoff(failures, cap=WORKER_BACKOFF_CAP_SECONDS)
            if outage_of(error) is not None:
                log.warning(
                    "worker %s: database unavailable (%s); attempt %d, retrying in %.1fs",
                    name,
                    type(error).__name__,
                    failures,
                    pause,
                )
            elif isinstance(error, Unavailable):  # another service out: one line, no trace
                log.warning(
                    "worker %s: %s (%s); attempt %d, retrying in %.1fs",
                    name,
                    error.message,
                    error.reason,
                    failures,
                    pause,
                )
            else:
                log.exception(
                    "worker %s crashed (attempt %d); restarting in %.1fs", name, failures, pause
                )
            await asyncio.sleep(pause)


def _check_access(service: str, names: tuple[str, ...], access: Mapping[str, Access]) -> None:
    """Refuse to start a service with a method that has no access rule (access is fail-closed)."""
    pool = descriptor_pool.Default()
    missing = [
        f"/{name}/{method.name}"
        for name in names
        for method in pool.FindServiceByName(name).methods
        if f"/{name}/{method.name}" not in access
    ]
    if missing:
        raise SystemExit(f"{service}: no access rule for {', '.join(missing)}")


_EXCLUSIVE_PORT = ("grpc.so_reuseport", 0)
KEEPALIVE_PING_FLOOR_MS = 5_000
"""Clients may ping every 5 s or more, on an idle stream or channel (a quiet LIVE's feed): gRPC's
core otherwise allows one ping in 5 minutes without data and cuts the connection after the third
too soon (`Too many pings`), which load balancers' 10-30 s keepalives meet. Faster still is refused."""
MAX_METADATA_BYTES = 16 * 1024
"""The most metadata (headers: the token, tracing) one call may carry."""

KEEPALIVE_OPTIONS = [
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_PING_FLOOR_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    # The server pings too, so a watcher that vanished (a host gone, a cable cut) frees its stream.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]
REQUEST_BYTES_READ_MULTIPLE = 4
"""gRPC's core reads a request up to this many times `max_message_bytes` (the guard then refuses it
REQUEST_TOO_LARGE with an ErrorInfo); a larger one is refused by the core itself, without one."""
"""Without it two servers (two suites) bind one port side by side and calls land on either."""


def _held(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return not port.isdigit() or startup.port_held(host, int(port))


def _ports_free_or_exit(service: str, settings: ServiceSettings) -> None:
    """Stop at once, before any migration, if another program holds one of the service's ports."""
    prefix = settings.env_prefix
    for what, port, variable in (
        ("API", settings.port, f"{prefix}PORT"),
        ("health", settings.health_port, f"{prefix}HEALTH_PORT"),
        ("metrics", settings.metrics_port, f"{prefix}METRICS_PORT"),
    ):
        if port and startup.port_held(settings.host, port):
            raise startup.port_in_use(f"{service} {what}", f"{settings.host}:{port}", variable)


def _listen(
    server: grpc.aio.Server,
    address: str,
    credentials: grpc.ServerCredentials | None,
    *,
    what: str,
    variable: str,
) -> int:
    """Bind `address`; a port held by another program stops the service with one line saying
    which port, and which variable moves it."""
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError:
        port = 0
    if port == 0 and not _held(address):
        raise SystemExit(
            f"{what}: gRPC could not listen on {address}, although the port is free: check the "
            "address, and the certificate files in COINS_CERTS_DIR"
        )
    if port == 0:
        raise startup.port_in_use(what, address, variable)
    return port


async def start_service(
    spec: ServiceSpec[S],
    settings: S,
    *,
    tracer_provider: TracerProvider | None = None,
    clock: Clock | None = None,
    metric_readers: Sequence[MetricReader] = (),
) -> RunningService[S]:
    """Start a service: migrations, database, the guarded gRPC server, its health port, its
    workers. `tracer_provider` and `metric_readers` let tests read what it emits."""
    security: SecuritySettings = settings.security
    if security.dev_pki and pki.ensure_dev_pki(security.certs_dir):
        log.warning(
            "generated a development CA and keys in %s/ (never for production)", security.certs_dir
        )
    provider = tracer_provider or make_tracer_provider(spec.name)
    try:
        meter_provider, metrics_endpoint = make_meter_provider(
            service_resource_name(spec.name),
            readers=metric_readers,
            prometheus=(settings.host, settings.metrics_port)
            if settings.metrics_port is not None
            else None,
        )
    except OSError:  # the scrape port (taken since main's check): said as the others are
        raise startup.port_in_use(
            f"{spec.name} metrics",
            f"{settings.host}:{settings.metrics_port}",
            f"{settings.env_prefix}METRICS_PORT",
        ) from None
    metrics = ServiceMetrics(meter_provider, spec.name)
    clock = clock or SystemClock()
    url = settings.resolved_database_url()
    if settings.migrate_on_start:  # as the login user, who owns the tables
        from runtime import migrations  # alembic (~11 MB) only in a process that migrates

        owner = Database(url)
        try:
            await migrations.upgrade(owner, spec.migrations_dir)
        finally:
            await owner.close()
    db = Database(
        url,
        provider,
        role=settings.database_role,
        connections=settings.database_connections,
        idle_transaction_timeout=settings.database_idle_transaction_timeout_seconds,
    )
    audit = AdminAudit(db, clock, spec.name)
    shedder = LoadShedder(
        max_in_flight=settings.max_in_flight_rpcs, max_queue_seconds=settings.max_queue_seconds
    )
    open_to_any_caller = Access(needs_user=False)
    access = {
        **spec.access,
        **AdminAuditApi.ACCESS,
        CHECK: open_to_any_caller,
        LIST: open_to_any_caller,
    }
    replays: dict[str, Replay] = {}  # filled by the service's setup (Runtime.replay_stored)
    guard = RequestGuard(
        spec.error_domain,
        access=access,
        verifier=TokenVerifier(security),
        limiter=RateLimiter(
            buckets(
                security.user_rate_per_second,
                security.user_rate_burst,
                redis_url=security.rate_limit_redis_url,
                prefix="coins:rate:user:",
            ),
            buckets(
                security.caller_rate_per_second,
                security.caller_rate_burst,
                redis_url=security.rate_limit_redis_url,
                prefix="coins:rate:caller:",
            ),
        ),
        audit=audit,
        shedder=shedder,
        metrics=metrics,
        access_log=settings.step_log,
        max_request_bytes=settings.max_message_bytes,
        replays=replays,
    )
    server = grpc.aio.server(
        interceptors=[server_tracing(provider), guard],
        options=[
            # The guard refuses a request above max_message_bytes with an ErrorInfo; gRPC's core
            # only refuses (without one) what is above this multiple, which bounds what one call
            # may make the process read.
            (
                "grpc.max_receive_message_length",
                settings.max_message_bytes * REQUEST_BYTES_READ_MULTIPLE,
            ),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
            # Count a stream against the limit while it is open on the wire, as the client does,
            # not until the application lets go of its call: else calls the client may send are
            # refused (UNAVAILABLE) whenever the event loop is slow to release finished ones.
            ("grpc.http.overload_protection", 0),
            # One limit on a call's metadata, 16 KiB: gRPC refuses at random between its soft
            # limit (8 KiB) and its hard one (16 KiB), so a 9-16 KiB token passed some calls and
            # not others (R7).
            ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
            *KEEPALIVE_OPTIONS,
            _EXCLUSIVE_PORT,
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    runtime = Runtime(settings, server, db, provider, clock, metrics, replays)
    await spec.setup(runtime)
    retention = dt.timedelta(hours=settings.idempotency_retention_hours)
    runtime.add_periodic(
        "forgotten request ids",
        3600,
        lambda: runtime.idempotency.purge(retention, limit=5_000),
        batch=5_000,
    )
    admin_audit_pb2_grpc.add_AdminAuditServiceServicer_to_server(AdminAuditApi(audit), server)
    names = (*spec.grpc_services, AdminAuditApi.FULL_NAME)
    _check_access(spec.name, names, access)

    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        enable_reflection((*names, HEALTH), server)
    pagination.use_token_key(private_key(security, spec.name))
    prefix = settings.env_prefix
    port = runtime.port = _listen(
        server,
        settings.address,
        server_credentials(security, spec.name),
        what=f"{spec.name} API",
        variable=f"{prefix}PORT",
    )

    # Probes (Kubernetes' gRPC probes speak plaintext) get health checking (and reflection of it),
    # and nothing else.
    health_server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 4096), _EXCLUSIVE_PORT]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
    if settings.reflection:  # so a reflection-based client (grpcurl, buf curl) can call it bare
        enable_reflection((HEALTH,), health_server, health_only=True)
    health_port = _listen(
        health_server,
        f"{settings.host}:{settings.health_port}",
        None,
        what=f"{spec.name} health",
        variable=f"{prefix}HEALTH_PORT",
    )

    await server.start()
    await health_server.start()
    for name in ("", LIVENESS, *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningService(
        spec,
        runtime,
        port,
        health_port,
        health_servicer,
        health_server,
        shedder,
        guard,
        metrics_endpoint,
    )
    running._tasks = [
        asyncio.create_task(_run_worker(f"{spec.name}.{w.__name__}", w)) for w in runtime._workers
    ]
    running._tasks.append(asyncio.create_task(runtime.leadership.run()))
    running._tasks.append(
        asyncio.create_task(
            watch_database(
                spec.name, health_servicer, names, db, settings.health_check_seconds, runtime.tracer
            )
        )
    )
    downstream = ", ".join(
        f"{name.removesuffix('_address')} at {getattr(settings, name)}"
        for name in type(settings).model_fields
        if name.endswith("_address")
    )
    scrape = (
        f", metrics on http://{settings.host}:{metrics_endpoint.port}/metrics"
        if metrics_endpoint is not None
        else ""
    )
    log.info(
        "%s serving on %s:%d (mutual TLS), health on %s:%d (plaintext)%s, %s%s",
        spec.name,
        settings.host,
        port,
        settings.host,
        health_port,
        scrape,
        db.engine.url.drivername,
        f"; calls {downstream}" if downstream else "",
    )
    if policy := settings.policy():
        log.info("%s runs with %s", spec.name, policy)
    return running


def _few_malloc_arenas() -> None:
    """glibc gives every thread that allocates its own malloc arena (up to 8 per core), which grpc's
    threads fill and never hand back: two arenas keep a service's RSS flat under load. Must run
    before any thread starts (the same as MALLOC_ARENA_MAX=2 in the environment)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX


def _migrations_in_a_child_process(service: str, *, check: bool) -> None:
    """Migrate with `python -m tools.migrate SERVICE` in a short-lived child (same environment, so
    the same settings), not in the server: alembic pulls in mako and pygments, ~8 MB that a
    long-lived process would keep for nothing. `check` (`<SVC>_MIGRATE_ON_START=false`): only
    verify that the database is not behind the code, else a server would report SERVING and fail
    every call on missing tables. The child explains a database it cannot use in one line, as
    the server would; the server then stops with the child's exit code."""
    command = [sys.executable, "-m", "tools.migrate", service, *(["--check"] if check else [])]
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise SystemExit(done.returncode)


def _quiet_garbage_collector() -> None:
    """Move what start-up made (modules, descriptors, compiled statements: a few hundred thousand
    objects that live as long as the process) out of the collector's sight, and let the youngest
    generation grow before it is swept: each RPC allocates a few hundred short-lived objects, and
    with the defaults a full collection walks every start-up object again and again, tens of
    milliseconds in the middle of calls. Reference counting still frees nearly everything at once."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def main(spec: ServiceSpec[S]) -> None:
    """Entry point of `python -m services.<name>`: serve until SIGINT or SIGTERM."""
    _few_malloc_arenas()
    try:
        settings = spec.settings_type()
    except pydantic.ValidationError:
        raise SystemExit(
            "\n".join(startup.refused_settings(spec.settings_type, spec.name))
        ) from None
    flush_logs = configure_logging(spec.name, settings.log_level, settings.log_format)
    for line in [
        *startup.mistyped_settings(spec.name, spec.settings_type),
        *startup.unknown_exporters(spec.name),
    ]:
        log.warning("%s", line)
    _ports_free_or_exit(spec.name, settings)  # before migrating: a clash is said at once
    if not settings.security.dev_pki:  # (a dev PKI is made at start: nothing to check yet)
        server_credentials(settings.security, spec.name)  # a bad certificate, said at once too
    # Migrate, or check that the migrate Job did, in a short-lived child process.
    _migrations_in_a_child_process(spec.name, check=not settings.migrate_on_start)
    settings = settings.model_copy(update={"migrate_on_start": False})

    async def serve() -> None:
        running = await start_service(spec, settings)
        _quiet_garbage_collector()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("%s shutting down (grace %.1fs)", spec.name, settings.grace_seconds)
        await running.stop()
        log.info("%s stopped", spec.name)
        flush_within(TELEMETRY_FLUSH_SECONDS, "log records", flush_logs)

    try:
        run(serve())
    except Exception as error:
        why = startup.explain(error, spec.name, settings)
        if why is None:
            raise
        raise SystemExit(why) from None


def run(main: Awaitable[None]) -> None:
    """Run a service (or anything measured beside one) on uvloop: libuv's event loop costs less CPU
    per call than asyncio's default loop, and grpc.aio runs on it unchanged."""
    uvloop.run(main)  # type: ignore[arg-type]


async def wait_for_wake(wake: asyncio.Event, seconds: float) -> None:
    """A worker's pause: until `wake` is set (new work) or `seconds` pass (retries), then re-arm."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), timeout=seconds)
    wake.clear()
