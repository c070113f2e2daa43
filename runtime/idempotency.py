"""AIP-155 request ids: a retry returns the first result and changes nothing.

The key is claimed in the same database transaction as the effect, so a crash can never leave an effect
without its key or a key without its effect. A request's fingerprint (its bytes without the request id)
tells a retry (same parameters) from a reuse (different parameters: ALREADY_EXISTS, REQUEST_ID_REUSED).

Three shapes of operation use it:
- `once()`: the effect is one local transaction (open an account, set a price).
- `once_direct()`: the same for the hot paths, on the driver (runtime.sql). The effect runs first and the
  answered key is inserted last, in the same transaction: one statement instead of a claim and a
  completion. If the key turns out to exist (a retry, or a concurrent twin that committed first), the
  transaction rolls back and the stored answer is replayed, so the effect still happens once.
- `begin()` + `finish()`: the effect spans a call to another system (a payment provider, the wallet).
  `begin` claims the key and creates the local record in one transaction; a retry that finds the key
  claimed but unfinished gets the record's id back and resumes from the record's state.
Business errors are stored as the answer too (errors included, AIP-155); transient ones and invalid
input (INVALID_ARGUMENT, which did nothing) are not.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from google.protobuf.message import Message
from sqlalchemy import (
    Column,
    DateTime,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.auth import USER_CALLERS, principal_or_none
from runtime.clock import Clock
from runtime.db import Database
from runtime.errors import DomainError, ErrorKind, Unavailable, request_id_reused
from runtime.sql import Statement, Tx, is_conflict

if TYPE_CHECKING:  # alembic (~11 MB) is loaded only by a process that migrates
    from alembic.operations import Operations

metadata = MetaData()

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("scope", String(160), primary_key=True),
    Column("request_id", String(128), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("resource_id", String(64)),
    Column("response", LargeBinary),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


def _answer(response: Message | None, error: DomainError | None) -> dict[str, object]:
    """A claim's answer as the row stores it: the response's bytes or the refusal's JSON."""
    return {
        "response": response.SerializeToString() if response is not None else None,
        "error": error.to_json() if error is not None else None,
    }


def create_idempotency_table_v1(op: Operations) -> None:
    """Frozen DDL of the table's first version, for services' first migration."""
    op.create_table(
        "idempotency_keys",
        Column("scope", String(160), primary_key=True),
        Column("request_id", String(128), primary_key=True),
        Column("fingerprint", String(64), nullable=False),
        Column("resource_id", String(64)),
        Column("response", LargeBinary),
        Column("error", Text),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])


_KEY_COLUMNS = "scope, request_id, fingerprint, resource_id, response, error, created_at"
_INSERT_ANSWERED = Statement(
    "idempotency.insert_answered",
    f"INSERT INTO idempotency_keys ({_KEY_COLUMNS}) VALUES (:scope, :request_id, :fingerprint, "
    ":resource_id, :response, NULL, :created_at) ON CONFLICT DO NOTHING",
)
_READ_KEY = Statement(
    "idempotency.read",
    "SELECT fingerprint, resource_id, response, error FROM idempotency_keys "
    "WHERE scope = :scope AND request_id = :request_id",
)


_CLAIM_VALUES = (
    ":claim_scope, :claim_request_id, :claim_fingerprint, :claim_resource_id, NULL, NULL, "
)
_INSERT_CLAIM = Statement(
    "idempotency.claim",
    f"INSERT INTO idempotency_keys ({_KEY_COLUMNS}) VALUES ({_CLAIM_VALUES}:claim_created_at) "
    "ON CONFLICT DO NOTHING",
)
ANSWER_SQL = (
    "UPDATE idempotency_keys SET response = :answer_response, error = :answer_error "
    "WHERE scope = :answer_scope AND request_id = :answer_request_id"
)
"""Store a request id's answer; storage may fold it into the statement of the effect it answers."""
_ANSWER = Statement("idempotency.answer", ANSWER_SQL)


