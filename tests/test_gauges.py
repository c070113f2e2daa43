"""Gauges report what the leader last read from its database, and nothing they cannot vouch for:
a replica that does not lead reports none, and neither does one whose last sample failed."""

from __future__ import annotations

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
    reader = InMemoryMetricReader()
    gauges = Gauges(MeterProvider(metric_readers=[reader]), "test")
    gauges.declare("coins.withdrawals.parked", "parked")
    backlog = {"parked": 3}

    async def sample(g: Gauges) -> None:
        if backlog["parked"] < 0:
            raise ConnectionError("the database does not answer")
        g.set("coins.withdrawals.parked", {attrs(): backlog["parked"]})

    assert await sample_round(gauges, sample, leading=True)
    assert observed(reader) == {("coins.withdrawals.parked", ()): 3}

    backlog["parked"] = -1  # the database goes away: 3 would read as current
    assert not await sample_round(gauges, sample, leading=True)
    assert observed(reader) == {}

    backlog["parked"] = 5
    assert await sample_round(gauges, sample, leading=True)
    assert observed(reader) == {("coins.withdrawals.parked", ()): 5}

    assert not await sample_round(gauges, sample, leading=False)  # another replica leads now
    assert observed(reader) == {}
