"""Latency samples and their summary: median, p95, p99, max, throughput.

One job: run a callable repeatedly (alone, from N threads or from N processes) and
summarise what it took. Threads by default: every system under test is a server (or
DuckDB, which releases the GIL), so client threads mostly wait on sockets. Processes when
the client's own work is the bound (decoding a thousand profiles a BatchGet holds the GIL
longer than the server takes to answer): there a one-process client measures itself.
"""

from __future__ import annotations

import multiprocessing
import queue
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


def in_processes(make_op: Callable[[int], Callable[[], Any]], processes: int,
                 duration_s: float) -> tuple[list[float], float]:
    """As `concurrent`, from `processes` client processes (spawned, one GIL each).

    make_op must pickle; process i calls make_op(i) and its op once (connecting and
    warming up outside the clock), then the op until duration_s has passed.
    """
    ctx = multiprocessing.get_context("spawn")
    start, stop, results = ctx.Barrier(processes + 1), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_op_loop, args=(make_op, i, start, stop, results), daemon=True)
             for i in range(processes)]
    for p in procs:
        p.start()
    try:
        try:
            start.wait(timeout=120)
        except threading.BrokenBarrierError:  # a process could not set up (or took 120 s)
            try:
                why = results.get(timeout=10)
            except queue.Empty:
                why = "no answer in 120 s"
            raise RuntimeError(f"client processes did not start: {why}") from None
        begun = time.monotonic()
        time.sleep(duration_s)
        stop.set()
        answers = [results.get(timeout=120) for _ in procs]
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    failed = [a for a in answers if isinstance(a, str)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {processes} client processes failed: {failed[0]}")
    wall = max(ended for _, ended in answers) - begun
    return [x for samples, _ in answers for x in samples], wall


def _op_loop(make_op: Callable[[int], Callable[[], Any]], i: int, start: Any, stop: Any,
             results: Any) -> None:
    """One client process of `in_processes`: its samples and when it ended, or its error."""
    try:
        op = make_op(i)
        op()
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        results.put(f"process {i}: {type(e).__name__}: {e}")
        start.abort()  # after the put: the parent reads why once the barrier breaks
        return
    try:
        start.wait()
        samples: list[float] = []
        while not stop.is_set():
            t = time.perf_counter()
            op()
            samples.append(time.perf_counter() - t)
        results.put((samples, time.monotonic()))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        results.put(f"process {i}: {type(e).__name__}: {e}")
