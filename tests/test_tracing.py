"""One trace follows a gift across every service and database it touches."""

from __future__ import annotations

import contextvars
import logging
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from coins.wallet.v1 import wallet_pb2
from runtime import telemetry
from runtime.interceptors import _answer_plan
from runtime.status import error_info
from services.gifting.storage.tables import sent_gifts
from tests.helpers import (
    eventually,
    funded_user,
    live_gift,
    live_of,
    new_creator,
    new_id,
    open_account,
    rpc_error,
)
from tests.security_cases import gift_credited, hold_request
from tests.suite import Suite, start_suite

DB_SCOPES = {"opentelemetry.instrumentation.sqlalchemy", "coins.db"}
"""SQLAlchemy's span per statement, and the hot paths' span per transaction naming its statements."""


def service_of(span: ReadableSpan) -> str:
    return str(span.resource.attributes["service.name"])


def ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[ReadableSpan]:
    chain = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        chain.append(span)
    return chain


def server_span(spans: list[ReadableSpan], service: str, method: str) -> ReadableSpan:
    found = [
        s
        for s in spans
        if s.kind == SpanKind.SERVER and service_of(s) == service and s.name.endswith(method)
    ]
    assert len(found) == 1, f"expected one {service} {method} server span, got {len(found)}"
    return found[0]


async def test_a_gift_is_one_trace_across_gifting_wallet_payout_and_their_databases(
    suite: Suite,
) -> None:
    sender, _ = await funded_user(suite)
    creator = await new_creator(suite)
    suite.spans.clear()
    sent = await suite.gifting.SendGift(
        gifting_pb2.SendGiftRequest(
            request_id=new_id("gift"),
            sender_id=sender,
            creator_id=creator,
            gift_id="concert",
            count=1,
            live_id=live_of(creator),
        )
    )
    gift_span = server_span(list(suite.spans.get_finished_spans()), "coins-gifting", "/SendGift")
    trace_id = gift_span.context.trace_id
    # Found by the sent gift's id (what a support ticket names), with the coins it moved.
    assert gift_span.attributes is not None
    assert gift_span.attributes["coins.sent_gift_id"] == sent.sent_gift.sent_gift_id
    assert gift_span.attributes["coins.coins"] == 500

    def in_trace() -> list[ReadableSpan]:
        return [s for s in suite.spans.get_finished_spans() if s.context.trace_id == trace_id]

    async def delivered() -> bool:  # by the outbox relay, just after the reply
        return any(s.name == "gifting.credit_outbox.deliver" for s in in_trace())

    await eventually(delivered, "the credit's delivery in the gift's trace")
    delivery = next(s for s in in_trace() if s.name == "gifting.credit_outbox.deliver")
    assert delivery.attributes is not None  # found by any of the batch's gifts
    assert sent.sent_gift.sent_gift_id in tuple(delivery.attributes["coins.sent_gift_ids"])  # type: ignore[arg-type]
    claims = [  # the relay's pass that claimed it, a trace of its own, exported: it did something
        s
        for s in suite.spans.get_finished_spans()
        if s.name == "gifting.credit_outbox.claim" and s.attributes
    ]
    assert claims and all(s.attributes and s.attributes["coins.items"] for s in claims)
    spans = in_trace()
    by_id = {s.context.span_id: s for s in spans}

    wallet_span = server_span(spans, "coins-wallet", "/DebitCoins")
    payout_span = server_span(spans, "coins-payout", "/BatchCreditDiamonds")
    assert gift_span in ancestors(wallet_span, by_id)
    assert gift_span in ancestors(payout_span, by_id)
    assert gift_span.parent is None or gift_span.parent.span_id not in by_id
    # Payout's side is found by the creator too (a ticket: "creator X got no diamonds").
    assert payout_span.attributes is not None
    assert creator in tuple(payout_span.attributes["coins.creator_ids"])  # type: ignore[arg-type]
    assert int(payout_span.attributes["coins.items"]) >= 1  # type: ignore[arg-type]

    for service_span in (gift_span, wallet_span, payout_span):
        service = service_of(service_span)
        statements = [
            s
            for s in spans
            if s.instrumentation_scope is not None
            and s.instrumentation_scope.name in DB_SCOPES
            and service_span in ancestors(s, by_id)
            and service_of(s) == service
        ]
        assert statements, f"no database spans beneath {service}'s server span"
        for span in statements:
            if span.instrumentation_scope and span.instrumentation_scope.name == "coins.db":
                assert span.attributes and span.attributes.get("db.statements"), span.name
    assert {service_of(s) for s in spans} == {"coins-gifting", "coins-wallet", "coins-payout"}


