"""Latency samples and their summary: median, p95, p99, max, throughput.

One job: run a callable repeatedly (alone or from N threads) and summarise what it took.
Threads, not processes: every system under test is a server (or DuckDB, which releases the
GIL), so client threads spend their time waiting on sockets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def summarize(samples: list[float], items_per_op: int = 1,
              wall: float | None = None) -> dict[str, Any]:
    """Seconds per operation in, milliseconds and operations (or items) per second out."""
    if not samples:
        return {"n": 0}
    a = np.asarray(samples) * 1e3
    wall = wall if wall is not None else float(np.sum(samples))
    return {
        "n": int(a.size),
        "median_ms": float(np.median(a)),
        "p95_ms": float(np.percentile(a, 95)),
        "p99_ms": float(np.percentile(a, 99)),
        "max_ms": float(a.max()),
        "mean_ms": float(a.mean()),
        "throughput_per_s": a.size * items_per_op / wall if wall > 0 else None,
        "samples_ms": [round(float(x), 4) for x in a[:2000]],
    }


def repeat(fn: Callable[[], Any], budget_s: float, min_reps: int = 3,
           max_reps: int = 200, warmup: int = 1) -> list[float]:
    """Call fn until budget_s has passed (at least min_reps, at most max_reps times)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps:
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
        if len(samples) >= min_reps and time.perf_counter() - start >= budget_s:
            break
    return samples


def concurrent(make_worker: Callable[[int], Callable[[], Any]], threads: int,
               duration_s: float) -> tuple[list[float], float]:
    """Run `threads` workers (make_worker(i) returns the op) for duration_s; (samples, wall)."""
    samples: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    stop = threading.Event()
    ops = [make_worker(i) for i in range(threads)]
    barrier = threading.Barrier(threads + 1)

    def run(i: int) -> None:
        op, out = ops[i], samples[i]
        barrier.wait()
        try:
            while not stop.is_set():
                t = time.perf_counter()
                op()
                out.append(time.perf_counter() - t)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    time.sleep(duration_s)
    stop.set()
    for t in ts:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return [x for s in samples for x in s], wall
