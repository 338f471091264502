"""Moving slots between shards while the cluster serves (add-shard, remove-shard).

Protocol, for each batch of slots B moving from shard S to shard T (T does not own B, so
whatever T holds of B is "foreign" there: invisible to its queries and refused to callers):

 1. Copy.      ExportSlots(S, B, after_lsn=0) streamed into ImportProfiles(T). S keeps
               serving reads and writes of B; remember the highest chunk lsn L.
 2. Catch up.  ExportSlots(S, B, after_lsn=L) -> ImportProfiles(T): only the profiles of B
               changed or deleted since L. Repeated until a round carries at most `small`
               profiles (or `rounds` rounds), so the frozen step below is short.
 3. Freeze.    SetSlots(S, e1, owned(S) - B) with e1 > every epoch in the cluster. From here S
               refuses reads and writes of B with wrong-slot (routers refresh and wait: nobody
               owns B for a moment) and its queries no longer count B. Every write S ever
               acknowledged for B was applied to S's memory before SetSlots returned (a shard
               applies before it answers), so S's state of B is now final. S refuses while
               a profile of B is held by a cross-shard merge (shards/merge.py), so no merge
               straddles the move; the mover waits for it (FREEZE_WAIT). Forwards and merge
               decisions of B travel in the exports with the profiles.
 4. Final.     ExportSlots(S, B, after_lsn=L) -> ImportProfiles(T): the last changes.
 5. Verify.    (id, version) fingerprints of B from S and from T must be equal. If not (S
               restarted during the copy and forgot what changed since L, so its export
               was full and carried no deletions), DropSlots(T, B) and copy B again in full:
               S is frozen, so this copy is exact.
 6. Switch.    SetSlots(T, e2 = e1 + 1, owned(T) + B). T now answers for B.
 7. Drop.      DropSlots(S, B, e2): S forgets the profiles of B.

Why nothing is lost or counted twice: at every instant at most one shard owns each slot (S
stops owning B at step 3, T starts at step 6, strictly later), and T's copy at step 6 equals
S's frozen state, which contains every acknowledged write. A router's fan-out only answers
over a map whose claims partition all slots and re-checks every shard's epoch after it
answered (router.py), so a query that raced a switch is retried, never double- or under-
counted; during steps 3-6 queries and writes of B wait (milliseconds to a second per batch,
bounded by the batch size).

Crashes: ownership and imported profiles are in each shard's log, so a restarted S or T
comes back in the state the protocol left it. Before step 3 the move is only an invisible
copy; `journal` (a small JSON file written before step 3 and removed after step 7) records a
move in flight, and the next add-shard/remove-shard/resume finishes it from step 4 (full
copy, since S stays frozen). Routers hold no state: a restarted router rebuilds its map.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import grpc
import msgpack

from memstore.server.security import Credentials
from memstore.v1 import cluster_pb2 as cpb
from memstore.v1 import cluster_pb2_grpc, memstore_pb2_grpc
from memstore.v1 import memstore_pb2 as pb
from shards.shard_map import CHANNEL_OPTIONS
from shards.slots import Move, from_ranges, plan_add, plan_remove, to_ranges

log = logging.getLogger("memstore.rebalance")

BATCH_SLOTS = 256
CATCH_UP_SMALL = 100
CATCH_UP_ROUNDS = 5
FREEZE_WAIT = 30.0  # seconds to wait for cross-shard merges holding a slot that moves


@dataclass
class Node:
    """One shard as the rebalancer sees it."""

    address: str
    channel: grpc.aio.Channel
    stub: cluster_pb2_grpc.ShardControlStub
    info: cpb.ShardInfo = field(default_factory=cpb.ShardInfo)

    @property
    def name(self) -> str:
        return self.info.name or self.address

    @property
    def slots(self) -> set[int]:
        return from_ranges((r.start, r.end) for r in self.info.slots)

    async def refresh(self) -> cpb.ShardInfo:
        self.info = await self.stub.GetShardInfo(cpb.ShardInfoRequest(), timeout=10.0)
        return self.info


class Cluster:
    """Control-plane connections to a set of shards."""

    def __init__(self, addresses: Iterable[str], credentials: Credentials | None = None
                 ) -> None:
        self.nodes: list[Node] = []
        credentials = credentials or Credentials()
        for address in dict.fromkeys(addresses):
            channel = credentials.aio_channel(address, CHANNEL_OPTIONS)
            self.nodes.append(Node(address, channel, cluster_pb2_grpc.ShardControlStub(channel)))

    async def __aenter__(self) -> Self:
        await self.refresh()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for node in self.nodes:
            await node.channel.close()

    async def refresh(self) -> None:
        await asyncio.gather(*(n.refresh() for n in self.nodes))

    def node(self, name_or_address: str) -> Node:
        for node in self.nodes:
            if name_or_address in (node.info.name, node.address):
                return node
        raise KeyError(f"no shard named {name_or_address!r} in the cluster")

    def next_epoch(self) -> int:
        return max((n.info.epoch for n in self.nodes), default=0) + 1

    def owned(self) -> dict[str, set[int]]:
        return {n.name: n.slots for n in self.nodes}


def _ranges_pb(slots: Iterable[int]) -> list[cpb.SlotRange]:
    return [cpb.SlotRange(start=s, end=e) for s, e in to_ranges(slots)]


def _profiles(packed: bytes) -> list[Any]:
    """The profile entries of an export chunk ({"schema", "profiles"} or a bare array)."""
    chunk = msgpack.unpackb(packed, raw=False, strict_map_key=False)
    return list(chunk["profiles"] if isinstance(chunk, dict) else chunk)


def _entries(packed: bytes) -> tuple[int, bool]:
    """How many profiles an export chunk changes (copies plus deletions), and whether it
    carries the slots' notes (forwards, merge decisions, directory claims)."""
    chunk = msgpack.unpackb(packed, raw=False, strict_map_key=False)
    return len(chunk["profiles"]) + len(chunk.get("deleted", ())), "notes" in chunk


