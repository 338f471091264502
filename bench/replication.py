"""`python -m bench.replication`: what replicas cost and how fast they catch up.

One job, in one run on this machine: three single-shard setups side by side on the same
load, each a `serve-shard` primary on a fresh data directory (--sync always):

- none: no replica;
- async: one replica (`--replica-of`), `--replication async`;
- sync: one replica, `--replication sync`.

For each: sequential single upserts (median and p99 latency of `--upserts` calls from one
client), then a bulk load of `--profiles` profiles (`Client.load`, profiles/s), then how
long the replica takes to hold all of it after the load is acknowledged (its lag). Last, a
full resync: a new replica of the loaded async primary, from start to holding the whole
log. Absolute figures move with the machine (2 cores shared with other work here); the
ratios are the finding.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from memstore import Client
from tests.conftest import ServerProcess, start_shard


def _position(address: str) -> int:
    with Client(address) as c:
        return int(c.stats()["log.position"])


def _wait(primary: str, replica: str, timeout: float = 600.0) -> float:
    started = time.perf_counter()
    want = _position(primary)
    while _position(replica) < want:
        if time.perf_counter() - started > timeout:
            raise TimeoutError("the replica did not catch up")
        time.sleep(0.01)
    return time.perf_counter() - started


def _connected(primary: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        with Client(primary) as c:
            if c.stats().get("replication.replicas") == "1":
                return
        if time.monotonic() > deadline:
            raise TimeoutError("the replica never connected")
        time.sleep(0.05)


def _records(n: int, prefix: str) -> Any:
    return ({"id": f"{prefix}{i}", "attributes": {"n": i, "city": f"c{i % 50}",
                                                   "tags": [f"t{i % 7}"]}} for i in range(n))


def _setup(root: Path, mode: str, upserts: int, profiles: int) -> dict[str, Any]:
    started: list[ServerProcess] = []
    try:
        primary = start_shard(root / f"{mode}-primary",
                              *(() if mode == "none" else ("--replication", mode)))
        started.append(primary)
        replica = None
        if mode != "none":
            replica = start_shard(root / f"{mode}-replica", "--replica-of", primary.address)
            started.append(replica)
            _connected(primary.address)
        times = []
        with Client(primary.address) as c:
            for i in range(upserts):
                t = time.perf_counter()
                c.upsert(f"single{i}", {"n": i})
                times.append(time.perf_counter() - t)
            t = time.perf_counter()
            c.load(_records(profiles, "p"))
            load_s = time.perf_counter() - t
        out: dict[str, Any] = {
            "mode": mode,
            "upsert_median_ms": round(statistics.median(times) * 1000, 3),
            "upsert_p99_ms": round(sorted(times)[int(len(times) * 0.99) - 1] * 1000, 3),
            "load_profiles_per_s": round(profiles / load_s),
        }
        if replica is not None:
            out["replica_lag_after_load_s"] = round(_wait(primary.address, replica.address), 3)
        if mode == "async":
            t = time.perf_counter()
            fresh = start_shard(root / "full-resync", "--replica-of", primary.address)
            started.append(fresh)
            _wait(primary.address, fresh.address)
            out["full_resync_s"] = round(time.perf_counter() - t, 2)
        return out
    finally:
        for server in reversed(started):
            server.stop()


@click.command()
@click.option("--upserts", default=2000, show_default=True)
@click.option("--profiles", default=200_000, show_default=True)
def main(upserts: int, profiles: int) -> None:
    with tempfile.TemporaryDirectory(prefix="memstore-bench-repl-") as tmp:
        for mode in ("none", "async", "sync"):
            click.echo(_setup(Path(tmp), mode, upserts, profiles))


if __name__ == "__main__":
    main()
