"""One durable shard: the engine plus its log and snapshots.

Every change goes one way: plan (engine) -> append to the log -> apply to memory -> wait
for the sync policy -> answer. Plan, append and apply run with no await in between, so
changes reach the log in the order they reach memory and replay rebuilds the same state,
dense ids included (log records carry them).

Group commit: while one fsync runs in a worker thread, later changes append and apply and
then wait for the next fsync, so one fsync covers every write in flight. A change is
visible to readers from the moment it is applied; it is acknowledged only once durable.
If the log fails (fsync error, full disk), every change not yet durable is rolled back
from its before-images in reverse order, the caller gets UNAVAILABLE, and the shard stays
read-only until restart: after a failed fsync the kernel's page cache can no longer be
trusted, so we never retry it (PostgreSQL's "fsyncgate").

Snapshots are point-in-time at log position L: the shard forks (memstore.storage.forked), and the
child writes the file from its copy of memory as it was at L while the parent goes on
serving; the kernel copies a page only when one side writes it. Start-up loads the newest
good snapshot and replays the log from L. After a snapshot the log rotates, and segments and older snapshots it covers are
deleted, so erased data does not linger on disk.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice, repeat
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol

import msgpack
import numpy as np
import ormsgpack
from pyroaring import BitMap

from memstore.engine.blob import decode, ident_key
from memstore.engine.change import (
    Change,
    Image,
    ImageColumns,
    Load,
    Note,
    Undo,
    array_of,
    column_form,
    join_loads,
    raw_array,
)
from memstore.engine.core import DEFAULT_EVENT_DAYS, Engine
from memstore.engine.identity import IdentityRules
from memstore.engine.schema import AttributeSpec, Schema
from memstore.engine.segments import Deltas, Touched, decode_deltas, encode_deltas, members_of
from memstore.engine.tracking import Tracked, stale_days
from memstore.errors import FailedPrecondition, ReadOnlyReplica, Unavailable
from memstore.gcpause import gc_paused
from memstore.hashslot import slot_of
from memstore.index.bitmap_index import RangeIndex, ValueIndex
from memstore.index.blobtable import BlobTable, join_blobs
from memstore.index.day_index import DayIndex
from memstore.index.dense import bitmap_of
from memstore.index.inttable import IntTable
from memstore.index.pidtable import PidTable
from memstore.server.heap import release_free_heap
from memstore.storage import wal_format
from memstore.storage.datadir import refuse_cluster_dir
from memstore.storage.dirlock import DirLock
from memstore.storage.forked import ChildFailed, run_in_child
from memstore.storage.snapshot_file import (
    READ_AHEAD,
    SnapshotReader,
    SnapshotWriter,
    install,
    load_newest,
    prune,
    read_newest,
)
from memstore.storage.wal_reader import LogScan, read_ahead, read_log, truncate_torn_tail
from memstore.storage.wal_writer import LogFailedError, LogWriteError, LogWriter, SyncPolicy

log = logging.getLogger("memstore.shard")

SNAPSHOT_CHUNK = 8192  # profiles per `rows` snapshot section
DIRECTORY_CHUNK = 1 << 16  # identifier keys, or aliases, per snapshot section
DIRECTORY_SLOTS_CHUNK = 1 << 18  # slots of the identifier directory's table per section
TIMES_CHUNK = 1 << 16  # dense ids per `times` section
CLAIM_SLOTS_CHUNK = 64  # slots of directory claims per snapshot section
RECENT_CHANGES = 500_000  # profile ids remembered for slot-move catch-up (~5 MB at most)
EXPIRY_CHECK = 10.0  # seconds between checks for day records past the retention


class RecentChanges:
    """Which profiles changed after a position: the catch-up rounds of a slot move ask
    "what changed in these slots since my last copy?" instead of copying them all again.

    Holds the primary ids of the newest `limit` changed profiles with the position of their
    change, each change's ids packed in one bytes object (msgpack): ~10 bytes an id where
    a list of str cost ~70, which after a bulk load of 1M was 35 bytes a profile of the
    shard's memory. `since(p)` answers for any p >= `floor`; older positions are forgotten
    (the caller copies in full instead), and so is everything before a restart: positions
    are log positions, which survive a restart, but this memory does not.
    """

    def __init__(self, floor: int, limit: int = RECENT_CHANGES) -> None:
        self.floor = floor  # every change after this position is remembered
        self.limit = limit
        self._entries: deque[tuple[int, bytes, int]] = deque()  # position, ids, count
        self._size = 0

    def record(self, position: int, pids: list[str]) -> None:
        packed = msgpack.packb(pids, unicode_errors="surrogatepass")
        self._entries.append((position, packed, len(pids)))
        self._size += len(pids)
        while self._size > self.limit and len(self._entries) > 1:
            old_position, _, count = self._entries.popleft()
            self._size -= count
            self.floor = old_position

    def since(self, position: int) -> set[str] | None:
        """Ids changed after `position`, or None if that is older than what is remembered."""
        if position < self.floor:
            return None
        out: set[str] = set()
        for at, packed, _ in reversed(self._entries):
            if at <= position:
                break
            out.update(msgpack.unpackb(packed, unicode_errors="surrogatepass"))
        return out


class Replication(Protocol):
    """What a primary under `--replication sync` asks before and after a write
    (memstore/replication/primary.py)."""

    def check(self) -> None:
        """Raise Unavailable when no replica could confirm a write (nothing written)."""

    async def replicated(self, lsn: int) -> None:
        """Return once a replica holds the log below `lsn` (Unavailable after the
        timeout, unless the operator allowed falling back to async)."""

    @property
    def confirmed_lsn(self) -> int | None:
        """How far the log is confirmed by a replica, when writes wait for that (None:
        they do not, so watchers need not either). It only grows, and the shard is told
        (notify_confirmed) when it does."""


@dataclass
class ShardConfig:
    """Settings of one shard. See docs/operations.md "Configuration reference" for the trade-offs."""

    data_dir: Path | None = None  # None: memory only, nothing persisted (tests, benchmarks)
    name: str = "shard-0"
    sync: SyncPolicy = SyncPolicy.ALWAYS
    segment_bytes: int = 64 << 20
    snapshot_log_bytes: int = 512 << 20  # snapshot when the log grows past this ...
    snapshot_interval: float = 3600.0  # ... or this many seconds after the last one
    rules: IdentityRules = field(default_factory=IdentityRules)
    fsync: Callable[[int], None] = os.fsync  # injectable, so tests can make it fail
    # Seconds to wait for the data directory's lock when another process holds it (a
    # supervisor restarting a shard whose predecessor is still stopping); 0: refuse at once.
    lock_wait: float = 0.0
    # A clean stop snapshots first when the log has grown since the last snapshot, so the
    # next start replays nothing; it gives up after this many seconds (0: never snapshot).
    stop_snapshot_timeout: float = 60.0
    # Wall-clock seconds for created and changed times and for rolling day records over
    # (tests inject one).
    clock: Callable[[], float] = time.time
    # The cluster's salt (memstore.server.rights): suppression keys and audit hashes.
    salt: bytes = b""
    event_days: int = DEFAULT_EVENT_DAYS  # UTC days of day records kept (--event-days)
    # Seconds between evaluations of the saved segments whose members change with time
    # alone (did(...)): how late such an enter or leave can be. At most a minute.
    segment_refresh: float = 60.0
    # How long a watcher can be away and still resume (seconds of log kept for change
    # streams), unless an erasure since says otherwise: erasure wins (see _write_snapshot).
    changes_retention: float = 24 * 3600.0


class Shard:
    def __init__(self, config: ShardConfig, engine: Engine, writer: LogWriter | None,
                 lock: DirLock | None = None) -> None:
        self.config = config
        self.engine = engine
        self.log = writer
        self.lock = lock  # this process owns the data directory (memstore.storage.dirlock)
        # Where the log ended when this process began serving as a primary (recovered or
        # promoted): a stream "from now" starts no earlier, even where what watchers may
        # read (readable_lsn) is still behind, waiting for a replica to confirm the log.
        self.served_from = writer.end_lsn if writer is not None else 0
        self._pending: list[tuple[int, Undo, Deltas]] = []
        self._snapshot_lock = asyncio.Lock()
        self._ownership_lock = asyncio.Lock()  # one change of ownership at a time
        self._last_snapshot = time.monotonic()
        self._log_bytes_at_snapshot = writer.size_bytes if writer else 0
        self._auto_task: asyncio.Task[None] | None = None
        self._expiry_task: asyncio.Task[None] | None = None
        self.recovery: dict[str, Any] = {}
        # Log position of the newest snapshot; the older kept snapshot needs the log from
        # its own position on, so segments are deleted only before that one.
        self._snapshot_lsn = 0
        self._erased = False  # a profile was deleted or merged away since the last snapshot
        # Set by a failover about to promote a replica (Replication.Freeze): why writes
        # are refused meanwhile ("" when they are not).
        self.frozen = ""
        # The log position just past the latest erasure of a person: a change stream may
        # not start before it (what it would replay is gone from memory already).
        self.erased_lsn = 0
        # Changes are numbered by log position; a memory-only shard counts them instead.
        self._counter = 0
        self.recent = RecentChanges(self.position)
        self._advanced = asyncio.Event()  # set and replaced whenever readable_lsn moves
        # A demoted primary under --replication sync: how far a replica had confirmed its
        # log. Its watchers read no further until its new primary's records or snapshot
        # vouch for its log (the tail past it may be discarded). None: no such limit.
        self._confirmed_when_demoted: int | None = None
        self._timed_task: asyncio.Task[None] | None = None
        self._background_started = False
        # Replication (memstore/replication/): a replica names its primary and takes no
        # writes of its own; a primary under --replication sync waits for a replica's
        # acknowledgement through `replication` before answering a write.
        self.replica_of: str | None = None
        self.replication: Replication | None = None
        self.follower: Any = None  # a replica's memstore.replication.Follower (its lag)
        # The history (memstore.replication.history.History) its log holds now, which
        # change-stream positions name; replication's Roles answers it (None: unknown).
        self.log_history: Callable[[], Any] = lambda: None

    @property
    def position(self) -> int:
        """Position of the newest applied change: its log position, or a count in memory."""
        return self.log.end_lsn if self.log is not None else self._counter

    # ------------------------------------------------------------------ life cycle
    @classmethod
    async def open(cls, config: ShardConfig,
                   prepare: Callable[[Path], None] | None = None) -> Shard:
        """Open the shard, recovering its data directory. `prepare(data_dir)` runs once
        the directory is this process's, before anything in it is read (a replica empties
        an interrupted full resync there)."""
        engine = _new_engine(config)
        if config.data_dir is None:
            return cls(config, engine, None)
        started = time.monotonic()
        data = Path(config.data_dir)
        refuse_cluster_dir(data)  # a cluster's directory would start empty, owning all slots
        lock = DirLock.acquire(data, config.lock_wait)  # before reading anything
        try:
            if prepare is not None:
                prepare(data)
            return await cls._recover(config, data, lock, started)
        except BaseException:
            lock.release()
            raise

    @classmethod
    async def _recover(cls, config: ShardConfig, data: Path, lock: DirLock, started: float
                       ) -> Shard:
        """Load the newest good snapshot, replay the log after it, open the writer."""
        snap_dir, log_dir = data / "snapshots", data / "log"
        info: dict[str, Any] = {"snapshot": None, "replayed": 0, "torn_bytes": 0}
        engine, start_lsn, end_lsn, scan = _rebuild(config, snap_dir, log_dir, info)
        # Replay's records, runs and columns are freed by now, but glibc keeps their pages
        # (~170 bytes a profile after a 1M-profile log): give them back.
        release_free_heap()
        if scan.torn is not None:
            info["torn_bytes"] = scan.torn.byte_count
            log.warning("log: cut a torn record at the end of %s offset %d (%d bytes)",
                        scan.torn.path, scan.torn.offset, scan.torn.byte_count,
                        extra={"file": str(scan.torn.path), "offset": scan.torn.offset,
                               "bytes": scan.torn.byte_count})
            truncate_torn_tail(scan)
        writer = LogWriter.open(log_dir, sync=config.sync, segment_bytes=config.segment_bytes,
                                fsync=config.fsync, start_lsn=end_lsn)
        info["seconds"] = round(time.monotonic() - started, 3)
        info["profiles"] = len(engine)
        log.info("recovered %d profiles in %.3f s", info["profiles"], info["seconds"],
                 extra={"recovery": info})
        shard = cls(config, engine, writer, lock)
        shard.recovery = info
        shard.erased_lsn = info.get("erased_lsn", 0)
        shard._snapshot_lsn = start_lsn
        # Replayed records may hold deletions the previous run never snapshotted; assume
        # they do, so the next snapshot still erases them from disk.
        shard._erased = info["replayed"] > 0
        return shard

    def start_background(self) -> None:
        loop = asyncio.get_running_loop()
        if self.log is not None and self._auto_task is None:
            self._auto_task = loop.create_task(self._auto_snapshot())
        self._background_started = True
        if self.replica_of is not None:
            return  # expiry and timed segments write records: the primary's records do
        if self._expiry_task is None:
            self._expiry_task = loop.create_task(self._expire_days())
        self._ensure_timed()

    async def become_replica(self, primary: str) -> None:
        """Stop taking writes (a primary demoted): writes are refused naming `primary`
        from now on, and the background work that writes (expiry, timed segments) stops."""
        self.replica_of = primary
        if self.replication is not None:
            self._confirmed_when_demoted = self.replication.confirmed_lsn
        self.replication = None
        self.frozen = ""  # (a replica refuses writes anyway; a later promotion takes them)
        for task in (self._expiry_task, self._timed_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._expiry_task = self._timed_task = None

    def become_primary(self) -> None:
        """Take writes again (a replica promoted), and run the background work that
        writes."""
        self.replica_of = None
        self.follower = None
        self.frozen = ""
        self.served_from = self.log.end_lsn if self.log is not None else 0
        if self._background_started:
            self.start_background()

    def _ensure_timed(self) -> None:
        """Run the timed refresh once a segment reads the clock (and background work
        runs)."""
        if (self._timed_task is None and self._background_started
                and self.engine.segments.timed()):
            self._timed_task = asyncio.get_running_loop().create_task(self._refresh_timed())

    async def _refresh_timed(self) -> None:
        """Every config.segment_refresh seconds, the segments whose membership changes with
        time (did(...)) are evaluated again, so their members enter and leave with no
        write, and watchers hear it."""
        while True:
            await asyncio.sleep(self.config.segment_refresh)
            try:
                await self.refresh_timed()
            except Exception:  # keep serving; the next round tries again
                log.exception("refreshing time-relative segments failed")

    async def close(self) -> None:
        for task in (self._auto_task, self._expiry_task, self._timed_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.log is not None:
            await self.log.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @property
    def writable_error(self) -> str | None:
        if self.log is not None and self.log.failed:
            return f"the log failed ({self.log.failure}); this shard is read-only until restart"
        return None

    # ------------------------------------------------------------------ writing
    async def commit(self, change: Change) -> Any:
        """Log, apply and (per sync policy) persist `change`; returns change.result."""
        if change.empty:
            if self.log is not None and self._pending:
                # The answer may rest on changes applied but not durable yet (a Decide
                # reading the decision of an Absorb still in its fsync): wait as they do.
                try:
                    await self.log.sync_to(self._pending[-1][0])
                except (LogFailedError, OSError) as exc:
                    raise Unavailable(f"not answered: an earlier write failed: {exc}") from None
            return change.result
        if self.replica_of is not None:
            raise ReadOnlyReplica(self.replica_of)
        if self.frozen:
            raise Unavailable(self.frozen)
        if not change.at:
            change.at = int(self.engine.clock())  # logged: replay stamps the same times
        if self.log is not None and self.log.failed:
            raise Unavailable(self.writable_error or "log failed")
        # (Kept for the acknowledgement: a demotion during the fsync below drops
        # self.replication, and this write must still wait for a replica and its fence.)
        replication = self.replication
        if replication is not None:
            replication.check()  # no replica to wait for: refused, nothing written
        # Memory first, then the log, with no await between: saved segments' deltas are
        # computed from the applied state and logged in the same record (a failed append
        # takes both back). Readers cannot run in between, so the order is the same.
        touched = Touched()
        segments = self.engine.segments
        dropped = segments.dropped_by(change.notes)
        before = self.engine.apply(change, touched)
        deltas = segments.refresh(self.engine, touched) if len(segments) else {}
        deltas.update(dropped)
        if change.rebuild:
            deltas.update(segments.rebuild(self.engine, change.rebuild))
            self._ensure_timed()
        if self.log is None:
            self._counter += 1
            self.recent.record(self._counter, change.touched())
            self._advance()
            return change.result
        try:
            # A new or deleted segment's members are no image's: the record names them.
            lsn = self.log.append(*change_record(
                change, touched, deltas,
                self.engine if change.rebuild or dropped else None))
        except (LogWriteError, LogFailedError, OSError) as exc:
            segments.undo(deltas)
            self.engine.undo(before)
            raise Unavailable(f"write not persisted: {exc}") from None
        self._pending.append((lsn, before, deltas))
        self.recent.record(lsn, change.touched())
        if not self._erased and change.erases:
            self._erased = True
        if change.erasure:
            self.erased_lsn = lsn
        try:
            await self.log.sync_to(lsn)
        except (LogFailedError, OSError) as exc:
            self._rollback()
            raise Unavailable(f"write not persisted: {exc}") from None
        durable = self.log.durable_lsn
        while self._pending and self._pending[0][0] <= durable:
            self._pending.pop(0)
        if self.config.sync is not SyncPolicy.ALWAYS:
            self._pending.clear()
        self._advance()  # replicas read the log as watchers do: wake them first
        if replication is not None:
            if self.replica_of is not None:  # demoted meanwhile: the new primary decides
                raise Unavailable(f"not acknowledged: this shard became a replica of "
                                  f"{self.replica_of} while the write was being made "
                                  "durable; it may or may not be on the new primary")
            await replication.replicated(lsn)
        return change.result

    def _rollback(self) -> None:
        """Undo every applied change that is not durable, newest first."""
        while self._pending:
            _, before, deltas = self._pending.pop()
            self.engine.segments.undo(deltas)
            self.engine.undo(before)

    # ------------------------------------------------------------------ watchers
    @property
    def sendable_lsn(self) -> int:
        """Where replicas may be sent the log up to: what this process's own log holds as
        acknowledged (durable under --sync always; written, under the other policies).
        Never held back by replicas' confirmations: they confirm only what they were sent."""
        if self.log is None:
            return 0
        return self.log.durable_lsn if self.config.sync is SyncPolicy.ALWAYS \
            else self.log.end_lsn

    @property
    def readable_lsn(self) -> int:
        """Where a watcher may read the log up to: every record before it is acknowledged.
        Under --replication sync a write is acknowledged only once a replica confirmed
        it, and one no replica confirmed may be gone after a failover: a watcher that saw
        it would hold a position of changes that never happened. So there it is what a
        replica confirmed; otherwise this process's own point, sendable_lsn."""
        local = self.sendable_lsn
        confirmed = self.replication.confirmed_lsn if self.replication is not None \
            else self._confirmed_when_demoted
        return local if confirmed is None else min(local, confirmed)

    def notify_confirmed(self) -> None:
        """A replica's confirmation moved readable_lsn with no change to the log: wake the
        watchers (Replication.confirmed_lsn grew)."""
        self._advance()

    def _advance(self) -> None:
        """Wake the watchers and replica feeds waiting for the log to advance."""
        self._advanced.set()
        self._advanced = asyncio.Event()

    async def wait_advanced(self, lsn: int, timeout: float) -> bool:
        """Wait up to `timeout` seconds for readable_lsn to pass `lsn`; whether it did."""
        return await self._wait_past(lambda: self.readable_lsn, lsn, timeout)

    async def wait_sendable(self, lsn: int, timeout: float) -> bool:
        """Wait up to `timeout` seconds for sendable_lsn to pass `lsn` (a replica's feed);
        whether it did."""
        return await self._wait_past(lambda: self.sendable_lsn, lsn, timeout)

    async def _wait_past(self, point: Callable[[], int], lsn: int, timeout: float) -> bool:
        """Wait up to `timeout` seconds in all for point() to pass `lsn`. In all, not since
        the last wake-up: under --replication sync the log advances with what watchers
        may read standing still (a replica that confirms nothing), and they still owe
        their heartbeat."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while point() <= lsn:
                    await self._advanced.wait()
        return point() > lsn

    async def refresh_timed(self) -> int:
        """Re-evaluate the saved segments that read the clock (did(...)), and those that
        read them (in_segment), over every profile; log and apply what changed. Returns
        how many memberships changed."""
        segments = self.engine.segments
        names = segments.timed()
        if not names or (self.log is not None and self.log.failed):
            return 0
        deltas = segments.rebuild(self.engine, names)
        if not deltas:
            return 0
        if self.log is not None:
            try:
                lsn = self.log.append(wal_format.RECORD_CHANGE,
                                      encode_change(Change(), Touched(), deltas, self.engine))
            except (LogWriteError, LogFailedError, OSError):
                segments.undo(deltas)
                raise
            self._pending.append((lsn, Undo([], []), deltas))
            try:
                await self.log.sync_to(lsn)
            except (LogFailedError, OSError):
                self._rollback()
                raise
            if self.config.sync is not SyncPolicy.ALWAYS:
                self._pending.clear()
            else:
                durable = self.log.durable_lsn
                while self._pending and self._pending[0][0] <= durable:
                    self._pending.pop(0)
        self._advance()
        return sum(len(enter) + len(leave) for enter, leave in deltas.values())

    async def set_ownership(self, epoch: int, slots: BitMap | None,
                            newer: bool = False) -> None:
        """Serve `slots` (None: every slot) at `epoch`, durably; `newer`: only if `epoch`
        is above the shard's (FailedPrecondition otherwise). Memory first, as a write:
        nothing can read the shard between the record and its state (a promoted replica
        already says primary, and must not say so at its old epoch while the record
        syncs); a failed sync takes the state back. One change at a time: a second waits
        for the first's sync, so each takes back only its own (and `newer` compares with
        an epoch that is settled)."""
        async with self._ownership_lock:
            if newer and epoch <= self.engine.epoch:
                raise FailedPrecondition(f"epoch {epoch} is not newer than this shard's "
                                         f"epoch {self.engine.epoch}")
            if self.replica_of is not None:
                raise ReadOnlyReplica(self.replica_of)
            if self.log is None:
                self.engine.set_ownership(epoch, slots)
                return
            if self.log.failed:
                raise Unavailable(self.writable_error or "log failed")
            try:
                lsn = self.log.append(wal_format.RECORD_SHARD_META, encode_meta(epoch, slots))
            except (LogWriteError, LogFailedError, OSError) as exc:
                raise Unavailable(f"ownership not persisted: {exc}") from None
            before = self.engine.epoch, self.engine.owned_slots
            self.engine.set_ownership(epoch, slots)
            try:
                await self.log.sync_to(lsn)
            except (LogFailedError, OSError) as exc:
                self.engine.set_ownership(*before)
                raise Unavailable(f"ownership not persisted: {exc}") from None
            self._advance()

    # ------------------------------------------------------------------ replication
    def apply_replicated(self, records: Iterable[tuple[int, int, bytes]]) -> int:
        """A replica: append the primary's records (lsn, type, payload) to this log as they
        are, so positions here are the primary's, and apply each through `replay`, the
        recovery path. No await: readers see whole records. Returns the log's end; not
        durable yet (`await log.sync_to`). ValueError for a record not at this log's end."""
        assert self.log is not None
        for lsn, rtype, payload in records:
            if lsn != self.log.end_lsn:
                raise ValueError(f"replicated record at position {lsn}, but this log ends "
                                 f"at {self.log.end_lsn}")
            if rtype not in wal_format.RECORD_TYPES:  # (before it enters this log)
                raise ValueError(f"replicated record at position {lsn} has type {rtype}, "
                                 f"which this version does not know: upgrade this replica")
            self.log.append(rtype, payload)
            self._confirmed_when_demoted = None  # the primary vouches for this log
            erasures = self.engine.erasures
            if replay(self.engine, rtype, payload):
                self._erased = True
            if self.engine.erasures != erasures:
                self.erased_lsn = self.log.end_lsn
        self._advance()
        return self.log.end_lsn

    async def install_snapshot(self, lsn: int) -> int:
        """A replica's full resync: the snapshot received into
        snapshot_file.receiving(DATA/snapshots, lsn) becomes this shard's whole state. It is
        verified and published, every other snapshot and every log segment is deleted (they
        belong to the history being replaced), the log starts again at `lsn`, and a new
        engine loaded from the file takes the old one's place. Returns the profile count."""
        assert self.log is not None and self.config.data_dir is not None
        data = Path(self.config.data_dir)
        snap_dir, log_dir = data / "snapshots", data / "log"
        fsync = self.config.fsync
        async with self._snapshot_lock:
            path = await asyncio.to_thread(install, snap_dir, lsn, fsync)
            config = self.config
            engine = _new_engine(config)
            reader = SnapshotReader(path, verify=False)  # (install verified it)
            await asyncio.to_thread(load_snapshot, engine, reader.sections(READ_AHEAD))
            await self.log.close()
            for other in snap_dir.glob("snap-*.snap"):
                if other != path:
                    other.unlink()
            for _, segment in wal_format.list_segments(log_dir):
                segment.unlink()
            self.log = LogWriter.open(log_dir, sync=config.sync,
                                      segment_bytes=config.segment_bytes, fsync=fsync,
                                      start_lsn=lsn)
            self.engine = engine
            self._pending.clear()
            self._snapshot_lsn = lsn
            self._erased = False  # only the new snapshot is on disk
            self._last_snapshot = time.monotonic()
            self._log_bytes_at_snapshot = self.log.size_bytes
            self.recent = RecentChanges(lsn)
            self._confirmed_when_demoted = None  # the log is the primary's now
            self._advance()
            return len(engine)

    async def snapshot_for_replica(self) -> Path:
        """A primary's full resync of a replica: the newest snapshot when the log has not
        grown since it, else a new one (Redis's BGSAVE for a full sync)."""
        if self.log is None or self.config.data_dir is None:
            raise Unavailable("this shard keeps no log (--in-memory): nothing to replicate")
        snap_dir = Path(self.config.data_dir) / "snapshots"
        async with self._snapshot_lock:
            if self.log.end_lsn == self._snapshot_lsn:
                reader = await asyncio.to_thread(load_newest, snap_dir)
                if reader is not None and reader.lsn == self._snapshot_lsn:
                    return reader.path
        return Path((await self.snapshot())["path"])

    # ------------------------------------------------------------------ snapshots
    async def snapshot(self) -> dict[str, Any]:
        if self.log is None:
            raise Unavailable("this shard has no data directory; nothing to snapshot")
        if self.log.failed:
            raise Unavailable(self.writable_error or "log failed")
        async with self._snapshot_lock:
            return await self._write_snapshot()

    async def _write_snapshot(self) -> dict[str, Any]:
        assert self.log is not None and self.config.data_dir is not None
        engine = self.engine
        # The snapshot holds every change applied when it forks, and is named after the
        # log position just past the last of them (`lsn`), all of them durable: replay
        # starts there, and must not apply a change the snapshot holds again (a tracked
        # batch's index columns are deltas). The log is synced off the event loop first;
        # rotate() then fsyncs, briefly, what arrived meanwhile, and starts the new
        # segment at `lsn`, with no await between it and the fork.
        await self.log.sync_to(self.log.end_lsn)
        started = time.monotonic()
        erased, self._erased = self._erased, False  # deletions after this point: next time
        self.log.rotate()
        lsn = self.log.end_lsn
        snap_dir = Path(self.config.data_dir) / "snapshots"
        fsync = self.config.fsync  # injectable: tests make it fail or count it
        # The engine's containers are long-lived: keep the collector's full passes off them
        # (they take 60-400 ms at 1M profiles), and the child's reads off more pages. Collect
        # first: garbage frozen now (a failed request's reference cycles) is never freed.
        gc.collect()
        gc.freeze()
        name = self.config.name
        try:
            path, count, pause = await run_in_child(
                lambda: write_snapshot_file(engine, snap_dir, lsn, name, started, fsync))
        except ChildFailed as exc:
            self._erased = self._erased or erased
            raise Unavailable(f"snapshot failed: {exc}") from None
        except BaseException:
            self._erased = self._erased or erased
            raise
        path = Path(path)
        # Keep the previous snapshot and the log after it, so start-up can fall back to it
        # if the newest is ever damaged, and the log of the last changes_retention seconds,
        # so a watcher that was away that long resumes where it was -- unless something
        # was erased since: then erasure wins and only the newest snapshot (and no log
        # before it) stays on disk; watchers from before it start again (OUT_OF_RANGE).
        keep_from = lsn if erased else min(self._snapshot_lsn, self._retained_from(lsn))
        self.log.remove_segments_before(keep_from)
        # prune re-reads the kept snapshots to be sure they are whole: off the event loop.
        await asyncio.to_thread(prune, snap_dir, keep=1 if erased else 2, fsync=fsync)
        self._snapshot_lsn = lsn
        self._last_snapshot = time.monotonic()
        self._log_bytes_at_snapshot = self.log.size_bytes
        seconds = time.monotonic() - started
        log.info("snapshot %s: %d profiles at lsn %d in %.2fs (pause %.1f ms)",
                 path, count, lsn, seconds, pause * 1000)
        return {"path": str(path), "lsn": lsn, "profiles": count, "seconds": seconds,
                "pause_ms": pause * 1000}

    async def snapshot_before_stop(self) -> str:
        """On a clean stop, after the last write: snapshot if the log holds anything the
        newest snapshot does not, so the next start loads it and replays nothing. Never
        raises: a snapshot that fails or outlasts `stop_snapshot_timeout` (its child is
        killed, its temporary file is never read) only means the next start replays the
        log, which holds every acknowledged write. Returns what happened, for the log."""
        timeout = self.config.stop_snapshot_timeout
        if self.log is None or timeout <= 0:
            return "off"
        if self.log.failed:
            return f"skipped: {self.writable_error}"
        if self.log.end_lsn == self._snapshot_lsn:
            return "not needed: the newest snapshot holds everything"
        try:
            async with asyncio.timeout(timeout):
                result = await self.snapshot()
        except TimeoutError:
            return (f"gave up after {timeout:g} s; the next start replays the log, which "
                    "holds every acknowledged write")
        except Exception as exc:  # noqa: BLE001 - stopping must go on; the log is whole
            return f"failed ({exc}); the next start replays the log, which holds every " \
                   "acknowledged write"
        return f"written at lsn {result['lsn']} in {result['seconds']:.2f} s"

    async def expire_days(self) -> int:
        """Drop the days before the retention from every day record, a slice of profiles
        a change (logged like any write, so other calls interleave); how many profiles."""
        rewritten = 0
        while stale_days(self.engine) and not self.writable_error:
            change = self.engine.plan_expire()
            if change.empty:
                break  # the rest are held by a merge or moving between shards: later
            rewritten += await self.commit(change)
            await asyncio.sleep(0)
        return rewritten

    async def _expire_days(self) -> None:
        """Forever: expire day records once a day rolls over (checked every few seconds)."""
        while True:
            await asyncio.sleep(EXPIRY_CHECK)
            try:
                rewritten = await self.expire_days()
            except Exception:  # keep serving; the next round tries again
                log.exception("expiring day records failed")
                continue
            if rewritten:
                log.info("dropped days before the retention from %d profiles", rewritten)

    def _retained_from(self, lsn: int) -> int:
        """The base of the oldest log segment written within changes_retention seconds
        (`lsn` if none is)."""
        assert self.config.data_dir is not None
        cutoff = _wall() - self.config.changes_retention
        for base, path in wal_format.list_segments(Path(self.config.data_dir) / "log"):
            try:
                if path.stat().st_mtime >= cutoff:
                    return base
            except FileNotFoundError:
                continue
        return lsn

    @property
    def oldest_lsn(self) -> int:
        """The oldest position the log still holds (a watcher before it starts again)."""
        if self.log is None:
            return 0
        segments = wal_format.list_segments(self.log.directory)
        return segments[0][0] if segments else self.log.end_lsn

    async def _auto_snapshot(self) -> None:
        assert self.log is not None
        while True:
            await asyncio.sleep(1.0)
            grown = self.log.size_bytes - self._log_bytes_at_snapshot
            due = time.monotonic() - self._last_snapshot >= self.config.snapshot_interval
            if self.log.failed or (grown < self.config.snapshot_log_bytes and
                                   not (due and grown > 0)):
                continue
            try:
                await self.snapshot()
            except Exception:  # keep serving; the next round tries again
                log.exception("automatic snapshot failed")


