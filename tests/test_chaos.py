"""Chaos: the four services as separate processes on a PostgreSQL of the test's own, a gift workload
whose callers retry under the same request id (and some that give up), and a nemesis that SIGKILLs and
restarts services, pauses them (SIGSTOP/SIGCONT), crashes the database, and cuts or holds the
network between gifting and the wallet (an in-repo TCP proxy). After healing, the books
must add up across all databases: every acknowledged gift happened exactly once, every gift is settled
(debited and credited, or failed), coins and diamonds match gift by gift, and both ledger audits are
clean.

Bounded (about a minute) and reproducible: the seed is printed; COINS_CHAOS_SEED=<seed> replays it.
Needs PostgreSQL's initdb and pg_ctl on PATH (CI's machine has them): without them the test fails.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import re
import shutil
import signal
import sqlite3
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import grpc.aio
import pytest
from google.type import date_pb2

from benchmarks.processes import SERVICES, SuiteProcesses, free_port, gateway_credentials
from coins.common.v1 import ledger_audit_pb2, ledger_audit_pb2_grpc
from coins.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from coins.payout.v1 import payout_pb2, payout_pb2_grpc
from coins.promotion.v1 import promotion_pb2, promotion_pb2_grpc
from coins.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from runtime import pki
from runtime.auth import TokenIssuer, token_metadata
from runtime.status import error_info
from services.payout.settings import PayoutSettings
from services.wallet.payments import SandboxPaymentProvider
from tests.faults import TcpProxy
from tests.helpers import eventually
from tools.cross_audit import cross_audit, sandbox_items

if TYPE_CHECKING:  # the async stub types exist only in the generated .pyi
    from coins.gifting.v1.gifting_pb2_grpc import GiftingServiceAsyncStub
    from coins.promotion.v1.promotion_pb2_grpc import PromotionServiceAsyncStub
    from coins.wallet.v1.wallet_pb2_grpc import WalletServiceAsyncStub

ANSWERED = re.compile(r" coins\.rpc .*/\w+ OK [0-9.]+ms")
"""An access log line of a call answered OK."""
WORK_SECONDS = 20.0
"""How long the workload and the nemesis run before healing."""
SETTLE_SECONDS = 90.0
"""How long healing may take: retries answered, reconcilers and the outbox done."""
SHIPPED_SETTLE_SECONDS = 360.0
"""... with the shipped timings: a purchase is reconciled 120 s after it started (checked every
30 s), a gift or promotion after 60 s, and the relay backs off up to 60 s."""
VIEWERS, CREATORS, WORKERS = 6, 3, 12
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,  # a crash mid-call; the request id makes a retry safe
    grpc.StatusCode.UNKNOWN,
}


class PrivatePostgres:
    """A PostgreSQL cluster in a temporary folder on a free port, which the nemesis may crash."""

    def __init__(self) -> None:
        # Its own folder (not pytest's, which only root may enter): the server runs as postgres.
        self.root = Path(tempfile.mkdtemp(prefix="coins-chaos-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.port = free_port()
        self.log = self.root / "postgres.log"
        self._as_postgres: list[str] = []

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def _run(self, *command: str) -> None:
        process = await asyncio.create_subprocess_exec(
            *self._as_postgres,
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await process.communicate()
        assert process.returncode == 0, f"{' '.join(command)}: {out.decode()[-1500:]}"

    async def init(self) -> None:
        for tool in ("initdb", "pg_ctl"):
            assert shutil.which(tool), f"{tool} is needed on PATH for the chaos test"
        self.sockets.mkdir()
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            self._as_postgres = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sockets, "postgres")
        await self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N")
        await self.start()

    async def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200"
        )
        await self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start"
        )

    async def crash(self) -> None:
        await self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")

    async def stop(self) -> None:
        with contextlib.suppress(AssertionError):
            await self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Ledger:
    """What the callers were told."""

    acked: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    """request id -> (sent gift id, sender, coins) of every acknowledged gift."""
    refused: dict[str, str] = field(default_factory=dict)
    """request id -> the definitive refusal's code."""
    abandoned: set[str] = field(default_factory=set)
    purchases: dict[str, str] = field(default_factory=dict)
    """request id -> purchase id of every acknowledged purchase."""
    withdrawals: dict[str, str] = field(default_factory=dict)
    """request id -> withdrawal id of every acknowledged withdrawal."""
    withdrawal_refusals: dict[str, str] = field(default_factory=dict)
    """request ids a caller gave up on (the reconciler settles their gifts)."""
    retried_codes: dict[str, int] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def chaos_suite(
    root: Path, replicas: int = 1, shipped_timings: bool = False
) -> AsyncIterator[tuple[SuiteProcesses, PrivatePostgres, TcpProxy]]:
    """The suite on its own PostgreSQL, gifting reaching the wallet through a proxy the nemesis
    can cut or hold (with one replica each; with more, gifting spreads its calls over them)."""
    postgres = PrivatePostgres()
    await postgres.init()
    ports = {name: free_port() for name in SERVICES}
    link = await TcpProxy("127.0.0.1", ports["wallet"]).start()
    certs = root / "certs"
    pki.ensure_dev_pki(certs)
    logs = root / "logs"
    logs.mkdir()
    fast_reconcilers = {
        "GIFTING_RECONCILE_AFTER_SECONDS": "3",
        "WALLET_RECONCILE_AFTER_SECONDS": "3",
        "PROMOTION_RECONCILE_AFTER_SECONDS": "3",
        "PROMOTION_RECONCILE_EVERY_SECONDS": "1",
        "PROMOTION_DOWNSTREAM_TIMEOUT_SECONDS": "2",
        "WALLET_RECONCILE_EVERY_SECONDS": "1",
        "WALLET_PAYMENT_TIMEOUT_SECONDS": "1",
        "GIFTING_RECONCILE_EVERY_SECONDS": "1",
        "GIFTING_RELAY_MAX_BACKOFF_SECONDS": "1",
        "GIFTING_DOWNSTREAM_TIMEOUT_SECONDS": "2",
    }
    suite = SuiteProcesses(
        "postgres",
        root,
        certs,
        logs,
        pg_admin_url=postgres.admin_url,
        settings={
            **({} if shipped_timings else fast_reconcilers),
            **({"GIFTING_WALLET_ADDRESS": f"127.0.0.1:{link.port}"} if replicas == 1 else {}),
            # Withdrawals: diamonds available at once, no review, no cap; a fast, patient worker.
            "PAYOUT_MATURATION_DAYS": "0",
            "PAYOUT_MIN_WITHDRAWAL_MINOR": "100",
            "PAYOUT_AUTO_APPROVE_MAX_MINOR": "1000000000",
            "PAYOUT_DAILY_WITHDRAWAL_CAP_MINOR": "1000000000",
            "PAYOUT_PROCESSOR_TIMEOUT_SECONDS": "2",
            "PAYOUT_PROCESSOR_POLL_SECONDS": "1",
            "PAYOUT_PROCESSOR_MAX_BACKOFF_SECONDS": "2",
            "PAYOUT_PROCESSOR_MAX_ATTEMPTS": "1000",
            "PAYOUT_PROCESSOR_SETTLE_MS": "100",
            # One line per answered call: with replicas, the test checks each served its share.
            **{f"{name.upper()}_ACCESS_LOG": str(replicas > 1).lower() for name in SERVICES},
        },
        ports=ports,
        replicas=replicas,
    )
    try:
        await suite.start()
        yield suite, postgres, link
    finally:
        await suite.stop()
        await link.close()
        await postgres.stop()


