"""Performance of the suite against its ceilings, measured in the same run, one after the other.

For each backend (SQLite, PostgreSQL) the benchmark

1. starts the CEILINGS, grpc.aio echo servers in processes of their own (benchmarks.echo): 1 hop
   (client -> echo) and 2 hops (client -> echo A -> echo B), each plaintext without telemetry and
   "suite-equivalent" (the suite's mutual TLS, its OpenTelemetry interceptors, its service channels),
   and drives them closed-loop at each concurrency;
2. stops them and starts the SUITE as `make up` runs it (`python -m services.<name>`, one process
   each) on fresh ports, a fresh data dir or fresh PostgreSQL databases, with the abuse limits lifted
   (the benchmark measures throughput, not the limits); funds senders through the wallet as the
   gateway; then drives SendGift spread over many creators and to one hot creator (sampling the
   credit lag) and GetBalance, closed-loop at each concurrency; then SendGift open-loop at half its
   maximum rate and at 80% of it (credit lag); last the settlement path (BatchCreditDiamonds as
   gifting), closed-loop, whose bulk writes would leave PostgreSQL vacuuming under the cases after it;
3. stops the suite and drives the 2-hop mTLS+OTel echo chain open-loop at the same rate as the gifts.

It prints, per backend, the throughput, latency and CPU per call of every process, the peak memory of
each service, and the RATIOS the performance targets are stated in, each marked PASS or MISS. It exits
non-zero when any call fails, a sampled gift is never credited, a process dies or a service logs an
error: the benchmark itself is checked in CI with `--smoke` (no timing assertions).

Run: .venv/bin/python -m benchmarks.perf [--backend sqlite|postgres|both] [--duration 8]
     [--concurrency 16,64] [--batch 500] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import itertools
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
import grpc.aio
from google.protobuf.message import Message
from google.type import date_pb2
from grpc_health.v1 import health_pb2

from benchmarks import echo
from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from coins.wallet.v1 import wallet_pb2
from runtime import pki
from runtime.auth import TokenIssuer, token_metadata
from runtime.config import SecuritySettings
from runtime.status import retry_info

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("wallet", "gifting", "payout", "promotion")
PG_ADMIN_URL = os.environ.get(
    "COINS_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
CALL_TIMEOUT = 30.0
"""Deadline of every measured call: a hang shows as DEADLINE_EXCEEDED, never as a stuck run."""
CALLS_PER_CHANNEL = 16
"""In-flight calls per client channel (each its own HTTP/2 connection): 64 in flight use 4."""
PACKAGE = "us-web-17500"
PAYMENT_TOKEN = "tok_visa"
LIFTED = str(10**12)

Metadata = tuple[tuple[str, str], ...]
T = TypeVar("T")


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Options:
    backends: tuple[str, ...]
    concurrency: tuple[int, ...]
    duration: float
    warmup: float
    batch: int
    senders: int
    creators: int
    lag_every: int
    lag_max_pending: int
    lag_poll_seconds: float
    drain_seconds: float
    smoke: bool
    keep: bool = False


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.perf",
        description="The suite against its gRPC ceilings: throughput, latency, CPU, memory, ratios.",
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds measured per case")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before each window")
    parser.add_argument("--concurrency", default=None, help="calls in flight, e.g. 16,64")
    parser.add_argument("--batch", type=int, default=None, help="credits per BatchCreditDiamonds")
    parser.add_argument("--senders", type=int, default=None, help="funded viewers sending gifts")
    parser.add_argument("--creators", type=int, default=None, help="creators the gifts spread over")
    parser.add_argument(
        "--lag-every", type=int, default=10, help="sample the credit lag of 1 gift in N"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every case for about a second at 4 in flight, both backends: checks the benchmark "
        "runs and that no call fails (no timing assertions)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the run's folder (service logs, SQLite files)"
    )
    args = parser.parse_args(argv)
    smoke = bool(args.smoke)
    concurrency = (
        tuple(int(c) for c in args.concurrency.split(",") if c.strip())
        if args.concurrency
        else ((4,) if smoke else (16, 64))
    )
    if not concurrency or min(concurrency) < 1:
        parser.error("--concurrency takes positive integers, e.g. 16,64")
    backend = args.backend or "both"
    return Options(
        backends=("sqlite", "postgres") if backend == "both" else (backend,),
        concurrency=concurrency,
        duration=args.duration if args.duration is not None else (0.6 if smoke else 8.0),
        warmup=args.warmup if args.warmup is not None else (0.2 if smoke else 2.0),
        batch=args.batch if args.batch is not None else (50 if smoke else 500),
        senders=args.senders or (16 if smoke else 256),
        creators=args.creators or (20 if smoke else 200),
        lag_every=max(1, args.lag_every),
        lag_max_pending=8,
        lag_poll_seconds=0.015,
        drain_seconds=20.0 if smoke else 60.0,
        smoke=smoke,
        keep=bool(args.keep),
    )


# ---------------------------------------------------------------- processes: CPU and memory


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB (MiB), from /proc/PID/status."""
    values = {"VmRSS": 0.0, "VmHWM": 0.0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


_OTHER_SESSION = re.compile(r"\(\d+\)|\[local\]|autovacuum worker|walsender")


def postgres_pids(databases_tag: str) -> list[int]:
    """The PostgreSQL processes working for the run: the sessions (and autovacuum workers) of its
    databases, whose names contain `databases_tag`, and the shared server processes (postmaster,
    checkpointer, WAL and background writers). Other databases' sessions (a test run) are not."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path(f"/proc/{entry}/comm").read_text().strip() != "postgres":
                continue
            title = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if databases_tag in title or not _OTHER_SESSION.search(title):
                found.append(int(entry))
    return found


def machine_busy_seconds() -> float:
    """CPU time every process on the machine has used (all CPUs), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # Interrupt time is left out: the kernel's loopback networking for the run's own calls is
    # accounted there, not to any process. Steal (other virtual machines) is other work.
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (values + [0] * 8)[:8]
    return (user + nice + system + steal) / CLK_TCK


Snapshot = dict[str, dict[int, float]]
MACHINE = "machine"
"""The snapshot entry of the whole machine: what it used beyond the named processes is other work
(a test run, a build) that makes the figures unreliable."""
BUSY_THRESHOLD = 0.10
"""Other work above this share of the machine's CPUs during a window marks the case."""


@dataclass
class Monitor:
    """CPU time of the processes a case involves: the client (this process), the servers, and
    PostgreSQL's processes taken together."""

    pids: dict[str, int]
    postgres: str | None = None
    """The tag in the names of the run's PostgreSQL databases (None: not on PostgreSQL)."""

    def snapshot(self) -> Snapshot:
        snap: Snapshot = {MACHINE: {0: machine_busy_seconds()}}
        snap["client"] = {os.getpid(): cpu_seconds(os.getpid()) or 0.0}
        for name, pid in self.pids.items():
            snap[name] = {pid: cpu_seconds(pid) or 0.0}
        if self.postgres:
            snap["postgres"] = {
                pid: cpu_seconds(pid) or 0.0 for pid in postgres_pids(self.postgres)
            }
        return snap

    @staticmethod
    def used_ms(before: Snapshot, after: Snapshot) -> dict[str, float]:
        """CPU milliseconds per name between two snapshots (processes born in between from 0)."""
        return {
            name: 1000 * sum(t - before.get(name, {}).get(pid, 0.0) for pid, t in pids.items())
            for name, pids in after.items()
        }


# ---------------------------------------------------------------- measurement


@dataclass
class Lag:
    """Credit lag samples of one case: SendGift's answer -> GetGift reads CREDITED."""

    lags: list[float] = field(default_factory=list)
    uncredited: int = 0
    polls: int = 0
    poll_seconds: float = 0.0
    drained_after: float | None = None
    """Seconds after the window closed until the case's last gift was credited (its backlog)."""


@dataclass
class Result:
    case: str
    group: str
    load: str
    """How it was driven: `16` calls in flight (closed loop) or `250/s` (open loop)."""
    concurrency: int | None
    offered_rate: float | None
    window: float
    completed: int
    latencies: list[float]
    errors: Counter[str]
    cpu_ms: dict[str, float]
    items_per_call: int = 1
    lag: Lag | None = None
    closed_at: float = 0.0
    """time.perf_counter() when the window closed."""
    shed: int = 0
    """Calls the suite refused at once, as OVERLOADED or as streams beyond a connection's limit
    (expected only in the burst cases)."""
    unsent: int = 0
    """Open loop: arrivals the load generator dropped because its queue was full (its calls wait
    on its side once every connection has as many streams open as the server allows)."""

    @property
    def throughput(self) -> float:
        return self.completed / self.window if self.window > 0 else 0.0

    @property
    def items_per_second(self) -> float:
        return self.throughput * self.items_per_call

    def quantile(self, q: float) -> float | None:
        return quantile(self.latencies, q)

    @property
    def other_share(self) -> float:
        """The share of the machine's CPUs other processes used during the window."""
        if MACHINE not in self.cpu_ms or self.window <= 0:
            return 0.0
        ours = sum(ms for name, ms in self.cpu_ms.items() if name != MACHINE)
        capacity = 1000 * self.window * (os.cpu_count() or 1)
        return max(0.0, self.cpu_ms[MACHINE] - ours) / capacity

    @property
    def busy(self) -> bool:
        return self.other_share > BUSY_THRESHOLD

    def cpu_per_call(self, name: str) -> float | None:
        if name not in self.cpu_ms or not self.completed:
            return None
        return self.cpu_ms[name] / self.completed


def quantile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of values; sorts them in place."""
    if not values:
        return None
    values.sort()
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


_IDS = re.compile(r"\b[0-9a-f]{16,}\b")
_LOG_LINE = re.compile(
    r" (?P<level>CRITICAL|ERROR|WARNING)\s+\S+\s+(?P<logger>\S+) trace=\S+ (?P<message>.*)$"
)
"""A line of the services' log format (runtime.telemetry.configure_logging)."""


def _blank(text: str) -> str:
    """`text` with incident, trace and record ids blanked, so that equal problems count as one."""
    return _IDS.sub("<id>", text.strip())


def describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        details = (error.details() or "").replace("\n", " ")
        return f"{error.code().name}: {_blank(details)[:160]}"
    return f"{type(error).__name__}: {_blank(str(error))[:160]}"


@dataclass(frozen=True)
class Timing:
    warmup: float
    duration: float
    drain: float


Call = Callable[[int], Awaitable[Any]]
OnAnswer = Callable[[int, Any, float], None]


async def _drain(
    tasks: Iterable[asyncio.Future[Any]], seconds: float, errors: Counter[str]
) -> None:
    """Let the calls in flight finish; a call still running after `seconds` is a hang."""
    pending = [t for t in tasks if not t.done()]
    if not pending:
        return
    _, still = await asyncio.wait(pending, timeout=seconds)
    for task in still:
        task.cancel()
    if still:
        errors[f"HANG: {len(still)} calls still in flight {seconds:.0f}s after the window"] += 1
    await asyncio.gather(*pending, return_exceptions=True)


def _pause_after(error: Exception) -> float:
    """How long a caller waits before its next call after a failed one: the RetryInfo delay when
    the service sent one (OVERLOADED), as a well-behaved client does; else 5 ms. Calling again at
    once would measure a storm of refusals (each a 500-credit batch sent and parsed for nothing)."""
    if isinstance(error, grpc.aio.AioRpcError):
        delay = retry_info(error)
        if delay is not None:
            return delay.retry_delay.ToTimedelta().total_seconds()
    return 0.005


async def closed_loop(
    case: str,
    group: str,
    concurrency: int,
    call: Call,
    *,
    timing: Timing,
    monitor: Monitor,
    on_answer: OnAnswer | None = None,
    items_per_call: int = 1,
) -> Result:
    """`concurrency` callers, each calling again as soon as its call returns, for the warm-up then
    the measured window. Throughput counts the calls that complete inside the window; latency is
    every call started inside it (the ones finishing after it included)."""
    counter = itertools.count()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    window = [math.inf, math.inf]
    completed = 0
    running = True
    enough = asyncio.Event()

    async def caller() -> None:
        nonlocal completed
        while running:
            i = next(counter)
            began = time.perf_counter()
            try:
                answer = await call(i)
            except Exception as error:
                errors[describe(error)] += 1
                enough.set()
                await asyncio.sleep(_pause_after(error))
                continue
            ended = time.perf_counter()
            if window[0] <= began <= window[1]:
                latencies.append(ended - began)
            if window[0] <= ended <= window[1]:
                completed += 1
                if completed >= concurrency:
                    enough.set()
            if on_answer is not None:
                on_answer(i, answer, ended)

    tasks = [asyncio.create_task(caller()) for _ in range(concurrency)]
    await asyncio.sleep(timing.warmup)
    before = monitor.snapshot()
    window[0] = time.perf_counter()
    await asyncio.sleep(timing.duration)
    # Calls as long as the window (big batches on a slow path): extend it until every caller has
    # completed one, up to 4x, so that the figure is not a count of a handful of calls.
    if completed < concurrency and not errors:
        enough.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(enough.wait(), timeout=3 * timing.duration)
    window[1] = time.perf_counter()
    after = monitor.snapshot()
    running = False
    await _drain(tasks, timing.drain, errors)
    return Result(
        case,
        group,
        str(concurrency),
        concurrency,
        None,
        window[1] - window[0],
        completed,
        latencies,
        errors,
        Monitor.used_ms(before, after),
        items_per_call,
        closed_at=window[1],
    )


async def open_loop(
    case: str,
    group: str,
    rate: float,
    call: Call,
    *,
    timing: Timing,
    monitor: Monitor,
    seed: int,
    on_answer: OnAnswer | None = None,
    max_outstanding: int = 4096,
) -> Result:
    """Poisson arrivals at `rate` per second, each a call of its own whatever the others do.
    Latency runs from the arrival's scheduled time (a late client counts against the result, never
    hides it). The same seed gives the same arrivals, so two cases see the same load."""
    rng = random.Random(seed)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    tasks: set[asyncio.Task[None]] = set()
    completed = 0
    shed = 0
    start = time.perf_counter()
    opens, closes = start + timing.warmup, start + timing.warmup + timing.duration

    async def arrival(i: int, scheduled: float) -> None:
        nonlocal completed
        try:
            answer = await call(i)
        except Exception as error:
            errors[describe(error)] += 1
            return
        ended = time.perf_counter()
        if opens <= scheduled <= closes:
            latencies.append(ended - scheduled)
        if opens <= ended <= closes:
            completed += 1
        if on_answer is not None:
            on_answer(i, answer, ended)

    snapshots: list[Snapshot] = []

    async def sample_cpu() -> None:
        await asyncio.sleep(max(0.0, opens - time.perf_counter()))
        snapshots.append(monitor.snapshot())
        await asyncio.sleep(max(0.0, closes - time.perf_counter()))
        snapshots.append(monitor.snapshot())

    sampler = asyncio.create_task(sample_cpu())
    i = 0
    due = start
    while due < closes:
        now = time.perf_counter()
        while due <= now and due < closes:
            if len(tasks) < max_outstanding:
                task = asyncio.create_task(arrival(i, due))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif due >= opens:
                shed += 1
            i += 1
            due += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, min(due, closes) - time.perf_counter()))
    await sampler
    await _drain(list(tasks), timing.drain, errors)
    if shed:
        errors[f"OVERLOAD: {shed} arrivals shed with {max_outstanding} calls outstanding"] += 1
    return Result(
        case,
        group,
        f"{rate:.0f}/s",
        None,
        rate,
        closes - opens,
        completed,
        latencies,
        errors,
        Monitor.used_ms(snapshots[0], snapshots[1]),
        closed_at=closes,
        unsent=shed,
    )


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


