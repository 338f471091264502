"""The text form of a query: a hand-written tokenizer and recursive-descent parser.

    expr     := and_expr ("OR" and_expr)*             a OR b OR c -> Or((a, b, c))
    and_expr := unary ("AND" unary)*                  a AND b AND c -> And((a, b, c))
    unary    := "NOT" unary | primary
    primary  := "(" expr ")" | "ALL" | "*"
              | "exists" "(" attr ")"
              | "did" "(" string ("," did_arg)+ ")"
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
    did_arg  := "within" "=" duration | ("from" | "to") "=" date-string
              | ("at_least" | "at_most" | "exactly") "=" integer

did(...) reads the event's day record (ast.Did) for a window in days (d, w) or dates
(from/to, YYYY-MM-DD, inclusive, UTC); a window in s, m or h without counts means, as it
always did, `event.<name>.last >= now - duration`, now being when the shard evaluates it
(ast.Did.within_seconds: the tree stays relative).

Keywords are case-insensitive. Timestamps are plain strings; `parse_timestamp` converts one.
Every error is a QuerySyntaxError carrying the 1-based column.

Hostile input: the text's length is checked before anything else, tokens are made as the
parser asks for them, and items and predicates are counted as they are read, so a query
over a limit (`QueryLimits`) is refused after reading at most the limit's worth of it.
Integer literals longer than any int64 are refused by their digit count, before int().
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import Enum

from memstore.errors import brief
from memstore.query.ast import (
    EVENT_NAME,
    KEYWORDS,
    MAX_DEPTH,
    MAX_WINDOW_DAYS,
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
    attribute_problem,
    segment_problem,
    validate,
    value_problem,
)
from memstore.query.limits import DEFAULT_LIMITS, QueryLimits

__all__ = ["parse", "parse_date", "parse_timestamp"]


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
_SECONDS = {"s": 1, "m": 60, "h": 3600}
_STRING_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}
# A run of a string's characters that need no decoding: read at C speed, not one at a time.
_PLAIN = {'"': re.compile(r'[^"\\]+'), "'": re.compile(r"[^'\\]+")}
_PLAIN_ATTR = re.compile(r"[^`]+")
_INT64_DIGITS = 19  # 9223372036854775807: a longer integer literal cannot fit
_INT64_MAX = 2**63 - 1


def _tokenize(text: str) -> Iterator[_Token]:
    """The tokens of `text`, made as they are asked for, ending with an END token."""
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
                run = _PLAIN[c].match(text, i)
                if run is not None:
                    out.append(run.group())
                    i = run.end()
                    continue
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
            yield _Token(_Kind.STRING, text[start:i], "".join(out), start + 1)
        elif c == "`":
            out = []
            i += 1
            while True:
                if i >= n:
                    raise fail("unterminated backquoted attribute starting", start)
                run = _PLAIN_ATTR.match(text, i)
                if run is not None:
                    out.append(run.group())
                    i = run.end()
                    continue
                if text[i] == "`":
                    if text.startswith("``", i):
                        out.append("`")
                        i += 2
                        continue
                    i += 1
                    break
            yield _Token(_Kind.QUOTED_ATTR, text[start:i], "".join(out), start + 1)
        elif c.isascii() and (c.isdigit() or (c == "-" and text[i + 1 : i + 2].isdigit())):
            m = _DURATION.match(text, i)
            if m:
                yield _Token(_Kind.DURATION, m.group(), m.group(), start + 1)
                i = m.end()
                continue
            m = _NUMBER.match(text, i)
            assert m is not None
            i = m.end()
            if i < n and (text[i].isalnum() or text[i] in "_."):
                end = i
                while end < n and (text[end].isalnum() or text[end] in "_.-"):
                    end += 1
                raise fail(f"invalid number {brief(text[start:end])}", start)
            word = m.group()
            if m.group(1) or m.group(2):
                value: object = float(word)
            elif len(word.lstrip("-").lstrip("0")) > _INT64_DIGITS:
                raise fail(f"integer literal of {len(word.lstrip('-'))} digits does not fit "
                           "in 64 bits", start)
            else:
                value = int(word)
            yield _Token(_Kind.NUMBER, word, value, start + 1)
        elif c.isascii() and (c.isalpha() or c == "_"):
            m = _WORD.match(text, i)
            assert m is not None
            i = m.end()
            yield _Token(_Kind.WORD, m.group(), m.group(), start + 1)
        else:
            for p in _PUNCT:
                if text.startswith(p, i):
                    i += len(p)
                    yield _Token(_Kind.PUNCT, p, p, start + 1)
                    break
            else:
                raise fail(f"unexpected character {c!r}", start)
    yield _Token(_Kind.END, "", None, n + 1)


_COMPARISONS = {"=": Op.EQ, "!=": Op.NE, "<": Op.LT, "<=": Op.LE, ">": Op.GT, ">=": Op.GE}


class _Parser:
    def __init__(self, text: str, now: datetime | None, limits: QueryLimits) -> None:
        self.text = text
        self._source = _tokenize(text)
        self._tokens: list[_Token] = []  # made so far; the parser looks one token ahead
        self.pos = 0
        self.now = now
        self.depth = 0
        self.limits = limits
        self.items = 0  # literal values read so far
        self.predicates = 0  # leaves read so far

    # -- token helpers

    def peek(self, ahead: int = 0) -> _Token:
        """The token `ahead` places after the current one (END past the end)."""
        tokens = self._tokens
        while len(tokens) <= self.pos + ahead:
            if tokens and tokens[-1].kind is _Kind.END:
                return tokens[-1]
            tokens.append(next(self._source))
        return tokens[self.pos + ahead]

    @property
    def tok(self) -> _Token:
        return self.peek()

    def advance(self) -> _Token:
        tok = self.peek()
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
        self.predicates += 1
        problem = self.limits.predicates_problem(self.predicates)
        if problem is not None:
            raise self.fail_at(problem, tok)
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
        tok, after = self.tok, self.peek(1)
        return tok.kind is _Kind.WORD and tok.text.lower() == "did" and after.text == "("

    def is_call(self, name: str) -> bool:
        tok, after = self.tok, self.peek(1)
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
        if self.is_keyword("NOT") and self.is_keyword("IN", self.peek(1)):
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
            raise self.error("IN after NOT", self.peek(1))
        raise self.error(f"an operator after '{attr}'")

    def literal_list(self) -> tuple[Literal, ...]:
        self.expect_punct("(", " after IN")
        first = self.items
        values = [self.literal("'('", first)]
        while self.is_punct(","):
            self.advance()
            values.append(self.literal("','", first))
        if not self.is_punct(")"):
            raise self.error("',' or ')'")
        self.advance()
        return tuple(values)

    def literal(self, after: str, in_list: int | None = None) -> Literal:
        """The next literal, counted as an item (`in_list`: the item count before the IN
        list it belongs to, if it does)."""
        tok = self.tok
        self.items += 1
        problem = self.limits.items_problem(
            self.items, 0 if in_list is None else self.items - in_list, exact=False)
        if problem is not None:
            raise self.fail_at(problem, tok)
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
        if not EVENT_NAME.fullmatch(event):
            raise self.fail_at(f"event name {event!r} must be 1-128 letters, digits, _ or -",
                               tok)
        self.advance()
        # name -> (the argument's name token, its value token, its value)
        args: dict[str, tuple[_Token, _Token, object]] = {}
        while self.is_punct(","):
            self.advance()
            name_tok = self.tok
            name = name_tok.text.lower() if name_tok.kind is _Kind.WORD else ""
            if name not in _DID_ARGS:
                raise self.error("within, from, to, at_least, at_most or exactly")
            if name in args:
                raise self.fail_at(f"{name} given twice", name_tok)
            self.advance()
            self.expect_punct("=", f" after '{name}'")
            args[name] = (name_tok, self.tok, self.did_value(name))
            self.advance()
        if not args:
            raise self.error("','")
        close = self.expect_punct(")")
        return self.did_node(event, args, close)

    def did_value(self, name: str) -> object:
        """The value of did(...)'s argument `name` at the current token (not consumed)."""
        tok = self.tok
        if name == "within":
            if tok.kind is not _Kind.DURATION:
                raise self.error("a duration such as 7d (units s, m, h, d, w)")
            if len(tok.text[:-1].lstrip("0")) > _INT64_DIGITS:
                raise self.fail_at(f"duration {brief(tok.text)} is too long", tok)
            return tok.text
        if name in ("from", "to"):
            if tok.kind is not _Kind.STRING:
                raise self.error(f'a date such as "2026-09-01" after {name}=')
            try:
                return parse_date(str(tok.value))
            except QueryError as exc:
                raise self.fail_at(f"{name}: {exc}", tok) from None
        if tok.kind is not _Kind.NUMBER or not isinstance(tok.value, int):
            raise self.error(f"a whole number after {name}=")
        if tok.value < 1:
            raise self.fail_at(f"{name} must be at least 1 (for none at all, use "
                               "NOT did(...))", tok)
        if tok.value > _INT64_MAX:
            raise self.fail_at(f"{name} {brief(str(tok.value))} is above {_INT64_MAX}", tok)
        return tok.value

    def did_node(self, event: str, args: dict[str, tuple[_Token, _Token, object]],
                 close: _Token) -> Node:
        """did(...) from its checked arguments; a conflict between two is named at the
        second's name, a bad value at the value."""
        if "exactly" in args:
            for name in ("at_least", "at_most"):
                if name in args:
                    raise self.fail_at(f"{name} goes with exactly; give one or the other",
                                       args[name][0])
            at_least = at_most = args["exactly"][2]
        else:
            at_least = args["at_least"][2] if "at_least" in args else None
            at_most = args["at_most"][2] if "at_most" in args else None
        if isinstance(at_least, int) and isinstance(at_most, int) and at_least > at_most:
            raise self.fail_at(f"at_least {at_least} is above at_most {at_most}",
                               args["at_most"][1])
        counted = at_least is not None or at_most is not None
        if "within" in args:
            for name in ("from", "to"):
                if name in args:
                    raise self.fail_at(f"{name} and within are two kinds of window: "
                                       "give one", args[name][0])
            _, tok, text = args["within"]
            amount, unit = int(str(text)[:-1]), str(text)[-1]
            if unit in "smh":
                if counted:
                    raise self.fail_at(f"a count needs a window of whole days (d or w), "
                                       f"got '{text}'", tok)
                return self.last_within(event, tok, amount, unit)
            days = amount * (7 if unit == "w" else 1)
            if days > MAX_WINDOW_DAYS:
                raise self.fail_at(f"duration '{text}' is too long", tok)
            if days < 1:
                raise self.fail_at(f"within={text} is an empty window: give 1d or more", tok)
            return Did(event, within_days=days, at_least=at_least,  # type: ignore[arg-type]
                       at_most=at_most)  # type: ignore[arg-type]
        if "from" not in args:
            if "to" in args:
                raise self.fail_at("to needs a from (the window's first day)", args["to"][0])
            raise self.fail_at('did(...) needs a window: within=30d, or from="YYYY-MM-DD"',
                               close)
        first = args["from"][2]
        last = args["to"][2] if "to" in args else None
        if isinstance(last, date) and isinstance(first, date) and last < first:
            raise self.fail_at(f"the window ends ({last}) before it starts ({first})",
                               args["to"][1])
        return Did(event, first=first, last=last,  # type: ignore[arg-type]
                   at_least=at_least, at_most=at_most)  # type: ignore[arg-type]

    def last_within(self, event: str, tok: _Token, amount: int, unit: str) -> Node:
        """did(event, within=N s/m/h): done in the last N seconds, minutes or hours before
        the evaluating shard's now (event.<event>.last), kept relative: a saved segment
        re-evaluated later measures from then."""
        seconds = amount * _SECONDS[unit]
        if seconds > MAX_WINDOW_DAYS * 86_400:
            raise self.fail_at(f"duration {brief(tok.text)} is too long", tok)
        if seconds < 1:
            raise self.fail_at("a window of at least 1 second", tok)
        return Did(event, within_seconds=seconds)


