"""The schema and operations calls of a router: each asked of every shard, answers joined.

`Operations` answers DeclareAttributes and GetSchema (the cluster's schema registry
first, shards/schema.py, then every shard), Snapshot (every shard's, with each one's log
position) and Stats (summed, with each shard's address, profiles and epoch in `info`), and
registers at start-up what the shards declared before the registry existed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc

from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc
from shards.calls import Background, Code, abort, fail, time_left
from shards.fanout import FanOut
from shards.queries import union_schema
from shards.schema import ClusterSchema
from shards.shard_map import ShardState

log = logging.getLogger("memstore.router")
REPLICA_POLL = 0.2  # seconds between looks at a lagging replica's position
REPLICA_WAIT = 30.0  # seconds a replica may take to catch up with its primary's snapshot


class Operations:
    """Schema and operations calls over `fan`, declarations registered in `schema`."""

    def __init__(self, fan: FanOut, schema: ClusterSchema) -> None:
        self.fan = fan
        self.map = fan.map
        self.schema = schema

    async def declare_attributes(self, request: pb.DeclareAttributesRequest, context: Any
                                 ) -> pb.SchemaResponse:
        """The registry first: a declaration that differs from the cluster's is refused
        before any shard changed; then every reachable shard (one that is down declares
        it before a write of it applies there, shards/schema.py)."""
        for i, spec in enumerate(request.attributes):
            if spec.kind == pb.KIND_UNSPECIFIED:
                await fail(context, Code.INVALID_ARGUMENT, f"attributes[{i}]: kind is not set")
        try:
            specs = await self.schema.declare(request.attributes, context)
        except ValueError as exc:
            await fail(context, Code.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # noqa: BLE001 - abort re-raises what it cannot map
            await abort(context, exc)
        timeout = time_left(context)
        declared = pb.DeclareAttributesRequest(attributes=specs)

        def call(shard: ShardState) -> Any:
            return shard.stub.DeclareAttributes(declared, timeout=timeout)

        answers, _ = await self.fan.every(context, call, allow_partial=True)
        return union_schema(r for _, r in answers)

    async def get_schema(self, request: pb.GetSchemaRequest, context: Any) -> pb.SchemaResponse:
        timeout = time_left(context)

        def call(shard: ShardState) -> Any:
            return shard.reader.GetSchema(request, timeout=timeout)

        answers, _ = await self.fan.every(context, call)
        return union_schema(r for _, r in answers)

    async def snapshot(self, request: pb.SnapshotRequest, context: Any) -> pb.SnapshotResponse:
        """Every shard snapshots, then each replica following one (its Stats lists them)
        once it has applied the log up to its primary's snapshot: erased data leaves the
        replicas' disks with the same call (docs/data-rights.md). A replica's position
        is listed as "<shard>/<replica name>"; one that cannot be reached or does not
        catch up within the deadline fails the call UNAVAILABLE (the shards' snapshots
        are taken all the same)."""
        timeout = time_left(context)

        def call(shard: ShardState) -> Any:
            return shard.stub.Snapshot(request, timeout=timeout)

        answers, _ = await self.fan.every(context, call)
        positions = {s.label: r.log_position for s, r in answers}
        paths = [r.path for _, r in answers]
        try:
            for found in await asyncio.gather(*(
                    self._snapshot_replicas(shard, answer.log_position, request, context)
                    for shard, answer in answers)):
                for label, answer in found:
                    positions[label] = answer.log_position
                    paths.append(answer.path)
        except grpc.aio.AioRpcError as exc:
            await fail(context, Code.UNAVAILABLE, f"the shards' snapshots were taken, but a "
                       f"replica's was not: {exc.details() or exc.code().name}")
        except TimeoutError as exc:
            await fail(context, Code.UNAVAILABLE, f"the shards' snapshots were taken, but {exc}")
        return pb.SnapshotResponse(path=";".join(paths), shard_positions=positions,
                                   profiles=sum(r.profiles for _, r in answers))

    async def _snapshot_replicas(self, shard: ShardState, position: int,
                                 request: pb.SnapshotRequest, context: Any
                                 ) -> list[tuple[str, Any]]:
        """Snapshot each replica of `shard` once it has applied the log to `position`
        (a replica's positions are its primary's): [(label, SnapshotResponse)]."""
        stats = await shard.stub.Stats(pb.StatsRequest(), timeout=time_left(context))
        info = dict(stats.info)
        replicas = sorted((info.get(key.removesuffix(".address") + ".name") or value, value)
                          for key, value in info.items()
                          if key.startswith("replication.replica.") and key.endswith(".address")
                          and value)
        taken: list[tuple[str, Any]] = []
        for name, address in replicas:
            channel = self.map.credentials.aio_channel(address)
            try:
                stub = memstore_pb2_grpc.MemstoreStub(channel)
                give_up = time.monotonic() + min(REPLICA_WAIT, time_left(context) or REPLICA_WAIT)
                while True:  # (its Stats is cheap; a snapshot is not)
                    replica = await stub.Stats(pb.StatsRequest(), timeout=time_left(context))
                    at = int(replica.info.get("log.position", "0"))
                    if at >= position:
                        break
                    if time.monotonic() + REPLICA_POLL > give_up:
                        raise TimeoutError(f"replica {name} of {shard.label} is at position "
                                           f"{at}, behind {position}")
                    await asyncio.sleep(REPLICA_POLL)  # it is catching up
                answer = await stub.Snapshot(request, timeout=time_left(context))
                taken.append((f"{shard.label}/{name}", answer))
            finally:
                await channel.close()
        return taken

    async def stats(self, request: pb.StatsRequest, context: Any) -> pb.StatsResponse:
        timeout = time_left(context)

        def call(shard: ShardState) -> Any:
            return shard.stub.Stats(request, timeout=timeout)

        answers, missing = await self.fan.every(context, call, allow_partial=True)
        info = {"role": "router", "shards": str(len(self.map.shards)),
                "missing_shards": ",".join(missing)}
        for shard, r in answers:
            info[f"shard.{shard.label}.address"] = shard.address
            info[f"shard.{shard.label}.profiles"] = str(r.profiles)
            info[f"shard.{shard.label}.epoch"] = str(shard.epoch)
        return pb.StatsResponse(
            profiles=sum(r.profiles for _, r in answers),
            identifiers=sum(r.identifiers for _, r in answers),
            attributes=max((r.attributes for _, r in answers), default=0),
            log_bytes=sum(r.log_bytes for _, r in answers), shard="router", info=info)

    async def bootstrap_schema(self) -> None:
        """Register what the shards declared before the schema registry existed (best
        effort: a router starting without some shards registers theirs as they write)."""
        reachable = [s for s in self.map.shards if s.reachable]
        try:
            schemas = [(s, await s.stub.GetSchema(pb.GetSchemaRequest(), timeout=5.0))
                       for s in reachable]
            conflicts = await self.schema.bootstrap(schemas, Background())
        except Exception as exc:  # noqa: BLE001 - writes register what they need anyway
            log.warning("could not read the shards' schemas at start-up: %s", exc)
            return
        for line in conflicts:
            log.warning("schema conflict from before the registry: %s; writes follow the "
                        "registry", line)
