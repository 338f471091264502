"""Conversion between protobuf `Value` messages and Python values.

Python side of every value kind, used by the server, the client and the query layer:
  STRING -> str, INT -> int, FLOAT -> float, BOOL -> bool,
  TIMESTAMP -> datetime (timezone-aware, UTC), STRING_LIST -> list[str].
`bool` is tested before `int` because bool is a subclass of int in Python.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import repeat
from operator import floordiv, sub
from typing import Any

from memstore.v1 import memstore_pb2 as pb

PyValue = str | int | float | bool | datetime | list[str]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _to_micros(value: datetime) -> int:
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


# Timestamps a datetime can hold (years 1 to 9999, UTC), as stored microseconds.
MIN_MICROS = _to_micros(datetime.min.replace(tzinfo=UTC))
MAX_MICROS = _to_micros(datetime.max.replace(tzinfo=UTC))
TIMESTAMP_RANGE = "years 1 to 9999"


def micros_in_range(micros: int) -> bool:
    """Whether a stored timestamp can be read back as a datetime (every write checks)."""
    return MIN_MICROS <= micros <= MAX_MICROS


def datetime_to_micros(value: datetime) -> int:
    """Microseconds since the Unix epoch; a naive datetime is taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return _to_micros(value)


def aware_datetimes_to_micros(column: list[datetime | None]) -> list[int | None]:
    """datetime_to_micros of a column of aware datetimes (None stays None), exact, with no
    Python frame per value when none is None (a client's load converts whole columns)."""
    if None not in column:
        return list(map(floordiv, map(sub, column, repeat(_EPOCH)), repeat(_MICROSECOND)))
    return [None if v is None else (v - _EPOCH) // _MICROSECOND for v in column]


def micros_to_datetime(micros: int) -> datetime:
    # Exact, unlike a float of seconds; positional, because timedelta's keyword form costs
    # twice as much and a BatchGet of 1,000 profiles converts thousands of these.
    return _EPOCH + timedelta(0, 0, micros)


def to_pb(value: PyValue) -> pb.Value:
    out = pb.Value()
    if isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int):
        if not -(1 << 63) <= value < 1 << 63:
            raise ValueError(f"integer {value} is outside the int64 range")
        out.int_value = value
    elif isinstance(value, float):
        out.float_value = value
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, datetime):
        micros = datetime_to_micros(value)
        out.timestamp_value.seconds, rem = divmod(micros, 1_000_000)
        out.timestamp_value.nanos = rem * 1000
    elif isinstance(value, (list, tuple, set, frozenset)):
        out.list_value.values.extend(sorted(value))
    else:
        raise TypeError(f"cannot send a value of type {type(value).__name__}")
    return out


def timestamp_micros(ts: Any, where: str = "timestamp") -> int:
    """A google.protobuf.Timestamp as stored microseconds; ValueError naming `where` for
    nanos outside 0..999,999,999 (the Timestamp's own rule) or a time outside
    TIMESTAMP_RANGE."""
    if not 0 <= ts.nanos <= 999_999_999:
        raise ValueError(f"{where}: nanos {ts.nanos} is outside 0..999999999")
    micros: int = ts.seconds * 1_000_000 + ts.nanos // 1000
    if not micros_in_range(micros):
        raise ValueError(f"{where}: timestamp of {ts.seconds} seconds is outside "
                         f"{TIMESTAMP_RANGE}")
    return micros


def from_pb(value: pb.Value, where: str = "value") -> PyValue:
    """The Python value of `value`; ValueError naming `where` when no kind is set."""
    kind = value.WhichOneof("kind")
    if kind is None:
        raise ValueError(f"{where}: value has no kind set")
    if kind == "timestamp_value":
        return micros_to_datetime(timestamp_micros(value.timestamp_value, where))
    if kind == "list_value":
        return list(value.list_value.values)
    return getattr(value, kind)  # type: ignore[no-any-return]
