"""Planning behaviour: Track, TrackBatch and the expiry of old day records.

One job: turn tracked events into a Change of profile after-images, like every other write
(plan -> log -> apply), so replaying the log rebuilds exactly what callers were told. A
tracked event updates four attributes of its profile:

- `event.<name>.count` (int, merge sum), `.first` (timestamp, min), `.last` (timestamp,
  max) -- for every event, however old;
- `event.<name>.days` (kind EVENT_DAYS, merge sum): the day record (memstore.engine.days),
  only for an event on a day the retention keeps (today and the `event_days` - 1 days
  before it, by the engine's clock). An older event changes the three aggregates only:
  the same state as if it had been tracked on time and its day had since expired.

Expiry (`plan_expire`) rewrites, a slice at a time, the profiles whose day records hold a
day before the retention; the shard runs it in the background. It does not raise a
profile's version: no caller changed the profile, and a version is what callers compare.
"""

from __future__ import annotations

import re
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import add, itemgetter
from operator import setitem as setitem_list
from typing import TYPE_CHECKING, Any

import numpy as np
from pyroaring import BitMap

from memstore.engine import days
from memstore.engine.change import array_of, raw_array
from memstore.engine.identity import id_key
from memstore.engine.schema import INT64_MAX, Kind, Merge
from memstore.errors import InvalidArgument, MemstoreError, NotFound, brief
from memstore.gcpause import gc_paused
from memstore.hashslot import slots_of
from memstore.pbvalues import MAX_MICROS, MIN_MICROS, TIMESTAMP_RANGE, micros_in_range

if TYPE_CHECKING:
    from memstore.engine.change import Change
    from memstore.engine.core import Engine

EVENT_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
EXPIRE_SLICE = 500  # profiles a change of the expiry sweep rewrites

# A tracked event: (primary id, or an identifier (kind, value) of the profile), event
# name, time in microseconds since the epoch (UTC), count >= 1.
Event = tuple[str | tuple[str, str], str, int, int]


def event_attributes(event: str) -> list[tuple[str, Kind, bool, Merge]]:
    """The attributes tracking `event` writes, as declarations, in declaration order."""
    prefix = f"event.{event}"
    return [(f"{prefix}.count", Kind.INT, True, Merge.SUM),
            (f"{prefix}.first", Kind.TIMESTAMP, True, Merge.MIN),
            (f"{prefix}.last", Kind.TIMESTAMP, True, Merge.MAX),
            (f"{prefix}.days", Kind.EVENT_DAYS, True, Merge.SUM)]


def check_event(event: Any, at: Any, count: Any, where: str = "") -> None:
    """Raise InvalidArgument naming the field (after `where`) of a bad event."""
    if not isinstance(event, str) or not EVENT_NAME.match(event):
        raise InvalidArgument(f"{where}event: name {brief(event)} must be 1-128 letters, "
                              "digits, _ or -")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidArgument(f"{where}count: must be at least 1, got {count!r}")
    if count > INT64_MAX:
        raise InvalidArgument(f"{where}count: {count} does not fit in int64")
    if isinstance(at, bool) or not isinstance(at, int) or not micros_in_range(at):
        raise InvalidArgument(f"{where}at: {at!r} microseconds is outside {TIMESTAMP_RANGE}")


@dataclass(slots=True)
class Tracked:
    """What the batch planner worked out, kept so `Engine.apply` updates the indexes a
    column at a time: the images are existing profiles first, then `len(slots)` new ones
    from dense id `first` on; `ranges`: per range-indexed attribute, (dense ids, old
    values, whether each had one, new values); `cells`: per day record attribute, (dense
    ids, days, counts before, counts after)."""

    first: int
    slots: list[int]
    ranges: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    cells: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]

    def to_state(self) -> list[Any]:
        """For the log (a tracked batch's record carries it, docs/log-format.md), so that
        recovery and replicas change the indexes a column at a time as the batch did,
        instead of taking every after-image and the profile it replaces apart: [first,
        slots, [[aid, ids, old, had, new], ...], [[aid, ids, days, before, after], ...]],
        each array as its bytes in the narrowest integer type holding it (day numbers
        fit in 16 bits, most counts in 8)."""
        return [self.first, raw_array(np.asarray(self.slots, dtype=np.uint16)),
                [[aid, *(raw_array(column, narrow=True) for column in columns)]
                 for aid, columns in self.ranges.items()],
                [[aid, *(raw_array(column, narrow=True) for column in columns)]
                 for aid, columns in self.cells.items()]]

    @classmethod
    def from_state(cls, state: list[Any]) -> Tracked:
        first, slots, ranges, cells = state

        def column(raw: list[Any], dtype: type) -> np.ndarray:  # array_of's copy, widened
            return array_of(raw).astype(dtype, copy=False)

        return cls(first, array_of(slots).tolist(),
                   {aid: (column(ids, np.uint32), column(old, np.int64), column(had, bool),
                          column(new, np.int64))
                    for aid, ids, old, had, new in ranges},
                   {aid: (column(ids, np.uint32), column(on, np.int64), column(was, np.int64),
                          column(now, np.int64))
                    for aid, ids, on, was, now in cells})


