"""The benchmark run: load every system, cross-check every answer, then time the workloads.

One job: orchestration. The order is fixed by the rule that no time is reported before every
query's count (and every group-by and id page) agrees across memstore and each peer; a
mismatch raises CrossCheckError naming the query and the counts, and the CLI exits non-zero.
Other failures of one workload are recorded in the results and the run goes on.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.datagen import PLANS, Dataset, iter_records, load_or_generate, profile_id
from bench.memstore_side import MemstoreServer, memstore_unavailable
from bench.peers.duckdb_peer import DuckDBPeer
from bench.peers.numpy_peer import NumpyPeer
from bench.peers.redis_peer import RedisPeer
from bench.queries import (
    BY_NAME,
    GROUP_BYS,
    ID_PAGE_QUERIES,
    PAGE_SIZE,
    QUERIES,
    check_group_by,
    numpy_group_counts,
)
from bench.timing import concurrent, in_processes, repeat, summarize
from memstore.client.core import LOAD_CHUNK

BATCHES_DRAWN = 64  # distinct key batches each BatchGet client cycles through
REFERENCE = "numpy"  # the cross-check's reference answers come from the plain scan


class CrossCheckError(RuntimeError):
    pass


@dataclass
class Options:
    size: int = 10_000
    seed: int = 42
    out: Path = Path("bench/results/latest")
    peers: tuple[str, ...] = ("duckdb", "numpy", "redis")
    memstore: str = "auto"  # auto: if it imports and starts; yes: required; no: skip
    query_budget_s: float = 1.0  # per query per system
    duration_s: float = 2.0  # per concurrency level / mixed run
    concurrency: tuple[int, ...] = (1, 4, 16)
    # BatchGet again from this many client processes: one Python process decoding 1,000
    # profiles a call is bound by its own GIL before the server is
    client_processes: tuple[int, ...] = (2, 4)
    batch_size: int = 1000  # issue 2: BatchGet of at least 1,000 keys in one call
    load_batch: int = LOAD_CHUNK  # profiles a BatchUpsert in memstore's bulk load
    steady_writes: int = 2000
    durable_sample: int = 100_000  # profiles loaded into the AOF-always Redis
    workloads: tuple[str, ...] = ("queries", "lookups", "ingest", "mixed", "memory",
                                  "recovery", "snapshot")
    plots: bool = True
    log: Callable[[str], None] = field(default=lambda s: print(s, file=sys.stderr, flush=True))


def machine() -> dict[str, Any]:
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_bytes": mem,
            "python": platform.python_version(), "platform": platform.platform()}


def _row_of(pid: str) -> int:
    return int(pid[1:])


# ---- cross-check -----------------------------------------------------------------------------

def cross_check(ds: Dataset, systems: dict[str, Any], res: dict[str, Any]) -> None:
    ref: NumpyPeer = systems[REFERENCE]
    problems: list[str] = []
    counts: dict[str, dict[str, int]] = {}
    for q in QUERIES:
        mask = ref.mask(q)
        want = int(mask.sum())
        counts[q.name] = {REFERENCE: want}
        for name, s in systems.items():
            if name == REFERENCE:
                continue
            got = s.count(q)
            counts[q.name][name] = got
            if got != want:
                problems.append(f"{q.name}: {name} counts {got}, {REFERENCE} counts {want}"
                                f"\n    memstore: {q.memstore}\n    sql: {q.sql}"
                                f"\n    redis: {q.redis}")
        if q.name in ID_PAGE_QUERIES:
            for name, s in systems.items():
                ids = s.ids(q, PAGE_SIZE)
                if len(ids) != min(want, PAGE_SIZE) or len(set(ids)) != len(ids):
                    problems.append(f"{q.name} ids: {name} returned {len(ids)} ids "
                                    f"({len(set(ids))} distinct), expected "
                                    f"{min(want, PAGE_SIZE)}")
                elif not all(mask[_row_of(i)] for i in ids):
                    bad = [i for i in ids if not mask[_row_of(i)]][:5]
                    problems.append(f"{q.name} ids: {name} returned non-matching ids {bad}")
    group: dict[str, dict[str, Any]] = {}
    for g in GROUP_BYS:
        full = numpy_group_counts(ds, ref.mask(g.query), g.attr)
        group[g.name] = {}
        for name, s in systems.items():
            got = s.group_by(g.query, g.attr, g.top_n)
            group[g.name][name] = got
            problem = check_group_by(full, got, g.top_n)
            if problem:
                problems.append(f"{g.name} group by {g.attr}: {name}: {problem}")
    res["crosscheck"] = {"counts": counts, "group_bys": group, "problems": problems,
                         "systems": sorted(systems)}
    if problems:
        raise CrossCheckError("cross-check failed:\n  " + "\n  ".join(problems))


# ---- workloads -------------------------------------------------------------------------------

def time_queries(systems: dict[str, Any], opt: Options) -> dict[str, Any]:
    out: dict[str, Any] = {"counts": {}, "id_pages": {}, "group_bys": {}}
    for q in QUERIES:
        out["counts"][q.name] = {
            name: summarize(repeat(partial(s.count, q), opt.query_budget_s))
            for name, s in systems.items()}
        opt.log(f"  {q.name}: " + ", ".join(
            f"{n} {v['median_ms']:.2f} ms" for n, v in out["counts"][q.name].items()))
    for qn in ID_PAGE_QUERIES:
        q = BY_NAME[qn]
        out["id_pages"][qn] = {
            name: summarize(repeat(partial(s.ids, q, PAGE_SIZE), opt.query_budget_s))
            for name, s in systems.items()}
    for g in GROUP_BYS:
        out["group_bys"][g.name] = {
            name: summarize(repeat(partial(s.group_by, g.query, g.attr, g.top_n),
                                   opt.query_budget_s))
            for name, s in systems.items()}
    return out


def _random_ids(size: int, seed: int) -> Callable[[], str]:
    rnd = random.Random(seed)
    return lambda: profile_id(rnd.randrange(size))


def _key_batches(size: int, batch_size: int, seed: int) -> Iterator[list[str]]:
    """BatchGet keys, drawn before the clock starts: making 1,000 ids in Python costs
    ~1 ms, a tenth of a BatchGet, and is no part of it."""
    pick = _random_ids(size, seed)
    return itertools.cycle([[pick() for _ in range(batch_size)] for _ in range(BATCHES_DRAWN)])


def _batch_op(connect: Callable[[], Callable[[list[str]], Any]], size: int, batch_size: int,
              i: int) -> Callable[[], Any]:
    """Client i's BatchGet op, in its own process (bench.timing.in_processes)."""
    batch_get, batches = connect(), _key_batches(size, batch_size, 2000 + i)
    return lambda: batch_get(next(batches))


