"""Reading the shard log: replay, check and repair. Format: wal_format, docs/log-format.md.

A torn record at the very end of the newest segment (a crash mid-write) is expected: the
scan stops before it and reports it in `scan.torn`, and `truncate_torn_tail` cuts it off.
Torn means, in the newest segment only: fewer than 9 header bytes left; a frame of
plausible length running past end-of-file; a frame failing its checksum that ends exactly
at end-of-file; or nothing but zero bytes from the frame to end-of-file. A segment header
cut short or all zero in the newest segment is torn too (the whole file).

Anything else that does not decode -- a bad checksum with data after it, a length above
MAX_PAYLOAD, an unknown record type, a bad segment header, a gap between segments, a log
that starts after the LSN replay must start from -- is damage: `LogCorruptError` names the
file and the offset. Only `repair` cuts damaged data, it keeps a backup of everything it
touches, and it runs only when an operator asks (etcd's repair policy).
"""

from __future__ import annotations

import io
import itertools
import os
import re
import shutil
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from memstore.storage import wal_format as fmt
from memstore.storage.fsutil import Fsync, fsync_path

_ZERO_CHUNK = 1 << 16


class LogCorruptError(Exception):
    """The log is damaged at `path`, file offset `offset` (start of the bad frame)."""

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
    """`byte_count` bytes from file `offset` to the end of `path` are a torn record."""

    path: Path
    offset: int
    byte_count: int


def _zero_to_end(f: BinaryIO, pos: int) -> bool:
    f.seek(pos)
    while chunk := f.read(_ZERO_CHUNK):
        if chunk.count(0) != len(chunk):
            return False
    return True


def decode_segment(f: BinaryIO, *, path: Path | str = "<memory>", base: int | None = None,
                   last: bool = True) -> Iterator[Record | TornTail]:
    """Records of one segment file in order, streaming; a TornTail last if `last` and the
    file ends in a torn record. `base` is the LSN the file name promises (None: trust the
    header). Works on any seekable binary file, e.g. io.BytesIO in tests."""
    path = Path(path)
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    head = f.read(fmt.SEGMENT_HEADER_SIZE)
    if len(head) < fmt.SEGMENT_HEADER_SIZE or (last and _zero_to_end(f, 0)):
        if last:
            yield TornTail(path, 0, size)
            return
        raise LogCorruptError(path, 0, "segment header cut short")
    magic, version, header_base = fmt.SEGMENT_HEADER.unpack_from(head)
    (crc,) = fmt.SEGMENT_CRC.unpack_from(head, fmt.SEGMENT_HEADER.size)
    if magic != fmt.SEGMENT_MAGIC or zlib.crc32(head[: fmt.SEGMENT_HEADER.size]) != crc:
        raise LogCorruptError(path, 0, "bad segment header (magic or checksum)")
    if version != fmt.FORMAT_VERSION:
        raise LogCorruptError(path, 0, f"unknown log format version {version}")
    if base is not None and header_base != base:
        raise LogCorruptError(path, 0, f"header says base LSN {header_base}, "
                                       f"file name says {base}")
    pos = fmt.SEGMENT_HEADER_SIZE
    f.seek(pos)
    while pos < size:
        header = f.read(fmt.FRAME_HEADER_SIZE)
        if len(header) < fmt.FRAME_HEADER_SIZE:
            if last:
                yield TornTail(path, pos, size - pos)
                return
            raise LogCorruptError(path, pos, "frame header cut short")
        length, crc, rtype = fmt.FRAME_HEADER.unpack(header)
        frame_end = pos + fmt.FRAME_HEADER_SIZE + length
        if length > fmt.MAX_PAYLOAD or frame_end > size:
            if last and (length <= fmt.MAX_PAYLOAD or _zero_to_end(f, pos)) \
                    and not _whole_frame_after(f, pos, size):
                yield TornTail(path, pos, size - pos)
                return
            if length > fmt.MAX_PAYLOAD:
                raise LogCorruptError(path, pos, f"impossible record length {length}")
            raise LogCorruptError(path, pos, "record runs past the end of the segment")
        payload = f.read(length)  # length <= bytes left, so no huge allocation
        if zlib.crc32(payload, zlib.crc32(bytes((rtype,)))) != crc:
            if last and (frame_end == size or _zero_to_end(f, pos)):
                yield TornTail(path, pos, size - pos)
                return
            raise LogCorruptError(path, pos, "checksum mismatch")
        if rtype not in fmt.RECORD_TYPES:
            raise LogCorruptError(path, pos, f"unknown record type {rtype}")
        lsn = header_base + pos - fmt.SEGMENT_HEADER_SIZE
        yield Record(lsn, lsn + frame_end - pos, rtype, payload)
        pos = frame_end