_BYTE = [bytes((i,)) for i in range(0x80)]  # a one-byte varint
_U32 = struct.Struct("<I")  # a day record's newest day
_ABSENT = -(1 << 63)  # INT64_MIN: how _plan_columns reads an absent count, first or last
FAST_FROM = 64  # batches this large take the column-at-a-time path when they can


@gc_paused  # a batch's decoded profiles (~4 containers each) are young, alive and many:
# a collection in the middle of one traversed them all (20-25 ms, logged by served shards)
def plan_track(engine: Engine, events: Sequence[Event], where: str | None = None) -> Change:
    """Plan `events` as one change; the result is how many were applied (all of them).

    `where` names the batch in errors (`events[3].count: ...`), and an error's `record`
    says which event refused it; None: a single Track, whose errors name the field alone.
    Every event raises its profile's version by one, as one Track would."""
    if where is not None and len(events) >= FAST_FROM:
        change = _plan_columns(engine, events)
        if change is not None:
            return change
    return _plan_general(engine, events, where)


def _plan_columns(engine: Engine, events: Sequence[Event]) -> Change | None:
    """The batch path: the same change `_plan_general` plans, worked out in numpy columns
    (events grouped by profile and event name with one sort; counts, first and last times
    and day cells reduced per group), each profile decoded and encoded once, and the index
    changes handed to `apply` as columns (Tracked). No Python bytecode runs per event or
    per profile: maps over lists do the per-profile and per-group work in C (msgpack's
    decode and encode are most of what is left), and one short loop walks the day cells
    (a (profile, event, day) each). None when the general planner must plan it:
    an event it would refuse (it names it), an identifier key, an id that is merged away,
    held or not in an owned slot, an event whose attributes are declared otherwise (or not
    yet, on a router's shard: the router declares them), a new profile's id on the
    suppression list, or counts so large that a
    batch's sum might not fit in int64. The attributes of an event new to the shard are
    declared by the change, as the general planner declares them."""
    from memstore.engine.blob import decode_many, encode_many
    from memstore.engine.change import Change, Image
    from memstore.engine.planner import Planner

    keys, names, times, counts = zip(*events, strict=True)
    if set(map(type, keys)) != {str} or set(map(type, names)) != {str}:
        return None
    if not set(map(type, times)) <= {int} or not set(map(type, counts)) <= {int}:
        return None
    if min(times) < MIN_MICROS or max(times) > MAX_MICROS or min(counts) < 1 \
            or max(counts) > INT64_MAX // len(events):
        return None  # (a sum of the batch's counts always fits in int64 here)
    if min(map(len, keys)) == 0 or max(map(len, keys)) * 4 > 256:
        return None  # an empty id, or one that may be too long in utf-8
    by_name = engine.schema.by_name
    specs: dict[str, list[int]] = {}
    planner: Planner | None = None  # declares the attributes of events new to this shard
    for name in dict.fromkeys(names):
        if not EVENT_NAME.match(name):
            return None
        wanted = event_attributes(name)
        declared = [by_name.get(n) for n, _, _, _ in wanted]
        if any(spec is not None and (spec.kind is not kind or not spec.indexed)
               for spec, (_, kind, _, _) in zip(declared, wanted, strict=True)):
            return None  # declared otherwise: the general planner says what is wrong
        if None in declared:
            if engine.cluster_schema:
                return None  # a router's write: the general planner refuses it (Undeclared)
            planner = planner or Planner(engine)
            declared = [planner.declare(n, kind, indexed, merge)
                        for n, kind, indexed, merge in wanted]
        specs[name] = [spec.id for spec in declared]  # type: ignore[union-attr]
    if (any(map(engine.aliases.__contains__, keys)) or any(map(engine.held.__contains__, keys))
            or (engine.forwards and any(map(engine.forwards.__contains__, keys)))):
        return None
    blobs = engine.blobs
    n = len(events)
    # New profiles (the ids not found: one vectorized look-up) take dense ids in the
    # order their ids first appear, as the general planner gives them.
    dense = engine.dense_of.many(keys)  # -1: no profile yet
    where_new = np.flatnonzero(dense < 0).tolist()
    new_pids = list(dict.fromkeys(map(keys.__getitem__, where_new)))
    if engine.suppressed and any(engine.hashed(id_key(pid)) in engine.suppressed
                                 for pid in new_pids):
        return None  # an erased id on the blocked list: the general planner refuses it
    slots = slots_of(new_pids)
    owned = engine.owned_slots
    if owned is not None and not owned.issuperset(BitMap(slots)):
        return None
    first = len(blobs)
    if new_pids:
        fresh = dict(zip(new_pids, range(first, first + len(new_pids)), strict=True))
        dense[where_new] = np.fromiter(map(fresh.__getitem__, map(keys.__getitem__, where_new)),
                                       dtype=np.int64, count=len(where_new))
    if engine.foreign and first and engine.foreign.intersect(
            BitMap(dense[dense < first].astype(np.uint32))):
        return None
    names_of = list(specs)
    of_name = {name: i for i, name in enumerate(names_of)}
    ev = np.fromiter(map(of_name.__getitem__, names), dtype=np.int64, count=n)
    at = np.array(times, dtype=np.int64)
    cnt = np.array(counts, dtype=np.int64)
    day = at // days.DAY_MICROS
    # Groups: (profile, event), in dense id order; cells: (profile, event, kept day).
    order = np.lexsort((day, ev, dense))
    dense, ev, at, cnt, day = dense[order], ev[order], at[order], cnt[order], day[order]
    group_start = np.flatnonzero(np.concatenate(
        ([True], (dense[1:] != dense[:-1]) | (ev[1:] != ev[:-1]))))
    g_dense, g_ev = dense[group_start], ev[group_start]
    g_count = np.add.reduceat(cnt, group_start)
    g_first = np.minimum.reduceat(at, group_start)
    g_last = np.maximum.reduceat(at, group_start)
    profile_start = np.flatnonzero(np.concatenate(([True], dense[1:] != dense[:-1])))
    p_dense = dense[profile_start]
    p_events = np.diff(np.append(profile_start, n))
    p_groups = np.diff(np.append(np.searchsorted(group_start, profile_start), len(group_start)))
    kept = (day >= max(engine.first_kept(), 0)) & (day <= days.MAX_DAY)
    k_dense, k_ev, k_day, k_cnt = dense[kept], ev[kept], day[kept], cnt[kept]
    if len(k_dense):
        cell_start = np.flatnonzero(np.concatenate(
            ([True], (k_dense[1:] != k_dense[:-1]) | (k_ev[1:] != k_ev[:-1])
             | (k_day[1:] != k_day[:-1]))))
        c_dense, c_ev, c_day = k_dense[cell_start], k_ev[cell_start], k_day[cell_start]
        c_count = np.add.reduceat(k_cnt, cell_start)
    else:
        c_dense = c_ev = c_day = c_count = np.zeros(0, dtype=np.int64)
    aids = [specs[name] for name in names_of]
    count_ids, first_ids, last_ids, record_ids = np.array(aids, dtype=np.int64)[g_ev].T.tolist()
    # Each profile decoded once (those that exist come first: dense ids sort them), and
    # from here on Python iterates in C (map) over profiles, groups and cells.
    dense_list = p_dense.tolist()
    existing = int(np.searchsorted(p_dense, first))
    states = decode_many(blobs.take(dense_list[:existing]))  # type: ignore[arg-type]
    states += [[0, {}, [], []] for _ in range(len(dense_list) - existing)]
    g_attrs = list(map(list(map(itemgetter(1), states)).__getitem__,
                       np.repeat(np.arange(len(states)), p_groups).tolist()))
    # (count, first, last) before, per group, read in one pass over the groups' dicts (a
    # pass a column cost twice as much: each get a call through map). Absent reads as
    # INT64_MIN, which no timestamp is (stored ones lie in MIN_MICROS..MAX_MICROS); an int
    # count may be, so a count read so is looked up again.
    raw = np.array([(attrs.get(c, _ABSENT), attrs.get(f, _ABSENT), attrs.get(last, _ABSENT))
                    for attrs, c, f, last in zip(g_attrs, count_ids, first_ids, last_ids)],
                   dtype=np.int64).reshape(-1, 3)
    had = raw != _ABSENT
    unsure = np.flatnonzero(~had[:, 0]).tolist()
    if unsure:
        had[unsure, 0] = list(map(dict.__contains__, map(g_attrs.__getitem__, unsure),
                                  map(count_ids.__getitem__, unsure)))
    was = np.where(had, raw, 0)
    if (was[:, 0] > INT64_MAX - g_count).any():
        return None  # a count would pass int64: the general planner refuses it, naming it
    new_count = was[:, 0] + g_count
    new_first = np.where(had[:, 1], np.minimum(was[:, 1], g_first), g_first)
    new_last = np.where(had[:, 2], np.maximum(was[:, 2], g_last), g_last)
    for attrs, c, f, last, count_, first_, last_ in zip(
            g_attrs, count_ids, first_ids, last_ids, new_count.tolist(), new_first.tolist(),
            new_last.tolist()):
        attrs[c], attrs[f], attrs[last] = count_, first_, last_
    # Day records, a cell at a time (cells sort as their groups do; a group's cells by day).
    c_group = np.searchsorted(g_dense * len(names_of) + g_ev, c_dense * len(names_of) + c_ev
                              ).tolist()
    # Each cell as a record of its day alone (days.encode's bytes, for counts below 0x80)
    alone = np.zeros((len(c_day), 5), dtype=np.uint8)
    alone[:, :4] = c_day.astype("<u4").view(np.uint8).reshape(-1, 4)
    alone[:, 4] = np.minimum(c_count, 0x7F)
    packed = alone.tobytes()
    alone_of = map(packed.__getitem__, map(slice, range(0, 5 * len(c_day), 5),
                                           range(5, 5 * len(c_day) + 5, 5)))
    before: list[int] = []
    add_one, newest = days.add_one, _U32.unpack_from
    for attrs, record_id, day_, count, record_alone in zip(
            map(g_attrs.__getitem__, c_group), map(record_ids.__getitem__, c_group),
            c_day.tolist(), c_count.tolist(), alone_of, strict=True):
        raw = attrs.get(record_id)
        if count < 0x80:  # the usual cases inline: add_one's bytes without its calls
            if raw is None:  # a first day
                attrs[record_id] = record_alone
                before.append(0)
                continue
            gap = day_ - newest(raw)[0]
            if 0 < gap < 0x80:  # a day after the newest, a gap of one byte
                attrs[record_id] = record_alone + _BYTE[gap] + raw[4:]
                before.append(0)
                continue
        attrs[record_id], count_before = add_one(raw, day_, count)
        before.append(count_before)
    # Versions (one an event), then the after-images, old profiles first, new in order.
    _drain(map(setitem_list, states, repeat(0), map(add, map(itemgetter(0), states),
                                                    p_events.tolist())))
    pids = engine.pids.take(p_dense[:existing]) + new_pids
    images: list[Image] = list(map(tuple.__new__, repeat(Image), zip(
        dense_list, pids, encode_many(states), repeat(None))))
    # The index changes, a column per attribute: range values that changed, day cells.
    changed = np.column_stack((np.ones(len(g_dense), dtype=bool),
                               ~had[:, 1] | (new_first != was[:, 1]),
                               ~had[:, 2] | (new_last != was[:, 2])))
    values = (new_count, new_first, new_last)
    ranges: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    cell_columns: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    c_before = np.array(before, dtype=np.int64)
    top = days.MAX_COUNT
    c_after = np.where(c_before > top - c_count, top, c_before + c_count)
    for e, event_aids in enumerate(aids):
        mine = g_ev == e
        for at_column in range(3):
            rows = np.flatnonzero(mine & changed[:, at_column])
            if len(rows):
                ranges[event_aids[at_column]] = (
                    g_dense[rows].astype(np.uint32), was[rows, at_column], had[rows, at_column],
                    values[at_column][rows])
        rows = np.flatnonzero(c_ev == e)
        if len(rows):
            cell_columns[event_aids[3]] = (c_dense[rows].astype(np.uint32), c_day[rows],
                                           c_before[rows], c_after[rows])
    return Change(schema=[] if planner is None else list(planner.added), images=images,
                  result=n, tracked=Tracked(first, slots, ranges, cell_columns))


