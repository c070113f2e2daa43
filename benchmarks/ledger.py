"""The ledger at scale: history pages, balances and the audit, as one account grows to ten million entries.

On PostgreSQL, the benchmark

1. makes a fresh database, starts the service as `make up` runs it (`python -m services.<name>`)
   and opens the measured account through gRPC (wallet: a viewer's coins; payout: a creator's
   diamonds);
2. grows that account to each SCALE with the ledger's bulk path (ledger.bulk: the rows posting writes,
   with digests and chains, which every audit below verifies): a movement a second, 1 in 10 a
   credit, 1 in 5,000 a rare kind, the rest debits, each with a passive counter account, so the
   table holds two entries per movement;
3. at each scale, reads pages of 50 through gRPC as the gateway, per filter the API offers (every
   kind, a common kind, a rare one, one the account never had, two kinds, the oldest hour, the newest
   hour, a kind within the oldest day), 2 calls in flight, and GetBalance (200 a second) alone and
   while a FULL AUDIT runs (`python -m ledger.auditor`, the job the service starts), whose time and
   peak memory it reports; at the last scale it appends a tenth more and runs an INCREMENTAL audit.

It prints p50/p99 per filter and scale, the p99 ratio of the largest scale to the smallest, and the
targets, each PASS or MISS. It exits non-zero when a call fails or an audit is not clean.

Run: .venv/bin/python -m benchmarks.ledger [--service wallet|payout] [--scales 10k,1m,10m]
     [--smoke]   (make bench-ledger: wallet at 10k, 1M, 10M; ~25 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import grpc.aio
from google.protobuf.timestamp_pb2 import Timestamp
from google.type import date_pb2

from benchmarks.measure import quantile
from benchmarks.processes import (
    PG_ADMIN_URL,
    Child,
    clean_environment,
    free_port,
    gateway_credentials,
    pg_admin,
    postgres_reachable,
    serving,
    spawn,
)
from coins.payout.v1 import payout_pb2
from coins.wallet.v1 import wallet_pb2
from ledger.auditor import JOB_VARIABLE
from ledger.bulk import Movement, append_postgres
from runtime import pki
from runtime.auth import TokenIssuer, token_metadata
from runtime.config import SecuritySettings
from runtime.migrations import upgrade

REPO = Path(__file__).resolve().parents[1]
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
RARE_EVERY = 5000
PAGE = 50
BALANCE_RATE = 200.0
BALANCE_RPC = {"wallet": "GetBalance", "payout": "GetDiamondBalance"}
"""GetBalance calls a second while the audit runs (and before it, for the baseline)."""


def parse_scale(text: str) -> int:
    text = text.strip().lower()
    units = {"k": 1_000, "m": 1_000_000}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


@dataclass(frozen=True)
class Shape:
    """What the measured service's account looks like, and how to read it."""

    service: str
    account: str
    credit_kind: str
    debit_kind: str
    rare_kind: str
    absent_kind: str
    counter: str
    kinds: dict[str, int]


def shape_of(service: str, owner: str) -> Shape:
    if service == "wallet":
        return Shape(
            "wallet",
            f"user:{owner}",
            "purchase",
            "gift",
            "chargeback",
            "refund",
            "system:coin_sales",
            {
                "purchase": wallet_pb2.ENTRY_KIND_PURCHASE,
                "gift": wallet_pb2.ENTRY_KIND_GIFT,
                "chargeback": wallet_pb2.ENTRY_KIND_CHARGEBACK,
                "refund": wallet_pb2.ENTRY_KIND_REFUND,
            },
        )
    return Shape(
        "payout",
        f"creator:{owner}",
        "gift",
        "withdrawal",
        "withdrawal_returned",
        "absent_kind",
        "system:withdrawals_in_flight",
        {
            "gift": payout_pb2.DIAMOND_ENTRY_KIND_GIFT,
            "withdrawal": payout_pb2.DIAMOND_ENTRY_KIND_WITHDRAWAL,
            "withdrawal_returned": payout_pb2.DIAMOND_ENTRY_KIND_WITHDRAWAL_RETURNED,
        },
    )


