"""Storage behaviour the mutation run (docs/mutation-testing.md) found untested: recovery of
everything a shard keeps besides profiles (merge tables, slot ownership, claims) from the
log and from snapshots, the snapshot writer run in this process (it normally runs in a
forked child, where the mutation tool cannot see which tests reach it), and the details
of the log reader, writer and snapshot files that a changed line would break.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from pyroaring import BitMap

import memstore.shard as shard_module
import memstore.storage.snapshot_file as snapshot_module
from memstore.engine.change import SET, UpsertSpec
from memstore.engine.core import Engine
from memstore.engine.schema import Kind, Merge
from memstore.errors import Unavailable
from memstore.hashslot import SLOT_COUNT, slot_of
from memstore.index.bitmap_index import RangeIndex
from memstore.shard import Shard, ShardConfig, load_snapshot, replay, write_snapshot_file
from memstore.storage import wal_format as fmt
from memstore.storage.snapshot_file import (
    CURRENT,
    MAX_NAME,
    SnapshotError,
    SnapshotReader,
    SnapshotWriter,
    load_newest,
    prune,
    snapshot_name,
)
from memstore.storage.wal_reader import (
    LogCorruptError,
    TornTail,
    _backup_name,
    check,
    decode_segment,
    read_log,
    read_segment_bytes,
    repair,
    truncate_torn_tail,
)
from memstore.storage.wal_writer import LogFailedError, LogWriteError, LogWriter, SyncPolicy
from tests.test_durability import T0, random_writes, state_of
from tests.test_wal import CountingFsync, P, flip, payloads, segments, write_log


def full_state(engine: Engine) -> tuple[Any, ...]:
    """Everything a restart must give back: profiles, answers, aliases, claims (state_of),
    the cross-shard merge tables, slot ownership, the schema and every index."""
    indexes = {}
    for spec in engine.schema.by_id:
        if spec.id in engine.range_index:
            indexes[spec.name] = _range_values(engine.range_index[spec.id])
        elif spec.id in engine.value_index:  # which ids hold each value, in any order
            state = engine.value_index[spec.id].to_state()
            ones = np.frombuffer(state["one"][1], dtype="<u4").tolist()
            indexes[spec.name] = ({value: BitMap.deserialize(raw) for value, raw in state["maps"]},
                                  dict(zip(state["one"][0], ones)),
                                  list(engine.exists[spec.id]))
        elif spec.id in engine.day_index:  # who did the event each day, and the repeats
            indexes[spec.name] = [(day, list(who), [list(bits) for bits in repeats])
                                  for day, who, repeats in engine.day_index[spec.id].items()]
    owned = None if engine.owned_slots is None else list(engine.owned_slots)
    owners = {}  # every identifier, found through the directory
    for dense in engine.live:
        for kind, value in engine.profile(dense).identifiers:
            found = engine.owner_dense(kind, value)
            owners[kind, value] = None if found is None else engine.pids[found]
    return (state_of(Shard(ShardConfig(), engine, None)), owners, engine.held, engine.forwards,
            engine.decided, engine.registry, list(engine.held_dense), engine.epoch, owned,
            list(engine.foreign), len(engine.pids), engine.schema.to_state(), indexes)


def _range_values(index: RangeIndex) -> dict[int, int]:
    """The value each id holds in a range index, read from its bit slices: what it
    answers, whatever base and number of slices the order of its changes left it with
    (a range index joins batches of changes waiting for a read: RangeIndex.replace_many)."""
    state = index.to_state()
    held = dict.fromkeys(BitMap.deserialize(state["exists"]), 0)
    for i, raw in enumerate(state["slices"]):
        for dense in BitMap.deserialize(raw):
            assert dense in held, f"slice {i} holds {dense}, which holds no value"
            held[dense] += 1 << i
    return {dense: state["base"] + offset for dense, offset in held.items()}


async def merge_steps(shard: Shard, tag: str) -> None:
    """A merge absorbed here (RECORD_MERGE with images), a loser held here, a loser
    released here after a committed merge (forwards), and an aborted decision."""
    engine = shard.engine
    side = Engine()  # another shard, holding the loser absorbed here
    side.apply(side.plan_upsert(UpsertSpec(f"lx-{tag}", [(SET, "from_side", 7)],
                                           [("email", f"lx-{tag}@x")])))
    exported = side.plan_hold(f"lx-{tag}", f"t1-{tag}", f"s-{tag}").result
    await shard.commit(engine.plan_upsert(UpsertSpec(f"s-{tag}", [(SET, "x", 1)])))
    await shard.commit(engine.plan_absorb(f"t1-{tag}", [exported], link=(
        f"s-{tag}", [("email", f"lx-{tag}@x")], False)))
    for n in (2, 3):
        await shard.commit(engine.plan_upsert(UpsertSpec(f"l{n}-{tag}", [(SET, "x", n)],
                                                         [("email", f"l{n}-{tag}@x")])))
        await shard.commit(engine.plan_hold(f"l{n}-{tag}", f"t{n}-{tag}", f"far-{tag}"))
    await shard.commit(engine.plan_release(f"l3-{tag}", f"t3-{tag}", True))
    await shard.commit(engine.plan_decide(f"t4-{tag}", f"s-{tag}"))
    await shard.commit(engine.plan_register([(f"reg_{tag}", Kind.INT, True, Merge.SUM)]))


@pytest.mark.parametrize("snapshot", ["none", "middle", "end"])
def test_a_restart_restores_merge_tables_ownership_and_claims(tmp_path: Path,
                                                              snapshot: str) -> None:
    """From the log alone, from a snapshot plus the log after it, from a snapshot alone."""
    data = tmp_path / "data"

    async def before() -> tuple[Any, ...]:
        shard = await Shard.open(ShardConfig(data_dir=data))
        rng = random.Random(11)
        await random_writes(shard, rng, 150)
        await merge_steps(shard, "a")
        await shard.set_ownership(3, BitMap(range(SLOT_COUNT)))
        if snapshot == "middle":
            await shard.snapshot()
        await random_writes(shard, rng, 150)
        await merge_steps(shard, "b")
        # The shard gives up some slots: profiles in them become foreign.
        gone = {slot_of(pid) for pid in list(shard.engine.dense_of)[:5]}
        await shard.set_ownership(4, BitMap(set(range(SLOT_COUNT)) - gone))
        if snapshot == "end":
            await shard.snapshot()
        state = full_state(shard.engine)
        assert shard.engine.held and shard.engine.forwards and shard.engine.decided
        assert shard.engine.registry
        assert shard.engine.foreign
        await shard.close()
        return state

    async def after() -> tuple[tuple[Any, ...], dict[str, Any]]:
        shard = await Shard.open(ShardConfig(data_dir=data))
        state, recovery = full_state(shard.engine), shard.recovery
        await shard.close()
        return state, recovery

    expected = asyncio.run(before())
    state, recovery = asyncio.run(after())
    assert state == expected
    assert (recovery["snapshot"] is None) == (snapshot == "none")
    assert (recovery["replayed"] == 0) == (snapshot == "end")


def test_ownership_for_every_slot_again_is_restored_as_none(tmp_path: Path) -> None:
    """`None` (no --slots: every slot) is a state of its own, in the log and in snapshots."""
    data = tmp_path / "data"

    async def scenario(snapshot: bool) -> tuple[int, Any]:
        shard = await Shard.open(ShardConfig(data_dir=data))
        await shard.set_ownership(2, BitMap([1, 2]))
        await shard.set_ownership(3, None)
        if snapshot:
            await shard.snapshot()
        await shard.close()
        again = await Shard.open(ShardConfig(data_dir=data))
        found = again.engine.epoch, again.engine.owned_slots
        await again.close()
        return found

    assert asyncio.run(scenario(False)) == (3, None)
    assert asyncio.run(scenario(True)) == (3, None)


def test_the_snapshot_writer_run_in_process_loads_back_to_the_same_engine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write_snapshot_file as the forked child runs it, here in this process, with sections
    small enough that every kind of section repeats."""
    monkeypatch.setattr(shard_module, "SNAPSHOT_CHUNK", 7)
    monkeypatch.setattr(shard_module, "CLAIM_SLOTS_CHUNK", 2)
    monkeypatch.setattr(shard_module, "DIRECTORY_SLOTS_CHUNK", 1000)
    shard = asyncio.run(Shard.open(ShardConfig()))  # memory only: the engine is what counts

    async def fill() -> None:
        await random_writes(shard, random.Random(5), 200)
        await merge_steps(shard, "c")
        await shard.set_ownership(9, BitMap(range(0, SLOT_COUNT, 2)))

    asyncio.run(fill())
    engine = shard.engine
    started = time.monotonic()
    path, count, pause = write_snapshot_file(engine, tmp_path / "snaps", 4242, "shard-7", started)
    assert Path(path) == tmp_path / "snaps" / f"snap-{4242:020d}.snap"
    assert count == sum(blob is not None for blob in engine.blobs) > 7
    assert 0 <= pause <= time.monotonic() - started
    reader = load_newest(tmp_path / "snaps")
    assert reader is not None and reader.lsn == 4242
    names = [name for name, _ in reader.sections()]
    assert names[0] == "meta" and names[1] == "merges"
    assert names.count("claims") == -(-sum(1 for _ in engine.claims.by_slot()) // 2) > 1
    assert names.count("rows") == -(-len(engine.live) // 7)
    directory = engine.directory
    assert directory.tombstones <= len(directory) // 8  # (else its entries: below)
    assert names.count("directory-slots") == -(-directory.capacity // 1000) > 1
    assert "directory" not in names and names.count("aliases") == 1
    assert "profiles" not in names
    assert names.count("index") == sum(spec.indexed for spec in engine.schema.by_id)
    meta = msgpack.unpackb(next(payload for name, payload in reader.sections()
                                if name == "meta"))
    assert (meta["version"], meta["shard"], meta["next_dense"]) == (4, "shard-7",
                                                                   len(engine.pids))
    restored = Engine()
    load_snapshot(restored, reader.sections())
    assert full_state(restored) == full_state(engine)
    assert tables(restored) == tables(engine)
    assert restored.directory.capacity == directory.capacity  # copied, not built again
    # Version 3's directory (its entries, a table built from them on loading) loads the same.
    entries = Engine()
    load_snapshot(entries, _directory_entries(list(reader.sections())))
    assert tables(entries) == tables(engine)
    # Version 2's rows (a list of blobs, not joined with their lengths) load the same.
    listed = Engine()
    load_snapshot(listed, [(name, _listed_blobs(payload) if name == "rows" else payload)
                           for name, payload in reader.sections()])
    assert tables(listed) == tables(engine)
    # A snapshot written before `rows` (each profile a [dense, id, blob] row, its blob
    # decoded on loading) loads to the same engine.
    older = Engine()
    load_snapshot(older, legacy_sections(engine, list(reader.sections())))
    assert full_state(older) == full_state(engine)
    assert tables(older) == tables(engine)


def _directory_entries(sections: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """`directory-slots` sections (version 4) as version 3's one `directory` section: the
    live entries, keys little-endian u64 and dense ids u32."""
    out: list[tuple[str, bytes]] = []
    keys, owners = [], []
    for name, payload in sections:
        if name != "directory-slots":
            out.append((name, payload))
            continue
        _, _, raw_keys, raw_owners = msgpack.unpackb(payload)
        live = np.frombuffer(raw_keys, dtype="<u8") > 1
        keys.append(np.frombuffer(raw_keys, dtype="<u8")[live])
        owners.append(np.frombuffer(raw_owners, dtype="<u4")[live])
    out.insert(1, ("directory", msgpack.packb([np.concatenate(keys).tobytes(),
                                               np.concatenate(owners).tobytes()])))
    return out


def _listed_blobs(rows: bytes) -> bytes:
    """A version 3 `rows` payload as version 2 wrote it: the blobs a list."""
    dense, pids, joined, raw_lengths, slots = msgpack.unpackb(rows)
    ends = np.cumsum(np.frombuffer(raw_lengths, dtype="<u4")).tolist()
    blobs = [joined[end - size:end] for end, size in zip(ends, np.diff([0, *ends]).tolist(),
                                                          strict=True)]
    return msgpack.packb([dense, pids, blobs, slots], use_bin_type=True)  # type: ignore[no-any-return]


def tables(engine: Engine) -> tuple[Any, ...]:
    """The arrays start-up fills from `rows`, `directory` and `aliases` sections."""
    live = list(engine.live)
    keys, owners = engine.directory.arrays()
    return (engine.pids, engine.blobs, engine.dense_of, live,
            [engine.slots[d] for d in live], sorted(zip(keys.tolist(), owners.tolist())),
            engine.aliases)


def legacy_sections(engine: Engine, sections: list[tuple[str, bytes]], chunk: int = 5
                    ) -> list[tuple[str, bytes]]:
    """`sections` as the snapshot format before `rows` had them: `profiles` chunks of
    [[dense, primary id, blob], ...] instead of rows, directory and aliases."""
    out: list[tuple[str, bytes]] = []
    for name, payload in sections:
        if name in ("rows", "directory", "aliases"):
            continue
        if name == "times" and not any(n == "profiles" for n, _ in out):
            live = list(engine.live)
            for start in range(0, len(live), chunk):
                out.append(("profiles", msgpack.packb(
                    [[d, engine.pids[d], engine.blobs[d]] for d in live[start:start + chunk]])))
        out.append((name, payload))
    return out


def test_a_snapshot_without_merge_tables_writes_no_merges_section(tmp_path: Path) -> None:
    engine = Engine()
    engine.apply(engine.plan_upsert(UpsertSpec("p", [
        (SET, "country", "US"), (SET, "age", 30), (SET, "tags", ["b"]), (SET, "score", 0.7),
        (SET, "seen", T0)])))
    path, count, _ = write_snapshot_file(engine, tmp_path, 1, "s", time.monotonic())
    assert count == 1
    assert [name for name, _ in SnapshotReader(path).sections()] == [
        "meta", "rows", "times", *["index"] * 5]  # no identifiers, no aliases
    restored = Engine()
    load_snapshot(restored, SnapshotReader(path).sections())
    assert full_state(restored) == full_state(engine)


def test_unknown_records_and_sections_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown log record type 99"):
        replay(Engine(), 99, b"")
    with pytest.raises(ValueError, match="unknown snapshot section 'mystery'"):
        load_snapshot(Engine(), [("mystery", b"")])


# ---------------------------------------------------------------------- the log's damage


def _header(base: int = 0, version: int = fmt.FORMAT_VERSION,
            magic: bytes = fmt.SEGMENT_MAGIC) -> bytes:
    head = fmt.SEGMENT_HEADER.pack(magic, version, base)
    return head + fmt.SEGMENT_CRC.pack(zlib.crc32(head))


def _frame(payload: bytes, rtype: int = P, length: int | None = None,
           crc: int | None = None) -> bytes:
    good = zlib.crc32(payload, zlib.crc32(bytes((rtype,))))
    return fmt.FRAME_HEADER.pack(len(payload) if length is None else length,
                                 good if crc is None else crc, rtype) + payload


H = fmt.SEGMENT_HEADER_SIZE
ONE = _frame(b"one")  # 12 bytes
DAMAGE = {  # segment bytes read as an older segment (last=False): (offset, reason)
    "header cut short": (b"MSLOG", 0, "segment header cut short"),
    "bad magic": (_header(magic=b"NOTLOG") + ONE, 0, "bad segment header (magic or checksum)"),
    "bad header checksum": (_header()[:-1] + b"\x00" + ONE, 0,
                            "bad segment header (magic or checksum)"),
    "unknown version": (_header(version=9) + ONE, 0, "unknown log format version 9"),
    "base not the name's": (_header(base=100) + ONE, 0,
                            "header says base LSN 100, file name says 0"),
    "frame header cut short": (_header() + ONE + b"\x01\x02", H + len(ONE),
                               "frame header cut short"),
    "impossible length": (_header() + ONE + _frame(b"x", length=fmt.MAX_PAYLOAD + 1),
                          H + len(ONE), f"impossible record length {fmt.MAX_PAYLOAD + 1}"),
    "longest length past the end": (_header() + _frame(b"x", length=fmt.MAX_PAYLOAD), H,
                                    "record runs past the end of the segment"),
    "record past the end": (_header() + ONE + _frame(b"x", length=5), H + len(ONE),
                            "record runs past the end of the segment"),
    "checksum mismatch": (_header() + _frame(b"two", crc=1) + ONE, H, "checksum mismatch"),
    "unknown record type": (_header() + ONE + _frame(b"t", rtype=9), H + len(ONE),
                            "unknown record type 9"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damage_names_its_file_offset_and_reason(tmp_path: Path, damage: str) -> None:
    data, offset, reason = DAMAGE[damage]
    path = tmp_path / fmt.SEGMENT_NAME.format(base_lsn=0)
    path.write_bytes(data)
    with path.open("rb") as f, pytest.raises(LogCorruptError) as info:
        list(decode_segment(f, path=path, base=0, last=False))
    assert (info.value.path, info.value.offset, info.value.reason) == (path, offset, reason)
    assert str(info.value) == (f"damaged log: {path} at offset {offset}: {reason} (run "
                               "`memstore check` and `memstore repair` on the data directory)")


def test_a_torn_end_of_an_older_segment_is_damage() -> None:
    data = _header() + ONE + ONE[:5]
    assert read_segment_bytes(data)[-1] == TornTail(Path("<memory>"), H + len(ONE), 5)
    with pytest.raises(LogCorruptError, match="frame header cut short"):
        read_segment_bytes(data, last=False)


def test_a_record_of_the_largest_length_is_read_back() -> None:
    payload = bytes(fmt.MAX_PAYLOAD)
    records = read_segment_bytes(_header() + _frame(payload))
    assert [(r.lsn_start, r.lsn_end, len(r.payload)) for r in records] == [
        (0, fmt.FRAME_HEADER_SIZE + fmt.MAX_PAYLOAD, fmt.MAX_PAYLOAD)]


def test_the_largest_length_cut_short_at_the_end_of_the_newest_segment_is_torn() -> None:
    data = _header() + ONE + _frame(b"\x07" * 30, length=fmt.MAX_PAYLOAD)
    *records, torn = read_segment_bytes(data)
    assert [r.payload for r in records] == [b"one"]
    assert torn == TornTail(Path("<memory>"), H + len(ONE), 9 + 30)


def test_a_newest_segment_with_a_nonzero_first_byte_is_damage_not_a_zero_tail() -> None:
    with pytest.raises(LogCorruptError, match="bad segment header"):
        read_segment_bytes(b"M" + bytes(40))
    assert read_segment_bytes(bytes(41)) == [TornTail(Path("<memory>"), 0, 41)]


def test_a_bad_length_before_a_last_record_ending_at_the_end_of_file_is_damage() -> None:
    """The whole record after a damaged length ends exactly at end-of-file: it must still
    be found (else the cut would drop it as a torn tail)."""
    data = _header() + ONE + _frame(b"two", length=1000) + _frame(b"three")
    with pytest.raises(LogCorruptError, match="record runs past the end") as info:
        read_segment_bytes(data)
    assert info.value.offset == H + len(ONE)


def test_a_torn_record_whose_bytes_look_like_a_frame_header_is_still_torn() -> None:
    """A header-shaped run of bytes (length 0, type 1) inside the torn record is not a whole
    record: its checksum does not match."""
    torn_payload = bytes(8) + b"\x01" + bytes(5)
    data = _header() + ONE + _frame(torn_payload, length=500)
    *records, torn = read_segment_bytes(data)
    assert [r.payload for r in records] == [b"one"] and isinstance(torn, TornTail)


@pytest.mark.parametrize("shift", [-3, 3], ids=["overlap", "gap"])
def test_segments_that_do_not_chain_are_damage(tmp_path: Path, shift: int) -> None:
    first = tmp_path / fmt.SEGMENT_NAME.format(base_lsn=0)
    first.write_bytes(_header() + ONE)
    base = len(ONE) + shift
    second = tmp_path / fmt.SEGMENT_NAME.format(base_lsn=base)
    second.write_bytes(_header(base) + ONE)
    with pytest.raises(LogCorruptError) as info:
        list(read_log(tmp_path))
    what = "gap in" if shift > 0 else "overlap in"
    assert (info.value.path, info.value.offset, info.value.reason) == (
        second, 0, (f"{what} the log: {first.name} ends at LSN {len(ONE)}, the next segment "
                   f"starts at {base}"))


class FsyncSpy:
    """os.fsync recording the path of every descriptor it syncs."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, fd: int) -> None:
        self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        os.fsync(fd)


def test_cutting_a_torn_tail_syncs_the_file_and_its_directory(tmp_path: Path) -> None:
    write_log(tmp_path, payloads(3))
    scan = read_log(tmp_path)
    list(scan)
    assert truncate_torn_tail(scan) == 0 and scan.torn is None  # nothing torn: nothing cut
    segment = segments(tmp_path)[-1]
    with segment.open("ab") as f:
        f.write(b"\x05\x00")
    scan = read_log(tmp_path)
    list(scan)
    spy = FsyncSpy()
    assert truncate_torn_tail(scan, spy) == 2
    assert scan.torn is None
    assert spy.paths == [str(segment.resolve()), str(tmp_path.resolve())]


def test_check_reports_in_words(tmp_path: Path) -> None:
    assert str(check(tmp_path)) == "log: 0 segments, 0 records, 0 bytes, LSN 0..0\nok"
    ends = write_log(tmp_path, payloads(40), segment_bytes=100)
    files = segments(tmp_path)
    writer = LogWriter.open(tmp_path)
    writer.remove_segments_before(int(files[2].name[:20]))
    asyncio.run(writer.close())
    first = int(files[2].name[:20])
    with files[-1].open("ab") as f:
        f.write(b"\x05\x00")
    size = sum(p.stat().st_size for p in segments(tmp_path))
    report = check(tmp_path)
    assert report.first_lsn == first and report.end_lsn == ends[-1]
    assert str(report) == (
        f"log: {len(files) - 2} segments, {report.records} records, {size} bytes, "
        f"LSN {first}..{ends[-1]}\n"
        f"torn record at the end: {files[-1]} offset {files[-1].stat().st_size - 2} "
        "(2 bytes; cut off at next start-up)\nok")


def test_backup_names_never_overwrite_an_earlier_backup(tmp_path: Path) -> None:
    path = tmp_path / "00000000000000000000.log"
    first = _backup_name(path, "STAMP")
    assert first.name == f"{path.name}.broken-STAMP"
    first.touch()
    second = _backup_name(path, "STAMP")
    assert second.name == f"{path.name}.broken-STAMP-1"
    second.touch()
    assert _backup_name(path, "STAMP").name == f"{path.name}.broken-STAMP-2"


def test_repair_of_damage_in_the_first_record_keeps_the_header_and_syncs(tmp_path: Path
                                                                        ) -> None:
    write_log(tmp_path, payloads(30), segment_bytes=120)
    files = segments(tmp_path)
    flip(files[0], H + fmt.FRAME_HEADER_SIZE)  # the first record's payload
    sizes = [p.stat().st_size for p in files]
    spy = FsyncSpy()
    report = repair(tmp_path, spy)
    assert report.cut_at == (files[0], H)
    assert report.bytes_removed == sizes[0] - H + sum(sizes[1:])
    assert files[0].stat().st_size == H  # the header stays: the log starts there again
    backup = report.backups[0]
    assert re.fullmatch(rf"{files[0].name}\.broken-\d{{8}}T\d{{6}}Z", backup.name)
    assert [p.name for p in report.moved_aside] == [
        f"{p.name}.broken-{backup.name.rsplit('-', 1)[1]}" for p in files[1:]]
    assert str(backup.resolve()) in spy.paths and spy.paths[-1] == str(tmp_path.resolve())
    assert list(read_log(tmp_path)) == []
    assert str(report).endswith("backups: " + ", ".join(map(str, report.backups)))


# ---------------------------------------------------------------------- the log writer


async def _turns_until(done: Any, limit: float = 10.0) -> None:
    """Wait until `done()` (an fsync on the writer's thread); fail, not hang, if it never
    is."""
    give_up = time.monotonic() + limit
    while not done():
        assert time.monotonic() < give_up, f"not done in {limit} s"
        await asyncio.sleep(0.001)


def test_an_idle_everysec_log_is_not_synced_again(tmp_path: Path) -> None:
    """The background loop syncs only what is not durable yet (driven here with a zero
    interval, one loop pass per event-loop turn, no clock involved)."""
    fsync = CountingFsync()

    async def go() -> None:
        w = LogWriter.open(tmp_path, sync=SyncPolicy.EVERYSEC, fsync=fsync)
        w.everysec_interval = 0
        lsn = w.append(P, b"x")
        await _turns_until(lambda: w.durable_lsn >= lsn)
        calls = fsync.calls
        for _ in range(50):
            await asyncio.sleep(0)
        assert fsync.calls == calls and w._background is not None
        assert not w._background.done()
        await w.close()

    asyncio.run(go())


def test_a_failed_background_fsync_fails_the_log_and_close_still_works(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fsync = CountingFsync()

    async def go() -> None:
        w = LogWriter.open(tmp_path, sync=SyncPolicy.EVERYSEC, fsync=fsync)
        w.everysec_interval = 0
        fsync.broken = True
        w.append(P, b"x")
        await _turns_until(lambda: w.failed)
        assert w._background is not None
        for _ in range(5):
            await asyncio.sleep(0)
        assert w._background.done() and w._background.exception() is None
        await w.close()  # the background task ended quietly
        with pytest.raises(LogFailedError):
            w.append(P, b"y")

    with caplog.at_level("ERROR", logger="memstore.log"):
        asyncio.run(go())
    assert [r.getMessage() for r in caplog.records] == [
        ("log failed: fsync failed: [Errno 5] injected fsync failure; refusing writes until "
        "restart")]


def test_everysec_appends_work_without_an_event_loop(tmp_path: Path) -> None:
    """Tools append with no running loop: nothing syncs in the background then."""
    w = LogWriter.open(tmp_path, sync=SyncPolicy.EVERYSEC)
    lsn = w.append(P, b"x")
    assert w._background is None and w.end_lsn == lsn
    asyncio.run(w.close())
    assert [r.payload for r in read_log(tmp_path)] == [b"x"]


# ---------------------------------------------------------------------- snapshot files


def test_a_snapshot_records_when_it_was_made_and_makes_its_directories(tmp_path: Path
                                                                       ) -> None:
    before = time.time_ns() // 1000
    with SnapshotWriter.create(tmp_path / "a" / "b" / "snaps", 5) as writer:
        writer.write("meta", b"m")
        path = writer.commit()
    reader = SnapshotReader(path)
    assert before <= reader.created_us <= time.time_ns() // 1000
    assert (reader.lsn, reader.section_count) == (5, 1)


def test_a_committed_snapshot_takes_no_more_writes(tmp_path: Path) -> None:
    writer = SnapshotWriter.create(tmp_path, 1)
    writer.commit()
    for call in (lambda: writer.write("x", b""), writer.commit):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == "snapshot already committed or aborted"
    writer.abort()  # after commit: nothing to drop, no error
    writer.abort()
    assert [p.name for p in sorted(tmp_path.iterdir())] == [CURRENT, snapshot_name(1)]


def test_section_limits_are_inclusive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot_module, "MAX_SECTION", 16)
    with SnapshotWriter.create(tmp_path, 1) as writer:
        writer.write("n" * MAX_NAME, bytes(16))
        with pytest.raises(ValueError) as name:
            writer.write("n" * (MAX_NAME + 1), b"")
        assert str(name.value) == f"section name longer than {MAX_NAME} bytes"
        with pytest.raises(ValueError) as size:
            writer.write("s", bytes(17))
        assert str(size.value) == "section of 17 bytes exceeds 16"
        path = writer.commit()
    assert [(n, len(p)) for n, p in SnapshotReader(path).sections()] == [("n" * MAX_NAME, 16)]


def test_a_snapshot_damaged_after_it_was_verified_names_itself_when_read(tmp_path: Path
                                                                         ) -> None:
    with SnapshotWriter.create(tmp_path, 3) as writer:
        writer.write("a", b"payload")
        path = writer.commit()
    reader = SnapshotReader(path)
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match=re.escape(str(path))):
        list(reader.sections())


def _snapshot(directory: Path, lsn: int) -> Path:
    with SnapshotWriter.create(directory, lsn) as writer:
        writer.write("lsn", str(lsn).encode())
        return writer.commit()


def test_without_current_the_highest_lsn_wins(tmp_path: Path) -> None:
    for lsn in (30, 7, 1000, 99, 5, 250):
        _snapshot(tmp_path, lsn)
    (tmp_path / CURRENT).unlink()
    reader = load_newest(tmp_path)
    assert reader is not None and reader.lsn == 1000
    raw = bytearray((tmp_path / snapshot_name(1000)).read_bytes())
    raw[-5] ^= 1
    (tmp_path / snapshot_name(1000)).write_bytes(bytes(raw))
    reader = load_newest(tmp_path)
    assert reader is not None and reader.lsn == 250


def test_an_unreadable_or_wrong_current_is_logged_and_the_newest_file_used(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for lsn in (1, 2):
        _snapshot(tmp_path, lsn)
    current = tmp_path / CURRENT
    current.unlink()
    current.mkdir()  # reading it fails with an OSError
    with caplog.at_level("WARNING", logger="memstore.snapshot"):
        reader = load_newest(tmp_path)
    assert reader is not None and reader.lsn == 2
    [record] = caplog.records
    assert record.getMessage().startswith(f"snapshot pointer {current} unreadable ([Errno 21]")
    assert record.getMessage().endswith("); using the newest snapshot file")
    current.rmdir()
    current.write_text("garbage\n")
    caplog.clear()
    with caplog.at_level("WARNING", logger="memstore.snapshot"):
        reader = load_newest(tmp_path)
    assert reader is not None and reader.lsn == 2
    assert [r.getMessage() for r in caplog.records] == [
        (f"snapshot pointer {current} names 'garbage', not a snapshot; using the newest "
        "snapshot file")]


def test_attributes_a_snapshot_has_no_index_for_get_empty_ones(tmp_path: Path) -> None:
    """A declared attribute nobody holds may have no index section (older snapshots): the
    loader gives it the empty index of its kind, so queries on it answer."""
    from memstore.index.bitmap_index import RangeIndex, ValueIndex
    from memstore.query import parse
    from memstore.query.evaluate import evaluate

    engine = Engine()
    kinds = {"i": Kind.INT, "f": Kind.FLOAT, "t": Kind.TIMESTAMP, "s": Kind.STRING,
             "b": Kind.BOOL, "l": Kind.STRING_LIST}
    engine.apply(engine.plan_declare([(n, k, True, Merge.DEFAULT) for n, k in kinds.items()]
                                     + [("quiet", Kind.STRING, False, Merge.DEFAULT)]))
    engine.apply(engine.plan_upsert(UpsertSpec("p", [(SET, "other", 1)])))
    path, _, _ = write_snapshot_file(engine, tmp_path, 1, "s", time.monotonic())
    restored = Engine()
    other = engine.schema.by_name["other"].id  # held by "p": its index section stays
    load_snapshot(restored, ((name, payload) for name, payload in SnapshotReader(path).sections()
                             if name != "index" or msgpack.unpackb(payload)["aid"] == other))
    for name, kind in kinds.items():
        aid = restored.schema.by_name[name].id
        if kind in (Kind.INT, Kind.FLOAT, Kind.TIMESTAMP):
            assert isinstance(restored.range_index[aid], RangeIndex)
            assert aid not in restored.value_index
        else:
            assert isinstance(restored.value_index[aid], ValueIndex)
            assert restored.exists[aid] == BitMap() and aid not in restored.range_index
    quiet = restored.schema.by_name["quiet"].id
    assert quiet not in restored.value_index and quiet not in restored.range_index
    for text in ("i > 1", "f < 0.5", 't >= "2024-01-01T00:00:00Z"', 's = "x"', "b = true",
                 'l HAS "x"', "exists(s)", "other = 1"):
        assert len(evaluate(restored, parse(text))) == (text == "other = 1")


class Steps:
    """Stands in for the shard module's `asyncio` (its sleep waits for the test's next
    `step()`) and `time` (a clock the test sets), so the automatic-snapshot loop runs one
    pass at a time and no test waits on a real clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []
        self._go: asyncio.Queue[None] | None = None
        self._back: asyncio.Queue[None] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert self._go is not None and self._back is not None
        self.slept.append(seconds)
        self._back.put_nowait(None)
        await self._go.get()

    async def start(self) -> None:
        self._go, self._back = asyncio.Queue(), asyncio.Queue()
        await self._back_again()  # the loop waits in its first sleep

    async def step(self) -> None:
        """One pass of the loop: check, maybe snapshot, back to sleep."""
        assert self._go is not None
        self._go.put_nowait(None)
        await self._back_again()

    async def _back_again(self) -> None:
        assert self._back is not None
        try:  # fail, not hang, if the loop never sleeps again
            await asyncio.wait_for(self._back.get(), 10)
        except TimeoutError:
            raise AssertionError("the snapshot loop did not come back to its pause") from None


def test_automatic_snapshots_start_at_the_thresholds_and_not_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    steps = Steps()
    monkeypatch.setattr(shard_module, "asyncio", steps)
    monkeypatch.setattr(shard_module, "time", steps)

    async def no_expiry(self: Shard) -> None:
        """The day-record expiry loop sleeps through the same module `asyncio`: kept out,
        so each step is one pass of the snapshot loop alone."""
        await asyncio.Event().wait()

    monkeypatch.setattr(Shard, "_expire_days", no_expiry)

    async def go() -> None:
        memory = await Shard.open(ShardConfig())
        memory.start_background()
        assert memory._auto_task is None  # nothing to snapshot without a data directory
        shard = await Shard.open(ShardConfig(data_dir=tmp_path / "data",
                                             snapshot_log_bytes=1 << 30, snapshot_interval=60))
        taken: list[int] = []
        real = shard.snapshot

        async def counted() -> dict[str, Any]:
            taken.append(shard.log.end_lsn)  # type: ignore[union-attr]
            return await real()

        shard.snapshot = counted  # type: ignore[method-assign]
        shard.start_background()
        await steps.start()
        assert shard.log is not None
        for i in range(5):
            await shard.commit(shard.engine.plan_upsert(UpsertSpec(f"u{i}", [(SET, "x", i)])))
        grown = shard.log.size_bytes - shard._log_bytes_at_snapshot
        shard.config.snapshot_log_bytes = grown + 1
        await steps.step()
        assert taken == []  # below the size, not due
        shard.config.snapshot_log_bytes = grown
        await steps.step()
        assert len(taken) == 1  # exactly at the size
        await shard.commit(shard.engine.plan_upsert(UpsertSpec("late", [(SET, "x", 1)])))
        shard.config.snapshot_log_bytes = 1 << 30
        steps.now += 59.5
        await steps.step()
        assert len(taken) == 1  # grown, but not due yet
        steps.now += 0.5
        await steps.step()
        assert len(taken) == 2  # due exactly now, and grown
        steps.now += 600
        await steps.step()
        assert len(taken) == 2  # due, but nothing new to snapshot
        await shard.commit(shard.engine.plan_upsert(UpsertSpec("last", [(SET, "x", 2)])))
        shard.log._fail("injected")
        await steps.step()
        assert len(taken) == 2  # a failed log is never snapshotted
        shard.log.failed = False  # the snapshot itself fails now: logged, and the loop goes on
        monkeypatch.setattr(shard_module, "run_in_child", _failing_child)
        await steps.step()
        assert len(taken) == 3
        await steps.step()
        assert len(taken) == 4
        assert set(steps.slept) == {1.0}
        shard.log.failed = True  # close without a final fsync of the half-failed log
        await shard.close()
        await memory.close()

    with caplog.at_level("ERROR", logger="memstore.shard"):
        asyncio.run(go())
    assert [r.getMessage() for r in caplog.records if r.name == "memstore.shard"] == [
        "automatic snapshot failed"] * 2


async def _failing_child(work: Any) -> Any:
    raise shard_module.ChildFailed("injected")


async def _failing_fork(work: Any) -> Any:
    raise OSError(11, "no fork: resource temporarily unavailable")


@pytest.mark.parametrize("table", ["held", "forwards", "decided", "registry"])
def test_each_merge_table_alone_is_written_and_read_back(tmp_path: Path, table: str) -> None:
    engine = Engine()
    engine.apply(engine.plan_upsert(UpsertSpec("p", [(SET, "x", 1)])))
    key = "p" if table == "held" else "key"  # a hold names a profile of the shard
    setattr(engine, table, {key: ["a", True] if table != "held" else ["t", "s", 1.5]})
    if table == "held":
        engine.held_dense = BitMap([engine.dense_of["p"]])
    path, _, _ = write_snapshot_file(engine, tmp_path, 1, "s", time.monotonic())
    assert "merges" in [name for name, _ in SnapshotReader(path).sections()]
    restored = Engine()
    load_snapshot(restored, SnapshotReader(path).sections())
    assert getattr(restored, table) == getattr(engine, table)


# ---------------------------------------------------------------------- snapshot reading


def _snapshot_bytes(tmp_path: Path, *sections: tuple[str, bytes]) -> tuple[Path, bytes]:
    with SnapshotWriter.create(tmp_path, 8) as writer:
        for name, payload in sections:
            writer.write(name, payload)
        path = writer.commit()
    return path, path.read_bytes()


@pytest.mark.parametrize("damage", [
    "header cut short", "bad magic", "unknown version", "cut in a name", "cut in a length",
    "impossible name length", "cut after a section", "section longer than the file",
    "cut in the footer"])
@pytest.mark.parametrize("when", ["on opening", "after opening"])
def test_snapshot_damage_names_the_file_and_what_is_wrong(tmp_path: Path, damage: str,
                                                          when: str) -> None:
    """Opening verifies the whole file; reading its sections again checks it again (the
    file may have changed since), with the same messages."""
    path, raw = _snapshot_bytes(tmp_path, ("abc", b"12345"))
    reader = SnapshotReader(path)
    head_size = snapshot_module.HEADER_SIZE
    first = head_size + 4 + 3 + 12  # name length, name, payload length and crc
    if damage == "header cut short":
        raw, message = raw[:10], "header cut short"
    elif damage == "cut in a name":
        raw, message = raw[:head_size + 4 + 2], "section 0 cut short"
    elif damage == "cut in a length":
        raw, message = raw[:head_size + 4 + 3 + 5], "section 0 cut short"
    elif damage == "impossible name length":
        raw = raw[:head_size] + struct.pack("<I", MAX_NAME + 1) + raw[head_size + 4:]
        message = f"impossible section name length {MAX_NAME + 1}"
    elif damage == "cut in the footer":
        raw, message = raw[:-3], "footer cut short"
    elif damage == "bad magic":
        raw, message = b"X" + raw[1:], "bad header (magic or checksum)"
    elif damage == "unknown version":
        head = snapshot_module.HEADER.pack(snapshot_module.MAGIC, 2, 8, 0)
        raw = head + snapshot_module.CRC.pack(zlib.crc32(head)) + raw[head_size:]
        message = "unknown snapshot version 2"
    elif damage == "cut after a section":
        raw, message = raw[:first + 5], "file after 1 sections cut short"
    else:  # the first section claims one byte more than the file holds after it
        left = len(raw) - first
        raw = raw[:head_size + 7] + struct.pack("<Q", left + 1) + raw[head_size + 15:]
        message = f"section 0 cut short or impossible length {left + 1}"
    path.write_bytes(raw)
    with pytest.raises(SnapshotError) as info:
        if when == "on opening":
            SnapshotReader(path)
        else:
            list(reader.sections())
    assert str(info.value) == f"{path}: {message}"


def test_prune_keeps_one_by_default_and_refuses_to_keep_none(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for lsn in (0, 10, 20):
        _snapshot(tmp_path, lsn)
    with pytest.raises(ValueError) as info:
        prune(tmp_path, keep=0)
    assert str(info.value) == "keep must be at least 1"
    damaged = tmp_path / snapshot_name(30)
    damaged.write_bytes(b"not a snapshot")
    spy = FsyncSpy()
    with caplog.at_level("WARNING", logger="memstore.snapshot"):
        removed = prune(tmp_path, fsync=spy)
    assert sorted(p.name for p in removed) == [snapshot_name(0), snapshot_name(10)]
    assert [r.getMessage() for r in caplog.records] == [
        f"prune: snapshot {damaged} is damaged ({damaged}: header cut short)"]
    assert spy.paths == [str(tmp_path.resolve())]
    assert prune(tmp_path, fsync=spy) == [] and len(spy.paths) == 1  # nothing removed


def test_prune_removes_tmp_files_up_to_the_newest_kept_lsn(tmp_path: Path) -> None:
    _snapshot(tmp_path, 0)
    above = tmp_path / f"snap-{1:020d}.tmp"  # a snapshot being written after it
    above.write_bytes(b"partial")
    assert prune(tmp_path) == []
    _snapshot(tmp_path, 5)
    at = tmp_path / f"snap-{5:020d}.tmp"
    at.write_bytes(b"leftover")
    later = tmp_path / f"snap-{6:020d}.tmp"
    later.write_bytes(b"partial")
    removed = prune(tmp_path, keep=1)
    assert sorted(p.name for p in removed) == sorted([snapshot_name(0), above.name, at.name])
    assert later.exists()


# ---------------------------------------------------------------------- the shard's snapshots


def test_a_snapshot_without_erasure_keeps_the_previous_one_and_the_log_after_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"

    async def scenario() -> None:
        shard = await Shard.open(ShardConfig(data_dir=data))
        infos = []
        for round_ in range(3):
            for i in range(5):
                await shard.commit(shard.engine.plan_upsert(
                    UpsertSpec(f"u{round_}-{i}", [(SET, "x", i)])))
            with caplog.at_level("INFO", logger="memstore.shard"):
                infos.append(await shard.snapshot())
        assert shard.log is not None
        snaps = sorted(p.name for p in (data / "snapshots").glob("snap-*.snap"))
        assert snaps == [snapshot_name(infos[1]["lsn"]), snapshot_name(infos[2]["lsn"])]
        bases = [int(p.name[:20]) for p in sorted((data / "log").glob("*.log"))]
        assert bases[0] <= infos[1]["lsn"]  # the fallback can still replay after itself
        last = infos[-1]
        assert set(last) == {"path", "lsn", "profiles", "seconds", "pause_ms"}
        meta = next(msgpack.unpackb(payload) for name, payload
                    in SnapshotReader(last["path"]).sections() if name == "meta")
        assert meta["shard"] == "shard-0"  # the shard's name, for whoever reads the file
        assert last["lsn"] == shard.log.end_lsn and last["profiles"] == 15
        assert 0 <= last["pause_ms"] <= last["seconds"] * 1000 < 60_000
        await shard.close()

    asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records if r.name == "memstore.shard"]
    assert len(messages) == 3 and all(
        re.fullmatch(r"snapshot \S+snap-\d{20}\.snap: \d+ profiles at lsn \d+ in "
                     r"\d+\.\d\ds \(pause \d+\.\d ms\)", m) for m in messages)
    assert messages[-1].startswith(f"snapshot {data / 'snapshots'}/")


@pytest.mark.parametrize("failure", ["the writer failed", "the fork failed"])
def test_an_erasure_survives_a_failed_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               failure: str) -> None:
    data = tmp_path / "data"
    marker = b"MARKER-failed-snapshot"

    async def scenario() -> None:
        shard = await Shard.open(ShardConfig(data_dir=data))
        await shard.commit(shard.engine.plan_upsert(UpsertSpec("keep", [(SET, "x", 1)])))
        await shard.snapshot()
        await shard.commit(shard.engine.plan_upsert(UpsertSpec("victim", [
            (SET, "note", marker.decode())])))
        await shard.commit(shard.engine.plan_delete("victim"))
        real = shard_module.run_in_child
        if failure == "the writer failed":
            monkeypatch.setattr(shard_module, "run_in_child", _failing_child)
            with pytest.raises(Unavailable, match="snapshot failed: injected"):
                await shard.snapshot()
        else:
            monkeypatch.setattr(shard_module, "run_in_child", _failing_fork)
            with pytest.raises(OSError, match="no fork"):
                await shard.snapshot()
        monkeypatch.setattr(shard_module, "run_in_child", real)
        await shard.snapshot()  # still owes the erasure
        await shard.close()

    asyncio.run(scenario())
    for path in data.rglob("*"):
        if path.is_file():
            assert marker not in path.read_bytes(), f"erased data still in {path}"


def test_a_snapshot_covers_writes_that_arrived_while_it_waited_for_the_log(
        tmp_path: Path) -> None:
    """The snapshot's position is taken again after its fsync wait: a write appended
    meanwhile is in the snapshot, so the snapshot must start replay after it."""
    from tests.test_gaps_storage import GatedFsync

    fsync = GatedFsync()

    async def scenario() -> None:
        shard = await Shard.open(ShardConfig(data_dir=tmp_path / "data", fsync=fsync))
        engine = shard.engine
        await shard.commit(engine.plan_upsert(UpsertSpec("a", [(SET, "x", 1)])))
        fsync.hold()
        first = asyncio.create_task(shard.commit(engine.plan_upsert(
            UpsertSpec("b", [(SET, "x", 2)]))))
        assert await asyncio.to_thread(fsync.entered.wait, 30)
        snapshot = asyncio.create_task(shard.snapshot())
        await asyncio.sleep(0)  # it waits for the fsync in flight
        second = asyncio.create_task(shard.commit(engine.plan_upsert(
            UpsertSpec("c", [(SET, "x", 3)]))))
        await asyncio.sleep(0)  # appended and applied: in memory before the snapshot forks
        fsync.release()
        await asyncio.gather(first, second)
        info = await snapshot
        assert shard.log is not None and info["lsn"] == shard.log.end_lsn
        assert info["profiles"] == 3
        await shard.close()

    asyncio.run(scenario())


def test_a_failed_log_refuses_ownership_changes_and_snapshots_saying_why(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        memory = await Shard.open(ShardConfig())
        with pytest.raises(Unavailable) as info:
            await memory.snapshot()
        assert str(info.value) == "this shard has no data directory; nothing to snapshot"
        shard = await Shard.open(ShardConfig(data_dir=tmp_path / "data"))
        assert shard.log is not None and shard.writable_error is None
        shard.log._fail("injected")
        why = "the log failed (injected); this shard is read-only until restart"
        assert shard.writable_error == why
        for call in (lambda: shard.set_ownership(2, None), shard.snapshot):
            with pytest.raises(Unavailable) as info:
                await call()
            assert str(info.value) == why
        await shard.close()

    asyncio.run(scenario())


def test_a_snapshot_from_before_the_registry_loads_with_an_empty_one(tmp_path: Path) -> None:
    engine = Engine()
    engine.apply(engine.plan_upsert(UpsertSpec("p", [(SET, "x", 1)])))
    path, _, _ = write_snapshot_file(engine, tmp_path, 1, "s", time.monotonic())
    old_merges = ("merges", msgpack.packb({"held": {}, "forwards": {"gone": "p"},
                                           "decided": {}}))
    restored = Engine()
    load_snapshot(restored, [*SnapshotReader(path).sections(), old_merges])
    assert restored.registry == {} and restored.forwards == {"gone": "p"}


def test_a_failed_rotation_fails_the_log_saying_why(tmp_path: Path) -> None:
    fsync = CountingFsync()

    async def go() -> None:
        w = LogWriter.open(tmp_path, fsync=fsync)
        w.append(P, b"x")
        fsync.broken = True
        with pytest.raises(LogFailedError) as info:
            w.rotate()
        why = "fsync failed: [Errno 5] injected fsync failure"
        assert str(info.value) == why and w.failure == why
        await w.close()

    asyncio.run(go())


def test_rotation_closes_the_old_segment_unless_an_fsync_may_use_it(tmp_path: Path) -> None:
    import threading

    threads: set[str] = set()

    def fsync(fd: int) -> None:
        threads.add(threading.current_thread().name)
        os.fsync(fd)

    async def go() -> None:
        w = LogWriter.open(tmp_path, fsync=fsync)
        await w.sync_to(w.append(P, b"x"))
        assert threads == {"MainThread"} | {n for n in threads if n.startswith("memstore-fsync")}
        assert any(n.startswith("memstore-fsync") for n in threads)  # its own fsync thread
        old = w._file
        w.rotate()
        assert old is not None and old.closed and w._retired == []
        await w.close()

    asyncio.run(go())


def test_repair_backups_are_stamped_in_utc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    from datetime import UTC, datetime

    write_log(tmp_path, payloads(5))
    flip(segments(tmp_path)[0], H + fmt.FRAME_HEADER_SIZE)
    monkeypatch.setenv("TZ", "Asia/Tokyo")  # nine hours from UTC
    time.tzset()
    try:
        report = repair(tmp_path)
    finally:
        monkeypatch.undo()
        time.tzset()
    stamp = report.backups[0].name.rsplit(".broken-", 1)[1]
    made = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - made).total_seconds()) < 3600


def test_a_shard_remembers_what_changed_after_a_position_until_it_restarts(
        tmp_path: Path) -> None:
    """What a slot move's catch-up asks (RecentChanges): positions are log positions."""
    data = tmp_path / "data"

    async def scenario() -> None:
        shard = await Shard.open(ShardConfig(data_dir=data))
        start = shard.position
        await shard.commit(shard.engine.plan_upsert(UpsertSpec("a", [(SET, "x", 1)])))
        middle = shard.position
        await shard.commit(shard.engine.plan_upsert(UpsertSpec("b", [(SET, "x", 1)])))
        await shard.commit(shard.engine.plan_delete("a"))
        assert shard.recent.since(start) == {"a", "b"}
        assert shard.recent.since(middle) == {"a", "b"}
        assert shard.recent.since(shard.position) == set()
        await shard.close()
        again = await Shard.open(ShardConfig(data_dir=data))
        assert again.recent.since(middle) is None  # forgotten: copy in full
        assert again.recent.since(again.position) == set()
        await again.close()

    asyncio.run(scenario())


def test_repair_reports_in_words(tmp_path: Path) -> None:
    assert str(repair(tmp_path)) == "nothing repaired"
    write_log(tmp_path, payloads(5))
    segment = segments(tmp_path)[0]
    flip(segment, H + fmt.FRAME_HEADER_SIZE)
    size = segment.stat().st_size
    report = repair(tmp_path)
    assert str(report) == (f"cut the log at {segment} offset {H} ({size - H} bytes removed); "
                           f"backups: {report.backups[0]}")


def test_recovery_reports_the_snapshot_the_records_after_it_and_what_it_cut(
        tmp_path: Path) -> None:
    data = tmp_path / "data"

    async def write(n: int, snapshot: bool) -> dict[str, Any]:
        shard = await Shard.open(ShardConfig(data_dir=data))
        info = {"position": shard.position, "recovery": shard.recovery}
        for i in range(n):
            await shard.commit(shard.engine.plan_upsert(UpsertSpec(f"u{i}", [(SET, "x", i)])))
        if snapshot:
            info["snapshot"] = await shard.snapshot()
        await shard.close()
        return info

    first = asyncio.run(write(4, snapshot=True))
    assert first["position"] == 0  # a new log starts at LSN 0
    fresh = first["recovery"]
    assert (fresh["snapshot"], fresh["replayed"], fresh["torn_bytes"], fresh["profiles"]) == (
        None, 0, 0, 0)
    asyncio.run(write(3, snapshot=False))  # u0-u2 again: three records after the snapshot
    again = asyncio.run(write(0, snapshot=False))["recovery"]
    assert again["snapshot"] == first["snapshot"]["path"]
    assert (again["replayed"], again["torn_bytes"], again["profiles"]) == (3, 0, 4)
    segment = max((data / "log").glob("*.log"))
    with segment.open("ab") as f:
        f.write(b"\x09\x00\x00")
    torn = asyncio.run(write(0, snapshot=False))["recovery"]
    assert (torn["replayed"], torn["torn_bytes"]) == (3, 3)


def test_a_failed_fsync_tells_every_waiter_why(tmp_path: Path) -> None:
    fsync = CountingFsync()

    async def go() -> None:
        w = LogWriter.open(tmp_path, fsync=fsync)
        fsync.broken = True
        with pytest.raises(LogFailedError) as info:
            await w.sync_to(w.append(P, b"x"))
        assert str(info.value) == w.failure == "fsync failed: [Errno 5] injected fsync failure"
        await w.close()

    asyncio.run(go())


# ---------------------------------------------------------------------- the shard's life cycle


def test_a_shard_opens_with_its_own_settings(tmp_path: Path) -> None:
    from memstore.engine.identity import IdentityRules

    rules = IdentityRules(max_per_kind=1)

    async def scenario() -> None:
        config = ShardConfig(rules=rules)
        memory = await Shard.open(config)
        assert memory.config is config and memory.engine.rules is rules
        config = ShardConfig(data_dir=tmp_path / "data", rules=rules, sync=SyncPolicy.OFF,
                             segment_bytes=4096)
        shard = await Shard.open(config)
        assert shard.config is config and shard.engine.rules is rules
        assert shard.log is not None
        assert (shard.log.sync, shard.log.segment_bytes) == (SyncPolicy.OFF, 4096)
        await shard.close()
        await shard.close()  # closing twice is harmless
        await memory.close()

    asyncio.run(scenario())


def test_a_memory_only_shard_numbers_its_changes(tmp_path: Path) -> None:
    async def scenario() -> None:
        shard = await Shard.open(ShardConfig())
        await shard.commit(shard.engine.plan_upsert(UpsertSpec("a", [(SET, "x", 1)])))
        await shard.commit(shard.engine.plan_upsert(UpsertSpec("b", [(SET, "x", 1)])))
        assert shard.position == 2
        assert shard.recent.since(0) == {"a", "b"} and shard.recent.since(1) == {"b"}

    asyncio.run(scenario())


def test_recent_changes_forget_the_oldest_past_their_limit() -> None:
    recent = shard_module.RecentChanges(floor=0, limit=3)
    recent.record(1, ["a"])
    recent.record(2, ["b", "c"])
    assert recent.floor == 0 and recent.since(0) == {"a", "b", "c"}  # 3: at the limit
    recent.record(3, ["d"])  # 4 > 3: position 1 goes
    assert recent.floor == 1 and recent.since(0) is None
    assert recent.since(1) == {"b", "c", "d"} and recent.since(2) == {"d"}
    recent.record(4, ["e", "f", "g", "h"])  # alone past the limit: the newest stays
    assert recent.floor == 3 and recent.since(3) == {"e", "f", "g", "h"}
    assert recent.since(4) == set()


def test_a_reopened_shard_without_replay_keeps_the_fallback_snapshot(tmp_path: Path) -> None:
    data = tmp_path / "data"

    async def scenario() -> None:
        shard = await Shard.open(ShardConfig(data_dir=data))
        await shard.commit(shard.engine.plan_upsert(UpsertSpec("a", [(SET, "x", 1)])))
        await shard.snapshot()
        await shard.close()
        again = await Shard.open(ShardConfig(data_dir=data))
        assert again.recovery["replayed"] == 0  # nothing after the snapshot: nothing erased
        await again.commit(again.engine.plan_upsert(UpsertSpec("b", [(SET, "x", 1)])))
        await again.snapshot()
        assert len(list((data / "snapshots").glob("snap-*.snap"))) == 2
        await again.close()

    asyncio.run(scenario())


def test_a_log_that_lost_its_tail_behind_the_snapshot_continues_at_the_snapshot(
        tmp_path: Path) -> None:
    """The snapshot covers more than the log kept (its unsynced tail was lost): the log
    starts again at the snapshot's position, so later records replay after it."""
    data = tmp_path / "data"

    async def write(pids: list[str], snapshot: bool) -> None:
        shard = await Shard.open(ShardConfig(data_dir=data))
        for pid in pids:
            await shard.commit(shard.engine.plan_upsert(UpsertSpec(pid, [(SET, "x", 1)])))
        if snapshot:
            await shard.snapshot()
        await shard.close()

    asyncio.run(write(["p0", "p1", "p2"], snapshot=True))
    older, newest = sorted((data / "log").glob("*.log"))
    newest.unlink()  # the segment the snapshot started, and the last record before it
    records = list(read_log(data / "log"))
    with older.open("r+b") as f:
        f.truncate(older.stat().st_size - (records[-1].lsn_end - records[-1].lsn_start))
    asyncio.run(write(["after"], snapshot=False))

    async def reopen() -> list[str]:
        shard = await Shard.open(ShardConfig(data_dir=data))
        found = sorted(shard.engine.dense_of)
        await shard.close()
        return found

    assert asyncio.run(reopen()) == ["after", "p0", "p1", "p2"]


def test_recovery_logs_what_it_did(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"

    async def open_close() -> dict[str, Any]:
        shard = await Shard.open(ShardConfig(data_dir=data))
        await shard.commit(shard.engine.plan_upsert(UpsertSpec("a", [(SET, "x", 1)])))
        info = shard.recovery
        await shard.close()
        return info

    asyncio.run(open_close())
    segment = max((data / "log").glob("*.log"))
    size = segment.stat().st_size
    with segment.open("ab") as f:
        f.write(b"\x09\x00")
    with caplog.at_level("INFO", logger="memstore.shard"):
        info = asyncio.run(open_close())
    assert set(info) == {"snapshot", "replayed", "torn_bytes", "seconds", "profiles"}
    assert 0 <= info["seconds"] < 60 and info["seconds"] == round(info["seconds"], 3)
    records = [r for r in caplog.records if r.name == "memstore.shard"]
    assert [r.getMessage() for r in records] == [
        f"log: cut a torn record at the end of {segment} offset {size} (2 bytes)",
        f"recovered {info['profiles']} profiles in {info['seconds']:.3f} s"]
    assert (records[0].file, records[0].offset, records[0].bytes) == (  # type: ignore[attr-defined]
        str(segment), size, 2)
    assert records[1].recovery == info  # type: ignore[attr-defined]


class FailingAfterHold:
    """os.fsync whose next call, once `hold()` was called, blocks until `release()`; every
    call after that fails with EIO."""

    def __init__(self) -> None:
        import threading

        self.entered = threading.Event()
        self._released = threading.Event()
        self._held = False
        self._failing = False

    def hold(self) -> None:
        self._held = True

    def release(self) -> None:
        self._released.set()

    def __call__(self, fd: int) -> None:
        if self._failing:
            raise OSError(5, "injected EIO")
        if self._held:
            self._held, self._failing = False, True
            self.entered.set()
            assert self._released.wait(30)
        os.fsync(fd)


def test_a_write_whose_own_fsync_fails_is_undone_after_an_earlier_one_succeeded(
        tmp_path: Path) -> None:
    """A's fsync covers A only; B, appended while it ran, fails in the next one: B alone is
    undone, and every answer says why."""
    fsync = FailingAfterHold()

    async def scenario() -> None:
        shard = await Shard.open(ShardConfig(data_dir=tmp_path / "data", fsync=fsync))
        engine = shard.engine
        fsync.hold()
        a = asyncio.create_task(shard.commit(engine.plan_upsert(UpsertSpec("a", [(SET, "x", 1)]))))
        assert await asyncio.to_thread(fsync.entered.wait, 30)
        b = asyncio.create_task(shard.commit(engine.plan_upsert(UpsertSpec("b", [(SET, "x", 2)]))))
        empty = asyncio.create_task(shard.commit(engine.plan_delete("nobody")))
        await asyncio.sleep(0)
        fsync.release()
        await a
        with pytest.raises(Unavailable) as failed:
            await b
        assert str(failed.value) == "write not persisted: fsync failed: [Errno 5] injected EIO"
        with pytest.raises(Unavailable) as unanswered:
            await empty
        assert str(unanswered.value) == (
            "not answered: an earlier write failed: fsync failed: [Errno 5] injected EIO")
        assert engine.lookup("a") is not None and engine.lookup("b") is None
        with pytest.raises(Unavailable) as refused:
            await shard.commit(engine.plan_upsert(UpsertSpec("c", [(SET, "x", 3)])))
        assert str(refused.value) == shard.writable_error
        await shard.close()

    asyncio.run(scenario())


def test_a_write_the_log_cannot_take_is_refused_saying_why(tmp_path: Path) -> None:
    import errno

    async def scenario() -> None:
        shard = await Shard.open(ShardConfig(data_dir=tmp_path / "data"))
        assert shard.log is not None and shard.log._file is not None
        real = shard.log._file

        class Full:  # a disk that is full: the write fails, the log carries on
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def write(self, data: Any) -> int:
                raise OSError(errno.ENOSPC, "No space left on device")

        shard.log._file = Full()  # type: ignore[assignment]
        with pytest.raises(Unavailable) as info:
            await shard.commit(shard.engine.plan_upsert(UpsertSpec("a", [(SET, "x", 1)])))
        assert str(info.value) == ("write not persisted: [Errno 28] log write failed: "
                                   "No space left on device")
        assert shard.engine.lookup("a") is None
        shard.log._file = real
        await shard.commit(shard.engine.plan_upsert(UpsertSpec("b", [(SET, "x", 1)])))
        await shard.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------------- replay positions


def test_a_scan_reads_only_the_segments_from_the_one_holding_its_start(tmp_path: Path
                                                                        ) -> None:
    write_log(tmp_path, payloads(40), segment_bytes=150)
    files = segments(tmp_path)
    bases = [int(p.name[:20]) for p in files]
    for k in (0, 2, len(files) - 1):
        scan = read_log(tmp_path, bases[k])
        records = list(scan)
        assert records[0].lsn_start == bases[k] and scan.segments == len(files) - k
    inside = next(r for r in read_log(tmp_path) if r.lsn_start > bases[1])
    scan = read_log(tmp_path, inside.lsn_start)
    assert next(iter(scan)) == inside


def test_replay_from_inside_a_record_names_the_record(tmp_path: Path) -> None:
    write_log(tmp_path, payloads(10), segment_bytes=150)
    files = segments(tmp_path)
    base = int(files[1].name[:20])
    record = next(r for r in read_log(tmp_path) if r.lsn_start > base)
    with pytest.raises(LogCorruptError) as info:
        list(read_log(tmp_path, record.lsn_start + 1))
    assert (info.value.path, info.value.offset, info.value.reason) == (
        files[1], record.lsn_start - base + H, f"LSN {record.lsn_start + 1} falls inside a record")


@pytest.mark.parametrize("count", [1, 3])
def test_a_log_starting_after_the_replay_start_names_its_first_segment(tmp_path: Path,
                                                                       count: int) -> None:
    write_log(tmp_path, payloads(count * 4), segment_bytes=150 if count > 1 else 1 << 20)
    files = segments(tmp_path)
    assert len(files) >= count
    first = files[0]
    moved = first.with_name(fmt.SEGMENT_NAME.format(base_lsn=500))  # now starts at 500
    first.rename(moved)
    for later in files[1:]:
        later.unlink()
    data = bytearray(moved.read_bytes())
    data[:H] = _header(500)
    moved.write_bytes(bytes(data))
    with pytest.raises(LogCorruptError) as info:
        list(read_log(tmp_path, 100))
    assert (info.value.path, info.value.offset, info.value.reason) == (
        moved, 0, "log starts at LSN 500 but replay must start at LSN 100: records missing")


def test_a_segment_whose_header_is_not_its_name_is_damage_in_a_scan(tmp_path: Path) -> None:
    first = tmp_path / fmt.SEGMENT_NAME.format(base_lsn=0)
    first.write_bytes(_header() + ONE)
    second = tmp_path / fmt.SEGMENT_NAME.format(base_lsn=len(ONE))
    second.write_bytes(_header(999) + ONE)  # chains by name and size, not by header
    with pytest.raises(LogCorruptError) as info:
        list(read_log(tmp_path))
    assert (info.value.path, info.value.reason) == (
        second, f"header says base LSN 999, file name says {len(ONE)}")


def test_a_torn_log_that_ends_before_the_replay_start_ends_at_the_start(tmp_path: Path
                                                                        ) -> None:
    ends = write_log(tmp_path, payloads(3))
    with segments(tmp_path)[-1].open("ab") as f:
        f.write(b"\x07\x00")
    scan = read_log(tmp_path, ends[-1] + 1000)  # the snapshot covers more than the log
    assert list(scan) == [] and scan.torn is not None
    assert scan.end_lsn == ends[-1] + 1000


def test_a_record_type_is_any_byte(tmp_path: Path) -> None:
    w = LogWriter.open(tmp_path)
    assert w.append(0, b"") < w.append(255, b"")
    for rtype in (-1, 256):
        with pytest.raises(ValueError) as info:
            w.append(rtype, b"")
        assert str(info.value) == f"record type {rtype} does not fit in a byte"
    asyncio.run(w.close())


# ---------------------------------------------------------------------- appending


class _Wrapped:
    """A segment file whose write (and truncate) the test replaces."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_appends_reach_the_file_itself_not_a_buffer(tmp_path: Path) -> None:
    """Reopened or new, the active segment is unbuffered: an fsync covers what was
    appended. Read back from the file while the writer is still open."""
    write_log(tmp_path / "a" / "b", [b"first"])  # makes its directories

    async def go() -> None:
        w = LogWriter.open(tmp_path / "a" / "b")
        await w.sync_to(w.append(P, b"second"))
        assert [r.payload for r in read_log(tmp_path / "a" / "b")] == [b"first", b"second"]
        await w.close()

    asyncio.run(go())


def test_a_segment_is_full_at_exactly_its_size(tmp_path: Path) -> None:
    frame = fmt.FRAME_HEADER_SIZE + 3
    write_log(tmp_path, [b"abc"] * 5, segment_bytes=2 * frame)
    assert [p.stat().st_size - H for p in segments(tmp_path)] == [2 * frame, 2 * frame, frame]


def test_short_writes_are_continued_and_failed_ones_cut_back(tmp_path: Path) -> None:
    import errno

    w = LogWriter.open(tmp_path)
    assert w._file is not None
    real = w._file
    trickle = _Wrapped(real)
    trickle.write = lambda data: real.write(bytes(data[:3]))  # type: ignore[attr-defined]
    w._file = trickle  # type: ignore[assignment]
    w.append(P, b"written three bytes at a time")
    assert [r.payload for r in read_log(tmp_path)] == [b"written three bytes at a time"]
    zero = _Wrapped(real)
    zero.write = lambda data: 0  # type: ignore[attr-defined]
    w._file = zero  # type: ignore[assignment]
    with pytest.raises(LogWriteError) as info:
        w.append(P, b"never")
    assert (info.value.errno, str(info.value)) == (
        0, "[Errno 0] log write failed: write() returned 0 bytes")
    size = real.tell()

    def partial(data: Any) -> int:
        real.write(b"half a frame")
        raise OSError(errno.EIO, "Input/output error")

    broken = _Wrapped(real)
    broken.write = partial  # type: ignore[attr-defined]
    w._file = broken  # type: ignore[assignment]
    with pytest.raises(LogWriteError):
        w.append(P, b"lost")
    assert real.seek(0, os.SEEK_END) == size  # cut back to where the frame began
    real.seek(size)

    def no_cut(length: Any = None) -> int:
        raise OSError(errno.EROFS, "Read-only file system")

    broken.truncate = no_cut  # type: ignore[attr-defined]
    with pytest.raises(LogFailedError) as failed:
        w.append(P, b"lost too")
    assert str(failed.value) == w.failure == (
        "write failed ([Errno 5] Input/output error) and could not be cut back "
        "([Errno 30] Read-only file system)")
    w._file = real
    asyncio.run(w.close())


def test_record_size_limit_is_inclusive_and_the_refusal_says_so(tmp_path: Path) -> None:
    w = LogWriter.open(tmp_path, sync=SyncPolicy.OFF)
    w.append(P, bytes(fmt.MAX_PAYLOAD))
    with pytest.raises(LogWriteError) as info:
        w.append(P, bytes(fmt.MAX_PAYLOAD + 1))
    assert str(info.value) == (f"record of {fmt.MAX_PAYLOAD + 1} bytes exceeds the "
                               f"{fmt.MAX_PAYLOAD}-byte limit")
    asyncio.run(w.close())


def test_a_closed_or_failed_log_says_why_it_refuses(tmp_path: Path) -> None:
    w = LogWriter.open(tmp_path / "a")
    asyncio.run(w.close())
    with pytest.raises(LogFailedError) as closed:
        w.append(P, b"x")
    assert str(closed.value) == "log is closed"
    fsync = CountingFsync()
    w = LogWriter.open(tmp_path / "b", fsync=fsync)
    w.append(P, b"x")
    fsync.broken = True
    with pytest.raises(LogFailedError):
        w.rotate()
    with pytest.raises(LogFailedError) as failed:
        w.append(P, b"y")
    assert str(failed.value) == "fsync failed: [Errno 5] injected fsync failure"
    asyncio.run(w.close())


def test_a_newest_segment_cut_inside_its_header_must_be_recovered_first(tmp_path: Path
                                                                        ) -> None:
    write_log(tmp_path, payloads(2))
    segment = segments(tmp_path)[0]
    with segment.open("r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError) as info:
        LogWriter.open(tmp_path)
    assert str(info.value) == f"{segment}: segment header cut short; run recovery first"


# ---------------------------------------------------------------------- segments and closing


def test_a_new_segment_that_cannot_be_made_is_refused_saying_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    w = LogWriter.open(tmp_path)
    end = w.append(P, b"x")
    taken = tmp_path / fmt.SEGMENT_NAME.format(base_lsn=end)
    taken.write_bytes(b"someone else's")
    with pytest.raises(LogWriteError) as exists:
        w.rotate()
    assert exists.value.errno == errno.EEXIST
    assert str(exists.value).startswith(f"[Errno {errno.EEXIST}] cannot create {taken}: ")
    taken.unlink()
    real_open = Path.open

    def header_fails(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(self, mode, *args, **kwargs)
        if mode != "xb":
            return f
        wrapped = _Wrapped(f)

        def full(data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        wrapped.write = full  # type: ignore[attr-defined]
        return wrapped

    monkeypatch.setattr(Path, "open", header_fails)
    with pytest.raises(LogWriteError) as full:
        w.rotate()
    assert (full.value.errno, str(full.value)) == (
        errno.ENOSPC, (f"[Errno {errno.ENOSPC}] cannot write {taken}: [Errno 28] No space left "
                      "on device"))
    assert not taken.exists()
    monkeypatch.undo()
    asyncio.run(w.close())


def test_a_new_segment_whose_fsync_fails_fails_the_log(tmp_path: Path) -> None:
    calls = {"n": 0}

    def second_fails(fd: int) -> None:  # the old segment's fsync works, the new one's not
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(5, "injected EIO")
        os.fsync(fd)

    w = LogWriter.open(tmp_path)
    end = w.append(P, b"x")
    w._fsync = second_fails
    with pytest.raises(LogFailedError) as info:
        w.rotate()
    path = tmp_path / fmt.SEGMENT_NAME.format(base_lsn=end)
    assert str(info.value) == w.failure == (
        f"fsync of new segment {path} failed: [Errno 5] injected EIO")
    asyncio.run(w.close())


def test_new_segments_and_deletions_sync_the_directory_with_the_given_fsync(
        tmp_path: Path) -> None:
    spy = FsyncSpy()
    w = LogWriter.open(tmp_path, fsync=spy, segment_bytes=20)
    directory = str(tmp_path.resolve())
    assert spy.paths.count(directory) == 1  # the first segment's entry
    for _ in range(3):
        w.append(P, b"0123456789abcdef")
    assert spy.paths.count(directory) == 3  # two rotations
    w.remove_segments_before(w.end_lsn)
    assert spy.paths.count(directory) == 4
    asyncio.run(w.close())


def test_a_log_behind_the_snapshot_is_replaced_and_counted_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ends = write_log(tmp_path, payloads(3))
    with caplog.at_level("WARNING", logger="memstore.log"):
        w = LogWriter.open(tmp_path, start_lsn=ends[-1] + 100)
    assert w.size_bytes == sum(p.stat().st_size for p in segments(tmp_path)) == H
    assert [r.getMessage() for r in caplog.records] == [
        (f"log ends at LSN {ends[-1]} but the snapshot covers up to {ends[-1] + 100}: "
        "deleting 1 segment(s) it covers and starting a new one")]
    asyncio.run(w.close())


def test_close_waits_for_the_fsync_in_flight_and_syncs_the_rest(tmp_path: Path) -> None:
    from tests.test_gaps_storage import GatedFsync

    fsync = GatedFsync()

    async def go() -> None:
        w = LogWriter.open(tmp_path, fsync=fsync)
        a = w.append(P, b"a")
        fsync.hold()
        waiter = asyncio.create_task(w.sync_to(a))
        assert await asyncio.to_thread(fsync.entered.wait, 30)
        b = w.append(P, b"b")
        closing = asyncio.create_task(w.close())
        await asyncio.sleep(0)
        assert not closing.done()
        fsync.release()
        await asyncio.gather(waiter, closing)
        assert w.durable_lsn == w.end_lsn == b and w._file is None

    asyncio.run(go())
    assert [r.payload for r in read_log(tmp_path)] == [b"a", b"b"]


def test_close_after_a_failed_fsync_in_flight_or_at_close_does_not_raise(tmp_path: Path
                                                                         ) -> None:
    fsync = CountingFsync()

    async def in_flight() -> None:
        w = LogWriter.open(tmp_path / "a", fsync=fsync)
        fsync.broken = True
        waiter = asyncio.create_task(w.sync_to(w.append(P, b"x")))
        await asyncio.sleep(0)
        await w.close()  # the fsync in flight fails; close still closes
        with pytest.raises(LogFailedError):
            await waiter
        fsync.broken = False

    asyncio.run(in_flight())

    async def at_close() -> None:
        w = LogWriter.open(tmp_path / "b", sync=SyncPolicy.EVERYSEC, fsync=fsync)
        w.append(P, b"x")
        fsync.broken = True
        await w.close()
        assert w.failed and w.failure == "fsync at close failed: [Errno 5] injected fsync failure"

    asyncio.run(at_close())


def test_a_directory_with_many_deleted_entries_is_written_as_its_entries(tmp_path: Path
                                                                        ) -> None:
    """A directory table copied as it is would carry its deleted entries' slots along;
    with more than one in eight deleted the snapshot holds the live entries instead, and
    loading builds a table of them anew, none deleted."""
    engine = Engine()
    for i in range(40):
        engine.apply(engine.plan_upsert(UpsertSpec(f"p{i}", [(SET, "x", i)],
                                                   [("email", f"e{i}@x.io")])))
    for i in range(30):
        engine.apply(engine.plan_delete(f"p{i}"))
    assert engine.directory.tombstones > len(engine.directory) // 8
    path, _, _ = write_snapshot_file(engine, tmp_path, 1, "s", time.monotonic())
    names = [name for name, _ in SnapshotReader(path).sections()]
    assert "directory" in names and "directory-slots" not in names
    restored = Engine()
    load_snapshot(restored, SnapshotReader(path).sections())
    assert tables(restored) == tables(engine) and len(restored.directory) == 10
    assert restored.directory.tombstones == 0
