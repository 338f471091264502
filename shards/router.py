"""The router: memstore.v1.Memstore for a whole cluster, by forwarding and merging.

It holds no data and no state of its own beyond a cached `ShardMap` and one channel per
shard. `RouterService` is the gRPC servicer: each RPC is answered by the part of the
router whose job it is, built here around one slot map:

    calls       what a call to a shard means: exceptions, trailers, deadlines, retries
    routing     calls to the owner of a key's slot: following slot moves, merged-away
                ids, merge holds and missing declarations; batches split by owner
    fanout      calls to every shard at once, exact over a stable partition of the slots
    queries     Count, GroupBy, QueryBitmap, QueryIds, StreamIds; checking a query once
    reads       Get, BatchGet; finding the profile that holds an identifier
    replica_reads  reads answered by the shards' replicas (--read-from replica)
    writes      Upsert, Link, Track, TrackBatch, BatchUpsert; cross-shard merges first
    erasure     Delete, EraseProfiles (and retention's sweeps)
    segments    CreateSegment, DeleteSegment, ListSegments, WatchSegments, WatchChanges
    operations  DeclareAttributes, GetSchema, Snapshot, Stats
    admin       RouterAdmin: shards joining and leaving
    server      the gRPC server around it all: start, serve, stop

with the identifier directory (shards/directory.py), the schema registry
(shards/schema.py) and the merge protocol (shards/merge.py) beside them.

Errors: a shard that is down gives UNAVAILABLE naming it; fan-outs fail with UNAVAILABLE
unless the request sets allow_partial, and then list the shards in missing_shards. Other
shard errors pass through with their code and message. The caller's remaining deadline
goes to every shard call, and a call waits out a moving slot map for up to MOVE_WAIT
seconds within it (shards/calls.py).

Hostile input: queries are bounded by the router's `QueryLimits` before any shard is asked
(give shards the same ones), the texts it remembers by bytes (shards/text_cache.py), and
every status message by MAX_STATUS_BYTES; requests that do not parse are INVALID_ARGUMENT
and an exception no handler maps is INTERNAL (memstore/server/guard.py), never UNKNOWN.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from memstore.query import DEFAULT_LIMITS, QueryLimits
from memstore.server.link import LinkServer
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc
from shards import export
from shards.admin import RouterAdmin
from shards.directory import Directory
from shards.erasure import Erasure
from shards.fanout import FanOut
from shards.operations import Operations
from shards.queries import Queries
from shards.reads import Reads
from shards.replica_reads import READ_FROM, replica_read
from shards.routing import Routing
from shards.segments import Segments
from shards.shard_map import ShardMap, ShardState
from shards.text_cache import TextCache
from shards.writes import Writes


class RouterService(memstore_pb2_grpc.MemstoreServicer):
    """Memstore for the cluster on `shard_map`: each RPC handed to the part whose job it
    is (the module's docstring lists them). `limits`: the size of work one query may ask
    for (give the shards the same); `on_membership` hears the shard list after a shard
    joined or left; `read_from`: where reads go unless the call says
    (shards/replica_reads.py)."""

    def __init__(self, shard_map: ShardMap,
                 on_membership: Callable[[list[str]], None] | None = None,
                 limits: QueryLimits = DEFAULT_LIMITS, read_from: str = "primary") -> None:
        if read_from not in READ_FROM:
            raise ValueError(f"read_from={read_from!r}: \"primary\" or \"replica\"")
        self.map = shard_map
        self.read_from = read_from
        self.limits = limits
        self.routing = Routing(shard_map)  # calls to slot owners; the schema registry
        self.schema = self.routing.schema  # the cluster's schema registry (shards/schema.py)
        self.directory = Directory(self.routing)  # the identifier directory
        self.fan = FanOut(self.routing)  # calls to every shard at once
        self._texts = TextCache()  # query text -> the attributes it names
        self.queries = Queries(self.fan, limits, self._texts)
        self.reads = Reads(self.routing, self.directory)
        self.writes = Writes(self.routing, self.directory, self.reads)
        self.erasure = Erasure(self.routing, self.fan, self.directory, self.reads,
                               self.queries)
        self.segments = Segments(self.fan, self.queries)
        self.operations = Operations(self.fan, self.schema)
        self.admin = RouterAdmin(shard_map, self.directory, on_membership)
        self.sweeper: asyncio.Task[None] | None = None  # routing.sweep, while serving
        self.link: LinkServer | None = None  # clients' unary calls (memstore/server/link.py)
        self.retention: Any = None  # shards/retention.py, with --anonymous-ttl
        self.retention_task: asyncio.Task[None] | None = None
        self.coordinated: asyncio.Task[None] | None = None  # --coordinator: etcd's primaries

    # ------------------------------------------------------------------ profiles
    async def Upsert(self, request: pb.UpsertRequest, context: Any) -> pb.UpsertResponse:
        return await self.writes.upsert(request, context)

    async def Link(self, request: pb.LinkRequest, context: Any) -> pb.LinkResponse:
        return await self.writes.link(request, context)

    async def Track(self, request: pb.TrackRequest, context: Any) -> pb.TrackResponse:
        return await self.writes.track(request, context)

    async def TrackBatch(self, request: pb.TrackBatchRequest, context: Any
                         ) -> pb.TrackBatchResponse:
        return await self.writes.track_batch(request, context)

    async def BatchUpsert(self, request: pb.BatchUpsertRequest, context: Any
                          ) -> pb.BatchUpsertResponse:
        return await self.writes.batch_upsert(request, context)

    @replica_read
    async def Get(self, request: pb.GetRequest, context: Any) -> pb.GetResponse:
        return await self.reads.get(request, context)

    @replica_read
    async def BatchGet(self, request: pb.BatchGetRequest, context: Any) -> pb.BatchGetResponse:
        return await self.reads.batch_get(request, context)

    async def Delete(self, request: pb.DeleteRequest, context: Any) -> pb.DeleteResponse:
        return await self.erasure.delete(request, context)

    # ------------------------------------------------------------------ data rights
    async def ExportProfile(self, request: pb.ExportProfileRequest, context: Any
                            ) -> pb.ExportProfileResponse:
        return await export.export_profile(self, request, context)

    async def ExportProfiles(self, request: pb.ExportProfilesRequest, context: Any
                             ) -> AsyncIterator[pb.ExportProfilesChunk]:
        async for chunk in export.export_profiles(self, request, context):  # shards/export.py
            yield chunk

    async def EraseProfiles(self, request: pb.EraseProfilesRequest, context: Any
                            ) -> AsyncIterator[pb.EraseProfilesChunk]:
        async for chunk in self.erasure.erase_profiles(request, context):
            yield chunk

    def erase_on(self, shards: list[tuple[ShardState, int]],
                 request: pb.EraseProfilesRequest, context: Any
                 ) -> AsyncIterator[pb.EraseProfilesChunk | None]:
        """Retention's erasures (shards/retention.py): Erasure.erase_on."""
        return self.erasure.erase_on(shards, request, context)

    # ------------------------------------------------------------------ schema
    async def DeclareAttributes(self, request: pb.DeclareAttributesRequest, context: Any
                                ) -> pb.SchemaResponse:
        return await self.operations.declare_attributes(request, context)

    @replica_read
    async def GetSchema(self, request: pb.GetSchemaRequest, context: Any) -> pb.SchemaResponse:
        return await self.operations.get_schema(request, context)

    # ------------------------------------------------------------------ queries
    @replica_read
    async def Count(self, request: pb.QueryRequest, context: Any) -> pb.CountResponse:
        return await self.queries.count(request, context)

    @replica_read
    async def GroupBy(self, request: pb.GroupByRequest, context: Any) -> pb.GroupByResponse:
        return await self.queries.group_by(request, context)

    @replica_read
    async def QueryBitmap(self, request: pb.QueryRequest, context: Any) -> pb.BitmapResponse:
        return await self.queries.query_bitmap(request, context)

    @replica_read
    async def QueryIds(self, request: pb.QueryIdsRequest, context: Any) -> pb.QueryIdsResponse:
        return await self.queries.query_ids(request, context)

    async def StreamIds(self, request: pb.QueryIdsRequest, context: Any
                        ) -> AsyncIterator[pb.QueryIdsResponse]:
        async for page in self.queries.stream_ids(request, context):
            yield page

    # ------------------------------------------------------------------ saved segments
    async def CreateSegment(self, request: pb.CreateSegmentRequest, context: Any
                            ) -> pb.SegmentInfo:
        return await self.segments.create_segment(request, context)

    async def DeleteSegment(self, request: pb.DeleteSegmentRequest, context: Any
                            ) -> pb.DeleteSegmentResponse:
        return await self.segments.delete_segment(request, context)

    @replica_read
    async def ListSegments(self, request: pb.ListSegmentsRequest, context: Any
                           ) -> pb.ListSegmentsResponse:
        return await self.segments.list_segments(request, context)

    async def WatchSegments(self, request: pb.WatchSegmentsRequest, context: Any
                            ) -> AsyncIterator[pb.WatchSegmentsResponse]:
        async for message in self.segments.watch_segments(request, context):
            yield message

    async def WatchChanges(self, request: pb.WatchChangesRequest, context: Any
                           ) -> AsyncIterator[pb.WatchChangesResponse]:
        async for message in self.segments.watch_changes(request, context):
            yield message

    # ------------------------------------------------------------------ operations
    async def Snapshot(self, request: pb.SnapshotRequest, context: Any) -> pb.SnapshotResponse:
        return await self.operations.snapshot(request, context)

    async def Stats(self, request: pb.StatsRequest, context: Any) -> pb.StatsResponse:
        return await self.operations.stats(request, context)

    # ------------------------------------------------------------------ for other modules
    async def routed(self, items: list[tuple[str, Any]], method: str,
                     build: Callable[[list[Any]], Any], context: grpc.aio.ServicerContext,
                     retarget: Callable[[Any, str], Any] | None = None, control: bool = False
                     ) -> list[tuple[list[Any], Any]]:
        """Routing.routed: (key, item) pairs in one request per owning shard."""
        return await self.routing.routed(items, method, build, context, retarget, control)
