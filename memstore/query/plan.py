"""The query planner: check a whole syntax tree, then evaluate it cheapest part first.

One job: turn a query tree into a plan of steps over the indexes, and run it so that no
query does more bitmap work than its answer needs.

Checking (`compile_query`) walks the whole tree before anything is evaluated and raises
every error a query can have -- an unknown or not-indexed attribute, a literal of the
wrong kind, an operator the attribute's kind has no meaning for, a did(...) window
reaching past the retention -- so an error never depends on the data (an AND whose first
part matches nobody still refuses a malformed later part). Each leaf becomes a step that
holds its index and an upper bound of the ids it can match, known without a bitmap
operation: a value's bitmap cardinality, the sum of an IN's, the number of ids holding a
ranged attribute, the sum of a window's day bitmaps. A range can also estimate its
matches, from a sample of its index's values (RangeIndex.estimate).

Running (`Step.run(context, within)`) gives the matching ids among `within` (None: among
all), never a scan over profiles:
- AND runs its parts smallest bound first (its ranges, in the places that gives them,
  narrowest estimate first), each among the ids the ones before left, and stops as soon
  as none is left; NOT parts run last, as a difference from what is left. A bit-sliced
  step (a range, a did(...) with counts) among a few survivors costs a few operations
  on small bitmaps instead of its whole index's.
- OR runs bitmap parts first (largest first), then bit-sliced parts among the ids not
  matched yet, and stops once everything it could match is matched.
- NOT is a difference from `within` (or the visible profiles).

Counting (`Step.count(context, within)`) gives the number `run` would, without building
the last bitmap where roaring can count instead: a value's ids among `within` are an
intersection's cardinality, a NOT is `within`'s size less its part's count, an AND runs
its parts but counts its last, and an index's own bitmap is counted as it is (no copy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from pyroaring import BitMap

from memstore.engine.core import Engine
from memstore.engine.schema import RANGE_KINDS, AttributeSpec, Kind
from memstore.errors import InvalidArgument, brief
from memstore.index.bitmap_index import RangeIndex, float_to_ordered
from memstore.index.day_index import DayIndex
from memstore.pbvalues import MAX_MICROS, datetime_to_micros, micros_to_datetime
from memstore.query.ast import (
    All,
    And,
    Did,
    InSegment,
    Node,
    Not,
    Op,
    Or,
    Predicate,
    QueryError,
)
from memstore.query.parser import parse_timestamp, timestamp_beyond_micros

_RANGE_OPS = {Op.LT: "lt", Op.LE: "le", Op.GT: "gt", Op.GE: "ge", Op.EQ: "eq", Op.NE: "ne"}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_EPOCH = date(1970, 1, 1)

# How much work a step costs for the ids it is asked about: a bitmap at hand, a union of
# bitmaps, or bit-sliced arithmetic (a few operations per bit).
CHEAP, UNION, SLICED = 0, 1, 2


@dataclass
class EvalStats:
    """What a query's evaluation did (tests observe the planner through it)."""

    leaves: int = 0  # leaf steps run


@dataclass
class Context:
    universe: BitMap  # the visible profiles
    stats: EvalStats | None = None
    borrowed: set[int] = field(default_factory=set)  # ids of index bitmaps handed out as is

    def leaf(self) -> None:
        if self.stats is not None:
            self.stats.leaves += 1

    def lend(self, bitmap: BitMap) -> BitMap:
        """An index's own bitmap as a result: never to be changed (the caller copies it)."""
        self.borrowed.add(id(bitmap))
        return bitmap


class Step:
    """A part of a plan. `run(ctx, within)` gives its ids among `within` (a subset of it,
    when given); `count` how many that would be."""

    bound: int = 0  # at most this many ids match
    cost: int = CHEAP

    def run(self, ctx: Context, within: BitMap | None) -> BitMap:
        raise NotImplementedError

    def count(self, ctx: Context, within: BitMap | None) -> int:
        return len(self.run(ctx, within))


class Empty(Step):
    def run(self, ctx: Context, within: BitMap | None) -> BitMap:
        ctx.leaf()
        return BitMap()


class Everyone(Step):
    def __init__(self, universe: BitMap) -> None:
        self.bound = len(universe)

    def run(self, ctx: Context, within: BitMap | None) -> BitMap:
        ctx.leaf()
        return within if within is not None else ctx.lend(ctx.universe)

    def count(self, ctx: Context, within: BitMap | None) -> int:
        ctx.leaf()
        return len(within if within is not None else ctx.universe)


