"""coins.common.v1.LedgerAuditService: the ledger's audit over gRPC, for every service that keeps one."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from coins.common.v1 import ledger_audit_pb2, ledger_audit_pb2_grpc
from ledger.anchors import AnchorStore
from ledger.book import Ledger
from runtime.access import Access, method_rules
from runtime.config import ServiceSettings
from runtime.db import Database
from runtime.protos import RpcContext
from runtime.server import Runtime

FULL_NAME = ledger_audit_pb2.DESCRIPTOR.services_by_name["LedgerAuditService"].full_name
ACCESS = method_rules(FULL_NAME, {"AuditLedger": Access.admin_only()})


class LedgerServiceSettings(ServiceSettings):
    """What a service that keeps a ledger is told on top of every service's settings."""

    ledger_anchor_dir: Path | None = None
    """Where the chain heads are anchored, outside the database (see ledger.anchors); default
    `<data_dir>/anchors/<service>`. In production: storage the database's writers cannot write."""
    ledger_anchor_every_seconds: float = 300.0

    def anchor_dir(self) -> Path:
        return self.ledger_anchor_dir or self.data_dir / "anchors" / self.service_name


L = TypeVar("L", bound=LedgerServiceSettings)


class LedgerAuditApi(ledger_audit_pb2_grpc.LedgerAuditServiceServicer):
    def __init__(self, db: Database, ledger: Ledger, anchors: AnchorStore) -> None:
        self._db, self._ledger, self._anchors = db, ledger, anchors

    async def AuditLedger(
        self, request: ledger_audit_pb2.AuditLedgerRequest, context: RpcContext
    ) -> ledger_audit_pb2.AuditLedgerResponse:
        async with self._db.snapshot() as conn:  # balances and entries of one moment
            report = await self._ledger.audit(conn, self._anchors.latest())

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
        )


def serve_ledger_audit(runtime: Runtime[L], ledger: Ledger) -> None:
    """Add the ledger audit to a service's server (list FULL_NAME and ACCESS in its ServiceSpec),
    and anchor its chain heads outside the database every `ledger_anchor_every_seconds`."""
    anchors = AnchorStore(runtime.settings.anchor_dir())

    async def anchor() -> int:
        async with runtime.db.read() as conn:
            heads = await ledger.chain_heads(conn)
        anchors.write(heads, runtime.clock.now())
        return 0  # nothing to log every few minutes

    runtime.add_periodic(
        "anchored chain heads", runtime.settings.ledger_anchor_every_seconds, anchor
    )
    ledger_audit_pb2_grpc.add_LedgerAuditServiceServicer_to_server(
        LedgerAuditApi(runtime.db, ledger, anchors), runtime.server
    )