def write_snapshot_file(engine: Engine, snap_dir: Path, lsn: int, shard_name: str,
                        forked_at: float, fsync: Callable[[int], None] = os.fsync
                        ) -> list[Any]:
    """Write the engine as it is into snap-<lsn>.snap; returns [path, profiles, pause].
    Runs in a forked child (memstore.storage.forked), whose memory is the parent's at the fork:
    `forked_at` is the parent's clock just before it, so the pause can be reported."""
    pause = time.monotonic() - forked_at
    pids, blobs = engine.pids, engine.blobs
    owned = engine.owned_slots
    meta = {"version": 4, "shard": shard_name, "next_dense": len(pids),
            "schema": engine.schema.to_state(), "epoch": engine.epoch,
            "owned": None if owned is None else owned.serialize()}
    count = 0
    with SnapshotWriter.create(snap_dir, lsn, fsync) as writer:
        writer.write("meta", msgpack.packb(meta))
        if (engine.held or engine.forwards or engine.decided or engine.registry
                or engine.suppressed):
            writer.write("merges", msgpack.packb({"held": engine.held, "forwards":
                                                  engine.forwards, "decided": engine.decided,
                                                  "registry": engine.registry,
                                                  "suppressed": engine.suppressed}))
        if len(engine.segments):
            writer.write("segments", msgpack.packb(engine.segments.to_state(),
                                                   use_bin_type=True))
        claims = engine.claims.by_slot()  # unpacked a slot at a time, as they are written
        while chunk := list(islice(claims, CLAIM_SLOTS_CHUNK)):
            writer.write("claims", msgpack.packb(chunk))
        # Profiles as columns a chunk at a time (docs/log-format.md, "Snapshot sections"),
        # with what start-up would otherwise decode every blob for: slots, the identifier
        # directory and the merged-id aliases, so loading never takes a blob apart.
        live = np.frombuffer(engine.live.serialize(), dtype=np.uint8)  # keeps no view
        del live
        slots = np.frombuffer(engine.slots, dtype=np.uint16)
        dense_ids = np.array(engine.live.to_array(), dtype=np.uint32)
        for start in range(0, len(dense_ids), SNAPSHOT_CHUNK):
            part = dense_ids[start:start + SNAPSHOT_CHUNK]
            count += len(part)
            joined, lengths = blobs.joined(part)
            writer.write("rows", msgpack.packb(
                [part.astype("<u4").tobytes(), pids.take(part), joined,
                 lengths.astype("<u4").tobytes(), slots[part].astype("<u2").tobytes()],
                use_bin_type=True))
        del slots, dense_ids
        directory = engine.directory
        if directory.tombstones <= len(directory) // 8:  # the table as it is: copied back
            for start in range(0, directory.capacity if len(directory) else 0,
                               DIRECTORY_SLOTS_CHUNK):
                keys, owners = directory.slots(start, start + DIRECTORY_SLOTS_CHUNK)
                writer.write("directory-slots", msgpack.packb(
                    [directory.capacity, start, keys.astype("<u8").tobytes(),
                     owners.astype("<u4").tobytes()]))
        else:  # many entries deleted: the live ones, for a table built anew
            keys, owners = directory.arrays()
            for start in range(0, len(keys), DIRECTORY_CHUNK):
                writer.write("directory", msgpack.packb(
                    [keys[start:start + DIRECTORY_CHUNK].astype("<u8").tobytes(),
                     owners[start:start + DIRECTORY_CHUNK].astype("<u4").tobytes()]))
            del keys, owners
        aliases = iter(engine.aliases.items())
        while chunk_aliases := list(islice(aliases, DIRECTORY_CHUNK)):
            writer.write("aliases", msgpack.packb(chunk_aliases))
        created = np.frombuffer(engine.created, dtype=np.uint32)
        changed = np.frombuffer(engine.changed, dtype=np.uint32)
        for start in range(0, len(pids), TIMES_CHUNK):
            end = min(len(pids), start + TIMES_CHUNK)
            writer.write("times", msgpack.packb(
                [start, created[start:end].astype("<u4").tobytes(),
                 changed[start:end].astype("<u4").tobytes()]))
        for spec in engine.schema.by_id:
            if not spec.indexed:
                continue
            aid = spec.id
            if aid in engine.range_index:
                state = {"aid": aid, "kind": "range", "index": engine.range_index[aid].to_state()}
            elif aid in engine.day_index:
                state = {"aid": aid, "kind": "days", "index": engine.day_index[aid].to_state()}
            else:
                state = {"aid": aid, "kind": "value", "index": engine.value_index[aid].to_state(),
                         "exists": engine.exists[aid].serialize()}
            writer.write("index", msgpack.packb(state))
        path = writer.commit()
    return [str(path), count, pause]


