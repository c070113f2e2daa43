"""Log lines a pipeline can read: with <SVC>_LOG_FORMAT=json one JSON object per line, carrying the
trace and span ids of the call that logged it."""

from __future__ import annotations

import io
import json
import logging

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from runtime.telemetry import configure_logging
from tests.helpers import eventually, funded_user, live_gift, new_creator
from tests.suite import Suite


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


def test_an_answer_to_a_call_that_had_ended_is_one_info_line_not_an_error() -> None:
    """grpc's ERROR with a traceback for an answer sent after the call ended (its deadline passed
    while the work went on to its safe point) is one INFO line; other grpc errors stay errors."""
    import runtime.telemetry  # noqa: F401  (installs the filter on grpc's logger)

    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    grpc_log.addHandler(keep)
    try:
        try:
            raise RuntimeError('Failed "execute_batch"')
        except RuntimeError:
            grpc_log.exception(
                "ExecuteBatchError raised in core by servicer method [%s]",
                "/coins.wallet.v1.WalletService/ReleaseHold",
            )
        grpc_log.error("Unexpected [%s] raised by servicer method [%s]", "KeyError", "/x/Y")
    finally:
        grpc_log.removeHandler(keep)
    late, other = seen
    assert (late.levelno, late.exc_info) == (logging.INFO, None)
    assert "ReleaseHold" in late.getMessage() and "not sent" in late.getMessage()
    assert other.levelno == logging.ERROR


def test_a_call_without_a_peer_address_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """OpenTelemetry's "Failed to parse peer address ''" (a call whose connection was gone) says
    nothing to act on: dropped; a peer address it cannot parse still warns."""
    caplog.set_level(logging.WARNING)
    server_log = logging.getLogger("opentelemetry.instrumentation.grpc._server")
    server_log.warning("Failed to parse peer address '%s'", "")
    server_log.warning("Failed to parse peer address '%s'", "unix-abstract:odd")
    assert [r.getMessage() for r in caplog.records] == [
        "Failed to parse peer address 'unix-abstract:odd'"
    ]


async def test_a_background_pass_logs_what_it_did_inside_its_trace(suite: Suite) -> None:
    """A pass that did something says so in one line that carries its trace id, so the line leads
    to the pass's trace (review A4: every such line had trace_id "-")."""
    seen: list[tuple[str, int]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            context = trace.get_current_span().get_span_context()
            seen.append((record.getMessage(), context.trace_id))

    keep = Keep()
    server_log = logging.getLogger("coins.server")
    server_log.addHandler(keep)
    level = server_log.level
    server_log.setLevel(logging.INFO)
    try:
        sender, _ = await funded_user(suite)
        creator = await new_creator(suite)
        await suite.gifting.SendGift(live_gift(sender, creator, "rose"))  # a streak, ended soon

        async def ended_streak_logged() -> bool:
            return any(message.startswith("ended streaks: ") for message, _ in seen)

        await eventually(ended_streak_logged, "the sweep's line")
    finally:
        server_log.removeHandler(keep)
        server_log.setLevel(level)
    lines = [(m, t) for m, t in seen if m.startswith("ended streaks: ")]
    assert all(trace_id != 0 for _, trace_id in lines), lines
