"""What an SRE's pipeline receives: the suite as separate processes (as `make up` runs it) with OTLP
pointed at a receiver in this test, and payout also serving a Prometheus scrape. One purchase, one
gift (sent twice under one request id) and one refused call, then: traces, metrics and logs arrive
with each service's name; the gift's spans carry its ids across gifting, wallet and payout in one
trace; the business counters count what moved, once; RPC durations carry status and reason."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import promql_parser
import pytest
import yaml
from google.type import date_pb2

from benchmarks.processes import SuiteProcesses, free_port, gateway_credentials
from coins.gifting.v1 import gifting_pb2, gifting_pb2_grpc
from coins.payout.v1 import payout_pb2, payout_pb2_grpc
from coins.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from runtime import pki
from runtime.auth import TokenIssuer, token_metadata
from tests.helpers import eventually
from tests.otlp import OtlpReceiver, Span

if TYPE_CHECKING:
    from coins.gifting.v1.gifting_pb2_grpc import GiftingServiceAsyncStub
    from coins.payout.v1.payout_pb2_grpc import PayoutServiceAsyncStub
    from coins.wallet.v1.wallet_pb2_grpc import WalletServiceAsyncStub

SERVICES = ("wallet", "gifting", "payout", "promotion")


@pytest.fixture
async def observed(
    tmp_path: Path,
) -> AsyncIterator[tuple[SuiteProcesses, OtlpReceiver, dict[str, int]]]:
    receiver = await OtlpReceiver().start()
    certs = tmp_path / "certs"
    pki.ensure_dev_pki(certs)
    logs = tmp_path / "logs"
    logs.mkdir()
    settings = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_BLRP_SCHEDULE_DELAY": "100",
        # The audits and the reconciliation run at once, so their gauges exist.
        "WALLET_LEDGER_AUDIT_EVERY_SECONDS": "1",
        "PAYOUT_LEDGER_AUDIT_EVERY_SECONDS": "1",
        "PAYOUT_RECONCILE_EVERY_SECONDS": "1",
    }
    scrape_ports = {name: free_port() for name in SERVICES}
    for name in SERVICES:
        settings[f"{name.upper()}_LOG_FORMAT"] = "json"
        settings[f"{name.upper()}_METRICS_SAMPLE_SECONDS"] = "0.3"
        settings[f"{name.upper()}_METRICS_PORT"] = str(scrape_ports[name])
    suite = SuiteProcesses("sqlite", tmp_path, certs, logs, settings=settings)
    try:
        await suite.start()
        yield suite, receiver, scrape_ports
    finally:
        await suite.stop()
        await receiver.stop()


async def test_traces_metrics_and_logs_reach_the_collector(
    observed: tuple[SuiteProcesses, OtlpReceiver, dict[str, int]],
) -> None:
    suite, otlp, scrape_ports = observed
    issuer = TokenIssuer(
        (suite.certs / "jwt" / f"{pki.DEV_KEY_ID}-key.pem").read_bytes(),
        key_id=pki.DEV_KEY_ID,
        issuer="coins-dev",
        audience="coins",
    )
    run = uuid.uuid4().hex[:8]
    viewer, creator = f"viewer-{run}", f"creator-{run}"
    tokens = {u: tuple(token_metadata(issuer.mint(u))) for u in (viewer, creator)}
    credentials = gateway_credentials(suite.certs)
    async with (
        grpc.aio.secure_channel(suite.address("wallet"), credentials) as wallet_channel,
        grpc.aio.secure_channel(suite.address("gifting"), credentials) as gifting_channel,
        grpc.aio.secure_channel(suite.address("payout"), credentials) as payout_channel,
    ):
        wallet: WalletServiceAsyncStub = wallet_pb2_grpc.WalletServiceStub(wallet_channel)  # type: ignore[assignment]
        gifting: GiftingServiceAsyncStub = gifting_pb2_grpc.GiftingServiceStub(gifting_channel)  # type: ignore[assignment]
        payout: PayoutServiceAsyncStub = payout_pb2_grpc.PayoutServiceStub(payout_channel)  # type: ignore[assignment]
        for user in (viewer, creator):
            await wallet.OpenAccount(
                wallet_pb2.OpenAccountRequest(
                    request_id=uuid.uuid4().hex,
                    user_id=user,
                    country_code="US",
                    birth_date=date_pb2.Date(year=1990, month=1, day=1),
                ),
                metadata=tokens[user],
            )
        bought = await wallet.PurchaseCoins(
            wallet_pb2.PurchaseCoinsRequest(
                request_id=uuid.uuid4().hex,
                user_id=viewer,
                package_id="us-web-700",
                payment_token="tok_visa",
            ),
            metadata=tokens[viewer],
        )
        gift_request = f"gift-{run}"
        send = gifting_pb2.SendGiftRequest(
            request_id=gift_request,
            sender_id=viewer,
            creator_id=creator,
            gift_id="rose",
            count=3,
            video_id=f"video-{run}",
        )
        first = await gifting.SendGift(send, metadata=tokens[viewer])
        again = await gifting.SendGift(send, metadata=tokens[viewer])  # a retry: a replay
        assert again.sent_gift.sent_gift_id == first.sent_gift.sent_gift_id
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await wallet.GetBalance(
                wallet_pb2.GetBalanceRequest(user_id=creator), metadata=tokens[viewer]
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

        async def credited() -> bool:
            balance = await payout.GetDiamondBalance(
                payout_pb2.GetDiamondBalanceRequest(creator_id=creator), metadata=tokens[creator]
            )
            return balance.balance.diamonds > 0

        await eventually(credited, "the gift's diamonds credited", seconds=15)
        diamonds = (
            await payout.GetDiamondBalance(
                payout_pb2.GetDiamondBalanceRequest(creator_id=creator), metadata=tokens[creator]
            )
        ).balance.diamonds
    gift_coins = first.sent_gift.coins
    assert gift_coins > 0

    # Traces: every service names itself; the gift's trace crosses gifting, wallet and payout.
    async def gift_traced() -> bool:
        sends = [s for s in otlp.spans if s.attributes.get("coins.request_id") == gift_request]
        if not sends:
            return False
        trace_id = sends[0].trace_id
        services = {s.service for s in otlp.spans if s.trace_id == trace_id}
        return {"coins-gifting", "coins-wallet", "coins-payout"} <= services

    await eventually(gift_traced, "the gift's trace in gifting, wallet and payout", seconds=15)
    server_span = next(
        s
        for s in otlp.spans
        if s.attributes.get("coins.request_id") == gift_request and s.service == "coins-gifting"
    )
    assert server_span.attributes["coins.creator_id"] == creator
    assert server_span.attributes["coins.sender_id"] == viewer
    assert server_span.attributes["coins.gift_id"] == "rose"
    assert server_span.attributes["coins.count"] == 3

    def refused_spans() -> list[Span]:
        return [
            s
            for s in otlp.spans
            if s.service == "coins-wallet"
            and s.attributes.get("coins.reason") == "NOT_ACCOUNT_OWNER"
        ]

    async def refusal_traced() -> bool:
        return bool(refused_spans())

    await eventually(refusal_traced, "the refused call's span with its reason", seconds=10)
    assert refused_spans()[0].attributes["coins.user_id"] == creator
    sql = [s for s in otlp.spans if s.service == "coins-wallet" and "db.statements" in s.attributes]
    assert sql, "the wallet's database work has spans naming its statements"

    # Metrics: what moved, counted once (the replay moved nothing); RPCs by status and reason.
    async def counted() -> bool:
        gifts = otlp.metric("coins-gifting", "coins.gifts.sent")
        credited = otlp.metric("coins-payout", "coins.diamonds.credited")
        return (
            gifts is not None
            and gifts.value == 3
            and credited is not None
            and credited.value == diamonds
        )

    await eventually(counted, "the gift counted in gifting and payout", seconds=15)
    await exported(otlp, "coins-wallet", "coins.purchased", bought.balance.coins)
    await exported(otlp, "coins-wallet", "coins.spent", gift_coins, purpose="gift")
    await exported(otlp, "coins-gifting", "coins.gifts.coins", gift_coins, where="video")
    await exported(
        otlp,
        "coins-gifting",
        "rpc.server.call.duration",
        2,
        count=True,
        **{"rpc.method": "SendGift"},
    )
    await exported(
        otlp,
        "coins-wallet",
        "rpc.server.call.duration",
        1,
        count=True,
        **{
            "rpc.method": "GetBalance",
            "rpc.grpc.status_code": 7,
            "coins.reason": "NOT_ACCOUNT_OWNER",
        },
    )

    async def sampled() -> bool:
        backlog = otlp.metric("coins-gifting", "coins.outbox.backlog")
        pending = otlp.metric("coins-wallet", "coins.purchases.pending")
        return (
            backlog is not None
            and backlog.value == 0
            and pending is not None
            and pending.value == 0
        )

    await eventually(sampled, "gifting's outbox gauge sampled and drained", seconds=15)
    for service in SERVICES:
        assert otlp.metric(f"coins-{service}", "coins.job.runs") is not None, service

    # Logs: one line per RPC with its trace id, under the service's name.
    async def logged() -> bool:
        return any(
            line.service == "coins-gifting"
            and "SendGift" in line.body
            and line.trace_id == server_span.trace_id
            for line in otlp.logs
        )

    await eventually(logged, "gifting's access log line for the gift, with its trace", seconds=15)
    assert {line.service for line in otlp.logs} >= {f"coins-{s}" for s in SERVICES}
    # No credential in any signal: log bodies and attributes, span attributes, metric attributes.
    secrets = ["Bearer", "eyJ", "tok_visa", *(value for md in tokens.values() for _, value in md)]
    signals = [
        *(f"{line.body} {line.attributes}" for line in otlp.logs),
        *(str(span.attributes) for span in otlp.spans),
        *(
            str(key)
            for streams in otlp.metrics.values()
            for stream in streams.values()
            for key in stream
        ),
    ]
    leaks = [text for text in signals if any(secret in text for secret in secrets)]
    assert not leaks, leaks[:3]

    # The Prometheus scrape says the same, and has every metric the alerts and the dashboard use.
    text = await asyncio.to_thread(_scrape, scrape_ports["payout"])
    credited_lines = [
        line for line in text.splitlines() if line.startswith("coins_diamonds_credited_total")
    ]
    assert credited_lines and float(credited_lines[0].rsplit(" ", 1)[1]) == diamonds
    assert "rpc_server_call_duration_seconds_bucket" in text
    used = {name for expression in operator_expressions() for name in metric_names(expression)}
    scraped: set[str] = set()

    async def every_metric_scraped() -> bool:
        for port in scrape_ports.values():
            page = await asyncio.to_thread(_scrape, port)
            scraped.update(
                line.split("{", 1)[0].split(" ", 1)[0]
                for line in page.splitlines()
                if line and not line.startswith("#")
            )
        return used <= scraped

    try:
        await eventually(
            every_metric_scraped, "every metric of the alerts and dashboard", seconds=10
        )
    except AssertionError:
        raise AssertionError(f"not exported: {sorted(used - scraped)}") from None


def test_alert_rules_and_dashboard_are_well_formed() -> None:
    """Every expression parses as PromQL; every alert says how bad it is and links its runbook,
    which the README has."""
    readme = (ROOT / "README.md").read_text()
    anchors = {_anchor(line) for line in readme.splitlines() if line.startswith("#")}
    rules = [rule for group in _alert_groups() for rule in group["rules"]]
    assert len(rules) >= 8
    for rule in rules:
        promql_parser.parse(rule["expr"])
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        runbook = rule["annotations"]["runbook"]
        assert runbook == f"README.md#runbook-{rule['alert'].lower()}", runbook
        assert runbook.split("#", 1)[1] in anchors, f"README has no section {runbook}"
    for expression in operator_expressions():
        assert metric_names(expression), expression


ROOT = Path(__file__).resolve().parents[1]
OBSERVABILITY = ROOT / "deploy" / "observability"


def _alert_groups() -> list[dict[str, Any]]:
    return list(yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())["groups"])


def operator_expressions() -> list[str]:
    """The PromQL of every alert rule and every dashboard panel."""
    rules = [str(rule["expr"]) for group in _alert_groups() for rule in group["rules"]]
    dashboard = json.loads((OBSERVABILITY / "grafana" / "coins-dashboard.json").read_text())
    panels = [
        str(target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    return rules + panels


def metric_names(expression: str) -> set[str]:
    """The metric names an expression selects (walking promql_parser's tree)."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if type(node).__name__ in ("VectorSelector", "MatrixSelector"):
            selector = getattr(node, "vector_selector", node)
            if selector.name:
                names.add(str(selector.name))
            return
        for child in ("lhs", "rhs", "expr", "param"):
            value = getattr(node, child, None)
            if value is not None and not isinstance(value, (str, int, float)):
                walk(value)
        for argument in getattr(node, "args", None) or []:
            walk(argument)

    walk(promql_parser.parse(expression))
    return names


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a README heading."""
    text = heading.lstrip("#").strip().lower()
    return "".join(c for c in text.replace(" ", "-") if c.isalnum() or c in "-_")


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


async def exported(
    otlp: OtlpReceiver,
    service: str,
    name: str,
    expected: float,
    *,
    count: bool = False,
    **attrs: object,
) -> None:
    """Wait for the next exports until `name` (its value, or its histogram's count) is `expected`."""

    async def arrived() -> bool:
        point = otlp.metric(service, name, **attrs)
        return point is not None and (point.count if count else point.value) == expected

    try:
        await eventually(arrived, f"{service} {name} {attrs} = {expected}", seconds=10)
    except AssertionError:
        raise AssertionError(
            f"{service} {name} {attrs}: {otlp.metric(service, name, **attrs)}, expected {expected}; "
            f"streams: {dict(otlp.metrics.get(service, {}).get(name, {}))}"
        ) from None
