"""Metrics: one MeterProvider per service, exported by OTLP and/or served for a Prometheus scrape.

What every service measures lives here: each RPC's duration and status (`rpc.server.call.duration`,
the OpenTelemetry semantic convention; its count by status code is the error rate), each
background step (`coins.job.runs`, `coins.job.items`, `coins.job.duration`), and the gauges a
service reads from its own database (`Gauges`: outbox backlog, holds open, withdrawals by state,
parked work, the last audit's findings), sampled by the replica that runs the periodic jobs so
that N replicas report one value. Business counters (coins purchased, coins spent by purpose,
gifts sent, diamonds credited) are counted where the money moves, once it has committed
(`after_commit`): a rolled-back transaction counts nothing, a replayed request counts nothing.

Exporters, by the standard variables: OTLP when OTEL_METRICS_EXPORTER=otlp, or when it is unset
and OTEL_EXPORTER_OTLP_ENDPOINT is set (interval OTEL_METRIC_EXPORT_INTERVAL, ms); a Prometheus
text endpoint on `<SVC>_METRICS_PORT` when that is set.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

log = logging.getLogger("coins.metrics")

_pending: contextvars.ContextVar[list[Callable[[], None]] | None] = contextvars.ContextVar(
    "coins_after_commit", default=None
)


def after_commit(count: Callable[[], None]) -> None:
    """Run `count` once the current transaction commits (never if it rolls back); at once when no
    transaction is open."""
    pending = _pending.get()
    if pending is None:
        count()
    else:
        pending.append(count)


def open_commit_scope() -> contextvars.Token[list[Callable[[], None]] | None]:
    """Start collecting `after_commit` work for a transaction (runtime.db / runtime.sql)."""
    return _pending.set([])


def close_commit_scope(
    token: contextvars.Token[list[Callable[[], None]] | None], *, committed: bool
) -> None:
    """End the transaction's scope: run what it collected if it committed."""
    pending = _pending.get()
    try:
        _pending.reset(token)
    except ValueError:  # closed from another context (a generator finalised late): drop it
        return
    if committed and pending:
        for count in pending:
            try:
                count()
            except Exception:  # a metric never fails the money path
                log.exception("a metric could not be recorded")


def _otlp_wanted() -> bool:
    choice = os.environ.get("OTEL_METRICS_EXPORTER", "").strip().lower()
    if choice:
        return choice == "otlp"
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


@dataclass
class MetricsEndpoint:
    """The Prometheus scrape endpoint of one service (its own registry: several services may share
    a process, as in the tests)."""

    port: int
    stop: Callable[[], None]


def make_meter_provider(
    service_resource: str,
    *,
    readers: Sequence[MetricReader] = (),
    prometheus: tuple[str, int] | None = None,
) -> tuple[MeterProvider, MetricsEndpoint | None]:
    """A provider whose metrics say which service made them. `readers` add to the environment's
    choice (tests read metrics in memory); `prometheus` is (host, port) to serve a scrape on."""
    chosen: list[MetricReader] = list(readers)
    if _otlp_wanted():
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        chosen.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    endpoint: MetricsEndpoint | None = None
    if prometheus is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=True)
        chosen.append(PrometheusMetricReader(registry=registry))
        host, port = prometheus
        server, thread = start_http_server(port, addr=host, registry=registry)
        bound = int(server.server_address[1])

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=2)

        endpoint = MetricsEndpoint(bound, stop)
    provider = MeterProvider(
        resource=Resource.create({"service.name": service_resource}),
        metric_readers=chosen,
        shutdown_on_exit=False,  # shut down by the service's stop, within a budget
    )
    return provider, endpoint


Attributes = tuple[tuple[str, str], ...]


