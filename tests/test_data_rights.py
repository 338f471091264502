"""Data rights against real shard processes and a router: exports of one person and of
many, the round trip through `memstore load`, erasure receipts, suppression, the byte scan
of every file a cluster keeps after an erasure and the next snapshot, and retention."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from memstore import Client, ClientError, LoadError
from memstore.client.loader import header
from memstore.hashslot import slot_of
from memstore.server import audit, metrics
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc
from shards.retention import Retention
from shards.slots import split_even
from tests.conftest import ROOT, start_shard
from tests.test_router import RouterThread, start_shards

T1 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)


def on_shard(i: int, prefix: str, n: int = 2) -> str:
    """An id of `prefix` whose slot is in shard i's share of an even split into n."""
    (lo, hi), = split_even(n)[i]
    k = 0
    while not lo <= slot_of(f"{prefix}-{k}") <= hi:
        k += 1
    return f"{prefix}-{k}"


def cli(address: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memstore.cli", *args, "--address", address],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, input=input,
                          check=False)


def scan(directories: list[Path], needles: list[str]) -> list[tuple[str, str]]:
    """(file, needle) for every file under `directories` holding a needle's bytes."""
    hits = []
    for directory in directories:
        for path in directory.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                hits += [(str(path), n) for n in needles if n.encode() in data]
    return hits


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("rights")
    shards = start_shards(root, 2, "--salt-file", str(root / "salt"),
                          "--audit-log", str(root / "audit.jsonl"))
    router = RouterThread([s.address for s in shards])
    audit.open_log(root / "router-audit.jsonl")  # the router runs in this process
    client = Client(router.address)
    yield {"root": root, "shards": shards, "router": router, "client": client,
           "dirs": [root / f"shard-{i}" for i in range(2)], "audit": root / "audit.jsonl"}
    client.close()
    audit.open_log(None)
    router.stop()
    for shard in shards:
        shard.stop()


