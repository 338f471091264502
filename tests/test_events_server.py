"""Behaviour over time on real servers: Track with a past `at`, TrackBatch, Track by
identifier and `memstore load-events` (JSON Lines, CSV, Parquet) through a router of two
shards; did(...) windows through the router against a reference; refusals (a window past
the retention, a malformed part after an empty one); and day records surviving a SIGKILL,
from the log alone and from a snapshot plus the log.

Times are relative to the real clock (the servers' own): "today" is the UTC day the test
starts, and an event is placed at noon of a day a few days back, so a test that runs across
midnight shifts every window by the same day. The retention is the default, 180 days.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from memstore import Client, ClientError
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc
from tests.conftest import ROOT, ServerProcess, start_shard
from tests.test_router import RouterThread, start_shards

RETENTION = 180
NOW = datetime.now(UTC)
TODAY = NOW.date()


def noon(days_ago: int) -> datetime:
    """Noon UTC `days_ago` days before today (never in the future, even near midnight)."""
    day = TODAY - timedelta(days=days_ago)
    return min(datetime(day.year, day.month, day.day, 12, tzinfo=UTC), NOW)


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    shards = start_shards(tmp_path_factory.mktemp("events"), 2)
    thread = RouterThread([s.address for s in shards])
    yield thread.address
    thread.stop()
    for shard in shards:
        shard.stop()


def _count(client: Client, query: str) -> int:
    return int(client.count(query))


# ---------------------------------------------------------------------- Track and backfill
def test_track_backfills_within_the_retention(router: str) -> None:
    with Client(router) as c:
        c.track("bf-1", "renew", at=noon(40))
        c.track("bf-1", "renew", at=noon(100), count=2)
        profile = c.get("bf-1")
        assert profile["attributes"]["event.renew.count"] == 3
        assert profile["attributes"]["event.renew.first"] == noon(100)
        assert profile["attributes"]["event.renew.last"] == noon(40)
        assert _count(c, 'did("renew", within=30d)') == 0
        assert _count(c, 'did("renew", within=41d)') == 1
        assert _count(c, 'did("renew", within=120d, exactly=3)') == 1
        assert _count(c, 'did("renew", within=120d, at_least=4)') == 0
        old = (TODAY - timedelta(days=100)).isoformat()
        assert _count(c, f'did("renew", from="{old}", to="{old}", exactly=2)') == 1


def test_an_event_before_the_retention_counts_in_the_aggregates_only(router: str) -> None:
    """History older than the retention still makes the lifetime count, first and last (a
    warehouse backfill of years keeps them true); it is in no window, since no window may
    reach back that far."""
    with Client(router) as c:
        c.track("bf-2", "signup", at=noon(RETENTION + 30))
        profile = c.get("bf-2")
        assert profile["attributes"]["event.signup.count"] == 1
        assert profile["attributes"]["event.signup.first"] == noon(RETENTION + 30)
        assert _count(c, f'did("signup", within={RETENTION}d) AND event.signup.count >= 1') \
            == _count(c, f'did("signup", within={RETENTION}d)')
        assert c.ids(f'did("signup", within={RETENTION}d)')[0].count("bf-2") == 0


def test_a_window_past_the_retention_is_refused_naming_it(router: str) -> None:
    with Client(router) as c:
        c.track("bf-3", "open")
        c.upsert("bf-3", {"country": "NO"})
        for query in (f'did("open", within={RETENTION + 1}d)',
                      f'did("open", from="{TODAY - timedelta(days=RETENTION)}")',
                      (f'country = "nowhere" AND did("open", within={RETENTION + 5}d, '
                       'at_least=2)')):
            with pytest.raises(ClientError) as err:
                c.count(query)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert f"event retention of {RETENTION} days" in err.value.details
        assert _count(c, f'did("open", within={RETENTION}d)') >= 1


def test_track_by_identifier_and_track_batch(router: str) -> None:
    with Client(router) as c:
        c.upsert("tb-owner", identifiers=[("email", "tb@example.com")])
        c.track(None, "buy", at=noon(2), identifier=("email", "tb@example.com"))
        events = [{"id": f"tb-{i}", "event": "buy", "at": noon(i % 5), "count": 1 + i % 2}
                  for i in range(200)]
        events.append({"identifier": ("email", "tb@example.com"), "event": "buy",
                       "at": noon(3).isoformat()})
        assert c.track_batch(events) == len(events)
        assert c.get("tb-owner")["attributes"]["event.buy.count"] == 2
        # tb-i did buy i % 5 days ago, 1 + i % 2 times; tb-owner twice in the last 4 days
        want = sum(1 for i in range(200) if i % 5 <= 2) + 1
        assert _count(c, 'did("buy", within=3d)') == want
        want = sum(1 for i in range(200) if i % 5 <= 3 and 1 + i % 2 >= 2) + 1
        assert _count(c, 'did("buy", within=4d, at_least=2)') == want
        c.track(None, "buy", at=noon(1), count=3, identifier=("email", "tb@example.com"))
        assert c.get("tb-owner")["attributes"]["event.buy.count"] == 5  # the count kept
        with pytest.raises(ClientError) as err:  # a count given as 0 is not "absent"
            c.track(None, "buy", count=0, identifier=("email", "tb@example.com"))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "count" in err.value.details
        with pytest.raises(ClientError) as err:
            c.track_batch([{"id": "tb-x", "event": "buy"}, {"id": "tb-y", "event": "no spaces"}])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------------- windows vs reference
PEOPLE = 240
DAYS_BACK = 60


def _history(i: int) -> list[tuple[int, int]]:
    """Person i's (days ago, count) events of "visit": a spread that gives every window a
    mix of none, one and many."""
    return [((i * 7 + k * 11) % DAYS_BACK, 1 + (i + k) % 3) for k in range(i % 6)]


@pytest.fixture(scope="module")
def visits(router: str) -> dict[str, list[tuple[int, int]]]:
    reference = {f"v-{i}": _history(i) for i in range(PEOPLE)}
    events = [{"id": pid, "event": "visit", "at": noon(ago), "count": n}
              for pid, history in reference.items() for ago, n in history]
    with Client(router) as c:
        assert c.track_batch(events) == len(events)
        for pid in reference:  # everyone exists, visits or not, for NOT did(...)
            c.upsert(pid, {"kind": "visitor"})
    return reference


def _want(reference: dict[str, list[tuple[int, int]]], lo: int, hi: int,
          least: int = 1, most: int | None = None) -> set[str]:
    """Who visited between `hi` and `lo` days ago (inclusive), least..most times."""
    out = set()
    for pid, history in reference.items():
        total = sum(n for ago, n in history if hi <= ago <= lo)
        if total >= least and (most is None or total <= most):
            out.add(pid)
    return out


WINDOWS = [
    ("within=7d", 6, 0), ("within=30d", 29, 0), ("within=60d", 59, 0), ("within=1d", 0, 0),
]
BOUNDS = [("", 1, None), (", at_least=3", 3, None), (", at_most=2", 1, 2),
          (", exactly=4", 4, 4), (", at_least=2, at_most=5", 2, 5)]


def test_did_windows_through_the_router_match_the_reference(
        router: str, visits: dict[str, list[tuple[int, int]]]) -> None:
    everyone = set(visits)
    windows = list(WINDOWS)
    for lo, hi in ((45, 30), (20, 20), (59, 10)):
        first, last = TODAY - timedelta(days=lo), TODAY - timedelta(days=hi)
        windows.append((f'from="{first}", to="{last}"', lo, hi))
    windows.append((f'from="{TODAY - timedelta(days=14)}"', 14, 0))
    with Client(router) as c:
        for window, lo, hi in windows:
            for bound, least, most in BOUNDS:
                query = f'did("visit", {window}{bound})'
                want = _want(visits, lo, hi, least, most)
                got = {p for p in c.iter_ids(f'kind = "visitor" AND {query}')}
                assert got == want, query
                assert _count(c, f'kind = "visitor" AND NOT {query}') == len(everyone - want)
        # composed: active 30 to 59 days ago but not in the last 30 (a lapsed segment)
        lapsed = _want(visits, 59, 30) - _want(visits, 29, 0)
        d59, d50, d30 = (TODAY - timedelta(days=n) for n in (59, 50, 30))
        query = (f'kind = "visitor" AND did("visit", from="{d59}", to="{d30}") AND NOT '
                 'did("visit", within=30d)')
        assert set(c.iter_ids(query)) == lapsed
        either = _want(visits, 6, 0, 3) | _want(visits, 59, 50)
        query = ('kind = "visitor" AND (did("visit", within=7d, at_least=3) OR '
                 f'did("visit", from="{d59}", to="{d50}"))')
        assert set(c.iter_ids(query)) == either


def test_the_structured_did_message(router: str,
                                    visits: dict[str, list[tuple[int, int]]]) -> None:
    with grpc.insecure_channel(router) as channel:
        stub = memstore_pb2_grpc.MemstoreStub(channel)
        did = pb.Did(event="visit", within_days=30, at_least=3)
        reply = stub.Count(pb.QueryRequest(query=pb.Query(did=did)), timeout=10)
        assert reply.count == len(_want(visits, 29, 0, 3))
        start = (TODAY - timedelta(days=45)).isoformat()
        did = pb.Did(event="visit", to=(TODAY - timedelta(days=30)).isoformat())
        setattr(did, "from", start)
        reply = stub.Count(pb.QueryRequest(query=pb.Query(did=did)), timeout=10)
        assert reply.count == len(_want(visits, 45, 30))
        with pytest.raises(grpc.RpcError) as err:
            stub.Count(pb.QueryRequest(query=pb.Query(did=pb.Did(
                event="visit", within_days=RETENTION + 1))), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"retention of {RETENTION} days" in (err.value.details() or "")


def test_a_malformed_part_after_an_empty_one_is_still_refused(
        router: str, visits: dict[str, list[tuple[int, int]]]) -> None:
    """The tree is checked before anything runs: an AND whose first part matches nobody
    (so the planner stops there) is still refused for a malformed later part."""
    with Client(router) as c:
        assert _count(c, 'kind = "nobody" AND did("visit", within=30d)') == 0
        for bad in ('kind > "a"', f'did("visit", within={RETENTION + 1}d)',
                    'did("visit", within=7d, at_least=0)'):
            with pytest.raises(ClientError) as err:
                c.count(f'kind = "nobody" AND {bad}')
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, bad


# ---------------------------------------------------------------------- load-events
def _load_events(address: str, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memstore.cli", "load-events", str(path), "--address", address,
         "--no-progress", "--chunk-size", "100", "--concurrency", "2", *extra],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _loaded(output: str) -> int:
    match = re.search(r"^loaded (\d+) events$", output, re.MULTILINE)
    assert match, output
    return int(match.group(1))


def _rows(prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "event": "read", "at": noon(i % 10).isoformat(),
             "count": 1 + i % 3} for i in range(n)]


def _check_loaded(address: str, rows: list[dict[str, Any]], prefix: str) -> None:
    """did() through the router says what `rows` say (each profile has one row)."""
    with Client(address) as c:
        got = {p for p in c.iter_ids('did("read", within=10d, at_least=2)')
               if p.startswith(prefix)}
        assert got == {r["id"] for r in rows if r.get("count", 1) >= 2}
        got = {p for p in c.iter_ids('did("read", within=5d)') if p.startswith(prefix)}
        recent = (TODAY - timedelta(days=4)).isoformat()
        assert got == {r["id"] for r in rows if r["at"] >= recent}


def test_load_events_jsonl_through_the_router(router: str, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    rows = _rows("lj-", 500)
    rows[7] = {"identifier": "email:lj@example.com", "event": "read",
               "at": noon(1).isoformat()}
    with Client(router) as c:
        c.upsert("lj-7", identifiers=[("email", "lj@example.com")])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = _load_events(router, path)
    assert done.returncode == 0, done.stderr
    assert _loaded(done.stdout) == 500
    with Client(router) as c:
        assert c.get("lj-7")["attributes"]["event.read.count"] == 1
    rows[7]["id"] = "lj-7"
    _check_loaded(router, rows, "lj-")


def test_load_events_names_a_refused_line_inside_a_block(router: str, tmp_path: Path) -> None:
    """Lines read as blocks (loader.read_event_blocks: 4,096 usual lines at once): an event
    the server refuses (a name it does not take) is named by its line, with --rejects and
    without, wherever it lies in its block."""
    rows = _rows("lb-", 9_000)
    for row in rows:
        row.pop("count")
    # line 4,091: near the end of the first block, refused once the next block is read
    rows[4_090]["event"] = "not a name!"
    path, rejects = tmp_path / "events.jsonl", tmp_path / "rejects.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = _load_events(router, path, "--rejects", str(rejects))
    assert done.returncode == 1
    assert _loaded(done.stdout) == 8_999
    [refused] = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert refused["where"] == "events.jsonl:4091" and refused["id"] == "lb-4090"
    assert json.loads(refused["line"]) == rows[4_090]
    stopped = _load_events(router, path)
    assert stopped.returncode != 0
    assert "events.jsonl:4091 (id 'lb-4090')" in stopped.stderr, stopped.stderr


def test_load_events_csv_with_a_bad_line_and_rejects(router: str, tmp_path: Path) -> None:
    path, rejects = tmp_path / "events.csv", tmp_path / "rejects.jsonl"
    lines = ["id,event,at,count"]
    lines += [f"lc-{i},read,{noon(i % 10).isoformat()},{1 + i % 3}" for i in range(300)]
    lines.insert(51, "lc-bad,read,yesterday,1")  # line 52 of the file
    path.write_text("\n".join(lines) + "\n")
    done = _load_events(router, path, "--rejects", str(rejects))
    assert done.returncode == 1
    assert _loaded(done.stdout) == 300
    refused = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert len(refused) == 1 and "events.csv:52" in json.dumps(refused[0])
    _check_loaded(router, [{"id": f"lc-{i}", "at": noon(i % 10).isoformat(),
                            "count": 1 + i % 3} for i in range(300)], "lc-")


def test_load_events_parquet(router: str, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = _rows("lp-", 400)
    table = pa.table({"id": [r["id"] for r in rows], "event": [r["event"] for r in rows],
                      "at": [datetime.fromisoformat(r["at"]) for r in rows],
                      "count": [r["count"] for r in rows]})
    path = tmp_path / "events.parquet"
    pq.write_table(table, path)
    done = _load_events(router, path)
    assert done.returncode == 0, done.stderr
    assert _loaded(done.stdout) == 400
    _check_loaded(router, rows, "lp-")


def test_load_events_parquet_as_pandas_writes_it(router: str, tmp_path: Path) -> None:
    """A count column with gaps comes as float64 (whole numbers, nulls: 1) and dates as
    date32 (midnight UTC); a count that is not whole is still refused, by row."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = _rows("lpd-", 300)
    for i, r in enumerate(rows):
        r["at"] = (TODAY - timedelta(days=i % 10)).isoformat()  # a date: midnight UTC
        if i % 4 == 0:
            del r["count"]  # a gap: null in the float column
    counts = [float(r["count"]) if "count" in r else None for r in rows]
    counts.append(2.5)
    table = pa.table({"id": [r["id"] for r in rows] + ["lpd-half"],
                      "event": ["read"] * (len(rows) + 1),
                      "at": pa.array([date.fromisoformat(r["at"]) for r in rows] + [TODAY],
                                     type=pa.date32()),
                      "count": pa.array(counts, type=pa.float64())})
    path = tmp_path / "events.parquet"
    pq.write_table(table, path)
    rejects = tmp_path / "rejects.jsonl"
    done = _load_events(router, path, "--rejects", str(rejects))
    assert done.returncode == 1 and _loaded(done.stdout) == 300
    [refused] = rejects.read_text().splitlines()
    assert "events.parquet row 301" in refused and "2.5 is not a whole number" in refused
    _check_loaded(router, rows, "lpd-")
    with Client(router) as c:
        assert c.get("lpd-0")["attributes"]["event.read.first"] == datetime.combine(
            TODAY, datetime.min.time(), UTC)


