"""The columnar bulk-load format (BatchUpsertRequest.columns) and its row equivalent.

A bulk load is mostly the same attributes over and over; sent as rows, the shard spends
most of its time taking every row apart again to check and index one attribute at a
time. Sent as columns, the client pays that once (on its own core) and the shard checks
a column with one type test and indexes it in one pass (Engine.plan_columns).

Wire form, one msgpack map:

    {"ids": [primary id, ...],                   # n rows
     "attributes": {name: [value or nil, ...]},  # one column of n per flat attribute name
     "timestamps": [name, ...],                  # optional: columns of int microseconds
     "identifiers": [[[kind, value], ...], ...]} # optional; n lists of pairs

nil means "this row does not set the attribute" (a load sets, it never unsets). Values
are what a packed row carries: strings, ints, floats, bools, msgpack timestamps, string
lists; a column named in "timestamps" holds timestamps as int microseconds since the Unix
epoch instead (what the shard stores: no conversion per value). Row i of the batch is
called `columns[i]` in error messages.

A column may instead be sent dictionary-coded (`Coded`), each distinct value once:

    {"values": [value, ...],   # distinct values (no nil)
     "codes": bin,             # little-endian int32 per row: its value's position, -1: none
     "lengths": bin}           # a string-list column only: int32 items per row (0: none);
                               # then codes holds every row's items, row after row

Most of a CDP's strings repeat (countries, plans, tags). Coded, the shard decodes each
distinct string once instead of once a row, checks the dictionary instead of every value,
and indexes a value's rows in one bitmap update. The Python client codes a string or
string-list column when its distinct values are at most half of its values
(`pack_columns`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import chain, repeat
from operator import itemgetter
from typing import Any

import msgpack
import numpy as np

from memstore.engine.values import flatten
from memstore.errors import InvalidArgument, brief
from memstore.pbvalues import (
    TIMESTAMP_RANGE,
    aware_datetimes_to_micros,
    micros_in_range,
    micros_to_datetime,
)

Row = tuple[str, dict[str, Any], list[tuple[str, str]]]
CODE = np.dtype("<i4")  # codes and lengths on the wire
CODE_SHARE = 0.5  # pack_columns codes a column with at most this many distinct values a value


@dataclass(slots=True, eq=False)
class Coded:
    """A dictionary-coded column: row i holds values[codes[i]] (nothing where codes[i] is
    -1). A string-list column has `lengths`: row i holds lengths[i] items (none if 0), the
    values at the next lengths[i] codes."""

    values: list[Any]
    codes: np.ndarray
    lengths: np.ndarray | None = None

    def holds(self) -> np.ndarray:
        """Which rows hold a value (bool per row)."""
        return self.codes >= 0 if self.lengths is None else self.lengths > 0

    def held(self) -> tuple[list[int] | None, Coded]:
        """(the rows holding a value, None for all of them; the same as a Coded column of
        those rows alone)."""
        hit = self.holds()
        if hit.all():
            return None, self
        rows = np.flatnonzero(hit).tolist()
        if self.lengths is None:
            return rows, Coded(self.values, self.codes[hit])
        # the rows holding nothing have no codes: every code is an item of a row kept
        return rows, Coded(self.values, self.codes, self.lengths[hit])

    def first(self) -> Any:
        """The value of the first row holding one (a list for a list column)."""
        at = int(np.argmax(self.holds()))
        if self.lengths is None:
            return self.values[self.codes[at]]
        start = int(self.lengths[:at].sum())
        return [self.values[c] for c in self.codes[start:start + self.lengths[at]].tolist()]

    def decoded_held(self) -> list[Any]:
        """The value (or list) of each row, of a column every row of which holds one."""
        values = self.values
        if self.lengths is None:
            return list(map(values.__getitem__, self.codes.tolist()))
        items = list(map(values.__getitem__, self.codes.tolist()))
        ends = np.cumsum(self.lengths)
        return list(map(items.__getitem__, map(slice, (ends - self.lengths).tolist(),
                                                ends.tolist())))

    def decoded(self) -> list[Any]:
        """The plain column: each row's value or list, None where it holds nothing."""
        rows, held = self.held()
        lists = held.decoded_held()
        if rows is None:
            return lists
        column: list[Any] = [None] * len(self.codes if self.lengths is None else self.lengths)
        for row, value in zip(rows, lists, strict=True):
            column[row] = value
        return column

    def take(self, rows: Sequence[int]) -> Coded:
        """Rows `rows` alone, in that order."""
        at = np.asarray(rows, dtype=np.intp)
        if self.lengths is None:
            return Coded(self.values, self.codes[at])
        lengths = self.lengths[at]
        starts = (np.cumsum(self.lengths) - self.lengths)[at]
        ends = np.cumsum(lengths)
        step = np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - lengths, lengths)
        return Coded(self.values, self.codes[np.repeat(starts, lengths) + step], lengths)

    def wire(self) -> dict[str, Any]:
        body = {"values": self.values, "codes": self.codes.astype(CODE, copy=False).tobytes()}
        if self.lengths is not None:
            body["lengths"] = self.lengths.astype(CODE, copy=False).tobytes()
        return body


