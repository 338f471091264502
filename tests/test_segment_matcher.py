"""The per-profile matcher (memstore.query.match) against evaluate() over the indexes.

Saved segments decide the profiles a write touched with a compiled matcher instead of the
index path; the two must never disagree. The reference is the call the matcher replaces,
`evaluate(engine, node, unknown_is_empty=True, within=...)`: random profiles (attributes of
every kind, often missing), random query trees over them whose literals are often of the
wrong kind, attributes the shard never saw and one declared not indexed. Where the index
path refuses a query, compiling must refuse it too (the segment then keeps using the index
path, which refuses it as before); elsewhere both give the same answer for every profile.

A second test drives `Segments.refresh` in-process through random single writes and
checks every segment's members against evaluating it from scratch after each one.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, given, settings
from pyroaring import BitMap

from memstore.engine.blob import decode
from memstore.engine.change import SET, UNSET, UpsertSpec
from memstore.engine.core import Engine
from memstore.engine.schema import Kind, Merge
from memstore.engine.segments import Touched
from memstore.errors import InvalidArgument
from memstore.query import (
    MAX_DEPTH,
    All,
    And,
    InSegment,
    Node,
    Not,
    Op,
    Or,
    Predicate,
    format_query,
    validate,
)
from memstore.query.evaluate import evaluate
from memstore.query.match import Undecidable, compile_changes, compile_query

T0 = datetime(2024, 1, 1, tzinfo=UTC)
WORDS = ["a", "b", "c"]
# Small domains, so that literals often equal stored values.
VALUES: dict[Kind, st.SearchStrategy[Any]] = {
    Kind.STRING: st.sampled_from(WORDS),
    Kind.INT: st.integers(-3, 3),
    Kind.FLOAT: st.sampled_from([-1.5, -0.0, 0.0, 1.0, 2.0, 2.5]),
    Kind.BOOL: st.booleans(),
    Kind.TIMESTAMP: st.integers(0, 3).map(lambda h: T0 + timedelta(hours=h)),
    Kind.STRING_LIST: st.lists(st.sampled_from(WORDS), max_size=3),
}
KINDS = {"s": Kind.STRING, "i": Kind.INT, "f": Kind.FLOAT, "b": Kind.BOOL,
         "t": Kind.TIMESTAMP, "l": Kind.STRING_LIST}
NOT_INDEXED = "n"  # an int attribute declared not indexed: queries on it are refused
UNKNOWN = "u"  # never declared: matches nobody
# Literals of every kind, whatever the attribute: wrong kinds must be refused alike.
LITERALS = st.one_of(
    st.sampled_from(WORDS),
    st.integers(-3, 3),
    st.sampled_from([-2.5, -1.5, -0.0, 0.0, 0.5, 1.0, 2.0, 2.5, 1e30, -1e30]),
    st.booleans(),
    st.integers(0, 3).map(lambda h: T0 + timedelta(hours=h)),
    st.integers(0, 3).map(lambda h: (T0 + timedelta(hours=h)).isoformat()),
    st.just("2024-01-01T01:30:00Z"),
    st.just("not a time"),
)
ARITY = {Op.EQ: 1, Op.NE: 1, Op.LT: 1, Op.LE: 1, Op.GT: 1, Op.GE: 1, Op.HAS: 1,
         Op.EXISTS: 0, Op.BETWEEN: 2}


# Literals of the attribute's own kind (a timestamp's also as text), as often as not.
OWN: dict[Kind, st.SearchStrategy[Any]] = VALUES | {
    Kind.STRING_LIST: st.sampled_from(WORDS),
    Kind.TIMESTAMP: st.one_of(VALUES[Kind.TIMESTAMP],
                              VALUES[Kind.TIMESTAMP].map(datetime.isoformat)),
}


@st.composite
def predicates(draw: Any) -> Predicate:
    name = draw(st.sampled_from([*KINDS, NOT_INDEXED, UNKNOWN]))
    literal = st.one_of(OWN[KINDS.get(name, Kind.INT)], LITERALS)
    op = draw(st.sampled_from(list(Op)))
    if op is Op.IN:
        values = tuple(draw(st.lists(literal, min_size=1, max_size=3)))
    else:
        values = tuple(draw(literal) for _ in range(ARITY[op]))
    return Predicate(name, op, values)


RANGE_OPS = [Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE, Op.BETWEEN, Op.IN, Op.EXISTS]
OPS_OF = {Kind.INT: RANGE_OPS, Kind.FLOAT: RANGE_OPS, Kind.TIMESTAMP: RANGE_OPS,
          Kind.STRING: [Op.EQ, Op.NE, Op.IN, Op.EXISTS], Kind.BOOL: [Op.EQ, Op.NE, Op.IN],
          Kind.STRING_LIST: [Op.HAS, Op.IN, Op.NE, Op.EXISTS]}


@st.composite
def well_typed(draw: Any) -> Predicate:
    """A predicate a segment can be created with (its literals of the attribute's kind)."""
    name = draw(st.sampled_from(sorted(KINDS)))
    kind = KINDS[name]
    op = draw(st.sampled_from(OPS_OF[kind]))
    count = draw(st.integers(1, 3)) if op is Op.IN else ARITY[op]
    return Predicate(name, op, tuple(draw(OWN[kind]) for _ in range(count)))


def trees(leaf: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    return st.recursive(
        st.one_of(leaf, leaf, st.just(All()), st.just(InSegment("seg"))),
        lambda inner: st.one_of(
            st.lists(inner, min_size=1, max_size=3).map(lambda c: And(tuple(c))),
            st.lists(inner, min_size=1, max_size=3).map(lambda c: Or(tuple(c))),
            inner.map(Not),
        ),
        max_leaves=6,
    )


QUERIES = trees(predicates())
PROFILES = st.lists(
    st.fixed_dictionaries({}, optional={name: VALUES[kind] for name, kind in KINDS.items()}
                          | {NOT_INDEXED: st.integers(-3, 3)}),
    min_size=1, max_size=8,
)


def engine_with(profiles: list[dict[str, Any]], declared: list[str], seg: BitMap | None
                ) -> Engine:
    engine = Engine()
    engine.apply(engine.plan_declare(
        [(name, KINDS[name], True, Merge.DEFAULT) for name in declared]
        + [(NOT_INDEXED, Kind.INT, False, Merge.DEFAULT)]))
    for i, attrs in enumerate(profiles):
        engine.apply(engine.plan_upsert(UpsertSpec(f"p{i}", [(SET, k, v)
                                                              for k, v in attrs.items()])))
    if seg is not None:
        engine.segments.set_definition("seg", ["ALL", 0])
        engine.segments.by_name["seg"].members = seg & engine.live
    return engine


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(profiles=PROFILES, declared=st.lists(st.sampled_from(sorted(KINDS)), unique=True),
       node=QUERIES, seg=st.lists(st.integers(0, 7)).map(BitMap))
def test_the_matcher_answers_as_the_indexes_do(profiles: list[dict[str, Any]],
                                              declared: list[str], node: Node,
                                              seg: BitMap) -> None:
    engine = engine_with(profiles, declared, seg)

    def members(name: str) -> BitMap | None:
        segment = engine.segments.get(name)
        return None if segment is None else segment.members

    try:
        matcher = compile_query(node, engine.schema, members)
    except Undecidable:
        event("refused")
        try:
            evaluate(engine, node, unknown_is_empty=True, within=BitMap(engine.live))
        except InvalidArgument:
            return
        raise AssertionError(f"the indexes answer {format_query(node)}, the matcher refused")
    expected = evaluate(engine, node, unknown_is_empty=True, within=BitMap(engine.live))
    event(f"members: {'none' if not expected else 'all' if expected == engine.live else 'some'}")
    # The same test among others in one function (a write's segments, decided at once):
    # it names the holder whose members disagree with the answer, here always the second.
    agree, disagree = SimpleNamespace(members=expected), SimpleNamespace(
        members=engine.live - expected)
    changes = compile_changes([(node, agree), (node, disagree)], engine.schema, members)
    for dense in engine.live:
        blob = engine.blobs[dense]
        assert blob is not None
        got = matcher(decode(blob)[1], dense)
        assert got == (dense in expected), (format_query(node), dense, decode(blob)[1])
        assert changes(decode(blob)[1], dense) == [1], (format_query(node), dense)


WRITES = st.tuples(
    st.integers(0, 3),  # profile
    st.lists(st.one_of(
        st.sampled_from(sorted(KINDS)).flatmap(
            lambda n: VALUES[KINDS[n]].map(lambda v: (SET, n, v))),
        st.sampled_from(sorted(KINDS)).map(lambda n: (UNSET, n, None)),
    ), min_size=1, max_size=3),
    st.integers(0, 9),  # 0: delete the profile instead; 1, 2: write the next one too
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(queries=st.lists(trees(well_typed()), min_size=1, max_size=5), writes=st.lists(WRITES, min_size=4, max_size=30))
def test_refresh_keeps_every_segment_equal_to_its_query(queries: list[Node],
                                                        writes: list[Any]) -> None:
    """Segments reading each other (seg, then s0 on it, s1 on s0 ..., and one reading the
    last and no attribute), refreshed by random single writes, equal their queries
    evaluated from scratch after every write."""
    engine = engine_with([], sorted(KINDS), BitMap())
    segments = engine.segments
    names = ["seg"]
    for i, node in enumerate(queries):
        node = _rename(node, names[-1])
        try:
            evaluate(engine, node, unknown_is_empty=True, within=BitMap())
        except InvalidArgument:
            continue  # refused at creation
        name = f"s{i}"
        segments.set_definition(name, [format_query(node), 0])
        segments.rebuild(engine, [name])
        names.append(name)
    event(f"segments: {len(names) - 1}")
    # One more that reads no attribute: only its dependency's moves can move it.
    segments.set_definition("follows", [f'in_segment("{names[-1]}")', 0])
    segments.rebuild(engine, ["follows"])
    names.append("follows")
    for n, ops, how in writes:
        pid = f"p{n}"
        if how == 0:
            if engine.lookup(pid) is None:
                continue
            change = engine.plan_delete(pid)
        elif how <= 2:  # two profiles in one change
            change = engine.plan_batch([UpsertSpec(pid, ops), UpsertSpec(f"p{n + 1}", ops)])
        else:
            change = engine.plan_upsert(UpsertSpec(pid, ops))
        touched = Touched()
        engine.apply(change, touched)
        deltas = segments.refresh(engine, touched)
        event(f"segments moved by a write: {min(len(deltas), 2)}")
        for name in names:  # in creation order: each after the one it reads
            segment = segments.by_name[name]
            expected = evaluate(engine, segment.node, unknown_is_empty=True,
                                within=BitMap(engine.live))
            assert segment.members == expected, (name, segment.text)


def _rename(node: Node, to: str) -> Node:
    if isinstance(node, InSegment):
        return InSegment(to)
    if isinstance(node, And):
        return And(tuple(_rename(c, to) for c in node.children))
    if isinstance(node, Or):
        return Or(tuple(_rename(c, to) for c in node.children))
    if isinstance(node, Not):
        return Not(_rename(node.child, to))
    return node


def test_the_deepest_valid_queries_compile_and_agree() -> None:
    """The matcher is one Python expression: the deepest trees `validate` lets through
    (MAX_DEPTH) must still compile, and answer as the indexes do."""
    engine = engine_with([{"i": n} for n in range(-3, 4)] + [{}], ["i"], None)
    for wrap in (Not, lambda n: And((n, Predicate("i", Op.GT, (-3,)))),
                 lambda n: Or((n, Predicate("i", Op.EQ, (3,))))):
        node: Node = Predicate("i", Op.LT, (1,))
        for _ in range(MAX_DEPTH - 1):
            node = wrap(node)
        validate(node)
        matcher = compile_query(node, engine.schema, lambda name: None)
        expected = evaluate(engine, node, unknown_is_empty=True, within=BitMap(engine.live))
        for dense in engine.live:
            blob = engine.blobs[dense]
            assert blob is not None
            assert matcher(decode(blob)[1], dense) == (dense in expected)


# Numbers near where int64 and float64 part ways, as stored values and as literals.
_EDGES = [-(2**63), -(2**63) + 1, -(2**53) - 1, -1, 0, 1, 2**53, 2**53 + 1, 2**63 - 1, 2**63,
          2**64 - 1]
_INT_VALUES = [v for v in _EDGES if -(2**63) <= v < 2**63]
_FLOAT_VALUES = [-(2.0**63), -(2.0**53), -1.0, 0.0, 1.5, 2.0**53, 2.0**63, 1e300]


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from([Kind.INT, Kind.FLOAT]), op=st.sampled_from(
    [Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE, Op.IN, Op.BETWEEN]),
    literals=st.lists(st.sampled_from(_EDGES + [float(v) for v in _EDGES[:-1]] + [0.5, -0.5]),
                      min_size=2, max_size=2))
def test_numbers_compare_as_numbers_at_the_edges_of_int64_and_float64(
        kind: Kind, op: Op, literals: list[Any]) -> None:
    """An int attribute with float literals and a float attribute with int literals:
    both the indexes and the matcher answer as Python compares an int with a float
    (exactly), with no literal rounded on the way (-2.0**63 is INT64_MIN; 2**53 + 1 is no
    float, so `f < 2**53 + 1` holds for 2.0**53)."""
    stored = _INT_VALUES if kind is Kind.INT else _FLOAT_VALUES
    engine = Engine()
    engine.apply(engine.plan_declare([("x", kind, True, Merge.DEFAULT)]))
    for i, value in enumerate(stored):
        engine.apply(engine.plan_upsert(UpsertSpec(f"p{i}", [(SET, "x", value)])))
    values = literals if op in (Op.IN, Op.BETWEEN) else literals[:1]
    node = Predicate("x", op, tuple(values))
    compare = {Op.EQ: lambda x: x == values[0], Op.NE: lambda x: x != values[0],
               Op.LT: lambda x: x < values[0], Op.LE: lambda x: x <= values[0],
               Op.GT: lambda x: x > values[0], Op.GE: lambda x: x >= values[0],
               Op.IN: lambda x: x in values,
               Op.BETWEEN: lambda x: values[0] <= x <= values[1]}[op]
    expected = {f"p{i}" for i, value in enumerate(stored) if compare(value)}
    assert set(engine.ids_of(evaluate(engine, node))) == expected, format_query(node)
    matcher = compile_query(node, engine.schema, lambda name: None)
    matched = {engine.pids[d] for d in engine.live
               if matcher(decode(engine.blobs[d])[1], d)}  # type: ignore[arg-type]
    assert matched == expected, format_query(node)


# Stored timestamps (microseconds from the epoch) and literals around them in nanoseconds,
# some finer than a microsecond (the text form takes up to 9 fractional digits).
_STORED_MICROS = [-1, 0, 1, 1_000_000, 253_402_300_799_999_999]  # ... to 9999-12-31
_LITERAL_NANOS = [m * 1000 + d for m in _STORED_MICROS for d in (-1, 0, 1, 999)
                  if -62_135_596_800_000_000_000 <= m * 1000 + d <= 253_402_300_799_999_999_999]


def _nanos_text(nanos: int) -> str:
    seconds, rest = divmod(nanos, 1_000_000_000)
    at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    return f"{at.year:04d}-{at:%m-%dT%H:%M:%S}.{rest:09d}Z"


@settings(max_examples=300, deadline=None)
@given(op=st.sampled_from([Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE, Op.IN, Op.BETWEEN]),
       literals=st.lists(st.sampled_from(_LITERAL_NANOS), min_size=2, max_size=2),
       proto=st.booleans())
def test_timestamps_compare_exactly_with_literals_finer_than_a_microsecond(
        op: Op, literals: list[int], proto: bool) -> None:
    """A literal with 7 to 9 fractional digits (or a Timestamp's nanos) lies between two
    stored microseconds: the indexes and the matcher compare with it exactly, as the
    numbers compare (`t < "...00.0000001"` holds for t at ...00), not with it cut."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from memstore.query.proto import from_proto
    from memstore.v1 import memstore_pb2 as pb

    engine = Engine()
    engine.apply(engine.plan_declare([("t", Kind.TIMESTAMP, True, Merge.DEFAULT)]))
    for i, micros in enumerate(_STORED_MICROS):
        at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
        engine.apply(engine.plan_upsert(UpsertSpec(f"p{i}", [(SET, "t", at)])))
    nanos = literals if op in (Op.IN, Op.BETWEEN) else literals[:1]
    node: Node = Predicate("t", op, tuple(map(_nanos_text, nanos)))
    if proto:  # the same literals as Timestamps with nanos
        node = from_proto(pb.Query(predicate=pb.Predicate(
            attribute="t", op=pb.Predicate.Op.Value(op.name),
            values=[pb.Value(timestamp_value=Timestamp(seconds=n // 10**9, nanos=n % 10**9))
                    for n in nanos])))
    compare = {Op.EQ: lambda x: x == nanos[0], Op.NE: lambda x: x != nanos[0],
               Op.LT: lambda x: x < nanos[0], Op.LE: lambda x: x <= nanos[0],
               Op.GT: lambda x: x > nanos[0], Op.GE: lambda x: x >= nanos[0],
               Op.IN: lambda x: x in nanos,
               Op.BETWEEN: lambda x: nanos[0] <= x <= nanos[1]}[op]
    expected = {f"p{i}" for i, micros in enumerate(_STORED_MICROS) if compare(micros * 1000)}
    assert set(engine.ids_of(evaluate(engine, node))) == expected, format_query(node)
    matcher = compile_query(node, engine.schema, lambda name: None)
    matched = {engine.pids[d] for d in engine.live
               if matcher(decode(engine.blobs[d])[1], d)}  # type: ignore[arg-type]
    assert matched == expected, format_query(node)


def test_a_wrong_kind_literal_beside_numbers_is_the_one_named() -> None:
    import pytest

    engine = Engine()
    engine.apply(engine.plan_upsert(UpsertSpec("a", [(SET, "n", 1), (SET, "f", 1.5)])))
    for attribute, values, named in (("n", (1.5, "x"), "string literal 'x'"),
                                     ("f", (1, "y"), "string literal 'y'"),
                                     ("n", (1.5, 1, True), "bool literal True")):
        with pytest.raises(InvalidArgument, match=named):
            evaluate(engine, Predicate(attribute, Op.IN, values))
