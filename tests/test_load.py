"""Loads that say exactly what happened: `memstore load` and Client.load through a router of
two real shards, with bad lines at the start, the middle and the end of a chunk. The summary
`loaded N profiles` always equals what the server holds; everything before a bad line is
applied; --rejects holds exactly the bad lines."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from memstore import Client, LoadError
from memstore.client import loader
from memstore.client.events import event_chunks, now_micros
from memstore.client.loader import cell_value, read_events
from tests.conftest import ROOT
from tests.test_router import RouterThread, start_shards

CHUNK = 250  # records a request in these tests: bad lines fall at chunk edges and middles


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    shards = start_shards(tmp_path_factory.mktemp("load"), 2)
    thread = RouterThread([s.address for s in shards])
    yield thread.address
    thread.stop()
    for shard in shards:
        shard.stop()


def _load(address: str, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memstore.cli", "load", str(path), "--address", address,
         "--no-progress", "--chunk-size", str(CHUNK), "--concurrency", "3", *extra],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _write(path: Path, n: int, prefix: str, bad: dict[int, str]) -> None:
    """n lines; line k (1-based) is `bad[k]` where given, else a good record."""
    with path.open("w") as f:
        for k in range(1, n + 1):
            f.write(bad.get(k, json.dumps({"id": f"{prefix}{k}", "attributes": {
                "n": k, "city": ["Oslo", "Lima", "Pune"][k % 3]}})) + "\n")


def _loaded(output: str) -> int:
    match = re.search(r"^loaded (\d+) profiles$", output, re.MULTILINE)
    assert match, output
    return int(match.group(1))


def _count(address: str, prefix: str) -> set[str]:
    with Client(address) as c:
        return {pid for pid in c.iter_ids("ALL") if pid.startswith(prefix)}


# A line the reader refuses, and lines the server refuses (wrong kind; a blocked identifier).
def _wrong_kind(prefix: str, k: int) -> str:
    return json.dumps({"id": f"{prefix}{k}", "attributes": {"n": "many"}})


def _blocked(prefix: str, k: int) -> str:
    return json.dumps({"id": f"{prefix}{k}", "attributes": {"n": k},
                       "identifiers": [["email", "null"]]})


@pytest.mark.parametrize("at", [1, CHUNK + 1, 2 * CHUNK + 125, 3 * CHUNK, 4 * CHUNK - 1])
@pytest.mark.parametrize("kind", ["malformed", "wrong-kind", "blocked"])
def test_a_bad_line_stops_the_load_after_every_line_before_it(
        router: str, tmp_path: Path, at: int, kind: str) -> None:
    prefix = f"stop-{kind}-{at}-"
    bad = {"malformed": "{not json", "wrong-kind": _wrong_kind(prefix, at),
           "blocked": _blocked(prefix, at)}[kind]
    path = tmp_path / "people.jsonl"
    _write(path, 4 * CHUNK, prefix, {at: bad})
    result = _load(router, path)
    assert result.returncode == 1
    loaded = _count(router, prefix)
    assert _loaded(result.stdout) == len(loaded)
    assert {f"{prefix}{k}" for k in range(1, at)} <= loaded  # everything before it
    assert f"{prefix}{at}" not in loaded
    assert f"people.jsonl:{at}" in result.stderr
    if kind != "malformed":
        assert f"(id '{prefix}{at}')" in result.stderr
        assert "columns[" not in result.stderr  # the file's line, not a request's position
    if kind == "wrong-kind":
        assert "attribute 'n' has kind int, got a string value" in result.stderr


@pytest.mark.parametrize("kind", ["malformed", "wrong-kind", "blocked"])
def test_rejects_holds_exactly_the_bad_lines(router: str, tmp_path: Path, kind: str) -> None:
    prefix = f"rej-{kind}-"
    bad_at = [1, CHUNK, CHUNK + 1, 2 * CHUNK + 7, 2 * CHUNK + 8, 4 * CHUNK]
    make = {"malformed": lambda k: "{not json", "wrong-kind": lambda k: _wrong_kind(prefix, k),
            "blocked": lambda k: _blocked(prefix, k)}[kind]
    path = tmp_path / "people.jsonl"
    _write(path, 4 * CHUNK, prefix, {k: make(k) for k in bad_at})
    rejects = tmp_path / "rejects.jsonl"
    result = _load(router, path, "--rejects", str(rejects))
    assert result.returncode == 1
    loaded = _count(router, prefix)
    assert _loaded(result.stdout) == len(loaded) == 4 * CHUNK - len(bad_at)
    entries = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert sorted(e["where"] for e in entries) == sorted(f"people.jsonl:{k}" for k in bad_at)
    lines = path.read_text().splitlines()
    for entry in entries:
        k = int(entry["where"].rsplit(":", 1)[1])
        assert entry["line"] == lines[k - 1]
        assert entry["error"]
    assert f"refused {len(bad_at)} lines" in result.stderr


def test_a_clean_load_exits_zero(router: str, tmp_path: Path) -> None:
    path = tmp_path / "people.jsonl"
    _write(path, 3 * CHUNK + 17, "clean-", {})
    result = _load(router, path, "--rejects", str(tmp_path / "r.jsonl"))
    assert result.returncode == 0, result.stderr
    assert _loaded(result.stdout) == len(_count(router, "clean-")) == 3 * CHUNK + 17
    assert (tmp_path / "r.jsonl").read_text() == ""


def test_client_load_reports_refused_records_and_applied_counts(router: str) -> None:
    records = [{"id": f"cl-{i}", "attributes": {"n": "bad" if i in (3, 700) else i}}
               for i in range(1000)]
    refused: list[tuple[int, str, str]] = []
    with Client(router) as c:
        applied = c.load(records, chunk_size=CHUNK, on_refused=lambda i, pid, err: refused.append(
            (i, pid, err.code.name)))
        assert applied == 998 == len(_count(router, "cl-"))
        assert refused == [(3, "cl-3", "INVALID_ARGUMENT"), (700, "cl-700", "INVALID_ARGUMENT")]
        again = [{"id": f"cl2-{i}", "attributes": {"n": "bad" if i == 600 else i}}
                 for i in range(1000)]
        with pytest.raises(LoadError) as stopped:
            c.load(again, chunk_size=CHUNK, concurrency=2)
        assert stopped.value.record == 600 and stopped.value.id == "cl2-600"
        assert stopped.value.code == grpc.StatusCode.INVALID_ARGUMENT
        held = _count(router, "cl2-")
        assert stopped.value.applied == len(held)
        assert {f"cl2-{i}" for i in range(600)} <= held and "cl2-600" not in held


def test_client_load_refuses_bad_identifiers_and_names_record_by_record(router: str
                                                                         ) -> None:
    """Through a router, an identifier or an attribute name the directory or the schema
    registry would refuse names its record (as a shard names a bad value), so a load goes
    on past it; before, the whole chunk failed naming none."""
    records = [{"id": f"bi-{i}", "attributes": {"n": i},
                "identifiers": [("email", f"bi-{i}@x")]} for i in range(600)]
    records[7]["identifiers"] = [("Email", "bi-7@x")]
    records[260]["identifiers"] = [("email", "")]
    records[420]["attributes"] = {"bad name!": 1}
    refused: list[tuple[int, str]] = []
    with Client(router) as c:
        applied = c.load(records, chunk_size=CHUNK, concurrency=2,
                         on_refused=lambda i, pid, err: refused.append((i, err.details)))
    assert [i for i, _ in refused] == [7, 260, 420] and applied == 597
    assert "identifier kind 'Email'" in refused[0][1]
    assert "empty identifier value" in refused[1][1]
    assert "'bad name!'" in refused[2][1]
    assert len(_count(router, "bi-")) == 597


def test_async_client_load_is_the_same(router: str) -> None:
    import asyncio

    from memstore import AsyncClient

    async def run() -> tuple[int, list[int]]:
        refused: list[int] = []
        async with AsyncClient(router) as c:
            applied = await c.load(
                [{"id": f"ac-{i}", "attributes": {"n": "x" if i % 400 == 5 else i}}
                 for i in range(900)], chunk_size=CHUNK,
                on_refused=lambda i, pid, err: refused.append(i))
        return applied, refused

    applied, refused = asyncio.run(run())
    assert refused == [5, 405, 805] and applied == 897 == len(_count(router, "ac-"))


# ---------------------------------------------------------------------- CSV and Parquet


def test_csv_columns_are_guessed_whole_and_follow_the_declared_schema(
        router: str, tmp_path: Path) -> None:
    """An undeclared column's kind comes from all its cells: zip codes with a leading
    zero make the whole column a string (94110 too), ints and decimals a float one."""
    with Client(router) as c:
        c.declare([{"name": "csv_code", "kind": "string"}, {"name": "csv_score",
                                                            "kind": "float"}])
    path = tmp_path / "people.csv"
    path.write_text("id,zip,csv_code,csv_score,visits,vip,ratio\n"
                    "csv-1,02134,007,3,12,true,1\n"
                    "csv-2,00501,42,2.5,0,false,2.5\n"
                    "csv-3,,x,not-a-number,1,true,\n"
                    "csv-4,94110,9,1,-3,,4\n")
    rejects = tmp_path / "rejects.jsonl"
    result = _load(router, path, "--rejects", str(rejects))
    assert _loaded(result.stdout) == 3
    with Client(router) as c:
        one = c.get("csv-1")["attributes"]
        assert one == {"zip": "02134", "csv_code": "007", "csv_score": 3.0, "visits": 12,
                       "vip": True, "ratio": 1.0}
        assert c.get("csv-2")["attributes"]["visits"] == 0
        assert c.get("csv-4")["attributes"] == {"zip": "94110", "csv_code": "9",
                                                "csv_score": 1.0, "visits": -3, "ratio": 4.0}
        kinds = {a["name"]: a["kind"] for a in c.schema()}
        assert (kinds["zip"], kinds["visits"], kinds["ratio"], kinds["vip"]) == (
            "string", "int", "float", "bool")
    refused = {json.loads(line)["where"]: json.loads(line)["error"]
               for line in rejects.read_text().splitlines()}
    assert set(refused) == {"people.csv:4"}
    assert "'not-a-number' is not a number" in refused["people.csv:4"]


def test_lines_the_server_would_refuse_are_named_and_the_rest_load(
        router: str, tmp_path: Path) -> None:
    """An int past int64, an identifier kind or value the server refuses, an attribute
    name it refuses: each is refused on its line (file, line, id; --rejects goes on), not
    with its whole chunk and no line; a CSV line kept in --rejects reads back as the same
    cells; a BOM before a CSV header is no part of it; a Parquet timestamp without a zone
    is UTC and a date its midnight UTC."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "odd.jsonl"
    lines = [{"id": "ln-1", "attributes": {"n": 1}},
             {"id": "ln-2", "attributes": {"n": 99999999999999999999}},
             {"id": "ln-3", "attributes": {"n": 3}, "identifiers": [["Email", "a@x"]]},
             {"id": "ln-4", "attributes": {"n": 4}, "identifiers": [["email", ""]]},
             {"id": "ln-5", "attributes": {"bad name!": 5}},
             {"id": "ln-6", "attributes": {"n": 6}, "identifiers": [["email", "ln6@x"]]}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rejects = tmp_path / "odd.rejects"
    result = _load(router, path, "--rejects", str(rejects))
    assert result.returncode == 1 and _loaded(result.stdout) == 2, result.stderr
    refused = {json.loads(line)["where"]: json.loads(line)
               for line in rejects.read_text().splitlines()}
    assert sorted(refused) == [f"odd.jsonl:{i}" for i in (2, 3, 4, 5)]
    assert "outside the int64 range" in refused["odd.jsonl:2"]["error"]
    assert "identifier kind 'Email'" in refused["odd.jsonl:3"]["error"]
    assert "empty identifier value" in refused["odd.jsonl:4"]["error"]
    assert "'bad name!'" in refused["odd.jsonl:5"]["error"]
    assert refused["odd.jsonl:2"]["id"] == "ln-2"
    assert _count(router, "ln-") == {"ln-1", "ln-6"}
    stopped = _load(router, path)  # without --rejects: stops at line 2, line 1 loaded
    assert stopped.returncode == 1 and "odd.jsonl:2 (id 'ln-2')" in stopped.stderr

    csv_path = tmp_path / "odd.csv"
    csv_path.write_text('\ufeffid,label,big\n'
                        'cq-1,"x, ""y""",12345678901234567890\n'
                        'cq-2,2,1\n', encoding="utf-8")
    with Client(router) as c:
        c.declare([{"name": "label", "kind": "int"}])
    result = _load(router, csv_path, "--rejects", str(rejects))
    [entry] = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert entry["where"] == "odd.csv:2" and entry["line"] == 'cq-1,"x, ""y""",' \
        "12345678901234567890"
    with Client(router) as c:  # big: 20 digits are no int64, so a string column
        assert c.get("cq-2")["attributes"] == {"label": 2, "big": "1"}

    parquet = tmp_path / "naive.parquet"
    pq.write_table(pa.table({"id": ["pn-1"], "seen": [datetime(2026, 1, 2, 3, 4, 5)],
                             "born": [date(1990, 5, 6)]}), parquet)
    assert _load(router, parquet).returncode == 0
    with Client(router) as c:
        attrs = c.get("pn-1")["attributes"]
    assert attrs["seen"] == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert attrs["born"] == datetime(1990, 5, 6, tzinfo=UTC)


def test_cell_value_rules() -> None:
    assert [cell_value("x", t, {}) for t in ("0", "42", "-7", "02134", "+1", "1,000", "4.5",
                                             "1e3", "true", "True", "")] == [
        0, 42, -7, "02134", "+1", "1,000", 4.5, 1000.0, True, "True", ""]
    schema = {"s": "string", "i": "int", "l": "string_list", "b": "bool"}
    assert cell_value("s", "42", schema) == "42"
    assert cell_value("i", "42", schema) == 42
    assert cell_value("l", '["a","b"]', schema) == ["a", "b"]
    assert cell_value("l", "a|b", schema) == ["a", "b"]
    assert cell_value("b", "FALSE", schema) is False
    with pytest.raises(ValueError, match="is not an int"):
        cell_value("i", "4.5", schema)


def test_csv_column_kinds_come_from_every_cell_the_first_row_included(tmp_path: Path
                                                                      ) -> None:
    path = tmp_path / "kinds.csv"
    rows = ["id,zip,n,x,flag,declared", "u1,02134,1,1,true,7"]
    rows += [f"u{i},{10000 + i},{i},{i + 0.5},false,{i}" for i in range(2, 20_000)]
    path.write_text("\n".join(rows) + "\nu0,,,oops,,\n")
    lines = list(loader.read(path, "csv", {"declared": "string"}))
    assert [line.error for line in lines] == [""] * len(rows)
    first, second, last = (line.record["attributes"] for line in (lines[0], lines[1], lines[-1]))
    assert first == {"zip": "02134", "n": 1, "x": "1", "flag": True, "declared": "7"}
    assert second == {"zip": "10002", "n": 2, "x": "2.5", "flag": False, "declared": "2"}
    assert last == {"x": "oops"}  # its one cell made x a string column, the first row too


def test_whole_counts_written_as_floats_read_alike_in_every_format(tmp_path: Path) -> None:
    """pandas writes an integer column with gaps as floats: a count of 2.0 (JSON), "2.0"
    (CSV) or a float64 2.0 (Parquet) is the count 2 in all three; 2.5 is refused in all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    counts = [2.0, 3.0, 2.5]
    (tmp_path / "e.jsonl").write_text("".join(
        json.dumps({"id": f"u{i}", "event": "buy", "count": c}) + "\n"
        for i, c in enumerate(counts)))
    (tmp_path / "e.csv").write_text("id,event,count\n" + "".join(
        f"u{i},buy,{c}\n" for i, c in enumerate(counts)))
    pq.write_table(pa.table({"id": [f"u{i}" for i in range(3)], "event": ["buy"] * 3,
                             "count": pa.array(counts, pa.float64())}), tmp_path / "e.parquet")
    for fmt in ("jsonl", "csv", "parquet"):
        lines = list(read_events(tmp_path / f"e.{fmt}", fmt))
        assert [line.event and line.event[3] for line in lines[:2]] == [2, 3], fmt
        assert lines[2].event is None and "2.5" in lines[2].error, fmt
        assert all(type(line.event[3]) is int for line in lines[:2]), fmt


def test_event_lines_are_checked_once_and_sent_as_they_are(tmp_path: Path) -> None:
    """load-events sends each good line's event tuple (checked by the loader alone), the
    same event Client.load_events makes of the line's record; bad lines keep their
    reasons; a tuple's absent time is the chunk's now."""
    path = tmp_path / "events.jsonl"
    rows = [{"id": "a", "event": "buy", "at": "2026-01-02T03:04:05+00:00", "count": "3"},
            {"identifier": "email:a@x", "event": "open"},
            {"identifier": {"kind": "crm", "value": "7"}, "event": "buy", "count": 2},
            {"id": "b", "event": "buy", "at": "yesterday"},
            {"id": "c", "event": "buy", "count": 0},
            {"id": "d", "event": ""},
            {"id": "e", "event": "buy", "count": 2.5},
            {"id": "f", "event": "buy", "count": "1.5"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    lines = list(read_events(path, "jsonl"))
    assert [line.error for line in lines[3:]] == [
        "at: 'yesterday' is not an ISO-8601 time", "count: 0 is not a whole number from 1",
        "no 'event' (a non-empty string)", "count: 2.5 is not a whole number from 1",
        "count: '1.5' is not a whole number from 1", lines[8].error]
    assert lines[8].error.startswith("not JSON:") and all(line.event is None for line in lines[3:])
    good = lines[:3]
    assert [line.event for line in good] == [
        ("a", "buy", 1767323045000000, 3), (("email", "a@x"), "open", None, 1),
        (("crm", "7"), "buy", None, 2)]
    [sent] = event_chunks([line.event for line in good], 10)
    [made] = event_chunks([line.record for line in good], 10)
    assert sent.events[0] == made.events[0] == good[0].event
    assert [e[:2] + e[3:] for e in sent.events] == [e[:2] + e[3:] for e in made.events]
    assert all(isinstance(e[2], int) and e[2] >= now_micros() - 60_000_000
               for e in sent.events[1:])


def test_parquet_rows_are_named(router: str, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = [{"id": f"pq-{i}", "n": i, "pq_tag": "a"} for i in range(5)]
    rows[2]["n"] = None
    rows[3]["id"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    result = _load(router, tmp_path / "p.parquet")
    assert result.returncode == 1
    assert "p.parquet row 4: no 'id'" in result.stderr
    assert _loaded(result.stdout) == 3 == len(_count(router, "pq-"))
