"""The link (memstore/server/link.py): a router's unary calls to a shard, and a client's to its
router or shard, over a light framed protocol, with gRPC's answers, trailers and status
codes, and gRPC whenever the link cannot be trusted or reached."""

from __future__ import annotations

import asyncio
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest

from memstore.client.core import AsyncClient, Client, ClientError
from memstore.server import metrics
from memstore.server.link import (
    DESCRIBE,
    PROTOCOL,
    BlockingLink,
    BlockingLinkStub,
    LinkClient,
    LinkRpcError,
    LinkServer,
    LinkStub,
    NoLink,
)
from memstore.v1 import cluster_pb2 as cpb
from memstore.v1 import cluster_pb2_grpc, memstore_pb2_grpc
from memstore.v1 import memstore_pb2 as pb
from shards.admin import admin_call
from shards.slots import slot_of
from tests.conftest import ServerProcess, said, start_router, start_shard
from tests.test_router import RouterThread, start_shards

MEMSTORE = pb.DESCRIPTOR.services_by_name["Memstore"]
N = 40


def _info(address: str) -> cpb.ShardInfo:
    with grpc.insecure_channel(address) as ch:
        return cluster_pb2_grpc.ShardControlStub(ch).GetShardInfo(cpb.ShardInfoRequest(),
                                                                 timeout=10)


def _links(router: RouterThread) -> list[Any]:
    return [s.stub.link for s in router.router.map.shards]


def _load(c: Client) -> None:
    for i in range(N):
        c.upsert(f"p{i}", {"n": i, "city": ["Oslo", "Lima"][i % 2]},
                 identifiers=[("email", f"p{i}@x")])


@pytest.fixture(scope="module")
def two_clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The same profiles behind a router whose shards serve the link and one whose do not.
    Tests leave every profile's `n` as loaded."""
    tmp_path = tmp_path_factory.mktemp("link")
    linked = start_shards(tmp_path / "linked", 2)
    plain = start_shards(tmp_path / "plain", 2, "--no-link")
    routers: list[RouterThread] = []
    try:
        routers = [RouterThread([s.address for s in linked]),
                   RouterThread([s.address for s in plain])]
        for router in routers:
            with Client(router.address) as c:
                _load(c)
        yield {"linked": routers[0], "plain": routers[1], "shards": linked}
    finally:
        for router in routers:
            router.stop()
        for shard in linked + plain:
            shard.stop()


def test_router_calls_take_the_link_and_answer_as_over_grpc(
        two_clusters: dict[str, Any]) -> None:
    linked, plain = two_clusters["linked"], two_clusters["plain"]
    assert all(link is not None for link in _links(linked))
    assert all(link is None for link in _links(plain))  # --no-link: nothing advertised
    before = sum(link.calls for link in _links(linked))

    def everything(c: Client) -> list[Any]:
        out: list[Any] = [c.get(f"p{i}") for i in range(N)]
        out.append(c.get(identifier=("email", "p5@x")))
        out.append(c.batch_get([f"p{i}" for i in range(N)] + ["nobody"]))
        out.append(c.count('city = "Oslo"'))
        out.append(c.ids("n >= 10"))
        out.append(c.group_by("n >= 0", "city"))
        out.append(c.upsert("p3", ops=[("increment", "visits", 5)]).version)
        out.append(c.get("p3"))
        out.append(c.get("nobody"))
        for bad in (lambda: c.count("n = "), lambda: c.upsert("p1", {"n": "text"}),
                    lambda: c.upsert("p1", {"n": 1}, expected_version=99)):
            with pytest.raises(ClientError) as err:
                bad()
            out.append((err.value.code, str(err.value)))
        return out

    with Client(linked.address) as a, Client(plain.address) as b:
        assert everything(a) == everything(b)
    spread = {slot_of(f"p{i}") < 8192 for i in range(N)}
    assert spread == {True, False}
    after = [link.calls for link in _links(linked)]
    assert all(n > 0 for n in after) and sum(after) - before >= N  # both shards, each Get
    # What `memstore cluster status` shows in its LINK column.
    for router, state in ((linked, "up"), (plain, "none")):
        listing = router.run(admin_call(router.address, "ListShards"))
        assert [s["link"] for s in listing["shards"]] == [state, state]


