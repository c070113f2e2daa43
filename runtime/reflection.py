"""Server reflection, so that grpcurl, `buf curl` and Postman can call the services with nothing but
the address: under both of its names (v1alpha, which grpcio-reflection ships, and v1), and on the
plaintext health port for health alone."""

from __future__ import annotations

import contextlib
import functools

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
INFO_METHODS = tuple(
    f"/{name}/ServerReflectionInfo" for name in (reflection.SERVICE_NAME, REFLECTION_V1)
)
"""The one (streaming) method of reflection, under both of its names."""


@functools.cache
def _reflection_v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc.reflection.v1 as a file (grpcio-reflection ships only v1alpha's), so that reflection can
    describe the v1 service it lists: `grpcurl describe` and `buf curl --list-methods` failed on
    it. The file is v1alpha's, renamed: the messages are the same."""
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old, new = "grpc.reflection.v1alpha", "grpc.reflection.v1"
    file.name = "grpc/reflection/v1/reflection.proto"
    file.package = new
    for service in file.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    for message in file.message_type:
        for each in message.field:
            if each.type_name:  # (set to "" it would mark a string field as a message's)
                each.type_name = each.type_name.replace(old, new)
    return file


def _add(pool: descriptor_pool.DescriptorPool, file: descriptor_pb2.FileDescriptorProto) -> None:
    with contextlib.suppress(TypeError):  # already there (a test process starts many servers)
        pool.Add(file)


def _as_proto(file: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    return proto


@functools.cache
def _health_only_pool() -> descriptor_pool.DescriptorPool:
    """A pool that knows health and reflection and nothing else: the plaintext health port answers
    anyone who reaches it, and must not describe the service's contract (its internal RPCs
    included), which the API port gives only to callers with a platform certificate."""
    pool = descriptor_pool.DescriptorPool()
    _add(pool, _as_proto(health_pb2.DESCRIPTOR))
    _add(pool, _as_proto(reflection_pb2.DESCRIPTOR))
    _add(pool, _reflection_v1_file())
    return pool


def enable_reflection(
    service_names: tuple[str, ...], server: grpc.aio.Server, *, health_only: bool = False
) -> None:
    """Server reflection under both of its names: v1alpha (grpcio-reflection's) and v1, which
    clients that speak only v1 ask for. The two protocols' messages are the same on the wire
    (v1 renamed the package), so one servicer answers both. `health_only`: describe health and
    reflection alone (the plaintext probe port), whatever else the process has loaded."""
    if health_only:
        pool = _health_only_pool()
    else:
        pool = descriptor_pool.Default()
        _add(pool, _reflection_v1_file())
    names = (*service_names, reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = reflection.aio.ReflectionServicer(names, pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                REFLECTION_V1,
                {
                    "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                        servicer.ServerReflectionInfo,
                        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
                    )
                },
            ),
        )
    )
