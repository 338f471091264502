"""Merging profiles across shards (shards/merge.py), over real shard and router processes.

Shard 0 owns slots 0-8191 and shard 1 owns 8192-16383 (split_even(2)); each test makes its
own profiles with ids picked by slot, so the survivor and the loser sit on known shards.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest
from pyroaring import BitMap

from memstore.v1 import cluster_pb2 as cpb
from memstore.v1 import cluster_pb2_grpc, memstore_pb2_grpc
from memstore.v1 import memstore_pb2 as pb
from shards.merge import CRASH_ENV, HOLD_PATIENCE
from shards.routing import SWEEP_INTERVAL
from shards.slots import slot_of
from tests.conftest import ServerProcess, said, start_router, start_shard
from tests.test_router import start_shards

_ids = itertools.count()


def new_id(shard: int, prefix: str = "p") -> str:
    """A fresh primary id whose slot shard `shard` (0 or 1) owns."""
    while True:
        pid = f"{prefix}-{next(_ids)}"
        if (slot_of(pid) >= 8192) == bool(shard):
            return pid


def email(pid: str) -> pb.Identifier:
    return pb.Identifier(kind="email", value=f"{pid}@example.com")


def make(stub: Any, pid: str, city: str, visits: int, tags: list[str]) -> None:
    stub.Upsert(pb.UpsertRequest(id=pid, identifiers=[email(pid)], operations=[
        pb.Operation(op=pb.Operation.SET, attribute="city",
                     value=pb.Value(string_value=city)),
        pb.Operation(op=pb.Operation.ADD_TO_SET, attribute="tags",
                     value=pb.Value(list_value=pb.StringList(values=tags))),
    ]), timeout=10)
    stub.Track(pb.TrackRequest(id=pid, event="visit", count=visits), timeout=10)


def pair(stub: Any, loser_visits: int = 1) -> tuple[str, str]:
    """A survivor-to-be in Oslo on shard 0 and a loser-to-be in Lima on shard 1."""
    survivor, loser = new_id(0, "s"), new_id(1, "l")
    make(stub, survivor, "Oslo", 1, [])
    make(stub, loser, "Lima", loser_visits, [])
    return survivor, loser


def get(stub: Any, key: str | pb.Identifier) -> pb.Profile:
    pk = pb.ProfileKey(identifier=key) if isinstance(key, pb.Identifier) else pb.ProfileKey(id=key)
    return stub.Get(pb.GetRequest(key=pk), timeout=15).profile


def count_city(stub: Any, city: str) -> int:
    return stub.Count(pb.QueryRequest(query=pb.Query(predicate=pb.Predicate(
        attribute="city", op=pb.Predicate.EQ, values=[pb.Value(string_value=city)]))),
        timeout=15).count


def control(shard: ServerProcess) -> Any:
    return cluster_pb2_grpc.ShardControlStub(grpc.insecure_channel(shard.address))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("merge")
    shards = start_shards(root, 2)
    router = start_router([s.address for s in shards], "--metrics-port", "0")
    channel = grpc.insecure_channel(router.address)
    yield {"stub": memstore_pb2_grpc.MemstoreStub(channel), "shards": shards,
           "router": router, "root": root}
    channel.close()
    router.stop()
    for shard in shards:
        shard.stop()


def test_link_merges_a_profile_from_the_other_shard(cluster: dict[str, Any]) -> None:
    stub, shards = cluster["stub"], cluster["shards"]
    survivor, loser = new_id(0, "s"), new_id(1, "l")
    make(stub, survivor, "Oslo", 1, ["a"])
    make(stub, loser, "Lima", 2, ["b"])
    lima_before = count_city(stub, "Lima")
    reply = stub.Link(pb.LinkRequest(id=survivor, identifiers=[email(loser)]), timeout=15)
    assert list(reply.merged_ids) == [loser] and reply.id == survivor
    merged = get(stub, survivor)
    assert merged.attributes["city"].string_value == "Oslo"  # the survivor's scalar wins
    assert merged.attributes["event.visit.count"].int_value == 3  # counters add
    assert sorted(merged.attributes["tags"].list_value.values) == ["a", "b"]
    assert {(i.kind, i.value) for i in merged.identifiers} == {
        ("email", email(survivor).value), ("email", email(loser).value)}
    assert loser in merged.merged_ids
    assert merged.version == reply.version
    # The loser's id and identifier resolve to the survivor; the loser is counted no more.
    assert get(stub, loser).id == survivor
    assert get(stub, email(loser)).id == survivor
    assert count_city(stub, "Lima") == lima_before - 1
    # Writes through the merged-away id land on the survivor, on the other shard.
    stub.Upsert(pb.UpsertRequest(id=loser, operations=[pb.Operation(
        op=pb.Operation.SET, attribute="vip", value=pb.Value(bool_value=True))]), timeout=10)
    assert get(stub, survivor).attributes["vip"].bool_value
    results = stub.BatchGet(pb.BatchGetRequest(keys=[
        pb.ProfileKey(id=loser), pb.ProfileKey(id=survivor)]), timeout=10).results
    assert [r.profile.id for r in results] == [survivor, survivor]
    assert all(not control(s).GetShardInfo(cpb.ShardInfoRequest()).held for s in shards)


def test_upsert_naming_a_foreign_identifier_merges_and_applies(cluster: dict[str, Any]
                                                                ) -> None:
    stub = cluster["stub"]
    survivor, loser = new_id(1, "s"), new_id(0, "l")
    make(stub, loser, "Rome", 4, ["x"])
    reply = stub.Upsert(pb.UpsertRequest(id=survivor, identifiers=[email(loser)], operations=[
        pb.Operation(op=pb.Operation.SET, attribute="city", value=pb.Value(string_value="Pune"))
    ]), timeout=15)
    assert reply.id == survivor
    merged = get(stub, email(loser))
    assert merged.id == survivor
    assert merged.attributes["city"].string_value == "Pune"
    assert merged.attributes["event.visit.count"].int_value == 4
    with pytest.raises(grpc.RpcError):
        control(cluster["shards"][1]).Absorb(cpb.AbsorbRequest(txn="", link=pb.LinkRequest(
            id=survivor, identifiers=[email(loser)])), timeout=5)


def test_merge_chains_follow_every_forward(cluster: dict[str, Any]) -> None:
    stub = cluster["stub"]
    x, y, z = new_id(1, "x"), new_id(0, "y"), new_id(1, "z")
    for pid in (x, y, z):
        make(stub, pid, "Kyiv", 1, [pid])
    stub.Link(pb.LinkRequest(id=y, identifiers=[email(x)]), timeout=15)  # x (1) into y (0)
    stub.Link(pb.LinkRequest(id=z, identifiers=[email(y)]), timeout=15)  # y (0) into z (1)
    final = get(stub, x)
    assert final.id == z
    assert final.attributes["event.visit.count"].int_value == 3
    assert sorted(final.attributes["tags"].list_value.values) == sorted([x, y, z])
    assert {x, y} <= set(final.merged_ids)
    assert get(stub, y).id == z


def _hold(shard: ServerProcess, txn: str, loser: str, survivor: str) -> dict[str, Any]:
    answer = control(shard).Hold(cpb.HoldRequest(txn=txn, loser=loser, survivor=survivor),
                                 timeout=10)
    return msgpack.unpackb(answer.packed, strict_map_key=False)  # type: ignore[no-any-return]


def _held(shard: ServerProcess) -> list[str]:
    return [h.loser for h in control(shard).GetShardInfo(cpb.ShardInfoRequest()).held]


def test_an_abandoned_hold_is_aborted_and_the_late_absorb_refused(cluster: dict[str, Any]
                                                                  ) -> None:
    stub, shards = cluster["stub"], cluster["shards"]
    survivor, loser = pair(stub)
    lima = count_city(stub, "Lima")
    exported = _hold(shards[1], "t-abandoned", loser, survivor)  # a router that then died
    assert exported["profile"][0] == loser
    assert _held(shards[1]) == [loser]
    assert count_city(stub, "Lima") == lima - 1  # held: counted as the survivor only
    started = time.monotonic()
    assert get(stub, loser).id == loser  # waits out the hold, then aborts it
    assert time.monotonic() - started >= HOLD_PATIENCE * 0.5
    assert _held(shards[1]) == [] and count_city(stub, "Lima") == lima
    with pytest.raises(grpc.RpcError) as err:
        control(shards[0]).Absorb(cpb.AbsorbRequest(
            txn="t-abandoned", losers=[msgpack.packb(exported)],
            link=pb.LinkRequest(id=survivor, identifiers=[email(loser)])), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already aborted" in err.value.details()
    assert get(stub, email(loser)).id == loser


def _committed_not_released(cluster: dict[str, Any], txn: str, visits: int
                            ) -> tuple[str, str]:
    """A merge of a loser on shard 1 into a survivor on shard 0 whose coordinator "died"
    after Absorb: committed, the loser still held. Returns (survivor, loser)."""
    stub, shards = cluster["stub"], cluster["shards"]
    survivor, loser = pair(stub, loser_visits=visits)
    exported = _hold(shards[1], txn, loser, survivor)
    control(shards[0]).Absorb(cpb.AbsorbRequest(
        txn=txn, losers=[msgpack.packb(exported)],
        link=pb.LinkRequest(id=survivor, identifiers=[email(loser)])), timeout=10)
    return survivor, loser


def test_a_committed_merge_is_finished_by_the_sweeper(cluster: dict[str, Any]) -> None:
    stub, shards = cluster["stub"], cluster["shards"]
    survivor, loser = _committed_not_released(cluster, "t-committed", 5)
    # Nobody releases the loser (the coordinator "died"); the router's sweeper must.
    deadline = time.monotonic() + 2 * HOLD_PATIENCE + 3 * SWEEP_INTERVAL + 5
    while _held(shards[1]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _held(shards[1]) == []
    assert get(stub, loser).id == survivor
    assert get(stub, survivor).attributes["event.visit.count"].int_value == 6


def test_a_shard_gives_up_no_slot_while_a_profile_in_it_is_held(cluster: dict[str, Any]
                                                                 ) -> None:
    stub, shards = cluster["stub"], cluster["shards"]
    survivor, loser = pair(stub)
    _hold(shards[1], "t-pinned", loser, survivor)
    info = control(shards[1]).GetShardInfo(cpb.ShardInfoRequest())
    with pytest.raises(grpc.RpcError) as err:
        control(shards[1]).SetSlots(cpb.SetSlotsRequest(epoch=info.epoch + 1, slots=[]),
                                    timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert loser in err.value.details()
    from tests.test_cli import memstore

    shown = memstore("cluster", "status", "--address", cluster["router"].address).stdout
    assert f"merging on shard-1: {loser!r} into {survivor!r} (merge t-pinned" in shown
    control(shards[1]).Release(cpb.ReleaseRequest(txn="t-pinned", loser=loser), timeout=10)
    assert get(stub, loser).id == loser


def _notes(shard: ServerProcess, pid: str) -> list[Any]:
    """The merge notes an export of pid's slot carries (claims aside: test_directory.py)."""
    slot = slot_of(pid)
    chunks = control(shard).ExportSlots(cpb.ExportRequest(
        slots=[cpb.SlotRange(start=slot, end=slot)]), timeout=10)
    notes = [msgpack.unpackb(c.packed, strict_map_key=False).get("notes") for c in chunks]
    return [n and {k: v for k, v in n.items() if k not in ("claims", "registry", "suppressed")}
            for n in notes]