def _new_engine(config: ShardConfig) -> Engine:
    return Engine(config.rules, config.clock, config.salt, event_days=config.event_days)


@gc_paused  # the engine's containers live on: a collection would find nothing to free
def _rebuild(config: ShardConfig, snap_dir: Path, log_dir: Path, info: dict[str, Any]
             ) -> tuple[Engine, int, int, LogScan]:
    """An engine filled from the newest good snapshot and the log after it, with the
    snapshot's log position, the end of the log replayed, and the log's scan. The snapshot
    is read once, checked as it is loaded: one found damaged part-way leaves its engine
    behind, and the next older one is loaded into a new engine."""
    loaded: list[Engine] = []

    def read(sections: Iterable[tuple[str, bytes]]) -> None:
        loaded[:] = [_new_engine(config)]  # each snapshot from nothing
        load_snapshot(loaded[0], sections)

    reader = read_newest(snap_dir, read)
    start_lsn = 0
    if reader is None:
        engine = _new_engine(config)
    else:
        engine = loaded[0]
        start_lsn = reader.lsn
        info["snapshot"] = str(reader.path)
    loaded.clear()
    scan = read_log(log_dir, start_lsn)
    end_lsn = start_lsn
    run = _LoadRun(engine)
    try:
        for record in read_ahead(scan):
            erasures = engine.erasures
            if record.rtype in wal_format.CHANGE_RECORDS:
                change = decode_change(record.payload)
                if not run.take(change):
                    run.finish()
                    _replay_change(engine, change)
            else:
                run.finish()
                replay(engine, record.rtype, record.payload)
            info["replayed"] += 1
            end_lsn = record.lsn_end
            if engine.erasures != erasures:
                info["erased_lsn"] = end_lsn
        run.finish()
    finally:
        run.close()  # (a recovery that failed: its engine is dropped, its thread stopped)
    return engine, start_lsn, end_lsn, scan