@dataclass(frozen=True)
class KeyClaim:
    """A request id to claim for a new resource, in the same transaction (or statement) that creates
    the resource: `begin_direct` hands it to the storage that creates it."""

    params: dict[str, object]

    @staticmethod
    def cte_template(condition_source: str) -> str:
        """PostgreSQL: a `claim` CTE that claims the key only if `condition_source` (a FROM ... WHERE
        that yields a row when the resource can be created) does, returning one row if it claimed.
        Its parameters are `params`' names."""
        return (
            f"claim AS (INSERT INTO idempotency_keys ({_KEY_COLUMNS}) SELECT "
            ":claim_scope::text, :claim_request_id::text, :claim_fingerprint::text, "
            ":claim_resource_id::text, NULL, NULL, :claim_created_at::timestamptz "
            f"{condition_source} ON CONFLICT DO NOTHING RETURNING 1 AS claimed)"
        )

    async def insert(self, tx: Tx) -> bool:
        """Claim the key on its own; False if it was claimed before."""
        return bool(await tx.run(_INSERT_CLAIM, **self.params))


@dataclass(frozen=True)
class KeyAnswer:
    """A request id's answer, to be stored with the effect it answers (`ANSWER_SQL`)."""

    params: dict[str, object]

    async def store(self, tx: Tx) -> None:
        await tx.run(_ANSWER, **self.params)


@dataclass(frozen=True)
class AnsweredKey:
    """A request id to be recorded, with its answer, by the very statement that makes its effect, and
    only if the id has no record yet: the effect's statement guards on `ABSENT` and adds `cte()`.
    The answer (`key_response`) is set by whoever builds the statement, once the effect is known."""

    params: dict[str, object]

    ABSENT = (
        "NOT EXISTS (SELECT 1 FROM idempotency_keys "
        "WHERE scope = :key_scope AND request_id = :key_request_id)"
    )

    @staticmethod
    def cte(source: str) -> str:
        """PostgreSQL: an `answered` CTE recording the key once per row of `source`."""
        return (
            f"answered AS (INSERT INTO idempotency_keys ({_KEY_COLUMNS}) SELECT :key_scope::text, "
            ":key_request_id::text, :key_fingerprint::text, NULL, :key_response::bytea, NULL, "
            f":key_created_at::timestamptz FROM {source})"
        )


T = TypeVar("T")


class _AnsweredBefore(Exception):
    """The request id already has an answer: roll the effect back and replay that answer."""


VOIDED = "voided"
"""The fingerprint of a request id voided by a reconciliation (`resolve`): whatever the request
arriving late under it says, its answer is the void, never REQUEST_ID_REUSED (which would tell its
caller the parameters differ when they do not)."""


def fingerprint(request: Message) -> str:
    """A hash of the request's parameters as it came: everything but its request_id, fields this
    release does not know included (kept as received, after the known ones: the bytes a release
    that knows them serializes, as new fields are numbered last). What a claim stores."""
    return _hash_without_request_id(request, known_only=False)


def fingerprints(request: Message) -> tuple[str, ...]:
    """Every fingerprint a record of this same request may carry: as it came (stored by a release
    that knew the fields this one does not, or by this one), and without the fields this release
    does not know (stored when the first attempt came without them: a retry that a newer client
    or relay sends with a field this release ignores is the same request; review r21). Both, so
    a retry crossing releases in a rolling update matches either way (review r23)."""
    as_received = fingerprint(request)
    known = _hash_without_request_id(request, known_only=True)
    return (as_received,) if known == as_received else (as_received, known)


def _hash_without_request_id(request: Message, *, known_only: bool) -> str:
    copy = type(request)()
    copy.CopyFrom(request)
    if "request_id" in copy.DESCRIPTOR.fields_by_name:
        copy.ClearField("request_id")  # type: ignore[arg-type]
    if known_only:
        copy.DiscardUnknownFields()
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


R = TypeVar("R", bound=Message)


EDGE_NAMESPACE = "gateway"
"""Where the request ids of users' own requests are kept, whichever edge carries them."""


def caller_scope(scope: str) -> str:
    """Request ids are the calling service's: two services' ids never collide, even when equal.
    A user's (or an admin's) own requests are one caller's, whichever edge carries them (the
    gateway, the admin console): a retry through the other is the same request, answered, never
    applied again (review R7: a purchase retried through the admin console charged twice).
    (Scopes name the user where a user is concerned; work a service does on its own has no caller.)"""
    principal = principal_or_none()
    if principal is None:
        return scope
    caller = EDGE_NAMESPACE if principal.service in USER_CALLERS else principal.service
    return f"{caller}|{scope}"


