"""Bitmap indexes against plain dicts: every query after every step (hypothesis)."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from pyroaring import BitMap

from memstore.index.bitmap_index import (
    RangeIndex,
    ValueIndex,
    _bit_planes,
    _bit_rows,
    float_to_ordered,
    floats_to_ordered,
    ordered_to_float,
)

IDS = st.integers(0, 60)
INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-50, 50),
                  st.sampled_from([-(2**63), 2**63 - 1, 0]))
OPS = ["eq", "ne", "lt", "le", "gt", "ge"]
WITHIN = st.none() | st.sets(st.integers(0, 100))  # the ids a query asks about, or all


def expect(op: str, have: int, c: int) -> bool:
    return {"eq": have == c, "ne": have != c, "lt": have < c, "le": have <= c,
            "gt": have > c, "ge": have >= c}[op]


class SmallBuffer(RangeIndex):
    """Bulk values wait in the buffer across steps, and overflow it now and then."""

    __slots__ = ()
    PENDING_LIMIT = 30
    REPLACING_LIMIT = 30


class RangeModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.index = SmallBuffer()
        self.model: dict[int, int] = {}

    @rule(dense=st.integers(0, 100), value=INT64)  # bulk-loaded ids too, pending or not
    def set(self, dense: int, value: int) -> None:
        self.index.set(dense, value, self.model.get(dense))
        self.model[dense] = value

    @rule(dense=st.integers(0, 100))
    def remove(self, dense: int) -> None:
        if dense in self.model:
            self.index.remove(dense, self.model.pop(dense))

    @rule(ids=st.lists(st.integers(61, 100), unique=True, max_size=20),
          data=st.data())
    def bulk(self, ids: list[int], data: st.DataObject) -> None:
        fresh = [i for i in ids if i not in self.model]
        values = [data.draw(INT64) for _ in fresh]
        self.index.set_many(np.array(fresh, dtype=np.uint32), np.array(values, dtype=np.int64))
        self.model.update(zip(fresh, values, strict=True))

    @rule(ids=st.lists(st.integers(0, 100) | st.integers(0, 7), unique=True, min_size=1,
                       max_size=20), data=st.data())
    def replace(self, ids: list[int], data: st.DataObject) -> None:
        """A batch of changed values (a tracked batch's), ids holding one or not: it waits
        with the others until a read, and an id in several takes the last one."""
        new = [data.draw(INT64) for _ in ids]
        had = [d in self.model for d in ids]
        old = [self.model.get(d, 0) for d in ids]
        self.index.replace_many(np.array(ids, dtype=np.uint32), np.array(old, dtype=np.int64),
                                np.array(had, dtype=bool), np.array(new, dtype=np.int64))
        self.model.update(zip(ids, new, strict=True))

    @rule(op=st.sampled_from(OPS), c=INT64, within=WITHIN)
    def compare(self, op: str, c: int, within: set[int] | None) -> None:
        got = set(self.index.compare(op, c, None if within is None else BitMap(within)))
        assert got == {d for d, v in self.model.items()
                       if expect(op, v, c) and (within is None or d in within)}

    @rule(lo=INT64, hi=INT64, within=WITHIN, data=st.data())
    def between(self, lo: int, hi: int, within: set[int] | None, data: st.DataObject
                ) -> None:
        if data.draw(st.booleans()) and self.model:  # bounds at stored values, near them
            stored = sorted(self.model.values())
            lo = data.draw(st.sampled_from(stored)) + data.draw(st.integers(-2, 2))
            hi = max(lo, data.draw(st.sampled_from(stored))) + data.draw(st.integers(-2, 2))
        got = set(self.index.between(lo, hi, None if within is None else BitMap(within)))
        assert got == {d for d, v in self.model.items()
                       if lo <= v <= hi and (within is None or d in within)}

    @rule()  # a rule, not an invariant: reading slices in what bulk steps left pending
    def agrees(self) -> None:
        assert len(self.index) == len(self.model)
        assert set(self.index.exists()) == set(self.model)
        for d, v in self.model.items():
            assert self.index.value_of(d) == v

    @rule()
    def persists(self) -> None:
        again = RangeIndex.from_state(self.index.to_state())
        assert all(again.value_of(d) == v for d, v in self.model.items())
        assert set(again.exists()) == set(self.model)


RangeModel.TestCase.settings = settings(max_examples=80, stateful_step_count=25, deadline=None)
TestRangeIndex = RangeModel.TestCase


def test_every_comparison_on_indexes_a_few_bits_wide() -> None:
    """Every bound around the stored values of indexes holding one value (no slice at
    all: a shard of a small cluster), two, and a handful, each way of asking."""
    for values in ([5], [5, 5], [31, 40], [0, 1], [-3, 4, 4, 9], [7, 8, 9, 10, 11, 12]):
        index = RangeIndex()
        for dense, value in enumerate(values):
            index.set(dense, value)
        for within in (None, BitMap([0]), BitMap(range(len(values)))):
            allowed = range(len(values)) if within is None else within
            for lo in range(min(values) - 2, max(values) + 3):
                for hi in range(lo - 1, max(values) + 3):
                    assert set(index.between(lo, hi, within)) == {
                        d for d in allowed if lo <= values[d] <= hi}, (values, lo, hi)
                for op in OPS:
                    assert set(index.compare(op, lo, within)) == {
                        d for d in allowed if expect(op, values[d], lo)}, (values, op, lo)


def test_values_changed_twice_while_waiting_read_back_as_the_last() -> None:
    """Batches of changes wait and are made as one: an id in two takes its value before
    from the first and after from the second, whatever the other ids did."""
    index = RangeIndex()
    index.set(9, 5)
    index.replace_many(np.array([1, 2, 9], dtype=np.uint32), np.array([0, 0, 5]),
                       np.array([False, False, True]), np.array([10, 20, -4]))
    index.replace_many(np.array([2, 3, 9], dtype=np.uint32), np.array([20, 0, -4]),
                       np.array([True, False, True]), np.array([25, 30, 7]))
    assert [index.value_of(d) for d in (1, 2, 3, 9)] == [10, 25, 30, 7]
    assert set(index.between(6, 26)) == {1, 2, 9} and len(index) == 4


def test_a_change_to_a_bulk_value_still_pending_sees_it() -> None:
    index = RangeIndex()
    index.set_many(np.array([5, 6, 7], dtype=np.uint32), np.array([40, -3, 9], dtype=np.int64))
    index.set(6, 100, old=-3)  # pending until now: its old value must be sliced in first
    index.set_many(np.array([8, 9], dtype=np.uint32), np.array([1, 2], dtype=np.int64))
    index.remove(9, old=2)
    assert [index.value_of(d) for d in (5, 6, 7, 8, 9)] == [40, 100, 9, 1, None]
    assert set(index.compare("ge", 40)) == {5, 6} and len(index) == 4


class Laid(RangeIndex):
    """Every bulk batch sliced in as whole containers, however far apart its ids."""

    __slots__ = ()
    DENSE_FROM = 1 << 40


@pytest.mark.parametrize("kind", [RangeIndex, Laid])
@given(ids=st.lists(st.integers(0, 300) | st.integers(65_400, 65_700), unique=True,
                    min_size=1, max_size=80),
       held=st.dictionaries(st.integers(70_000, 70_050), INT64, max_size=4), data=st.data())
@settings(max_examples=40, deadline=None)
def test_bulk_values_read_back_over_values_held(kind: type[RangeIndex], ids: list[int],
                                               held: dict[int, int], data: st.DataObject
                                               ) -> None:
    """A bulk batch (in one to three set_many calls, across a 65,536-id block boundary
    or not) sliced in id by id or as whole containers, over values already held."""
    values = data.draw(st.lists(INT64, min_size=len(ids), max_size=len(ids)))
    index = kind()
    for dense, value in held.items():
        index.set(dense, value)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(ids)), max_size=2)))
    for lo, hi in zip([0, *cuts], [*cuts, len(ids)], strict=True):
        index.set_many(np.array(ids[lo:hi], dtype=np.uint32),
                       np.array(values[lo:hi], dtype=np.int64))
    model = {**held, **dict(zip(ids, values, strict=True))}
    assert set(index.exists()) == set(model)
    assert {d: index.value_of(d) for d in model} == model


@given(st.lists(st.integers(0, 2**64 - 1), max_size=200), st.integers(1, 64))
@settings(max_examples=60, deadline=None)
def test_bit_planes_are_the_bit_rows_packed(values: list[int], width: int) -> None:
    """_bit_planes (an 8x8 bit transpose a word) gives bit i of every value as numpy's
    packbits of _bit_rows would, for any width and values wider than it."""
    values = values[:len(values) - len(values) % 8]
    array = np.array(values, dtype=np.uint64)
    planes = _bit_planes(array, width)
    assert planes.shape == (width, len(values) // 8)
    assert np.array_equal(planes, np.packbits(_bit_rows(array, width), axis=1,
                                              bitorder="little"))
    for i in range(width):  # and _bit_rows is what it says
        bits = np.unpackbits(planes[i], bitorder="little").astype(bool)
        assert bits.tolist() == [bool(v >> i & 1) for v in values]


class ValueModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.index = ValueIndex()
        self.model: dict[str, set[int]] = {}

    @rule(value=st.sampled_from("abcd"), dense=IDS, add=st.booleans())
    def change(self, value: str, dense: int, add: bool) -> None:
        if add:
            self.index.add(value, dense)
            self.model.setdefault(value, set()).add(dense)
        else:
            self.index.discard(value, dense)
            self.model.get(value, set()).discard(dense)

    @rule(value=st.sampled_from("abcd"), ids=st.lists(IDS, max_size=10), add=st.booleans())
    def bulk(self, value: str, ids: list[int], add: bool) -> None:
        if add:
            self.index.add_many(value, ids)
            self.model.setdefault(value, set()).update(ids)
        else:
            self.index.discard_many(value, ids)
            self.model.get(value, set()).difference_update(ids)

    @rule(pairs=st.lists(st.tuples(st.sampled_from("abcd"), IDS), max_size=12),
          coded=st.booleans())
    def load(self, pairs: list[tuple[str, int]], coded: bool) -> None:
        """The bulk-load paths: a column of (value, id) pairs, plain or coded."""
        values, ids = [v for v, _ in pairs], [d for _, d in pairs]
        if coded:
            vocabulary = sorted(set(values)) or ["a"]
            codes = np.array([vocabulary.index(v) for v in values], dtype=np.int64)
            self.index.add_coded(vocabulary, codes, np.array(ids, dtype=np.uint32))
        else:
            self.index.add_column(ids, values)
        for v, d in pairs:
            self.model.setdefault(v, set()).add(d)

    @invariant()
    def agrees(self) -> None:
        live = {v: ids for v, ids in self.model.items() if ids}
        # one id: kept as an int; two or more: a bitmap (so the state has one form)
        assert {v: len(b) for v, b in self.index._maps.items()} == {
            v: len(ids) for v, ids in live.items() if len(ids) > 1}
        assert self.index._one == {v: min(ids) for v, ids in live.items() if len(ids) == 1}
        assert len(self.index) == len(live)  # empty bitmaps are dropped
        for v, ids in live.items():
            assert set(self.index.get(v)) == ids
        within = set(range(0, 61, 2))
        assert dict(self.index.group_counts(BitMap(within))) == {
            v: len(ids & within) for v, ids in live.items() if ids & within}
        assert set(self.index.union_of(["a", "b", "zz"])) == live.get("a", set()) | live.get(
            "b", set())
        copy = ValueIndex.from_state(self.index.to_state())
        assert {v: set(b) for v, b in copy.items()} == live
        assert copy.to_state() == self.index.to_state()
        # a snapshot from before single ids were kept as ints: every value a bitmap
        older = ValueIndex.from_state([[v, b.serialize()] for v, b in self.index.items()])
        assert {v: set(b) for v, b in older.items()} == live
        assert older._one == self.index._one and older._maps == self.index._maps


ValueModel.TestCase.settings = settings(max_examples=50, stateful_step_count=25, deadline=None)
TestValueIndex = ValueModel.TestCase

FLOATS = st.floats(allow_nan=False)


@given(FLOATS, FLOATS)
def test_float_order_is_preserved(a: float, b: float) -> None:
    ka, kb = float_to_ordered(a), float_to_ordered(b)
    assert (a < b) == (ka < kb) and (a == b) == (ka == kb)
    assert ordered_to_float(ka) == a or (a == 0.0 and ordered_to_float(ka) == 0.0)


@given(st.lists(FLOATS, max_size=30))
def test_vectorised_float_map_matches_scalar(values: list[float]) -> None:
    arr = np.array(values, dtype=np.float64)
    assert floats_to_ordered(arr).tolist() == [float_to_ordered(v) for v in values]



@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-2**40, 2**40) | st.integers(-5, 5), min_size=1,
                max_size=RangeIndex.SAMPLE),
       st.integers(-2**40, 2**40) | st.integers(-6, 6), st.integers(0, 2**41))
def test_an_estimate_over_no_more_ids_than_the_sample_is_exact(
        values: list[int], c: int, width: int) -> None:
    """Up to SAMPLE holders, the sample is every value: each estimate is the count."""
    index = RangeIndex()
    index.set_many(np.arange(len(values), dtype=np.uint32), np.array(values, dtype=np.int64))
    for op in OPS:
        assert index.estimate(op, [c]) == sum(expect(op, v, c) for v in values), op
    assert index.estimate("between", [c, c + width]) == sum(c <= v <= c + width
                                                           for v in values)
    assert index.estimate("between", [c + 1, c]) == 0
    assert index.estimate("in", [c, values[0]]) == sum(v in (c, values[0]) for v in values)


def test_an_estimate_follows_the_values_as_they_change() -> None:
    """Over many ids the estimate is near the count, and is drawn again once an eighth of
    the ids have changed: values moved from one end to the other are seen there."""
    rng = np.random.default_rng(7)
    n = 40_000
    values = rng.integers(0, 1_000_000, n)
    index = RangeIndex()
    index.set_many(np.arange(n, dtype=np.uint32), values)
    for op, c in (("lt", 100_000), ("ge", 500_000), ("le", 990_000)):
        true = len(index.compare(op, c))
        assert abs(index.estimate(op, [c]) - true) < n * 0.1, (op, c)
    assert index.estimate("between", [2_000_000, 3_000_000]) == 0
    moved = np.arange(0, n // 2, dtype=np.uint32)
    index.replace_many(moved, values[: n // 2], np.ones(n // 2, dtype=bool),
                       np.full(n // 2, 2_500_000))
    true = len(index.compare("ge", 2_000_000))
    assert true == n // 2
    assert abs(index.estimate("ge", [2_000_000]) - true) < n * 0.1
