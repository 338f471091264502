"""The gRPC server of one shard: translates between protobuf and the shard, nothing more.

Serves memstore.v1.Memstore (the public API), memstore.v1.ShardControl (slot ownership
and slot moves, for routers and operators), grpc.health.v1 and server reflection. Every
engine error maps to one status code (see `_STATUS`); any other exception is a bug,
logged with its traceback and answered INTERNAL without touching state. Requests that do
not parse are INVALID_ARGUMENT too (memstore/server/guard.py), queries are bounded by the
server's `QueryLimits`, and no status message is longer than MAX_STATUS_BYTES.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from itertools import repeat
from operator import itemgetter
from typing import Any, TypeVar

import grpc
import msgpack
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pyroaring import BitMap

from memstore import pbvalues
from memstore.engine import eventpack
from memstore.engine.blob import decode, encode, version_of
from memstore.engine.change import ANONYMOUS_KINDS, Change, Image, Note, UpsertSpec, record_specs
from memstore.engine.columnar import Columns, unpack_columns
from memstore.engine.core import Engine
from memstore.engine.exported import check_chunk, check_loser
from memstore.engine.identity import check_identifier, check_pid
from memstore.engine.schema import Kind, Merge
from memstore.engine.values import flatten
from memstore.errors import (
    FailedPrecondition,
    Forwarded,
    Held,
    InvalidArgument,
    MemstoreError,
    NotFound,
    OwnershipChanged,
    ReadOnlyReplica,
    Unavailable,
    Undeclared,
    WrongSlot,
    brief,
    capped,
    drop_tracebacks,
)
from memstore.gcpause import settle_heap
from memstore.hashslot import (
    CLUSTER_SCHEMA,
    EPOCH_TRAILER,
    EXPECT_SHARD,
    RECORD_TRAILER,
    REJUDGE_TRAILER,
    SLOT_COUNT,
    UNDECLARED_TRAILER,
    slot_of,
)
from memstore.query import DEFAULT_LIMITS, QueryError, QueryLimits, query_from_request
from memstore.query.ast import refused_query
from memstore.query.evaluate import count as count_query
from memstore.query.evaluate import evaluate, group_counts
from memstore.replication import coordinator as coordinated
from memstore.replication import history
from memstore.replication.primary import Replicas, ReplicationService
from memstore.replication.roles import Roles
from memstore.server import logs, metrics, reflection, rights, watch
from memstore.server.guard import Guard
from memstore.server.heap import LoadTrimmer, heap_for_queries
from memstore.server.link import LinkServer, describe_handler
from memstore.server.security import AUDITED, Credentials, ServerSecurity
from memstore.shard import Shard, ShardConfig
from memstore.storage.wal_writer import SyncPolicy
from memstore.v1 import cluster_pb2 as cpb
from memstore.v1 import cluster_pb2_grpc, memstore_pb2_grpc, replication_pb2_grpc
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import replication_pb2 as rpb

log = logging.getLogger("memstore.server")

# A replica's answers (memstore/replication/): where writes go, and how far behind it is.
PRIMARY_TRAILER = "memstore-primary"
LAG_BYTES_TRAILER = "memstore-replica-lag-bytes"
LAG_SECONDS_TRAILER = "memstore-replica-lag-seconds"

MAX_MESSAGE_BYTES = 64 << 20
EXPORT_CHUNK = 1000  # profiles per ExportSlots message
_EXPORT_FORMS = {pb.ExportProfilesRequest.PACKED: "packed",  # ExportProfilesChunk's fields
                 pb.ExportProfilesRequest.JSON_LINES: "lines",
                 pb.ExportProfilesRequest.COLUMNS: "columns"}
DROP_CHUNK = 250  # profiles per change when DropSlots forgets moved slots
DEFAULT_PAGE = 1000
MAX_PAGE = 100_000
MAX_BATCH_KEYS = 100_000
_CURSOR = re.compile(r"[0-9a-f]{1,8}")  # the hex dense id a page ended at (a 32-bit id)

_STATUS = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    OwnershipChanged: grpc.StatusCode.ABORTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    watch.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    watch.FellBehind: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

T = TypeVar("T")


def _status_for(exc: MemstoreError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.INTERNAL


def _refuse(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """Set the status `exc` maps to on the call, from the except block handling it; the
    handler then returns None (grpc.aio sends no response with a status other than OK).

    Not context.abort: its AbortError and grpc's frames make a reference cycle that holds
    the request until a full collection, and a call in flight when a snapshot freezes the
    heap (gc.freeze, memstore/shard.py) would keep its request for good: failing requests
    of a few MB each then add up to GBs. For the same reason the tracebacks are dropped."""
    if isinstance(exc, QueryError):
        code, details = grpc.StatusCode.INVALID_ARGUMENT, capped(refused_query(exc))
    elif isinstance(exc, MemstoreError):
        context.set_trailing_metadata(_trailers(exc))
        code, details = _status_for(exc), capped(str(exc))
    else:
        log.error("internal error", exc_info=exc)
        code = grpc.StatusCode.INTERNAL
        details = capped(f"internal error: {type(exc).__name__}: {exc}")
    drop_tracebacks()
    context.set_code(code)
    context.set_details(details)


def _trailers(exc: MemstoreError) -> tuple[tuple[str, str | bytes], ...]:
    """What a router (or client) needs besides the status to act on a refusal."""
    trailers: list[tuple[str, str | bytes]] = []
    if isinstance(exc, WrongSlot):
        trailers += [("memstore-wrong-slot", str(exc.slot)), ("memstore-epoch", str(exc.epoch))]
    elif isinstance(exc, Held):
        trailers.append(("memstore-merge-pending-bin", msgpack.packb(
            [exc.pid, exc.txn, exc.survivor, exc.age])))
    elif isinstance(exc, Forwarded):
        trailers.append(("memstore-merged-into-bin", msgpack.packb(exc.pairs)))
    elif isinstance(exc, OwnershipChanged):
        trailers.append((REJUDGE_TRAILER, "1"))
    elif isinstance(exc, Undeclared):
        trailers.append((UNDECLARED_TRAILER, msgpack.packb(exc.specs)))
    elif isinstance(exc, ReadOnlyReplica):
        trailers.append((PRIMARY_TRAILER, exc.primary))
    if exc.record is not None:
        trailers.append((RECORD_TRAILER, str(exc.record)))
    return tuple(trailers)


def _invalid(exc: Exception) -> Exception:
    """A ValueError or TypeError from checking a request is an InvalidArgument."""
    if isinstance(exc, ValueError | TypeError) and not isinstance(exc, QueryError):
        return InvalidArgument(str(exc))
    return exc


def rpc(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Map engine errors to status codes for a unary handler."""

    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        started = time.perf_counter()
        code = "OK"
        try:
            result = await method(self, request, context)
            engine = getattr(self, "engine", None)
            if engine is not None:
                # The slot-ownership epoch the answer was made at: a router checks it
                # against the slot map its fan-out used (EPOCH_TRAILER).
                trailers: tuple[tuple[str, str], ...] = ((EPOCH_TRAILER, str(engine.epoch)),)
                follower = self.shard.follower
                if follower is not None:  # a replica: how old its answer may be
                    behind, seconds = follower.lag()
                    trailers += ((PRIMARY_TRAILER, follower.primary),
                                 (LAG_BYTES_TRAILER, str(behind)),
                                 (LAG_SECONDS_TRAILER, f"{seconds:.3f}"))
                context.set_trailing_metadata(trailers)
            return result
        except (MemstoreError, QueryError, ValueError, TypeError) as exc:
            _refuse(context, _invalid(exc))
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:  # noqa: BLE001 - a bug; never crash the server
            code = "INTERNAL"
            _refuse(context, exc)
        finally:
            aborted = context.code()
            if aborted is not None:
                code = aborted.name
            metrics.observe(name, code, time.perf_counter() - started)
        return None  # type: ignore[return-value]  # refused: its status is set, no response

    return wrapper


def _ranges(slots: BitMap | None) -> list[cpb.SlotRange]:
    if slots is None:
        return [cpb.SlotRange(start=0, end=SLOT_COUNT - 1)]
    out: list[cpb.SlotRange] = []
    start = prev = -2
    for s in slots:
        if s != prev + 1:
            if start >= 0:
                out.append(cpb.SlotRange(start=start, end=prev))
            start = s
        prev = s
    if start >= 0:
        out.append(cpb.SlotRange(start=start, end=prev))
    return out


def _slots_of(ranges: Any, where: str = "slots") -> BitMap:
    bm = BitMap()
    for i, r in enumerate(ranges):
        if r.start > r.end or r.end >= SLOT_COUNT:
            raise InvalidArgument(f"{where}[{i}]: bad slot range {r.start}-{r.end}")
        bm.add_range(r.start, r.end + 1)
    return bm


