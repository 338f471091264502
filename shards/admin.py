"""RouterAdmin: how the cluster tools tell a router about shards joining and leaving.

JSON over gRPC, no proto (memstore.hashslot.ADMIN_SERVICE): ListShards, AddShard,
RemoveShard and RebuildDirectory. The shards themselves are the truth about slots; a
router only learns whom to ask. `RouterAdmin` is the server side, `handler` serves it,
`admin_call` is the client side the cluster commands use.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc

from memstore.hashslot import ADMIN_SERVICE
from memstore.server.security import Credentials
from shards.calls import Background, Code, fail
from shards.directory import Directory
from shards.shard_map import CHANNEL_OPTIONS, ShardMap

METHODS = ("ListShards", "AddShard", "RemoveShard", "RebuildDirectory")


class RouterAdmin:
    """A router's admin calls on `shard_map`; `on_membership` hears the new shard list
    after a shard joined or left (the supervisor remembers it)."""

    def __init__(self, shard_map: ShardMap, directory: Directory,
                 on_membership: Callable[[list[str]], None] | None = None) -> None:
        self.map = shard_map
        self.directory = directory
        self.on_membership = on_membership

    async def call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        if method == "RebuildDirectory":
            return await self.directory.rebuild(Background())
        if method == "AddShard":
            await self.map.join(str(body["address"]))
        elif method == "RemoveShard":
            await self.map.remove(str(body["name"]))
        elif method != "ListShards":
            raise ValueError(f"unknown admin method {method}")
        await self.map.refresh()
        if method != "ListShards" and self.on_membership is not None:
            self.on_membership([s.address for s in self.map.shards])
        return {"shards": self.map.describe(), "exact": self.map.exact}


def handler(admin: RouterAdmin) -> grpc.GenericRpcHandler:
    """The RouterAdmin service, for a router's gRPC server."""
    def method_handler(method: str) -> grpc.RpcMethodHandler:
        async def call(body: dict[str, Any], context: grpc.aio.ServicerContext
                       ) -> dict[str, Any]:
            try:
                return await admin.call(method, body)
            except (ValueError, KeyError, TypeError) as exc:
                await fail(context, Code.INVALID_ARGUMENT, str(exc))

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=lambda b: json.loads(b or b"{}"),
            response_serializer=lambda d: json.dumps(d).encode())

    return grpc.method_handlers_generic_handler(
        ADMIN_SERVICE, {m: method_handler(m) for m in METHODS})


async def admin_call(address: str, method: str, body: dict[str, Any] | None = None,
                     timeout: float = 10.0, credentials: Credentials | None = None
                     ) -> dict[str, Any]:
    """Client side of RouterAdmin, for the cluster commands."""
    credentials = credentials or Credentials()
    async with credentials.aio_channel(address, CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(f"/{ADMIN_SERVICE}/{method}",
                                   request_serializer=lambda d: json.dumps(d).encode(),
                                   response_deserializer=json.loads)
        return await call(body or {}, timeout=timeout)  # type: ignore[no-any-return]
