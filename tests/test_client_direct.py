"""Client(direct_reads=True): Gets by id go straight to the owning shard, and fall back to
the router whenever the shard's answer is not the answer (moved slot, merged id, down)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memstore.client.core import REFRESH_EVERY, AsyncClient, Client, ClientError
from shards.slots import slot_of
from tests.conftest import ServerProcess, add_shard, start_shard
from tests.test_router import RouterThread, start_shards

N = 60


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, Any]]:
    shards = start_shards(tmp_path, 2)
    router = RouterThread([s.address for s in shards])
    with Client(router.address) as c:
        for i in range(N):
            c.upsert(f"p{i}", {"n": i}, identifiers=[("email", f"p{i}@x")])
    state = {"router": router, "shards": shards, "tmp": tmp_path}
    try:
        yield state
        if state["router"] is not None:  # a test that stopped it said so
            router.stop()
    finally:
        for shard in shards:
            shard.stop()


def _spread(ids: list[str]) -> None:
    owners = {slot_of(pid) < 8192 for pid in ids}
    assert owners == {True, False}, "the test ids should live on both shards"


def test_direct_reads_answer_like_the_router_and_need_it_only_to_start(
        cluster: dict[str, Any]) -> None:
    router: RouterThread = cluster["router"]
    cluster["router"] = None  # this test stops it
    ids = [f"p{i}" for i in range(N)]
    _spread(ids)
    with Client(router.address) as plain, Client(router.address, direct_reads=True) as c:
        for pid in ids:
            assert c.get(pid) == plain.get(pid)
        assert c.get("nobody") is None
        assert c.get(identifier=("email", "p7@x"))["id"] == "p7"  # through the router
        assert c.get("p3", attributes=["n"])["attributes"] == {"n": 3}
        router.stop()
        # With the router gone, Gets by id still answer: they never went through it.
        assert [c.get(pid)["attributes"]["n"] for pid in ids] == list(range(N))
        assert c.get("nobody") is None
        with pytest.raises(ClientError) as err:
            c.get(identifier=("email", "p7@x"))
        assert err.value.code.name == "UNAVAILABLE"


def test_a_merged_away_id_is_followed_through_the_router(cluster: dict[str, Any]) -> None:
    router: RouterThread = cluster["router"]
    a = "p1"
    b = next(f"p{i}" for i in range(2, N) if (slot_of(f"p{i}") < 8192) != (slot_of(a) < 8192))
    with Client(router.address, direct_reads=True) as c:
        assert c.get(b)["id"] == b  # the slot table is loaded
        result = c.link(a, [("email", f"{b}@x")])
        assert result.merged_ids == [b]
        got = c.get(b)  # b's shard refuses with a forward; the router follows it
        assert got["id"] == a
        assert ("email", f"{b}@x") in [tuple(i) for i in got["identifiers"]]


def test_a_moved_slot_is_read_from_its_new_shard(cluster: dict[str, Any]) -> None:
    router: RouterThread = cluster["router"]
    tmp: Path = cluster["tmp"]
    new = start_shard(tmp / "shard-new", "--name", "shard-2", "--sync", "off")
    try:
        with Client(router.address, direct_reads=True) as c:
            assert c.get("p0")["id"] == "p0"
            assert len(c._owners.table[0]) == 2  # type: ignore[union-attr]
            add_shard(router.address, new.address, "--journal", str(tmp / "journal.json"))
            # The table is stale: ids whose shard changed are refused (wrong slot, or
            # another epoch than the client expects) and go through the router, and the
            # client reads the shard list again (at most once a second: wait that out so
            # the refresh happens during these reads).
            time.sleep(REFRESH_EVERY)
            assert [c.get(f"p{i}")["attributes"]["n"] for i in range(N)] == list(range(N))
            assert new.address in [a for a, _ in c._owners.table[0]]  # type: ignore[union-attr]
            router.stop()  # every id now answers from its shard, shard-2's included
            cluster["router"] = None
            assert [c.get(f"p{i}")["attributes"]["n"] for i in range(N)] == list(range(N))
    finally:
        new.stop()


def test_against_a_shard_direct_reads_switch_themselves_off(tmp_path: Path) -> None:
    shard: ServerProcess = start_shard(None)
    try:
        with Client(shard.address, direct_reads=True) as c:
            c.upsert("solo", {"n": 1})
            assert c.get("solo")["attributes"] == {"n": 1}
            assert c._owners is not None and not c._owners.enabled
            assert c.get("nobody") is None
    finally:
        shard.stop()


def test_async_client_reads_directly_too(cluster: dict[str, Any]) -> None:
    router: RouterThread = cluster["router"]
    cluster["router"] = None  # this test stops it

    async def run() -> list[Any]:
        async with AsyncClient(router.address, direct_reads=True) as c:
            first = await c.get("p5")
            router.stop()
            return [first, await c.get("p6"), await c.get("nobody")]

    first, after, missing = asyncio.run(run())
    assert first["attributes"] == {"n": 5}
    assert after["attributes"] == {"n": 6}  # the router was already gone
    assert missing is None


def test_a_fresh_shard_claiming_every_slot_at_epoch_0_is_not_read(
        cluster: dict[str, Any]) -> None:
    """A new, empty shard owns every slot at epoch 0 until a move gives it some; the
    router's list shows that claim beside the real owners', and the higher epoch wins."""
    from shards.admin import admin_call

    router: RouterThread = cluster["router"]
    fresh = start_shard(None, "--name", "shard-9")
    try:
        asyncio.run(admin_call(router.address, "AddShard", {"address": fresh.address}))
        with Client(router.address, direct_reads=True) as c:
            assert [c.get(f"p{i}")["attributes"]["n"] for i in range(N)] == list(range(N))
            addresses = [a for a, _ in c._owners.table[0]]  # type: ignore[union-attr]
            assert fresh.address in addresses
            owner = c._owners.table[1]  # type: ignore[union-attr]
            assert addresses.index(fresh.address) not in set(owner)
    finally:
        fresh.stop()


def test_a_shard_refuses_a_get_judged_for_another_shard_or_epoch(
        cluster: dict[str, Any]) -> None:
    import grpc

    from memstore.hashslot import EXPECT_SHARD
    from memstore.v1 import memstore_pb2 as pb
    from memstore.v1 import memstore_pb2_grpc

    shard = cluster["shards"][0]
    pid = next(f"p{i}" for i in range(N) if slot_of(f"p{i}") < 8192)
    request = pb.GetRequest(key=pb.ProfileKey(id=pid))
    with grpc.insecure_channel(shard.address) as channel:
        stub = memstore_pb2_grpc.MemstoreStub(channel)
        assert stub.Get(request, timeout=10, metadata=((EXPECT_SHARD, "shard-0:1"),)
                        ).profile.id == pid
        for wrong in ("shard-0:2", "shard-1:1"):
            with pytest.raises(grpc.RpcError) as err:
                stub.Get(request, timeout=10, metadata=((EXPECT_SHARD, wrong),))
            assert err.value.code() == grpc.StatusCode.ABORTED
            assert "slots moved since" in (err.value.details() or "")
