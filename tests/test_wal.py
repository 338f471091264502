"""The segment log: round trips, torn tails, damage, repair, group commit, fsync failure.

Test names state the damage (etcd's TestRepairWriteTearLast, LevelDB's
TruncatedTrailingRecordIsIgnored).
"""

from __future__ import annotations

import asyncio
import errno
import io
import itertools
import os
import threading
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from memstore.storage import wal_format as fmt
from memstore.storage.wal_reader import (
    LogCorruptError,
    LogScan,
    Record,
    TornTail,
    check,
    decode_segment,
    read_ahead,
    read_log,
    repair,
    truncate_torn_tail,
)
from memstore.storage.wal_writer import LogFailedError, LogWriteError, LogWriter, SyncPolicy

P, S, M = fmt.RECORD_PROFILES, fmt.RECORD_SCHEMA, fmt.RECORD_SHARD_META


def write_log(directory: Path, payloads: list[bytes], *, segment_bytes: int = 64 << 20,
              **kw: Any) -> list[int]:
    """Append payloads (types cycling P, S, M); return the LSN after each."""
    async def go() -> list[int]:
        w = LogWriter.open(directory, segment_bytes=segment_bytes, **kw)
        ends = []
        for i, p in enumerate(payloads):
            ends.append(w.append((P, S, M)[i % 3], p))
        await w.sync_to(w.end_lsn)
        await w.close()
        return ends

    return asyncio.run(go())


def segments(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if fmt.SEGMENT_NAME_RE.match(p.name))


def payloads(n: int) -> list[bytes]:
    return [f"record-{i}-".encode() * (1 + i % 7) for i in range(n)]


def read_all(directory: Path, from_lsn: int | None = None) -> tuple[list[Record], LogScan]:
    scan = read_log(directory, from_lsn)
    return list(scan), scan


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------ round trips
def test_round_trip_across_segment_rotation(tmp_path: Path) -> None:
    data = payloads(200)
    ends = write_log(tmp_path, data, segment_bytes=512)
    files = segments(tmp_path)
    assert len(files) > 5
    # names are the LSN of the first frame, and segments are contiguous
    bases = [int(p.name[:20]) for p in files]
    assert bases[0] == 0
    for (base, path), nxt in zip(zip(bases, files, strict=True), bases[1:], strict=False):
        assert base + path.stat().st_size - fmt.SEGMENT_HEADER_SIZE == nxt
    records, scan = read_all(tmp_path)
    assert [r.payload for r in records] == data
    assert [r.rtype for r in records] == [(P, S, M)[i % 3] for i in range(200)]
    assert [r.lsn_end for r in records] == ends
    assert all(a.lsn_end == b.lsn_start for a, b in itertools.pairwise(records))
    assert scan.torn is None and scan.end_lsn == ends[-1]
    # replay from any record boundary, including a segment start
    for k in (0, 1, 57, 199):
        tail, _ = read_all(tmp_path, records[k].lsn_start)
        assert [r.payload for r in tail] == data[k:]
    assert list(read_log(tmp_path, ends[-1])) == []


def test_reopen_appends_after_the_end(tmp_path: Path) -> None:
    ends = write_log(tmp_path, payloads(5))
    more = write_log(tmp_path, [b"x", b"y"], start_lsn=ends[-1])
    assert more[0] == ends[-1] + fmt.FRAME_HEADER_SIZE + 1
    assert [r.payload for r in read_log(tmp_path)][-2:] == [b"x", b"y"]


def test_open_with_start_lsn_before_the_end_is_refused(tmp_path: Path) -> None:
    ends = write_log(tmp_path, payloads(3))
    with pytest.raises(ValueError, match="start_lsn"):
        LogWriter.open(tmp_path, start_lsn=ends[-1] - 1)


def test_log_tail_lost_behind_snapshot_starts_a_new_segment(tmp_path: Path) -> None:
    ends = write_log(tmp_path, payloads(3))
    snapshot_lsn = ends[-1] + 1000  # the snapshot covers more than the log kept
    write_log(tmp_path, [b"after"], start_lsn=snapshot_lsn)
    assert [p.name for p in segments(tmp_path)] == [f"{snapshot_lsn:020d}.log"]
    assert [r.payload for r in read_log(tmp_path, snapshot_lsn)] == [b"after"]


