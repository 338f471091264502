"""Writes through a router: profiles, identifiers and events, one by one or in batches.

`Writes` answers Upsert, Link, Track, TrackBatch and BatchUpsert. A write that names
identifiers claims them in the identifier directory first (shards/directory.py: a claim
in the identifier's own slot, verified against the profile it names; BatchUpsert claims
once per batch), which is also how it finds the cross-shard merges it must make first
(shards/merge.py). Writes naming the same identifier through one router go in turn
(IdentifierLocks), from the claim to the answer.

Batches are split by the owner of each record's slot and sent at once (shards/routing.py).
They are atomic per shard, not across shards: a part a shard refuses ends the call naming
the record at fault by its place in the caller's request (RECORD_TRAILER), with the
records that applied on other shards all the same (APPLIED_TRAILER). A BatchUpsert whose
records merge profiles across shards goes in runs: each run a batch, up to a record that
must merge a profile on another shard (one holds an identifier it names, or an earlier
record homed on another shard names one too), which is written on its own as an Upsert
would be, its merge and itself one change (`_judge`, `_merge_record`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, NoReturn

import grpc
import msgpack
import numpy as np
from pyroaring import BitMap

from memstore import pbvalues
from memstore.engine import eventpack
from memstore.engine.columnar import Coded, Columns, unpack_columns
from memstore.engine.identity import IDENT_KIND, MAX_IDENTIFIER_BYTES, check_identifier
from memstore.engine.schema import check_name_once
from memstore.engine.values import flatten
from memstore.errors import InvalidArgument
from memstore.hashslot import APPLIED_TRAILER, RECORD_TRAILER
from memstore.server.heap import LoadTrimmer
from memstore.v1 import memstore_pb2 as pb
from shards import merge
from shards.calls import (
    MOVE_WAIT,
    REFUSED,
    Code,
    Down,
    GroupRefused,
    Pending,
    Rejudge,
    Stuck,
    abort,
    attempts,
    fail,
    move_pause,
    retargeted,
)
from shards.directory import ClaimStuck, Directory, Suppressed
from shards.reads import Reads
from shards.routing import Routing
from shards.shard_map import ShardState
from shards.slots import slot_of

REQUEST, PACKED, COLUMNS = 0, 1, 2  # the forms of a BatchUpsert record (BatchUpsertRequest)


class IdentifierLocks:
    """The identifiers that writes through this router are naming right now.

    Writes naming the same identifier are ordered by its claim in the directory already
    (the second waits, polling, while the first's claim is young). Through one router they
    are put in turn here first, from the claim to the answer, so the second one starts as
    the first one ends instead of polling. A write takes all its identifiers at once, when
    none is taken (no deadlock between batches), and waits for the writes holding any of
    them otherwise."""

    def __init__(self) -> None:
        self._taken: dict[tuple[str, str], asyncio.Future[None]] = {}

    def __len__(self) -> int:
        return len(self._taken)

    @contextlib.asynccontextmanager
    async def hold(self, identifiers: Iterable[tuple[str, str]]) -> AsyncIterator[None]:
        keys = set(identifiers)
        while busy := {self._taken[k] for k in filter(self._taken.__contains__, keys)}:
            await asyncio.wait(busy)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._taken.update(dict.fromkeys(keys, done))
        try:
            yield
        finally:
            deque(map(self._taken.pop, keys), maxlen=0)
            done.set_result(None)


class Writes:
    """The write calls of a router over `routing`, claiming identifiers in `directory`;
    `reads` finds the profiles that events keyed by an identifier go to."""

    def __init__(self, routing: Routing, directory: Directory, reads: Reads) -> None:
        self.routing = routing
        self.map = routing.map
        self.directory = directory
        self.reads = reads
        self._naming = IdentifierLocks()  # this router's writes naming an identifier, in turn
        self._loads = LoadTrimmer()  # BatchUpsert calls in flight (memstore/server/heap.py)

    async def upsert(self, request: pb.UpsertRequest, context: Any) -> pb.UpsertResponse:
        async with self._naming.hold((i.kind, i.value) for i in request.identifiers):
            return await self._identity_write("Upsert", request, context)  # type: ignore[no-any-return]

    async def track(self, request: pb.TrackRequest, context: Any) -> pb.TrackResponse:
        if request.HasField("identifier"):  # to the profile holding it, by its id
            if request.id:
                await fail(context, Code.INVALID_ARGUMENT,
                           "id: give an id or an identifier, not both")
            [pid] = await self.reads.holders([(request.identifier.kind, request.identifier.value)],
                                             context)
            if pid is None:
                await fail(context, Code.NOT_FOUND, "identifier: no profile holds "
                           f"{request.identifier.kind}:{request.identifier.value!r}")
            by_id = pb.TrackRequest(id=pid, event=request.event)
            if request.HasField("at"):
                by_id.at.CopyFrom(request.at)
            if request.HasField("count"):  # (absent: 1, as the shard reads it)
                by_id.count = request.count
            request = by_id
        return await self.routing.single(request.id, "Track", request, context)  # type: ignore[no-any-return]

    async def link(self, request: pb.LinkRequest, context: Any) -> pb.LinkResponse:
        async with self._naming.hold((i.kind, i.value) for i in request.identifiers):
            return await self._identity_write("Link", request, context)  # type: ignore[no-any-return]

    async def track_batch(self, request: pb.TrackBatchRequest, context: Any
                          ) -> pb.TrackBatchResponse:
        """Each shard its part, concurrently, in one packed request each; events keyed by
        an identifier go to the profile holding it (the directory says which). A part a
        shard refuses ends the call naming the event at fault by its index here, with the
        events that applied on other shards (as BatchUpsert, _refuse_batch). The events
        stay in columns throughout (split by shard with numpy in Routing.routed): no
        Python frame per event."""
        keys: list[Any] = []
        names: list[Any] = []
        times: list[Any] = []
        counts: list[Any] = []
        now = int(time.time() * 1_000_000)
        try:
            for i, r in enumerate(request.events):
                key: eventpack.Key = r.id
                if r.HasField("identifier"):
                    if r.id:
                        raise InvalidArgument(f"events[{i}].id: give an id or an identifier, "
                                              "not both")
                    key = (r.identifier.kind, r.identifier.value)
                keys.append(key)
                names.append(r.event)
                times.append(pbvalues.timestamp_micros(r.at, f"events[{i}].at")
                             if r.HasField("at") else now)
                counts.append(r.count if r.HasField("count") else 1)
            if request.packed:
                more = eventpack.unpack_columns(request.packed, len(keys))
                for column, part in zip((keys, names, times, counts), more, strict=True):
                    column += part
        except (InvalidArgument, ValueError) as exc:
            await fail(context, Code.INVALID_ARGUMENT, str(exc))
        if set(map(type, keys)) - {str}:
            named = list(dict.fromkeys(k for k in keys if not isinstance(k, str)))
            for (kind, value) in named:
                if not kind or not value:
                    at = keys.index((kind, value))
                    await self._refuse_events(context, Code.INVALID_ARGUMENT, at,
                                              "identifier needs a kind and a value")
            holders = dict(zip(named, await self.reads.holders(named, context), strict=True))
            for i, key in enumerate(keys):
                if not isinstance(key, str):
                    pid = holders[key]
                    if pid is None:
                        await self._refuse_events(context, Code.NOT_FOUND, i,
                                                  f"identifier: no profile holds {key[0]}:"
                                                  f"{key[1]!r}")
                    keys[i] = pid
        if "" in keys:
            await self._refuse_events(context, Code.INVALID_ARGUMENT, keys.index(""),
                                      "id: empty profile id")
        if not keys:
            return pb.TrackBatchResponse()

        # An item is an event's row; where an id was merged away, its survivor's id.
        survivors: dict[int, str] = {}

        def retarget(row: int, survivor: str) -> int:
            survivors[row] = survivor
            return row

        def build(rows: list[int]) -> pb.TrackBatchRequest:
            pids = [survivors.get(row, keys[row]) for row in rows] if survivors \
                else list(map(keys.__getitem__, rows))
            return pb.TrackBatchRequest(packed=eventpack.pack(
                pids, list(map(names.__getitem__, rows)), list(map(times.__getitem__, rows)),
                list(map(counts.__getitem__, rows))))

        self._loads.begin()
        applied = 0
        try:
            parts = await self.routing.routed(list(zip(keys, range(len(keys)))), "TrackBatch",
                                              build, context, retarget, refusals=True)
            applied = sum(r.applied for _, r in parts)
        except GroupRefused as refused:
            done = BitMap(i for rows, _ in refused.done for i in rows)
            index = None if refused.record is None else refused.items[refused.record]
            message = refused.details
            if index is not None:
                message = re.sub(r"^(events|packed)\[\d+\]", f"events[{index}]", message)
            trailers: list[tuple[str, Any]] = [(APPLIED_TRAILER, done.serialize())]
            if index is not None:
                trailers.append((RECORD_TRAILER, str(index)))
            context.set_trailing_metadata(tuple(trailers))
            await fail(context, refused.code, message)
        finally:
            self._loads.end(applied)
        return pb.TrackBatchResponse(applied=applied)

    async def _refuse_events(self, context: Any, code: grpc.StatusCode, index: int, message: str
                             ) -> NoReturn:
        """Refuse a TrackBatch before any of it was sent, naming event `index`."""
        context.set_trailing_metadata(((APPLIED_TRAILER, BitMap().serialize()),
                                       (RECORD_TRAILER, str(index))))
        await fail(context, code, f"events[{index}].{message}")

    async def _identity_write(self, method: str, request: Any, context: Any) -> Any:
        """Upsert or Link: on the owning shard, or as a cross-shard merge (shards/merge.py)
        when an identifier it names belongs to a profile on another shard."""
        if not request.id:
            await fail(context, Code.INVALID_ARGUMENT, "id: a primary id is required")
        made: set[tuple[str, tuple[str, str]]] = set()  # claims this write made
        try:
            return await self._merging(
                method, request.id, [(i.kind, i.value) for i in request.identifiers],
                lambda survivor: retargeted(request, survivor), context, made)
        except Exception as exc:  # noqa: BLE001 - abort re-raises the rest
            if (isinstance(exc, grpc.aio.AioRpcError) and exc.code() in REFUSED
                    or isinstance(exc, Suppressed)):
                await self.directory.release(made, context)  # nothing was written
            await abort(context, exc)

    async def _merging(self, method: str, pid: str, idents: list[tuple[str, str]],
                       aimed: Callable[[str], Any], context: Any,
                       made: set[tuple[str, tuple[str, str]]]) -> Any:
        """Write `aimed(pid)` (a request for profile `pid` naming `idents`) once its
        identifiers are claimed: on the owning shard, or as the Absorb of a cross-shard
        merge when a profile on another shard holds one of them. Raises what it cannot
        handle (a shard's refusal, Down, Suppressed, Stuck), claims made added to `made`."""
        for attempt in attempts():
            try:
                local: dict[str, str] = {}
                foreign = await self.directory.claim([(pid, i) for i in idents], context,
                                                     made, local)
                losers = list(dict.fromkeys(foreign.values()))
                if not losers:  # a merged-away id: Forwarded, claimed again for its survivor
                    return await self.routing.owner_call(pid, method, aimed(pid), context,
                                                         follow=False, expect=local.get(pid))
                return await merge.merge(self.routing, pid, losers, aimed(pid), context,
                                         expect=local.get(pid))
            except Rejudge:  # a same-shard merge judged on a map that has changed since
                await move_pause(attempt, context)
            except merge.Restart:  # a racing merge: back off a random while, then retry
                await move_pause(attempt, context)
                await asyncio.sleep(random.uniform(0, 0.05))
            except merge.Forwarded as exc:  # the profile itself merged away: its survivor
                pid = exc.survivor
        raise Stuck(f"{method}: the merge kept meeting racing merges for "
                    f"{MOVE_WAIT:.0f} s")

    async def batch_upsert(self, request: pb.BatchUpsertRequest, context: Any
                           ) -> pb.BatchUpsertResponse:
        applied = 0
        self._loads.begin()  # the batches' garbage goes back to the OS after a load
        try:
            response = await self._batch_upsert(request, context)
            applied = response.applied
            return response
        finally:
            self._loads.end(applied)

    async def _batch_upsert(self, request: pb.BatchUpsertRequest, context: Any
                            ) -> pb.BatchUpsertResponse:
        if request.validate_only:  # (it would be applied: never let a check write)
            await fail(context, Code.INVALID_ARGUMENT, "validate_only: a shard's check of "
                       "records for its router, not served by a router")
        records: list[Any] = []
        if request.packed:
            try:
                records = msgpack.unpackb(request.packed, raw=False, strict_map_key=False)
                if not isinstance(records, list):
                    raise TypeError("not a msgpack array")
                for i, record in enumerate(records):
                    if (not isinstance(record, list) or not record
                            or not isinstance(record[0], str)):
                        raise TypeError(f"record {i} is not [id, attributes, identifiers]")
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                await fail(context, Code.INVALID_ARGUMENT, f"packed: {exc}")
        # Each item: (record, form, index): a structured request (REQUEST), a packed row
        # (PACKED), or a row of the columnar batch (COLUMNS), sent on to its shard in the
        # same form; `index` is its place in this request (requests, packed, columns).
        items: list[tuple[str, Any]] = [(r.id, (r, REQUEST, i))
                                        for i, r in enumerate(request.requests)]
        items += [(rec[0], (rec, PACKED, len(items) + i)) for i, rec in enumerate(records)]
        batch = Columns([], {}, [])
        if request.columns:
            try:
                batch = unpack_columns(request.columns)
            except InvalidArgument as exc:
                await fail(context, Code.INVALID_ARGUMENT, str(exc))
            # [id, row of the batch, identifiers]: sent on as that row of the columns
            base = len(items)
            items += [(pid, ([pid, i, idents], COLUMNS, base + i))
                      for i, (pid, idents) in enumerate(zip(batch.ids, batch.identifiers,
                                                            strict=True))]
        for i, (pid, _) in enumerate(items):
            if not pid:
                await fail(context, Code.INVALID_ARGUMENT, f"record {i}: an empty primary id")
        if not items:
            return pb.BatchUpsertResponse()
        forms = (len(request.requests), len(records))

        def build(group: list[tuple[Any, int, int]]) -> pb.BatchUpsertRequest:
            sub = pb.BatchUpsertRequest(requests=[x for x, form, _ in group if form == REQUEST])
            packed_records = [x for x, form, _ in group if form == PACKED]
            if packed_records:
                sub.packed = msgpack.packb(packed_records, use_bin_type=True)
            rows = [x for x, form, _ in group if form == COLUMNS]
            if rows:
                sub.columns = batch.pack_rows([r[1] for r in rows], [r[0] for r in rows])
            return sub

        def retarget(item: tuple[Any, int, int], survivor: str) -> tuple[Any, int, int]:
            record, form, index = item
            if form != REQUEST:
                return [survivor, *record[1:]], form, index
            return retargeted(record, survivor), form, index

        def build_check(group: list[tuple[Any, int, int]]) -> pb.BatchUpsertRequest:
            sub = build(group)
            sub.validate_only = True
            return sub

        async def check(some: list[tuple[str, Any]]) -> None:
            """Every record, checked by its shard (applying nothing) before the batch's
            first cross-shard merge: one refused refuses the batch before anything."""
            try:
                await self.routing.routed(some, "BatchUpsert", build_check, context, retarget,
                                          refusals=True)
            except GroupRefused as refused:  # (its `done` applied nothing: only checked)
                if made:  # nothing more of the batch applies: the claims go back
                    await self.directory.release(made, context)
                await _refuse_batch(context, refused, parts, forms)

        named = [_identifiers_of(item) for _, item in items]
        bad = _malformed(items, named, batch, forms)
        if bad is not None:  # refused before anything, naming the record as a shard would
            at, why = bad
            _, form, index = items[at][1]
            context.set_trailing_metadata(((RECORD_TRAILER, str(index)),
                                           (APPLIED_TRAILER, BitMap().serialize())))
            await fail(context, Code.INVALID_ARGUMENT, f"{_where(form, index, forms)}.{why}")
        parts: list[tuple[list[Any], Any]] = []
        made: set[tuple[str, tuple[str, str]]] = set()  # claims this batch made
        checked = False  # (the batch has a cross-shard merge)
        tries = attempts()
        async with self._naming.hold(itertools.chain.from_iterable(named)):
            try:
                # The records go in runs: each run as one batch (split by shard), up to a
                # record that must merge a profile on another shard first, which is then
                # written on its own as an Upsert would be (its merge and the record one
                # change, shards/merge.py); the rest is judged again after it.
                while items:
                    version = self.map.version
                    judged: dict[str, str] = {}
                    cut = await self._judge(items, named, context, judged, made)
                    if cut < len(items) and not checked:
                        checked = True
                        await check(items)
                        # From here the batch goes in runs; each run's records by the
                        # profiles their ids stand for now (a merged-away id at its
                        # survivor), so a record through a merged-away id goes in its
                        # place among its survivor's records, judged for the survivor.
                        resolved = await self._resolved(items, retarget, context)
                        if resolved != items:
                            items = resolved
                            continue
                    rejudge: list[tuple[str, Any]] = []
                    if cut:
                        parts += await self.routing.routed(
                            items[:cut], "BatchUpsert", build, context, retarget,
                            judged=judged, rejudge=rejudge, refusals=True)
                    if rejudge:
                        # Judged (merges, homes) on a map a shard has moved on from: those
                        # records are judged again, before the rest.
                        attempt = next(tries, None)
                        if attempt is None:
                            await _fail_batch(context, parts, Stuck(
                                "BatchUpsert: slots kept moving under the batch for "
                                f"{MOVE_WAIT:.0f} s"))
                        rejudge.sort(key=lambda pair: pair[1][2])  # (from several shards)
                        items = rejudge + items[cut:]
                        named = [_identifiers_of(item) for _, item in items]
                        await self.map.refresh(since=version)
                        await move_pause(attempt, context)
                        continue
                    if cut == len(items):
                        break
                    pid, item = items[cut]
                    parts.append(([item], await self._merge_record(
                        pid, item, named[cut], build, retarget, context, made, parts)))
                    items, named = items[cut + 1:], named[cut + 1:]
                    items = await self._resolved(items, retarget, context)
            except Suppressed as exc:  # (found by a claim: the records from it on did not apply)
                if made:
                    await self.directory.release(made, context)
                await _refuse_suppressed(context, exc, items, named, forms, parts)
            except (Down, Stuck, ClaimStuck, Pending, merge.Forwarded, merge.Restart,
                    grpc.aio.AioRpcError) as exc:  # a claim or a look-up that failed
                await _fail_batch(context, parts, exc)  # (claims kept: outcome unknown)
            except GroupRefused as refused:
                if refused.refused and made:  # give back what the records that did not
                    # apply claimed (release claims again what a profile holds all the
                    # same); an unknown outcome keeps them, as a write in flight's
                    await self.directory.release(made, context)
                await _refuse_batch(context, refused, parts + refused.done, forms)
        return pb.BatchUpsertResponse(applied=sum(r.applied for _, r in parts),
                                      created=sum(r.created for _, r in parts))

    async def _judge(self, items: list[tuple[str, Any]], named: list[list[tuple[str, str]]],
                     context: Any, judged: dict[str, str],
                     made: set[tuple[str, tuple[str, str]]]) -> int:
        """How many of a batch's first records can go now as one batch: those before the
        first record that must merge a profile on another shard, because a profile there
        holds an identifier it names, or an earlier record homed on another shard names
        one too (one shard would merge that record's profile into this one).

        Claims the identifiers of those records (each for the first of them naming it).
        Each of them naming identifiers gets, in `judged`, the "name:epoch" of the shard
        it was judged to live on (its shard's merges assume it)."""
        if not any(named):
            return len(items)
        first_home: dict[tuple[str, str], ShardState | None] = {}
        cut = len(items)
        for i, ((pid, _), idents) in enumerate(zip(items, named, strict=True)):
            home = self.map.owner(slot_of(pid))
            if any(first_home.setdefault(key, home) is not home for key in idents):
                cut = i
                break
            if idents:  # "" (no owner known): cannot be judged, its shard refuses it
                judged[pid] = "" if home is None else f"{home.name}:{home.epoch}"
        claimant: dict[tuple[str, str], str] = {}
        for (pid, _), idents in zip(items[:cut], named[:cut], strict=True):
            for key in idents:
                claimant.setdefault(key, pid)
        if not claimant:
            return cut
        holder = await self.directory.claim([(pid, key) for key, pid in claimant.items()],
                                            context, made)
        return next((i for i, ((pid, _), idents) in enumerate(zip(items[:cut], named[:cut],
                                                                  strict=True))
                     if any(claimant[key] == pid and key in holder for key in idents)), cut)

    async def _resolved(self, items: list[tuple[str, Any]],
                        retarget: Callable[[Any, str], Any], context: Any
                        ) -> list[tuple[str, Any]]:
        """`items` aimed at the profiles their ids stand for now: merged-away ids (by
        this batch's merges too) at their survivors."""
        found = await self.directory.profiles((pid for pid, _ in items), context)
        return [(found[pid].id, retarget(item, found[pid].id))
                if pid in found and found[pid].id != pid else (pid, item)
                for pid, item in items]

    async def _merge_record(self, pid: str, item: tuple[Any, int, int],
                            idents: list[tuple[str, str]],
                            build: Callable[[list[Any]], pb.BatchUpsertRequest],
                            retarget: Callable[[Any, str], Any], context: Any,
                            made: set[tuple[str, tuple[str, str]]],
                            parts: list[tuple[list[Any], Any]]) -> pb.BatchUpsertResponse:
        """Write one BatchUpsert record that must merge a profile on another shard, as a
        batch of one (shards/merge.py carries it in the merge's Absorb). Its refusal is
        the batch's, naming it (GroupRefused); other failures end the call with the
        records applied before it (APPLIED_TRAILER)."""
        try:
            answer = await self._merging("BatchUpsert", pid, idents,
                                         lambda survivor: build([retarget(item, survivor)]),
                                         context, made)
        except (grpc.aio.AioRpcError, Down) as exc:
            refused = GroupRefused([item], exc, [])
            if refused.refused:
                refused.record = 0
            raise refused from None
        except Suppressed:
            raise  # the batch names the record (_batch_upsert)
        except Exception as exc:  # noqa: BLE001 - _fail_batch re-raises what it cannot map
            await _fail_batch(context, parts, exc)
        if isinstance(answer, pb.UpsertResponse):  # written in a merge's Absorb
            return pb.BatchUpsertResponse(applied=1, created=int(answer.created))
        return answer  # type: ignore[no-any-return]


async def _refuse_suppressed(context: Any, exc: Suppressed, items: list[tuple[str, Any]],
                             named: list[list[tuple[str, str]]], forms: tuple[int, int],
                             applied: list[tuple[list[Any], Any]]) -> NoReturn:
    """Refuse a BatchUpsert naming a suppressed identifier, naming its first record (as a
    shard names a record it refuses: RECORD_TRAILER), with the records `applied` before."""
    i = next(i for i, idents in enumerate(named) if exc.ident in idents)
    _, form, index = items[i][1]
    where = _where(form, index, forms)
    context.set_trailing_metadata(((RECORD_TRAILER, str(index)),
                                   (APPLIED_TRAILER, _applied(applied).serialize())))
    await fail(context, Code.FAILED_PRECONDITION, f"{where}.identifiers: {exc}")


async def _fail_batch(context: Any, applied: list[tuple[list[Any], Any]],
                      exc: BaseException) -> NoReturn:
    """End a BatchUpsert with the status `exc` means (calls.abort), telling which records
    applied before it (APPLIED_TRAILER)."""
    context.set_trailing_metadata(((APPLIED_TRAILER, _applied(applied).serialize()),))
    await abort(context, exc)


def _applied(parts: list[tuple[list[Any], Any]]) -> BitMap:
    """The indexes (places in the caller's request) of the records in applied `parts`."""
    return BitMap(index for items, _ in parts for _, _, index in items)


async def _refuse_batch(context: Any, refused: GroupRefused,
                        applied: list[tuple[list[Any], Any]], forms: tuple[int, int]
                        ) -> NoReturn:
    """End a BatchUpsert a shard refused part of, or did not answer for: its status and
    message, with the record at fault named by its place in this request (the shard named
    its place in its part), and which records applied on other shards all the same
    (RECORD_TRAILER, APPLIED_TRAILER)."""
    trailers: list[tuple[str, Any]] = [(APPLIED_TRAILER, _applied(applied).serialize())]
    message = refused.details
    # The shard's part lists its requests, then its packed rows, then its columns rows.
    order = sorted(refused.items, key=lambda item: item[1])
    if refused.record is not None:
        _, form, index = order[refused.record]
        trailers.append((RECORD_TRAILER, str(index)))
        place = _where(form, index, forms)
        message, named_it = re.subn(r"^(requests|packed|columns)\[\d+\]", place, message)
        if not named_it:  # (a refusal of the merged profile: a cross-shard merge's)
            field = re.match(r"[a-z_]+[:.\[]", message)  # "identifiers: ..." is the record's
            message = f"{place}.{message}" if field else f"{place}: {message}"
    context.set_trailing_metadata(tuple(trailers))
    await fail(context, refused.code, message)


def _where(form: int, index: int, forms: tuple[int, int]) -> str:
    """A BatchUpsert record's place in its own form (`packed[3]`), from its index."""
    return (f"requests[{index}]" if form == REQUEST else f"packed[{index - forms[0]}]"
            if form == PACKED else f"columns[{index - forms[0] - forms[1]}]")


def _malformed(items: list[tuple[str, Any]], named: list[list[tuple[str, str]]],
               batch: Columns, forms: tuple[int, int]) -> tuple[int, str] | None:
    """The first record with an identifier or an attribute name its shard or the
    directory would refuse, and why: found here, it is refused as its record (its place
    named, the rest of a load goes on), where the directory's claims or the schema
    registry would have failed the whole batch naming none. Distinct kinds and names are
    checked once; a batch with nothing wrong costs a pass over its identifiers (and over
    its structured and packed records' names: a columnar batch's are its columns')."""
    kinds = {kind for idents in named for kind, _ in idents}
    values = [value for idents in named for _, value in idents]
    if (not all(map(IDENT_KIND.match, kinds)) or not all(values)
            or max(map(len, values), default=0) * 4 > MAX_IDENTIFIER_BYTES):
        for i, idents in enumerate(named):
            for kind, value in idents:
                try:
                    check_identifier(kind, value, "identifiers")
                except InvalidArgument as exc:
                    return i, str(exc)
    requests, packed = forms
    for i, (_, (record, form, _)) in enumerate(items[:requests + packed]):
        if form == REQUEST:
            names: Iterable[str] = (op.attribute for op in record.operations)
        else:
            attrs = record[1] if len(record) > 1 and isinstance(record[1], dict) else {}
            try:
                names = flatten(attrs).keys()
            except (InvalidArgument, ValueError, TypeError):
                continue  # malformed otherwise: its shard names what is wrong
        try:
            for name in names:
                check_name_once(name, "attributes")
        except InvalidArgument as exc:
            return i, str(exc)
    for name, column in batch.attributes.items():  # refused as the first row holding it
        try:
            check_name_once(name, "attributes")
        except InvalidArgument as exc:
            row = (int(np.argmax(column.holds())) if isinstance(column, Coded)
                   else next((r for r, v in enumerate(column) if v is not None), 0))
            return requests + packed + row, str(exc)
    return None


def _identifiers_of(item: tuple[Any, ...]) -> list[tuple[str, str]]:
    """The identifiers a BatchUpsert record names (malformed ones are the shard's to refuse)."""
    record, form = item[0], item[1]
    if form == REQUEST:
        return [(i.kind, i.value) for i in record.identifiers]
    if form == COLUMNS:  # checked by unpack_columns
        return list(map(tuple, record[2]))  # type: ignore[arg-type]
    idents = record[2] if len(record) > 2 and isinstance(record[2], list) else []
    return [(p[0], p[1]) for p in idents
            if isinstance(p, list | tuple) and len(p) == 2
            and isinstance(p[0], str) and isinstance(p[1], str)]

