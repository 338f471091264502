"""Operators' files and directories, with real processes: an export never spoils an earlier
good export at its --output when it is refused or fails; each command given the other
kind of data directory (a `memstore serve` cluster's, one shard's) refuses it before it
writes anything, and says which command fits; `memstore check` on a cluster's directory
checks each shard in it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from memstore import Client
from memstore.client.export import replacing
from memstore.server.logs import listening_address
from memstore.storage.datadir import WrongDataDirectory
from tests.conftest import ROOT, ServerProcess, start_shard

TOKENS = {"admin": "admin-token-0123456789abcdef", "write": "write-token-0123456789abcdef"}
PEOPLE = [(f"p{i}", {"city": "Oslo" if i % 2 else "Rome", "n": i}) for i in range(40)]


def memstore(*args: str, token: str | None = None, timeout: float = 120
             ) -> subprocess.CompletedProcess[str]:
    """`python -m memstore.cli ARGS` to its end: exit status, stdout, stderr."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MEMSTORE_TOKEN", None)
    if token is not None:
        env["MEMSTORE_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "memstore.cli", *args], check=False,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def listing(directory: Path) -> dict[str, tuple[int, int]]:
    """Every entry under `directory`: its size and modification time (ns), by path."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


# ---------------------------------------------------------------------- export

@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A shard with tokens: admin may export, write may not; PEOPLE loaded."""
    root = tmp_path_factory.mktemp("guarded")
    auth = root / "tokens"
    auth.write_text("".join(f"{t} {role} {role}-user\n" for role, t in TOKENS.items()))
    server = start_shard(root / "d", "--auth-file", str(auth))
    with Client(server.address, token=TOKENS["admin"]) as admin:
        for pid, attributes in PEOPLE:
            admin.upsert(pid, attributes)
    yield server
    server.stop()


def _export(server: ServerProcess, output: Path, token: str = TOKENS["admin"],
            address: str | None = None) -> subprocess.CompletedProcess[str]:
    return memstore("export", "--query", "ALL", "--output", str(output), "--no-progress",
                    "--address", address or server.address, token=token)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name)


@pytest.mark.parametrize("name", ["people.jsonl", "people.parquet"])
def test_a_refused_export_leaves_the_earlier_export_as_it_was(
        guarded: ServerProcess, tmp_path: Path, name: str) -> None:
    output = tmp_path / name
    assert _export(guarded, output).returncode == 0
    good = output.read_bytes()
    refused = _export(guarded, output, token=TOKENS["write"])
    assert refused.returncode == 1
    assert "PERMISSION_DENIED" in refused.stderr and "admin" in refused.stderr
    assert output.read_bytes() == good
    assert _leftovers(tmp_path) == []


def test_an_export_to_an_unreachable_server_leaves_the_earlier_export(
        guarded: ServerProcess, tmp_path: Path) -> None:
    output = tmp_path / "people.jsonl"
    assert _export(guarded, output).returncode == 0
    good = output.read_bytes()
    failed = _export(guarded, output, address="127.0.0.1:1")
    assert failed.returncode == 1 and "UNAVAILABLE" in failed.stderr
    assert output.read_bytes() == good
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["people.jsonl", "people.parquet"])
def test_a_complete_export_replaces_the_file_keeping_its_permissions(
        guarded: ServerProcess, tmp_path: Path, name: str) -> None:
    output = tmp_path / name
    output.write_bytes(b"an older file\n")
    output.chmod(0o640)
    done = _export(guarded, output)
    assert done.returncode == 0, done.stderr
    assert f"exported {len(PEOPLE)} profiles" in done.stderr
    assert stat.S_IMODE(output.stat().st_mode) == 0o640
    assert _leftovers(tmp_path) == []
    if name.endswith(".jsonl"):
        lines = output.read_text().splitlines()
        assert "schema" in json.loads(lines[0])
        assert sorted(json.loads(line)["id"] for line in lines[1:]) == sorted(
            pid for pid, _ in PEOPLE)
    else:
        import pyarrow.parquet as pq

        assert pq.read_table(output).num_rows == len(PEOPLE)


def test_an_export_through_a_symlink_replaces_its_target(
        guarded: ServerProcess, tmp_path: Path) -> None:
    target = tmp_path / "real.jsonl"
    target.write_bytes(b"an older file\n")
    link = tmp_path / "latest.jsonl"
    link.symlink_to(target)
    assert _export(guarded, link).returncode == 0
    assert link.is_symlink()
    assert len(target.read_text().splitlines()) == len(PEOPLE) + 1


def test_an_export_to_standard_output_or_a_pipe_streams_in_place(
        guarded: ServerProcess, tmp_path: Path) -> None:
    to_stdout = memstore("export", "--query", "ALL", "--no-progress", "--address",
                         guarded.address, token=TOKENS["admin"])
    assert to_stdout.returncode == 0, to_stdout.stderr
    assert len(to_stdout.stdout.splitlines()) == len(PEOPLE) + 1
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    assert _export(guarded, fifo).returncode == 0
    reader.join(30)
    assert stat.S_ISFIFO(fifo.stat().st_mode)  # written through, not renamed over
    assert len(received[0].splitlines()) == len(PEOPLE) + 1


