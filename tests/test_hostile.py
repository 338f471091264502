"""Hostile input, case by case, on a shard and through a router (issue 23): every malformed
request is INVALID_ARGUMENT with a short message, queries are bounded, caches by bytes."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from memstore.errors import MAX_STATUS_BYTES, InvalidArgument, brief, capped
from memstore.server.service import _refuse
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc
from shards.calls import fail as _fail
from shards.slots import format_ranges, slot_of, split_even
from shards.text_cache import TextCache
from tests.conftest import ServerProcess, start_router, start_shard
from tests.test_router import RouterThread

INT64_MAX = 2**63 - 1
BAD = grpc.StatusCode.INVALID_ARGUMENT
FIRST = split_even(2)[0][0]  # the slots of shard-0, the shard the tests call straight


def _on_first(prefix: str) -> str:
    return next(f"{prefix}{i}" for i in range(1000) if slot_of(f"{prefix}{i}") <= FIRST[1])


KNOWN = _on_first("p")


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    shards = [start_shard(None, "--name", f"shard-{i}", "--slots", format_ranges(ranges))
              for i, ranges in enumerate(split_even(2))]
    router = RouterThread([s.address for s in shards])
    channels = [grpc.insecure_channel(a) for a in (router.address, shards[0].address)]
    stubs = [memstore_pb2_grpc.MemstoreStub(c) for c in channels]
    stubs[0].Upsert(pb.UpsertRequest(id=KNOWN, operations=[
        pb.Operation(op=pb.Operation.SET, attribute="city", value=pb.Value(string_value="Oslo"))
    ]), timeout=10)
    yield {"router": router, "shards": shards, "channels": channels,
           "stubs": dict(zip(("router", "shard"), stubs, strict=True))}
    for channel in channels:
        channel.close()
    router.stop()
    for shard in shards:
        shard.stop()


def _refused(call: Any, *args: Any, code: grpc.StatusCode = BAD) -> str:
    """The details of a call that must fail with `code`; short, as every message is."""
    with pytest.raises(grpc.RpcError) as err:
        result = call(*args, timeout=20)
        if hasattr(result, "__next__"):  # a stream fails when read
            list(result)
    assert err.value.code() == code, err.value.details()
    details: str = err.value.details()
    assert len(details.encode()) <= MAX_STATUS_BYTES
    return details


def _query_ids(cursor: str) -> pb.QueryIdsRequest:
    return pb.QueryIdsRequest(query=pb.QueryRequest(text="ALL"), cursor=cursor, page_size=1)


@pytest.mark.parametrize("via", ["router", "shard"])
def test_a_forged_cursor_is_invalid_argument(cluster: dict[str, Any], via: str) -> None:
    stub = cluster["stubs"][via]
    if via == "shard":
        forged = ["f" * 40, "-1", "0x10", "1_0", "zz", "ffffffff0"]
    else:
        nested = base64.urlsafe_b64encode(b"[" * 100_000).decode()
        forged = ["!!!", nested, base64.urlsafe_b64encode(b'[1, {"a": 2}]').decode(),
                  base64.urlsafe_b64encode(json.dumps(["shard-0", "f" * 40]).encode()).decode(),
                  base64.urlsafe_b64encode(b"9" * 5000).decode()]
    for cursor in forged:
        assert "cursor" in _refused(stub.QueryIds, _query_ids(cursor))
        assert "cursor" in _refused(stub.StreamIds, _query_ids(cursor))


@pytest.mark.parametrize("via", ["router", "shard"])
def test_literals_python_cannot_hold_are_invalid_argument(cluster: dict[str, Any],
                                                          via: str) -> None:
    stub = cluster["stubs"][via]
    details = _refused(stub.Count, pb.QueryRequest(text="city = " + "9" * 5000))
    assert "5000 digits does not fit in 64 bits" in details
    details = _refused(stub.Count, pb.QueryRequest(text='did("x", within=' + "9" * 5000 + "d)"))
    assert "too long" in details and "(5001 bytes)" in details


@pytest.mark.parametrize("via", ["router", "shard"])
def test_timestamps_with_nanos_outside_a_second_are_invalid_argument(
        cluster: dict[str, Any], via: str) -> None:
    stub = cluster["stubs"][via]
    for nanos in (-1, 1_000_000_000, 2**31 - 1):
        at = {"seconds": 1_700_000_000, "nanos": nanos}
        assert "nanos" in _refused(stub.Track, pb.TrackRequest(id=KNOWN, event="e", at=at))
        value = pb.Value(timestamp_value=at)
        assert "nanos" in _refused(stub.Upsert, pb.UpsertRequest(id=KNOWN, operations=[
            pb.Operation(op=pb.Operation.SET, attribute="seen", value=value)]))
        query = pb.Query(predicate=pb.Predicate(attribute="city", op=pb.Predicate.GE,
                                                values=[value]))
        assert "nanos" in _refused(stub.Count, pb.QueryRequest(query=query))


@pytest.mark.parametrize("via", ["router", "shard"])
def test_group_by_needs_an_attribute(cluster: dict[str, Any], via: str) -> None:
    request = pb.GroupByRequest(query=pb.QueryRequest(text="ALL"), attribute="")
    assert "attribute" in _refused(cluster["stubs"][via].GroupBy, request)


@pytest.mark.parametrize("via", ["router", "shard"])
def test_track_counts_never_pass_int64(cluster: dict[str, Any], via: str) -> None:
    stub = cluster["stubs"][via]
    pid = _on_first(f"counted-{via}-")
    for count in (0, 2**63, 2**64 - 1):  # (0 given: refused; absent: 1)
        assert "count" in _refused(stub.Track, pb.TrackRequest(id=pid, event="e", count=count))
        assert "count" in _refused(stub.TrackBatch, pb.TrackBatchRequest(
            events=[pb.TrackRequest(id=pid, event="e", count=count)]))
    stub.Track(pb.TrackRequest(id=pid, event="e", count=INT64_MAX - 1), timeout=10)
    stub.Track(pb.TrackRequest(id=pid, event="e"), timeout=10)  # exactly INT64_MAX
    assert "would pass int64" in _refused(stub.Track, pb.TrackRequest(id=pid, event="e"))
    got = stub.Get(pb.GetRequest(key=pb.ProfileKey(id=pid)), timeout=10).profile
    assert got.attributes["event.e.count"].int_value == INT64_MAX  # not capped: refused


@pytest.mark.parametrize("via", ["router", "shard"])
def test_a_huge_event_name_is_quoted_by_its_start(cluster: dict[str, Any], via: str) -> None:
    details = _refused(cluster["stubs"][via].Track,
                       pb.TrackRequest(id=KNOWN, event="é" * 500_000))
    assert details.startswith("event: name 'éééé") and "… (1000000 bytes)" in details


@pytest.mark.parametrize("via", ["router", "shard"])
def test_protobuf_that_does_not_parse_is_invalid_argument(cluster: dict[str, Any],
                                                          via: str) -> None:
    channel = cluster["channels"][0 if via == "router" else 1]
    valid = pb.GetRequest(key=pb.ProfileKey(id=KNOWN)).SerializeToString()
    bad_utf8 = valid.replace(KNOWN.encode(), b"\xff" * len(KNOWN))
    get = channel.unary_unary("/memstore.v1.Memstore/Get", request_serializer=None,
                              response_deserializer=None)
    stream = channel.unary_stream("/memstore.v1.Memstore/StreamIds", request_serializer=None,
                                  response_deserializer=None)
    assert get(valid, timeout=10)  # the same bytes, unbroken, are answered
    for raw in (b"\xff\xff\xff", bad_utf8, valid[:-1]):
        assert "not a valid message" in _refused(get, raw)
        assert "not a valid message" in _refused(stream, raw)
    deep = b""  # Query.not, nested past protobuf's recursion limit
    for _ in range(200):
        deep = b"\x22" + _varint(len(deep)) + deep
    count = channel.unary_unary("/memstore.v1.Memstore/Count", request_serializer=None,
                                response_deserializer=None)
    _refused(count, b"\x0a" + _varint(len(deep)) + deep)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


@pytest.mark.parametrize("via", ["router", "shard"])
def test_queries_over_the_default_limits_are_refused_naming_them(cluster: dict[str, Any],
                                                                  via: str) -> None:
    stub = cluster["stubs"][via]
    million = "city IN (" + ",".join(['"x"'] * 1_000_000) + ")"
    details = _refused(stub.Count, pb.QueryRequest(text=million))
    assert details == f"query: a query text of {len(million)} bytes exceeds the limit of " \
                      "65536 (--max-query-bytes)"
    values = [pb.Value(int_value=i) for i in range(20_000)]
    query = pb.Query(predicate=pb.Predicate(attribute="city", op=pb.Predicate.IN,
                                            values=values))
    details = _refused(stub.Count, pb.QueryRequest(query=query))
    assert details == "query.predicate: an IN list of 20000 items exceeds the limit " \
                      "of 10000 (--max-query-items)"
    many = " OR ".join(["city = 'x'"] * 1001)
    assert "limit of 1000 (--max-query-predicates)" in _refused(
        stub.Count, pb.QueryRequest(text=many))
    within = " OR ".join(["city = 'x'"] * 1000)
    assert stub.Count(pb.QueryRequest(text=within), timeout=10).count == 0


def test_the_limits_are_the_ones_each_server_was_started_with(tmp_path: Path) -> None:
    """serve-shard and serve-router take --max-query-*; each refuses by its own."""
    shard = start_shard(None, "--max-query-items", "5", "--max-query-predicates", "3",
                        "--max-query-bytes", "200")
    router: ServerProcess | None = None
    try:
        router = start_router([shard.address], "--max-query-items", "3")
        six = pb.QueryRequest(text="city IN (1, 2, 3, 4, 5, 6)")
        four = pb.QueryRequest(text="city IN (1, 2, 3, 4)")
        with grpc.insecure_channel(shard.address) as ch:
            stub = memstore_pb2_grpc.MemstoreStub(ch)
            stub.Upsert(pb.UpsertRequest(id="a", operations=[pb.Operation(
                op=pb.Operation.SET, attribute="city", value=pb.Value(int_value=1))]))
            assert "limit of 5 (--max-query-items)" in _refused(stub.Count, six)
            assert stub.Count(four, timeout=10).count == 1
            assert "limit of 3 (--max-query-predicates)" in _refused(
                stub.Count, pb.QueryRequest(text="city = 1 OR city = 2 OR ALL OR ALL"))
            assert "limit of 200 (--max-query-bytes)" in _refused(
                stub.Count, pb.QueryRequest(text="city = '" + "x" * 200 + "'"))
        with grpc.insecure_channel(router.address) as ch:  # the router refuses first
            assert "limit of 3 (--max-query-items)" in _refused(
                memstore_pb2_grpc.MemstoreStub(ch).Count, four)
    finally:
        if router is not None:
            router.stop()
        shard.stop()


def test_the_routers_text_cache_is_bounded_by_bytes(cluster: dict[str, Any]) -> None:
    router: RouterThread = cluster["router"]
    stub = cluster["stubs"]["router"]
    texts = router.router._texts
    for i in range(600):  # distinct texts of ~10 KB each: 6 MB in all
        text = f"city = '{i}' OR city = '" + "x" * 10_000 + "'"
        assert stub.Count(pb.QueryRequest(text=text), timeout=10).count == 0
    assert 0 < texts.size <= texts.max_bytes and 0 < len(texts) < 600
    assert texts.get(text) is not None  # the most recent is kept
    big = "city = '" + "y" * texts.max_text + "'"
    stub.Count(pb.QueryRequest(text=big), timeout=10)
    assert texts.get(big) is None  # too big to keep at all


def test_a_text_cache_keeps_the_recent_within_its_bytes() -> None:
    cache = TextCache(max_bytes=10_000, max_text=2_000)
    cache.put("a" * 3_000, frozenset({"a"}))
    assert len(cache) == 0  # over max_text
    for i in range(100):
        cache.put(f"t{i}" + "x" * 500, frozenset({f"n{i}"}))
        cache.get("t0" + "x" * 500)  # kept warm
    assert cache.size <= 10_000
    assert cache.get("t0" + "x" * 500) == frozenset({"n0"})
    assert cache.get("t99" + "x" * 500) == frozenset({"n99"})
    assert cache.get("t50" + "x" * 500) is None


class _Context:
    """What `_refuse` and `_fail` use of a ServicerContext: the status they send."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise RuntimeError("aborted")


