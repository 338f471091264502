"""A primary's side of replication: the Replication gRPC service and its replicas' acks.

`FetchSnapshot` streams the primary's newest snapshot file (a new one first if the log grew
since), with the log position it covers and the history it belongs to
(memstore/replication/history.py). `Follow` is a bidirectional stream: the replica's first
message says where its log ends and which history it holds; the primary answers
OUT_OF_RANGE when that is not a position it keeps (another history, older than its oldest
segment, beyond its end), else sends its log from there as it grows -- the records as they
are on disk, read with the watchers' cursor (memstore/storage/wal_tail.py) up to what this
primary's own log holds as acknowledged (Shard.sendable_lsn: not what replicas confirmed,
which would wait forever) -- and an empty batch every HEARTBEAT seconds when idle. The
replica's later messages carry how far its own log holds the records (`acked_lsn`).

`Replicas` keeps those acks. Under `--replication sync` the shard asks it before a write
(`check`: refused with UNAVAILABLE, nothing written, when no replica has been connected for
`timeout` seconds) and after its fsync (`replicated`: the write is acknowledged once a
replica's ack covers it, UNAVAILABLE after `timeout` seconds, the write then being on the
primary only) -- Kafka's min.insync.replicas=2 with acks=all, both of its refusals. With
`fallback`, both cases acknowledge as async instead, and say so in the log. With a
coordinator, `fence` (the etcd lease, memstore/replication/coordinator.py) is asked at the
same two points, whatever the mode: a primary whose lease is not confirmed takes no write.

Under sync, `confirmed_lsn` is also where change-stream watchers read up to
(Shard.readable_lsn): the furthest any replica confirmed holding the log, or a write
acknowledged without one (`fallback`). A write no replica confirmed may be gone after a
failover, so a watcher must not see it until one does; each ack that moves it wakes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from memstore.errors import FailedPrecondition, Unavailable
from memstore.replication.coordinator import Fence
from memstore.replication.history import History
from memstore.server import rights
from memstore.shard import Shard
from memstore.storage.wal_reader import LogCorruptError
from memstore.storage.wal_tail import LogGone, LogTail
from memstore.v1 import replication_pb2 as rpb
from memstore.v1 import replication_pb2_grpc

log = logging.getLogger("memstore.replication")

HEARTBEAT = 0.25  # seconds between messages to an idle replica (its lag stays current)
CHUNK = 1 << 20  # snapshot bytes a message
BATCH_BYTES = 4 << 20  # log bytes a message, about (one record may be bigger)


@dataclass
class Replica:
    """One connected replica, as its Follow stream tells."""

    name: str
    address: str
    acked_lsn: int
    connected_at: float = field(default_factory=time.time)
    sent_lsn: int = 0


class Replicas:
    """The replicas following this primary and how far each holds the log; the shard's
    `replication` hook under --replication sync (see the module docstring)."""

    def __init__(self, shard: Shard, sync: bool = False, timeout: float = 5.0,
                 fallback: bool = False, fence: Fence | None = None) -> None:
        self.shard = shard
        self.fence = fence
        self.sync = sync
        self.timeout = timeout
        self.fallback = fallback
        self.connected: dict[int, Replica] = {}
        # Monotonic: when a replica was last connected. Starting now gives replicas
        # `timeout` seconds to reconnect to a restarted primary before writes are refused.
        self._last_seen = time.monotonic()
        self._acked = asyncio.Event()  # set and replaced whenever an ack arrives
        self.fallbacks = 0  # writes acknowledged as async under sync (with fallback)
        # The furthest position a replica ever confirmed (or a fallback acknowledged):
        # kept past a replica's disconnection, as it still holds what it confirmed. Zero
        # at a start or promotion: what the log holds then no replica has vouched for.
        self._confirmed_to = 0

    # ------------------------------------------------------------------ membership
    def add(self, replica: Replica) -> None:
        self.connected[id(replica)] = replica
        self._last_seen = time.monotonic()
        self._confirm(replica.acked_lsn)  # its log, where it asked to follow from

    def remove(self, replica: Replica) -> None:
        self.connected.pop(id(replica), None)
        self._last_seen = time.monotonic()

    def ack(self, replica: Replica, lsn: int) -> None:
        replica.acked_lsn = max(replica.acked_lsn, lsn)
        self._last_seen = time.monotonic()
        self._acked.set()
        self._acked = asyncio.Event()
        self._confirm(replica.acked_lsn)

    @property
    def confirmed_lsn(self) -> int | None:
        """Where watchers may read up to (Shard.readable_lsn) under sync; None under async,
        where a write is acknowledged from this primary's log alone."""
        return self._confirmed_to if self.sync else None

    def _confirm(self, lsn: int) -> None:
        """A replica holds the log up to `lsn` (or a write there was acknowledged without
        one): the shard wakes its watchers when that moves what they may read."""
        if lsn > self._confirmed_to:
            self._confirmed_to = lsn
            if self.sync:
                self.shard.notify_confirmed()

    def furthest_behind(self) -> int:
        """Log bytes the furthest-behind connected replica lacks (0: none connected)."""
        end = self.shard.sendable_lsn
        return max((max(0, end - r.acked_lsn) for r in list(self.connected.values())),
                   default=0)

    def best_acked(self) -> int:
        return max((r.acked_lsn for r in self.connected.values()), default=-1)

    # ------------------------------------------------------------------ the shard's hook
    def check(self) -> None:
        if self.fence is not None:
            self.fence.check()
        if not self.sync or self.connected or self.fallback:
            return
        if self._away() > self.timeout:
            raise Unavailable(f"no replica connected for {self.timeout:g} s "
                              "(--replication sync): nothing was written")

    async def replicated(self, lsn: int) -> None:
        await self._confirmed(lsn)
        if self.fence is not None:
            self.fence.check(lsn)  # the lease may have lapsed while the write waited

    async def _confirmed(self, lsn: int) -> None:
        if not self.sync:
            return
        if self.fallback and not self.connected and self._away() > self.timeout:
            self._fell_back(lsn, "no replica connected")
            return
        deadline = time.monotonic() + self.timeout
        while self.best_acked() < lsn:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._acked.wait()
        else:
            return
        if self.fallback:
            self._fell_back(lsn, f"no replica confirmed it within {self.timeout:g} s")
            return
        raise Unavailable(f"written on the primary, but no replica confirmed it within "
                          f"{self.timeout:g} s (--replication sync): it may or may not "
                          "survive a failover")

    def _away(self) -> float:
        """Seconds since a replica was last connected (0 while one is)."""
        return 0.0 if self.connected else time.monotonic() - self._last_seen

    def _fell_back(self, lsn: int, why: str) -> None:
        self.fallbacks += 1
        self._confirm(lsn)  # acknowledged: its watchers may read it, as under async
        if self.fallbacks == 1 or self.fallbacks % 1000 == 0:  # not a line per write
            log.warning("write at position %d acknowledged as async (--replication-"
                        "fallback): %s (%d such writes so far)", lsn, why, self.fallbacks)

    def stats(self) -> dict[str, str]:
        end = self.shard.sendable_lsn
        info = {"replication.role": "primary",
                "replication.mode": "sync" if self.sync else "async",
                "replication.replicas": str(len(self.connected))}
        for n, r in enumerate(sorted(self.connected.values(), key=lambda r: r.name)):
            info[f"replication.replica.{n}.name"] = r.name
            info[f"replication.replica.{n}.address"] = r.address
            info[f"replication.replica.{n}.acked_lsn"] = str(r.acked_lsn)
            info[f"replication.replica.{n}.lag_bytes"] = str(max(0, end - r.acked_lsn))
        if self.fallback:
            info["replication.fallbacks"] = str(self.fallbacks)
        return info


