"""One owner per data directory: an exclusive lock on DATA_DIR/LOCK.

Two processes appending to one log at their own offsets lose each other's acknowledged
writes, so a shard (and `memstore serve`, on the cluster's directory) takes this lock
before it reads anything, and keeps it until it exits. It is flock(2) on a file that holds
the owner's pid (LevelDB's and etcd's LOCK): the kernel releases it when the process dies,
however it dies, so a crash never leaves a stale lock, and the pid in the file is only a
hint for the error message. Forked children (snapshot writers) share the lock and die with
their parent.

`memstore repair` refuses a locked directory; `memstore check` reads it and says it is in
use (`holder`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

LOCK_FILE = "LOCK"
_POLL = 0.1  # seconds between attempts while waiting for a lock
# Even "at once" tries for this long: `memstore check` probes a lock for microseconds, and
# a shard starting in that instant must not take the probe for an owner.
MIN_WAIT = 0.3


class DirectoryLocked(RuntimeError):
    """Another process owns the data directory."""

    def __init__(self, directory: Path, pid: int | None) -> None:
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"data directory {directory} is in use by {holder} (it holds "
                         f"{directory / LOCK_FILE}); stop that process first, or use "
                         "another --data-dir")
        self.directory = directory
        self.pid = pid


class DirLock:
    """An acquired lock; `release()` (or process exit) frees it."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: Path | str, wait: float = 0.0) -> DirLock:
        """Lock `directory` (created if missing); wait up to `wait` seconds for another
        owner to let go, then raise DirectoryLocked naming it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + max(wait, MIN_WAIT)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise DirectoryLocked(directory, _read_pid(fd)) from None
                    time.sleep(_POLL)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(directory, fd)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def holder(directory: Path | str) -> int | None:
    """The pid of the process that owns `directory` now (0 if the file names none), or None
    if nobody does. Takes no lock for longer than the probe."""
    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