@pytest.mark.parametrize("exc", [InvalidArgument("x" * 1_000_000), KeyError("é" * 1_000_000)])
def test_status_messages_are_capped_where_they_are_sent(exc: Exception) -> None:
    """The last line of defence: a message that quotes too much is cut at 1 KiB."""
    shard, router = _Context(), _Context()
    _refuse(shard, exc)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="aborted"):
        asyncio.run(_fail(router, BAD, str(exc)))  # type: ignore[arg-type]
    for context in (shard, router):
        assert context.code is not None
        assert len(context.details.encode()) <= MAX_STATUS_BYTES
        assert context.details.endswith("bytes)")


def test_brief_and_capped() -> None:
    assert brief("abc") == "'abc'"
    assert brief("é" * 100) == repr("é" * 64) + "… (200 bytes)"
    assert brief(10**5000) == "an integer of 16610 bits"
    assert capped("short") == "short"
    cut = capped("€" * 1000)
    assert len(cut.encode()) <= MAX_STATUS_BYTES and cut.endswith(", 3000 bytes)")
    assert capped("\ud800") == "\\ud800"  # always valid UTF-8


def test_profiles_moved_between_shards_are_checked_before_they_apply(
        cluster: dict[str, Any]) -> None:
    """ImportProfiles and Absorb carry stored profiles as msgpack: a malformed one is
    refused whole (it would otherwise be logged and fail every restart)."""
    import msgpack

    from memstore.v1 import cluster_pb2 as cpb
    from memstore.v1 import cluster_pb2_grpc

    schema = [["city", 1, True, 0]]
    good = ["moved-1", 1, {"city": "Oslo"}, [["email", "m@x.invalid"]], []]
    chunks = {
        "not a map": [1, 2],
        "schema": {"profiles": []},
        "kind": {"schema": [["city", 9, True, 0]], "profiles": []},
        "merge": {"schema": [["city", 1, True, 1]], "profiles": []},  # sum of a string
        "attributes": {"schema": schema, "profiles": [["moved-1", 1, {"town": "x"}, [], []]]},
        "stored value": {"schema": schema, "profiles": [["moved-1", 1, {"city": 7}, [], []]]},
        "version": {"schema": schema, "profiles": [["moved-1", -1, {}, [], []]]},
        "identifiers": {"schema": schema, "profiles": [["moved-1", 1, {}, [["", "v"]], []]]},
        "notes": {"schema": schema, "profiles": [good], "notes": {"claims": {"k": 5}}},
        "note_slots": {"schema": schema, "profiles": [good], "note_slots": b"junk"},
    }
    with grpc.insecure_channel(cluster["shards"][0].address) as channel:
        control = cluster_pb2_grpc.ShardControlStub(channel)
        before = control.GetShardInfo(cpb.ShardInfoRequest(), timeout=10).profiles
        for why, chunk in chunks.items():
            details = _refused(control.ImportProfiles, cpb.ImportRequest(
                packed=msgpack.packb(chunk, use_bin_type=True)))
            assert details, why
        losers = [{"schema": schema}, {"schema": schema, "profile": good[:3]},
                  {"schema": schema, "profile": ["moved-1", 1, {}, [], []]}]  # city missing
        for loser in losers:
            _refused(control.Absorb, cpb.AbsorbRequest(
                txn="t-1", losers=[msgpack.packb(loser)],
                link=pb.LinkRequest(id=KNOWN, identifiers=[
                    pb.Identifier(kind="email", value="m@x.invalid")])))
        good_loser = msgpack.packb({"schema": schema, "profile": good})
        for records, expected in (([], "one record, not 0"), (["a", "b"], "one record, not 2"),
                                  (None, "packed: not a msgpack array")):
            record = pb.BatchUpsertRequest(packed=b"\xc1" if records is None else
                                           msgpack.packb([[r, {}] for r in records]))
            details = _refused(control.Absorb, cpb.AbsorbRequest(
                txn="t-2", losers=[good_loser], record=record))
            assert expected in details, details
        assert control.GetShardInfo(cpb.ShardInfoRequest(), timeout=10).profiles == before


