"""Who may call what: TLS on a server's ports, tokens with roles, and the credentials a
process presents when it calls another.

Server side (`ServerSecurity`):
- TLS: `--tls-cert`/`--tls-key` serve every gRPC port over TLS; `--tls-client-ca` also
  requires a client certificate signed by that CA (mutual TLS). Where TLS is on, no port
  speaks plaintext: the link (memstore/server/link.py), which has no TLS, is off, and the metrics
  endpoint serves HTTPS with the same certificate.
- Tokens: `--auth-file` lists `TOKEN ROLE[,ROLE...] [NAME]` a line (`#` comments), and
  `cert:COMMON-NAME ROLE[,ROLE...] [NAME]` for client certificates; re-read on SIGHUP,
  after which a stream open under the old table (a watch, a replica's Follow) is looked
  at again at its next message in either direction (`_Standing`).
  Callers send `authorization: Bearer TOKEN`. Tokens are kept as SHA-256 digests and found
  by digest, so neither the table nor the time a look-up takes tells anything about a
  token's characters. With mutual TLS and no auth file, every verified certificate has
  every role (the CA is the authorization).
- Roles: `read` (reads, queries, schema, stats, reflection), `write` (read + writes),
  `admin` (everything: declarations, snapshots, cluster commands), `cluster` (what routers
  and shards call each other: every Memstore and ShardControl method, not the operators'
  RouterAdmin). A missing or unknown credential is UNAUTHENTICATED; a known one without the
  role is PERMISSION_DENIED naming the role needed. Health checks stay open.
- Nothing configured: plaintext and no authentication, as before, but only on loopback:
  binding another address without TLS or an auth file refuses to start unless `--insecure`.

Client side (`Credentials`): a CA to verify servers, a client certificate and key, a token;
`channel()`/`aio_channel()` open channels that present them on every call.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import secrets
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from memstore.errors import capped
from memstore.server import audit, metrics

log = logging.getLogger("memstore.security")

ROLES = ("read", "write", "admin", "cluster")


class Need(NamedTuple):
    """What a method needs: the role named in refusals, and every role that suffices."""

    name: str
    roles: frozenset[str]


READ = Need("read", frozenset({"read", "write", "admin", "cluster"}))
WRITE = Need("write", frozenset({"write", "admin", "cluster"}))
ADMIN = Need("admin", frozenset({"admin", "cluster"}))  # routers forward these to shards
OPERATOR = Need("admin", frozenset({"admin"}))
MEMBER = Need("cluster", frozenset({"cluster", "admin"}))  # ShardControl: members, operators

MEMSTORE_WRITES = frozenset({"Upsert", "BatchUpsert", "Delete", "Link", "Track",
                             "TrackBatch", "CreateSegment", "DeleteSegment"})
# Bulk data rights are admin's: every profile's data at once, or many people erased.
MEMSTORE_ADMIN = frozenset({"DeclareAttributes", "Snapshot", "ExportProfiles", "EraseProfiles"})
# ExportProfile returns one person's data, as Get does (plus kinds and times): a read.
MEMSTORE_READS = frozenset({"Get", "BatchGet", "GetSchema", "Count", "QueryIds", "StreamIds",
                            "GroupBy", "QueryBitmap", "Stats", "ExportProfile",
                            "ListSegments", "WatchSegments", "WatchChanges"})
ROUTER_READS = frozenset({"ListShards"})  # direct_reads clients ask it
# Calls that change the cluster, erase data or export it: one audit line each
# (memstore.server.audit).
AUDITED = frozenset({"Delete", "DeclareAttributes", "SetSlots", "DropSlots", "AddShard",
                     "RemoveShard", "RebuildDirectory", "Snapshot", "ExportProfile",
                     "ExportProfiles", "EraseProfiles", "Suppress", "CreateSegment",
                     "DeleteSegment"})
OPEN_SERVICES = ("/grpc.health.v1.Health/",)
READ_SERVICES = ("/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/", "/memstore.link.v1.Link/")
MIN_TOKEN = 16  # characters; shorter tokens are refused when the file is read


def needs(method: str) -> Need | None:
    """The roles that may call `method` (a full gRPC path); None: anyone (health)."""
    if method.startswith(OPEN_SERVICES):
        return None
    if method.startswith(READ_SERVICES):
        return READ
    service, _, name = method.rpartition("/")
    if service == "/memstore.v1.Memstore":
        if name in MEMSTORE_READS:
            return READ
        if name in MEMSTORE_WRITES:
            return WRITE
        return ADMIN if name in MEMSTORE_ADMIN else OPERATOR
    if service in ("/memstore.v1.ShardControl", "/memstore.v1.Replication"):
        return MEMBER  # Replication: replicas follow a primary's log (the whole data set)
    if service == "/memstore.cluster.v1.RouterAdmin":
        return READ if name in ROUTER_READS else OPERATOR
    return OPERATOR  # anything not listed: operators only


class AuthFileError(ValueError):
    """The auth file cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the roles a credential has and the name audit lines give it (never
    the token itself)."""

    name: str
    roles: frozenset[str]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class AuthTable:
    """The tokens and certificate names of an auth file (see the module docstring)."""

    def __init__(self, path: Path | None, extra: Iterable[tuple[str, Principal]] = ()) -> None:
        self.path = path
        self._extra = [(_digest(token), principal) for token, principal in extra]
        self.tokens: dict[bytes, Principal] = {}
        self.certs: dict[str, Principal] = {}
        self.generation = 0  # bumped by each table taken: streams open under an older one
        # look at their caller again (a token removed or its roles cut ends them)
        self.load()

    def load(self) -> None:
        """Read the file (AuthFileError, and the table unchanged, if it is not valid)."""
        tokens: dict[bytes, Principal] = dict(self._extra)
        certs: dict[str, Principal] = {}
        if self.path is not None:
            try:
                text = self.path.read_text(encoding="utf-8")
            except OSError as exc:
                raise AuthFileError(f"auth file {self.path}: {exc.strerror or exc}") from None
            for n, raw in enumerate(text.splitlines(), 1):
                line = raw.split("#", 1)[0].strip()
                if not line:
                    continue
                where = f"auth file {self.path} line {n}"
                fields = line.split()
                if len(fields) not in (2, 3):
                    raise AuthFileError(f"{where}: expected TOKEN ROLE[,ROLE...] [NAME]")
                secret, roles_text = fields[0], fields[1]
                roles = frozenset(r for r in roles_text.split(",") if r)
                unknown = sorted(roles - set(ROLES))
                if not roles or unknown:  # (not quoted: a line's fields swapped puts the
                    # token there, and this message is logged)
                    raise AuthFileError(f"{where}: the second field is not a role list "
                                        f"(TOKEN ROLE[,ROLE...] [NAME]; roles are "
                                        f"{', '.join(ROLES)})")
                if secret.startswith("cert:"):
                    cn = secret[5:]
                    if not cn:
                        raise AuthFileError(f"{where}: cert: needs a certificate common name")
                    certs[cn] = Principal(fields[2] if len(fields) == 3 else cn, roles)
                    continue
                if len(secret) < MIN_TOKEN:
                    raise AuthFileError(f"{where}: a token needs at least {MIN_TOKEN} "
                                        "characters (`memstore token` makes one)")
                digest = _digest(secret)
                if digest in tokens:
                    raise AuthFileError(f"{where}: the same token twice")
                tokens[digest] = Principal(fields[2] if len(fields) == 3
                                           else f"token-{digest.hex()[:8]}", roles)
        self.tokens, self.certs = tokens, certs
        self.generation += 1

    def reload(self) -> None:
        """SIGHUP: take the file as it is now, or keep the old table and say why."""
        try:
            self.load()
        except AuthFileError as exc:
            log.error("%s; keeping the tokens read before", exc)
            return
        log.info("auth file %s reloaded: %d tokens, %d certificate names", self.path,
                 len(self.tokens) - len(self._extra), len(self.certs))

    def token(self, secret: str) -> Principal | None:
        return self.tokens.get(_digest(secret))


def new_token() -> str:
    """A random token for an auth file (`memstore token`)."""
    return secrets.token_urlsafe(32)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_port(host: str, port: int | str) -> str:
    """HOST:PORT as gRPC reads it: an IPv6 literal in brackets ("[::1]:7070"). Bare,
    gRPC takes "::1:7070" for one IPv6 address on its default port. Sockets (the link,
    the metrics endpoint) take the host without brackets: `host.strip("[]")`."""
    bare = host.strip("[]")
    try:
        is_v6 = ipaddress.ip_address(bare).version == 6
    except ValueError:
        is_v6 = False  # a name ("localhost") or an IPv4 address: as given
    return f"[{bare}]:{port}" if is_v6 else f"{host}:{port}"


def check_certificates(path: Path | str, flag: str) -> None:
    """Refuse a file that holds no PEM certificate, naming its flag (ValueError)."""
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, ValueError):
        raise ValueError(f"{flag} {path} holds no PEM certificate") from None


def check_key_pair(cert: Path | str, key: Path | str, cert_flag: str = "--tls-cert",
                   key_flag: str = "--tls-key") -> None:
    """Refuse a certificate and key TLS cannot use together, naming both files
    (ValueError), when the flags are read. gRPC finds out only when it binds, and then
    says "Failed to bind to address", after a server has made its data directory."""
    check_certificates(cert, cert_flag)
    text = Path(key).read_bytes()
    if b"ENCRYPTED" in text:
        raise ValueError(f"{key_flag} {key} is encrypted: give the key without its "
                         "passphrase (openssl pkey -in KEY -out PLAIN.key)")
    try:  # no passphrase: never a prompt on the terminal
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key,
                                                                password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"{key_flag} {key} is not the private key of {cert_flag} "
                             f"{cert}") from None
        raise ValueError(f"{key_flag} {key} holds no PEM private key (the key of "
                         f"{cert_flag} {cert} is wanted)") from None


def _read(path: Path | str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


# ---------------------------------------------------------------------- server side

@dataclass
class ServerSecurity:
    """How a server listens and whom it answers. Build with `ServerSecurity.configure`."""

    cert: bytes | None = None
    key: bytes | None = None
    client_ca: bytes | None = None
    auth: AuthTable | None = None
    insecure: bool = False
    cert_path: Path | None = None  # for the metrics endpoint's HTTPS
    key_path: Path | None = None
    client_ca_path: Path | None = None

    @classmethod
    def configure(cls, tls_cert: Path | None = None, tls_key: Path | None = None,
                  tls_client_ca: Path | None = None, auth_file: Path | None = None,
                  insecure: bool = False, cluster_token: str | None = None
                  ) -> ServerSecurity:
        """From the command line's flags; `cluster_token`: a token `memstore serve` made
        for its own router and shards, with the cluster role. Raises ValueError."""
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if tls_client_ca is not None and tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        if tls_cert is not None and tls_key is not None:
            check_key_pair(tls_cert, tls_key)
        if tls_client_ca is not None:
            check_certificates(tls_client_ca, "--tls-client-ca")
        extra = [(cluster_token, Principal("cluster", frozenset({"cluster"})))] \
            if cluster_token else []
        auth = AuthTable(auth_file, extra) if auth_file is not None or extra else None
        return cls(_read(tls_cert), _read(tls_key), _read(tls_client_ca), auth, insecure,
                   tls_cert, tls_key, tls_client_ca)

    @property
    def tls(self) -> bool:
        return self.cert is not None

    @property
    def guarded(self) -> bool:
        """TLS or authentication is on: the link (plaintext, no tokens) must stay off."""
        return self.tls or self.auth is not None

    def reload(self) -> None:
        """SIGHUP: read the auth file again (nothing to do without one)."""
        if self.auth is not None:
            self.auth.reload()
        else:
            log.info("SIGHUP: no --auth-file to read again")

    def check_host(self, host: str) -> None:
        if not is_loopback(host) and not self.guarded and not self.insecure:
            raise ValueError(f"refusing to listen on {host} without TLS or an auth file: "
                             "anyone who can reach it could read and change every profile. "
                             "Give --tls-cert/--tls-key and/or --auth-file, or --insecure "
                             "if a network you trust protects it")

    def bind(self, server: Any, address: str) -> int:
        """Add `address` (HOST:PORT, an IPv6 HOST with or without brackets) to `server`
        (TLS when configured); the port, or OSError."""
        host, _, port = address.rpartition(":")
        address = host_port(host, port)
        if self.tls:
            assert self.cert is not None and self.key is not None
            credentials = grpc.ssl_server_credentials(
                [(self.key, self.cert)], root_certificates=self.client_ca,
                require_client_auth=self.client_ca is not None)
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        return int(port)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Authorization and audit lines where credentials are checked; audit lines alone
        (by "anonymous") where they are not."""
        if self.auth is None and self.client_ca is None:
            return [Auditor()]
        return [Authorizer(self)]

    def principal(self, metadata: Sequence[tuple[str, Any]], context: Any
                  ) -> Principal | str:
        """Who calls (a Principal), or why they are not let in (a message)."""
        token = None
        for key, value in metadata or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else str(value)
                scheme, _, token = text.partition(" ")
                if scheme.lower() != "bearer" or not token:
                    return "the authorization metadata is not 'Bearer TOKEN'"
                break
        if token is not None:
            if self.auth is None:
                return "this server takes no tokens (it authenticates client certificates)"
            found = self.auth.token(token.strip())
            return found if found is not None else "unknown token"
        cn = _common_name(context) if self.client_ca is not None else None
        if cn is not None:
            if self.auth is None:
                return Principal(f"cert:{cn}", frozenset(ROLES))
            found = self.auth.certs.get(cn)
            return found if found is not None else \
                f"client certificate {cn!r} is not in the auth file"
        return "no credentials: send 'authorization: Bearer TOKEN' (memstore --token)"

    def metrics_tls(self) -> dict[str, Any]:
        """start_http_server's TLS arguments: HTTPS with the server's certificate."""
        if not self.tls:
            return {}
        return {"certfile": str(self.cert_path), "keyfile": str(self.key_path),
                "client_cafile": str(self.client_ca_path) if self.client_ca_path else None,
                "client_auth_required": self.client_ca_path is not None}


