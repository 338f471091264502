"""The query syntax tree shared by the text form, the protobuf form and the evaluator.

Invariants of a valid tree (checked by `validate`, which both surfaces call):
  * EQ, NE, LT, LE, GT, GE and HAS carry exactly 1 value, IN at least 1, BETWEEN exactly 2
    (inclusive bounds), EXISTS none;
  * Did names an event (1-128 letters, digits, _ or -) and one window: `within_days` >= 1,
    or `first` (a date) with an optional `last` not before it; `at_least` and `at_most`,
    when given, are >= 1 and at_least <= at_most (exactly=N is both at N);
  * And and Or have at least one child; nesting is at most `MAX_DEPTH` levels;
  * attribute names are non-empty and at most `MAX_ATTRIBUTE_LENGTH` characters;
  * values are str, int (64-bit), finite float, bool, or timezone-aware datetime.
Timestamps written in the text form stay `str`; the evaluator converts them with
`parser.parse_timestamp` when the attribute is a timestamp.

`format_query` renders a tree as text that `parser.parse` reads back to an equal tree, with
three exceptions that keep the meaning: datetime values render as ISO-8601 strings, an And
or Or with a single child renders as that child, and nothing else is normalised.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum

Literal = str | int | float | bool | datetime

MAX_ATTRIBUTE_LENGTH = 256
MAX_DEPTH = 100
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class QueryError(ValueError):
    """An invalid query; the message says what is wrong and where (a path or a column)."""


def refused_query(exc: Exception) -> str:
    """The details of INVALID_ARGUMENT for a query refused with `exc`: its message, after
    "query: " unless it names its place from "query" on already."""
    text = str(exc)
    return text if text.startswith("query") else f"query: {text}"


class QuerySyntaxError(QueryError):
    """A text query that does not parse; `column` is 1-based within `text`."""

    def __init__(self, message: str, *, column: int, text: str) -> None:
        super().__init__(message)
        self.message = message
        self.column = column
        self.text = text

    def pretty(self) -> str:
        """The message, the query text and a caret under the offending column."""
        line = self.text.replace("\n", " ").replace("\t", " ")
        return f"{self.message}\n  {line}\n  {' ' * (self.column - 1)}^"


class Op(StrEnum):
    EQ = "="
    NE = "!="
    IN = "IN"
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    BETWEEN = "BETWEEN"
    EXISTS = "EXISTS"
    HAS = "HAS"


@dataclass(frozen=True, slots=True)
class Predicate:
    attribute: str
    op: Op
    values: tuple[Literal, ...] = ()


@dataclass(frozen=True, slots=True)
class And:
    children: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    children: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Not:
    child: Node


@dataclass(frozen=True, slots=True)
class All:
    """Every live profile."""


@dataclass(frozen=True, slots=True)
class Did:
    """Profiles that did `event` on the UTC days of a window (from its day record), at
    least `at_least` and at most `at_most` times in all (None: no bound; did at all).

    The window: the `within_days` days up to today, today included (today is the
    evaluating shard's UTC day), or the dates `first` to `last` inclusive (`last` None:
    until today), or the last `within_seconds` seconds up to the evaluating shard's now
    (from `event.<event>.last`: did it at all, no count)."""

    event: str
    within_days: int | None = None
    first: date | None = None
    last: date | None = None
    at_least: int | None = None
    at_most: int | None = None
    within_seconds: int | None = None


EVENT_NAME = re.compile(r"[A-Za-z0-9_\-]{1,128}")
MAX_WINDOW_DAYS = 100_000  # a window longer than any retention (about 270 years)


@dataclass(frozen=True, slots=True)
class InSegment:
    """The members of a saved segment (memstore.engine.segments), by its name."""

    name: str


Node = Predicate | And | Or | Not | All | Did | InSegment

# Words the text form reserves; an attribute spelled like one is written backquoted.
KEYWORDS = frozenset({"AND", "OR", "NOT", "IN", "BETWEEN", "HAS", "EXISTS", "TRUE", "FALSE", "ALL"})
CALLS = frozenset({"did", "in_segment"})  # function-call forms: such attributes go backquoted
BARE_ATTRIBUTE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")

_SINGLE = frozenset({Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE, Op.HAS})


SEGMENT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}")


def segment_problem(name: object) -> str | None:
    """What is wrong with a segment name, or None (1-64 letters, digits, _ or -, starting
    with a letter)."""
    if not isinstance(name, str) or not SEGMENT_NAME.fullmatch(name):
        shown = name[:80] if isinstance(name, str) else name
        return (f"segment name {shown!r} must be 1-64 letters, digits, _ or -, starting with "
                "a letter")
    return None


def attribute_problem(name: str) -> str | None:
    """What is wrong with an attribute name, or None when it is acceptable."""
    if not name:
        return "attribute name is empty"
    if len(name) > MAX_ATTRIBUTE_LENGTH:
        return f"attribute name is {len(name)} characters, at most {MAX_ATTRIBUTE_LENGTH}"
    return None


def arity_problem(op: Op, count: int) -> str | None:
    """What is wrong with giving `count` values to `op`, or None."""
    if op in _SINGLE and count != 1:
        return f"{op.name} needs 1 value, got {count}"
    if op is Op.IN and count < 1:
        return "IN needs at least 1 value, got 0"
    if op is Op.BETWEEN and count != 2:
        return f"BETWEEN needs 2 values, got {count}"
    if op is Op.EXISTS and count != 0:
        return f"EXISTS takes no values, got {count}"
    return None


def value_problem(value: object) -> str | None:
    """What makes `value` unusable as a literal, or None."""
    if isinstance(value, bool | str):
        return None
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            return f"integer {value} does not fit in 64 bits"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value} is not a valid literal"
    if isinstance(value, datetime):
        return None if value.tzinfo is not None else "datetime literal has no timezone"
    return f"a {type(value).__name__} is not a valid literal"


def did_problem(node: Did) -> str | None:
    """What is wrong with a Did node, or None."""
    if not isinstance(node.event, str) or not EVENT_NAME.fullmatch(node.event):
        return f"event name {node.event!r} must be 1-128 letters, digits, _ or -"
    windows = [w for w in (node.within_days, node.first, node.within_seconds) if w is not None]
    if len(windows) != 1:
        return "give one window: within_days, within_seconds, or from (with an optional to)"
    if node.within_seconds is not None:
        if (isinstance(node.within_seconds, bool) or not isinstance(node.within_seconds, int)
                or not 1 <= node.within_seconds <= MAX_WINDOW_DAYS * 86_400):
            return (f"within_seconds must be 1 to {MAX_WINDOW_DAYS * 86_400}, got "
                    f"{node.within_seconds!r}")
        if node.last is not None or node.at_least is not None or node.at_most is not None:
            return "a window in seconds takes no to, at_least or at_most (days do)"
        return None
    if node.within_days is not None:
        if (isinstance(node.within_days, bool) or not isinstance(node.within_days, int)
                or not 1 <= node.within_days <= MAX_WINDOW_DAYS):
            return f"within_days must be 1 to {MAX_WINDOW_DAYS}, got {node.within_days!r}"
        if node.last is not None:
            return "to goes with from, not with within"
    else:
        for name, day in (("from", node.first), ("to", node.last)):
            if day is not None and (not isinstance(day, date) or isinstance(day, datetime)):
                return f"{name} must be a date, got {day!r}"
        if node.last is not None and node.first is not None and node.last < node.first:
            return f"the window ends ({node.last}) before it starts ({node.first})"
    for name, bound in (("at_least", node.at_least), ("at_most", node.at_most)):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)
                                  or not 1 <= bound <= _INT64_MAX):
            return (f"{name} must be a whole number from 1 (for none at all, use "
                    f"NOT did(...)), got {bound!r}")
    if node.at_least is not None and node.at_most is not None and node.at_least > node.at_most:
        return f"at_least {node.at_least} is above at_most {node.at_most}"
    return None


def validate(node: object, path: str = "query") -> None:
    """Raise QueryError naming the path (proto field names) of the first invalid node."""
    _validate(node, path, 1)


def _validate(node: object, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise QueryError(f"{path}: query nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, Predicate):
        where = f"{path}.predicate"
        if not isinstance(node.attribute, str):
            raise QueryError(f"{where}: attribute is not a string")
        problem = attribute_problem(node.attribute)
        if problem is None and not isinstance(node.op, Op):
            problem = f"unknown op {node.op!r}"
        if problem is None and not isinstance(node.values, tuple):
            problem = "values is not a tuple"
        if problem is None:
            problem = arity_problem(node.op, len(node.values))
        if problem is not None:
            raise QueryError(f"{where}: {problem}")
        for i, value in enumerate(node.values):
            problem = value_problem(value)
            if problem is not None:
                raise QueryError(f"{where}.values[{i}]: {problem}")
    elif isinstance(node, And | Or):
        where = f"{path}.{'and' if isinstance(node, And) else 'or'}"
        if not isinstance(node.children, tuple) or not node.children:
            raise QueryError(f"{where}: needs at least 1 child")
        for i, child in enumerate(node.children):
            _validate(child, f"{where}.children[{i}]", depth + 1)
    elif isinstance(node, Not):
        _validate(node.child, f"{path}.not", depth + 1)
    elif isinstance(node, Did):
        problem = did_problem(node)
        if problem is not None:
            raise QueryError(f"{path}.did: {problem}")
    elif isinstance(node, InSegment):
        problem = segment_problem(node.name)
        if problem is not None:
            raise QueryError(f"{path}.in_segment: {problem}")
    elif not isinstance(node, All):
        raise QueryError(f"{path}: not a query node: {type(node).__name__}")


# ----------------------------------------------------------------------------- format

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t"}


def format_attribute(name: str) -> str:
    if BARE_ATTRIBUTE.fullmatch(name) and name.upper() not in KEYWORDS \
            and name.lower() not in CALLS:
        return name
    return "`" + name.replace("`", "``") + "`"


def format_literal(value: Literal) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, datetime):
        value = value.isoformat()
    return '"' + "".join(_ESCAPES.get(c, c) for c in value) + '"'


def format_query(node: Node) -> str:
    """Text that `parser.parse` reads back to `node` (see the module docstring)."""
    if isinstance(node, Predicate):
        attr = format_attribute(node.attribute)
        vals = [format_literal(v) for v in node.values]
        if node.op is Op.EXISTS:
            return f"exists({attr})"
        if node.op is Op.IN:
            return f"{attr} IN ({', '.join(vals)})"
        if node.op is Op.BETWEEN:
            return f"{attr} BETWEEN {vals[0]} AND {vals[1]}"
        return f"{attr} {node.op.value} {vals[0]}"
    if isinstance(node, And | Or):
        if len(node.children) == 1:
            return format_query(node.children[0])
        # A child of the same kind, or an Or inside an And, needs parentheses: without them
        # the parser would flatten it or bind it differently.
        wrap = (And, Or) if isinstance(node, And) else (Or,)
        sep = " AND " if isinstance(node, And) else " OR "
        return sep.join(_maybe_paren(c, wrap) for c in node.children)
    if isinstance(node, Not):
        return "NOT " + _maybe_paren(node.child, (And, Or))
    if isinstance(node, All):
        return "ALL"
    if isinstance(node, Did):
        return format_did(node)
    if isinstance(node, InSegment):
        return f"in_segment({format_literal(node.name)})"
    raise QueryError(f"not a query node: {type(node).__name__}")


def format_did(node: Did) -> str:
    args = [format_literal(node.event)]
    if node.within_seconds is not None:
        return f"did({args[0]}, within={node.within_seconds}s)"
    if node.within_days is not None:
        args.append(f"within={node.within_days}d")
    else:
        args.append(f'from="{node.first}"')
        if node.last is not None:
            args.append(f'to="{node.last}"')
    if node.at_least is not None and node.at_least == node.at_most:
        args.append(f"exactly={node.at_least}")
    else:
        if node.at_least is not None:
            args.append(f"at_least={node.at_least}")
        if node.at_most is not None:
            args.append(f"at_most={node.at_most}")
    return f"did({', '.join(args)})"


def _maybe_paren(node: Node, wrap: tuple[type, ...]) -> str:
    text = format_query(node)
    if isinstance(node, wrap) and len(node.children) > 1:  # type: ignore[union-attr]
        return f"({text})"
    if isinstance(node, And | Or) and len(node.children) == 1:
        return _maybe_paren(node.children[0], wrap)
    return text
