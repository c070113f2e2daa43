"""Every service answers the standard gRPC health checks and lists its contract through reflection."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.suite import Suite

SERVICES = {
    "wallet": "coins.wallet.v1.WalletService",
    "gifting": "coins.gifting.v1.GiftingService",
    "payout": "coins.payout.v1.PayoutService",
    "promotion": "coins.promotion.v1.PromotionService",
}


@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_health_is_serving_to_platform_callers_and_plaintext_probes(
    suite: Suite, name: str
) -> None:
    for channel in (suite.channel(name), suite.health_channel(name)):
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICES[name]):
            response = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        # List (in grpc.health.v1, and listed by reflection) answers every service's status.
        listing = await health.List(health_pb2.HealthListRequest())
        statuses = {s: r.status for s, r in listing.statuses.items()}
        assert statuses.items() >= {
            ("", health_pb2.HealthCheckResponse.SERVING),
            (SERVICES[name], health_pb2.HealthCheckResponse.SERVING),
        }


@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_the_plaintext_probe_port_serves_nothing_but_health(suite: Suite, name: str) -> None:
    # Reflection there describes health alone, so a reflection-based client (grpcurl, buf curl)
    # can check it with nothing else at hand.
    reflection = reflection_pb2_grpc.ServerReflectionStub(suite.health_channel(name))
    listing = [
        r
        async for r in reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    ]
    listed = {s.name for s in listing[0].list_services_response.service}
    assert listed == {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
    # Every service it lists can be described (`grpcurl describe`, `buf curl --list-methods`
    # describe each: they failed on v1, which grpcio-reflection does not ship).
    described = [
        r
        async for r in reflection.ServerReflectionInfo(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=s)
                    for s in sorted(listed)
                ]
            )
        )
    ]
    for service, answer in zip(sorted(listed), described, strict=True):
        assert answer.WhichOneof("message_response") == "file_descriptor_response", (
            service,
            answer.error_response.error_message,
        )
    # Nor does it describe the service's contract to whoever reaches it without a certificate
    # (the API port's reflection does, to platform callers).
    for symbol in (SERVICES[name], "coins.common.v1.AdminAuditService", "buf.validate.FieldRules"):
        hidden = [
            r
            async for r in reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)])
            )
        ]
        assert hidden[0].WhichOneof("message_response") == "error_response", symbol
        assert hidden[0].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    method = f"/{SERVICES[name]}/{'ListGifts' if name == 'gifting' else 'GetBalance'}"
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = suite.health_channel(name).unary_unary(
        method
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"")
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_reflection_describes_the_contract(suite: Suite, name: str) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(suite.channel(name))
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICES[name]),
    ]
    responses = [r async for r in stub.ServerReflectionInfo(iter(requests))]
    listed = {s.name for s in responses[0].list_services_response.service}
    assert SERVICES[name] in listed
    assert "grpc.health.v1.Health" in listed
    files = responses[1].file_descriptor_response.file_descriptor_proto
    assert files, "reflection returned no file descriptor for the service"


@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_reflection_answers_clients_that_speak_only_v1(suite: Suite, name: str) -> None:
    """grpc.reflection.v1 (what newer grpcurl, Postman and grpc-js tools ask first) answers as
    v1alpha does: its messages are the same on the wire."""
    v1 = suite.channel(name).stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICES[name]),
    ]
    responses = [r async for r in v1(iter(requests))]
    listed = {s.name for s in responses[0].list_services_response.service}
    assert {SERVICES[name], "grpc.reflection.v1.ServerReflection"} <= listed
    assert responses[1].file_descriptor_response.file_descriptor_proto