def _key(key: pb.ProfileKey, where: str = "key") -> tuple[str | None, tuple[str, str] | None]:
    which = key.WhichOneof("key")
    if which == "id":
        return key.id, None
    if which == "identifier":
        return None, (key.identifier.kind, key.identifier.value)
    raise InvalidArgument(f"{where}: give an id or an identifier")


def _ops(request: pb.UpsertRequest, where: str) -> list[tuple[int, str, Any]]:
    ops = []
    for j, op in enumerate(request.operations):
        at = f"{where}operations[{j}]"
        if op.op == pb.Operation.OP_UNSPECIFIED:
            raise InvalidArgument(f"{at}: op is not set")
        if op.op == pb.Operation.UNSET:
            value = None
        else:
            value = pbvalues.from_pb(op.value, f"{at}.value")
        ops.append((int(op.op), op.attribute, value))
    return ops


def _spec(request: pb.UpsertRequest, where: str = "") -> UpsertSpec:
    return UpsertSpec(
        pid=request.id,
        ops=_ops(request, where),
        identifiers=[(i.kind, i.value) for i in request.identifiers],
        expected_version=request.expected_version if request.HasField("expected_version")
        else None,
    )


def _batch_forms(request: pb.BatchUpsertRequest
                 ) -> tuple[list[tuple[str, dict[str, Any], list[tuple[str, str]]]],
                            Columns | None]:
    """A BatchUpsert's packed records and columns, decoded (INVALID_ARGUMENT if not)."""
    rows = unpack_records(request.packed) if request.packed else []
    return rows, unpack_columns(request.columns) if request.columns else None


def _batch_specs(request: pb.BatchUpsertRequest,
                 rows: list[tuple[str, dict[str, Any], list[tuple[str, str]]]],
                 batch: Columns | None, where: str = "") -> list[UpsertSpec]:
    """Every record of a BatchUpsert as an upsert, in the order the forms apply
    (requests, packed, columns), each named by its place (`requests[2]`, `packed[0]`)."""
    specs = [_spec(r, f"{where}requests[{i}].") for i, r in enumerate(request.requests)]
    specs += record_specs(rows, f"{where}packed")
    specs += record_specs(batch.rows() if batch else [], f"{where}columns")
    return specs


def unpack_records(packed: bytes) -> list[tuple[str, dict[str, Any], list[tuple[str, str]]]]:
    """Decode a packed bulk batch: msgpack [[id, attributes, identifiers], ...] into
    (id, flat attributes, identifiers) rows. Timestamps stay msgpack Timestamps."""
    try:
        rows = msgpack.unpackb(packed, use_list=True)
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types on garbage
        raise InvalidArgument(f"packed: not a msgpack array of records ({exc})") from None
    if not isinstance(rows, list):
        raise InvalidArgument("packed: not a msgpack array of records")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) not in (2, 3):
            raise InvalidArgument(f"packed[{i}]: a record is [id, attributes, identifiers]")
        pid, attrs = row[0], row[1]
        idents = row[2] if len(row) == 3 else []
        if not isinstance(pid, str):
            raise InvalidArgument(f"packed[{i}]: id must be a string")
        if not isinstance(attrs, dict):
            raise InvalidArgument(f"packed[{i}]: attributes must be a map")
        if dict in set(map(type, attrs.values())):
            attrs = flatten(attrs, f"packed[{i}].attributes")
        pairs = []
        for pair in idents or ():
            if (not isinstance(pair, list) or len(pair) != 2
                    or not all(isinstance(x, str) for x in pair)):
                raise InvalidArgument(f"packed[{i}]: identifiers are [kind, value] string pairs")
            pairs.append((pair[0], pair[1]))
        out.append((pid, attrs, pairs))
    return out


