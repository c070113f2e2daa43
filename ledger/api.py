"""coins.common.v1.LedgerAuditService: the ledger's audit over gRPC, for every service that keeps one.

The audit itself never runs in the serving process (see ledger.auditor): AuditLedger starts the audit
job as a child process and answers its report, or reads the newest recorded report; and every
`ledger_audit_every_seconds` the service starts an incremental run of the job.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import TypeVar

from coins.common.v1 import ledger_audit_pb2, ledger_audit_pb2_grpc
from ledger.anchors import AnchorStore
from ledger.auditor import JOB_VARIABLE, AuditRun, latest_run, report_from_json, when
from ledger.book import Ledger
from runtime.access import Access, method_rules
from runtime.clock import utc
from runtime.config import ServiceSettings
from runtime.db import Database
from runtime.errors import NotFound, Unavailable
from runtime.protos import RpcContext, timestamp
from runtime.server import Runtime

FULL_NAME = ledger_audit_pb2.DESCRIPTOR.services_by_name["LedgerAuditService"].full_name
ACCESS = method_rules(FULL_NAME, {"AuditLedger": Access.admin_only()})
log = logging.getLogger("coins.ledger.audit")

_MODES = {
    "full": ledger_audit_pb2.AUDIT_MODE_FULL,
    "incremental": ledger_audit_pb2.AUDIT_MODE_INCREMENTAL,
}


class LedgerServiceSettings(ServiceSettings):
    """What a service that keeps a ledger is told on top of every service's settings."""

    ledger_anchor_dir: Path | None = None
    """Where the chain heads are anchored, outside the database (see ledger.anchors); default
    `<data_dir>/anchors/<service>`. In production: storage the database's writers cannot write."""
    ledger_anchor_every_seconds: float = 300.0
    ledger_audit_every_seconds: float = 900.0
    """How often the service starts an incremental audit job (0: never; run `python -m
    ledger.auditor` from a scheduler instead)."""

    def anchor_dir(self) -> Path:
        return self.ledger_anchor_dir or self.data_dir / "anchors" / self.service_name


L = TypeVar("L", bound=LedgerServiceSettings)


class AuditJobs:
    """Runs the audit job as a child process, one at a time per service process."""

    def __init__(self, settings: LedgerServiceSettings) -> None:
        self._job = {
            "database_url": settings.resolved_database_url(),
            "database_role": settings.database_role,
            "anchor_dir": str(settings.anchor_dir()),
        }
        self._one_at_a_time = asyncio.Lock()

    async def run(self, *, incremental: bool) -> AuditRun:
        async with self._one_at_a_time:
            # Started by the standard library from a thread (vfork and exec), not by the event
            # loop: uvloop forks the whole serving process, gRPC's fork handlers run in the copy,
            # and under load that copy died with SIGSEGV before it ever ran the job.
            job = json.dumps({**self._job, "incremental": incremental})
            child = await asyncio.to_thread(
                subprocess.Popen,
                [
                    sys.executable,
                    "-X",
                    "faulthandler",  # a crash of the job leaves its Python stack on stderr
                    "-m",
                    "ledger.auditor",
                    "--job-from-env",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, JOB_VARIABLE: job},
            )
            try:
                out, err = await asyncio.to_thread(child.communicate)
            finally:
                if child.returncode is None:  # the caller gave up: so does the job
                    child.kill()
                    await asyncio.to_thread(child.wait)
        # The report on stdout is the answer, whatever the exit status says (under some event loops
        # a child reaped elsewhere reports 255): no report, no answer.
        try:
            body = json.loads(out)
            if child.returncode not in (0, 1):
                log.warning(
                    "the audit job exited with %s after its report: %s",
                    child.returncode,
                    err.decode(errors="replace").strip()[-2000:] or "-",
                )
        except ValueError:
            said = err.decode(errors="replace").strip()
            log.warning("the audit job exited with %s: %s", child.returncode, said[-2000:] or "-")
            reason = said.splitlines()[-1:] or [f"it exited with {child.returncode}"]
            raise Unavailable(
                "AUDIT_FAILED_TO_RUN",
                f"the audit job could not run: {reason[0]}",
                retry_after=5,
            ) from None
        return AuditRun(
            body["run_id"],
            when(body["started_at"]),
            when(body["finished_at"]),
            report_from_json(body["report"]),
        )


