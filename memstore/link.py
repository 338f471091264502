"""The shard link: a light framed protocol over TCP for a router's unary calls to a shard.

Why: a Python gRPC call costs ~0.4-0.5 ms of CPU on each side (bench.hops), and a Get
through the router pays for two of them. On a machine whose cores the client, the router
and the shards share, that CPU is the look-up's latency. The link carries the same
protobuf messages, metadata, trailers and status codes with none of HTTP/2's machinery:
~0.1 ms of CPU a call on the shard, against ~0.5 (measured in bench/RESULTS.md).

It is an internal hop, not a public API: clients, grpcurl and streaming calls use gRPC. A
shard serves its unary Memstore and ShardControl methods (the router's reads and writes,
identifier-directory claims, merge steps, map reads; slot moves stream over gRPC) on the
link beside its gRPC port, on the same host, and advertises the port and a random
per-process token in ShardInfo. A router that learns them over gRPC connects, checks the
token in the shard's hello (so a port reused by another process is never taken for this
shard), and sends its unary calls there; when the link is absent, refused or unreachable
it uses gRPC, so the link only ever changes the cost.

Frames: a 4-byte little-endian length, then a msgpack array.
  shard hello, sent on accept:   [PROTOCOL, token]
  request:   [call id, method name, request bytes, [[key, value], ...] metadata, timeout]
  response:  [call id, status code, details, response bytes, [[key, value], ...] trailers]
A frame that cannot be read closes the connection; the shard logs it and serves on. Calls
run concurrently, answered as they finish (matched by call id). A timeout (seconds, or
nil) is the deadline the shard enforces, as gRPC's would be.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
import msgpack
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

log = logging.getLogger("memstore.link")

PROTOCOL = 1
MAX_FRAME = (64 << 20) + (1 << 16)  # the gRPC message limit, plus room for the envelope
HELLO_TIMEOUT = 2.0
RETRY_AFTER = 1.0  # seconds a router waits before trying a link that failed again
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
        while len(buffer) - start >= 4:
            (length,) = _LENGTH.unpack_from(buffer, start)
            if length > MAX_FRAME:
                self.refuse(f"a frame of {length} bytes is over the {MAX_FRAME}-byte limit")
                return
            if len(buffer) - start - 4 < length:
                break
            body = bytes(buffer[start + 4:start + 4 + length])
            start += 4 + length
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


# ------------------------------------------------------------------------------- shard side

class LinkAborted(Exception):
    """What LinkContext.abort raises, like grpc.aio's AbortError."""


class LinkContext:
    """The parts of grpc.aio.ServicerContext the shard's handlers use."""

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

    def peer(self) -> str:
        return "link"

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self.details = code, details
        raise LinkAborted(details)


class LinkServer:
    """Serves servicers' unary methods on the link (see the module's docstring): the one
    given at construction, and any `add`ed."""

    def __init__(self, servicer: Any, service: ServiceDescriptor,
                 token: str | None = None) -> None:
        self.token = token or new_token()
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
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _ShardConnection(self), host, port)
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
                    answer = (await handler(request, context)).SerializeToString()
                trailers = context.trailers
            except DecodeError as exc:
                code, details = grpc.StatusCode.INVALID_ARGUMENT, f"request: {exc}"
            except LinkAborted:
                code, details, trailers = context.code() or grpc.StatusCode.UNKNOWN, \
                    context.details, context.trailers
            except TimeoutError:
                code, details = grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
            except Exception as exc:  # a bug: answer it, never drop the shard
                log.exception("link: %s failed", method)
                code, details = grpc.StatusCode.INTERNAL, f"internal error: {exc}"
        if connection.transport is not None and not connection.transport.is_closing():
            connection.send([call_id, code.value[0], details, answer,
                             [[k, v] for k, v in trailers]])


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


# ------------------------------------------------------------------------------ router side

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
            self.refuse(f"shard {self.label} sent a response frame that is not "
                        f"[id, code, details, response, trailers]")
            return False
        if waiter is not None and not waiter.done():
            waiter.set_result(message)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.hello.done():
            self.hello.set_exception(ConnectionError("closed before its hello"))
        why = f"link to shard {self.label} lost" + (f": {exc}" if exc else "")
        for waiter in self.pending.values():
            if not waiter.done():
                waiter.set_exception(_error(grpc.StatusCode.UNAVAILABLE, why))
        self.pending.clear()


class LinkClient:
    """A router's link to one shard process: `host:port`, proven by `token`."""

    def __init__(self, address: str, token: str, label: str,
                 unusable: Callable[[], None] | None = None) -> None:
        self.address, self.token, self.label = address, token, label
        self._unusable = unusable  # told when the link fails: the shard may have restarted
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
                raise ConnectionError(f"{self.address} is not the link of shard {self.label} "
                                      f"(its hello does not carry the token the shard "
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
        if connection is not None:  # lost: the shard may be back elsewhere
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
        log.warning("link to shard %s at %s unusable, using gRPC: %s", self.label,
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
            raise _error(grpc.StatusCode.INTERNAL, f"shard {self.label} answered {method} "
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
    """A gRPC stub whose unary methods go over a shard's link when it has one (`link`),
    and everything else over gRPC."""

    def __init__(self, grpc_stub: Any, service: ServiceDescriptor,
                 unusable: Callable[[], None] | None = None,
                 sharing: LinkStub | None = None) -> None:
        self._grpc_stub = grpc_stub
        self._unusable = unusable  # called when a link fails (the router re-reads the map)
        self._responses = {name: response
                           for name, (_, response) in unary_methods(service).items()}
        self._link: LinkClient | None = None
        self._sharing = sharing  # another service's stub on the same shard: its link

    @property
    def link(self) -> LinkClient | None:
        return self._sharing.link if self._sharing is not None else self._link

    @property
    def link_state(self) -> str:
        """"up" (calls take the link), "down" (advertised, not connected: calls use gRPC)
        or "none" (the shard advertises no link)."""
        if self.link is None:
            return "none"
        return "up" if self.link.is_up else "down"

    def use_link(self, address: str, token: str, label: str) -> None:
        """The link the shard advertised ("" when none): a new one replaces the old."""
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
