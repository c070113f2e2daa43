"""Holds in the reusable ledger: reserve, capture in parts, release, expire, each exactly once; debits
spend only what holds leave available; and random sequences of all of it keep the books exact.

Driven directly against a real database (SQLite and PostgreSQL) migrated by the wallet's own Alembic
history; no gRPC server is involved.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ledger import Hold, Holds, Ledger, Posting
from runtime.clock import FixedClock
from runtime.db import Database
from runtime.errors import FailedPrecondition, PermissionDenied
from runtime.migrations import upgrade
from tests.helpers import run_state_machine
from tests.suite import create_pg_database, drop_pg_database

SERVICES = Path(__file__).resolve().parents[1] / "services"
SALES, SPEND = "system:coin_sales", "system:promotion_spend"
START = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
T = TypeVar("T")


@pytest.fixture
async def db(backend: str, tmp_path: Path) -> AsyncIterator[Database]:
    name = f"coins_holds_{uuid.uuid4().hex[:12]}"
    url = (
        await create_pg_database(name)
        if backend == "postgres"
        else f"sqlite+aiosqlite:///{tmp_path / 'holds.db'}"
    )
    database = Database(url)
    await upgrade(database, SERVICES / "wallet" / "migrations")
    try:
        yield database
    finally:
        await database.close()
        if backend == "postgres":
            await drop_pg_database(name)


class Books:
    """The ledger and its holds on one database, with a clock the test moves."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.clock = FixedClock(START)
        self.ledger = Ledger(self.clock, unit="coins")
        self.holds = Holds(self.ledger)

    async def fund(self, user: str, coins: int) -> None:
        async with self.db.transaction() as conn:
            await self.ledger.open_account(conn, user)
            await self.ledger.post(
                conn,
                [Posting(SALES, -coins), Posting(user, coins)],
                kind="purchase",
                reference=uuid.uuid4().hex,
                request_id=uuid.uuid4().hex,
                caller="test",
            )

    async def debit(self, user: str, coins: int) -> None:
        async with self.db.transaction() as conn:
            await self.ledger.post(
                conn,
                [Posting(user, -coins), Posting(SPEND, coins)],
                kind="gift",
                reference=uuid.uuid4().hex,
                request_id=uuid.uuid4().hex,
                caller="test",
            )

    async def place(self, user: str, coins: int, ttl: dt.timedelta | None = None) -> Hold:
        async with self.db.transaction() as conn:
            return await self.holds.place(
                conn,
                user,
                coins,
                counter_account_id=SPEND,
                owner="promotion",
                kind="promotion",
                reference=uuid.uuid4().hex,
                expires_at=self.clock.now() + ttl if ttl else None,
            )

    async def capture(self, hold_id: str, coins: int, owner: str = "promotion") -> Hold:
        async with self.db.transaction() as conn:
            hold, _ = await self.holds.capture(
                conn, hold_id, coins, owner=owner, request_id=uuid.uuid4().hex, caller=owner
            )
            return hold

    async def release(self, hold_id: str) -> Hold:
        async with self.db.transaction() as conn:
            return await self.holds.release(conn, hold_id, owner="promotion")

    async def expire(self) -> list[Hold]:
        async with self.db.transaction() as conn:
            return await self.holds.expire_due(conn)

    async def available(self, user: str) -> tuple[int, int]:
        async with self.db.read() as conn:
            found = await self.ledger.available(conn, user)
        assert found is not None
        return found

    async def assert_books_exact(self) -> None:
        async with self.db.read() as conn:
            report = await self.ledger.audit(conn)
        assert report.ok, report


async def refused(call: Coroutine[Any, Any, object], reason: str) -> None:
    with pytest.raises((FailedPrecondition, PermissionDenied)) as caught:
        await call
    assert caught.value.reason == reason, caught.value