def test_cluster_calls_take_the_same_link(two_clusters: dict[str, Any]) -> None:
    # Directory claims and look-ups, merge steps and map reads (ShardControl) share the
    # shard's link with the public calls; a --no-link shard answers them over gRPC.
    for router, linked in ((two_clusters["linked"], True), (two_clusters["plain"], False)):
        for shard in router.router.map.shards:
            assert shard.control.link is shard.stub.link
            assert (shard.stub.link is not None) is linked
            before = shard.stub.link.calls if linked else 0

            async def info(shard: Any = shard) -> cpb.ShardInfo:
                return await shard.control.GetShardInfo(cpb.ShardInfoRequest(), timeout=5)

            answer = router.run(info())
            assert answer.name == shard.name
            if linked:  # this call (and any map refresh meanwhile) went over the link
                assert shard.stub.link.calls > before
    with Client(two_clusters["linked"].address) as c:  # a claim (ShardControl.Claim) each
        c.upsert("q1", {"n": 1}, identifiers=[("email", "q1@x")])
        assert c.get(identifier=("email", "q1@x"))["id"] == "q1"
        c.delete("q1")


def test_a_link_server_refuses_a_method_name_two_services_share() -> None:
    server = LinkServer(memstore_pb2_grpc.MemstoreServicer(), MEMSTORE)
    with pytest.raises(ValueError, match="repeats methods already served: BatchGet, "):
        server.add(memstore_pb2_grpc.MemstoreServicer(), MEMSTORE)


def test_a_shard_advertises_its_link_and_the_hello_carries_its_token(
        two_clusters: dict[str, Any]) -> None:
    shard: ServerProcess = two_clusters["shards"][0]
    info = _info(shard.address)
    assert info.link_port > 0 and len(info.link_token) == 32
    host = shard.address.rpartition(":")[0]
    with socket.create_connection((host, info.link_port), timeout=5) as s:
        length = struct.unpack("<I", s.recv(4))[0]
        assert msgpack.unpackb(s.recv(length)) == [PROTOCOL, info.link_token]
    other = _info(two_clusters["shards"][1].address)
    assert other.link_token != info.link_token


@pytest.mark.parametrize("garbage", [
    b"\xff\xff\xff\x7f",  # a length over the limit
    struct.pack("<I", 3) + b"\xc1\xc1\xc1",  # not msgpack
    struct.pack("<I", 1) + msgpack.packb(7),  # not a request
])
def test_garbage_on_the_link_closes_that_connection_and_nothing_else(
        two_clusters: dict[str, Any], garbage: bytes) -> None:
    shard: ServerProcess = two_clusters["shards"][0]
    info = _info(shard.address)
    host = shard.address.rpartition(":")[0]
    with socket.create_connection((host, info.link_port), timeout=5) as s:
        s.recv(4096)  # the hello
        s.sendall(garbage)
        assert s.recv(4096) == b""  # the shard closed this connection
    linked = two_clusters["linked"]
    with Client(linked.address) as c:
        assert [c.get(f"p{i}")["attributes"]["n"] for i in range(N)] == list(range(N))
    assert shard.proc.poll() is None


def test_a_link_whose_hello_is_not_the_shards_is_never_used(
        two_clusters: dict[str, Any]) -> None:
    """An address reused by another process (here: a link with another token that answers
    Gets) is refused; the call goes over gRPC with the same answer, and the router re-reads
    the map and goes back to the shard's own link."""
    linked: RouterThread = two_clusters["linked"]
    echo = SlowEcho()

    async def impostor() -> tuple[LinkServer, str]:
        server = LinkServer(echo, MEMSTORE)  # a token of its own
        port = await server.start("127.0.0.1", 0)
        return server, f"127.0.0.1:{port}"

    server, address = linked.run(impostor())
    shards = linked.router.map.shards
    real = [(s.stub.link.address, s.stub.link.token) for s in shards]
    try:
        # Both in one step of the router's loop: with one swapped alone, the first's failed
        # hello starts a map refresh whose call over the other link the second swap cuts.
        linked.run(_use_links([(shard.stub, address, shard.stub.link.token, shard.label)
                               for shard in shards]))
        with Client(linked.address) as c:
            for _ in range(3):
                assert [c.get(f"p{i}")["attributes"]["n"] for i in range(N)] == list(range(N))
        assert echo.seen_metadata == []  # not one call reached the impostor
        assert [(s.stub.link.address, s.stub.link.token) for s in shards] == real
        assert all(s.stub.link.calls > 0 for s in shards)
    finally:
        linked.run(server.stop(grace=1.0))
        linked.run(_use_links([(shard.stub, addr, token, shard.label)
                               for shard, (addr, token) in zip(shards, real)]))


