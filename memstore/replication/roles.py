"""Which role a shard process plays, primary or replica, and the switch between them.

`Roles` owns what differs between the two: a primary's history, its `Replicas` (the acks
--replication sync waits for) and the Replication service's view of them; a replica's
`Follower` task. `promote` and `demote` are the two halves of a failover
(shards/failover.py):

- promote (a replica): stop following; the log as it is becomes a new history continuing
  the old one up to its end (history.for_primary); take the shard's name, so positions of
  change streams stay valid, and own the same slots at an epoch above the old primary's
  (logged as a RECORD_SHARD_META, so routers prefer it at once); take writes.
- demote (a primary told of a newer one): refused unless the newer epoch is above this
  shard's own (the fence: an old primary never gives way to a stale claim); writes are
  refused from that moment; the shard follows the new primary, which streams the log from
  this one's end if it continues this history that far, else sends a full resync that
  discards this log's tail (its positions in the replica's log).

With a coordinator (memstore/replication/coordinator.py) the same two steps are taken by
the election instead of an operator: `take_over` when this member wins the primary key,
`demote` when another holds it; and a primary's writes also wait on its `fence` (the
etcd lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from pyroaring import BitMap

from memstore.errors import FailedPrecondition
from memstore.replication import history
from memstore.replication.coordinator import Fence
from memstore.replication.history import History
from memstore.replication.primary import Replicas, ReplicationService
from memstore.replication.replica import Follower
from memstore.server import metrics
from memstore.server.security import Credentials
from memstore.shard import Shard
from memstore.storage.wal_writer import SyncPolicy
from memstore.v1 import replication_pb2 as rpb

log = logging.getLogger("memstore.replication")


class Roles:
    """The replication side of one shard process (see the module docstring)."""

    def __init__(self, shard: Shard, mode: str = "async", timeout: float = 5.0,
                 fallback: bool = False, credentials: Credentials | None = None) -> None:
        self.shard = shard
        self.mode, self.timeout, self.fallback = mode, timeout, fallback
        self.credentials = credentials or Credentials()  # presented to a primary
        self.address = ""  # where this process serves, once it does
        self.service = ReplicationService(shard, self)
        self.fence: Fence | None = None  # a coordinator's: writes wait on the etcd lease
        self.followed: str | None = None  # the history this directory held at start
        self._following: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        shard.log_history = self.log_history

    def log_history(self) -> History | None:
        """The history this shard's log holds now: a primary's own; a replica's, the one
        it follows (None: a full resync under way, or none yet)."""
        if self.shard.replica_of is None:
            return self.service.history
        follower = self.shard.follower
        if follower is not None:
            return follower.line  # type: ignore[no-any-return]
        return history.replica_of(self.followed) if self.followed else None

    @property
    def data(self) -> Path:
        assert self.shard.config.data_dir is not None
        return Path(self.shard.config.data_dir)

    # ------------------------------------------------------------------ starting
    def open_primary(self) -> None:
        """This shard serves as a primary (after Shard.open; memory-only shards too, which
        replicas cannot follow)."""
        shard = self.shard
        replicas = Replicas(shard, sync=self.mode == "sync", timeout=self.timeout,
                            fallback=self.fallback, fence=self.fence)
        found: History | None = None
        if shard.log is not None:
            keep = shard.config.sync is SyncPolicy.ALWAYS  # else a crash may lose a tail
            found = history.for_primary(self.data, keep, shard.log.end_lsn)
            if found.shard and found.shard != shard.config.name:
                log.info("serving as shard %r (taken over by a failover), not --name %r",
                         found.shard, shard.config.name)
                shard.config.name = found.shard
        self.service.history, self.service.replicas = found, replicas
        shard.replication = replicas
        metrics.REPLICAS.set_function(lambda: len(replicas.connected))
        metrics.REPLICATION_LAG_BYTES.set_function(replicas.furthest_behind)
        metrics.REPLICATION_LAG_SECONDS.set(0)

    def follow(self, primary: str, followed: str | None) -> None:
        """Follow `primary` (the log holding history `followed`, None: none yet)."""
        shard = self.shard
        follower = Follower(shard, primary, followed, self.address, self.credentials)
        shard.follower = follower
        self.service.history, self.service.replicas = None, None
        self._following = asyncio.get_running_loop().create_task(follower.run())
        metrics.REPLICAS.set(0)
        metrics.REPLICATION_LAG_BYTES.set_function(lambda: follower.lag()[0])
        metrics.REPLICATION_LAG_SECONDS.set_function(lambda: follower.lag()[1])
        log.info(f"replica of {primary}", extra={"primary": primary})

    async def stop(self) -> None:
        if self._following is not None:
            self._following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._following
            self._following = None

    # ------------------------------------------------------------------ failover
    async def promote(self, name: str, epoch: int,
                      slots: BitMap | None = None) -> rpb.PromoteResponse:
        """Serve as shard `name` at `epoch` at least (`slots`: owned when the directory owns
        none yet, a coordinated member's first start)."""
        shard = self.shard
        async with self._lock:
            if shard.replica_of is None:
                if name in ("", shard.config.name) and shard.engine.epoch >= epoch:
                    return self._promoted()  # asked again: already done
                raise FailedPrecondition(f"this shard is already a primary "
                                         f"({shard.config.name!r} at epoch "
                                         f"{shard.engine.epoch})")
            primary = shard.replica_of
            await self.stop()
            found = history.read(self.data)
            if found is not None and found.history is None:  # before anything changes
                self.follow(primary, None)  # (the resync starts again)
                raise FailedPrecondition(f"this replica is in the middle of a full resync "
                                         f"from {primary}: it holds no shard's state yet, "
                                         "so it cannot be promoted; promote another, or "
                                         "wait for the resync to finish")
            assert shard.log is not None
            await shard.log.sync_to(shard.log.end_lsn)
            shard.become_primary()
            if name:
                shard.config.name = name
            keep = shard.config.sync is SyncPolicy.ALWAYS
            took = history.for_primary(self.data, keep, shard.log.end_lsn, shard.config.name)
            self.open_primary()
            self.service.history = took
            new_epoch = max(epoch, shard.engine.epoch + 1)
            owned = shard.engine.owned_slots
            await shard.set_ownership(new_epoch, slots if owned is None else owned)
            if took.previous is None:  # elected on a primary's own directory (coordinator)
                log.warning("promoted: was waiting for %s; now primary %r at epoch %d from "
                            "position %d, continuing its own history %s", primary,
                            shard.config.name, new_epoch, shard.log.end_lsn, took.history)
            else:
                log.warning("promoted: was a replica of %s; now primary %r at epoch %d from "
                            "position %d (history %s continues %s up to there)", primary,
                            shard.config.name, new_epoch, took.until, took.history,
                            took.previous)
            return self._promoted()

    async def take_over(self, name: str, epoch: int, slots: BitMap | None = None) -> int:
        """This member won shard `name`'s primary key at `epoch` (coordinator.py): a replica
        is promoted; a primary whose lease had lapsed (and so refused writes) owns its slots
        at the new epoch. Returns the epoch it serves at."""
        shard = self.shard
        if shard.replica_of is not None:
            await self.promote(name, epoch, slots)
            return shard.engine.epoch
        async with self._lock:
            await shard.set_ownership(max(epoch, shard.engine.epoch + 1),
                                      shard.engine.owned_slots)
        return shard.engine.epoch

    def _promoted(self) -> rpb.PromoteResponse:
        shard = self.shard
        found = self.service.history
        return rpb.PromoteResponse(shard=shard.config.name, epoch=shard.engine.epoch,
                                   lsn=found.until if found else 0,
                                   history=found.history or "" if found else "")

    async def demote(self, primary: str, epoch: int) -> rpb.DemoteResponse:
        shard = self.shard
        async with self._lock:
            if shard.log is None:
                raise FailedPrecondition("this shard keeps no log (--in-memory): it cannot "
                                         "follow a primary")
            if epoch <= shard.engine.epoch:
                raise FailedPrecondition(
                    f"refused: {primary} claims epoch {epoch}, not above this shard's "
                    f"{shard.engine.epoch}; this shard stays primary")
            if shard.replica_of is not None:  # a replica of the old primary: repointed
                if shard.replica_of != primary:
                    await self.stop()
                    followed = shard.follower.history if shard.follower else self.followed
                    log.warning("following %s (primary at epoch %d) instead of %s",
                                primary, epoch, shard.replica_of)
                    shard.replica_of = primary
                    self.follow(primary, followed)
                return rpb.DemoteResponse(lsn=shard.log.end_lsn)
            await shard.become_replica(primary)  # writes are refused from here on
            end = shard.log.end_lsn
            found = self.service.history
            followed = found.history if found else None
            if followed is not None:
                history.write(self.data, history.replica_of(followed))
            log.warning("demoted: %s is primary at epoch %d (this shard was at %d); writes "
                        "refused from position %d on, following it (what it lacks after its "
                        "takeover position is discarded by a full resync)", primary, epoch,
                        shard.engine.epoch, end)
            self.follow(primary, followed)
            return rpb.DemoteResponse(lsn=end)
