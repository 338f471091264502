"""Segment query evaluation: a query AST to a roaring bitmap of dense ids, from the indexes.

Never scans profiles. Equality and list membership read one bitmap per value; numeric and
timestamp predicates run the bit-sliced index in a number of bitmap operations bounded by
the value's bit width; did(...) unites or adds day bitmaps; NOT subtracts from the
visible-profiles bitmap. The whole tree is checked before anything runs (literals against
the attribute's kind, windows against the retention), and the parts run in the order the
planner picks (memstore.query.plan).
"""

from __future__ import annotations

from typing import Any

from pyroaring import BitMap

from memstore.engine.core import Engine
from memstore.engine.schema import RANGE_KINDS
from memstore.errors import InvalidArgument
from memstore.query import Node
from memstore.query.plan import Context, EvalStats, compile_query, spec_for_query

__all__ = ["EvalStats", "count", "evaluate", "group_counts", "spec_for_query"]


def evaluate(engine: Engine, node: Node, *, unknown_is_empty: bool = False,
             stats: EvalStats | None = None, within: BitMap | None = None) -> BitMap:
    """Dense ids of visible profiles matching `node`. Raises InvalidArgument, before any
    evaluation, for anything wrong anywhere in the tree.

    With `unknown_is_empty` (a router asking), an attribute or event this shard has never
    seen matches nothing here instead of failing. `stats`: filled with what ran. With
    `within`, only those dense ids are considered, visible or not (a saved segment's
    members among the profiles a change touched, memstore.engine.segments): every step
    then runs among them, so the work scales with them, not the shard."""
    plan = compile_query(engine, node, unknown_is_empty)
    if within is not None:
        return plan.run(Context(within, stats), within) & within
    universe = engine.visible()
    context = Context(universe, stats)
    result = plan.run(context, None)
    # Leaves may include profiles outside owned slots; one intersection at the top removes them.
    if engine.foreign or engine.held_dense:
        return result & universe
    if id(result) in context.borrowed:  # an index's own bitmap: the caller gets a copy
        return BitMap(result)
    return result


def count(engine: Engine, node: Node, *, unknown_is_empty: bool = False,
          stats: EvalStats | None = None) -> int:
    """len(evaluate(engine, node, ...)), without building the last bitmap where roaring can
    count instead (memstore.query.plan: Step.count): a value's own bitmap is counted as it
    is, an AND's last part and a NOT are counted, not materialized."""
    plan = compile_query(engine, node, unknown_is_empty)
    universe = engine.visible()
    if engine.foreign or engine.held_dense:  # leaves may hold ids outside the visible ones
        return plan.count(Context(universe, stats), universe)
    return plan.count(Context(universe, stats), None)


def group_counts(engine: Engine, matches: BitMap, attribute: str,
                 unknown_is_empty: bool = False) -> list[tuple[Any, int]]:
    """Exact (value, count) over `matches` for a string, bool or list attribute."""
    if unknown_is_empty and engine.schema.get(attribute) is None:
        return []
    spec = spec_for_query(engine, attribute)
    if spec.kind in RANGE_KINDS:
        raise InvalidArgument(
            f"group_by: {attribute!r} is {spec.kind.label}; group by a string, bool or list"
        )
    return engine.value_index[spec.id].group_counts(matches)
