"""Data rights in one process: created and changed times through the log, snapshots and
merges; records from before times; the anonymous-profile selection of retention with an
injected clock; suppression through restarts; the salt file."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from pyroaring import BitMap

from memstore.engine.change import SET, UpsertSpec
from memstore.engine.core import Engine
from memstore.errors import FailedPrecondition
from memstore.server.rights import BulkExport, load_salt, salt_id
from memstore.shard import Shard, ShardConfig, encode_images, encode_schema
from memstore.storage import wal_format
from memstore.storage.wal_writer import LogWriter, SyncPolicy

DAY = 86400


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _open(data: Path, clock: Clock, salt: bytes = b"s" * 32) -> Shard:
    return asyncio.run(Shard.open(ShardConfig(data_dir=data, sync=SyncPolicy.OFF, clock=clock,
                                              salt=salt)))


def _times(shard: Shard, pid: str) -> tuple[int, int]:
    dense = shard.engine.dense_of[pid]
    return shard.engine.created_at(dense), shard.engine.changed[dense]


def test_times_are_stamped_logged_and_snapshotted(tmp_path: Path) -> None:
    clock = Clock(1_000)

    async def write(shard: Shard) -> None:
        engine = shard.engine
        await shard.commit(engine.plan_upsert(UpsertSpec("a", [(SET, "n", 1)])))
        clock.now = 500
        await shard.commit(engine.plan_upsert(UpsertSpec("b", [(SET, "n", 2)],
                                                         [("device", "d-1")])))
        clock.now = 2_000
        await shard.commit(engine.plan_upsert(UpsertSpec("a", [(SET, "n", 3)])))
        assert _times(shard, "a") == (1_000, 2_000)
        clock.now = 3_000  # b merges into a: the person is as old as b
        await shard.commit(engine.plan_link("a", [("device", "d-1")]))
        assert _times(shard, "a") == (500, 3_000)
        clock.now = 4_000
        await shard.commit(engine.plan_upsert(UpsertSpec("c", [(SET, "n", 4)])))
        await shard.close()

    asyncio.run(write(_open(tmp_path, clock)))
    clock.now = 9_999  # replay stamps what was logged, not the clock of the restart
    shard = _open(tmp_path, clock)
    assert (_times(shard, "a"), _times(shard, "c")) == ((500, 3_000), (4_000, 4_000))
    asyncio.run(shard.snapshot())
    asyncio.run(shard.close())
    shard = _open(tmp_path, clock)
    assert shard.recovery["replayed"] == 0
    assert (_times(shard, "a"), _times(shard, "c")) == ((500, 3_000), (4_000, 4_000))
    dense = shard.engine.dense_of["a"]
    assert shard.engine.export_profile(dense)["times"] == [500, 3_000]  # for slot moves
    asyncio.run(shard.close())


def test_a_failed_write_takes_its_times_back(tmp_path: Path) -> None:
    engine = Engine(clock=Clock(100))
    engine.apply(engine.plan_upsert(UpsertSpec("a", [(SET, "n", 1)])))
    engine.clock = Clock(200)
    undo = engine.apply(engine.plan_upsert(UpsertSpec("a", [(SET, "n", 2)])))
    assert (engine.created[0], engine.changed[0]) == (100, 200)
    engine.undo(undo)
    assert (engine.created[0], engine.changed[0]) == (100, 100)


def test_records_from_before_times_load_with_times_unknown(tmp_path: Path) -> None:
    engine = Engine()
    change = engine.plan_upsert(UpsertSpec("old", [(SET, "n", 1)], [("device", "old-d")]))
    log = tmp_path / "log"

    async def legacy() -> None:
        writer = LogWriter.open(log, sync=SyncPolicy.OFF)
        writer.append(wal_format.RECORD_SCHEMA, encode_schema(change.schema))
        writer.append(wal_format.RECORD_PROFILES, encode_images(change.images))
        await writer.close()

    asyncio.run(legacy())
    clock = Clock(50 * DAY)
    shard = _open(tmp_path, clock)
    assert _times(shard, "old") == (0, 0)
    engine = shard.engine
    # Not known: counted as changed when the shard started (its clock then: day 50).
    assert engine.expired(int(60 * DAY), ["device"], 0, 10) == ([0], None)
    assert engine.expired(int(40 * DAY), ["device"], 0, 10) == ([], None)
    asyncio.run(shard.close())


def test_expired_finds_only_anonymous_profiles_unchanged_since_the_cutoff() -> None:
    clock = Clock(10 * DAY)
    engine = Engine(clock=clock)
    for pid, idents in [("anon", [("anonymous", "c1")]), ("dev", [("device", "d1")]),
                        ("both", [("anonymous", "c2"), ("device", "d2")]),
                        ("known", [("email", "e@x"), ("device", "d3")]), ("bare", [])]:
        engine.apply(engine.plan_upsert(UpsertSpec(pid, [(SET, "n", 1)], idents)))
    clock.now = 30 * DAY
    engine.apply(engine.plan_upsert(UpsertSpec("fresh", [(SET, "n", 1)],
                                               [("device", "d4")])))
    kinds = ["anonymous", "device"]
    found, end = engine.expired(20 * DAY, kinds, 0, 100)
    assert sorted(engine.pids[d] for d in found) == ["anon", "both", "dev"] and end is None
    assert engine.expired(20 * DAY, ["anonymous"], 0, 100)[0] == [0]
    found, end = engine.expired(20 * DAY, kinds, 0, 1)  # a batch at a time
    assert len(found) == 1 and end is not None
    assert engine.expired(20 * DAY, kinds, 0, 100, budget=1)[1] == 1  # bounded work
    assert engine.expired(5 * DAY, kinds, 0, 100) == ([], None)


def test_suppression_survives_restarts_and_snapshots(tmp_path: Path) -> None:
    clock = Clock(1_000)
    shard = _open(tmp_path, clock)

    async def erase() -> None:
        engine = shard.engine
        await shard.commit(engine.plan_upsert(UpsertSpec("p", [(SET, "n", 1)],
                                                         [("email", "p@x")])))
        change = engine.plan_erase([engine.dense_of["p"]], suppress=True)
        assert await shard.commit(change) == [("p", [], [["email", "p@x"]])]
        await shard.close()

    asyncio.run(erase())

    def refused(shard: Shard) -> None:
        engine = shard.engine
        for spec in (UpsertSpec("q", [], [("email", "p@x")]), UpsertSpec("p", [(SET, "n", 2)])):
            with pytest.raises(FailedPrecondition, match="suppression"):
                engine.plan_upsert(spec)
        for rows in ([("p", {"n": 1}, [])], [("r", {"n": 1}, [("email", "p@x")])]):
            with pytest.raises(FailedPrecondition, match="suppression"):  # bulk loads too
                engine.plan_load(rows)
        claimed = engine.plan_claims([["email", "p@x", "q", None]]).result
        assert claimed == [[None, 0.0, False, False, True]]
        engine.plan_upsert(UpsertSpec("q", [], [("email", "q@x")]))  # others are fine

    shard = _open(tmp_path, clock)
    refused(shard)
    asyncio.run(shard.snapshot())
    asyncio.run(shard.close())
    shard = _open(tmp_path, clock)
    refused(shard)
    assert len(shard.engine.suppressed) == 2  # the id and the identifier, hashed
    assert not any(b"p@x" in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    asyncio.run(shard.close())
    other = _open(tmp_path, clock, salt=b"t" * 32)  # another salt: other hashes
    other.engine.plan_upsert(UpsertSpec("q", [], [("email", "p@x")]))
    asyncio.run(other.close())


def test_the_salt_file_is_made_once_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "rights.salt"
    salt = load_salt(path)
    assert len(salt) == 32 and load_salt(path) == salt
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert salt_id(salt) != salt_id(load_salt(tmp_path / "other.salt"))
    path.write_text("not hex\n")
    with pytest.raises(ValueError, match="64 hex digits"):
        load_salt(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_salt(tmp_path / "missing", create=False)


def test_a_bulk_export_is_the_shards_state_at_its_start(tmp_path: Path) -> None:
    """The export copies its profiles when it starts: changes made while it streams (an
    update, a deletion, a new profile) do not show in it."""
    clock = Clock(1_000)
    shard = asyncio.run(Shard.open(ShardConfig(data_dir=None, clock=clock)))
    engine = shard.engine
    for i in range(50):
        engine.apply(engine.plan_upsert(UpsertSpec(f"p{i}", [(SET, "n", i)])))
    export = BulkExport(shard, engine.visible())
    chunks = export.chunks(10, "lines")
    first = next(chunks)
    clock.now = 2_000
    engine.apply(engine.plan_upsert(UpsertSpec("p45", [(SET, "n", -1)])))
    engine.apply(engine.plan_delete("p46"))
    engine.apply(engine.plan_upsert(UpsertSpec("p99", [(SET, "n", 99)])))
    rows = [json.loads(line) for _, data in [first, *chunks] for line in data.splitlines()]
    assert [r["attributes"]["n"] for r in rows] == list(range(50))
    assert {r["changed"] for r in rows} == {"1970-01-01T00:16:40Z"}


def test_bulk_export_json_lines_are_the_records_of_the_packed_form() -> None:
    """The shards' JSON Lines writer (exportformat.lines, made without a record dict the
    slow way) gives the bytes json_lines(decode(..., "iso")) gives, for values that look
    like the JSON around them, timestamps, lists, unknown times (0) and an empty chunk."""
    from datetime import UTC, datetime
    from itertools import repeat

    import numpy as np

    from memstore import exportformat

    shard = asyncio.run(Shard.open(ShardConfig(data_dir=None, clock=Clock(1_000))))
    engine = shard.engine
    tricky = ['},{"id":"x"}', '"12":', "back\\slash\"", "ünïcødé ✓", "line\nbreak", ""]
    for i, text in enumerate(tricky * 3):
        attrs = [(SET, "s", text), (SET, "n", -i), (SET, "f", i / 3), (SET, "ok", i % 2 == 0),
                 (SET, "tags", [text, "b"])]
        if i % 3:
            attrs.append((SET, "at", datetime(2026, 1, 2, 3, 4, 5, i, tzinfo=UTC)))
        engine.apply(engine.plan_upsert(UpsertSpec(f"p{i}", attrs, [("email", f"{text}@{i}")])))
    export = BulkExport(shard, engine.visible())
    taken = engine.blobs.take(engine.visible().to_array())  # as they were at the export
    assert export.blobs(0, 5) + export.blobs(5, 11) + export.blobs(11) == export.blobs() == taken
    created = np.array([0 if i % 4 == 0 else 1_000 + i for i in range(len(export))], np.uint32)
    entries = list(zip(export.pids, export.blobs(), repeat(0), created.tolist(),
                       export.changed.tolist()))
    want = exportformat.json_lines(exportformat.decode([export.table], entries, "iso"))
    got = exportformat.lines(export.table, export.pids, export.blobs(), created,
                             export.changed)
    assert got == want
    assert len(got.splitlines()) == len(export) == 18
    assert exportformat.lines(export.table, [], [], created[:0], created[:0]) == b""


def test_packed_chunks_read_a_column_at_a_time_as_record_by_record() -> None:
    """A shard's COLUMNS chunks (what Parquet is written from) and exportformat.columns of
    a packed chunk give the values decode gives, a column per attribute with None where a
    profile has none, for a shard's chunk (one table) and for one whose profiles were read
    with different tables; the JSON Lines writer leaves out an attribute its table does not
    name (as day records are)."""
    from datetime import UTC, datetime

    import msgpack
    import numpy as np

    from memstore import exportformat

    shard = asyncio.run(Shard.open(ShardConfig(data_dir=None, clock=Clock(1_000))))
    engine = shard.engine
    for i in range(12):
        attrs = [(SET, "n", i), (SET, "tags", ["a", f"t{i}"])]
        if i % 3:
            attrs += [(SET, "s", f"s{i}"), (SET, "at", datetime(2026, 1, 2, 3, 4, i, tzinfo=UTC))]
        engine.apply(engine.plan_upsert(UpsertSpec(f"p{i}", attrs, [("email", f"e{i}")])))
    export = BulkExport(shard, engine.visible())
    names = ["s", "n", "at", "tags", "missing"]
    [(count, packed)] = list(export.chunks(100))
    records = exportformat.decode(*msgpack.unpackb(packed, strict_map_key=False), "micros")

    def expect(records: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": [r["id"] for r in records],
                "identifiers": [r["identifiers"] for r in records],
                "merged_ids": [r["merged_ids"] for r in records],
                "version": [r["version"] for r in records],
                "created": [1_000] * len(records), "changed": [1_000] * len(records),
                "attributes": [[r["attributes"].get(n) for r in records] for n in names]}

    got = exportformat.columns(packed, names)
    assert count == 12 and got == expect(records)
    [(_, made)] = list(export.chunks(100, "columns"))  # a shard's COLUMNS: the same
    assert exportformat.unpack_columns(made, names) == got
    [(_, empty)] = list(BulkExport(shard, engine.visible() & BitMap()).chunks(100, "columns"))
    assert exportformat.unpack_columns(empty, names)["attributes"] == [[] for _ in names]
    at = datetime(2026, 1, 2, 3, 4, 1, tzinfo=UTC)
    assert got["attributes"][2][1] == int(at.timestamp()) * 1_000_000  # as stored
    assert got["attributes"][0][0] is None and got["attributes"][4] == [None] * 12
    # Two tables: the second numbers the same attributes the other way round.
    table = export.table
    flipped = {len(table) - 1 - aid: spec for aid, spec in table.items()}
    entries = msgpack.unpackb(packed, strict_map_key=False)[1]
    mixed = []
    for k, (pid, blob, _, created, changed) in enumerate(entries):
        if k % 2:
            version, attrs, idents, merged = msgpack.unpackb(blob, strict_map_key=False)
            attrs = {len(table) - 1 - aid: v for aid, v in attrs.items()}
            blob = msgpack.packb([version, attrs, idents, merged])
        mixed.append([pid, blob, k % 2, created, changed])
    again = msgpack.packb([[table, flipped], mixed])
    assert exportformat.columns(again, names) == got
    assert exportformat.columns(msgpack.packb([[table], []]), names)["attributes"] == \
        [[] for _ in names]
    # Lines from a table without "s": the same as the records without it.
    narrower = {aid: spec for aid, spec in table.items() if spec[0] != "s"}
    want = exportformat.json_lines(exportformat.decode(
        [narrower], [[e[0], e[1], 0, e[3], e[4]] for e in entries], "iso"))
    created = np.full(len(export), 1_000, np.uint32)
    got_lines = exportformat.lines(narrower, export.pids, export.blobs(), created, created)
    assert got_lines == want and b'"s":' not in got_lines
    assert [json.loads(x)["attributes"].get("s") for x in got_lines.splitlines()] == \
        [None] * 12
