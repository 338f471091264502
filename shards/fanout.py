"""Asking every shard at once, exactly: the router's fan-out over a stable partition.

Each shard answers over the profiles in the slots it owns, so the answers add up exactly
when the shards' claims partition the slots and no shard changed ownership while
answering. `FanOut` checks both: it only asks over a map whose claims are a partition
(`stable`), and each shard sends, with its answer, the epoch it answered at (trailing
metadata `memstore-epoch`; a shard that does not is asked with GetShardInfo right after,
`checked`); an epoch other than the map's means ownership moved under the call, and the
whole call is made again on a fresh map (`every`). Epochs only ever grow, so the map's
epoch at answer time proves unchanged ownership between the map's refresh and the answer.

A shard that is down fails the call with UNAVAILABLE naming it, unless the caller allows
a partial answer: then the shards missing are listed. A profile held by an unfinished
merge is settled (shards/routing.py) and the call made again. Streams from several shards
at once come through `relay`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from memstore.v1 import cluster_pb2 as cpb
from shards.calls import (
    Code,
    Down,
    Moved,
    Pending,
    abort,
    attempts,
    epoch_of,
    fail,
    move_pause,
    trailer_of,
)
from shards.routing import Routing
from shards.shard_map import ShardState

T = TypeVar("T")


class FanOut:
    """Calls to every shard of `routing.map`, exact over a stable partition of the slots."""

    def __init__(self, routing: Routing) -> None:
        self.routing = routing  # settles the merges a fan-out meets
        self.map = routing.map

    async def stable(self, context: grpc.aio.ServicerContext, allow_partial: bool
                     ) -> list[tuple[ShardState, int]]:
        """Wait for a map whose claims partition the slots; return the shards to ask with
        the epochs that partition is made of (read together, with no await in between).
        Shards never reached make the map incomplete without a move being at fault."""
        for attempt in attempts():
            if self.map.exact:
                return [(s, s.epoch) for s in self.map.ordered()]
            version = self.map.version
            await self.map.refresh(since=version)
            if self.map.exact:
                return [(s, s.epoch) for s in self.map.ordered()]
            down = [s for s in self.map.shards if not s.reachable]
            if down:
                if not allow_partial:
                    await abort(context, Down(down[0], down[0].error or "unreachable"))
                return [(s, s.epoch) for s in self.map.ordered()]
            await move_pause(attempt, context)
        await fail(context, Code.UNAVAILABLE, "the slot map did not settle (slots without an "
                   "owner or claimed twice); a slot move may be stuck")

    async def checked(self, shard: ShardState, epoch: int,
                      call: Callable[[ShardState], Any]) -> T:
        """`call` on one shard (a unary gRPC call), then prove its ownership was that of
        `epoch` when it answered: the epoch it sends with the answer (EPOCH_TRAILER), or,
        from a shard that does not, the one it reports when asked right after."""
        try:
            rpc = call(shard)
            result: T = await rpc
            answered = epoch_of(await rpc.trailing_metadata())
            if answered is None:
                info: cpb.ShardInfo = await shard.control.GetShardInfo(cpb.ShardInfoRequest(),
                                                                       timeout=5.0)
                answered = info.epoch
        except grpc.aio.AioRpcError as exc:
            if exc.code() == Code.UNAVAILABLE:
                shard.reachable, shard.error = False, exc.details() or "unavailable"
                raise Down(shard, exc.details() or "unreachable") from None
            pending = trailer_of(exc, "memstore-merge-pending-bin")
            if pending is not None:
                raise Pending(pending) from None
            raise
        if answered != epoch:
            raise Moved()
        return result

    async def every(self, context: grpc.aio.ServicerContext,
                    call: Callable[[ShardState], Any], allow_partial: bool = False,
                    ) -> tuple[list[tuple[ShardState, Any]], list[str]]:
        """`call` (a unary gRPC call, not awaited) on every shard at once; exact over a
        stable partition of the slots."""
        for attempt in attempts():
            shards = await self.stable(context, allow_partial)
            version = self.map.version
            outcomes = await asyncio.gather(*(self.checked(s, e, call) for s, e in shards),
                                            return_exceptions=True)
            if any(isinstance(o, Moved) for o in outcomes):
                await self.map.refresh(since=version)
                if attempt:
                    await move_pause(attempt, context)
                continue
            pending = next((o for o in outcomes if isinstance(o, Pending)), None)
            if pending is not None:
                try:
                    await self.routing.settle(pending, attempt, context)
                except Exception as exc:  # noqa: BLE001 - abort re-raises the rest
                    await abort(context, exc)
                continue
            results: list[tuple[ShardState, Any]] = []
            missing: list[str] = []
            for (shard, _), outcome in zip(shards, outcomes):
                if isinstance(outcome, Down):
                    if not allow_partial:
                        await abort(context, outcome)
                    missing.append(shard.label)
                elif isinstance(outcome, BaseException):
                    await abort(context, outcome)  # type: ignore[arg-type]
                else:
                    results.append((shard, outcome))
            if missing:
                asyncio.get_running_loop().create_task(self.map.refresh(since=version))
            return results, missing
        await fail(context, Code.UNAVAILABLE, "shard ownership kept changing during the query")


async def relay(calls: list[Any]) -> AsyncIterator[Any]:
    """The messages of several server streams as they come (an AioRpcError in place of a
    stream that failed, after which nothing more is read)."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=4 * max(1, len(calls)))
    done = object()

    async def pump(call: Any) -> None:
        try:
            async for message in call:
                await queue.put(message)
        except grpc.aio.AioRpcError as exc:
            await queue.put(exc)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(call)) for call in calls]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
                continue
            yield item
            if isinstance(item, grpc.aio.AioRpcError):
                return
    finally:
        for task in tasks:
            task.cancel()
