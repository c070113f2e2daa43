"""The ceiling servers of benchmarks.perf: a grpc.aio echo, alone (1 hop) or forwarding (2 hops).

`python -m benchmarks.echo --flavour plain|suite --identity NAME --certs DIR [--forward HOST:PORT]
[--port N]` listens on loopback (a free port by default), prints `READY <port>` on stdout and serves
until SIGINT/SIGTERM.
One generic method, /coins.bench.v1.Echo/Echo, passes bytes through (no (de)serializers); with
`--forward`, each call is relayed to the echo at HOST:PORT and its answer returned (the 2-hop chain).

Flavours:
  plain   plaintext, no telemetry, a plain channel to the next hop: what gRPC itself costs.
  suite   what the services pay besides their own work: the suite's mutual TLS
          (runtime.tls.server_credentials with `identity`'s certificate), the same OpenTelemetry server
          interceptor and server options as runtime.server.start_service, and the next hop reached
          through runtime.clients.service_channel (mutual TLS, the OpenTelemetry client interceptors,
          the retry policy, the user's token passed on and the deadline propagated), as gifting
          reaches the wallet.

The event loop is the one the services run on: runtime.server.run (see `run` here).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
import logging
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio

import runtime.server
from runtime.auth import AUTHORIZATION
from runtime.clients import downstream_timeout, service_channel
from runtime.config import SecuritySettings
from runtime.telemetry import make_tracer_provider, server_tracing
from runtime.tls import server_credentials

SERVICE = "coins.bench.v1.Echo"
METHOD = f"/{SERVICE}/Echo"
READY = "READY"
T = TypeVar("T")
DOWNSTREAM_TIMEOUT_SECONDS = 5.0
"""The services' default downstream_timeout_seconds."""


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on the event loop the services run on: through the services' own
    helper, runtime.server.run (uvloop), when there is one, else as their main() did before it
    (uvloop when runtime.server uses it, else asyncio.run)."""
    helper = getattr(runtime.server, "run", None)
    if callable(helper):
        answer: list[T] = []

        async def keep() -> None:
            answer.append(await main)

        helper(keep())
        return answer[0]
    if _mentions_uvloop():
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def _mentions_uvloop() -> bool:
    try:
        source = inspect.getsource(runtime.server)
    except OSError:
        return False
    return "uvloop" in source and importlib.util.find_spec("uvloop") is not None


def running_loop_name() -> str:
    """`uvloop` or `asyncio`: what the current event loop is (call it inside `run`)."""
    return "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"


def _handler(behavior: Any) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(behavior)}
    )


async def serve(flavour: str, identity: str, certs: Path, forward: str | None, port: int) -> None:
    security = SecuritySettings(certs_dir=certs, dev_pki=False)
    next_hop: grpc.aio.Channel | None = None
    if flavour == "suite":
        provider = make_tracer_provider(f"echo-{identity}")
        server = grpc.aio.server(
            interceptors=[server_tracing(provider)],
            options=[
                ("grpc.max_receive_message_length", 1024 * 1024),
                ("grpc.max_send_message_length", 1024 * 1024),
            ],
            maximum_concurrent_rpcs=2000,
        )
        port = server.add_secure_port(f"127.0.0.1:{port}", server_credentials(security, identity))
        if forward:
            next_hop = service_channel(forward, security, identity, provider)
    else:
        server = grpc.aio.server()
        port = server.add_insecure_port(f"127.0.0.1:{port}")
        if forward:
            next_hop = grpc.aio.insecure_channel(forward)

    if next_hop is None:

        async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            return request

        server.add_generic_rpc_handlers((_handler(echo),))
    elif flavour == "suite":
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = next_hop.unary_unary(METHOD)

        async def relay(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            token = tuple(
                (key, value)
                for key, value in context.invocation_metadata() or ()
                if key == AUTHORIZATION
            )
            answer: bytes = await call(
                request,
                metadata=token,
                timeout=downstream_timeout(context, DOWNSTREAM_TIMEOUT_SECONDS),
            )
            return answer

        server.add_generic_rpc_handlers((_handler(relay),))
    else:
        plain_call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = next_hop.unary_unary(METHOD)

        async def plain_relay(
            request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
        ) -> bytes:
            answer: bytes = await plain_call(request)
            return answer

        server.add_generic_rpc_handlers((_handler(plain_relay),))

    if port == 0:
        raise SystemExit("echo: cannot listen on 127.0.0.1")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"{READY} {port}", flush=True)
    await stop.wait()
    await server.stop(0.5)
    if next_hop is not None:
        await next_hop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="echo server for benchmarks.perf")
    parser.add_argument("--flavour", choices=["plain", "suite"], required=True)
    parser.add_argument("--identity", default="wallet", help="certificate to serve with (suite)")
    parser.add_argument("--certs", type=Path, default=Path("certs"))
    parser.add_argument("--forward", help="relay every call to the echo at HOST:PORT")
    parser.add_argument("--port", type=int, default=0, help="where to listen (0: a free port)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    run(serve(args.flavour, args.identity, args.certs, args.forward, args.port))


if __name__ == "__main__":
    main()
