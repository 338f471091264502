"""Applying Changes to an engine: the one way its state changes. Bound as Engine methods
(`engine.apply(change)`), as the planners' modules are.

- `apply` takes a Change's declarations and notes first, then its after-images: a planned
  load (Change.load) or batch of tracks (Change.tracked) a column at a time, anything
  else an image at a time (`apply_images`: blobs, ids, identifiers and indexes kept in
  step; memstore.engine.indexing does the indexes);
- it returns what undoes it (`undo`: the before-images, notes and times replaced, the
  declarations to drop), for a change the log could not make durable;
- recovery adds logged loads and tracked batches as they were logged (`add_loaded`,
  `adding_loads`, `replay_tracked`), without an Image object a profile.

Applying never fails on input: planning checked it, and the shard applies a change right
after its log append, with no await in between (memstore.shard).
"""

from __future__ import annotations

import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import repeat
from typing import TYPE_CHECKING, Any

import numpy as np
from pyroaring import BitMap

from memstore.engine.blob import decode, ident_key
from memstore.engine.change import Change, Image, ImageColumns, Load, Note, Undo
from memstore.engine.schema import AttributeSpec
from memstore.engine.segments import Touched
from memstore.hashslot import slot_of
from memstore.index.blobtable import join_blobs
from memstore.index.dense import bitmap_of

if TYPE_CHECKING:
    from memstore.engine.core import Engine


def apply(engine: Engine, change: Change, touched: Touched | None = None, undo: bool = True) -> Undo:
    """Apply `change`; returns what undoes it (Engine.undo). `touched` collects what it
    did to which profiles (for saved segments and change streams). `undo` False: the
    caller never undoes it (replay), so a tracked batch's undo is not built and the
    Undo returned is not one."""
    declared, notes = engine._declare_and_note(change)
    if change.erasure:
        engine.erasures += 1
    at = change.at or int(engine.clock())
    if change.load is not None and change.load.first == len(engine.blobs):
        added = engine._apply_load(change.images, change.load, at)
        if touched is not None:
            first = change.load.first
            touched.created_with(range(first, first + len(change.images)),
                                 [aid for aid, _, _ in change.load.columns])
        return Undo([], notes, added, schema=declared)
    if change.tracked is not None and change.tracked.first == len(engine.blobs):
        undone = engine._apply_tracked(change.images, change.tracked, at, touched, undo)
        undone.notes, undone.schema = notes, declared
        return undone
    stamped: list[tuple[int, int, int]] = []
    return Undo(engine.apply_images(change.images, at, change.times, stamped, touched), notes,
                times=stamped, schema=declared)

def declare_and_note(engine: Engine, change: Change) -> tuple[list[AttributeSpec], list[Note]]:
    """What a change declares and notes, applied first: the specs it declared (those
    at the next attribute id) and the notes that undo its notes."""
    declared: list[AttributeSpec] = []
    for spec in change.schema:
        if spec.id == len(engine.schema.by_id):
            engine.add_attribute(spec)
            declared.append(spec)
    return declared, engine.apply_notes(change.notes) if change.notes else []

def apply_tracked(engine: Engine, images: list[Image], tracked: Any, at: int,
                   touched: Touched | None = None, undo: bool = True) -> Undo:
    """apply_images for a planned batch of tracks (memstore.engine.tracking.Tracked):
    blobs swapped, new profiles added at the end, indexes changed a column at a time;
    every profile stamped as changed at `at` (new ones as created then too). No
    Python frame per profile: a batch carries tens of thousands."""
    first, added = tracked.first, len(tracked.slots)
    kept = len(images) - added
    blobs, created, changed = engine.blobs, engine.created, engine.changed
    old_ids, old_pids, old_blobs, _ = zip(*images[:kept], strict=True) if kept \
        else ((), (), (), ())
    before: list[Image] = []
    stamped: list[tuple[int, int, int]] = []
    if undo:
        before = list(map(tuple.__new__, repeat(Image), zip(
            old_ids, old_pids, blobs.take(old_ids), repeat(None))))
        stamped = list(zip(old_ids, map(created.__getitem__, old_ids),
                           map(changed.__getitem__, old_ids)))
    old = np.fromiter(old_ids, dtype=np.int64, count=kept)
    blobs.put_many(old, old_blobs)
    pids = [image.pid for image in images[kept:]]
    engine._add_tracked(tracked, old, at, pids,
                      lambda: engine.blobs.extend(image.blob for image in images[kept:]),
                      touched)
    before.reverse()
    return Undo(before, [], (first, pids) if added else None, times=stamped)

