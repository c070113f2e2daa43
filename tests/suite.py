"""Start the four real services in-process on loopback ports, on SQLite files or fresh PostgreSQL databases.

Used by the test fixtures and the benchmark. Every service gets its own database, as in production,
and the production trust boundary: mutual TLS with a dev CA made for the run, and user tokens.

`suite.wallet` (and the other three) are stubs of the platform gateway acting for the user each
request names (it mints that user a token), which keeps the business tests about business. The
security tests use `suite.stub(...)` to call with any identity and any token, or none.
"""

from __future__ import annotations

import functools
import os
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import grpc.aio
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from coins.gifting.v1 import gifting_pb2_grpc
from coins.payout.v1 import payout_pb2_grpc
from coins.promotion.v1 import promotion_pb2_grpc
from coins.wallet.v1 import wallet_pb2_grpc
from runtime import pki
from runtime.auth import AUTHORIZATION, TokenIssuer, token_metadata
from runtime.clock import Clock
from runtime.config import SecuritySettings
from runtime.server import RunningService, ServiceSpec, start_service
from runtime.telemetry import make_tracer_provider
from services.gifting.service import SPEC as GIFTING
from services.payout.service import SPEC as PAYOUT
from services.promotion.service import SPEC as PROMOTION
from services.wallet.service import SPEC as WALLET

if TYPE_CHECKING:  # the async stub types exist only in the generated .pyi files
    from coins.gifting.v1.gifting_pb2_grpc import GiftingServiceAsyncStub
    from coins.payout.v1.payout_pb2_grpc import PayoutServiceAsyncStub
    from coins.promotion.v1.promotion_pb2_grpc import PromotionServiceAsyncStub
    from coins.wallet.v1.wallet_pb2_grpc import WalletServiceAsyncStub

PAYOUT_WEBHOOK_SECRET = secrets.token_hex(32)
"""The suite's payout webhook secret, made for the run: off a dev PKI (as the suite runs) payout
refuses the public default, and the sandbox processor signs its callbacks with this one."""

PG_ADMIN_URL = os.environ.get(
    "COINS_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


async def require_postgres() -> None:
    """Fail the test (never skip it) when PostgreSQL is not reachable."""
    try:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as error:
        pytest.fail(
            f"PostgreSQL is required for the storage tests and is not reachable at {PG_ADMIN_URL}: "
            f"{error}. Start it (see README) or set COINS_TEST_BACKENDS=sqlite for a local run.",
            pytrace=False,
        )
    await conn.close()


async def create_pg_database(name: str) -> str:
    """Create an empty PostgreSQL database; returns its SQLAlchemy asyncpg URL."""
    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}"


async def drop_pg_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


_USER_FIELDS = ("user_id", "sender_id", "creator_id")
ANY_VIEWER = "any-signed-in-viewer"
"""Whom the gateway stubs act for when a request names no user (the catalog, a leaderboard)."""


