"""The processes a measurement runs: free ports, child processes, the echo ceilings and the suite as
`make up` runs it (also used by the chaos and observability tests)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import re
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
import grpc.aio
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from benchmarks import echo
from benchmarks.measure import Call, Monitor, memory_mb, without_ids

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("wallet", "gifting", "payout", "promotion")
PG_ADMIN_URL = os.environ.get(
    "COINS_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
CALL_TIMEOUT = 30.0
"""Deadline of every measured call: a hang shows as DEADLINE_EXCEEDED, never as a stuck run."""
CALLS_PER_CHANNEL = 16
"""In-flight calls per client channel (each its own HTTP/2 connection): 64 in flight use 4."""
LIFTED = str(10**12)

Metadata = tuple[tuple[str, str], ...]
T = TypeVar("T")


# ---------------------------------------------------------------- child processes


LISTEN_PORTS = (20_000, 32_000)
"""Where the benchmark's and tests' servers listen: below Linux's ephemeral range (32768-60999),
which outgoing connections (to PostgreSQL, between services) take ports from, so a port found free
here cannot be taken by a client before the server that was given it binds it."""


_PICK = random.Random()  # its own: a test that seeds the global generator must not steer ports
_GIVEN: set[int] = set()
"""Ports this process handed out: one not bound yet still looks free, and must not be given twice."""


def free_port() -> int:
    """A loopback port nothing listens on now, outside the ephemeral range (see LISTEN_PORTS),
    and never one this process gave before."""
    for _ in range(1000):
        port = _PICK.randrange(*LISTEN_PORTS)
        if port in _GIVEN:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port in {LISTEN_PORTS}")


def clean_environment() -> dict[str, str]:
    """This environment without the suite's own settings (the benchmark sets every one it needs)."""
    prefixes = ("COINS_", *(f"{name.upper()}_" for name in SERVICES))
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 15 s; returns the exit code."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout=15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
                return None
        return self.process.returncode


async def spawn(name: str, args: Sequence[str], env: dict[str, str], logs: Path) -> Child:
    log = logs / f"{name}.log"
    with log.open("ab") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            cwd=REPO,
            env=env,
            stdout=asyncio.subprocess.PIPE if name.startswith("echo") else sink,
            stderr=sink,
        )
    return Child(name, process, log)


def _channel_options() -> list[tuple[str, Any]]:
    # Each client channel its own connection (by default equal channels share one).
    return [("grpc.use_local_subchannel_pool", 1)]


def gateway_credentials(certs: Path, identity: str = "gateway") -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(),
        (certs / f"{identity}-key.pem").read_bytes(),
        (certs / f"{identity}.pem").read_bytes(),
    )


class Channels:
    """Client channels to one address, one per CALLS_PER_CHANNEL calls in flight."""

    def __init__(
        self, address: str, credentials: grpc.ChannelCredentials | None, count: int
    ) -> None:
        self.channels = [
            grpc.aio.secure_channel(address, credentials, options=_channel_options())
            if credentials is not None
            else grpc.aio.insecure_channel(address, options=_channel_options())
            for _ in range(count)
        ]

    def unary(
        self,
        method: str,
        request_type: type[Message] | None = None,
        response_type: type[Message] | None = None,
    ) -> list[grpc.aio.UnaryUnaryMultiCallable[Any, Any]]:
        return [
            channel.unary_unary(
                method,
                request_serializer=request_type.SerializeToString if request_type else None,
                response_deserializer=response_type.FromString if response_type else None,
            )
            for channel in self.channels
        ]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def channels_for(concurrency: int) -> int:
    return max(1, math.ceil(concurrency / CALLS_PER_CHANNEL))


def spread_calls(
    callables: Sequence[grpc.aio.UnaryUnaryMultiCallable[Any, Any]], concurrency: int
) -> Sequence[grpc.aio.UnaryUnaryMultiCallable[Any, Any]]:
    return callables[: channels_for(concurrency)]


def event_loop_mismatch(children: dict[str, Child]) -> str | None:
    """A warning when child processes loaded uvloop and the benchmark (its client, and the echoes
    through the same benchmarks.echo.run) does not run on it, or the other way round."""
    choice = echo.running_loop_name()
    loaded: list[str] = []
    not_loaded: list[str] = []
    for name, child in children.items():
        with contextlib.suppress(OSError):
            maps = Path(f"/proc/{child.pid}/maps").read_text()
            (loaded if "/uvloop/" in maps else not_loaded).append(name)
    if choice == "uvloop" and not_loaded:
        return f"WARNING: the client runs on uvloop; {', '.join(not_loaded)} did not load it"
    if choice != "uvloop" and loaded:
        return f"WARNING: {', '.join(loaded)} loaded uvloop; the client runs on {choice}"
    return None


# ---------------------------------------------------------------- the ceilings


