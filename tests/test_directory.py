"""The identifier directory (memstore/index/claims.py, shards/directory.py): claims on the shard
owning the identifier's slot, verified against the profile they name."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest
from pyroaring import BitMap

from memstore.engine.core import Engine
from memstore.errors import InvalidArgument, WrongSlot
from memstore.index.claims import TICK, Claims, claim_key
from memstore.v1 import cluster_pb2 as cpb
from memstore.v1 import cluster_pb2_grpc, memstore_pb2_grpc
from memstore.v1 import memstore_pb2 as pb
from shards.slots import format_ranges, slot_of, split_even
from tests.conftest import ServerProcess, start_router, start_shard
from tests.test_cli import memstore
from tests.test_router import RouterThread

_ids = itertools.count()


def control(shard: ServerProcess) -> Any:
    return cluster_pb2_grpc.ShardControlStub(grpc.insecure_channel(shard.address))


def claims(shard: ServerProcess, entries: list[list[Any]]) -> list[list[Any]]:
    return msgpack.unpackb(control(shard).Claim(cpb.ClaimRequest(
        packed=msgpack.packb(entries)), timeout=10).packed)


def owner_of(shards: int, key: str) -> int:
    """Which of `shards` even shards owns slot_of(key)."""
    slot = slot_of(key)
    return next(i for i, ranges in enumerate(split_even(shards))
                if any(a <= slot <= b for a, b in ranges))


def fresh(shards: int, want_pid: int, want_claim: int, prefix: str = "d"
          ) -> tuple[str, pb.Identifier]:
    """A new primary id on shard `want_pid` and a new email whose claim is on `want_claim`."""
    while True:
        pid = f"{prefix}-{next(_ids)}"
        if owner_of(shards, pid) == want_pid:
            break
    while True:
        value = f"{prefix}-{next(_ids)}@example.com"
        if owner_of(shards, claim_key("email", value)) == want_claim:
            return pid, pb.Identifier(kind="email", value=value)


def get(stub: Any, ident: pb.Identifier, timeout: float = 10) -> pb.Profile:
    return stub.Get(pb.GetRequest(key=pb.ProfileKey(identifier=ident)), timeout=timeout).profile


def start(root: Path, n: int, *extra: str) -> list[ServerProcess]:
    return [start_shard(root / f"shard-{i}", "--name", f"shard-{i}", "--slots",
                        format_ranges(ranges), *extra)
            for i, ranges in enumerate(split_even(n))]


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    shards = start(tmp_path_factory.mktemp("directory"), 3, "--sync", "off")
    router = RouterThread([s.address for s in shards])
    channel = grpc.insecure_channel(router.address)
    yield {"stub": memstore_pb2_grpc.MemstoreStub(channel), "shards": shards,
           "router": router}
    channel.close()
    router.stop()
    for shard in shards:
        shard.stop()


# ---------------------------------------------------------------------- the engine's part

def test_claims_make_take_over_and_release_by_compare_and_set() -> None:
    engine = Engine()
    plan = engine.plan_claims([["email", "a@x", "p1", None], ["email", "a@x", "p2", None],
                               ["email", "b@x", None, None]])
    assert [a[:3:2] for a in plan.result] == [["p1", True], ["p1", False], [None, False]]
    engine.apply(plan)
    assert engine.claims.get(claim_key("email", "a@x")) == "p1" and len(engine.claims) == 1
    # A take-over names the holder it expects; a wrong guess changes nothing.
    assert engine.plan_claims([["email", "a@x", "p2", "p3"]]).result[0][:3:2] == ["p1", False]
    plan = engine.plan_claims([["email", "a@x", "p2", "p1"]])
    assert plan.result[0][:3:2] == ["p2", True]
    undo = engine.apply(plan)
    # Release only if still the named holder's.
    assert engine.plan_claims([["email", "a@x", None, "p1"]]).result[0][0] == "p2"
    engine.apply(engine.plan_claims([["email", "a@x", None, "p2"]]))
    assert engine.claims.get(claim_key("email", "a@x")) is None and len(engine.claims) == 0
    engine.undo(undo)  # undo puts the before-image back (p1), not the release's
    assert engine.claims.get(claim_key("email", "a@x")) == "p1"


def test_claims_refuse_bad_entries_and_slots_owned_elsewhere() -> None:
    engine = Engine()
    for bad, where in (([["email", "a@x", "p1"]], "claims[0]"),
                       ([["email", "a@x", None, None], ["Email", "a@x", "p", None]], "claims[1]"),
                       ([["email", "", "p", None]], "empty identifier value"),
                       ([["email", "a@x", 7, None]], "claims[0]: pid"),
                       ([["email", "a@x", "", None]], "claims[0].pid")):
        with pytest.raises(InvalidArgument, match=where.replace("[", r"\[").replace("]", r"\]")):
            engine.plan_claims(bad)
    key = claim_key("email", "a@x")
    engine.set_ownership(1, BitMap(s for s in range(16384) if s != slot_of(key)))
    with pytest.raises(WrongSlot, match="identifier email:'a@x'"):
        engine.plan_claims([["email", "a@x", None, None]])


def test_claim_ages_tell_a_write_in_flight_from_a_stale_claim() -> None:
    clock = [100.0]
    table = Claims(grace=10.0, clock=lambda: clock[0])
    table.load(slot_of("email:a"), {"email:a": "p"})  # a snapshot: as old as the process
    assert table.young("email:a", 105) and not table.young("email:a", 111)
    clock[0] = 120.0
    table.swap("email:a", "q")  # taken over later: young again
    assert 5 - TICK <= table.age("email:a", 125) <= 5
    assert table.young("email:a", 125) and not table.young("email:a", 131)
    table.swap("email:a", "q")  # set to the pid it has: not made again
    assert not table.young("email:a", 131)
    home = slot_of("email:a")
    neighbours = list(itertools.islice((k for k in map("email:{}".format, itertools.count())
                                        if slot_of(k) == home), 40))
    for key in neighbours:  # ages move with their claims as others are inserted
        table.swap(key, "p")
    clock[0] = 140.0
    table.swap("email:a", "p")
    assert len(table._slots[home].hashes) == 41
    assert table.age("email:a", 140) == 0
    assert all(20 - TICK <= table.age(key, 140) <= 20 for key in neighbours)


# ---------------------------------------------------------------------- through routers

def test_lookups_ask_only_the_claims_shard_and_the_profiles(three: dict[str, Any]) -> None:
    """With the shard that holds neither the claim nor the profile stopped, a look-up by
    identifier still answers (it used to ask every shard, and wait for this one)."""
    stub, shards = three["stub"], three["shards"]
    pid, ident = fresh(3, want_pid=0, want_claim=1)
    stub.Upsert(pb.UpsertRequest(id=pid, identifiers=[ident]), timeout=10)
    assert claims(shards[1], [["email", ident.value, None, None]])[0][0] == pid
    with pytest.raises(grpc.RpcError) as err:  # not its slot
        claims(shards[0], [["email", ident.value, None, None]])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is not owned by this shard" in err.value.details()
    shards[2].proc.send_signal(signal.SIGSTOP)
    try:
        assert get(stub, ident, timeout=5).id == pid
        results = stub.BatchGet(pb.BatchGetRequest(keys=[
            pb.ProfileKey(identifier=ident),
            pb.ProfileKey(identifier=fresh(3, want_pid=0, want_claim=0)[1])],
            attributes=["\x00"]), timeout=5).results
        assert [r.found for r in results] == [True, False]
        with pytest.raises(grpc.RpcError) as err:
            get(stub, pb.Identifier(kind="email", value=fresh(3, 0, 1)[1].value), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        shards[2].proc.send_signal(signal.SIGCONT)


def test_a_refused_write_gives_its_claims_back(three: dict[str, Any]) -> None:
    stub, shards = three["stub"], three["shards"]
    pid, ident = fresh(3, want_pid=0, want_claim=2)
    stub.Upsert(pb.UpsertRequest(id=pid, operations=[pb.Operation(
        op=pb.Operation.SET, attribute="visits", value=pb.Value(int_value=1))]), timeout=10)
    with pytest.raises(grpc.RpcError) as err:  # wrong kind: nothing is written
        stub.Upsert(pb.UpsertRequest(id=pid, identifiers=[ident], operations=[pb.Operation(
            op=pb.Operation.SET, attribute="visits", value=pb.Value(string_value="x"))]),
            timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert claims(shards[2], [["email", ident.value, None, None]])[0][0] is None
    blocked = pb.Identifier(kind="email", value="null")
    with pytest.raises(grpc.RpcError) as err:
        stub.Link(pb.LinkRequest(id=pid, identifiers=[blocked]), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    at = owner_of(3, claim_key("email", "null"))
    assert claims(shards[at], [["email", "null", None, None]])[0][0] is None


def test_delete_releases_the_claims_of_its_identifiers(three: dict[str, Any]) -> None:
    stub, shards = three["stub"], three["shards"]
    pid, ident = fresh(3, want_pid=1, want_claim=0)
    stub.Upsert(pb.UpsertRequest(id=pid, identifiers=[ident]), timeout=10)
    assert claims(shards[0], [["email", ident.value, None, None]])[0][0] == pid
    reply = stub.Delete(pb.DeleteRequest(key=pb.ProfileKey(identifier=ident)), timeout=10)
    assert reply.deleted and [(i.kind, i.value) for i in reply.identifiers] == [
        ("email", ident.value)]
    assert claims(shards[0], [["email", ident.value, None, None]])[0][0] is None
    with pytest.raises(grpc.RpcError) as err:
        get(stub, ident)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_stale_claim_waits_out_its_grace_then_is_taken_over(three: dict[str, Any]) -> None:
    """A claim whose write never came (its router died): a write naming the identifier
    waits while the claim is young, then takes it over; look-ups never trust it."""
    stub, shards, router = three["stub"], three["shards"], three["router"]
    ghost, ident = fresh(3, want_pid=2, want_claim=1)
    assert claims(shards[1], [["email", ident.value, ghost, None]])[0][:3:2] == [ghost, True]
    with pytest.raises(grpc.RpcError) as err:  # ghost does not hold it: not found
        get(stub, ident)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    pid = fresh(3, want_pid=0, want_claim=0)[0]
    with pytest.raises(grpc.RpcError) as err:  # young (grace 30 s): the write waits
        stub.Upsert(pb.UpsertRequest(id=pid, identifiers=[ident]), timeout=1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    router.router.directory.grace = 0.5
    try:
        time.sleep(0.6)
        stub.Upsert(pb.UpsertRequest(id=pid, identifiers=[ident]), timeout=10)
    finally:
        router.router.directory.grace = 30.0
    assert get(stub, ident).id == pid
    assert claims(shards[1], [["email", ident.value, None, None]])[0][0] == pid


def test_racing_first_links_through_two_routers_leave_one_owner(three: dict[str, Any]
                                                                ) -> None:
    """Routers share no locks: two writes through two routers giving one new identifier
    to profiles on different shards meet at its claim, and the second merges with the
    first's profile. Link, Upsert and BatchUpsert, every pairing."""
    stub, shards = three["stub"], three["shards"]
    other = start_router([s.address for s in shards])
    try:
        async def race(n: int) -> list[tuple[str, str, pb.Identifier]]:
            made = []
            async with grpc.aio.insecure_channel(three["router"].address) as one, \
                    grpc.aio.insecure_channel(other.address) as two:
                stubs = [memstore_pb2_grpc.MemstoreStub(c) for c in (one, two)]
                calls = []
                for i in range(n):
                    a, ident = fresh(3, want_pid=i % 3, want_claim=(i + 1) % 3, prefix="ra")
                    b = fresh(3, want_pid=(i + 2) % 3, want_claim=0, prefix="rb")[0]
                    made.append((a, b, ident))
                    for pid, via in ((a, stubs[i % 2]), (b, stubs[1 - i % 2])):
                        form = (i + (pid == b)) % 3
                        if form == 0:
                            calls.append(via.Link(pb.LinkRequest(
                                id=pid, identifiers=[ident], create=True), timeout=30))
                        elif form == 1:
                            calls.append(via.Upsert(pb.UpsertRequest(
                                id=pid, identifiers=[ident]), timeout=30))
                        else:
                            calls.append(via.BatchUpsert(pb.BatchUpsertRequest(
                                packed=msgpack.packb([[pid, {"city": "Rome"},
                                                       [["email", ident.value]]]])),
                                timeout=30))
                await asyncio.gather(*calls)
            return made

        for a, b, ident in asyncio.run(race(24)):
            ask = msgpack.packb([["email", ident.value]])
            holders = [h for s in shards for h in msgpack.unpackb(
                control(s).Owners(cpb.OwnersRequest(packed=ask), timeout=10).packed) if h]
            assert len(holders) == 1, f"{ident.value}: held by {holders}"
            assert get(stub, ident).id == holders[0]
            # a and b are one person now: both ids resolve to the holder
            for pid in (a, b):
                got = stub.Get(pb.GetRequest(key=pb.ProfileKey(id=pid)), timeout=10).profile
                assert got.id == holders[0]
    finally:
        other.stop()


