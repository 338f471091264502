"""Change streams through a router: every shard's stream merged into one, resumable.

A router opens the same WatchSegments or WatchChanges call on every shard, passing the
caller's position token on as it is (each shard reads its own entry; a shard the token
does not name, one added since, starts from the oldest change it keeps), and merges what
they send:

- Order. Each shard's events come in its log's order, each with the time of the change
  that caused it, and every message says the time before which that shard has sent
  everything (a heartbeat does too, while a shard is idle). The router sends an event once
  every shard is past its time (a watermark, as MongoDB merges change streams by cluster
  time), oldest first. So the events of one profile stay in order also when a slot move
  hands it from one shard to another: the source's last change happened before the move's
  freeze, the target's first after its switch.
- Positions. A router's token is the vector of every shard's position, each the last
  sent of that shard's (memstore/server/watch.py). Resuming from an event's token gives
  every event after it from every shard; a shard added since starts from its beginning.
  A token naming a shard the router does not have (removed since) is refused with
  OUT_OF_RANGE (`check_named`): what that shard changed after the position went to no
  other shard's log (a slot move copies quietly), so it cannot be replayed. No timestamp
  is compared on resume, so two shards' changes at the same instant are never skipped or
  doubled.
- Initial sync. The shards' current members (or profiles) pass through as they come,
  without positions; once every shard has listed its own, one message carries the seam's
  token, and changes follow.
- Shards. A shard that is down ends the stream with UNAVAILABLE naming it (resume from the
  last token), and so does one that sends nothing for STALL seconds (hung, or cut off: it
  heartbeats every 50 ms to a router, and the merge cannot pass its watermark without
  it); one added is watched from then on (the router looks at its map every MAP_CHECK
  seconds). One taken out of the cluster is read on until it has sent everything it
  holds (a heartbeat, which it sends only when idle, heard after the router saw it leave:
  its drain had ended before) and all of that is sent on; then it leaves the merge and
  the vector, so later tokens resume without it. If it goes down first, the stream ends
  UNAVAILABLE and its tokens, naming it, are refused on resume. A shard whose name a new
  process serves (a failover's new primary) is replaced at once: the new one goes on
  from the last position sent, in the history it continues; the old one, a replica of it
  from then on, would send the same changes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from memstore.server.watch import OutOfRange, Position, decode_token, encode_token
from shards.calls import Down
from shards.shard_map import ShardMap, ShardState

MAP_CHECK = 1.0  # seconds between looks for shards added or removed
STALL = 15.0  # seconds of silence from a shard that end a merged stream (UNAVAILABLE)
BATCH = 1000


@dataclass
class _Feed:
    """One shard's stream, as the merge sees it."""

    shard: ShardState
    task: asyncio.Task[None] | None = None
    heard: float = 0.0  # the event loop's time its last message arrived (or it opened)
    low: int = -1  # microseconds: every change of this shard before it has arrived
    listed: bool = False  # its initial listing (if any) is complete
    sent: Position | None = None  # its position of the last event sent on
    left: bool = False  # its shard was seen gone from the map
    idle_since_left: bool = False  # it sent a heartbeat after that: it has sent all it held
    queued: int = 0  # its messages waiting in the merge's queue
    # (at, sequence, position or None for a pure position marker, event or None)
    pending: list[tuple[int, int, Position | None, Any]] = field(default_factory=list)