class ActForRequestUser(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """The gateway's part: a call without a token gets one for the user its request names
    (or for ANY_VIEWER when it names none)."""

    def __init__(self, issuer: TokenIssuer) -> None:
        self._issuer = issuer

    async def intercept_unary_unary(
        self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        present = details.metadata or grpc.aio.Metadata()
        user = next((getattr(request, f) for f in _USER_FIELDS if hasattr(request, f)), None)
        user = user or ANY_VIEWER
        if not any(key == AUTHORIZATION for key, _ in present):
            details = grpc.aio.ClientCallDetails(
                details.method,
                details.timeout,
                grpc.aio.Metadata(*present, *token_metadata(self._issuer.mint(user))),
                details.credentials,
                details.wait_for_ready,
            )
        return await continuation(details, request)


@dataclass
class Suite:
    backend: str
    spans: InMemorySpanExporter
    services: dict[str, RunningService[Any]]
    security: SecuritySettings
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    pg_databases: list[str] = field(default_factory=list)
    _gateway_stubs: dict[str, Any] = field(default_factory=dict)

    def _gateway(self, service: str, identity: str = "gateway") -> Any:
        key = f"{identity}->{service}"
        if key not in self._gateway_stubs:
            self._gateway_stubs[key] = self.stub(
                service, identity=identity, act_for_request_user=True
            )
        return self._gateway_stubs[key]

    def as_caller(self, identity: str) -> CallerStubs:
        """Stubs presenting another platform service's certificate (say gifting, to call the
        internal DebitCoins), passing on a token for the user each request names."""
        return CallerStubs(self, identity)

    @functools.cached_property
    def issuer(self) -> TokenIssuer:
        return TokenIssuer.dev(self.security)

    def token(self, user_id: str, *, admin: bool = False) -> tuple[tuple[str, str], ...]:
        """Call metadata with a fresh token for `user_id` (with the admin role if `admin`)."""
        return tuple(token_metadata(self.issuer.mint(user_id, roles=["admin"] if admin else [])))

    def channel(
        self,
        service: str,
        *,
        identity: str | None = "gateway",
        credentials: grpc.ChannelCredentials | None = None,
        act_for_request_user: bool = False,
        options: Sequence[tuple[str, Any]] = (),
    ) -> grpc.aio.Channel:
        """A channel to `service` presenting `identity`'s certificate (None: no client certificate),
        with gRPC channel `options` (keepalive, say) if given."""
        certs = self.security.certs_dir
        if credentials is None:
            ca = (certs / "ca.pem").read_bytes()
            credentials = (
                grpc.ssl_channel_credentials(
                    ca,
                    (certs / f"{identity}-key.pem").read_bytes(),
                    (certs / f"{identity}.pem").read_bytes(),
                )
                if identity
                else grpc.ssl_channel_credentials(ca)
            )
        interceptors = [ActForRequestUser(self.issuer)] if act_for_request_user else None
        channel = grpc.aio.secure_channel(
            self.services[service].address,
            credentials,
            options=list(options),
            interceptors=interceptors,
        )
        self.channels.append(channel)
        return channel

    def allowed_identity(self, service: str, method_path: str) -> str:
        """A caller the method's access rule lets in: its first allowed service, or the gateway."""
        rule = self.services[service].spec.access.get(method_path)
        return sorted(rule.callers)[0] if rule is not None and rule.callers else "gateway"

    def health_channel(self, service: str) -> grpc.aio.Channel:
        """A plaintext channel to the service's health port, as a Kubernetes probe connects."""
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.services[service].health_port}")
        self.channels.append(channel)
        return channel

    def stub(self, service: str, **channel_options: Any) -> Any:
        """A stub of `service` over `self.channel(service, **channel_options)`."""
        module = {
            "wallet": wallet_pb2_grpc.WalletServiceStub,
            "gifting": gifting_pb2_grpc.GiftingServiceStub,
            "payout": payout_pb2_grpc.PayoutServiceStub,
            "promotion": promotion_pb2_grpc.PromotionServiceStub,
        }
        return module[service](self.channel(service, **channel_options))

    @property
    def wallet(self) -> WalletServiceAsyncStub:
        return self._gateway("wallet")  # type: ignore[no-any-return]

    @property
    def gifting(self) -> GiftingServiceAsyncStub:
        return self._gateway("gifting")  # type: ignore[no-any-return]

    @property
    def payout(self) -> PayoutServiceAsyncStub:
        return self._gateway("payout")  # type: ignore[no-any-return]

    @property
    def promotion(self) -> PromotionServiceAsyncStub:
        return self._gateway("promotion")  # type: ignore[no-any-return]

    @property
    def ad_delivery(self) -> PromotionServiceAsyncStub:
        """Promotion as the ad-delivery system calls it (ReportDelivery): its certificate, and no
        user token."""
        key = "ad-delivery->promotion"
        if key not in self._gateway_stubs:
            self._gateway_stubs[key] = self.stub("promotion", identity="ad-delivery")
        return self._gateway_stubs[key]  # type: ignore[no-any-return]

    async def stop(self) -> None:
        for channel in self.channels:
            await channel.close()
        for name in ("gifting", "promotion", "payout", "wallet"):
            if name in self.services:
                await self.services[name].stop(grace=0.5)
        for database in self.pg_databases:
            await drop_pg_database(database)


@dataclass(frozen=True)
class CallerStubs:
    suite: Suite
    identity: str

    @property
    def wallet(self) -> WalletServiceAsyncStub:
        return self.suite._gateway("wallet", self.identity)  # type: ignore[no-any-return]

    @property
    def payout(self) -> PayoutServiceAsyncStub:
        return self.suite._gateway("payout", self.identity)  # type: ignore[no-any-return]

    @property
    def gifting(self) -> GiftingServiceAsyncStub:
        return self.suite._gateway("gifting", self.identity)  # type: ignore[no-any-return]


async def start_suite(
    backend: str,
    data_dir: Path,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    only: tuple[str, ...] = ("wallet", "payout", "gifting", "promotion"),
    clock: Clock | None = None,
) -> Suite:
    """Start the services in `only` (dependencies first) with an in-memory span exporter, all
    reading `clock` (default: the system clock)."""
    overrides = overrides or {}
    certs = data_dir / "certs"
    pki.ensure_dev_pki(certs)
    security = SecuritySettings(certs_dir=certs, dev_pki=False, **(overrides.get("security") or {}))
    suite = Suite(backend, InMemorySpanExporter(), {}, security)
    run_id = uuid.uuid4().hex[:8]
    specs: dict[str, ServiceSpec[Any]] = {
        "wallet": WALLET,
        "payout": PAYOUT,
        "gifting": GIFTING,
        "promotion": PROMOTION,
    }
    try:
        for name in only:
            spec = specs[name]
            options: dict[str, Any] = {
                "host": "127.0.0.1",
                "port": 0,
                "health_port": 0,
                "data_dir": data_dir,
                "security": security,
            }
            if backend == "postgres":
                database = f"coins_test_{name}_{run_id}"
                options["database_url"] = await create_pg_database(database)
                # A run keeps a shared suite and a test's own alive at once, on a server whose
                # max_connections is 100 (this machine's): 4 services x 10 each left too few.
                options["database_connections"] = 5
                suite.pg_databases.append(database)
            else:
                options["database_url"] = f"sqlite+aiosqlite:///{data_dir / f'{name}-{run_id}.db'}"
            for dependency in ("wallet", "payout"):
                if dependency in suite.services:
                    options[f"{dependency}_address"] = suite.services[dependency].address
            if name == "wallet":
                options["hold_sweep_seconds"] = 0.2  # expiries show within a test's patience
            if name == "gifting":  # streaks end (tests/test_streaks.py moves a clock), and
                options.update(  # payout's reversals apply, within a test's patience; an
                    # EndLive waits at most 2 s for a gift left pending (tests leave some on purpose)
                    streak_pause_seconds=0.3,
                    streak_sweep_seconds=0.05,
                    reversals_every_seconds=0.5,
                    end_live_patience_seconds=2.0,
                )
            if name == "payout":
                options["processor_webhook_secret"] = PAYOUT_WEBHOOK_SECRET
                # Most tests withdraw what they just credited; tests/test_payout_maturation.py
                # runs payout with its maturation period on a clock it moves.
                options["maturation_days"] = 0
                # The sandbox processor at test speed: items settle, and callbacks arrive (late,
                # out of order, some twice), within a few hundred milliseconds.
                options.update(
                    processor_latency_ms=5,
                    processor_settle_ms=30,
                    processor_unclaimed_return_ms=300,
                    processor_callback_delay_ms=100,
                    processor_duplicate_callback_percent=50,
                    processor_poll_seconds=1.0,
                    processor_timeout_seconds=2.0,  # a withdrawal's lease: 2 x this + 1 s
                )
            options.update(overrides.get(name, {}))
            settings = spec.settings_type(**options)
            provider = make_tracer_provider(name, exporter=suite.spans)
            suite.services[name] = await start_service(
                spec, settings, tracer_provider=provider, clock=clock
            )
    except BaseException:
        await suite.stop()
        raise
    return suite
