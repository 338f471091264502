"""A shard's change streams: WatchSegments and WatchChanges, read from its log.

Every change reaches the log as one RECORD_CHANGE (RECORD_COLUMNS: the same, its images
as columns; memstore/shard.py): its time, its after-images, what changed in each updated
profile, and the saved segments' membership deltas. A stream is a cursor over the log (memstore/storage/wal_tail.py) that turns those
records into events, at the watcher's own pace: a slow watcher costs the shard one open
file and one batch, and nothing when it is idle. Events are only read up to what is
acknowledged (Shard.readable_lsn): what the shard's own log holds as acknowledged (per
--sync), and under --replication sync only what a replica has confirmed, so a watcher
is sent no change a failover may lose (an initial listing reads memory, which may hold a
write no replica confirmed yet). A slot move's copies and drops are `quiet`: membership
changes, nobody acts, no event (a segment's creation and deletion are news: ENTER and
LEAVE of its members).

Positions. A shard's position is (lsn, i): every event up to event i of the record at
`lsn` was delivered (i = -1: none of that record). A record's events are numbered by what
they come from, whatever the stream's filter keeps: a segment event by its place among
the watched segments' events, a profile change by its image's place in the record. A
query filter reads profiles as they are when the stream reads the record, so its answer
may differ on a resume; the numbers do not, and resuming with the same request gives the
rest. A position travels as an opaque token naming the shard: base64url of msgpack
{"v": 1, "p": {shard name: [lsn, i, history]}}; a router's token holds every shard's
(shards/watch.py). Restarts keep positions valid (LSNs are positions in the log file).
`history` is the id of the log the position is in (memstore/replication/history.py; absent
in tokens from before it was kept): a position of another log, or past where a promoted
replica's log stopped following the old primary's, is refused (OUT_OF_RANGE) rather than
read in a log whose records at that offset are other changes.

Initial sync (list-then-watch): the current members (or profiles) are taken, with no await
between, together with the log's end; then the log from that end is read, so nothing is
lost or sent twice at the seam.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from google.protobuf.timestamp_pb2 import Timestamp
from pyroaring import BitMap

from memstore import pbvalues
from memstore.engine.blob import decode
from memstore.engine.core import Engine
from memstore.engine.schema import Kind
from memstore.engine.segments import decode_deltas
from memstore.engine.values import from_stored
from memstore.errors import FailedPrecondition, InvalidArgument, MemstoreError, NotFound
from memstore.query import Node
from memstore.query.evaluate import evaluate
from memstore.shard import Shard, decode_change, images_of, named_in
from memstore.storage import wal_format
from memstore.storage.wal_reader import LogCorruptError, Record
from memstore.storage.wal_tail import LogGone, LogTail
from memstore.v1 import memstore_pb2 as pb

BATCH = 1000  # events a message
HEARTBEAT = 0.05  # seconds between messages to an idle router (its watermark)
CLIENT_HEARTBEAT = 1.0  # seconds between messages to any other idle watcher
TOKEN_VERSION = 1


class OutOfRange(MemstoreError):
    """A position older than the log keeps (OUT_OF_RANGE: start again with initial)."""


class FellBehind(MemstoreError):
    """A running stream whose next record the log no longer keeps (RESOURCE_EXHAUSTED)."""


# ---------------------------------------------------------------------- positions

# A shard's position: (log position, index of the last event delivered of the record
# there or -1, id of the log's history or "" when unknown).
Position = tuple[int, int, str]


def encode_token(positions: Mapping[str, Position]) -> str:
    raw = msgpack.packb({"v": TOKEN_VERSION, "p": {
        k: [lsn, index, history] if history else [lsn, index]
        for k, (lsn, index, history) in positions.items()}})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, where: str = "from_position") -> dict[str, Position]:
    """The shard positions of a token; InvalidArgument for anything else."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = msgpack.unpackb(raw)
        if body.get("v") != TOKEN_VERSION:
            raise ValueError("unknown version")
        out = {}
        for name, (lsn, index, *history) in body["p"].items():
            if not (isinstance(name, str) and type(lsn) is int and type(index) is int
                    and lsn >= 0 and index >= -1 and len(history) <= 1
                    and all(isinstance(h, str) and h for h in history)):
                raise ValueError("bad entry")
            out[name] = (lsn, index, history[0] if history else "")
        return out
    except (ValueError, TypeError, KeyError, AttributeError, msgpack.UnpackException):
        shown = token[:40] + ("…" if len(token) > 40 else "")
        raise InvalidArgument(f"{where}: {shown!r} is not a position this cluster "
                              "issued") from None


