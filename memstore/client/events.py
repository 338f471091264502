"""Loading events (`Client.load_events`, `Client.track_batch`): event records to packed
TrackBatch requests, and, when a server refuses one, what to send again.

An event record is a dict {"id" or "identifier", "event", "at", "count"}: "identifier" a
(kind, value) pair naming the profile that holds it; "at" an aware datetime, an ISO-8601
string (no offset means UTC) or int microseconds since the Unix epoch, default now;
"count" default 1. A load also takes events already in the form a request carries, tuples
(id or (kind, value), event, int microseconds or None for now, count), as
memstore.client.loader's lines hold them: sent as they are (the server checks every
field). Nothing here talks to a server.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice, repeat
from typing import Any

from memstore.client.refusal import Refusal
from memstore.engine import eventpack
from memstore.pbvalues import datetime_to_micros

# Events a TrackBatch request of a load carries. A shard pays a fixed part per request and
# per event name (a bitmap update per bit slice of each count/first/last range index and
# per day), so larger batches cost less an event: through a router of 2 shards, 20,000
# (10,000 a shard) loaded ~1.7x faster a shard-CPU-second than 5,000. The price: a read
# arriving during a load waits for the shard's batch in hand (~0.1-0.2 s).
EVENT_CHUNK = 20_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(at: Any, now: int) -> int:
    """An event time as int microseconds since the epoch (None: `now`)."""
    if at is None:
        return now
    if isinstance(at, int) and not isinstance(at, bool):
        return at
    if isinstance(at, str):
        at = datetime.fromisoformat(at)
    if isinstance(at, datetime):
        return datetime_to_micros(at)
    raise ValueError(f"'at' must be a datetime, an ISO-8601 string or int microseconds, "
                     f"got {type(at).__name__}")


# An event as a load takes it ready: (key, event, at in microseconds or None: now, count)
Parsed = tuple[eventpack.Key, str, int | None, int]


def event_of(record: Mapping[str, Any], now: int) -> eventpack.Event:
    """The (key, event, at, count) of an event record; ValueError saying what is wrong."""
    pid, identifier = record.get("id"), record.get("identifier")
    if (pid is None) == (identifier is None):
        raise ValueError("an event names its profile by 'id' or by 'identifier' (one)")
    if identifier is not None:
        if not (isinstance(identifier, list | tuple) and len(identifier) == 2):
            raise ValueError("'identifier' is a (kind, value) pair")
        key: Any = (str(identifier[0]), str(identifier[1]))
    else:
        key = pid
    count = record.get("count")
    event: Any = record.get("event")
    return key, event, micros(record.get("at"), now), 1 if count is None else count


def describe(key: eventpack.Key) -> str:
    return key if isinstance(key, str) else f"{key[0]}:{key[1]}"


def now_micros() -> int:
    return int(time.time() * 1_000_000)


@dataclass(slots=True)
class EventChunk:
    """Events of a load sent as one request, as the request's four columns, and the index
    of the first in the load."""

    keys: list[eventpack.Key]
    names: list[Any]
    times: list[Any]
    counts: list[Any]
    base: int

    @property
    def count(self) -> int:
        return len(self.keys)

    @property
    def events(self) -> list[eventpack.Event]:
        """The events as (key, event, at, count) tuples."""
        return list(zip(self.keys, self.names, self.times, self.counts, strict=True))

    def packed(self, rows: list[int] | None = None) -> bytes:
        """The packed form of the chunk, or of its `rows` alone."""
        columns = (self.keys, self.names, self.times, self.counts)
        if rows is None:
            return eventpack.pack(*columns)
        return eventpack.pack(*(list(map(column.__getitem__, rows)) for column in columns))


def event_chunks(records: Iterable[Mapping[str, Any] | Parsed], size: int
                 ) -> Iterator[EventChunk]:
    """The records in chunks of `size` events (an error names the record's index); a
    record that is a tuple is an event already (Parsed), its time None meaning now."""
    it = iter(records)
    base = 0
    while batch := list(islice(it, size)):
        now = now_micros()
        columns = _columns(batch, now) or _one_by_one(batch, now, base)
        yield EventChunk(*columns, base=base)
        base += len(batch)


Columns = tuple[list[Any], list[Any], list[Any], list[Any]]


def _columns(batch: list[Any], now: int) -> Columns | None:
    """The usual chunk read a column at a time, with no Python frame per record (a load's
    CPU is the client's too, on a machine it shares with the server): every record a
    tuple (Parsed), or every one a dict naming its profile by "id", its "at" int
    microseconds or absent. None for any other chunk (`_one_by_one` reads it, and says
    which record is wrong); both read the same events from the same records."""
    kinds = set(map(type, batch))
    if kinds == {tuple}:
        if set(map(len, batch)) != {4}:
            return None
        keys, names, times, counts = map(list, zip(*batch, strict=True))
    elif kinds == {dict}:
        get = dict.get
        keys = list(map(get, batch, repeat("id")))
        if None in keys or list(map(get, batch, repeat("identifier"))).count(None) != len(batch):
            return None
        names = list(map(get, batch, repeat("event")))
        times = list(map(get, batch, repeat("at")))
        if not set(map(type, times)) <= {int, type(None)}:
            return None  # datetimes and ISO strings: converted one by one
        counts = list(map(get, batch, repeat("count")))
        if None in counts:
            counts = [1 if count is None else count for count in counts]
    else:
        return None
    if None in times:
        times = [now if at is None else at for at in times]
    return keys, names, times, counts


def _one_by_one(batch: list[Any], now: int, base: int) -> Columns:
    events: list[eventpack.Event] = []
    for i, record in enumerate(batch):
        if isinstance(record, tuple):
            key, event, at, count = record
            events.append((key, event, now if at is None else at, count))
            continue
        try:
            events.append(event_of(record, now))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"events[{base + i}]: {exc}") from None
    keys, names, times, counts = map(list, zip(*events, strict=True))
    return keys, names, times, counts


class EventRefusal(Refusal):
    """A chunk of events the server refused, event by event (memstore.client.refusal)."""

    method = "TrackBatch"

    def __init__(self, chunk: EventChunk, load: Any) -> None:
        super().__init__(chunk.count, chunk.base, load)
        self.chunk = chunk

    def applied_all(self, applied: int) -> None:
        self.load.add(applied)

    def key(self, row: int) -> str:
        return describe(self.chunk.keys[row])

    def pack(self, rows: list[int]) -> bytes:
        return self.chunk.packed(rows)
