"""Data rights on one shard: what an export holds, erasure receipts, the cluster's salt.

Its one job: turn the engine's state into the answers of ExportProfile, ExportProfiles,
Delete and EraseProfiles (docs/data-rights.md has the operator's side), and write the
receipts' audit lines. The server's handlers call it; it never changes state itself.

- An export of one person is everything the shard holds about them: attributes with their
  kinds, identifiers, every id merged into them (the blob keeps those merged on this shard
  and those forwarded from others), the event aggregates, version, and when the profile was
  created and last changed. Later features add what they hold (day records, segment
  memberships) by appending a function to EXPORT_SECTIONS: (shard, dense id) -> (section
  name, JSON-able value) or None. The section is sent as JSON in
  ExportProfileResponse.sections[name].
- A bulk export takes the matching profiles' stored bytes at one instant (no await while it
  does: the export is consistent at one log position) and streams them in chunks.
- An erasure's receipt names what was removed, when, and the log position from which on
  no snapshot holds it. Its audit line keeps salted hashes (Engine.hashed) instead of ids
  and identifiers, so the audit log can outlive the data it speaks of.

The salt. One per cluster, made once: 32 random bytes in hex in `rights.salt`, in the data
directory (`memstore serve`: the cluster's, passed to every shard it starts; a lone
`serve-shard`: its own). It keys the hashes of suppression entries and audit lines: the
same id hashes alike on every shard of a cluster, so an auditor can ask "was this person
erased?" by hashing the id with the salt, and without the salt the hashes cannot be
matched against a list of known emails. It is kept beside the data because it protects
the audit log and the blocked list when they are copied elsewhere, not the data directory
itself (which holds the data). Suppression entries move with their slots; an import
refuses entries hashed with another salt than the importing shard's (salt_id).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ormsgpack
from pyroaring import BitMap

from memstore import exportformat, pbvalues
from memstore.engine import days
from memstore.engine.blob import decode
from memstore.engine.schema import Kind
from memstore.engine.values import from_stored
from memstore.hashslot import slot_of
from memstore.server import audit, metrics
from memstore.storage.fsutil import fsync_path
from memstore.v1 import memstore_pb2 as pb

if TYPE_CHECKING:
    from memstore.shard import Shard

SALT_FILE = "rights.salt"
EXPORT_CHUNK = 2000  # profiles a bulk-export message
EXPORT_LINES_CHUNK = 1000  # ... as JSON Lines: ~5 ms of a shard's time to make
MAX_EXPORT_CHUNK = 50_000
ERASE_BATCH = 500  # profiles an erasure change (and message)
MAX_ERASE_BATCH = 10_000
_EVENT = re.compile(r"^event\.([A-Za-z0-9_\-]{1,128})\.(count|first|last)$")

# Sections later features add to an export of one person: (shard, dense id) -> (name,
# JSON-able value) or None. Day records (issue 26) and saved-segment memberships (issue 25)
# belong here.
ExportSection = Callable[["Shard", int], tuple[str, Any] | None]
EXPORT_SECTIONS: list[ExportSection] = []
_EPOCH = date(1970, 1, 1)  # day records count UTC days from it


def day_records(shard: Shard, dense: int) -> tuple[str, Any] | None:
    """The "day_records" section: {event: {"YYYY-MM-DD": times done that UTC day}} for
    the days the shard keeps (--event-days), or None when the profile has none."""
    engine = shard.engine
    blob = engine.blobs[dense]
    assert blob is not None
    out: dict[str, dict[str, int]] = {}
    for aid, raw in decode(blob)[1].items():
        spec = engine.schema.by_id[aid]
        if spec.kind is Kind.EVENT_DAYS:
            event = spec.name[len("event."):-len(".days")]
            out[event] = {(_EPOCH + timedelta(days=day)).isoformat(): count
                          for day, count in days.decode(raw)}
    return ("day_records", dict(sorted(out.items()))) if out else None


EXPORT_SECTIONS.append(day_records)


# ---------------------------------------------------------------------- the salt

def load_salt(path: Path, create: bool = True) -> bytes:
    """The salt in `path`, made there first (atomically, mode 0600) if it is missing and
    `create`. Raises ValueError for a file that is not 64 hex digits."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if not create:
            raise ValueError(f"salt file {path} does not exist") from None
        text = secrets.token_hex(32)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # (processes starting at
        # once, sharing the file, each link their own: one wins, every one reads it)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (text + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces a salt another process just made
        except FileExistsError:
            os.unlink(tmp)
            return load_salt(path, create=False)
        os.unlink(tmp)
        fsync_path(path.parent)
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise ValueError(f"salt file {path}: expected 64 hex digits")
    return bytes.fromhex(text)


def salt_id(salt: bytes) -> str:
    """A fingerprint of the salt that tells two salts apart without revealing either."""
    import hashlib

    return hashlib.blake2b(salt, digest_size=8, person=b"memstore-salt").hexdigest()


# ---------------------------------------------------------------------- export

