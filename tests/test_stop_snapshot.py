"""A clean stop snapshots first, so the next start replays nothing; a stop whose snapshot
fails or takes too long still stops, loses nothing and says so (issue 29)."""

from __future__ import annotations

import errno
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from memstore import Client
from memstore.storage.snapshot_file import load_newest
from memstore.storage.wal_reader import read_log
from tests.conftest import start_shard
from tests.test_durability import open_shard, random_writes, run, state_of


def records_after_newest_snapshot(data: Path) -> int:
    newest = load_newest(data / "snapshots")
    start = 0 if newest is None else newest.lsn
    return sum(1 for _ in read_log(data / "log", start))


def test_a_clean_stop_leaves_a_snapshot_and_nothing_to_replay(tmp_path: Path) -> None:
    data = tmp_path / "data"

    async def scenario() -> None:
        shard = await open_shard(data)
        await random_writes(shard, random.Random(3), 200)
        expected = state_of(shard)
        assert records_after_newest_snapshot(data) > 0
        outcome = await shard.snapshot_before_stop()
        assert outcome.startswith("written at lsn")
        await shard.close()
        assert records_after_newest_snapshot(data) == 0
        again = await open_shard(data)
        assert state_of(again) == expected
        assert again.recovery["snapshot"] is not None and again.recovery["replayed"] == 0
        # Nothing new since: the stop writes no second snapshot.
        assert (await again.snapshot_before_stop()).startswith("not needed")
        await again.close()
        assert len(list((data / "snapshots").glob("snap-*.snap"))) == 1

    run(scenario())


def test_the_stop_snapshot_can_be_turned_off(tmp_path: Path) -> None:
    async def scenario() -> None:
        shard = await open_shard(tmp_path / "data", stop_snapshot_timeout=0)
        await random_writes(shard, random.Random(4), 50)
        assert await shard.snapshot_before_stop() == "off"
        await shard.close()
        assert not list((tmp_path / "data" / "snapshots").glob("snap-*.snap"))

    run(scenario())


def _fails_on_snapshot_files(kind: str) -> Any:
    """An fsync that fails (disk full) or hangs, for files under snapshots/ only: the log
    keeps syncing normally. It runs in the snapshot's forked child too."""
    def fsync(fd: int) -> None:
        if "/snapshots" in os.readlink(f"/proc/self/fd/{fd}"):
            if kind == "full":
                raise OSError(errno.ENOSPC, "No space left on device")
            time.sleep(60)
        os.fsync(fd)
    return fsync


@pytest.mark.parametrize("kind", ["full", "slow"])
def test_a_stop_whose_snapshot_fails_or_is_too_slow_still_stops_and_loses_nothing(
        tmp_path: Path, kind: str) -> None:
    data = tmp_path / "data"

    async def scenario() -> None:
        shard = await open_shard(data, fsync=_fails_on_snapshot_files(kind),
                                 stop_snapshot_timeout=1.0)
        await random_writes(shard, random.Random(5), 200)
        expected = state_of(shard)
        started = time.monotonic()
        outcome = await shard.snapshot_before_stop()
        assert time.monotonic() - started < 10  # the hung child was killed, not awaited
        if kind == "full":
            assert outcome.startswith("failed (") and "No space left" in outcome
        else:
            assert outcome.startswith("gave up after 1 s")
        assert "replays the log, which holds every acknowledged write" in outcome
        await shard.close()
        assert not list((data / "snapshots").glob("snap-*.snap"))
        again = await open_shard(data)
        assert state_of(again) == expected
        assert again.recovery["replayed"] > 0
        await again.close()

    run(scenario())


def test_sigterm_snapshots_a_served_shard_before_it_exits(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_shard(data)
    try:
        with Client(server.address) as client:
            for i in range(50):
                client.upsert(f"p{i}", {"n": i})
        assert records_after_newest_snapshot(data) > 0
    finally:
        assert server.stop(signal.SIGTERM) == 0
    assert records_after_newest_snapshot(data) == 0
    again = start_shard(data)
    try:
        with Client(again.address) as client:
            assert client.count("n >= 0") == 50 and client.get("p49")["attributes"]["n"] == 49
    finally:
        again.stop()