@pytest.mark.parametrize("via", ["router", "shard"])
def test_health_and_reflection_refuse_what_does_not_parse_and_answer_the_rest(
        cluster: dict[str, Any], via: str) -> None:
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    channel = cluster["channels"][0 if via == "router" else 1]
    check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None,
                                response_deserializer=None)
    assert health_pb2.HealthCheckResponse.FromString(check(b"", timeout=10)).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert "not a valid message" in _refused(check, b"\xff\xff")
    listing = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    for version in ("v1alpha", "v1"):  # the same messages under two names (reflection.py)
        reflect = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=None, response_deserializer=None)
        [answer] = list(reflect(iter([listing]), timeout=10))
        names = reflection_pb2.ServerReflectionResponse.FromString(answer) \
            .list_services_response.service
        assert "memstore.v1.Memstore" in {s.name for s in names}
        assert "not a valid message" in _refused(
            lambda *a, r=reflect, **k: list(r(iter([listing, b"\xff\xff"]), **k)))


# ---------------------------------------------------------------------- with security on

READER = "reader-token-0123456789abcdef"
MEMBER = "member-token-0123456789abcdef"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """A shard and a router that take tokens (memstore/server/security.py); the router
    calls its shard with the cluster token."""
    auth = tmp_path_factory.mktemp("secured") / "tokens"
    auth.write_text(f"{READER} read reader\n{MEMBER} cluster router\n")
    shard = start_shard(None, "--auth-file", str(auth))
    router: ServerProcess | None = None
    try:
        router = start_router([shard.address], "--auth-file", str(auth),
                              env={"MEMSTORE_CLUSTER_TOKEN": MEMBER})
        yield {"router": router, "shard": shard}
    finally:
        if router is not None:
            router.stop()
        shard.stop()


