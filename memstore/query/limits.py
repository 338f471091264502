"""How much work one query may ask for: the limits both surfaces check while reading it.

A query is refused with QueryError (INVALID_ARGUMENT) naming the limit, its configured value
and the flag that sets it, before it is evaluated and as early as the reading allows:
  * the text form's length in UTF-8 bytes, before it is tokenized;
  * items (the literal values of all its predicates together, IN lists included) and
    predicates (leaves: comparisons, IN, BETWEEN, HAS, exists, did, ALL), counted while
    the text is parsed or the protobuf form converted, so an oversized IN list is refused
    after the limit's worth of items, never after building all of it (the protobuf form
    knows a list's length before converting a value of it).
Shards and routers each take a `QueryLimits`; give them the same one (`memstore serve`
does), or a router may pass on a query its shards refuse.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_BYTES = 64 << 10
DEFAULT_MAX_ITEMS = 10_000
DEFAULT_MAX_PREDICATES = 1_000


@dataclass(frozen=True, slots=True)
class QueryLimits:
    """The size of one query: text bytes, literal items, predicates (see the module)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_items: int = DEFAULT_MAX_ITEMS
    max_predicates: int = DEFAULT_MAX_PREDICATES

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_items", "max_predicates"):
            if getattr(self, name) < 1:
                raise ValueError(f"QueryLimits.{name} must be at least 1")

    def text_problem(self, text: str) -> str | None:
        """What is wrong with the length of a query text, or None (cheap: no encoding for
        a short or an ASCII text)."""
        if len(text) <= self.max_bytes // 4:  # 4 bytes a character at most
            return None
        size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        if size <= self.max_bytes:
            return None
        return (f"a query text of {size} bytes exceeds the limit of {self.max_bytes} "
                "(--max-query-bytes)")

    def items_problem(self, total: int, in_list: int = 0, exact: bool = True) -> str | None:
        """What is wrong with a query holding `total` items so far, or None. `in_list`: the
        items of the IN list being read; `exact`: whether the counts are whole (protobuf)
        or stopped at the limit (text, which reads no further)."""
        if total <= self.max_items:
            return None
        limit = self.max_items
        if not exact and in_list > limit:
            return f"an IN list of more than {limit} items exceeds the limit of {limit} " \
                   "(--max-query-items)"
        if not exact:
            return f"more than {limit} items in one query exceed the limit of {limit} " \
                   "(--max-query-items)"
        if in_list > limit:
            return f"an IN list of {in_list} items exceeds the limit of {limit} " \
                   "(--max-query-items)"
        return f"{total} items in one query exceed the limit of {limit} (--max-query-items)"

    def predicates_problem(self, count: int) -> str | None:
        if count <= self.max_predicates:
            return None
        return (f"more than {self.max_predicates} predicates exceed the limit of "
                f"{self.max_predicates} (--max-query-predicates)")


DEFAULT_LIMITS = QueryLimits()