class _LoadRun:
    """Consecutive bulk loads' records held back during recovery and applied as one load
    (issue 29): what a load costs whatever its size (an identifier directory insert, an
    index update a distinct value, numpy calls a column) is paid once a run, not once a
    record. A record joins the run when it holds nothing but a load of new profiles at the
    next dense ids, its columns in the forms the run's have (engine.change.join_loads);
    each record's profiles keep its time (Load.stamps), and its blobs stay joined as
    logged (RECORD_COLUMNS). Consecutive runs enter their primary ids and identifier keys
    into the hash tables together (Engine.adding_loads). Any other record applies the run
    and enters those ids first (`finish`), so every record still applies in log order and
    the state is the one replaying each record gives (tests/test_replay_batched.py)."""

    LIMIT = 1 << 18  # profiles a run holds at most (what a run adds to recovery's memory)
    ONLY = frozenset({"at", "changed_at", "images", "image_columns", "load"})  # a joiner's keys

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.loads: list[Load] = []
        self.pids: list[str] = []
        self.blobs: list[tuple[bytes, np.ndarray]] = []  # each record's, joined
        self.times: list[int] = []  # each load's changed_at
        self.forms: dict[int, str] = {}
        self.adding: contextlib.ExitStack | None = None  # engine.adding_loads, while runs go

    def take(self, record: dict[str, Any]) -> bool:
        """Hold a decoded change record back in the run; False if it cannot join one."""
        if "load" not in record or not record.keys() <= self.ONLY:
            return False
        load = Load.from_state(record["load"])
        rows = _new_rows(record, load.first)
        if rows is None:
            return False
        forms = {aid: column_form(values) for aid, _, values in load.columns}
        if self.loads and (load.first != self.loads[0].first + len(self.pids)
                           or any(self.forms.get(aid, form) != form
                                  for aid, form in forms.items())):
            self.apply()
        if not self.loads and load.first != len(self.engine.blobs):
            return False  # not new profiles: the images say what to do
        if self.adding is None:  # consecutive runs enter their ids in the tables at once
            self.adding = contextlib.ExitStack()
            self.adding.enter_context(self.engine.adding_loads())
        self.loads.append(load)
        self.pids += rows[0]
        self.blobs.append(rows[1])
        self.times.append(_changed_at(record))
        self.forms.update(forms)
        if len(self.pids) >= self.LIMIT:
            self.apply()
        return True

    def apply(self) -> None:
        if not self.loads:
            return
        load = join_loads(self.loads)
        if len(set(self.times)) > 1:
            load.stamps = np.repeat(np.array(self.times, dtype=np.uint32),
                                    [len(loaded.slots) for loaded in self.loads])
        self.engine.add_loaded(load, self.pids, self.blobs, self.times[0])
        self.loads, self.pids, self.blobs, self.times, self.forms = [], [], [], [], {}

    def finish(self) -> None:
        """Apply what the run holds, and enter the ids of the runs since the last record
        that joined none into the hash tables (before any other record reads them)."""
        try:
            self.apply()
        finally:
            self.close()

    def close(self) -> None:
        """Leave engine.adding_loads (the ids held so far enter the tables)."""
        adding, self.adding = self.adding, None
        if adding is not None:
            adding.close()


