"""Replaying a bulk load's or a tracked batch's record a column at a time (issue 29).

A load's log record carries the columns its planner checked (memstore.engine.change.Load),
and a tracked batch's the index changes it planned (memstore.engine.tracking.Tracked), so
recovery and replicas index them as the live write did, without decoding a blob.
Replaying that way must rebuild exactly what applying each record's after-images one
profile at a time rebuilds: hypothesis drives random logs of loads (plain and
dictionary-coded columns, new profiles and ones that exist; several in a row, which
recovery joins into one), tracked batches (existing and new profiles, past days, repeat
counts), upserts, merges, deletes, slot ownership changes and snapshots, then compares
the two replays with the live engine.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest.mock import patch

import msgpack
import numpy as np
import ormsgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap

import memstore.engine.core as core_module
import memstore.shard as shard_module
from memstore.engine.change import SET, UNSET, Image, UpsertSpec, raw_array
from memstore.engine.columnar import Coded, Columns
from memstore.engine.core import Engine
from memstore.engine.tracking import FAST_FROM
from memstore.errors import FailedPrecondition
from memstore.hashslot import SLOT_COUNT, slot_of
from memstore.index.bitmap_index import RangeIndex
from memstore.shard import (
    IMAGE_COLUMNS_FROM,
    Shard,
    ShardConfig,
    _LoadRun,
    _new_rows,
    encode_image_columns,
    images_of,
    load_snapshot,
    named_in,
    replay,
)
from memstore.storage import wal_format
from memstore.storage.snapshot_file import load_newest
from memstore.storage.wal_reader import LogCorruptError, read_log
from memstore.storage.wal_writer import SyncPolicy
from tests.test_mutation_storage import full_state

T0_MICROS = 1_735_689_600_000_000  # 2025-01-01
PIDS = [f"p{i}" for i in range(12)]  # existing ids a load or an upsert may name
EVENTS = ["view", "buy"]  # tracked in batches (declared first: batches take the column path)
DAY = 86_400_000_000
EMAILS = [f"e{i}@x" for i in range(8)]  # identifiers two profiles may both claim


@st.composite
def loads(draw: st.DrawFn, fresh: bool = False) -> Columns:
    """A columnar batch: list columns (repeating or unique values, absent rows) and coded
    ones (plain and list), with ids and identifiers mostly new (all new if `fresh`)."""
    n = draw(st.integers(1, 40))
    # ids that exist, lists to tidy: the general planner's; otherwise, a load
    known = not fresh and draw(st.booleans())
    ids = [draw(st.sampled_from(PIDS)) if known and draw(st.integers(0, 9)) == 0
           else f"L{draw(st.integers(0, 10**6))}" for _ in range(n)]

    def column(values: st.SearchStrategy[Any]) -> list[Any]:  # a quarter absent
        return [None if draw(st.integers(0, 3)) == 0 else draw(values) for _ in range(n)]

    attributes: dict[str, Any] = {
        "country": column(st.sampled_from(["US", "CA", "DE"])),
        "name": [f"n{i}-{draw(st.integers(0, 3))}" for i in range(n)],  # mostly distinct
        "age": column(st.integers(-5, 120)),
        "score": column(st.floats(-1e6, 1e6, allow_nan=False)),
        "vip": column(st.booleans()),
        "tags": column(st.lists(st.sampled_from("abcd"), max_size=3, unique=not known)
                       .map(lambda tags: tags if known else sorted(tags))),
        "seen": column(st.integers(0, 400).map(lambda d: T0_MICROS + d * 86_400_000_000)),
    }
    codes = draw(st.lists(st.integers(-1, 2), min_size=n, max_size=n))
    attributes["plan"] = Coded(["free", "pro", "team"], np.array(codes, dtype=np.int32))
    lengths = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    items = [c for k in lengths for c in sorted(draw(st.sets(st.integers(0, 3), min_size=k,
                                                             max_size=k)))]
    attributes["topics"] = Coded(["art", "food", "golf", "jazz"], np.array(items, dtype=np.int32),
                                 np.array(lengths, dtype=np.int32))
    identifiers = [[["email", draw(st.sampled_from(EMAILS))]]
                   if known and draw(st.integers(0, 9)) == 0
                   else [["device", f"d{i}-{draw(st.integers(0, 10**6))}"]] for i in range(n)]
    return Columns(ids, attributes, identifiers, frozenset({"seen"}))


steps = st.one_of(
    st.tuples(st.just("load"), loads()),
    st.tuples(st.just("loads"), st.lists(loads(fresh=True), min_size=2, max_size=4)),
    st.tuples(st.just("upsert"), st.sampled_from(PIDS), st.sampled_from(["US", "CA", "FR"]),
              st.integers(0, 99), st.booleans()),
    st.tuples(st.just("link"), st.sampled_from(PIDS), st.sampled_from(EMAILS)),
    st.tuples(st.just("delete"), st.sampled_from(PIDS)),
    st.tuples(st.just("own"), st.integers(0, 3)),
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("track"), st.lists(
        st.tuples(st.sampled_from(PIDS) | st.integers(0, 30).map(lambda i: f"t{i}"),
                  st.sampled_from(EVENTS), st.integers(0, 40), st.integers(1, 300)),
        min_size=FAST_FROM, max_size=FAST_FROM + 40)),
)


async def _write(data: Path, plan: list[tuple[Any, ...]], clock: Callable[[], float]
                 ) -> tuple[Any, ...]:
    """Run the steps on a shard over `data`; returns the live engine's state and times."""
    shard = await Shard.open(ShardConfig(data_dir=data, sync=SyncPolicy.OFF,
                                         stop_snapshot_timeout=0, clock=clock))
    engine, epoch = shard.engine, 0
    await _seed(shard)
    for at, step in enumerate(plan):
        try:
            epoch = await _step(shard, step, epoch, at)
        except FailedPrecondition:  # a write to a slot given up: refused, nothing logged
            pass
    state = _state(engine)
    await shard.close()
    return state


