"""The benchmark's command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass


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
