"""The request guard every RPC passes through: authenticate, authorize, validate, limit, run.

A grpc.aio server interceptor cannot see the request, so this one returns a wrapped method handler
(the documented way to see requests in Python). Order of work for each call:
1. the caller: the service named by the verified client certificate, and the user of the bearer token
   (UNAUTHENTICATED when the token is missing, expired, forged or for another audience);
2. the method's access rule: a method without one is denied; the calling service must be allowed,
   the admin role present where needed (PERMISSION_DENIED);
3. the request against its protovalidate rules (INVALID_ARGUMENT + BadRequest);
4. the account the request names must be the token's user (PERMISSION_DENIED);
5. rate limits on the methods that move money (RESOURCE_EXHAUSTED + RetryInfo);
6. the handler, with admin calls written to the audit trail before and after;
7. a DomainError leaves as its status with ErrorInfo; a failed downstream call becomes UNAVAILABLE or
   its business error; any other exception becomes INTERNAL with an opaque incident id that is in the
   log and the trace, and nothing else (no stack trace, no SQL) reaches the caller.
Server-streaming calls (a live feed) pass the same checks before their first message; they are not
counted by the load shedder (they are long-lived and mostly idle).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeAlias, TypeVar, cast

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from opentelemetry import baggage, trace

from runtime import deadlines, health, reflection, shedding
from runtime.access import Access
from runtime.audit import AdminAudit
from runtime.auth import Principal, TokenVerifier, bearer_token, peer_service, set_principal
from runtime.errors import (
    DomainError,
    ErrorKind,
    Internal,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from runtime.metrics import ServiceMetrics
from runtime.outages import connection_dropped, log_failure, outage_cause, outage_of
from runtime.protos import RpcContext
from runtime.ratelimit import RateLimiter
from runtime.shedding import LoadShedder
from runtime.status import fail, from_rpc_error
from runtime.telemetry import BACKGROUND, without_row_values
from runtime.validation import RequestValidator

log = logging.getLogger("coins.rpc")

READ_METHOD_PREFIXES = ("Get", "List")
T = TypeVar("T")
_UNFINISHED: set[asyncio.Task[Any]] = set()
"""Unary calls whose caller went away before they finished, kept until they do."""


async def uninterrupted(work: Awaitable[T]) -> T:
    """Run a unary call's work in a task of its own that the caller's deadline or cancellation does
    not interrupt: grpc answers the caller at once (DEADLINE_EXCEEDED, CANCELLED) while the work goes
    on to its next safe point (`deadlines.check`) and commits or rolls back whole. A cancellation
    landing inside a database statement could otherwise leave a transaction open: SQLAlchemy then
    invalidates the aiosqlite connection, and a race in its close can leave the file's write lock
    held until the garbage collector frees the connection (a review saw a wallet and a promotion
    refuse every write for minutes)."""
    task = asyncio.ensure_future(work)
    _UNFINISHED.add(task)
    task.add_done_callback(_finished)
    return await asyncio.shield(task)


async def finish_unfinished(patience: float) -> None:
    """At shutdown, before the database closes: let the work of calls whose callers went away
    finish (at most `patience` seconds)."""
    if _UNFINISHED:
        await asyncio.wait(set(_UNFINISHED), timeout=patience)


def _finished(task: asyncio.Task[Any]) -> None:
    _UNFINISHED.discard(task)
    if not task.cancelled():
        task.exception()  # seen: a caller that went away has no one else to give it to


OPEN_STREAMS = frozenset({health.WATCH, *reflection.INFO_METHODS})
"""Streaming methods served to any caller with a platform certificate: health and reflection."""

Behavior = Callable[[Any, RpcContext], Awaitable[Any]]
StreamBehavior = Callable[[Any, RpcContext], AsyncIterator[Any]]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


Replay = Callable[[Any], Awaitable[Any | None]]
"""The stored answer of a request (None if it has none): see runtime.server.Runtime.replay_stored."""


def _parse(parse: Callable[[bytes], Any] | None, raw: Any, max_bytes: int | None) -> Any:
    if parse is None:
        return raw
    if max_bytes is not None and len(raw) > max_bytes:
        # gRPC's core refuses only what is larger still (runtime.server: a multiple of this), and
        # without an ErrorInfo; up to there the caller learns the limit and that it is the size.
        raise ResourceExhausted(
            "REQUEST_TOO_LARGE",
            f"the request is {len(raw):,} bytes; a call takes at most {max_bytes:,} "
            "(send less per call: page or split it)",
            size_bytes=len(raw),
            max_bytes=max_bytes,
        )
    try:
        return parse(raw)
    except DecodeError:
        raise InvalidArgument(
            "MALFORMED_REQUEST", "the request is not a valid protobuf message of this RPC"
        ) from None


class RequestGuard(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        error_domain: str,
        *,
        access: Mapping[str, Access],
        verifier: TokenVerifier,
        limiter: RateLimiter,
        audit: AdminAudit,
        shedder: LoadShedder | None = None,
        validator: RequestValidator | None = None,
        metrics: ServiceMetrics | None = None,
        access_log: bool = False,
        max_request_bytes: int | None = None,
        replays: Mapping[str, Replay] | None = None,
    ) -> None:
        self._domain = error_domain
        self._max_request_bytes = max_request_bytes
        self._replays = replays if replays is not None else {}
        self._metrics = metrics
        self._access_log = access_log
        self._shedder = shedder
        self._access = access
        self._verifier = verifier
        self._limiter = limiter
        self._audit = audit
        self._validator = validator or RequestValidator()
        self._guarded: dict[str, Handler | None] = {}
        """The wrapped handler of each method, built on its first call (not on every call)."""
        self.closing = False
        """Set as the service stops (`drain`): calls still arriving are refused SHUTTING_DOWN."""
        self.last_arrival = 0.0
        """When the newest call reached the guard (monotonic seconds)."""

    async def drain(self, *, quiet: float = 0.1, at_most: float = 1.0) -> None:
        """Refuse what still arrives, UNAVAILABLE SHUTTING_DOWN with a RetryInfo (nothing done:
        send it again), until no call has arrived for `quiet` seconds or `at_most` passed; then the
        server may stop. Stopped at once, grpc cancelled the calls that were in its transport but
        not yet started, and their callers read CANCELLED, no retry rule's (review r9)."""
        self.closing = True
        began = time.monotonic()
        while time.monotonic() - began < at_most:
            if time.monotonic() - self.last_arrival >= quiet:
                return
            await asyncio.sleep(quiet / 2)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method = handler_call_details.method
        if method in self._guarded:
            return self._guarded[method]
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if method in OPEN_STREAMS:  # health and reflection: behind mutual TLS, like everything
            self._guarded[method] = handler
            return handler
        if handler.unary_stream is not None:
            self._guarded[method] = grpc.unary_stream_rpc_method_handler(
                self._guard_stream(
                    cast(StreamBehavior, handler.unary_stream),
                    method,
                    self._access.get(method),
                    handler.request_deserializer,
                ),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
            return self._guarded[method]
        if handler.unary_unary is None:  # client streaming: no such RPC is served
            self._guarded[method] = None
            return None
        # The request arrives as bytes and is parsed inside the guard, so that bytes that do not
        # parse get INVALID_ARGUMENT with ErrorInfo like any bad request (grpcio would say UNKNOWN).
        self._guarded[method] = grpc.unary_unary_rpc_method_handler(
            self._guard(
                cast(Behavior, handler.unary_unary),
                method,
                self._access.get(method),
                handler.request_deserializer,
            ),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )
        return self._guarded[method]

    def _principal(self, context: RpcContext) -> Principal:
        service = peer_service(context)
        if service is None:
            raise Unauthenticated(
                "CLIENT_CERTIFICATE_REQUIRED",
                "connect with a client certificate of the platform CA",
            )
        token = bearer_token(context)
        if token is None:
            return Principal(service)
        user, roles = self._verifier.verify(token)
        return Principal(service, user, roles, token)

    async def _admit(
        self, principal: Principal, rule: Access | None, method: str, request: Any
    ) -> tuple[bool, Any | None]:
        """Everything before the handler, for an authenticated caller: whether the call is audited,
        and the stored answer of a retry the rate limit refused (None: run the handler)."""
        if rule is None:
            raise PermissionDenied("RPC_NOT_ALLOWED", "this RPC is not open to any caller")
        rule.check_caller(principal)
        if rule.needs_user or rule.admin:
            principal.require_user()
        if rule.admin:
            principal.require_admin()
        self._validator.check(request)
        admin_read = rule.check_owner(principal, request)
        audited = rule.audited or admin_read
        if rule.rate_limited:
            try:
                user = None if rule.service_to_service else principal.user_id
                await self._limiter.check(method, principal.service, user)
            except ResourceExhausted as limited:
                replay = self._replays.get(method)
                if replay is None:
                    raise
                try:
                    stored = await replay(request)  # a stored refusal is raised: the answer
                except DomainError:
                    raise
                except Exception:  # the store unreachable: the limit's refusal stands
                    raise limited from None
                if stored is None:
                    raise limited from None
                return audited, stored
        return audited, None

    def _guard(
        self,
        behavior: Behavior,
        method: str,
        rule: Access | None,
        parse: Callable[[bytes], Any] | None,
    ) -> Behavior:
        # Reads (AIP's Get and List methods) have nothing to leave half done: they are answered
        # without the extra task that keeps a write's work whole past its caller's deadline.
        reads = method.rsplit("/", 1)[-1].startswith(READ_METHOD_PREFIXES)
        # A service caller's load shedder counts its wait beyond this time as its own queue.
        tell_served = rule is not None and rule.service_to_service

        async def guarded(raw: Any, context: RpcContext) -> Any:
            audited = False
            started: shedding.Admitted | None = None
            principal: Principal | None = None
            request: Any = raw
            began = time.perf_counter()
            outcome: Outcome = (_ABORTED_ELSEWHERE, "", "")
            idle = False
            self.last_arrival = time.monotonic()
            try:
                if self.closing:
                    raise _shutting_down()
                request = _parse(parse, raw, self._max_request_bytes)
                _annotate(request)
                remaining = context.time_remaining()
                deadlines.set_deadline(remaining)
                deadlines.check("the work started")
                if self._shedder is not None:
                    started = self._shedder.admit(remaining, read=reads)
                    shedding.serving(self._shedder, started)
                principal = self._principal(context)
                set_principal(principal)  # a replay's lookup is scoped by it (idempotency)
                audited, replayed = await self._admit(principal, rule, method, request)
                if audited:  # STARTED, the work and its outcome: one task (_audited)
                    audited = False  # recorded there, not again by a refusal
                    response = await uninterrupted(
                        self._audited(
                            _answer(behavior, request, context, replayed, reads),
                            principal,
                            method,
                            request,
                        )
                    )
                elif replayed is not None:
                    response = replayed
                elif reads:
                    response = await _read_once_more_on_outage(behavior, request, context)
                else:
                    response = await uninterrupted(behavior(request, context))
                idle = _annotate_answer(response)
                outcome = (0, "", "")
                if tell_served:
                    served = f"{time.perf_counter() - began:.4f}"
                    context.set_trailing_metadata(((shedding.SERVED_SECONDS, served),))
                return response
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                outcome = await self._refuse(
                    context, _as_domain_error(error, method), principal, method, request, audited
                )
                _release_frames(error)
                return None  # the status is sent (grpc raises the abort again, and drops it)
            finally:
                if started is not None:
                    assert self._shedder is not None
                    self._shedder.done(started)
                self._measured(method, outcome, time.perf_counter() - began, request, idle=idle)

        return guarded

    def _guard_stream(
        self,
        behavior: StreamBehavior,
        method: str,
        rule: Access | None,
        parse: Callable[[bytes], Any] | None,
    ) -> StreamBehavior:
        async def guarded(raw: Any, context: RpcContext) -> AsyncIterator[Any]:
            audited = False
            principal: Principal | None = None
            request: Any = raw
            began = time.perf_counter()
            outcome: Outcome = (_ABORTED_ELSEWHERE, "", "")
            self.last_arrival = time.monotonic()
            try:
                if self.closing:
                    raise _shutting_down()
                request = _parse(parse, raw, self._max_request_bytes)
                _annotate(request)
                principal = self._principal(context)
                set_principal(principal)
                audited, _ = await self._admit(principal, rule, method, request)
                if audited:
                    await self._audit.record(principal, method, request, "STARTED")
                # Closed explicitly: when the caller goes away, the handler's clean-up runs now,
                # not whenever the garbage collector gets to it.
                stream = cast(AsyncGenerator[Any, None], behavior(request, context))
                async with contextlib.aclosing(stream) as messages:
                    async for message in messages:
                        yield message
                if audited:
                    await self._record_done(principal, method, request)
                outcome = (0, "", "")
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                outcome = await self._refuse(
                    context, _as_domain_error(error, method), principal, method, request, audited
                )
                _release_frames(error)
            finally:
                self._measured(method, outcome, time.perf_counter() - began, request)

        return guarded

    async def _audited(
        self,
        work: Callable[[], Awaitable[Any]],
        principal: Principal,
        method: str,
        request: Any,
    ) -> Any:
        """An admin call's STARTED in the audit trail, its work (a write, a read, or a stored
        answer replayed), then its outcome. Run as one task, so a caller who leaves early (a
        short deadline, a cancel) leaves neither the work nor its record half done: a review
        saw two of three STARTED-only records of such calls never applied, and most with no log
        line; another, admin reads STARTED alone."""
        try:
            await self._audit.record(principal, method, request, "STARTED")
            response = await work()
        except Exception as error:
            await self._record_refusal(principal, method, request, _as_domain_error(error, method))
            raise
        await self._record_done(principal, method, request)
        return response

    async def _record_done(self, principal: Principal, method: str, request: Any) -> None:
        """The audit trail's OK for an admin call whose work has committed. If that write fails
        (the database refusing a new connection), the call still answers what it did: answered as
        a failure, and recorded as refused, the trail said an approval that paid a withdrawal was
        refused (review r5). The trail keeps the call's STARTED row and the log has the line."""
        try:
            await self._audit.record(principal, method, request, "OK")
        except Exception as failure:
            log_failure(
                log,
                failure,
                "%s by %s was done, but its OK could not be added to the audit trail (which "
                "shows it STARTED)",
                method,
                principal.actor,
            )

    async def _record_refusal(
        self, principal: Principal, method: str, request: Any, error: DomainError
    ) -> None:
        try:
            await self._audit.record(
                principal, method, request, f"{error.kind.value} {error.reason}"
            )
        except Exception as failure:
            log_failure(log, failure, "could not record the outcome of an admin call to %s", method)

    def _measured(
        self, method: str, outcome: Outcome, seconds: float, request: Any, *, idle: bool = False
    ) -> None:
        """The call's duration and status in the RPC histogram, and its access-log line (which
        says a refusal's message too: then it is the refusal's only line); none for another
        service's idle poll (`idle`: a background pass's call that listed nothing), as its span
        is not exported (a review counted ~8,600 such lines a day per gifting replica)."""
        code, reason, message = outcome
        if code == _ABORTED_ELSEWHERE:  # the handler aborted itself, or the caller went away
            code = grpc.StatusCode.CANCELLED.value[0]
        if self._metrics is not None:
            self._metrics.rpc(method, code, reason, seconds)
        if self._access_log and not idle:
            fields = {
                "method": method,
                "code": _CODE_NAMES[code],
                "reason": reason,
                "duration_ms": round(seconds * 1000, 2),
                "request_id": getattr(request, "request_id", "") or "",
            }
            if message:
                fields["message"] = message
            log.info(
                "%s %s%s %.1fms%s",
                method,
                fields["code"],
                f" {reason}" if reason else "",
                fields["duration_ms"],
                f": {message}" if message else "",
                extra={"fields": fields},
            )

    async def _refuse(
        self,
        context: RpcContext,
        error: DomainError,
        principal: Principal | None,
        method: str,
        request: Any,
        audited: bool,
    ) -> Outcome:
        """Answer the call with `error` (and log or audit it); returns its (code, reason, message
        for the access log)."""
        trace.get_current_span().set_attribute("coins.reason", error.reason)
        message = ""
        if error.kind in _ACCESS_REFUSALS:
            _log_access_refused(error, principal, method, context)
        elif error.kind not in _LOGGED_ALREADY and self._access_log:
            message = error.message[:300]  # said by the call's access line
        elif error.kind not in _LOGGED_ALREADY:
            # One line per refusal (with the call's trace id, like every log line): what a person
            # reading the terminal needs to see why a call failed.
            log.info(
                "%s refused %s %s: %s",
                method,
                error.kind.value,
                error.reason,
                error.message[:300],
            )
        if audited and principal is not None:
            await self._record_refusal(principal, method, request, error)
        await fail(context, error, self._domain)
        return _CODES[error.kind], error.reason, message


def _shutting_down() -> Unavailable:
    return Unavailable(
        "SHUTTING_DOWN",
        "this process is stopping and did not start the call: send it again (with the same "
        "request_id); another replica, or this one restarted, answers it",
        retry_after=0.5,
    )


Outcome = tuple[int, str, str]
"""How a call ended: its gRPC code, the ErrorInfo reason and a refusal's message ("" if none)."""
_CODES = {kind: grpc.StatusCode[kind.value].value[0] for kind in ErrorKind}
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_ABORTED_ELSEWHERE = -1

_SPAN_FIELDS = {
    "request_id": "coins.request_id",
    "user_id": "coins.user_id",
    "sender_id": "coins.sender_id",
    "creator_id": "coins.creator_id",
    "gift_id": "coins.gift_id",
    "live_id": "coins.live_id",
    "sent_gift_id": "coins.sent_gift_id",
    "count": "coins.count",
    "coins": "coins.coins",
    "custom_coins": "coins.coins",
    "budget_coins": "coins.budget_coins",
    "spent_coins": "coins.spent_coins",
    "amount_minor": "coins.amount_minor",
    "diamonds": "coins.diamonds",
    "package_id": "coins.package_id",
    "purchase_id": "coins.purchase_id",
    "withdrawal_id": "coins.withdrawal_id",
    "promotion_id": "coins.promotion_id",
    "hold_id": "coins.hold_id",
    "amount_coins": "coins.hold_coins",
    "captured_coins": "coins.captured_coins",
}
"""Request fields an SRE filters traces on, and the span attribute each becomes."""
_fields_of: dict[str, tuple[tuple[str, str], ...]] = {}


_RESOURCES = ("sent_gift", "purchase", "withdrawal", "promotion", "hold")
"""Answer fields holding the record a call made or read, whose ids and amounts go on its span: a
SendGift's trace is then found by the sent gift's id (a support ticket names that, not the
request id). A balance's `coins` is not an amount moved, so only these records are read."""
_answer_fields_of: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = {}
_ANSWER_IDS = ("withdrawal_id", "event_id")
"""Ids at the top of an answer that go on its span (HandleProcessorEvent's withdrawal and event)."""


def _annotate_answer(response: Any) -> bool:
    """Put the ids and amounts of the record the call answers with on the RPC's span; whether
    the call was another service's idle poll (a background pass's, baggage BACKGROUND, listing
    nothing)."""
    descriptor = getattr(response, "DESCRIPTOR", None)
    if descriptor is None:
        return False
    fields = _answer_fields_of.get(descriptor.full_name)
    if fields is None:
        fields = _answer_fields_of[descriptor.full_name] = _answer_plan(descriptor)
    span = trace.get_current_span()
    recording = span.is_recording()
    idle = False
    for path, attribute in fields:
        if path[0] == "#":  # a listing's size, 0 included (an idle poll's answer: IdlePassFilter)
            listed = len(getattr(response, path[1]))
            idle = not listed and baggage.get_baggage(BACKGROUND) == "1"
            if recording:
                span.set_attribute(attribute, listed)
            continue
        if not recording:
            continue
        value = response
        for name in path:
            value = getattr(value, name)
        if value:
            span.set_attribute(attribute, value)
    return idle


def _answer_plan(descriptor: Any) -> tuple[tuple[tuple[str, ...], str], ...]:
    """What of an answer goes on its span, as (field path, attribute), worked out once per type:
    the record's ids and amounts (`_SPAN_FIELDS`), its money as `coins.<field>_minor` and
    `coins.currency` (a withdrawal's gross, fee and net; a purchase package's price is
    `coins.amount_minor`), and those of a purchase's package; ids at the top; a listing's size."""
    plan: list[tuple[tuple[str, ...], str]] = []

    def amounts(path: tuple[str, ...], record: Any) -> None:
        inner = record.fields_by_name
        plan.extend(((*path, n), attr) for n, attr in _SPAN_FIELDS.items() if n in inner)
        for field in record.fields:
            kind = field.message_type
            if kind is None or field.is_repeated:
                continue
            if kind.full_name == _MONEY:
                minor = (
                    "coins.amount_minor" if field.name == "price" else f"coins.{field.name}_minor"
                )
                plan.append(((*path, field.name, "amount_minor"), minor))
                if not any(attribute == "coins.currency" for _, attribute in plan):
                    plan.append(((*path, field.name, "currency_code"), "coins.currency"))
            elif field.name in _RECORDS_INSIDE:
                amounts((*path, field.name), kind)

    for outer in _RESOURCES:
        field = descriptor.fields_by_name.get(outer)
        if field is not None and field.message_type is not None:
            amounts((outer,), field.message_type)
    top = descriptor.fields_by_name  # an answer naming what it acted on (a processor event's)
    plan += [((name,), f"coins.{name}") for name in _ANSWER_IDS if name in top]
    listed = [f.name for f in descriptor.fields if f.is_repeated and f.message_type]
    plan += [(("#", listed[0]), "coins.items")] if listed else []  # a listing: how many
    return tuple(plan)


_RECORDS_INSIDE = ("package",)
"""Records inside a record whose amounts are the call's: a purchase's package (its coins and
price). Not a sent gift's streak: its `count` is the streak's, not the gift's."""
_MONEY = "coins.common.v1.Money"


_LISTED_AT_MOST = 100
"""Ids a batch puts on its span: enough to find a creator's or a gift's batch, bounded in size."""
_lists_of: dict[str, tuple[tuple[str, str, str], ...]] = {}


def _list_plan(descriptor: Any) -> tuple[tuple[str, str, str], ...]:
    """A batch request's lists an SRE searches by, as (field, inner field, attribute): the
    creators of a batch's credits (`requests[].creator_id` -> coins.creator_ids), and lists of ids
    (`gift_ids` -> coins.gift_ids)."""
    plan = []
    for field in descriptor.fields:
        if not field.is_repeated:
            continue
        if field.message_type is not None:
            inner = field.message_type.fields_by_name
            plan += (
                [(field.name, "creator_id", "coins.creator_ids")] if "creator_id" in inner else []
            )
        elif field.name.endswith("_ids"):
            plan.append((field.name, "", f"coins.{field.name}"))
    return tuple(plan)


def _annotate(request: Any) -> None:
    """Put the request's ids and amounts on the RPC's span (never a token or payment data); a
    batch's size and its creators or gift ids, so a ticket about one of them finds its batch."""
    span = trace.get_current_span()
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is None or not span.is_recording():
        return
    name = descriptor.full_name
    fields = _fields_of.get(name)
    if fields is None:
        present = descriptor.fields_by_name
        fields = _fields_of[name] = tuple(
            (field, attribute) for field, attribute in _SPAN_FIELDS.items() if field in present
        )
        _lists_of[name] = _list_plan(descriptor)
    for field, attribute in fields:
        value = getattr(request, field)
        if value:
            span.set_attribute(attribute, value)
    for field, inner, attribute in _lists_of[name]:
        items = getattr(request, field)
        if not items:
            continue
        span.set_attribute("coins.items", len(items))
        ids = sorted({getattr(item, inner) for item in items}) if inner else list(items)
        span.set_attribute(attribute, ids[:_LISTED_AT_MOST])


def _answer(
    behavior: Behavior, request: Any, context: RpcContext, replayed: Any, reads: bool
) -> Callable[[], Awaitable[Any]]:
    """What answers an admin call: its stored answer (a replay), its read, or its write."""

    async def answer() -> Any:
        if replayed is not None:
            return replayed
        if reads:
            return await _read_once_more_on_outage(behavior, request, context)
        return await behavior(request, context)

    return answer


async def _read_once_more_on_outage(behavior: Behavior, request: Any, context: RpcContext) -> Any:
    """A read that met a dropped connection runs once more at once: a pooled connection the server
    dropped (a restart, pg_terminate_backend) is gone from the pool after the first failure, so the
    second attempt usually gets a fresh one. Reads change nothing, so running one twice is safe;
    a real outage fails the second attempt too and is answered UNAVAILABLE as before."""
    try:
        return await behavior(request, context)
    except Exception as error:
        if not connection_dropped(error):
            raise
        deadlines.check("the read's second attempt")
        return await behavior(request, context)


def _as_domain_error(error: Exception, method: str) -> DomainError:
    """What a handler's exception tells the caller: a domain error as it is; a failed downstream call
    as UNAVAILABLE or its business error; an outage as UNAVAILABLE (one log line, no stack trace);
    anything else as INTERNAL with an incident id (logged with its stack trace and on the span)."""
    if isinstance(error, DomainError):
        return error
    if isinstance(error, grpc.RpcError):
        return from_rpc_error(error, dependency=getattr(error, "dependency", "downstream"))
    outage = outage_of(error)
    if outage is not None:
        log.warning("%s: database unavailable (%s)", method, outage_cause(error))
        return outage
    incident = uuid.uuid4().hex
    span = trace.get_current_span()
    span.record_exception(  # without the row values PostgreSQL's DETAIL quotes
        error,
        attributes={
            "exception.message": without_row_values(str(error)),
            "exception.stacktrace": without_row_values("".join(traceback.format_exception(error))),
        },
    )
    span.set_attribute("coins.incident_id", incident)
    log.exception("incident %s in %s", incident, method)
    return Internal(
        "INTERNAL_ERROR",
        f"internal error; quote incident {incident} to the operators",
        incident_id=incident,
    )


def _release_frames(error: BaseException) -> None:
    """Let go of the frames a refused call's exceptions hold. An exception's traceback holds every
    frame it passed through, with their locals (the request, the call's context), and a frame that
    kept the exception in a local closes a cycle only the garbage collector frees: under a flood
    of refusals, thousands of calls' requests and grpc buffers would wait for it. The frames have
    returned; the guard's own (still running) is left as it is."""
    seen: set[int] = set()
    chain: list[BaseException | None] = [error]
    while chain:
        each = chain.pop()
        if each is None or id(each) in seen:
            continue
        seen.add(id(each))
        if each.__traceback__ is not None:
            traceback.clear_frames(each.__traceback__)
            each.__traceback__ = None
        chain += (each.__cause__, each.__context__)


_ACCESS_REFUSALS = (ErrorKind.PERMISSION_DENIED, ErrorKind.UNAUTHENTICATED)
_LOGGED_ALREADY = (ErrorKind.INTERNAL,)
"""Bugs are logged with their stack trace where they are turned into INTERNAL."""
security_log = logging.getLogger("coins.security")


def _log_access_refused(
    error: DomainError, principal: Principal | None, method: str, context: RpcContext
) -> None:
    """One structured line per refused attempt (another user's account, a caller not on the list, a
    bad token), so that abuse can be found: who called, for whom, what, from where; never the token."""
    fields = {
        "event": "access_refused",
        "reason": error.reason,
        "method": method,
        "caller": principal.service if principal else (peer_service(context) or "-"),
        "user": (principal.user_id if principal else None) or "-",
        "peer": context.peer() or "-",
        **{f"detail_{key}": value for key, value in error.metadata.items()},
    }
    security_log.warning(
        " ".join(f"{key}={value}" for key, value in fields.items()), extra={"security": fields}
    )