async def _use_links(links: list[tuple[LinkStub, str, str, str]]) -> None:
    for stub, address, token, label in links:
        stub.use_link(address, token, label)


def test_a_restarted_shard_gets_a_new_link_that_the_router_learns(tmp_path: Path) -> None:
    shards = start_shards(tmp_path, 2)
    router = None
    try:
        router = RouterThread([s.address for s in shards])
        with Client(router.address) as c:
            _load(c)
            old = _info(shards[0].address)
            port = shards[0].address.rpartition(":")[2]
            shards[0].stop(signal.SIGKILL)
            shards[0] = start_shard(tmp_path / "shard-0", "--name", "shard-0", "--sync",
                                    "off", "--port", port)
            new = _info(shards[0].address)
            assert new.link_token != old.link_token
            # Reads retry through the restart. The old link fails to connect, so the call
            # goes over gRPC and the router re-reads the map: the next calls take the new
            # link (well before the 2-second sweep would have found it).
            state = next(s for s in router.router.map.shards if s.address == shards[0].address)
            deadline = time.monotonic() + 15  # the new link connects in the background
            while True:
                assert [c.get(f"p{i}")["attributes"]["n"] for i in range(N)] == list(range(N))
                link = state.stub.link
                if link is not None and link.token == new.link_token and link.calls > 0:
                    break
                assert time.monotonic() < deadline, "the router never took the new link"
                time.sleep(0.05)
    finally:
        if router is not None:
            router.stop()
        for shard in shards:
            shard.stop()


# ------------------------------------------------------------------ the protocol in process