async def _pg_admin(statement: str, admin_url: str = PG_ADMIN_URL) -> None:
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


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
                await _pg_admin(f'CREATE DATABASE "{database}"', self.pg_admin_url)
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
                if await _serving(self.health_ports[name]):
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
                    problems[f"{name}: {message or '(no message)'} -> {_blank(line)[:200]}"] += 1
                    message, in_traceback = None, False
                    continue
                logged = _LOG_LINE.search(line)
                if logged and logged["level"] in ("ERROR", "CRITICAL"):
                    errors += 1
                    if message is not None:
                        problems[f"{name}: {message}"] += 1
                    message = _blank(f"{logged['logger']}: {logged['message']}")[:200]
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
                await _pg_admin(
                    f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)', self.pg_admin_url
                )


async def _serving(port: int) -> bool:
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


class SuiteClient:
    """The load generator's side of the suite: the gateway (wallet, gifting, with user tokens) and
    gifting's certificate for payout's internal settlement RPC."""

    def __init__(self, suite: SuiteProcesses, options: Options, issuer: TokenIssuer) -> None:
        self.options = options
        count = channels_for(max(options.concurrency))
        gateway = gateway_credentials(suite.certs)
        self._channels = [
            Channels(suite.address("wallet"), gateway, count),
            Channels(suite.address("gifting"), gateway, count),
            Channels(suite.address("payout"), gateway_credentials(suite.certs, "gifting"), count),
        ]
        wallet, gifting, payout = self._channels
        self.open_account = wallet.unary(
            "/coins.wallet.v1.WalletService/OpenAccount",
            wallet_pb2.OpenAccountRequest,
            wallet_pb2.OpenAccountResponse,
        )[0]
        self.purchase = wallet.unary(
            "/coins.wallet.v1.WalletService/PurchaseCoins",
            wallet_pb2.PurchaseCoinsRequest,
            wallet_pb2.PurchaseCoinsResponse,
        )[0]
        self.get_balance = wallet.unary(
            "/coins.wallet.v1.WalletService/GetBalance",
            wallet_pb2.GetBalanceRequest,
            wallet_pb2.GetBalanceResponse,
        )
        self.list_gifts = gifting.unary(
            "/coins.gifting.v1.GiftingService/ListGifts",
            gifting_pb2.ListGiftsRequest,
            gifting_pb2.ListGiftsResponse,
        )[0]
        self.send_gift = gifting.unary(
            "/coins.gifting.v1.GiftingService/SendGift",
            gifting_pb2.SendGiftRequest,
            gifting_pb2.SendGiftResponse,
        )
        self.start_live = gifting.unary(
            "/coins.gifting.v1.GiftingService/StartLive",
            gifting_pb2.StartLiveRequest,
            gifting_pb2.StartLiveResponse,
        )[0]
        self.get_gift = gifting.unary(
            "/coins.gifting.v1.GiftingService/GetGift",
            gifting_pb2.GetGiftRequest,
            gifting_pb2.GetGiftResponse,
        )[0]
        batch_credit = "/coins.payout.v1.PayoutService/BatchCreditDiamonds"
        self.batch_credit = payout.unary(batch_credit)
        self.batch_credit_checked = payout.unary(
            batch_credit, None, payout_pb2.BatchCreditDiamondsResponse
        )[0]
        run = uuid.uuid4().hex[:6]
        self.senders = [f"viewer-{run}-{i}" for i in range(options.senders)]
        self.creators = [f"creator-{run}-{i}" for i in range(options.creators)]
        self.hot_creator = f"creator-{run}-hot"
        # Tokens the identity provider would give the gateway: minted once, valid for the run.
        ttl = dt.timedelta(minutes=55)
        users = [*self.senders, *self.creators, self.hot_creator]
        self.tokens: dict[str, Metadata] = {
            user: tuple(token_metadata(issuer.mint(user, ttl=ttl))) for user in users
        }
        self._ids = itertools.count()
        self._batches = itertools.count()
        """Batch tags: 6 hex digits after the run's 6 (a tag must keep its 12 bytes)."""
        self._run = run
        self.gift_id = "rose"

    def request_id(self, kind: str) -> str:
        return f"bench-{kind}-{self._run}-{next(self._ids)}"

    async def close(self) -> None:
        for channels in self._channels:
            await channels.close()

    async def prepare(self) -> str:
        """Open every account, fund the senders (one PURCHASE each), pick the cheapest gift."""
        birth = date_pb2.Date(year=1990, month=5, day=17)

        async def open_account(user: str) -> None:
            await self.open_account(
                wallet_pb2.OpenAccountRequest(
                    request_id=self.request_id("open"),
                    user_id=user,
                    country_code="US",
                    birth_date=birth,
                ),
                metadata=self.tokens[user],
                timeout=CALL_TIMEOUT,
            )

        async def fund(user: str) -> None:
            await self.purchase(
                wallet_pb2.PurchaseCoinsRequest(
                    request_id=self.request_id("buy"),
                    user_id=user,
                    package_id=PACKAGE,
                    payment_token=PAYMENT_TOKEN,
                ),
                metadata=self.tokens[user],
                timeout=CALL_TIMEOUT,
            )

        async def start_live(creator: str) -> None:
            await self.start_live(
                gifting_pb2.StartLiveRequest(
                    request_id=self.request_id("live"),
                    creator_id=creator,
                    title="benchmark",
                    live_id=f"live-{creator}",
                ),
                metadata=self.tokens[creator],
                timeout=CALL_TIMEOUT,
            )

        # Creators get wallet accounts too: they are users of the platform like any other; each
        # is live (gifts go to the creator's open LIVE).
        await bounded(16, (open_account(u) for u in self.tokens))
        await bounded(16, (start_live(c) for c in [*self.creators, self.hot_creator]))
        await bounded(16, (fund(u) for u in self.senders))
        catalog = await self.list_gifts(
            gifting_pb2.ListGiftsRequest(page_size=100),
            metadata=self.tokens[self.senders[0]],
            timeout=CALL_TIMEOUT,
        )
        if not catalog.gifts:
            raise SystemExit("the gift catalog is empty")
        cheapest = min(catalog.gifts, key=lambda g: g.coins)
        rose = next((g for g in catalog.gifts if g.gift_id == "rose"), cheapest)
        self.gift_id = rose.gift_id
        await self.check_settlement(self.options.batch)
        return f"{rose.gift_id} ({rose.coins} coin{'s' if rose.coins != 1 else ''})"

    def gift_call(self, concurrency: int, *, hot: bool) -> Call:
        calls = spread_calls(self.send_gift, concurrency)
        n = len(calls)
        senders, creators = self.senders, self.creators
        s, c = len(senders), len(creators)
        tokens = [self.tokens[u] for u in senders]
        hot_creator, gift_id, prefix = self.hot_creator, self.gift_id, f"bench-gift-{self._run}-"
        ids = self._ids

        def make(i: int) -> Awaitable[Any]:
            creator = hot_creator if hot else creators[i % c]
            request = gifting_pb2.SendGiftRequest(
                request_id=f"{prefix}{next(ids)}",
                sender_id=senders[i % s],
                creator_id=creator,
                gift_id=gift_id,
                count=1,
                live_id=f"live-{creator}",
            )
            return calls[i % n](request, metadata=tokens[i % s], timeout=CALL_TIMEOUT)

        return make

    def balance_call(self, concurrency: int) -> Call:
        calls = spread_calls(self.get_balance, concurrency)
        n = len(calls)
        requests = [(wallet_pb2.GetBalanceRequest(user_id=u), self.tokens[u]) for u in self.senders]
        s = len(requests)

        def make(i: int) -> Awaitable[Any]:
            request, metadata = requests[i % s]
            return calls[i % n](request, metadata=metadata, timeout=CALL_TIMEOUT)

        return make

    def settlement_template(self, batch: int) -> bytes:
        """A serialized BatchCreditDiamondsRequest of `batch` credits, spread over the creators,
        whose request ids read `gift:` + BATCH_TAG + 20 hex digits: each call replaces the tag with
        one of its own (12 hex digits), which makes 32-hex-digit ids unique to the run, for about
        20 microseconds per batch instead of a millisecond of protobuf building."""
        creators = self.creators
        return payout_pb2.BatchCreditDiamondsRequest(
            requests=[
                payout_pb2.CreditDiamondsRequest(
                    request_id=f"gift:{BATCH_TAG.decode()}{k:020x}",
                    creator_id=creators[k % len(creators)],
                    coins=2,
                    reference="bench-settlement",
                )
                for k in range(batch)
            ]
        ).SerializeToString()

    def batch_bytes(self, template: bytes) -> bytes:
        return template.replace(BATCH_TAG, f"{self._run}{next(self._batches):06x}".encode())

    async def check_settlement(self, batch: int) -> None:
        """One batch, its answer read: one response per credit, each 1 diamond."""
        request = self.batch_bytes(self.settlement_template(batch))
        answer = await self.batch_credit_checked(request, timeout=CALL_TIMEOUT)
        credited = [r.diamonds_credited for r in answer.responses]
        if credited != [1] * batch:
            raise SystemExit(
                f"BatchCreditDiamonds of {batch} credits of 2 coins answered {len(credited)} "
                f"responses crediting {sum(credited)} diamonds, not {batch} x 1"
            )

    def settlement_call(self, concurrency: int, batch: int) -> Call:
        """BatchCreditDiamonds as gifting's relay calls it: gifting's certificate, no user token,
        `batch` credits with gift-like request ids, spread over the creators. The answer is left
        unparsed (check_settlement reads one)."""
        calls = spread_calls(self.batch_credit, concurrency)
        n = len(calls)
        template = self.settlement_template(batch)
        tag, run, batches = BATCH_TAG, self._run, self._batches

        def make(i: int) -> Awaitable[Any]:
            request = template.replace(tag, f"{run}{next(batches):06x}".encode())
            return calls[i % n](request, timeout=CALL_TIMEOUT)

        return make


