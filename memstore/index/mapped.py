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
