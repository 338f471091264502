"""Server reflection, so `grpcurl list` and friends work: both `grpc.reflection.v1` (what
current tools ask first) and `grpc.reflection.v1alpha` (older tools).

grpcio-reflection ships the v1alpha service only. The v1 messages are the v1alpha messages
under another package name, field for field, so v1 is served by the same servicer through
a generic handler whose (de)serializers are the v1alpha message classes.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

V1_SERVICE = "grpc.reflection.v1.ServerReflection"


def enable(server: grpc.aio.Server, services: Iterable[str]) -> None:
    """Serve reflection of `services` (full names) on `server`, v1 and v1alpha."""
    names = (*services, reflection.SERVICE_NAME, V1_SERVICE)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection.enable_server_reflection(names, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=v1alpha.ServerReflectionRequest.FromString,
            response_serializer=v1alpha.ServerReflectionResponse.SerializeToString)}),))
