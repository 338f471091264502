"""Behaviour over time against raw event lists, driven by hypothesis.

The reference keeps every tracked event of every profile as it was sent (event, UTC day,
count) and answers each did(...) window by adding them up. The system under test is two
engines splitting the slots, driven as a router drives them (test_merge_model.TwoShards):
tracks one at a time and in batches (large batches take the column-at-a-time path),
backfill far past the retention, merges on one engine and across the two, deletes, and a
clock that rolls days over, with the expiry sweep run now and then. After every step:

- every did(...) window (within, from/to, at_least/at_most/exactly, NOT) answers exactly
  as the raw events do, and a window before the retention is refused, whatever the data;
- event.<name>.count/first/last are those of every event ever tracked (the retention
  drops days, never the aggregates);
- each engine's day bitmaps are what its profile blobs say (built again from the blobs),
  and replaying the engine's log (its changes, encoded as the shard logs them) into an
  empty engine rebuilds the same blobs, bitmaps and answers.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import Phase, event, given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from pyroaring import BitMap

from memstore.engine import days
from memstore.engine.blob import decode
from memstore.engine.change import Change, UpsertSpec
from memstore.engine.core import Engine
from memstore.engine.days import DAY_MICROS
from memstore.engine.segments import Touched
from memstore.engine.tracking import _plan_general
from memstore.errors import InvalidArgument, NotFound
from memstore.index.day_index import DayIndex
from memstore.query import And, Did, Not, Op, Or, Predicate
from memstore.query.evaluate import EvalStats, evaluate
from memstore.query.evaluate import count as count_matching
from memstore.shard import (
    decode_change,
    encode_change,
    encode_images,
    encode_merge,
    encode_schema,
    replay,
)
from memstore.storage import wal_format
from tests.test_merge_model import SIDE0, SIDE1, TwoShards

RETENTION = 10
EVENTS = ["buy", "open"]
PIDS = st.sampled_from(SIDE0[:3] + SIDE1[:3])
IDENTS = st.tuples(st.just("email"), st.sampled_from(["a", "b", "c"]))
START = datetime(2026, 9, 1, 15, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def today(self) -> int:
        return int(self.now // 86_400)


class LoggedShards(TwoShards):
    """TwoShards whose engines keep a log of their changes, as Shard.commit writes it."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.logs: list[list[tuple[int, bytes]]] = [[], []]
        for engine in self.engines:
            engine.clock = clock
            engine.event_days = RETENTION

    def commit(self, side: int, change: Change) -> Any:
        log = self.logs[side]
        if change.schema:
            log.append((wal_format.RECORD_SCHEMA, encode_schema(change.schema)))
        if change.notes:
            log.append((wal_format.RECORD_MERGE, encode_merge(change)))
        elif change.images:
            log.append((wal_format.RECORD_PROFILES, encode_images(change.images)))
        return super().commit(side, change)


def _day(d: int) -> date:
    return date(1970, 1, 1) + timedelta(days=d)


def _day_bitmaps(engine: Engine) -> dict[str, list[tuple[int, list[int], list[list[int]]]]]:
    return {engine.schema.by_id[aid].name: [(d, list(b), [list(s) for s in extra])
                                            for d, b, extra in index.items()]
            for aid, index in engine.day_index.items()}


class EventsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.cluster = LoggedShards(self.clock)
        self.events: dict[str, list[tuple[str, int, int, int]]] = {}  # pid -> events
        self.owner: dict[str, str] = {}  # every id ever written -> the profile it is now
        self.idents: dict[tuple[str, str], str] = {}
        self.merges = 0

    @initialize()
    def declare_events(self) -> None:
        """Both events exist on both engines (as a router's registry would see to), so a
        query never names an event an engine has never heard of."""
        for side, engine in enumerate(self.cluster.engines):
            pid = (SIDE0 if side == 0 else SIDE1)[-1]
            for name in EVENTS:
                self.cluster.commit(side, engine.plan_track(pid, name, 0))
            self.cluster.commit(side, engine.plan_delete(pid))

    # ------------------------------------------------------------------ model
    def resolve(self, pid: str) -> str:
        return self.owner.get(pid, pid)

    def _add(self, pid: str, name: str, at: int, count: int) -> None:
        target = self.resolve(pid)
        self.owner[pid] = target
        self.owner[target] = target
        self.events.setdefault(target, []).append((name, at // DAY_MICROS, count, at))

    # ------------------------------------------------------------------ writes
    def _at(self, offset: int, second: int) -> int:
        return (self.clock.today() + offset) * DAY_MICROS + second * 1_000_000

    @rule(pid=PIDS, name=st.sampled_from(EVENTS), offset=st.integers(-3 * RETENTION, 2),
          second=st.integers(0, 86_399), count=st.integers(1, 3))
    def track(self, pid: str, name: str, offset: int, second: int, count: int) -> None:
        at = self._at(offset, second)
        event("backfill before the retention" if offset <= -RETENTION else
              "an event in the retention")
        target = self.cluster.follow(pid)
        side = self.cluster.home(target)
        engine = self.cluster.engines[side]
        self.cluster.commit(side, engine.plan_track(target, name, at, count))
        self._add(pid, name, at, count)

    @rule(data=st.data(), large=st.booleans())
    def track_batch(self, data: Any, large: bool) -> None:
        n = data.draw(st.integers(64, 150) if large else st.integers(1, 8), label="events")
        batch = data.draw(st.lists(st.tuples(
            PIDS, st.sampled_from(EVENTS), st.integers(-2 * RETENTION, 1),
            st.integers(0, 86_399), st.integers(1, 3)), min_size=n, max_size=n))
        parts: dict[int, list[Any]] = {0: [], 1: []}
        for pid, name, offset, second, count in batch:
            target = self.cluster.follow(pid)
            parts[self.cluster.home(target)].append(
                (target, name, self._at(offset, second), count))
            self._add(pid, name, self._at(offset, second), count)
        for side, events in parts.items():
            if events:
                engine = self.cluster.engines[side]
                change = engine.plan_track_batch(events)
                event("a batch on the column path" if change.tracked is not None
                      else "a batch on the general path")
                self.cluster.commit(side, change)

    @rule(pid=PIDS, ident=IDENTS)
    def link(self, pid: str, ident: tuple[str, str]) -> None:
        """Give `ident` to `pid`: the profile holding it merges in (maybe across shards)."""
        self.cluster.write(UpsertSpec(pid, [], [ident]))
        target = self.resolve(pid)
        self.owner[pid] = self.owner[target] = target
        self.events.setdefault(target, [])
        loser = self.idents.get(ident)
        if loser is not None and loser != target:
            event("a merge across the shards" if self.cluster.home(loser)
                  != self.cluster.home(target) else "a merge on one shard")
            self.events[target] += self.events.pop(loser)
            self.owner = {k: target if v == loser else v for k, v in self.owner.items()}
            self.idents = {k: target if v == loser else v for k, v in self.idents.items()}
        self.idents[ident] = target

    @rule(a=PIDS, b=PIDS, name=st.sampled_from(EVENTS), offset=st.integers(-3, 0),
          same_day=st.booleans())
    def merge_active(self, a: str, b: str, name: str, offset: int, same_day: bool) -> None:
        """`a` and `b` both did `name` lately (maybe on one day), then `b` merges into `a`
        through an identifier only `b` held: the survivor's record adds both."""
        if self.resolve(a) == self.resolve(b):
            return
        self.track(a, name, offset, 3600, 1)
        self.track(b, name, offset if same_day else offset - 1, 7200, 2)
        self.merges += 1
        ident = ("email", f"m{self.merges}")
        self.link(b, ident)
        self.link(a, ident)

    @rule(pid=PIDS)
    def delete(self, pid: str) -> None:
        target = self.resolve(pid)
        if target not in self.events:
            return
        self.cluster.delete(target)
        del self.events[target]
        self.owner = {k: v for k, v in self.owner.items() if v != target}
        self.idents = {k: v for k, v in self.idents.items() if v != target}

    @rule(days=st.integers(0, 4), hours=st.integers(0, 23), sweep=st.booleans())
    def advance(self, days: int, hours: int, sweep: bool) -> None:
        self.clock.now += days * 86_400 + hours * 3600
        if sweep:
            for side, engine in enumerate(self.cluster.engines):
                while (change := engine.plan_expire(limit=2)).images:
                    event("expired days dropped")
                    self.cluster.commit(side, change)
            for engine in self.cluster.engines:
                first = engine.first_kept()
                for index in engine.day_index.values():
                    assert index.first_day() is None or index.first_day() >= first

    # ------------------------------------------------------------------ checks
    def _want(self, name: str, lo: int, hi: int, least: int, most: int | None) -> set[str]:
        out = set()
        for pid, events in self.events.items():
            total = sum(c for e, d, c, _ in events if e == name and lo <= d <= hi)
            if total >= max(least, 1) and (most is None or total <= most):
                out.add(pid)
        return out

    def _got(self, node: Any) -> set[str]:
        got: set[str] = set()
        for engine in self.cluster.engines:
            ids = engine.ids_of(evaluate(engine, node, unknown_is_empty=True))
            assert count_matching(engine, node, unknown_is_empty=True) == len(ids)
            got |= set(ids)
        return got

    @rule(name=st.sampled_from(EVENTS), data=st.data())
    def query(self, name: str, data: Any) -> None:
        today = self.clock.today()
        bounds = data.draw(st.sampled_from([(None, None), (2, None), (None, 2), (2, 2),
                                            (1, 4)]), label="at_least, at_most")
        if data.draw(st.booleans(), label="within"):
            n = data.draw(st.integers(1, RETENTION + 3), label="within days")
            node = Did(name, within_days=n, at_least=bounds[0], at_most=bounds[1])
            lo, hi = today - n + 1, today
        else:
            lo = today + data.draw(st.integers(-RETENTION - 2, 1), label="from")
            hi = lo + data.draw(st.integers(0, 12), label="to")
            last = data.draw(st.booleans(), label="with to")
            node = Did(name, first=_day(lo), last=_day(hi) if last else None,
                       at_least=bounds[0], at_most=bounds[1])
            hi = hi if last else today
        if lo < today - RETENTION + 1:
            for engine in self.cluster.engines:
                with pytest.raises(InvalidArgument, match="before the event retention of 10"):
                    evaluate(engine, node)
            event("a window past the retention: refused")
            return
        want = self._want(name, lo, hi, bounds[0] or 1, bounds[1])
        assert self._got(node) == want, node
        everyone = set(self.events)
        assert self._got(Not(node)) == everyone - want
        having = Predicate(f"event.{name}.count", Op.GE, (2,))
        assert self._got(And((node, having))) == {
            p for p in want if sum(c for e, _, c, _ in self.events[p] if e == name) >= 2}
        event(f"window matched {'none' if not want else 'some'}")

    @invariant()
    def aggregates_keep_every_event(self) -> None:
        for pid, events in self.events.items():
            engine = self.cluster.engines[self.cluster.home(pid)]
            dense = engine.lookup(pid)
            assert dense is not None
            attrs = engine.profile(dense).attributes
            for name in EVENTS:
                mine = [(c, at) for e, _, c, at in events if e == name]
                if not mine:
                    assert f"event.{name}.count" not in attrs
                    continue
                assert attrs[f"event.{name}.count"] == sum(c for c, _ in mine)
                first = datetime.fromtimestamp(min(at for _, at in mine) / 1e6, UTC)
                assert attrs[f"event.{name}.first"] == first
                assert f"event.{name}.days" not in attrs  # never returned as a value

    def teardown(self) -> None:
        """Replaying each engine's log into an empty engine rebuilds it (once an example
        ends: the log grows with every step)."""
        for side, engine in enumerate(self.cluster.engines):
            fresh = Engine()
            fresh.set_ownership(1, engine.owned_slots)
            for rtype, payload in self.cluster.logs[side]:
                replay(fresh, rtype, payload)
            assert fresh.blobs == engine.blobs
            assert _day_bitmaps(fresh) == _day_bitmaps(engine)

    @invariant()
    def bitmaps_are_what_the_blobs_say(self) -> None:
        for engine in self.cluster.engines:
            rebuilt = {aid: DayIndex() for aid in engine.day_index}
            for dense in engine.live:
                attrs = decode(engine.blobs[dense])[1]  # type: ignore[arg-type]
                for aid, index in rebuilt.items():
                    for day, count in days.decode(attrs[aid]) if aid in attrs else ():
                        index.add(dense, day, count)
            assert {aid: list(i.items()) for aid, i in rebuilt.items()} == {
                aid: list(i.items()) for aid, i in engine.day_index.items()}


EventsMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25,
                                           deadline=None)
TestEventsMachine = EventsMachine.TestCase


BATCH = st.lists(st.tuples(st.sampled_from([f"p{i}" for i in range(12)]),
                           st.sampled_from(EVENTS), st.integers(-2 * RETENTION, 2),
                           st.integers(0, 86_399), st.integers(1, 300)),
                 min_size=64, max_size=120)


@settings(max_examples=40, deadline=None)
@given(before=st.lists(BATCH, max_size=2), batch=BATCH)
def test_a_batch_on_the_column_path_leaves_what_tracks_one_by_one_leave(
        before: list[Any], batch: list[Any]) -> None:
    """The column-at-a-time batch path (Tracked) against the general planner, event by
    event: the same profiles, versions, day bitmaps and range index values."""
    clock = Clock()
    fast, slow = (Engine(clock=clock, event_days=RETENTION) for _ in range(2))

    def events(rows: list[Any]) -> list[Any]:
        return [(pid, name, (clock.today() + offset) * DAY_MICROS + second * 1_000_000, count)
                for pid, name, offset, second, count in rows]

    for rows in [*before, batch]:
        change = fast.plan_track_batch(events(rows))
        assert change.tracked is not None or not fast.schema.get("event.buy.count") \
            or not fast.schema.get("event.open.count")
        fast.apply(change)
        for one in events(rows):
            slow.apply(slow.plan_track(*one))
    # The same attributes and values (a blob's attribute order follows how it was
    # written, and a range index's base is the least value it has seen: both may differ).
    assert [decode(b) for b in fast.blobs] == [decode(b) for b in slow.blobs]  # type: ignore[arg-type]
    assert fast.pids == slow.pids
    assert _day_bitmaps(fast) == _day_bitmaps(slow)
    for aid, index in slow.range_index.items():
        mine, held = fast.range_index[aid], list(index.exists())
        assert list(mine.exists()) == held
        assert [mine.value_of(d) for d in held] == [index.value_of(d) for d in held]


def test_an_and_whose_first_part_is_empty_runs_no_other_part() -> None:
    """The planner stops an AND once nothing is left: a child that matches nobody runs
    first (its bound is 0) and the costly children (a range, counts over a window) never
    run; a malformed child is refused all the same, before anything runs."""
    clock = Clock()
    engine = Engine(clock=clock, event_days=RETENTION)
    at = clock.today() * DAY_MICROS
    engine.apply(engine.plan_track_batch([(f"p{i}", "buy", at, 1 + i % 3) for i in range(100)]))
    everyone = Predicate("event.buy.count", Op.EXISTS)
    engine.apply(engine.plan_upsert(UpsertSpec("p0", [(1, "country", "US")])))
    empty = Predicate("country", Op.EQ, ("CA",))
    costly = [Predicate("event.buy.count", Op.GE, (2,)), Did("buy", within_days=3, at_least=2)]
    stats = EvalStats()
    assert not evaluate(engine, And((*costly, empty)), stats=stats)
    assert stats.leaves == 1
    stats = EvalStats()
    # counts 1, 2, 3, 1, 2, 3, ...: two in three hold at least 2, and nothing stops early
    assert len(evaluate(engine, And((*costly, everyone)), stats=stats)) == 66
    assert stats.leaves == 3
    malformed = Predicate("country", Op.GT, ("US",))  # no order on strings
    for bad in (malformed, Did("buy", within_days=RETENTION + 1),
                Predicate("nowhere", Op.EXISTS)):
        stats = EvalStats()
        with pytest.raises(InvalidArgument):
            evaluate(engine, And((empty, *costly, bad)), stats=stats)
        assert stats.leaves == 0


def test_an_or_stops_once_everything_matched() -> None:
    engine = Engine()
    engine.apply(engine.plan_batch([UpsertSpec(f"p{i}", [(1, "n", i), (1, "c", "x")])
                                    for i in range(50)]))
    stats = EvalStats()
    everyone = Predicate("c", Op.EQ, ("x",))
    ranges = [Predicate("n", Op.GT, (k,)) for k in range(5)]
    assert len(evaluate(engine, Or((everyone, *ranges)), stats=stats)) == 50
    assert stats.leaves == 1


def test_a_comparison_outside_the_stored_values_runs_first_and_stops_the_and() -> None:
    """A range index knows its base and width: `n > 10**6` over values 0..49 matches nobody
    without a bitmap operation, so the AND runs it first and nothing else."""
    engine = Engine()
    engine.apply(engine.plan_batch([UpsertSpec(f"p{i}", [(1, "n", i), (1, "c", "x")])
                                    for i in range(50)]))
    everyone = Predicate("c", Op.EQ, ("x",))
    for out in (Predicate("n", Op.GT, (10**6,)), Predicate("n", Op.LT, (0,)),
                Predicate("n", Op.BETWEEN, (-9, -1)), Predicate("n", Op.IN, (-5, 10**9))):
        stats = EvalStats()
        assert not evaluate(engine, And((everyone, Predicate("n", Op.GE, (3,)), out)),
                            stats=stats)
        assert stats.leaves == 1, out
    stats = EvalStats()
    inside = Predicate("n", Op.LE, (0,))
    assert len(evaluate(engine, And((everyone, inside)), stats=stats)) == 1


def test_a_count_equals_the_evaluated_ids_with_profiles_outside_the_owned_slots() -> None:
    """count() counts where it can (a value's bitmap, an AND's last part, a NOT) instead of
    building the result; with profiles in slots the shard does not own (a slot move) it
    must still leave them out, as evaluate() does."""
    from memstore.hashslot import slot_of

    engine = Engine()
    engine.apply(engine.plan_batch([UpsertSpec(f"p{i}", [(1, "n", i), (1, "c", "xy"[i % 2])])
                                    for i in range(60)]))
    queries = [Predicate("c", Op.EQ, ("x",)), Not(Predicate("c", Op.EQ, ("x",))),
               And((Predicate("c", Op.EQ, ("x",)), Predicate("n", Op.GE, (30,)))),
               And((Predicate("n", Op.LT, (40,)), Not(Predicate("c", Op.EQ, ("y",))))),
               Or((Predicate("c", Op.EQ, ("y",)), Predicate("n", Op.LT, (9,)))),
               Predicate("n", Op.EXISTS)]
    owned = BitMap(range(8192))  # half the slots: the other half's profiles are foreign
    for slots in (None, owned):
        engine.set_ownership(1, slots)
        visible = {f"p{i}" for i in range(60) if slots is None or slot_of(f"p{i}") in slots}
        assert 0 < len(visible) < 60 or slots is None
        for q in queries:
            want = len([p for p in engine.ids_of(evaluate(engine, q)) if p in visible])
            assert count_matching(engine, q) == want == len(evaluate(engine, q)), q


# ---------------------------------------------------------------- the batch path's columns

_PIDS = [f"p{i}" for i in range(8)]
_LINKED = {("email", "a"): "p1", ("email", "b"): "p6"}  # p6 exists only once linked
_KEY = st.one_of(st.sampled_from(_PIDS), st.sampled_from(sorted(_LINKED)))
_ROW = st.tuples(_KEY, st.sampled_from(EVENTS), st.integers(-2 * RETENTION, 1),
                 st.integers(0, 86_399), st.sampled_from([1, 1, 2, 127, 128, 300]))


def _logged(engine: Engine, change: Change, log: list[bytes]) -> Touched:
    """Apply `change` as Shard.commit does, keeping its RECORD_CHANGE payload."""
    touched = Touched()
    engine.apply(change, touched)
    log.append(encode_change(change, touched, {}))
    return touched


def _state(engine: Engine) -> Any:
    """What callers can tell apart: profiles, day bitmaps, range values."""
    ranges = {engine.schema.by_id[aid].name: [(d, index.value_of(d)) for d in index.exists()]
              for aid, index in engine.range_index.items()}
    return ([None if b is None else decode(b) for b in engine.blobs], engine.pids,
            _day_bitmaps(engine), ranges)


# No shrinking: an example is ~0.2 s, and a failure prints its example all the same.
@settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.generate])
@given(before=st.lists(_ROW, max_size=8), batch=st.lists(_ROW, min_size=64, max_size=72),
       by_ids=st.booleans(), declared=st.booleans())
