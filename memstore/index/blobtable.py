"""Profile blobs by dense id, in segments of pages of their own (log-structured memory).

A list of bytes objects cost ~45 bytes a profile beyond the blobs' own (a 33-byte object
header, the list's slot, malloc's rounding), and a load's blobs, allocated among its
temporaries, kept the heap's pages from going back to the system. Here the bytes of a
blob lie in one of a set of segments (memstore.index.mapped buffers of 16 MiB), and each
dense id has one uint64: where they start (segment << 24 | offset, the low 40 bits) and
their length (the top 24 bits); 0: no profile. It is RAMCloud's log-structured memory
(Rumble et al., FAST '14) in its simplest form:

- Writing a dense id's blob appends its bytes to the newest segment. The bytes it
  replaces are zeroed at once (an erased profile leaves no copy in memory) and counted
  dead in their segment.
- A segment other than the newest whose live bytes fall to half of what it holds (or
  less) at a release is cleaned: its live blobs are appended anew and its pages unmapped.
  So the segments hold about twice the live bytes at most; cleaning moves at most half a
  segment (and scans the locations once, 8 bytes a profile), so no write waits for more.
- A blob of 1 MiB or more is kept as a bytes object in a dict (its length field all ones).

Readers get bytes, a copy: callers keep blobs across later writes (undo images, log
records). The pages are private mappings, so a forked snapshot writer
(memstore.storage.forked) sees the blobs as they were at the fork.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Sequence
from itertools import compress, repeat
from operator import getitem, is_not
from typing import Any

import numpy as np

from memstore.index import mapped

_OFFSET_BITS = 24  # a segment is at most 16 MiB
_LEN_SHIFT = 40  # a location: start (segment << 24 | offset) in the low 40 bits
_START = (1 << _LEN_SHIFT) - 1
_BIG = (1 << 24) - 1  # length field of a blob kept in the dict
_ZEROS = memoryview(bytes(1 << 20))


def join_blobs(blobs: Sequence[bytes]) -> tuple[bytes, np.ndarray]:
    """Blobs as one bytes object and each one's length (int64): the form put_joined takes
    and a log's image columns hold. TypeError if one is None."""
    lengths = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
    return b"".join(blobs), lengths


