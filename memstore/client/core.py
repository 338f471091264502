"""Python clients for memstore: `Client` (blocking) and `AsyncClient` (asyncio).

Both have the same methods with the same arguments; every method is defined once, in
`ClientMethods`, as "build a request, name the RPC, decode the response", and each client
supplies the transport (`_call`). Against a router they see the whole cluster; against a
shard, that shard. Reads are retried on UNAVAILABLE with backoff (they are idempotent);
writes are not, because an increment retried after a lost answer would apply twice.

With `link=True`, unary calls (Get, BatchGet, Upsert, Count, ...) go over the server's link
(memstore/server/link.py), a lighter protocol than gRPC on a port of its own, once it is up;
until then, and whenever it cannot be used, over gRPC, with the same answers and errors.
Streams (`iter_ids`) and bulk loads (`load`) always use gRPC.

With `direct_reads=True`, a Get by primary id goes straight to the shard owning the id's
slot, as the router's shard list last said (one gRPC hop instead of two), naming the shard
and slot epoch it expects (EXPECT_SHARD), which any other shard, or that shard after its
slots changed, refuses. Any answer but the profile or NOT_FOUND (the slot moved, the id was
merged away, a merge holds it, the shard is down) sends that Get through the router and
makes the next one read the list again.

Values: str, int, float, bool, datetime (timezone-aware) and lists of str.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from array import array
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from typing import Any, Self

import grpc
import msgpack
from pyroaring import BitMap

from memstore import pbvalues
from memstore.client import export
from memstore.client.events import EVENT_CHUNK, EventChunk, EventRefusal, Parsed, event_chunks
from memstore.client.refusal import Refusal
from memstore.client.replicas import REPLICA_READS, ReplicaReads, replica_timeout, unreachable
from memstore.engine import eventpack
from memstore.engine.columnar import CODE_SHARE, pack_columns, unpack_columns
from memstore.hashslot import (
    ADMIN_SERVICE,
    EXPECT_SHARD,
    SLOT_COUNT,
    owners_by_epoch,
    slot_of,
)
from memstore.server.link import (
    DESCRIBE,
    HELLO_TIMEOUT,
    RETRY_AFTER,
    BlockingLinkStub,
    LinkStub,
    advertised,
)
from memstore.server.security import Credentials
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:7070"
# Chunks a bulk load keeps in flight. With 4 a shard sat idle 10-25% of a 1,000-a-chunk
# load waiting for the next request; from 6 on it stays busy (16 loaded no faster and
# held more memory). See docs/protocol.md.
LOAD_CONCURRENCY = 8
# Profiles a bulk-load request carries. A shard pays a fixed part per request (a few
# numpy and bitmap calls per column, the call itself): at 1,000 it spent 14 us a profile,
# at 4,000 11.3 us. Larger loaded no faster. The price: a read that arrives during a load
# waits for the request in hand (~45 ms of shard time at 4,000). See docs/protocol.md.
LOAD_CHUNK = 4000
# ... unless its records pack larger than this (wide profiles): then the chunk goes as
# halves, and halves of those, each at most this size; a quarter of the 64 MiB a message
# may carry. A single record larger than this goes alone, for the server to judge.
LOAD_CHUNK_BYTES = 16 << 20
_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20)]
_READS = {"Get", "BatchGet", "GetSchema", "Count", "QueryIds", "GroupBy", "QueryBitmap", "Stats",
          "ExportProfile", "ListSegments"}
_RETRIES = 3
# The router's JSON admin call listing shards, addresses and slots (shards/admin.py).
LIST_SHARDS = f"/{ADMIN_SERVICE}/ListShards"
REFRESH_EVERY = 1.0  # direct_reads: seconds between shard-list refreshes after a miss
_SERVICE = pb.DESCRIPTOR.services_by_name["Memstore"]

# Proto enum numbers by the names the client accepts (the .pyi types them as NewTypes).
_OPS: dict[str, Any] = {"set": 1, "set_once": 2, "unset": 3, "increment": 4,
                        "add_to_set": 5, "remove_from_set": 6}
_KINDS: dict[str, Any] = {"string": 1, "int": 2, "float": 3, "bool": 4, "timestamp": 5,
                          "string_list": 6, "event_days": 7}
_KIND_NAMES = {v: k for k, v in _KINDS.items()}
_MERGES: dict[str, Any] = {"default": 0, "sum": 1, "min": 2, "max": 3}
_MERGE_NAMES = {v: k for k, v in _MERGES.items()}


class ClientError(Exception):
    """A call failed; `code` is the grpc.StatusCode, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str, method: str) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.code = code
        self.details = details


class LoadError(ClientError):
    """A bulk load stopped: the server refused a record (without `on_refused`), refused a
    whole request, or did not answer. `applied`: profiles the server applied, exactly (the
    chunks it answered, and the parts of a refused chunk that applied on other shards);
    `record`: the index of the refused record among those given, and `id` its primary id
    (None when no one record was at fault); `unknown`: records sent whose outcome is not
    known (the server did not answer for them; they may or may not have applied), over
    every request that failed so; `sent`: how many of the records given were sent (the
    first `sent`; none after them was, so a load resumes there)."""

    def __init__(self, code: grpc.StatusCode, details: str, *, applied: int,
                 record: int | None = None, id: str | None = None, unknown: int = 0,
                 sent: int = 0) -> None:
        super().__init__(code, details, "BatchUpsert")
        self.applied = applied
        self.record = record
        self.id = id
        self.unknown = unknown
        self.sent = sent


# Called for each record a load's server refuses, when the load goes on without it:
# (its index among the records given, its primary id, the server's refusal).
OnRefused = Callable[[int, str, ClientError], None]


@dataclass(frozen=True)
class UpsertResult:
    id: str
    version: int
    created: bool


@dataclass(frozen=True)
class LinkResult:
    id: str
    version: int
    merged_ids: list[str]


_MISSING = object()


def _key(id: str | None = None, identifier: tuple[str, str] | None = None) -> pb.ProfileKey:
    if identifier is not None:
        return pb.ProfileKey(identifier=pb.Identifier(kind=identifier[0], value=identifier[1]))
    if id is None:
        raise ValueError("give an id or an identifier")
    return pb.ProfileKey(id=id)


def _keys(keys: Iterable[str | tuple[str, str]]) -> list[pb.ProfileKey]:
    return [_key(identifier=k) if isinstance(k, tuple) else _key(k) for k in keys]


def _batch_request(keys: Iterable[str | tuple[str, str]], attributes: Sequence[str]
                   ) -> pb.BatchGetRequest:
    """Primary ids alone go as `ids` (no ProfileKey message each); a mix as `keys`."""
    keys = list(keys)
    ids = [k for k in keys if type(k) is str]
    if len(ids) == len(keys):
        return pb.BatchGetRequest(ids=ids, attributes=attributes, packed=True)
    return pb.BatchGetRequest(keys=_keys(keys), attributes=attributes, packed=True)


def _query(query: str | pb.Query, allow_partial: bool = False) -> pb.QueryRequest:
    if isinstance(query, str):
        return pb.QueryRequest(text=query, allow_partial=allow_partial)
    if isinstance(query, pb.Query):
        return pb.QueryRequest(query=query, allow_partial=allow_partial)
    from memstore.query import to_proto  # an AST node

    return pb.QueryRequest(query=to_proto(query), allow_partial=allow_partial)