def test_export_of_one_person_holds_everything_about_them(cluster: dict[str, Any]) -> None:
    c: Client = cluster["client"]
    c.declare([{"name": "note", "kind": "string", "indexed": False}])
    loser, survivor = on_shard(0, "exp-loser"), on_shard(1, "exp-survivor")
    before = int(time.time())
    c.upsert(loser, {"plan": "free", "visits": 3}, identifiers=[("device", "exp-dev-1")])
    c.track(loser, "signup", at=T1)
    c.upsert(survivor, {"plan": "pro", "score": 2.5, "vip": True, "seen": T1,
                        "tags": ["b", "a"], "note": "likes tea"},
             identifiers=[("email", "exp@example.org")])
    c.link(survivor, [("device", "exp-dev-1")])  # the loser's shard keeps a forward
    today = datetime.now(UTC)
    c.track(survivor, "visit", at=today - timedelta(days=2), count=2)
    c.track(survivor, "visit", at=today)

    found = c.export(identifier=("device", "exp-dev-1"))
    # Day records: their own section, by UTC date, never among the attributes.
    assert found["sections"]["day_records"] == {"visit": {
        (today - timedelta(days=2)).date().isoformat(): 2, today.date().isoformat(): 1}}
    assert not [name for name in found["attributes"] if name.startswith("event.")]
    assert found["events"]["visit"]["count"] == 3
    assert found["id"] == survivor and found["merged_ids"] == [loser]
    assert found["attributes"]["plan"] == {"kind": "string", "value": "pro"}
    assert found["attributes"]["visits"] == {"kind": "int", "value": 3}
    assert found["attributes"]["score"] == {"kind": "float", "value": 2.5}
    assert found["attributes"]["seen"] == {"kind": "timestamp", "value": T1}
    assert found["attributes"]["tags"] == {"kind": "string_list", "value": ["a", "b"]}
    assert found["attributes"]["note"]["value"] == "likes tea"  # not indexed, still held
    assert found["events"]["signup"] == {"count": 1, "first": T1, "last": T1}
    assert "event.signup.count" not in found["attributes"]
    assert sorted(found["identifiers"]) == [("device", "exp-dev-1"), ("email", "exp@example.org")]
    assert found["version"] >= 2 and found["shard"] == "shard-1"
    assert before - 1 <= found["created"].timestamp() <= found["changed"].timestamp()
    assert found["changed"].timestamp() <= time.time() + 1
    assert c.export(loser)["id"] == survivor  # the merged-away id leads to the person
    assert c.export("nobody-here") is None

    shown = cli(cluster["router"].address, "export", survivor)
    assert shown.returncode == 0, shown.stderr
    printed = json.loads(shown.stdout)
    assert printed["attributes"]["seen"] == {"kind": "timestamp",
                                             "value": "2026-03-04T05:06:07.123456Z"}
    assert printed["merged_ids"] == [loser]
    by_identifier = cli(cluster["router"].address, "export", "--identifier", "device",
                        "exp-dev-1")
    assert by_identifier.returncode == 0, by_identifier.stderr
    assert json.loads(by_identifier.stdout) == printed
    missing = cli(cluster["router"].address, "export", "--identifier", "email", "no@x")
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_bulk_export_round_trips_through_load_exactly(cluster: dict[str, Any],
                                                      tmp_path: Path) -> None:
    c: Client = cluster["client"]
    c.declare([{"name": "rt.when", "kind": "timestamp"},
               {"name": "rt.price", "kind": "float", "merge": "max"},
               {"name": "rt.bio", "kind": "string", "indexed": False}])
    records = [{"id": f"rt-{i}", "attributes": {
        "rt": True, "rt.n": i, "rt.price": float(i), "rt.city": ["Oslo", "Rome"][i % 2],
        "rt.when": T1, "rt.tags": ["x", f"t{i % 3}"], "rt.bio": f"bio {i}"},
        "identifiers": [["email", f"rt{i}@example.org"]] if i % 2 else []}
        for i in range(300)]
    assert c.load(records) == 300
    for i in range(0, 300, 7):  # day records stay out of bulk exports; aggregates do not
        c.track(f"rt-{i}", "rt-visit")
    jsonl, parquet = tmp_path / "out.jsonl", tmp_path / "out.parquet"
    for path in (jsonl, parquet):
        done = cli(cluster["router"].address, "export", "--query", "rt = true", "--output",
                   str(path), "--no-progress")
        assert done.returncode == 0, done.stderr
        assert "exported 300 profiles" in done.stderr
    lines = jsonl.read_text().splitlines()
    assert json.loads(lines[0])["schema"] and len(lines) == 301
    shown = cli(cluster["router"].address, "export", "--query", "rt = true", "--output",
                str(tmp_path / "bar.jsonl"))  # the progress bar, on stderr
    assert shown.returncode == 0, shown.stderr
    assert "exporting to bar.jsonl" in shown.stderr and "300/300" in shown.stderr
    same = sorted((tmp_path / "bar.jsonl").read_text().splitlines())  # shards interleave
    assert same == sorted(lines)
    assert header(jsonl, "jsonl") == header(parquet, "parquet")

    source = {r["id"]: r for chunk in c.iter_export("rt = true") for r in chunk}
    kinds = {s["name"]: s for s in c.schema() if s["name"].startswith("rt")}
    for path in (jsonl, parquet):
        target = start_shard(None)  # an empty cluster: no schema, no profiles
        try:
            loaded = cli(target.address, "load", str(path), "--no-progress")
            assert loaded.returncode == 0, loaded.stderr
            assert "loaded 300 profiles" in loaded.stdout
            with Client(target.address) as t:
                copy = {r["id"]: r for chunk in t.iter_export() for r in chunk}
                declared = {s["name"]: s for s in t.schema() if s["name"].startswith("rt")}
                assert declared == kinds  # kinds, indexing and merge rules too
        finally:
            target.stop()
        assert copy.keys() == source.keys()
        for pid, record in source.items():
            assert copy[pid]["attributes"] == record["attributes"], pid
            assert copy[pid]["identifiers"] == record["identifiers"], pid
            assert isinstance(copy[pid]["attributes"]["rt.when"], datetime)
            assert type(copy[pid]["attributes"]["rt.price"]) is float


