"""The ledger audit as a job: its own process, its own connection, its report kept in the database.

An audit reads every entry; run inside a serving process it would take that process's CPU (and GIL)
for minutes. So it always runs here, in a process of its own at a lower CPU priority:

    python -m ledger.auditor wallet                 # a full audit, with the wallet's settings
    python -m ledger.auditor payout --incremental   # only what was appended since the last clean one

(or started by the service itself: AuditLedger, and the periodic incremental audit). Each run is
recorded in `ledger_audit_runs` (findings as JSON) and a clean run moves the checkpoints
(`ledger_audit_checkpoints`) to the heads it verified, in the snapshot it verified, so the next
incremental run starts exactly there. Exit status: 0 clean, 1 findings, 2 could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import datetime as dt
import importlib
import json
import os
import resource
import signal
import sqlite3
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
from sqlalchemy.engine import make_url

from ledger.anchors import AnchorStore
from ledger.audit import AuditReport, audit_books
from runtime.outages import causes
from runtime.sql import Driver, Statement, Tx

if TYPE_CHECKING:  # a job a service starts never loads the settings (pydantic: ~9 MB)
    from runtime.config import ServiceSettings

_LAST_CHECKPOINT = Statement(
    "audit.last_checkpoint",
    "SELECT entry_watermark FROM ledger_audit_runs WHERE checkpointed "
    "ORDER BY finished_at DESC LIMIT 1",
)
_MOVE_CHECKPOINTS = Statement(
    "audit.move_checkpoints",
    "INSERT INTO ledger_audit_checkpoints (account_id, seq, hash, balance, verified_at) "
    "SELECT account_id, seq, head_hash, balance, :now FROM ledger_accounts "
    "WHERE keeps_balance AND seq > 0 "
    "ON CONFLICT (account_id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, "
    "balance = excluded.balance, verified_at = excluded.verified_at",
)
_MOVE_CHECKPOINTS_AS_OF = Statement(
    "audit.move_checkpoints_as_of",
    "INSERT INTO ledger_audit_checkpoints (account_id, seq, hash, balance, verified_at) "
    "SELECT e.account_id, e.seq, e.hash, e.balance_after, :now FROM ledger_entries e "
    "JOIN (SELECT account_id, MAX(seq) AS seq FROM ledger_entries WHERE entry_id > :after "
    "AND entry_id <= :watermark AND seq IS NOT NULL GROUP BY account_id) h "
    "ON e.account_id = h.account_id AND e.seq = h.seq WHERE true "
    "ON CONFLICT (account_id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, "
    "balance = excluded.balance, verified_at = excluded.verified_at",
)
"""SQLite, after its snapshot ended: the heads the audit verified are each account's newest entry
up to the run's watermark (one writer: entry ids are given in commit order), for the accounts
written since the last checkpoint (`after`)."""
_BACKEND_PID = Statement("audit.backend_pid", "SELECT 0", postgres="SELECT pg_backend_pid()")
_NO_PARALLEL_WORKERS = Statement(
    "audit.no_parallel_workers",
    "SELECT 0",
    postgres="SELECT set_config('max_parallel_workers_per_gather', '0', true)",
)
"""PostgreSQL would run the chain pages with parallel workers: processes of their own, at the
serving backends' priority, for queries that stop at a page anyway."""
_RECORD_RUN = Statement(
    "audit.record_run",
    "INSERT INTO ledger_audit_runs (run_id, mode, started_at, finished_at, ok, checkpointed, "
    "entries_checked, transactions_checked, entry_watermark, report) VALUES (:run_id, :mode, "
    ":started_at, :finished_at, :ok, :checkpointed, :entries_checked, :transactions_checked, "
    ":entry_watermark, :report)",
)
_LATEST_FULL_RUN = Statement(
    "audit.latest_full_run",
    "SELECT run_id, ok, report FROM ledger_audit_runs WHERE mode = 'full' "
    "ORDER BY finished_at DESC LIMIT 1",
)
_LATEST_RUN = Statement(
    "audit.latest_run",
    "SELECT run_id, started_at, finished_at, report FROM ledger_audit_runs "
    "ORDER BY finished_at DESC LIMIT 1",
)

