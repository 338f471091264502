"""Index maintenance: the attribute indexes (value, range, day records) and the identifier
directory kept in step with profile blobs, one profile at a time (reindex, reidentify) or
a column at a time for new profiles (index_columns: loads, replay, imports). Bound as
Engine methods; the indexes are read by memstore.query.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import chain
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from pyroaring import BitMap

from memstore.engine import days
from memstore.engine.blob import ident_key
from memstore.engine.change import Ids
from memstore.engine.columnar import Coded
from memstore.engine.schema import RANGE_KINDS, AttributeSpec, Kind
from memstore.index.bitmap_index import RangeIndex, ValueIndex, float_to_ordered, floats_to_ordered
from memstore.index.day_index import DayIndex
from memstore.index.dense import id_array

if TYPE_CHECKING:
    from memstore.engine.core import Engine


def add_attribute(engine: Engine, spec: AttributeSpec) -> None:
    engine.schema.add(spec)
    if spec.indexed:
        if spec.kind in RANGE_KINDS:
            engine.range_index[spec.id] = RangeIndex()
        elif spec.kind is Kind.EVENT_DAYS:
            engine.day_index[spec.id] = DayIndex()
        else:
            engine.value_index[spec.id] = ValueIndex()
            engine.exists[spec.id] = BitMap()


def reidentify(engine: Engine, dense: int, pid: str, old_idents: list[list[str]], old_merged: list[str],
                new_idents: list[list[str]], new_merged: list[str]) -> None:
    directory = engine.directory
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
            if m not in keep_m and engine.aliases.get(m) == pid:
                del engine.aliases[m]
    for m in new_merged:
        engine.aliases[m] = pid


def reindex(engine: Engine, dense: int, old: dict[int, Any], new: dict[int, Any]) -> None:
    by_id = engine.schema.by_id
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
            engine.day_index[aid].update(dense, days.decode(ov) if ov else [],
                                       days.decode(nv) if nv else [])
            continue
        if kind in RANGE_KINDS:
            index = engine.range_index[aid]
            if kind is Kind.FLOAT:
                ov = None if ov is None else float_to_ordered(ov)
                nv = None if nv is None else float_to_ordered(nv)
            if nv is None:
                index.remove(dense, ov)  # type: ignore[arg-type]
            else:
                index.set(dense, nv, ov)
            continue
        vindex = engine.value_index[aid]
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
            engine.exists[aid].discard(dense)
        elif ov is None:
            engine.exists[aid].add(dense)


def index_fresh(engine: Engine, fresh: list[tuple[int, dict[int, Any]]]) -> None:
    """Index profiles that had no previous image, column by column (replay, imports)."""
    columns: dict[int, tuple[list[int], list[Any]]] = {}
    for dense, attrs in fresh:
        for aid, value in attrs.items():
            column = columns.get(aid)
            if column is None:
                column = columns[aid] = ([], [])
            column[0].append(dense)
            column[1].append(value)
    engine._index_columns(columns)


def index_columns(engine: Engine, columns: Mapping[int, tuple[Ids,
                                                     list[Any] | Coded | np.ndarray]]
                   ) -> None:
    """Index new profiles: per attribute id, their dense ids and stored values."""
    by_id = engine.schema.by_id
    for aid, (ids, values) in columns.items():
        spec = by_id[aid]
        if not spec.indexed:
            continue
        # plan_columns passes a column coded only for a value index (never a range kind)
        if isinstance(values, Coded):  # a value's ids go in at once (Coded, add_coded)
            dense = _dense_array(ids)
            engine.value_index[aid].add_coded(values.values, values.codes, dense
                                            if values.lengths is None
                                            else np.repeat(dense, values.lengths))
            _add_ids(engine.exists[aid], ids)
            continue
        if spec.kind is Kind.EVENT_DAYS:
            engine._index_day_records(aid, ids, cast(list[bytes], values))
            continue
        if spec.kind in RANGE_KINDS:
            if spec.kind is Kind.FLOAT:
                keys = floats_to_ordered(np.asarray(values, dtype=np.float64))
            else:  # plan_columns's array as it is (the index keeps it, unchanged)
                keys = np.asarray(values, dtype=np.int64)
            engine.range_index[aid].set_many(_dense_array(ids), keys)
            continue
        values = cast(list[Any], values)  # only a range kind's column is an array
        if spec.kind is Kind.STRING_LIST:
            engine.value_index[aid].add_column(
                np.repeat(np.asarray(ids, dtype=np.uint32), list(map(len, values))),
                list(chain.from_iterable(values)))
        else:
            engine.value_index[aid].add_column(ids, values)
        _add_ids(engine.exists[aid], ids)


def _dense_array(ids: Ids) -> np.ndarray:
    """Dense ids as a uint32 array (a load's range without a Python int each)."""
    if isinstance(ids, range):
        return np.arange(ids.start, ids.stop, dtype=np.uint32)
    return np.asarray(ids, dtype=np.uint32)


def _add_ids(bitmap: BitMap, ids: Ids) -> None:
    """Add dense ids to `bitmap` (an array as one buffer: pyroaring takes a numpy array's
    ids one Python int at a time)."""
    bitmap.update(id_array(ids) if isinstance(ids, np.ndarray) else ids)


def index_day_records(engine: Engine, aid: int, ids: Ids, records: list[bytes]) -> None:
    owners: list[int] = []
    pairs: list[tuple[int, int]] = []
    for dense, record in zip(ids, records, strict=True):
        decoded = days.decode(record)
        owners += [dense] * len(decoded)
        pairs += decoded
    if pairs:
        on, times = zip(*pairs, strict=True)
        engine.day_index[aid].add_many(np.array(owners, dtype=np.uint32),
                                     np.array(on, dtype=np.int64),
                                     np.array(times, dtype=np.int64))
