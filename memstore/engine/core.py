"""The engine of one shard: profiles in memory, their indexes, and identity resolution.

Its one job: turn requests into Changes and apply Changes. A Change is a list of
after-images — (dense id, primary id, encoded profile blob or None for "gone") — plus the
attribute declarations it needs. Every other structure (indexes, identifier directory,
merged-id aliases, slot membership) is derived from the blobs, so:

- applying a Change is idempotent and replaying logged Changes rebuilds exactly the state
  callers were told about;
- undoing a Change is applying the before-images it returns (used when the log cannot
  make a Change durable).

Planning (`plan_*`) reads state and never mutates it; `apply` mutates and never fails on
input. The shard runs plan, log append and apply with no await in between, so one
request's operations are atomic with respect to every other request.

Cross-shard merges add three small tables, changed by Notes in the same Changes and logged
with them (shards/merge.py has the protocol): `held` (profiles frozen by an unfinished merge,
hidden from queries), `forwards` (primary ids merged into a profile on another shard) and
`decided` (merge transactions this shard committed or refused, as the commit point). The
cluster's identifier directory is a fourth, `claims` (memstore.index.claims), and the
suppression list of erased identifiers and ids a fifth, `suppressed` (salted hashes).

Each profile also has a created and a last-changed time (unix seconds, 0: unknown, from
before memstore kept them), in two arrays by dense id beside the blobs: not in the blob,
whose bytes are also a wire format (BatchGet's packed form). A Change carries the time it
is made at (`at`): applying it stamps every image it writes as changed then, a new profile
as created then, unless `times` says otherwise (merges keep the earliest created time,
slot moves the source's times). The log records both (RECORD_CHANGE), so replay rebuilds
them; docs/log-format.md has the rules.

Blob layout (msgpack array): [version, {attribute id: stored value}, [[kind, value], ...]
identifiers, [merged-away primary ids]]. Stored values are described in memstore.engine.values.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from itertools import chain, compress, islice, repeat
from operator import is_not, lt
from typing import Any, NamedTuple, cast

import msgpack
import numpy as np
import ormsgpack
from pyroaring import BitMap
from xxhash import xxh3_64_intdigest

from memstore.engine import days
from memstore.engine.columnar import Coded, Columns, Row
from memstore.engine.rowpack import RowPacker
from memstore.engine.schema import (
    INT64_MAX,
    INT64_MIN,
    MAX_LIST_ITEMS,
    MAX_STRING_BYTES,
    AttributeSpec,
    Kind,
    Merge,
    Schema,
    article,
    check_merge,
    check_name,
    check_value,
    kind_of,
    registry_key,
)
from memstore.engine.segments import MAX_SEGMENTS, Segments, Touched
from memstore.engine.values import from_stored, to_stored
from memstore.errors import (
    FailedPrecondition,
    Forwarded,
    Held,
    InvalidArgument,
    MemstoreError,
    NotFound,
    Undeclared,
    WrongSlot,
    brief,
)
from memstore.hashslot import SLOT_COUNT, slot_of, slots_of
from memstore.index.bitmap_index import (
    RangeIndex,
    ValueIndex,
    bitmap_of,
    float_to_ordered,
    floats_to_ordered,
)
from memstore.index.claims import Claims, claim_key
from memstore.index.day_index import DayIndex
from memstore.index.inttable import IntTable
from memstore.pbvalues import micros_in_range
from memstore.query import Node, format_query
from memstore.query.ast import segment_problem

# Operation codes: the numbers of memstore.v1.Operation.Op.
SET, SET_ONCE, UNSET, INCREMENT, ADD_TO_SET, REMOVE_FROM_SET = 1, 2, 3, 4, 5, 6
OP_NAMES = {1: "set", 2: "set_once", 3: "unset", 4: "increment", 5: "add_to_set",
            6: "remove_from_set"}

MAX_ID_BYTES = 256
MAX_IDENTIFIER_BYTES = 512
_IDENT_KIND = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")

DEFAULT_BLOCKED = frozenset(
    {"", "null", "none", "nil", "undefined", "unknown", "n/a", "na", "0", "-",
     "test", "test@test.com", "test@example.com", "noemail@noemail.com",
     "00000000-0000-0000-0000-000000000000"}
)

RANGE_KINDS = (Kind.INT, Kind.FLOAT, Kind.TIMESTAMP)
VALUE_KINDS = (Kind.STRING, Kind.BOOL, Kind.STRING_LIST)
DEFAULT_EVENT_DAYS = 180  # days of day records kept (--event-days)


@dataclass(frozen=True)
class IdentityRules:
    """Merge protection against "blob" profiles built from shared or junk identifiers."""

    max_per_kind: int = 20
    blocked: frozenset[str] = DEFAULT_BLOCKED

    def is_blocked(self, value: str) -> bool:
        return value.strip().lower() in self.blocked


class Image(NamedTuple):
    """A profile's after-image. A tuple: a load makes a thousand at once, in C
    (tuple.__new__ over zipped fields; _make costs a Python frame each, 60% more)."""

    dense: int
    pid: str
    blob: bytes | None
    state: list[Any] | None = None  # decoded blob when the planner has it (saves a decode)


@dataclass(slots=True)
class Note:
    """Set (value not None) or remove one entry of a cross-shard merge table."""

    table: str  # "held" | "forwards" | "decided" | "claims" | "registry" | "suppressed"
    key: str
    value: Any


NOTE_TABLES = ("held", "forwards", "decided", "claims", "registry", "suppressed",
               "segments")
# Tables whose removed entries held personal data (primary ids, identifiers): a change
# removing one erases, as a change removing a profile does (Shard: erasure retention).
ERASING_TABLES = frozenset({"forwards", "decided", "claims"})
ANONYMOUS_KINDS = ("anonymous", "device")  # identifier kinds of anonymous visitors


@dataclass(slots=True)
class Load:
    """What a bulk load's planner checked, kept so `apply` can index column by column."""

    first: int  # dense id of the first image; the images are new profiles, in order
    slots: list[int]  # hash slot of each image's primary id
    keys: np.ndarray  # the images' identifier keys (none in the directory yet) ...
    owners: list[int]  # ... and the dense id holding each
    # indexed: (attribute, ids, values), values coded where the column came so (Coded)
    columns: list[tuple[int, Sequence[int], list[Any] | Coded | np.ndarray]]


@dataclass
class Change:
    schema: list[AttributeSpec] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)
    result: Any = None
    notes: list[Note] = field(default_factory=list)
    load: Load | None = None  # set by plan_columns: the images are a load's new profiles
    at: int = 0  # unix seconds the change is made at (0: when applied; the shard logs it)
    # dense id -> (created, changed) of an image, where the default rule does not hold:
    # changed = `at`; created = `at` for a new profile, else unchanged.
    times: dict[int, tuple[int, int]] = field(default_factory=dict)
    tracked: Any = None  # set by a batch of tracks (memstore.engine.tracking.Tracked)
    # A slot move's copy or drop, or a segment's creation: membership changes, but nothing
    # happened to anyone, so watchers are not told (memstore/server/watch.py).
    quiet: bool = False
    # Saved segments to evaluate over every profile once the change is applied (a new one)
    rebuild: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.schema and not self.images and not self.notes

    @property
    def erases(self) -> bool:
        """True when the change removes a profile, or a table entry naming a person."""
        return (any(image.blob is None for image in self.images)
                or any(n.value is None and n.table in ERASING_TABLES for n in self.notes))

    def touched(self) -> list[str]:
        """Primary ids whose slot this change touched (a decision counts for its survivor;
        claims do not count: a slot move carries all of its claims every time)."""
        pids = [image.pid for image in self.images]
        for note in self.notes:
            if note.table == "decided":
                if note.value is not None and isinstance(note.value[0], str):
                    pids.append(note.value[0])
            elif note.table not in ("claims", "suppressed"):
                pids.append(note.key)
        return pids


@dataclass
class Undo:
    """What `Engine.apply` returns: apply it with `Engine.undo` to take the change back."""

    images: list[Image]
    notes: list[Note]
    added: tuple[int, list[str]] | None = None  # a load's new profiles: (first dense id, pids)
    times: list[tuple[int, int, int]] = field(default_factory=list)  # (dense, created, changed)
    schema: list[AttributeSpec] = field(default_factory=list)  # declared by the change


@dataclass(slots=True)
class UpsertSpec:
    pid: str
    ops: Sequence[tuple[int, str, Any]] = ()
    identifiers: Sequence[tuple[str, str]] = ()
    expected_version: int | None = None
    where: str = ""  # where the request came from, for error messages ("packed[3]")
    record: bool = False  # the ops set a bulk record's attributes: errors name the attribute


def record_specs(rows: Iterable[Row], where: str) -> list[UpsertSpec]:
    """Bulk-load records as upserts: each sets its attributes and links its identifiers."""
    return [UpsertSpec(pid, [(SET, k, v) for k, v in attrs.items()], idents,
                       where=f"{where}[{i}]", record=True)
            for i, (pid, attrs, idents) in enumerate(rows)]


@dataclass(slots=True)
class Profile:
    """A profile as callers see it (API values, attribute names)."""

    id: str
    version: int
    attributes: dict[str, Any]
    identifiers: list[tuple[str, str]]
    merged_ids: list[str]
    slot: int


# Encodes a profile blob: ormsgpack writes the same bytes as msgpack, 2-3x faster.
_pack = partial(ormsgpack.packb, option=ormsgpack.OPT_NON_STR_KEYS)


def encode(version: int, attrs: dict[int, Any], idents: list[list[str]], merged: list[str]) -> bytes:
    state = [version, attrs, idents, merged]
    try:
        return _pack(state)  # type: ignore[no-any-return]
    except TypeError:  # a subclass ormsgpack refuses (numpy's float64): msgpack's same bytes
        return msgpack.packb(state)  # type: ignore[no-any-return]


def decode(blob: bytes) -> list[Any]:
    return msgpack.unpackb(blob, strict_map_key=False, use_list=True)  # type: ignore[no-any-return]


def version_of(blob: bytes) -> int:
    """The version of an encoded profile without decoding the rest: the blob is a msgpack
    array of four whose first element is the version (a non-negative int)."""
    if blob[0] != 0x94:
        raise ValueError("not an encoded profile")
    tag = blob[1]
    if tag < 0x80:  # positive fixint
        return tag
    width = _UINT_WIDTHS.get(tag)
    if width is None:
        raise ValueError("profile version is not an unsigned int")
    return int.from_bytes(blob[2:2 + width], "big")


_UINT_WIDTHS = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def timestamp_ext(micros: int) -> msgpack.Timestamp:
    """msgpack's Timestamp for `micros` (cheaper than Timestamp.from_unix_nano)."""
    seconds, rem = divmod(micros, 1_000_000)
    return msgpack.Timestamp(seconds, rem * 1000)


