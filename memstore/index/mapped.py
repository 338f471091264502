"""Arrays and byte buffers with pages of their own (anonymous mmap), outside malloc's heap.

A shard's long-lived tables (the identifier directory, the primary-id table) grow by
reallocation to tens of MB each. From the heap, each replaced copy leaves a hole that the
small long-lived blocks placed around it (roaring containers) keep from going back to the
system, and whether a block comes from the heap at all depends on glibc's mmap threshold,
which a shard sets for its queries' scratch memory (memstore.server.heap). Mapped apart,
a table's old copy is unmapped when it is dropped, and capacity not written yet is never
resident. At the bench's 1M profiles, with glibc's moving threshold, the heap held ~110
bytes a profile more when these tables came from it.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from typing import Any

import numpy as np

_PAGE = mmap.PAGESIZE


def zeros(count: int, dtype: Any) -> np.ndarray:
    """A zeroed numpy array of `count` items on pages of its own (unmapped when the array
    and every view of it are gone)."""
    dtype = np.dtype(dtype)
    size = count * dtype.itemsize
    return np.frombuffer(buffer(size), dtype=dtype, count=count)


def buffer(size: int) -> mmap.mmap:
    """A zeroed, writable byte buffer of at least `size` bytes (whole pages). Private, as
    heap memory is: a forked snapshot writer (memstore.storage.forked) keeps the pages as
    they were at the fork (copy on write), where a shared mapping would show it the
    parent's later writes."""
    return mmap.mmap(-1, max(_PAGE, -(-size // _PAGE) * _PAGE), flags=mmap.MAP_PRIVATE)


class DenseColumn:
    """A column by dense id kept in mapped memory (PidTable, BlobTable), read like the list
    it replaces: len, iteration (a chunk of `take` at a time), equality with a list, repr.
    Subclasses keep their length in `_n` and give `take(dense ids) -> list`."""

    __slots__ = ("_loc", "_lv", "_n")
    _CHUNK = 65_536  # items an iteration takes at a time

    _n: int  # dense ids held
    _loc: np.ndarray  # a uint64 location a dense id (0: none)
    _lv: memoryview  # _loc's memoryview, for reading one location

    def __init__(self, size: int = 0) -> None:
        """`size` dense ids, none holding an item; room for at least 1,024."""
        self._loc = zeros(max(1024, size), np.uint64)
        self._lv = memoryview(self._loc)  # type: ignore[arg-type]
        self._n = size

    def take(self, dense: Any) -> list[Any]:
        raise NotImplementedError

    def grow(self, size: int) -> None:
        """Make room for dense ids below `size` (None: no item)."""
        if size > self._n:
            if size > len(self._loc):
                bigger = zeros(max(size, 2 * len(self._loc)), np.uint64)
                bigger[:self._n] = self._loc[:self._n]
                self._loc, self._lv = bigger, memoryview(bigger)  # type: ignore[arg-type]
            self._n = size

    def _wrapped(self, dense: int) -> int:
        """A dense id out of [0, len) as a list's index: from the end if negative."""
        if dense < 0 and dense + self._n >= 0:
            return dense + self._n
        raise IndexError("dense id out of range")

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, self._n, self._CHUNK):
            yield from self.take(np.arange(start, min(start + self._CHUNK, self._n)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DenseColumn | list | tuple):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r})"
