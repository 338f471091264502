"""PidTable against the list and dict it replaces (memstore.index.pidtable)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from memstore.index import pidtable
from memstore.index.pidtable import PidTable

IDS = ["u1", "u2", "é-ü", "a\0b", "x" * 256, "𝄞", "u3", "", "\ud800"]  # "" and a lone
# surrogate: never a checked id, but images are stored as they come


def _check(table: PidTable, pids: list[str | None], dense_of: dict[str, int]) -> None:
    assert len(table) == len(pids)
    assert [table[d] for d in range(len(pids))] == pids
    assert table.take(np.arange(len(pids))) == pids == list(table)
    assert table.take(list(reversed(range(len(pids))))) == pids[::-1]
    assert dict(table.index.items()) == dense_of and len(table.index) == len(dense_of)
    probes = [*IDS, *dense_of, "absent", "u"]
    assert [table.index.get(p) for p in probes] == [dense_of.get(p) for p in probes]
    assert table.index.many(probes).tolist() == [dense_of.get(p, -1) for p in probes]
    assert [p in table.index for p in probes] == [p in dense_of for p in probes]


def _drive(seed: int, steps: int = 400) -> None:
    rng = random.Random(seed)
    table, pids, dense_of = PidTable(), [], {}  # type: ignore[var-annotated]
    for _ in range(steps):
        op = rng.random()
        if op < 0.3:  # a load: fresh ids at the end
            fresh = [f"p{rng.randrange(10**6)}-{len(pids)}-{i}" for i in range(rng.randrange(5))]
            unused = [i for i in IDS if i not in dense_of and i not in fresh]
            fresh += rng.sample(unused, min(1, len(unused)))
            table.extend(fresh)
            for i, pid in enumerate(fresh, len(pids)):
                dense_of[pid] = i
            pids += fresh
        elif op < 0.45:  # grow: dense ids with no profile
            size = len(pids) + rng.randrange(3)
            table.grow(size)
            pids += [None] * (size - len(pids))
        elif pids and op < 0.75:  # a profile goes (a delete, a merged-away loser)
            d = rng.randrange(len(pids))
            old = pids[d]
            table[d] = None
            pids[d] = None
            if old is not None and dense_of.get(old) == d:
                del dense_of[old]
        elif pids:  # a profile is (re)created at a dense id with no profile
            free = [d for d, p in enumerate(pids) if p is None]
            if free:
                d = rng.choice(free)
                pid = rng.choice([*IDS, f"q{rng.randrange(50)}"])
                if pid in dense_of:
                    continue  # one dense id an id, as the engine keeps them
                table[d] = pid
                pids[d] = pid
                dense_of[pid] = d
        if rng.random() < 0.1:
            _check(table, pids, dense_of)
    _check(table, pids, dense_of)


@pytest.mark.parametrize("seed", range(3))
def test_random_writes_read_as_a_list_and_a_dict(seed: int) -> None:
    _drive(seed)


def test_ids_with_the_same_hash_never_answer_for_each_other(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every id hashed to one of four keys: hits are confirmed against the stored
    bytes, and the ids past the first of a key live in the clash table."""
    monkeypatch.setattr(pidtable, "_hash", lambda pid: 2 + (hash(pid) & 3))
    for seed in range(3):
        _drive(seed, 300)


def test_the_buffer_is_compacted_and_cleared_bytes_are_zeroed() -> None:
    table = PidTable()
    table.extend([f"{i:06d}" + "x" * 94 for i in range(20_000)])  # 2 MB of ids
    for d in range(0, 20_000, 4):
        table[d] = None
    assert b"000000x" not in table._buf[:table._end]  # an erased id leaves no copy
    assert table._dead == 5_000 * 100 and table._end == 1 + 20_000 * 100
    for d in (*range(1, 20_000, 4), *range(2, 20_000, 4)):
        table[d] = None
    assert table._end - table._dead == 1 + 5_000 * 100  # the live bytes
    assert table._end < 1 + 20_000 * 100  # compacted on the way
    assert table[3] == "000003" + "x" * 94 and table.index["019999" + "x" * 94] == 19_999
    assert table.index.get("000000" + "x" * 94) is None and table[0] is None


def test_setting_the_id_a_dense_id_holds_again_changes_nothing() -> None:
    table = PidTable()
    table.extend(["a", "b"])
    end = table._end
    table[0] = "a"  # a replayed image
    assert table._end == end and table[0] == "a" and table.index["a"] == 0
    table[0] = "c"  # another id: the old one leaves the index
    assert table.index.get("a") is None and table.index["c"] == 0 and table[0] == "c"
    with pytest.raises(IndexError):
        table[2] = "d"
    with pytest.raises(KeyError):
        table.index["a"]


def test_take_of_ids_of_one_length_with_and_without_a_nul_inside() -> None:
    table = PidTable()
    table.extend(["ab", "a\0", "cd", "\0\0"])
    assert table.take([0, 2]) == ["ab", "cd"]  # a row each
    assert table.take([0, 1, 2, 3]) == ["ab", "a\0", "cd", "\0\0"]  # decoded one by one
    table[2] = None
    assert table.take([2, 0, 2]) == [None, "ab", None]


def test_a_forked_child_keeps_the_table_as_it_was_at_the_fork() -> None:
    """The buffers are private mappings (memstore.index.mapped): a snapshot writer forked
    from the shard sees no write the shard makes after the fork."""
    table = PidTable()
    table.extend(["a", "b"])
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        os.close(write)
        os.read(read, 1)  # the parent has written by now
        ok = table[0] == "a" and table.index.get("c") is None and table.take([1]) == ["b"]
        os._exit(0 if ok else 1)
    os.close(read)
    table[0] = None
    table.extend(["c"] * 1 + [f"x{i}" for i in range(5000)])  # grows both buffers
    os.write(write, b"x")
    os.close(write)
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0


@pytest.mark.parametrize("clashing", [False, True])
def test_a_table_filled_while_loading_enters_its_ids_at_the_end(
        monkeypatch: pytest.MonkeyPatch, clashing: bool) -> None:
    """`loading()` (a snapshot being read): chunks of ids go in with their index entries
    held back and entered together at the end; ids sharing a hash (`clashing`: four keys
    for all) are then entered one by one. A chunk over dense ids already held enters the
    held-back ids first."""
    if clashing:
        monkeypatch.setattr(pidtable, "_hash", lambda pid: 2 + (hash(pid) & 3))
    pids: list[str | None] = [f"id-{i}" for i in range(3000)]
    pids[7] = pids[2999] = None
    table = PidTable(len(pids))
    with table.loading():
        for start in range(0, len(pids), 700):
            table.put_many(range(start, min(start + 700, len(pids))), pids[start:start + 700])
        assert table.index.get("id-5") is None  # not entered yet
    _check(table, pids, {p: d for d, p in enumerate(pids) if p is not None})
    table = PidTable(10)
    with table.loading():
        table.put_many(range(5), ["a", "b", "c", "d", "e"])
        table.put_many([3, 8], ["x", "c"])  # dense 3 held: one by one, "c" moves to 8
    _check(table, ["a", "b", "c", "x", "e", None, None, None, "c", None],
           {"a": 0, "b": 1, "c": 8, "x": 3, "e": 4})
