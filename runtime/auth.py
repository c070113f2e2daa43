"""Who is calling: the platform service (from its client certificate) and the user (from a signed token).

Every call reaches a service over mutual TLS, so the calling service is the common name of a
certificate our CA signed; it cannot be claimed in metadata. The end user a call acts for is the
subject of a short-lived ES256 JWT in the `authorization: Bearer ...` metadata, verified against the
platform's public keys (picked by `kid`, so keys rotate without downtime). Services pass the user's
token on to the services they call, so the wallet checks the user itself even when gifting calls it.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from runtime.config import SecuritySettings
from runtime.errors import PermissionDenied, Unauthenticated
from runtime.protos import RpcContext

ALGORITHM = "ES256"
"""The only algorithm accepted: asymmetric, so services hold no key that can mint tokens."""
AUTHORIZATION = "authorization"
ADMIN_ROLE = "admin"


USER_CALLERS = frozenset({"gateway", "admin-console"})
"""The platform callers that carry users' own requests (the API gateway, the admin console): the
only ones a user-facing RPC answers. Services pass a user's token on only to the internal RPCs
that name them (a gift's debit, a promotion's hold), so a service holding a user's token cannot
act as that user anywhere else."""
ADMIN_CALLERS = USER_CALLERS
"""The platform callers that carry admins' own requests: the same edge."""


@dataclass(frozen=True)
class Principal:
    """The caller of one RPC: a platform service, and the user it acts for (if a token came)."""

    service: str
    user_id: str | None = None
    roles: frozenset[str] = frozenset()
    token: str | None = field(default=None, repr=False)

    @property
    def actor(self) -> str:
        """Who is acting, as a record's history names them: the user (a creator, an admin), or the
        service itself when it acts for no one."""
        return self.user_id or self.service

    @property
    def is_admin(self) -> bool:
        """An admin's own request: the role in the token, through an admin caller. Services pass
        users' tokens on to the services they call, so an admin's token in another service's hands
        (a compromised one, a webhook receiver) grants no admin power: it acts for that user only."""
        return ADMIN_ROLE in self.roles and self.service in ADMIN_CALLERS

    def require_user(self) -> str:
        if self.user_id is None:
            raise Unauthenticated(
                "TOKEN_MISSING", "this call acts for a user: send `authorization: Bearer <token>`"
            )
        return self.user_id

    def require_admin(self) -> str:
        user = self.require_user()
        if not self.is_admin:
            raise PermissionDenied(
                "ADMIN_ROLE_REQUIRED", "this call needs the admin role in the token", user_id=user
            )
        return user


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "coins_principal", default=None
)


def current_principal() -> Principal:
    """The principal of the RPC being served (set by the request guard before the handler runs)."""
    principal = _current.get()
    if principal is None:  # pragma: no cover - the guard always sets it
        raise RuntimeError("no principal: called outside an RPC")
    return principal


def principal_or_none() -> Principal | None:
    """The principal of the RPC being served, None outside one (background work)."""
    return _current.get()


def set_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    return _current.set(principal)


def peer_service(context: RpcContext) -> str | None:
    """The common name of the verified client certificate, or None on a connection without one."""
    names = list(context.auth_context().get("x509_common_name") or ())
    name = names[0].decode().strip() if names else ""
    return name or None  # a certificate naming no one identifies no one


def bearer_token(context: RpcContext) -> str | None:
    """The call's bearer token; TOKEN_MALFORMED for one not `Bearer <token>`, or for two: which
    user a call with two acts for is ambiguous (the first one won, whichever the caller meant)."""
    found = [
        value.decode() if isinstance(value, bytes) else value
        for key, value in context.invocation_metadata() or ()
        if key == AUTHORIZATION
    ]
    if not found:
        return None
    if len(found) > 1:
        raise Unauthenticated(
            "TOKEN_MALFORMED",
            f"the call carries {len(found)} authorization entries: send one `Bearer <token>`",
        )
    scheme, _, token = found[0].partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("TOKEN_MALFORMED", "authorization metadata must be `Bearer <token>`")
    return token.strip()


