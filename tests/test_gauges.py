"""Gauges report what the leader last read from its database, and nothing they cannot vouch for:
a replica that does not lead reports none, and neither does one whose last sample failed."""

from __future__ import annotations

import datetime as dt

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from runtime.metrics import Gauges, attrs, sample_round


def observed(reader: InMemoryMetricReader) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    assert isinstance(point, NumberDataPoint)
                    labels = tuple(sorted((k, str(v)) for k, v in (point.attributes or {}).items()))
                    found[(metric.name, labels)] = point.value
    return found


async def test_gauges_report_the_last_sample_and_nothing_after_a_failure_or_a_handover() -> None:
    """Two samplers, as wallet and payout have (the ledger's and the service's): one failing
    clears its own gauges, never the other's."""
    reader = InMemoryMetricReader()
    gauges = Gauges(MeterProvider(metric_readers=[reader]), "test")
    gauges.declare("coins.withdrawals.parked", "parked")
    gauges.declare("coins.ledger.audit.findings", "findings")
    backlog = {"parked": 3}
    parked, ledger = set[str](), set[str]()

    async def sample(g: Gauges) -> None:
        if backlog["parked"] < 0:
            raise ConnectionError("the database does not answer")
        g.set("coins.withdrawals.parked", {attrs(): backlog["parked"]})

    async def audit(g: Gauges) -> None:
        g.set("coins.ledger.audit.findings", {attrs(): 0})

    assert await sample_round(gauges, sample, leading=True, owned=parked) == "ok"
    assert await sample_round(gauges, audit, leading=True, owned=ledger) == "ok"
    assert observed(reader) == {
        ("coins.withdrawals.parked", ()): 3,
        ("coins.ledger.audit.findings", ()): 0,
    }

    backlog["parked"] = -1  # the database goes away: 3 would read as current
    assert await sample_round(gauges, sample, leading=True, owned=parked) == "failed"
    assert observed(reader) == {("coins.ledger.audit.findings", ()): 0}  # the other's stays

    backlog["parked"] = 5
    assert await sample_round(gauges, sample, leading=True, owned=parked) == "ok"
    assert observed(reader) == {
        ("coins.withdrawals.parked", ()): 5,
        ("coins.ledger.audit.findings", ()): 0,
    }

    # another replica leads now
    assert await sample_round(gauges, sample, leading=False, owned=parked) == "idle"
    assert observed(reader) == {}


def test_an_age_gauge_reads_seconds_since_the_oldest_and_zero_with_nothing_waiting() -> None:
    """Every service's "age of the oldest" gauge (outbox, purchases, captures, withdrawals): never
    negative when another replica's clock wrote the oldest a little ahead of this one's."""
    reader = InMemoryMetricReader()
    gauges = Gauges(MeterProvider(metric_readers=[reader]), "test")
    gauges.declare("coins.outbox.oldest_age", "age", "s")
    now = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
    for oldest, age in (
        (now - dt.timedelta(seconds=90, milliseconds=500), 90.5),
        (None, 0.0),
        (now + dt.timedelta(seconds=2), 0.0),
    ):
        gauges.set_age("coins.outbox.oldest_age", oldest, now)
        assert observed(reader) == {("coins.outbox.oldest_age", ()): age}
