"""OpenTelemetry set-up: one TracerProvider per service, exporters chosen by the standard OTEL_* variables.

Each service gets its own provider (not the global one) so that its spans carry its own `service.name`
even when several services share a process, as they do in the tests.

Exporter choice: OTEL_TRACES_EXPORTER (`otlp`, `console`, `none`) if set; otherwise OTLP when
OTEL_EXPORTER_OTLP_ENDPOINT is set; otherwise nothing is exported.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import grpc.aio
from opentelemetry import baggage, metrics, trace
from opentelemetry import context as otel_context
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
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
        resource=Resource.create({"service.name": service_resource_name(service)}),
        shutdown_on_exit=False,  # flushed by the service's stop, within a budget (flush_within)
    )
    if exporter is not None:
        provider.add_span_processor(IdlePassFilter(SimpleSpanProcessor(exporter)))
        return provider
    choice = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not choice:
        choice = "otlp" if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else "none"
    if choice == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(IdlePassFilter(BatchSpanProcessor(OTLPSpanExporter())))
    elif choice == "console":
        provider.add_span_processor(IdlePassFilter(BatchSpanProcessor(ConsoleSpanExporter())))
    return provider


BACKGROUND = "coins.background"
"""Marks the root span of one pass of a background loop (a sweep, a poll, a health ping)."""
ITEMS = "coins.items"
"""What a pass handled; a pass that handled nothing is idle."""


@contextmanager
def background_pass(tracer: trace.Tracer, name: str) -> Iterator[trace.Span]:
    """The root span of one pass of a background loop, in a trace of its own; set ITEMS on it to
    what the pass handled. An idle pass that did not fail is not exported (IdlePassFilter): the
    loops poll every half second or so, ~11 traces a second per idle suite, and an SRE looks for
    the passes that did something or failed. The pass's calls to other services carry BACKGROUND
    as baggage, so their side of an idle poll (an empty listing) is left out there too."""
    token = otel_context.attach(baggage.set_baggage(BACKGROUND, "1", otel_context.Context()))
    try:
        with tracer.start_as_current_span(name, attributes={BACKGROUND: True, ITEMS: 0}) as span:
            yield span
    finally:
        otel_context.detach(token)


class IdlePassFilter(SpanProcessor):
    """Holds back the spans of a background pass's trace until its root ends, then passes them
    on, or drops them all when the pass was idle (ITEMS 0, no error). A pass's root is a
    `background_pass` span, or, in the service it calls, the server span of a call carrying the
    BACKGROUND baggage (idle when its answer lists nothing: ITEMS 0, set by the request guard).
    Every other span goes straight through."""

    HELD_AT_MOST = 256
    """Spans held for one pass; a pass with more is passed on as it goes."""

    def __init__(self, delegate: SpanProcessor) -> None:
        self._delegate = delegate
        self._passes: dict[int, tuple[int, list[ReadableSpan] | None]] = {}
        """Per pass trace held here: its root's span id, and its spans ended so far (None: too
        many, passed on as they end)."""
        self._lock = threading.Lock()

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        local_root = span.parent is None and span.attributes and span.attributes.get(BACKGROUND)
        remote_root = (
            span.parent is not None
            and span.parent.is_remote
            and baggage.get_baggage(BACKGROUND, parent_context) == "1"
        )
        if local_root or remote_root:
            with self._lock:
                self._passes[span.context.trace_id] = (span.context.span_id, [])
        self._delegate.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        trace_id = span.context.trace_id if span.context else 0
        with self._lock:
            root, held = self._passes.get(trace_id, (None, None))
            if root is None:
                passing = True
            elif span.context is None or span.context.span_id != root:  # inside a pass
                if held is not None and len(held) < self.HELD_AT_MOST:
                    held.append(span)
                    return
                self._passes[trace_id] = (root, None)
                passing = True
            else:  # the pass's root: its end decides
                del self._passes[trace_id]
                idle = (span.attributes or {}).get(ITEMS) == 0
                error = span.status.status_code == trace.StatusCode.ERROR
                passing = held is None or not idle or error  # None: its spans went on already
                if not passing:
                    return
        for earlier in held or ():
            self._delegate.on_end(earlier)
        if passing:
            self._delegate.on_end(span)

    def shutdown(self) -> None:
        self._delegate.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._delegate.force_flush(timeout_millis)


_HEALTH_SERVICE = "/grpc.health.v1.Health/"


def _not_a_health_check(details: grpc.HandlerCallDetails) -> bool:
    """What `filters.negate(filters.health_check())` decides, by one string comparison: that
    filter parses the method path and checks it against a typing Protocol on every call, ~2.5% of
    a GetBalance's CPU."""
    return not details.method.startswith(_HEALTH_SERVICE)


