"""A slot move whose only safeguard is its final (id, version) verification (step 5 of
shards/rebalance.py).

The catch-up exports after a position carry deletions only while the source remembers what
changed since then (RecentChanges, lost at a restart). A source that restarts after a
profile of the batch was deleted gives a full export without deletions, and only the
verification notices that the target still holds the deleted profile.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest

from memstore.v1 import cluster_pb2 as cpb
from memstore.v1 import cluster_pb2_grpc, memstore_pb2_grpc
from memstore.v1 import memstore_pb2 as pb
from shards import rebalance as rb
from shards.slots import slot_of
from tests.conftest import ServerProcess, start_shard
from tests.test_router import upsert


def _stub(address: str) -> memstore_pb2_grpc.MemstoreStub:
    return memstore_pb2_grpc.MemstoreStub(grpc.insecure_channel(address))


def _info(address: str) -> cpb.ShardInfo:
    with grpc.insecure_channel(address) as ch:
        return cluster_pb2_grpc.ShardControlStub(ch).GetShardInfo(cpb.ShardInfoRequest(),
                                                                  timeout=10)


def _restart(shard: ServerProcess, index: int) -> ServerProcess:
    """SIGKILL and start again from its data directory on the same port."""
    shard.stop(signal.SIGKILL)
    port = shard.address.rsplit(":", 1)[1]
    again = start_shard(shard.data_dir, "--name", f"shard-{index}", "--sync", "always",
                        "--port", port)
    assert again.address == shard.address
    return again


def test_a_source_restarted_after_a_deletion_in_the_batch_is_caught_by_verification(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = [start_shard(tmp_path / f"shard-{i}", "--name", f"shard-{i}", "--slots", slots,
                          "--sync", "always")
              for i, slots in enumerate(["0-8191", "8192-16383"])]
    try:
        ids = [p for p in (f"v-{i}" for i in range(1000)) if slot_of(p) < 8192][:300]
        _stub(shards[0].address).BatchUpsert(pb.BatchUpsertRequest(
            requests=[upsert(p, "Oslo", 1) for p in ids]), timeout=30)
        moving = set(range(4096, 8192))
        inside = [p for p in ids if slot_of(p) in moving]
        victim, changed = inside[0], inside[1]
        real_freeze = rb._freeze

        async def change_restart_then_freeze(source: rb.Node, slots: set[int], epoch: int
                                             ) -> None:
            # After the copy and the catch-up rounds, before the freeze: a deletion and a
            # change in the batch, then the source restarts and forgets both positions.
            stub = _stub(source.address)
            assert stub.Delete(pb.DeleteRequest(key=pb.ProfileKey(id=victim)),
                               timeout=10).deleted
            stub.Upsert(upsert(changed, "Bergen", 2), timeout=10)
            shards[0] = _restart(shards[0], 0)
            await asyncio.wait_for(source.channel.channel_ready(), 30)
            await real_freeze(source, slots, epoch)

        monkeypatch.setattr(rb, "_freeze", change_restart_then_freeze)

        async def move() -> rb.MoveReport:
            async with rb.Cluster([s.address for s in shards]) as cluster:
                source, target = cluster.nodes
                report = rb.MoveReport()
                await rb.move_batch(cluster, source, target, moving, rb.Journal(None), report)
                return report

        report = asyncio.run(move())
        target = _stub(shards[1].address)
        with pytest.raises(grpc.RpcError) as gone:
            target.Get(pb.GetRequest(key=pb.ProfileKey(id=victim)), timeout=10)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND, "the deleted profile came back"
        got = target.Get(pb.GetRequest(key=pb.ProfileKey(id=changed)), timeout=10).profile
        assert got.attributes["city"].string_value == "Bergen"
        counts = [_info(s.address).profiles for s in shards]
        assert counts == [len(ids) - len(inside), len(inside) - 1]
        assert target.Count(pb.QueryRequest(query=pb.Query(all=True)),
                            timeout=10).count == len(inside) - 1
        assert report.copied == len(inside)
        assert report.repaired_batches == 1  # the verification found the difference
    finally:
        for s in shards:
            s.stop()
