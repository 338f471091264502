"""`python -m bench.hops`: where a look-up's time goes, hop by hop, against a bare gRPC echo.

One job: in one run, time sequential single-profile Gets three ways and read each process's
CPU time from /proc around them:

- a bare grpc.aio echo server on uvloop answering Get with a fixed reply (the floor any
  Python gRPC hop pays here);
- Get sent straight to one shard of a `memstore serve --shards 2` cluster;
- Get through that cluster's router (a client hop to the router, then the router's hop to
  the owning shard over the shard link, memstore/server/link.py);
- Get through the router of a second cluster on the same data started with `--no-link`,
  whose router reaches the shards over gRPC (the peer of the line above);
- Get from a `Client(router, direct_reads=True)`, which sends it to the owning shard itself;
- Get from a `Client(router, link=True)`, whose own hop to the router takes the router's
  link too.

It prints median and p99 latency, CPU per call in each process, and the ratios shard ÷ echo,
router ÷ shard, link ÷ gRPC, direct_reads ÷ router and client link ÷ router. Absolute times move with the
machine; the ratios are the finding.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import tempfile
import time
from collections.abc import Callable
from typing import Any

import click
import grpc

from bench.cluster import Proc, client, cluster_status, cpu_seconds, descendants
from bench.datagen import iter_records, load_or_generate, profile_id, schema_declaration
from bench.timing import summarize
from memstore.client.core import LOAD_CHUNK, LOAD_CONCURRENCY, Client
from memstore.hashslot import slot_of
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc as pbg


class _Echo(pbg.MemstoreServicer):
    def __init__(self) -> None:
        self.reply = pb.GetResponse()
        self.reply.profile.id = "echo"

    async def Get(self, request: pb.GetRequest, context: Any) -> pb.GetResponse:
        return self.reply


def _serve_echo(ports: Any) -> None:
    import uvloop

    async def main() -> None:
        server = grpc.aio.server()
        pbg.add_MemstoreServicer_to_server(_Echo(), server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    uvloop.run(main())


def timed(call: Callable[[Any], Any], keys: list[Any], watch: dict[str, int]) -> dict[str, Any]:
    """Call `call(key)` for each key after a 50-call warm-up; latency and CPU per call."""
    for key in keys[:50]:
        call(key)
    keys = keys[50:]
    before = {name: cpu_seconds(pid) for name, pid in watch.items()}
    mine = time.process_time()
    samples = []
    for key in keys:
        t = time.perf_counter()
        call(key)
        samples.append(time.perf_counter() - t)
    s = summarize(samples, 1, 1)
    out = {"median_ms": s["median_ms"], "p99_ms": s["p99_ms"],
           "cpu_us": {"client": (time.process_time() - mine) / len(keys) * 1e6}}
    for name, pid in watch.items():
        out["cpu_us"][name] = (cpu_seconds(pid) - before[name]) / len(keys) * 1e6
    return out


def name_of(pid: int) -> str:
    """The --name a shard process was started with."""
    with open(f"/proc/{pid}/cmdline") as f:
        args = f.read().split("\0")
    return args[args.index("--name") + 1]


def line(label: str, r: dict[str, Any]) -> str:
    cpu = ", ".join(f"{k} {v:,.0f}" for k, v in r["cpu_us"].items())
    return (f"{label:<22} median {r['median_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
            f"CPU µs/call: {cpu}")


@click.command()
@click.option("--size", type=int, default=200_000, show_default=True)
@click.option("--calls", type=int, default=4000, show_default=True,
              help="Sequential Gets per way (after 50 warm-up calls).")
@click.option("--rounds", type=int, default=2, show_default=True)
def main(size: int, calls: int, rounds: int) -> None:
    """Time Gets against a bare echo, one shard directly and the router, with CPU per call."""
    ds = load_or_generate(size, 42)
    # spawn, not fork: the caller may run threads (grpc's, a test's) that a fork would copy
    # mid-flight into the echo server.
    spawn = mp.get_context("spawn")
    ports: Any = spawn.Queue()
    echo = spawn.Process(target=_serve_echo, args=(ports,), daemon=True)
    echo.start()
    echo_stub = pbg.MemstoreStub(grpc.insecure_channel(f"127.0.0.1:{ports.get(timeout=60)}"))
    data = tempfile.mkdtemp(prefix="bench-hops-")
    cluster = Proc(["serve", "--shards", "2", "--port", "0", "--data-dir", data,
                    "--sync", "off"], "memstore serve --shards 2")
    plain = Proc(["serve", "--shards", "2", "--port", "0", "--data-dir",
                  tempfile.mkdtemp(prefix="bench-hops-grpc-"), "--sync", "off", "--no-link"],
                 "memstore serve --shards 2 --no-link")
    try:
        c, g = client(cluster.addr), client(plain.addr)
        for each in (c, g):
            each.declare(schema_declaration())
            each.load(iter_records(ds), chunk_size=LOAD_CHUNK, concurrency=LOAD_CONCURRENCY)
        time.sleep(2)
        first = cluster_status(cluster.addr)[0]
        owned = {s for a, b in first["slots"] for s in range(a, b + 1)}
        shards = {name_of(p): p for p in descendants(cluster.proc.pid)}
        plain_shards = {name_of(p): p for p in descendants(plain.proc.pid)}
        direct = client(first["address"])
        smart = Client(cluster.addr, timeout=120.0, direct_reads=True)
        linked = client(cluster.addr, link=True)
        rnd = random.Random(7)
        request = pb.GetRequest(packed=True)
        request.key.id = "u00000000"
        print(f"{size:,} profiles, 2 shards, {calls:,} sequential Gets a way, nproc "
              f"{os.cpu_count()}")
        for _ in range(rounds):
            ids = [profile_id(rnd.randrange(size)) for _ in range(calls * 3)]
            mine = [i for i in ids if slot_of(i) in owned][:calls + 50]
            e = timed(lambda _: echo_stub.Get(request, timeout=60), ids[:calls + 50],
                      {"echo server": echo.pid})  # type: ignore[dict-item]
            d = timed(direct.get, mine, {first["name"]: shards[first["name"]]})
            r = timed(c.get, ids[:calls + 50], {"router": cluster.proc.pid, **shards})
            o = timed(g.get, ids[:calls + 50], {"router": plain.proc.pid, **plain_shards})
            m = timed(smart.get, ids[:calls + 50], {"router": cluster.proc.pid, **shards})
            k = timed(linked.get, ids[:calls + 50], {"router": cluster.proc.pid, **shards})
            print(line("bare grpc.aio echo", e))
            print(line("shard Get (direct)", d))
            print(line("Get through router", r))
            print(line("router, gRPC alone", o))
            print(line("Get, direct_reads", m))
            print(line("Get, client link", k))
            print(f"  shard ÷ echo median {d['median_ms'] / e['median_ms']:.2f}; "
                  f"router ÷ shard median {r['median_ms'] / d['median_ms']:.2f}, "
                  f"p99 {r['p99_ms'] / d['p99_ms']:.2f}; link ÷ gRPC median "
                  f"{r['median_ms'] / o['median_ms']:.2f}, p99 {r['p99_ms'] / o['p99_ms']:.2f}; "
                  f"direct_reads ÷ router median {m['median_ms'] / r['median_ms']:.2f}, "
                  f"p99 {m['p99_ms'] / r['p99_ms']:.2f}; client link ÷ router median "
                  f"{k['median_ms'] / r['median_ms']:.2f}, p99 {k['p99_ms'] / r['p99_ms']:.2f}")
        for each in (c, g, direct, smart, linked):
            each.close()
    finally:
        cluster.stop()
        plain.stop()
        echo.kill()


if __name__ == "__main__":
    main()
