"""Log lines a pipeline can read: with <SVC>_LOG_FORMAT=json one JSON object per line, carrying the
trace and span ids of the call that logged it."""

from __future__ import annotations

import io
import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from runtime.telemetry import configure_logging


def test_json_log_lines_carry_the_trace_and_span_ids() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("wallet", "INFO", "json")
        stream = io.StringIO()
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        tracer = TracerProvider().get_tracer("test")
        with tracer.start_as_current_span("call") as span:
            logging.getLogger("coins.rpc").info("refused %s", "NOT_FOUND")
        logging.getLogger("coins.rpc").warning("outside any call")
        first, second = (json.loads(line) for line in stream.getvalue().splitlines())
        context = span.get_span_context()
        assert first["trace_id"] == format(context.trace_id, "032x")
        assert first["span_id"] == format(context.span_id, "016x")
        assert (first["service"], first["level"], first["message"]) == (
            "wallet",
            "INFO",
            "refused NOT_FOUND",
        )
        assert first["time"].endswith("Z") and second["trace_id"] == "-"
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
