"""read_from="replica": a client's reads go to a replica of the shard it talks to.

The primary's Stats lists the replicas following it and where they serve reads
(`replication.replica.N.address`); the client picks one at random and sends it the reads
(Get, BatchGet, Count, queries, schema, segments), and everything else, writes included,
to the primary. A replica answers as of its lag (trailing metadata memstore-replica-lag-*;
docs/replication.md): a read may not see the client's own latest write. A replica that
cannot be reached is dropped (and passed over for SET_ASIDE seconds) and the read goes to
the primary; the list is read again at most every REFRESH seconds while none is known.
Through a router, Stats lists no replicas (the router has none of its own), so reads stay
on the router.

"Cannot be reached" is UNAVAILABLE (refused, reset), or no answer within the replica's
share of the read's time (`replica_timeout`): a replica that hangs (stopped, a stalled
disk, a partition that drops packets) accepts connections and never answers, and given
the caller's whole deadline it would leave nothing for the primary, or hang a read that
has none. The share is small, so the primary still has time to answer; the price is
that a read that takes a replica longer than REPLICA_TIMEOUT is asked of the primary
instead, and the replica is passed over as a hung one would be.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

REFRESH = 1.0  # seconds between looks for a replica while none is known
# Seconds a replica that could not answer is passed over when the primary lists it: a hung
# replica stays listed (its primary does not know yet), and each look would cost a read
# REPLICA_TIMEOUT again; a replica that restarted is read from again this much later.
SET_ASIDE = 10.0
# Seconds a replica has to answer one read, at most half the time left: a replica answers
# a Get in about a millisecond, so this only ever runs out on a hung replica, or on a
# read that is slow anywhere (a large group-by), which the primary then answers instead.
REPLICA_TIMEOUT = 1.0
# A replica's failures that drop it: it did not answer, rather than answered "no".
UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Reads a replica answers; Stats is left out: it describes the server the client named.
REPLICA_READS = frozenset({"Get", "BatchGet", "GetSchema", "Count", "QueryIds", "GroupBy",
                           "QueryBitmap", "ExportProfile", "ListSegments"})


def replica_timeout(remaining: float | None) -> float:
    """How long a replica has to answer a read with `remaining` seconds left (None: the
    caller set no deadline): REPLICA_TIMEOUT, or half of what is left when that is less,
    so the primary has the other half if the replica does not answer."""
    if remaining is None:
        return REPLICA_TIMEOUT
    return max(0.0, min(REPLICA_TIMEOUT, remaining / 2))


def unreachable(code: grpc.StatusCode) -> bool:
    """Whether a replica's error means it could not answer (drop it, ask the primary)."""
    return code in UNREACHABLE


class ReplicaReads:
    """The replica a client reads from, found through its primary's Stats.
    `connect(address)` makes a (channel, stub) pair."""

    def __init__(self, connect: Callable[[str], tuple[Any, Any]]) -> None:
        self.connect = connect
        self.address: str | None = None
        self._pair: tuple[Any, Any] | None = None
        self._checked = -REFRESH
        self._set_aside: dict[str, float] = {}  # address: monotonic time until
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
        """Take the primary's Stats info: pick one of the replicas it lists, passing over
        those set aside."""
        now = time.monotonic()
        self._set_aside = {a: t for a, t in self._set_aside.items() if t > now}
        addresses = [value for key, value in info.items()
                     if key.startswith("replication.replica.") and key.endswith(".address")
                     and value and value not in self._set_aside]
        if addresses and self._pair is None:
            self.address = random.choice(addresses)
            self._pair = self.connect(self.address)

    @property
    def stub(self) -> Any:
        return None if self._pair is None else self._pair[1]

    def failed(self, stub: Any = None) -> Any:
        """The replica could not answer: forget it; returns its channel, for the caller to
        close (a blocking or an asyncio one). `stub`, when given, is the one that failed:
        reads in flight together on a hung replica all fail, and only the first drops it
        (the others would drop the next one, or push back the next look)."""
        if stub is not None and stub is not self.stub:
            return None
        if self.address is not None:
            self._set_aside[self.address] = time.monotonic() + SET_ASIDE
        pair, self._pair, self.address = self._pair, None, None
        self._checked = time.monotonic()
        return None if pair is None else pair[0]