def history_of(shard: Shard) -> str:
    """The id of the history `shard`'s log holds now ("": none known, a shard with no
    replication roles)."""
    found = shard.log_history()
    return (found.history or "") if found is not None else ""


def shard_token(shard: Shard, lsn: int, index: int = -1) -> str:
    """The token of `shard`'s position (lsn, index), in the log it holds now."""
    return encode_token({shard.config.name: (lsn, index, history_of(shard))})


# ---------------------------------------------------------------------- reading

@dataclass(slots=True)
class Event:
    """One event of a record, before it becomes a message."""

    message: Any  # pb.SegmentEvent or pb.ProfileChange, position still unset


def _at(micros: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMicroseconds(micros)
    return stamp


def _names(record: dict[str, Any], engine: Engine) -> dict[int, str]:
    """dense id -> primary id for the profiles a record names."""
    names = named_in(record)
    for dense, pid in record.get("pids", ()):
        names.setdefault(dense, pid)
    return names


def segment_events(record: dict[str, Any], watched: set[str] | None, engine: Engine
                   ) -> list[tuple[int, Any]]:
    """The ENTER and LEAVE events of a record, for the watched segments (None: all),
    numbered."""
    if record.get("quiet") or "segments" not in record:
        return []
    names = _names(record, engine)
    at = _at(record["at"])
    out = []
    for name, (enter, leave) in decode_deltas(record["segments"]).items():
        if watched is not None and name not in watched:
            continue
        for change, ids in ((pb.SegmentEvent.ENTER, enter), (pb.SegmentEvent.LEAVE, leave)):
            for dense in ids:
                pid = names.get(dense) or (engine.pids[dense] if dense < len(engine.pids)
                                           else None)
                if pid is not None:
                    out.append(pb.SegmentEvent(segment=name, id=pid, change=change, at=at))
    return list(enumerate(out))


@dataclass
class ChangeFilter:
    node: Node | None  # only profiles matching it, as they are when the record is read
    attributes: frozenset[str]  # only these attributes (empty: all)


def change_events(record: dict[str, Any], flt: ChangeFilter, engine: Engine
                  ) -> list[tuple[int, Any]]:
    """The profile changes of a record (deletions and merges whatever the query), each
    numbered by its image's place in the record."""
    if record.get("quiet"):
        return []
    images = images_of(record)
    if not images:
        return []
    at = _at(record["at"])
    by_id = engine.schema.by_id
    diffs = record.get("diffs", {})
    forwards = {key: value for table, key, value in record.get("notes", ())
                if table == "forwards" and value is not None}
    survivors: dict[str, str] = {}
    for _, pid, blob, _ in images:
        if blob is not None:
            for merged in decode(blob)[3]:
                survivors[merged] = pid
    matching: BitMap | None = None
    if flt.node is not None:
        alive = BitMap(d for d, _, blob, _ in images if blob is not None)
        matching = evaluate(engine, flt.node, unknown_is_empty=True,
                            within=alive & engine.live) if alive else BitMap()
    out: list[tuple[int, Any]] = []
    for number, (dense, pid, blob, _) in enumerate(images):
        if blob is None:
            merged_into = survivors.get(pid) or forwards.get(pid, "")
            out.append((number, pb.ProfileChange(id=pid, deleted=not merged_into,
                                                 merged_into=merged_into, at=at)))
            continue
        if matching is not None and dense not in matching:
            continue
        version, attrs, _, _ = decode(blob)
        diff = diffs.get(dense)
        set_ids = attrs.keys() if diff is None else diff[0]
        unset_ids = () if diff is None else diff[1]
        change = pb.ProfileChange(id=pid, version=version, created=diff is None, at=at)
        shown = False  # an attribute a watcher may see changed (day records are not)
        for aid in set_ids:
            if aid < len(by_id) and aid in attrs and by_id[aid].kind is not Kind.EVENT_DAYS:
                shown = True
                spec = by_id[aid]
                if not flt.attributes or spec.name in flt.attributes:
                    change.set[spec.name].CopyFrom(pbvalues.to_pb(
                        from_stored(spec.kind, attrs[aid])))
        for aid in unset_ids:
            if aid < len(by_id) and by_id[aid].kind is not Kind.EVENT_DAYS:
                shown = True
                if not flt.attributes or by_id[aid].name in flt.attributes:
                    change.unset.append(by_id[aid].name)
        if diff is not None and (flt.attributes or (diff[0] or diff[1]) and not shown) \
                and not change.set and not change.unset:
            continue  # nothing the watcher asked about (or may see) changed
        out.append((number, change))
    return out


def shown_attributes(attrs: dict[int, Any], engine: Engine, only: frozenset[str]
                     ) -> dict[str, pb.Value]:
    """A profile's attributes as a watcher sees them: values by name, `only` those
    named (empty: all), day records left out (read through did(...), not values)."""
    by_id = engine.schema.by_id
    out = {}
    for aid, value in attrs.items():
        spec = by_id[aid]
        if spec.kind is not Kind.EVENT_DAYS and (not only or spec.name in only):
            out[spec.name] = pbvalues.to_pb(from_stored(spec.kind, value))
    return out


# ---------------------------------------------------------------------- streaming

class Stream:
    """One watcher's cursor over a shard's log."""

    def __init__(self, shard: Shard, name: str, start: Position,
                 heartbeat: float = HEARTBEAT) -> None:
        if shard.log is None or shard.config.data_dir is None:
            raise FailedPrecondition("change streams read the log: this shard keeps none "
                                     "(--in-memory)")
        lsn, skip, issued = start
        _check_history(shard, name, lsn, skip, issued)
        if lsn < shard.oldest_lsn:
            raise OutOfRange(f"position {lsn} is older than this shard keeps "
                             f"({shard.oldest_lsn}: --changes-retention, or an erasure's "
                             "snapshot); start again with initial")
        if lsn < shard.erased_lsn:
            raise OutOfRange(f"position {lsn} is from before a person's erasure (at "
                             f"{shard.erased_lsn}): erased data is not replayed; start "
                             "again with initial")
        if lsn > shard.log.end_lsn:
            raise InvalidArgument(f"position {lsn} is beyond this shard's log "
                                  f"({shard.log.end_lsn}): not a position of {name}")
        self.shard = shard
        self.name = name
        self.tail = LogTail(Path(shard.config.data_dir) / "log", lsn)
        self.start = lsn
        self.skip = (lsn, skip)
        self.last_at = 0
        self.heartbeat = heartbeat

    def token(self, lsn: int, index: int) -> str:
        return shard_token(self.shard, lsn, index)

    async def records(self) -> AsyncIterator[list[Record]]:
        """Batches of records as they become readable; an empty batch after `heartbeat`
        seconds with none."""
        shard = self.shard
        try:
            while True:
                limit = shard.readable_lsn
                if self.tail.lsn < limit:
                    try:
                        batch = await asyncio.to_thread(self.tail.read, limit)
                    except LogGone as exc:
                        raise FellBehind(f"this stream fell behind what the log keeps "
                                         f"({exc}); start again with initial") from None
                    except LogCorruptError:
                        if self.tail.lsn != self.start:
                            raise  # damage met on the way: the server's to report
                        # Nothing read from the position: no record starts there (a frame
                        # read from inside one fails its length or checksum).
                        raise InvalidArgument(
                            f"position {self.start} is not where a change of {self.name} "
                            "starts: a position of another shard or of an earlier data "
                            "directory (or the log is damaged there: memstore check)"
                        ) from None
                    yield batch
                    continue
                await shard.wait_advanced(self.tail.lsn, self.heartbeat)
                if shard.readable_lsn <= self.tail.lsn:
                    yield []
        finally:
            self.tail.close()

    def heartbeat_at(self) -> int:
        """The time before which every change of this shard has been read: now when
        nothing written is waiting to become readable."""
        shard = self.shard
        assert shard.log is not None
        if shard.readable_lsn >= shard.log.end_lsn:
            return int(time.time() * 1_000_000)
        return self.last_at

    def numbered(self, record: Record, events: list[tuple[int, Any]]) -> Iterator[Any]:
        """The events of a record (with their numbers) with their positions, skipping
        those a resumed position says were delivered."""
        for n, (i, event) in enumerate(events):
            if (record.lsn_start, i) <= self.skip and record.lsn_start == self.skip[0]:
                continue
            event.position = self.token(record.lsn_end, -1) if n == len(events) - 1 \
                else self.token(record.lsn_start, i)
            yield event


def _check_history(shard: Shard, name: str, lsn: int, index: int, issued: str) -> None:
    """OutOfRange when position (`lsn`, `index`) of history `issued` is not a position of
    the log `shard` holds now: its records there are other changes, or none. A position
    inside a record (index >= 0) of an earlier history needs that whole record, so its
    start before the point where this log continues that history."""
    found = shard.log_history()
    if not issued or found is None or found.history is None or issued == found.history:
        return
    bound = found.bound_of(issued)
    if bound is not None and (lsn < bound or (lsn == bound and index < 0)):
        return
    if bound is not None:
        raise OutOfRange(f"position {lsn} is past where this shard's log continues the one "
                         f"it was read from ({bound}): the changes after that were lost (a "
                         "failover to a replica that had not received them, or a machine "
                         "crash under --sync everysec or off); start again with initial")
    raise OutOfRange(f"position {lsn} is in another log of {name} (history {issued[:12]}; "
                     f"its log now: {found.history[:12]}): another data directory, or a "
                     "full resync; start again with initial")


async def stream(shard: Shard, name: str, start: Position,
                 events_of: Any, response: Any, heartbeat: float = HEARTBEAT
                 ) -> AsyncIterator[Any]:
    """Responses of a stream from `start`: `events_of(record)` gives a record's events,
    `response(events, position, at)` makes a message; one with no events every
    `heartbeat` seconds while idle."""
    cursor = Stream(shard, name, start, heartbeat)
    async for records in cursor.records():
        batch: list[Any] = []
        for record in records:
            if record.rtype not in wal_format.CHANGE_RECORDS:
                continue
            decoded = decode_change(record.payload)
            cursor.last_at = decoded["at"]
            batch.extend(cursor.numbered(record, events_of(decoded)))
            if len(batch) >= BATCH:
                yield response(batch, batch[-1].position, cursor.last_at)
                batch = []
        position = cursor.token(cursor.tail.lsn, -1)
        if batch or not records:
            at = cursor.heartbeat_at() if not records else cursor.last_at
            yield response(batch, position, at)


def start_of(shard: Shard, name: str, token: str) -> Position | None:
    """Where a stream resumes (None: the token does not name this shard). A token that
    does not name it but holds one position in its log's history or the line that
    history continues is its too: a replica's positions carry the replica's name, and a
    promoted replica serves under the shard's."""
    if not token:
        return None
    positions = decode_token(token)
    if name in positions:
        return positions[name]
    found = shard.log_history()
    if found is None or found.history is None:
        return None
    ours = [p for p in positions.values()
            if p[2] and (p[2] == found.history or found.bound_of(p[2]) is not None)]
    return ours[0] if len(ours) == 1 else None


def check_segments(engine: Engine, names: list[str]) -> set[str] | None:
    """The watched segments (None: every one); NOT_FOUND for an unknown one."""
    for name in names:
        if name not in engine.segments:
            raise NotFound(f"segment {name!r} not found")
    return set(names) or None