def test_claims_survive_a_kill_and_move_with_their_slots(tmp_path: Path) -> None:
    """Claims are logged: a shard killed with SIGKILL comes back with them. add-shard
    moves them with their slots: every identifier still finds its profile."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    shards = start(tmp_path, 2, "--sync", "always")
    new = start_shard(tmp_path / "shard-new", "--name", "shard-2", "--sync", "always")
    router = RouterThread([s.address for s in shards])
    stub = memstore_pb2_grpc.MemstoreStub(grpc.insecure_channel(router.address))
    try:
        people = {f"k-{i}": f"k-{i}@example.com" for i in range(300)}
        stub.BatchUpsert(pb.BatchUpsertRequest(requests=[
            pb.UpsertRequest(id=p, identifiers=[pb.Identifier(kind="email", value=e)])
            for p, e in people.items()]), timeout=30)

        def found() -> dict[str, str]:
            keys = [pb.ProfileKey(identifier=pb.Identifier(kind="email", value=e))
                    for e in people.values()]
            results = stub.BatchGet(pb.BatchGetRequest(keys=keys, attributes=["\x00"]),
                                    timeout=30).results
            return {e: r.profile.id for e, r in zip(people.values(), results) if r.found}

        people_by_email = {e: p for p, e in people.items()}
        assert found() == people_by_email
        shards[1].proc.send_signal(signal.SIGKILL)
        shards[1].proc.wait(10)
        shards[1] = start_shard(shards[1].data_dir, "--name", "shard-1", "--sync", "always",
                                "--port", shards[1].address.rsplit(":", 1)[1])
        router.run(router.router.map.refresh())
        assert found() == people_by_email

        result = subprocess.run(
            [sys.executable, "-m", "memstore.cli", "cluster", "add-shard", new.address,
             "--address", router.address, "--batch-slots", "1024", "--no-progress"],
            check=False, cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr
        assert found() == people_by_email
        # The new shard answers for the claims of its slots; the old ones forgot them.
        info = control(new).GetShardInfo(cpb.ShardInfoRequest(), timeout=10)
        taken = {s for r in info.slots for s in range(r.start, r.end + 1)}
        moved = [e for e in people.values() if slot_of(claim_key("email", e)) in taken]
        assert len(moved) > 30
        assert [r[0] for r in claims(new, [["email", e, None, None] for e in moved])] == [
            people_by_email[e] for e in moved]
        for old in shards:
            chunks = control(old).ExportSlots(cpb.ExportRequest(slots=info.slots), timeout=10)
            assert all(not msgpack.unpackb(c.packed)["notes"]["claims"] for c in chunks)
    finally:
        router.stop()
        for s in [*shards, new]:
            s.stop()


def test_rebuild_directory_claims_profiles_written_straight_to_shards(three: dict[str, Any]
                                                                       ) -> None:
    """Profiles a router never saw have no claims: a router does not find them by
    identifier until `memstore cluster rebuild-directory`, which reports an identifier
    held by profiles on two shards and leaves it for the next write to merge."""
    stub, shards, router = three["stub"], three["shards"], three["router"]
    written = []
    for n in range(3):
        pid, ident = fresh(3, want_pid=n, want_claim=(n + 1) % 3, prefix="raw")
        memstore_pb2_grpc.MemstoreStub(grpc.insecure_channel(shards[n].address)).Upsert(
            pb.UpsertRequest(id=pid, identifiers=[ident]), timeout=10)
        written.append((pid, ident))
    shared = pb.Identifier(kind="device", value=f"shared-{next(_ids)}")
    twins = [fresh(3, want_pid=n, want_claim=0, prefix="twin")[0] for n in (0, 1)]
    for n, pid in enumerate(twins):
        memstore_pb2_grpc.MemstoreStub(grpc.insecure_channel(shards[n].address)).Upsert(
            pb.UpsertRequest(id=pid, identifiers=[shared]), timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        get(stub, written[0][1])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    result = memstore("cluster", "rebuild-directory", "--address", router.address)
    assert re.search(r"identifiers of \d+ profiles: 4 claimed now, 1 held by two profiles",
                     result.stdout), result.stdout
    for pid, ident in written:
        assert get(stub, ident).id == pid
    claimed = get(stub, shared).id
    assert claimed in twins
    again = memstore("cluster", "rebuild-directory", "--address", router.address)
    assert "0 claimed now, 1 held by two profiles" in again.stdout  # idempotent
    # Linking the identifier to the twin without the claim merges the two.
    other = next(t for t in twins if t != claimed)
    stub.Link(pb.LinkRequest(id=other, identifiers=[shared]), timeout=10)
    assert {stub.Get(pb.GetRequest(key=pb.ProfileKey(id=t)), timeout=10).profile.id
            for t in twins} == {other}
    status = memstore("cluster", "status", "--address", router.address).stdout
    assert "CLAIMS" in status


def test_serve_builds_the_directory_of_an_older_data_directory_once(tmp_path: Path) -> None:
    """A data directory from before the directory existed (cluster.json without
    "directory"): `memstore serve` claims its profiles' identifiers before serving."""
    from shards.supervisor import CLUSTER_FILE, Supervisor

    async def scenario() -> None:
        supervisor = Supervisor(tmp_path, shards=2, port=0)
        await supervisor.start()
        pid, ident = fresh(2, want_pid=1, want_claim=0, prefix="old")
        async with grpc.aio.insecure_channel(supervisor.shards[1].address) as channel:
            await memstore_pb2_grpc.MemstoreStub(channel).Upsert(
                pb.UpsertRequest(id=pid, identifiers=[ident]), timeout=10)
        await supervisor.stop()
        state = json.loads((tmp_path / CLUSTER_FILE).read_text())
        assert state.pop("directory") is True
        (tmp_path / CLUSTER_FILE).write_text(json.dumps(state))

        supervisor = Supervisor(tmp_path, port=0)
        port = await supervisor.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                found = await memstore_pb2_grpc.MemstoreStub(channel).Get(
                    pb.GetRequest(key=pb.ProfileKey(identifier=ident)), timeout=10)
            assert found.profile.id == pid
        finally:
            await supervisor.stop()
        assert json.loads((tmp_path / CLUSTER_FILE).read_text())["directory"] is True

    asyncio.run(scenario())


