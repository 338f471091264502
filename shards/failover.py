"""`memstore cluster failover SHARD`: promote a replica of a shard, by hand.

Steps (docs/replication.md "Failover"), each said in the report it returns:

1. The routers' view (the first router's ListShards): SHARD's address and epoch.
2. Freeze: the old primary, if it answers, refuses every write from now (UNAVAILABLE) and
   says where its log ends; its replicas go on following it.
3. The candidates: the replicas given, else the ones the old primary lists in its Stats
   (when it still answers). Each is asked for its Stats; the one whose log reaches
   furthest among those following SHARD is chosen (Redis Sentinel's choice, by offset),
   then waited for until it holds the frozen log's end: under --replication sync every
   acknowledged write is then on it (another replica may have confirmed one it lacked).
   If none is found or it does not catch up, the old primary takes writes again and
   nothing has changed.
4. Promote it: it stops following, serves as SHARD at an epoch above every epoch seen
   (the old primary's, and the candidates'), and takes writes.
5. Routers: AddShard(new address), then RemoveShard(old address). Slots go to the higher
   epoch as soon as a router knows the new primary.
6. Fencing: the old primary, if it answers, is told to Demote: it refuses writes from then
   on and follows the new primary (its unreplicated tail, if any, is discarded by a full
   resync). The other candidates are pointed at the new primary. One that does not answer
   is named in the report: start it again with --replica-of the new primary.

No coordinator decides here: the operator does, and the epochs keep an old primary from
taking the slots back (routers prefer the higher epoch; a Demote with a lower epoch is
refused).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import grpc

from memstore.server.security import Credentials
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc, replication_pb2_grpc
from memstore.v1 import replication_pb2 as rpb

TIMEOUT = 10.0


class FailoverError(RuntimeError):
    """The failover could not be done; the message says which step and why."""


class NotPromoted(FailoverError):
    """The candidate refused to be promoted: nothing changed."""


@dataclass
class Report:
    shard: str
    old: str
    new: str = ""
    epoch: int = 0
    position: int = 0
    notes: list[str] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)  # seen on the members asked
    promoting: bool = False  # the Promote call was sent (it may have happened)


async def shard_stats(address: str, credentials: Credentials, timeout: float = TIMEOUT
                      ) -> dict[str, str] | None:
    """A shard's Stats as a dict (with `shard`, its name); None if it does not answer
    within `timeout` seconds."""
    try:
        async with credentials.aio_channel(address) as channel:
            answer = await memstore_pb2_grpc.MemstoreStub(channel).Stats(pb.StatsRequest(),
                                                                          timeout=timeout)
    except grpc.aio.AioRpcError:
        return None
    return {**answer.info, "shard": answer.shard}


async def failover(shard: str, routers: list[str], candidates: list[str],
                   credentials: Credentials | None = None, timeout: float = TIMEOUT) -> Report:
    """Promote the most advanced answering candidate (default: the replicas the old primary
    lists) of `shard`, switch the routers and demote the rest. `timeout`: seconds to wait
    for each member's answer before taking it as down."""
    from shards.admin import admin_call

    credentials = credentials or Credentials()
    try:
        listing = await admin_call(routers[0], "ListShards", credentials=credentials)
    except grpc.aio.AioRpcError as exc:
        raise FailoverError(f"router {routers[0]}: {exc.details()}") from None
    entry = next((s for s in listing["shards"] if shard in (s["name"], s["address"])), None)
    if entry is None:
        raise FailoverError(f"router {routers[0]} knows no shard {shard!r}")
    report = Report(entry["name"] or shard, entry["address"])
    # An old primary still up takes no write from here (and acknowledges none it has not
    # replicated): the replica promoted first catches up to where its log ended.
    frozen_at = await _freeze(report.old, True, credentials, timeout)
    try:
        await _choose(report, entry, candidates, credentials, timeout, frozen_at)
        return await _promote(report, routers, candidates, credentials, timeout)
    except BaseException as exc:
        # Nothing changed (no candidate, one that did not catch up, or one that refused
        # to be promoted): it takes writes again. Not when a promotion may have happened
        # (its answer lost): two primaries could then take writes.
        if frozen_at is not None and (isinstance(exc, NotPromoted) or not report.promoting):
            await _freeze(report.old, False, credentials, timeout)
        raise