BATCH_TAG = b"~~~~~~~~~~~~"


class CreditLag:
    """Samples SendGift answers (1 in `every`, at most `max_pending` followed at once) and polls
    GetGift as the gateway for the sender, every `interval`, until the gift reads CREDITED.

    A lag is the time from the SendGift answer to the sending of the poll that first read CREDITED
    (so its resolution is the polling interval). The case's last gift is followed too, to the end:
    how long after the window its backlog was settled."""

    def __init__(
        self, client: SuiteClient, *, every: int, max_pending: int, interval: float
    ) -> None:
        self.client = client
        self.every, self.max_pending, self.interval = every, max_pending, interval
        self.pending: dict[str, tuple[float, Metadata]] = {}
        self.result = Lag()
        self.errors: Counter[str] = Counter()
        self.last: tuple[str, Metadata, float] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def on_answer(self, i: int, answer: Any, answered: float) -> None:
        gift = answer.sent_gift
        metadata = self.client.tokens[gift.sender_id]
        if self.last is None or answered >= self.last[2]:
            self.last = (gift.sent_gift_id, metadata, answered)
        if i % self.every == 0 and len(self.pending) < self.max_pending:
            if gift.credit_status == gifting_pb2.CREDIT_STATUS_CREDITED:
                self.result.lags.append(0.0)
            else:
                self.pending[gift.sent_gift_id] = (answered, metadata)

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    async def _credited(self, sent_gift_id: str, metadata: Metadata) -> bool:
        self.result.polls += 1
        try:
            answer = await self.client.get_gift(
                gifting_pb2.GetGiftRequest(sent_gift_id=sent_gift_id),
                metadata=metadata,
                timeout=CALL_TIMEOUT,
            )
        except Exception as error:
            self.errors[f"GetGift {describe(error)}"] += 1
            return False
        return bool(answer.sent_gift.credit_status == gifting_pb2.CREDIT_STATUS_CREDITED)

    async def _poll(self) -> None:
        started = time.perf_counter()
        while not self._stopping or self.pending:
            if self.pending:
                sent = time.perf_counter()
                batch = list(self.pending.items())
                done = await asyncio.gather(*(self._credited(g, md) for g, (_, md) in batch))
                for (gift, (answered, _)), credited in zip(batch, done, strict=True):
                    if credited:
                        self.result.lags.append(max(0.0, sent - answered))
                        del self.pending[gift]
            await asyncio.sleep(self.interval)
        self.result.poll_seconds = time.perf_counter() - started

    async def finish(self, window_closed: float, seconds: float) -> Lag:
        """Stop sampling; wait (at most `seconds`) for the sampled gifts and the last one."""
        self._stopping = True
        deadline = time.perf_counter() + seconds
        if self._task is not None:
            _, still = await asyncio.wait({self._task}, timeout=seconds)
            if still:
                self._task.cancel()
                self.result.uncredited = len(self.pending)
                self.pending.clear()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self.last is not None:
            gift, metadata, _ = self.last
            while time.perf_counter() < deadline:
                if await self._credited(gift, metadata):
                    self.result.drained_after = max(0.0, time.perf_counter() - window_closed)
                    break
                await asyncio.sleep(self.interval)
            else:
                self.result.uncredited += 1
        if self.result.uncredited:
            self.errors[
                f"CREDIT: {self.result.uncredited} sampled gifts not CREDITED {seconds:.0f}s "
                "after the window"
            ] += 1
        return self.result


