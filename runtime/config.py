"""Settings from environment variables (pydantic-settings), shared by every service.

Each service subclasses ServiceSettings with its own prefix: WALLET_PORT, GIFTING_DATABASE_URL,
PAYOUT_MIN_WITHDRAWAL_MINOR, ... Defaults run the whole suite on one machine with SQLite files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

SUITE_PLACES = {"wallet": 1, "gifting": 2, "payout": 3, "promotion": 4}
"""Each service's place in the suite: its API port is COINS_PORT_BASE + place, its health port 10
more (with the default base 50050: wallet 50051 and 50061 ... promotion 50054 and 50064)."""
DEFAULT_PORT_BASE = 50050


def port_base() -> int:
    """COINS_PORT_BASE: one setting that moves the whole suite (services, their downstream
    addresses, coinsctl) to other ports."""
    value = os.environ.get("COINS_PORT_BASE", "").strip()
    if not value:
        return DEFAULT_PORT_BASE
    try:
        base = int(value)
    except ValueError:
        raise SystemExit(f"COINS_PORT_BASE={value!r} is not a port number (e.g. 60050)") from None
    if not 1024 <= base <= 65_500:
        raise SystemExit(f"COINS_PORT_BASE={base} must be between 1024 and 65500")
    return base


def suite_address(service: str, *, health: bool = False) -> str:
    """Where a service of this suite listens by default (its API, or its health port)."""
    return f"127.0.0.1:{port_base() + SUITE_PLACES[service] + (10 if health else 0)}"


class SecuritySettings(BaseSettings):
    """The trust boundary, shared by every service of one platform (environment variables COINS_*).

    Defaults are the local development set-up: a dev CA and keys generated under `certs/` on first
    start. Production sets COINS_DEV_PKI=false and mounts real files at the same paths.
    """

    model_config = SettingsConfigDict(env_prefix="COINS_", extra="ignore")

    certs_dir: Path = Path("certs")
    """ca.pem (the CA every peer must be signed by), <service>.pem and <service>-key.pem."""
    dev_pki: bool = True
    """Generate a dev CA, certificates and a token signing key in certs_dir when missing."""
    jwt_keys_dir: Path | None = None
    """Public keys that verify user tokens, one `<kid>.pem` each (default certs_dir/jwt). Re-read when
    a token names an unknown kid, so a new key is picked up without a restart."""
    jwt_issuer: str = "coins-dev"
    jwt_audience: str = "coins"
    jwt_max_ttl_seconds: PositiveInt = 3600
    """Tokens valid for longer than this (exp - iat) are refused: user tokens are short-lived."""
    jwt_leeway_seconds: NonNegativeInt = 30
    user_rate_per_second: PositiveFloat = 10.0
    """Per user, per money-moving RPC: sustained calls per second ..."""
    user_rate_burst: PositiveInt = 40
    """... and how many may come at once."""
    caller_rate_per_second: PositiveFloat = 2000.0
    """Per calling service, per money-moving RPC (a whole gateway or gifting's traffic)."""
    caller_rate_burst: PositiveInt = 4000
    rate_limit_redis_url: str = ""
    """Redis shared by every replica for the rate limits (e.g. redis://127.0.0.1:6379/0); empty:
    each process enforces them alone."""

    @field_validator("rate_limit_redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "write redis://host:port/db (or rediss://, unix://), or leave it empty"
            )
        return value

    @property
    def verification_keys_dir(self) -> Path:
        return self.jwt_keys_dir or self.certs_dir / "jwt"


_HOST_PORT = r"(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}"
_GRPC_TARGET = re.compile(
    rf"{_HOST_PORT}|dns:(?:///|//[^/]+/)?{_HOST_PORT}|ipv4:{_HOST_PORT}(?:,{_HOST_PORT})*"
    rf"|ipv6:{_HOST_PORT}(?:,{_HOST_PORT})*|unix:.+"
)
"""The gRPC targets a downstream address may be (a typo such as "not a host::" started, logged
where it would call and answered SERVING, then failed every call that needed it)."""
_TARGET_PORTS = re.compile(r"(?<!unix):(\d+)(?=,|$)")
"""Their port numbers, each 1-65535 (`localhost:99999` started and could never connect)."""


class ServiceSettings(BaseSettings):
    """What every service can be told: where to listen, where its database is, how to behave under load."""

    model_config = SettingsConfigDict(extra="ignore")

    service_name: ClassVar[str]

    host: str = "127.0.0.1"
    port: int = Field(default=-1, ge=-1, le=65535)
    """Where the API listens (mutual TLS); -1: COINS_PORT_BASE + the service's place (SUITE_PLACES);
    0: any free port."""
    health_port: int = Field(default=-1, ge=-1, le=65535)
    """Plaintext port that serves only grpc.health.v1 (Kubernetes' gRPC probes speak plaintext);
    -1: 10 above the API's default."""
    database_url: str = ""
    """SQLAlchemy async URL; empty means a SQLite file `<data_dir>/<service>.db`."""
    data_dir: Path = Field(default_factory=lambda: Path(os.environ.get("COINS_DATA_DIR") or "data"))
    """SQLite files and the sandboxes' files; COINS_DATA_DIR moves every service's (as
    COINS_PORT_BASE moves their ports), <SVC>_DATA_DIR one service's."""
    database_role: str = "coins_service"
    """On PostgreSQL, the role the service's connections act as (set at connection start): the one
    the migrations grant everything but rewriting history (no UPDATE, DELETE or TRUNCATE of ledger
    and audit rows). Migrations run as the login user. Empty: act as the login user, for a deployment
    whose login role is restricted already."""
    database_connections: int = Field(default=10, ge=2)
    """On PostgreSQL, the most connections each of the service's two pools opens: the calls' own
    (asyncpg) and the slow paths' (SQLAlchemy, which keeps up to 4 open when idle). Up to twice
    this per replica counts against PostgreSQL's max_connections (100 by default)."""
    database_idle_transaction_timeout_seconds: PositiveFloat = 10.0
    """On PostgreSQL, how long a connection of the service may sit idle inside a transaction before
    the server ends its session (idle_in_transaction_session_timeout): a replica frozen or cut off
    mid-transaction otherwise holds its row locks until TCP gives up (hours), and the other
    replicas' calls queue behind them until their pools and health fail too. The services'
    transactions last milliseconds; the audit job has its own connection."""
    migrate_on_start: bool = True
    migration_wait_seconds: float = Field(default=30.0, ge=0)
    """With `migrate_on_start` false: how long a starting service waits for its database to be
    migrated (the migrate Job may still be running) before it stops with what to run. Under the
    Kubernetes liveness probe's ~40 s."""
    health_check_seconds: PositiveFloat = 2.0
    """How often the service checks that its database answers; health reports NOT_SERVING while
    it does not."""
    reflection: bool = True
    grace_seconds: NonNegativeFloat = 5.0
    max_concurrent_rpcs: PositiveInt = 2000
    """gRPC's own bound on calls in flight (refused RESOURCE_EXHAUSTED beyond it, no queue)."""
    max_streams_per_connection: int = Field(default=64, ge=1)
    """HTTP/2 streams (calls) one client connection may have open at once (MAX_CONCURRENT_STREAMS).
    What bounds a burst's memory: without it grpc takes in every stream a client sends and holds its
    request until the event loop gets to it (a 5x burst grew a service by 60 MB, all outside
    Python); each call in flight costs ~50 KB, mostly outside Python (gifting: 100 streams peaked
    at 157 MB in the benchmark's burst, 64 at 148). A gRPC client queues the excess on its side
    (HTTP/2 flow control); a stream opened beyond the limit anyway is refused at once
    (UNAVAILABLE, never processed, so safe to retry)."""
    max_in_flight_rpcs: PositiveInt = 512
    """Calls in flight beyond which new ones are refused at once (OVERLOADED, see runtime.shedding)."""
    max_queue_seconds: PositiveFloat = 2.0
    """How long a new call may expect to wait behind those in flight before it is refused instead
    (OVERLOADED with a RetryInfo): accepted calls keep their latency through a burst. Above the
    slowest legitimate call (a 500-credit settlement batch takes ~0.5-0.8 s under load), since the
    budget is the process's, not each method's."""
    max_message_bytes: PositiveInt = 1024 * 1024
    """The largest request (and answer) a call may carry: a larger request is refused
    RESOURCE_EXHAUSTED REQUEST_TOO_LARGE; one above 4x this by gRPC's core (same code, no ErrorInfo)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    """Any case (`debug`); anything else is refused at start (logging raised deep in start-up)."""
    log_format: Literal["text", "json"] = "text"
    """`json`: one JSON object per line with trace and span ids (for a log pipeline)."""
    access_log: bool | None = None
    """One log line per RPC (method, code, reason, duration, request id); default: with JSON logs."""

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_capitals(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve the service's metrics for a Prometheus scrape on this port (`/metrics`); unset: none.
    OTLP export follows OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_METRICS_EXPORTER."""
    metrics_sample_seconds: PositiveFloat = 15.0
    """How often the replica that runs the periodic jobs reads the gauges from the database
    (backlogs, holds open, withdrawals by state, parked work, audit findings)."""
    downstream_timeout_seconds: PositiveFloat = 5.0
    """Deadline for a call to another service when the incoming call carries none."""
    idempotency_retention_hours: float = Field(default=48.0, ge=24.0)
    """How long answered request ids are remembered (a retry within it never acts twice)."""
    security: SecuritySettings = Field(default_factory=SecuritySettings)

    @model_validator(mode="after")
    def _place_in_suite(self) -> ServiceSettings:
        """Ports and downstream addresses left unset follow COINS_PORT_BASE."""
        place = SUITE_PLACES.get(self.service_name, 0)
        if self.port < 0:
            self.port = port_base() + place
        if self.health_port < 0:
            self.health_port = port_base() + 10 + place
        for name in type(self).model_fields:
            if not name.endswith("_address"):
                continue
            value = getattr(self, name)
            if value == "":
                setattr(self, name, suite_address(name.removesuffix("_address")))
            elif not _GRPC_TARGET.fullmatch(value) or not all(
                0 < int(port) < 65536 for port in _TARGET_PORTS.findall(value)
            ):
                raise ValueError(
                    f"{self.env_prefix}{name.upper()}={value!r} is not an address: write "
                    "host:port, dns:///name:port or ipv4:host:port,host:port"
                )
        return self

    @property
    def step_log(self) -> bool:
        """Whether every RPC and every background step gets its own log line."""
        return self.log_format == "json" if self.access_log is None else self.access_log

    def policy(self) -> str:
        """The business settings in force, said once at start ("" for none): an operator reading
        the log sees which rates and limits the service runs with."""
        return ""

    @property
    def env_prefix(self) -> str:
        """The prefix of this service's variables, e.g. "GIFTING_"."""
        return str(self.model_config.get("env_prefix", ""))

    def resolved_database_url(self) -> str:
        """The URL with its async driver: postgresql:// (or postgres://) is taken as
        postgresql+asyncpg://, sqlite:/// as sqlite+aiosqlite:///."""
        url = self.database_url
        for plain, driver in (
            ("postgresql://", "postgresql+asyncpg://"),
            ("postgres://", "postgresql+asyncpg://"),
            ("sqlite:///", "sqlite+aiosqlite:///"),
        ):
            if url.startswith(plain):
                return driver + url.removeprefix(plain)
        if url:
            return url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite+aiosqlite:///{(self.data_dir / f'{self.service_name}.db').resolve()}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