def replay_tracked(engine: Engine, change: Change, columns: ImageColumns) -> bool:
    """apply(change, undo=False) for a logged batch of tracks whose after-images came
    as columns (RECORD_COLUMNS), their blobs copied as logged: no Image, and no blob
    joined again. False, with nothing done, where the columns are not the batch's as
    applied live (its new profiles do not start at the next dense id, or are not its
    last images in order, or an image is a removal): apply(change) then, as live."""
    tracked = change.tracked
    first, added = tracked.first, len(tracked.slots)
    kept = len(columns.pids) - added
    if (first != len(engine.blobs) or kept < 0 or int(columns.lengths.min(initial=0)) < 0
            or not np.array_equal(columns.dense[kept:], np.arange(first, first + added))):
        return False
    engine._declare_and_note(change)
    split = int(columns.lengths[:kept].sum())
    old = np.asarray(columns.dense[:kept], dtype=np.int64)
    engine.blobs.put_joined(old, columns.joined[:split], columns.lengths[:kept])

    def add_blobs() -> None:
        engine.blobs.grow(first + added)
        engine.blobs.put_joined(range(first, first + added), columns.joined[split:],
                              columns.lengths[kept:])

    engine._add_tracked(tracked, old, change.at or int(engine.clock()), columns.pids[kept:],
                      add_blobs)
    return True

def add_tracked(engine: Engine, tracked: Any, old: np.ndarray, at: int, pids: list[str],
                 add_blobs: Callable[[], None], touched: Touched | None = None) -> None:
    """What a batch of tracks does once the blobs of the profiles it changed (`old`
    dense ids) are swapped: they are stamped changed at `at`; its new profiles
    (`pids`, their blobs added by `add_blobs`) added at the end; the indexes changed
    from its columns; `touched` told."""
    first, added = tracked.first, len(tracked.slots)
    created, changed = engine.created, engine.changed
    if len(old):
        view = np.frombuffer(changed, dtype=np.uint32)
        view[old] = at
        del view  # (an exported buffer would stop `changed` growing below)
    if added:
        add_blobs()
        engine.pids.extend(pids)
        stamps = array.array("I", [at]) * added
        created.extend(stamps)
        changed.extend(stamps)
        engine.live.add_range(first, first + added)
        engine.slots.extend(tracked.slots)
    for aid, (ids, was, had, new) in tracked.ranges.items():
        engine.range_index[aid].replace_many(ids, was, had, new)
    for aid, (ids, on, was, now) in tracked.cells.items():
        engine.day_index[aid].bump_many(ids, on, was, now)
    if touched is not None:
        _touched_by_columns(touched, first, added, [
            (aid, columns[0]) for columns_of in (tracked.ranges, tracked.cells)
            for aid, columns in columns_of.items()])

def undo(engine: Engine, undo: Undo) -> None:
    if undo.added is not None:  # the load's profiles become absent again, newest first
        first, pids = undo.added
        engine.apply_images(map(Image._make, zip(reversed(range(first, first + len(pids))),
                                               reversed(pids), repeat(None), repeat(None))))
    engine.apply_images(undo.images)
    for dense, created, changed in reversed(undo.times):
        engine.created[dense], engine.changed[dense] = created, changed
    engine.apply_notes(undo.notes)
    for spec in reversed(undo.schema):  # declared by the change: the newest ids
        engine.schema.drop_last(spec)
        engine.range_index.pop(spec.id, None)
        engine.value_index.pop(spec.id, None)
        engine.exists.pop(spec.id, None)
        engine.day_index.pop(spec.id, None)

def apply_notes(engine: Engine, notes: Iterable[Note]) -> list[Note]:
    """Set or remove merge-table entries; returns the notes that undo them (in order)."""
    before: list[Note] = []
    for note in notes:
        if note.table == "claims":
            before.append(Note("claims", note.key, engine.claims.swap(note.key, note.value)))
            continue
        if note.table == "segments":
            before.append(Note("segments", note.key,
                               engine.segments.set_definition(note.key, note.value)))
            continue
        table: dict[str, Any] = getattr(engine, note.table)
        before.append(Note(note.table, note.key, table.get(note.key)))
        if note.value is None:
            table.pop(note.key, None)
        else:
            table[note.key] = note.value
        if note.table == "held":
            dense = engine.dense_of.get(note.key)
            if dense is not None:
                if note.value is None:
                    engine.held_dense.discard(dense)
                else:
                    engine.held_dense.add(dense)
    before.reverse()
    return before



