"""Saved segments and change streams through a router.

`Segments` answers CreateSegment, DeleteSegment and ListSegments over every shard, and
WatchSegments and WatchChanges by merging every shard's stream into one resumable
stream (shards/watch.py). A segment is created on every shard or on none: a shard that
refuses (or is down) has the others forget it again, and the router fixes the creation
time so every shard records the same. A segment's members are the sum of its members on
each shard.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from memstore.errors import InvalidArgument
from memstore.hashslot import CLUSTER_SCHEMA
from memstore.query import QueryError, format_query, query_from_request
from memstore.query.ast import refused_query
from memstore.server.watch import OutOfRange
from memstore.v1 import memstore_pb2 as pb
from shards import watch
from shards.calls import Code, Down, abort, fail, time_left
from shards.fanout import FanOut
from shards.queries import Queries
from shards.shard_map import ShardState


class Segments:
    """Saved segments and watches over `fan`; `queries` checks the queries they name."""

    def __init__(self, fan: FanOut, queries: Queries) -> None:
        self.fan = fan
        self.map = fan.map
        self.queries = queries

    async def create_segment(self, request: pb.CreateSegmentRequest, context: Any
                             ) -> pb.SegmentInfo:
        """Every shard or none: a shard that refuses (or is down) has the others forget
        it again. The router fixes the creation time, so every shard records the same."""
        try:
            node = query_from_request(request.query)
        except QueryError as exc:
            await fail(context, Code.INVALID_ARGUMENT, refused_query(exc))
        if not request.query.unknown_attribute_is_empty:  # (the caller allows unknown)
            await self.queries.lenient(request.query, context)  # a typo: INVALID_ARGUMENT
        # Shards that never saw an attribute it names hold nobody for it (yet).
        sub = pb.CreateSegmentRequest(name=request.name, query=pb.QueryRequest(
            text=format_query(node), unknown_attribute_is_empty=True))
        sub.created_at.GetCurrentTime()
        timeout = time_left(context)
        shards = await self.fan.stable(context, allow_partial=False)
        outcomes = await asyncio.gather(*(
            s.stub.CreateSegment(sub, timeout=timeout) for s, _ in shards),
            return_exceptions=True)
        failed = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failed is not None:
            undo = pb.DeleteSegmentRequest(name=request.name)
            for (shard, _), outcome in zip(shards, outcomes, strict=True):
                if not isinstance(outcome, BaseException):
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await shard.stub.DeleteSegment(undo, timeout=5.0)
            if isinstance(failed, grpc.aio.AioRpcError) and \
                    failed.code() == Code.UNAVAILABLE:
                await fail(context, Code.UNAVAILABLE, f"segment {request.name!r} not "
                           f"created: a shard is unavailable ({failed.details()})")
            await abort(context, failed)
        infos = [o for o in outcomes if isinstance(o, pb.SegmentInfo)]
        return _sum_segment(infos)

    async def delete_segment(self, request: pb.DeleteSegmentRequest, context: Any
                             ) -> pb.DeleteSegmentResponse:
        timeout = time_left(context)

        def call(shard: ShardState) -> Any:
            return shard.stub.DeleteSegment(request, timeout=timeout)

        answers, _ = await self.fan.every(context, call)
        return pb.DeleteSegmentResponse(deleted=any(r.deleted for _, r in answers))

    async def list_segments(self, request: pb.ListSegmentsRequest, context: Any
                            ) -> pb.ListSegmentsResponse:
        timeout = time_left(context)

        def call(shard: ShardState) -> Any:
            return shard.reader.ListSegments(request, timeout=timeout)

        answers, missing = await self.fan.every(context, call, request.allow_partial)
        by_name: dict[str, list[pb.SegmentInfo]] = {}
        for _, response in answers:
            for info in response.segments:
                by_name.setdefault(info.name, []).append(info)
        return pb.ListSegmentsResponse(segments=[_sum_segment(by_name[n])
                                                 for n in sorted(by_name)],
                                       missing_shards=missing)

    async def watch_segments(self, request: pb.WatchSegmentsRequest, context: Any
                             ) -> AsyncIterator[pb.WatchSegmentsResponse]:
        async for message in self._watch(request, context, "WatchSegments", "events",
                                         pb.WatchSegmentsResponse):
            yield message

    async def watch_changes(self, request: pb.WatchChangesRequest, context: Any
                            ) -> AsyncIterator[pb.WatchChangesResponse]:
        if request.HasField("query"):
            lenient = await self.queries.lenient(request.query, context)
            request = pb.WatchChangesRequest(query=lenient, attributes=request.attributes,
                                             from_position=request.from_position,
                                             initial=request.initial)
        async for message in self._watch(request, context, "WatchChanges", "changes",
                                         pb.WatchChangesResponse):
            yield message

    async def _watch(self, request: Any, context: Any, method: str, items: str,
                     make: Any) -> AsyncIterator[Any]:
        """Every shard's stream, merged (shards/watch.py)."""
        try:
            start = watch.start_positions(request.from_position)
        except InvalidArgument as exc:
            await fail(context, Code.INVALID_ARGUMENT, str(exc))
        await self.fan.stable(context, allow_partial=False)
        try:
            await watch.check_named(self.map, start)
        except Down as exc:
            await abort(context, exc)
        except OutOfRange as exc:
            await fail(context, Code.OUT_OF_RANGE, str(exc))
        initial = request.initial and not request.from_position

        def open_stream(shard: ShardState, request: Any) -> Any:
            # (as a router: the shard sends its time often while idle, for the watermark)
            return getattr(shard.stub, method)(request, metadata=(CLUSTER_SCHEMA,))

        merge = watch.Merge(self.map, open_stream, request, items, make, initial, start)
        try:
            async for message in merge.run():
                yield message
        except (grpc.aio.AioRpcError, Down) as exc:
            await abort(context, exc)


def _sum_segment(infos: list[pb.SegmentInfo]) -> pb.SegmentInfo:
    """One segment as every shard told it: members summed, the first broken reason."""
    out = pb.SegmentInfo()
    out.CopyFrom(infos[0])
    out.members = sum(i.members for i in infos)
    out.broken = next((i.broken for i in infos if i.broken), "")
    return out

