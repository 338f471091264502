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

`--failover N` measures automatic failover instead (memstore/replication/coordinator.py):
a real etcd-server, then N times a shard of three members (`--coordinator`,
`--replication sync`, `--lease-seconds`) behind a router following etcd, writes through
the router, SIGKILL of the primary, and the time from the kill to the first write the
router acknowledges again; also when a replica served as primary, and whether every
acknowledged write reads back.
"""

from __future__ import annotations

import os
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click

from memstore import Client, ClientError
from tests.conftest import ServerProcess, start_router, start_shard
from tests.etcd import etcd_server


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


def _failover(root: Path, etcd: str, trial: int, lease: int) -> dict[str, Any]:
    """One kill: seconds from SIGKILL of the primary to a replica serving as primary and
    to the router's first acknowledged write after it."""
    name = f"bench-{trial}"
    members = [start_shard(root / f"{name}-{i}", "--name", name, "--coordinator", etcd,
                           "--lease-seconds", str(lease), "--replication", "sync")
               for i in range(3)]
    router = start_router([members[0].address], "--coordinator", etcd)
    try:
        acked: list[str] = []
        stop = threading.Event()

        def writer() -> None:
            with Client(router.address, timeout=10) as c:
                while not stop.is_set():
                    try:
                        c.upsert(f"w{len(acked)}", {"n": len(acked)})
                    except ClientError:
                        return
                    acked.append(f"w{len(acked)}")

        thread = threading.Thread(target=writer)
        thread.start()
        while len(acked) < 200:
            time.sleep(0.01)
        os.kill(members[0].proc.pid, signal.SIGKILL)
        killed = time.perf_counter()
        stop.set()
        thread.join(30)
        promoted = None
        with Client(router.address, timeout=2) as c:
            while True:
                if promoted is None and any(_role(m.address) == "primary"
                                            for m in members[1:]):
                    promoted = time.perf_counter() - killed
                try:
                    c.upsert("after", {"n": 1})
                    break
                except ClientError:
                    time.sleep(0.02)
            written = time.perf_counter() - killed
            lost = sum(p is None for p in c.batch_get(acked))
        return {"trial": trial, "lease_s": lease, "acked_before_kill": len(acked),
                "replica_primary_s": round(promoted or written, 2),
                "first_write_s": round(written, 2), "acked_lost": lost}
    finally:
        router.stop()
        for server in members:
            server.stop(signal.SIGKILL)


def _role(address: str) -> str:
    try:
        with Client(address, timeout=1) as c:
            return str(c.stats().get("replication.role"))
    except ClientError:
        return ""


@click.command()
@click.option("--upserts", default=2000, show_default=True)
@click.option("--profiles", default=200_000, show_default=True)
@click.option("--failover", "failovers", type=int, default=0,
              help="Measure automatic failover (this many kills, needs etcd) instead.")
@click.option("--lease-seconds", default=5, show_default=True,
              help="--failover: the members' --lease-seconds.")
def main(upserts: int, profiles: int, failovers: int, lease_seconds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="memstore-bench-repl-") as tmp:
        if failovers:
            with etcd_server(Path(tmp)) as etcd:
                runs = [_failover(Path(tmp), etcd, n, lease_seconds)
                        for n in range(failovers)]
            for run in runs:
                click.echo(run)
            times = [r["first_write_s"] for r in runs]
            click.echo({"first_write_median_s": statistics.median(times),
                        "first_write_max_s": max(times)})
            return
        for mode in ("none", "async", "sync"):
            click.echo(_setup(Path(tmp), mode, upserts, profiles))


if __name__ == "__main__":
    main()