def ident_key(kind: str, value: str) -> int:
    """Directory key of an identifier: a 64-bit hash, not the string, to save ~70 bytes a
    profile. Readers confirm a hit against the profile's own identifiers; two identifiers
    colliding on one key are refused (about one chance in 2**64 per pair). Never 0 or 1,
    which the directory's table keeps for empty and deleted slots (memstore.index.inttable)."""
    key: int = xxh3_64_intdigest(f"{kind}\x00{value}".encode())
    return key if key > 1 else key + 2


def ident_keys(kinds: Sequence[str], values: Sequence[str]) -> np.ndarray:
    """ident_key of many identifiers, as uint64, with no Python frame per identifier."""
    texts = map(str.encode, map("\x00".join, zip(kinds, values, strict=True)))
    keys = np.fromiter(map(xxh3_64_intdigest, texts), dtype=np.uint64, count=len(kinds))
    keys[keys <= 1] += np.uint64(2)
    return keys


def check_pid(pid: str, where: str = "id") -> None:
    if not isinstance(pid, str) or not pid:
        raise InvalidArgument(f"{where}: empty profile id")
    if len(pid.encode("utf-8")) > MAX_ID_BYTES:
        raise InvalidArgument(f"{where}: profile id longer than {MAX_ID_BYTES} bytes")


def _claim_columns(entries: Sequence[Any]) -> tuple[Sequence[Any], ...]:
    """The kinds, values, pids and expected holders of checked claim entries (see
    ClaimRequest). A batch of well-formed entries is checked a column at a time; the
    first bad entry is named by the per-entry checks."""
    if not entries:
        return (), (), (), ()
    try:
        if set(map(type, entries)) <= {list, tuple} and set(map(len, entries)) == {4}:
            kinds, values, pids, expected = zip(*entries)
            named = [p for p in chain(pids, expected) if p is not None]
            if (set(map(type, chain(kinds, values, named))) == {str}
                    and all(map(_IDENT_KIND.match, set(kinds))) and all(values) and all(named)
                    and max(map(len, values)) * 4 <= MAX_IDENTIFIER_BYTES
                    and max(map(len, named), default=0) * 4 <= MAX_ID_BYTES):
                return kinds, values, pids, expected
    except TypeError:
        pass
    for i, entry in enumerate(entries):  # name the first bad entry (or pass the long ones)
        where = f"claims[{i}]"
        if not (isinstance(entry, list | tuple) and len(entry) == 4
                and isinstance(entry[0], str) and isinstance(entry[1], str)):
            raise InvalidArgument(f"{where}: not [kind, value, pid or nil, expected or nil]")
        check_identifier(entry[0], entry[1], where)
        for name, named_pid in (("pid", entry[2]), ("expected", entry[3])):
            if named_pid is not None:
                if not isinstance(named_pid, str):
                    raise InvalidArgument(f"{where}: {name} must be a string or nil")
                check_pid(named_pid, f"{where}.{name}")
    return tuple(zip(*entries))  # type: ignore[return-value]


def check_identifier(kind: str, value: str, where: str) -> None:
    if not _IDENT_KIND.match(kind or ""):
        raise InvalidArgument(
            f"{where}: identifier kind {brief(kind)} must be lower-case letters, digits, _ or -"
        )
    if not value:
        raise InvalidArgument(f"{where}: empty identifier value")
    if len(value.encode("utf-8")) > MAX_IDENTIFIER_BYTES:
        raise InvalidArgument(f"{where}: identifier longer than {MAX_IDENTIFIER_BYTES} bytes")


class _Draft:
    """A profile being changed by a plan."""

    __slots__ = ("attrs", "created", "dense", "gone", "idents", "merged", "pid", "version")

    def __init__(self, pid: str, dense: int | None, state: list[Any] | None) -> None:
        self.pid = pid
        self.dense = dense
        self.gone = False
        self.created: int | None = None  # set where the default rule does not hold (Change)
        if state is None:
            self.version, self.attrs, self.idents, self.merged = 0, {}, [], []
        else:
            self.version, self.attrs, self.idents, self.merged = state


class _Planner:
    """Reads engine state plus this plan's own drafts; never mutates the engine."""

    def __init__(self, engine: Engine) -> None:
        self.e = engine
        self.added: list[AttributeSpec] = []
        self.added_by_name: dict[str, AttributeSpec] = {}
        # A router's write (Engine.cluster_schema) may not declare attributes by its values
        # here: the plan methods refuse it up front naming every attribute it would declare
        # (Engine.require_declared); one the pre-scan missed is refused here, alone.
        self.strict = engine.cluster_schema
        self.drafts: dict[str, _Draft] = {}  # by the profile's own primary id
        self.at = int(engine.clock())  # when this change is made
        self.aliases: dict[str, str | None] = {}  # overlay on engine.aliases
        self.idents: dict[int, str | None] = {}  # overlay: identifier key -> owner pid

    # -- schema
    def spec(self, name: str) -> AttributeSpec | None:
        return self.e.schema.by_name.get(name) or self.added_by_name.get(name)

    def spec_by_id(self, aid: int) -> AttributeSpec:
        base = len(self.e.schema.by_id)
        return self.e.schema.by_id[aid] if aid < base else self.added[aid - base]

    def declare(self, name: str, kind: Kind, indexed: bool = True,
                merge: Merge = Merge.DEFAULT, explicit: bool = False) -> AttributeSpec:
        """The spec of `name`, declaring it with `kind` if it has none yet (`explicit`: a
        DeclareAttributes call, which declares even a router's write would not)."""
        existing = self.spec(name)
        if existing is not None:
            if existing.kind != kind:
                raise InvalidArgument(f"attribute {name!r} has kind {existing.kind.label}, "
                                      f"got {article(kind.label)} value")
            return existing
        spec = self.e.schema.plan(name, kind, indexed, merge,
                                  next_id=len(self.e.schema.by_id) + len(self.added))
        assert spec is not None  # not declared yet, so the plan is a new spec
        if self.strict and not explicit:
            raise Undeclared([[name, int(kind), indexed, int(merge)]])
        self.added.append(spec)
        self.added_by_name[name] = spec
        return spec

    # -- profiles
    def resolve_pid(self, pid: str) -> str:
        """The primary id `pid` stands for now: itself, or the survivor it merged into."""
        if pid in self.aliases:
            return self.aliases[pid] or pid
        if pid in self.drafts or pid in self.e.dense_of:
            return pid
        return self.e.aliases.get(pid, pid)

    def draft(self, pid: str, create: bool) -> _Draft | None:
        pid = self.resolve_pid(pid)
        if pid not in self.drafts:
            self.e.check_moving(pid)
        found = self.drafts.get(pid)
        if found is not None:
            if found.gone:
                if not create:
                    return None
                found = _Draft(pid, found.dense, None)
                found.version = 0
                found.created = self.at  # made again: its dense id held the one removed
                self.drafts[pid] = found
            return found
        dense = self.e.dense_of.get(pid)
        if dense is None:
            if not create:
                return None
            self.e.check_slot(pid)
            if self.e.suppressed:
                self.e.check_suppressed(id_key(pid), f"profile id {pid!r}")
            draft = _Draft(pid, None, None)
        else:
            self.e.check_slot(pid)
            draft = _Draft(pid, dense, decode(self.e.blobs[dense]))  # type: ignore[arg-type]
        self.drafts[pid] = draft
        return draft

    def owner_of(self, kind: str, value: str, key: int) -> str | None:
        if key in self.idents:
            return self.idents[key]
        dense = self.e.owner_dense(kind, value)
        return None if dense is None else self.e.pids[dense]

    # -- operations
    def apply_op(self, d: _Draft, op: int, name: str, value: Any, where: str) -> None:
        if op == UNSET:
            spec = self.spec(name)
            if spec is not None:
                d.attrs.pop(spec.id, None)
            return
        if op == ADD_TO_SET or op == REMOVE_FROM_SET:
            if isinstance(value, str):
                value = [value]
            spec = self.spec(name) or self.declare(name, Kind.STRING_LIST)
            if spec.kind is not Kind.STRING_LIST:
                raise InvalidArgument(
                    f"{where}: {OP_NAMES[op]} needs a string_list attribute; "
                    f"{name!r} has kind {spec.kind.label}"
                )
            check_value(Kind.STRING_LIST, value, name)
            current = set(d.attrs.get(spec.id, ()))
            current = current | set(value) if op == ADD_TO_SET else current - set(value)
            if current:
                d.attrs[spec.id] = sorted(current)
            else:
                d.attrs.pop(spec.id, None)
            return
        if op == INCREMENT:
            kind = kind_of(value)
            if kind not in (Kind.INT, Kind.FLOAT):
                raise InvalidArgument(f"{where}: increment of {name!r} needs a number")
            spec = self.spec(name) or self.declare(name, kind)
            if spec.kind is Kind.FLOAT and kind is Kind.INT:
                value = float(value)  # one number type, as in JSON
            check_value(spec.kind, value, name)
            total = d.attrs.get(spec.id, 0) + value
            if spec.kind is Kind.INT and not INT64_MIN <= total <= INT64_MAX:
                raise InvalidArgument(f"{where}: increment overflows int64 for {name!r}")
            d.attrs[spec.id] = total
            return
        if op == SET or op == SET_ONCE:
            spec = self.spec(name)
            if spec is None:
                spec = self.declare(name, kind_of(value))
            # Fast path for the common scalar kinds; check_value covers the rest.
            vtype = type(value)
            if vtype is int and spec.kind is Kind.FLOAT:
                value, vtype = float(value), float  # one number type, as in JSON
            if vtype is str and spec.kind is Kind.STRING and len(value) <= MAX_STRING_BYTES // 4:
                stored: Any = value
            else:
                check_value(spec.kind, value, name)
                stored = to_stored(spec.kind, value)
            if op == SET_ONCE and spec.id in d.attrs:
                return
            if spec.kind is Kind.STRING_LIST and not stored:
                d.attrs.pop(spec.id, None)
            else:
                d.attrs[spec.id] = stored
            return
        raise InvalidArgument(f"{where}: unknown operation {op}")

    def link(self, d: _Draft, identifiers: Sequence[tuple[str, str]], where: str) -> list[str]:
        """Link identifiers to `d`, merging their owners into it; returns merged-away ids."""
        rules = self.e.rules
        merged: list[str] = []
        for i, (kind, value) in enumerate(identifiers):
            at = f"{where}[{i}]"
            check_identifier(kind, value, at)
            if rules.is_blocked(value):
                raise FailedPrecondition(
                    f"{at}: identifier value {brief(value)} is on the blocked list "
                    "(merge protection); nothing changed"
                )
            if self.e.suppressed:
                self.e.check_suppressed(claim_key(kind, value),
                                        f"{at}: identifier {kind}:{value!r}")
            key = ident_key(kind, value)
            owner = self.owner_of(kind, value, key)
            if owner is not None and owner != d.pid:
                other = self.draft(owner, create=False)
                if other is not None and other is not d:
                    self.merge_into(d, other)
                    merged.append(other.pid)
            if [kind, value] not in d.idents:
                d.idents.append([kind, value])
            self.idents[key] = d.pid
        counts = Counter(kind for kind, _ in d.idents)
        for kind, n in counts.items():
            if n > rules.max_per_kind:
                raise FailedPrecondition(
                    f"{where}: profile {brief(d.pid)} would hold {n} identifiers of kind "
                    f"{brief(kind)}, more than the limit of {rules.max_per_kind} (merge "
                    "protection); nothing changed"
                )
        return merged

    def merge_into(self, survivor: _Draft, other: _Draft) -> None:
        """Merge rules: see README "Identity resolution"."""
        for aid, value in other.attrs.items():
            spec = self.spec_by_id(aid)
            mine = survivor.attrs.get(aid)
            if mine is None:
                survivor.attrs[aid] = value
            elif spec.kind is Kind.EVENT_DAYS:  # counts of a day add
                survivor.attrs[aid] = days.merge(mine, value)
            elif spec.kind is Kind.STRING_LIST:
                survivor.attrs[aid] = sorted(set(mine) | set(value))
            elif spec.merge is Merge.SUM:
                total = mine + value
                if spec.kind is Kind.INT:
                    total = max(INT64_MIN, min(INT64_MAX, total))
                survivor.attrs[aid] = total
            elif spec.merge is Merge.MIN:
                survivor.attrs[aid] = min(mine, value)
            elif spec.merge is Merge.MAX:
                survivor.attrs[aid] = max(mine, value)
        for pair in other.idents:
            if pair not in survivor.idents:
                survivor.idents.append(pair)
            self.idents[ident_key(*pair)] = survivor.pid
        for pid in [other.pid, *other.merged]:
            if pid not in survivor.merged and pid != survivor.pid:
                survivor.merged.append(pid)
            self.aliases[pid] = survivor.pid
        # The survivor's version after a call that merged exceeds every version any merged
        # profile had: the call already counted one change on the survivor (its +1 comes
        # before its links), so this is max(survivor, other) + 1 over the whole call.
        survivor.version = max(survivor.version, other.version + 1)
        # The person is as old as the oldest profile merged into it (0: not known).
        known = [t for t in (self.created_of(survivor), self.created_of(other)) if t]
        if known:
            survivor.created = min(known)
        other.gone = True

    def created_of(self, d: _Draft) -> int:
        """When `d`'s profile was created (0: not known); a new one: now."""
        if d.created is not None:
            return d.created
        return self.at if d.dense is None else self.e.created_at(d.dense)

    def delete(self, d: _Draft) -> None:
        for pair in d.idents:
            self.idents[ident_key(*pair)] = None
        for pid in d.merged:
            self.aliases[pid] = None
        d.gone = True

    def finish(self, result: Any = None) -> Change:
        change = Change(schema=list(self.added), result=result, at=self.at)
        next_dense = len(self.e.blobs)
        live: list[Image] = []
        for d in self.drafts.values():
            if d.gone:
                if d.dense is not None:
                    change.images.append(Image(d.dense, d.pid, None))
                continue
            if d.dense is None:
                d.dense = next_dense
                next_dense += 1
            if d.created is not None:
                change.times[d.dense] = (d.created, self.at)
            live.append(Image(d.dense, d.pid, encode(d.version, d.attrs, d.idents, d.merged)))
        # Deletions first: a merged-away profile must leave the directory before the
        # survivor claims its identifiers.
        change.images.extend(live)
        return change


