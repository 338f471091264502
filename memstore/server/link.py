"""The link: a light framed protocol over TCP for unary calls, beside a server's gRPC port.

Why: a Python gRPC call costs ~0.4-0.5 ms of CPU on each side (bench.hops), and a Get
through the router pays for two of them. On a machine whose cores the client, the router
and the shards share, that CPU is the look-up's latency. The link carries the same
protobuf messages, metadata, trailers and status codes with none of HTTP/2's machinery:
~0.1 ms of CPU a call on the server, against ~0.5 (measured in bench/RESULTS.md).

Two hops use it. A shard serves its unary Memstore and ShardControl methods on its link
for routers (reads and writes, identifier-directory claims, merge steps, map reads; slot
moves stream over gRPC). A router serves its unary Memstore methods on its own link for
Python clients that ask for it (`Client(address, link=True)`). gRPC stays the public API:
grpcurl, other languages and every streaming call use it, and every link call has the
same answer over gRPC.

A server advertises its link's port and a random per-process token: a shard in ShardInfo,
and any server (router or shard) through the JSON method DESCRIBE on its gRPC port. A
caller that learns them connects to that port on the host it already knows the server by,
checks the token in the server's hello (so a port reused by another process is never
taken for this server), and sends its unary calls there; when the link is absent,
refused or unreachable it uses gRPC, so the link only ever changes the cost.

Frames: a 4-byte little-endian length, then a msgpack array.
  server hello, sent on accept:  [PROTOCOL, token]
  request:   [call id, method name, request bytes, [[key, value], ...] metadata, timeout]
  response:  [call id, status code, details, response bytes, [[key, value], ...] trailers]
             (details: at most memstore.errors.MAX_STATUS_BYTES, as over gRPC)
A frame that cannot be read closes the connection; the server logs it and serves on. Calls
run concurrently, answered as they finish (matched by call id). A timeout (seconds, or
nil) is the deadline the server enforces, as gRPC's would be.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
import msgpack
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from memstore.errors import capped
from memstore.server import audit, metrics

log = logging.getLogger("memstore.link")

PROTOCOL = 1
MAX_FRAME = (64 << 20) + (1 << 16)  # the gRPC message limit, plus room for the envelope
HELLO_TIMEOUT = 2.0
RETRY_AFTER = 1.0  # seconds a caller waits before trying a link that failed again
RETRY_AT_MOST = 30.0  # a blocking caller's wait after failures in a row (it doubles)
LINK_SERVICE = "memstore.link.v1.Link"
# JSON over gRPC, on any server's gRPC port: {} -> {"port": link port, "token": its token}
DESCRIBE = f"/{LINK_SERVICE}/Describe"
_LENGTH = struct.Struct("<I")
_CODES = {code.value[0]: code for code in grpc.StatusCode}

Handler = Callable[[Any, Any], Awaitable[Message]]


def new_token() -> str:
    return secrets.token_hex(16)


def unary_methods(service: ServiceDescriptor
                  ) -> dict[str, tuple[type[Message], type[Message]]]:
    """A service's unary-unary methods: name -> (request class, response class)."""
    return {m.name: (GetMessageClass(m.input_type), GetMessageClass(m.output_type))
            for m in service.methods if not m.client_streaming and not m.server_streaming}


