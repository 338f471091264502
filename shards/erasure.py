"""Erasing people through a router: Delete, EraseProfiles, and retention's sweeps.

A person's data lives on more than one shard: the profile on the owner of its slot, the
forwards its merged ids left on the owners of theirs, the claims of its identifiers in
the directory (shards/directory.py), and with `suppress` the entries of the blocked list
on the owners of their slots. `Erasure` erases the profile on its shard first, then what
the other shards keep of that person (`_erase_elsewhere`); each receipt names every shard
changed and its log position after the change, and is recorded in the audit log.

EraseProfiles runs on every shard at once, batch by batch (`erase_on`, which retention
uses too, shards/retention.py). A shard whose slots moved meanwhile may have handed
matching profiles to another: then the whole erasure runs again, finding only what is
left, so a profile that matched throughout is erased wherever it went.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import msgpack

from memstore.server import audit, metrics
from memstore.v1 import cluster_pb2 as cpb
from memstore.v1 import memstore_pb2 as pb
from shards.calls import Code, abort, attempts, fail, move_pause, time_left
from shards.directory import BEST_EFFORT, Directory
from shards.fanout import FanOut, relay
from shards.queries import Queries
from shards.reads import Reads
from shards.routing import Routing
from shards.shard_map import ShardState
from shards.slots import slot_of

log = logging.getLogger("memstore.router")


class Erasure:
    """Erasures over `routing` (one person) and `fan` (every shard), releasing claims in
    `directory`; `reads` finds a person by identifier, `queries` checks a query."""

    def __init__(self, routing: Routing, fan: FanOut, directory: Directory, reads: Reads,
                 queries: Queries) -> None:
        self.routing = routing
        self.map = routing.map
        self.fan = fan
        self.directory = directory
        self.reads = reads
        self.queries = queries

    async def delete(self, request: pb.DeleteRequest, context: Any) -> pb.DeleteResponse:
        """Erase one person: the profile on its shard, then what other shards keep of it
        (forwards of its merged ids, the claims of its identifiers, and with `suppress`
        their entries on the blocked list). The receipt names every shard changed and the
        log position after which no snapshot of it holds the person."""
        if request.key.WhichOneof("key") == "identifier":
            [hit] = await self.reads.by_identifier([request.key], ["\x00"], context)
            if hit is None:
                return pb.DeleteResponse(deleted=False)
            request = pb.DeleteRequest(key=pb.ProfileKey(id=hit.id), suppress=request.suppress)
        reply: pb.DeleteResponse = await self.routing.single(request.key.id, "Delete", request, context)
        if not reply.deleted:
            return reply
        home = self.map.owner(slot_of(reply.id))
        positions = {home.label if home else "?": reply.log_position}
        for shard, position in (await self._erase_elsewhere([reply], request.suppress,
                                                            context)).items():
            positions[shard] = max(positions.get(shard, 0), position)
        receipt = pb.DeleteResponse()
        receipt.CopyFrom(reply)
        receipt.log_position = 0
        receipt.shard_positions.update(positions)
        metrics.ERASED.labels("delete").inc()
        audit.record("erasure", by=audit.caller.get(), reason="delete", receipt=reply.receipt,
                     profiles=1, erased_at=reply.erased_at.seconds, shard_positions=positions,
                     suppressed=request.suppress, hashes=list(reply.hashed_ids))
        return receipt

    async def _erase_elsewhere(self, erased: list[Any], suppress: bool, context: Any
                               ) -> dict[str, int]:
        """After shards erased profiles (each with `id`, `merged_ids`, `identifiers`):
        erase the forwards their merged ids left on other shards, release the claims of
        their identifiers and, with `suppress`, put ids and identifiers on the blocked list
        of the shards owning their slots. Returns each changed shard's log position."""
        # Both best effort, each within part of the caller's time: side by side, so a shard
        # that hangs costs the caller that part once.
        positions, released = await asyncio.gather(self._forget(erased, context),
                                                   self.directory.forget(erased, context))
        for shard, position in released.items():
            positions[shard] = max(positions.get(shard, 0), position)
        if suppress:
            for shard, position in (await self._suppress(erased, context)).items():
                positions[shard] = max(positions.get(shard, 0), position)
        return positions

    async def _suppress(self, erased: list[Any], context: Any) -> dict[str, int]:
        """Suppression entries for the erased ids and identifiers, each on the shard owning
        its slot (the erasing shard made those of its own slots already: idempotent)."""
        items: list[tuple[str, Any]] = [(f"{i.kind}:{i.value}", [i.kind, i.value])
                                        for p in erased for i in p.identifiers]
        items += [(pid, pid) for p in erased for pid in (p.id, *p.merged_ids)]

        def build(group: list[Any]) -> cpb.SuppressRequest:
            return cpb.SuppressRequest(
                packed=msgpack.packb([x for x in group if isinstance(x, list)]),
                ids=[x for x in group if isinstance(x, str)])

        positions: dict[str, int] = {}
        for _, response in await self.routing.routed(items, "Suppress", build, context, control=True):
            positions[response.shard] = max(positions.get(response.shard, 0),
                                            response.log_position)
        return positions

    async def _forget(self, erased: list[Any], context: Any) -> dict[str, int]:
        """Erase what other shards than their own keep naming the erased profiles: the
        forwards their merged ids left (on the owners of those ids' slots, and on the
        shard of each profile they were merged into on the way: a chain of merges across
        shards leaves one there) and the survivor's id in decisions of merges. Every
        shard but a profile's own is asked for all of its ids, since no map says where a
        chain went. Best effort, all shards at once, each for at most BEST_EFFORT seconds
        (a forward that stays forwards to an id that finds nothing). Returns the log
        position of each shard that forgot some."""
        homes = [self.map.owner(slot_of(reply.id)) if reply.id else None for reply in erased]
        remaining = context.time_remaining()
        timeout = BEST_EFFORT if remaining is None else min(BEST_EFFORT, remaining / 2)
        positions: dict[str, int] = {}

        async def forget(shard: ShardState) -> None:
            pids = [pid for reply, home in zip(erased, homes, strict=True) if home is not shard
                    for pid in (reply.id, *reply.merged_ids) if pid]
            if not pids:
                return
            try:
                answer = await shard.control.Forget(cpb.ForgetRequest(ids=pids),
                                                    timeout=timeout)
                if answer.forgotten:
                    positions[answer.shard or shard.label] = answer.log_position
            except grpc.aio.AioRpcError as exc:
                log.warning("erasure: what %s keeps of %d ids stays: %s", shard.label,
                            len(pids), exc.details())

        await asyncio.gather(*map(forget, list(self.map.shards)))
        return positions

    async def erase_profiles(self, request: pb.EraseProfilesRequest, context: Any
                             ) -> AsyncIterator[pb.EraseProfilesChunk]:
        """Every shard erases its matching profiles in batches, at once; after each batch
        the router erases what other shards keep of those people (Delete's second half)
        and sends the batch's receipt on. A shard whose slots moved meanwhile may have
        handed matching profiles to another: then the whole erasure runs again (it finds
        only what is left), so a profile that matched throughout is erased wherever it
        went."""
        sub = pb.EraseProfilesRequest()
        sub.CopyFrom(request)
        if request.HasField("query"):
            sub.query.CopyFrom(await self.queries.lenient(request.query, context))
        elif not request.HasField("anonymous_before"):
            await fail(context, Code.INVALID_ARGUMENT,
                       "query: give the profiles to erase (ALL: every one)")
        reason = "retention" if request.HasField("anonymous_before") else "query"
        for attempt in attempts():
            shards = await self.fan.stable(context, False)
            moved = False
            async for chunk in self.erase_on(shards, sub, context):
                if chunk is None:
                    moved = True
                    continue
                metrics.ERASED.labels(reason).inc(len(chunk.erased))
                audit.record("erasure", by=audit.caller.get(), reason=reason,
                             receipt=chunk.receipt, profiles=len(chunk.erased),
                             erased_at=chunk.erased_at.seconds,
                             shard_positions=dict(chunk.shard_positions),
                             suppressed=request.suppress,
                             **({} if reason == "retention" else
                                {"hashes": list(chunk.hashed_ids)}))
                yield chunk
            if not moved:
                return
            await self.map.refresh(since=self.map.version)
            await move_pause(attempt, context)
        await fail(context, Code.UNAVAILABLE, "shard ownership kept changing during the "
                   "erasure; run it again")

    async def erase_on(self, shards: list[tuple[ShardState, int]],
                       request: pb.EraseProfilesRequest, context: Any
                       ) -> AsyncIterator[pb.EraseProfilesChunk | None]:
        """EraseProfiles on `shards` at once; each batch with what other shards keep of
        its people erased too. None at the end when a shard's epoch changed meanwhile."""
        calls = [shard.stub.EraseProfiles(request, timeout=time_left(context))
                 for shard, _ in shards]
        async for chunk in relay(calls):
            if isinstance(chunk, grpc.aio.AioRpcError):
                for call in calls:
                    call.cancel()
                await abort(context, chunk)
            elsewhere = await self._erase_elsewhere(list(chunk.erased), request.suppress,
                                                    context)
            for shard_name, position in elsewhere.items():
                chunk.shard_positions[shard_name] = max(chunk.shard_positions.get(shard_name, 0),
                                                        position)
            chunk.log_position = 0
            yield chunk
        for shard, epoch in shards:
            info = await shard.control.GetShardInfo(cpb.ShardInfoRequest(), timeout=5.0)
            if info.epoch != epoch:
                yield None
                return
