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
from a stale one (old: it may be taken over). Ages live in memory only, for young claims,
to within TICK seconds (never more than the true age): after a restart, every claim counts
as made at the restart, so a write in flight then is still waited out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator

from memstore.hashslot import slot_of

# Seconds a claim stays young: longer than a write takes from its claim to its answer.
CLAIM_GRACE = 30.0
TICK = 0.25  # seconds: the resolution of claim ages


def claim_key(kind: str, value: str) -> str:
    """The directory key of identifier (kind, value); kinds never contain ':'."""
    return f"{kind}:{value}"


class Claims:
    """claim key -> primary id, grouped by the key's slot so a slot move finds its own."""

    def __init__(self, grace: float = CLAIM_GRACE) -> None:
        self.grace = grace
        self.tables: dict[int, dict[str, str]] = {}  # slot -> {claim key: primary id}
        self._count = 0
        # Young claims -> the tick they were made in. A tick's claims share one int object,
        # so an entry costs a dict slot: a bulk load makes a million young claims a minute.
        # Two generations: each grace period the older one is dropped whole (no scan).
        self._made_in: dict[str, int] = {}
        self._made_before: dict[str, int] = {}  # the generation before
        self._tick = 0
        self._pruned = 0  # the tick the generation began at
        self._grace_ticks = math.ceil(grace / TICK)
        self._started = time.monotonic()

    def __len__(self) -> int:
        return self._count

    def get(self, key: str, default: str | None = None) -> str | None:
        table = self.tables.get(slot_of(key))
        return default if table is None else table.get(key, default)

    def swap(self, key: str, pid: str | None) -> str | None:
        """Set (or with None, remove) the claim of `key`; returns the one it replaced."""
        slot = slot_of(key)
        table = self.tables.get(slot)
        before = None if table is None else table.get(key)
        if pid is not None:
            if table is None:
                table = self.tables[slot] = {}
            table[key] = pid
            self._count += before is None
        elif before is not None:
            del table[key]  # type: ignore[union-attr]
            self._count -= 1
        return before

    def in_slots(self, slots: Iterable[int]) -> dict[str, str]:
        """Every claim of `slots` (a slot move carries them)."""
        out: dict[str, str] = {}
        for slot in slots:
            table = self.tables.get(slot)
            if table:
                out.update(table)
        return out

    def by_slot(self) -> Iterator[tuple[int, dict[str, str]]]:
        return ((s, t) for s, t in self.tables.items() if t)

    def load(self, slot: int, table: dict[str, str]) -> None:
        """Fill one slot from a snapshot."""
        self._count += len(table) - len(self.tables.get(slot, ()))
        self.tables[slot] = table

    # ------------------------------------------------------------------ ages
    def made(self, key: str, now: float) -> None:
        """Note that the claim of `key` was made (or taken over) at `now`."""
        tick = int((now - self._started) / TICK)
        if tick != self._tick:
            self._tick = tick
        if tick - self._pruned > self._grace_ticks:  # forget ages past the grace period
            self._made_before, self._made_in = self._made_in, {}
            self._pruned = tick
        self._made_in[key] = self._tick

    def age(self, key: str, now: float) -> float:
        """Seconds since the claim of `key` was made, at least (a claim made before this
        process started counts as made at its start)."""
        tick = self._made_in.get(key)
        if tick is None:
            tick = self._made_before.get(key)
        if tick is None:
            return now - self._started
        return max(0.0, now - self._started - (tick + 1) * TICK)

    def young(self, key: str, now: float) -> bool:
        return self.age(key, now) < self.grace
