"""What a router's call to a shard means: the shared vocabulary of the router's modules.

Nothing here calls a shard; each piece reads or shapes one call:
- the answers a shard gives that are not plain results, as exceptions the router's
  callers catch (Moved, Down, Pending, Stuck, Rejudge, GroupRefused) and the trailers
  they come from (trailer_of, wrong_slot, forward_pairs, epoch_of);
- the options every call to a shard carries (expecting: CLUSTER_SCHEMA, EXPECT_SHARD) and
  the caller's remaining deadline (time_left);
- the retry clock of a call that waits out a moving slot map (attempts, move_pause: up to
  MOVE_WAIT seconds within the deadline);
- ending the caller's call: fail with a status, or abort with the status an exception
  maps to (never UNKNOWN; every message capped, memstore/errors.py).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import grpc
import msgpack

from memstore.errors import capped, drop_tracebacks
from memstore.hashslot import CLUSTER_SCHEMA, EPOCH_TRAILER, EXPECT_SHARD, RECORD_TRAILER
from shards import merge
from shards.backoff import pause
from shards.directory import ClaimStuck, Suppressed
from shards.shard_map import ShardState

# How long a call waits out a moving slot map (wrong slot, a slot nobody owns for a moment
# during a switch, epochs changing under a fan-out) before giving up, within the deadline.
MOVE_WAIT = 30.0
MAX_FORWARDS = 16  # merged-away ids followed in a row before giving up (a cycle is a bug)
MAX_DECLARES = 3  # a write sent again after declaring what it names (more would be a bug)
# Shard answers that say a write was not applied (its claims can be given back).
REFUSED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                     grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE})
Code = grpc.StatusCode


class Moved(Exception):
    """A shard's ownership changed while it answered: retry on a fresh map."""


class Down(Exception):
    def __init__(self, shard: ShardState, details: str) -> None:
        super().__init__(f"shard {shard.label} ({shard.address}) is unavailable: {details}")
        self.shard = shard


class Pending(Exception):
    """A shard answered that a profile is held by an unfinished cross-shard merge."""

    def __init__(self, trailer: bytes) -> None:
        self.loser, self.txn, self.survivor, self.age = msgpack.unpackb(trailer)
        super().__init__(f"profile {self.loser!r} is held by merge {self.txn}")


class GroupRefused(Exception):
    """A shard refused its part of a batch, or did not answer for it (routed with
    `refusals`): `items` are that part, `exc` the shard's answer (or Down), `done` the
    parts applied by then on the other shards. `code` and `details` are what the caller
    is told; `record` the shard's RECORD_TRAILER (the item at fault, its index in
    `items`), only where the shard refused one record (REFUSED codes)."""

    def __init__(self, items: list[Any], exc: grpc.aio.AioRpcError | Down,
                 done: list[tuple[list[Any], Any]]) -> None:
        self.items = items
        self.exc = exc
        self.done = done
        self.record: int | None = None
        if isinstance(exc, Down):
            self.code, self.details = Code.UNAVAILABLE, str(exc)
        else:
            self.code, self.details = exc.code(), exc.details() or exc.code().name
            local = trailer_of(exc, RECORD_TRAILER) if self.code in REFUSED else None
            if local is not None and 0 <= int(local) < len(items):
                self.record = int(local)
        super().__init__(self.details)

    @property
    def refused(self) -> bool:
        """The shard refused its part (it changed nothing); otherwise its outcome is
        unknown (it may have applied)."""
        return self.code in REFUSED


class Stuck(Exception):
    """No shard accepted a slot within MOVE_WAIT."""


class Rejudge(Exception):
    """A write judged against the slot map met other ownership (EXPECT_SHARD): judge it
    again against a fresh map."""


class Background:
    """A stand-in ServicerContext for background work (the sweeper, rebuilding the
    directory): each call gets 5 s; aborting raises."""

    def time_remaining(self) -> float:
        return 5.0  # each call of a sweep gets this long

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise RuntimeError(f"{code.name}: {details}")


def epoch_of(metadata: Any) -> int | None:
    """The epoch a shard sent with its answer (memstore.hashslot.EPOCH_TRAILER), if any."""
    for key, value in metadata or ():
        if key == EPOCH_TRAILER:
            return int(value)
    return None


def trailer_of(exc: grpc.aio.AioRpcError, key: str) -> bytes | None:
    for k, v in exc.trailing_metadata() or ():
        if k == key:
            return v if isinstance(v, bytes) else v.encode()
    return None


def forward_pairs(trailer: bytes) -> list[list[str]]:
    """[[merged id, survivor], ...] from `memstore-merged-into-bin` (a lone pair too)."""
    pairs = msgpack.unpackb(trailer)
    return [pairs] if pairs and isinstance(pairs[0], str) else pairs  # type: ignore[no-any-return]


def retargeted(request: Any, survivor: str) -> Any:
    """A copy of a single-profile request aimed at `survivor` instead."""
    copy = type(request)()
    copy.CopyFrom(request)
    if hasattr(copy, "key"):
        copy.key.id = survivor
    else:
        copy.id = survivor
    return copy


def _refused_with(exc: grpc.aio.AioRpcError, trailer: str) -> bool:
    """A FAILED_PRECONDITION carrying `trailer`: a refusal the router acts on itself."""
    return exc.code() == Code.FAILED_PRECONDITION and trailer_of(exc, trailer) is not None


def wrong_slot(exc: grpc.aio.AioRpcError) -> bool:
    return _refused_with(exc, "memstore-wrong-slot")


def not_primary(exc: grpc.aio.AioRpcError) -> bool:
    """A write refused by a shard that has become a replica (a failover the router's map
    does not know yet): it names the primary in a trailer, and the map will too."""
    return _refused_with(exc, "memstore-primary")


_AS_ROUTER = {"metadata": (CLUSTER_SCHEMA,)}


def expecting(judged: str | None) -> dict[str, Any]:
    """Call options of a call to a shard: from a router (CLUSTER_SCHEMA: its writes may
    not declare attributes by their values there, shards/schema.py), and for a write
    judged for shard "name:epoch" (EXPECT_SHARD), if it was."""
    if judged is None:
        return _AS_ROUTER
    return {"metadata": (CLUSTER_SCHEMA, (EXPECT_SHARD, judged))}


def time_left(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(remaining, 0.001)


async def fail(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
               ) -> NoReturn:
    drop_tracebacks()  # called from except blocks: free the request now (errors.py)
    await context.abort(code, capped(message))
    raise AssertionError("abort returned")


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End the caller's call with the status `exc` means: UNAVAILABLE for a shard down or a
    slot or claim stuck, FAILED_PRECONDITION for a merge or an erasure in the way, a
    shard's own status as it gave it; anything else is raised again."""
    if isinstance(exc, Down | Stuck | ClaimStuck):
        await fail(context, Code.UNAVAILABLE, str(exc))
    if isinstance(exc, merge.Forwarded | merge.Restart | Pending | Suppressed):
        await fail(context, Code.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, grpc.aio.AioRpcError):
        await fail(context, exc.code(), exc.details() or exc.code().name)
    raise exc


async def move_pause(attempt: int, context: grpc.aio.ServicerContext) -> None:
    await pause(attempt, context, "the slot map was changing (a slot move in progress)")


def attempts() -> Iterator[int]:
    give_up = time.monotonic() + MOVE_WAIT
    for attempt in itertools.count():
        yield attempt
        if time.monotonic() > give_up:
            return

