"""memstore.engine.rowpack against engine.encode: blobs built a column at a time are, byte for
byte, the blobs packed one profile at a time (same attributes, same order)."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from memstore.engine.blob import decode, encode
from memstore.engine.columnar import Coded
from memstore.engine.rowpack import RowPacker, array_head, map_head
from memstore.engine.schema import Kind

# Every int form msgpack has, at its edges and between them.
EDGES = [-(1 << 63), -(1 << 31) - 1, -(1 << 31), -(1 << 15) - 1, -(1 << 15), -129, -128,
         -33, -32, -1, 0, 127, 128, 255, 256, (1 << 16) - 1, 1 << 16, (1 << 32) - 1, 1 << 32,
         (1 << 63) - 1]
INTS = st.one_of(st.sampled_from(EDGES), st.integers(-(1 << 63), (1 << 63) - 1))
# Strings across fixstr, str 8 and str 16 (in utf-8 bytes), some not ascii.
TEXT = st.one_of(st.text(max_size=40), st.text(min_size=250, max_size=300),
                 st.sampled_from(["", "ü", "x" * 31, "x" * 32, "é" * 16, "y" * 70_000]))
ITEMS = st.sampled_from(["a", "b", "dogs", "é", "z" * 40, "w" * 300] + [f"i{k}" for k in range(20)])
LISTS = st.lists(ITEMS, min_size=1, max_size=20, unique=True).map(sorted)
KINDS = {Kind.INT: INTS, Kind.TIMESTAMP: INTS, Kind.FLOAT: st.floats(allow_nan=False),
         Kind.BOOL: st.booleans(), Kind.STRING: TEXT, Kind.STRING_LIST: LISTS}


@st.composite
def batches(draw: Any) -> tuple[int, list[tuple[int, Kind, bool, list[Any]]], list[Any]]:
    """(n, columns as (attribute id, kind, sent coded, value or None per row), identifiers)."""
    n = draw(st.integers(1, 12))
    aids = draw(st.lists(st.sampled_from([0, 1, 5, 127, 128, 255, 256, 4000, 70_000]),
                         max_size=20, unique=True) if draw(st.booleans())
                else st.lists(st.integers(0, 300), max_size=20, unique=True))
    columns = []
    for aid in aids:
        kind = draw(st.sampled_from(sorted(KINDS, key=str)))
        coded = kind in (Kind.STRING, Kind.STRING_LIST, Kind.INT) and draw(st.booleans())
        values = draw(st.lists(st.none() | KINDS[kind], min_size=n, max_size=n))
        columns.append((aid, kind, coded, values))
    pair = st.lists(st.sampled_from(["email", "device"]) | st.text(max_size=3), min_size=2,
                    max_size=2)
    identifiers = draw(st.lists(st.lists(pair, max_size=17), min_size=n, max_size=n))
    return n, columns, identifiers


def _coded(kind: Kind, held: list[Any]) -> Coded:
    """The held values of a column, dictionary-coded the way a client sends them."""
    if kind is Kind.STRING_LIST:
        values = sorted({item for row in held for item in row})
        codes = [values.index(item) for row in held for item in row]
        return Coded(values, np.array(codes, dtype=np.int32),
                     np.array([len(row) for row in held], dtype=np.int32))
    values = list(dict.fromkeys(held))
    return Coded(values, np.array([values.index(v) for v in held], dtype=np.int32))


@settings(max_examples=250, deadline=None)
@given(batches(), st.integers(0, 1 << 40))
def test_blobs_are_the_ones_encode_packs(batch: Any, version: int) -> None:
    n, columns, identifiers = batch
    packer = RowPacker(n)
    want: list[dict[int, Any]] = [{} for _ in range(n)]
    for aid, kind, coded, values in columns:
        rows = [i for i, v in enumerate(values) if v is not None]
        if not rows:
            continue
        held = [values[i] for i in rows]
        at = None if len(rows) == n else rows
        if coded:
            packer.add_coded(aid, _coded(kind, held), at)
        else:
            packer.add(aid, kind, held, at)
        for i in rows:
            want[i][aid] = values[i]
    blobs = packer.pack(identifiers, version)
    assert blobs == [encode(version, attrs, idents, []) for attrs, idents
                     in zip(want, identifiers, strict=True)]
    assert [decode(b)[1] for b in blobs] == want


def test_headers_switch_form_at_sixteen_and_65536_entries() -> None:
    assert map_head(15) == b"\x8f" and map_head(16) == b"\xde\x00\x10"
    assert array_head(65_535) == b"\xdc\xff\xff" and array_head(65_536) == b"\xdd\x00\x01\x00\x00"
