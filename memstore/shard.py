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
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import ormsgpack
from pyroaring import BitMap

from memstore.engine.core import (
    DEFAULT_EVENT_DAYS,
    Change,
    Engine,
    IdentityRules,
    Image,
    Note,
    Undo,
    decode,
    ident_key,
)
from memstore.engine.schema import AttributeSpec, Schema
from memstore.engine.tracking import stale_days
from memstore.errors import Unavailable
from memstore.hashslot import slot_of
from memstore.index.bitmap_index import RangeIndex, ValueIndex
from memstore.index.day_index import DayIndex
from memstore.storage import wal_format
from memstore.storage.dirlock import DirLock
from memstore.storage.forked import ChildFailed, run_in_child
from memstore.storage.snapshot_file import SnapshotWriter, load_newest, prune
from memstore.storage.wal_reader import read_log, truncate_torn_tail
from memstore.storage.wal_writer import LogFailedError, LogWriteError, LogWriter, SyncPolicy

log = logging.getLogger("memstore.shard")

SNAPSHOT_CHUNK = 2000  # profiles per snapshot section
TIMES_CHUNK = 1 << 16  # dense ids per `times` section
CLAIM_SLOTS_CHUNK = 64  # slots of directory claims per snapshot section
RECENT_CHANGES = 500_000  # profile ids remembered for slot-move catch-up (~40 MB at most)
EXPIRY_CHECK = 10.0  # seconds between checks for day records past the retention


class RecentChanges:
    """Which profiles changed after a position: the catch-up rounds of a slot move ask
    "what changed in these slots since my last copy?" instead of copying them all again.

    Holds the primary ids of the newest `limit` changed profiles with the position of their
    change. `since(p)` answers for any p >= `floor`; older positions are forgotten (the
    caller copies in full instead), and so is everything before a restart: positions are
    log positions, which survive a restart, but this memory does not.
    """

    def __init__(self, floor: int, limit: int = RECENT_CHANGES) -> None:
        self.floor = floor  # every change after this position is remembered
        self.limit = limit
        self._entries: deque[tuple[int, list[str]]] = deque()
        self._size = 0

    def record(self, position: int, pids: list[str]) -> None:
        self._entries.append((position, pids))
        self._size += len(pids)
        while self._size > self.limit and len(self._entries) > 1:
            old_position, old = self._entries.popleft()
            self._size -= len(old)
            self.floor = old_position

    def since(self, position: int) -> set[str] | None:
        """Ids changed after `position`, or None if that is older than what is remembered."""
        if position < self.floor:
            return None
        out: set[str] = set()
        for at, pids in reversed(self._entries):
            if at <= position:
                break
            out.update(pids)
        return out


@dataclass
class ShardConfig:
    """Settings of one shard. See README "Configuration" for the trade-offs."""

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


