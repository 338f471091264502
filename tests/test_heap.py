"""Freed heap goes back to the OS at the end of a bulk load (memstore.server.heap), through a
real gRPC server on loopback, in this process so the call can be counted; and a shard
process keeps the pages of its queries' temporaries for the next query."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import memstore.server.heap
from memstore import AsyncClient
from memstore.server.heap import LoadTrimmer, release_free_heap
from memstore.server.service import make_server
from memstore.shard import Shard, ShardConfig


def test_release_free_heap_gives_back_freed_pages() -> None:
    """Blocks malloc hands out (above pymalloc's 512 bytes), freed in the middle of the
    heap, stay resident until malloc_trim returns their pages: resident memory drops."""
    held = [bytearray(4000) for _ in range(10_000)]  # ~40 MB from malloc's heap
    keep = held[::100]  # a few survivors, so the freed pages are not at the heap's top
    del held
    before = _resident()
    assert keep and release_free_heap() is True
    assert before - _resident() > 20 << 20


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _records(prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "attributes": {"n": i, "plan": "pro"}} for i in range(n)]


@pytest.mark.parametrize("slow_fsync", [False, True])
def test_a_load_trims_when_no_other_batch_is_in_flight(tmp_path: Path, monkeypatch: Any,
                                                        slow_fsync: bool) -> None:
    """One batch at a time, the shard trims every LoadTrimmer.EVERY profiles. Batches in flight
    together (each waiting for a slow fsync) trim only once none is left: at the end."""
    trims: list[int] = []  # profiles the shard held at each trim
    opened: list[Shard] = []
    monkeypatch.setattr(LoadTrimmer, "EVERY", 100)

    def trim() -> bool:
        trims.append(len(opened[0].engine.pids))
        return True

    monkeypatch.setattr(memstore.server.heap, "release_free_heap", trim)
    armed, gate = threading.Event(), threading.Event()

    def fsync(fd: int) -> None:
        if armed.is_set():
            gate.wait(5)  # held until every batch of the load has been applied
        os.fsync(fd)

    async def main() -> None:
        shard = await Shard.open(ShardConfig(data_dir=tmp_path, fsync=fsync))
        opened.append(shard)
        server, port, _ = make_server(shard, "127.0.0.1", 0, link=False)
        await server.start()
        try:
            async with AsyncClient(f"127.0.0.1:{port}") as client:
                if not slow_fsync:
                    for part in range(5):
                        await client.load(_records(f"p{part}-", 50), chunk_size=50)
                    assert trims == [100, 200]
                    return
                armed.set()
                load = asyncio.ensure_future(client.load(_records("q", 500), chunk_size=50,
                                                         concurrency=10))
                deadline = time.monotonic() + 5
                while len(shard._pending) < 10 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)  # all ten batches applied, waiting to sync
                gate.set()
                assert await load == 500
                assert trims == [500]
        finally:
            await server.stop(None)
            await shard.close()

    asyncio.run(main())


def test_a_router_trims_after_loads_too(tmp_path: Path, monkeypatch: Any) -> None:
    """The router takes a load's batches apart and packs each shard's part: it too hands
    the freed heap back when its last BatchUpsert in flight ends (this router runs in
    this process; its shards do not, so every trim counted here is the router's)."""
    from memstore import Client
    from tests.test_router import RouterThread, start_shards

    trims: list[int] = []

    def trim() -> bool:
        trims.append(1)
        return True

    monkeypatch.setattr(LoadTrimmer, "EVERY", 100)
    monkeypatch.setattr(memstore.server.heap, "release_free_heap", trim)
    shards = start_shards(tmp_path, 2)
    router = RouterThread([s.address for s in shards])
    try:
        with Client(router.address) as client:
            for part in range(6):
                assert client.load(_records(f"r{part}-", 50), chunk_size=50) == 50
            assert len(trims) == 3  # after 100, 200 and 300 profiles, one call at a time
            assert client.count('plan = "pro"') == 300
    finally:
        router.stop()
        for shard in shards:
            shard.stop()


_QUERIES = """
import resource, sys
import numpy as np
from memstore.server.heap import LoadTrimmer, heap_for_queries, manage_heap
def query():  # a cold count's temporaries: ids, their counts, a mask
    ids = np.arange(600_000, dtype=np.intp)
    counts = np.bincount(ids)
    return int(np.count_nonzero(counts >= 1))
def faults():  # page faults of 20 queries, after one to warm up
    query()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        query()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
if sys.argv[1] == "default":
    print(faults())
else:  # a shard process: recovery, serving, a load in flight, serving again
    assert manage_heap()  # (recovery: glibc's defaults)
    recovering = faults()
    assert heap_for_queries()
    serving = faults()
    loads = LoadTrimmer()
    loads.begin()
    loading = faults()
    loads.end(0)
    print(recovering, serving, loading, faults())
"""


def _printed(script: str, mode: str) -> list[int]:
    """The numbers `script` prints, run in a process of its own as `mode`."""
    done = subprocess.run([sys.executable, "-c", script, mode], check=True,
                          capture_output=True, text=True, timeout=60)
    return [int(n) for n in done.stdout.split()]


def test_a_shard_keeps_its_query_temporaries_pages_and_maps_a_loads_apart() -> None:
    """A shard process (manage_heap) keeps the pages of its queries' temporaries: a query
    that makes and frees ~10 MB of arrays faults no page in when asked again, where
    glibc's defaults give them back and fault them in on every ask. While it recovers it
    keeps glibc's defaults; while a load is in flight, blocks from 1 MiB up are mapped
    apart and given back (so a load's temporaries leave no pages among the profiles):
    in both, every ask faults them in."""
    [default] = _printed(_QUERIES, "default")
    recovering, serving, loading, served_again = _printed(_QUERIES, "shard")
    assert serving < 100 and served_again < 100, (serving, served_again)
    assert default > 20 * 500, default  # the defaults: ~1,400 page faults an ask
    assert recovering > 20 * 500 and loading > 20 * 500, (recovering, loading)


_THREAD_FREES = """
import os, sys, threading
from memstore.server.heap import manage_heap, release_free_heap
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
if sys.argv[1] == "shard":
    assert manage_heap()
big = bytearray(24 << 20)  # a block of 24 MB mapped and freed: glibc's defaults raise
del big  # their mmap threshold to 24 MB and their trim threshold to 48
def work():  # a recovery's thread: ~40 MB of temporaries, made and freed
    blocks = [bytearray(64 << 10) for _ in range(640)]
    del blocks
before = resident()
thread = threading.Thread(target=work)
thread.start()
thread.join()
release_free_heap()
print(resident() - before)
"""


def test_a_shard_gives_back_what_its_threads_freed() -> None:
    """What a thread of a shard process (manage_heap) frees goes back to the OS with the
    rest of the heap: a recovery's thread that made and freed ~40 MB leaves nothing
    resident after the trim, where glibc's defaults keep it at the top of that thread's
    own arena, which malloc_trim does not shrink."""
    [kept] = _printed(_THREAD_FREES, "shard")
    [kept_by_default] = _printed(_THREAD_FREES, "default")
    assert kept < 8 << 20 and kept_by_default > 30 << 20, (kept, kept_by_default)