class Bitmaps(Step):
    """Ids in any of `maps` (EQ, HAS, EXISTS: one; IN: several), minus `minus` (NE)."""

    def __init__(self, maps: list[BitMap], minus: BitMap | None = None) -> None:
        self.maps = maps
        self.minus = minus
        self.bound = sum(map(len, maps)) - (len(minus) if minus is not None else 0)
        self.cost = UNION if len(maps) > 1 else CHEAP

    def run(self, ctx: Context, within: BitMap | None) -> BitMap:
        ctx.leaf()
        if not self.maps:
            return BitMap()
        if len(self.maps) == 1 and self.minus is None:
            found = self.maps[0]
            return ctx.lend(found) if within is None else found & within
        if self.minus is not None:  # NE: the holders but those of the value
            return self.maps[0] - self.minus if within is None else \
                (self.maps[0] & within) - self.minus
        union = BitMap.union(*self.maps)
        if within is not None:
            union &= within
        return union

    def count(self, ctx: Context, within: BitMap | None) -> int:
        if len(self.maps) != 1 or self.minus is not None:
            return len(self.run(ctx, within))
        ctx.leaf()
        found = self.maps[0]
        return len(found) if within is None else found.intersection_cardinality(within)


class Range(Step):
    """A comparison on a bit-sliced index: `op` one of RangeIndex.compare's, "between"
    (two values) or "in" (any number of values, each compared equal)."""

    cost = SLICED

    def __init__(self, index: RangeIndex, op: str, values: Sequence[int]) -> None:
        self.index = index
        self.op = op
        self.values = values
        span = index.span()
        # A constant outside the values stored (age > 1000, a price below 0) matches
        # nobody: known from the index's base and width, so an AND runs this part first
        # and stops there (a scan with min/max statistics answers it as fast).
        self.bound = 0 if span is None or not _may_match(op, values, *span) else len(index)

    def estimate(self) -> int:
        """About how many ids match (RangeIndex.estimate): asked only of an AND's ranges,
        to order them (`_narrowest_first`)."""
        return self.index.estimate(self.op, self.values) if self.bound else 0

    def run(self, ctx: Context, within: BitMap | None) -> BitMap:
        ctx.leaf()
        index, values = self.index, self.values
        if self.op == "between":
            return index.between(values[0], values[1], within)
        if self.op == "in":
            return BitMap.union(BitMap(), *(index.compare("eq", v, within) for v in values))
        return index.compare(self.op, values[0], within)


def _may_match(op: str, values: Sequence[int], low: int, high: int) -> bool:
    """Whether `op` on `values` can hold for some value in low..high."""
    if op == "lt":
        return values[0] > low
    if op == "le":
        return values[0] >= low
    if op == "gt":
        return values[0] < high
    if op == "ge":
        return values[0] <= high
    if op == "between":
        return values[0] <= high and values[1] >= low
    if op in ("eq", "in"):
        return any(low <= v <= high for v in values)
    return True  # ne


class DidStep(Step):
    """did(...): the window's day bitmaps, united, or their counts added and compared."""

    def __init__(self, index: DayIndex, lo: int, hi: int, at_least: int | None,
                 at_most: int | None) -> None:
        self.index, self.lo, self.hi = index, lo, hi
        self.least, self.most = at_least or 1, at_most
        self.bound = index.upper_bound(lo, hi)
        self.cost = SLICED if (self.least > 1 or self.most is not None) else UNION

    def run(self, ctx: Context, within: BitMap | None) -> BitMap:
        ctx.leaf()
        return self.index.counted(self.lo, self.hi, self.least, self.most, within)

    def count(self, ctx: Context, within: BitMap | None) -> int:
        ctx.leaf()
        return self.index.count(self.lo, self.hi, self.least, self.most, within)


class NotStep(Step):
    def __init__(self, child: Step, universe: BitMap) -> None:
        self.child = child
        self.bound = len(universe)
        self.cost = child.cost

    def run(self, ctx: Context, within: BitMap | None) -> BitMap:
        among = within if within is not None else ctx.universe
        return among - self.child.run(ctx, among)

    def count(self, ctx: Context, within: BitMap | None) -> int:
        among = within if within is not None else ctx.universe
        return len(among) - self.child.count(ctx, among)


