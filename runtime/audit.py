"""The admin audit trail: every admin call, who made it, through which service, why, and how it ended.

Append-only by construction: the code has no update or delete for it, and database triggers refuse
UPDATE and DELETE on the table (SQLite and PostgreSQL). The request guard writes a STARTED record
before an admin call runs and a second record with its outcome, so an admin action never goes
unrecorded, even if the process dies halfway.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format, text_format
from google.protobuf.message import Message
from opentelemetry import trace
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
)

from coins.common.v1 import admin_audit_pb2, admin_audit_pb2_grpc
from runtime import deadlines
from runtime.access import Access, method_rules
from runtime.auth import Principal
from runtime.clock import Clock
from runtime.db import Database
from runtime.pagination import decode_token, int64, next_page, page_size
from runtime.protos import RpcContext, timestamp

if TYPE_CHECKING:  # alembic (~11 MB) is loaded only by a process that migrates
    from alembic.operations import Operations

metadata = MetaData()

admin_audit = Table(
    "admin_audit",
    metadata,
    Column("sequence", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("actor_user_id", String(64), nullable=False),
    Column("caller_service", String(64), nullable=False),
    Column("method", String(200), nullable=False),
    Column("request_json", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("outcome", String(200), nullable=False),
    Column("trace_id", String(32), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

_FORBID = "admin_audit is append-only"


def create_admin_audit_table_v1(op: Operations) -> None:
    """Frozen DDL of the trail's first version, with the triggers that keep it append-only."""
    op.create_table(
        "admin_audit",
        Column("sequence", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
        Column("actor_user_id", String(64), nullable=False),
        Column("caller_service", String(64), nullable=False),
        Column("method", String(200), nullable=False),
        Column("request_json", Text, nullable=False),
        Column("reason", Text, nullable=False),
        Column("outcome", String(200), nullable=False),
        Column("trace_id", String(32), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    if op.get_bind().dialect.name == "sqlite":
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER admin_audit_no_{action.lower()} BEFORE {action} ON admin_audit "
                f"BEGIN SELECT RAISE(ABORT, '{_FORBID}'); END"
            )
    else:
        op.execute(
            "CREATE FUNCTION admin_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{_FORBID}'; END $$"
        )
        op.execute(
            "CREATE TRIGGER admin_audit_append_only BEFORE UPDATE OR DELETE ON admin_audit "
            "FOR EACH ROW EXECUTE FUNCTION admin_audit_append_only()"
        )


def drop_admin_audit_table_v1(op: Operations) -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.execute("DROP TRIGGER IF EXISTS admin_audit_append_only ON admin_audit")
        op.execute("DROP FUNCTION IF EXISTS admin_audit_append_only()")
    op.drop_table("admin_audit")  # SQLite drops a table's triggers with it


def _request_json(request: Message) -> str:
    """The request as JSON; a request JSON cannot express (an out-of-range timestamp) is kept as text,
    so that recording a refused admin call never fails."""
    try:
        return json_format.MessageToJson(request, indent=None)
    except (json_format.SerializeToJsonError, ValueError):
        return json.dumps({"unrenderable": text_format.MessageToString(request, as_one_line=True)})


class AdminAudit:
    def __init__(self, db: Database, clock: Clock, service: str) -> None:
        self._db, self._clock = db, clock
        self._token_kind = f"audit:{service}"
        """Every service serves this listing: its tokens name the service, so one service's token
        is refused by another's trail."""

    async def record(
        self, principal: Principal, method: str, request: Message, outcome: str
    ) -> None:
        context = trace.get_current_span().get_span_context()
        reason = (
            getattr(request, "reason", "") if "reason" in request.DESCRIPTOR.fields_by_name else ""
        )
        # A record of what happened, written even once the caller's deadline has passed.
        with deadlines.lifted():
            async with self._db.transaction() as conn:
                await conn.execute(
                    insert(admin_audit).values(
                        actor_user_id=principal.user_id or "",
                        caller_service=principal.service,
                        method=method,
                        request_json=_request_json(request),
                        reason=reason,
                        outcome=outcome,
                        trace_id=format(context.trace_id, "032x") if context.is_valid else "",
                        created_at=self._clock.now(),
                    )
                )

    async def list(self, size: int, token: str) -> tuple[list[Any], str]:
        after = decode_token(token, self._token_kind, int64)
        query = select(admin_audit).order_by(admin_audit.c.sequence.desc()).limit(size + 1)
        if after is not None:
            query = query.where(admin_audit.c.sequence < after[0])
        async with self._db.read() as conn:
            rows = list((await conn.execute(query)).all())
        return next_page(
            rows,
            size,
            self._token_kind,
            lambda row: (row.sequence,),
            weigh=lambda row: len(row.request_json.encode()) + len(row.reason.encode()) + 300,
        )


class AdminAuditApi(admin_audit_pb2_grpc.AdminAuditServiceServicer):
    """coins.common.v1.AdminAuditService, served by every service on the same port as its own API."""

    FULL_NAME = admin_audit_pb2.DESCRIPTOR.services_by_name["AdminAuditService"].full_name
    ACCESS = method_rules(FULL_NAME, {"ListAdminActions": Access.admin_only(audited=False)})

    def __init__(self, audit: AdminAudit) -> None:
        self._audit = audit

    async def ListAdminActions(
        self, request: admin_audit_pb2.ListAdminActionsRequest, context: RpcContext
    ) -> admin_audit_pb2.ListAdminActionsResponse:
        rows, token = await self._audit.list(
            page_size(request.page_size, 50, 500), request.page_token
        )
        return admin_audit_pb2.ListAdminActionsResponse(
            actions=[
                admin_audit_pb2.AdminAction(
                    sequence=row.sequence,
                    actor_user_id=row.actor_user_id,
                    caller_service=row.caller_service,
                    method=row.method,
                    request_json=row.request_json,
                    reason=row.reason,
                    outcome=row.outcome,
                    create_time=timestamp(row.created_at),
                    trace_id=row.trace_id,
                )
                for row in rows
            ],
            next_page_token=token,
        )
