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

The cases and the run are here; starting the processes is `benchmarks.processes`, driving load and
reading CPU `benchmarks.measure`, the tables and ratios `benchmarks.report`.

Run: .venv/bin/python -m benchmarks.perf [--backend sqlite|postgres|both] [--duration 8]
     [--concurrency 16,64] [--batch 500] [--smoke]
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import itertools
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.type import date_pb2

from benchmarks import echo
from benchmarks.measure import Call, Lag, Monitor, Result, Timing, closed_loop, describe, open_loop
from benchmarks.options import Options, parse_options
from benchmarks.processes import (
    CALL_TIMEOUT,
    CALLS_PER_CHANNEL,
    PG_ADMIN_URL,
    Channels,
    EchoClient,
    Metadata,
    SuiteProcesses,
    bounded,
    channels_for,
    echo_case,
    echo_fleet,
    event_loop_mismatch,
    gateway_credentials,
    postgres_reachable,
    postgres_settings,
    spread_calls,
    suite_processes,
)
from benchmarks.report import BackendReport, ms, render
from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from coins.wallet.v1 import wallet_pb2
from runtime import pki
from runtime.auth import TokenIssuer, token_metadata
from runtime.config import SecuritySettings

PACKAGE = "us-web-17500"
PAYMENT_TOKEN = "tok_visa"


# ---------------------------------------------------------------- configuration


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
        f"served in the window, p50 {ms(p50)} ms, p99 {ms(p99)} ms"
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
