"""The client's columnar packing (memstore.engine.columnar.pack_columns) against a plain reference:
what the shard unpacks is, row by row, the records the caller gave."""

from __future__ import annotations

from collections import OrderedDict
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memstore.client.core import pack_records
from memstore.engine.columnar import CODE_SHARE, Coded, Columns, unpack_columns
from memstore.engine.values import flatten
from memstore.errors import InvalidArgument

ZONES = st.sampled_from([UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=14))])
STAMPS = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                      timezones=ZONES)
VALUES = st.one_of(st.text(max_size=5), st.integers(-2**63, 2**63 - 1), st.booleans(),
                   st.floats(allow_nan=False), st.lists(st.text(max_size=3), max_size=3))
# "when" holds timestamps only (a column mixing them with other kinds keeps msgpack's
# Timestamp, for the shard to refuse as a kind mismatch)
ATTRS = st.fixed_dictionaries({}, optional={"a": VALUES, "b": VALUES, "c.d": VALUES,
                                            "when": STAMPS}).map(
    lambda attrs: {"nest": {"x": attrs.pop("a")}, **attrs} if "a" in attrs else attrs)
PAIRS = st.tuples(st.sampled_from(["email", "device"]), st.text(min_size=1, max_size=4))
IDENTIFIERS = st.lists(st.one_of(PAIRS, PAIRS.map(list),
                                 PAIRS.map(lambda p: {"kind": p[0], "value": p[1]})), max_size=2)
RECORDS = st.lists(st.fixed_dictionaries({"id": st.text(min_size=1, max_size=4)}, optional={
    "attributes": ATTRS, "identifiers": IDENTIFIERS}), min_size=1, max_size=6)


def _pair(identifier: Any) -> tuple[str, str]:
    if isinstance(identifier, dict):
        return identifier["kind"], identifier["value"]
    return identifier[0], identifier[1]


@settings(max_examples=300, deadline=None)
@given(RECORDS, st.sampled_from([0.0, CODE_SHARE, 1.0]))
def test_unpacked_columns_are_the_records_given(records: list[dict[str, Any]],
                                                code_share: float) -> None:
    """... with each list as the shard stores it: sorted, without repeats; whether string
    columns go plain or coded (Coded)."""
    want = _rows(records)
    got = unpack_columns(pack_records(records, code_share)).rows()
    assert got == want  # datetimes compare as instants; aware ones come back in UTC
    stamped = [v for _, attrs, _ in got for v in attrs.values() if isinstance(v, datetime)]
    assert all(v.tzinfo is UTC for v in stamped)


def _rows(records: list[dict[str, Any]]) -> list[Any]:
    return [(r["id"], {name: sorted(set(v)) if isinstance(v, list) else v
                       for name, v in flatten(r.get("attributes", {})).items()},
             [_pair(x) for x in r.get("identifiers", ())]) for r in records]


@settings(max_examples=200, deadline=None)
@given(RECORDS, st.sampled_from([0.0, 1.0]), st.data())
def test_a_routers_part_of_a_batch_is_those_rows(records: list[dict[str, Any]],
                                                 code_share: float, data: st.DataObject
                                                 ) -> None:
    """Columns.pack_rows (a router's part of a batch for one shard) sends exactly the rows
    it names, in that order, coded columns included."""
    rows = data.draw(st.lists(st.integers(0, len(records) - 1), min_size=1, unique=True))
    part = unpack_columns(pack_records(records, code_share)).pack_rows(
        rows, [f"to-{i}" for i in rows])
    want = [(f"to-{i}", attrs, idents) for i, (_, attrs, idents) in
            ((i, _rows(records)[i]) for i in rows)]
    assert unpack_columns(part).rows() == want


def test_repetitive_strings_go_coded_and_unique_ones_plain() -> None:
    records = [{"id": f"p{i}", "attributes": {"country": ["US", "DE"][i % 2],
                                              "email": f"u{i}@x", "tags": ["b", "a"]}}
               for i in range(10)]
    columns = unpack_columns(pack_records(records)).attributes
    country, tags = columns["country"], columns["tags"]
    assert isinstance(country, Coded) and country.values == ["US", "DE"]
    assert country.codes.tolist() == [0, 1] * 5
    assert isinstance(tags, Coded) and tags.values == ["a", "b"]
    assert tags.codes.tolist() == [0, 1] * 10 and tags.lengths is not None
    assert tags.lengths.tolist() == [2] * 10
    assert columns["email"] == [f"u{i}@x" for i in range(10)]
    # distinct values are counted against the rows holding one: a sparse column of unique
    # strings stays plain (coded, each row without a value would cost 4 bytes, not 1)
    sparse = [{"id": f"p{i}", "attributes": {"code": f"v{i}"} if i % 5 == 0 else {}}
              for i in range(20)]
    assert unpack_columns(pack_records(sparse)).attributes["code"] == [
        f"v{i}" if i % 5 == 0 else None for i in range(20)]


