"""OpenTelemetry set-up: one TracerProvider per service, exporters chosen by the standard OTEL_* variables.

Each service gets its own provider (not the global one) so that its spans carry its own `service.name`
even when several services share a process, as they do in the tests.

Exporter choice: OTEL_TRACES_EXPORTER (`otlp`, `console`, `none`) if set; otherwise OTLP when
OTEL_EXPORTER_OTLP_ENDPOINT is set; otherwise nothing is exported.
"""

from __future__ import annotations

import logging
import os

from opentelemetry import metrics, trace
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from sqlalchemy.ext.asyncio import AsyncEngine


def service_resource_name(service: str) -> str:
    return f"coins-{service}"


def make_tracer_provider(service: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """A provider whose spans say which service made them; `exporter` overrides the environment (tests)."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_resource_name(service)})
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return provider
    choice = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not choice:
        choice = "otlp" if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else "none"
    if choice == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif choice == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    return provider


def trace_engine(engine: AsyncEngine, provider: trace.TracerProvider) -> None:
    """Emit a span for every SQL statement of `engine`, under the current RPC's span."""
    tracer = trace.get_tracer("opentelemetry.instrumentation.sqlalchemy", tracer_provider=provider)
    usage = metrics.get_meter("coins.db").create_up_down_counter("db.client.connections.usage")
    EngineTracer(tracer, engine.sync_engine, usage)


class _TraceIdFilter(logging.Filter):
    """Adds the current trace id to every log record, so a log line leads to its trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else "-"
        return True


def configure_logging(service: str, level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_TraceIdFilter())
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s %(levelname)-5s {service:<9} %(name)s trace=%(trace_id)s %(message)s"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
