"""Conversion between the query syntax tree and its protobuf form (memstore.v1.Query).

Errors name the path of the offending field in proto terms, for example
`query.and.children[1].predicate: BETWEEN needs 2 values, got 1`.
`pb.Predicate.Op` member names equal `Op` member names; `Query.all` must be true.
`from_proto` counts items and predicates against its `QueryLimits` as it converts, and a
predicate's values before converting any of them.
"""

from __future__ import annotations

import functools
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from memstore import pbvalues
from memstore.query.ast import (
    MAX_DEPTH,
    All,
    And,
    Did,
    InSegment,
    Literal,
    Node,
    Not,
    Op,
    Or,
    Predicate,
    QueryError,
    validate,
)
from memstore.query.limits import DEFAULT_LIMITS, QueryLimits
from memstore.query.parser import parse, parse_date
from memstore.v1 import memstore_pb2 as pb

__all__ = ["from_proto", "query_from_request", "to_proto"]


def to_proto(node: Node) -> pb.Query:
    """The protobuf form of a valid tree; QueryError (with a path) for an invalid one."""
    validate(node)
    return _to_proto(node)


def _to_proto(node: Node) -> pb.Query:
    out = pb.Query()
    if isinstance(node, Predicate):
        out.predicate.attribute = node.attribute
        out.predicate.op = pb.Predicate.Op.Value(node.op.name)
        out.predicate.values.extend(pbvalues.to_pb(v) for v in node.values)
    elif isinstance(node, And | Or):
        field = getattr(out, "and" if isinstance(node, And) else "or")
        field.SetInParent()  # a oneof member is set even before children are added
        field.children.extend(_to_proto(c) for c in node.children)
    elif isinstance(node, Not):
        getattr(out, "not").CopyFrom(_to_proto(node.child))
    elif isinstance(node, Did):
        did = out.did
        did.event = node.event
        if node.within_seconds is not None:
            did.within_seconds = node.within_seconds
        elif node.within_days is not None:
            did.within_days = node.within_days
        else:
            setattr(did, "from", str(node.first))
            if node.last is not None:
                did.to = str(node.last)
        if node.at_least is not None:
            did.at_least = node.at_least
        if node.at_most is not None:
            did.at_most = node.at_most
    elif isinstance(node, InSegment):
        out.in_segment = node.name
    else:
        out.all = True
    return out


def from_proto(q: pb.Query, path: str = "query", limits: QueryLimits = DEFAULT_LIMITS
               ) -> Node:
    """The tree of a protobuf query, validated; QueryError naming the field path."""
    node = _Converter(limits).node(q, path, 1)
    validate(node, path)
    return node


