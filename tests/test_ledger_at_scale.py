"""The ledger at scale, on a real database of each backend: history pages by index ranges (kinds merged,
time windows, equal timestamps), balances at past times and statements, the audit job's incremental
mode with its checkpoints, and the bulk path writing exactly what posting writes."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from alembic import command

from ledger import Ledger, Posting, entries
from ledger import audit as audit_module
from ledger import auditor as auditor_module
from ledger.audit import AuditReport
from ledger.auditor import driver_for, latest_run, run_audit
from ledger.bulk import Movement, append_postgres
from ledger.history import balance_at, entries_page, period
from runtime.clock import FixedClock, utc
from runtime.db import Database
from runtime.migrations import alembic_config, upgrade
from runtime.sql import as_tx
from tests.helpers import rewrite_history
from tests.suite import create_pg_database, drop_pg_database


class SetClock(FixedClock):
    """A clock the test sets to any time."""

    def set(self, moment: dt.datetime) -> None:
        self._now = moment


SERVICES = Path(__file__).resolve().parents[1] / "services"
SALES, SPEND = "system:coin_sales", "system:gift_spend"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
async def books(backend: str, tmp_path: Path) -> AsyncIterator[tuple[Database, Ledger, SetClock]]:
    """A migrated wallet database with alice's account and the two system accounts, and a ledger
    on a clock the test moves."""
    name = f"coins_scale_{uuid.uuid4().hex[:12]}"
    url = (
        await create_pg_database(name)
        if backend == "postgres"
        else f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    )
    db = Database(url)
    await upgrade(db, SERVICES / "wallet" / "migrations")
    clock = SetClock(T0)
    ledger = Ledger(clock, unit="coins")
    async with db.transaction() as conn:
        await ledger.open_account(conn, "alice")
        for system in (SALES, SPEND):
            await ledger.open_account(conn, system, allow_negative=True, keeps_balance=False)
    try:
        yield db, ledger, clock
    finally:
        await db.close()
        if backend == "postgres":
            await drop_pg_database(name)


async def downgrade(db: Database, migrations: Path, revision: str) -> None:
    config = alembic_config(migrations, db.url)

    def run(connection: sa.Connection) -> None:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)

    async with db.engine.begin() as conn:
        await conn.run_sync(run)


async def post(db: Database, ledger: Ledger, amount: int, kind: str) -> None:
    counter = SALES if amount > 0 else SPEND
    async with db.transaction() as conn:
        await ledger.post(
            conn,
            [Posting("alice", amount), Posting(counter, -amount)],
            kind=kind,
            reference=uuid.uuid4().hex,
            request_id=uuid.uuid4().hex,
            caller="test",
        )


async def alice_entry_times(db: Database) -> list[dt.datetime]:
    """When alice's entries are dated, in chain order."""
    async with db.read() as conn:
        found = await conn.execute(
            sa.select(entries.c.created_at)
            .where(entries.c.account_id == "alice")
            .order_by(entries.c.seq)
        )
        return [utc(t) for t in found.scalars().all()]


async def alice_entry_id(db: Database, which: Any) -> int:
    """The id of alice's newest (`sa.func.max`) or oldest (`sa.func.min`) entry."""
    async with db.read() as conn:
        found = await conn.scalar(
            sa.select(which(entries.c.entry_id)).where(entries.c.account_id == "alice")
        )
    assert found is not None
    return int(found)


