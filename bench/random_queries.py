"""`python -m bench.random_queries`: random segment trees, memstore against DuckDB.

One job: the planner's yardstick (issue 26). A seeded generator draws query trees of 2-4
levels (AND, OR, NOT over leaves on string, number, timestamp, bool, list and optional
attributes of bench.datagen's profiles, some of them matching nobody or a handful: the
cases where evaluating every part of an AND used to lose to DuckDB's scan). Every tree's
count is checked equal across DuckDB, the numpy scan, memstore through a router
(`memstore serve --shards K`; from a gRPC client and from one on the router's link) and
memstore's engine alone (in this process) before anything is timed; a mismatch exits
with status 2 naming the query.

Each query is then timed on each system (the median of repetitions within a small budget,
the systems interleaved query by query, so a noisy neighbour hurts all of them alike), and
the report gives, per side of memstore, the median and the worst ratio of memstore's time to
DuckDB's for the same query in the same run, and how many queries memstore lost.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import numpy as np

from bench.datagen import ATTRS, SCHEMA, Dataset, iter_records, load_or_generate
from bench.grpc_floor import Floor
from bench.queries import (
    And,
    Between,
    Cmp,
    Eq,
    Exists,
    Has,
    In,
    Ne,
    Node,
    Not,
    Or,
    to_memstore,
    to_numpy,
)

LEAF_ATTRS = [a for a in SCHEMA if a.indexed]
OPTIONAL = ("age", "nps", "event.purchase.count", "event.purchase.last", "city", "device_os",
            "consent.email", "interests", "tags")


def _sample(ds: Dataset, name: str, rng: random.Random) -> Any:
    """A value profile `name` holds (a random row that holds one), as the query writes it."""
    has = ds.has(name)
    rows = np.flatnonzero(has)
    row = int(rows[rng.randrange(len(rows))]) if len(rows) else 0
    a = ATTRS[name]
    v = ds.cols[name][row]
    if a.storage == "cat":
        return a.vocab[int(v)]
    if a.storage == "int":
        return int(v)
    if a.storage == "float":
        return round(float(v), 2)
    if a.storage == "ts":
        return datetime.fromtimestamp(int(v), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if a.storage == "bool":
        return bool(v)
    raise ValueError(name)


def leaf(ds: Dataset, rng: random.Random) -> Node:
    """One predicate. About one leaf in six matches nobody or almost nobody (a rare city, a
    value outside the data, a one-second range): the tiny parts a planner should run first."""
    a = rng.choice(LEAF_ATTRS)
    if rng.random() < 0.25 and a.name in OPTIONAL:
        return Exists(a.name)
    tiny = rng.random() < 0.17
    if a.storage == "cat":
        if tiny:
            return Eq(a.name, a.vocab[-1 - rng.randrange(min(5, len(a.vocab)))]
                      if a.name == "city" else "no-such-value")
        kind = rng.choice(("eq", "eq", "ne", "in"))
        if kind == "in":
            return In(a.name, tuple(sorted({_sample(ds, a.name, rng) for _ in range(3)})))
        value = _sample(ds, a.name, rng)
        return Eq(a.name, value) if kind == "eq" else Ne(a.name, value)
    if a.storage == "bool":
        return Eq(a.name, rng.random() < 0.5)
    if a.storage == "list":
        if tiny:
            return Has(a.name, "no-such-value")
        return Has(a.name, rng.choice(a.vocab[:12] if rng.random() < 0.7 else a.vocab))
    if a.storage in ("int", "float", "ts"):
        x, y = _sample(ds, a.name, rng), _sample(ds, a.name, rng)
        lo, hi = min(x, y), max(x, y)
        if tiny:
            if a.storage == "ts":
                return Between(a.name, lo, lo)  # one second
            return Cmp(a.name, ">", hi * 1000 + 1000 if a.storage == "int" else 1e12)
        if rng.random() < 0.5:
            return Between(a.name, lo, hi)
        return Cmp(a.name, rng.choice(("<", "<=", ">", ">=")), lo)
    raise ValueError(a.name)


def tree(ds: Dataset, rng: random.Random, depth: int) -> Node:
    """A tree `depth` levels deep (a leaf is one level)."""
    if depth <= 1:
        return leaf(ds, rng)
    kind = rng.choices(("and", "or", "not"), weights=(5, 3, 1))[0]
    if kind == "not":
        return Not(tree(ds, rng, depth - 1))
    n = rng.randint(2, 4)
    children = [tree(ds, rng, depth - 1)]  # one child reaches the full depth
    children += [tree(ds, rng, rng.randint(1, depth - 1)) for _ in range(n - 1)]
    rng.shuffle(children)
    return And(tuple(children)) if kind == "and" else Or(tuple(children))


def trees(ds: Dataset, n: int, seed: int) -> list[Node]:
    """`n` trees of 2, 3 and 4 levels in turn, the same for the same seed and data."""
    rng = random.Random(seed)
    return [tree(ds, rng, 2 + i % 3) for i in range(n)]


# ---------------------------------------------------------------------- the engine alone
def engine_of(ds: Dataset) -> Any:
    """An in-process memstore Engine holding the dataset (as the shard's load builds it)."""
    from bench.datagen import schema_declaration
    from memstore.engine.core import Engine
    from memstore.engine.schema import Kind, Merge

    kinds = {k.label: k for k in Kind}
    e = Engine()
    e.apply(e.plan_declare([(d["name"], kinds[d["kind"]], d.get("indexed", True),
                             Merge.DEFAULT) for d in schema_declaration()]))
    batch: list[Any] = []
    for r in iter_records(ds):
        batch.append((r["id"], r["attributes"], r["identifiers"]))
        if len(batch) == 1000:
            e.apply(e.plan_load(batch))
            batch = []
    if batch:
        e.apply(e.plan_load(batch))
    return e


def median_time(fn: Callable[[], Any], budget_s: float, min_reps: int = 3,
                max_reps: int = 200) -> float:
    """Median seconds of fn() over repetitions filling `budget_s` (at least min_reps)."""
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < min_reps or (time.perf_counter() < deadline
                                      and len(samples) < max_reps):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def summary(ratios: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(ratios), "worst": max(ratios),
            "slower_than_duckdb": sum(r > 1 for r in ratios), "queries": len(ratios)}


def run(size: int, n_queries: int, seed: int, shards: int, budget_s: float,
        log: Callable[[str], None], router: bool = True) -> dict[str, Any]:
    from bench.cluster import Proc, client
    from bench.peers.duckdb_peer import DuckDBPeer
    from memstore.query import parse
    from memstore.query.evaluate import count

    ds = load_or_generate(size, seed=42)
    qs = trees(ds, n_queries, seed)
    texts = [to_memstore(q) for q in qs]
    res: dict[str, Any] = {"size": size, "queries": n_queries, "seed": seed, "shards": shards}
    log(f"{size:,} profiles, {n_queries} random trees (seed {seed})")
    duck = DuckDBPeer(ds)
    duck.load()
    log("  DuckDB loaded")
    t = time.perf_counter()
    engine = engine_of(ds)
    log(f"  engine loaded in {time.perf_counter() - t:.1f}s")
    nodes = [parse(text) for text in texts]
    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="bench-random-")
    stack = ExitStack()
    try:
        if router:
            proc = Proc(["serve", "--shards", str(shards), "--port", "0", "--data-dir",
                         str(Path(tmp.name) / "data"), "--sync", "off"],
                        f"memstore serve --shards {shards}")
            c = client(proc.addr)
            fast = client(proc.addr, link=True)
            from bench.datagen import schema_declaration

            c.declare(schema_declaration())
            t = time.perf_counter()
            c.load(iter_records(ds), progress=False)
            log(f"  cluster of {shards} shards loaded in {time.perf_counter() - t:.1f}s")
        # the cross-check, before any time
        problems = []
        for i, (q, text, node) in enumerate(zip(qs, texts, nodes, strict=True)):
            want = int(to_numpy(q, ds).sum())
            got = {"duckdb": duck.count(_as_query(q)), "engine": count(engine, node)}
            if router:
                got["router"] = int(c.count(text))
                got["link"] = int(fast.count(text))
            if any(v != want for v in got.values()):
                problems.append(f"r{i:03d} {text}: numpy {want}, {got}")
        res["crosscheck"] = {"problems": problems}
        if problems:
            return res
        log("  every count agrees (numpy, DuckDB, engine" + (", router)" if router else ")"))
        if router:  # the floor under any count through the router, at the same moments
            floor = stack.enter_context(Floor())
        rows = []
        for i, (q, text, node) in enumerate(zip(qs, texts, nodes, strict=True)):
            query = _as_query(q)
            d = median_time(lambda query=query: duck.count(query), budget_s)  # type: ignore[misc]
            e = median_time(lambda node=node: count(engine, node), budget_s)  # type: ignore[misc]
            row: dict[str, Any] = {
                "name": f"r{i:03d}", "query": text, "count": int(to_numpy(q, ds).sum()),
                "duckdb_ms": d * 1e3, "engine_ms": e * 1e3, "engine_ratio": e / d}
            if router:
                r = median_time(lambda text=text: c.count(text), budget_s)  # type: ignore[misc]
                k = median_time(lambda text=text: fast.count(text), budget_s)  # type: ignore[misc]
                f = median_time(floor.call, budget_s)
                row.update(router_ms=r * 1e3, router_ratio=r / d, link_ms=k * 1e3,
                           link_ratio=k / d, floor_ms=f * 1e3)
            rows.append(row)
        res["rows"] = rows
        res["engine"] = summary([r["engine_ratio"] for r in rows])
        if router:
            res["router"] = summary([r["router_ratio"] for r in rows])
            res["link"] = summary([r["link_ratio"] for r in rows])
            under = [r for r in rows if r["duckdb_ms"] < r["floor_ms"]]
            res["floor"] = {
                "median_ms": statistics.median(r["floor_ms"] for r in rows),
                "duckdb_under_floor": len(under),
                "router_losses_under_floor": sum(r["router_ratio"] > 1 for r in under)}
        return res
    finally:
        stack.close()
        duck.close()
        if proc is not None:
            proc.stop()
        tmp.cleanup()