def apply_images(engine: Engine, images: Iterable[Image], at: int | None = None,
                 times: Mapping[int, tuple[int, int]] | None = None,
                 stamped: list[tuple[int, int, int]] | None = None,
                 touched: Touched | None = None) -> list[Image]:
    """Apply after-images; with `at`, stamp each as changed then (and a new profile as
    created then), or as `times` says, adding the times replaced to `stamped`. Without
    (undo, records from before times were logged), times stay as they are, but an
    erased profile's are cleared. `touched` collects what it did to which profiles
    (for saved segments and change streams)."""
    before: list[Image] = []
    fresh: list[tuple[int, dict[int, Any]]] = []
    fresh_keys: list[int] = []  # identifiers of new profiles, entered at the end
    fresh_owners: list[int] = []
    created, changed = engine.created, engine.changed
    for image in images:
        dense, pid, blob = image.dense, image.pid, image.blob
        if dense >= len(engine.blobs):
            engine._grow(dense + 1)
        old = engine.blobs[dense]
        old_pid = engine.pids[dense]  # (read once: a PidTable read decodes the id)
        before.append(Image(dense, old_pid or pid, old))
        if old is None and blob is None:
            continue
        if at is not None:
            if stamped is not None:
                stamped.append((dense, created[dense], changed[dense]))
            if blob is None:
                created[dense] = changed[dense] = 0
            elif times and dense in times:
                created[dense], changed[dense] = times[dense]
            else:
                changed[dense] = at
                if old is None:
                    created[dense] = at
        elif blob is None:
            created[dense] = changed[dense] = 0
        new_state = image.state if image.state is not None else (
            decode(blob) if blob is not None else None)
        if old is None:
            assert new_state is not None
            engine.blobs[dense] = blob
            engine.pids[dense] = pid  # (and dense_of[pid] = dense)
            engine.live.add(dense)
            slot = engine.slots[dense] = slot_of(pid)
            if engine.owned_slots is not None and slot not in engine.owned_slots:
                engine.foreign.add(dense)
            fresh.append((dense, new_state[1]))
            for kind, value in new_state[2]:
                fresh_keys.append(ident_key(kind, value))
                fresh_owners.append(dense)
            for m in new_state[3]:
                engine.aliases[m] = pid
            if touched is not None:
                touched.created_with((dense,), new_state[1])
            continue
        old_state = decode(old)
        assert old_pid is not None
        if touched is not None:
            if new_state is None:
                touched.removed.add(dense)
            else:
                old_attrs, new_attrs = old_state[1], new_state[1]
                touched.update(dense, [a for a, v in new_attrs.items()
                                       if a not in old_attrs or old_attrs[a] != v],
                               [a for a in old_attrs if a not in new_attrs])
        if new_state is None:
            engine.blobs[dense] = None
            engine.pids[dense] = None  # (and out of dense_of)
            engine.live.discard(dense)
            engine.foreign.discard(dense)
            engine._reindex(dense, old_state[1], {})
            engine._reidentify(dense, old_pid, old_state[2], old_state[3], [], [])
        else:
            engine.blobs[dense] = blob
            engine._reindex(dense, old_state[1], new_state[1])
            engine._reidentify(dense, pid, old_state[2], old_state[3], new_state[2],
                             new_state[3])
    if fresh:
        engine._index_fresh(fresh)
    if len(fresh_keys) > 64:  # a load: one vectorized insert
        engine.directory.update(np.array(fresh_keys, dtype=np.uint64),
                              np.array(fresh_owners, dtype=np.uint32))
    else:
        for key, dense in zip(fresh_keys, fresh_owners, strict=True):
            engine.directory[key] = dense
    before.reverse()
    return before

def grow(engine: Engine, size: int) -> None:
    """Make room for dense ids below `size`."""
    grow = size - len(engine.blobs)
    engine.blobs.grow(size)
    engine.pids.grow(size)
    engine.slots.frombytes(bytes(grow * engine.slots.itemsize))
    engine.created.frombytes(bytes(grow * engine.created.itemsize))
    engine.changed.frombytes(bytes(grow * engine.changed.itemsize))

