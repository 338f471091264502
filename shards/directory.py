"""The identifier directory, as a router uses it: who holds identifier (kind, value)?

Partitioned like the profiles: the claim of an identifier lives in slot_of("kind:value") on
the shard that owns that slot (memstore.index.claims), so a look-up asks two shards, the claim's
and then the profile's, whatever the cluster's size, and a shard that is down only takes its
own claims and profiles away.

Invariant: every identifier a profile holds is claimed, by that profile or by an id that
resolves to it (merged into it, on its shard or by a forward). Writes keep it by claiming
first: a write naming identifiers claims each for its profile, and only then writes. A
claim does not prove ownership (its write may have failed, its profile been deleted or
merged away), so whoever reads one verifies it against the profile it names:

- Look-up:  read the claim, get the claimed profile (following merged-away ids); a profile
            that holds the identifier is the answer, anything else is "not found".
- Write:    a claim for another profile P that holds the identifier means a merge: with P
            when P lives on another shard (shards/merge.py), by the owning shard's engine
            when on the same. A claim whose profile does not hold the identifier is a write
            in flight while young (waited out) and stale once older than the grace period
            (taken over, compare-and-set, so two writers cannot both take it).
- Refusal:  a write the shard refused gives back the claims it made (compare-and-set),
            then claims again any its profile holds all the same (another write of the same
            id counted on the claim). A write whose outcome is unknown (deadline, shard
            down) keeps them: a stale claim is only ever slower, a missing one would hide a
            profile. Giving back is best effort and never fails the caller's call.
- Delete:   releases the deleted profile's claims (an erased person's identifiers leave the
            directory too), with the same check afterwards. Claims of ids merged into
            another profile stay as they are: look-ups follow the merged-away id.
- Suppression: an identifier erased with suppression (DeleteRequest.suppress) has a salted
            hash on the suppression list of its claim's shard, which answers a claim of it
            `suppressed` and never makes it: the write is refused (Suppressed).

Because every write claims before it writes, two first links of a new identifier racing
through two routers to two shards meet at the claim: the second waits for the first's write
and merges with its profile. The one window left is a write slower than the grace period
between its claim and its apply, whose claim another writer may then take over.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol

import grpc
import msgpack

from memstore.index.claims import CLAIM_GRACE, claim_key
from memstore.server import metrics
from memstore.v1 import cluster_pb2 as cpb
from memstore.v1 import memstore_pb2 as pb
from shards.backoff import pause
from shards.shard_map import ShardMap
from shards.slots import slot_of

log = logging.getLogger("memstore.directory")

Ident = tuple[str, str]
# How long a write waits for a young claim of another write before giving up.
CLAIM_WAIT = 2 * CLAIM_GRACE
BEST_EFFORT = 1.0  # seconds for giving claims back after a refused write or a delete


class Answer(NamedTuple):
    """A shard's answer to one claim entry (ClaimResponse)."""

    holder: str | None
    age: float
    created: bool
    blocked: bool = False  # a blocked value (merge protection): never claimed
    suppressed: bool = False  # erased with suppression: never claimed, the write refused


class Router(Protocol):
    map: ShardMap

    async def routed(self, items: list[tuple[str, Any]], method: str, build: Any,
                     context: Any, retarget: Any = None, control: bool = False
                     ) -> list[tuple[list[Any], Any]]: ...


class ClaimStuck(Exception):
    """A write waited longer than CLAIM_WAIT for another write's young claim."""


class Suppressed(Exception):
    """A write names an identifier erased with suppression (FAILED_PRECONDITION)."""

    def __init__(self, ident: Ident) -> None:
        super().__init__(f"identifier {ident[0]}:{ident[1]!r} was erased with suppression "
                         "(the blocked list of erased people); refused")
        self.ident = ident