def _plan_general(engine: Engine, events: Sequence[Event], where: str | None) -> Change:
    from memstore.engine.identity import check_identifier, check_pid
    from memstore.engine.planner import Planner

    def at(i: int) -> str:
        return "" if where is None else f"{where}[{i}]."

    names: dict[str, None] = {}
    for i, (key, event, when, count) in enumerate(events):
        try:
            if isinstance(key, str):
                check_pid(key, f"{at(i)}id")
            else:
                check_identifier(key[0], key[1], f"{at(i)}identifier")
            if event not in names:
                check_event(event, when, count, at(i))
                names[event] = None
            else:
                check_event(event, when, count, at(i))
        except MemstoreError as exc:
            exc.record = i
            raise
    engine.require_declared(spec for name in names for spec in event_attributes(name))
    planner = Planner(engine)
    specs = {name: [planner.declare(n, kind, indexed, merge)
                    for n, kind, indexed, merge in event_attributes(name)]
             for name in names}
    first_kept = engine.first_kept()
    pending: dict[tuple[str, int], list[tuple[int, int]]] = {}  # (pid, aid) -> (day, count)
    for i, (key, event, when, count) in enumerate(events):
        try:
            if isinstance(key, str):
                pid = key
            else:
                dense = engine.lookup(identifier=key)
                owner = None if dense is None or dense in engine.foreign else engine.pids[dense]
                if owner is None:
                    raise NotFound(f"{at(i)}identifier: no profile holds {key[0]}:{key[1]!r}")
                pid = owner
            d = planner.draft(pid, create=True)
        except MemstoreError as exc:
            exc.record = i
            raise
        assert d is not None
        n, first, last, record = specs[event]
        attrs = d.attrs
        total = attrs.get(n.id, 0) + count
        if total > INT64_MAX:  # never capped: a count that is wrong is refused
            error = InvalidArgument(f"{at(i)}count: {n.name} of {d.pid!r} is "
                                    f"{total - count}; {count} more would pass int64")
            error.record = i
            raise error
        attrs[n.id] = total
        attrs[first.id] = min(attrs.get(first.id, when), when)
        attrs[last.id] = max(attrs.get(last.id, when), when)
        d.version += 1
        pending.setdefault((d.pid, record.id), []).append((days.day_of(when), count))
    for (pid, aid), added in pending.items():
        d = planner.drafts[planner.resolve_pid(pid)]
        day_record, _ = days.add(d.attrs.get(aid), added, first_kept)
        if day_record is not None:
            d.attrs[aid] = day_record
    if where is None:  # a single Track answers the profile's new version
        assert d is not None
        return planner.finish(d.version)
    return planner.finish(len(events))