class AndStep(Step):
    def __init__(self, children: list[Step]) -> None:
        self.positive = _narrowest_first([c for c in children if not isinstance(c, NotStep)])
        self.negative = [c for c in children if isinstance(c, NotStep)]
        self.bound = min(c.bound for c in children) if self.positive else max(
            c.bound for c in children)
        self.cost = max(c.cost for c in children)

    def run(self, ctx: Context, within: BitMap | None) -> BitMap:
        result = self._all_but_last(ctx, within)
        if result is not None and not result:
            return BitMap()
        return self._last.run(ctx, result)

    def count(self, ctx: Context, within: BitMap | None) -> int:
        result = self._all_but_last(ctx, within)
        if result is not None and not result:
            return 0
        return self._last.count(ctx, result)

    @property
    def _last(self) -> Step:
        return self.negative[-1] if self.negative else self.positive[-1]

    def _all_but_last(self, ctx: Context, within: BitMap | None) -> BitMap | None:
        """The ids every part but the last leaves among `within` (positive parts, smallest
        bound first, then the NOT parts), stopping empty as soon as none is left."""
        result = within
        last = self._last
        for step in self.positive:
            if step is last:
                break
            result = step.run(ctx, result)
            if not result:
                return BitMap()
        for step in self.negative:
            if step is last:
                break
            result = step.run(ctx, result)
            if not result:
                return BitMap()
        return result


def _narrowest_first(steps: list[Step]) -> list[Step]:
    """An AND's positive parts in the order to run them: smallest bound first (cheaper
    parts first among equal bounds), and its ranges, in the places this gives ranges,
    narrowest estimate first. A range walks its index's bits over the ids left before
    it (all of its holders at first), so after the narrowest the next one walks the
    fewest; its holders (its bound) say nothing of its width. Other parts keep their
    places: a bitmap costs little whatever it leaves, and a compound part's bound counts
    the bitmaps that may empty it at once."""
    ordered = sorted(steps, key=_by_bound)
    if not ordered or not ordered[0].bound:  # it stops after its first part: no choice
        return ordered
    places = [i for i, c in enumerate(ordered) if isinstance(c, Range)]
    if len(places) > 1:
        ranges = sorted((c for c in ordered if isinstance(c, Range)), key=_by_estimate)
        for i, step in zip(places, ranges, strict=True):
            ordered[i] = step
    return ordered


def _by_bound(step: Step) -> tuple[int, int]:
    return step.bound, step.cost


def _by_estimate(step: Range) -> tuple[int, int]:
    # Estimates within a factor of two or so are alike (a sample's error; a walk's cost
    # depends on more than its width): alike ranges keep the order they were written in.
    return step.estimate().bit_length(), step.bound


class OrStep(Step):
    def __init__(self, children: list[Step], universe: BitMap) -> None:
        self.children = sorted(children, key=lambda c: (c.cost >= SLICED, -c.bound))
        self.bound = min(len(universe), sum(c.bound for c in children))
        self.cost = max(c.cost for c in children)

    def run(self, ctx: Context, within: BitMap | None) -> BitMap:
        target = within if within is not None else ctx.universe
        found = BitMap()
        for step in self.children:
            if step.cost >= SLICED and found:  # only among the ids not matched yet
                found |= step.run(ctx, target - found)
            else:
                found |= step.run(ctx, within)
            if len(found) >= len(target) and target.issubset(found):
                return BitMap(target) if within is None else found & target
        return found


# ---------------------------------------------------------------------- checking

def compile_query(engine: Engine, node: Node, lenient: bool = False) -> Step:
    """The plan of `node` over `engine`'s indexes; InvalidArgument for anything wrong
    anywhere in the tree. `lenient`: an attribute or event this shard has never seen
    matches nothing instead of failing (a router asking: another shard may hold it)."""
    return _compile(engine, node, lenient, engine.visible())


def _compile(engine: Engine, node: Node, lenient: bool, universe: BitMap) -> Step:
    if isinstance(node, Predicate):
        if lenient and engine.schema.get(node.attribute) is None:
            return Empty()
        return _predicate(engine, node)
    if isinstance(node, And | Or):
        children = [_compile(engine, c, lenient, universe) for c in node.children]
        if len(children) == 1:
            return children[0]
        return AndStep(children) if isinstance(node, And) else OrStep(children, universe)
    if isinstance(node, Not):
        return NotStep(_compile(engine, node.child, lenient, universe), universe)
    if isinstance(node, All):
        return Everyone(universe)
    if isinstance(node, Did):
        return _did(engine, node, lenient)
    if isinstance(node, InSegment):
        segment = engine.segments.get(node.name)
        if segment is None:
            raise InvalidArgument(f"query: unknown segment {brief(node.name)}")
        return Bitmaps([segment.members])
    raise InvalidArgument(f"query: unsupported node {type(node).__name__}")