def test_erasure_leaves_a_receipt_and_no_byte_on_disk(cluster: dict[str, Any]) -> None:
    c: Client = cluster["client"]
    loser, survivor = on_shard(0, "gone-loser"), on_shard(1, "gone-survivor")
    c.upsert(loser, {"secret": "Zanzibar-7731"}, identifiers=[("device", "gone-dev-5521")])
    c.upsert(survivor, {"secret": "Quokka-9917", "tags": ["gone-tag-44"]},
             identifiers=[("email", "gone-person@example.org")])
    c.link(survivor, [("device", "gone-dev-5521")])
    c.snapshot()  # an older snapshot and log that hold the person, before the erasure
    c.upsert(survivor, {"later": 1})

    done = cli(cluster["router"].address, "delete", "--identifier", "email",
               "gone-person@example.org")
    assert done.returncode == 0, done.stderr
    receipt = json.loads(done.stdout)
    [erased] = receipt["erased"]
    assert erased["id"] == survivor and erased["merged_ids"] == [loser]
    assert sorted(map(tuple, erased["identifiers"])) == [
        ("device", "gone-dev-5521"), ("email", "gone-person@example.org")]
    assert set(receipt["shard_positions"]) == {"shard-0", "shard-1"}  # the forward's too
    assert receipt["erased_at"] and len(receipt["hashed_ids"]) == 4
    assert c.get(survivor) is None and c.get(loser) is None
    assert c.get(identifier=("device", "gone-dev-5521")) is None

    needles = [survivor, loser, "Zanzibar-7731", "Quokka-9917", "gone-tag-44",
               "gone-dev-5521", "gone-person@example.org"]
    assert scan(cluster["dirs"], needles)  # still in the log and the older snapshots
    positions = c.snapshot()["shard_positions"]
    assert all(positions[s] >= p for s, p in receipt["shard_positions"].items())
    assert scan(cluster["dirs"], needles) == []
    lines = [json.loads(line) for line in cluster["audit"].read_text().splitlines()]
    assert any(line.get("receipt") == receipt["receipt"] for line in lines)
    # the router's calls came over the link: the shard audits them as it does gRPC's
    assert any(line["event"] == "call" and line.get("method") == "Delete" for line in lines)
    routed = [json.loads(line) for line in (cluster["root"] / "router-audit.jsonl")
              .read_text().splitlines()]
    [line] = [x for x in routed if x.get("receipt") == receipt["receipt"]]
    assert line["hashes"] == receipt["hashed_ids"] and line["reason"] == "delete"
    assert line["shard_positions"] == receipt["shard_positions"]
    assert scan([cluster["root"]], needles) == []  # audit lines: hashes only
    # An erasure by query: its batches' receipts and the router's lines carry the hashes.
    c.upsert("by-query-1", {"grp": "q1"}, identifiers=[("email", "q1@example.org")])
    [batch] = list(c.iter_erase('grp = "q1"'))
    assert len(batch["hashed_ids"]) == 2
    routed = [json.loads(line) for line in (cluster["root"] / "router-audit.jsonl")
              .read_text().splitlines()]
    [line] = [x for x in routed if x.get("receipt") == batch["receipt"]]
    assert line["reason"] == "query" and line["hashes"] == batch["hashed_ids"]


def test_erasing_a_chain_of_merges_across_shards_leaves_no_byte(cluster: dict[str, Any]
                                                                  ) -> None:
    """X (shard 0) merged into Y (shard 1), then Y into Z (shard 0): shard 1 keeps a
    forward for X too (every id merged into Y), and the decision of X's merge names Y.
    Erasing the person by X leaves none of their ids on any shard after a snapshot."""
    c: Client = cluster["client"]
    x, y, z = on_shard(0, "chain-x"), on_shard(1, "chain-y"), on_shard(0, "chain-z")
    for pid, email in ((x, "chain-x@example.org"), (y, "chain-y@example.org"),
                       (z, "chain-z@example.org")):
        c.upsert(pid, {"secret": f"Chain-{pid}"}, identifiers=[("email", email)])
    c.link(y, [("email", "chain-x@example.org")])
    c.link(z, [("email", "chain-y@example.org")])
    assert c.export(x)["id"] == z and sorted(c.export(x)["merged_ids"]) == sorted([x, y])
    receipt = c.erase(x)
    assert receipt["erased"][0]["id"] == z
    assert c.get(x) is None and c.get(y) is None and c.get(z) is None
    positions = c.snapshot()["shard_positions"]
    assert all(positions[s] >= p for s, p in receipt["shard_positions"].items())
    assert scan(cluster["dirs"], [x, y, z, "chain-x@example.org", "chain-y@example.org",
                                  "chain-z@example.org", f"Chain-{x}"]) == []