def _as_query(q: Node) -> Any:
    from bench.queries import Query

    return Query("random", q, "")


def markdown(res: dict[str, Any]) -> str:
    head = (f"Random trees: {res['queries']} (seed {res['seed']}), {res['size']:,} profiles, "
            f"{res['shards']} shards behind the router.")
    columns = "| memstore side | median ratio to DuckDB | worst ratio | slower than DuckDB |"
    lines = [head, "", columns, "|---|---|---|---|"]
    for side in ("router", "link", "engine"):
        if side in res:
            s = res[side]
            lines.append(f"| {side} | {s['median']:.3f} ({1 / s['median']:.1f}x faster) | "
                         f"{s['worst']:.3f} | {s['slower_than_duckdb']} of {s['queries']} |")
    if "floor" in res:
        f = res["floor"]
        lines += ["", (f"A gRPC round trip answering a constant (bench.grpc_floor, same "
                       f"moments): median {f['median_ms']:.2f} ms. DuckDB answered "
                       f"{f['duckdb_under_floor']} queries faster than that; "
                       f"{f['router_losses_under_floor']} of the router's "
                       f"{res['router']['slower_than_duckdb']} losses are among them.")]
    worst = sorted(res["rows"], key=lambda r: -r.get("router_ratio", r["engine_ratio"]))[:3]
    lines += ["", "Worst queries (ms: DuckDB / router / router's link / engine):"]
    for r in worst:
        lines.append(f"- `{r['query']}` ({r['count']:,} matches): {r['duckdb_ms']:.2f} / "
                     f"{r.get('router_ms', float('nan')):.2f} / "
                     f"{r.get('link_ms', float('nan')):.2f} / {r['engine_ms']:.3f}")
    return "\n".join(lines)


@click.command()
@click.option("--size", type=int, default=1_000_000, show_default=True)
@click.option("--queries", "n_queries", type=int, default=200, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--shards", type=int, default=2, show_default=True)
@click.option("--budget", type=float, default=0.1, show_default=True,
              help="Seconds of repetitions per query per system.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write the results as JSON here.")
def main(size: int, n_queries: int, seed: int, shards: int, budget: float,
         out: Path | None) -> None:
    """Random query trees against DuckDB: counts checked, then median and worst ratios."""
    res = run(size, n_queries, seed, shards, budget,
              lambda s: print(s, file=sys.stderr, flush=True))
    if out is not None:
        out.write_text(json.dumps(res, indent=1))
    if res["crosscheck"]["problems"]:
        click.echo("CROSS-CHECK FAILED, no timings reported:\n"
                   + "\n".join(res["crosscheck"]["problems"]), err=True)
        sys.exit(2)
    click.echo(markdown(res))


if __name__ == "__main__":
    main()