_COLUMN_TYPES: dict[Kind, set[type]] = {Kind.STRING: {str}, Kind.INT: {int}, Kind.FLOAT: {float},
                 Kind.BOOL: {bool}, Kind.STRING_LIST: {list},
                 Kind.TIMESTAMP: {datetime, msgpack.Timestamp}}


def _numbers(kind: Kind, values: list[Any]) -> np.ndarray | None:
    """A column of ints, floats or timestamps' int microseconds as the one array its blob
    pieces and its range index are both made from, if every value is valid; else None.
    (np.array refuses an int past int64 with OverflowError; the types are checked first,
    as it would take a bool or a float for an int.)"""
    if not set(map(type, values)) <= ({float, int} if kind is Kind.FLOAT else {int}):
        return None  # (an int for a float attribute is that float: one number type)
    try:
        array = np.array(values, dtype=np.float64 if kind is Kind.FLOAT else np.int64)
    except OverflowError:
        return None
    if kind is Kind.FLOAT:
        return None if np.isnan(array).any() else array
    if kind is Kind.TIMESTAMP and not (micros_in_range(int(array.min()))
                                       and micros_in_range(int(array.max()))):
        return None
    return array


def _micros_ok(values: list[Any]) -> bool:
    """True when every value is a timestamp's int microseconds within the readable range."""
    return _numbers(Kind.TIMESTAMP, values) is not None


def _already_sorted_sets(lists: list[list[str]]) -> bool:
    """True when every list is sorted without repeats (its stored form): one comparison per
    item and no Python frame per list, a third of what sorting each list costs."""
    items = list(chain.from_iterable(lists))
    if len(items) < 2:
        return True
    rising = np.fromiter(map(lt, items, islice(items, 1, None)), dtype=bool,
                         count=len(items) - 1)
    return _rises_in_rows(rising, np.fromiter(map(len, lists), dtype=np.int64,
                                              count=len(lists)))


def _plain(values: list[Any] | Coded | np.ndarray) -> list[Any] | np.ndarray:
    return values.decoded_held() if isinstance(values, Coded) else values


def _repeats(keys: np.ndarray) -> bool:
    """True when some key is there twice (sorting: 4x faster than np.unique's hash table
    at a load's few thousand keys)."""
    ordered = np.sort(keys)
    return bool((ordered[1:] == ordered[:-1]).any())


def _rises_in_rows(rising: np.ndarray, lengths: np.ndarray) -> bool:
    """True when `rising` (item i < item i + 1, over rows' items laid end to end, rows of
    `lengths` items) holds inside every row: a row's last item against the next row's
    first does not count."""
    last = np.cumsum(lengths) - 1
    rising[last[(last >= 0) & (last < len(rising))]] = True
    return bool(rising.all())


def _column_kinds(batch: Columns, declared: Mapping[str, AttributeSpec]
                  ) -> Iterator[tuple[str, Kind, bool, Merge]]:
    """What a columnar batch's columns would declare: a column's kind is its first
    value's (ints and floats: float; a `timestamps` column: timestamp)."""
    for name, column in batch.attributes.items():
        if name in declared:
            continue
        if name in batch.timestamps:
            kind = Kind.TIMESTAMP
        elif isinstance(column, Coded):
            if not column.holds().any():
                continue
            kind = Kind.STRING_LIST if column.lengths is not None else kind_of(column.first())
        else:
            present = [v for v in column if v is not None]
            if not present:
                continue
            try:
                kind = kind_of(present[0])
            except InvalidArgument:
                continue
            if kind is Kind.INT and float in set(map(type, present)):
                kind = Kind.FLOAT
        yield name, kind, True, Merge.DEFAULT


def _first_present(column: list[Any] | Coded) -> int:
    """Index of a column's first value (None: absent)."""
    if isinstance(column, Coded):
        holds = column.holds()
        return int(np.argmax(holds)) if holds.any() else len(holds)
    return next((i for i, v in enumerate(column) if v is not None), len(column))


def _coded_lists_ok(column: Coded) -> bool:
    """True when a coded column's lists are valid string lists: its dictionary holds only
    strings of a valid length, and no row holds too many."""
    assert column.lengths is not None
    return (_column_ok(Kind.STRING, column.values)
            and int(column.lengths.max()) <= MAX_LIST_ITEMS)


def _coded_sorted(column: Coded) -> bool:
    """True when every list of a coded column (of rows holding one) is sorted without
    repeats: the dictionary is, and each row's codes rise."""
    assert column.lengths is not None
    values = column.values
    return (all(map(lt, values, islice(values, 1, None)))
            and _rises_in_rows(np.diff(column.codes) > 0, column.lengths))


def _column_ok(kind: Kind, values: list[Any]) -> bool:
    """True when every value is valid for `kind`, checked a column at a time."""
    types = set(map(type, values))
    if not types <= _COLUMN_TYPES[kind]:
        return False
    if kind is Kind.STRING:
        return max(map(len, values)) <= MAX_STRING_BYTES // 4
    if kind is Kind.INT or kind is Kind.FLOAT:
        return _numbers(kind, values) is not None
    if kind is Kind.STRING_LIST:
        if max(map(len, values)) > MAX_LIST_ITEMS:
            return False
        items = list(chain.from_iterable(values))
        return not items or _column_ok(Kind.STRING, items)
    return True


def decision_slot(decision: list[Any]) -> int:
    """The slot of a merge decision [survivor id, committed]: its survivor's, or the slot
    itself where the survivor was erased since (plan_erase keeps no id)."""
    survivor = decision[0]
    return survivor if isinstance(survivor, int) else slot_of(survivor)


def id_key(pid: str) -> str:
    """The suppression key of a primary id (identifiers use claim_key: "kind:value")."""
    return "\x00" + pid