def _whole_frame_after(f: BinaryIO, pos: int, size: int) -> bool:
    """True if a checksum-valid frame starts somewhere after `pos`: then the frame at `pos`
    is not a torn write (which can only be the last thing in the file) but a damaged
    length, and cutting there would drop acknowledged records."""
    f.seek(pos + 1)
    data = f.read(size - pos - 1)
    f.seek(pos + fmt.FRAME_HEADER_SIZE)
    for match in _TYPE_BYTE.finditer(data, fmt.FRAME_HEADER_SIZE - 1):
        start = match.start() - (fmt.FRAME_HEADER_SIZE - 1)
        length, crc, rtype = fmt.FRAME_HEADER.unpack_from(data, start)
        end = start + fmt.FRAME_HEADER_SIZE + length
        if end <= len(data) and zlib.crc32(
                data[start + fmt.FRAME_HEADER_SIZE:end], zlib.crc32(bytes((rtype,)))) == crc:
            return True
    return False


_TYPE_BYTE = re.compile(b"[" + bytes(sorted(fmt.RECORD_TYPES)) + b"]")


@dataclass
class LogScan:
    """Iterate the records at and after `from_lsn` once. Afterwards `torn` tells if the
    end was torn, `end_lsn` is the LSN just past the last good record (where a writer
    continues), `records` counts the records yielded.

    `from_lsn` None: from the start of the oldest segment on disk. Otherwise it must be a
    record boundary and the log must reach back to it (else LogCorruptError: records are
    missing); segments wholly before it are skipped unread. If the log ends before
    `from_lsn` (its unsynced tail was lost but the snapshot has it), nothing is yielded.
    """

    directory: Path
    from_lsn: int | None = None
    torn: TornTail | None = None
    records: int = 0
    end_lsn: int = 0
    segments: int = 0

    def __iter__(self) -> Iterator[Record]:
        segments = fmt.list_segments(self.directory)
        if not segments:
            self.end_lsn = self.from_lsn or 0
            return
        check_chain(segments)
        start = segments[0][0] if self.from_lsn is None else self.from_lsn
        first = 0
        for i, (base, _) in enumerate(segments):
            if base <= start:
                first = i
        if segments[first][0] > start:
            raise LogCorruptError(segments[0][1], 0, f"log starts at LSN {segments[0][0]} "
                                  f"but replay must start at LSN {start}: records missing")
        expected: int | None = None
        for i in range(first, len(segments)):
            base, path = segments[i]
            if expected is not None and base != expected:
                raise LogCorruptError(path, 0, f"gap in the log: previous segment ends at "
                                               f"LSN {expected}, this one starts at {base}")
            self.segments += 1
            expected = base
            self.end_lsn = base
            with path.open("rb") as f:
                for item in decode_segment(f, path=path, base=base,
                                           last=i == len(segments) - 1):
                    if isinstance(item, TornTail):
                        self.torn = item
                        break
                    expected = self.end_lsn = item.lsn_end
                    if item.lsn_end <= start:
                        continue
                    if item.lsn_start < start:
                        raise LogCorruptError(path, item.lsn_start - base
                                              + fmt.SEGMENT_HEADER_SIZE,
                                              f"LSN {start} falls inside a record")
                    self.records += 1
                    yield item
        self.end_lsn = max(self.end_lsn, start)


def check_chain(segments: list[tuple[int, Path]]) -> None:
    """Every segment must start where the one before it ends (its base LSN plus its frame
    bytes): a gap or an overlap means records are missing or were written by two writers,
    even before the LSN replay starts at. Raises LogCorruptError naming the later file."""
    for (base, path), (next_base, next_path) in itertools.pairwise(segments):
        end = base + path.stat().st_size - fmt.SEGMENT_HEADER_SIZE
        if next_base != end:
            what = "gap in" if next_base > end else "overlap in"
            raise LogCorruptError(next_path, 0, f"{what} the log: {path.name} ends at LSN "
                                                f"{end}, the next segment starts at {next_base}")


def read_log(directory: Path | str, from_lsn: int | None = None) -> LogScan:
    """Records from `from_lsn` (see LogScan); iterate the result once."""
    return LogScan(Path(directory), from_lsn)