def day_number(day: date) -> int:
    return (day - _EPOCH).days


def date_of(day: int) -> date:
    return _EPOCH + timedelta(days=day)


def _did(engine: Engine, node: Did, lenient: bool) -> Step:
    if node.within_seconds is not None:  # the aggregate's last time, from this shard's now
        name = f"event.{node.event}.last"
        if engine.schema.get(name) is None:
            if lenient:
                return Empty()
            raise InvalidArgument(f"query: unknown event {node.event!r} (no profile has "
                                  "tracked it)")
        since = datetime.fromtimestamp(engine.clock() - node.within_seconds, UTC)
        return _predicate(engine, Predicate(name, Op.GE, (since,)))
    today = engine.today()
    if node.within_days is not None:
        lo, hi = today - node.within_days + 1, today
    else:
        assert node.first is not None
        lo = day_number(node.first)
        hi = day_number(node.last) if node.last is not None else today
    first_kept = engine.first_kept()
    if lo < first_kept:
        window = (f"within={node.within_days}d" if node.within_days is not None
                  else f'from="{node.first}"')
        raise InvalidArgument(
            f'query: did("{node.event}", {window}) reaches back to {date_of(lo)}, before the '
            f"event retention of {engine.event_days} days (the earliest day kept is "
            f"{date_of(first_kept)}; --event-days sets it)")
    spec = engine.schema.get(f"event.{node.event}.days")
    if spec is None:
        if lenient:
            return Empty()
        raise InvalidArgument(f"query: unknown event {node.event!r} (no profile has a day "
                              "record of it)")
    return DidStep(engine.day_index[spec.id], lo, hi, node.at_least, node.at_most)


def spec_for_query(engine: Engine, name: str) -> AttributeSpec:
    spec = engine.schema.get(name)
    if spec is None:
        raise InvalidArgument(f"query: unknown attribute {brief(name)}")
    if not spec.indexed:
        raise InvalidArgument(f"query: attribute {brief(name)} is declared not indexed")
    if spec.kind is Kind.EVENT_DAYS:
        event = name.removeprefix("event.").removesuffix(".days")
        raise InvalidArgument(f"query: attribute {name!r} is a day record; ask "
                              f"did({event!r}, within=...) instead")
    return spec


def _predicate(engine: Engine, p: Predicate) -> Step:
    spec = spec_for_query(engine, p.attribute)
    op = p.op
    kind = spec.kind
    if op is Op.EXISTS:
        if kind in RANGE_KINDS:
            return Bitmaps([engine.range_index[spec.id].exists()])
        return Bitmaps([engine.exists[spec.id]])
    raw = p.values
    numbers = _as_numbers(kind, op, raw)
    if numbers is None:
        return Empty()
    if numbers[0] is Op.EXISTS:
        return Bitmaps([engine.range_index[spec.id].exists()])
    op, raw = numbers
    values = [_literal(spec, v, op) for v in raw]
    if kind in RANGE_KINDS:
        index = engine.range_index[spec.id]
        if op is Op.IN:
            return Range(index, "in", values)
        if op is Op.BETWEEN:
            return Range(index, "between", values) if values[0] <= values[1] else Empty()
        if op is Op.HAS:
            raise InvalidArgument(f"query: HAS needs a list attribute; {spec.name!r} is "
                                  f"{kind.label}")
        return Range(index, _RANGE_OPS[op], values)
    vindex = engine.value_index[spec.id]
    if kind is Kind.STRING_LIST:
        if op is Op.HAS:
            return Bitmaps([vindex.get(values[0])])
        if op is Op.IN:
            return Bitmaps([vindex.get(v) for v in dict.fromkeys(values)])
        raise InvalidArgument(
            f"query: {spec.name!r} is a list; use HAS, IN or exists() (got {op.value})"
        )
    if op is Op.EQ:
        return Bitmaps([vindex.get(values[0])])
    if op is Op.NE:
        return Bitmaps([engine.exists[spec.id]], vindex.get(values[0]))
    if op is Op.IN:
        return Bitmaps([vindex.get(v) for v in dict.fromkeys(values)])
    if op is Op.HAS:
        raise InvalidArgument(f"query: HAS needs a list attribute; {spec.name!r} is {kind.label}")
    raise InvalidArgument(
        f"query: {op.value} is not defined on {kind.label} attribute {spec.name!r}; "
        "ranges need int, float or timestamp"
    )


