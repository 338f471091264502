"""The router against two real shard processes on loopback, checked against a reference."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest

from memstore import pbvalues
from memstore.client.core import pack_records
from memstore.v1 import cluster_pb2 as cpb
from memstore.v1 import cluster_pb2_grpc, memstore_pb2_grpc
from memstore.v1 import memstore_pb2 as pb
from shards.router import RouterService
from shards.server import start_router, stop_router
from shards.slots import format_ranges, slot_of, split_even
from tests.conftest import ServerProcess, start_shard

CITIES = ["Oslo", "Rome", "Lima", "Pune", "Kyiv"]
N = 300


class RouterThread:
    """A router served from its own event loop on a background thread."""

    def __init__(self, addresses: list[str], port: int = 0, link: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, port, self.router = self.run(start_router(
            addresses, "127.0.0.1", port, link_port=0 if link else None))
        self.address = f"127.0.0.1:{port}"
        self.router: RouterService

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.run(stop_router(self.server, self.router, grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def start_shards(root: Path, n: int, *extra: str) -> list[ServerProcess]:
    return [start_shard(root / f"shard-{i}", "--name", f"shard-{i}", "--slots",
                        format_ranges(ranges), "--sync", "off", *extra)
            for i, ranges in enumerate(split_even(n))]


def sval(text: str) -> pb.Value:
    return pb.Value(string_value=text)


def upsert(pid: str, city: str, age: int, email: str | None = None) -> pb.UpsertRequest:
    request = pb.UpsertRequest(id=pid, operations=[
        pb.Operation(op=pb.Operation.SET, attribute="city", value=sval(city)),
        pb.Operation(op=pb.Operation.SET, attribute="age", value=pb.Value(int_value=age)),
    ])
    if email:
        request.identifiers.add(kind="email", value=email)
    return request


def everything(partial: bool = False) -> pb.QueryRequest:
    return pb.QueryRequest(query=pb.Query(all=True), allow_partial=partial)


def city_is(city: str) -> pb.QueryRequest:
    return pb.QueryRequest(query=pb.Query(predicate=pb.Predicate(
        attribute="city", op=pb.Predicate.EQ, values=[sval(city)])))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    shards = start_shards(tmp_path_factory.mktemp("router"), 2)
    router = RouterThread([s.address for s in shards])
    channel = grpc.insecure_channel(router.address)
    stub = memstore_pb2_grpc.MemstoreStub(channel)
    reference: dict[str, dict[str, Any]] = {}
    for i in range(N):
        pid = f"user-{i}"
        stub.Upsert(upsert(pid, CITIES[i * 7 % 5 if i % 3 else 0], 20 + i % 40,
                           f"u{i}@example.com"), timeout=10)
        reference[pid] = {"city": CITIES[i * 7 % 5 if i % 3 else 0], "age": 20 + i % 40}
    yield {"stub": stub, "shards": shards, "router": router, "reference": reference}
    channel.close()
    router.stop()
    for shard in shards:
        shard.stop()


def test_profiles_are_spread_and_readable(cluster: dict[str, Any]) -> None:
    stub, shards, reference = cluster["stub"], cluster["shards"], cluster["reference"]
    per_shard = []
    for shard in shards:
        with grpc.insecure_channel(shard.address) as ch:
            info = cluster_pb2_grpc.ShardControlStub(ch).GetShardInfo(cpb.ShardInfoRequest())
            per_shard.append(info.profiles)
    assert sum(per_shard) == len(reference) and min(per_shard) > N // 4
    profile = stub.Get(pb.GetRequest(key=pb.ProfileKey(id="user-42")), timeout=10).profile
    assert profile.attributes["city"].string_value == reference["user-42"]["city"]
    assert profile.slot == slot_of("user-42")
    by_email = stub.Get(pb.GetRequest(key=pb.ProfileKey(
        identifier=pb.Identifier(kind="email", value="u43@example.com"))), timeout=10)
    assert by_email.profile.id == "user-43"
    with pytest.raises(grpc.RpcError) as err:
        stub.Get(pb.GetRequest(key=pb.ProfileKey(id="nobody")), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_batch_get_keeps_order_across_shards(cluster: dict[str, Any]) -> None:
    stub = cluster["stub"]
    keys = [pb.ProfileKey(id=f"user-{i}") for i in (5, 200, 17, 5)]
    keys.insert(2, pb.ProfileKey(identifier=pb.Identifier(kind="email", value="u9@example.com")))
    keys.append(pb.ProfileKey(id="missing"))
    keys.append(pb.ProfileKey(identifier=pb.Identifier(kind="email", value="no@example.com")))
    results = stub.BatchGet(pb.BatchGetRequest(keys=keys), timeout=10).results
    assert [r.found for r in results] == [True] * 5 + [False, False]
    assert [r.profile.id for r in results[:5]] == ["user-5", "user-200", "user-9", "user-17",
                                                   "user-5"]
    # The packed form (what the Python client uses) agrees, attributes included.
    from memstore.client.core import _batch

    packed = _batch(stub.BatchGet(pb.BatchGetRequest(keys=keys, packed=True), timeout=10))
    structured = [r.profile for r in results]
    assert [p and p["id"] for p in packed] == [r.id if r.id else None for r in structured]
    for got, want in zip(packed[:5], structured[:5]):
        assert got is not None
        assert got["attributes"]["city"] == want.attributes["city"].string_value
        assert got["identifiers"] == [(x.kind, x.value) for x in want.identifiers]


def test_batch_get_ids_across_shards_follow_the_keys(cluster: dict[str, Any]) -> None:
    stub = cluster["stub"]
    ids = [f"user-{i}" for i in (200, 5, 17, 200)] + ["missing"]
    response = stub.BatchGet(pb.BatchGetRequest(
        keys=[pb.ProfileKey(identifier=pb.Identifier(kind="email", value="u9@example.com"))],
        ids=ids), timeout=10)
    assert [r.profile.id if r.found else None for r in response.results] == [
        "user-9", "user-200", "user-5", "user-17", "user-200", None]
    assert {slot_of(i) >= 8192 for i in ids[:3]} == {True, False}  # both shards asked
    with pytest.raises(grpc.RpcError) as err:
        stub.BatchGet(pb.BatchGetRequest(ids=["user-5", ""]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ids[1]" in err.value.details()


def test_wrong_slot_contract_of_a_shard(cluster: dict[str, Any]) -> None:
    shard0 = cluster["shards"][0]
    foreign = next(f"user-{i}" for i in range(N) if slot_of(f"user-{i}") >= 8192)
    with grpc.insecure_channel(shard0.address) as ch, pytest.raises(grpc.RpcError) as err:
        memstore_pb2_grpc.MemstoreStub(ch).Get(pb.GetRequest(key=pb.ProfileKey(id=foreign)))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    trailers = dict(err.value.trailing_metadata())
    assert trailers["memstore-wrong-slot"] == str(slot_of(foreign))


def test_batch_upsert_packed_and_structured(cluster: dict[str, Any]) -> None:
    stub, reference = cluster["stub"], cluster["reference"]
    records = [[f"packed-{i}", {"city": "Lima", "age": 70 + i % 5}, [["crm", f"c{i}"]]]
               for i in range(120)]
    structured = [upsert(f"struct-{i}", "Pune", 90) for i in range(30)]
    reply = stub.BatchUpsert(pb.BatchUpsertRequest(
        requests=structured, packed=msgpack.packb(records)), timeout=10)
    assert reply.applied == 150 and reply.created == 150
    for pid, attrs, _ in records:
        reference[pid] = dict(attrs)
    for r in structured:
        reference[r.id] = {"city": "Pune", "age": 90}
    got = stub.Get(pb.GetRequest(key=pb.ProfileKey(
        identifier=pb.Identifier(kind="crm", value="c77"))), timeout=10).profile
    assert got.id == "packed-77" and got.attributes["age"].int_value == 72


def test_batch_upsert_columns_split_across_shards(cluster: dict[str, Any]) -> None:
    """A columnar batch (what Client.load sends) through the router: each shard gets its
    rows as columns, timestamps and gaps intact, and a bad column is INVALID_ARGUMENT."""
    stub, reference = cluster["stub"], cluster["reference"]
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    records = [{"id": f"col-{i}", "attributes": {"city": "Quito", "age": 40 + i % 3,
                                                 **({"seen": at} if i % 2 else {})},
                "identifiers": [("crm", f"col{i}")]} for i in range(60)]
    reply = stub.BatchUpsert(pb.BatchUpsertRequest(columns=pack_records(records)), timeout=10)
    assert reply.applied == 60 and reply.created == 60
    assert {slot_of(r["id"]) >= 8192 for r in records} == {True, False}  # both shards
    for r in records:
        reference[r["id"]] = {"city": "Quito", "age": r["attributes"]["age"]}
    got = stub.Get(pb.GetRequest(key=pb.ProfileKey(
        identifier=pb.Identifier(kind="crm", value="col7"))), timeout=10).profile
    assert got.id == "col-7" and pbvalues.from_pb(got.attributes["seen"]) == at
    assert not stub.Get(pb.GetRequest(key=pb.ProfileKey(id="col-8")),
                        timeout=10).profile.attributes.get("seen", None)
    for bad, where in (({"ids": ["col-x"], "attributes": {"seen": [2**62]},
                         "timestamps": ["seen"]}, "columns[0].attributes.seen"),
                       ({"ids": ["col-y"], "attributes": {"addr": [{"city": "Oslo"}]}}, "addr"),
                       ({"ids": ["col-z"], "attributes": {"n": [1, 2]}}, "columns.attributes.n")):
        with pytest.raises(grpc.RpcError) as err:
            stub.BatchUpsert(pb.BatchUpsertRequest(columns=msgpack.packb(bad)), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert where in err.value.details()


def test_count_ids_and_streams_match_reference(cluster: dict[str, Any]) -> None:
    stub, reference = cluster["stub"], cluster["reference"]
    assert stub.Count(everything(), timeout=10).count == len(reference)
    for city in CITIES:
        want = {p for p, a in reference.items() if a["city"] == city}
        assert stub.Count(city_is(city), timeout=10).count == len(want)
    want = {p for p, a in reference.items() if a["city"] == "Oslo"}
    pages, cursor = [], ""
    while True:
        page = stub.QueryIds(pb.QueryIdsRequest(query=city_is("Oslo"), page_size=7,
                                                cursor=cursor), timeout=10)
        assert len(page.ids) <= 7
        pages.append(list(page.ids))
        cursor = page.next_cursor
        if not cursor:
            break
    ids = [i for p in pages for i in p]
    assert len(ids) == len(set(ids)) and set(ids) == want
    assert all(len(p) == 7 for p in pages[:-1])
    streamed = [i for m in stub.StreamIds(pb.QueryIdsRequest(query=everything(), page_size=50),
                                          timeout=10) for i in m.ids]
    assert len(streamed) == len(set(streamed)) and set(streamed) == set(reference)
    bitmaps = stub.QueryBitmap(everything(), timeout=10)
    assert sorted(b.shard for b in bitmaps.bitmaps) == ["shard-0", "shard-1"]


def test_group_by_is_exact(cluster: dict[str, Any]) -> None:
    stub, reference = cluster["stub"], cluster["reference"]
    counts = Counter(a["city"] for a in reference.values())
    want = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    for top in (0, 1, 3):
        reply = stub.GroupBy(pb.GroupByRequest(query=everything(), attribute="city",
                                               top_n=top), timeout=10)
        got = [(g.value.string_value, g.count) for g in reply.groups]
        assert got == (want[:top] if top else want)
        assert reply.total == len(reference)


def test_track_and_delete_route_to_the_owner(cluster: dict[str, Any]) -> None:
    stub, reference = cluster["stub"], cluster["reference"]
    assert stub.Track(pb.TrackRequest(id="user-7", event="purchase"), timeout=10).version >= 2
    reply = stub.Delete(pb.DeleteRequest(key=pb.ProfileKey(identifier=pb.Identifier(
        kind="email", value="u8@example.com"))), timeout=10)
    assert reply.deleted and reply.id == "user-8"
    del reference["user-8"]
    assert stub.Delete(pb.DeleteRequest(key=pb.ProfileKey(id="user-11")), timeout=10).deleted
    del reference["user-11"]
    assert not stub.Delete(pb.DeleteRequest(key=pb.ProfileKey(id="user-11")), timeout=10).deleted
    assert stub.Count(everything(), timeout=10).count == len(reference)


def test_schema_is_declared_on_every_shard(cluster: dict[str, Any]) -> None:
    stub, shards = cluster["stub"], cluster["shards"]
    spec = pb.AttributeSpec(name="notes", kind=pb.STRING, not_indexed=True)
    stub.DeclareAttributes(pb.DeclareAttributesRequest(attributes=[spec]), timeout=10)
    for shard in shards:
        with grpc.insecure_channel(shard.address) as ch:
            names = {a.name for a in memstore_pb2_grpc.MemstoreStub(ch).GetSchema(
                pb.GetSchemaRequest(), timeout=10).attributes}
        assert {"notes", "city", "age"} <= names
    merged = stub.GetSchema(pb.GetSchemaRequest(), timeout=10).attributes
    assert [a.name for a in merged] == sorted(a.name for a in merged)
    assert next(a for a in merged if a.name == "notes").not_indexed


def test_deadline_is_propagated(cluster: dict[str, Any]) -> None:
    """A shard that stops answering (SIGSTOP: its socket still accepts) must not hold a
    caller past its deadline: the router gives each shard call the caller's remaining time.
    (A sub-millisecond deadline is not a test: a fast count can beat gRPC's rounding.)"""
    shard = cluster["shards"][1]
    shard.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            cluster["stub"].Count(everything(), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 10  # not a latency bound: "did not hang"
    finally:
        shard.proc.send_signal(signal.SIGCONT)
    assert cluster["stub"].Count(everything(), timeout=10).count > 0


def test_shard_calls_get_the_callers_remaining_time() -> None:
    from shards.calls import time_left as _timeout

    class Context:
        def __init__(self, remaining: float | None) -> None:
            self.remaining = remaining

        def time_remaining(self) -> float | None:
            return self.remaining

    assert _timeout(Context(2.5)) == 2.5  # type: ignore[arg-type]
    assert _timeout(Context(-1.0)) == 0.001  # type: ignore[arg-type]  # spent: fail fast
    assert _timeout(Context(None)) is None  # type: ignore[arg-type]


def test_a_dead_shard_gives_unavailable_or_partial(tmp_path: Path) -> None:
    shards = start_shards(tmp_path, 2)
    router = RouterThread([s.address for s in shards])
    try:
        with grpc.insecure_channel(router.address) as channel:
            stub = memstore_pb2_grpc.MemstoreStub(channel)
            ids = [f"p-{i}" for i in range(100)]
            stub.BatchUpsert(pb.BatchUpsertRequest(requests=[upsert(p, "Oslo", 1) for p in ids]),
                             timeout=10)
            on_0 = [p for p in ids if slot_of(p) < 8192]
            on_1 = [p for p in ids if slot_of(p) >= 8192]
            stub.Track(pb.TrackRequest(id=ids[0], event="visit"), timeout=10)  # (declared)
            shards[1].stop()
            with pytest.raises(grpc.RpcError) as err:
                stub.Get(pb.GetRequest(key=pb.ProfileKey(id=on_1[0])), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shard-1" in err.value.details()
            assert stub.Get(pb.GetRequest(key=pb.ProfileKey(id=on_0[0])), timeout=10
                            ).profile.id == on_0[0]
            with pytest.raises(grpc.RpcError) as err:
                stub.Count(everything(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shard-1" in err.value.details()
            partial = stub.Count(everything(partial=True), timeout=10)
            assert partial.count == len(on_0) and list(partial.missing_shards) == ["shard-1"]
            page = stub.QueryIds(pb.QueryIdsRequest(query=everything(partial=True),
                                                    page_size=1000), timeout=10)
            assert set(page.ids) == set(on_0) and list(page.missing_shards) == ["shard-1"]
            groups = stub.GroupBy(pb.GroupByRequest(query=everything(partial=True),
                                                    attribute="city"), timeout=10)
            assert groups.total == len(on_0) and list(groups.missing_shards) == ["shard-1"]
            _batches_say_what_applied_beside_a_dead_shard(router.address, stub)
    finally:
        router.stop()
        for shard in shards:
            shard.stop()


def _batches_say_what_applied_beside_a_dead_shard(address: str, stub: Any) -> None:
    """A batch across shards, one of them down: UNAVAILABLE, with the records that applied
    on the live shard (APPLIED_TRAILER), so a loader counts them as loaded and resends
    nothing of them; the client's LoadError adds up what is unknown over every request
    and says how many records it sent."""
    from pyroaring import BitMap

    from memstore import Client, LoadError
    from memstore.hashslot import APPLIED_TRAILER, RECORD_TRAILER

    ids = [f"q-{i}" for i in range(60)]
    live = {i for i, p in enumerate(ids) if slot_of(p) < 8192}
    assert 0 < len(live) < len(ids)

    def applied_of(err: Any) -> tuple[BitMap, dict[str, Any]]:
        trailers = dict(err.trailing_metadata() or ())
        return BitMap.deserialize(trailers[APPLIED_TRAILER]), trailers

    with pytest.raises(grpc.RpcError) as err:
        stub.TrackBatch(pb.TrackBatchRequest(events=[pb.TrackRequest(id=p, event="visit")
                                                     for p in ids]), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shard-1" in err.value.details()
    done, trailers = applied_of(err.value)
    assert set(done) == live and RECORD_TRAILER not in trailers
    for i, p in enumerate(ids):  # exactly those applied
        got = stub.Get(pb.GetRequest(key=pb.ProfileKey(id=p)), timeout=10) if i in live else None
        assert got is None or got.profile.attributes["event.visit.count"].int_value == 1
    with pytest.raises(grpc.RpcError) as err:
        stub.BatchUpsert(pb.BatchUpsertRequest(requests=[upsert(p, "Rome", 2) for p in ids]),
                         timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert set(applied_of(err.value)[0]) == live
    events = [{"id": f"r-{i}", "event": "visit"} for i in range(1000)]
    on_live = [slot_of(e["id"]) < 8192 for e in events]
    with Client(address) as c, pytest.raises(LoadError) as stopped:
        c.load_events(events, chunk_size=100, concurrency=3)
    sent = stopped.value.sent
    assert sent % 100 == 0 and 100 <= sent < len(events)  # it stopped sending
    assert stopped.value.applied == sum(on_live[:sent])  # exact: the trailers said so
    assert stopped.value.unknown == sent - sum(on_live[:sent])  # every failed request's


def test_attribute_known_to_one_shard_queries_cleanly_across_all(cluster: dict[str, Any]) -> None:
    """First writes create attributes on one shard only; fan-out queries must still work
    (other shards answer "nobody here"), while a typo stays INVALID_ARGUMENT."""
    stub = cluster["stub"]
    stub.Upsert(pb.UpsertRequest(id="solo-1", operations=[pb.Operation(
        op=pb.Operation.SET, attribute="only_here", value=pb.Value(string_value="x"))]))
    count = stub.Count(pb.QueryRequest(text='only_here = "x"'), timeout=10).count
    assert count == 1
    everyone = stub.Count(pb.QueryRequest(text="ALL"), timeout=10).count
    assert stub.Count(pb.QueryRequest(text='NOT only_here = "x"'), timeout=10).count \
        == everyone - 1
    groups = stub.GroupBy(pb.GroupByRequest(query=pb.QueryRequest(text="ALL"),
                                            attribute="only_here"), timeout=10).groups
    assert [(g.value.string_value, g.count) for g in groups] == [("x", 1)]
    with pytest.raises(grpc.RpcError) as err:
        stub.Count(pb.QueryRequest(text='only_hree = "x"'), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only_hree" in (err.value.details() or "")


def test_routed_refreshes_the_map_when_a_forward_and_a_moved_slot_meet(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One group follows a merged-away id while another meets a wrong-slot answer: the
    router must still refresh its map and back off, not re-send in a tight loop."""
    from shards import calls as router_module

    def error(trailers: list[tuple[str, Any]]) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(grpc.StatusCode.FAILED_PRECONDITION, grpc.aio.Metadata(),
                                    grpc.aio.Metadata(*trailers), "refused")

    calls = Counter()
    refreshes = []

    class Stub:
        def __init__(self, name: str) -> None:
            self.name = name

        async def BatchUpsert(self, ids: list[str], timeout: float | None = None,
                              metadata: Any = None) -> Any:
            calls[self.name] += 1
            if self.name == "moved":
                raise error([("memstore-wrong-slot", "1")])  # its slot left; map is stale
            if "old" in ids:
                raise error([("memstore-merged-into-bin", msgpack.packb([["old", "new"]]))])
            return ids

    class Shard:
        def __init__(self, name: str) -> None:
            self.stub, self.label, self.address = Stub(name), name, name

    here, moved = Shard("here"), Shard("moved")

    class Map:
        version = 0

        def owner(self, slot: int) -> Shard:
            return moved if slot == slot_of("b") else here

        async def refresh(self, since: int | None = None) -> None:
            refreshes.append(since)

    class Context:
        def time_remaining(self) -> None:
            return None

        async def abort(self, code: grpc.StatusCode, details: str) -> None:
            raise RuntimeError(code, details)

    monkeypatch.setattr(router_module, "MOVE_WAIT", 1.0)
    service = RouterService(Map())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError) as err:
        asyncio.run(service.routed([("old", "old"), ("b", "b")], "BatchUpsert",
                                    lambda items: items, Context(), lambda _, new: new))
    assert err.value.args[0] == grpc.StatusCode.UNAVAILABLE
    assert len(refreshes) >= 5 and calls["moved"] < 100


def test_identifier_locks_order_overlapping_writes_and_drop_unused_locks() -> None:
    from shards.writes import IdentifierLocks

    locks = IdentifierLocks()
    inside: set[tuple[str, str]] = set()
    order: list[str] = []

    async def write(name: str, keys: list[tuple[str, str]]) -> None:
        async with locks.hold(keys):
            assert not inside & set(keys), f"{name} overlaps a write in progress"
            inside.update(keys)
            await asyncio.sleep(0.01)
            inside.difference_update(keys)
            order.append(name)

    async def main() -> None:
        a, b, c = ("email", "a"), ("email", "b"), ("device", "c")
        # a waiter cancelled while it waits takes nothing and leaves nothing behind
        async with locks.hold([a]):
            waiter = asyncio.ensure_future(write("cancelled", [a, c]))
            await asyncio.sleep(0.01)
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        # opposite orders of the same keys must not deadlock; c alone runs beside them
        await asyncio.wait_for(asyncio.gather(
            write("ab", [a, b]), write("ba", [b, a, b]), write("c", [c]),
            write("a", [a])), timeout=5)

    asyncio.run(main())
    assert sorted(order) == ["a", "ab", "ba", "c"] and order.index("c") < 2
    assert len(locks) == 0


def test_a_fan_out_answer_made_at_another_epoch_is_asked_again(cluster: dict[str, Any]) -> None:
    """Every shard answer carries the epoch it was made at; a router whose slot map holds an
    older epoch for that shard refreshes the map and asks again, so it never adds up
    answers from a partition it did not check."""
    stub, shards = cluster["stub"], cluster["shards"]
    router: RouterService = cluster["router"].router
    with grpc.insecure_channel(shards[0].address) as ch:
        control = cluster_pb2_grpc.ShardControlStub(ch)
        info = control.GetShardInfo(cpb.ShardInfoRequest(), timeout=10)
        _, call = memstore_pb2_grpc.MemstoreStub(ch).Count.with_call(
            pb.QueryRequest(text="ALL"), timeout=10)
        assert dict(call.trailing_metadata())["memstore-epoch"] == str(info.epoch)
        total = stub.Count(everything(), timeout=10).count
        assert total > info.profiles > 0
        mapped = {s.label: s.epoch for s in router.map.shards}
        control.SetSlots(cpb.SetSlotsRequest(epoch=info.epoch + 1, slots=info.slots),
                         timeout=10)  # same slots, a new epoch the router has not seen
    assert stub.Count(everything(), timeout=10).count == total
    now = {s.label: s.epoch for s in router.map.shards}
    assert [now[k] - mapped[k] for k in sorted(mapped)] == [1, 0]  # the map was refreshed


def test_a_refused_batch_gives_back_the_identifiers_it_claimed(tmp_path: Path) -> None:
    """A BatchUpsert a shard refuses applied nothing, so its records' identifier claims go
    back at once, as a refused Upsert's do: the next write naming one does not wait out
    the claim grace period (30 s) for a claim nobody holds."""
    from memstore import Client, ClientError

    shards = start_shards(tmp_path, 2)
    router = RouterThread([s.address for s in shards])
    try:
        with Client(router.address, timeout=5) as c:
            c.declare([{"name": "age", "kind": "int"}])
            with pytest.raises(ClientError) as err:
                c.batch_upsert([{"id": f"rb-{i}", "attributes": {"age": "old" if i == 3 else i},
                                 "identifiers": [["email", f"rb-{i}@x"]]} for i in range(6)])
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            started = time.monotonic()
            for i in range(6):
                assert c.upsert(f"other-{i}", {"age": 1},
                                identifiers=[("email", f"rb-{i}@x")]).id in (f"rb-{i}",
                                                                              f"other-{i}")
            assert time.monotonic() - started < 4
            holders = {c.get(identifier=("email", f"rb-{i}@x"))["id"] for i in range(6)}
            assert "rb-3" not in holders  # refused: never made
    finally:
        router.stop()
        for shard in shards:
            shard.stop()


def test_a_batch_record_refused_makes_no_merge_on_another_shard(tmp_path: Path) -> None:
    """A record naming an identifier a profile on another shard holds merges it first;
    when its shard refuses the record, nothing of the batch applies: no merge is made
    and no profile created (its shard checks it before the merge is)."""
    from memstore import Client, ClientError

    shards = start_shards(tmp_path, 2)
    router = RouterThread([s.address for s in shards])
    try:
        holder = next(f"h{i}" for i in range(100) if slot_of(f"h{i}") >= 8192)
        writer = next(f"s{i}" for i in range(100) if slot_of(f"s{i}") < 8192)
        with Client(router.address, timeout=10) as c:
            c.declare([{"name": "age", "kind": "int"}])
            c.upsert(holder, {"age": 40}, identifiers=[("email", "ann@x")])
            for batch in ([{"id": writer, "attributes": {"age": "thirty"},
                            "identifiers": [["email", "ann@x"]]}],
                          [{"id": "fine-1", "attributes": {"age": 1}},
                           {"id": writer, "attributes": {"age": "thirty"},
                            "identifiers": [["email", "ann@x"]]}]):
                with pytest.raises(ClientError) as err:
                    c.batch_upsert(batch)
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
                assert "age" in err.value.details
            assert c.get(writer) is None and c.get("fine-1") is None
            assert not c.get(holder).get("merged_ids")
            assert c.get(identifier=("email", "ann@x"))["id"] == holder
            assert c.count("ALL") == 1
        with grpc.insecure_channel(router.address) as channel:  # a shard's check only
            with pytest.raises(grpc.RpcError) as refused:
                memstore_pb2_grpc.MemstoreStub(channel).BatchUpsert(pb.BatchUpsertRequest(
                    requests=[upsert("checked", "Oslo", 1)], validate_only=True), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with Client(router.address, timeout=10) as c:
            assert c.get("checked") is None
    finally:
        router.stop()
        for shard in shards:
            shard.stop()
