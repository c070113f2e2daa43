"""The one place where domain errors become gRPC statuses, and where callers read them back.

A status leaves with exactly one google.rpc.ErrorInfo (reason, domain, metadata) and, when fields were
wrong, one google.rpc.BadRequest (AIP-193). `fail` sets the status on the context, where
OpenTelemetry's aio server instrumentation records it (`set_code`, `set_details`; it does not record
`abort_with_status`), then sends it alone with `abort`.
"""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from runtime import deadlines
from runtime.errors import (
    DeadlineExceeded,
    DomainError,
    ErrorKind,
    Internal,
    ResourceExhausted,
    Unavailable,
    error_of_kind,
)
from runtime.protos import RpcContext

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


MAX_VIOLATIONS = 20
"""Field violations a status carries at most; `more_violations` in ErrorInfo counts the rest. gRPC
refuses trailers above 16 KiB (and some above 8 KiB): a review's `kinds` list of 300 bad items made a
23 KB status, which reached the caller as RESOURCE_EXHAUSTED with no reason at all."""
_MAX_MESSAGE = 600
_MAX_METADATA_VALUE = 400


def to_status(error: DomainError, domain: str) -> status_pb2.Status:
    """The google.rpc.Status for `error`, with ErrorInfo first and BadRequest when fields were wrong,
    small enough for any trailer limit: at most MAX_VIOLATIONS violations and shortened texts."""
    metadata = {
        key: _shortened(value, _MAX_METADATA_VALUE) for key, value in error.metadata.items()
    }
    violations = error.violations[:MAX_VIOLATIONS]
    if len(error.violations) > MAX_VIOLATIONS:
        metadata["more_violations"] = str(len(error.violations) - MAX_VIOLATIONS)
    # Every refusal with field violations names them in `fields` (derived here, once for all),
    # unless it names its one field already (`field`).
    if violations and not {"field", "fields"} & metadata.keys():
        fields = ", ".join(dict.fromkeys(v.field for v in violations if v.field))
        metadata["fields"] = fields
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=domain, metadata=metadata))
    details = [info]
    if violations:
        bad_request = any_pb2.Any()
        bad_request.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field,
                        description=_shortened(v.description, _MAX_METADATA_VALUE),
                        reason=v.reason or error.reason,
                    )
                    for v in violations
                ]
            )
        )
        details.append(bad_request)
    if isinstance(error, ResourceExhausted | Unavailable) and error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(max(1, round(error.retry_after * 1000)))
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    return status_pb2.Status(
        code=getattr(code_pb2, error.kind.value),
        message=_shortened(error.message, _MAX_MESSAGE),
        details=details,
    )


def _shortened(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


REASON_KEY = "coins-error-reason"
"""The ErrorInfo reason again as plain trailing metadata, for clients that cannot decode the rich
status details (`buf curl -v`, `grpcurl -v` print trailers)."""


async def fail(context: RpcContext, error: DomainError, domain: str) -> None:
    """Answer the RPC with `error` now: its status alone, no response message (grpc sends an empty
    one before a status set with `set_code`, which a client's interceptors then see as an answer).

    The status is set first, as OpenTelemetry's context wrapper records it (its `abort` takes no
    trailing metadata: `abort` sends the ones set). `abort` raises an AbortError that grpc keeps on
    the call and raises again when the handler returns; its traceback would hold this frame and
    the handler's, which hold the call: a reference cycle per refused call, freed only by the
    garbage collector (a flood of refused 500-credit batches grew payout by ~40 MB that way).
    It is let go of here, traceback and context, and the handler returns."""
    status = rpc_status.to_status(to_status(error, domain))
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata((*status.trailing_metadata, (REASON_KEY, error.reason)))
    try:
        await context.abort(status.code, status.details)
    except grpc.aio.AbortError as aborted:
        aborted.__traceback__ = None
        aborted.__context__ = None


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo a coins service attached to a failed call, if any."""
    for detail in _details(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def bad_request(error: grpc.RpcError) -> error_details_pb2.BadRequest | None:
    """The BadRequest a coins service attached to a failed call, if any."""
    for detail in _details(error).details:
        found = error_details_pb2.BadRequest()
        if detail.Unpack(found):
            return found
    return None


def retry_info(error: grpc.RpcError) -> error_details_pb2.RetryInfo | None:
    """The RetryInfo (how long to wait) a coins service attached to a failed call, if any."""
    for detail in _details(error).details:
        found = error_details_pb2.RetryInfo()
        if detail.Unpack(found):
            return found
    return None


def _details(error: grpc.RpcError) -> status_pb2.Status:
    trailers: Any = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return status_pb2.Status()


DEPENDENCY_RETRY_AFTER_SECONDS = 1.0
"""The RetryInfo a caller gets when a service this one depends on is out: a second, like the first
step of the services' own backoff; a client that honours it does not hammer a recovering service."""


def from_rpc_error(error: grpc.RpcError, *, dependency: str) -> DomainError:
    """Turn a failed call to another service into a DomainError this service can raise.

    Business errors (a reason in ErrorInfo, a definite code) pass through with their reason, so a
    caller of gifting sees INSUFFICIENT_FUNDS just as the wallet said it. Transport failures become
    UNAVAILABLE (retry later); anything else is an internal error of ours, never the dependency's details.
    """
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    info = error_info(error)
    left = deadlines.remaining()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and left is not None and left <= 0.05:
        return DeadlineExceeded(
            "DEADLINE_EXCEEDED",
            f"the caller's deadline passed while waiting for the {dependency} service; retry "
            "with the same request_id and a longer deadline",
            dependency=dependency,
        )
    # CANCELLED from the other side: it stopped (a graceful stop cancels the calls it had not
    # started) while this call is still served here. Nothing was done there; the call may be sent
    # again (it was INTERNAL DEPENDENCY_FAILED, unlogged: review r9).
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
    ):
        timed_out = code == grpc.StatusCode.DEADLINE_EXCEEDED
        what = (
            "did not answer in time"
            if timed_out
            else "stopped the call (shutting down)"
            if code == grpc.StatusCode.CANCELLED
            else "is unavailable"
        )
        return Unavailable(
            "DEPENDENCY_UNAVAILABLE",
            f"the {dependency} service {what}; retry (a call with a request_id: with the same one)",
            retry_after=DEPENDENCY_RETRY_AFTER_SECONDS,
            dependency=dependency,
        )
    passthrough = {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
    if info is not None and code in passthrough:
        message = (error.details() if hasattr(error, "details") else "") or info.reason
        if info.reason == "OVERLOADED":  # whose overload: not this service's
            message = message.replace("the service", f"the {dependency} service", 1)
        relayed = error_of_kind(ErrorKind[code.name], info.reason, message)
        relayed.metadata = dict(info.metadata)
        wait = retry_info(error)
        if isinstance(relayed, ResourceExhausted) and wait is not None:  # OVERLOADED, RATE_LIMITED
            relayed.retry_after = wait.retry_delay.ToTimedelta().total_seconds()
        if info.reason == "OVERLOADED":
            relayed.metadata.setdefault("dependency", dependency)
        return relayed
    return Internal("DEPENDENCY_FAILED", f"the {dependency} service failed", dependency=dependency)