# ---------------------------------------------------------------- one backend


@dataclass
class BackendReport:
    backend: str
    results: list[Result] = field(default_factory=list)
    memory: dict[str, tuple[float, float]] = field(default_factory=dict)
    log_errors: int = 0
    log_problems: Counter[str] = field(default_factory=Counter)
    log_warnings: int = 0
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def find(self, case: str, load: int | str | None = None) -> Result | None:
        for result in self.results:
            if result.case == case and (load is None or result.load == str(load)):
                return result
        return None

    @property
    def failed(self) -> bool:
        return bool(self.failures or self.log_errors or any(r.errors for r in self.results))


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _note_result(report: BackendReport, result: Result) -> Result:
    report.results.append(result)
    status = f"{result.throughput:,.0f}/s" + (
        f" ({sum(result.errors.values())} errors)" if result.errors else ""
    )
    progress(f"  {report.backend}: {result.case} @{result.load}: {status}")
    return result


async def measure_ceilings(
    report: BackendReport,
    options: Options,
    timing: Timing,
    certs: Path,
    logs: Path,
    token: Metadata,
) -> None:
    progress(f"{report.backend}: starting the echo ceilings")
    async with echo_fleet(certs, logs) as fleet:
        if loop := event_loop_mismatch(fleet.children):
            report.notes.append(loop)
        for flavour in ("plain", "suite"):
            for hops in (1, 2):
                client = EchoClient(fleet, flavour, hops, certs, token, max(options.concurrency))
                try:
                    for concurrency in options.concurrency:
                        _note_result(
                            report,
                            await closed_loop(
                                echo_case(flavour, hops),
                                "ceiling",
                                concurrency,
                                client.call(concurrency),
                                timing=timing,
                                monitor=fleet.monitor(flavour),
                            ),
                        )
                finally:
                    await client.channels.close()
        if died := fleet.died():
            report.failures.append(f"echo processes exited during the run: {died}")


