"""The ledger's metrics (runtime.metrics), for wallet and payout alike: what every committed
transaction moved, by kind, and the service's own names for the kinds that are its business
(coins purchased, coins spent by purpose, diamonds credited); holds open and the last audit.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from ledger.auditor import latest_run
from ledger.book import Ledger
from ledger.holds import ACTIVE
from runtime.metrics import Gauges, attrs
from runtime.server import Runtime
from runtime.sql import Driver, Statement

_OPEN_HOLDS = Statement(
    "ledger.gauge_open_holds",
    "SELECT kind, COUNT(*), COALESCE(SUM(amount - captured), 0) FROM ledger_holds "
    f"WHERE status = '{ACTIVE}' GROUP BY kind",  # ix_ledger_holds_expiry (status, expires_at)
)


Named = Mapping[str, tuple[str, str, Mapping[str, str]]]
"""Ledger kind -> (counter name, description, attributes): the service's business counters."""


def instrument(
    runtime: Runtime[Any], ledger: Ledger, named: Named, *, hold_kinds: Sequence[str] = ()
) -> None:
    """Count what `ledger` moves once it has committed, and sample its gauges (`hold_kinds`: the
    kinds of hold the service places, reported as 0 when none is open)."""
    meter = runtime.metrics.meter
    unit = f"{{{ledger.unit}}}"  # an annotation: Prometheus names keep no unit suffix
    moved = meter.create_counter(
        "coins.ledger.moved",
        unit=unit,
        description=f"{ledger.unit.capitalize()} moved by committed ledger transactions, by kind",
    )
    counters = {
        name: meter.create_counter(name, unit=unit, description=description)
        for name, description, _ in named.values()
    }
    by_kind = {
        kind: (counters[name], dict(attributes)) for kind, (name, _, attributes) in named.items()
    }
    kind_attributes: dict[str, dict[str, str]] = {}

    def posted(kind: str, amount: int) -> None:
        attributes = kind_attributes.setdefault(kind, {"kind": kind})
        moved.add(amount, attributes)
        counter = by_kind.get(kind)
        if counter is not None:
            counter[0].add(amount, counter[1])

    ledger.on_posted = posted
    declare(runtime.metrics.gauges, ledger.unit)

    started = runtime.clock.now()

    async def sampled(gauges: Gauges) -> None:
        await sample(gauges, runtime.db.driver, runtime.clock.now(), hold_kinds, started=started)

    runtime.add_sampler(sampled)


def declare(gauges: Gauges, unit: str) -> None:
    gauges.declare("coins.holds.open", "Holds not yet captured, released or expired, by kind")
    gauges.declare(
        "coins.holds.reserved",
        f"{unit.capitalize()} reserved by open holds, by kind",
        f"{{{unit}}}",
    )
    gauges.declare("coins.ledger.audit.findings", "What the last ledger audit found wrong")
    gauges.declare(
        "coins.ledger.audit.age",
        "Seconds since the last ledger audit finished (before any has: since the service started)",
        unit="s",
    )


async def sample(
    gauges: Gauges,
    driver: Driver,
    now: dt.datetime,
    hold_kinds: Sequence[str] = (),
    *,
    started: dt.datetime | None = None,
) -> None:
    """`started`: when the service started. Before any audit has finished, the audit's age counts
    from then, so that a deployment whose audits never finish is paged (CoinsLedgerAuditStale),
    not silent for want of a series."""
    async with driver.read() as tx:
        rows = await tx.all(_OPEN_HOLDS)
    none = {attrs(kind=kind): 0 for kind in hold_kinds}
    gauges.set("coins.holds.open", none | {attrs(kind=row[0]): int(row[1]) for row in rows})
    gauges.set("coins.holds.reserved", none | {attrs(kind=row[0]): int(row[2]) for row in rows})
    run = await latest_run(driver)
    if run is None:
        gauges.set("coins.ledger.audit.findings", {})
        age: dict[tuple[tuple[str, str], ...], float] = (
            {} if started is None else {(): max(0.0, (now - started).total_seconds())}
        )
        gauges.set("coins.ledger.audit.age", age)
        return
    gauges.set("coins.ledger.audit.findings", {(): run.report.findings})
    gauges.set(
        "coins.ledger.audit.age",
        {(): max(0.0, (now - run.finished_at).total_seconds())},
    )
