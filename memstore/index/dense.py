"""Between roaring bitmaps and numpy: the bitmap of an array of dense ids, the ids of
bitmaps as one array, and the bitmaps of boolean masks over dense ids.

One job: move a set of dense ids across the boundary in bulk, never one id at a time
from Python, so that a computation easier as a vector than as bitmap operations (a count
per id over many bitmaps, memstore.index.day_index; the bit slices of a bulk load's
values, memstore.index.bitmap_index) costs a few passes over memory.

`bitmap_of_mask`, `bitmaps_of_rows` and `bitmaps_of_packed` write roaring's portable
serialization (the format pyroaring's `serialize` and `deserialize` use,
github.com/RoaringBitmap/RoaringFormatSpec) without run containers:

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

import array
import struct
from collections.abc import Iterable

import numpy as np
from pyroaring import BitMap

__all__ = ["BLOCK", "bitmap_of", "bitmap_of_mask", "bitmaps_of_packed", "bitmaps_of_rows",
           "id_array", "ids_of"]

BLOCK = 1 << 16  # the ids of one roaring container: those sharing their top 16 bits
_ARRAY_MAX = 4096  # roaring's largest array container; a denser block is a bitset
_NO_RUN_COOKIE = 12346


def id_array(values: np.ndarray) -> array.array[int]:
    """uint32 ids as an array.array: the form pyroaring takes fastest (a buffer)."""
    buf = array.array("I")
    buf.frombytes(values.astype(np.uint32, copy=False).tobytes())
    return buf


def bitmap_of(values: Iterable[int] | np.ndarray) -> BitMap:
    """A bitmap of dense ids; a uint32 numpy array goes in as one buffer."""
    return BitMap(id_array(values) if isinstance(values, np.ndarray) else values)


def ids_of(bitmaps: Iterable[BitMap], dtype: type = np.uint32) -> np.ndarray:
    """The ids of every bitmap, one after the other (each ascending), as a new array of
    `dtype` (np.intp: what numpy indexes and counts with). The bitmaps' buffers are
    joined first and converted in one pass: numpy's per-array cost dominated converting
    a window's ~200 small repeat slices (0.55 -> 0.19 ms)."""
    parts = [b.to_array() for b in bitmaps]
    if not parts:
        return np.zeros(0, dtype=dtype)
    joined = parts[0] if len(parts) == 1 else b"".join(parts)
    return np.frombuffer(joined, dtype=np.uint32).astype(dtype, casting="safe")


def bitmap_of_mask(mask: np.ndarray) -> BitMap:
    """The bitmap of the positions where a 1-d bool array is true."""
    n = len(mask)
    found = int(np.count_nonzero(mask))
    if not found:
        return BitMap()
    if found * 32 < n:  # sparse: mostly array containers, the ids are as cheap
        return bitmap_of(np.flatnonzero(mask).astype(np.uint32))
    return bitmaps_of_rows(mask[np.newaxis])[0]


def bitmaps_of_rows(rows: np.ndarray, start: int = 0) -> list[BitMap]:
    """The bitmap of each row of a 2-d bool array: row r's holds start + j wherever
    rows[r, j] is true. `start` is a multiple of 65,536 (the rows cover whole blocks from
    there); rows not a multiple of 65,536 wide are padded with zeros (a copy)."""
    count, n = rows.shape
    blocks = -(-n // BLOCK)
    if n % BLOCK:
        padded = np.zeros((count, blocks * BLOCK), dtype=bool)
        padded[:, :n] = rows
        rows = padded
    return bitmaps_of_packed(np.packbits(rows, axis=1, bitorder="little"), start)


def bitmaps_of_packed(bits: np.ndarray, start: int = 0) -> list[BitMap]:
    """bitmaps_of_rows of rows given packed (numpy's packbits, little bit order): row r's
    bitmap holds start + 8 * k + j wherever bit j of bits[r, k] is set. Each row is whole
    blocks: 8,192 bytes each."""
    assert start % BLOCK == 0, start
    count, width = bits.shape
    if width % (BLOCK // 8):
        raise ValueError(f"rows of {width} bytes are not whole blocks of {BLOCK // 8}")
    cube = bits.reshape(count, width // (BLOCK // 8), BLOCK // 8)  # (count, blocks, 8,192)
    cards = np.bitwise_count(cube).sum(axis=2, dtype=np.int64).tolist()
    first_key = start // BLOCK
    out = []
    for row_cards, row_bits in zip(cards, cube, strict=True):
        keys: list[int] = []
        parts: list[bytes] = []
        for block, card in enumerate(row_cards):
            if not card:
                continue
            keys.append(block)
            if card > _ARRAY_MAX:
                parts.append(row_bits[block].tobytes())
            else:
                parts.append(_set_bits(row_bits[block]).tobytes())
        out.append(_deserialize([first_key + k for k in keys],
                                [row_cards[k] for k in keys], parts))
    return out


_BIT = np.arange(8, dtype="<u2")


def _set_bits(packed: np.ndarray) -> np.ndarray:
    """The positions of the set bits of a block's packed bytes (little bit order),
    ascending, as roaring's array container holds them: the bytes holding any found
    first, only they unpacked (a sparse block's few, not its 65,536 bits)."""
    held = np.flatnonzero(packed)
    bits = np.unpackbits(packed[held][:, None], axis=1, bitorder="little").astype(bool)
    return ((held.astype("<u2") << 3)[:, None] | _BIT)[bits]


def _deserialize(keys: list[int], cards: list[int], parts: list[bytes]) -> BitMap:
    """The bitmap of containers (parts) at 65,536-id blocks `keys` holding `cards` ids."""
    count = len(keys)
    if not count:
        return BitMap()
    head = np.empty((count, 2), dtype="<u2")
    head[:, 0] = keys
    head[:, 1] = np.asarray(cards) - 1
    sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=count)
    offsets = (8 + 8 * count + np.cumsum(sizes) - sizes).astype("<u4")
    return BitMap.deserialize(b"".join((struct.pack("<II", _NO_RUN_COOKIE, count),
                                        head.tobytes(), offsets.tobytes(), *parts)))
