"""One database, not a set of processes: one owner per data directory, a log whose segments
must chain, and shards that live and die with the `memstore serve` that started them.
Real processes, real files, SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from memstore import Client
from memstore.server.logs import listening_address
from memstore.storage.dirlock import DirectoryLocked, DirLock, holder
from memstore.storage.wal_writer import LogWriter
from tests.conftest import ROOT, start_shard


def _memstore(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memstore.cli", *args], check=False,
                          cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_a_second_process_on_the_same_directory_refuses_and_the_first_loses_nothing(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = start_shard(data)
    try:
        with Client(first.address) as c:
            for _ in range(50):
                c.upsert("shared", ops=[("increment", "n", 1)])
        second = _memstore("serve-shard", "--port", "0", "--data-dir", str(data))
        assert second.returncode == 1
        assert f"data directory {data} is in use by process {first.proc.pid}" in second.stderr
        with Client(first.address) as c:  # the first serves on
            for _ in range(50):
                c.upsert("shared", ops=[("increment", "n", 1)])
            assert c.get("shared")["attributes"]["n"] == 100
        # check reads a directory in use and says so; repair refuses it
        checked = _memstore("check", str(data))
        assert f"in use: process {first.proc.pid}" in checked.stdout
        assert checked.returncode == 0, checked.stdout
        repaired = _memstore("repair", "--yes", str(data))
        assert repaired.returncode == 1
        assert "in use by process" in repaired.stderr and "repair needs the shard stopped" \
            in repaired.stderr
    finally:
        first.stop()
    restarted = start_shard(data)
    try:
        with Client(restarted.address) as c:
            assert c.get("shared")["attributes"]["n"] == 100
    finally:
        restarted.stop()


def test_the_lock_is_released_when_its_owner_is_killed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_shard(data)
    with Client(server.address) as c:
        c.upsert("u1", {"a": 1})
    assert holder(data) == server.proc.pid
    server.stop(signal.SIGKILL)
    assert holder(data) is None
    again = start_shard(data)
    try:
        with Client(again.address) as c:
            assert c.get("u1")["attributes"] == {"a": 1}
    finally:
        again.stop()


def test_dirlock_in_one_process_and_its_wait(tmp_path: Path) -> None:
    lock = DirLock.acquire(tmp_path)
    assert holder(tmp_path) == os.getpid()
    with pytest.raises(DirectoryLocked) as refused:
        DirLock.acquire(tmp_path)  # a second open file description: refused like a process
    assert refused.value.pid == os.getpid() and str(tmp_path) in str(refused.value)
    threading.Timer(0.5, lock.release).start()
    started = time.monotonic()
    second = DirLock.acquire(tmp_path, wait=10)  # waits for the first to let go
    assert 0.4 < time.monotonic() - started < 5
    second.release()
    assert holder(tmp_path) is None


def _two_segments(log_dir: Path) -> list[Path]:
    import asyncio

    async def write() -> None:
        writer = LogWriter.open(log_dir, segment_bytes=64)
        for i in range(6):
            writer.append(1, f"record {i} ".encode() * 8)
        await writer.close()

    asyncio.run(write())
    return sorted(log_dir.glob("*.log"))


def test_a_gap_between_segments_stops_start_up_and_check(tmp_path: Path) -> None:
    data = tmp_path / "data"
    segments = _two_segments(data / "log")
    assert len(segments) >= 3
    segments[1].unlink()  # a segment in the middle is gone: the next starts after a gap
    server = _memstore("serve-shard", "--port", "0", "--data-dir", str(data), timeout=30)
    assert server.returncode == 1
    assert "gap in the log" in server.stderr and segments[2].name in server.stderr
    checked = _memstore("check", str(data))
    assert checked.returncode == 1 and "gap in the log" in checked.stdout


def test_a_gap_before_the_snapshot_stops_start_up(tmp_path: Path) -> None:
    """The log before the newest snapshot is not replayed, but a gap there is damage all
    the same (two writers, or a lost file): start-up refuses instead of carrying on."""
    data = tmp_path / "data"
    server = start_shard(data)
    try:
        with Client(server.address) as c:
            for step in range(3):
                c.upsert(f"u{step}", {"step": step})
                c.snapshot()
            c.upsert("after", {"step": 9})
    finally:
        server.stop()
    segments = sorted((data / "log").glob("*.log"))
    assert len(segments) >= 2
    kept = segments[-2]  # ends where the newest snapshot's segment begins
    kept.write_bytes(kept.read_bytes()[:-5])
    started = _memstore("serve-shard", "--port", "0", "--data-dir", str(data), timeout=30)
    assert started.returncode == 1
    assert "gap in the log" in started.stderr and segments[-1].name in started.stderr


def test_an_overlap_between_segments_stops_start_up(tmp_path: Path) -> None:
    """Two writers on one directory leave segments that overlap: damage, not replayed."""
    data = tmp_path / "data"
    segments = _two_segments(data / "log")
    with segments[0].open("ab") as f:  # the first segment grew past the next one's start
        f.write(b"\0" * 9)
    server = _memstore("serve-shard", "--port", "0", "--data-dir", str(data), timeout=30)
    assert server.returncode == 1 and "overlap in the log" in server.stderr


# ---------------------------------------------------------------------- the supervisor


class Serve:
    """`memstore serve` as a real process, its stderr collected."""

    def __init__(self, data: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "memstore.cli", "serve", "--shards", "2", "--port", "0",
             "--data-dir", str(data), "--stop-timeout", "10", *extra],
            cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.address = ""
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            address = listening_address(line, "supervisor")
            if address is not None:
                self.address = address
                self.ready.set()

    def wait_ready(self, timeout: float) -> str:
        assert self.ready.wait(timeout), "serve did not start:\n" + "".join(self.lines)
        return self.address

    def shard_pids(self) -> dict[str, int]:
        return {m.group(1): int(m.group(2)) for line in self.lines
                if (m := re.search(r"(shard-\d) \(pid (\d+)\) serving", line))}


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


def test_shards_stop_with_their_supervisor_and_serve_starts_again(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = Serve(data)
    address = first.wait_ready(60)
    pids = first.shard_pids()
    assert len(pids) == 2
    with Client(address) as c:
        for i in range(200):
            c.upsert(f"u{i}", {"n": i}, identifiers=[("email", f"u{i}@example.com")])
    # a second supervisor on the same directory refuses at once
    second = _memstore("serve", "--port", "0", "--data-dir", str(data), timeout=30)
    assert second.returncode == 1 and "is in use by process" in second.stderr
    first.proc.send_signal(signal.SIGKILL)  # the supervisor alone
    first.proc.wait(10)
    deadline = time.monotonic() + 15
    while not all(_gone(pid) for pid in pids.values()):
        assert time.monotonic() < deadline, "shards outlived their supervisor"
        time.sleep(0.1)
    started = time.monotonic()
    again = Serve(data)
    try:
        address = again.wait_ready(60)
        assert time.monotonic() - started < 10 + 15  # start-up, and a shard lock waited out
        with Client(address) as c:
            assert c.count("ALL") == 200
            for i in (0, 99, 199):
                assert c.get(f"u{i}")["attributes"] == {"n": i}
                assert c.get(identifier=("email", f"u{i}@example.com"))["id"] == f"u{i}"
    finally:
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(30) == 0


def test_serve_passes_on_what_shards_log_at_start_up(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = Serve(data)
    address = first.wait_ready(60)
    with Client(address) as c:
        c.upsert("u1", {"a": 1})
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0
    segment = max((data / "shard-0" / "log").glob("*.log"))
    with segment.open("ab") as f:  # a torn record at the end of shard-0's log
        f.write(b"\x40\x00\x00\x00torn")
    again = Serve(data)
    try:
        again.wait_ready(60)
        torn = [json.loads(line) for line in again.lines if "cut a torn record" in line]
        assert torn and torn[0]["shard"] == "shard-0", "".join(again.lines)
    finally:
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(30) == 0


def test_a_shard_stops_cleanly_when_its_stdin_closes(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "memstore.cli", "serve-shard", "--port", "0", "--data-dir",
         str(tmp_path / "d"), "--stop-on-eof"], cwd=ROOT, stdin=subprocess.PIPE,
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None and proc.stdin is not None
    address = ""
    for line in proc.stderr:
        address = listening_address(line) or ""
        if address:
            break
    with Client(address) as c:
        c.upsert("kept", {"a": 1})
    proc.stdin.close()
    assert proc.wait(15) == 0
    rest = proc.stderr.read()
    assert "standard input closed" in rest and "stopped in" in rest
    host, port = address.rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):  # it no longer listens
        socket.create_connection((host, int(port)), timeout=2).close()
    again = start_shard(tmp_path / "d")  # and what it acknowledged is there
    try:
        with Client(again.address) as c:
            assert c.get("kept")["attributes"] == {"a": 1}
    finally:
        again.stop()
