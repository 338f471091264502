"""`python -m bench.segment_ab --before DIR`: what saved segments cost a single upsert and
what an in_segment count costs, this tree against another, interleaved call by call.

One job: what a change of code does to the segments' cost (bench.segments interleaves a
cluster with segments and one without, of this tree only; timed in phases minutes apart
on a 2-core machine that others share, a change of load moves the ratio more than the
segments do). Here four clusters (`memstore serve --shards 2 --sync
off`) hold the same profiles at once: the other tree's code (`--before`, e.g. from `git
archive main`) and this one's, each without and with bench.segments' 100 segments. Each
upsert goes to all four in a shuffled order before the next, so every figure shares the
machine's moments; then `count(in_segment)` and `count(<its query>)` of every segment go to
both clusters with segments, over gRPC and over the router's link, interleaved likewise.
Only one cluster works at any moment; the others wait on their sockets.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click

from bench.datagen import (
    DEFAULT_CACHE,
    iter_records,
    load_or_generate,
    schema_declaration,
)
from bench.segments import Cluster, Options, make_segments
from bench.segments import upserts as interleaved_upserts
from memstore import Client


@click.command()
@click.option("--before", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="Root of the other tree (its memstore/ is served).")
@click.option("--size", default=1_000_000, show_default=True, help="Profiles.")
@click.option("--upserts", default=1500, show_default=True, help="Upserts to each cluster.")
@click.option("--count-reps", default=3, show_default=True,
              help="Times each segment is counted each way.")
def main(before: Path, size: int, upserts: int, count_reps: int) -> None:
    """Upsert and count medians of both trees, with and without segments, interleaved."""
    after = Path.cwd()
    ds = load_or_generate(size, 42, DEFAULT_CACHE)
    segments = make_segments(ds, 100, 7, 20)
    tmp = Path(tempfile.mkdtemp(prefix="segment-ab-"))
    setups = [("before", before, False), ("before", before, True),
              ("after", after, True), ("after", after, False)]
    clusters: list[Cluster] = []
    grpc_clients: dict[str, Client] = {}
    link_clients: dict[str, Client] = {}
    try:
        for tree, root, with_segments in setups:
            label = f"{tree}, {'100' if with_segments else 'no'} segments"
            os.chdir(root)  # `python -m memstore.cli` serves the memstore/ found here
            try:
                cluster = Cluster(tmp, re.sub(r"\W+", "-", label), Options(size=size))
            finally:
                os.chdir(after)
            clusters.append(cluster)
            c = Client(cluster.address, timeout=600)
            c.declare(schema_declaration())
            if with_segments:
                for s in segments:
                    c.create_segment(s.name, s.text)
            c.load(iter_records(ds))
            grpc_clients[label] = c
            link_clients[label] = Client(cluster.address, timeout=600, link=True)
            print(f"{label}: loaded", file=sys.stderr, flush=True)
        for cluster in clusters:
            cluster.quiet()
        for label, u in interleaved_upserts(grpc_clients, size, upserts).items():
            print(f"upsert, {label}: median {u['median_ms']:.3f} ms, "
                  f"mean {u['mean_ms']:.3f} ms")
        ways = {(label, way): client for label in grpc_clients if "100" in label
                for way, client in (("gRPC", grpc_clients[label]),
                                    ("link", link_clients[label]))}
        for (_, way), client in ways.items():
            if way == "link" and not client.link_ready(30):
                raise RuntimeError("a router's link did not come up")
        counted: dict[tuple[str, str, str], list[float]] = {
            (*key, kind): [] for key in ways for kind in ("in_segment", "query")}
        for _ in range(count_reps):
            for s in segments:
                keys = list(ways)
                random.shuffle(keys)
                for key in keys:
                    got = {}
                    for kind, text in (("in_segment", f'in_segment("{s.name}")'),
                                       ("query", s.text)):
                        t = time.perf_counter()
                        got[kind] = ways[key].count(text)
                        counted[(*key, kind)].append(time.perf_counter() - t)
                    if got["in_segment"] != got["query"]:
                        raise RuntimeError(f"{s.name}: in_segment counts {got['in_segment']}, "
                                           f"its query {got['query']} ({key})")
        for (label, way, kind), times in counted.items():
            print(f"count({kind}), {way}, {label}: median {statistics.median(times) * 1e3:.3f} ms")
    finally:
        for cluster in clusters:
            cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