def test_bulk_erasure_by_query(cluster: dict[str, Any]) -> None:
    c: Client = cluster["client"]
    assert c.load({"id": f"bulkgone-{i}", "attributes": {"wave": "bulkwave",
                                                         "name": f"Bulkname-{i}"},
                   "identifiers": [["email", f"bulk{i}@bulk.example"]]}
                  for i in range(400)) == 400
    c.upsert("bulk-stays", {"wave": "other"})
    asked = cli(cluster["router"].address, "delete", "--query", 'wave = "bulkwave"', input="n\n")
    assert asked.returncode == 1 and "erase 400 profiles" in asked.stderr
    assert c.count('wave = "bulkwave"') == 400
    done = cli(cluster["router"].address, "delete", "--query", 'wave = "bulkwave"', "--yes")
    assert done.returncode == 0, done.stderr
    receipts = [json.loads(line) for line in done.stdout.splitlines()]
    assert sum(len(r["erased"]) for r in receipts) == 400
    assert {e["id"] for r in receipts for e in r["erased"]} == {f"bulkgone-{i}"
                                                                 for i in range(400)}
    assert "erased 400 profiles" in done.stderr
    assert c.count('wave = "bulkwave"') == 0 and c.get("bulk-stays") is not None
    assert c.get(identifier=("email", "bulk7@bulk.example")) is None
    assert all(r["shard_positions"] and r["erased_at"] for r in receipts)
    assert scan(cluster["dirs"], ["Bulkname-7"])  # in the log until the next snapshot
    positions = c.snapshot()["shard_positions"]
    assert all(positions[s] >= p for r in receipts for s, p in r["shard_positions"].items())
    assert scan(cluster["dirs"], ["bulkgone-", "Bulkname-", "bulk.example"]) == []


def test_suppression_refuses_a_later_write_naming_the_person(cluster: dict[str, Any]) -> None:
    c: Client = cluster["client"]
    c.upsert("supp-1", {"a": 1}, identifiers=[("email", "supp@example.org"),
                                               ("phone", "+4799887766")])
    receipt = c.erase("supp-1", suppress=True)
    assert receipt["suppressed"] and receipt["erased"][0]["id"] == "supp-1"
    for write in (lambda: c.upsert("supp-new", {"a": 2}, identifiers=[("email",
                                                                      "supp@example.org")]),
                  lambda: c.link("supp-other", [("phone", "+4799887766")], create=True),
                  lambda: c.upsert("supp-1", {"a": 3}),
                  lambda: c.track("supp-1", "visit"),
                  # a batch of one id, small and large (the column-at-a-time planner)
                  *(lambda n=n: c.track_batch([{"id": "supp-1", "event": "visit"}] * n)
                    for n in (3, 64, 500))):
        with pytest.raises(ClientError) as err:
            write()
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "suppression" in err.value.details
    with pytest.raises(LoadError) as stopped:  # load-events' path
        c.load_events([{"id": "supp-1", "event": "visit"}] * 200)
    assert stopped.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert stopped.value.applied == 0 and stopped.value.record == 0
    assert c.get("supp-new") is None and c.get("supp-other") is None and c.get("supp-1") is None
    refused: list[tuple[int, str]] = []
    applied = c.load([{"id": "supp-a", "attributes": {"a": 1}},
                      {"id": "supp-b", "identifiers": [["email", "supp@example.org"]]},
                      {"id": "supp-c", "attributes": {"a": 1}}],
                     on_refused=lambda i, pid, e: refused.append((i, pid)))
    assert refused == [(1, "supp-b")] and applied == 2
    c.upsert("supp-fine", {"a": 1}, identifiers=[("email", "other@example.org")])
    c.upsert("supp-cli", {"a": 1}, identifiers=[("email", "supp-cli@example.org")])
    done = cli(cluster["router"].address, "delete", "supp-cli", "--suppress")  # by primary id
    assert done.returncode == 0, done.stderr
    receipt = json.loads(done.stdout)
    assert receipt["suppressed"] and receipt["erased"][0]["identifiers"] == [
        ["email", "supp-cli@example.org"]]
    with pytest.raises(ClientError) as err:
        c.upsert("supp-cli-2", {}, identifiers=[("email", "supp-cli@example.org")])
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    again = cli(cluster["router"].address, "delete", "supp-cli")
    assert again.returncode == 1 and "nothing erased" in again.stderr
    c.snapshot()
    assert scan(cluster["dirs"], ["supp@example.org", "+4799887766",
                                  "supp-cli@example.org"]) == []