def test_forwards_and_decisions_travel_with_their_slot(cluster: dict[str, Any]) -> None:
    stub, shards = cluster["stub"], cluster["shards"]
    survivor, loser = pair(stub)
    stub.Link(pb.LinkRequest(id=survivor, identifiers=[email(loser)]), timeout=15)
    assert {"forwards": {loser: survivor}, "decided": {}} in _notes(shards[1], loser)
    # These shards run --sync off: a restart could bring the loser's hold back, so the
    # survivor's shard keeps the decision (see the --sync always test below).
    assert any(n and any(v == [survivor, True] for v in n["decided"].values())
               for n in _notes(shards[0], survivor))
    # A decision still needed (its loser not released yet) travels with the survivor's slot.
    survivor, loser = _committed_not_released(cluster, "t-travel", 1)
    assert any(n and n["decided"].get("t-travel") == [survivor, True]
               for n in _notes(shards[0], survivor))
    assert get(stub, loser).id == survivor  # (the router finishes it)


@pytest.mark.parametrize("step, merged", [("merge-after-hold", False),
                                          ("merge-after-absorb", True)])
def test_router_killed_mid_merge_leaves_one_state(tmp_path: Path, step: str,
                                                  merged: bool) -> None:
    """SIGKILL the coordinating router between the protocol's steps, then kill and restart
    both shards too: a new router finds the hold and ends in one state or the other."""
    shards = start_shards(tmp_path, 2)
    dying = start_router([s.address for s in shards], env={CRASH_ENV: step})
    try:
        stub = memstore_pb2_grpc.MemstoreStub(grpc.insecure_channel(dying.address))
        survivor, loser = new_id(0, "s"), new_id(1, "l")
        make(stub, survivor, "Oslo", 1, ["s"])
        make(stub, loser, "Lima", 2, ["l"])
        with pytest.raises(grpc.RpcError) as err:
            stub.Link(pb.LinkRequest(id=survivor, identifiers=[email(loser)]), timeout=15)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dying.proc.wait(10) == -signal.SIGKILL
        for i, shard in enumerate(shards):  # crash the shards too, and bring them back
            shard.proc.kill()
            shard.proc.wait(10)
            shards[i] = start_shard(shard.data_dir, "--name", f"shard-{i}", "--sync", "off")
        assert _held(shards[1]) == [loser]  # the hold survived the crash
        router = start_router([s.address for s in shards])
        try:
            stub = memstore_pb2_grpc.MemstoreStub(grpc.insecure_channel(router.address))
            owner = get(stub, email(loser))
            visits = get(stub, survivor).attributes["event.visit.count"].int_value
            if merged:
                assert owner.id == survivor and get(stub, loser).id == survivor
                assert visits == 3
                assert count_city(stub, "Lima") == 0
            else:
                assert owner.id == loser and get(stub, loser).id == loser
                assert owner.attributes["event.visit.count"].int_value == 2
                assert visits == 1
                assert count_city(stub, "Lima") == 1
            assert _held(shards[1]) == []
            assert count_city(stub, "Oslo") == 1
        finally:
            router.stop()
    finally:
        for shard in shards:
            shard.stop()


