"""Domain errors: what went wrong, in words a caller can act on, with a machine-readable reason.

Domain code raises these and never touches gRPC; `runtime.status` turns them into a canonical status code
with one google.rpc.ErrorInfo (and a google.rpc.BadRequest for field violations) in one place.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass


class ErrorKind(enum.Enum):
    """The canonical error codes the domain uses (a subset of google.rpc.Code)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    ABORTED = "ABORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: its path (`coins`, `birth_date.year`), what is wrong with it,
    and that as a stable UPPER_SNAKE_CASE reason (a validation rule's id, `INT64_GTE_LTE`; empty:
    the error's own reason stands for it)."""

    field: str
    description: str
    reason: str = ""


class DomainError(Exception):
    """An error the caller should see as it is.

    `reason` is UPPER_SNAKE_CASE and stable (clients branch on it); `metadata` holds the facts behind it
    (the balance, the limit) as strings, as google.rpc.ErrorInfo requires.
    """

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        violations: tuple[FieldViolation, ...] = (),
        **metadata: object,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.violations = violations
        self.metadata = {key: str(value) for key, value in metadata.items()}

    @property
    def retryable(self) -> bool:
        """Transient errors are never stored as a request's final answer."""
        return self.kind in (
            ErrorKind.UNAVAILABLE,
            ErrorKind.ABORTED,
            ErrorKind.DEADLINE_EXCEEDED,
            ErrorKind.INTERNAL,
            ErrorKind.RESOURCE_EXHAUSTED,  # a rate limit: the same request may pass later
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind.value,
                "reason": self.reason,
                "message": self.message,
                "metadata": self.metadata,
                "violations": [[v.field, v.description, v.reason] for v in self.violations],
            }
        )

    @staticmethod
    def from_json(text: str) -> DomainError:
        data = json.loads(text)
        error = error_of_kind(
            ErrorKind(data["kind"]),
            data["reason"],
            data["message"],
            violations=tuple(FieldViolation(*v) for v in data["violations"]),  # 2 or 3 items
        )
        error.metadata = dict(data["metadata"])
        return error

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, {self.message!r}, {self.metadata!r})"


def enum_name(enum: str, state: str) -> str:
    """A stored state in the contract's words (`enum_name("WITHDRAWAL_STATUS", "in_review")` ->
    `WITHDRAWAL_STATUS_IN_REVIEW`): what ErrorInfo metadata carries, so a client compares it with the
    enum value names it reads everywhere else (tests check every stored state has one)."""
    return f"{enum}_{state.upper()}"


class InvalidArgument(DomainError):
    kind = ErrorKind.INVALID_ARGUMENT


class NotFound(DomainError):
    kind = ErrorKind.NOT_FOUND


class AlreadyExists(DomainError):
    kind = ErrorKind.ALREADY_EXISTS


DEBIT_VOIDED = "DEBIT_VOIDED"
"""The wallet's reason for a debit or hold request id its caller voided by reconciliation
(ResolveDebit, ResolveHold: the request never took effect and never will), and its callers' for the
operation that request was for (a gift, a promotion's budget)."""
VOIDED_BY_WALLET = (DEBIT_VOIDED, "REQUEST_ID_REUSED")
"""The wallet's answers to a debit or hold arriving after its request id was voided: DEBIT_VOIDED,
and REQUEST_ID_REUSED from a wallet that voided it before it said so (the request ids its callers
derive from their own records are never reused for anything else)."""


def request_id_reused(request_id: str, done: str = "", hold_id: str = "") -> AlreadyExists:
    """REQUEST_ID_REUSED: the request id was used before with other parameters (`done`: what it
    did then, to name in the message; `hold_id`: the hold it placed or captured from)."""
    refusal = AlreadyExists(
        "REQUEST_ID_REUSED",
        f"request_id {request_id!r} was already used with different parameters"
        f"{f' ({done})' if done else ''}; use a new request_id for a new request",
        request_id=request_id,
    )
    if hold_id:
        refusal.metadata["hold_id"] = hold_id
    return refusal


class FailedPrecondition(DomainError):
    kind = ErrorKind.FAILED_PRECONDITION


class NotYet:
    """Mixin for a refusal that holds only for now, because what the request needs is still on its
    way (a payment event about a purchase not settled yet): never stored as the request's answer, so
    the same request, redelivered, is decided again."""

    @property
    def retryable(self) -> bool:
        return True


class NotFoundYet(NotYet, NotFound):
    pass


class FailedPreconditionYet(NotYet, FailedPrecondition):
    pass


class PermissionDenied(DomainError):
    kind = ErrorKind.PERMISSION_DENIED


class Unauthenticated(DomainError):
    kind = ErrorKind.UNAUTHENTICATED


class _RetryLater(DomainError):
    """A refusal that a wait cures: carries how long to wait (google.rpc.RetryInfo) when it is known."""

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        retry_after: float | None = None,
        violations: tuple[FieldViolation, ...] = (),
        **metadata: object,
    ) -> None:
        super().__init__(reason, message, violations=violations, **metadata)
        self.retry_after = retry_after


class ResourceExhausted(_RetryLater):
    """Too much, too fast (a rate limit, an overloaded service)."""

    kind = ErrorKind.RESOURCE_EXHAUSTED


class Aborted(DomainError):
    kind = ErrorKind.ABORTED


class OutOfRange(DomainError):
    """A position past the end of what exists (a cursor beyond a feed's last event)."""

    kind = ErrorKind.OUT_OF_RANGE


class Unavailable(_RetryLater):
    """Cannot be served now (a dependency or the database is unreachable); the same request may
    pass later."""

    kind = ErrorKind.UNAVAILABLE


class DeadlineExceeded(DomainError):
    """The caller's deadline passed before the work could be done; nothing was applied."""

    kind = ErrorKind.DEADLINE_EXCEEDED


class Internal(DomainError):
    kind = ErrorKind.INTERNAL


_BY_KIND: dict[ErrorKind, type[DomainError]] = {
    cls.kind: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Aborted,
        OutOfRange,
        DeadlineExceeded,
        Unavailable,
        Internal,
    )
}


def error_of_kind(
    kind: ErrorKind,
    reason: str,
    message: str,
    *,
    violations: tuple[FieldViolation, ...] = (),
    **metadata: object,
) -> DomainError:
    """Build the DomainError subclass for `kind` (used when replaying or relaying an error)."""
    return _BY_KIND[kind](reason, message, violations=violations, **metadata)