def test_a_claim_made_just_before_the_freeze_moves_with_its_slot(tmp_path: Path) -> None:
    """A claim's slot need not hold any profile that changed: the final export after the
    freeze carries the claim in a chunk with no profiles, and the import takes it."""
    from shards import rebalance as rb

    source = start_shard(tmp_path / "s", "--name", "s", "--sync", "off")
    target = start_shard(tmp_path / "t", "--name", "t", "--sync", "off")

    async def claim(node: rb.Node, entries: list[list[Any]]) -> list[list[Any]]:
        reply = await node.stub.Claim(cpb.ClaimRequest(packed=msgpack.packb(entries)),
                                      timeout=10)
        return msgpack.unpackb(reply.packed)  # type: ignore[no-any-return]

    async def scenario() -> None:
        async with rb.Cluster([source.address, target.address]) as cl:
            s, t = cl.node(source.address), cl.node(target.address)
            await rb.prepare_new_shard(cl, t)
            await cl.refresh()
            ident = ["email", "moved@example.com"]
            batch = {slot_of(claim_key(*ident))}
            _, lsn = await rb._copy(s, t, batch)
            assert (await claim(s, [[*ident, "p1", None]]))[0][:3:2] == ["p1", True]
            epoch = cl.next_epoch()
            await rb._freeze(s, batch, epoch)
            await rb._switch(s, t, batch, epoch, lsn, rb.MoveReport())
            await rb._drop(s, batch, epoch)
            assert (await claim(t, [[*ident, None, None]]))[0][0] == "p1"

    try:
        asyncio.run(scenario())
    finally:
        source.stop()
        target.stop()


