"""Saved segments: named queries whose members one shard keeps current on every write.

A segment is a definition (its name, canonical query text, creation time) and a roaring
bitmap of the dense ids of the profiles that match it. Definitions change by Notes (table
"segments"), so they are logged, snapshotted and undone with the rest of a Change; the
members change by `Deltas`, computed after a change is applied and logged in the same
record, so that replay rebuilds membership without evaluating anything and a watcher
reading the log (memstore/server/watch.py) sees who entered and left, in order.

Keeping members current (`refresh`) never evaluates a query over all profiles: a change
touches a few dense ids (`Touched`: created, removed, and per attribute the ids whose value
changed); a segment is re-evaluated only on the ids that touched one of its attributes, or
a segment it reads (`in_segment`), restricted to those ids, in an order where a segment
comes after the segments it reads. A profile removed leaves every segment holding it.
Segments that read the clock (`did(...)`) also change with no write: `timed` ones are
re-evaluated whole on a timer (`refresh_timed`).

Evaluation is lenient (an attribute no profile here has matches nobody) and a segment whose
query stops evaluating (an attribute later declared of another kind than its literal) is
marked `broken` with the reason and skipped, never failing the write that met it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyroaring import BitMap

from memstore.errors import InvalidArgument
from memstore.query import And, InSegment, Node, Not, Or, Predicate, QueryError, parse

if TYPE_CHECKING:
    from memstore.engine.core import Engine

log = logging.getLogger("memstore.segments")

MAX_SEGMENTS = 1000  # per cluster: each costs a bitmap and work on every write
_TIMED = re.compile(r"\bdid\s*\(", re.IGNORECASE)


@dataclass(slots=True)
class Touched:
    """What an applied change did to which dense ids (Engine.apply collects it)."""

    created: BitMap = field(default_factory=BitMap)
    removed: BitMap = field(default_factory=BitMap)
    changed: dict[int, BitMap] = field(default_factory=dict)  # attribute id -> dense ids
    # dense -> (attribute ids set or changed, attribute ids removed), for updated profiles
    diffs: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)

    def update(self, dense: int, set_ids: list[int], unset_ids: list[int]) -> None:
        for aid in set_ids:
            self.changed.setdefault(aid, BitMap()).add(dense)
        for aid in unset_ids:
            self.changed.setdefault(aid, BitMap()).add(dense)
        self.diffs[dense] = (set_ids, unset_ids)

    def created_with(self, dense_ids: Iterable[int], attribute_ids: Iterable[int]) -> None:
        created = BitMap(dense_ids)
        self.created |= created
        for aid in attribute_ids:
            self.changed.setdefault(aid, BitMap()).update(created)


@dataclass(slots=True)
class Segment:
    name: str
    text: str
    created_at: int  # unix microseconds
    node: Node
    attributes: frozenset[str]
    depends: frozenset[str]
    timed: bool
    members: BitMap = field(default_factory=BitMap)
    broken: str = ""  # why its query stopped evaluating, if it did
    parsed_at: float = 0.0  # when `node` was parsed (did(...) windows end then)


# name -> (profiles that entered, profiles that left)
Deltas = dict[str, tuple[BitMap, BitMap]]


def analyse(node: Node) -> tuple[frozenset[str], frozenset[str]]:
    """The attributes and the segments a query reads."""
    attributes: set[str] = set()
    segments: set[str] = set()

    def walk(n: Node) -> None:
        if isinstance(n, Predicate):
            attributes.add(n.attribute)
        elif isinstance(n, And | Or):
            for child in n.children:
                walk(child)
        elif isinstance(n, Not):
            walk(n.child)
        elif isinstance(n, InSegment):
            segments.add(n.name)

    walk(node)
    return frozenset(attributes), frozenset(segments)


class Segments:
    """One shard's saved segments."""

    def __init__(self) -> None:
        self.by_name: dict[str, Segment] = {}
        self._order: list[Segment] | None = None  # dependencies first

    def __len__(self) -> int:
        return len(self.by_name)

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def get(self, name: str) -> Segment | None:
        return self.by_name.get(name)

    # ------------------------------------------------------------------ definitions
    def definition(self, name: str) -> list[Any] | None:
        """The definition as the "segments" note table holds it: [text, created_at]."""
        segment = self.by_name.get(name)
        return None if segment is None else [segment.text, segment.created_at]

    def set_definition(self, name: str, value: list[Any] | None) -> list[Any] | None:
        """Define (value [text, created_at]) or remove (None) a segment; returns what
        undoes it (a removal's carries the members too, as a third element). A new segment
        starts with no members (Deltas fill it)."""
        before = self.definition(name)
        if value is None:
            removed = self.by_name.pop(name, None)
            if removed is not None and before is not None:
                before.append(removed.members)
        else:
            text, created_at = value[0], value[1]
            node = parse(text)
            attributes, depends = analyse(node)
            old = self.by_name.get(name)
            members = value[2] if len(value) > 2 else (
                old.members if old is not None else BitMap())
            self.by_name[name] = Segment(name, text, int(created_at), node, attributes,
                                         depends, bool(_TIMED.search(text)), members,
                                         parsed_at=time.time())
        self._order = None
        return before

    def dropped_by(self, notes: Iterable[Any]) -> Deltas:
        """Every member of each segment `notes` delete leaves it (watchers replaying the
        stream onto a set end with the segment empty, as it is gone)."""
        return {note.key: (BitMap(), BitMap(self.by_name[note.key].members))
                for note in notes
                if note.table == "segments" and note.value is None
                and note.key in self.by_name and self.by_name[note.key].members}

    def check_definition(self, name: str, node: Node) -> None:
        """Refuse a definition that reads an unknown segment, itself, or makes a cycle."""
        _, depends = analyse(node)
        for dep in sorted(depends):
            if dep != name and dep not in self.by_name:
                raise InvalidArgument(f"query: unknown segment {dep!r}")
        seen: set[str] = set()
        stack = list(depends)
        while stack:
            current = stack.pop()
            if current == name:
                raise InvalidArgument(f"segment {name!r} would read itself through "
                                      "in_segment(...)")
            if current in seen or current not in self.by_name:
                continue
            seen.add(current)
            stack.extend(self.by_name[current].depends)

    def order(self) -> list[Segment]:
        """Every segment, each after the segments it reads."""
        if self._order is None:
            done: dict[str, Segment] = {}

            def visit(segment: Segment, path: tuple[str, ...]) -> None:
                if segment.name in done or segment.name in path:
                    return
                for dep in sorted(segment.depends):
                    if dep in self.by_name:
                        visit(self.by_name[dep], (*path, segment.name))
                done[segment.name] = segment

            for segment in sorted(self.by_name.values(), key=lambda s: s.name):
                visit(segment, ())
            self._order = list(done.values())
        return self._order

    # ------------------------------------------------------------------ membership
    def evaluate(self, engine: Engine, segment: Segment, within: BitMap) -> BitMap:
        """The members of `segment` among `within` (live dense ids), as of now."""
        from memstore.query.evaluate import evaluate

        if segment.timed and time.time() - segment.parsed_at >= 1.0:
            segment.node = parse(segment.text)  # did(...) windows end now
            segment.parsed_at = time.time()
        return evaluate(engine, segment.node, unknown_is_empty=True, within=within)

    def refresh(self, engine: Engine, touched: Touched) -> Deltas:
        """Bring membership up to date with a change just applied (`touched`), applying
        the deltas as it goes; returns them (for the log, and `undo`)."""
        deltas: Deltas = {}
        if not self.by_name:
            return deltas
        schema = engine.schema.by_name
        live = engine.live
        for segment in self.order():
            if segment.broken:
                continue
            candidates = BitMap(touched.created)
            for name in segment.attributes:
                spec = schema.get(name)
                if spec is not None and spec.id in touched.changed:
                    candidates |= touched.changed[spec.id]
            for dep in segment.depends:
                moved = deltas.get(dep)
                if moved is not None:
                    candidates |= moved[0] | moved[1]
            leave = segment.members & touched.removed if touched.removed else BitMap()
            candidates &= live
            enter = BitMap()
            if candidates:
                try:
                    now_in = self.evaluate(engine, segment, candidates)
                except (InvalidArgument, QueryError) as exc:
                    self._break(segment, str(exc))
                    continue
                was_in = segment.members & candidates
                enter = now_in - was_in
                leave |= was_in - now_in
            if enter or leave:
                segment.members |= enter
                segment.members -= leave
                deltas[segment.name] = (enter, leave)
        return deltas

    def rebuild(self, engine: Engine, names: Iterable[str] | None = None) -> Deltas:
        """Evaluate segments over every live profile (a new segment; timed ones on their
        timer) and bring their members to it; returns the deltas, applied."""
        deltas: Deltas = {}
        chosen = set(self.by_name if names is None else names)
        for segment in self.order():
            if segment.name not in chosen or segment.broken:
                continue
            try:
                now_in = self.evaluate(engine, segment, engine.live)
            except (InvalidArgument, QueryError) as exc:
                self._break(segment, str(exc))
                continue
            enter, leave = now_in - segment.members, segment.members - now_in
            if enter or leave:
                segment.members = now_in
                deltas[segment.name] = (enter, leave)
        return deltas

    def timed(self) -> list[str]:
        return [s.name for s in self.order() if s.timed and not s.broken]

    def apply(self, deltas: Deltas) -> None:
        """Membership changes from the log (replay): no evaluation."""
        for name, (enter, leave) in deltas.items():
            segment = self.by_name.get(name)
            if segment is not None:
                segment.members |= enter
                segment.members -= leave

    def undo(self, deltas: Deltas) -> None:
        for name, (enter, leave) in deltas.items():
            segment = self.by_name.get(name)
            if segment is not None:
                segment.members -= enter
                segment.members |= leave

    def _break(self, segment: Segment, reason: str) -> None:
        segment.broken = reason
        log.error("segment %s no longer evaluates (%s): its members are kept as they were "
                  "and no longer change; delete and create it again", segment.name, reason,
                  extra={"segment": segment.name})

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> dict[str, list[Any]]:
        """For a snapshot: name -> [text, created_at, members (portable roaring)]."""
        return {s.name: [s.text, s.created_at, s.members.serialize()]
                for s in self.by_name.values()}

    def load_state(self, state: dict[str, list[Any]]) -> None:
        for name, (text, created_at, members) in state.items():
            self.set_definition(name, [text, created_at])
            self.by_name[name].members = BitMap.deserialize(members)


def encode_deltas(deltas: Deltas) -> list[list[Any]]:
    """[[name, enter (portable roaring), leave], ...] for a log record."""
    return [[name, enter.serialize(), leave.serialize()]
            for name, (enter, leave) in deltas.items()]


def decode_deltas(encoded: Iterable[list[Any]]) -> Deltas:
    return {name: (BitMap.deserialize(enter), BitMap.deserialize(leave))
            for name, enter, leave in encoded}


def members_of(deltas: Deltas) -> Iterator[int]:
    """Every dense id a delta names."""
    for enter, leave in deltas.values():
        yield from enter
        yield from leave
