"""Shared fixtures: real shard processes on loopback, started through the CLI."""

from __future__ import annotations

import compileall
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from memstore.server.logs import listening_address, message
from tests.etcd import etcd_server

ROOT = Path(__file__).resolve().parent.parent


def pytest_sessionstart(session: pytest.Session) -> None:
    """Write the checkout's bytecode once, as `pip install` does for an installed copy: the
    suite starts hundreds of memstore processes from this tree, and under
    PYTHONDONTWRITEBYTECODE each would compile every module again (~0.5 s a start). Once:
    in the controller, not again in each pytest-xdist worker."""
    if hasattr(session.config, "workerinput"):
        return
    for package in ("memstore", "shards"):
        compileall.compile_dir(ROOT / package, quiet=1)


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    address: str
    data_dir: Path | None
    startup: list[str] = field(default_factory=list)  # stderr lines up to "listening on"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def start_shard(data_dir: Path | None, *extra: str, timeout: float = 30.0) -> ServerProcess:
    """Start `memstore serve-shard` on port 0 and wait for its "listening on" line."""
    args = ["serve-shard", "--port", "0", *extra]
    args += ["--data-dir", str(data_dir)] if data_dir is not None else ["--in-memory"]
    return _start(args, data_dir, timeout)


def add_shard(router: str, address: str, *extra: str) -> None:
    """`memstore cluster add-shard ADDRESS` through `router`, which must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", "memstore.cli", "cluster", "add-shard", address, "--address",
         router, "--no-progress", *extra],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr


def start_router(shard_addresses: list[str], *extra: str, env: dict[str, str] | None = None,
                 timeout: float = 30.0) -> ServerProcess:
    """Start `memstore serve-router` on port 0 in front of the given shards."""
    args = ["serve-router", "--port", "0", *extra]
    for address in shard_addresses:
        args += ["--shard", address]
    return _start(args, None, timeout, env)


def _start(cli_args: list[str], data_dir: Path | None, timeout: float,
           env: dict[str, str] | None = None) -> ServerProcess:
    args = [sys.executable, "-m", "memstore.cli", *cli_args]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline().decode()
        if not line:
            break
        lines.append(line)
        address = listening_address(line)
        if address is not None:
            _drain(proc)
            return ServerProcess(proc, address, data_dir, lines)
    proc.kill()
    raise RuntimeError(f"{cli_args[0]} did not start:\n" + "".join(lines))


def _drain(proc: subprocess.Popen[bytes]) -> None:
    """Keep reading stderr so a chatty server never blocks on a full pipe."""
    import threading

    def pump() -> None:
        assert proc.stderr is not None
        for _ in proc.stderr:
            pass

    threading.Thread(target=pump, daemon=True).start()


def said(lines: list[str], prefix: str) -> str | None:
    """What follows `prefix` in the first log line whose message starts with it."""
    for line in lines:
        msg = message(line)
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return None


@pytest.fixture(scope="module")
def shard() -> Iterator[ServerProcess]:
    server = start_shard(None)
    yield server
    server.stop()


@pytest.fixture
def durable_shard(tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_shard(tmp_path / "data")
    yield server
    server.stop()


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Server processes a test starts (anything with a `proc` Popen) go here: those still
    running at its end are killed, last started first, stopped ones (SIGSTOP) too."""
    started: list[Any] = []
    yield started
    for p in reversed(started):
        if p.proc.poll() is None:
            os.kill(p.proc.pid, signal.SIGCONT)  # a stopped process does not die otherwise
            p.proc.kill()
            p.proc.wait(10)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real etcd on free loopback ports for one test module (killed at its end); its
    etcd:// URL. No etcd installed fails the tests: nothing else checks automatic
    failover."""
    try:
        with etcd_server(tmp_path_factory.mktemp("etcd")) as url:
            yield url
    except RuntimeError as exc:
        pytest.fail(str(exc))
