"""read_from="replica": a client's reads go to a replica of the shard it talks to.

The primary's Stats lists the replicas following it and where they serve reads
(`replication.replica.N.address`); the client picks one at random and sends it the reads
(Get, BatchGet, Count, queries, schema, segments), and everything else, writes included,
to the primary. A replica answers as of its lag (trailing metadata memstore-replica-lag-*;
docs/replication.md): a read may not see the client's own latest write. A replica that
cannot be reached (UNAVAILABLE) is dropped and the read goes to the primary; the list is
read again at most every REFRESH seconds while none is known. Through a router, Stats
lists no replicas (the router has none of its own), so reads stay on the router.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

REFRESH = 1.0  # seconds between looks for a replica while none is known
# Reads a replica answers; Stats is left out: it describes the server the client named.
REPLICA_READS = frozenset({"Get", "BatchGet", "GetSchema", "Count", "QueryIds", "GroupBy",
                           "QueryBitmap", "ExportProfile", "ListSegments"})


class ReplicaReads:
    """The replica a client reads from, found through its primary's Stats.
    `connect(address)` makes a (channel, stub) pair."""

    def __init__(self, connect: Callable[[str], tuple[Any, Any]]) -> None:
        self.connect = connect
        self.address: str | None = None
        self._pair: tuple[Any, Any] | None = None
        self._checked = -REFRESH
        self._lock = threading.Lock()

    def due(self) -> bool:
        """Whether this read looks for a replica first (one caller at a time)."""
        now = time.monotonic()
        if self._pair is not None or now - self._checked < REFRESH:
            return False
        with self._lock:
            if now - self._checked < REFRESH:
                return False
            self._checked = now
            return True

    def load(self, info: dict[str, str]) -> None:
        """Take the primary's Stats info: pick one of the replicas it lists."""
        addresses = [value for key, value in info.items()
                     if key.startswith("replication.replica.") and key.endswith(".address")
                     and value]
        if addresses and self._pair is None:
            self.address = random.choice(addresses)
            self._pair = self.connect(self.address)

    @property
    def stub(self) -> Any:
        return None if self._pair is None else self._pair[1]

    def failed(self) -> Any:
        """The replica could not answer: forget it; returns its channel, for the caller to
        close (a blocking or an asyncio one)."""
        pair, self._pair, self.address = self._pair, None, None
        self._checked = time.monotonic()
        return None if pair is None else pair[0]
