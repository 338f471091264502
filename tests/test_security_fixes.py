"""Security fixes, each tested as it was found broken: a replica whose token a reload took
away kept receiving every write (Follow, a bidirectional stream, was never looked at
again); a TLS key that is not the certificate's failed late, as "Failed to bind", after
the data directory was made; an IPv6 loopback --host could not start a shard."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest

from memstore import Client
from memstore.server.security import (
    Authorizer,
    AuthTable,
    ServerSecurity,
    check_key_pair,
    host_port,
)
from tests.conftest import ROOT, said, start_shard
from tests.pki import Pki, make_pki
from tests.test_replication import Proc, start

ADMIN = "admin-token-0123456789abcdef"
REPLICA = "replica-token-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tokens(path: Path, replica_roles: str | None) -> None:
    """The primary's auth file: an operator, and the replica's token with `replica_roles`
    (None: its line removed)."""
    lines = [f"{ADMIN} admin ops"]
    if replica_roles is not None:
        lines.append(f"{REPLICA} {replica_roles} replica")
    path.write_text("\n".join(lines) + "\n")


def _wait(condition: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _refusals(metrics_url: str, method: str, code: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    pattern = 'memstore_auth_refusals_total{code="' + code + '",method="' + method + '"} '
    found = re.search(re.escape(pattern) + r"(\S+)", text)
    return float(found.group(1)) if found else 0.0


# ---------------------------------------------------------------------- revoked replica


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


@pytest.mark.parametrize(("after", "code"), [(None, "UNAUTHENTICATED"),
                                             ("read", "PERMISSION_DENIED")])
def test_a_replica_whose_token_a_reload_revoked_gets_no_more_writes(
        tmp_path: Path, procs: list[Proc], after: str | None, code: str) -> None:
    """The token removed (UNAUTHENTICATED), or its cluster role cut to read
    (PERMISSION_DENIED): the primary ends the replica's open Follow stream, idle, within
    a heartbeat of the SIGHUP, and every Follow after it is refused: a write made after
    the reload never reaches the replica."""
    auth = tmp_path / "tokens"
    _tokens(auth, "cluster")
    primary = start(tmp_path / "primary", "--auth-file", str(auth), "--metrics-port", "0")
    procs.append(primary)
    replica = start(tmp_path / "replica", "--replica-of", primary.address,
                    env={"MEMSTORE_CLUSTER_TOKEN": REPLICA})
    procs.append(replica)
    metrics_url = said(primary.lines, "metrics on ")
    assert metrics_url is not None
    # The replica reads with the token it follows with: serve-shard serves its
    # $MEMSTORE_CLUSTER_TOKEN too (role cluster), and the reload is the primary's alone.
    with Client(primary.address, token=ADMIN, timeout=10) as writer, \
            Client(replica.address, token=REPLICA, timeout=10) as reader:
        writer.upsert("before", {"x": 1})
        _wait(lambda: reader.get("before") is not None, "the replica never followed")

        _tokens(auth, after)
        primary.proc.send_signal(signal.SIGHUP)
        _wait(lambda: primary.said("reloaded"), "the primary did not reload its auth file")
        # idle: no write yet, the stream ends at its next heartbeat
        _wait(lambda: primary.said("disconnected at position"),
              "the revoked replica's stream stayed open", timeout=10)
        writer.upsert("after", {"secret": "not for the revoked replica"})
        _wait(lambda: replica.said(f"interrupted ({code}"),
              f"the replica was not told {code}", timeout=10)
        time.sleep(1.5)  # several reconnections: each refused
        assert reader.get("after") is None
    assert _refusals(metrics_url, "Follow", code) >= 1


# ---------------------------------------------------------------------- in-process streams


class _Details(NamedTuple):
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class _Context:
    """The part of a grpc.aio.ServicerContext the Authorizer uses."""

    def __init__(self) -> None:
        self.status: grpc.StatusCode | None = None
        self.details = ""

    def set_code(self, code: grpc.StatusCode) -> None:
        self.status = code

    def set_details(self, details: str) -> None:
        self.details = details

    def code(self) -> grpc.StatusCode | None:
        return self.status


async def _handler(handler: grpc.RpcMethodHandler, auth: Path) -> tuple[Any, AuthTable]:
    """`handler` as an Authorizer over `auth` wraps it, for a replica's token calling a
    Replication method (role cluster); and the table, to reload."""
    security = ServerSecurity.configure(auth_file=auth)
    assert security.auth is not None

    async def continuation(details: Any) -> Any:
        return handler

    wrapped = await Authorizer(security).intercept_service(
        continuation, _Details("/memstore.v1.Replication/Follow",  # type: ignore[arg-type]
                               (("authorization", f"Bearer {REPLICA}"),)))
    return wrapped, security.auth


def test_a_bidirectional_stream_ends_at_the_callers_next_message_after_a_reload(
        tmp_path: Path) -> None:
    """The request direction: the handler answers only when asked, so the refusal must
    come as the caller's next message arrives, and nothing more is answered."""
    auth = tmp_path / "tokens"
    _tokens(auth, "cluster")

    async def echo(requests: AsyncIterator[int], context: Any) -> AsyncIterator[int]:
        async for request in requests:
            yield request

    async def run() -> tuple[list[int], _Context]:
        wrapped, table = await _handler(grpc.stream_stream_rpc_method_handler(echo), auth)
        sent: asyncio.Queue[int | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[int]:
            while (item := await sent.get()) is not None:
                yield item

        context, answered = _Context(), []
        responses = wrapped.stream_stream(requests(), context)
        await sent.put(1)
        answered.append(await anext(responses))
        _tokens(auth, None)
        table.reload()
        await sent.put(2)
        answered.extend([item async for item in responses])
        return answered, context

    answered, context = asyncio.run(run())
    assert answered == [1]
    assert context.status == grpc.StatusCode.UNAUTHENTICATED


def test_a_client_stream_refused_midway_is_not_acted_on(tmp_path: Path) -> None:
    """A client-streaming call whose caller a reload refuses: the handler is cancelled,
    not handed a shortened stream to act on, and no response is sent."""
    auth = tmp_path / "tokens"
    _tokens(auth, "cluster")
    acted: list[list[int]] = []

    async def collect(requests: AsyncIterator[int], context: Any) -> int:
        got = [request async for request in requests]
        await asyncio.sleep(0)  # an await after the input, as a write to the log has
        acted.append(got)
        return len(got)

    async def run() -> tuple[Any, _Context]:
        wrapped, table = await _handler(grpc.stream_unary_rpc_method_handler(collect), auth)

        async def requests() -> AsyncIterator[int]:
            yield 1
            _tokens(auth, "read")
            table.reload()
            yield 2

        context = _Context()
        return await wrapped.stream_unary(requests(), context), context

    response, context = asyncio.run(run())
    assert response is None and acted == []
    assert context.status == grpc.StatusCode.PERMISSION_DENIED
    assert "needs the role 'cluster'" in context.details


# ---------------------------------------------------------------------- TLS material


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memstore.cli", *args], check=False,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [("serve-shard",), ("serve",),
                                     ("serve-router", "--shard", "127.0.0.1:1")])