async def _seed(shard: Shard) -> None:
    """Declare the attributes the compared queries name (tests.test_durability.QUERIES),
    with the kinds the loads send, and the tracked events' attributes."""
    await shard.commit(shard.engine.plan_upsert(UpsertSpec("seed", [
        (SET, "country", "US"), (SET, "age", 30), (SET, "score", 0.5), (SET, "tags", ["a"]),
        (SET, "seen", datetime.fromtimestamp(T0_MICROS / 1e6, UTC))])))
    for event in EVENTS:
        await shard.commit(shard.engine.plan_track("seed", event,
                                                   int(shard.engine.clock() * 1e6)))


def _state(engine: Engine) -> tuple[Any, ...]:
    """full_state, and when each dense id was created and last changed."""
    return full_state(engine), engine.created.tolist(), engine.changed.tolist()


def _ticking(step: float) -> Callable[[], float]:
    """A wall clock `step` seconds further on at each reading: of the changes a few
    readings apart, some are stamped in the same second and some are not."""
    now = itertools.count(time.time(), step)
    return lambda: next(now)


async def _step(shard: Shard, step: tuple[Any, ...], epoch: int, at: int) -> int:
    """One step of a plan (the `at`-th); returns the shard's epoch after it."""
    engine, kind = shard.engine, step[0]
    if kind == "load":
        await shard.commit(engine.plan_columns(step[1]))
    elif kind == "loads":  # ids and identifiers none of the others name: loads all
        for i, batch in enumerate(step[1]):
            tag = f"{at}.{i}-"
            await shard.commit(engine.plan_columns(replace(
                batch, ids=[tag + pid for pid in batch.ids],
                identifiers=[[[k, tag + v] for k, v in idents]
                             for idents in batch.identifiers])))
    elif kind == "upsert":
        _, pid, country, age, unset = step
        await shard.commit(engine.plan_upsert(UpsertSpec(pid, [
            (SET, "country", country), (UNSET, "age", None) if unset else (SET, "age", age)])))
    elif kind == "link":
        await shard.commit(engine.plan_link(step[1], [("email", step[2])], create=True))
    elif kind == "delete":
        await shard.commit(engine.plan_delete(step[1]))
    elif kind == "own":  # give up the slots of some existing profiles (or take all back)
        gone = {slot_of(pid) for pid in list(engine.dense_of)[:step[1]]}
        await shard.set_ownership(epoch + 1, BitMap(set(range(SLOT_COUNT)) - gone))
        return epoch + 1
    elif kind == "track":  # days ago, counts past one byte: repeat slices, wide columns
        now = int(shard.engine.clock() * 1e6)
        await shard.commit(engine.plan_track_batch(
            [(pid, event, now - ago * DAY, count) for pid, event, ago, count in step[1]]))
    else:
        await shard.snapshot()
    return epoch