def test_replay_from_inside_a_record_is_damage(tmp_path: Path) -> None:
    ends = write_log(tmp_path, payloads(3))
    with pytest.raises(LogCorruptError, match="inside a record"):
        list(read_log(tmp_path, ends[0] + 1))


def test_log_starting_after_the_snapshot_lsn_is_damage(tmp_path: Path) -> None:
    write_log(tmp_path, payloads(50), segment_bytes=256)
    segments(tmp_path)[0].unlink()  # records the snapshot at LSN 0 needs are gone
    with pytest.raises(LogCorruptError, match="records missing"):
        list(read_log(tmp_path, 0))
    assert check(tmp_path).ok  # from its own start the log is whole


def test_oversized_record_is_refused_and_not_written(tmp_path: Path) -> None:
    async def go() -> None:
        w = LogWriter.open(tmp_path)
        with pytest.raises(LogWriteError):
            w.append(P, b"\0" * (fmt.MAX_PAYLOAD + 1))
        assert w.end_lsn == 0 and not w.failed
        await w.close()

    asyncio.run(go())


# ------------------------------------------------------------------ torn tails
def test_truncated_trailing_record_is_ignored_at_every_cut(tmp_path: Path) -> None:
    data = payloads(6)
    write_log(tmp_path, data)
    seg = segments(tmp_path)[0]
    raw = seg.read_bytes()
    last_start = len(raw) - fmt.FRAME_HEADER_SIZE - len(data[-1])
    for cut in range(last_start + 1, len(raw)):
        items = list(decode_segment(io.BytesIO(raw[:cut]), path=seg.name))
        assert [r.payload for r in items[:-1]] == data[:-1]  # type: ignore[union-attr]
        assert items[-1] == TornTail(Path(seg.name), last_start, cut - last_start)
    # the same through files, and the cut makes the log whole again
    seg.write_bytes(raw[: len(raw) - 3])
    records, scan = read_all(tmp_path)
    assert [r.payload for r in records] == data[:-1]
    assert scan.torn is not None and scan.torn.byte_count == len(raw) - 3 - last_start
    assert truncate_torn_tail(scan) == len(raw) - 3 - last_start
    assert seg.stat().st_size == last_start
    assert read_log(tmp_path) is not None and check(tmp_path).torn is None


def test_torn_segment_header_of_newest_segment_is_torn(tmp_path: Path) -> None:
    write_log(tmp_path, payloads(40), segment_bytes=200)
    newest = segments(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes()[:7])
    scan = read_log(tmp_path)
    list(scan)
    assert scan.torn == TornTail(newest, 0, 7)
    truncate_torn_tail(scan)
    assert not newest.exists()
    assert check(tmp_path).ok and check(tmp_path).torn is None


def test_zero_filled_tail_after_last_record_is_torn(tmp_path: Path) -> None:
    data = payloads(4)
    write_log(tmp_path, data)
    seg = segments(tmp_path)[0]
    size = seg.stat().st_size
    with seg.open("ab") as f:
        f.write(b"\0" * 4096)  # a crash after the file grew but before the data landed
    records, scan = read_all(tmp_path)
    assert [r.payload for r in records] == data
    assert scan.torn == TornTail(seg, size, 4096)


def test_flipped_byte_in_last_record_ending_at_eof_is_torn(tmp_path: Path) -> None:
    data = payloads(5)
    write_log(tmp_path, data)
    seg = segments(tmp_path)[0]
    flip(seg, seg.stat().st_size - 2)
    records, scan = read_all(tmp_path)
    assert [r.payload for r in records] == data[:-1]
    assert scan.torn is not None


# ------------------------------------------------------------------ damage
def test_flipped_byte_in_middle_record_is_damage_naming_file_and_offset(tmp_path: Path) -> None:
    data = payloads(10)
    ends = write_log(tmp_path, data)
    seg = segments(tmp_path)[0]
    bad_start = fmt.SEGMENT_HEADER_SIZE + ends[3]  # file offset of record 4
    flip(seg, bad_start + fmt.FRAME_HEADER_SIZE + 2)  # a payload byte
    with pytest.raises(LogCorruptError) as info:
        list(read_log(tmp_path))
    assert info.value.path == seg and info.value.offset == bad_start
    assert seg.name in str(info.value) and f"offset {bad_start}" in str(info.value)


