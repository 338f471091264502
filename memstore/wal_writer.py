"""Appending to the shard log, with group commit.

One writer per shard, used from the shard's event loop. `append` puts a frame in the OS
(write, no fsync) and returns the LSN just past it; `sync_to(lsn)` waits until the sync
policy says that LSN is durable. Under `always`, at most one fsync is in flight, in a
worker thread; it covers every byte written before it started, so every write waiting
meanwhile shares the next one (group commit).

If an fsync fails the writer fails for good: the kernel may have dropped the dirty pages,
so a later successful fsync would prove nothing (PostgreSQL's "fsyncgate"). Waiters get
LogFailedError; appends are refused. A failed write() (full disk) is cut back off the file
and refused with LogWriteError, and the writer carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from memstore import wal_format as fmt

log = logging.getLogger("memstore.log")


class SyncPolicy(StrEnum):
    """When the log is fsynced (see README "Configuration").

    always   -- acknowledge a write only after an fsync covers it; nothing acknowledged is
                lost even on power loss. Group commit keeps throughput up. The default.
    everysec -- fsync about once a second; power loss can lose ~1 s of acknowledged
                writes (a process crash loses nothing: the data is in the OS).
    off      -- never fsync; the OS writes back when it likes. Fastest, least safe.
    If unsure: always.
    """

    ALWAYS = "always"
    EVERYSEC = "everysec"
    OFF = "off"


class LogFailedError(OSError):
    """The log can no longer guarantee durability; the shard is read-only until restart."""


class LogWriteError(OSError):
    """This record could not be written (e.g. disk full); it is not in the log."""


def sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def segment_header(base_lsn: int) -> bytes:
    head = fmt.SEGMENT_HEADER.pack(fmt.SEGMENT_MAGIC, fmt.FORMAT_VERSION, base_lsn)
    return head + zlib.crc32(head).to_bytes(4, "little")


def frame(rtype: int, payload: bytes) -> bytes:
    if len(payload) > fmt.MAX_PAYLOAD:
        raise LogWriteError(f"record of {len(payload)} bytes exceeds {fmt.MAX_PAYLOAD}")
    crc = zlib.crc32(payload, zlib.crc32(bytes((rtype,))))
    return fmt.FRAME_HEADER.pack(len(payload), crc, rtype) + payload


class LogWriter:
    def __init__(self, directory: Path, sync: SyncPolicy, segment_bytes: int,
                 fsync: Callable[[int], None]) -> None:
        self.directory = directory
        self.sync = sync
        self.segment_bytes = segment_bytes
        self._fsync = fsync
        self._file: BinaryIO | None = None
        self._base = 0
        self.end_lsn = 0
        self.durable_lsn = 0
        self.size_bytes = 0
        self.failed = False
        self.failure: str | None = None
        self._retired: list[BinaryIO] = []
        self._inflight: asyncio.Task[None] | None = None
        self._background: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memstore-fsync")

    @classmethod
    def open(cls, directory: Path, *, sync: SyncPolicy = SyncPolicy.ALWAYS,
             segment_bytes: int = 64 << 20, fsync: Callable[[int], None] = os.fsync,
             start_lsn: int = 0) -> LogWriter:
        """Append after the end of the newest segment (recovery has already cut any torn
        tail), or start a new log at `start_lsn` (the position the last snapshot covers)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        writer = cls(directory, sync, segment_bytes, fsync)
        segments = sorted((base, p) for p in directory.iterdir()
                          if (base := fmt.parse_segment_name(p.name)) is not None)
        writer.size_bytes = sum(p.stat().st_size for _, p in segments)
        if segments:
            base, path = segments[-1]
            f = path.open("r+b", buffering=0)
            size = f.seek(0, os.SEEK_END)
            writer._file, writer._base = f, base
            writer.end_lsn = writer.durable_lsn = base + size - fmt.SEGMENT_HEADER_SIZE
        else:
            writer._new_segment(start_lsn)
            writer.end_lsn = writer.durable_lsn = start_lsn
        return writer

    # ------------------------------------------------------------------ appending
    def append(self, rtype: int, payload: bytes) -> int:
        if self.failed:
            raise LogFailedError(self.failure or "log failed")
        data = frame(rtype, payload)
        if self._segment_used() >= self.segment_bytes:
            self.rotate()
        f = self._file
        assert f is not None
        start = f.tell()
        try:
            view = memoryview(data)
            while view:
                written = f.write(view)
                if not written:
                    raise OSError("write returned 0 bytes")
                view = view[written:]
        except OSError as exc:
            try:
                f.truncate(start)
                f.seek(start)
            except OSError as cut:
                self._fail(f"write failed ({exc}) and could not be cut back ({cut})")
                raise LogFailedError(self.failure) from exc
            raise LogWriteError(exc.errno or 0, f"log write failed: {exc.strerror or exc}"
                                ) from exc
        self.end_lsn += len(data)
        self.size_bytes += len(data)
        if self.sync is SyncPolicy.EVERYSEC:
            self._ensure_background()
        return self.end_lsn

    def _segment_used(self) -> int:
        return self.end_lsn - self._base

    def _new_segment(self, base: int) -> None:
        path = self.directory / fmt.segment_name(base)
        f = path.open("xb", buffering=0)
        f.write(segment_header(base))
        self._fsync(f.fileno())
        sync_directory(self.directory)
        self._file, self._base = f, base
        self.size_bytes += fmt.SEGMENT_HEADER_SIZE

    def rotate(self) -> None:
        """Close the current segment (fsynced) and start a new one at end_lsn."""
        if self.failed or self._segment_used() == 0:
            return
        old = self._file
        assert old is not None
        try:
            self._fsync(old.fileno())
        except OSError as exc:
            self._fail(f"fsync failed: {exc}")
            raise LogFailedError(self.failure) from exc
        self.durable_lsn = max(self.durable_lsn, self.end_lsn)
        self._retired.append(old)  # an fsync in a worker thread may still hold its fd
        self._new_segment(self.end_lsn)
        if self._inflight is None:
            self._close_retired()

    def _close_retired(self) -> None:
        for f in self._retired:
            f.close()
        self._retired.clear()

    # ------------------------------------------------------------------ syncing
    async def sync_to(self, lsn: int) -> None:
        if self.failed:
            raise LogFailedError(self.failure or "log failed")
        if self.sync is not SyncPolicy.ALWAYS:
            return
        while self.durable_lsn < lsn:
            if self.failed:
                raise LogFailedError(self.failure or "log failed")
            if self._inflight is None:
                self._inflight = asyncio.get_running_loop().create_task(self._sync_now())
            await asyncio.shield(self._inflight)

    async def _sync_now(self) -> None:
        target = self.end_lsn
        f = self._file
        assert f is not None
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._fsync,
                                                             f.fileno())
        except OSError as exc:
            self._fail(f"fsync failed: {exc}")
            raise LogFailedError(self.failure) from exc
        finally:
            self._inflight = None
            self._close_retired()
        self.durable_lsn = max(self.durable_lsn, target)

    def _ensure_background(self) -> None:
        if self._background is None:
            with contextlib.suppress(RuntimeError):  # no running loop: tools, tests
                self._background = asyncio.get_running_loop().create_task(self._every_second())

    async def _every_second(self) -> None:
        while not self.failed:
            await asyncio.sleep(1.0)
            if self.durable_lsn < self.end_lsn and self._inflight is None:
                self._inflight = asyncio.get_running_loop().create_task(self._sync_now())
                with contextlib.suppress(LogFailedError):
                    await asyncio.shield(self._inflight)

    def _fail(self, reason: str) -> None:
        if not self.failed:
            log.error("log failed: %s; refusing writes until restart", reason)
        self.failed = True
        self.failure = reason

    # ------------------------------------------------------------------ housekeeping
    def remove_segments_before(self, lsn: int) -> int:
        """Delete segments all of whose frames lie before `lsn` (never the active one)."""
        segments = sorted((base, p) for p in self.directory.iterdir()
                          if (base := fmt.parse_segment_name(p.name)) is not None)
        removed = 0
        for (base, path), (next_base, _) in itertools.pairwise(segments):
            if next_base <= lsn and base != self._base:
                self.size_bytes -= path.stat().st_size
                path.unlink()
                removed += 1
        if removed:
            sync_directory(self.directory)
        return removed

    async def close(self) -> None:
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
        if self._inflight is not None:
            with contextlib.suppress(LogFailedError):
                await asyncio.shield(self._inflight)
        if self._file is not None:
            if not self.failed and self.sync is not SyncPolicy.OFF:
                with contextlib.suppress(OSError):
                    self._fsync(self._file.fileno())
                    self.durable_lsn = self.end_lsn
            self._file.close()
            self._file = None
        self._close_retired()
        self._executor.shutdown(wait=False)
