"""Appending to the shard log, with group commit. Format: wal_format, docs/log-format.md.

One writer per shard, used from the shard's event loop thread. `append` hands a frame to
the OS (write(), no fsync) and returns the LSN just past it; `sync_to(lsn)` waits until
the sync policy says that LSN is durable. Under `always` at most one fsync is in flight,
on a dedicated worker thread; it covers every byte written before it started, so every
writer waiting meanwhile shares the next one (group commit).

Invariants:
- `durable_lsn <= end_lsn`; both only grow. Everything below `durable_lsn` has been
  fsynced (file and, for new segments, directory entry).
- A failed fsync fails the writer for good: the kernel may have dropped the dirty pages
  and cleared the error, so a later successful fsync would prove nothing (PostgreSQL's
  "fsyncgate"). Waiters get LogFailedError, appends are refused, `durable_lsn` stays.
- A failed write() (full disk, EIO) is cut back off the file and refused with
  LogWriteError; the writer carries on. If the cut fails too, the writer fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from memstore.storage import wal_format as fmt
from memstore.storage.fsutil import Fsync, fsync_path

log = logging.getLogger("memstore.log")



class SyncPolicy(StrEnum):
    """When the log is fsynced (the `--sync` setting of a shard).

    always   -- a write is acknowledged only after an fsync covers it: nothing acknowledged
                is lost, even on power loss. Group commit shares one fsync among every
                write in flight, so throughput stays high under concurrency; a lone client
                waits one fsync per write. The default.
    everysec -- fsync in the background about once a second; writes are acknowledged at
                once. A process crash loses nothing (the data is in the OS), power loss or
                a kernel crash can lose about the last second of acknowledged writes.
    off      -- never fsync; the OS writes back when it likes (typically within 30 s).
                Fastest; power loss can lose tens of seconds of acknowledged writes.
    If unsure: always.
    """

    ALWAYS = "always"
    EVERYSEC = "everysec"
    OFF = "off"


class LogFailedError(OSError):
    """The log can no longer guarantee durability; it refuses writes until restart."""


class LogWriteError(OSError):
    """This one record could not be written (e.g. disk full); it is not in the log."""


def _segment_header(base_lsn: int) -> bytes:
    head = fmt.SEGMENT_HEADER.pack(fmt.SEGMENT_MAGIC, fmt.FORMAT_VERSION, base_lsn)
    return head + fmt.SEGMENT_CRC.pack(zlib.crc32(head))


def _frame(rtype: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(bytes((rtype,))))
    return fmt.FRAME_HEADER.pack(len(payload), crc, rtype) + payload


class LogWriter:
    """Appends frames to DATA_DIR/log/ segments. Build with `LogWriter.open`."""

    #: seconds between background fsyncs under SyncPolicy.EVERYSEC
    everysec_interval: float = 1.0

    def __init__(self, directory: Path, sync: SyncPolicy, segment_bytes: int,
                 fsync: Fsync) -> None:
        self.directory = directory
        self.sync = SyncPolicy(sync)
        self.segment_bytes = segment_bytes
        self._fsync = fsync
        self._file: BinaryIO | None = None
        self._base = 0  # base LSN of the active segment
        self.end_lsn = 0  # LSN just past the last appended frame
        self.durable_lsn = 0  # everything below is fsynced
        self.size_bytes = 0  # total size of all segment files
        self.failed = False
        self.failure: str | None = None
        self._closed = False
        self._retired: list[BinaryIO] = []  # rotated-out files an in-flight fsync may use
        self._inflight: asyncio.Task[None] | None = None
        self._background: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memstore-fsync")

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, directory: Path | str, *, sync: SyncPolicy = SyncPolicy.ALWAYS,
             segment_bytes: int = 64 << 20, start_lsn: int | None = None,
             fsync: Fsync = os.fsync) -> LogWriter:
        """Append after the end of the newest segment, or start a log at `start_lsn` (0 if
        None) when there is none. Recovery must have run first (torn tail cut).

        `start_lsn`, if given, is where the caller's replay ended. It must equal the end
        of the newest segment, or lie beyond it: then the snapshot covers every existing
        segment (the log lost its unsynced tail, e.g. under `off`), so they are deleted
        and a new segment starts at `start_lsn`. Before the end: ValueError.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        writer = cls(directory, sync, segment_bytes, fsync)
        try:
            writer._open_newest(start_lsn)
        except BaseException:
            writer._executor.shutdown(wait=False)
            raise
        return writer

    def _open_newest(self, start_lsn: int | None) -> None:
        segments = fmt.list_segments(self.directory)
        self.size_bytes = sum(p.stat().st_size for _, p in segments)
        if segments:
            base, path = segments[-1]
            size = path.stat().st_size
            end = base + size - fmt.SEGMENT_HEADER_SIZE
            if size < fmt.SEGMENT_HEADER_SIZE:
                raise ValueError(f"{path}: segment header cut short; run recovery first")
            if start_lsn is None or start_lsn == end:
                f = path.open("r+b", buffering=0)
                f.seek(0, os.SEEK_END)
                self._file, self._base = f, base
                self.end_lsn = self.durable_lsn = end
                return
            if start_lsn < end:
                raise ValueError(f"log ends at LSN {end} ({path}), not at start_lsn "
                                 f"{start_lsn}: run recovery (cut the torn tail) first")
            log.warning("log ends at LSN %d but the snapshot covers up to %d: deleting %d "
                        "segment(s) it covers and starting a new one", end, start_lsn,
                        len(segments))
            for _, p in segments:
                p.unlink()
            self.size_bytes = 0
            self._sync_directory()
        lsn = start_lsn or 0
        self._new_segment(lsn)
        self.end_lsn = self.durable_lsn = lsn

    # ------------------------------------------------------------------ appending
    def append(self, rtype: int, payload: bytes) -> int:
        """Write one record to the OS; return the LSN just past it. Not yet durable:
        `await sync_to(lsn)` before acknowledging."""
        self._check_usable()
        if not 0 <= rtype <= 255:
            raise ValueError(f"record type {rtype} does not fit in a byte")
        if len(payload) > fmt.MAX_PAYLOAD:
            raise LogWriteError(f"record of {len(payload)} bytes exceeds the "
                                f"{fmt.MAX_PAYLOAD}-byte limit")
        data = _frame(rtype, payload)
        if self.end_lsn - self._base >= self.segment_bytes:
            self.rotate()
        f = self._file
        assert f is not None
        start = f.tell()
        try:
            view = memoryview(data)
            while view:
                written = f.write(view)
                if not written:
                    raise OSError("write() returned 0 bytes")
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

    def _check_usable(self) -> None:
        if self.failed:
            raise LogFailedError(self.failure or "log failed")
        if self._closed:
            raise LogFailedError("log is closed")

    def rotate(self) -> None:
        """Fsync and retire the active segment; start a new one at `end_lsn`. A no-op when
        the active segment holds no frames. Blocks on one fsync."""
        self._check_usable()
        if self.end_lsn == self._base:
            return
        old = self._file
        assert old is not None
        try:
            self._fsync(old.fileno())
        except OSError as exc:
            self._fail(f"fsync failed: {exc}")
            raise LogFailedError(self.failure) from exc
        self.durable_lsn = max(self.durable_lsn, self.end_lsn)
        self._new_segment(self.end_lsn)
        self._retired.append(old)  # an fsync on the worker thread may still hold its fd
        if self._inflight is None:
            self._close_retired()

    def _new_segment(self, base: int) -> None:
        """Create, fsync and publish (directory fsync) an empty segment at `base`."""
        path = self.directory / fmt.SEGMENT_NAME.format(base_lsn=base)
        try:
            f = path.open("xb", buffering=0)
        except OSError as exc:
            raise LogWriteError(exc.errno or 0, f"cannot create {path}: {exc}") from exc
        try:
            f.write(_segment_header(base))
        except OSError as exc:
            f.close()
            path.unlink(missing_ok=True)
            raise LogWriteError(exc.errno or 0, f"cannot write {path}: {exc}") from exc
        try:
            self._fsync(f.fileno())
            self._sync_directory()
        except OSError as exc:
            f.close()
            self._fail(f"fsync of new segment {path} failed: {exc}")
            raise LogFailedError(self.failure) from exc
        self._file, self._base = f, base
        self.size_bytes += fmt.SEGMENT_HEADER_SIZE

    def _sync_directory(self) -> None:
        fsync_path(self.directory, self._fsync)

    def _close_retired(self) -> None:
        for f in self._retired:
            f.close()
        self._retired.clear()

    # ------------------------------------------------------------------ syncing
    async def sync_to(self, lsn: int) -> None:
        """Under `always`, return once everything below `lsn` is fsynced; otherwise at
        once. Raises LogFailedError if the log has failed."""
        self._check_usable()
        if self.sync is not SyncPolicy.ALWAYS:
            return
        while self.durable_lsn < lsn:
            self._check_usable()
            if self._inflight is None:
                self._inflight = asyncio.get_running_loop().create_task(self._sync_now())
            # shield: one cancelled waiter must not cancel the fsync others share
            await asyncio.shield(self._inflight)

    async def _sync_now(self) -> None:
        target = self.end_lsn  # every byte written before the fsync starts
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
        while not self.failed and not self._closed:
            await asyncio.sleep(self.everysec_interval)
            if self.durable_lsn < self.end_lsn and self._inflight is None and not self.failed:
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
        """Delete every segment all of whose records lie below `lsn` (i.e. the next
        segment starts at or below `lsn`); never the active one. Returns the count."""
        segments = fmt.list_segments(self.directory)
        removed = 0
        for (base, path), (next_base, _) in itertools.pairwise(segments):
            if next_base <= lsn and base != self._base:
                self.size_bytes -= path.stat().st_size
                path.unlink()
                removed += 1
        if removed:
            self._sync_directory()
        return removed

    async def close(self) -> None:
        """Final fsync (unless failed or `off`) and close. Idempotent."""
        if self._closed:
            return
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
        if self._inflight is not None:
            with contextlib.suppress(LogFailedError):
                await asyncio.shield(self._inflight)
        self._closed = True
        if self._file is not None:
            if not self.failed and self.sync is not SyncPolicy.OFF:
                try:
                    self._fsync(self._file.fileno())
                    self.durable_lsn = self.end_lsn
                except OSError as exc:
                    self._fail(f"fsync at close failed: {exc}")
            self._file.close()
            self._file = None
        self._close_retired()
        self._executor.shutdown(wait=False)