class Engine:
    def __init__(self, rules: IdentityRules | None = None,
                 clock: Callable[[], float] = time.time, salt: bytes = b"", *,
                 event_days: int = DEFAULT_EVENT_DAYS) -> None:
        self.rules = rules or IdentityRules()
        # Wall-clock seconds (injectable, so tests can roll days over): created and changed
        # times, and the `event_days` UTC days up to today that day records keep. The clock
        # only plans: what is kept is decided when a change is planned and logged with it.
        self.clock = clock
        # The cluster's salt for suppression keys and audit hashes (memstore.server.rights).
        self.salt = salt
        if event_days < 1:
            raise ValueError("event_days must be at least 1")
        self.event_days = event_days
        self.schema = Schema()
        self.pids: list[str | None] = []
        self.blobs: list[bytes | None] = []
        self.dense_of: dict[str, int] = {}
        self.live = BitMap()
        self.value_index: dict[int, ValueIndex] = {}
        self.range_index: dict[int, RangeIndex] = {}
        self.exists: dict[int, BitMap] = {}  # attributes in value indexes
        self.day_index: dict[int, DayIndex] = {}  # event.<name>.days attributes
        self.directory = IntTable()  # ident_key -> dense id
        self.aliases: dict[str, str] = {}
        # Each dense id's hash slot (stale once erased: read it through `live`). Appended
        # to by every new profile; scanned whole by the rare calls that ask by slot.
        self.slots = array.array("H")
        # Each dense id's created and last-changed time, unix seconds (0: not known).
        self.created = array.array("I")
        self.changed = array.array("I")
        # Cross-shard merges (shards/merge.py), keyed so they travel with slots on a move:
        self.held: dict[str, list[Any]] = {}  # loser pid -> [txn, survivor, since (unix s)]
        self.held_dense = BitMap()  # the held profiles: hidden from queries until released
        self.forwards: dict[str, str] = {}  # pid merged into a profile on another shard
        self.decided: dict[str, list[Any]] = {}  # txn -> [survivor pid, committed]
        self.claims = Claims()  # the cluster's identifier directory, for owned slots
        # The cluster's attribute declarations whose registry_key slots this shard owns:
        # name -> [kind, indexed, merge] (plan_register; shards/schema.py).
        self.registry: dict[str, list[Any]] = {}
        # Erased identifiers and ids on the blocked list (DeleteRequest.suppress): salted
        # hash (hashed) -> [slot of its claim key or primary id, since (unix s)].
        self.suppressed: dict[str, list[Any]] = {}
        self.segments = Segments()  # saved segments (memstore.engine.segments)
        # Set by the server while it plans a router's write: undeclared attributes refuse
        # the write (Undeclared) instead of being declared by its values here.
        self.cluster_schema = False
        # Slot ownership (cluster). None: this shard owns every slot. `foreign` holds live
        # profiles in slots it does not own (being moved in or out); queries skip them.
        self.owned_slots: BitMap | None = None
        self.foreign = BitMap()
        self.epoch = 0
        self.started = int(clock())  # unknown changed times count from here (expired)
        self._timestamp_ids: set[int] = set()  # caches for wire_attributes
        self._day_record_ids: set[int] = set()
        self._timestamp_count = -1
        self._table: dict[int, list[Any]] = {}  # cache for schema_table
        self._table_count = -1

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.live)

    def today(self) -> int:
        """Today's UTC day number (days since 1970-01-01) by the engine's clock."""
        return int(self.clock() // 86_400)

    def first_kept(self) -> int:
        """The first day day records keep: today and the event_days - 1 days before it."""
        return self.today() - self.event_days + 1

    def check_slot(self, pid: str) -> None:
        if self.owned_slots is not None:
            slot = slot_of(pid)
            if slot not in self.owned_slots:
                raise self._wrong_slot(slot, f"profile {brief(pid)}")

    def _wrong_slot(self, slot: int, what: str) -> WrongSlot:
        return WrongSlot(slot, self.epoch, f"slot {slot} of {what} is not owned by this "
                         f"shard (epoch {self.epoch})")

    def owner_dense(self, kind: str, value: str) -> int | None:
        """Dense id of the profile holding identifier (kind, value), if any."""
        dense = self.directory.get(ident_key(kind, value))
        if dense is None:
            return None
        blob = self.blobs[dense]
        if blob is None or [kind, value] not in decode(blob)[2]:
            raise FailedPrecondition(
                f"identifier {kind}:{brief(value)} collides with another identifier's hash; refused"
            )
        return dense

    def check_moving(self, pid: str) -> None:
        """Refuse a primary id held by a cross-shard merge or forwarded by one."""
        if pid in self.held:
            txn, survivor, since = self.held[pid]
            raise Held(pid, txn, survivor, max(0.0, time.time() - since))
        if pid in self.forwards and pid not in self.dense_of:
            raise Forwarded(pid, self.forwards[pid])

    def owners(self, identifiers: Sequence[Any]) -> list[str | None]:
        """The primary id holding each [kind, value] among profiles in owned slots (a held
        profile counts: it is still the owner until its merge ends). One vectorized probe
        for all of them (ShardControl.Owners: checking the directory against the profiles)."""
        if not (set(map(type, identifiers)) <= {list, tuple} and set(map(len, identifiers)) <= {2}
                and set(map(type, chain.from_iterable(identifiers))) <= {str}):
            for i, pair in enumerate(identifiers):
                if not (isinstance(pair, list | tuple) and len(pair) == 2
                        and isinstance(pair[0], str) and isinstance(pair[1], str)):
                    raise InvalidArgument(f"identifiers[{i}]: not a [kind, value] pair")
        out: list[str | None] = [None] * len(identifiers)
        if not identifiers:
            return out
        held = self.directory.get_many(ident_keys([p[0] for p in identifiers],
                                                  [p[1] for p in identifiers]))
        for i in np.flatnonzero(held >= 0).tolist():
            kind, value = identifiers[i]
            dense = self.owner_dense(kind, value)  # confirms the hit (a hash collision raises)
            if dense is not None and dense not in self.foreign:
                out[i] = self.pids[dense]
        return out

    def resolve(self, pid: str) -> int | None:
        if self.held or self.forwards:
            self.check_moving(self.aliases.get(pid, pid) if pid not in self.dense_of else pid)
        dense = self.dense_of.get(pid)
        if dense is None:
            survivor = self.aliases.get(pid)
            if survivor is not None:
                dense = self.dense_of.get(survivor)
        return dense

    def lookup(self, pid: str | None = None, identifier: tuple[str, str] | None = None
               ) -> int | None:
        if identifier is not None:
            check_identifier(identifier[0], identifier[1], "identifier")
            dense = self.owner_dense(*identifier)
            if dense is not None and self.held:
                self.check_moving(self.pids[dense])  # type: ignore[arg-type]
            return dense
        assert pid is not None
        check_pid(pid)
        return self.resolve(pid)

    def profile(self, dense: int, attributes: Sequence[str] = ()) -> Profile:
        pid = self.pids[dense]
        blob = self.blobs[dense]
        assert pid is not None and blob is not None
        version, attrs, idents, merged = decode(blob)
        return Profile(pid, version, self.named(attrs, attributes),
                       [(k, v) for k, v in idents], merged, slot_of(pid))

    def named(self, attrs: dict[int, Any], only: Sequence[str] = ()) -> dict[str, Any]:
        by_id = self.schema.by_id
        if only:
            out = {}
            for name in only:
                spec = self.schema.by_name.get(name)
                if spec is not None and spec.id in attrs and spec.kind is not Kind.EVENT_DAYS:
                    out[name] = from_stored(spec.kind, attrs[spec.id])
            return out
        result = {}
        for aid, value in attrs.items():
            spec = by_id[aid]
            if spec.kind is Kind.TIMESTAMP:
                value = from_stored(spec.kind, value)
            elif spec.kind is Kind.EVENT_DAYS:
                continue  # a day record: read through did(...), not returned as a value
            result[spec.name] = value
        return result

    def schema_table(self) -> dict[int, list[Any]]:
        """attribute id -> [name, kind number], for readers of stored profile encodings."""
        if self._table_count != len(self.schema.by_id):
            self._table = {s.id: [s.name, int(s.kind)] for s in self.schema.by_id}
            self._table_count = len(self.schema.by_id)
        return self._table

    def wire_attributes(self, attrs: dict[int, Any], only: Sequence[str] = ()) -> dict[str, Any]:
        """Attributes by name for msgpack replies: timestamps as msgpack Timestamps."""
        by_id = self.schema.by_id
        if only:
            wanted = [self.schema.by_name.get(n) for n in only]
            attrs = {s.id: attrs[s.id] for s in wanted if s is not None and s.id in attrs}
        out = {by_id[aid].name: value for aid, value in attrs.items()}
        if self._timestamp_count != len(by_id):
            self._timestamp_ids = {s.id for s in by_id if s.kind is Kind.TIMESTAMP}
            self._day_record_ids = {s.id for s in by_id if s.kind is Kind.EVENT_DAYS}
            self._timestamp_count = len(by_id)
        for aid in self._timestamp_ids.intersection(attrs):
            out[by_id[aid].name] = timestamp_ext(attrs[aid])
        for aid in self._day_record_ids.intersection(attrs):
            del out[by_id[aid].name]
        return out

    def ids_of(self, dense_ids: Iterable[int]) -> list[str]:
        pids = self.pids
        return [pids[d] for d in dense_ids]  # type: ignore[misc]

    # ------------------------------------------------------------------ cluster schema
    def require_declared(self, wanted: Iterable[tuple[str, Kind, bool, Merge]]) -> None:
        """For a router's write (cluster_schema): refuse it (Undeclared) if it would declare
        attributes here, naming all of them (the first proposal of each name), so that the
        router declares them as the cluster has them in one round. No-op otherwise."""
        if not self.cluster_schema:
            return
        by_name = self.schema.by_name
        missing: dict[str, list[Any]] = {}
        for name, kind, indexed, merge in wanted:
            if name not in by_name and name not in missing:
                missing[name] = [name, int(kind), indexed, int(merge)]
        if missing:
            raise Undeclared(list(missing.values()))

    def _declares_ops(self, specs: Iterable[UpsertSpec]
                      ) -> Iterator[tuple[str, Kind, bool, Merge]]:
        """What upserts' operations would declare (a bad value is the planner's to name)."""
        if not self.cluster_schema:
            return
        by_name = self.schema.by_name
        for spec in specs:
            for op, name, value in spec.ops:
                if op == UNSET or name in by_name:
                    continue
                if op in (ADD_TO_SET, REMOVE_FROM_SET):
                    yield name, Kind.STRING_LIST, True, Merge.DEFAULT
                else:
                    try:
                        yield name, kind_of(value), True, Merge.DEFAULT
                    except InvalidArgument:
                        continue

    # ------------------------------------------------------------------ planning
    def plan_batch(self, specs: Sequence[UpsertSpec], where: str = "requests",
                   numbers: Iterable[str] = ()) -> Change:
        """`numbers`: attributes a bulk load sends ints and floats for: new ones are floats
        (one number type, as in JSON), whichever record comes first."""
        numbers = list(numbers)
        self.require_declared(itertools.chain(
            ((name, Kind.FLOAT, True, Merge.DEFAULT) for name in numbers),
            self._declares_ops(specs)))
        planner = _Planner(self)
        for name in numbers:
            if planner.spec(name) is None:
                planner.declare(name, Kind.FLOAT)
        results = []
        for i, spec in enumerate(specs):
            at = spec.where or f"{where}[{i}]"
            try:
                results.append(self._plan_upsert(planner, spec, at))
            except MemstoreError as exc:
                exc.record = i  # which record refused the batch (RECORD_TRAILER)
                raise
        return planner.finish(results)

    def plan_load(self, rows: Sequence[Row], where: str = "packed") -> Change:
        """Plan a bulk load of (id, flat attributes, identifiers) rows with set semantics."""
        return self.plan_columns(Columns.from_rows(rows, where), where)

    def plan_columns(self, batch: Columns, where: str = "columns") -> Change:
        """Plan a bulk load of a columnar batch with set semantics.

        The load path: when every row is a new profile whose identifiers belong to nobody,
        validation runs column by column (one type check per attribute per batch, not per
        value), blobs are built a column at a time (memstore.engine.rowpack; a coded column is
        never decoded value by value), and the Change carries the checked columns so
        `apply` indexes them without taking the blobs apart again. Any row that touches
        existing state (an existing id, an owned identifier, an alias), or any value the
        column checks refuse, sends the whole batch through the general planner, which gives
        the same result (or the error naming the row and attribute) more slowly.
        """
        def general() -> Change:
            return self.plan_batch(record_specs(batch.rows(where), where), numbers=[
                name for name, column in batch.attributes.items()
                if isinstance(column, list) and {int, float} <= set(map(type, column))])

        self.require_declared(_column_kinds(batch, self.schema.by_name)
                              if self.cluster_schema else ())
        ids = batch.ids
        n = len(ids)
        if len(set(ids)) != n:
            return general()
        # Anything the general planner would refuse goes to it, so the batch gets the error
        # it gives (the first bad record's, in record order), not one of the fast path's.
        if ids and (not min(map(len, ids)) or max(map(len, ids)) > MAX_ID_BYTES // 4):
            return general()  # an empty id, or one that may be too long in utf-8
        if (any(map(self.dense_of.__contains__, ids)) or any(map(self.aliases.__contains__, ids))
                or any(map(self.forwards.__contains__, ids))):
            return general()
        if self.suppressed and self._names_suppressed(batch):
            return general()  # which refuses the record naming it
        slots = slots_of(ids)
        if self.owned_slots is not None and not self.owned_slots.issuperset(BitMap(slots)):
            return general()  # WrongSlot
        first = len(self.blobs)
        rules = self.rules
        pairs = [(first + i, kind, value) for i, idents in enumerate(batch.identifiers)
                 for kind, value in idents]
        owners = [p[0] for p in pairs]
        kinds = [p[1] for p in pairs]
        values = [p[2] for p in pairs]
        if pairs and (not min(map(len, values))
                      or max(map(len, values)) > MAX_IDENTIFIER_BYTES // 4
                      or not all(map(_IDENT_KIND.match, set(kinds)))
                      or not rules.blocked.isdisjoint(map(str.lower, map(str.strip, values)))):
            return general()
        if any(len(idents) > rules.max_per_kind
               and max(Counter(k for k, _ in idents).values()) > rules.max_per_kind
               for idents in batch.identifiers):
            return general()
        # Identifiers named twice, or held by some profile here: one vectorized probe.
        keys = ident_keys(kinds, values)
        if keys.size and (_repeats(keys) or (self.directory.find_many(keys) >= 0).any()):
            return general()
        planner = _Planner(self)
        indexed: list[tuple[int, Sequence[int], list[Any] | Coded | np.ndarray]] = []
        dense_ids = range(first, first + n)
        blobs = RowPacker(n)
        # Declared in the order the general planner meets them: by first record, then name order.
        named = sorted(batch.attributes.items(), key=lambda item: _first_present(item[1]))
        try:
            for name, column in named:
                held: list[Any] | Coded | np.ndarray  # the values of the rows holding one,
                if isinstance(column, Coded):  # coded while no check needs them decoded
                    rows, held = column.held()
                    if not held.codes.size:
                        continue
                else:
                    held, rows = column, None  # rows: which rows hold a value (None: all)
                    if None in column:
                        mask = list(map(is_not, column, repeat(None)))
                        held = list(compress(column, mask))
                        rows = list(compress(range(n), mask))
                    if not held:
                        continue
                micros = name in batch.timestamps  # int microseconds, see memstore.engine.columnar
                sent = Kind.TIMESTAMP if micros else kind_of(
                    held.first() if isinstance(held, Coded) else held[0])
                if sent is Kind.INT and isinstance(held, list) and float in set(map(type, held)):
                    sent = Kind.FLOAT  # ints and floats: numbers, as in JSON
                spec = planner.spec(name) or planner.declare(name, sent)
                numeric = spec.kind is sent or (spec.kind is Kind.FLOAT and sent is Kind.INT)
                if isinstance(held, Coded) and held.lengths is not None:
                    if not (spec.kind is Kind.STRING_LIST and not micros
                            and _coded_lists_ok(held)):
                        return general()
                elif (isinstance(held, list) and numeric and spec.kind in RANGE_KINDS
                      and (micros or spec.kind is not Kind.TIMESTAMP)):
                    numbers = _numbers(spec.kind, held)  # checked, and converted once
                    if numbers is None:
                        return general()
                    held = numbers
                else:  # a coded column's dictionary holds every value it sends
                    checked = held.values if isinstance(held, Coded) else held
                    if not (_micros_ok(checked) if micros and spec.kind is sent
                            else not micros and _column_ok(spec.kind, checked)):
                        return general()
                if spec.kind is Kind.TIMESTAMP and not micros:
                    held = [to_stored(Kind.TIMESTAMP, v) for v in _plain(held)]
                    if not _micros_ok(held):
                        return general()
                elif (spec.kind is Kind.STRING_LIST and isinstance(held, Coded)
                      and (held.lengths is None or not _coded_sorted(held))):
                    held = held.decoded_held()  # a list a code; lists not sorted
                if spec.kind is Kind.STRING_LIST and isinstance(held, list):
                    # stored sorted, and an empty list means absent
                    if not _already_sorted_sets(held):
                        held = list(map(sorted, map(set, held)))  # the Python client
                    if not all(held):  # sends them sorted (and codes no empty list)
                        keep = list(map(bool, held))
                        rows = list(compress(range(n) if rows is None else rows, keep))
                        held = list(compress(held, keep))
                        if not held:
                            continue
                if isinstance(held, Coded):
                    blobs.add_coded(spec.id, held, rows)
                else:
                    blobs.add(spec.id, spec.kind, held, rows)
                if spec.indexed:  # a range index takes plain values; a value index either
                    indexed.append((spec.id, dense_ids if rows is None
                                    else list(map(first.__add__, rows)),
                                    _plain(held) if spec.kind in RANGE_KINDS else held))
        except InvalidArgument:
            return general()  # it names the row and attribute
        change = Change(schema=list(planner.added))
        change.images = list(map(tuple.__new__, repeat(Image),
                                 zip(dense_ids, ids, blobs.pack(batch.identifiers),
                                     repeat(None))))
        change.result = [(pid, True) for pid in ids]
        change.load = Load(first, slots, keys, owners, indexed)
        return change

    def plan_upsert(self, spec: UpsertSpec) -> Change:
        self.require_declared(self._declares_ops([spec]))
        planner = _Planner(self)
        result = self._plan_upsert(planner, spec, "")
        return planner.finish(result)

    def _plan_upsert(self, planner: _Planner, spec: UpsertSpec, at: str) -> tuple[str, bool]:
        check_pid(spec.pid, f"{at}.id" if at else "id")
        d = planner.draft(spec.pid, create=True)
        assert d is not None
        created = d.dense is None and d.version == 0
        if spec.expected_version is not None and d.version != spec.expected_version:
            raise FailedPrecondition(
                f"{at or 'upsert'}: profile {spec.pid!r} is at version {d.version}, "
                f"expected {spec.expected_version}"
            )
        for j, (op, name, value) in enumerate(spec.ops):
            if spec.record:
                where = f"{at}.attributes.{name}"
            else:
                where = f"{at}.operations[{j}]" if at else f"operations[{j}]"
            try:
                planner.apply_op(d, op, name, value, where)
            except InvalidArgument as exc:
                message = str(exc)
                raise InvalidArgument(message if message.startswith(where)
                                      else f"{where}: {message}") from None
        d.version += 1
        if spec.identifiers:
            planner.link(d, spec.identifiers, f"{at}.identifiers" if at else "identifiers")
        return d.pid, created

    def plan_link(self, pid: str, identifiers: Sequence[tuple[str, str]], create: bool = False
                  ) -> Change:
        planner = _Planner(self)
        return planner.finish(self._plan_link(planner, pid, identifiers, create))

    def _plan_link(self, planner: _Planner, pid: str, identifiers: Sequence[tuple[str, str]],
                   create: bool) -> tuple[str, list[str]]:
        check_pid(pid)
        if not identifiers:
            raise InvalidArgument("identifiers: nothing to link")
        d = planner.draft(pid, create=create)
        if d is None:
            raise NotFound(f"profile {brief(pid)} not found (pass create to make it)")
        d.version += 1  # the call is one change; merges below raise it past the merged
        merged = planner.link(d, identifiers, "identifiers")
        return d.pid, merged

    # ------------------------------------------------------------------ cross-shard merges
    # The protocol and its crash cases are in shards/merge.py; these plan each shard's part.
    def plan_hold(self, loser: str, txn: str, survivor: str) -> Change:
        """Freeze `loser` for merge `txn`; the result is its portable export (see
        HoldResponse). Holding it again for the same transaction is a no-op."""
        check_pid(loser, "loser")
        check_pid(survivor, "survivor")
        self.check_slot(loser)
        held = self.held.get(loser)
        if held is not None and held[0] == txn:
            return Change(result=self.export_profile(self.dense_of[loser]))
        self.check_moving(loser)
        dense = self.dense_of.get(loser)
        if dense is None:
            raise NotFound(f"profile {brief(loser)} not found (merged or deleted meanwhile?)")
        return Change(notes=[Note("held", loser, [txn, survivor, time.time()])],
                      result=self.export_profile(dense))

    def export_profile(self, dense: int) -> dict[str, Any]:
        """One profile with attribute names and kinds: attribute ids are shard-local."""
        version, attrs, idents, merged = decode(self.blobs[dense])  # type: ignore[arg-type]
        by_id = self.schema.by_id
        return {"schema": [[by_id[a].name, int(by_id[a].kind), by_id[a].indexed,
                            int(by_id[a].merge)] for a in attrs],
                "profile": [self.pids[dense], version,
                            {by_id[a].name: v for a, v in attrs.items()}, idents, merged],
                "times": [self.created_at(dense), self.changed[dense]]}

    def plan_absorb(self, txn: str, losers: Sequence[dict[str, Any]],
                    upsert: UpsertSpec | None = None,
                    link: tuple[str, Sequence[tuple[str, str]], bool] | None = None) -> Change:
        """The commit point of merge `txn`: the held `losers` (export_profile maps from
        their shards) become drafts owning their identifiers, the caller's upsert or link
        merges them in, and the same change records `txn` as committed."""
        if txn in self.decided:
            outcome = "committed" if self.decided[txn][1] else "aborted"
            raise FailedPrecondition(f"merge {txn} was already {outcome}; not applied again")
        self.require_declared(itertools.chain(
            ((name, Kind(kind), bool(indexed), Merge(merge))
             for exported in losers for name, kind, indexed, merge in exported["schema"]),
            self._declares_ops([upsert] if upsert is not None else [])))
        planner = _Planner(self)
        seeded: list[tuple[_Draft, list[int]]] = []
        for n, exported in enumerate(losers):
            pid, version, named, idents, merged = exported["profile"]
            attrs: dict[int, Any] = {}
            for name, kind, indexed, merge in exported["schema"]:
                try:
                    spec = planner.declare(name, Kind(kind), indexed, Merge(merge))
                except InvalidArgument as exc:
                    raise FailedPrecondition(f"losers[{n}]: profile {brief(pid)} cannot merge "
                                             f"here: {exc}") from None
                attrs[spec.id] = named[name]
            draft = _Draft(pid, None, [version, attrs, [list(i) for i in idents], list(merged)])
            draft.created = (exported.get("times") or [0])[0] or None  # older shards: none
            seeded.append((draft, [ident_key(k, v) for k, v in idents]))
        owners_here: list[str] = []
        for draft, keys in seeded:
            for (kind, value), key in zip(draft.idents, keys, strict=True):
                # An identifier that a profile here holds too (two first links racing on two
                # shards): that profile joins the merge, so the identifier has one owner.
                owner = planner.owner_of(kind, value, key)
                if owner is not None and owner not in owners_here:
                    owners_here.append(owner)
            planner.drafts[draft.pid] = draft
            for key in keys:
                planner.idents[key] = draft.pid
        if upsert is not None:
            result: Any = self._plan_upsert(planner, upsert, "")
        elif link is not None:
            result = self._plan_link(planner, *link)
        else:
            raise InvalidArgument("request: an upsert or a link is required")
        named = upsert.pid if upsert is not None else link[0]  # type: ignore[index]
        target = planner.drafts[planner.resolve_pid(named)]
        for owner in owners_here:
            other = planner.draft(owner, create=False)
            if other is not None and other is not target and not other.gone:
                planner.merge_into(target, other)
        for draft, _ in seeded:
            if not draft.gone:
                raise FailedPrecondition(f"merge {txn}: the request does not link any "
                                         f"identifier of {brief(draft.pid)}; nothing to merge")
        change = planner.finish(result)
        # Keyed by the id the coordinator named, which is where Decide will ask (its slot
        # carries the decision on a move), even when that id is an alias here.
        change.notes.append(Note("decided", txn, [named, True]))
        return change

    def plan_decide(self, txn: str, survivor: str) -> Change:
        """The outcome of merge `txn`: committed if absorbed here, else recorded as aborted
        so that a late Absorb is refused. The result is True for committed."""
        self.check_slot(survivor)
        if txn in self.decided:
            return Change(result=bool(self.decided[txn][1]))
        return Change(notes=[Note("decided", txn, [survivor, False])], result=False)

    def plan_release(self, loser: str, txn: str, committed: bool) -> Change:
        """End the hold of merge `txn` on `loser`: committed, the loser goes and every id
        that resolved to it forwards to the survivor; aborted, it is visible again.
        The result is False when there was no such hold (released already)."""
        held = self.held.get(loser)
        if held is None or held[0] != txn:
            return Change(result=False)
        notes = [Note("held", loser, None)]
        if not committed:
            return Change(notes=notes, result=True)
        survivor = held[1]
        planner = _Planner(self)
        dense = self.dense_of[loser]
        d = _Draft(loser, dense, decode(self.blobs[dense]))  # type: ignore[arg-type]
        planner.drafts[loser] = d
        planner.delete(d)
        change = planner.finish(True)
        change.notes = notes + [Note("forwards", pid, survivor) for pid in [loser, *d.merged]]
        return change

    def plan_forget(self, pids: Iterable[str], txns: Iterable[str] = (),
                    reforward: Iterable[tuple[str, str, str]] = ()) -> Change:
        """Erase the forwards of `pids` (ids merged into a survivor since deleted) and the
        decisions of finished merges `txns` (every loser released); repoint each forward
        (id, from, to) that still goes to `from` (merged into `to` since) to `to`."""
        notes = [Note("forwards", pid, None) for pid in dict.fromkeys(pids)
                 if pid in self.forwards]
        notes += [Note("decided", txn, None) for txn in dict.fromkeys(txns)
                  if txn in self.decided]
        for pid, old, new in reforward:
            check_pid(pid, "reforward.id")
            check_pid(new, "reforward.to")
            if self.forwards.get(pid) == old and pid not in self.dense_of and pid != new:
                notes.append(Note("forwards", pid, new))
        return Change(notes=notes, result=0)

    def notes_in_slots(self, slots: BitMap) -> dict[str, dict[str, Any]]:
        """The forwards, decisions, claims and registered attributes of `slots` (a slot move
        carries them along)."""
        return {"forwards": {p: s for p, s in self.forwards.items() if slot_of(p) in slots},
                "decided": {t: v for t, v in self.decided.items() if decision_slot(v) in slots},
                "claims": self.claims.in_slots(slots),
                "registry": {n: v for n, v in self.registry.items()
                             if slot_of(registry_key(n)) in slots},
                "suppressed": {h: v for h, v in self.suppressed.items() if v[0] in slots}}

    # ------------------------------------------------------------------ cluster schema
    def plan_register(self, specs: Sequence[tuple[str, Kind, bool, Merge]]) -> Change:
        """Register attribute declarations in the cluster's registry (the part this shard
        keeps): a name registered already keeps its declaration, a new one takes the one
        proposed. The result is the registry's [kind, indexed, merge] for each, in order:
        the cluster's declaration, whoever proposed first."""
        notes: list[Note] = []
        answers: list[list[Any]] = []
        mine: dict[str, list[Any]] = {}
        for i, (name, kind, indexed, merge) in enumerate(specs):
            try:
                check_name(name)
                check_merge(name, kind, merge)
            except InvalidArgument as exc:
                raise InvalidArgument(f"attributes[{i}]: {exc}") from None
            slot = slot_of(registry_key(name))
            if self.owned_slots is not None and slot not in self.owned_slots:
                raise self._wrong_slot(slot, f"attribute {brief(name)}")
            found = mine.get(name) or self.registry.get(name)
            if found is None:
                found = mine[name] = [int(kind), bool(indexed), int(merge)]
                notes.append(Note("registry", name, found))
            answers.append(found)
        return Change(notes=notes, result=answers)

    # ------------------------------------------------------------------ saved segments
    def plan_create_segment(self, name: str, node: Node, created_at: int) -> Change:
        """Define saved segment `name`: its first members enter it (watchers of every
        segment see them). The same definition again is a no-op; another one under the name
        is refused."""
        problem = segment_problem(name)
        if problem is not None:
            raise InvalidArgument(f"name: {problem}")
        text = format_query(node)
        existing = self.segments.get(name)
        if existing is not None:
            if existing.text == text:
                return Change(result=name)
            raise FailedPrecondition(f"segment {name!r} exists with another query: "
                                     f"{existing.text}; delete it first")
        if len(self.segments) >= MAX_SEGMENTS:
            raise FailedPrecondition(f"at most {MAX_SEGMENTS} saved segments")
        self.segments.check_definition(name, node)
        from memstore.query.evaluate import evaluate

        evaluate(self, node, unknown_is_empty=True, within=BitMap())  # literals' kinds
        return Change(notes=[Note("segments", name, [text, created_at])], rebuild=[name],
                      result=name)

    def plan_delete_segment(self, name: str) -> Change:
        """Forget saved segment `name` (its members leave it); refused while another
        segment reads it."""
        segment = self.segments.get(name)
        if segment is None:
            return Change(result=False)
        readers = sorted(s.name for s in self.segments.by_name.values() if name in s.depends)
        if readers:
            raise FailedPrecondition(f"segment {name!r} is read by {', '.join(readers)}: "
                                     "delete those first")
        return Change(notes=[Note("segments", name, None)], result=True)

    # ------------------------------------------------------------------ directory
    def plan_claims(self, entries: Sequence[Any]) -> Change:
        """Read, make, take over or release claims (ClaimRequest has the entry forms).
        The result is [holder or None, age in seconds, created, blocked] per entry, after
        it. A value on the blocked list is never claimed (`blocked`): no profile may hold
        it, so the write naming it is refused by its own shard, naming the record."""
        kinds, values, pids, expected = _claim_columns(entries)
        keys = list(map(claim_key, kinds, values))
        slots = list(map(slot_of, keys))
        owned = self.owned_slots
        if owned is not None and not owned.issuperset(BitMap(slots)):
            i = next(i for i, slot in enumerate(slots) if slot not in owned)
            raise self._wrong_slot(slots[i], f"identifier {kinds[i]}:{brief(values[i])}")
        now = time.monotonic()
        claims = self.claims
        after: dict[str, str | None] = {}  # this plan's own claims so far
        notes: list[Note] = []
        answers: list[list[Any]] = []
        blocked = self.rules.is_blocked
        suppressed = self.suppressed
        for key, slot, pid, old, value in zip(keys, slots, pids, expected, values):
            if pid is not None and blocked(value):
                answers.append([None, 0.0, False, True, False])
                continue
            if pid is not None and suppressed and self.hashed(key) in suppressed:
                answers.append([None, 0.0, False, False, True])
                continue
            if key in after:
                holder = before = after[key]
            else:
                holder = before = claims.get_in(slot, key)
            created = False
            if pid is not None and holder != pid and holder in (None, old):
                holder, created = pid, True
            elif pid is None and old is not None and holder == old:
                holder = None
            if holder != before:
                after[key] = holder
                notes.append(Note("claims", key, holder))
            # A claim this plan sets is made now (applying it sets its age, see Claims.swap).
            fresh = holder is None or key in after
            answers.append([holder, 0.0 if fresh else claims.age(key, now), created, False,
                            False])
        return Change(notes=notes, result=answers)

    def plan_delete(self, pid: str | None = None, identifier: tuple[str, str] | None = None,
                    suppress: bool = False) -> Change:
        """Erase the profile of `pid` or `identifier`; the result is its primary id (None:
        there is none). See plan_erase."""
        dense = self.lookup(pid, identifier)
        if dense is None:
            return Change(result=None)
        change = self.plan_erase([dense], suppress)
        change.result = self.pids[dense]
        return change

    def plan_erase(self, dense_ids: Iterable[int], suppress: bool = False) -> Change:
        """Erase the profiles `dense_ids` (live, owned, not held by a merge; others are
        skipped): attributes, identifiers, the ids merged into them, the forwards of those
        ids kept here, and the survivor's id in the decisions of merges into them (kept as
        its slot). With `suppress`, the salted hashes of their ids and identifiers whose
        slots this shard owns go on the suppression list (the router sends the rest to
        the shards owning theirs: Suppress). The result is [(id, merged ids, identifiers)]
        of the profiles erased."""
        planner = _Planner(self)
        erased: list[tuple[str, list[str], list[list[str]]]] = []
        for dense in dense_ids:
            owner = self.pids[dense]
            if (owner is None or self.blobs[dense] is None or dense in self.foreign
                    or owner in self.held or owner in planner.drafts):
                continue
            d = planner.draft(owner, create=False)
            assert d is not None
            erased.append((owner, list(d.merged), [list(i) for i in d.idents]))
            planner.delete(d)
        change = planner.finish(erased)
        gone = {pid for pid, merged, _ in erased for pid in (pid, *merged)}
        # Ids merged into them from another shard may have left forwards here too (a chain
        # that came back to this shard): they go with them, as their aliases do.
        change.notes = [Note("forwards", m, None) for m in sorted(gone) if m in self.forwards]
        change.notes += [Note("decided", txn, [slot_of(v[0]), v[1]])
                         for txn, v in self.decided.items() if v[0] in gone]
        if suppress:
            keys = [id_key(p) for p in sorted(gone)]
            keys += [claim_key(k, v) for _, _, idents in erased for k, v in idents]
            change.notes += self.suppression_notes(keys, owned_only=True)
        return change

    # ------------------------------------------------------------------ data rights
    def hashed(self, text: str) -> str:
        """The salted hash of an id or an identifier's claim key: what suppression and
        audit lines keep instead of the text (keyed BLAKE2b, 128 bits, hex)."""
        return hashlib.blake2b(text.encode(), key=self.salt[:64],
                               digest_size=16).hexdigest()

    def check_suppressed(self, key: str, what: str) -> None:
        if self.hashed(key) in self.suppressed:
            raise FailedPrecondition(f"{what} was erased with suppression (the blocked list "
                                     "of erased people); refused")

    def suppression_notes(self, keys: Iterable[str], owned_only: bool = False) -> list[Note]:
        """Notes putting `keys` (id_key or claim_key texts) on the suppression list; those
        in slots this shard does not own are skipped (`owned_only`) or refused (WrongSlot)."""
        notes: list[Note] = []
        now = int(self.clock())
        for key in dict.fromkeys(keys):
            slot = slot_of(key.removeprefix("\x00"))
            if self.owned_slots is not None and slot not in self.owned_slots:
                if owned_only:
                    continue
                raise self._wrong_slot(slot, "a suppression entry")
            hashed = self.hashed(key)
            if hashed not in self.suppressed:
                notes.append(Note("suppressed", hashed, [slot, now]))
        return notes

    def plan_suppress(self, identifiers: Sequence[Any], pids: Sequence[str]) -> Change:
        """Put identifiers ([kind, value]) and primary ids on the suppression list (their
        slots must be owned here). The result is how many were new."""
        for i, pair in enumerate(identifiers):
            if not (isinstance(pair, list | tuple) and len(pair) == 2
                    and all(isinstance(x, str) for x in pair)):
                raise InvalidArgument(f"identifiers[{i}]: not a [kind, value] pair")
            check_identifier(pair[0], pair[1], f"identifiers[{i}]")
        for i, pid in enumerate(pids):
            check_pid(pid, f"ids[{i}]")
        notes = self.suppression_notes([claim_key(k, v) for k, v in identifiers]
                                       + [id_key(p) for p in pids])
        return Change(notes=notes, result=len(notes))

    def _names_suppressed(self, batch: Columns) -> bool:
        """True when a load's batch names a suppressed id or identifier."""
        hashed, suppressed = self.hashed, self.suppressed
        return (any(hashed(id_key(pid)) in suppressed for pid in batch.ids)
                or any(hashed(claim_key(k, v)) in suppressed
                       for idents in batch.identifiers for k, v in idents))

    def created_at(self, dense: int) -> int:
        return self.created[dense] if dense < len(self.created) else 0

    def expired(self, cutoff: int, kinds: Sequence[str], start: int, limit: int,
                budget: int = 2000, span: int = 1 << 16) -> tuple[list[int], int | None]:
        """Anonymous profiles unchanged since `cutoff` (unix seconds): live, owned, not held,
        holding at least one identifier and only identifiers of `kinds`. Looks at dense ids
        from `start`, at most `span` of them and `budget` profile decodes (a caller between
        requests: a few milliseconds), and returns at most `limit` of them with where to go
        on (None: the end). A profile whose changed time is not known (written before
        memstore kept it) counts as changed when this process started."""
        end = min(len(self.blobs), start + span)
        if start >= end:
            return [], None
        changed = np.frombuffer(self.changed, dtype=np.uint32)[start:end]
        stamps = np.where(changed == 0, np.uint32(self.started), changed)
        picked = (np.flatnonzero(stamps < cutoff) + start).tolist()
        del changed, stamps  # no view of the array may outlive this call (it grows)
        found: list[int] = []
        allowed = set(kinds)
        hidden = self.foreign | self.held_dense
        blobs = self.blobs
        for n, dense in enumerate(picked):
            if len(found) >= limit or n >= budget:
                return found, dense
            blob = blobs[dense]
            if blob is None or dense in hidden:
                continue
            idents = decode(blob)[2]
            if idents and all(kind in allowed for kind, _ in idents):
                found.append(dense)
        return found, (end if end < len(self.blobs) else None)

    def plan_track(self, pid: str, event: str, at_micros: int, count: int = 1) -> Change:
        """One event (memstore.engine.tracking); the result is the profile's new version."""
        from memstore.engine.tracking import plan_track

        return plan_track(self, [(pid, event, at_micros, count)])

    def plan_track_batch(self, events: Sequence[tuple[Any, str, int, int]],
                         where: str = "events") -> Change:
        """Many events as one change (TrackBatch): keys are primary ids or (kind, value)
        identifiers; the result is how many applied (all: a bad event refuses them all)."""
        from memstore.engine.tracking import plan_track

        return plan_track(self, events, where)

    def plan_expire(self, limit: int = 500) -> Change:
        """A slice of the day-record expiry (memstore.engine.tracking.plan_expire)."""
        from memstore.engine.tracking import plan_expire

        return plan_expire(self, limit)

    def plan_declare(self, specs: Sequence[tuple[str, Kind, bool, Merge]]) -> Change:
        planner = _Planner(self)
        for i, (name, kind, indexed, merge) in enumerate(specs):
            try:
                existing = self.schema.plan(name, kind, indexed, merge)
            except InvalidArgument as exc:
                raise InvalidArgument(f"attributes[{i}]: {exc}") from None
            if existing is not None and planner.spec(name) is None:
                planner.declare(name, kind, indexed, merge, explicit=True)
        return planner.finish()

    # ------------------------------------------------------------------ applying
    def apply(self, change: Change, touched: Touched | None = None) -> Undo:
        """Apply `change`; returns what undoes it (Engine.undo). `touched` collects what it
        did to which profiles (for saved segments and change streams)."""
        declared: list[AttributeSpec] = []
        for spec in change.schema:
            if spec.id == len(self.schema.by_id):
                self.add_attribute(spec)
                declared.append(spec)
        notes = self.apply_notes(change.notes) if change.notes else []
        at = change.at or int(self.clock())
        if change.load is not None and change.load.first == len(self.blobs):
            added = self._apply_load(change.images, change.load, at)
            if touched is not None:
                first = change.load.first
                touched.created_with(range(first, first + len(change.images)),
                                     [aid for aid, _, _ in change.load.columns])
            return Undo([], notes, added, schema=declared)
        if change.tracked is not None and change.tracked.first == len(self.blobs):
            undo = self._apply_tracked(change.images, change.tracked, at, touched)
            undo.notes, undo.schema = notes, declared
            return undo
        stamped: list[tuple[int, int, int]] = []
        return Undo(self.apply_images(change.images, at, change.times, stamped, touched), notes,
                    times=stamped, schema=declared)

    def _apply_tracked(self, images: list[Image], tracked: Any, at: int,
                       touched: Touched | None = None) -> Undo:
        """apply_images for a planned batch of tracks (memstore.engine.tracking.Tracked):
        blobs swapped, new profiles added at the end, indexes changed a column at a time;
        every profile stamped as changed at `at` (new ones as created then too)."""
        first, added = tracked.first, len(tracked.slots)
        kept = len(images) - added
        before = [Image(image.dense, image.pid, self.blobs[image.dense])
                  for image in images[:kept]]
        created, changed = self.created, self.changed
        stamped: list[tuple[int, int, int]] = []
        for image in images[:kept]:
            dense = image.dense
            self.blobs[dense] = image.blob
            stamped.append((dense, created[dense], changed[dense]))
            changed[dense] = at
        pids = [image.pid for image in images[kept:]]
        if added:
            self.blobs.extend(image.blob for image in images[kept:])
            self.pids.extend(pids)
            stamps = array.array("I", [at]) * added
            created.extend(stamps)
            changed.extend(stamps)
            self.dense_of.update(zip(pids, range(first, first + added), strict=True))
            self.live.add_range(first, first + added)
            self.slots.extend(tracked.slots)
        for aid, (ids, old, had, new) in tracked.ranges.items():
            self.range_index[aid].replace_many(ids, old, had, new)
        for aid, (ids, on, was, now) in tracked.cells.items():
            self.day_index[aid].bump_many(ids, on, was, now)
        if touched is not None:  # which attributes each profile's events changed
            diffs: dict[int, list[int]] = {}
            for columns in (tracked.ranges, tracked.cells):
                for aid, (ids, *_) in columns.items():
                    for dense in dict.fromkeys(ids.tolist()):
                        diffs.setdefault(dense, []).append(aid)
            for dense, aids in diffs.items():
                if dense < first:
                    touched.update(dense, aids, [])
                else:
                    touched.created_with((dense,), aids)
        before.reverse()
        return Undo(before, [], (first, pids) if added else None, times=stamped)

    def undo(self, undo: Undo) -> None:
        if undo.added is not None:  # the load's profiles become absent again, newest first
            first, pids = undo.added
            self.apply_images(map(Image._make, zip(reversed(range(first, first + len(pids))),
                                                   reversed(pids), repeat(None), repeat(None))))
        self.apply_images(undo.images)
        for dense, created, changed in reversed(undo.times):
            self.created[dense], self.changed[dense] = created, changed
        self.apply_notes(undo.notes)
        for spec in reversed(undo.schema):  # declared by the change: the newest ids
            self.schema.drop_last(spec)
            self.range_index.pop(spec.id, None)
            self.value_index.pop(spec.id, None)
            self.exists.pop(spec.id, None)
            self.day_index.pop(spec.id, None)

    def apply_notes(self, notes: Iterable[Note]) -> list[Note]:
        """Set or remove merge-table entries; returns the notes that undo them (in order)."""
        before: list[Note] = []
        for note in notes:
            if note.table == "claims":
                before.append(Note("claims", note.key, self.claims.swap(note.key, note.value)))
                continue
            if note.table == "segments":
                before.append(Note("segments", note.key,
                                   self.segments.set_definition(note.key, note.value)))
                continue
            table: dict[str, Any] = getattr(self, note.table)
            before.append(Note(note.table, note.key, table.get(note.key)))
            if note.value is None:
                table.pop(note.key, None)
            else:
                table[note.key] = note.value
            if note.table == "held":
                dense = self.dense_of.get(note.key)
                if dense is not None:
                    if note.value is None:
                        self.held_dense.discard(dense)
                    else:
                        self.held_dense.add(dense)
        before.reverse()
        return before

    def add_attribute(self, spec: AttributeSpec) -> None:
        self.schema.add(spec)
        if spec.indexed:
            if spec.kind in RANGE_KINDS:
                self.range_index[spec.id] = RangeIndex()
            elif spec.kind is Kind.EVENT_DAYS:
                self.day_index[spec.id] = DayIndex()
            else:
                self.value_index[spec.id] = ValueIndex()
                self.exists[spec.id] = BitMap()

    def apply_images(self, images: Iterable[Image], at: int | None = None,
                     times: Mapping[int, tuple[int, int]] | None = None,
                     stamped: list[tuple[int, int, int]] | None = None,
                     touched: Touched | None = None) -> list[Image]:
        """Apply after-images; with `at`, stamp each as changed then (and a new profile as
        created then), or as `times` says, adding the times replaced to `stamped`. Without
        (undo, records from before times were logged), times stay as they are, but an
        erased profile's are cleared. `touched` collects what it did to which profiles
        (for saved segments and change streams)."""
        before: list[Image] = []
        fresh: list[tuple[int, dict[int, Any]]] = []
        fresh_keys: list[int] = []  # identifiers of new profiles, entered at the end
        fresh_owners: list[int] = []
        created, changed = self.created, self.changed
        for image in images:
            dense, pid, blob = image.dense, image.pid, image.blob
            if dense >= len(self.blobs):
                self._grow(dense + 1)
            old = self.blobs[dense]
            before.append(Image(dense, self.pids[dense] or pid, old))
            if old is None and blob is None:
                continue
            if at is not None:
                if stamped is not None:
                    stamped.append((dense, created[dense], changed[dense]))
                if blob is None:
                    created[dense] = changed[dense] = 0
                elif times and dense in times:
                    created[dense], changed[dense] = times[dense]
                else:
                    changed[dense] = at
                    if old is None:
                        created[dense] = at
            elif blob is None:
                created[dense] = changed[dense] = 0
            new_state = image.state if image.state is not None else (
                decode(blob) if blob is not None else None)
            if old is None:
                assert new_state is not None
                self.blobs[dense] = blob
                self.pids[dense] = pid
                self.dense_of[pid] = dense
                self.live.add(dense)
                slot = self.slots[dense] = slot_of(pid)
                if self.owned_slots is not None and slot not in self.owned_slots:
                    self.foreign.add(dense)
                fresh.append((dense, new_state[1]))
                for kind, value in new_state[2]:
                    fresh_keys.append(ident_key(kind, value))
                    fresh_owners.append(dense)
                for m in new_state[3]:
                    self.aliases[m] = pid
                if touched is not None:
                    touched.created_with((dense,), new_state[1])
                continue
            old_state = decode(old)
            old_pid = self.pids[dense]
            assert old_pid is not None
            if touched is not None:
                if new_state is None:
                    touched.removed.add(dense)
                else:
                    old_attrs, new_attrs = old_state[1], new_state[1]
                    touched.update(dense, [a for a, v in new_attrs.items()
                                           if a not in old_attrs or old_attrs[a] != v],
                                   [a for a in old_attrs if a not in new_attrs])
            if new_state is None:
                self.blobs[dense] = None
                self.pids[dense] = None
                self.dense_of.pop(old_pid, None)
                self.live.discard(dense)
                self.foreign.discard(dense)
                self._reindex(dense, old_state[1], {})
                self._reidentify(dense, old_pid, old_state[2], old_state[3], [], [])
            else:
                self.blobs[dense] = blob
                self._reindex(dense, old_state[1], new_state[1])
                self._reidentify(dense, pid, old_state[2], old_state[3], new_state[2],
                                 new_state[3])
        if fresh:
            self._index_fresh(fresh)
        if len(fresh_keys) > 64:  # a load: one vectorized insert
            self.directory.update(np.array(fresh_keys, dtype=np.uint64),
                                  np.array(fresh_owners, dtype=np.uint32))
        else:
            for key, dense in zip(fresh_keys, fresh_owners, strict=True):
                self.directory[key] = dense
        before.reverse()
        return before

    def _grow(self, size: int) -> None:
        """Make room for dense ids below `size`."""
        grow = size - len(self.blobs)
        self.blobs.extend([None] * grow)
        self.pids.extend([None] * grow)
        self.slots.frombytes(bytes(grow * self.slots.itemsize))
        self.created.frombytes(bytes(grow * self.created.itemsize))
        self.changed.frombytes(bytes(grow * self.changed.itemsize))

    def _apply_load(self, images: list[Image], load: Load, at: int) -> tuple[int, list[str]]:
        """apply_images for a planned load (Change.load): new profiles at the end, indexed
        from the planner's columns. Returns (first dense id, primary ids): what undoes it."""
        first, end = load.first, load.first + len(images)
        pids = [image.pid for image in images]
        self.blobs.extend([image.blob for image in images])
        self.pids.extend(pids)
        stamps = array.array("I", [at]) * len(images)
        self.created.extend(stamps)
        self.changed.extend(stamps)
        self.dense_of.update(zip(pids, range(first, end), strict=True))
        self.live.add_range(first, end)
        self.slots.extend(load.slots)
        if self.owned_slots is not None:
            owned = self.owned_slots
            self.foreign.update([d for d, slot in zip(range(first, end), load.slots, strict=True)
                                 if slot not in owned])
        if load.keys.size:
            self.directory.insert_absent(load.keys, np.array(load.owners, dtype=np.uint32))
        self._index_columns({aid: (ids, values) for aid, ids, values in load.columns})
        return first, pids

    def _reidentify(self, dense: int, pid: str, old_idents: list[list[str]], old_merged: list[str],
                    new_idents: list[list[str]], new_merged: list[str]) -> None:
        directory = self.directory
        if old_idents:
            keep = {ident_key(k, v) for k, v in new_idents}
            for k, v in old_idents:
                key = ident_key(k, v)
                if key not in keep and directory.get(key) == dense:
                    del directory[key]
        for k, v in new_idents:
            directory[ident_key(k, v)] = dense
        if old_merged:
            keep_m = set(new_merged)
            for m in old_merged:
                if m not in keep_m and self.aliases.get(m) == pid:
                    del self.aliases[m]
        for m in new_merged:
            self.aliases[m] = pid

    def _reindex(self, dense: int, old: dict[int, Any], new: dict[int, Any]) -> None:
        by_id = self.schema.by_id
        for aid in old.keys() | new.keys():
            ov = old.get(aid)
            nv = new.get(aid)
            if ov == nv:
                continue
            spec = by_id[aid]
            if not spec.indexed:
                continue
            kind = spec.kind
            if kind is Kind.EVENT_DAYS:
                self.day_index[aid].update(dense, days.decode(ov) if ov else [],
                                           days.decode(nv) if nv else [])
                continue
            if kind in RANGE_KINDS:
                index = self.range_index[aid]
                if kind is Kind.FLOAT:
                    ov = None if ov is None else float_to_ordered(ov)
                    nv = None if nv is None else float_to_ordered(nv)
                if nv is None:
                    index.remove(dense, ov)  # type: ignore[arg-type]
                else:
                    index.set(dense, nv, ov)
                continue
            vindex = self.value_index[aid]
            if kind is Kind.STRING_LIST:
                olds = set(ov or ())
                news = set(nv or ())
                for item in olds - news:
                    vindex.discard(item, dense)
                for item in news - olds:
                    vindex.add(item, dense)
            else:
                if ov is not None:
                    vindex.discard(ov, dense)
                if nv is not None:
                    vindex.add(nv, dense)
            if nv is None:
                self.exists[aid].discard(dense)
            elif ov is None:
                self.exists[aid].add(dense)

    def _index_fresh(self, fresh: list[tuple[int, dict[int, Any]]]) -> None:
        """Index profiles that had no previous image, column by column (replay, imports)."""
        columns: dict[int, tuple[list[int], list[Any]]] = {}
        for dense, attrs in fresh:
            for aid, value in attrs.items():
                column = columns.get(aid)
                if column is None:
                    column = columns[aid] = ([], [])
                column[0].append(dense)
                column[1].append(value)
        self._index_columns(columns)

    def _index_columns(self, columns: Mapping[int, tuple[Sequence[int],
                                                         list[Any] | Coded | np.ndarray]]
                       ) -> None:
        """Index new profiles: per attribute id, their dense ids and stored values."""
        by_id = self.schema.by_id
        for aid, (ids, values) in columns.items():
            spec = by_id[aid]
            if not spec.indexed:
                continue
            # plan_columns passes a column coded only for a value index (never a range kind)
            if isinstance(values, Coded):  # a value's ids go in at once (Coded, add_coded)
                dense = (np.arange(ids.start, ids.stop, dtype=np.uint32)
                         if isinstance(ids, range) else np.array(ids, dtype=np.uint32))
                self.value_index[aid].add_coded(values.values, values.codes, dense
                                                if values.lengths is None
                                                else np.repeat(dense, values.lengths))
                self.exists[aid].update(ids)
                continue
            if spec.kind is Kind.EVENT_DAYS:
                self._index_day_records(aid, ids, cast(list[bytes], values))
                continue
            if spec.kind in RANGE_KINDS:
                if spec.kind is Kind.FLOAT:
                    keys = floats_to_ordered(np.asarray(values, dtype=np.float64))
                else:  # plan_columns's array as it is (the index keeps it, unchanged)
                    keys = np.asarray(values, dtype=np.int64)
                self.range_index[aid].set_many(np.array(ids, dtype=np.uint32), keys)
                continue
            values = cast(list[Any], values)  # only a range kind's column is an array
            if spec.kind is Kind.STRING_LIST:
                self.value_index[aid].add_column(
                    np.repeat(np.asarray(ids, dtype=np.uint32), list(map(len, values))),
                    list(chain.from_iterable(values)))
            else:
                self.value_index[aid].add_column(ids, values)
            self.exists[aid].update(ids)

    def _index_day_records(self, aid: int, ids: Sequence[int], records: list[bytes]) -> None:
        owners: list[int] = []
        pairs: list[tuple[int, int]] = []
        for dense, record in zip(ids, records, strict=True):
            decoded = days.decode(record)
            owners += [dense] * len(decoded)
            pairs += decoded
        if pairs:
            on, times = zip(*pairs, strict=True)
            self.day_index[aid].add_many(np.array(owners, dtype=np.uint32),
                                         np.array(on, dtype=np.int64),
                                         np.array(times, dtype=np.int64))

    # ------------------------------------------------------------------ cluster
    def set_ownership(self, epoch: int, slots: BitMap | None) -> None:
        self.epoch = epoch
        self.owned_slots = slots
        self.foreign = BitMap() if slots is None else self.live - self.members_of_slots(slots)

    def members_of_slots(self, slots: Iterable[int]) -> BitMap:
        """Live profiles whose primary ids hash to `slots`, valid slot numbers (one scan of
        every dense id ever given, erased ones too)."""
        chosen = np.zeros(SLOT_COUNT, dtype=bool)
        chosen[np.fromiter(slots, dtype=np.int64)] = True
        inside = chosen[np.array(self.slots, dtype=np.uint16)]
        return self.live & bitmap_of(np.flatnonzero(inside).astype(np.uint32))

    def visible(self) -> BitMap:
        """Live profiles in owned slots and not held by a merge: what queries answer over."""
        hidden = self.foreign | self.held_dense if self.held_dense else self.foreign
        return self.live - hidden if hidden else self.live