def _new_rows(record: dict[str, Any], first: int
              ) -> tuple[list[str], tuple[bytes, np.ndarray]] | None:
    """A load record's primary ids and blobs (joined, with their lengths), or None if its
    images are not profiles at dense ids first, first + 1, ... (a load's, in order)."""
    if "images" in record:  # (a RECORD_CHANGE: a load's images are its new profiles)
        logged = record["images"]
        blobs = [blob for _, _, blob in logged]
        if None in blobs:
            return None
        return [pid for _, pid, _ in logged], join_blobs(blobs)
    columns = _image_columns(record["image_columns"])
    if (not isinstance(columns.dense, range)
            or columns.dense != range(first, first + len(columns.pids))
            or int(columns.lengths.min(initial=0)) < 0):
        return None
    return columns.pids, (columns.joined, columns.lengths)


# ---------------------------------------------------------------------- record payloads

def encode_images(images: Iterable[Image]) -> bytes:
    """[[dense, pid, blob], ...]; ormsgpack writes msgpack's bytes, faster."""
    return ormsgpack.packb(list(map(_LOGGED, images)))  # type: ignore[no-any-return]


_LOGGED = itemgetter(0, 1, 2)  # an Image's dense, pid and blob
_DENSE, _PID, _BLOB = itemgetter(0), itemgetter(1), itemgetter(2)


