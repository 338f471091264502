"""Smoke run of the benchmark harness at a few thousand profiles: checks the harness and the
cross-check (memstore included when it imports and its shard starts), not timings."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from bench.datagen import generate, iter_records, load_or_generate
from bench.peers.duckdb_peer import DuckDBPeer
from bench.peers.numpy_peer import NumpyPeer
from bench.queries import QUERIES
from bench.report import markdown
from bench.run import CrossCheckError, Options, cross_check, run
from bench.timing import in_processes

SIZE = 10_000


def test_datagen_is_seeded_and_cached(tmp_path: Path) -> None:
    a = generate(2_000, seed=3)
    b = load_or_generate(2_000, seed=3, cache_dir=tmp_path)
    c = load_or_generate(2_000, seed=3, cache_dir=tmp_path)  # read back from the cache
    for name in a.cols:
        assert np.array_equal(a.cols[name], b.cols[name])
        assert np.array_equal(a.cols[name], c.cols[name])
    rec = next(iter_records(a))
    assert rec["id"] == "u00000000" and "country" in rec["attributes"]
    assert ("email", rec["attributes"]["email"]) in rec["identifiers"]


def test_smoke_run_cross_checks_every_system(tmp_path: Path) -> None:
    opt = Options(size=SIZE, out=tmp_path, query_budget_s=0.01, duration_s=0.2,
                  concurrency=(1, 2), client_processes=(2,), steady_writes=50,
                  durable_sample=1_000, load_batch=700, log=lambda s: None)
    res = run(opt)
    cc = res["crosscheck"]
    assert cc["problems"] == []
    assert {"numpy", "duckdb", "memstore"} <= set(cc["systems"])
    for q in QUERIES:
        counts = set(cc["counts"][q.name].values())
        assert len(counts) == 1, (q.name, cc["counts"][q.name])
    assert set(res["queries"]["counts"]) == {q.name for q in QUERIES}
    report = markdown(res)
    assert "## Segment queries" in report
    # Every figure comes with a ratio against a peer (or, for snapshots, the baseline).
    assert re.search(r"memstore ÷ duckdb: profiles/s [0-9.]+, bytes/profile [0-9.]+", report)
    assert re.search(r"during ÷ before .*: median [0-9.]+, p99 [0-9.]+", report)
    assert "seconds per million profiles" in report or "redis" not in cc["systems"]
    assert "memstore ÷ redis (AOF always)" in report or "redis" not in cc["systems"]
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["size"] == SIZE
    assert res["memory"]["memstore"]["bytes_per_profile"] is not None
    assert res["load"]["memstore"]["chunk_size"] == 700 and "| memstore (700 a batch) |" in report
    from_processes = res["lookups"]["memstore"]["batch_get_processes"]["2"]
    assert from_processes["n"] > 0 and from_processes["throughput_per_s"] > 0
    assert "| memstore | batch_get (processes) | 2 |" in report


def test_a_wrong_count_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = generate(2_000, seed=5)
    d = DuckDBPeer(ds)
    d.load()
    systems = {"numpy": NumpyPeer(ds), "duckdb": d}
    real = DuckDBPeer.count
    monkeypatch.setattr(DuckDBPeer, "count",
                        lambda self, q: real(self, q) + (q.name == "q09_issue"))
    res: dict = {}
    with pytest.raises(CrossCheckError, match="q09_issue: duckdb counts"):
        cross_check(ds, systems, res)
    assert len(res["crosscheck"]["problems"]) == 1
    d.close()


def test_cli_exits_non_zero_on_mismatch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bench.__main__ import main

    real = DuckDBPeer.count
    monkeypatch.setattr(DuckDBPeer, "count",
                        lambda self, q: real(self, q) - (q.name == "q01_eq"))
    result = CliRunner().invoke(main, ["--size", "2000", "--peers", "duckdb,numpy",
                                       "--memstore", "no", "--out", str(tmp_path),
                                       "--workloads", "queries", "--no-plots"])
    assert result.exit_code == 2
    assert "q01_eq: duckdb counts" in result.output


def test_narrow_redisearch_counts_the_query_and_holds_only_its_attributes() -> None:
    """bench.cluster --redis-schema query: RediSearch loaded with q09's attributes alone
    must count q09 like the numpy reference, and hold nothing else."""
    from bench.cluster import QUERY
    from bench.peers.redis_peer import RedisPeer
    from bench.queries import redis_field

    assert QUERY.attributes == {"country", "age", "interests", "consent.email"}
    ds = generate(3_000, seed=8)
    r = RedisPeer(ds, attributes=QUERY.attributes)
    if not r.available:
        pytest.skip(f"RediSearch peer unavailable: {r.reason}")
    try:
        r.load()
        assert r.count(QUERY) == NumpyPeer(ds).count(QUERY)
        allowed = {redis_field(a) for a in QUERY.attributes} | {"_has"}
        stored = set().union(*(r.get(f"u{i:08d}").keys() for i in range(0, 3_000, 97)))
        assert stored and stored <= allowed, stored - allowed
    finally:
        r.close()


def test_hops_times_echo_shard_and_router() -> None:
    """bench.hops runs end to end on small clusters and reports every way."""
    from click.testing import CliRunner

    from bench.hops import main as hops

    result = CliRunner().invoke(hops, ["--size", "2000", "--calls", "60", "--rounds", "1"])
    assert result.exit_code == 0, result.output
    for way in ("bare grpc.aio echo", "shard Get (direct)", "Get through router",
                "router, gRPC alone", "Get, direct_reads", "Get, client link"):
        assert re.search(re.escape(way) + r" +median [0-9.]+ ms +p99 [0-9.]+ ms", result.output)
    assert re.search(r"router ÷ shard median [0-9.]+", result.output)
    assert re.search(r"link ÷ gRPC median [0-9.]+, p99 [0-9.]+", result.output)
    assert re.search(r"client link ÷ router median [0-9.]+, p99 [0-9.]+", result.output)
    assert re.search(r"router [0-9,]+, shard-0 [0-9,]+, shard-1 [0-9,]+", result.output)


def _sleeping_op(i: int) -> Callable[[], None]:
    return partial(time.sleep, 0.002)


def _unbuildable_op(i: int) -> Callable[[], None]:
    raise ValueError(f"no server for client {i}")


def test_in_processes_times_the_op_in_each_process() -> None:
    samples, wall = in_processes(_sleeping_op, 2, 0.3)
    assert wall >= 0.3
    assert samples and min(samples) >= 0.002
    # two processes sleeping side by side do more than one could in the time
    assert len(samples) * 0.002 > wall * 1.05


def test_in_processes_reports_a_process_that_cannot_start() -> None:
    with pytest.raises(RuntimeError, match="did not start: process [01]: ValueError: no server"):
        in_processes(_unbuildable_op, 2, 0.3)


def test_export_bench_runs_small() -> None:
    """bench/export.py end to end at 2,000 profiles: DuckDB's copies, the router's exports
    (every profile, in both formats), the ratios and the target check; not timings."""
    from bench.export import run as run_export_bench

    out = run_export_bench(2_000, shards=2)
    assert [r["file"] for r in out["duckdb"]] == [".jsonl", ".parquet"]
    everything = [r for r in out["exports"] if r["query"] == "ALL"]
    assert [(r["file"], r["profiles"]) for r in everything] == [(".jsonl", 2_000),
                                                                 (".parquet", 2_000)]
    assert all(r["vs_duckdb"] >= 0 and r["profiles_per_s"] > 0 and r["bytes"] > 0
               for r in everything)  # (a ratio at 2,000 may round to 0.0)
    assert 0 < out["exports"][2]["profiles"] < 2_000  # a segment
    assert isinstance(out["target_met"], bool) and out["first_chunk_ms"] > 0
    for r in out["exports"]:  # CPU seconds by process, and the load around the run
        assert set(r["cpu_s"]) == {"router", "shards", "command"}
        assert r["cpu_s"]["command"] > 0 and r["cpu_total_s"] > 0 and len(r["load_avg"]) == 2


def test_random_query_trees_are_seeded_and_cross_checked() -> None:
    """bench.random_queries at a tiny size: the same trees for the same seed, 2-4 levels,
    every count equal across numpy, DuckDB, the engine and a router of two shards."""
    from bench.random_queries import run as run_random
    from bench.random_queries import trees

    ds = generate(3_000, seed=42)
    assert trees(ds, 12, seed=1) == trees(ds, 12, seed=1)
    res = run_random(3_000, 12, 1, 2, 0.0, lambda s: None)
    assert res["crosscheck"]["problems"] == []
    assert len(res["rows"]) == 12 and res["router"]["queries"] == 12
    assert res["engine"]["worst"] >= res["engine"]["median"] > 0
    floor = res["floor"]  # a constant gRPC answer, timed beside each query
    assert floor["median_ms"] > 0 and all(r["floor_ms"] > 0 for r in res["rows"])
    assert floor["router_losses_under_floor"] <= min(floor["duckdb_under_floor"],
                                                     res["router"]["slower_than_duckdb"])


def test_events_bench_counts_agree_with_duckdb() -> None:
    """bench.events at a tiny size: loads through a router (client and CLI), and its did()
    counts equal DuckDB's GROUP BY ... HAVING over the same events (it raises if not)."""
    from bench.events import markdown as events_markdown
    from bench.events import run as run_events

    res = run_events(2_000, 3.0, 2, 26, 2, 500, lambda s: None)
    assert res["load_client"]["events"] + res["load_cli"]["events"] == res["events"]
    assert "loaded 500 events" in res["load_cli"]["output"]
    for load in (res["load_client"], res["load_cli"]):  # where each load's CPU went (each
        cpu = load["cpu_us"]  # process's counted in 10 ms ticks: 500 events may take less)
        assert set(cpu) == {"router", "shards", "client"} and min(cpu.values()) >= 0, load
        assert sum(cpu.values()) > 0, load
    assert all(q["count"] >= 0 for q in res["queries"]) and len(res["queries"]) == 4
    assert "| `did(\"e0\", within=30d, at_least=3)` |" in events_markdown(res)


