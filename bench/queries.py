"""The segment queries of the benchmark, each written once as a tree and compiled four ways.

One job: keep the meaning of every query identical across memstore text, DuckDB SQL,
RediSearch syntax and a numpy evaluation, so that the cross-check compares like with like.
The semantics fixed here follow memstore's (DESIGN.md, memstore/engine/values.py):

- `a = v`, `a IN (...)`, ranges, `a HAS v`: only profiles holding `a` can match.
- `a != v` means "holds `a` and it differs" (SQL's `<>` gives that through NULL; RediSearch
  needs `exists(a)` and not `a = v`).
- `NOT x` is every profile not matching x, including those without the attribute: in SQL
  `(x) IS NOT TRUE` (a plain NOT would drop the NULL rows), in RediSearch `-(x)`.
- BETWEEN is inclusive at both ends; timestamps compare at whole seconds.
- `exists(list)` means "has at least one element" (an empty list is stored as absent).
- RediSearch has no exists operator in the 1.x line Debian ships, so each document carries
  a `_has` TAG field listing the attributes it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from bench.datagen import ATTRS, Dataset

Value = str | int | float | bool


@dataclass(frozen=True)
class Eq:
    attr: str
    value: Value


@dataclass(frozen=True)
class Ne:
    attr: str
    value: Value


@dataclass(frozen=True)
class In:
    attr: str
    values: tuple[Value, ...]


@dataclass(frozen=True)
class Cmp:
    attr: str
    op: str  # < <= > >=
    value: Value


@dataclass(frozen=True)
class Between:
    attr: str
    low: Value
    high: Value


@dataclass(frozen=True)
class Has:
    attr: str
    value: str


@dataclass(frozen=True)
class Exists:
    attr: str


@dataclass(frozen=True)
class Not:
    child: Node


@dataclass(frozen=True)
class And:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class All:
    pass


Node = Eq | Ne | In | Cmp | Between | Has | Exists | Not | And | Or | All


def AND(*c: Node) -> And:
    return And(tuple(c))


def OR(*c: Node) -> Or:
    return Or(tuple(c))


def ts(s: str) -> int:
    """Epoch seconds of an ISO-8601 UTC timestamp string."""
    return int(datetime.fromisoformat(s).astimezone(UTC).timestamp())


def _iso(v: Value) -> str:
    assert isinstance(v, str)
    return datetime.fromtimestamp(ts(v), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- memstore text ---------------------------------------------------------------------------

def _ms_lit(attr: str, v: Value) -> str:
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if ATTRS[attr].storage == "ts":
        return f'"{_iso(v)}"'
    if ATTRS[attr].storage == "float":
        return repr(float(v))
    if isinstance(v, int | float):
        return repr(v)
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_memstore(n: Node) -> str:
    def sub(c: Node) -> str:
        s = to_memstore(c)
        return f"({s})" if isinstance(c, And | Or) else s

    if isinstance(n, Eq):
        return f"{n.attr} = {_ms_lit(n.attr, n.value)}"
    if isinstance(n, Ne):
        return f"{n.attr} != {_ms_lit(n.attr, n.value)}"
    if isinstance(n, In):
        return f"{n.attr} IN ({', '.join(_ms_lit(n.attr, v) for v in n.values)})"
    if isinstance(n, Cmp):
        return f"{n.attr} {n.op} {_ms_lit(n.attr, n.value)}"
    if isinstance(n, Between):
        return f"{n.attr} BETWEEN {_ms_lit(n.attr, n.low)} AND {_ms_lit(n.attr, n.high)}"
    if isinstance(n, Has):
        return f"{n.attr} HAS {_ms_lit(n.attr, n.value)}"
    if isinstance(n, Exists):
        return f"exists({n.attr})"
    if isinstance(n, Not):
        return f"NOT {sub(n.child)}"
    if isinstance(n, And):
        return " AND ".join(sub(c) for c in n.children)
    if isinstance(n, Or):
        return " OR ".join(sub(c) for c in n.children)
    if isinstance(n, All):
        return "ALL"
    raise TypeError(n)


# ---- DuckDB SQL ----------------------------------------------------------------------------

def sql_col(attr: str) -> str:
    return '"' + attr + '"'


def _sql_lit(attr: str, v: Value) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if ATTRS[attr].storage == "ts":
        return f"TIMESTAMP '{_iso(v).replace('T', ' ').rstrip('Z')}'"
    if ATTRS[attr].storage == "float":
        return repr(float(v))
    if isinstance(v, int | float):
        return repr(v)
    return "'" + v.replace("'", "''") + "'"


def to_sql(n: Node) -> str:
    """A WHERE clause over table `profiles` (absent attributes are NULL, empty lists NULL)."""
    if isinstance(n, Eq):
        return f"{sql_col(n.attr)} = {_sql_lit(n.attr, n.value)}"
    if isinstance(n, Ne):
        return f"{sql_col(n.attr)} <> {_sql_lit(n.attr, n.value)}"
    if isinstance(n, In):
        return f"{sql_col(n.attr)} IN ({', '.join(_sql_lit(n.attr, v) for v in n.values)})"
    if isinstance(n, Cmp):
        return f"{sql_col(n.attr)} {n.op} {_sql_lit(n.attr, n.value)}"
    if isinstance(n, Between):
        lo, hi = _sql_lit(n.attr, n.low), _sql_lit(n.attr, n.high)
        return f"{sql_col(n.attr)} BETWEEN {lo} AND {hi}"
    if isinstance(n, Has):
        return f"list_contains({sql_col(n.attr)}, {_sql_lit(n.attr, n.value)})"
    if isinstance(n, Exists):
        return f"{sql_col(n.attr)} IS NOT NULL"
    if isinstance(n, Not):
        return f"({to_sql(n.child)}) IS NOT TRUE"
    if isinstance(n, And):
        return " AND ".join(f"({to_sql(c)})" for c in n.children)
    if isinstance(n, Or):
        return " OR ".join(f"({to_sql(c)})" for c in n.children)
    if isinstance(n, All):
        return "true"
    raise TypeError(n)


# ---- RediSearch (1.x and later) --------------------------------------------------------------

def redis_field(attr: str) -> str:
    return attr.replace(".", "_")


def _rs_tag(v: Value) -> str:
    s = ("true" if v else "false") if isinstance(v, bool) else str(v)
    out = []
    for ch in s:
        if not (ch.isalnum() or ch == "_"):
            out.append("\\")
        out.append(ch)
    return "".join(out)


def _rs_num(attr: str, v: Value) -> str:
    if ATTRS[attr].storage == "ts":
        return str(ts(str(v)))
    return repr(float(v)) if ATTRS[attr].storage == "float" else str(int(v))


def to_redis(n: Node) -> str:
    """A RediSearch query; numbers and timestamps are NUMERIC fields, the rest TAG fields."""
    if isinstance(n, Eq) and ATTRS[n.attr].storage in ("int", "float", "ts"):
        v = _rs_num(n.attr, n.value)
        return f"@{redis_field(n.attr)}:[{v} {v}]"
    if isinstance(n, Eq | Has):
        return f"@{redis_field(n.attr)}:{{{_rs_tag(n.value)}}}"
    if isinstance(n, Ne):
        f = redis_field(n.attr)
        return f"(@_has:{{{f}}}) (-(@{f}:{{{_rs_tag(n.value)}}}))"
    if isinstance(n, In):
        if ATTRS[n.attr].storage in ("int", "float", "ts"):
            return "|".join(f"({to_redis(Eq(n.attr, v))})" for v in n.values)
        return f"@{redis_field(n.attr)}:{{{' | '.join(_rs_tag(v) for v in n.values)}}}"
    if isinstance(n, Cmp):
        v = _rs_num(n.attr, n.value)
        rng = {"<": f"-inf ({v}", "<=": f"-inf {v}", ">": f"({v} +inf", ">=": f"{v} +inf"}
        return f"@{redis_field(n.attr)}:[{rng[n.op]}]"
    if isinstance(n, Between):
        lo, hi = _rs_num(n.attr, n.low), _rs_num(n.attr, n.high)
        return f"@{redis_field(n.attr)}:[{lo} {hi}]"
    if isinstance(n, Exists):
        return f"@_has:{{{redis_field(n.attr)}}}"
    # RediSearch 1.x binds `-` and `|` loosely (`-a b` is `-(a b)`, `@f:{x} | y` does not
    # parse), so every operand is parenthesised.
    if isinstance(n, Not):
        return f"(-({to_redis(n.child)}))"
    if isinstance(n, And):
        return " ".join(f"({to_redis(c)})" for c in n.children)
    if isinstance(n, Or):
        return "|".join(f"({to_redis(c)})" for c in n.children)
    if isinstance(n, All):
        return "*"
    raise TypeError(n)


# ---- numpy ---------------------------------------------------------------------------------

def _np_value(attr: str, v: Value) -> Any:
    a = ATTRS[attr]
    if a.storage == "cat":
        return a.vocab.index(v) if v in a.vocab else -2  # -2 matches nothing
    if a.storage == "ts":
        return ts(str(v))
    if a.storage == "bool":
        return int(bool(v))
    return v


def _bit(attr: str, v: str) -> np.uint64 | None:
    vocab = ATTRS[attr].vocab
    return np.uint64(1) << np.uint64(vocab.index(v)) if v in vocab else None


_CMP: dict[str, Callable[[np.ndarray, Any], np.ndarray]] = {
    "<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
}


def to_numpy(n: Node, ds: Dataset) -> np.ndarray:
    """Bool mask of the profiles matching `n`, by scanning columns (the floor to beat)."""
    if isinstance(n, Eq):
        col = ds.cols[n.attr]
        m = col == _np_value(n.attr, n.value)
        return m & ds.present[n.attr] if n.attr in ds.present else m
    if isinstance(n, Ne):
        return ds.has(n.attr) & (ds.cols[n.attr] != _np_value(n.attr, n.value))
    if isinstance(n, In):
        col = ds.cols[n.attr]
        values = [_np_value(n.attr, v) for v in n.values]
        if len(values) <= 8:  # a few equality passes beat np.isin's sort by ~10x
            m = col == values[0]
            for v in values[1:]:
                m |= col == v
        else:
            m = np.isin(col, values)
        return m & ds.present[n.attr] if n.attr in ds.present else m
    if isinstance(n, Cmp):
        m = _CMP[n.op](ds.cols[n.attr], _np_value(n.attr, n.value))
        return m & ds.present[n.attr] if n.attr in ds.present else m
    if isinstance(n, Between):
        col = ds.cols[n.attr]
        m = (col >= _np_value(n.attr, n.low)) & (col <= _np_value(n.attr, n.high))
        return m & ds.present[n.attr] if n.attr in ds.present else m
    if isinstance(n, Has):
        bit = _bit(n.attr, n.value)
        if bit is None:
            return np.zeros(ds.size, dtype=bool)
        return (ds.cols[n.attr] & bit) != 0
    if isinstance(n, Exists):
        return ds.has(n.attr).copy()  # And/Or below combine in place
    if isinstance(n, Not):
        return ~to_numpy(n.child, ds)
    if isinstance(n, And):
        m = to_numpy(n.children[0], ds)
        for c in n.children[1:]:
            m &= to_numpy(c, ds)
        return m
    if isinstance(n, Or):
        m = to_numpy(n.children[0], ds)
        for c in n.children[1:]:
            m |= to_numpy(c, ds)
        return m
    if isinstance(n, All):
        return np.ones(ds.size, dtype=bool)
    raise TypeError(n)


# ---- the suite -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Query:
    name: str
    tree: Node
    note: str

    @property
    def memstore(self) -> str:
        return to_memstore(self.tree)

    @property
    def sql(self) -> str:
        return to_sql(self.tree)

    @property
    def redis(self) -> str:
        return to_redis(self.tree)

    @property
    def attributes(self) -> frozenset[str]:
        """The attributes the query reads."""
        return _attributes(self.tree)


def _attributes(n: Node) -> frozenset[str]:
    if isinstance(n, Not):
        return _attributes(n.child)
    if isinstance(n, And | Or):
        return frozenset().union(*map(_attributes, n.children))
    if isinstance(n, All):
        return frozenset()
    return frozenset((n.attr,))


@dataclass(frozen=True)
class GroupBy:
    name: str
    query: Query
    attr: str
    top_n: int = 10


QUERIES: tuple[Query, ...] = (
    Query("q01_eq", Eq("country", "US"), "one equality"),
    Query("q02_in", In("country", ("US", "CA", "GB")), "IN over three values"),
    Query("q03_between", Between("age", 25, 34), "int range, inclusive"),
    Query("q04_has", Has("interests", "dogs"), "list membership"),
    Query("q05_exists_bool",
          AND(Exists("event.purchase.count"), Eq("is_subscribed", True)),
          "exists and a bool"),
    Query("q06_ne", AND(Ne("plan", "free"), Ne("device_os", "ios")),
          "NE on an always-present and an optional attribute"),
    Query("q07_time", AND(Cmp("last_seen", ">=", "2026-10-01T00:00:00Z"),
                          Cmp("signup", "<", "2024-01-01T00:00:00Z")),
          "two timestamp ranges"),
    Query("q08_not", Not(Eq("consent.email", "denied")),
          "pure NOT (includes profiles without consent)"),
    Query("q09_issue", AND(In("country", ("US", "CA")), Between("age", 25, 34),
                           Has("interests", "dogs"), Not(Eq("consent.email", "denied"))),
          "the issue's 4-predicate example with a range"),
    Query("q10_high_value",
          AND(Cmp("ltv", ">", 250.0), Cmp("orders", ">=", 3),
              Cmp("event.purchase.last", ">=", "2026-07-01T00:00:00Z"),
              Eq("consent.email", "granted"), Not(Has("tags", "churn_risk"))),
          "high-value recent buyers, opted in, not churn risks"),
    Query("q11_or_of_ands",
          OR(AND(In("plan", ("pro", "enterprise")), Cmp("nps", ">=", 9)),
             AND(Has("tags", "vip"), Cmp("ltv", ">", 1000.0)),
             AND(Has("interests", "investing"), Cmp("age", ">", 50))),
          "OR of three ANDs"),
    Query("q12_deep",
          AND(OR(Eq("country", "US"), AND(Eq("language", "es"), Not(Eq("country", "ES")))),
              Not(OR(In("device_os", ("linux", "other")), Not(Exists("age")))),
              OR(Has("interests", "travel"), Has("interests", "photography"),
                 Has("tags", "early_adopter")),
              Between("last_seen", "2026-01-01T00:00:00Z", "2026-12-31T23:59:59Z")),
          "deep AND/OR/NOT tree with exists and a time range"),
    Query("q13_selective", AND(Eq("city", "city_1500"), Cmp("age", "<", 30)),
          "rare city and a range (very selective)"),
    Query("q14_not_in",
          AND(Not(In("acquisition.channel", ("paid_search", "display"))), Exists("tags"),
              Cmp("nps", "<=", 6)),
          "NOT IN, exists on a list, a range on a sparse int"),
    Query("q15_counts",
          OR(Between("event.purchase.count", 5, 8), Cmp("ltv", ">=", 2000.0),
             Not(Exists("city"))),
          "OR of a range, a float range and NOT exists"),
)
BY_NAME = {q.name: q for q in QUERIES}

GROUP_BYS: tuple[GroupBy, ...] = (
    GroupBy("g01_country_all", Query("all", All(), "every profile"), "country"),
    GroupBy("g02_city_q09", BY_NAME["q09_issue"], "city"),
    GroupBy("g03_plan_q12", BY_NAME["q12_deep"], "plan"),
    GroupBy("g04_channel_q08", BY_NAME["q08_not"], "acquisition.channel"),
)

ID_PAGE_QUERIES = ("q01_eq", "q09_issue", "q12_deep")
PAGE_SIZE = 1000


def numpy_group_counts(ds: Dataset, mask: np.ndarray, attr: str) -> dict[str, int]:
    """Exact counts per value of categorical `attr` over the profiles in `mask`."""
    codes = ds.cols[attr][mask]
    codes = codes[codes >= 0]
    counts = np.bincount(codes, minlength=len(ATTRS[attr].vocab))
    return {ATTRS[attr].vocab[k]: int(c) for k, c in enumerate(counts) if c}


def check_group_by(full: dict[str, int], got: list[tuple[Any, int]], top_n: int) -> str | None:
    """None if `got` is a correct top-N of the exact counts `full` (ties may pick either)."""
    want = sorted(full.values(), reverse=True)[:top_n]
    if sorted((c for _, c in got), reverse=True) != want:
        return f"top counts {[c for _, c in got]} != expected {want}"
    for value, count in got:
        if full.get(str(value)) != count:
            return f"value {value!r}: {count} != expected {full.get(str(value))}"
    return None
