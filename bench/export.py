"""Bulk export (`memstore export --query EXPR --output FILE`) through a router, timed.

One job: load the seeded profiles (bench.datagen) into `memstore serve --in-memory --shards
K`, then time the `memstore export` command itself (a separate process, as an operator
runs it: its start-up, the query, the shards' copies, the router's relay, decoding and
writing the file) for every profile as JSON Lines and as Parquet, and for a segment; and
the time from the call to the first chunk (each shard's copy is taken in one step: the
pause a shard's other callers see). Prints a JSON summary.

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
from bench.datagen import iter_records, load_or_generate, schema_declaration


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    opt = parser.parse_args()
    ds = load_or_generate(opt.size, opt.seed)
    router = Proc(["serve", "--in-memory", "--shards", str(opt.shards), "--port", "0"],
                  "memstore serve")
    out: dict[str, Any] = {"size": opt.size, "shards": opt.shards}
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
        out["exports"] = runs
    finally:
        router.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
