"""Security, tried as an attacker on the same network would: TLS on and off, mutual TLS,
each role against each method family, tokens reloaded on SIGHUP, the link closed without
credentials, a rogue shard refused, audit lines. Real processes, real certificates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memstore import Client
from memstore.client.core import ClientError
from memstore.server.logs import listening_address
from memstore.server.security import Credentials, ServerSecurity, needs
from memstore.v1 import cluster_pb2 as cpb
from memstore.v1 import cluster_pb2_grpc, memstore_pb2_grpc
from memstore.v1 import memstore_pb2 as pb
from tests.conftest import ROOT, ServerProcess, said, start_shard
from tests.pki import Pki, make_pki

TOKENS = {role: f"{role}-token-0123456789abcdef" for role in ("read", "write", "admin",
                                                               "cluster")}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _auth_file(path: Path, tokens: dict[str, str] = TOKENS, extra: str = "") -> Path:
    path.write_text("# memstore tokens\n" + "".join(
        f"{token} {role} {role}-user\n" for role, token in tokens.items()) + extra)
    return path


def _code(call: Any) -> grpc.StatusCode:
    try:
        call()
    except ClientError as exc:
        return exc.code
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return,attr-defined]
    return grpc.StatusCode.OK


# ---------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_shard(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_shard(tmp_path_factory.mktemp("tls") / "d", "--tls-cert",
                         str(pki.server_cert), "--tls-key", str(pki.server_key),
                         "--metrics-port", "0")
    yield server
    server.stop()


def test_tls_serves_only_tls(tls_shard: ServerProcess, pki: Pki) -> None:
    with Client(tls_shard.address, tls_ca=str(pki.ca), timeout=5) as c:
        c.upsert("t1", {"a": 1})
        assert c.get("t1")["attributes"] == {"a": 1}
    with Client(tls_shard.address, timeout=3) as plain:  # plaintext: refused
        assert _code(lambda: plain.get("t1")) == grpc.StatusCode.UNAVAILABLE
    with Client(tls_shard.address, tls_ca=str(pki.rogue_cert), timeout=3) as wrong_ca:
        assert _code(lambda: wrong_ca.get("t1")) == grpc.StatusCode.UNAVAILABLE
    # no plaintext port: the link is off, metrics are HTTPS
    with grpc.secure_channel(tls_shard.address, grpc.ssl_channel_credentials(
            pki.ca.read_bytes())) as channel:
        info = cluster_pb2_grpc.ShardControlStub(channel).GetShardInfo(
            cpb.ShardInfoRequest(), timeout=5)
    assert info.link_port == 0 and info.link_token == ""
    assert (said(tls_shard.startup, "metrics on ") or "").startswith("https://")


def test_mutual_tls(pki: Pki, tmp_path: Path) -> None:
    server = start_shard(tmp_path / "d", "--tls-cert", str(pki.server_cert), "--tls-key",
                         str(pki.server_key), "--tls-client-ca", str(pki.ca))
    try:
        with Client(server.address, tls_ca=str(pki.ca), tls_cert=str(pki.client_cert),
                    tls_key=str(pki.client_key), timeout=5) as c:
            c.upsert("m1", {"a": 1})
            c.declare([{"name": "b", "kind": "int"}])  # no auth file: every role
        with Client(server.address, tls_ca=str(pki.ca), timeout=3) as anonymous:
            assert _code(lambda: anonymous.get("m1")) == grpc.StatusCode.UNAVAILABLE
        with Client(server.address, tls_ca=str(pki.ca), tls_cert=str(pki.rogue_cert),
                    tls_key=str(pki.rogue_key), timeout=3) as rogue:
            assert _code(lambda: rogue.get("m1")) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


# ---------------------------------------------------------------------- roles


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("guarded")
    auth = _auth_file(root / "tokens")
    audit = root / "audit.jsonl"
    server = start_shard(root / "d", "--auth-file", str(auth), "--audit-log", str(audit),
                         "--metrics-port", "0")
    with Client(server.address, token=TOKENS["admin"]) as admin:
        admin.upsert("p1", {"city": "Oslo"}, identifiers=[("email", "p1@example.com")])
    yield {"server": server, "auth": auth, "audit": audit}
    server.stop()


# (method family, a call, the roles that may make it)
def _calls(c: Client) -> list[tuple[str, Any, set[str]]]:
    return [
        ("read: Get", lambda: c.get("p1"), {"read", "write", "admin", "cluster"}),
        ("read: by identifier", lambda: c.get(identifier=("email", "p1@example.com")),
         {"read", "write", "admin", "cluster"}),
        ("read: Count", lambda: c.count('city = "Oslo"'), {"read", "write", "admin", "cluster"}),
        ("read: schema", lambda: c.schema(), {"read", "write", "admin", "cluster"}),
        ("read: stats", lambda: c.stats(), {"read", "write", "admin", "cluster"}),
        ("write: Upsert", lambda: c.upsert("p2", {"city": "Rome"}), {"write", "admin", "cluster"}),
        ("write: Track", lambda: c.track("p2", "visit"), {"write", "admin", "cluster"}),
        ("write: Link", lambda: c.link("p2", [("device", "d2")]), {"write", "admin", "cluster"}),
        ("write: Delete", lambda: c.delete("p3"), {"write", "admin", "cluster"}),
        ("admin: DeclareAttributes", lambda: c.declare([{"name": "tier", "kind": "string"}]),
         {"admin", "cluster"}),
        ("admin: Snapshot", lambda: c.snapshot(), {"admin", "cluster"}),
    ]


@pytest.mark.parametrize("role", [*TOKENS, None, "unknown"])
def test_each_role_against_each_method_family(guarded: dict[str, Any], role: str | None
                                              ) -> None:
    token = TOKENS.get(role or "", "not-a-token-0123456789" if role else None)
    with Client(guarded["server"].address, token=token, timeout=5) as c:
        for family, call, allowed in _calls(c):
            code = _code(call)
            if role in allowed:
                assert code == grpc.StatusCode.OK, family
            elif role in TOKENS:
                assert code == grpc.StatusCode.PERMISSION_DENIED, family
            else:
                assert code == grpc.StatusCode.UNAUTHENTICATED, family
        if role in ("read", "write"):
            with pytest.raises(ClientError) as refused:
                c.declare([{"name": "tier", "kind": "string"}])
            assert "DeclareAttributes needs the role 'admin'" in refused.value.details
            assert f"{role}-user" in refused.value.details
    # the cluster's own RPCs: cluster members and operators only
    channel = grpc.insecure_channel(guarded["server"].address)
    control = cluster_pb2_grpc.ShardControlStub(channel)
    for member in (None, "read", "write", "admin", "cluster"):
        metadata = (("authorization", f"Bearer {TOKENS[member]}"),) if member else ()
        code = _code(lambda m=metadata: control.GetShardInfo(cpb.ShardInfoRequest(),  # type: ignore[misc]
                                                             timeout=5, metadata=m))
        assert code == {None: grpc.StatusCode.UNAUTHENTICATED,
                        "read": grpc.StatusCode.PERMISSION_DENIED,
                        "write": grpc.StatusCode.PERMISSION_DENIED}.get(
                            member, grpc.StatusCode.OK), member
    # health stays open (load balancers probe it); the link is closed
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                       timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    info = control.GetShardInfo(cpb.ShardInfoRequest(), timeout=5,
                                metadata=(("authorization", f"Bearer {TOKENS['cluster']}"),))
    assert info.link_port == 0
    channel.close()


def test_attacks_from_the_issue_are_refused(guarded: dict[str, Any]) -> None:
    """Without credentials: read by email, Delete, declare a kind, SetSlots + DropSlots."""
    address = guarded["server"].address
    with Client(address, timeout=5) as anonymous:
        assert _code(lambda: anonymous.get(identifier=("email", "p1@example.com"))) == \
            grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: anonymous.delete("p1")) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: anonymous.declare([{"name": "city2", "kind": "int"}])) == \
            grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(address) as channel:
        control = cluster_pb2_grpc.ShardControlStub(channel)
        assert _code(lambda: control.SetSlots(cpb.SetSlotsRequest(epoch=99, slots=[]),
                                              timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: control.DropSlots(cpb.DropSlotsRequest(slots=[]), timeout=5)) \
            == grpc.StatusCode.UNAUTHENTICATED
    with Client(address, token=TOKENS["read"]) as c:
        assert c.get("p1")["attributes"]["city"] == "Oslo"


def test_a_token_removed_by_a_sighup_reload(guarded: dict[str, Any]) -> None:
    import threading

    server, auth = guarded["server"], guarded["auth"]
    fresh = "fresh-token-0123456789abcdef"
    # A stream opened with the token to be removed: it ends with it (no deadline of its own)
    streaming = Client(server.address, token=TOKENS["write"], timeout=None)
    ended: list[BaseException] = []
    opened = threading.Event()

    def watch() -> None:
        try:
            for _ in streaming.changes(heartbeats=True):
                opened.set()
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            ended.append(exc)
        opened.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert opened.wait(10) and not ended
    with Client(server.address, token=fresh, timeout=5) as c:
        assert _code(lambda: c.get("p1")) == grpc.StatusCode.UNAUTHENTICATED
        _auth_file(auth, {r: t for r, t in TOKENS.items() if r != "write"},
                   extra=f"{fresh} read fresh\n")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while _code(lambda: c.get("p1")) != grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "the reload did not take the new token"
            time.sleep(0.1)
    with Client(server.address, token=TOKENS["write"], timeout=5) as removed:
        assert _code(lambda: removed.get("p1")) == grpc.StatusCode.UNAUTHENTICATED
    watcher.join(10)
    assert ended and getattr(ended[0], "code", None) == grpc.StatusCode.UNAUTHENTICATED
    streaming.close()
    _auth_file(auth, extra="broken line with four fields\n")  # kept the last good table
    server.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    with Client(server.address, token=fresh, timeout=5) as c:
        assert _code(lambda: c.get("p1")) == grpc.StatusCode.OK
    _auth_file(auth)  # as the other tests expect it
    server.proc.send_signal(signal.SIGHUP)
    with Client(server.address, token=TOKENS["write"], timeout=5) as back:
        deadline = time.monotonic() + 10
        while _code(lambda: back.get("p1")) != grpc.StatusCode.OK:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_deletes_and_declarations_are_audited_without_the_token(guarded: dict[str, Any]
                                                               ) -> None:
    with Client(guarded["server"].address, token=TOKENS["admin"]) as c:
        c.upsert("gone", {"city": "Lima"})
        c.delete("gone")
        c.declare([{"name": "audited", "kind": "bool"}])
    lines = [json.loads(line) for line in guarded["audit"].read_text().splitlines()]
    mine = [(e["method"], e["by"], e["code"]) for e in lines if e["event"] == "call"]
    assert ("Delete", "admin-user", "OK") in mine
    assert ("DeclareAttributes", "admin-user", "OK") in mine
    assert all(token not in guarded["audit"].read_text() for token in TOKENS.values())


def test_refusals_are_counted_in_the_metrics(guarded: dict[str, Any]) -> None:
    import re
    import urllib.request

    url = said(guarded["server"].startup, "metrics on ")
    assert url is not None

    def refused(code: str) -> float:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        pattern = 'memstore_auth_refusals_total{code="' + code + '",method="Get"} '
        found = re.search(re.escape(pattern) + r"(\S+)", text)
        return float(found.group(1)) if found else 0.0

    before = refused("UNAUTHENTICATED"), refused("PERMISSION_DENIED")
    with Client(guarded["server"].address, timeout=5) as anonymous:
        for _ in range(3):
            assert _code(lambda: anonymous.get("p1")) == grpc.StatusCode.UNAUTHENTICATED
    assert refused("UNAUTHENTICATED") == before[0] + 3
    assert refused("PERMISSION_DENIED") == before[1]


# ---------------------------------------------------------------------- start-up rules


def test_a_non_loopback_host_needs_tls_tokens_or_insecure(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "memstore.cli", "serve-shard", "--host",
                             "0.0.0.0", "--port", "0", "--in-memory"], check=False, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "refusing to listen on 0.0.0.0" in result.stderr
    server = start_shard(None, "--host", "0.0.0.0", "--insecure")
    server.stop()
    with pytest.raises(ValueError, match="refusing to listen"):
        ServerSecurity().check_host("10.1.2.3")
    ServerSecurity().check_host("127.0.0.1")
    ServerSecurity().check_host("localhost")


def test_an_auth_file_that_is_wrong_refuses_to_start(tmp_path: Path) -> None:
    for text, message in (("short read\n", "at least 16 characters"),
                          ("0123456789abcdefgh reader\n", "is not a role list"),
                          ("0123456789abcdefgh read a b\n", "expected TOKEN ROLE"),
                          # fields swapped: the token must not reach the message or logs
                          ("read 0123456789abcdefgh-secret\n", "is not a role list")):
        (tmp_path / "t").write_text(text)
        result = subprocess.run([sys.executable, "-m", "memstore.cli", "serve-shard", "--port",
                                 "0", "--in-memory", "--auth-file", str(tmp_path / "t")],
                                check=False, cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert "0123456789abcdefgh" not in result.stderr


def test_every_method_has_a_role() -> None:
    """A new RPC must be placed in a role family, never left to the operator-only default
    by accident: every Memstore method is read, write or admin as listed."""
    for method in pb.DESCRIPTOR.services_by_name["Memstore"].methods:
        need = needs(f"/memstore.v1.Memstore/{method.name}")
        assert need is not None and need.name in ("read", "write", "admin"), method.name
        assert "admin" in need.roles and "cluster" in need.roles, method.name
    for method in cpb.DESCRIPTOR.services_by_name["ShardControl"].methods:
        need = needs(f"/memstore.v1.ShardControl/{method.name}")
        assert need is not None and need.roles == {"cluster", "admin"}
    assert needs("/grpc.health.v1.Health/Check") is None


def test_data_rights_methods_have_the_roles_their_data_calls_for() -> None:
    """One person's export is a read, as a Get is; one erasure a write, as Delete always
    was; everyone's data at once, or many people erased, needs admin."""
    def role(method: str) -> str:
        need = needs(f"/memstore.v1.Memstore/{method}")
        assert need is not None
        return need.name

    assert [role(m) for m in ("ExportProfile", "Delete", "ExportProfiles",
                              "EraseProfiles")] == ["read", "write", "admin", "admin"]
    assert "write" not in needs("/memstore.v1.Memstore/ExportProfiles").roles  # type: ignore[union-attr]
    assert needs("/memstore.v1.ShardControl/Suppress").roles == {"cluster", "admin"}  # type: ignore[union-attr]


