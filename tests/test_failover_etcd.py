"""Automatic failover through etcd (memstore/replication/coordinator.py) with real
processes: an etcd-server on free ports, shard procs started with --coordinator, a
router following etcd's choice, SIGKILL and SIGSTOP for a dead and a cut-off primary.

A replica must take over within a bound with every write acknowledged under
--replication sync, the router must switch to it, an old primary must come back as a
replica (on an empty directory too), and a primary that lost its lease must never take a
write at its old epoch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from memstore import Client, ClientError
from memstore.errors import Unavailable
from memstore.replication.coordinator import Fence, endpoint
from tests.conftest import start_router
from tests.test_replication import (
    Proc,
    serve_cluster,
    start,
    state,
    stats,
    upsert_until_accepted,
    wait_caught_up,
    wait_replicas,
    writers,
)

LEASE = 5  # seconds, the default: a loaded machine pausing a member ~1 s costs it nothing


def member(procs: list[Proc], data: Path, etcd: str, shard: str, *extra: str) -> Proc:
    proc = start(data, "--name", shard, "--coordinator", etcd, "--lease-seconds", str(LEASE),
                 "--replication", "sync", *extra)
    procs.append(proc)
    return proc


def wait_primary(candidates: list[Proc], timeout: float) -> Proc:
    """The one candidate whose Stats say primary, once one does within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        for p in candidates:
            try:
                if stats(p.address).get("replication.role") == "primary":
                    return p
            except ClientError:
                pass
        assert time.monotonic() < deadline, "no replica became primary"
        time.sleep(0.05)


def test_fence_refuses_writes_once_the_lease_is_not_confirmed_in_time() -> None:
    fence = Fence(ttl=5)
    with pytest.raises(Unavailable, match="nothing was written"):
        fence.check()  # not holding the primary key yet
    fence.holding = True
    fence.renewed(time.monotonic())
    fence.check()
    fence.renewed(time.monotonic() - (5 - fence.margin) - 0.01)  # etcd may expire it soon
    with pytest.raises(Unavailable, match="at position 77 but may or may not survive"):
        fence.check(77)
    assert endpoint("etcd://10.0.0.7:2380") == ("10.0.0.7", 2380)
    assert endpoint("etcd://etcd") == ("etcd", 2379)
    with pytest.raises(ValueError, match="etcd://HOST:PORT"):
        endpoint("http://10.0.0.7:2379")


def test_primary_killed_with_its_disk_a_replica_takes_over_losing_no_acknowledged_write(
        tmp_path: Path, etcd: str, procs: list[Proc]) -> None:
    """--replication sync, writers through a router: SIGKILL the primary and delete its
    directory. One of the two replicas becomes primary by itself, the other follows it, the
    router switches, every acknowledged write reads back and writes succeed again; the old
    primary started again on its (empty) directory becomes a replica and catches up. Last,
    the new primary stopped cleanly hands over at once."""
    old = member(procs, tmp_path / "old", etcd, "kill")
    replicas = [member(procs, tmp_path / f"r{i}", etcd, "kill") for i in range(2)]
    wait_replicas(old.address, 2)
    epoch = int(stats(old.address)["epoch"])
    router = start_router([old.address], "--coordinator", etcd)
    try:
        with writers(router.address) as acked:
            old.kill()
            killed = time.monotonic()
        shutil.rmtree(tmp_path / "old")
        new = wait_primary(replicas, timeout=LEASE + 10)
        other = next(r for r in replicas if r is not new)
        info = stats(new.address)
        assert info["shard"] == "kill" and int(info["epoch"]) > epoch
        assert new.said("promoted: was a replica of " + old.address)
        with Client(router.address, timeout=5) as c:
            # the router switches once it reads etcd's key (every 0.5 s)
            upsert_until_accepted(c, "after", {"n": 1}, killed, LEASE + 15)
            failover = time.monotonic() - killed
            got = c.batch_get(acked)
            assert [pid for pid, p in zip(acked, got, strict=True) if p is None] == []
            assert c.get("after") is not None
        assert failover < 2 * LEASE + 5, failover
        wait_caught_up(new.address, other.address)
        back = member(procs, tmp_path / "old", etcd, "kill")
        wait_caught_up(new.address, back.address)
        assert stats(back.address)["replication.primary"] == new.address
        assert state(back.address) == state(new.address) == state(other.address)
        # Stopped cleanly, a primary revokes its lease: the next one is elected at once,
        # well before the 2/3 of a TTL a dead primary's key lasts at least.
        new.proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        wait_primary([other, back], timeout=2 * LEASE / 3 - 0.1)
        assert time.monotonic() - stopped < 2 * LEASE / 3
    finally:
        router.stop()