def _response(run: AuditRun) -> ledger_audit_pb2.AuditLedgerResponse:
    report = run.report

    def differences(
        found: dict[str, tuple[int, int]],
    ) -> list[ledger_audit_pb2.AccountDifference]:
        return [
            ledger_audit_pb2.AccountDifference(account_id=a, kept=k, recomputed=r)
            for a, (k, r) in sorted(found.items())
        ]

    return ledger_audit_pb2.AuditLedgerResponse(
        ok=report.ok,
        accounts_checked=report.accounts_checked,
        transactions_checked=report.transactions_checked,
        total=report.total,
        balance_differences=differences(report.mismatches),
        held_differences=differences(report.held_mismatches),
        negative_balances=[
            ledger_audit_pb2.AccountDifference(account_id=a, kept=b, recomputed=b)
            for a, b in sorted(report.negative.items())
        ],
        bad_transactions=[
            ledger_audit_pb2.Finding(id=i, problem=p)
            for i, p in sorted(report.bad_transactions.items())
        ],
        broken_chains=[
            ledger_audit_pb2.Finding(id=i, problem=p)
            for i, p in sorted(report.broken_chains.items())
        ],
        mode=_MODES.get(report.mode, ledger_audit_pb2.AUDIT_MODE_UNSPECIFIED),
        entries_checked=report.entries_checked,
        run_id=run.run_id,
        start_time=timestamp(utc(run.started_at)),
        finish_time=timestamp(utc(run.finished_at)),
        carried_from_run_id=report.carried_from,
    )


class LedgerAuditApi(ledger_audit_pb2_grpc.LedgerAuditServiceServicer):
    def __init__(self, db: Database, jobs: AuditJobs) -> None:
        self._db, self._jobs = db, jobs

    async def AuditLedger(
        self, request: ledger_audit_pb2.AuditLedgerRequest, context: RpcContext
    ) -> ledger_audit_pb2.AuditLedgerResponse:
        if request.mode == ledger_audit_pb2.AUDIT_MODE_LATEST_REPORT:
            run = await latest_run(self._db.driver)
            if run is None:
                raise NotFound("NO_AUDIT_YET", "no audit has run yet; ask for AUDIT_MODE_FULL")
            return _response(run)
        incremental = request.mode == ledger_audit_pb2.AUDIT_MODE_INCREMENTAL
        return _response(await self._jobs.run(incremental=incremental))


def first_pass_due(last: AuditRun | None, now: dt.datetime, every: dt.timedelta) -> bool:
    """Whether a replica that just took the jobs over audits at once: when the last run, any
    replica's, is a period old. Not when there is none (a new database: its first comes a period
    on) or one ran recently (a restart). Every new leader used to wait a period, so leadership
    changing more often than that put the audit off for good (a review's)."""
    return last is not None and now - last.finished_at >= every


def serve_ledger_audit(runtime: Runtime[L], ledger: Ledger) -> None:
    """Add the ledger audit to a service's server (list FULL_NAME and ACCESS in its ServiceSpec),
    anchor its chain heads outside the database every `ledger_anchor_every_seconds`, and start an
    incremental audit job every `ledger_audit_every_seconds`."""
    settings = runtime.settings
    anchors = AnchorStore(settings.anchor_dir())
    jobs = AuditJobs(settings)

    async def anchor() -> int:
        async with runtime.db.read() as conn:
            heads = await ledger.chain_heads(conn)
        anchors.write(heads, runtime.clock.now())
        return 0  # nothing to log every few minutes

    started = False
    every = dt.timedelta(seconds=settings.ledger_audit_every_seconds)

    async def audit() -> int:
        nonlocal started
        first, started = not started, True
        if first:
            last = await latest_run(runtime.db.driver)
            if not first_pass_due(last, runtime.clock.now(), every):
                return 0
        # A run that outlasts its period is stopped (the job is killed with the call) and retried.
        run = await asyncio.wait_for(
            jobs.run(incremental=True), timeout=max(settings.ledger_audit_every_seconds, 600.0)
        )
        if not run.report.ok:
            log.error(
                "the ledger audit found problems (run %s): AuditLedger with "
                "AUDIT_MODE_LATEST_REPORT shows them",
                run.run_id,
            )
        return 0

    runtime.add_periodic("anchored chain heads", settings.ledger_anchor_every_seconds, anchor)
    if settings.ledger_audit_every_seconds > 0:
        runtime.add_periodic("audited the ledger", settings.ledger_audit_every_seconds, audit)
    ledger_audit_pb2_grpc.add_LedgerAuditServiceServicer_to_server(
        LedgerAuditApi(runtime.db, jobs), runtime.server
    )