class SlowEcho:
    """Get answers after `delay`; an id "abort" is refused the way the shard refuses."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.seen_metadata: list[Any] = []

    async def Get(self, request: pb.GetRequest, context: Any) -> pb.GetResponse:
        self.seen_metadata.append(context.invocation_metadata())
        await asyncio.sleep(self.delay)
        if request.key.id == "abort":
            context.set_trailing_metadata((("memstore-wrong-slot", "7"),))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "slot 7 is elsewhere")
        if request.key.id == "bug":
            raise RuntimeError("a bug")
        if request.key.id == "huge":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "x" * 1_000_000)
        context.set_trailing_metadata((("memstore-epoch", "3"),))
        return pb.GetResponse(profile=pb.Profile(id=request.key.id))


def _get(pid: str) -> pb.GetRequest:
    return pb.GetRequest(key=pb.ProfileKey(id=pid))


def test_the_protocol_carries_answers_errors_trailers_and_deadlines() -> None:
    async def scenario() -> None:
        echo = SlowEcho()
        server = LinkServer(echo, MEMSTORE)
        port = await server.start("127.0.0.1", 0)
        client = LinkClient(f"127.0.0.1:{port}", server.token, "test")
        with pytest.raises(NoLink):  # a call never waits for the link to come up ...
            await client.call("Get", _get("a"), pb.GetResponse, 5.0, None)
        assert await client.ready()  # ... which it does meanwhile
        try:
            response, trailers = await client.call(
                "Get", _get("a"), pb.GetResponse, 5.0, (("memstore-expect-shard", "s:1"),))
            assert response.profile.id == "a" and trailers == (("memstore-epoch", "3"),)
            assert echo.seen_metadata[-1] == (("memstore-expect-shard", "s:1"),)
            # Concurrent calls are answered by id, whatever order they finish in.
            many = await asyncio.gather(*(client.call("Get", _get(f"x{i}"), pb.GetResponse,
                                                      5.0, None) for i in range(50)))
            assert [r.profile.id for r, _ in many] == [f"x{i}" for i in range(50)]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.call("Get", _get("abort"), pb.GetResponse, 5.0, None)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details() == "slot 7 is elsewhere"
            assert tuple(err.value.trailing_metadata()) == (("memstore-wrong-slot", "7"),)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.call("Get", _get("bug"), pb.GetResponse, 5.0, None)
            assert err.value.code() == grpc.StatusCode.INTERNAL
            with pytest.raises(grpc.aio.AioRpcError) as err:  # at most 1 KiB of message
                await client.call("Get", _get("huge"), pb.GetResponse, 5.0, None)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len(err.value.details()) <= 1024
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.call("Count", pb.QueryRequest(), pb.CountResponse, 5.0, None)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # SlowEcho has no Count
            echo.delay = 0.5
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.call("Get", _get("slow"), pb.GetResponse, 0.05, None)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            echo.delay = 0.0
            response, _ = await client.call("Get", _get("after"), pb.GetResponse, 5.0, None)
            assert response.profile.id == "after"  # the link outlived the late answer
            # The shard going away fails the calls under way as UNAVAILABLE ...
            echo.delay = 2.0
            pending = asyncio.ensure_future(
                client.call("Get", _get("cut"), pb.GetResponse, 10.0, None))
            await asyncio.sleep(0.1)
            await server.stop(grace=0.1)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pending
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            # ... and, with nothing listening, the next call is not sent at all (NoLink):
            # the stub sends it over gRPC instead.
            with pytest.raises(NoLink):
                await client.call("Get", _get("b"), pb.GetResponse, 5.0, None)
        finally:
            client.close()
            await server.stop(grace=0.1)

    asyncio.run(scenario())


def test_a_stub_falls_back_to_grpc_when_the_link_is_gone(two_clusters: dict[str, Any]
                                                         ) -> None:
    """A link advertised but unreachable (nothing listens there): calls go over gRPC."""
    shard: ServerProcess = two_clusters["shards"][0]
    info = _info(shard.address)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # closed again before it is used

    async def get(pid: str) -> Any:
        async with grpc.aio.insecure_channel(shard.address) as channel:
            stub = LinkStub(memstore_pb2_grpc.MemstoreStub(channel), MEMSTORE)
            stub.use_link(dead, info.link_token, "shard-0")
            assert stub.link is not None
            response = await stub.Get(_get(pid), timeout=5)
            return response.profile.id, stub.link.calls

    pid = next(f"p{i}" for i in range(N) if slot_of(f"p{i}") < 8192)
    assert asyncio.run(get(pid)) == (pid, 0)


# ------------------------------------------------------------------ clients on the link

@pytest.fixture
def run() -> Iterator[Callable[[Any], Any]]:
    """Runs a coroutine on an event loop in a thread of its own (link servers for the
    blocking callers of a test)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _reads(c: Client) -> list[Any]:
    """Every kind of unary read, and refusals that change nothing."""
    out: list[Any] = [c.get(f"p{i}") for i in range(N)]
    out.append(c.get(identifier=("email", "p5@x")))
    out.append(c.get("p2", attributes=["city"]))
    out.append(c.batch_get([f"p{i}" for i in range(N)] + ["nobody", ("email", "p7@x")]))
    out.append(c.count('city = "Oslo"'))
    out.append(c.ids("n >= 10", page_size=7))
    out.append(c.group_by("n >= 0", "city"))
    out.append(c.get("nobody"))
    out.append(c.schema())
    for bad in (lambda: c.count("n = "), lambda: c.upsert("p1", {"n": "text"}),
                lambda: c.upsert("p1", {"n": 1}, expected_version=99),
                lambda: c.get(identifier=("email", ""))):
        with pytest.raises(ClientError) as err:
            bad()
        out.append((err.value.code, str(err.value)))
    return out


def _requests(method: str, code: str = "OK") -> float:
    value = metrics.REQUESTS.labels(method, code)._value.get()  # type: ignore[attr-defined]
    return float(value)