def decode_images(payload: bytes) -> list[Image]:
    return _images(msgpack.unpackb(payload, use_list=False))


def _images(logged: list[Any]) -> list[Image]:
    """Images of logged [dense, pid, blob] rows (a column at a time: a load logs
    thousands a record)."""
    if not logged:
        return []
    dense, pids, blobs = zip(*logged, strict=True)
    return list(map(tuple.__new__, repeat(Image), zip(dense, pids, blobs, repeat(None))))


_last_at = 0
# Wall-clock readings (a change's `at`, log segments' age), apart from the monotonic clock
# that schedules snapshots: tests drive that one alone.
_wall, _wall_ns = time.time, time.time_ns


def _now_micros() -> int:
    """The wall clock in microseconds, never going back within this process (a change's
    `at`: watchers order shards' changes by it)."""
    global _last_at
    _last_at = max(_last_at, _wall_ns() // 1000)
    return _last_at


IMAGE_COLUMNS_FROM = 256  # a change of this many images or more logs them as columns


def change_record(change: Change, touched: Touched, deltas: Deltas,
                  engine: Engine | None = None) -> tuple[int, bytes]:
    """The log record of a change, its type and payload: RECORD_COLUMNS for a change of
    IMAGE_COLUMNS_FROM images or more (loads, batches of tracks, big batches of upserts),
    else RECORD_CHANGE."""
    columns = len(change.images) >= IMAGE_COLUMNS_FROM
    return (wal_format.RECORD_COLUMNS if columns else wal_format.RECORD_CHANGE,
            encode_change(change, touched, deltas, engine, columns))


def encode_change(change: Change, touched: Touched, deltas: Deltas,
                  engine: Engine | None = None, columns: bool = False) -> bytes:
    """A RECORD_CHANGE payload (docs/log-format.md), or with `columns` a RECORD_COLUMNS
    one. `engine`: name the profiles of segment deltas that no image of the change
    carries (a timed refresh)."""
    record: dict[str, Any] = {"at": _now_micros(), "changed_at": change.at}
    if columns:
        record["image_columns"] = encode_image_columns(change.images)
    else:
        record["images"] = list(map(_LOGGED, change.images))
    if change.times:
        record["times"] = [[d, c, ch] for d, (c, ch) in change.times.items()]
    if change.schema:
        record["schema"] = [s.to_state() for s in change.schema]
    if change.notes:
        record["notes"] = [[n.table, n.key, n.value] for n in change.notes]
    if touched.diffs:  # {dense: ([set ids], [unset ids])}: a tuple packs as the array it
        record["diffs"] = touched.diffs  # would be as a list (a batch has thousands)
    if deltas:
        record["segments"] = encode_deltas(deltas)
        if engine is not None:
            imaged = {image.dense for image in change.images}
            record["pids"] = [[d, engine.pids[d]] for d in dict.fromkeys(members_of(deltas))
                              if d not in imaged]
    if change.quiet:
        record["quiet"] = True
    if change.erasure:
        record["erasure"] = True
    if change.load is not None:
        record["load"] = change.load.to_state()
    if change.tracked is not None:
        record["tracked"] = change.tracked.to_state()
    return ormsgpack.packb(record, option=ormsgpack.OPT_NON_STR_KEYS)  # type: ignore[no-any-return]


def decode_change(payload: bytes) -> dict[str, Any]:
    """A RECORD_CHANGE or RECORD_COLUMNS payload (images_of gives either's images);
    ormsgpack reads msgpack's bytes, ~30% faster (a load's record: 0.37 -> 0.26 ms)."""
    return ormsgpack.unpackb(payload,  # type: ignore[no-any-return]
                             option=ormsgpack.OPT_NON_STR_KEYS)


def encode_image_columns(images: list[Image]) -> list[Any]:
    """RECORD_COLUMNS's "image_columns": [dense ids, primary ids, blob lengths, blobs
    joined], the dense ids as [start, stop] where they are consecutive (a load's) and an
    array otherwise; a length of -1 for an image with no blob (a profile gone)."""
    if not images:
        return [[0, 0], [], raw_array(np.zeros(0, dtype=np.int32)), b""]
    ids = np.fromiter(map(_DENSE, images), dtype=np.int64, count=len(images))
    pids = list(map(_PID, images))
    blobs = list(map(_BLOB, images))
    try:
        joined, lengths = join_blobs(blobs)
    except TypeError:  # some images remove their profile
        lengths = np.array([-1 if blob is None else len(blob) for blob in blobs],
                           dtype=np.int64)
        joined = b"".join(blob for blob in blobs if blob is not None)
    first = int(ids[0])
    consecutive = bool((ids == np.arange(first, first + len(ids))).all())
    return [[first, first + len(ids)] if consecutive else raw_array(ids, narrow=True),
            pids, raw_array(lengths, narrow=True), joined]


def _image_columns(logged: list[Any]) -> ImageColumns:
    """encode_image_columns' columns back (ValueError if they do not add up)."""
    dense, pids, lengths, joined = logged
    ids = range(*dense) if isinstance(dense[0], int) else array_of(dense).astype(np.int64)
    sizes = array_of(lengths).astype(np.int64)
    if (not len(ids) == len(pids) == len(sizes) or int(sizes[sizes > 0].sum()) != len(joined)
            or int(sizes.min(initial=0)) < -1):
        raise ValueError(f"image columns of {len(ids)} dense ids, {len(pids)} primary ids, "
                         f"{len(sizes)} lengths and {len(joined)} blob bytes do not match")
    return ImageColumns(ids, pids, sizes, joined)


def named_in(record: dict[str, Any]) -> dict[int, str]:
    """dense id -> primary id of the images of a decoded change record (no blob read)."""
    if "images" in record:
        return {dense: pid for dense, pid, _ in record["images"]}
    columns = _image_columns(record["image_columns"])
    dense = columns.dense
    return dict(zip(dense if isinstance(dense, range) else dense.tolist(), columns.pids,
                    strict=True))


def images_of(record: dict[str, Any]) -> list[Image]:
    """The after-images of a decoded change record, in the order logged."""
    if "images" in record:
        return _images(record["images"])
    columns = _image_columns(record["image_columns"])
    joined, lengths, dense = columns.joined, columns.lengths, columns.dense
    ends = np.cumsum(np.maximum(lengths, 0)).tolist()
    blobs = [joined[end - size:end] if size >= 0 else None
             for end, size in zip(ends, lengths.tolist(), strict=True)]
    return list(map(tuple.__new__, repeat(Image), zip(
        dense if isinstance(dense, range) else dense.tolist(), columns.pids, blobs,
        repeat(None))))


def encode_merge(change: Change) -> bytes:
    return msgpack.packb({"images": [[i.dense, i.pid, i.blob] for i in change.images],
                          "notes": [[n.table, n.key, n.value] for n in change.notes]},
                         use_bin_type=True)


def encode_schema(specs: Iterable[AttributeSpec]) -> bytes:
    return msgpack.packb([s.to_state() for s in specs])


def encode_meta(epoch: int, slots: BitMap | None) -> bytes:
    return msgpack.packb([epoch, None if slots is None else slots.serialize()])


def replay(engine: Engine, rtype: int, payload: bytes) -> bool:
    """Apply one logged record, once: replay starts exactly where the snapshot ends (its
    LSN), and not every record is idempotent (a tracked batch's index columns are
    deltas). Returns whether it erased something (a profile, or a table entry naming a
    person), which the next snapshot must then leave no trace of on disk."""
    if rtype == wal_format.RECORD_PROFILES:
        images = decode_images(payload)
        engine.apply_images(images)
        return any(image.blob is None for image in images)
    elif rtype == wal_format.RECORD_SCHEMA:
        for state in msgpack.unpackb(payload):
            spec = AttributeSpec.from_state(state)
            if spec.id == len(engine.schema.by_id):
                engine.add_attribute(spec)
    elif rtype == wal_format.RECORD_MERGE:
        record = msgpack.unpackb(payload)
        change = Change(images=_images(record["images"]),
                        notes=[Note(t, k, v) for t, k, v in record["notes"]])
        engine.apply(change)
        return change.erases
    elif rtype in wal_format.CHANGE_RECORDS:
        return _replay_change(engine, decode_change(payload))
    elif rtype == wal_format.RECORD_SHARD_META:
        epoch, slots = msgpack.unpackb(payload)
        engine.set_ownership(epoch, None if slots is None else BitMap.deserialize(slots))
    else:
        raise ValueError(f"unknown log record type {rtype}")
    return False


def _replay_change(engine: Engine, record: dict[str, Any]) -> bool:
    """replay() of a decoded RECORD_CHANGE or RECORD_COLUMNS."""
    change = Change(schema=[AttributeSpec.from_state(s) for s in record.get("schema", ())],
                    notes=[Note(t, k, v) for t, k, v in record.get("notes", ())],
                    at=_changed_at(record),
                    times={d: (c, ch) for d, c, ch in record.get("times", ())},
                    load=Load.from_state(record["load"]) if "load" in record else None,
                    tracked=Tracked.from_state(record["tracked"]) if "tracked" in record
                    else None, erasure=bool(record.get("erasure")))
    if (change.tracked is None or "image_columns" not in record
            or not engine.replay_tracked(change, _image_columns(record["image_columns"]))):
        change.images = images_of(record)
        engine.apply(change, undo=False)
    if "segments" in record:
        engine.segments.apply(decode_deltas(record["segments"]))
    return change.erases


def _changed_at(record: dict[str, Any]) -> int:
    """A RECORD_CHANGE's time of change, unix seconds (`at` is in microseconds)."""
    return record.get("changed_at", record["at"] // 1_000_000)  # type: ignore[no-any-return]


def load_snapshot(engine: Engine, sections: Iterable[tuple[str, bytes]]) -> None:
    """Fill an empty engine from snapshot sections (see snapshot writer above)."""
    owned: BitMap | None = None
    epoch = 0
    directory: tuple[list[int], list[int]] = ([], [])  # from `profiles` (older snapshots)
    keys: list[np.ndarray] = []  # from `directory` sections
    owners: list[np.ndarray] = []
    slotted: IntTable | None = None  # from `directory-slots` sections
    with contextlib.ExitStack() as stack:  # ids enter the id index once, at the end
        for name, payload in sections:
            if name == "meta":
                meta = msgpack.unpackb(payload)
                engine.schema = Schema.from_state(meta["schema"])
                next_dense = meta["next_dense"]
                engine.pids = PidTable(next_dense)
                stack.enter_context(engine.pids.loading())
                engine.blobs = BlobTable(next_dense)
                engine.slots = array.array("H", bytes(next_dense * engine.slots.itemsize))
                engine.created = array.array("I", bytes(next_dense * 4))  # no times section:
                engine.changed = array.array("I", bytes(next_dense * 4))  # not known (0)
                epoch = meta["epoch"]
                owned = None if meta["owned"] is None else BitMap.deserialize(meta["owned"])
            elif name == "rows":
                _load_rows(engine, *msgpack.unpackb(payload))
            elif name == "directory-slots":
                capacity, start, raw_keys, raw_owners = msgpack.unpackb(payload)
                if slotted is None:
                    slotted = IntTable.of_capacity(capacity)
                elif capacity != slotted.capacity:
                    raise ValueError(f"directory-slots of tables of {slotted.capacity} and "
                                     f"{capacity} slots in one snapshot")
                slotted.put_slots(start, np.frombuffer(raw_keys, dtype="<u8"),
                                np.frombuffer(raw_owners, dtype="<u4"))
            elif name == "directory":
                raw_keys, raw_owners = msgpack.unpackb(payload)
                keys.append(np.frombuffer(raw_keys, dtype="<u8").astype(np.uint64))
                owners.append(np.frombuffer(raw_owners, dtype="<u4").astype(np.uint32))
            elif name == "aliases":
                engine.aliases.update(msgpack.unpackb(payload))
            elif name == "profiles":  # snapshots before `rows`: each blob decoded
                _load_profiles(engine, msgpack.unpackb(payload, use_list=False), directory)
            elif name == "merges":
                tables = msgpack.unpackb(payload)
                engine.held, engine.forwards, engine.decided = (
                    tables["held"], tables["forwards"], tables["decided"])
                engine.registry = tables.get("registry", {})  # older snapshots have none
                engine.suppressed = tables.get("suppressed", {})
            elif name == "times":
                start, created, changed = msgpack.unpackb(payload)
                for column, raw in ((engine.created, created), (engine.changed, changed)):
                    chunk = array.array("I")
                    chunk.frombytes(raw)
                    if sys.byteorder == "big":
                        chunk.byteswap()
                    column[start:start + len(chunk)] = chunk
            elif name == "segments":
                engine.segments.load_state(msgpack.unpackb(payload, strict_map_key=False))
            elif name == "claims":
                for slot, table in msgpack.unpackb(payload, strict_map_key=False):
                    engine.claims.load(slot, table)
            elif name == "index":
                state = msgpack.unpackb(payload, strict_map_key=False)
                aid = state["aid"]
                if state["kind"] == "value":
                    engine.value_index[aid] = ValueIndex.from_state(state["index"])
                    engine.exists[aid] = BitMap.deserialize(state["exists"])
                elif state["kind"] == "days":
                    engine.day_index[aid] = DayIndex.from_state(state["index"])
                elif state["kind"] == "range":
                    engine.range_index[aid] = RangeIndex.from_state(state["index"])
                else:
                    raise ValueError(f"unknown index kind {state['kind']!r} in a snapshot")
            else:
                raise ValueError(f"unknown snapshot section {name!r}")
    for spec in engine.schema.by_id:  # attributes declared but never indexed yet
        if spec.indexed:
            if spec.kind.name in ("INT", "FLOAT", "TIMESTAMP"):
                engine.range_index.setdefault(spec.id, RangeIndex())
            elif spec.kind.name == "EVENT_DAYS":
                engine.day_index.setdefault(spec.id, DayIndex())
            else:
                engine.value_index.setdefault(spec.id, ValueIndex())
                engine.exists.setdefault(spec.id, BitMap())
    if slotted is not None:
        engine.directory = slotted
    if keys:  # a snapshot's table: distinct keys, so no duplicate check
        engine.directory.insert_absent(np.concatenate(keys), np.concatenate(owners))
    engine.directory.update(np.array(directory[0], dtype=np.uint64),
                            np.array(directory[1], dtype=np.uint32))
    engine.set_ownership(epoch, owned)
    engine.held_dense = BitMap(engine.dense_of[pid] for pid in engine.held)


def _load_rows(engine: Engine, raw_dense: bytes, pids: list[str], *rest: Any) -> None:
    """Fill the engine from one `rows` section: no blob is decoded, no id hashed. Its
    blobs are joined with their lengths apart (version 3), or a list (version 2)."""
    dense = np.frombuffer(raw_dense, dtype="<u4").astype(np.uint32)
    if not len(dense):
        return
    first, last = int(dense[0]), int(dense[-1])
    # A run of dense ids: no check that they are distinct.
    ids: Iterable[int] = range(first, last + 1) if last - first + 1 == len(dense) \
        else dense.tolist()
    if len(rest) == 3:
        joined, raw_lengths, raw_slots = rest
        engine.blobs.put_joined(ids, joined, np.frombuffer(raw_lengths, dtype="<u4"))
    else:
        blobs, raw_slots = rest
        engine.blobs.put_many(ids, blobs)
    engine.pids.put_many(ids, pids)
    engine.live |= bitmap_of(dense)
    np.frombuffer(engine.slots, dtype=np.uint16)[dense] = np.frombuffer(raw_slots, dtype="<u2")


def _load_profiles(engine: Engine, rows: Iterable[tuple[int, str, bytes]],
                   directory: tuple[list[int], list[int]]) -> None:
    """Fill the engine from one `profiles` section; identifier keys and dense ids go to
    `directory`, for one vectorized build of the table at the end."""
    pids, blobs = engine.pids, engine.blobs
    aliases, slots = engine.aliases, engine.slots
    keys, owners = directory
    live: list[int] = []
    for dense, pid, blob in rows:
        pids[dense] = pid
        blobs[dense] = blob
        live.append(dense)
        slots[dense] = slot_of(pid)
        _, _, idents, merged = decode(blob)
        for kind, value in idents:
            keys.append(ident_key(kind, value))
            owners.append(dense)
        for m in merged:
            aliases[m] = pid
    engine.live.update(live)