def test_a_write_to_a_merged_away_id_claims_for_its_survivor(three: dict[str, Any]) -> None:
    """P merged into S on another shard; Z (on P's old shard) holds x. Upsert(P, x) must
    merge Z, judged from S's shard, not P's: x ends with one owner."""
    stub, shards = three["stub"], three["shards"]
    p, e1 = fresh(3, want_pid=0, want_claim=1, prefix="fw")
    s = fresh(3, want_pid=1, want_claim=1, prefix="fw")[0]
    z, x = fresh(3, want_pid=0, want_claim=2, prefix="fw")
    stub.Upsert(pb.UpsertRequest(id=p, identifiers=[e1]), timeout=10)
    stub.Upsert(pb.UpsertRequest(id=s, identifiers=[e1]), timeout=10)  # p merges into s
    stub.Upsert(pb.UpsertRequest(id=z, identifiers=[x]), timeout=10)
    assert stub.Upsert(pb.UpsertRequest(id=p, identifiers=[x]), timeout=10).id == s
    ask = msgpack.packb([["email", x.value]])
    holders = [h for sh in shards for h in msgpack.unpackb(
        control(sh).Owners(cpb.OwnersRequest(packed=ask), timeout=10).packed) if h]
    assert holders == [s]
    assert get(stub, x).id == s


