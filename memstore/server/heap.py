"""How a shard process's heap takes memory from the operating system and gives it back.

glibc's defaults move two thresholds with the largest block freed: blocks above the mmap
threshold get mappings of their own (returned when freed), and free memory above the trim
threshold at the heap's top goes back. Those suit a shard's recovery and nothing it does
after, so a shard process (`manage_heap`, as it starts) keeps them until it has recovered
and then switches between two settings of its own; and it allocates from one arena:

- One arena, throughout. glibc gives each thread that allocates an arena of its own, and
  `malloc_trim` never gives back the free memory at the top of a thread's arena: the
  thread that enters a recovery's identifier keys (Engine.adding_loads) left ~38 MB
  resident there after a 1M-profile log (405-450 bytes a profile against ~366). In one
  arena the same memory goes back with the rest; threads share its lock, their small
  blocks coming from per-thread caches as before.
- Recovering: glibc's thresholds. A replay's column arrays of a few MB (a run of 262,144
  profiles) come from the heap once the first is freed, and their pages are used again by
  the next run's. Mapped apart from 1 MiB (the loading setting), every run's arrays were
  faulted in page by page: a 1M-profile log replayed in ~2.1 s in process against ~1.6
  (served: 2.5-2.97 s against 1.7-1.85; bench/RESULTS.md).
- Loading (while bulk loads are in flight): blocks from 1 MiB up are mapped
  apart. A load's multi-MB temporaries then never sit in the heap between long-lived
  profiles, where their pages would stay resident; measured at 1M profiles, 447 bytes a
  profile after a load against ~530 with the query setting. When the last load call
  ends, `malloc_trim(0)` (LoadTrimmer) returns every whole free page the load's small
  objects left (~15-30 bytes a profile at 1M; ~1 ms).
- Serving queries (`heap_for_queries`): blocks under 32 MiB come from the heap and up to
  SCRATCH_BYTES of free memory stays there. A count over a window or a range makes numpy
  temporaries of several MB (~12 MB for a cold `did(..., at_least=3)` on 473k ids) and
  frees them at its end; under the defaults they went back and the next such query
  faulted ~900 pages in again: 5.3 ms a count where 2.75 ms is the counting.

Where the C library has no mallopt or malloc_trim (musl, macOS) this does nothing; a
process that never called `manage_heap` (a test running a server in process) keeps
glibc's defaults.
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

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h
SCRATCH_BYTES = 64 << 20  # free heap kept for the next query's temporaries
_QUERY_MMAP_FROM = 32 << 20  # serving: blocks this big are mapped apart (glibc's largest)
_LOAD_MMAP_FROM = 1 << 20  # loading: a load's temporaries this big are mapped apart
_LOAD_TRIM_FROM = 128 << 10  # loading: glibc's default top pad to give back
_managed = False


def manage_heap() -> bool:
    """Take charge of this process's heap settings (a shard process, as it starts, before
    it starts a thread): one arena, and until `heap_for_queries` (its recovery) glibc's
    thresholds. Whether the C library lets it."""
    global _managed
    _managed = _mallopt is not None and bool(_mallopt(_M_ARENA_MAX, 1))
    return _managed


def heap_for_loads() -> bool:
    """The loading setting, if this process manages its heap; whether it was set."""
    return _managed and _set(_LOAD_MMAP_FROM, _LOAD_TRIM_FROM)


def heap_for_queries() -> bool:
    """The serving setting, if this process manages its heap; whether it was set."""
    return _managed and _set(_QUERY_MMAP_FROM, SCRATCH_BYTES)


def _set(mmap_from: int, trim_from: int) -> bool:
    assert _mallopt is not None
    return bool(_mallopt(_M_MMAP_THRESHOLD, mmap_from)) \
        and bool(_mallopt(_M_TRIM_THRESHOLD, trim_from))


def release_free_heap() -> bool:
    """Return the heap's whole free pages to the OS; whether anything was released."""
    return bool(_trim(0)) if _trim is not None else False


class LoadTrimmer:
    """A service's bulk-load calls in flight: the heap's loading setting while any is.
    When the last one ends and at least EVERY profiles came in since the heap was last
    trimmed, the freed heap goes back to the OS: at the end of a load, not between its
    calls (~1 ms a trim at 1M profiles)."""

    EVERY = 50_000

    def __init__(self) -> None:
        self.in_flight = 0
        self.since = 0  # profiles loaded since the last trim

    def begin(self) -> None:
        """A call starts (before it plans: its temporaries are the load's)."""
        if self.in_flight == 0:
            heap_for_loads()
        self.in_flight += 1

    def end(self, profiles: int) -> None:
        """A call ended, having loaded `profiles` (0 if it failed)."""
        self.in_flight -= 1
        self.since += profiles
        if self.in_flight:
            return
        if self.since >= self.EVERY:
            self.since = 0
            release_free_heap()
        heap_for_queries()
