"""What the trust boundary and the gift flow cost, measured against baselines in the same run.

Starts the real suite in-process on SQLite (or PostgreSQL with --backend postgres), then drives each
case with N concurrent callers for a fixed number of calls and prints calls/s and latency percentiles:

  health (plaintext)     baseline: one gRPC hop, no TLS, no auth, no database
  health (mutual TLS)    + TLS and the request guard (no token)
  GetBalance (mTLS+JWT)  + ES256 token verification, access rule, one indexed read
  DebitCoins (internal)  one money movement: idempotency key + ledger transaction
  SendGift (end to end)  gifting -> wallet debit (sync) + outbox -> payout credit (async)

Run: .venv/bin/python -m benchmarks.trust_boundary [--calls 2000] [--concurrency 16] [--processes]
By default the services run in the benchmark's own process (one core for everything: compare rows
with each other). With --processes they run as `make up` runs them, one process each (SQLite files),
and the benchmark is their client from outside: the figures a deployment on this machine would see.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from coins.gifting.v1 import gifting_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.config import SecuritySettings
from tests.helpers import funded_user, new_id
from tests.suite import Suite, start_suite


async def measure(
    name: str, calls: int, concurrency: int, make_call: Callable[[int], Awaitable[object]]
) -> None:
    latencies: list[float] = []
    counter = iter(range(calls))

    async def worker() -> None:
        for i in counter:
            start = time.perf_counter()
            await make_call(i)
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    latencies.sort()

    def p(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    print(
        f"{name:<24} {calls / elapsed:>9.0f} {p(0.5):>9.2f} {p(0.99):>9.2f} "
        f"{statistics.fmean(latencies) * 1000:>9.2f}"
    )


NO_PURCHASE_LIMITS = {
    f"limit_{name}": 10**12
    for name in ("hourly_coins", "daily_coins", "hourly_minor", "daily_minor")
} | {"limit_payment_method_daily_minor": 10**12}
"""The benchmark funds its users with one sandbox card: lift the fraud limits."""


@dataclass
class _Elsewhere:
    """What the test harness needs of a service running in another process."""

    address: str
    health_port: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def suite_in_processes(tmp: Path) -> AsyncIterator[Suite]:
    """The four services as separate processes (tools.suite, as `make up`), on free ports."""
    names = ("wallet", "gifting", "payout", "promotion")
    ports = {name: _free_port() for name in names}
    health = {name: _free_port() for name in names}
    env = {
        **os.environ,
        "COINS_CERTS_DIR": str(tmp / "certs"),
        "COINS_USER_RATE_PER_SECOND": "1e9",
        "COINS_USER_RATE_BURST": str(10**9),
        "GIFTING_WALLET_ADDRESS": f"127.0.0.1:{ports['wallet']}",
        "PROMOTION_WALLET_ADDRESS": f"127.0.0.1:{ports['wallet']}",
        "GIFTING_PAYOUT_ADDRESS": f"127.0.0.1:{ports['payout']}",
        **{f"{n.upper()}_PORT": str(p) for n, p in ports.items()},
        **{f"{n.upper()}_HEALTH_PORT": str(p) for n, p in health.items()},
        **{f"{n.upper()}_LOG_LEVEL": "WARNING" for n in names},
        **{f"WALLET_{name.upper()}": str(value) for name, value in NO_PURCHASE_LIMITS.items()},
    }
    launcher = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tools.suite",
        cwd=tmp,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert launcher.stdout is not None
    while b"coins suite is up" not in (line := await launcher.stdout.readline()):
        if not line:
            raise SystemExit("the suite did not start")
    services: dict[str, Any] = {n: _Elsewhere(f"127.0.0.1:{ports[n]}", health[n]) for n in names}
    security = SecuritySettings(certs_dir=tmp / "certs", dev_pki=False)
    suite = Suite("sqlite", InMemorySpanExporter(), services, security)
    try:
        yield suite
    finally:
        for channel in suite.channels:
            await channel.close()
        launcher.send_signal(signal.SIGINT)
        await asyncio.wait_for(launcher.communicate(), timeout=30)


@contextlib.asynccontextmanager
async def suite_in_process(backend: str, tmp: Path) -> AsyncIterator[Suite]:
    unlimited = {"user_rate_per_second": 1e9, "user_rate_burst": 10**9}
    suite = await start_suite(
        backend, tmp, overrides={"security": unlimited, "wallet": NO_PURCHASE_LIMITS}
    )
    try:
        yield suite
    finally:
        await suite.stop()


async def main(backend: str, calls: int, concurrency: int, processes: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        target = (
            suite_in_processes(Path(tmp)) if processes else suite_in_process(backend, Path(tmp))
        )
        async with target as suite:
            plain = health_pb2_grpc.HealthStub(suite.health_channel("wallet"))
            tls = health_pb2_grpc.HealthStub(suite.channel("wallet"))
            check = health_pb2.HealthCheckRequest()
            rich, _ = await funded_user(suite, "us-web-17500")
            token = suite.token(rich)
            wallet = suite.stub("wallet")
            internal = suite.stub("wallet", identity="gifting")
            gifting = suite.stub("gifting")
            viewers = [(await funded_user(suite, "us-web-17500"))[0] for _ in range(concurrency)]
            viewer_tokens = [suite.token(v) for v in viewers]

            where = "services in 4 processes, SQLite" if processes else f"in-process, {backend}"
            print(f"{where}, calls={calls}, concurrency={concurrency}")
            print(f"{'case':<24} {'calls/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}")
            await measure("health (plaintext)", calls, concurrency, lambda i: plain.Check(check))
            await measure("health (mutual TLS)", calls, concurrency, lambda i: tls.Check(check))
            balance = wallet_pb2.GetBalanceRequest(user_id=rich)
            await measure(
                "GetBalance (mTLS+JWT)",
                calls,
                concurrency,
                lambda i: wallet.GetBalance(balance, metadata=token),
            )
            await measure(
                "DebitCoins (internal)",
                calls,
                concurrency,
                lambda i: internal.DebitCoins(
                    wallet_pb2.DebitCoinsRequest(
                        request_id=new_id("bench"),
                        user_id=rich,
                        coins=1,
                        reason=wallet_pb2.DEBIT_REASON_GIFT,
                        reference=f"bench-{i}",
                    ),
                    metadata=token,
                ),
            )
            creator = new_id("creator")
            await measure(
                "SendGift (end to end)",
                calls,
                concurrency,
                lambda i: gifting.SendGift(
                    gifting_pb2.SendGiftRequest(
                        request_id=new_id("bench"),
                        sender_id=viewers[i % concurrency],
                        creator_id=creator,
                        gift_id="rose",
                        count=1,
                        live_id="live-bench",
                    ),
                    metadata=viewer_tokens[i % concurrency],
                ),
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--processes", action="store_true", help="one process per service")
    args = parser.parse_args()
    asyncio.run(main(args.backend, args.calls, args.concurrency, args.processes))