def _profile(p: pb.Profile) -> dict[str, Any]:
    if p.packed_attributes:
        attributes = msgpack.unpackb(p.packed_attributes, timestamp=3)
    else:
        attributes = {k: pbvalues.from_pb(v) for k, v in p.attributes.items()}
    return {"id": p.id, "version": p.version, "attributes": attributes,
            "identifiers": [(i.kind, i.value) for i in p.identifiers],
            "merged_ids": list(p.merged_ids)}


def _answers(found: list[Any], asked: int) -> list[Any]:
    """One answer per key asked, or the server did not read them all (one older than this
    client ignores BatchGetRequest.ids): an error, not a short list."""
    if len(found) != asked:
        raise ClientError(grpc.StatusCode.FAILED_PRECONDITION,
                          f"the server answered {len(found)} of {asked} keys: is it older "
                          f"than this client?", "BatchGet")
    return found


def _batch(r: pb.BatchGetResponse) -> list[dict[str, Any] | None]:
    if not r.packed:
        return [_profile(x.profile) if x.found else None for x in r.results]
    with _collector_paused():  # ~1,000 profiles: tens of thousands of new containers
        return _unpack_batch(r.packed)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Keep the cyclic collector off inside the block (msgpack's own advice for large
    messages). Decoding or packing ~1,000 profiles makes tens of thousands of new
    containers, which wake the collector again and again to walk the caller's heap (a
    fifth of a BatchGet's decode). Such a batch builds no cycles, and whatever garbage
    the caller's own code leaves in one is collected once the block ends, so nothing is
    lost. The collector comes back on after the block, also after an error, unless the
    caller had it off. Another thread may end the pause early: harmless, the block merely
    pays for the collections."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _unpack_batch(packed: bytes) -> list[dict[str, Any] | None]:
    # The client's share of a BatchGet is this loop (~1,000 profiles a call), so it does
    # per profile only what it must: one unpack, the renaming, and each timestamp.
    tables, entries = msgpack.unpackb(packed, strict_map_key=False)
    names = [{aid: spec[0] for aid, spec in t.items()} for t in tables]
    stamps = [[aid for aid, spec in t.items() if spec[1] == _KINDS["timestamp"]]
              for t in tables]
    # day records (event.<name>.days) are read through did(...), never returned
    hidden = [[aid for aid, spec in t.items() if spec[1] == _KINDS["event_days"]]
              for t in tables]
    unpack, to_datetime = msgpack.unpackb, pbvalues.micros_to_datetime
    out: list[dict[str, Any] | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        pid, blob, t = entry
        version, attrs, idents, merged = unpack(blob, strict_map_key=False)
        named = names[t]
        attributes = {named[aid]: value for aid, value in attrs.items()}
        for aid in stamps[t]:
            micros = attrs.get(aid)
            if micros is not None:
                attributes[named[aid]] = to_datetime(micros)
        for aid in hidden[t]:
            attributes.pop(named[aid], None)
        out.append({"id": pid, "version": version, "attributes": attributes,
                    "identifiers": list(map(tuple, idents)), "merged_ids": merged})
    return out


def pack_records(records: Iterable[Mapping[str, Any]], code_share: float = CODE_SHARE) -> bytes:
    """Pack {"id", "attributes", "identifiers"} dicts for BatchUpsertRequest.columns."""
    return pack_columns(records if isinstance(records, list) else list(records), _pack_default,
                        code_share)


def _pack_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value)
    if isinstance(value, datetime):
        raise TypeError(f"timestamp {value!r} has no time zone; use an aware datetime")
    if isinstance(value, int):
        raise TypeError(f"integer {value} is outside the int64 range")
    raise TypeError(f"cannot send a value of type {type(value).__name__}")


def _ops(set: Mapping[str, Any] | None, ops: Sequence[tuple[Any, ...]] | None
         ) -> list[pb.Operation]:
    out = []
    from memstore.engine.values import flatten

    for name, value in flatten(set or {}).items():
        out.append(pb.Operation(op=pb.Operation.SET, attribute=name, value=pbvalues.to_pb(value)))
    for i, one in enumerate(ops or ()):
        if not isinstance(one, tuple | list) or not 2 <= len(one) <= 3:
            raise ValueError(f"ops[{i}]: ({{operation}}, {{attribute}}, {{value}}), or "
                             f"('unset', {{attribute}}); got {one!r}")
        op, name = one[0], one[1]
        code = _OPS.get(op)
        if code is None:
            raise ValueError(f"ops[{i}]: unknown operation {op!r}; one of {', '.join(_OPS)}")
        operation = pb.Operation(op=code, attribute=name)
        if op != "unset":
            if len(one) != 3:
                raise ValueError(f"ops[{i}]: {op} needs a value: ({op!r}, {name!r}, value)")
            operation.value.CopyFrom(pbvalues.to_pb(one[2]))
        out.append(operation)
    return out


def _spec(a: Mapping[str, Any]) -> pb.AttributeSpec:
    return pb.AttributeSpec(name=a["name"], kind=_KINDS[a["kind"]],
                            not_indexed=not a.get("indexed", True),
                            merge=_MERGES[a.get("merge", "default")])


def _schema(r: pb.SchemaResponse) -> list[dict[str, Any]]:
    return [{"name": a.name, "kind": _KIND_NAMES[a.kind], "indexed": not a.not_indexed,
             "merge": _MERGE_NAMES[a.merge]} for a in r.attributes]


class _SlotOwners:
    """direct_reads: the shard owning each slot, as the router's ListShards last said, and
    a stub for each shard. `connect(address)` makes a (channel, stub) pair.

    A direct Get names the shard it expects, "name:epoch" (EXPECT_SHARD): a shard whose
    name or slot epoch differs refuses it, so a reused address or a table older than the
    shard's last slot change sends the Get to the router instead of answering it."""

    def __init__(self, connect: Callable[[str], tuple[Any, Any]]) -> None:
        # (shards as (address, EXPECT_SHARD metadata), owner index per slot), replaced
        # whole: threads sharing a Client never pair one table's indexes with another's.
        self.table: tuple[list[tuple[str, Any]], array[int]] = (
            [], array("h", [-1]) * SLOT_COUNT)
        self.connect = connect
        self.shards: dict[str, tuple[Any, Any]] = {}
        self.lock = threading.Lock()  # around connect and the claim of a refresh
        self.enabled = True  # off for good once the address turns out to be a shard
        self.fresh_until = 0.0  # read directly only until then; 0: refresh first
        self.refreshed_at = -REFRESH_EVERY

    def due(self) -> bool:
        """Whether this read asks the router for the shard list (one caller at a time)."""
        now = time.monotonic()
        if now < self.fresh_until or now - self.refreshed_at < REFRESH_EVERY:
            return False
        with self.lock:
            if now - self.refreshed_at < REFRESH_EVERY:
                return False  # another thread claimed it
            self.refreshed_at = now
            return self.enabled

    def load(self, answer: bytes) -> None:
        """Take a ListShards answer (JSON). Where two shards claim a slot, the higher epoch
        owns it, as in the router's map; a list with slots nobody owns, or claimed twice,
        is read again within REFRESH_EVERY (a move was switching)."""
        try:
            listed = json.loads(answer)
            reachable = [s for s in listed.get("shards", []) if s.get("reachable", True)]
            shards = [(str(s["address"]), ((EXPECT_SHARD, f"{s['name']}:{int(s['epoch'])}"),))
                      for s in reachable]
            owner, exact = owners_by_epoch(
                (int(s["epoch"]), [(int(a), int(b)) for a, b in s.get("slots", [])])
                for s in reachable)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ClientError(grpc.StatusCode.INTERNAL, f"unreadable shard list: {exc}",
                              "ListShards") from None
        self.table = (shards, array("h", owner))
        settled = listed.get("exact", True) and exact
        self.fresh_until = float("inf") if settled else time.monotonic() + REFRESH_EVERY

    def failed(self, exc: grpc.RpcError | ClientError) -> None:
        """The router's list could not be read: a shard (or an older router) does not have
        it, and direct reads stop; anything else is tried again REFRESH_EVERY later."""
        if isinstance(exc, grpc.RpcError) and \
                exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
            self.enabled = False

    def stub(self, pid: str) -> tuple[Any, Any] | None:
        """(stub, call metadata) for the shard owning pid's slot, or None: ask the router."""
        if not self.enabled or time.monotonic() >= self.fresh_until:
            return None
        shards, owner = self.table
        index = owner[slot_of(pid)]
        if index < 0:
            return None
        address, metadata = shards[index]
        if address not in self.shards:
            with self.lock:
                if address not in self.shards:
                    self.shards[address] = self.connect(address)
        return self.shards[address][1], metadata

    def refused(self, exc: grpc.RpcError, method: str) -> Any:
        """What a direct Get the shard refused gives: _MISSING for NOT_FOUND (the shard
        confirmed it is the expected owner), else None (ask the router: the slot moved,
        the id was merged away, a merge holds it, the shard is down), and the table is read
        again before the next direct Get. A spent deadline is the caller's error."""
        code = exc.code()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.NOT_FOUND:
            return _MISSING
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise _error(exc, method) from None
        self.fresh_until = 0.0
        return None