def test_a_batch_in_columns_is_its_events_one_at_a_time_and_replays_the_same(
        before: list[Any], batch: list[Any], by_ids: bool, declared: bool) -> None:
    """The column path (a batch of ids), the general planner (the same batch, or one naming
    profiles by identifiers too) and one Track an event leave the same profiles, versions,
    day bitmaps and range values; the column path tells saved segments the same (Touched)
    as the general one; and replaying the logged records rebuilds it exactly. Backfill past
    the retention, repeats of a profile and a day, counts of more than one varint byte and
    profiles the batch creates are all drawn; so are events tracked for the first time
    (`declared` False: the batch declares their attributes, on the column path too)."""
    clock = Clock()
    columns, general, single = (Engine(clock=clock, event_days=RETENTION) for _ in range(3))
    logs: list[list[bytes]] = [[], [], []]

    def events(rows: list[Any]) -> list[Any]:
        return [(_LINKED[key] if by_ids and isinstance(key, tuple) else key, name,
                 (clock.today() + offset) * DAY_MICROS + second * 1_000_000, count)
                for key, name, offset, second, count in rows]

    for engine, log in zip((columns, general, single), logs, strict=True):
        for pid, ident in (("p1", ("email", "a")), ("p6", ("email", "b"))):
            _logged(engine, engine.plan_link(pid, [ident], create=True), log)
        for name in EVENTS if declared else ():  # (or declared by the batch)
            _logged(engine, engine.plan_track("p7", name, 0), log)
        for one in events(before):
            _logged(engine, engine.plan_track(*one), log)
    planned = columns.plan_track_batch(events(batch))
    # identifier keys take the general planner; ids, the column path, declaring what the
    # events need as the general planner would
    assert (planned.tracked is None) == any(isinstance(key, tuple) for key, *_ in events(batch))
    assert [spec.name for spec in planned.schema] == [
        spec.name for spec in _plan_general(columns, events(batch), "events").schema]
    touched = _logged(columns, planned, logs[0])
    touched_general = _logged(general, _plan_general(general, events(batch), "events"),
                              logs[1])
    for one in events(batch):
        _logged(single, single.plan_track(*one), logs[2])
    assert _state(columns) == _state(general) == _state(single)
    assert touched.created == touched_general.created
    assert touched.changed == touched_general.changed
    assert {d: set(s) for d, (s, _) in touched.diffs.items()} == {
        d: set(s) for d, (s, _) in touched_general.diffs.items()}
    # the record holds each diff as [set ids, unset ids] (docs/log-format.md)
    assert decode_change(logs[0][-1]).get("diffs", {}) == {
        d: [s, u] for d, (s, u) in touched.diffs.items()}
    replayed = Engine(clock=clock, event_days=RETENTION)
    for payload in logs[0]:
        replay(replayed, wal_format.RECORD_CHANGE, payload)
    assert replayed.blobs == columns.blobs
    assert _state(replayed) == _state(columns)


