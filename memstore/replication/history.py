"""Which log history a data directory holds: DATA/HISTORY (Redis's replication id).

A replica resumes from a position in its primary's log, and a position only means
something within one history: the sequence of records a log has held since it began. So
every shard with a data directory names its history in DATA/HISTORY, one JSON object:

    {"history": "8c1f…", "role": "primary"}
        this log is history 8c1f…, which this shard made and writes
    {"history": "8c1f…", "role": "replica"}
        this log is a prefix of history 8c1f…, taken from a primary
    {"history": "d07a…", "role": "replica", "previous": "8c1f…", "until": 5120}
        a replica that followed its primary from 8c1f… onto d07a…, which the primary
        continues 8c1f… with, from position 5120 on (a partial resync): positions of
        8c1f… up to 5120 are positions of this log too (change streams read on it)
    {"history": "d07a…", "role": "primary", "previous": "8c1f…", "until": 5120}
        a replica of 8c1f… promoted at position 5120 (its log's end then): its log up to
        5120 is 8c1f…'s, after it its own writes. A replica of 8c1f… at a position up to
        5120 follows it with a partial resync and takes the new id (Redis's PSYNC2
        replid2); one past 5120 holds records the new primary never had: a full resync.
    {"history": "d07a…", …, "shard": "shard-0"}
        a replica promoted by `memstore cluster failover`: it serves as shard-0 from then on
        (change stream positions of the old primary stay valid), whatever its --name
    {"history": null}
        a full resync was under way: no usable history; a replica empties the directory
        and resyncs, a primary refuses it

A primary keeps its id across restarts only under `--sync always`: there, every record it
ever streamed was durable, so its log after a restart still holds all of them. Under
`everysec` or `off` a crash can lose a tail that a replica already holds, and the primary
would then write different records at the same positions, so each start makes a new id
continuing the old one up to where the recovered log ends ("previous", "until"): replicas
at or before it follow on, those past it resync in full (docs/replication.md). The
histories before that, with where each was continued, are kept too ("older": [[id,
until], ...], newest first, at most OLDER of them), so a replica or a change stream that
slept through several such restarts still resumes where its position is still valid.

The file is replaced atomically (write, fsync, rename, fsync the directory).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from memstore.storage.fsutil import fsync_path

log = logging.getLogger("memstore.replication")

FILE = "HISTORY"
OLDER = 16  # histories kept before `previous`


class HistoryError(RuntimeError):
    """The data directory cannot serve in the role asked for (the message says why)."""


@dataclass(frozen=True)
class History:
    history: str | None
    role: str = "primary"
    previous: str | None = None  # the history this one continues, up to `until`
    until: int = 0
    shard: str | None = None  # a promoted replica: the shard name it serves under
    # before `previous`, newest first: (history, the position up to which the next newer
    # history continues it)
    older: tuple[tuple[str, int], ...] = ()
    # Whether the primary writing this history makes a record durable before streaming it
    # (--sync always): only then does its next start find every record it streamed. Read
    # at that start, not the new run's policy alone: a crash under everysec then a start
    # under always must not keep the history past the lost tail.
    synced: bool = True

    def continues(self, history: str, lsn: int) -> bool:
        """Whether position `lsn` of `history` is a position of this history too: its
        own, or an ancestor's at or before every point the line to this one split off."""
        if history == self.history:
            return True
        bound = self.bound_of(history)
        return bound is not None and lsn <= bound

    def bound_of(self, history: str) -> int | None:
        """For an ancestor `history`, the last of its positions this one continues (the
        smallest split point on the line since); None for any other history."""
        bound = self.until
        for ancestor, until in ((self.previous, self.until), *self.older):
            bound = min(bound, until)
            if ancestor == history:
                return bound
        return None

    def continued(self, end_lsn: int, *, new: str | None = None, role: str = "primary",
                  shard: str | None = None, synced: bool = True) -> History:
        """A history `new` (None: a new id) that continues this one up to `end_lsn`,
        keeping the line of its ancestors: a primary's next start under a sync policy
        that may lose a tail, a promotion, or a replica following its primary onto the
        history that primary continues this one with."""
        older = ((self.previous, self.until), *self.older)[:OLDER] \
            if self.previous is not None else ()
        return History(new or new_id(), role, self.history, end_lsn, shard, older, synced)