class PublicKeys:
    """Verification keys by key id, from a folder of `<kid>.pem`.

    Rotation without downtime: the folder is re-read when a token names a kid not seen yet (at most
    once a second) and every REFRESH_SECONDS, so a new key works at once and a removed one stops
    working within that time."""

    REFRESH_SECONDS = 30.0

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._loaded_at = 0.0
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        keys: dict[str, ec.EllipticCurvePublicKey] = {}
        for path in sorted(self._folder.glob("*.pem")) if self._folder.is_dir() else ():
            if path.stem.endswith("-key"):
                continue  # a private key lying beside (the dev set-up); never used to verify
            key = serialization.load_pem_public_key(path.read_bytes())
            if isinstance(key, ec.EllipticCurvePublicKey):
                keys[path.stem] = key
        self._keys = keys
        self._loaded_at = time.monotonic()

    def get(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        age = time.monotonic() - self._loaded_at
        if age > self.REFRESH_SECONDS or (kid not in self._keys and age > 1.0):
            with self._lock:
                self._load()
        return self._keys.get(kid)


class TokenVerifier:
    """Verifies user tokens. An ES256 check costs ~0.17 ms, a third of a gRPC hop, and callers reuse a
    token for many calls, so a verified token is remembered (by its exact text, which the signature
    covers) until it expires or for CACHE_SECONDS at most, whichever comes first."""

    CACHE_SECONDS = 60.0
    CACHE_SIZE = 50_000

    def __init__(self, settings: SecuritySettings) -> None:
        self._settings = settings
        self._keys = PublicKeys(settings.verification_keys_dir)
        self._verified: OrderedDict[str, tuple[float, str, frozenset[str]]] = OrderedDict()

    def verify(self, token: str) -> tuple[str, frozenset[str]]:
        """(user id, roles) of a valid token; UNAUTHENTICATED with the precise reason otherwise."""
        now = time.time()
        cached = self._verified.get(token)
        if cached is not None and now < cached[0]:
            return cached[1], cached[2]
        user, roles, expires = self._verify(token)
        self._verified[token] = (
            min(expires + self._settings.jwt_leeway_seconds, now + self.CACHE_SECONDS),
            user,
            roles,
        )
        if len(self._verified) > self.CACHE_SIZE:
            self._verified.popitem(last=False)
        return user, roles

    def _verify(self, token: str) -> tuple[str, frozenset[str], float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("TOKEN_MALFORMED", "the token is not a JWT") from None
        if header.get("alg") != ALGORITHM:
            raise Unauthenticated("TOKEN_INVALID", f"tokens must be signed with {ALGORITHM}")
        kid = str(header.get("kid", ""))
        key = self._keys.get(kid)
        if key is None:
            raise Unauthenticated("TOKEN_INVALID", "the token's signing key (kid) is not trusted")
        s = self._settings
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=s.jwt_audience,
                issuer=s.jwt_issuer,
                leeway=s.jwt_leeway_seconds,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("TOKEN_EXPIRED", "the token has expired; get a new one") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("TOKEN_INVALID", "the token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("TOKEN_INVALID", "the token comes from another issuer") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated(
                "TOKEN_INVALID",
                f"the token's signature does not verify with its key {kid!r}: it was altered, or "
                "signed with another key",
                claim="signature",
            ) from None
        except jwt.ImmatureSignatureError as error:
            claim = "nbf" if "nbf" in str(error) else "iat"
            raise Unauthenticated(
                "TOKEN_INVALID",
                f"the token is not valid yet: its {claim} is more than {s.jwt_leeway_seconds}s "
                "ahead of this server's clock (check the issuer's clock)",
                claim=claim,
            ) from None
        except jwt.MissingRequiredClaimError as error:
            raise Unauthenticated(
                "TOKEN_INVALID",
                f"the token has no {error.claim!r} claim (exp, iat, iss, aud and sub are required)",
                claim=error.claim,
            ) from None
        except jwt.PyJWTError:
            raise Unauthenticated(
                "TOKEN_INVALID", "the token's signature or claims are invalid"
            ) from None
        if int(claims["exp"]) - int(claims["iat"]) > s.jwt_max_ttl_seconds:
            raise Unauthenticated(
                "TOKEN_INVALID", f"tokens may live at most {s.jwt_max_ttl_seconds}s"
            )
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("TOKEN_INVALID", "the token names no user")
        if not USER_ID.fullmatch(subject):
            # Its user is written where the records' user ids go (the admin audit, the ledger's
            # acting user): at most 64 characters there, and a line break in it would forge log
            # lines (review r25: INTERNAL on PostgreSQL for a 76-character admin).
            raise Unauthenticated(
                "TOKEN_INVALID",
                f"the token's sub is not a user id: it must match {USER_ID.pattern} (1 to 64 "
                "letters, digits, '_', '.' or '-')",
                claim="sub",
            )
        roles = claims.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise Unauthenticated(
                "TOKEN_INVALID", "the token's roles claim must be a list of names"
            )
        return subject, frozenset(roles), float(claims["exp"])


USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""What a user id is (the protos' user id fields take the same): a token's `sub` must be one."""


class TokenIssuer:
    """Mints user tokens with a private key: the dev stand-in for the platform's identity provider
    (coinsctl and the tests use it; services never do)."""

    def __init__(self, private_key_pem: bytes, *, key_id: str, issuer: str, audience: str) -> None:
        self._key = serialization.load_pem_private_key(private_key_pem, None)
        self._kid, self._issuer, self._audience = key_id, issuer, audience

    @classmethod
    def dev(cls, settings: SecuritySettings, key_id: str = "dev-1") -> TokenIssuer:
        path = settings.certs_dir / "jwt" / f"{key_id}-key.pem"
        return cls(
            path.read_bytes(),
            key_id=key_id,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )

    def mint(
        self,
        user_id: str,
        *,
        roles: Iterable[str] = (),
        ttl: dt.timedelta = dt.timedelta(minutes=15),
        now: dt.datetime | None = None,
        claims: Mapping[str, object] | None = None,
    ) -> str:
        """A signed token for `user_id`; `claims` override or add claims (tests forge bad ones)."""
        issued = now or dt.datetime.now(dt.UTC)
        payload: dict[str, object] = {
            "sub": user_id,
            "iss": self._issuer,
            "aud": self._audience,
            "iat": issued,
            "exp": issued + ttl,
            "jti": uuid.uuid4().hex,
            "roles": sorted(roles),
        }
        payload.update(claims or {})
        return jwt.encode(payload, self._key, algorithm=ALGORITHM, headers={"kid": self._kid})  # type: ignore[arg-type]


def token_metadata(token: str) -> Sequence[tuple[str, str]]:
    """Call metadata carrying `token`."""
    return ((AUTHORIZATION, f"Bearer {token}"),)


def forwarded_metadata() -> Sequence[tuple[str, str]]:
    """Metadata for a call made while serving an RPC: the acting user's token travels on."""
    principal = _current.get()
    if principal is None or principal.token is None:
        return ()
    return token_metadata(principal.token)