async def gift_case(
    report: BackendReport,
    client: SuiteClient,
    options: Options,
    timing: Timing,
    monitor: Monitor,
    *,
    hot: bool,
    concurrency: int | None = None,
    rate: float | None = None,
    seed: int = 1,
    case: str | None = None,
    overload: bool = False,
) -> Result:
    """`overload`: a case meant to exceed capacity, whose refusals are counted as shedding
    (`_count_shed`) before its line is printed."""
    lag = CreditLag(
        client,
        every=options.lag_every,
        max_pending=options.lag_max_pending,
        interval=options.lag_poll_seconds,
    )
    lag.start()
    name = case or f"SendGift {'hot' if hot else 'spread'}"
    if rate is None:
        assert concurrency is not None
        call = client.gift_call(concurrency, hot=hot)
        result = await closed_loop(
            name,
            "suite",
            concurrency,
            call,
            timing=timing,
            monitor=monitor,
            on_answer=lag.on_answer,
        )
    else:
        call = client.gift_call(max(options.concurrency), hot=hot)
        result = await open_loop(
            name,
            "open",
            rate,
            call,
            timing=timing,
            monitor=monitor,
            seed=seed,
            on_answer=lag.on_answer,
        )
    result.lag = await lag.finish(result.closed_at, options.drain_seconds)
    result.errors.update(lag.errors)
    if overload:
        _count_shed(report, result)
    return _note_result(report, result)