def test_an_export_that_breaks_mid_stream_leaves_the_earlier_file(tmp_path: Path) -> None:
    """The stream's failure at any point after the file was begun: what the CLI's
    ClientError from a broken ExportProfiles stream does inside files.replacing."""
    output = tmp_path / "people.jsonl"
    output.write_bytes(b"the earlier export\n")
    with pytest.raises(ConnectionError), replacing(output) as partial:
        partial.write_bytes(b'{"schema": []}\n{"id": "p1"}\n')
        raise ConnectionError("the stream broke")
    assert output.read_bytes() == b"the earlier export\n"
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------- data directories

def _serve(data: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """`memstore serve` on `data`, and its router's address once it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "memstore.cli", "serve", "--port", "0", "--data-dir",
         str(data), "--sync", "off", *extra],
        cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        address = listening_address(line, "supervisor")
        if address:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # never blocks
            return proc, address
    proc.wait(30)
    raise AssertionError("memstore serve did not start:\n" + "".join(lines))


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of a stopped 2-shard `memstore serve` cluster holding PEOPLE, started
    on an empty directory."""
    data = tmp_path_factory.mktemp("cluster") / "data"
    data.mkdir()
    proc, address = _serve(data, "--shards", "2")
    try:
        with Client(address) as client:
            for pid, attributes in PEOPLE:
                client.upsert(pid, attributes)
    finally:
        _stop(proc)
    assert {"cluster.json", "shard-0", "shard-1"} <= {p.name for p in data.iterdir()}
    return data


def test_serve_shard_refuses_a_cluster_directory(cluster: Path) -> None:
    before = listing(cluster)
    refused = memstore("serve-shard", "--port", "0", "--data-dir", str(cluster), timeout=60)
    assert refused.returncode == 1
    assert f"{cluster} is the data directory of a `memstore serve` cluster" in refused.stderr
    assert "cluster.json" in refused.stderr and str(cluster / "shard-0") in refused.stderr
    assert f"memstore serve --data-dir {cluster}" in refused.stderr
    assert listing(cluster) == before


def test_a_cluster_directory_without_cluster_json_is_still_refused(
        cluster: Path, tmp_path: Path) -> None:
    """A first start of `memstore serve` stopped before it wrote cluster.json."""
    data = tmp_path / "data"
    shutil.copytree(cluster, data)
    (data / "cluster.json").unlink()
    before = listing(data)
    refused = memstore("serve-shard", "--port", "0", "--data-dir", str(data), timeout=60)
    assert refused.returncode == 1 and "shard-0, shard-1" in refused.stderr
    assert listing(data) == before


def test_a_shard_refuses_a_cluster_directory_before_locking_it(cluster: Path) -> None:
    from memstore.shard import Shard, ShardConfig

    before = listing(cluster)
    with pytest.raises(WrongDataDirectory, match="memstore serve"):
        asyncio.run(Shard.open(ShardConfig(data_dir=cluster)))
    assert listing(cluster) == before


def test_serve_refuses_a_shard_directory(cluster: Path) -> None:
    shard = cluster / "shard-0"
    before = listing(cluster)
    refused = memstore("serve", "--port", "0", "--data-dir", str(shard), timeout=60)
    assert refused.returncode == 1
    assert f"{shard} is the data directory of a single shard" in refused.stderr
    assert f"memstore serve-shard --data-dir {shard}" in refused.stderr
    assert listing(cluster) == before


def test_repair_refuses_a_cluster_directory(cluster: Path) -> None:
    before = listing(cluster)
    refused = memstore("repair", str(cluster), "--yes")
    assert refused.returncode == 1
    assert "give `memstore repair` one shard's directory" in refused.stderr
    assert listing(cluster) == before


def test_check_on_a_cluster_directory_checks_every_shard(cluster: Path) -> None:
    before = listing(cluster)
    checked = memstore("check", str(cluster))
    assert checked.returncode == 0, checked.stdout
    assert f"== shard-0 ({cluster / 'shard-0'})" in checked.stdout
    assert f"== shard-1 ({cluster / 'shard-1'})" in checked.stdout
    assert checked.stdout.splitlines()[-1] == "cluster: shard-0 ok, shard-1 ok"
    assert listing(cluster) == before


def test_check_on_a_cluster_directory_fails_for_a_missing_shard(
        cluster: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(cluster, data)
    shutil.rmtree(data / "shard-1")
    checked = memstore("check", str(data))
    assert checked.returncode == 1
    assert "MISSING" in checked.stdout
    assert checked.stdout.splitlines()[-1] == "cluster: shard-0 ok, shard-1 MISSING"


def test_each_kind_still_starts_on_its_own_directory(cluster: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(cluster, data)
    proc, address = _serve(data)
    try:
        with Client(address) as client:
            assert client.count("ALL") == len(PEOPLE)
    finally:
        _stop(proc)
    shard = start_shard(data / "shard-0")  # one shard of it, alone
    try:
        with Client(shard.address) as client:
            assert 0 < client.count("ALL") < len(PEOPLE)
    finally:
        assert shard.stop() == 0


def test_serve_shard_still_starts_on_a_new_or_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for data in (tmp_path / "new", tmp_path / "empty"):
        shard = start_shard(data)
        try:
            with Client(shard.address) as client:
                assert client.count("ALL") == 0
        finally:
            assert shard.stop() == 0
        assert (data / "log").is_dir()
