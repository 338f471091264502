"""The bulk-export record format, shared by the shards that write it and the clients that
read it: stored profile encodings (as BatchGet's packed form carries them) turned into
plain records `{"id", "attributes", "identifiers", "merged_ids", "version", "created",
"changed"}`, and those records as JSON Lines (docs/data-rights.md).

A chunk is decoded with the cyclic garbage collector paused (thousands of new containers
would wake it again and again to walk the process's heap), and a chunk's timestamps are
converted together (numpy), not one datetime each.

`lines` is the shards' JSON Lines writer, the hot path of `memstore export` (every byte of
a bulk export passes through it once): the same bytes as json_lines(decode(..., "iso")),
made with as little Python a profile as it takes: one unpack call and one orjson call a
chunk, timestamps converted a column at a time, and one dict a profile for its named
attributes (the stored encoding keys them by number).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable, Sequence
from functools import partial
from itertools import repeat
from operator import itemgetter
from typing import Any

import msgpack
import numpy as np
import orjson
import ormsgpack

from memstore import pbvalues
from memstore.gcpause import gc_paused

_TIMESTAMP = 5  # Kind.TIMESTAMP
_ARRAY32 = struct.Struct(">BI")  # msgpack's array 32 header
_line = partial(orjson.dumps, option=orjson.OPT_APPEND_NEWLINE)


def json_lines(records: Iterable[dict[str, Any]]) -> bytes:
    """Records (made with timestamps="iso") as JSON Lines: orjson, ~10x the json module."""
    return b"".join(map(_line, records))


def _states(blobs: Sequence[bytes]) -> tuple[Sequence[Any], ...]:
    """The stored profiles `blobs` decoded in one call, as four columns: versions,
    attributes, identifiers and merged ids."""
    states = ormsgpack.unpackb(_ARRAY32.pack(0xDD, len(blobs)) + b"".join(blobs),
                               option=ormsgpack.OPT_NON_STR_KEYS)
    return tuple(zip(*states))


@gc_paused
def lines(table: dict[int, list[Any]], pids: Sequence[str], blobs: Sequence[bytes],
          created: np.ndarray, changed: np.ndarray) -> bytes:
    """JSON Lines of the profiles `pids` stored as `blobs` (attribute ids named by `table`:
    {id: [name, kind number]}; one it does not name is left out), created and changed at
    those seconds since the epoch (0: not known); byte for byte json_lines(decode([table],
    entries, "iso"))."""
    if not pids:
        return b""
    versions, attrs, idents, merged = _states(blobs)
    for aid, spec in table.items():  # timestamps a column at a time, in place (C loops)
        if spec[1] == _TIMESTAMP:
            holders = [a for a in attrs if aid in a]
            if holders:
                text = _iso(list(map(itemgetter(aid), holders)), "us")
                deque(map(dict.__setitem__, holders, repeat(aid), text), maxlen=0)
    named = {aid: spec[0] for aid, spec in table.items()}
    try:
        renamed = [{named[k]: v for k, v in a.items()} for a in attrs]
    except KeyError:  # the chunk holds an attribute the table leaves out (day records)
        renamed = [{named[k]: v for k, v in a.items() if k in named} for a in attrs]
    records = [{"id": pid, "attributes": a, "identifiers": i, "merged_ids": m, "version": v,
                "created": c, "changed": h}
               for pid, a, i, m, v, c, h in zip(pids, renamed, idents, merged, versions,
                                                _times(created), _times(changed))]
    # One orjson call a chunk: a record's objects hold no object in a list, so `},{"id":`
    # (quotes inside strings are escaped) is only ever the gap between two records.
    return orjson.dumps(records)[1:-1].replace(b'},{"id":', b'}\n{"id":') + b"\n"


@gc_paused
def column_chunk(table: dict[int, list[Any]], pids: Sequence[str], blobs: Sequence[bytes],
                 created: np.ndarray, changed: np.ndarray) -> bytes:
    """The profiles `pids` stored as `blobs` a column at a time, as msgpack
    (ExportProfilesChunk.columns): "id", "identifiers", "merged_ids", "version", "created",
    "changed" (seconds, 0: not known), and "attributes": [name, kind number, a value a
    profile or None] for each attribute of `table` some profile holds, timestamps in
    microseconds as stored. Made by the shards, so that a Parquet export's decoding is
    shared by all of them; what a reader has left is an array a column (unpack_columns)."""
    if not pids:
        return _pack_columns([], (), (), (), [], [], [])
    versions, attrs, idents, merged = _states(blobs)
    held = set().union(*attrs)
    out = [[spec[0], spec[1], [a.get(aid) for a in attrs]]
           for aid, spec in table.items() if aid in held]
    return _pack_columns(pids, idents, merged, versions, created.tolist(), changed.tolist(),
                         out)


def _pack_columns(pids: Sequence[str], idents: Sequence[Any], merged: Sequence[Any],
                  versions: Sequence[int], created: list[int], changed: list[int],
                  attributes: list[list[Any]]) -> bytes:
    return ormsgpack.packb({"id": pids, "identifiers": idents, "merged_ids": merged,
                            "version": versions, "created": created, "changed": changed,
                            "attributes": attributes})


def unpack_columns(data: bytes, names: Sequence[str]) -> dict[str, Any]:
    """ExportProfilesChunk.columns as `columns` gives a packed chunk: "attributes" a list
    per name in `names`, None for each profile where none holds it."""
    found = ormsgpack.unpackb(data)
    held = {name: values for name, _, values in found.pop("attributes")}
    absent = [None] * len(found["id"])
    found["attributes"] = [held.get(name, absent) for name in names]
    return found  # type: ignore[no-any-return]


@gc_paused
def columns(packed: bytes, names: Sequence[str]) -> dict[str, Any]:
    """A packed chunk's profiles (ExportProfilesChunk.packed) a column at a time: "id",
    "identifiers", "merged_ids", "version", "created", "changed" (seconds, 0: not known)
    and "attributes", a list per name in `names` of each profile's value as stored
    (timestamps: microseconds since the epoch), None where it has none. One unpack call
    for the chunk's profiles."""
    tables, entries = ormsgpack.unpackb(packed, option=ormsgpack.OPT_NON_STR_KEYS)
    if not entries:
        return {"id": [], "identifiers": [], "merged_ids": [], "version": [], "created": [],
                "changed": [], "attributes": [[] for _ in names]}
    pids, blobs, which, created, changed = zip(*entries)
    versions, attrs, idents, merged = _states(blobs)
    ids = [{spec[0]: aid for aid, spec in t.items()} for t in tables]
    one = len(ids) == 1 or len(set(which)) == 1
    out: list[list[Any]] = []
    for name in names:
        if one:  # every profile read with the same table (a shard's chunk)
            aid = ids[which[0]].get(name)
            out.append([None] * len(attrs) if aid is None else [a.get(aid) for a in attrs])
        else:
            keys = [t.get(name) for t in ids]
            out.append([a.get(keys[t]) for a, t in zip(attrs, which)])
    return {"id": list(pids), "identifiers": list(idents), "merged_ids": list(merged),
            "version": list(versions), "created": list(created), "changed": list(changed),
            "attributes": out}


