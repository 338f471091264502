"""Hash slots: which slot a primary id hashes to, slot ranges, and fair-share plans.

A profile lives in slot `slot_of(primary id)`, one of SLOT_COUNT; every slot is owned by
exactly one shard. The hash is CRC16/XMODEM of the UTF-8 bytes mod 16384, Redis Cluster's
choice, defined once in `memstore.hashslot` (shards and routers must agree on it, and it is
part of what shards record on disk, so it never changes).

Plans move the fewest slots: a shard keeps every slot it may keep, and only the surplus
over its fair share (SLOT_COUNT / shards, rounded so shards that already hold more keep the
extra one) moves, from the end of its ranges so ranges stay contiguous.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from memstore.hashslot import SLOT_COUNT, slot_of

__all__ = [
    "SLOT_COUNT",
    "Move",
    "format_ranges",
    "from_ranges",
    "parse_ranges",
    "plan_add",
    "plan_fair_share",
    "plan_remove",
    "slot_of",
    "split_even",
    "to_ranges",
]

Range = tuple[int, int]  # inclusive start and end, like cluster.proto's SlotRange


def to_ranges(slots: Iterable[int]) -> list[Range]:
    """Compress slots to sorted, disjoint, inclusive ranges: {0,1,2,5} -> [(0, 2), (5, 5)]."""
    ranges: list[Range] = []
    for slot in sorted(set(slots)):
        if not 0 <= slot < SLOT_COUNT:
            raise ValueError(f"slot {slot} outside 0-{SLOT_COUNT - 1}")
        if ranges and ranges[-1][1] == slot - 1:
            ranges[-1] = (ranges[-1][0], slot)
        else:
            ranges.append((slot, slot))
    return ranges


def from_ranges(ranges: Iterable[Range]) -> set[int]:
    """Expand inclusive ranges back to the set of slots."""
    slots: set[int] = set()
    for start, end in ranges:
        if not 0 <= start <= end < SLOT_COUNT:
            raise ValueError(f"slot range {start}-{end} outside 0-{SLOT_COUNT - 1}")
        slots.update(range(start, end + 1))
    return slots


def format_ranges(ranges: Iterable[Range]) -> str:
    """The text form serve-shard's --slots takes: "0-99,200,300-301" ("" for none)."""
    return ",".join(f"{s}-{e}" if s != e else str(s) for s, e in ranges)


def parse_ranges(text: str) -> list[Range]:
    """Inverse of format_ranges; raises ValueError on malformed or out-of-range input."""
    slots: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        start, _, end = part.partition("-")
        slots |= from_ranges([(int(start), int(end or start))])
    return to_ranges(slots)


def split_even(n: int) -> list[list[Range]]:
    """Slots for n shards on a new cluster: contiguous blocks, sizes differing by at most 1."""
    if n < 1:
        raise ValueError("need at least one shard")
    if n > SLOT_COUNT:
        raise ValueError(f"at most {SLOT_COUNT} shards")
    base, extra = divmod(SLOT_COUNT, n)
    out, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        out.append([(start, start + size - 1)])
        start += size
    return out


@dataclass(frozen=True)
class Move:
    """Move `slots` (inclusive ranges) from shard `source` to shard `target`."""

    source: str
    target: str
    slots: tuple[Range, ...]

    @property
    def count(self) -> int:
        return sum(e - s + 1 for s, e in self.slots)


def plan_fair_share(owned: Mapping[str, Iterable[int]], shards: Iterable[str]) -> list[Move]:
    """Moves that leave each of `shards` with a fair share, moving the fewest slots.

    `owned` maps current shard names to their slots (every slot owned exactly once);
    `shards` is the wanted membership. Shards in `owned` but not in `shards` give all their
    slots away; shards in `shards` but not in `owned` start empty.
    """
    members = list(dict.fromkeys(shards))
    if not members:
        raise ValueError("need at least one shard to keep the slots")
    current = {name: sorted(set(slots)) for name, slots in owned.items()}
    for name in members:
        current.setdefault(name, [])
    total = sum(len(s) for s in current.values())
    base, extra = divmod(total, len(members))
    # The `extra` shards allowed one more slot are those holding the most now: fewer moves.
    by_size = sorted(members, key=lambda m: (-len(current[m]), m))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(by_size)}
    for name in current:
        quota.setdefault(name, 0)  # leaving shards keep nothing
    surplus: list[tuple[str, list[int]]] = []
    for name in sorted(current):
        over = len(current[name]) - quota[name]
        if over > 0:
            surplus.append((name, current[name][len(current[name]) - over:]))
    deficit = [(m, quota[m] - len(current[m])) for m in members if quota[m] > len(current[m])]
    moves: list[Move] = []
    for target, need in deficit:
        while need > 0:
            source, slots = surplus[0]
            give, rest = slots[:need], slots[need:]
            moves.append(Move(source, target, tuple(to_ranges(give))))
            need -= len(give)
            if rest:
                surplus[0] = (source, rest)
            else:
                surplus.pop(0)
    return moves


def plan_add(owned: Mapping[str, Iterable[int]], new_shard: str) -> list[Move]:
    """Moves that give a new shard its fair share, taken from the fullest shards."""
    return plan_fair_share(owned, [*owned, new_shard])


def plan_remove(owned: Mapping[str, Iterable[int]], leaving: str) -> list[Move]:
    """Moves that drain `leaving`, spreading its slots so the rest stay fair."""
    if leaving not in owned:
        raise ValueError(f"no shard named {leaving!r}")
    return plan_fair_share(owned, [name for name in owned if name != leaving])