def test_a_stopped_primary_never_takes_a_write_at_its_old_epoch(
        tmp_path: Path, etcd: str, procs: list[Proc]) -> None:
    """SIGSTOP past the lease stands for a partition: the replica is elected at a higher
    epoch. A write that reached the old primary while it was stopped is refused, nothing
    written, when it runs again (its lease is not confirmed: under --replication async
    nothing else would refuse it), and it becomes the new primary's replica."""
    old = member(procs, tmp_path / "old", etcd, "stop", "--replication", "async")
    replica = member(procs, tmp_path / "replica", etcd, "stop", "--replication", "async")
    wait_replicas(old.address, 1)
    with Client(old.address) as c:
        c.load({"id": f"u{i}", "attributes": {"n": i}} for i in range(200))
    epoch = int(stats(old.address)["epoch"])
    wait_caught_up(old.address, replica.address)
    os.kill(old.proc.pid, signal.SIGSTOP)
    try:
        assert wait_primary([replica], timeout=LEASE + 10) is replica
        assert int(stats(replica.address)["epoch"]) > epoch
        refused: list[ClientError] = []

        def split_brain() -> None:  # sent to the old primary while it is stopped
            try:
                with Client(old.address, timeout=20) as c:
                    c.upsert("split-brain", {"n": 1})
            except ClientError as exc:
                refused.append(exc)

        sender = threading.Thread(target=split_brain)
        sender.start()
        time.sleep(0.5)
    finally:
        os.kill(old.proc.pid, signal.SIGCONT)
    sender.join(30)
    assert refused, "the old primary took a write after its lease expired"
    if refused[0].code == grpc.StatusCode.UNAVAILABLE:  # the fence, before the demotion
        # (its lease not confirmed in time, or already known lost: whichever it saw first)
        assert ("lease is not confirmed" in refused[0].details
                or "no longer holds its claim" in refused[0].details), refused[0].details
        assert "nothing was written" in refused[0].details
    else:  # the demotion ran first
        assert refused[0].code == grpc.StatusCode.FAILED_PRECONDITION
        assert replica.address in refused[0].details
    deadline = time.monotonic() + 20
    while stats(old.address).get("replication.primary") != replica.address:
        assert time.monotonic() < deadline, stats(old.address)
        time.sleep(0.05)
    assert old.said("etcd lease") and old.said("demoted: " + replica.address)
    with Client(old.address) as c:
        with pytest.raises(ClientError) as direct:
            c.upsert("split-brain-2", {"n": 2})
        assert direct.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with Client(replica.address) as c:
        c.upsert("after", {"n": 3})
        assert c.get("split-brain") is None
    wait_caught_up(replica.address, old.address)
    assert state(old.address) == state(replica.address)


def test_serve_with_a_coordinator_fails_over_and_keeps_the_shard_writable(
        tmp_path: Path, etcd: str) -> None:
    """`memstore serve --replicas 1 --coordinator`: SIGKILL the shard process. Whichever
    member etcd elects next (the replica, or the process the supervisor restarts on its
    intact directory), it is the one primary at a higher epoch, the other follows it, the
    router writes to it, and every acknowledged write reads back."""
    data = tmp_path / "data"
    proc, router, lines = serve_cluster(data, "--shards", "1", "--replicas", "1",
                                        "--replication", "sync", "--coordinator", etcd,
                                        "--lease-seconds", str(LEASE))
    try:
        layout = json.loads((data / "cluster.json").read_text())["shards"][0]
        addresses = [f"127.0.0.1:{layout['port']}",
                     f"127.0.0.1:{layout['replicas'][0]['port']}"]
        wait_replicas(addresses[0], 1)
        with Client(router) as c:
            c.load({"id": f"p{i}", "attributes": {"n": i}} for i in range(300))
        pid = next(int(m.group(1)) for line in list(lines) if (
            m := re.search(r"shard-0 \(pid (\d+)\) serving", line)))
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        with Client(router, timeout=5) as c:
            upsert_until_accepted(c, "after", {"n": -1}, killed, LEASE + 20,
                                  "".join(lines[-20:]))
            assert sum(p is not None for p in c.batch_get([f"p{i}" for i in range(300)])) \
                == 300
        roles = {a: stats(a).get("replication.role") for a in addresses}
        assert sorted(roles.values()) == ["primary", "replica"], roles
        primary = next(a for a, role in roles.items() if role == "primary")
        replica = next(a for a in addresses if a != primary)
        assert int(stats(primary)["epoch"]) >= 2
        assert stats(replica)["replication.primary"] == primary
        wait_caught_up(primary, replica)
        assert state(replica) == state(primary)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