def test_a_batch_record_refused_in_its_merge_stops_the_batch_there(three: dict[str, Any]
                                                                     ) -> None:
    """B1 names x and y, y named by A's record before it on another shard: B1 merges A
    in on its own, after A's record, and is refused (the merged profile would hold 21
    emails). The batch stops at B1: A's record applied, B2 (after B1, naming x) did not,
    and x, claimed for nobody who holds it, is free at once for the next write."""
    stub = three["stub"]
    a = fresh(3, want_pid=0, want_claim=0, prefix="hb")[0]
    b1, x = fresh(3, want_pid=1, want_claim=2, prefix="hb")
    b2 = fresh(3, want_pid=1, want_claim=0, prefix="hb")[0]
    mine = [pb.Identifier(kind="email", value=f"{a}-{i}@x") for i in range(19)]
    y = pb.Identifier(kind="email", value=f"{a}-y@x")
    stub.Upsert(pb.UpsertRequest(id=a, identifiers=[*mine, y]), timeout=10)
    with pytest.raises(grpc.RpcError) as err:  # merging a into b1 passes 20 emails
        stub.BatchUpsert(pb.BatchUpsertRequest(requests=[
            pb.UpsertRequest(id=a, identifiers=[y]),
            pb.UpsertRequest(id=b1, identifiers=[x, y]),
            pb.UpsertRequest(id=b2, identifiers=[x])]), timeout=20)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    trailers = dict(err.value.trailing_metadata())
    assert trailers["memstore-record"] == "1"
    assert list(BitMap.deserialize(trailers["memstore-applied-bin"])) == [0]
    assert err.value.details().startswith("requests[1]")
    holder = get(stub, y)
    assert holder.id == a and len(holder.identifiers) == 20 and not holder.merged_ids
    with pytest.raises(grpc.RpcError) as missing:
        get(stub, x)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    started = time.monotonic()
    stub.Upsert(pb.UpsertRequest(id=b2, identifiers=[x]), timeout=10)
    assert time.monotonic() - started < 5  # the refused batch gave its claims back
    assert get(stub, x).id == b2