@dataclass
class EchoFleet:
    """Echo B (answers) and echo A (forwards to B), per flavour, each a process of its own."""

    certs: Path
    logs: Path
    flavours: tuple[str, ...] = ("plain", "suite")
    children: dict[str, Child] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    async def _start(self, name: str, args: list[str]) -> None:
        port = self.ports[name]
        child = await spawn(
            name,
            ["-m", "benchmarks.echo", *args, "--port", str(port)],
            clean_environment(),
            self.logs,
        )
        self.children[name] = child
        assert child.process.stdout is not None
        try:
            line = await asyncio.wait_for(child.process.stdout.readline(), timeout=60)
        except TimeoutError:
            line = b""
        if line.split() != [echo.READY.encode(), str(port).encode()]:
            raise SystemExit(f"{name} did not start:\n{child.tail()}")

    async def start(self) -> None:
        """All at once, on ports chosen beforehand (A connects to B at its first call)."""
        starts = []
        for flavour in self.flavours:
            a, b = f"echo-{flavour}-a", f"echo-{flavour}-b"
            self.ports[a], self.ports[b] = free_port(), free_port()
            # suite flavour: B serves with the wallet's certificate, A with gifting's and reaches B
            # through gifting's service channel, as SendGift reaches the wallet.
            common = ["--flavour", flavour, "--certs", str(self.certs)]
            starts.append(self._start(b, [*common, "--identity", "wallet"]))
            forward = f"127.0.0.1:{self.ports[b]}"
            starts.append(self._start(a, [*common, "--identity", "gifting", "--forward", forward]))
        await asyncio.gather(*starts)

    def address(self, flavour: str, hops: int) -> str:
        which = "a" if hops == 2 else "b"
        return f"127.0.0.1:{self.ports[f'echo-{flavour}-{which}']}"

    def monitor(self, flavour: str) -> Monitor:
        return Monitor(
            {
                "echo-a": self.children[f"echo-{flavour}-a"].pid,
                "echo-b": self.children[f"echo-{flavour}-b"].pid,
            }
        )

    def died(self) -> list[str]:
        return [n for n, c in self.children.items() if c.process.returncode is not None]

    async def stop(self) -> None:
        for child in self.children.values():
            await child.stop()


@contextlib.asynccontextmanager
async def echo_fleet(
    certs: Path, logs: Path, flavours: tuple[str, ...] = ("plain", "suite")
) -> AsyncIterator[EchoFleet]:
    fleet = EchoFleet(certs, logs, flavours)
    try:
        await fleet.start()
        yield fleet
    finally:
        await fleet.stop()


ECHO_PAYLOAD = bytes(range(64))
"""About the size of a SendGiftRequest."""
FLAVOUR_LABEL = {"plain": "plain", "suite": "mTLS+OTel"}


def echo_case(flavour: str, hops: int) -> str:
    return f"echo {hops}-hop {FLAVOUR_LABEL[flavour]}"


class EchoClient:
    """The load generator's side of an echo: the gateway's certificate and a user token in the
    suite flavour, nothing in the plain one."""

    def __init__(
        self,
        fleet: EchoFleet,
        flavour: str,
        hops: int,
        certs: Path,
        token: Metadata,
        max_concurrency: int,
    ) -> None:
        credentials = gateway_credentials(certs) if flavour == "suite" else None
        self.channels = Channels(
            fleet.address(flavour, hops), credentials, channels_for(max_concurrency)
        )
        self.calls = self.channels.unary(echo.METHOD)
        # The suite flavour carries a user token, as every user call to the suite does.
        self.metadata: Metadata | None = token if flavour == "suite" else None

    def call(self, concurrency: int) -> Call:
        calls = spread_calls(self.calls, concurrency)
        n, metadata = len(calls), self.metadata

        def make(i: int) -> Awaitable[Any]:
            return calls[i % n](ECHO_PAYLOAD, metadata=metadata, timeout=CALL_TIMEOUT)

        return make


# ---------------------------------------------------------------- the suite


async def postgres_reachable() -> str | None:
    """None when PostgreSQL answers at PG_ADMIN_URL, else why not."""
    try:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    await conn.close()
    return None


async def postgres_settings(*names: str, admin_url: str = PG_ADMIN_URL) -> str:
    """The server's `names` as `name=value, ...`: the report says what the figures ran on (this
    machine's PostgreSQL runs with autovacuum off, so dead row versions stay until a statement
    prunes its page; see runtime.migrations.leave_room_for_updates)."""
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        values = [await conn.fetchval("SELECT current_setting($1)", name) for name in names]
        return ", ".join(f"{name}={value}" for name, value in zip(names, values, strict=True))
    finally:
        await conn.close()


async def pg_admin(statement: str, admin_url: str = PG_ADMIN_URL) -> None:
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


