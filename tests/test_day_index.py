"""DayIndex.counted against a dict of (id, day) -> count, driven by hypothesis.

The reference adds each id's counts over the window in Python ints. The bounds are drawn
around the sums that occur (equal to one, one above, one below), so that every edge of
`at_least` / `at_most` is hit; counts are mostly 1 (no repeat slice) with repeats of every
size up to days.MAX_COUNT (sums past 2 ** 64: the saturating path) and around the
largest sums 8, 16 and 32 bits hold (the counters a window is counted in); `within` is drawn
small and large against the window's cells (both ways of restricting). Also the bitmap
of a boolean mask, and of each row of a 2-d one (memstore.index.dense), against numpy's
own positions.
"""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
import numpy as np
from hypothesis import given, settings
from pyroaring import BitMap

from memstore.engine.days import MAX_COUNT
from memstore.index.day_index import DayIndex
from memstore.index.dense import bitmap_of_mask, bitmaps_of_rows

IDS = st.integers(0, 3) | st.integers(0, 70_000)  # a few ids often; past one 65,536-id block
# counts at the edges of the counters a window's sums are added in (uint8, uint16,
# uint32: day_index._counter), so sums land on both sides of each
EDGES = st.sampled_from([127, 128, 255, 256, 32_767, 32_768, 65_535, 65_536,
                         2**31 - 1, 2**31, 2**32 - 1, 2**32])
COUNTS = (st.just(1) | st.integers(2, 9) | EDGES | st.integers(2, MAX_COUNT)
          | st.integers(2**62, MAX_COUNT))
CELLS = st.dictionaries(st.tuples(IDS, st.integers(0, 6)), COUNTS, max_size=40)


def _sums(cells: dict[tuple[int, int], int], lo: int, hi: int) -> dict[int, int]:
    sums: dict[int, int] = {}
    for (who, day), count in cells.items():
        if lo <= day <= hi:
            sums[who] = sums.get(who, 0) + count
    return sums


@settings(max_examples=100, deadline=None)
@given(cells=CELLS, data=st.data())
def test_counted_is_the_sum_of_the_counts(cells: dict[tuple[int, int], int],
                                          data: Any) -> None:
    index = DayIndex()
    if data.draw(st.booleans(), label="one load"):
        items = list(cells.items())
        index.add_many(np.array([w for (w, _), _ in items], dtype=np.uint32),
                       np.array([d for (_, d), _ in items], dtype=np.int64),
                       np.array([c for _, c in items], dtype=np.uint64))
    else:
        for (who, day), count in cells.items():
            index.add(who, day, count)
    lo = data.draw(st.integers(-1, 6), label="lo")
    hi = data.draw(st.integers(lo, 7), label="hi")
    sums = _sums(cells, lo, hi)
    near = sorted({s + k for s in sums.values() for k in (-1, 0, 1)
                   if 1 <= s + k <= MAX_COUNT}) or [1]  # the parser's bounds
    least = data.draw(st.sampled_from(near), label="least")
    most = data.draw(st.one_of(st.none(), st.sampled_from([m for m in near if m >= least]
                                                          or [least])), label="most")
    within = None
    if data.draw(st.booleans(), label="restricted"):
        pool = sorted({w for w, _ in cells} | {1, 65_537})
        within = BitMap(data.draw(st.lists(st.sampled_from(pool), max_size=len(pool)),
                                  label="within"))
    want = {w for w, s in sums.items() if s >= least and (most is None or s <= most)}
    if within is not None:
        want &= set(within)
    assert set(index.counted(lo, hi, least, most, within)) == want
    assert index.count(lo, hi, least, most, within) == len(want)


@given(st.lists(st.booleans(), max_size=140_000).map(lambda b: np.array(b, dtype=bool))
       | st.integers(0, 200_000).flatmap(
           lambda n: st.floats(0, 1).map(
               lambda p: np.random.default_rng(n).random(n) < p)))
@settings(max_examples=30, deadline=None)
def test_bitmap_of_mask_holds_the_true_positions(mask: np.ndarray) -> None:
    got = bitmap_of_mask(mask)
    assert np.array_equal(np.array(got.to_array(), dtype=np.int64), np.flatnonzero(mask))


@given(st.integers(0, 3), st.integers(0, 140_000), st.floats(0, 1), st.integers(0, 2))
@settings(max_examples=20, deadline=None)
def test_bitmaps_of_rows_hold_each_rows_true_positions_from_start(
        count: int, n: int, p: float, block: int) -> None:
    rows = np.random.default_rng(n).random((count, n)) < p
    got = bitmaps_of_rows(rows, block << 16)
    assert len(got) == count
    for row, bitmap in zip(rows, got, strict=True):
        assert np.array_equal(np.array(bitmap.to_array(), dtype=np.int64),
                              np.flatnonzero(row) + (block << 16))


def test_counted_sums_past_2_to_the_64() -> None:
    """Three days at days.MAX_COUNT add up past 2 ** 64: the bounds still compare with
    the true sum, not a wrapped one."""
    index = DayIndex()
    for day in range(3):
        index.add(1, day, MAX_COUNT)
        index.add(2, day, 1)
    index.add(3, 0, MAX_COUNT)
    index.add(3, 1, 2)
    assert set(index.counted(0, 2, MAX_COUNT, None)) == {1, 3}
    assert set(index.counted(0, 2, MAX_COUNT, MAX_COUNT)) == set()
    assert set(index.counted(0, 2, 3, MAX_COUNT)) == {2}
    assert set(index.counted(0, 0, MAX_COUNT, MAX_COUNT)) == {1, 3}
    assert set(index.counted(0, 2, 2, None, BitMap([2, 3]))) == {2, 3}