def test_a_client_on_the_routers_link_answers_as_over_grpc(two_clusters: dict[str, Any]
                                                           ) -> None:
    router = two_clusters["linked"]
    assert router.router.link is not None and router.router.link.port
    with Client(router.address, link=True) as fast, Client(router.address) as plain:
        assert fast.link_ready()
        link = fast._link.link  # type: ignore[union-attr]
        assert link is not None and link.token == router.router.link.token
        before, counted = link.calls, _requests("Get")
        assert _reads(fast) == _reads(plain)
        assert link.calls - before == N + 7  # every read answered OK took the link
        assert _requests("Get") - counted >= 2 * N  # the router counts both ways alike
        # A write over the link, seen over gRPC, and a write's refusal changes nothing.
        version = fast.upsert("p4", ops=[("increment", "visits", 2)]).version
        assert plain.get("p4")["version"] == version
        assert plain.get("p4")["attributes"]["visits"] == 2
        assert fast.upsert("p4", ops=[("unset", "visits", None)]).version == version + 1
        # Streams and bulk loads stay on gRPC, beside the link.
        assert sorted(fast.iter_ids("n < 5")) == sorted(f"p{i}" for i in range(5))
        assert fast.load([{"id": "p4", "attributes": {"n": 4}}]) == 1
        assert plain.get("p4")["attributes"] == {"n": 4, "city": "Oslo"}

    async def asynchronous() -> list[Any]:
        async with AsyncClient(router.address, link=True) as c:
            assert await c.link_ready()
            before = c._link.link.calls  # type: ignore[union-attr]
            out = [await c.get("p1"), await c.count('city = "Lima"'), await c.get("nobody")]
            with pytest.raises(ClientError) as err:
                await c.count("n = ")
            out.append((err.value.code, str(err.value)))
            assert c._link.link.calls - before == 2  # type: ignore[union-attr]
            return out

    with Client(router.address) as plain:
        with pytest.raises(ClientError) as err:
            plain.count("n = ")
        expected = [plain.get("p1"), plain.count('city = "Lima"'), None,
                    (err.value.code, str(err.value))]
    assert asyncio.run(asynchronous()) == expected


def test_a_client_uses_grpc_where_no_link_is_served(two_clusters: dict[str, Any],
                                                   tmp_path: Path) -> None:
    unlinked = RouterThread([s.address for s in two_clusters["shards"]], link=False)
    plain_shard = start_shard(None, "--no-link")
    try:
        # The unlinked router fronts the linked shards (the N profiles loaded); the plain
        # shard is new and empty.
        for address, profiles in ((unlinked.address, N), (plain_shard.address, 0)):
            with Client(address, link=True) as c:
                assert not c.link_ready()
                assert c._link is not None and not c._link.enabled  # never asked again
                assert c.get("nobody") is None and c.stats()["profiles"] == profiles

        async def asynchronous() -> tuple[bool, Any]:
            async with AsyncClient(unlinked.address, link=True) as c:
                return await c.link_ready(), await c.get("p1")

        ready, p1 = asyncio.run(asynchronous())
        assert not ready and p1["attributes"]["n"] == 1
    finally:
        unlinked.stop()
        plain_shard.stop()
    # A shard serves its link to clients too.
    shard = two_clusters["shards"][0]
    with Client(shard.address, link=True) as c:
        assert c.link_ready() and c._link.link.token == _info(shard.address).link_token  # type: ignore[union-attr]
        pid = next(f"p{i}" for i in range(N) if slot_of(f"p{i}") < 8192)
        assert c.get(pid)["id"] == pid and c._link.link.calls == 1  # type: ignore[union-attr]


