"""Per-profile matching: a query tree compiled once into a test of one profile's values.

Saved segments (memstore.engine.segments) decide whether the few profiles a write touched
are members with this test, on each profile's stored attributes (attribute id -> stored
value, as a profile blob holds them), instead of cutting index bitmaps down to those
profiles. `compile_changes` puts several such tests in one function, which says which of
them no longer agree with the members held (a write's segments, decided in one call). A compiled matcher answers exactly as `evaluate(engine, node,
unknown_is_empty=True, within=...)` over the indexes does for that profile:

  * an attribute the schema does not know matches nobody (so NOT of it matches everyone);
  * a comparison, IN or HAS needs the attribute to be present: `x != 3` and `x < 3` leave
    out profiles without x, `NOT x = 3` takes them in;
  * numbers compare exactly across int and float (`_as_numbers`: `age > 30.5` is
    `age >= 31`, `f < 2**53 + 1` is `f <= 2.0**53`), timestamps take ISO-8601 strings;
  * lists: HAS and IN (any element); != on a list is refused, as the planner refuses it
    (a segment meets it only when the attribute was unknown at its creation: it then
    breaks, naming why); an empty list is stored as absent;
  * `in_segment(name)` reads that segment's members as they are when the matcher runs.

Whatever the index path would refuse (a literal of the wrong kind, an attribute declared
not indexed, an op the attribute's kind lacks, an unknown segment or node type), and a
tree too deep for Python's compiler (none `validate` accepts, tested), raises
`Undecidable` when compiling, never while matching: the caller then uses the index path
for that segment, which raises the same error as before. A matcher is only as good as the
schema it was compiled against; compile again when the schema changes. Clock-dependent
queries (`did(...)`) are the caller's to keep away: the tree holds their window's start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pyroaring import BitMap

from memstore.engine.schema import RANGE_KINDS, Kind, Schema
from memstore.errors import InvalidArgument
from memstore.query import All, And, InSegment, Node, Not, Op, Or, Predicate
from memstore.query.plan import _as_numbers, _literal

# (the profile's stored attributes by attribute id, its dense id) -> is it a member
Matcher = Callable[[dict[int, Any], int], bool]
# (the same) -> the indexes of the tests whose answer differs from the holder's members
Changes = Callable[[dict[int, Any], int], list[int]]


class Holder(Protocol):
    """What `compile_changes` compares an answer with: the members as they are now."""

    members: BitMap


class Undecidable(Exception):
    """The query cannot be answered from a profile the way the index path answers it."""


def compile_query(node: Node, schema: Schema,
                  members: Callable[[str], BitMap | None]) -> Matcher:
    """The matcher of `node`; `members(name)` is a saved segment's current members (None:
    no such segment). Raises Undecidable (see the module docstring).

    The tree becomes the source of one Python expression, compiled once: a segment's test
    then costs one call, not one a node. Literals enter it as names bound to their values,
    never as text."""
    consts: dict[str, Any] = {"__builtins__": {}, "members": members}
    source = "lambda a, d: " + _expr(node, schema, consts)
    try:
        return eval(compile(source, "<segment query>", "eval"), consts)  # type: ignore[no-any-return]
    except (SyntaxError, RecursionError, MemoryError) as exc:  # a tree nested too deep
        raise Undecidable(f"query too deep to compile: {exc}") from None


def compile_changes(tests: Sequence[tuple[Node, Holder]], schema: Schema,
                    members: Callable[[str], BitMap | None]) -> Changes:
    """One function deciding several queries on one profile at once: given (query, holder)
    pairs, it returns the indexes of the pairs whose query's answer for the profile
    differs from whether the holder's `members` (read at each call) hold its dense id,
    in the order given. Raises Undecidable as `compile_query` does, for any query.

    A saved segment's write visits tens of segments: one call with every test inline
    saves a call, a bitmap look-up and the loop's bookkeeping a segment."""
    consts: dict[str, Any] = {"__builtins__": {}, "members": members}
    hoisted: set[int] = set()  # each attribute read is looked up once, first
    body = []
    for i, (node, holder) in enumerate(tests):
        expr = _expr(node, schema, consts, hoisted)
        # `not` makes any answer a bool: equal to "is a member" means it changed.
        body.append(f"    if (not {expr}) == (d in {_const(consts, holder)}.members):")
        body.append(f"        out.append({i})")
    lines = ["def changes(a, d):", "    get = a.get", "    out = []",
             *(f"    v{aid} = get({aid})" for aid in sorted(hoisted)), *body, "    return out"]
    try:
        exec(compile("\n".join(lines), "<segment queries>", "exec"), consts)  # noqa: S102 - our source; literals are bound names
    except (SyntaxError, RecursionError, MemoryError) as exc:  # a tree nested too deep
        raise Undecidable(f"queries too deep to compile: {exc}") from None
    return consts["changes"]  # type: ignore[no-any-return]