def test_a_key_that_is_not_the_certificates_refuses_before_anything_is_made(
        pki: Pki, tmp_path: Path, command: tuple[str, ...]) -> None:
    data = tmp_path / "data"
    dirs = () if command[0] == "serve-router" else ("--data-dir", str(data))
    result = _run(*command, "--port", "0", *dirs, "--tls-cert", str(pki.server_cert),
                  "--tls-key", str(pki.client_key))
    assert result.returncode == 1
    assert (f"--tls-key {pki.client_key} is not the private key of --tls-cert "
            f"{pki.server_cert}") in result.stderr
    assert "bind" not in result.stderr
    assert not data.exists()


def test_tls_files_that_do_not_parse_are_named(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not PEM\n")
    with pytest.raises(ValueError, match="--tls-cert .* holds no PEM certificate"):
        check_key_pair(garbage, pki.server_key)
    with pytest.raises(ValueError, match="--tls-key .* holds no PEM private key"):
        check_key_pair(pki.server_cert, garbage)
    with pytest.raises(ValueError, match="--tls-client-ca .* holds no PEM certificate"):
        ServerSecurity.configure(pki.server_cert, pki.server_key, tls_client_ca=garbage)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n"
                         "-----END ENCRYPTED PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="is encrypted"):
        check_key_pair(pki.server_cert, encrypted)
    check_key_pair(pki.server_cert, pki.server_key)


def test_client_tls_flags_are_named_in_their_errors(pki: Pki) -> None:
    alone = _run("stats", "--tls-cert", str(pki.client_cert))
    assert alone.returncode == 2 and "--tls-cert and --tls-key" in alone.stderr
    assert "tls_cert" not in alone.stderr
    no_ca = _run("stats", "--tls-cert", str(pki.client_cert), "--tls-key",
                 str(pki.client_key))
    assert no_ca.returncode == 2 and "give --tls-ca" in no_ca.stderr
    swapped = _run("stats", "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
                   "--tls-key", str(pki.server_key))
    assert swapped.returncode == 2 and "is not the private key of --tls-cert" in swapped.stderr


# ---------------------------------------------------------------------- IPv6 --host


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_host_port_brackets_ipv6_literals() -> None:
    assert host_port("::1", 7070) == "[::1]:7070"
    assert host_port("[::1]", 7070) == "[::1]:7070"
    assert host_port("127.0.0.1", 7070) == "127.0.0.1:7070"
    assert host_port("localhost", "0") == "localhost:0"


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_a_shard_serves_on_ipv6_loopback(host: str) -> None:
    """gRPC, the link and the metrics endpoint all listen on ::1, given bare or in
    brackets; the address it prints is one a client reads back (brackets)."""
    server = start_shard(None, "--host", host, "--metrics-port", "0")
    try:
        assert server.address.startswith("[::1]:")
        port = server.address.rpartition(":")[2]
        with Client(f"[::1]:{port}", timeout=10) as c:
            c.upsert("u", {"x": 1})
            assert c.get("u")["attributes"] == {"x": 1}
        with Client(f"[::1]:{port}", timeout=10, link=True) as c:
            assert c.get("u")["attributes"] == {"x": 1}
        url = said(server.startup, "metrics on ")
        assert url is not None
        metrics_port = url.rsplit(":", 1)[1].split("/")[0]
        text = urllib.request.urlopen(f"http://[::1]:{metrics_port}/metrics",
                                      timeout=5).read()
        assert b"memstore_profiles" in text
    finally:
        server.stop()
