"""Typed connections to the four services, addressed by flags or COINS_<SERVICE>_ADDRESS.

coinsctl plays the platform gateway: it connects with the gateway's certificate (mutual TLS, from the
dev PKI in COINS_CERTS_DIR, default certs/) and mints a short-lived dev token for the user each request
names, or for `--as USER` (with `--admin`, the admin role). Production gateways get tokens from the
identity provider instead. To report promotions' deliveries it plays the ad-delivery system, with that
system's certificate and no user token.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import grpc

from coins.common.v1 import ledger_audit_pb2_grpc
from coins.gifting.v1 import gifting_pb2_grpc
from coins.payout.v1 import payout_pb2_grpc
from coins.promotion.v1 import promotion_pb2_grpc
from coins.wallet.v1 import wallet_pb2_grpc
from runtime.auth import AUTHORIZATION, TokenIssuer, token_metadata
from runtime.channels import SERVICE_CONFIG
from runtime.config import SecuritySettings, suite_address
from runtime.errors import FieldViolation
from runtime.status import bad_request, error_info, retry_info

_USER_FIELDS = ("user_id", "sender_id", "creator_id")
IDENTITY = os.environ.get("COINS_CLI_IDENTITY", "gateway")


class NoActingUser(ValueError):
    """A call that needs a user token, for a request that names no user, from `Clients` that were
    told no `acting_user` (nor a `default_user`): refused before anything is sent."""


def new_request_id() -> str:
    """A fresh request id (AIP-155): send it again, with the same request, to retry safely."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Refusal:
    """A failed call as a caller branches on it, decoded from the status details: the stable
    reason (google.rpc.ErrorInfo), the facts behind it, which fields were wrong (BadRequest) and
    how long to wait before trying again (RetryInfo)."""

    code: grpc.StatusCode
    reason: str
    """UPPER_SNAKE_CASE, stable ("" when the service attached none: gRPC's own refusals)."""
    message: str
    metadata: Mapping[str, str]
    violations: Mapping[str, str]
    """Field path -> what is wrong with it (several faults of one field joined by "; ")."""
    field_violations: tuple[FieldViolation, ...]
    """Each bad field as the service sent it: path, description and, as `reason`, the rule it
    broke (`INT32_GTE_LTE`, `STRING_PATTERN`, `REQUIRED`, `CARD_DATA_REFUSED`): what code
    branches on."""
    retry_after: float | None
    """Seconds to wait before sending the same request again, when the service said."""

    @classmethod
    def of(cls, error: grpc.RpcError) -> Refusal:
        info = error_info(error)
        fields = bad_request(error)
        wait = retry_info(error)
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        bad = tuple(
            FieldViolation(v.field, v.description, v.reason)
            for v in (fields.field_violations if fields is not None else ())
        )
        described: dict[str, str] = {}
        for each in bad:
            said = described.get(each.field)
            described[each.field] = f"{said}; {each.description}" if said else each.description
        return cls(
            code=code,
            reason=info.reason if info is not None else "",
            message=(error.details() if hasattr(error, "details") else str(error)) or "",
            metadata=dict(info.metadata) if info is not None else {},
            violations=described,
            field_violations=bad,
            retry_after=wait.retry_delay.ToTimedelta().total_seconds()
            if wait is not None
            else None,
        )

    @property
    def retryable(self) -> bool:
        """Whether the same request (the same request_id) may succeed if sent again: nothing was
        applied, or it is answered once it was (an outage, a deadline, a concurrent duplicate, a
        service that said when, a stopping server that cancelled the call: CANCELLED with no
        ErrorInfo, as a caller never reads its own cancel)."""
        transient = (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.ABORTED,
        )
        stopped = self.code == grpc.StatusCode.CANCELLED and not self.reason
        return self.code in transient or stopped or self.retry_after is not None


def default_address(service: str) -> str:
    """COINS_<SERVICE>_ADDRESS, else where this suite runs it (COINS_PORT_BASE)."""
    return os.environ.get(f"COINS_{service.upper()}_ADDRESS") or suite_address(service)


class _CallDefaults(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """What every call gets unless it says otherwise: a dev token for the acting user (when
    `token_for` is given), and for a unary call the clients' deadline (`Clients.timeout`: a call
    without one waited for ever on a hung service). It notes the service called, streams too (`live
    watch`, which has no default deadline), so that losing one names its service and address."""

    def __init__(
        self, token_for: Callable[[Any], str] | None, called: Callable[[], None], timeout: float
    ) -> None:
        self._token_for, self._called, self._timeout = token_for, called, timeout

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details, request, None), request)

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details, request, self._timeout), request)

    def _details(self, details: Any, request: Any, timeout: float | None) -> Any:
        self._called()
        metadata = list(details.metadata or ())
        if self._token_for is not None and not any(key == AUTHORIZATION for key, _ in metadata):
            metadata.extend(token_metadata(self._token_for(request)))
        return _Details(
            details.method,
            details.timeout if details.timeout is not None else timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )


@dataclass(frozen=True)
class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


