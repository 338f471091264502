"""What planning produces and applying consumes.

A Change is a list of after-images (Image: dense id, primary id, encoded profile blob or
None for "gone"), the attribute declarations it needs, and Notes setting or removing
entries of the engine's small tables (merges, claims, registry, suppression, segments).
Applying one returns an Undo: the before-images and notes that take it back. The
operation codes of an upsert (SET, UNSET, ...) are memstore.v1.Operation.Op's numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain, count, pairwise
from operator import itemgetter
from typing import Any, NamedTuple

import numpy as np

from memstore.engine.columnar import Coded, Row
from memstore.engine.schema import AttributeSpec

# Operation codes: the numbers of memstore.v1.Operation.Op.
SET, SET_ONCE, UNSET, INCREMENT, ADD_TO_SET, REMOVE_FROM_SET = 1, 2, 3, 4, 5, 6
OP_NAMES = {1: "set", 2: "set_once", 3: "unset", 4: "increment", 5: "add_to_set",
            6: "remove_from_set"}


class Image(NamedTuple):
    """A profile's after-image. A tuple: a load makes a thousand at once, in C
    (tuple.__new__ over zipped fields; _make costs a Python frame each, 60% more)."""

    dense: int
    pid: str
    blob: bytes | None
    state: list[Any] | None = None  # decoded blob when the planner has it (saves a decode)


@dataclass(slots=True)
class ImageColumns:
    """After-images as a RECORD_COLUMNS record logs them (memstore/shard.py), in order:
    dense ids (a range where consecutive), primary ids, each blob's length (int64; -1:
    no blob, the profile gone) and the blobs joined."""

    dense: range | np.ndarray
    pids: list[str]
    lengths: np.ndarray
    joined: bytes


@dataclass(slots=True)
class Note:
    """Set (value not None) or remove one entry of a cross-shard merge table."""

    table: str  # "held" | "forwards" | "decided" | "claims" | "registry" | "suppressed"
    key: str
    value: Any


_BLOB = itemgetter(2)  # an Image's blob (None: the profile is gone)
NOTE_TABLES = ("held", "forwards", "decided", "claims", "registry", "suppressed",
               "segments")
# Tables whose removed entries held personal data (primary ids, identifiers): a change
# removing one erases, as a change removing a profile does (Shard: erasure retention).
ERASING_TABLES = frozenset({"forwards", "decided", "claims"})
ANONYMOUS_KINDS = ("anonymous", "device")  # identifier kinds of anonymous visitors


# A column's dense ids: a range, a list, or (read back from the log) a uint32 array.
Ids = Sequence[int] | np.ndarray


@dataclass(slots=True)
class Load:
    """What a bulk load's planner checked, kept so `apply` can index column by column."""

    first: int  # dense id of the first image; the images are new profiles, in order
    slots: list[int]  # hash slot of each image's primary id
    keys: np.ndarray  # the images' identifier keys (none in the directory yet) ...
    owners: list[int] | np.ndarray  # ... and the dense id holding each (read back: an array)
    # indexed: (attribute, ids, values), values coded where the column came so (Coded)
    columns: list[tuple[int, Ids, list[Any] | Coded | np.ndarray]]
    # When each profile was created, unix seconds, where not all at the change's time (a
    # recovery's run of loads logged in different seconds); never logged
    stamps: np.ndarray | None = None

    def to_state(self) -> list[Any]:
        """For the log (a load's record carries it), so replay indexes the new profiles a
        column at a time as the load did, never taking a blob apart: arrays as their
        bytes, a column's dense ids as [start, stop] where they are a range."""
        return [self.first, raw_array(np.asarray(self.slots, dtype="<u2")), raw_array(self.keys),
                raw_array(np.asarray(self.owners, dtype="<u4")),
                [[aid, [ids.start, ids.stop] if isinstance(ids, range)
                  else raw_array(np.asarray(ids, dtype="<u4")), _values_state(values)]
                 for aid, ids, values in self.columns]]

    @classmethod
    def from_state(cls, state: list[Any]) -> Load:
        first, slots, keys, owners, columns = state
        return cls(first, array_of(slots).tolist(), array_of(keys), array_of(owners),
                   [(aid, range(*ids) if isinstance(ids[0], int) else array_of(ids),
                     _values_of(values)) for aid, ids, values in columns])


def raw_array(array: np.ndarray, narrow: bool = False) -> list[Any]:
    """An array as its dtype and little-endian bytes: ["<u4", b"..."]. `narrow`: an
    integer array in the smallest integer type of its kind holding its values (array_of
    gives them back in that type: the reader converts to the one it works in)."""
    if narrow and array.dtype.kind in "iu" and len(array):
        low, high = int(array.min()), int(array.max())
        for dtype in ((np.uint8, np.uint16, np.uint32) if array.dtype.kind == "u"
                      else (np.int8, np.int16, np.int32)):
            if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
                array = array.astype(dtype)
                break
    little = array.dtype.newbyteorder("<")
    return [little.str, array.astype(little, copy=False).tobytes()]