def _common_name(context: Any) -> str | None:
    try:
        found = context.auth_context().get("x509_common_name")
    except (AttributeError, RuntimeError):
        return None
    return found[0].decode() if found else None


class Authorizer(grpc.aio.ServerInterceptor):
    """Every call of a guarded server: identify the caller, check the role its method needs
    (`needs`), write an audit line for the calls that change the cluster or erase data."""

    def __init__(self, security: ServerSecurity) -> None:
        self.security = security

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method = details.method or ""
        need = needs(method)
        if handler is None or need is None:
            return handler
        metadata = details.invocation_metadata or ()
        name = method.rsplit("/", 1)[-1]

        def admit(context: Any) -> Principal | None:
            """The caller, or None with the refusal set on the call: the wrapper then
            returns at once. Not context.abort: its AbortError holds the request in a
            reference cycle until a full collection (memstore.server.service._refuse), and
            a refusal costs the caller nothing, so refused requests must be freed at once."""
            principal = self.security.principal(metadata, context)
            if isinstance(principal, str):
                metrics.AUTH_REFUSALS.labels(name, "UNAUTHENTICATED").inc()
                context.set_code(grpc.StatusCode.UNAUTHENTICATED)
                context.set_details(capped(f"{name}: {principal}"))
                return None
            if not principal.roles & need.roles:
                metrics.AUTH_REFUSALS.labels(name, "PERMISSION_DENIED").inc()
                context.set_code(grpc.StatusCode.PERMISSION_DENIED)
                context.set_details(capped(
                    f"{name} needs the role {need.name!r}; "
                    f"{principal.name!r} has {', '.join(sorted(principal.roles))}"))
                return None
            return principal

        def audited(principal: Principal, context: Any) -> None:
            if name in AUDITED:
                code = context.code()
                audit.record("call", method=name, by=principal.name,
                             code=code.name if isinstance(code, grpc.StatusCode) else "OK")

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                principal = admit(context)
                if principal is None:
                    return None  # refused: the status is set, no response
                audit.caller.set(principal.name)
                try:
                    return await inner_uu(request, context)
                finally:
                    audited(principal, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

        def standing(context: Any) -> _Standing:
            return _Standing(self.security.auth, lambda: admit(context) is not None)

        def streaming(respond: Callable[[Any, Any, _Standing], Any]) -> Callable[..., Any]:
            """A handler whose caller is admitted, then looked at again before each
            response (`_Standing`); `respond(request or requests, context, caller)` gives
            the inner handler's responses, closed with the call, and audited."""
            async def relay(incoming: Any, context: Any) -> Any:
                principal = admit(context)
                if principal is None:
                    return
                audit.caller.set(principal.name)
                caller = standing(context)
                responses = respond(incoming, context, caller)
                try:
                    async for item in responses:
                        if not caller.allowed():
                            return
                        yield item
                finally:
                    await _close(responses)
                    audited(principal, context)
            return relay

        if handler.unary_stream is not None:
            inner_us = handler.unary_stream
            return grpc.unary_stream_rpc_method_handler(
                streaming(lambda request, context, _: inner_us(request, context)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream
            stream_stream = streaming(
                lambda requests, context, caller: inner_ss(caller.requests(requests), context))
            return grpc.stream_stream_rpc_method_handler(
                stream_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            principal = admit(context)
            if principal is None:
                return None
            audit.caller.set(principal.name)
            caller = standing(context)
            handling = asyncio.ensure_future(inner_su(caller.requests(requests), context))
            caller.on_refusal = handling.cancel  # nothing half-sent is acted on
            try:
                response = await handling
            except asyncio.CancelledError:
                if not caller.refused:
                    raise  # the call itself was cancelled (the caller went away)
                return None
            finally:
                audited(principal, context)
            return None if caller.refused else response

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


class _Standing:
    """A stream's caller, looked at again after each reload of the auth table. A stream
    outlives the table it was admitted under (a watch, a replica's Follow: no deadline),
    so before each message, in either direction, it asks `allowed()`: after a reload the
    caller is let in again or the stream ends (`admit` has set the status: UNAUTHENTICATED
    for a credential removed, PERMISSION_DENIED for a role taken away). Without a reload
    it costs one comparison a message."""

    def __init__(self, table: AuthTable | None, admit: Callable[[], bool]) -> None:
        self.table = table
        self.generation = table.generation if table is not None else 0
        self.admit = admit
        self.refused = False
        self.on_refusal: Callable[[], object] | None = None

    def allowed(self) -> bool:
        if self.refused:
            return False
        if self.table is not None and self.table.generation != self.generation:
            self.generation = self.table.generation
            if not self.admit():
                self.refused = True
                if self.on_refusal is not None:
                    self.on_refusal()
        return not self.refused

    async def requests(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The caller's messages while its credential still lets it send them; after a
        refusal their end, as when a caller closes its side: the handler finishes, and
        the responses it still yields are not sent (`allowed` is False from then on). A
        client-streaming handler, which would act on what it got, is cancelled instead
        (`on_refusal`)."""
        async for request in requests:
            if not self.allowed():
                return
            yield request


async def _close(responses: Any) -> None:
    """Finish a handler's response generator now, not when it is collected: its cleanup
    (a replica's Follow leaves the primary's replica list) belongs to the call it served."""
    close = getattr(responses, "aclose", None)
    if close is not None:
        await close()


class Auditor(grpc.aio.ServerInterceptor):
    """A server that checks no credentials still writes an audit line for each call that
    changes the cluster or erases data (AUDITED), naming the caller "anonymous"."""

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        name = (details.method or "").rsplit("/", 1)[-1]
        if handler is None or name not in AUDITED:
            return handler

        def audited(context: Any) -> None:
            code = context.code()
            audit.record("call", method=name, by="anonymous",
                         code=code.name if isinstance(code, grpc.StatusCode) else "OK")

        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> Any:
                try:
                    async for item in inner_us(request, context):
                        yield item
                finally:
                    audited(context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            try:
                return await inner(request, context)
            finally:
                audited(context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


# ---------------------------------------------------------------------- client side

@dataclass(frozen=True)
class Credentials:
    """What a process presents when it calls a memstore server. Empty: plaintext, no
    token (loopback servers without security)."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: str | None = None
    options: tuple[tuple[str, Any], ...] = field(default=())

    @classmethod
    def load(cls, tls_ca: Path | str | None = None, tls_cert: Path | str | None = None,
             tls_key: Path | str | None = None, token: str | None = None) -> Credentials:
        """From files (ValueError if a pair is half given)."""
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("a client certificate needs both tls_cert and tls_key")
        if tls_cert is not None and tls_ca is None:
            raise ValueError("a client certificate is presented over TLS: give tls_ca too")
        return cls(_read(tls_ca), _read(tls_cert), _read(tls_key), token or None)

    @classmethod
    def member(cls, tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None,
               tls_client_ca: Path | None, token: str | None) -> Credentials:
        """What a cluster member serving with --tls-cert/--tls-key/--tls-client-ca presents
        to another (a router to its shards, a replica to its primary): TLS trusting
        `tls_ca`, else the members' client CA, else its own certificate (self-signed);
        its certificate as a client certificate where members require one; `token`.
        Without TLS or `tls_ca`: plaintext."""
        trust = tls_ca or tls_client_ca or tls_cert
        mutual = tls_client_ca is not None
        return cls.load(trust, tls_cert if mutual else None, tls_key if mutual else None,
                        token)

    @property
    def tls(self) -> bool:
        return self.ca is not None

    def _ssl(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A blocking channel to `address` presenting these credentials."""
        opts = [*options, *self.options]
        channel = grpc.secure_channel(address, self._ssl(), opts) if self.tls else \
            grpc.insecure_channel(address, opts)
        if self.token is None:
            return channel
        return grpc.intercept_channel(channel, _BearerInterceptor(self.token))

    def aio_channel(self, address: str, options: Sequence[tuple[str, Any]] = ()
                    ) -> grpc.aio.Channel:
        """An asyncio channel to `address` presenting these credentials."""
        opts = [*options, *self.options]
        interceptors = None if self.token is None else [
            _AioBearerUnary(self.token), _AioBearerStream(self.token),
            _AioBearerBidi(self.token)]
        if self.tls:
            return grpc.aio.secure_channel(address, self._ssl(), opts,
                                           interceptors=interceptors)
        return grpc.aio.insecure_channel(address, opts, interceptors=interceptors)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def _with_token(details: Any, token: str, make: Callable[..., Any]) -> Any:
    metadata = [*(details.metadata or ()), ("authorization", f"Bearer {token}")]
    return make(details.method, details.timeout, metadata, details.credentials,
                details.wait_for_ready, *([details.compression]
                                          if hasattr(details, "compression") else []))


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any = None


class _BearerInterceptor(grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
                         grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_token(details, self.token, _CallDetails), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_token(details, self.token, _CallDetails), request)


def _aio_details(method: Any, timeout: Any, metadata: Any, credentials: Any,
                 wait_for_ready: Any, *_: Any) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(method, timeout, grpc.aio.Metadata(*metadata),
                                      credentials, wait_for_ready)


class _AioBearerUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any,
                                    request: Any) -> Any:
        return await continuation(_with_token(details, self.token, _aio_details), request)


class _AioBearerStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_stream(self, continuation: Any, details: Any,
                                     request: Any) -> Any:
        return await continuation(_with_token(details, self.token, _aio_details), request)


class _AioBearerBidi(grpc.aio.StreamStreamClientInterceptor):
    """The token on bidirectional streams too: a replica's Follow (without it, the
    primary refused every Follow of a replica under an auth file)."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_stream_stream(self, continuation: Any, details: Any,
                                      request_iterator: Any) -> Any:
        return await continuation(_with_token(details, self.token, _aio_details),
                                  request_iterator)


def cluster_token_from_env() -> str | None:
    """The token `memstore serve` gives its own router and shards (MEMSTORE_CLUSTER_TOKEN),
    or one an operator set so for serve-router's calls to its shards."""
    return os.environ.get("MEMSTORE_CLUSTER_TOKEN") or None
