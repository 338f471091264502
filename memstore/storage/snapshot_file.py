"""Snapshot files: a checksummed container of named sections, written atomically.

Layout of DATA_DIR/snapshots/snap-<LSN, 20 digits>.snap (little-endian; docs/log-format.md):

    header   magic b"MSSNAP\\x00\\x01" (8) | version u16 | lsn u64 | created µs u64
             | crc u32 of the 26 bytes before it                          (30 bytes)
    section  name_len u32 (<= MAX_NAME) | name utf-8 | payload_len u64 (<= MAX_SECTION)
             | crc u32 = crc32(name + payload) | payload
    ...      (a name may repeat: the engine writes many "profiles" chunks)
    footer   END_MARK u32 = 0xFFFFFFFF | section count u64
             | crc u32 = crc32 over the 4-byte little-endian crc of every section, in order
             and nothing after it.

`lsn` is the log position the snapshot covers: replay starts there. Invariants: a .snap
file is complete (written to snap-<LSN>.tmp, flushed, fsynced, renamed, directory
fsynced); CURRENT (one line: the file name of the newest committed snapshot) is replaced
the same way after it (Redis's rdbSave, LevelDB's SetCurrentFile); .tmp files are never
loaded. Loading verifies the whole file first and falls back to the next older snapshot.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Self

from memstore.storage.fsutil import Fsync, fsync_path

log = logging.getLogger("memstore.snapshot")

MAGIC = b"MSSNAP\x00\x01"
VERSION = 1
HEADER = struct.Struct("<8sHQQ")  # magic, version, lsn, created µs; then u32 crc
CRC = struct.Struct("<I")
HEADER_SIZE = HEADER.size + CRC.size  # 30
NAME_LEN = struct.Struct("<I")
SECTION_META = struct.Struct("<QI")  # payload length, crc
FOOTER_REST = struct.Struct("<QI")  # after END_MARK: section count, crc of crcs
END_MARK = 0xFFFF_FFFF
MAX_NAME = 1024
READ_AHEAD = 4  # sections start-up's reading thread may hold ready (~2 MB each)
MAX_SECTION = 1 << 31
CURRENT = "CURRENT"
SNAPSHOT_NAME = "snap-{lsn:020d}.snap"
TMP_NAME = "snap-{lsn:020d}.tmp"
_SNAP_RE = re.compile(r"^snap-([0-9]{20})\.snap$")
_TMP_RE = re.compile(r"^snap-([0-9]{20})\.tmp$")



class SnapshotError(Exception):
    """A snapshot file is damaged or cut short; the message names the file."""


def snapshot_name(lsn: int) -> str:
    return SNAPSHOT_NAME.format(lsn=lsn)


def _lsn_of(path: Path) -> int | None:
    m = _SNAP_RE.match(path.name)
    return int(m.group(1)) if m else None


class SnapshotWriter:
    """Streams sections to snap-<lsn>.tmp; `commit` publishes it. Use as a context manager
    (aborts on exception) or call `abort`."""

    def __init__(self, directory: Path, lsn: int, fsync: Fsync) -> None:
        self.directory = directory
        self.lsn = lsn
        self._fsync = fsync
        self.tmp = directory / TMP_NAME.format(lsn=lsn)
        self._file: BinaryIO | None = self.tmp.open("wb")
        head = HEADER.pack(MAGIC, VERSION, lsn, time.time_ns() // 1000)
        self._file.write(head + CRC.pack(zlib.crc32(head)))
        self._crcs = 0
        self._count = 0

    @classmethod
    def create(cls, directory: Path | str, lsn: int, fsync: Fsync = os.fsync
               ) -> SnapshotWriter:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return cls(directory, lsn, fsync)

    def write(self, name: str, payload: bytes) -> None:
        """Append one section; nothing is held in memory beyond the OS buffers."""
        f = self._file
        if f is None:
            raise ValueError("snapshot already committed or aborted")
        raw = name.encode()
        if len(raw) > MAX_NAME:
            raise ValueError(f"section name longer than {MAX_NAME} bytes")
        if len(payload) > MAX_SECTION:
            raise ValueError(f"section of {len(payload)} bytes exceeds {MAX_SECTION}")
        crc = zlib.crc32(payload, zlib.crc32(raw))
        f.write(NAME_LEN.pack(len(raw)) + raw + SECTION_META.pack(len(payload), crc))
        f.write(payload)
        self._crcs = zlib.crc32(CRC.pack(crc), self._crcs)
        self._count += 1

    def commit(self) -> Path:
        """Footer, flush, fsync, rename to snap-<lsn>.snap, fsync the directory, then
        point CURRENT at it the same way. Returns the snapshot's path."""
        f = self._file
        if f is None:
            raise ValueError("snapshot already committed or aborted")
        try:
            f.write(NAME_LEN.pack(END_MARK) + FOOTER_REST.pack(self._count, self._crcs))
            f.flush()
            self._fsync(f.fileno())
        finally:
            f.close()
            self._file = None
        return _publish(self.tmp, self.directory / snapshot_name(self.lsn), self._fsync)

    def abort(self) -> None:
        """Drop the temporary file (safe to call after commit or twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()


def _publish(tmp: Path, final: Path, fsync: Fsync) -> Path:
    """Rename a complete, fsynced `tmp` to `final`, then point CURRENT at it; each step
    made durable with a directory fsync."""
    directory = final.parent
    os.replace(tmp, final)
    fsync_path(directory, fsync)
    pointer = directory / f"{CURRENT}.tmp"
    with pointer.open("w") as p:
        p.write(final.name + "\n")
        p.flush()
        fsync(p.fileno())
    os.replace(pointer, directory / CURRENT)
    fsync_path(directory, fsync)
    return final


def receiving(directory: Path | str, lsn: int) -> Path:
    """Where a snapshot made elsewhere (a replica's full resync) is written as it arrives:
    snap-<lsn>.tmp, never loaded, removed by `prune` like any other .tmp."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return directory / TMP_NAME.format(lsn=lsn)


def install(directory: Path | str, lsn: int, fsync: Fsync = os.fsync) -> Path:
    """Publish the snapshot received into `receiving(directory, lsn)`: fsync it, verify it
    whole and covering `lsn` (SnapshotError otherwise, and the .tmp is removed), then
    rename it and point CURRENT at it as `SnapshotWriter.commit` does."""
    tmp = receiving(directory, lsn)
    try:
        with tmp.open("rb+") as f:
            fsync(f.fileno())
        reader = SnapshotReader(tmp)
        if reader.lsn != lsn:
            raise SnapshotError(f"{tmp}: covers LSN {reader.lsn}, expected {lsn}")
        return _publish(tmp, Path(directory) / snapshot_name(lsn), fsync)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_exact(f: BinaryIO, n: int, path: Path, what: str) -> bytes:
    data = f.read(n)
    if len(data) < n:
        raise SnapshotError(f"{path}: {what} cut short")
    return data


def _check_header(head: bytes, path: Path) -> None:
    magic, version, _, _ = HEADER.unpack_from(head)
    if magic != MAGIC or zlib.crc32(head[: HEADER.size]) != CRC.unpack_from(head,
                                                                            HEADER.size)[0]:
        raise SnapshotError(f"{path}: bad header (magic or checksum)")
    if version != VERSION:
        raise SnapshotError(f"{path}: unknown snapshot version {version}")


def _read_sections(f: BinaryIO, path: Path) -> Iterator[tuple[str, bytes]]:
    """Sections in order, streaming, each checked before it is handed out; SnapshotError on
    any damage (the footer is checked after the last section, so only a complete
    iteration proves the file good)."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    _check_header(_read_exact(f, HEADER_SIZE, path, "header"), path)
    crcs = 0
    count = 0
    while True:
        (name_len,) = NAME_LEN.unpack(_read_exact(f, NAME_LEN.size, path,
                                                  f"file after {count} sections"))
        if name_len == END_MARK:
            total, crc_all = FOOTER_REST.unpack(_read_exact(f, FOOTER_REST.size, path,
                                                            "footer"))
            if total != count or crc_all != crcs or f.read(1):
                raise SnapshotError(f"{path}: footer does not match the {count} sections")
            return
        if name_len > MAX_NAME:
            raise SnapshotError(f"{path}: impossible section name length {name_len}")
        name = _read_exact(f, name_len, path, f"section {count}")
        length, crc = SECTION_META.unpack(_read_exact(f, SECTION_META.size, path,
                                                      f"section {count}"))
        if length > MAX_SECTION or length > size - f.tell():  # never a huge allocation
            raise SnapshotError(f"{path}: section {count} cut short or impossible "
                                f"length {length}")
        payload = _read_exact(f, length, path, f"section {count}")
        if zlib.crc32(payload, zlib.crc32(name)) != crc:
            raise SnapshotError(f"{path}: section {count} checksum mismatch")
        crcs = zlib.crc32(CRC.pack(crc), crcs)
        count += 1
        try:
            text = name.decode()
        except UnicodeDecodeError as exc:
            raise SnapshotError(f"{path}: section {count} name is not UTF-8") from exc
        yield text, payload


class SnapshotReader:
    """A snapshot file. Construction checks its header and, with `verify` (the default),
    reads the whole file once to check every section (SnapshotError or OSError if
    anything is wrong); `sections()` reads it, streaming, checking each section before
    handing it out and the footer after the last. A reader not verified first (start-up:
    one pass over the file, not two) may raise SnapshotError after handing out sections:
    whoever read them throws them away (`read_newest`)."""

    def __init__(self, path: Path | str, verify: bool = True) -> None:
        self.path = Path(path)
        with self.path.open("rb") as f:
            head = _read_exact(f, HEADER_SIZE, self.path, "header")
        _check_header(head, self.path)
        _, _, self.lsn, self.created_us = HEADER.unpack_from(head)
        self.section_count: int | None = None  # once verified
        if verify:
            self.verify()

    def verify(self) -> None:
        """Read the whole file, checking everything (SnapshotError or OSError)."""
        with self.path.open("rb") as f:
            self.section_count = sum(1 for _ in _read_sections(f, self.path))

    def sections(self, ahead: int = 0) -> Iterator[tuple[str, bytes]]:
        """The sections in order. `ahead`: up to this many are read and checked by a thread
        ahead of the caller (start-up: the file's reading and checksums, which release the
        GIL, overlap the engine's loading on another core)."""
        if ahead:
            yield from _read_ahead(self.path, ahead)
            return
        with self.path.open("rb") as f:
            yield from _read_sections(f, self.path)


_END = object()  # _read_ahead's end of the file


def _read_ahead(path: Path, ahead: int) -> Iterator[tuple[str, bytes]]:
    handoff: queue.Queue[Any] = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def hand(item: Any) -> bool:
        """Put `item` in the queue unless the reader stopped; whether it was put."""
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            with path.open("rb") as f:
                for section in _read_sections(f, path):
                    if not hand(section):
                        return
            hand(_END)
        except BaseException as exc:  # noqa: BLE001 -- raised in the reader instead
            hand(exc)

    thread = threading.Thread(target=produce, name="snapshot-read-ahead", daemon=True)
    thread.start()
    try:
        while (item := handoff.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _candidates(directory: Path) -> list[Path]:
    """CURRENT's snapshot first, then every snap-*.snap from the newest LSN down."""
    snaps = sorted((p for p in directory.iterdir() if _lsn_of(p) is not None),
                   key=lambda p: _lsn_of(p) or 0, reverse=True)
    current = directory / CURRENT
    try:
        named = current.read_text().strip()
    except FileNotFoundError:
        return snaps
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("snapshot pointer %s unreadable (%s); using the newest snapshot file",
                    current, exc)
        return snaps
    if not _SNAP_RE.match(named):
        log.warning("snapshot pointer %s names %r, not a snapshot; using the newest "
                    "snapshot file", current, named)
        return snaps
    path = directory / named
    if path in snaps:
        snaps.remove(path)
    return [path, *snaps]


def _newest_first(directory: Path) -> Iterator[SnapshotReader]:
    """Readers of the snapshots start-up may use, in the order it tries them (`_candidates`),
    headers checked but not verified; a bad header is logged and skipped."""
    if not directory.is_dir():
        return
    for path in _candidates(directory):
        try:
            yield SnapshotReader(path, verify=False)
        except (SnapshotError, OSError) as exc:
            log.warning("snapshot %s unusable (%s); trying an older one", path, exc)


def load_newest(directory: Path | str) -> SnapshotReader | None:
    """The snapshot CURRENT names if it is whole, else the newest older good one (each
    skip logged as a warning with its reason); None if there is no good snapshot."""
    for reader in _newest_first(Path(directory)):
        try:
            reader.verify()
            return reader
        except (SnapshotError, OSError) as exc:
            log.warning("snapshot %s unusable (%s); trying an older one", reader.path, exc)
    return None


def read_newest(directory: Path | str,
                read: Callable[[Iterator[tuple[str, bytes]]], None]) -> SnapshotReader | None:
    """Start-up's `load_newest` in one pass over the file, not two: `read(sections)` takes
    the sections of each snapshot in `load_newest`'s order until one reads to its end (its
    footer checked); one found damaged part-way is logged and skipped like a bad one, so
    `read` must start from nothing each time. The snapshot read, or None."""
    for reader in _newest_first(Path(directory)):
        try:
            sections = reader.sections(ahead=READ_AHEAD)
            read(sections)
            for _ in sections:  # to the footer, if `read` stopped short
                pass
            return reader
        except (SnapshotError, OSError) as exc:
            log.warning("snapshot %s unusable (%s); trying an older one", reader.path, exc)
    return None


def prune(directory: Path | str, keep: int = 1, fsync: Fsync = os.fsync) -> list[Path]:
    """Keep the newest `keep` good snapshots (each verified, newest first) and delete every
    snapshot older than the oldest kept one, and every .tmp at or below the newest kept
    LSN (a higher one may be a snapshot being written). Damaged snapshots newer than the
    kept ones are left for inspection. Returns the deleted paths."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    directory = Path(directory)
    if not directory.is_dir():
        return []
    snaps = sorted((p for p in directory.iterdir() if _lsn_of(p) is not None),
                   key=lambda p: _lsn_of(p) or 0, reverse=True)
    kept: list[Path] = []
    for i, path in enumerate(snaps):
        try:
            SnapshotReader(path)
        except (SnapshotError, OSError) as exc:
            log.warning("prune: snapshot %s is damaged (%s)", path, exc)
            continue
        kept.append(path)
        if len(kept) == keep:
            older = snaps[i + 1:]
            break
    else:
        return []  # fewer than `keep` good snapshots: delete nothing
    removed: list[Path] = []
    for old in older:
        old.unlink()
        removed.append(old)
    newest = _lsn_of(kept[0]) or 0
    for p in directory.iterdir():
        m = _TMP_RE.match(p.name)
        if m and int(m.group(1)) <= newest:
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        fsync_path(directory, fsync)
    return removed
