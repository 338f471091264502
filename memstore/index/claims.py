"""A shard's part of the cluster's identifier directory: claims.

The directory maps an identifier (kind, value) to the primary id that claimed it. It is
partitioned like the profiles: the claim of an identifier lives in slot_of(claim_key(kind,
value)), on whichever shard owns that slot, and moves with that slot (shards/rebalance.py).
The router claims an identifier before a write gives it to a profile, so every identifier a
profile holds has a claim; a claim may be stale (its write failed, or its profile was
deleted or merged away), and routers verify a claim against the profile before trusting it
(shards/directory.py has the protocol). Claims change by Notes ("claims" table), so they are
logged, snapshotted and undone with the rest of a Change.

A claim's age tells a write in flight (young: its profile may not hold the identifier yet)
from a stale one (old: it may be taken over). A claim keeps the tick (TICK seconds since
the process started) it was last set at, in memory only: after a restart every claim
counts as set at the restart, so a write in flight then is still waited out, and a claim
a slot move brings counts as set when it arrived.

Storage. A claim is an identifier (~25 bytes) and a primary id (~10 bytes): a dict of str
to str spends ~180 bytes on that, and a shard of a 10M-profile cluster holds millions.
Each slot keeps its claims packed instead: the utf-8 key and pid back to back in one
bytearray `arena`, and three arrays sorted by hash(key): `hashes`, `spans` (where each
claim's key and pid lie in the arena) and `ticks`, about 60 bytes a claim. A look-up
binary-searches `hashes` and compares the key bytes (equal hashes only cost a step); a new
claim is inserted in place (a memmove of a few KB: a slot holds hundreds of claims at tens
of millions of profiles); a replaced or removed one leaves dead arena bytes, rewritten once
they are half of it. hash() is the process's own str hash: the packed form lives in
memory only, and snapshots and slot moves carry plain {key: pid} tables.
"""

from __future__ import annotations

import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from memstore.hashslot import slot_of

# Seconds a claim stays young: longer than a write takes from its claim to its answer.
CLAIM_GRACE = 30.0
TICK = 0.25  # seconds: the resolution of claim ages
_COMPACT_BYTES = 4096  # an arena is rewritten when more than half of it, and this, is dead


def claim_key(kind: str, value: str) -> str:
    """The directory key of identifier (kind, value); kinds never contain ':'."""
    return f"{kind}:{value}"


