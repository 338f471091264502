"""Calls to the owner of a key's slot: how a router reaches one profile, or many by key.

`Routing` sends a request to the shard that owns slot_of(key) on the router's cached
`ShardMap`, and keeps at it while the cluster moves under the call, within the caller's
deadline (shards/calls.py):
- a shard that no longer owns the slot answers `memstore-wrong-slot`: refresh the map and
  send again; a slot nobody owns for a moment (the switch of a slot move) is waited out;
- a profile held by an unfinished cross-shard merge (`memstore-merge-pending-bin`): wait
  out a young hold, decide and release one older than merge.HOLD_PATIENCE (`settle`);
- an id merged into a profile on another shard (`memstore-merged-into-bin`): follow it to
  its survivor (at most MAX_FORWARDS in a row);
- a shard that lacks a declaration the cluster has (UNDECLARED_TRAILER): declare it there
  from the schema registry, then send again;
- a write judged for one shard at one epoch (EXPECT_SHARD) that meets other ownership:
  raise Rejudge, for the writer to judge it again.

One key: `owner_call` (raising what it cannot handle), `single` (ending the caller's call
with the matching status instead), and `control`/`profile`, the merge.Caller the merge
coordinator drives (shards/merge.py). Many keys: `routed`, one request per owning shard
at once, for batches (BatchGet, BatchUpsert, TrackBatch) and for the directory's and the
schema registry's entries (shards/directory.py, shards/schema.py), which live in slots
like profiles. `sweep` runs in the background and finishes merges whose router died.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import grpc
import numpy as np

from memstore.hashslot import REJUDGE_TRAILER, UNDECLARED_TRAILER, slots_of
from shards import merge
from shards.calls import (
    MAX_DECLARES,
    MAX_FORWARDS,
    MOVE_WAIT,
    Background,
    Code,
    Down,
    GroupRefused,
    Pending,
    Rejudge,
    Stuck,
    abort,
    attempts,
    expecting,
    fail,
    forward_pairs,
    move_pause,
    not_primary,
    retargeted,
    time_left,
    trailer_of,
    wrong_slot,
)
from shards.schema import ClusterSchema
from shards.shard_map import ShardMap, ShardState
from shards.slots import slot_of

log = logging.getLogger("memstore.router")

BULK_FROM = 64  # keys of a batch from which routed() groups them with numpy
SWEEP_INTERVAL = 2.0  # seconds between looks for merges a dead router left unfinished
_FOLLOWED = object()  # routed: a group sent again, aimed at the survivors of merged-away ids
_REJUDGE = object()  # routed: a group its shard refused as judged on an older map (EXPECT_SHARD)


@dataclass(slots=True)
class _Undeclared:
    """routed: a group its shard refused as naming undeclared attributes (their
    proposals in `trailer`), sent again once the round's are declared."""

    shard: ShardState
    trailer: bytes