def _iso(values: Any, unit: str) -> list[str]:
    """Times in `unit` since the epoch as ISO-8601 strings ending in Z."""
    moments = np.asarray(values, dtype=np.int64).view(f"datetime64[{unit}]")
    return np.datetime_as_string(moments, unit=unit,  # type: ignore[call-overload,no-any-return]
                                 timezone="UTC").tolist()


def _times(seconds: np.ndarray) -> list[str | None]:
    """Seconds since the epoch as ISO-8601, 0 (not known) as None. A chunk's profiles are
    mostly created (and changed) in few distinct seconds: each is converted once."""
    distinct, which = np.unique(seconds, return_inverse=True)
    text: list[str | None] = _iso(distinct, "s")  # type: ignore[assignment]
    if len(distinct) and not distinct[0]:
        text[0] = None
    return list(map(text.__getitem__, which.tolist()))


@gc_paused
def decode(tables: Sequence[dict[int, list[Any]]], entries: Iterable[Sequence[Any]],
           timestamps: str = "datetime") -> list[dict[str, Any]]:
    """Records of `entries` ([id, stored profile, table index, created, changed], the
    profile's attribute ids named by tables[index]: {id: [name, kind number]}).
    `timestamps`: "datetime" (aware), "iso" (ISO-8601 strings, JSON-ready) or "micros"
    (int microseconds since the epoch), for timestamp attributes and the created and
    changed times alike (None: not known)."""
    names = [{aid: spec[0] for aid, spec in t.items()} for t in tables]
    stamps = [[aid for aid, spec in t.items() if spec[1] == _TIMESTAMP] for t in tables]
    entries = list(entries)
    # The stored encodings as one msgpack array: one unpack call a chunk, not one each.
    states = msgpack.unpackb(_ARRAY32.pack(0xDD, len(entries))
                             + b"".join([e[1] for e in entries]), strict_map_key=False)
    out = []
    found: list[tuple[dict[str, Any], str]] = []  # timestamp attributes to convert
    for (pid, _, t, created, changed), (version, attrs, idents, merged) in zip(entries,
                                                                               states):
        named = names[t]
        attributes = {named[aid]: value for aid, value in attrs.items() if aid in named}
        for aid in stamps[t]:
            if aid in attrs:
                found.append((attributes, named[aid]))
        out.append({"id": pid, "attributes": attributes, "identifiers": idents,
                    "merged_ids": merged, "version": version, "created": created,
                    "changed": changed})
    if timestamps != "micros" and found:
        micros = [attributes[name] for attributes, name in found]
        for (attributes, name), moment in zip(found, _convert(micros, timestamps, "us")):
            attributes[name] = moment
    for key in ("created", "changed"):
        seconds = [r[key] for r in out]
        for record, moment in zip(out, _convert(seconds, timestamps, "s")):
            record[key] = moment
    return out


def _convert(values: list[int], how: str, unit: str) -> list[Any]:
    """Times in `unit` since the epoch as `how` asks; 0 seconds (unit "s") is None."""
    if how == "micros":
        return [v * 1_000_000 if v else None for v in values] if unit == "s" else values
    if how == "iso":
        text = np.datetime_as_string(  # type: ignore[call-overload]
            np.array(values, dtype=f"datetime64[{unit}]"), unit=unit).tolist()
        moments = [t + "Z" for t in text]
    else:
        scale = 1_000_000 if unit == "s" else 1
        moments = [pbvalues.micros_to_datetime(v * scale) for v in values]
    if unit == "s":
        return [m if v else None for v, m in zip(values, moments)]
    return moments
