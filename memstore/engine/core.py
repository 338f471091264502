"""The engine of one shard: profiles in memory, their indexes, and identity resolution.

Its one job: turn requests into Changes and apply Changes. A Change is a list of
after-images — (dense id, primary id, encoded profile blob or None for "gone") — plus the
attribute declarations it needs. Every other structure (indexes, identifier directory,
merged-id aliases, slot membership) is derived from the blobs, so:

- applying a Change is idempotent and replaying logged Changes rebuilds exactly the state
  callers were told about;
- undoing a Change is applying the before-images it returns (used when the log cannot
  make a Change durable).

Planning (`plan_*`) reads state and never mutates it; `apply` mutates and never fails on
input. The shard runs plan, log append and apply with no await in between, so one
request's operations are atomic with respect to every other request.

Cross-shard merges add three small tables, changed by Notes in the same Changes and logged
with them (shards/merge.py has the protocol): `held` (profiles frozen by an unfinished merge,
hidden from queries), `forwards` (primary ids merged into a profile on another shard) and
`decided` (merge transactions this shard committed or refused, as the commit point). The
cluster's identifier directory is a fourth, `claims` (memstore.index.claims), and the
suppression list of erased identifiers and ids a fifth, `suppressed` (salted hashes).

Each profile also has a created and a last-changed time (unix seconds, 0: unknown, from
before memstore kept them), in two arrays by dense id beside the blobs: not in the blob,
whose bytes are also a wire format (BatchGet's packed form). A Change carries the time it
is made at (`at`): applying it stamps every image it writes as changed then, a new profile
as created then, unless `times` says otherwise (merges keep the earliest created time,
slot moves the source's times). The log records both (RECORD_CHANGE), so replay rebuilds
them; docs/log-format.md has the rules.

The class is the engine's state, its reading and its planning entry points. The larger
concerns live in their own modules as functions of the engine, bound in the class body
(one type's methods across files, as Go lays them out), so every caller still says
`engine.plan_erase(...)`: applying changes (memstore.engine.applying), the bulk-load
planner (bulk), cross-shard merge steps (merging), data rights (rights) and index
maintenance (indexing). What a Change is:
memstore.engine.change; the blob layout: memstore.engine.blob; the general write planner
with identity resolution: memstore.engine.planner.
"""

from __future__ import annotations

import array
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from typing import Any

import numpy as np
from pyroaring import BitMap

from memstore.engine import applying, bulk, indexing, merging, rights
from memstore.engine.blob import decode, ident_key, ident_keys, timestamp_ext
from memstore.engine.change import (
    ADD_TO_SET,
    REMOVE_FROM_SET,
    UNSET,
    Change,
    Note,
    Profile,
    UpsertSpec,
)
from memstore.engine.columnar import Columns, Row
from memstore.engine.identity import IdentityRules, check_identifier, check_pid, claim_columns
from memstore.engine.planner import Planner
from memstore.engine.schema import (
    Kind,
    Merge,
    Schema,
    check_merge,
    check_name,
    kind_of,
    registry_key,
)
from memstore.engine.segments import MAX_SEGMENTS, Segments
from memstore.engine.values import from_stored
from memstore.errors import (
    FailedPrecondition,
    Forwarded,
    Held,
    InvalidArgument,
    MemstoreError,
    NotFound,
    Undeclared,
    WrongSlot,
    brief,
)
from memstore.hashslot import SLOT_COUNT, slot_of
from memstore.index.bitmap_index import RangeIndex, ValueIndex
from memstore.index.blobtable import BlobTable
from memstore.index.claims import Claims, claim_key
from memstore.index.day_index import DayIndex
from memstore.index.dense import bitmap_of
from memstore.index.inttable import IntTable
from memstore.index.pidtable import PidIndex, PidTable
from memstore.query import Node, format_query
from memstore.query.ast import segment_problem

DEFAULT_EVENT_DAYS = 180  # days of day records kept (--event-days)


