"""Two shards' engines merging across the slot boundary must answer like one engine.

The reference is a single Engine owning every slot (itself checked against dicts and sets
in test_engine_model.py). The "cluster" is two Engines splitting the slots, driven the way
the router drives them (shards/router.py, shards/merge.py): follow forwards to the
survivor, and when an identifier belongs to a profile on the other engine, Hold it there,
Absorb it here with the request, Release it there. Hypothesis picks the operations; after
each, every primary id and identifier must resolve to the same profile with the same
contents, and segment counts must agree.
"""

from __future__ import annotations

import uuid
from typing import Any

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from pyroaring import BitMap

from memstore.engine.change import ADD_TO_SET, INCREMENT, SET, Change, UpsertSpec
from memstore.engine.core import Engine
from memstore.errors import FailedPrecondition, Forwarded, NotFound
from memstore.query import parse
from memstore.query.evaluate import count, evaluate
from shards.slots import slot_of

# Ids on both sides of the boundary (shard 0 owns slots 0-8191, shard 1 the rest).
_CANDIDATES = [f"u{i}" for i in range(200)]
SIDE0 = [p for p in _CANDIDATES if slot_of(p) < 8192][:4]
SIDE1 = [p for p in _CANDIDATES if slot_of(p) >= 8192][:4]
PIDS = st.sampled_from(SIDE0 + SIDE1)
IDENTS = st.tuples(st.sampled_from(["email", "device"]), st.sampled_from(["a", "b", "c", "d"]))
OPS = st.one_of(
    st.tuples(st.just(SET), st.just("city"), st.sampled_from(["Oslo", "Rome"])),
    st.tuples(st.just(INCREMENT), st.just("n"), st.integers(1, 5)),
    st.tuples(st.just(ADD_TO_SET), st.just("tags"), st.lists(st.sampled_from("xyz"),
                                                              min_size=1, max_size=2)),
)


def _view(engine: Engine, dense: int | None) -> Any:
    if dense is None:
        return None
    p = engine.profile(dense)
    return (p.id, p.version, p.attributes, sorted(p.identifiers), sorted(p.merged_ids))


class TwoShards:
    def __init__(self) -> None:
        self.engines = [Engine(), Engine()]
        self.engines[0].set_ownership(1, BitMap(range(8192)))
        self.engines[1].set_ownership(1, BitMap(range(8192, 16384)))

    def home(self, pid: str) -> int:
        return 0 if slot_of(pid) < 8192 else 1

    def commit(self, side: int, change: Change) -> Any:
        self.engines[side].apply(change)
        return change.result

    def follow(self, pid: str) -> str:
        while True:
            try:
                self.engines[self.home(pid)].resolve(pid)
                return pid
            except Forwarded as exc:
                pid = exc.survivor

    def lookup(self, pid: str | None = None, ident: tuple[str, str] | None = None) -> Any:
        if ident is not None:
            for engine in self.engines:
                dense = engine.lookup(identifier=ident)
                if dense is not None:
                    return _view(engine, dense)
            return None
        assert pid is not None
        pid = self.follow(pid)
        engine = self.engines[self.home(pid)]
        return _view(engine, engine.lookup(pid))

    def write(self, spec: UpsertSpec) -> None:
        """An Upsert through the router: a cross-shard merge when an identifier it names
        belongs to a profile on the other engine."""
        spec.pid = self.follow(spec.pid)
        side = self.home(spec.pid)
        losers = []
        for ident in spec.identifiers:
            dense = self.engines[1 - side].lookup(identifier=ident)
            if dense is not None:
                loser = self.engines[1 - side].pids[dense]
                if loser not in losers:
                    losers.append(loser)
        if not losers:
            self.commit(side, self.engines[side].plan_upsert(spec))
            return
        txn = uuid.uuid4().hex
        other = self.engines[1 - side]
        exports = [self.commit(1 - side, other.plan_hold(loser, txn, spec.pid))
                   for loser in losers]
        try:
            self.commit(side, self.engines[side].plan_absorb(txn, exports, upsert=spec))
        except FailedPrecondition:
            committed = self.commit(side, self.engines[side].plan_decide(txn, spec.pid))
            assert not committed
            for loser in losers:
                self.commit(1 - side, other.plan_release(loser, txn, committed=False))
            raise
        for loser in losers:
            self.commit(1 - side, other.plan_release(loser, txn, committed=True))

    def delete(self, pid: str) -> None:
        """A Delete through the router: then the other engine forgets the forwards of the
        ids that had merged into the deleted profile."""
        pid = self.follow(pid)
        side = self.home(pid)
        engine = self.engines[side]
        dense = engine.lookup(pid)
        merged = [] if dense is None else engine.profile(dense).merged_ids
        self.commit(side, engine.plan_delete(pid))
        self.commit(1 - side, self.engines[1 - side].plan_forget(merged))

    def count(self, text: str) -> int:
        return sum(count(e, parse(text), unknown_is_empty=True) for e in self.engines)


class MergeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.reference = Engine()
        self.cluster = TwoShards()
        self.pids: set[str] = set()
        self.idents: set[tuple[str, str]] = set()

    @rule(pid=PIDS, ops=st.lists(OPS, max_size=3), idents=st.lists(IDENTS, max_size=2))
    def upsert(self, pid: str, ops: list[Any], idents: list[tuple[str, str]]) -> None:
        want: Exception | None = None
        try:
            self.reference.apply(self.reference.plan_upsert(UpsertSpec(pid, ops, idents)))
        except FailedPrecondition as exc:  # merge protection: too many of a kind
            want = exc
        try:
            self.cluster.write(UpsertSpec(pid, ops, idents))
        except FailedPrecondition as exc:
            assert want is not None, f"cluster refused what one engine accepted: {exc}"
            return
        assert want is None, f"cluster accepted what one engine refused: {want}"
        self.pids.add(pid)
        self.idents.update(idents)

    @rule(pid=PIDS)
    def delete(self, pid: str) -> None:
        if pid not in self.pids:
            return
        self.reference.apply(self.reference.plan_delete(pid))
        self.cluster.delete(pid)

    @invariant()
    def same_answers(self) -> None:
        for pid in self.pids:
            try:
                got = self.cluster.lookup(pid)
            except NotFound:
                got = None
            assert got == _view(self.reference, self.reference.lookup(pid)), pid
        for ident in self.idents:
            got = self.cluster.lookup(ident=ident)
            assert got == _view(self.reference, self.reference.lookup(identifier=ident)), ident
        for engine in self.cluster.engines:
            assert not engine.held and not engine.held_dense
        for text in ('city = "Oslo"', "n > 3", 'tags HAS "x"', "exists(city)"):
            want = len(evaluate(self.reference, parse(text), unknown_is_empty=True))
            assert self.cluster.count(text) == want, text


MergeMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30,
                                          deadline=None)
TestMergeMachine = MergeMachine.TestCase


def _exported_loser(pid: str, idents: list[tuple[str, str]]) -> dict[str, Any]:
    """Hold `pid` on an engine of its own, as the loser's shard would, and return its export."""
    side = Engine()
    side.apply(side.plan_upsert(UpsertSpec(pid, [(SET, "city", "Lima")], idents)))
    change = side.plan_hold(pid, "t1", "s")
    side.apply(change)
    return change.result  # type: ignore[no-any-return]


def test_absorb_merges_a_local_profile_sharing_the_losers_identifier() -> None:
    """Two first links raced: P here and the loser there both hold email:y. The merge must
    leave one owner of email:y, the survivor, with P merged in."""
    engine = Engine()
    engine.apply(engine.plan_upsert(UpsertSpec("s", [(SET, "city", "Oslo")])))
    engine.apply(engine.plan_upsert(UpsertSpec("p", [(INCREMENT, "n", 2)], [("email", "y")])))
    loser = _exported_loser("l", [("email", "x"), ("email", "y")])
    engine.apply(engine.plan_absorb("t1", [loser], link=("s", [("email", "x")], False)))
    survivor = engine.profile(engine.lookup("s"))
    assert sorted(survivor.identifiers) == [("email", "x"), ("email", "y")]
    assert set(survivor.merged_ids) == {"l", "p"}
    assert survivor.attributes["n"] == 2
    assert engine.dense_of.get("p") is None and engine.lookup("p") == engine.lookup("s")
    assert engine.profile(engine.lookup(identifier=("email", "y"))).id == "s"


def test_absorb_keeps_the_decision_under_the_id_the_coordinator_named() -> None:
    """Decide asks by the id the router named (its slot); an alias must not move it."""
    engine = Engine()
    engine.apply(engine.plan_upsert(UpsertSpec("x", [], [("email", "m")])))
    engine.apply(engine.plan_upsert(UpsertSpec("m", [], [])))
    engine.apply(engine.plan_link("x", [("email", "mm")]))
    engine.apply(engine.plan_upsert(UpsertSpec("alias", [], [("email", "a")])))
    engine.apply(engine.plan_link("x", [("email", "a")]))  # "alias" now resolves to x
    loser = _exported_loser("l", [("email", "z")])
    engine.apply(engine.plan_absorb("t1", [loser], link=("alias", [("email", "z")], False)))
    assert engine.decided["t1"] == ["alias", True]
    assert engine.plan_decide("t1", "alias").result is True