def time_lookups(name: str, s: Any, ds: Dataset, opt: Options) -> dict[str, Any]:
    out: dict[str, Any] = {"get": {}, "batch_get": {}, "batch_get_processes": {},
                           "batch_size": opt.batch_size}
    for c in opt.concurrency:
        conns = [s.connection() for _ in range(c)]

        def unary(i: int, conns: list[Any] = conns) -> Callable[[], Any]:
            pick, conn = _random_ids(ds.size, i), conns[i]
            return lambda: s.get(pick(), conn=conn)

        def batch(i: int, conns: list[Any] = conns) -> Callable[[], Any]:
            batches, conn = _key_batches(ds.size, opt.batch_size, 1000 + i), conns[i]
            return lambda: s.batch_get(next(batches), conn=conn)

        samples, wall = concurrent(unary, c, opt.duration_s)
        out["get"][str(c)] = summarize(samples, 1, wall)
        samples, wall = concurrent(batch, c, opt.duration_s)
        out["batch_get"][str(c)] = summarize(samples, opt.batch_size, wall)
        opt.log(f"  {name} c={c}: get {out['get'][str(c)]['throughput_per_s']:.0f}/s, "
                f"batch_get {out['batch_get'][str(c)]['throughput_per_s']:.0f} profiles/s")
        for conn in conns:
            if hasattr(conn, "close"):
                conn.close()
    make_op = partial(_batch_op, s.batch_getter(), ds.size, opt.batch_size)
    for p in opt.client_processes:
        samples, wall = in_processes(make_op, p, opt.duration_s)
        r = out["batch_get_processes"][str(p)] = summarize(samples, opt.batch_size, wall)
        opt.log(f"  {name} {p} client processes: batch_get "
                f"{r['throughput_per_s']:.0f} profiles/s")
    return out


def steady_upserts(s: Any, ds: Dataset, n: int, seed: int = 7) -> dict[str, Any]:
    rnd = random.Random(seed)
    samples = []
    start = time.perf_counter()
    for _ in range(n):
        pid = profile_id(rnd.randrange(ds.size))
        plan = PLANS[rnd.randrange(len(PLANS))]
        t = time.perf_counter()
        s.upsert(pid, {"plan": plan})
        samples.append(time.perf_counter() - t)
    return summarize(samples, 1, time.perf_counter() - start)