def server_tracing(provider: trace.TracerProvider) -> grpc.aio.ServerInterceptor:
    """OpenTelemetry's server interceptor: a span for every call but health checks (probes every
    few seconds would bury the traces)."""
    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(
        tracer_provider=provider, filter_=_not_a_health_check
    )
    return interceptor


def trace_engine(engine: AsyncEngine, provider: trace.TracerProvider) -> None:
    """Emit a span for every SQL statement of `engine`, under the current RPC's span."""
    tracer = trace.get_tracer("opentelemetry.instrumentation.sqlalchemy", tracer_provider=provider)
    usage = metrics.get_meter("coins.db").create_up_down_counter("db.client.connections.usage")
    EngineTracer(tracer, engine.sync_engine, usage)


class _CancelledStreamDetach(logging.Filter):
    """Drops OpenTelemetry's "Failed to detach context" for a server stream the client cancelled.

    The interceptor attaches the call's span context in the stream's generator; when a watcher
    leaves (WatchLive cancelled), grpc closes that generator from another task's context, where the
    token cannot be reset: a ValueError that the SDK logs at ERROR with a traceback, twice per
    cancel. It is harmless (the span ends; the generator's context is discarded) and a viewer
    leaving is the normal end of a stream, so it must not read as an error. Any other failure to
    detach still logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != "Failed to detach context" or not record.exc_info:
            return True
        error = record.exc_info[1]
        return not (isinstance(error, ValueError) and "different Context" in str(error))


logging.getLogger("opentelemetry.context").addFilter(_CancelledStreamDetach())


class _NoPeerAddress(logging.Filter):
    """Drops the gRPC server instrumentation's "Failed to parse peer address ''": a call whose
    connection was already gone has no peer to name (the span simply has no peer attributes). A
    review counted 160 such warnings in 7 minutes of load, each with nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "Failed to parse peer address '%s'" and record.args == ("",))


logging.getLogger("opentelemetry.instrumentation.grpc._server").addFilter(_NoPeerAddress())


class _AnswerAfterTheCallEnded(logging.Filter):
    """grpc logs "ExecuteBatchError raised in core by servicer method [...]" at ERROR, with a
    traceback, when a handler answers a call that is already over: its deadline passed or its caller
    cancelled while the work went on to its safe point (runtime.interceptors.uninterrupted). The
    caller had its status already; nothing failed. It becomes one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("ExecuteBatchError raised in core by servicer method"):
            record.msg = "%s: not sent, the call had ended (deadline passed or caller cancelled)"
            record.args = (message.rsplit(" ", 1)[-1],)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("grpc._cython.cygrpc").addFilter(_AnswerAfterTheCallEnded())


class _ExportFailuresOncePerMinute(logging.Filter):
    """While the collector is unreachable, the OTLP exporters log a failure or a retry about once a
    second per signal (and those lines are log records to export in turn). The first of each kind
    is kept, then one a minute, saying how many were left out: the outage stays visible without
    burying the service's own lines."""

    EVERY_SECONDS = 60.0

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[tuple[str, int], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        kind = (str(record.msg)[:24], record.levelno)
        now = time.monotonic()
        with self._lock:
            last, skipped = self._last.get(kind, (-math.inf, 0))
            if now - last < self.EVERY_SECONDS:
                self._last[kind] = (last, skipped + 1)
                return False
            self._last[kind] = (now, 0)
        if skipped:
            record.msg = f"{record.msg} ({skipped} more like this in the last minute, not logged)"
        return True


logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").addFilter(
    _ExportFailuresOncePerMinute()
)


