"""A replica's side of replication: follow a primary's log into this shard.

`Follower.run` keeps one session with the primary at a time and starts another after a
failure (backoff 0.2 s doubling to 5 s). A session:

1. Partial resync (Redis's PSYNC): `Follow` from this log's end, naming the history the
   log holds (memstore/replication/history.py). The primary streams its records from there.
2. Full resync, when this replica holds no history yet, or the primary refuses the
   position (OUT_OF_RANGE: another history, or older than the log it keeps): DATA/HISTORY
   says "none" (a crash from here on empties the directory at the next start), the
   primary's snapshot file is streamed into DATA/snapshots, verified and published, the
   engine is loaded from it and takes the old one's place, the log starts again at the
   snapshot's position, DATA/HISTORY names the primary's history; then 1.

Records are applied as they come through the recovery path (Shard.apply_replicated:
append to this log as they are, so positions are the primary's, then `replay`), fsynced
per batch under this shard's --sync, and acknowledged to the primary (`acked_lsn`: what
this log holds durably), which a primary under --replication sync waits for.

Every step says in the log which resync happened and why.

A silent primary is a lost one. A primary sends a message at least every HEARTBEAT, so a
session that hears nothing for SILENCE seconds ends (connected False, then a reconnect
with backoff): a partition that drops packets without a reset, or a stopped primary,
would otherwise leave this replica "connected" and "caught up" for as long as TCP takes
to notice, which is minutes to hours. The channel's gRPC keepalive covers the calls that
carry no heartbeat (a snapshot fetch).

Lag: `lag()` is (bytes, seconds): how far this log is behind the primary's as of the last
message, and for how long this replica has not been known to hold everything the primary
had: 0 while caught up, connected and heard from within QUIET seconds; otherwise counted
from the last message that found it caught up, so it grows from the moment the primary
fell silent, before SILENCE ends the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from memstore.replication import history
from memstore.replication.primary import HEARTBEAT
from memstore.server import rights
from memstore.server.security import Credentials
from memstore.shard import Shard
from memstore.storage.snapshot_file import SnapshotError, receiving
from memstore.storage.wal_writer import LogFailedError
from memstore.v1 import replication_pb2 as rpb
from memstore.v1 import replication_pb2_grpc

log = logging.getLogger("memstore.replication")

MIN_BACKOFF, MAX_BACKOFF = 0.2, 5.0
# Seconds without a message before the primary is taken as lost: a dozen heartbeats, so a
# primary busy for a moment (a long pause of its event loop) costs nothing, and one cut
# off costs a partial resync once it answers again.
SILENCE = 12 * HEARTBEAT
# Seconds since the last message within which a caught-up replica reports lag 0: a few
# heartbeats, so an idle, healthy replica reads 0 and a silent primary shows at once.
QUIET = 4 * HEARTBEAT
MAX_MESSAGE = 256 << 20  # a record of up to 64 MiB in one message, with room to spare
# gRPC keepalive: a ping every 60 s, the connection given up when one goes unanswered for
# 20 s; it ends the calls that carry no heartbeat (FetchSnapshot) on a dead connection.
# Not more often: a gRPC server's default policy allows a client one ping in 5 minutes
# while it sends nothing itself, and closes the connection (GOAWAY) at the third ping too
# many, which a primary writing a large snapshot before its first chunk would do; at 60 s
# that takes 3 minutes of writing. max_pings_without_data 0: ping even while this replica
# sends nothing (it sends no acks while idle).
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.max_send_message_length", MAX_MESSAGE),
                   ("grpc.keepalive_time_ms", 60_000),
                   ("grpc.keepalive_timeout_ms", 20_000),
                   ("grpc.http2.max_pings_without_data", 0))
# Queued as the last ack when a session ends, so its requests end and so does gRPC's task
# reading them: cancelling a call that already failed leaves that task waiting for ever,
# reported "destroyed but pending" when collected (after every promotion, for one).
SESSION_ENDED = -1


class Follower:
    """Keeps `shard` (opened from its own data directory, shard.replica_of set) following
    the primary at `primary` (host:port)."""

    def __init__(self, shard: Shard, primary: str, history_id: str | None,
                 address: str = "", credentials: Credentials | None = None) -> None:
        assert shard.config.data_dir is not None and shard.log is not None
        self.shard = shard
        self.primary = primary
        self.history = history_id
        self.address = address  # where this replica serves reads, told to the primary
        self.credentials = credentials or Credentials()
        self.data = Path(shard.config.data_dir)
        # What DATA/HISTORY says (the history followed and the line it continues), which
        # change-stream positions are checked against; None while a full resync is due.
        found = history.read(self.data)
        self.line: history.History | None = (
            found if found is not None and found.history == history_id
            else history.replica_of(history_id) if history_id else None)
        self.connected = False
        self.primary_lsn = shard.log.end_lsn  # the primary's readable end, last heard
        self.epoch = shard.engine.epoch
        self.caught_up_at: float | None = None  # monotonic
        self.heard_at = 0.0  # monotonic: the primary's last message
        self.started_at = time.monotonic()
        self.full_resyncs = 0
        self.partial_resyncs = 0

    # ------------------------------------------------------------------ state
    def lag(self) -> tuple[int, float]:
        """(bytes behind the primary's log as last heard, seconds since this replica last
        held everything the primary had)."""
        assert self.shard.log is not None
        behind = max(0, self.primary_lsn - self.shard.log.end_lsn)
        now = time.monotonic()
        if (self.connected and behind == 0 and self.caught_up_at is not None
                and now - self.heard_at < QUIET):
            return 0, 0.0
        since = self.caught_up_at if self.caught_up_at is not None else self.started_at
        return behind, round(now - since, 3)

    def stats(self) -> dict[str, str]:
        behind, seconds = self.lag()
        return {"replication.role": "replica", "replication.primary": self.primary,
                "replication.connected": str(self.connected),
                "replication.history": self.history or "",
                "replication.primary_lsn": str(self.primary_lsn),
                "replication.lag_bytes": str(behind),
                "replication.lag_seconds": f"{seconds:.3f}",
                "replication.full_resyncs": str(self.full_resyncs),
                "replication.partial_resyncs": str(self.partial_resyncs)}

    # ------------------------------------------------------------------ sessions
    async def run(self) -> None:
        backoff = MIN_BACKOFF
        while True:
            started = time.monotonic()
            try:
                await self._session()
                reason = "the primary ended the stream"
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}{_tls_hint(exc)}"
            except (OSError, SnapshotError, ValueError, LogFailedError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                self.connected = False
            if self.shard.writable_error:  # this log failed: nothing more can be applied
                log.error("replication stopped: %s", self.shard.writable_error)
                return
            if time.monotonic() - started > 10 * MAX_BACKOFF:
                backoff = MIN_BACKOFF
            log.warning("replication from %s interrupted (%s); reconnecting in %.1f s",
                        self.primary, reason, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _session(self) -> None:
        async with self.credentials.aio_channel(self.primary, CHANNEL_OPTIONS) as channel:
            stub = replication_pb2_grpc.ReplicationStub(channel)
            if self.history is None:
                await self._full_resync(stub, "this replica holds no history yet")
            try:
                await self._follow(stub)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.OUT_OF_RANGE:
                    raise
                await self._full_resync(stub, f"the primary cannot continue from position "
                                              f"{self.shard.log.end_lsn if self.shard.log else 0}"
                                              f": {exc.details()}")
                await self._follow(stub)

    async def _full_resync(self, stub: Any, reason: str) -> None:
        shard = self.shard
        log.warning("full resync from %s: %s", self.primary, reason)
        # A crash from here on: the directory is emptied at the next start.
        history.write(self.data, history.replica_of(None))
        self.history, self.line = None, None
        call = stub.FetchSnapshot(rpb.FetchSnapshotRequest(
            replica=shard.config.name, salt=rights.salt_id(shard.engine.salt)))
        first = True
        received = 0
        lsn, primary_history, target = 0, "", None
        f = None
        try:
            async for chunk in call:
                if first:
                    lsn, primary_history = chunk.lsn, chunk.history
                    target = receiving(self.data / "snapshots", lsn)
                    f = target.open("wb")
                    first = False
                assert f is not None
                await asyncio.to_thread(f.write, chunk.data)
                received += len(chunk.data)
        finally:
            if f is not None:
                f.close()
        if first:
            raise ValueError("the primary sent no snapshot")
        profiles = await shard.install_snapshot(lsn)
        self.line = history.replica_of(primary_history)
        history.write(self.data, self.line)
        self.history = primary_history
        self.primary_lsn = max(self.primary_lsn, lsn)
        self.full_resyncs += 1
        log.info("full resync done: %d profiles at position %d (%d snapshot bytes) of "
                 "history %s", profiles, lsn, received, primary_history)

    async def _follow(self, stub: Any) -> None:
        shard = self.shard
        assert shard.log is not None and self.history is not None
        start = shard.log.end_lsn
        acks: asyncio.Queue[int] = asyncio.Queue()

        async def requests() -> AsyncIterator[rpb.FollowRequest]:
            yield rpb.FollowRequest(replica=shard.config.name, history=self.history or "",
                                    from_lsn=start, address=self.address,
                                    salt=rights.salt_id(shard.engine.salt))
            while (acked := await acks.get()) != SESSION_ENDED:
                yield rpb.FollowRequest(acked_lsn=acked)

        call = stub.Follow(requests())
        first = True
        try:
            while (message := await _next_message(call)) is not None:
                self.heard_at = time.monotonic()
                if first:
                    first = False
                    self.connected = True
                    self.partial_resyncs += 1
                    log.info("partial resync: following %s from position %d of history %s "
                             "(the primary is at %d)", self.primary, start, self.history,
                             message.primary_lsn)
                    if message.history and message.history != self.history:
                        log.info("the primary continues history %s as %s (it was promoted "
                                 "after position %d): following that", self.history,
                                 message.history, start)
                        self.line = history.followed_on(self.data, message.history, start)
                        history.write(self.data, self.line)
                        self.history = message.history
                if message.records:
                    end = shard.apply_replicated(
                        (r.lsn, r.type, r.payload) for r in message.records)
                    await shard.log.sync_to(end)
                    acks.put_nowait(shard.sendable_lsn)
                self.primary_lsn = message.primary_lsn
                self.epoch = message.epoch
                if shard.log.end_lsn >= message.primary_lsn:
                    self.caught_up_at = self.heard_at
        finally:
            acks.put_nowait(SESSION_ENDED)
            call.cancel()
            with contextlib.suppress(Exception):
                await asyncio.sleep(0)


async def _next_message(call: Any) -> Any:
    """The primary's next Follow message, or None at the end of the stream. Raises
    TimeoutError when none came within SILENCE seconds (the primary sends one at least
    every HEARTBEAT): the session ends and `run` reconnects."""
    try:
        message = await asyncio.wait_for(call.read(), SILENCE)
    except TimeoutError:
        raise TimeoutError(f"the primary sent nothing for {SILENCE:.0f} s (it sends a "
                           f"message every {HEARTBEAT} s): taken as lost, as a partition "
                           f"or a stopped process would be") from None
    return None if message is grpc.aio.EOF else message


def _tls_hint(exc: grpc.aio.AioRpcError) -> str:
    """What to check when the TLS handshake with the primary failed: gRPC's own words
    name OpenSSL's error, not the flags that decide it."""
    if "handshake" not in (exc.details() or "").lower():
        return ""
    return ("; over TLS: --tls-ca must trust the primary's certificate, and where the "
            "primary requires client certificates (--tls-client-ca) it must trust this "
            "replica's --tls-cert")