@dataclass(slots=True)
class Columns:
    ids: list[str]
    attributes: dict[str, list[Any] | Coded]
    identifiers: list[list[list[str]]]  # per row, [kind, value] pairs
    timestamps: frozenset[str] = frozenset()  # columns of int microseconds

    def __post_init__(self) -> None:
        """A row each: a short column would index profiles the batch never creates."""
        n = len(self.ids)
        if len(self.identifiers) != n:
            raise ValueError(f"columns: {len(self.identifiers)} identifier lists for {n} ids")
        for name, column in self.attributes.items():
            rows = len(column.lengths if isinstance(column, Coded) and column.lengths
                       is not None else column.codes if isinstance(column, Coded) else column)
            if rows != n:
                raise ValueError(f"columns: attribute {name!r} has {rows} rows for {n} ids")

    @classmethod
    def from_rows(cls, rows: Sequence[Row], where: str = "packed") -> Columns:
        """Columns of (id, flat attributes, identifiers) rows; a null value is refused
        (in columns, null means "not in this row")."""
        n = len(rows)
        attributes: dict[str, list[Any] | Coded] = {}
        for i, (_, attrs, _) in enumerate(rows):
            for name, value in attrs.items():
                if value is None:
                    raise InvalidArgument(f"{where}[{i}].attributes.{name}: null is not a "
                                          f"value; leave the attribute out")
                column = attributes.get(name)
                if column is None:
                    column = attributes[name] = [None] * n
                column[i] = value  # type: ignore[index]
        return cls([r[0] for r in rows], attributes, [[list(p) for p in r[2]] for r in rows])

    def pack_rows(self, rows: Sequence[int], ids: Sequence[str]) -> bytes:
        """Rows `rows` of this batch as a columnar batch of their own, under primary ids
        `ids` (a router's part of a batch for one shard; values are not looked at)."""
        take = itemgetter(*rows) if len(rows) > 1 else lambda column: (column[rows[0]],)
        attributes: dict[str, Any] = {}
        for name, column in self.attributes.items():
            if isinstance(column, Coded):
                part = column.take(rows)
                if part.holds().any():
                    attributes[name] = part.wire()
                continue
            values = take(column)
            if values.count(None) < len(values):
                attributes[name] = values
        body: dict[str, Any] = {"ids": list(ids), "attributes": attributes}
        timestamps = [name for name in self.timestamps if name in attributes]
        if timestamps:
            body["timestamps"] = timestamps
        identifiers = take(self.identifiers)
        if any(identifiers):
            body["identifiers"] = identifiers
        return msgpack.packb(body)  # type: ignore[no-any-return]

    def rows(self, where: str = "columns") -> list[Row]:
        """The same batch as rows (the general planner's input), timestamps as datetimes;
        InvalidArgument for a timestamp column value that is not one."""
        plain = [(name, column.decoded() if isinstance(column, Coded) else column)
                 for name, column in self.attributes.items()]
        columns = [(name, _datetimes(column, where, name) if name in self.timestamps
                    else column) for name, column in plain]
        return [(pid, {name: column[i] for name, column in columns if column[i] is not None},
                 [(k, v) for k, v in self.identifiers[i]])
                for i, pid in enumerate(self.ids)]