def test_segments_bench_times_real_events_and_counts_that_agree(tmp_path: Path) -> None:
    """bench.segments end to end on 5,000 profiles and 40 segments: both loads, every
    write's ENTER and LEAVE seen by the watcher, in_segment counts equal to their
    queries', the polling alternative timed, and a report with a ratio on every line."""
    from bench.segments import Options, markdown
    from bench.segments import run as run_segments

    opt = Options(size=5_000, segments=40, writes=40, pace_s=0.005, upserts=50, count_reps=1,
                  poll_period_s=0.2, poll_rounds=2, idle_s=0.5, cache_dir=tmp_path,
                  log=lambda s: None)
    res = run_segments(opt)
    assert res["load_with"]["profiles"] == res["load_without"]["profiles"] == 5_000
    assert len(res["segments"]["definitions"]) == 40 and res["segments"]["members"]["min"] > 0
    assert {"=", "IN", "range", "HAS", "NOT"} <= set(res["segments"]["predicates"])
    watched = res["writes_watched"]
    for change in ("enter", "leave"):  # every write's event came, matched by id
        assert watched["noticed"][change]["writes"] == 20
        assert watched["noticed"][change]["missed"] == 0
        assert watched["noticed"][change]["after_ack"]["n"] == 20
    assert watched["events"] >= 40 and watched["error"] is None
    assert res["upserts_with"]["n"] == res["upserts_without"]["n"] == 50
    for way in ("grpc", "link"):  # run() raises unless each pair of counts agreed
        assert res["counts"][way]["in_segment"]["n"] == res["counts"][way]["query"]["n"] == 40
    assert res["memory"]["members"] > 0 and res["memory"]["serialized_bytes"] > 0
    assert res["poll_quiet"]["rounds"] == 2 and res["poll_quiet"]["ids_per_round"] > 0
    assert res["writes_polled"]["rounds"] >= 2
    report = markdown(res)
    assert re.search(r"\| 1\. ENTER .* \| [0-9.]+ / [0-9.]+ \| polling every", report)
    assert re.search(r"\| 2\. bulk load .* \| [0-9.]+ \| ≥ 0\.75", report)
    assert re.search(r"count\(its query\): [0-9.]+ / [0-9.]+ \| [0-9.]+ / [0-9.]+", report)