def _one_at_a_time(data: Path) -> Engine:
    """Recovery as before load records carried columns: the newest snapshot, then every
    record after it replayed from its after-images alone."""
    engine = Engine()
    start = 0
    reader = load_newest(data / "snapshots")
    if reader is not None:
        load_snapshot(engine, reader.sections())
        start = reader.lsn
    for record in read_log(data / "log", start):
        payload = record.payload
        if record.rtype in wal_format.CHANGE_RECORDS:
            logged = msgpack.unpackb(payload, strict_map_key=False)
            logged.pop("load", None)
            logged.pop("tracked", None)
            payload = ormsgpack.packb(logged, option=ormsgpack.OPT_NON_STR_KEYS)
        replay(engine, record.rtype, payload)
    return engine


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(st.lists(steps, min_size=1, max_size=12), st.sampled_from([_LoadRun.LIMIT, 30]),
       st.sampled_from([0.0, 0.6]), st.sampled_from([IMAGE_COLUMNS_FROM, 1]))
def test_batched_replay_rebuilds_what_replaying_each_image_does(
        plan: list[tuple[Any, ...]], run_limit: int, tick: float, columns_from: int) -> None:
    """Recovery joins consecutive loads' records into runs (of at most `run_limit`
    profiles: a small one cuts runs short too), stamped as each record was, and range
    indexes join consecutive tracked batches' changes (at most `run_limit` ids waiting,
    likewise): `tick` 0 is
    the wall clock (a plan's changes mostly in one second), 0.6 a clock that moves on
    0.6 s at each reading. `columns_from` 1: every change logs its images as columns
    (RECORD_COLUMNS: deletions, merges and upserts too), where most of these changes are
    too small to."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        with patch.object(shard_module, "IMAGE_COLUMNS_FROM", columns_from):
            live = asyncio.run(_write(data, plan, _ticking(tick) if tick else time.time))
        if columns_from == 1:  # (the log after the last snapshot's pruning)
            oldest = wal_format.list_segments(data / "log")[0][0]
            assert {r.rtype for r in read_log(data / "log", oldest)} <= {
                wal_format.RECORD_COLUMNS, wal_format.RECORD_SHARD_META}
        with patch.object(_LoadRun, "LIMIT", run_limit), \
                patch.object(RangeIndex, "PENDING_LIMIT", run_limit), \
                patch.object(RangeIndex, "REPLACING_LIMIT", run_limit):
            batched = asyncio.run(Shard.open(ShardConfig(data_dir=data, sync=SyncPolicy.OFF,
                                                         stop_snapshot_timeout=0)))
        try:
            assert _state(batched.engine) == live
        finally:
            asyncio.run(batched.close())
        assert _state(_one_at_a_time(data)) == live


def _written_and_recovered(data: Path, monkeypatch: pytest.MonkeyPatch,
                           writes: Callable[[Shard], Awaitable[None]]
                           ) -> tuple[tuple[Any, ...], Shard, list[bytes]]:
    """Run `writes` on a shard over `data` and close it (no stop snapshot); its state, the
    shard opened over `data` again, and the blobs that start-up decoded."""
    async def write() -> tuple[Any, ...]:
        shard = await Shard.open(ShardConfig(data_dir=data, stop_snapshot_timeout=0))
        await writes(shard)
        state = full_state(shard.engine)
        await shard.close()
        return state

    live = asyncio.run(write())
    decoded: list[bytes] = []
    real = core_module.decode
    monkeypatch.setattr(core_module, "decode", lambda blob: decoded.append(blob) or real(blob))
    shard = asyncio.run(Shard.open(ShardConfig(data_dir=data, stop_snapshot_timeout=0)))
    monkeypatch.undo()
    return live, shard, decoded


def test_replaying_a_load_decodes_no_profile(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A log of loads alone is replayed from its columns: not one blob is taken apart,
    and the profiles, identifiers and indexes are back."""
    seen = datetime.fromtimestamp(T0_MICROS / 1e6, UTC)
    rows = [(f"u{i}", {"country": ["US", "CA"][i % 2], "age": i % 90, "score": i / 7,
                       "tags": ["a", "b"][:i % 3], "seen": seen, "email": f"u{i}@x"},
             [("email", f"u{i}@x")]) for i in range(3000)]

    async def writes(shard: Shard) -> None:
        for start in range(0, len(rows), 1000):
            await shard.commit(shard.engine.plan_load(rows[start:start + 1000]))

    live, shard, decoded = _written_and_recovered(tmp_path, monkeypatch, writes)
    try:
        assert shard.recovery["replayed"] == 3 and shard.recovery["snapshot"] is None
        assert decoded == []
        assert full_state(shard.engine) == live
        engine = shard.engine
        assert engine.pids[engine.owner_dense("email", "u2999@x")] == "u2999"
    finally:
        asyncio.run(shard.close())