async def _copy(source: Node, target: Node, slots: set[int], after_lsn: int = 0
                ) -> tuple[int, int]:
    """Stream an export of `slots` from source into target. Returns (profiles, last lsn)."""
    request = cpb.ExportRequest(slots=_ranges_pb(slots), after_lsn=after_lsn)
    count, lsn = 0, after_lsn
    async for chunk in source.stub.ExportSlots(request):
        entries, notes = _entries(chunk.packed)
        if entries or notes:  # notes change without profiles: a claim lives in any slot
            await target.stub.ImportProfiles(cpb.ImportRequest(packed=chunk.packed))
            count += entries
        lsn = max(lsn, chunk.lsn)
    return count, lsn


async def _contents(node: Node, slots: set[int]) -> set[tuple[str, Any]]:
    request = cpb.ExportRequest(slots=_ranges_pb(slots), fingerprints=True)
    out: set[tuple[str, Any]] = set()
    async for chunk in node.stub.ExportSlots(request):
        out.update((str(pid), version) for pid, version in _profiles(chunk.packed))
    return out


class Journal:
    """The move in flight between freeze and drop, so a crashed rebalancer can finish it."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, source: Node, target: Node, slots: set[int], epoch: int) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump({"source": source.address, "target": target.address,
                       "slots": to_ranges(slots), "epoch": epoch}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def read(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.exists():
            return None
        return json.loads(self.path.read_text())  # type: ignore[no-any-return]

    def clear(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()


@dataclass
class MoveReport:
    slots: int = 0
    copied: int = 0
    caught_up: int = 0
    repaired_batches: int = 0
    frozen_seconds: float = 0.0


async def move_batch(cluster: Cluster, source: Node, target: Node, slots: set[int],
                     journal: Journal, report: MoveReport) -> None:
    """Steps 1-7 of the module docstring for one batch."""
    copied, lsn = await _copy(source, target, slots)
    report.copied += copied
    previous = copied
    for _ in range(CATCH_UP_ROUNDS):
        delta, lsn = await _copy(source, target, slots, lsn)
        report.caught_up += delta
        # Stop when small, or when not shrinking (writes arrive as fast as we copy them).
        if delta <= CATCH_UP_SMALL or delta >= previous:
            break
        previous = delta
    await cluster.refresh()
    epoch = cluster.next_epoch()
    journal.write(source, target, slots, epoch)
    started = asyncio.get_running_loop().time()
    await _freeze(source, slots, epoch)
    await _switch(source, target, slots, epoch, lsn, report)
    report.frozen_seconds += asyncio.get_running_loop().time() - started
    await _drop(source, slots, epoch)
    journal.clear()
    report.slots += len(slots)


async def _freeze(source: Node, slots: set[int], epoch: int) -> None:
    """Step 3. A shard refuses to give up a slot while a profile in it is held by a
    cross-shard merge (shards/merge.py); such a hold lasts milliseconds, or until a router's
    sweeper ends an abandoned one, so wait for it up to FREEZE_WAIT seconds."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + FREEZE_WAIT
    while True:
        try:
            source.info = await source.stub.SetSlots(cpb.SetSlotsRequest(
                epoch=epoch, slots=_ranges_pb(source.slots - slots)))
            return
        except grpc.aio.AioRpcError as exc:
            held = any(k == "memstore-merge-pending-bin" for k, _ in exc.trailing_metadata() or ())
            if not held or loop.time() > give_up:
                raise
            await asyncio.sleep(0.1)


