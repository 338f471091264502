"""The general write planner: drafts of the profiles a request changes, and identity
resolution between them.

A Planner reads the engine's state plus its own drafts and never mutates the engine:
operations change a draft's attributes, links move identifiers to it and merge their
owners into it (the merge rules are in docs/user-guide.md), and `finish` turns the drafts
into one Change of after-images. Every plan_* call that is not a bulk load or a batch of
tracks goes through here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from memstore.engine import days
from memstore.engine.blob import decode, encode, ident_key
from memstore.engine.change import (
    ADD_TO_SET,
    INCREMENT,
    OP_NAMES,
    REMOVE_FROM_SET,
    SET,
    SET_ONCE,
    UNSET,
    Change,
    Image,
)
from memstore.engine.identity import check_identifier, id_key
from memstore.engine.schema import (
    INT64_MAX,
    INT64_MIN,
    MAX_STRING_BYTES,
    AttributeSpec,
    Kind,
    Merge,
    article,
    check_value,
    kind_of,
)
from memstore.engine.values import to_stored
from memstore.errors import FailedPrecondition, InvalidArgument, Undeclared, brief
from memstore.index.claims import claim_key

if TYPE_CHECKING:
    from memstore.engine.core import Engine


class Draft:
    """A profile being changed by a plan."""

    __slots__ = ("attrs", "created", "dense", "gone", "idents", "merged", "pid", "version")

    def __init__(self, pid: str, dense: int | None, state: list[Any] | None) -> None:
        self.pid = pid
        self.dense = dense
        self.gone = False
        self.created: int | None = None  # set where the default rule does not hold (Change)
        if state is None:
            self.version, self.attrs, self.idents, self.merged = 0, {}, [], []
        else:
            self.version, self.attrs, self.idents, self.merged = state


class Planner:
    """Reads engine state plus this plan's own drafts; never mutates the engine."""

    def __init__(self, engine: Engine) -> None:
        self.e = engine
        self.added: list[AttributeSpec] = []
        self.added_by_name: dict[str, AttributeSpec] = {}
        # A router's write (Engine.cluster_schema) may not declare attributes by its values
        # here: the plan methods refuse it up front naming every attribute it would declare
        # (Engine.require_declared); one the pre-scan missed is refused here, alone.
        self.strict = engine.cluster_schema
        self.drafts: dict[str, Draft] = {}  # by the profile's own primary id
        # The dense id resolve_pid found for an id last, for draft to take (one PidTable
        # look-up a profile, where a dict's were cheap enough to ask twice).
        self._found: tuple[str, int] | None = None
        self.at = int(engine.clock())  # when this change is made
        self.aliases: dict[str, str | None] = {}  # overlay on engine.aliases
        self.idents: dict[int, str | None] = {}  # overlay: identifier key -> owner pid

    # -- schema
    def spec(self, name: str) -> AttributeSpec | None:
        return self.e.schema.by_name.get(name) or self.added_by_name.get(name)

    def spec_by_id(self, aid: int) -> AttributeSpec:
        base = len(self.e.schema.by_id)
        return self.e.schema.by_id[aid] if aid < base else self.added[aid - base]

    def declare(self, name: str, kind: Kind, indexed: bool = True,
                merge: Merge = Merge.DEFAULT, explicit: bool = False) -> AttributeSpec:
        """The spec of `name`, declaring it with `kind` if it has none yet (`explicit`: a
        DeclareAttributes call, which declares even a router's write would not)."""
        existing = self.spec(name)
        if existing is not None:
            if existing.kind != kind:
                raise InvalidArgument(f"attribute {name!r} has kind {existing.kind.label}, "
                                      f"got {article(kind.label)} value")
            return existing
        spec = self.e.schema.plan(name, kind, indexed, merge,
                                  next_id=len(self.e.schema.by_id) + len(self.added))
        assert spec is not None  # not declared yet, so the plan is a new spec
        if self.strict and not explicit:
            raise Undeclared([[name, int(kind), indexed, int(merge)]])
        self.added.append(spec)
        self.added_by_name[name] = spec
        return spec

    # -- profiles
    def resolve_pid(self, pid: str) -> str:
        """The primary id `pid` stands for now: itself, or the survivor it merged into."""
        if pid in self.aliases:
            return self.aliases[pid] or pid
        if pid in self.drafts:
            return pid
        dense = self.e.pids.dense_of(pid)
        if dense is not None:
            self._found = (pid, dense)
            return pid
        return self.e.aliases.get(pid, pid)

    def draft(self, pid: str, create: bool) -> Draft | None:
        pid = self.resolve_pid(pid)
        if pid not in self.drafts:
            self.e.check_moving(pid)
        found = self.drafts.get(pid)
        if found is not None:
            if found.gone:
                if not create:
                    return None
                found = Draft(pid, found.dense, None)
                found.version = 0
                found.created = self.at  # made again: its dense id held the one removed
                self.drafts[pid] = found
            return found
        hit, self._found = self._found, None
        dense = hit[1] if hit is not None and hit[0] == pid else self.e.pids.dense_of(pid)
        if dense is None:
            if not create:
                return None
            self.e.check_slot(pid)
            if self.e.suppressed:
                self.e.check_suppressed(id_key(pid), f"profile id {pid!r}")
            draft = Draft(pid, None, None)
        else:
            self.e.check_slot(pid)
            draft = Draft(pid, dense, decode(self.e.blobs[dense]))  # type: ignore[arg-type]
        self.drafts[pid] = draft
        return draft

    def owner_of(self, kind: str, value: str, key: int) -> str | None:
        if key in self.idents:
            return self.idents[key]
        dense = self.e.owner_dense(kind, value)
        return None if dense is None else self.e.pids[dense]

    # -- operations
    def apply_op(self, d: Draft, op: int, name: str, value: Any, where: str) -> None:
        if op == UNSET:
            spec = self.spec(name)
            if spec is not None:
                d.attrs.pop(spec.id, None)
            return
        if op == ADD_TO_SET or op == REMOVE_FROM_SET:
            if isinstance(value, str):
                value = [value]
            spec = self.spec(name) or self.declare(name, Kind.STRING_LIST)
            if spec.kind is not Kind.STRING_LIST:
                raise InvalidArgument(
                    f"{where}: {OP_NAMES[op]} needs a string_list attribute; "
                    f"{name!r} has kind {spec.kind.label}"
                )
            check_value(Kind.STRING_LIST, value, name)
            current = set(d.attrs.get(spec.id, ()))
            current = current | set(value) if op == ADD_TO_SET else current - set(value)
            if current:
                d.attrs[spec.id] = sorted(current)
            else:
                d.attrs.pop(spec.id, None)
            return
        if op == INCREMENT:
            kind = kind_of(value)
            if kind not in (Kind.INT, Kind.FLOAT):
                raise InvalidArgument(f"{where}: increment of {name!r} needs a number")
            spec = self.spec(name) or self.declare(name, kind)
            if spec.kind is Kind.FLOAT and kind is Kind.INT:
                value = float(value)  # one number type, as in JSON
            check_value(spec.kind, value, name)
            total = d.attrs.get(spec.id, 0) + value
            if spec.kind is Kind.INT and not INT64_MIN <= total <= INT64_MAX:
                raise InvalidArgument(f"{where}: increment overflows int64 for {name!r}")
            d.attrs[spec.id] = total
            return
        if op == SET or op == SET_ONCE:
            spec = self.spec(name)
            if spec is None:
                spec = self.declare(name, kind_of(value))
            # Fast path for the common scalar kinds; check_value covers the rest.
            vtype = type(value)
            if vtype is int and spec.kind is Kind.FLOAT:
                value, vtype = float(value), float  # one number type, as in JSON
            if vtype is str and spec.kind is Kind.STRING and len(value) <= MAX_STRING_BYTES // 4:
                stored: Any = value
            else:
                check_value(spec.kind, value, name)
                stored = to_stored(spec.kind, value)
            if op == SET_ONCE and spec.id in d.attrs:
                return
            if spec.kind is Kind.STRING_LIST and not stored:
                d.attrs.pop(spec.id, None)
            else:
                d.attrs[spec.id] = stored
            return
        raise InvalidArgument(f"{where}: unknown operation {op}")

    def link(self, d: Draft, identifiers: Sequence[tuple[str, str]], where: str) -> list[str]:
        """Link identifiers to `d`, merging their owners into it; returns merged-away ids."""
        rules = self.e.rules
        merged: list[str] = []
        for i, (kind, value) in enumerate(identifiers):
            at = f"{where}[{i}]"
            check_identifier(kind, value, at)
            if rules.is_blocked(value):
                raise FailedPrecondition(
                    f"{at}: identifier value {brief(value)} is on the blocked list "
                    "(merge protection); nothing changed"
                )
            if self.e.suppressed:
                self.e.check_suppressed(claim_key(kind, value),
                                        f"{at}: identifier {kind}:{value!r}")
            key = ident_key(kind, value)
            owner = self.owner_of(kind, value, key)
            if owner is not None and owner != d.pid:
                other = self.draft(owner, create=False)
                if other is not None and other is not d:
                    self.merge_into(d, other)
                    merged.append(other.pid)
            if [kind, value] not in d.idents:
                d.idents.append([kind, value])
            self.idents[key] = d.pid
        counts = Counter(kind for kind, _ in d.idents)
        for kind, n in counts.items():
            if n > rules.max_per_kind:
                raise FailedPrecondition(
                    f"{where}: profile {brief(d.pid)} would hold {n} identifiers of kind "
                    f"{brief(kind)}, more than the limit of {rules.max_per_kind} (merge "
                    "protection); nothing changed"
                )
        return merged

    def merge_into(self, survivor: Draft, other: Draft) -> None:
        """Merge rules: see docs/user-guide.md "Identities"."""
        for aid, value in other.attrs.items():
            spec = self.spec_by_id(aid)
            mine = survivor.attrs.get(aid)
            if mine is None:
                survivor.attrs[aid] = value
            elif spec.kind is Kind.EVENT_DAYS:  # counts of a day add
                survivor.attrs[aid] = days.merge(mine, value)
            elif spec.kind is Kind.STRING_LIST:
                survivor.attrs[aid] = sorted(set(mine) | set(value))
            elif spec.merge is Merge.SUM:
                total = mine + value
                if spec.kind is Kind.INT:
                    total = max(INT64_MIN, min(INT64_MAX, total))
                survivor.attrs[aid] = total
            elif spec.merge is Merge.MIN:
                survivor.attrs[aid] = min(mine, value)
            elif spec.merge is Merge.MAX:
                survivor.attrs[aid] = max(mine, value)
        for pair in other.idents:
            if pair not in survivor.idents:
                survivor.idents.append(pair)
            self.idents[ident_key(*pair)] = survivor.pid
        for pid in [other.pid, *other.merged]:
            if pid not in survivor.merged and pid != survivor.pid:
                survivor.merged.append(pid)
            self.aliases[pid] = survivor.pid
        # The survivor's version after a call that merged exceeds every version any merged
        # profile had: the call already counted one change on the survivor (its +1 comes
        # before its links), so this is max(survivor, other) + 1 over the whole call.
        survivor.version = max(survivor.version, other.version + 1)
        # The person is as old as the oldest profile merged into it (0: not known).
        known = [t for t in (self.created_of(survivor), self.created_of(other)) if t]
        if known:
            survivor.created = min(known)
        other.gone = True

    def created_of(self, d: Draft) -> int:
        """When `d`'s profile was created (0: not known); a new one: now."""
        if d.created is not None:
            return d.created
        return self.at if d.dense is None else self.e.created_at(d.dense)

    def delete(self, d: Draft) -> None:
        for pair in d.idents:
            self.idents[ident_key(*pair)] = None
        for pid in d.merged:
            self.aliases[pid] = None
        d.gone = True

    def finish(self, result: Any = None) -> Change:
        change = Change(schema=list(self.added), result=result, at=self.at)
        next_dense = len(self.e.blobs)
        live: list[Image] = []
        for d in self.drafts.values():
            if d.gone:
                if d.dense is not None:
                    change.images.append(Image(d.dense, d.pid, None))
                continue
            if d.dense is None:
                d.dense = next_dense
                next_dense += 1
            if d.created is not None:
                change.times[d.dense] = (d.created, self.at)
            live.append(Image(d.dense, d.pid, encode(d.version, d.attrs, d.idents, d.merged)))
        # Deletions first: a merged-away profile must leave the directory before the
        # survivor claims its identifiers.
        change.images.extend(live)
        return change

