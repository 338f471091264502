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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pyroaring import BitMap

from memstore.engine import days
from memstore.engine.schema import INT64_MAX, Kind, Merge
from memstore.errors import InvalidArgument, MemstoreError, NotFound, brief
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


FAST_FROM = 64  # batches this large take the column-at-a-time path when they can


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
    """The batch path: the same change `_plan_general` plans, checked a column at a time,
    each profile decoded and encoded once, and the index changes worked out for `apply`
    (Tracked). None when the general planner must plan it: an event it would refuse (it
    names it), an identifier key, an id that is merged away, held or not in an owned slot,
    or an event whose attributes are not declared yet."""
    from memstore.engine.blob import decode, encode
    from memstore.engine.change import Change, Image

    keys, names, times, counts = zip(*events, strict=True)
    if set(map(type, keys)) != {str} or set(map(type, names)) != {str}:
        return None
    if not set(map(type, times)) <= {int} or not set(map(type, counts)) <= {int}:
        return None
    if min(times) < MIN_MICROS or max(times) > MAX_MICROS or min(counts) < 1 \
            or max(counts) > INT64_MAX:
        return None
    if min(map(len, keys)) == 0 or max(map(len, keys)) * 4 > 256:
        return None  # an empty id, or one that may be too long in utf-8
    by_name = engine.schema.by_name
    specs: dict[str, list[int]] = {}
    for name in set(names):
        if not EVENT_NAME.match(name):
            return None
        wanted = event_attributes(name)
        declared = [by_name.get(n) for n, _, _, _ in wanted]
        if any(spec is None or spec.kind is not kind or not spec.indexed
               for spec, (_, kind, _, _) in zip(declared, wanted, strict=True)):
            return None  # not declared yet, or declared otherwise: the general planner
        specs[name] = [spec.id for spec in declared]  # type: ignore[union-attr]
    if (any(map(engine.aliases.__contains__, keys)) or any(map(engine.held.__contains__, keys))
            or (engine.forwards and any(map(engine.forwards.__contains__, keys)))):
        return None
    dense_of, blobs, _pids = engine.dense_of, engine.blobs, engine.pids
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        group = groups.get(key)
        if group is None:
            groups[key] = [i]
        else:
            group.append(i)
    new_pids = [pid for pid in groups if pid not in dense_of]
    slots = slots_of(new_pids)
    owned = engine.owned_slots
    if owned is not None and not owned.issuperset(BitMap(slots)):
        return None
    if engine.foreign:
        foreign = engine.foreign
        if any(dense_of[pid] in foreign for pid in groups if pid in dense_of):
            return None
    first_kept = engine.first_kept()
    first = next_dense = len(blobs)
    # (attribute, dense id, old value or None, new value) and (attribute, dense id, day,
    # count before, count after): the index changes, put in columns at the end
    ranged: list[tuple[int, int, Any, int]] = []
    cells: list[tuple[int, int, int, int, int]] = []
    old_images: list[Image] = []
    new_images: list[Image] = []
    on_day = (np.array(times, dtype=np.int64) // days.DAY_MICROS).tolist()
    of_event = list(map(specs.__getitem__, names))
    add_one, top = days.add_one, days.MAX_COUNT
    low_day, high_day = max(first_kept, 0), days.MAX_DAY
    for pid, indexes in groups.items():
        dense = dense_of.get(pid)
        if dense is None:
            dense, next_dense = next_dense, next_dense + 1
            version, attrs, idents, merged = 0, {}, [], []
        else:
            version, attrs, idents, merged = decode(blobs[dense])  # type: ignore[arg-type]
        touched: dict[int, Any] = {}  # range attributes' values before
        for i in indexes:
            n, low, high, record = of_event[i]
            when, count = times[i], counts[i]
            if n not in touched:
                touched[n] = attrs.get(n)
                touched[low] = attrs.get(low)
                touched[high] = attrs.get(high)
            had = attrs.get(n)
            if had is not None and had + count > INT64_MAX:
                return None  # the general planner refuses it, naming the event
            attrs[n] = count if had is None else had + count
            had = attrs.get(low)
            if had is None or when < had:
                attrs[low] = when
            had = attrs.get(high)
            if had is None or when > had:
                attrs[high] = when
            day = on_day[i]
            if low_day <= day <= high_day:
                attrs[record], was = add_one(attrs.get(record), day, count)
                cells.append((record, dense, day, was, min(top, was + count)))
        version += len(indexes)
        for aid, old in touched.items():
            value = attrs[aid]
            if old != value:
                ranged.append((aid, dense, old, value))
        image = Image(dense, pid, encode(version, attrs, idents, merged))
        (old_images if dense < first else new_images).append(image)
    return Change(images=old_images + new_images, result=len(events),
                  tracked=Tracked(first, slots, _range_columns(ranged), _cell_columns(cells)))


def _range_columns(rows: list[tuple[int, int, Any, int]]
                   ) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per attribute: (dense ids, old values, whether each had one, new values)."""
    by_aid: dict[int, list[tuple[int, int, Any, int]]] = {}
    for row in rows:
        group = by_aid.get(row[0])
        if group is None:
            by_aid[row[0]] = [row]
        else:
            group.append(row)
    out = {}
    for aid, group in by_aid.items():
        _, ids, old, new = zip(*group, strict=True)
        had = np.fromiter((v is not None for v in old), dtype=bool, count=len(old))
        out[aid] = (np.array(ids, dtype=np.uint32),
                    np.array([0 if v is None else v for v in old], dtype=np.int64), had,
                    np.array(new, dtype=np.int64))
    return out


def _cell_columns(rows: list[tuple[int, int, int, int, int]]
                  ) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per day record attribute: (dense ids, days, counts before, counts after), one row
    per (id, day): a day named twice in a batch keeps its first count before and its last
    count after (rows come in the order the counts changed)."""
    if not rows:
        return {}
    table = np.array(rows, dtype=np.int64)
    # the last row of each (attribute, id, day), with the count before of its first
    order = np.lexsort((table[:, 2], table[:, 1], table[:, 0]))
    table = table[order]
    same = (table[1:, :3] == table[:-1, :3]).all(axis=1)
    if same.any():
        starts = np.flatnonzero(np.concatenate(([True], ~same)))
        ends = np.concatenate((starts[1:], [len(table)])) - 1
        table = np.column_stack((table[ends, :3], table[starts, 3], table[ends, 4]))
    out = {}
    cuts = np.flatnonzero(table[1:, 0] != table[:-1, 0]) + 1
    for part in np.split(table, cuts):
        out[int(part[0, 0])] = (part[:, 1].astype(np.uint32), part[:, 2], part[:, 3],
                                part[:, 4])
    return out


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