async def test_pages_merge_kinds_keep_time_order_and_continue_across_equal_times(
    books: tuple[Database, Ledger, SetClock],
) -> None:
    db, ledger, clock = books
    await post(db, ledger, 1000, "purchase")
    for minute in range(1, 13):
        clock.set(T0 + dt.timedelta(minutes=minute // 2))  # two entries per timestamp
        await post(db, ledger, -minute, "gift" if minute % 3 else "promotion")
    async with db.driver.read() as tx:
        everything = await entries_page(tx, "alice", limit=100)
        assert [e.amount for e in everything] == [
            -12,
            -11,
            -10,
            -9,
            -8,
            -7,
            -6,
            -5,
            -4,
            -3,
            -2,
            -1,
            1000,
        ]
        assert everything[0].balance_after == 1000 - sum(range(1, 13))
        # Two kinds, merged newest first, paged 4 at a time through entries with equal times.
        seen: list[int] = []
        cursor = None
        while True:
            page = await entries_page(
                tx, "alice", limit=4, cursor=cursor, kinds=["promotion", "purchase"]
            )
            seen += [e.amount for e in page]
            if len(page) < 4:
                break
            cursor = page[-1].cursor
        assert seen == [-12, -9, -6, -3, 1000]
        # A time window [since, until) in the middle.
        window = await entries_page(
            tx,
            "alice",
            limit=100,
            since=T0 + dt.timedelta(minutes=2),
            until=T0 + dt.timedelta(minutes=4),
        )
        assert [e.amount for e in window] == [-7, -6, -5, -4]
        # A kind the account never had: nothing, at once.
        assert await entries_page(tx, "alice", limit=10, kinds=["refund"]) == []


async def test_balances_at_past_times_and_statements_add_up(
    books: tuple[Database, Ledger, SetClock],
) -> None:
    db, ledger, clock = books
    moves = [
        (0, 500, "purchase"),
        (1, -20, "gift"),
        (2, -30, "gift"),
        (3, 200, "purchase"),
        (4, -5, "promotion"),
    ]
    for hour, amount, kind in moves:
        clock.set(T0 + dt.timedelta(hours=hour))
        await post(db, ledger, amount, kind)
    async with db.driver.read() as tx:
        assert await balance_at(tx, "alice", T0) == 0  # before the first entry
        assert await balance_at(tx, "alice", T0 + dt.timedelta(minutes=1)) == 500
        assert await balance_at(tx, "alice", T0 + dt.timedelta(hours=2, minutes=1)) == 450
        statement = await period(
            tx, "alice", T0 + dt.timedelta(hours=1), T0 + dt.timedelta(hours=4)
        )
    assert (statement.opening, statement.closing) == (500, 650)
    lines = {m.kind: (m.credited, m.debited, m.entries) for m in statement.movements}
    assert lines == {"gift": (0, 50, 2), "purchase": (200, 0, 1)}
    assert statement.opening + sum(m.credited - m.debited for m in statement.movements) == (
        statement.closing
    )


async def test_replicas_with_skewed_clocks_still_date_an_account_s_entries_in_order(
    books: tuple[Database, Ledger, SetClock],
) -> None:
    """Two replicas 15 ms apart post to one account: the one behind dates its posting no earlier
    than the account's newest entry, so statements add up (a review's gave an opening of 1000,
    movements of -50 and a closing of 850) and past balances are balances the account had."""
    db, ahead, clock = books
    behind_clock = SetClock(T0)
    behind = Ledger(behind_clock, unit="coins")
    ms = dt.timedelta(milliseconds=1)
    clock.set(T0 + 10 * ms)
    await post(db, ahead, 1000, "purchase")
    clock.set(T0 + 30 * ms)
    await post(db, ahead, -50, "gift")
    behind_clock.set(T0 + 20 * ms)  # later, by a clock 15 ms behind
    await post(db, behind, -50, "gift")
    behind_clock.set(T0 + 25 * ms)
    async with db.transaction() as conn:  # a batch of credits, PostgreSQL's own statements
        await behind.credit_many(
            as_tx(conn),
            SALES,
            {"alice": 7},
            kind="purchase",
            reference="r",
            request_id="b",
            caller="test",
        )
    assert await alice_entry_times(db) == [T0 + 10 * ms, T0 + 30 * ms, T0 + 30 * ms, T0 + 30 * ms]
    async with db.driver.read() as tx:
        statement = await period(tx, "alice", T0 + 15 * ms, T0 + 25 * ms)
        assert (statement.opening, statement.closing) == (1000, 1000)
        assert not statement.movements
        assert await balance_at(tx, "alice", T0 + 31 * ms) == 907
    async with db.read() as conn:
        assert (await ahead.audit(conn)).ok


async def test_a_replica_whose_clock_jumped_a_day_ahead_does_not_date_the_rest_ahead(
    books: tuple[Database, Ledger, SetClock],
) -> None:
    """One posting by a clock that jumped a day ahead is one entry out of line: the postings after
    it, by good clocks, are dated by their clocks, not a day ahead with it (a review's: following
    the newest entry without bound carried the jump to every later entry of the account)."""
    db, ledger, clock = books
    jumped_clock = SetClock(T0 + dt.timedelta(days=1))
    jumped = Ledger(jumped_clock, unit="coins")
    clock.set(T0)
    await post(db, ledger, 1000, "purchase")
    await post(db, jumped, 5, "purchase")
    for minute in (1, 2):
        clock.set(T0 + dt.timedelta(minutes=minute))
        await post(db, ledger, -100, "gift")
    assert await alice_entry_times(db) == [
        T0,
        T0 + dt.timedelta(days=1),
        T0 + dt.timedelta(minutes=1),
        T0 + dt.timedelta(minutes=2),
    ]
    async with db.driver.read() as tx:  # the statement to now has the gifts
        statement = await period(tx, "alice", T0, T0 + dt.timedelta(minutes=3))
    assert {m.kind: m.debited for m in statement.movements}["gift"] == 200


async def test_the_incremental_audit_verifies_what_was_appended_since_its_checkpoint(
    books: tuple[Database, Ledger, SetClock],
) -> None:
    db, ledger, _ = books
    await post(db, ledger, 1000, "purchase")
    for n in range(1, 6):
        await post(db, ledger, -n, "gift")
    driver = driver_for(db.url)
    try:
        full = await run_audit(driver, incremental=True)  # no clean run yet: a full one
        assert full.report.ok and full.report.mode == "full"
        assert full.report.entries_checked == 6 and full.report.transactions_checked == 6
        for n in range(6, 9):
            await post(db, ledger, -n, "gift")
        step = await run_audit(driver, incremental=True)
        assert step.report.ok and step.report.mode == "incremental"
        assert step.report.entries_checked == 3  # only the three appended links
        latest = await latest_run(driver)
        assert latest is not None and latest.run_id == step.run_id

        # A rewrite after the checkpoint is found by the next incremental run...
        await post(db, ledger, -9, "gift")
        newest_entry = entries.c.entry_id == await alice_entry_id(db, sa.func.max)
        await rewrite_history(db.url, sa.update(entries).where(newest_entry).values(amount=-1))
        found = await run_audit(driver, incremental=True)
        assert not found.report.ok and "alice" in found.report.broken_chains
        # ...until it is put back: then the run is clean and its checkpoint stands on that entry.
        await rewrite_history(db.url, sa.update(entries).where(newest_entry).values(amount=-9))
        assert (await run_audit(driver, incremental=True)).report.ok
        # A rewrite of the entry a checkpoint stands on is found too.
        await rewrite_history(db.url, sa.update(entries).where(newest_entry).values(hash="f" * 64))
        changed = await run_audit(driver, incremental=True)
        assert "has changed: history was rewritten" in changed.report.broken_chains["alice"]
    finally:
        await driver.close()


async def test_the_checkpointed_entry_is_recomputed_not_only_compared(
    books: tuple[Database, Ledger, SetClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry a checkpoint stands on is checked by what its fields hash to, not only by its
    stored hash and balance: a review rewrote its amount (and its counter leg), leaving both, behind
    more newer entries than an incremental run re-reads, and the run was clean."""
    db, ledger, _ = books
    await post(db, ledger, 1000, "purchase")
    await post(db, ledger, -6, "gift")
    driver = driver_for(db.url)
    try:
        assert (await run_audit(driver, incremental=True)).report.ok  # checkpoint on the -6
        monkeypatch.setattr(audit_module, "MARGIN", 0)  # its transaction is long behind
        newest = await alice_entry_id(db, sa.func.max)
        async with db.read() as conn:
            transaction_id = await conn.scalar(
                sa.select(entries.c.transaction_id).where(entries.c.entry_id == newest)
            )
        legs = entries.c.transaction_id == transaction_id
        await rewrite_history(
            db.url,
            sa.update(entries)
            .where(legs)
            .values(amount=sa.case((entries.c.amount < 0, -1006), else_=1006)),
        )
        await post(db, ledger, -1, "gift")
        found = await run_audit(driver, incremental=True)
        assert "has changed: history was rewritten" in found.report.broken_chains["alice"]
    finally:
        await driver.close()


async def test_a_clean_audit_moves_the_checkpoints_though_the_service_wrote_meanwhile(
    books: tuple[Database, Ledger, SetClock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite, a write during the audit made its last write (the checkpoints) fail: under any
    traffic no checkpoint ever moved, and every "incremental" run was a full one (a review's). They
    now move, in a write of their own, to the heads the audit's snapshot held."""
    db, ledger, _ = books
    for amount in (1000, -1, -2):
        await post(db, ledger, amount, "purchase" if amount > 0 else "gift")
    verify = audit_module.audit_books  # what ledger.auditor runs

    async def written_meanwhile(*args: Any, **kwargs: Any) -> AuditReport:
        report = await verify(*args, **kwargs)
        await post(db, ledger, -3, "gift")  # the service, while the audit finishes
        return report

    monkeypatch.setattr(auditor_module, "audit_books", written_meanwhile)
    driver = driver_for(db.url)
    try:
        first = await run_audit(driver, incremental=True)
        assert first.report.ok and first.report.entries_checked == 3
        monkeypatch.setattr(auditor_module, "audit_books", verify)
        step = await run_audit(driver, incremental=True)
        assert step.report.ok and step.report.mode == "incremental"
        assert step.report.entries_checked == 1  # the entry written during the first run only
    finally:
        await driver.close()


async def test_a_full_audit_s_findings_stand_until_a_full_audit_is_clean(
    books: tuple[Database, Ledger, SetClock],
) -> None:
    """An incremental run sees only what came after the checkpoints, so it cannot tell that what a
    full audit found behind them is mended: it repeats those findings (and moves no checkpoint)
    until a clean full audit. A review saw the next periodic run, clean, answer LATEST_REPORT and
    reset the findings gauge within minutes of the full audit's page."""
    db, ledger, _ = books
    for amount in (1000, -1, -2):
        await post(db, ledger, amount, "purchase" if amount > 0 else "gift")
    driver = driver_for(db.url)
    try:
        assert (await run_audit(driver, incremental=False)).report.ok
        oldest = entries.c.entry_id == await alice_entry_id(db, sa.func.min)
        await rewrite_history(db.url, sa.update(entries).where(oldest).values(amount=2000))
        full = await run_audit(driver, incremental=False)
        assert not full.report.ok and "alice" in full.report.broken_chains
        await post(db, ledger, -3, "gift")
        step = await run_audit(driver, incremental=True)
        assert step.report.mode == "incremental" and not step.report.ok
        assert step.report.carried_from == full.run_id
        assert step.report.broken_chains == full.report.broken_chains
        assert step.report.bad_transactions == full.report.bad_transactions
        latest = await latest_run(driver)
        assert latest is not None and latest.run_id == step.run_id and not latest.report.ok
        again = await run_audit(driver, incremental=True)  # the checkpoints did not move
        assert again.report.entries_checked == step.report.entries_checked == 1

        await rewrite_history(db.url, sa.update(entries).where(oldest).values(amount=1000))
        assert (await run_audit(driver, incremental=False)).report.ok
        cleared = await run_audit(driver, incremental=True)
        assert cleared.report.ok and cleared.report.carried_from == ""
    finally:
        await driver.close()


async def test_the_bulk_path_writes_what_posting_writes(
    backend: str, books: tuple[Database, Ledger, SetClock]
) -> None:
    if backend != "postgres":
        pytest.skip("the bulk path is PostgreSQL's (COPY); SQLite runs the same test of posting")
    db, ledger, _ = books
    await post(db, ledger, 100, "purchase")  # posted
    conn = await asyncpg.connect(db.url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        movements = [
            Movement(
                "gift" if n % 4 else "purchase",
                50 if n % 4 == 0 else -5,
                SPEND if n % 4 else SALES,
                f"r{n}",
                T0 + dt.timedelta(seconds=n),
            )
            for n in range(1, 401)
        ]
        head = await append_postgres(conn, "alice", movements, chunk=150)
    finally:
        await conn.close()
    await post(db, ledger, -1, "gift")  # posted after the bulk rows: the chain continues
    assert head.seq == 401
    async with db.read() as conn2:
        report = await ledger.audit(conn2)
        columns = (
            await conn2.execute(sa.select(entries).where(entries.c.account_id == "alice"))
        ).all()
    assert report.ok, report
    assert report.entries_checked == 402 and report.transactions_checked == 402
    # Every column posting fills, the bulk path fills too.
    filled = {
        tuple(name for name, value in row._mapping.items() if value is not None) for row in columns
    }
    assert len(filled) == 1


async def test_the_migration_gives_an_existing_ledger_its_kinds(
    books: tuple[Database, Ledger, SetClock],
) -> None:
    """Ledger v6 on books written before it: every entry gets its transaction's kind (past the
    append-only triggers, which stay in force afterwards), and the audit and kind filters hold."""
    db, ledger, _ = books
    await post(db, ledger, 300, "purchase")
    await post(db, ledger, -7, "gift")
    migrations = SERVICES / "wallet" / "migrations"
    await downgrade(db, migrations, "0009")  # the books as they were: no kind on the entries
    await upgrade(db, migrations)
    async with db.read() as conn:
        kinds = (await conn.execute(sa.select(entries.c.kind).order_by(entries.c.entry_id))).all()
        report = await ledger.audit(conn)
    assert [k for (k,) in kinds] == ["purchase", "purchase", "gift", "gift"]
    assert report.ok, report
    async with db.driver.read() as tx:
        gifts = await entries_page(tx, "alice", limit=10, kinds=["gift"])
    assert [e.amount for e in gifts] == [-7]
    with pytest.raises(Exception, match="append-only"):
        async with db.transaction() as conn:
            await conn.execute(sa.update(entries).values(kind="edited"))
