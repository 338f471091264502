"""A failed-over shard in a two-shard cluster goes on taking part in cluster operations.

shard-0 (slots 0-8191) has a primary and a replica, shard-1 (8192-16383) is one process,
a router is in front. After shard-0 fails over, once by `memstore cluster failover` and
once by etcd electing the replica after a SIGKILL, the router must:
- merge profiles across the two shards, in both directions (shards/merge.py's holds and
  absorbs reach the new primary, at its epoch);
- move slots: `cluster add-shard` takes slots from the promoted shard and from shard-1,
  `cluster remove-shard shard-0` drains the promoted shard;
with every profile readable through the router at the end, the merged-away ids following
their survivors, a saved segment's members where its profiles went, and the shard's other
member (its replica now) in the promoted
primary's exact state, moves and merges included.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from memstore import Client
from shards.slots import slot_of
from tests.conftest import ROOT, ServerProcess, start_router, start_shard
from tests.etcd import etcd_server
from tests.test_replication import (
    Proc,
    _failover,
    _free_port,
    start,
    state,
    stats,
    upsert_until_accepted,
    wait_caught_up,
    wait_replicas,
)

SHARD_0, SHARD_1 = "0-8191", "8192-16383"
PROFILES = 240
LEASE = 3  # seconds: etcd's choice after a SIGKILL comes within ~LEASE


def ids_on(shard: int, count: int, prefix: str) -> list[str]:
    """`count` primary ids whose slots shard `shard` (0 or 1) owns."""
    found: list[str] = []
    n = 0
    while len(found) < count:
        pid = f"{prefix}{n}"
        n += 1
        if (slot_of(pid) >= 8192) == bool(shard):
            found.append(pid)
    return found


AFTER = ids_on(0, 1, "after-")[0]


def cli(router: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memstore.cli", "cluster", *args,
                           "--address", router, "--no-progress"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def write_until_accepted(router: str, since: float, bound: float) -> None:
    """Write AFTER (a shard-0 id) through the router until the new primary takes it."""
    with Client(router, timeout=5) as c:
        upsert_until_accepted(c, AFTER, {"n": 1}, since, bound)


def manual(tmp_path: Path, procs: list[Proc], _: Callable[[], str]
           ) -> tuple[list[str], Callable[[ServerProcess], tuple[Proc, Proc]]]:
    """shard-0 as a primary and its --replica-of; failed over with `cluster failover`."""
    old = start(tmp_path / "old", "--name", "shard-0", "--slots", SHARD_0)
    replica = start(tmp_path / "replica", "--replica-of", old.address,
                    "--name", "shard-0-replica-0")
    procs += [old, replica]
    wait_replicas(old.address, 1)

    def fail_over(router: ServerProcess) -> tuple[Proc, Proc]:
        report = _failover(router.address, "shard-0")
        assert report["new"] == replica.address
        return replica, old  # the old primary follows the new one

    return [], fail_over


def coordinated(tmp_path: Path, procs: list[Proc], etcd: Callable[[], str]
                ) -> tuple[list[str], Callable[[ServerProcess], tuple[Proc, Proc]]]:
    """shard-0 as two members elected through etcd; failed over by SIGKILL of the primary,
    the killed member started again on its directory (it comes back as a replica)."""
    url = etcd()
    args = ("--name", "shard-0", "--slots", SHARD_0, "--coordinator", url,
            "--lease-seconds", str(LEASE))
    old = start(tmp_path / "old", *args)
    procs.append(old)
    wait_for(lambda: stats(old.address).get("replication.role") == "primary")
    replica = start(tmp_path / "replica", *args)
    procs.append(replica)
    wait_replicas(old.address, 1)

    def fail_over(router: ServerProcess) -> tuple[Proc, Proc]:
        old.kill()
        write_until_accepted(router.address, time.monotonic(), 3 * LEASE + 15)
        assert stats(replica.address)["replication.role"] == "primary"
        back = start(tmp_path / "old", *args)
        procs.append(back)
        return replica, back

    return ["--coordinator", url], fail_over


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.mark.parametrize("how", [manual, coordinated], ids=["manual", "etcd"])
def test_merges_and_slot_moves_after_a_failover(tmp_path: Path, procs: list[Proc],
                                               how: Callable[..., tuple[list[str], Callable[
                                                   [ServerProcess], tuple[Proc, Proc]]]],
                                               request: pytest.FixtureRequest) -> None:
    router_args, fail_over = how(tmp_path, procs, lambda: request.getfixturevalue("etcd"))
    other = start_shard(tmp_path / "shard-1", "--name", "shard-1", "--slots", SHARD_1)
    router = start_router([procs[0].address, other.address], *router_args)
    new = start_shard(tmp_path / "shard-2", "--name", "shard-2")
    zero, one = ids_on(0, PROFILES // 2, "z"), ids_on(1, PROFILES // 2, "o")
    try:
        with Client(router.address) as c:
            c.load({"id": pid, "attributes": {"home": pid[0]},
                    "identifiers": [["email", f"{pid}@x.example"]]} for pid in zero + one)
            for pid in (zero[0], one[0]):
                c.track(pid, "visit", count=2)
            c.create_segment("zs", "home = 'z'")  # saved on both shards
        failed = time.monotonic()
        primary, follower = fail_over(router)
        write_until_accepted(router.address, failed, 3 * LEASE + 15)
        with Client(router.address) as c:
            # Merges across the shards, each way: survivor on the promoted shard-0, loser
            # on shard-1, and the other way round.
            for survivor, loser in ((zero[0], one[0]), (one[1], zero[1])):
                merged = c.link(survivor, [("email", f"{loser}@x.example")])
                assert (merged.id, merged.merged_ids) == (survivor, [loser])
                assert c.get(loser)["id"] == survivor
            assert c.get(zero[0])["attributes"]["event.visit.count"] == 4
        moved = cli(router.address, "add-shard", new.address,
                    "--journal", str(tmp_path / "add.json"))
        assert moved.returncode == 0, moved.stderr
        with Client(router.address) as c:
            owners = {pid: c.export(pid)["shard"] for pid in zero[2:] + one[2:]}
        assert {owners[pid] for pid in zero[2:]} == {"shard-0", "shard-2"}
        assert {owners[pid] for pid in one[2:]} == {"shard-1", "shard-2"}
        drained = cli(router.address, "remove-shard", "shard-0",
                      "--journal", str(tmp_path / "remove.json"))
        assert drained.returncode == 0, drained.stderr
        assert int(stats(primary.address)["profiles"]) == 0
        with Client(router.address) as c:
            got = c.batch_get(zero + one)
            assert [p["id"] for p in got] == [
                {zero[1]: one[1], one[0]: zero[0]}.get(pid, pid) for pid in zero + one]
            assert c.count("ALL") == PROFILES - 2 + 1  # two merged away, one written after
            assert c.count("home = 'z'") == len(zero) - 1
            assert c.count('in_segment("zs")') == len(zero) - 1  # moved with its slots
            assert {c.export(pid)["shard"] for pid in zero + one} == {"shard-1", "shard-2"}
            assert c.get(AFTER) is not None
        wait_caught_up(primary.address, follower.address)
        assert stats(follower.address)["replication.primary"] == primary.address
        assert state(follower.address) == state(primary.address)
    finally:
        router.stop()
        other.stop()
        new.stop()


def test_a_write_that_meets_the_old_primary_back_as_a_replica_waits_for_the_new_one(
        tmp_path: Path, procs: list[Proc]) -> None:
    """etcd: a primary killed and started again at once on its address comes back as a
    replica waiting for the election, and refuses writes (read-only replica). The router,
    whose map still names that address, takes the refusal as a failover it has not heard
    of yet and sends the write again once its map names the new primary, within the
    call's deadline: the caller sees the write applied, not a refusal it must not retry.
    (An etcd of its own: the module's holds the other tests' shards.)"""
    (tmp_path / "etcd").mkdir()
    with etcd_server(tmp_path / "etcd") as etcd:
        address = f"127.0.0.1:{_free_port()}"
        port = address.rpartition(":")[2]
        args = ("--name", "shard-0", "--slots", "0-16383", "--coordinator", etcd,
                "--lease-seconds", str(LEASE))
        old = start(tmp_path / "old", "--port", port, *args)
        procs.append(old)
        wait_for(lambda: stats(old.address).get("replication.role") == "primary")
        replica = start(tmp_path / "replica", *args)
        procs.append(replica)
        wait_replicas(old.address, 1)
        router = start_router([old.address], "--coordinator", etcd)
        try:
            with Client(router.address, timeout=3 * LEASE + 30) as c:
                c.upsert("before", {"n": 0})
                old.kill()
                back = start(tmp_path / "old", "--port", port, *args)
                procs.append(back)
                assert stats(back.address).get("replication.role") != "primary"  # not yet
                assert c.upsert("during", {"n": 1}).created
                assert c.get("before")["attributes"] == {"n": 0}
        finally:
            router.stop()
            for proc in procs:  # before their etcd goes
                proc.kill()


def test_a_running_router_stream_goes_on_from_the_new_primary_without_replaying(
        tmp_path: Path, procs: list[Proc]) -> None:
    """A router's change stream running through a failover of shard-0 goes on from the
    new primary where it was, in the history the new primary continues: every write
    after the failover arrives, and what arrived before it is not sent again (the new
    primary was once read from its oldest change, replaying its whole log)."""
    from tests.test_segments import Watcher

    _, fail_over = manual(tmp_path, procs, lambda: "")
    other = start_shard(tmp_path / "shard-1", "--name", "shard-1", "--slots", SHARD_1)
    router = start_router([procs[0].address, other.address])
    before = ids_on(0, 20, "b")
    try:
        watcher = Watcher(router.address, changes=True).started()
        with Client(router.address) as c:
            for pid in before:
                c.upsert(pid, {"n": 1})
        wait_for(lambda: len(watcher.events) >= len(before))
        fail_over(router)
        write_until_accepted(router.address, time.monotonic(), 30)
        wait_for(lambda: AFTER in [e["id"] for e in watcher.events])
        watcher.close()
        ids = [e["id"] for e in watcher.events]
        assert watcher.error is None or "cancel" in str(watcher.error).lower()
        assert sorted(ids) == sorted([*before, AFTER]), ids
    finally:
        router.stop()
        other.stop()