def test_replaying_tracked_batches_decodes_no_profile(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracked batches after a snapshot are replayed from the index changes their records
    carry: no blob is taken apart (the live batch decoded each profile once), and the
    profiles, their event aggregates and day records and every index are back."""
    now = int(time.time() * 1e6)

    async def writes(shard: Shard) -> None:
        await _seed(shard)  # declares the events' attributes: later batches take columns
        await shard.snapshot()
        for batch in range(4):  # new profiles, then the same ones again, on other days
            await shard.commit(shard.engine.plan_track_batch(
                [(f"u{(batch * 97 + i) % 700}", EVENTS[i % 2], now - (i % 9) * DAY, 1 + i % 4)
                 for i in range(500)]))

    live, shard, decoded = _written_and_recovered(tmp_path, monkeypatch, writes)
    try:
        assert shard.recovery["replayed"] == 4 and shard.recovery["snapshot"] is not None
        assert decoded == []
        assert full_state(shard.engine) == live
        assert shard.engine.profile(shard.engine.dense_of["u5"]).attributes["event.buy.count"] > 0
    finally:
        asyncio.run(shard.close())


@given(st.lists(st.tuples(st.text(max_size=6), st.none() | st.binary(max_size=24)),
                max_size=40),
       st.integers(0, 2**32 - 100), st.booleans())
@settings(max_examples=60, deadline=None)
def test_image_columns_give_back_the_images_logged(rows: list[tuple[str, bytes | None]],
                                                   first: int, consecutive: bool) -> None:
    """A RECORD_COLUMNS record's images (dense ids a range or not, blobs or none) read
    back as they were logged, through msgpack as the log holds them."""
    dense = range(first, first + len(rows)) if consecutive else [
        first + 3 * i + i % 2 for i in range(len(rows))]
    images = [Image(d, pid, blob) for d, (pid, blob) in zip(dense, rows, strict=True)]
    logged = msgpack.unpackb(ormsgpack.packb({"image_columns": encode_image_columns(images)}))
    assert images_of(logged) == images
    assert named_in(logged) == {image.dense: image.pid for image in images}
    if consecutive and rows:
        assert logged["image_columns"][0] == [first, first + len(rows)]


def test_image_columns_that_do_not_add_up_are_refused() -> None:
    """Columns whose lengths do not match the blob bytes (damage past the checksum, or a
    writer's bug) stop replay with what does not match, not with wrong profiles."""
    columns = encode_image_columns([Image(1, "a", b"xy"), Image(2, "b", b"z")])
    columns[3] = b"xyzw"
    with pytest.raises(ValueError, match="2 dense ids, 2 primary ids, 2 lengths and 4 blob"):
        images_of({"image_columns": columns})
    columns = encode_image_columns([Image(1, "a", b"xyz"), Image(2, "b", None)])
    columns[2] = raw_array(np.array([3, -2], dtype=np.int8))  # no length is below -1
    with pytest.raises(ValueError, match="do not match"):
        images_of({"image_columns": columns})


def test_a_load_record_whose_ids_are_not_a_run_is_replayed_from_its_images() -> None:
    """A load's record whose dense ids are logged as an array (not the range a load's
    are) joins no run: replay applies its images as they are."""
    images = [Image(5, "a", b"\x94\x01\x80\x90\x90"), Image(7, "b", b"\x94\x01\x80\x90\x90")]
    record = {"image_columns": encode_image_columns(images)}
    assert _new_rows(record, 5) is None
    record["image_columns"] = encode_image_columns([images[0]._replace(dense=6), images[1]])
    assert _new_rows(record, 6) is not None and _new_rows(record, 5) is None


def test_a_recovery_stopped_by_damage_mid_run_leaves_no_thread(tmp_path: Path) -> None:
    """Damage found while runs of loads go on (the second of three load records, runs of
    one record each: the first one's keys are on the directory's thread) stops start-up
    naming it, and the runs' directory thread is stopped with it."""
    rows = [(f"u{i}", {"country": "US", "age": i}, [("email", f"u{i}@x")])
            for i in range(3000)]

    async def write() -> None:
        shard = await Shard.open(ShardConfig(data_dir=tmp_path, stop_snapshot_timeout=0))
        await shard.commit(shard.engine.plan_upsert(UpsertSpec("seed", [
            (SET, "country", "US"), (SET, "age", 1)])))  # the loads declare nothing
        for start in range(0, len(rows), 1000):
            await shard.commit(shard.engine.plan_load(rows[start:start + 1000]))
        await shard.close()

    asyncio.run(write())
    records = list(read_log(tmp_path / "log", 0))
    assert [r.rtype for r in records] == [wal_format.RECORD_CHANGE] + [
        wal_format.RECORD_COLUMNS] * 3
    segment = wal_format.list_segments(tmp_path / "log")[0][1]
    raw = bytearray(segment.read_bytes())
    raw[wal_format.SEGMENT_HEADER_SIZE + records[2].lsn_start + 40] ^= 0x40
    segment.write_bytes(bytes(raw))
    added = []
    real = Engine.add_loaded

    def add_loaded(engine: Engine, *args: Any) -> None:
        added.append(engine._keys_builder is not None)
        real(engine, *args)

    with pytest.raises(LogCorruptError, match="checksum mismatch") as failed, \
            patch.object(_LoadRun, "LIMIT", 1000), patch.object(Engine, "add_loaded", add_loaded):
        asyncio.run(Shard.open(ShardConfig(data_dir=tmp_path, stop_snapshot_timeout=0)))
    # (while the error, and through its traceback the recovery's frames, are still held)
    assert failed.value.path == segment and added == [True]
    assert not [t.name for t in threading.enumerate()
                if t.name.startswith(("directory", "log-read-ahead"))]