def test_delete_answers_when_a_claims_shard_cannot_release(three: dict[str, Any]) -> None:
    """Releasing claims after a delete is best effort: with the claim's shard stopped the
    delete still answers deleted (within its deadline), and the claim, stale, is taken
    over later."""
    stub, shards = three["stub"], three["shards"]
    pid, ident = fresh(3, want_pid=0, want_claim=2, prefix="dl")
    stub.Upsert(pb.UpsertRequest(id=pid, identifiers=[ident]), timeout=10)
    shards[2].proc.send_signal(signal.SIGSTOP)
    try:
        reply = stub.Delete(pb.DeleteRequest(key=pb.ProfileKey(id=pid)), timeout=3)
    finally:
        shards[2].proc.send_signal(signal.SIGCONT)
    assert reply.deleted and reply.id == pid
    with pytest.raises(grpc.RpcError) as err:
        get(stub, ident)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_claim_rpc_refuses_bad_input_clearly(three: dict[str, Any]) -> None:
    shard = three["shards"][0]
    owned = fresh(3, want_pid=0, want_claim=0)[1].value
    for packed, where in ((b"\xc1", "packed"), (msgpack.packb({"a": 1}), "packed"),
                          (msgpack.packb([["email", owned, None]]), "claims[0]"),
                          (msgpack.packb([["email", owned, 5, None]]), "claims[0]: pid"),
                          (msgpack.packb([["e mail", owned, None, None]]), "claims[0]")):
        with pytest.raises(grpc.RpcError) as err:
            control(shard).Claim(cpb.ClaimRequest(packed=packed), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, where
        assert where in err.value.details()


@pytest.mark.parametrize("write", ["Upsert", "BatchUpsert", "Upsert and a cross-shard merge"])
def test_a_same_shard_merge_is_judged_again_when_a_slot_moved_under_the_router(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: str) -> None:
    """H holds x; P's slot moves from H's shard to the other one behind the router's back
    (its map is stale). A write of (P, x) through it judges "same shard: the engine
    merges", but P now lives elsewhere: the write must be judged again, not sent on to P's
    new shard (which would give x a second owner). In the third case the write also names
    y, held by G on the other shard: a cross-shard merge whose Absorb carries the check."""
    from shards import rebalance as rb
    from shards import routing as router_module

    monkeypatch.setattr(router_module, "SWEEP_INTERVAL", 3600.0)  # no refresh meanwhile
    shards = start(tmp_path, 2, "--sync", "off")
    router = RouterThread([s.address for s in shards])
    stub = memstore_pb2_grpc.MemstoreStub(grpc.insecure_channel(router.address))
    try:
        h, x = fresh(2, want_pid=0, want_claim=1, prefix="mv")
        p = fresh(2, want_pid=0, want_claim=1, prefix="mv")[0]
        stub.Upsert(pb.UpsertRequest(id=h, identifiers=[x]), timeout=10)

        async def move() -> None:
            async with rb.Cluster([s.address for s in shards]) as cl:
                await rb.move_batch(cl, cl.node(shards[0].address),
                                    cl.node(shards[1].address), {slot_of(p)},
                                    rb.Journal(None), rb.MoveReport())

        g, y = fresh(2, want_pid=1, want_claim=0, prefix="mv")
        stub.Upsert(pb.UpsertRequest(id=g, identifiers=[y]), timeout=10)
        asyncio.run(move())
        if write == "Upsert":
            stub.Upsert(pb.UpsertRequest(id=p, identifiers=[x]), timeout=10)
        elif write.startswith("Upsert and"):
            stub.Upsert(pb.UpsertRequest(id=p, identifiers=[x, y]), timeout=10)
            assert get(stub, y).id == get(stub, x).id
        else:
            assert stub.BatchUpsert(pb.BatchUpsertRequest(requests=[
                pb.UpsertRequest(id=p, identifiers=[x])]), timeout=10).applied == 1
        ask = msgpack.packb([["email", x.value]])
        holders = [holder for shard in shards for holder in msgpack.unpackb(
            control(shard).Owners(cpb.OwnersRequest(packed=ask), timeout=10).packed) if holder]
        assert len(holders) == 1 and holders[0] in (h, p)
        assert get(stub, x).id == holders[0]
    finally:
        router.stop()
        for shard in shards:
            shard.stop()


def test_a_shard_refuses_a_write_judged_for_other_ownership(three: dict[str, Any]) -> None:
    shard = three["shards"][0]
    info = control(shard).GetShardInfo(cpb.ShardInfoRequest(), timeout=10)
    direct = memstore_pb2_grpc.MemstoreStub(grpc.insecure_channel(shard.address))
    pid = fresh(3, want_pid=0, want_claim=0, prefix="judged")[0]
    writes = [(direct.Upsert, pb.UpsertRequest(id=pid)),
              (direct.BatchUpsert, pb.BatchUpsertRequest(requests=[pb.UpsertRequest(id=pid)])),
              (direct.Link, pb.LinkRequest(id=pid, create=True, identifiers=[
                  pb.Identifier(kind="email", value=f"{pid}@y")]))]
    for judged in (f"{info.name}:{info.epoch + 1}", f"shard-1:{info.epoch}"):
        for call, request in writes:
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=10, metadata=(("memstore-expect-shard", judged),))
            assert err.value.code() == grpc.StatusCode.ABORTED
            assert f"this call was judged for shard {judged!r}" in err.value.details()
        with pytest.raises(grpc.RpcError):
            direct.Get(pb.GetRequest(key=pb.ProfileKey(id=pid)), timeout=10)  # not written
    ident = pb.Identifier(kind="email", value=f"{pid}@x")
    reply = direct.Link(pb.LinkRequest(id=pid, identifiers=[ident], create=True), timeout=10,
                        metadata=(("memstore-expect-shard", f"{info.name}:{info.epoch}"),))
    assert reply.id == pid