class Merge:
    """Merges shards' streams of one kind (segments: events; changes: changes)."""

    def __init__(self, shard_map: ShardMap, open_stream: Callable[[ShardState, Any], Any],
                 request: Any, items: str, make: Callable[..., Any], initial: bool,
                 start: dict[str, Position]) -> None:
        self.map = shard_map
        self.open_stream = open_stream  # (shard, request) -> the gRPC stream call
        self.request = request
        self.items = items  # "events" or "changes": the repeated field of a message
        self.make = make  # the response message class
        self.initial = initial
        self.feeds: dict[int, _Feed] = {}
        self.queue: asyncio.Queue[tuple[_Feed, Any] | BaseException] = asyncio.Queue()
        self.seq = itertools.count()
        self.positions: dict[str, Position] = dict(start)  # the vector sent so far
        self.seam_sent = not initial
        self._beat = ("", 0.0)  # the last heartbeat's token and time
        self.stall = STALL

    def _add(self, shard: ShardState, late: bool) -> None:
        """Watch `shard`. One found `late` (added to the cluster since the stream began)
        lists nothing (what it holds moved from shards already listed) and starts where
        the vector has its name: a new primary of a shard after a failover goes on from
        the old one's position, which its history continues (not from its oldest change,
        replaying its log); a shard new to the stream, from its oldest kept change."""
        request = self.request
        if late:
            request = type(request)()
            request.CopyFrom(self.request)
            request.initial = False
            request.from_position = encode_token(self.positions)
        loop = asyncio.get_running_loop()
        feed = _Feed(shard, listed=late or not self.initial, heard=loop.time())
        feed.task = loop.create_task(self._read(feed, request))
        self.feeds[id(shard)] = feed

    async def _read(self, feed: _Feed, request: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for message in self.open_stream(feed.shard, request):
                feed.heard = loop.time()  # (as it arrives: a slow caller is no stall)
                if feed.left and not getattr(message, self.items):
                    feed.idle_since_left = True
                feed.queued += 1
                await self.queue.put((feed, message))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:  # say which shard
                await self.queue.put(Down(feed.shard, exc.details() or "unreachable"))
            else:
                await self.queue.put(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - ends the merged stream with it
            await self.queue.put(exc)

    def _watch_map(self, late: bool = True) -> None:
        """Shards added since: watch them; shards gone: mark them leaving (`_drop_left`)."""
        present = {id(s): s for s in self.map.shards}
        for key, shard in present.items():
            if key not in self.feeds:
                self._add(shard, late)
        for key, feed in list(self.feeds.items()):
            if key in present or feed.left:
                continue
            if any(s.name == feed.shard.name for s in present.values()):
                # A failover's new primary serves the shard now, watched from the last
                # position sent (`_add`); the old one, a replica of it from now on,
                # would send its changes again.
                self._forget(key)
            else:
                feed.left = True

    def _forget(self, key: int) -> None:
        """Stop reading a feed and take it out of the merge."""
        feed = self.feeds.pop(key)
        if feed.task is not None:
            feed.task.cancel()

    def _drop_left(self) -> None:
        """Feeds of shards gone from the map that have sent on everything they held: out
        of the watermark, and their entry out of the vector, unless another process
        serves under the shard's name (a failover's new primary, in the map or watched:
        it goes on from that entry, `_add`)."""
        for key, feed in list(self.feeds.items()):
            if feed.idle_since_left and not feed.queued and not feed.pending:
                self._forget(key)
                name = feed.shard.name
                if all(f.shard.name != name for f in self.feeds.values()) \
                        and all(s.name != name for s in self.map.shards):
                    self.positions.pop(name, None)

    def _take(self, feed: _Feed, message: Any) -> list[Any]:
        """Queue a shard's message; initial items are returned to send at once."""
        items = list(getattr(message, self.items))
        at = message.at.seconds * 1_000_000 + message.at.nanos // 1000 \
            if message.HasField("at") else -1
        out = []
        for item in items:
            if item.initial:
                out.append(item)
                continue
            own = decode_token(item.position)[feed.shard.name] if item.position else None
            item_at = item.at.seconds * 1_000_000 + item.at.nanos // 1000
            heapq.heappush(feed.pending, (item_at, next(self.seq), own, item))
        if message.position:
            if not feed.listed:
                feed.listed = True
            position = decode_token(message.position)[feed.shard.name]
            if feed.shard.name not in self.positions and len(out) == len(items):
                # where its stream starts (it sends that first): in the vector at once
                self.positions[feed.shard.name] = position
            heapq.heappush(feed.pending, (max(at, 0), next(self.seq), position, None))
        if at >= 0:
            feed.low = max(feed.low, at)
        return out

    def _ready(self) -> list[Any]:
        """Events every shard is past, oldest first, each with the vector token."""
        feeds = list(self.feeds.values())
        if not feeds or any(f.low < 0 for f in feeds):
            return []
        watermark = min(f.low for f in feeds)
        merged: list[tuple[int, str, int, _Feed]] = []
        for feed in feeds:
            for at, seq, _, _ in feed.pending:
                if at <= watermark:
                    merged.append((at, feed.shard.name, seq, feed))
        merged.sort(key=lambda t: (t[0], t[1], t[2]))
        out = []
        for _, name, _, feed in merged:
            at, seq, position, item = heapq.heappop(feed.pending)
            if position is not None:
                self.positions[name] = position
            if item is not None:
                item.position = encode_token(self.positions)
                out.append(item)
        return out

    def _complete(self) -> bool:
        """Whether the vector names every shard watched: until then a token would send a
        resumed stream to the oldest change of a shard it leaves out."""
        return all(f.shard.name in self.positions for f in self.feeds.values())

    def _message(self, items: list[Any]) -> Any:
        message = self.make(position=encode_token(self.positions) if self.seam_sent else "")
        getattr(message, self.items).extend(items)
        lows = [f.low for f in self.feeds.values()]
        if lows and min(lows) >= 0:  # every shard has sent everything before this
            message.at.FromMicroseconds(min(lows))
        return message

    async def run(self) -> AsyncIterator[Any]:
        self._watch_map(late=False)
        last_check = asyncio.get_running_loop().time()
        try:
            while True:
                try:
                    got = await asyncio.wait_for(self.queue.get(), MAP_CHECK)
                except TimeoutError:
                    got = None
                now = asyncio.get_running_loop().time()
                if now - last_check >= MAP_CHECK:
                    last_check = now
                    await self.map.refresh()
                    self._watch_map()
                silent = [f for f in self.feeds.values() if now - f.heard > self.stall]
                if silent:
                    raise Down(silent[0].shard, f"its stream sent nothing for "
                               f"{self.stall:.0f} s (hung, or cut off from this router); "
                               "resume from the last position")
                if got is None:
                    continue
                if isinstance(got, BaseException):
                    raise got
                feed, message = got
                feed.queued -= 1
                if id(feed.shard) not in self.feeds:
                    continue
                initial = self._take(feed, message)
                for start in range(0, len(initial), BATCH):
                    yield self._message(initial[start:start + BATCH])
                if not self.seam_sent and all(f.listed for f in self.feeds.values()):
                    self.seam_sent = True
                    for f in self.feeds.values():  # the seam: every shard's listing's end
                        for at, _, position, item in sorted(f.pending):
                            if item is None and position is not None:
                                self.positions[f.shard.name] = position
                                break
                    yield self._message([])
                if not self.seam_sent:
                    continue
                ready = self._ready()
                self._drop_left()
                for start in range(0, len(ready), BATCH):
                    yield self._message(ready[start:start + BATCH])
                if not ready and not getattr(message, self.items) and self._complete():
                    beat = self._message([])  # a heartbeat: the position moved, or a second
                    if beat.position != self._beat[0] or now - self._beat[1] >= 1.0:
                        self._beat = (beat.position, now)
                        yield beat
        finally:
            for feed in self.feeds.values():
                if feed.task is not None:
                    feed.task.cancel()
            for feed in self.feeds.values():
                if feed.task is not None:
                    with contextlib.suppress(BaseException):
                        await feed.task


def start_positions(token: str) -> dict[str, Position]:
    """The shard positions of a caller's token (InvalidArgument if it is not one)."""
    return decode_token(token) if token else {}


async def check_named(shard_map: ShardMap, start: dict[str, Position]) -> None:
    """OutOfRange when `start` names a shard not in the cluster: its changes after the
    position cannot be replayed (a drain moves profiles as quiet copies; their changes
    stayed in the removed shard's log). The map is read once more first, so a shard this
    router has not yet reached or heard of is not taken for removed; one still not reached
    then might be the shard named: Down (UNAVAILABLE), resume once it is back."""
    if set(start) <= {s.name for s in shard_map.shards}:
        return
    await shard_map.refresh()
    unknown = sorted(set(start) - {s.name for s in shard_map.shards})
    if not unknown:
        return
    unnamed = [s for s in shard_map.shards if not s.name]
    if unnamed:
        raise Down(unnamed[0], f"not reached yet, so whether it is {unknown[0]}, which the "
                   "position names, is not known; resume once it is back")
    raise OutOfRange(f"position names {unknown[0]}, which is no longer in this cluster "
                     "(removed since?): the changes it held after this position cannot be "
                     "replayed; start again with initial")
