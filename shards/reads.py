"""Reading profiles through a router: by primary id from the owner of its slot, by
identifier through the identifier directory.

`Reads` answers Get and BatchGet, and finds for the router's other calls the profile
that holds an identifier (`by_identifier`) or just its primary id (`holders`). A
BatchGet's ids go one request per owning shard at once (shards/routing.py), its
identifier keys through the directory (shards/directory.py); a packed answer
(BatchGetResponse.packed) is the shards' tables concatenated, each entry's table index
shifted, packed once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import grpc
import msgpack

from memstore import pbvalues
from memstore.errors import brief
from memstore.v1 import memstore_pb2 as pb
from shards.calls import Code, abort, fail
from shards.directory import Directory
from shards.routing import Routing


class Reads:
    """Profile reads over `routing`, identifiers looked up in `directory`."""

    def __init__(self, routing: Routing, directory: Directory) -> None:
        self.routing = routing
        self.directory = directory

    async def get(self, request: pb.GetRequest, context: Any) -> pb.GetResponse:
        if request.key.WhichOneof("key") == "identifier":
            [hit] = await self.by_identifier([request.key], request.attributes, context)
            if hit is None:
                ident = request.key.identifier
                await fail(context, Code.NOT_FOUND, f"profile with identifier "
                           f"{brief(ident.kind)}:{brief(ident.value)} not found")
            return pb.GetResponse(profile=hit)
        return await self.routing.single(request.key.id, "Get", request, context,  # type: ignore[no-any-return]
                                         read=True)

    async def batch_get(self, request: pb.BatchGetRequest, context: Any) -> pb.BatchGetResponse:
        # Answers in the order keys, then ids (BatchGetRequest.ids).
        n = len(request.keys) + len(request.ids)
        results = [pb.GetResult() for _ in range(n)]
        by_id: dict[str, list[int]] = {}
        by_ident: list[int] = []
        for i, key in enumerate(request.keys):
            if key.WhichOneof("key") == "identifier":
                by_ident.append(i)
            elif not key.id:
                await fail(context, Code.INVALID_ARGUMENT, f"keys[{i}]: an empty primary id")
            else:
                by_id.setdefault(key.id, []).append(i)
        if "" in request.ids:
            await fail(context, Code.INVALID_ARGUMENT,
                       f"ids[{list(request.ids).index('')}]: an empty primary id")
        for i, pid in enumerate(request.ids, len(request.keys)):
            by_id.setdefault(pid, []).append(i)

        def build(pairs: list[tuple[str, str]]) -> pb.BatchGetRequest:
            return pb.BatchGetRequest(ids=[p for p, _ in pairs],
                                      attributes=request.attributes, packed=request.packed)

        # packed: each shard answers [tables, entries] (see BatchGetResponse.packed); the
        # router concatenates the tables, shifts each entry's table index, re-packs once.
        entries: list[Any] = [None] * n
        tables: list[Any] = []

        async def ids_part() -> None:
            if not by_id:
                return
            parts = await self.routing.routed([(p, (p, p)) for p in by_id], "BatchGet", build,
                                              context, lambda pair, survivor: (survivor, pair[1]),
                                              read=True)
            for pairs, response in parts:
                pids = [asked for _, asked in pairs]
                if request.packed:
                    shard_tables, shard_entries = msgpack.unpackb(response.packed,
                                                                  strict_map_key=False)
                    offset = len(tables)
                    tables.extend(shard_tables)
                    for pid, entry in zip(pids, shard_entries):
                        if entry is not None:
                            entry[2] += offset
                        for i in by_id[pid]:
                            entries[i] = entry
                    continue
                for pid, result in zip(pids, response.results):
                    for i in by_id[pid]:
                        results[i].CopyFrom(result)

        async def ident_part() -> None:
            if not by_ident:
                return
            found = await self.by_identifier([request.keys[i] for i in by_ident],
                                             request.attributes, context)
            for i, profile in zip(by_ident, found):
                if profile is None:
                    continue
                if request.packed:
                    entries[i] = _as_packed_entry(profile, tables)
                else:
                    results[i].found = True
                    results[i].profile.CopyFrom(profile)

        await asyncio.gather(ids_part(), ident_part())
        if request.packed:
            return pb.BatchGetResponse(packed=msgpack.packb([tables, entries],
                                                            use_bin_type=True))
        return pb.BatchGetResponse(results=results)

    async def by_identifier(self, keys: list[pb.ProfileKey], attributes: Iterable[str],
                            context: grpc.aio.ServicerContext) -> list[pb.Profile | None]:
        """The profile holding each identifier key, through the directory."""
        for i, key in enumerate(keys):
            if not key.identifier.kind or not key.identifier.value:
                await fail(context, Code.INVALID_ARGUMENT,
                           f"keys[{i}]: an identifier needs a kind and a value")
        try:
            return await self.directory.find(
                [(k.identifier.kind, k.identifier.value) for k in keys], context,
                list(attributes))
        except Exception as exc:  # noqa: BLE001 - abort re-raises what it cannot map
            await abort(context, exc)

    async def holders(self, idents: list[tuple[str, str]], context: Any) -> list[str | None]:
        """The primary id of the profile holding each identifier (None: nobody)."""
        try:
            found = await self.directory.find(idents, context, ["\x00"])
        except Exception as exc:  # noqa: BLE001 - abort re-raises what it cannot map
            await abort(context, exc)
        return [None if p is None else p.id for p in found]


def _as_packed_entry(profile: pb.Profile, tables: list[Any]) -> list[Any]:
    """A structured profile as a BatchGet packed entry with a table of its own."""
    table: dict[int, list[Any]] = {}
    stored: dict[int, Any] = {}
    for aid, (name, message) in enumerate(profile.attributes.items()):
        value = pbvalues.from_pb(message)
        if isinstance(value, datetime):
            table[aid] = [name, pb.TIMESTAMP]
            stored[aid] = pbvalues.datetime_to_micros(value)
        else:
            table[aid] = [name, pb.KIND_UNSPECIFIED]
            stored[aid] = value
    tables.append(table)
    blob = msgpack.packb([profile.version, stored,
                          [[x.kind, x.value] for x in profile.identifiers],
                          list(profile.merged_ids)], use_bin_type=True)
    return [profile.id, blob, len(tables) - 1]

