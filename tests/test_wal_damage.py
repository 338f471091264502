"""More damage cases for the log: a plausible garbage length with whole records after it,
every byte of a segment header, repair's backups and repair on a healthy log."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from memstore.storage import wal_format as fmt
from memstore.storage.wal_reader import LogCorruptError, check, read_log, repair
from memstore.storage.wal_writer import LogWriter, SyncPolicy

HEAD = fmt.SEGMENT_HEADER_SIZE
FRAME = fmt.FRAME_HEADER_SIZE


def payload(i: int) -> bytes:
    return (f"record-{i:04d}-".encode() * 30)[:30]


def write_log(directory: Path, n: int, *, segment_bytes: int = 1 << 20, start: int = 0) -> None:
    async def go() -> None:
        w = LogWriter.open(directory, sync=SyncPolicy.OFF, segment_bytes=segment_bytes)
        for i in range(start, start + n):
            w.append(fmt.RECORD_PROFILES, payload(i))
        await w.close()

    asyncio.run(go())


def segments(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if fmt.SEGMENT_NAME_RE.match(p.name))


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_garbage_length_in_middle_frame_of_newest_segment_is_damage(tmp_path: Path) -> None:
    write_log(tmp_path, 5)
    (seg,) = segments(tmp_path)
    second = HEAD + FRAME + 30
    data = bytearray(seg.read_bytes())
    data[second:second + 4] = (1000).to_bytes(4, "little")  # <= MAX_PAYLOAD, past EOF
    seg.write_bytes(bytes(data))
    with pytest.raises(LogCorruptError):
        list(read_log(tmp_path))


def test_flipped_byte_anywhere_in_a_segment_header_is_damage(tmp_path: Path) -> None:
    write_log(tmp_path, 12, segment_bytes=100)
    segs = segments(tmp_path)
    for seg in (segs[1], segs[-1]):  # an older segment, and the newest one
        original = seg.read_bytes()
        for offset in range(HEAD):
            flip(seg, offset)
            with pytest.raises(LogCorruptError) as info:
                list(read_log(tmp_path))
            assert (info.value.path, info.value.offset) == (seg, 0)
            seg.write_bytes(original)


def test_repair_write_tear_middle_backup_holds_exactly_the_original_bytes(
        tmp_path: Path) -> None:
    write_log(tmp_path, 12, segment_bytes=100)
    segs = segments(tmp_path)
    damaged = segs[1]
    flip(damaged, HEAD + FRAME + 30 + FRAME + 3)  # payload of its second record
    original = damaged.read_bytes()
    later = {p.name: p.read_bytes() for p in segs[2:]}
    report = repair(tmp_path)
    cut = HEAD + FRAME + 30
    assert report.cut_at == (damaged, cut)
    backup = report.backups[0]
    assert backup.name.startswith(damaged.name + ".broken-")
    assert backup.read_bytes() == original
    assert damaged.read_bytes() == original[:cut]
    assert {p.name.split(".broken-")[0]: p.read_bytes() for p in report.moved_aside} == later
    assert segments(tmp_path) == segs[:2]
    assert check(tmp_path).ok and check(tmp_path).torn is None
    n = len(list(read_log(tmp_path)))
    write_log(tmp_path, 1, segment_bytes=100, start=n)  # the writer continues after the cut
    assert [r.payload for r in read_log(tmp_path)] == [payload(i) for i in range(n + 1)]


def test_repair_missing_middle_segment_moves_later_segments_aside(tmp_path: Path) -> None:
    write_log(tmp_path, 12, segment_bytes=100)
    segs = segments(tmp_path)
    segs[2].unlink()
    report = repair(tmp_path)
    assert report.cut_at == (segs[3], 0)
    assert segments(tmp_path) == segs[:2]
    assert len(report.moved_aside) == len(segs) - 3
    assert check(tmp_path).ok


def test_repair_on_a_healthy_log_changes_no_byte(tmp_path: Path) -> None:
    write_log(tmp_path, 12, segment_bytes=100)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    report = repair(tmp_path)
    assert report.cut_at is None and report.backups == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
