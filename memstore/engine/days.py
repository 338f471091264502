"""Day records: how many times a profile did one event on each UTC day, as stored.

One job: the stored form of an event's day record and the arithmetic on it (add events,
add two records on a merge, drop the days before the retention). A day record is the value
of the attribute `event.<name>.days` (kind EVENT_DAYS) inside the profile blob, so it is
logged, snapshotted, exported, moved and merged exactly as every other attribute is; the
bitmaps that answer `did(...)` (memstore.index.day_index) are derived from it. Only
`expire` drops days: a track or a merge changes exactly the days it names.

Stored form (docs/log-format.md, "Day records"): bytes, newest day first,

    record := last_day:u32 little-endian  varint(count_last)
              (varint(gap)  varint(count))*

where a day is a UTC day number (days since 1970-01-01), each `gap` (>= 1) is how many
days the entry lies before the one written just before it, and a count is >= 1 (LEB128
varints: 7 bits a byte, low bits first, the high bit set on every byte but the last). A
gap and a count below 128 take one byte each, so a day costs 2 bytes, the newest 5.
Newest first, because events mostly arrive in time order: a later day is prepended and
today's count bumped without reading the rest. An empty record is never stored (the
attribute is absent instead).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import accumulate
from operator import sub

DAY_MICROS = 86_400 * 1_000_000
MAX_DAY = 2**32 - 1  # the newest day is a u32
MAX_COUNT = 2**63 - 1  # a day's count saturates here, as event.<name>.count does

Pairs = list[tuple[int, int]]  # (day, count), days ascending and distinct


def day_of(micros: int) -> int:
    """The UTC day number of a time in microseconds since the epoch (floor division)."""
    return micros // DAY_MICROS


def kept(day: int, first_kept: int) -> bool:
    """Whether a day record keeps an event on `day`: not before the retention, and
    representable (1970-01-01 to day 2**32 - 1)."""
    return max(first_kept, 0) <= day <= MAX_DAY


def encode(pairs: Sequence[tuple[int, int]]) -> bytes:
    """The stored form of (day, count) pairs, days ascending and distinct, counts >= 1."""
    if not pairs:
        raise ValueError("an empty day record is not stored")
    last = pairs[-1][0]
    if not 0 <= pairs[0][0] <= last <= MAX_DAY:
        raise ValueError(f"days must lie in 0..{MAX_DAY}")
    out = bytearray(last.to_bytes(4, "little"))
    previous = last
    for i in range(len(pairs) - 1, -1, -1):
        day, count = pairs[i]
        if previous != day:
            _varint(out, previous - day)
            previous = day
        _varint(out, count)
    return bytes(out)


def _varint(out: bytearray, value: int) -> None:
    if value < 0x80:
        out.append(value)
        return
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _read_varint(raw: bytes, at: int) -> tuple[int, int]:
    """The varint at `at` and the offset after it."""
    value = shift = 0
    while True:
        byte = raw[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def last_day(raw: bytes) -> int:
    return int.from_bytes(raw[:4], "little")


def decode(raw: bytes) -> Pairs:
    """The (day, count) pairs of a stored record, days ascending."""
    last = int.from_bytes(raw[:4], "little")
    body = raw[4:]
    if body and max(body) < 0x80:  # every varint one byte: slices, no loop per byte
        counts = body[0::2]
        days = accumulate(body[1::2], sub, initial=last)
        pairs = list(zip(days, counts, strict=True))
    else:
        values: list[int] = []
        value = shift = 0
        for byte in body:
            value |= (byte & 0x7F) << shift
            if byte & 0x80:
                shift += 7
                continue
            values.append(value)
            value = shift = 0
        if shift or len(values) % 2 != 1:
            raise ValueError("a day record cut short")
        pairs = list(zip(accumulate(values[1::2], sub, initial=last), values[0::2],
                         strict=True))
    pairs.reverse()
    return pairs


def add_one(raw: bytes | None, day: int, count: int) -> tuple[bytes, int]:
    """`raw` (None: no record yet) with `count` more on `day` (a kept day); returns the
    record and the day's count before. A day after the newest, or the newest itself, is
    written without reading the rest of the record."""
    if raw is None:
        out = bytearray(day.to_bytes(4, "little"))
        _varint(out, count)
        return bytes(out), 0
    last = int.from_bytes(raw[:4], "little")
    if day > last:
        out = bytearray(day.to_bytes(4, "little"))
        _varint(out, count)
        _varint(out, day - last)
        return bytes(out) + raw[4:], 0
    if day == last:
        before, at = _read_varint(raw, 4)
        out = bytearray(raw[:4])
        _varint(out, min(MAX_COUNT, before + count))
        return bytes(out) + raw[at:], before
    pairs = decode(raw)
    at = bisect_left(pairs, (day, 0))
    if at < len(pairs) and pairs[at][0] == day:
        before = pairs[at][1]
        pairs[at] = (day, min(MAX_COUNT, before + count))
    else:
        before = 0
        pairs.insert(at, (day, count))
    return encode(pairs), before


def add(raw: bytes | None, events: Iterable[tuple[int, int]], first_kept: int
        ) -> tuple[bytes | None, list[tuple[int, int, int]]]:
    """`raw` (None: no record yet) with `events` ((day, count) pairs, any order) added,
    those on days before `first_kept` left out (their days are gone already); days the
    record holds stay until `expire` drops them. Returns the new record (None: none) and
    the days it changed as (day, count before, count after)."""
    changed: dict[int, list[int]] = {}
    for day, count in events:
        if kept(day, first_kept):
            raw, before = add_one(raw, day, count)
            entry = changed.get(day)
            if entry is None:
                changed[day] = [before, min(MAX_COUNT, before + count)]
            else:
                entry[1] = min(MAX_COUNT, entry[1] + count)
    return raw, [(day, before, after) for day, (before, after) in changed.items()]


def merge(mine: bytes, theirs: bytes) -> bytes:
    """Two profiles' records of one event as one (a merge): counts of a day add."""
    counts = dict(decode(mine))
    for day, count in decode(theirs):
        counts[day] = min(MAX_COUNT, counts.get(day, 0) + count)
    return encode(sorted(counts.items()))


def expire(raw: bytes, first_kept: int) -> bytes | None:
    """`raw` without the days before `first_kept` (itself when it has none)."""
    pairs = decode(raw)
    if pairs[0][0] >= first_kept:
        return raw
    left = [(day, count) for day, count in pairs if day >= first_kept]
    return encode(left) if left else None