JOB_VARIABLE = "COINS_AUDIT_JOB"

SERVICES = {
    "wallet": "services.wallet.settings:WalletSettings",
    "payout": "services.payout.settings:PayoutSettings",
}
"""The services that keep a ledger, and their settings (read from the environment, as they read it)."""


@dataclasses.dataclass(frozen=True)
class AuditRun:
    run_id: str
    started_at: dt.datetime
    finished_at: dt.datetime
    report: AuditReport


def report_to_json(report: AuditReport) -> str:
    return json.dumps(dataclasses.asdict(report), sort_keys=True)


def report_from_json(text: str) -> AuditReport:
    data: dict[str, Any] = json.loads(text)
    for name in ("mismatches", "held_mismatches"):
        data[name] = {a: (int(k), int(r)) for a, (k, r) in data[name].items()}
    return AuditReport(**data)


def when(value: Any) -> dt.datetime:
    moment = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


async def _record(tx: Tx, run: AuditRun, checkpointed: bool) -> None:
    await tx.run(
        _RECORD_RUN,
        run_id=run.run_id,
        mode=run.report.mode,
        started_at=run.started_at,
        finished_at=run.finished_at,
        ok=run.report.ok,
        checkpointed=checkpointed,
        entries_checked=run.report.entries_checked,
        transactions_checked=run.report.transactions_checked,
        entry_watermark=run.report.entry_watermark,
        report=report_to_json(run.report),
    )


DUTY_CYCLE = 1.0
"""The share of the time a job started by a service may be busy (see ledger.audit's pace)."""


async def run_audit(
    driver: Driver,
    *,
    incremental: bool,
    anchors: AnchorStore | None = None,
    duty_cycle: float = 1.0,
) -> AuditRun:
    """Audit the books in one snapshot and record the run; a clean run moves the checkpoints.
    An incremental run with no clean run before it is a full one; one after a full audit that
    found something keeps those findings (`_carry`)."""
    started = dt.datetime.now(dt.UTC)
    anchor = anchors.latest() if anchors is not None else None
    run: AuditRun | None = None
    after: int | None = None
    try:
        async with driver.snapshot() as tx:
            if tx.dialect == "postgresql":
                _lower_priority(await tx.one(_BACKEND_PID))
                await tx.one(_NO_PARALLEL_WORKERS)
            if incremental:
                row = await tx.one(_LAST_CHECKPOINT)
                after = None if row is None else int(row[0])
            outstanding = await tx.one(_LATEST_FULL_RUN) if after is not None else None
            report = await audit_books(
                tx, anchor=anchor, incremental_after=after, duty_cycle=duty_cycle
            )
            if outstanding is not None and not outstanding[1]:
                _carry(report, str(outstanding[0]), report_from_json(str(outstanding[2])))
            run = AuditRun(uuid.uuid4().hex, started, dt.datetime.now(dt.UTC), report)
            if report.ok:  # the heads this snapshot shows are the heads just verified
                await tx.run(_MOVE_CHECKPOINTS, now=run.finished_at)
            await _record(tx, run, checkpointed=report.ok)
        return run
    except (asyncpg.SerializationError, asyncpg.UniqueViolationError, sqlite3.OperationalError):
        if run is None:
            raise
    # Another audit moved the checkpoints meanwhile (PostgreSQL): keep the report, leave the
    # checkpoints for the next run. Or the file changed under this snapshot (SQLite, whenever the
    # service writes during the audit): move them to what the snapshot held, in a write of their
    # own (else no incremental run under traffic ever moved them: each was a full one).
    moved = run.report.ok and not driver.is_postgres
    async with driver.transaction() as tx:
        if moved:
            await tx.run(
                _MOVE_CHECKPOINTS_AS_OF,
                now=run.finished_at,
                after=after or 0,
                watermark=run.report.entry_watermark,
            )
        await _record(tx, run, checkpointed=moved)
    return run


