"""Router stream positions across `cluster remove-shard` and `cluster add-shard`, on real
shard and router processes.

A router's position is a vector of every shard's. A drain moves a removed shard's profiles
as quiet copies (no events), so what it changed after a position is in its log alone: a
position naming it is refused with OUT_OF_RANGE, naming it (never resumed without its
changes), in both stream kinds. A stream that lives through the removal sends everything
the shard held, then positions that no longer name it, which resume. A shard added since
a position is read from its first change: nothing lost.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from memstore.client.core import Client, ClientError
from memstore.server.watch import decode_token
from shards.slots import slot_of
from tests.conftest import ROOT, ServerProcess, add_shard, start_router, start_shard
from tests.test_router import start_shards
from tests.test_segments import Watcher, eventually

ON_0 = [f"k{i}" for i in range(400) if slot_of(f"k{i}") < 8192][:20]  # shard-0's slots
ON_1 = [f"k{i}" for i in range(400) if slot_of(f"k{i}") >= 8192][:20]


def remove_shard(router: str, name: str, journal: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "memstore.cli", "cluster", "remove-shard", name, "--address",
         router, "--no-progress", "--journal", str(journal)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr


def position_now(address: str, changes: bool) -> str:
    """A position taken now: the first heartbeat of a stream from now."""
    with Client(address, timeout=30) as client:
        stream = client.changes(heartbeats=True) if changes else \
            client.watch(("adults",), heartbeats=True)
        for item in stream:
            if item.get("position"):
                return str(item["position"])
    raise AssertionError("no position")


def write(address: str, ids: list[str], age: int) -> dict[str, int]:
    """Acknowledged versions of `ids` set to `age`."""
    with Client(address) as client:
        return {pid: client.upsert(pid, {"age": age}).version for pid in ids}


def refusal(address: str, position: str, changes: bool) -> ClientError:
    with Client(address, timeout=30) as client:
        stream = client.changes(from_position=position) if changes else \
            client.watch(("adults",), from_position=position)
        with pytest.raises(ClientError) as caught:
            next(iter(stream))
    return caught.value


def start(root: Path) -> tuple[list[ServerProcess], ServerProcess]:
    shards = start_shards(root, 2)
    router = start_router([s.address for s in shards])
    with Client(router.address) as client:
        client.declare([{"name": "age", "kind": "int"}])
        client.batch_upsert([{"id": pid, "attributes": {"age": 10}} for pid in ON_0 + ON_1])
        client.create_segment("adults", "age >= 18")
    return shards, router


def versions_seen(watcher: Watcher) -> set[tuple[str, int]]:
    return {(e["id"], e["version"]) for e in watcher.events}


def test_a_position_naming_a_removed_shard_is_refused_and_later_ones_resume(tmp_path: Path
                                                                           ) -> None:
    shards, router = start(tmp_path)
    try:
        before = {kind: position_now(router.address, kind) for kind in (True, False)}
        live = Watcher(router.address, changes=True, from_position=before[True]).started()
        acked = write(router.address, ON_0 + ON_1, 30)  # shard-0's only in its log
        remove_shard(router.address, "shard-0", tmp_path / "journal.json")

        for changes in (True, False):  # WatchChanges, WatchSegments
            refused = refusal(router.address, before[changes], changes)
            assert refused.code == grpc.StatusCode.OUT_OF_RANGE, refused
            assert "shard-0" in refused.details and "initial" in refused.details

        # The live stream sent all that shard-0 held, then dropped it from its positions.
        eventually(lambda: set(acked.items()) <= versions_seen(live),
                   what="the live stream to send every acknowledged write")
        eventually(lambda: set(decode_token(live.position)) == {"shard-1"},
                   what="the live stream's positions to stop naming shard-0")
        after = {kind: position_now(router.address, kind) for kind in (True, False)}
        from_live = live.position
        live.close()
        again = write(router.address, ON_0 + ON_1, 5)  # all on shard-1 now; all leave
        for position in (after[True], from_live):
            resumed = Watcher(router.address, changes=True, from_position=position).started()
            eventually(lambda w=resumed: set(again.items()) <= versions_seen(w),
                       what="a position from after the removal to resume")
            resumed.close()
        left = Watcher(router.address, ("adults",), from_position=after[False]).started()
        eventually(lambda: sorted((e["id"], e["change"]) for e in left.events)
                   == sorted((pid, "leave") for pid in ON_0 + ON_1),
                   what="the segment stream from after the removal to resume")
        left.close()
    finally:
        router.stop()
        for shard in shards:
            shard.stop()


def test_a_position_from_before_add_shard_resumes_with_every_write(tmp_path: Path) -> None:
    shards, router = start(tmp_path)
    new = start_shard(tmp_path / "shard-2", "--name", "shard-2", "--sync", "off")
    try:
        before = {kind: position_now(router.address, kind) for kind in (True, False)}
        acked = set(write(router.address, ON_0 + ON_1, 30).items())
        add_shard(router.address, new.address, "--batch-slots", "2048")
        acked |= write(router.address, ON_0 + ON_1, 50).items()  # some on shard-2 now
        resumed = Watcher(router.address, changes=True, from_position=before[True]).started()
        eventually(lambda: acked <= versions_seen(resumed),
                   what="every write after the position, across the add")
        resumed.close()
        segment = Watcher(router.address, ("adults",), from_position=before[False]).started()
        eventually(lambda: {e["id"] for e in segment.events if e["change"] == "enter"}
                   == set(ON_0 + ON_1), what="every ENTER after the position")
        segment.close()
    finally:
        router.stop()
        new.stop()
        for shard in shards:
            shard.stop()
