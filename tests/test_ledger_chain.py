"""The ledger is tamper-evident: entries chain per account, transactions carry digests, the audit checks.

These tests drive the ledger directly against a real database (SQLite and PostgreSQL), migrated by the
services' own Alembic histories; no gRPC server is involved. Tampering is done the way an intruder with
database access would: plain SQL.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger import GENESIS, AuditReport, Ledger, Posting, accounts, entries, transactions
from ledger.anchors import AnchorStore
from ledger.chain import entry_hash, transaction_digest
from runtime.clock import SystemClock
from runtime.db import Database
from tests.helpers import migrated, rewrite_history

COIN_SALES = "system:coin_sales"
GIFT_SPEND = "system:gift_spend"


async def post(db: Database, ledger: Ledger, *legs: tuple[str, int], kind: str = "test") -> str:
    async with db.transaction() as conn:
        posted = await ledger.post(
            conn,
            [Posting(account, amount) for account, amount in legs],
            kind=kind,
            reference=uuid.uuid4().hex,
            request_id=uuid.uuid4().hex,
            caller="test",
        )
    return posted.transaction_id


async def audit(db: Database) -> AuditReport:
    async with db.read() as conn:
        return await Ledger(SystemClock(), unit="coins").audit(conn)


async def chain_of(conn: AsyncConnection, account_id: str) -> list[sa.Row[tuple[int, str, str]]]:
    return list(
        (
            await conn.execute(
                sa.select(entries.c.seq, entries.c.prev_hash, entries.c.hash)
                .where(entries.c.account_id == account_id)
                .order_by(entries.c.entry_id)
            )
        ).all()
    )


async def assert_intact(db: Database, account_id: str, length: int) -> None:
    """The account's entries, in entry order, are seq 1..length, each linked to the one before."""
    async with db.read() as conn:
        chain = await chain_of(conn, account_id)
        head = (
            await conn.execute(
                sa.select(accounts.c.seq, accounts.c.head_hash).where(
                    accounts.c.account_id == account_id
                )
            )
        ).one()
    assert [link.seq for link in chain] == list(range(1, length + 1))
    assert [link.prev_hash for link in chain] == [GENESIS] + [link.hash for link in chain[:-1]]
    assert len({link.hash for link in chain}) == length
    assert (head.seq, head.head_hash) == (length, chain[-1].hash if chain else GENESIS)


async def test_chains_stay_intact_under_concurrent_postings(database: Database) -> None:
    db = await migrated(database)
    ledger = Ledger(SystemClock(), unit="coins")
    async with db.transaction() as conn:
        for user in ("alice", "bob"):
            await ledger.open_account(conn, user)
    await post(db, ledger, (COIN_SALES, -10_000), ("alice", 10_000), kind="purchase")
    await post(db, ledger, (COIN_SALES, -10_000), ("bob", 10_000), kind="purchase")
    await post(db, ledger, ("alice", -7), ("alice", 7))  # one account twice in one transaction

    async def gift(user: str, coins: int) -> str:
        return await post(db, ledger, (user, -coins), (GIFT_SPEND, coins), kind="gift")

    # Gifts from both users and transfers both ways, all at once: row locks in account order serialize
    # each account's chain without deadlocks, and every seq is taken exactly once.
    calls = [gift("alice", n + 1) for n in range(30)]
    calls += [gift("bob", n + 1) for n in range(10)]
    calls += [post(db, ledger, ("alice", -5), ("bob", 5)) for _ in range(10)]
    calls += [post(db, ledger, ("bob", -3), ("alice", 3)) for _ in range(10)]
    await asyncio.gather(*calls)

    report = await audit(db)
    assert report.ok, report
    assert report.chains_checked == 2  # the users; system accounts keep no balance and no chain
    assert report.transactions_checked == 63
    await assert_intact(db, "alice", 1 + 2 + 30 + 10 + 10)
    await assert_intact(db, "bob", 1 + 10 + 10 + 10)
    async with db.read() as conn:
        unchained = await conn.scalar(
            sa.select(sa.func.count()).where(
                entries.c.account_id.in_([COIN_SALES, GIFT_SPEND]), entries.c.seq.is_not(None)
            )
        )
        assert unchained == 0
        digests = (await conn.execute(sa.select(transactions.c.digest))).scalars().all()
        assert all(len(digest) == 64 for digest in digests)