def _count_shed(report: BackendReport, result: Result) -> None:
    """Move what overload is expected to cause out of a case's errors and into a note: OVERLOADED
    refusals (the shedding working; SendGift or the lag's GetGift), streams a connection opened
    beyond the service's MAX_CONCURRENT_STREAMS (refused by grpc before any work, UNAVAILABLE
    "Stream removed"; see `max_streams_per_connection` in runtime/config.py), arrivals the load
    generator could not send (its queue full behind those streams) and calls still queued when the
    drain gave up (CANCELLED by the benchmark itself)."""
    overloaded = refused_streams = cancelled = 0
    for what in list(result.errors):
        if "RESOURCE_EXHAUSTED" in what and "overloaded" in what:
            overloaded += result.errors.pop(what)
        elif "UNAVAILABLE: Stream removed" in what:
            refused_streams += result.errors.pop(what)
        elif what.startswith("CANCELLED"):
            cancelled += result.errors.pop(what)
        elif what.startswith("OVERLOAD:"):  # the load generator's own queue was full
            del result.errors[what]
    result.shed = overloaded + refused_streams
    p50, p99 = result.quantile(0.5), result.quantile(0.99)
    report.notes.append(
        f"{result.case}: {overloaded} calls refused at once as OVERLOADED, "
        f"{refused_streams} as streams beyond a connection's limit, {cancelled} still "
        f"queued at the drain, {result.unsent} never sent (the load generator's queue was full: "
        f"each connection had as many calls open as the service allows), {result.completed} "
        f"served in the window, p50 {_ms(p50)} ms, p99 {_ms(p99)} ms"
    )


async def measure_suite(
    report: BackendReport,
    options: Options,
    timing: Timing,
    tmp: Path,
    certs: Path,
    logs: Path,
    issuer: TokenIssuer,
) -> float:
    """The suite's cases; returns SendGift's maximum closed-loop rate (spread)."""
    progress(f"{report.backend}: starting the suite (4 service processes)")
    if report.backend == "postgres":
        settings = ("server_version", "autovacuum", "shared_buffers", "max_wal_size")
        report.notes.append(
            f"PostgreSQL: {await postgres_settings(*settings)} (with autovacuum off, the run's "
            "databases are vacuumed between cases, as autovacuum would)"
        )
    async with suite_processes(report.backend, tmp, certs, logs) as suite:
        client = SuiteClient(suite, options, issuer)
        try:
            began = time.perf_counter()
            gift = await client.prepare()
            report.notes.append(
                f"{len(client.senders)} senders funded with {PACKAGE} each, "
                f"{len(client.creators)} creators, gift {gift}; set up in "
                f"{time.perf_counter() - began:.1f}s"
            )
            if loop := suite.event_loop_mismatch():
                report.notes.append(loop)
            gc.collect()
            gc.freeze()
            monitor = suite.monitor()
            for hot in (False, True):
                for concurrency in options.concurrency:
                    await suite.tidy()
                    await gift_case(
                        report, client, options, timing, monitor, hot=hot, concurrency=concurrency
                    )
                    await asyncio.sleep(0.2)
            for concurrency in options.concurrency:
                await suite.tidy()
                _note_result(
                    report,
                    await closed_loop(
                        "GetBalance",
                        "suite",
                        concurrency,
                        client.balance_call(concurrency),
                        timing=timing,
                        monitor=monitor,
                    ),
                )
            spread = [r for r in report.results if r.case == "SendGift spread" and r.concurrency]
            max_rate = max((r.throughput for r in spread), default=0.0)
            if max_rate <= 0:
                report.failures.append("SendGift never completed: no open-loop cases")
            else:
                await suite.tidy()
                await gift_case(
                    report,
                    client,
                    options,
                    timing,
                    monitor,
                    hot=False,
                    rate=max_rate / 2,
                    seed=7,
                    case="SendGift spread open-loop 50%",
                )
                await suite.tidy()
                await gift_case(
                    report,
                    client,
                    options,
                    timing,
                    monitor,
                    hot=False,
                    rate=max_rate * 0.8,
                    seed=8,
                    case="SendGift spread open-loop 80%",
                )
                # A burst at five times capacity, then half capacity at once: the burst should be
                # mostly refused fast (OVERLOADED, see runtime/shedding.py) with the accepted calls
                # still quick, and the next window's p50 back to normal.
                for factor, case, seed in (
                    (5, "SendGift burst 5x", 9),
                    (0.5, "SendGift after the burst 50%", 10),
                ):
                    await suite.tidy()
                    await gift_case(
                        report,
                        client,
                        options,
                        timing,
                        monitor,
                        hot=False,
                        rate=max_rate * factor,
                        seed=seed,
                        case=case,
                        overload=True,
                    )
            # Last: its bulk writes leave PostgreSQL vacuuming for a while after, which would
            # otherwise be charged to the cases that follow.
            for concurrency in options.concurrency:
                await suite.tidy()
                settlement = await closed_loop(
                    f"settlement (batch {options.batch})",
                    "suite",
                    concurrency,
                    client.settlement_call(concurrency, options.batch),
                    timing=timing,
                    monitor=monitor,
                    items_per_call=options.batch,
                )
                # Far more batches in flight than payout applies at once (PAYOUT_CREDIT_BATCHES_AT_ONCE)
                # queue inside it; refusing the excess (OVERLOADED) is the shedding working.
                _count_shed(report, settlement)
                _note_result(report, settlement)
            report.memory = suite.memory()
            report.log_errors, report.log_problems, report.log_warnings = suite.log_problems()
            if died := suite.died():
                report.failures.append(f"services exited during the run: {died}")
        finally:
            await client.close()
    bad_exits = {n: c for n, c in suite.exit_codes.items() if c not in (0, -signal.SIGTERM)}
    if bad_exits:
        report.failures.append(
            f"services did not stop cleanly on SIGTERM (exit codes): {bad_exits}"
        )
    return max_rate