async def test_a_refused_call_is_marked_on_its_server_span(suite: Suite) -> None:
    """An SRE finds refusals in traces: the server span of a refused call carries the gRPC status
    code and the ErrorInfo reason. Its span status follows OpenTelemetry's server conventions: a
    caller's error (NOT_FOUND here) leaves it UNSET; only server faults (INTERNAL, UNAVAILABLE,
    DEADLINE_EXCEEDED...) make it ERROR."""
    sender, _ = await funded_user(suite)
    creator = await new_creator(suite)
    suite.spans.clear()
    error = await rpc_error(suite.gifting.SendGift(live_gift(sender, creator, "no-such-gift")))
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    info = error_info(error)
    assert info is not None
    span = server_span(list(suite.spans.get_finished_spans()), "coins-gifting", "/SendGift")
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert span.attributes["coins.reason"] == info.reason
    assert span.status.status_code == StatusCode.UNSET


async def test_health_checks_leave_no_span_and_every_other_call_does(suite: Suite) -> None:
    """Probes every few seconds would bury the traces: the service port's health checks are not
    traced (runtime.telemetry.server_tracing), its other calls, reflection included, are."""
    channel = suite.channel("wallet")
    suite.spans.clear()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "coins.wallet.v1.WalletService"):
        await health.Check(health_pb2.HealthCheckRequest(service=service))
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    async for _ in reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    ):
        pass
    servers = [  # the wallet's (the other services' background calls go on meanwhile)
        s.name
        for s in suite.spans.get_finished_spans()
        if s.kind == SpanKind.SERVER
        and s.resource.attributes.get("service.name") == telemetry.service_resource_name("wallet")
    ]
    assert servers == ["/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"]


def test_a_cancelled_stream_s_context_detach_logs_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A watcher leaving WatchLive makes grpc close the stream's generator from another context,
    where the tracing interceptor's context token cannot be reset: the SDK logged that at ERROR with
    a traceback, twice per viewer leaving (seen under uvloop in `make up`). That case is dropped;
    any other failure to detach still logs."""
    assert callable(telemetry.server_tracing)  # importing runtime.telemetry installs the filter
    caplog.set_level(logging.ERROR, logger="opentelemetry.context")
    token = contextvars.copy_context().run(otel_context.attach, otel_context.Context())
    otel_context.detach(token)  # "was created in a different Context"
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    otel_context.detach("not a token")  # type: ignore[arg-type]
    assert [r.getMessage() for r in caplog.records] == ["Failed to detach context"]


def test_idle_background_passes_are_not_exported_busy_and_failed_ones_are() -> None:
    """Background loops poll every half second or so: an idle suite exported ~11 traces a second
    (a review). A pass that handled nothing and did not fail is dropped with its statements; one
    that handled something, or failed, is exported whole; other spans are untouched."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from runtime.telemetry import ITEMS, background_pass, make_tracer_provider

    exported = InMemorySpanExporter()
    tracer = make_tracer_provider("test", exporter=exported).get_tracer("test")
    with background_pass(tracer, "idle pass"), tracer.start_as_current_span("its statement"):
        pass
    assert exported.get_finished_spans() == ()
    with background_pass(tracer, "busy pass") as span:
        with tracer.start_as_current_span("its claim"):
            pass
        span.set_attribute(ITEMS, 3)
    assert [s.name for s in exported.get_finished_spans()] == ["its claim", "busy pass"]
    exported.clear()
    with pytest.raises(RuntimeError), background_pass(tracer, "failed pass"):
        with tracer.start_as_current_span("its statement"):
            pass
        raise RuntimeError("the database went away")
    failed = exported.get_finished_spans()
    assert [s.name for s in failed] == ["its statement", "failed pass"]
    assert failed[-1].status.status_code == StatusCode.ERROR
    exported.clear()
    with tracer.start_as_current_span("an RPC"), background_pass(tracer, "a pass inside it"):
        pass  # a pass is a trace of its own, even when started inside a call's span
    assert [s.name for s in exported.get_finished_spans()] == ["an RPC"]