class Directory:
    def __init__(self, router: Router, grace: float = CLAIM_GRACE) -> None:
        self.router = router
        self.grace = grace

    async def ask(self, entries: Sequence[list[Any]], context: Any,
                  positions: dict[str, int] | None = None) -> list[Answer]:
        """Claim entries ([kind, value, pid, expected], see ClaimRequest) to the shards
        owning their slots, one request per shard, concurrently; answers in order. Each
        shard's log position after its part goes in `positions` (by shard name)."""
        if not entries:
            return []
        items = [(claim_key(e[0], e[1]), i) for i, e in enumerate(entries)]

        def build(group: list[int]) -> cpb.ClaimRequest:
            return cpb.ClaimRequest(packed=msgpack.packb([entries[i] for i in group]))

        answers: list[Answer] = [Answer(None, 0.0, False)] * len(entries)
        for group, response in await self.router.routed(items, "Claim", build, context,
                                                        control=True):
            for i, answer in zip(group, msgpack.unpackb(response.packed), strict=True):
                answers[i] = Answer(*answer)
            if positions is not None and response.shard:
                positions[response.shard] = max(positions.get(response.shard, 0),
                                                response.log_position)
        return answers

    async def profiles(self, pids: Iterable[str], context: Any,
                       attributes: Sequence[str] = ("\x00",)) -> dict[str, pb.Profile]:
        """The profile each of `pids` resolves to (merged-away ids followed), if any."""
        asked = list(dict.fromkeys(pids))
        if not asked:
            return {}

        def build(pairs: list[tuple[str, str]]) -> pb.BatchGetRequest:
            return pb.BatchGetRequest(ids=[p for p, _ in pairs], attributes=attributes)

        found: dict[str, pb.Profile] = {}
        parts = await self.router.routed([(p, (p, p)) for p in asked], "BatchGet", build,
                                         context, lambda pair, survivor: (survivor, pair[1]))
        for pairs, response in parts:
            for (_, pid), result in zip(pairs, response.results, strict=True):
                if result.found:
                    found[pid] = result.profile
        return found

    # ------------------------------------------------------------------ look-ups
    async def find(self, idents: Sequence[Ident], context: Any,
                   attributes: Sequence[str] = ()) -> list[pb.Profile | None]:
        """The profile holding each identifier, if any (projected to `attributes`)."""
        claims = await self.ask([[k, v, None, None] for k, v in idents], context)
        holders = await self.profiles((a.holder for a in claims if a.holder is not None),
                                      context, attributes)
        found: list[pb.Profile | None] = []
        for ident, claim in zip(idents, claims, strict=True):
            profile = None if claim.holder is None else holders.get(claim.holder)
            found.append(profile if profile is not None and holds(profile, ident) else None)
        return found

    # ------------------------------------------------------------------ writes
    async def claim(self, pairs: Sequence[tuple[str, Ident]], context: Any,
                    made: set[tuple[str, Ident]], local: dict[str, str] | None = None
                    ) -> dict[Ident, str]:
        """Claim each identifier for its primary id before a write gives it to that profile.

        Returns the identifiers held by a profile on another shard than the one they are
        claimed for, mapped to that profile's id: the write must merge it first. Claims
        this call made are added to `made` (for `release` if the write is refused). A pid
        with an identifier held by another profile on its own shard (the shard's engine
        merges them) goes in `local`, with "name:epoch" of that shard as the map had it
        when first judged ("" when the map knew no owner): the write must run there, at
        that epoch (memstore.hashslot.EXPECT_SHARD), or be judged again."""
        router = self.router
        foreign: dict[Ident, str] = {}
        pending = list(dict.fromkeys(pairs))
        started = time.monotonic()
        give_up = started + CLAIM_WAIT
        waited = False  # for young claims of other writes (metrics.CLAIM_WAITS)
        for attempt in itertools.count():
            answers = await self.ask([[k, v, pid, None] for pid, (k, v) in pending], context)
            contested: list[tuple[str, Ident, Answer]] = []
            for (pid, ident), answer in zip(pending, answers, strict=True):
                if answer.suppressed:
                    raise Suppressed(ident)
                if answer.created:
                    made.add((pid, ident))
                if answer.holder != pid and not answer.blocked:  # blocked: the write is
                    contested.append((pid, ident, answer))  # refused by its own shard
            # The claims' holders and the writes' own ids, each followed through every
            # merged-away id to the profile it stands for now: a claim this write's id made
            # before a merge (or under an alias) names the same profile, never another write.
            holders = await self.profiles(itertools.chain(
                (a.holder for _, _, a in contested if a.holder is not None),
                (pid for pid, _, _ in contested)), context)
            pending, steal, young = [], [], None
            for pid, ident, answer in contested:
                profile = None if answer.holder is None else holders.get(answer.holder)
                mine = holders.get(pid)
                ours = profile is not None and (profile.id == pid or (
                    mine is not None and profile.id == mine.id))
                if profile is not None and holds(profile, ident):
                    home = router.map.owner(slot_of(pid))
                    if ours:
                        pass
                    elif home is not None and router.map.owner(slot_of(profile.id)) is not home:
                        foreign[ident] = profile.id
                    elif local is not None:  # the engine merges them, or (no home) unjudged
                        # The first judgement stands: a later round may see a newer epoch of
                        # the same shard, which this one's merge never was judged against.
                        local.setdefault(pid, "" if home is None else f"{home.name}:{home.epoch}")
                elif answer.holder is None or ours or answer.age >= self.grace:
                    # released meanwhile, this write's own (through merges), or stale:
                    # take it over
                    steal.append((pid, ident, answer.holder))
                else:
                    young = (ident, answer)
                    pending.append((pid, ident))
            taken = await self.ask([[k, v, pid, holder] for pid, (k, v), holder in steal],
                                   context)
            for (pid, ident, _), answer in zip(steal, taken, strict=True):
                if answer.created:
                    made.add((pid, ident))
                if answer.holder != pid:  # another writer took it first: look again
                    pending.append((pid, ident))
            if not pending:
                if waited:
                    metrics.CLAIM_WAIT_SECONDS.observe(time.monotonic() - started)
                return foreign
            if young is not None and not waited:
                waited = True
                metrics.CLAIM_WAITS.inc()
            if young is not None and time.monotonic() > give_up:
                metrics.CLAIM_WAIT_SECONDS.observe(time.monotonic() - started)
                (kind, value), answer = young
                raise ClaimStuck(f"identifier {kind}:{value!r} is claimed by a write of "
                                 f"{answer.holder!r} that has not finished "
                                 f"({answer.age:.1f} s ago); try again")
            await _sleep(attempt, context)
        raise AssertionError("unreachable")

    async def rebuild(self, context: Any) -> dict[str, int]:
        """Claim every identifier the shards' profiles hold that has no claim yet: data
        written before the directory existed, or straight to a shard. Safe to run at any
        time, while serving. Identifiers held by two profiles on two shards are counted in
        `held_twice` and left as they are (logged; a Link of one to the profile that does
        not hold its claim merges the two)."""
        await self.router.map.refresh()
        totals = {"profiles": 0, "identifiers": 0, "claimed": 0, "held_twice": 0}
        for shard in self.router.map.ordered():
            if not shard.slots:
                continue
            request = cpb.ExportRequest(slots=[cpb.SlotRange(start=a, end=b)
                                               for a, b in shard.slots], identifiers=True)
            async for chunk in shard.control.ExportSlots(request):
                profiles = msgpack.unpackb(chunk.packed)["profiles"]
                pairs = [(pid, (k, v)) for pid, idents in profiles for k, v in idents]
                made: set[tuple[str, Ident]] = set()
                twice = await self.claim(pairs, context, made)
                for (kind, value), holder in twice.items():
                    log.warning("identifier %s:%r is held by two profiles: %r (its claim) "
                                "and one on %s", kind, value, holder, shard.label)
                totals["profiles"] += len(profiles)
                totals["identifiers"] += len(pairs)
                totals["claimed"] += len(made)
                totals["held_twice"] += len(twice)
        return totals

    async def release(self, made: Iterable[tuple[str, Ident]], context: Any) -> None:
        """Give back claims a refused write made (only those still its own). Best effort:
        never fails the caller's call."""
        pairs = list(made)
        quiet = _Quiet(context)
        try:
            await self.ask([[k, v, None, pid] for pid, (k, v) in pairs], quiet)
            await self._reclaim(pairs, quiet)
        except Exception as exc:  # noqa: BLE001 - a stale claim is taken over later
            log.info("could not release %d claims of a refused write: %s", len(pairs), exc)

    async def _reclaim(self, pairs: Sequence[tuple[str, Ident]], context: Any) -> None:
        """Claim again, after a release, what a profile holds all the same: another write
        of the same primary id may have counted on the claim (it was already that id's)
        and succeeded, or a deleted id may have been written again meanwhile."""
        holders = await self.profiles((pid for pid, _ in pairs), context)
        again = [[*ident, holders[pid].id, None] for pid, ident in pairs
                 if pid in holders and holds(holders[pid], ident)]
        if again:
            await self.ask(again, context)

    async def forget(self, erased: Sequence[Any], context: Any) -> dict[str, int]:
        """Release the claims of erased profiles' identifiers (each with `id`,
        `merged_ids` and `identifiers`, as DeleteResponse and ErasedProfile have them).
        Returns the log position of each shard that released some, by name."""
        idents = [(i.kind, i.value) for p in erased for i in p.identifiers]
        positions: dict[str, int] = {}
        if not idents:
            return positions
        ids = {pid for p in erased for pid in (p.id, *p.merged_ids)}
        quiet = _Quiet(context)
        try:
            claims = await self.ask([[k, v, None, None] for k, v in idents], quiet)
            released = [(c.holder, ident) for ident, c in zip(idents, claims, strict=True)
                        if c.holder in ids]
            await self.ask([[k, v, None, holder] for holder, (k, v) in released], quiet,
                           positions)
            await self._reclaim(released, quiet)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - the stale claims are taken over later
            log.warning("erasure of %d profiles: claims of %d identifiers stay: %s",
                        len(erased), len(idents), exc)
        return positions


class _Quiet:
    """A context for best-effort directory calls made for a caller: at most BEST_EFFORT
    seconds and half the caller's remaining time, and a failure raises here instead of
    ending the caller's call with its status."""

    def __init__(self, context: Any) -> None:
        remaining = context.time_remaining()
        budget = BEST_EFFORT if remaining is None else min(BEST_EFFORT, remaining / 2)
        self.until = time.monotonic() + budget

    def time_remaining(self) -> float:
        return max(0.0, self.until - time.monotonic())

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"{code.name}: {details}")


def holds(profile: pb.Profile, ident: Ident) -> bool:
    return any(i.kind == ident[0] and i.value == ident[1] for i in profile.identifiers)


async def _sleep(attempt: int, context: Any) -> None:
    await pause(attempt, context, "waiting for another write naming the same identifier")
