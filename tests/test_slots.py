"""Hash slots, slot ranges and fair-share plans: pure functions, no processes."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memstore.hashslot import slots_of
from shards.slots import (
    SLOT_COUNT,
    format_ranges,
    from_ranges,
    parse_ranges,
    plan_add,
    plan_fair_share,
    plan_remove,
    slot_of,
    split_even,
    to_ranges,
)


def test_slot_of_known_vectors() -> None:
    # CRC16/XMODEM check value of "123456789" is 0x31C3 (Redis Cluster spec, appendix A).
    assert slot_of("123456789") == 0x31C3 % SLOT_COUNT == 12739
    assert slot_of("") == 0
    # Redis: CLUSTER KEYSLOT foo -> 12182, bar -> 5061, hello -> 866 (no hash tags here).
    assert slot_of("foo") == 12182
    assert slot_of("bar") == 5061
    assert slot_of("hello") == 866
    # UTF-8 bytes, not code points.
    assert slot_of("é") == slot_of("\u00e9") != slot_of("e\u0301")


@given(st.lists(st.text(max_size=40), max_size=50))
def test_slots_of_many_ids_are_slot_of_each(ids: list[str]) -> None:
    assert slots_of(ids) == [slot_of(pid) for pid in ids]


def test_slot_of_spreads_ids() -> None:
    counts = [0] * 16
    for i in range(16000):
        counts[slot_of(f"user-{i}") * 16 // SLOT_COUNT] += 1
    assert min(counts) > 800 and max(counts) < 1200


def test_ranges_round_trip() -> None:
    assert to_ranges([5, 0, 1, 2, 2]) == [(0, 2), (5, 5)]
    assert to_ranges([]) == []
    assert from_ranges([(0, 2), (5, 5)]) == {0, 1, 2, 5}
    assert format_ranges([(0, 2), (5, 5)]) == "0-2,5"
    assert parse_ranges("0-2,5, 3") == [(0, 3), (5, 5)]
    assert parse_ranges("") == []
    rng = random.Random(7)
    for _ in range(50):
        slots = {rng.randrange(SLOT_COUNT) for _ in range(rng.randrange(300))}
        assert from_ranges(to_ranges(slots)) == slots
        assert from_ranges(parse_ranges(format_ranges(to_ranges(slots)))) == slots
    with pytest.raises(ValueError):
        to_ranges([SLOT_COUNT])
    with pytest.raises(ValueError):
        parse_ranges("10-5")


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 64])
def test_split_even_covers_every_slot_once(n: int) -> None:
    parts = split_even(n)
    sizes = [len(from_ranges(p)) for p in parts]
    assert sum(sizes) == SLOT_COUNT and max(sizes) - min(sizes) <= 1
    assert set().union(*(from_ranges(p) for p in parts)) == set(range(SLOT_COUNT))


def _apply(owned: dict[str, set[int]], moves: list) -> dict[str, set[int]]:  # type: ignore[type-arg]
    after = {k: set(v) for k, v in owned.items()}
    for move in moves:
        slots = from_ranges(move.slots)
        assert slots <= after[move.source], "a move takes only slots the source owns"
        after[move.source] -= slots
        after.setdefault(move.target, set()).update(slots)
    return after


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_plan_add_moves_fair_share_only(n: int) -> None:
    owned = {f"shard-{i}": from_ranges(r) for i, r in enumerate(split_even(n))}
    moves = plan_add(owned, "new")
    after = _apply(owned, moves)
    sizes = [len(s) for s in after.values()]
    assert sum(sizes) == SLOT_COUNT and max(sizes) - min(sizes) <= 1
    # Fewest moves: exactly the new shard's share moves, all of it to the new shard.
    assert sum(m.count for m in moves) == len(after["new"]) == SLOT_COUNT // (n + 1)
    assert {m.target for m in moves} == {"new"}


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_plan_remove_drains_only_the_leaving_shard(n: int) -> None:
    owned = {f"shard-{i}": from_ranges(r) for i, r in enumerate(split_even(n))}
    moves = plan_remove(owned, "shard-1")
    after = _apply(owned, moves)
    assert after["shard-1"] == set()
    sizes = [len(s) for name, s in after.items() if name != "shard-1"]
    assert sum(sizes) == SLOT_COUNT and max(sizes) - min(sizes) <= 1
    assert sum(m.count for m in moves) == len(owned["shard-1"])
    assert {m.source for m in moves} == {"shard-1"}
    with pytest.raises(ValueError):
        plan_remove(owned, "nope")


def test_plan_fair_share_after_uneven_history() -> None:
    owned = {"a": set(range(10000)), "b": set(range(10000, 16384))}
    moves = plan_fair_share(owned, ["a", "b"])
    after = _apply(owned, moves)
    assert len(after["a"]) == len(after["b"]) == 8192
    assert sum(m.count for m in moves) == 10000 - 8192
    assert plan_fair_share(after, ["a", "b"]) == []
