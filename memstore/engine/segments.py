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
For a change to a few profiles, the segments to look at come from an index (attribute ->
segments that read it), and each decides on each profile from its own values with its
query compiled once (memstore/query/match.py), which answers as the indexes would; a
bulk change, and a segment the matcher cannot decide, go through the indexes. The
commonest change, one profile's update, has a plan per attribute changed (`_Plan`): the
segments reading it that read no other segment are decided by one compiled function,
which names those whose members are no longer right; the rest follow one by one.
Segments that read the clock (`did(...)`) also change with no write: `timed` ones are
re-evaluated whole on a timer (`refresh_timed`).

Evaluation is lenient (an attribute no profile here has matches nobody) and a segment whose
query stops evaluating (an attribute later declared of another kind than its literal) is
marked `broken` with the reason and skipped, never failing the write that met it (only
profiles removed leave it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from heapq import heappop, heappush
from typing import TYPE_CHECKING, Any

from pyroaring import BitMap

from memstore.errors import InvalidArgument
from memstore.query import And, Did, InSegment, Node, Not, Or, Predicate, QueryError, parse

if TYPE_CHECKING:
    from memstore.engine.core import Engine
    from memstore.engine.schema import Schema
    from memstore.query.match import Changes, Matcher

log = logging.getLogger("memstore.segments")

MAX_SEGMENTS = 1000  # per cluster: each costs a bitmap and work on every write
# A change touching at most this many profiles is matched profile by profile; a larger one
# (a bulk load) goes through the indexes, whose bitmap operations amortize over the ids.
SMALL_CHANGE = 32


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
    # Decides membership from one profile's values (memstore.query.match); None: this
    # segment is refreshed through the indexes (it reads the clock, or the index path
    # would refuse its query). Compiled again whenever the schema changes (`_prepare`).
    matcher: Matcher | None = None


# name -> (profiles that entered, profiles that left)
Deltas = dict[str, tuple[BitMap, BitMap]]


@dataclass(slots=True)
class _Plan:
    """What a one-profile update of an attribute visits: the segments reading it. Those
    that read no segment (`fused`) are decided together by `changes`, which names the
    ones whose answer is no longer their members' (memstore.query.match); the others
    (`rest`: positions in the order) read other segments' members, or the indexes, and go
    one by one after them, in order."""

    fused: list[Segment]
    changes: Changes | None
    rest: list[int]


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
        elif isinstance(n, Did):  # what tracking the event changes
            kind = "last" if n.within_seconds is not None else "days"
            attributes.add(f"event.{n.event}.{kind}")

    walk(node)
    return frozenset(attributes), frozenset(segments)


def reads_clock(node: Node) -> bool:
    """Whether the query's answer changes with time alone: a did(...) window ends now."""
    if isinstance(node, Did):
        return node.within_days is not None or node.within_seconds is not None \
            or node.last is None
    if isinstance(node, And | Or):
        return any(map(reads_clock, node.children))
    if isinstance(node, Not):
        return reads_clock(node.child)
    return False


class Segments:
    """One shard's saved segments."""

    def __init__(self) -> None:
        self.by_name: dict[str, Segment] = {}
        self._order: list[Segment] | None = None  # dependencies first
        # Built with the order: which segments (positions in it) read each attribute, and
        # each segment's readers, so a write looks at the segments it may change only.
        self._by_attribute: dict[str, list[int]] = {}
        self._readers: dict[str, list[int]] = {}
        self._compiled_for: tuple[int, Any] | None = None  # the schema matchers were for
        # Attribute id -> what a one-profile update of it visits (`_plan`).
        self._plans: dict[int, _Plan] = {}

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
                                         depends, reads_clock(node), members)
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
            self._by_attribute, self._readers = {}, {}
            for position, segment in enumerate(self._order):
                for name in segment.attributes:
                    self._by_attribute.setdefault(name, []).append(position)
                for dep in segment.depends:
                    self._readers.setdefault(dep, []).append(position)
            self._compiled_for = None
        return self._order

    def _prepare(self, schema: Schema) -> list[Segment]:
        """The order, with every segment's matcher compiled against `schema` as it is (the
        schema only grows, or loses its newest declarations on an undo: its length and
        last declaration say whether it changed)."""
        order = self.order()
        seen = (len(schema.by_id), schema.by_id[-1] if schema.by_id else None)
        if self._compiled_for != seen:
            from memstore.query.match import Undecidable, compile_query

            for segment in order:
                segment.matcher = None
                if not segment.timed:  # did(...) windows move with the clock
                    try:
                        segment.matcher = compile_query(segment.node, schema, self._members)
                    except Undecidable:
                        pass  # the index path answers it (or refuses it, as before)
            self._compiled_for = seen
            self._plans.clear()
        return order

    # ------------------------------------------------------------------ membership
    def evaluate(self, engine: Engine, segment: Segment, within: BitMap) -> BitMap:
        """The members of `segment` among `within` (live dense ids), as of now."""
        from memstore.query.evaluate import evaluate

        return evaluate(engine, segment.node, unknown_is_empty=True, within=within)

    def refresh(self, engine: Engine, touched: Touched) -> Deltas:
        """Bring membership up to date with a change just applied (`touched`), applying
        the deltas as it goes; returns them (for the log, and `undo`). A broken
        segment's members no longer change, except that a profile removed (deleted,
        merged away, moved to another shard) leaves it: no answer names a profile that
        is gone."""
        deltas = self._refresh(engine, touched)
        if touched.removed:
            for segment in self.by_name.values():
                if segment.broken and segment.members.intersect(touched.removed):
                    gone = segment.members & touched.removed
                    segment.members -= gone
                    enter, leave = deltas.get(segment.name, (BitMap(), BitMap()))
                    deltas[segment.name] = (enter, leave | gone)
        return deltas

    def _refresh(self, engine: Engine, touched: Touched) -> Deltas:
        """`refresh` for the segments that evaluate.

        A change to a few profiles (`SMALL_CHANGE`) visits only the segments reading an
        attribute it changed (every segment when it creates or removes a profile), and
        the readers of those whose members moved, in dependency order; each decides on
        each profile from its values, decoded once for all segments. A larger one goes
        through the indexes, whose bitmap operations then pay for themselves."""
        if not self.by_name:
            return {}
        order = self._prepare(engine.schema)
        if not touched.created and not touched.removed and len(touched.diffs) == 1:
            # One profile updated (perhaps by several images): every attribute changed is its.
            (dense,) = touched.diffs
            return self._refresh_one(engine, order, dense, touched.changed)
        changed = touched.changed
        if len(touched.created) + len(touched.removed) > SMALL_CHANGE or (
                changed and len(BitMap.union(*changed.values())) > SMALL_CHANGE):
            return self._refresh_through_indexes(engine, touched, order)
        from memstore.engine.blob import decode

        wanted: dict[int, set[int]] = {}  # position in the order -> dense ids to decide
        if touched.created or touched.removed:
            for position in range(len(order)):
                wanted[position] = set(touched.created)
        by_id = engine.schema.by_id
        for aid, dense_ids in changed.items():
            for position in self._by_attribute.get(by_id[aid].name, ()):
                got = wanted.get(position)
                if got is None:
                    wanted[position] = set(dense_ids)
                else:
                    got.update(dense_ids)
        deltas: Deltas = {}
        heap = sorted(wanted)  # a sorted list is a heap; readers join it as deps move
        live, blobs, removed = engine.live, engine.blobs, touched.removed
        states: dict[int, dict[int, Any]] = {}  # dense -> its stored attributes
        while heap:
            position = heappop(heap)
            segment = order[position]
            if segment.broken:
                continue
            members = segment.members
            enter_ids: list[int] = []
            leave_ids = [d for d in removed if d in members] if removed else []
            ids = [d for d in wanted[position] if d in live]
            matcher = segment.matcher
            if ids and matcher is None:
                try:
                    now_in = self.evaluate(engine, segment, BitMap(ids))
                except (InvalidArgument, QueryError) as exc:
                    self._break(segment, str(exc))
                    continue
                for d in ids:
                    if (d in now_in) != (d in members):
                        (enter_ids if d in now_in else leave_ids).append(d)
            elif ids:
                assert matcher is not None
                for d in ids:
                    attrs = states.get(d)
                    if attrs is None:
                        blob = blobs[d]
                        assert blob is not None
                        attrs = states[d] = decode(blob)[1]
                    now = matcher(attrs, d)
                    if now != (d in members):
                        (enter_ids if now else leave_ids).append(d)
            if enter_ids or leave_ids:
                enter, leave = BitMap(enter_ids), BitMap(leave_ids)
                segment.members |= enter
                segment.members -= leave
                deltas[segment.name] = (enter, leave)
                for reader in self._readers.get(segment.name, ()):
                    got = wanted.get(reader)
                    if got is None:
                        wanted[reader] = {*enter_ids, *leave_ids}
                        heappush(heap, reader)
                    else:
                        got.update(enter_ids)
                        got.update(leave_ids)
        return deltas

    def _refresh_one(self, engine: Engine, order: list[Segment], dense: int,
                     aids: Iterable[int]) -> Deltas:
        """`refresh` for the commonest change: one profile updated (attributes `aids`).

        For each attribute changed, the segments reading it that read no other segment
        are decided at once by its plan's one function (`_Plan`: a segment reading two
        of them is decided twice, the second time finding its members right); then the
        others, and the readers of those that moved, one by one in dependency order."""
        plans = self._plans
        attrs: dict[int, Any] | None = None
        deltas: Deltas = {}
        heap: list[int] = []
        queued: set[int] = set()
        readers = self._readers

        def flip(segment: Segment) -> None:
            """`dense` enters or leaves `segment`; its readers are decided after it."""
            self._flip(segment, dense, deltas)
            for reader in readers.get(segment.name, ()):
                if reader not in queued:
                    queued.add(reader)
                    heappush(heap, reader)

        for aid in aids:
            plan = plans.get(aid)
            if plan is None:
                plan = self._plan(engine, order, aid)
            if not plan.fused and not plan.rest:
                continue
            if attrs is None:
                blob = engine.blobs[dense]
                if blob is None or dense not in engine.live:
                    return {}
                from memstore.engine.blob import decode

                attrs = decode(blob)[1]
            for position in plan.rest:
                if position not in queued:
                    queued.add(position)
                    heappush(heap, position)
            if plan.changes is not None:
                for i in plan.changes(attrs, dense):
                    if not plan.fused[i].broken:
                        flip(plan.fused[i])
        while heap:
            segment = order[heappop(heap)]
            if segment.broken:
                continue
            assert attrs is not None
            matcher = segment.matcher
            if matcher is None:
                try:
                    now = dense in self.evaluate(engine, segment, BitMap((dense,)))
                except (InvalidArgument, QueryError) as exc:
                    self._break(segment, str(exc))
                    continue
            else:
                now = matcher(attrs, dense)
            if now != (dense in segment.members):
                flip(segment)
        return deltas

    @staticmethod
    def _flip(segment: Segment, dense: int, deltas: Deltas) -> None:
        """`dense` enters `segment` if it was not a member, else leaves it."""
        members = segment.members
        if dense in members:
            members.discard(dense)
            deltas[segment.name] = (BitMap(), BitMap((dense,)))
        else:
            members.add(dense)
            deltas[segment.name] = (BitMap((dense,)), BitMap())

    def _plan(self, engine: Engine, order: list[Segment], aid: int) -> _Plan:
        """What an update of attribute `aid` visits, compiled at its first write and kept
        until the segments or the schema change (`_prepare`): at most one a declared
        attribute, whatever combinations of attributes writes change."""
        positions = self._by_attribute.get(engine.schema.by_id[aid].name, [])
        fused = [p for p in positions if order[p].matcher is not None and not order[p].depends]
        changes = None
        if fused:
            from memstore.query.match import Undecidable, compile_changes

            try:
                changes = compile_changes([(order[p].node, order[p]) for p in fused],
                                          engine.schema, self._members)
            except Undecidable:  # cannot happen for what compiled alone; one by one then
                fused = []
        rest = [p for p in positions if p not in fused]
        plan = _Plan([order[p] for p in fused], changes, rest)
        self._plans[aid] = plan
        return plan

    def _members(self, name: str) -> BitMap | None:
        segment = self.by_name.get(name)
        return None if segment is None else segment.members

    def _refresh_through_indexes(self, engine: Engine, touched: Touched,
                                 order: list[Segment]) -> Deltas:
        """`refresh` for a large change: every segment, each evaluated on the indexes."""
        deltas: Deltas = {}
        schema = engine.schema.by_name
        live = engine.live
        for segment in order:
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
        """The segments whose members change with time alone, in dependency order: those
        with a did(...) window ending now, and every segment reading one of those through
        in_segment(...), however indirectly (its members move when the one it reads does,
        with no write to tell it)."""
        moving: set[str] = set()
        for segment in self.order():
            if segment.timed or not segment.depends.isdisjoint(moving):
                moving.add(segment.name)
        return [s.name for s in self.order() if s.name in moving and not s.broken]

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
                  "(less the profiles removed later); delete and create it again",
                  segment.name, reason,
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
