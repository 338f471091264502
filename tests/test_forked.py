"""memstore.storage.forked: work in a forked child, as the snapshot writer uses it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memstore.storage.forked import ChildFailed, run_in_child
from tests.conftest import ROOT


def _alive(pid: int) -> bool:
    """Running (a zombie whose dead parent nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_the_child_sees_memory_as_it_was_at_the_fork() -> None:
    state = {"n": 1}

    async def scenario() -> list[int]:
        child = asyncio.ensure_future(run_in_child(lambda: [state["n"], os.getpid()]))
        await asyncio.sleep(0)  # forked by now: later changes are the parent's alone
        state["n"] = 2
        return await child  # type: ignore[no-any-return]

    seen, pid = asyncio.run(scenario())
    assert seen == 1 and state["n"] == 2 and pid != os.getpid()


def test_a_failing_or_dying_child_is_reported() -> None:
    def boom() -> None:
        raise ValueError("no space for the snapshot")

    with pytest.raises(ChildFailed, match="ValueError: no space for the snapshot"):
        asyncio.run(run_in_child(boom))
    with pytest.raises(ChildFailed, match="killed by signal 9"):
        asyncio.run(run_in_child(lambda: os.kill(os.getpid(), signal.SIGKILL)))


def test_cancelling_the_wait_kills_the_child(tmp_path: Path) -> None:
    marker = tmp_path / "pid"

    def slow() -> None:
        marker.write_text(str(os.getpid()))
        time.sleep(60)

    async def scenario() -> None:
        task = asyncio.ensure_future(run_in_child(slow))
        while not marker.exists() or not marker.read_text():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert not _alive(int(marker.read_text()))


def test_the_child_dies_with_its_parent(tmp_path: Path) -> None:
    """SIGKILL the parent mid-work: the child must not live on (and, say, publish a
    snapshot under a shard that restarted meanwhile)."""
    marker = tmp_path / "pid"
    script = f"""
import asyncio, os, time
from memstore.storage.forked import run_in_child
def slow():
    open({str(marker)!r}, "w").write(str(os.getpid()))
    time.sleep(60)
asyncio.run(run_in_child(slow))
"""
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() or not marker.read_text():
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.02)
        child = int(marker.read_text())
        assert _alive(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while _alive(child):
            assert time.monotonic() < deadline, "the child outlived its parent"
            time.sleep(0.02)
    finally:
        parent.kill()
        parent.wait()