def array_of(raw: list[Any]) -> np.ndarray:
    """The array raw_array wrote, in this machine's byte order (a new, writable array)."""
    logged = np.frombuffer(raw[1], dtype=raw[0])
    return logged.astype(logged.dtype.newbyteorder("="))


def _values_state(values: list[Any] | Coded | np.ndarray) -> list[Any]:
    """A column's values for the log, coded where that makes replay cheaper (a distinct
    value's object made once, its ids added to its bitmap at once)."""
    if isinstance(values, list) and values:
        if type(values[0]) is int:  # a timestamp column: int microseconds
            return ["a", raw_array(np.asarray(values, dtype=np.int64))]
        if type(values[0]) is list:  # a string-list column
            lengths = np.fromiter(map(len, values), dtype=np.uint32, count=len(values))
            values = _coded(list(chain.from_iterable(values)), lengths)
        elif type(values[0]) in (str, bool) and len(set(values)) * 2 <= len(values):
            values = _coded(values)  # (unless most are distinct: nothing to share)
    if isinstance(values, np.ndarray):
        return ["a", raw_array(values)]
    if isinstance(values, Coded):
        return ["c", values.values, raw_array(values.codes),
                None if values.lengths is None else raw_array(values.lengths)]
    return ["l", values]


def _coded(values: list[Any], lengths: np.ndarray | None = None) -> Coded:
    """`values` dictionary-coded."""
    table = dict(zip(dict.fromkeys(values), count()))
    return Coded(list(table), np.fromiter(map(table.__getitem__, values), dtype=np.int32,
                                          count=len(values)), lengths)


def _values_of(state: list[Any]) -> list[Any] | Coded | np.ndarray:
    if state[0] == "a":
        return array_of(state[1])
    if state[0] == "c":
        return Coded(state[1], array_of(state[2]), None if state[3] is None else array_of(state[3]))
    return state[1]


def column_form(values: list[Any] | Coded | np.ndarray) -> str:
    """How a load's column holds its values: "a" an array, "c" coded, "cl" a coded list
    column, "l" a list. Only columns of one form join (join_loads)."""
    if isinstance(values, np.ndarray):
        return "a"
    if isinstance(values, Coded):
        return "c" if values.lengths is None else "cl"
    return "l"


def join_loads(loads: Sequence[Load]) -> Load:
    """The one Load of consecutive loads (each one's `first` where the previous one's
    profiles end), as if a single load had planned all their profiles: slots, keys and
    owners one after another, and each attribute's columns as one column (the loads'
    columns of an attribute have one form, column_form): ids as one range or array,
    values concatenated, coded ones re-coded over one table of their distinct values."""
    if len(loads) == 1:
        return loads[0]
    pieces: dict[int, list[tuple[Ids, list[Any] | Coded | np.ndarray]]] = {}
    for load in loads:
        for aid, ids, values in load.columns:
            pieces.setdefault(aid, []).append((ids, values))
    return Load(loads[0].first, list(chain.from_iterable(load.slots for load in loads)),
                np.concatenate([load.keys for load in loads]),
                np.concatenate([np.asarray(load.owners, dtype=np.uint32) for load in loads]),
                [(aid, _joined_ids([ids for ids, _ in column]),
                  _joined_values([values for _, values in column]))
                 for aid, column in pieces.items()])


def _joined_ids(pieces: list[Ids]) -> Ids:
    spans = [ids for ids in pieces if isinstance(ids, range)]
    if len(spans) == len(pieces) and all(a.stop == b.start for a, b in pairwise(spans)):
        return range(spans[0].start, spans[-1].stop)
    return np.concatenate([np.arange(ids.start, ids.stop, dtype=np.uint32)
                           if isinstance(ids, range) else np.asarray(ids, dtype=np.uint32)
                           for ids in pieces])


def _joined_values(pieces: list[Any]) -> list[Any] | Coded | np.ndarray:
    if isinstance(pieces[0], np.ndarray):
        return np.concatenate(pieces)
    if not isinstance(pieces[0], Coded):
        return list(chain.from_iterable(pieces))
    table = dict(zip(dict.fromkeys(chain.from_iterable(c.values for c in pieces)), count()))
    codes = [np.fromiter(map(table.__getitem__, coded.values), dtype=np.int32,
                         count=len(coded.values))[coded.codes]  # a piece's code -> joined
             for coded in pieces]
    lengths = None if pieces[0].lengths is None else np.concatenate(
        [coded.lengths for coded in pieces])
    return Coded(list(table), np.concatenate(codes), lengths)


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
    # A person's erasure (Delete, EraseProfiles, retention): change streams no longer
    # replay the log from before it (memstore/server/watch.py)
    erasure: bool = False

    @property
    def empty(self) -> bool:
        return not self.schema and not self.images and not self.notes

    @property
    def erases(self) -> bool:
        """True when the change removes a profile, or a table entry naming a person."""
        return ((self.load is None and None in map(_BLOB, self.images))
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

