"""BlobTable against the list it replaces (memstore.index.blobtable), with segments small
enough that random writes clean them many times."""

from __future__ import annotations

import os
import random

import pytest

from memstore.index.blobtable import BlobTable


def _blob(rng: random.Random, big: int) -> bytes:
    """Nonzero bytes (so a blob's bytes are told from zeroed dead ones), now and then big
    or empty."""
    size = rng.choice([0, rng.randrange(1, big), rng.randrange(1, big), big + rng.randrange(9)])
    return bytes(rng.randrange(1, 256) for _ in range(size))


def _check(table: BlobTable, blobs: list[bytes | None]) -> None:
    assert len(table) == len(blobs)
    assert [table[d] for d in range(len(blobs))] == blobs == list(table)
    assert table.take(reversed(range(len(blobs)))) == blobs[::-1]
    if blobs:
        assert table[-1] == blobs[-1]
    live = [d for d, b in enumerate(blobs) if b is not None]
    joined, lengths = table.joined(live)
    assert joined == b"".join(blobs[d] for d in live)  # type: ignore[misc]
    assert lengths.tolist() == [len(blobs[d]) for d in live]  # type: ignore[arg-type]
    # Every byte a segment holds is some blob's or zeroed: what is written over is gone.
    held = sum(len(b) for b in blobs if b is not None and len(b) < table._big_bytes)
    written = sum(sum(1 for byte in seg[:fill] if byte)
                  for seg, fill in zip(table._segs[1:], table._fill[1:], strict=True) if seg is not None)
    assert written == held == sum(table._live)
    # Each segment but the newest is more than half live or was cleaned when it fell there.
    for seg, (fill, live) in enumerate(zip(table._fill, table._live, strict=True)):
        if not seg:
            continue  # (not a segment)
        if seg != table._active and table._segs[seg] is not None:
            assert 2 * live > fill or seg in table._free


@pytest.mark.parametrize("seed", range(3))
def test_random_writes_read_as_the_list_and_leave_no_dead_copy(seed: int) -> None:
    rng = random.Random(seed)
    table, blobs = BlobTable(segment_bytes=256, big_bytes=48), []  # type: ignore[var-annotated]
    for _ in range(500):
        op = rng.random()
        if op < 0.2:  # a load: new profiles at the end, some dense ids empty
            fresh = [None if rng.random() < 0.1 else _blob(rng, 48) for _ in range(rng.randrange(8))]
            if rng.random() < 0.5:
                table.extend(fresh)
            else:  # a snapshot's rows: dense ids made first, then filled with joined blobs
                first = len(blobs)
                table.grow(first + len(fresh))
                rows = [d for d, b in enumerate(fresh, first) if b is not None]
                joined = b"".join(b for b in fresh if b is not None)
                lengths = [len(b) for b in fresh if b is not None]
                if len(rows) == len(fresh):
                    table.put_joined(range(first, first + len(fresh)), joined, lengths)
                else:
                    table.put_joined(rows, joined, lengths)
            blobs += fresh
        elif op < 0.3:
            size = len(blobs) + rng.randrange(3)
            table.grow(size)
            blobs += [None] * (size - len(blobs))
        elif blobs and op < 0.45:  # many at once: held or not, deleted, twice (last wins)
            ids = [rng.randrange(len(blobs)) for _ in range(rng.randrange(1, 9))]
            given = [None if rng.random() < 0.2 else _blob(rng, 48) for _ in ids]
            table.put_many(ids, given)
            for d, blob in zip(ids, given, strict=True):
                blobs[d] = blob
        elif blobs:  # an upsert or a delete
            d = rng.randrange(len(blobs))
            blob = None if rng.random() < 0.3 else _blob(rng, 48)
            table[d] = blob
            blobs[d] = blob
        if rng.random() < 0.1:
            _check(table, blobs)
    _check(table, blobs)
    assert len(table._segs) < 60  # cleaned segments are reused, not piled up


def test_cleaning_moves_a_half_dead_segment_and_unmaps_it() -> None:
    table = BlobTable(segment_bytes=100, big_bytes=50)
    table.extend([bytes([i + 1]) * 10 for i in range(20)])  # two full segments
    first_segment = table._segs[1]
    for d in range(4):
        table[d] = None  # 40 of its 100 bytes dead: kept
    assert table._segs[1] is first_segment and table.dead_bytes == 40
    table[4] = None  # half dead: its five live blobs move to a new segment
    assert first_segment.closed and table.dead_bytes == 0
    assert list(table) == [None] * 5 + [bytes([i + 1]) * 10 for i in range(5, 20)]
    with pytest.raises(IndexError):
        table[20] = b"x"
    with pytest.raises(ValueError):
        BlobTable(segment_bytes=10, big_bytes=11)
    with pytest.raises(ValueError, match="2 blob lengths summing to 5 for 4 bytes"):
        table.put_joined([0, 1], b"abcd", [2, 3])  # a damaged row: nothing written
    assert table[0] is None and table[1] is None
    table.put_joined([1, 1], b"abcd", [2, 2])  # given twice: the last counts
    assert table[1] == b"cd"


def test_a_forked_child_keeps_the_blobs_as_they_were_at_the_fork() -> None:
    """Segments are private mappings: a snapshot writer forked from the shard sees no
    write, cleaning or unmapping the shard does after the fork."""
    table = BlobTable(segment_bytes=64, big_bytes=32)
    table.extend([b"a" * 20, b"b" * 20, b"c" * 40])
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        os.close(write)
        os.read(read, 1)  # the parent has written by now
        ok = list(table) == [b"a" * 20, b"b" * 20, b"c" * 40]
        os._exit(0 if ok else 1)
    os.close(read)
    table[0] = None
    table[1] = b"z" * 20  # the first segment half dead, then cleaned
    table[2] = None
    table.extend([b"y" * 30] * 10)
    os.write(write, b"x")
    os.close(write)
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
    assert list(table) == [None, b"z" * 20, None] + [b"y" * 30] * 10


def test_joined_does_not_run_on_into_the_next_segment() -> None:
    """A segment filled to its last byte ends where the next one's numbering starts: the
    blobs after it are another run, read from the other segment."""
    table = BlobTable()  # 16 MiB segments
    halves = [bytes([i + 1]) * (1 << 19) for i in range(32)]  # exactly one segment
    table.extend([*halves, b"next"])
    joined, lengths = table.joined(range(33))
    assert joined == b"".join([*halves, b"next"]) and lengths.tolist() == [1 << 19] * 32 + [4]