def test_a_same_shard_judgement_stands_from_the_round_that_made_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """claim() waits out a young claim for one identifier over rounds; a same-shard
    judgement made in an earlier round for another one must carry that round's epoch, not
    a later round's (the holder may have moved away meanwhile, found by a review)."""
    from types import SimpleNamespace

    from shards import directory

    x1, x2 = SimpleNamespace(name="X", epoch=1), SimpleNamespace(name="X", epoch=2)
    shard_of = {"p": x1, "h": x1, "q": x1}
    claimed = {("email", "e1"): ("h", 100.0), ("email", "e2"): ("q", 0.0)}  # e2: young
    holds = {"h": [("email", "e1")], "q": []}

    class Map:
        def owner(self, slot: int) -> Any:
            return next(sh for pid, sh in shard_of.items() if slot_of(pid) == slot)

    class FakeRouter:
        map = Map()

        async def routed(self, items: list[Any], method: str, build: Any, context: Any,
                         retarget: Any = None, control: bool = False) -> list[Any]:
            request = build([item for _, item in items])
            if method == "Claim":
                answers = [[*claimed.get((k, v), (None, 0.0)), False]
                           for k, v, _, _ in msgpack.unpackb(request.packed)]
                return [([i for _, i in items], SimpleNamespace(
                    packed=msgpack.packb(answers)))]
            return [([i for _, i in items], SimpleNamespace(results=[SimpleNamespace(
                found=pid in holds, profile=pb.Profile(id=pid, identifiers=[
                    pb.Identifier(kind=k, value=v) for k, v in holds.get(pid, [])]))
                for pid in request.ids]))]

    async def next_round(attempt: int, context: Any) -> None:
        shard_of["h"] = SimpleNamespace(name="Z", epoch=1)  # h's slot moved to Z ...
        shard_of["p"] = shard_of["q"] = x2  # ... so X has a new epoch
        holds["q"] = [("email", "e2")]  # and q's write landed: a same-shard merge too

    monkeypatch.setattr(directory, "_sleep", next_round)
    local: dict[str, str] = {}
    foreign = asyncio.run(directory.Directory(FakeRouter()).claim(  # type: ignore[arg-type]
        [("p", ("email", "e1")), ("p", ("email", "e2"))],
        SimpleNamespace(time_remaining=lambda: 10.0), set(), local))
    assert foreign == {} and local == {"p": "X:1"}  # X is at 2 now: it refuses the write