class MemstoreService(memstore_pb2_grpc.MemstoreServicer):
    def __init__(self, shard: Shard, limits: QueryLimits = DEFAULT_LIMITS) -> None:
        self.shard = shard
        self.limits = limits  # the size of work one query may ask for
        self._loads = LoadTrimmer()  # a load's garbage, freed but still held by malloc

    @property
    def engine(self) -> Engine:
        """The shard's engine (a replica's full resync replaces it)."""
        return self.shard.engine

    # ------------------------------------------------------------------ profiles
    def _profile(self, dense: int, attributes: Any, packed: bool, out: pb.Profile) -> None:
        engine = self.engine
        blob = engine.blobs[dense]
        pid = engine.pids[dense]
        assert blob is not None and pid is not None
        version, attrs, idents, merged = decode(blob)
        out.id = pid
        out.version = version
        if packed:
            out.packed_attributes = msgpack.packb(engine.wire_attributes(attrs, attributes))
        else:
            for name, value in engine.named(attrs, attributes).items():
                out.attributes[name].CopyFrom(pbvalues.to_pb(value))
        for kind, value in idents:
            out.identifiers.add(kind=kind, value=value)
        out.merged_ids.extend(merged)
        out.slot = slot_of(pid)

    def _find(self, key: pb.ProfileKey, where: str = "key") -> int | None:
        return self._find_checked(*_key(key, where))

    def _find_checked(self, pid: str | None, identifier: tuple[str, str] | None
                      ) -> int | None:
        """The dense id of a checked key's profile, if it is here and this shard owns it."""
        if pid is not None:
            self.engine.check_slot(pid)
        dense = self.engine.lookup(pid, identifier)
        if dense is not None and dense in self.engine.foreign:
            return None
        return dense

    def _batch_keys(self, request: pb.BatchGetRequest) -> list[int | None]:
        """Dense ids for a BatchGet's keys, then its ids (None: not found)."""
        if len(request.keys) + len(request.ids) > MAX_BATCH_KEYS:
            raise InvalidArgument(f"keys: at most {MAX_BATCH_KEYS} keys and ids in one call")
        engine = self.engine
        if engine.forwards:  # every merged-away id of the batch in one refusal
            _forwarded(engine, [k.id for k in request.keys if k.WhichOneof("key") == "id"]
                       + list(request.ids))
        found = [self._find(key, f"keys[{i}]") for i, key in enumerate(request.keys)]
        ids = list(request.ids)
        # The ids' dense ids in one probe (PidTable.dense_many); an id it does not find,
        # or any while merges hold or forward ids, goes the single look-up's way.
        hits = ([-1] * len(ids) if engine.held or engine.forwards or not ids
                else engine.dense_of.many(ids).tolist())
        foreign = engine.foreign
        for i, (pid, dense) in enumerate(zip(ids, hits, strict=True)):
            check_pid(pid, f"ids[{i}]")
            if dense < 0:
                found.append(self._find_checked(pid, None))
            else:
                engine.check_slot(pid)
                found.append(None if dense in foreign else dense)
        return found

    @rpc
    async def Get(self, request: pb.GetRequest, context: Any) -> pb.GetResponse:
        self._as_judged(context)  # a direct_reads client names the owner it expects
        dense = self._find(request.key)
        if dense is None:
            raise NotFound(f"profile {_describe(request.key)} not found")
        response = pb.GetResponse()
        self._profile(dense, request.attributes, request.packed, response.profile)
        return response

    @rpc
    async def BatchGet(self, request: pb.BatchGetRequest, context: Any) -> pb.BatchGetResponse:
        attributes = list(request.attributes)
        found = self._batch_keys(request)
        if request.packed:
            engine = self.engine
            entries: list[Any] = []
            names = iter(engine.pids.take([dense for dense in found if dense is not None]))
            for dense in found:
                if dense is None:
                    entries.append(None)
                    continue
                blob = engine.blobs[dense]
                if attributes:  # projection: re-encode only the named attributes
                    version, attrs, idents, merged = decode(blob)  # type: ignore[arg-type]
                    wanted = {s.id for n in attributes if (s := engine.schema.get(n))}
                    blob = encode(version, {a: v for a, v in attrs.items() if a in wanted},
                                  idents, merged)
                entries.append([next(names), blob, 0])
            return pb.BatchGetResponse(
                packed=msgpack.packb([[engine.schema_table()], entries], use_bin_type=True))
        response = pb.BatchGetResponse()
        for dense in found:
            result = response.results.add()
            if dense is not None:
                result.found = True
                self._profile(dense, attributes, request.packed, result.profile)
        return response

    @rpc
    async def Upsert(self, request: pb.UpsertRequest, context: Any) -> pb.UpsertResponse:
        self._writable()
        self._as_judged(context)
        with _planning(self.engine, context):
            change = self.engine.plan_upsert(_spec(request))
        response = upsert_response(self.engine, change)
        await self.shard.commit(change)
        return response

    @rpc
    async def BatchUpsert(self, request: pb.BatchUpsertRequest, context: Any
                          ) -> pb.BatchUpsertResponse:
        self._writable()
        self._as_judged(context)
        results: list[tuple[str, bool]] = []
        self._loads.begin()  # from the unpacking on: its temporaries are the load's
        try:
            # Any mix of the three forms applies in the order requests, packed, columns.
            rows, batch = _batch_forms(request)
            _forwarded(self.engine, [r.id for r in request.requests] + [row[0] for row in rows]
                       + (batch.ids if batch is not None else []))
            with _planning(self.engine, context):
                if request.requests or (rows and batch is not None):
                    change = self.engine.plan_batch(_batch_specs(request, rows, batch))
                elif batch is not None:
                    change = self.engine.plan_columns(batch)
                else:
                    change = self.engine.plan_load(rows)
            if request.validate_only:
                return pb.BatchUpsertResponse()
            results = await self.shard.commit(change)
        finally:
            self._loads.end(len(results))
        return pb.BatchUpsertResponse(applied=len(results),
                                      created=sum(map(itemgetter(1), results)))

    @rpc
    async def Delete(self, request: pb.DeleteRequest, context: Any) -> pb.DeleteResponse:
        """Erase one person; the answer is the erasure's receipt (memstore.server.rights)."""
        self._writable()
        pid, identifier = _key(request.key)
        if pid is not None:
            self.engine.check_slot(pid)
        dense = self.engine.lookup(pid, identifier)
        if dense is None or dense in self.engine.foreign:
            return pb.DeleteResponse(deleted=False)
        if self.engine.pids[dense] in self.engine.held:  # waits for the merge (a router)
            self.engine.check_moving(self.engine.pids[dense])  # type: ignore[arg-type]
        change = self.engine.plan_erase([dense], request.suppress)
        erased = await self.shard.commit(change)
        if not erased:
            return pb.DeleteResponse(deleted=False)
        (owner, merged, idents), = erased
        receipt, position = rights.receipt_id(), self.shard.position
        hashed = rights.hashes_of(self.shard, erased)
        rights.audit_erasure(self.shard, "delete", receipt, change.at, position, erased,
                             request.suppress, hashed)
        response = pb.DeleteResponse(
            deleted=True, id=owner, merged_ids=merged, receipt=receipt,
            identifiers=[pb.Identifier(kind=k, value=v) for k, v in idents],
            log_position=position, suppressed=request.suppress, hashed_ids=hashed)
        response.erased_at.FromSeconds(change.at)
        return response

    # ------------------------------------------------------------------ data rights
    @rpc
    async def ExportProfile(self, request: pb.ExportProfileRequest, context: Any
                            ) -> pb.ExportProfileResponse:
        dense = self._find(request.key)
        if dense is None:
            raise NotFound(f"profile {_describe(request.key)} not found")
        return rights.export_profile(self.shard, dense)

    async def ExportProfiles(self, request: pb.ExportProfilesRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.ExportProfilesChunk]:
        """Every matching profile as it is at one instant (the first message's position),
        in chunks of stored bytes; the epoch it was taken at goes ahead as initial metadata
        (EPOCH_TRAILER), so a router knows it before anything is sent on."""
        try:
            form = _EXPORT_FORMS.get(request.format)
            if form is None:
                raise InvalidArgument(f"format: no format numbered {request.format}")
            size = request.chunk_size or (rights.EXPORT_LINES_CHUNK if form == "lines"
                                          else rights.EXPORT_CHUNK)
            if size > rights.MAX_EXPORT_CHUNK:
                raise InvalidArgument(f"chunk_size: at most {rights.MAX_EXPORT_CHUNK}, "
                                      f"got {size}")
            matches = (self._matches(request.query) if request.HasField("query")
                       else self.engine.visible())
            export = rights.BulkExport(self.shard, matches)
        except (MemstoreError, QueryError, ValueError, TypeError) as exc:
            _refuse(context, _invalid(exc))
            return
        await context.send_initial_metadata(((EPOCH_TRAILER, str(export.epoch)),))
        name = self.shard.config.name
        for count, data in export.chunks(size, form):
            chunk = pb.ExportProfilesChunk(shard=name, log_position=export.position,
                                           profiles=count)
            setattr(chunk, form, data)
            yield chunk
            await asyncio.sleep(0)

    async def EraseProfiles(self, request: pb.EraseProfilesRequest,
                            context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[pb.EraseProfilesChunk]:
        """Erase every profile matching the query as it is when the call starts (or, with
        anonymous_before, every anonymous profile unchanged since then), a batch a change
        and a message, each with its receipt."""
        try:
            self._writable()
            size = request.batch_size or rights.ERASE_BATCH
            if size > rights.MAX_ERASE_BATCH:
                raise InvalidArgument(f"batch_size: at most {rights.MAX_ERASE_BATCH}, "
                                      f"got {size}")
            retention = request.HasField("anonymous_before")
            if retention:
                if request.HasField("query"):
                    raise InvalidArgument("give a query or anonymous_before, not both")
                cutoff = request.anonymous_before.seconds
                kinds = list(request.anonymous_kinds) or list(ANONYMOUS_KINDS)
                for i, kind in enumerate(kinds):
                    check_identifier(kind, "x", f"anonymous_kinds[{i}]")
                batches = self._expired(cutoff, kinds, size)
            elif request.HasField("query"):
                matches = list(self._matches(request.query))
                batches = _in_batches(matches, size)
            else:
                raise InvalidArgument("query: give the profiles to erase (ALL: every one)")
            async for batch in batches:
                self._writable()
                change = self.engine.plan_erase(batch, request.suppress)
                if change.empty:
                    continue
                erased = await self.shard.commit(change)
                yield self._erased_chunk(change, erased, request.suppress,
                                         "retention" if retention else "query")
                await asyncio.sleep(0)
        except (MemstoreError, QueryError, ValueError, TypeError) as exc:
            _refuse(context, _invalid(exc))
        except Exception as exc:  # noqa: BLE001 - a bug; never crash the server
            _refuse(context, exc)

    async def _expired(self, cutoff: int, kinds: list[str], size: int
                       ) -> AsyncIterator[list[int]]:
        """Batches of anonymous profiles unchanged since `cutoff`, found a slice at a time."""
        start: int | None = 0
        while start is not None:
            found, start = self.engine.expired(cutoff, kinds, start, size)
            if found:
                yield found
            else:
                await asyncio.sleep(0)

    def _erased_chunk(self, change: Change, erased: list[Any], suppress: bool, reason: str
                      ) -> pb.EraseProfilesChunk:
        receipt, position = rights.receipt_id(), self.shard.position
        hashed = [] if reason == "retention" else rights.hashes_of(self.shard, erased)
        rights.audit_erasure(self.shard, reason, receipt, change.at, position, erased,
                             suppress, hashed)
        chunk = pb.EraseProfilesChunk(receipt=receipt, log_position=position,
                                      shard=self.shard.config.name, suppressed=suppress,
                                      hashed_ids=hashed)
        chunk.shard_positions[self.shard.config.name] = position
        chunk.erased_at.FromSeconds(change.at)
        for pid, merged, idents in erased:
            chunk.erased.add(id=pid, merged_ids=merged, identifiers=[
                pb.Identifier(kind=k, value=v) for k, v in idents])
        return chunk

    @rpc
    async def Link(self, request: pb.LinkRequest, context: Any) -> pb.LinkResponse:
        self._writable()
        self._as_judged(context)
        with _planning(self.engine, context):
            change = self.engine.plan_link(request.id, _idents(request), request.create)
        response = link_response(self.engine, change)
        await self.shard.commit(change)
        return response

    @rpc
    async def Track(self, request: pb.TrackRequest, context: Any) -> pb.TrackResponse:
        self._writable()
        key, event, at, count = _event(request, "", self.engine.clock)
        with _planning(self.engine, context):
            change = self.engine.plan_track(key, event, at, count)  # type: ignore[arg-type]
        version = await self.shard.commit(change)
        return pb.TrackResponse(version=version)

    @rpc
    async def TrackBatch(self, request: pb.TrackBatchRequest, context: Any
                         ) -> pb.TrackBatchResponse:
        self._writable()
        self._as_judged(context)
        applied = 0
        self._loads.begin()  # from the unpacking on: its temporaries are the load's
        try:
            events = track_batch_events(request, self.engine.clock)
            _forwarded(self.engine, [key for key, _, _, _ in events if isinstance(key, str)])
            with _planning(self.engine, context):
                change = self.engine.plan_track_batch(events)
            applied = await self.shard.commit(change)
        finally:
            self._loads.end(applied)
        return pb.TrackBatchResponse(applied=applied)

    def _writable(self) -> None:
        _writable(self.shard)

    def _as_judged(self, context: Any) -> None:
        _as_judged(self.shard, context)

    # ------------------------------------------------------------------ schema
    @rpc
    async def DeclareAttributes(self, request: pb.DeclareAttributesRequest, context: Any
                                ) -> pb.SchemaResponse:
        self._writable()
        specs = []
        for i, a in enumerate(request.attributes):
            if a.kind == pb.KIND_UNSPECIFIED:
                raise InvalidArgument(f"attributes[{i}]: kind is not set")
            specs.append((a.name, Kind(a.kind), not a.not_indexed, Merge(int(a.merge))))
        await self.shard.commit(self.engine.plan_declare(specs))
        return self._schema()

    @rpc
    async def GetSchema(self, request: pb.GetSchemaRequest, context: Any) -> pb.SchemaResponse:
        return self._schema()

    def _schema(self) -> pb.SchemaResponse:
        return pb.SchemaResponse(attributes=[
            pb.AttributeSpec(name=s.name, kind=pb.Kind.ValueType(s.kind),
                             not_indexed=not s.indexed,
                             merge=pb.AttributeSpec.Merge.ValueType(s.merge))
            for s in self.engine.schema.by_id
        ])

    # ------------------------------------------------------------------ queries
    def _matches(self, request: pb.QueryRequest) -> BitMap:
        return evaluate(self.engine, query_from_request(request, limits=self.limits),
                        unknown_is_empty=request.unknown_attribute_is_empty)

    @rpc
    async def Count(self, request: pb.QueryRequest, context: Any) -> pb.CountResponse:
        return pb.CountResponse(count=count_query(
            self.engine, query_from_request(request, limits=self.limits),
            unknown_is_empty=request.unknown_attribute_is_empty))

    def _page(self, matches: BitMap, cursor: str, size: int) -> tuple[list[str], str]:
        start = 0
        if cursor:
            if not _CURSOR.fullmatch(cursor):
                raise InvalidArgument(f"cursor: {brief(cursor)} is not a cursor this shard "
                                      "issued")
            start = matches.rank(int(cursor, 16))
        page = matches[start:start + size]
        ids = self.engine.ids_of(page)
        more = start + size < len(matches)
        return ids, (format(page[-1], "x") if more and len(page) else "")

    @staticmethod
    def _page_size(size: int) -> int:
        if size > MAX_PAGE:
            raise InvalidArgument(f"page_size: at most {MAX_PAGE}, got {size}")
        return size or DEFAULT_PAGE

    @rpc
    async def QueryIds(self, request: pb.QueryIdsRequest, context: Any) -> pb.QueryIdsResponse:
        size = self._page_size(request.page_size)
        ids, cursor = self._page(self._matches(request.query), request.cursor, size)
        return pb.QueryIdsResponse(ids=ids, next_cursor=cursor)

    async def StreamIds(self, request: pb.QueryIdsRequest, context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[pb.QueryIdsResponse]:
        try:
            size = self._page_size(request.page_size)
            matches = self._matches(request.query)
            cursor = request.cursor
            while True:
                ids, cursor = self._page(matches, cursor, size)
                yield pb.QueryIdsResponse(ids=ids, next_cursor=cursor)
                if not cursor:
                    return
        except (MemstoreError, QueryError, ValueError, TypeError) as exc:
            _refuse(context, _invalid(exc))
        except Exception as exc:  # noqa: BLE001 - a bug; never crash the server
            _refuse(context, exc)

    @rpc
    async def GroupBy(self, request: pb.GroupByRequest, context: Any) -> pb.GroupByResponse:
        if not request.attribute:
            raise InvalidArgument("attribute: the attribute to group by is required")
        matches = self._matches(request.query)
        groups = group_counts(self.engine, matches, request.attribute,
                              request.query.unknown_attribute_is_empty)
        groups.sort(key=lambda g: (-g[1], str(g[0])))
        if request.top_n:
            groups = groups[: request.top_n]
        response = pb.GroupByResponse(total=len(matches))
        for value, count in groups:
            response.groups.add(value=pbvalues.to_pb(value), count=count)
        return response

    @rpc
    async def QueryBitmap(self, request: pb.QueryRequest, context: Any) -> pb.BitmapResponse:
        matches = self._matches(request)
        return pb.BitmapResponse(bitmaps=[pb.ShardBitmap(shard=self.shard.config.name,
                                                         bitmap=matches.serialize())])

    # ------------------------------------------------------------------ saved segments
    def _segment_info(self, name: str) -> pb.SegmentInfo:
        segment = self.engine.segments.get(name)
        if segment is None:
            raise NotFound(f"segment {name!r} not found")
        members = segment.members & self.engine.visible()
        info = pb.SegmentInfo(name=name, query=segment.text, members=len(members),
                              broken=segment.broken)
        info.created_at.FromMicroseconds(segment.created_at)
        return info

    @rpc
    async def CreateSegment(self, request: pb.CreateSegmentRequest, context: Any
                            ) -> pb.SegmentInfo:
        self._writable()
        node = query_from_request(request.query, limits=self.limits)
        if not request.query.unknown_attribute_is_empty:  # (a router checked it: lenient)
            evaluate(self.engine, node, within=BitMap())  # a typo: INVALID_ARGUMENT
        created = (pbvalues.timestamp_micros(request.created_at, "created_at")
                   if request.HasField("created_at")
                   else pbvalues.datetime_to_micros(datetime.now(UTC)))
        await self.shard.commit(self.engine.plan_create_segment(request.name, node, created))
        return self._segment_info(request.name)

    @rpc
    async def DeleteSegment(self, request: pb.DeleteSegmentRequest, context: Any
                            ) -> pb.DeleteSegmentResponse:
        self._writable()
        deleted = await self.shard.commit(self.engine.plan_delete_segment(request.name))
        return pb.DeleteSegmentResponse(deleted=deleted)

    @rpc
    async def ListSegments(self, request: pb.ListSegmentsRequest, context: Any
                           ) -> pb.ListSegmentsResponse:
        return pb.ListSegmentsResponse(segments=[
            self._segment_info(name) for name in sorted(self.engine.segments.by_name)])

    async def WatchSegments(self, request: pb.WatchSegmentsRequest,
                            context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[pb.WatchSegmentsResponse]:
        engine = self.engine

        def setup() -> tuple[Callable[..., list[Any]], Callable[[int], Iterator[Any]]]:
            watched = watch.check_segments(engine, list(request.segments))
            return (lambda record: watch.segment_events(record, watched, engine),
                    lambda lsn: self._initial_members(watched, lsn))

        async for message in self._watch(context, request, setup,
                                         pb.WatchSegmentsResponse, "events"):
            yield message

    async def _watch(self, context: grpc.aio.ServicerContext, request: Any,
                     setup: Callable[[], tuple[Callable[..., list[Any]],
                                               Callable[[int], Iterator[Any]]]],
                     message_type: Any, field: str) -> AsyncIterator[Any]:
        """A watch stream: `setup()` checks the request and gives (the events of a log
        record, the initial listing at a log position); then, from the request's position
        (none: now, after the listing if asked for), every batch of events as a
        `message_type` with them in `field`. Refusals become statuses."""
        try:
            events, listing = setup()
            name = self.shard.config.name
            token = request.from_position
            named = watch.start_of(self.shard, name, token)
            if named is not None:
                start = named
            elif not token:  # from now. Without a listing, from what is acknowledged: a
                # write in flight (being made durable, or confirmed by a replica) is sent
                # once it is; but never from before this process began serving (a sync
                # primary's watchers wait for a replica to confirm what its log held). A
                # listing reads memory, which holds it already (confirmed or not).
                now = max(self.shard.readable_lsn, self.shard.served_from) \
                    if self.shard.log is not None and not request.initial \
                    else self.shard.position
                start = (now, -1, watch.history_of(self.shard))
                if request.initial:
                    for message in listing(start[0]):
                        yield message
                else:  # where it starts, first: a router's positions name every shard
                    first = message_type(position=watch.encode_token({name: start}))
                    first.at.FromMicroseconds(int(time.time() * 1_000_000))
                    yield first
            else:
                # A shard the position does not name (added since) starts from its oldest
                # change, or after its latest erasure: a person's erased data is never
                # replayed, and a stream across shards must not end because one of them
                # erased someone. Where it starts comes first, as above.
                start = (max(self.shard.oldest_lsn, self.shard.erased_lsn), -1,
                         watch.history_of(self.shard))
                yield message_type(position=watch.encode_token({name: start}))

            def response(batch: list[Any], position: str, at: int) -> Any:
                out = message_type(position=position)
                getattr(out, field).extend(batch)
                out.at.FromMicroseconds(at)
                return out

            # A router merging shards' streams needs each one's time often when idle (its
            # watermark); any other watcher a heartbeat a second.
            router = any(key == CLUSTER_SCHEMA[0] for key, _ in
                         context.invocation_metadata() or ())
            async for message in watch.stream(
                    self.shard, name, start, events, response,
                    watch.HEARTBEAT if router else watch.CLIENT_HEARTBEAT):
                yield message
        except (MemstoreError, QueryError, ValueError, TypeError) as exc:
            _refuse(context, _invalid(exc))
        except Exception as exc:  # noqa: BLE001 - a bug; never crash the server
            _refuse(context, exc)

    def _initial_members(self, watched: set[str] | None, lsn: int
                         ) -> Iterator[pb.WatchSegmentsResponse]:
        """The current members of the watched segments as ENTER events (initial), taken
        at once with the log's end `lsn` (no await in between), then that position."""
        engine = self.engine
        visible = engine.visible()
        now = datetime.now(UTC)
        pids = engine.pids
        taken = [(name, pids.take((segment.members & visible).to_array()))
                 for name, segment in sorted(engine.segments.by_name.items())
                 if watched is None or name in watched]
        position = watch.shard_token(self.shard, lsn)
        batch: list[pb.SegmentEvent] = []
        for name, ids in taken:
            for pid in ids:
                event = pb.SegmentEvent(segment=name, id=pid, initial=True,
                                        change=pb.SegmentEvent.ENTER)
                event.at.FromDatetime(now)
                batch.append(event)
                if len(batch) >= watch.BATCH:  # no position: an interrupted listing restarts
                    yield pb.WatchSegmentsResponse(events=batch)
                    batch = []
        yield pb.WatchSegmentsResponse(events=batch, position=position)  # the seam

    async def WatchChanges(self, request: pb.WatchChangesRequest,
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[pb.WatchChangesResponse]:
        engine = self.engine

        def setup() -> tuple[Callable[..., list[Any]], Callable[[int], Iterator[Any]]]:
            node = (query_from_request(request.query, limits=self.limits)
                    if request.HasField("query") else None)
            if node is not None:  # checked (a typo is INVALID_ARGUMENT, unless a router
                # checked it already: shards that never saw an attribute match nobody)
                evaluate(engine, node, within=BitMap(),
                         unknown_is_empty=request.query.unknown_attribute_is_empty)
            flt = watch.ChangeFilter(node, frozenset(request.attributes))
            return (lambda record: watch.change_events(record, flt, engine),
                    lambda lsn: self._initial_profiles(flt, lsn))

        async for message in self._watch(context, request, setup,
                                         pb.WatchChangesResponse, "changes"):
            yield message

    def _initial_profiles(self, flt: watch.ChangeFilter, lsn: int
                          ) -> Iterator[pb.WatchChangesResponse]:
        """Every current (matching) profile as a change (initial, all its attributes),
        taken at once with the log's end `lsn`, then that position."""
        engine = self.engine
        chosen = (evaluate(engine, flt.node, unknown_is_empty=True) if flt.node is not None
                  else engine.visible())
        taken = [(engine.pids[d], engine.blobs[d]) for d in chosen]
        position = watch.shard_token(self.shard, lsn)
        now = datetime.now(UTC)
        batch: list[pb.ProfileChange] = []
        for pid, blob in taken:
            version, attrs, _, _ = decode(blob)  # type: ignore[arg-type]
            shown = watch.shown_attributes(attrs, engine, flt.attributes)
            if flt.attributes and not shown:
                continue  # it holds none of the attributes asked about
            change = pb.ProfileChange(id=pid, version=version, initial=True, created=True,
                                      set=shown)
            change.at.FromDatetime(now)
            batch.append(change)
            if len(batch) >= watch.BATCH:  # no position: an interrupted listing restarts
                yield pb.WatchChangesResponse(changes=batch)
                batch = []
        yield pb.WatchChangesResponse(changes=batch, position=position)  # the seam

    # ------------------------------------------------------------------ operations
    @rpc
    async def Snapshot(self, request: pb.SnapshotRequest, context: Any) -> pb.SnapshotResponse:
        info = await self.shard.snapshot()
        return pb.SnapshotResponse(path=info["path"], log_position=info["lsn"],
                                   profiles=info["profiles"])

    @rpc
    async def Stats(self, request: pb.StatsRequest, context: Any) -> pb.StatsResponse:
        engine = self.engine
        info = {"epoch": str(engine.epoch), "sync": str(self.shard.config.sync)}
        info.update({f"recovery.{k}": str(v) for k, v in self.shard.recovery.items()})
        if self.shard.log is not None:
            info["log.failed"] = str(self.shard.log.failed)
            info["log.position"] = str(self.shard.log.end_lsn)
        if self.shard.follower is not None:
            info.update(self.shard.follower.stats())
        elif isinstance(self.shard.replication, Replicas):
            info.update(self.shard.replication.stats())
        return pb.StatsResponse(
            profiles=len(engine.live), identifiers=len(engine.directory),
            attributes=len(engine.schema), shard=self.shard.config.name,
            log_bytes=self.shard.log.size_bytes if self.shard.log else 0, info=info,
        )


async def _in_batches(items: list[int], size: int) -> AsyncIterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _forwarded(engine: Engine, pids: list[str]) -> None:
    """Refuse a batch naming merged-away ids, naming all of them, so a router retargets
    them in one round (Forwarded carries every pair)."""
    if not engine.forwards:
        return
    pairs = [[p, engine.forwards[p]] for p in dict.fromkeys(pids)
             if p in engine.forwards and p not in engine.dense_of and p not in engine.aliases]
    if pairs:
        exc = Forwarded(pairs[0][0], pairs[0][1], more=len(pairs) - 1)
        exc.pairs = pairs
        raise exc


def _packed_array(packed: bytes) -> list[Any]:
    """A request's `packed` msgpack array, or INVALID_ARGUMENT."""
    try:
        items = msgpack.unpackb(packed)
        if not isinstance(items, list):
            raise TypeError("not a msgpack array")
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise InvalidArgument(f"packed: {exc}") from None
    return items


@contextlib.contextmanager
def _planning(engine: Engine, context: Any) -> Iterator[None]:
    """Plan a write as its sender asks: a router's write (CLUSTER_SCHEMA) may not declare
    attributes by their values here; it is refused naming them (Undeclared), so that the
    router declares them as the cluster's schema has them. Planning never awaits, so the
    flag is this write's alone."""
    engine.cluster_schema = any(key == CLUSTER_SCHEMA[0] for key, _ in
                                context.invocation_metadata() or ())
    try:
        yield
    finally:
        engine.cluster_schema = False


def _as_judged(shard: Shard, context: Any) -> None:
    """Refuse a call judged for another shard, or for this one before its slots last
    changed (EXPECT_SHARD): a router's write judged "same shard" may not be, and a
    direct_reads client's Get may have reached a shard that no longer owns the answer."""
    for key, value in context.invocation_metadata() or ():
        if key == EXPECT_SHARD:
            here = f"{shard.config.name}:{shard.engine.epoch}"
            if value != here:
                raise OwnershipChanged(f"this call was judged for shard {value!r}, but this "
                                       f"is {here!r}: slots moved since")


def _writable(shard: Shard) -> None:
    if shard.replica_of is not None:
        raise ReadOnlyReplica(shard.replica_of)
    error = shard.writable_error
    if error:
        raise Unavailable(error)


def _event(request: pb.TrackRequest, where: str, clock: Callable[[], float]
           ) -> tuple[str | tuple[str, str], str, int, int]:
    """(key, event, at in microseconds, count) of a TrackRequest (at: default now)."""
    if request.HasField("identifier"):
        if request.id:
            raise InvalidArgument(f"{where}id: give an id or an identifier, not both")
        key: str | tuple[str, str] = (request.identifier.kind, request.identifier.value)
    else:
        key = request.id
    if request.HasField("at"):
        at = pbvalues.timestamp_micros(request.at, f"{where}at")
    else:
        at = int(clock() * 1_000_000)
    return key, request.event, at, request.count if request.HasField("count") else 1


def track_batch_events(request: pb.TrackBatchRequest, clock: Callable[[], float]
                       ) -> list[tuple[Any, str, int, int]]:
    """A TrackBatch's events, `events` then `packed`, as (key, event, at, count) tuples
    whose fields the engine checks; the shape of `packed` is checked here."""
    events = [_event(r, f"events[{i}].", clock) for i, r in enumerate(request.events)]
    if request.packed:
        events += eventpack.unpack(request.packed, len(events))
    return events


def _idents(request: pb.LinkRequest) -> list[tuple[str, str]]:
    return [(i.kind, i.value) for i in request.identifiers]


# A write's answer is made from its planned change, before the commit awaits the log: by
# the time the fsync returns, other writes may have changed the profile (the caller would
# be told their version, and pass it as expected_version) or merged it away.

def upsert_response(engine: Engine, change: Change) -> pb.UpsertResponse:
    pid, created = change.result
    return pb.UpsertResponse(id=pid, version=_version_after(engine, change, pid),
                             created=created)


def link_response(engine: Engine, change: Change) -> pb.LinkResponse:
    pid, merged = change.result
    return pb.LinkResponse(id=pid, version=_version_after(engine, change, pid),
                           merged_ids=merged)


def _version_after(engine: Engine, change: Change, pid: str) -> int:
    """The version profile `pid` is at once `change` (not yet committed) applies: its
    after-image's, or, when the change leaves it as it is, its version now."""
    for image in reversed(change.images):
        if image.pid == pid and image.blob is not None:
            return version_of(image.blob)
    return version_of(engine.blobs[engine.dense_of[pid]])  # type: ignore[arg-type]


def _describe(key: pb.ProfileKey) -> str:
    if key.WhichOneof("key") == "identifier":
        return f"with identifier {brief(key.identifier.kind)}:{brief(key.identifier.value)}"
    return brief(key.id)


class ShardControlService(cluster_pb2_grpc.ShardControlServicer):
    """Slot ownership and slot moves. Exported profiles are portable: attribute names and
    kinds travel with them, because attribute ids are local to each shard."""

    def __init__(self, shard: Shard, address: str, link: LinkServer | None = None) -> None:
        self.shard = shard
        self.address = address
        self.link = link

    @property
    def engine(self) -> Engine:
        return self.shard.engine

    def _info(self) -> cpb.ShardInfo:
        engine = self.engine
        now = time.time()
        return cpb.ShardInfo(name=self.shard.config.name, address=self.address,
                             epoch=engine.epoch, slots=_ranges(engine.owned_slots),
                             profiles=len(engine.live) - len(engine.foreign),
                             healthy=not (self.shard.log and self.shard.log.failed),
                             claims=len(engine.claims),
                             link_port=self.link.port if self.link else 0,
                             link_token=self.link.token if self.link and self.link.port else "",
                             held=[cpb.HeldProfile(txn=txn, loser=pid, survivor=survivor,
                                                   age_seconds=max(0.0, now - since))
                                   for pid, (txn, survivor, since) in engine.held.items()])

    @rpc
    async def GetShardInfo(self, request: cpb.ShardInfoRequest, context: Any) -> cpb.ShardInfo:
        return self._info()

    @rpc
    async def SetSlots(self, request: cpb.SetSlotsRequest, context: Any) -> cpb.ShardInfo:
        if request.epoch <= self.engine.epoch:
            raise FailedPrecondition(
                f"epoch {request.epoch} is not newer than this shard's epoch {self.engine.epoch}"
            )
        slots = _slots_of(request.slots)
        for pid in self.engine.held:
            slot = slot_of(pid)
            if slot not in slots and (self.engine.owned_slots is None
                                      or slot in self.engine.owned_slots):
                self.engine.check_moving(pid)  # raises Held, naming the merge
        # newer: checked again once no other change of ownership is syncing
        await self.shard.set_ownership(request.epoch, slots, newer=True)
        return self._info()

    # -- cross-shard merges (the protocol: shards/merge.py)
    @rpc
    async def Hold(self, request: cpb.HoldRequest, context: Any) -> cpb.HoldResponse:
        self._writable()
        if not request.txn:
            raise InvalidArgument("txn: a transaction id is required")
        exported = await self.shard.commit(
            self.engine.plan_hold(request.loser, request.txn, request.survivor))
        return cpb.HoldResponse(packed=msgpack.packb(exported, use_bin_type=True))

    @rpc
    async def Absorb(self, request: cpb.AbsorbRequest, context: Any) -> cpb.AbsorbResponse:
        self._writable()
        _as_judged(self.shard, context)
        if not request.txn:
            raise InvalidArgument("txn: a transaction id is required")
        losers = []
        for i, packed in enumerate(request.losers):
            try:
                loser = msgpack.unpackb(packed, raw=False, strict_map_key=False)
            except (ValueError, msgpack.UnpackException) as exc:
                raise InvalidArgument(f"losers[{i}]: {exc}") from None
            check_loser(loser, f"losers[{i}]")
            losers.append(loser)
        which = request.WhichOneof("request")
        if which == "upsert":
            with _planning(self.engine, context):
                change = self.engine.plan_absorb(request.txn, losers,
                                                 upsert=_spec(request.upsert))
            absorbed = cpb.AbsorbResponse(upsert=upsert_response(self.engine, change))
            await self.shard.commit(change)
            return absorbed
        if which == "record":  # one record of a router's BatchUpsert, as an upsert
            specs = _batch_specs(request.record, *_batch_forms(request.record))
            if len(specs) != 1:
                raise InvalidArgument(f"record: one record, not {len(specs)}")
            with _planning(self.engine, context):
                change = self.engine.plan_absorb(request.txn, losers, upsert=specs[0])
            absorbed = cpb.AbsorbResponse(upsert=upsert_response(self.engine, change))
            await self.shard.commit(change)
            return absorbed
        if which == "link":
            link = request.link
            with _planning(self.engine, context):
                change = self.engine.plan_absorb(request.txn, losers,
                                                 link=(link.id, _idents(link), link.create))
            absorbed = cpb.AbsorbResponse(link=link_response(self.engine, change))
            await self.shard.commit(change)
            return absorbed
        raise InvalidArgument("request: an upsert or a link is required")

    @rpc
    async def Decide(self, request: cpb.DecideRequest, context: Any) -> cpb.DecideResponse:
        self._writable()
        change = self.engine.plan_decide(request.txn, request.survivor)
        return cpb.DecideResponse(committed=await self.shard.commit(change))

    @rpc
    async def Release(self, request: cpb.ReleaseRequest, context: Any) -> cpb.ReleaseResponse:
        self._writable()
        change = self.engine.plan_release(request.loser, request.txn, request.committed)
        released = await self.shard.commit(change)
        return cpb.ReleaseResponse(released=released, durable=self.shard.log is None
                                   or self.shard.config.sync is SyncPolicy.ALWAYS)

    @rpc
    async def Owners(self, request: cpb.OwnersRequest, context: Any) -> cpb.OwnersResponse:
        keys = _packed_array(request.packed)
        return cpb.OwnersResponse(packed=msgpack.packb(self.engine.owners(keys)))

    @rpc
    async def Claim(self, request: cpb.ClaimRequest, context: Any) -> cpb.ClaimResponse:
        change = self.engine.plan_claims(_packed_array(request.packed))
        if not change.empty:  # reads alone are not logged (routers verify what they read)
            self._writable()
            await self.shard.commit(change)
        return cpb.ClaimResponse(packed=msgpack.packb(change.result),
                                 log_position=self.shard.position,
                                 shard=self.shard.config.name)

    @rpc
    async def Suppress(self, request: cpb.SuppressRequest, context: Any
                       ) -> cpb.SuppressResponse:
        identifiers = _packed_array(request.packed) if request.packed else []
        change = self.engine.plan_suppress(identifiers, list(request.ids))
        if not change.empty:
            self._writable()
            await self.shard.commit(change)
        return cpb.SuppressResponse(added=change.result, log_position=self.shard.position,
                                    shard=self.shard.config.name)

    @rpc
    async def Register(self, request: cpb.RegisterRequest, context: Any
                       ) -> cpb.RegisterResponse:
        specs = []
        for i, a in enumerate(request.attributes):
            if a.kind == pb.KIND_UNSPECIFIED:
                raise InvalidArgument(f"attributes[{i}]: kind is not set")
            specs.append((a.name, Kind(a.kind), not a.not_indexed, Merge(int(a.merge))))
        change = self.engine.plan_register(specs)
        if not change.empty:
            self._writable()
            await self.shard.commit(change)
        return cpb.RegisterResponse(attributes=[
            pb.AttributeSpec(name=name, kind=pb.Kind.ValueType(kind), not_indexed=not indexed,
                             merge=pb.AttributeSpec.Merge.ValueType(merge))
            for (name, _, _, _), (kind, indexed, merge) in zip(specs, change.result,
                                                                strict=True)])

    @rpc
    async def Forget(self, request: cpb.ForgetRequest, context: Any) -> cpb.ForgetResponse:
        self._writable()
        change = self.engine.plan_forget(request.ids, request.txns, [
            (r.id, getattr(r, "from"), r.to) for r in request.reforward])
        await self.shard.commit(change)
        return cpb.ForgetResponse(forgotten=len(change.notes), log_position=self.shard.position,
                                  shard=self.shard.config.name)

    def _writable(self) -> None:
        _writable(self.shard)

    async def ExportSlots(self, request: cpb.ExportRequest, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[cpb.ExportChunk]:
        """Stream the profiles of some slots: all of them, or (after_lsn > 0) only those
        changed after that position, deletions included, when this shard still remembers
        that far back (else all of them: the mover's verification notices deletions).
        With `fingerprints`, only [id, version] pairs, for comparing two copies; with
        `identifiers`, only [id, identifiers] pairs, for rebuilding the directory."""
        try:
            slots = _slots_of(request.slots)
        except InvalidArgument as exc:
            _refuse(context, exc)
            return
        engine = self.engine
        if not (request.fingerprints or request.identifiers) and self.shard.replica_of is None:
            # Segments that read the clock may be up to --segment-refresh late here, and
            # the target decides the moved profiles' membership as of now, quietly (a move
            # is nobody's news): bring them up to date first, so watchers hear who aged
            # out or in (from here, as at the next refresh).
            await self.shard.refresh_timed()
        lsn = self.shard.position
        changed = self.shard.recent.since(request.after_lsn) if request.after_lsn else None
        deleted: list[str] = []
        if changed is None:
            ids: list[int] = list(engine.members_of_slots(slots))
        else:
            ids = []
            for pid in changed:
                if slot_of(pid) not in slots:
                    continue
                dense = engine.dense_of.get(pid)
                if dense is None or engine.blobs[dense] is None:
                    deleted.append(pid)
                else:
                    ids.append(dense)
        brief = request.fingerprints or request.identifiers  # pairs, not profiles
        schema = [] if brief else [
            [s.name, int(s.kind), s.indexed, int(s.merge)] for s in engine.schema.by_id]
        # Forwards, merge decisions and claims of the slots: every export carries them all,
        # with the slots they cover, and the import replaces its own for those slots.
        notes = None if brief else engine.notes_in_slots(slots)
        note_slots = slots.serialize()
        batch: list[list[Any]] = []
        times: list[list[int]] = []  # [created, changed] of each profile of the batch
        for n, dense in enumerate(ids, 1):
            blob = engine.blobs[dense]
            if blob is not None:
                if request.fingerprints:
                    batch.append([engine.pids[dense], version_of(blob)])
                elif request.identifiers:
                    batch.append([engine.pids[dense], decode(blob)[2]])
                else:
                    version, attrs, idents, merged = decode(blob)
                    by_id = engine.schema.by_id
                    named = {by_id[a].name: v for a, v in attrs.items()}
                    batch.append([engine.pids[dense], version, named, idents, merged])
                    times.append([engine.created_at(dense), engine.changed[dense]])
            if len(batch) >= EXPORT_CHUNK or n == len(ids):
                chunk: dict[str, Any] = {"schema": schema, "profiles": batch}
                if times:
                    chunk["times"] = times
                if notes is not None:
                    chunk["notes"], chunk["note_slots"], notes = notes, note_slots, None
                    chunk["salt"] = rights.salt_id(engine.salt)
                yield cpb.ExportChunk(packed=msgpack.packb(chunk, use_bin_type=True), lsn=lsn)
                batch, times = [], []
                await asyncio.sleep(0)
        if deleted or not ids:
            chunk = {"schema": schema, "profiles": [], "deleted": deleted}
            if notes is not None:
                chunk["notes"], chunk["note_slots"] = notes, note_slots
                chunk["salt"] = rights.salt_id(engine.salt)
            yield cpb.ExportChunk(packed=msgpack.packb(chunk, use_bin_type=True), lsn=lsn)

    @rpc
    async def ImportProfiles(self, request: cpb.ImportRequest, context: Any
                             ) -> cpb.ImportResponse:
        chunk = msgpack.unpackb(request.packed, strict_map_key=False, use_list=True)
        kinds, rows = check_chunk(chunk)
        engine = self.engine
        change = Change(quiet=True)  # a slot move's copy: nobody's news (watchers)
        pending: dict[str, AttributeSpec] = {}
        next_id = len(engine.schema.by_id)
        from memstore.engine.schema import AttributeSpec

        def aid_of(name: str) -> int:
            nonlocal next_id
            spec = engine.schema.get(name) or pending.get(name)
            if spec is None:
                kind, indexed, merge = kinds[name]
                spec = AttributeSpec(next_id, name, kind, indexed, merge)
                next_id += 1
                pending[name] = spec
                change.schema.append(spec)
            elif spec.kind != kinds[name][0]:
                raise FailedPrecondition(f"attribute {name!r} has kind {spec.kind.label} here "
                                         f"but {kinds[name][0].label} on the source shard")
            return spec.id

        next_dense = len(engine.blobs)
        times = chunk.get("times") or repeat((0, 0))  # older shards send none: not known
        for (pid, version, named, idents, merged), (created, changed) in zip(rows, times):
            attrs = {aid_of(name): value for name, value in named.items()}
            dense = engine.dense_of.get(pid)
            if dense is None:
                dense, next_dense = next_dense, next_dense + 1
            change.images.append(Image(dense, pid, encode(version, attrs, idents, merged)))
            change.times[dense] = (created, changed)  # the source's, not the import's
        owned = engine.owned_slots
        for pid in chunk.get("deleted", ()):
            dense = engine.dense_of.get(pid)
            if dense is None:
                continue
            if owned is None or slot_of(pid) in owned:
                raise FailedPrecondition(f"import deletes profile {pid!r}, but this shard owns "
                                         f"its slot {slot_of(pid)}; imports only fill slots "
                                         "that are moving here")
            change.images.append(Image(dense, pid, None))
        notes = chunk.get("notes")
        if notes is not None:  # replaces this shard's notes of those slots
            if notes.get("suppressed") and chunk.get("salt") != rights.salt_id(engine.salt):
                raise FailedPrecondition(
                    "the slots carry suppression entries hashed with another salt than this "
                    "shard's: start every shard of a cluster with the same --salt-file "
                    "(docs/data-rights.md)")
            covered = chunk.get("note_slots")
            mine = (engine.notes_in_slots(BitMap.deserialize(covered)) if covered is not None
                    else {"forwards": {}, "decided": {}, "claims": {},
                          "registry": {}, "suppressed": {}})  # older: add only
            for table in ("forwards", "decided", "claims", "registry", "suppressed"):
                theirs = notes.get(table, {})
                change.notes += [Note(table, key, None) for key in mine[table]
                                 if key not in theirs]
                change.notes += [Note(table, key, value) for key, value in theirs.items()]
        await self.shard.commit(change)
        if notes:  # a moved claim may be a write's in flight: young here, as it was there
            engine.claims.touch(notes.get("claims", ()))
        return cpb.ImportResponse(applied=len(change.images))

    @rpc
    async def DropSlots(self, request: cpb.DropSlotsRequest, context: Any
                        ) -> cpb.DropSlotsResponse:
        slots = _slots_of(request.slots)
        owned = self.engine.owned_slots
        if owned is None or owned.intersection_cardinality(slots):
            raise FailedPrecondition("cannot drop slots this shard still owns; "
                                     "move their ownership first (SetSlots)")
        # In slices, each its own change: the profiles are invisible already (not owned),
        # so a partial drop is fine and a retry finishes it; one huge change would stall
        # every other call on this shard while it applies.
        members = list(self.engine.members_of_slots(slots))
        notes = self.engine.notes_in_slots(slots)
        await self.shard.commit(Change(quiet=True, notes=[
            Note(table, key, None) for table, entries in notes.items() for key in entries
        ] + [Note("forwards", merged, survivor)  # ids staying here, merged into leavers
             for merged, survivor in self.engine.separated(slots).items()]))
        for start in range(0, len(members), DROP_CHUNK):
            await self.shard.commit(Change(quiet=True, images=[
                Image(d, self.engine.pids[d] or "", None)
                for d in members[start:start + DROP_CHUNK] if self.engine.blobs[d] is not None
            ]))
            await asyncio.sleep(0)
        return cpb.DropSlotsResponse(dropped=len(members))


# ---------------------------------------------------------------------- serving

def make_server(shard: Shard, host: str, port: int, link: bool = True,
                security: ServerSecurity | None = None, limits: QueryLimits = DEFAULT_LIMITS,
                replication: ReplicationService | None = None
                ) -> tuple[grpc.aio.Server, int, LinkServer | None]:
    """The shard's gRPC server (not started), its port, and its link (not started; none
    under TLS or tokens: it has neither). `replication`: serve it."""
    security = security or ServerSecurity()
    link = link and not security.guarded
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ]
    # Guard last: authentication answers first, so a caller without credentials learns
    # nothing of how its request parsed (memstore/server/guard.py).
    server = grpc.aio.server(options=options, interceptors=[*security.interceptors(), Guard()])
    service = MemstoreService(shard, limits)
    memstore_pb2_grpc.add_MemstoreServicer_to_server(service, server)
    link_server = LinkServer(service, pb.DESCRIPTOR.services_by_name["Memstore"],
                             audited=AUDITED) if link else None
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = [pb.DESCRIPTOR.services_by_name["Memstore"].full_name,
                cpb.DESCRIPTOR.services_by_name["ShardControl"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    if replication is not None:
        replication_pb2_grpc.add_ReplicationServicer_to_server(replication, server)
        services.append(rpb.DESCRIPTOR.services_by_name["Replication"].full_name)
    reflection.enable(server, tuple(services))
    bound = security.bind(server, f"{host}:{port}")
    control = ShardControlService(shard, f"{host}:{bound}", link_server)
    cluster_pb2_grpc.add_ShardControlServicer_to_server(control, server)
    if link_server is not None:  # directory claims, merges, map reads: the router's too
        link_server.add(control, cpb.DESCRIPTOR.services_by_name["ShardControl"])
        server.add_generic_rpc_handlers((describe_handler(link_server),))
    server._memstore_health = health_servicer  # type: ignore[attr-defined]
    return server, bound, link_server


_gc_started = 0.0


def _report_long_collections(phase: str, info: dict[str, int]) -> None:
    """Log garbage-collector passes long enough to show in request latency."""
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
        return
    paused = time.perf_counter() - _gc_started
    if paused >= 0.02:
        log.warning("garbage collection (generation %d) paused the shard %.0f ms",
                    info["generation"], paused * 1000)


async def _watch_log(shard: Shard, health_servicer: Any) -> None:
    """A shard whose log failed serves reads but refuses writes until restart: health
    checks (load balancers, the Docker HEALTHCHECK) then answer NOT_SERVING."""
    while shard.log is not None and not shard.log.failed:
        await asyncio.sleep(1.0)
    if shard.log is not None:
        log.error("the log failed: health checks now answer NOT_SERVING",
                  extra={"failure": shard.log.failure})
        for service in ("", "memstore.v1.Memstore"):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)


def stop_when_stdin_closes(stop: asyncio.Event) -> None:
    """Set `stop` once standard input reaches end of file. A supervisor keeps the write end
    of a pipe on our stdin; the kernel closes it when the supervisor dies, however it dies
    (a SIGKILL included), so its shards never outlive it. Anything written is ignored."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            log.warning("standard input closed (the supervisor is gone): stopping")
            stop.set()

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)


async def serve(config: ShardConfig, host: str = "127.0.0.1", port: int = 7071,
                slots: BitMap | None = None, ready: Callable[[int], None] | None = None,
                metrics_port: int | None = None, link_port: int | None = 0,
                stop_on_eof: bool = False, security: ServerSecurity | None = None,
                limits: QueryLimits = DEFAULT_LIMITS, replica_of: str | None = None,
                replication: str = "async", replication_timeout: float = 5.0,
                replication_fallback: bool = False,
                primary_credentials: Credentials | None = None,
                coordinator: str | None = None, lease_seconds: int = 5,
                advertise: str | None = None) -> None:
    """Run one shard until SIGTERM/SIGINT (or, with `stop_on_eof`, until standard input
    closes: its supervisor died), then drain in-flight calls and close the log.
    `link_port`: where routers' unary calls may come over the shard link (memstore/server/link.py;
    0 picks a free port), on the same host; None serves gRPC alone. `security`: TLS and
    tokens (memstore/server/security.py); the auth file is read again on SIGHUP. `limits`:
    the size of work one query may ask for. `replica_of`: follow that primary
    (memstore/replication/), presenting `primary_credentials`; else serve replicas,
    `replication` ("async" or "sync") saying whether a write waits for one
    (`replication_timeout` seconds at most; `replication_fallback`: then acknowledge
    anyway). `coordinator` (etcd://HOST:PORT): etcd decides whether this process is its
    shard's primary or follows it, with leases of `lease_seconds`
    (memstore/replication/coordinator.py). `advertise`: where others reach this process
    (a replica's address for reads, a member's in etcd), if not `host`:`port`."""
    security = security or ServerSecurity()
    security.check_host(host)
    if replica_of is not None and config.data_dir is None:
        raise ValueError("a replica keeps its own log and snapshots: --replica-of needs a "
                         "data directory, not --in-memory")
    if replication == "sync" and config.data_dir is None:
        raise ValueError("--replication sync needs a data directory (replicas follow the "
                         "log), not --in-memory")
    etcd = None
    if coordinator is not None:
        if config.data_dir is None or replica_of is not None:
            raise ValueError("--coordinator: etcd decides which member is primary and the "
                             "others follow its log: give a data directory, not "
                             "--in-memory, and no --replica-of")
        etcd, replica_of = await coordinated.connect(coordinator, config.name,
                                                     advertise or f"{host}:{port}",
                                                     lease_seconds / 3)
    followed: list[str | None] = []
    shard = await Shard.open(config, prepare=(
        (lambda data: followed.append(history.for_replica(
            data, candidate=replica_of == coordinated.ELECTED))) if replica_of else None))
    heap_for_queries()  # recovered: the heap's serving setting (memstore/server/heap.py)
    # A replica's --replication is what it does once promoted (memstore cluster failover).
    roles = Roles(shard, replication, replication_timeout, replication_fallback,
                  primary_credentials)
    roles.followed = followed[0] if followed else None
    elector = None
    if etcd is not None:
        elector = coordinated.Elector(etcd, config.name, lease_seconds, roles, slots)
        roles.fence = elector.fence
    if replica_of is not None:
        shard.replica_of = replica_of
    else:
        roles.open_primary()
    # The engine holds few container objects (profiles are bytes), but a bulk load makes
    # and drops millions of small lists and dicts: collect young objects less often and
    # never rescan what recovery loaded.
    settle_heap()
    gc.callbacks.append(_report_long_collections)
    if slots is not None and shard.engine.epoch == 0 and shard.engine.owned_slots is None \
            and replica_of is None:
        await shard.set_ownership(1, slots)
    server, bound, link = make_server(shard, host, port, link=link_port is not None,
                                      security=security, limits=limits,
                                      replication=roles.service)
    await server.start()
    if link is not None:
        await link.start(host, link_port or 0)
    health_servicer = server._memstore_health  # type: ignore[attr-defined]
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("memstore.v1.Memstore", health_pb2.HealthCheckResponse.SERVING)
    shard.start_background()
    watch_health = asyncio.get_running_loop().create_task(_watch_log(shard, health_servicer))
    roles.address = advertise or f"{host}:{bound}"
    if replica_of not in (None, coordinated.ELECTED):
        roles.follow(replica_of, followed[0])
    if elector is not None:
        elector.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, security.reload)  # never the default (exit)
    if stop_on_eof:
        stop_when_stdin_closes(stop)
    if metrics_port is not None:
        scrape = metrics.serve_metrics(
            host, metrics_port, lambda: len(shard.engine.live),
            lambda: shard.log.size_bytes if shard.log else 0, security.metrics_tls())
        scheme = "https" if security.tls else "http"
        url = f"{scheme}://{host}:{scrape}/metrics"
        log.info(f"metrics on {url}", extra={"url": url})
    if link is not None:
        log.info(f"shard link on {host}:{link.port}", extra={"port": link.port})
    logs.ready(log, f"{host}:{bound}")
    if ready is not None:
        ready(bound)
    await stop.wait()
    watch_health.cancel()
    log.info("shutting down")
    if elector is not None:
        await elector.stop()  # writes refused, then the lease revoked: a replica takes over
    await roles.stop()
    await health_servicer.enter_graceful_shutdown()
    started = time.monotonic()
    await asyncio.gather(server.stop(grace=5.0), *([link.stop(grace=5.0)] if link else []))
    outcome = await shard.snapshot_before_stop()  # no call is in flight any more
    log.info(f"snapshot before stopping: {outcome}", extra={"stop_snapshot": outcome})
    await shard.close()
    log.info("stopped in %.2fs", time.monotonic() - started)
