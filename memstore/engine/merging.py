"""Each shard's part of a cross-shard merge (the protocol and its crash cases are in
shards/merge.py): hold the loser, absorb it into the survivor as the commit point, decide,
release it into forwards, and forget finished merges. Bound as Engine methods.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from pyroaring import BitMap

from memstore.engine.blob import decode, ident_key
from memstore.engine.change import Change, Note, UpsertSpec
from memstore.engine.identity import check_pid
from memstore.engine.planner import Draft, Planner
from memstore.engine.schema import Kind, Merge, registry_key
from memstore.errors import FailedPrecondition, InvalidArgument, NotFound, brief
from memstore.hashslot import slot_of

if TYPE_CHECKING:
    from memstore.engine.core import Engine


def decision_slot(decision: list[Any]) -> int:
    """The slot of a merge decision [survivor id, committed]: its survivor's, or the slot
    itself where the survivor was erased since (plan_erase keeps no id)."""
    survivor = decision[0]
    return survivor if isinstance(survivor, int) else slot_of(survivor)


def plan_hold(engine: Engine, loser: str, txn: str, survivor: str) -> Change:
    """Freeze `loser` for merge `txn`; the result is its portable export (see
    HoldResponse). Holding it again for the same transaction is a no-op."""
    check_pid(loser, "loser")
    check_pid(survivor, "survivor")
    engine.check_slot(loser)
    held = engine.held.get(loser)
    if held is not None and held[0] == txn:
        return Change(result=engine.export_profile(engine.dense_of[loser]))
    engine.check_moving(loser)
    dense = engine.dense_of.get(loser)
    if dense is None:
        raise NotFound(f"profile {brief(loser)} not found (merged or deleted meanwhile?)")
    return Change(notes=[Note("held", loser, [txn, survivor, time.time()])],
                  result=engine.export_profile(dense))


def export_profile(engine: Engine, dense: int) -> dict[str, Any]:
    """One profile with attribute names and kinds: attribute ids are shard-local."""
    version, attrs, idents, merged = decode(engine.blobs[dense])  # type: ignore[arg-type]
    by_id = engine.schema.by_id
    return {"schema": [[by_id[a].name, int(by_id[a].kind), by_id[a].indexed,
                        int(by_id[a].merge)] for a in attrs],
            "profile": [engine.pids[dense], version,
                        {by_id[a].name: v for a, v in attrs.items()}, idents, merged],
            "times": [engine.created_at(dense), engine.changed[dense]]}


def plan_absorb(engine: Engine, txn: str, losers: Sequence[dict[str, Any]],
                upsert: UpsertSpec | None = None,
                link: tuple[str, Sequence[tuple[str, str]], bool] | None = None) -> Change:
    """The commit point of merge `txn`: the held `losers` (export_profile maps from
    their shards) become drafts owning their identifiers, the caller's upsert or link
    merges them in, and the same change records `txn` as committed."""
    if txn in engine.decided:
        outcome = "committed" if engine.decided[txn][1] else "aborted"
        raise FailedPrecondition(f"merge {txn} was already {outcome}; not applied again")
    engine.require_declared(itertools.chain(
        ((name, Kind(kind), bool(indexed), Merge(merge))
         for exported in losers for name, kind, indexed, merge in exported["schema"]),
        engine._declares_ops([upsert] if upsert is not None else [])))
    planner = Planner(engine)
    seeded: list[tuple[Draft, list[int]]] = []
    for n, exported in enumerate(losers):
        pid, version, named, idents, merged = exported["profile"]
        attrs: dict[int, Any] = {}
        for name, kind, indexed, merge in exported["schema"]:
            try:
                spec = planner.declare(name, Kind(kind), indexed, Merge(merge))
            except InvalidArgument as exc:
                raise FailedPrecondition(f"losers[{n}]: profile {brief(pid)} cannot merge "
                                         f"here: {exc}") from None
            attrs[spec.id] = named[name]
        draft = Draft(pid, None, [version, attrs, [list(i) for i in idents], list(merged)])
        draft.created = (exported.get("times") or [0])[0] or None  # older shards: none
        seeded.append((draft, [ident_key(k, v) for k, v in idents]))
    owners_here: list[str] = []
    for draft, keys in seeded:
        for (kind, value), key in zip(draft.idents, keys, strict=True):
            # An identifier that a profile here holds too (two first links racing on two
            # shards): that profile joins the merge, so the identifier has one owner.
            owner = planner.owner_of(kind, value, key)
            if owner is not None and owner not in owners_here:
                owners_here.append(owner)
        planner.drafts[draft.pid] = draft
        for key in keys:
            planner.idents[key] = draft.pid
    if upsert is not None:
        result: Any = engine._plan_upsert(planner, upsert, "")
    elif link is not None:
        result = engine._plan_link(planner, *link)
    else:
        raise InvalidArgument("request: an upsert or a link is required")
    named = upsert.pid if upsert is not None else link[0]  # type: ignore[index]
    target = planner.drafts[planner.resolve_pid(named)]
    for owner in owners_here:
        other = planner.draft(owner, create=False)
        if other is not None and other is not target and not other.gone:
            planner.merge_into(target, other)
    for draft, _ in seeded:
        if not draft.gone:
            raise FailedPrecondition(f"merge {txn}: the request does not link any "
                                     f"identifier of {brief(draft.pid)}; nothing to merge")
    change = planner.finish(result)
    # Keyed by the id the coordinator named, which is where Decide will ask (its slot
    # carries the decision on a move), even when that id is an alias here.
    change.notes.append(Note("decided", txn, [named, True]))
    return change


def plan_decide(engine: Engine, txn: str, survivor: str) -> Change:
    """The outcome of merge `txn`: committed if absorbed here, else recorded as aborted
    so that a late Absorb is refused. The result is True for committed."""
    engine.check_slot(survivor)
    if txn in engine.decided:
        return Change(result=bool(engine.decided[txn][1]))
    return Change(notes=[Note("decided", txn, [survivor, False])], result=False)


def plan_release(engine: Engine, loser: str, txn: str, committed: bool) -> Change:
    """End the hold of merge `txn` on `loser`: committed, the loser goes and every id
    that resolved to it forwards to the survivor; aborted, it is visible again.
    The result is False when there was no such hold (released already)."""
    held = engine.held.get(loser)
    if held is None or held[0] != txn:
        return Change(result=False)
    notes = [Note("held", loser, None)]
    if not committed:
        return Change(notes=notes, result=True)
    survivor = held[1]
    planner = Planner(engine)
    dense = engine.dense_of[loser]
    d = Draft(loser, dense, decode(engine.blobs[dense]))  # type: ignore[arg-type]
    planner.drafts[loser] = d
    planner.delete(d)
    change = planner.finish(True)
    change.notes = notes + [Note("forwards", pid, survivor) for pid in [loser, *d.merged]]
    return change


def plan_forget(engine: Engine, pids: Iterable[str], txns: Iterable[str] = (),
                reforward: Iterable[tuple[str, str, str]] = ()) -> Change:
    """Erase the forwards of `pids` (ids of erased profiles: their own and those merged
    into them) and their ids in the decisions of merges (kept as the survivor's slot, as
    plan_erase keeps them), and the decisions of finished merges `txns` (every loser
    released); repoint each forward (id, from, to) that still goes to `from` (merged into
    `to` since) to `to`."""
    gone = set(pids)
    notes = [Note("forwards", pid, None) for pid in sorted(gone) if pid in engine.forwards]
    notes += [Note("decided", txn, [slot_of(v[0]), v[1]]) for txn, v in engine.decided.items()
              if v[0] in gone]
    notes += [Note("decided", txn, None) for txn in dict.fromkeys(txns)
              if txn in engine.decided]
    for pid, old, new in reforward:
        check_pid(pid, "reforward.id")
        check_pid(new, "reforward.to")
        if engine.forwards.get(pid) == old and pid not in engine.dense_of and pid != new:
            notes.append(Note("forwards", pid, new))
    return Change(notes=notes, result=0)


def separated(engine: Engine, slots: BitMap) -> dict[str, str]:
    """Forwards this shard keeps when it gives `slots` away: each id merged into a profile
    in `slots` whose own slot stays here, to that profile (which leaves with the slots;
    its merged ids' look-ups still come here)."""
    owned = engine.owned_slots
    return {m: s for m, s in engine.aliases.items()
            if slot_of(s) in slots and slot_of(m) not in slots
            and (owned is None or slot_of(m) in owned)}


def notes_in_slots(engine: Engine, slots: BitMap) -> dict[str, dict[str, Any]]:
    """The forwards, decisions, claims and registered attributes of `slots` (a slot move
    carries them along). The forwards include the ids merged into a profile on this shard
    whose slots are in `slots` while the profile's is not: the move separates them, and
    the ids' new owner forwards them to it, as a cross-shard merge's loser's shard does
    (`separated` is the other half)."""
    forwards = {p: s for p, s in engine.forwards.items() if slot_of(p) in slots}
    forwards.update((m, s) for m, s in engine.aliases.items()
                    if m not in forwards and slot_of(m) in slots and slot_of(s) not in slots)
    return {"forwards": forwards,
            "decided": {t: v for t, v in engine.decided.items() if decision_slot(v) in slots},
            "claims": engine.claims.in_slots(slots),
            "registry": {n: v for n, v in engine.registry.items()
                         if slot_of(registry_key(n)) in slots},
            "suppressed": {h: v for h, v in engine.suppressed.items() if v[0] in slots}}
