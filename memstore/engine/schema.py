"""Attribute schema of one shard: every attribute's kind, whether it is indexed, and its
merge rule.

Invariants: an attribute's kind never changes once declared or first written; attribute
ids are dense, assigned in declaration order, and never reused, because profile blobs
store attributes by id. Declarations are logged like any other change, so replaying the
log reproduces the same ids.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from typing import Any

from msgpack import Timestamp

from memstore.errors import InvalidArgument
from memstore.pbvalues import TIMESTAMP_RANGE, datetime_to_micros, micros_in_range


class Kind(IntEnum):
    """Value kinds; the numbers equal memstore.v1.Kind and are stored on disk."""

    STRING = 1
    INT = 2
    FLOAT = 3
    BOOL = 4
    TIMESTAMP = 5
    STRING_LIST = 6
    # An event's day record, `event.<name>.days` (memstore.engine.days): written by Track
    # alone, never by a value a client sends, and read by did(...) alone.
    EVENT_DAYS = 7

    @property
    def label(self) -> str:
        return self.name.lower()


class Merge(IntEnum):
    """How a scalar attribute combines when two profiles merge (numbers equal the proto's)."""

    DEFAULT = 0  # lists union; scalars: the survivor's value, else the merged-away one's
    SUM = 1
    MIN = 2
    MAX = 3


INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_NAME_BYTES = 256
MAX_STRING_BYTES = 16 * 1024
MAX_LIST_ITEMS = 1000
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*$")
DAY_RECORD = re.compile(r"^event\.[A-Za-z0-9_\-]{1,128}\.days$")


def kind_of(value: Any) -> Kind:
    """The kind a Python value belongs to (bool before int: bool subclasses int)."""
    if isinstance(value, bool):
        return Kind.BOOL
    if isinstance(value, int):
        return Kind.INT
    if isinstance(value, float):
        return Kind.FLOAT
    if isinstance(value, str):
        return Kind.STRING
    if isinstance(value, (datetime, Timestamp)):
        return Kind.TIMESTAMP
    if isinstance(value, (list, tuple, set, frozenset)):
        return Kind.STRING_LIST
    raise InvalidArgument(f"values of type {type(value).__name__} are not supported")


def check_name(name: str, where: str = "attribute") -> None:
    if not name:
        raise InvalidArgument(f"{where}: empty attribute name")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise InvalidArgument(f"{where}: attribute name longer than {MAX_NAME_BYTES} bytes")
    if not _NAME.match(name):
        raise InvalidArgument(
            f"{where}: attribute name {name!r} must be dotted words of letters, digits, _ or -"
        )


@functools.lru_cache(maxsize=1 << 16)
def check_name_once(name: str, where: str = "attribute") -> None:
    """check_name, remembering the names that passed (a load's records name the same few
    again and again); a refused name is checked again each time, as it raises."""
    check_name(name, where)


def check_string(value: str, where: str) -> None:
    if len(value) > MAX_STRING_BYTES or len(value.encode("utf-8")) > MAX_STRING_BYTES:
        raise InvalidArgument(f"{where}: string longer than {MAX_STRING_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class AttributeSpec:
    id: int
    name: str
    kind: Kind
    indexed: bool = True
    merge: Merge = Merge.DEFAULT

    def to_state(self) -> list[Any]:
        return [self.id, self.name, int(self.kind), self.indexed, int(self.merge)]

    @classmethod
    def from_state(cls, state: list[Any]) -> AttributeSpec:
        return cls(state[0], state[1], Kind(state[2]), bool(state[3]), Merge(state[4]))


class Schema:
    def __init__(self) -> None:
        self.by_name: dict[str, AttributeSpec] = {}
        self.by_id: list[AttributeSpec] = []

    def get(self, name: str) -> AttributeSpec | None:
        return self.by_name.get(name)

    def __len__(self) -> int:
        return len(self.by_id)

    def plan(
        self,
        name: str,
        kind: Kind,
        indexed: bool = True,
        merge: Merge = Merge.DEFAULT,
        next_id: int | None = None,
    ) -> AttributeSpec | None:
        """The spec a declaration would add, None if it is already declared identically.

        Raises InvalidArgument when it conflicts with the existing declaration.
        """
        check_name(name)
        existing = self.by_name.get(name)
        if existing is not None:
            if existing.kind != kind:
                raise InvalidArgument(
                    f"attribute {name!r} has kind {existing.kind.label}, "
                    f"cannot redeclare it as {kind.label}"
                )
            if existing.indexed != indexed or existing.merge != merge:
                raise InvalidArgument(
                    f"attribute {name!r} is already declared with indexed={existing.indexed} "
                    f"merge={existing.merge.name.lower()}"
                )
            return None
        check_merge(name, kind, merge)
        if kind is Kind.EVENT_DAYS and not DAY_RECORD.match(name):
            raise InvalidArgument(f"attribute {name!r}: kind event_days is kept for the day "
                                  "records Track writes, event.<name>.days")
        return AttributeSpec(len(self.by_id) if next_id is None else next_id, name, kind,
                             indexed, merge)

    def add(self, spec: AttributeSpec) -> None:
        if spec.id != len(self.by_id):
            raise ValueError(f"attribute id {spec.id} out of order (next is {len(self.by_id)})")
        self.by_id.append(spec)
        self.by_name[spec.name] = spec

    def drop_last(self, spec: AttributeSpec) -> None:
        """Take back the newest declaration (a change undone before anything used it)."""
        if not self.by_id or self.by_id[-1] != spec:
            raise ValueError(f"attribute {spec.name!r} is not the newest declaration")
        self.by_id.pop()
        del self.by_name[spec.name]

    def to_state(self) -> list[Any]:
        return [spec.to_state() for spec in self.by_id]

    @classmethod
    def from_state(cls, state: list[Any]) -> Schema:
        schema = cls()
        for item in state:
            schema.add(AttributeSpec.from_state(item))
        return schema


def check_merge(name: str, kind: Kind, merge: Merge) -> None:
    """Raise InvalidArgument unless `merge` applies to attributes of `kind`."""
    if kind is Kind.EVENT_DAYS:
        if merge is not Merge.SUM:
            raise InvalidArgument(f"attribute {name!r}: a day record merges by sum")
        return
    if merge in (Merge.SUM,) and kind not in (Kind.INT, Kind.FLOAT):
        raise InvalidArgument(f"attribute {name!r}: merge=sum needs an int or float kind")
    if merge in (Merge.MIN, Merge.MAX) and kind not in (Kind.INT, Kind.FLOAT, Kind.TIMESTAMP):
        raise InvalidArgument(
            f"attribute {name!r}: merge={merge.name.lower()} needs a number or timestamp"
        )


def registry_key(name: str) -> str:
    """Where the cluster's declaration of attribute `name` lives: the shard owning
    slot_of(registry_key(name)) keeps it (memstore.engine.core's `registry`, a router's
    shards/schema.py), so each name has one owner, and it moves with that slot."""
    return f"attribute:{name}"


def article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def check_value(spec_kind: Kind, value: Any, name: str) -> None:
    """Raise InvalidArgument unless `value` is a valid value of `spec_kind`."""
    sent = kind_of(value)
    if sent != spec_kind:
        raise InvalidArgument(
            f"attribute {name!r} has kind {spec_kind.label}, got {article(sent.label)} value"
        )
    if sent is Kind.STRING:
        check_string(value, f"attribute {name!r}")
    elif sent is Kind.INT:
        if not INT64_MIN <= value <= INT64_MAX:
            raise InvalidArgument(f"attribute {name!r}: {value} does not fit in int64")
    elif sent is Kind.TIMESTAMP:
        micros = (value.seconds * 1_000_000 + value.nanoseconds // 1000
                  if isinstance(value, Timestamp) else datetime_to_micros(value))
        if not micros_in_range(micros):
            raise InvalidArgument(f"attribute {name!r}: timestamp {value} is outside "
                                  f"{TIMESTAMP_RANGE}")
    elif sent is Kind.FLOAT:
        if math.isnan(value):
            raise InvalidArgument(f"attribute {name!r}: NaN cannot be stored or compared")
    elif sent is Kind.STRING_LIST:
        if len(value) > MAX_LIST_ITEMS:
            raise InvalidArgument(f"attribute {name!r}: list longer than {MAX_LIST_ITEMS} items")
        for item in value:
            if not isinstance(item, str):
                raise InvalidArgument(
                    f"attribute {name!r}: lists hold strings, got {type(item).__name__}"
                )
            check_string(item, f"attribute {name!r}")


RANGE_KINDS = (Kind.INT, Kind.FLOAT, Kind.TIMESTAMP)  # kept in a RangeIndex
VALUE_KINDS = (Kind.STRING, Kind.BOOL, Kind.STRING_LIST)  # kept in a ValueIndex
