"""History is append-only in the database itself: ledger transactions and entries and the admin audit
trail refuse UPDATE, DELETE (and TRUNCATE) from the service's own connections, and the tables' owner
is stopped by triggers too. Only someone who can switch the triggers off (a superuser) gets past,
and the ledger audit still finds what they did (tests/test_ledger_chain.py)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from coins.common.v1 import ledger_audit_pb2, ledger_audit_pb2_grpc
from coins.payout.v1 import payout_pb2
from ledger.schema import ACCOUNT_COLUMNS_POSTINGS_CHANGE
from runtime.db import Database
from tests.helpers import funded_user, new_id
from tests.suite import Suite

HISTORY = ("ledger_transactions", "ledger_entries", "admin_audit")
LEDGER_SERVICES = ("wallet", "payout")


def rewrites(table: str) -> list[str]:
    return [f"UPDATE {table} SET created_at = created_at", f"DELETE FROM {table}"]


async def refused(db: Database, sql: str) -> str:
    """Run `sql` in a transaction of `db`; the error it was refused with."""
    with pytest.raises(DBAPIError) as caught:
        async with db.transaction() as conn:
            await conn.execute(sa.text(sql))
    return str(caught.value)


async def write_history(suite: Suite) -> None:
    """Rows in every history table of both ledgers (row triggers only fire where rows are)."""
    await funded_user(suite)
    await suite.as_caller("gifting").payout.CreditDiamonds(
        payout_pb2.CreditDiamondsRequest(
            request_id=new_id("gift"), creator_id=new_id("creator"), coins=10, reference="h"
        )
    )
    for service in LEDGER_SERVICES:  # an admin call: a row in the audit trail
        await ledger_audit_pb2_grpc.LedgerAuditServiceStub(suite.channel(service)).AuditLedger(
            ledger_audit_pb2.AuditLedgerRequest(), metadata=suite.token(new_id("ops"), admin=True)
        )


async def count(db: Database, table: str) -> int:
    async with db.read() as conn:
        return int(await conn.scalar(sa.text(f"SELECT count(*) FROM {table}")) or 0)


@pytest.mark.parametrize("service", LEDGER_SERVICES)
async def test_the_service_cannot_rewrite_its_history(suite: Suite, service: str) -> None:
    await write_history(suite)
    db = suite.services[service].runtime.db
    for table in HISTORY:
        rows = await count(db, table)
        assert rows > 0, f"no {table} rows to rewrite"
        statements = rewrites(table) + ([f"TRUNCATE {table}"] if not db.is_sqlite else [])
        for sql in statements:
            error = await refused(db, sql)
            assert "append-only" in error or "permission denied" in error, error
        assert await count(db, table) == rows


@pytest.mark.parametrize("service", LEDGER_SERVICES)
async def test_the_tables_owner_is_stopped_by_triggers(suite: Suite, service: str) -> None:
    await write_history(suite)
    owner = Database(suite.services[service].runtime.db.url)  # the login user, no role
    try:
        for table in HISTORY:
            for sql in rewrites(table):
                assert "append-only" in await refused(owner, sql)
    finally:
        await owner.close()


GUARDED = {
    "wallet": HISTORY,
    "payout": HISTORY,
    "gifting": ("admin_audit", "live_events"),
    "promotion": ("admin_audit",),
}
"""Every service's append-only tables."""


@pytest.mark.parametrize("service", GUARDED)
async def test_the_tables_owner_cannot_empty_history_either(suite: Suite, service: str) -> None:
    """Row triggers do not fire on TRUNCATE (PostgreSQL): statement triggers refuse it to the owner
    of the tables, the login user migrations run as (review A1: the owner could empty the admin
    audit trail). SQLite has no TRUNCATE; its DELETE without WHERE fires the row triggers, which
    the test above checks are there."""
    if suite.services[service].runtime.db.is_sqlite:
        pytest.skip("SQLite has no TRUNCATE")
    owner = Database(suite.services[service].runtime.db.url)
    try:
        for table in GUARDED[service]:
            assert "append-only" in await refused(owner, f"TRUNCATE {table} CASCADE"), table
    finally:
        await owner.close()


async def test_every_service_guards_its_history_tables(suite: Suite) -> None:
    """PostgreSQL: the service's connections act as a role without the rights; SQLite: the triggers
    are there on every history table of every service."""
    for service, tables in GUARDED.items():
        db = suite.services[service].runtime.db
        async with db.read() as conn:
            if db.is_sqlite:
                triggers = {
                    (table, name)
                    for table, name in await conn.execute(
                        sa.text("SELECT tbl_name, name FROM sqlite_master WHERE type = 'trigger'")
                    )
                }
                for table in tables:
                    guarded = {name for t, name in triggers if t == table}
                    assert {f"{table}_no_update", f"{table}_no_delete"} <= guarded, service
                continue
            assert await conn.scalar(sa.text("SELECT current_user")) == "coins_service"
            for table in tables:
                for right in ("UPDATE", "DELETE", "TRUNCATE"):
                    assert not await conn.scalar(
                        sa.text("SELECT has_table_privilege(current_user, :t, :r)"),
                        {"t": table, "r": right},
                    ), f"{service}: {right} on {table}"
                assert await conn.scalar(
                    sa.text("SELECT has_table_privilege(current_user, :t, 'INSERT')"),
                    {"t": table},
                )


@pytest.mark.parametrize("service", LEDGER_SERVICES)
async def test_the_service_role_cannot_change_an_account_s_flags(
    suite: Suite, service: str
) -> None:
    """PostgreSQL: the service's connections may update what postings, holds and freezes change
    on an account, not its flags. A review set `allow_negative` as the service role: a user with 0
    coins sent a gift, went to -3, and the audit (which reads that flag) stayed clean."""
    db = suite.services[service].runtime.db
    if db.is_sqlite:
        pytest.skip("SQLite has no roles: one process, one user")
    async with db.read() as conn:
        assert await conn.scalar(sa.text("SELECT current_user")) == "coins_service"
        for column in ("allow_negative", "kind", "keeps_balance", "account_id"):
            assert not await conn.scalar(
                sa.text("SELECT has_column_privilege('ledger_accounts', :c, 'UPDATE')"),
                {"c": column},
            ), column
        for column in ACCOUNT_COLUMNS_POSTINGS_CHANGE:
            assert await conn.scalar(
                sa.text("SELECT has_column_privilege('ledger_accounts', :c, 'UPDATE')"),
                {"c": column},
            ), column
    assert "permission denied" in await refused(
        db, "UPDATE ledger_accounts SET allow_negative = true WHERE false"
    )


@pytest.mark.parametrize("service", LEDGER_SERVICES)
async def test_the_entry_id_key_cannot_be_changed(suite: Suite, service: str) -> None:
    """The key behind the entry ids callers see (ledger.entry_ids) is written once: a changed key
    would rename every entry a caller has kept."""
    db = suite.services[service].runtime.db
    assert await count(db, "ledger_secrets") == 1
    for sql in ("UPDATE ledger_secrets SET value = value", "DELETE FROM ledger_secrets"):
        assert "append-only" in await refused(db, sql), sql
    assert await count(db, "ledger_secrets") == 1
