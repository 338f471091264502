"""Segment queries: one syntax tree, a text form (`parse`) and a protobuf form (`to_proto`)."""

from memstore.query.ast import (
    MAX_ATTRIBUTE_LENGTH,
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
    QuerySyntaxError,
    format_query,
    validate,
)
from memstore.query.limits import DEFAULT_LIMITS, QueryLimits
from memstore.query.parser import parse, parse_timestamp
from memstore.query.proto import from_proto, query_from_request, to_proto

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_ATTRIBUTE_LENGTH",
    "MAX_DEPTH",
    "All",
    "And",
    "Did",
    "InSegment",
    "Literal",
    "Node",
    "Not",
    "Op",
    "Or",
    "Predicate",
    "QueryError",
    "QueryLimits",
    "QuerySyntaxError",
    "format_query",
    "from_proto",
    "parse",
    "parse_timestamp",
    "query_from_request",
    "to_proto",
    "validate",
]
