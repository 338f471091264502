"""Between roaring bitmaps and numpy: the ids of bitmaps as one array, and the bitmap of a
boolean mask over dense ids.

One job: move a set of dense ids across the boundary in bulk, never one id at a time
from Python, so that a computation easier as a vector than as bitmap operations (a count
per id over many bitmaps, memstore.index.day_index) costs a few passes over memory.

`bitmap_of_mask` writes roaring's portable serialization (the format pyroaring's
`serialize` and `deserialize` use, github.com/RoaringBitmap/RoaringFormatSpec) without run
containers:

    cookie:u32 = 12346  n:u32
    (key:u16  cardinality - 1:u16) * n      one per 65,536-id block holding an id
    offset:u32 * n                          where each container's bytes start
    container * n                           cardinality <= 4096: the low 16 bits of the
                                            ids, ascending, u16 each; above: 8,192 bytes,
                                            bit j of the block is id key * 65536 + j

all little-endian, and lets roaring load it: a dense block goes in as its bits, where
building the bitmap from the mask's ids adds them one by one (half the time at one id in
ten). It is a transient form, never written to disk.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import numpy as np
from pyroaring import BitMap

from memstore.index.bitmap_index import bitmap_of

__all__ = ["bitmap_of_mask", "ids_of"]

_BLOCK = 1 << 16
_ARRAY_MAX = 4096  # roaring's largest array container; a denser block is a bitset
_NO_RUN_COOKIE = 12346


def ids_of(bitmaps: Iterable[BitMap], dtype: type = np.uint32) -> np.ndarray:
    """The ids of every bitmap, one after the other (each ascending), as `dtype` (np.intp:
    what numpy indexes and counts with, converted in the same pass as the copy)."""
    parts = [np.frombuffer(b.to_array(), dtype=np.uint32) for b in bitmaps]
    if not parts:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(parts, dtype=dtype, casting="safe")


def bitmap_of_mask(mask: np.ndarray) -> BitMap:
    """The bitmap of the positions where a 1-d bool array is true."""
    n = len(mask)
    found = int(np.count_nonzero(mask))
    if not found:
        return BitMap()
    if found * 32 < n:  # sparse: mostly array containers, the ids are as cheap
        return bitmap_of(np.flatnonzero(mask).astype(np.uint32))
    blocks = -(-n // _BLOCK)
    if n % _BLOCK:
        padded = np.zeros(blocks * _BLOCK, dtype=bool)
        padded[:n] = mask
        mask = padded
    rows = mask.reshape(blocks, _BLOCK)
    keys: list[int] = []
    cards: list[int] = []
    parts: list[bytes] = []
    for key in range(blocks):
        row = rows[key]
        card = int(np.count_nonzero(row))
        if not card:
            continue
        keys.append(key)
        cards.append(card - 1)
        if card > _ARRAY_MAX:
            parts.append(np.packbits(row, bitorder="little").tobytes())
        else:
            parts.append(np.flatnonzero(row).astype("<u2").tobytes())
    count = len(keys)
    head = np.empty((count, 2), dtype="<u2")
    head[:, 0], head[:, 1] = keys, cards
    sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=count)
    offsets = (8 + 8 * count + np.cumsum(sizes) - sizes).astype("<u4")
    return BitMap.deserialize(b"".join((struct.pack("<II", _NO_RUN_COOKIE, count),
                                        head.tobytes(), offsets.tobytes(), *parts)))