@dataclass
class Books:
    db: Database
    purchase: str
    """alice's first transaction (seq 1)."""
    gift: str
    """alice's second transaction (seq 2), to the passive gift-spend account."""
    last: str
    """alice's last transaction (seq 4), a transfer to bob."""


@pytest.fixture
async def books(database: Database) -> Books:
    """alice: purchase, gift, gift, transfer to bob; bob: purchase, the transfer. The audit is clean."""
    db = await migrated(database)
    ledger = Ledger(SystemClock(), unit="coins")
    async with db.transaction() as conn:
        for user in ("alice", "bob"):
            await ledger.open_account(conn, user)
    purchase = await post(db, ledger, (COIN_SALES, -1_000), ("alice", 1_000), kind="purchase")
    gift = await post(db, ledger, ("alice", -100), (GIFT_SPEND, 100), kind="gift")
    await post(db, ledger, ("alice", -30), (GIFT_SPEND, 30), kind="gift")
    await post(db, ledger, (COIN_SALES, -200), ("bob", 200), kind="purchase")
    last = await post(db, ledger, ("alice", -50), ("bob", 50), kind="transfer")
    assert (await audit(db)).ok
    return Books(db, purchase, gift, last)


async def tamper(db: Database, sql: str, **params: object) -> None:
    assert await rewrite_history(db.url, sql, params) == 1


async def test_altering_a_user_entry_breaks_its_chain(books: Books) -> None:
    await tamper(
        books.db,
        "UPDATE ledger_entries SET amount = -10, balance_after = 990 "
        "WHERE transaction_id = :t AND account_id = 'alice'",
        t=books.gift,
    )
    report = await audit(books.db)
    assert not report.ok
    assert set(report.bad_transactions) == {books.gift}
    assert report.broken_chains == {
        "alice": f"seq 2: hash does not match the entry or its transaction {books.gift}"
    }
    assert set(report.mismatches) == {"alice"}


async def test_altering_a_system_entry_breaks_the_user_chain_of_its_transaction(
    books: Books,
) -> None:
    await tamper(
        books.db,
        "UPDATE ledger_entries SET amount = 90 WHERE transaction_id = :t AND account_id = :a",
        t=books.gift,
        a=GIFT_SPEND,
    )
    report = await audit(books.db)
    assert not report.ok
    assert set(report.bad_transactions) == {books.gift}
    assert set(report.broken_chains) == {"alice"}  # the system account itself is not chained
    assert "seq 2" in report.broken_chains["alice"]
    assert report.mismatches == {}  # alice's kept balance still matches her own entries


async def test_a_recomputed_digest_does_not_hide_an_altered_system_entry(books: Books) -> None:
    """Rewriting the transaction's digest to match the forgery still leaves alice's chain broken."""
    await tamper(
        books.db,
        "UPDATE ledger_entries SET amount = 90 WHERE transaction_id = :t AND account_id = :a",
        t=books.gift,
        a=GIFT_SPEND,
    )
    async with books.db.transaction() as conn:
        tx = (
            await conn.execute(
                sa.select(transactions).where(transactions.c.transaction_id == books.gift)
            )
        ).one()
        legs = (
            await conn.execute(
                sa.select(
                    entries.c.account_id,
                    entries.c.amount,
                    entries.c.balance_after,
                    entries.c.created_at,
                ).where(entries.c.transaction_id == books.gift)
            )
        ).all()
        forged = transaction_digest(
            transaction_id=tx.transaction_id,
            kind=tx.kind,
            reference=tx.reference,
            request_id=tx.request_id,
            caller=tx.caller,
            policy_version=tx.policy_version,
            trace_id=tx.trace_id,
            created_at=tx.created_at,
            entries=[(leg[0], leg[1], leg[2], leg[3]) for leg in legs],
        )
    await rewrite_history(
        books.db.url,
        sa.update(transactions)
        .where(transactions.c.transaction_id == books.gift)
        .values(digest=forged),
    )
    report = await audit(books.db)
    assert not report.ok
    # The forged digest recomputes, but the forgery shows twice: the transaction's legs no longer
    # sum to zero, and alice's link still hashes the digest it was written with.
    assert report.bad_transactions == {books.gift: "its entries sum to -10, not zero"}
    assert set(report.broken_chains) == {"alice"}