TELEMETRY_FLUSH_SECONDS = 2.0
"""How long a stopping process waits for its last spans, metrics and log records to be exported.
A reachable collector takes milliseconds; an unreachable one would hold the stop for the
exporters' retries (10 s per signal and flush), past the grace period an orchestrator allows."""


def flush_within(seconds: float, what: str, *flushes: Callable[[], object]) -> bool:
    """Run `flushes` (exporting `what`) in a daemon thread for at most `seconds`; False (and a
    warning) if they did not finish: what they were exporting is lost, and the process exits
    anyway."""
    thread = threading.Thread(
        target=lambda: [flush() for flush in flushes], name="telemetry flush", daemon=True
    )
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        logging.getLogger("coins.telemetry").warning(
            "%s not exported within %.1fs of stopping (collector unreachable?): the last are lost",
            what,
            seconds,
        )
        return False
    return True


class _TraceIdFilter(logging.Filter):
    """Adds the current trace and span ids to every log record, so a log line leads to its trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else "-"
        record.span_id = format(context.span_id, "016x") if context.is_valid else "-"
        return True


_DETAIL = re.compile(r"^(\s*DETAIL:).*$", re.MULTILINE)


def without_row_values(text: str) -> str:
    """`text` with PostgreSQL's DETAIL lines cut: they quote the row or key a statement failed on
    ("Key (payment_token)=(tok_...) already exists", "Failing row contains (...)"), values that
    must not reach logs or traces (SQLAlchemy's hide_parameters keeps only the bound parameters
    out)."""
    return _DETAIL.sub(r"\1 [row values withheld]", text)


class _NoRowValues(logging.Filter):
    """Formats a record's exception once, without row values (the formatters reuse the text)."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self._formatter = formatter

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not record.exc_text:
            record.exc_text = without_row_values(self._formatter.formatException(record.exc_info))
        if isinstance(record.msg, str) and "DETAIL:" in record.msg:
            record.msg = without_row_values(record.msg)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line (for a log pipeline): time, level, service, logger, trace and span
    ids, message, and the exception's text when there is one."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "trace_id": getattr(record, "trace_id", "-"),
            "span_id": getattr(record, "span_id", "-"),
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):  # structured fields a line carries (an RPC's code, duration)
            line.update({key: value for key, value in fields.items() if key not in line})
        if record.exc_info:
            line["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def _otlp_logs_wanted() -> bool:
    choice = os.environ.get("OTEL_LOGS_EXPORTER", "").strip().lower()
    if choice:
        return choice == "otlp"
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def _otlp_log_handler(service: str) -> tuple[logging.Handler, Callable[[], None]]:
    """Log records as OTLP log records (with their trace and span ids), batched off the caller's
    thread; and what flushes them at shutdown."""
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

    provider = LoggerProvider(
        resource=Resource.create({"service.name": service_resource_name(service)}),
        shutdown_on_exit=False,  # flushed at the end of main, within a budget (flush_within)
    )
    provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter()))
    return LoggingHandler(logger_provider=provider), provider.shutdown


def configure_logging(service: str, level: str, log_format: str = "text") -> Callable[[], None]:
    """Log lines to stderr: readable text (default) or JSON (`<SVC>_LOG_FORMAT=json`); also as
    OTLP log records when OTEL_LOGS_EXPORTER=otlp (or it is unset and OTEL_EXPORTER_OTLP_ENDPOINT
    is set). Returns what flushes the exported logs at shutdown."""
    handler = logging.StreamHandler()
    handler.addFilter(_TraceIdFilter())
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter(service)
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter(
            f"%(asctime)s %(levelname)-5s {service:<9} %(name)s trace=%(trace_id)s %(message)s"
        )
    handler.setFormatter(formatter)
    handler.addFilter(_NoRowValues(formatter))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if not _otlp_logs_wanted():
        return lambda: None
    exported, flush = _otlp_log_handler(service)
    root.addHandler(exported)
    return flush
