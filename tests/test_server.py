"""One shard over real gRPC on loopback: the public API, its errors, health, reflection."""

from __future__ import annotations

import asyncio
import gc
import re
import signal
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import uuid4

import grpc
import msgpack
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memstore import AsyncClient, Client, ClientError
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc
from tests.conftest import ServerProcess, said, start_shard

T = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)


def uid() -> str:
    return f"u-{uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def client(shard: ServerProcess):  # type: ignore[no-untyped-def]
    with Client(shard.address, timeout=10) as c:
        c.declare([{"name": "email", "kind": "string", "indexed": False},
                   {"name": "orders", "kind": "int", "merge": "sum"}])
        yield c


@pytest.fixture(scope="module")
def stub(shard: ServerProcess):  # type: ignore[no-untyped-def]
    channel = grpc.insecure_channel(shard.address)
    yield memstore_pb2_grpc.MemstoreStub(channel)
    channel.close()


def code_of(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(ClientError) as info:
        call()
    return info.value.code, info.value.details


# ---------------------------------------------------------------------- profiles

def test_every_kind_round_trips(client: Client) -> None:
    pid = uid()
    result = client.upsert(pid, {"name": "Ada", "age": 36, "ltv": 12.5, "vip": True,
                                 "signup": T, "interests": ["dogs", "cats", "dogs"],
                                 "address": {"city": "Oslo", "geo": {"zip": "0150"}}})
    assert result.created and result.version == 1
    profile = client.get(pid)
    assert profile["attributes"] == {
        "name": "Ada", "age": 36, "ltv": 12.5, "vip": True, "signup": T,
        "interests": ["cats", "dogs"], "address.city": "Oslo", "address.geo.zip": "0150"}
    assert profile["version"] == 1


def test_structured_and_packed_reads_agree(client: Client, stub) -> None:  # type: ignore[no-untyped-def]
    pid = uid()
    client.upsert(pid, {"name": "Bo", "signup": T, "tags": ["x"]})
    structured = stub.Get(pb.GetRequest(key=pb.ProfileKey(id=pid)))
    attrs = structured.profile.attributes
    assert attrs["name"].string_value == "Bo"
    assert attrs["signup"].timestamp_value.ToDatetime(tzinfo=UTC) == T
    assert list(attrs["tags"].list_value.values) == ["x"]
    plain = stub.BatchGet(pb.BatchGetRequest(keys=[pb.ProfileKey(id=pid), pb.ProfileKey(id="no")]))
    assert [r.found for r in plain.results] == [True, False] and not plain.packed
    assert plain.results[0].profile.attributes["name"].string_value == "Bo"
    packed = stub.BatchGet(pb.BatchGetRequest(keys=[pb.ProfileKey(id=pid)], packed=True))
    tables, (entry,) = msgpack.unpackb(packed.packed, strict_map_key=False)
    assert entry[0] == pid and not packed.results
    version, attrs, _, _ = msgpack.unpackb(entry[1], strict_map_key=False)
    named = {tables[entry[2]][aid][0]: v for aid, v in attrs.items()}
    assert named["name"] == "Bo" and version == 1


def test_operations_apply_in_order(client: Client) -> None:
    pid = uid()
    client.upsert(pid, {"plan": "free", "tags": ["a", "b"]})
    client.upsert(pid, ops=[("set_once", "plan", "pro"), ("set_once", "first", "web"),
                            ("increment", "visits", 2), ("increment", "visits", 3),
                            ("add_to_set", "tags", ["c"]), ("remove_from_set", "tags", ["a"]),
                            ("unset", "plan", None)])
    attrs = client.get(pid)["attributes"]
    assert attrs == {"first": "web", "visits": 5, "tags": ["b", "c"]}
    client.upsert(pid, ops=[("unset", "first")])  # an unset takes no value
    assert "first" not in client.get(pid)["attributes"]
    for bad, message in (([("set", "first")], "ops[0]: set needs a value"),
                         ([("unset", "first"), ("nope", "a", 1)], "ops[1]: unknown operation"),
                         (["set"], "ops[0]: (")):
        with pytest.raises(ValueError, match=re.escape(message)):
            client.upsert(pid, ops=bad)
    with pytest.raises(ValueError, match="integer 9223372036854775808 is outside the int64"):
        client.upsert(pid, {"visits": 2**63})


def test_wrong_kind_is_refused_naming_attribute_and_kinds(client: Client) -> None:
    pid = uid()
    client.upsert(pid, {"score_k": 3})
    code, details = code_of(lambda: client.upsert(pid, {"score_k": "high"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "score_k" in details and "int" in details and "string" in details
    assert client.get(pid)["attributes"] == {"score_k": 3}  # nothing changed


def test_expected_version_guards_concurrent_writers(client: Client) -> None:
    pid = uid()
    v1 = client.upsert(pid, {"a": "1"}).version
    client.upsert(pid, {"a": "2"}, expected_version=v1)
    code, details = code_of(lambda: client.upsert(pid, {"a": "3"}, expected_version=v1))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "version" in details
    assert client.get(pid)["attributes"]["a"] == "2"
    code, _ = code_of(lambda: client.upsert(uid(), {"a": "x"}, expected_version=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert client.upsert(uid(), {"a": "x"}, expected_version=0).created


def test_a_write_answers_with_the_version_it_made_among_concurrent_writes(
        durable_shard: ServerProcess) -> None:
    """Upsert's and Link's answer is the write's own, made when it was planned: read once
    the commit's fsync returned, it was the version of whichever write came last (two
    writers told the same version, each then passing it as expected_version), or, when
    another write had merged the profile away meanwhile, INTERNAL for an applied write."""
    import threading

    address = durable_shard.address
    with Client(address) as c:
        c.upsert("hot", {"n": 0})
        for i in range(15):  # (a profile holds at most 20 emails: merge protection)
            c.upsert(f"u{i}", {"n": 0}, identifiers=[("email", f"u{i}@x.io")])
    told: list[int] = []
    errors: list[str] = []
    linked: list[int] = []

    def writer(w: int) -> None:
        with Client(address) as c:
            for i in range(60):
                told.append(c.upsert("hot", ops=[("increment", "n", 1)]).version)
                try:
                    c.upsert(f"u{(i + w) % 15}", ops=[("add_to_set", "tags", [f"w{w}-{i}"])])
                except ClientError as exc:
                    errors.append(f"{exc.code}: {exc.details}")

    def linker() -> None:
        with Client(address) as c:
            for i in range(15):  # merges u_i into the survivor while writers write it
                c.link("survivor", [("email", f"u{i}@x.io")], create=True)
                linked.append(i)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    threads.append(threading.Thread(target=linker))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and len(linked) == 15
    assert sorted(told) == list(range(2, 2 + 4 * 60))  # each write its own version
    with Client(address) as c:
        survivor = c.get("survivor")
        assert c.get("hot")["attributes"]["n"] == 240
    assert len(survivor["attributes"]["tags"]) == 240  # every tag on the survivor
    assert survivor["version"] >= 240


def test_batch_get_thousands_of_keys_in_order(client: Client) -> None:
    prefix = uid()
    records = [{"id": f"{prefix}-{i}", "attributes": {"n": i}} for i in range(1500)]
    assert client.batch_upsert(records) == 1500
    keys = [f"{prefix}-{i}" for i in range(1499, -1, -1)] + [f"{prefix}-missing"]
    got = client.batch_get(keys, attributes=["n"])
    assert [g["attributes"]["n"] for g in got[:-1]] == list(range(1499, -1, -1))
    assert got[-1] is None
    # keys and ids in one request: keys answered first, then ids, each in order
    mixed = client.batch_get([("email", "nobody@x"), keys[3]] + keys[:2])
    assert [m and m["id"] for m in mixed] == [None, keys[3], keys[0], keys[1]]


def test_load_pauses_the_collector_per_chunk_and_leaves_it_as_it_found_it(client: Client
                                                                        ) -> None:
    """Client.load takes each chunk from the caller's iterator with the cyclic collector
    paused (thousands of acyclic records), and turns it back on between chunks, at the end,
    and when the caller's iterator fails. A chunk's records are freed before the collector
    comes back, so it never walks them."""
    prefix, seen, alive = uid(), [], []

    class Record(dict):  # type: ignore[type-arg]  # a dict that can be weakly referenced
        pass

    def records(n: int, fail: bool = False) -> Iterator[dict[str, Any]]:
        made: list[weakref.ref[Record]] = []
        for i in range(n):
            seen.append(gc.isenabled())
            if i % 10 == 0:  # a new chunk: how many records of the last one are still held
                alive.append(sum(ref() is not None for ref in made))
                made.clear()
            record = Record(id=f"{prefix}-{i}", attributes={"n": i})
            made.append(weakref.ref(record))
            yield record
            del record
        if fail:
            raise RuntimeError("the caller's source broke")

    sizes: list[int] = []
    assert client.load(records(25), chunk_size=10, concurrency=1, progress=sizes.append) == 25
    assert sizes == [10, 10, 5] and seen == [False] * 25 and gc.isenabled()
    assert alive == [0, 0, 0]
    assert client.get(f"{prefix}-24")["attributes"] == {"n": 24}
    with pytest.raises(RuntimeError, match="source broke"):
        client.load(records(3, fail=True), chunk_size=10)
    assert gc.isenabled()


def test_load_splits_a_chunk_that_packs_larger_than_the_byte_budget(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wide records: a chunk packing past LOAD_CHUNK_BYTES goes as halves (and halves of
    those) until each part fits; a lone record goes whatever its size. Nothing is lost."""
    import memstore.client.core

    monkeypatch.setattr(memstore.client.core, "LOAD_CHUNK_BYTES", 4096)
    prefix = uid()
    records = [{"id": f"{prefix}-{i}", "attributes": {"note": f"{i:04d}" + "x" * 300}}
               for i in range(40)]
    sizes: list[int] = []
    assert client.load(records, chunk_size=40, concurrency=2, progress=sizes.append) == 40
    assert sizes == [10, 10, 10, 10]  # 40 records of ~310 bytes: quarters fit in 4 KiB
    got = client.batch_get([r["id"] for r in records])
    assert [g and g["attributes"]["note"] for g in got] == [
        r["attributes"]["note"] for r in records]
    huge = {"id": f"{prefix}-huge", "attributes": {"note": "y" * 10_000}}
    sizes.clear()
    assert client.load([huge], progress=sizes.append) == 1 and sizes == [1]
    assert client.get(huge["id"])["attributes"]["note"] == "y" * 10_000


def test_batch_get_decode_leaves_the_collector_as_it_found_it(client: Client) -> None:
    # The client pauses the cyclic collector while it decodes a batch: it must come back
    # on after a decode and after a failed one, and stay off for a caller who turned it off.
    from memstore.client.core import _batch

    prefix = uid()
    client.batch_upsert([{"id": f"{prefix}-{i}", "attributes": {"n": i}} for i in range(50)])
    keys = [f"{prefix}-{i}" for i in range(50)]
    assert gc.isenabled()
    assert [g["attributes"]["n"] for g in client.batch_get(keys)] == list(range(50))
    assert gc.isenabled()
    with pytest.raises(ValueError):
        _batch(pb.BatchGetResponse(packed=b"\x92\x90"))  # [[], nothing]: one item short
    assert gc.isenabled()
    gc.disable()
    try:
        assert len(client.batch_get(keys)) == 50
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_batch_get_ids_follow_keys_and_say_which_is_bad(stub, client: Client) -> None:  # type: ignore[no-untyped-def]
    pids = [uid() for _ in range(3)]
    client.batch_upsert([{"id": p, "attributes": {"n": i}} for i, p in enumerate(pids)])
    response = stub.BatchGet(pb.BatchGetRequest(keys=[pb.ProfileKey(id=pids[2])],
                                                ids=[pids[0], "missing", pids[1]]), timeout=10)
    assert [(r.found, r.profile.id) for r in response.results] == [
        (True, pids[2]), (True, pids[0]), (False, ""), (True, pids[1])]
    assert "ids[1]" in _invalid(stub, "BatchGet", pb.BatchGetRequest(ids=[pids[0], ""]))
    too_many = pb.BatchGetRequest(keys=[pb.ProfileKey(id="k")] * 50_000, ids=["i"] * 50_001)
    assert "at most" in _invalid(stub, "BatchGet", too_many)


def test_projection_returns_only_named_attributes(client: Client) -> None:
    pid = uid()
    client.upsert(pid, {"a": "1", "b": 2, "c": True})
    assert client.get(pid, attributes=["a", "c", "nope"])["attributes"] == {"a": "1", "c": True}


def test_delete_removes_profile_and_identifiers(client: Client) -> None:
    pid = uid()
    client.upsert(pid, {"a": "1"}, identifiers=[("email", f"{pid}@x.io")])
    assert client.delete(pid) is True
    assert client.get(pid) is None
    assert client.get(identifier=("email", f"{pid}@x.io")) is None
    assert client.delete(pid) is False


def test_read_your_writes(client: Client) -> None:
    pid = uid()
    for i in range(20):
        client.upsert(pid, {"i": i})
        assert client.get(pid)["attributes"]["i"] == i


# ---------------------------------------------------------------------- identities

def test_link_merges_and_old_id_resolves_to_survivor(client: Client) -> None:
    anon, known = uid(), uid()
    client.upsert(anon, {"tags": ["visited"], "orders": 2, "city": "Lyon"},
                  identifiers=[("anonymous", f"ck-{anon}")])
    client.upsert(known, {"tags": ["buyer"], "orders": 3, "plan": "pro"},
                  identifiers=[("email", f"{known}@x.io")])
    result = client.link(known, [("anonymous", f"ck-{anon}")])
    assert result.id == known and result.merged_ids == [anon]
    merged = client.get(known)
    assert merged["attributes"] == {"tags": ["buyer", "visited"], "orders": 5, "plan": "pro",
                                    "city": "Lyon"}
    assert sorted(merged["identifiers"]) == sorted([("email", f"{known}@x.io"),
                                                    ("anonymous", f"ck-{anon}")])
    assert merged["merged_ids"] == [anon]
    assert client.get(anon)["id"] == known
    assert client.get(identifier=("anonymous", f"ck-{anon}"))["id"] == known
    client.upsert(anon, {"late": True})  # a write to the merged-away id lands on the survivor
    assert client.get(known)["attributes"]["late"] is True


def test_blocked_identifier_is_refused_and_nothing_changes(client: Client) -> None:
    pid = uid()
    client.upsert(pid, {"a": "1"})
    code, details = code_of(lambda: client.link(pid, [("email", "test@test.com")]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "blocked" in details
    assert client.get(pid)["identifiers"] == [] and client.get(pid)["version"] == 1


def test_identifier_limit_per_kind_is_refused(client: Client) -> None:
    pid = uid()
    client.link(pid, [("device", f"{pid}-d{i}") for i in range(20)], create=True)
    code, details = code_of(lambda: client.link(pid, [("device", f"{pid}-d99")]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "limit" in details
    assert len(client.get(pid)["identifiers"]) == 20


def test_track_keeps_event_aggregates(client: Client) -> None:
    pid = uid()
    client.track(pid, "purchase", at=T)
    client.track(pid, "purchase", at=T - timedelta(days=2), count=2)
    attrs = client.get(pid)["attributes"]
    assert attrs["event.purchase.count"] == 3
    assert attrs["event.purchase.first"] == T - timedelta(days=2)
    assert attrs["event.purchase.last"] == T


# ---------------------------------------------------------------------- queries

@pytest.fixture(scope="module")
def segment(client: Client) -> str:
    tag = uid().replace("-", "_")
    records = [{"id": f"{tag}-{i}", "attributes": {
        "seg": tag, "country": ["US", "CA", "DE"][i % 3], "age": 18 + i % 50,
        "spend": i * 1.5, "seen": T + timedelta(days=i), "likes": ["dogs"] if i % 4 else ["cats"],
        "optin": i % 2 == 0}} for i in range(300)]
    client.batch_upsert(records)
    return tag


def test_count_ids_and_group_by_agree_with_data(client: Client, segment: str) -> None:
    q = (f'seg = "{segment}" AND country IN ("US","CA") AND age BETWEEN 25 AND 34 '
         'AND likes HAS "dogs" AND NOT optin = true')
    expected = {f"{segment}-{i}" for i in range(300)
                if i % 3 in (0, 1) and 25 <= 18 + i % 50 <= 34 and i % 4 and i % 2}
    assert client.count(q) == len(expected) > 0
    assert set(client.iter_ids(q, page_size=7)) == expected
    groups = client.group_by(f'seg = "{segment}"', "country", top_n=2)
    assert groups == [("CA", 100), ("DE", 100)]  # equal counts: ordered by value
    assert dict(client.group_by(q, "country", top_n=0)) == {
        c: sum(1 for i in expected if ["US", "CA", "DE"][int(i.rsplit("-", 1)[1]) % 3] == c)
        for c in ("US", "CA") if any(["US", "CA", "DE"][int(i.rsplit("-", 1)[1]) % 3] == c
                                     for i in expected)}


def test_paging_with_cursor_is_complete_and_stable(client: Client, segment: str) -> None:
    q = f'seg = "{segment}" AND spend >= 30.0'
    pages, cursor = [], ""
    while True:
        ids, cursor = client.ids(q, page_size=40, cursor=cursor)
        pages.append(ids)
        if not cursor:
            break
    flat = [i for p in pages for i in p]
    assert len(flat) == len(set(flat)) == 280
    assert flat == list(client.iter_ids(q))


def test_timestamp_ranges_with_iso_strings(client: Client, segment: str) -> None:
    start = (T + timedelta(days=10)).isoformat()
    end = (T + timedelta(days=19)).isoformat()
    assert client.count(f'seg = "{segment}" AND seen BETWEEN "{start}" AND "{end}"') == 10
    assert client.count(f'seg = "{segment}" AND seen < "{start}"') == 10


def test_bitmap_is_the_portable_roaring_of_matches(client: Client, segment: str) -> None:
    bitmaps = client.bitmaps(f'seg = "{segment}" AND exists(likes)')
    assert sum(len(b) for b in bitmaps.values()) == 300


@pytest.mark.parametrize("query, fragment", [
    ('country = "US" AND', "column"),
    ('country = "US" AND (age > 3', "')'"),
    ('nosuchattribute = "x"', "unknown attribute"),
    ('age = "old"', "int"),
    ('email = "a@b.c"', "not indexed"),
    ('likes = "dogs"', "HAS"),
    ('seen > "yesterday"', "seen"),
])
def test_bad_queries_are_invalid_argument(client: Client, segment: str, query: str,
                                          fragment: str) -> None:
    code, details = code_of(lambda: client.count(query))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in details


# ---------------------------------------------------------------------- bad input, every RPC

def _invalid(stub, method: str, request) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, method)(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return info.value.details()


def test_bad_input_for_every_rpc(stub, segment: str) -> None:  # type: ignore[no-untyped-def]
    big = "x" * 20_000
    assert "empty profile id" in _invalid(stub, "Upsert", pb.UpsertRequest(id=""))
    assert "longer" in _invalid(stub, "Upsert", pb.UpsertRequest(id=big))
    assert "longer" in _invalid(stub, "Upsert", pb.UpsertRequest(id="u", operations=[
        pb.Operation(op=pb.Operation.SET, attribute="a", value=pb.Value(string_value=big))]))
    assert "no kind" in _invalid(stub, "Upsert", pb.UpsertRequest(id="u", operations=[
        pb.Operation(op=pb.Operation.SET, attribute="a")]))
    assert "op is not set" in _invalid(stub, "Upsert", pb.UpsertRequest(id="u", operations=[
        pb.Operation(attribute="a", value=pb.Value(int_value=1))]))
    assert "attribute name" in _invalid(stub, "Upsert", pb.UpsertRequest(id="u", operations=[
        pb.Operation(op=pb.Operation.SET, attribute="", value=pb.Value(int_value=1))]))
    assert "NaN" in _invalid(stub, "Upsert", pb.UpsertRequest(id="u", operations=[
        pb.Operation(op=pb.Operation.SET, attribute="f", value=pb.Value(float_value=float("nan")))
    ]))
    assert "packed" in _invalid(stub, "BatchUpsert", pb.BatchUpsertRequest(packed=b"\xc1junk"))
    bad_row = msgpack.packb([["ok", {"pk_n": 1}], ["", {"pk_n": 1}]])
    assert "packed[1]" in _invalid(stub, "BatchUpsert", pb.BatchUpsertRequest(packed=bad_row))
    null = msgpack.packb([["ok", {"pk_n": 1}], ["ok2", {"pk_n": None}]])
    assert "packed[1].attributes.pk_n: null" in _invalid(
        stub, "BatchUpsert", pb.BatchUpsertRequest(packed=null))
    wrong_kind = msgpack.packb([["ok", {"pk_n": 1}], ["ok2", {"pk_n": "one"}]])
    details = _invalid(stub, "BatchUpsert", pb.BatchUpsertRequest(packed=wrong_kind))
    assert "packed[1]" in details and "pk_n" in details and "an int" not in details
    columns = {"ids": ["c1", "c2"], "attributes": {"pk_n": [1, None]}}
    assert "columns" in _invalid(stub, "BatchUpsert", pb.BatchUpsertRequest(columns=b"\xc1"))
    for broken, where in (({**columns, "ids": ["c1", 2]}, "columns.ids"),
                          ({**columns, "attributes": {"pk_n": [1]}}, "columns.attributes.pk_n"),
                          ({**columns, "timestamps": ["nope"]}, "columns.timestamps"),
                          ({**columns, "identifiers": [[["email"]], []]},
                           "columns.identifiers[0]"),
                          ({**columns, "extra": 1}, "keys")):
        assert where in _invalid(stub, "BatchUpsert", pb.BatchUpsertRequest(
            columns=msgpack.packb(broken)))
    wrong_kind = msgpack.packb({"ids": ["c3", "c4"], "attributes": {"pk_n": [1, "one"]}})
    details = _invalid(stub, "BatchUpsert", pb.BatchUpsertRequest(columns=wrong_kind))
    assert "columns[1]" in details and "pk_n" in details
    empty_id = msgpack.packb({"ids": ["c5", ""], "attributes": {}})
    assert "columns[1]" in _invalid(stub, "BatchUpsert", pb.BatchUpsertRequest(columns=empty_id))
    assert "id or an identifier" in _invalid(stub, "Get", pb.GetRequest())
    assert "empty profile id" in _invalid(stub, "Get", pb.GetRequest(key=pb.ProfileKey(id="")))
    assert "keys[1]" in _invalid(stub, "BatchGet", pb.BatchGetRequest(
        keys=[pb.ProfileKey(id="a"), pb.ProfileKey()]))
    assert "id or an identifier" in _invalid(stub, "Delete", pb.DeleteRequest())
    assert "nothing to link" in _invalid(stub, "Link", pb.LinkRequest(id="u"))
    assert "identifier kind" in _invalid(stub, "Link", pb.LinkRequest(id="u", identifiers=[
        pb.Identifier(kind="Bad Kind", value="v")], create=True))
    assert "event" in _invalid(stub, "Track", pb.TrackRequest(id="u", event="no spaces"))
    assert "kind is not set" in _invalid(stub, "DeclareAttributes", pb.DeclareAttributesRequest(
        attributes=[pb.AttributeSpec(name="z")]))
    assert "neither" in _invalid(stub, "Count", pb.QueryRequest())
    assert "page_size" in _invalid(stub, "QueryIds", pb.QueryIdsRequest(
        query=pb.QueryRequest(text="ALL"), page_size=10**6))
    assert "cursor" in _invalid(stub, "QueryIds", pb.QueryIdsRequest(
        query=pb.QueryRequest(text="ALL"), cursor="not-a-cursor"))
    assert "group" in _invalid(stub, "GroupBy", pb.GroupByRequest(
        query=pb.QueryRequest(text="ALL"), attribute="age"))
    assert "empty query" in _invalid(stub, "QueryBitmap", pb.QueryRequest(
        query=pb.Query(**{"and": pb.QueryList(children=[pb.Query()])})))


def test_timestamps_outside_years_1_to_9999_are_refused_on_every_path(
        stub, client: Client) -> None:  # type: ignore[no-untyped-def]
    """A timestamp no reader could turn back into a date must not be stored (it used to
    be, and every later Get of the profile failed)."""
    far = 20_000 * 365 * 86_400  # seconds: year ~22,000
    details = _invalid(stub, "Upsert", pb.UpsertRequest(id=uid(), operations=[pb.Operation(
        op=pb.Operation.SET, attribute="ts_far", value=pb.Value(
            timestamp_value=Timestamp(seconds=far)))]))
    assert "years 1 to 9999" in details
    row = msgpack.packb([[uid(), {"ts_far": msgpack.Timestamp(far, 0)}]])
    details = _invalid(stub, "BatchUpsert", pb.BatchUpsertRequest(packed=row))
    assert "packed[0]" in details and "years 1 to 9999" in details
    pid = uid()
    columns = msgpack.packb({"ids": [uid(), pid], "attributes": {"ts_far": [0, far * 10**6]},
                             "timestamps": ["ts_far"]})
    details = _invalid(stub, "BatchUpsert", pb.BatchUpsertRequest(columns=columns))
    assert "columns[1]" in details and "ts_far" in details
    assert client.get(pid) is None  # nothing of the batch applied
    for seconds in (far, 10**13):  # the second does not even fit int64 microseconds
        details = _invalid(stub, "Track", pb.TrackRequest(id=pid, event="visit",
                                                          at=Timestamp(seconds=seconds)))
        assert "years 1 to 9999" in details
    assert client.get(pid) is None
    early = datetime(1, 1, 1, 1, tzinfo=timezone(timedelta(hours=5)))  # year 0 in UTC
    with pytest.raises(ClientError, match="years 1 to 9999"):
        client.load([{"id": pid, "attributes": {"ts_far": early}}])


def test_columnar_batches_load_and_update_like_upserts(client: Client, stub) -> None:  # type: ignore[no-untyped-def]
    """The client's load sends columns: new profiles take the fast path, a batch touching
    existing ones the general planner; both read back as written."""
    at = datetime(2025, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    ids = [uid() for _ in range(3)]
    records = [{"id": ids[0], "attributes": {"col_s": "a", "col_t": at, "nested": {"x": 1}},
                "identifiers": [("email", f"{ids[0]}@col.example")]},
               {"id": ids[1], "attributes": {"col_l": ["b", "a", "b"], "col_f": 1.5}},
               {"id": ids[2], "attributes": {"col_s": "c", "col_l": []}}]
    assert client.load(records) == 3
    assert client.get(ids[0])["attributes"] == {"col_s": "a", "col_t": at, "nested.x": 1}
    assert client.get(ids[1])["attributes"] == {"col_l": ["a", "b"], "col_f": 1.5}
    assert client.get(ids[2])["attributes"] == {"col_s": "c"}
    assert client.get(identifier=("email", f"{ids[0]}@col.example"))["id"] == ids[0]
    assert client.count('col_s IN ("a", "c") AND col_t >= "2025-05-06T07:08:09.123456Z"') == 1
    # the same ids again: existing profiles, so the general path (set semantics)
    assert client.load([{"id": ids[0], "attributes": {"col_s": "z"}},
                        {"id": uid(), "attributes": {"col_s": "z"}}]) == 2
    got = client.get(ids[0])
    assert got["attributes"]["col_s"] == "z" and got["version"] == 2
    assert got["attributes"]["col_t"] == at
    with pytest.raises(ValueError, match="null"):
        client.load([{"id": uid(), "attributes": {"col_s": None}}])
    with pytest.raises(ValueError, match="given twice"):  # flattening, on the client
        client.load([{"id": uid(), "attributes": {"a.b": 1, "a": {"b": 2}}}])
    pid = uid()
    client.load([{"id": pid, "attributes": {"col_nest": OrderedDict(inner="x")}}])
    assert client.get(pid)["attributes"] == {"col_nest.inner": "x"}


def test_a_batch_applied_or_answered_short_is_an_error_not_a_smaller_result() -> None:
    """A server older than the client ignores the fields it does not know (columns, ids)
    and answers applied=0 or no profiles: the client says so instead of passing it on."""
    from memstore.client.core import _answers, _applied

    assert _applied(3, 3) == 3
    with pytest.raises(ClientError, match="applied 0 of 3"):
        _applied(0, 3)
    assert _answers([None, None], 2) == [None, None]
    with pytest.raises(ClientError, match="answered 0 of 2"):
        _answers([], 2)


def test_oversize_message_is_refused_and_server_survives(shard: ServerProcess,
                                                         client: Client) -> None:
    channel = grpc.insecure_channel(shard.address, options=[
        ("grpc.max_send_message_length", 200 << 20)])
    stub = memstore_pb2_grpc.MemstoreStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.BatchUpsert(pb.BatchUpsertRequest(packed=b"\x00" * (70 << 20)), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    channel.close()
    assert client.upsert(uid(), {"alive": True}).created


# ---------------------------------------------------------------------- server plumbing

def test_health_and_reflection(shard: ServerProcess) -> None:
    channel = grpc.insecure_channel(shard.address)
    health = health_pb2_grpc.HealthStub(channel)
    response = health.Check(health_pb2.HealthCheckRequest(service="memstore.v1.Memstore"))
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = reflection.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for a in answers for s in a.list_services_response.service}
    assert {"memstore.v1.Memstore", "memstore.v1.ShardControl",
            "grpc.health.v1.Health"} <= names
    channel.close()


def test_async_client_has_the_same_methods(shard: ServerProcess) -> None:
    sync_names = {n for n in dir(Client) if not n.startswith("_")}
    async_names = {n for n in dir(AsyncClient) if not n.startswith("_")}
    assert sync_names == async_names

    async def run() -> None:
        async with AsyncClient(shard.address) as c:
            pid = uid()
            await c.upsert(pid, {"x": 1})
            assert (await c.get(pid))["attributes"] == {"x": 1}
            assert await c.count('x = 1') >= 1
            assert pid in [i async for i in c.iter_ids("x = 1")]

    asyncio.run(run())


def test_deadline_is_honoured(shard: ServerProcess, segment: str) -> None:
    """A stream outliving its deadline ends with DEADLINE_EXCEEDED; the server carries on."""
    import time

    with Client(shard.address, timeout=0.5) as c:
        with pytest.raises(ClientError) as info:
            for _ in c.iter_ids(f'seg = "{segment}"', page_size=1):
                time.sleep(0.01)  # 300 pages at 10 ms each cannot finish in 0.5 s
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert c.count(f'seg = "{segment}"') == 300


def test_sigterm_stops_gracefully() -> None:
    server = start_shard(None)
    with Client(server.address) as c:
        c.upsert("x", {"a": 1})
    assert server.stop(signal.SIGTERM) == 0


def test_router_flag_makes_unseen_attributes_match_nothing(stub, segment: str) -> None:  # type: ignore[no-untyped-def]
    lenient = pb.QueryRequest(text='never_seen = "x"', unknown_attribute_is_empty=True)
    assert stub.Count(lenient).count == 0
    every = stub.Count(pb.QueryRequest(text="ALL")).count
    negated = pb.QueryRequest(text='NOT never_seen = "x"', unknown_attribute_is_empty=True)
    assert stub.Count(negated).count == every
    with pytest.raises(grpc.RpcError) as info:  # without the flag it is a caller's mistake
        stub.Count(pb.QueryRequest(text='never_seen = "x"'))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_prometheus_metrics_count_calls_by_method_and_code() -> None:
    import urllib.request

    server = start_shard(None, "--metrics-port", "0")
    try:
        with Client(server.address) as c:
            c.upsert("m1", {"x": 1})
            with pytest.raises(ClientError):
                c.count("x >")
        url = said(server.startup, "metrics on ") or ""
        assert url.startswith("http://127.0.0.1:")
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        server.stop()
    assert 'memstore_requests_total{code="OK",method="Upsert"} 1.0' in text
    assert 'memstore_requests_total{code="INVALID_ARGUMENT",method="Count"} 1.0' in text
    assert "memstore_profiles 1.0" in text
