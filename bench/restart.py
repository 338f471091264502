"""Restart of one shard process, timed from the signal: after SIGKILL over the log alone,
after SIGTERM (a clean stop), and after SIGKILL over a fresh snapshot (issue 29).

One job: start `memstore serve-shard` (the real command, on loopback, over a temporary data
directory of its own), load the bench's profiles into it (bench.datagen, seed 42, with the
bench's schema declaration, through `memstore.Client.load` as bench/memstore_side.py does),
then stop and restart it three ways, each building on the state the previous one left so
the profiles are loaded once:

1. `log-kill` starts from the load: every profile in the log and no snapshot (the shard
   runs with --snapshot-log-mb and --snapshot-interval far above anything the load
   reaches, so no automatic snapshot is taken, during the load or after any restart).
   SIGKILL, restart: the whole log replayed. Also gives the replay rate, N ÷ the seconds
   from the signal until the new process listens (its start-up included: `empty_start_s`
   is the same code's empty shard's, the part of any start that is not the data).
2. `log-term` starts from log-kill's restarted shard: the same profiles, still only in
   the log. SIGTERM, restart. A shard that snapshots on a clean stop
   (--stop-snapshot-timeout) restarts from that snapshot; one that does not replays the
   log again. Reported: the shard's own line about it (`stop_snapshot`) and the snapshot
   files on disk after the stop.
3. `snapshot-kill` starts from log-term's restarted shard; a snapshot is taken now (the
   Snapshot admin call, `Client.snapshot`, timed), so nothing is in the log after it.
   SIGKILL, restart: the snapshot loaded, (almost) nothing replayed.

Each restart reports, all from the signal: `stop_s` (until the old process is gone),
`listening_s` (until the new one logs that it listens) and `answered_s` (until a Count of
ALL returns N: the first correct answer); `start_s` (the new process's own time, from its
spawn until it listens); the data directory's bytes after the stop (log, snapshots); the
snapshot files at the signal and after the stop; and the restarted process's RSS, whole
and less the empty shard's RSS (the same code's fresh process before the load), ÷ N.
Memory after the load is measured as the bench does (RSS growth over the load ÷ N).
Each code's bytecode is written first, as `pip install` does (`compile_bytecode`).

`--before DIR`: the same for the memstore in DIR too (another commit's tree, e.g. from
`git archive`; its `serve-shard` run in DIR with DIR first on PYTHONPATH, loaded and
queried by this tree's client), in the same run. One code's shard is up at a time, so 10M
profiles fit: load, its three restarts, delete its directory, then the other code. With
`--runs R` the whole sequence runs R times, the codes alternating which goes first; the
summary gives each figure's median, p99 (nearest rank: the largest below 100 runs), min and
max over the runs, and the current code ÷ the before code's medians. Options a code's
`serve-shard --help` does not list are left out for it and named in `flags_missing`.

`--events PER_PROFILE`: after the load, bench.events' seeded events (Zipf-like over the
profiles and ten names, 90 days; PER_PROFILE × N of them) are tracked on the profiles
through `Client.load_events`, so each restart replays tracked batches too (`events`: how
long they took, and the log's bytes after).

`--peers duckdb,redis`: first (before any shard starts), the same profiles' memory in
DuckDB (in process: its own memory accounting) and in Redis with RediSearch (RSS growth),
as the bench's memory workload measures them (bench/peers/). Redis holds ~2.7 KB a profile,
so it is loaded with the first `--redis-max` profiles at most; it is reported absent, not
failed, where redis-server or its module is missing.

    python -m bench.restart --size 1000000 [--before DIR] [--runs R] [--peers duckdb,redis]
        [--events PER_PROFILE] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import compileall
import json
import math
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.datagen import Dataset, load_or_generate, profile_id
from bench.memstore_side import MemstoreServer, dir_bytes, in_code
from bench.run import machine
from memstore.client import Client
from memstore.server.logs import message

SCENARIOS = ("log-kill", "log-term", "snapshot-kill")
NO_AUTO_SNAPSHOT = {"--snapshot-log-mb": str(1 << 20),  # 1 TiB of log
                    "--snapshot-interval": str(1e9)}  # ~32 years
STOP_LINE = "snapshot before stopping: "  # what a shard logs about its stop snapshot
ANSWER_TIMEOUT = 60.0  # seconds a listening shard has to count N


def serve_shard_flags(code: Path | None, stop_snapshot_timeout: float
                      ) -> tuple[list[str], list[str]]:
    """The options this run gives the `serve-shard` in `code` (None: this tree's): no
    automatic snapshot, and the clean stop's snapshot timeout; and the ones its `--help`
    does not list, left out."""
    wanted = {**NO_AUTO_SNAPSHOT, "--stop-snapshot-timeout": str(stop_snapshot_timeout)}
    helped = subprocess.run([sys.executable, "-m", "memstore.cli", "serve-shard", "--help"],
                            capture_output=True, text=True, check=True, **in_code(code))
    known = set(helped.stdout.split())
    args = [x for flag, value in wanted.items() if flag in known for x in (flag, value)]
    return args, [flag for flag in wanted if flag not in known]


def on_disk(data_dir: Path) -> dict[str, Any]:
    """What a restart reads: the log's and the snapshots' bytes, and the snapshot files."""
    snaps = data_dir / "snapshots"
    return {"log_bytes": dir_bytes(data_dir / "log"), "snapshot_bytes": dir_bytes(snaps),
            "total_bytes": dir_bytes(data_dir),
            "snapshots": sorted(p.name for p in snaps.glob("*.snap")) if snaps.is_dir() else []}


def first_answer(ms: MemstoreServer, n: int) -> int:
    """Count ALL until it is `n`; how many calls that took. Raises if it never is."""
    deadline = time.monotonic() + ANSWER_TIMEOUT
    tries = 0
    got: Any = None
    while True:
        tries += 1
        try:
            got = int(ms.client.count("ALL"))
        except Exception as e:  # noqa: BLE001 - any refusal: not answering yet
            got = f"{type(e).__name__}: {e}"
        if got == n:
            return tries
        if time.monotonic() > deadline:
            raise RuntimeError(f"restarted shard counts {got!r}, not {n}, after "
                               f"{ANSWER_TIMEOUT:g} s")
        time.sleep(0.01)


def restart(ms: MemstoreServer, sig: signal.Signals, n: int, empty_rss: int,
            stop_wait: float) -> dict[str, Any]:
    """Stop the shard with `sig` and start it again over its directory, timed from the
    signal until it listens and until it counts `n`."""
    assert ms.proc is not None and ms.drain is not None
    at_signal = on_disk(ms.dir)["snapshots"]
    ms.client.close()
    ms.client = None
    seen = len(ms.log_lines)
    t = time.perf_counter()
    ms.proc.send_signal(sig)
    try:
        ms.proc.wait(stop_wait)
        forced = False
    except subprocess.TimeoutExpired:  # report it; the restart still measures the start
        ms.proc.kill()
        ms.proc.wait()
        forced = True
    stop_s = time.perf_counter() - t
    ms.drain.join(10)
    said = [message(line) for line in ms.log_lines[seen:]]
    stop_snapshot = next((m[len(STOP_LINE):] for m in said if m.startswith(STOP_LINE)), None)
    ms.proc = None
    disk = on_disk(ms.dir)
    start_s = ms.start()
    listening_s = time.perf_counter() - t
    tries = first_answer(ms, n)
    answered_s = time.perf_counter() - t
    rss = ms.rss()
    return {"signal": sig.name, "stop_s": round(stop_s, 3), "killed_after_stop_wait": forced,
            "listening_s": round(listening_s, 3), "answered_s": round(answered_s, 3),
            "start_s": round(start_s, 3), "count_calls": tries,
            "snapshots_at_signal": at_signal, "stop_snapshot": stop_snapshot,
            "snapshot_after_stop": bool(disk["snapshots"]), "on_disk_after_stop": disk,
            "rss_bytes": rss, "rss_bytes_per_profile": round(rss / n, 1),
            "rss_growth_bytes_per_profile": round((rss - empty_rss) / n, 1)}


def measure(ds: Dataset, code: Path | None, opt: argparse.Namespace,
            log: Callable[[str], None]) -> dict[str, Any]:
    """One code's whole sequence: a fresh shard, the load, the three restarts; its
    directory deleted after."""
    name = str(code) if code else "current"
    args, missing = serve_shard_flags(code, opt.stop_snapshot_timeout)
    stop_wait = opt.stop_snapshot_timeout + 120.0  # the snapshot, draining calls, closing
    ms = MemstoreServer(ds, sync=opt.sync, start_timeout=opt.start_timeout, args=args,
                        code=code)
    out: dict[str, Any] = {"code": name, "serve_shard_args": args, "flags_missing": missing}
    try:
        out["empty_start_s"] = round(ms.start(), 3)
        load = ms.load()
        empty_rss = load["rss_before"]
        out["load"] = {"seconds": round(load["seconds"], 2),
                       "profiles_per_s": round(load["rows_per_s"]),
                       "rss_empty_bytes": empty_rss, "rss_after_bytes": load["rss_after"],
                       "bytes_per_profile": round(load["bytes_per_profile"], 1)}
        assert load["loaded"] == ds.size, load
        log(f"{name}: loaded {ds.size:,} in {load['seconds']:.1f} s, "
            f"{load['bytes_per_profile']:.0f} bytes a profile")
        if opt.events:
            out["events"] = track_events(ms, ds.size, opt.events, opt.seed)
            log(f"{name}: tracked {out['events']['events']:,} events in "
                f"{out['events']['seconds']:.1f} s")
        scenarios: dict[str, Any] = {}
        r = restart(ms, signal.SIGKILL, ds.size, empty_rss, stop_wait)
        r["replay_profiles_per_s"] = round(ds.size / r["listening_s"])
        scenarios["log-kill"] = r
        log(f"{name}: log-kill: {json.dumps(r)}")  # each figure as it comes: a failure later
        scenarios["log-term"] = restart(ms, signal.SIGTERM, ds.size, empty_rss, stop_wait)
        log(f"{name}: log-term: {json.dumps(scenarios['log-term'])}")  # loses nothing
        t = time.perf_counter()
        with Client(ms.addr, timeout=opt.start_timeout) as admin:  # 10M: minutes, not the
            taken = admin.snapshot()                               # client's default
        snapshot_s = time.perf_counter() - t
        r = restart(ms, signal.SIGKILL, ds.size, empty_rss, stop_wait)
        scenarios["snapshot-kill"] = {"snapshot_call_s": round(snapshot_s, 3),
                                      "snapshot_path": Path(taken["path"]).name, **r}
        for s, r in scenarios.items():
            log(f"{name}: {s}: stop {r['stop_s']:.2f} s, listening {r['listening_s']:.2f} s,"
                f" answered {r['answered_s']:.2f} s")
        out["scenarios"] = scenarios
    finally:
        ms.stop(signal.SIGKILL)  # nothing more to keep: a clean stop could snapshot again
        shutil.rmtree(ms.dir, ignore_errors=True)
    return out


def track_events(ms: MemstoreServer, size: int, per_profile: float, seed: int
                 ) -> dict[str, Any]:
    """Track bench.events' seeded events (Zipf-like over the profiles and 10 names, 90
    days) on the loaded profiles, through `Client.load_events`: what a restart then
    replays besides the load."""
    from bench.events import EVENT_NAMES, generate

    ev = generate(size, per_profile, seed)
    who, name, at = ev["who"].tolist(), ev["name"].tolist(), ev["at"].tolist()
    t = time.perf_counter()
    n = ms.client.load_events({"id": profile_id(w), "event": EVENT_NAMES[e], "at": a}
                              for w, e, a in zip(who, name, at, strict=True))
    seconds = time.perf_counter() - t
    return {"events": n, "seconds": round(seconds, 2), "events_per_s": round(n / seconds),
            "on_disk": on_disk(ms.dir)}


def head(ds: Dataset, n: int) -> Dataset:
    """The first `n` profiles of `ds` (the same rows, not a new draw)."""
    if n >= ds.size:
        return ds
    return replace(ds, size=n, cols={k: v[:n] for k, v in ds.cols.items()},
                   present={k: v[:n] for k, v in ds.present.items()},
                   device=None if ds.device is None else ds.device[:n])


def peer_memory(ds: Dataset, peers: list[str], redis_max: int) -> dict[str, Any]:
    """Bytes a profile of the same profiles in each peer, as the bench's memory workload
    measures it (bench/run.py): DuckDB's own accounting, Redis's RSS growth."""
    out: dict[str, Any] = {}
    for name in peers:
        if name == "duckdb":
            from bench.peers.duckdb_peer import DuckDBPeer

            peer: Any = DuckDBPeer(ds)
            data = ds
        elif name == "redis":
            from bench.peers.redis_peer import RedisPeer

            data = head(ds, redis_max)
            peer = RedisPeer(data)
            if not peer.available:
                out[name] = {"absent": peer.reason}
                continue
        else:
            raise SystemExit(f"unknown peer {name!r} (duckdb, redis)")
        try:
            load = peer.load()
        finally:
            peer.close()
        b = load.get("rss_growth") or load.get("bytes")
        out[name] = {"profiles": data.size, "bytes": b,
                     "bytes_per_profile": round(b / data.size, 1) if b else None}
    return out


def stats(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    return {"median": statistics.median(ordered),
            "p99": ordered[math.ceil(0.99 * len(ordered)) - 1],
            "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


FIGURES = ("stop_s", "listening_s", "answered_s", "start_s", "rss_bytes_per_profile",
           "rss_growth_bytes_per_profile", "replay_profiles_per_s", "snapshot_call_s")


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure over the runs of one code."""
    out: dict[str, Any] = {"empty_start_s": stats([r["empty_start_s"] for r in runs]),
                           "load": {k: stats([r["load"][k] for r in runs])
                                    for k in ("profiles_per_s", "bytes_per_profile")}}
    for s in SCENARIOS:
        rs = [r["scenarios"][s] for r in runs]
        out[s] = {k: stats([r[k] for r in rs]) for k in FIGURES if k in rs[0]}
        out[s]["data_dir_bytes"] = stats([r["on_disk_after_stop"]["total_bytes"] for r in rs])
        out[s]["snapshot_after_stop"] = [r["snapshot_after_stop"] for r in rs]
        out[s]["stop_snapshot"] = sorted({r["stop_snapshot"] for r in rs}, key=str)
    return out


