"""How a shard process's heap gives memory back to the operating system.

Queries: a count over a window or a range makes numpy temporaries of several MB (at
473k ids a shard, ~12 MB for a cold `did(..., at_least=3)`) and frees them at its end.
glibc's defaults hand such memory back as soon as twice the largest block freed sits
free at the heap's top, so the next such query faults its pages in again: ~900 page
faults, 5.3 ms a count where 2.75 ms is the counting. `keep_scratch_memory` (called once
as a shard process starts) lets the heap keep up to SCRATCH_BYTES free for the next query.

Loads: a load request makes many short-lived objects (a batch's columns, pieces and arrays).
Python frees them, but glibc's malloc keeps the freed pages for reuse unless they sit at
the top of its heap, so a shard's resident memory after a load stays above what its
profiles and indexes hold: at 1M profiles, 4,000 a request, ~15-30 bytes a profile more.
`malloc_trim(0)` returns every whole free page; on a 1M-profile heap it takes ~1 ms.
Where the C library has no malloc_trim (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_libc_name = ctypes.util.find_library("c")
_libc = ctypes.CDLL(_libc_name) if _libc_name else None
_trim = getattr(_libc, "malloc_trim", None)
if _trim is not None:
    _trim.argtypes = [ctypes.c_size_t]
    _trim.restype = ctypes.c_int
_mallopt = getattr(_libc, "mallopt", None)
if _mallopt is not None:
    _mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _mallopt.restype = ctypes.c_int

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
SCRATCH_BYTES = 64 << 20  # free heap kept for the next query's temporaries
_MMAP_FROM = 32 << 20  # blocks at least this big are mapped apart (glibc's largest)


def keep_scratch_memory() -> bool:
    """Keep up to SCRATCH_BYTES of freed memory in the heap, and take blocks under 32 MiB
    from it rather than from fresh mappings: query temporaries reuse pages already
    faulted in. (glibc otherwise moves both thresholds with the largest block freed.)
    What a bulk load leaves still goes back, through LoadTrimmer. Whether it was set."""
    if _mallopt is None:
        return False
    return bool(_mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM)) \
        and bool(_mallopt(_M_TRIM_THRESHOLD, SCRATCH_BYTES))


def release_free_heap() -> bool:
    """Return the heap's whole free pages to the OS; whether anything was released."""
    return bool(_trim(0)) if _trim is not None else False


class LoadTrimmer:
    """A service's bulk-load calls in flight. When the last one ends and at least EVERY
    profiles came in since the heap was last trimmed, the freed heap goes back to the OS:
    at the end of a load, not between its calls (~1 ms a trim at 1M profiles)."""

    EVERY = 50_000

    def __init__(self) -> None:
        self.in_flight = 0
        self.since = 0  # profiles loaded since the last trim

    def begin(self) -> None:
        self.in_flight += 1

    def end(self, profiles: int) -> None:
        """A call ended, having loaded `profiles` (0 if it failed)."""
        self.in_flight -= 1
        self.since += profiles
        if self.in_flight == 0 and self.since >= self.EVERY:
            self.since = 0
            release_free_heap()
