"""A compact uint64 -> uint32 hash table for the identifier directory.

A dict of 64-bit hashes to dense ids costs ~90 bytes an entry (the dict slot, a 36-byte int
object for the key, often another for the value); at two identifiers a profile that was
the largest structure after the profile blobs themselves. Here an entry is 12 bytes in two
numpy arrays (keys, values), open addressing with linear probing, at most 70% full and
built 55% full, so ~17-22 bytes an entry. Reads and writes go through memoryviews of the
arrays, which give and take plain ints without building numpy scalars.

Key 0 marks an empty slot and key 1 a deleted one (a tombstone, so probe chains stay
intact); callers never use those two keys (engine.ident_key maps them away). A key's home
slot comes from the top bits of key * 2**64/phi (Fibonacci hashing), not its low bits, so
keys that share low bits (chosen by someone who controls identifier values) still spread:
those 32 bits times the capacity, over 2**32 (Lemire's multiply-shift range reduction), so
the capacity need not be a power of two. With power-of-two capacities (table sizes
doubled, so 35-70% full, 17-34 bytes an entry) the directory of the bench's 1M profiles
took 50 bytes a profile.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from memstore.index import mapped

EMPTY = 0
TOMBSTONE = 1
_MIN_CAPACITY = 2048
_MAX_FILL = 0.7  # live entries + tombstones, as a share of the slots
_BUILT_FILL = 0.55  # a table made anew (grown, or rebuilt to drop tombstones) is this full
_ROUND = 1024  # capacities are multiples of this
_PHI = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, odd
_TOP, _LOW = 0xFFFF_FFFF_0000_0000, 0xFFFF_FFFF  # a uint64's halves
_M64 = (1 << 64) - 1
_WINDOW = 8  # slots a vectorized probe looks at a round (find_many, _place)
_STEPS = np.arange(_WINDOW)


class IntTable:
    __slots__ = ("_cap", "_filled", "_keys", "_kv", "_live", "_vals", "_vv")

    def __init__(self, entries: int = 0) -> None:
        self._alloc(_capacity_for(entries))

    def _alloc(self, capacity: int) -> None:
        self._keys = mapped.zeros(capacity, np.uint64)
        self._vals = mapped.zeros(capacity, np.uint32)
        self._kv = memoryview(self._keys)  # type: ignore[arg-type]
        self._vv = memoryview(self._vals)  # type: ignore[arg-type]
        self._cap = capacity
        self._live = 0
        self._filled = 0

    def __len__(self) -> int:
        return self._live

    @property
    def nbytes(self) -> int:
        return int(self._keys.nbytes + self._vals.nbytes)

    def _slot(self, key: int) -> int:
        """Where `key` is, or -1."""
        kv, cap = self._kv, self._cap
        i = ((((key * _PHI) & _M64) >> 32) * cap) >> 32
        while True:
            k = kv[i]
            if k == key:
                return i
            if k == EMPTY:
                return -1
            i += 1
            if i == cap:
                i = 0

    def get(self, key: int, default: int | None = None) -> int | None:
        i = self._slot(key)
        return default if i < 0 else self._vv[i]

    def __contains__(self, key: int) -> bool:
        return self._slot(key) >= 0

    def __getitem__(self, key: int) -> int:
        i = self._slot(key)
        if i < 0:
            raise KeyError(key)
        return self._vv[i]  # type: ignore[no-any-return]

    def __setitem__(self, key: int, value: int) -> None:
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"IntTable value {value} does not fit 32 bits")
        kv, cap = self._kv, self._cap
        i = ((((key * _PHI) & _M64) >> 32) * cap) >> 32
        reuse = -1
        while True:
            k = kv[i]
            if k == key:
                self._vv[i] = value
                return
            if k == EMPTY:
                break
            if k == TOMBSTONE and reuse < 0:
                reuse = i
            i += 1
            if i == cap:
                i = 0
        if reuse >= 0:
            i = reuse
        else:
            self._filled += 1
        kv[i] = key
        self._vv[i] = value
        self._live += 1
        if self._filled > _MAX_FILL * cap:
            self._rebuild()

    def __delitem__(self, key: int) -> None:
        i = self._slot(key)
        if i < 0:
            raise KeyError(key)
        self._kv[i] = TOMBSTONE
        self._live -= 1

    def items(self) -> Iterator[tuple[int, int]]:
        return zip(*(column.tolist() for column in self.arrays()), strict=True)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every entry as two arrays, keys (uint64) and values (uint32), in table order:
        what `update` takes to build the table again (snapshots)."""
        live = self._keys > TOMBSTONE
        return self._keys[live], self._vals[live]

    # A snapshot holds a table as it is (`slots`, `put_slots`), not its entries to build it
    # again: with the same capacity every key is in the slot it was in (0.05 s at 2M
    # entries, where a build from the entries took 0.15-0.4 s).
    @property
    def capacity(self) -> int:
        return self._cap

    @property
    def tombstones(self) -> int:
        return self._filled - self._live

    @classmethod
    def of_capacity(cls, capacity: int) -> IntTable:
        """An empty table of exactly `capacity` slots (for `put_slots`)."""
        if capacity < 1:
            raise ValueError(f"a table of {capacity} slots")
        table = cls.__new__(cls)
        table._alloc(capacity)
        return table

    def slots(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Slots start..stop as they are: keys (uint64, 0 empty, 1 deleted) and values."""
        return self._keys[start:stop], self._vals[start:stop]

    def put_slots(self, start: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Fill empty slots from `start` on with what `slots` gave for a table of this
        capacity (ValueError if they are not empty or do not fit)."""
        stop = start + len(keys)
        if start < 0 or stop > self._cap or len(values) != len(keys):
            raise ValueError(f"slots {start}..{stop} of {len(values)} values do not fit a "
                             f"table of {self._cap}")
        if self._keys[start:stop].any():
            raise ValueError(f"slots {start}..{stop} are not empty")
        self._keys[start:stop] = keys
        self._vals[start:stop] = values
        self._live += int(np.count_nonzero(keys > TOMBSTONE))
        self._filled += int(np.count_nonzero(keys))

    def update(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Set many entries at once, vectorized (a later duplicate key wins)."""
        keys = np.asarray(keys, dtype=np.uint64)
        values = np.asarray(values, dtype=np.uint32)
        if not len(keys):
            return
        _, last = np.unique(keys[::-1], return_index=True)  # the last of each key
        keep = len(keys) - 1 - last
        keys, values = keys[keep], values[keep]
        if not self._live:
            self._alloc(_capacity_for(len(keys)))
            self._fill(keys, values)
            return
        at = self.find_many(keys)
        present = at >= 0
        self._vals[at[present]] = values[present]
        keys, values = keys[~present], values[~present]
        if self._filled + len(keys) > _MAX_FILL * self._cap:
            self._rebuild(len(keys))
        self._place(keys, values)

    def insert_absent(self, keys: np.ndarray, values: np.ndarray) -> None:
        """`update` for distinct keys the caller knows are absent (a load's identifiers,
        after find_many): skips the duplicate and presence checks."""
        keys = np.asarray(keys, dtype=np.uint64)
        values = np.asarray(values, dtype=np.uint32)
        if not len(keys):
            return
        if self._filled + len(keys) > _MAX_FILL * self._cap:
            live = self._keys > TOMBSTONE  # a new table: the new keys go in with the rest
            keys = np.concatenate((self._keys[live], keys))
            values = np.concatenate((self._vals[live], values))
            self._alloc(_capacity_for(len(keys)))
            self._fill(keys, values)
            return
        self._place(keys, values)

    def insert_new(self, keys: np.ndarray, values: np.ndarray) -> bool:
        """`insert_absent` for keys the caller only expects to be distinct and absent: each
        placed with the check done as it is placed. False, with nothing changed that
        `update` would not change, when one is in the table already or comes twice (the
        caller then enters them one by one): the keys placed before that one was found stay
        placed, with their values."""
        keys = np.asarray(keys, dtype=np.uint64)
        values = np.asarray(values, dtype=np.uint32)
        if not len(keys):
            return True
        if not self._filled:  # an empty table: distinct keys go in in one pass
            ordered = np.sort(keys)
            if (ordered[1:] == ordered[:-1]).any():
                return False
            if len(keys) > _MAX_FILL * self._cap:
                self._alloc(_capacity_for(len(keys)))
            self._fill(keys, values)
            return True
        if self._filled != self._live:  # tombstones: a key may sit past a free slot
            if (self.find_many(keys) >= 0).any() or len(np.unique(keys)) < len(keys):
                return False
            self.insert_absent(keys, values)
            return True
        if self._filled + len(keys) > _MAX_FILL * self._cap:
            self._rebuild(len(keys))
        return self._place_checked(keys, values)

    def get_many(self, keys: np.ndarray) -> np.ndarray:
        """The value of each key, or -1 where it is absent (int64)."""
        at = self.find_many(keys)
        out = np.full(len(at), -1, dtype=np.int64)
        hit = at >= 0
        out[hit] = self._vals[at[hit]]
        return out

    def find_many(self, keys: np.ndarray) -> np.ndarray:
        """The slot of each key, or -1 where it is absent (all keys probed at once, _WINDOW
        slots a round: a batch's longest chain, not its average, sets the rounds)."""
        keys = np.asarray(keys, dtype=np.uint64)
        found = np.full(len(keys), -1, dtype=np.int64)
        table_keys, cap = self._keys, self._cap
        pos = self._homes(keys)
        waiting = np.arange(len(keys))
        while waiting.size:
            at = _wrap(pos[waiting, None] + _STEPS, cap)
            seen = table_keys[at]
            hit = seen == keys[waiting, None]
            end = hit | (seen == EMPTY)  # the key, or the end of its chain
            first = end.argmax(axis=1)
            rows = np.arange(len(waiting))
            done = end[rows, first]
            hits = done & hit[rows, first]
            found[waiting[hits]] = at[rows[hits], first[hits]]
            waiting = waiting[~done]
            pos[waiting] = _wrap(pos[waiting] + _WINDOW, cap)
        return found

    def _homes(self, keys: np.ndarray) -> np.ndarray:
        return self._homes_of_hashes(keys * np.uint64(_PHI))

    def _homes_of_hashes(self, hashes: np.ndarray) -> np.ndarray:
        """The home slot of each key whose hash (key * _PHI, wrapped) is given: its top half
        scaled to the capacity (the bottom half does not count)."""
        top = hashes >> np.uint64(32)
        return ((top * np.uint64(self._cap)) >> np.uint64(32)).astype(np.int64)

    def _rebuild(self, extra: int = 0) -> None:
        """Reallocate for the live entries (plus `extra` to come), dropping tombstones."""
        live = self._keys > TOMBSTONE
        keys, values = self._keys[live], self._vals[live]
        self._alloc(_capacity_for(len(keys) + extra))
        self._fill(keys, values)

    def _fill(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Insert distinct keys into the empty table in one pass (a rebuild at 2M entries
        would otherwise hold a load for a second). Taken in order of home slot, each key
        goes to its home or, if taken, the slot after the previous key's: the slots linear
        probing gives keys inserted in that order, all at once as a running maximum. Keys
        pushed past the last slot go through _place, which wraps them to the front.

        The order comes from one sort of uint64s: each key's hash, whose top half is what
        its home scales, with the key's index in the bottom half (keys of one home may go
        in any order). Sorted, they give the homes in order without a gather (a random
        read a key: at 10M keys, an argsort of the homes and the gather of them took
        ~2 s of a 4 s fill)."""
        # (An index fits the bottom half: the homes' arithmetic takes fewer than 2**32 slots.)
        packed = (keys * np.uint64(_PHI)) & np.uint64(_TOP)
        packed |= np.arange(len(keys), dtype=np.uint64)
        packed.sort()
        order = (packed & np.uint64(_LOW)).astype(np.int64)
        homes = self._homes_of_hashes(packed)
        steps = np.arange(len(keys))
        slots = np.maximum.accumulate(homes - steps) + steps
        inside = slots < self._cap
        taken = order[inside]
        self._keys[slots[inside]] = keys[taken]
        self._vals[slots[inside]] = values[taken]
        self._live += len(taken)
        self._filled += len(taken)
        if len(taken) < len(keys):
            self._place(keys[order[~inside]], values[order[~inside]])

    def _place(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Insert distinct keys, none of them in the table, all at once: each round, every
        key still waiting looks at its next _WINDOW slots for the first free one (empty, or
        a tombstone: the key is absent, so no later slot of its chain holds it), and one
        key wins each slot so chosen; the others go on from the slot after it. A key moves
        past a slot only once it is taken, which is linear probing's invariant. The keys
        choosing a slot are all written to it, and the one read back there wins (distinct
        keys: one each slot), which costs a pass where finding the winners by sorting the
        slots cost most of a round."""
        table_keys, table_vals, cap = self._keys, self._vals, self._cap
        pos = self._homes(keys)
        waiting = np.arange(len(keys))
        placed = np.zeros(len(keys), dtype=bool)
        while waiting.size:
            at = _wrap(pos[waiting, None] + _STEPS, cap)
            free = table_keys[at] <= TOMBSTONE
            first = free.argmax(axis=1)
            rows = np.arange(len(waiting))
            chosen = at[rows, first]
            has = free[rows, first]  # a free slot in the window
            slots, claimants = chosen[has], waiting[has]
            was_empty = table_keys[slots] == EMPTY
            table_keys[slots] = keys[claimants]
            won = table_keys[slots] == keys[claimants]
            self._filled += int(np.count_nonzero(was_empty & won))
            table_vals[slots[won]] = values[claimants[won]]
            placed[claimants[won]] = True
            pos[waiting] = _wrap(np.where(has, chosen + 1, pos[waiting] + _WINDOW), cap)
            waiting = waiting[~placed[waiting]]
        self._live += len(keys)


    def _place_checked(self, keys: np.ndarray, values: np.ndarray) -> bool:
        """_place for a table without tombstones, checking each key as it goes: a key's
        chain has no free slot before the key, so a key met in a window before the first
        empty slot is in the table already (or came twice in `keys`: its twin was placed
        first). Claimants of a slot write their index into it and the one read back wins,
        so twins cannot both win; a loser looks at the slot again next round. False as
        soon as a key is found present (the keys placed so far stay)."""
        table_keys, table_vals, cap = self._keys, self._vals, self._cap
        pos = self._homes(keys)
        waiting = np.arange(len(keys))
        index = waiting.astype(np.uint32)
        placed = np.zeros(len(keys), dtype=bool)
        while waiting.size:
            at = _wrap(pos[waiting, None] + _STEPS, cap)
            seen = table_keys[at]
            same = seen == keys[waiting, None]
            stop = same | (seen == EMPTY)
            first = stop.argmax(axis=1)
            rows = np.arange(len(waiting))
            hit = stop[rows, first]
            if (same[rows, first] & hit).any():
                return False
            chosen = at[rows, first]
            slots, claimants = chosen[hit], waiting[hit]
            table_vals[slots] = index[claimants]
            won = table_vals[slots] == index[claimants]
            slots, winners = slots[won], claimants[won]
            table_keys[slots] = keys[winners]
            table_vals[slots] = values[winners]
            self._filled += len(winners)
            self._live += len(winners)
            placed[winners] = True
            pos[waiting] = np.where(hit, chosen, _wrap(pos[waiting] + _WINDOW, cap))
            waiting = waiting[~placed[waiting]]
        return True


def _capacity_for(entries: int) -> int:
    """Slots for `entries`, _BUILT_FILL full (a multiple of _ROUND, at least _MIN_CAPACITY):
    room for ~27% more before the table grows again."""
    need = max(_MIN_CAPACITY, int(entries / _BUILT_FILL) + 1)
    return -(-need // _ROUND) * _ROUND


def _wrap(slots: np.ndarray, cap: int) -> np.ndarray:
    """Slot numbers below 2 * cap brought into the table (in place)."""
    slots[slots >= cap] -= cap
    return slots
