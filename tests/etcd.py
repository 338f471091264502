"""A real single-member etcd-server on free loopback ports, for the failover tests and
benchmark (memstore/replication/coordinator.py). Not a fixture itself: both use it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def etcd_server(data: Path) -> Iterator[str]:
    """Run etcd in `data` until the block ends (then SIGKILL); yields its etcd:// URL.
    RuntimeError when etcd is not installed (apt-get install etcd-server) or not healthy
    within 20 s."""
    if not os.path.exists(ETCD):
        raise RuntimeError("etcd is not installed: apt-get install etcd-server (.ci/run)")
    client, peer = free_port(), free_port()
    log = data / "etcd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [ETCD, "--name", "test", "--data-dir", str(data / "member"),
             "--listen-client-urls", f"http://127.0.0.1:{client}",
             "--advertise-client-urls", f"http://127.0.0.1:{client}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"test=http://127.0.0.1:{peer}"],
            stdout=subprocess.DEVNULL, stderr=out)
    try:
        deadline = time.monotonic() + 20
        while not _healthy(client):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("etcd did not start:\n" + log.read_text()[-2000:])
            time.sleep(0.1)
        yield f"etcd://127.0.0.1:{client}"
    finally:
        proc.kill()
        proc.wait(10)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
            return b'"true"' in answer.read()
    except OSError:
        return False
