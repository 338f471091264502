"""Segment query evaluation: a query AST to a roaring bitmap of dense ids, from the indexes.

Never scans profiles. Equality and list membership read one bitmap per value; numeric and
timestamp predicates run the bit-sliced index in a number of bitmap operations bounded by
the value's bit width; NOT subtracts from the visible-profiles bitmap. Literals are
checked against the attribute's kind so a wrong-kind query fails with a clear message
instead of silently matching nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pyroaring import BitMap

from memstore.engine.core import RANGE_KINDS, Engine
from memstore.engine.schema import AttributeSpec, Kind
from memstore.errors import InvalidArgument
from memstore.index.bitmap_index import float_to_ordered
from memstore.pbvalues import datetime_to_micros
from memstore.query import (
    All,
    And,
    InSegment,
    Node,
    Not,
    Op,
    Or,
    Predicate,
    QueryError,
    parse_timestamp,
)

_RANGE_OPS = {Op.LT: "lt", Op.LE: "le", Op.GT: "gt", Op.GE: "ge", Op.EQ: "eq", Op.NE: "ne"}


def evaluate(engine: Engine, node: Node, *, unknown_is_empty: bool = False,
             within: BitMap | None = None) -> BitMap:
    """Dense ids of visible profiles matching `node`. Raises InvalidArgument.

    With `unknown_is_empty` (a router asking), an attribute this shard has never seen
    matches nothing here instead of failing. With `within`, only those dense ids are
    considered, visible or not (a saved segment's members among the profiles a change
    touched, memstore.engine.segments): the work then scales with them, not the shard."""
    if within is not None:
        return _eval(engine, node, within, unknown_is_empty, small=True) & within
    universe = engine.visible()
    result = _eval(engine, node, universe, unknown_is_empty)
    # Leaves may include profiles outside owned slots; one intersection at the top removes them.
    if engine.foreign or engine.held_dense:
        result = result & universe
    return result


def _eval(engine: Engine, node: Node, universe: BitMap, lenient: bool,
          small: bool = False) -> BitMap:
    """`small`: the universe is a few ids (a segment's refresh): every leaf is computed
    among them only, never as a whole index bitmap copied or combined."""
    if isinstance(node, Predicate):
        if lenient and engine.schema.get(node.attribute) is None:
            return BitMap()
        return _predicate(engine, node, restrict=universe if small else None)
    if isinstance(node, And):
        return _and(engine, node.children, universe, lenient, small)
    if isinstance(node, Or):
        return BitMap.union(*[_eval(engine, child, universe, lenient, small)
                              for child in node.children])
    if isinstance(node, Not):
        return universe - _eval(engine, node.child, universe, lenient, small)
    if isinstance(node, All):
        return BitMap(universe)
    if isinstance(node, InSegment):
        segment = engine.segments.get(node.name)
        if segment is None:
            raise InvalidArgument(f"query: unknown segment {node.name!r}")
        return segment.members & universe
    raise InvalidArgument(f"query: unsupported node {type(node).__name__}")


def _and(engine: Engine, children: Sequence[Node], universe: BitMap, lenient: bool,
         small: bool = False) -> BitMap:
    """Intersect the children, doing the expensive ones on the survivors only: set and
    value predicates first (smallest first), then numeric ranges computed among the ids
    left (the bit-sliced steps then run on candidates, not on every profile), then each
    NOT as a difference from what is left rather than a complement of everything. Every
    child is evaluated even once the result is empty, so a bad predicate is always an
    error, whatever the data."""
    ranged = [c for c in children if _is_range(engine, c)]
    negated = [c.child for c in children if isinstance(c, Not)]
    rest = [c for c in children if not isinstance(c, Not) and not _is_range(engine, c)]
    result: BitMap | None = None
    for part in sorted((_eval(engine, c, universe, lenient, small) for c in rest), key=len):
        result = part if result is None else result & part
    for p in ranged:
        assert isinstance(p, Predicate)
        if lenient and engine.schema.get(p.attribute) is None:
            result = BitMap()
            continue
        result = _predicate(engine, p, within=universe if result is None and small
                            else result)
    for child in negated:
        result = (universe if result is None else result) - _eval(engine, child, universe,
                                                                  lenient, small)
    assert result is not None
    return result


def _is_range(engine: Engine, node: Node) -> bool:
    """A comparison on a numeric or time attribute: answered from its bit-sliced index."""
    if not isinstance(node, Predicate) or node.op in (Op.EXISTS, Op.IN):
        return False
    spec = engine.schema.get(node.attribute)
    return spec is not None and spec.kind in RANGE_KINDS


def spec_for_query(engine: Engine, name: str) -> AttributeSpec:
    spec = engine.schema.get(name)
    if spec is None:
        raise InvalidArgument(f"query: unknown attribute {name!r}")
    if not spec.indexed:
        raise InvalidArgument(f"query: attribute {name!r} is declared not indexed")
    return spec


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
                f"{where}: {spec.name!r} has kind int, got {_kind_name(value)} literal {value!r}"
            )
        return value
    if kind is Kind.FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(
                f"{where}: {spec.name!r} has kind float, got {_kind_name(value)} literal {value!r}"
            )
        return float_to_ordered(float(value))
    if kind is Kind.BOOL:
        if not isinstance(value, bool):
            raise InvalidArgument(
                f"{where}: {spec.name!r} has kind bool, got {_kind_name(value)} literal {value!r}"
            )
        return value
    # STRING and STRING_LIST elements
    if not isinstance(value, str):
        raise InvalidArgument(
            f"{where}: {spec.name!r} has kind {kind.label}, "
            f"got {_kind_name(value)} literal {value!r}"
        )
    return value


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

    numbers = [v for v in values if not isinstance(v, bool) and isinstance(v, int | float)]
    if len(numbers) != len(values):
        return op, tuple(values)  # a wrong-kind literal: _literal names it
    whole = [v for v in values if float(v).is_integer()]
    if op is Op.EQ:
        return (op, (int(whole[0]),)) if whole and abs(whole[0]) <= _INT64_MAX else None
    if op is Op.NE:
        return (op, (int(whole[0]),)) if whole and abs(whole[0]) <= _INT64_MAX \
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


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


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


def _predicate(engine: Engine, p: Predicate, within: BitMap | None = None,
               restrict: BitMap | None = None) -> BitMap:
    """Ids matching `p`; for a range comparison, only among `within` if given; with
    `restrict`, only among those ids, for every kind (computed among them)."""
    if restrict is not None:
        return _predicate_among(engine, p, restrict)
    spec = spec_for_query(engine, p.attribute)
    op = p.op
    kind = spec.kind
    if op is Op.EXISTS:
        if kind in RANGE_KINDS:
            return BitMap(engine.range_index[spec.id].exists())
        return BitMap(engine.exists[spec.id])
    raw = p.values
    if kind is Kind.INT and any(type(v) is float for v in raw):
        whole = _whole_numbers(op, raw)
        if whole is None:
            return BitMap()
        if whole[0] is Op.EXISTS:
            return BitMap(engine.range_index[spec.id].exists())
        op, raw = whole
    values = [_literal(spec, v, op) for v in raw]
    if kind in RANGE_KINDS:
        index = engine.range_index[spec.id]
        if op is Op.IN:
            return BitMap.union(BitMap(), *(index.compare("eq", v) for v in values))
        if op is Op.BETWEEN:
            return index.between(values[0], values[1], within)
        if op is Op.HAS:
            raise InvalidArgument(f"query: HAS needs a list attribute; {spec.name!r} is "
                                  f"{kind.label}")
        return index.compare(_RANGE_OPS[op], values[0], within)
    vindex = engine.value_index[spec.id]
    if kind is Kind.STRING_LIST:
        if op is Op.HAS:
            return BitMap(vindex.get(values[0]))
        if op is Op.IN:
            return vindex.union_of(values)
        raise InvalidArgument(
            f"query: {spec.name!r} is a list; use HAS, IN or exists() (got {op.value})"
        )
    if op is Op.EQ:
        return BitMap(vindex.get(values[0]))
    if op is Op.NE:
        return engine.exists[spec.id] - vindex.get(values[0])
    if op is Op.IN:
        return vindex.union_of(values)
    if op is Op.HAS:
        raise InvalidArgument(f"query: HAS needs a list attribute; {spec.name!r} is {kind.label}")
    raise InvalidArgument(
        f"query: {op.value} is not defined on {kind.label} attribute {spec.name!r}; "
        "ranges need int, float or timestamp"
    )


def _predicate_among(engine: Engine, p: Predicate, among: BitMap) -> BitMap:
    """_predicate's answer among `among` (a few ids): each bitmap is cut to them before
    anything is copied or combined."""
    spec = spec_for_query(engine, p.attribute)
    op, kind = p.op, spec.kind
    if op is Op.EXISTS:
        exists = engine.range_index[spec.id].exists() if kind in RANGE_KINDS \
            else engine.exists[spec.id]
        return exists & among
    if kind in RANGE_KINDS:
        if op is Op.IN:
            raw = p.values
            if kind is Kind.INT and any(type(v) is float for v in raw):
                whole = _whole_numbers(op, raw)
                if whole is None:
                    return BitMap()
                raw = whole[1]
            index = engine.range_index[spec.id]
            return BitMap.union(BitMap(), *(index.compare("eq", _literal(spec, v, op), among)
                                            for v in raw))
        return _predicate(engine, p, within=among) & among
    values = [_literal(spec, v, op) for v in p.values]
    vindex = engine.value_index[spec.id]
    if op is Op.IN:
        return BitMap.union(BitMap(), *(vindex.get(v) & among for v in values))
    if op is Op.NE:
        return (engine.exists[spec.id] & among) - vindex.get(values[0])
    if op is Op.EQ or op is Op.HAS:
        if op is Op.HAS and kind is not Kind.STRING_LIST:
            return _predicate(engine, p)  # the same error
        if op is Op.EQ and kind is Kind.STRING_LIST:
            return _predicate(engine, p)  # the same error
        return vindex.get(values[0]) & among
    return _predicate(engine, p) & among  # errors as without `among`


def group_counts(engine: Engine, matches: BitMap, attribute: str,
                 unknown_is_empty: bool = False) -> list[tuple[Any, int]]:
    """Exact (value, count) over `matches` for a string, bool or list attribute."""
    if unknown_is_empty and engine.schema.get(attribute) is None:
        return []
    spec = spec_for_query(engine, attribute)
    if spec.kind in RANGE_KINDS:
        raise InvalidArgument(
            f"group_by: {attribute!r} is {spec.kind.label}; group by a string, bool or list"
        )
    return engine.value_index[spec.id].group_counts(matches)