def _literal(spec: AttributeSpec, value: Any, op: Op) -> Any:
    """The stored/index form of a literal for `spec`, or InvalidArgument."""
    kind = spec.kind
    where = f"query: {spec.name} {op.value}"
    if kind is Kind.TIMESTAMP:
        if isinstance(value, str):
            try:
                value = parse_timestamp(value)
            except QueryError as exc:
                raise InvalidArgument(f"{where}: {exc}") from None
        if not isinstance(value, datetime):
            raise InvalidArgument(
                f"{where}: {spec.name!r} is a timestamp, compare it with an ISO-8601 string"
            )
        return datetime_to_micros(value)
    if kind is Kind.INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(
                f"{where}: {spec.name!r} has kind int, got {_kind_name(value)} literal "
                f"{_shown(value)}"
            )
        return value
    if kind is Kind.FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(
                f"{where}: {spec.name!r} has kind float, got {_kind_name(value)} literal "
                f"{_shown(value)}"
            )
        return float_to_ordered(float(value))
    if kind is Kind.BOOL:
        if not isinstance(value, bool):
            raise InvalidArgument(
                f"{where}: {spec.name!r} has kind bool, got {_kind_name(value)} literal "
                f"{_shown(value)}"
            )
        return value
    # STRING and STRING_LIST elements
    if not isinstance(value, str):
        raise InvalidArgument(
            f"{where}: {spec.name!r} has kind {kind.label}, "
            f"got {_kind_name(value)} literal {_shown(value)}"
        )
    return value


def _shown(value: Any) -> str:
    """A literal as a message shows it: a timestamp in ISO-8601, as it is written."""
    return value.isoformat() if isinstance(value, datetime) else brief(value)


def _as_numbers(kind: Kind, op: Op, values: Sequence[Any]) -> tuple[Op, tuple[Any, ...]] | None:
    """A comparison of a number attribute as one whose literals are of its own kind,
    compared exactly (`_whole_numbers`, `_exact_floats`); any other, as it is. None:
    nothing can match; (EXISTS, ()): every profile holding the attribute."""
    if kind is Kind.INT and any(type(v) is float for v in values):
        return _whole_numbers(op, values)
    if kind is Kind.FLOAT and any(type(v) is int for v in values):
        return _exact_floats(op, values)
    if kind is Kind.TIMESTAMP and any(type(v) is str and len(v) > 26 for v in values):
        return _exact_times(op, values)  # (fewer characters hold no 7th fractional digit)
    return op, tuple(values)


def _exact_times(op: Op, values: Sequence[Any]) -> tuple[Op, tuple[Any, ...]] | None:
    """A comparison of a timestamp attribute (whole microseconds) with literals that may
    be finer (7 to 9 fractional digits), as the same comparison with whole ones, exact:
    `t < "...00.0000001"` is `t <= "...00.000000"`, and `t = "...00.0000001"` matches
    nobody. Literals that are not timestamps are left for _literal to name.
    None: nothing can match; (EXISTS, ()): every profile holding the attribute."""
    try:
        parts = [timestamp_beyond_micros(v) if isinstance(v, str) else (v, 0)
                 for v in values]
    except QueryError:
        return op, tuple(values)
    if not all(isinstance(at, datetime) for at, _ in parts):
        return op, tuple(values)
    exact = [at for at, beyond in parts if not beyond]
    if op is Op.EQ:
        return (op, (exact[0],)) if exact else None
    if op is Op.NE:
        return (op, (exact[0],)) if exact else (Op.EXISTS, ())
    if op is Op.IN:
        return (op, tuple(exact)) if exact else None
    if op is Op.BETWEEN:
        (low, after_low), (high, _) = parts
        if after_low:  # the first whole microsecond after it
            micros = datetime_to_micros(low) + 1
            if micros > MAX_MICROS:
                return None
            low = micros_to_datetime(micros)
        return (op, (low, high)) if low <= high else None
    ((at, beyond),) = parts
    if beyond and op is Op.LT:
        return Op.LE, (at,)  # t < at + beyond: t <= at
    if beyond and op is Op.GE:
        return Op.GT, (at,)  # t >= at + beyond: t > at
    return op, (at,)  # LE and GT: the same whole microsecond bounds it


