"""What every peer offers the harness: counts, id pages and group-bys for a query.

A peer may also offer look-ups and writes; `available` is False with a `reason` when the
system cannot run here (the harness reports that and goes on).
"""

from __future__ import annotations

from typing import Any, Protocol

from bench.queries import Query


class Peer(Protocol):
    name: str
    available: bool
    reason: str

    def load(self) -> dict[str, Any]: ...

    def count(self, q: Query) -> int: ...

    def ids(self, q: Query, limit: int) -> list[str]: ...

    def group_by(self, q: Query, attr: str, top_n: int) -> list[tuple[Any, int]]: ...

    def close(self) -> None: ...