@pytest.mark.parametrize("kind", [None, "refund"])
async def test_an_entry_s_kind_unlike_its_transaction_s_is_reported(
    books: Books, kind: str | None
) -> None:
    """The kind on an entry is what kind filters and statements read: an entry whose kind was
    blanked (NULL: a review saw it drop out of `kinds=[GIFT]` and into an unspecified statement
    line, unreported) or changed is reported, though the kind is not in the digest."""
    await tamper(
        books.db,
        "UPDATE ledger_entries SET kind = :k WHERE transaction_id = :t AND account_id = 'alice'",
        t=books.gift,
        k=kind,
    )
    report = await audit(books.db)
    assert not report.ok
    assert report.bad_transactions == {books.gift: "an entry's kind is not its transaction's"}


async def test_deleting_an_entry_leaves_a_gap(books: Books) -> None:
    await tamper(
        books.db,
        "DELETE FROM ledger_entries WHERE transaction_id = :t AND account_id = 'alice'",
        t=books.gift,
    )
    report = await audit(books.db)
    assert not report.ok
    assert set(report.bad_transactions) == {books.gift}
    assert report.broken_chains == {"alice": "seq 2 is missing (next entry found is seq 3)"}
    assert set(report.mismatches) == {"alice"}


async def test_deleting_the_last_entry_shows_at_the_head(books: Books) -> None:
    await tamper(
        books.db,
        "DELETE FROM ledger_entries WHERE transaction_id = :t AND account_id = 'alice'",
        t=books.last,
    )
    report = await audit(books.db)
    assert not report.ok
    assert set(report.bad_transactions) == {books.last}
    assert report.broken_chains == {
        "alice": "the chain ends at seq 3 but the account's head is seq 4",
        "bob": f"seq 2: hash does not match the entry or its transaction {books.last}",
    }


async def test_altering_a_transaction_row_breaks_its_digest_and_chain(books: Books) -> None:
    await tamper(
        books.db,
        "UPDATE ledger_transactions SET reference = 'someone-else' WHERE transaction_id = :t",
        t=books.purchase,
    )
    report = await audit(books.db)
    assert not report.ok
    assert report.bad_transactions == {
        books.purchase: "digest does not recompute: the transaction or one of its entries was "
        "altered, added or removed"
    }
    assert set(report.broken_chains) == {"alice"}
    assert "seq 1" in report.broken_chains["alice"]
    assert report.mismatches == {} and report.total == 0


async def test_altering_a_link_hash_breaks_the_next_link(books: Books) -> None:
    """Recomputing one forged link's hash is not enough: the next entry still holds the old one."""
    async with books.db.read() as conn:
        first = (await chain_of(conn, "alice"))[0]
        digest = await conn.scalar(
            sa.select(transactions.c.digest).where(transactions.c.transaction_id == books.purchase)
        )
    assert digest is not None
    forged = entry_hash(
        prev_hash=GENESIS,
        account_id="alice",
        seq=1,
        amount=1_000,
        balance_after=1_000,
        transaction_id=books.purchase,
        digest=digest,
    )
    assert forged == first.hash  # the scheme is what the ledger wrote
    await tamper(
        books.db,
        "UPDATE ledger_entries SET hash = :h WHERE account_id = 'alice' AND seq = 1",
        h="f" * 64,
    )
    report = await audit(books.db)
    assert report.bad_transactions == {}
    assert report.broken_chains == {
        "alice": f"seq 1: hash does not match the entry or its transaction {books.purchase}"
    }


