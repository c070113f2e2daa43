"""Start the four real services in-process on loopback ports, on SQLite files or fresh PostgreSQL databases.

Used by the test fixtures and the benchmark. Every service gets its own database, as in production.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import grpc.aio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from coins.gifting.v1 import gifting_pb2_grpc
from coins.payout.v1 import payout_pb2_grpc
from coins.promotion.v1 import promotion_pb2_grpc
from coins.wallet.v1 import wallet_pb2_grpc
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

PG_ADMIN_URL = os.environ.get(
    "COINS_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


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


@dataclass
class Suite:
    backend: str
    spans: InMemorySpanExporter
    services: dict[str, RunningService[Any]]
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    pg_databases: list[str] = field(default_factory=list)

    def channel(self, service: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(self.services[service].address)
        self.channels.append(channel)
        return channel

    @property
    def wallet(self) -> WalletServiceAsyncStub:
        return wallet_pb2_grpc.WalletServiceStub(self.channel("wallet"))

    @property
    def gifting(self) -> GiftingServiceAsyncStub:
        return gifting_pb2_grpc.GiftingServiceStub(self.channel("gifting"))

    @property
    def payout(self) -> PayoutServiceAsyncStub:
        return payout_pb2_grpc.PayoutServiceStub(self.channel("payout"))

    @property
    def promotion(self) -> PromotionServiceAsyncStub:
        return promotion_pb2_grpc.PromotionServiceStub(self.channel("promotion"))

    async def stop(self) -> None:
        for channel in self.channels:
            await channel.close()
        for name in ("gifting", "promotion", "payout", "wallet"):
            if name in self.services:
                await self.services[name].stop(grace=0.5)
        for database in self.pg_databases:
            await drop_pg_database(database)


async def start_suite(
    backend: str,
    data_dir: Path,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    only: tuple[str, ...] = ("wallet", "payout", "gifting", "promotion"),
) -> Suite:
    """Start the services in `only` (dependencies first) with an in-memory span exporter."""
    overrides = overrides or {}
    suite = Suite(backend, InMemorySpanExporter(), {})
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
            options: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "data_dir": data_dir}
            if backend == "postgres":
                database = f"coins_test_{name}_{run_id}"
                options["database_url"] = await create_pg_database(database)
                suite.pg_databases.append(database)
            else:
                options["database_url"] = f"sqlite+aiosqlite:///{data_dir / f'{name}-{run_id}.db'}"
            for dependency in ("wallet", "payout"):
                if dependency in suite.services:
                    options[f"{dependency}_address"] = suite.services[dependency].address
            options.update(overrides.get(name, {}))
            settings = spec.settings_type(**options)
            provider = make_tracer_provider(name, exporter=suite.spans)
            suite.services[name] = await start_service(spec, settings, tracer_provider=provider)
    except BaseException:
        await suite.stop()
        raise
    return suite
