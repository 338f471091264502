"""`python -m bench.segments`: saved segments and their change stream, against re-running the
queries.

One job: on `memstore serve --shards 2 --sync off` (a router in front of two shard
processes), with 100 saved segments drawn from bench.datagen's schema and vocabularies
(seeded; an AND of 2-5 predicates on distinct attributes: =, IN, ranges, HAS, NOT, exists;
a draw is kept only if numpy counts between 0.01% and 50% of the profiles), measure what
the feature costs and what it gives, each figure beside its peer from the same run:

1. ENTER latency: from the client's acknowledgement of a write that makes a profile enter
   a known segment to a watcher (`watch()` through the router, every segment) receiving it.
2. Bulk load through the router with the 100 segments defined beforehand, against a fresh
   cluster without any (the same data; one cluster loads, then the other, the first idle
   meanwhile: it stays up for the upserts of 3).
3. Sequential single upserts of existing profiles setting attributes the segments read,
   each sent to the cluster loaded with the segments and to the one without them, in a
   random order (the same profiles; the same upserts): interleaved, so a change of the
   machine's load shifts both sides alike (two phases minutes apart differed by up to
   0.7 ms an upsert for the same code).
4. Memory: the shards' RSS before and after creating the segments, and the members'
   bitmaps' serialized size (QueryBitmap of `in_segment`).
5. `count('in_segment("s")')` against `count(<s's query>)`, interleaved, from a gRPC client
   and from one on the router's link.
6. What a user does without the feature: every second, re-run the 100 queries (StreamIds)
   and diff each one's ids with the last round's, in a child process: time and CPU a round,
   and how late it notices the same writes the watcher sees.

The writes. seg000 (the probe segment) reads `is_subscribed = TRUE`; each write flips one
of its members' is_subscribed: a first pass sets it FALSE (the profile LEAVEs seg000), a
second sets it TRUE again in the same order (it ENTERs), one write every --pace-ms. So
every write surely causes one event of a known segment and profile, matched by id, and a
profile stays out for half the run (long enough for a polling round to see it). The same
schedule runs four times on the cluster: alone and under polling (no segments yet), then
with the segments and no watcher, and with the watcher; each run's CPU seconds a second
come from /proc (the shards; the router, which runs in `serve`'s own process; this
process; the poller reports its own).

Nothing is timed before it is checked: after each load the 100 queries' counts through
the router equal numpy's (for the cluster loaded with segments, each segment's members
do); a segment created on the loaded cluster holds its query's count; every in_segment
count equals its query's; every write's event arrives, or the run fails.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from bench.cluster import Proc, cpu_seconds, wait_quiet
from bench.datagen import (
    ATTRS,
    COUNTRIES,
    DEFAULT_CACHE,
    INTERESTS,
    PLANS,
    TAGS,
    Dataset,
    iter_records,
    load_or_generate,
    profile_id,
    schema_declaration,
)
from bench.peers.redis_peer import rss_bytes
from bench.queries import (
    AND,
    And,
    Between,
    Cmp,
    Eq,
    Exists,
    Has,
    In,
    Node,
    Not,
    Query,
    to_numpy,
)
from bench.run import CrossCheckError, machine, write_json
from bench.timing import summarize
from memstore import Client

PROBE = Eq("is_subscribed", True)  # seg000 reads it; the writes flip it
UPSERTED = ("country", "age", "plan", "orders")  # what the single upserts change
MB = 1 << 20


class HarnessError(RuntimeError):
    """An expected event or answer did not come: no figure from that part is trusted."""


@dataclass
class Options:
    size: int = 1_000_000
    seed: int = 42  # the profiles (bench.datagen)
    segment_seed: int = 7  # the segments' draws
    segments: int = 100
    shards: int = 2
    writes: int = 2000  # flips a write-load run: half LEAVE seg000, half ENTER it again
    pace_s: float = 0.015  # one flip every this many seconds
    upserts: int = 3000  # sequential single upserts, to each cluster
    count_reps: int = 10  # times each segment is counted each way
    poll_period_s: float = 1.0  # the polling alternative starts a round this often
    poll_rounds: int = 3  # rounds timed with no writes
    idle_s: float = 5.0  # a watcher's standing cost: this long idle with it and without
    snapshot_log_mb: int = 4096  # snapshots (forks) kept out of the timed parts
    out: Path = Path("bench/results/segments")
    cache_dir: Path = DEFAULT_CACHE
    log: Callable[[str], None] = field(default=lambda s: print(s, file=sys.stderr,
                                                                flush=True))


# ---- the segments ---------------------------------------------------------------------------

CATEGORIES = ("country", "language", "plan", "device_os", "acquisition.channel",
              "consent.email")
DATES = ("2025-01-01T00:00:00Z", "2025-07-01T00:00:00Z", "2026-01-01T00:00:00Z",
         "2026-07-01T00:00:00Z", "2026-10-01T00:00:00Z")


def _top(attr: str, n: int) -> tuple[str, ...]:
    return ATTRS[attr].vocab[:n]  # vocabularies are in falling frequency (Zipf-like)


def _equal(rng: random.Random) -> Node:
    attr = rng.choice(CATEGORIES)
    return Eq(attr, rng.choice(_top(attr, 6)))


def _among(rng: random.Random) -> Node:
    attr = rng.choice(CATEGORIES[:5])
    return In(attr, tuple(rng.sample(_top(attr, 8), rng.randint(2, 4))))


def _range(rng: random.Random) -> Node:
    draws: list[Callable[[], Node]] = [
        lambda: Between("age", (lo := rng.randint(18, 60)), lo + rng.randint(5, 20)),
        lambda: Cmp("age", rng.choice(("<", ">=")), rng.randint(25, 55)),
        lambda: Cmp("orders", ">=", rng.randint(1, 4)),
        lambda: rng.choice((Cmp("nps", ">=", 9), Cmp("nps", "<=", 6), Between("nps", 7, 8))),
        lambda: Between("event.purchase.count", (lo := rng.randint(1, 3)),
                        lo + rng.randint(1, 5)),
        lambda: Cmp("ltv", rng.choice((">", "<=")), float(rng.choice((25, 100, 250, 500)))),
        lambda: Cmp(rng.choice(("last_seen", "event.purchase.last")), ">=", rng.choice(DATES)),
        lambda: Cmp("signup", "<", rng.choice(("2023-01-01T00:00:00Z", "2024-01-01T00:00:00Z",
                                               "2025-01-01T00:00:00Z"))),
    ]
    return rng.choice(draws)()


def _has(rng: random.Random) -> Node:
    if rng.random() < 0.6:
        return Has("interests", rng.choice(INTERESTS[:20]))
    return Has("tags", rng.choice(TAGS[:10]))


def _flag(rng: random.Random) -> Node:
    return Eq("is_subscribed", rng.random() < 0.5)


def _exists(rng: random.Random) -> Node:
    return Exists(rng.choice(("nps", "tags", "event.purchase.count", "city", "device_os")))


def _negated(rng: random.Random) -> Node:
    return Not(rng.choice((_equal, _has, _among))(rng))


ATOMS: tuple[tuple[Callable[[random.Random], Node], float], ...] = (
    (_equal, 2), (_among, 2), (_range, 3), (_has, 2), (_flag, 1), (_exists, 0.5),
    (_negated, 1.5))


@dataclass(frozen=True)
class Saved:
    name: str
    query: Query
    expected: int  # numpy's count on the generated profiles

    @property
    def text(self) -> str:
        return self.query.memstore


def make_segments(ds: Dataset, n: int, seed: int, probe_members: int) -> list[Saved]:
    """`n` segments, the first (the probe) with PROBE and at least `probe_members`."""
    rng = random.Random(seed)
    low, high = max(1, ds.size // 10_000), ds.size // 2
    makers, weights = zip(*ATOMS, strict=True)
    out: list[Saved] = []
    for _ in range(200 * n):
        if len(out) == n:
            return out
        parts: list[Node] = [] if out else [PROBE]
        used: set[str] = {PROBE.attr} if not out else set()
        k = rng.randint(2, 5)
        while len(parts) < k:
            atom = rng.choices(makers, weights)[0](rng)
            attrs = Query("", atom, "").attributes
            if not attrs & used:
                parts.append(atom)
                used |= attrs
        tree = AND(*parts)
        count = int(to_numpy(tree, ds).sum())
        if max(low, probe_members if not out else 0) <= count <= high:
            name = f"seg{len(out):03d}"
            out.append(Saved(name, Query(name, tree, ""), count))
    raise RuntimeError(f"drew only {len(out)} of {n} segments with {low}..{high} members")


KINDS = {"Eq": "=", "In": "IN", "Between": "range", "Cmp": "range", "Has": "HAS",
         "Not": "NOT", "Exists": "exists"}


def predicate_mix(segments: list[Saved]) -> dict[str, int]:
    """How many predicates of each kind the segments hold (a NOT counted as NOT)."""
    kinds: Counter[str] = Counter()
    for s in segments:
        assert isinstance(s.query.tree, And)
        kinds.update(KINDS[type(part).__name__] for part in s.query.tree.children)
    return dict(kinds.most_common())


# ---- the cluster ----------------------------------------------------------------------------


class Cluster:
    """`memstore serve --shards K` on a fresh data directory, and its processes' CPU and
    RSS (the router runs inside `serve`'s own process; shards are its children)."""

    def __init__(self, root: Path, label: str, opt: Options) -> None:
        self.data = root / label
        self.proc = Proc(["serve", "--shards", str(opt.shards), "--port", "0", "--data-dir",
                          str(self.data), "--sync", "off", "--snapshot-log-mb",
                          str(opt.snapshot_log_mb)], f"memstore serve ({label})")
        self.address = self.proc.addr
        self.shards = sorted(int(m.group(1)) for line in self.proc.lines
                             if (m := re.search(r"shard-\d+ \(pid (\d+)\) serving", line)))
        if len(self.shards) != opt.shards:
            self.close()
            raise RuntimeError(f"found {len(self.shards)} shard pids in the log of serve")

    @property
    def router(self) -> int:
        return self.proc.proc.pid

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far: shards together, router, this process (all threads)."""
        return {"shards": sum(map(cpu_seconds, self.shards)),
                "router": cpu_seconds(self.router), "client": time.process_time()}

    def rss(self) -> dict[str, int]:
        return {"shards": sum(map(rss_bytes, self.shards)), "router": rss_bytes(self.router)}

    def quiet(self) -> float:
        return wait_quiet(self.router)

    def close(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.data, ignore_errors=True)


def used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


def brief(s: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in s.items() if k != "samples_ms"}


# ---- loads, upserts and counts ----------------------------------------------------------------


def load(cluster: Cluster, c: Client, ds: Dataset) -> dict[str, Any]:
    before, t = cluster.cpu(), time.perf_counter()
    loaded = c.load(iter_records(ds))
    seconds = time.perf_counter() - t
    cpu = used(before, cluster.cpu())
    if loaded != ds.size:
        raise HarnessError(f"load applied {loaded} of {ds.size} profiles")
    return {"profiles": loaded, "seconds": seconds, "per_s": loaded / seconds,
            "cpu_us_per_profile": {k: v / loaded * 1e6 for k, v in cpu.items()},
            "waited_for_snapshots_s": cluster.quiet()}


def check_counts(segments: list[Saved], got: dict[str, int], what: str) -> None:
    """`got` (name -> count) must be numpy's count of each segment's query."""
    wrong = [(s.name, got.get(s.name), s.expected) for s in segments
             if got.get(s.name) != s.expected]
    if wrong:
        name, mine, numpy = wrong[0]
        raise CrossCheckError(f"{len(wrong)} of {len(segments)} {what} differ from numpy's "
                              f"count, e.g. {name}: memstore {mine}, numpy {numpy}")


def upserts(clients: dict[str, Client], size: int, n: int) -> dict[str, dict[str, Any]]:
    """`n` sequential upserts of random existing profiles, each sent to every client's
    cluster in a shuffled order (the same profile and values to each), setting country, age
    and plan and incrementing orders, so every one changes the profile: each cluster's
    latency and rate (upserts a second of its own time)."""
    ids, values, order = random.Random(5), random.Random(1), random.Random(9)
    samples: dict[str, list[float]] = {label: [] for label in clients}
    labels = list(clients)

    def one(keep: bool) -> None:
        pid = profile_id(ids.randrange(size))
        attrs = {"country": values.choice(COUNTRIES[:12]), "age": values.randint(18, 80),
                 "plan": values.choice(PLANS)}
        order.shuffle(labels)
        for label in labels:
            t = time.perf_counter()
            clients[label].upsert(pid, attrs, ops=[("increment", "orders", 1)])
            if keep:
                samples[label].append(time.perf_counter() - t)

    for _ in range(50):  # warm-up
        one(False)
    for _ in range(n):
        one(True)
    return {label: brief(summarize(s)) for label, s in samples.items()}


def counts(clients: dict[str, Client], segments: list[Saved], reps: int) -> dict[str, Any]:
    """count(in_segment) and count(query) of every segment, `reps` times each way from each
    client: a client's round asks every segment both ways, interleaved (the order
    alternating), and the clients take turns round by round, as a caller keeps to one
    transport. The two counts must agree."""
    samples: dict[str, dict[str, list[float]]] = {
        way: {"in_segment": [], "query": []} for way in clients}
    ways = list(clients)
    for rep in range(reps):
        for way in ways if rep % 2 else ways[::-1]:
            c = clients[way]
            for s in segments:
                kinds = [("in_segment", f'in_segment("{s.name}")'), ("query", s.text)]
                answers = {}
                for kind, text in kinds[::-1] if rep % 2 else kinds:
                    t = time.perf_counter()
                    answers[kind] = c.count(text)
                    samples[way][kind].append(time.perf_counter() - t)
                if answers["in_segment"] != answers["query"]:
                    raise CrossCheckError(f"{s.name}: in_segment counts {answers['in_segment']}"
                                          f", its query {answers['query']}")
    return {way: {kind: brief(summarize(v)) for kind, v in kinds_.items()}
            for way, kinds_ in samples.items()}


# ---- the write load, the watcher and the poller -----------------------------------------------


@dataclass(frozen=True)
class Write:
    pid: str
    change: str  # "leave" or "enter" (of seg000)
    sent: float  # time.monotonic(): the same clock in every process here
    acked: float


def pick_probes(c: Client, query: str, n: int, seed: int) -> list[str]:
    """`n` profiles matching `query` now (the probe segment's)."""
    ids = sorted(c.iter_ids(query))
    return random.Random(seed).sample(ids, min(n, len(ids)))


def flip_writes(c: Client, probes: list[str], pace: float) -> list[Write]:
    """Flip each probe out of seg000, then each back in, one write every `pace` s."""
    schedule = [(pid, False) for pid in probes] + [(pid, True) for pid in probes]
    out = []
    start = time.monotonic()
    for k, (pid, value) in enumerate(schedule):
        delay = start + k * pace - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent = time.monotonic()
        c.upsert(pid, {PROBE.attr: value})
        out.append(Write(pid, "enter" if value else "leave", sent, time.monotonic()))
    return out


class Watcher:
    """`watch()` of every segment through the router, read on a thread: when each
    (segment, id, change) first arrived."""

    def __init__(self, address: str) -> None:
        self.client = Client(address, timeout=None)
        self.arrived: dict[tuple[str, str, str], float] = {}
        self.events = 0
        self.error: BaseException | None = None
        self.ready = threading.Event()  # the first heartbeat: the stream is open
        self._closing = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(60) or self.error is not None:
            raise HarnessError(f"the watch did not start: {self.error}")

    def _run(self) -> None:
        try:
            for item in self.client.watch(heartbeats=True):
                now = time.monotonic()
                if item.get("heartbeat"):
                    self.ready.set()
                    continue
                self.events += 1
                self.arrived.setdefault((item["segment"], item["id"], item["change"]), now)
        except Exception as exc:  # noqa: BLE001 - closing the client ends it; else reported
            if not self._closing:
                self.error = exc
        finally:
            self.ready.set()

    def wait_for(self, keys: list[tuple[str, str, str]], timeout: float) -> int:
        """Wait until every key arrived (or `timeout`); how many did not."""
        deadline = time.monotonic() + timeout
        while True:
            missing = sum(1 for k in keys if k not in self.arrived)
            if not missing or time.monotonic() > deadline or self.error is not None:
                return missing
            time.sleep(0.02)

    def close(self) -> None:
        self._closing = True
        self.client.close()
        self.thread.join(10)


def poll(address: str, texts: list[str], probe: int, period: float, rounds: int,
         stop: Any, out: Any) -> None:
    """The alternative without saved segments, in a child process: every `period` seconds
    (at once when a round overran), fetch every query's ids (StreamIds) and diff them with
    the last round's. `rounds` > 0: that many rounds; 0: until `stop` is set (the round
    under way completes). Puts "ready" after the first round, then {"rounds": [(start, end,
    cpu s, ids fetched, changes seen)], "probe": [(when its diff was known, entered,
    left)]}, or an error string."""
    try:
        c = Client(address, timeout=600)
        last: list[set[str] | None] = [None] * len(texts)
        done: list[tuple[float, float, float, int, int]] = []
        probe_diffs: list[tuple[float, list[str], list[str]]] = []
        while len(done) < rounds if rounds else not (done and stop.is_set()):
            start, cpu = time.monotonic(), time.process_time()
            fetched = changed = 0
            for i, text in enumerate(texts):
                ids = set(c.iter_ids(text))
                before = last[i]
                if before is not None:
                    entered, left = ids - before, before - ids
                    changed += len(entered) + len(left)
                    if i == probe:
                        probe_diffs.append((time.monotonic(), sorted(entered), sorted(left)))
                last[i] = ids
                fetched += len(ids)
            done.append((start, time.monotonic(), time.process_time() - cpu, fetched, changed))
            if len(done) == 1:
                out.put("ready")
            wait = start + period - time.monotonic()
            if wait > 0 and rounds:
                time.sleep(wait)
            elif wait > 0:
                stop.wait(wait)
        c.close()
        out.put({"rounds": done, "probe": probe_diffs})
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.put(f"{type(exc).__name__}: {exc}")


class Poller:
    """`poll` in a spawned child process (its own GIL, as a separate polling service)."""

    def __init__(self, address: str, segments: list[Saved], period: float,
                 rounds: int = 0) -> None:
        import bench.segments as module  # noqa: PLW0406 - its importable name under -m

        ctx = multiprocessing.get_context("spawn")
        self.stop_event, self.out = ctx.Event(), ctx.Queue()
        self.proc = ctx.Process(target=module.poll, daemon=True, args=(
            address, [s.text for s in segments], 0, period, rounds, self.stop_event,
            self.out))
        self.proc.start()
        self._take("ready", 1800)

    def _take(self, want: str | None, timeout: float) -> Any:
        try:
            got = self.out.get(timeout=timeout)
        except queue.Empty:
            raise HarnessError(f"the poller sent nothing in {timeout:.0f} s") from None
        if isinstance(got, str) and got != want:
            raise HarnessError(f"the poller failed: {got}")
        return got

    def finish(self, timeout: float = 1800) -> dict[str, Any]:
        self.stop_event.set()
        try:
            result: dict[str, Any] = self._take(None, timeout)
        finally:
            self.proc.join(30)
            if self.proc.is_alive():
                self.proc.kill()
        return result


def latencies(writes: list[Write], seen: dict[tuple[str, str], float]) -> dict[str, Any]:
    """Per change ("enter", "leave"): when each write's event was seen after its ack (and
    after it was sent), and how many were never seen."""
    out: dict[str, Any] = {}
    for change in ("enter", "leave"):
        mine = [w for w in writes if w.change == change]
        got = [(seen[(w.pid, change)], w) for w in mine if (w.pid, change) in seen]
        out[change] = {"after_ack": brief(summarize([t - w.acked for t, w in got])),
                       "after_send": brief(summarize([t - w.sent for t, w in got])),
                       "writes": len(mine), "missed": len(mine) - len(got)}
    return out


def polled_seen(diffs: list[tuple[float, list[str], list[str]]], writes: list[Write]
                ) -> dict[tuple[str, str], float]:
    """(id, change) -> when polling first knew of it, counting only diffs known after the
    write was sent."""
    sent = {(w.pid, w.change): w.sent for w in writes}
    seen: dict[tuple[str, str], float] = {}
    for when, entered, left in diffs:
        for change, ids in (("enter", entered), ("leave", left)):
            for pid in ids:
                key = (pid, change)
                if key in sent and key not in seen and when >= sent[key]:
                    seen[key] = when
    return seen


def write_run(cluster: Cluster, c: Client, probes: list[str], opt: Options
              ) -> tuple[list[Write], dict[str, float], float]:
    """The flip schedule with CPU around it: (writes, CPU seconds by process, wall s)."""
    before, t = cluster.cpu(), time.monotonic()
    writes = flip_writes(c, probes, opt.pace_s)
    return writes, used(before, cluster.cpu()), time.monotonic() - t


def rates(cpu: dict[str, float], wall: float) -> dict[str, float]:
    """CPU seconds a second of wall time (cores kept busy), by process and in all."""
    out = {k: v / wall for k, v in cpu.items()}
    out["total"] = sum(cpu.values()) / wall
    return out


def ack_summary(writes: list[Write]) -> dict[str, Any]:
    return brief(summarize([w.acked - w.sent for w in writes]))


# ---- the run --------------------------------------------------------------------------------


def run(opt: Options) -> dict[str, Any]:
    log = opt.log
    t0 = time.perf_counter()
    pairs = opt.writes // 2
    res: dict[str, Any] = {"meta": {
        "size": opt.size, "seed": opt.seed, "segment_seed": opt.segment_seed,
        "segments": opt.segments, "shards": opt.shards, "writes": pairs * 2,
        "pace_ms": opt.pace_s * 1e3, "upserts": opt.upserts, "count_reps": opt.count_reps,
        "poll_period_s": opt.poll_period_s, "idle_s": opt.idle_s, "snapshot_log_mb": opt.snapshot_log_mb,
        "command": " ".join(["python -m bench.segments", *sys.argv[1:]]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine()}}
    ds = load_or_generate(opt.size, opt.seed, opt.cache_dir)
    segments = make_segments(ds, opt.segments, opt.segment_seed, 2 * pairs)
    members = sorted(s.expected for s in segments)
    res["segments"] = {
        "definitions": {s.name: [s.text, s.expected] for s in segments},
        "predicates": predicate_mix(segments),
        "members": {"min": members[0], "median": members[len(members) // 2],
                    "max": members[-1], "total": sum(members)}}
    log(f"[segments] {len(segments)} drawn, members {members[0]:,}..{members[-1]:,} "
        f"(median {members[len(members) // 2]:,}); predicates {res['segments']['predicates']}")
    probe = segments[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-segments-"))
    try:
        # (2) the load with the segments defined beforehand, on a cluster of its own (kept,
        # idle, for the upserts of (3), then closed)
        loaded = Cluster(tmp, "with-segments", opt)
        try:
            with Client(loaded.address, timeout=600) as c:
                c.declare(schema_declaration())
                for s in segments:
                    c.create_segment(s.name, s.text)
                log("[load] with 100 segments defined beforehand")
                res["load_with"] = load(loaded, c, ds)
                check_counts(segments, {s["name"]: s["members"] for s in c.segments()},
                             "segments' members after the load")
            log(f"  {res['load_with']['per_s']:,.0f} profiles/s; every segment holds "
                "numpy's count")
            cluster = Cluster(tmp, "without-segments", opt)
            try:
                run_main(cluster, loaded, ds, segments, probe, pairs, opt, res)
            finally:
                cluster.close()
        finally:
            loaded.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        res["meta"]["total_s"] = round(time.perf_counter() - t0, 1)
    return res


def run_main(cluster: Cluster, loaded: Cluster, ds: Dataset, segments: list[Saved],
             probe: Saved, pairs: int, opt: Options, res: dict[str, Any]) -> None:
    """Everything but the load with segments, on one cluster, first without segments; the
    upserts also on `loaded` (loaded with them), which is closed after them."""
    log = opt.log
    c = Client(cluster.address, timeout=600)
    fast = Client(cluster.address, timeout=600, link=True)
    try:
        c.declare(schema_declaration())
        log("[load] without segments")
        res["load_without"] = load(cluster, c, ds)
        check_counts(segments, {s.name: c.count(s.text) for s in segments}, "queries")
        log(f"  {res['load_without']['per_s']:,.0f} profiles/s; the 100 queries count as numpy")

        # (3) single upserts, interleaved on the clusters with and without the segments
        with Client(loaded.address, timeout=600) as other:
            ups = upserts({"without": c, "with": other}, ds.size, opt.upserts)
        loaded.close()
        res["upserts_without"], res["upserts_with"] = ups["without"], ups["with"]
        res["upserts_read_by"] = sum(1 for s in segments if s.query.attributes & set(UPSERTED))
        log(f"[upserts] median {ups['without']['median_ms']:.3f} ms without segments, "
            f"{ups['with']['median_ms']:.3f} ms with them")

        # (6) polling: rounds alone, then the write load alone and under polling
        before = cluster.cpu()
        poller = Poller(cluster.address, segments, opt.poll_period_s, rounds=opt.poll_rounds)
        quiet = poller.finish()
        server = used(before, cluster.cpu())
        rounds = quiet["rounds"]
        res["poll_quiet"] = {
            "round": brief(summarize([end - start for start, end, *_ in rounds])),
            "cpu_s_per_round": {"shards": server["shards"] / len(rounds),
                                "router": server["router"] / len(rounds),
                                "poller": sum(r[2] for r in rounds) / len(rounds)},
            "ids_per_round": rounds[-1][3], "rounds": len(rounds)}
        log(f"[poll] a round of the {len(segments)} queries: median "
            f"{res['poll_quiet']['round']['median_ms']:.0f} ms, "
            f"{res['poll_quiet']['ids_per_round']:,} ids")

        probes = pick_probes(c, probe.text, pairs, seed=3)
        writes, cpu, wall = write_run(cluster, c, probes, opt)
        res["writes_alone"] = {"cpu_per_s": rates(cpu, wall), "seconds": wall,
                               "ack": ack_summary(writes)}
        log(f"[writes] alone: {len(writes)} in {wall:.1f} s")

        probes = pick_probes(c, probe.text, pairs, seed=4)
        poller = Poller(cluster.address, segments, opt.poll_period_s)
        before, t = cluster.cpu(), time.monotonic()
        writes = flip_writes(c, probes, opt.pace_s)
        round_s = res["poll_quiet"]["round"]["max_ms"] / 1e3
        time.sleep(max(opt.poll_period_s, round_s) + round_s)  # a whole round after the last
        polled = poller.finish()
        wall = time.monotonic() - t
        cpu = used(before, cluster.cpu())
        cpu["poller"] = sum(r[2] for r in polled["rounds"][1:])  # the first ran before `t`
        seen = polled_seen(polled["probe"], writes)
        res["writes_polled"] = {
            "cpu_per_s": rates(cpu, wall), "seconds": wall, "ack": ack_summary(writes),
            "noticed": latencies(writes, seen),
            "round": brief(summarize([e - s for s, e, *_ in polled["rounds"]])),
            "rounds": len(polled["rounds"])}
        log(f"[writes] under polling: noticed {len(seen)} of {len(writes)} changes")

        # (4) create the segments: memory and creation time
        res["waited_before_rss_s"] = cluster.quiet()
        rss_before = cluster.rss()
        created, create_s = {}, []
        for s in segments:
            t1 = time.perf_counter()
            created[s.name] = c.create_segment(s.name, s.text)["members"]
            create_s.append(time.perf_counter() - t1)
        rss_after = cluster.rss()
        wrong = [s.name for s in segments if created[s.name] != c.count(s.text)]
        if wrong:
            raise CrossCheckError(f"segments created on the loaded cluster hold other counts "
                                  f"than their queries: {wrong[:5]}")
        serialized = held = 0
        for s in segments:
            for bitmap in c.bitmaps(f'in_segment("{s.name}")').values():
                serialized += len(bitmap.serialize())
                held += len(bitmap)
        if held != sum(created.values()):
            raise CrossCheckError(f"bitmaps hold {held} members, segments say "
                                  f"{sum(created.values())}")
        n = len(segments)
        res["memory"] = {
            "rss_before": rss_before, "rss_after": rss_after,
            "shards_rss_per_segment": (rss_after["shards"] - rss_before["shards"]) / n,
            "router_rss_per_segment": (rss_after["router"] - rss_before["router"]) / n,
            "serialized_bytes": serialized, "serialized_per_segment": serialized / n,
            "members": held, "serialized_per_member": serialized / max(held, 1),
            "rss_per_member": (rss_after["shards"] - rss_before["shards"]) / max(held, 1)}
        res["create"] = brief(summarize(create_s))
        log(f"[create] {n} segments, {held:,} members: shards' RSS "
            f"{(rss_after['shards'] - rss_before['shards']) / MB:+.1f} MiB, bitmaps "
            f"{serialized / MB:.2f} MiB serialized")

        # (5) in_segment counts against the query's
        if not fast.link_ready(30):
            raise HarnessError("the router's link did not come up")
        res["counts"] = counts({"grpc": c, "link": fast}, segments, opt.count_reps)
        log(f"[counts] in_segment median {res['counts']['grpc']['in_segment']['median_ms']:.3f}"
            f" ms (gRPC), {res['counts']['link']['in_segment']['median_ms']:.3f} ms (link)")

        # (1) the write load with the segments, without and with a watcher
        probes = pick_probes(c, f'in_segment("{probe.name}")', pairs, seed=5)
        writes, cpu, wall = write_run(cluster, c, probes, opt)
        res["writes_segments"] = {"cpu_per_s": rates(cpu, wall), "seconds": wall,
                                  "ack": ack_summary(writes)}
        before, t = cluster.cpu(), time.monotonic()
        time.sleep(opt.idle_s)
        idle = rates(used(before, cluster.cpu()), time.monotonic() - t)
        probes = pick_probes(c, f'in_segment("{probe.name}")', pairs, seed=6)
        watcher = Watcher(cluster.address)
        try:
            before, t = cluster.cpu(), time.monotonic()
            time.sleep(opt.idle_s)
            res["idle"] = {"without": idle,
                           "with_watcher": rates(used(before, cluster.cpu()),
                                                 time.monotonic() - t)}
            writes, cpu, wall = write_run(cluster, c, probes, opt)
            missing = watcher.wait_for([(probe.name, w.pid, w.change) for w in writes], 30)
            seen = {(pid, change): when for (name, pid, change), when
                    in watcher.arrived.items() if name == probe.name}
            res["writes_watched"] = {"cpu_per_s": rates(cpu, wall), "seconds": wall,
                                     "ack": ack_summary(writes), "noticed": latencies(writes, seen),
                                     "events": watcher.events, "error": repr(watcher.error)
                                     if watcher.error else None}
        finally:
            watcher.close()
        if missing:
            raise HarnessError(f"{missing} of {len(writes)} writes' events never reached the "
                               f"watcher ({watcher.error})")
        enter = res["writes_watched"]["noticed"]["enter"]["after_ack"]
        log(f"[watch] ENTER after ack: median {enter['median_ms']:.1f} ms, "
            f"p99 {enter['p99_ms']:.1f} ms over {enter['n']}")
    finally:
        fast.close()
        c.close()


# ---- report ---------------------------------------------------------------------------------


def _ms(s: dict[str, Any]) -> str:
    """median / p99 in ms."""
    return f"{s['median_ms']:,.2f} / {s['p99_ms']:,.2f}" if s.get("n") else "-"


def _vs(a: dict[str, Any], b: dict[str, Any]) -> str:
    """a ÷ b, of the medians / of the p99s."""
    if not (a.get("n") and b.get("n")):
        return "-"
    return f"{a['median_ms'] / b['median_ms']:.2f} / {a['p99_ms'] / b['p99_ms']:.2f}"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def markdown(res: dict[str, Any]) -> str:
    """The figures as a Markdown table and notes (bench/RESULTS.md's "Live segments")."""
    m, mc, seg = res["meta"], res["meta"]["machine"], res["segments"]
    lw, lo = res["load_with"], res["load_without"]
    uw, uo = res["upserts_with"], res["upserts_without"]
    watched, polled = res["writes_watched"]["noticed"], res["writes_polled"]["noticed"]
    pq, mem = res["poll_quiet"], res["memory"]
    enter = watched["enter"]["after_ack"]
    load_ratio = lw["per_s"] / lo["per_s"]
    upsert_ratio = uw["throughput_per_s"] / uo["throughput_per_s"]
    alone = res["writes_alone"]["cpu_per_s"]["total"]
    extra = {k: res[k]["cpu_per_s"]["total"] - alone for k in ("writes_polled",
                                                                "writes_watched")}
    rows = [
        ((f"1. ENTER at the watcher after the write's ack ({enter['n']} writes, one every "
         f"{m['pace_ms']:g} ms), median / p99 ms"), _ms(enter),
         (f"polling every {m['poll_period_s']:g} s: {_ms(polled['enter']['after_ack'])} "
         f"({polled['enter']['missed']} of {polled['enter']['writes']} never seen)"),
         _vs(enter, polled["enter"]["after_ack"]), f"p99 ≤ 50 ms: {_met(enter['p99_ms'] <= 50)}"),
        ("LEAVE, the same", _ms(watched["leave"]["after_ack"]),
         f"{_ms(polled['leave']['after_ack'])} ({polled['leave']['missed']} never seen)",
         _vs(watched["leave"]["after_ack"], polled["leave"]["after_ack"]), ""),
        ("2. bulk load through the router, profiles/s", f"{lw['per_s']:,.0f} (segments first)",
         f"{lo['per_s']:,.0f} (no segments)", f"{load_ratio:.2f}",
         f"≥ 0.75: {_met(load_ratio >= 0.75)}"),
        ("3. sequential single upsert, median / p99 ms", _ms(uw), f"{_ms(uo)} (no segments)",
         _vs(uw, uo), ""),
        ("upserts a second", f"{uw['throughput_per_s']:,.0f}",
         f"{uo['throughput_per_s']:,.0f}", f"{upsert_ratio:.2f}",
         f"≥ 0.8: {_met(upsert_ratio >= 0.8)}"),
        ("4. shards' RSS growth a segment (a member)",
         f"{mem['shards_rss_per_segment'] / 1024:,.0f} KiB ({mem['rss_per_member']:.2f} B)",
         (f"bitmaps serialized: {mem['serialized_per_segment'] / 1024:,.1f} KiB "
         f"({mem['serialized_per_member']:.3f} B)"),
         f"{mem['shards_rss_per_segment'] / mem['serialized_per_segment']:.2f}", ""),
    ]
    for way, label in (("grpc", "gRPC client"), ("link", "client on the router's link")):
        cs = res["counts"][way]
        rows.append((f"5. count(in_segment), {label}, median / p99 ms", _ms(cs["in_segment"]),
                     f"count(its query): {_ms(cs['query'])}", _vs(cs["in_segment"], cs["query"]),
                     f"median ≤ 1 ms: {_met(cs['in_segment']['median_ms'] <= 1)}"))
    rows.append((f"6. CPU s a second over the writes alone ({alone:.3f})",
                 f"watch: {extra['writes_watched']:+.3f}",
                 f"polling: {extra['writes_polled']:+.3f}",
                 f"{extra['writes_watched'] / extra['writes_polled']:.2f}"
                 if extra["writes_polled"] else "-", ""))
    lines = [
        (f"Command: `{m['command']}`; {m['date']}; nproc {mc['cpus']}, "
         f"{mc['memory_bytes'] / (1 << 30):.1f} GiB RAM, {mc['cpu']}, Python {mc['python']}. "
         f"{m['size']:,} profiles, {m['shards']} shards behind the router (`--sync off`); "
         f"{m['segments']} segments (seed {m['segment_seed']}): members "
         f"{seg['members']['min']:,}-{seg['members']['max']:,} (median "
         f"{seg['members']['median']:,}); predicates {seg['predicates']}. Run "
         f"{m['total_s']:.0f} s."),
        "",
        "| figure | with the feature | peer, same run | ratio | target |",
        "|---|---:|---:|---:|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        (f"Polling, {pq['rounds']} rounds alone: a round of the {m['segments']} queries "
         f"({pq['ids_per_round']:,} ids) median / p99 {_ms(pq['round'])} ms; CPU a round "
         + ", ".join(f"{k} {v:.2f} s" for k, v in pq["cpu_s_per_round"].items())
         + f" ({sum(pq['cpu_s_per_round'].values()):.2f} s). Under the writes: "
         f"{res['writes_polled']['rounds']} rounds, {_ms(res['writes_polled']['round'])} ms."),
        "",
        "CPU seconds a second during the same flips (shards / router / client / poller = all):",
        "",
    ]
    for label, key in (("writes alone, no segments", "writes_alone"),
                       ("writes + polling, no segments", "writes_polled"),
                       ("writes, 100 segments, no watcher", "writes_segments"),
                       ("writes, 100 segments + watcher", "writes_watched")):
        r = res[key]["cpu_per_s"]
        lines.append(f"- {label}: " + " / ".join(f"{r.get(k, 0):.3f}" for k in (
            "shards", "router", "client", "poller")) + f" = {r['total']:.3f}; upsert ack "
            f"median / p99 {_ms(res[key]['ack'])} ms")
    idle = res["idle"]
    lines += [
        (f"- idle {m['idle_s']:g} s: {idle['without']['total']:.3f} without a watcher, "
         f"{idle['with_watcher']['total']:.3f} with one"),
        "",
        (f"Creating a segment on the loaded cluster: {_ms(res['create'])} ms. Load CPU µs a "
         "profile, with segments: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                 lw["cpu_us_per_profile"].items())
         + "; without: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                     lo["cpu_us_per_profile"].items())
         + f". The upserts set {', '.join(UPSERTED[:3])} and increment orders; "
         f"{res['upserts_read_by']} of the {m['segments']} segments read one of them."),
    ]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--size", default=1_000_000, show_default=True, help="Profiles (bench.datagen).")
@click.option("--seed", default=42, show_default=True, help="The profiles' seed.")
@click.option("--segment-seed", default=7, show_default=True, help="The segments' draws.")
@click.option("--segments", "n_segments", default=100, show_default=True)
@click.option("--writes", default=2000, show_default=True,
              help="Flips a write-load run (half ENTER the probe segment).")
@click.option("--pace-ms", default=15.0, show_default=True, help="One flip every this long.")
@click.option("--upserts", "n_upserts", default=3000, show_default=True,
              help="Sequential single upserts, each to the clusters with and without segments.")
@click.option("--count-reps", default=10, show_default=True,
              help="Times each segment is counted each way from each client.")
@click.option("--poll-period", default=1.0, show_default=True,
              help="Seconds between polling rounds (the alternative).")
@click.option("--poll-rounds", default=3, show_default=True, help="Rounds timed alone.")
@click.option("--idle", "idle_s", default=5.0, show_default=True,
              help="Seconds idle with and without a watcher (its standing cost).")
@click.option("--snapshot-log-mb", default=4096, show_default=True,
              help="Passed to `memstore serve`: high, so no snapshot forks while timing.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for results.json and segments.md [default: "
                   "bench/results/segments-<size>].")
def main(size: int, seed: int, segment_seed: int, n_segments: int, writes: int,
         pace_ms: float, n_upserts: int, count_reps: int, poll_period: float,
         poll_rounds: int, idle_s: float, snapshot_log_mb: int, out: Path | None) -> None:
    """Saved segments and watch at scale, against re-running the queries every second."""
    opt = Options(size=size, seed=seed, segment_seed=segment_seed, segments=n_segments,
                  writes=writes, pace_s=pace_ms / 1e3, upserts=n_upserts, count_reps=count_reps,
                  poll_period_s=poll_period, poll_rounds=poll_rounds, idle_s=idle_s,
                  snapshot_log_mb=snapshot_log_mb,
                  out=out or Path(f"bench/results/segments-{size}"))
    try:
        res = run(opt)
    except CrossCheckError as e:
        click.echo(f"CROSS-CHECK FAILED, no figures reported: {e}", err=True)
        sys.exit(2)
    opt.out.mkdir(parents=True, exist_ok=True)
    write_json(res, opt.out / "results.json")
    md = markdown(res)
    (opt.out / "segments.md").write_text(md)
    print(md)
    print(json.dumps({k: res[k] for k in ("load_with", "load_without")}, indent=1))


if __name__ == "__main__":
    main()