# ---------------------------------------------------------------------- restart
def _windows(address: str) -> list[int]:
    with Client(address) as c:
        return [_count(c, f'did("{e}", {w})') for e in ("buy", "open")
                for w in ("within=1d", "within=8d, at_least=3", "within=30d, exactly=2",
                          f'from="{TODAY - timedelta(days=20)}", to="{TODAY - timedelta(days=5)}"')]


def _track_some(address: str, prefix: str) -> None:
    with Client(address) as c:
        c.track_batch([{"id": f"{prefix}{i}", "event": "buy" if i % 3 else "open",
                        "at": noon((i * 5) % 25), "count": 1 + i % 2} for i in range(150)])
        for i in range(20):
            c.track(f"{prefix}{i}", "open", at=noon(i % 9))


def _kill(server: ServerProcess) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)


def test_day_records_survive_a_sigkill_from_the_log_and_from_a_snapshot(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_shard(data, "--sync", "always")
    try:
        _track_some(server.address, "a-")
        before = _windows(server.address)
        assert any(before)
    finally:
        _kill(server)
    server = start_shard(data, "--sync", "always")  # the log alone
    try:
        assert _windows(server.address) == before
        with Client(server.address) as c:
            c.snapshot()
        _track_some(server.address, "b-")  # after the snapshot: in the log only
        before = _windows(server.address)
    finally:
        _kill(server)
    server = start_shard(data, "--sync", "always")  # the snapshot, then the log after it
    try:
        assert _windows(server.address) == before
        with Client(server.address) as c:
            assert c.get("b-4")["attributes"]["event.buy.count"] >= 1
    finally:
        server.stop()


def test_event_days_sets_the_retention() -> None:
    server = start_shard(None, "--event-days", "7")
    try:
        with Client(server.address) as c:
            c.track("r-1", "open", at=noon(3))
            assert _count(c, 'did("open", within=7d)') == 1
            with pytest.raises(ClientError) as err:
                c.count('did("open", within=8d)')
            assert "event retention of 7 days" in err.value.details
    finally:
        server.stop()