def test_flipped_byte_in_last_record_of_older_segment_is_damage(tmp_path: Path) -> None:
    write_log(tmp_path, payloads(40), segment_bytes=200)
    first = segments(tmp_path)[0]
    flip(first, first.stat().st_size - 1)  # torn-looking, but a later segment follows
    with pytest.raises(LogCorruptError, match="checksum"):
        list(read_log(tmp_path))


def test_impossible_length_in_newest_segment_is_damage(tmp_path: Path) -> None:
    ends = write_log(tmp_path, payloads(5))
    seg = segments(tmp_path)[0]
    raw = bytearray(seg.read_bytes())
    at = fmt.SEGMENT_HEADER_SIZE + ends[1]
    raw[at: at + 4] = (fmt.MAX_PAYLOAD + 1).to_bytes(4, "little")
    seg.write_bytes(bytes(raw))
    with pytest.raises(LogCorruptError, match="impossible record length") as info:
        list(read_log(tmp_path))
    assert info.value.offset == at


def test_bad_segment_header_is_damage(tmp_path: Path) -> None:
    write_log(tmp_path, payloads(3))
    seg = segments(tmp_path)[0]
    flip(seg, 8)  # inside base_lsn
    with pytest.raises(LogCorruptError, match="segment header") as info:
        list(read_log(tmp_path))
    assert info.value.offset == 0


def test_missing_middle_segment_is_a_gap(tmp_path: Path) -> None:
    write_log(tmp_path, payloads(60), segment_bytes=200)
    files = segments(tmp_path)
    files[2].unlink()
    with pytest.raises(LogCorruptError, match="gap") as info:
        list(read_log(tmp_path))
    assert info.value.path == files[3]


def test_check_reports_records_bytes_segments_torn_and_damage(tmp_path: Path) -> None:
    ends = write_log(tmp_path, payloads(30), segment_bytes=300)
    report = check(tmp_path)
    files = segments(tmp_path)
    assert report.ok and report.records == 30 and report.segments == len(files)
    assert report.bytes == sum(p.stat().st_size for p in files)
    assert report.end_lsn == ends[-1] and report.torn is None and "ok" in str(report)
    newest = files[-1]
    newest.write_bytes(newest.read_bytes()[:-1])
    report = check(tmp_path)
    assert report.ok and report.torn is not None and report.records == 29
    flip(files[1], fmt.SEGMENT_HEADER_SIZE + 1)
    report = check(tmp_path)
    assert not report.ok and report.damage is not None
    assert report.damage.path == files[1] and files[1].name in str(report)


# ------------------------------------------------------------------ repair
def test_repair_write_tear_middle_backs_up_truncates_and_moves_later_aside(
        tmp_path: Path) -> None:
    data = payloads(60)
    ends = write_log(tmp_path, data, segment_bytes=300)
    files = segments(tmp_path)
    damaged = files[1]
    original = damaged.read_bytes()
    base = int(damaged.name[:20])
    good = [e for e in ends if base < e <= base + 50]  # a few records into segment 1
    cut = good[0] - base + fmt.SEGMENT_HEADER_SIZE  # file offset of the second record
    flip(damaged, cut + fmt.FRAME_HEADER_SIZE)
    result = repair(tmp_path)
    assert result.cut_at == (damaged, cut)
    backup = [b for b in result.backups if b.name.startswith(damaged.name + ".broken-")]
    assert len(backup) == 1 and backup[0].read_bytes()[:cut] == original[:cut]
    assert damaged.stat().st_size == cut
    assert {p.name.split(".broken-")[0] for p in result.moved_aside} == \
        {p.name for p in files[2:]}
    assert segments(tmp_path) == files[:2]
    records = list(read_log(tmp_path))
    assert [r.payload for r in records] == data[: len(records)]
    assert records[-1].lsn_end == good[0]
    assert check(tmp_path).ok
    assert repair(tmp_path).cut_at is None  # nothing left to do