def _frame(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


def _split_frame(buffer: bytearray, start: int) -> tuple[bytes, int] | None:
    """The body of the frame at `start` in `buffer` and where the next one begins; None
    while it is incomplete; ValueError for a frame over MAX_FRAME."""
    if len(buffer) - start < 4:
        return None
    (length,) = _LENGTH.unpack_from(buffer, start)
    if length > MAX_FRAME:
        raise ValueError(f"a frame of {length} bytes is over the {MAX_FRAME}-byte limit")
    end = start + 4 + length
    if len(buffer) < end:
        return None
    return bytes(buffer[start + 4:end]), end


class _Framed(asyncio.Protocol):
    """Splits the byte stream into frames; a frame too long closes the connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while True:
            try:
                split = _split_frame(buffer, start)
            except ValueError as exc:
                self.refuse(str(exc))
                return
            if split is None:
                break
            body, start = split
            try:
                message = msgpack.unpackb(body)
            except (ValueError, msgpack.UnpackException) as exc:
                self.refuse(f"a frame is not msgpack ({exc})")
                return
            if not self.frame(message):
                return
        del buffer[:start]

    def refuse(self, why: str) -> None:
        log.warning("link: %s; closing the connection", why)
        if self.transport is not None:
            self.transport.close()

    def send(self, message: list[Any]) -> None:
        assert self.transport is not None
        self.transport.write(_frame(msgpack.packb(message, use_bin_type=True)))

    def frame(self, message: Any) -> bool:
        """Handle one frame; False once the connection is closed."""
        raise NotImplementedError


# ------------------------------------------------------------------------------ server side

class LinkAborted(Exception):
    """What LinkContext.abort raises, like grpc.aio's AbortError."""


class LinkContext:
    """The parts of grpc.aio.ServicerContext the servers' handlers use."""

    def __init__(self, metadata: list[Any], timeout: float | None) -> None:
        self._metadata = tuple((k, v) for k, v in metadata)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.trailers: tuple[tuple[str, Any], ...] = ()
        self._code: grpc.StatusCode | None = None
        self.details = ""

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._metadata

    def set_trailing_metadata(self, metadata: Iterable[tuple[str, Any]]) -> None:
        self.trailers = tuple(metadata)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_code(self, code: grpc.StatusCode) -> None:
        """A handler that sets a status other than OK and returns refuses the call."""
        self._code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def peer(self) -> str:
        return "link"

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self.details = code, details
        raise LinkAborted(details)


class LinkServer:
    """Serves servicers' unary methods on the link (see the module's docstring): the one
    given at construction, and any `add`ed. `metered`: record each call in
    memstore.server.metrics, as the gRPC server's interceptor does (a shard's handlers record
    their own). `audited`: methods each call of which writes an audit line, by
    "anonymous", as the gRPC server's Auditor does (a link serves only where no
    credentials are checked)."""

    def __init__(self, servicer: Any, service: ServiceDescriptor,
                 token: str | None = None, metered: bool = False,
                 audited: frozenset[str] = frozenset()) -> None:
        self.token = token or new_token()
        self.metered = metered
        self.audited = audited
        self._methods: dict[str, tuple[Handler, type[Message]]] = {}
        self.add(servicer, service)
        self._server: asyncio.Server | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self._connections: set[_ShardConnection] = set()
        self.port = 0

    def add(self, servicer: Any, service: ServiceDescriptor) -> None:
        """Serve another service's unary methods too. Frames name a method alone, so no
        name may be in two services."""
        methods = {name: (getattr(servicer, name), request)
                   for name, (request, _) in unary_methods(service).items()
                   if hasattr(servicer, name)}
        both = self._methods.keys() & methods.keys()
        if both:
            raise ValueError(f"{service.full_name} repeats methods already served: "
                             f"{', '.join(sorted(both))}")
        self._methods.update(methods)

    async def start(self, host: str, port: int) -> int:
        """Listen on `host` (an IPv6 one with or without gRPC's brackets) and `port` (0: a
        free one); the port."""
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _ShardConnection(self), host.strip("[]"), port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting, let calls under way finish (up to `grace`), then close."""
        if self._server is None:
            return
        self._server.close()
        if self._calls:
            await asyncio.wait(list(self._calls), timeout=grace)
        for connection in list(self._connections):
            if connection.transport is not None:
                connection.transport.close()
        for task in list(self._calls):
            task.cancel()
        self._server = None

    def accept(self, connection: _ShardConnection) -> None:
        self._connections.add(connection)
        connection.send([PROTOCOL, self.token])

    def dispatch(self, connection: _ShardConnection, message: Any) -> bool:
        try:
            call_id, method, body, metadata, timeout = message
            if not (isinstance(call_id, int) and isinstance(method, str)
                    and isinstance(body, bytes) and isinstance(metadata, list)
                    and (timeout is None or isinstance(timeout, (int, float)))):
                raise TypeError
        except (TypeError, ValueError):
            connection.refuse("a request frame is not [id, method, request, metadata, "
                              "timeout]")
            return False
        task = asyncio.get_running_loop().create_task(
            self._call(connection, call_id, method, body, metadata, timeout))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        return True

    async def _call(self, connection: _ShardConnection, call_id: int, method: str,
                    body: bytes, metadata: list[Any], timeout: float | None) -> None:
        started = time.perf_counter()
        code, details, answer = grpc.StatusCode.OK, "", b""
        trailers: tuple[tuple[str, Any], ...] = ()
        entry = self._methods.get(method)
        if entry is None:
            code, details = grpc.StatusCode.UNIMPLEMENTED, f"no unary method {method!r}"
        else:
            handler, request_class = entry
            context = LinkContext(metadata, timeout)
            try:
                request = request_class.FromString(body)
                async with asyncio.timeout(timeout):
                    response = await handler(request, context)
                trailers = context.trailers
                refused = context.code()
                if refused is not None and refused != grpc.StatusCode.OK:
                    code, details = refused, context.details
                else:
                    answer = response.SerializeToString()
            except DecodeError as exc:
                code, details = grpc.StatusCode.INVALID_ARGUMENT, f"request: {exc}"
            except LinkAborted:
                code, details, trailers = context.code() or grpc.StatusCode.UNKNOWN, \
                    context.details, context.trailers
            except TimeoutError:
                code, details = grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
            except Exception as exc:  # a bug: answer it, never drop the server
                log.exception("link: %s failed", method)
                code, details = grpc.StatusCode.INTERNAL, f"internal error: {exc}"
        if self.metered and entry is not None:
            metrics.observe(method, code.name, time.perf_counter() - started)
        if method in self.audited:
            audit.record("call", method=method, by="anonymous", code=code.name)
        if connection.transport is not None and not connection.transport.is_closing():
            connection.send([call_id, code.value[0], capped(details), answer,
                             [[k, v] for k, v in trailers]])


def describe_handler(link: LinkServer) -> grpc.GenericRpcHandler:
    """DESCRIBE on a server's gRPC port: where its link listens (port 0 before it does)."""
    async def describe(request: bytes, context: Any) -> dict[str, Any]:
        return {"port": link.port, "token": link.token if link.port else ""}

    return grpc.method_handlers_generic_handler(LINK_SERVICE, {
        "Describe": grpc.unary_unary_rpc_method_handler(
            describe, response_serializer=lambda d: json.dumps(d).encode())})


def advertised(address: str, answer: bytes) -> tuple[str, str] | None:
    """(link address, token) from a DESCRIBE answer of the server at gRPC `address`, on
    the host the caller knows it by; None when the server serves no link."""
    try:
        described = json.loads(answer)
        port, token = int(described["port"]), str(described["token"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{address} described its link unreadably: {exc}") from None
    if not port or not token:
        return None
    return f"{address.rpartition(':')[0]}:{port}", token


class _ShardConnection(_Framed):
    def __init__(self, server: LinkServer) -> None:
        super().__init__()
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server.accept(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)

    def frame(self, message: Any) -> bool:
        return self.server.dispatch(self, message)


# ----------------------------------------------------------------------- caller side, asyncio

class NoLink(Exception):
    """The link cannot be used now: the caller sends the call over gRPC instead."""


def _error(code: grpc.StatusCode, details: str,
           trailers: Iterable[tuple[str, Any]] = ()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers),
                                details=details)


class _RouterConnection(_Framed):
    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label
        self.hello: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.lost = False

    def frame(self, message: Any) -> bool:
        if not self.hello.done():
            self.hello.set_result(message)
            return True
        try:
            call_id = message[0]
            waiter = self.pending.pop(call_id, None)
        except (TypeError, IndexError, KeyError):
            self.refuse(f"{self.label} sent a response frame that is not "
                        f"[id, code, details, response, trailers]")
            return False
        if waiter is not None and not waiter.done():
            waiter.set_result(message)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.hello.done():
            self.hello.set_exception(ConnectionError("closed before its hello"))
        why = f"link to {self.label} lost" + (f": {exc}" if exc else "")
        for waiter in self.pending.values():
            if not waiter.done():
                waiter.set_exception(_error(grpc.StatusCode.UNAVAILABLE, why))
        self.pending.clear()


class LinkClient:
    """An asyncio caller's link to one server process (a router's to a shard, an
    AsyncClient's to its server): `host:port`, proven by `token`. `label` names the server
    in errors ("shard s0")."""

    def __init__(self, address: str, token: str, label: str,
                 unusable: Callable[[], None] | None = None) -> None:
        self.address, self.token, self.label = address, token, label
        self._unusable = unusable  # told when the link fails: the server may have restarted
        self._connection: _RouterConnection | None = None
        self._connecting: asyncio.Task[_RouterConnection] | None = None
        self._retry_at = 0.0
        self._ids = itertools.count(1)
        self.calls = 0  # answered over the link (tests and metrics read it)

    async def _connect(self) -> _RouterConnection:
        host, _, port = self.address.rpartition(":")
        loop = asyncio.get_running_loop()
        _, connection = await asyncio.wait_for(loop.create_connection(
            lambda: _RouterConnection(self.label), host.strip("[]"), int(port)), HELLO_TIMEOUT)
        try:
            hello = await asyncio.wait_for(connection.hello, HELLO_TIMEOUT)
            if hello != [PROTOCOL, self.token]:
                raise ConnectionError(f"{self.address} is not the link of {self.label} "
                                      f"(its hello does not carry the token the server "
                                      f"advertised)")
        except BaseException:
            assert connection.transport is not None
            connection.transport.close()
            raise
        return connection

    @property
    def is_up(self) -> bool:
        return self._connection is not None and not self._connection.lost

    def connection(self) -> _RouterConnection:
        """The live connection, or NoLink (and a connection attempt under way): a call
        never waits for the link to come up, it goes over gRPC meanwhile."""
        connection = self._connection
        if self.is_up:
            assert connection is not None
            return connection
        if connection is not None:  # lost: the server may be back elsewhere
            self._connection = None
            if self._unusable is not None:
                self._unusable()
        self.start()
        raise NoLink()

    def start(self) -> None:
        """Begin connecting, unless connected, connecting, or a failure is too recent."""
        if self.is_up:
            return
        if self._connecting is not None or time.monotonic() < self._retry_at:
            return
        self._connecting = asyncio.get_running_loop().create_task(self._connect())
        self._connecting.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[_RouterConnection]) -> None:
        if task is not self._connecting:  # closed meanwhile
            if not task.cancelled() and task.exception() is None:
                transport = task.result().transport
                if transport is not None:
                    transport.close()
            return
        self._connecting = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self._connection = task.result()
            return
        self._retry_at = time.monotonic() + RETRY_AFTER
        log.warning("link to %s at %s unusable, using gRPC: %s", self.label,
                    self.address, exc)
        if self._unusable is not None:
            self._unusable()

    async def ready(self) -> bool:
        """Wait for a connection attempt under way (or start one); whether it is up."""
        self.start()
        if self._connecting is not None:
            await asyncio.wait([self._connecting])
        return self.is_up

    async def call(self, method: str, request: Message, response_class: type[Message],
                   timeout: float | None, metadata: Iterable[tuple[str, Any]] | None
                   ) -> tuple[Message, tuple[tuple[str, Any], ...]]:
        """(response, trailers), or grpc.aio.AioRpcError as a gRPC call would raise;
        NoLink before anything was sent, when the link cannot be used."""
        connection = self.connection()
        call_id = next(self._ids)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        connection.pending[call_id] = waiter
        connection.send([call_id, method, request.SerializeToString(),
                         [[k, v] for k, v in metadata or ()], timeout])
        try:
            reply = await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        finally:
            connection.pending.pop(call_id, None)
        try:
            _, code, details, body, trailers = reply
            status = _CODES[code]
            pairs = tuple((k, v) for k, v in trailers)
        except (TypeError, ValueError, KeyError):
            raise _error(grpc.StatusCode.INTERNAL, f"{self.label} answered {method} "
                                                   f"with a malformed frame") from None
        if status != grpc.StatusCode.OK:
            raise _error(status, details, pairs)
        self.calls += 1
        return response_class.FromString(body), pairs

    def close(self) -> None:
        if self._connection is not None and self._connection.transport is not None:
            self._connection.transport.close()
        if self._connecting is not None:
            self._connecting.cancel()
        self._connection = self._connecting = None


class LinkCall:
    """One unary call made as a grpc.aio call is: awaited for the response, then asked
    for its trailing metadata. Over the link when it can be used, else over gRPC."""

    def __init__(self, link: LinkClient, grpc_method: Any, method: str, request: Message,
                 response_class: type[Message], timeout: float | None,
                 metadata: Iterable[tuple[str, Any]] | None) -> None:
        self._link, self._grpc_method, self._method = link, grpc_method, method
        self._request, self._response_class = request, response_class
        self._timeout, self._metadata = timeout, metadata
        self._grpc_call: Any = None
        self._trailers: tuple[tuple[str, Any], ...] = ()

    def __await__(self) -> Any:
        return self._run().__await__()

    async def _run(self) -> Message:
        try:
            response, self._trailers = await self._link.call(
                self._method, self._request, self._response_class, self._timeout,
                self._metadata)
            return response
        except NoLink:
            kwargs: dict[str, Any] = {"timeout": self._timeout}
            if self._metadata is not None:
                kwargs["metadata"] = self._metadata
            self._grpc_call = self._grpc_method(self._request, **kwargs)
            return await self._grpc_call  # type: ignore[no-any-return]

    async def trailing_metadata(self) -> Any:
        if self._grpc_call is not None:
            return await self._grpc_call.trailing_metadata()
        return grpc.aio.Metadata(*self._trailers)


class LinkStub:
    """A grpc.aio stub whose unary methods go over a server's link when it has one (`link`),
    and everything else over gRPC."""

    def __init__(self, grpc_stub: Any, service: ServiceDescriptor,
                 unusable: Callable[[], None] | None = None,
                 sharing: LinkStub | None = None) -> None:
        self._grpc_stub = grpc_stub
        self._unusable = unusable  # called when a link fails (the router re-reads the map)
        self._responses = {name: response
                           for name, (_, response) in unary_methods(service).items()}
        self._link: LinkClient | None = None
        self._sharing = sharing  # another service's stub on the same server: its link

    @property
    def link(self) -> LinkClient | None:
        return self._sharing.link if self._sharing is not None else self._link

    @property
    def link_state(self) -> str:
        """"up" (calls take the link), "down" (advertised, not connected: calls use gRPC)
        or "none" (the server advertises no link)."""
        if self.link is None:
            return "none"
        return "up" if self.link.is_up else "down"

    def use_link(self, address: str, token: str, label: str) -> None:
        """The link the server advertised ("" when none): a new one replaces the old."""
        if self._sharing is not None:
            raise TypeError("this stub uses the link of the stub it shares; set that one's")
        link = self._link
        if link is not None and (link.address, link.token) == (address, token):
            return
        if link is not None:
            link.close()
        self._link = LinkClient(address, token, label, self._unusable) \
            if address and token else None
        if self._link is not None:
            self._link.start()  # up before the calls that will want it

    def __getattr__(self, method: str) -> Any:
        grpc_method = getattr(self._grpc_stub, method)
        response_class = self._responses.get(method)
        if response_class is None:
            return grpc_method

        def call(request: Message, timeout: float | None = None,
                 metadata: Iterable[tuple[str, Any]] | None = None) -> Any:
            link = self.link
            if link is None:
                return grpc_method(request, timeout=timeout, metadata=metadata)
            return LinkCall(link, grpc_method, method, request, response_class, timeout,
                            metadata)

        return call


# ---------------------------------------------------------------------- caller side, blocking

class LinkRpcError(grpc.RpcError):
    """A failed call over a blocking link, shaped as grpc's own errors are: code(),
    details(), trailing_metadata(). `lost`: the connection failed (not the server's
    answer), so the outcome of a write is unknown, as with gRPC's UNAVAILABLE."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 trailers: Iterable[tuple[str, Any]] = (), lost: bool = False) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self._trailers = code, details, tuple(trailers)
        self.lost = lost

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailers


class _Socket:
    """One blocking connection to a link, checked by the server's hello; a call at a time."""

    def __init__(self, address: str, token: str, label: str) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host.strip("[]"), int(port)), HELLO_TIMEOUT)
        self._buffer = bytearray()
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.read(time.monotonic() + HELLO_TIMEOUT) != [PROTOCOL, token]:
                raise ConnectionError(f"{address} is not the link of {label} (its hello "
                                      f"does not carry the token the server advertised)")
        except BaseException:
            self.sock.close()
            raise
        self._poll = select.poll()
        self._poll.register(self.sock, select.POLLIN)

    def usable(self) -> bool:
        """An idle connection with nothing to read: not closed by the server meanwhile."""
        return not self._poll.poll(0)

    def send(self, message: list[Any]) -> None:
        self.sock.sendall(_frame(msgpack.packb(message, use_bin_type=True)))

    def read(self, deadline: float | None) -> Any:
        """The next frame; TimeoutError past `deadline`, ConnectionError when closed."""
        buffer = self._buffer
        while True:
            try:
                split = _split_frame(buffer, 0)
            except ValueError as exc:
                raise ConnectionError(str(exc)) from None
            if split is not None:
                body, end = split
                del buffer[:end]
                return msgpack.unpackb(body)
            if deadline is None:
                self.sock.settimeout(None)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError()
                self.sock.settimeout(remaining)
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("closed by the server")
            buffer += chunk

    def close(self) -> None:
        self.sock.close()