async def _finish(source: Node, target: Node, slots: set[int], epoch: int, lsn: int,
                  report: MoveReport) -> None:
    """Steps 4-7: the source is frozen for `slots`; make target's copy exact, switch, drop."""
    await _switch(source, target, slots, epoch, lsn, report)
    await _drop(source, slots, epoch)


async def _switch(source: Node, target: Node, slots: set[int], epoch: int, lsn: int,
                  report: MoveReport) -> None:
    """Steps 4-6: make the target's copy of the frozen `slots` exact and give it them."""
    delta, _ = await _copy(source, target, slots, lsn)
    report.caught_up += delta
    want, have = await asyncio.gather(_contents(source, slots), _contents(target, slots))
    if want != have:
        log.warning("copy of %d slots %s -> %s differs after catch-up (%d vs %d profiles); "
                    "copying again in full", len(slots), source.name, target.name, len(want),
                    len(have))
        report.repaired_batches += 1
        await target.stub.DropSlots(cpb.DropSlotsRequest(slots=_ranges_pb(slots), epoch=epoch))
        await _copy(source, target, slots)
    await target.refresh()
    target.info = await target.stub.SetSlots(cpb.SetSlotsRequest(
        epoch=epoch + 1, slots=_ranges_pb(target.slots | slots)))


async def _drop(source: Node, slots: set[int], epoch: int) -> None:
    """Step 7: the source forgets the moved profiles (the target owns them since epoch+1)."""
    await source.stub.DropSlots(cpb.DropSlotsRequest(slots=_ranges_pb(slots), epoch=epoch + 1))


async def resume(cluster: Cluster, journal: Journal) -> bool:
    """Finish a move a crashed rebalancer left between freeze and drop. True if it did."""
    state = journal.read()
    if state is None:
        return False
    source, target = cluster.node(state["source"]), cluster.node(state["target"])
    slots = from_ranges(tuple(r) for r in state["slots"])
    await cluster.refresh()
    if slots <= target.slots:  # switched already; only the drop may be missing
        await source.stub.DropSlots(cpb.DropSlotsRequest(slots=_ranges_pb(slots),
                                                         epoch=target.info.epoch))
    else:
        if source.slots & slots:  # crashed before the freeze took effect: freeze now
            await _freeze(source, slots, cluster.next_epoch())
        epoch = cluster.next_epoch()
        report = MoveReport()
        # The target's partial copy may be stale: start it over from the frozen source.
        await target.stub.DropSlots(cpb.DropSlotsRequest(slots=_ranges_pb(slots), epoch=epoch))
        _, lsn = await _copy(source, target, slots)
        await _finish(source, target, slots, epoch, lsn, report)
    journal.clear()
    log.info("finished the interrupted move of %d slots %s -> %s", len(slots), source.name,
             target.name)
    return True