ALL_FAULTS = ("kill", "kill", "pause", "crash_database", "cut", "hold")


class Nemesis:
    def __init__(
        self,
        suite: SuiteProcesses,
        postgres: PrivatePostgres,
        link: TcpProxy,
        rng: random.Random,
        faults: Sequence[str] = ALL_FAULTS,
        leader: Callable[[str], str | None] | None = None,
    ) -> None:
        """`leader`: the instance leading a service's periodic jobs now, if known; the first kill
        then takes a leader, so that a handover is always exercised."""
        self.suite, self.postgres, self.link, self.rng = suite, postgres, link, rng
        self.faults = faults
        self.leader = leader
        self.done: list[str] = []
        self.restarted: list[str] = []
        """Services that exited by themselves (started while the database was down) and were
        started again."""
        self.killed: list[tuple[str, int, float]] = []
        """(instance, its pid, when) of every kill."""

    async def run(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            await asyncio.sleep(self.rng.uniform(1.0, 2.5))
            for name in self.suite.died():  # as a supervisor would: a service restarted into a
                self.restarted.append(name)  # database crash exits (it cannot migrate)
                await self.suite.restart(name)
            fault = self.rng.choice(self.faults)
            if self.leader is not None and not self.done:
                fault = "kill"  # a leader first (see `leader`)
            target = self.rng.choice(self.suite.instances(["wallet", "gifting", "payout"]))
            self.done.append(f"{fault} {target}" if fault in ("kill", "pause") else fault)
            if fault in ("cut", "hold"):  # the network between gifting and the wallet
                if fault == "cut":
                    self.link.cut()
                else:
                    self.link.hold()
                await asyncio.sleep(self.rng.uniform(0.5, 2.0))
                self.link.heal()
            elif fault == "kill":
                if self.leader is not None and not self.killed:
                    target = self.leader(target.split(".")[0]) or target
                    self.done[-1] = f"kill {target} (leading)"
                child = self.suite.children[target]
                self.killed.append((target, child.pid, loop.time()))
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGKILL)
                await child.process.wait()
                await asyncio.sleep(self.rng.uniform(0.2, 1.0))
                await self.suite.restart(target)
            elif fault == "pause":
                child = self.suite.children[target]
                child.process.send_signal(signal.SIGSTOP)
                await asyncio.sleep(self.rng.uniform(0.5, 1.5))
                child.process.send_signal(signal.SIGCONT)
            else:
                await self.postgres.crash()
                await asyncio.sleep(self.rng.uniform(0.3, 1.0))
                await self.postgres.start()

    async def heal(self) -> None:
        """Restart what exited until every service serves, as a supervisor would: a service
        restarted just before the last database crash may still be starting, and exit, after the
        first look (a CI run's heal found it alive, then saw it exit)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 60
        while True:
            for name in self.suite.died():
                self.restarted.append(name)
                await self.suite.restart(name)
            try:
                await self.suite.wait_serving()
                return
            except SystemExit:
                if loop.time() > give_up:
                    raise
                await asyncio.sleep(0.5)


async def send_gifts(
    gifting: GiftingServiceAsyncStub,
    tokens: dict[str, tuple[tuple[str, str], ...]],
    viewers: Sequence[str],
    creators: Sequence[str],
    rng: random.Random,
    book: Ledger,
    *,
    gives_up: bool,
    work_until: float,
    answer_until: float,
) -> None:
    """One caller: gifts, each retried under its request id until it is answered (or, for a caller
    that gives up, abandoned at its first failure)."""
    loop = asyncio.get_running_loop()
    while loop.time() < work_until:
        sender = rng.choice(viewers)
        request = gifting_pb2.SendGiftRequest(
            request_id=uuid.uuid4().hex,
            sender_id=sender,
            creator_id=(creator := rng.choice(creators)),
            gift_id=rng.choice(["rose", "panda", "love-bang"]),
            count=rng.randint(1, 3),
            live_id=f"live-{creator}",
        )
        while True:
            try:
                sent = await gifting.SendGift(request, metadata=tokens[sender], timeout=3.0)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code not in RETRYABLE:
                    reason = error_info(error)
                    book.refused[request.request_id] = f"{code.name} {reason and reason.reason}"
                    break
                book.retried_codes[code.name] = book.retried_codes.get(code.name, 0) + 1
                await asyncio.sleep(rng.uniform(0.1, 0.5))  # as a polite client backs off
                if gives_up or loop.time() > answer_until:
                    book.abandoned.add(request.request_id)
                    break
                continue
            book.acked[request.request_id] = (
                sent.sent_gift.sent_gift_id,
                sender,
                sent.sent_gift.coins,
            )
            break


async def withdraw(
    payout: Any,
    tokens: dict[str, tuple[tuple[str, str], ...]],
    creators: Sequence[str],
    rng: random.Random,
    book: Ledger,
    *,
    work_until: float,
    answer_until: float,
) -> None:
    """A creator's app: withdrawals of $1 to PayPal, each retried under its request id until it is
    answered (refusals such as not enough available diamonds yet are answers)."""
    loop = asyncio.get_running_loop()
    while loop.time() < work_until:
        creator = rng.choice(creators)
        request = payout_pb2.RequestWithdrawalRequest(
            request_id=uuid.uuid4().hex,
            creator_id=creator,
            diamonds=200,
            method=payout_pb2.PAYOUT_METHOD_PAYPAL,
            destination_token=f"dest_paypal_{creator}",
        )
        while True:
            try:
                made = await payout.RequestWithdrawal(
                    request, metadata=tokens[creator], timeout=3.0
                )
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE:
                    reason = error_info(error)
                    book.withdrawal_refusals[request.request_id] = (
                        f"{error.code().name} {reason and reason.reason}"
                    )
                    break
                await asyncio.sleep(rng.uniform(0.1, 0.5))
                if loop.time() > answer_until:
                    break
                continue
            book.withdrawals[request.request_id] = made.withdrawal.withdrawal_id
            break
        await asyncio.sleep(rng.uniform(0.2, 0.6))


async def buy_coins(
    wallet: WalletServiceAsyncStub,
    tokens: dict[str, tuple[tuple[str, str], ...]],
    viewers: Sequence[str],
    rng: random.Random,
    book: Ledger,
    *,
    work_until: float,
    answer_until: float,
) -> None:
    """A caller buying coins for viewers, each purchase retried under its request id until answered:
    the sandbox provider records its charges durably, so "never charged twice, never charged without
    coins" can be counted afterwards."""
    loop = asyncio.get_running_loop()
    while loop.time() < work_until:
        buyer = rng.choice(viewers)
        request = wallet_pb2.PurchaseCoinsRequest(
            request_id=uuid.uuid4().hex,
            user_id=buyer,
            package_id="us-web-700",
            payment_token=rng.choice(["tok_visa", "tok_visa", "tok_timeout"]),
        )
        while True:
            try:
                bought = await wallet.PurchaseCoins(request, metadata=tokens[buyer], timeout=3.0)
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE:
                    reason = error_info(error)
                    book.refused[request.request_id] = (
                        f"{error.code().name} {reason and reason.reason}"
                    )
                    break
                await asyncio.sleep(rng.uniform(0.1, 0.5))
                if loop.time() > answer_until:
                    book.abandoned.add(request.request_id)
                    break
                continue
            book.purchases[request.request_id] = bought.purchase.purchase_id
            break
        await asyncio.sleep(rng.uniform(0.2, 0.6))