class BlockingLink:
    """A blocking caller's link to one server: connections pooled, each carrying one call
    at a time, so the threads sharing a client each have one when they need it."""

    def __init__(self, address: str, token: str, label: str) -> None:
        self.address, self.token, self.label = address, token, label
        self._idle: list[_Socket] = []  # list.append and list.pop are atomic
        self._ids = itertools.count(1)
        self.closed = False
        self.calls = 0  # answered over the link (tests read it)

    def connect(self) -> None:
        """Open a connection now (OSError, ConnectionError when it cannot be)."""
        self._idle.append(_Socket(self.address, self.token, self.label))

    def _take(self) -> _Socket:
        while True:
            try:
                connection = self._idle.pop()
            except IndexError:
                return _Socket(self.address, self.token, self.label)
            if connection.usable():
                return connection
            connection.close()  # the server closed it (restarted?) while it was idle

    def call(self, method: str, request: bytes, timeout: float | None,
             metadata: Iterable[tuple[str, Any]] | None) -> bytes:
        """The response's bytes, or LinkRpcError as a gRPC call would fail; NoLink when no
        connection could be had (nothing was sent)."""
        try:
            connection = self._take()
        except (OSError, ValueError) as exc:
            raise NoLink(f"cannot connect to the link of {self.label}: {exc}") from None
        call_id = next(self._ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            connection.send([call_id, method, request, [[k, v] for k, v in metadata or ()],
                             timeout])
            reply = connection.read(deadline)
            answered, code, details, body, trailers = reply
            status = _CODES[code]
            pairs = tuple((k, v) for k, v in trailers)
            if answered != call_id:
                raise ValueError(f"the answer to call {answered}, not to {call_id}")
        except TimeoutError:
            connection.close()  # its answer may still come: never read it as another's
            raise LinkRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except (OSError, ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            connection.close()
            raise LinkRpcError(grpc.StatusCode.UNAVAILABLE, f"link to {self.label} lost: {exc}",
                               lost=True) from None
        if self.closed:
            connection.close()
        else:
            self._idle.append(connection)
        if status != grpc.StatusCode.OK:
            raise LinkRpcError(status, details, pairs)
        self.calls += 1
        return body  # type: ignore[no-any-return]

    def close(self) -> None:
        self.closed = True
        while self._idle:
            self._idle.pop().close()


class BlockingLinkStub:
    """A sync gRPC stub whose unary methods go over the server's link once it is up, and
    over gRPC until then, or whenever it cannot be used. Anything else (streams, the
    methods' `.future`) is the gRPC stub's.

    `describe()` asks the server where its link is: (address, token), None when it serves
    none, or raises. It runs in a thread of its own, so no call waits for a link to come
    up; one that fails is asked again after RETRY_AFTER, doubling to RETRY_AT_MOST while
    it keeps failing, and a server without DESCRIBE (UNIMPLEMENTED) is never asked again.
    A link lost (its server restarted, perhaps on another port) is described again."""

    def __init__(self, grpc_stub: Any, service: ServiceDescriptor,
                 describe: Callable[[], tuple[str, str] | None], label: str) -> None:
        self._grpc_stub = grpc_stub
        self._describe = describe
        self.label = label
        self.link: BlockingLink | None = None
        self.enabled = True
        self._lock = threading.Lock()
        self._setup: threading.Thread | None = None
        self._failures = 0
        self._retry_at = 0.0
        for name, (_, response_class) in unary_methods(service).items():
            setattr(self, name, self._method(name, response_class))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grpc_stub, name)

    def _method(self, name: str, response_class: type[Message]) -> Callable[..., Any]:
        grpc_method = getattr(self._grpc_stub, name)

        def call(request: Message, timeout: float | None = None,
                 metadata: Iterable[tuple[str, Any]] | None = None) -> Any:
            link = self.link
            if link is not None:
                try:
                    return response_class.FromString(
                        link.call(name, request.SerializeToString(), timeout, metadata))
                except NoLink:
                    self._lost(link)
                except LinkRpcError as exc:
                    if exc.lost:
                        self._lost(link)
                    raise
            else:
                self.start()
            return grpc_method(request, timeout=timeout, metadata=metadata)

        return call

    def _lost(self, link: BlockingLink) -> None:
        """The link failed: gRPC until the server, perhaps restarted, is described again."""
        with self._lock:
            if self.link is link:
                self.link = None
                link.close()
        self.start()

    def start(self) -> None:
        """Describe and connect in the background, unless under way, off or too soon."""
        if not self.enabled or self._setup is not None or time.monotonic() < self._retry_at:
            return
        with self._lock:
            if self._setup is not None or not self.enabled:
                return
            self._setup = threading.Thread(target=self._connect, daemon=True,
                                           name=f"link to {self.label}")
            self._setup.start()

    def _connect(self) -> None:
        try:
            found = self._describe()
            if found is None:
                log.info("%s serves no link; calls use gRPC", self.label)
                self.enabled = False
                return
            link = BlockingLink(*found, self.label)
            link.connect()
            with self._lock:
                if not self.enabled:  # closed meanwhile
                    link.close()
                    return
                self.link, self._failures = link, 0
        except Exception as exc:  # noqa: BLE001 - any failure leaves the calls on gRPC
            if isinstance(exc, grpc.RpcError) and \
                    exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                log.info("%s serves no link (no %s); calls use gRPC", self.label, DESCRIBE)
                self.enabled = False
                return
            self._failures += 1
            self._retry_at = time.monotonic() + min(RETRY_AFTER * 2 ** (self._failures - 1),
                                                    RETRY_AT_MOST)
            log.warning("link to %s unusable, using gRPC: %s", self.label, exc)
        finally:
            self._setup = None

    def ready(self, timeout: float = 5.0) -> bool:
        """Wait (up to `timeout`) for the link to come up, through retries if need be;
        whether it is up."""
        deadline = time.monotonic() + timeout
        while self.link is None and self.enabled:
            self.start()
            setup = self._setup
            if setup is not None:
                setup.join(max(0.0, deadline - time.monotonic()))
            if self.link is not None or time.monotonic() >= deadline:
                break
            time.sleep(max(0.0, min(self._retry_at, deadline) - time.monotonic()) or 0.01)
        return self.link is not None

    def close(self) -> None:
        with self._lock:
            self.enabled = False
            if self.link is not None:
                self.link.close()
                self.link = None