def movements(shape: Shape, start: int, stop: int) -> Iterator[Movement]:
    """Movement k (1-based) at T0 + k seconds: 1 in 10 a credit, 1 in RARE_EVERY the rare kind."""
    for k in range(start + 1, stop + 1):
        at = T0 + dt.timedelta(seconds=k)
        if k % 10 == 1:
            kind, amount = shape.credit_kind, 1000
        elif k % RARE_EVERY == 0:
            kind, amount = shape.rare_kind, 1 if shape.service == "payout" else -1
        else:
            kind, amount = shape.debit_kind, -(k % 10 or 10)
        yield Movement(kind, amount, shape.counter, f"bench-{k}", at)


def stamp(moment: dt.datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


@dataclass
class Latencies:
    values: list[float] = field(default_factory=list)
    errors: int = 0

    def p(self, q: float) -> float:
        return quantile(self.values, q) or 0.0


async def drive(
    call: Callable[[], Awaitable[Any]], *, concurrency: int, seconds: float, at_least: int = 0
) -> Latencies:
    """`concurrency` callers for `seconds` (and at least `at_least` calls in all)."""
    result = Latencies()
    stop = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < stop or len(result.values) + result.errors < at_least:
            began = time.perf_counter()
            try:
                await call()
            except grpc.aio.AioRpcError as error:
                result.errors += 1
                if result.errors <= 3:
                    print(f"    call failed: {error.code().name} {error.details()}", flush=True)
                continue
            result.values.append(time.perf_counter() - began)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return result


async def steady(call: Callable[[], Awaitable[Any]], *, rate: float, seconds: float) -> Latencies:
    """Calls started at a steady `rate` per second for `seconds`, whatever the answers take (open
    loop: the latency a serving client sees at a constant load, not a saturating one)."""
    result = Latencies()

    async def one() -> None:
        began = time.perf_counter()
        try:
            await call()
        except grpc.aio.AioRpcError:
            result.errors += 1
            return
        result.values.append(time.perf_counter() - began)

    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    for n in range(int(rate * seconds)):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return result


@dataclass
class AuditFigures:
    seconds: float
    peak_mb: float
    ok: bool
    entries_checked: int
    transactions_checked: int
    mode: str


async def audit_job(url: str, *, incremental: bool) -> AuditFigures:
    """The audit job the service starts, started the same way; its peak memory from getrusage."""
    job = json.dumps({"database_url": url, "database_role": "", "incremental": incremental})
    began = time.perf_counter()
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ledger.auditor",
        "--job-from-env",
        cwd=REPO,
        env={**clean_environment(), JOB_VARIABLE: job},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await child.communicate()
    seconds = time.perf_counter() - began
    if child.returncode not in (0, 1):
        raise SystemExit(f"the audit job failed ({child.returncode}): {err.decode()[-2000:]}")
    run = json.loads(out)
    peak_mb = float(run["peak_rss_mb"])  # the job's own high-water mark (getrusage)
    report = json.loads(run["report"])
    ok = child.returncode == 0
    if not ok:
        print(f"    AUDIT FINDINGS: {run['report'][:2000]}", flush=True)
    return AuditFigures(
        seconds,
        peak_mb,
        ok,
        int(report["entries_checked"]),
        int(report["transactions_checked"]),
        str(report["mode"]),
    )


class Bench:
    def __init__(self, service: str, root: Path, smoke: bool) -> None:
        self.service = service
        self.root = root
        self.smoke = smoke
        self.run = uuid.uuid4().hex[:8]
        self.database = f"coins_bench_ledger_{self.run}"
        self.owner = f"bench{self.run}"
        self.shape = shape_of(service, self.owner)
        base = PG_ADMIN_URL.rsplit("/", 1)[0]
        self.pg_url = f"{base}/{self.database}"
        self.url = self.pg_url.replace("postgresql://", "postgresql+asyncpg://", 1)
        self.port, self.health_port = free_port(), free_port()
        self.child: Child | None = None
        self.channel: grpc.aio.Channel | None = None
        self.size = 0
        self.failures: list[str] = []

    async def start(self) -> None:
        await pg_admin(f'CREATE DATABASE "{self.database}"')
        from runtime.db import Database

        db = Database(self.url)
        try:
            await upgrade(db, REPO / "services" / self.service / "migrations")
        finally:
            await db.close()
        certs = self.root / "certs"
        pki.ensure_dev_pki(certs)
        prefix = self.service.upper()
        env = clean_environment() | {
            "COINS_CERTS_DIR": str(certs),
            "COINS_DEV_PKI": "false",
            "PAYOUT_PROCESSOR_WEBHOOK_SECRET": os.urandom(32).hex(),  # off a dev PKI: its own
            "COINS_USER_RATE_PER_SECOND": "1e9",
            "COINS_USER_RATE_BURST": str(10**9),
            f"{prefix}_HOST": "127.0.0.1",
            f"{prefix}_PORT": str(self.port),
            f"{prefix}_HEALTH_PORT": str(self.health_port),
            f"{prefix}_DATA_DIR": str(self.root / "data"),
            f"{prefix}_DATABASE_URL": self.url,
            f"{prefix}_LEDGER_AUDIT_EVERY_SECONDS": "0",
        }
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.child = await spawn(self.service, ["-m", f"services.{self.service}"], env, logs)
        deadline = time.monotonic() + 60
        while not await serving(self.health_port):
            if self.child.process.returncode is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.service} did not start:\n{self.child.tail()}")
            await asyncio.sleep(0.2)
        self.issuer = TokenIssuer.dev(SecuritySettings(certs_dir=certs, dev_pki=False))
        self.refresh_token()
        self.channel = grpc.aio.secure_channel(f"127.0.0.1:{self.port}", gateway_credentials(certs))
        await self._open_account()

    def refresh_token(self) -> None:
        """A token as the gateway holds one (they live an hour at most; a run is longer)."""
        self.token = tuple(
            token_metadata(self.issuer.mint(self.owner, ttl=dt.timedelta(minutes=50)))
        )

    async def _open_account(self) -> None:
        assert self.channel is not None
        if self.service == "wallet":
            open_account = self.channel.unary_unary(
                "/coins.wallet.v1.WalletService/OpenAccount",
                request_serializer=wallet_pb2.OpenAccountRequest.SerializeToString,
                response_deserializer=wallet_pb2.OpenAccountResponse.FromString,
            )
            await open_account(
                wallet_pb2.OpenAccountRequest(
                    request_id=f"open-{self.run}",
                    user_id=self.owner,
                    country_code="US",
                    birth_date=date_pb2.Date(year=1990, month=5, day=17),
                ),
                metadata=self.token,
                timeout=30,
            )
            return
        conn = await asyncpg.connect(self.pg_url)  # a creator's account opens with the first credit
        try:
            await conn.execute(
                "INSERT INTO ledger_accounts (account_id, kind, balance, allow_negative, "
                "keeps_balance, created_at, seq, head_hash) VALUES ($1, 'user', 0, false, true, "
                "now(), 0, $2)",
                self.shape.account,
                "0" * 64,
            )
        finally:
            await conn.close()

    async def grow(self, target: int) -> float:
        began = time.perf_counter()
        conn = await asyncpg.connect(self.pg_url)
        try:
            await conn.execute(
                "INSERT INTO ledger_accounts (account_id, kind, balance, allow_negative, "
                "keeps_balance, created_at, seq, head_hash) VALUES ($1, 'system', 0, true, false, "
                "now(), 0, $2) ON CONFLICT DO NOTHING",
                self.shape.counter,
                "0" * 64,
            )
            await append_postgres(
                conn,
                self.shape.account,
                movements(self.shape, self.size, target),
                caller="bench",
            )
            await conn.execute("ANALYZE ledger_entries")
            await conn.execute("ANALYZE ledger_transactions")
        finally:
            await conn.close()
        self.size = target
        return time.perf_counter() - began

    def page_calls(self) -> dict[str, Callable[[], Awaitable[Any]]]:
        assert self.channel is not None
        shape, newest = self.shape, T0 + dt.timedelta(seconds=self.size)
        if self.service == "wallet":
            method = "/coins.wallet.v1.WalletService/ListLedgerEntries"
            request_type: Any = wallet_pb2.ListLedgerEntriesRequest
            response_type: Any = wallet_pb2.ListLedgerEntriesResponse
            owner_field = "user_id"
        else:
            method = "/coins.payout.v1.PayoutService/ListDiamondEntries"
            request_type = payout_pb2.ListDiamondEntriesRequest
            response_type = payout_pb2.ListDiamondEntriesResponse
            owner_field = "creator_id"
        call: Any = self.channel.unary_unary(
            method,
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        k = shape.kinds
        hour, day = dt.timedelta(hours=1), dt.timedelta(days=1)
        filters: dict[str, dict[str, Any]] = {
            "every kind": {},
            f"{shape.debit_kind} (common)": {"kinds": [k[shape.debit_kind]]},
            f"{shape.rare_kind} (1 in {RARE_EVERY})": {"kinds": [k[shape.rare_kind]]},
            "a kind never had": {"kinds": [k[shape.absent_kind]]}
            if shape.absent_kind in k
            else {"kinds": [k[shape.rare_kind]], "end_time": stamp(T0)},
            "two kinds": {"kinds": [k[shape.credit_kind], k[shape.rare_kind]]},
            "oldest hour": {"start_time": stamp(T0), "end_time": stamp(T0 + hour)},
            "newest hour": {"start_time": stamp(newest - hour)},
            f"{shape.credit_kind} in oldest day": {
                "kinds": [k[shape.credit_kind]],
                "start_time": stamp(T0),
                "end_time": stamp(T0 + day),
            },
        }

        def caller(fields: dict[str, Any]) -> Callable[[], Awaitable[Any]]:
            request = request_type(**{owner_field: self.owner, "page_size": PAGE, **fields})

            async def one() -> Any:
                return await call(request, metadata=self.token, timeout=30)

            return one

        return {name: caller(fields) for name, fields in filters.items()}

    def balance_call(self) -> Callable[[], Awaitable[Any]]:
        assert self.channel is not None
        call: Any
        if self.service == "wallet":
            call = self.channel.unary_unary(
                "/coins.wallet.v1.WalletService/GetBalance",
                request_serializer=wallet_pb2.GetBalanceRequest.SerializeToString,
                response_deserializer=wallet_pb2.GetBalanceResponse.FromString,
            )
            request: Any = wallet_pb2.GetBalanceRequest(user_id=self.owner)
        else:
            call = self.channel.unary_unary(
                "/coins.payout.v1.PayoutService/GetDiamondBalance",
                request_serializer=payout_pb2.GetDiamondBalanceRequest.SerializeToString,
                response_deserializer=payout_pb2.GetDiamondBalanceResponse.FromString,
            )
            request = payout_pb2.GetDiamondBalanceRequest(creator_id=self.owner)

        async def one() -> Any:
            return await call(request, metadata=self.token, timeout=30)

        return one

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.child is not None:
            await self.child.stop()
        with contextlib.suppress(Exception):
            await pg_admin(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


async def measure(service: str, scales: list[int], smoke: bool) -> int:
    problem = await postgres_reachable()
    if problem is not None:
        raise SystemExit(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {problem}")
    root = Path(tempfile.mkdtemp(prefix="coins-bench-ledger-"))
    bench = Bench(service, root, smoke)
    pages: dict[int, dict[str, Latencies]] = {}
    balances: dict[int, tuple[Latencies, Latencies]] = {}
    audits: dict[int, AuditFigures] = {}
    incremental: tuple[int, AuditFigures] | None = None
    page_seconds = 0.5 if smoke else 4.0
    try:
        await bench.start()
        for scale in scales:
            seconds = await bench.grow(scale)
            print(
                f"[{service}] {scale:,} entries in the account ({2 * scale:,} in the table), "
                f"grown in {seconds:.0f} s",
                flush=True,
            )
            bench.refresh_token()
            calls = bench.page_calls()
            pages[scale] = {}
            for name, call in calls.items():
                await drive(call, concurrency=2, seconds=0.3)  # warm the path
                pages[scale][name] = await drive(
                    call, concurrency=2, seconds=page_seconds, at_least=40
                )
            balance = bench.balance_call()
            idle = await steady(balance, rate=BALANCE_RATE, seconds=2 * page_seconds)
            audit_task = asyncio.create_task(audit_job(bench.url, incremental=False))
            during = Latencies()
            while not audit_task.done():
                sample = await steady(balance, rate=BALANCE_RATE, seconds=1.0)
                during.values += sample.values
                during.errors += sample.errors
            audits[scale] = await audit_task
            balances[scale] = (idle, during)
            figures = audits[scale]
            print(
                f"    full audit {figures.seconds:.1f} s, peak {figures.peak_mb:.0f} MB, "
                f"{'clean' if figures.ok else 'FINDINGS'}",
                flush=True,
            )
        extra = max(1, scales[-1] // 10)
        grown = await bench.grow(scales[-1] + extra)
        print(f"[{service}] appended {extra:,} more in {grown:.0f} s", flush=True)
        incremental = (extra, await audit_job(bench.url, incremental=True))
    finally:
        await bench.stop()
        shutil.rmtree(root, ignore_errors=True)
    return report(service, scales, pages, balances, audits, incremental, smoke)


def report(
    service: str,
    scales: list[int],
    pages: dict[int, dict[str, Latencies]],
    balances: dict[int, tuple[Latencies, Latencies]],
    audits: dict[int, AuditFigures],
    incremental: tuple[int, AuditFigures] | None,
    smoke: bool,
) -> int:
    first, last = scales[0], scales[-1]
    failures: list[str] = []
    print(f"\n== {service}: history pages of {PAGE} through gRPC (p50 / p99 ms; 2 in flight) ==")
    header = ["filter", *(f"{s:,}" for s in scales), f"p99 {last:,} / {first:,}"]
    print(" | ".join(header))
    worst = 0.0
    for name in pages[first]:
        cells = [name]
        for scale in scales:
            figures = pages[scale][name]
            if figures.errors:
                failures.append(f"{name} at {scale:,}: {figures.errors} calls failed")
            cells.append(f"{_ms(figures.p(0.5))} / {_ms(figures.p(0.99))}")
        ratio = pages[last][name].p(0.99) / max(pages[first][name].p(0.99), 1e-9)
        worst = max(worst, ratio)
        cells.append(f"{ratio:.2f}x")
        print(" | ".join(cells))
    print(
        f"\n== {service}: {BALANCE_RPC[service]} p99 at {BALANCE_RATE:.0f}/s, alone and while a full audit "
        "runs =="
    )
    balance_ratio = 0.0
    for scale in scales:
        idle, during = balances[scale]
        ratio = during.p(0.99) / max(idle.p(0.99), 1e-9)
        if scale == last:
            balance_ratio = ratio
        print(
            f"{scale:,}: {_ms(idle.p(0.99))} ms alone, {_ms(during.p(0.99))} ms during the "
            f"audit ({ratio:.2f}x, {len(during.values)} calls)"
        )
    print(f"\n== {service}: the audit job (a process of its own) ==")
    for scale in scales:
        a = audits[scale]
        if not a.ok:
            failures.append(f"the full audit at {scale:,} was not clean")
        print(
            f"full at {scale:,} entries in the account: {a.seconds:.1f} s, peak {a.peak_mb:.0f} MB,"
            f" {a.transactions_checked:,} transactions, {a.entries_checked:,} chain links"
        )
    if incremental is not None:
        extra, a = incremental
        if not a.ok:
            failures.append("the incremental audit was not clean")
        print(
            f"incremental after {extra:,} more: {a.seconds:.1f} s ({a.mode}), "
            f"{a.entries_checked:,} chain links, {a.transactions_checked:,} transactions"
        )
    marks = [
        (f"every page p99 within 2x from {first:,} to {last:,}", worst <= 2.0, f"{worst:.2f}x"),
        (
            "full audit under 10 minutes",
            audits[last].seconds < 600,
            f"{audits[last].seconds:.0f} s",
        ),
        (
            "audit peak memory <= 200 MB",
            audits[last].peak_mb <= 200,
            f"{audits[last].peak_mb:.0f} MB",
        ),
        (
            f"{BALANCE_RPC[service]} p99 within 1.2x while it runs",
            balance_ratio <= 1.2,
            f"{balance_ratio:.2f}x",
        ),
    ]
    # Judged from 100k appended entries up (the 1M scale's tenth): a smaller run's few seconds are
    # mostly the job's start, which a per-million figure would multiply.
    if incremental is not None and incremental[0] >= 100_000:
        per_million = incremental[1].seconds / incremental[0] * 1_000_000
        marks.append(
            (
                "incremental: 1M new entries under 60 s",
                per_million < 60,
                f"{per_million:.0f} s per 1M",
            )
        )
    print("\n== targets ==")
    for text, met, figure in marks:
        print(
            f"{'PASS' if met else 'MISS'}  {text}: {figure}"
            + ("  (smoke: not judged)" if smoke else "")
        )
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ledger", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--service", choices=["wallet", "payout"], default="wallet")
    parser.add_argument("--scales", default=None, help="entries in the account, e.g. 10k,1m,10m")
    parser.add_argument("--smoke", action="store_true", help="small scales, short windows")
    args = parser.parse_args(argv)
    scales = [
        parse_scale(s)
        for s in (args.scales or ("2k,10k" if args.smoke else "10k,1m,10m")).split(",")
    ]
    if scales != sorted(scales) or scales[0] < 1:
        parser.error("--scales grow: e.g. 10k,1m,10m")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return asyncio.run(measure(args.service, scales, args.smoke))


if __name__ == "__main__":
    sys.exit(main())
