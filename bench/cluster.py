"""`python -m bench.cluster`: the sharded cluster (router + shard processes) under load.

One job: for the same seeded profiles (bench.datagen), start `memstore serve --shards K` for
each K, bulk-load through the router, time the 4-5 predicate segment count (q09_issue) and
single-profile Gets through the router against DuckDB in-process and RediSearch (one
redis-server, when its measured bytes a profile times the size fits in memory; with
`--redis-schema query` it holds only the query's attributes, which fits at 10M), then, on the
1-shard cluster, add an empty shard with `memstore cluster add-shard` while a writer and a
querier run, and report the move rate and the latencies before and during the move.

Every count is cross-checked against the numpy scan (the reference of bench/run.py) before a
time is reported; the count after the move must equal the count before.

The peers run one at a time and are closed before the shards start, so at 10M the 2 cores
and the RAM hold one system at a time (plus the ~1 GB of column arrays). After a load the
run waits until no shard has a snapshot child (a fork: CPU and copy-on-write memory on the
same 2 cores) before it times anything, and reports how long it waited.

Shards run with `--sync off` (loading speed: the OS decides when logs reach the disk), so the
load rates here are not durable-write rates; bench/run.py measures `--sync always`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import click

from bench.datagen import (
    Dataset,
    email_of,
    iter_records,
    load_or_generate,
    profile_id,
    schema_declaration,
)
from bench.peers.duckdb_peer import DuckDBPeer
from bench.peers.numpy_peer import NumpyPeer
from bench.peers.redis_peer import RedisPeer, rss_bytes
from bench.queries import BY_NAME
from bench.run import CrossCheckError, machine, write_json
from bench.timing import repeat, summarize
from memstore.client.core import LOAD_CHUNK, LOAD_CONCURRENCY
from memstore.hashslot import SLOT_COUNT
from memstore.server.logs import listening_address

QUERY = BY_NAME["q09_issue"]
TOUCH = "bench_touch"  # the attribute the background writer sets; no query reads it
SYNC = "off"
RESULTS_MD = Path(__file__).parent / "CLUSTER_RESULTS.md"
# RediSearch's RSS growth per profile, measured at 1M by bench/run.py (bench/RESULTS.md); used
# to decide whether it fits before loading it, and replaced by this run's own figure when run.
REDIS_BYTES_PER_PROFILE = 2650
# The same with `--redis-schema query` (documents and index hold q09's attributes alone):
# 576 measured at 1M by this script (bench/CLUSTER_RESULTS.md), rounded up.
REDIS_QUERY_BYTES_PER_PROFILE = 600
REDIS_FIT = 0.8  # load RediSearch only if its estimate is at most this share of MemAvailable
GIB = 1024**3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- memory and process tree (from /proc; Linux) ----------------------------------------------


def meminfo() -> dict[str, int]:
    """MemTotal and MemAvailable in bytes."""
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def stolen_seconds() -> float:
    """CPU time the hypervisor gave to others while this VM wanted it (all cores, /proc/stat's
    steal column): what makes every call of a stretch slower at once on a shared VM."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a process so far (its threads included); 0 once it
    is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> dict[int, int]:
    """Every process below `root`, as pid -> depth (1 = child)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    depth: dict[int, int] = {}
    frontier = [root]
    level = 0
    while frontier:
        level += 1
        frontier = [p for p, pp in parent.items() if pp in frontier]
        depth.update((p, level) for p in frontier)
    return depth


def tree_rss(root: int) -> int:
    """RSS of `root` and its descendants, in bytes (call when no fork is running: a forked
    child's shared pages would be counted twice)."""
    total = 0
    for pid in [root, *descendants(root)]:
        try:
            total += rss_bytes(pid)
        except OSError:
            pass
    return total


def wait_quiet(root: int, timeout: float = 900.0) -> float:
    """Wait until no shard (a child of `root`) has a child of its own (a snapshot fork);
    the seconds waited. Requires three quiet polls in a row, 0.5 s apart."""
    t = time.perf_counter()
    quiet = 0
    while quiet < 3 and time.perf_counter() - t < timeout:
        busy = any(d >= 2 for d in descendants(root).values())
        quiet = 0 if busy else quiet + 1
        time.sleep(0.5)
    return round(max(0.0, time.perf_counter() - t - 1.5), 1)


def memory_note(stage: str) -> dict[str, Any]:
    m = meminfo()
    note = {"stage": stage, "available_gib": round(m["MemAvailable"] / GIB, 2)}
    log(f"  [memory] {stage}: MemAvailable {note['available_gib']} GiB")
    return note


# ---- processes -------------------------------------------------------------------------------


class Proc:
    """A memstore process that prints `listening on HOST:PORT` on stderr once it serves."""

    def __init__(self, args: list[str], label: str, start_timeout: float = 300.0) -> None:
        self.args, self.label = args, label
        # whose READY line to wait for: `serve` passes its shards' lines on before its own
        self.role = {"serve": "supervisor", "serve-router": "router"}.get(args[0], "shard")
        self.lines: list[str] = []
        self.addr = ""
        t = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "memstore.cli", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        found = threading.Event()
        stderr = self.proc.stderr
        assert stderr is not None

        def drain() -> None:  # keep reading so the pipe never fills
            for line in stderr:
                self.lines.append(line.rstrip())
                address = listening_address(line, self.role)
                if address and not found.is_set():
                    self.addr = address  # the process's own line, not a shard's it forwards
                    found.set()

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + start_timeout
        while not found.wait(0.02):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{label} exited at start (status {self.proc.returncode}):"
                    "\n  " + "\n  ".join(self.lines[-8:])
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{label} did not listen in {start_timeout}s")
        self.start_s = time.perf_counter() - t

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        """SIGTERM, wait; SIGKILL only if it does not stop in `timeout` seconds."""
        if self.proc.poll() is not None:
            return {
                "status": self.proc.returncode,
                "seconds": 0.0,
                "killed": False,
                "already_exited": True,
            }
        t = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        killed = False
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            killed = True
            self.proc.kill()
            self.proc.wait()
        return {
            "status": self.proc.returncode,
            "seconds": round(time.perf_counter() - t, 2),
            "killed": killed,
        }


def client(addr: str, link: bool = False) -> Any:
    """A client of `addr`; with `link`, one whose unary calls take the server's link, up
    before it is returned (RuntimeError if it does not come up)."""
    from memstore import Client

    c = Client(addr, timeout=120.0, link=link)
    if link and not c.link_ready(30.0):
        c.close()
        raise RuntimeError(f"the link of {addr} did not come up")
    return c


def cluster_status(router: str) -> list[dict[str, Any]]:
    r = subprocess.run(
        [sys.executable, "-m", "memstore.cli", "cluster", "status", "--json", "--address", router],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"cluster status failed: {r.stderr.strip()}")
    return [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]


# ---- measurements ----------------------------------------------------------------------------


def brief(s: dict[str, Any]) -> dict[str, Any]:
    """A summary without the raw samples (kept small in results.json)."""
    return {k: v for k, v in s.items() if k != "samples_ms"}


def time_count(c: Any, budget_s: float) -> dict[str, Any]:
    return brief(
        summarize(repeat(lambda: c.count(QUERY.memstore), budget_s, min_reps=10, max_reps=500))
    )


def _slow_calls(gets: dict[str, Any]) -> str:
    return (f"{gets['over_3ms']} of {gets['n']} over 3 ms "
            f"({gets['over_3ms_next_to_another']} next to another), "
            f"{gets['stolen_s']:.2f} s of CPU stolen by the hypervisor meanwhile")


def time_gets(c: Any, ds: Dataset, n: int, seed: int = 11, by_email: bool = False
              ) -> dict[str, Any]:
    """Gets of random loaded profiles by primary id, or by their email identifier (through
    the identifier directory)."""
    rnd = random.Random(seed)
    rows = [rnd.randrange(ds.size) for _ in range(n + 50)]
    domains = ds.cols["email"]
    keys = [{"identifier": ("email", email_of(i, int(domains[i])))} if by_email
            else {"id": profile_id(i)} for i in rows]
    for key in keys[:50]:  # warm-up
        c.get(**key)
    samples = []
    missing = 0
    stolen, start = stolen_seconds(), time.perf_counter()
    for key in keys[50:]:
        t = time.perf_counter()
        p = c.get(**key)
        samples.append(time.perf_counter() - t)
        if p is None:
            missing += 1
    wall = time.perf_counter() - start
    out = brief(summarize(samples, 1, wall))
    out["missing"] = missing
    out["stolen_s"] = round(stolen_seconds() - stolen, 3)
    # Slow calls one after another are the machine slowing down for a stretch; lone
    # ones, a pause in one process. Counted over 3 ms (issue 4's bound).
    slow = {i for i, x in enumerate(samples) if x > 0.003}
    out["over_3ms"] = len(slow)
    out["over_3ms_next_to_another"] = sum(1 for i in slow if i - 1 in slow or i + 1 in slow)
    if missing:
        raise RuntimeError(f"{missing} of {n} Gets of loaded ids found nothing")
    return out


class Background:
    """A writer (upserts of TOUCH on random profiles) and a querier (the count), each in its
    own thread with its own connection, recording latency and errors until stopped."""

    def __init__(self, router: str, size: int, seed: int) -> None:
        self.router, self.size, self.seed = router, size, seed
        self.stop_ev = threading.Event()
        self.lat: dict[str, list[float]] = {"upsert": [], "count": []}
        self.errors: dict[str, list[str]] = {"upsert": [], "count": []}
        self.counts: list[int] = []
        self.threads: list[threading.Thread] = []
        self.window: tuple[float, float] = (0.0, 0.0)

    def _writer(self) -> None:
        c = client(self.router)
        rnd = random.Random(self.seed)
        i = 0
        while not self.stop_ev.is_set():
            i += 1
            pid = profile_id(rnd.randrange(self.size))
            t = time.perf_counter()
            try:
                c.upsert(pid, {TOUCH: i})
                self.lat["upsert"].append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001 - counted and reported
                self.errors["upsert"].append(f"{type(e).__name__}: {e}"[:300])
                time.sleep(0.01)
        c.close()

    def _querier(self) -> None:
        c = client(self.router)
        while not self.stop_ev.is_set():
            t = time.perf_counter()
            try:
                n = int(c.count(QUERY.memstore))
                self.lat["count"].append(time.perf_counter() - t)
                self.counts.append(n)
            except Exception as e:  # noqa: BLE001
                self.errors["count"].append(f"{type(e).__name__}: {e}"[:300])
                time.sleep(0.01)
        c.close()

    def __enter__(self) -> Self:
        self.threads = [
            threading.Thread(target=self._writer, daemon=True),
            threading.Thread(target=self._querier, daemon=True),
        ]
        self._t0 = time.perf_counter()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_ev.set()
        for t in self.threads:
            t.join(180)
        self.wall = time.perf_counter() - self._t0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self.lat.items():
            out[k] = brief(summarize(v, 1, self.wall))
            out[k]["errors"] = len(self.errors[k])
            out[k]["first_errors"] = sorted(set(self.errors[k]))[:3]
        out["count_values"] = sorted(set(self.counts))
        out["seconds"] = round(self.wall, 2)
        return out


# ---- RediSearch ------------------------------------------------------------------------------


def run_redis(ds: Dataset, want: int, opt: dict[str, Any], schema: str) -> dict[str, Any]:
    """Load RediSearch and time the count, if its estimated memory fits; else say why not.
    `schema` "full" stores and indexes every attribute, "query" only those QUERY reads."""
    per = opt["redis_bytes_per_profile"][schema]
    m = meminfo()
    out: dict[str, Any] = {
        "schema": schema,
        "assumed_bytes_per_profile": per,
        "estimate_bytes": per * ds.size,
        "available_bytes": m["MemAvailable"],
        "total_bytes": m["MemTotal"],
        "fit_share": REDIS_FIT,
    }
    if per * ds.size > REDIS_FIT * m["MemAvailable"]:
        out["skipped"] = (
            f"does not fit: {per:,} bytes/profile (RSS growth at 1M, {schema} schema) × "
            f"{ds.size:,} profiles = {per * ds.size / 1e9:.1f} GB "
            f"({per * ds.size / GIB:.1f} GiB) > {REDIS_FIT:.0%} of the "
            f"{m['MemAvailable'] / GIB:.1f} GiB available ({m['MemTotal'] / GIB:.1f} GiB RAM, "
            "no swap)"
        )
        log(f"[redis] not run: {out['skipped']}")
        return out
    r = RedisPeer(ds, attributes=QUERY.attributes if schema == "query" else None)
    if not r.available:
        out["skipped"] = f"unavailable: {r.reason}"
        log(f"[redis] not run: {out['skipped']}")
        return out
    try:
        out["version"] = r.r.info("server").get("redis_version")
        out["modules"] = [
            {
                str(k): v
                for k, v in (
                    mod.items() if isinstance(mod, dict) else zip(mod[::2], mod[1::2], strict=True)
                )
            }
            for mod in r.r.execute_command("MODULE", "LIST")
        ]
        log(f"[redis] loading {ds.size:,} profiles with FT.ADD (pipelined), {schema} schema")
        out["load"] = r.load()
        log(
            f"[redis] loaded at {out['load']['rows_per_s']:,.0f}/s, "
            f"{out['load']['bytes_per_profile']:,.0f} bytes/profile (RSS growth)"
        )
        got = r.count(QUERY)
        out["count"] = got
        if got != want:
            raise CrossCheckError(f"{QUERY.name}: RediSearch counts {got}, numpy counts {want}")
        out["query"] = brief(
            summarize(
                repeat(lambda: r.count(QUERY), opt["query_budget"], min_reps=10, max_reps=500)
            )
        )
        log(
            f"[redis] {QUERY.name} = {got} (= numpy), median "
            f"{out['query']['median_ms']:.2f} ms, p99 {out['query']['p99_ms']:.2f} ms"
        )
    finally:
        r.close()
    return out


# ---- one configuration -----------------------------------------------------------------------


def run_config(
    k: int,
    ds: Dataset,
    want: int,
    duck_med: float,
    redis_meds: dict[str, float],
    opt: dict[str, Any],
    tmp: Path,
) -> dict[str, Any]:
    res: dict[str, Any] = {"shards": k}
    data = tmp / f"cluster-{k}"
    log(f"[shards={k}] memstore serve --shards {k} --port 0 --sync {SYNC}")
    router = Proc(
        [
            "serve",
            "--shards",
            str(k),
            "--port",
            "0",
            "--data-dir",
            str(data),
            "--sync",
            SYNC,
            "--snapshot-log-mb",
            str(opt["snapshot_log_mb"]),
        ],
        f"memstore serve --shards {k}",
    )
    extra: Proc | None = None
    res["start_s"] = round(router.start_s, 2)
    try:
        c = client(router.addr)
        c.declare([*schema_declaration(), {"name": TOUCH, "kind": "int", "indexed": False}])
        t = time.perf_counter()
        loaded = c.load(
            iter_records(ds), chunk_size=opt["chunk_size"], concurrency=opt["load_concurrency"]
        )
        secs = time.perf_counter() - t
        res["load"] = {
            "loaded": loaded,
            "seconds": round(secs, 2),
            "profiles_per_s": loaded / secs,
            "sync": SYNC,
            "chunk_size": opt["chunk_size"],
            "concurrency": opt["load_concurrency"],
        }
        log(f"  load: {loaded} profiles in {secs:.1f}s = {loaded / secs:,.0f}/s")
        if loaded != ds.size:
            raise RuntimeError(f"load applied {loaded} of {ds.size} profiles")
        res["waited_for_snapshots_s"] = wait_quiet(router.proc.pid)
        rss = tree_rss(router.proc.pid)
        res["memory"] = {
            "rss_bytes": rss,
            "bytes_per_profile": rss / ds.size,
            "available_gib": round(meminfo()["MemAvailable"] / GIB, 2),
        }
        log(
            f"  waited {res['waited_for_snapshots_s']} s for shard snapshots to finish; "
            f"router + {k} shard(s) RSS {rss / GIB:.2f} GiB "
            f"({rss / ds.size:,.0f} bytes/profile), MemAvailable "
            f"{res['memory']['available_gib']} GiB"
        )
        got = int(c.count(QUERY.memstore))
        res["count"] = got
        if got != want:
            raise CrossCheckError(
                f"{QUERY.name} through the router with {k} shard(s): "
                f"memstore counts {got}, numpy/duckdb count {want}"
            )
        res["query"] = time_count(c, opt["query_budget"])
        res["query"]["ratio_vs_duckdb"] = res["query"]["median_ms"] / duck_med
        res["query"]["ratio_vs_redis"] = {
            schema: res["query"]["median_ms"] / med for schema, med in redis_meds.items()}
        log(
            f"  {QUERY.name}: count {got} (= reference), median "
            f"{res['query']['median_ms']:.2f} ms, p99 {res['query']['p99_ms']:.2f} ms, "
            f"DuckDB ÷ memstore {duck_med / res['query']['median_ms']:.2f}"
            + "".join(
                f", RediSearch ({schema}) ÷ memstore {med / res['query']['median_ms']:.2f}"
                for schema, med in redis_meds.items()
            )
        )
        # Gets from a client on the router's link (Client(link=True)), and from one on
        # gRPC alone, the peer, in turn.
        fast = client(router.addr, link=True)
        res["get"] = time_gets(fast, ds, opt["gets"])
        log(f"  get (client link): p50 {res['get']['median_ms']:.3f} ms, p99 "
            f"{res['get']['p99_ms']:.3f} ms; {_slow_calls(res['get'])}")
        res["get_grpc"] = time_gets(c, ds, opt["gets"])
        log(f"  get (client on gRPC): p50 {res['get_grpc']['median_ms']:.3f} ms, p99 "
            f"{res['get_grpc']['p99_ms']:.3f} ms; {_slow_calls(res['get_grpc'])}")
        res["get_by_email"] = time_gets(fast, ds, opt["gets"], by_email=True)
        log(f"  get by email (client link): p50 {res['get_by_email']['median_ms']:.3f} ms, "
            f"p99 {res['get_by_email']['p99_ms']:.3f} ms; {_slow_calls(res['get_by_email'])}")
        fast.close()
        res["status"] = cluster_status(router.addr)
        log("  router's shard links after the Gets: "
            + ", ".join(f"{row.get('name')} {row.get('link')}" for row in res["status"]))
        if k == 1 and opt["add_shard"]:
            extra = Proc(
                [
                    "serve-shard",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--data-dir",
                    str(tmp / "added-shard"),
                    "--name",
                    "shard-added",
                    "--sync",
                    SYNC,
                ],
                "memstore serve-shard (added)",
            )
            res["move"] = add_shard_move(c, router.addr, extra.addr, ds, want, opt, tmp)
        c.close()
    finally:
        res["stop"] = router.stop()
        log(f"  stopped cluster: {res['stop']}")
        if extra is not None:
            res["stop_added_shard"] = extra.stop()
        res["log_tail"] = router.lines[-15:]
        if res["stop"]["status"] != 0 or res["stop"]["killed"]:
            log("  cluster log tail:\n    " + "\n    ".join(router.lines[-15:]))
        shutil.rmtree(data, ignore_errors=True)
    return res


def add_shard_move(
    c: Any, router: str, new_addr: str, ds: Dataset, want: int, opt: dict[str, Any], tmp: Path
) -> dict[str, Any]:
    out: dict[str, Any] = {"new_shard": new_addr}
    before_count = int(c.count(QUERY.memstore))
    log(f"  [add-shard] baseline {opt['baseline_s']:.0f}s of background writes + counts")
    with Background(router, ds.size, seed=21) as bg:
        time.sleep(opt["baseline_s"])
    out["before"] = bg.summary()
    cmd = [
        "cluster",
        "add-shard",
        new_addr,
        "--address",
        router,
        "--no-progress",
        "--journal",
        str(tmp / "rebalance-journal.json"),
    ]
    out["command"] = "memstore " + " ".join(cmd)
    log(f"  [add-shard] {out['command']} (writer + querier running)")
    with Background(router, ds.size, seed=22) as bg:
        time.sleep(0.5)  # both clients are issuing requests before the move starts
        t = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-m", "memstore.cli", *cmd],
            capture_output=True,
            text=True,
            timeout=opt["move_timeout"],
            check=False,
        )
        elapsed = time.perf_counter() - t
        time.sleep(0.5)
    out["during"] = bg.summary()
    out["stdout"], out["stderr_tail"] = r.stdout.strip(), r.stderr.strip()[-2000:]
    out["returncode"] = r.returncode
    out["elapsed_s"] = round(elapsed, 2)
    if r.returncode != 0:
        raise RuntimeError(f"add-shard failed ({r.returncode}): {r.stderr.strip()[-1000:]}")
    m = re.search(
        r"moved (\d+) slots, (\d+) profiles copied, (\d+) caught up, (\d+) batches "
        r"recopied, writes to moving slots paused ([\d.]+) s",
        r.stdout,
    )
    if m:
        out.update(
            slots_moved=int(m.group(1)),
            profiles_copied=int(m.group(2)),
            caught_up=int(m.group(3)),
            batches_recopied=int(m.group(4)),
            frozen_s=float(m.group(5)),
        )
    moved = out.get("slots_moved", 0)
    out["slots_per_s"] = moved / elapsed
    out["all_slots_per_s"] = SLOT_COUNT / elapsed
    out["profiles_per_s"] = out.get("profiles_copied", 0) / elapsed
    after_count = int(c.count(QUERY.memstore))
    out["count_before"], out["count_after"] = before_count, after_count
    status = cluster_status(router)
    out["status_after"] = status
    total = sum(int(s.get("profiles", 0)) for s in status)
    slots = sum(int(s.get("slot_count", 0)) for s in status)
    out["profiles_after"], out["slots_claimed_after"] = total, slots
    mid = [n for n in out["during"]["count_values"] if n != want]
    log(f"  [add-shard] {out['stdout']}")
    log(
        f"  [add-shard] {moved} slots in {elapsed:.1f}s = {out['slots_per_s']:.0f} slots/s; "
        f"count before {before_count}, after {after_count}; shards hold {total} profiles, "
        f"{slots} slots claimed; counts seen during the move: {out['during']['count_values']}"
    )
    problems = []
    if after_count != before_count or after_count != want:
        problems.append(
            f"count after the move {after_count} != before {before_count} (reference {want})"
        )
    if mid:
        problems.append(f"counts answered during the move differ from {want}: {mid[:10]}")
    if total != ds.size:
        problems.append(f"shards hold {total} profiles after the move, expected {ds.size}")
    if slots != SLOT_COUNT:
        problems.append(f"{slots} of {SLOT_COUNT} slots claimed after the move")
    for when in ("before", "during"):
        for kind in ("upsert", "count"):
            if out[when][kind]["errors"]:
                problems.append(
                    f"{out[when][kind]['errors']} {kind} errors {when} the move: "
                    f"{out[when][kind]['first_errors']}"
                )
    out["problems"] = problems
    # after the move: the same count and Gets on the 2-shard cluster made by add-shard
    out["after_query"] = time_count(c, opt["query_budget"])
    out["after_get"] = time_gets(c, ds, opt["gets"], seed=12)
    for p in problems:
        log(f"  PROBLEM: {p}")
    if after_count != before_count:
        raise CrossCheckError(problems[0])
    return out