def read(data: Path) -> History | None:
    """What DATA/HISTORY says; None if there is no such file."""
    try:
        text = (data / FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        fields = json.loads(text)
        found = History(fields["history"], fields.get("role", "primary"),
                        fields.get("previous"), int(fields.get("until", 0)),
                        fields.get("shard"), tuple((str(ancestor), int(until))
                                                   for ancestor, until in fields.get("older", ())),
                        bool(fields.get("synced", True)))
        if not all(v is None or isinstance(v, str) for v in (found.history, found.previous)):
            raise TypeError("an id is not a string")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HistoryError(f"{data / FILE} is damaged ({exc}); a replica's directory can "
                           "be emptied and resynced") from None
    return found


def write(data: Path, history: History) -> None:
    data.mkdir(parents=True, exist_ok=True)
    tmp = data / f"{FILE}.tmp"
    fields = {k: v for k, v in asdict(history).items()
              if k != "synced" and v not in (None, 0, ())}
    if not history.synced:
        fields["synced"] = False
    fields["history"] = history.history
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(fields, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, data / FILE)
    fsync_path(data)


def new_id() -> str:
    return uuid.uuid4().hex


def for_primary(data: Path, keep: bool, end_lsn: int, shard: str | None = None) -> History:
    """The history a primary's log belongs to, `end_lsn` being where its log ends: the
    directory's; a new one when it has none; a new one continuing the old up to `end_lsn`
    when `keep` (this run's --sync always) is False or the last run's was (its policy may
    lose, or have lost, records it streamed, and it writes others at their positions), or
    when the directory was a replica's (a promotion; `shard`: the name it serves under
    from now on)."""
    found = read(data)
    if found is not None and found.history is None:
        raise HistoryError(f"{data} holds an interrupted full resync of a replica, not a "
                           "shard's state: start it as a replica again (--replica-of) or "
                           "give an empty directory")
    if found is not None and found.role == "replica":
        promoted = found.continued(end_lsn, shard=shard, synced=keep)
        log.warning("this directory was a replica's of history %s: serving as a primary of "
                    "the new history %s, which continues it up to position %d",
                    found.history, promoted.history, end_lsn)
        write(data, promoted)
        return promoted
    if found is None:
        made = History(new_id(), synced=keep)
        write(data, made)
        return made
    if not (keep and found.synced):  # the log may have lost a tail it streamed (under
        # the last run's policy) or may lose one (under this run's): what it holds now is
        # as it was, and what it writes from here is a history of its own
        made = found.continued(end_lsn, shard=found.shard, synced=keep)
        write(data, made)
        return made
    return found


def for_replica(data: Path, candidate: bool = False) -> str | None:
    """Prepare a replica's directory before it opens; the history its log holds (None: it
    has none and takes a full resync). An interrupted full resync is emptied here.
    `candidate`: a coordinated member that may be elected primary on this data
    (coordinator.py), so a shard's directory from before replication is not refused."""
    found = read(data)
    if found is not None and found.history is None:
        log.warning("%s: a full resync was interrupted; emptying the log and snapshots "
                    "to start it again", data)
        for sub in ("log", "snapshots"):
            shutil.rmtree(data / sub, ignore_errors=True)
        return None
    holds_data = any((data / sub).is_dir() and any((data / sub).iterdir())
                     for sub in ("log", "snapshots"))
    if found is None and holds_data and not candidate:
        raise HistoryError(f"{data} holds a shard's data but no {FILE}: it was not "
                           "written by a replica or a primary that knows replication. "
                           "Give a replica an empty directory")
    return None if found is None else found.history


def followed_on(data: Path, new: str, at: int) -> History:
    """What a replica's DATA/HISTORY says once it follows, from position `at`, the
    history `new` its primary continues the one it held with (a promotion or a restart of
    the primary): its log up to `at` is the old history's, so positions of that history
    and of its line, up to there, stay positions of this log."""
    found = read(data)
    if found is None or found.history is None:
        return replica_of(new)
    return found.continued(at, new=new, role="replica")


def replica_of(history_id: str | None) -> History:
    """What a replica's DATA/HISTORY says once it follows `history_id` (None: resyncing)."""
    return History(history_id, "replica")
