"""Reading the log while it is written: a watcher's cursor. Format: wal_format.

A `LogTail` reads the records from an LSN on, up to a limit the caller gives (the writer's
durable or written end: never a record still being appended), across segment files, at
its reader's own pace: it holds one open file and no more than a batch of records. A
segment deleted under it (snapshot retention) stays readable through the open file; one
deleted before it was reached means the cursor fell behind what the log keeps
(`LogGone`).

Damage is reported as LogCorruptError with the file and offset, as replay does; a frame
cut short below the limit cannot happen (the limit is only ever a frame boundary the
writer has passed).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import BinaryIO

from memstore.storage import wal_format as fmt
from memstore.storage.wal_reader import LogCorruptError, Record


class LogGone(Exception):
    """The log no longer holds the position asked for (it was older than what is kept)."""

    def __init__(self, lsn: int, oldest: int) -> None:
        super().__init__(f"position {lsn} is older than the oldest the log keeps ({oldest})")
        self.lsn = lsn
        self.oldest = oldest


class LogTail:
    """Records from `lsn` (a record boundary) on, in order."""

    def __init__(self, directory: Path, lsn: int) -> None:
        self.directory = directory
        self.lsn = lsn
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self._base = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> bool:
        """Open the segment holding self.lsn; False if none does yet (the writer has not
        rotated there). LogGone if the log begins after it."""
        segments = fmt.list_segments(self.directory)
        if not segments or segments[0][0] > self.lsn:
            raise LogGone(self.lsn, segments[0][0] if segments else self.lsn)
        chosen = None
        for base, path in segments:
            if base <= self.lsn:
                chosen = (base, path)
        assert chosen is not None
        base, path = chosen
        try:
            f = path.open("rb")
        except FileNotFoundError:  # deleted between the listing and here
            raise LogGone(self.lsn, base) from None
        self.close()
        self._file, self._path, self._base = f, path, base
        return True

    def read(self, limit: int, max_bytes: int = 4 << 20) -> list[Record]:
        """The records from the cursor up to `limit` (at most about `max_bytes` of them);
        the cursor moves past them."""
        out: list[Record] = []
        budget = max_bytes
        while self.lsn < limit and budget > 0:
            if self._file is None:
                self._open()
            f, path = self._file, self._path
            assert f is not None and path is not None
            offset = fmt.SEGMENT_HEADER_SIZE + self.lsn - self._base
            f.seek(offset)
            header = f.read(fmt.FRAME_HEADER_SIZE)
            if not header:  # the end of this segment: the next one starts here
                self.close()
                nxt = self.directory / fmt.SEGMENT_NAME.format(base_lsn=self.lsn)
                if not nxt.exists():
                    segments = fmt.list_segments(self.directory)
                    if segments and segments[0][0] > self.lsn:
                        raise LogGone(self.lsn, segments[0][0])
                    break  # not rotated yet: nothing more below the limit
                continue
            if len(header) < fmt.FRAME_HEADER_SIZE:
                raise LogCorruptError(path, offset, "frame header cut short below the "
                                                    "written end")
            length, crc, rtype = fmt.FRAME_HEADER.unpack(header)
            if length > fmt.MAX_PAYLOAD:
                raise LogCorruptError(path, offset, f"impossible record length {length}")
            payload = f.read(length)
            if len(payload) < length or zlib.crc32(payload,
                                                   zlib.crc32(bytes((rtype,)))) != crc:
                raise LogCorruptError(path, offset, "record cut short or checksum mismatch "
                                                    "below the written end")
            end = self.lsn + fmt.FRAME_HEADER_SIZE + length
            out.append(Record(self.lsn, end, rtype, payload))
            self.lsn = end
            budget -= length
        return out