def _carry(report: AuditReport, run_id: str, full: AuditReport) -> None:
    """An incremental run verifies only what came after the checkpoints, so it cannot see that
    what a full audit found is mended: it keeps those findings (and, not clean, leaves the
    checkpoints where they are) until a clean full audit. Else the next periodic run, clean,
    answered LATEST_REPORT and reset the findings gauge within minutes of a full audit's page."""
    report.carried_from = run_id
    for name in ("mismatches", "bad_transactions", "broken_chains", "held_mismatches", "negative"):
        setattr(report, name, {**getattr(full, name), **getattr(report, name)})
    report.total = report.total or full.total


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark (VmHWM: of this program alone; getrusage's
    maxrss would also count the process it was forked from)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lowest_priority(pid: int = 0) -> None:
    """Run `pid` (0: this process) only when a CPU would otherwise idle (SCHED_IDLE: a serving
    process that wakes up takes the CPU at once), or failing that at the lowest nice level; this
    process also in a scheduling group of its own (`_own_scheduling_group`)."""
    if pid == 0:
        _own_scheduling_group()
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, pid, 19)


def _own_scheduling_group() -> None:
    """Linux shares CPU time between sessions first (autogroups), then between the processes of a
    session: a job in its starter's session (the serving process's, a load generator's) was
    charged to that session whatever its own priority, and delayed its calls (serving p99 10 ->
    30-60 ms beside two SCHED_IDLE burners in the client's session; at the baseline in a session
    of their own at the lowest weight). So the job leaves for a session of its own, weighted
    nice 19, and dies with its starter (a signal to the starter's process group no longer
    reaches it). Run from a shell, as its process group's leader, it cannot leave and stays."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setsid()
    except OSError:
        return
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    with contextlib.suppress(OSError):
        Path("/proc/self/autogroup").write_text("19")


def _lower_priority(row: Sequence[Any] | None) -> None:
    """The job's PostgreSQL backend runs at the lowest nice level too, when the database runs on
    this host and this user may say so (elsewhere the database's own scheduling applies). Not
    SCHED_IDLE: a backend parked while it holds one of the server's shared locks would stall the
    serving backends behind it."""
    if row is not None and int(row[0]) > 0:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, int(row[0]), 19)


async def latest_run(driver: Driver) -> AuditRun | None:
    async with driver.read() as tx:
        row = await tx.one(_LATEST_RUN)
    if row is None:
        return None
    return AuditRun(str(row[0]), when(row[1]), when(row[2]), report_from_json(str(row[3])))


def driver_for(url: str, role: str = "") -> Driver:
    """A connection of the job's own to a service database (one at a time is all it needs)."""
    sqlite_path = url.split(":///", 1)[1] if url.startswith("sqlite") else None
    return Driver(
        url,
        sqlite_path=sqlite_path,
        write_lock=asyncio.Lock(),
        tracer_provider=None,
        pool_size=1,
        server_settings={"role": role} if role and sqlite_path is None else {},
    )


def _database_url(settings: ServiceSettings) -> str:
    """The URL the service itself would use, without creating its data directory on the way
    (`resolved_database_url` does, for a service about to make its database)."""
    if settings.database_url:
        return settings.resolved_database_url()
    path = (settings.data_dir / f"{settings.service_name}.db").resolve()
    return f"sqlite+aiosqlite:///{path}"


def _shown(url: str) -> str:
    """The URL as it may be printed: its password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing to hide in what it is
        return url


def _sqlite_file(url: str) -> Path | None:
    return Path(url.split(":///", 1)[1]) if url.startswith("sqlite") else None


def _missing_database(url: str, settings: ServiceSettings | None) -> str | None:
    """Why the audit will not open `url`: a SQLite file that does not exist. Connecting would
    create an empty one (and fail on its missing tables), leaving it for the next reader."""
    path = _sqlite_file(url)
    if path is None or path.exists():
        return None
    if settings is None:
        return f"there is no database at {_shown(url)}"
    prefix = settings.env_prefix
    return (
        f"there is no database at {_shown(url)}: set {prefix}DATABASE_URL to the "
        f"{settings.service_name}'s database, or for its SQLite file COINS_DATA_DIR (or "
        f"{prefix}DATA_DIR) to its data directory (now {settings.data_dir}/), as the service has "
        "them"
    )


def _explain(error: BaseException, url: str, settings: ServiceSettings | None) -> str:
    """Why the audit could not run, naming the database it opened (never its password)."""
    for cause in causes(error):
        if isinstance(cause, asyncpg.UndefinedTableError) or (
            isinstance(cause, sqlite3.OperationalError) and "no such table" in str(cause)
        ):
            service = settings.service_name if settings is not None else "SERVICE"
            return (
                f"the database at {_shown(url)} has not been migrated ({cause}): start the "
                f"{service} service on it once (it migrates on start) or run `python -m "
                f"tools.migrate {service}` with the same settings; or is it not the {service}'s?"
            )
    if settings is not None:  # loaded: a known start-up problem (no such database, ...) in a line
        from runtime import startup

        known = startup.explain(error, settings.service_name, settings)
        if known is not None:
            return known
    return f"{type(error).__name__}: {error} (database: {_shown(url)})"


async def _main(
    url: str, role: str, anchor_dir: Path | None, incremental: bool, duty_cycle: float
) -> AuditRun:
    driver = driver_for(url, role)
    try:
        anchors = AnchorStore(anchor_dir) if anchor_dir is not None else None
        return await run_audit(
            driver, incremental=incremental, anchors=anchors, duty_cycle=duty_cycle
        )
    finally:
        await driver.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ledger.auditor", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("service", nargs="?", choices=sorted(SERVICES))
    parser.add_argument(
        "--incremental", action="store_true", help="only what was appended since the last clean run"
    )
    parser.add_argument(
        "--duty-cycle",
        type=float,
        default=1.0,
        help="the share of the time the job may be busy, resting after each page (default 1: "
        f"flat out; a job a service starts uses {DUTY_CYCLE})",
    )
    parser.add_argument(
        "--job-from-env",
        action="store_true",
        help=f"read {{database_url, database_role, anchor_dir, incremental}} as JSON from "
        f"${JOB_VARIABLE} (how a service starts it); print the run as JSON",
    )
    args = parser.parse_args(argv)
    lowest_priority()  # the serving processes on this host come first
    settings: ServiceSettings | None = None
    if args.job_from_env:
        job = json.loads(os.environ[JOB_VARIABLE])
        url, role = job["database_url"], job.get("database_role", "")
        anchor_dir = Path(job["anchor_dir"]) if job.get("anchor_dir") else None
        incremental = bool(job.get("incremental"))
        duty_cycle = float(job.get("duty_cycle", DUTY_CYCLE))
    else:
        if args.service is None:
            parser.error("name the service whose ledger to audit")
        from runtime import startup

        module, name = SERVICES[args.service].split(":")
        loaded = startup.settings_or_exit(  # a refused setting: could not run
            getattr(importlib.import_module(module), name), args.service, code=2
        )
        url, role = _database_url(loaded), loaded.database_role
        anchor_dir, incremental = loaded.anchor_dir(), args.incremental
        settings = loaded
        duty_cycle = args.duty_cycle
    missing = _missing_database(url, settings)
    if missing is not None:
        print(f"the audit could not run: {missing}", file=sys.stderr)
        return 2
    try:
        run = asyncio.run(_main(url, role, anchor_dir, incremental, duty_cycle))
    except Exception as error:  # a database gone mid-run, say: exit 2, never 1 ("findings")
        print(f"the audit could not run: {_explain(error, url, settings)}", file=sys.stderr)
        return 2
    report = run.report
    if args.job_from_env:
        print(
            json.dumps(
                {
                    "run_id": run.run_id,
                    "started_at": run.started_at.isoformat(),
                    "finished_at": run.finished_at.isoformat(),
                    "report": report_to_json(report),
                    "peak_rss_mb": peak_rss_mb(),
                }
            ),
            flush=True,  # the report is the answer: out before anything at exit can go wrong
        )
    else:
        seconds = (run.finished_at - run.started_at).total_seconds()
        verdict = "clean" if report.ok else "FINDINGS"
        print(
            f"{report.mode} audit {verdict} in {seconds:.1f} s: {report.transactions_checked} "
            f"transactions, {report.entries_checked} chain links, {report.chains_checked} chains"
        )
        if not report.ok:
            print(report_to_json(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
