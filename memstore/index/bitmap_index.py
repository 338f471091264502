"""Roaring-bitmap indexes over shard-local dense ids (uint32).

`ValueIndex` maps each value of one attribute (a string, a bool, or one element of a
string list) to the profiles holding it: a bitmap, or the one id where only one does.
Invariant: no empty entry is kept, so `len()` is the number of distinct live values and
erased values leave no trace (a snapshot of the index never contains a value nobody holds).

`RangeIndex` is a bit-sliced index (BSI, O'Neil & Quass) for int64 values: slice i holds
the ids whose `value - base` has bit i set, plus an `exists` bitmap. A comparison runs
from the most significant slice down in at most two bitmap operations per slice, so its
cost is bounded by the bit width of the stored range and never touches profiles one by
one; it stops early when no candidate is left equal so far. `base` is the smallest value
ever stored; a smaller value shifts every stored value up with a ripple-carry addition over
the slices (O(bit width) bitmap operations). Floats go through `float_to_ordered`, an
order-preserving map to int64.

Bitmaps returned by `get()`/`exists()` are the index's own: callers must not mutate them.
Every query method returns a fresh bitmap.
"""

from __future__ import annotations

import struct
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np
from pyroaring import BitMap

from memstore.index.dense import (
    BLOCK,
    bitmap_of,
    bitmaps_of_packed,
    bitmaps_of_rows,
    id_array,
    ids_of,
)

_EMPTY = BitMap()
_MAG = 0x7FFF_FFFF_FFFF_FFFF
_SIGN = 1 << 63


def float_to_ordered(x: float) -> int:
    """Order-preserving bijection float64 -> int64 (-0.0 maps like 0.0; no NaN)."""
    if x == 0.0:
        x = 0.0
    (bits,) = struct.unpack("<q", struct.pack("<d", x))
    return bits if bits >= 0 else -(bits & _MAG)


def ordered_to_float(key: int) -> float:
    bits = key if key >= 0 else (-key) | _SIGN
    (x,) = struct.unpack("<d", struct.pack("<Q", bits & 0xFFFF_FFFF_FFFF_FFFF))
    return float(x)


def floats_to_ordered(values: np.ndarray) -> np.ndarray:
    """Vectorised float_to_ordered."""
    v = np.where(values == 0.0, 0.0, values).astype(np.float64)
    bits = v.view(np.int64)
    return np.where(bits >= 0, bits, -(bits & np.int64(_MAG)))


_BIT_OF_BYTE = (1 << np.arange(8, dtype=np.uint8))[:, None]


