"""The bulk-load planner: a columnar batch of new profiles checked and encoded a column at
a time (Engine.plan_columns).

When every row is a new profile whose identifiers belong to nobody, validation runs per
column (one type check per attribute per batch), blobs are built per column
(memstore.engine.rowpack) and the Change carries the checked columns (Load) so applying it
indexes them without decoding blobs. Anything else goes to the general planner
(memstore.engine.planner), which gives the same result or the same error more slowly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from datetime import datetime
from itertools import chain, compress, islice, repeat
from operator import is_not, lt
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
from pyroaring import BitMap

from memstore.engine.blob import ident_keys
from memstore.engine.change import Change, Ids, Image, Load, record_specs
from memstore.engine.columnar import Coded, Columns
from memstore.engine.identity import IDENT_KIND, MAX_ID_BYTES, MAX_IDENTIFIER_BYTES
from memstore.engine.planner import Planner
from memstore.engine.rowpack import RowPacker
from memstore.engine.schema import (
    MAX_LIST_ITEMS,
    MAX_STRING_BYTES,
    RANGE_KINDS,
    AttributeSpec,
    Kind,
    Merge,
    kind_of,
)
from memstore.engine.values import to_stored
from memstore.errors import InvalidArgument
from memstore.hashslot import slots_of
from memstore.pbvalues import micros_in_range

if TYPE_CHECKING:
    from memstore.engine.core import Engine


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


def plan_columns(engine: Engine, batch: Columns, where: str = "columns") -> Change:
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
        return engine.plan_batch(record_specs(batch.rows(where), where), numbers=[
            name for name, column in batch.attributes.items()
            if isinstance(column, list) and {int, float} <= set(map(type, column))])

    engine.require_declared(_column_kinds(batch, engine.schema.by_name)
                          if engine.cluster_schema else ())
    ids = batch.ids
    n = len(ids)
    if len(set(ids)) != n:
        return general()
    # Anything the general planner would refuse goes to it, so the batch gets the error
    # it gives (the first bad record's, in record order), not one of the fast path's.
    if ids and (not min(map(len, ids)) or max(map(len, ids)) > MAX_ID_BYTES // 4):
        return general()  # an empty id, or one that may be too long in utf-8
    if ((engine.dense_of.many(ids) >= 0).any() or any(map(engine.aliases.__contains__, ids))
            or any(map(engine.forwards.__contains__, ids))):
        return general()
    if engine.suppressed and engine._names_suppressed(batch):
        return general()  # which refuses the record naming it
    slots = slots_of(ids)
    if engine.owned_slots is not None and not engine.owned_slots.issuperset(BitMap(slots)):
        return general()  # WrongSlot
    first = len(engine.blobs)
    rules = engine.rules
    pairs = [(first + i, kind, value) for i, idents in enumerate(batch.identifiers)
             for kind, value in idents]
    owners = [p[0] for p in pairs]
    kinds = [p[1] for p in pairs]
    values = [p[2] for p in pairs]
    if pairs and (not min(map(len, values))
                  or max(map(len, values)) > MAX_IDENTIFIER_BYTES // 4
                  or not all(map(IDENT_KIND.match, set(kinds)))
                  or not rules.blocked.isdisjoint(map(str.lower, map(str.strip, values)))):
        return general()
    if any(len(idents) > rules.max_per_kind
           and max(Counter(k for k, _ in idents).values()) > rules.max_per_kind
           for idents in batch.identifiers):
        return general()
    # Identifiers named twice, or held by some profile here: one vectorized probe.
    keys = ident_keys(kinds, values)
    if keys.size and (_repeats(keys) or (engine.directory.find_many(keys) >= 0).any()):
        return general()
    planner = Planner(engine)
    indexed: list[tuple[int, Ids, list[Any] | Coded | np.ndarray]] = []
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
