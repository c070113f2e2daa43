"""The ledger tells the metrics what each committed transaction moved, under the name it is counted
as: a correction posted in the other direction under the kind it corrects
is counted as itself, not as more of that kind."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from ledger import Ledger, Posting
from runtime.clock import SystemClock
from runtime.db import Database
from tests.helpers import migrated

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