def acting_scope(rpc: str) -> str:
    """The scope of an RPC whose request names a record but no user (an admin's review of a
    withdrawal, a service's delivery report): the user the call acts for (none for a service's own
    call), never the record. Keyed by the record, one request id sent for two records ran twice;
    keyed by the actor, the second is REQUEST_ID_REUSED (its fingerprint names the other record).
    A user's record (a LIVE, a promotion) is scoped by its owner instead, as the owner's calls are."""
    principal = principal_or_none()
    actor = principal.user_id if principal is not None else None
    return f"{rpc}:{actor or ''}"


def _request_id(request: Message) -> str:
    value = getattr(request, "request_id", None)
    if not isinstance(value, str):
        raise TypeError(f"{type(request).__name__} has no request_id")
    return value


@dataclass(frozen=True)
class Claim:
    """What claiming a request id found."""

    is_new: bool
    resource_id: str | None = None
    response: bytes | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.response is not None or self.error is not None

    def replay(self, response_type: type[R]) -> R:
        """The stored answer: the first response, or the first error raised again."""
        if self.error is not None:
            raise DomainError.from_json(self.error)
        assert self.response is not None
        return response_type.FromString(self.response)


class Idempotency:
    """Claims and completes request ids in a service's database."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def claim(
        self,
        conn: AsyncConnection,
        scope: str,
        request: Message,
        resource_id: str | None = None,
    ) -> Claim:
        scope = caller_scope(scope)
        request_id: str = _request_id(request)
        print_ = fingerprint(request)
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        inserted = await conn.execute(
            dialect.insert(idempotency_keys)
            .values(
                scope=scope,
                request_id=request_id,
                fingerprint=print_,
                resource_id=resource_id,
                created_at=self._clock.now(),
            )
            .on_conflict_do_nothing()
        )
        if inserted.rowcount == 1:
            return Claim(is_new=True, resource_id=resource_id)
        row = (
            await conn.execute(
                select(idempotency_keys).where(
                    idempotency_keys.c.scope == scope, idempotency_keys.c.request_id == request_id
                )
            )
        ).one()
        if row.fingerprint not in (*fingerprints(request), VOIDED):
            raise request_id_reused(request_id)
        return Claim(
            is_new=False, resource_id=row.resource_id, response=row.response, error=row.error
        )

    async def complete(
        self,
        conn: AsyncConnection,
        scope: str,
        request: Message,
        *,
        response: Message | None = None,
        error: DomainError | None = None,
    ) -> None:
        scope = caller_scope(scope)
        await conn.execute(
            update(idempotency_keys)
            .where(
                idempotency_keys.c.scope == scope,
                idempotency_keys.c.request_id == _request_id(request),
            )
            .values(_answer(response, error))
        )

    async def outcome(
        self, scope: str, request: Message, void: DomainError
    ) -> tuple[bytes | None, str]:
        """`resolve` in a transaction of its own, for a caller reconciling a lost answer: (the stored
        answer, "") if the request took effect; (None, the refusal's reason) if it was refused or is
        voided now (`void`'s reason). UNAVAILABLE while the request is still in progress."""
        async with self._db.transaction() as conn:
            claim = await self.resolve(conn, scope, request, void)
        if claim.response is not None:
            return claim.response, ""
        if claim.error is None:
            raise Unavailable(
                "REQUEST_IN_PROGRESS", "the request is still in progress; resolve it again shortly"
            )
        return None, DomainError.from_json(claim.error).reason

    async def resolve(
        self, conn: AsyncConnection, scope: str, request: Message, void: DomainError
    ) -> Claim:
        """What became of the request id `request` carries in `scope`: its stored answer if it was
        claimed (whatever its parameters), else it is claimed now with `void` as its answer, so that
        the request, should it still arrive, is refused and never takes effect. `is_new` means voided
        now. Used to reconcile a call whose caller lost its answer."""
        scoped, request_id = caller_scope(scope), _request_id(request)
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        inserted = await conn.execute(
            dialect.insert(idempotency_keys)
            .values(
                scope=scoped,
                request_id=request_id,
                fingerprint=VOIDED,
                error=void.to_json(),
                created_at=self._clock.now(),
            )
            .on_conflict_do_nothing()
        )
        if inserted.rowcount == 1:
            return Claim(is_new=True, error=void.to_json())
        row = (
            await conn.execute(
                select(idempotency_keys).where(
                    idempotency_keys.c.scope == scoped, idempotency_keys.c.request_id == request_id
                )
            )
        ).one()
        return Claim(
            is_new=False, resource_id=row.resource_id, response=row.response, error=row.error
        )

    async def answered_another(
        self, conn: AsyncConnection, scope: str, resource_id: str, request: Message
    ) -> bool:
        """Whether a request other than `request` in `scope` acted on `resource_id` and answered
        success: of concurrent requests (different ids) doing one thing once, the one that did it."""
        found = await conn.scalar(
            select(idempotency_keys.c.request_id)
            .where(
                idempotency_keys.c.scope == caller_scope(scope),
                idempotency_keys.c.resource_id == resource_id,
                idempotency_keys.c.request_id != _request_id(request),
                idempotency_keys.c.response.is_not(None),
            )
            .limit(1)
        )
        return found is not None

    async def answer_stored(
        self,
        conn: AsyncConnection,
        stored_scope: str,
        request_id: str,
        *,
        response: Message | None = None,
        error: DomainError | None = None,
    ) -> bool:
        """Answer one open claim by its stored scope (a reconciler's, which has no caller to derive
        it from); False if it was answered meanwhile (the request's own retry finished first)."""
        done = await conn.execute(
            update(idempotency_keys)
            .where(
                idempotency_keys.c.scope == stored_scope,
                idempotency_keys.c.request_id == request_id,
                idempotency_keys.c.response.is_(None),
                idempotency_keys.c.error.is_(None),
            )
            .values(_answer(response, error))
        )
        return done.rowcount == 1

    async def complete_resource(
        self,
        conn: AsyncConnection,
        resource_id: str,
        *,
        response: Message | None = None,
        error: DomainError | None = None,
    ) -> None:
        """Answer the open request that created `resource_id` (whoever finishes the operation: the
        request's own retry, or a background reconciler after a crash)."""
        await conn.execute(
            update(idempotency_keys)
            .where(
                idempotency_keys.c.resource_id == resource_id,
                idempotency_keys.c.response.is_(None),
                idempotency_keys.c.error.is_(None),
            )
            .values(_answer(response, error))
        )

    async def purge(self, older_than: dt.timedelta, *, limit: int = 5_000) -> int:
        """Forget answered request ids older than `older_than` (at most `limit` at a time); ids still
        in progress are kept, so an unfinished operation can always be resumed. One statement per
        batch: deleting id by id forgot about 1,600 ids a second on PostgreSQL, slower than a busy
        service makes them."""
        cutoff = self._clock.now() - older_than
        old = (
            select(idempotency_keys.c.scope, idempotency_keys.c.request_id)
            .where(
                idempotency_keys.c.created_at < cutoff,
                (idempotency_keys.c.response.is_not(None))
                | (idempotency_keys.c.error.is_not(None)),
            )
            .limit(limit)
        )
        key = tuple_(idempotency_keys.c.scope, idempotency_keys.c.request_id)
        async with self._db.transaction() as conn:
            forgotten = await conn.execute(delete(idempotency_keys).where(key.in_(old)))
        return int(forgotten.rowcount)

    async def record_error(self, scope: str, request: Message, error: DomainError) -> Claim | None:
        """Store a business error as the request's answer, unless the request already has one:
        then that answer, which the refused attempt gives too. The refusal is written after its
        effect's transaction rolled back, and in between a resolver may void the request id (the
        caller was told INSUFFICIENT_FUNDS while ResolveDebit said "never received" and the retry
        DEBIT_VOIDED, review r8): whatever got there first is everyone's answer. Invalid input
        (INVALID_ARGUMENT) is not stored: it did nothing, and the request id stays free for the
        corrected request, as it does for what the proto rules refuse before any handler runs
        (one behaviour for bad input: a review found some used the id up, others not); unless an
        attempt claimed the id already (a saga's record exists), whose claim it then answers."""
        if error.retryable:
            return None
        if error.kind is ErrorKind.INVALID_ARGUMENT:
            claimed = await self._stored(
                caller_scope(scope), _request_id(request), fingerprints(request)
            )
            if claimed is None:
                return None
            if claimed.finished:
                return claimed
        async with self._db.transaction() as conn:
            claim = await self.claim(conn, scope, request)
            if not claim.finished:
                await self.complete(conn, scope, request, error=error)
                return None
        return claim

    async def once(
        self,
        scope: str,
        request: Message,
        response_type: type[R],
        effect: Callable[[AsyncConnection], Awaitable[R]],
    ) -> R:
        """Run a one-transaction effect at most once per request id, and answer retries from the store."""
        try:
            async with self._db.transaction() as conn:
                claim = await self.claim(conn, scope, request)
                if not claim.is_new:
                    return claim.replay(response_type)
                response = await effect(conn)
                await self.complete(conn, scope, request, response=response)
                return response
        except DomainError as error:
            if error.reason != "REQUEST_ID_REUSED" and (
                earlier := await self.record_error(scope, request, error)
            ):
                return earlier.replay(response_type)
            raise

    async def once_direct(
        self,
        scope: str,
        request: Message,
        response_type: type[R],
        effect: Callable[[Tx], Awaitable[R]],
        at_once: Callable[[AnsweredKey], Awaitable[R | None]] | None = None,
        on_record: Callable[[], Awaitable[R | None]] | None = None,
    ) -> R:
        """`once()` on the hot path: the effect on the driver, the key written with the answer.

        `at_once`, if given, first tries the effect and the key as one optimistic statement (see
        `Ledger.post_at_once`): it answers, or writes nothing and returns None, and then the
        transactional path runs and decides (a replay, a refusal, a race lost).

        `on_record`, if given, answers from the effect's own record (the ledger's transaction,
        unique by request id and kept for good) a retry whose effect collides with it after its
        key was purged (`<SVC>_IDEMPOTENCY_RETENTION_HOURS`): without it such a retry collides
        for ever (INTERNAL). It refuses REQUEST_ID_REUSED if the record is not this request's."""
        scoped, request_id = caller_scope(scope), _request_id(request)
        print_ = fingerprint(request)
        if at_once is not None:
            try:
                answered = await at_once(
                    AnsweredKey(
                        {
                            "key_scope": scoped,
                            "key_request_id": request_id,
                            "key_fingerprint": print_,
                            "key_created_at": self._clock.now(),
                        }
                    )
                )
            except Exception as error:
                if not is_conflict(error):
                    raise
                answered = None  # the transactional path sorts it out
            if answered is not None:
                return answered
        try:
            async with self._db.driver.transaction() as tx:
                response = await effect(tx)
                inserted = await tx.run(
                    _INSERT_ANSWERED,
                    scope=scoped,
                    request_id=request_id,
                    fingerprint=print_,
                    resource_id=None,
                    response=response.SerializeToString(),
                    created_at=self._clock.now(),
                )
                if inserted:
                    return response
                raise _AnsweredBefore
        except _AnsweredBefore:
            pass
        except DomainError as error:
            # A refusal now may be a retry of a request that succeeded then: that answer wins.
            if (
                error.reason == "REQUEST_ID_REUSED"
                or await self._stored(scoped, request_id, fingerprints(request)) is None
            ):
                if error.reason != "REQUEST_ID_REUSED" and (
                    earlier := await self.record_error(scope, request, error)
                ):
                    return earlier.replay(response_type)
                raise
        except Exception as error:
            # A retry's effect can collide with its first run's rows (the ledger's unique request id)
            # before reaching the key: if the key has an answer, this was a retry; replay it. Its
            # key purged, the effect's own record answers.
            if await self._stored(scoped, request_id, fingerprints(request)) is None:
                kept = None if on_record is None or not is_conflict(error) else await on_record()
                if kept is None:
                    raise
                return kept
        claim = await self._stored(scoped, request_id, fingerprints(request))
        if claim is None or not claim.finished:
            raise Unavailable(
                "REQUEST_IN_PROGRESS", "the request is still in progress; retry it shortly"
            )
        return claim.replay(response_type)

    async def begin_direct(
        self,
        scope: str,
        request: Message,
        resource_id: str,
        start: Callable[[Tx, KeyClaim], Awaitable[T | None]],
        refusal: Callable[[Tx], Awaitable[DomainError]],
    ) -> tuple[Claim, T | None]:
        """`begin()` on the hot path: `start` claims the request id for `resource_id` (`KeyClaim`) and
        creates the resource in one unit of work (one statement on PostgreSQL), or returns None when
        it did neither: then the id was claimed before, or the resource cannot be made, and `refusal`
        says why (its error becomes the request's answer). Returns the claim and what `start` made;
        None when an earlier attempt made it (resume from `claim.resource_id`) or answered already
        (`claim.finished`)."""
        scoped, request_id = caller_scope(scope), _request_id(request)
        print_ = fingerprint(request)
        claim_key = KeyClaim(
            {
                "claim_scope": scoped,
                "claim_request_id": request_id,
                "claim_fingerprint": print_,
                "claim_resource_id": resource_id,
                "claim_created_at": self._clock.now(),
            }
        )
        try:
            async with self._db.driver.transaction(single_statement=True) as tx:
                made = await start(tx, claim_key)
            if made is not None:
                return Claim(is_new=True, resource_id=resource_id), made
            claim = await self._stored(scoped, request_id, fingerprints(request))
            if claim is None:
                async with self._db.driver.read() as tx:
                    raise await refusal(tx)
        except DomainError as error:
            if error.reason != "REQUEST_ID_REUSED" and (
                earlier := await self.record_error(scope, request, error)
            ):
                return earlier, None
            raise
        if claim.resource_id is None and not claim.finished:
            raise Unavailable(
                "REQUEST_IN_PROGRESS", "the request is still in progress; retry it shortly"
            )
        return claim, None

    def answer(
        self,
        scope: str,
        request: Message,
        *,
        response: Message | None = None,
        error: DomainError | None = None,
    ) -> KeyAnswer:
        """The answer of a request begun with `begin_direct`, for storage to write with its effect."""
        return KeyAnswer(
            {
                "answer_scope": caller_scope(scope),
                "answer_request_id": _request_id(request),
                "answer_response": response.SerializeToString() if response is not None else None,
                "answer_error": error.to_json() if error is not None else None,
            }
        )

    async def is_recorded(self, scope: str, request: Message) -> bool:
        """Whether the request id `request` carries has a record in `scope`, whatever its
        parameters (answered, in progress or voided); False if it never had one or it was purged."""
        async with self._db.driver.read() as tx:
            row = await tx.one(
                _READ_KEY, scope=caller_scope(scope), request_id=_request_id(request)
            )
        return row is not None

    async def twin_answer(self, scope: str, request: Message) -> Claim | None:
        """The answer stored by an attempt with the same request id that finished the request
        first (None if it has none): what an attempt that lost that race answers, so that every
        duplicate of a request gets the first answer, concurrent or not; and what a repeat answers
        before checks that need an outside call, which a transaction cannot hold."""
        claim = await self._stored(caller_scope(scope), _request_id(request), fingerprints(request))
        return claim if claim is not None and claim.finished else None

    async def _stored(self, scope: str, request_id: str, prints: tuple[str, ...]) -> Claim | None:
        """The request id's record, if it has one; REQUEST_ID_REUSED if its parameters differ
        (its fingerprint none of `prints`, see `fingerprints`)."""
        async with self._db.driver.read() as tx:
            row = await tx.one(_READ_KEY, scope=scope, request_id=request_id)
        if row is None:
            return None
        stored_print, resource_id, response, error = row
        if stored_print not in (*prints, VOIDED):
            raise request_id_reused(request_id)
        return Claim(
            is_new=False,
            resource_id=resource_id,
            response=bytes(response) if response is not None else None,
            error=error,
        )

    async def begin(
        self,
        scope: str,
        request: Message,
        start: Callable[[AsyncConnection], Awaitable[str]],
    ) -> Claim:
        """Claim the request id and create the operation's record (`start` returns its id).

        Returns the claim: `finished` means answer with `replay()`; otherwise resume the operation
        whose id is `resource_id` (new, or left unfinished by an earlier attempt).
        """
        try:
            async with self._db.transaction() as conn:
                claim = await self.claim(conn, scope, request)
                if not claim.is_new:
                    if claim.resource_id is None and not claim.finished:
                        raise AssertionError(
                            f"claim {scope}/{request} has neither record nor answer"
                        )
                    return claim
                resource_id = await start(conn)
                await conn.execute(
                    update(idempotency_keys)
                    .where(
                        idempotency_keys.c.scope == caller_scope(scope),
                        idempotency_keys.c.request_id == _request_id(request),
                    )
                    .values(resource_id=resource_id)
                )
                return Claim(is_new=True, resource_id=resource_id)
        except DomainError as error:
            if error.reason != "REQUEST_ID_REUSED" and (
                earlier := await self.record_error(scope, request, error)
            ):
                return earlier
            raise
