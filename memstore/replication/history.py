"""Which log history a data directory holds: DATA/HISTORY (Redis's replication id).

A replica resumes from a position in its primary's log, and a position only means
something within one history: the sequence of records a log has held since it began. So
every shard with a data directory names its history in DATA/HISTORY, one JSON object:

    {"history": "8c1f…"}   this log is a prefix of history 8c1f… (a primary makes the id
                           once; a replica takes its primary's with a full resync)
    {"history": null}      a full resync was under way: the directory holds no usable
                           history; a replica empties it and resyncs, a primary refuses it

A replica resyncs partially (from its own log's end) only when its history is the
primary's and the primary still holds that position; otherwise it takes a full resync.

A primary keeps its id across restarts only under `--sync always`: there, every record it
ever streamed was durable, so its log after a restart still holds all of them. Under
`everysec` or `off` a crash can lose a tail that a replica already holds, and the primary
would then write different records at the same positions, so each start makes a new id
and replicas take a full resync (docs/replication.md).

The file is replaced atomically (write, fsync, rename, fsync the directory).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from memstore.storage.fsutil import fsync_path

log = logging.getLogger("memstore.replication")

FILE = "HISTORY"


class HistoryError(RuntimeError):
    """The data directory cannot serve in the role asked for (the message says why)."""


def read(data: Path) -> tuple[bool, str | None]:
    """(whether DATA/HISTORY exists, the history id it names or None)."""
    try:
        text = (data / FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return False, None
    try:
        value = json.loads(text)["history"]
        if value is not None and not isinstance(value, str):
            raise TypeError("not a string")
    except (ValueError, KeyError, TypeError) as exc:
        raise HistoryError(f"{data / FILE} is damaged ({exc}); a replica's directory can "
                           "be emptied and resynced") from None
    return True, value


def write(data: Path, history: str | None) -> None:
    data.mkdir(parents=True, exist_ok=True)
    tmp = data / f"{FILE}.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        json.dump({"history": history}, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, data / FILE)
    fsync_path(data)


def new_id() -> str:
    return uuid.uuid4().hex


def for_primary(data: Path, keep: bool) -> str:
    """The history a primary's log belongs to: the directory's, or a new one when it has
    none or `keep` is False (its sync policy may lose what replicas hold)."""
    exists, history = read(data)
    if exists and history is None:
        raise HistoryError(f"{data} holds an interrupted full resync of a replica, not a "
                           "shard's state: start it as a replica again (--replica-of) or "
                           "give an empty directory")
    if history is None or not keep:
        history = new_id()
        write(data, history)
    return history


def for_replica(data: Path) -> str | None:
    """Prepare a replica's directory before it opens; the history its log holds (None: it
    has none and takes a full resync). An interrupted full resync is emptied here."""
    exists, history = read(data)
    if exists and history is None:
        log.warning("%s: a full resync was interrupted; emptying the log and snapshots "
                    "to start it again", data)
        for sub in ("log", "snapshots"):
            shutil.rmtree(data / sub, ignore_errors=True)
        return None
    if not exists and any((data / sub).is_dir() and any((data / sub).iterdir())
                          for sub in ("log", "snapshots")):
        raise HistoryError(f"{data} holds a shard's data but no {FILE}: it was not "
                           "written by a replica or a primary that knows replication. "
                           "Give a replica an empty directory")
    return history
