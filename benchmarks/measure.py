"""Measuring calls: closed- and open-loop load, latencies, and the CPU and memory of every process
involved (read from /proc, so the figures include the C core and the database)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from runtime.status import retry_info

CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def without_ids(text: str) -> str:
    """`text` with incident, trace and record ids blanked, so that equal problems count as one."""
    return _IDS.sub("<id>", text.strip())


def describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        details = (error.details() or "").replace("\n", " ")
        return f"{error.code().name}: {without_ids(details)[:160]}"
    return f"{type(error).__name__}: {without_ids(str(error))[:160]}"


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
        case=case,
        group=group,
        load=str(concurrency),
        concurrency=concurrency,
        window=window[1] - window[0],
        completed=completed,
        latencies=latencies,
        errors=errors,
        cpu_ms=Monitor.used_ms(before, after),
        items_per_call=items_per_call,
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
        case=case,
        group=group,
        load=f"{rate:.0f}/s",
        concurrency=None,
        window=closes - opens,
        completed=completed,
        latencies=latencies,
        errors=errors,
        cpu_ms=Monitor.used_ms(snapshots[0], snapshots[1]),
        closed_at=closes,
        unsent=shed,
    )
