"""Merging profiles that live on different shards, atomically and crash-safely.

A Link or Upsert of profile S (on shard B, the owner of slot_of(S)) names an identifier that
profile L holds on shard A. The router coordinates; the shards keep all the state, so any
router (or the same one restarted) can finish what another began:

 1. Hold.     A.Hold(txn, L, S): A freezes L in a logged note. Calls that touch L (by id or
              by identifier) now get FAILED_PRECONDITION with `memstore-merge-pending-bin`
              (txn, survivor, age) and queries no longer count L: from here the person is
              counted once, as S. Hold answers L's full export (attribute names and kinds).
 2. Absorb.   B.Absorb(txn, [L's export], the caller's own request): in ONE logged change, B
              merges L into S by the README's rules, takes L's identifiers and merged ids,
              applies the request, and records txn as committed. This is the commit point.
 3. Release.  A.Release(txn, L, committed=True): A forgets L and keeps a forward L -> S
              (and for the ids merged into L before), so L's primary id still resolves: a
              shard answers `memstore-merged-into-bin` and the router asks for S instead.

Crash anywhere, and on restart the state is either merged or not, never half of each:
- Before Absorb is logged, B holds no trace of txn. Whoever finds L held (a call touching
  it, after HOLD_PATIENCE; or the router's sweeper) asks B.Decide(txn): B logs "aborted"
  for txn and answers so, and A.Release(committed=False) makes L visible again, unchanged.
  A late Absorb of that txn is refused, because Decide and Absorb both run on B's single
  writer (plan and apply with no await between), so exactly one of them records the txn.
- After Absorb is logged, Decide answers committed, and Release finishes the merge. Decide
  answers only once the decision it read is durable (an empty change waits for the fsync
  of the changes before it), so a rolled-back Absorb is never reported committed.
- Once every loser is released, the coordinator tells B to Forget the decision: no hold of
  that transaction is left anywhere, so nobody asks again.
- Holds, forwards and decisions are in the shards' logs and snapshots; they travel with
  their slots on a move (forwards and holds by the primary id's slot, decisions by the
  survivor's), and a shard refuses to give up a slot while a profile in it is held.

Two merges racing for the same profile: the second finds it held and waits; if the first
stalls past HOLD_PATIENCE it is aborted (Decide), and its own Absorb is then refused, so its
router starts over with a new transaction.

Who must merge is found by the write's claims in the identifier directory
(shards/directory.py): an identifier claimed for a profile on another shard that holds it.
Should one identifier still end up with two owners (a write slower than the claim grace
period, see there), the next merge that meets both joins them (Absorb merges a profile of
B that holds one of L's identifiers as well).
"""

from __future__ import annotations

import logging
import os
import signal
import uuid
from collections.abc import Awaitable
from typing import Any, Protocol

import grpc
import msgpack

from memstore.server import metrics
from memstore.v1 import cluster_pb2 as cpb
from memstore.v1 import memstore_pb2 as pb

log = logging.getLogger("memstore.merge")

# A hold younger than this is waited out (the merge finishes in milliseconds); an older
# one is decided and released by whoever meets it.
HOLD_PATIENCE = 1.0
# For crash tests only: the router kills itself with SIGKILL at this step of a merge.
CRASH_ENV = "MEMSTORE_TEST_CRASH_AT"


class Forwarded(Exception):
    """A shard answered that `pid` was merged into `survivor` on another shard."""

    def __init__(self, pid: str, survivor: str, why: str = "") -> None:
        super().__init__(why or f"profile {pid!r} was merged into {survivor!r}")
        self.pid = pid
        self.survivor = survivor


class Restart(Exception):
    """The merge's premises changed (a loser moved, or our transaction was aborted by a
    racing caller): look the identifiers up again and start over with a new transaction."""


class Caller(Protocol):
    """What the coordinator needs from the router: a call to the owner of a primary id's
    slot, following slot moves and waiting out other merges' holds."""

    def control(self, pid: str, method: str, request: Any, context: Any,
                expect: str | None = None) -> Awaitable[Any]: ...

    def profile(self, pid: str, method: str, request: Any, context: Any) -> Awaitable[Any]: ...


def crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        log.warning("%s=%s: killing this process", CRASH_ENV, step)
        os.kill(os.getpid(), signal.SIGKILL)


async def decide_and_release(router: Caller, txn: str, loser: str, survivor: str,
                             context: Any) -> bool:
    """Finish or abort merge `txn` as its survivor's shard decides; True if committed."""
    decision = await router.control(survivor, "Decide",
                                    cpb.DecideRequest(txn=txn, survivor=survivor), context)
    await router.control(loser, "Release", cpb.ReleaseRequest(
        txn=txn, loser=loser, committed=decision.committed), context)
    log.info("merge %s of %r into %r: %s", txn, loser, survivor,
             "committed" if decision.committed else "aborted")
    metrics.MERGES.labels("finished" if decision.committed else "aborted").inc()
    return bool(decision.committed)