def test_a_slot_move_waits_for_a_merge_holding_the_slot(tmp_path: Path) -> None:
    import asyncio
    import threading

    from shards.rebalance import Node, _freeze

    shards = start_shards(tmp_path, 2)
    try:
        loser = new_id(1, "l")
        stub = memstore_pb2_grpc.MemstoreStub(grpc.insecure_channel(shards[1].address))
        make(stub, loser, "Lima", 1, [])
        _hold(shards[1], "t-move", loser, new_id(0, "s"))
        release = threading.Timer(1.0, lambda: control(shards[1]).Release(
            cpb.ReleaseRequest(txn="t-move", loser=loser), timeout=10))
        release.start()

        async def freeze() -> cpb.ShardInfo:
            channel = grpc.aio.insecure_channel(shards[1].address)
            node = Node(shards[1].address, channel, cluster_pb2_grpc.ShardControlStub(channel))
            await node.refresh()
            started = time.monotonic()
            await _freeze(node, {slot_of(loser)}, node.info.epoch + 1)
            assert time.monotonic() - started >= 0.5  # it waited for the release
            await channel.close()
            return node.info

        info = asyncio.run(freeze())
        release.join()
        owned = {s for r in info.slots for s in range(r.start, r.end + 1)}
        assert slot_of(loser) not in owned and len(owned) == 8191
    finally:
        for shard in shards:
            shard.stop()