class BlobTable(mapped.DenseColumn):
    """dense id -> profile blob (None: no profile), indexable like the list it replaces."""

    __slots__ = ("_active", "_big", "_big_bytes", "_fill", "_free", "_live",
                 "_segment_bytes", "_segs")

    def __init__(self, size: int = 0, segment_bytes: int = 1 << _OFFSET_BITS,
                 big_bytes: int = 1 << 20) -> None:
        if not 0 < big_bytes <= min(segment_bytes, len(_ZEROS)) <= 1 << _OFFSET_BITS:
            raise ValueError("a big blob must fit a segment, and a segment 16 MiB")
        self._segment_bytes, self._big_bytes = segment_bytes, big_bytes
        super().__init__(size)
        # Segment 0 is never one: a start of 0 is no profile, or a blob in `_big` (b"":
        # take slices it for them). A cleaned segment's place is None until it is reused.
        self._segs: list[mmap.mmap | bytes | None] = [b""]
        self._fill = [0]  # bytes written into each segment
        self._live = [0]  # bytes of each segment still some dense id's
        self._free: list[int] = []  # unmapped segments' numbers, for new ones
        self._active = 0  # the segment blobs are appended to (0: none yet)
        self._big: dict[int, bytes] = {}

    # ------------------------------------------------------------------ reading
    def __getitem__(self, dense: int) -> bytes | None:
        if not 0 <= dense < self._n:
            dense = self._wrapped(dense)
        loc = self._lv[dense]
        if not loc:
            return None
        length = loc >> _LEN_SHIFT
        if length == _BIG:
            return self._big[dense]
        start = loc & _START
        offset = start & 0xFFFFFF
        return self._segs[start >> _OFFSET_BITS][offset:offset + length]  # type: ignore[index]

    def take(self, dense: Iterable[int] | np.ndarray) -> list[bytes | None]:
        """The blob of each dense id, at once: the locations taken apart in numpy and each
        blob sliced in C (~half a read's cost through self[d])."""
        dense = np.fromiter(dense, dtype=np.int64) if not isinstance(dense, np.ndarray) \
            else dense.astype(np.int64, copy=False)
        if not len(dense):
            return []
        if int(dense.min()) < 0 or int(dense.max()) >= self._n:
            raise IndexError("dense id out of range")
        loc = self._loc[dense]
        lengths = loc >> np.uint64(_LEN_SHIFT)
        starts = loc & np.uint64(_START)
        offsets = (starts & np.uint64(0xFFFFFF)).astype(np.int64)
        big = lengths == np.uint64(_BIG)
        odd = np.flatnonzero(big | (loc == 0))
        if len(odd):  # segment 0 is b"": no profile, or a big blob, patched below
            starts[odd] = offsets[odd] = lengths[odd] = 0
        blobs: list[Any] = list(map(getitem, map(self._segs.__getitem__,  # type: ignore[arg-type]
                                                 (starts >> np.uint64(_OFFSET_BITS)).tolist()),
                                    map(slice, offsets.tolist(),
                                        (offsets + lengths.astype(np.int64)).tolist())))
        for i in odd.tolist():
            blobs[i] = self._big[int(dense[i])] if big[i] else None
        return blobs

    def joined(self, dense: Sequence[int] | np.ndarray) -> tuple[bytes, np.ndarray]:
        """The blobs of live dense ids joined, and each one's length (uint32): what a
        snapshot's rows hold (put_joined reads them back). Blobs lying one after another
        in a segment (a load's, in dense id order) are copied as one slice."""
        dense = np.asarray(dense, dtype=np.int64)
        loc = self._loc[dense]
        if not len(loc):
            return b"", np.zeros(0, dtype=np.uint32)
        if not loc.all():
            raise ValueError("a dense id without a profile")
        lengths = loc >> np.uint64(_LEN_SHIFT)
        if (lengths == np.uint64(_BIG)).any():
            joined, lengths = join_blobs(self.take(dense))  # type: ignore[arg-type]
            return joined, lengths.astype(np.uint32)
        starts = (loc & np.uint64(_START)).astype(np.int64)
        ends = starts + lengths.astype(np.int64)
        # A run breaks where a blob does not start where the one before ended, or in
        # another segment (one may start at the very end of the segment before).
        breaks = np.flatnonzero((starts[1:] != ends[:-1])
                                | ((starts[1:] >> _OFFSET_BITS) != (starts[:-1] >> _OFFSET_BITS))) + 1
        firsts = starts[np.concatenate(([0], breaks))].tolist()
        lasts = ends[np.concatenate((breaks - 1, [len(loc) - 1]))].tolist()
        segs = self._segs
        pieces = [segs[first >> _OFFSET_BITS][first & 0xFFFFFF:  # type: ignore[index]
                                              (first & 0xFFFFFF) + last - first]
                  for first, last in zip(firsts, lasts, strict=True)]
        return b"".join(pieces), lengths.astype(np.uint32)

    @property
    def nbytes(self) -> int:
        """Bytes held: the segments as written (dead bytes included), the big blobs and the
        locations (allocated: written or not)."""
        return sum(self._fill) + sum(map(len, self._big.values())) + int(self._loc.nbytes)

    @property
    def dead_bytes(self) -> int:
        """Bytes of the segments no dense id holds any more (zeroed; freed by cleaning)."""
        return sum(self._fill) - sum(self._live)

    # ------------------------------------------------------------------ writing
    def __setitem__(self, dense: int, blob: bytes | None) -> None:
        if not 0 <= dense < self._n:
            raise IndexError("dense id out of range")
        old = self._lv[dense]
        if old and (old >> _LEN_SHIFT) == _BIG:
            del self._big[dense]
        self._lv[dense] = 0 if blob is None else self._place(dense, blob)
        if old and (old >> _LEN_SHIFT) != _BIG:
            self._release(old)

    def extend(self, blobs: Iterable[bytes | None]) -> None:
        """Append dense ids holding `blobs` (None: no profile)."""
        blobs = blobs if isinstance(blobs, list | tuple) else list(blobs)
        first = self._n
        self.grow(first + len(blobs))
        self.put_many(range(first, first + len(blobs)), blobs)

    def put_many(self, ids: Iterable[int], blobs: Sequence[bytes | None]) -> None:
        """`self[d] = blob` for each pair (a dense id given twice: its last pair). The
        blobs are joined and copied into segments a segment at a time; the bytes they
        replace are released together, each segment's cleaning decided once."""
        dense = self._dense_ids(ids, len(blobs))
        if dense is None:
            for d, blob in zip(ids, blobs, strict=True):  # in order: the last pair wins
                self[d] = blob
            return
        try:  # (one pass over the blobs: a None has no len)
            lengths = np.fromiter(map(len, blobs), dtype=np.int64,  # type: ignore[arg-type]
                                  count=len(blobs))
        except TypeError:
            given = np.fromiter(map(is_not, blobs, repeat(None)), dtype=bool, count=len(blobs))
            for d in dense[~given].tolist():
                self[d] = None
            dense = dense[given]
            blobs = list(compress(blobs, given))
            lengths = np.fromiter(map(len, blobs), dtype=np.int64,  # type: ignore[arg-type]
                                  count=len(blobs))
        self._put(dense, blobs, lengths, None)  # type: ignore[arg-type]

    def put_joined(self, ids: Iterable[int], joined: bytes, lengths: np.ndarray) -> None:
        """put_many of blobs given joined, with each one's length (a snapshot's rows)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(joined) or (len(lengths) and int(lengths.min()) < 0):
            raise ValueError(f"{len(lengths)} blob lengths summing to {int(lengths.sum())}"
                             f" for {len(joined)} bytes")
        dense = self._dense_ids(ids, len(lengths))
        if dense is None:
            ends = np.cumsum(lengths).tolist()
            self.put_many(ids, [joined[end - size:end] for end, size
                                in zip(ends, lengths.tolist(), strict=True)])
            return
        self._put(dense, None, lengths, joined)

    def _dense_ids(self, ids: Iterable[int], count: int) -> np.ndarray | None:
        """`ids` as int64, checked in range; None if one is given twice (a range never)."""
        if isinstance(ids, range):
            dense = np.arange(ids.start, ids.stop, ids.step, dtype=np.int64)
        elif isinstance(ids, np.ndarray):
            dense = ids.astype(np.int64)
        else:
            dense = np.fromiter(ids, dtype=np.int64, count=count)
        if len(dense) != count:
            raise ValueError(f"{len(dense)} dense ids for {count} blobs")
        if len(dense) and (int(dense.min()) < 0 or int(dense.max()) >= self._n):
            raise IndexError("dense id out of range")
        if not isinstance(ids, range) and len(np.unique(dense)) < len(dense):
            return None
        return dense

    def _put(self, dense: np.ndarray, blobs: Sequence[bytes] | None, lengths: np.ndarray,
             joined: bytes | None) -> None:
        """Store distinct dense ids' blobs (given as a list, or joined)."""
        if not len(dense):
            return
        old = self._loc[dense]
        if (int(lengths.max()) >= self._big_bytes
                or (old >> np.uint64(_LEN_SHIFT) == np.uint64(_BIG)).any()):
            if blobs is None:
                assert joined is not None
                ends = np.cumsum(lengths).tolist()
                blobs = [joined[end - size:end] for end, size
                         in zip(ends, lengths.tolist(), strict=True)]
            for d, blob in zip(dense.tolist(), blobs, strict=True):
                self[d] = blob
            return
        self._loc[dense] = self._append_joined(
            b"".join(blobs) if joined is None else joined, lengths)  # type: ignore[arg-type]
        old = old[old != 0]
        if len(old):
            self._release_many(old)

    def _place(self, dense: int, blob: bytes) -> int:
        """Store `blob` for `dense` (whose location is about to be set): its location."""
        length = len(blob)
        if length >= self._big_bytes:
            self._big[dense] = bytes(blob)
            return _BIG << _LEN_SHIFT
        seg = self._active
        if not seg or self._fill[seg] + length > self._segment_bytes:
            seg = self._new_segment()
        offset = self._fill[seg]
        self._segs[seg][offset:offset + length] = blob  # type: ignore[index]
        self._fill[seg] = offset + length
        self._live[seg] += length
        return (seg << _OFFSET_BITS | offset) | (length << _LEN_SHIFT)

    def _append_joined(self, joined: bytes, lengths: np.ndarray) -> np.ndarray:
        """Append blobs given joined, each shorter than a big one: their locations."""
        ends = np.cumsum(lengths)
        starts = ends - lengths
        locations = np.empty(len(lengths), dtype=np.uint64)
        view = memoryview(joined)
        i, count = 0, len(lengths)
        while i < count:
            seg = self._active
            room = self._segment_bytes - self._fill[seg] if seg else 0
            if room < lengths[i]:
                seg = self._new_segment()
                room = self._segment_bytes
            base = int(starts[i])
            j = int(np.searchsorted(ends, base + room, side="right"))  # i..j-1 fit
            size = int(ends[j - 1]) - base
            offset = self._fill[seg]
            buffer = self._segs[seg]
            assert isinstance(buffer, mmap.mmap)
            if size >= 1 << 20:  # fault the pages in at once, not one at a time (~30% less)
                _populate(buffer, offset, size)
            buffer[offset:offset + size] = view[base:base + size]
            locations[i:j] = ((starts[i:j] - base + (seg << _OFFSET_BITS | offset)).astype(np.uint64)
                              | (lengths[i:j].astype(np.uint64) << np.uint64(_LEN_SHIFT)))
            self._fill[seg] = offset + size
            self._live[seg] += size
            i = j
        return locations

    def _new_segment(self) -> int:
        buffer = mapped.buffer(self._segment_bytes)
        if self._free:
            seg = self._free.pop()
            self._segs[seg] = buffer
        else:
            seg = len(self._segs)
            if seg >= 1 << (_LEN_SHIFT - _OFFSET_BITS):
                raise MemoryError("profile blobs fill every segment (1 TiB)")
            self._segs.append(buffer)
            self._fill.append(0)
            self._live.append(0)
        self._active = seg
        return seg

    def _release(self, loc: int) -> None:
        """The bytes at `loc` are no dense id's any more: zeroed, counted dead, and their
        segment cleaned if half of it is dead."""
        length, start = loc >> _LEN_SHIFT, loc & _START
        seg, offset = start >> _OFFSET_BITS, start & 0xFFFFFF
        self._segs[seg][offset:offset + length] = _ZEROS[:length]  # type: ignore[index]
        self._live[seg] -= length
        if seg != self._active and 2 * self._live[seg] <= self._fill[seg]:
            self._clean(seg)

    def _release_many(self, loc: np.ndarray) -> None:
        """_release of many locations (none big)."""
        lengths = (loc >> np.uint64(_LEN_SHIFT)).astype(np.int64)
        starts = loc & np.uint64(_START)
        segs = (starts >> np.uint64(_OFFSET_BITS)).astype(np.int64)
        offsets = (starts & np.uint64(0xFFFFFF)).astype(np.int64)
        buffers = self._segs
        for seg, offset, length in zip(segs.tolist(), offsets.tolist(), lengths.tolist(),
                                       strict=True):
            buffers[seg][offset:offset + length] = _ZEROS[:length]  # type: ignore[index]
        freed = np.bincount(segs, weights=lengths)
        touched = np.flatnonzero(freed).tolist()
        for seg in touched:
            self._live[seg] -= int(freed[seg])
        for seg in touched:  # (after all are counted; a cleaning may take a freed number)
            if (seg != self._active and self._segs[seg] is not None
                    and 2 * self._live[seg] <= self._fill[seg]):
                self._clean(seg)

    def _clean(self, seg: int) -> None:
        """Move the live blobs of segment `seg` to the newest one and unmap it."""
        buffer = self._segs[seg]
        assert isinstance(buffer, mmap.mmap)
        live = self._live[seg]
        if live:
            locations = self._loc[:self._n]
            held = np.flatnonzero(((locations & np.uint64(_START)) >> np.uint64(_OFFSET_BITS))
                                  == np.uint64(seg))
            loc = locations[held]
            del locations
            lengths = (loc >> np.uint64(_LEN_SHIFT)).astype(np.int64)
            offsets = (loc & np.uint64(0xFFFFFF)).astype(np.int64)
            joined = b"".join(map(buffer.__getitem__, map(slice, offsets.tolist(),
                                                          (offsets + lengths).tolist())))
        # Freed before the live blobs are appended: the newest segment may take its number.
        self._segs[seg] = None
        self._free.append(seg)
        self._fill[seg] = self._live[seg] = 0
        if live:
            self._loc[held] = self._append_joined(joined, lengths)
        buffer.close()


_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14


def _populate(buffer: mmap.mmap, offset: int, size: int) -> None:
    """Fault in the pages of buffer[offset:offset + size] for writing, if the kernel can."""
    start = offset - offset % mmap.PAGESIZE
    try:
        buffer.madvise(_MADV_POPULATE_WRITE, start, offset + size - start)
    except (OSError, ValueError, AttributeError):  # older kernels, other systems
        pass
