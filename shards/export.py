"""Exports through a router: one person's (ExportProfile) and the bulk export's relay
(ExportProfiles). RouterService's two methods delegate here.

The bulk export's relay. Every shard takes its copy of the matching profiles in one step
and says at which epoch (initial metadata) before it sends anything; over a map whose
epochs those are, the copies partition the profiles, so each is exported once ("consistent
as of one moment per shard"). Otherwise (a slot moved meanwhile) every call is cancelled
and all start again. Then the shards' streams are merged as their messages come, every
shard's at once: the router neither decodes the profiles nor makes them again (a message's
JSON lines, or packed records, are the bytes its shard made, sent on as they are), so the
relay costs the router little beyond gRPC's own copies, and the shards, which do the
work, all work at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from memstore.v1 import memstore_pb2 as pb
from shards.calls import Code, abort, attempts, epoch_of, fail, move_pause, time_left
from shards.fanout import relay

if TYPE_CHECKING:
    from shards.router import RouterService
    from shards.shard_map import ShardState


async def export_profile(router: RouterService, request: pb.ExportProfileRequest,
                         context: Any) -> pb.ExportProfileResponse:
    """Everything held about one person, from the shard that owns them (an identifier is
    resolved to its profile first)."""
    if request.key.WhichOneof("key") == "identifier":
        [hit] = await router.reads.by_identifier([request.key], ["\x00"], context)
        if hit is None:
            ident = request.key.identifier
            await fail(context, Code.NOT_FOUND, f"profile with identifier "
                       f"{ident.kind}:{ident.value!r} not found")
        request = pb.ExportProfileRequest(key=pb.ProfileKey(id=hit.id))
    return await router.routing.single(request.key.id, "ExportProfile", request, context)  # type: ignore[no-any-return]


async def export_profiles(router: RouterService, request: pb.ExportProfilesRequest,
                          context: Any) -> AsyncIterator[pb.ExportProfilesChunk]:
    """Every shard's export at once, relayed as its messages come (module docstring)."""
    sub = pb.ExportProfilesRequest(chunk_size=request.chunk_size, format=request.format)
    allow_partial = False
    if request.HasField("query"):
        sub.query.CopyFrom(await router.queries.lenient(request.query, context))
        allow_partial = request.query.allow_partial
    for attempt in attempts():
        shards = await router.fan.stable(context, allow_partial)
        calls = [(shard, epoch, shard.stub.ExportProfiles(sub, timeout=time_left(context)))
                 for shard, epoch in shards]
        missing: list[str] = []
        started: list[tuple[ShardState, Any]] = []
        moved = False
        for shard, epoch, call in calls:
            try:
                answered = epoch_of(await call.initial_metadata())
            except grpc.aio.AioRpcError as exc:
                answered = None
                if exc.code() != Code.UNAVAILABLE:
                    for _, _, other in calls:
                        other.cancel()
                    await abort(context, exc)
            if answered is None:  # down (or it failed at once: the stream says why)
                if not allow_partial:
                    started.append((shard, call))
                    continue
                call.cancel()
                missing.append(shard.label)
                continue
            if answered != epoch:
                moved = True
            started.append((shard, call))
        if moved:
            for _, call in started:
                call.cancel()
            await router.map.refresh(since=router.map.version)
            await move_pause(attempt, context)
            continue
        async for chunk in relay([call for _, call in started]):
            if isinstance(chunk, grpc.aio.AioRpcError):
                for _, call in started:
                    call.cancel()
                await abort(context, chunk)
            yield chunk
        if missing:
            yield pb.ExportProfilesChunk(missing_shards=missing)
        return
    await fail(context, Code.UNAVAILABLE, "shard ownership kept changing during the export")