# ---- report ----------------------------------------------------------------------------------


def _f(x: Any, nd: int = 2) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def _vs(ratio: float) -> str:
    """memstore's time ÷ the peer's, and what it means."""
    if ratio <= 1:
        return f"{ratio:,.3f} ({1 / ratio:,.1f}× faster)"
    return f"{ratio:,.3f} ({ratio:,.1f}× slower)"


REDIS_SCHEMAS = {
    "full": "every attribute stored and indexed",
    "query": "documents and index hold only the query's attributes "
             f"({', '.join(sorted(QUERY.attributes))})",
}


def redis_line(rd: dict[str, Any]) -> str:
    label = f"RediSearch, {rd['schema']} schema ({REDIS_SCHEMAS[rd['schema']]})"
    if "skipped" in rd:
        return f"- {label}: not run at this size, {rd['skipped']}"
    ver = next((md.get("ver") for md in rd.get("modules", []) if md.get("name") == "ft"), "?")
    ld, q = rd["load"], rd["query"]
    return (
        f"- {label}, redis {rd['version']}, module ft {ver}, one redis-server, SAFEMODE: "
        "same query as `FT.SEARCH ... NOCONTENT LIMIT 0 1`, count cross-checked: median "
        f"{_f(q['median_ms'])} ms, p99 {_f(q['p99_ms'])} ms; loaded at "
        f"{_f(ld['rows_per_s'], 0)} profiles/s, {_f(ld['bytes_per_profile'], 0)} bytes/profile "
        "(RSS growth); closed before the shards started"
    )


