"""An OTLP receiver in the test's process: what an OpenTelemetry Collector would receive over gRPC
(traces, metrics, logs), kept for the test to read."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import grpc.aio
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: value_of(pair.value) for pair in pairs}


def service_of(resource_attributes: list[KeyValue]) -> str:
    return str(attributes(resource_attributes).get("service.name", ""))


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    attributes: dict[str, Any]
    links: list[str]
    """Trace ids this span links to."""


@dataclass
class LogLine:
    service: str
    body: str
    severity: str
    trace_id: str
    attributes: dict[str, Any]


@dataclass
class Point:
    """The latest value of one metric stream (cumulative: the total so far)."""

    value: float
    count: int = 0
    """Histograms: how many were recorded."""


@dataclass
class OtlpReceiver:
    spans: list[Span] = field(default_factory=list)
    logs: list[LogLine] = field(default_factory=list)
    metrics: dict[str, dict[str, dict[tuple[tuple[str, Any], ...], Point]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(dict))
    )
    """service -> metric name -> attributes -> latest point."""
    port: int = 0
    _server: grpc.aio.Server | None = None

    async def start(self) -> OtlpReceiver:
        server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(self), server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_Logs(self), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, service: str, name: str, **attrs: Any) -> Point | None:
        """The latest point of `name` whose attributes include `attrs`, summed over the rest."""
        streams = self.metrics.get(service, {}).get(name, {})
        found = [
            point
            for key, point in streams.items()
            if all(dict(key).get(k) == v for k, v in attrs.items())
        ]
        if not found:
            return None
        return Point(sum(p.value for p in found), sum(p.count for p in found))


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    async def Export(self, request: Any, context: Any) -> Any:
        for resource_spans in request.resource_spans:
            service = service_of(resource_spans.resource.attributes)
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.receiver.spans.append(
                        Span(
                            service,
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            attributes(span.attributes),
                            [link.trace_id.hex() for link in span.links],
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    async def Export(self, request: Any, context: Any) -> Any:
        for resource_metrics in request.resource_metrics:
            service = service_of(resource_metrics.resource.attributes)
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    streams = self.receiver.metrics[service][metric.name]
                    kind = metric.WhichOneof("data")
                    data = getattr(metric, kind)
                    for point in data.data_points:
                        key = tuple(sorted(attributes(point.attributes).items()))
                        if kind == "histogram":
                            streams[key] = Point(point.sum, point.count)
                        else:
                            value = point.as_int if point.HasField("as_int") else point.as_double
                            streams[key] = Point(value)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    async def Export(self, request: Any, context: Any) -> Any:
        for resource_logs in request.resource_logs:
            service = service_of(resource_logs.resource.attributes)
            for scope in resource_logs.scope_logs:
                for record in scope.log_records:
                    self.receiver.logs.append(
                        LogLine(
                            service,
                            str(value_of(record.body)),
                            record.severity_text,
                            record.trace_id.hex(),
                            attributes(record.attributes),
                        )
                    )
        return logs_service_pb2.ExportLogsServiceResponse()
