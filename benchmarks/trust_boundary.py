"""What the trust boundary and the gift flow cost, measured against baselines in the same run.

Starts the real suite in-process on SQLite (or PostgreSQL with --backend postgres), then drives each
case with N concurrent callers for a fixed number of calls and prints calls/s and latency percentiles:

  health (plaintext)     baseline: one gRPC hop, no TLS, no auth, no database
  health (mutual TLS)    + TLS and the request guard (no token)
  GetBalance (mTLS+JWT)  + ES256 token verification, access rule, one indexed read
  DebitCoins (internal)  one money movement: idempotency key + ledger transaction
  SendGift (end to end)  gifting -> wallet debit (sync) + outbox -> payout credit (async)

Run: .venv/bin/python -m benchmarks.trust_boundary [--calls 2000] [--concurrency 16]
The client shares the process (and the 2 cores) with the servers, so absolute figures are a floor;
compare rows with each other.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc

from coins.gifting.v1 import gifting_pb2
from coins.wallet.v1 import wallet_pb2
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


async def main(backend: str, calls: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        unlimited = {"user_rate_per_second": 1e9, "user_rate_burst": 10**9}
        suite: Suite = await start_suite(backend, Path(tmp), overrides={"security": unlimited})
        try:
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

            print(f"backend={backend} calls={calls} concurrency={concurrency}")
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
        finally:
            await suite.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.backend, args.calls, args.concurrency))
