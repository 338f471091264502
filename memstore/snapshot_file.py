"""Snapshot files: a checksummed container of named sections, written atomically.

Layout of DATA_DIR/snapshots/snap-<LSN, 20 digits>.snap (little-endian):

    header   magic b"MSSNAP\\x00\\x01" (8) | version u16 | lsn u64 | created µs u64 | crc u32
    section  name_len u32 | name | payload_len u64 | crc u32 of (name + payload) | payload
    ...      (a name may repeat: the engine writes many "profiles" chunks)
    footer   0xFFFFFFFF u32 | section count u64 | crc u32 over every section crc in order

`lsn` is the log position the snapshot covers: replay starts there. Writing goes to
snap-<LSN>.tmp, is flushed and fsynced, renamed, and the directory fsynced; then CURRENT (a
one-line text file naming the snapshot) is replaced the same way (Redis's rdbSave, LevelDB's
SetCurrentFile). Loading verifies the whole file first and falls back to the next older
snapshot when the newest is missing or damaged; .tmp files are never loaded.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Self

log = logging.getLogger("memstore.snapshot")

MAGIC = b"MSSNAP\x00\x01"
VERSION = 1
HEADER = struct.Struct("<8sHQQ")
HEADER_SIZE = HEADER.size + 4
END_MARK = 0xFFFF_FFFF
MAX_SECTION = 1 << 31
CURRENT = "CURRENT"


class SnapshotError(Exception):
    pass


def snapshot_name(lsn: int) -> str:
    return f"snap-{lsn:020d}.snap"


def _lsn_of(path: Path) -> int | None:
    stem = path.name
    if stem.startswith("snap-") and stem.endswith(".snap") and stem[5:25].isdigit():
        return int(stem[5:25])
    return None


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotWriter:
    def __init__(self, directory: Path, lsn: int, fsync: Callable[[int], None]) -> None:
        self.directory = directory
        self.lsn = lsn
        self._fsync = fsync
        self.tmp = directory / f"snap-{lsn:020d}.tmp"
        self._file: BinaryIO | None = self.tmp.open("wb")
        head = HEADER.pack(MAGIC, VERSION, lsn, time.time_ns() // 1000)
        self._file.write(head + zlib.crc32(head).to_bytes(4, "little"))
        self._crcs = 0
        self._count = 0

    @classmethod
    def create(cls, directory: Path, lsn: int, fsync: Callable[[int], None] = os.fsync
               ) -> SnapshotWriter:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return cls(directory, lsn, fsync)

    def write(self, name: str, payload: bytes) -> None:
        assert self._file is not None, "snapshot already committed or aborted"
        raw = name.encode()
        crc = zlib.crc32(payload, zlib.crc32(raw))
        self._file.write(struct.pack("<I", len(raw)) + raw + struct.pack("<QI", len(payload),
                                                                        crc))
        self._file.write(payload)
        self._crcs = zlib.crc32(crc.to_bytes(4, "little"), self._crcs)
        self._count += 1

    def commit(self) -> Path:
        f = self._file
        assert f is not None
        f.write(struct.pack("<IQI", END_MARK, self._count, self._crcs))
        f.flush()
        self._fsync(f.fileno())
        f.close()
        self._file = None
        final = self.directory / snapshot_name(self.lsn)
        os.replace(self.tmp, final)
        _sync_dir(self.directory)
        pointer = self.directory / f"{CURRENT}.tmp"
        with pointer.open("w") as p:
            p.write(final.name + "\n")
            p.flush()
            self._fsync(p.fileno())
        os.replace(pointer, self.directory / CURRENT)
        _sync_dir(self.directory)
        return final

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()


def _read_sections(f: BinaryIO, path: Path) -> Iterator[tuple[str, bytes]]:
    """Sections in order; raises SnapshotError on any damage, after the footer checks."""
    head = f.read(HEADER_SIZE)
    if len(head) < HEADER_SIZE:
        raise SnapshotError(f"{path}: header cut short")
    magic, version, _, _ = HEADER.unpack(head[: HEADER.size])
    if magic != MAGIC or zlib.crc32(head[: HEADER.size]) != int.from_bytes(head[-4:], "little"):
        raise SnapshotError(f"{path}: bad header")
    if version != VERSION:
        raise SnapshotError(f"{path}: unknown snapshot version {version}")
    crcs = 0
    count = 0
    while True:
        raw = f.read(4)
        if len(raw) < 4:
            raise SnapshotError(f"{path}: cut short after {count} sections")
        (name_len,) = struct.unpack("<I", raw)
        if name_len == END_MARK:
            tail = f.read(12)
            if len(tail) < 12:
                raise SnapshotError(f"{path}: footer cut short")
            total, crc_all = struct.unpack("<QI", tail)
            if total != count or crc_all != crcs or f.read(1):
                raise SnapshotError(f"{path}: footer does not match the sections")
            return
        if name_len > 1024:
            raise SnapshotError(f"{path}: impossible section name length {name_len}")
        name = f.read(name_len)
        meta = f.read(12)
        if len(name) < name_len or len(meta) < 12:
            raise SnapshotError(f"{path}: section {count} cut short")
        size, crc = struct.unpack("<QI", meta)
        if size > MAX_SECTION:
            raise SnapshotError(f"{path}: impossible section size {size}")
        payload = f.read(size)
        if len(payload) < size or zlib.crc32(payload, zlib.crc32(name)) != crc:
            raise SnapshotError(f"{path}: section {count} damaged")
        crcs = zlib.crc32(crc.to_bytes(4, "little"), crcs)
        count += 1
        yield name.decode(), payload


class SnapshotReader:
    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as f:
            head = f.read(HEADER_SIZE)
            if len(head) < HEADER_SIZE:
                raise SnapshotError(f"{path}: header cut short")
            _, _, self.lsn, self.created_us = HEADER.unpack(head[: HEADER.size])
            f.seek(0)
            for _ in _read_sections(f, path):  # verify everything before anyone uses it
                pass

    def sections(self) -> Iterator[tuple[str, bytes]]:
        with self.path.open("rb") as f:
            yield from _read_sections(f, self.path)


def _candidates(directory: Path) -> list[Path]:
    snaps = sorted((p for p in directory.glob("snap-*.snap") if _lsn_of(p) is not None),
                   key=lambda p: _lsn_of(p) or 0, reverse=True)
    current = directory / CURRENT
    if current.exists():
        named = directory / current.read_text().strip()
        if named in snaps:
            snaps.remove(named)
        snaps.insert(0, named)
    return snaps


def load_newest(directory: Path) -> SnapshotReader | None:
    directory = Path(directory)
    if not directory.exists():
        return None
    for path in _candidates(directory):
        try:
            return SnapshotReader(path)
        except (SnapshotError, OSError) as exc:
            log.warning("snapshot %s unusable (%s); trying an older one", path, exc)
    return None


def prune(directory: Path, keep: int = 1) -> list[Path]:
    """Delete stray .tmp files and all but the newest `keep` snapshots."""
    directory = Path(directory)
    removed = []
    for tmp in directory.glob("*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    snaps = sorted((p for p in directory.glob("snap-*.snap") if _lsn_of(p) is not None),
                   key=lambda p: _lsn_of(p) or 0, reverse=True)
    for old in snaps[keep:]:
        old.unlink()
        removed.append(old)
    if removed:
        _sync_dir(directory)
    return removed
