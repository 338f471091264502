"""Loading events (`Client.load_events`, `Client.track_batch`): event records to packed
TrackBatch requests, and, when a server refuses one, what to send again.

An event record is a dict {"id" or "identifier", "event", "at", "count"}: "identifier" a
(kind, value) pair naming the profile that holds it; "at" an aware datetime, an ISO-8601
string (no offset means UTC) or int microseconds since the Unix epoch, default now;
"count" default 1. Nothing here talks to a server.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from typing import Any

import grpc
from pyroaring import BitMap

from memstore.engine import eventpack
from memstore.hashslot import APPLIED_TRAILER, RECORD_TRAILER
from memstore.pbvalues import datetime_to_micros

EVENT_CHUNK = 5000  # events a TrackBatch request of a load carries
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE}


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
    """Events of a load sent as one request, and the index of the first in the load."""

    events: list[eventpack.Event]
    base: int

    @property
    def count(self) -> int:
        return len(self.events)

    def packed(self) -> bytes:
        return eventpack.pack_events(self.events)


def event_chunks(records: Iterable[Mapping[str, Any]], size: int) -> Iterator[EventChunk]:
    """The records in chunks of `size` events (an error names the record's index)."""
    it = iter(records)
    base = 0
    while True:
        now = now_micros()
        chunk = []
        for i, record in enumerate(islice(it, size)):
            try:
                chunk.append(event_of(record, now))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"events[{base + i}]: {exc}") from None
        if not chunk:
            return
        yield EventChunk(chunk, base)
        base += len(chunk)


class EventRefusal:
    """A chunk of events the server refused, event by event (as memstore.client.core's
    _Refusal for profiles): the refusal names the event at fault (RECORD_TRAILER) and, from
    a router, the events that applied on other shards all the same (APPLIED_TRAILER); the
    rest is sent again without the refused event (with on_refused), or only the rest before
    it (without: the load stops there). A refusal that names no event stops the load."""

    def __init__(self, chunk: EventChunk, load: Any) -> None:
        self.chunk = chunk
        self.load = load  # memstore.client.core._Load
        self.rows = list(range(chunk.count))  # the chunk's events in the request last sent

    def applied_all(self, applied: int) -> None:
        self.load.add(applied)

    def next(self, exc: grpc.RpcError) -> bytes | None:
        """Take the refusal of the request last sent; the request to send next, if any."""
        from memstore.client.core import ClientError, LoadError

        code = exc.code()  # type: ignore[attr-defined]
        details = exc.details() or code.name  # type: ignore[attr-defined]
        trailers = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
        applied = trailers.get(APPLIED_TRAILER)
        done = set(BitMap.deserialize(applied)) if applied else set()
        self.load.add(len(done))
        record = trailers.get(RECORD_TRAILER)
        at = int(record) if record is not None and code in _REFUSED else -1
        if not 0 <= at < len(self.rows):
            unknown = 0 if code in _REFUSED else len(self.rows) - len(done)
            self.load.stop(LoadError(code, details, applied=0, unknown=unknown))
            return None
        bad = self.rows[at]
        index, key = self.chunk.base + bad, describe(self.chunk.events[bad][0])
        if self.load.on_refused is not None:
            self.load.on_refused(index, key, ClientError(code, details, "TrackBatch"))
            kept = [row for i, row in enumerate(self.rows) if i != at and i not in done]
        else:
            self.load.stop(LoadError(code, details, applied=0, record=index, id=key))
            kept = [row for i, row in enumerate(self.rows[:at]) if i not in done]
        self.rows = kept
        if not kept:
            return None
        return eventpack.pack_events([self.chunk.events[row] for row in kept])
