"""What the suite's channels send again by themselves, and what `Refusal.retryable` tells a caller
to: calls that did nothing (UNAVAILABLE, and CANCELLED by a stopping server: a review saw 7-12 per
graceful stop under callers that never pause), never a caller's own cancel or a definite refusal."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from cli.client import Refusal
from coins.gifting.v1 import gifting_pb2
from coins.payout.v1 import payout_pb2
from coins.promotion.v1 import promotion_pb2
from coins.wallet.v1 import wallet_pb2
from runtime.channels import SERVICE_CONFIG, STREAMS

METHOD = "/test.Echo/Say"


def _say(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(METHOD)


class _Echo:
    """Answers each call with what the next item of `answers` says: a status code to end it with,
    or None to answer."""

    def __init__(self, answers: list[grpc.StatusCode | None]) -> None:
        self.answers = answers
        self.calls = 0

    async def say(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.calls += 1
        code = self.answers.pop(0) if self.answers else None
        if code is not None:
            await context.abort(code, "stopping")
        return request


@contextlib.asynccontextmanager
async def serving(
    service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
) -> AsyncIterator[grpc.aio.Channel]:
    """A plaintext server of `handlers` on a loopback port, and a channel to it with the suite's
    service config."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.enable_retries", 1), ("grpc.service_config", SERVICE_CONFIG)],
    )
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(None)


@pytest.fixture
async def echo() -> AsyncIterator[tuple[_Echo, grpc.aio.Channel]]:
    servicer = _Echo([])
    async with serving(
        "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(servicer.say)}
    ) as channel:
        yield servicer, channel


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
async def test_a_call_that_did_nothing_is_sent_again_by_the_channel(
    echo: tuple[_Echo, grpc.aio.Channel], code: grpc.StatusCode
) -> None:
    servicer, channel = echo
    servicer.answers = [code, code]
    answer = await _say(channel)(b"gift", timeout=5)
    assert answer == b"gift" and servicer.calls == 3


async def test_a_definite_refusal_is_not_sent_again(echo: tuple[_Echo, grpc.aio.Channel]) -> None:
    servicer, channel = echo
    servicer.answers = [grpc.StatusCode.FAILED_PRECONDITION]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _say(channel)(b"gift", timeout=5)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and servicer.calls == 1


async def test_a_callers_own_cancel_is_not_sent_again(echo: tuple[_Echo, grpc.aio.Channel]) -> None:
    servicer, channel = echo
    call = _say(channel)(b"gift", timeout=5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert servicer.calls <= 1


def _refusal(code: grpc.StatusCode) -> Refusal:
    return Refusal.of(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "x"))


def test_a_refusal_says_a_stopping_servers_cancel_is_worth_sending_again() -> None:
    assert _refusal(grpc.StatusCode.CANCELLED).retryable
    assert _refusal(grpc.StatusCode.UNAVAILABLE).retryable
    assert not _refusal(grpc.StatusCode.FAILED_PRECONDITION).retryable
    assert not _refusal(grpc.StatusCode.INTERNAL).retryable


def test_every_stream_of_the_contracts_is_left_out_of_the_retry_policy() -> None:
    streams = {
        (service.full_name, method.name)
        for module in (wallet_pb2, gifting_pb2, payout_pb2, promotion_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
        if method.server_streaming or method.client_streaming
    }
    assert streams == set(STREAMS)


async def test_a_refused_stream_is_not_sent_again_by_the_channel() -> None:
    """A stream refused UNAVAILABLE is the caller's to resume (from its cursor), never the retry
    policy's: grpcio could leave such a retried stream hanging for good."""
    calls = 0

    async def watch(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> Any:
        nonlocal calls
        calls += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "stopping")
        yield b""  # pragma: no cover

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "WatchLive": grpc.unary_stream_rpc_method_handler(watch)
    }
    async with serving("coins.gifting.v1.GiftingService", handlers) as channel:
        watching: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            "/coins.gifting.v1.GiftingService/WatchLive"
        )
        stream = watching(b"", timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stream:
                pass
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and calls == 1
