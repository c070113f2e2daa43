"""`python -m ledger.auditor` run by hand, as the CoinsLedgerAuditStale runbook says: without the
service's environment it names the database it looked for and what to set, and never leaves an
empty SQLite file behind; on a database that was never migrated it says so, naming it."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sys
from pathlib import Path

from ledger.api import first_pass_due
from ledger.audit import AuditReport
from ledger.auditor import AuditRun
from runtime.db import Database
from tests.helpers import migrated

ROOT = Path(__file__).resolve().parents[1]


async def audit(cwd: Path, *arguments: str, **variables: str) -> tuple[int, str]:
    """The job in `cwd` with none of the wallet's settings in its environment but `variables`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WALLET_", "COINS_DATA_DIR"))}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "gen"), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env.update(variables)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ledger.auditor",
        *arguments,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_without_the_services_environment_no_database_is_created(tmp_path: Path) -> None:
    """It made data/wallet.db, empty, and failed on "no such table: ledger_audit_runs" without
    saying where it had looked."""
    code, output = await audit(tmp_path, "wallet", "--incremental")
    assert code == 2, output
    assert f"there is no database at sqlite+aiosqlite:///{tmp_path / 'data' / 'wallet.db'}" in (
        output
    )
    assert "WALLET_DATABASE_URL" in output and "COINS_DATA_DIR" in output, output
    assert os.listdir(tmp_path) == [], "the audit created files"


async def test_an_unmigrated_database_is_named_and_a_migrated_one_audited(
    database: Database, tmp_path: Path
) -> None:
    url = database.url
    if database.is_sqlite:
        await asyncio.to_thread(Path(url.split(":///", 1)[1]).touch)  # an empty SQLite database
    else:  # a password (trust ignores it) that must not be printed
        url = url.replace("postgres@", "postgres:not-to-be-shown@", 1)
    name = url.rsplit("/", 1)[1]
    code, output = await audit(tmp_path, "wallet", "--incremental", WALLET_DATABASE_URL=url)
    assert code == 2, output
    assert "has not been migrated" in output and name in output, output
    assert "not-to-be-shown" not in output, output
    assert "tools.migrate wallet" in output, output
    await migrated(database, "wallet")
    code, output = await audit(tmp_path, "wallet", "--incremental", WALLET_DATABASE_URL=url)
    assert code == 0 and "audit clean" in output, output


def test_a_new_leader_audits_at_once_when_the_last_run_is_a_period_old() -> None:
    """Each new leader waited a period before its first audit: leadership changing more often
    than that (rolling restarts) would have put the audit off for good."""
    every = dt.timedelta(seconds=900)
    now = dt.datetime(2026, 12, 8, 12, tzinfo=dt.UTC)

    def ran(ago: dt.timedelta) -> AuditRun:
        return AuditRun("r", now - ago - dt.timedelta(seconds=5), now - ago, AuditReport())

    assert first_pass_due(ran(every), now, every)
    assert first_pass_due(ran(dt.timedelta(hours=5)), now, every)
    assert not first_pass_due(ran(dt.timedelta(seconds=60)), now, every)  # a restart
    assert not first_pass_due(None, now, every)  # a new database: a period on
