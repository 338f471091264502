"""Reads through a router answered by the shards' replicas (`serve-router --read-from`).

A router started with `--read-from replica`, or a call carrying the metadata
`memstore-read-from: replica`, sends its reads (Get by id, BatchGet by id, Count, GroupBy,
QueryBitmap, QueryIds, GetSchema, ListSegments) to a replica of each shard, and
everything else, writes first, to the primaries. How the router learns the replicas, and
which one it takes, is the Python client's `read_from="replica"`
(memstore/client/replicas.py): the primary's Stats lists them, one is picked, and one
that cannot be reached is dropped and the read goes to the primary. A replica has a share
of the call's deadline (replicas.replica_timeout: at most 1 s, half of what is left), so
one that hangs instead of refusing (stopped, a partition) leaves the primary the rest;
its DEADLINE_EXCEEDED counts as UNAVAILABLE does.

The choice travels with the call in a context variable (`ReadScope`), set by `replica_read`
around the router's read handlers only: a write handler, or the merge protocol settling a
hold inside a read, never reads from a replica, so nothing decides on a lagging state. A
replica's answer carries its lag (memstore-replica-lag-*); the router answers with the
largest lag among the replicas that answered, under the same keys, so a caller sees how
old the answer may be. A replica that is behind a slot move answers "wrong slot": that
read goes to the primary.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from memstore.client.replicas import (
    REPLICA_READS,
    REPLICA_TIMEOUT,
    ReplicaReads,
    replica_timeout,
    unreachable,
)
from memstore.errors import capped
from memstore.server.link import LinkStub
from memstore.server.security import Credentials
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc

READ_FROM_HEADER = "memstore-read-from"  # a call's own choice: "replica" or "primary"
LAG_BYTES_TRAILER = "memstore-replica-lag-bytes"  # as memstore/server/service.py's
LAG_SECONDS_TRAILER = "memstore-replica-lag-seconds"
READ_FROM = ("primary", "replica")
STATS_TIMEOUT = 2.0  # seconds to ask a primary for its replicas

T = TypeVar("T")


@dataclass
class ReadScope:
    """One router call's reads: whether they go to replicas, and the largest lag heard."""

    replica: bool
    answered: bool = False
    lag_bytes: int = 0
    lag_seconds: float = 0.0

    def heard(self, trailers: Iterable[tuple[str, Any]]) -> None:
        """Take a replica's answer's lag."""
        self.answered = True
        for key, value in trailers or ():
            if key == LAG_BYTES_TRAILER:
                self.lag_bytes = max(self.lag_bytes, int(value))
            elif key == LAG_SECONDS_TRAILER:
                self.lag_seconds = max(self.lag_seconds, float(value))

    def trailers(self) -> tuple[tuple[str, str], ...]:
        return ((LAG_BYTES_TRAILER, str(self.lag_bytes)),
                (LAG_SECONDS_TRAILER, f"{self.lag_seconds:.3f}"))


_scope: contextvars.ContextVar[ReadScope | None] = contextvars.ContextVar(
    "memstore_read_scope", default=None)


def replica_read(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """A router read handler whose shard reads go where the call (READ_FROM_HEADER) or the
    router (`self.read_from`) says, answering with the replicas' lag when one answered."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Any) -> T:
        wanted = next((v for k, v in context.invocation_metadata() or ()
                       if k == READ_FROM_HEADER), self.read_from)
        if wanted not in READ_FROM:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, capped(
                f"{READ_FROM_HEADER}: {wanted!r}: \"primary\" or \"replica\""))
        scope = ReadScope(wanted == "replica")
        token = _scope.set(scope)
        try:
            result = await method(self, request, context)
        finally:
            _scope.reset(token)
        if scope.answered:
            context.set_trailing_metadata(scope.trailers())
        return result

    return wrapper


class ReplicaStub:
    """A shard's Memstore stub for reads: the methods in REPLICA_READS go to one of its
    replicas inside a ReadScope that asks for them, everything else to `primary`."""

    def __init__(self, primary: LinkStub, credentials: Credentials,
                 options: list[tuple[str, Any]]) -> None:
        self.primary = primary
        self._credentials, self._options = credentials, options
        self.replicas = ReplicaReads(self._connect)
        self._closing: set[asyncio.Task[None]] = set()

    def _connect(self, address: str) -> tuple[Any, Any]:
        channel = self._credentials.aio_channel(address, self._options)
        return channel, memstore_pb2_grpc.MemstoreStub(channel)

    async def replica(self) -> Any:
        """A stub on a replica of the shard, or None: none is known, or none answered
        lately (the primary's Stats is asked again at most every replicas.REFRESH s)."""
        if self.replicas.due():
            try:
                stats = await self.primary.Stats(pb.StatsRequest(), timeout=STATS_TIMEOUT)
            except grpc.aio.AioRpcError:
                return None
            self.replicas.load(dict(stats.info))
        return self.replicas.stub

    def lost(self, replica: Any) -> None:
        """The replica stub `replica` did not answer: forget it. Its channel closes in the
        background, once the reads still in flight on it have had their time (closing
        cancels them, and a cancelled read would fail instead of going to the primary)."""
        channel = self.replicas.failed(replica)
        if channel is not None:
            task = asyncio.get_running_loop().create_task(channel.close(REPLICA_TIMEOUT))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channel = self.replicas.failed()
        if channel is not None:
            await channel.close()

    def __getattr__(self, method: str) -> Any:
        primary_method = getattr(self.primary, method)
        if method not in REPLICA_READS:
            return primary_method

        def call(request: Any, timeout: float | None = None, **kwargs: Any) -> Any:
            scope = _scope.get()
            if scope is None or not scope.replica:
                return primary_method(request, timeout=timeout, **kwargs)
            return ReplicaCall(self, method, request, timeout, scope, kwargs)

        return call


def _wrong_slot(exc: grpc.aio.AioRpcError) -> bool:
    """A shard's "not my slot" (shards.calls.wrong_slot, which imports the shard map and
    so cannot be imported by it)."""
    return any(k == "memstore-wrong-slot" for k, _ in exc.trailing_metadata() or ())


class ReplicaCall:
    """One read, made as a grpc.aio unary call is (awaited, then asked for its trailing
    metadata): by a replica when one answers within its share of `timeout`, else by the
    primary within what is left of it."""

    def __init__(self, stub: ReplicaStub, method: str, request: Any, timeout: float | None,
                 scope: ReadScope, kwargs: dict[str, Any]) -> None:
        self._stub, self._method, self._request = stub, method, request
        self._timeout, self._scope, self._kwargs = timeout, scope, kwargs
        self._call: Any = None

    def __await__(self) -> Any:
        return self._run().__await__()

    async def _run(self) -> Any:
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        replica = await self._stub.replica()
        if replica is not None:
            call = getattr(replica, self._method)(
                self._request, timeout=replica_timeout(_left(deadline)), **self._kwargs)
            try:
                response = await call
                self._scope.heard(await call.trailing_metadata())
                self._call = call
                return response
            except grpc.aio.AioRpcError as exc:
                if unreachable(exc.code()):  # refused, or no answer in its time: hung
                    self._stub.lost(replica)
                elif not _wrong_slot(exc):  # the replica's answer (NOT_FOUND, a bad query)
                    raise
        self._call = getattr(self._stub.primary, self._method)(
            self._request, timeout=_left(deadline), **self._kwargs)
        return await self._call

    async def trailing_metadata(self) -> Any:
        return await self._call.trailing_metadata()


def _left(deadline: float | None) -> float | None:
    """Seconds left until `deadline` (monotonic; None: no deadline)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())