async def _choose(report: Report, entry: dict[str, Any], candidates: list[str],
                  credentials: Credentials, timeout: float, frozen_at: int | None) -> None:
    """The replica to promote (report.new), caught up with the frozen old primary; the
    candidates asked (`candidates`, filled from the old primary's Stats when empty)."""
    old_stats = await shard_stats(report.old, credentials, timeout)
    if not candidates and old_stats is not None:
        candidates[:] = [v for k, v in sorted(old_stats.items()) if k.startswith(
            "replication.replica.") and k.endswith(".address") and v]
    if not candidates:
        raise FailoverError(f"no replica to promote: {report.old} "
                            f"{'lists none' if old_stats else 'does not answer'}; name them "
                            "with --replica")
    best: tuple[int, str] | None = None
    epochs = [int(entry.get("epoch", 0))]
    for address in candidates:
        found = await shard_stats(address, credentials, timeout)
        if found is None:
            report.notes.append(f"replica {address} does not answer")
            continue
        epochs.append(int(found.get("epoch", 0)))
        if found.get("replication.role") != "replica":
            report.notes.append(f"{address} is not a replica: skipped")
            continue
        if found.get("replication.primary") != report.old:
            report.notes.append(f"{address} follows {found.get('replication.primary')}, not "
                                f"{report.old}: skipped")
            continue
        position = int(found.get("log.position", 0))
        if best is None or position > best[0]:
            best = (position, address)
    if best is None:
        raise FailoverError("no replica of " + report.old + " answered: "
                            + "; ".join(report.notes))
    report.position, report.new = best
    report.epochs = epochs
    if frozen_at is not None:
        await _caught_up(report.new, frozen_at, credentials, timeout)


async def _promote(report: Report, routers: list[str], candidates: list[str],
                   credentials: Credentials, timeout: float) -> Report:
    """Promote report.new above every epoch seen, switch the routers, demote the rest."""
    from shards.admin import admin_call

    epochs = report.epochs
    async with credentials.aio_channel(report.new) as channel:
        report.promoting = True
        try:
            promoted = await replication_pb2_grpc.ReplicationStub(channel).Promote(
                rpb.PromoteRequest(shard=report.shard, epoch=max(epochs) + 1),
                timeout=max(timeout, TIMEOUT))
        except grpc.aio.AioRpcError as exc:
            refused = exc.code() in (grpc.StatusCode.FAILED_PRECONDITION,
                                     grpc.StatusCode.INVALID_ARGUMENT)
            raise (NotPromoted if refused else FailoverError)(
                f"promoting {report.new}: {exc.details()}") from None
    report.epoch, report.position = promoted.epoch, promoted.lsn
    for router in routers:
        try:
            await admin_call(router, "AddShard", {"address": report.new},
                             credentials=credentials)
            await admin_call(router, "RemoveShard", {"name": report.old},
                             credentials=credentials)
        except grpc.aio.AioRpcError as exc:
            report.notes.append(f"router {router}: {exc.details()} (restart it with "
                                f"--shard {report.new} in place of {report.old})")
    for address in [report.old, *(c for c in candidates if c != report.new)]:
        report.notes.append(await _demote(address, report, credentials, timeout))
    return report


async def _freeze(address: str, frozen: bool, credentials: Credentials, timeout: float
                  ) -> int | None:
    """Freeze (or thaw) the old primary: where its log ends, or None when it does not
    answer (it is down: it takes no writes either)."""
    try:
        async with credentials.aio_channel(address) as channel:
            answer = await replication_pb2_grpc.ReplicationStub(channel).Freeze(
                rpb.FreezeRequest(frozen=frozen), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                          grpc.StatusCode.UNIMPLEMENTED):  # (down, or older than Freeze)
            return None
        raise FailoverError(f"{address}: {exc.details()}") from None
    return int(answer.lsn)


async def _caught_up(address: str, lsn: int, credentials: Credentials, timeout: float
                     ) -> None:
    """Wait until the replica at `address` holds the frozen primary's log up to `lsn`."""
    deadline = asyncio.get_running_loop().time() + max(timeout, TIMEOUT)
    while True:
        found = await shard_stats(address, credentials, timeout)
        at = int((found or {}).get("log.position", 0))
        if at >= lsn:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise FailoverError(f"{address} did not catch up with the old primary (at {at} "
                                f"of {lsn}); nothing was changed")
        await asyncio.sleep(0.05)


async def _demote(address: str, report: Report, credentials: Credentials, timeout: float
                  ) -> str:
    try:
        async with credentials.aio_channel(address) as channel:
            answer = await replication_pb2_grpc.ReplicationStub(channel).Demote(
                rpb.DemoteRequest(primary=report.new, epoch=report.epoch), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return (f"{address} does not answer: if it comes back, start it with "
                    f"--replica-of {report.new} (its writes after position "
                    f"{report.position} are discarded)")
        return f"{address} refused to follow {report.new}: {exc.details()}"
    return f"{address} now follows {report.new} (its log ended at {answer.lsn})"


def describe(report: Report) -> dict[str, Any]:
    return {"shard": report.shard, "old": report.old, "new": report.new,
            "epoch": report.epoch, "position": report.position, "notes": report.notes}
