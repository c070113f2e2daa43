"""Channels to other coins services: mutual TLS, traced, the acting user's token and the deadline
passed on, and retries on UNAVAILABLE.

Every cross-service call in the suite is idempotent by request id, so retrying on UNAVAILABLE is safe
(a retry can run the handler twice; the request id makes the second run a replay). Hedging is never
enabled on money RPCs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.trace import TracerProvider

from runtime.auth import AUTHORIZATION, forwarded_metadata
from runtime.channels import SERVICE_CONFIG
from runtime.config import SecuritySettings
from runtime.protos import RpcContext
from runtime.shedding import SERVED_SECONDS, downstream_call
from runtime.status import from_rpc_error
from runtime.tls import channel_credentials


class ForwardUserToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Pass the acting user's token on: the called service checks the user itself."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        extra = forwarded_metadata()
        present = client_call_details.metadata or grpc.aio.Metadata()
        if extra and not any(key == AUTHORIZATION for key, _ in present):
            metadata = grpc.aio.Metadata(*present, *extra)
            client_call_details = grpc.aio.ClientCallDetails(
                client_call_details.method,
                client_call_details.timeout,
                metadata,
                client_call_details.credentials,
                client_call_details.wait_for_ready,
            )
        return await continuation(client_call_details, request)


class DownstreamWait(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """The time another service spends on a call (its `SERVED_SECONDS` trailer) is that service's,
    not a queue in this one: the load shedder leaves it out (see runtime.shedding). The rest of the
    wait (a stream to free up on the connection, this process's event loop to come round) is ours."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        with downstream_call() as wait:
            call = await continuation(client_call_details, request)
            with contextlib.suppress(grpc.RpcError):  # the caller awaits it again and sees it
                await call
            served = served_seconds(await call.trailing_metadata())
            if served is not None:
                wait.served(served)
        return call


def served_seconds(trailers: Any) -> float | None:
    """The seconds the called service says it spent on the call; None if it did not say."""
    for key, value in trailers or ():
        if key == SERVED_SECONDS:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def service_channel(
    address: str,
    security: SecuritySettings,
    identity: str,
    tracer_provider: TracerProvider | None = None,
    *,
    peer: str | None = None,
) -> grpc.aio.Channel:
    """A mutual-TLS channel to another coins service, presenting `identity`'s certificate.

    `address` is one address (`wallet:50051`), a name resolving to every replica
    (`dns:///wallet:50051`) or a list of replicas (`ipv4:10.0.0.7:50051,10.0.0.8:50051`); calls
    are spread round-robin. A list has no host name to check certificates against: they are
    checked against `peer`, the called service's name (every service's certificate carries it).
    """
    interceptors: list[Any] = [DownstreamWait(), ForwardUserToken()]
    if tracer_provider:
        interceptors.extend(aio_client_interceptors(tracer_provider=tracer_provider))
    options: list[tuple[str, Any]] = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.keepalive_time_ms", 30_000),
        # A peer restarting (a crash, a deploy) is back in seconds: reconnect within a second of
        # it, not after gRPC's default backoff, which grows towards two minutes while it is down.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),
    ]
    if peer and address.startswith(("ipv4:", "ipv6:")):
        options.append(("grpc.default_authority", peer))
    return grpc.aio.secure_channel(
        address,
        channel_credentials(security, identity),
        options=options,
        interceptors=interceptors,
    )


def downstream_timeout(context: RpcContext | None, default: float) -> float:
    """The timeout for a call made while serving `context`: what is left of its deadline, at most `default`.

    grpc Python does not propagate deadlines by itself.
    """
    remaining = context.time_remaining() if context is not None else None
    if remaining is None:
        return default
    return max(0.001, min(default, remaining - 0.01))


R = TypeVar("R")


async def answer_of(call: Awaitable[R], dependency: str) -> R:
    """A call to another service, its refusal raised as the DomainError it stands for (the
    ErrorInfo kept; an outage or a passed deadline as UNAVAILABLE or DEADLINE_EXCEEDED naming
    `dependency`), which the caller's own rules and its answer build on."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error, dependency=dependency) from None