class ClientMethods:
    """The methods Client and AsyncClient share, each written once: build a request, name
    the call, decode the answer. On AsyncClient each returns an awaitable of what it says.
    """

    def _call(self, method: str, request: Any, decode: Callable[[Any], Any],
              missing: Any = _MISSING, direct: str | None = None) -> Any:
        """`direct`: the primary id of a Get that direct_reads may send to its shard."""
        raise NotImplementedError

    # profiles
    def upsert(self, id: str, set: Mapping[str, Any] | None = None, *,
               ops: Sequence[tuple[Any, ...]] | None = None,
               identifiers: Sequence[tuple[str, str]] = (),
               expected_version: int | None = None) -> Any:
        """Change profile `id` (created when absent): `set` attributes (nested dicts are
        flattened with dots), then `ops` in order, as (operation, attribute, value) with
        operations set, set_once, increment, add_to_set, remove_from_set, or ("unset",
        attribute); then link
        `identifiers` ((kind, value) pairs; one another profile holds merges it into this
        one). All at once or nothing. `expected_version`: refuse (FAILED_PRECONDITION) unless
        the profile is at that version (0: must not exist yet). Returns UpsertResult(id,
        version, created); `id` is the survivor's when `id` was merged away."""
        request = pb.UpsertRequest(id=id, operations=_ops(set, ops),
                                   identifiers=[pb.Identifier(kind=k, value=v)
                                                for k, v in identifiers])
        if expected_version is not None:
            request.expected_version = expected_version
        return self._call("Upsert", request,
                          lambda r: UpsertResult(r.id, r.version, r.created))

    def batch_upsert(self, records: Iterable[Mapping[str, Any]]) -> Any:
        """Write many records ({"id", "attributes", "identifiers"}) in one call, each
        setting its attributes; returns how many applied. For large inputs use `load`."""
        records = list(records)
        request = pb.BatchUpsertRequest(columns=pack_records(records))
        return self._call("BatchUpsert", request, lambda r: _applied(r.applied, len(records)))

    def get(self, id: str | None = None, *, identifier: tuple[str, str] | None = None,
            attributes: Sequence[str] = ()) -> Any:
        """The profile `id`, or the one holding `identifier` ((kind, value)), as a dict
        {"id", "version", "attributes", "identifiers", "merged_ids"}; None if there is none.
        `attributes`: only these."""
        request = pb.GetRequest(key=_key(id, identifier), attributes=attributes, packed=True)
        return self._call("Get", request, lambda r: _profile(r.profile), missing=None,
                          direct=id if identifier is None else None)

    def batch_get(self, keys: Iterable[str | tuple[str, str]], attributes: Sequence[str] = ()
                  ) -> Any:
        """Profiles for many keys (primary ids, or (kind, value) identifiers), in order:
        a dict as `get` returns, or None, for each."""
        request = _batch_request(keys, attributes)
        asked = len(request.keys) + len(request.ids)
        return self._call("BatchGet", request, lambda r: _answers(_batch(r), asked))

    def delete(self, id: str | None = None, *, identifier: tuple[str, str] | None = None) -> Any:
        """Erase profile `id` (or the one holding `identifier`): its attributes, identifiers
        and the ids merged into it. True if there was one. `erase` returns the receipt."""
        request = pb.DeleteRequest(key=_key(id, identifier))
        return self._call("Delete", request, lambda r: r.deleted)

    # data rights (docs/data-rights.md)
    def export(self, id: str | None = None, *, identifier: tuple[str, str] | None = None
               ) -> Any:
        """Everything held about the person `id` (or the one holding `identifier`), or
        None: {"id", "version", "created", "changed", "attributes" ({name: {"kind",
        "value"}}), "identifiers", "merged_ids", "events" ({name: {"count", "first",
        "last"}}), "slot", "shard", "sections"}."""
        request = pb.ExportProfileRequest(key=_key(id, identifier))
        return self._call("ExportProfile", request, export.person, missing=None)

    def erase(self, id: str | None = None, *, identifier: tuple[str, str] | None = None,
              suppress: bool = False) -> Any:
        """Erase the person `id` (or the one holding `identifier`) and return the receipt,
        or None if there is no such profile: {"receipt", "erased" ([{"id", "merged_ids",
        "identifiers"}]), "erased_at", "suppressed", "log_position" (a shard's) or
        "shard_positions" (a router's: shard -> the log position after which no snapshot
        holds the person), "hashed_ids" (as the audit log has them)}. `suppress`: refuse
        later writes naming the id or an identifier (FAILED_PRECONDITION)."""
        request = pb.DeleteRequest(key=_key(id, identifier), suppress=suppress)
        return self._call("Delete", request,
                          lambda r: export.receipt(r) if r.deleted else None)

    def link(self, id: str, identifiers: Sequence[tuple[str, str]], create: bool = False) -> Any:
        """Give `identifiers` to profile `id`, merging into it every profile that held one
        (create the profile first if `create`). Returns LinkResult(id, version, merged_ids).
        """
        request = pb.LinkRequest(id=id, create=create, identifiers=[
            pb.Identifier(kind=k, value=v) for k, v in identifiers])
        return self._call("Link", request,
                          lambda r: LinkResult(r.id, r.version, list(r.merged_ids)))

    def track(self, id: str | None, event: str, at: datetime | None = None, count: int = 1,
              *, identifier: tuple[str, str] | None = None) -> Any:
        """Record `count` occurrences of `event` at `at` (default: now; any past time:
        backfill) for profile `id` (created when absent), or for the profile holding
        `identifier`: event.<event>.count, .first and .last, and the event's day record
        for did(...) when `at` is within the retention. Returns the profile's new version."""
        request = pb.TrackRequest(id=id or "", event=event, count=count)
        if identifier is not None:
            request.identifier.CopyFrom(pb.Identifier(kind=identifier[0], value=identifier[1]))
        if at is not None:
            request.at.CopyFrom(pbvalues.to_pb(at).timestamp_value)
        return self._call("Track", request, lambda r: r.version)

    def track_batch(self, events: Iterable[Mapping[str, Any]]) -> Any:
        """Track many events in one call: dicts {"id" or "identifier", "event", "at",
        "count"} ("at": a datetime, an ISO-8601 string or int microseconds since the
        epoch, default now; "count" default 1), each as `track` would. Returns how many
        applied (all, or an error naming the event at fault: `events[i]`). For large
        inputs use `load_events`."""
        chunk = next(event_chunks(events, 2**62), None)
        packed = chunk.packed() if chunk is not None else eventpack.pack([], [], [], [])
        return self._call("TrackBatch", pb.TrackBatchRequest(packed=packed),
                          lambda r: r.applied)

    # schema
    def declare(self, attributes: Iterable[Mapping[str, Any]]) -> Any:
        """Declare attributes before their first write: dicts {"name", "kind" (string,
        int, float, bool, timestamp, string_list), "indexed" (default True), "merge"
        (default, sum, min, max)}. Returns the schema."""
        request = pb.DeclareAttributesRequest(attributes=[_spec(a) for a in attributes])
        return self._call("DeclareAttributes", request, _schema)

    def schema(self) -> Any:
        """Every attribute's declaration: dicts {"name", "kind", "indexed", "merge"}."""
        return self._call("GetSchema", pb.GetSchemaRequest(), _schema)

    # queries
    def count(self, query: Any, *, allow_partial: bool = False) -> Any:
        """How many profiles match `query` (the text form, a memstore.v1.Query, or a
        syntax tree from memstore.query). `allow_partial`: answer without shards that are
        down instead of failing."""
        return self._call("Count", _query(query, allow_partial), lambda r: r.count)

    def ids(self, query: Any, *, page_size: int = 1000, cursor: str = "",
            allow_partial: bool = False) -> Any:
        """One page of matching ids and the cursor of the next page ("" at the end)."""
        request = pb.QueryIdsRequest(query=_query(query, allow_partial), page_size=page_size,
                                     cursor=cursor)
        return self._call("QueryIds", request, lambda r: (list(r.ids), r.next_cursor))

    def group_by(self, query: Any, attribute: str, top_n: int = 10, *,
                 allow_partial: bool = False) -> Any:
        """Exact counts of matching profiles per value of a string, bool or list
        `attribute`, as (value, count), most common first (ties by value); top_n=0: all."""
        request = pb.GroupByRequest(query=_query(query, allow_partial), attribute=attribute,
                                    top_n=top_n)
        return self._call("GroupBy", request, lambda r: [
            (pbvalues.from_pb(g.value), g.count) for g in r.groups])

    def bitmaps(self, query: Any, *, allow_partial: bool = False) -> Any:
        """The matching profiles as a pyroaring BitMap of shard-local dense ids, per
        shard name (for engines that combine segments themselves)."""
        return self._call("QueryBitmap", _query(query, allow_partial), lambda r: {
            b.shard: BitMap.deserialize(b.bitmap) for b in r.bitmaps})

    # operations
    def snapshot(self) -> Any:
        """Take a snapshot now (through a router: of every shard)."""
        return self._call("Snapshot", pb.SnapshotRequest(), lambda r: {
            "path": r.path, "log_position": r.log_position, "profiles": r.profiles,
            **({"shard_positions": dict(r.shard_positions)} if r.shard_positions else {})})

    def stats(self) -> Any:
        """Counts and state of the server (through a router: summed, with each shard's)."""
        return self._call("Stats", pb.StatsRequest(), lambda r: {
            "profiles": r.profiles, "identifiers": r.identifiers, "attributes": r.attributes,
            "log_bytes": r.log_bytes, "shard": r.shard, **dict(r.info)})

    # saved segments
    def create_segment(self, name: str, query: Any, *, allow_unknown: bool = False) -> Any:
        """Save `query` as segment `name`: its members are kept current on every write,
        `in_segment("name")` reads them in queries, and `watch` streams who enters and
        leaves. Creating the same definition again is a no-op. An attribute or event
        nobody has had yet is refused as a typo would be, unless `allow_unknown` (a
        segment defined before its data: it matches nobody until someone has it). Returns
        its description ({"name", "query", "members", "created_at", "broken"})."""
        request = pb.CreateSegmentRequest(name=name, query=_query(query))
        request.query.unknown_attribute_is_empty = allow_unknown
        return self._call("CreateSegment", request, _segment)

    def segments(self) -> Any:
        """Every saved segment's description (see create_segment), by name."""
        return self._call("ListSegments", pb.ListSegmentsRequest(),
                          lambda r: [_segment(s) for s in r.segments])

    def delete_segment(self, name: str) -> Any:
        """Forget saved segment `name`; True if there was one."""
        return self._call("DeleteSegment", pb.DeleteSegmentRequest(name=name),
                          lambda r: r.deleted)


