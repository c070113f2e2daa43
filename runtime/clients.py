"""Channels to other coins services: traced, with deadlines passed on and retries on UNAVAILABLE.

Every cross-service call in the suite is idempotent by request id, so retrying on UNAVAILABLE is safe
(a retry can run the handler twice; the request id makes the second run a replay). Hedging is never
enabled on money RPCs.
"""

from __future__ import annotations

import json

import grpc
import grpc.aio
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.trace import TracerProvider

from runtime.protos import RpcContext

_RETRY_ON_UNAVAILABLE = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def service_channel(
    address: str, tracer_provider: TracerProvider | None = None
) -> grpc.aio.Channel:
    """An insecure loopback channel to another coins service (mutual TLS arrives with the trust issue)."""
    interceptors = (
        aio_client_interceptors(tracer_provider=tracer_provider) if tracer_provider else None
    )
    return grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.enable_retries", 1),
            ("grpc.service_config", _RETRY_ON_UNAVAILABLE),
            ("grpc.keepalive_time_ms", 30_000),
        ],
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