def test_erasure_after_a_slot_move_leaves_no_byte_on_any_shard(tmp_path: Path) -> None:
    """Profiles moved to a new shard leave copies in the old shard's log and snapshots:
    single and bulk erasures after the move, then a snapshot, leave none anywhere."""
    salt = str(tmp_path / "salt")
    shards = start_shards(tmp_path, 2, "--salt-file", salt)
    new = start_shard(tmp_path / "shard-new", "--name", "shard-2", "--sync", "off",
                      "--salt-file", salt)
    router = RouterThread([s.address for s in shards])
    dirs = [tmp_path / "shard-0", tmp_path / "shard-1", tmp_path / "shard-new"]
    try:
        with Client(router.address) as c:
            c.load({"id": f"mv-{i:04d}", "attributes": {"label": f"Movable-{i:04d}x",
                                                        "grp": i % 4},
                    "identifiers": [["email", f"mv{i:04d}@move.example"]]}
                   for i in range(300))
            c.erase("mv-0000", suppress=True)
            c.snapshot()  # the old shards' snapshots hold what is about to move
            moved = cli(router.address, "cluster", "add-shard", new.address, "--no-progress",
                        "--journal", str(tmp_path / "journal.json"))
            assert moved.returncode == 0, moved.stderr
            owners = {i: c.export(f"mv-{i:04d}")["shard"] for i in range(1, 300)}
            owned = [f"{i:04d}" for i, s in owners.items() if s == "shard-2" and i % 4 != 1]
            assert len(owned) > 30
            for n in owned:
                c.erase(f"mv-{n}")
            bulk = [f"{i:04d}" for i in owners if i % 4 == 1]
            assert {owners[int(n)] for n in bulk} == {"shard-0", "shard-1", "shard-2"}
            done = cli(router.address, "delete", "--query", "grp = 1", "--yes")
            assert done.returncode == 0, done.stderr
            assert f"erased {len(bulk)} profiles" in done.stderr
            with pytest.raises(ClientError) as err:  # suppression moved with its slots
                c.upsert("mv-again", {}, identifiers=[("email", "mv0000@move.example")])
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
            gone = [*owned, *bulk, "0000"]
            needles = [f"Movable-{n}x" for n in gone] + [f"mv{n}@move.example" for n in gone]
            assert scan(dirs, needles)  # in the logs (and older snapshots) until a snapshot
            c.snapshot()
            assert scan(dirs, needles) == []
            kept = next(f"{i:04d}" for i in owners if f"{i:04d}" not in gone)
            assert scan(dirs, [f"Movable-{kept}x"])  # the others are still there
            assert c.count("ALL") == 299 - len(owned) - len(bulk)
    finally:
        router.stop()
        for s in [*shards, new]:
            s.stop()


def swept(directory: Path) -> int:
    """Profiles erased by retention sweeps after the first three, from the router's audit
    log."""
    lines = [json.loads(line) for line in (directory / "audit.jsonl").read_text().splitlines()]
    return sum([line["profiles"] for line in lines if line["event"] == "retention"][3:])