def test_batch_upsert_merges_across_shards_like_one_shard_would(cluster: dict[str, Any]
                                                                ) -> None:
    stub = cluster["stub"]
    held_elsewhere, newcomer = new_id(1, "h"), new_id(0, "n")
    make(stub, held_elsewhere, "Lima", 2, [])
    early, late = new_id(0, "e"), new_id(1, "t")
    shared = pb.Identifier(kind="device", value=f"dev-{early}")
    records = [
        # names an identifier a profile on the other shard holds: merged first
        [newcomer, {"city": "Oslo"}, [["email", email(held_elsewhere).value]]],
        # two records homed on different shards naming one new identifier: the later wins
        [early, {"city": "Rome"}, [["device", shared.value]]],
        [late, {"city": "Pune"}, [["device", shared.value]]],
    ]
    reply = stub.BatchUpsert(pb.BatchUpsertRequest(packed=msgpack.packb(records)), timeout=30)
    assert reply.applied == 3
    assert get(stub, email(held_elsewhere)).id == newcomer
    assert get(stub, held_elsewhere).id == newcomer
    merged = get(stub, newcomer)
    assert merged.attributes["event.visit.count"].int_value == 2
    assert merged.attributes["city"].string_value == "Oslo"
    owner = get(stub, shared)
    assert owner.id == late and get(stub, early).id == late
    assert early in owner.merged_ids
    assert owner.attributes["city"].string_value == "Pune"


def _set(attribute: str, value: str) -> pb.Operation:
    return pb.Operation(op=pb.Operation.SET, attribute=attribute,
                        value=pb.Value(string_value=value))