# ---------------------------------------------------------------------- a secured cluster


def _serve_secured(pki: Pki, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """`memstore serve` (2 shards) with TLS and an auth file, and its router's address once
    it listens."""
    auth = _auth_file(tmp_path / "tokens")
    proc = subprocess.Popen(
        [sys.executable, "-m", "memstore.cli", "serve", "--shards", "2", "--port", "0",
         "--data-dir", str(tmp_path / "data"), "--tls-cert", str(pki.server_cert),
         "--tls-key", str(pki.server_key), "--auth-file", str(auth), *extra],
        cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    address = ""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        address = listening_address(line, "supervisor") or ""
        if address:
            break
    assert address, "".join(lines)
    return proc, address


def test_a_secured_cluster_end_to_end(pki: Pki, tmp_path: Path) -> None:
    """memstore serve with TLS and tokens: the CLI and the client work with credentials and
    fail without; add-shard needs admin; a rogue shard is refused by the router."""
    proc, address = _serve_secured(pki, tmp_path)
    env = {**os.environ, "MEMSTORE_TLS_CA": str(pki.ca), "MEMSTORE_ADDRESS": address}

    def cli(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "memstore.cli", *args], check=False,
                              cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**env, **({"MEMSTORE_TOKEN": token} if token else {})})

    try:
        people = tmp_path / "people.jsonl"
        people.write_text("".join(json.dumps({"id": f"s{i}", "attributes": {"n": i}}) + "\n"
                                  for i in range(50)))
        assert cli("load", str(people), "--no-progress").returncode == 1  # no token
        assert cli("load", str(people), "--no-progress", token=TOKENS["read"]).returncode == 1
        loaded = cli("load", str(people), "--no-progress", token=TOKENS["write"])
        assert loaded.returncode == 0 and "loaded 50 profiles" in loaded.stdout
        assert cli("query", "--count", "n >= 10", token=TOKENS["read"]).stdout.strip() == "40"
        with Client(address, tls_ca=str(pki.ca), token=TOKENS["read"]) as c:
            assert c.get("s7")["attributes"] == {"n": 7}
        with Client(address, timeout=3) as plain:
            assert _code(lambda: plain.count("ALL")) == grpc.StatusCode.UNAVAILABLE
        # A rogue shard (TLS with another CA's certificate), told to the router: only an
        # admin may, and the router refuses a shard it cannot verify.
        import asyncio

        from shards.admin import admin_call

        rogue = start_shard(None, "--slots", "0-1", "--tls-cert", str(pki.rogue_cert),
                            "--tls-key", str(pki.rogue_key))
        try:
            for token, expected in ((None, grpc.StatusCode.UNAUTHENTICATED),
                                    (TOKENS["write"], grpc.StatusCode.PERMISSION_DENIED),
                                    (TOKENS["admin"], grpc.StatusCode.INVALID_ARGUMENT)):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    asyncio.run(admin_call(address, "AddShard", {"address": rogue.address},
                                           credentials=Credentials.load(pki.ca, token=token)))
                assert refused.value.code() == expected
            assert "is not reachable" in (refused.value.details() or "")
            status = cli("cluster", "status", token=TOKENS["admin"])
            assert status.returncode == 0 and rogue.address not in status.stdout
            assert "2 shards, 16384 of 16384 slots owned" in status.stdout
        finally:
            rogue.stop()
        with Client(address, tls_ca=str(pki.ca), token=TOKENS["read"]) as c:
            assert c.count("ALL") == 50
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_a_secured_cluster_with_sync_replicas_reads_from_them(pki: Pki, tmp_path: Path
                                                              ) -> None:
    """memstore serve --replicas 1 --replication sync under TLS and tokens: each replica
    follows its shard over TLS with the cluster token (else no write would be
    acknowledged), and the router's reads with --read-from replica are the replicas'."""
    proc, address = _serve_secured(pki, tmp_path, "--tls-ca", str(pki.ca), "--replicas", "1",
                                   "--replication", "sync", "--read-from", "replica")
    _drain(proc.stderr)
    try:
        with Client(address, tls_ca=str(pki.ca), token=TOKENS["write"], timeout=30) as c:
            for i in range(20):
                c.upsert(f"s{i}", {"n": i})  # sync: each waits for its shard's replica
        credentials = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(pki.ca.read_bytes()),
            grpc.access_token_call_credentials(TOKENS["read"]))
        with grpc.secure_channel(address, credentials) as channel:
            stub = memstore_pb2_grpc.MemstoreStub(channel)
            answer, call = stub.Count.with_call(pb.QueryRequest(text="n >= 10"), timeout=30)
            assert answer.count == 10
            trailers = dict(call.trailing_metadata())
            assert "memstore-replica-lag-bytes" in trailers  # the replicas answered
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def _drain(stream: Any) -> None:
    """Keep reading a process's log so that it never blocks on a full pipe."""
    import threading

    threading.Thread(target=lambda: all(True for _ in stream), daemon=True).start()


def test_credentials_are_checked_when_built(pki: Pki) -> None:
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        Credentials.load(pki.ca, pki.client_cert, None)
    with pytest.raises(ValueError, match="give tls_ca too"):
        Credentials.load(None, pki.client_cert, pki.client_key)
    assert Credentials.load(pki.ca).tls


def test_files_a_server_writes_are_its_users_alone(tmp_path: Path) -> None:
    """Logs and snapshots hold personal data in the clear: 0600, in 0700 directories,
    whatever the umask memstore was started with."""
    import os
    import stat

    from memstore import Client
    from tests.conftest import start_shard

    old = os.umask(0o022)
    try:
        shard = start_shard(tmp_path / "data")
    finally:
        os.umask(old)
    try:
        with Client(shard.address) as c:
            c.upsert("someone", {"ssn": "078-05-1120"})
            c.snapshot()
    finally:
        shard.stop()
    paths = list((tmp_path / "data").rglob("*"))
    assert any(p.suffix == ".snap" for p in paths) and any(p.suffix == ".log" for p in paths)
    for path in [tmp_path / "data", *paths]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