@pytest.mark.parametrize("service", ["wallet", "payout"])
async def test_the_migration_chains_existing_books(database: Database, service: str) -> None:
    """Books written before the chain existed are digested and chained by revision 0002."""
    db = await migrated(database, service, "0001")
    system = COIN_SALES if service == "wallet" else "system:diamond_issuance"
    now = SystemClock().now()
    legacy = [(system, "carol", 500), ("carol", system, 120), (system, "dave", 40)]
    balances = {"carol": 0, "dave": 0}
    async with db.transaction() as conn:
        for user in balances:
            await conn.execute(
                accounts.insert().values(
                    account_id=user,
                    kind="user",
                    balance=0,
                    allow_negative=False,
                    keeps_balance=True,
                    created_at=now,
                )
            )
        for number, (source, target, amount) in enumerate(legacy):
            transaction_id = f"legacy-{number}"
            await conn.execute(
                transactions.insert().values(
                    transaction_id=transaction_id,
                    kind="legacy",
                    reference=f"ref-{number}",
                    request_id=f"req-{number}",
                    caller="test",
                    policy_version="",
                    trace_id="",
                    created_at=now,
                )
            )
            for account, delta in ((source, -amount), (target, amount)):
                after = None
                if account in balances:
                    balances[account] += delta
                    after = balances[account]
                    await conn.execute(
                        accounts.update()
                        .where(accounts.c.account_id == account)
                        .values(balance=after)
                    )
                await conn.execute(
                    entries.insert().values(
                        transaction_id=transaction_id,
                        account_id=account,
                        amount=delta,
                        balance_after=after,
                        created_at=now,
                    )
                )

    await migrated(db, service)
    report = await audit(db)
    assert report.ok, report
    assert report.transactions_checked == 3
    await assert_intact(db, "carol", 2)
    await assert_intact(db, "dave", 1)

    ledger = Ledger(SystemClock(), unit="units")
    await post(db, ledger, ("carol", -80), ("dave", 80))
    assert (await audit(db)).ok
    await assert_intact(db, "carol", 3)
    await assert_intact(db, "dave", 2)


async def test_erasing_the_newest_transaction_fools_the_chain_but_not_the_anchor(
    books: Books, tmp_path: Path
) -> None:
    """Someone who can write the database erases the last transfer and rolls both accounts back to
    their previous heads: every chain and balance is consistent again, and the plain audit passes.
    The chain heads anchored outside the database before it name an entry that is gone."""
    ledger = Ledger(SystemClock(), unit="coins")
    anchors = AnchorStore(tmp_path / "anchors")
    async with books.db.read() as conn:
        anchors.write(await ledger.chain_heads(conn), SystemClock().now())
        before = {
            a: (
                await conn.execute(
                    sa.select(entries.c.balance_after, entries.c.seq, entries.c.hash)
                    .where(entries.c.account_id == a)
                    .order_by(entries.c.entry_id.desc())
                    .offset(1)
                    .limit(1)
                )
            ).one()
            for a in ("alice", "bob")
        }
    for sql, params in (
        ("DELETE FROM ledger_entries WHERE transaction_id = :t", {"t": books.last}),
        ("DELETE FROM ledger_transactions WHERE transaction_id = :t", {"t": books.last}),
    ):
        await rewrite_history(books.db.url, sql, params)
    for account, previous in before.items():
        await rewrite_history(
            books.db.url,
            "UPDATE ledger_accounts SET balance = :balance, seq = :seq, head_hash = :hash "
            "WHERE account_id = :account",
            {
                "balance": previous.balance_after,
                "seq": previous.seq,
                "hash": previous.hash,
                "account": account,
            },
        )
    assert (await audit(books.db)).ok  # the forgery is consistent
    async with books.db.read() as conn:
        anchored = await ledger.audit(conn, anchors.latest())
    assert not anchored.ok
    assert set(anchored.broken_chains) == {"alice", "bob"}
    assert "is gone" in anchored.broken_chains["alice"]
