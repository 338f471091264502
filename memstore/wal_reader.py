"""Reading the shard log: replay, check and repair.

A torn record at the very end of the newest segment (a crash mid-write) is expected: the
scan stops before it and reports it, and `truncate_torn_tail` cuts it off. Anything else
that does not decode — a bad checksum with more data after it, an impossible length, a bad
segment header, a gap between segments — is damage: `LogCorruptError` names the file and
offset. `repair` is the only thing that cuts damaged data, keeps a backup of everything it
cuts, and runs only when an operator asks (etcd's repair policy).
"""

from __future__ import annotations

import os
import shutil
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from memstore import wal_format as fmt


class LogCorruptError(Exception):
    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"damaged log: {path} at offset {offset}: {reason} "
                         "(run `memstore check` and `memstore repair` on the data directory)")
        self.path = path
        self.offset = offset
        self.reason = reason


@dataclass(frozen=True)
class Record:
    lsn_start: int
    lsn_end: int
    rtype: int
    payload: bytes


@dataclass(frozen=True)
class TornTail:
    path: Path
    offset: int
    byte_count: int


def _segments(directory: Path) -> list[tuple[int, Path]]:
    if not directory.exists():
        return []
    return sorted((base, p) for p in directory.iterdir()
                  if (base := fmt.parse_segment_name(p.name)) is not None)


def decode_segment(f: BinaryIO, path: Path, base: int, *, last: bool
                   ) -> Iterator[Record | TornTail]:
    """Records of one segment; a TornTail last if the newest segment ends mid-record."""
    data = f.read()
    if len(data) < fmt.SEGMENT_HEADER_SIZE:
        if last:
            yield TornTail(path, 0, len(data))
            return
        raise LogCorruptError(path, 0, "segment header cut short")
    head = data[: fmt.SEGMENT_HEADER.size]
    magic, version, header_base = fmt.SEGMENT_HEADER.unpack(head)
    crc = int.from_bytes(data[fmt.SEGMENT_HEADER.size: fmt.SEGMENT_HEADER_SIZE], "little")
    if magic != fmt.SEGMENT_MAGIC or zlib.crc32(head) != crc:
        raise LogCorruptError(path, 0, "bad segment header")
    if version != fmt.FORMAT_VERSION:
        raise LogCorruptError(path, 0, f"unknown log format version {version}")
    if header_base != base:
        raise LogCorruptError(path, 0, f"header says base {header_base}, file name {base}")
    pos = fmt.SEGMENT_HEADER_SIZE
    end = len(data)
    while pos < end:
        if end - pos < fmt.FRAME_HEADER_SIZE:
            if last:
                yield TornTail(path, pos, end - pos)
                return
            raise LogCorruptError(path, pos, "frame header cut short")
        length, crc, rtype = fmt.FRAME_HEADER.unpack_from(data, pos)
        if length > fmt.MAX_PAYLOAD:
            raise LogCorruptError(path, pos, f"impossible record length {length}")
        frame_end = pos + fmt.FRAME_HEADER_SIZE + length
        if frame_end > end:
            if last:
                yield TornTail(path, pos, end - pos)
                return
            raise LogCorruptError(path, pos, "record runs past the end of the segment")
        payload = data[pos + fmt.FRAME_HEADER_SIZE: frame_end]
        if zlib.crc32(payload, zlib.crc32(bytes((rtype,)))) != crc:
            if last and frame_end == end:
                yield TornTail(path, pos, end - pos)
                return
            raise LogCorruptError(path, pos, "checksum mismatch")
        if rtype not in fmt.RECORD_TYPES:
            raise LogCorruptError(path, pos, f"unknown record type {rtype}")
        lsn = base + pos - fmt.SEGMENT_HEADER_SIZE
        yield Record(lsn, lsn + frame_end - pos, rtype, payload)
        pos = frame_end


