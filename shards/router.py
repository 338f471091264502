"""The router: memstore.v1.Memstore for a whole cluster, by forwarding and merging.

It holds no data and no state of its own beyond a cached `ShardMap` and one channel per
shard. Single-profile calls go to the owner of slot_of(id); a shard that no longer owns the
slot answers FAILED_PRECONDITION with `memstore-wrong-slot`, and the router refreshes its map
and retries (for up to MOVE_WAIT seconds within the caller's deadline; a slot nobody owns,
during the switch of a slot move, is waited out the same way).

Fan-out queries are exact: each shard answers over the profiles in the slots it owns, so the
sum is exact when the shards' claims partition the slots and no shard changed ownership while
answering. The router checks both: it only fans out over a map whose claims are a partition,
and each shard sends, with its answer, the epoch it answered at (trailing metadata
`memstore-epoch`; a shard that does not is asked with GetShardInfo right after); an epoch
other than the map's means ownership moved under the query, and the whole query is retried
on a fresh map. Epochs only ever grow, so the map's epoch at answer time proves unchanged
ownership between the map's refresh and the answer.

Errors: a shard that is down gives UNAVAILABLE naming it; fan-outs fail with UNAVAILABLE unless
the request sets allow_partial, and then list the shards in missing_shards. Other shard errors
pass through with their code and message. The caller's remaining deadline goes to every shard
call.

Merges across shards (an Upsert or Link naming an identifier that a profile on another shard
holds) run the protocol in shards/merge.py. A shard answering that a profile is held by an
unfinished merge makes the call wait (HOLD_PATIENCE), then decide and release that merge,
then retry; a primary id merged into a profile on another shard is followed to the survivor.
A background sweeper finishes merges whose router died (every SWEEP_INTERVAL seconds).

Identifiers: look-ups and the writes that name identifiers go through the identifier
directory (shards/directory.py): a claim in the identifier's own slot, verified against the
profile it names. A write claims its identifiers before it writes (BatchUpsert: once per
batch), which is also how it finds the cross-shard merges it must make first.

Current limitations (see also DESIGN "Cluster"):
- BatchUpsert is atomic per shard, not across shards; INVALID_ARGUMENT names the index within
  the part of the batch sent to that shard.
- A QueryIds cursor is (shard name, that shard's cursor): a slot move between two pages may
  repeat or skip the moved profiles.

Hostile input: queries are bounded by the router's `QueryLimits` before any shard is asked
(give shards the same ones), the texts it remembers by bytes (shards/text_cache.py), and
every status message by MAX_STATUS_BYTES; requests that do not parse are INVALID_ARGUMENT
and an exception no handler maps is INTERNAL (memstore/server/guard.py), never UNKNOWN.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import gc
import itertools
import json
import logging
import random
import re
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, NoReturn, TypeVar

import grpc
import msgpack
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pyroaring import BitMap

from memstore import pbvalues
from memstore.engine import eventpack
from memstore.engine.columnar import Columns, unpack_columns
from memstore.engine.schema import DAY_RECORD
from memstore.errors import InvalidArgument, brief, capped, drop_tracebacks
from memstore.hashslot import (
    ADMIN_SERVICE,
    APPLIED_TRAILER,
    CLUSTER_SCHEMA,
    EPOCH_TRAILER,
    EXPECT_SHARD,
    RECORD_TRAILER,
    REJUDGE_TRAILER,
    UNDECLARED_TRAILER,
)
from memstore.query import (
    DEFAULT_LIMITS,
    And,
    Did,
    Not,
    Or,
    Predicate,
    QueryError,
    QueryLimits,
    format_query,
    query_from_request,
)
from memstore.server import audit, logs, metrics, reflection
from memstore.server.guard import Guard
from memstore.server.heap import LoadTrimmer
from memstore.server.link import LinkServer, describe_handler
from memstore.server.security import Credentials, ServerSecurity
from memstore.v1 import cluster_pb2 as cpb
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc
from shards import export, merge, watch
from shards.backoff import pause
from shards.directory import ClaimStuck, Directory, Suppressed
from shards.schema import ClusterSchema
from shards.shard_map import CHANNEL_OPTIONS, ShardMap, ShardState
from shards.slots import slot_of
from shards.text_cache import TextCache

log = logging.getLogger("memstore.router")

T = TypeVar("T")
# How long a call waits out a moving slot map (wrong slot, a slot nobody owns for a moment
# during a switch, epochs changing under a fan-out) before giving up, within the deadline.
MOVE_WAIT = 30.0
SWEEP_INTERVAL = 2.0  # seconds between looks for merges a dead router left unfinished
REQUEST, PACKED, COLUMNS = 0, 1, 2  # the forms of a BatchUpsert record (BatchUpsertRequest)
MAX_FORWARDS = 16  # merged-away ids followed in a row before giving up (a cycle is a bug)
MAX_DECLARES = 3  # a write sent again after declaring what it names (more would be a bug)
# Shard answers that say a write was not applied (its claims can be given back).
REFUSED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                     grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE})
Code = grpc.StatusCode


class _Moved(Exception):
    """A shard's ownership changed while it answered: retry on a fresh map."""


class _Down(Exception):
    def __init__(self, shard: ShardState, details: str) -> None:
        super().__init__(f"shard {shard.label} ({shard.address}) is unavailable: {details}")
        self.shard = shard


class _Pending(Exception):
    """A shard answered that a profile is held by an unfinished cross-shard merge."""

    def __init__(self, trailer: bytes) -> None:
        self.loser, self.txn, self.survivor, self.age = msgpack.unpackb(trailer)
        super().__init__(f"profile {self.loser!r} is held by merge {self.txn}")


_FOLLOWED = object()  # routed: a group sent again, aimed at the survivors of merged-away ids
_DECLARED = object()  # routed: a group sent again once its shard declared what it names
_REJUDGE = object()  # routed: a group its shard refused as judged on an older map (EXPECT_SHARD)


class _GroupRefused(Exception):
    """A shard refused its part of a batch (routed with `refusals`): `items` are that part,
    `exc` the shard's answer, `done` the parts applied by then."""

    def __init__(self, items: list[Any], exc: grpc.aio.AioRpcError,
                 done: list[tuple[list[Any], Any]]) -> None:
        super().__init__(exc.details())
        self.items = items
        self.exc = exc
        self.done = done


class _Stuck(Exception):
    """No shard accepted a slot within MOVE_WAIT."""


class _Rejudge(Exception):
    """A write judged against the slot map met other ownership (EXPECT_SHARD): judge it
    again against a fresh map."""


class Background:
    """A stand-in ServicerContext for background work (the sweeper, rebuilding the
    directory): each call gets 5 s; aborting raises."""

    def time_remaining(self) -> float:
        return 5.0  # each call of a sweep gets this long

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise RuntimeError(f"{code.name}: {details}")


def _epoch_of(metadata: Any) -> int | None:
    """The epoch a shard sent with its answer (memstore.hashslot.EPOCH_TRAILER), if any."""
    for key, value in metadata or ():
        if key == EPOCH_TRAILER:
            return int(value)
    return None


def _trailer(exc: grpc.aio.AioRpcError, key: str) -> bytes | None:
    for k, v in exc.trailing_metadata() or ():
        if k == key:
            return v if isinstance(v, bytes) else v.encode()
    return None


def _forward_pairs(trailer: bytes) -> list[list[str]]:
    """[[merged id, survivor], ...] from `memstore-merged-into-bin` (a lone pair too)."""
    pairs = msgpack.unpackb(trailer)
    return [pairs] if pairs and isinstance(pairs[0], str) else pairs  # type: ignore[no-any-return]


def _retarget(request: Any, survivor: str) -> Any:
    """A copy of a single-profile request aimed at `survivor` instead."""
    copy = type(request)()
    copy.CopyFrom(request)
    if hasattr(copy, "key"):
        copy.key.id = survivor
    else:
        copy.id = survivor
    return copy


def _wrong_slot(exc: grpc.aio.AioRpcError) -> bool:
    if exc.code() != Code.FAILED_PRECONDITION:
        return False
    return any(k == "memstore-wrong-slot" for k, _ in (exc.trailing_metadata() or ()))