_LOG_LINE = re.compile(
    r" (?P<level>CRITICAL|ERROR|WARNING)\s+\S+\s+(?P<logger>\S+) trace=\S+ (?P<message>.*)$"
)
"""A line of the services' log format (runtime.telemetry.configure_logging)."""


@dataclass
class SuiteProcesses:
    """The four services as `make up` runs them: `python -m services.<name>`, one process each."""

    backend: str
    tmp: Path
    certs: Path
    logs: Path
    children: dict[str, Child] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    health_ports: dict[str, int] = field(default_factory=dict)
    databases: list[str] = field(default_factory=list)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    pg_admin_url: str = PG_ADMIN_URL
    """The PostgreSQL server the services' databases are made on (the chaos test brings its own)."""
    settings: dict[str, str] = field(default_factory=dict)
    """Extra environment settings (after the benchmark's own)."""
    env: dict[str, str] = field(default_factory=dict)
    replicas: int = 1
    """Processes per service, each on ports of its own, all on the service's one database;
    callers spread their calls over them (an `ipv4:` list of every replica's address)."""
    autovacuum: bool | None = None
    """Whether the PostgreSQL server vacuums by itself (None: not asked yet); see `tidy`."""

    def instances(self, names: Iterable[str] = SERVICES) -> list[str]:
        """Every process: `wallet`, and `wallet.2`... for further replicas."""
        return [
            name if replica == 1 else f"{name}.{replica}"
            for name in names
            for replica in range(1, self.replicas + 1)
        ]

    def instance_environment(self, instance: str) -> dict[str, str]:
        prefix = instance.split(".")[0].upper()
        return self.env | {
            f"{prefix}_PORT": str(self.ports[instance]),
            f"{prefix}_HEALTH_PORT": str(self.health_ports[instance]),
        }

    def channel_options(self, name: str) -> list[tuple[str, Any]]:
        """What a client channel to `address(name)` needs: calls spread over the replicas, whose
        certificates are checked against the service's name (a list of addresses has none)."""
        if self.replicas == 1:
            return []
        return [("grpc.lb_policy_name", "round_robin"), ("grpc.default_authority", name)]

    def environment(self, urls: dict[str, str]) -> dict[str, str]:
        env = clean_environment()
        env |= {
            "COINS_CERTS_DIR": str(self.certs),
            "COINS_DEV_PKI": "false",
            "PAYOUT_PROCESSOR_WEBHOOK_SECRET": os.urandom(32).hex(),  # off a dev PKI: its own
            # The abuse limits would measure themselves: lift them.
            "COINS_USER_RATE_PER_SECOND": "1e9",
            "COINS_USER_RATE_BURST": str(10**9),
            "COINS_CALLER_RATE_PER_SECOND": "1e9",
            "COINS_CALLER_RATE_BURST": str(10**9),
            "GIFTING_WALLET_ADDRESS": self.address("wallet"),
            "GIFTING_PAYOUT_ADDRESS": self.address("payout"),
            "PROMOTION_WALLET_ADDRESS": self.address("wallet"),
        }
        for limit in ("HOURLY_COINS", "DAILY_COINS", "HOURLY_MINOR", "DAILY_MINOR"):
            env[f"WALLET_LIMIT_{limit}"] = LIFTED
        env["WALLET_LIMIT_PAYMENT_METHOD_DAILY_MINOR"] = LIFTED
        for name in SERVICES:
            prefix = name.upper()
            env[f"{prefix}_HOST"] = "127.0.0.1"
            env[f"{prefix}_DATA_DIR"] = str(self.tmp / "data")
            env[f"{prefix}_DATABASE_URL"] = urls.get(name, "")
        return env | self.settings

    async def start(self) -> None:
        for instance in self.instances():
            self.ports.setdefault(instance, free_port())
            self.health_ports.setdefault(instance, free_port())
        urls: dict[str, str] = {}
        if self.backend == "postgres":
            run = self.run
            base = self.pg_admin_url.rsplit("/", 1)[0].replace(
                "postgresql://", "postgresql+asyncpg://", 1
            )
            for name in SERVICES:
                database = f"coins_bench_{name}_{run}"
                await pg_admin(f'CREATE DATABASE "{database}"', self.pg_admin_url)
                self.databases.append(database)
                urls[name] = f"{base}/{database}"
        self.env = self.environment(urls)
        for name in SERVICES:
            # The first replica migrates the database; the others start on it once it serves.
            first, *others = self.instances([name])
            await self.restart(first)
            if others:
                await self.wait_serving([first])
            for instance in others:
                await self.restart(instance)
        await self.wait_serving()

    async def restart(self, instance: str) -> None:
        """Start a service's process (again, after it was killed), with the same settings."""
        service = instance.split(".")[0]
        self.children[instance] = await spawn(
            instance, ["-m", f"services.{service}"], self.instance_environment(instance), self.logs
        )

    async def wait_serving(self, names: Iterable[str] | None = None) -> None:
        deadline = time.monotonic() + 90
        pending = set(self.instances() if names is None else names)
        while pending:
            for name in sorted(pending):
                child = self.children[name]
                if child.process.returncode is not None:
                    raise SystemExit(
                        f"{name} exited with {child.process.returncode} while starting:\n"
                        f"{child.tail()}"
                    )
                if await serving(self.health_ports[name]):
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}\n{self.children[n].tail()}" for n in pending)
                raise SystemExit(f"not SERVING after 90s: {sorted(pending)}\n{tails}")
            if pending:
                await asyncio.sleep(0.2)

    def address(self, name: str) -> str:
        """Where a service listens: its one process, or the list of its replicas."""
        if self.replicas == 1:
            return f"127.0.0.1:{self.ports[name]}"
        return "ipv4:" + ",".join(f"127.0.0.1:{self.ports[i]}" for i in self.instances([name]))

    def monitor(self) -> Monitor:
        return Monitor(
            {name: self.children[name].pid for name in SERVICES},
            postgres=f"_{self.run}" if self.backend == "postgres" else None,
        )

    def died(self) -> list[str]:
        return [n for n, c in self.children.items() if c.process.returncode is not None]

    def event_loop_mismatch(self) -> str | None:
        return event_loop_mismatch(self.children)

    def memory(self) -> dict[str, tuple[float, float]]:
        return {name: memory_mb(child.pid) for name, child in self.children.items()}

    def log_problems(self) -> tuple[int, Counter[str], int]:
        """What the services logged at ERROR or above: how many lines, the distinct problems
        (message and the exception of its traceback, ids blanked) with their counts; and how many
        warnings."""
        errors, warnings = 0, 0
        problems: Counter[str] = Counter()
        for name, child in self.children.items():
            try:
                lines = child.log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            message: str | None = None
            in_traceback = False
            for line in lines:
                if in_traceback:
                    if not line.strip() or line[0].isspace() or line.startswith("Traceback"):
                        continue
                    if line.startswith(("During handling", "The above exception")):
                        continue
                    problems[
                        f"{name}: {message or '(no message)'} -> {without_ids(line)[:200]}"
                    ] += 1
                    message, in_traceback = None, False
                    continue
                logged = _LOG_LINE.search(line)
                if logged and logged["level"] in ("ERROR", "CRITICAL"):
                    errors += 1
                    if message is not None:
                        problems[f"{name}: {message}"] += 1
                    message = without_ids(f"{logged['logger']}: {logged['message']}")[:200]
                elif line.startswith("Traceback"):
                    in_traceback = True
                elif logged and logged["level"] == "WARNING":
                    warnings += 1
            if message is not None:
                problems[f"{name}: {message}"] += 1
        return errors, problems, warnings

    async def tidy(self) -> None:
        """Between cases, on a PostgreSQL server that runs without autovacuum (this machine's), VACUUM
        (ANALYZE) the run's databases, as autovacuum would have in the meantime: each case then
        starts from a database as it is served, not from every earlier case's dead row versions,
        which charged the later cases (the hot creator's, settlement) for the earlier ones."""
        if self.backend != "postgres" or not self.databases:
            return
        if self.autovacuum is None:
            self.autovacuum = "autovacuum=on" in await postgres_settings(
                "autovacuum", admin_url=self.pg_admin_url
            )
        if self.autovacuum:
            return
        base = self.pg_admin_url.rsplit("/", 1)[0]
        for database in self.databases:
            conn = await asyncpg.connect(f"{base}/{database}", timeout=10)
            try:
                await conn.execute("VACUUM (ANALYZE)")
            finally:
                await conn.close()

    async def stop(self) -> None:
        for instance in self.instances(("gifting", "promotion", "payout", "wallet")):
            if instance in self.children:
                self.exit_codes[instance] = await self.children[instance].stop()
        for database in self.databases:
            with contextlib.suppress(Exception):
                await pg_admin(
                    f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)', self.pg_admin_url
                )


async def serving(port: int) -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            response = await check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


@contextlib.asynccontextmanager
async def suite_processes(
    backend: str, tmp: Path, certs: Path, logs: Path
) -> AsyncIterator[SuiteProcesses]:
    suite = SuiteProcesses(backend, tmp, certs, logs)
    try:
        await suite.start()
        yield suite
    finally:
        await suite.stop()


async def bounded(concurrency: int, jobs: Iterable[Awaitable[T]]) -> list[T]:
    gate = asyncio.Semaphore(concurrency)

    async def run(job: Awaitable[T]) -> T:
        async with gate:
            return await job

    return await asyncio.gather(*(run(job) for job in jobs))