def test_restart_bench_runs_small() -> None:
    """bench.restart end to end at 2,000 profiles, this tree's code: the load, then each
    restart answering with every profile, the clean stop's snapshot, the summary."""
    from bench.restart import SCENARIOS
    from bench.restart import run as run_restart

    res = run_restart(2_000, stop_snapshot_timeout=30.0)
    current = res["current"]
    assert current["flags_missing"] == [] and current["runs"][0]["load"]["bytes_per_profile"] > 0
    scenarios = current["runs"][0]["scenarios"]
    assert list(scenarios) == list(SCENARIOS)
    for r in scenarios.values():
        assert r["answered_s"] >= r["listening_s"] >= r["stop_s"] > 0
        assert r["rss_bytes_per_profile"] > 0 and r["on_disk_after_stop"]["total_bytes"] > 0
    assert scenarios["log-kill"]["snapshots_at_signal"] == []  # the load left only a log
    assert not scenarios["log-kill"]["snapshot_after_stop"]
    assert scenarios["log-kill"]["replay_profiles_per_s"] > 0
    assert scenarios["log-term"]["stop_snapshot"].startswith("written at lsn")
    assert scenarios["log-term"]["snapshot_after_stop"]
    assert scenarios["snapshot-kill"]["snapshots_at_signal"]
    assert current["summary"]["log-kill"]["answered_s"]["n"] == 1
    assert "before" not in res and "peers" not in res


def test_restart_bench_leaves_out_what_the_old_serve_shard_lacks(tmp_path: Path) -> None:
    """bench.restart --before DIR: options DIR's `serve-shard --help` does not list are
    left out for it and named."""
    from bench.restart import serve_shard_flags

    cli = tmp_path / "memstore" / "cli"
    cli.mkdir(parents=True)
    (tmp_path / "memstore" / "__init__.py").write_text("")
    (cli / "__init__.py").write_text("")
    (cli / "__main__.py").write_text(
        'print("Options:\\n  --snapshot-log-mb INTEGER\\n  --snapshot-interval FLOAT")\n')
    args, missing = serve_shard_flags(tmp_path, 60.0)
    assert missing == ["--stop-snapshot-timeout"]
    assert args[::2] == ["--snapshot-log-mb", "--snapshot-interval"]
    assert serve_shard_flags(None, 60.0)[1] == []