class _Slot:
    """One slot's claims, packed. The arrays are array.array: bisect and indexing give
    Python ints, twice as fast as numpy's scalars."""

    __slots__ = ("arena", "dead", "hashes", "spans", "ticks")

    def __init__(self) -> None:
        self.hashes = array("q")  # hash(key) of each claim, sorted
        self.spans = array("Q")  # per claim: offset << 32 | key bytes << 16 | pid bytes
        self.ticks = array("I")  # per claim: the tick it was set at
        self.arena = bytearray()  # utf-8 key, then pid, of each claim (and of replaced ones)
        self.dead = 0  # arena bytes no claim uses

    @classmethod
    def packed(cls, table: dict[str, str], hasher: Callable[[str], int], tick: int) -> _Slot:
        """A slot holding `table`, every claim set at `tick`."""
        out = cls()
        for h, key, pid in sorted(zip(map(hasher, table), table, table.values())):
            out.insert(len(out.hashes), key, h, pid, tick)
        return out

    def locate(self, key: str, h: int) -> int:
        """The index of key's claim (h is hash(key)), or ~i: none, it would go at i."""
        hashes = self.hashes
        i = first = bisect_left(hashes, h)
        if i < len(hashes) and hashes[i] == h:
            encoded = key.encode()
            while i < len(hashes) and hashes[i] == h:  # more than one: equal hashes
                span = self.spans[i]
                start = span >> 32
                if self.arena[start:start + (span >> 16 & 0xFFFF)] == encoded:
                    return i
                i += 1
        return ~first

    def pid(self, i: int) -> str:
        span = self.spans[i]
        start = (span >> 32) + (span >> 16 & 0xFFFF)
        return self.arena[start:start + (span & 0xFFFF)].decode()

    def claim(self, i: int) -> tuple[str, str]:
        span = self.spans[i]
        start, key_size, pid_size = span >> 32, span >> 16 & 0xFFFF, span & 0xFFFF
        arena = self.arena
        return (arena[start:start + key_size].decode(),
                arena[start + key_size:start + key_size + pid_size].decode())

    def table(self) -> dict[str, str]:
        """Every claim of the slot, as {key: pid}."""
        return dict(map(self.claim, range(len(self.hashes))))

    def insert(self, i: int, key: str, h: int, pid: str, tick: int) -> None:
        """Add a claim at index i (where locate said it goes)."""
        span = self._append(key, pid)
        self.hashes.insert(i, h)
        self.spans.insert(i, span)
        self.ticks.insert(i, tick)

    def replace(self, i: int, key: str, pid: str, tick: int) -> None:
        self.dead += _size(self.spans[i])
        self.spans[i] = self._append(key, pid)
        self.ticks[i] = tick
        self._compact_if_dead()

    def remove(self, i: int) -> None:
        self.dead += _size(self.spans[i])
        del self.hashes[i], self.spans[i], self.ticks[i]
        self._compact_if_dead()

    def _append(self, key: str, pid: str) -> int:
        """Write a claim's bytes at the arena's end; returns its span."""
        key_bytes, pid_bytes = key.encode(), pid.encode()
        # 16 bits each: keys are at most ~580 bytes, pids 256 (engine.MAX_IDENTIFIER_BYTES,
        # MAX_ID_BYTES); 32 bits of offset: 4 GiB of arena a slot.
        assert len(key_bytes) <= 0xFFFF and len(pid_bytes) <= 0xFFFF
        span = len(self.arena) << 32 | len(key_bytes) << 16 | len(pid_bytes)
        self.arena += key_bytes
        self.arena += pid_bytes
        return span

    def _compact_if_dead(self) -> None:
        """Rewrite the arena without dead bytes once they are half of it (same order)."""
        if self.dead <= max(len(self.arena) // 2, _COMPACT_BYTES):
            return
        arena, compacted, offset = self.arena, bytearray(), 0
        for i, span in enumerate(self.spans):
            start, size = span >> 32, _size(span)
            compacted += arena[start:start + size]
            self.spans[i] = offset << 32 | (span & 0xFFFFFFFF)
            offset += size
        self.arena, self.dead = compacted, 0


def _size(span: int) -> int:
    """The arena bytes of a claim: its key's and its pid's."""
    return (span >> 16 & 0xFFFF) + (span & 0xFFFF)


class Claims:
    """claim key -> primary id, grouped by the key's slot so a slot move finds its own."""

    def __init__(self, grace: float = CLAIM_GRACE, hasher: Callable[[str], int] = hash,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.grace = grace
        self._hash = hasher  # tests pass a poor one to make keys collide
        self._clock = clock
        self._slots: dict[int, _Slot] = {}
        self._count = 0
        self._started = clock()

    def __len__(self) -> int:
        return self._count

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.get_in(slot_of(key), key, default)

    def get_in(self, slot: int, key: str, default: str | None = None) -> str | None:
        """get() when the caller knows slot_of(key) already."""
        table, i = self._find(slot, key)
        return default if table is None or i < 0 else table.pid(i)

    def _find(self, slot: int, key: str) -> tuple[_Slot | None, int]:
        """The slot's table (None: no claims there) and key's index in it (< 0: none)."""
        table = self._slots.get(slot)
        return table, -1 if table is None else table.locate(key, self._hash(key))

    def swap(self, key: str, pid: str | None) -> str | None:
        """Set (or with None, remove) the claim of `key`; returns the one it replaced. A
        claim set to another pid counts as made now (see age)."""
        slot = slot_of(key)
        table = self._slots.get(slot)
        if table is None:
            if pid is None:
                return None
            table = self._slots[slot] = _Slot()
        h = self._hash(key)
        i = table.locate(key, h)
        before = None if i < 0 else table.pid(i)
        if before == pid:
            return before
        if pid is None:
            table.remove(i)
            self._count -= 1
            if not table.hashes:
                del self._slots[slot]
            return before
        tick = int((self._clock() - self._started) / TICK)
        if i < 0:
            table.insert(~i, key, h, pid, tick)
            self._count += 1
        else:
            table.replace(i, key, pid, tick)
        return before

    def touch(self, keys: Iterable[str]) -> None:
        """Count the claims of `keys` as made now (a slot move's import: each import
        carries all of a slot's claims, and one may have been made again since the last)."""
        tick = int((self._clock() - self._started) / TICK)
        for key in keys:
            table, i = self._find(slot_of(key), key)
            if table is not None and i >= 0:
                table.ticks[i] = tick

    def in_slots(self, slots: Iterable[int]) -> dict[str, str]:
        """Every claim of `slots` (a slot move carries them)."""
        out: dict[str, str] = {}
        for slot in slots:
            table = self._slots.get(slot)
            if table is not None:
                out.update(table.table())
        return out

    def by_slot(self) -> Iterator[tuple[int, dict[str, str]]]:
        return ((s, t.table()) for s, t in list(self._slots.items()))

    def load(self, slot: int, table: dict[str, str]) -> None:
        """Fill one slot from a snapshot (its claims count as made at the start)."""
        old = self._slots.pop(slot, None)
        self._count -= 0 if old is None else len(old.hashes)
        if table:
            self._slots[slot] = _Slot.packed(table, self._hash, 0)
            self._count += len(table)

    def age(self, key: str, now: float) -> float:
        """Seconds since the claim of `key` was set, at least (a claim set before this
        process started counts as set at its start; no claim: the same)."""
        table, i = self._find(slot_of(key), key)
        if table is None or i < 0:
            return now - self._started
        tick = table.ticks[i]
        return max(0.0, now - self._started - (tick + 1) * TICK)

    def young(self, key: str, now: float) -> bool:
        return self.age(key, now) < self.grace