def ratios(current: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """The current code's medians ÷ the before code's."""
    out: dict[str, Any] = {"load.bytes_per_profile": round(
        current["load"]["bytes_per_profile"]["median"]
        / before["load"]["bytes_per_profile"]["median"], 3)}
    for s in SCENARIOS:  # (a SIGKILL's stop time is the kernel's: no ratio)
        for k in ("stop_s", "listening_s", "answered_s", "rss_growth_bytes_per_profile"):
            if k == "stop_s" and s != "log-term":
                continue
            b = before[s][k]["median"]
            out[f"{s}.{k}"] = round(current[s][k]["median"] / b, 3) if b else None
    return out


def compile_bytecode(code: Path) -> None:
    """Write the bytecode of the memstore in `code`, as `pip install` does: a start-up
    timed from source (an editable install under PYTHONDONTWRITEBYTECODE) would compile
    every module first, ~0.5 s of this machine's ~1 s empty start."""
    for package in ("memstore", "shards"):
        compileall.compile_dir(code / package, quiet=1)


def run(size: int, seed: int = 42, runs: int = 1, before: Path | None = None,
        peers: list[str] | None = None, sync: str = "always",
        stop_snapshot_timeout: float = 60.0, start_timeout: float = 3600.0,
        redis_max: int = 2_000_000, events: float = 0.0,
        log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """The whole measurement: its summary (see the module docstring)."""
    ds = load_or_generate(size, seed)
    before = before.resolve() if before else None  # its shard runs with DIR as its cwd
    opt = argparse.Namespace(sync=sync, stop_snapshot_timeout=stop_snapshot_timeout,
                             start_timeout=start_timeout, events=events, seed=seed)
    out: dict[str, Any] = {"size": size, "seed": seed, "runs": runs, "sync": sync,
                           "events_per_profile": events,
                           "stop_snapshot_timeout": stop_snapshot_timeout,
                           "machine": machine()}
    if peers:
        out["peers"] = peer_memory(ds, peers, redis_max)
        log(f"peers: {out['peers']}")
    codes: list[tuple[str, Path | None]] = ([("before", before)] if before else [])
    codes.append(("current", None))
    for _, code in codes:
        compile_bytecode(code or Path(__file__).resolve().parent.parent)
    measured: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in codes}
    for i in range(runs):
        for label, code in (codes if i % 2 == 0 else codes[::-1]):
            r = measure(ds, code, opt, log)
            r["run"] = i + 1
            measured[label].append(r)
    for label, rs in measured.items():
        out[label] = {"code": rs[0]["code"], "flags_missing": rs[0]["flags_missing"],
                      "summary": summary(rs), "runs": rs}
    if before:
        out["current_vs_before"] = ratios(out["current"]["summary"],
                                          out["before"]["summary"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat the whole sequence, alternating which code goes first")
    parser.add_argument("--before", type=Path, default=None, metavar="DIR",
                        help="also measure the memstore in DIR (another commit's tree)")
    parser.add_argument("--peers", default="",
                        help="comma-separated: duckdb, redis (memory of the same profiles)")
    parser.add_argument("--sync", default="always", choices=("always", "everysec", "off"),
                        help="the shard's --sync (the bench's: always)")
    parser.add_argument("--stop-snapshot-timeout", type=float, default=60.0,
                        help="the shard's --stop-snapshot-timeout, where it has one")
    parser.add_argument("--start-timeout", type=float, default=3600.0,
                        help="seconds a restart may take before the run fails")
    parser.add_argument("--redis-max", type=int, default=2_000_000,
                        help="load Redis with at most the first this many profiles")
    parser.add_argument("--events", type=float, default=0.0, metavar="PER_PROFILE",
                        help="after the load, also track this many events a profile "
                             "(bench.events' seeded ones): restarts replay them too")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.json",
                        help="also write the summary here")
    opt = parser.parse_args()
    res = run(opt.size, opt.seed, opt.runs, opt.before,
              [p for p in opt.peers.split(",") if p], opt.sync, opt.stop_snapshot_timeout,
              opt.start_timeout, opt.redis_max, opt.events,
              log=lambda s: print(s, file=sys.stderr, flush=True))
    text = json.dumps(res, indent=2)
    if opt.out:
        opt.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
