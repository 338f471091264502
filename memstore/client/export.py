"""Reading data-rights answers: one person's export, bulk-export chunks, erasure receipts,
as plain Python values; and writing a bulk export as JSON Lines or Parquet that
`memstore load` reads back.

A JSON Lines export starts with one line `{"schema": [{"name", "kind", "indexed",
"merge"}, ...]}` (the cluster's declarations), then one profile a line: `{"id",
"attributes", "identifiers", "merged_ids", "version", "created", "changed"}`, timestamps as
ISO-8601 strings in UTC. `memstore load` declares the schema line's attributes before it
loads anything, so a timestamp comes back a timestamp (not the string it looks like), a
float that happens to be whole a float, and each attribute keeps its `indexed` flag and
merge rule; it reads `id`, `attributes` and `identifiers` and ignores the rest (a load is
new writes: versions, times and merged ids start again). A Parquet export has a column per
attribute in its kind's Arrow type, `id`, `identifiers`, and `_version`, `_created`,
`_changed`, `_merged_ids`; the schema and the names of those four columns are in the
file's metadata (`memstore.schema`, `memstore.meta_columns`), which `memstore load` reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import numpy as np

from memstore import exportformat, pbvalues
from memstore.storage.fsutil import fsync_path
from memstore.v1 import memstore_pb2 as pb

KINDS = {1: "string", 2: "int", 3: "float", 4: "bool", 5: "timestamp", 6: "string_list"}
META_COLUMNS = ("_version", "_created", "_changed", "_merged_ids")
RESERVED = {"id", "identifiers", *META_COLUMNS}


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def records(packed: bytes, timestamps: str = "datetime") -> list[dict[str, Any]]:
    """The profiles of an ExportProfilesChunk (memstore.exportformat.decode)."""
    if not packed:
        return []
    tables, entries = msgpack.unpackb(packed, strict_map_key=False)
    return exportformat.decode(tables, entries, timestamps)


def columns(chunk: pb.ExportProfilesChunk, names: Sequence[str]) -> dict[str, Any]:
    """The profiles of an ExportProfilesChunk a column at a time (exportformat.columns): as
    the shards made them (COLUMNS), or from the packed form, which a shard that does not
    know COLUMNS sends instead."""
    if chunk.columns:
        return exportformat.unpack_columns(chunk.columns, names)
    return exportformat.columns(chunk.packed, names)


def person(r: pb.ExportProfileResponse) -> dict[str, Any]:
    """ExportProfileResponse as a dict (timestamps as aware datetimes)."""
    events: dict[str, dict[str, Any]] = {}
    for e in r.events:
        events[e.name] = {"count": e.count,
                          "first": e.first.ToDatetime(UTC) if e.HasField("first")
                          else None,
                          "last": e.last.ToDatetime(UTC) if e.HasField("last")
                          else None}
    return {"id": r.id, "version": r.version,
            "created": r.created.ToDatetime(UTC) if r.HasField("created") else None,
            "changed": r.changed.ToDatetime(UTC) if r.HasField("changed") else None,
            "attributes": {a.name: {"kind": KINDS.get(a.kind, str(a.kind)),
                                    "value": pbvalues.from_pb(a.value)} for a in r.attributes},
            "identifiers": [(i.kind, i.value) for i in r.identifiers],
            "merged_ids": list(r.merged_ids), "events": events, "slot": r.slot,
            "shard": r.shard,
            "sections": {name: json.loads(text) for name, text in r.sections.items()}}


def receipt(r: pb.DeleteResponse | pb.EraseProfilesChunk) -> dict[str, Any]:
    """An erasure's receipt as a dict: one person (Delete) or a batch (EraseProfiles)."""
    if isinstance(r, pb.DeleteResponse):
        erased = [{"id": r.id, "merged_ids": list(r.merged_ids),
                   "identifiers": [(i.kind, i.value) for i in r.identifiers]}]
        position = r.log_position
    else:
        erased = [{"id": p.id, "merged_ids": list(p.merged_ids),
                   "identifiers": [(i.kind, i.value) for i in p.identifiers]}
                  for p in r.erased]
        position = r.log_position
    out: dict[str, Any] = {
        "receipt": r.receipt, "erased": erased,
        "erased_at": r.erased_at.ToDatetime(UTC) if r.HasField("erased_at") else None,
        "suppressed": r.suppressed}
    if position:
        out["log_position"] = position
    if r.shard_positions:
        out["shard_positions"] = dict(r.shard_positions)
    if isinstance(r, pb.DeleteResponse) or r.hashed_ids:  # (none for retention)
        out["hashed_ids"] = list(r.hashed_ids)
    return out