async def test_a_hold_reserves_coins_that_debits_cannot_spend(db: Database) -> None:
    books = Books(db)
    await books.fund("ava", 1_000)
    await books.place("ava", 700)
    assert await books.available("ava") == (1_000, 300)
    await refused(books.debit("ava", 301), "INSUFFICIENT_FUNDS")
    await books.debit("ava", 300)
    await refused(books.place("ava", 1), "INSUFFICIENT_FUNDS")
    assert await books.available("ava") == (700, 0)
    await books.assert_books_exact()


async def test_captures_in_parts_up_to_the_amount_then_the_rest_is_released(db: Database) -> None:
    books = Books(db)
    await books.fund("ava", 1_000)
    hold = await books.place("ava", 500)
    assert (await books.capture(hold.hold_id, 200)).captured == 200
    assert (await books.capture(hold.hold_id, 100)).status == "active"
    await refused(books.capture(hold.hold_id, 201), "CAPTURE_EXCEEDS_HOLD")
    assert await books.available("ava") == (700, 500)  # 200 of the hold still reserved
    released = await books.release(hold.hold_id)
    assert (released.status, released.captured) == ("released", 300)
    assert await books.available("ava") == (700, 700)
    await refused(books.release(hold.hold_id), "HOLD_RELEASED")
    await refused(books.capture(hold.hold_id, 1), "HOLD_RELEASED")
    await books.assert_books_exact()


async def test_a_fully_captured_hold_is_resolved(db: Database) -> None:
    books = Books(db)
    await books.fund("ava", 100)
    hold = await books.place("ava", 100)
    assert (await books.capture(hold.hold_id, 100)).status == "captured"
    await refused(books.release(hold.hold_id), "HOLD_CAPTURED")
    assert await books.available("ava") == (0, 0)
    await books.assert_books_exact()


async def test_holds_past_their_expiry_release_themselves(db: Database) -> None:
    books = Books(db)
    await books.fund("ava", 100)
    hold = await books.place("ava", 60, ttl=dt.timedelta(minutes=10))
    await books.capture(hold.hold_id, 10)
    assert await books.expire() == []
    books.clock.advance(dt.timedelta(minutes=10))
    await refused(books.capture(hold.hold_id, 1), "HOLD_EXPIRED")
    await refused(books.release(hold.hold_id), "HOLD_EXPIRED")
    async with db.read() as conn:  # as GetHold reads it: expired, though not yet swept
        seen = await books.holds.as_it_stands(conn, hold.hold_id, "promotion")
        assert (seen.status, (await books.holds.get(conn, hold.hold_id)).status) == (
            "expired",
            "active",
        )
    [expired] = await books.expire()
    assert (expired.hold_id, expired.status, expired.captured) == (hold.hold_id, "expired", 10)
    assert await books.available("ava") == (90, 90)
    assert await books.expire() == []
    await books.assert_books_exact()


async def test_only_the_owner_service_resolves_a_hold(db: Database) -> None:
    books = Books(db)
    await books.fund("ava", 100)
    hold = await books.place("ava", 50)
    await refused(books.capture(hold.hold_id, 10, owner="gifting"), "HOLD_NOT_OWNED")
    assert await books.available("ava") == (100, 50)


async def test_concurrent_holds_and_debits_never_reserve_more_than_the_balance(
    db: Database,
) -> None:
    books = Books(db)
    await books.fund("ava", 1_000)

    async def attempt(call: Coroutine[Any, Any, object]) -> bool:
        try:
            await call
            return True
        except FailedPrecondition:
            return False

    calls = [attempt(books.place("ava", 70)) for _ in range(20)]
    calls += [attempt(books.debit("ava", 30)) for _ in range(20)]
    outcomes = await asyncio.gather(*calls)
    held = 70 * sum(outcomes[:20])
    spent = 30 * sum(outcomes[20:])
    balance, available = await books.available("ava")
    assert (balance, available) == (1_000 - spent, 1_000 - spent - held)
    assert available >= 0 and held + spent > 1_000 - 70  # nothing was refused needlessly
    await books.assert_books_exact()