async def promote(
    promotion: PromotionServiceAsyncStub,
    ad_delivery: PromotionServiceAsyncStub,
    tokens: dict[str, tuple[tuple[str, str], ...]],
    viewers: Sequence[str],
    rng: random.Random,
    *,
    work_until: float,
    answer_until: float,
) -> None:
    """A caller creating promotions, reporting deliveries against them (as the ad-delivery system)
    and ending some early; every request retried under its id until answered. The cross audit then
    checks each promotion's spend against the wallet's captures."""
    loop = asyncio.get_running_loop()

    async def answered(
        method: Callable[..., Awaitable[Any]], request: Any, metadata: Any = ()
    ) -> Any:
        while loop.time() < answer_until:
            try:
                return await method(request, metadata=metadata, timeout=3.0)
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE:
                    return None  # a definitive refusal (budget spent, promotion ended, no coins)
                await asyncio.sleep(rng.uniform(0.1, 0.5))
        return None

    while loop.time() < work_until:
        owner = rng.choice(viewers)
        create = promotion_pb2.CreatePromotionRequest(
            request_id=uuid.uuid4().hex,
            user_id=owner,
            video_id="video-chaos",
            goal=promotion_pb2.GOAL_VIDEO_VIEWS,
            budget_coins=rng.randint(50, 150),
            duration_days=1,
        )
        made = await answered(promotion.CreatePromotion, create, tokens[owner])
        if made is None:
            continue
        promotion_id = made.promotion.promotion_id
        for _ in range(rng.randint(1, 3)):
            report = promotion_pb2.ReportDeliveryRequest(
                request_id=uuid.uuid4().hex, promotion_id=promotion_id, coins=rng.randint(5, 40)
            )
            await answered(ad_delivery.ReportDelivery, report)
        if rng.random() < 0.5:
            end = promotion_pb2.EndPromotionRequest(
                request_id=uuid.uuid4().hex, promotion_id=promotion_id
            )
            await answered(promotion.EndPromotion, end, tokens[owner])


