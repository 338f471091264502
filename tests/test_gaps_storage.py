"""Durability promises no crash test can see: what an fsync covers, the order of renames
and directory syncs, and that erased data leaves the disk.

A SIGKILL keeps the page cache, so a record acknowledged before its fsync, or a rename whose
directory was never synced, survives every process crash; only power loss shows it. These
tests watch the syncs themselves instead: a blocking fsync injected into the log writer,
and an fsync spy that records which file each synced descriptor refers to.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from memstore.engine.change import ADD_TO_SET, SET, UpsertSpec
from memstore.shard import Shard, ShardConfig
from memstore.storage import wal_format as fmt
from memstore.storage.snapshot_file import CURRENT, SnapshotWriter, load_newest, snapshot_name
from memstore.storage.wal_reader import read_log
from memstore.storage.wal_writer import LogWriter

P = fmt.RECORD_PROFILES


class GatedFsync:
    """os.fsync that counts its calls and, once `hold()` was called, blocks its next call
    (on the writer's fsync thread) until `release()`."""

    def __init__(self) -> None:
        self.calls = 0
        self._armed = False
        self.entered = threading.Event()
        self._released = threading.Event()

    def hold(self) -> None:
        self._armed = True

    def release(self) -> None:
        self._released.set()

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self._armed:
            self._armed = False
            self.entered.set()
            assert self._released.wait(30), "the test never released the fsync"
        os.fsync(fd)


def test_group_commit_acknowledges_only_what_its_fsync_covered(tmp_path: Path) -> None:
    """A record appended while an fsync runs is not covered by it: durable_lsn must stay
    below it until an fsync that started after it returns."""
    fsync = GatedFsync()

    async def go() -> None:
        w = LogWriter.open(tmp_path, fsync=fsync)
        a = w.append(P, b"A")
        fsync.hold()
        first = asyncio.create_task(w.sync_to(a))
        assert await asyncio.to_thread(fsync.entered.wait, 30)  # the fsync for A runs
        b = w.append(P, b"B")  # written to the OS while that fsync runs
        calls = fsync.calls
        fsync.release()
        await first
        assert w.durable_lsn == a < b, "B was reported durable by an fsync that began before it"
        assert fsync.calls == calls
        await w.sync_to(b)
        assert fsync.calls == calls + 1 and w.durable_lsn == b
        await w.close()

    asyncio.run(go())
    assert [r.payload for r in read_log(tmp_path)] == [b"A", b"B"]


def test_a_waiter_during_an_fsync_is_answered_only_after_the_next_one(tmp_path: Path) -> None:
    """Group commit from the waiter's side: B's sync_to waits on the fsync in flight, then
    must start (and wait for) one of its own."""
    fsync = GatedFsync()

    async def go() -> None:
        w = LogWriter.open(tmp_path, fsync=fsync)
        a = w.append(P, b"A")
        fsync.hold()
        first = asyncio.create_task(w.sync_to(a))
        assert await asyncio.to_thread(fsync.entered.wait, 30)
        b = w.append(P, b"B")
        calls = fsync.calls
        second = asyncio.create_task(w.sync_to(b))
        await asyncio.sleep(0)  # B's waiter now shares the fsync in flight
        assert not second.done()
        fsync.release()
        await asyncio.gather(first, second)
        assert fsync.calls > calls, "B's sync_to returned without an fsync begun after B"
        assert w.durable_lsn == b
        await w.close()

    asyncio.run(go())


class SyncOrder:
    """An fsync spy and an os.replace wrapper writing one list of events in order:
    ("fsync", path the descriptor refers to) and ("rename", source name, target name)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, ...]] = []
        real_replace = os.replace

        def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            self.events.append(("rename", Path(src).name, Path(dst).name))
            real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)

    def fsync(self, fd: int) -> None:
        self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        os.fsync(fd)

    def index(self, event: tuple[str, ...]) -> int:
        assert event in self.events, f"{event} never happened: {self.events}"
        return self.events.index(event)


def test_snapshot_commit_syncs_the_directory_after_each_rename(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Write, fsync, rename, fsync the directory: for the snapshot file, and then the same
    for CURRENT. Without the directory fsync a power loss can undo the rename, and CURRENT
    may be durable while the snapshot it names is not."""
    order = SyncOrder(monkeypatch)
    snaps = (tmp_path / "snapshots").resolve()
    with SnapshotWriter.create(snaps, 77, fsync=order.fsync) as writer:
        writer.write("meta", b"payload")
        path = writer.commit()
    tmp, final = f"snap-{77:020d}.tmp", snapshot_name(77)
    assert path == snaps / final
    directory = ("fsync", str(snaps))
    renamed = order.index(("rename", tmp, final))
    pointed = order.index(("rename", f"{CURRENT}.tmp", CURRENT))
    assert order.index(("fsync", str(snaps / tmp))) < renamed  # the data, before its name
    assert directory in order.events[renamed + 1:pointed], \
        f"no directory fsync between the snapshot's rename and CURRENT's: {order.events}"
    assert order.index(("fsync", str(snaps / f"{CURRENT}.tmp"))) < pointed
    assert directory in order.events[pointed + 1:], \
        f"no directory fsync after CURRENT's rename: {order.events}"
    reader = load_newest(snaps)
    assert reader is not None and reader.path == path


async def _open(data: Path) -> Shard:
    return await Shard.open(ShardConfig(data_dir=data))


def test_erasure_after_the_previous_snapshot_leaves_no_byte_on_disk(tmp_path: Path) -> None:
    """A profile written and deleted after snapshot 1: snapshot 2 must remove the log
    segment holding it, though the usual rule keeps the log from the previous snapshot on
    (so start-up can fall back to it)."""
    data = tmp_path / "data"
    marker = "MARKER-5d1e-after-snapshot"
    victim = f"victim-{marker}"
    needles = [victim, f"{marker}-mail@x.io", f"{marker}-device", f"{marker}-note",
               f"{marker}-tag"]

    async def scenario() -> None:
        shard = await _open(data)
        engine = shard.engine
        for i in range(20):
            await shard.commit(engine.plan_upsert(UpsertSpec(f"keep{i}", [(SET, "x", i)])))
        await shard.snapshot()  # snapshot 1: the victim does not exist yet
        await shard.commit(engine.plan_upsert(UpsertSpec(
            victim, [(SET, "note", f"{marker}-note"), (ADD_TO_SET, "tags", [f"{marker}-tag"])],
            identifiers=[("email", f"{marker}-mail@x.io"), ("device", f"{marker}-device")])))
        await shard.commit(engine.plan_upsert(UpsertSpec(victim, [(SET, "x", 1)])))
        await shard.commit(engine.plan_delete(victim))
        await shard.snapshot()  # snapshot 2: erasure wins over keeping a fallback
        await shard.close()

    asyncio.run(scenario())
    files = [p for p in data.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".log") for p in files)
    for path in files:
        raw = path.read_bytes()
        for needle in needles:
            assert needle.encode() not in raw, f"erased {needle!r} still in {path}"

    async def reopen() -> tuple[bool, int]:
        shard = await _open(data)
        gone, count = shard.engine.lookup(victim) is None, len(shard.engine)
        await shard.close()
        return gone, count

    assert asyncio.run(reopen()) == (True, 20)