def read_ahead(records: Iterable[Record], budget: int = 64 << 20) -> Iterator[Record]:
    """`records` (a LogScan) read by a thread of its own, up to `budget` payload bytes
    ahead of the caller: reading the segments and checking each record's crc32 release
    the GIL, so on a machine of two cores they overlap the caller's applying the records
    (recovery). An error of the reading (damage) is raised where the caller reaches it,
    after every record before it; a caller that stops early stops the thread. A scan's
    `torn` and `end_lsn` are final once the iteration has ended (after the last record
    the reader may still be scanning a torn tail)."""
    ahead: deque[Record] = deque()
    state = {"bytes": 0, "done": False, "stop": False}
    failure: list[BaseException] = []
    turn = threading.Condition()

    def read() -> None:
        try:
            for record in records:
                with turn:
                    while state["bytes"] >= budget and not state["stop"]:
                        turn.wait()
                    if state["stop"]:
                        return
                    ahead.append(record)
                    state["bytes"] += len(record.payload)
                    turn.notify_all()
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            failure.append(exc)
        finally:
            with turn:
                state["done"] = True
                turn.notify_all()

    reader = threading.Thread(target=read, name="log-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            with turn:
                while not ahead and not state["done"]:
                    turn.wait()
                if not ahead:
                    break
                record = ahead.popleft()
                state["bytes"] -= len(record.payload)
                turn.notify_all()
            yield record
        if failure:
            raise failure[0]
    finally:
        with turn:
            state["stop"] = True
            turn.notify_all()
        reader.join()


def truncate_torn_tail(scan: LogScan, fsync: Fsync = os.fsync) -> int:
    """Cut the torn bytes found by a finished scan off the newest segment (delete the
    segment if even its header was torn) and fsync. Returns the bytes cut."""
    torn = scan.torn
    if torn is None:
        return 0
    if torn.offset == 0:
        torn.path.unlink()
    else:
        with torn.path.open("r+b") as f:
            f.truncate(torn.offset)
            fsync(f.fileno())
    fsync_path(torn.path.parent, fsync)
    scan.torn = None
    return torn.byte_count


# ---------------------------------------------------------------------- check and repair
@dataclass
class CheckReport:
    segments: int = 0
    records: int = 0
    bytes: int = 0
    first_lsn: int = 0
    end_lsn: int = 0
    torn: TornTail | None = None
    damage: LogCorruptError | None = None

    @property
    def ok(self) -> bool:
        """No damage (a torn tail is normal: start-up cuts it)."""
        return self.damage is None

    def __str__(self) -> str:
        lines = [(f"log: {self.segments} segments, {self.records} records, "
                  f"{self.bytes} bytes, LSN {self.first_lsn}..{self.end_lsn}")]
        if self.torn:
            lines.append(f"torn record at the end: {self.torn.path} offset {self.torn.offset} "
                         f"({self.torn.byte_count} bytes; cut off at next start-up)")
        if self.damage:
            lines.append(f"DAMAGED: {self.damage.path} at offset {self.damage.offset}: "
                         f"{self.damage.reason}")
        else:
            lines.append("ok")
        return "\n".join(lines)


def check(directory: Path | str) -> CheckReport:
    """Read the whole log; report its size, a torn tail and the first damage."""
    directory = Path(directory)
    segments = fmt.list_segments(directory)
    report = CheckReport(segments=len(segments),
                         bytes=sum(p.stat().st_size for _, p in segments),
                         first_lsn=segments[0][0] if segments else 0)
    scan = read_log(directory, None)
    try:
        for _ in scan:
            pass
    except LogCorruptError as exc:
        report.damage = exc
    report.records = scan.records
    report.end_lsn = scan.end_lsn
    report.torn = scan.torn
    return report


@dataclass
class RepairReport:
    cut_at: tuple[Path, int] | None = None  # file and offset of the cut
    bytes_removed: int = 0
    moved_aside: list[Path] = field(default_factory=list)  # whole segments, renamed
    backups: list[Path] = field(default_factory=list)  # every backup file written

    def __str__(self) -> str:
        if self.cut_at is None:
            return "nothing repaired"
        path, offset = self.cut_at
        kept = ", ".join(str(b) for b in self.backups)
        return (f"cut the log at {path} offset {offset} ({self.bytes_removed} bytes removed); "
                f"backups: {kept}")


def _backup_name(path: Path, stamp: str) -> Path:
    candidate = path.with_name(f"{path.name}.broken-{stamp}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.broken-{stamp}-{n}")
        n += 1
    return candidate


def repair(directory: Path | str, fsync: Fsync = os.fsync) -> RepairReport:
    """Cut the log at the end of its last good record.

    The damaged segment (or the one with the torn tail) is copied to
    NAME.broken-<UTC timestamp> and fsynced, then truncated at the bad frame; a segment
    damaged in its header (or after a gap) and every later segment are renamed to
    NAME.broken-<UTC timestamp> whole. Then the directory is fsynced. No damage and no
    torn tail: nothing is touched.
    """
    directory = Path(directory)
    report = check(directory)
    bad: tuple[Path, int] | None = None
    if report.damage is not None:
        bad = (report.damage.path, report.damage.offset)
    elif report.torn is not None:
        bad = (report.torn.path, report.torn.offset)
    if bad is None:
        return RepairReport()
    path, offset = bad
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    result = RepairReport(cut_at=bad)
    segments = fmt.list_segments(directory)
    cut_base = next(base for base, p in segments if p == path)
    if offset >= fmt.SEGMENT_HEADER_SIZE:
        backup = _backup_name(path, stamp)
        shutil.copyfile(path, backup)
        fsync_path(backup, fsync)
        result.backups.append(backup)
        size = path.stat().st_size
        with path.open("r+b") as f:
            f.truncate(offset)
            fsync(f.fileno())
        result.bytes_removed += size - offset
        later = [p for base, p in segments if base > cut_base]
    else:
        later = [p for base, p in segments if base >= cut_base]
    for p in later:
        moved = _backup_name(p, stamp)
        result.bytes_removed += p.stat().st_size
        p.rename(moved)
        result.moved_aside.append(moved)
        result.backups.append(moved)
    fsync_path(directory, fsync)
    return result


def read_segment_bytes(data: bytes, *, last: bool = True) -> list[Record | TornTail]:
    """Decode one segment held in memory (tools and tests)."""
    return list(decode_segment(io.BytesIO(data), last=last))
