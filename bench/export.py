"""Bulk export (`memstore export --query EXPR --output FILE`) through a router, timed.

One job: load the seeded profiles (bench.datagen) into `memstore serve --in-memory --shards
K`, then time the `memstore export` command itself (a separate process, as an operator
runs it: its start-up, the query, the shards' copies, the router's relay, decoding and
writing the file) for every profile as JSON Lines and as Parquet, and for a segment; and
the time from the call to the first chunk (each shard's copy is taken in one step: the
pause a shard's other callers see). Prints a JSON summary.

The peer, in the same run and before memstore starts (the 2 cores hold one system at a
time): DuckDB in process with the same profiles in a table (bench/peers/duckdb_peer.py),
timing `COPY profiles TO FILE` as JSON Lines and as Parquet: a columnar engine writing its
own table, with no network, no query and no per-profile identifiers or merged ids. Each
memstore figure comes with its ratio to DuckDB's for the same format.

Beside each time: the CPU seconds each process spent on it (the router, the shards, the
`memstore export` command) and the load average around it. On a machine shared with other
work the rate follows the share of the cores the export got; the CPU seconds do not, so
they tell two versions apart where the rates cannot, and total CPU / cores is the least
time the export can take on that many idle cores.

`--before DIR`: the same measurement for the memstore in DIR too (another commit, e.g. from
`git archive`; its server and its `memstore export` command, run in DIR with DIR first on
PYTHONPATH), in the same run, on the same data: both clusters are loaded first, then each
export runs on one and the other in turn, so that both see the same load.

    python -m bench.export --size 1000000 [--shards 2] [--runs 2] [--before DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cluster import Proc, client, cpu_seconds, descendants
from bench.datagen import Dataset, iter_records, load_or_generate, schema_declaration
from bench.memstore_side import in_code
from bench.peers.duckdb_peer import DuckDBPeer
from bench.run import machine

TARGET = 100_000  # profiles/s at 1M through the router (issue 27)


def run_export(router: Proc, query: str, output: Path, code: Path | None = None
               ) -> dict[str, Any]:
    """`memstore export` as a separate process (the one in `code`, or this tree's), timed,
    with the CPU seconds of each process (router, shards, the command) and the load
    average around it."""
    root = router.proc.pid
    shards = [p for p, depth in descendants(root).items() if depth == 1]
    before = {p: cpu_seconds(p) for p in [root, *shards]}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "memstore.cli", "export", "--query", query,
                           "--output", str(output), "--no-progress", "--address",
                           router.addr], capture_output=True, text=True, check=True,
                          **in_code(code))
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    exported = int(done.stderr.strip().split()[-2])
    cpu = {"router": cpu_seconds(root) - before[root],
           "shards": sum(cpu_seconds(p) - before[p] for p in shards),
           "command": (after.ru_utime + after.ru_stime)
           - (children.ru_utime + children.ru_stime)}
    cpu = {k: round(v, 2) for k, v in cpu.items()}
    total = sum(cpu.values())
    return {"query": query, "file": output.suffix, "profiles": exported,
            "seconds": round(seconds, 2), "profiles_per_s": round(exported / seconds),
            "bytes": output.stat().st_size, "cpu_s": cpu, "cpu_total_s": round(total, 2),
            "cpu_us_per_profile": round(total / max(exported, 1) * 1e6, 2),
            # the least time on these cores were they idle: total CPU over the cores
            "profiles_per_s_cpu_bound": round(exported / (total / (os.cpu_count() or 1))),
            "load_avg": [round(load, 2), round(os.getloadavg()[0], 2)]}


def duckdb_copies(ds: Dataset, directory: Path) -> list[dict[str, Any]]:
    """DuckDB writing its table of the same profiles as JSON Lines and as Parquet."""
    peer = DuckDBPeer(ds)
    try:
        peer.load()
        runs = []
        for name, options in (("all.jsonl", "FORMAT JSON"), ("all.parquet", "FORMAT PARQUET")):
            path = directory / f"duckdb-{name}"
            t = time.perf_counter()
            peer.con.execute(f"COPY profiles TO '{path}' ({options})")
            seconds = time.perf_counter() - t
            runs.append({"file": path.suffix, "profiles": ds.size,
                         "seconds": round(seconds, 2),
                         "profiles_per_s": round(ds.size / seconds),
                         "bytes": path.stat().st_size})
            path.unlink()
        return runs
    finally:
        peer.close()


def start(ds: Dataset, shards: int, code: Path | None) -> tuple[Proc, dict[str, Any]]:
    """A cluster of the memstore in `code` (None: this tree's) with the profiles loaded."""
    out: dict[str, Any] = {"code": str(code) if code else "this tree"}
    saved = dict(os.environ), os.getcwd()
    if code is not None:  # Proc starts `memstore serve` with this process's environment
        os.environ.update(in_code(code)["env"])
        os.chdir(code)
    try:
        router = Proc(["serve", "--in-memory", "--shards", str(shards), "--port", "0"],
                      "memstore serve")
    finally:
        os.environ.clear()
        os.environ.update(saved[0])
        os.chdir(saved[1])
    with client(router.addr) as c:
        c.declare(schema_declaration())
        t = time.perf_counter()
        c.load(iter_records(ds), progress=False)
        out["load_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        first = next(iter(c.iter_export("ALL", chunk_size=2000)))
        out["first_chunk_ms"] = round((time.perf_counter() - t) * 1000, 1)
        assert first
    return router, out


EXPORTS = (("ALL", "all.jsonl"), ("ALL", "all.parquet"), ('country = "US"', "us.jsonl"))


def run(size: int, shards: int = 2, seed: int = 42, runs: int = 1,
        before: Path | None = None) -> dict[str, Any]:
    """The whole measurement (DuckDB's copies, then memstore's exports; with `before`, the
    memstore there too, both clusters up at once and each export alternating between the
    two, so that both see the same load): its summary. Each export's fastest of `runs`."""
    ds = load_or_generate(size, seed)
    out: dict[str, Any] = {"size": size, "shards": shards, "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        out["duckdb"] = duckdb_copies(ds, Path(tmp))
    peer = {r["file"]: r["profiles_per_s"] for r in out["duckdb"]}
    codes = ([before] if before else []) + [None]
    clusters: list[tuple[Proc, dict[str, Any]]] = []
    try:
        for code in codes:
            clusters.append(start(ds, shards, code))
        for _, version in clusters:
            version["exports"] = []
        with tempfile.TemporaryDirectory() as tmp:
            for query, name in EXPORTS:
                best: list[dict[str, Any]] = [{} for _ in codes]
                for _ in range(runs):
                    for i, (code, (router, _)) in enumerate(zip(codes, clusters)):
                        r = run_export(router, query, Path(tmp) / name, code)
                        if not best[i] or r["seconds"] < best[i]["seconds"]:
                            best[i] = r
                for (_, version), r in zip(clusters, best):
                    version["exports"].append(r)
    finally:
        for router, _ in clusters:
            router.stop()
    versions = [version for _, version in clusters]
    for version in versions:
        for r in version["exports"]:
            if r["query"] == "ALL":
                assert r["profiles"] == size, r
                r["vs_duckdb"] = round(r["profiles_per_s"] / peer[r["file"]], 2)
    if before:
        out["before"] = versions[0]
    out.update(versions[-1])
    out["target_profiles_per_s"] = TARGET
    out["target_met"] = all(r["profiles_per_s"] >= TARGET for r in out["exports"]
                            if r["query"] == "ALL")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", type=int, default=1,
                        help="time each export this many times; report the fastest")
    parser.add_argument("--before", type=Path, default=None, metavar="DIR",
                        help="first measure the memstore in DIR (another commit's tree)")
    opt = parser.parse_args()
    print(json.dumps(run(opt.size, opt.shards, opt.seed, opt.runs, opt.before), indent=2))


if __name__ == "__main__":
    main()
