"""What queries skip doing without changing an answer: a query text asked again is not
parsed again, and a count of a saved segment counts its members where they are."""

from __future__ import annotations

import pytest
from pyroaring import BitMap

from memstore.engine.change import SET, UpsertSpec
from memstore.engine.core import Engine
from memstore.engine.schema import Kind, Merge
from memstore.hashslot import slot_of
from memstore.query import QueryError, QueryLimits, parse
from memstore.query.evaluate import count, evaluate
from memstore.query.proto import PARSED_TEXT_BYTES, query_from_request
from memstore.v1 import memstore_pb2 as pb

QUERIES = ['in_segment("s")', 'NOT in_segment("s")', "n >= 3", 'c = "x" OR n < 2', "ALL",
           'in_segment("s") AND c = "y"', "missing = 1"]


def test_counts_of_segments_are_what_evaluate_returns_and_leave_members_alone() -> None:
    engine = Engine()
    engine.apply(engine.plan_declare([("n", Kind.INT, True, Merge.DEFAULT),
                                      ("c", Kind.STRING, True, Merge.DEFAULT)]))
    for i in range(40):
        engine.apply(engine.plan_upsert(UpsertSpec(f"p{i}", [(SET, "n", i % 7),
                                                             (SET, "c", "xy"[i % 2])])))
    engine.segments.set_definition("s", ["n >= 2", 0])
    engine.segments.rebuild(engine)
    members = BitMap(engine.segments.by_name["s"].members)
    owned = BitMap(slot_of(f"p{i}") for i in range(0, 40, 3))
    for slots in (None, owned):  # every slot, then some: counts leave foreign profiles out
        engine.set_ownership(1, slots)
        for text in QUERIES:
            node = parse(text)
            assert count(engine, node, unknown_is_empty=True) == len(
                evaluate(engine, node, unknown_is_empty=True)), (text, slots)
    assert engine.segments.by_name["s"].members == members


def test_a_text_asked_again_is_parsed_once_and_checked_against_the_callers_limits() -> None:
    text = 'in_segment("again") AND n IN (1, 2, 3)'
    first = query_from_request(pb.QueryRequest(text=text))
    assert query_from_request(pb.QueryRequest(text=text)) is first
    with pytest.raises(QueryError):  # the same text over smaller limits is refused
        query_from_request(pb.QueryRequest(text=text), limits=QueryLimits(max_items=2))
    for _ in range(2):  # an error is not remembered as an answer
        with pytest.raises(QueryError):
            query_from_request(pb.QueryRequest(text="n >="))
    long = " OR ".join(f"n = {i}" for i in range(PARSED_TEXT_BYTES // 8))
    assert len(long) > PARSED_TEXT_BYTES
    assert query_from_request(pb.QueryRequest(text=long)) is not query_from_request(
        pb.QueryRequest(text=long))