class Shard:
    def __init__(self, config: ShardConfig, engine: Engine, writer: LogWriter | None,
                 lock: DirLock | None = None) -> None:
        self.config = config
        self.engine = engine
        self.log = writer
        self.lock = lock  # this process owns the data directory (memstore.storage.dirlock)
        self._pending: list[tuple[int, Undo]] = []
        self._snapshot_lock = asyncio.Lock()
        self._last_snapshot = time.monotonic()
        self._log_bytes_at_snapshot = writer.size_bytes if writer else 0
        self._auto_task: asyncio.Task[None] | None = None
        self._expiry_task: asyncio.Task[None] | None = None
        self.recovery: dict[str, Any] = {}
        # Log position of the newest snapshot; the older kept snapshot needs the log from
        # its own position on, so segments are deleted only before that one.
        self._snapshot_lsn = 0
        self._erased = False  # a profile was deleted or merged away since the last snapshot
        # Changes are numbered by log position; a memory-only shard counts them instead.
        self._counter = 0
        self.recent = RecentChanges(self.position)

    @property
    def position(self) -> int:
        """Position of the newest applied change: its log position, or a count in memory."""
        return self.log.end_lsn if self.log is not None else self._counter

    # ------------------------------------------------------------------ life cycle
    @classmethod
    async def open(cls, config: ShardConfig) -> Shard:
        engine = Engine(config.rules, config.clock, config.salt, event_days=config.event_days)
        if config.data_dir is None:
            return cls(config, engine, None)
        started = time.monotonic()
        data = Path(config.data_dir)
        lock = DirLock.acquire(data, config.lock_wait)  # before reading anything
        try:
            return await cls._recover(config, engine, data, lock, started)
        except BaseException:
            lock.release()
            raise

    @classmethod
    async def _recover(cls, config: ShardConfig, engine: Engine, data: Path, lock: DirLock,
                       started: float) -> Shard:
        """Load the newest good snapshot, replay the log after it, open the writer."""
        snap_dir, log_dir = data / "snapshots", data / "log"
        info: dict[str, Any] = {"snapshot": None, "replayed": 0, "torn_bytes": 0}
        start_lsn = 0
        reader = load_newest(snap_dir)
        if reader is not None:
            load_snapshot(engine, reader.sections())
            start_lsn = reader.lsn
            info["snapshot"] = str(reader.path)
        scan = read_log(log_dir, start_lsn)
        end_lsn = start_lsn
        for record in scan:
            replay(engine, record.rtype, record.payload)
            info["replayed"] += 1
            end_lsn = record.lsn_end
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
        shard._snapshot_lsn = start_lsn
        # Replayed records may hold deletions the previous run never snapshotted; assume
        # they do, so the next snapshot still erases them from disk.
        shard._erased = info["replayed"] > 0
        return shard

    def start_background(self) -> None:
        loop = asyncio.get_running_loop()
        if self.log is not None and self._auto_task is None:
            self._auto_task = loop.create_task(self._auto_snapshot())
        if self._expiry_task is None:
            self._expiry_task = loop.create_task(self._expire_days())

    async def close(self) -> None:
        for task in (self._auto_task, self._expiry_task):
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
        if not change.at:
            change.at = int(self.engine.clock())  # logged: replay stamps the same times
        if self.log is None:
            self.engine.apply(change)
            self._counter += 1
            self.recent.record(self._counter, change.touched())
            return change.result
        if self.log.failed:
            raise Unavailable(self.writable_error or "log failed")
        try:
            if change.schema:
                self.log.append(wal_format.RECORD_SCHEMA, encode_schema(change.schema))
            lsn = self.log.append(wal_format.RECORD_CHANGE, encode_change(change))
        except (LogWriteError, LogFailedError, OSError) as exc:
            raise Unavailable(f"write not persisted: {exc}") from None
        before = self.engine.apply(change)
        self._pending.append((lsn, before))
        self.recent.record(lsn, change.touched())
        if not self._erased and change.load is None and change.erases:  # a load only adds
            self._erased = True
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
        return change.result

    def _rollback(self) -> None:
        """Undo every applied change that is not durable, newest first."""
        while self._pending:
            _, before = self._pending.pop()
            self.engine.undo(before)

    async def set_ownership(self, epoch: int, slots: BitMap | None) -> None:
        if self.log is not None:
            if self.log.failed:
                raise Unavailable(self.writable_error or "log failed")
            lsn = self.log.append(wal_format.RECORD_SHARD_META, encode_meta(epoch, slots))
            await self.log.sync_to(lsn)
        self.engine.set_ownership(epoch, slots)

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
        # Point in time: everything applied so far, at log position `lsn`. Waiting for
        # durability first means the snapshot never holds a change the log could lose.
        lsn = self.log.end_lsn
        await self.log.sync_to(lsn)
        if self.log.end_lsn != lsn:  # writes arrived while we waited; take the newer point
            lsn = self.log.end_lsn
            await self.log.sync_to(lsn)
        started = time.monotonic()
        erased, self._erased = self._erased, False  # deletions after this point: next time
        self.log.rotate()
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
        # if the newest is ever damaged -- unless something was erased since: then erasure
        # wins and only the newest snapshot (and no log before it) stays on disk.
        keep_from = lsn if erased else self._snapshot_lsn
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
    meta = {"version": 1, "shard": shard_name, "next_dense": len(pids),
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
        claims = engine.claims.by_slot()  # unpacked a slot at a time, as they are written
        while chunk := list(islice(claims, CLAIM_SLOTS_CHUNK)):
            writer.write("claims", msgpack.packb(chunk))
        # Rows are packed one field at a time, never built as lists: cheaper, and every
        # object made here would be a page copied from the parent.
        packer = msgpack.Packer(use_bin_type=True, autoreset=False)
        for start in range(0, len(pids), SNAPSHOT_CHUNK):
            live = [d for d in range(start, min(len(pids), start + SNAPSHOT_CHUNK))
                    if blobs[d] is not None]
            count += len(live)
            packer.reset()
            packer.pack_array_header(len(live))
            for d in live:
                packer.pack_array_header(3)
                packer.pack(d)
                packer.pack(pids[d])
                packer.pack(blobs[d])
            writer.write("profiles", packer.bytes())
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


# ---------------------------------------------------------------------- record payloads

def encode_images(images: Iterable[Image]) -> bytes:
    """[[dense, pid, blob], ...]; ormsgpack writes msgpack's bytes, faster."""
    return ormsgpack.packb(list(map(_LOGGED, images)))  # type: ignore[no-any-return]


_LOGGED = itemgetter(0, 1, 2)  # an Image's dense, pid and blob


def decode_images(payload: bytes) -> list[Image]:
    return [Image(d, p, b) for d, p, b in msgpack.unpackb(payload, use_list=False)]


def encode_merge(change: Change) -> bytes:
    return msgpack.packb({"images": [[i.dense, i.pid, i.blob] for i in change.images],
                          "notes": [[n.table, n.key, n.value] for n in change.notes]},
                         use_bin_type=True)


def encode_change(change: Change) -> bytes:
    """RECORD_CHANGE: {"at", "images", and where there are any "notes", "times"}."""
    record: dict[str, Any] = {"at": change.at, "images": list(map(_LOGGED, change.images))}
    if change.notes:
        record["notes"] = [[n.table, n.key, n.value] for n in change.notes]
    if change.times:
        record["times"] = [[d, c, ch] for d, (c, ch) in change.times.items()]
    return ormsgpack.packb(record)  # type: ignore[no-any-return]


def encode_schema(specs: Iterable[AttributeSpec]) -> bytes:
    return msgpack.packb([s.to_state() for s in specs])


def encode_meta(epoch: int, slots: BitMap | None) -> bytes:
    return msgpack.packb([epoch, None if slots is None else slots.serialize()])


def replay(engine: Engine, rtype: int, payload: bytes) -> None:
    """Apply one logged record; idempotent, so replaying over a snapshot is safe."""
    if rtype == wal_format.RECORD_PROFILES:
        engine.apply_images(decode_images(payload))
    elif rtype == wal_format.RECORD_SCHEMA:
        for state in msgpack.unpackb(payload):
            spec = AttributeSpec.from_state(state)
            if spec.id == len(engine.schema.by_id):
                engine.add_attribute(spec)
    elif rtype == wal_format.RECORD_MERGE:
        record = msgpack.unpackb(payload)
        engine.apply(Change(images=[Image(d, p, b) for d, p, b in record["images"]],
                            notes=[Note(t, k, v) for t, k, v in record["notes"]]))
    elif rtype == wal_format.RECORD_CHANGE:
        record = msgpack.unpackb(payload, strict_map_key=False)
        notes = record.get("notes")
        if notes:
            engine.apply_notes([Note(t, k, v) for t, k, v in notes])
        engine.apply_images([Image(d, p, b) for d, p, b in record["images"]], record["at"],
                            {d: (c, ch) for d, c, ch in record.get("times", ())})
    elif rtype == wal_format.RECORD_SHARD_META:
        epoch, slots = msgpack.unpackb(payload)
        engine.set_ownership(epoch, None if slots is None else BitMap.deserialize(slots))
    else:
        raise ValueError(f"unknown log record type {rtype}")


def load_snapshot(engine: Engine, sections: Iterable[tuple[str, bytes]]) -> None:
    """Fill an empty engine from snapshot sections (see snapshot writer above)."""
    owned: BitMap | None = None
    epoch = 0
    directory: tuple[list[int], list[int]] = ([], [])
    for name, payload in sections:
        if name == "meta":
            meta = msgpack.unpackb(payload)
            engine.schema = Schema.from_state(meta["schema"])
            next_dense = meta["next_dense"]
            engine.pids = [None] * next_dense
            engine.blobs = [None] * next_dense
            engine.slots = array.array("H", bytes(next_dense * engine.slots.itemsize))
            engine.created = array.array("I", bytes(next_dense * 4))  # no times section:
            engine.changed = array.array("I", bytes(next_dense * 4))  # not known (0)
            epoch = meta["epoch"]
            owned = None if meta["owned"] is None else BitMap.deserialize(meta["owned"])
        elif name == "profiles":
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
    engine.directory.update(np.array(directory[0], dtype=np.uint64),
                            np.array(directory[1], dtype=np.uint32))
    engine.set_ownership(epoch, owned)
    engine.held_dense = BitMap(engine.dense_of[pid] for pid in engine.held)


def _load_profiles(engine: Engine, rows: Iterable[tuple[int, str, bytes]],
                   directory: tuple[list[int], list[int]]) -> None:
    """Fill the engine from one `profiles` section; identifier keys and dense ids go to
    `directory`, for one vectorized build of the table at the end."""
    pids, blobs, dense_of = engine.pids, engine.blobs, engine.dense_of
    aliases, slots = engine.aliases, engine.slots
    keys, owners = directory
    live: list[int] = []
    for dense, pid, blob in rows:
        pids[dense] = pid
        blobs[dense] = blob
        dense_of[pid] = dense
        live.append(dense)
        slots[dense] = slot_of(pid)
        _, _, idents, merged = decode(blob)
        for kind, value in idents:
            keys.append(ident_key(kind, value))
            owners.append(dense)
        for m in merged:
            aliases[m] = pid
    engine.live.update(live)