def test_a_batch_naming_an_identifier_nobody_holds_is_refused_whole_naming_it() -> None:
    engine = Engine()
    engine.apply(engine.plan_track_batch([(f"p{i}", "buy", 10**15, 1) for i in range(70)]))
    blobs = list(engine.blobs)
    events = [(f"p{i}", "buy", 10**15, 1) for i in range(70)]
    events[41] = (("email", "nobody"), "buy", 10**15, 1)
    with pytest.raises(NotFound, match=r"events\[41\]\.identifier") as refused:
        engine.plan_track_batch(events)
    assert refused.value.record == 41
    assert engine.blobs == blobs


def test_the_column_path_tells_a_count_of_int64_min_from_an_absent_one() -> None:
    """The column path reads an absent count as INT64_MIN and looks such a count up again:
    a profile whose count was set to INT64_MIN itself adds to it, as the general planner
    does, and one without a count starts from 0."""
    at = Clock().today() * DAY_MICROS
    low = -(1 << 63)
    columns, general = Engine(), Engine()
    for engine in (columns, general):
        engine.apply(engine.plan_track("p0", "buy", at))
        engine.apply(engine.plan_upsert(UpsertSpec("p1", [(1, "event.buy.count", low)])))
    batch = [(f"p{i % 3}", "buy", at + i, 1) for i in range(64)]
    planned = columns.plan_track_batch(batch)
    assert planned.tracked is not None
    columns.apply(planned)
    general.apply(_plan_general(general, batch, "events"))
    assert _state(columns) == _state(general)
    assert [decode(columns.blobs[columns.dense_of[p]])[1][columns.schema.by_name[  # type: ignore[arg-type]
        "event.buy.count"].id] for p in ("p0", "p1", "p2")] == [23, low + 21, 21]