async def test_the_books_hold_through_kills_pauses_and_database_crashes(tmp_path: Path) -> None:
    await books_hold(tmp_path, replicas=1, faults=ALL_FAULTS, work_seconds=WORK_SECONDS)


@pytest.mark.nightly
async def test_the_books_hold_with_the_shipped_reconciler_timings(tmp_path: Path) -> None:
    """The same faults with the reconcilers, relay and payment timeouts as shipped (minutes, not
    seconds): a quarter of the gift callers give up at their first failure, so the reconcilers, not
    client retries, finish their abandoned work."""
    await books_hold(
        tmp_path, replicas=1, faults=ALL_FAULTS, work_seconds=WORK_SECONDS, shipped_timings=True
    )


async def test_two_replicas_of_every_service_keep_the_books(tmp_path: Path) -> None:
    """Every service as two processes on its one PostgreSQL, callers and services spreading their
    calls over both, one replica at a time killed or paused (its periodic jobs' lease passes to the
    other): the same workload and the same checks: nothing applied twice, nothing lost."""
    await books_hold(tmp_path, replicas=2, faults=("kill", "pause"), work_seconds=12.0)


async def books_hold(
    tmp_path: Path,
    *,
    replicas: int,
    faults: Sequence[str],
    work_seconds: float,
    shipped_timings: bool = False,
) -> None:
    """The mixed workload under the nemesis, then every check of the books."""
    settle_seconds = SHIPPED_SETTLE_SECONDS if shipped_timings else SETTLE_SECONDS
    seed = int(os.environ.get("COINS_CHAOS_SEED") or random.randrange(1 << 30))
    print(f"chaos seed {seed} (COINS_CHAOS_SEED={seed} replays it), {replicas} replica(s) each")
    rng = random.Random(seed)
    async with chaos_suite(tmp_path, replicas, shipped_timings) as (suite, postgres, link):
        issuer = TokenIssuer(
            (suite.certs / "jwt" / f"{pki.DEV_KEY_ID}-key.pem").read_bytes(),
            key_id=pki.DEV_KEY_ID,
            issuer="coins-dev",
            audience="coins",
        )
        viewers = [f"viewer-{i}-{seed}" for i in range(VIEWERS)]
        creators = [f"creator-{i}-{seed}" for i in range(CREATORS)]
        tokens = {u: tuple(token_metadata(issuer.mint(u))) for u in [*viewers, *creators]}
        credentials = gateway_credentials(suite.certs)
        async with (
            caller_channel(suite, "wallet", credentials) as wallet_channel,
            caller_channel(suite, "gifting", credentials) as gifting_channel,
            caller_channel(suite, "payout", credentials) as payout_channel,
            caller_channel(suite, "promotion", credentials) as promotion_channel,
            caller_channel(
                suite, "promotion", gateway_credentials(suite.certs, "ad-delivery")
            ) as ad_channel,
        ):
            wallet: WalletServiceAsyncStub = wallet_pb2_grpc.WalletServiceStub(wallet_channel)  # type: ignore[assignment]
            gifting: GiftingServiceAsyncStub = gifting_pb2_grpc.GiftingServiceStub(gifting_channel)  # type: ignore[assignment]
            for user in [*viewers, *creators]:
                await wallet.OpenAccount(
                    wallet_pb2.OpenAccountRequest(
                        request_id=uuid.uuid4().hex,
                        user_id=user,
                        country_code="US",
                        birth_date=date_pb2.Date(year=1990, month=1, day=1),
                    ),
                    metadata=tokens[user],
                )
            for creator in creators:
                await gifting.StartLive(
                    gifting_pb2.StartLiveRequest(
                        request_id=uuid.uuid4().hex,
                        creator_id=creator,
                        title="chaos",
                        live_id=f"live-{creator}",
                    ),
                    metadata=tokens[creator],
                )
            admin = tuple(token_metadata(issuer.mint("ops-chaos", roles=["admin"])))
            payout_stub = payout_pb2_grpc.PayoutServiceStub(payout_channel)
            for creator in creators:
                await payout_stub.SetCreatorVerification(
                    payout_pb2.SetCreatorVerificationRequest(
                        request_id=uuid.uuid4().hex,
                        creator_id=creator,
                        status=payout_pb2.KYC_STATUS_VERIFIED,
                        reason="chaos creators are verified",
                    ),
                    metadata=admin,
                )
            for user in viewers:
                await wallet.PurchaseCoins(
                    wallet_pb2.PurchaseCoinsRequest(
                        request_id=uuid.uuid4().hex,
                        user_id=user,
                        package_id="us-web-17500",
                        payment_token="tok_visa",
                    ),
                    metadata=tokens[user],
                )

            book = Ledger()
            urls = {
                name: f"postgresql://postgres@127.0.0.1:{postgres.port}/coins_bench_{name}_{suite.run}"
                for name in SERVICES
            }
            leases = (
                LeaseWatch(urls, suite, seconds=work_seconds + settle_seconds + 60)
                if replicas > 1
                else None
            )
            if leases is not None:
                await leases.ready(["wallet", "gifting", "payout"])
            nemesis = Nemesis(
                suite, postgres, link, rng, faults, leases.leader if leases is not None else None
            )
            loop = asyncio.get_running_loop()
            work_until = loop.time() + work_seconds
            answer_until = work_until + settle_seconds / 2
            callers = (
                [
                    asyncio.create_task(
                        send_gifts(
                            gifting,
                            tokens,
                            viewers,
                            creators,
                            random.Random(rng.random()),
                            book,
                            gives_up=i % 4 == 0,
                            work_until=work_until,
                            answer_until=answer_until,
                        )
                    )
                    for i in range(WORKERS)
                ]
                + [
                    asyncio.create_task(
                        withdraw(
                            payout_stub,
                            tokens,
                            creators,
                            random.Random(rng.random()),
                            book,
                            work_until=work_until,
                            answer_until=answer_until,
                        )
                    )
                ]
                + [
                    asyncio.create_task(
                        buy_coins(
                            wallet,
                            tokens,
                            viewers,
                            random.Random(rng.random()),
                            book,
                            work_until=work_until,
                            answer_until=answer_until,
                        )
                    )
                    for _ in range(2)
                ]
                + [
                    asyncio.create_task(
                        promote(
                            promotion_pb2_grpc.PromotionServiceStub(promotion_channel),  # type: ignore[arg-type]
                            promotion_pb2_grpc.PromotionServiceStub(ad_channel),  # type: ignore[arg-type]
                            tokens,
                            viewers,
                            random.Random(rng.random()),
                            work_until=work_until,
                            answer_until=answer_until,
                        )
                    )
                    for _ in range(2)
                ]
            )
            try:
                await nemesis.run(work_seconds)
            finally:
                await nemesis.heal()
            await asyncio.gather(*callers)
            print(f"faults: {nemesis.done}; restarted after exiting: {nemesis.restarted}")
            print(
                f"acknowledged {len(book.acked)} gifts and {len(book.purchases)} purchases, refused "
                f"{len(book.refused)}, abandoned "
                f"{len(book.abandoned)}, retries {book.retried_codes}"
            )
            assert book.acked, "no gift got through: the workload measured nothing"
            # Refusals are definitive answers: not enough coins, or a reconciler settled a gift or
            # a purchase left pending while its caller was still retrying (the wallet never saw the
            # debit, or the provider never saw the charge and its key was voided there: it failed
            # and nothing moved; the workload's payment tokens are never declined otherwise).
            refusals = set(book.refused.values())
            allowed = {
                "FAILED_PRECONDITION INSUFFICIENT_FUNDS",
                "FAILED_PRECONDITION DEBIT_VOIDED",
                "FAILED_PRECONDITION PURCHASE_VOIDED",
            }
            assert refusals <= allowed, refusals

            async def settled() -> bool:
                rows = await fetch(
                    urls["gifting"],
                    "SELECT (SELECT count(*) FROM sent_gifts WHERE status = 'pending') + "
                    "(SELECT count(*) FROM credit_outbox WHERE delivered_at IS NULL)",
                )
                buying = await fetch(
                    urls["wallet"], "SELECT count(*) FROM purchases WHERE status = 'pending'"
                )
                promoting = await fetch(
                    urls["promotion"],
                    "SELECT (SELECT count(*) FROM promotions WHERE status = 'pending') + "
                    "(SELECT count(*) FROM pending_captures)",
                )
                paying = await fetch(
                    urls["payout"],
                    "SELECT count(*) FROM withdrawals WHERE status IN ('approved', 'processing')",
                )
                return (
                    int(rows[0][0]) == 0
                    and int(buying[0][0]) == 0
                    and int(promoting[0][0]) == 0
                    and int(paying[0][0]) == 0
                )

            await eventually(settled, "every gift settled and credited", seconds=settle_seconds)
            if leases is not None:
                await leases.check_handovers(nemesis.killed)

            gifts = await fetch(
                urls["gifting"],
                "SELECT sent_gift_id, sender_id, creator_id, coins, status FROM sent_gifts",
            )
            debited = {g[0]: g for g in gifts if g[4] == "debited"}
            assert {g[4] for g in gifts} <= {"debited", "failed"}
            for request_id, (sent_gift_id, sender, coins) in book.acked.items():
                assert sent_gift_id in debited, (
                    f"acknowledged gift {sent_gift_id} ({request_id}) lost"
                )
                assert (debited[sent_gift_id][1], debited[sent_gift_id][3]) == (sender, coins)
            dead = await fetch(urls["gifting"], "SELECT count(*) FROM credit_outbox WHERE dead")
            assert dead[0][0] == 0, "a credit was parked"

            balances = dict(
                await fetch(
                    urls["wallet"],
                    "SELECT account_id, balance FROM ledger_accounts WHERE account_id LIKE 'user:%'",
                )
            )
            purchases = await fetch(
                urls["wallet"], "SELECT purchase_id, user_id, coins, status FROM purchases"
            )
            completed = {p[0]: p for p in purchases if p[3] == "completed"}
            for purchase_id in book.purchases.values():
                assert purchase_id in completed, (
                    f"acknowledged purchase {purchase_id} not completed"
                )
            charges = SandboxPaymentProvider(
                0, suite.tmp / "data" / "sandbox-payments.sqlite3"
            ).charges()
            approved = {key for key, charge in charges.items() if charge.approved}
            assert approved == set(completed), (
                f"charged without coins: {sorted(approved - set(completed))[:5]}, "
                f"coins without a charge: {sorted(set(completed) - approved)[:5]}"
            )
            promoted = dict(
                await fetch(
                    urls["promotion"],
                    "SELECT user_id, sum(spent_coins) FROM promotions "
                    "WHERE status IN ('active', 'completed') GROUP BY user_id",
                )
            )
            print(f"promotion spend by owner: {promoted}")
            assert promoted, "no promotion got through: the workload measured nothing"
            for viewer in viewers:
                spent = sum(g[3] for g in debited.values() if g[1] == viewer)
                paid_for = sum(p[2] for p in completed.values() if p[1] == viewer)
                expected = paid_for - spent - int(promoted.get(viewer, 0))
                assert balances[f"user:{viewer}"] == expected, viewer
            spend = await fetch(
                urls["wallet"],
                "SELECT count(*), coalesce(sum(e.amount), 0) FROM ledger_entries e "
                "JOIN ledger_transactions t USING (transaction_id) "
                "WHERE t.kind = 'gift' AND e.account_id = 'system:gift_spend'",
            )
            assert (spend[0][0], spend[0][1]) == (
                len(debited),
                sum(g[3] for g in debited.values()),
            ), "wallet gift debits differ from the gifts recorded (a debit lost or doubled)"

            credits = await fetch(
                urls["payout"], "SELECT credit_key, creator_id, coins FROM gift_credits"
            )
            by_gift = {c[0].rsplit("/gift:", 1)[1]: c for c in credits}
            assert len(credits) == len(by_gift) == len(debited), "a gift credited twice or never"
            for sent_gift_id, gift in debited.items():
                assert sent_gift_id in by_gift, f"gift {sent_gift_id} debited but never credited"
                assert (by_gift[sent_gift_id][1], by_gift[sent_gift_id][2]) == (gift[2], gift[3])

            # Withdrawals: every acknowledged one ended; every paid one was paid once at the
            # processor (whose records survive payout's restarts), for its amount; nothing else.
            refused_by = collections.Counter(book.withdrawal_refusals.values())
            print(f"withdrawals {len(book.withdrawals)}, refused {dict(refused_by)}")
            assert set(book.withdrawal_refusals.values()) <= {
                "FAILED_PRECONDITION INSUFFICIENT_FUNDS",
            }, book.withdrawal_refusals
            withdrawals = {
                w[0]: w
                for w in await fetch(
                    urls["payout"],
                    "SELECT withdrawal_id, status, gross_minor - fee_minor FROM withdrawals",
                )
            }
            for withdrawal_id in book.withdrawals.values():
                assert withdrawals[withdrawal_id][1] == "paid", withdrawals[withdrawal_id]
            with sqlite3.connect(suite.tmp / "data" / "sandbox-payouts.sqlite3") as sandbox:
                payments = sandbox.execute(
                    "SELECT sender_item_id, count(*), min(amount_minor) FROM payments GROUP BY 1"
                ).fetchall()
            paid = {w for w, row in withdrawals.items() if row[1] == "paid"}
            assert {p[0] for p in payments} == paid, (
                "a payment without a paid withdrawal, or one lost"
            )
            for item, count, amount in payments:
                assert count == 1, f"withdrawal {item} paid {count} times at the processor"
                assert amount == withdrawals[item][2]

            books = await cross_audit(
                {
                    name: f"postgresql+asyncpg://postgres@127.0.0.1:{postgres.port}/"
                    f"coins_bench_{name}_{suite.run}"
                    for name in SERVICES
                },
                # The items' statuses as the sandbox answers the services: with their timings.
                sandbox_items(
                    suite.tmp / "data" / "sandbox-payouts.sqlite3",
                    PayoutSettings(
                        processor_settle_ms=int(suite.settings["PAYOUT_PROCESSOR_SETTLE_MS"])
                    ),
                ),
            )
            assert books.withdrawals_checked >= len(book.withdrawals)
            assert books.ok and not books.in_flight, books.differences[:5]
            for channel in (wallet_channel, payout_channel):
                report = await ledger_audit_pb2_grpc.LedgerAuditServiceStub(channel).AuditLedger(
                    ledger_audit_pb2.AuditLedgerRequest(), metadata=admin, timeout=30
                )
                assert report.ok, report
            errors, problems, _ = suite.log_problems()
            print(f"service log errors: {errors} {dict(problems)}")
            if replicas > 1:
                served = {
                    instance: len(ANSWERED.findall(suite.children[instance].log.read_text()))
                    for instance in suite.instances()
                }
                print(f"calls answered by each process: {served}")
                busy = ("wallet", "gifting", "payout")
                assert all(served[i] > 0 for i in suite.instances(busy)), served