# ---------------------------------------------------------------------- files

@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Where to write an export meant for `path`: a temporary file beside it
    (`NAME.partial-XXXX`), which takes `path`'s place (fsync, rename, fsync the directory)
    only when the block completes, and is removed when it fails.

    Why: an export the server refuses, or that breaks mid-stream, must leave an earlier
    good export at `path` as it was. Written in place, it would be cut to a schema line or
    a partial file that `memstore load` takes for a whole (short) export.

    A `path` that exists and is not a regular file (/dev/null, a FIFO) is yielded as it
    is: it holds no earlier export, and a rename would replace the device or pipe itself.
    A symbolic link is followed: its target is replaced, the link kept. The new file gets
    the old one's permission bits, as writing in place kept them."""
    target = Path(os.path.realpath(path))
    try:
        old = target.stat()
    except FileNotFoundError:
        old = None
    if old is not None and not stat.S_ISREG(old.st_mode):
        yield path
        return
    fd, name = tempfile.mkstemp(prefix=f"{target.name}.partial-", dir=target.parent)
    os.close(fd)
    partial = Path(name)
    try:
        if old is not None:
            os.chmod(partial, stat.S_IMODE(old.st_mode))
        yield partial
        fsync_path(partial)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_path(target.parent)


def write_jsonl(out: BinaryIO, schema: list[dict[str, Any]],
                chunks: Iterable[tuple[int, bytes]], progress: Any = None) -> int:
    """Write the schema line, then each chunk's JSON lines ((count, bytes), as the shards
    made them: Client.iter_export_lines) to a binary stream; returns how many."""
    out.write(exportformat.json_lines([{"schema": schema}]))
    total = 0
    for count, lines in chunks:
        out.write(lines)
        total += count
        if progress is not None:
            progress(count)
    return total


def write_parquet(path: Path, schema: list[dict[str, Any]],
                  chunks: Iterable[dict[str, Any]], progress: Any = None,
                  rows_per_group: int = 100_000) -> int:
    """Write chunks a column at a time (Client.iter_export_columns with the schema's
    names) as Parquet, a row group about every `rows_per_group` profiles: an Arrow array a
    column, no record a profile."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for spec in schema:
        if spec["name"] in RESERVED:
            raise ValueError(f"attribute {spec['name']!r} has the name of a column of the "
                             "export itself; export it as JSON Lines")
    stamp = pa.timestamp("us", tz="UTC")
    types = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(),
             "bool": pa.bool_(), "timestamp": stamp, "string_list": pa.list_(pa.string())}
    fields = [pa.field("id", pa.string()),
              pa.field("identifiers", pa.list_(pa.list_(pa.string()))),
              *(pa.field(s["name"], types[s["kind"]]) for s in schema),
              pa.field("_version", pa.uint64()),
              pa.field("_created", stamp),
              pa.field("_changed", stamp),
              pa.field("_merged_ids", pa.list_(pa.string()))]
    arrow = pa.schema(fields, metadata={
        b"memstore.schema": json.dumps(schema).encode(),
        b"memstore.meta_columns": json.dumps(list(META_COLUMNS)).encode()})
    names = [s["name"] for s in schema]
    total = 0
    group: list[Any] = []
    rows = 0
    with pq.ParquetWriter(path, arrow) as writer:
        for c in chunks:
            count = len(c["id"])
            if not count:
                continue
            created, changed = (np.asarray(c[k], dtype=np.int64) for k in ("created",
                                                                             "changed"))
            arrays = {"id": pa.array(c["id"], pa.string()),
                      "identifiers": pa.array(c["identifiers"], fields[1].type),
                      "_version": pa.array(c["version"], pa.uint64()),
                      # seconds; 0: not known
                      "_created": pa.array(created * 1_000_000, stamp, mask=created == 0),
                      "_changed": pa.array(changed * 1_000_000, stamp, mask=changed == 0),
                      "_merged_ids": pa.array(c["merged_ids"], pa.list_(pa.string()))}
            for name, values in zip(names, c["attributes"]):
                arrays[name] = pa.array(values, arrow.field(name).type)
            group.append(pa.record_batch([arrays[f.name] for f in fields], schema=arrow))
            rows += count
            if rows >= rows_per_group:
                writer.write_table(pa.Table.from_batches(group, arrow))
                group, rows = [], 0
            total += count
            if progress is not None:
                progress(count)
        if group:
            writer.write_table(pa.Table.from_batches(group, arrow))
    return total