async def copy_schema(sources: Iterable[Node], target: Node) -> int:
    """Declare on `target` every attribute the `sources` declare (the first source's
    declaration of a name), before it owns a slot of theirs: one schema for the cluster
    (shards/schema.py). Returns how many attributes it declared."""
    specs: dict[str, pb.AttributeSpec] = {}
    for node in sources:
        schema = await memstore_pb2_grpc.MemstoreStub(node.channel).GetSchema(
            pb.GetSchemaRequest(), timeout=10.0)
        for spec in schema.attributes:
            specs.setdefault(spec.name, spec)
    if specs:
        await memstore_pb2_grpc.MemstoreStub(target.channel).DeclareAttributes(
            pb.DeclareAttributesRequest(attributes=list(specs.values())), timeout=30.0)
    return len(specs)


async def copy_segments(sources: Iterable[Node], target: Node) -> int:
    """Define on `target` every saved segment the first reachable source has (same name,
    query and creation time), before it owns a slot: its members are then kept as the
    moved profiles arrive. Returns how many."""
    for node in sources:
        listing = await memstore_pb2_grpc.MemstoreStub(node.channel).ListSegments(
            pb.ListSegmentsRequest(), timeout=10.0)
        stub = memstore_pb2_grpc.MemstoreStub(target.channel)
        for info in listing.segments:
            await stub.CreateSegment(pb.CreateSegmentRequest(  # (checked when created)
                name=info.name, query=pb.QueryRequest(text=info.query,
                                                      unknown_attribute_is_empty=True),
                created_at=info.created_at), timeout=30.0)
        return len(listing.segments)
    return 0


async def run_moves(cluster: Cluster, moves: list[Move], journal: Journal,
                    batch_slots: int = BATCH_SLOTS,
                    progress: Callable[[int], None] | None = None) -> MoveReport:
    report = MoveReport()
    for move in moves:
        source, target = cluster.node(move.source), cluster.node(move.target)
        await copy_schema([source], target)
        await copy_segments([source], target)
        slots = sorted(from_ranges(move.slots))
        for i in range(0, len(slots), batch_slots):
            batch = set(slots[i:i + batch_slots])
            await move_batch(cluster, source, target, batch, journal, report)
            if progress is not None:
                progress(len(batch))
    return report


async def prepare_new_shard(cluster: Cluster, node: Node, force: bool = False) -> None:
    """A shard joining owns nothing: a fresh serve-shard without --slots claims every slot at
    epoch 0, so take them away at a new epoch before any router sees it."""
    await node.refresh()
    others = [n for n in cluster.nodes if n is not node]
    if node.info.profiles and not force:
        raise ValueError(f"{node.address} already holds {node.info.profiles} profiles; "
                         "add an empty shard")
    if node.slots & set().union(*(n.slots for n in others)) or (node.slots and not others):
        node.info = await node.stub.SetSlots(cpb.SetSlotsRequest(
            epoch=cluster.next_epoch(), slots=[]))
    await copy_schema(others, node)  # the cluster's schema before it owns a slot
    await copy_segments(others, node)  # and its saved segments


def plan_for_add(cluster: Cluster, new: Node) -> list[Move]:
    """The moves that give `new` its fair share, counting what it owns already (after
    prepare_new_shard: nothing, or its share from an earlier run of the same add)."""
    owned = {n.name: n.slots for n in cluster.nodes}
    return plan_add(owned, new.name)


def plan_for_remove(cluster: Cluster, leaving: Node) -> list[Move]:
    return plan_remove(cluster.owned(), leaving.name)