@dataclass
class LogScan:
    """Iterate records from `from_lsn`; afterwards `torn` tells if the end was torn."""

    directory: Path
    from_lsn: int = 0
    torn: TornTail | None = None
    records: int = 0

    def __iter__(self) -> Iterator[Record]:
        segments = _segments(self.directory)
        expected: int | None = None
        for i, (base, path) in enumerate(segments):
            last = i == len(segments) - 1
            size = path.stat().st_size
            seg_end = base + max(0, size - fmt.SEGMENT_HEADER_SIZE)
            if expected is not None and base != expected:
                raise LogCorruptError(path, 0, f"gap in the log: expected a segment at LSN "
                                               f"{expected}, found {base}")
            expected = seg_end
            if seg_end <= self.from_lsn and not last:
                continue
            with path.open("rb") as f:
                for item in decode_segment(f, path, base, last=last):
                    if isinstance(item, TornTail):
                        self.torn = item
                        return
                    if item.lsn_start >= self.from_lsn:
                        self.records += 1
                        yield item


def read_log(directory: Path, from_lsn: int = 0) -> LogScan:
    return LogScan(Path(directory), from_lsn)


def truncate_torn_tail(scan: LogScan) -> None:
    torn = scan.torn
    if torn is None:
        return
    if torn.offset == 0:  # the segment never got its header
        torn.path.unlink()
    else:
        with torn.path.open("r+b") as f:
            f.truncate(torn.offset)
            os.fsync(f.fileno())
    fd = os.open(torn.path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class CheckReport:
    segments: int = 0
    records: int = 0
    bytes: int = 0
    torn: TornTail | None = None
    damage: LogCorruptError | None = None

    @property
    def ok(self) -> bool:
        return self.damage is None

    def __str__(self) -> str:
        lines = [f"log: {self.segments} segments, {self.records} records, {self.bytes} bytes"]
        if self.torn:
            lines.append(f"torn record at the end: {self.torn.path} offset {self.torn.offset} "
                         f"({self.torn.byte_count} bytes; cut off at next start-up)")
        if self.damage:
            lines.append(f"DAMAGED: {self.damage.path} at offset {self.damage.offset}: "
                         f"{self.damage.reason}")
        else:
            lines.append("ok")
        return "\n".join(lines)


def check(directory: Path) -> CheckReport:
    directory = Path(directory)
    segments = _segments(directory)
    report = CheckReport(segments=len(segments),
                         bytes=sum(p.stat().st_size for _, p in segments))
    scan = read_log(directory)
    try:
        for _ in scan:
            report.records += 1
    except LogCorruptError as exc:
        report.damage = exc
    report.torn = scan.torn
    return report


@dataclass
class RepairReport:
    cut_at: tuple[Path, int] | None = None
    backups: list[Path] = field(default_factory=list)

    def __str__(self) -> str:
        if self.cut_at is None:
            return "nothing repaired"
        path, offset = self.cut_at
        kept = ", ".join(str(b) for b in self.backups)
        return f"cut {path} at offset {offset}; backups: {kept}"


def repair(directory: Path) -> RepairReport:
    """Cut the log at its last good record. Every file touched is first copied (or moved)
    to NAME.broken-TIMESTAMP beside it."""
    directory = Path(directory)
    report = check(directory)
    damage = report.damage
    if damage is None:
        return RepairReport()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    result = RepairReport(cut_at=(damage.path, damage.offset))
    backup = damage.path.with_name(f"{damage.path.name}.broken-{stamp}")
    shutil.copyfile(damage.path, backup)
    with backup.open("rb") as b:
        os.fsync(b.fileno())
    result.backups.append(backup)
    damaged_base = fmt.parse_segment_name(damage.path.name)
    for base, path in _segments(directory):
        if damaged_base is not None and base > damaged_base:
            moved = path.with_name(f"{path.name}.broken-{stamp}")
            path.rename(moved)
            result.backups.append(moved)
    with damage.path.open("r+b") as f:
        if damage.offset < fmt.SEGMENT_HEADER_SIZE and damaged_base is not None:
            # The header itself is bad: keep the file as an empty segment at its base.
            from memstore.wal_writer import segment_header

            f.seek(0)
            f.write(segment_header(damaged_base))
            f.truncate(fmt.SEGMENT_HEADER_SIZE)
        else:
            f.truncate(damage.offset)
        os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return result