def mixed(name: str, s: Any, ds: Dataset, opt: Options, threads: int = 4) -> dict[str, Any]:
    """90% Get / 10% single upserts from `threads` clients, one more client running counts."""
    lat: dict[str, list[float]] = {"get": [], "upsert": [], "count": []}
    lock = threading.Lock()
    q = BY_NAME["q09_issue"]

    def worker(i: int) -> Callable[[], Any]:
        conn = s.connection()
        rnd = random.Random(500 + i)
        if i == threads:  # the segment-query client
            def op_q() -> None:
                t = time.perf_counter()
                s.count(q, conn=conn)
                with lock:
                    lat["count"].append(time.perf_counter() - t)
            return op_q

        def op() -> None:
            pid = profile_id(rnd.randrange(ds.size))
            t = time.perf_counter()
            if rnd.random() < 0.9:
                s.get(pid, conn=conn)
                kind = "get"
            else:
                s.upsert(pid, {"plan": PLANS[rnd.randrange(5)]}, conn=conn)
                kind = "upsert"
            with lock:
                lat[kind].append(time.perf_counter() - t)
        return op

    _samples, wall = concurrent(worker, threads + 1, opt.duration_s)
    return {k: summarize(v, 1, wall) for k, v in lat.items()} | {"threads": threads}


def snapshot_latency(ms: MemstoreServer, opt: Options) -> dict[str, Any]:
    """Get and count latencies before and while a snapshot is written."""
    q = BY_NAME["q01_eq"]
    conn = ms.connection()
    pick = _random_ids(ms.ds.size, 99)

    def probe(stop: threading.Event, out: list[float]) -> None:
        while not stop.is_set():
            t = time.perf_counter()
            conn.get(pick())
            conn.count(q.memstore)
            out.append(time.perf_counter() - t)

    base: list[float] = []
    stop = threading.Event()
    th = threading.Thread(target=probe, args=(stop, base))
    th.start()
    time.sleep(min(opt.duration_s, 2.0))
    stop.set()
    th.join()
    during: list[float] = []
    stop = threading.Event()
    th = threading.Thread(target=probe, args=(stop, during))
    th.start()
    t = time.perf_counter()
    ms.snapshot()
    snap_s = time.perf_counter() - t
    stop.set()
    th.join()
    conn.close()
    return {"snapshot_s": snap_s, "baseline": summarize(base), "during": summarize(during),
            "probe": "get + count(q01) per sample"}


# ---- the run ---------------------------------------------------------------------------------

