"""The edge of a server: what every call meets before and after its handler.

Two guarantees, for every method with an asyncio behaviour (every method of memstore.v1,
health checking, server reflection), on shards and routers alike:
  * a request that does not parse is INVALID_ARGUMENT naming the message type and
    protobuf's reason. grpc.aio would answer UNKNOWN "Unexpected <class 'DecodeError'>"
    (a corrupt wire format, invalid UTF-8 in a string field, nesting past protobuf's
    recursion limit) before any of our code ran: `Guard` gives each handler a deserializer
    that never raises, and its wrapper refuses what came out as `Malformed` (in a stream
    of requests, when the handler reads it);
  * an exception a handler lets escape (a bug) is logged and answered INTERNAL with a
    message of at most MAX_STATUS_BYTES, never grpc's UNKNOWN quoting it whole.
What grpc still answers itself, before any handler: a message over the server's limit
(64 MiB) RESOURCE_EXHAUSTED "Received message larger than max", metadata over 16 KiB
RESOURCE_EXHAUSTED "received metadata size exceeds hard limit", an unknown method
UNIMPLEMENTED.

Put `Guard` last among a server's interceptors: it then sees the servicers' own handlers,
one per method, and wraps each once.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from memstore.errors import capped, drop_tracebacks

__all__ = ["Guard", "Malformed"]

log = logging.getLogger("memstore.guard")


class Malformed:
    """What a guarded deserializer returns for bytes that are not a valid request."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def read(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or a JSON body's ValueError
            return Malformed(str(exc) or type(exc).__name__)

    return read


# Both set the status and let the handler return (None, or the end of a stream) rather than
# raise AbortError: see memstore.server.service._refuse for the reference cycle that avoids.

def _refuse(context: grpc.aio.ServicerContext, request: Malformed) -> None:
    context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
    context.set_details(capped(f"request: not a valid message: {request.why}"))


def _internal(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    log.error("internal error", exc_info=exc)
    details = capped(f"internal error: {type(exc).__name__}: {exc}")
    drop_tracebacks()
    context.set_code(grpc.StatusCode.INTERNAL)
    context.set_details(details)


class _MalformedInStream(Exception):
    def __init__(self, request: Malformed) -> None:
        super().__init__(request.why)
        self.request = request


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A stream of requests that raises _MalformedInStream at the first Malformed."""
    async for request in requests:
        if isinstance(request, Malformed):
            raise _MalformedInStream(request)
        yield request


def _guarded(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with a tolerant deserializer and a behaviour that refuses Malformed and
    answers escaped exceptions; itself when it cannot be wrapped (a synchronous behaviour,
    or a stream of requests answered other than by an async generator)."""
    if handler.request_deserializer is None:
        return handler
    deserializer = _tolerant(handler.request_deserializer)
    if handler.request_streaming:
        both = handler.stream_stream
        if handler.response_streaming and inspect.isasyncgenfunction(both):
            async def both_call(requests: Any, context: grpc.aio.ServicerContext
                                ) -> AsyncIterator[Any]:
                try:
                    async for response in both(_checked(requests), context):
                        yield response
                except _MalformedInStream as exc:
                    _refuse(context, exc.request)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a bug: answer it, never UNKNOWN
                    _internal(context, exc)

            return grpc.stream_stream_rpc_method_handler(
                both_call, request_deserializer=deserializer,
                response_serializer=handler.response_serializer)
        return handler
    if not handler.response_streaming:
        unary: Callable[[Any, Any], Awaitable[Any]] = handler.unary_unary
        if not inspect.iscoroutinefunction(unary):
            return handler

        async def unary_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Malformed):
                _refuse(context, request)
                return None
            try:
                return await unary(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug: answer it, never UNKNOWN
                _internal(context, exc)
                return None

        return grpc.unary_unary_rpc_method_handler(
            unary_call, request_deserializer=deserializer,
            response_serializer=handler.response_serializer)
    stream = handler.unary_stream
    if inspect.isasyncgenfunction(stream):
        async def stream_call(request: Any, context: grpc.aio.ServicerContext
                              ) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                _refuse(context, request)
                return
            try:
                async for response in stream(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug: answer it, never UNKNOWN
                _internal(context, exc)
    elif inspect.iscoroutinefunction(stream):  # writes with context.write (health's Watch)
        async def stream_call(request: Any,  # type: ignore[misc]
                              context: grpc.aio.ServicerContext) -> None:
            if isinstance(request, Malformed):
                _refuse(context, request)
                return
            await stream(request, context)
    else:
        return handler
    return grpc.unary_stream_rpc_method_handler(
        stream_call, request_deserializer=deserializer,
        response_serializer=handler.response_serializer)


class Guard(grpc.aio.ServerInterceptor):
    """Malformed requests are INVALID_ARGUMENT, escaped exceptions INTERNAL (the module)."""

    def __init__(self) -> None:
        self._guarded: dict[str, grpc.RpcMethodHandler] = {}  # by method: registered ones

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
            details: grpc.HandlerCallDetails) -> Any:
        method = details.method  # type: ignore[attr-defined]
        guarded = self._guarded.get(method)
        if guarded is not None:
            return guarded
        handler = await continuation(details)
        if handler is None:  # an unknown method: UNIMPLEMENTED, nothing kept
            return None
        guarded = self._guarded[method] = _guarded(handler)
        return guarded
