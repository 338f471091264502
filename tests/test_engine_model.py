"""The engine against a plain reference model (dicts and sets), driven by hypothesis.

After every step the engine must answer exactly as the model: profile contents and
versions, identifier resolution, merged-id aliases, every segment query, and the value
and range indexes bitmap by bitmap (so a delete or a merge leaves no stale bitmap).

Random steps alone rarely merge two profiles that both hold an attribute, so a rule of its
own makes such merges: two profiles get different values of one scalar attribute and are
merged, and the attribute's merge rule (the survivor's value by default) must decide.
`hypothesis.event` labels the cases that matter; see them with
`pytest tests/test_engine_model.py -k TestEngineModel --hypothesis-show-statistics`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from memstore.client.core import pack_records
from memstore.engine.bulk import _already_sorted_sets
from memstore.engine.change import (
    ADD_TO_SET,
    INCREMENT,
    REMOVE_FROM_SET,
    SET,
    SET_ONCE,
    UNSET,
    UpsertSpec,
    record_specs,
)
from memstore.engine.columnar import CODE_SHARE, unpack_columns
from memstore.engine.core import Engine
from memstore.engine.identity import IdentityRules
from memstore.engine.schema import Kind, Merge
from memstore.errors import FailedPrecondition, InvalidArgument
from memstore.hashslot import SLOT_COUNT, slot_of
from memstore.query import And, Not, Op, Or, Predicate, QueryError, parse
from memstore.query.evaluate import count, evaluate

T0 = datetime(2024, 1, 1, tzinfo=UTC)
PIDS = st.sampled_from([f"p{i}" for i in range(8)])
COUNTRIES = st.sampled_from(["US", "CA", "DE", "FR"])
TAGS = st.sampled_from(["a", "b", "c", "d"])
IDENTS = st.tuples(st.sampled_from(["email", "device"]),
                   st.sampled_from(["x", "y", "z", "w", "null"]))
ATTR_VALUES: dict[str, Any] = {
    "country": COUNTRIES,
    "age": st.integers(-5, 120),
    "score": st.floats(-1e6, 1e6, allow_nan=False),
    "vip": st.booleans(),
    "seen": st.integers(0, 1000).map(lambda h: T0 + timedelta(hours=h)),
    "orders": st.integers(0, 50),
    "tags": st.lists(TAGS, max_size=3),
}
MAX_PER_KIND = 2
SCALARS = ["age", "country", "orders", "score", "seen", "vip"]
VALUE_INDEXED = ["country", "tags", "vip"]  # the rest are range-indexed


def _matches(op: Op, have: Any, values: tuple[Any, ...]) -> bool:
    if op is Op.EXISTS:
        return have is not None
    if have is None:
        return False
    if op is Op.HAS:
        return values[0] in have
    if isinstance(have, list):
        return any(v in have for v in values)  # IN on a list
    v = values[0]
    return {
        Op.EQ: lambda: have == v, Op.NE: lambda: have != v, Op.IN: lambda: have in values,
        Op.LT: lambda: have < v, Op.LE: lambda: have <= v, Op.GT: lambda: have > v,
        Op.GE: lambda: have >= v, Op.BETWEEN: lambda: values[0] <= have <= values[1],
    }[op]()


@st.composite
def predicates(draw: Any) -> Predicate:
    name = draw(st.sampled_from(sorted(ATTR_VALUES)))
    if name == "tags":
        op = draw(st.sampled_from([Op.HAS, Op.IN, Op.EXISTS]))
        if op is Op.EXISTS:
            return Predicate(name, op)
        if op is Op.HAS:
            return Predicate(name, op, (draw(TAGS),))
        return Predicate(name, op, tuple(draw(st.lists(TAGS, min_size=1, max_size=2))))
    strat = ATTR_VALUES[name]
    ops = [Op.EQ, Op.NE, Op.IN, Op.EXISTS]
    if name not in ("country", "vip"):
        ops += [Op.LT, Op.LE, Op.GT, Op.GE, Op.BETWEEN]
    op = draw(st.sampled_from(ops))
    if op is Op.EXISTS:
        return Predicate(name, op)
    if op is Op.BETWEEN:
        a, b = sorted([draw(strat), draw(strat)])
        return Predicate(name, op, (a, b))
    if op is Op.IN:
        return Predicate(name, op, tuple(draw(st.lists(strat, min_size=1, max_size=3))))
    return Predicate(name, op, (draw(strat),))


queries = st.recursive(
    predicates(),
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda c: And(tuple(c))),
        st.lists(inner, min_size=1, max_size=3).map(lambda c: Or(tuple(c))),
        inner.map(Not),
    ),
    max_leaves=5,
)


class EngineModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.engine = Engine(IdentityRules(max_per_kind=MAX_PER_KIND))
        self.engine.apply(self.engine.plan_declare([
            ("country", Kind.STRING, True, Merge.DEFAULT), ("age", Kind.INT, True, Merge.MAX),
            ("score", Kind.FLOAT, True, Merge.DEFAULT), ("vip", Kind.BOOL, True, Merge.DEFAULT),
            ("seen", Kind.TIMESTAMP, True, Merge.MIN), ("orders", Kind.INT, True, Merge.SUM),
            ("tags", Kind.STRING_LIST, True, Merge.DEFAULT),
        ]))
        self.profiles: dict[str, dict[str, Any]] = {}  # pid -> attrs
        self.versions: dict[str, int] = {}
        self.idents: dict[tuple[str, str], str] = {}  # identifier -> owner pid
        self.aliases: dict[str, str] = {}  # merged-away pid -> survivor
        self.merges = 0  # numbers the identifier kinds merge_with_conflict makes

    def resolve(self, pid: str) -> str:
        if pid in self.profiles:
            return pid
        return self.aliases.get(pid, pid)

    # ------------------------------------------------------------------ writes
    @rule(pid=PIDS, name=st.sampled_from(sorted(ATTR_VALUES)), data=st.data(),
          once=st.booleans())
    def set_attr(self, pid: str, name: str, data: Any, once: bool) -> None:
        self._set(pid, name, data.draw(ATTR_VALUES[name]), once)

    def _set(self, pid: str, name: str, value: Any, once: bool = False) -> None:
        self.engine.apply(self.engine.plan_upsert(
            UpsertSpec(pid, [(SET_ONCE if once else SET, name, value)])))
        target = self.resolve(pid)
        attrs = self.profiles.setdefault(target, {})
        self.versions[target] = self.versions.get(target, 0) + 1
        if once:
            event(f"set_once on {'a present' if name in attrs else 'an absent'} attribute")
        if name == "tags":
            value = sorted(set(value)) or None
        if once and name in attrs:
            return
        if value is None:
            attrs.pop(name, None)
        else:
            attrs[name] = value

    @rule(pid=PIDS, name=st.sampled_from(sorted(ATTR_VALUES)))
    def unset(self, pid: str, name: str) -> None:
        self.engine.apply(self.engine.plan_upsert(UpsertSpec(pid, [(UNSET, name, None)])))
        target = self.resolve(pid)
        self.profiles.setdefault(target, {}).pop(name, None)
        self.versions[target] = self.versions.get(target, 0) + 1

    @rule(pid=PIDS, by=st.integers(-3, 3))
    def increment(self, pid: str, by: int) -> None:
        self.engine.apply(self.engine.plan_upsert(UpsertSpec(pid, [(INCREMENT, "orders", by)])))
        target = self.resolve(pid)
        attrs = self.profiles.setdefault(target, {})
        attrs["orders"] = attrs.get("orders", 0) + by
        self.versions[target] = self.versions.get(target, 0) + 1

    @rule(pid=PIDS, tags=st.lists(TAGS, min_size=1, max_size=2), add=st.booleans())
    def change_set(self, pid: str, tags: list[str], add: bool) -> None:
        op = ADD_TO_SET if add else REMOVE_FROM_SET
        self.engine.apply(self.engine.plan_upsert(UpsertSpec(pid, [(op, "tags", tags)])))
        target = self.resolve(pid)
        attrs = self.profiles.setdefault(target, {})
        current = set(attrs.get("tags", ()))
        current = current | set(tags) if add else current - set(tags)
        if current:
            attrs["tags"] = sorted(current)
        else:
            attrs.pop("tags", None)
        self.versions[target] = self.versions.get(target, 0) + 1

    @rule(pid=PIDS, idents=st.lists(IDENTS, min_size=1, max_size=2))
    def link(self, pid: str, idents: list[tuple[str, str]]) -> None:
        self._link(pid, idents)

    def _link(self, pid: str, idents: list[tuple[str, str]]) -> bool:
        """Link; True if the engine (and the model) accepted it."""
        conflicts: list[str] = []
        expected = self._model_link(pid, idents, conflicts)
        try:
            self.engine.apply(self.engine.plan_link(pid, idents, create=True))
        except FailedPrecondition:
            assert expected is None, "engine refused a link the model accepts"
            return False
        assert expected is not None, "engine accepted a link the model refuses"
        self.profiles, self.versions, self.idents, self.aliases = expected
        for name in conflicts:
            event(f"merge of two different {name} values")
        return True

    @rule(a=PIDS, b=PIDS, name=st.sampled_from(SCALARS), data=st.data())
    def merge_with_conflict(self, a: str, b: str, name: str, data: Any) -> None:
        """`a` and `b` hold different values of `name`; then `b` is merged into `a` through
        an identifier only `b` holds (its kind is new, so no per-kind limit is met)."""
        if self.resolve(a) == self.resolve(b):
            return
        mine = data.draw(ATTR_VALUES[name], label="survivor's value")
        theirs = data.draw(ATTR_VALUES[name].filter(lambda v: v != mine), label="loser's value")
        self._set(a, name, mine)
        self._set(b, name, theirs)
        self.merges += 1
        ident = (f"m{self.merges}", "v")
        assert self._link(b, [ident])  # a new kind: nothing limits or refuses it
        merged = self._link(a, [ident])
        event("merge_with_conflict: merged" if merged else
              "merge_with_conflict: refused by merge protection")

    def _model_link(self, pid: str, idents: list[tuple[str, str]],
                    conflicts: list[str]) -> Any:
        profiles = {k: dict(v) for k, v in self.profiles.items()}
        versions = dict(self.versions)
        owners = dict(self.idents)
        aliases = dict(self.aliases)
        target = self.resolve(pid)
        profiles.setdefault(target, {})
        versions.setdefault(target, 0)
        for ident in idents:
            if ident[1] == "null":
                return None
            owner = owners.get(ident)
            if owner is not None and owner != target:
                other = profiles.pop(owner)
                mine = profiles[target]
                conflicts += [name for name in SCALARS
                              if name in mine and name in other and mine[name] != other[name]]
                for name, value in other.items():
                    if name not in mine:
                        mine[name] = value
                    elif name == "tags":
                        mine[name] = sorted(set(mine[name]) | set(value))
                    elif name == "orders":
                        mine[name] += value
                    elif name == "age":
                        mine[name] = max(mine[name], value)
                    elif name == "seen":
                        mine[name] = min(mine[name], value)
                for key, who in list(owners.items()):
                    if who == owner:
                        owners[key] = target
                for key, who in list(aliases.items()):
                    if who == owner:
                        aliases[key] = target
                aliases[owner] = target
                versions[target] = max(versions[target], versions.pop(owner))
            owners[ident] = target
        for kind in {k for k, _ in owners}:
            if sum(1 for (k, _), who in owners.items() if who == target and k == kind) \
                    > MAX_PER_KIND:
                return None
        versions[target] += 1
        return profiles, versions, owners, aliases

    @rule(pid=PIDS)
    def delete(self, pid: str) -> None:
        self.engine.apply(self.engine.plan_delete(pid))
        target = self.resolve(pid)
        if target not in self.profiles:
            return
        if "tags" in self.profiles[target]:
            event("delete of a profile holding a list")
        del self.profiles[target]
        del self.versions[target]
        self.idents = {k: v for k, v in self.idents.items() if v != target}
        self.aliases = {k: v for k, v in self.aliases.items() if v != target}

    # ------------------------------------------------------------------ checks
    @rule(query=queries)
    def query(self, query: Any) -> None:
        got = set(self.engine.ids_of(evaluate(self.engine, query)))
        assert got == {pid for pid in self.profiles if self._eval(query, self.profiles[pid])}
        assert count(self.engine, query) == len(got)

    def _eval(self, node: Any, attrs: dict[str, Any]) -> bool:
        if isinstance(node, Predicate):
            return _matches(node.op, attrs.get(node.attribute), node.values)
        if isinstance(node, And):
            return all(self._eval(c, attrs) for c in node.children)
        if isinstance(node, Or):
            return any(self._eval(c, attrs) for c in node.children)
        return not self._eval(node.child, attrs)

    @invariant()
    def profiles_agree(self) -> None:
        engine = self.engine
        assert len(engine) == len(self.profiles)
        for pid, attrs in self.profiles.items():
            dense = engine.lookup(pid)
            assert dense is not None
            profile = engine.profile(dense)
            assert profile.attributes == attrs
            assert profile.version == self.versions[pid]
        for ident, owner in self.idents.items():
            dense = engine.lookup(identifier=ident)
            assert dense is not None and engine.pids[dense] == owner
        for alias, survivor in self.aliases.items():
            dense = engine.lookup(alias)
            assert dense is not None and engine.pids[dense] == survivor
        some = range(0, SLOT_COUNT, 3)  # what a slot move exports
        assert sorted(engine.ids_of(engine.members_of_slots(some))) == sorted(
            pid for pid in self.profiles if slot_of(pid) % 3 == 0)

    @invariant()
    def indexes_agree(self) -> None:
        """Every bitmap of every index holds exactly the live profiles with that value."""
        engine = self.engine
        for name in ATTR_VALUES:
            aid = engine.schema.by_name[name].id
            holders = {pid for pid, attrs in self.profiles.items() if name in attrs}
            if name not in VALUE_INDEXED:
                assert set(engine.ids_of(engine.range_index[aid].exists())) == holders
                continue
            assert set(engine.ids_of(engine.exists[aid])) == holders
            want: dict[Any, set[str]] = {}
            for pid in holders:
                value = self.profiles[pid][name]
                for item in value if name == "tags" else [value]:
                    want.setdefault(item, set()).add(pid)
            assert {value: set(engine.ids_of(bitmap)) for value, bitmap in
                    engine.value_index[aid].items()} == want, f"{name} bitmaps"


EngineModel.TestCase.settings = settings(max_examples=110, stateful_step_count=40,
                                         deadline=None)
TestEngineModel = EngineModel.TestCase


def test_set_once_sets_an_absent_attribute_and_keeps_a_present_one() -> None:
    engine = Engine()

    def attrs() -> dict[str, Any]:
        return engine.profile(engine.lookup("p")).attributes  # type: ignore[arg-type]

    engine.apply(engine.plan_upsert(UpsertSpec("p", [(SET_ONCE, "first", "web")])))
    assert attrs() == {"first": "web"}
    engine.apply(engine.plan_upsert(UpsertSpec("p", [(SET_ONCE, "first", "app"),
                                                     (SET_ONCE, "n", 1)])))
    assert attrs() == {"first": "web", "n": 1}
    assert engine.profile(engine.lookup("p")).version == 2  # type: ignore[arg-type]
    engine.apply(engine.plan_upsert(UpsertSpec("p", [(UNSET, "first", None),
                                                     (SET_ONCE, "first", "app")])))
    assert attrs() == {"first": "app", "n": 1}  # absent again, so set
    assert len(evaluate(engine, parse('first = "web"'))) == 0
    assert len(evaluate(engine, parse('first = "app"'))) == 1


# ---------------------------------------------------------------------- the bulk-load path

ROWS = st.lists(st.tuples(
    st.sampled_from([f"p{i}" for i in range(12)] + [""]),
    st.fixed_dictionaries({}, optional={
        "country": COUNTRIES, "tags": st.lists(TAGS, max_size=3),
        # int64's edges and past them (as far as msgpack carries); a NaN (refused)
        "age": st.one_of(st.integers(-5, 120), st.sampled_from(
            [2**63 - 1, -(2**63), 2**63, 2**64 - 1])),
        "seen": ATTR_VALUES["seen"], "vip": st.booleans(),
        "score": st.one_of(ATTR_VALUES["score"], st.just(float("nan"))),
        # not declared: the first write decides its kind, a later other kind is refused
        "nps": st.one_of(st.integers(0, 10), st.just("ten")),
        "when": st.one_of(ATTR_VALUES["seen"], st.just(datetime.max.replace(tzinfo=UTC)))}),
    st.lists(st.one_of(IDENTS, st.sampled_from([("email", ""), ("Bad Kind", "v")])),
             max_size=2, unique=True)), max_size=8)
# Batches the fast path takes (new ids, unclaimed identifiers) unless a value is refused.
FRESH = ROWS.map(lambda rows: [(f"n{i}" if pid else "", attrs,
                                [(k, v if v in ("", "null") else f"{v}{i}")
                                 for k, v in idents])
                               for i, (pid, attrs, idents) in enumerate(rows)])


def _load_columns(engine: Engine, rows: Any, wire: str) -> Any:
    """The columnar wire path: the client's pack, the server's unpack, plan_columns.

    "columns" is what the Python client sends; "coded columns" codes every string and
    string-list column it can (Coded); "unsorted ..." sends string lists as the rows hold
    them, unsorted and with repeats, as another writer may."""
    from memstore.engine.columnar import Coded

    records = [{"id": p, "attributes": a, "identifiers": i} for p, a, i in rows]
    share = {"columns": CODE_SHARE, "coded columns": 1.0, "unsorted columns": 0.0,
             "unsorted coded columns": 1.0}[wire]
    batch = unpack_columns(pack_records(records, code_share=share))
    if wire.startswith("unsorted"):
        for name, column in batch.attributes.items():
            lists = [attrs.get(name) for _, attrs, _ in rows]
            if not any(isinstance(v, list) for v in lists):
                continue
            batch.attributes[name] = lists
            if isinstance(column, Coded) and [] not in lists:  # its dictionary falling, too
                values = sorted({item for v in lists if v for item in v}, reverse=True)
                at = {item: i for i, item in enumerate(values)}
                batch.attributes[name] = Coded(
                    values, np.array([at[item] for v in lists if v for item in v], np.int32),
                    np.array([len(v or ()) for v in lists], np.int32))
    return engine.plan_columns(batch)


@settings(max_examples=250, deadline=None)
@given(before=ROWS, rows=st.one_of(ROWS, FRESH),
       wire=st.sampled_from(["rows", "columns", "coded columns", "unsorted columns",
                             "unsorted coded columns"]))
def test_load_fast_path_equals_the_general_planner(before: Any, rows: Any, wire: str) -> None:
    """plan_load (rows) and plan_columns (the columnar wire form, timestamps as int
    microseconds) must leave exactly the state plan_batch does, or refuse what it refuses."""
    fast, slow = Engine(IdentityRules(max_per_kind=MAX_PER_KIND)), Engine(
        IdentityRules(max_per_kind=MAX_PER_KIND))

    def specs(rs: Any) -> list[UpsertSpec]:
        return [UpsertSpec(pid, [(SET, k, v) for k, v in attrs.items()], idents)
                for pid, attrs, idents in rs]

    for engine in (fast, slow):
        engine.apply(engine.plan_declare([(n, k, True, Merge.DEFAULT) for n, k in (
            ("country", Kind.STRING), ("age", Kind.INT), ("tags", Kind.STRING_LIST),
            ("seen", Kind.TIMESTAMP), ("vip", Kind.BOOL))]))
        try:
            engine.apply(engine.plan_batch(specs(before)))
        except (FailedPrecondition, InvalidArgument):
            pass
    outcomes = []
    for engine, plan in ((fast, lambda: fast.plan_load(rows) if wire == "rows"
                          else _load_columns(fast, rows, wire)),
                         (slow, lambda: slow.plan_batch(specs(rows)))):
        try:
            engine.apply(plan())
            outcomes.append("ok")
        except (FailedPrecondition, InvalidArgument) as exc:
            outcomes.append(type(exc).__name__)
    assert outcomes[0] == outcomes[1]
    assert {p: fast.profile(d) for p, d in fast.dense_of.items()} == {
        p: slow.profile(d) for p, d in slow.dense_of.items()}
    assert dict(fast.directory.items()) == dict(slow.directory.items())
    assert [(s.name, s.kind) for s in fast.schema.by_id] == [
        (s.name, s.kind) for s in slow.schema.by_id]
    for text in ('country = "US"', "age >= 30", 'tags HAS "a"', "exists(seen)", "vip = true",
                 "exists(tags)", "score > 0.5", 'seen >= "2024-01-10T00:00:00Z"',
                 "exists(nps)", "exists(when)"):
        try:
            q = parse(text)
            want = set(slow.ids_of(evaluate(slow, q)))
        except (QueryError, InvalidArgument):  # an attribute no row declared
            continue
        assert set(fast.ids_of(evaluate(fast, q))) == want


@pytest.mark.parametrize("grouped_from", [1, 10**9])
@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.fixed_dictionaries({}, optional={
    "country": COUNTRIES, "vip": st.booleans(), "age": st.integers(0, 3),
    "tags": st.lists(TAGS, min_size=1, max_size=3)}), min_size=1, max_size=60),
    unsorted=st.booleans())
def test_coded_columns_load_exactly_like_plain_ones(grouped_from: int, rows: Any,
                                                    unsorted: bool) -> None:
    """A batch sent coded (Coded) leaves the state the same batch sent plain does, whether
    add_coded updates a value's ids at once or adds them one by one, and whether the
    writer sent its lists sorted or not."""
    from memstore.engine.columnar import Coded
    from memstore.index.bitmap_index import ValueIndex

    records = [{"id": f"p{i}", "attributes": attrs, "identifiers": [("email", f"e{i}")]}
               for i, attrs in enumerate(rows)]
    engines = []
    for share in (0.0, 1.0):
        batch = unpack_columns(pack_records(records, code_share=share))
        tags = batch.attributes.get("tags")
        if unsorted and isinstance(tags, Coded):  # falling, with the rows' repeats
            lists = [sorted(attrs.get("tags", ()), reverse=True) for attrs in rows]
            at = {v: i for i, v in enumerate(tags.values)}
            batch.attributes["tags"] = Coded(tags.values, np.array(
                [at[v] for items in lists for v in items], np.int32),
                np.array(list(map(len, lists)), np.int32))
        engine = Engine()
        change = engine.plan_columns(batch)
        assert change.load is not None  # the fast path, both ways
        old = ValueIndex.GROUPED_FROM
        ValueIndex.GROUPED_FROM = grouped_from
        try:
            engine.apply(change)
        finally:
            ValueIndex.GROUPED_FROM = old
        engines.append(engine)
    plain, coded = engines
    assert plain.blobs == coded.blobs
    for name in ("country", "vip", "tags"):
        spec = plain.schema.get(name)
        if spec is None:
            continue
        assert {v: list(b) for v, b in plain.value_index[spec.id].items()} == {
            v: list(b) for v, b in coded.value_index[spec.id].items()}
        assert plain.exists[spec.id] == coded.exists[spec.id]


@pytest.mark.parametrize("values", [
    [["b", "a"], ["c"]],  # lists, each coded as one value (not per item, as lengths would)
    [["a"], ["a", "b"]],
    [{"x": 1}, {"y": 2}],  # no kind at all
    [1, True],  # True == 1: one bitmap, two kinds
    ["a", "a"],  # a value twice in the dictionary
])
def test_odd_coded_columns_load_like_the_general_planner(values: list[Any]) -> None:
    """What another writer may code: the fast path gives the general planner's result, or
    its error, never a crash."""
    from memstore.engine.columnar import Coded, Columns

    def batch() -> Columns:
        return Columns(["p", "q", "r"], {"c": Coded(values, np.array([1, -1, 0], np.int32))},
                       [[], [], []])

    outcomes = []
    engines = (Engine(), Engine())
    for engine, plan in ((engines[0], lambda: engines[0].plan_columns(batch())),
                         (engines[1], lambda: engines[1].plan_batch(
                             record_specs(batch().rows(), "columns")))):
        try:
            engine.apply(plan())
            outcomes.append("ok")
        except InvalidArgument as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]
    fast, slow = engines
    assert {p: fast.profile(d) for p, d in fast.dense_of.items()} == {
        p: slow.profile(d) for p, d in slow.dense_of.items()}
    spec = slow.schema.get("c")
    if spec is not None and spec.indexed:
        assert {v: list(b) for v, b in fast.value_index[spec.id].items()} == {
            v: list(b) for v, b in slow.value_index[spec.id].items()}


@given(st.lists(st.lists(st.sampled_from(["a", "b", "c", "é"]), max_size=4), max_size=6))
def test_the_loads_check_for_stored_lists_agrees_with_sorting_them(lists: list[list[str]]
                                                                   ) -> None:
    """plan_columns sorts a column's lists only when this check says one is not sorted
    without repeats; its neighbours' order (["c"], ["a"]) must not count."""
    assert _already_sorted_sets(lists) == all(items == sorted(set(items)) for items in lists)


