"""The query text form, the protobuf form and the checks both share."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memstore.query import (
    MAX_DEPTH,
    All,
    And,
    Did,
    Node,
    Not,
    Op,
    Or,
    Predicate,
    QueryError,
    QueryLimits,
    QuerySyntaxError,
    format_query,
    from_proto,
    parse,
    parse_timestamp,
    query_from_request,
    to_proto,
    validate,
)
from memstore.v1 import memstore_pb2 as pb

NOW = datetime(2024, 5, 8, 12, 0, tzinfo=UTC)


def P(attribute: str, op: Op, *values: object) -> Predicate:
    return Predicate(attribute, op, tuple(values))  # type: ignore[arg-type]


def typed(node: Node) -> object:
    """`node` with every value paired with its type: 1, 1.0 and True compare equal in Python."""
    if isinstance(node, Predicate):
        return ("P", node.attribute, node.op, tuple((type(v), v) for v in node.values))
    if isinstance(node, And | Or):
        return (type(node).__name__, tuple(typed(c) for c in node.children))
    if isinstance(node, Not):
        return ("Not", typed(node.child))
    if isinstance(node, Did):
        return ("Did", node)
    return ("All",)


A, B, C = P("a", Op.EQ, 1), P("b", Op.EQ, 2), P("c", Op.EQ, 3)

# ------------------------------------------------------------------ table: what parses to what

PARSES = [
    # comparisons
    ('country = "US"', P("country", Op.EQ, "US")),
    ("age != 3", P("age", Op.NE, 3)),
    ("age < 3", P("age", Op.LT, 3)),
    ("age <= 3", P("age", Op.LE, 3)),
    ("age > 3", P("age", Op.GT, 3)),
    ("age >= 3", P("age", Op.GE, 3)),
    ("age>=3", P("age", Op.GE, 3)),
    ("age>-3", P("age", Op.GT, -3)),
    ('country IN ("US", "CA")', P("country", Op.IN, "US", "CA")),
    ("x IN (1)", P("x", Op.IN, 1)),
    ('country NOT IN ("US")', Not(P("country", Op.IN, "US"))),
    ("age BETWEEN 25 AND 34", P("age", Op.BETWEEN, 25, 34)),
    ('interests HAS "dogs"', P("interests", Op.HAS, "dogs")),
    ("exists(email)", P("email", Op.EXISTS)),
    ("EXISTS ( email )", P("email", Op.EXISTS)),
    ("ALL", All()),
    ("*", All()),
    ("all", All()),
    # literals
    ("vip = TRUE", P("vip", Op.EQ, True)),
    ("vip = false", P("vip", Op.EQ, False)),
    ("n = 0", P("n", Op.EQ, 0)),
    ("n = -42", P("n", Op.EQ, -42)),
    ("n = 007", P("n", Op.EQ, 7)),
    ("n = 1.5", P("n", Op.EQ, 1.5)),
    ("n = -0.25", P("n", Op.EQ, -0.25)),
    ("n = 1e3", P("n", Op.EQ, 1000.0)),
    ("n = 2.5E-3", P("n", Op.EQ, 0.0025)),
    ("n = -1e+2", P("n", Op.EQ, -100.0)),
    ("n = 9223372036854775807", P("n", Op.EQ, 2**63 - 1)),
    ("s = 'single'", P("s", Op.EQ, "single")),
    (r's = "a\"b\\c\nd\te"', P("s", Op.EQ, 'a"b\\c\nd\te')),
    (r"s = 'it\'s'", P("s", Op.EQ, "it's")),
    ("s = 'say \"hi\"'", P("s", Op.EQ, 'say "hi"')),
    ('s = ""', P("s", Op.EQ, "")),
    ('s = "2024-05-01T12:00:00Z"', P("s", Op.EQ, "2024-05-01T12:00:00Z")),
    ('s = "ünï ☃"', P("s", Op.EQ, "ünï ☃")),
    # attributes
    ('address.city = "Oslo"', P("address.city", Op.EQ, "Oslo")),
    ("event.purchase.count >= 2", P("event.purchase.count", Op.GE, 2)),
    ("first-name = 'x'", P("first-name", Op.EQ, "x")),
    ("_x9 = 1", P("_x9", Op.EQ, 1)),
    ("`weird name!` = 1", P("weird name!", Op.EQ, 1)),
    ("`and` = 1", P("and", Op.EQ, 1)),
    ("`a``b` = 1", P("a`b", Op.EQ, 1)),
    ("exists(`in`)", P("in", Op.EXISTS)),
    ("did = 1", P("did", Op.EQ, 1)),
    ("within = 1", P("within", Op.EQ, 1)),
    # did(...): windows of whole days from the day record; s, m, h from the last time
    ('did("purchase", within=7d)', Did("purchase", within_days=7)),
    ('did("x", within=1w)', Did("x", within_days=7)),
    ('did("x", within=30d, at_least=3)', Did("x", within_days=30, at_least=3)),
    ('did("x", within=30d, at_most=2, AT_LEAST=1)', Did("x", within_days=30, at_least=1,
                                                        at_most=2)),
    ('did("x", within=2w, exactly=4)', Did("x", within_days=14, at_least=4, at_most=4)),
    ('did("x", from="2026-09-01", to="2026-10-31")',
     Did("x", first=date(2026, 9, 1), last=date(2026, 10, 31))),
    ('did("x", from="2026-09-01", at_least=2)', Did("x", first=date(2026, 9, 1), at_least=2)),
    ('NOT did("x", within=14d)', Not(Did("x", within_days=14))),
    ("DID('open', WITHIN = 30m)", Did("open", within_seconds=1800)),
    ('did("x", within=10s)', Did("x", within_seconds=10)),
    ('did("x", within=2h)', Did("x", within_seconds=7200)),
    # boolean structure, precedence and flattening
    ("a = 1 AND b = 2 AND c = 3", And((A, B, C))),
    ("a = 1 OR b = 2 OR c = 3", Or((A, B, C))),
    ("a = 1 and b = 2 Or c = 3", Or((And((A, B)), C))),
    ("a = 1 OR b = 2 AND c = 3", Or((A, And((B, C))))),
    ("NOT a = 1 AND b = 2 OR c = 3", Or((And((Not(A), B)), C))),
    ("NOT (a = 1 AND b = 2)", Not(And((A, B)))),
    ("not not a = 1", Not(Not(A))),
    ("a = 1 AND (b = 2 OR c = 3)", And((A, Or((B, C))))),
    ("(a = 1 AND b = 2) AND c = 3", And((And((A, B)), C))),
    ("((a = 1))", A),
    ("x BETWEEN 1 AND 2 AND a = 1", And((P("x", Op.BETWEEN, 1, 2), A))),
    ("x NOT IN (1, 2) OR a = 1", Or((Not(P("x", Op.IN, 1, 2)), A))),
    ("ALL AND NOT a = 1", And((All(), Not(A)))),
    ("  a = 1\n\tAND\r\nb = 2  ", And((A, B))),
]


@pytest.mark.parametrize(("text", "expected"), PARSES, ids=[t for t, _ in PARSES])
def test_parse(text: str, expected: Node) -> None:
    got = parse(text, now=NOW)
    assert typed(got) == typed(expected)


def test_design_example() -> None:
    text = (
        'country IN ("US","CA") AND age BETWEEN 25 AND 34 AND interests HAS "dogs"\n'
        ' AND NOT consent.email = "denied" AND did("purchase", within=7d)'
    )
    assert parse(text, now=NOW) == And(
        (
            P("country", Op.IN, "US", "CA"),
            P("age", Op.BETWEEN, 25, 34),
            P("interests", Op.HAS, "dogs"),
            Not(P("consent.email", Op.EQ, "denied")),
            Did("purchase", within_days=7),
        )
    )


def test_a_window_in_seconds_is_measured_from_the_evaluating_shards_clock() -> None:
    """did(..., within=3h) stays relative (a saved segment evaluated later measures from
    then): the tree carries the window, the shard's clock anchors it, and it formats and
    converts back to the same tree."""
    from memstore.engine.core import Engine
    from memstore.errors import InvalidArgument
    from memstore.query import format_query, from_proto, to_proto
    from memstore.query.evaluate import evaluate

    node = parse('did("x", within=3h)')
    assert node == Did("x", within_seconds=10_800)
    assert parse(format_query(node)) == node and from_proto(to_proto(node)) == node
    now = [1_800_000_000.0]
    engine = Engine(clock=lambda: now[0])
    engine.apply(engine.plan_track("p", "x", int((now[0] - 7200) * 1_000_000), 1))
    assert engine.ids_of(evaluate(engine, node)) == ["p"]
    now[0] += 2 * 3600  # the same tree two hours later: the event was 4 hours ago
    assert not evaluate(engine, node)
    assert not evaluate(engine, parse('did("y", within=1h)'), unknown_is_empty=True)
    with pytest.raises(InvalidArgument, match="unknown event 'y'"):
        evaluate(engine, parse('did("y", within=1h)'))


def test_did_in_days_does_not_depend_on_now() -> None:
    """A window in days is resolved by the shard that evaluates it (its clock, its
    retention), so the tree carries the window itself."""
    assert parse('did("x", within=3d)', now=NOW) == parse('did("x", within=3d)')


@pytest.mark.parametrize("word", ["and", "And", "AND", "aNd"])
def test_keywords_in_any_case(word: str) -> None:
    assert parse(f"a = 1 {word} b = 2") == And((A, B))


# ------------------------------------------------------------------ syntax errors


ERRORS = [
    ("", 1, "empty query"),
    ("   ", 1, "empty query"),
    ("a = ", 5, "expected a literal after '=' at column 5, found end of input"),
    ("country = ", 11, "expected a literal after '=' at column 11, found end of input"),
    ("exists(a AND b)", 10, "expected ')' at column 10, found 'AND'"),
    ("(a = 1 AND b = 2 c", 18, "expected ')' at column 18, found 'c'"),
    ("a = 1 b = 2", 7, "expected AND, OR or end of input at column 7, found 'b'"),
    ("a = 1)", 6, "unbalanced ')' at column 6"),
    ('a = "abc', 5, "unterminated string starting at column 5"),
    ("a = 'abc\\", 5, "unterminated string starting at column 5"),
    ('a = "x\\q"', 7, "unknown escape '\\q' in string at column 7"),
    ("a ~ 1", 3, "unexpected character '~' at column 3"),
    ("a ! 1", 3, "unexpected character '!' at column 3"),
    ("a = 1 AND", 10, "expected a predicate at column 10, found end of input"),
    ("a = 1 AND OR b = 1", 11, "expected an attribute name at column 11, found 'OR'"),
    ("a 1", 3, "expected an operator after 'a' at column 3, found '1'"),
    ("a", 2, "expected an operator after 'a' at column 2, found end of input"),
    ("a NOT 1", 7, "expected IN after NOT at column 7, found '1'"),
    ("x IN 1", 6, "expected '(' after IN at column 6, found '1'"),
    ("x IN ()", 7, "expected a literal after '(' at column 7, found ')'"),
    ("x IN (1 2)", 9, "expected ',' or ')' at column 9, found '2'"),
    ("x IN (1,)", 9, "expected a literal after ',' at column 9, found ')'"),
    ("x BETWEEN 1 OR 2", 13, "expected AND in BETWEEN at column 13, found 'OR'"),
    ("x BETWEEN 1 AND", 16, "expected a literal after BETWEEN ... AND at column 16"),
    ("x HAS", 6, "expected a literal after HAS at column 6, found end of input"),
    ("x = y", 5, "expected a literal after '=' at column 5, found 'y'"),
    ("x = 1.", 5, "invalid number '1.' at column 5"),
    ("x = 12abc", 5, "invalid number '12abc' at column 5"),
    ("x = 1-2", 6, "expected AND, OR or end of input at column 6, found '-2'"),
    ("x = 99999999999999999999", 5, "does not fit in 64 bits at column 5"),
    ("``= 1", 1, "attribute name is empty at column 1"),
    ("`" + "a" * 257 + "` = 1", 1, "attribute name is 257 characters, at most 256"),
    ("`abc = 1", 1, "unterminated backquoted attribute starting at column 1"),
    ("exists a", 8, "expected '(' after EXISTS at column 8, found 'a'"),
    ("did(purchase, within=7d)", 5, "expected an event name string in did(...) at column 5"),
    ('did("p" within=7d)', 9, "expected ',' at column 9, found 'within'"),
    ('did("p", since=7d)', 10, ("expected within, from, to, at_least, at_most or exactly at "
                               "column 10, found 'since'")),
    ('did("p")', 8, "expected ',' at column 8, found ')'"),
    ('did("a b", within=7d)', 5, "event name 'a b' must be 1-128 letters"),
    ('did("p", within=7d, within=2d)', 21, "within given twice"),
    ('did("p", within=0d)', 17, "within=0d is an empty window: give 1d or more"),
    ('did("p", within=12h, at_least=2)', 17, "a count needs a window of whole days"),
    ('did("p", within=7d, from="2026-01-01")', 21, "from and within are two kinds of window"),
    ('did("p", to="2026-01-01")', 10, "to needs a from"),
    ('did("p", at_least=2)', 20, 'did(...) needs a window: within=30d, or from="YYYY-MM-DD"'),
    ('did("p", from="2026-02-30")', 15, "from: not a valid date: '2026-02-30'"),
    ('did("p", from="2026-09-01T00:00")', 15, "not a date (YYYY-MM-DD)"),
    ('did("p", from="2026-09-02", to="2026-09-01")', 32, ("the window ends (2026-09-01) "
                                                         "before it starts (2026-09-02)")),
    ('did("p", within=7d, at_least=0)', 30, ("at_least must be at least 1 (for none at all, "
                                            "use NOT did(...))")),
    ('did("p", within=7d, at_least=1.5)', 30, "expected a whole number after at_least="),
    ('did("p", within=7d, at_least=5, at_most=2)', 41, "at_least 5 is above at_most 2"),
    ('did("p", within=7d, exactly=2, at_most=3)', 32, "at_most goes with exactly"),
    ('did("p", within=7)', 17, "expected a duration such as 7d"),
    ('did("p", within=7y)', 17, "invalid number '7y' at column 17"),
    ('did("p", within=7d', 19, "expected ')' at column 19, found end of input"),
    ('did("", within=7d)', 5, "event name is empty at column 5"),
    ('did("p", within=99999999999d)', 17, "duration '99999999999d' is too long"),
    ("(" * (MAX_DEPTH + 1) + "a = 1" + ")" * (MAX_DEPTH + 1), MAX_DEPTH + 1, "nested deeper"),
    ("NOT " * (MAX_DEPTH + 5) + "a = 1", 4 * MAX_DEPTH + 1, "nested deeper"),
]


@pytest.mark.parametrize(("text", "column", "message"), ERRORS, ids=[e[0][:40] for e in ERRORS])
def test_syntax_error(text: str, column: int, message: str) -> None:
    with pytest.raises(QuerySyntaxError) as info:
        parse(text, now=NOW)
    assert message in str(info.value)
    assert info.value.column == column
    assert info.value.text == text


def test_syntax_error_is_a_value_error_with_a_caret() -> None:
    with pytest.raises(ValueError) as info:
        parse("age >= = 3")
    err = info.value
    assert isinstance(err, QuerySyntaxError) and isinstance(err, QueryError)
    assert str(err) == "expected a literal after '>=' at column 8, found '='"
    assert err.pretty().splitlines() == [
        "expected a literal after '>=' at column 8, found '='",
        "  age >= = 3",
        "         ^",
    ]


# ------------------------------------------------------------------ timestamps


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01", datetime(2024, 5, 1, tzinfo=UTC)),
        ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01 12:00:00.5", datetime(2024, 5, 1, 12, 0, 0, 500_000, tzinfo=UTC)),
        ("2024-05-01T12:00:00+02:00", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2024-05-01T12:00:00-0530", datetime(2024, 5, 1, 17, 30, tzinfo=UTC)),
    ],
)
def test_parse_timestamp(text: str, expected: datetime) -> None:
    got = parse_timestamp(text)
    assert got == expected and got.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "text", ["", "yesterday", "2024-13-01", "2024-02-30", "20240501", "2024-05-01T25:00", "1714",
             "0001-01-01T00:00+05:00", "9999-12-31T23:00-05:00"]  # (years 0 and 10000 in UTC)
)
def test_parse_timestamp_rejects(text: str) -> None:
    with pytest.raises(QueryError, match="timestamp"):
        parse_timestamp(text)


# ------------------------------------------------------------------ validate and format_query


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (P("a", Op.EQ), "query.predicate: EQ needs 1 value, got 0"),
        (P("a", Op.HAS, 1, 2), "query.predicate: HAS needs 1 value, got 2"),
        (P("a", Op.IN), "query.predicate: IN needs at least 1 value, got 0"),
        (P("a", Op.BETWEEN, 1), "query.predicate: BETWEEN needs 2 values, got 1"),
        (P("a", Op.EXISTS, 1), "query.predicate: EXISTS takes no values, got 1"),
        (P("", Op.EXISTS), "query.predicate: attribute name is empty"),
        (P("a" * 257, Op.EXISTS), "attribute name is 257 characters, at most 256"),
        (And(()), "query.and: needs at least 1 child"),
        (Or((A, Not(Or(())))), "query.or.children[1].not.or: needs at least 1 child"),
        (And((A, P("a", Op.EQ, [1]))), "query.and.children[1].predicate.values[0]: a list"),
        (P("a", Op.EQ, float("nan")), "query.predicate.values[0]: nan is not a valid literal"),
        (P("a", Op.EQ, 2**63), "does not fit in 64 bits"),
        (P("a", Op.EQ, datetime(2024, 1, 1)), "datetime literal has no timezone"),
        (P("a", "~", 1), "query.predicate: unknown op '~'"),  # type: ignore[arg-type]
        ("a = 1", "query: not a query node: str"),
    ],
)
def test_validate(node: Node, message: str) -> None:
    with pytest.raises(QueryError) as info:
        validate(node)
    assert message in str(info.value)


def test_validate_depth() -> None:
    node: Node = A
    for _ in range(MAX_DEPTH):
        node = Not(node)
    with pytest.raises(QueryError, match="nested deeper than"):
        validate(node)


def test_format_query_examples() -> None:
    node = And((Or((A, B)), Not(And((B, C))), P("and", Op.IN, "x", 1.5, True), All()))
    assert format_query(node) == (
        '(a = 1 OR b = 2) AND NOT (b = 2 AND c = 3) AND `and` IN ("x", 1.5, TRUE) AND ALL'
    )
    assert format_query(Or((And((A, B)), C))) == "a = 1 AND b = 2 OR c = 3"
    assert format_query(And((A, And((B, C))))) == "a = 1 AND (b = 2 AND c = 3)"
    assert format_query(P("s", Op.EQ, 'q"\\\n\t')) == r's = "q\"\\\n\t"'
    assert format_query(P("e", Op.EXISTS)) == "exists(e)"
    assert format_query(P("n", Op.BETWEEN, -1, 2.0)) == "n BETWEEN -1 AND 2.0"


def test_format_query_single_child_and_datetime() -> None:
    # Documented lossy cases: same meaning, not the same tree.
    assert format_query(And((A,))) == "a = 1"
    assert format_query(And((Or((A,)), Or((B, C))))) == "a = 1 AND (b = 2 OR c = 3)"
    ts = P("t", Op.GE, datetime(2024, 5, 1, tzinfo=UTC))
    assert format_query(ts) == 't >= "2024-05-01T00:00:00+00:00"'
    assert parse_timestamp(parse(format_query(ts)).values[0]) == ts.values[0]  # type: ignore


# ------------------------------------------------------------------ random trees

_bare_attr = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,12}", fullmatch=True)
_attrs = st.one_of(
    _bare_attr,
    st.text(min_size=1, max_size=12),
    st.sampled_from(["and", "OR", "not", "In", "exists", "did", "true", "ALL", "a`b", "`"]),
)
_text_literals = st.one_of(
    st.text(max_size=12),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
)
_datetimes = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
_proto_literals = st.one_of(_text_literals, _datetimes)


def _predicates(literals: st.SearchStrategy[object]) -> st.SearchStrategy[Predicate]:
    def build(attr: str, op: Op, values: list[object]) -> Predicate:
        return Predicate(attr, op, tuple(values))  # type: ignore[arg-type]

    def for_op(op: Op) -> st.SearchStrategy[Predicate]:
        if op is Op.EXISTS:
            n = st.just(0)
        elif op is Op.BETWEEN:
            n = st.just(2)
        elif op is Op.IN:
            n = st.integers(1, 4)
        else:
            n = st.just(1)
        return n.flatmap(
            lambda k: st.builds(
                build, _attrs, st.just(op), st.lists(literals, min_size=k, max_size=k)
            )
        )

    return st.sampled_from(list(Op)).flatmap(for_op)


_days = st.dates(min_value=date(2000, 1, 1), max_value=date(2100, 1, 1))


@st.composite
def _dids(draw: st.DrawFn) -> Did:
    event = draw(st.from_regex(r"[A-Za-z0-9_\-]{1,12}", fullmatch=True))
    least = draw(st.none() | st.integers(1, 2**63 - 1))
    most = draw(st.none() | st.integers(least or 1, 2**63 - 1))
    if draw(st.booleans()):
        return Did(event, within_days=draw(st.integers(1, 100_000)), at_least=least,
                   at_most=most)
    first = draw(_days)
    last = draw(st.none() | st.dates(min_value=first, max_value=date(2100, 1, 1)))
    return Did(event, first=first, last=last, at_least=least, at_most=most)


def _trees(literals: st.SearchStrategy[object], min_children: int) -> st.SearchStrategy[Node]:
    leaves = st.one_of(_predicates(literals), st.just(All()), _dids())

    def extend(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
        many = st.lists(children, min_size=min_children, max_size=4).map(tuple)
        return st.one_of(many.map(And), many.map(Or), children.map(Not))

    return st.recursive(leaves, extend, max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(_trees(_text_literals, min_children=2))
def test_format_then_parse_round_trips(node: Node) -> None:
    text = format_query(node)
    assert typed(parse(text)) == typed(node), text


@settings(max_examples=200, deadline=None)
@given(_trees(_proto_literals, min_children=1))
def test_proto_round_trips(node: Node) -> None:
    q = to_proto(node)
    assert typed(from_proto(q)) == typed(node)
    assert typed(from_proto(pb.Query.FromString(q.SerializeToString()))) == typed(node)


# ------------------------------------------------------------------ protobuf form


def _pred(attr: str, op: str, *values: pb.Value) -> pb.Query:
    return pb.Query(predicate=pb.Predicate(attribute=attr, op=op, values=list(values)))


def _list(*children: pb.Query) -> pb.QueryList:
    return pb.QueryList(children=list(children))


def test_to_proto_shape() -> None:
    q = to_proto(Or((Not(A), All(), And((P("x", Op.BETWEEN, 1, 2.5),)))))
    assert q.WhichOneof("node") == "or"
    first, second, third = getattr(q, "or").children
    assert getattr(first, "not").predicate.op == pb.Predicate.Op.EQ
    assert getattr(first, "not").predicate.values[0].int_value == 1
    assert second.all is True
    inner = getattr(third, "and").children[0].predicate
    assert (inner.attribute, inner.op) == ("x", pb.Predicate.Op.BETWEEN)
    assert [v.WhichOneof("kind") for v in inner.values] == ["int_value", "float_value"]


def test_op_names_match_proto() -> None:
    for op in Op:
        assert pb.Predicate.Op.Value(op.name) > 0
    assert set(pb.Predicate.Op.keys()) == {op.name for op in Op} | {"OP_UNSPECIFIED"}


def _int(i: int) -> pb.Value:
    return pb.Value(int_value=i)


FROM_PROTO_ERRORS = [
    (
        pb.Query(**{"and": _list(_pred("a", "EQ", _int(1)), _pred("b", "BETWEEN", _int(1)))}),
        "query.and.children[1].predicate: BETWEEN needs 2 values, got 1",
    ),
    (pb.Query(**{"or": _list(pb.Query())}), "query.or.children[0]: empty query node"),
    (pb.Query(), "query: empty query node"),
    (pb.Query(**{"not": pb.Query()}), "query.not: empty query node"),
    (pb.Query(**{"and": _list()}), "query.and: needs at least 1 child"),
    (_pred("a", "OP_UNSPECIFIED", _int(1)), "query.predicate: op not set"),
    (_pred("", "EXISTS"), "query.predicate: attribute name is empty"),
    (_pred("a", "EQ", pb.Value()), "query.predicate.values[0]: value has no kind set"),
    (
        _pred("a", "IN", _int(1), pb.Value(list_value=pb.StringList(values=["x"]))),
        "query.predicate.values[1]: a string list is not a valid literal",
    ),
    (_pred("a", "EXISTS", _int(1)), "query.predicate: EXISTS takes no values, got 1"),
    (
        _pred("a", "EQ", pb.Value(float_value=float("inf"))),
        "query.predicate.values[0]: inf is not a valid literal",
    ),
    (pb.Query(all=False), "query.all: must be true when set"),
    (pb.Query(did=pb.Did(event="x")),
     "query.did: give one window: within_days, within_seconds, or from (with an optional to)"),
    (pb.Query(did=pb.Did(event="x", within_days=3, to="2026-01-01")),
     "query.did: within_days and from/to are two kinds of window: give one"),
    (pb.Query(did=pb.Did(event="x", to="2026-01-01")),
     "query.did.to: needs a from (the window's first day)"),
    (pb.Query(did=pb.Did(event="x", **{"from": "2026-1-1"})),
     "query.did.from: not a date (YYYY-MM-DD): '2026-1-1'"),
    (pb.Query(did=pb.Did(event="", within_days=3)),
     "query.did: event name '' must be 1-128 letters, digits, _ or -"),
    (pb.Query(did=pb.Did(event="x", within_days=3, at_least=0)),
     ("query.did: at_least must be a whole number from 1 (for none at all, use NOT did(...)), "
     "got 0")),
    (pb.Query(did=pb.Did(event="x", within_days=3, at_least=4, at_most=2)),
     "query.did: at_least 4 is above at_most 2"),
    (pb.Query(**{"not": pb.Query(did=pb.Did(event="x", **{"from": "2026-01-02",
                                                          "to": "2026-01-01"}))}),
     "query.not.did: the window ends (2026-01-01) before it starts (2026-01-02)"),
]


@pytest.mark.parametrize(("query", "message"), FROM_PROTO_ERRORS)
def test_from_proto_errors(query: pb.Query, message: str) -> None:
    with pytest.raises(QueryError) as info:
        from_proto(query)
    assert str(info.value) == message


def test_from_proto_unknown_op() -> None:
    q = _pred("a", "EQ", _int(1))
    q.predicate.op = 42  # type: ignore[assignment]  # proto3 enums are open: an old server may meet a newer op
    with pytest.raises(QueryError, match=r"query.predicate: unknown op 42"):
        from_proto(q)


def test_from_proto_timestamp() -> None:
    v = pb.Value()
    v.timestamp_value.seconds = 1714521600
    got = from_proto(_pred("t", "GE", v))
    assert got == P("t", Op.GE, datetime(2024, 5, 1, tzinfo=UTC))


def test_to_proto_validates() -> None:
    with pytest.raises(QueryError, match=r"^query.not.predicate: BETWEEN needs 2 values, got 3$"):
        to_proto(Not(P("x", Op.BETWEEN, 1, 2, 3)))


def test_query_from_request() -> None:
    text = pb.QueryRequest(text='did("buy", within=1d) AND a = 1')
    assert query_from_request(text, now=NOW) == And((Did("buy", within_days=1), A))
    structured = pb.QueryRequest(query=to_proto(Or((A, B))))
    assert query_from_request(structured) == Or((A, B))
    with pytest.raises(QueryError, match=r"^query: neither text nor query given$"):
        query_from_request(pb.QueryRequest())
    with pytest.raises(QuerySyntaxError):
        query_from_request(pb.QueryRequest(text="a ="))
    with pytest.raises(QueryError, match=r"^query: empty query node$"):
        query_from_request(pb.QueryRequest(query=pb.Query()))


# ----------------------------------------------------------------------------- limits

SMALL = QueryLimits(max_bytes=10**9, max_items=100, max_predicates=10)


def test_a_text_over_the_byte_limit_is_refused_before_it_is_read() -> None:
    limits = QueryLimits(max_bytes=100)
    with pytest.raises(QuerySyntaxError, match=r"of 101 bytes exceeds the limit of 100 "
                                               r"\(--max-query-bytes\)"):
        parse('"unterminated ' + "x" * 87, limits=limits)  # never tokenized
    wide = 'a = "' + "é" * 50 + '"'  # 56 characters, 106 bytes
    with pytest.raises(QuerySyntaxError, match="of 106 bytes"):
        parse(wide, limits=limits)
    assert parse('a = "' + "é" * 45 + '"', limits=limits) == P("a", Op.EQ, "é" * 45)


def test_an_in_list_over_the_item_limit_is_refused_where_the_limit_is_met() -> None:
    # The text is broken after its millionth item: reading that far would say so.
    text = "a IN (" + ",".join(["1"] * 1_000_000) + ', "unterminated'
    with pytest.raises(QuerySyntaxError) as err:
        parse(text, limits=SMALL)
    assert str(err.value) == ("an IN list of more than 100 items exceeds the limit of 100 "
                              "(--max-query-items) at column 207")
    within = "a IN (" + ",".join(["1"] * 100) + ")"
    assert parse(within, limits=SMALL) == P("a", Op.IN, *[1] * 100)


def test_items_count_across_a_querys_lists() -> None:
    text = " OR ".join("a IN (" + ",".join(["1"] * 40) + ")" for _ in range(3))
    with pytest.raises(QuerySyntaxError, match="more than 100 items in one query exceed the "
                                               "limit of 100"):
        parse(text, limits=SMALL)
    values = [pb.Value(int_value=1)] * 40
    predicate = pb.Query(predicate=pb.Predicate(attribute="a", op=pb.Predicate.IN,
                                                values=values))
    query = pb.Query(**{"or": pb.QueryList(children=[predicate] * 3)})
    with pytest.raises(QueryError, match=r"^query.or.children\[2\].predicate: 120 items in one "
                                         "query exceed the limit of 100"):
        from_proto(query, limits=SMALL)


def test_a_protobuf_in_list_is_refused_by_its_length_before_any_value_is_read() -> None:
    values = [pb.Value(int_value=i) for i in range(1000)] + [pb.Value()]  # the last: no kind
    query = pb.Query(predicate=pb.Predicate(attribute="a", op=pb.Predicate.IN, values=values))
    with pytest.raises(QueryError) as err:
        from_proto(query, limits=SMALL)
    assert str(err.value) == ("query.predicate: an IN list of 1001 items exceeds the limit of "
                              "100 (--max-query-items)")
    many = pb.Query(predicate=pb.Predicate(attribute="a", op=pb.Predicate.EQ, values=values))
    with pytest.raises(QueryError, match="1001 items in one query"):
        from_proto(many, limits=SMALL)


def test_predicates_over_the_limit_are_refused_in_both_forms() -> None:
    text = " OR ".join(["a = 1"] * 10 + ["exists(b"])  # broken after the limit
    with pytest.raises(QuerySyntaxError, match=r"more than 10 predicates exceed the limit of "
                                               r"10 \(--max-query-predicates\) at column 91"):
        parse(text, limits=SMALL)
    assert len(parse(" OR ".join(["a = 1"] * 10), limits=SMALL).children) == 10  # type: ignore
    leaf = pb.Query(all=True)
    wide = pb.Query(**{"and": pb.QueryList(children=[leaf] * 10 + [pb.Query()])})
    with pytest.raises(QueryError, match="empty query node"):  # 11th read: 10 are allowed
        from_proto(wide, limits=SMALL)
    wider = pb.Query(**{"and": pb.QueryList(children=[leaf] * 11 + [pb.Query()])})
    with pytest.raises(QueryError, match=r"^query.and.children\[10\]: more than 10 predicates"):
        from_proto(wider, limits=SMALL)
    request = pb.QueryRequest(query=wider)
    with pytest.raises(QueryError, match="more than 10 predicates"):
        query_from_request(request, limits=SMALL)


def test_the_default_limits() -> None:
    assert QueryLimits() == QueryLimits(max_bytes=65536, max_items=10_000, max_predicates=1000)
    with pytest.raises(ValueError):
        QueryLimits(max_items=0)


@pytest.mark.parametrize("text", [
    "a = " + "9" * 5000, "a = -" + "1" * 20, "a = 9223372036854775808", "a = 1e",
    'did("x", within=' + "9" * 5000 + "d)", 'did("x", within=99999999999999999999d)',
])
def test_numbers_python_cannot_hold_are_syntax_errors(text: str) -> None:
    with pytest.raises(QuerySyntaxError):
        parse(text)


def test_integers_up_to_int64_parse_whatever_their_leading_zeros() -> None:
    assert parse("a = 9223372036854775807") == P("a", Op.EQ, 2**63 - 1)
    assert parse("a = -9223372036854775808") == P("a", Op.EQ, -(2**63))
    assert parse("a = 0000000000000000000000042") == P("a", Op.EQ, 42)


def test_long_strings_and_backquoted_names_read_whole() -> None:
    body = ("x" * 50_000 + '\\"') * 3
    expected = P("n" * 200 + "`m", Op.EQ, ("x" * 50_000 + '"') * 3)
    assert parse(f'`{"n" * 200}``m` = "{body}"', limits=SMALL) == expected
