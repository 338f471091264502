"""Profiles that travel between shards, checked when they arrive.

Two messages of memstore.v1.ShardControl carry profiles in their stored form, as msgpack
(cluster.proto has the layouts): an ExportChunk, which ImportProfiles applies (slot moves),
and a HoldResponse, which Absorb merges in (cross-shard merges). Both are made by a shard
and sent on by a router, so they are trusted to mean what they say, but not to be well
formed: what arrives is checked whole before any of it is planned, because a malformed
profile or note written to the log would apply on every restart. Every problem is
InvalidArgument naming where it is (`profiles[3].named.city: ...`).

  schema row   [name, kind, indexed, merge]           a valid declaration
  profile row  [id, version, {name: stored value}, [[kind, value], ...], [merged id, ...]]
  stored value by kind: STRING str, INT int64, FLOAT float (not NaN), BOOL bool,
               TIMESTAMP int microseconds within years 1-9999, STRING_LIST list of str
  notes        {"forwards": {id: id}, "decided": {txn: [id or, once erased, its slot, bool]},
                "claims": {key: id}, "registry": {name: [kind, indexed, merge]}}
"""

from __future__ import annotations

import math
from typing import Any

from pyroaring import BitMap

from memstore.engine import days
from memstore.engine.identity import check_identifier, check_pid
from memstore.engine.schema import (
    INT64_MAX,
    INT64_MIN,
    MAX_LIST_ITEMS,
    Kind,
    Merge,
    check_merge,
    check_name,
    check_string,
)
from memstore.errors import InvalidArgument, brief
from memstore.hashslot import SLOT_COUNT
from memstore.pbvalues import micros_in_range

__all__ = ["Row", "SchemaRows", "check_chunk", "check_loser"]

SchemaRows = dict[str, tuple[Kind, bool, Merge]]
Row = tuple[str, int, dict[str, Any], list[list[str]], list[str]]
_NOTE_TABLES = ("forwards", "decided", "claims", "registry", "suppressed")


def check_chunk(chunk: Any) -> tuple[SchemaRows, list[Row]]:
    """The schema and profiles of an ExportChunk's decoded map, checked with its "deleted",
    "notes" and "note_slots"."""
    if not isinstance(chunk, dict):
        raise InvalidArgument("packed: not a map of schema and profiles")
    kinds = _schema(chunk.get("schema"), "schema")
    rows = chunk.get("profiles")
    if not isinstance(rows, list):
        raise InvalidArgument("profiles: not a list of profiles")
    profiles = [_profile(row, kinds, f"profiles[{i}]") for i, row in enumerate(rows)]
    times = chunk.get("times")
    if times is not None:
        if not isinstance(times, list) or len(times) != len(profiles):
            raise InvalidArgument("times: not a [created, changed] pair for each profile")
        for i, pair in enumerate(times):
            if not (isinstance(pair, list) and len(pair) == 2
                    and all(_is_int64(t) and t >= 0 for t in pair)):
                raise InvalidArgument(f"times[{i}]: not [created, changed] in seconds since 1970")
    deleted = chunk.get("deleted", [])
    if not isinstance(deleted, list):
        raise InvalidArgument("deleted: not a list of ids")
    for i, pid in enumerate(deleted):
        check_pid(pid, f"deleted[{i}]")
    if chunk.get("notes") is not None:
        _notes(chunk["notes"])
    if chunk.get("note_slots") is not None:
        covered = chunk["note_slots"]
        try:
            BitMap.deserialize(covered if isinstance(covered, bytes) else b"")
        except (ValueError, IndexError):
            raise InvalidArgument("note_slots: not a serialized bitmap of slots") from None
    return kinds, profiles


def check_loser(exported: Any, where: str) -> tuple[SchemaRows, Row]:
    """The schema and profile of a HoldResponse's decoded map; each attribute the schema
    names is in the profile and the other way round."""
    if not isinstance(exported, dict):
        raise InvalidArgument(f"{where}: not a map of schema and profile")
    kinds = _schema(exported.get("schema"), f"{where}.schema")
    row = _profile(exported.get("profile"), kinds, f"{where}.profile")
    missing = kinds.keys() - row[2].keys()
    if missing:
        raise InvalidArgument(f"{where}.profile: no value of {brief(min(missing))}")
    return kinds, row


def _schema(rows: Any, where: str) -> SchemaRows:
    if not isinstance(rows, list):
        raise InvalidArgument(f"{where}: not a list of [name, kind, indexed, merge]")
    kinds: SchemaRows = {}
    for i, row in enumerate(rows):
        at = f"{where}[{i}]"
        if not (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str)
                and isinstance(row[2], bool)):
            raise InvalidArgument(f"{at}: not [name, kind, indexed, merge]")
        name = row[0]
        check_name(name, at)
        kinds[name] = (_enum(Kind, row[1], f"{at}.kind"), row[2],
                       _enum(Merge, row[3], f"{at}.merge"))
        check_merge(name, kinds[name][0], kinds[name][2])
    return kinds