@pytest.mark.parametrize("size", [5, 81])  # grouped in Python, and with numpy (BULK_FROM)
def test_batch_records_of_merged_away_ids_on_two_shards_keep_their_order(
        three: dict[str, Any], size: int) -> None:
    """Ids merged into one survivor from two other shards: a batch writing through both,
    interleaved, reaches the survivor in the order sent (each shard refuses its part with
    the forwards, and the parts go again together)."""
    stub = three["stub"]
    survivor = fresh(3, want_pid=0, want_claim=0, prefix="fo")[0]
    via = [fresh(3, want_pid=1, want_claim=2, prefix="fo"),
           fresh(3, want_pid=2, want_claim=1, prefix="fo")]
    stub.Upsert(pb.UpsertRequest(id=survivor), timeout=10)
    for loser, ident in via:
        stub.Upsert(pb.UpsertRequest(id=loser, identifiers=[ident]), timeout=10)
        stub.Link(pb.LinkRequest(id=survivor, identifiers=[ident]), timeout=15)
    assert {p.id for p in (get(stub, ident) for _, ident in via)} == {survivor}
    records = [[via[i % 2][0], {"mark": i}, []] for i in range(size)]  # 1, 2, 1, 2, ...
    records += [[fresh(3, want_pid=i % 3, want_claim=0, prefix="fx")[0], {"mark": i}, []]
                for i in range(size - 4)]  # others on every shard
    reply = stub.BatchUpsert(pb.BatchUpsertRequest(packed=msgpack.packb(records)), timeout=30)
    assert reply.applied == len(records)
    assert get(stub, via[0][1]).attributes["mark"].int_value == size - 1
    versions = stub.Get(pb.GetRequest(key=pb.ProfileKey(id=survivor)), timeout=10).profile.version
    assert versions >= size