def test_retention_erases_anonymous_profiles_past_the_ttl(tmp_path: Path) -> None:
    shards = [start_shard(None, "--name", f"shard-{i}", "--slots", f"{lo}-{hi}",
                          "--audit-log", str(tmp_path / f"shard-{i}.jsonl"))
              for i, ((lo, hi),) in enumerate(split_even(2))]
    router = RouterThread([s.address for s in shards])
    audit.open_log(tmp_path / "audit.jsonl")
    try:
        with Client(router.address) as c:
            c.load([{"id": f"anon-{i}", "attributes": {"pages": i},
                     "identifiers": [["anonymous" if i % 2 else "device", f"cookie-{i}"]]}
                    for i in range(120)])
            c.upsert("known", {"a": 1}, identifiers=[("email", "k@x"), ("device", "kd")])
            c.upsert("crm-only", {"a": 1})  # no identifiers: known by its primary id
            c.upsert("visitor", {}, identifiers=[("anonymous", "v1")])
            c.link("member", [("email", "m@x")], create=True)
            c.link("member", [("anonymous", "v2")])  # merged with a known one
            now = time.time()
            retention = Retention(router.router, 30, clock=lambda: now + 29 * 86400,
                                  batch=50)
            assert router.run(retention.sweep()) == 0  # not 30 days yet
            retention.clock = lambda: now + 31 * 86400
            counted = metrics.ERASED.labels("retention")._value.get()
            assert router.run(retention.sweep()) == 121
            assert metrics.ERASED.labels("retention")._value.get() == counted + 121
            assert c.count("ALL") == 3
            assert {c.get(p) is not None for p in ("known", "crm-only", "member")} == {True}
            assert c.get(identifier=("anonymous", "cookie-1")) is None
            assert c.get(identifier=("anonymous", "v1")) is None
            c.upsert("anon-1", {}, identifiers=[("anonymous", "cookie-1")])  # claim released
            retention.clock = lambda: time.time() + 29 * 86400
            assert router.run(retention.sweep()) == 0  # changed since: stays

            # In the background: a sweep every 50 ms while reads go on unhindered.
            c.load([{"id": f"bg-{i}", "identifiers": [["device", f"bg-dev-{i}"]]}
                    for i in range(200)])
            retention.clock = lambda: time.time() + 31 * 86400
            retention.interval = 0.05
            task = asyncio.run_coroutine_threadsafe(retention.run(), router.loop)
            slowest, deadline = 0.0, time.monotonic() + 30
            while swept(tmp_path) < 201 and time.monotonic() < deadline:
                t = time.perf_counter()
                assert c.get("known") is not None
                slowest = max(slowest, time.perf_counter() - t)
            task.cancel()
            assert swept(tmp_path) == 201 and c.count("ALL") == 3  # anon-1 went too
            assert slowest < 1.0
        batches = [json.loads(line) for i in range(2)
                   for line in (tmp_path / f"shard-{i}.jsonl").read_text().splitlines()]
        batches = [b for b in batches if b["event"] == "erasure" and b["reason"] == "retention"]
        assert sum(b["profiles"] for b in batches) >= 121 + 200
        assert max(b["profiles"] for b in batches) <= 50  # small batches, one change each
        assert not any("hashes" in b for b in batches)
        lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text()
                 .splitlines()]
        counts = [line["profiles"] for line in lines if line["event"] == "retention"]
        assert counts[:3] == [0, 121, 0]
    finally:
        audit.open_log(None)
        router.stop()
        for s in shards:
            s.stop()


def test_bad_requests_name_what_is_wrong(cluster: dict[str, Any]) -> None:
    c: Client = cluster["client"]
    with pytest.raises(ClientError) as err:
        list(c.iter_erase("nosuchattribute = 1"))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "nosuchattribute" in err.value.details
    with pytest.raises(ClientError) as err:
        list(c.iter_export("wave = "))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ClientError) as err:
        list(c.iter_export("ALL", chunk_size=10**6))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "chunk_size" in \
        err.value.details
    usage = cli(cluster["router"].address, "delete", "x", "--yes")
    assert usage.returncode == 2 and "--yes goes with --query" in usage.stderr