_AS_ROUTER = {"metadata": (CLUSTER_SCHEMA,)}


def _expecting(judged: str | None) -> dict[str, Any]:
    """Call options of a call to a shard: from a router (CLUSTER_SCHEMA: its writes may
    not declare attributes by their values there, shards/schema.py), and for a write
    judged for shard "name:epoch" (EXPECT_SHARD), if it was."""
    if judged is None:
        return _AS_ROUTER
    return {"metadata": (CLUSTER_SCHEMA, (EXPECT_SHARD, judged))}


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(remaining, 0.001)


async def _fail(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
                ) -> NoReturn:
    drop_tracebacks()  # called from except blocks: free the request now (errors.py)
    await context.abort(code, capped(message))
    raise AssertionError("abort returned")


async def _pause(attempt: int, context: grpc.aio.ServicerContext) -> None:
    await pause(attempt, context, "the slot map was changing (a slot move in progress)")


def _attempts() -> Iterator[int]:
    give_up = time.monotonic() + MOVE_WAIT
    for attempt in itertools.count():
        yield attempt
        if time.monotonic() > give_up:
            return


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


class RouterService(memstore_pb2_grpc.MemstoreServicer):
    def __init__(self, shard_map: ShardMap,
                 on_membership: Callable[[list[str]], None] | None = None,
                 limits: QueryLimits = DEFAULT_LIMITS) -> None:
        self.map = shard_map
        self.limits = limits  # the size of work one query may ask for (as its shards')
        self._texts = TextCache()  # query text -> the attributes it names
        self.directory = Directory(self)  # the identifier directory (shards/directory.py)
        self.schema = ClusterSchema(self)  # the cluster's schema registry (shards/schema.py)
        self.on_membership = on_membership
        self.sweeper: asyncio.Task[None] | None = None
        self.link: LinkServer | None = None  # clients' unary calls (memstore/server/link.py)
        self._known: set[str] = set()  # attribute names some shard has declared
        self._segments: set[str] = set()  # saved segments every shard has
        self._naming = IdentifierLocks()  # this router's writes naming an identifier, in turn
        self._loads = LoadTrimmer()  # BatchUpsert calls in flight (memstore/server/heap.py)
        self.retention: Any = None  # shards/retention.py, with --anonymous-ttl
        self.retention_task: asyncio.Task[None] | None = None

    async def _lenient(self, query: pb.QueryRequest, context: grpc.aio.ServicerContext,
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
            await _fail(context, Code.INVALID_ARGUMENT, f"query: {exc}")
        if not names <= self._known:
            timeout = _timeout(context)

            def call(shard: ShardState) -> Any:
                return shard.stub.GetSchema(pb.GetSchemaRequest(), timeout=timeout)

            answers, _ = await self._fan_out(context, call, query.allow_partial)
            self._known = {a.name for a in _union_schema(r for _, r in answers).attributes}
            unknown = sorted(names - self._known)
            if unknown:
                name = unknown[0]
                if DAY_RECORD.match(name):  # did(...) reads event.<name>.days
                    event = name.removeprefix("event.").removesuffix(".days")
                    await _fail(context, Code.INVALID_ARGUMENT, f"query: unknown event "
                                f"{event!r} (no profile has a day record of it)")
                await _fail(context, Code.INVALID_ARGUMENT, f"query: unknown attribute {name!r}")
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

    # ------------------------------------------------------------------ plumbing
    async def _abort(self, context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
        if isinstance(exc, _Down | _Stuck | ClaimStuck):
            await _fail(context, Code.UNAVAILABLE, str(exc))
        if isinstance(exc, merge.Forwarded | merge.Restart | _Pending | Suppressed):
            await _fail(context, Code.FAILED_PRECONDITION, str(exc))
        if isinstance(exc, grpc.aio.AioRpcError):
            await _fail(context, exc.code(), exc.details() or exc.code().name)
        raise exc

    async def _single(self, pid: str, method: str, request: Any,
                      context: grpc.aio.ServicerContext) -> Any:
        """Send `request` to the shard owning slot_of(pid), following slot moves, waiting
        out merges and following merged-away ids to their survivor."""
        if not pid:
            await _fail(context, Code.INVALID_ARGUMENT, "id: a primary id is required")
        try:
            return await self._owner_call(pid, method, request, context)
        except Exception as exc:  # noqa: BLE001 - _abort re-raises what it cannot map
            await self._abort(context, exc)

    async def _owner_call(self, pid: str, method: str, request: Any, context: Any, *,
                          control: bool = False, follow: bool = True,
                          expect: str | None = None) -> Any:
        """`request` to the owner of slot_of(pid), on its ShardControl service if `control`.
        Raises what it cannot handle: AioRpcError, _Down, _Stuck, and merge.Forwarded when
        not `follow`ing merged-away ids. With `expect` ("name:epoch" the write was judged
        for, EXPECT_SHARD), raises _Rejudge where ownership is not as judged."""
        hops = declared = 0
        for attempt in _attempts():
            slot = slot_of(pid)
            version = self.map.version
            shard = self.map.owner(slot)
            if shard is None:
                await self.map.refresh(since=version)
                if self.map.owner(slot) is None:
                    await _pause(attempt, context)
                continue
            stub = shard.control if control else shard.stub
            try:
                return await getattr(stub, method)(request, timeout=_timeout(context),
                                                   **_expecting(expect))
            except grpc.aio.AioRpcError as exc:
                undeclared = _trailer(exc, UNDECLARED_TRAILER)
                if undeclared is not None and declared < MAX_DECLARES:
                    declared += 1  # declare them there as the cluster has them; again
                    await self.schema.declare_on(shard, undeclared, context,
                                                 _timeout(context))
                    continue
                if expect is not None and (_wrong_slot(exc) or _trailer(exc, REJUDGE_TRAILER)):
                    await self.map.refresh(since=version)
                    raise _Rejudge() from None
                if _wrong_slot(exc):
                    await self.map.refresh(since=version)
                    if self.map.owner(slot) is shard:
                        await _pause(attempt, context)
                    continue
                if exc.code() == Code.UNAVAILABLE:
                    raise _Down(shard, exc.details() or "unreachable") from None
                pending = _trailer(exc, "memstore-merge-pending-bin")
                if pending is not None:
                    await self._settle(_Pending(pending), attempt, context)
                    continue
                forwarded = _trailer(exc, "memstore-merged-into-bin")
                if forwarded is None:
                    raise
                [gone, survivor], *_ = _forward_pairs(forwarded)
                if not follow:
                    raise merge.Forwarded(gone, survivor) from None
                hops += 1
                if hops > MAX_FORWARDS:
                    raise merge.Forwarded(gone, survivor, f"more than {MAX_FORWARDS} forwards "
                                          f"in a row, the last {gone!r} -> {survivor!r} "
                                          "(a forward cycle?)") from None
                request, pid = _retarget(request, survivor), survivor
        raise _Stuck(f"a slot has no owner that accepts it after {MOVE_WAIT:.0f} s "
                     "(a slot move stuck?)")

    # merge.Caller
    def control(self, pid: str, method: str, request: Any, context: Any,
                expect: str | None = None) -> Awaitable[Any]:
        return self._owner_call(pid, method, request, context, control=True, follow=False,
                                expect=expect)

    def profile(self, pid: str, method: str, request: Any, context: Any) -> Awaitable[Any]:
        return self._owner_call(pid, method, request, context)

    async def _settle(self, pending: _Pending, attempt: int, context: Any) -> None:
        """Wait out a young hold; decide and release one older than HOLD_PATIENCE."""
        if pending.age < merge.HOLD_PATIENCE:
            await _pause(attempt, context)
            return
        await merge.decide_and_release(self, pending.txn, pending.loser, pending.survivor,
                                       context)

    async def sweep(self) -> None:
        """Forever: finish or abort merges whose coordinator went away."""
        context = Background()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.map.refresh()
            except Exception as exc:  # noqa: BLE001 - never let the sweeper die
                log.warning("sweep: could not refresh the shard map: %s", exc)
                continue
            for shard in self.map.shards:
                for held in shard.held:
                    if held.age_seconds < 2 * merge.HOLD_PATIENCE:
                        continue
                    try:
                        await merge.decide_and_release(self, held.txn, held.loser,
                                                       held.survivor, context)
                    except Exception as exc:  # noqa: BLE001 - a shard down: next round
                        log.warning("sweep: merge %s of %r still unfinished: %s", held.txn,
                                    held.loser, exc)

    async def _stable(self, context: grpc.aio.ServicerContext, allow_partial: bool
                      ) -> list[tuple[ShardState, int]]:
        """Wait for a map whose claims partition the slots; return the shards to ask with
        the epochs that partition is made of (read together, with no await in between).
        Shards never reached make the map incomplete without a move being at fault."""
        for attempt in _attempts():
            if self.map.exact:
                return [(s, s.epoch) for s in self.map.ordered()]
            version = self.map.version
            await self.map.refresh(since=version)
            if self.map.exact:
                return [(s, s.epoch) for s in self.map.ordered()]
            down = [s for s in self.map.shards if not s.reachable]
            if down:
                if not allow_partial:
                    await self._abort(context, _Down(down[0], down[0].error or "unreachable"))
                return [(s, s.epoch) for s in self.map.ordered()]
            await _pause(attempt, context)
        await _fail(context, Code.UNAVAILABLE, "the slot map did not settle (slots without an "
                    "owner or claimed twice); a slot move may be stuck")

    async def _checked(self, shard: ShardState, epoch: int,
                       call: Callable[[ShardState], Any]) -> T:
        """`call` on one shard (a unary gRPC call), then prove its ownership was that of
        `epoch` when it answered: the epoch it sends with the answer (EPOCH_TRAILER), or,
        from a shard that does not, the one it reports when asked right after."""
        try:
            rpc = call(shard)
            result: T = await rpc
            answered = _epoch_of(await rpc.trailing_metadata())
            if answered is None:
                info: cpb.ShardInfo = await shard.control.GetShardInfo(cpb.ShardInfoRequest(),
                                                                       timeout=5.0)
                answered = info.epoch
        except grpc.aio.AioRpcError as exc:
            if exc.code() == Code.UNAVAILABLE:
                shard.reachable, shard.error = False, exc.details() or "unavailable"
                raise _Down(shard, exc.details() or "unreachable") from None
            pending = _trailer(exc, "memstore-merge-pending-bin")
            if pending is not None:
                raise _Pending(pending) from None
            raise
        if answered != epoch:
            raise _Moved()
        return result

    async def _fan_out(self, context: grpc.aio.ServicerContext,
                       call: Callable[[ShardState], Any], allow_partial: bool = False,
                       ) -> tuple[list[tuple[ShardState, Any]], list[str]]:
        """`call` (a unary gRPC call, not awaited) on every shard at once; exact over a
        stable partition of the slots."""
        for attempt in _attempts():
            shards = await self._stable(context, allow_partial)
            version = self.map.version
            outcomes = await asyncio.gather(*(self._checked(s, e, call) for s, e in shards),
                                            return_exceptions=True)
            if any(isinstance(o, _Moved) for o in outcomes):
                await self.map.refresh(since=version)
                if attempt:
                    await _pause(attempt, context)
                continue
            pending = next((o for o in outcomes if isinstance(o, _Pending)), None)
            if pending is not None:
                try:
                    await self._settle(pending, attempt, context)
                except Exception as exc:  # noqa: BLE001 - _abort re-raises the rest
                    await self._abort(context, exc)
                continue
            results: list[tuple[ShardState, Any]] = []
            missing: list[str] = []
            for (shard, _), outcome in zip(shards, outcomes):
                if isinstance(outcome, _Down):
                    if not allow_partial:
                        await self._abort(context, outcome)
                    missing.append(shard.label)
                elif isinstance(outcome, BaseException):
                    await self._abort(context, outcome)  # type: ignore[arg-type]
                else:
                    results.append((shard, outcome))
            if missing:
                asyncio.get_running_loop().create_task(self.map.refresh(since=version))
            return results, missing
        await _fail(context, Code.UNAVAILABLE, "shard ownership kept changing during the query")

    async def _identity_write(self, method: str, request: Any, context: Any) -> Any:
        """Upsert or Link: on the owning shard, or as a cross-shard merge (shards/merge.py)
        when an identifier it names belongs to a profile on another shard."""
        if not request.id:
            await _fail(context, Code.INVALID_ARGUMENT, "id: a primary id is required")
        made: set[tuple[str, tuple[str, str]]] = set()  # claims this write made
        for attempt in _attempts():
            try:
                idents = [(i.kind, i.value) for i in request.identifiers]
                local: dict[str, str] = {}
                foreign = await self.directory.claim([(request.id, i) for i in idents],
                                                     context, made, local)
                losers = list(dict.fromkeys(foreign.values()))
                if not losers:  # a merged-away id: Forwarded, claimed again for its survivor
                    return await self._owner_call(request.id, method, request, context,
                                                  follow=False, expect=local.get(request.id))
                return await merge.merge(self, request.id, losers, request, context,
                                         expect=local.get(request.id))
            except _Rejudge:  # a same-shard merge judged on a map that has changed since
                await _pause(attempt, context)
            except merge.Restart:  # a racing merge: back off a random while, then retry
                await _pause(attempt, context)
                await asyncio.sleep(random.uniform(0, 0.05))
            except merge.Forwarded as exc:  # the profile itself merged away: its survivor
                request = _retarget(request, exc.survivor)
            except Exception as exc:  # noqa: BLE001 - _abort re-raises the rest
                if (isinstance(exc, grpc.aio.AioRpcError) and exc.code() in REFUSED
                        or isinstance(exc, Suppressed)):
                    await self.directory.release(made, context)  # nothing was written
                await self._abort(context, exc)
        await _fail(context, Code.UNAVAILABLE, f"{method}: the merge kept meeting racing "
                    f"merges for {MOVE_WAIT:.0f} s")

    # ------------------------------------------------------------------ profiles
    async def Upsert(self, request: pb.UpsertRequest, context: Any) -> pb.UpsertResponse:
        async with self._naming.hold((i.kind, i.value) for i in request.identifiers):
            return await self._identity_write("Upsert", request, context)  # type: ignore[no-any-return]

    async def Track(self, request: pb.TrackRequest, context: Any) -> pb.TrackResponse:
        if request.HasField("identifier"):  # to the profile holding it, by its id
            if request.id:
                await _fail(context, Code.INVALID_ARGUMENT,
                            "id: give an id or an identifier, not both")
            [pid] = await self._holders([(request.identifier.kind, request.identifier.value)],
                                        context)
            if pid is None:
                await _fail(context, Code.NOT_FOUND, "identifier: no profile holds "
                            f"{request.identifier.kind}:{request.identifier.value!r}")
            request = pb.TrackRequest(id=pid, event=request.event, count=request.count,
                                      **({"at": request.at} if request.HasField("at") else {}))
        return await self._single(request.id, "Track", request, context)  # type: ignore[no-any-return]

    async def TrackBatch(self, request: pb.TrackBatchRequest, context: Any
                         ) -> pb.TrackBatchResponse:
        """Each shard its part, concurrently, in one packed request each; events keyed by
        an identifier go to the profile holding it (the directory says which). A part a
        shard refuses ends the call naming the event at fault by its index here, with the
        events that applied on other shards (as BatchUpsert, _refuse_batch)."""
        events: list[eventpack.Event] = []
        now = int(time.time() * 1_000_000)
        try:
            for i, r in enumerate(request.events):
                key: eventpack.Key = r.id
                if r.HasField("identifier"):
                    if r.id:
                        raise InvalidArgument(f"events[{i}].id: give an id or an identifier, "
                                              "not both")
                    key = (r.identifier.kind, r.identifier.value)
                at = pbvalues.timestamp_micros(r.at, f"events[{i}].at") if r.HasField("at") \
                    else now
                events.append((key, r.event, at, r.count or 1))
            if request.packed:
                events += eventpack.unpack(request.packed, len(events))
        except (InvalidArgument, ValueError) as exc:
            await _fail(context, Code.INVALID_ARGUMENT, str(exc))
        keys: list[str] = [k if isinstance(k, str) else "" for k, _, _, _ in events]
        named = list(dict.fromkeys(k for k, _, _, _ in events if not isinstance(k, str)))
        if named:
            for (kind, value) in named:
                if not kind or not value:
                    at = next(i for i, e in enumerate(events) if e[0] == (kind, value))
                    await self._refuse_events(context, Code.INVALID_ARGUMENT, at,
                                              "identifier needs a kind and a value")
            holders = dict(zip(named, await self._holders(named, context), strict=True))
            for i, (key, _, _, _) in enumerate(events):
                if not isinstance(key, str):
                    pid = holders[key]
                    if pid is None:
                        await self._refuse_events(context, Code.NOT_FOUND, i,
                                                  f"identifier: no profile holds {key[0]}:"
                                                  f"{key[1]!r}")
                    keys[i] = pid
        for i, pid in enumerate(keys):
            if not pid:
                await self._refuse_events(context, Code.INVALID_ARGUMENT, i, "id: empty "
                                          "profile id")
        if not events:
            return pb.TrackBatchResponse()

        def build(group: list[tuple[int, str]]) -> pb.TrackBatchRequest:
            return pb.TrackBatchRequest(packed=eventpack.pack(
                [pid for _, pid in group], [events[i][1] for i, _ in group],
                [events[i][2] for i, _ in group], [events[i][3] for i, _ in group]))

        self._loads.begin()
        applied = 0
        try:
            parts = await self.routed([(pid, (i, pid)) for i, pid in enumerate(keys)],
                                      "TrackBatch", build, context,
                                      lambda item, survivor: (item[0], survivor),
                                      refusals=True)
            applied = sum(r.applied for _, r in parts)
        except _GroupRefused as refused:
            done = BitMap(i for items, _ in refused.done for i, _ in items)
            local = _trailer(refused.exc, RECORD_TRAILER)
            index = refused.items[int(local)][0] \
                if local is not None and 0 <= int(local) < len(refused.items) else None
            message = refused.exc.details() or refused.exc.code().name
            if index is not None:
                message = re.sub(r"^(events|packed)\[\d+\]", f"events[{index}]", message)
            trailers: list[tuple[str, Any]] = [(APPLIED_TRAILER, done.serialize())]
            if index is not None:
                trailers.append((RECORD_TRAILER, str(index)))
            context.set_trailing_metadata(tuple(trailers))
            await _fail(context, refused.exc.code(), message)
        finally:
            self._loads.end(applied)
        return pb.TrackBatchResponse(applied=applied)

    async def _refuse_events(self, context: Any, code: grpc.StatusCode, index: int, message: str
                             ) -> NoReturn:
        """Refuse a TrackBatch before any of it was sent, naming event `index`."""
        context.set_trailing_metadata(((APPLIED_TRAILER, BitMap().serialize()),
                                       (RECORD_TRAILER, str(index))))
        await _fail(context, code, f"events[{index}].{message}")

    async def _holders(self, idents: list[tuple[str, str]], context: Any) -> list[str | None]:
        """The primary id of the profile holding each identifier (None: nobody)."""
        try:
            found = await self.directory.find(idents, context, ["\x00"])
        except Exception as exc:  # noqa: BLE001 - _abort re-raises what it cannot map
            await self._abort(context, exc)
        return [None if p is None else p.id for p in found]

    async def Link(self, request: pb.LinkRequest, context: Any) -> pb.LinkResponse:
        async with self._naming.hold((i.kind, i.value) for i in request.identifiers):
            return await self._identity_write("Link", request, context)  # type: ignore[no-any-return]

    async def Get(self, request: pb.GetRequest, context: Any) -> pb.GetResponse:
        if request.key.WhichOneof("key") == "identifier":
            [hit] = await self._by_identifier([request.key], request.attributes, context)
            if hit is None:
                ident = request.key.identifier
                await _fail(context, Code.NOT_FOUND, f"profile with identifier "
                            f"{brief(ident.kind)}:{brief(ident.value)} not found")
            return pb.GetResponse(profile=hit)
        return await self._single(request.key.id, "Get", request, context)  # type: ignore[no-any-return]

    async def Delete(self, request: pb.DeleteRequest, context: Any) -> pb.DeleteResponse:
        """Erase one person: the profile on its shard, then what other shards keep of it
        (forwards of its merged ids, the claims of its identifiers, and with `suppress`
        their entries on the blocked list). The receipt names every shard changed and the
        log position after which no snapshot of it holds the person."""
        if request.key.WhichOneof("key") == "identifier":
            [hit] = await self._by_identifier([request.key], ["\x00"], context)
            if hit is None:
                return pb.DeleteResponse(deleted=False)
            request = pb.DeleteRequest(key=pb.ProfileKey(id=hit.id), suppress=request.suppress)
        reply: pb.DeleteResponse = await self._single(request.key.id, "Delete", request, context)
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
        positions = await self._forget(erased, context)
        for shard, position in (await self.directory.forget(erased, context)).items():
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
        for _, response in await self.routed(items, "Suppress", build, context, control=True):
            positions[response.shard] = max(positions.get(response.shard, 0),
                                            response.log_position)
        return positions

    async def _by_identifier(self, keys: list[pb.ProfileKey], attributes: Iterable[str],
                             context: grpc.aio.ServicerContext) -> list[pb.Profile | None]:
        """The profile holding each identifier key, through the directory."""
        for i, key in enumerate(keys):
            if not key.identifier.kind or not key.identifier.value:
                await _fail(context, Code.INVALID_ARGUMENT,
                            f"keys[{i}]: an identifier needs a kind and a value")
        try:
            return await self.directory.find(
                [(k.identifier.kind, k.identifier.value) for k in keys], context,
                list(attributes))
        except Exception as exc:  # noqa: BLE001 - _abort re-raises what it cannot map
            await self._abort(context, exc)

    async def _forget(self, erased: list[Any], context: Any) -> dict[str, int]:
        """Erase the forwards that ids merged into erased profiles left on other shards
        (best effort: one that fails stays, forwarding to an id that finds nothing).
        Returns the log position of each shard that forgot some."""
        by_shard: dict[int, tuple[ShardState, list[str]]] = {}
        for reply in erased:
            home = self.map.owner(slot_of(reply.id)) if reply.id else None
            for pid in reply.merged_ids:
                shard = self.map.owner(slot_of(pid))
                if shard is not None and shard is not home:
                    by_shard.setdefault(id(shard), (shard, []))[1].append(pid)
        positions: dict[str, int] = {}
        for shard, pids in by_shard.values():
            try:
                answer = await shard.control.Forget(cpb.ForgetRequest(ids=pids),
                                                    timeout=_timeout(context))
                positions[answer.shard or shard.label] = answer.log_position
            except grpc.aio.AioRpcError as exc:
                log.warning("erasure: forwards of %d ids on %s stay: %s", len(pids),
                            shard.label, exc.details())
        return positions

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
        """Every shard erases its matching profiles in batches, at once; after each batch
        the router erases what other shards keep of those people (Delete's second half)
        and sends the batch's receipt on. A shard whose slots moved meanwhile may have
        handed matching profiles to another: then the whole erasure runs again (it finds
        only what is left), so a profile that matched throughout is erased wherever it
        went."""
        sub = pb.EraseProfilesRequest()
        sub.CopyFrom(request)
        if request.HasField("query"):
            sub.query.CopyFrom(await self._lenient(request.query, context))
        elif not request.HasField("anonymous_before"):
            await _fail(context, Code.INVALID_ARGUMENT,
                        "query: give the profiles to erase (ALL: every one)")
        reason = "retention" if request.HasField("anonymous_before") else "query"
        for attempt in _attempts():
            shards = await self._stable(context, False)
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
                             suppressed=request.suppress)
                yield chunk
            if not moved:
                return
            await self.map.refresh(since=self.map.version)
            await _pause(attempt, context)
        await _fail(context, Code.UNAVAILABLE, "shard ownership kept changing during the "
                    "erasure; run it again")

    async def erase_on(self, shards: list[tuple[ShardState, int]],
                       request: pb.EraseProfilesRequest, context: Any
                       ) -> AsyncIterator[pb.EraseProfilesChunk | None]:
        """EraseProfiles on `shards` at once; each batch with what other shards keep of
        its people erased too. None at the end when a shard's epoch changed meanwhile."""
        calls = [shard.stub.EraseProfiles(request, timeout=_timeout(context))
                 for shard, _ in shards]
        async for chunk in _relay(calls):
            if isinstance(chunk, grpc.aio.AioRpcError):
                for call in calls:
                    call.cancel()
                await self._abort(context, chunk)
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

    async def routed(self, items: list[tuple[str, Any]], method: str,
                     build: Callable[[list[Any]], Any], context: grpc.aio.ServicerContext,
                     retarget: Callable[[Any, str], Any] | None = None, control: bool = False,
                     judged: Mapping[str, str] | None = None,
                     rejudge: list[tuple[str, Any]] | None = None, refusals: bool = False
                     ) -> list[tuple[list[Any], Any]]:
        """Send (key, item) pairs in one request per shard owning slot_of(key), concurrently
        (to its ShardControl service if `control`). Items a shard refuses as wrong-slot are
        re-split on a fresh map and sent again; a group that met a merge's hold is sent
        again once it settled; an id merged into a profile on another shard becomes
        (survivor, retarget(item, survivor)). A group with keys in `judged` (key -> the
        "name:epoch" of the shard it was judged for) carries that as EXPECT_SHARD; when its
        shard refuses that, or the slot moved, its items go to `rejudge`, not sent again.
        With `refusals`, a group its shard refuses (REFUSED codes) raises _GroupRefused
        once the round's other answers are in, with every group applied so far."""
        pending = items
        done: list[tuple[list[Any], Any]] = []
        follow_rounds = declare_rounds = 0
        for attempt in _attempts():
            version = self.map.version
            groups: dict[int, tuple[ShardState, list[tuple[str, Any]]]] = {}
            unowned = []
            for pid, item in pending:
                owner = self.map.owner(slot_of(pid))
                if owner is None:
                    unowned.append((pid, item))
                else:
                    groups.setdefault(id(owner), (owner, []))[1].append((pid, item))

            async def one(shard: ShardState, group: list[tuple[str, Any]]) -> Any:
                request = build([item for _, item in group])
                stub = shard.control if control else shard.stub
                expect = next((judged[k] for k, _ in group if k in judged), None) \
                    if judged else None
                try:
                    return group, await getattr(stub, method)(
                        request, timeout=_timeout(context), **_expecting(expect))
                except grpc.aio.AioRpcError as exc:
                    undeclared = _trailer(exc, UNDECLARED_TRAILER)
                    if undeclared is not None:
                        await self.schema.declare_on(shard, undeclared, context,
                                                     _timeout(context))
                        return group, _DECLARED
                    if expect is not None and (_wrong_slot(exc)
                                               or _trailer(exc, REJUDGE_TRAILER)):
                        return group, _REJUDGE
                    if _wrong_slot(exc):
                        return group, None
                    if exc.code() == Code.UNAVAILABLE:
                        raise _Down(shard, exc.details() or "unreachable") from None
                    held = _trailer(exc, "memstore-merge-pending-bin")
                    if held is not None:
                        return group, _Pending(held)
                    forwarded = _trailer(exc, "memstore-merged-into-bin")
                    if forwarded is None or retarget is None:
                        raise
                    moved = dict(_forward_pairs(forwarded))
                    return [(moved[pid], retarget(item, moved[pid])) if pid in moved
                            else (pid, item) for pid, item in group], _FOLLOWED

            outcomes = await asyncio.gather(*(one(s, g) for s, g in groups.values()),
                                            return_exceptions=True)
            pending = unowned
            # why items are pending this round
            followed, declared, moved_on = False, False, bool(unowned)
            refused: _GroupRefused | None = None
            for (_, sent), outcome in zip(groups.values(), outcomes, strict=True):
                if (refusals and isinstance(outcome, grpc.aio.AioRpcError)
                        and outcome.code() in REFUSED):
                    refused = refused or _GroupRefused([item for _, item in sent], outcome,
                                                       done)
                    continue
                if isinstance(outcome, BaseException):
                    await self._abort(context, outcome)  # type: ignore[arg-type]
                group, response = outcome
                if isinstance(response, _Pending):
                    try:
                        await self._settle(response, attempt, context)
                    except Exception as exc:  # noqa: BLE001 - _abort re-raises the rest
                        await self._abort(context, exc)
                    pending.extend(group)
                    moved_on = True
                elif response is _FOLLOWED:
                    pending.extend(group)
                    followed = True
                elif response is _DECLARED:  # its shard now declares what it names: again
                    pending.extend(group)
                    declared = True
                elif response is _REJUDGE:
                    assert rejudge is not None
                    rejudge.extend(group)
                elif response is None:
                    pending.extend(group)
                    moved_on = True
                else:
                    done.append(([item for _, item in group], response))
            if refused is not None:
                raise refused
            if not pending:
                return done
            if declared and not (followed or moved_on):
                declare_rounds += 1
                if declare_rounds <= MAX_DECLARES:
                    continue
            if followed:
                follow_rounds += 1
                if follow_rounds > MAX_FORWARDS:
                    await _fail(context, Code.FAILED_PRECONDITION, f"more than {MAX_FORWARDS} "
                                "rounds of merged-away ids in one batch (a forward cycle?)")
                if not moved_on:  # only ids aimed at their survivors now: no map change
                    continue
            await self.map.refresh(since=version)
            if attempt:
                await _pause(attempt, context)
        await _fail(context, Code.UNAVAILABLE, f"slots without an owner that accepts them "
                    f"after {MOVE_WAIT:.0f} s (a slot move stuck?)")

    async def BatchGet(self, request: pb.BatchGetRequest, context: Any) -> pb.BatchGetResponse:
        # Answers in the order keys, then ids (BatchGetRequest.ids).
        n = len(request.keys) + len(request.ids)
        results = [pb.GetResult() for _ in range(n)]
        by_id: dict[str, list[int]] = {}
        by_ident: list[int] = []
        for i, key in enumerate(request.keys):
            if key.WhichOneof("key") == "identifier":
                by_ident.append(i)
            elif not key.id:
                await _fail(context, Code.INVALID_ARGUMENT, f"keys[{i}]: an empty primary id")
            else:
                by_id.setdefault(key.id, []).append(i)
        if "" in request.ids:
            await _fail(context, Code.INVALID_ARGUMENT,
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
            parts = await self.routed([(p, (p, p)) for p in by_id], "BatchGet", build,
                                       context, lambda pair, survivor: (survivor, pair[1]))
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
            found = await self._by_identifier([request.keys[i] for i in by_ident],
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

    async def BatchUpsert(self, request: pb.BatchUpsertRequest, context: Any
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
                await _fail(context, Code.INVALID_ARGUMENT, f"packed: {exc}")
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
                await _fail(context, Code.INVALID_ARGUMENT, str(exc))
            # [id, row of the batch, identifiers]: sent on as that row of the columns
            base = len(items)
            items += [(pid, ([pid, i, idents], COLUMNS, base + i))
                      for i, (pid, idents) in enumerate(zip(batch.ids, batch.identifiers,
                                                            strict=True))]
        for i, (pid, _) in enumerate(items):
            if not pid:
                await _fail(context, Code.INVALID_ARGUMENT, f"record {i}: an empty primary id")
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
            return _retarget(record, survivor), form, index

        named = [_identifiers_of(item) for _, item in items]
        parts: list[tuple[list[Any], Any]] = []
        async with self._naming.hold(itertools.chain.from_iterable(named)):
            try:
                for attempt in _attempts():
                    # The records are judged (merges, homes) on the map as it is now, and
                    # each shard refuses a part judged on an older map: those records are
                    # judged again.
                    version = self.map.version
                    judged: dict[str, str] = {}
                    try:
                        first, later = await self._merge_first(items, named, context, judged)
                    except Suppressed as exc:
                        await _refuse_suppressed(context, exc, items, named, forms)
                    rejudge: list[tuple[str, Any]] = []
                    parts += await self.routed(first, "BatchUpsert", build, context, retarget,
                                               judged=judged, rejudge=rejudge, refusals=True)
                    if not rejudge:
                        break
                    items = rejudge + later
                    named = [_identifiers_of(item) for _, item in items]
                    await self.map.refresh(since=version)
                    await _pause(attempt, context)
                else:
                    await _fail(context, Code.UNAVAILABLE, "BatchUpsert: slots kept moving "
                                f"under the batch for {MOVE_WAIT:.0f} s")
                for pid, item in later:
                    await self._identity_write("Link", pb.LinkRequest(id=pid, identifiers=[
                        pb.Identifier(kind=k, value=v) for k, v in _identifiers_of(item)],
                        create=True), context)
                    parts += await self.routed([(pid, item)], "BatchUpsert", build, context,
                                               retarget, refusals=True)
            except _GroupRefused as refused:
                await _refuse_batch(context, refused, parts + refused.done, forms)
        return pb.BatchUpsertResponse(applied=sum(r.applied for _, r in parts),
                                      created=sum(r.created for _, r in parts))

    async def _merge_first(self, items: list[tuple[str, Any]],
                           named: list[list[tuple[str, str]]], context: Any,
                           judged: dict[str, str]
                           ) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        """Make a batch's cross-shard identity merges before it is split by shard.

        A record naming an identifier that a profile on another shard holds first links it
        (a cross-shard merge, shards/merge.py), then goes in the batch. A record naming an
        identifier that an earlier record of the batch, homed on another shard, names too
        is held back (`later`): it is linked and upserted after the batch, in order, which
        merges the earlier record's profile into it as one shard would have. Each record
        naming identifiers gets, in `judged`, the "name:epoch" of the shard it was judged
        to live on (its shard's merges and the batch's shared identifiers assume it)."""
        if not any(named):
            return items, []
        first_home: dict[tuple[str, str], ShardState | None] = {}
        later_at: set[int] = set()
        for i, ((pid, _), idents) in enumerate(zip(items, named, strict=True)):
            home = self.map.owner(slot_of(pid))
            if idents:  # "" (no owner known): cannot be judged, its shard refuses it
                judged[pid] = "" if home is None else f"{home.name}:{home.epoch}"
            for key in idents:
                if first_home.setdefault(key, home) is not home:
                    later_at.add(i)
        # Each identifier is claimed for the first record that names it and goes in the
        # batch now (those that do all live on one shard); held-back records claim theirs
        # with their own Link.
        claimant: dict[tuple[str, str], str] = {}
        for i, ((pid, _), idents) in enumerate(zip(items, named, strict=True)):
            if i not in later_at:
                for key in idents:
                    claimant.setdefault(key, pid)
        try:
            holder = await self.directory.claim([(pid, key) for key, pid in claimant.items()],
                                                context, set())
        except Suppressed:
            raise  # the batch names the record (_batch_upsert)
        except Exception as exc:  # noqa: BLE001 - _abort re-raises what it cannot map
            await self._abort(context, exc)
        for i, ((pid, _), idents) in enumerate(zip(items, named, strict=True)):
            foreign = [pb.Identifier(kind=key[0], value=key[1]) for key in idents
                       if claimant.get(key) == pid and key in holder]
            if foreign and i not in later_at:
                await self._identity_write("Link", pb.LinkRequest(
                    id=pid, identifiers=foreign, create=True), context)
        first = [item for i, item in enumerate(items) if i not in later_at]
        return first, [items[i] for i in sorted(later_at)]

    # ------------------------------------------------------------------ schema
    async def DeclareAttributes(self, request: pb.DeclareAttributesRequest, context: Any
                                ) -> pb.SchemaResponse:
        """The registry first: a declaration that differs from the cluster's is refused
        before any shard changed; then every reachable shard (one that is down declares
        it before a write of it applies there, shards/schema.py)."""
        for i, spec in enumerate(request.attributes):
            if spec.kind == pb.KIND_UNSPECIFIED:
                await _fail(context, Code.INVALID_ARGUMENT, f"attributes[{i}]: kind is not set")
        try:
            specs = await self.schema.declare(request.attributes, context)
        except ValueError as exc:
            await _fail(context, Code.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # noqa: BLE001 - _abort re-raises what it cannot map
            await self._abort(context, exc)
        timeout = _timeout(context)
        declared = pb.DeclareAttributesRequest(attributes=specs)

        def call(shard: ShardState) -> Any:
            return shard.stub.DeclareAttributes(declared, timeout=timeout)

        answers, _ = await self._fan_out(context, call, allow_partial=True)
        return _union_schema(r for _, r in answers)

    async def GetSchema(self, request: pb.GetSchemaRequest, context: Any) -> pb.SchemaResponse:
        timeout = _timeout(context)

        def call(shard: ShardState) -> Any:
            return shard.stub.GetSchema(request, timeout=timeout)

        answers, _ = await self._fan_out(context, call)
        return _union_schema(r for _, r in answers)

    # ------------------------------------------------------------------ queries
    async def Count(self, request: pb.QueryRequest, context: Any) -> pb.CountResponse:
        request = await self._lenient(request, context)
        timeout = _timeout(context)

        def call(shard: ShardState) -> Any:
            return shard.stub.Count(request, timeout=timeout)

        answers, missing = await self._fan_out(context, call, request.allow_partial)
        return pb.CountResponse(count=sum(r.count for _, r in answers), missing_shards=missing)

    async def GroupBy(self, request: pb.GroupByRequest, context: Any) -> pb.GroupByResponse:
        if not request.attribute:
            await _fail(context, Code.INVALID_ARGUMENT,
                        "attribute: the attribute to group by is required")
        query = await self._lenient(request.query, context, request.attribute)
        sub = pb.GroupByRequest(query=query, attribute=request.attribute, top_n=0)
        timeout = _timeout(context)

        def call(shard: ShardState) -> Any:
            return shard.stub.GroupBy(sub, timeout=timeout)

        answers, missing = await self._fan_out(context, call, request.query.allow_partial)
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

    async def QueryBitmap(self, request: pb.QueryRequest, context: Any) -> pb.BitmapResponse:
        request = await self._lenient(request, context)
        timeout = _timeout(context)

        def call(shard: ShardState) -> Any:
            return shard.stub.QueryBitmap(request, timeout=timeout)

        answers, missing = await self._fan_out(context, call, request.allow_partial)
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

    async def QueryIds(self, request: pb.QueryIdsRequest, context: Any) -> pb.QueryIdsResponse:
        size = request.page_size or 1000
        allow_partial = request.query.allow_partial
        query = await self._lenient(request.query, context)
        for attempt in _attempts():
            shards = await self._stable(context, allow_partial)
            try:
                index, inner = self._start(request.cursor, shards)
            except ValueError as exc:
                await _fail(context, Code.INVALID_ARGUMENT, str(exc))
            response = pb.QueryIdsResponse()
            try:
                while index < len(shards):
                    shard, epoch = shards[index]
                    sub = pb.QueryIdsRequest(query=query, cursor=inner,
                                             page_size=size - len(response.ids))
                    try:
                        part: pb.QueryIdsResponse = await self._checked(
                            shard, epoch, functools.partial(_query_ids, sub=sub,
                                                            timeout=_timeout(context)))
                    except _Down as exc:
                        if not allow_partial:
                            await self._abort(context, exc)
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
            except _Moved:
                await self.map.refresh(since=self.map.version)
                await _pause(attempt, context)
            except grpc.aio.AioRpcError as exc:
                await self._abort(context, exc)
        await _fail(context, Code.UNAVAILABLE, "shard ownership kept changing during the query")

    async def StreamIds(self, request: pb.QueryIdsRequest, context: Any
                        ) -> AsyncIterator[pb.QueryIdsResponse]:
        allow_partial = request.query.allow_partial
        query = await self._lenient(request.query, context)
        shards = await self._stable(context, allow_partial)
        try:
            index, inner = self._start(request.cursor, shards)
        except ValueError as exc:
            await _fail(context, Code.INVALID_ARGUMENT, str(exc))
        missing: list[str] = []
        while index < len(shards):
            shard, epoch = shards[index]
            nxt = shards[index + 1][0].label if index + 1 < len(shards) else None
            sub = pb.QueryIdsRequest(query=query, cursor=inner,
                                     page_size=request.page_size)
            try:
                async for part in shard.stub.StreamIds(sub, timeout=_timeout(context)):
                    if part.next_cursor:
                        cursor = _encode_cursor(shard.label, part.next_cursor)
                    else:
                        cursor = _encode_cursor(nxt, "") if nxt else ""
                    yield pb.QueryIdsResponse(ids=part.ids, next_cursor=cursor,
                                              missing_shards=missing)
                info = await shard.control.GetShardInfo(cpb.ShardInfoRequest(), timeout=5.0)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != Code.UNAVAILABLE:
                    await self._abort(context, exc)
                exc2 = _Down(shard, exc.details() or "unreachable")
                if not allow_partial:
                    await self._abort(context, exc2)
                missing.append(shard.label)
            except _Down as exc:
                if not allow_partial:
                    await self._abort(context, exc)
                missing.append(shard.label)
            else:
                if info.epoch != epoch:
                    await _fail(context, Code.ABORTED, f"shard {shard.label} changed slot "
                                "ownership during the stream (a slot move); start "
                                "again")
            index, inner = index + 1, ""
        if missing:
            yield pb.QueryIdsResponse(missing_shards=missing)

    # ------------------------------------------------------------------ saved segments
    async def CreateSegment(self, request: pb.CreateSegmentRequest, context: Any
                            ) -> pb.SegmentInfo:
        """Every shard or none: a shard that refuses (or is down) has the others forget
        it again. The router fixes the creation time, so every shard records the same."""
        try:
            node = query_from_request(request.query)
        except QueryError as exc:
            await _fail(context, Code.INVALID_ARGUMENT, f"query: {exc}")
        sub = pb.CreateSegmentRequest(name=request.name,
                                      query=pb.QueryRequest(text=format_query(node)))
        sub.created_at.GetCurrentTime()
        timeout = _timeout(context)
        shards = await self._stable(context, allow_partial=False)
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
                await _fail(context, Code.UNAVAILABLE, f"segment {request.name!r} not "
                            f"created: a shard is unavailable ({failed.details()})")
            await self._abort(context, failed)
        self._segments.add(request.name)
        infos = [o for o in outcomes if isinstance(o, pb.SegmentInfo)]
        return _sum_segment(infos)

    async def DeleteSegment(self, request: pb.DeleteSegmentRequest, context: Any
                            ) -> pb.DeleteSegmentResponse:
        timeout = _timeout(context)

        def call(shard: ShardState) -> Any:
            return shard.stub.DeleteSegment(request, timeout=timeout)

        answers, _ = await self._fan_out(context, call)
        self._segments.discard(request.name)
        return pb.DeleteSegmentResponse(deleted=any(r.deleted for _, r in answers))

    async def ListSegments(self, request: pb.ListSegmentsRequest, context: Any
                           ) -> pb.ListSegmentsResponse:
        timeout = _timeout(context)

        def call(shard: ShardState) -> Any:
            return shard.stub.ListSegments(request, timeout=timeout)

        answers, missing = await self._fan_out(context, call, request.allow_partial)
        by_name: dict[str, list[pb.SegmentInfo]] = {}
        for _, response in answers:
            for info in response.segments:
                by_name.setdefault(info.name, []).append(info)
        self._segments = set(by_name)
        return pb.ListSegmentsResponse(segments=[_sum_segment(by_name[n])
                                                 for n in sorted(by_name)],
                                       missing_shards=missing)

    async def WatchSegments(self, request: pb.WatchSegmentsRequest, context: Any
                            ) -> AsyncIterator[pb.WatchSegmentsResponse]:
        async for message in self._watch(request, context, "WatchSegments", "events",
                                         pb.WatchSegmentsResponse):
            yield message

    async def WatchChanges(self, request: pb.WatchChangesRequest, context: Any
                           ) -> AsyncIterator[pb.WatchChangesResponse]:
        if request.HasField("query"):
            lenient = await self._lenient(request.query, context)
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
            await _fail(context, Code.INVALID_ARGUMENT, str(exc))
        await self._stable(context, allow_partial=False)
        initial = request.initial and not request.from_position

        def open_stream(shard: ShardState, request: Any) -> Any:
            return getattr(shard.stub, method)(request)

        merge = watch.Merge(self.map, open_stream, request, items, make, initial, start)
        try:
            async for message in merge.run():
                yield message
        except grpc.aio.AioRpcError as exc:
            await self._abort(context, exc)

    # ------------------------------------------------------------------ operations
    async def Snapshot(self, request: pb.SnapshotRequest, context: Any) -> pb.SnapshotResponse:
        timeout = _timeout(context)

        def call(shard: ShardState) -> Any:
            return shard.stub.Snapshot(request, timeout=timeout)

        answers, _ = await self._fan_out(context, call)
        return pb.SnapshotResponse(path=";".join(r.path for _, r in answers),
                                   shard_positions={s.label: r.log_position
                                                    for s, r in answers},
                                   profiles=sum(r.profiles for _, r in answers))

    async def Stats(self, request: pb.StatsRequest, context: Any) -> pb.StatsResponse:
        timeout = _timeout(context)

        def call(shard: ShardState) -> Any:
            return shard.stub.Stats(request, timeout=timeout)

        answers, missing = await self._fan_out(context, call, allow_partial=True)
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

    # ------------------------------------------------------------------ admin
    async def admin(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        """RouterAdmin (JSON over gRPC, no proto): the cluster tools tell routers about
        shards joining and leaving; the shards themselves are the truth about slots."""
        if method == "RebuildDirectory":
            return await self.directory.rebuild(Background())
        if method == "AddShard":
            await self.map.join(str(body["address"]))
        elif method == "RemoveShard":
            await self.map.remove(str(body["name"]))
        elif method != "ListShards":
            raise ValueError(f"unknown admin method {method}")
        await self.map.refresh()
        if method != "ListShards" and self.on_membership is not None:
            self.on_membership([s.address for s in self.map.shards])
        return {"shards": self.map.describe(), "exact": self.map.exact}


async def _relay(calls: list[Any]) -> AsyncIterator[Any]:
    """The messages of several server streams as they come (an AioRpcError in place of a
    stream that failed, after which nothing more is read)."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=4 * max(1, len(calls)))
    done = object()

    async def pump(call: Any) -> None:
        try:
            async for message in call:
                await queue.put(message)
        except grpc.aio.AioRpcError as exc:
            await queue.put(exc)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(call)) for call in calls]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
                continue
            yield item
            if isinstance(item, grpc.aio.AioRpcError):
                return
    finally:
        for task in tasks:
            task.cancel()


async def _refuse_suppressed(context: Any, exc: Suppressed, items: list[tuple[str, Any]],
                             named: list[list[tuple[str, str]]], forms: tuple[int, int]
                             ) -> NoReturn:
    """Refuse a BatchUpsert naming a suppressed identifier, naming its first record (as a
    shard names a record it refuses: RECORD_TRAILER), nothing applied."""
    i = next(i for i, idents in enumerate(named) if exc.ident in idents)
    _, form, index = items[i][1]
    where = (f"requests[{index}]" if form == REQUEST else f"packed[{index - forms[0]}]"
             if form == PACKED else f"columns[{index - forms[0] - forms[1]}]")
    context.set_trailing_metadata(((RECORD_TRAILER, str(index)),
                                   (APPLIED_TRAILER, BitMap().serialize())))
    await _fail(context, Code.FAILED_PRECONDITION, f"{where}.identifiers: {exc}")


def _sum_segment(infos: list[pb.SegmentInfo]) -> pb.SegmentInfo:
    """One segment as every shard told it: members summed, the first broken reason."""
    out = pb.SegmentInfo()
    out.CopyFrom(infos[0])
    out.members = sum(i.members for i in infos)
    out.broken = next((i.broken for i in infos if i.broken), "")
    return out


def _union_schema(responses: Iterable[pb.SchemaResponse]) -> pb.SchemaResponse:
    seen: dict[str, pb.AttributeSpec] = {}
    for response in responses:
        for spec in response.attributes:
            seen.setdefault(spec.name, spec)
    out = pb.SchemaResponse()
    out.attributes.extend(sorted(seen.values(), key=lambda s: s.name))
    return out


def _query_ids(shard: ShardState, sub: pb.QueryIdsRequest, timeout: float | None) -> Any:
    return shard.stub.QueryIds(sub, timeout=timeout)


def _admin_handler(router: RouterService) -> grpc.GenericRpcHandler:
    def handler(method: str) -> grpc.RpcMethodHandler:
        async def call(body: dict[str, Any], context: grpc.aio.ServicerContext
                       ) -> dict[str, Any]:
            try:
                return await router.admin(method, body)
            except (ValueError, KeyError, TypeError) as exc:
                await _fail(context, Code.INVALID_ARGUMENT, str(exc))

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=lambda b: json.loads(b or b"{}"),
            response_serializer=lambda d: json.dumps(d).encode())

    return grpc.method_handlers_generic_handler(
        ADMIN_SERVICE, {m: handler(m) for m in ("ListShards", "AddShard", "RemoveShard",
                                                "RebuildDirectory")})


async def admin_call(address: str, method: str, body: dict[str, Any] | None = None,
                     timeout: float = 10.0, credentials: Credentials | None = None
                     ) -> dict[str, Any]:
    """Client side of RouterAdmin, for the cluster commands."""
    credentials = credentials or Credentials()
    async with credentials.aio_channel(address, CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(f"/{ADMIN_SERVICE}/{method}",
                                   request_serializer=lambda d: json.dumps(d).encode(),
                                   response_deserializer=json.loads)
        return await call(body or {}, timeout=timeout)  # type: ignore[no-any-return]


async def start_router(addresses: Iterable[str], host: str = "127.0.0.1", port: int = 7070,
                       on_membership: Callable[[list[str]], None] | None = None,
                       wait_timeout: float = 30.0, link_port: int | None = 0,
                       security: ServerSecurity | None = None,
                       credentials: Credentials | None = None,
                       limits: QueryLimits = DEFAULT_LIMITS,
                       anonymous_ttl: float | None = None
                       ) -> tuple[grpc.aio.Server, int, RouterService]:
    """Build and start a router server (after every shard answered once). `link_port`:
    where clients' unary calls may come over the link (memstore/server/link.py; 0 picks a free
    port), on the same host; None serves gRPC alone (and so does a router under TLS or
    tokens). `security`: how it listens and whom it answers; `credentials`: what it
    presents to its shards (memstore/server/security.py). `limits`: the size of work one
    query may ask for (give the shards the same)."""
    from shards.shard_map import wait_for

    security = security or ServerSecurity()
    security.check_host(host)
    if security.guarded:
        link_port = None
    shard_map = ShardMap(addresses, credentials)
    down = await wait_for(shard_map, wait_timeout)
    if down:
        log.warning("starting without shards %s: their calls get UNAVAILABLE until they "
                    "answer", ", ".join(down))
    router = RouterService(shard_map, on_membership, limits)
    await router.bootstrap_schema()
    # Guard last: authentication answers first, so a caller without credentials learns
    # nothing of how its request parsed (memstore/server/guard.py).
    server = grpc.aio.server(options=CHANNEL_OPTIONS[:2],
                             interceptors=[*security.interceptors(), _Metered(), Guard()])
    memstore_pb2_grpc.add_MemstoreServicer_to_server(router, server)
    server.add_generic_rpc_handlers((_admin_handler(router),))
    if link_port is not None:
        router.link = LinkServer(router, pb.DESCRIPTOR.services_by_name["Memstore"],
                                 metered=True)
        server.add_generic_rpc_handlers((describe_handler(router.link),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable(server, (pb.DESCRIPTOR.services_by_name["Memstore"].full_name,
                               health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    bound = security.bind(server, f"{host}:{port}")
    await server.start()
    if router.link is not None:
        try:
            await router.link.start(host, link_port or 0)
        except BaseException:
            await server.stop(grace=None)
            raise
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("memstore.v1.Memstore", health_pb2.HealthCheckResponse.SERVING)
    server._memstore_health = health_servicer  # type: ignore[attr-defined]
    router.sweeper = asyncio.get_running_loop().create_task(router.sweep())
    if anonymous_ttl:
        from shards.retention import Retention

        router.retention = Retention(router, anonymous_ttl)
        router.retention_task = asyncio.get_running_loop().create_task(router.retention.run())
    return server, bound, router


async def stop_router(server: grpc.aio.Server, router: RouterService, grace: float = 5.0
                      ) -> None:
    health_servicer = getattr(server, "_memstore_health", None)
    if health_servicer is not None:
        await health_servicer.enter_graceful_shutdown()
    await asyncio.gather(server.stop(grace=grace),
                         *([router.link.stop(grace)] if router.link is not None else []))
    if router.sweeper is not None:
        router.sweeper.cancel()
    if router.retention_task is not None:
        router.retention_task.cancel()
    await router.map.close()


def settle_heap() -> None:
    """Once a serving process has started: move what it built so far out of the garbage
    collector's sight (gc.freeze), so a full collection later scans only what requests
    made since, not every module and object of start-up (a pause in some look-ups' p99)."""
    gc.collect()
    gc.freeze()


async def serve(addresses: list[str], host: str = "127.0.0.1", port: int = 7070,
                metrics_port: int | None = None, link_port: int | None = 0,
                security: ServerSecurity | None = None,
                credentials: Credentials | None = None,
                limits: QueryLimits = DEFAULT_LIMITS,
                anonymous_ttl: float | None = None) -> None:
    """Run a router until SIGTERM/SIGINT, then drain in-flight calls. The auth file is read
    again on SIGHUP."""
    security = security or ServerSecurity()
    server, bound, router = await start_router(addresses, host, port, link_port=link_port,
                                               security=security, credentials=credentials,
                                               limits=limits, anonymous_ttl=anonymous_ttl)
    settle_heap()
    if metrics_port is not None:
        scrape = metrics.serve_metrics(host, metrics_port, tls=security.metrics_tls())
        scheme = "https" if security.tls else "http"
        url = f"{scheme}://{host}:{scrape}/metrics"
        log.info(f"metrics on {url}", extra={"url": url})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, security.reload)  # never the default (exit)
    if router.link is not None:
        log.info(f"link on {host}:{router.link.port}", extra={"port": router.link.port})
    logs.ready(log, f"{host}:{bound}")
    await stop.wait()
    started = time.monotonic()
    await stop_router(server, router)
    log.info("router stopped in %.2fs", time.monotonic() - started)


async def _refuse_batch(context: Any, refused: _GroupRefused,
                        applied: list[tuple[list[Any], Any]], forms: tuple[int, int]
                        ) -> NoReturn:
    """End a BatchUpsert a shard refused part of: its status and message, with the record at
    fault named by its place in this request (the shard named its place in its part), and
    which records applied on other shards all the same (RECORD_TRAILER, APPLIED_TRAILER)."""
    exc = refused.exc
    done = BitMap(index for items, _ in applied for _, _, index in items)
    trailers: list[tuple[str, Any]] = [(APPLIED_TRAILER, done.serialize())]
    message = exc.details() or exc.code().name
    local = _trailer(exc, RECORD_TRAILER)
    # The shard's part lists its requests, then its packed rows, then its columns rows.
    order = sorted(refused.items, key=lambda item: item[1])
    if local is not None and 0 <= int(local) < len(order):
        _, form, index = order[int(local)]
        trailers.append((RECORD_TRAILER, str(index)))
        named = ("requests", index) if form == REQUEST else (
            ("packed", index - forms[0]) if form == PACKED else
            ("columns", index - forms[0] - forms[1]))
        message = re.sub(r"^(requests|packed|columns)\[\d+\]", f"{named[0]}[{named[1]}]",
                         message)
    context.set_trailing_metadata(tuple(trailers))
    await _fail(context, exc.code(), message)


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


class _Metered(grpc.aio.ServerInterceptor):
    """Count and time every unary call of the public API (memstore.server.metrics)."""

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or handler.unary_unary is None or "/memstore.v1." not in method:
            return handler
        name = method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        async def timed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            code = "UNKNOWN"
            try:
                response = await inner(request, context)
                code = "OK"
                return response
            finally:
                aborted = context.code()
                if aborted is not None and aborted != Code.OK:
                    code = aborted.name if isinstance(aborted, grpc.StatusCode) else str(aborted)
                metrics.observe(name, code, time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            timed, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


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
