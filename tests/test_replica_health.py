"""Replicas that hang instead of failing, with real processes on loopback.

A replica stopped with SIGSTOP (or behind a stalled disk) accepts connections and never
answers; a partition that drops packets sends no reset either way. Neither may break
reads sent to the replica (they go to the primary within the caller's deadline, or a
bounded time without one), and a replica cut off from its primary must say so
(connected False, lag-seconds growing), then catch up once the network heals.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from memstore import AsyncClient, Client
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc
from tests.conftest import start_router
from tests.test_replication import (
    Proc,
    primary_and_replica,
    start,
    stats,
    wait_caught_up,
    wait_replicas,
)

FALLBACK = 3.0  # seconds a read may take while its replica hangs (the replica has 1 s)


@contextmanager
def stopped(proc: Proc) -> Iterator[None]:
    """The process stopped (SIGSTOP) for the block, continued after it whatever happens."""
    os.kill(proc.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)


def timed(read: Callable[[], Any]) -> tuple[Any, float]:
    """`read()`'s answer and the seconds it took."""
    began = time.monotonic()
    answer = read()
    return answer, time.monotonic() - began


def _get_without_deadline(address: str, pid: str) -> pb.GetResponse:
    """A Get with no deadline at all, over plain gRPC, given FALLBACK seconds to answer."""
    with grpc.insecure_channel(address) as channel:
        future = memstore_pb2_grpc.MemstoreStub(channel).Get.future(
            pb.GetRequest(key=pb.ProfileKey(id=pid)))
        try:
            return future.result(timeout=FALLBACK)
        finally:
            future.cancel()


# ---------------------------------------------------------------------- a hung replica

def test_a_router_reading_from_a_stopped_replica_answers_from_the_primary(
        tmp_path: Path, procs: list[Proc]) -> None:
    """serve-router --read-from replica, the replica stopped: a read with a deadline is
    answered by the primary well within it, the next ones at once (the replica is set
    aside), and a read with no deadline is answered too."""
    primary, replica = primary_and_replica(tmp_path, procs)
    wait_replicas(primary.address, 1)
    router = start_router([primary.address], "--read-from", "replica")
    try:
        with Client(router.address, timeout=10) as c:
            c.upsert("u1", {"x": 1})
            c.upsert("u2", {"x": 2})
            wait_caught_up(primary.address, replica.address)
            assert c.get("u1")["attributes"] == {"x": 1}  # the replica answers
            with stopped(replica):
                answer, took = timed(lambda: c.get("u1"))
                assert answer["attributes"] == {"x": 1}
                assert took < FALLBACK, f"a read took {took:.1f} s with the replica stopped"
                count, took = timed(lambda: c.count("x >= 1"))
                assert count == 2 and took < 0.5, f"{took:.1f} s: the replica was not set aside"
                assert _get_without_deadline(router.address, "u2").profile.id == "u2"
    finally:
        router.stop()


def test_a_client_reading_from_a_stopped_replica_reads_from_the_primary(
        tmp_path: Path, procs: list[Proc]) -> None:
    """Client(read_from="replica") and its asyncio twin, the replica stopped: reads are
    answered by the primary within a few seconds, with a timeout or without one."""
    primary, replica = primary_and_replica(tmp_path, procs)
    wait_replicas(primary.address, 1)
    with Client(primary.address, timeout=10) as c:
        c.upsert("u1", {"plan": "pro"})
    wait_caught_up(primary.address, replica.address)

    def read(timeout: float | None) -> Any:
        with Client(primary.address, read_from="replica", timeout=timeout) as c:
            return c.get("u1")

    async def read_async() -> Any:
        async with AsyncClient(primary.address, read_from="replica", timeout=10) as c:
            return await c.get("u1")

    assert read(10)["attributes"] == {"plan": "pro"}
    # The pool is left after the replica is continued: a read hung on it then ends.
    with concurrent.futures.ThreadPoolExecutor(2) as pool, stopped(replica):
        for timeout in (10.0, None):
            began = time.monotonic()
            answer = pool.submit(read, timeout).result(2 * FALLBACK)  # a hung read fails
            took = time.monotonic() - began
            assert answer["attributes"] == {"plan": "pro"}
            assert took < FALLBACK, f"timeout={timeout}: a read took {took:.1f} s"
        answer, took = timed(lambda: asyncio.run(read_async()))
        assert answer["attributes"] == {"plan": "pro"} and took < FALLBACK


# ---------------------------------------------------------------------- a silent partition

class Proxy:
    """A TCP proxy to `target` that can stop forwarding without closing anything: a
    network partition that drops packets (no reset, no FIN) while `paused`."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.paused = threading.Event()
        self.closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
        self._listener.close()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        """Copy both ways until either side closes; hold everything while paused."""
        with a, b:
            while not self.closed.is_set():
                if self.paused.is_set():
                    time.sleep(0.05)
                    continue
                ready, _, _ = select.select([a, b], [], [], 0.05)
                for source in ready:
                    try:
                        data = source.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    (b if source is a else a).sendall(data)

    def close(self) -> None:
        self.closed.set()


def _replica_lag_trailer(address: str) -> float:
    """memstore-replica-lag-seconds of a Get answered by the replica at `address`."""
    with grpc.insecure_channel(address) as channel:
        _, call = memstore_pb2_grpc.MemstoreStub(channel).Get.with_call(
            pb.GetRequest(key=pb.ProfileKey(id="u1")), timeout=10)
        return float(dict(call.trailing_metadata())["memstore-replica-lag-seconds"])


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def test_a_replica_cut_off_by_a_silent_partition_says_so_and_catches_up(
        tmp_path: Path, procs: list[Proc]) -> None:
    """A replica following through a proxy that stops forwarding: within a few seconds its
    Stats say it is disconnected with a growing lag-seconds (the read trailers too), while
    the primary takes writes; once the proxy forwards again it reconnects and catches up."""
    primary = start(tmp_path / "primary")
    procs.append(primary)
    proxy = Proxy(primary.address)
    try:
        replica = start(tmp_path / "replica", "--replica-of", proxy.address)
        procs.append(replica)
        with Client(primary.address, timeout=10) as c:
            c.upsert("u1", {"v": 0})
        wait_caught_up(primary.address, replica.address)
        assert stats(replica.address)["replication.lag_seconds"] == "0.000"

        proxy.paused.set()
        with Client(primary.address, timeout=10) as c:
            for v in range(1, 21):
                c.upsert("u1", {"v": v})
        _wait_for(lambda: stats(replica.address)["replication.connected"] == "False", 6,
                  "the replica still says it is connected")
        first = float(stats(replica.address)["replication.lag_seconds"])
        time.sleep(1)
        later = stats(replica.address)
        assert float(later["replication.lag_seconds"]) >= first + 0.9 > 1, later
        assert _replica_lag_trailer(replica.address) >= first + 0.9

        proxy.paused.clear()
        wait_caught_up(primary.address, replica.address)
        with Client(replica.address, timeout=10) as c:
            assert c.get("u1")["attributes"] == {"v": 20}
        _wait_for(lambda: stats(replica.address)["replication.lag_seconds"] == "0.000", 5,
                  "the replica's lag never went back to 0")
        assert replica.said("the primary sent nothing for")
    finally:
        proxy.close()
