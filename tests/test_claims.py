"""The packed claim tables (memstore/index/claims.py) against a plain dict.

Keys are drawn from two slots, so a slot's arrays grow and shrink, and the arena is
rewritten within a few dozen steps (the compaction size is lowered); a poor hash makes most
keys collide, so look-ups and inserts walk runs of equal hashes."""

from __future__ import annotations

from itertools import count

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memstore.hashslot import slot_of
from memstore.index import claims as claims_module
from memstore.index.claims import TICK, Claims, claim_key


def _keys_in(slot: int, n: int) -> list[str]:
    found: list[str] = []
    for i in count():
        key = claim_key("email", f"é{i}@x")  # not ascii: byte and character lengths differ
        if slot_of(key) == slot:
            found.append(key)
            if len(found) == n:
                return found
    raise AssertionError


SLOT_A, SLOT_B = slot_of(claim_key("email", "é0@x")), 7
KEYS = _keys_in(SLOT_A, 8) + _keys_in(SLOT_B, 8)
PIDS = ["p1", "p2", "profile-é-3", ""]  # "" stands for None: remove
ops = st.lists(st.tuples(st.sampled_from(["swap"] * 4 + ["load", "touch"]),
                         st.sampled_from(KEYS), st.sampled_from(PIDS)), min_size=40, max_size=120)


@pytest.fixture(autouse=True)
def small_arenas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims_module, "_COMPACT_BYTES", 40)


@settings(max_examples=150, deadline=None)
@given(ops, st.sampled_from([hash, lambda key: len(key) % 3]))
def test_claims_match_a_dict(steps: list[tuple[str, str, str]], hashing: object) -> None:
    clock = [0.0]
    table = Claims(hasher=hashing, clock=lambda: clock[0])  # type: ignore[arg-type]
    model: dict[str, str] = {}
    made: dict[str, float] = {}  # when each claim was last set to another pid
    for op, key, pid in steps:
        clock[0] += 1.0
        if op == "swap":
            assert table.swap(key, pid or None) == model.get(key)
            if pid and model.get(key) != pid:
                made[key] = clock[0]
            if pid:
                model[key] = pid
            else:
                model.pop(key, None)
        elif op == "touch":  # an import carried it again: made now, if held
            table.touch([key])
            if key in model:
                made[key] = clock[0]
        elif op == "load":  # a snapshot's slot replaces what the slot held
            slot = slot_of(key)
            fresh = {k: v for k, v in model.items() if slot_of(k) == slot and k != key}
            if pid:
                fresh[key] = pid
            table.load(slot, dict(fresh))
            model = {k: v for k, v in model.items() if slot_of(k) != slot} | fresh
            made.update(dict.fromkeys(fresh, 0.0))  # as old as the process
        for k in KEYS:
            assert table.get(k) == model.get(k), k
            if k in model:  # ages to within a tick, never more than the true age
                assert clock[0] - made[k] - TICK <= table.age(k, clock[0]) <= clock[0] - made[k]
        assert len(table) == len(model)
        for packed in table._slots.values():  # dead bytes are counted, and rewritten
            live = sum((s >> 16 & 0xFFFF) + (s & 0xFFFF) for s in packed.spans)
            assert packed.dead == len(packed.arena) - live
            assert packed.dead <= max(len(packed.arena) // 2, claims_module._COMPACT_BYTES)
        assert table.in_slots([SLOT_A, SLOT_B, 99]) == model
        assert dict(table.by_slot()).get(SLOT_B, {}) == {
            k: v for k, v in model.items() if slot_of(k) == SLOT_B}


def test_a_slot_that_loses_its_last_claim_takes_no_memory() -> None:
    table = Claims()
    for i, key in enumerate(KEYS[:8]):
        table.swap(key, f"p{i}")
    for key in KEYS[:8]:
        table.swap(key, None)
    assert len(table) == 0 and not table._slots
