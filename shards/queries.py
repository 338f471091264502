"""Queries through a router: checked once here, answered by every shard, added up.

`Queries` answers Count, GroupBy, QueryBitmap, QueryIds and StreamIds over the fan-out
(shards/fanout.py), so each sum is exact over a stable partition of the slots. Before any
shard is asked, `lenient` parses the query within the router's QueryLimits and checks
that some shard knows every attribute it names (a typo is INVALID_ARGUMENT, not an empty
answer), then marks it so a shard that never saw one of them answers "nobody here". The
attributes a query text names are remembered within a byte budget (shards/text_cache.py),
the names the shards declared until one is missing.

A QueryIds cursor is (shard name, that shard's cursor), base64 of JSON: a slot move
between two pages may repeat or skip the moved profiles.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc

from memstore import pbvalues
from memstore.engine.schema import DAY_RECORD
from memstore.errors import brief
from memstore.query import (
    And,
    Did,
    Not,
    Or,
    Predicate,
    QueryLimits,
    query_from_request,
)
from memstore.query.ast import refused_query
from memstore.v1 import cluster_pb2 as cpb
from memstore.v1 import memstore_pb2 as pb
from shards.calls import Code, Down, Moved, abort, attempts, fail, move_pause, time_left
from shards.fanout import FanOut
from shards.shard_map import ShardState
from shards.text_cache import TextCache


class Queries:
    """The query calls of a router over `fan`, bounded by `limits`; `texts` remembers the
    attributes of query texts asked before."""

    def __init__(self, fan: FanOut, limits: QueryLimits, texts: TextCache) -> None:
        self.fan = fan
        self.map = fan.map
        self.limits = limits  # the size of work one query may ask for (as its shards')
        self._texts = texts  # query text -> the attributes it names
        self._known: set[str] = set()  # attribute names some shard has declared

    async def lenient(self, query: pb.QueryRequest, context: grpc.aio.ServicerContext,
                      *extra: str) -> pb.QueryRequest:
        """`query` marked so shards that never saw an attribute answer "nobody here" —
        after checking that some shard knows every attribute it names, so a typo is still
        INVALID_ARGUMENT rather than an empty segment."""
        try:
            names = (self._text_attributes(query.text) if query.WhichOneof("q") == "text"
                     else frozenset(_attributes_of(query_from_request(query,
                                                                      limits=self.limits))))
            names |= {n for n in extra if n}
        except ValueError as exc:  # QueryError, or a literal Python refuses
            await fail(context, Code.INVALID_ARGUMENT, refused_query(exc))
        if not names <= self._known:
            timeout = time_left(context)

            def call(shard: ShardState) -> Any:
                return shard.reader.GetSchema(pb.GetSchemaRequest(), timeout=timeout)

            answers, _ = await self.fan.every(context, call, query.allow_partial)
            self._known = {a.name for a in union_schema(r for _, r in answers).attributes}
            unknown = sorted(names - self._known)
            if unknown:
                name = unknown[0]
                if DAY_RECORD.match(name):  # did(...) reads event.<name>.days
                    event = name.removeprefix("event.").removesuffix(".days")
                    await fail(context, Code.INVALID_ARGUMENT, f"query: unknown event "
                               f"{event!r} (no profile has a day record of it)")
                await fail(context, Code.INVALID_ARGUMENT, f"query: unknown attribute {name!r}")
        marked = pb.QueryRequest()
        marked.CopyFrom(query)
        marked.unknown_attribute_is_empty = True
        return marked

    def _text_attributes(self, text: str) -> frozenset[str]:
        """The attributes a query text names (segments are asked again and again: parse
        once, within the cache's bytes)."""
        names = self._texts.get(text)
        if names is None:
            names = frozenset(_attributes_of(query_from_request(pb.QueryRequest(text=text),
                                                                limits=self.limits)))
            self._texts.put(text, names)
        return names

    async def count(self, request: pb.QueryRequest, context: Any) -> pb.CountResponse:
        request = await self.lenient(request, context)
        timeout = time_left(context)

        def call(shard: ShardState) -> Any:
            return shard.reader.Count(request, timeout=timeout)

        answers, missing = await self.fan.every(context, call, request.allow_partial)
        return pb.CountResponse(count=sum(r.count for _, r in answers), missing_shards=missing)

    async def group_by(self, request: pb.GroupByRequest, context: Any) -> pb.GroupByResponse:
        if not request.attribute:
            await fail(context, Code.INVALID_ARGUMENT,
                       "attribute: the attribute to group by is required")
        query = await self.lenient(request.query, context, request.attribute)
        sub = pb.GroupByRequest(query=query, attribute=request.attribute, top_n=0)
        timeout = time_left(context)

        def call(shard: ShardState) -> Any:
            return shard.reader.GroupBy(sub, timeout=timeout)

        answers, missing = await self.fan.every(context, call, request.query.allow_partial)
        sums: dict[bytes, list[Any]] = {}
        for _, response in answers:
            for group in response.groups:
                key = group.value.SerializeToString(deterministic=True)
                entry = sums.get(key)
                if entry is None:
                    sums[key] = [group.value, group.count, str(pbvalues.from_pb(group.value))]
                else:
                    entry[1] += group.count
        ordered = sorted(sums.values(), key=lambda e: (-e[1], e[2]))
        if request.top_n:
            ordered = ordered[: request.top_n]
        return pb.GroupByResponse(
            groups=[pb.GroupCount(value=v, count=n) for v, n, _ in ordered],
            total=sum(r.total for _, r in answers), missing_shards=missing)

    async def query_bitmap(self, request: pb.QueryRequest, context: Any) -> pb.BitmapResponse:
        request = await self.lenient(request, context)
        timeout = time_left(context)

        def call(shard: ShardState) -> Any:
            return shard.reader.QueryBitmap(request, timeout=timeout)

        answers, missing = await self.fan.every(context, call, request.allow_partial)
        response = pb.BitmapResponse(missing_shards=missing)
        for _, r in answers:
            response.bitmaps.extend(r.bitmaps)
        return response

    def _start(self, cursor: str, shards: list[tuple[ShardState, int]]) -> tuple[int, str]:
        if not cursor:
            return 0, ""
        name, inner = _decode_cursor(cursor)
        for i, (shard, _) in enumerate(shards):
            if shard.label == name:
                return i, inner
        raise ValueError(f"cursor: shard {brief(name)} is no longer in the cluster")

    async def query_ids(self, request: pb.QueryIdsRequest, context: Any) -> pb.QueryIdsResponse:
        size = request.page_size or 1000
        allow_partial = request.query.allow_partial
        query = await self.lenient(request.query, context)
        for attempt in attempts():
            shards = await self.fan.stable(context, allow_partial)
            try:
                index, inner = self._start(request.cursor, shards)
            except ValueError as exc:
                await fail(context, Code.INVALID_ARGUMENT, str(exc))
            response = pb.QueryIdsResponse()
            try:
                while index < len(shards):
                    shard, epoch = shards[index]
                    sub = pb.QueryIdsRequest(query=query, cursor=inner,
                                             page_size=size - len(response.ids))
                    try:
                        part: pb.QueryIdsResponse = await self.fan.checked(
                            shard, epoch, functools.partial(_query_ids, sub=sub,
                                                            timeout=time_left(context)))
                    except Down as exc:
                        if not allow_partial:
                            await abort(context, exc)
                        response.missing_shards.append(shard.label)
                        part = pb.QueryIdsResponse()
                    response.ids.extend(part.ids)
                    if part.next_cursor:
                        response.next_cursor = _encode_cursor(shard.label, part.next_cursor)
                        break
                    index, inner = index + 1, ""
                    if len(response.ids) >= size:
                        if index < len(shards):
                            response.next_cursor = _encode_cursor(shards[index][0].label, "")
                        break
                return response
            except Moved:
                await self.map.refresh(since=self.map.version)
                await move_pause(attempt, context)
            except grpc.aio.AioRpcError as exc:
                await abort(context, exc)
        await fail(context, Code.UNAVAILABLE, "shard ownership kept changing during the query")

    async def stream_ids(self, request: pb.QueryIdsRequest, context: Any
                         ) -> AsyncIterator[pb.QueryIdsResponse]:
        allow_partial = request.query.allow_partial
        query = await self.lenient(request.query, context)
        shards = await self.fan.stable(context, allow_partial)
        try:
            index, inner = self._start(request.cursor, shards)
        except ValueError as exc:
            await fail(context, Code.INVALID_ARGUMENT, str(exc))
        missing: list[str] = []
        while index < len(shards):
            shard, epoch = shards[index]
            nxt = shards[index + 1][0].label if index + 1 < len(shards) else None
            sub = pb.QueryIdsRequest(query=query, cursor=inner,
                                     page_size=request.page_size)
            try:
                async for part in shard.stub.StreamIds(sub, timeout=time_left(context)):
                    if part.next_cursor:
                        cursor = _encode_cursor(shard.label, part.next_cursor)
                    else:
                        cursor = _encode_cursor(nxt, "") if nxt else ""
                    yield pb.QueryIdsResponse(ids=part.ids, next_cursor=cursor,
                                              missing_shards=missing)
                info = await shard.control.GetShardInfo(cpb.ShardInfoRequest(), timeout=5.0)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != Code.UNAVAILABLE:
                    await abort(context, exc)
                exc2 = Down(shard, exc.details() or "unreachable")
                if not allow_partial:
                    await abort(context, exc2)
                missing.append(shard.label)
            except Down as exc:
                if not allow_partial:
                    await abort(context, exc)
                missing.append(shard.label)
            else:
                if info.epoch != epoch:
                    await fail(context, Code.ABORTED, f"shard {shard.label} changed slot "
                               "ownership during the stream (a slot move); start "
                               "again")
            index, inner = index + 1, ""
        if missing:
            yield pb.QueryIdsResponse(missing_shards=missing)


def _encode_cursor(name: str, cursor: str) -> str:
    raw = json.dumps([name, cursor], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, str]:
    """(shard name, that shard's cursor) from a cursor `_encode_cursor` made; ValueError
    for anything else (forged, cut, nested: never another exception)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        decoded = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        decoded = None
    if (not isinstance(decoded, list) or len(decoded) != 2
            or not all(isinstance(part, str) for part in decoded)):
        raise ValueError(f"cursor: {brief(cursor)} is not a cursor this router issued")
    return decoded[0], decoded[1]


def union_schema(responses: Iterable[pb.SchemaResponse]) -> pb.SchemaResponse:
    seen: dict[str, pb.AttributeSpec] = {}
    for response in responses:
        for spec in response.attributes:
            seen.setdefault(spec.name, spec)
    out = pb.SchemaResponse()
    out.attributes.extend(sorted(seen.values(), key=lambda s: s.name))
    return out


def _query_ids(shard: ShardState, sub: pb.QueryIdsRequest, timeout: float | None) -> Any:
    return shard.reader.QueryIds(sub, timeout=timeout)


def _attributes_of(node: Any) -> set[str]:
    """Every attribute a query names."""
    if isinstance(node, Predicate):
        return {node.attribute}
    if isinstance(node, (And, Or)):
        return set().union(*(_attributes_of(c) for c in node.children))
    if isinstance(node, Not):
        return _attributes_of(node.child)
    if isinstance(node, Did):
        return {f"event.{node.event}.{'last' if node.within_seconds is not None else 'days'}"}
    return set()