def apply_load(engine: Engine, images: list[Image], load: Load, at: int) -> tuple[int, list[str]]:
    """apply_images for a planned load (Change.load): new profiles at the end, indexed
    from the planner's columns. Returns (first dense id, primary ids): what undoes it."""
    pids = [image.pid for image in images]
    blobs = join_blobs([image.blob for image in images])  # type: ignore[misc]
    engine.add_loaded(load, pids, [blobs], at)
    return load.first, pids

def add_loaded(engine: Engine, load: Load, pids: list[str], blobs: list[tuple[bytes, np.ndarray]],
               at: int) -> None:
    """A planned load's new profiles at the end (`load.first` is the next dense id):
    their primary ids, their blobs given joined in parts (each part's bytes and the
    length of each blob in it, in dense id order), created and changed at `at` (or
    load.stamps), indexed from the load's columns. Recovery adds a run of logged loads
    this way, each record's blobs as they were logged (no object a blob)."""
    first, end = load.first, load.first + len(pids)
    if sum(map(len, (lengths for _, lengths in blobs))) != len(pids):
        raise ValueError(f"blobs for {len(pids)} profiles do not match their ids")
    engine.blobs.grow(end)
    start = first
    for joined, lengths in blobs:
        engine.blobs.put_joined(range(start, start + len(lengths)), joined, lengths)
        start += len(lengths)
    engine.pids.extend(pids)
    stamps = array.array("I", [at]) * len(pids)
    if load.stamps is not None:
        stamps = array.array("I", load.stamps.astype(np.uint32).tobytes())
    engine.created.extend(stamps)
    engine.changed.extend(stamps)
    engine.live.add_range(first, end)
    engine.slots.extend(load.slots)
    if engine.owned_slots is not None:
        owned = engine.owned_slots
        engine.foreign.update([d for d, slot in zip(range(first, end), load.slots, strict=True)
                             if slot not in owned])
    if load.keys.size:
        owners = np.asarray(load.owners, dtype=np.uint32)
        if engine._keys_builder is None:
            engine.directory.insert_absent(load.keys, owners)
        else:  # (adding_loads)
            engine._keys_built.append(engine._keys_builder.submit(
                engine.directory.insert_absent, load.keys, owners))
    engine._index_columns({aid: (ids, values) for aid, ids, values in load.columns})

@contextmanager
def adding_loads(engine: Engine) -> Iterator[None]:
    """add_loaded calls within enter their primary ids into the id index together as
    it ends (the table grown and filled once, where each call grew and filled it
    again), and their identifier keys into the directory on a thread of its own, one
    call's after another, while the next calls go on here (inserting keys is numpy
    sorts and scatters, which let go of the GIL). Recovery's runs of logged loads:
    ~0.8 s of 1M profiles' replay. Until it ends, nothing but add_loaded may use the
    engine."""
    with ThreadPoolExecutor(1, thread_name_prefix="directory") as builder:
        engine._keys_builder = builder
        try:
            with engine.pids.loading():
                yield
        finally:
            engine._keys_builder = None
            built, engine._keys_built = engine._keys_built, []
            for keys in built:
                keys.result()



def _touched_by_columns(touched: Touched, first: int, added: int,
                        columns: list[tuple[int, np.ndarray]]) -> None:
    """What a batch of tracks did, from its index columns ((attribute id, dense ids)): the
    profiles from `first` on were created (`added` of them); each older one changed the
    attributes whose columns name it (its diff, attributes in column order)."""
    if added:
        touched.created_with(range(first, first + added), ())
    for aid, ids in columns:
        touched.changed.setdefault(aid, BitMap()).update(bitmap_of(ids))
    if not columns:
        return
    dense = np.concatenate([ids for _, ids in columns]).astype(np.int64)
    aids = np.repeat(np.array([aid for aid, _ in columns], dtype=np.int64),
                     [len(ids) for _, ids in columns])
    older = dense < first
    dense, aids = dense[older], aids[older]
    if not len(dense):
        return
    order = np.argsort(dense, kind="stable")
    dense, aids = dense[order], aids[order]
    starts = np.flatnonzero(np.concatenate(([True], dense[1:] != dense[:-1])))
    bounds = np.append(starts, len(dense)).tolist()
    listed = aids.tolist()
    touched.diffs.update(zip(dense[starts].tolist(), zip(
        map(listed.__getitem__, map(slice, bounds[:-1], bounds[1:])),
        map(list, repeat((), len(starts)))), strict=True))