class ReplicationService(replication_pb2_grpc.ReplicationServicer):
    """The Replication service (see the module docstring). On a replica it refuses to be
    followed and answers Promote; `roles` (memstore/replication/roles.py) sets `history`
    and `replicas` while this shard is a primary with a log."""

    def __init__(self, shard: Shard, roles: Any) -> None:
        self.shard = shard
        self.roles = roles
        self.history: History | None = None
        self.replicas: Replicas | None = None

    @property
    def history_id(self) -> str:
        return (self.history.history or "") if self.history is not None else ""

    async def Promote(self, request: rpb.PromoteRequest, context: grpc.aio.ServicerContext
                      ) -> rpb.PromoteResponse | None:
        try:
            return await self.roles.promote(request.shard, request.epoch)  # type: ignore[no-any-return]
        except FailedPrecondition as exc:
            await _refuse(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            return None

    async def Freeze(self, request: rpb.FreezeRequest, context: grpc.aio.ServicerContext
                     ) -> rpb.FreezeResponse | None:
        shard = self.shard
        if shard.replica_of is not None or shard.log is None:
            await _refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                          f"this shard is a replica of {shard.replica_of}" if shard.replica_of
                          else "this shard keeps no log (--in-memory)")
            return None
        shard.frozen = "a failover is under way: writes go to the new primary" \
            if request.frozen else ""
        return rpb.FreezeResponse(lsn=shard.log.end_lsn)

    async def Demote(self, request: rpb.DemoteRequest, context: grpc.aio.ServicerContext
                     ) -> rpb.DemoteResponse | None:
        if not request.primary:
            await _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "primary: give host:port")
            return None
        try:
            return await self.roles.demote(request.primary, request.epoch)  # type: ignore[no-any-return]
        except FailedPrecondition as exc:
            await _refuse(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            return None

    def _other_salt(self, theirs: str) -> str | None:
        """Why a replica with salt fingerprint `theirs` may not follow (None: it may): the
        suppression list and audit hashes it copies are salted, and with another salt
        than this shard's they match nothing once it is promoted. An older replica sends
        none."""
        if not theirs or theirs == rights.salt_id(self.shard.engine.salt):
            return None
        return ("the replica's salt is not this primary's: its suppression list would "
                "match nothing after a failover; start it with the primary's --salt-file "
                "(docs/data-rights.md)")

    async def FetchSnapshot(self, request: rpb.FetchSnapshotRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        shard = self.shard
        if shard.replica_of is not None or self.history is None:
            await _refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                          f"this shard is itself a replica of {shard.replica_of}"
                          if shard.replica_of else "this shard keeps no log (--in-memory)")
            return
        if (problem := self._other_salt(request.salt)) is not None:
            await _refuse(context, grpc.StatusCode.FAILED_PRECONDITION, problem)
            return
        try:
            path = await shard.snapshot_for_replica()
        except Unavailable as exc:
            await _refuse(context, grpc.StatusCode.UNAVAILABLE, str(exc))
            return
        # Opened now: a later snapshot may delete the name, the open file stays readable.
        with await asyncio.to_thread(Path(path).open, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            lsn = int(Path(path).name[5:25])
            log.info("full resync of replica %r: sending snapshot %s (%d bytes, position "
                     "%d)", request.replica, path, size, lsn)
            first = True
            while True:
                data = await asyncio.to_thread(f.read, CHUNK)
                if first:
                    yield rpb.SnapshotChunk(lsn=lsn, history=self.history_id, size=size,
                                            shard=shard.config.name, data=data)
                    first = False
                elif data:
                    yield rpb.SnapshotChunk(data=data)
                if not data:
                    return

    async def Follow(self, request_iterator: AsyncIterator[rpb.FollowRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        shard = self.shard
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        replicas, known = self.replicas, self.history
        if shard.replica_of is not None or known is None or replicas is None \
                or shard.log is None or shard.config.data_dir is None:
            await _refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                          f"this shard is a replica of {shard.replica_of}" if shard.replica_of
                          else "this shard keeps no log (--in-memory)")
            return
        if (problem := self._other_salt(first.salt)) is not None:
            await _refuse(context, grpc.StatusCode.FAILED_PRECONDITION, problem)
            return
        lsn = first.from_lsn
        reason = self._unknown_position(known, first.history, lsn)
        if reason:
            log.info("replica %r asked for position %d of history %s: %s; it needs a full "
                     "resync", first.replica, lsn, first.history or "(none)", reason)
            await _refuse(context, grpc.StatusCode.OUT_OF_RANGE, reason)
            return
        replica = Replica(first.replica, first.address, lsn, sent_lsn=lsn)
        replicas.add(replica)
        log.info("replica %r (%s) follows from position %d (partial resync, %d bytes "
                 "behind)", replica.name, replica.address or "no reads",
                 lsn, max(0, shard.sendable_lsn - lsn))

        async def acks() -> None:
            async for message in request_iterator:
                replicas.ack(replica, message.acked_lsn)

        acking = asyncio.get_running_loop().create_task(acks())
        tail = LogTail(Path(shard.config.data_dir) / "log", lsn)
        try:
            while not acking.done() and shard.replica_of is None:  # a demotion ends it
                limit = shard.sendable_lsn
                if tail.lsn < limit:
                    try:
                        records = await asyncio.to_thread(tail.read, limit, BATCH_BYTES)
                    except LogGone as exc:
                        await _refuse(context, grpc.StatusCode.OUT_OF_RANGE,
                                      f"the replica fell behind what the log keeps ({exc})")
                        return
                    replica.sent_lsn = tail.lsn
                    yield self._message([rpb.LogRecord(lsn=r.lsn_start, type=r.rtype,
                                                       payload=r.payload) for r in records])
                    continue
                if not await shard.wait_sendable(tail.lsn, HEARTBEAT):
                    yield self._message([])
        except LogCorruptError as exc:
            log.error("replication stream to %r stopped: %s", replica.name, exc)
            await _refuse(context, grpc.StatusCode.DATA_LOSS, str(exc))
        finally:
            tail.close()
            acking.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.RpcError, Exception):
                await acking
            replicas.remove(replica)
            log.info("replica %r disconnected at position %d", replica.name,
                     replica.acked_lsn)

    def _unknown_position(self, known: History, history: str, lsn: int) -> str:
        """Why (history, lsn) is not a position this primary can stream from; "" if it is."""
        shard = self.shard
        assert shard.log is not None
        if not known.continues(history, lsn):
            if history == known.previous:
                return (f"past position {known.until}, where this primary took over "
                        f"history {history} (it lacks what the replica holds after it)")
            return f"another history (this primary's is {known.history})"
        if lsn < shard.oldest_lsn:
            return f"older than the oldest position the log keeps ({shard.oldest_lsn})"
        if lsn > shard.log.end_lsn:
            return f"beyond the end of this primary's log ({shard.log.end_lsn})"
        return ""

    def _message(self, records: list[Any]) -> rpb.FollowResponse:
        return rpb.FollowResponse(records=records, primary_lsn=self.shard.sendable_lsn,
                                  primary_time_us=time.time_ns() // 1000,
                                  epoch=self.shard.engine.epoch, history=self.history_id)


async def _refuse(context: grpc.aio.ServicerContext, code: grpc.StatusCode,
                  details: str) -> None:
    context.set_code(code)
    context.set_details(details)
