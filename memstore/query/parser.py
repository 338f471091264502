"""The text form of a query: a hand-written tokenizer and recursive-descent parser.

    expr     := and_expr ("OR" and_expr)*             a OR b OR c -> Or((a, b, c))
    and_expr := unary ("AND" unary)*                  a AND b AND c -> And((a, b, c))
    unary    := "NOT" unary | primary
    primary  := "(" expr ")" | "ALL" | "*"
              | "exists" "(" attr ")"
              | "did" "(" string "," "within" "=" duration ")"
              | "in_segment" "(" string ")"
              | attr "NOT" "IN" "(" literal ("," literal)* ")"      -> Not(IN)
              | attr ("=" | "!=" | "<" | "<=" | ">" | ">=" | "HAS") literal
              | attr "IN" "(" literal ("," literal)* ")"
              | attr "BETWEEN" literal "AND" literal
    attr     := [A-Za-z_][A-Za-z0-9_.-]* (not a keyword) | `any text` (`` for a backquote)
    literal  := string | number | TRUE | FALSE
    string   := "..." | '...'    escapes \\ \" \' \n \t
    number   := -?digits (int) | -?digits(.digits)?([eE][+-]?digits)? (float)
    duration := digits ("s" | "m" | "h" | "d" | "w")

Keywords are case-insensitive. Timestamps are plain strings; `parse_timestamp` converts one.
Every error is a QuerySyntaxError carrying the 1-based column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum

from memstore.query.ast import (
    KEYWORDS,
    MAX_DEPTH,
    All,
    And,
    InSegment,
    Literal,
    Node,
    Not,
    Op,
    Or,
    Predicate,
    QueryError,
    QuerySyntaxError,
    attribute_problem,
    segment_problem,
    validate,
    value_problem,
)

__all__ = ["parse", "parse_timestamp"]


class _Kind(Enum):
    WORD = "word"  # identifiers and keywords
    QUOTED_ATTR = "backquoted attribute"
    STRING = "string"
    NUMBER = "number"
    DURATION = "duration"
    PUNCT = "punctuation"
    END = "end of input"


@dataclass(frozen=True, slots=True)
class _Token:
    kind: _Kind
    text: str  # the source text
    value: object  # decoded string or number; otherwise the source text
    column: int  # 1-based


_PUNCT = ("!=", "<=", ">=", "(", ")", ",", "=", "<", ">", "*")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_DURATION = re.compile(r"([0-9]+)([smhdw])(?![A-Za-z0-9_.\-])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_STRING_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)

    def fail(message: str, at: int) -> QuerySyntaxError:
        return QuerySyntaxError(f"{message} at column {at + 1}", column=at + 1, text=text)

    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        start = i
        if c in "\"'":
            out = []
            i += 1
            while True:
                if i >= n:
                    raise fail("unterminated string starting", start)
                ch = text[i]
                if ch == c:
                    i += 1
                    break
                if ch == "\\":
                    if i + 1 >= n:
                        raise fail("unterminated string starting", start)
                    esc = text[i + 1]
                    if esc not in _STRING_ESCAPES:
                        raise fail(f"unknown escape '\\{esc}' in string", i)
                    out.append(_STRING_ESCAPES[esc])
                    i += 2
                    continue
                out.append(ch)
                i += 1
            tokens.append(_Token(_Kind.STRING, text[start:i], "".join(out), start + 1))
        elif c == "`":
            out = []
            i += 1
            while True:
                if i >= n:
                    raise fail("unterminated backquoted attribute starting", start)
                if text[i] == "`":
                    if text.startswith("``", i):
                        out.append("`")
                        i += 2
                        continue
                    i += 1
                    break
                out.append(text[i])
                i += 1
            tokens.append(_Token(_Kind.QUOTED_ATTR, text[start:i], "".join(out), start + 1))
        elif c.isascii() and (c.isdigit() or (c == "-" and text[i + 1 : i + 2].isdigit())):
            m = _DURATION.match(text, i)
            if m:
                tokens.append(_Token(_Kind.DURATION, m.group(), m.group(), start + 1))
                i = m.end()
                continue
            m = _NUMBER.match(text, i)
            assert m is not None
            i = m.end()
            if i < n and (text[i].isalnum() or text[i] in "_."):
                end = i
                while end < n and (text[end].isalnum() or text[end] in "_.-"):
                    end += 1
                raise fail(f"invalid number '{text[start:end]}'", start)
            word = m.group()
            value: object = float(word) if m.group(1) or m.group(2) else int(word)
            tokens.append(_Token(_Kind.NUMBER, word, value, start + 1))
        elif c.isascii() and (c.isalpha() or c == "_"):
            m = _WORD.match(text, i)
            assert m is not None
            i = m.end()
            tokens.append(_Token(_Kind.WORD, m.group(), m.group(), start + 1))
        else:
            for p in _PUNCT:
                if text.startswith(p, i):
                    i += len(p)
                    tokens.append(_Token(_Kind.PUNCT, p, p, start + 1))
                    break
            else:
                raise fail(f"unexpected character {c!r}", start)
    tokens.append(_Token(_Kind.END, "", None, n + 1))
    return tokens


_COMPARISONS = {"=": Op.EQ, "!=": Op.NE, "<": Op.LT, "<=": Op.LE, ">": Op.GT, ">=": Op.GE}


class _Parser:
    def __init__(self, text: str, now: datetime | None) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.pos = 0
        self.now = now
        self.depth = 0

    # -- token helpers

    @property
    def tok(self) -> _Token:
        return self.tokens[self.pos]

    def advance(self) -> _Token:
        tok = self.tokens[self.pos]
        if tok.kind is not _Kind.END:
            self.pos += 1
        return tok

    def is_keyword(self, word: str, tok: _Token | None = None) -> bool:
        tok = tok or self.tok
        return tok.kind is _Kind.WORD and tok.text.upper() == word

    def is_punct(self, p: str) -> bool:
        return self.tok.kind is _Kind.PUNCT and self.tok.text == p

    def error(self, expected: str, tok: _Token | None = None) -> QuerySyntaxError:
        tok = tok or self.tok
        if tok.kind is _Kind.END:
            found = "end of input"
        else:
            shown = tok.text if len(tok.text) <= 30 else tok.text[:27] + "..."
            found = f"'{shown}'"
        return QuerySyntaxError(
            f"expected {expected} at column {tok.column}, found {found}",
            column=tok.column,
            text=self.text,
        )

    def fail_at(self, message: str, tok: _Token) -> QuerySyntaxError:
        return QuerySyntaxError(
            f"{message} at column {tok.column}", column=tok.column, text=self.text
        )

    def expect_punct(self, p: str, context: str = "") -> _Token:
        if not self.is_punct(p):
            raise self.error(f"'{p}'{context}")
        return self.advance()

    # -- grammar

    def parse(self) -> Node:
        if self.tok.kind is _Kind.END:
            raise QuerySyntaxError("empty query", column=1, text=self.text)
        node = self.or_expr()
        if self.tok.kind is not _Kind.END:
            if self.is_punct(")"):
                raise self.fail_at("unbalanced ')'", self.tok)
            raise self.error("AND, OR or end of input")
        return node

    def or_expr(self) -> Node:
        children = [self.and_expr()]
        while self.is_keyword("OR"):
            self.advance()
            children.append(self.and_expr())
        return children[0] if len(children) == 1 else Or(tuple(children))

    def and_expr(self) -> Node:
        children = [self.unary()]
        while self.is_keyword("AND"):
            self.advance()
            children.append(self.unary())
        return children[0] if len(children) == 1 else And(tuple(children))

    def unary(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail_at(f"query nested deeper than {MAX_DEPTH} levels", self.tok)
        try:
            if self.is_keyword("NOT"):
                self.advance()
                return Not(self.unary())
            return self.primary()
        finally:
            self.depth -= 1

    def primary(self) -> Node:
        tok = self.tok
        if self.is_punct("("):
            self.advance()
            node = self.or_expr()
            self.expect_punct(")")
            return node
        if self.is_punct("*") or self.is_keyword("ALL"):
            self.advance()
            return All()
        if self.is_keyword("EXISTS"):
            self.advance()
            self.expect_punct("(", " after EXISTS")
            attr = self.attribute()
            self.expect_punct(")")
            return Predicate(attr, Op.EXISTS)
        if self.is_did_call():
            return self.did()
        if self.is_call("in_segment"):
            return self.in_segment()
        if tok.kind is _Kind.END:
            raise self.error("a predicate")
        attr = self.attribute()
        return self.predicate_rest(attr)

    def is_did_call(self) -> bool:
        tok, after = self.tok, self.tokens[min(self.pos + 1, len(self.tokens) - 1)]
        return tok.kind is _Kind.WORD and tok.text.lower() == "did" and after.text == "("

    def is_call(self, name: str) -> bool:
        tok, after = self.tok, self.tokens[min(self.pos + 1, len(self.tokens) - 1)]
        return tok.kind is _Kind.WORD and tok.text.lower() == name and after.text == "("

    def in_segment(self) -> Node:
        self.advance()  # in_segment
        self.expect_punct("(")
        tok = self.tok
        if tok.kind is not _Kind.STRING:
            raise self.error("a segment name string in in_segment(...)")
        problem = segment_problem(tok.value)
        if problem is not None:
            raise self.fail_at(problem, tok)
        self.advance()
        self.expect_punct(")")
        return InSegment(str(tok.value))

    def attribute(self) -> str:
        tok = self.tok
        if tok.kind is _Kind.WORD and tok.text.upper() not in KEYWORDS:
            name = tok.text
        elif tok.kind is _Kind.QUOTED_ATTR:
            name = str(tok.value)
        else:
            raise self.error("an attribute name")
        problem = attribute_problem(name)
        if problem is not None:
            raise self.fail_at(problem, tok)
        self.advance()
        return name

    def predicate_rest(self, attr: str) -> Node:
        tok = self.tok
        if tok.kind is _Kind.PUNCT and tok.text in _COMPARISONS:
            self.advance()
            return Predicate(attr, _COMPARISONS[tok.text], (self.literal(f"'{tok.text}'"),))
        if self.is_keyword("HAS"):
            self.advance()
            return Predicate(attr, Op.HAS, (self.literal("HAS"),))
        if self.is_keyword("IN"):
            self.advance()
            return Predicate(attr, Op.IN, self.literal_list())
        if self.is_keyword("NOT") and self.is_keyword("IN", self.tokens[self.pos + 1]):
            self.advance()
            self.advance()
            return Not(Predicate(attr, Op.IN, self.literal_list()))
        if self.is_keyword("BETWEEN"):
            self.advance()
            low = self.literal("BETWEEN")
            if not self.is_keyword("AND"):
                raise self.error("AND in BETWEEN")
            self.advance()
            return Predicate(attr, Op.BETWEEN, (low, self.literal("BETWEEN ... AND")))
        if self.is_keyword("NOT"):
            raise self.error("IN after NOT", self.tokens[self.pos + 1])
        raise self.error(f"an operator after '{attr}'")

    def literal_list(self) -> tuple[Literal, ...]:
        self.expect_punct("(", " after IN")
        values = [self.literal("'('")]
        while self.is_punct(","):
            self.advance()
            values.append(self.literal("','"))
        if not self.is_punct(")"):
            raise self.error("',' or ')'")
        self.advance()
        return tuple(values)

    def literal(self, after: str) -> Literal:
        tok = self.tok
        if tok.kind in (_Kind.STRING, _Kind.NUMBER):
            value = tok.value
            assert isinstance(value, str | int | float)
            problem = value_problem(value)
            if problem is not None:
                raise self.fail_at(problem, tok)
            self.advance()
            return value
        if self.is_keyword("TRUE") or self.is_keyword("FALSE"):
            self.advance()
            return tok.text.upper() == "TRUE"
        raise self.error(f"a literal after {after}")

    def did(self) -> Node:
        self.advance()  # did
        self.expect_punct("(")
        tok = self.tok
        if tok.kind is not _Kind.STRING:
            raise self.error("an event name string in did(...)")
        event = str(tok.value)
        if not event:
            raise self.fail_at("event name is empty", tok)
        self.advance()
        self.expect_punct(",")
        if not (self.tok.kind is _Kind.WORD and self.tok.text.lower() == "within"):
            raise self.error("'within'")
        self.advance()
        self.expect_punct("=", " after 'within'")
        tok = self.tok
        if tok.kind is not _Kind.DURATION:
            raise self.error("a duration such as 7d (units s, m, h, d, w)")
        self.advance()
        self.expect_punct(")")
        amount, unit = tok.text[:-1], tok.text[-1]
        now = self.now if self.now is not None else datetime.now(UTC)
        now = now.replace(tzinfo=UTC) if now.tzinfo is None else now
        try:
            since = now.astimezone(UTC) - timedelta(**{_UNITS[unit]: int(amount)})
        except OverflowError:
            raise self.fail_at(f"duration '{tok.text}' is too long", tok) from None
        attr = f"event.{event}.last"
        problem = attribute_problem(attr)
        if problem is not None:
            raise self.fail_at(problem, tok)
        return Predicate(attr, Op.GE, (since,))


def parse(text: str, *, now: datetime | None = None) -> Node:
    """The syntax tree of a text query; `now` anchors did(..., within=...) (default: now)."""
    node = _Parser(text, now).parse()
    validate(node)
    return node


_TIMESTAMP = re.compile(
    r"\d{4}-\d{2}-\d{2}"
    r"([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|z|[+-]\d{2}(:?\d{2})?)?)?"
)


def parse_timestamp(s: str) -> datetime:
    """An ISO-8601 date or date-time as an aware UTC datetime; no offset means UTC.

    Accepts 2024-05-01, 2024-05-01T12:00, 2024-05-01T12:00:00Z, 2024-05-01 12:00:00.5+02:00.
    """
    if not _TIMESTAMP.fullmatch(s):
        raise QueryError(f"not an ISO-8601 timestamp: {s!r}")
    try:
        value = datetime.fromisoformat(s.replace("z", "Z"))
    except ValueError:
        raise QueryError(f"not a valid timestamp: {s!r}") from None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