def test_batch_records_apply_in_order_around_a_cross_shard_merge(cluster: dict[str, Any]
                                                                 ) -> None:
    """Records of one profile before and after the record that merges another shard's
    profile into it apply in the order sent, and the merge and its record are one
    change, as a single Upsert's: the version counts it once."""
    stub = cluster["stub"]
    early, late = new_id(0, "e"), new_id(1, "t")
    device = pb.Identifier(kind="device", value=f"dev-{early}")
    held, writer, alone, twin = new_id(1, "h"), new_id(0, "w"), new_id(1, "h"), new_id(0, "w")
    make(stub, held, "Lima", 1, [])
    make(stub, alone, "Lima", 1, [])
    stub.Upsert(pb.UpsertRequest(id=writer, operations=[_set("city", "Kyiv")]), timeout=10)
    stub.Upsert(pb.UpsertRequest(id=twin, operations=[_set("city", "Kyiv")]), timeout=10)
    reply = stub.BatchUpsert(pb.BatchUpsertRequest(requests=[
        pb.UpsertRequest(id=early, identifiers=[device], operations=[_set("city", "Rome")]),
        # names the device `early` (homed on the other shard) named: merges it in
        pb.UpsertRequest(id=late, identifiers=[device], operations=[_set("city", "Pune")]),
        pb.UpsertRequest(id=late, operations=[_set("city", "Lima")]),
        pb.UpsertRequest(id=writer, identifiers=[email(held)], operations=[_set("mood", "a")]),
        pb.UpsertRequest(id=writer, operations=[_set("mood", "b")]),
    ]), timeout=30)
    assert reply.applied == 5 and reply.created == 2
    owner = get(stub, device)
    assert owner.id == late and early in owner.merged_ids
    assert owner.attributes["city"].string_value == "Lima"  # the last record, sent last
    merged = get(stub, writer)
    assert held in merged.merged_ids and merged.attributes["mood"].string_value == "b"
    # The same merge by single writes: the same version (the merge no change of its own).
    stub.Upsert(pb.UpsertRequest(id=twin, identifiers=[email(alone)],
                                 operations=[_set("mood", "a")]), timeout=15)
    stub.Upsert(pb.UpsertRequest(id=twin, operations=[_set("mood", "b")]), timeout=15)
    assert merged.version == get(stub, twin).version


