"""Retention: a router erases anonymous profiles nobody has touched for `--anonymous-ttl`
days, in the background.

Anonymous: a profile holding at least one identifier, and only identifiers of the kinds
`anonymous` and `device` (a visitor's cookie, an app install). Merging with a known
profile gives it that profile's identifiers (email, crm, ...), so a profile merged with a
known one is never anonymous; a profile without identifiers (known by its primary id
alone, as a CRM import is) is never anonymous either. Unchanged: its last-changed time
(Engine.changed; for profiles from before memstore kept it, the time its shard started).

Every RETENTION_INTERVAL seconds the sweeper asks each shard for an erasure of those
profiles (EraseProfiles with `anonymous_before`): the shard finds them a slice of dense ids
at a time (a few milliseconds between requests) and erases them in batches of
RETENTION_BATCH, one logged change each; after each batch the router erases what other
shards keep of them (forwards, directory claims), as for any erasure. Each sweep counts in
`memstore_erased_profiles_total{reason="retention"}` and writes one audit line with the
count (the shards write one per batch). A shard that is down is skipped until the next
sweep. Several routers may sweep the same shards: a profile erased twice is erased once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from memstore.server import audit, metrics
from memstore.v1 import memstore_pb2 as pb

log = logging.getLogger("memstore.retention")

RETENTION_INTERVAL = 600.0  # seconds between sweeps
RETENTION_BATCH = 500  # profiles a change on a shard
DAY = 86400


class _Sweep:
    """The context of a sweep's calls: no deadline; aborting raises."""

    def time_remaining(self) -> None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise RuntimeError(f"{code.name}: {details}")


class Retention:
    def __init__(self, router: Any, ttl_days: float, interval: float = RETENTION_INTERVAL,
                 clock: Callable[[], float] = time.time, batch: int = RETENTION_BATCH) -> None:
        if ttl_days <= 0:
            raise ValueError("--anonymous-ttl: a number of days above 0")
        self.router = router
        self.ttl = ttl_days * DAY
        self.interval = interval
        self.clock = clock  # tests inject one
        self.batch = batch

    async def run(self) -> None:
        """Forever: a sweep every `interval` seconds (never stops on an error)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("retention sweep failed")

    async def sweep(self) -> int:
        """Erase every anonymous profile unchanged for the TTL, now; returns how many."""
        cutoff = int(self.clock() - self.ttl)
        request = pb.EraseProfilesRequest(anonymous_before=Timestamp(seconds=cutoff),
                                          batch_size=self.batch)
        context = _Sweep()
        await self.router.map.refresh()
        erased = 0
        for shard in self.router.map.ordered():
            if not shard.reachable:
                continue
            try:
                async for chunk in self.router.erase_on([(shard, shard.epoch)], request,
                                                        context):
                    if chunk is not None:
                        erased += len(chunk.erased)
            except Exception as exc:  # noqa: BLE001 - a shard down: the next sweep
                log.warning("retention: shard %s skipped this sweep: %s", shard.label, exc)
        metrics.ERASED.labels("retention").inc(erased)
        audit.record("retention", by="retention", profiles=erased, anonymous_before=cutoff,
                     ttl_days=self.ttl / DAY)
        if erased:
            log.info("retention: erased %d anonymous profiles unchanged since %d", erased,
                     cutoff)
        return erased
