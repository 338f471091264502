"""Change streams under `--replication sync` read only what a replica confirmed.

A sync primary acknowledges a write once a replica holds it; one no replica confirmed is
refused to its writer ("may or may not survive a failover"). A watcher must not see such
a write either: after a failover to the replica it never happened, and the watcher's
position would be refused. The replicas themselves are fed from the primary's own durable
point (they could confirm nothing otherwise). Real processes for the end-to-end case; an
in-process shard for the rule itself (Shard.readable_lsn, Shard.sendable_lsn).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from memstore import Client, ClientError
from memstore.replication.primary import Replica, Replicas
from memstore.shard import Shard, ShardConfig, encode_meta
from memstore.storage import wal_format
from tests.test_replication import Proc, _free_port, primary_and_replica, start, wait_replicas
from tests.test_segments import Watcher

PROMPT = 5.0  # seconds an ordinary write may take to reach a watcher (loaded CI)


def ids(watcher: Watcher) -> list[str]:
    return [str(e["id"]) for e in watcher.events]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


# ---------------------------------------------------------------------- real processes

def test_a_sync_write_no_replica_confirmed_reaches_watchers_only_once_one_does(
        tmp_path: Path, procs: list[Proc]) -> None:
    primary, replica = primary_and_replica(tmp_path, procs, "--replication", "sync",
                                           "--replication-timeout", "0.5")
    wait_replicas(primary.address, 1)
    watcher = Watcher(primary.address, changes=True).started()
    try:
        with Client(primary.address) as c:
            c.upsert("before", {"x": 1})
            wait_for(lambda: "before" in ids(watcher), PROMPT, "a confirmed write was late")
            os.kill(replica.proc.pid, signal.SIGSTOP)  # connected, confirms nothing
            try:
                seen, written = len(watcher.items), time.time()
                with pytest.raises(ClientError) as refused:
                    c.upsert("during", {"x": 2})
                assert refused.value.code == grpc.StatusCode.UNAVAILABLE
                assert "no replica confirmed it" in refused.value.details
                time.sleep(1.2)  # (a watcher that were sent it would have it by now)
                assert ids(watcher) == ["before"], "a watcher saw an unconfirmed write"
                # Its heartbeats (one a second) do not claim every change was read.
                beats = [i["at"].timestamp() for i in watcher.items[seen:] if i.get("heartbeat")]
                assert beats and max(beats) < written, (beats, written)
            finally:
                os.kill(replica.proc.pid, signal.SIGCONT)
            wait_for(lambda: "during" in ids(watcher), 10.0,
                     "the write was not sent once the replica confirmed it")
            c.upsert("after", {"x": 3})
            wait_for(lambda: "after" in ids(watcher), PROMPT, "a confirmed write was late")
        assert ids(watcher) == ["before", "during", "after"]
        assert watcher.error is None, watcher.error
    finally:
        watcher.close()


def test_a_stream_started_while_a_write_awaits_confirmation_gets_it_once_confirmed(
        tmp_path: Path, procs: list[Proc]) -> None:
    """A stream "from now" starts at what is acknowledged, not at the log's end: a write
    still waiting for a replica when the stream starts is sent once it is confirmed (it
    was started at the end of the log, past that write, and never saw it)."""
    primary, replica = primary_and_replica(tmp_path, procs, "--replication", "sync",
                                           "--replication-timeout", "0.5")
    wait_replicas(primary.address, 1)
    with Client(primary.address) as c:
        os.kill(replica.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(ClientError):
                c.upsert("pending", {"x": 1})  # on the primary's log, unconfirmed
            watcher = Watcher(primary.address, changes=True).started()
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)
    try:
        wait_for(lambda: "pending" in ids(watcher), 10.0,
                 "a write confirmed after the stream started never reached it")
        assert watcher.error is None, watcher.error
    finally:
        watcher.close()


def test_a_stream_from_now_on_a_restarted_sync_primary_starts_at_its_log_end(
        tmp_path: Path, procs: list[Proc]) -> None:
    """A sync primary starts with nothing confirmed by a replica (what watchers may read
    is behind its log): a stream "from now" opened then starts at the log's end, not at
    what watchers may read, which replayed the whole log once the replica reconnected."""
    port = str(_free_port())
    primary = start(tmp_path / "p", "--port", port, "--replication", "sync")
    procs.append(primary)
    replica = start(tmp_path / "r", "--replica-of", primary.address)
    procs.append(replica)
    wait_replicas(primary.address, 1)
    with Client(primary.address) as c:
        for i in range(5):
            c.upsert(f"old{i}", {"x": i})
    primary.stop()
    primary = start(tmp_path / "p", "--port", port, "--replication", "sync")
    procs.append(primary)
    watcher = Watcher(primary.address, changes=True).started()  # from now: no position
    try:
        wait_replicas(primary.address, 1)
        with Client(primary.address) as c:
            c.upsert("new", {"x": 9})
        wait_for(lambda: "new" in ids(watcher), 10.0, "a write after the start never came")
        assert ids(watcher) == ["new"], "a stream from now replayed the log"
    finally:
        watcher.close()


def test_an_async_primary_sends_watchers_what_no_replica_holds(
        tmp_path: Path, procs: list[Proc]) -> None:
    primary, replica = primary_and_replica(tmp_path, procs)
    wait_replicas(primary.address, 1)
    watcher = Watcher(primary.address, changes=True).started()
    try:
        os.kill(replica.proc.pid, signal.SIGSTOP)
        try:
            with Client(primary.address) as c:
                c.upsert("alone", {"x": 1})  # acknowledged from the primary's own log
            wait_for(lambda: "alone" in ids(watcher), PROMPT, "an async write was held back")
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)
    finally:
        watcher.close()


# ---------------------------------------------------------------------- the rule, in process

async def _sync_primary(data: Path) -> tuple[Shard, Replicas]:
    shard = await Shard.open(ShardConfig(data_dir=data))
    replicas = Replicas(shard, sync=True, timeout=0.5)
    shard.replication = replicas
    return shard, replicas


async def _watcher_woken_by_an_ack(data: Path) -> None:
    shard, replicas = await _sync_primary(data)
    try:
        assert shard.log is not None
        await shard.set_ownership(1, None)  # a record no replica holds yet
        end = shard.log.end_lsn
        assert shard.sendable_lsn == end  # replicas are sent it at once ...
        assert shard.readable_lsn == 0  # ... watchers only once one confirms it
        assert not await shard.wait_advanced(0, 0.05)
        replica = Replica("r", "", 0)
        replicas.add(replica)
        waiting = asyncio.create_task(shard.wait_advanced(0, 5.0))
        await asyncio.sleep(0)
        replicas.ack(replica, end)
        assert await asyncio.wait_for(waiting, 1.0)
        assert shard.readable_lsn == end
        replicas.remove(replica)  # what it confirmed it holds still
        assert shard.readable_lsn == end
    finally:
        await shard.close()


def test_a_replicas_ack_moves_what_watchers_read_and_wakes_them(tmp_path: Path) -> None:
    asyncio.run(_watcher_woken_by_an_ack(tmp_path / "d"))


async def _fed_while_unconfirmed(data: Path) -> None:
    shard, _ = await _sync_primary(data)
    try:
        assert shard.log is not None
        waiting = asyncio.create_task(shard.wait_sendable(0, 5.0))
        await asyncio.sleep(0)
        await shard.set_ownership(1, None)
        assert await asyncio.wait_for(waiting, 1.0)  # the feed moves, nothing confirmed
        assert shard.readable_lsn == 0
    finally:
        await shard.close()


def test_replicas_are_fed_what_no_replica_confirmed_yet(tmp_path: Path) -> None:
    asyncio.run(_fed_while_unconfirmed(tmp_path / "d"))


async def _demoted(data: Path) -> None:
    shard, replicas = await _sync_primary(data)
    try:
        assert shard.log is not None
        await shard.set_ownership(1, None)
        confirmed = shard.log.end_lsn
        replicas.add(Replica("r", "", confirmed))
        await shard.set_ownership(2, None)  # never confirmed
        await shard.become_replica("elsewhere:1")
        assert shard.readable_lsn == confirmed  # its unconfirmed tail stays unread ...
        shard.apply_replicated([(shard.log.end_lsn, wal_format.RECORD_SHARD_META,
                                 encode_meta(3, None))])
        await shard.log.sync_to(shard.log.end_lsn)
        assert shard.readable_lsn == shard.log.end_lsn  # ... until the new primary's log
    finally:
        await shard.close()


def test_a_demoted_sync_primary_keeps_its_unconfirmed_tail_from_watchers(
        tmp_path: Path) -> None:
    asyncio.run(_demoted(tmp_path / "d"))


async def _async_primary(data: Path) -> None:
    shard = await Shard.open(ShardConfig(data_dir=data))
    shard.replication = Replicas(shard, sync=False)
    try:
        assert shard.log is not None
        await shard.set_ownership(1, None)
        assert shard.readable_lsn == shard.sendable_lsn == shard.log.end_lsn
    finally:
        await shard.close()


def test_without_sync_watchers_read_the_primarys_own_log(tmp_path: Path) -> None:
    asyncio.run(_async_primary(tmp_path / "d"))