def test_repair_write_tear_last_cuts_the_torn_record_with_backup(tmp_path: Path) -> None:
    data = payloads(5)
    write_log(tmp_path, data)
    seg = segments(tmp_path)[0]
    seg.write_bytes(seg.read_bytes()[:-4])
    result = repair(tmp_path)
    assert result.cut_at is not None and len(result.backups) == 1
    assert [r.payload for r in read_log(tmp_path)] == data[:-1]
    assert check(tmp_path).torn is None


def test_repair_bad_header_moves_the_segment_aside(tmp_path: Path) -> None:
    write_log(tmp_path, payloads(60), segment_bytes=300)
    files = segments(tmp_path)
    flip(files[2], 0)
    result = repair(tmp_path)
    assert result.cut_at == (files[2], 0)
    assert segments(tmp_path) == files[:2] and check(tmp_path).ok


# ------------------------------------------------------------------ group commit, failures
class CountingFsync:
    def __init__(self) -> None:
        self.calls = 0
        self.broken = False

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.broken:
            raise OSError(errno.EIO, "injected fsync failure")
        os.fsync(fd)


def test_concurrent_writers_share_fsyncs(tmp_path: Path) -> None:
    fsync = CountingFsync()

    async def go() -> None:
        w = LogWriter.open(tmp_path, fsync=fsync)
        before = fsync.calls

        async def one(i: int) -> int:
            lsn = w.append(P, b"x%d" % i)
            await asyncio.sleep(0)
            await w.sync_to(lsn)
            assert w.durable_lsn >= lsn
            return lsn

        lsns = await asyncio.gather(*(one(i) for i in range(50)))
        assert w.durable_lsn == max(lsns) == w.end_lsn
        assert fsync.calls - before <= 5, fsync.calls - before
        await w.close()

    asyncio.run(go())
    assert len(list(read_log(tmp_path))) == 50


def test_failing_fsync_fails_every_waiter_and_later_appends(tmp_path: Path) -> None:
    fsync = CountingFsync()

    async def go() -> None:
        w = LogWriter.open(tmp_path, fsync=fsync)
        first = w.append(P, b"ok")
        await w.sync_to(first)
        durable = w.durable_lsn
        fsync.broken = True
        lsns = [w.append(P, b"%d" % i) for i in range(10)]
        results = await asyncio.gather(*(w.sync_to(lsn) for lsn in lsns),
                                       return_exceptions=True)
        assert all(isinstance(r, LogFailedError) for r in results), results
        assert w.failed and w.failure and "fsync" in w.failure
        assert w.durable_lsn == durable
        calls = fsync.calls
        with pytest.raises(LogFailedError):
            w.append(P, b"later")
        with pytest.raises(LogFailedError):
            await w.sync_to(lsns[-1])
        fsync.broken = False  # the disk "recovers": still never fsync again
        with pytest.raises(LogFailedError):
            await w.sync_to(lsns[-1])
        await w.close()
        assert fsync.calls == calls and w.durable_lsn == durable

    asyncio.run(go())


def test_failed_write_is_cut_back_and_not_in_the_log(tmp_path: Path) -> None:
    async def go() -> None:
        w = LogWriter.open(tmp_path)
        good = w.append(P, b"good")
        assert w._file is not None
        real: BinaryIO = w._file

        class Full:
            def __getattr__(self, name: str) -> object:
                return getattr(real, name)

            def write(self, data: object) -> int:
                real.write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")

        w._file = Full()  # type: ignore[assignment]
        with pytest.raises(LogWriteError) as info:
            w.append(P, b"lost")
        assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
        w._file = real
        assert not w.failed and w.end_lsn == good
        after = w.append(P, b"after")
        await w.sync_to(after)
        await w.close()

    asyncio.run(go())
    assert [r.payload for r in read_log(tmp_path)] == [b"good", b"after"]