class HoldsMachine(RuleBasedStateMachine):
    """Random sequences of funding, debits, holds, captures, releases and expiries on three users,
    checked after every step against a model and against the ledger's own audit."""

    db: Database
    run: Callable[[Coroutine[Any, Any, Any]], Any]

    def __init__(self) -> None:
        super().__init__()
        self.books = Books(self.db)
        self.users = [f"u{uuid.uuid4().hex[:8]}" for _ in range(3)]
        self.balance = dict.fromkeys(self.users, 0)
        self.holds: dict[str, tuple[str, int, int, dt.datetime | None]] = {}  # active only
        for user in self.users:
            self.run(self.books.fund(user, 1))
            self.balance[user] = 1

    def _held(self, user: str) -> int:
        return sum(a - c for u, a, c, _ in self.holds.values() if u == user)

    @rule(user=st.integers(0, 2), coins=st.integers(1, 500))
    def fund(self, user: int, coins: int) -> None:
        self.run(self.books.fund(self.users[user], coins))
        self.balance[self.users[user]] += coins

    @rule(user=st.integers(0, 2), coins=st.integers(1, 500))
    def debit(self, user: int, coins: int) -> None:
        name = self.users[user]
        ok = coins <= self.balance[name] - self._held(name)
        try:
            self.run(self.books.debit(name, coins))
            assert ok, "a debit spent held or missing coins"
            self.balance[name] -= coins
        except FailedPrecondition as error:
            assert not ok and error.reason == "INSUFFICIENT_FUNDS"

    @rule(user=st.integers(0, 2), coins=st.integers(1, 500), ttl=st.sampled_from([None, 5, 30]))
    def place(self, user: int, coins: int, ttl: int | None) -> None:
        name = self.users[user]
        ok = coins <= self.balance[name] - self._held(name)
        try:
            hold = self.run(
                self.books.place(name, coins, dt.timedelta(minutes=ttl) if ttl else None)
            )
            assert ok, "a hold reserved held or missing coins"
            self.holds[hold.hold_id] = (name, coins, 0, hold.expires_at)
        except FailedPrecondition as error:
            assert not ok and error.reason == "INSUFFICIENT_FUNDS"

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data())
    def capture(self, data: st.DataObject) -> None:
        hold_id = list(self.holds)[data.draw(st.integers(0, len(self.holds) - 1))]
        user, amount, captured, _ = self.holds[hold_id]
        coins = data.draw(st.integers(1, amount - captured + 2))
        try:
            hold = self.run(self.books.capture(hold_id, coins))
            assert coins <= amount - captured
            self.balance[user] -= coins
            if hold.status == "captured":
                del self.holds[hold_id]
            else:
                self.holds[hold_id] = (user, amount, captured + coins, hold.expires_at)
        except FailedPrecondition as error:
            assert coins > amount - captured and error.reason == "CAPTURE_EXCEEDS_HOLD"

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        hold_id = list(self.holds)[data.draw(st.integers(0, len(self.holds) - 1))]
        hold = self.run(self.books.release(hold_id))
        assert hold.status == "released"
        del self.holds[hold_id]
        with pytest.raises(FailedPrecondition):
            self.run(self.books.release(hold_id))  # a hold resolves exactly once

    @rule(minutes=st.sampled_from([1, 10, 40]))
    def time_passes(self, minutes: int) -> None:
        self.books.clock.advance(dt.timedelta(minutes=minutes))
        expired = {h.hold_id for h in self.run(self.books.expire()) if h.account_id in self.users}
        now = self.books.clock.now()
        due = {i for i, (_, _, _, at) in self.holds.items() if at is not None and at <= now}
        assert expired == due
        for hold_id in due:
            del self.holds[hold_id]

    @invariant()
    def books_match_the_model(self) -> None:
        for user in self.users:
            assert self.run(self.books.available(user)) == (
                self.balance[user],
                self.balance[user] - self._held(user),
            )
        self.run(self.books.assert_books_exact())


def test_random_sequences_keep_the_books_exact(backend: str, tmp_path: Path) -> None:
    """Runs the state machine on a database of its own, on its own event loop (hypothesis drives
    a synchronous machine; each step runs the ledger's coroutines to completion)."""
    run_state_machine(HoldsMachine, backend, tmp_path, max_examples=10, steps=25)