def _replica_reads(read_from: str, connect: Callable[[str], tuple[Any, Any]]
                   ) -> ReplicaReads | None:
    if read_from not in ("primary", "replica"):
        raise ValueError(f"read_from={read_from!r}: \"primary\" or \"replica\"")
    return ReplicaReads(connect) if read_from == "replica" else None


def _connect(open_channel: Callable[..., Any]) -> Callable[[str], tuple[Any, Any]]:
    """(channel, stub) for a shard address, with Credentials.channel or its aio twin."""
    def connect(address: str) -> tuple[Any, Any]:
        channel = open_channel(address, _OPTIONS)
        return channel, memstore_pb2_grpc.MemstoreStub(channel)
    return connect


def _error(exc: grpc.RpcError, method: str) -> ClientError:
    return ClientError(exc.code(), exc.details() or "", method)  # type: ignore[attr-defined]


class Client(ClientMethods):
    """Blocking client. `with Client(address) as c: c.get("u1")`."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float | None = 30.0,
                 direct_reads: bool = False, link: bool = False, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 token: str | None = None, read_from: str = "primary") -> None:
        """`tls_ca`: the CA file that signed the server's certificate (TLS); `tls_cert` and
        `tls_key`: a client certificate, for servers that require one; `token`: sent as
        `authorization: Bearer TOKEN` with every call. The link carries neither, so with
        any of them calls stay on gRPC. `read_from="replica"`: send reads to a replica of
        the shard at `address` (memstore.client.replicas; they answer as of its lag),
        writes to `address`."""
        self.address = address
        self.timeout = timeout
        credentials = Credentials.load(tls_ca, tls_cert, tls_key, token)
        link = link and not (credentials.tls or credentials.token)
        self._channel = credentials.channel(address, _OPTIONS)
        self._grpc = memstore_pb2_grpc.MemstoreStub(self._channel)
        self._link = BlockingLinkStub(self._grpc, _SERVICE, self._describe_link,
                                      f"server {address}") if link else None
        self._stub: Any = self._link or self._grpc
        if self._link is not None:
            self._link.start()
        self._owners = _SlotOwners(_connect(credentials.channel)) if direct_reads else None
        self._replicas = _replica_reads(read_from, _connect(credentials.channel))

    def _replica_call(self, method: str, request: Any) -> Any:
        """A read answered by a replica (read_from="replica"), or _MISSING: ask `address`."""
        replicas = self._replicas
        assert replicas is not None
        if replicas.due():
            try:
                replicas.load(dict(self._grpc.Stats(pb.StatsRequest(),
                                                    timeout=self.timeout).info))
            except grpc.RpcError:
                pass
        stub = replicas.stub
        if stub is None:
            return _MISSING
        try:
            return getattr(stub, method)(request, timeout=replica_timeout(self.timeout))
        except grpc.RpcError as exc:
            if not unreachable(exc.code()):  # type: ignore[attr-defined]
                raise
            channel = replicas.failed(stub)
            if channel is not None:
                channel.close()
            return _MISSING

    def _describe_link(self) -> tuple[str, str] | None:
        return advertised(self.address, self._channel.unary_unary(DESCRIBE)(
            b"{}", timeout=HELLO_TIMEOUT))

    def link_ready(self, timeout: float = 5.0) -> bool:
        """With link=True: wait up to `timeout` for the link to come up; whether it is
        (calls use gRPC meanwhile, so waiting is never needed, only faster)."""
        return self._link is not None and self._link.ready(timeout)

    def _direct_get(self, pid: str, request: Any) -> Any:
        """The shard's GetResponse, _MISSING for a plain NOT_FOUND, None: ask the router."""
        owners = self._owners
        assert owners is not None
        if owners.due():
            try:
                owners.load(self._channel.unary_unary(LIST_SHARDS)(b"{}", timeout=self.timeout))
            except (grpc.RpcError, ClientError) as exc:
                owners.failed(exc)
        shard = owners.stub(pid)
        if shard is None:
            return None
        stub, metadata = shard
        try:
            return stub.Get(request, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            return owners.refused(exc, "Get")

    def _call(self, method: str, request: Any, decode: Callable[[Any], Any],
              missing: Any = _MISSING, direct: str | None = None) -> Any:
        if direct and self._owners is not None:
            answer = self._direct_get(direct, request)
            if answer is _MISSING:
                return missing
            if answer is not None:
                return decode(answer)
        attempts = _RETRIES if method in _READS else 1
        for attempt in range(attempts):
            try:
                if self._replicas is not None and method in REPLICA_READS:
                    answer = self._replica_call(method, request)
                    if answer is not _MISSING:
                        return decode(answer)
                return decode(getattr(self._stub, method)(request, timeout=self.timeout))
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                if code == grpc.StatusCode.NOT_FOUND and missing is not _MISSING:
                    return missing
                if code == grpc.StatusCode.UNAVAILABLE and attempt + 1 < attempts:
                    time.sleep(0.05 * 2**attempt)
                    continue
                raise _error(exc, method) from None
        raise AssertionError("unreachable")

    def iter_ids(self, query: Any, *, page_size: int = 10_000) -> Iterator[str]:
        """Every matching id, streamed (one query evaluation on the server)."""
        request = pb.QueryIdsRequest(query=_query(query), page_size=page_size)
        try:
            for page in self._grpc.StreamIds(request, timeout=self.timeout):
                yield from page.ids
        except grpc.RpcError as exc:
            raise _error(exc, "StreamIds") from None

    def iter_export(self, query: Any = None, *, chunk_size: int = 2000,
                    timestamps: str = "datetime") -> Iterator[list[dict[str, Any]]]:
        """Every profile matching `query` (None: all), as each shard holds it at one
        moment, in lists of up to `chunk_size`: {"id", "attributes", "identifiers",
        "merged_ids", "version", "created", "changed"}. `timestamps`: "datetime", "iso"
        or "micros" (memstore.client.export.records)."""
        try:
            for chunk in self._grpc.ExportProfiles(_export_request(query, chunk_size),
                                                   timeout=self.timeout):
                if chunk.packed:
                    yield export.records(chunk.packed, timestamps)
        except grpc.RpcError as exc:
            raise _error(exc, "ExportProfiles") from None

    def iter_export_lines(self, query: Any = None, *, chunk_size: int = 1000
                          ) -> Iterator[tuple[int, bytes]]:
        """As iter_export, as JSON Lines the shards make: (profiles, bytes) a message
        (what `memstore export` writes; memstore.client.export)."""
        request = _export_request(query, chunk_size)
        request.format = pb.ExportProfilesRequest.JSON_LINES
        try:
            for chunk in self._grpc.ExportProfiles(request, timeout=self.timeout):
                if chunk.profiles:
                    yield chunk.profiles, chunk.lines
        except grpc.RpcError as exc:
            raise _error(exc, "ExportProfiles") from None

    def iter_export_columns(self, query: Any = None, names: Sequence[str] = (), *,
                            chunk_size: int = 2000) -> Iterator[dict[str, Any]]:
        """As iter_export, a column at a time, as the shards make them: {"id",
        "identifiers", "merged_ids", "version", "created", "changed" (unix seconds, 0: not
        known), "attributes": a list per name in `names`} a message, values as stored
        (timestamps in microseconds), None where a profile has none (what `memstore
        export` writes Parquet from; memstore.exportformat.unpack_columns)."""
        request = _export_request(query, chunk_size)
        request.format = pb.ExportProfilesRequest.COLUMNS
        try:
            for chunk in self._grpc.ExportProfiles(request, timeout=self.timeout):
                if chunk.profiles:
                    yield export.columns(chunk, names)
        except grpc.RpcError as exc:
            raise _error(exc, "ExportProfiles") from None

    def iter_erase(self, query: Any, *, suppress: bool = False, batch_size: int = 500
                   ) -> Iterator[dict[str, Any]]:
        """Erase every profile matching `query` (text; "ALL" for every one), a batch at a
        time; yields each batch's receipt (as `erase` returns, with every person of the
        batch in "erased")."""
        request = pb.EraseProfilesRequest(query=_query(query), suppress=suppress,
                                          batch_size=batch_size)
        try:
            for chunk in self._grpc.EraseProfiles(request, timeout=self.timeout):
                if chunk.receipt:
                    yield export.receipt(chunk)
        except grpc.RpcError as exc:
            raise _error(exc, "EraseProfiles") from None

    def watch(self, segments: Sequence[str] = (), *, from_position: str | None = None,
              initial: bool = False, heartbeats: bool = False) -> Iterator[dict[str, Any]]:
        """Who enters and leaves the saved `segments` (empty: all), as it happens: dicts
        {"segment", "id", "change" ("enter" or "leave"), "position", "at", "initial"}.
        Pass the last `position` you processed as `from_position` to resume without
        losing anything (also after a server restart); `initial` (without a position)
        first lists the current members (initial=True, no position), then follows on.
        With `heartbeats`, a quiet stream also yields {"heartbeat": True, "position",
        "at"} every few seconds: keep that position too, so a stream that saw nothing for
        days resumes from a recent place the server still keeps. Runs until the caller
        stops iterating (no deadline)."""
        request = pb.WatchSegmentsRequest(segments=segments, from_position=from_position or "",
                                          initial=initial)
        try:
            for message in self._grpc.WatchSegments(request):
                yield from _stream_items(message, message.events, _segment_event, heartbeats)
        except grpc.RpcError as exc:
            raise _error(exc, "WatchSegments") from None

    def changes(self, query: Any = None, *, attributes: Sequence[str] = (),
                from_position: str | None = None, initial: bool = False,
                heartbeats: bool = False) -> Iterator[dict[str, Any]]:
        """Every change of a profile, as it happens: dicts {"id", "version", "set" (the
        attributes set or changed, with values), "unset", "created", "deleted",
        "merged_into", "position", "at", "initial"}; only profiles matching `query` (when
        the change is read; deletions and merges always) and only `attributes` (empty:
        all). Resuming, `initial` and `heartbeats` as for `watch`."""
        request = _changes_request(query, attributes, from_position, initial)
        try:
            for message in self._grpc.WatchChanges(request):
                yield from _stream_items(message, message.changes, _profile_change, heartbeats)
        except grpc.RpcError as exc:
            raise _error(exc, "WatchChanges") from None

    def load(self, records: Iterable[Mapping[str, Any]], *, chunk_size: int = LOAD_CHUNK,
             concurrency: int = LOAD_CONCURRENCY,
             progress: Callable[[int], None] | bool | None = None,
             on_refused: OnRefused | None = None) -> int:
        """Bulk load, `concurrency` chunks in flight; returns profiles applied.

        `progress` is called with the number of profiles each answer applied (e.g. tqdm's
        update). A record the server refuses (a value of the wrong kind, a blocked
        identifier): with `on_refused`, it is reported there and the load goes on with
        every other record; without, the load stops there, every record before it applied,
        and raises LoadError (see there; chunks already in flight finish first)."""
        return _pipeline(_Load(progress, on_refused), _packed_chunks(records, chunk_size),
                         lambda chunk: self._grpc.BatchUpsert.future(
                             pb.BatchUpsertRequest(columns=chunk.packed),
                             timeout=self.timeout),
                         self._settle, concurrency)

    def load_events(self, events: Iterable[Mapping[str, Any] | Parsed], *,
                    chunk_size: int = EVENT_CHUNK, concurrency: int = LOAD_CONCURRENCY,
                    progress: Callable[[int], None] | bool | None = None,
                    on_refused: OnRefused | None = None) -> int:
        """Track many events (dicts as `track_batch` takes, or (key, event, at or None,
        count) tuples sent as they are: memstore.client.events), `concurrency` TrackBatch
        calls in flight; returns events applied. `progress` and `on_refused` as in `load`:
        an event the server refuses (a bad name, an identifier nobody holds) is reported
        to `on_refused(index, key, error)` and the load goes on; without it the load stops
        there, every event before it applied, and raises LoadError."""
        return _pipeline(_Load(progress, on_refused), event_chunks(events, chunk_size),
                         lambda chunk: self._grpc.TrackBatch.future(
                             pb.TrackBatchRequest(packed=chunk.packed()),
                             timeout=self.timeout),
                         self._settle_events, concurrency)

    def _settle_events(self, load: _Load, future: Any, chunk: EventChunk) -> None:
        """As _settle, for a chunk of events."""
        try:
            load.add(future.result().applied)
            return
        except grpc.RpcError as exc:
            error = exc
        refusal = EventRefusal(chunk, load)
        while (packed := refusal.next(error)) is not None:
            try:
                refusal.applied_all(self._grpc.TrackBatch(
                    pb.TrackBatchRequest(packed=packed), timeout=self.timeout).applied)
                return
            except grpc.RpcError as exc:
                error = exc

    def _settle(self, load: _Load, future: Any, chunk: _Chunk) -> None:
        """Count a chunk's answer; a refused chunk's records that did not apply are sent
        again (without the refused one) until none is left."""
        try:
            load.applied_all(chunk, future.result())
            return
        except grpc.RpcError as exc:
            error = exc
        refusal = _Refusal(chunk, load)
        while (packed := refusal.next(error)) is not None:
            try:
                refusal.applied_all(self._grpc.BatchUpsert(
                    pb.BatchUpsertRequest(columns=packed), timeout=self.timeout))
                return
            except grpc.RpcError as exc:
                error = exc

    def close(self) -> None:
        """Close the connections (also when leaving a `with` block)."""
        if self._link is not None:
            self._link.close()
        self._channel.close()
        for channel, _ in self._owners.shards.values() if self._owners else ():
            channel.close()
        if self._replicas is not None and (replica := self._replicas.failed()) is not None:
            replica.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(ClientMethods):
    """asyncio client with the same methods as Client: `await c.get("u1")`."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, timeout: float | None = 30.0,
                 direct_reads: bool = False, link: bool = False, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 token: str | None = None, read_from: str = "primary") -> None:
        """As Client."""
        self.address = address
        self.timeout = timeout
        credentials = Credentials.load(tls_ca, tls_cert, tls_key, token)
        link = link and not (credentials.tls or credentials.token)
        self._channel = credentials.aio_channel(address, _OPTIONS)
        self._grpc = memstore_pb2_grpc.MemstoreStub(self._channel)
        # link: described on the first call (and again when it fails: the server may have
        # restarted on another port), connected in the background by LinkStub
        self._link = LinkStub(self._grpc, _SERVICE, self._relink) if link else None
        self._stub: Any = self._link or self._grpc
        self._described = False
        self._describing: asyncio.Task[None] | None = None
        self._describe_at = 0.0
        self._owners = (_SlotOwners(_connect(credentials.aio_channel)) if direct_reads
                        else None)
        self._replicas = _replica_reads(read_from, _connect(credentials.aio_channel))

    async def _replica_call(self, method: str, request: Any) -> Any:
        """As Client._replica_call."""
        replicas = self._replicas
        assert replicas is not None
        if replicas.due():
            try:
                replicas.load(dict((await self._grpc.Stats(pb.StatsRequest(),
                                                           timeout=self.timeout)).info))
            except grpc.aio.AioRpcError:
                pass
        stub = replicas.stub
        if stub is None:
            return _MISSING
        try:
            return await getattr(stub, method)(request, timeout=replica_timeout(self.timeout))
        except grpc.aio.AioRpcError as exc:
            if not unreachable(exc.code()):
                raise
            channel = replicas.failed(stub)
            if channel is not None:
                await channel.close()
            return _MISSING

    def _relink(self) -> None:
        self._described = False

    def _start_link(self) -> None:
        if (self._link is None or self._described or self._describing is not None
                or time.monotonic() < self._describe_at):
            return
        self._describing = asyncio.get_running_loop().create_task(self._describe_link())

    async def _describe_link(self) -> None:
        link = self._link
        assert link is not None
        try:
            found = advertised(self.address, await self._channel.unary_unary(DESCRIBE)(
                b"{}", timeout=HELLO_TIMEOUT))
        except (grpc.aio.AioRpcError, ValueError) as exc:
            if isinstance(exc, grpc.aio.AioRpcError) and \
                    exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._link = None  # a server without the link: gRPC for good
                self._stub = self._grpc
            self._describe_at = time.monotonic() + RETRY_AFTER
            return
        finally:
            self._describing = None
        if found is None:
            self._link, self._stub = None, self._grpc
            return
        link.use_link(*found, f"server {self.address}")
        self._described = True

    async def link_ready(self, timeout: float = 5.0) -> bool:
        """As Client.link_ready."""
        self._start_link()
        try:
            async with asyncio.timeout(timeout):
                if self._describing is not None:
                    await asyncio.shield(self._describing)
                return self._link is not None and self._link.link is not None \
                    and await self._link.link.ready()
        except TimeoutError:
            return False

    async def _direct_get(self, pid: str, request: Any) -> Any:
        """As Client._direct_get."""
        owners = self._owners
        assert owners is not None
        if owners.due():
            try:
                owners.load(await self._channel.unary_unary(LIST_SHARDS)(
                    b"{}", timeout=self.timeout))
            except (grpc.aio.AioRpcError, ClientError) as exc:
                owners.failed(exc)
        shard = owners.stub(pid)
        if shard is None:
            return None
        stub, metadata = shard
        try:
            return await stub.Get(request, timeout=self.timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            return owners.refused(exc, "Get")

    async def _call(self, method: str, request: Any, decode: Callable[[Any], Any],
                    missing: Any = _MISSING, direct: str | None = None) -> Any:
        if self._link is not None and not self._described:
            self._start_link()
        if direct and self._owners is not None:
            answer = await self._direct_get(direct, request)
            if answer is _MISSING:
                return missing
            if answer is not None:
                return decode(answer)
        attempts = _RETRIES if method in _READS else 1
        for attempt in range(attempts):
            try:
                if self._replicas is not None and method in REPLICA_READS:
                    answer = await self._replica_call(method, request)
                    if answer is not _MISSING:
                        return decode(answer)
                return decode(await getattr(self._stub, method)(request, timeout=self.timeout))
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.NOT_FOUND and missing is not _MISSING:
                    return missing
                if code == grpc.StatusCode.UNAVAILABLE and attempt + 1 < attempts:
                    await asyncio.sleep(0.05 * 2**attempt)
                    continue
                raise _error(exc, method) from None
        raise AssertionError("unreachable")

    async def iter_ids(self, query: Any, *, page_size: int = 10_000) -> AsyncIterator[str]:
        """As Client.iter_ids."""
        request = pb.QueryIdsRequest(query=_query(query), page_size=page_size)
        try:
            async for page in self._grpc.StreamIds(request, timeout=self.timeout):
                for pid in page.ids:
                    yield pid
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, "StreamIds") from None

    async def iter_export(self, query: Any = None, *, chunk_size: int = 2000,
                          timestamps: str = "datetime"
                          ) -> AsyncIterator[list[dict[str, Any]]]:
        """As Client.iter_export."""
        try:
            async for chunk in self._grpc.ExportProfiles(_export_request(query, chunk_size),
                                                         timeout=self.timeout):
                if chunk.packed:
                    yield export.records(chunk.packed, timestamps)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, "ExportProfiles") from None

    async def iter_export_lines(self, query: Any = None, *, chunk_size: int = 1000
                                ) -> AsyncIterator[tuple[int, bytes]]:
        """As Client.iter_export_lines."""
        request = _export_request(query, chunk_size)
        request.format = pb.ExportProfilesRequest.JSON_LINES
        try:
            async for chunk in self._grpc.ExportProfiles(request, timeout=self.timeout):
                if chunk.profiles:
                    yield chunk.profiles, chunk.lines
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, "ExportProfiles") from None

    async def iter_export_columns(self, query: Any = None, names: Sequence[str] = (), *,
                                  chunk_size: int = 2000) -> AsyncIterator[dict[str, Any]]:
        """As Client.iter_export_columns."""
        request = _export_request(query, chunk_size)
        request.format = pb.ExportProfilesRequest.COLUMNS
        try:
            async for chunk in self._grpc.ExportProfiles(request, timeout=self.timeout):
                if chunk.profiles:
                    yield export.columns(chunk, names)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, "ExportProfiles") from None

    async def iter_erase(self, query: Any, *, suppress: bool = False, batch_size: int = 500
                         ) -> AsyncIterator[dict[str, Any]]:
        """As Client.iter_erase."""
        request = pb.EraseProfilesRequest(query=_query(query), suppress=suppress,
                                          batch_size=batch_size)
        try:
            async for chunk in self._grpc.EraseProfiles(request, timeout=self.timeout):
                if chunk.receipt:
                    yield export.receipt(chunk)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, "EraseProfiles") from None

    async def watch(self, segments: Sequence[str] = (), *, from_position: str | None = None,
                    initial: bool = False, heartbeats: bool = False
                    ) -> AsyncIterator[dict[str, Any]]:
        """As Client.watch."""
        request = pb.WatchSegmentsRequest(segments=segments, from_position=from_position or "",
                                          initial=initial)
        try:
            async for message in self._grpc.WatchSegments(request):
                for item in _stream_items(message, message.events, _segment_event,
                                          heartbeats):
                    yield item
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, "WatchSegments") from None

    async def changes(self, query: Any = None, *, attributes: Sequence[str] = (),
                      from_position: str | None = None, initial: bool = False,
                      heartbeats: bool = False) -> AsyncIterator[dict[str, Any]]:
        """As Client.changes."""
        request = _changes_request(query, attributes, from_position, initial)
        try:
            async for message in self._grpc.WatchChanges(request):
                for item in _stream_items(message, message.changes, _profile_change,
                                          heartbeats):
                    yield item
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, "WatchChanges") from None

    async def load(self, records: Iterable[Mapping[str, Any]], *, chunk_size: int = LOAD_CHUNK,
                   concurrency: int = LOAD_CONCURRENCY,
                   progress: Callable[[int], None] | bool | None = None,
                   on_refused: OnRefused | None = None) -> int:
        """As Client.load."""
        return await _async_pipeline(
            _Load(progress, on_refused), _packed_chunks(records, chunk_size),
            lambda chunk: self._grpc.BatchUpsert(pb.BatchUpsertRequest(columns=chunk.packed),
                                                 timeout=self.timeout),
            self._settle, concurrency)

    async def load_events(self, events: Iterable[Mapping[str, Any] | Parsed], *,
                          chunk_size: int = EVENT_CHUNK, concurrency: int = LOAD_CONCURRENCY,
                          progress: Callable[[int], None] | bool | None = None,
                          on_refused: OnRefused | None = None) -> int:
        """As Client.load_events."""
        return await _async_pipeline(
            _Load(progress, on_refused), event_chunks(events, chunk_size),
            lambda chunk: self._grpc.TrackBatch(pb.TrackBatchRequest(packed=chunk.packed()),
                                                timeout=self.timeout),
            self._settle_events, concurrency)

    async def _settle_events(self, load: _Load, future: Any, chunk: EventChunk) -> None:
        """As Client._settle_events."""
        try:
            load.add((await future).applied)
            return
        except grpc.aio.AioRpcError as exc:
            error = exc
        refusal = EventRefusal(chunk, load)
        while (packed := refusal.next(error)) is not None:
            try:
                refusal.applied_all((await self._grpc.TrackBatch(
                    pb.TrackBatchRequest(packed=packed), timeout=self.timeout)).applied)
                return
            except grpc.aio.AioRpcError as exc:
                error = exc

    async def _settle(self, load: _Load, future: Any, chunk: _Chunk) -> None:
        """As Client._settle."""
        try:
            load.applied_all(chunk, await future)
            return
        except grpc.aio.AioRpcError as exc:
            error = exc
        refusal = _Refusal(chunk, load)
        while (packed := refusal.next(error)) is not None:
            try:
                refusal.applied_all(await self._grpc.BatchUpsert(
                    pb.BatchUpsertRequest(columns=packed), timeout=self.timeout))
                return
            except grpc.aio.AioRpcError as exc:
                error = exc

    async def close(self) -> None:
        """As Client.close."""
        if self._describing is not None:
            self._describing.cancel()
        if self._link is not None and self._link.link is not None:
            self._link.link.close()
        await self._channel.close()
        for channel, _ in self._owners.shards.values() if self._owners else ():
            await channel.close()
        if self._replicas is not None and (replica := self._replicas.failed()) is not None:
            await replica.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _export_request(query: Any, chunk_size: int) -> pb.ExportProfilesRequest:
    request = pb.ExportProfilesRequest(chunk_size=chunk_size)
    if query is not None:
        request.query.CopyFrom(_query(query))
    return request


def _segment(s: pb.SegmentInfo) -> dict[str, Any]:
    return {"name": s.name, "query": s.query, "members": s.members,
            "created_at": s.created_at.ToDatetime(UTC), "broken": s.broken}


def _segment_event(e: pb.SegmentEvent) -> dict[str, Any]:
    return {"segment": e.segment, "id": e.id,
            "change": "enter" if e.change == pb.SegmentEvent.ENTER else "leave",
            "position": e.position, "at": e.at.ToDatetime(UTC), "initial": e.initial}


def _stream_items(message: Any, items: Any, convert: Callable[[Any], dict[str, Any]],
                  heartbeats: bool) -> Iterator[dict[str, Any]]:
    """A watch message's events as dicts; an empty one that moves the position on is a
    heartbeat (yielded only if asked for)."""
    for item in items:
        yield convert(item)
    if heartbeats and not items and message.position:
        yield {"heartbeat": True, "position": message.position,
               "at": message.at.ToDatetime(UTC)}


def _changes_request(query: Any, attributes: Sequence[str], from_position: str | None,
                     initial: bool) -> pb.WatchChangesRequest:
    request = pb.WatchChangesRequest(attributes=attributes, from_position=from_position or "",
                                     initial=initial)
    if query is not None:
        request.query.CopyFrom(_query(query))
    return request


def _profile_change(c: pb.ProfileChange) -> dict[str, Any]:
    return {"id": c.id, "version": c.version,
            "set": {k: pbvalues.from_pb(v) for k, v in c.set.items()},
            "unset": list(c.unset), "created": c.created, "deleted": c.deleted,
            "merged_into": c.merged_into or None, "position": c.position,
            "at": c.at.ToDatetime(UTC), "initial": c.initial}


def _applied(applied: int, sent: int) -> int:
    """A batch applies whole or not at all: fewer records applied than sent means a server
    that dropped the columnar form (older than this client), not a partial load."""
    if applied != sent:
        raise ClientError(grpc.StatusCode.FAILED_PRECONDITION,
                          f"the server applied {applied} of {sent} records of a columnar "
                          f"batch: is it older than this client?", "BatchUpsert")
    return applied


def _pipeline(load: _Load, chunks: Iterable[Any], send: Callable[[Any], Any],
              settle: Callable[[_Load, Any, Any], None], concurrency: int) -> int:
    """A bulk load's loop: `send` each chunk (a future), `concurrency` in flight, `settle`
    each answer in order; no chunk is sent once the load stopped. What applied."""
    inflight: deque[tuple[Any, Any]] = deque()
    for chunk in chunks:
        if load.stopped:
            break
        inflight.append((send(chunk), chunk))
        load.sent = chunk.base + chunk.count
        if len(inflight) >= concurrency:
            settle(load, *inflight.popleft())
    while inflight:
        settle(load, *inflight.popleft())
    return load.result()


async def _async_pipeline(load: _Load, chunks: Iterable[Any], send: Callable[[Any], Any],
                          settle: Callable[[_Load, Any, Any], Awaitable[None]],
                          concurrency: int) -> int:
    """As _pipeline, for AsyncClient: `send` gives an awaitable call, run as a task."""
    inflight: deque[tuple[asyncio.Future[Any], Any]] = deque()
    for chunk in chunks:
        if load.stopped:
            break
        inflight.append((asyncio.ensure_future(send(chunk)), chunk))
        load.sent = chunk.base + chunk.count
        if len(inflight) >= concurrency:
            await settle(load, *inflight.popleft())
    while inflight:
        await settle(load, *inflight.popleft())
    return load.result()


@dataclass(slots=True)
class _Chunk:
    """Records of a load packed as one request: how many, and the index of the first."""

    packed: bytes
    count: int
    base: int


class _Load:
    """A bulk load's bookkeeping: what applied, what was refused, where it stops."""

    def __init__(self, progress: Callable[[int], None] | bool | None,
                 on_refused: OnRefused | None) -> None:
        self.progress = progress if callable(progress) else None
        self.on_refused = on_refused
        self.applied = 0
        self.unknown = 0  # records sent whose outcome is not known, over every failure
        self.sent = 0  # records sent: the first `sent` of those given
        self.stopped = False  # no chunk is sent after a refusal (without on_refused)
        self.error: LoadError | None = None

    def add(self, applied: int) -> None:
        self.applied += applied
        if self.progress is not None and applied:
            self.progress(applied)

    def applied_all(self, chunk: _Chunk, response: pb.BatchUpsertResponse) -> None:
        self.add(_applied(response.applied, chunk.count))

    def stop(self, error: LoadError) -> None:
        """The load stops at `error` (the earliest record refused, if several are); the
        records of every failure whose outcome is unknown add up."""
        self.unknown += error.unknown
        record = error.record
        if self.error is None or (record is not None and (
                self.error.record is None or record < self.error.record)):
            self.error = error
        self.stopped = True

    def result(self) -> int:
        if self.error is not None:
            self.error.applied, self.error.unknown = self.applied, self.unknown
            self.error.sent = self.sent
            raise self.error
        return self.applied


class _Refusal(Refusal):
    """A chunk of profiles the server refused, record by record (memstore.client.refusal).
    No answer at all stops the load too."""

    method = "BatchUpsert"

    def __init__(self, chunk: _Chunk, load: _Load) -> None:
        super().__init__(chunk.count, chunk.base, load)
        self.batch = unpack_columns(chunk.packed)

    def applied_all(self, response: pb.BatchUpsertResponse) -> None:
        self.load.add(_applied(response.applied, len(self.rows)))

    def key(self, row: int) -> str:
        return self.batch.ids[row]

    def pack(self, rows: list[int]) -> bytes:
        return self.batch.pack_rows(rows, [self.batch.ids[row] for row in rows])




def _packed_chunks(records: Iterable[Mapping[str, Any]], size: int) -> Iterator[_Chunk]:
    """Each `size` records packed as columns (split while larger than LOAD_CHUNK_BYTES),
    with how many and where they start. A chunk is taken from the caller's iterator and
    packed with the cyclic collector paused: its records are thousands of new containers
    that would wake the collector ~10 times a chunk to walk them again (2.3 µs of a
    benchmark loader's ~16 µs a profile). Only the packed bytes are kept, so a chunk sent
    in parts again after a refusal costs no record held alive meanwhile."""
    it = iter(records)
    base = 0
    while True:
        with _collector_paused():
            chunk = list(islice(it, size))
            parts = _packed_parts(chunk)
            del chunk  # freed before the collector is back, so it never walks them
        if not parts:
            return
        for packed, count in parts:
            yield _Chunk(packed, count, base)
            base += count


def _packed_parts(chunk: list[Mapping[str, Any]]) -> list[tuple[bytes, int]]:
    """The records packed, halved until each part packs to at most LOAD_CHUNK_BYTES (or
    is one record), with each part's count."""
    if not chunk:
        return []
    packed = pack_records(chunk)
    if len(packed) <= LOAD_CHUNK_BYTES or len(chunk) == 1:
        return [(packed, len(chunk))]
    half = len(chunk) // 2
    return _packed_parts(chunk[:half]) + _packed_parts(chunk[half:])