class Routing:
    """Calls to slot owners on `shard_map`, following moves, merges and declarations."""

    def __init__(self, shard_map: ShardMap) -> None:
        self.map = shard_map
        # The cluster's schema registry (shards/schema.py): its entries live in slots too
        # (routed), and a shard missing a declaration gets it from there before a write
        # is sent again.
        self.schema = ClusterSchema(self)

    async def single(self, pid: str, method: str, request: Any,
                     context: grpc.aio.ServicerContext, read: bool = False) -> Any:
        """Send `request` to the shard owning slot_of(pid), following slot moves, waiting
        out merges and following merged-away ids to their survivor. A `read` may be
        answered by a replica (shards/replica_reads.py)."""
        if not pid:
            await fail(context, Code.INVALID_ARGUMENT, "id: a primary id is required")
        try:
            return await self.owner_call(pid, method, request, context, read=read)
        except Exception as exc:  # noqa: BLE001 - abort re-raises what it cannot map
            await abort(context, exc)

    async def owner_call(self, pid: str, method: str, request: Any, context: Any, *,
                         control: bool = False, follow: bool = True,
                         expect: str | None = None, read: bool = False) -> Any:
        """`request` to the owner of slot_of(pid), on its ShardControl service if `control`.
        Raises what it cannot handle: AioRpcError, Down, Stuck, and merge.Forwarded when
        not `follow`ing merged-away ids. With `expect` ("name:epoch" the write was judged
        for, EXPECT_SHARD), raises Rejudge where ownership is not as judged."""
        hops = declared = 0
        for attempt in attempts():
            slot = slot_of(pid)
            version = self.map.version
            shard = self.map.owner(slot)
            if shard is None:
                await self.map.refresh(since=version)
                if self.map.owner(slot) is None:
                    await move_pause(attempt, context)
                continue
            stub = shard.control if control else shard.reader if read else shard.stub
            try:
                return await getattr(stub, method)(request, timeout=time_left(context),
                                                   **expecting(expect))
            except grpc.aio.AioRpcError as exc:
                undeclared = trailer_of(exc, UNDECLARED_TRAILER)
                if undeclared is not None and declared < MAX_DECLARES:
                    declared += 1  # declare them there as the cluster has them; again
                    await self.schema.declare_on(shard, undeclared, context,
                                                 time_left(context))
                    continue
                if expect is not None and (wrong_slot(exc) or trailer_of(exc, REJUDGE_TRAILER)):
                    await self.map.refresh(since=version)
                    raise Rejudge() from None
                if wrong_slot(exc) or not_primary(exc):  # moved, or failed over: again
                    await self.map.refresh(since=version)
                    if self.map.owner(slot) is shard:
                        await move_pause(attempt, context)
                    continue
                if exc.code() == Code.UNAVAILABLE:
                    raise Down(shard, exc.details() or "unreachable") from None
                pending = trailer_of(exc, "memstore-merge-pending-bin")
                if pending is not None:
                    await self.settle(Pending(pending), attempt, context)
                    continue
                forwarded = trailer_of(exc, "memstore-merged-into-bin")
                if forwarded is None:
                    raise
                [gone, survivor], *_ = forward_pairs(forwarded)
                if not follow:
                    raise merge.Forwarded(gone, survivor) from None
                hops += 1
                if hops > MAX_FORWARDS:
                    raise merge.Forwarded(gone, survivor, f"more than {MAX_FORWARDS} forwards "
                                          f"in a row, the last {gone!r} -> {survivor!r} "
                                          "(a forward cycle?)") from None
                request, pid = retargeted(request, survivor), survivor
        raise Stuck(f"a slot has no owner that accepts it after {MOVE_WAIT:.0f} s "
                    "(a slot move stuck?)")

    # merge.Caller
    def control(self, pid: str, method: str, request: Any, context: Any,
                expect: str | None = None) -> Awaitable[Any]:
        return self.owner_call(pid, method, request, context, control=True, follow=False,
                               expect=expect)

    def profile(self, pid: str, method: str, request: Any, context: Any) -> Awaitable[Any]:
        return self.owner_call(pid, method, request, context)

    async def settle(self, pending: Pending, attempt: int, context: Any) -> None:
        """Wait out a young hold; decide and release one older than HOLD_PATIENCE."""
        if pending.age < merge.HOLD_PATIENCE:
            await move_pause(attempt, context)
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
            # A copy taken before any await: a shard may join or leave (the list changes
            # in place) while a merge is settled below; what this round misses, the next sees.
            stale = [held for shard in list(self.map.shards) for held in shard.held
                     if held.age_seconds >= 2 * merge.HOLD_PATIENCE]
            for held in stale:
                try:
                    await merge.decide_and_release(self, held.txn, held.loser, held.survivor,
                                                   context)
                except Exception as exc:  # noqa: BLE001 - a shard down: next round
                    log.warning("sweep: merge %s of %r still unfinished: %s", held.txn,
                                held.loser, exc)

    def _grouped(self, pending: list[tuple[str, Any]]
                 ) -> tuple[dict[int, tuple[ShardState, list[tuple[str, Any]]]],
                            list[tuple[str, Any]]]:
        """(key, item) pairs by the shard owning slot_of(key), in their order, and those
        whose slot nobody owns now. A batch is hashed and looked up with numpy, with no
        Python frame per key (a TrackBatch carries tens of thousands)."""
        groups: dict[int, tuple[ShardState, list[tuple[str, Any]]]] = {}
        unowned: list[tuple[str, Any]] = []
        if len(pending) < BULK_FROM:
            for pid, item in pending:
                owner = self.map.owner(slot_of(pid))
                if owner is None:
                    unowned.append((pid, item))
                else:
                    groups.setdefault(id(owner), (owner, []))[1].append((pid, item))
            return groups, unowned
        slots = np.array(slots_of(map(itemgetter(0), pending)), dtype=np.int64)
        owners = self.map.owners_of(slots)
        shards = self.map.shards
        for index in np.unique(owners).tolist():
            rows = np.flatnonzero(owners == index).tolist()
            part = list(map(pending.__getitem__, rows))
            if index < 0:
                unowned = part
            else:
                groups[id(shards[index])] = (shards[index], part)
        return groups, unowned

    async def routed(self, items: list[tuple[str, Any]], method: str,
                     build: Callable[[list[Any]], Any], context: grpc.aio.ServicerContext,
                     retarget: Callable[[Any, str], Any] | None = None, control: bool = False,
                     judged: Mapping[str, str] | None = None,
                     rejudge: list[tuple[str, Any]] | None = None, refusals: bool = False,
                     read: bool = False) -> list[tuple[list[Any], Any]]:
        """Send (key, item) pairs in one request per shard owning slot_of(key), concurrently
        (to its ShardControl service if `control`). Items a shard refuses as wrong-slot are
        re-split on a fresh map and sent again; a group that met a merge's hold is sent
        again once it settled; an id merged into a profile on another shard becomes
        (survivor, retarget(item, survivor)). A group with keys in `judged` (key -> the
        "name:epoch" of the shard it was judged for) carries that as EXPECT_SHARD; when its
        shard refuses that, or the slot moved, or one of those keys was merged away, its
        items go to `rejudge` (aimed at the survivors), not sent again.
        With `refusals`, a group its shard refuses, or does not answer for, raises
        GroupRefused once the round's other answers are in, with every group applied so
        far (a part whose outcome is unknown before a refusal). A `read` may be answered
        by replicas (shards/replica_reads.py)."""
        pending = items
        done: list[tuple[list[Any], Any]] = []
        follow_rounds = declare_rounds = 0
        # Items sent again (forwards followed, slots moved) go in their first order,
        # whichever shards they came back from, so one profile's writes reach it in the
        # order asked: each item's place in `items`, by the item's identity, made only
        # once an item goes again (a batch sent once pays nothing).
        places = _Places(items)
        for attempt in attempts():
            version = self.map.version
            if attempt:
                pending.sort(key=places.of_pair)
            groups, unowned = self._grouped(pending)

            async def one(shard: ShardState, group: list[tuple[str, Any]]) -> Any:
                request = build(list(map(itemgetter(1), group)))
                stub = shard.control if control else shard.reader if read else shard.stub
                expect = next((judged[k] for k, _ in group if k in judged), None) \
                    if judged else None
                try:
                    return group, await getattr(stub, method)(
                        request, timeout=time_left(context), **expecting(expect))
                except grpc.aio.AioRpcError as exc:
                    undeclared = trailer_of(exc, UNDECLARED_TRAILER)
                    if undeclared is not None:  # declared with the round's other parts'
                        return group, _Undeclared(shard, undeclared)
                    if expect is not None and (wrong_slot(exc)
                                               or trailer_of(exc, REJUDGE_TRAILER)):
                        return group, _REJUDGE
                    if wrong_slot(exc) or not_primary(exc):  # again, on a fresh map
                        return group, None
                    if exc.code() == Code.UNAVAILABLE:
                        raise Down(shard, exc.details() or "unreachable") from None
                    held = trailer_of(exc, "memstore-merge-pending-bin")
                    if held is not None:
                        return group, Pending(held)
                    forwarded = trailer_of(exc, "memstore-merged-into-bin")
                    if forwarded is None or retarget is None:
                        raise
                    moved = dict(forward_pairs(forwarded))
                    aimed = [(moved[pid], places.same(item, retarget(item, moved[pid])))
                             if pid in moved else (pid, item) for pid, item in group]
                    if rejudge is not None and judged and not judged.keys().isdisjoint(moved):
                        # A write judged for the merged-away id (its identifiers' merges,
                        # its shard) is judged again for the survivor, elsewhere.
                        return aimed, _REJUDGE
                    return aimed, _FOLLOWED

            outcomes = await asyncio.gather(*(one(s, g) for s, g in groups.values()),
                                            return_exceptions=True)
            pending = unowned
            # why items are pending this round
            followed, declared, moved_on = False, False, bool(unowned)
            # The first group whose outcome is unknown, else the first refused: a caller
            # told of a refusal sends the rest again, which must not include a part that
            # may have applied.
            refused: GroupRefused | None = None
            undeclared: list[tuple[ShardState, bytes]] = []
            for (_, sent), outcome in zip(groups.values(), outcomes, strict=True):
                if refusals and isinstance(outcome, grpc.aio.AioRpcError | Down):
                    failed = GroupRefused(list(map(itemgetter(1), sent)), outcome, done)
                    if refused is None or (refused.refused and not failed.refused):
                        refused = failed
                    continue
                if isinstance(outcome, BaseException):
                    await abort(context, outcome)  # type: ignore[arg-type]
                group, response = outcome
                if isinstance(response, Pending):
                    try:
                        await self.settle(response, attempt, context)
                    except Exception as exc:  # noqa: BLE001 - abort re-raises the rest
                        await abort(context, exc)
                    pending.extend(group)
                    moved_on = True
                elif response is _FOLLOWED:
                    pending.extend(group)
                    followed = True
                elif isinstance(response, _Undeclared):  # sent again once declared, below
                    undeclared.append((response.shard, response.trailer))
                    pending.extend(group)
                    declared = True
                elif response is _REJUDGE:
                    assert rejudge is not None
                    rejudge.extend(sorted(group, key=places.of_pair))
                elif response is None:
                    pending.extend(group)
                    moved_on = True
                else:
                    done.append((list(map(itemgetter(1), group)), response))
            if refused is not None:
                raise refused
            if undeclared:
                try:
                    await self.schema.declare_where_refused(undeclared, context,
                                                            time_left(context))
                except Exception as exc:  # noqa: BLE001 - abort re-raises the rest
                    await abort(context, exc)
            if not pending:
                return done
            if declared and not (followed or moved_on):
                declare_rounds += 1
                if declare_rounds <= MAX_DECLARES:
                    continue
            if followed:
                follow_rounds += 1
                if follow_rounds > MAX_FORWARDS:
                    await fail(context, Code.FAILED_PRECONDITION, f"more than {MAX_FORWARDS} "
                               "rounds of merged-away ids in one batch (a forward cycle?)")
                if not moved_on:  # only ids aimed at their survivors now: no map change
                    continue
            await self.map.refresh(since=version)
            if attempt:
                await move_pause(attempt, context)
        await fail(context, Code.UNAVAILABLE, f"slots without an owner that accepts them "
                   f"after {MOVE_WAIT:.0f} s (a slot move stuck?)")


class _Places:
    """Where each of routed()'s items stands in the caller's list, by the item's identity:
    the table is made the first time it is asked (a retry round), and a retargeted item
    takes its original's place (every item asked about is kept alive, so no identity is
    reused while routed() runs)."""

    def __init__(self, items: list[tuple[str, Any]]) -> None:
        self._items = items
        self._place: dict[int, int] | None = None
        self._kept: list[Any] = []

    def of(self, item: Any) -> int:
        if self._place is None:
            self._place = {id(it): n for n, (_, it) in enumerate(self._items)}
        return self._place[id(item)]

    def of_pair(self, pair: tuple[str, Any]) -> int:
        return self.of(pair[1])

    def same(self, item: Any, new: Any) -> Any:
        """`new` (retargeted from `item`), at `item`'s place."""
        place = self.of(item)
        assert self._place is not None
        self._place[id(new)] = place
        self._kept.append(new)
        return new