def test_a_batch_record_over_a_limit_only_once_merged_merges_nothing(cluster: dict[str, Any]
                                                                      ) -> None:
    """A record whose merge would give the profile more identifiers of a kind than
    allowed is refused before the merge, as one Upsert is: nothing of it stays, and the
    records before it in the batch did apply (named in the trailers)."""
    stub = cluster["stub"]
    held, writer, before = new_id(1, "h"), new_id(0, "w"), new_id(1, "b")
    many = [pb.Identifier(kind="email", value=f"{held}-{i}@x") for i in range(20)]
    stub.Upsert(pb.UpsertRequest(id=held, identifiers=many), timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        stub.BatchUpsert(pb.BatchUpsertRequest(packed=msgpack.packb([
            [before, {"city": "Oslo"}, []],
            [writer, {"city": "Rome"}, [["email", many[0].value], ["email", f"{writer}@x"]]],
            [new_id(0, "a"), {"city": "Lima"}, []],
        ])), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details().startswith("packed[1].identifiers: ") and "21" in err.value.details()
    trailers = dict(err.value.trailing_metadata())
    assert trailers["memstore-record"] == "1"
    assert list(BitMap.deserialize(trailers["memstore-applied-bin"])) == [0]
    assert get(stub, before).attributes["city"].string_value == "Oslo"
    survivor = get(stub, many[0])
    assert survivor.id == held and not survivor.merged_ids and len(survivor.identifiers) == 20
    with pytest.raises(grpc.RpcError) as missing:
        get(stub, writer)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_batch_judges_again_after_a_merge_moves_an_identifier(cluster: dict[str, Any]
                                                                 ) -> None:
    """The first record merges `held` (shard 1) into its profile on shard 0, taking the
    identifier z along; a later record on shard 1 naming z then merges that profile into
    its own, as one shard would: z ends with one holder."""
    stub = cluster["stub"]
    held, first, second = new_id(1, "h"), new_id(0, "f"), new_id(1, "s")
    z = pb.Identifier(kind="device", value=f"z-{held}")
    stub.Upsert(pb.UpsertRequest(id=held, identifiers=[email(held), z]), timeout=10)
    reply = stub.BatchUpsert(pb.BatchUpsertRequest(packed=msgpack.packb([
        [first, {"city": "Oslo"}, [["email", email(held).value]]],
        [second, {"city": "Pune"}, [["device", z.value]]],
    ])), timeout=30)
    assert reply.applied == 2
    owner = get(stub, z)
    assert owner.id == second and {first, held} <= set(owner.merged_ids)
    assert get(stub, email(held)).id == second and get(stub, first).id == second
    assert owner.attributes["city"].string_value == "Pune"
    for shard in cluster["shards"]:  # no other profile holds z on either shard
        with grpc.insecure_channel(shard.address) as channel:
            try:
                found = memstore_pb2_grpc.MemstoreStub(channel).Get(pb.GetRequest(
                    key=pb.ProfileKey(identifier=z)), timeout=10).profile.id
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                continue
            assert found == second


def _holders(cluster: dict[str, Any], ident: pb.Identifier) -> list[str]:
    """Every profile holding `ident`, asking each shard itself."""
    out = []
    for shard in cluster["shards"]:
        with grpc.insecure_channel(shard.address) as channel:
            try:
                out.append(memstore_pb2_grpc.MemstoreStub(channel).Get(pb.GetRequest(
                    key=pb.ProfileKey(identifier=ident)), timeout=10).profile.id)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
    return out


def test_a_batch_record_through_a_merged_away_id_is_judged_for_its_survivor(
        cluster: dict[str, Any]) -> None:
    """Record 1 writes through `held`, which record 0 merges into `writer` on the other
    shard, naming an identifier `other` holds on held's old shard: it merges `other` into
    writer, as the same two Upserts would, and the identifier keeps one holder. Records
    through ids merged away before the batch, and by a same-shard merge inside it, go in
    their place among their survivor's records."""
    stub = cluster["stub"]
    held, writer, other = new_id(1, "h"), new_id(0, "w"), new_id(1, "x")
    make(stub, held, "Lima", 1, [])
    make(stub, other, "Rome", 1, [])
    reply = stub.BatchUpsert(pb.BatchUpsertRequest(requests=[
        pb.UpsertRequest(id=writer, identifiers=[email(held)]),
        pb.UpsertRequest(id=held, identifiers=[email(other)], operations=[_set("mood", "x")]),
    ]), timeout=30)
    assert reply.applied == 2
    assert _holders(cluster, email(other)) == [writer]
    merged = get(stub, writer)
    assert {held, other} <= set(merged.merged_ids)
    assert merged.attributes["mood"].string_value == "x"
    # p0 and p1 on shard 1, p2 on shard 0; p0 holds k0 and k1
    p0, p1, p2 = new_id(1, "p"), new_id(1, "p"), new_id(0, "p")
    k0, k1 = (pb.Identifier(kind="email", value=f"{p0}-{i}@x") for i in range(2))
    stub.Upsert(pb.UpsertRequest(id=p0, identifiers=[k0, k1]), timeout=10)
    stub.Upsert(pb.UpsertRequest(id=p2), timeout=10)
    records = [(p1, [k0, k1]),  # p0 merges into p1 on their shard
               (p1, []), (p2, [k1]),  # p1 (and p0 with it) merges into p2
               (p2, [k0, k1]), (p2, []), (p0, []), (p1, []), (p2, [k0])]
    reply = stub.BatchUpsert(pb.BatchUpsertRequest(requests=[
        pb.UpsertRequest(id=pid, identifiers=idents, operations=[_set("mood", f"r{i}")])
        for i, (pid, idents) in enumerate(records)]), timeout=30)
    assert reply.applied == len(records)
    final = get(stub, p2)
    assert final.attributes["mood"].string_value == f"r{len(records) - 1}"
    assert {p0, p1} <= set(final.merged_ids)
    assert _holders(cluster, k0) == [p2] and _holders(cluster, k1) == [p2]


def test_deleting_a_survivor_erases_the_forwards_on_the_other_shard(cluster: dict[str, Any]
                                                                   ) -> None:
    stub, shards = cluster["stub"], cluster["shards"]
    survivor, loser = pair(stub)
    stub.Link(pb.LinkRequest(id=survivor, identifiers=[email(loser)]), timeout=15)
    reply = stub.Delete(pb.DeleteRequest(key=pb.ProfileKey(id=loser)), timeout=15)
    assert reply.deleted and reply.id == survivor and list(reply.merged_ids) == [loser]
    slot = slot_of(loser)
    chunks = list(control(shards[1]).ExportSlots(cpb.ExportRequest(
        slots=[cpb.SlotRange(start=slot, end=slot)]), timeout=10))
    notes = [msgpack.unpackb(c.packed, strict_map_key=False).get("notes") for c in chunks]
    assert not any(n and loser in n["forwards"] for n in notes)
    with pytest.raises(grpc.RpcError) as err:
        get(stub, loser)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    stub.Upsert(pb.UpsertRequest(id=loser, operations=[pb.Operation(
        op=pb.Operation.SET, attribute="city", value=pb.Value(string_value="Rome"))]), timeout=10)
    assert get(stub, loser).id == loser  # a fresh profile, on its own shard


def test_batches_follow_many_merged_away_ids_at_once(cluster: dict[str, Any]) -> None:
    stub = cluster["stub"]
    pairs = [(new_id(0, "s"), new_id(1, "l")) for _ in range(40)]
    for survivor, loser in pairs:
        stub.Upsert(pb.UpsertRequest(id=survivor), timeout=10)
        stub.Upsert(pb.UpsertRequest(id=loser, identifiers=[email(loser)]), timeout=10)
        stub.Link(pb.LinkRequest(id=survivor, identifiers=[email(loser)]), timeout=15)
    losers = [loser for _, loser in pairs]
    results = stub.BatchGet(pb.BatchGetRequest(keys=[pb.ProfileKey(id=p) for p in losers]),
                            timeout=10).results
    assert [r.profile.id for r in results] == [s for s, _ in pairs]
    reply = stub.BatchUpsert(pb.BatchUpsertRequest(packed=msgpack.packb(
        [[loser, {"batch_mark": i}, []] for i, loser in enumerate(losers)])), timeout=10)
    assert reply.applied == len(losers)
    marks = [get(stub, s).attributes["batch_mark"].int_value for s, _ in pairs]
    assert marks == list(range(len(pairs)))


def test_the_router_counts_calls_and_merges_for_prometheus(cluster: dict[str, Any]) -> None:
    import urllib.request

    stub = cluster["stub"]
    survivor, loser = new_id(1, "s"), new_id(0, "l")
    make(stub, survivor, "Oslo", 1, [])
    make(stub, loser, "Lima", 1, [])
    stub.Link(pb.LinkRequest(id=survivor, identifiers=[email(loser)]), timeout=15)
    with pytest.raises(grpc.RpcError):
        get(stub, "nobody-at-all")
    url = said(cluster["router"].startup, "metrics on ")
    assert url is not None
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    assert values['memstore_merges_total{outcome="committed"}'] >= 1
    assert values['memstore_requests_total{code="OK",method="Link"}'] >= 1
    assert values['memstore_requests_total{code="NOT_FOUND",method="Get"}'] >= 1


def test_owners_answers_a_batch_of_identifiers_and_refuses_garbage(cluster: dict[str, Any]
                                                                  ) -> None:
    stub, shards = cluster["stub"], cluster["shards"]
    pid = new_id(1, "o")
    make(stub, pid, "Oslo", 1, [])
    ask = [["email", email(pid).value], ["email", "nobody@example.com"]]
    answers = [msgpack.unpackb(control(s).Owners(cpb.OwnersRequest(
        packed=msgpack.packb(ask)), timeout=10).packed) for s in shards]
    assert answers == [[None, None], [pid, None]]
    for bad, where in ((b"\xc1", "packed"), (msgpack.packb([["email"]]), "identifiers[0]")):
        with pytest.raises(grpc.RpcError) as err:
            control(shards[0]).Owners(cpb.OwnersRequest(packed=bad), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert where in err.value.details()


def test_racing_first_links_of_a_new_identifier_leave_one_owner(cluster: dict[str, Any]
                                                                ) -> None:
    """Two writes through one router give one new identifier to profiles on different
    shards at the same moment: the second must find the first's profile and merge, never
    leave the identifier with two owners. Both ways in: Link and an Upsert naming it, and
    BatchUpsert records."""
    shards, router = cluster["shards"], cluster["router"]

    async def race(n: int) -> list[str]:
        idents = []
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = memstore_pb2_grpc.MemstoreStub(channel)
            calls = []
            for i in range(n):
                ident = pb.Identifier(kind="device", value=f"race-{next(_ids)}")
                idents.append(ident.value)
                a, b = new_id(0, "ra"), new_id(1, "rb")
                calls.append(stub.Link(pb.LinkRequest(id=a, identifiers=[ident], create=True),
                                       timeout=30))
                if i % 3 == 0:
                    calls.append(stub.Upsert(pb.UpsertRequest(id=b, identifiers=[ident]),
                                             timeout=30))
                elif i % 3 == 1:
                    calls.append(stub.Link(pb.LinkRequest(id=b, identifiers=[ident],
                                                          create=True), timeout=30))
                else:
                    calls.append(stub.BatchUpsert(pb.BatchUpsertRequest(
                        packed=msgpack.packb([[b, {"city": "Rome"}, [["device", ident.value]]]])),
                        timeout=30))
            await asyncio.gather(*calls)
        return idents

    idents = asyncio.run(race(30))
    ask = msgpack.packb([["device", v] for v in idents])
    owners = [msgpack.unpackb(control(s).Owners(cpb.OwnersRequest(packed=ask),
                                                timeout=10).packed) for s in shards]
    for value, on_0, on_1 in zip(idents, *owners, strict=True):
        assert (on_0 is None) != (on_1 is None), f"device {value}: owners {on_0!r}, {on_1!r}"


def test_merges_under_shard_kills_end_whole_or_not_at_all(tmp_path: Path) -> None:
    """Cross-shard links run while shards are SIGKILLed and restarted under them (`--sync
    always`); more are sent while one shard is down (they cannot be acknowledged), and the
    last ones once both are back (they must be). Afterwards every acknowledged merge is
    there; every other one is either done or not done, wholly; no identifier has two
    owners; the profile count adds up. Where the random kills land is left to chance:
    nothing asserts what they happened to interrupt."""
    import contextlib
    import random
    import threading

    rng = random.Random(7)
    shards = start_shards(tmp_path, 2, "--sync", "always")
    router = start_router([s.address for s in shards])
    stub = memstore_pb2_grpc.MemstoreStub(grpc.insecure_channel(router.address))

    def pairs_of(n: int) -> list[tuple[str, str]]:
        return [(new_id(0, "s"), new_id(1, "l")) for _ in range(n)]

    racing, down, quiet = pairs_of(60), pairs_of(4), pairs_of(6)
    pairs = racing + down + quiet
    for survivor, loser in pairs:
        make(stub, survivor, "Oslo", 1, [])
        make(stub, loser, "Lima", 2, [])
    acked: list[tuple[str, str]] = []

    def link(survivor: str, loser: str, timeout: float = 10) -> None:
        stub.Link(pb.LinkRequest(id=survivor, identifiers=[email(loser)]), timeout=timeout)
        acked.append((survivor, loser))

    def kill(i: int) -> str:
        shards[i].proc.kill()
        shards[i].proc.wait(10)
        return shards[i].address.rsplit(":", 1)[1]

    def restart(i: int, port: str) -> None:
        shards[i] = start_shard(shards[i].data_dir, "--name", f"shard-{i}", "--port", port,
                                "--sync", "always")

    def link_all() -> None:
        for survivor, loser in racing:
            with contextlib.suppress(grpc.RpcError):  # unacknowledged: either state is fine
                link(survivor, loser)
            time.sleep(0.03)

    def reachable() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the router reconnects to the restarted shards
            try:
                stub.Count(pb.QueryRequest(query=pb.Query(all=True)), timeout=5)
                return
            except grpc.RpcError:
                time.sleep(0.2)
        raise AssertionError("the router did not reach the restarted shards in 20 s")

    worker = threading.Thread(target=link_all)
    worker.start()
    try:
        while worker.is_alive():
            time.sleep(rng.uniform(0.2, 0.6))
            i = rng.randrange(2)
            restart(i, kill(i))
        worker.join()
        for k, (survivor, loser) in enumerate(down):  # the survivor's shard, then the loser's
            i = k % 2
            port = kill(i)
            with pytest.raises(grpc.RpcError):
                link(survivor, loser, timeout=5)
            restart(i, port)
        reachable()
        for survivor, loser in quiet:
            link(survivor, loser)
        deadline = time.monotonic() + 20
        while any(_held(s) for s in shards) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_held(s) for s in shards)
        assert set(quiet) <= set(acked) and not set(down) & set(acked)
        merged = 0
        for survivor, loser in pairs:
            owner = get(stub, email(loser)).id
            assert get(stub, loser).id == owner
            if (survivor, loser) in acked:
                assert owner == survivor
            assert owner in (survivor, loser)
            visits = get(stub, survivor).attributes["event.visit.count"].int_value
            assert visits == (3 if owner == survivor else 1)
            merged += owner == survivor
        assert merged >= len(acked)
        everyone = stub.Count(pb.QueryRequest(query=pb.Query(all=True)), timeout=10).count
        assert everyone == 2 * len(pairs) - merged
        ask = msgpack.packb([["email", email(p).value] for pair in pairs for p in pair])
        held_by = [msgpack.unpackb(control(s).Owners(cpb.OwnersRequest(packed=ask),
                                                     timeout=10).packed) for s in shards]
        assert all(a is None or b is None for a, b in zip(*held_by, strict=True))
    finally:
        worker.join(30)
        router.stop()
        for shard in shards:
            shard.stop()


def test_a_decision_is_forgotten_once_every_release_is_durable(tmp_path: Path) -> None:
    shards = start_shards(tmp_path, 2, "--sync", "always")
    router = start_router([s.address for s in shards])
    try:
        stub = memstore_pb2_grpc.MemstoreStub(grpc.insecure_channel(router.address))
        survivor, loser = pair(stub)
        stub.Link(pb.LinkRequest(id=survivor, identifiers=[email(loser)]), timeout=15)
        assert {"forwards": {loser: survivor}, "decided": {}} in _notes(shards[1], loser)
        assert {"forwards": {}, "decided": {}} in _notes(shards[0], survivor)
    finally:
        router.stop()
        for shard in shards:
            shard.stop()