def _datetimes(column: list[Any], where: str, name: str) -> list[Any]:
    out: list[Any] = []
    for i, micros in enumerate(column):
        if micros is None:
            out.append(None)
        elif type(micros) is int and micros_in_range(micros):
            out.append(micros_to_datetime(micros))
        else:
            raise InvalidArgument(
                f"{where}[{i}].attributes.{name}: {micros!r} is not a timestamp in "
                f"microseconds since the Unix epoch within {TIMESTAMP_RANGE}")
    return out


def pack_columns(records: Sequence[Mapping[str, Any]],
                 default: Callable[[Any], Any] | None = None,
                 code_share: float = CODE_SHARE) -> bytes:
    """Pack {"id", "attributes", "identifiers"} records (a client's load input) as columns.

    Nested attribute maps are flattened with dots. A null attribute value is refused
    (ValueError): in a load, leave the attribute out instead. A column of strings (or of
    non-empty string lists) with at most `code_share` distinct values a value is sent
    coded (`Coded`). Built a column at a time
    (no Python frame per value): on a loader sharing its machine with the shard, every
    microsecond a profile spent here is one the shard does not get.
    """
    ids = [record["id"] for record in records]
    rows = [record.get("attributes") or {} for record in records]
    if not set(map(type, rows)) <= {dict}:
        rows = [dict(attrs) for attrs in rows]
    named, attributes, types = _columns(rows)
    if any(issubclass(t, Mapping) for present in types.values() for t in present):
        rows = [_flat(record, attrs, i) for i, (record, attrs) in enumerate(zip(records, rows))]
        named, attributes, types = _columns(rows)
    if any(column.count(None) > len(rows) - named[name] for name, column in attributes.items()):
        i, name = next((i, name) for i, attrs in enumerate(rows)
                       for name, value in attrs.items() if value is None)
        raise ValueError(f"record {i} ({ids[i]!r}): attribute {name!r} is null; "
                         f"leave it out of the record instead")
    body: dict[str, Any] = {"ids": ids, "attributes": attributes}
    timestamps = []
    for name, column in attributes.items():
        present = types[name] - {type(None)}
        if present == {datetime}:  # columns of aware datetimes only go as int microseconds
            try:
                attributes[name] = aware_datetimes_to_micros(column)
            except TypeError:  # a naive one: packing it names it (_pack_default)
                continue
            timestamps.append(name)
        elif str in present or list in present:
            coded = _coded(column, code_share, present)
            if coded is not None:
                attributes[name] = coded.wire()
            elif list in present:
                # as the shard stores them: it then only checks (Engine.plan_columns)
                attributes[name] = _sorted_sets(column)
    if timestamps:
        body["timestamps"] = timestamps
    identifiers = [record.get("identifiers") or () for record in records]
    if any(identifiers):
        pairs = list(chain.from_iterable(identifiers))
        if not (set(map(type, pairs)) <= {tuple, list} and set(map(len, pairs)) == {2}):
            identifiers = [[_pair(x, i, ids[i]) for x in idents]
                           for i, idents in enumerate(identifiers)]
        body["identifiers"] = identifiers
    return msgpack.packb(body, datetime=True, default=default)  # type: ignore[no-any-return]


def _columns(rows: list[dict[str, Any]]
             ) -> tuple[Counter[str], dict[str, Any], dict[str, set[type]]]:
    """(how many rows name each attribute; its column, None where a row leaves it out; the
    types in the column), attributes in the order the rows first name them (the order they
    get declared in)."""
    named = Counter(chain.from_iterable(rows))
    attributes = {name: list(map(dict.get, rows, repeat(name))) for name in named}
    return named, attributes, {name: set(map(type, column))
                               for name, column in attributes.items()}