def _attempt(res: dict[str, Any], key: str, fn: Callable[[], Any], opt: Options) -> Any:
    t = time.perf_counter()
    opt.log(f"[{key}]")
    try:
        value = fn()
    except CrossCheckError:
        raise
    except Exception as e:  # noqa: BLE001 - one workload failing must not stop the run
        res.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"
        opt.log(f"  FAILED {key}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
        return None
    res.setdefault("elapsed_s", {})[key] = round(time.perf_counter() - t, 2)
    return value


def run(opt: Options) -> dict[str, Any]:
    opt.out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "meta": {"size": opt.size, "seed": opt.seed, "started": datetime.now(UTC).isoformat(),
                 "command": " ".join(["python -m bench", *sys.argv[1:]]),
                 "machine": machine()},
        "unavailable": {}, "load": {}, "memory": {}, "lookups": {}, "ingest": {},
        "mixed": {}, "recovery": {}}
    t0 = time.perf_counter()
    ds = _attempt(res, "datagen", lambda: load_or_generate(opt.size, opt.seed), opt)
    if ds is None:
        raise RuntimeError(res["errors"]["datagen"])
    systems: dict[str, Any] = {}
    closers: list[Callable[[], None]] = []
    try:
        systems["numpy"] = NumpyPeer(ds)
        res["load"]["numpy"] = systems["numpy"].load()
        if "duckdb" in opt.peers:
            d = DuckDBPeer(ds)
            closers.append(d.close)
            res["load"]["duckdb"] = _attempt(res, "load.duckdb", d.load, opt)
            if res["load"]["duckdb"] is not None:
                systems["duckdb"] = d
        if "redis" in opt.peers:
            r = RedisPeer(ds)
            closers.append(r.close)
            if not r.available:
                res["unavailable"]["redis"] = r.reason
                opt.log(f"redis unavailable: {r.reason}")
            else:
                res["load"]["redis"] = _attempt(res, "load.redis", r.load, opt)
                if res["load"]["redis"] is not None:
                    systems["redis"] = r
        ms: MemstoreServer | None = None
        if opt.memstore != "no":
            why = memstore_unavailable()
            if why is None:
                ms = MemstoreServer(ds, sync="always")
                closers.append(ms.close)
                started = _attempt(res, "start.memstore", ms.start, opt)
                loaded = (_attempt(res, "load.memstore",
                                   lambda: ms.load(chunk_size=opt.load_batch), opt)
                          if started else None)
                if loaded is None:
                    why = res.get("errors", {}).get("load.memstore") or res["errors"].get(
                        "start.memstore")
                    ms = None
                else:
                    res["load"]["memstore"] = loaded
                    systems["memstore"] = ms
            if why is not None:
                res["unavailable"]["memstore"] = why
                opt.log(f"memstore unavailable: {why}")
                if opt.memstore == "yes":
                    raise RuntimeError(f"memstore required but unavailable: {why}")

        opt.log(f"[crosscheck] {', '.join(systems)}")
        cross_check(ds, systems, res)
        opt.log("  every count, id page and group-by agrees")

        if "queries" in opt.workloads:
            res["queries"] = _attempt(res, "queries", lambda: time_queries(systems, opt), opt)
        if "memory" in opt.workloads:
            for name, load in res["load"].items():
                b = load.get("rss_growth") or load.get("bytes")
                res["memory"][name] = {"bytes": b,
                                       "bytes_per_profile": b / ds.size if b else None}
        servers = {n: s for n, s in systems.items() if n in ("memstore", "redis")}
        if "lookups" in opt.workloads:
            for name, s in servers.items():
                res["lookups"][name] = _attempt(
                    res, f"lookups.{name}", partial(time_lookups, name, s, ds, opt), opt)
        if "ingest" in opt.workloads:
            if ms is not None:
                res["ingest"]["memstore"] = {
                    "bulk": res["load"]["memstore"],
                    "steady_upserts": _attempt(res, "ingest.memstore", lambda: steady_upserts(
                        ms, ds, opt.steady_writes), opt)}
            if "redis" in systems:
                res["ingest"]["redis_aof_always"] = _attempt(
                    res, "ingest.redis", lambda: durable_redis(ds, opt, res), opt)
        if "mixed" in opt.workloads:
            for name, s in servers.items():
                res["mixed"][name] = _attempt(res, f"mixed.{name}",
                                              partial(mixed, name, s, ds, opt), opt)
        if "snapshot" in opt.workloads and ms is not None:
            res["snapshot"] = _attempt(res, "snapshot", lambda: snapshot_latency(ms, opt), opt)
        if "recovery" in opt.workloads and ms is not None:
            q = BY_NAME["q01_eq"]
            want = res["crosscheck"]["counts"][q.name][REFERENCE]
            for sig in (signal.SIGKILL, signal.SIGTERM):
                res["recovery"][f"memstore_{signal.Signals(sig).name}"] = _attempt(
                    res, f"recovery.memstore.{sig}",
                    partial(ms.recovery, q, want, sig), opt)
    finally:
        for close in reversed(closers):
            try:
                close()
            except Exception as e:  # noqa: BLE001
                opt.log(f"close failed: {e}")
        res["meta"]["total_s"] = round(time.perf_counter() - t0, 1)
        write_json(res, opt.out / "results.json")
    return res


def durable_redis(ds: Dataset, opt: Options, res: dict[str, Any]) -> dict[str, Any]:
    """Redis with AOF appendfsync always: bulk FT.ADD of a sample, single writes, restart."""
    n = min(ds.size, opt.durable_sample)
    r = RedisPeer(ds, aof_always=True)
    try:
        r.create_index()
        t = time.perf_counter()
        r.add(iter_records(ds, 0, n))
        bulk_s = time.perf_counter() - t
        steady = steady_upserts(_Limited(r, n), ds, opt.steady_writes)
        restart = r.restart_time()
        return {"bulk": {"loaded": n, "seconds": bulk_s, "rows_per_s": n / bulk_s},
                "steady_upserts": steady, "restart_answered_s": restart,
                "recovery_profiles": n}
    finally:
        r.close()


class _Limited:
    """Writes only to the first n profiles (the ones the durable Redis holds)."""

    def __init__(self, r: RedisPeer, n: int) -> None:
        self.r, self.n = r, n

    def upsert(self, pid: str, attrs: dict[str, Any]) -> None:
        self.r.upsert(profile_id(_row_of(pid) % self.n), attrs)


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, datetime):
        return o.isoformat()
    return str(o)


def write_json(res: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=_jsonable))
    os.replace(tmp, path)