def markdown(res: dict[str, Any]) -> str:
    m = res["meta"]
    d = res["duckdb"]
    rds = res.get("redis") or []
    mem = "; ".join(f"{n['stage']}: {n['available_gib']} GiB" for n in res.get("memory", []))
    lines = [
        f"## {m['size']:,} profiles",
        "",
        f"- command: `{m['command']}`",
        (
            f"- date: {m['date']}; nproc: {m['nproc']}; RAM: {m['ram_total_gib']} GiB total "
            f"(`free -g`: {m['free_g']}); CPU: {m['machine']['cpu']}; "
            f"Python {m['machine']['python']}"
        ),
        (
            f"- seed {m['seed']}; shards started with `--sync {SYNC} --snapshot-log-mb "
            f"{m.get('snapshot_log_mb', 512)}` (loading speed: logs are not "
            "fsynced, so these are not durable-write rates); loads through the router with "
            f"`Client.load(chunk_size={m['chunk_size']}, concurrency={m['load_concurrency']})`"
        ),
        (
            f"- query: {QUERY.name} `{QUERY.memstore}` = {d['count']:,} profiles (memstore, "
            "DuckDB and numpy agree); single client, sequential; Gets of random loaded ids "
            "from a client on the router's link (`Client(link=True)`)"
        ),
        (
            f"- DuckDB {d['version']} in-process, same query as SQL: median "
            f"{_f(d['query']['median_ms'])} ms, p99 {_f(d['query']['p99_ms'])} ms; closed "
            "before the shards started"
        ),
        *(map(redis_line, rds) if rds else ["- RediSearch: not run (`--no-redis`)"]),
        f"- MemAvailable as the run went: {mem}",
        (
            "- after each load the run waited until no shard was writing a snapshot (a forked "
            "child) before timing; RSS is the router and shard processes' after that wait"
        ),
        f"- total run {m.get('total_s', '?')} s",
        "",
        (
            "| shards | load profiles/s | waited for snapshots s | RSS bytes/profile | count "
            "median ms | count p99 ms | memstore ÷ DuckDB (median) | memstore ÷ RediSearch "
            "(median) | Get p50 ms | Get p99 ms |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["configs"]:
        if "error" in r and "query" not in r:
            lines.append(f"| {r['shards']} | failed: {r['error']} | | | | | | | | |")
            continue
        q = r["query"]
        vs_redis = "; ".join(
            _vs(ratio) if len(q["ratio_vs_redis"]) == 1 else f"{schema}: {_vs(ratio)}"
            for schema, ratio in q["ratio_vs_redis"].items()) or "not run"
        lines.append(
            f"| {r['shards']} | {_f(r['load']['profiles_per_s'], 0)} | "
            f"{_f(r.get('waited_for_snapshots_s'), 1)} | "
            f"{_f(r.get('memory', {}).get('bytes_per_profile'), 0)} | "
            f"{_f(q['median_ms'])} | {_f(q['p99_ms'])} | "
            f"{_vs(q['ratio_vs_duckdb'])} | "
            f"{vs_redis} | {_f(r['get']['median_ms'], 3)} | {_f(r['get']['p99_ms'], 3)} |"
        )
    over_grpc = [f"{r['shards']} shard(s) p50 {_f(r['get_grpc']['median_ms'], 3)} / "
                 f"p99 {_f(r['get_grpc']['p99_ms'], 3)} ms (client link ÷ gRPC: median "
                 f"{r['get']['median_ms'] / r['get_grpc']['median_ms']:.2f}, p99 "
                 f"{r['get']['p99_ms'] / r['get_grpc']['p99_ms']:.2f})"
                 for r in res["configs"] if "get_grpc" in r]
    if over_grpc:
        lines += ["", "The same Gets from a client on gRPC alone (`Client()`), the peer, right "
                  "after: " + "; ".join(over_grpc) + "."]
    by_email = [f"{r['shards']} shard(s) p50 {_f(r['get_by_email']['median_ms'], 3)} / "
                f"p99 {_f(r['get_by_email']['p99_ms'], 3)} ms"
                for r in res["configs"] if "get_by_email" in r]
    if by_email:
        lines += ["", "Get by email identifier through the router (the identifier directory: "
                  "the claim's shard, then the profile's): " + "; ".join(by_email) + "."]
    slow = [f"{r['shards']} shard(s), by id: {_slow_calls(r['get'])}"
            + (f"; over gRPC: {_slow_calls(r['get_grpc'])}" if "get_grpc" in r else "")
            + (f"; by email: {_slow_calls(r['get_by_email'])}" if "get_by_email" in r else "")
            for r in res["configs"] if "over_3ms" in r.get("get", {})]
    if slow:
        lines += ["", "Slow Gets (a stretch of slow calls in a row is the machine slowing down, "
                  "a lone one a pause in one process): " + "; ".join(slow) + "."]
    links = [f"{r['shards']} shard(s): " + ", ".join(
        f"{row.get('name')} {row.get('link')}" for row in r.get("status", []))
        for r in res["configs"] if r.get("status")]
    if links:
        lines += ["", "The router's shard links after the Gets (up: calls took the link; "
                  "none or down: gRPC): " + "; ".join(links) + "."]
    mv = next((r.get("move") for r in res["configs"] if r.get("move")), None)
    if mv:
        b, dd = mv["before"], mv["during"]
        lines += [
            "",
            f"### Add-shard move (1 → 2 shards, {m['size']:,} profiles loaded)",
            "",
            (
                f"`{mv['command']}` while one client upserts `{TOUCH}` (an attribute no query "
                f"reads) on random profiles and another runs {QUERY.name}, back to back."
            ),
            "",
            (
                f"- moved {mv.get('slots_moved', '?')} slots ({mv.get('profiles_copied', '?'):,} "
                f"profiles copied, {mv.get('caught_up', '?')} caught up, "
                f"{mv.get('batches_recopied', '?')} batches recopied) in {mv['elapsed_s']} s "
                f"(command wall time, incl. its start-up): **{_f(mv['slots_per_s'], 0)} slots/s** "
                f"({_f(mv['all_slots_per_s'], 0)} if counted as all {SLOT_COUNT} slots / elapsed; a 1 → 2 move hands over half of them), "
                f"{_f(mv['profiles_per_s'], 0)} profiles/s; writes to moving slots paused "
                f"{mv.get('frozen_s', '?')} s in all"
            ),
            (
                f"- count before {mv['count_before']:,}, after {mv['count_after']:,} "
                f"({'equal' if mv['count_before'] == mv['count_after'] else 'DIFFERENT'}); "
                f"every count answered during the move: {dd['count_values']}; after the move the "
                f"shards hold {mv['profiles_after']:,} profiles, {mv['slots_claimed_after']} of "
                f"{SLOT_COUNT} slots claimed"
            ),
            "",
            (
                "| | upserts | upsert median ms | upsert p99 ms | upsert max ms | errors | counts "
                "| count median ms | count p99 ms | count max ms | errors |"
            ),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, s in ((f"before ({b['seconds']} s)", b), (f"during ({dd['seconds']} s)", dd)):
            u, q = s["upsert"], s["count"]
            lines.append(
                f"| {label} | {u.get('n', 0)} | {_f(u.get('median_ms'))} | "
                f"{_f(u.get('p99_ms'))} | {_f(u.get('max_ms'))} | {u['errors']} | "
                f"{q.get('n', 0)} | {_f(q.get('median_ms'))} | {_f(q.get('p99_ms'))} | "
                f"{_f(q.get('max_ms'))} | {q['errors']} |"
            )
        aq, ag = mv["after_query"], mv["after_get"]
        lines += [
            "",
            (
                f"After the move (2 shards made by add-shard, no background load): count median "
                f"{_f(aq['median_ms'])} ms, p99 {_f(aq['p99_ms'])} ms; Get p50 "
                f"{_f(ag['median_ms'], 3)} ms, p99 {_f(ag['p99_ms'], 3)} ms."
            ),
        ]
        if mv["problems"]:
            lines += ["", "Problems seen:", *[f"- {p}" for p in mv["problems"]]]
    errs = [f"- shards={r['shards']}: {r['error']}" for r in res["configs"] if "error" in r]
    if errs:
        lines += ["", "Errors:", *errs]
    return "\n".join(lines) + "\n"


HEADER = """# Cluster benchmark results

Written by `python -m bench.cluster` (bench/cluster.py): one section per dataset size, the
latest run of each size replacing the earlier one. Raw numbers: results.json in the run's
--out folder.
"""


def write_markdown(section: str, size: int, path: Path = RESULTS_MD) -> None:
    begin, end = f"<!-- size={size} -->", f"<!-- /size={size} -->"
    text = path.read_text() if path.exists() else HEADER
    block = f"{begin}\n{section}{end}\n"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post.lstrip("\n")
    else:
        sizes = [int(s) for s in re.findall(r"<!-- size=(\d+) -->", text)]
        later = sorted(s for s in sizes if s > size)
        if later:
            pre, post = text.split(f"<!-- size={later[0]} -->", 1)
            text = pre + block + "\n" + f"<!-- size={later[0]} -->" + post
        else:
            text = text.rstrip("\n") + "\n\n" + block
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- the run ---------------------------------------------------------------------------------


def run(size: int, shard_counts: tuple[int, ...], out: Path, opt: dict[str, Any]) -> dict:
    import duckdb

    t0 = time.perf_counter()
    free = subprocess.run(["free", "-g"], capture_output=True, text=True, check=False).stdout
    mem_line = next((ln.split() for ln in free.splitlines() if ln.startswith("Mem:")), [])
    res: dict[str, Any] = {
        "meta": {
            "size": size,
            "seed": opt["seed"],
            "command": " ".join(["python -m bench.cluster", *sys.argv[1:]]),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": subprocess.run(
                ["nproc"], capture_output=True, text=True, check=False
            ).stdout.strip(),
            "ram_total_gib": mem_line[1] if len(mem_line) > 1 else "?",
            "free_g": " ".join(mem_line),
            "machine": machine(),
            "sync": SYNC,
            "chunk_size": opt["chunk_size"],
            "load_concurrency": opt["load_concurrency"],
            "snapshot_log_mb": opt["snapshot_log_mb"],
            "query": QUERY.name,
            "query_text": QUERY.memstore,
        },
        "configs": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    res["memory"] = [memory_note("start")]
    ds = load_or_generate(size, opt["seed"])
    want = NumpyPeer(ds).count(QUERY)
    res["memory"].append(memory_note(f"dataset ({ds.nbytes() / GIB:.2f} GiB) + numpy count"))
    duck = DuckDBPeer(ds)
    try:
        dload = duck.load()
        dcount = duck.count(QUERY)
        if dcount != want:
            raise CrossCheckError(f"{QUERY.name}: duckdb counts {dcount}, numpy counts {want}")
        dq = brief(
            summarize(
                repeat(lambda: duck.count(QUERY), opt["query_budget"], min_reps=10, max_reps=500)
            )
        )
        res["memory"].append(memory_note("DuckDB loaded and timed"))
    finally:
        duck.close()
    res["duckdb"] = {"version": duckdb.__version__, "count": want, "load": dload, "query": dq}
    log(
        f"[duckdb] {QUERY.name} = {want} (= numpy), median {dq['median_ms']:.2f} ms, "
        f"p99 {dq['p99_ms']:.2f} ms"
    )
    res["redis"] = [run_redis(ds, want, opt, schema) for schema in opt["redis_schemas"]]
    redis_meds = {rd["schema"]: rd["query"]["median_ms"] for rd in res["redis"] if "query" in rd}
    res["memory"].append(memory_note("peers closed, before the shards start"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        for k in shard_counts:
            try:
                res["configs"].append(run_config(k, ds, want, dq["median_ms"], redis_meds, opt, tmp))
            except Exception as e:
                res["configs"].append({"shards": k, "error": f"{type(e).__name__}: {e}"})
                log(f"  FAILED shards={k}: {type(e).__name__}: {e}")
                if isinstance(e, CrossCheckError):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        res["meta"]["total_s"] = round(time.perf_counter() - t0, 1)
        write_json(res, out / "results.json")
    md = markdown(res)
    (out / "cluster.md").write_text(md)
    write_markdown(md, size)
    print(md)
    return res


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x)


@click.command()
@click.option("--size", type=int, default=200_000, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option(
    "--shards",
    "shards",
    default="1,2",
    show_default=True,
    help="Shard counts, comma-separated; the add-shard move runs on the 1-shard one.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder for results.json and cluster.md [default: bench/results/cluster-<size>].",
)
@click.option(
    "--query-budget",
    type=float,
    default=3.0,
    show_default=True,
    help="Seconds of repeated counts per system (at least 10 runs).",
)
@click.option(
    "--gets",
    type=int,
    default=3000,
    show_default=True,
    help="Sequential single-profile Gets per configuration.",
)
@click.option(
    "--baseline",
    type=float,
    default=8.0,
    show_default=True,
    help="Seconds of background writes + counts before the move.",
)
@click.option("--chunk-size", type=int, default=LOAD_CHUNK, show_default=True)
@click.option("--load-concurrency", type=int, default=LOAD_CONCURRENCY, show_default=True)
@click.option("--no-add-shard", is_flag=True, help="Skip the add-shard move.")
@click.option(
    "--redis/--no-redis",
    default=True,
    show_default=True,
    help="Time the count on RediSearch too, when its estimated memory fits (else the report "
    "says why not).",
)
@click.option(
    "--redis-schema",
    "redis_schemas",
    type=click.Choice(sorted(REDIS_SCHEMAS)),
    multiple=True,
    default=("full",),
    show_default=True,
    help="What RediSearch holds, repeatable: 'full' (every attribute) or 'query' (only the "
    "timed query's attributes: small enough for 10M here).",
)
@click.option(
    "--redis-bytes-per-profile",
    type=int,
    default=REDIS_BYTES_PER_PROFILE,
    show_default=True,
    help="RediSearch's RSS a profile with the full schema, for the fit check (measured at "
    "1M, bench/RESULTS.md).",
)
@click.option(
    "--snapshot-log-mb",
    type=int,
    default=512,
    show_default=True,
    help="Passed to `memstore serve`: each shard snapshots after this much log.",
)
def main(
    size: int,
    seed: int,
    shards: str,
    out: Path | None,
    query_budget: float,
    gets: int,
    baseline: float,
    chunk_size: int,
    load_concurrency: int,
    no_add_shard: bool,
    redis: bool,
    redis_schemas: tuple[str, ...],
    redis_bytes_per_profile: int,
    snapshot_log_mb: int,
) -> None:
    """Benchmark the sharded cluster: load, segment count and Get through the router for
    each shard count, DuckDB and RediSearch as yardsticks, and an online add-shard move."""
    opt = {
        "seed": seed,
        "query_budget": query_budget,
        "gets": gets,
        "baseline_s": baseline,
        "chunk_size": chunk_size,
        "load_concurrency": load_concurrency,
        "add_shard": not no_add_shard,
        "redis_schemas": redis_schemas if redis else (),
        "redis_bytes_per_profile": {"full": redis_bytes_per_profile,
                                    "query": REDIS_QUERY_BYTES_PER_PROFILE},
        "move_timeout": 1800,
        "snapshot_log_mb": snapshot_log_mb,
    }
    try:
        res = run(size, _ints(shards), out or Path(f"bench/results/cluster-{size}"), opt)
    except CrossCheckError as e:
        log(f"CROSS-CHECK FAILED: {e}")
        sys.exit(2)
    if any("error" in r for r in res["configs"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