async def measure_open_echo(
    report: BackendReport,
    options: Options,
    timing: Timing,
    certs: Path,
    logs: Path,
    token: Metadata,
    rate: float,
) -> None:
    progress(f"{report.backend}: the 2-hop mTLS+OTel echo chain, open loop at {rate:.0f}/s")
    async with echo_fleet(certs, logs, ("suite",)) as fleet:
        client = EchoClient(fleet, "suite", 2, certs, token, max(options.concurrency))
        try:
            _note_result(
                report,
                await open_loop(
                    f"{echo_case('suite', 2)} open-loop",
                    "open",
                    rate,
                    client.call(max(options.concurrency)),
                    timing=timing,
                    monitor=fleet.monitor("suite"),
                    seed=7,
                ),
            )
        finally:
            await client.channels.close()


async def run_backend(backend: str, options: Options, root: Path) -> BackendReport:
    report = BackendReport(backend)
    tmp = root / backend
    logs = tmp / "logs"
    logs.mkdir(parents=True)
    certs = root / "certs"
    timing = Timing(options.warmup, options.duration, options.drain_seconds)
    issuer = TokenIssuer.dev(SecuritySettings(certs_dir=certs, dev_pki=False))
    token = tuple(token_metadata(issuer.mint("echo-viewer", ttl=dt.timedelta(minutes=55))))
    try:
        await measure_ceilings(report, options, timing, certs, logs, token)
        max_rate = await measure_suite(report, options, timing, tmp, certs, logs, issuer)
        if max_rate > 0:
            await measure_open_echo(report, options, timing, certs, logs, token, max_rate / 2)
    except SystemExit as stop:
        report.failures.append(str(stop.code))
    except Exception as error:
        traceback.print_exc()
        report.failures.append(f"the benchmark failed: {describe(error)}")
    return report