def plan_expire(engine: Engine, limit: int = EXPIRE_SLICE) -> Change:
    """Rewrite up to `limit` profiles whose day records hold days before the retention,
    without those days. The result is how many; an empty change when none is left (held
    profiles and those in slots this shard does not own wait until they are its own)."""
    from memstore.engine.blob import decode, encode
    from memstore.engine.change import Change, Image

    first_kept = engine.first_kept()
    stale = BitMap()
    for index in engine.day_index.values():
        oldest = index.first_day()
        if oldest is not None and oldest < first_kept:
            stale |= index.holders(oldest, first_kept - 1)
    if engine.foreign:
        stale -= engine.foreign
    if engine.held_dense:
        stale -= engine.held_dense
    records = engine.day_index.keys()
    images: list[Image] = []
    for dense in stale[:limit]:
        blob = engine.blobs[dense]
        assert blob is not None
        version, attrs, idents, merged = decode(blob)
        for aid in records & attrs.keys():
            kept = days.expire(attrs[aid], first_kept)
            if kept is None:
                del attrs[aid]
            else:
                attrs[aid] = kept
        pid = engine.pids[dense]
        assert pid is not None
        images.append(Image(dense, pid, encode(version, attrs, idents, merged)))
    return Change(images=images, result=len(images))


def stale_days(engine: Engine) -> bool:
    """Whether some day record holds a day before the retention (expiry has work)."""
    first_kept = engine.first_kept()
    return any((oldest := index.first_day()) is not None and oldest < first_kept
               for index in engine.day_index.values())


def _drain(calls: Any) -> None:
    """Run an iterator of calls (map) for their effect, in C."""
    deque(calls, maxlen=0)