def test_the_async_client_exports_json_lines_made_by_the_shards(cluster: dict[str, Any]
                                                                 ) -> None:
    c: Client = cluster["client"]
    c.load({"id": f"lines-{i}", "attributes": {"batch": "lines", "n": i}} for i in range(2500))

    async def lines() -> list[dict[str, Any]]:
        from memstore import AsyncClient

        async with AsyncClient(cluster["router"].address) as a:
            out = []
            async for count, data in a.iter_export_lines('batch = "lines"', chunk_size=300):
                assert data.count(b"\n") == count <= 300
                out += [json.loads(line) for line in data.splitlines()]
            return out

    got = asyncio.run(lines())
    assert sorted(r["attributes"]["n"] for r in got) == list(range(2500))
    assert set(got[0]) == {"id", "attributes", "identifiers", "merged_ids", "version",
                           "created", "changed"}
    assert got[0]["created"].endswith("Z")


def messages(address: str, query: str, form: int) -> list[bytes]:
    """A bulk export's messages (250 profiles each, in `form`), as sent."""
    with grpc.insecure_channel(address) as channel:
        stub = memstore_pb2_grpc.MemstoreStub(channel)
        request = pb.ExportProfilesRequest(query=pb.QueryRequest(text=query), chunk_size=250,
                                           format=form)  # type: ignore[arg-type]
        return [m.SerializeToString() for m in stub.ExportProfiles(request, timeout=30)]


def test_a_router_relays_each_shards_export_messages_as_the_shard_made_them(
        cluster: dict[str, Any]) -> None:
    """A bulk export through the router is the shards' own exports, message for message
    and byte for byte (the router neither decodes nor re-makes them), in every format, with
    chunk boundaries in the middle of each shard's profiles; and its profiles are each
    shard's, each once."""
    c: Client = cluster["client"]
    c.load({"id": on_shard(i % 2, f"relay-{i}"), "attributes": {"batch": "relay", "n": i}}
           for i in range(1300))
    query = 'batch = "relay"'
    for form in pb.ExportProfilesRequest.Format.values():
        routed = messages(cluster["router"].address, query, form)
        direct: list[bytes] = []
        for shard in cluster["shards"]:
            own = messages(shard.address, query, form)
            sizes = [pb.ExportProfilesChunk.FromString(m).profiles for m in own]
            assert sizes == [250, 250, 150]  # 650 a shard
            direct += own
        assert sorted(routed) == sorted(direct)
    rows = [json.loads(line) for _, data in c.iter_export_lines(query, chunk_size=250)
            for line in data.splitlines()]
    assert sorted(r["attributes"]["n"] for r in rows) == list(range(1300))
    names = ["n", "batch", "nothing"]
    columns = list(c.iter_export_columns(query, names, chunk_size=250))
    assert sorted(n for chunk in columns for n in chunk["attributes"][0]) == list(range(1300))
    assert all(set(chunk["attributes"][1]) == {"relay"} for chunk in columns)
    assert all(chunk["attributes"][2] == [None] * len(chunk["id"]) for chunk in columns)


def test_forgetting_erased_ids_keeps_a_decision_without_naming_its_survivor() -> None:
    """Forget(ids) on a shard other than the erased profile's own: the forwards of those
    ids go, and a merge decision that names one as its survivor keeps only its slot (as
    plan_erase leaves the decisions on the profile's own shard)."""
    from memstore.engine.change import Change, Note
    from memstore.engine.core import Engine
    from memstore.hashslot import slot_of

    engine = Engine()
    engine.apply(Change(notes=[Note("forwards", "x", "y"), Note("forwards", "w", "v"),
                               Note("decided", "t1", ["y", True]),
                               Note("decided", "t2", ["v", False])]))
    engine.apply(engine.plan_forget(["x", "y", "z"]))
    assert engine.forwards == {"w": "v"}
    assert engine.decided == {"t1": [slot_of("y"), True], "t2": ["v", False]}
