"""Replicas (memstore/replication/) with real processes on loopback: a primary, replicas
with their own data directories, SIGKILL and restarts. A replica must end in exactly the
primary's state, resume from its own position after a restart (partial resync), start over
from a snapshot when the primary no longer keeps that position (full resync), refuse
writes naming the primary, and leave no byte of an erased profile after its next snapshot.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest

from memstore import Client, ClientError
from memstore.server.logs import listening_address, message
from memstore.shard import Shard, ShardConfig
from memstore.storage import wal_format
from memstore.storage.wal_writer import SyncPolicy
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc
from tests.conftest import ROOT


@dataclass
class Proc:
    """A server process whose every log line is kept (`lines`)."""

    proc: subprocess.Popen[bytes]
    address: str
    data: Path
    lines: list[str] = field(default_factory=list)

    def said(self, text: str) -> list[str]:
        return [m for m in map(message, list(self.lines)) if text in m]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def start(data: Path, *args: str, env: dict[str, str] | None = None) -> Proc:
    """serve-shard on `data`, with the salt every process of the test shares (beside the
    data directories) unless `args` name one: a primary refuses a replica of another."""
    salt = () if "--salt-file" in args else ("--salt-file", str(data.parent / "cluster.salt"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "memstore.cli", "serve-shard", "--port", "0", "--data-dir",
         str(data), *salt, *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline().decode()
        if not line:
            break
        lines.append(line)
        address = listening_address(line)
        if address is not None:
            server = Proc(proc, address, data, lines)

            def pump() -> None:
                assert proc.stderr is not None
                for raw in proc.stderr:
                    lines.append(raw.decode())

            threading.Thread(target=pump, daemon=True).start()
            return server
    proc.kill()
    raise RuntimeError("serve-shard did not start:\n" + "".join(lines))


def primary_and_replica(tmp_path: Path, procs: list[Proc], *args: str,
                        name: str = "primary") -> tuple[Proc, Proc]:
    """A primary in tmp_path/NAME (started with `args`) and a replica of it in
    tmp_path/replica, both in `procs` (stopped at the test's end)."""
    primary = start(tmp_path / name, *args)
    procs.append(primary)
    replica = start(tmp_path / "replica", "--replica-of", primary.address)
    procs.append(replica)
    return primary, replica


def stats(address: str) -> dict[str, Any]:
    with Client(address) as c:
        return c.stats()  # type: ignore[no-any-return]


def wait_caught_up(primary: str, replica: str, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until the replica's log ends where the primary's does; the replica's stats."""
    deadline = time.monotonic() + timeout
    while True:
        want = stats(primary)["log.position"]
        got = stats(replica)
        if got["log.position"] == want and got.get("replication.connected") == "True":
            return got
        assert time.monotonic() < deadline, (f"replica at {got['log.position']}, primary "
                                             f"at {want}: {got}")
        time.sleep(0.05)


def upsert_until_accepted(c: Client, pid: str, attributes: dict[str, Any], since: float,
                          bound: float, context: str = "") -> None:
    """Upsert through `c` (a router, while a shard fails over) until a write is taken;
    fails once `bound` seconds have passed since `since` (monotonic)."""
    while True:
        try:
            c.upsert(pid, attributes)
            return
        except ClientError:
            assert time.monotonic() - since < bound, \
                f"no write accepted within {bound} s of the failover {context}"
            time.sleep(0.1)


@contextmanager
def writers(address: str, count: int = 3, first: int = 300, ops: Sequence[Any] = ()
            ) -> Iterator[list[str]]:
    """`count` threads upserting new profiles (with `ops`) through `address`, each until
    its first refusal or the block's end; yields the ids acknowledged, once `first` of
    them are."""
    acked: list[str] = []
    stop = threading.Event()

    def writer(prefix: str) -> None:
        with Client(address, timeout=10) as c:
            n = 0
            while not stop.is_set():
                try:
                    c.upsert(f"{prefix}-{n}", {"n": n}, ops=list(ops))
                except ClientError:
                    return
                acked.append(f"{prefix}-{n}")
                n += 1

    threads = [threading.Thread(target=writer, args=(f"w{t}",)) for t in range(count)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while len(acked) < first:
            assert time.monotonic() < deadline, f"only {len(acked)} writes acknowledged"
            time.sleep(0.01)
        yield acked
    finally:
        stop.set()
        for t in threads:
            t.join(30)


def wait_replicas(primary: str, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while stats(primary)["replication.replicas"] != str(count):
        assert time.monotonic() < deadline, "the replicas never connected"
        time.sleep(0.05)


def state(address: str) -> dict[str, Any]:
    """Everything a client can read of a shard: every profile as exported, the schema, the
    saved segments and their members."""
    with Client(address) as c:
        profiles = sorted((p for chunk in c.iter_export(timestamps="micros") for p in chunk),
                          key=lambda p: p["id"])
        segments = sorted((s["name"], s["members"], s["query"]) for s in c.segments())
        schema = sorted((a["name"], a["kind"]) for a in c.schema())
        return {"profiles": profiles, "segments": segments, "schema": schema,
                "count": c.count("ALL")}


def write_history(c: Client, start: int, end: int) -> None:
    """Loads, updates, increments, deletes, merges and a saved segment's changes."""
    c.load({"id": f"u{i}", "attributes": {"n": i, "city": f"c{i % 7}", "tags": [f"t{i % 3}"]},
            "identifiers": [["email", f"u{i}@x.io"]]} for i in range(start, end))
    for i in range(start, end, 5):
        c.upsert(f"u{i}", ops=[("increment", "n", 1000), ("add_to_set", "tags", ["five"])])
    deleted = set(range(start + 1, end, 11))
    for i in sorted(deleted):
        c.delete(f"u{i}")
    for i in range(start + 2, end - 3, 13):  # u(i+3)'s email links to u(i): a merge
        if not {i, i + 3} & deleted:
            c.link(f"u{i}", [("email", f"u{i + 3}@x.io")])


def test_a_replica_converges_to_the_primary_exactly(tmp_path: Path, procs: list[Proc]
                                                    ) -> None:
    primary = start(tmp_path / "primary")
    procs.append(primary)
    with Client(primary.address) as c:
        c.create_segment("fives", 'tags HAS "five"', allow_unknown=True)
        write_history(c, 0, 400)  # before the replica: its full resync carries these
        replica = start(tmp_path / "replica", "--replica-of", primary.address,
                        "--name", "replica-1")
        procs.append(replica)
        write_history(c, 400, 900)  # while it follows: the log stream carries these
        c.track("u7", "purchase", count=3)
        c.upsert("u8", ops=[("unset", "city", None)])
    after = wait_caught_up(primary.address, replica.address)
    assert after["replication.full_resyncs"] == "1"
    assert replica.said("full resync done:")
    assert state(replica.address) == state(primary.address)
    assert state(replica.address)["segments"][0][1] > 0  # the segment has members there too


def test_a_replica_killed_and_restarted_resumes_where_it_was(tmp_path: Path,
                                                             procs: list[Proc]) -> None:
    primary, replica = primary_and_replica(tmp_path, procs)
    with Client(primary.address) as c:
        write_history(c, 0, 300)
        wait_caught_up(primary.address, replica.address)
        replica.kill()
        position = int(stats(primary.address)["log.position"])
        write_history(c, 300, 600)  # while the replica is down
    replica = start(tmp_path / "replica", "--replica-of", primary.address)
    procs.append(replica)
    after = wait_caught_up(primary.address, replica.address)
    assert after["replication.full_resyncs"] == "0", replica.said("full resync")
    assert after["replication.partial_resyncs"] == "1"
    [line] = replica.said("partial resync: following")
    assert f"from position {position} " in line
    assert not replica.said("full resync")
    assert state(replica.address) == state(primary.address)


def test_a_primary_under_everysec_restarted_keeps_its_replicas_and_streams_going(
        tmp_path: Path, procs: list[Proc]) -> None:
    """Under --sync everysec a primary's restart makes a new history, continuing the old
    one up to where its recovered log ends: a replica at that point resumes with a
    partial resync, and a change stream's position from before the restart resumes."""
    address = f"127.0.0.1:{_free_port()}"
    port = address.rpartition(":")[2]
    primary = start(tmp_path / "primary", "--port", port, "--sync", "everysec")
    procs.append(primary)
    replica = start(tmp_path / "replica", "--replica-of", address)
    procs.append(replica)
    with Client(address) as c:
        write_history(c, 0, 200)
        here = next(iter(c.changes(heartbeats=True)))  # where a stream from now starts
        assert here.get("heartbeat") and here["position"]
    fulls = wait_caught_up(address, replica.address)["replication.full_resyncs"]  # its first
    with Client(replica.address) as r:  # a watcher reading from the replica
        there = next(iter(r.changes(heartbeats=True)))["position"]
    primary.kill()  # what it wrote is in the file: the log recovers to the replica's point
    primary = start(tmp_path / "primary", "--port", port, "--sync", "everysec")
    procs.append(primary)
    with Client(address) as c:
        c.upsert("after-restart", {"n": 1})
        assert next(iter(c.changes(from_position=here["position"])))["id"] == "after-restart"
    wait_caught_up(address, replica.address)
    with Client(replica.address) as r:  # its position survives the primary's new history
        assert next(iter(r.changes(from_position=there)))["id"] == "after-restart"
    with Client(address) as c:
        write_history(c, 200, 300)
    after = wait_caught_up(address, replica.address)
    assert after["replication.full_resyncs"] == fulls == "1", replica.said("full resync")
    assert replica.said("partial resync: following")
    assert state(replica.address) == state(address)


def test_a_replica_whose_position_the_primary_dropped_resyncs_in_full(
        tmp_path: Path, procs: list[Proc]) -> None:
    primary, replica = primary_and_replica(tmp_path, procs)
    with Client(primary.address) as c:
        write_history(c, 0, 200)
        wait_caught_up(primary.address, replica.address)
        assert replica.stop() == 0
        write_history(c, 200, 400)  # deletes among them: the snapshot drops the old log
        c.snapshot()
    replica = start(tmp_path / "replica", "--replica-of", primary.address)
    procs.append(replica)
    after = wait_caught_up(primary.address, replica.address)
    assert after["replication.full_resyncs"] == "1"
    [why] = replica.said("full resync from")
    assert "cannot continue from position" in why and "older than the oldest" in why
    assert state(replica.address) == state(primary.address)
    with Client(primary.address) as c:  # and it goes on following
        write_history(c, 400, 450)
    wait_caught_up(primary.address, replica.address)
    assert state(replica.address) == state(primary.address)


def test_a_replica_refuses_writes_naming_the_primary_and_tells_its_lag(
        tmp_path: Path, procs: list[Proc]) -> None:
    primary = start(tmp_path / "primary")
    procs.append(primary)
    replica = start(tmp_path / "replica", "--replica-of", primary.address,
                    "--metrics-port", "0")
    procs.append(replica)
    with Client(primary.address) as c:
        c.upsert("a", {"x": 1})
    wait_caught_up(primary.address, replica.address)
    [url] = [m.split("metrics on ", 1)[1] for m in replica.said("metrics on ")]
    with urllib.request.urlopen(url, timeout=10) as scrape:
        scraped = scrape.read().decode()
    assert "memstore_replication_lag_bytes 0.0" in scraped
    assert "memstore_replication_lag_seconds 0.0" in scraped
    with Client(replica.address) as c:
        for write in (lambda: c.upsert("b", {"x": 2}), lambda: c.delete("a"),
                      lambda: c.declare([{"name": "y", "kind": "int"}]),
                      lambda: c.create_segment("s", "x = 1")):
            with pytest.raises(ClientError) as refused:
                write()
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert f"read-only replica of {primary.address}" in refused.value.details
        assert c.get("b") is None and c.get("a")["attributes"] == {"x": 1}
    with grpc.insecure_channel(replica.address) as channel:
        stub = memstore_pb2_grpc.MemstoreStub(channel)
        _, call = stub.Get.with_call(pb.GetRequest(key=pb.ProfileKey(id="a")))
        trailers = dict(call.trailing_metadata())
        assert trailers["memstore-primary"] == primary.address
        assert trailers["memstore-replica-lag-bytes"] == "0"
        assert float(trailers["memstore-replica-lag-seconds"]) == 0.0
        with pytest.raises(grpc.RpcError) as refused_call:
            stub.Upsert(pb.UpsertRequest(id="c"))
        assert dict(refused_call.value.trailing_metadata())["memstore-primary"] == \
            primary.address
    primary.kill()  # the replica goes on answering reads; its lag grows
    deadline = time.monotonic() + 30
    while stats(replica.address)["replication.connected"] != "False":
        assert time.monotonic() < deadline, "the replica never noticed its primary died"
        time.sleep(0.05)
    with grpc.insecure_channel(replica.address) as channel:
        _, call = memstore_pb2_grpc.MemstoreStub(channel).Get.with_call(
            pb.GetRequest(key=pb.ProfileKey(id="a")))
        assert float(dict(call.trailing_metadata())["memstore-replica-lag-seconds"]) > 0


def test_erasure_on_the_primary_leaves_no_byte_on_the_replica(tmp_path: Path,
                                                              procs: list[Proc]) -> None:
    marker = "MARKER-replica-erase-91c2"
    primary, replica = primary_and_replica(tmp_path, procs)
    with Client(primary.address) as c:
        write_history(c, 0, 50)
        c.upsert("victim", {"note": marker}, identifiers=[("email", f"{marker}@x.io")])
        wait_caught_up(primary.address, replica.address)
        with Client(replica.address) as r:
            r.snapshot()  # the marker is in the replica's snapshot and log
            assert r.get("victim") is not None
        c.erase("victim")
    wait_caught_up(primary.address, replica.address)
    with Client(replica.address) as r:
        assert r.get("victim") is None
        r.snapshot()
    hits = [str(p) for p in (tmp_path / "replica").rglob("*")
            if p.is_file() and marker.encode() in p.read_bytes()]
    assert hits == []
    assert state(replica.address) == state(primary.address)


# ---------------------------------------------------------------------- --replication sync

def test_sync_replication_without_a_replica_refuses_writes(tmp_path: Path,
                                                           procs: list[Proc]) -> None:
    primary = start(tmp_path / "primary", "--replication", "sync",
                    "--replication-timeout", "0.3")
    procs.append(primary)
    with Client(primary.address) as c:
        with pytest.raises(ClientError) as refused:  # waits for a replica, up to 0.3 s
            c.upsert("first", {"x": 1})
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ClientError) as refused:  # none for 0.3 s: refused at once
            c.upsert("a", {"x": 1})
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert "no replica connected for 0.3 s" in refused.value.details
        assert "nothing was written" in refused.value.details
        assert c.get("a") is None  # reads are served
    fallback = start(tmp_path / "fallback", "--replication", "sync",
                     "--replication-timeout", "0.3", "--replication-fallback")
    procs.append(fallback)
    with Client(fallback.address) as c:
        c.upsert("a", {"x": 1})  # acknowledged as async, and counted
        assert c.get("a")["attributes"] == {"x": 1}
        assert c.stats()["replication.fallbacks"] == "1"


def test_sync_replication_acknowledges_only_what_the_replica_holds(
        tmp_path: Path, procs: list[Proc]) -> None:
    primary, replica = primary_and_replica(tmp_path, procs, "--replication", "sync")
    wait_replicas(primary.address, 1)
    with writers(primary.address, 4, 400, [("add_to_set", "t", ["x"])]) as acked:
        primary.kill()  # while writes are in flight: the acknowledged ones must survive
    assert primary.proc.poll() is not None and len(acked) >= 400
    replica.kill()  # what it confirmed must be on its disk, not only in its memory
    replica = start(tmp_path / "replica", "--replica-of", primary.address)
    procs.append(replica)
    with Client(replica.address) as c:
        got = c.batch_get(acked)
    lost = [pid for pid, profile in zip(acked, got, strict=True) if profile is None]
    assert lost == []


def test_sync_replication_with_a_stopped_replica_times_out_then_resumes(
        tmp_path: Path, procs: list[Proc]) -> None:
    primary = start(tmp_path / "primary", "--replication", "sync",
                    "--replication-timeout", "0.5")
    procs.append(primary)
    replica = start(tmp_path / "replica", "--replica-of", primary.address)
    procs.append(replica)
    wait_replicas(primary.address, 1)
    with Client(primary.address) as c:
        c.upsert("before", {"x": 1})
        info = c.stats()
        assert info["replication.mode"] == "sync"
        assert info["replication.replica.0.lag_bytes"] == "0"
        os.kill(replica.proc.pid, signal.SIGSTOP)  # a partition: connected, silent
        try:
            with pytest.raises(ClientError) as refused:
                c.upsert("during", {"x": 2})
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            assert "no replica confirmed it" in refused.value.details
            assert "may or may not survive a failover" in refused.value.details
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)
        c.upsert("after", {"x": 3})  # the replica caught up and confirms again
    wait_caught_up(primary.address, replica.address)
    with Client(replica.address) as r:
        assert [p is not None for p in r.batch_get(["before", "during", "after"])] == \
            [True, True, True]


# ---------------------------------------------------------------------- crash soak, sync

def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # type: ignore[no-any-return]


def _sync_writer(address: str, prefix: str, acked: dict[str, int], stop: threading.Event
                 ) -> None:
    """Upserts until stopped; a write is recorded only once acknowledged. Refusals (the
    primary dead, restarting, or waiting for its replica) are not: they go on."""
    with Client(address, timeout=5) as c:
        n = 0
        while not stop.is_set():
            pid = f"{prefix}-{n}"
            n += 1
            try:
                c.upsert(pid, {"n": n}, ops=[("add_to_set", "t", [f"t{n}"])])
            except ClientError:
                time.sleep(0.05)
                continue
            acked[pid] = n


def _holds(address: str, acked: dict[str, int]) -> list[str]:
    """The acknowledged writes `address` lacks or holds otherwise."""
    pids = list(acked)
    with Client(address, timeout=30) as c:
        got = [p for i in range(0, len(pids), 5000) for p in c.batch_get(pids[i:i + 5000])]
    return [pid for pid, profile in zip(pids, got, strict=True)
            if profile is None or profile["attributes"] != {"n": acked[pid],
                                                            "t": [f"t{acked[pid]}"]}]


ACKS_PER_CYCLE = 25  # acknowledged writes each cycle has before its kill, at least


def run_sync_kill_cycles(tmp_path: Path, procs: list[Proc], cycles: int, seed: int
                         ) -> dict[str, int]:
    """A primary under --replication sync and its replica, SIGKILLed under writers: the
    primary most cycles, the replica some. After each primary kill the replica (which no
    longer hears from it) must hold every acknowledged write; at the end both are killed,
    the replica restarted alone must hold them from its own disk, and the primary
    restarted must hold them too, the replica then converging to it exactly."""
    rng = random.Random(seed)
    address = f"127.0.0.1:{_free_port()}"
    port = address.rpartition(":")[2]

    def primary() -> Proc:
        proc = start(tmp_path / "primary", "--port", port, "--replication", "sync",
                     "--replication-timeout", "5")
        procs.append(proc)
        return proc

    def replica() -> Proc:
        proc = start(tmp_path / "replica", "--replica-of", address)
        procs.append(proc)
        return proc

    acked: dict[str, int] = {}
    serving, following = primary(), replica()
    primary_kills = replica_kills = 0
    for cycle in range(cycles):
        before = len(acked)
        stop = threading.Event()
        writers = [threading.Thread(target=_sync_writer,
                                    args=(address, f"c{cycle}w{w}", acked, stop))
                   for w in range(3)]
        for t in writers:
            t.start()
        time.sleep(rng.uniform(0.4, 1.2))
        enough = time.monotonic() + 30  # a slow machine: the kill waits for some acks
        while len(acked) < before + ACKS_PER_CYCLE:
            assert time.monotonic() < enough, f"cycle {cycle}: writers acknowledged " \
                f"{len(acked) - before} writes in 30 s"
            time.sleep(0.05)
        if cycle % 3 == 2:  # the replica dies: writes wait for it, then go on
            following.kill()
            replica_kills += 1
            following = replica()
            time.sleep(rng.uniform(0.3, 0.8))
        serving.kill()
        primary_kills += 1
        stop.set()
        for t in writers:
            t.join(30)
        deadline = time.monotonic() + 10  # it may still be applying what it confirmed
        while lacking := _holds(following.address, acked):
            assert time.monotonic() < deadline, (
                f"cycle {cycle}: {len(lacking)} acknowledged writes not on the replica, "
                f"e.g. {lacking[:5]}")
            time.sleep(0.1)
        serving = primary()
    following.kill()
    serving.kill()
    following = replica()  # alone, from its own disk
    assert _holds(following.address, acked) == []
    serving = primary()
    assert _holds(address, acked) == []
    wait_caught_up(address, following.address)
    assert state(address) == state(following.address)
    return {"cycles": cycles, "primary_kills": primary_kills, "replica_kills": replica_kills,
            "acknowledged": len(acked)}


def test_sync_replication_survives_kill_cycles_of_primary_and_replica(
        tmp_path: Path, procs: list[Proc]) -> None:
    run_sync_kill_cycles(tmp_path, procs, cycles=3, seed=7)  # the replica dies in cycle 2


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_sync_replication_kill_cycles(tmp_path: Path, procs: list[Proc]) -> None:
    cycles = int(os.environ.get("MEMSTORE_SOAK_CYCLES", "100"))
    print(f"soak: {run_sync_kill_cycles(tmp_path, procs, cycles=cycles, seed=99)}")


# ---------------------------------------------------------------------- read_from="replica"

def test_clients_reading_from_replicas_go_on_reading_when_the_primary_dies(
        tmp_path: Path, procs: list[Proc]) -> None:
    primary, replica = primary_and_replica(tmp_path, procs)
    wait_replicas(primary.address, 1)
    with Client(primary.address, read_from="replica") as c:
        c.upsert("a", {"x": 1})  # writes go to the primary
        wait_caught_up(primary.address, replica.address)
        assert c.get("a")["attributes"] == {"x": 1}
        primary.kill()
        assert c.get("a")["attributes"] == {"x": 1}  # a replica answered
        assert c.count("x = 1") == 1
        with pytest.raises(ClientError) as refused:
            c.upsert("b", {"x": 2})
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE

    async def read_async() -> Any:
        from memstore import AsyncClient

        async with AsyncClient(replica.address, read_from="replica") as c:
            return await c.get("a")  # a replica lists no replicas: it answers itself

    import asyncio

    assert asyncio.run(read_async())["attributes"] == {"x": 1}


def test_reads_from_a_dead_replica_go_to_the_primary(tmp_path: Path, procs: list[Proc]
                                                      ) -> None:
    primary, replica = primary_and_replica(tmp_path, procs)
    wait_replicas(primary.address, 1)
    with Client(primary.address, read_from="replica") as c:
        c.upsert("a", {"x": 1})
        wait_caught_up(primary.address, replica.address)
        assert c.get("a") is not None
        replica.kill()
        c.upsert("b", {"x": 2})
        assert c.get("b")["attributes"] == {"x": 2}  # the primary answered
    with pytest.raises(ValueError, match="read_from"):
        Client(primary.address, read_from="secondary")


def _router_get(router: str, pid: str, *metadata: tuple[str, str]
                ) -> tuple[pb.GetResponse, dict[str, str]]:
    """Get through a router over plain gRPC: the answer and its trailing metadata."""
    with grpc.insecure_channel(router) as channel:
        answer, call = memstore_pb2_grpc.MemstoreStub(channel).Get.with_call(
            pb.GetRequest(key=pb.ProfileKey(id=pid)), metadata=metadata, timeout=10)
        return answer, dict(call.trailing_metadata())


def test_a_router_reading_from_replicas_answers_while_the_primary_is_stopped(
        tmp_path: Path, procs: list[Proc]) -> None:
    """serve-router --read-from replica: reads are answered by the shard's replica (with
    its lag in trailing metadata), so they go on while the primary is stopped (SIGSTOP);
    writes go to the primary. A call can choose for itself (memstore-read-from)."""
    from tests.conftest import start_router

    primary, replica = primary_and_replica(tmp_path, procs)
    wait_replicas(primary.address, 1)
    router = start_router([primary.address], "--read-from", "replica")
    plain = start_router([primary.address])
    try:
        with Client(router.address) as c:
            for i in range(100):
                c.upsert(f"u{i}", {"n": i, "tier": "gold" if i % 2 else "free"})
            c.upsert("w", {"n": -1})  # writes go to the primary through the router
        wait_caught_up(primary.address, replica.address)
        answer, trailers = _router_get(router.address, "w")
        assert answer.profile.id == "w"
        assert trailers["memstore-replica-lag-bytes"] == "0"
        assert "memstore-replica-lag-seconds" in trailers
        _, trailers = _router_get(plain.address, "w")  # the default: the primary answers
        assert "memstore-replica-lag-bytes" not in trailers
        _, trailers = _router_get(plain.address, "w", ("memstore-read-from", "replica"))
        assert trailers["memstore-replica-lag-bytes"] == "0"  # the call's own choice
        with pytest.raises(grpc.RpcError) as bad:
            _router_get(plain.address, "w", ("memstore-read-from", "secondary"))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        primary.proc.send_signal(signal.SIGSTOP)  # only the replica can answer now
        try:
            with Client(router.address, timeout=10) as c:
                assert c.get("u7")["attributes"] == {"n": 7, "tier": "gold"}
                assert [p and p["id"] for p in c.batch_get(["u1", "u2", "nobody"])] == \
                    ["u1", "u2", None]
                assert c.count("tier = \"gold\"") == 50
                assert c.count("n >= 90") == 10
                assert dict(c.group_by("n >= 0", "tier")) == {"gold": 50, "free": 50}
                assert {a["name"] for a in c.schema()} >= {"n", "tier"}
        finally:
            primary.proc.send_signal(signal.SIGCONT)
        with Client(router.address) as c:
            c.upsert("after", {"n": 1000})  # the primary again
        wait_caught_up(primary.address, replica.address)
        with Client(router.address) as c:
            assert c.get("after")["attributes"] == {"n": 1000}
        replica.kill()  # the replica gone: reads go to the primary
        with Client(router.address) as c:
            assert c.get("after")["attributes"] == {"n": 1000}
            assert c.count("n >= 0") == 101
    finally:
        router.stop()
        plain.stop()


def test_a_replica_advertises_where_it_serves_reads(tmp_path: Path, procs: list[Proc]
                                                    ) -> None:
    """--advertise: the address a replica's primary lists for reads (a container's name,
    where the replica listens on 0.0.0.0); routers reach it there."""
    import socket

    from tests.conftest import start_router

    primary = start(tmp_path / "primary")
    procs.append(primary)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    replica = start(tmp_path / "replica", "--host", "0.0.0.0", "--insecure", "--port",
                    str(port), "--replica-of", primary.address,
                    "--advertise", f"localhost:{port}")
    procs.append(replica)
    wait_replicas(primary.address, 1)
    assert stats(primary.address)["replication.replica.0.address"] == f"localhost:{port}"
    router = start_router([primary.address], "--read-from", "replica")
    try:
        with Client(router.address) as c:
            c.upsert("a", {"x": 1})
        wait_caught_up(primary.address, replica.address.replace("0.0.0.0", "127.0.0.1"))
        _, trailers = _router_get(router.address, "a")
        assert trailers["memstore-replica-lag-bytes"] == "0"  # the replica answered
    finally:
        router.stop()


# ---------------------------------------------------------------------- over TLS

def test_replication_over_mutual_tls_with_the_cluster_token(tmp_path: Path,
                                                            procs: list[Proc]) -> None:
    """Shards under mutual TLS and an auth file: a replica follows its primary over TLS,
    presenting its certificate and the cluster token; one that does not trust the
    primary's CA is refused, and its log says why."""
    from tests.pki import make_pki

    pki = make_pki(tmp_path / "pki")
    auth = tmp_path / "auth"
    auth.write_text("reader-token-0123456789abcdef read app\n")
    tls = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
           "--tls-client-ca", str(pki.ca), "--auth-file", str(auth))
    env = {"MEMSTORE_CLUSTER_TOKEN": "cluster-token-0123456789abcdef"}
    primary = start(tmp_path / "primary", *tls, env=env)
    procs.append(primary)
    replica = start(tmp_path / "replica", *tls, "--replica-of", primary.address, env=env)
    procs.append(replica)

    def client(address: str) -> Client:
        return Client(address, tls_ca=str(pki.ca), tls_cert=str(pki.client_cert),
                      tls_key=str(pki.client_key), token=env["MEMSTORE_CLUSTER_TOKEN"],
                      timeout=10)

    with client(primary.address) as c:
        c.upsert("a", {"x": 1})
    deadline = time.monotonic() + 30
    while True:
        with client(replica.address) as c:
            found = c.get("a")
            if found is not None and c.stats()["replication.connected"] == "True":
                assert found["attributes"] == {"x": 1}
                break
        assert time.monotonic() < deadline, "".join(replica.lines)
        time.sleep(0.1)

    stranger = start(tmp_path / "stranger", "--tls-cert", str(pki.server_cert), "--tls-key",
                     str(pki.server_key), "--tls-ca", str(pki.rogue_cert),
                     "--replica-of", primary.address, env=env)
    procs.append(stranger)
    deadline = time.monotonic() + 15
    while not stranger.said("replication from"):
        assert time.monotonic() < deadline, "".join(stranger.lines)
        time.sleep(0.1)
    [refused, *_] = stranger.said("replication from")
    assert "Tls handshake failed" in refused and "CERTIFICATE_VERIFY_FAILED" in refused
    assert "--tls-ca must trust the primary's certificate" in refused
    with client(stranger.address) as c:
        assert c.get("a") is None
        assert c.stats()["replication.connected"] == "False"


# ---------------------------------------------------------------------- promotion by hand

def test_a_replica_restarted_as_primary_continues_the_history(tmp_path: Path,
                                                              procs: list[Proc]) -> None:
    """docs/replication.md "Failover": a replica restarted without --replica-of serves as a
    primary of a new history continuing the old one up to its log's end. A replica behind
    that point follows it with a partial resync; the old primary, which wrote past it,
    comes back as a replica with a full resync (its unreplicated tail discarded)."""
    old = start(tmp_path / "old")
    procs.append(old)
    a = start(tmp_path / "a", "--replica-of", old.address)
    b = start(tmp_path / "b", "--replica-of", old.address)
    procs += [a, b]
    with Client(old.address) as c:
        write_history(c, 0, 100)
        wait_caught_up(old.address, a.address)
        with Client(a.address) as on_a:  # after the deletes: a keeps its log from here
            on_a.snapshot()
        wait_caught_up(old.address, b.address)
        assert b.stop() == 0  # b stays behind
        for i in range(100, 200):  # no erasure: a's log keeps b's position
            c.upsert(f"v{i}", {"n": i}, ops=[("increment", "hits", 1)])
        wait_caught_up(old.address, a.address)
        # a stops; old writes on alone. (Not SIGSTOP: records already sent wait in a's
        # socket buffer and reach it when it runs again.)
        assert a.stop() == 0
        c.upsert("only-on-old", {"x": 1})
    old.kill()
    a = start(tmp_path / "a")  # promoted
    procs.append(a)
    assert a.said("serving as a primary of the new history")
    b = start(tmp_path / "b", "--replica-of", a.address)
    procs.append(b)
    with Client(a.address) as c:
        write_history(c, 200, 300)
    after = wait_caught_up(a.address, b.address)
    assert after["replication.full_resyncs"] == "0" and b.said("partial resync")
    assert b.said("continues history")
    assert state(b.address) == state(a.address)
    old = start(tmp_path / "old", "--replica-of", a.address)
    procs.append(old)
    after = wait_caught_up(a.address, old.address)
    assert after["replication.full_resyncs"] == "1"
    [why] = old.said("full resync from")
    assert "where this primary took over history" in why
    with Client(old.address) as c:
        assert c.get("only-on-old") is None
    assert state(old.address) == state(a.address)


def test_a_position_read_on_a_replica_resumes_on_it_once_it_serves_as_the_shard(
        tmp_path: Path, procs: list[Proc]) -> None:
    """A watcher on a replica holds positions under the replica's name; once the replica
    serves as the shard (promoted, under the shard's name), the same position resumes
    right after what the watcher read, found by its log's history: not from the shard's
    first change, as a position naming no shard of the log would."""
    old = start(tmp_path / "old", "--name", "shard-0")
    procs.append(old)
    a = start(tmp_path / "a", "--replica-of", old.address, "--name", "shard-0-replica-0")
    procs.append(a)
    with Client(old.address) as c:
        for i in range(5):
            c.upsert(f"u{i}", {"n": i})
    wait_caught_up(old.address, a.address)
    with Client(a.address) as r:
        here = next(iter(r.changes(heartbeats=True)))["position"]
    with Client(old.address) as c:
        c.upsert("w1", {"n": 1})
    wait_caught_up(old.address, a.address)
    assert a.stop() == 0
    old.kill()
    a = start(tmp_path / "a", "--name", "shard-0")  # serves as the shard, promoted
    procs.append(a)
    assert a.said("serving as a primary of the new history")
    with Client(a.address) as c:
        assert [e["id"] for e in itertools.islice(c.changes(from_position=here), 1)] == ["w1"]


# ---------------------------------------------------------------------- memstore serve

def serve_cluster(data: Path, *args: str) -> tuple[subprocess.Popen[str], str, list[str]]:
    """`memstore serve` on free ports: its process, the router's address, its log lines."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "memstore.cli", "serve", "--port", "0", "--data-dir",
         str(data), *args], cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        assert line, "serve exited:\n" + "".join(lines)
        lines.append(line)
        address = listening_address(line, "supervisor")
        if address:
            def pump() -> None:
                assert proc.stderr is not None
                lines.extend(proc.stderr)

            threading.Thread(target=pump, daemon=True).start()
            return proc, address, lines
    proc.kill()
    raise AssertionError("serve did not start:\n" + "".join(lines))


def test_serve_with_replicas_starts_and_keeps_a_replica_per_shard(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc, router, lines = serve_cluster(data, "--shards", "2", "--replicas", "1",
                                 "--replication", "sync")
    try:
        layout = json.loads((data / "cluster.json").read_text())
        pairs = [(f"127.0.0.1:{s['port']}", f"127.0.0.1:{s['replicas'][0]['port']}")
                 for s in layout["shards"]]
        assert [s["replicas"][0]["name"] for s in layout["shards"]] == \
            ["shard-0-replica-0", "shard-1-replica-0"]
        with Client(router) as c:  # sync: each write waits for its shard's replica
            c.load({"id": f"p{i}", "attributes": {"n": i}} for i in range(300))
            c.upsert("p1", ops=[("increment", "n", 1)])
        for shard, replica in pairs:
            wait_caught_up(shard, replica)
            assert stats(replica)["replication.primary"] == shard
            assert state(replica) == state(shard)
        replica_pid = next(int(m.group(1)) for line in list(lines) if (
            m := re.search(r"shard-0-replica-0 \(pid (\d+)\) serving", line)))
        os.kill(replica_pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not any("shard-0-replica-0 restarted" in line for line in list(lines)):
            assert time.monotonic() < deadline, "".join(lines[-20:])
            time.sleep(0.1)
        with Client(router) as c:
            c.upsert("p2", {"n": -2})
        wait_caught_up(*pairs[0])
        with Client(pairs[0][0], read_from="replica") as c:
            assert c.count("n >= 0") + c.count("n < 0") == stats(pairs[0][0])["profiles"]
        # Erasure leaves the replicas' disks with the router's snapshot too.
        from tests.test_data_rights import scan

        needles = ["erased-person", "Replicated-Secret-6612", "erased@example.org"]
        with Client(router) as c:
            c.upsert("erased-person", {"secret": "Replicated-Secret-6612"},
                     identifiers=[("email", "erased@example.org")])
            c.snapshot()  # the person is in snapshots and logs everywhere now
            assert scan([data / "shard-0-replica-0", data / "shard-1-replica-0"], needles)
            receipt = c.erase("erased-person")
            taken = c.snapshot()["shard_positions"]
        assert set(taken) == {"shard-0", "shard-1", "shard-0/shard-0-replica-0",
                              "shard-1/shard-1-replica-0"}
        assert all(taken[s] >= p for s, p in receipt["shard_positions"].items())
        assert scan([data], needles) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    proc, router, lines = serve_cluster(data)  # later starts: the replicas cluster.json has
    try:
        assert any("shard-1-replica-0 (pid" in line for line in lines)
        wait_caught_up(*pairs[1])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


# ---------------------------------------------------------------------- cluster failover

def _failover(router: str, shard: str, *extra: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "memstore.cli", "cluster", "failover", shard,
                           "--address", router, "--json", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_failover_promotes_the_replica_and_fences_the_old_primary(
        tmp_path: Path, procs: list[Proc]) -> None:
    from tests.conftest import start_router

    old = start(tmp_path / "old")
    procs.append(old)
    replica = start(tmp_path / "replica", "--replica-of", old.address,
                    "--name", "shard-0-replica-0")
    procs.append(replica)
    wait_replicas(old.address, 1)
    router = start_router([old.address])
    try:
        with Client(router.address) as c:
            write_history(c, 0, 200)
            position = next(c.changes(heartbeats=True))["position"]
            c.upsert("after-position", {"n": 1})
        wait_caught_up(old.address, replica.address)
        before_epoch = int(stats(old.address)["epoch"])
        report = _failover(router.address, "shard-0")
        assert report["new"] == replica.address and report["old"] == old.address
        assert report["epoch"] > before_epoch
        assert any(f"{old.address} now follows {replica.address}" in n for n in report["notes"])
        assert replica.said("promoted: was a replica of")
        with Client(router.address) as c:  # the router writes to the new primary
            c.upsert("after-failover", {"n": 2})
            assert c.get("after-failover")["attributes"] == {"n": 2}
            assert c.get("u5") is not None
        info = stats(replica.address)
        assert info["shard"] == "shard-0" and int(info["epoch"]) == report["epoch"]
        with Client(old.address) as c:  # fenced: a replica of the new primary now
            with pytest.raises(ClientError) as refused:
                c.upsert("split-brain", {"n": 3})
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert replica.address in refused.value.details
        wait_caught_up(replica.address, old.address)
        assert state(old.address) == state(replica.address)
        # A watcher's position from the old primary resumes on the new one.
        with Client(replica.address) as c:
            seen = [change["id"] for _, change in zip(range(2), c.changes(
                from_position=position), strict=False)]
        assert seen == ["after-position", "after-failover"]
        # The old primary refuses a demotion from a lower epoch: the fence holds both ways.
        from memstore.v1 import replication_pb2 as rpb
        from memstore.v1 import replication_pb2_grpc
        with grpc.insecure_channel(replica.address) as channel:
            with pytest.raises(grpc.RpcError) as stale:
                replication_pb2_grpc.ReplicationStub(channel).Demote(
                    rpb.DemoteRequest(primary=old.address, epoch=before_epoch))
            assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        router.stop()


def test_sync_failover_after_the_primary_and_its_disk_are_lost(tmp_path: Path,
                                                               procs: list[Proc]) -> None:
    """--replication sync: SIGKILL the primary under writers and delete its data
    directory; after the failover every acknowledged write reads through the router, and
    the old primary started again on an empty directory catches up as a replica."""
    import shutil

    from tests.conftest import start_router

    old, replica = primary_and_replica(tmp_path, procs, "--replication", "sync", name="old")
    wait_replicas(old.address, 1)
    router = start_router([old.address])
    try:
        with writers(router.address) as acked:
            old.kill()
        shutil.rmtree(tmp_path / "old")
        report = _failover(router.address, "shard-0", "--replica", replica.address)
        assert report["new"] == replica.address
        assert any("does not answer" in n for n in report["notes"])
        with Client(router.address) as c:
            got = c.batch_get(acked)
            assert [pid for pid, p in zip(acked, got, strict=True) if p is None] == []
            c.upsert("after", {"n": 1})
        back = start(tmp_path / "old", "--replica-of", replica.address)
        procs.append(back)
        wait_caught_up(replica.address, back.address)
        assert state(back.address) == state(replica.address)
    finally:
        router.stop()


def test_a_partitioned_primary_comes_back_below_the_new_epoch(tmp_path: Path,
                                                              procs: list[Proc]) -> None:
    """SIGSTOP stands for a partition: the old primary misses the failover and its fence
    (the Demote times out). When it runs again it is a primary below the new epoch, never
    at the same one (it still takes writes sent straight to it: no coordinator), or a
    replica of the new primary if the Demote reached it late; the router sends every write
    to the new primary."""
    from tests.conftest import start_router

    old, replica = primary_and_replica(tmp_path, procs, name="old")
    router = start_router([old.address])
    try:
        with Client(router.address) as c:
            write_history(c, 0, 50)
        wait_caught_up(old.address, replica.address)
        os.kill(old.proc.pid, signal.SIGSTOP)
        try:
            report = _failover(router.address, "shard-0", "--replica", replica.address,
                               "--timeout", "2")
        finally:
            os.kill(old.proc.pid, signal.SIGCONT)
        assert any(f"{old.address} does not answer" in n for n in report["notes"])
        # The Demote it missed may still reach it now, from its socket buffer: then it
        # follows the new primary; if not, it is a primary below the new epoch.
        info = stats(old.address)
        if info.get("replication.role") == "replica":
            assert info["replication.primary"] == replica.address
        else:
            assert int(info["epoch"]) < report["epoch"]
        with Client(router.address) as c:
            c.upsert("routed", {"n": 1})
        with Client(replica.address) as c:
            assert c.get("routed") is not None
    finally:
        router.stop()


def test_a_replica_refuses_a_record_type_it_does_not_know(tmp_path: Path) -> None:
    """A newer primary's record of a type this version cannot read is refused before it
    enters the replica's log (which would then no longer start), naming type and place."""
    async def run() -> None:
        shard = await Shard.open(ShardConfig(data_dir=tmp_path, sync=SyncPolicy.OFF,
                                             stop_snapshot_timeout=0))
        try:
            end = shard.log.end_lsn
            with pytest.raises(ValueError, match=f"position {end} has type 99, which this "
                                                 "version does not know"):
                shard.apply_replicated([(end, 99, b"\x80")])
            assert shard.log.end_lsn == end
            shard.apply_replicated([(end, wal_format.RECORD_SHARD_META,
                                     msgpack.packb([3, None]))])
            assert shard.engine.epoch == 3 and shard.log.end_lsn > end
        finally:
            await shard.close()

    asyncio.run(run())


# (the primary is stopped by cancelling it: its grpc server's shutdown is left undone)
@pytest.mark.filterwarnings("ignore:coroutine 'AioServer.shutdown' was never awaited")
def test_a_write_made_durable_while_its_primary_is_demoted_is_not_acknowledged(
        tmp_path: Path, procs: list[Proc]) -> None:
    """--replication sync: a write whose fsync is under way when a failover demotes its
    primary must not be acknowledged (no replica confirmed it, and the demoted primary's
    resync discards it); it is refused UNAVAILABLE, and the new primary does not hold
    it. (The primary runs in this process, on its main thread for its signal handlers,
    its fsync slowed on demand; the test drives it from another thread.)"""
    import socket

    from memstore.server.service import serve
    from memstore.v1 import replication_pb2 as rpb
    from memstore.v1 import replication_pb2_grpc

    slow = threading.Event()

    def fsync(fd: int) -> None:
        if slow.is_set():
            time.sleep(1.5)
        os.fsync(fd)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"127.0.0.1:{port}"
    loop = asyncio.new_event_loop()
    from memstore.server.rights import load_salt

    salt = load_salt(tmp_path / "cluster.salt")  # as start() gives the replica
    served = loop.create_task(serve(ShardConfig(data_dir=tmp_path / "a", fsync=fsync, salt=salt),
                                    "127.0.0.1", port, link_port=None, replication="sync"))
    outcome: list[Any] = []
    failed: list[BaseException] = []

    def drive() -> None:
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    stats(address)
                    break
                except ClientError:
                    assert time.monotonic() < deadline, "the primary did not start"
                    time.sleep(0.1)
            replica = start(tmp_path / "b", "--replica-of", address, "--name", "b",
                            "--replication", "sync")
            procs.append(replica)
            wait_replicas(address, 1)
            with Client(address) as c:
                c.upsert("before", {"n": 1})
            wait_caught_up(address, replica.address)

            def write() -> None:
                with Client(address, timeout=30) as c:
                    try:
                        c.upsert("during", {"n": 2})
                        outcome.append("acknowledged")
                    except ClientError as exc:
                        outcome.append(exc)

            slow.set()
            writer = threading.Thread(target=write)
            writer.start()
            time.sleep(0.3)  # logged and applied; its fsync under way

            async def failover() -> None:
                async with grpc.aio.insecure_channel(replica.address) as ch:
                    promoted = await replication_pb2_grpc.ReplicationStub(ch).Promote(
                        rpb.PromoteRequest(shard="shard-0", epoch=5), timeout=30)
                async with grpc.aio.insecure_channel(address) as ch:
                    await replication_pb2_grpc.ReplicationStub(ch).Demote(
                        rpb.DemoteRequest(primary=replica.address, epoch=promoted.epoch),
                        timeout=30)

            asyncio.run(failover())
            slow.clear()
            writer.join(30)
            with Client(replica.address) as c:
                outcome.append(c.get("during") is None and c.get("before") is not None)
        except BaseException as exc:  # noqa: BLE001 - raised on the test's thread
            failed.append(exc)
        finally:
            loop.call_soon_threadsafe(served.cancel)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    try:
        loop.run_until_complete(served)
    except asyncio.CancelledError:
        pass
    finally:
        loop.close()
    driver.join(30)
    if failed:
        raise failed[0]
    result, only_before = outcome
    assert isinstance(result, ClientError), result
    assert result.code == grpc.StatusCode.UNAVAILABLE and "not acknowledged" in result.details
    assert only_before  # the new primary holds the write before, not this one


def test_a_replica_with_another_salt_is_refused_until_it_takes_the_primarys(
        tmp_path: Path, procs: list[Proc]) -> None:
    """Suppression entries and audit hashes are salted: a replica with a salt of its own
    would copy a blocked list that matches nothing once it is promoted. The primary
    refuses to feed it, saying why; with the primary's --salt-file it follows."""
    primary = start(tmp_path / "primary", "--name", "shard-0")
    procs.append(primary)
    with Client(primary.address) as c:
        c.upsert("ada", {"n": 1}, identifiers=[("email", "ada@example.org")])
        c.erase("ada", suppress=True)
    stray = start(tmp_path / "stray", "--replica-of", primary.address, "--name", "stray",
                  "--salt-file", str(tmp_path / "stray.salt"))
    procs.append(stray)
    deadline = time.monotonic() + 30
    while not stray.said("salt"):
        assert time.monotonic() < deadline, "the replica did not say why it cannot follow"
        time.sleep(0.1)
    assert stats(primary.address)["replication.replicas"] == "0"
    stray.stop()
    replica = start(tmp_path / "replica", "--replica-of", primary.address, "--name", "r")
    procs.append(replica)
    wait_replicas(primary.address, 1)
    wait_caught_up(primary.address, replica.address)


def test_a_failover_of_a_primary_still_writing_loses_no_acknowledged_write(
        tmp_path: Path, procs: list[Proc]) -> None:
    """--replication sync, primary A with replicas B and C, writers on A while `cluster
    failover` runs: A is frozen first, the replica promoted catches up to A's last
    record, so every write acknowledged (by B or by C) is on the new primary, and no one
    resyncs in full."""
    from tests.conftest import start_router

    a = start(tmp_path / "a", "--replication", "sync")
    procs.append(a)
    for name in ("b", "c"):
        procs.append(start(tmp_path / name, "--replica-of", a.address, "--name", name,
                           "--replication", "sync"))
    wait_replicas(a.address, 2)
    router = start_router([a.address])
    acked: list[str] = []
    stop = threading.Event()

    def write(prefix: str) -> None:
        with Client(a.address, timeout=10) as c:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    c.upsert(f"{prefix}-{n}", {"n": n})
                    acked.append(f"{prefix}-{n}")
                except ClientError:
                    time.sleep(0.01)

    writers = [threading.Thread(target=write, args=(f"w{i}",)) for i in range(3)]
    try:
        for t in writers:
            t.start()
        time.sleep(1.0)
        report = _failover(router.address, "shard-0")
        time.sleep(0.3)
        stop.set()
        for t in writers:
            t.join(30)
        assert len(acked) > 50
        with Client(report["new"]) as c:
            missing = [p for p, got in zip(acked, c.batch_get(acked), strict=True)
                       if got is None]
        assert missing == []
        for proc in procs:
            if proc.address != report["new"]:
                wait_caught_up(report["new"], proc.address)
                assert stats(proc.address).get("replication.full_resyncs") == "0"
    finally:
        stop.set()
        router.stop()
