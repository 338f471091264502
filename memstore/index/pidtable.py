"""The primary ids of one shard's profiles, both ways (dense id -> id, id -> dense id).

A list of str by dense id and a dict back cost ~140 bytes a profile at a million profiles
(a 58-byte str object, the dict's ~31 bytes an entry, a 28-byte int object for its value,
the list slot). Here the ids' UTF-8 bytes lie in one numpy buffer, each dense id has one
uint64 (where its bytes start, with their length in the top 16 bits; 0: no profile), and
the way back is an IntTable from the id's 64-bit hash to its dense id: ~9 + 8 + 17-34
bytes a profile for ids like the bench's.

`PidTable` is the dense id -> id side (indexable like the list it replaces: None where
no profile is); `table.index` (PidIndex) is the read-only id -> dense id side, a mapping
like the dict it replaces. Writing a dense id's id (`table[dense] = pid`, or None) keeps
both sides in step, so the engine writes one place.

Invariants:
- The hash is Python's str hash (SipHash, keyed per process): nothing here is written to
  disk; snapshots store the ids as strings and loading builds the table again.
- A hit in the IntTable is confirmed against the stored bytes, so two ids with the same
  64-bit hash never answer for each other: the second one to be entered is kept in
  `_clash` (a dict, empty but for such a pair) and found there.
- As with the dict, entering an id held by another dense id points the id at the new
  one; clearing a dense id removes its id from the index only if the index points there.
- Bytes of an id that is cleared or replaced are zeroed at once (an erased id leaves no
  copy in the buffer) and counted dead; the buffer is compacted when the dead bytes
  outnumber the live ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import compress, repeat
from operator import is_not, ne
from typing import Any

import numpy as np

from memstore.index import mapped
from memstore.index.inttable import _PHI, EMPTY, IntTable

_LEN_SHIFT = 48
_START = (1 << _LEN_SHIFT) - 1
_M64 = (1 << 64) - 1
_MAX_BYTES = (1 << 16) - 1  # an id's length must fit 16 bits (MAX_ID_BYTES is 256)
_MIN_CAPACITY = 1024
_CHUNK = 65_536  # ids the index's items decode at a time


_hash = hash  # (tests swap in a hash with many clashes)


def _key(pid: str) -> int:
    """The IntTable key of `pid`: its hash as uint64, away from IntTable's two reserved
    keys (0: empty, 1: deleted)."""
    key = _hash(pid) & _M64
    return key if key > 1 else key + 2


def _keys(pids: Iterable[str], count: int) -> np.ndarray:
    keys = np.fromiter(map(_hash, pids), dtype=np.int64, count=count).view(np.uint64)
    keys[keys <= 1] += np.uint64(2)
    return keys


def _encode(pid: str) -> bytes:
    raw = pid.encode("utf-8", "surrogatepass")
    if len(raw) > _MAX_BYTES:
        raise ValueError(f"primary id of {len(raw)} bytes: at most {_MAX_BYTES}")
    return raw


class PidTable(mapped.DenseColumn):
    """dense id -> primary id (None: no profile), with `index`, its way back."""

    __slots__ = ("_buf", "_clash", "_dead", "_deferred", "_end", "_index", "index")

    def __init__(self, size: int = 0) -> None:
        super().__init__(size)
        # Byte 0 is never an id's: a location of 0 means no profile. An mmap, not numpy:
        # slicing one (to bytes) and decoding costs a third of what a memoryview's slice
        # does; numpy reads it through views. Its pages are its own (memstore.index.mapped):
        # grown by doubling, as capacity not written yet is never resident.
        self._buf = mapped.buffer(_MIN_CAPACITY * 16)
        self._end = 1
        self._dead = 0
        self._index = IntTable(size)  # (a snapshot being read: sized for its ids at once)
        self._clash: dict[str, int] = {}
        self._deferred: list[tuple[np.ndarray, np.ndarray]] | None = None  # (`loading`)
        self.index = PidIndex(self)

    # ------------------------------------------------------------------ reading
    def __getitem__(self, dense: int) -> str | None:
        if not 0 <= dense < self._n:
            dense = self._wrapped(dense)
        loc = self._lv[dense]
        if not loc:
            return None
        start = loc & _START
        return self._buf[start:start + (loc >> _LEN_SHIFT)].decode("utf-8", "surrogatepass")

    def take(self, dense: Sequence[int] | np.ndarray) -> list[str | None]:
        """The id of each dense id, at once: one gather of their bytes with a NUL after
        each (buffer byte 0), decoded and split in C; ~1.5 times a list's [pids[d] for d
        in dense]. (A NUL inside an id: its bytes decoded one id at a time.)"""
        dense = np.asarray(dense)
        if dense.dtype.kind not in "iu":
            dense = dense.astype(np.int64)
        count = len(dense)
        if not count:
            return []
        if int(dense.min()) < 0 or int(dense.max()) >= self._n:
            raise IndexError("dense id out of range")
        loc = self._loc[dense]
        # Byte positions as int32 while the buffer allows: half the index bytes to write
        # and read (the gather is most of the time).
        kind = np.int32 if self._end < 1 << 31 else np.int64
        lengths = (loc >> np.uint64(_LEN_SHIFT)).astype(kind)
        starts = (loc & np.uint64(_START)).astype(kind)
        spans = lengths + 1
        ends = np.cumsum(spans, dtype=np.int64)
        width = int(spans[0])
        if (spans == width).all():  # ids of one length (the usual case): a row each
            at = starts[:, None] + np.arange(width, dtype=kind)
            at[:, -1] = 0
            at = at.reshape(-1)
        else:
            at = np.repeat(starts - (ends - spans).astype(kind), spans)
            at += np.arange(int(ends[-1]), dtype=kind)
            at[ends - 1] = 0
        view = np.frombuffer(self._buf, dtype=np.uint8)
        raw = view.take(at[:-1]).tobytes()
        del view
        ids: list[Any] = raw.decode("utf-8", "surrogatepass").split("\0")
        if len(ids) != count:
            ids = [raw[stop - size - 1:stop - 1].decode("utf-8", "surrogatepass")
                   for stop, size in zip(ends.tolist(), lengths.tolist(), strict=True)]
        for i in np.flatnonzero(loc == 0).tolist():
            ids[i] = None
        return ids

    def dense_of(self, pid: str) -> int | None:
        """The dense id holding `pid`, or None. Every look-up by id comes here, so the
        IntTable's probe (IntTable._slot) is written out inline: a dict's get took ~0.1
        µs, and each Python call on the way costs about as much."""
        if self._clash:
            clashed = self._clash.get(pid)
            if clashed is not None:
                return clashed
        key = _hash(pid) & _M64  # (_key, inline)
        if key <= 1:
            key += 2
        index = self._index
        keys, cap = index._kv, index._cap
        i = ((((key * _PHI) & _M64) >> 32) * cap) >> 32
        while True:
            k = keys[i]
            if k == key:
                break
            if k == EMPTY:
                return None
            i += 1
            if i == cap:
                i = 0
        dense: int = index._vv[i]
        loc = self._lv[dense]
        start = loc & _START
        if self._buf[start:start + (loc >> _LEN_SHIFT)].decode("utf-8", "surrogatepass") != pid:
            return None  # another id with the same hash (this one would be in _clash)
        return dense

    def dense_many(self, pids: Sequence[str]) -> np.ndarray:
        """dense_of for many ids at once: int64, -1 where none holds it."""
        count = len(pids)
        if not count:
            return np.zeros(0, dtype=np.int64)
        found = self._index.get_many(_keys(pids, count))
        hits = np.flatnonzero(found >= 0)
        if len(hits):
            listed = hits.tolist()
            stored = self.take(found[hits])
            wanted = list(map(pids.__getitem__, listed))
            if stored != wanted:
                wrong = np.array(list(map(ne, stored, wanted)), dtype=bool)
                found[hits[wrong]] = -1
        if self._clash:
            for i, dense in enumerate(map(self._clash.get, pids)):
                if dense is not None:
                    found[i] = dense
        return found

    def _holds(self, dense: int, pid: str) -> bool:
        loc = self._lv[dense]
        if not loc:
            return False
        raw = pid.encode("utf-8", "surrogatepass")
        start = loc & _START
        return (loc >> _LEN_SHIFT) == len(raw) and self._buf[start:start + len(raw)] == raw

    # ------------------------------------------------------------------ writing
    def __setitem__(self, dense: int, pid: str | None) -> None:
        if not 0 <= dense < self._n:
            raise IndexError("dense id out of range")
        loc = self._lv[dense]
        if loc:
            if pid is not None and self._holds(dense, pid):
                self._enter(pid, dense)  # (the index may point elsewhere: as dict did)
                return
            self._clear(dense, loc)
        if pid is None:
            return
        raw = _encode(pid)
        start = self._append(raw)
        self._lv[dense] = start | (len(raw) << _LEN_SHIFT)
        self._enter(pid, dense)

    def extend(self, pids: Sequence[str | None]) -> None:
        """Append dense ids holding `pids` (None: no profile)."""
        first = self._n
        self.grow(first + len(pids))
        self.put_many(range(first, first + len(pids)), pids)

    def put_many(self, ids: Iterable[int], pids: Sequence[str | None]) -> None:
        """`self[d] = pid` for each pair, vectorized where the dense ids hold nothing yet
        (a load, a snapshot being read): their bytes appended in one copy, their keys
        entered in the IntTable at once."""
        run = isinstance(ids, range)  # a snapshot's rows, a load's new ids: distinct
        if isinstance(ids, range):
            dense = np.arange(ids.start, ids.stop, ids.step, dtype=np.int64)
        else:
            dense = np.fromiter(ids, dtype=np.int64, count=len(pids))
        if not len(dense):
            return
        if int(dense.min()) < 0 or int(dense.max()) >= self._n:
            raise IndexError("dense id out of range")
        given = np.fromiter(map(is_not, pids, repeat(None)), dtype=bool, count=len(pids))
        taken = self._loc[dense] != 0
        if taken.any() or (not run and len(np.unique(dense)) < len(dense)):
            self._index_deferred()
            for d, pid in zip(dense.tolist(), pids, strict=True):
                self[d] = pid
            return
        if not given.all():
            dense = dense[given]
            pids = list(compress(pids, given))  # type: ignore[arg-type]
        count = len(pids)
        if not count:
            return
        joined = "".join(pids)  # type: ignore[arg-type]
        if joined.isascii():  # an id's bytes are its characters
            raw = joined.encode("ascii")
            lengths = np.fromiter(map(len, pids), dtype=np.int64, count=count)  # type: ignore[arg-type]
        else:
            encoded = list(map(_encode, pids))  # type: ignore[arg-type]
            raw = b"".join(encoded)
            lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=count)
        if int(lengths.max()) > _MAX_BYTES:
            raise ValueError(f"a primary id longer than {_MAX_BYTES} bytes")
        start = self._append(raw)
        offsets = np.cumsum(lengths) - lengths + start
        self._loc[dense] = offsets.astype(np.uint64) | (lengths.astype(np.uint64)
                                                        << np.uint64(_LEN_SHIFT))
        keys = _keys(pids, count)  # type: ignore[arg-type]
        if self._deferred is not None:
            self._deferred.append((keys, dense))
        elif not self._index.insert_new(keys, dense.astype(np.uint32)):  # (checked)
            for d, pid in zip(dense.tolist(), pids, strict=True):  # dict semantics
                self._enter(pid, d)  # type: ignore[arg-type]

    @contextmanager
    def loading(self) -> Iterator[None]:
        """Many `put_many` calls of new ids (a snapshot being read, a log's loads replayed):
        their ids enter the index together at the end, in one pass (the chunks' own inserts
        cost ~0.6 s at 1M ids, one pass into an empty table ~0.25). Until then only
        `put_many` and `extend` may be called."""
        self._deferred = []
        try:
            yield
        finally:
            self._index_deferred()
            self._deferred = None

    def _index_deferred(self) -> None:
        """Enter the ids `put_many` held back (`loading`)."""
        if not self._deferred:
            return
        keys = np.concatenate([keys for keys, _ in self._deferred])
        dense = np.concatenate([dense for _, dense in self._deferred])
        self._deferred.clear()
        if not self._index.insert_new(keys, dense.astype(np.uint32)):
            for d in dense.tolist():  # two ids with one hash, or one id twice: one by one
                self._enter(self[d], d)  # type: ignore[arg-type]

    def _enter(self, pid: str, dense: int) -> None:
        """Index `pid` -> `dense` (the id's bytes are stored at `dense` already)."""
        if self._clash and pid in self._clash:
            self._clash[pid] = dense
            return
        key = _key(pid)
        held = self._index.get(key)
        if held is None or held == dense or self._holds(held, pid):
            self._index[key] = dense
        else:  # another id with the same hash holds the key
            self._clash[pid] = dense

    def _clear(self, dense: int, loc: int) -> None:
        """Forget the id stored at `dense`: out of the index (if it points here), its bytes
        zeroed and counted dead."""
        start, length = loc & _START, loc >> _LEN_SHIFT
        pid = self._buf[start:start + length].decode("utf-8", "surrogatepass")
        if self._clash and self._clash.get(pid) == dense:
            del self._clash[pid]
        else:
            key = _key(pid)
            if self._index.get(key) == dense:
                del self._index[key]
        self._buf[start:start + length] = bytes(length)
        self._lv[dense] = 0
        self._dead += length
        if self._dead > max(1 << 20, self._end - self._dead):
            self._compact()

    def _append(self, raw: bytes) -> int:
        start, end = self._end, self._end + len(raw)
        if end > len(self._buf):
            bigger = mapped.buffer(max(end, 2 * len(self._buf)))
            bigger[:start] = self._buf[:start]
            self._buf = bigger  # (the old one is unmapped once no view holds it)
        self._buf[start:end] = raw
        self._end = end
        return start

    def _compact(self) -> None:
        """Copy the live ids' bytes to a new buffer, in dense id order (no index change:
        dense ids stay)."""
        held = np.flatnonzero(self._loc[:self._n])
        loc = self._loc[held]
        lengths = (loc >> np.uint64(_LEN_SHIFT)).astype(np.int64)
        starts = (loc & np.uint64(_START)).astype(np.int64)
        total = int(lengths.sum())
        ends = np.cumsum(lengths)
        within = np.arange(total, dtype=np.int64) - np.repeat(ends - lengths, lengths)
        view = np.frombuffer(self._buf, dtype=np.uint8)
        kept = view.take(np.repeat(starts, lengths) + within).tobytes()
        del view
        fresh = mapped.buffer(2 * (1 + total))
        fresh[1:1 + total] = kept
        self._loc[held] = (1 + ends - lengths).astype(np.uint64) | (
            lengths.astype(np.uint64) << np.uint64(_LEN_SHIFT))
        self._buf, self._end, self._dead = fresh, 1 + total, 0

    @property
    def nbytes(self) -> int:
        """Bytes held: the ids' bytes, the locations (allocated: written or not) and the
        index."""
        return int(self._end + self._loc.nbytes + self._index.nbytes)


class PidIndex:
    """primary id -> dense id: the read side of a PidTable, as a mapping (a dict's reading
    methods). Written through the table (`table[dense] = pid`)."""

    __slots__ = ("_table",)

    def __init__(self, table: PidTable) -> None:
        self._table = table

    def get(self, pid: str, default: Any = None) -> Any:
        dense = self._table.dense_of(pid)
        return default if dense is None else dense

    def __contains__(self, pid: object) -> bool:
        return isinstance(pid, str) and self._table.dense_of(pid) is not None

    def __getitem__(self, pid: str) -> int:
        dense = self._table.dense_of(pid)
        if dense is None:
            raise KeyError(pid)
        return dense

    def many(self, pids: Sequence[str]) -> np.ndarray:
        """The dense id of each id, -1 where none holds it (int64), vectorized."""
        return self._table.dense_many(pids)

    def __len__(self) -> int:
        table = self._table
        return len(table._index) + len(table._clash)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PidIndex | Mapping):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PidIndex({dict(self.items())!r})"

    def items(self) -> Iterator[tuple[str, int]]:
        """(id, dense id) of every id the index points at, by dense id."""
        table = self._table
        held = np.flatnonzero(table._loc[:table._n])
        for start in range(0, len(held), _CHUNK):
            part = held[start:start + _CHUNK]
            pids = table.take(part)
            found = table.dense_many(pids)  # type: ignore[arg-type]
            for pid, dense, at in zip(pids, part.tolist(), found.tolist(), strict=True):
                if dense == at:
                    yield pid, dense  # type: ignore[misc]

    def __iter__(self) -> Iterator[str]:
        return (pid for pid, _ in self.items())

    def keys(self) -> Iterator[str]:
        return iter(self)

    def values(self) -> Iterator[int]:
        return (dense for _, dense in self.items())