@pytest.mark.parametrize("via", ["router", "shard"])
def test_authentication_comes_before_parsing(secured: dict[str, ServerProcess],
                                             via: str) -> None:
    """A caller without credentials is UNAUTHENTICATED whatever it sends, and learns nothing
    of how its bytes parsed or which limit they broke; with a token, the same bytes are
    INVALID_ARGUMENT naming what is wrong. Health checks stay open, and so guarded."""
    token = (("authorization", f"Bearer {READER}"),)
    valid = pb.GetRequest(key=pb.ProfileKey(id="nobody")).SerializeToString()
    million = pb.QueryRequest(text="city IN (" + ",".join(['"x"'] * 1_000_000) + ")")
    with grpc.insecure_channel(secured[via].address) as channel:
        get = channel.unary_unary("/memstore.v1.Memstore/Get", request_serializer=None,
                                  response_deserializer=None)
        stream = channel.unary_stream("/memstore.v1.Memstore/StreamIds",
                                      request_serializer=None, response_deserializer=None)
        count = memstore_pb2_grpc.MemstoreStub(channel).Count
        reflect = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=None, response_deserializer=None)
        check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None,
                                    response_deserializer=None)
        for call, junk in ((get, b"\xff\xff\xff"), (stream, valid[:-1]),
                           (lambda r, **k: list(reflect(iter([r]), **k)), b"\xff\xff")):
            details = _refused(call, junk, code=grpc.StatusCode.UNAUTHENTICATED)
            assert "no credentials" in details and "valid message" not in details
            assert "not a valid message" in _refused(lambda r, c=call, **k: c(
                r, metadata=token, **k), junk)
        details = _refused(count, million, code=grpc.StatusCode.UNAUTHENTICATED)
        assert "limit" not in details
        assert "(--max-query-bytes)" in _refused(
            lambda r, **k: count(r, metadata=token, **k), million)
        with pytest.raises(grpc.RpcError) as err:  # the valid request, answered
            get(valid, metadata=token, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "not a valid message" in _refused(check, b"\xff\xff")


def test_refused_callers_requests_are_freed_at_once(secured: dict[str, ServerProcess]
                                                    ) -> None:
    """An unauthenticated caller's 4 MB requests are freed when refused: refusing by
    context.abort kept each in a reference cycle until a full collection (150 such requests
    took a shard from 64 to 679 MiB)."""
    shard = secured["shard"]
    big = pb.UpsertRequest(id="x", operations=[pb.Operation(
        op=pb.Operation.SET, attribute="a", value=pb.Value(string_value="x" * 4_000_000))])
    with grpc.insecure_channel(shard.address,
                               options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        upsert = memstore_pb2_grpc.MemstoreStub(ch).Upsert
        _refused(upsert, big, code=grpc.StatusCode.UNAUTHENTICATED)
        before = _rss(shard)
        for _ in range(100):
            _refused(upsert, big, code=grpc.StatusCode.UNAUTHENTICATED)
    assert _rss(shard) - before < 150 << 20, "refused requests were kept (400 MB sent)"


def _rss(process: ServerProcess) -> int:
    for line in Path(f"/proc/{process.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")