def test_the_called_services_side_of_an_idle_poll_is_left_out_too() -> None:
    """A pass's calls carry its BACKGROUND baggage: in the service called, the server span of a
    poll that listed nothing (gifting's reversals follower asking payout every 10 s, a
    verification saw) is dropped with its statements; one that listed something is exported."""
    from opentelemetry import baggage, propagate
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from runtime.telemetry import ITEMS, background_pass, make_tracer_provider

    caller = make_tracer_provider("caller", exporter=InMemorySpanExporter()).get_tracer("t")
    exported = InMemorySpanExporter()
    callee = make_tracer_provider("callee", exporter=exported).get_tracer("t")
    for listed in (0, 2):
        carrier: dict[str, str] = {}
        with background_pass(caller, "poll"):
            propagate.inject(carrier)  # what the gRPC client instrumentation sends
        incoming = propagate.extract(carrier)
        assert baggage.get_baggage("coins.background", incoming) == "1"
        with callee.start_as_current_span("/Svc/List", context=incoming) as server:
            with callee.start_as_current_span("its statement"):
                pass
            server.set_attribute(ITEMS, listed)  # as the request guard sets it from the answer
    assert [s.name for s in exported.get_finished_spans()] == ["its statement", "/Svc/List"]
    assert exported.get_finished_spans()[-1].attributes == {ITEMS: 2}