def test_load_declares_attributes_in_the_order_the_general_planner_meets_them() -> None:
    """A columnar batch from any writer (columns in any order) gets the same attribute ids
    on the fast path as on the general one: by first record, then column order."""
    from memstore.engine.columnar import Columns

    batch = Columns(["a", "b"], {"y": [None, 1], "x": [1, None], "w": [None, 2]}, [[], []])
    fast, slow = Engine(), Engine()
    fast.apply(fast.plan_columns(batch))
    slow.apply(slow.plan_batch(record_specs(batch.rows(), "columns")))
    assert [s.name for s in fast.schema.by_id] == [s.name for s in slow.schema.by_id] == [
        "x", "y", "w"]


def test_track_refuses_a_time_no_reader_could_turn_back_into_a_date() -> None:
    engine = Engine()
    for at in (10**18, 2**63 + 10**6, -(10**18)):
        with pytest.raises(InvalidArgument, match="years 1 to 9999"):
            engine.plan_track("p", "visit", at)
    assert len(engine) == 0


@given(st.integers(min_value=0, max_value=2**64 - 1),
       st.dictionaries(st.integers(0, 5000), st.one_of(
           st.text(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False), st.booleans(),
           st.lists(st.text(), max_size=3))), st.lists(st.text(), max_size=2))
def test_blobs_are_the_bytes_msgpack_writes(version: int, attrs: dict[int, Any],
                                            merged: list[str]) -> None:
    """Blobs are written with ormsgpack for speed; they must stay plain msgpack, byte for
    byte, so every reader (and version_of) keeps working on old and new blobs alike."""
    import msgpack

    from memstore.engine.blob import decode, encode

    blob = encode(version, attrs, [["email", "a@b"]], merged)
    assert blob == msgpack.packb([version, attrs, [["email", "a@b"]], merged])
    assert decode(blob) == [version, attrs, [["email", "a@b"]], merged]
    import numpy as np  # a float subclass ormsgpack refuses still encodes, the same way

    assert encode(1, {0: np.float64(1.5)}, [], []) == msgpack.packb([1, {0: 1.5}, [], []])


@given(st.integers(min_value=0, max_value=2**64 - 1),
       st.dictionaries(st.integers(0, 50), st.text(max_size=5), max_size=3))
def test_version_of_reads_the_version_without_decoding(version: int, attrs: dict[int, str]
                                                        ) -> None:
    from memstore.engine.blob import encode, version_of

    assert version_of(encode(version, attrs, [["email", "a@b"]], [])) == version