# ---------------------------------------------------------------- the report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = []
    for row in [headers, *rows]:
        cells = [
            cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _results_table(results: list[Result], processes: list[str]) -> str:
    rows = []
    for r in results:
        rows.append(
            [
                r.case,
                r.load,
                f"{r.throughput:,.0f}",
                f"{r.items_per_second:,.0f}" if r.items_per_call > 1 else "",
                _ms(r.quantile(0.5)),
                _ms(r.quantile(0.99)),
                str(sum(r.errors.values())),
                f"{r.other_share * 100:.0f}{'!' if r.busy else ''}",
                *[_cpu(r.cpu_per_call(p)) for p in processes],
            ]
        )
    headers = [
        "case",
        "load",
        "calls/s",
        "items/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "other%",
        *processes,
    ]
    return _table(headers, rows, left=1)


def _lag_table(results: list[Result]) -> str:
    rows = []
    for r in results:
        if r.lag is None:
            continue
        lag = r.lag
        rows.append(
            [
                r.case,
                r.load,
                str(len(lag.lags)),
                _ms(quantile(lag.lags, 0.5)),
                _ms(quantile(lag.lags, 0.99)),
                _ms(max(lag.lags) if lag.lags else None),
                "-" if lag.drained_after is None else f"{lag.drained_after:.2f}",
                f"{lag.polls / lag.poll_seconds:,.0f}" if lag.poll_seconds else "-",
                str(lag.uncredited),
            ]
        )
    headers = [
        "case",
        "load",
        "samples",
        "lag p50 ms",
        "lag p99 ms",
        "max ms",
        "backlog s",
        "polls/s",
        "uncredited",
    ]
    return _table(headers, rows)


@dataclass
class Ratio:
    name: str
    value: float | None
    target: str
    ok: Callable[[float], bool]
    detail: str = ""
    cases: list[Result | None] = field(default_factory=list)
    """The measurements it is computed from."""

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "n/a"
        return "PASS" if self.ok(self.value) else "MISS"

    @property
    def note(self) -> str:
        busy = any(r is not None and r.busy for r in self.cases)
        return "; ".join(n for n in (self.detail, "machine busy (other%)" if busy else "") if n)


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _throughput(result: Result | None, items: bool = False) -> float | None:
    if result is None or not result.completed:
        return None
    return result.items_per_second if items else result.throughput


def _p99(values: list[float] | None) -> float | None:
    return None if values is None else quantile(values, 0.99)


def _lags(result: Result | None) -> list[float] | None:
    return result.lag.lags if result is not None and result.lag is not None else None


def ratios(report: BackendReport, options: Options) -> list[Ratio]:
    """The performance targets, each as measured in this run."""
    out: list[Ratio] = []
    echo1, echo2 = echo_case("suite", 1), echo_case("suite", 2)
    settlement = f"settlement (batch {options.batch})"
    for c in options.concurrency:
        gift, chain = report.find("SendGift spread", c), report.find(echo2, c)
        out.append(
            Ratio(
                f"SendGift spread / {echo2} @{c}",
                _div(_throughput(gift), _throughput(chain)),
                ">= 0.7",
                lambda v: v >= 0.7,
                cases=[gift, chain],
            )
        )
    for c in options.concurrency:
        balance, hop = report.find("GetBalance", c), report.find(echo1, c)
        out.append(
            Ratio(
                f"GetBalance / {echo1} @{c}",
                _div(_throughput(balance), _throughput(hop)),
                ">= 0.8",
                lambda v: v >= 0.8,
                cases=[balance, hop],
            )
        )
    for c in options.concurrency:
        credits, hop = report.find(settlement, c), report.find(echo1, c)
        out.append(
            Ratio(
                f"settlement credits/s / {echo1} calls/s @{c}",
                _div(_throughput(credits, items=True), _throughput(hop)),
                ">= 10",
                lambda v: v >= 10,
                cases=[credits, hop],
            )
        )
    for c in options.concurrency:
        hot, spread = report.find("SendGift hot", c), report.find("SendGift spread", c)
        out.append(
            Ratio(
                f"SendGift hot / spread throughput @{c}",
                _div(_throughput(hot), _throughput(spread)),
                ">= 0.9",
                lambda v: v >= 0.9,
                cases=[hot, spread],
            )
        )
    for c in options.concurrency:
        hot, spread = report.find("SendGift hot", c), report.find("SendGift spread", c)
        out.append(
            Ratio(
                f"credit lag p99 spread / hot @{c}",
                _div(_p99(_lags(spread)), _p99(_lags(hot))),
                ">= 0.9",
                lambda v: v >= 0.9,
                "hot lag at most 1.1x spread",
                cases=[hot, spread],
            )
        )
    gift = report.find("SendGift spread open-loop 50%")
    chain = report.find(f"{echo2} open-loop")
    out.append(
        Ratio(
            f"open-loop p99 SendGift / {echo2} @{gift.load if gift else '?'}",
            _div(gift.quantile(0.99) if gift else None, chain.quantile(0.99) if chain else None),
            "<= 3",
            lambda v: v <= 3,
            cases=[gift, chain],
        )
    )
    at80 = report.find("SendGift spread open-loop 80%")
    out.append(
        Ratio(
            f"credit lag p99 (s) open-loop 80% @{at80.load if at80 else '?'}",
            _p99(_lags(at80)),
            "<= 1 s",
            lambda v: v <= 1.0,
            cases=[at80],
        )
    )
    if report.memory:
        name, (_, peak) = max(report.memory.items(), key=lambda kv: kv[1][1])
        out.append(
            Ratio(f"peak RSS per service, MB (max: {name})", peak, "<= 150", lambda v: v <= 150)
        )
    return out


def render(report: BackendReport, options: Options) -> str:
    lines = [
        "",
        "=" * 100,
        f"backend: {report.backend}",
        "=" * 100,
    ]
    lines += [f"  {note}" for note in report.notes]
    lines.append(
        "  load: calls in flight (closed loop) or arrivals per second (open loop); other%: CPU "
        "that processes outside the run used meanwhile, share of all CPUs ('!' above "
        f"{BUSY_THRESHOLD:.0%}: that case's figures are unreliable); CPU columns: ms per call"
    )
    if busy := [r for r in report.results if r.busy]:
        lines.append(
            f"  WARNING: the machine was busy with other work during {len(busy)} of "
            f"{len(report.results)} cases: rerun on a quiet machine for figures to compare"
        )
    ceilings = [r for r in report.results if r.group == "ceiling"]
    suite = [r for r in report.results if r.group == "suite"]
    opened = [r for r in report.results if r.group == "open"]
    pg = ["postgres"] if report.backend == "postgres" else []
    if ceilings:
        lines += [
            "",
            "CEILINGS: echo servers, closed loop (1-hop calls reach echo B only)",
            _results_table(ceilings, ["client", "echo-a", "echo-b"]),
        ]
    if suite:
        lines += [
            "",
            "SUITE: closed loop (settlement: calls are batches; CPU per batch call)",
            _results_table(suite, ["client", *SERVICES, *pg]),
        ]
    if opened:
        lines += [
            "",
            "OPEN LOOP: Poisson arrivals at a fixed rate, latency from the scheduled arrival",
            _results_table(
                opened,
                ["client", *SERVICES, *pg, "echo-a", "echo-b"],
            ),
        ]
    lagged = [r for r in report.results if r.lag is not None]
    if lagged:
        lines += [
            "",
            f"CREDIT LAG: SendGift answer -> GetGift reads CREDITED (1 gift in {options.lag_every} "
            f"sampled, polled every {options.lag_poll_seconds * 1000:.0f} ms; backlog: window end "
            "-> the case's last gift credited)",
            _lag_table(lagged),
        ]
    if report.memory:
        lines += [
            "",
            "MEMORY (MB) per service at the end of the run",
            _table(
                ["service", "VmRSS", "VmHWM (peak)"],
                [[n, f"{rss:.0f}", f"{hwm:.0f}"] for n, (rss, hwm) in report.memory.items()],
            ),
        ]
    lines += ["", f"RATIOS ({report.backend})"]
    rows = [
        [r.name, "-" if r.value is None else f"{r.value:.2f}", r.target, r.verdict, r.note]
        for r in ratios(report, options)
    ]
    lines.append(_table(["ratio", "value", "target", "verdict", "note"], rows))
    problems = []
    for r in report.results:
        for what, count in r.errors.most_common(5):
            problems.append(f"  {r.case} @{r.load}: {count} x {what}")
    if report.log_errors:
        problems.append(f"  the services logged {report.log_errors} errors:")
        problems += [f"    {n} x {what}" for what, n in report.log_problems.most_common(10)]
    problems += [f"  {failure}" for failure in report.failures]
    if problems:
        lines += ["", "ERRORS", *problems]
    if report.log_warnings:
        lines.append(f"  (the services logged {report.log_warnings} warnings)")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


async def main(options: Options) -> int:
    if "postgres" in options.backends and (why := await postgres_reachable()):
        print(
            f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({why}).\n"
            "Start it, set COINS_TEST_PG_ADMIN_URL, or run with --backend sqlite.",
            file=sys.stderr,
        )
        return 2
    print(
        f"coins performance benchmark: {', '.join(options.backends)}; "
        f"{'SMOKE (figures not meaningful); ' if options.smoke else ''}"
        f"{options.duration:g}s per case after {options.warmup:g}s warm-up; "
        f"in flight {','.join(map(str, options.concurrency))}; batch {options.batch}"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, grpcio "
        f"{grpc.__version__}, event loop {echo.running_loop_name()} (the services' runtime.server.run); "
        f"client: this process, {CALLS_PER_CHANNEL} calls in flight per channel",
        flush=True,
    )
    failed = False
    root = Path(tempfile.mkdtemp(prefix="coins-perf-"))
    try:
        pki.ensure_dev_pki(root / "certs")
        for backend in options.backends:
            report = await run_backend(backend, options, root)
            print(render(report, options), flush=True)
            if report.failed:
                failed = True
                for path in sorted((root / backend / "logs").glob("*.log")):
                    text = path.read_text(errors="replace").strip()
                    if text:
                        print(f"\n--- {backend} log {path.name} (last lines)", file=sys.stderr)
                        print("\n".join(text.splitlines()[-15:]), file=sys.stderr)
    finally:
        if options.keep:
            print(f"\nthe run's folder (logs, SQLite files): {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print("\nFAILED: see ERRORS above" if failed else "\nOK", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(echo.run(main(parse_options())))
