"""Durable-file helpers shared by the log and the snapshot files: fsync a path (a file or
a directory, so that a create, rename or unlink in it is durable)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

Fsync = Callable[[int], None]


def fsync_path(path: Path, fsync: Fsync = os.fsync) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)
