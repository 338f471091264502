"""One schema for the whole cluster: an attribute has one kind on every shard, whoever writes
it first, through whichever router, also when first writes of different kinds race; and it
stays so across restarts, slot moves and a shard added later. Real shard processes."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from memstore import Client
from memstore.client.core import ClientError
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc
from shards.slots import slot_of
from tests.conftest import ROOT, ServerProcess, start_shard
from tests.test_router import RouterThread, start_shards


def shard_kinds(shards: list[ServerProcess], name: str) -> list[str | None]:
    """The kind each shard itself declares `name` with (None: not declared there)."""
    kinds: list[str | None] = []
    for shard in shards:
        with grpc.insecure_channel(shard.address) as channel:
            schema = memstore_pb2_grpc.MemstoreStub(channel).GetSchema(
                pb.GetSchemaRequest(), timeout=10)
        found = [pb.Kind.Name(a.kind).lower() for a in schema.attributes if a.name == name]
        kinds.append(found[0] if found else None)
    return kinds


def ids_on(shard: int, prefix: str, count: int) -> list[str]:
    """Ids whose slots the shard `shard` of two owns (split_even)."""
    ids = (f"{prefix}{n}" for n in itertools.count())
    return list(itertools.islice((p for p in ids if (slot_of(p) >= 8192) == bool(shard)),
                                 count))


@pytest.fixture
def two(tmp_path: Path) -> Iterator[dict[str, Any]]:
    shards = start_shards(tmp_path, 2)
    state = {"shards": shards, "routers": [RouterThread([s.address for s in shards])
                                           for _ in range(2)], "root": tmp_path}
    yield state
    for router in state["routers"]:  # a test may have replaced them
        router.stop()
    for shard in state["shards"]:
        shard.stop()


def test_the_first_write_fixes_the_kind_on_every_shard(two: dict[str, Any]) -> None:
    """The report: z0 wrote price 10 (an int) on one shard, then z1..z5 wrote 10.5; some
    were accepted, some refused, depending on the shard. Now every one is refused."""
    shards = two["shards"]
    with Client(two["routers"][0].address) as c:
        first = ids_on(0, "z", 1)[0]
        c.upsert(first, {"price": 10})
        others = ids_on(0, "y", 3) + ids_on(1, "x", 3)
        for pid in others:
            with pytest.raises(ClientError) as refused:
                c.upsert(pid, {"price": 10.5})
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "attribute 'price' has kind int, got a float value" in refused.value.details
        assert c.count("exists(price)") == 1
        assert [a["kind"] for a in c.schema() if a["name"] == "price"] == ["int"]
        assert c.count("price > 9.5") == 1  # an int attribute compared with a float literal
        assert c.count("price < 10.5") == 1 and c.count("price = 10.5") == 0
        # a float attribute takes ints as floats, on every shard
        c.upsert(first, {"score": 0.5})
        for pid in others:
            assert c.upsert(pid, {"score": 3}).version >= 1
            assert c.get(pid)["attributes"]["score"] == 3.0
            assert type(c.get(pid)["attributes"]["score"]) is float
        assert c.count("score >= 3") == len(others)
    assert shard_kinds(shards, "price") in (["int", None], ["int", "int"])
    assert shard_kinds(shards, "score") == ["float", "float"]


def test_a_batch_first_writing_ints_and_floats_makes_a_float_across_shards(
        two: dict[str, Any]) -> None:
    """A new attribute a batch writes with ints on one shard's profiles and a float on
    the other's is a float, as one shard makes it of the same batch: each shard's part
    proposed its own kind, and the first registered (int) refused the rest. In every
    form of the batch (columns, upserts) and with the float in any place."""
    with Client(two["routers"][0].address) as c:
        for n, (form, float_on) in enumerate(itertools.product(("load", "batch_upsert"),
                                                               (0, 1))):
            name = f"m{n}"
            ints = ids_on(1 - float_on, f"{name}i", 5)
            [floating] = ids_on(float_on, f"{name}f", 1)
            records = [{"id": pid, "attributes": {name: k}} for k, pid in enumerate(ints)]
            records.insert(n % 3, {"id": floating, "attributes": {name: 2.5}})
            assert getattr(c, form)(records) is not None
            assert [a["kind"] for a in c.schema() if a["name"] == name] == ["float"], form
            assert c.get(floating)["attributes"][name] == 2.5
            assert c.count(f"{name} >= 0") == 6 and c.count(f"{name} = 2.5") == 1
            assert type(c.get(ints[1])["attributes"][name]) is float


def test_racing_first_writes_of_different_kinds_through_two_routers(
        two: dict[str, Any]) -> None:
    """Many first writes of one new attribute, of different kinds, through two routers at
    once, on ids spread over both shards: one kind wins everywhere; every accepted value
    has it; every refused write was refused for its kind."""
    shards, routers = two["shards"], two["routers"]
    values: list[Any] = [7, "seven", True, 7.5, ["a", "b"]]
    kinds = {int: "int", str: "string", bool: "bool", float: "float", list: "string_list"}
    names = [f"race{n}" for n in range(6)]
    accepted: dict[str, list[tuple[str, Any]]] = {n: [] for n in names}
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(len(values) * 2)

    def writer(router: RouterThread, value: Any, offset: int) -> None:
        with Client(router.address) as c:
            start.wait(30)
            for name in names:
                pid = f"{name}-{offset}"
                try:
                    c.upsert(pid, {name: value})
                except ClientError as exc:
                    if exc.code != grpc.StatusCode.INVALID_ARGUMENT or "has kind" not in \
                            exc.details:
                        with lock:
                            errors.append(f"{pid}: {exc}")
                    continue
                with lock:
                    accepted[name].append((pid, value))

    threads = [threading.Thread(target=writer, args=(routers[r], v, r * 10 + i))
               for r in range(2) for i, v in enumerate(values)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    with Client(routers[1].address) as c:
        schema = {a["name"]: a["kind"] for a in c.schema()}
        for name in names:
            winner = schema[name]
            assert set(shard_kinds(shards, name)) <= {winner, None}
            assert accepted[name], f"no write of {name} was accepted"
            for pid, value in accepted[name]:
                # an int accepted for a float attribute is that float (one number type)
                assert kinds[type(value)] == winner or (winner, type(value)) == ("float", int)
                assert c.get(pid)["attributes"][name] == (
                    sorted(value) if isinstance(value, list) else value)
            assert c.count(f"exists({name})") == len(accepted[name])


def test_declare_through_a_router_reaches_every_shard_or_none(two: dict[str, Any]) -> None:
    shards = two["shards"]
    with Client(two["routers"][0].address) as c:
        c.declare([{"name": "plan", "kind": "string"},
                   {"name": "visits", "kind": "int", "merge": "sum"}])
        assert shard_kinds(shards, "plan") == ["string", "string"]
        assert shard_kinds(shards, "visits") == ["int", "int"]
        with pytest.raises(ClientError) as refused:  # one of two conflicts: none applies
            c.declare([{"name": "tier", "kind": "string"},
                       {"name": "visits", "kind": "float"}])
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "attribute 'visits' is declared int, merge sum in the cluster" in \
            refused.value.details
        assert shard_kinds(shards, "tier") == [None, None]
        c.declare([{"name": "visits", "kind": "int", "merge": "sum"}])  # the same: fine
    with Client(two["routers"][1].address) as other:  # the other router knows it too
        with pytest.raises(ClientError):
            other.declare([{"name": "plan", "kind": "bool"}])
        with pytest.raises(ClientError) as wrong:
            other.upsert(ids_on(1, "p", 1)[0], {"plan": True})
        assert "attribute 'plan' has kind string" in wrong.value.details


def test_the_schema_survives_restarts_and_a_fresh_router(two: dict[str, Any]) -> None:
    shards, root = two["shards"], two["root"]
    writer = ids_on(0, "w", 1)[0]
    with Client(two["routers"][0].address) as c:
        c.upsert(writer, {"level": 3})  # declared on shard 0 only (where it was written)
    assert shard_kinds(shards, "level") == ["int", None]
    for router in two["routers"]:
        router.stop()
    for i, shard in enumerate(shards):
        shard.stop()
        shards[i] = start_shard(shard.data_dir, "--name", f"shard-{i}", "--sync", "off")
    two["routers"] = [RouterThread([s.address for s in shards])]
    with Client(two["routers"][0].address) as c:
        other = ids_on(1, "o", 1)[0]
        with pytest.raises(ClientError) as refused:  # shard 1 never had it: the registry
            c.upsert(other, {"level": "high"})
        assert "attribute 'level' has kind int" in refused.value.details
        assert c.upsert(other, {"level": 4}).created
    assert shard_kinds(shards, "level") == ["int", "int"]
    assert root.exists()


def test_a_shard_added_later_has_the_schema_before_it_owns_a_slot(
        two: dict[str, Any]) -> None:
    shards, routers, root = two["shards"], two["routers"], two["root"]
    with Client(routers[0].address) as c:
        c.upsert("a-1", {"color": "red", "size": 3, "tags": ["x"]})
        c.declare([{"name": "note", "kind": "string", "indexed": False}])
        new = start_shard(root / "shard-2", "--name", "shard-2", "--sync", "off")
        shards.append(new)
        result = subprocess.run(
            [sys.executable, "-m", "memstore.cli", "cluster", "add-shard", new.address,
             "--address", routers[0].address, "--address", routers[1].address,
             "--batch-slots", "4096", "--no-progress",
             "--journal", str(root / "journal.json")],
            check=False, cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr
        assert shard_kinds([new], "color") == ["string"]
        assert shard_kinds([new], "size") == ["int"]
        assert shard_kinds([new], "note") == ["string"]
        ids = [f"n-{i}" for i in range(40)]
        for pid in ids:
            with pytest.raises(ClientError):
                c.upsert(pid, {"size": "large"})  # refused on every shard, the new one too
            c.upsert(pid, {"size": 2.0 if pid == "never" else 5})
        assert c.count("size = 5") == len(ids)
