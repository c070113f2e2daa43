"""The ledger tells the metrics what each committed transaction moved, under the name it is counted
as: a correction posted in the other direction under the kind it corrects
is counted as itself, not as more of that kind."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from ledger import Ledger, Posting
from ledger import metrics as ledger_metrics
from runtime.clock import SystemClock
from runtime.db import Database
from runtime.metrics import Gauges
from tests.helpers import migrated
from tests.test_gauges import observed

ISSUANCE = "system:diamond_issuance"


async def test_a_correction_is_counted_as_itself_once_committed(database: Database) -> None:
    db = await migrated(database, "payout")
    counted: list[tuple[str, int]] = []
    ledger = Ledger(SystemClock(), unit="diamonds", on_posted=lambda k, n: counted.append((k, n)))
    async with db.transaction() as conn:
        await ledger.open_account(conn, "creator:ada")

    async def post(amount: int, **how: str) -> str:
        async with db.transaction() as conn:
            posted = await ledger.post(
                conn,
                [Posting(ISSUANCE, -amount), Posting("creator:ada", amount)],
                kind="gift",
                reference="test",
                request_id=uuid.uuid4().hex,
                caller="test",
                **how,
            )
            before_commit = list(counted)
        assert len(counted) == len(before_commit) + 1  # counted once committed, not before
        return posted.transaction_id

    await post(10)
    assert counted == [("gift", 10)]
    correction = await post(-3, counted_as="gift_correction")
    assert counted == [("gift", 10), ("gift_correction", 3)]
    async with db.read() as conn:
        kind = await conn.scalar(
            sa.text("SELECT kind FROM ledger_transactions WHERE transaction_id = :t"),
            {"t": correction},
        )
    assert kind == "gift"  # the books keep the kind; only the metrics name it apart

    with pytest.raises(RuntimeError):
        async with db.transaction() as conn:
            await ledger.post(
                conn,
                [Posting(ISSUANCE, -5), Posting("creator:ada", 5)],
                kind="gift",
                reference="test",
                request_id=uuid.uuid4().hex,
                caller="test",
            )
            raise RuntimeError("rolled back")
    assert counted == [("gift", 10), ("gift_correction", 3)]  # a rollback counts nothing


async def test_the_audit_age_counts_from_the_start_until_an_audit_finishes(
    database: Database,
) -> None:
    """R6: with no audit recorded the age series was absent, so CoinsLedgerAuditStale
    (max(age) > 3 h) could never fire for a deployment whose audits never finish."""
    db = await migrated(database, "wallet")
    reader = InMemoryMetricReader()
    gauges = Gauges(MeterProvider(metric_readers=[reader]), "test")
    ledger_metrics.declare(gauges, "coins")
    now = dt.datetime.now(dt.UTC)
    await ledger_metrics.sample(gauges, db.driver, now, started=now - dt.timedelta(hours=4))
    age = observed(reader)[("coins.ledger.audit.age", ())]
    assert age == 4 * 3600  # past the alert's 3 hours: it pages
    await ledger_metrics.sample(gauges, db.driver, now)  # no start known: no figure to vouch for
    assert ("coins.ledger.audit.age", ()) not in observed(reader)