def _enum(enum: type[Kind | Merge], value: Any, where: str) -> Any:
    if not isinstance(value, bool) and isinstance(value, int):
        try:
            return enum(value)
        except ValueError:
            pass
    raise InvalidArgument(f"{where}: {brief(value)} is not a {enum.__name__}")


def _profile(row: Any, kinds: SchemaRows, where: str) -> Row:
    if not (isinstance(row, list) and len(row) == 5 and isinstance(row[2], dict)
            and isinstance(row[3], list) and isinstance(row[4], list)):
        raise InvalidArgument(f"{where}: not [id, version, attributes, identifiers, merged]")
    pid, version, named, idents, merged = row
    check_pid(pid, f"{where}.id")
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version < 2**64:
        raise InvalidArgument(f"{where}.version: {brief(version)} is not a version")
    for name, value in named.items():
        spec = kinds.get(name) if isinstance(name, str) else None
        if spec is None:
            raise InvalidArgument(f"{where}.attributes: {brief(name)} is not in the schema")
        named[name] = _stored(spec[0], value, f"{where}.attributes.{name}")
    for i, pair in enumerate(idents):
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(x, str) for x in pair)):
            raise InvalidArgument(f"{where}.identifiers[{i}]: not a [kind, value] pair")
        check_identifier(pair[0], pair[1], f"{where}.identifiers[{i}]")
    for i, other in enumerate(merged):
        check_pid(other, f"{where}.merged[{i}]")
    return pid, version, named, idents, merged


def _stored(kind: Kind, value: Any, where: str) -> Any:
    """`value` in the stored form of `kind` (a list sorted and without repeats)."""
    if kind is Kind.STRING and isinstance(value, str):
        check_string(value, where)
        return value
    if kind is Kind.BOOL and isinstance(value, bool):
        return value
    if kind is Kind.FLOAT and isinstance(value, float) and not math.isnan(value):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if kind is Kind.INT and INT64_MIN <= value <= INT64_MAX:
            return value
        if kind is Kind.TIMESTAMP and micros_in_range(value):
            return value
    if kind is Kind.STRING_LIST and isinstance(value, list) and len(value) <= MAX_LIST_ITEMS:
        for item in value:
            if not isinstance(item, str):
                break
            check_string(item, where)
        else:
            return sorted(set(value))
    if kind is Kind.EVENT_DAYS and isinstance(value, bytes) and _day_record(value):
        return value
    raise InvalidArgument(f"{where}: {brief(value)} is not a stored {kind.label} value")


def _day_record(raw: bytes) -> bool:
    """Whether `raw` reads as a day record (memstore.engine.days)."""
    if len(raw) < 4:
        return False
    try:
        days.decode(raw)
    except ValueError:
        return False
    return True


def _notes(notes: Any) -> None:
    if not isinstance(notes, dict) or not set(notes) <= set(_NOTE_TABLES):
        raise InvalidArgument(f"notes: a map of {', '.join(_NOTE_TABLES)}")
    for table, entries in notes.items():
        if not isinstance(entries, dict) or not all(isinstance(k, str) for k in entries):
            raise InvalidArgument(f"notes.{table}: not a map keyed by strings")
        for key, value in entries.items():
            at = f"notes.{table}[{brief(key)}]"
            if table in ("forwards", "claims"):
                check_pid(value, at)
            elif table == "suppressed":
                if not (isinstance(value, list) and len(value) == 2 and _is_int64(value[0])
                        and 0 <= value[0] < SLOT_COUNT
                        and isinstance(value[1], int | float) and not isinstance(value[1], bool)):
                    raise InvalidArgument(f"{at}: not [slot, erased at]")
            elif table == "decided":
                if not (isinstance(value, list) and len(value) == 2
                        and isinstance(value[1], bool)):
                    raise InvalidArgument(f"{at}: not [survivor, committed]")
                if isinstance(value[0], int) and not isinstance(value[0], bool):
                    if not 0 <= value[0] < SLOT_COUNT:  # an erased survivor's slot
                        raise InvalidArgument(f"{at}: slot {value[0]} out of range")
                else:
                    check_pid(value[0], at)
            elif not (isinstance(value, list) and len(value) == 3
                      and isinstance(value[1], bool)):
                raise InvalidArgument(f"{at}: not [kind, indexed, merge]")
            else:
                check_name(key, at)
                _enum(Kind, value[0], f"{at}.kind")
                _enum(Merge, value[2], f"{at}.merge")


def _is_int64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63