class _Converter:
    """One query's conversion, counting its items and predicates against `limits`."""

    def __init__(self, limits: QueryLimits) -> None:
        self.limits = limits
        self.items = 0
        self.predicates = 0

    def node(self, q: pb.Query, path: str, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise QueryError(f"{path}: query nested deeper than {MAX_DEPTH} levels")
        kind = q.WhichOneof("node")
        if kind is None:
            raise QueryError(f"{path}: empty query node")
        if kind in ("and", "or"):
            children = getattr(q, kind).children
            where = f"{path}.{kind}"
            if not children:
                raise QueryError(f"{where}: needs at least 1 child")
            nodes = tuple(self.node(c, f"{where}.children[{i}]", depth + 1)
                          for i, c in enumerate(children))
            return And(nodes) if kind == "and" else Or(nodes)
        if kind == "not":
            return Not(self.node(getattr(q, "not"), f"{path}.not", depth + 1))
        self.predicates += 1
        problem = self.limits.predicates_problem(self.predicates)
        if problem is not None:
            raise QueryError(f"{path}: {problem}")
        if kind == "predicate":
            return self.predicate(q.predicate, f"{path}.predicate")
        if kind == "did":
            return _did(q.did, f"{path}.did")
        if kind == "in_segment":
            return InSegment(q.in_segment)
        if not q.all:
            raise QueryError(f"{path}.all: must be true when set")
        return All()

    def predicate(self, p: pb.Predicate, where: str) -> Predicate:
        if p.op == pb.Predicate.Op.OP_UNSPECIFIED:
            raise QueryError(f"{where}: op not set")
        try:
            op = Op[pb.Predicate.Op.Name(p.op)]
        except (ValueError, KeyError):
            raise QueryError(f"{where}: unknown op {p.op}") from None
        count = len(p.values)
        self.items += count
        problem = self.limits.items_problem(self.items, count if op is Op.IN else 0)
        if problem is not None:
            raise QueryError(f"{where}: {problem}")
        values = tuple(_literal(v, f"{where}.values[{i}]") for i, v in enumerate(p.values))
        return Predicate(p.attribute, op, values)


def _did(d: pb.Did, where: str) -> Did:
    first = last = None
    for name, text in (("from", getattr(d, "from")), ("to", d.to)):
        if text:
            try:
                day = parse_date(text)
            except QueryError as exc:
                raise QueryError(f"{where}.{name}: {exc}") from None
            if name == "from":
                first = day
            else:
                last = day
    if d.within_days and (first is not None or last is not None):
        raise QueryError(f"{where}: within_days and from/to are two kinds of window: give one")
    if last is not None and first is None:
        raise QueryError(f"{where}.to: needs a from (the window's first day)")
    if d.within_seconds and (d.within_days or first is not None or last is not None):
        raise QueryError(f"{where}: within_seconds is a window of its own: give one")
    return Did(d.event, within_days=d.within_days or None, first=first, last=last,
               within_seconds=d.within_seconds or None,
               at_least=d.at_least if d.HasField("at_least") else None,
               at_most=d.at_most if d.HasField("at_most") else None)


def _literal(value: pb.Value, where: str) -> Literal:
    if value.WhichOneof("kind") == "timestamp_value" and value.timestamp_value.nanos % 1000:
        return _finer_than_micros(value.timestamp_value, where)
    try:
        out = pbvalues.from_pb(value, where)
    except ValueError as err:
        raise QueryError(str(err)) from None
    if isinstance(out, list):
        raise QueryError(f"{where}: a string list is not a valid literal")
    assert isinstance(out, str | int | float | bool | datetime)
    return out


def _finer_than_micros(ts: Timestamp, where: str) -> str:
    """A Timestamp literal with nanoseconds that are not whole microseconds, as the text
    form writes it (9 fractional digits): stored timestamps are microseconds, and a
    literal between two of them compares with them exactly (plan._exact_times)."""
    try:
        whole = pbvalues.micros_to_datetime(pbvalues.timestamp_micros(ts, where))
    except ValueError as err:
        raise QueryError(str(err)) from None
    return (f"{whole.year:04d}-{whole.month:02d}-{whole.day:02d}T{whole.hour:02d}:"
            f"{whole.minute:02d}:{whole.second:02d}.{ts.nanos:09d}Z")


# Texts parsed lately, and their trees (immutable): a saved segment or a dashboard asks the
# same text again and again, and parsing even `in_segment("s")` costs more than counting
# its members. Bounded in entries and text length, so callers cannot fill memory with it.
PARSED_TEXTS = 256
PARSED_TEXT_BYTES = 4096  # longer texts are parsed each time


@functools.lru_cache(maxsize=PARSED_TEXTS)
def _parsed(text: str, limits: QueryLimits) -> Node:
    return parse(text, limits=limits)  # an error is raised again each time, not kept


def query_from_request(req: pb.QueryRequest, *, now: datetime | None = None,
                       limits: QueryLimits = DEFAULT_LIMITS) -> Node:
    """The tree of a QueryRequest, from whichever of `text` and `query` it carries."""
    kind = req.WhichOneof("q")
    if kind == "text":
        text = req.text
        if now is None and len(text) <= PARSED_TEXT_BYTES:
            return _parsed(text, limits)
        return parse(text, now=now, limits=limits)
    if kind == "query":
        return from_proto(req.query, limits=limits)
    raise QueryError("query: neither text nor query given")
