"""Per-profile matching: a query tree compiled once into a test of one profile's values.

Saved segments (memstore.engine.segments) decide whether the few profiles a write touched
are members with this test, on each profile's stored attributes (attribute id -> stored
value, as a profile blob holds them), instead of cutting index bitmaps down to those
profiles. A compiled matcher answers exactly as `evaluate(engine, node,
unknown_is_empty=True, within=...)` over the indexes does for that profile:

  * an attribute the schema does not know matches nobody (so NOT of it matches everyone);
  * a comparison, IN or HAS needs the attribute to be present: `x != 3` and `x < 3` leave
    out profiles without x, `NOT x = 3` takes them in;
  * int attributes compared with float literals follow `_whole_numbers` (`age > 30.5` is
    `age >= 31`), float attributes take int literals, timestamps take ISO-8601 strings;
  * lists: HAS, IN (any element) and != (present and not holding it); an empty list is
    stored as absent;
  * `in_segment(name)` reads that segment's members as they are when the matcher runs.

Whatever the index path would refuse (a literal of the wrong kind, an attribute declared
not indexed, an op the attribute's kind lacks, an unknown segment or node type) raises
`Undecidable` when compiling, never while matching: the caller then uses the index path
for that segment, which raises the same error as before. A matcher is only as good as the
schema it was compiled against; compile again when the schema changes. Clock-dependent
queries (`did(...)`) are the caller's to keep away: the tree holds their window's start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyroaring import BitMap

from memstore.engine.core import RANGE_KINDS
from memstore.engine.schema import Kind, Schema
from memstore.errors import InvalidArgument
from memstore.query import All, And, InSegment, Node, Not, Op, Or, Predicate
from memstore.query.evaluate import _literal, _whole_numbers

# (the profile's stored attributes by attribute id, its dense id) -> is it a member
Matcher = Callable[[dict[int, Any], int], bool]


class Undecidable(Exception):
    """The query cannot be answered from a profile the way the index path answers it."""


def compile_query(node: Node, schema: Schema,
                  members: Callable[[str], BitMap | None]) -> Matcher:
    """The matcher of `node`; `members(name)` is a saved segment's current members (None:
    no such segment). Raises Undecidable (see the module docstring)."""
    if isinstance(node, Predicate):
        return _predicate(node, schema)
    if isinstance(node, And):
        return _all([compile_query(c, schema, members) for c in node.children])
    if isinstance(node, Or):
        return _any([compile_query(c, schema, members) for c in node.children])
    if isinstance(node, Not):
        inner = compile_query(node.child, schema, members)
        return lambda attrs, dense: not inner(attrs, dense)
    if isinstance(node, All):
        return _always
    if isinstance(node, InSegment):
        name = node.name
        if members(name) is None:
            raise Undecidable(f"unknown segment {name!r}")

        def in_segment(attrs: dict[int, Any], dense: int) -> bool:
            held = members(name)
            return held is not None and dense in held

        return in_segment
    raise Undecidable(f"unsupported node {type(node).__name__}")


def _always(attrs: dict[int, Any], dense: int) -> bool:
    return True


def _never(attrs: dict[int, Any], dense: int) -> bool:
    return False


def _all(parts: list[Matcher]) -> Matcher:
    if len(parts) == 1:
        return parts[0]

    def every(attrs: dict[int, Any], dense: int) -> bool:
        for part in parts:
            if not part(attrs, dense):
                return False
        return True

    return every


def _any(parts: list[Matcher]) -> Matcher:
    if len(parts) == 1:
        return parts[0]

    def some(attrs: dict[int, Any], dense: int) -> bool:
        for part in parts:
            if part(attrs, dense):
                return True
        return False

    return some


def _predicate(p: Predicate, schema: Schema) -> Matcher:
    spec = schema.get(p.attribute)
    if spec is None:
        return _never  # lenient: an attribute never seen here matches nobody
    if not spec.indexed:
        raise Undecidable(f"{p.attribute!r} is not indexed")
    aid, kind, op = spec.id, spec.kind, p.op
    if op is Op.EXISTS:
        return lambda attrs, dense: aid in attrs
    raw = p.values
    if kind is Kind.INT and any(type(v) is float for v in raw):
        whole = _whole_numbers(op, raw)
        if whole is None:
            return _never
        if whole[0] is Op.EXISTS:
            return lambda attrs, dense: aid in attrs
        op, raw = whole
    try:
        values = [_literal(spec, v, op) for v in raw]
    except InvalidArgument as exc:
        raise Undecidable(str(exc)) from None
    if kind in RANGE_KINDS:
        if kind is Kind.FLOAT:
            # The index keys floats by an order-preserving map (-0.0 as 0.0): comparing
            # the floats themselves orders them the same way.
            values = [float(v) for v in raw]  # type: ignore[arg-type]  # _literal checked
        return _range(op, values, aid)
    return _value(op, values, aid, kind is Kind.STRING_LIST)


def _range(op: Op, values: list[Any], aid: int) -> Matcher:
    if op is Op.IN:
        wanted = frozenset(values)
        return lambda attrs, dense: attrs.get(aid) in wanted
    if op is Op.BETWEEN:
        low, high = values

        def between(attrs: dict[int, Any], dense: int) -> bool:
            x = attrs.get(aid)
            return x is not None and low <= x <= high

        return between
    if op is Op.HAS:
        raise Undecidable("HAS needs a list attribute")
    (v,) = values
    if op is Op.EQ:
        return lambda attrs, dense: attrs.get(aid) == v
    if op is Op.NE:
        return lambda attrs, dense: (x := attrs.get(aid)) is not None and x != v
    if op is Op.LT:
        return lambda attrs, dense: (x := attrs.get(aid)) is not None and x < v
    if op is Op.LE:
        return lambda attrs, dense: (x := attrs.get(aid)) is not None and x <= v
    if op is Op.GT:
        return lambda attrs, dense: (x := attrs.get(aid)) is not None and x > v
    if op is Op.GE:
        return lambda attrs, dense: (x := attrs.get(aid)) is not None and x >= v
    raise Undecidable(f"unsupported op {op!r}")


def _value(op: Op, values: list[Any], aid: int, is_list: bool) -> Matcher:
    """String, bool and list attributes, as evaluate's `_predicate_among` answers them."""
    if op is Op.IN:
        wanted = frozenset(values)
        if is_list:
            return lambda attrs, dense: (x := attrs.get(aid)) is not None \
                and not wanted.isdisjoint(x)
        return lambda attrs, dense: attrs.get(aid) in wanted
    if op is Op.NE:
        (v,) = values
        if is_list:  # among a few ids the index path answers != on a list: present, lacks v
            return lambda attrs, dense: (x := attrs.get(aid)) is not None and v not in x
        return lambda attrs, dense: (x := attrs.get(aid)) is not None and x != v
    if op is Op.EQ and not is_list:
        (v,) = values
        return lambda attrs, dense: (x := attrs.get(aid)) is not None and x == v
    if op is Op.HAS and is_list:
        (v,) = values
        return lambda attrs, dense: (x := attrs.get(aid)) is not None and v in x
    raise Undecidable(f"{op.value} is not defined on this kind")
