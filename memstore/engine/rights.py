"""Data rights in the engine: erasure by id, identifier or dense ids, the suppression list
of erased people (salted hashes only), and finding anonymous profiles past their retention.
Bound as Engine methods; memstore.server.rights turns them into RPC answers and receipts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from memstore.engine.blob import decode
from memstore.engine.change import Change, Note
from memstore.engine.columnar import Columns
from memstore.engine.identity import check_identifier, check_pid, id_key
from memstore.engine.planner import Planner
from memstore.errors import FailedPrecondition, InvalidArgument
from memstore.hashslot import slot_of
from memstore.index.claims import claim_key

if TYPE_CHECKING:
    from memstore.engine.core import Engine


def plan_delete(engine: Engine, pid: str | None = None, identifier: tuple[str, str] | None = None,
                suppress: bool = False) -> Change:
    """Erase the profile of `pid` or `identifier`; the result is its primary id (None:
    there is none). See plan_erase."""
    dense = engine.lookup(pid, identifier)
    if dense is None:
        return Change(result=None)
    change = engine.plan_erase([dense], suppress)
    change.result = engine.pids[dense]
    return change


def plan_erase(engine: Engine, dense_ids: Iterable[int], suppress: bool = False) -> Change:
    """Erase the profiles `dense_ids` (live, owned, not held by a merge; others are
    skipped): attributes, identifiers, the ids merged into them, the forwards of those
    ids kept here, and the survivor's id in the decisions of merges into them (kept as
    its slot). With `suppress`, the salted hashes of their ids and identifiers whose
    slots this shard owns go on the suppression list (the router sends the rest to
    the shards owning theirs: Suppress). The result is [(id, merged ids, identifiers)]
    of the profiles erased."""
    planner = Planner(engine)
    erased: list[tuple[str, list[str], list[list[str]]]] = []
    for dense in dense_ids:
        owner = engine.pids[dense]
        if (owner is None or engine.blobs[dense] is None or dense in engine.foreign
                or owner in engine.held or owner in planner.drafts):
            continue
        d = planner.draft(owner, create=False)
        assert d is not None
        erased.append((owner, list(d.merged), [list(i) for i in d.idents]))
        planner.delete(d)
    change = planner.finish(erased)
    change.erasure = bool(erased)
    gone = {pid for pid, merged, _ in erased for pid in (pid, *merged)}
    # Ids merged into them from another shard may have left forwards here too (a chain
    # that came back to this shard): they go with them, as their aliases do.
    change.notes = [Note("forwards", m, None) for m in sorted(gone) if m in engine.forwards]
    change.notes += [Note("decided", txn, [slot_of(v[0]), v[1]])
                     for txn, v in engine.decided.items() if v[0] in gone]
    if suppress:
        keys = [id_key(p) for p in sorted(gone)]
        keys += [claim_key(k, v) for _, _, idents in erased for k, v in idents]
        change.notes += engine.suppression_notes(keys, owned_only=True)
    return change


def hashed(engine: Engine, text: str) -> str:
    """The salted hash of an id or an identifier's claim key: what suppression and
    audit lines keep instead of the text (keyed BLAKE2b, 128 bits, hex)."""
    return hashlib.blake2b(text.encode(), key=engine.salt[:64],
                           digest_size=16).hexdigest()


def check_suppressed(engine: Engine, key: str, what: str) -> None:
    if engine.hashed(key) in engine.suppressed:
        raise FailedPrecondition(f"{what} was erased with suppression (the blocked list "
                                 "of erased people); refused")


def suppression_notes(engine: Engine, keys: Iterable[str], owned_only: bool = False) -> list[Note]:
    """Notes putting `keys` (id_key or claim_key texts) on the suppression list; those
    in slots this shard does not own are skipped (`owned_only`) or refused (WrongSlot)."""
    notes: list[Note] = []
    now = int(engine.clock())
    for key in dict.fromkeys(keys):
        slot = slot_of(key.removeprefix("\x00"))
        if engine.owned_slots is not None and slot not in engine.owned_slots:
            if owned_only:
                continue
            raise engine._wrong_slot(slot, "a suppression entry")
        hashed = engine.hashed(key)
        if hashed not in engine.suppressed:
            notes.append(Note("suppressed", hashed, [slot, now]))
    return notes


def plan_suppress(engine: Engine, identifiers: Sequence[Any], pids: Sequence[str]) -> Change:
    """Put identifiers ([kind, value]) and primary ids on the suppression list (their
    slots must be owned here). The result is how many were new."""
    for i, pair in enumerate(identifiers):
        if not (isinstance(pair, list | tuple) and len(pair) == 2
                and all(isinstance(x, str) for x in pair)):
            raise InvalidArgument(f"identifiers[{i}]: not a [kind, value] pair")
        check_identifier(pair[0], pair[1], f"identifiers[{i}]")
    for i, pid in enumerate(pids):
        check_pid(pid, f"ids[{i}]")
    notes = engine.suppression_notes([claim_key(k, v) for k, v in identifiers]
                                   + [id_key(p) for p in pids])
    return Change(notes=notes, result=len(notes))


def names_suppressed(engine: Engine, batch: Columns) -> bool:
    """True when a load's batch names a suppressed id or identifier."""
    hashed, suppressed = engine.hashed, engine.suppressed
    return (any(hashed(id_key(pid)) in suppressed for pid in batch.ids)
            or any(hashed(claim_key(k, v)) in suppressed
                   for idents in batch.identifiers for k, v in idents))


def expired(engine: Engine, cutoff: int, kinds: Sequence[str], start: int, limit: int,
            budget: int = 2000, span: int = 1 << 16) -> tuple[list[int], int | None]:
    """Anonymous profiles unchanged since `cutoff` (unix seconds): live, owned, not held,
    holding at least one identifier and only identifiers of `kinds`. Looks at dense ids
    from `start`, at most `span` of them and `budget` profile decodes (a caller between
    requests: a few milliseconds), and returns at most `limit` of them with where to go
    on (None: the end). A profile whose changed time is not known (written before
    memstore kept it) counts as changed when this process started."""
    end = min(len(engine.blobs), start + span)
    if start >= end:
        return [], None
    changed = np.frombuffer(engine.changed, dtype=np.uint32)[start:end]
    stamps = np.where(changed == 0, np.uint32(engine.started), changed)
    picked = (np.flatnonzero(stamps < cutoff) + start).tolist()
    del changed, stamps  # no view of the array may outlive this call (it grows)
    found: list[int] = []
    allowed = set(kinds)
    hidden = engine.foreign | engine.held_dense
    blobs = engine.blobs
    for n, dense in enumerate(picked):
        if len(found) >= limit or n >= budget:
            return found, dense
        blob = blobs[dense]
        if blob is None or dense in hidden:
            continue
        idents = decode(blob)[2]
        if idents and all(kind in allowed for kind, _ in idents):
            found.append(dense)
    return found, (end if end < len(engine.blobs) else None)
