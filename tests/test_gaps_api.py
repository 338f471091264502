"""Write-path promises the API makes: `expected_version=0` means "must not exist yet", and
the clients never send a write twice.

The clients retry reads on UNAVAILABLE and never writes: a write whose answer was lost may
have been applied, and an increment or a link sent again would apply twice. Here a real
gRPC server answers UNAVAILABLE to everything and counts what it was asked.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from memstore import AsyncClient, Client, ClientError
from memstore.engine.change import SET, UpsertSpec
from memstore.engine.core import Engine
from memstore.errors import FailedPrecondition
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc
from tests.conftest import ServerProcess

# ---------------------------------------------------------------------- expected_version=0


def test_expected_version_zero_refuses_a_profile_that_exists() -> None:
    engine = Engine()
    engine.apply(engine.plan_upsert(UpsertSpec("p", [(SET, "n", 1)], [("email", "p@x")])))
    with pytest.raises(FailedPrecondition, match="at version 1, expected 0"):
        engine.plan_upsert(UpsertSpec("p", [(SET, "n", 2)], expected_version=0))
    with pytest.raises(FailedPrecondition, match="expected 0"):  # in a batch, too
        engine.plan_batch([UpsertSpec("q", [(SET, "n", 1)]),
                           UpsertSpec("p", [(SET, "n", 2)], expected_version=0)])
    profile = engine.profile(engine.lookup("p"))  # type: ignore[arg-type]
    assert (profile.version, profile.attributes) == (1, {"n": 1})
    assert engine.lookup("q") is None
    engine.apply(engine.plan_upsert(UpsertSpec("q", [(SET, "n", 3)], expected_version=0)))
    assert engine.profile(engine.lookup("q")).version == 1  # type: ignore[arg-type]


def test_expected_version_zero_refuses_an_id_merged_into_a_profile() -> None:
    """A merged-away id stands for its survivor, which exists."""
    engine = Engine()
    engine.apply(engine.plan_upsert(UpsertSpec("s", [(SET, "n", 1)])))
    engine.apply(engine.plan_upsert(UpsertSpec("l", [(SET, "m", 2)], [("email", "l@x")])))
    engine.apply(engine.plan_link("s", [("email", "l@x")]))
    assert engine.lookup("l") == engine.lookup("s")
    with pytest.raises(FailedPrecondition, match="expected 0"):
        engine.plan_upsert(UpsertSpec("l", [(SET, "n", 9)], expected_version=0))


@pytest.mark.parametrize("link", [False, True], ids=["grpc", "link"])
def test_expected_version_zero_through_a_shard(shard: ServerProcess, link: bool) -> None:
    pid = f"ev0-{link}"
    with Client(shard.address, timeout=10, link=link) as c:
        if link:
            assert c.link_ready()
        created = c.upsert(pid, {"n": 1}, expected_version=0)
        assert created.created and created.version == 1
        with pytest.raises(ClientError) as err:
            c.upsert(pid, {"n": 2}, expected_version=0)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "expected 0" in err.value.details
        got = c.get(pid)
        assert (got["version"], got["attributes"]) == (1, {"n": 1})
    with grpc.insecure_channel(shard.address) as channel:  # and in a BatchUpsert
        stub = memstore_pb2_grpc.MemstoreStub(channel)
        request = pb.UpsertRequest(id=pid, expected_version=0, operations=[pb.Operation(
            op=pb.Operation.SET, attribute="n", value=pb.Value(int_value=3))])
        with pytest.raises(grpc.RpcError) as refused:
            stub.BatchUpsert(pb.BatchUpsertRequest(requests=[request]), timeout=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        got = stub.Get(pb.GetRequest(key=pb.ProfileKey(id=pid)), timeout=10).profile
        assert got.version == 1 and got.attributes["n"].int_value == 1


# ---------------------------------------------------------------------- no write sent twice

_UNARY = [m.name for m in pb.DESCRIPTOR.services_by_name["Memstore"].methods
          if not m.client_streaming and not m.server_streaming]


class Unavailable(memstore_pb2_grpc.MemstoreServicer):
    """A Memstore server that answers UNAVAILABLE to every unary call and counts them."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()


def _refuse(name: str) -> Callable[..., Any]:
    def method(self: Unavailable, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls[name] += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "injected: the shard is restarting")

    return method


for _name in _UNARY:
    setattr(Unavailable, _name, _refuse(_name))


@pytest.fixture
def unavailable() -> Iterator[tuple[str, Unavailable]]:
    servicer = Unavailable()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    memstore_pb2_grpc.add_MemstoreServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def _writes(c: Any) -> list[tuple[str, Callable[[], Any]]]:
    """(RPC, a call of it) for every write a client sends."""
    return [
        ("Upsert", lambda: c.upsert("p", ops=[("increment", "n", 1)])),
        ("BatchUpsert", lambda: c.batch_upsert([{"id": "p", "attributes": {"n": 1}}])),
        ("Link", lambda: c.link("p", [("email", "p@x")], create=True)),
        ("Delete", lambda: c.delete("p")),
        ("Track", lambda: c.track("p", "visit")),
    ]


def test_the_client_sends_a_write_once_and_retries_a_read(
        unavailable: tuple[str, Unavailable]) -> None:
    address, server = unavailable
    with Client(address, timeout=10) as c:
        for method, call in _writes(c):
            with pytest.raises(ClientError) as err:
                call()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert server.calls[method] == 1, f"{method} sent {server.calls[method]} times"
        with pytest.raises(ClientError) as err:
            c.load([{"id": "p", "attributes": {"n": 1}}])
        assert server.calls["BatchUpsert"] == 2  # the one above and this one
        with pytest.raises(ClientError) as err:
            c.get("p")
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert server.calls["Get"] > 1, "a read is idempotent: it should be retried"


def test_the_async_client_sends_a_write_once_and_retries_a_read(
        unavailable: tuple[str, Unavailable]) -> None:
    address, server = unavailable

    async def go() -> None:
        async with AsyncClient(address, timeout=10) as c:
            for method, call in _writes(c):
                with pytest.raises(ClientError) as err:
                    await call()
                assert err.value.code == grpc.StatusCode.UNAVAILABLE
                assert server.calls[method] == 1, f"{method} sent {server.calls[method]} times"
            with pytest.raises(ClientError):
                await c.get("p")

    asyncio.run(go())
    assert server.calls["Get"] > 1, "a read is idempotent: it should be retried"
