"""IntTable against a dict, driven by hypothesis (tiny key spaces force collisions)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memstore.index.inttable import IntTable

# Keys clustered in a few low bits collide in the probe sequence; big ones use all 64 bits.
KEYS = st.one_of(st.integers(2, 40), st.integers(2, 2**64 - 1),
                 st.integers(0, 40).map(lambda k: (k << 10) + 2))
OPS = st.lists(st.tuples(st.sampled_from(["set", "del", "get"]), KEYS, st.integers(0, 2**32 - 1)),
               max_size=3000)


def _set_or_delete(table: IntTable, model: dict[int, int], op: str, key: int,
                   value: int) -> None:
    """Apply one "set" or "del" to the table and to the dict it is checked against."""
    if op == "set":
        table[key] = value
        model[key] = value
    elif key in model:
        del table[key]
        del model[key]
    else:
        assert key not in table


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_matches_a_dict(ops: list[tuple[str, int, int]]) -> None:
    table, model = IntTable(), {}
    for op, key, value in ops:
        if op != "get":
            _set_or_delete(table, model, op, key, value)
        assert table.get(key) == model.get(key)
        assert len(table) == len(model)
    assert sorted(table.items()) == sorted(model.items())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(KEYS, st.integers(0, 2**32 - 1)), max_size=5000))
def test_bulk_update_matches_a_dict(pairs: list[tuple[int, int]]) -> None:
    table = IntTable()
    table.update(np.array([k for k, _ in pairs], dtype=np.uint64),
                 np.array([v for _, v in pairs], dtype=np.uint32))
    model = dict(pairs)  # the last value of a repeated key wins, as in a dict
    assert sorted(table.items()) == sorted(model.items())
    for key, value in model.items():
        assert table[key] == value
    table[12345] = 7  # and it stays a working table afterwards
    assert table.get(12345) == 7 and len(table) == len(model) + (12345 not in model)


def test_growth_keeps_everything_and_stays_compact() -> None:
    table = IntTable()
    keys = np.random.default_rng(1).integers(2, 2**63, 200_000, dtype=np.uint64)
    for i, k in enumerate(keys.tolist()):
        table[k] = i
    assert len(table) == len(set(keys.tolist()))
    assert all(table[k] == i for i, k in enumerate(keys.tolist()[:1000]))
    assert table.nbytes <= 12 * 4 * len(table)  # at least a quarter full


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("set"), KEYS, st.integers(0, 2**32 - 1)),
    st.tuples(st.just("del"), KEYS, st.just(0)),
    st.tuples(st.just("bulk"), st.lists(st.tuples(KEYS, st.integers(0, 2**32 - 1)),
                                        max_size=300), st.just(0)),
    st.tuples(st.just("new"), st.lists(st.tuples(KEYS, st.integers(0, 2**32 - 1)),
                                       max_size=300, unique_by=lambda kv: kv[0]), st.just(0))),
    max_size=60))
def test_bulk_updates_of_a_used_table_match_a_dict(ops: list[tuple[str, Any, int]]) -> None:
    table, model = IntTable(), {}
    for op, arg, value in ops:
        if op == "bulk":
            table.update(np.array([k for k, _ in arg], dtype=np.uint64),
                         np.array([v for _, v in arg], dtype=np.uint32))
            model.update(arg)
        elif op == "new":  # a load's identifiers: only keys not in the table yet
            fresh = [(k, v) for k, v in arg if k not in model]
            table.insert_absent(np.array([k for k, _ in fresh], dtype=np.uint64),
                                np.array([v for _, v in fresh], dtype=np.uint32))
            model.update(fresh)
        else:
            _set_or_delete(table, model, op, arg, value)
        assert len(table) == len(model)
    assert sorted(table.items()) == sorted(model.items())
    probe = list(model) + [2, 3, 12345]
    found = table.find_many(np.array(probe, dtype=np.uint64))
    assert [f >= 0 for f in found] == [k in model for k in probe]
    assert all(table.get(k) == model.get(k) for k in probe)
    assert table.get_many(np.array(probe, dtype=np.uint64)).tolist() == [
        model.get(k, -1) for k in probe]


@given(st.lists(st.tuples(st.sampled_from(["email", "device", "crm"]), st.text(max_size=30)),
                max_size=40),
       st.sets(st.integers(0, 39), max_size=5))
def test_ident_keys_are_ident_key_of_each_the_tables_reserved_keys_included(
        pairs: list[tuple[str, str]], low: set[int]) -> None:
    """The load path's vectorized keys equal ident_key's, also where the hash lands on a key
    the table reserves (0 empty, 1 deleted): hashes are forced there for the rows in `low`."""
    from memstore.engine import blob as engine

    real = engine.xxh3_64_intdigest
    forced = {f"{kind}\x00{value}".encode(): i % 2 for i, (kind, value) in enumerate(pairs)
              if i in low}
    engine.xxh3_64_intdigest = lambda data: forced[data] if data in forced else real(data)
    try:
        kinds, values = [k for k, _ in pairs], [v for _, v in pairs]
        keys = engine.ident_keys(kinds, values)
        assert keys.dtype == np.uint64
        assert keys.tolist() == [engine.ident_key(k, v) for k, v in pairs]
        assert all(key > 1 for key in keys.tolist())
    finally:
        engine.xxh3_64_intdigest = real


@given(st.integers(2, 60), st.integers(0, 2**32), st.sampled_from([0, 1500]))
def test_a_fresh_table_filled_at_once_wraps_keys_past_its_last_slot(count: int, seed: int,
                                                                    entries: int) -> None:
    """`update` on an empty table places keys in one pass (IntTable._fill); keys whose homes
    are the last slots run past the end and must wrap to the front, still found (2048
    slots, or 3072: not a power of two)."""
    table = IntTable(entries)
    rng = np.random.default_rng(seed)
    candidates = rng.integers(2, 2**63, size=200_000, dtype=np.uint64)
    last = table._cap - 1
    tail = np.unique(candidates[table._homes(candidates) >= last - 3])[:count]
    others = np.unique(candidates[:count])
    keys = np.unique(np.concatenate([tail, others]))
    values = np.arange(len(keys), dtype=np.uint32)
    table.update(keys, values)
    assert len(table) == len(keys)
    assert {int(k): table[int(k)] for k in keys} == dict(zip(keys.tolist(), values.tolist(),
                                                             strict=True))
    assert (table.get_many(keys) == values).all()
    table[int(keys[0])] = 7  # and it stays a working table
    del table[int(keys[-1])]
    assert table[int(keys[0])] == 7 and int(keys[-1]) not in table


@given(st.one_of(st.integers(0, 9), st.integers(2030, 2047)), st.integers(9, 40),
       st.sets(st.integers(0, 39)), st.integers(1, 40))
def test_chains_longer_than_a_probe_window_with_tombstones_in_them(
        home: int, count: int, deleted: set[int], later: int) -> None:
    """Keys that all share one home slot make a chain longer than the vectorized probes'
    window (inttable._WINDOW), wrapping past the last slot when the home is near it;
    deleting some leaves tombstones inside; absent keys are then placed and probed."""
    table = IntTable()  # 2048 slots: a key's home is the top 11 bits of key * PHI
    assert table._cap == 2048  # (a power of two: a key's home is its top 11 bits)
    inverse = pow(0x9E3779B97F4A7C15, -1, 2**64)
    same = [((home << (64 - 11)) + i) * inverse % 2**64 for i in range(1, count + later + 1)]
    assert set(table._homes(np.array(same, dtype=np.uint64)).tolist()) == {home}
    first, rest = same[:count], same[count:]
    table.insert_absent(np.array(first, dtype=np.uint64), np.arange(count, dtype=np.uint32))
    model = dict(zip(first, range(count), strict=True))
    for i in sorted(deleted & set(range(count))):
        del table[first[i]]
        del model[first[i]]
    table.insert_absent(np.array(rest, dtype=np.uint64),
                        np.arange(100, 100 + len(rest), dtype=np.uint32))
    model.update(zip(rest, range(100, 100 + len(rest)), strict=True))
    probe = np.array(same + [2, 3], dtype=np.uint64)
    assert table.get_many(probe).tolist() == [model.get(k, -1) for k in probe.tolist()]
    assert [table.get(k) for k in probe.tolist()] == [model.get(k) for k in probe.tolist()]
    assert len(table) == len(model)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(2, 400), max_size=60), st.lists(st.integers(2, 400), max_size=60),
       st.lists(st.integers(2, 400), max_size=20), st.integers(0, 3))
def test_insert_new_places_distinct_absent_keys_and_refuses_the_rest(
        before: list[int], batch: list[int], deleted: list[int], spread: int) -> None:
    """insert_new (checked while placing): True and every key found when the batch's keys
    are distinct and absent; False when one is present or comes twice, every key placed
    then holding its own value. Keys few and clustered (`spread`: how far apart), so
    chains run long and twins meet; deletions leave tombstones (the checked path)."""
    table = IntTable()
    table.update(np.array([k << spread for k in before], dtype=np.uint64),
                 np.arange(len(before), dtype=np.uint32))
    held = {k << spread: i for i, k in enumerate(before)}
    for k in deleted:
        if k << spread in held:
            del table[k << spread]
            del held[k << spread]
    keys = [k << spread for k in batch]
    values = list(range(1000, 1000 + len(keys)))
    ok = table.insert_new(np.array(keys, dtype=np.uint64), np.array(values, dtype=np.uint32))
    fresh = len(set(keys)) == len(keys) and not set(keys) & set(held)
    assert ok == fresh
    for k, v in held.items():  # nothing held before is changed
        if k not in keys:
            assert table.get(k) == v
    if ok:
        for k, v in zip(keys, values, strict=True):
            assert table.get(k) == v
        assert len(table) == len(held) + len(keys)
    else:  # the keys placed before the refusal hold a value given for them
        for k in set(keys):
            mine = {v for kk, v in zip(keys, values, strict=True) if kk == k}
            assert table.get(k) in {None, held.get(k)} | mine


def test_insert_new_into_an_empty_table_fills_it_at_once_growing_it_if_needed() -> None:
    """An empty table takes a batch of distinct keys in one pass (a snapshot's ids), first
    growing to fit them; a batch with a key twice is refused and leaves it empty."""
    keys = np.arange(2, 50_002, dtype=np.uint64) * np.uint64(0x9E37)
    values = np.arange(len(keys), dtype=np.uint32)
    table = IntTable()
    assert table.insert_new(keys, values)
    assert len(table) == len(keys) and table.get_many(keys).tolist() == values.tolist()
    assert table.get(7) is None
    twice = IntTable()
    assert not twice.insert_new(np.array([5, 9, 5], dtype=np.uint64),
                                np.array([1, 2, 3], dtype=np.uint32))
    assert len(twice) == 0 and twice.get(5) is None and twice.get(9) is None


def test_a_table_copied_slot_by_slot_finds_the_same_keys_and_refuses_a_bad_copy() -> None:
    """slots / put_slots (a snapshot's directory): a table of the same capacity filled from
    another's slots, tombstones and all, in pieces, holds the same entries and counts; a
    piece that does not fit, or over slots already filled, is refused."""
    table = IntTable()
    keys = np.arange(10, 3010, dtype=np.uint64) * np.uint64(7919)
    table.update(keys, np.arange(len(keys), dtype=np.uint32))
    for key in keys[::3].tolist():
        del table[key]
    copy = IntTable.of_capacity(table.capacity)
    for start in range(0, table.capacity, 1000):
        copy.put_slots(start, *table.slots(start, start + 1000))
    assert (len(copy), copy.tombstones) == (len(table), table.tombstones) > (0, 0)
    assert copy.get_many(keys).tolist() == table.get_many(keys).tolist()
    assert sorted(copy.items()) == sorted(table.items())
    with pytest.raises(ValueError, match="not empty"):
        copy.put_slots(0, *table.slots(0, 10))
    with pytest.raises(ValueError, match="do not fit"):
        IntTable.of_capacity(100).put_slots(95, *table.slots(0, 10))