def test_remove_segments_before_keeps_the_active_segment(tmp_path: Path) -> None:
    async def go() -> None:
        w = LogWriter.open(tmp_path, segment_bytes=200)
        for p in payloads(60):
            lsn = w.append(P, p)
        await w.sync_to(lsn)
        files = segments(tmp_path)
        assert len(files) > 3
        size = w.size_bytes
        assert size == sum(p.stat().st_size for p in files)
        third = int(files[2].name[:20])
        assert w.remove_segments_before(third) == 2
        assert segments(tmp_path) == files[2:]
        assert w.size_bytes == sum(p.stat().st_size for p in files[2:])
        assert next(r.lsn_start for r in read_log(tmp_path, third)) == third
        w.remove_segments_before(w.end_lsn + 10**6)  # everything is covered
        assert segments(tmp_path) == files[-1:]  # but the active segment stays
        more = w.append(P, b"more")
        await w.sync_to(more)
        await w.close()

    asyncio.run(go())


def test_everysec_syncs_in_the_background(tmp_path: Path) -> None:
    fsync = CountingFsync()

    async def go() -> None:
        w = LogWriter.open(tmp_path, sync=SyncPolicy.EVERYSEC, fsync=fsync)
        w.everysec_interval = 0.05
        before = fsync.calls
        lsn = w.append(P, b"x")
        await w.sync_to(lsn)  # returns at once
        assert w.durable_lsn < lsn
        for _ in range(100):
            if w.durable_lsn >= lsn:
                break
            await asyncio.sleep(0.02)
        assert w.durable_lsn == lsn and fsync.calls > before
        await w.close()

    asyncio.run(go())


def test_off_never_fsyncs_appends(tmp_path: Path) -> None:
    fsync = CountingFsync()

    async def go() -> None:
        w = LogWriter.open(tmp_path, sync=SyncPolicy.OFF, fsync=fsync)
        before = fsync.calls
        for i in range(20):
            await w.sync_to(w.append(P, b"%d" % i))
        await w.close()
        assert fsync.calls == before

    asyncio.run(go())
    assert len(list(read_log(tmp_path))) == 20


def test_sync_policy_values_are_the_config_strings() -> None:
    assert [p.value for p in SyncPolicy] == ["always", "everysec", "off"]
    assert SyncPolicy("everysec") is SyncPolicy.EVERYSEC
    assert "If unsure: always" in (SyncPolicy.__doc__ or "")


# ------------------------------------------------------------------ reading ahead
@pytest.mark.parametrize("budget", [1, 40, 64 << 20])
def test_read_ahead_gives_the_scan_records_then_its_end(tmp_path: Path, budget: int) -> None:
    """Read on a thread at most `budget` bytes ahead (1: one record at a time), the
    records come in order, whole, and the scan's end and torn tail are set after."""
    data = payloads(50)
    ends = write_log(tmp_path, data, segment_bytes=600)
    with segments(tmp_path)[-1].open("ab") as f:
        f.write(b"\x05\x00")  # a torn frame header at the end
    scan = read_log(tmp_path)
    got = list(read_ahead(scan, budget))
    assert [r.payload for r in got] == data and [r.lsn_end for r in got] == ends
    assert scan.end_lsn == ends[-1] and scan.torn is not None and scan.torn.byte_count == 2


def test_read_ahead_raises_damage_after_the_records_before_it(tmp_path: Path) -> None:
    data = payloads(10)
    ends = write_log(tmp_path, data)
    seg = segments(tmp_path)[0]
    flip(seg, fmt.SEGMENT_HEADER_SIZE + ends[3] + fmt.FRAME_HEADER_SIZE + 2)  # record 4's
    got: list[bytes] = []
    with pytest.raises(LogCorruptError) as info:
        for record in read_ahead(read_log(tmp_path), 1):
            got.append(record.payload)
    assert got == data[:4] and info.value.offset == fmt.SEGMENT_HEADER_SIZE + ends[3]


def test_read_ahead_stops_its_thread_when_the_caller_stops(tmp_path: Path) -> None:
    write_log(tmp_path, payloads(200))
    records = read_ahead(read_log(tmp_path), 1)
    assert next(records).lsn_start == 0
    assert any(t.name == "log-read-ahead" for t in threading.enumerate())
    records.close()  # (a caller leaving its loop early: an error applying a record)
    assert not any(t.name == "log-read-ahead" for t in threading.enumerate())