def caller_channel(
    suite: SuiteProcesses, name: str, credentials: grpc.ChannelCredentials
) -> grpc.aio.Channel:
    """A caller's channel to a service: to its one process, or spread over its replicas."""
    return grpc.aio.secure_channel(
        suite.address(name), credentials, options=suite.channel_options(name)
    )


class LeaseWatch:
    """Who holds each service's periodic jobs' lease (runtime.leadership), read from its database
    every quarter second while the chaos runs."""

    def __init__(self, urls: dict[str, str], suite: SuiteProcesses, *, seconds: float) -> None:
        """Watch for at most `seconds` (it stops by itself if the test fails before it checks)."""
        self.urls, self.suite = urls, suite
        self.seen: dict[str, list[tuple[float, str]]] = {name: [] for name in urls}
        """Service -> (when first seen, holder) in the order holders were seen."""
        self._until = asyncio.get_running_loop().time() + seconds
        self._task = asyncio.create_task(self._watch())

    async def ready(self, services: Sequence[str]) -> None:
        """Wait until the leader of each of `services` is known (the nemesis kills one first)."""

        async def known() -> bool:
            return all(self.leader(name) is not None for name in services)

        await eventually(known, f"the lease holders of {list(services)}", seconds=15)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < self._until:
            for name, url in self.urls.items():
                with contextlib.suppress(Exception):  # the database may be down: read it next time
                    rows = await fetch(url, f"SELECT holder FROM job_leases WHERE name = '{name}'")
                    holder = str(rows[0][0]) if rows else ""
                    seen = self.seen[name]
                    if holder and (not seen or seen[-1][1] != holder):
                        seen.append((loop.time(), holder))
            await asyncio.sleep(0.25)

    def leader(self, service: str) -> str | None:
        """The instance holding `service`'s lease as last seen (None: not seen yet)."""
        seen = self.seen[service]
        if not seen:
            return None
        pid = seen[-1][1].split(":")[1]
        for instance in self.suite.instances([service]):
            if str(self.suite.children[instance].pid) == pid:
                return instance
        return None

    def holder_at(self, service: str, when: float) -> str | None:
        """The holder of `service`'s lease as last seen at or before `when`."""
        held = [holder for seen, holder in self.seen[service] if seen <= when]
        return held[-1] if held else None

    async def check_handovers(self, killed: Sequence[tuple[str, int, float]]) -> None:
        """Every kill of a lease holder is followed by another process holding the lease, within
        the lease and a retry (runtime.leadership: 10 s and 2 s; a kill near the end of the work
        may still be waiting for its lease to run out when the books have settled): the periodic
        jobs go on without it. Holders read `host:pid:nonce`."""
        leaders_killed = []
        for instance, pid, when in killed:
            service = instance.split(".")[0]
            holder = self.holder_at(service, when)
            if holder is not None and holder.split(":")[1] == str(pid):
                leaders_killed.append((instance, service, holder, when))
        assert leaders_killed, f"no lease holder was killed, no handover exercised: {killed}"

        def taken_over(service: str, holder: str, when: float) -> bool:
            return any(seen > when and h != holder for seen, h in self.seen[service])

        async def all_taken_over() -> bool:
            return all(taken_over(s, h, w) for _, s, h, w in leaders_killed)

        try:
            await eventually(
                all_taken_over,
                f"another process taking every killed leader's lease: {leaders_killed}, "
                f"holders seen {self.seen}",
                seconds=30,
            )
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        print(
            f"lease handovers after a leader was killed: {len(leaders_killed)}; holders seen: "
            + ", ".join(f"{s} {len(h)}" for s, h in self.seen.items())
        )


async def fetch(url: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()
