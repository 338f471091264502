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

    python -m bench.export --size 1000000 [--shards 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cluster import Proc, client
from bench.datagen import Dataset, iter_records, load_or_generate, schema_declaration
from bench.peers.duckdb_peer import DuckDBPeer
from bench.run import machine

TARGET = 100_000  # profiles/s at 1M through the router (issue 27)


def run_export(address: str, query: str, output: Path) -> dict[str, Any]:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "memstore.cli", "export", "--query", query,
                           "--output", str(output), "--no-progress", "--address", address],
                          capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t
    exported = int(done.stderr.strip().split()[-2])
    return {"query": query, "file": output.suffix, "profiles": exported,
            "seconds": round(seconds, 2), "profiles_per_s": round(exported / seconds),
            "bytes": output.stat().st_size}


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


def run(size: int, shards: int = 2, seed: int = 42) -> dict[str, Any]:
    """The whole measurement (DuckDB's copies, then memstore's exports): its summary."""
    ds = load_or_generate(size, seed)
    out: dict[str, Any] = {"size": size, "shards": shards, "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        out["duckdb"] = duckdb_copies(ds, Path(tmp))
    router = Proc(["serve", "--in-memory", "--shards", str(shards), "--port", "0"],
                  "memstore serve")
    try:
        with client(router.addr) as c:
            c.declare(schema_declaration())
            t = time.perf_counter()
            c.load(iter_records(ds), progress=False)
            out["load_s"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            first = next(iter(c.iter_export("ALL", chunk_size=2000)))
            out["first_chunk_ms"] = round((time.perf_counter() - t) * 1000, 1)
            assert first
        with tempfile.TemporaryDirectory() as tmp:
            runs = [run_export(router.addr, "ALL", Path(tmp) / "all.jsonl"),
                    run_export(router.addr, "ALL", Path(tmp) / "all.parquet"),
                    run_export(router.addr, 'country = "US"', Path(tmp) / "us.jsonl")]
        peer = {r["file"]: r["profiles_per_s"] for r in out["duckdb"]}
        for r in runs:
            if r["query"] == "ALL":
                assert r["profiles"] == size, r
                r["vs_duckdb"] = round(r["profiles_per_s"] / peer[r["file"]], 2)
        out["exports"] = runs
        out["target_profiles_per_s"] = TARGET
        out["target_met"] = all(r["profiles_per_s"] >= TARGET for r in runs
                                if r["query"] == "ALL")
    finally:
        router.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    opt = parser.parse_args()
    print(json.dumps(run(opt.size, opt.shards, opt.seed), indent=2))


if __name__ == "__main__":
    main()
