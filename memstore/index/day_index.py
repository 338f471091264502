"""Who did one event on each UTC day, and how many times: roaring bitmaps over dense ids.

`DayIndex` keeps, per day, the bitmap of the ids that did the event that day at least once,
and, for the ids that did it more than once, their count minus one bit-sliced (slice i
holds the ids whose count - 1 has bit i set). Most people do an event once on a day they
do it at all, so the slices are small: memory is about 2 bytes per (id, day) in an array
container, or one bit per id of a dense 65,536-id block, whichever roaring picks, plus the
slices of the repeat counts.

Invariants: no empty bitmap and no empty slice list is kept (a day nobody did the event
on leaves no trace); the last slice of a day is never empty.

Queries never touch ids one by one from Python:
- `did(lo, hi)`: the union of the days' bitmaps;
- `counted(lo, hi, ...)`: each id's sum of counts over the days, as a vector: the days'
  ids go out of roaring in bulk (memstore.index.dense), a day at a time, and an
  unbuffered add (`np.add.at`) counts them into a vector of the narrowest unsigned type
  the window's sums fit in (one byte an id for a window of under 256 days without
  repeats); one more add puts in the repeat slices (2 ** i for slice i), and the ids
  whose sums pass the bounds come back as one bitmap (`count` counts them in the vector
  instead): a few numpy passes over the window's (id, day) cells and over the shard's
  ids, whatever the bounds, holding 8 bytes a cell of the largest day and 1-8 bytes an
  id of the shard while it runs. Bounds at or past the largest sum the slices allow are
  decided without counting.

The sums of the last WINDOWS windows counted are kept, one uint32 an id (`_Sums`), and
kept current by every update: a write adds its change of count to each kept window its
day is in. A window asked again (a dashboard's segment, a live segment re-evaluated on
its timer) is compared in its vector without counting a cell. A window near a kept one
(the same window once the day has rolled over; 31 days after 30) starts from a copy of
the kept vector and adds and takes out only the days that differ. A window whose sums could
pass 2 ** 32 - 1 is not kept, and one dropped when an update could carry it there. The
vectors live in memory only (snapshots hold the bitmaps).
Bitmaps returned are fresh; the index's own are never handed out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from pyroaring import BitMap

from memstore.index.dense import bitmap_of, bitmap_of_mask, ids_of

Pairs = Sequence[tuple[int, int]]

WINDOWS = 2  # windows (lo, hi) whose sums an index keeps current, the latest counted
_SUM_MAX = (1 << 32) - 1


class _Sums:
    """Each id's sum of counts over one window (uint32, indexed by dense id), and `top`,
    at least the largest of them: what a change may add is checked against it."""

    __slots__ = ("top", "vector")

    def __init__(self, vector: np.ndarray, top: int) -> None:
        self.vector, self.top = vector, top

    def shift(self, dense: int, delta: int) -> bool:
        """Add `delta` to `dense`'s sum; False when the sums can no longer be kept."""
        if delta > 0:
            self.top += delta
            if self.top > _SUM_MAX:
                return False
        if dense >= len(self.vector):
            self._grow(dense + 1)
        now = int(self.vector[dense]) + delta
        if now < 0:  # the index removed more than it held: never kept a wrong sum
            return False
        self.vector[dense] = now
        return True

    def shift_many(self, ids: np.ndarray, deltas: np.ndarray) -> bool:
        """shift for every (ids[i], deltas[i]); an id may come more than once."""
        added = deltas[deltas > 0]
        if len(added) and int(added.max()) > _SUM_MAX:
            return False
        self.top += int(added.sum())  # each at most 2 ** 32: no int64 overflow
        if self.top > _SUM_MAX:
            return False
        end = int(ids.max()) + 1
        if end > len(self.vector):
            self._grow(end)
        # uint32 arithmetic is modular: a decrease added as its complement lands exactly
        np.add.at(self.vector, ids.astype(np.intp), deltas.astype(np.uint32))
        return True

    def _grow(self, size: int) -> None:
        vector = np.zeros(max(size, len(self.vector) * 5 // 4 + 1024), dtype=np.uint32)
        vector[:len(self.vector)] = self.vector
        self.vector = vector


class DayIndex:
    __slots__ = ("_days", "_extra", "_sums")

    def __init__(self) -> None:
        self._days: dict[int, BitMap] = {}
        self._extra: dict[int, list[BitMap]] = {}  # day -> slices of (count - 1)
        self._sums: dict[tuple[int, int], _Sums] = {}  # kept windows, the latest asked last

    def __len__(self) -> int:
        """How many days someone did the event on."""
        return len(self._days)

    # ------------------------------------------------------------------ updates
    def add(self, dense: int, day: int, count: int) -> None:
        """`dense` did the event `count` times on `day` (it had no count there)."""
        if self._sums:
            self._shift(dense, day, count)
        bitmap = self._days.get(day)
        if bitmap is None:
            bitmap = self._days[day] = BitMap()
        bitmap.add(dense)
        if count > 1:
            slices = self._extra.setdefault(day, [])
            extra = count - 1
            while len(slices) < extra.bit_length():
                slices.append(BitMap())
            for i in range(extra.bit_length()):
                if (extra >> i) & 1:
                    slices[i].add(dense)

    def remove(self, dense: int, day: int, count: int) -> None:
        """`dense`'s count of `count` on `day` is gone."""
        bitmap = self._days.get(day)
        if bitmap is None:
            return
        if self._sums and dense in bitmap:
            self._shift(dense, day, -count)
        bitmap.discard(dense)
        if not bitmap:
            del self._days[day]
        slices = self._extra.get(day)
        if slices is None or count <= 1:
            return
        extra = count - 1
        for i in range(min(extra.bit_length(), len(slices))):
            if (extra >> i) & 1:
                slices[i].discard(dense)
        while slices and not slices[-1]:
            slices.pop()
        if not slices:
            del self._extra[day]

    def update(self, dense: int, old: Pairs, new: Pairs) -> None:
        """Replace `dense`'s (day, count) pairs `old` with `new`."""
        before, after = dict(old), dict(new)
        for day, count in before.items():
            if after.get(day) != count:
                self.remove(dense, day, count)
        for day, count in after.items():
            if before.get(day) != count:
                self.add(dense, day, count)

    def bump_many(self, ids: np.ndarray, days: np.ndarray, before: np.ndarray,
                  after: np.ndarray) -> None:
        """Change the count of (ids[i], days[i]) from before[i] (0: absent) to after[i]
        (>= 1) for every i, distinct pairs: the state `update` would leave, one bitmap
        update per day (and per repeat slice and direction, for the few repeats)."""
        if not len(ids):
            return
        ids = ids.astype(np.uint32, copy=False)
        if self._sums:
            self._shift_many(ids, days, after.astype(np.int64) - before.astype(np.int64))
        fresh = before == 0
        if fresh.any():
            self._add_members(ids[fresh], days[fresh])
        repeats = after > 1
        if not repeats.any():
            return
        for who, day, was, now in zip(ids[repeats].tolist(), days[repeats].tolist(),
                                      before[repeats].tolist(), after[repeats].tolist(),
                                      strict=True):
            slices = self._extra.setdefault(day, [])
            old, new = max(was - 1, 0), now - 1
            changed = old ^ new
            for i in range(changed.bit_length()):
                if (changed >> i) & 1:
                    while len(slices) <= i:
                        slices.append(BitMap())
                    if (new >> i) & 1:
                        slices[i].add(who)
                    else:
                        slices[i].discard(who)
            while slices and not slices[-1]:
                slices.pop()
            if not slices:
                del self._extra[day]

    def _add_members(self, ids: np.ndarray, days: np.ndarray) -> None:
        """Add ids[i] to the bitmap of days[i], one update per day."""
        order = np.argsort(days, kind="stable")
        days, ids = days[order], ids[order]
        cuts = np.flatnonzero(days[1:] != days[:-1]) + 1
        bounds = [0, *cuts.tolist(), len(days)]
        on = days[np.array(bounds[:-1])].tolist()
        for day, start, end in zip(on, bounds, bounds[1:], strict=False):
            members = bitmap_of(ids[start:end])
            bitmap = self._days.get(day)
            if bitmap is None:
                self._days[day] = members
            else:
                bitmap |= members

    def add_many(self, ids: np.ndarray, days: np.ndarray, counts: np.ndarray) -> None:
        """Add (ids[i], days[i], counts[i]) for every i, none of them present yet (a load,
        a replay of new profiles): one bitmap update per day and per repeat slice."""
        if not len(ids):
            return
        ids = ids.astype(np.uint32, copy=False)
        if self._sums:
            self._shift_many(ids, days, counts.astype(np.int64))
        order = np.argsort(days, kind="stable")
        days, ids, counts = days[order], ids[order], counts[order]
        cuts = np.flatnonzero(np.diff(days)) + 1
        starts = np.concatenate(([0], cuts)).tolist()
        ends = np.concatenate((cuts, [len(days)])).tolist()
        for start, end in zip(starts, ends, strict=True):
            day = int(days[start])
            members = bitmap_of(ids[start:end])
            bitmap = self._days.get(day)
            if bitmap is None:
                self._days[day] = members
            else:
                bitmap |= members
            extra = counts[start:end] - 1
            repeat = extra > 0
            if not repeat.any():
                continue
            extra, who = extra[repeat].astype(np.uint64), ids[start:end][repeat]
            slices = self._extra.setdefault(day, [])
            for i in range(int(extra.max()).bit_length()):
                chosen = who[(extra >> np.uint64(i)) & np.uint64(1) == 1]
                while len(slices) <= i:
                    slices.append(BitMap())
                if len(chosen):
                    slices[i] |= bitmap_of(chosen)
            while slices and not slices[-1]:
                slices.pop()
            if not slices:
                del self._extra[day]

    def _shift(self, dense: int, day: int, delta: int) -> None:
        """Carry a change of `dense`'s count on `day` into the kept windows holding it."""
        for (lo, hi), sums in list(self._sums.items()):
            if lo <= day <= hi and not sums.shift(dense, delta):
                del self._sums[lo, hi]

    def _shift_many(self, ids: np.ndarray, days: np.ndarray, deltas: np.ndarray) -> None:
        for (lo, hi), sums in list(self._sums.items()):
            inside = (days >= lo) & (days <= hi)
            if inside.any() and not sums.shift_many(ids[inside], deltas[inside]):
                del self._sums[lo, hi]

    def _keep(self, lo: int, hi: int, counts: np.ndarray, top: int) -> None:
        """Keep the window's exact sums `counts`, none above `top` (<= _SUM_MAX)."""
        while len(self._sums) >= WINDOWS:
            del self._sums[next(iter(self._sums))]
        self._sums[lo, hi] = _Sums(counts.astype(np.uint32, copy=False), top)

    # ------------------------------------------------------------------ queries
    def days(self) -> list[int]:
        return sorted(self._days)

    def first_day(self) -> int | None:
        """The earliest day someone did the event on, if any."""
        return min(self._days) if self._days else None

    def holders(self, lo: int, hi: int) -> BitMap:
        """Ids that did the event on some day in lo..hi (inclusive)."""
        return BitMap.union(BitMap(), *(b for d, b in self._days.items() if lo <= d <= hi))

    def upper_bound(self, lo: int, hi: int) -> int:
        """At least as many as `holders(lo, hi)` has, counted without a bitmap operation."""
        return sum(len(b) for d, b in self._days.items() if lo <= d <= hi)

    def counted(self, lo: int, hi: int, least: int, most: int | None,
                within: BitMap | None = None) -> BitMap:
        """Ids (among `within`, if given) whose counts over the days lo..hi add up to at
        least `least` (>= 1) and at most `most` (None: no limit)."""
        found = self._match(lo, hi, least, most, within)
        if isinstance(found, BitMap):
            return found
        match, after = found
        result = bitmap_of_mask(match)
        if after is not None:
            result &= after
        return result

    def count(self, lo: int, hi: int, least: int, most: int | None,
              within: BitMap | None = None) -> int:
        """len(counted(...)), counted in the vector where no bitmap is needed."""
        found = self._match(lo, hi, least, most, within)
        if isinstance(found, BitMap):
            return len(found)
        match, after = found
        if after is None:
            return int(np.count_nonzero(match))
        return bitmap_of_mask(match).intersection_cardinality(after)

    def _match(self, lo: int, hi: int, least: int, most: int | None,
               within: BitMap | None) -> BitMap | tuple[np.ndarray, BitMap | None]:
        """counted's answer as a bitmap, or as a mask over ids and the bitmap it is still
        to be restricted to (None: nothing)."""
        chosen = [d for d in self._days if lo <= d <= hi]
        # No id's sum exceeds this (a day's count is at most 2 ** its slices): a bound at
        # or past it decides without counting.
        ceiling = sum(1 << len(self._extra.get(d, ())) for d in chosen)
        if least > ceiling:
            return BitMap()
        if most is not None and most >= ceiling:
            most = None
        if least <= 1 and most is None:
            holders = BitMap.union(BitMap(), *(self._days[d] for d in chosen))
            if within is not None:
                holders &= within
            return holders
        kept = self._sums.pop((lo, hi), None)
        if kept is not None:  # asked before: its sums are current
            self._sums[lo, hi] = kept
            counts, among = kept.vector, None
        else:
            # Restrict first only when `within` is smaller than the cells it would cut: a
            # bitmap AND costs about what counting a cell costs.
            cells = sum(len(self._days[d]) for d in chosen)
            among = within if within is not None and len(within) < cells else None
            exact = among is None and ceiling <= _SUM_MAX  # every id's sum, in 32 bits
            derived = self._derived(lo, hi, cells) if exact else None
            if derived is not None:
                counts = derived
            else:
                days = [b & among if among is not None else b
                        for b in (self._days[d] for d in chosen)]
                end = max((b.max() + 1 for b in days if b), default=0)
                if not end:
                    return BitMap()
                # the days each id did it on, in the narrowest counter its sums fit in
                counts = np.zeros(end, dtype=_counter(ceiling))
                one = counts.dtype.type(1)
                for b in days:  # a day's ids are distinct: each add is one cell
                    np.add.at(counts, ids_of((b,), np.intp), one)
                repeats = [(i, bits & among if among is not None else bits)
                           for d in chosen for i, bits in enumerate(self._extra.get(d, ()))]
                if repeats:
                    _add_repeats(counts, repeats, least if most is None else most + 1,
                                 exact=ceiling < 1 << 64)
            if exact:  # keep them
                self._keep(lo, hi, counts, ceiling)
        match = counts >= least
        if most is not None:
            match &= counts <= most
        return match, within if within is not None and among is None else None

    def _derived(self, lo: int, hi: int, cells: int) -> np.ndarray | None:
        """The sums over lo..hi from a kept window near it (the same window a day on, once
        the day has rolled over; a dashboard's 30 and 31 days): the kept vector, less the
        days only it covers, plus the days only lo..hi covers. None when no kept window is
        near enough: the days to move hold more than half the `cells` of counting afresh.
        Only for windows whose sums fit in 32 bits, as every kept one's do, so uint32
        arithmetic, modular on the way, ends exact."""
        best: tuple[int, _Sums, list[int], list[int]] | None = None
        for (was_lo, was_hi), sums in self._sums.items():
            gone = [d for d in self._days if was_lo <= d <= was_hi and not lo <= d <= hi]
            new = [d for d in self._days if lo <= d <= hi and not was_lo <= d <= was_hi]
            moved = sum(len(self._days[d]) for d in (*gone, *new))
            if best is None or moved < best[0]:
                best = (moved, sums, gone, new)
        if best is None or best[0] * 2 > cells:
            return None
        _, sums, gone, new = best
        end = max((self._days[d].max() + 1 for d in new), default=0)
        counts = np.zeros(max(end, len(sums.vector)), dtype=np.uint32)
        counts[:len(sums.vector)] = sums.vector
        for days, sign in ((new, 1), (gone, -1)):
            for d in days:
                np.add.at(counts, ids_of((self._days[d],), np.intp),
                          np.uint32(sign % (1 << 32)))
                for i, bits in enumerate(self._extra.get(d, ())):
                    np.add.at(counts, ids_of((bits,), np.intp),
                              np.uint32((sign << i) % (1 << 32)))
        return counts

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> dict[str, Any]:
        return {"days": [[day, bitmap.serialize()] for day, bitmap in self._days.items()],
                "extra": [[day, [s.serialize() for s in slices]]
                          for day, slices in self._extra.items()]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DayIndex:
        index = cls()
        index._days = {day: BitMap.deserialize(raw) for day, raw in state["days"]}
        index._extra = {day: [BitMap.deserialize(raw) for raw in slices]
                        for day, slices in state["extra"]}
        return index

    def items(self) -> Iterable[tuple[int, BitMap, list[BitMap]]]:
        """(day, who did it, repeat slices) for every day (tests, memory figures)."""
        for day in sorted(self._days):
            yield day, self._days[day], self._extra.get(day, [])

    def memory_bytes(self) -> int:
        """Bytes of the bitmaps' containers (roaring's own count; Python objects aside)."""
        total = 0
        for _, bitmap, slices in self.items():
            for b in (bitmap, *slices):
                stats = b.get_statistics()
                total += (stats["n_bytes_array_containers"] + stats["n_bytes_run_containers"]
                          + stats["n_bytes_bitset_containers"])
        return total


def _counter(ceiling: int) -> type:
    """The narrowest unsigned dtype holding every sum up to `ceiling` (uint64 past it: the
    repeats then saturate, _add_repeats). A narrow counter is what makes a cold count
    fast: numpy's unbuffered add into 473,000 uint8 counters (in L2) took 3.7 ms where
    np.bincount's int64 counts of the same 1M cells took 10 ms (numpy 2.4, in process)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if ceiling <= np.iinfo(dtype).max:
            return dtype
    return np.uint64


def _add_repeats(counts: np.ndarray, repeats: list[tuple[int, BitMap]], cap: int,
                 exact: bool) -> None:
    """counts[id] += 2 ** i for each (i, bits) and each id of bits (a repeat slice: its
    ids are distinct, but an id is in the slices of several days). `exact`: no sum can
    reach 2 ** 64, so one unbuffered add does it all; otherwise (counts near 2 ** 63 a
    day) slice by slice, saturating at `cap`, which changes no answer that compares
    with bounds below `cap`."""
    if exact:
        who = ids_of((bits for _, bits in repeats), np.intp)
        sizes = [len(bits) for _, bits in repeats]
        weight = np.repeat(np.left_shift(np.uint64(1), np.array([i for i, _ in repeats],
                                                                 dtype=np.uint64)), sizes)
        np.add.at(counts, who, weight.astype(counts.dtype))
        return
    top = np.uint64(cap)
    np.minimum(counts, top, out=counts)
    for i, bits in repeats:
        who = ids_of((bits,), np.intp)
        now = counts[who]
        counts[who] = now + np.minimum(np.uint64(min(1 << i, cap)), top - now)