def test_an_and_walks_its_narrowest_range_first() -> None:
    """Two ranges every profile holds have the same bound; the sampled estimate tells
    the narrow one, which runs first whatever the order written: matching nobody (a value
    inside the stored span that no one holds), it stops the AND before the wide one."""
    engine = Engine()
    engine.apply(engine.plan_batch([UpsertSpec(f"p{i}", [(1, "wide", i), (1, "narrow", 10 * (i % 2))])
                                    for i in range(400)]))
    wide = Predicate("wide", Op.GE, (3,))
    nobody = Predicate("narrow", Op.EQ, (5,))
    for parts in ((wide, nobody), (nobody, wide)):
        stats = EvalStats()
        assert not evaluate(engine, And(parts), stats=stats)
        assert stats.leaves == 1, parts
    some = Predicate("narrow", Op.EQ, (10,))
    stats = EvalStats()
    assert count_matching(engine, And((wide, some)), stats=stats) == 199
    assert stats.leaves == 2


def test_days_leaving_the_retention_are_no_change_a_watcher_sees() -> None:
    """Expiry rewrites day records alone: its records carry the profiles' images (for
    replay) but no change a change stream shows; a Track's record shows its aggregates
    and not the day record (bytes, which are no value a stream can carry)."""
    from memstore.server.watch import ChangeFilter, change_events

    now = [1_800_000_000.0]
    engine = Engine(clock=lambda: now[0], event_days=10)
    log: list[bytes] = []
    _logged(engine, engine.plan_upsert(UpsertSpec("a", [(1, "plan", "pro")])), log)
    _logged(engine, engine.plan_track("a", "open", int((now[0] - 86400) * 1_000_000)), log)
    now[0] += 20 * 86400
    expiry = engine.plan_expire()
    assert not expiry.empty
    _logged(engine, expiry, log)
    assert decode(engine.blobs[engine.dense_of["a"]])[1]  # the aggregates stayed
    shown = [[(change.id, dict(change.set), list(change.unset)) for _, change in
              change_events(decode_change(payload), ChangeFilter(None, frozenset()), engine)]
             for payload in log]
    assert [[(pid, sorted(values), unset) for pid, values, unset in changes]
            for changes in shown] == [
        [("a", ["plan"], [])],
        [("a", ["event.open.count", "event.open.first", "event.open.last"], [])],
        [],
    ]