def _whole_numbers(op: Op, values: Sequence[Any]) -> tuple[Op, tuple[Any, ...]] | None:
    """A comparison of an int attribute with float literals, as the same comparison with
    int literals (numbers compare as numbers: `age > 30.5` is `age >= 31`), clamped to
    int64. None: nothing can match; (EXISTS, ()): every profile holding the attribute."""
    def clamp(op: Op, bound: int) -> tuple[Op, tuple[Any, ...]] | None:
        if op in (Op.LE, Op.LT):
            return (Op.EXISTS, ()) if bound > _INT64_MAX else (
                None if bound < _INT64_MIN else (op, (bound,)))
        return (Op.EXISTS, ()) if bound < _INT64_MIN else (  # GE, GT
            None if bound > _INT64_MAX else (op, (bound,)))

    wrong = tuple(v for v in values if isinstance(v, bool) or not isinstance(v, int | float))
    if wrong:
        return op, wrong  # _literal names the first (not a float beside it)
    whole = [v for v in values if float(v).is_integer()]
    if op is Op.EQ:
        return (op, (int(whole[0]),)) if whole and _INT64_MIN <= whole[0] <= _INT64_MAX \
            else None
    if op is Op.NE:
        return (op, (int(whole[0]),)) if whole and _INT64_MIN <= whole[0] <= _INT64_MAX \
            else (Op.EXISTS, ())
    if op is Op.IN:
        kept = tuple(int(v) for v in whole if _INT64_MIN <= v <= _INT64_MAX)
        return (op, kept) if kept else None
    if op is Op.BETWEEN:
        low, high = max(math.ceil(values[0]), _INT64_MIN), min(math.floor(values[1]),
                                                               _INT64_MAX)
        return (op, (low, high)) if low <= high else None
    (value,) = values
    if op is Op.LT:
        return clamp(Op.LT, int(value)) if float(value).is_integer() else \
            clamp(Op.LE, math.floor(value))
    if op is Op.LE:
        return clamp(Op.LE, math.floor(value))
    if op is Op.GT:
        return clamp(Op.GT, int(value)) if float(value).is_integer() else \
            clamp(Op.GE, math.ceil(value))
    if op is Op.GE:
        return clamp(Op.GE, math.ceil(value))
    return op, tuple(values)


def _exact_floats(op: Op, values: Sequence[Any]) -> tuple[Op, tuple[Any, ...]] | None:
    """A comparison of a float attribute with int literals, as the same comparison with
    float literals that rounding does not change (numbers compare as numbers: `f <
    2**53 + 1` holds for 2.0**53, the float just below it, so it is `f <= 2.0**53`).
    None: nothing can match; (EXISTS, ()): every profile holding the attribute."""
    wrong = tuple(v for v in values if type(v) is not int and type(v) is not float)
    if wrong:
        return op, wrong  # _literal names the first

    def rounded(v: float) -> tuple[float, bool]:  # the nearest float, and if exact
        f = float(v)  # (literals are int64: every one is finite as a float)
        return f, f == v  # (int == float compares exactly)

    def below(v: float) -> float:  # the largest float <= v
        f, exact = rounded(v)
        return f if exact or f < v else math.nextafter(f, -math.inf)

    def above(v: float) -> float:  # the smallest float >= v
        f, exact = rounded(v)
        return f if exact or f > v else math.nextafter(f, math.inf)

    if op is Op.EQ:
        f, exact = rounded(values[0])
        return (op, (f,)) if exact else None
    if op is Op.NE:
        f, exact = rounded(values[0])
        return (op, (f,)) if exact else (Op.EXISTS, ())
    if op is Op.IN:
        kept = tuple(f for f, exact in map(rounded, values) if exact)
        return (op, kept) if kept else None
    if op is Op.BETWEEN:
        low, high = above(values[0]), below(values[1])
        return (op, (low, high)) if low <= high else None
    (value,) = values
    if op in (Op.LT, Op.LE):  # f < v, for a v no float equals, is f <= below(v)
        f, exact = rounded(value)
        return (op, (f,)) if exact else (Op.LE, (below(value),))
    if op in (Op.GT, Op.GE):
        f, exact = rounded(value)
        return (op, (f,)) if exact else (Op.GE, (above(value),))
    return op, tuple(values)


def _kind_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, int):
        return "an int"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    return f"a {type(value).__name__}"
