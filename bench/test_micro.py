"""Micro-benchmarks of the hot primitives, each beside a peer in the same run.

    python -m pytest bench/test_micro.py --benchmark-columns=median,ops,rounds

Peers: a numpy boolean mask over the same column (the scan any index must beat), and
msgpack/packb for the log frame (the floor of encoding the record at all).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest
from pyroaring import BitMap

from memstore.engine.core import Engine
from memstore.engine.schema import Kind, Merge
from memstore.index.bitmap_index import RangeIndex, ValueIndex
from memstore.query import parse
from memstore.query.evaluate import evaluate
from memstore.storage.wal_writer import LogWriter, SyncPolicy

N = 1_000_000
RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def ages() -> tuple[RangeIndex, np.ndarray]:
    values = RNG.integers(18, 91, N)
    index = RangeIndex()
    index.set_many(np.arange(N, dtype=np.uint32), values)
    return index, values


@pytest.fixture(scope="module")
def times() -> tuple[RangeIndex, np.ndarray]:
    start = 1_600_000_000_000_000
    values = start + RNG.integers(0, 5 * 365 * 86_400_000_000, N)
    index = RangeIndex()
    index.set_many(np.arange(N, dtype=np.uint32), values)
    return index, values


def test_bsi_between_ages(benchmark, ages) -> None:  # type: ignore[no-untyped-def]
    index, values = ages
    result = benchmark(index.between, 25, 34)
    assert len(result) == int(((values >= 25) & (values <= 34)).sum())


def test_numpy_between_ages_peer(benchmark, ages) -> None:  # type: ignore[no-untyped-def]
    _, values = ages
    result = benchmark(lambda: np.flatnonzero((values >= 25) & (values <= 34)))
    assert len(result) > 0


def test_bsi_ge_timestamps(benchmark, times) -> None:  # type: ignore[no-untyped-def]
    index, values = times
    cut = int(np.median(values))
    result = benchmark(index.compare, "ge", cut)
    assert len(result) == int((values >= cut).sum())


def test_numpy_ge_timestamps_peer(benchmark, times) -> None:  # type: ignore[no-untyped-def]
    _, values = times
    cut = int(np.median(values))
    assert len(benchmark(lambda: np.flatnonzero(values >= cut))) > 0


def test_value_index_union_of_three(benchmark) -> None:  # type: ignore[no-untyped-def]
    codes = RNG.integers(0, 40, N)
    index = ValueIndex()
    for code in range(40):
        index.add_many(f"c{code}", np.flatnonzero(codes == code))
    result = benchmark(index.union_of, ["c1", "c2", "c3"])
    assert len(result) == int(np.isin(codes, [1, 2, 3]).sum())


def test_bsi_set_many_100k(benchmark) -> None:  # type: ignore[no-untyped-def]
    ids = np.arange(100_000, dtype=np.uint32)
    values = RNG.integers(0, 10_000, 100_000)

    def load() -> RangeIndex:
        index = RangeIndex()
        index.set_many(ids, values)
        return index

    assert len(benchmark(load)) == 100_000


@pytest.fixture(scope="module")
def engine() -> Engine:
    from bench.datagen import generate, iter_records, schema_declaration

    kinds = {k.label: k for k in Kind}
    e = Engine()
    e.apply(e.plan_declare([(d["name"], kinds[d["kind"]], d.get("indexed", True),
                             Merge.DEFAULT) for d in schema_declaration()]))
    rows = [(r["id"], r["attributes"], r["identifiers"])
            for r in iter_records(generate(200_000, seed=3))]
    for i in range(0, len(rows), 1000):
        e.apply(e.plan_load(rows[i:i + 1000]))
    return e


def test_query_evaluation_5_predicates_200k(benchmark, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    query = parse('country IN ("US","CA") AND age BETWEEN 25 AND 34 AND interests HAS "dogs" '
                  'AND NOT is_subscribed = false AND ltv > 10.0')
    result = benchmark(evaluate, engine, query)
    assert isinstance(result, BitMap)


def test_index_update_single_profile(benchmark, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    from memstore.engine.change import SET, UpsertSpec

    counter = iter(range(10**9))

    def update() -> None:
        n = next(counter)
        engine.apply(engine.plan_upsert(UpsertSpec("u00000001", [
            (SET, "age", 20 + n % 50), (SET, "country", ["US", "DE"][n % 2])])))

    benchmark(update)


@pytest.fixture(scope="module")
def load_batches() -> dict[str, list[bytes]]:
    """20,000 generated profiles as 1,000-profile BatchUpsert payloads, both forms."""
    import msgpack

    from bench.datagen import generate, iter_records
    from memstore.client.core import _pack_default, pack_records

    records = list(iter_records(generate(20_000, seed=5)))
    chunks = [records[i:i + 1000] for i in range(0, len(records), 1000)]
    return {"columns": [pack_records(c) for c in chunks],
            "packed": [msgpack.packb([[r["id"], r["attributes"], r["identifiers"]] for r in c],
                                     datetime=True, default=_pack_default) for c in chunks]}


@pytest.mark.parametrize("form", ["columns", "packed"])
def test_bulk_load_20k_in_engine(benchmark, load_batches, form: str) -> None:  # type: ignore[no-untyped-def]
    """What a shard does with a bulk load, minus gRPC and the log: decode, plan, apply.
    The columnar form (what the client sends) against the row form in the same run."""
    from memstore.engine.columnar import unpack_columns
    from memstore.server.service import unpack_records

    def load() -> Engine:
        engine = Engine()
        for payload in load_batches[form]:
            if form == "columns":
                engine.apply(engine.plan_columns(unpack_columns(payload)))
            else:
                engine.apply(engine.plan_load(unpack_records(payload)))
        return engine

    assert len(benchmark.pedantic(load, rounds=5)) == 20_000


def test_log_append_and_group_sync(benchmark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """100 appends sharing fsyncs, as 100 concurrent writers would."""
    payload = os.urandom(300)

    async def burst(writer: LogWriter) -> None:
        async def one() -> None:
            await writer.sync_to(writer.append(1, payload))

        await asyncio.gather(*(one() for _ in range(100)))

    loop = asyncio.new_event_loop()
    writer = LogWriter.open(tmp_path / "log", sync=SyncPolicy.ALWAYS)
    benchmark(lambda: loop.run_until_complete(burst(writer)))
    loop.run_until_complete(writer.close())
    loop.close()


# ---------------------------------------------------------------------- engine vs DuckDB, 1M
# The yardstick: the engine's own evaluation of a 4-5 predicate count with a
# numeric range, against DuckDB answering the same query on the same rows, same process.

@pytest.fixture(scope="module")
def million() -> tuple[Engine, object, object]:
    from bench.datagen import generate, iter_records, schema_declaration
    from bench.peers.duckdb_peer import DuckDBPeer
    from bench.queries import QUERIES

    size = int(os.environ.get("MEMSTORE_MICRO_SIZE", "1000000"))
    kinds = {k.label: k for k in Kind}
    ds = generate(size, seed=42)
    e = Engine()
    e.apply(e.plan_declare([(d["name"], kinds[d["kind"]], d.get("indexed", True),
                             Merge.DEFAULT) for d in schema_declaration()]))
    batch: list = []
    for r in iter_records(ds):
        batch.append((r["id"], r["attributes"], r["identifiers"]))
        if len(batch) == 1000:
            e.apply(e.plan_load(batch))
            batch = []
    if batch:
        e.apply(e.plan_load(batch))
    duck = DuckDBPeer(ds)
    duck.load()
    q09 = next(q for q in QUERIES if q.name == "q09_issue")
    return e, duck, q09


def test_engine_count_q09_1m(benchmark, million) -> None:  # type: ignore[no-untyped-def]
    engine, duck, q = million
    node = parse(q.memstore)
    count = benchmark(lambda: len(evaluate(engine, node)))
    assert count == duck.count(q)  # the same answer, or the timing means nothing


def test_duckdb_count_q09_1m_peer(benchmark, million) -> None:  # type: ignore[no-untyped-def]
    _, duck, q = million
    assert benchmark(duck.count, q) >= 0
