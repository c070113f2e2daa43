"""The trust boundary, RPC by RPC: whoever may not make a call is refused, with the right code, and
nothing changes.

Every RPC the four services serve (read from the protobuf descriptors, so an RPC added later is covered
at once, and fails here until tests/security_cases.py has a sample for it) is called with its sample,
a request the right caller may make:
- without a client certificate, and with a certificate of another CA: the TLS handshake fails
  (UNAVAILABLE);
- without a token (UNAUTHENTICATED TOKEN_MISSING), with an expired one (TOKEN_EXPIRED), and with
  forged or foreign ones: another key under the trusted key id, an unknown key id, `alg: none`, HS256
  keyed with the public key, a tampered payload, a stripped signature, another audience or issuer, too
  long a lifetime, issued in the future, no subject, roles that are not a list (TOKEN_INVALID), not a
  JWT, not a bearer token (TOKEN_MALFORMED); a token is checked whenever it is present, even on RPCs
  that act for no user;
- as another user, and as an admin acting for another user where admins may not (PERMISSION_DENIED
  NOT_ACCOUNT_OWNER; reads by id load the record first, then check its owner);
- as a user without the admin role on admin RPCs (PERMISSION_DENIED ADMIN_ROLE_REQUIRED);
- from every platform identity not on the RPC's allow-list, and from an identity our CA certified but
  no rule names (PERMISSION_DENIED CALLER_NOT_ALLOWED).
Every refusal carries a google.rpc.ErrorInfo with the reason and the service's domain, and the
databases of all four services (row counts, sums, latest timestamps of every table) are the same after
the refusals as before. Then the same sample, from the right caller with the right token, is served
(and, for a mutating RPC, changes the books): the refusals were the guard's doing.

Beside the matrix: admins' reads of other users' accounts and every admin action land in the admin
audit trail; health checking stays reachable on the plaintext probe port, and only there without a
certificate; and a certificate of our CA that names no one is refused.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import Boolean, DateTime, Integer, MetaData, Numeric, String, Table, case, func
from sqlalchemy import select as sql_select
from sqlalchemy.engine import Connection

from coins.common.v1 import admin_audit_pb2
from coins.wallet.v1 import wallet_pb2
from ledger.schema import holds as ledger_holds
from runtime import pki
from runtime.access import Access
from runtime.audit import AdminAuditApi
from runtime.auth import AUTHORIZATION, TokenIssuer
from runtime.server import ServiceSpec
from runtime.status import bad_request, error_info
from services.gifting.reversals import FEED as REVERSALS_FEED
from services.gifting.service import SPEC as GIFTING_SPEC
from services.gifting.storage import credit_outbox, followed_positions, sent_gifts, streaks
from services.payout.sandbox import PayPalSandbox
from services.payout.service import SPEC as PAYOUT_SPEC
from services.payout.storage import gift_credits, withdrawals
from services.promotion import storage as promotion_storage
from services.promotion.service import SPEC as PROMOTION_SPEC
from services.promotion.storage import pending_captures, promotions
from services.wallet.service import SPEC as WALLET_SPEC
from services.wallet.storage import purchases
from tests.access_matrix import DOCUMENTED
from tests.helpers import eventually, first_message, funded_user, new_id
from tests.security_cases import GIFTING, PAYOUT, PROMOTION, SAMPLES, WALLET, Entry, Sample
from tests.suite import Suite

SPECS: dict[str, ServiceSpec[Any]] = {
    "wallet": WALLET_SPEC,
    "gifting": GIFTING_SPEC,
    "payout": PAYOUT_SPEC,
    "promotion": PROMOTION_SPEC,
}
IDENTITIES = (*pki.SERVICE_IDENTITIES, *pki.CALLER_IDENTITIES)
"""Every identity the platform CA certifies."""
Metadata = tuple[tuple[str, str], ...]
CALL_TIMEOUT = 10.0


def rules_of(service: str) -> dict[str, Access]:
    """The access rules the service's request guard enforces (its own, plus the shared audit API's)."""
    return {**SPECS[service].access, **AdminAuditApi.ACCESS}


def served_rpcs() -> list[tuple[str, str]]:
    """(service, method path) of every RPC each service serves, from the descriptors."""
    pool = descriptor_pool.Default()
    rpcs = []
    for service, spec in SPECS.items():
        for full_name in (*spec.grpc_services, AdminAuditApi.FULL_NAME):
            for method in pool.FindServiceByName(full_name).methods:
                rpcs.append((service, f"/{full_name}/{method.name}"))
    return rpcs


RPCS = served_rpcs()


def method_descriptor(path: str) -> MethodDescriptor:
    return descriptor_pool.Default().FindMethodByName(path[1:].replace("/", "."))


def rpc_id(rpc: tuple[str, str]) -> str:
    service, path = rpc
    return f"{service}.{path.rsplit('/', 1)[1]}"


def rpcs_where(keep: Callable[[Access, Entry | None], bool]) -> list[Any]:
    """The RPCs (as pytest params with readable ids) whose documented access rule (the README's, not
    the code's) and sample entry satisfy `keep`. An RPC missing from tests/access_matrix.py is left
    out here and fails test_the_rules_enforced_are_the_documented_ones."""
    return [
        pytest.param(service, path, id=rpc_id((service, path)))
        for service, path in RPCS
        if path in DOCUMENTED[service] and keep(documented_rule(service, path), SAMPLES.get(path))
    ]


ALL_RPCS = [pytest.param(s, p, id=rpc_id((s, p))) for s, p in RPCS]


@pytest.fixture(scope="session")
def rogue_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another complete PKI: a CA with the same name as ours, certificates for every identity, and a
    token signing key under our key id. Nothing of it is trusted by the services."""
    directory = tmp_path_factory.mktemp("rogue-pki")
    pki.ensure_dev_pki(directory)
    return directory


STRANGER, NAMELESS = "stranger", "nameless"


@pytest.fixture(scope="session")
def unlisted_certs(suite: Suite, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates our own CA signed for callers outside the platform's list: `stranger` (an
    identity no rule names) and `nameless` (a certificate without a common name)."""
    directory = tmp_path_factory.mktemp("unlisted-certs")
    for name in ("ca.pem", "ca-key.pem"):
        (directory / name).write_bytes((suite.security.certs_dir / name).read_bytes())
    pki.issue(directory, STRANGER)
    ca_key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "coins dev")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / f"{NAMELESS}-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / f"{NAMELESS}.pem").write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
    )
    return directory


# ---------------------------------------------------------------------------------------------- calls


class Calls:
    """Unary calls to one service by method path, over channels presenting any identity's
    certificate (from the suite's certs directory or another) or none; closed at the end of the
    test."""

    def __init__(self, suite: Suite, service: str) -> None:
        self.suite, self._service = suite, service
        self._channels: dict[tuple[str | None, Path | None], grpc.aio.Channel] = {}

    def _channel(self, identity: str | None, certs: Path | None) -> grpc.aio.Channel:
        key = (identity, certs)
        if key not in self._channels:
            ours = self.suite.security.certs_dir
            certs = certs or ours
            ca = (ours / "ca.pem").read_bytes()  # the client trusts the real server either way
            credentials = (
                grpc.ssl_channel_credentials(
                    ca,
                    (certs / f"{identity}-key.pem").read_bytes(),
                    (certs / f"{identity}.pem").read_bytes(),
                )
                if identity is not None
                else grpc.ssl_channel_credentials(ca)
            )
            address = self.suite.services[self._service].address
            self._channels[key] = grpc.aio.secure_channel(address, credentials)
        return self._channels[key]

    async def call(
        self,
        method: str,
        request: Message,
        *,
        identity: str | None,
        metadata: Metadata = (),
        certs: Path | None = None,
    ) -> Message:
        """Call `method` presenting `identity`'s certificate from `certs` (default: the suite's)."""
        descriptor = method_descriptor(method)
        response_type = message_factory.GetMessageClass(descriptor.output_type)
        channel = self._channel(identity, certs)
        if descriptor.server_streaming:  # admitted: the stream's first message, or none yet
            watch: Any = channel.unary_stream(
                method,
                request_serializer=lambda message: message.SerializeToString(),
                response_deserializer=response_type.FromString,
            )
            first = await first_message(watch(request, metadata=metadata, timeout=CALL_TIMEOUT))
            return response_type() if first is None else cast(Message, first)
        call: grpc.aio.UnaryUnaryMultiCallable[Message, Message] = channel.unary_unary(
            method,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        return await call(request, metadata=metadata, timeout=CALL_TIMEOUT)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


@pytest.fixture
async def calls(suite: Suite) -> AsyncIterator[Callable[[str], Calls]]:
    """`calls(service)`: a Calls to that service, closed when the test ends."""
    opened: list[Calls] = []

    def open_calls(service: str) -> Calls:
        opened.append(Calls(suite, service))
        return opened[-1]

    yield open_calls
    for each in opened:
        await each.close()


# --------------------------------------------------------------------------------------------- tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _bearer(token: str) -> Metadata:
    return ((AUTHORIZATION, f"Bearer {token}"),)


@dataclass(frozen=True)
class Tokens:
    """Genuine, expired, forged and foreign tokens, minted beside the suite's own issuer."""

    suite: Suite
    rogue: Path

    def _issuer(
        self, key: Path, *, key_id: str = pki.DEV_KEY_ID, issuer: str = "", audience: str = ""
    ) -> TokenIssuer:
        security = self.suite.security
        return TokenIssuer(
            key.read_bytes(),
            key_id=key_id,
            issuer=issuer or security.jwt_issuer,
            audience=audience or security.jwt_audience,
        )

    @property
    def _our_key(self) -> Path:
        return self.suite.security.certs_dir / "jwt" / f"{pki.DEV_KEY_ID}-key.pem"

    @property
    def _rogue_key(self) -> Path:
        return self.rogue / "jwt" / f"{pki.DEV_KEY_ID}-key.pem"

    def genuine(self, user: str, *, admin: bool = False) -> Metadata:
        return _bearer(self.suite.issuer.mint(user, roles=["admin"] if admin else []))

    def _claims(self, user: str, roles: Sequence[str]) -> dict[str, object]:
        now = int(time.time())
        security = self.suite.security
        return {
            "sub": user,
            "iss": security.jwt_issuer,
            "aud": security.jwt_audience,
            "iat": now,
            "exp": now + 900,
            "jti": uuid.uuid4().hex,
            "roles": list(roles),
        }

    @staticmethod
    def _craft(
        header: Mapping[str, object], claims: Mapping[str, object], key: bytes | None
    ) -> str:
        """A JWT assembled by hand: HS256-signed with `key`, or unsigned."""
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = (
            hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
            if key is not None
            else b""
        )
        return f"{signing_input}.{_b64(signature)}"

    def refused(self, user: str, *, admin: bool) -> Iterator[tuple[str, Metadata, str]]:
        """(case, metadata, ErrorInfo reason) of every token that must not get `user` in, each one
        otherwise fit for the call (`admin`: it claims the admin role)."""
        roles = ["admin"] if admin else []
        security = self.suite.security
        now = dt.datetime.now(dt.UTC)
        ours = self.suite.issuer

        expired = ours.mint(user, roles=roles, now=now - dt.timedelta(hours=2))
        yield "expired token", _bearer(expired), "TOKEN_EXPIRED"

        yield (
            "forged: another key under the trusted key id",
            _bearer(self._issuer(self._rogue_key).mint(user, roles=roles)),
            "TOKEN_INVALID",
        )
        yield (
            "forged: an unknown key id",
            _bearer(self._issuer(self._rogue_key, key_id="rogue-1").mint(user, roles=roles)),
            "TOKEN_INVALID",
        )
        header = {"typ": "JWT", "kid": pki.DEV_KEY_ID}
        yield (
            "forged: alg none",
            _bearer(self._craft({**header, "alg": "none"}, self._claims(user, roles), None)),
            "TOKEN_INVALID",
        )
        public_key = (security.verification_keys_dir / f"{pki.DEV_KEY_ID}.pem").read_bytes()
        yield (
            "forged: HS256 keyed with the public key",
            _bearer(self._craft({**header, "alg": "HS256"}, self._claims(user, roles), public_key)),
            "TOKEN_INVALID",
        )
        head, payload, signature = ours.mint(new_id("intruder")).split(".")
        claims = json.loads(_unb64(payload))
        claims.update(sub=user, roles=["admin"])
        yield (
            "forged: payload of a genuine token rewritten",
            _bearer(f"{head}.{_b64(json.dumps(claims).encode())}.{signature}"),
            "TOKEN_INVALID",
        )
        head, payload, _ = ours.mint(user, roles=roles).split(".")
        yield "forged: signature stripped", _bearer(f"{head}.{payload}."), "TOKEN_INVALID"
        yield (
            "foreign: another audience",
            _bearer(self._issuer(self._our_key, audience="elsewhere").mint(user, roles=roles)),
            "TOKEN_INVALID",
        )
        yield (
            "foreign: another issuer",
            _bearer(self._issuer(self._our_key, issuer="elsewhere").mint(user, roles=roles)),
            "TOKEN_INVALID",
        )
        too_long = dt.timedelta(seconds=security.jwt_max_ttl_seconds + 60)
        yield (
            "token living longer than allowed",
            _bearer(ours.mint(user, roles=roles, ttl=too_long)),
            "TOKEN_INVALID",
        )
        future = now + dt.timedelta(minutes=30)
        yield (
            "token issued in the future",
            _bearer(ours.mint(user, roles=roles, now=future)),
            "TOKEN_INVALID",
        )
        yield (
            "token naming no user",
            _bearer(ours.mint(user, roles=roles, claims={"sub": ""})),
            "TOKEN_INVALID",
        )
        # Its user goes where record's user ids go (64 characters) and into log lines (review r25:
        # INTERNAL on PostgreSQL for a 76-character admin, forged log lines from a line break).
        for why, sub in (("too long", "a" * 65), ("with a line break", f"{user}\nevent=forged")):
            yield (
                f"token whose sub is not a user id ({why})",
                _bearer(ours.mint(user, roles=roles, claims={"sub": sub})),
                "TOKEN_INVALID",
            )
        yield (
            "roles claim that is not a list",
            _bearer(ours.mint(user, claims={"roles": "admin"})),
            "TOKEN_INVALID",
        )
        yield (
            "roles claim that is not a list of names",
            _bearer(ours.mint(user, claims={"roles": [{"admin": True}]})),
            "TOKEN_INVALID",
        )
        yield "not a JWT", _bearer("not-a-jwt"), "TOKEN_MALFORMED"
        # Two tokens, the user's and another's: which user the call acts for is ambiguous (the
        # first one won, whichever came first: a review's).
        yield (
            "two bearer tokens",
            (*_bearer(ours.mint(user, roles=roles)), *_bearer(ours.mint(new_id("mallory")))),
            "TOKEN_MALFORMED",
        )
        yield (
            "not a bearer token",
            ((AUTHORIZATION, f"Basic {_b64(f'{user}:secret'.encode())}"),),
            "TOKEN_MALFORMED",
        )


# ----------------------------------------------------------------------------------------- snapshots

Snapshot = dict[str, tuple[Any, ...]]
"""Per `service.table`: its fingerprint (see `_fingerprint`)."""
_SCHEMAS: dict[str, list[Table]] = {}


def _reflect(conn: Connection) -> list[Table]:
    metadata = MetaData()
    metadata.reflect(conn)
    # The periodic jobs' lease (runtime.leadership) is renewed every 2 s: not a refusal's doing.
    return [t for t in metadata.sorted_tables if t.name not in ("alembic_version", "job_leases")]


def _fingerprint(table: Table) -> Any:
    """One row per table: its row count, the sum of every number, flag and string length, and the
    latest of every timestamp; an insert, a delete or an update of nearly any column shows."""
    columns: list[Any] = [func.count()]
    for column in table.columns:
        if isinstance(column.type, Boolean):
            columns.append(func.sum(case((column, 1), else_=0)))
        elif isinstance(column.type, Integer | Numeric):
            columns.append(func.sum(column))
        elif isinstance(column.type, String):
            columns.append(func.sum(func.length(column)))
        elif isinstance(column.type, DateTime):
            columns.append(func.max(column))
    return sql_select(*columns).select_from(table)


async def snapshot(suite: Suite) -> Snapshot:
    """The state of every service's database, read directly."""
    state: Snapshot = {}
    for name, running in sorted(suite.services.items()):
        db = running.runtime.db
        async with db.read() as conn:
            if db.url not in _SCHEMAS:
                _SCHEMAS[db.url] = await conn.run_sync(_reflect)
            for table in _SCHEMAS[db.url]:
                row = (await conn.execute(_fingerprint(table))).one()
                state[f"{name}.{table.name}"] = tuple(row)
    return state


PendingWork = Callable[[Suite], Awaitable[int]]
"""How many items a background worker still has to act on, as its service's database shows."""


def _rows_where(service: str, table: Table, *where: Any) -> PendingWork:
    async def count(suite: Suite) -> int:
        async with suite.services[service].runtime.db.read() as conn:
            query = sql_select(func.count()).select_from(table).where(*where)
            return int((await conn.execute(query)).scalar_one())

    return count


async def _expired_holds(suite: Suite) -> int:
    now = suite.services["wallet"].runtime.clock.now()
    due = _rows_where(
        "wallet", ledger_holds, ledger_holds.c.status == "active", ledger_holds.c.expires_at <= now
    )
    return await due(suite)


async def _withdrawals_in_flight(suite: Suite) -> int:
    """Withdrawals the worker still follows, and the sandbox processor's items still settling or
    callbacks still on their way (each callback writes its event id)."""
    rows = _rows_where(
        "payout",
        withdrawals,
        withdrawals.c.status.in_(("approved", "processing")),
        withdrawals.c.parked_at.is_(None),
    )
    processor = suite.services["payout"].runtime.parts["processor"]
    assert isinstance(processor, PayPalSandbox)
    return await rows(suite) + processor.busy


async def _abandoned_ends(suite: Suite) -> int:
    """EndPromotion requests left unanswered on active promotions (the reconciler finishes them)."""
    runtime = suite.services["promotion"].runtime
    async with runtime.db.read() as conn:
        far = runtime.clock.now() + dt.timedelta(days=1)
        return len(await promotion_storage.abandoned_ends(conn, far, limit=1_000))


async def _reversals_to_follow(suite: Suite) -> int:
    """Payout's reversed credits gifting has not applied yet."""
    async with suite.services["payout"].runtime.db.read() as conn:
        last = (await conn.execute(sql_select(func.max(gift_credits.c.reversal_seq)))).scalar()
    async with suite.services["gifting"].runtime.db.read() as conn:
        at = (
            await conn.execute(
                sql_select(followed_positions.c.position).where(
                    followed_positions.c.name == REVERSALS_FEED
                )
            )
        ).scalar()
    return int(last or 0) - int(at or 0)


BACKGROUND_WORK: dict[tuple[str, str], PendingWork | None] = {
    ("wallet", "expired_holds"): _expired_holds,
    ("wallet", "reconciled_purchases"): _rows_where(
        "wallet", purchases, purchases.c.status == "pending"
    ),
    ("gifting", "CreditRelay.run"): _rows_where(
        "gifting", credit_outbox, credit_outbox.c.delivered_at.is_(None), ~credit_outbox.c.dead
    ),
    ("gifting", "settled_pending_gifts"): _rows_where(
        "gifting", sent_gifts, sent_gifts.c.status == "pending"
    ),
    ("payout", "matured_gift_credits"): _rows_where(
        "payout", gift_credits, gift_credits.c.matured_at.is_(None)
    ),
    ("payout", "WithdrawalWorker.run"): _withdrawals_in_flight,
    ("payout", "forgotten_processor_events"): None,  # forgets only month-old callbacks
    # Reports only (a row per run); its first run comes a period (an hour) after start.
    ("payout", "withdrawal_reconciliation_mismatches"): None,
    ("gifting", "LiveFeed.listen"): None,  # wakes LIVE feed readers; writes nothing
    ("gifting", "ended_streaks"): _rows_where("gifting", streaks, streaks.c.ended_at.is_(None)),
    ("gifting", "reversed_gifts"): _reversals_to_follow,
    ("promotion", "settled_pending_promotions"): _rows_where(
        "promotion", promotions, promotions.c.status == "pending"
    ),
    ("promotion", "counted_lost_delivery_captures"): _rows_where("promotion", pending_captures),
    ("promotion", "finished_abandoned_ends"): _abandoned_ends,
    # Never a database change within a test session: the chain heads are anchored to files, the
    # first periodic audit comes a period (15 minutes) after start, and request ids are forgotten
    # only after a day at least.
    **{(service, "anchored_chain_heads"): None for service in ("wallet", "payout")},
    **{(service, "audited_the_ledger"): None for service in ("wallet", "payout")},
    **{(service, "forgotten_request_ids"): None for service in SPECS},
    **{(service, "sampled_gauges"): None for service in SPECS},  # reads the gauges, writes nothing
}
"""Every background worker the services run (by service and name, see `background_workers`), and
what it still has to do; None for one that changes no database while the tests run."""


def background_workers(suite: Suite) -> set[tuple[str, str]]:
    """(service, name) of every background worker running in the suite: a periodic job by its name,
    a loop by its class and method."""
    found = set()
    for service, running in suite.services.items():
        for worker in running.runtime._workers:
            owner = getattr(worker, "__self__", None)
            name = worker.__name__ if owner is None else f"{type(owner).__name__}.{worker.__name__}"
            found.add((service, name))
    return found


async def background_work(suite: Suite) -> list[str]:
    """What the background workers still have to do (outbox credits to deliver, withdrawals to pay,
    pending gifts, promotions and captures to settle, purchases to reconcile, holds to expire)."""
    left = []
    for (service, worker), pending in sorted(BACKGROUND_WORK.items()):
        if pending is not None and (count := await pending(suite)):
            left.append(f"{service} {worker}: {count}")
    return left


async def quiet_snapshot(suite: Suite) -> Snapshot:
    """A snapshot once the background workers have nothing left to do (earlier tests' credits
    delivered, withdrawals paid, ...), so that whatever changes after it is the test's doing."""

    async def idle() -> bool:
        return not await background_work(suite)

    try:
        await eventually(idle, "the background workers idle", seconds=20.0)
    except AssertionError:
        raise AssertionError(
            f"the background workers still busy after 20s: {await background_work(suite)}"
        ) from None
    return await snapshot(suite)


async def test_the_quiet_snapshot_knows_every_background_worker(suite: Suite) -> None:
    """quiet_snapshot waits for each background worker's work to be done: a new worker must say
    what it has left to do (BACKGROUND_WORK), or the refusals could be blamed for its writes."""
    running, known = background_workers(suite), set(BACKGROUND_WORK)
    assert running == known, (
        f"workers BACKGROUND_WORK does not know: {sorted(running - known)}; "
        f"known but not running: {sorted(known - running)}"
    )


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    return [
        f"{table}: {before.get(table)} -> {after.get(table)}"
        for table in sorted(before.keys() | after.keys())
        if before.get(table) != after.get(table)
    ]


# -------------------------------------------------------------------------------------------- matrix


@dataclass(frozen=True)
class Refusal:
    case: str
    code: grpc.StatusCode
    reason: str | None
    """The ErrorInfo reason; None for a refusal by TLS, which has none."""
    identity: str | None
    metadata: Metadata
    certs: Path | None = None
    """Where the client certificate comes from (default: the suite's certs directory)."""


def refusals(
    rule: Access, entry: Entry, sample: Sample, tokens: Tokens, allowed: str, unlisted: Path
) -> Iterator[Refusal]:
    """Every way the sample must be refused under `rule` (`allowed`: a caller the rule lets in;
    `unlisted`: where our CA's certificate for `stranger` is).

    Not here, for a known bug: our CA's certificate without a common name (see
    test_a_certificate_of_our_ca_naming_no_one_is_refused)."""
    # An RPC that acts for no user still checks a token that comes: it gets someone's.
    user = sample.user or new_id("someone")
    good = tokens.genuine(user, admin=sample.admin)
    unavailable, denied = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED

    yield Refusal("no client certificate", unavailable, None, None, good)
    yield Refusal(
        f"{allowed}'s name on another CA's certificate",
        unavailable,
        None,
        allowed,
        good,
        tokens.rogue,
    )
    if rule.needs_user or rule.admin:
        yield Refusal("no token", unauthenticated, "TOKEN_MISSING", allowed, ())
    for case_name, metadata, reason in tokens.refused(user, admin=sample.admin):
        yield Refusal(case_name, unauthenticated, reason, allowed, metadata)
    if rule.owner_field is not None or entry.record_owned:
        intruder = tokens.genuine(new_id("intruder"))
        yield Refusal("another user", denied, "NOT_ACCOUNT_OWNER", allowed, intruder)
    if rule.owner_field is not None and not rule.admin_may_read:
        admin = tokens.genuine(new_id("admin"), admin=True)
        yield Refusal(
            "an admin acting for another user", denied, "NOT_ACCOUNT_OWNER", allowed, admin
        )
    if rule.admin:
        plain = tokens.genuine(user)
        yield Refusal("no admin role", denied, "ADMIN_ROLE_REQUIRED", allowed, plain)
    if rule.callers is not None:
        for identity in IDENTITIES:
            if identity not in rule.callers:
                yield Refusal(
                    f"caller {identity} not on the allow-list",
                    denied,
                    "CALLER_NOT_ALLOWED",
                    identity,
                    good,
                )
        yield Refusal(
            "a caller our CA certified but no one listed",
            denied,
            "CALLER_NOT_ALLOWED",
            STRANGER,
            good,
            unlisted,
        )


def check_sample(path: str, rule: Access, entry: Entry, sample: Sample) -> None:
    """The sample fits its RPC's access rule, so that the matrix covers what the rule promises."""
    if rule.owner_field is not None:
        named = getattr(sample.request, rule.owner_field)
        assert named == sample.user, f"{path}: the sample must name its user in {rule.owner_field}"
    assert sample.admin == rule.admin, (
        f"{path}: the sample's token must carry the admin role iff the RPC needs it"
    )
    acts_for_user = rule.needs_user or rule.admin
    assert (sample.user is not None) == acts_for_user, (
        f"{path}: sample.user must be set iff the RPC acts for a user"
    )
    if acts_for_user and rule.owner_field is None and not rule.admin:
        assert entry.record_owned != entry.any_user, (
            f"{path} acts for a user but names no account: mark its sample record_owned (a read "
            "by id, owner checked against the record) or any_user (open to every signed-in user)"
        )
    else:
        assert not (entry.record_owned or entry.any_user), (
            f"{path}: record_owned/any_user do not apply"
        )


async def refusal_problem(
    calls: Calls, path: str, request: Message, refusal: Refusal, domain: str
) -> str | None:
    """What is wrong with how the service answered `refusal`, or None if it refused it right."""
    try:
        await calls.call(
            path,
            request,
            identity=refusal.identity,
            metadata=refusal.metadata,
            certs=refusal.certs,
        )
    except grpc.aio.AioRpcError as error:
        got = f"{error.code().name} ({error.details()})"
        if error.code() != refusal.code:
            return f"{refusal.case}: {got}, expected {refusal.code.name} {refusal.reason or ''}"
        if refusal.reason is None:
            return None
        info = error_info(error)
        if info is None:
            return f"{refusal.case}: {got} without an ErrorInfo"
        if (info.reason, info.domain) != (refusal.reason, domain):
            return f"{refusal.case}: reason {info.reason} in {info.domain}, expected {refusal.reason} in {domain}"
        return None
    return f"{refusal.case}: served, expected {refusal.code.name} {refusal.reason or ''}"


@pytest.mark.parametrize(("service", "path"), ALL_RPCS)
async def test_every_refusal_is_right_and_changes_nothing(
    suite: Suite,
    rogue_pki: Path,
    unlisted_certs: Path,
    calls: Callable[[str], Calls],
    service: str,
    path: str,
) -> None:
    entry = SAMPLES.get(path)
    assert entry is not None, (
        f"{path} has no security sample: add one to tests/security_cases.py (a request the right "
        "caller may make), so that its access rule is tested"
    )
    rule = documented_rule(service, path)  # what the README promises, not what the code says
    sample = await entry.build(suite)
    check_sample(path, rule, entry, sample)
    rpc = calls(service)
    domain = SPECS[service].error_domain
    tokens = Tokens(suite, rogue_pki)
    allowed = allowed_caller(rule)
    cases = list(refusals(rule, entry, sample, tokens, allowed, unlisted_certs))

    before = await quiet_snapshot(suite)
    problems = [
        problem
        for refusal in cases
        if (problem := await refusal_problem(rpc, path, sample.request, refusal, domain))
    ]
    after = await snapshot(suite)
    changed = changes(before, after)
    assert not (problems or changed), "\n  ".join(
        [f"{path} was not refused right:", *problems]
        + ([f"and the refused calls changed {len(changed)} tables:", *changed] if changed else [])
    )

    # The control: the same sample, from the right caller with the right token, is served.
    good = tokens.genuine(sample.user, admin=sample.admin) if sample.user else ()
    response = await rpc.call(path, sample.request, identity=allowed, metadata=good)
    if sample.mutates:
        assert changes(after, await snapshot(suite)), f"the admitted {path} changed nothing"
    if sample.settle is not None:
        await sample.settle(response)


MUTATING_RPCS = [
    pytest.param(s, p, id=rpc_id((s, p)))
    for s, p in RPCS
    if "request_id" in method_descriptor(p).input_type.fields_by_name
]


@pytest.mark.parametrize(("service", "path"), MUTATING_RPCS)
async def test_a_missing_request_id_is_refused_and_changes_nothing(
    suite: Suite, calls: Callable[[str], Calls], service: str, path: str
) -> None:
    """Every mutating RPC names its request (AIP-155): without an id a retry could not be told from a
    new request, so the admissible sample without one is INVALID_ARGUMENT and writes nothing."""
    entry = SAMPLES[path]
    sample = await entry.build(suite)
    request = type(sample.request)()
    request.CopyFrom(sample.request)
    request.ClearField("request_id")
    good = suite.token(sample.user, admin=sample.admin) if sample.user else ()
    rpc = calls(service)
    before = await quiet_snapshot(suite)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rpc.call(
            path, request, identity=allowed_caller(documented_rule(service, path)), metadata=good
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    info = error_info(caught.value)
    assert info is not None and info.reason == "INVALID_REQUEST"
    found = bad_request(caught.value)
    assert found is not None and {v.field for v in found.field_violations} == {"request_id"}
    assert not changes(before, await snapshot(suite))


ASPECTS = (
    "callers",
    "needs_user",
    "owner_field",
    "owner_in_record",
    "admin",
    "audited",
    "admin_may_read",
)
"""What tests/access_matrix.py states of each RPC, and an Access rule enforces."""


def documented_rule(service: str, path: str) -> Access:
    """The README's access rule for the RPC (tests/access_matrix.py), as an Access."""
    documented = DOCUMENTED[service].get(path)
    assert documented is not None, (
        f"{rpc_id((service, path))} ({path}) is not in tests/access_matrix.py: document who may "
        "call it in the README's access table, then transcribe it there"
    )
    return Access(**{aspect: getattr(documented, aspect) for aspect in ASPECTS})


def allowed_caller(rule: Access) -> str:
    """A caller `rule` lets in: its first allowed service, or the gateway."""
    return sorted(rule.callers)[0] if rule.callers else "gateway"


def test_the_rules_enforced_are_the_documented_ones() -> None:
    """Every RPC served is in the README's table (tests/access_matrix.py), its enforced access rule
    says what the table says (callers, user token, the account field, admin, audit), and the table
    has no RPC the services do not serve."""
    served = set(RPCS)
    undocumented = [
        f"{rpc_id((s, p))} ({p}) is served but not in tests/access_matrix.py"
        for s, p in RPCS
        if p not in DOCUMENTED[s]
    ]
    unenforced = [
        f"{rpc_id((s, p))} ({p}) is served without an access rule"
        for s, p in RPCS
        if p not in rules_of(s)
    ]
    drift = [
        f"{rpc_id((s, p))}.{aspect}: README {getattr(documented_rule(s, p), aspect)!r}, "
        f"code {getattr(rules_of(s)[p], aspect)!r}"
        for s, p in RPCS
        if p in DOCUMENTED[s] and p in rules_of(s)
        for aspect in ASPECTS
        if getattr(documented_rule(s, p), aspect) != getattr(rules_of(s)[p], aspect)
    ]
    extra = [
        f"{s}{p} is in tests/access_matrix.py but not served"
        for s, rules in DOCUMENTED.items()
        for p in rules
        if (s, p) not in served
    ]
    assert not (undocumented or unenforced or drift or extra), "\n".join(
        undocumented + unenforced + drift + extra
    )


def test_every_rpc_has_a_security_sample_and_an_access_rule() -> None:
    served = {path for _, path in RPCS}
    missing = sorted(rpc_id(rpc) for rpc in RPCS if rpc[1] not in SAMPLES)
    stale = sorted(SAMPLES.keys() - served)
    no_rule = sorted(rpc_id((s, p)) for s, p in RPCS if p not in rules_of(s))
    stray_rules = sorted(p for s in SPECS for p in rules_of(s) if p not in served)
    client_streaming = sorted(path for _, path in RPCS if method_descriptor(path).client_streaming)
    assert not missing, f"RPCs without a sample in tests/security_cases.py: {missing}"
    assert not stale, f"samples in tests/security_cases.py for RPCs no service serves: {stale}"
    assert not no_rule, f"RPCs without an access rule: {no_rule}"
    assert not stray_rules, f"access rules for RPCs no service serves: {stray_rules}"
    # runtime.interceptors.RequestGuard guards unary and server-streaming calls (the same checks
    # before the first message); it refuses to serve client-streaming ones.
    assert not client_streaming, f"client-streaming RPCs are not served: {client_streaming}"


# -------------------------------------------------------------------------------------- admin audit


class NotAudited(AssertionError):
    """An admin call is missing from the admin audit trail."""


async def audit_records(rpc: Calls, actor: str) -> list[admin_audit_pb2.AdminAction]:
    """The records of `actor`'s calls in the service's audit trail, newest first, read through
    ListAdminActions by another admin."""
    auditor = _bearer(rpc.suite.issuer.mint(new_id("auditor"), roles=["admin"]))
    path = f"/{AdminAuditApi.FULL_NAME}/ListAdminActions"
    found: list[admin_audit_pb2.AdminAction] = []
    token = ""
    while True:
        request = admin_audit_pb2.ListAdminActionsRequest(page_size=500, page_token=token)
        response = await rpc.call(path, request, identity="admin-console", metadata=auditor)
        assert isinstance(response, admin_audit_pb2.ListAdminActionsResponse)
        found += [action for action in response.actions if action.actor_user_id == actor]
        token = response.next_page_token
        if not token:
            return found


def assert_audited(
    actions: Sequence[admin_audit_pb2.AdminAction], path: str, caller: str, mentions: str
) -> None:
    outcomes = [a.outcome for a in actions]
    if outcomes != ["OK", "STARTED"]:
        raise NotAudited(f"{path}: audit trail outcomes {outcomes}, expected STARTED then OK")
    for action in actions:
        assert action.method == path
        assert action.caller_service == caller
        assert mentions in action.request_json
        assert action.trace_id


def admin_may_read(rule: Access, entry: Entry | None) -> bool:
    return rule.admin_may_read


def record_read(rule: Access, entry: Entry | None) -> bool:
    return entry is not None and entry.record_owned


@pytest.mark.parametrize(
    ("service", "path"), [*rpcs_where(admin_may_read), *rpcs_where(record_read)]
)
async def test_an_admin_may_read_another_users_account_and_the_read_is_audited(
    suite: Suite, calls: Callable[[str], Calls], service: str, path: str
) -> None:
    sample = await SAMPLES[path].build(suite)
    assert sample.user is not None
    rpc = calls(service)
    owner_view = await rpc.call(
        path, sample.request, identity="gateway", metadata=_bearer(suite.issuer.mint(sample.user))
    )
    admin = new_id("admin")
    admin_token = _bearer(suite.issuer.mint(admin, roles=["admin"]))
    admin_view = await rpc.call(path, sample.request, identity="gateway", metadata=admin_token)
    assert admin_view == owner_view
    assert await audit_records(rpc, sample.user) == [], "an owner's own read is audited"
    # A read by id names the record; any other read names the account.
    named = sample.request.ListFields()[0][1] if SAMPLES[path].record_owned else sample.user
    assert_audited(await audit_records(rpc, admin), path, "gateway", str(named))
    # Only through an admin caller: services pass users' tokens on, so an admin's token in another
    # service's hands (a review used the wallet's and the ad-delivery certificates) is refused
    # there (CALLER_NOT_ALLOWED: a user's RPCs answer only the gateway and the admin console).
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await rpc.call(path, sample.request, identity="ad-delivery", metadata=admin_token)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value.details()


@pytest.mark.parametrize(("service", "path"), rpcs_where(lambda rule, entry: rule.audited))
async def test_every_admin_action_is_in_the_audit_trail(
    suite: Suite, calls: Callable[[str], Calls], service: str, path: str
) -> None:
    sample = await SAMPLES[path].build(suite)
    assert sample.user is not None and sample.admin
    rpc = calls(service)
    token = _bearer(suite.issuer.mint(sample.user, roles=["admin"]))
    await rpc.call(path, sample.request, identity="admin-console", metadata=token)
    actions = await audit_records(rpc, sample.user)
    assert_audited(actions, path, "admin-console", getattr(sample.request, "request_id", ""))
    assert {a.reason for a in actions} == {getattr(sample.request, "reason", "")}


# ------------------------------------------------------------------------------------------- health


@pytest.mark.parametrize("service", sorted(SPECS))
async def test_health_is_open_on_the_probe_port_only(
    suite: Suite, rogue_pki: Path, calls: Callable[[str], Calls], service: str
) -> None:
    probe = health_pb2_grpc.HealthStub(suite.health_channel(service))
    answer = await probe.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    rpc = calls(service)
    check = "/grpc.health.v1.Health/Check"
    served = await rpc.call(check, health_pb2.HealthCheckRequest(), identity="gateway")
    assert isinstance(served, health_pb2.HealthCheckResponse)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await rpc.call(check, health_pb2.HealthCheckRequest(), identity=None)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await rpc.call(check, health_pb2.HealthCheckRequest(), identity="gateway", certs=rogue_pki)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("service", "path"),
    [
        pytest.param(service, path, id=rpc_id((service, path)))
        for service, path in [
            ("wallet", f"/{WALLET}/OpenAccount"),
            ("gifting", f"/{GIFTING}/SendGift"),
            ("payout", f"/{PAYOUT}/RequestWithdrawal"),
            ("promotion", f"/{PROMOTION}/CreatePromotion"),
        ]
    ],
)
async def test_a_certificate_of_our_ca_naming_no_one_is_refused(
    suite: Suite, unlisted_certs: Path, calls: Callable[[str], Calls], service: str, path: str
) -> None:
    sample = await SAMPLES[path].build(suite)
    assert sample.user is not None
    refusal = Refusal(
        "our CA's certificate naming no one",
        grpc.StatusCode.UNAUTHENTICATED,
        "CLIENT_CERTIFICATE_REQUIRED",
        NAMELESS,
        _bearer(suite.issuer.mint(sample.user)),
        unlisted_certs,
    )
    before = await quiet_snapshot(suite)
    problem = await refusal_problem(
        calls(service), path, sample.request, refusal, SPECS[service].error_domain
    )
    changed = changes(before, await snapshot(suite))
    assert not (problem or changed), "\n  ".join([str(problem), *changed])


async def test_refused_attempts_are_logged_without_the_token(
    suite: Suite, caplog: pytest.LogCaptureFixture
) -> None:
    """Abuse can be found: each refused attempt is one structured line naming the caller, the user
    and the method (and the account it reached for), never the token."""
    victim, _ = await funded_user(suite)
    mallory = new_id("mallory")
    token = suite.token(mallory)
    caplog.set_level(logging.WARNING, logger="coins.security")
    with pytest.raises(grpc.aio.AioRpcError):
        await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=victim), metadata=token)
    forged = (("authorization", "Bearer not.a.token"),)
    with pytest.raises(grpc.aio.AioRpcError):
        await suite.wallet.GetBalance(wallet_pb2.GetBalanceRequest(user_id=victim), metadata=forged)
    events = [r.__dict__["security"] for r in caplog.records if r.name == "coins.security"]
    owner = [e for e in events if e["reason"] == "NOT_ACCOUNT_OWNER"]
    assert owner, events
    assert owner[-1]["method"] == "/coins.wallet.v1.WalletService/GetBalance"
    assert (owner[-1]["caller"], owner[-1]["user"]) == ("gateway", mallory)
    assert owner[-1]["detail_account"] == victim
    assert any(e["caller"] == "gateway" and e["user"] == "-" for e in events if e is not owner[-1])
    secret = token[0][1].split(" ", 1)[1]
    for record in caplog.records:
        assert secret not in record.getMessage() and "not.a.token" not in record.getMessage()


async def test_an_admins_token_grants_no_admin_power_through_another_service(suite: Suite) -> None:
    """Admin overrides of a user's record (ending another creator's LIVE, cancelling another's
    withdrawal, ending another's promotion) are an admin's own request, through the gateway or the
    admin console. The same token presented by another platform service (services pass users'
    tokens on: a compromised one holds admins' too) is refused, as any user's is there (review E)."""
    from coins.gifting.v1 import gifting_pb2
    from tests.helpers import live_of, new_creator

    creator = await new_creator(suite)
    admin = suite.token(new_id("ops"), admin=True)
    end = gifting_pb2.EndLiveRequest(
        request_id=new_id("end"), live_id=live_of(creator), reason="policy violation"
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await suite.stub("gifting", identity="ad-delivery").EndLive(end, metadata=admin)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value.details()
    live = await suite.gifting.GetLive(gifting_pb2.GetLiveRequest(live_id=live_of(creator)))
    assert not live.live.HasField("end_time")  # still on
    ended = await suite.gifting.EndLive(end, metadata=admin)  # through the gateway: an admin's
    assert ended.live.HasField("end_time")
