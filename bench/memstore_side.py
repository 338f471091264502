"""memstore under test: start a shard process, load the data, and answer as a peer would.

One job: wrap `python -m memstore.cli serve-shard` and `memstore.Client` behind the same
methods the peers have (count, ids, group_by, get, batch_get, upsert), plus what only a
server has: its pid for RSS, a snapshot, and a kill-and-restart for recovery time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from bench.datagen import Dataset, iter_records, schema_declaration
from bench.peers.redis_peer import rss_bytes
from bench.queries import Query
from memstore.client.core import LOAD_CHUNK, LOAD_CONCURRENCY
from memstore.server.logs import listening_address


def _client_batch_get(address: str) -> Callable[[list[str]], Any]:
    from memstore import Client

    return Client(address).batch_get


def memstore_unavailable() -> str | None:
    """Why memstore cannot be benchmarked here, or None if it can."""
    try:
        from memstore import Client  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not ready"
        return f"memstore.Client does not import: {type(e).__name__}: {e}"
    return None


class MemstoreServer:
    """One shard process over a data directory (a temporary one unless given).

    `args`: more `serve-shard` options. `code`: run the memstore in that directory (another
    commit's tree, e.g. from `git archive`) instead of this one's; see `in_code`."""

    name = "memstore"
    available = True
    reason = ""

    def __init__(self, ds: Dataset, sync: str = "always", data_dir: Path | None = None,
                 start_timeout: float = 120.0, args: Sequence[str] = (),
                 code: Path | None = None) -> None:
        self.ds = ds
        self.sync = sync
        self.own_dir = data_dir is None
        self.dir = Path(data_dir or tempfile.mkdtemp(prefix="bench-memstore-"))
        self.start_timeout = start_timeout
        self.args = list(args)
        self.code = code
        self.proc: subprocess.Popen[str] | None = None
        self.log_lines: list[str] = []
        self.drain: threading.Thread | None = None  # reads stderr until the process ends
        self.client: Any = None
        self.addr = ""

    # ---- process -------------------------------------------------------------------------
    def start(self) -> float:
        """Start the shard; seconds until it printed its listening line."""
        t = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "memstore.cli", "serve-shard", "--host", "127.0.0.1",
             "--port", "0", "--data-dir", str(self.dir), "--sync", self.sync, *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **in_code(self.code))
        assert self.proc.stderr is not None
        found = threading.Event()
        stderr = self.proc.stderr

        def drain() -> None:  # keep reading so the pipe never fills
            for line in stderr:
                self.log_lines.append(line.rstrip())
                address = listening_address(line)
                if address and not found.is_set():
                    self.addr = address
                    found.set()

        self.drain = threading.Thread(target=drain, daemon=True)
        self.drain.start()
        deadline = time.monotonic() + self.start_timeout
        while not found.wait(0.01):
            if self.proc.poll() is not None:
                raise RuntimeError("memstore shard exited at start:\n" +
                                   "\n".join(self.log_lines[-4:]))
            if time.monotonic() > deadline:
                raise RuntimeError(f"memstore shard did not listen in {self.start_timeout}s")
        elapsed = time.perf_counter() - t
        self.client = self.connection()
        return elapsed

    def connection(self) -> Any:
        from memstore import Client

        return Client(self.addr)

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        return rss_bytes(self.pid())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception as e:  # noqa: BLE001 - the server may be gone already
                self.log_lines.append(f"client close: {e}")
            self.client = None
        if self.proc is not None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def recovery(self, check: Query, expected: int, sig: int = signal.SIGKILL) -> dict[str, Any]:
        """Stop the shard with `sig` (SIGTERM: a clean stop, which snapshots first), restart
        it over the same directory; time the stop, and from the restart until it answers."""
        t = time.perf_counter()
        self.stop(sig)
        stopped = time.perf_counter() - t
        t = time.perf_counter()
        listening = self.start()
        got = self.client.count(check.memstore)
        answered = time.perf_counter() - t
        return {"signal": signal.Signals(sig).name, "stop_s": stopped, "listening_s": listening,
                "answered_s": answered, "count_after": got, "count_expected": expected,
                "data_dir_bytes": dir_bytes(self.dir)}

    def close(self) -> None:
        self.stop()
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---- data --------------------------------------------------------------------------------
    def load(self, chunk_size: int = LOAD_CHUNK, concurrency: int = LOAD_CONCURRENCY) -> dict[str, Any]:
        before = self.rss()
        self.client.declare(schema_declaration())
        t = time.perf_counter()
        n = self.client.load(iter_records(self.ds), chunk_size=chunk_size,
                             concurrency=concurrency, progress=False)
        seconds = time.perf_counter() - t
        after = self.rss()
        return {"seconds": seconds, "rows_per_s": n / seconds, "loaded": n,
                "rss_before": before, "rss_after": after, "rss_growth": after - before,
                "bytes_per_profile": (after - before) / max(n, 1), "sync": self.sync,
                "chunk_size": chunk_size}

    def count(self, q: Query, conn: Any = None) -> int:
        return int((conn or self.client).count(q.memstore))

    def ids(self, q: Query, limit: int) -> list[str]:
        ids, _cursor = self.client.ids(q.memstore, page_size=limit)
        return list(ids)

    def all_ids(self, q: Query, page_size: int = 10_000) -> int:
        """Walk every page of q's ids; how many."""
        n, cursor = 0, ""
        while True:
            ids, cursor = self.client.ids(q.memstore, page_size=page_size, cursor=cursor)
            n += len(ids)
            if not cursor:
                return n

    def group_by(self, q: Query, attr: str, top_n: int) -> list[tuple[Any, int]]:
        return [(v, int(c)) for v, c in self.client.group_by(q.memstore, attr, top_n=top_n)]

    def get(self, pid: str, conn: Any = None) -> Any:
        return (conn or self.client).get(pid)

    def batch_get(self, ids: list[str], conn: Any = None) -> Any:
        return (conn or self.client).batch_get(ids)

    def batch_getter(self) -> Callable[[], Callable[[list[str]], Any]]:
        """What a client process calls for a BatchGet of its own (it pickles)."""
        return partial(_client_batch_get, self.addr)

    def upsert(self, pid: str, attrs: dict[str, Any], conn: Any = None) -> None:
        (conn or self.client).upsert(pid, attrs)

    def snapshot(self) -> None:
        self.client.snapshot()


def in_code(code: Path | None) -> dict[str, Any]:
    """subprocess arguments that run the memstore in `code` (None: this tree's): `python
    -m` looks in its working directory first, then PYTHONPATH."""
    if code is None:
        return {}
    path = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))
    return {"cwd": code, "env": {**os.environ, "PYTHONPATH": path}}


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total