def _const(consts: dict[str, Any], value: Any) -> str:
    name = f"c{len(consts)}"
    consts[name] = value
    return name


def _expr(node: Node, schema: Schema, consts: dict[str, Any],
          hoisted: set[int] | None = None) -> str:
    """The source of `node`'s test. `hoisted`: read attribute i's value from the local
    `v<i>` (the caller assigns it once), adding i to the set, instead of from `a`."""
    if isinstance(node, Predicate):
        return _predicate(node, schema, consts, hoisted)
    if isinstance(node, And | Or):
        parts = [_expr(c, schema, consts, hoisted) for c in node.children]
        return "(" + (" and " if isinstance(node, And) else " or ").join(parts) + ")"
    if isinstance(node, Not):
        return f"(not {_expr(node.child, schema, consts, hoisted)})"
    if isinstance(node, All):
        return "True"
    if isinstance(node, InSegment):
        if consts["members"](node.name) is None:
            raise Undecidable(f"unknown segment {node.name!r}")
        # Looked up at each test: a rebuild replaces the members' bitmap.
        return f"(d in (members({_const(consts, node.name)}) or ()))"
    raise Undecidable(f"unsupported node {type(node).__name__}")


def _predicate(p: Predicate, schema: Schema, consts: dict[str, Any],
               hoisted: set[int] | None = None) -> str:
    spec = schema.get(p.attribute)
    if spec is None:
        return "False"  # lenient: an attribute never seen here matches nobody
    if not spec.indexed:
        raise Undecidable(f"{p.attribute!r} is not indexed")
    aid, kind, op = spec.id, spec.kind, p.op
    if op is Op.EXISTS:
        return f"({aid} in a)"
    raw = p.values
    numbers = _as_numbers(kind, op, raw)
    if numbers is None:
        return "False"
    if numbers[0] is Op.EXISTS:
        return f"({aid} in a)"
    op, raw = numbers
    try:
        values = [_literal(spec, v, op) for v in raw]
    except InvalidArgument as exc:
        raise Undecidable(str(exc)) from None
    if kind is Kind.FLOAT:
        # The index keys floats by an order-preserving map (-0.0 as 0.0): comparing the
        # floats themselves orders them the same way.
        values = [float(v) for v in raw]  # type: ignore[arg-type]  # _literal checked
    is_list = kind is Kind.STRING_LIST
    if hoisted is None:
        value, present, x = f"a.get({aid})", f"(x := a.get({aid})) is not None", "x"
    else:
        hoisted.add(aid)
        value = x = f"v{aid}"
        present = f"{x} is not None"
    if op is Op.IN:
        wanted = _const(consts, frozenset(values))
        if is_list:
            return f"({present} and not {wanted}.isdisjoint({x}))"
        return f"({value} in {wanted})"
    if kind in RANGE_KINDS and op is Op.BETWEEN:
        low, high = _const(consts, values[0]), _const(consts, values[1])
        return f"({present} and {low} <= {x} <= {high})"
    if len(values) != 1:
        raise Undecidable(f"{op.value} takes {len(values)} values here")
    v = _const(consts, values[0])
    if op is Op.NE:
        if is_list:  # the planner refuses != on a list (use NOT ... HAS)
            raise Undecidable("!= is not defined on a list")
        return f"({present} and {x} != {v})"
    if op is Op.HAS:
        if not is_list:
            raise Undecidable("HAS needs a list attribute")
        return f"({present} and {v} in {x})"
    if op is Op.EQ and not is_list:
        return f"({value} == {v})"
    if kind in RANGE_KINDS and op in _COMPARE:
        return f"({present} and {x} {_COMPARE[op]} {v})"
    raise Undecidable(f"{op.value} is not defined on {kind.label}")


_COMPARE = {Op.LT: "<", Op.LE: "<=", Op.GT: ">", Op.GE: ">="}
