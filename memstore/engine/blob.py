"""A profile's encoded form, and the keys of its identifiers.

Blob layout (msgpack array): [version, {attribute id: stored value}, [[kind, value], ...]
identifiers, [merged-away primary ids]]. Stored values are described in
memstore.engine.values. The bytes are also a wire format (BatchGet's packed form), so
they change only with docs/protocol.md. Identifiers are found through 64-bit hashes of
"kind\x00value" (ident_key), confirmed against the profile's own identifiers.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import msgpack
import numpy as np
import ormsgpack
from xxhash import xxh3_64_intdigest

# Encodes a profile blob: ormsgpack writes the same bytes as msgpack, 2-3x faster.
_pack = partial(ormsgpack.packb, option=ormsgpack.OPT_NON_STR_KEYS)


def encode(version: int, attrs: dict[int, Any], idents: list[list[str]], merged: list[str]) -> bytes:
    state = [version, attrs, idents, merged]
    try:
        return _pack(state)  # type: ignore[no-any-return]
    except TypeError:  # a subclass ormsgpack refuses (numpy's float64): msgpack's same bytes
        return msgpack.packb(state)  # type: ignore[no-any-return]


def decode(blob: bytes) -> list[Any]:
    return msgpack.unpackb(blob, strict_map_key=False, use_list=True)  # type: ignore[no-any-return]


def decode_many(blobs: Sequence[bytes]) -> list[list[Any]]:
    """decode of each blob, as one msgpack call: the blobs joined behind an array32 header
    are one array of the profiles (a call costs about as much as decoding a small blob)."""
    if not blobs:
        return []
    joined = b"".join((b"\xdd", len(blobs).to_bytes(4, "big"), *blobs))
    return msgpack.unpackb(joined, strict_map_key=False, use_list=True)  # type: ignore[no-any-return]


def encode_many(states: Sequence[list[Any]]) -> list[bytes]:
    """encode of each [version, attrs, idents, merged] list, as they are (no list made
    again a profile)."""
    try:
        return list(map(_pack, states))
    except TypeError:  # a value ormsgpack refuses (numpy's float64): each as encode does
        return [encode(*state) for state in states]


def version_of(blob: bytes) -> int:
    """The version of an encoded profile without decoding the rest: the blob is a msgpack
    array of four whose first element is the version (a non-negative int)."""
    if blob[0] != 0x94:
        raise ValueError("not an encoded profile")
    tag = blob[1]
    if tag < 0x80:  # positive fixint
        return tag
    width = _UINT_WIDTHS.get(tag)
    if width is None:
        raise ValueError("profile version is not an unsigned int")
    return int.from_bytes(blob[2:2 + width], "big")


_UINT_WIDTHS = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def timestamp_ext(micros: int) -> msgpack.Timestamp:
    """msgpack's Timestamp for `micros` (cheaper than Timestamp.from_unix_nano)."""
    seconds, rem = divmod(micros, 1_000_000)
    return msgpack.Timestamp(seconds, rem * 1000)


def ident_key(kind: str, value: str) -> int:
    """Directory key of an identifier: a 64-bit hash, not the string, to save ~70 bytes a
    profile. Readers confirm a hit against the profile's own identifiers; two identifiers
    colliding on one key are refused (about one chance in 2**64 per pair). Never 0 or 1,
    which the directory's table keeps for empty and deleted slots (memstore.index.inttable)."""
    key: int = xxh3_64_intdigest(f"{kind}\x00{value}".encode())
    return key if key > 1 else key + 2


def ident_keys(kinds: Sequence[str], values: Sequence[str]) -> np.ndarray:
    """ident_key of many identifiers, as uint64, with no Python frame per identifier."""
    texts = map(str.encode, map("\x00".join, zip(kinds, values, strict=True)))
    keys = np.fromiter(map(xxh3_64_intdigest, texts), dtype=np.uint64, count=len(kinds))
    keys[keys <= 1] += np.uint64(2)
    return keys
