"""Identity through chains of merges, through a router of two real shards.

A write naming an id merged away two, three or four times (across shards, within a shard,
through an alias) must reach the final survivor at once: it may never wait for its own
earlier claim. And a call that merges raises the survivor's version past every merged
profile's, on every path, so `expected_version` never accepts a stale write.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memstore import Client
from memstore.client.core import ClientError
from memstore.engine.change import UpsertSpec
from memstore.engine.core import Engine
from shards.slots import slot_of
from tests.test_router import RouterThread, start_shards

# Each write must finish well within this: the bug made one wait out the 30 s young-claim
# grace, and a client deadline of 10 s turns that into a failure.
DEADLINE = 10.0
FAST = 3.0


def _ids_on(shard: int, prefix: str) -> Iterator[str]:
    """Primary ids whose slot is in the half of the slot space `shard` owns (split_even)."""
    for n in itertools.count():
        pid = f"{prefix}{n}"
        if (slot_of(pid) >= 8192) == bool(shard):
            yield pid


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    shards = start_shards(tmp_path_factory.mktemp("chains"), 2)
    router = RouterThread([s.address for s in shards])
    client = Client(router.address, timeout=DEADLINE)
    yield {"client": client, "router": router}
    client.close()
    router.stop()
    for shard in shards:
        shard.stop()


def _timed(call: Any, *args: Any, **kwargs: Any) -> Any:
    started = time.monotonic()
    result = call(*args, **kwargs)
    took = time.monotonic() - started
    assert took < FAST, f"{call.__name__}{args} took {took:.1f} s (waited for itself?)"
    return result


def test_the_reported_sequence_finishes_at_once(cluster: dict[str, Any]) -> None:
    c: Client = cluster["client"]
    a = next(_ids_on(0, "rep-a-"))
    b, s = itertools.islice(_ids_on(1, "rep-b-"), 2)
    _timed(c.upsert, s, ops=[("unset", "tags", None)])
    _timed(c.link, a, [("device", "rep-d10")], create=True)
    merged = _timed(c.upsert, b, ops=[("remove_from_set", "tags", ["b"])],
                    identifiers=[("device", "rep-d10"), ("email", "rep-e07")])
    assert merged.id == b  # a merged into b, across shards
    linked = _timed(c.link, s, [("email", "rep-e07")], create=True)
    assert linked.merged_ids == [b]  # b merged into s, on its shard
    last = _timed(c.link, a, [("email", "rep-e15")], create=True)
    assert last.id == s
    for pid in (a, b, s):
        assert c.get(pid)["id"] == s
    for ident in (("device", "rep-d10"), ("email", "rep-e07"), ("email", "rep-e15")):
        assert c.get(identifier=ident)["id"] == s


# Where each profile of a chain lives: profile i is merged into profile i + 1.
PLACEMENTS = ["ab", "aa", "abb", "aba", "aab", "abab", "abba", "aaaa", "baab"]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_writes_through_every_link_of_a_chain(cluster: dict[str, Any], placement: str) -> None:
    c: Client = cluster["client"]
    tag = f"ch-{placement}-"
    pools = {"a": _ids_on(0, tag + "a"), "b": _ids_on(1, tag + "b")}
    chain = [next(pools[where]) for where in placement]
    c.link(chain[0], [("device", f"{tag}x0")], create=True)
    for i in range(1, len(chain)):
        # profile i names the identifier of profile i - 1: i - 1 merges into i
        result = _timed(c.link, chain[i], [("device", f"{tag}x{i - 1}"),
                                           ("device", f"{tag}x{i}")], create=True)
        assert result.id == chain[i]
    survivor = chain[-1]
    before = c.get(survivor)["version"]
    for j, pid in enumerate(chain[:-1]):
        # by every merged-away id: a link, an upsert naming an identifier, a plain upsert
        linked = _timed(c.link, pid, [("email", f"{tag}new{j}")], create=True)
        assert linked.id == survivor
        upserted = _timed(c.upsert, pid, {"step": j}, identifiers=[("email", f"{tag}up{j}")])
        assert upserted.id == survivor
        assert _timed(c.upsert, pid, {"plain": j}).id == survivor
    profile = c.get(survivor)
    assert profile["version"] == before + 3 * (len(chain) - 1)
    held = set(profile["identifiers"])
    assert {("device", f"{tag}x{i}") for i in range(len(chain))} <= held
    assert {("email", f"{tag}new{j}") for j in range(len(chain) - 1)} <= held
    for j in range(len(chain) - 1):
        assert c.get(identifier=("email", f"{tag}up{j}"))["id"] == survivor
    # named through an alias: the alias's own new identifier merges nothing else
    alias = chain[0]
    again = _timed(c.upsert, alias, {"again": True}, identifiers=[("email", f"{tag}new0")])
    assert again.id == survivor


# ---------------------------------------------------------------------- versions


@pytest.mark.parametrize("across", [False, True], ids=["same-shard", "across-shards"])
@pytest.mark.parametrize("path", ["upsert", "link", "batch"])
def test_a_merge_raises_the_version_past_the_merged_profile(
        cluster: dict[str, Any], across: bool, path: str) -> None:
    """p01 read at version 3; another writer merges p01 into p02: a write of p01 expecting
    version 3 must now fail, whichever call made the merge."""
    c: Client = cluster["client"]
    tag = f"v-{path}-{across}-"
    old = next(_ids_on(0, tag + "old"))
    new = next(_ids_on(1 if across else 0, tag + "new"))
    email = ("email", f"{tag}p01@example.com")
    c.upsert(old, {"city": "Oslo"}, identifiers=[email])
    c.upsert(old, {"plan": "paid"})
    c.upsert(old, {"age": 40})
    assert c.get(old)["version"] == 3
    if path == "upsert":
        result = c.upsert(new, {"city": "Lima"}, identifiers=[email])
        version = result.version
    elif path == "link":
        version = c.link(new, [email], create=True).version
    else:
        c.batch_upsert([{"id": new, "attributes": {"city": "Lima"}, "identifiers": [email]}])
        version = c.get(new)["version"]
    assert version > 3, f"{path} left the survivor at version {version}"
    assert c.get(old)["id"] == new
    with pytest.raises(ClientError) as stale:
        c.upsert(old, {"plan": "free"}, expected_version=3)
    assert stale.value.code.name == "FAILED_PRECONDITION"
    assert c.get(new)["attributes"].get("plan") == "paid"


def test_engine_version_rule_is_max_plus_one() -> None:
    """One call's operations and its merges count as one change: max of every version
    involved, plus one."""
    engine = Engine()
    for _ in range(5):
        engine.apply(engine.plan_upsert(UpsertSpec("loser", [(1, "a", 1)])))
    engine.apply(engine.plan_link("loser", [("email", "l@x.com")]))
    engine.apply(engine.plan_upsert(UpsertSpec("winner", [(1, "b", 1)])))
    assert engine.profile(engine.lookup("loser")).version == 6  # type: ignore[arg-type]
    engine.apply(engine.plan_upsert(UpsertSpec("winner", [(1, "c", 2)],
                                               identifiers=[("email", "l@x.com")])))
    assert engine.profile(engine.lookup("winner")).version == 7  # type: ignore[arg-type]
    engine.apply(engine.plan_upsert(UpsertSpec("third", [(1, "d", 3)])))
    engine.apply(engine.plan_link("third", [("email", "l@x.com")]))
    assert engine.profile(engine.lookup("third")).version == 8  # type: ignore[arg-type]


def test_claim_waits_are_counted(cluster: dict[str, Any]) -> None:
    """A write that waits for another write's young claim shows in the router's metrics
    (the router runs in this process; its grace is shortened so the wait ends soon)."""
    from memstore.server import metrics
    from shards.calls import Background

    c: Client = cluster["client"]
    router: RouterThread = cluster["router"]
    directory = router.router.directory
    waits = metrics.CLAIM_WAITS._value
    before = waits.get()
    a, b = next(_ids_on(0, "wait-a")), next(_ids_on(1, "wait-b"))
    c.link(a, [("email", "wait1@x.com")], create=True)
    c.link(b, [("email", "wait1@x.com")], create=True)  # a merge: no young claim in the way
    assert waits.get() == before
    # a claim by a write that never comes (its router died): young, then stale
    router.run(directory.ask([["email", "wait2@x.com", "ghost", None]], Background()))
    directory.grace = 0.5
    try:
        started = time.monotonic()
        assert c.link(a, [("email", "wait2@x.com")]).id == b
        assert time.monotonic() - started >= 0.3
    finally:
        directory.grace = 30.0
    assert waits.get() == before + 1
    assert c.get(identifier=("email", "wait2@x.com"))["id"] == b


def test_forwards_on_a_third_shard_are_repointed_to_the_final_survivor(
        tmp_path: Path) -> None:
    """p0 (shard 0) merges into p1 (shard 1), then p1 into p2 (shard 2): shard 0's forward
    of p0 is repointed from p1 to p2, so a reader of p0 takes one forward, not two."""
    import grpc
    import msgpack

    from memstore.v1 import cluster_pb2 as cpb
    from memstore.v1 import cluster_pb2_grpc
    from shards.slots import split_even

    blocks = split_even(3)

    def on(shard: int, prefix: str) -> str:
        (low, high), = blocks[shard]
        return next(f"{prefix}{n}" for n in itertools.count()
                    if low <= slot_of(f"{prefix}{n}") <= high)

    shards = start_shards(tmp_path, 3)
    router = RouterThread([s.address for s in shards])
    try:
        with Client(router.address, timeout=DEADLINE) as c:
            p0, p1, p2 = on(0, "three-a"), on(1, "three-b"), on(2, "three-c")
            c.link(p0, [("device", "t0")], create=True)
            assert c.link(p1, [("device", "t0")], create=True).merged_ids == [p0]
            assert c.link(p2, [("device", "t1"), ("email", "t1@x")], create=True).id == p2
            assert c.link(p2, [("device", "t0")]).merged_ids == [p1]
            with grpc.insecure_channel(shards[0].address) as channel:
                slot = slot_of(p0)
                chunks = list(cluster_pb2_grpc.ShardControlStub(channel).ExportSlots(
                    cpb.ExportRequest(slots=[cpb.SlotRange(start=slot, end=slot)]),
                    timeout=10))
            forwards = {}
            for chunk in chunks:
                notes = msgpack.unpackb(chunk.packed, strict_map_key=False).get("notes")
                if notes:
                    forwards.update(notes["forwards"])
            assert forwards.get(p0) == p2
            assert c.get(p0)["id"] == p2
            assert c.upsert(p0, {"x": 1}).id == p2
    finally:
        router.stop()
        for shard in shards:
            shard.stop()