class Engine:
    def __init__(self, rules: IdentityRules | None = None,
                 clock: Callable[[], float] = time.time, salt: bytes = b"", *,
                 event_days: int = DEFAULT_EVENT_DAYS) -> None:
        self.rules = rules or IdentityRules()
        # Wall-clock seconds (injectable, so tests can roll days over): created and changed
        # times, and the `event_days` UTC days up to today that day records keep. The clock
        # only plans: what is kept is decided when a change is planned and logged with it.
        self.clock = clock
        # The cluster's salt for suppression keys and audit hashes (memstore.server.rights).
        self.salt = salt
        if event_days < 1:
            raise ValueError("event_days must be at least 1")
        self.event_days = event_days
        self.schema = Schema()
        # Dense id -> primary id (None: no profile) and, as `dense_of`, the way back
        # (memstore.index.pidtable: ~35 bytes a profile where a list and a dict took ~140).
        self.pids = PidTable()
        self.blobs = BlobTable()  # dense id -> blob (memstore.index.blobtable)
        self.live = BitMap()
        self.value_index: dict[int, ValueIndex] = {}
        self.range_index: dict[int, RangeIndex] = {}
        self.exists: dict[int, BitMap] = {}  # attributes in value indexes
        self.day_index: dict[int, DayIndex] = {}  # event.<name>.days attributes
        self.directory = IntTable()  # ident_key -> dense id
        self._keys_builder: ThreadPoolExecutor | None = None  # (adding_loads)
        self._keys_built: list[Future[None]] = []
        self.aliases: dict[str, str] = {}
        # Each dense id's hash slot (stale once erased: read it through `live`). Appended
        # to by every new profile; scanned whole by the rare calls that ask by slot.
        self.slots = array.array("H")
        # Each dense id's created and last-changed time, unix seconds (0: not known).
        self.created = array.array("I")
        self.changed = array.array("I")
        # Cross-shard merges (shards/merge.py), keyed so they travel with slots on a move:
        self.held: dict[str, list[Any]] = {}  # loser pid -> [txn, survivor, since (unix s)]
        self.held_dense = BitMap()  # the held profiles: hidden from queries until released
        self.forwards: dict[str, str] = {}  # pid merged into a profile on another shard
        self.decided: dict[str, list[Any]] = {}  # txn -> [survivor pid, committed]
        self.claims = Claims()  # the cluster's identifier directory, for owned slots
        # The cluster's attribute declarations whose registry_key slots this shard owns:
        # name -> [kind, indexed, merge] (plan_register; shards/schema.py).
        self.registry: dict[str, list[Any]] = {}
        # Erased identifiers and ids on the blocked list (DeleteRequest.suppress): salted
        # hash (hashed) -> [slot of its claim key or primary id, since (unix s)].
        self.suppressed: dict[str, list[Any]] = {}
        self.segments = Segments()  # saved segments (memstore.engine.segments)
        self.erasures = 0  # people's erasures applied (Change.erasure), for the log's readers
        # Set by the server while it plans a router's write: undeclared attributes refuse
        # the write (Undeclared) instead of being declared by its values here.
        self.cluster_schema = False
        # Slot ownership (cluster). None: this shard owns every slot. `foreign` holds live
        # profiles in slots it does not own (being moved in or out); queries skip them.
        self.owned_slots: BitMap | None = None
        self.foreign = BitMap()
        self.epoch = 0
        self.started = int(clock())  # unknown changed times count from here (expired)
        self._timestamp_ids: set[int] = set()  # caches for wire_attributes
        self._day_record_ids: set[int] = set()
        self._timestamp_count = -1
        self._table: dict[int, list[Any]] = {}  # cache for schema_table
        self._table_count = -1

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.live)

    @property
    def dense_of(self) -> PidIndex:
        """primary id -> dense id (read-only: written through `pids`)."""
        return self.pids.index

    def today(self) -> int:
        """Today's UTC day number (days since 1970-01-01) by the engine's clock."""
        return int(self.clock() // 86_400)

    def first_kept(self) -> int:
        """The first day day records keep: today and the event_days - 1 days before it."""
        return self.today() - self.event_days + 1

    def check_slot(self, pid: str) -> None:
        if self.owned_slots is not None:
            slot = slot_of(pid)
            if slot not in self.owned_slots:
                raise self._wrong_slot(slot, f"profile {brief(pid)}")

    def _wrong_slot(self, slot: int, what: str) -> WrongSlot:
        return WrongSlot(slot, self.epoch, f"slot {slot} of {what} is not owned by this "
                         f"shard (epoch {self.epoch})")

    def owner_dense(self, kind: str, value: str) -> int | None:
        """Dense id of the profile holding identifier (kind, value), if any."""
        dense = self.directory.get(ident_key(kind, value))
        if dense is None:
            return None
        blob = self.blobs[dense]
        if blob is None or [kind, value] not in decode(blob)[2]:
            raise FailedPrecondition(
                f"identifier {kind}:{brief(value)} collides with another identifier's hash; refused"
            )
        return dense

    def check_moving(self, pid: str) -> None:
        """Refuse a primary id held by a cross-shard merge or forwarded by one."""
        if pid in self.held:
            txn, survivor, since = self.held[pid]
            raise Held(pid, txn, survivor, max(0.0, time.time() - since))
        if pid in self.forwards and pid not in self.dense_of:
            raise Forwarded(pid, self.forwards[pid])

    def owners(self, identifiers: Sequence[Any]) -> list[str | None]:
        """The primary id holding each [kind, value] among profiles in owned slots (a held
        profile counts: it is still the owner until its merge ends). One vectorized probe
        for all of them (ShardControl.Owners: checking the directory against the profiles)."""
        if not (set(map(type, identifiers)) <= {list, tuple} and set(map(len, identifiers)) <= {2}
                and set(map(type, chain.from_iterable(identifiers))) <= {str}):
            for i, pair in enumerate(identifiers):
                if not (isinstance(pair, list | tuple) and len(pair) == 2
                        and isinstance(pair[0], str) and isinstance(pair[1], str)):
                    raise InvalidArgument(f"identifiers[{i}]: not a [kind, value] pair")
        out: list[str | None] = [None] * len(identifiers)
        if not identifiers:
            return out
        held = self.directory.get_many(ident_keys([p[0] for p in identifiers],
                                                  [p[1] for p in identifiers]))
        for i in np.flatnonzero(held >= 0).tolist():
            kind, value = identifiers[i]
            dense = self.owner_dense(kind, value)  # confirms the hit (a hash collision raises)
            if dense is not None and dense not in self.foreign:
                out[i] = self.pids[dense]
        return out

    def resolve(self, pid: str) -> int | None:
        if self.held or self.forwards:
            self.check_moving(self.aliases.get(pid, pid) if pid not in self.dense_of else pid)
        dense = self.pids.dense_of(pid)
        if dense is None:
            survivor = self.aliases.get(pid)
            if survivor is not None:
                dense = self.pids.dense_of(survivor)
        return dense

    def lookup(self, pid: str | None = None, identifier: tuple[str, str] | None = None
               ) -> int | None:
        if identifier is not None:
            check_identifier(identifier[0], identifier[1], "identifier")
            dense = self.owner_dense(*identifier)
            if dense is not None and self.held:
                self.check_moving(self.pids[dense])  # type: ignore[arg-type]
            return dense
        assert pid is not None
        check_pid(pid)
        return self.resolve(pid)

    def profile(self, dense: int, attributes: Sequence[str] = ()) -> Profile:
        pid = self.pids[dense]
        blob = self.blobs[dense]
        assert pid is not None and blob is not None
        version, attrs, idents, merged = decode(blob)
        return Profile(pid, version, self.named(attrs, attributes),
                       [(k, v) for k, v in idents], merged, slot_of(pid))

    def named(self, attrs: dict[int, Any], only: Sequence[str] = ()) -> dict[str, Any]:
        by_id = self.schema.by_id
        if only:
            out = {}
            for name in only:
                spec = self.schema.by_name.get(name)
                if spec is not None and spec.id in attrs and spec.kind is not Kind.EVENT_DAYS:
                    out[name] = from_stored(spec.kind, attrs[spec.id])
            return out
        result = {}
        for aid, value in attrs.items():
            spec = by_id[aid]
            if spec.kind is Kind.TIMESTAMP:
                value = from_stored(spec.kind, value)
            elif spec.kind is Kind.EVENT_DAYS:
                continue  # a day record: read through did(...), not returned as a value
            result[spec.name] = value
        return result

    def schema_table(self) -> dict[int, list[Any]]:
        """attribute id -> [name, kind number], for readers of stored profile encodings."""
        if self._table_count != len(self.schema.by_id):
            self._table = {s.id: [s.name, int(s.kind)] for s in self.schema.by_id}
            self._table_count = len(self.schema.by_id)
        return self._table

    def wire_attributes(self, attrs: dict[int, Any], only: Sequence[str] = ()) -> dict[str, Any]:
        """Attributes by name for msgpack replies: timestamps as msgpack Timestamps."""
        by_id = self.schema.by_id
        if only:
            wanted = [self.schema.by_name.get(n) for n in only]
            attrs = {s.id: attrs[s.id] for s in wanted if s is not None and s.id in attrs}
        out = {by_id[aid].name: value for aid, value in attrs.items()}
        if self._timestamp_count != len(by_id):
            self._timestamp_ids = {s.id for s in by_id if s.kind is Kind.TIMESTAMP}
            self._day_record_ids = {s.id for s in by_id if s.kind is Kind.EVENT_DAYS}
            self._timestamp_count = len(by_id)
        for aid in self._timestamp_ids.intersection(attrs):
            out[by_id[aid].name] = timestamp_ext(attrs[aid])
        for aid in self._day_record_ids.intersection(attrs):
            del out[by_id[aid].name]
        return out

    def ids_of(self, dense_ids: Iterable[int]) -> list[str]:
        if isinstance(dense_ids, BitMap):
            dense_ids = np.frombuffer(dense_ids.to_array(), dtype=np.uint32)
        elif not isinstance(dense_ids, Sequence | np.ndarray):
            dense_ids = list(dense_ids)
        return self.pids.take(dense_ids)  # type: ignore[return-value]

    # ------------------------------------------------------------------ cluster schema
    def require_declared(self, wanted: Iterable[tuple[str, Kind, bool, Merge]]) -> None:
        """For a router's write (cluster_schema): refuse it (Undeclared) if it would declare
        attributes here, naming all of them (the first proposal of each name), so that the
        router declares them as the cluster has them in one round. No-op otherwise."""
        if not self.cluster_schema:
            return
        by_name = self.schema.by_name
        missing: dict[str, list[Any]] = {}
        for name, kind, indexed, merge in wanted:
            if name not in by_name and name not in missing:
                missing[name] = [name, int(kind), indexed, int(merge)]
        if missing:
            raise Undeclared(list(missing.values()))

    def _declares_ops(self, specs: Iterable[UpsertSpec]
                      ) -> Iterator[tuple[str, Kind, bool, Merge]]:
        """What upserts' operations would declare (a bad value is the planner's to name)."""
        if not self.cluster_schema:
            return
        by_name = self.schema.by_name
        for spec in specs:
            for op, name, value in spec.ops:
                if op == UNSET or name in by_name:
                    continue
                if op in (ADD_TO_SET, REMOVE_FROM_SET):
                    yield name, Kind.STRING_LIST, True, Merge.DEFAULT
                else:
                    try:
                        yield name, kind_of(value), True, Merge.DEFAULT
                    except InvalidArgument:
                        continue

    # ------------------------------------------------------------------ planning
    def plan_batch(self, specs: Sequence[UpsertSpec], where: str = "requests",
                   numbers: Iterable[str] = ()) -> Change:
        """`numbers`: attributes a bulk load sends ints and floats for: new ones are floats
        (one number type, as in JSON), whichever record comes first."""
        numbers = list(numbers)
        self.require_declared(itertools.chain(
            ((name, Kind.FLOAT, True, Merge.DEFAULT) for name in numbers),
            self._declares_ops(specs)))
        planner = Planner(self)
        for name in numbers:
            if planner.spec(name) is None:
                planner.declare(name, Kind.FLOAT)
        results = []
        for i, spec in enumerate(specs):
            at = spec.where or f"{where}[{i}]"
            try:
                results.append(self._plan_upsert(planner, spec, at))
            except MemstoreError as exc:
                exc.record = i  # which record refused the batch (RECORD_TRAILER)
                raise
        return planner.finish(results)

    def plan_load(self, rows: Sequence[Row], where: str = "packed") -> Change:
        """Plan a bulk load of (id, flat attributes, identifiers) rows with set semantics."""
        return self.plan_columns(Columns.from_rows(rows, where), where)

    plan_columns = bulk.plan_columns


    def plan_upsert(self, spec: UpsertSpec) -> Change:
        self.require_declared(self._declares_ops([spec]))
        planner = Planner(self)
        result = self._plan_upsert(planner, spec, "")
        return planner.finish(result)

    def _plan_upsert(self, planner: Planner, spec: UpsertSpec, at: str) -> tuple[str, bool]:
        check_pid(spec.pid, f"{at}.id" if at else "id")
        d = planner.draft(spec.pid, create=True)
        assert d is not None
        created = d.dense is None and d.version == 0
        if spec.expected_version is not None and d.version != spec.expected_version:
            raise FailedPrecondition(
                f"{at or 'upsert'}: profile {spec.pid!r} is at version {d.version}, "
                f"expected {spec.expected_version}"
            )
        for j, (op, name, value) in enumerate(spec.ops):
            if spec.record:
                where = f"{at}.attributes.{name}"
            else:
                where = f"{at}.operations[{j}]" if at else f"operations[{j}]"
            try:
                planner.apply_op(d, op, name, value, where)
            except InvalidArgument as exc:
                message = str(exc)
                raise InvalidArgument(message if message.startswith(where)
                                      else f"{where}: {message}") from None
        d.version += 1
        if spec.identifiers:
            planner.link(d, spec.identifiers, f"{at}.identifiers" if at else "identifiers")
        return d.pid, created

    def plan_link(self, pid: str, identifiers: Sequence[tuple[str, str]], create: bool = False
                  ) -> Change:
        planner = Planner(self)
        return planner.finish(self._plan_link(planner, pid, identifiers, create))

    def _plan_link(self, planner: Planner, pid: str, identifiers: Sequence[tuple[str, str]],
                   create: bool) -> tuple[str, list[str]]:
        check_pid(pid)
        if not identifiers:
            raise InvalidArgument("identifiers: nothing to link")
        d = planner.draft(pid, create=create)
        if d is None:
            raise NotFound(f"profile {brief(pid)} not found (pass create to make it)")
        d.version += 1  # the call is one change; merges below raise it past the merged
        merged = planner.link(d, identifiers, "identifiers")
        return d.pid, merged

    # ------------------------------------------------------------------ cross-shard merges
    # The protocol and its crash cases are in shards/merge.py; these plan each shard's part
    # (memstore.engine.merging).
    plan_hold = merging.plan_hold
    export_profile = merging.export_profile
    plan_absorb = merging.plan_absorb
    plan_decide = merging.plan_decide
    plan_release = merging.plan_release
    plan_forget = merging.plan_forget
    notes_in_slots = merging.notes_in_slots
    separated = merging.separated

    # ------------------------------------------------------------------ cluster schema
    def plan_register(self, specs: Sequence[tuple[str, Kind, bool, Merge]]) -> Change:
        """Register attribute declarations in the cluster's registry (the part this shard
        keeps): a name registered already keeps its declaration, a new one takes the one
        proposed. The result is the registry's [kind, indexed, merge] for each, in order:
        the cluster's declaration, whoever proposed first."""
        notes: list[Note] = []
        answers: list[list[Any]] = []
        mine: dict[str, list[Any]] = {}
        for i, (name, kind, indexed, merge) in enumerate(specs):
            try:
                check_name(name)
                check_merge(name, kind, merge)
            except InvalidArgument as exc:
                raise InvalidArgument(f"attributes[{i}]: {exc}") from None
            slot = slot_of(registry_key(name))
            if self.owned_slots is not None and slot not in self.owned_slots:
                raise self._wrong_slot(slot, f"attribute {brief(name)}")
            found = mine.get(name) or self.registry.get(name)
            if found is None:
                found = mine[name] = [int(kind), bool(indexed), int(merge)]
                notes.append(Note("registry", name, found))
            answers.append(found)
        return Change(notes=notes, result=answers)

    # ------------------------------------------------------------------ saved segments
    def plan_create_segment(self, name: str, node: Node, created_at: int) -> Change:
        """Define saved segment `name`: its first members enter it (watchers of every
        segment see them). The same definition again is a no-op; another one under the name
        is refused."""
        problem = segment_problem(name)
        if problem is not None:
            raise InvalidArgument(f"name: {problem}")
        text = format_query(node)
        existing = self.segments.get(name)
        if existing is not None:
            if existing.text == text:
                return Change(result=name)
            raise FailedPrecondition(f"segment {name!r} exists with another query: "
                                     f"{existing.text}; delete it first")
        if len(self.segments) >= MAX_SEGMENTS:
            raise FailedPrecondition(f"at most {MAX_SEGMENTS} saved segments")
        self.segments.check_definition(name, node)
        from memstore.query.evaluate import evaluate

        evaluate(self, node, unknown_is_empty=True, within=BitMap())  # literals' kinds
        return Change(notes=[Note("segments", name, [text, created_at])], rebuild=[name],
                      result=name)

    def plan_delete_segment(self, name: str) -> Change:
        """Forget saved segment `name` (its members leave it); refused while another
        segment reads it."""
        segment = self.segments.get(name)
        if segment is None:
            return Change(result=False)
        readers = sorted(s.name for s in self.segments.by_name.values() if name in s.depends)
        if readers:
            raise FailedPrecondition(f"segment {name!r} is read by {', '.join(readers)}: "
                                     "delete those first")
        return Change(notes=[Note("segments", name, None)], result=True)

    # ------------------------------------------------------------------ directory
    def plan_claims(self, entries: Sequence[Any]) -> Change:
        """Read, make, take over or release claims (ClaimRequest has the entry forms).
        The result is [holder or None, age in seconds, created, blocked] per entry, after
        it. A value on the blocked list is never claimed (`blocked`): no profile may hold
        it, so the write naming it is refused by its own shard, naming the record."""
        kinds, values, pids, expected = claim_columns(entries)
        keys = list(map(claim_key, kinds, values))
        slots = list(map(slot_of, keys))
        owned = self.owned_slots
        if owned is not None and not owned.issuperset(BitMap(slots)):
            i = next(i for i, slot in enumerate(slots) if slot not in owned)
            raise self._wrong_slot(slots[i], f"identifier {kinds[i]}:{brief(values[i])}")
        now = time.monotonic()
        claims = self.claims
        after: dict[str, str | None] = {}  # this plan's own claims so far
        notes: list[Note] = []
        answers: list[list[Any]] = []
        blocked = self.rules.is_blocked
        suppressed = self.suppressed
        for key, slot, pid, old, value in zip(keys, slots, pids, expected, values):
            if pid is not None and blocked(value):
                answers.append([None, 0.0, False, True, False])
                continue
            if pid is not None and suppressed and self.hashed(key) in suppressed:
                answers.append([None, 0.0, False, False, True])
                continue
            if key in after:
                holder = before = after[key]
            else:
                holder = before = claims.get_in(slot, key)
            created = False
            if pid is not None and holder != pid and holder in (None, old):
                holder, created = pid, True
            elif pid is None and old is not None and holder == old:
                holder = None
            if holder != before:
                after[key] = holder
                notes.append(Note("claims", key, holder))
            # A claim this plan sets is made now (applying it sets its age, see Claims.swap).
            fresh = holder is None or key in after
            answers.append([holder, 0.0 if fresh else claims.age(key, now), created, False,
                            False])
        return Change(notes=notes, result=answers)

    # ------------------------------------------------------------------ data rights
    # Erasure, the suppression list and anonymous-profile expiry (memstore.engine.rights).
    plan_delete = rights.plan_delete
    plan_erase = rights.plan_erase
    hashed = rights.hashed
    check_suppressed = rights.check_suppressed
    suppression_notes = rights.suppression_notes
    plan_suppress = rights.plan_suppress
    _names_suppressed = rights.names_suppressed
    expired = rights.expired

    def created_at(self, dense: int) -> int:
        return self.created[dense] if dense < len(self.created) else 0

    def plan_track(self, pid: str, event: str, at_micros: int, count: int = 1) -> Change:
        """One event (memstore.engine.tracking); the result is the profile's new version."""
        from memstore.engine.tracking import plan_track

        return plan_track(self, [(pid, event, at_micros, count)])

    def plan_track_batch(self, events: Sequence[tuple[Any, str, int, int]],
                         where: str = "events") -> Change:
        """Many events as one change (TrackBatch): keys are primary ids or (kind, value)
        identifiers; the result is how many applied (all: a bad event refuses them all)."""
        from memstore.engine.tracking import plan_track

        return plan_track(self, events, where)

    def plan_expire(self, limit: int = 500) -> Change:
        """A slice of the day-record expiry (memstore.engine.tracking.plan_expire)."""
        from memstore.engine.tracking import plan_expire

        return plan_expire(self, limit)

    def plan_declare(self, specs: Sequence[tuple[str, Kind, bool, Merge]]) -> Change:
        planner = Planner(self)
        for i, (name, kind, indexed, merge) in enumerate(specs):
            try:
                existing = self.schema.plan(name, kind, indexed, merge)
            except InvalidArgument as exc:
                raise InvalidArgument(f"attributes[{i}]: {exc}") from None
            if existing is not None and planner.spec(name) is None:
                planner.declare(name, kind, indexed, merge, explicit=True)
        return planner.finish()

    # ------------------------------------------------------------------ applying
    # The one way the state changes (memstore.engine.applying).
    apply = applying.apply
    _declare_and_note = applying.declare_and_note
    _apply_tracked = applying.apply_tracked
    replay_tracked = applying.replay_tracked
    _add_tracked = applying.add_tracked
    undo = applying.undo
    apply_notes = applying.apply_notes
    apply_images = applying.apply_images
    _grow = applying.grow
    _apply_load = applying.apply_load
    add_loaded = applying.add_loaded
    adding_loads = applying.adding_loads

    # Index and identifier-directory maintenance (memstore.engine.indexing).
    add_attribute = indexing.add_attribute
    _reidentify = indexing.reidentify
    _reindex = indexing.reindex
    _index_fresh = indexing.index_fresh
    _index_columns = indexing.index_columns
    _index_day_records = indexing.index_day_records

    # ------------------------------------------------------------------ cluster
    def set_ownership(self, epoch: int, slots: BitMap | None) -> None:
        self.epoch = epoch
        self.owned_slots = slots
        self.foreign = BitMap() if slots is None else self.live - self.members_of_slots(slots)

    def members_of_slots(self, slots: Iterable[int]) -> BitMap:
        """Live profiles whose primary ids hash to `slots`, valid slot numbers (one scan of
        every dense id ever given, erased ones too)."""
        chosen = np.zeros(SLOT_COUNT, dtype=bool)
        chosen[np.fromiter(slots, dtype=np.int64)] = True
        inside = chosen[np.array(self.slots, dtype=np.uint16)]
        return self.live & bitmap_of(np.flatnonzero(inside).astype(np.uint32))

    def visible(self) -> BitMap:
        """Live profiles in owned slots and not held by a merge: what queries answer over."""
        hidden = self.foreign | self.held_dense if self.held_dense else self.foreign
        return self.live - hidden if hidden else self.live