def _coded(column: dict[str, Any], n: int = 2) -> bytes:
    return msgpack.packb({"ids": [f"p{i}" for i in range(n)], "attributes": {"c": column}})


@pytest.mark.parametrize(("column", "message"), [
    ({"values": ["a"]}, r"columns\.attributes\.c: a coded column is a map of values, codes"),
    ({"values": "a", "codes": b""}, r"\.c\.values: a list of values without nil"),
    ({"values": ["a", None], "codes": b""}, r"\.c\.values: a list of values without nil"),
    ({"values": ["a"], "codes": [0, 0]}, r"\.c\.codes: little-endian int32s"),
    ({"values": ["a"], "codes": b"\x00" * 7}, r"\.c\.codes: little-endian int32s"),
    ({"values": ["a"], "codes": np.array([0], "<i4").tobytes()}, r"\.c\.codes: 2 codes \(one"),
    ({"values": ["a"], "codes": np.array([0, 1], "<i4").tobytes()},
     r"\.c\.codes\[1\]: 1 is not a position in values \(0 to 0, or -1 for none\)"),
    ({"values": ["a"], "codes": np.array([-2, 0], "<i4").tobytes()}, r"\.c\.codes\[0\]: -2"),
    ({"values": ["a"], "codes": np.array([0], "<i4").tobytes(),
      "lengths": np.array([1], "<i4").tobytes()}, r"\.c\.lengths: 2 lengths \(one per id\)"),
    ({"values": ["a"], "codes": np.array([0], "<i4").tobytes(),
      "lengths": np.array([2, -1], "<i4").tobytes()}, r"\.c\.lengths\[1\]: -1 is negative"),
    ({"values": ["a"], "codes": np.array([0], "<i4").tobytes(),
      "lengths": np.array([1, 1], "<i4").tobytes()},
     r"\.c\.codes: as many codes as the lengths add up to \(2\), got 1"),
    ({"values": ["a"], "codes": np.array([0, -1], "<i4").tobytes(),
      "lengths": np.array([1, 1], "<i4").tobytes()},
     r"\.c\.codes\[1\]: -1 is not a position in values \(0 to 0\)$"),
])
def test_a_malformed_coded_column_is_refused_saying_where(column: dict[str, Any],
                                                          message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        unpack_columns(_coded(column))


def test_columns_are_named_in_the_order_records_first_name_them() -> None:
    records = [{"id": "p", "attributes": {"y": 1, "x": 2}},
               {"id": "q", "attributes": OrderedDict(w=3, x=4, v={"u": 5})}]
    assert list(unpack_columns(pack_records(records)).attributes) == ["y", "x", "w", "v.u"]


def test_bad_records_are_refused_on_the_client_saying_which() -> None:
    with pytest.raises(ValueError, match=r"record 1 \('r'\): attribute 'a' is null"):
        pack_records([{"id": "q", "attributes": {"a": 1}}, {"id": "r", "attributes": {"a": None}}])
    with pytest.raises(ValueError, match=r"record 0 \('q'\): identifier \('a', 'b', 'c'\)"):
        pack_records([{"id": "q", "identifiers": [("a", "b", "c")]}])
    with pytest.raises(ValueError, match="'a.b' given twice"):
        pack_records([{"id": "q", "attributes": {"a": {"b": 1}, "a.b": 2}}])
    with pytest.raises(TypeError, match="no time zone"):
        pack_records([{"id": "q", "attributes": {"t": datetime(2020, 1, 1)}}])


def test_a_list_the_client_cannot_sort_goes_as_given_for_the_shard_to_refuse() -> None:
    records = [{"id": "p", "attributes": {"tags": ["b", "a", "b"]}},
               {"id": "q", "attributes": {"tags": [2, "a"], "other": ["z", "y"]}}]
    columns = unpack_columns(pack_records(records)).attributes
    assert columns == {"tags": [["b", "a", "b"], [2, "a"]], "other": [None, ["y", "z"]]}


def test_columns_built_in_process_need_a_row_each() -> None:
    """Columns made in process (the wire decoder checks its own): an identifier list or an
    attribute column of another length than the ids is refused, not indexed for profiles
    the batch never creates."""
    ids = ["a", "b", "c"]
    assert Columns(ids, {"n": [1, None, 3], "t": Coded(["x"], np.array([0, -1, 0]))},
                   [[], [], [["email", "a@x"]]]).ids == ids
    with pytest.raises(ValueError, match="0 identifier lists for 3 ids"):
        Columns(ids, {"n": [1, 2, 3]}, [])
    with pytest.raises(ValueError, match="attribute 'n' has 2 rows for 3 ids"):
        Columns(ids, {"n": [1, 2]}, [[], [], []])
    with pytest.raises(ValueError, match="attribute 't' has 2 rows for 3 ids"):
        Columns(ids, {"t": Coded(["x", "y"], np.array([0, 1, 0]), np.array([2, 1]))},
                [[], [], []])