WINDOWS = [(0, 3), (1, 5), (0, 6)]  # few, so windows are asked again and kept


@settings(max_examples=45, deadline=None)
@given(data=st.data())
def test_kept_window_sums_follow_every_update(data: Any) -> None:
    """Writes of every kind (add, remove, update, bump_many, add_many) interleaved with
    counts over a few windows, so the kept sums (day_index._Sums) are asked again after
    being carried through the writes: each answer equals the reference's, and equals a
    fresh index's (built from the same bitmaps, nothing kept)."""
    index = DayIndex()
    cells: dict[tuple[int, int], int] = {}
    small = st.integers(0, 300) | st.integers(65_530, 65_545)
    count = st.integers(1, 3) | st.integers(1, 40)
    huge = st.just(2**32 - 2) | st.just(2**40)  # sums past 32 bits: the window is not kept
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        step = data.draw(st.sampled_from(["add", "huge", "remove", "update", "bump", "load",
                                          "ask", "ask", "ask"]), label="step")
        if step in ("add", "huge"):
            who, day = data.draw(small), data.draw(st.integers(0, 6))
            if (who, day) not in cells:
                cells[who, day] = data.draw(count if step == "add" else huge)
                index.add(who, day, cells[who, day])
        elif step == "remove" and cells:
            who, day = data.draw(st.sampled_from(sorted(cells)))
            index.remove(who, day, cells.pop((who, day)))
        elif step == "update":
            who = data.draw(small)
            old = [(d, c) for (w, d), c in cells.items() if w == who]
            new = data.draw(st.dictionaries(st.integers(0, 6), count, max_size=4))
            index.update(who, old, sorted(new.items()))
            for d, _ in old:
                del cells[who, d]
            cells.update({(who, d): c for d, c in new.items()})
        elif step in ("bump", "load"):
            pairs = data.draw(st.lists(st.tuples(small, st.integers(0, 6)), max_size=12,
                                       unique=True))
            if step == "load":
                pairs = [p for p in pairs if p not in cells]
            before = [cells.get(p, 0) for p in pairs]
            after = [b + data.draw(count) for b in before]
            ids = np.array([w for w, _ in pairs], dtype=np.uint32)
            days = np.array([d for _, d in pairs], dtype=np.int64)
            if step == "load":
                index.add_many(ids, days, np.array(after, dtype=np.uint64))
            else:
                index.bump_many(ids, days, np.array(before, dtype=np.int64),
                                np.array(after, dtype=np.int64))
            cells.update(zip(pairs, after, strict=True))
        else:
            lo, hi = data.draw(st.sampled_from(WINDOWS))
            sums = _sums(cells, lo, hi)
            least = data.draw(st.sampled_from(sorted({2, 3} | {max(2, s + k) for s in
                                                               sums.values() for k in (-1, 0, 1)})))
            most = data.draw(st.none() | st.sampled_from([least, least + 1, least + 39]))
            within = data.draw(st.none() | st.none() | st.just(BitMap(range(0, 65_545, 3))))
            want = {w for w, s in sums.items() if s >= least and (most is None or s <= most)}
            if within is not None:
                want &= set(within)
            fresh = DayIndex.from_state(index.to_state())
            assert set(index.counted(lo, hi, least, most, within)) == want
            assert index.count(lo, hi, least, most, within) == len(want)
            assert fresh.count(lo, hi, least, most, within) == len(want)


def test_a_window_near_a_kept_one_is_moved_not_recounted() -> None:
    """A window a day or two off a kept one (the day rolled over; 30 and 31 days) starts
    from the kept sums and moves the days that differ (DayIndex._derived): its answers
    equal the reference's for repeats of every size, and a window far from both kept ones
    is counted afresh."""
    rng = np.random.default_rng(7)
    index, cells = DayIndex(), {}
    for who in rng.choice(70_000, 3_000, replace=False).tolist():  # ids past one block
        for day in rng.choice(12, int(rng.integers(1, 8)), replace=False).tolist():
            cells[who, day] = int(rng.choice([1, 1, 2, 3, 5, 40, 300]))
            index.add(who, day, cells[who, day])
    index.count(0, 7, 3, None)  # kept
    for lo, hi in [(1, 8), (2, 9), (0, 6), (1, 7), (2, 8)]:
        cells_in = sum(len(b) for d, b, _ in index.items() if lo <= d <= hi)
        assert index._derived(lo, hi, cells_in) is not None, (lo, hi)
        sums = _sums(cells, lo, hi)
        for least, most in [(3, None), (2, 5), (41, None), (300, 340)]:
            want = {w for w, s in sums.items() if s >= least and (most is None or s <= most)}
            assert index.count(lo, hi, least, most) == len(want), (lo, hi, least, most)
            assert set(index.counted(lo, hi, least, most)) == want
    cells_far = sum(len(b) for d, b, _ in index.items() if 9 <= d <= 11)
    assert index._derived(9, 11, cells_far) is None