async def merge(router: Caller, survivor: str, losers: list[str], request: Any,
                context: Any, expect: str | None = None) -> Any:
    """Run one cross-shard merge of `losers` into `survivor` that applies `request` (an
    UpsertRequest or LinkRequest for `survivor`, or a BatchUpsertRequest of one record for
    it, answered as an upsert); returns that request's response. With
    `expect`, the survivor's shard must be that "name:epoch" (a same-shard merge the request
    also makes was judged for it, memstore.hashslot.EXPECT_SHARD), or Absorb is refused."""
    txn = uuid.uuid4().hex
    held: list[tuple[str, bytes]] = []
    try:
        for loser in losers:
            try:
                answer = await router.control(loser, "Hold", cpb.HoldRequest(
                    txn=txn, loser=loser, survivor=survivor), context)
            except Forwarded:
                raise Restart(f"{loser!r} was merged elsewhere meanwhile") from None
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise Restart(f"{loser!r} is gone meanwhile") from None
                raise
            held.append((loser, answer.packed))
    except BaseException:
        # Absorb was never sent, so nothing can commit txn: let the losers go. (If this
        # fails too, a later Decide records the abort and releases them.)
        for loser, _ in held:
            try:
                await router.control(loser, "Release", cpb.ReleaseRequest(
                    txn=txn, loser=loser, committed=False), context)
            except Exception:  # noqa: BLE001 - the sweeper finishes it
                log.warning("merge %s: could not release %r; the sweeper will", txn, loser)
        raise
    crash_point("merge-after-hold")
    absorb = cpb.AbsorbRequest(txn=txn, losers=[packed for _, packed in held])
    if isinstance(request, pb.UpsertRequest):
        absorb.upsert.CopyFrom(request)
    elif isinstance(request, pb.BatchUpsertRequest):
        absorb.record.CopyFrom(request)
    else:
        absorb.link.CopyFrom(request)
    try:
        answer = await router.control(survivor, "Absorb", absorb, context, expect)
        response = answer.link if isinstance(request, pb.LinkRequest) else answer.upsert
        committed = True
    except BaseException as exc:
        # The outcome is unknown (the answer may be lost): the survivor's shard decides.
        try:
            committed = await _decide_all(router, txn, held, survivor, context)
        except Exception:  # noqa: BLE001 - leave it in doubt; the sweeper decides later
            log.warning("merge %s: outcome unknown after %s; the sweeper will decide", txn,
                        type(exc).__name__)
            raise exc from None
        if not committed:
            if is_aborted(exc):
                metrics.MERGES.labels("restarted").inc()
                raise Restart(f"merge {txn} was aborted by a racing caller") from None
            raise
        response = await _committed_response(router, survivor, losers, request, context)
        return response
    crash_point("merge-after-absorb")
    metrics.MERGES.labels("committed").inc()
    released = 0
    for loser, _ in held:
        try:
            answer = await router.control(loser, "Release", cpb.ReleaseRequest(
                txn=txn, loser=loser, committed=True), context)
            released += answer.durable
        except Exception:  # noqa: BLE001 - committed; whoever meets the hold finishes it
            log.warning("merge %s: committed, but releasing %r failed; it finishes when "
                        "next touched or swept", txn, loser)
    if released == len(held):
        # No hold of txn is left anywhere, and no restart can bring one back (each Release
        # answered durable: a shard under --sync everysec or off could come back holding it,
        # and would then need the decision), so nobody will ask for it again.
        try:
            await router.control(survivor, "Forget", cpb.ForgetRequest(txns=[txn]), context)
        except Exception:  # noqa: BLE001 - a decision kept is only a few bytes
            log.info("merge %s: could not forget its decision", txn)
    await _shorten_chains(router, survivor, held, context)
    return response


async def _shorten_chains(router: Caller, survivor: str, held: list[tuple[str, bytes]],
                          context: Any) -> None:
    """Ids merged into a loser earlier, from other shards, forward there to the loser; point
    them at the survivor, so a chain of merges costs a reader one hop, not one per merge.
    Best effort: a forward left pointing at the loser still resolves (the loser's own shard
    forwards it on), one hop longer."""
    for loser, packed in held:
        merged = msgpack.unpackb(packed, raw=False, strict_map_key=False)["profile"][4]
        for pid in merged:
            request = cpb.ForgetRequest(reforward=[cpb.Reforward(
                id=pid, to=survivor, **{"from": loser})])
            try:
                await router.control(pid, "Forget", request, context)
            except Exception as exc:  # noqa: BLE001 - the longer chain still resolves
                log.info("could not repoint the forward of %r from %r to %r: %s", pid, loser,
                         survivor, exc)


async def _decide_all(router: Caller, txn: str, held: list[tuple[str, bytes]],
                      survivor: str, context: Any) -> bool:
    committed = False
    for loser, _ in held:
        committed = await decide_and_release(router, txn, loser, survivor, context)
    return committed


async def _committed_response(router: Caller, survivor: str, losers: list[str],
                              request: Any, context: Any) -> Any:
    """The merge committed but its answer was lost: describe the survivor as it is now."""
    got = await router.profile(survivor, "Get", pb.GetRequest(
        key=pb.ProfileKey(id=survivor), attributes=["\x00"]), context)
    if not isinstance(request, pb.LinkRequest):  # (whether it created the profile: lost)
        return pb.UpsertResponse(id=got.profile.id, version=got.profile.version)
    return pb.LinkResponse(id=got.profile.id, version=got.profile.version, merged_ids=losers)


def is_aborted(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and "already aborted" in (exc.details() or "")
