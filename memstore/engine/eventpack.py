"""The packed form of a TrackBatch: events as four msgpack columns.

One job: write and read `TrackBatchRequest.packed`, a msgpack map

    {"keys": [id string, or [kind, value] identifier, per event],
     "events": [event name per event],
     "at": [int microseconds since the Unix epoch (UTC) per event],
     "counts": [count per event]}

with the four arrays of one length. Only the shape is checked here; the values (names,
times, counts, ids) are the engine's to check (memstore.engine.tracking), so an error
names the event wherever the batch came from. Clients, routers and shards share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from memstore.errors import InvalidArgument

Key = str | tuple[str, str]
Event = tuple[Key, str, int, int]  # (key, event name, at in microseconds, count)
COLUMNS = ("keys", "events", "at", "counts")


def pack(keys: Sequence[Any], events: Sequence[str], at: Sequence[int],
         counts: Sequence[int]) -> bytes:
    """The packed form of columns (identifier keys as (kind, value) tuples or lists)."""
    return msgpack.packb({"keys": keys, "events": events, "at": at, "counts": counts},
                         use_bin_type=True)


def unpack(packed: bytes, first: int = 0) -> list[Event]:
    """The events of a packed batch as (key, event, at, count) tuples, identifier keys as
    (kind, value) tuples. `first`: the index of its first event in the whole request, for
    errors (`packed[first + i]`)."""
    return list(zip(*unpack_columns(packed, first), strict=True))


def unpack_columns(packed: bytes, first: int = 0
                   ) -> tuple[list[Key], list[Any], list[Any], list[Any]]:
    """The four columns of a packed batch (keys, event names, times, counts), identifier
    keys as (kind, value) tuples; as `unpack`, without a tuple per event (a router
    splits the columns by shard as they are)."""
    try:
        columns = msgpack.unpackb(packed, use_list=True)
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types on garbage
        raise InvalidArgument(f"packed: not a msgpack map of event columns ({exc})") from None
    if not isinstance(columns, dict) or set(columns) != set(COLUMNS):
        raise InvalidArgument('packed: a map of "keys", "events", "at" and "counts" arrays')
    keys, names, times, counts = (columns[c] for c in COLUMNS)
    if not all(isinstance(c, list) for c in (keys, names, times, counts)) or not (
            len(keys) == len(names) == len(times) == len(counts)):
        raise InvalidArgument("packed: keys, events, at and counts are arrays of one length")
    if set(map(type, keys)) - {str}:
        for i, key in enumerate(keys):
            if isinstance(key, list) and len(key) == 2 and all(isinstance(x, str) for x in key):
                keys[i] = (key[0], key[1])
            elif not isinstance(key, str):
                raise InvalidArgument(f"packed[{first + i}]: a key is an id or a "
                                      "[kind, value] identifier")
    return keys, names, times, counts