@dataclass
class Clients:
    addresses: dict[str, str]
    timeout: float = 10.0
    """The deadline of every unary call that names none (seconds)."""
    acting_user: str | None = None
    """--as: act for this user on every call (else: the user each request names)."""
    default_user: str | None = None
    """Who a request that names no user acts for when `acting_user` is not set (a gift's or a
    withdrawal's record, the catalog, a LIVE). None: such a request is refused here, before it is
    sent, saying to set `acting_user` (else the service would judge a made-up user's token)."""
    admin: bool = False
    security: SecuritySettings = field(default_factory=lambda: _security())
    last_service: str | None = None
    """The service of the latest call (an error report names it and its address)."""

    @cached_property
    def issuer(self) -> TokenIssuer:
        try:
            return TokenIssuer.dev(self.security)
        except FileNotFoundError:
            raise SystemExit(
                f"no dev token key in {self.security.certs_dir}/jwt: run `make up` (or `make certs`)"
                " in the checkout, or point COINS_CERTS_DIR at its certs/"
            ) from None

    def token(self, user: str) -> tuple[tuple[str, str | bytes], ...]:
        """Call metadata with a fresh dev token for `user`."""
        roles = ["admin"] if self.admin else []
        return tuple(token_metadata(self.issuer.mint(user, roles=roles)))

    def token_as(self, user: str, *, admin: bool) -> tuple[tuple[str, str | bytes], ...]:
        """Call metadata with a fresh dev token for `user`, with the admin role if `admin`."""
        return tuple(token_metadata(self.issuer.mint(user, roles=["admin"] if admin else [])))

    def _token_for(self, request: Any) -> str:
        named = next((getattr(request, f) for f in _USER_FIELDS if hasattr(request, f)), "")
        user = self.acting_user or named or self.default_user
        if not user:
            kind = type(request).__name__
            raise NoActingUser(
                f"a {kind} names no user (no {', '.join(_USER_FIELDS)}): say whom the call acts "
                'for, Clients(..., acting_user="USER") (coinsctl: --as USER)'
            )
        return self.issuer.mint(user, roles=["admin"] if self.admin else [])

    def _channel(
        self, service: str, identity: str = IDENTITY, *, user_tokens: bool = True
    ) -> grpc.Channel:
        certs = self.security.certs_dir
        try:
            credentials = grpc.ssl_channel_credentials(
                (certs / "ca.pem").read_bytes(),
                (certs / f"{identity}-key.pem").read_bytes(),
                (certs / f"{identity}.pem").read_bytes(),
            )
        except FileNotFoundError as missing:
            raise SystemExit(
                f"{missing.filename} is missing: run `make up` (or `make certs`) in the checkout, "
                "or point COINS_CERTS_DIR at its certs/"
            ) from None
        address = self.addresses[service]
        # A restarted service is back in seconds: reconnect within a second of it (gRPC's
        # default backoff grows towards two minutes while it is down), as the services do.
        options: list[tuple[str, object]] = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", SERVICE_CONFIG),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1_000),
        ]
        if address.startswith(("ipv4:", "ipv6:")):  # a list of replicas: no host name to check
            options.append(("grpc.default_authority", service))  # (every certificate names it)
        channel = grpc.secure_channel(address, credentials, options=options)

        def called() -> None:
            self.last_service = service

        token_for = self._token_for if user_tokens else None
        return grpc.intercept_channel(channel, _CallDefaults(token_for, called, self.timeout))

    @cached_property
    def wallet(self) -> wallet_pb2_grpc.WalletServiceStub:
        return wallet_pb2_grpc.WalletServiceStub(self._channel("wallet"))

    @cached_property
    def gifting(self) -> gifting_pb2_grpc.GiftingServiceStub:
        return gifting_pb2_grpc.GiftingServiceStub(self._channel("gifting"))

    @cached_property
    def payout(self) -> payout_pb2_grpc.PayoutServiceStub:
        return payout_pb2_grpc.PayoutServiceStub(self._channel("payout"))

    @cached_property
    def promotion(self) -> promotion_pb2_grpc.PromotionServiceStub:
        return promotion_pb2_grpc.PromotionServiceStub(self._channel("promotion"))

    def ledger_audit(self, service: str) -> ledger_audit_pb2_grpc.LedgerAuditServiceStub:
        """The ledger audit of `service` (wallet: coins, payout: diamonds)."""
        return ledger_audit_pb2_grpc.LedgerAuditServiceStub(self._channel(service))

    @cached_property
    def ad_delivery(self) -> promotion_pb2_grpc.PromotionServiceStub:
        """Promotion as the ad-delivery system calls it (ReportDelivery): its certificate, no token."""
        channel = self._channel("promotion", "ad-delivery", user_tokens=False)
        return promotion_pb2_grpc.PromotionServiceStub(channel)


_CHECKOUT_CERTS = Path(__file__).resolve().parents[1] / "certs"


def _security() -> SecuritySettings:
    """The suite's settings; run from outside the checkout (coinsctl on PATH) with no
    COINS_CERTS_DIR, the checkout's own certs/ (where `make up` writes them), not ./certs."""
    settings = SecuritySettings()
    if (
        "COINS_CERTS_DIR" not in os.environ
        and not settings.certs_dir.is_absolute()
        and not settings.certs_dir.exists()
        and _CHECKOUT_CERTS.exists()
    ):
        settings = settings.model_copy(update={"certs_dir": _CHECKOUT_CERTS})
    return settings