def export_profile(shard: Shard, dense: int) -> pb.ExportProfileResponse:
    """Everything the shard holds about the profile at `dense`."""
    engine = shard.engine
    pid = engine.pids[dense]
    blob = engine.blobs[dense]
    assert pid is not None and blob is not None
    version, attrs, idents, merged = decode(blob)
    out = pb.ExportProfileResponse(id=pid, version=version, merged_ids=merged,
                                   slot=slot_of(pid), shard=shard.config.name)
    events: dict[str, dict[str, Any]] = {}
    specs = sorted((engine.schema.by_id[aid] for aid in attrs), key=lambda s: s.name)
    for spec in specs:
        if spec.kind is Kind.EVENT_DAYS:
            continue  # the "day_records" section
        value = from_stored(spec.kind, attrs[spec.id])
        event = _EVENT.match(spec.name)
        if event and spec.kind is (Kind.INT if event[2] == "count" else Kind.TIMESTAMP):
            events.setdefault(event[1], {})[event[2]] = value
            continue
        out.attributes.add(name=spec.name, kind=int(spec.kind),  # type: ignore[arg-type]
                           value=pbvalues.to_pb(value))
    for name, fields in sorted(events.items()):
        aggregate = out.events.add(name=name, count=fields.get("count", 0))
        for which in ("first", "last"):
            if which in fields:
                getattr(aggregate, which).FromDatetime(fields[which])
    for kind, value in idents:
        out.identifiers.add(kind=kind, value=value)
    created, changed = engine.created_at(dense), engine.changed[dense]
    if created:
        out.created.FromSeconds(created)
    if changed:
        out.changed.FromSeconds(changed)
    for section in EXPORT_SECTIONS:
        found = section(shard, dense)
        if found is not None:
            out.sections[found[0]] = json.dumps(found[1], default=str)
    return out


class BulkExport:
    """The profiles of `matches` as they are now, taken in one step (no await): their ids,
    stored bytes and times, and the schema table to read the bytes with."""

    def __init__(self, shard: Shard, matches: BitMap) -> None:
        engine = shard.engine
        ids = matches.to_array()
        dense = np.frombuffer(ids, dtype=np.uint32) if len(ids) else np.zeros(0, np.uint32)
        self.pids: list[str] = engine.pids.take(dense)  # type: ignore[assignment]
        # The blobs in one copy (a load's lie one after another: a few slices), cut into
        # profiles as chunks are read. The pause: ~0.3 s a million profiles more than
        # when blobs were a list (references, not bytes, were copied), most of it the
        # copy's pages faulting in (measured on a 2-core VM: 0.67-1.0 s for the whole
        # export's step at 1M, 0.38-0.51 s before).
        self._joined, lengths = engine.blobs.joined(dense)
        self._ends = np.cumsum(lengths, dtype=np.int64)
        self.created = np.frombuffer(engine.created, dtype=np.uint32)[dense]
        self.changed = np.frombuffer(engine.changed, dtype=np.uint32)[dense]
        # Day records stay out of bulk exports: what `memstore load` reads has no form for
        # them (load-events rebuilds them from events); ExportProfile has them.
        self.table = {aid: spec for aid, spec in engine.schema_table().items()
                      if spec[1] != Kind.EVENT_DAYS}
        self.position = shard.position
        self.epoch = engine.epoch

    def __len__(self) -> int:
        return len(self.pids)

    def blobs(self, start: int = 0, end: int | None = None) -> list[bytes]:
        """The stored bytes of the profiles [start:end] of the export."""
        ends = self._ends[start:end].tolist()
        if not ends:
            return []
        joined, first = self._joined, int(self._ends[start - 1]) if start else 0
        return [joined[a:b] for a, b in zip([first, *ends[:-1]], ends, strict=True)]

    def chunks(self, size: int, form: str = "packed") -> Iterator[tuple[int, bytes]]:
        """(profiles, bytes) per `size` profiles, in the `form` ExportProfilesChunk names:
        "packed", msgpack [[table], [[id, blob, 0, created, changed], ...]]; "lines", those
        profiles as JSON Lines; "columns", a column each (memstore.exportformat). The last
        two are made here, a chunk at a time between requests, so every shard of a cluster
        shares the work."""
        tables = [self.table]
        make = {"lines": exportformat.lines, "columns": exportformat.column_chunk}.get(form)
        for start in range(0, max(len(self.pids), 1), size):
            end = start + size
            pids, blobs = self.pids[start:end], self.blobs(start, end)
            created, changed = self.created[start:end], self.changed[start:end]
            if make is not None:
                yield len(pids), make(self.table, pids, blobs, created, changed)
            else:
                entries = list(zip(pids, blobs, repeat(0), created.tolist(),
                                   changed.tolist()))
                yield len(pids), ormsgpack.packb([tables, entries],
                                                 option=ormsgpack.OPT_NON_STR_KEYS)


# ---------------------------------------------------------------------- erasure

def receipt_id() -> str:
    return secrets.token_hex(8)


def hashes_of(shard: Shard, erased: list[tuple[str, list[str], list[list[str]]]]
              ) -> list[str]:
    """The salted hashes of the erased profiles' ids, merged ids and identifiers, in that
    order per profile."""
    hashed = shard.engine.hashed
    out: list[str] = []
    for pid, merged, idents in erased:
        out.append(hashed("\x00" + pid))
        out += [hashed("\x00" + m) for m in merged]
        out += [hashed(f"{k}:{v}") for k, v in idents]
    return out


def audit_erasure(shard: Shard, reason: str, receipt: str, at: int, position: int,
                  erased: list[tuple[str, list[str], list[list[str]]]], suppressed: bool,
                  hashed: list[str]) -> None:
    """One audit line for an erasure on this shard; `reason`: delete, query, retention.
    Retention erases anonymous visitors by the thousand: its lines give the count."""
    metrics.ERASED.labels(reason).inc(len(erased))
    fields: dict[str, Any] = {"reason": reason, "receipt": receipt, "shard": shard.config.name,
                              "profiles": len(erased), "erased_at": at,
                              "log_position": position, "suppressed": suppressed}
    if reason != "retention":
        fields["hashes"] = hashed
    audit.record("erasure", by=audit.caller.get(), **fields)