class Gauges:
    """Values a service reads from its own database now and then (`sample`), reported as observable
    gauges. Only the replica that runs the periodic jobs samples; the others report nothing, so a
    sum over replicas is the value, not N times it."""

    def __init__(self, provider: MeterProvider, service: str) -> None:
        self._meter = provider.get_meter(f"coins.{service}")
        self._values: dict[str, dict[Attributes, float]] = {}
        self._lock = threading.Lock()  # callbacks run on the exporter's thread

    def declare(self, name: str, description: str, unit: str = "") -> None:
        """`unit` "" for counts: "1" would make a collector's Prometheus exporter name them
        `..._ratio`, which the alert rules and dashboard do not query."""
        self._values.setdefault(name, {})

        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                values = dict(self._values.get(name, {}))
            return [Observation(value, dict(attrs)) for attrs, value in values.items()]

        self._meter.create_observable_gauge(name, [observe], unit=unit, description=description)

    def set_age(self, name: str, oldest: dt.datetime | None, now: dt.datetime) -> None:
        """An "age of the oldest" gauge: seconds since `oldest` (0 with nothing waiting, and never
        below 0 when the clocks of two replicas disagree)."""
        age = 0.0 if oldest is None else (now - oldest).total_seconds()
        self.set(name, {(): max(0.0, age)})

    def set(self, name: str, values: Mapping[Attributes, float]) -> None:
        if name not in self._values:
            raise KeyError(f"gauge {name!r} was not declared")
        with self._lock:
            self._values[name] = dict(values)
        setting = _sampler_names.get()
        if setting is not None:  # inside sample_round: the gauge is that sampler's
            setting.add(name)

    def clear(self, names: Iterable[str] | None = None) -> None:
        """Report nothing for `names` (default: every gauge) until they are set again."""
        with self._lock:
            for name in self._values if names is None else names:
                self._values[name] = {}

    def value(self, name: str, **attributes: str) -> float | None:
        """The last sampled value (tests, and the admin tools)."""
        with self._lock:
            return self._values.get(name, {}).get(tuple(sorted(attributes.items())))


Sampler = Callable[[Gauges], Awaitable[None]]
"""Reads a service's gauges from its database and `set`s them."""


_sampler_names: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar(
    "coins_sampler_names", default=None
)


async def sample_round(gauges: Gauges, sample: Sampler, *, leading: bool, owned: set[str]) -> str:
    """One round of one sampler: "idle" (not leading: the leader reports, this replica reports
    nothing), "ok", or "failed". `owned` collects the gauges this sampler sets, across rounds:
    when it fails, those (and only those: a service has several samplers) report nothing until it
    works again, since old values would read as current."""
    if not leading:
        gauges.clear()
        return "idle"
    token = _sampler_names.set(owned)
    try:
        await sample(gauges)
    except Exception as error:  # a gauge never stops the service
        gauges.clear(owned)
        log.warning("metrics: could not sample the gauges (%r)", error)
        return "failed"
    finally:
        _sampler_names.reset(token)
    return "ok"


def attrs(**values: Any) -> Attributes:
    """Gauge attributes as a key of `Gauges.set`."""
    return tuple(sorted((key, str(value)) for key, value in values.items()))


class ServiceMetrics:
    """The instruments every service has, and its meter for its own business counters."""

    def __init__(self, provider: MeterProvider, service: str) -> None:
        self.provider = provider
        self.meter = provider.get_meter(f"coins.{service}")
        self.gauges = Gauges(provider, service)
        self._rpc_duration = self.meter.create_histogram(
            "rpc.server.call.duration",
            unit="s",
            description="Time to answer an RPC, by method and gRPC status code",
            explicit_bucket_boundaries_advisory=(
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
            ),
        )  # fmt: skip
        self._rpc_attributes: dict[tuple[str, int, str], dict[str, Any]] = {}
        self._job_runs = self.meter.create_counter(
            "coins.job.runs", description="Background steps run, by job and outcome"
        )
        self._job_items = self.meter.create_counter(
            "coins.job.items", description="Items a background step handled (0 when idle)"
        )
        self._job_duration = self.meter.create_histogram(
            "coins.job.duration",
            unit="s",
            description="Time a background step took",
            # Steps take milliseconds to a few seconds: the default buckets (0, 5, 10, 25, ...)
            # put every one of them in the first.
            explicit_bucket_boundaries_advisory=(
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
            ),
        )  # fmt: skip

    def rpc(self, method: str, code: int, reason: str, seconds: float) -> None:
        key = (method, code, reason)
        attributes = self._rpc_attributes.get(key)
        if attributes is None:
            service, _, name = method.lstrip("/").rpartition("/")
            attributes = {
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": name,
                "rpc.grpc.status_code": code,
            }
            if reason:
                attributes["coins.reason"] = reason
            self._rpc_attributes[key] = attributes
        self._rpc_duration.record(seconds, attributes)

    def job(self, job: str, outcome: str, items: int, seconds: float) -> None:
        attributes = {"coins.job": job, "coins.outcome": outcome}
        self._job_runs.add(1, attributes)
        self._job_items.add(items, {"coins.job": job})
        self._job_duration.record(seconds, attributes)

    def shutdown(self) -> None:
        try:
            self.provider.shutdown(timeout_millis=3_000)
        except Exception:
            log.warning("metrics: could not flush at shutdown", exc_info=True)
