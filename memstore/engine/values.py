"""Profile values between the API and the engine's stored form.

Stored form (inside profile blobs and indexes): str, int, float, bool as themselves;
timestamps as int microseconds since the Unix epoch (UTC); string lists as sorted lists
of distinct strings. An empty list is stored as "attribute absent", so `exists(tags)`
means "has at least one tag".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack

from memstore.engine.schema import Kind
from memstore.errors import InvalidArgument, brief
from memstore.pbvalues import datetime_to_micros, micros_to_datetime

MAX_DEPTH = 8


def flatten(attributes: Mapping[str, Any], where: str = "attributes") -> dict[str, Any]:
    """Flatten nested maps with dots: {"address": {"city": "Oslo"}} -> {"address.city": ...}."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Mapping[str, Any], depth: int) -> None:
        if depth > MAX_DEPTH:
            raise InvalidArgument(f"{where}: nested deeper than {MAX_DEPTH} levels at "
                                  f"{brief(prefix)}")
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgument(f"{where}: attribute names must be strings, got {brief(key)}")
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(item, Mapping):
                walk(name, item, depth + 1)
            else:
                if name in out:
                    raise InvalidArgument(f"{where}: attribute {brief(name)} given twice")
                out[name] = item

    walk("", attributes, 0)
    return out


def to_stored(kind: Kind, value: Any) -> Any:
    """The stored form of an API value already checked to be of `kind`."""
    if kind is Kind.TIMESTAMP:
        if isinstance(value, msgpack.Timestamp):
            return value.seconds * 1_000_000 + value.nanoseconds // 1000
        return datetime_to_micros(value)
    if kind is Kind.STRING_LIST:
        return sorted(set(value))
    return value


def from_stored(kind: Kind, value: Any) -> Any:
    if kind is Kind.TIMESTAMP:
        return micros_to_datetime(value)
    return value