def test_a_clients_link_follows_its_router_through_a_restart(tmp_path: Path) -> None:
    shards = start_shards(tmp_path, 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    router = RouterThread([x.address for x in shards], port=port)
    try:
        with Client(router.address, link=True) as c:
            _load(c)
            assert c.link_ready()
            old = c._link.link  # type: ignore[union-attr]
            assert old is not None and c.get("p1")["attributes"]["n"] == 1
            router.stop()
            router = RouterThread([x.address for x in shards], port=port)  # a new link port
            # The idle connection is found closed; nothing listens where the link was, so
            # this write goes over gRPC (not lost, not UNAVAILABLE) and the router is
            # described again in the background.
            assert c.upsert("p1", {"n": 100}).version == 2
            assert c.link_ready()
            new = c._link.link  # type: ignore[union-attr]
            assert new is not None and new is not old and new.token == router.router.link.token
            assert c.get("p1")["attributes"]["n"] == 100 and new.calls == 1
    finally:
        router.stop()
        for shard in shards:
            shard.stop()


def test_the_blocking_link_carries_answers_errors_trailers_and_deadlines(
        run: Callable[[Any], Any]) -> None:
    echo = SlowEcho()
    server = LinkServer(echo, MEMSTORE)
    port = run(server.start("127.0.0.1", 0))
    address = f"127.0.0.1:{port}"

    def get(link: BlockingLink, pid: str, timeout: float = 5.0, metadata: Any = None) -> str:
        body = link.call("Get", _get(pid).SerializeToString(), timeout, metadata)
        return pb.GetResponse.FromString(body).profile.id

    with pytest.raises(ConnectionError, match="token"):
        BlockingLink(address, "not-the-token", "test").connect()
    link = BlockingLink(address, server.token, "test")
    try:
        assert get(link, "a", metadata=(("memstore-expect-shard", "s:1"),)) == "a"
        assert echo.seen_metadata[-1] == (("memstore-expect-shard", "s:1"),)
        # Threads sharing the link each get a connection of their own.
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda i: get(link, f"x{i}"), range(64))) == \
                [f"x{i}" for i in range(64)]
        assert 1 < len(link._idle) <= 8
        with pytest.raises(LinkRpcError) as err:
            get(link, "abort")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and not err.value.lost
        assert err.value.details() == "slot 7 is elsewhere"
        assert err.value.trailing_metadata() == (("memstore-wrong-slot", "7"),)
        with pytest.raises(LinkRpcError) as err:
            get(link, "bug")
        assert err.value.code() == grpc.StatusCode.INTERNAL
        with pytest.raises(LinkRpcError) as err:
            link.call("Count", pb.QueryRequest().SerializeToString(), 5.0, None)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        echo.delay = 0.5
        with pytest.raises(LinkRpcError) as err:
            get(link, "slow", timeout=0.05)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not err.value.lost
        echo.delay = 0.0
        time.sleep(0.6)  # the late answer arrives on a connection closed for it
        assert [get(link, "after") for _ in range(20)] == ["after"] * 20
        # The server going away fails a call under way as UNAVAILABLE (lost: a write's
        # outcome is unknown) ...
        echo.delay = 2.0
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(get, link, "cut", 10.0)
            time.sleep(0.2)
            run(server.stop(grace=0.1))
            with pytest.raises(LinkRpcError) as err:
                pending.result(10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and err.value.lost
        # ... and, with nothing listening, the next call is not sent at all (NoLink): the
        # stub sends it over gRPC instead.
        with pytest.raises(NoLink):
            get(link, "b")
    finally:
        link.close()
        run(server.stop(grace=0.1))


def test_a_blocking_stub_describes_its_server_again_after_losing_the_link(
        run: Callable[[Any], Any]) -> None:
    class OverGrpc:  # the gRPC stub a call falls back to: Gets answer "grpc:ID"
        def __getattr__(self, method: str) -> Any:
            def call(request: pb.GetRequest, timeout: float | None = None,
                     metadata: Any = None) -> pb.GetResponse:
                return pb.GetResponse(profile=pb.Profile(id=f"grpc:{request.key.id}"))
            return call

    echo = SlowEcho()
    servers = [LinkServer(echo, MEMSTORE)]
    ports = [run(servers[0].start("127.0.0.1", 0))]
    stub = BlockingLinkStub(OverGrpc(), MEMSTORE,
                            lambda: (f"127.0.0.1:{ports[-1]}", servers[-1].token), "test")
    try:
        assert stub.Get(_get("early")).profile.id == "grpc:early"  # before the link is up
        assert stub.ready()
        assert stub.Get(_get("a"), timeout=5).profile.id == "a"
        echo.delay = 2.0
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(stub.Get, _get("cut"), 10.0)
            time.sleep(0.2)
            run(servers[0].stop(grace=0.1))  # a restart: the server comes back elsewhere
            servers.append(LinkServer(echo, MEMSTORE))
            ports.append(run(servers[1].start("127.0.0.1", 0)))
            with pytest.raises(LinkRpcError) as err:
                pending.result(10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        echo.delay = 0.0
        assert stub.ready()  # described again: the new port and token
        assert stub.link is not None and stub.link.token == servers[1].token
        assert stub.Get(_get("b"), timeout=5).profile.id == "b" and stub.link.calls == 1
    finally:
        stub.close()
        for server in servers:
            run(server.stop(grace=0.1))


def test_serve_router_serves_its_link_on_the_port_asked_and_none_with_no_link(
        two_clusters: dict[str, Any]) -> None:
    shards = [s.address for s in two_clusters["shards"]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    linked = start_router(shards, "--link-port", str(port))
    plain = start_router(shards, "--no-link")
    try:
        assert said(linked.startup, "link on ") == f"127.0.0.1:{port}"
        with Client(linked.address, link=True) as c:
            assert c.link_ready() and c._link.link.address == f"127.0.0.1:{port}"  # type: ignore[union-attr]
            assert c.get("p1")["attributes"]["n"] == 1
        assert said(plain.startup, "link on ") is None
        with grpc.insecure_channel(plain.address) as channel, pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(DESCRIBE)(b"{}", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    finally:
        linked.stop()
        plain.stop()