def test_exporter_failures_are_logged_once_a_minute_per_kind() -> None:
    """With the collector down the exporters log a failure or a retry every second or so per
    signal: the first of each kind is kept, the rest of the minute counted into the next one."""
    import logging

    from runtime.telemetry import _ExportFailuresOncePerMinute

    kept = _ExportFailuresOncePerMinute()

    def record(message: str, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord("otlp", level, __file__, 1, message, (), None)

    assert kept.filter(record("Failed to export traces to x"))
    assert not kept.filter(record("Failed to export traces to x"))  # within the minute
    assert kept.filter(record("Transient error StatusCode.UNAVAILABLE", logging.WARNING))
    assert kept.filter(record("Failed to export traces", logging.INFO))  # below WARNING: all
    kept._last = {kind: (-1e9, 3) for kind in kept._last}  # a minute later, 3 left out
    later = record("Failed to export traces to x")
    assert kept.filter(later) and "3 more like this" in later.getMessage()


async def test_a_purchases_span_carries_its_coins_and_price(suite: Suite) -> None:
    """The amounts an SRE filters on, from the record the call made (a review found the README's
    `coins.amount_minor` on no span): a purchase's coins and price, and (its answer's plan) a
    withdrawal's gross, fee and net."""
    suite.spans.clear()
    await funded_user(suite)
    purchase = server_span(list(suite.spans.get_finished_spans()), "coins-wallet", "/PurchaseCoins")
    assert purchase.attributes is not None
    assert purchase.attributes["coins.coins"] > 0  # type: ignore[operator]
    assert purchase.attributes["coins.amount_minor"] > 0  # type: ignore[operator]
    assert purchase.attributes["coins.currency"] == "USD"
    plan = _answer_plan(payout_pb2.RequestWithdrawalResponse.DESCRIPTOR)
    attributes = {attribute for _, attribute in plan}
    assert {
        "coins.gross_minor",
        "coins.fee_minor",
        "coins.net_minor",
        "coins.currency",
    } <= attributes
    assert {"coins.diamonds", "coins.withdrawal_id", "coins.creator_id"} <= attributes


async def test_a_failed_delivery_is_an_error_span_naming_its_reason_and_gifts(
    backend: str, tmp_path: Path
) -> None:
    """A delivery payout did not take is marked ERROR with the reason on the relay's span (only
    its client span was), and its retry is one statement for the batch, not one per credit."""
    suite = await start_suite(backend, tmp_path, only=("wallet", "payout", "gifting"))
    try:
        sender, _ = await funded_user(suite)
        creator = await new_creator(suite)
        await suite.services.pop("payout").stop(grace=0)
        suite.spans.clear()
        sent = await suite.gifting.SendGift(live_gift(sender, creator, "rose"))

        def failed() -> list[ReadableSpan]:
            return [
                s
                for s in suite.spans.get_finished_spans()
                if s.name == "gifting.credit_outbox.deliver"
                and s.status.status_code == StatusCode.ERROR
            ]

        async def attempted() -> bool:
            return bool(failed())

        await eventually(attempted, "a failed delivery")
        span = failed()[0]
        assert span.attributes is not None
        assert span.attributes["coins.reason"] == "DEPENDENCY_UNAVAILABLE"
        assert tuple(span.attributes["coins.sent_gift_ids"]) == (sent.sent_gift.sent_gift_id,)  # type: ignore[arg-type]
    finally:
        await suite.stop()


async def test_a_gift_refused_by_the_wallet_is_found_by_its_sent_gift_id(suite: Suite) -> None:
    """A refused gift is recorded as failed under a sent gift id that logs and the reconciler name:
    its SendGift span carries that id, as an accepted gift's does (a review found it missing)."""
    sender = new_id("viewer")
    await open_account(suite, sender)  # no coins
    creator = await new_creator(suite)
    suite.spans.clear()
    error = await rpc_error(suite.gifting.SendGift(live_gift(sender, creator, "rose")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    span = server_span(list(suite.spans.get_finished_spans()), "coins-gifting", "/SendGift")
    assert span.attributes is not None
    sent_gift_id = span.attributes["coins.sent_gift_id"]
    async with suite.services["gifting"].runtime.db.read() as conn:
        recorded = (
            await conn.execute(
                sa.select(sent_gifts.c.sender_id, sent_gifts.c.status).where(
                    sent_gifts.c.sent_gift_id == sent_gift_id
                )
            )
        ).one()
    assert tuple(recorded) == (sender, "failed")


async def test_hold_and_reversal_spans_carry_what_they_moved(suite: Suite) -> None:
    """A hold's calls carry its coins (placed and captured), so a released rest is on the
    ReleaseHold span; a reversal's carries the diamonds it took back and their creators."""
    user, _ = await funded_user(suite)
    promotion = suite.as_caller("promotion").wallet
    suite.spans.clear()
    hold = (await promotion.PlaceHold(hold_request(user, 300))).hold
    await promotion.CaptureHold(
        wallet_pb2.CaptureHoldRequest(request_id=new_id("cap"), hold_id=hold.hold_id, coins=120)
    )
    await promotion.ReleaseHold(
        wallet_pb2.ReleaseHoldRequest(request_id=new_id("rel"), hold_id=hold.hold_id)
    )
    released = server_span(list(suite.spans.get_finished_spans()), "coins-wallet", "/ReleaseHold")
    assert released.attributes is not None
    assert released.attributes["coins.hold_id"] == hold.hold_id
    assert released.attributes["coins.user_id"] == user
    assert released.attributes["coins.hold_coins"] == 300
    assert released.attributes["coins.captured_coins"] == 120

    sender, _ = await funded_user(suite)
    creator = await new_creator(suite)
    sent = (await suite.gifting.SendGift(live_gift(sender, creator, "concert"))).sent_gift
    await gift_credited(suite, sent.sent_gift_id, sender)()
    suite.spans.clear()
    reversed_ = await suite.payout.ReverseGiftCredits(
        payout_pb2.ReverseGiftCreditsRequest(
            request_id=new_id("rev"), gift_ids=[sent.sent_gift_id], reason="chargeback"
        ),
        metadata=suite.token(new_id("ops"), admin=True),
    )
    taken = reversed_.reversals[0].diamonds_taken
    assert taken > 0
    span = server_span(
        list(suite.spans.get_finished_spans()), "coins-payout", "/ReverseGiftCredits"
    )
    assert span.attributes is not None
    assert span.attributes["coins.diamonds"] == taken
    assert tuple(span.attributes["coins.creator_ids"]) == (creator,)  # type: ignore[arg-type]