def _sorted_sets(column: list[Any]) -> list[Any]:
    """The column with each list sorted and without repeats (the stored form of a string
    list), or as it is if some list's items do not hash or order (the shard names those)."""
    try:
        return [sorted(set(v)) if type(v) is list else v for v in column]
    except TypeError:
        return column


def _coded(column: list[Any], share: float, types: set[type]) -> Coded | None:
    """The column coded, if it is strings (or non-empty lists of strings) with at most
    `share` distinct values a value; else None. `types` are the column's types but None's.
    Each list is coded in its stored form, sorted without repeats, as the shard keeps it."""
    if types == {str}:
        seen = dict.fromkeys(column)
        seen.pop(None, None)
        if len(seen) > share * (len(column) - column.count(None)):
            return None
        position: dict[Any, int] = dict(zip(seen, range(len(seen))))
        position[None] = -1
        return Coded(list(seen), np.fromiter(map(position.__getitem__, column), dtype=CODE,
                                             count=len(column)))
    if types != {list}:
        return None
    if [] in column:
        return None  # an empty list sets the attribute to nothing: sent as it is
    lists = [v or () for v in column]
    items = list(chain.from_iterable(lists))
    if not set(map(type, items)) <= {str}:
        return None
    distinct = sorted(set(items))
    position = dict(zip(distinct, range(len(distinct))))
    codes = np.fromiter(map(position.__getitem__, items), dtype=np.int64, count=len(items))
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    # Sorting (row, code) pairs sorts each row's items (distinct is sorted); dropping a
    # pair equal to the one before drops a row's repeats. All rows at once, in numpy.
    rows = np.repeat(np.arange(len(lists), dtype=np.int64), lengths)
    pairs = np.sort(rows * len(distinct) + codes)
    if len(pairs) > 1:
        pairs = pairs[np.concatenate(([True], pairs[1:] != pairs[:-1]))]
    if len(distinct) > share * len(pairs):
        return None
    return Coded(distinct, (pairs % len(distinct)).astype(CODE),
                 np.bincount(pairs // len(distinct), minlength=len(lists)).astype(CODE))


def _flat(record: Mapping[str, Any], attrs: dict[str, Any], i: int) -> dict[str, Any]:
    if not any(isinstance(value, Mapping) for value in attrs.values()):
        return attrs
    try:
        return flatten(attrs, f"record {i} ({record['id']!r}) attributes")
    except InvalidArgument as exc:
        raise ValueError(str(exc)) from None


def _pair(identifier: Any, i: int, pid: str) -> tuple[Any, Any]:
    """An identifier given as {"kind", "value"} or a (kind, value) pair."""
    if isinstance(identifier, Mapping):
        return identifier["kind"], identifier["value"]
    if isinstance(identifier, tuple | list) and len(identifier) == 2:
        return identifier[0], identifier[1]
    raise ValueError(f"record {i} ({pid!r}): identifier {identifier!r} is not a (kind, value) "
                     f"pair or a {{'kind', 'value'}} map")


def unpack_columns(data: bytes, where: str = "columns") -> Columns:
    """Decode and shape-check a columnar batch; values are checked by the planner."""
    try:
        body = msgpack.unpackb(data, use_list=True)
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types on garbage
        raise InvalidArgument(f"{where}: not a msgpack map of columns ({exc})") from None
    if (not isinstance(body, dict)
            or not body.keys() <= {"ids", "attributes", "timestamps", "identifiers"}):
        raise InvalidArgument(
            f"{where}: a map with keys ids, attributes, timestamps and identifiers")
    ids = body.get("ids")
    if not isinstance(ids, list) or not set(map(type, ids)) <= {str}:
        raise InvalidArgument(f"{where}.ids: a list of primary id strings")
    n = len(ids)
    attributes = body.get("attributes", {})
    if not isinstance(attributes, dict):
        raise InvalidArgument(f"{where}.attributes: a map of attribute name to column")
    for name, column in attributes.items():
        if not isinstance(name, str):
            raise InvalidArgument(f"{where}.attributes: names must be strings, got "
                                  f"{brief(name)}")
        if isinstance(column, dict):
            attributes[name] = _unpack_coded(column, n, f"{where}.attributes.{name}")
        elif not isinstance(column, list) or len(column) != n:
            raise InvalidArgument(f"{where}.attributes.{name}: a list of {n} values "
                                  f"(one per id, nil where absent) or a coded column")
    timestamps = body.get("timestamps", [])
    if (not isinstance(timestamps, list) or not set(map(type, timestamps)) <= {str}
            or not set(timestamps) <= attributes.keys()):
        raise InvalidArgument(f"{where}.timestamps: a list of names of attribute columns")
    stamped = frozenset(timestamps)
    raw = body.get("identifiers")
    if raw is None:
        return Columns(ids, attributes, [[] for _ in range(n)], stamped)
    if not isinstance(raw, list) or len(raw) != n:
        raise InvalidArgument(f"{where}.identifiers: a list of {n} lists (one per id)")
    # Checked a batch at a time; only a batch that fails is walked to say where.
    pairs = list(chain.from_iterable(raw)) if set(map(type, raw)) <= {list} else None
    if (pairs is None or not set(map(type, pairs)) <= {list} or not set(map(len, pairs)) <= {2}
            or not set(map(type, chain.from_iterable(pairs))) <= {str}):
        for i, row in enumerate(raw):
            if not isinstance(row, list):
                raise InvalidArgument(f"{where}.identifiers[{i}]: a list of [kind, value] pairs")
            for pair in row:
                if (not isinstance(pair, list) or len(pair) != 2
                        or type(pair[0]) is not str or type(pair[1]) is not str):
                    raise InvalidArgument(
                        f"{where}.identifiers[{i}]: identifiers are [kind, value] string pairs")
    identifiers: list[list[list[str]]] = raw
    return Columns(ids, attributes, identifiers, stamped)


def _unpack_coded(body: dict[Any, Any], n: int, where: str) -> Coded:
    """A coded column's wire form, checked: every code names a value, lengths add up."""
    if body.keys() not in ({"values", "codes"}, {"values", "codes", "lengths"}):
        raise InvalidArgument(f"{where}: a coded column is a map of values, codes and "
                              f"(for string lists) lengths")
    values = body["values"]
    if not isinstance(values, list) or None in values:
        raise InvalidArgument(f"{where}.values: a list of values without nil (a row "
                              f"without a value has code -1)")
    codes = _int32s(body["codes"], f"{where}.codes")
    raw_lengths = body.get("lengths")
    lengths = None if raw_lengths is None else _int32s(raw_lengths, f"{where}.lengths")
    if lengths is None:
        if len(codes) != n:
            raise InvalidArgument(f"{where}.codes: {n} codes (one per id), got {len(codes)}")
        low = -1
    else:
        if len(lengths) != n:
            raise InvalidArgument(f"{where}.lengths: {n} lengths (one per id), got "
                                  f"{len(lengths)}")
        if (lengths < 0).any():
            i = int(np.argmax(lengths < 0))
            raise InvalidArgument(f"{where}.lengths[{i}]: {int(lengths[i])} is negative")
        if int(lengths.sum(dtype=np.int64)) != len(codes):
            raise InvalidArgument(f"{where}.codes: as many codes as the lengths add up to "
                                  f"({int(lengths.sum(dtype=np.int64))}), got {len(codes)}")
        low = 0
    bad = (codes < low) | (codes >= len(values))
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidArgument(f"{where}.codes[{i}]: {int(codes[i])} is not a position in "
                              f"values (0 to {len(values) - 1}"
                              f"{', or -1 for none' if low else ''})")
    return Coded(values, codes, lengths)


def _int32s(raw: Any, where: str) -> np.ndarray:
    if not isinstance(raw, bytes) or len(raw) % CODE.itemsize:
        raise InvalidArgument(f"{where}: little-endian int32s as msgpack bin")
    return np.frombuffer(raw, dtype=CODE)