def _bit_rows(values: np.ndarray, width: int) -> np.ndarray:
    """Bit i of every uint64 value as row i of a (width, n) bool array. The values' bytes
    are transposed first (byte j of every value as a row: a narrow copy, where moving
    the bits themselves across would be 8 times wider), then each byte row gives its 8
    bit rows in one pass."""
    n, used = len(values), -(-width // 8)
    byte_rows = np.ascontiguousarray(
        values.astype("<u8", copy=False).view(np.uint8).reshape(n, 8)[:, :used].T)
    return ((byte_rows[:, None, :] & _BIT_OF_BYTE) != 0).reshape(used * 8, n)[:width]


def _bit_planes(values: np.ndarray, width: int) -> np.ndarray:
    """_bit_rows packed (numpy's packbits, little bit order): row i of a (width, n // 8)
    uint8 array holds bit i of values 8k .. 8k + 7 in byte k, value 8k + j's as bit j; n a
    multiple of 8. The values' bytes are transposed as in _bit_rows; then each uint64
    word of a byte row (byte j of eight values) is an 8x8 bit matrix, transposed in three
    steps of shifts and masks (Warren, Hacker's Delight 7-3), so that its byte b holds
    bit b of the eight: an eighth of the memory _bit_rows' bools take, and no packing."""
    n, used = len(values), -(-width // 8)
    if n % 8:
        raise ValueError(f"{n} values: bit planes take a multiple of 8")
    words = np.ascontiguousarray(
        values.astype("<u8", copy=False).view(np.uint8).reshape(n, 8)[:, :used].T
    ).view("<u8")  # (used, n // 8)
    for shift, mask in _TRANSPOSE_STEPS:
        t = ((words >> shift) ^ words) & mask
        words ^= t ^ (t << shift)
    planes = words.view(np.uint8).reshape(used, n // 8, 8).transpose(0, 2, 1)
    return planes.reshape(used * 8, n // 8)[:width]


_TRANSPOSE_STEPS = tuple((np.uint64(shift), np.uint64(mask)) for shift, mask in (
    (7, 0x00AA00AA00AA00AA), (14, 0x0000CCCC0000CCCC), (28, 0x00000000F0F0F0F0)))


class ValueIndex:
    """value -> the dense ids holding it.

    A value held by one id keeps that id as an int (`_one`), not a bitmap: an attribute
    whose values are unique to a profile (an email, an external id) would otherwise cost
    a roaring bitmap per profile, ~220 bytes against ~30, and a deserialization each at
    start-up. Invariant: a value is in `_one` (one id) or in `_maps` (a bitmap of two or
    more), never both, so the form a value takes depends only on how many hold it, not
    on the order of the changes that got it there (a snapshot loads back to the same
    state).
    """

    __slots__ = ("_maps", "_one")
    GROUPED_FROM = 16  # add_coded updates a value's ids at once from this many a value

    def __init__(self) -> None:
        self._maps: dict[Hashable, BitMap] = {}
        self._one: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self._maps) + len(self._one)

    def add(self, value: Hashable, dense_id: int) -> None:
        bm = self._maps.get(value)
        if bm is not None:
            bm.add(dense_id)
            return
        one = self._one.get(value)
        if one is None:
            self._one[value] = dense_id
        elif one != dense_id:
            del self._one[value]
            self._maps[value] = BitMap((one, dense_id))

    def discard(self, value: Hashable, dense_id: int) -> None:
        bm = self._maps.get(value)
        if bm is not None:
            bm.discard(dense_id)
            self._settle(value, bm)
        elif self._one.get(value) == dense_id:
            del self._one[value]

    def _settle(self, value: Hashable, bm: BitMap) -> None:
        """Keep the invariant for `value`, held in `_maps` as `bm` (possibly changed)."""
        if len(bm) < 2:
            del self._maps[value]
            if bm:
                self._one[value] = bm.min()

    def _all_new_once(self, values: Sequence[Hashable], distinct: set[Hashable]) -> bool:
        """True when every one of `values` (`distinct`: as a set) is there once and held by
        nobody yet (checked in C: a load of a unique attribute costs a dict entry a value)."""
        return (len(distinct) == len(values) and self._maps.keys().isdisjoint(distinct)
                and self._one.keys().isdisjoint(distinct))

    def _bitmaps_for(self, values: Iterable[Hashable]) -> list[Hashable]:
        """Give every one of `values` a bitmap in `_maps` (the bulk paths add to them);
        returns those that had none, which `_settle_all` checks afterwards."""
        maps, one = self._maps, self._one
        fresh = list((values if isinstance(values, set) else set(values)).difference(maps))
        for value in fresh:
            held = one.pop(value, None)
            maps[value] = BitMap() if held is None else BitMap((held,))
        return fresh

    def _settle_all(self, values: Iterable[Hashable]) -> None:
        maps = self._maps
        for value in values:
            self._settle(value, maps[value])

    def add_column(self, ids: Sequence[int] | np.ndarray, values: Sequence[Hashable]) -> None:
        """Add ids[i] to value values[i] for every i (the bulk-load path)."""
        maps = self._maps
        distinct = set(values)
        if self._all_new_once(values, distinct):  # a unique attribute's column: no bitmaps
            self._one.update(zip(values, ids.tolist() if isinstance(ids, np.ndarray) else ids))
            return
        fresh = self._bitmaps_for(distinct)
        # maps[values[i]].add(ids[i]) for each pair, with no Python frame per pair: cheaper
        # than grouping the ids by value first (2-4x at a few hundred values a batch)
        deque(map(BitMap.add, map(maps.__getitem__, values),
                  ids.tolist() if isinstance(ids, np.ndarray) else ids), maxlen=0)
        self._settle_all(fresh)

    def add_coded(self, values: Sequence[Hashable], codes: np.ndarray, ids: np.ndarray
                  ) -> None:
        """Add ids[i] to value values[codes[i]] for every i (a coded column's load).
        A value with many ids a batch gets them in one update; when most values have few,
        each id goes in alone (a bitmap update costs about what twenty adds do)."""
        maps = self._maps
        counts = np.bincount(codes, minlength=len(values))
        if len(codes) and int(counts.max()) == 1:
            held = [values[code] for code in codes.tolist()]
            if self._all_new_once(held, set(held)):  # each once, none held yet: no bitmaps
                self._one.update(zip(held, ids.tolist()))
                return
        used = np.flatnonzero(counts).tolist()
        fresh = self._bitmaps_for(values[code] for code in used)
        bitmaps = [maps[values[code]] for code in used]
        if len(used) * self.GROUPED_FROM > len(codes):
            by_code: list[Any] = [None] * len(values)
            for code, bitmap in zip(used, bitmaps, strict=True):
                by_code[code] = bitmap
            deque(map(BitMap.add, map(by_code.__getitem__, codes.tolist()), ids.tolist()),
                  maxlen=0)
        else:
            # ids grouped by value; 16-bit keys sort by radix, in linear time
            order = np.argsort(codes.astype(np.uint16) if len(values) <= 1 << 16 else codes,
                               kind="stable")
            grouped = id_array(ids[order])
            start = 0
            for bitmap, end in zip(bitmaps, np.cumsum(counts[used]).tolist(), strict=True):
                bitmap.update(grouped[start:end])
                start = end
        self._settle_all(fresh)

    def add_many(self, value: Hashable, ids: Iterable[int] | np.ndarray) -> None:
        new = bitmap_of(ids)
        if not new:
            return
        self._bitmaps_for((value,))
        bm = self._maps[value]
        bm |= new
        self._settle(value, bm)

    def discard_many(self, value: Hashable, ids: Iterable[int] | np.ndarray) -> None:
        bm = self._maps.get(value)
        if bm is not None:
            bm -= bitmap_of(ids)
            self._settle(value, bm)
        elif value in self._one and self._one[value] in bitmap_of(ids):
            del self._one[value]

    def get(self, value: Hashable) -> BitMap:
        bm = self._maps.get(value)
        if bm is not None:
            return bm
        one = self._one.get(value)
        return _EMPTY if one is None else BitMap((one,))

    def union_of(self, values: Iterable[Hashable]) -> BitMap:
        maps, one = self._maps, self._one
        wanted = list(values)
        return BitMap.union(BitMap([one[v] for v in wanted if v in one]),
                            *(maps[v] for v in wanted if v in maps))

    def values(self) -> Iterable[Hashable]:
        return [*self._maps, *self._one]

    def items(self) -> Iterable[tuple[Hashable, BitMap]]:
        yield from self._maps.items()
        for value, one in self._one.items():
            yield value, BitMap((one,))

    def group_counts(self, within: BitMap) -> list[tuple[Any, int]]:
        """Exact (value, count) for every value held by at least one id in `within`."""
        out = []
        for value, bm in self._maps.items():
            n = bm.intersection_cardinality(within)
            if n:
                out.append((value, n))
        out += [(value, 1) for value, one in self._one.items() if one in within]
        return out

    def to_state(self) -> dict[str, Any]:
        """{"maps": [[value, serialized bitmap], ...], "one": [[value, ...], ids]}, the ids
        of the values one profile holds as little-endian u32s (unpacked as one buffer)."""
        return {"maps": [[value, bm.serialize()] for value, bm in self._maps.items()],
                "one": [list(self._one),
                        np.fromiter(self._one.values(), dtype="<u4",
                                    count=len(self._one)).tobytes()]}

    @classmethod
    def from_state(cls, state: dict[str, Any] | list[list[Any]]) -> ValueIndex:
        index = cls()
        if isinstance(state, dict):
            values, ids = state["one"]
            index._one = dict(zip(values, np.frombuffer(ids, dtype="<u4").tolist(),
                                  strict=True))
            index._maps = {value: BitMap.deserialize(raw) for value, raw in state["maps"]}
            return index
        for value, raw in state:  # older snapshots: a bitmap for every value
            index._maps[value] = BitMap.deserialize(raw)
            index._settle(value, index._maps[value])
        return index


class RangeIndex:
    """Bit-sliced index of int64 values: ranges in O(bit width) bitmap operations.

    A bulk load's values (set_many) wait in a buffer and are sliced in together once
    PENDING_LIMIT ids wait, or as soon as anything reads or changes the index, so every
    reader sees every value stored. Slicing in has a fixed part, a few µs a slice
    whatever the number of ids (numpy and pyroaring calls); buffered, it is paid once per
    PENDING_LIMIT ids instead of once per batch. Ids close together (a load's new
    profiles, at most DENSE_FROM positions an id over the 65,536-id blocks they lie in)
    are sliced in as whole roaring containers built from each slice's bits; others are
    added id by id. A limit of one block's ids lets most flushes fill whole containers.

    Batches of changed values (replace_many: tracked events' counts and times) wait the
    same way, in a buffer of their own (up to REPLACING_LIMIT ids), and are made as one
    change: an id in several takes its value before from the first and after from the
    last. They are made after the buffered loads' values, which name only ids that held
    no value (so no change waiting can be about one of them before it was loaded).
    """

    __slots__ = ("_changed", "_exists", "_pending", "_pending_ids", "_replacing",
                 "_replacing_ids", "_sample", "base", "slices")

    PENDING_LIMIT = 65_536
    # Changed values wait fewer: ~21 bytes an id, in every range index a backfill touches
    # (30 for ten events), until a read; a tracked batch changes ~2,000 of an index's ids.
    REPLACING_LIMIT = 16_384
    DENSE_FROM = 4  # (the rows laid out stay within a few times the ids' own bits)
    SAMPLE = 256  # values kept to estimate a comparison's matches (`estimate`)

    def __init__(self) -> None:
        self.base: int | None = None
        self.slices: list[BitMap] = []
        self._exists = BitMap()
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # (ids, values) of set_many
        self._pending_ids = 0
        # (ids, old, had, new) of replace_many
        self._replacing: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._replacing_ids = 0
        self._sample: list[int] | None = None  # sorted values of a few ids (`estimate`)
        self._changed = 0  # ids given a value or none since the sample was drawn

    def __len__(self) -> int:
        self._flush()
        return len(self._exists)

    # ------------------------------------------------------------------ updates
    def _offset(self, value: int) -> int:
        if self.base is None:
            self.base = value
        elif value < self.base:
            self._rebase(value)
        u = value - self.base
        while len(self.slices) < u.bit_length():
            self.slices.append(BitMap())
        return u

    def _rebase(self, new_base: int) -> None:
        """Add (base - new_base) to every stored value, ripple-carry over the slices."""
        assert self.base is not None
        delta = self.base - new_base
        carry = BitMap()
        i = 0
        while i < delta.bit_length() or carry:
            if i == len(self.slices):
                self.slices.append(BitMap())
            s = self.slices[i]
            if (delta >> i) & 1:
                total = self._exists - (s ^ carry)  # s + 1 + carry: sum bit is not(s xor c)
                carry = s | carry
            else:
                total = s ^ carry
                carry = s & carry
            self.slices[i] = total
            i += 1
        self.base = new_base

    def set(self, dense_id: int, value: int, old: int | None = None) -> None:
        self._flush()
        self._changed += 1
        u = self._offset(value)
        if old is None:
            changed, self_u = u, u
            self._exists.add(dense_id)
        else:
            assert self.base is not None
            changed, self_u = u ^ (old - self.base), u
        i = 0
        while changed:
            if changed & 1:
                if (self_u >> i) & 1:
                    self.slices[i].add(dense_id)
                else:
                    self.slices[i].discard(dense_id)
            changed >>= 1
            i += 1

    def replace_many(self, ids: np.ndarray, old: np.ndarray, had: np.ndarray,
                     new: np.ndarray) -> None:
        """Store new[i] for ids[i] (distinct ids), which held old[i] where had[i] (and no
        value elsewhere): the state `set` would leave, one bitmap update per slice and
        direction instead of one per id and bit (a batch of tracks). The index keeps the
        arrays (pending until made, like set_many's): the caller must not change them."""
        if not len(ids):
            return
        self._replacing.append((ids, old, had, new))
        self._replacing_ids += len(ids)
        if self._replacing_ids >= self.REPLACING_LIMIT:
            self._flush()

    def _replace_pending(self) -> None:
        """Make the changes replace_many left pending, as one."""
        parts, self._replacing, self._replacing_ids = self._replacing, [], 0
        ids, old, had, new = (np.concatenate(column) for column in zip(*parts, strict=True))
        if len(parts) > 1:
            order = np.argsort(ids, kind="stable")  # each id's changes in the order made
            ids, old, had, new = ids[order], old[order], had[order], new[order]
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
            ends = np.r_[starts[1:], len(ids)] - 1
            ids, old, had, new = ids[starts], old[starts], had[starts], new[ends]
        self._replace(ids, old, had, new)

    def _replace(self, ids: np.ndarray, old: np.ndarray, had: np.ndarray,
                 new: np.ndarray) -> None:
        new = new.astype(np.int64, copy=False)
        self._changed += len(new)
        low = int(new.min())
        if self.base is None:
            self.base = low
        elif low < self.base:
            self._rebase(low)
        base = np.uint64(self.base % (1 << 64))
        u_new = new.view(np.uint64) - base
        u_old = np.where(had, old.astype(np.int64, copy=False).view(np.uint64) - base,
                         np.uint64(0))
        changed = u_new ^ u_old
        width = int(changed.max()).bit_length()
        while len(self.slices) < max(width, int(u_new.max()).bit_length()):
            self.slices.append(BitMap())
        ids = ids.astype(np.uint32, copy=False)
        flipped, on = _bit_rows(changed, width), _bit_rows(u_new, width)
        adds, removes = flipped & on, flipped & ~on  # every slice's masks in two passes
        slices = self.slices
        for i in np.flatnonzero(flipped.any(axis=1)).tolist():
            added = ids[adds[i]]
            removed = ids[removes[i]]
            if len(added):
                slices[i].update(id_array(added))  # (an array.array goes in as a buffer)
            if len(removed):
                slices[i] -= bitmap_of(removed)
        fresh = ids[~had]
        if len(fresh):
            self._exists.update(id_array(fresh))

    def remove(self, dense_id: int, old: int) -> None:
        self._flush()
        self._changed += 1
        assert self.base is not None
        u = old - self.base
        i = 0
        while u:
            if u & 1:
                self.slices[i].discard(dense_id)
            u >>= 1
            i += 1
        self._exists.discard(dense_id)

    def set_many(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Store values for distinct ids that hold none yet (the bulk-load path). The index
        keeps the arrays (pending until sliced in): the caller must not change them."""
        if len(ids) == 0:
            return
        self._pending.append((ids, values))
        self._pending_ids += len(ids)
        if self._pending_ids >= self.PENDING_LIMIT:
            self._flush()

    def _flush(self) -> None:
        """Slice in the values set_many left pending, then make replace_many's changes."""
        if self._pending:
            self._slice_pending()
        if self._replacing:
            self._replace_pending()

    def _slice_pending(self) -> None:
        pending, self._pending, self._pending_ids = self._pending, [], 0
        if len(pending) == 1:
            ids, values = pending[0]
        else:
            ids = np.concatenate([i for i, _ in pending])
            values = np.concatenate([v for _, v in pending])
        values = values.astype(np.int64, copy=False)
        self._changed += len(values)
        low = int(values.min())
        if self.base is None:
            self.base = low
        elif low < self.base:
            self._rebase(low)
        # vals - base wraps correctly in uint64: every true difference is in [0, 2**64).
        u = values.view(np.uint64) - np.uint64(self.base % (1 << 64))
        width = int(u.max()).bit_length()
        while len(self.slices) < width:
            self.slices.append(BitMap())
        ids = ids.astype(np.uint32, copy=False)
        start = int(ids.min()) & -BLOCK
        blocks = (int(ids.max()) - start) // BLOCK + 1
        if blocks * BLOCK > self.DENSE_FROM * len(ids):  # ids far apart: insert them
            bits = _bit_rows(u, width)
            for i in range(width):  # (np.compress: 3-7x a boolean index over random bits)
                selected = np.compress(bits[i], ids)
                if len(selected):
                    self.slices[i].update(id_array(selected))
            self._exists.update(id_array(ids))
            return
        # Close together (a load's new profiles): each slice's bits, and the ids as the
        # exists row, laid out over the blocks they lie in, go in as whole containers.
        at = ids - np.uint32(start)
        laid = np.zeros(blocks * BLOCK, dtype=np.uint64)  # no value: no bit set
        laid[at] = u
        held = np.zeros((1, blocks * BLOCK), dtype=bool)
        held[0, at] = True
        for i, bitmap in enumerate(bitmaps_of_packed(_bit_planes(laid, width), start)):
            self.slices[i] |= bitmap
        self._exists |= bitmaps_of_rows(held, start)[0]

    # ------------------------------------------------------------------ queries
    def exists(self) -> BitMap:
        self._flush()
        return self._exists

    def span(self) -> tuple[int, int] | None:
        """Bounds no stored value lies outside (the base, and the base plus the largest
        offset the slices can hold; not tight above), or None if nothing is stored: what
        a planner knows about a comparison without a bitmap operation."""
        self._flush()
        if self.base is None or not self._exists:
            return None
        return self.base, self.base + (1 << len(self.slices)) - 1

    def estimate(self, op: str, values: Sequence[int]) -> int:
        """About how many ids compare `op` to `values` (an op of `compare`, "between" two
        values, or "in" any number), from the values of SAMPLE ids spread over the index:
        what a planner orders an AND's parts by, never an answer (a comparison matching
        fewer than one id in SAMPLE may be estimated at none). The sample is drawn again
        once more than an eighth of the ids (and 1,024) have been given a value or none
        since: a stale sample only orders parts worse, and drawing costs ~1 ms."""
        self._flush()
        held = len(self._exists)
        if not held or self.base is None:
            return 0
        sample = self._sample
        if sample is None or self._changed > max(held >> 3, 1024):
            sample = self._sample = self._draw_sample(held)
            self._changed = 0
        size = len(sample)
        if op in ("eq", "ne", "in"):
            hits = sum(bisect_right(sample, v) - bisect_left(sample, v) for v in set(values))
            if op == "ne":
                hits = size - hits
        elif op == "between":
            lo, hi = values
            hits = bisect_right(sample, hi) - bisect_left(sample, lo) if lo <= hi else 0
        elif op == "lt" or op == "le":
            hits = (bisect_left if op == "lt" else bisect_right)(sample, values[0])
        elif op == "gt" or op == "ge":
            hits = size - (bisect_right if op == "gt" else bisect_left)(sample, values[0])
        else:
            raise ValueError(f"unknown comparison {op!r}")
        return hits * held // size

    def _draw_sample(self, held: int) -> list[int]:
        """The sorted values of up to SAMPLE ids at ranks spread evenly over the holders,
        each slice intersected with the sampled ids and its bits gathered."""
        count = min(self.SAMPLE, held)
        exists = self._exists
        ids = np.fromiter(map(exists.__getitem__, (i * held // count for i in range(count))),
                          dtype=np.uint32, count=count)
        among = bitmap_of(ids)
        offsets = np.zeros(len(ids), dtype=np.uint64)
        for i, bits in enumerate(self.slices):
            hit = ids_of((among & bits,))
            if len(hit):  # (ids ascend, as their ranks do)
                offsets[np.searchsorted(ids, hit)] |= np.uint64(1 << i)
        assert self.base is not None
        values = (offsets + np.uint64(self.base % (1 << 64))).view(np.int64)
        values.sort()
        return values.tolist()

    def value_of(self, dense_id: int) -> int | None:
        self._flush()
        if dense_id not in self._exists or self.base is None:
            return None
        return self.base + sum(1 << i for i, s in enumerate(self.slices) if dense_id in s)

    # Comparisons walk the slices from the top bit down (O'Neil's algorithm) over the ids
    # whose higher bits equal the constant's so far. An id with a 0 where the constant has
    # a 1 is below it, one with a 1 where it has a 0 above it; the walk gathers one of the
    # two sides and stops once no id is left undecided, or once the constant's remaining
    # bits are all ones (for "at most") or all zeros (for "at least"). Gathering a side is
    # a union per bit that grows with the side, so each comparison gathers the side likely
    # smaller -- the constant's top bit says which half of the range it sits in -- and
    # subtracts it when the other was asked for.

    def _at_most(self, top: int, c: int, ids: BitMap) -> BitMap:
        """Ids of `ids` whose bits top..0 are at most c (0 <= c < 2**(top+1)), their higher
        bits being equal already. `ids` is never changed."""
        if top < 0:  # no bit left: every id equals c
            return BitMap(ids)
        if c >= 1 << top:  # upper half: gather the few above c
            return BitMap(ids) if c + 1 == 2 << top else ids - self._gather(top, c + 1, ids, 0)
        return self._gather(top, c, ids, 1)

    def _at_least(self, top: int, c: int, ids: BitMap) -> BitMap:
        """Ids of `ids` whose bits top..0 are at least c (the mirror of _at_most)."""
        if top < 0:
            return BitMap(ids)
        if c <= 1 << top:  # lower half: gather the few below c
            return BitMap(ids) if c == 0 else ids - self._gather(top, c - 1, ids, 1)
        return self._gather(top, c, ids, 0)

    def _gather(self, top: int, c: int, equal: BitMap, edge: int) -> BitMap:
        """The walk: edge 1 gathers the ids of `equal` below c and returns those at most c;
        edge 0 gathers those above and returns those at least c (bits top..0)."""
        gathered = BitMap()
        owned = False  # whether `equal` is a bitmap of ours (changed in place) yet
        for i in range(top, -1, -1):
            low = (2 << i) - 1
            if c & low == (low if edge else 0):  # c's remaining bits all decide nothing
                break
            s, bit = self.slices[i], (c >> i) & 1
            if bit == edge:  # ids whose bit differs from c's here are decided: gather them
                gathered |= equal - s if edge else equal & s
            if bit:  # the undecided keep c's bit
                if owned:
                    equal &= s
                else:
                    equal, owned = equal & s, True
            elif owned:
                equal -= s
            else:
                equal, owned = equal - s, True
            if not equal:
                return gathered
        return gathered | equal

    def _within(self, lo: int, hi: int, exists: BitMap) -> BitMap:
        """Ids of `exists` with lo <= offset <= hi, for 0 <= lo <= hi < 2**width, in one
        walk: the bits lo and hi share are followed once; at the first bit they differ in,
        the ids with a 1 there need their lower bits at most hi's, those with a 0 at least
        lo's -- two walks over disjoint halves instead of two over every id."""
        equal = exists
        i = len(self.slices) - 1
        while i >= 0 and (lo >> i) & 1 == (hi >> i) & 1:
            equal = equal & self.slices[i] if (hi >> i) & 1 else equal - self.slices[i]
            if not equal:
                return BitMap()
            i -= 1
        if i < 0:
            return BitMap(equal)
        s, low = self.slices[i], (1 << i) - 1
        if i == 0:
            return BitMap(equal)  # lo ends in 0, hi in 1: both halves are in
        return (self._at_most(i - 1, hi & low, equal & s)
                | self._at_least(i - 1, lo & low, equal - s))

    def _eq(self, c: int, exists: BitMap) -> BitMap:
        equal = exists
        for i in range(len(self.slices) - 1, -1, -1):
            equal = equal & self.slices[i] if (c >> i) & 1 else equal - self.slices[i]
            if not equal:
                break
        return BitMap(equal)

    def compare(self, op: str, value: int, within: BitMap | None = None) -> BitMap:
        """Ids whose value compares `op` to `value`; only among `within` if given (cheaper:
        every step then works on the candidates, not on every id with a value)."""
        self._flush()
        return self._compare(op, value, self._among(within))

    def between(self, lo: int, hi: int, within: BitMap | None = None) -> BitMap:
        if lo > hi:
            return BitMap()
        self._flush()
        if self.base is None:
            return BitMap()
        top = (1 << len(self.slices)) - 1  # every stored offset is <= top
        lo, hi = max(lo - self.base, 0), min(hi - self.base, top)
        if lo > hi:
            return BitMap()
        exists = self._among(within)
        width = len(self.slices)
        if (lo ^ hi).bit_length() < width - 1:  # a shared prefix: walk it once
            return self._within(lo, hi, exists)
        upper = self._at_most(width - 1, hi, exists)  # bounds far apart: two walks
        return upper - self._at_most(width - 1, lo - 1, upper) if lo else upper

    def _among(self, within: BitMap | None) -> BitMap:
        return self._exists if within is None else self._exists & within

    def _compare(self, op: str, value: int, exists: BitMap) -> BitMap:
        if self.base is None:
            return BitMap()
        c = value - self.base
        top = (1 << len(self.slices)) - 1  # every stored offset is <= top
        if op == "le" or op == "lt":
            if op == "lt":
                c -= 1
            if c < 0:
                return BitMap()
            return BitMap(exists) if c >= top else self._at_most(len(self.slices) - 1, c,
                                                                 exists)
        if op == "gt" or op == "ge":
            if op == "gt":
                c += 1
            if c <= 0:
                return BitMap(exists)
            return BitMap() if c > top else self._at_least(len(self.slices) - 1, c, exists)
        if op == "eq":
            return BitMap() if c < 0 or c > top else self._eq(c, exists)
        if op == "ne":
            return exists - self._compare("eq", value, exists)
        raise ValueError(f"unknown comparison {op!r}")

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> dict[str, Any]:
        self._flush()
        return {"base": self.base, "exists": self._exists.serialize(),
                "slices": [s.serialize() for s in self.slices]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RangeIndex:
        index = cls()
        index.base = state["base"]
        index._exists = BitMap.deserialize(state["exists"])
        index.slices = [BitMap.deserialize(raw) for raw in state["slices"]]
        return index
