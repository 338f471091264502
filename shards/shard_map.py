"""The router's cached view of the cluster: which shard owns which slot, at which epoch.

Built by asking every known shard address for GetShardInfo; refreshed on demand (a shard
said "wrong slot", a fan-out saw an epoch change, a slot has no owner). Shards are the
truth: each records its own slots and epoch on disk. Where two shards claim a slot, the
higher epoch wins for routing; `exact` is False then, and fan-out queries wait for the
claims to settle into a partition before answering (see router.py).

A shard that cannot be reached keeps its last known info, marked unreachable; a shard never
reached is known by its address alone and owns nothing in the map.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc
import numpy as np

from memstore.hashslot import owners_by_epoch
from memstore.server.link import LinkStub
from memstore.server.security import Credentials
from memstore.v1 import cluster_pb2 as cpb
from memstore.v1 import cluster_pb2_grpc, memstore_pb2_grpc
from memstore.v1 import memstore_pb2 as pb
from shards.replica_reads import ReplicaStub
from shards.slots import SLOT_COUNT, Range

log = logging.getLogger("memstore.shard_map")

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.enable_retries", 0),
    # A restarted shard is back within a second: reconnect that fast, not after gRPC's
    # default backoff (1 s growing to 120 s), which kept calls failing long after it was up.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
MEMSTORE_SERVICE = pb.DESCRIPTOR.services_by_name["Memstore"]
CONTROL_SERVICE = cpb.DESCRIPTOR.services_by_name["ShardControl"]
INFO_TIMEOUT = 2.0
REMOVED_CLOSE_AFTER = 120.0


@dataclass
class ShardState:
    """One shard as the router last saw it; `stub`/`control` share one channel."""

    address: str
    channel: grpc.aio.Channel
    stub: LinkStub  # a MemstoreStub whose unary calls take the shard link when it has one
    control: LinkStub  # a ShardControlStub whose unary calls take the same link
    reader: ReplicaStub  # `stub` for reads, by a replica where the call asks for one
    name: str = ""
    epoch: int = 0
    slots: list[Range] = field(default_factory=list)
    profiles: int = 0
    reachable: bool = False
    error: str = ""
    held: list[cpb.HeldProfile] = field(default_factory=list)  # unfinished merges' holds
    claims: int = 0  # identifier-directory claims it keeps

    @property
    def label(self) -> str:
        """How errors and missing_shards name this shard."""
        return self.name or self.address


class ShardMap:
    """Addresses -> shard states, and slot -> owning shard. One per router."""

    def __init__(self, addresses: Iterable[str], credentials: Credentials | None = None
                 ) -> None:
        self.credentials = credentials or Credentials()  # what this router presents
        self.shards: list[ShardState] = []
        self._owner: list[int] = [-1] * SLOT_COUNT
        self._owner_array: np.ndarray | None = None  # _owner as numpy, made when asked
        self.exact = False  # every slot claimed by exactly one shard
        self.version = 0  # bumps on every refresh
        self._claims: list[tuple[int, tuple[Range, ...]]] | None = None  # of the last rebuild
        self._lock = asyncio.Lock()  # refresh holds it; `shards` changes only under it
        self._background: set[asyncio.Task[None]] = set()
        for address in addresses:
            self.add(address)

    # ------------------------------------------------------------------ membership
    def add(self, address: str) -> ShardState:
        for shard in self.shards:
            if shard.address == address:
                return shard
        state = _connect(address, self._refresh_soon, self.credentials)
        self.shards.append(state)
        return state

    async def join(self, address: str) -> ShardState:
        """Add a shard at run time: learn its info before queries start asking it."""
        for shard in self.shards:
            if shard.address == address:
                return shard
        state = _connect(address, self._refresh_soon, self.credentials)
        await self._fetch(state)
        if not state.reachable:
            await _close(state)
            raise ValueError(f"shard {address} is not reachable: {state.error}")
        async with self._lock:
            self.shards.append(state)
            self._rebuild()
            self.version += 1
        return state

    async def remove(self, name_or_address: str) -> bool:
        """Forget a shard (drained first: it owns no slot). Under the lock, as join: a
        refresh pairs the answers it awaited with the shards by position, so a list
        shortened meanwhile would give a shard another's name, slots and link, cutting
        off the calls in flight on its own link."""
        async with self._lock:
            shard = self.by_name(name_or_address)
            if shard is None:
                return False
            self.shards.remove(shard)
            self._rebuild()
            self.version += 1
        # Calls already under way may still use the channel; closing it now would leave them
        # hanging, so close it once they are surely over.
        loop = asyncio.get_running_loop()
        loop.call_later(REMOVED_CLOSE_AFTER, lambda: loop.create_task(_close(shard)))
        return True

    async def close(self) -> None:
        for shard in self.shards:
            await _close(shard)

    def _refresh_soon(self) -> None:
        """A shard's link failed: it may have restarted with another, so read the map."""
        task = asyncio.get_running_loop().create_task(self._refresh_quietly(self.version))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh_quietly(self, since: int) -> None:
        try:
            await self.refresh(since=since)
        except Exception as exc:  # noqa: BLE001 - the next call or sweep tries again
            log.warning("could not refresh the shard map: %s", exc)

    # ------------------------------------------------------------------ lookups
    def owner(self, slot: int) -> ShardState | None:
        index = self._owner[slot]
        return self.shards[index] if index >= 0 else None

    def owners_of(self, slots: np.ndarray) -> np.ndarray:
        """The index in `shards` of each slot's owner (-1: nobody owns it now), a batch at
        a time: one numpy gather instead of a call per key."""
        if self._owner_array is None:
            self._owner_array = np.asarray(self._owner, dtype=np.int64)
        return self._owner_array[slots]  # type: ignore[no-any-return]

    def by_name(self, name: str) -> ShardState | None:
        return next((s for s in self.shards if name in (s.name, s.address)), None)

    def ordered(self) -> list[ShardState]:
        """Shards in a stable order (by name, then address) for cursors across shards."""
        return sorted(self.shards, key=lambda s: (s.name or "~", s.address))

    # ------------------------------------------------------------------ refresh
    async def refresh(self, since: int | None = None) -> None:
        """Ask every shard for its info. With `since`: skip when a refresh finished after
        the caller's view (version `since`) was taken, so a burst of wrong-slot answers
        costs one round of GetShardInfo, not one each.

        All answers are applied at once, with no await in between, so a reader never sees
        one shard's new epoch next to the slot table of the old map."""
        async with self._lock:
            if since is not None and self.version != since:
                return
            answers = await asyncio.gather(*(self._ask(s) for s in self.shards))
            for shard, answer in zip(self.shards, answers):
                self._apply(shard, answer)
            claims = [(s.epoch, tuple(s.slots)) for s in self.shards]
            if claims != self._claims:  # the slot table takes ~1.5 ms of Python to rebuild
                self._rebuild()
                self._claims = claims
            self.version += 1

    async def _ask(self, shard: ShardState) -> cpb.ShardInfo | grpc.aio.AioRpcError:
        try:
            return await shard.control.GetShardInfo(  # type: ignore[no-any-return]
                cpb.ShardInfoRequest(), timeout=INFO_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            return exc

    def _apply(self, shard: ShardState, answer: cpb.ShardInfo | grpc.aio.AioRpcError) -> None:
        if isinstance(answer, grpc.aio.AioRpcError):
            if shard.reachable:
                log.warning("shard %s unreachable: %s", shard.label, answer.details())
            shard.reachable, shard.error = False, answer.details() or answer.code().name
            return
        shard.name, shard.epoch = answer.name, answer.epoch
        shard.slots = [(r.start, r.end) for r in answer.slots]
        shard.profiles, shard.reachable, shard.error = answer.profiles, True, ""
        shard.held = list(answer.held)
        shard.claims = answer.claims
        host = shard.address.rpartition(":")[0]  # the link is on the host the router knows
        shard.stub.use_link(f"{host}:{answer.link_port}" if answer.link_port else "",
                            answer.link_token, f"shard {shard.label}")

    async def _fetch(self, shard: ShardState) -> None:
        self._apply(shard, await self._ask(shard))

    def _rebuild(self) -> None:
        self._claims = None  # refresh() records the claims it rebuilt from
        self._owner, self.exact = owners_by_epoch((s.epoch, s.slots) for s in self.shards)
        self._owner_array = None

    def describe(self) -> list[dict[str, object]]:
        return [{"name": s.name, "address": s.address, "epoch": s.epoch,
                 "slots": s.slots, "profiles": s.profiles, "claims": s.claims,
                 "reachable": s.reachable, "link": s.stub.link_state}
                for s in self.ordered()]


async def wait_for(shard_map: ShardMap, timeout: float = 30.0) -> list[str]:
    """Refresh until every shard answered once (start-up) or `timeout` passed; returns the
    addresses still unreachable (the router serves anyway: their calls get UNAVAILABLE)."""
    deadline = time.monotonic() + timeout
    while True:
        await shard_map.refresh()
        down = [s.address for s in shard_map.shards if not s.reachable]
        if not down or time.monotonic() > deadline:
            return down
        await asyncio.sleep(0.2)


def _connect(address: str, link_failed: Callable[[], None], credentials: Credentials
             ) -> ShardState:
    channel = credentials.aio_channel(address, CHANNEL_OPTIONS)
    stub = LinkStub(memstore_pb2_grpc.MemstoreStub(channel), MEMSTORE_SERVICE, link_failed)
    control = LinkStub(cluster_pb2_grpc.ShardControlStub(channel), CONTROL_SERVICE,
                       sharing=stub)
    return ShardState(address, channel, stub, control,
                      ReplicaStub(stub, credentials, CHANNEL_OPTIONS))


async def _close(shard: ShardState) -> None:
    shard.stub.use_link("", "", shard.label)
    await shard.reader.close()
    await shard.channel.close()