_DID_ARGS = ("within", "from", "to", "at_least", "at_most", "exactly")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_date(text: str) -> date:
    """A UTC calendar date written YYYY-MM-DD."""
    if not _DATE.fullmatch(text):
        raise QueryError(f"not a date (YYYY-MM-DD): {text!r}")
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise QueryError(f"not a valid date: {text!r}") from None


def parse(text: str, *, now: datetime | None = None, limits: QueryLimits = DEFAULT_LIMITS
          ) -> Node:
    """The syntax tree of a text query; `now` anchors did(..., within=...) (default: now).
    QuerySyntaxError for a text over `limits`, before reading more of it than they allow."""
    problem = limits.text_problem(text)
    if problem is not None:
        raise QuerySyntaxError(problem, column=1, text=text[:80])
    node = _Parser(text, now, limits).parse()
    validate(node)
    return node


_TIMESTAMP = re.compile(
    r"\d{4}-\d{2}-\d{2}"
    r"([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|z|[+-]\d{2}(:?\d{2})?)?)?"
)


def timestamp_beyond_micros(s: str) -> tuple[datetime, int]:
    """parse_timestamp of `s` cut to whole microseconds (the precision timestamps are
    stored at), and the nanoseconds its 7th to 9th fractional digits add (0..999)."""
    match = _TIMESTAMP.fullmatch(s)
    fraction = match.group(3) if match is not None else None
    if fraction is None or len(fraction) <= 7:  # (the group holds the dot)
        return parse_timestamp(s), 0
    start, end = match.span(3)  # type: ignore[union-attr]
    return parse_timestamp(s[:start + 7] + s[end:]), int(fraction[7:].ljust(3, "0"))


def parse_timestamp(s: str) -> datetime:
    """An ISO-8601 date or date-time as an aware UTC datetime; no offset means UTC.

    Accepts 2024-05-01, 2024-05-01T12:00, 2024-05-01T12:00:00Z, 2024-05-01 12:00:00.5+02:00;
    digits past the sixth of a fraction are cut (timestamp_beyond_micros has them).
    """
    if not _TIMESTAMP.fullmatch(s):
        raise QueryError(f"not an ISO-8601 timestamp: {brief(s)}")
    try:
        value = datetime.fromisoformat(s.replace("z", "Z"))
    except ValueError:
        raise QueryError(f"not a valid timestamp: {brief(s)}") from None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # its offset takes it past year 1 or 9999 in UTC
        raise QueryError(f"timestamp {brief(s)} is outside years 1 to 9999 in UTC") from None
