"""Saved segments and change streams (issue 25), on real shard and router processes.

- A hypothesis model drives one shard with writes, links (merges), deletes and segment
  creations and deletions. The reference recomputes every segment from scratch after each
  step (a plain evaluator over the profiles as they are); the shard's members must equal
  it, and the stream of enters and leaves, replayed onto empty sets, must end equal to it,
  with no ENTER of a member and no LEAVE of a non-member on the way.
- Through a router with two shards: SIGKILL every process while watchers stream, restart,
  resume from the last position; `cluster add-shard` during a stream; the initial listing's
  seam under concurrent writes. Nothing missing, nothing doubled.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memstore.client.core import Client, ClientError
from memstore.query import And, InSegment, Not, Or, Predicate, format_query
from shards.slots import slot_of
from tests.conftest import ROOT, add_shard, start_router, start_shard
from tests.test_engine_model import _matches, predicates
from tests.test_router import start_shards

# ---------------------------------------------------------------------- helpers


class Watcher:
    """A `watch` (or `changes`) stream consumed on a thread: every item, in order."""

    def __init__(self, address: str, segments: tuple[str, ...] = (), *,
                 from_position: str | None = None, initial: bool = False,
                 changes: bool = False, **options: Any) -> None:
        self.client = Client(address, timeout=None)
        self.items: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.seam = threading.Event()  # the first position arrived
        self.done = threading.Event()
        if changes:
            stream = self.client.changes(from_position=from_position, initial=initial,
                                         heartbeats=True, **options)
        else:
            stream = self.client.watch(segments, from_position=from_position,
                                       initial=initial, heartbeats=True)
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream: Iterator[dict[str, Any]]) -> None:
        try:
            for item in stream:
                if item.get("position"):
                    self.seam.set()
                self.items.append(item)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            self.error = exc
        finally:
            self.seam.set()
            self.done.set()

    @property
    def events(self) -> list[dict[str, Any]]:
        return [item for item in list(self.items) if not item.get("heartbeat")]

    @property
    def position(self) -> str:
        """The position of the last item received (resume there)."""
        for item in reversed(list(self.items)):
            if item.get("position"):
                return str(item["position"])
        return ""

    def started(self, timeout: float = 30.0) -> Watcher:
        assert self.seam.wait(timeout), "the stream sent no position"
        assert self.error is None, self.error
        return self

    def close(self) -> None:
        self.client.close()
        self.done.wait(10)


def replay(events: list[dict[str, Any]], into: dict[str, set[str]] | None = None
           ) -> dict[str, set[str]]:
    """Enter and leave events applied to sets, refusing an ENTER of a member or a LEAVE of
    a non-member (a doubled or lost event)."""
    sets: dict[str, set[str]] = into if into is not None else {}
    for e in events:
        members = sets.setdefault(e["segment"], set())
        if e["change"] == "enter":
            assert e["id"] not in members, f"ENTER of a member: {e}"
            members.add(e["id"])
        else:
            assert e["id"] in members, f"LEAVE of a non-member: {e}"
            members.remove(e["id"])
    return sets


def eventually(check: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        time.sleep(0.05)


def members(client: Client, name: str) -> set[str]:
    return set(client.iter_ids(f'in_segment("{name}")'))


# ---------------------------------------------------------------------- the model

ATTRS = ("country", "age", "vip", "tags", "orders")
PIDS = st.sampled_from([f"p{i}" for i in range(8)])
IDENTS = st.tuples(st.sampled_from(["email", "device"]), st.sampled_from(["x", "y", "z"]))
VALUES: dict[str, Any] = {
    "country": st.sampled_from(["US", "CA", "DE"]),
    "age": st.integers(0, 60),
    "vip": st.booleans(),
    "tags": st.lists(st.sampled_from(["a", "b", "c"]), max_size=2, unique=True),
    "orders": st.integers(0, 9),
}
SIMPLE = predicates().filter(lambda p: p.attribute in ATTRS)


def _evaluate(node: Any, attrs: dict[str, Any], segments: dict[str, set[str]], pid: str
              ) -> bool:
    if isinstance(node, Predicate):
        return _matches(node.op, attrs.get(node.attribute), node.values)
    if isinstance(node, InSegment):
        return pid in segments[node.name]
    if isinstance(node, And):
        return all(_evaluate(c, attrs, segments, pid) for c in node.children)
    if isinstance(node, Or):
        return any(_evaluate(c, attrs, segments, pid) for c in node.children)
    assert isinstance(node, Not)
    return not _evaluate(node.child, attrs, segments, pid)


class SegmentsModel(RuleBasedStateMachine):
    address = ""  # set by the test: one shard for every example

    def __init__(self) -> None:
        super().__init__()
        self.client = Client(self.address)
        self.definitions: dict[str, Any] = {}  # name -> query node, in creation order
        self.created = 0
        self.watcher = Watcher(self.address, initial=True).started()

    # ------------------------------------------------------------------ writes
    @rule(pid=PIDS, name=st.sampled_from(ATTRS), data=st.data())
    def set_attr(self, pid: str, name: str, data: Any) -> None:
        value = data.draw(VALUES[name])
        if name == "tags" and not value:
            self.client.upsert(pid, ops=[("unset", name, None)])
        else:
            self.client.upsert(pid, {name: value})

    @rule(pid=PIDS, name=st.sampled_from(ATTRS))
    def unset(self, pid: str, name: str) -> None:
        self.client.upsert(pid, ops=[("unset", name, None)])

    @rule(pid=PIDS, ident=IDENTS)
    def link(self, pid: str, ident: tuple[str, str]) -> None:
        """Merges the profile holding `ident` (if another does) into `pid`."""
        try:
            self.client.link(pid, [ident], create=True)
        except ClientError as exc:  # merge protection: too many of one kind
            assert exc.code == grpc.StatusCode.FAILED_PRECONDITION, exc

    @rule(pid=PIDS)
    def delete(self, pid: str) -> None:
        self.client.delete(pid)

    # ------------------------------------------------------------------ segments
    @rule(query=SIMPLE, data=st.data())
    def create_segment(self, query: Any, data: Any) -> None:
        if self.definitions and data.draw(st.booleans(), label="reads another segment"):
            other = InSegment(data.draw(st.sampled_from(sorted(self.definitions))))
            query = data.draw(st.sampled_from([And((query, other)), Or((query, other)),
                                               And((query, Not(other)))]))
        self.created += 1
        name = f"s{self.created}"
        info = self.client.create_segment(name, format_query(query), allow_unknown=True)
        assert info["name"] == name
        self.definitions[name] = query

    @precondition(lambda self: self.definitions)
    @rule(data=st.data())
    def delete_segment(self, data: Any) -> None:
        name = data.draw(st.sampled_from(sorted(self.definitions)))
        readers = [n for n, q in self.definitions.items() if name in format_query(q)
                   and n != name and f'in_segment("{name}")' in format_query(q)]
        if readers:
            with pytest.raises(ClientError) as refused:
                self.client.delete_segment(name)
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
            return
        assert self.client.delete_segment(name) is True
        del self.definitions[name]

    # ------------------------------------------------------------------ checks
    def reference(self) -> dict[str, set[str]]:
        """Every segment recomputed from scratch over the profiles as they are now."""
        ids = sorted(self.client.iter_ids("*"))
        profiles = {p["id"]: p["attributes"] for p in self.client.batch_get(ids) if p}
        out: dict[str, set[str]] = {}
        for name, node in self.definitions.items():  # creation order: readers come later
            out[name] = {pid for pid, attrs in profiles.items()
                         if _evaluate(node, attrs, out, pid)}
        return out

    @invariant()
    def members_are_the_reference(self) -> None:
        want = self.reference()
        listed = {s["name"]: s["members"] for s in self.client.segments()}
        assert listed == {name: len(ids) for name, ids in want.items()}
        for name, ids in want.items():
            assert members(self.client, name) == ids, name

    def teardown(self) -> None:
        try:
            want = self.reference()

            def caught_up() -> bool:
                assert self.watcher.error is None, self.watcher.error
                got = replay(self.watcher.events)
                return {n: got.get(n, set()) for n in want} == want and not any(
                    ids for n, ids in got.items() if n not in want)  # deleted: all left

            eventually(caught_up, what="the stream to replay to the segments' members")
        finally:
            self.watcher.close()
            for name in reversed(list(self.definitions)):
                self.client.delete_segment(name)
            for pid in self.client.iter_ids("*"):
                self.client.delete(pid)
            self.client.close()


SegmentsModel.TestCase.settings = settings(max_examples=30, stateful_step_count=25,
                                           deadline=None)


def test_segments_and_their_stream_match_a_model_recomputed_from_scratch(tmp_path: Path
                                                                         ) -> None:
    shard = start_shard(tmp_path / "data", "--sync", "off")
    try:
        SegmentsModel.address = shard.address
        SegmentsModel.TestCase().runTest()
    finally:
        shard.stop()


# ---------------------------------------------------------------------- one shard

def test_segment_definitions_are_checked_and_survive_restarts(tmp_path: Path) -> None:
    shard = start_shard(tmp_path / "data", "--sync", "off")
    try:
        with Client(shard.address) as client:
            client.batch_upsert([{"id": f"u{i}", "attributes": {"age": i, "plan": "pro"}}
                                 for i in range(50)])
            info = client.create_segment("adults", "age >= 18")
            assert info["members"] == 32 and info["query"] == "age >= 18"
            assert client.create_segment("adults", "age >= 18")["members"] == 32  # no-op
            client.create_segment("pro_adults", 'in_segment("adults") AND plan = "pro"')
            assert client.count('in_segment("pro_adults")') == 32
            assert client.count('in_segment("adults") AND NOT age >= 40') == 22

            def refused(call: Callable[[], Any]) -> ClientError:
                with pytest.raises(ClientError) as err:
                    call()
                return err.value

            err = refused(lambda: client.create_segment("adults", "age >= 21"))
            assert err.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "exists with another query: age >= 18" in err.details
            err = refused(lambda: client.create_segment("bad name!", "age >= 1"))
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "name" in err.details
            err = refused(lambda: client.create_segment("x", 'in_segment("nope")'))
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "nope" in err.details
            err = refused(lambda: client.create_segment("y", "age >= "))
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT
            err = refused(lambda: client.count('in_segment("nope")'))
            assert err.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
            assert "nope" in err.details
            err = refused(lambda: client.delete_segment("adults"))
            assert err.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "pro_adults" in err.details
            err = refused(lambda: list(client.watch(["nope"])))
            assert err.code == grpc.StatusCode.NOT_FOUND
            client.upsert("u5", {"age": 30})
            client.upsert("u40", {"plan": "free"})
            client.snapshot()
            client.upsert("u6", {"age": 31})  # after the snapshot: replayed from the log
        shard.stop(signal.SIGKILL)
        shard = start_shard(tmp_path / "data", "--sync", "off")
        with Client(shard.address) as client:
            listed = {s["name"]: s["members"] for s in client.segments()}
            assert listed == {"adults": 34, "pro_adults": 33}
            assert members(client, "adults") == {f"u{i}" for i in [5, 6, *range(18, 50)]}
            client.upsert("u7", {"age": 70})  # still kept current after the restart
            assert client.count('in_segment("pro_adults")') == 34
            assert client.delete_segment("pro_adults") is True
            assert client.delete_segment("pro_adults") is False
            assert [s["name"] for s in client.segments()] == ["adults"]
    finally:
        shard.stop()


def test_change_stream_filters_by_query_and_attributes_and_names_merges(tmp_path: Path
                                                                        ) -> None:
    shard = start_shard(tmp_path / "data", "--sync", "off")
    try:
        with Client(shard.address) as client:
            client.upsert("a", {"country": "DE", "age": 30}, identifiers=[("email", "a@x")])
            client.upsert("b", {"country": "US", "age": 40})
            everything = Watcher(shard.address, changes=True).started()
            german = Watcher(shard.address, changes=True, query='country = "DE"',
                             attributes=["age"]).started()
            client.upsert("a", {"age": 31})
            client.upsert("a", {"country": "DE"})  # a new version, no value changed
            client.upsert("b", {"age": 41})  # not German
            client.upsert("c", {"country": "DE"}, identifiers=[("email", "c@x")])
            client.link("c", [("email", "a@x")])  # a merges into c
            client.delete("b")
            eventually(lambda: len(everything.events) >= 6, what="six changes")
            time.sleep(0.3)
            seen = [(e["id"], e["set"], e["unset"], e["created"], e["deleted"],
                     e["merged_into"]) for e in everything.events]
            assert seen[:4] == [
                ("a", {"age": 31}, [], False, False, None),
                ("a", {}, [], False, False, None),
                ("b", {"age": 41}, [], False, False, None),
                ("c", {"country": "DE"}, [], True, False, None),
            ]
            assert ("a", {}, [], False, False, "c") in seen[4:]  # merged away into c
            assert seen[-1] == ("b", {}, [], False, True, None)
            ages = [(e["id"], e["set"]) for e in german.events if not e["merged_into"]]
            assert ages[0] == ("a", {"age": 31})
            assert ("b", {"age": 41}) not in ages
            assert all(set(s) <= {"age"} for _, s in ages)
            everything.close()
            german.close()
    finally:
        shard.stop()


def test_change_streams_show_tracked_events_without_their_day_records(tmp_path: Path
                                                                     ) -> None:
    """A Track changes a profile's event aggregates and its day record; streams show the
    aggregates (live, listed with --initial, resumed from a position) and never the day
    record, whose bytes are no value (the stream failed on them). `-a` with --initial
    lists only the profiles holding a named attribute."""
    shard = start_shard(tmp_path / "data", "--sync", "off")
    try:
        with Client(shard.address) as client:
            client.upsert("a", {"plan": "pro"})
            client.upsert("b", {"country": "DE"})
            live = Watcher(shard.address, changes=True).started()
            start = live.position
            client.track("a", "purchase")
            client.track("b", "purchase", at=datetime.now(UTC) - timedelta(days=3), count=2)
            eventually(lambda: len(live.events) >= 2, what="two tracks")
            resumed = Watcher(shard.address, changes=True, from_position=start)
            listed = Watcher(shard.address, changes=True, initial=True)
            plans = Watcher(shard.address, changes=True, initial=True, attributes=["plan"])
            for watcher in (resumed, listed, plans):
                watcher.started()
            eventually(lambda: len(resumed.events) >= 2, what="the tracks again")
            for watcher in (live, resumed, listed, plans):
                assert watcher.error is None, watcher.error
            for events in (live.events[:2], resumed.events[:2]):
                assert [e["id"] for e in events] == ["a", "b"]
                assert all(set(e["set"]) == {"event.purchase.count", "event.purchase.first",
                                             "event.purchase.last"} for e in events)
                assert events[1]["set"]["event.purchase.count"] == 2
            initial = {e["id"]: e["set"] for e in listed.events if e["initial"]}
            assert set(initial) == {"a", "b"}
            assert initial["a"]["plan"] == "pro" and initial["b"]["event.purchase.count"] == 2
            assert not any(name.endswith(".days") for s in initial.values() for name in s)
            assert [(e["id"], e["set"]) for e in plans.events if e["initial"]] == [
                ("a", {"plan": "pro"})]
            for watcher in (live, resumed, listed, plans):
                watcher.close()
    finally:
        shard.stop()


def test_a_filtered_change_stream_resumes_inside_a_record_missing_nothing(tmp_path: Path
                                                                           ) -> None:
    """A record of three profiles, all matching the stream's query; the watcher stops after
    the first, which then stops matching. Resumed there, the stream sends the other two:
    a record's changes are numbered by their profiles' places in it, not by what the
    query keeps when the stream reads it."""
    shard = start_shard(tmp_path / "data", "--sync", "off")
    try:
        with Client(shard.address) as client:
            client.declare([{"name": "age", "kind": "int"}])
            first = Watcher(shard.address, changes=True, query="age >= 18").started()
            client.batch_upsert([{"id": p, "attributes": {"age": 30}} for p in ("p1", "p2", "p3")])
            eventually(lambda: len(first.events) == 3, what="three changes")
            first.close()
            assert [e["id"] for e in first.events] == ["p1", "p2", "p3"]
            client.upsert("p1", {"age": 5})  # p1 no longer matches
            client.upsert("p4", {"age": 50})
            again = Watcher(shard.address, changes=True, query="age >= 18",
                            from_position=first.events[0]["position"]).started()
            eventually(lambda: len(again.events) >= 3, what="the rest and p4")
            time.sleep(0.3)
            again.close()
            assert [e["id"] for e in again.events] == ["p2", "p3", "p4"]
    finally:
        shard.stop()


def test_streams_hear_every_profile_of_changes_logged_as_columns(tmp_path: Path) -> None:
    """A load, big batches of upserts and a big erasure log their images as columns
    (RECORD_COLUMNS, from IMAGE_COLUMNS_FROM images): both streams hear each profile of
    them as of a small change, in order, and a restart replays them."""
    n = 600
    shard = start_shard(tmp_path / "data", "--sync", "off")
    try:
        with Client(shard.address) as client:
            client.create_segment("de", 'country = "DE"', allow_unknown=True)
            changes = Watcher(shard.address, changes=True).started()
            segment = Watcher(shard.address, ("de",)).started()
            client.load([{"id": f"u{i}", "attributes": {"country": "DE" if i % 3 else "US",
                                                         "age": i}} for i in range(n)])
            client.batch_upsert([{"id": f"u{i}", "attributes": {"country": "DE"}}
                                 for i in range(n)])  # a third enter the segment
            client.batch_upsert([{"id": f"u{i}", "attributes": {"age": -i - 1}}
                                 for i in range(n)])
            list(client.iter_erase("age < -300", batch_size=500))  # u300 .. u599
            eventually(lambda: len(changes.events) >= 3 * n + n // 2, what="every change")
            seen = [(e["id"], e["created"], e["deleted"]) for e in changes.events]
            assert seen[:n] == [(f"u{i}", True, False) for i in range(n)]
            assert [e["set"] for e in changes.events[n:2 * n]] == [
                {} if i % 3 else {"country": "DE"} for i in range(n)]
            assert [e["set"] for e in changes.events[2 * n:3 * n]] == [
                {"age": -i - 1} for i in range(n)]
            assert sorted(seen[3 * n:]) == sorted((f"u{i}", False, True) for i in range(300, n))
            eventually(lambda: replay(segment.events) == {"de": {f"u{i}" for i in range(300)}},
                       what="the segment's members")
            changes.close()
            segment.close()
        shard.stop(signal.SIGKILL)
        shard = start_shard(tmp_path / "data", "--sync", "off")
        with Client(shard.address) as client:
            assert client.count('country = "DE"') == 300
            assert client.count("age < -50") == 250  # u50 .. u299
            assert client.get("u350") is None and client.get("u150")["attributes"]["age"] == -151
    finally:
        shard.stop()


def test_a_position_older_than_the_retention_is_out_of_range(tmp_path: Path) -> None:
    shard = start_shard(tmp_path / "data", "--sync", "off", "--changes-retention", "0")
    try:
        with Client(shard.address) as client:
            client.create_segment("all", "age >= 0", allow_unknown=True)
            watcher = Watcher(shard.address).started()
            client.upsert("u1", {"age": 1})
            eventually(lambda: bool(watcher.events))
            old = watcher.events[0]["position"]
            watcher.close()
            client.upsert("u3", {"age": 3})  # a change after `old`, in the same segment
            client.snapshot()
            client.upsert("u2", {"age": 2})
            client.snapshot()  # the log before the first snapshot goes
            with pytest.raises(ClientError) as err:
                next(iter(client.watch(from_position=old)))
            assert err.value.code == grpc.StatusCode.OUT_OF_RANGE
            assert "initial" in err.value.details
            with pytest.raises(ClientError) as err:
                next(iter(client.watch(from_position="not-a-position")))
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        shard.stop()


def test_a_router_stream_ends_naming_a_shard_that_hangs_or_dies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A merged stream cannot pass a silent shard's watermark: a shard that sends nothing
    (SIGSTOP: hung) for STALL seconds ends it with UNAVAILABLE naming the shard, as one
    killed does, so the watcher knows to resume; a slow watcher is no stall."""
    from shards import watch as router_watch
    from tests.test_router import RouterThread

    monkeypatch.setattr(router_watch, "STALL", 2.0)
    shards = start_shards(tmp_path, 2)
    router = RouterThread([s.address for s in shards])
    try:
        with Client(router.address) as client:
            client.upsert("u0", {"n": 0})
            stream = client.changes(heartbeats=True)
            first = next(stream)
            time.sleep(3)  # a watcher slower than STALL: the shards are alive
            assert next(stream) is not None and first is not None
            shards[1].proc.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(ClientError) as err:
                for _ in stream:
                    assert time.monotonic() - started < 30
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert "shard-1" in err.value.details and "sent nothing" in err.value.details
            shards[1].proc.send_signal(signal.SIGCONT)
            stream = client.changes(heartbeats=True)
            next(stream)
            shards[0].proc.kill()
            with pytest.raises(ClientError) as err:
                for _ in stream:
                    pass
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert "shard-0" in err.value.details
    finally:
        shards[1].proc.send_signal(signal.SIGCONT)
        router.stop()
        for shard in shards:
            shard.stop()


def test_a_position_inside_a_change_is_invalid_not_damage(tmp_path: Path) -> None:
    """A position whose place in the log starts no change (made up, or from an earlier
    data directory of a shard of the same name) is INVALID_ARGUMENT saying so, never an
    internal error telling the operator to repair a log that is whole."""
    from memstore.server.watch import decode_token, encode_token

    shard = start_shard(tmp_path / "data", "--sync", "off")
    try:
        with Client(shard.address) as client:
            watcher = Watcher(shard.address, changes=True).started()
            for i in range(3):
                client.upsert(f"u{i}", {"n": i})
            eventually(lambda: len(watcher.events) >= 3, what="three changes")
            watcher.close()
            [(name, (lsn, _, log))] = decode_token(watcher.events[0]["position"]).items()
            for inside in (lsn + 1, lsn + 7):
                with pytest.raises(ClientError) as err:
                    next(iter(client.changes(from_position=encode_token(
                        {name: (inside, -1, log)}))))
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
                assert f"position {inside} is not where a change" in err.value.details
            resumed = list(itertools.islice(client.changes(
                from_position=watcher.events[0]["position"]), 2))
            assert [e["id"] for e in resumed] == ["u1", "u2"]
    finally:
        shard.stop()


def test_a_position_of_another_log_is_refused_even_where_a_change_starts(
        tmp_path: Path) -> None:
    """A shard started on a new data directory under the same name writes the same
    changes at the same positions: a position of the old directory starts a change in the
    new log too, and was read there, skipping the new changes before it. It names the
    log it came from, so it is OUT_OF_RANGE; the same position from the new log resumes."""
    from memstore.server.watch import decode_token

    def three_changes(data: Path) -> str:
        shard = start_shard(data)
        try:
            watcher = Watcher(shard.address, changes=True).started()
            with Client(shard.address) as client:
                for i in range(3):
                    client.upsert(f"u{i}", {"n": i})
            eventually(lambda: len(watcher.events) >= 3, what="three changes")
            watcher.close()
            return str(watcher.events[0]["position"])
        finally:
            shard.stop()

    old = three_changes(tmp_path / "old")
    new = three_changes(tmp_path / "new")
    (name, (lsn, _, old_log)), = decode_token(old).items()
    assert decode_token(new)[name][:2] == (lsn, -1) and decode_token(new)[name][2] != old_log
    shard = start_shard(tmp_path / "new")
    try:
        with Client(shard.address) as client:
            with pytest.raises(ClientError) as err:
                next(iter(client.changes(from_position=old)))
            assert err.value.code == grpc.StatusCode.OUT_OF_RANGE
            assert f"position {lsn} is in another log of {name}" in err.value.details
            assert "start again with initial" in err.value.details
            resumed = list(itertools.islice(client.changes(from_position=new), 2))
            assert [e["id"] for e in resumed] == ["u1", "u2"]
    finally:
        shard.stop()


def test_a_position_is_checked_against_the_history_of_the_log_it_names() -> None:
    """What a resumed stream is told for each history its position may name: its log's
    own; one a promotion or a restart under --sync everysec/off continues up to the log's
    end (at or before it: resumes; inside the record starting there, whose events the
    cut lost, or past it: the changes there are gone); any other."""
    from types import SimpleNamespace

    from memstore.replication.history import History
    from memstore.server.watch import OutOfRange, _check_history

    now = History("new", "primary", "old", 500, older=(("oldest", 300),))
    shard = SimpleNamespace(log_history=lambda: now)
    for issued, lsn, index in (("new", 900, 4), ("old", 500, -1), ("old", 499, 3),
                               ("old", 0, -1), ("oldest", 300, -1), ("oldest", 120, 7),
                               ("", 10**9, 2)):
        _check_history(shard, "shard-0", lsn, index, issued)  # type: ignore[arg-type]
    for issued, lsn, index in (("old", 501, -1), ("old", 500, 0), ("oldest", 300, 0),
                               ("oldest", 301, -1)):
        with pytest.raises(OutOfRange, match=f"position {lsn} is past where this shard's "
                           "log continues the one it was read from"):
            _check_history(shard, "shard-0", lsn, index, issued)  # type: ignore[arg-type]
    with pytest.raises(OutOfRange, match="position 7 is in another log of shard-0"):
        _check_history(shard, "shard-0", 7, -1, "other")  # type: ignore[arg-type]
    shard = SimpleNamespace(log_history=lambda: None)  # no replication roles: unknown
    _check_history(shard, "shard-0", 7, -1, "other")  # type: ignore[arg-type]


def test_no_stream_starts_before_a_persons_erasure(tmp_path: Path) -> None:
    """Erased data is gone from memory at once, so no change stream may replay it from the
    log (a position is the caller's to make up): a position from before an erasure is
    OUT_OF_RANGE, before any snapshot and after a restart; one from after it resumes."""
    from memstore.server.watch import encode_token

    data = tmp_path / "data"
    shard = start_shard(data, "--sync", "off")
    try:
        with Client(shard.address) as client:
            client.upsert("victim", {"ssn": "078-05-1120"})
            client.upsert("other", {"ssn": "219-09-9999"})
            client.erase("victim")
            client.upsert("later", {"ssn": "000-00-0001"})
            before = encode_token({"shard-0": (0, -1, "")})
            for stream in (client.changes, client.watch):
                with pytest.raises(ClientError) as err:
                    next(iter(stream(from_position=before)))
                assert err.value.code == grpc.StatusCode.OUT_OF_RANGE
                assert "erasure" in err.value.details
            # A position that does not name this shard (taken before it joined a cluster)
            # starts it after the erasure: the stream goes on, the victim is not replayed.
            other = encode_token({"shard-new": (0, -1, "")})
            joined = Watcher(shard.address, changes=True, from_position=other).started()
            live = Watcher(shard.address, changes=True).started()
            client.upsert("after", {"ssn": "000-00-0002"})
            eventually(lambda: len(joined.events) >= 2)
            joined.close()
            assert [e["id"] for e in joined.events] == ["later", "after"]
            eventually(lambda: bool(live.events))
            live.close()
            after = live.events[0]["position"]
    finally:
        shard.stop(signal.SIGKILL)  # no snapshot at stop: the log holds the victim
    shard = start_shard(data, "--sync", "off")
    try:
        with Client(shard.address) as client:
            with pytest.raises(ClientError) as err:
                next(iter(client.changes(from_position=before)))
            assert err.value.code == grpc.StatusCode.OUT_OF_RANGE
            client.upsert("resumed", {"ssn": "000-00-0003"})
            assert next(iter(client.changes(from_position=after)))["id"] == "resumed"
    finally:
        shard.stop()


def test_a_cursor_that_falls_behind_the_kept_log_is_told_so(tmp_path: Path) -> None:
    """A reader whose next segment was deleted before it got there (a slow watcher)."""
    import asyncio

    from memstore.storage.wal_tail import LogGone, LogTail
    from memstore.storage.wal_writer import LogWriter

    async def main() -> None:
        writer = LogWriter.open(tmp_path)
        first = writer.append(5, b"one")
        writer.rotate()
        second = writer.append(5, b"two")
        writer.rotate()
        third = writer.append(5, b"three")
        await writer.sync_to(third)
        tail = LogTail(tmp_path, 0)
        assert [r.payload for r in tail.read(first)] == [b"one"]  # holds segment one
        slow = LogTail(tmp_path, 0)
        writer.remove_segments_before(second)  # a snapshot's pruning: one and two go
        # The open segment stays readable; the next one is gone.
        with pytest.raises(LogGone) as gone:
            tail.read(third)
        assert gone.value.oldest == second
        with pytest.raises(LogGone):  # one that never opened its first segment
            slow.read(third)
        assert [r.payload for r in LogTail(tmp_path, second).read(third)] == [b"three"]
        tail.close()
        slow.close()
        await writer.close()

    asyncio.run(main())


# ---------------------------------------------------------------------- a cluster

class Cluster:
    """Two shard processes and a router process, all killable."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.shards = start_shards(root, 2)
        self.router = start_router([s.address for s in self.shards])

    @property
    def address(self) -> str:
        return self.router.address

    def kill(self) -> None:
        for process in [self.router, *self.shards]:
            process.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.shards = [start_shard(s.data_dir, "--name", f"shard-{i}", "--sync", "off")
                       for i, s in enumerate(self.shards)]
        self.router = start_router([s.address for s in self.shards])

    def stop(self) -> None:
        for process in [self.router, *self.shards]:
            process.stop()


class Writer:
    """Random ages for ids w0..w{n}, on a thread, remembering what was acknowledged."""

    def __init__(self, address: str, n: int, prefix: str = "w") -> None:
        self.client = Client(address, timeout=10)
        self.ids = [f"{prefix}{i}" for i in range(n)]
        self.acked: dict[str, int] = {}
        self.stop = threading.Event()
        self.errors = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        rng = random.Random(7)
        while not self.stop.is_set():
            pid, age = rng.choice(self.ids), rng.randrange(0, 40)
            try:
                self.client.upsert(pid, {"age": age})
                self.acked[pid] = age
            except ClientError:
                self.errors += 1  # a killed server: not acknowledged
                time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.client.close()


def _adults(acked: dict[str, int]) -> set[str]:
    return {pid for pid, age in acked.items() if age >= 18}


def test_watchers_resume_after_every_process_is_killed(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        with Client(cluster.address) as client:
            client.declare([{"name": "age", "kind": "int"}])
            client.create_segment("adults", "age >= 18")
        watcher = Watcher(cluster.address, ("adults",), initial=True).started()
        writer = Writer(cluster.address, 60)
        time.sleep(1.0)
        cluster.kill()  # mid-stream, mid-write
        writer.stop.set()
        writer.thread.join(30)
        watcher.done.wait(20)
        assert watcher.error is not None  # the stream ended with the servers
        before = len(watcher.events)
        assert before > 10
        cluster.restart()
        writer.client.close()
        resumed = Watcher(cluster.address, ("adults",), from_position=watcher.position)
        # Acknowledged before the kill, or applied but unanswered: the servers say.
        writer = Writer(cluster.address, 60)
        time.sleep(1.0)
        writer.finish()
        with Client(cluster.address) as client:
            truth = members(client, "adults")
            ages = {p["id"]: p["attributes"]["age"] for p in client.batch_get(
                [f"w{i}" for i in range(60)]) if p}
        assert truth == _adults(ages)
        assert set(writer.acked.items()) <= set(ages.items())
        eventually(lambda: replay(watcher.events + resumed.events).get("adults") == truth,
                   what="the resumed stream to reach the members")
        resumed.close()
    finally:
        cluster.stop()


def test_a_stream_goes_on_across_add_shard_and_old_positions_still_resume(tmp_path: Path
                                                                          ) -> None:
    cluster = Cluster(tmp_path)
    new = start_shard(tmp_path / "shard-2", "--name", "shard-2", "--sync", "off")
    try:
        with Client(cluster.address) as client:
            client.declare([{"name": "age", "kind": "int"}])
            client.batch_upsert([{"id": f"still{i}", "attributes": {"age": 20 + i % 2}}
                                 for i in range(300)])
            client.create_segment("adults", "age >= 18")
        watcher = Watcher(cluster.address, ("adults",), initial=True).started()
        before_add = watcher.position
        writer = Writer(cluster.address, 40)
        add_shard(cluster.address, new.address, "--batch-slots", "2048")
        time.sleep(1.0)
        writer.finish()
        with Client(cluster.address) as client:
            truth = members(client, "adults")
            assert client.stats()  # the router knows three shards now
        assert len(truth) > 300
        eventually(lambda: replay(watcher.events).get("adults") == truth,
                   what="the live stream to reach the members")
        # Moved profiles neither left nor entered: nobody wrote the `still` ones.
        assert not [e for e in watcher.events
                    if e["id"].startswith("still") and not e["initial"]]
        # A position from before the new shard joined resumes after it: the same events.
        again = Watcher(cluster.address, ("adults",), from_position=before_add)
        live = [(e["id"], e["change"]) for e in watcher.events if not e["initial"]]

        def per_profile(events: list[tuple[str, str]]) -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            for pid, change in events:
                out.setdefault(pid, []).append(change)
            return out

        eventually(lambda: per_profile([(e["id"], e["change"]) for e in again.events])
                   == per_profile(live), what="the resumed stream to repeat the live one")
        again.close()
        watcher.close()
    finally:
        cluster.stop()
        new.stop()


def test_initial_listing_then_changes_neither_drop_nor_double_at_the_seam(tmp_path: Path
                                                                         ) -> None:
    cluster = Cluster(tmp_path)
    try:
        with Client(cluster.address) as client:
            client.declare([{"name": "age", "kind": "int"}])
            client.batch_upsert([{"id": f"w{i}", "attributes": {"age": i % 40}}
                                 for i in range(2000)])
            client.create_segment("adults", "age >= 18")
        writer = Writer(cluster.address, 2000)
        time.sleep(0.5)
        watchers = [Watcher(cluster.address, ("adults",), initial=True) for _ in range(3)]
        for w in watchers:
            w.started()
        time.sleep(1.0)
        writer.finish()
        with Client(cluster.address) as client:
            truth = members(client, "adults")
        for w in watchers:
            initial = [e for e in w.events if e["initial"]]
            assert initial and all(not e["position"] for e in initial)
            assert len({e["id"] for e in initial}) == len(initial)  # listed once each
            eventually(lambda w=w: replay(w.events).get("adults") == truth,
                       what="the watcher to reach the members")
            w.close()
    finally:
        cluster.stop()


def test_a_typo_in_a_segment_or_a_stream_filter_is_refused_unless_allowed(
        tmp_path: Path) -> None:
    """An attribute or event nobody has had is refused as a query's is, on a shard and
    through a router (which checks it against every shard's schema), unless the segment
    is defined ahead of its data on purpose; then it fills as the data comes."""
    shards = start_shards(tmp_path, 2)
    router = start_router([s.address for s in shards])
    try:
        with Client(router.address) as client:  # country: known to shard 0 at least
            client.upsert(next(f"c{i}" for i in range(99) if slot_of(f"c{i}") < 8192),
                          {"country": "DE"})
        for address in (shards[0].address, router.address):
            with Client(address) as client:
                for query in ('contry = "DE"', 'did("purchse", within=7d)'):
                    with pytest.raises(ClientError) as refused:
                        client.create_segment("typo", query)
                    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
                    assert "unknown" in refused.value.details
                    with pytest.raises(ClientError) as stream:
                        next(iter(client.changes(query=query)))
                    assert stream.value.code == grpc.StatusCode.INVALID_ARGUMENT
                assert "typo" not in {s["name"] for s in client.segments()}
        with Client(router.address) as client:
            ahead = client.create_segment("ahead", "seats >= 10", allow_unknown=True)
            assert ahead["members"] == 0
            client.upsert("big", {"seats": 12})
            assert client.count('in_segment("ahead")') == 1
    finally:
        router.stop()
        for shard in shards:
            shard.stop()


# ---------------------------------------------------------------------- the CLI

def test_cli_segments_and_watch_print_json_lines(tmp_path: Path) -> None:
    shard = start_shard(tmp_path / "data", "--sync", "off")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "memstore.cli", *args, "--address",
                               shard.address], check=False, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)

    try:
        with Client(shard.address) as client:
            client.upsert("u1", {"plan": "pro"})
        made = cli("segment", "create", "pro", 'plan = "pro"')
        assert made.returncode == 0, made.stderr
        assert json.loads(made.stdout)["members"] == 1
        typo = cli("segment", "create", "soon", 'pln = "pro"')
        assert typo.returncode == 1 and "unknown attribute 'pln'" in typo.stderr
        ahead = cli("segment", "create", "soon", 'seats >= 10', "--allow-unknown")
        assert ahead.returncode == 0 and json.loads(ahead.stdout)["members"] == 0
        assert cli("segment", "delete", "soon").returncode == 0
        assert json.loads(cli("segment", "list").stdout)["name"] == "pro"
        watch = subprocess.Popen(
            [sys.executable, "-m", "memstore.cli", "watch", "pro", "--initial", "--address",
             shard.address], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert watch.stdout is not None
        first = json.loads(watch.stdout.readline())
        assert (first["id"], first["change"], first["initial"]) == ("u1", "enter", True)
        with Client(shard.address) as client:
            client.upsert("u2", {"plan": "pro"})
            client.upsert("u1", {"plan": "free"})
        lines = [json.loads(watch.stdout.readline()) for _ in range(2)]
        assert [(e["id"], e["change"]) for e in lines] == [("u2", "enter"), ("u1", "leave")]
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0
        resumed = subprocess.Popen(
            [sys.executable, "-m", "memstore.cli", "watch", "pro", "--from",
             lines[0]["position"], "--address", shard.address],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert resumed.stdout is not None
        assert json.loads(resumed.stdout.readline())["id"] == "u1"
        resumed.kill()
        both = cli("watch", "pro", "--initial", "--from", lines[0]["position"])
        assert both.returncode == 2 and "--initial" in both.stderr
        assert cli("segment", "delete", "pro").stdout.strip() == "deleted pro"
        gone = cli("segment", "delete", "pro")
        assert gone.returncode == 1 and "no segment 'pro'" in gone.stderr
    finally:
        shard.stop()


def test_segments_that_read_the_clock_let_members_age_out_with_no_write(tmp_path: Path
                                                                        ) -> None:
    """did(...) windows end at the shard's now: a timed refresh moves members in and out
    as time passes (logged like any change, so a restart keeps it), in hours and in days,
    while a segment that does not read the clock is never re-evaluated."""
    import asyncio

    from memstore.query import parse
    from memstore.shard import Shard, ShardConfig

    now = [1_800_000_000.0]  # injected: the shard's clock for times, days and windows
    data = tmp_path / "data"

    async def scenario() -> None:
        shard = await Shard.open(ShardConfig(data_dir=data, clock=lambda: now[0]))
        engine = shard.engine
        for pid, hours_ago in (("recent", 1), ("older", 30)):
            at = int((now[0] - hours_ago * 3600) * 1_000_000)
            await shard.commit(engine.plan_track(pid, "visit", at, 1))
        for name, text in (("hour", 'did("visit", within=2h)'),
                           ("day", 'did("visit", within=2d)'),
                           ("plain", "exists(event.visit.count)")):
            await shard.commit(engine.plan_create_segment(name, parse(text), 1))
        members = {name: set(engine.ids_of(engine.segments.get(name).members))
                   for name in ("hour", "day", "plain")}
        assert members == {"hour": {"recent"}, "day": {"recent", "older"},
                           "plain": {"recent", "older"}}
        assert sorted(engine.segments.timed()) == ["day", "hour"]
        now[0] += 3 * 3600  # three hours on: "recent" was 4 hours ago
        assert await shard.refresh_timed() == 1
        assert not engine.segments.get("hour").members
        now[0] += 2 * 86400  # two days on: both visits are before the 2-day window
        assert await shard.refresh_timed() == 2
        assert not engine.segments.get("day").members
        assert len(engine.segments.get("plain").members) == 2
        await shard.close()
        again = await Shard.open(ShardConfig(data_dir=data, clock=lambda: now[0]))
        assert not again.engine.segments.get("hour").members  # replayed as logged
        assert not again.engine.segments.get("day").members
        await again.close()

    asyncio.run(scenario())


def test_segments_reading_a_segment_that_reads_the_clock_age_with_it(tmp_path: Path) -> None:
    """in_segment of a did(...) segment, directly or through another segment, moves when
    the segment it reads ages out on the timer: re-evaluated in the same refresh, after
    it, and logged with it."""
    import asyncio

    from memstore.query import parse
    from memstore.shard import Shard, ShardConfig

    now = [1_800_000_000.0]
    data = tmp_path / "data"

    async def scenario() -> None:
        shard = await Shard.open(ShardConfig(data_dir=data, clock=lambda: now[0]))
        engine = shard.engine
        for pid, days_ago in (("fresh", 0), ("stale", 3)):
            at = int((now[0] - days_ago * 86400) * 1_000_000)
            await shard.commit(engine.plan_track(pid, "visit", at, 1))
        for name, text in (("recent", 'did("visit", within=2d)'),
                           ("reader", 'in_segment("recent")'),
                           ("lapsed", 'exists(event.visit.count) AND NOT in_segment("reader")'),
                           ("plain", "exists(event.visit.count)")):
            await shard.commit(engine.plan_create_segment(name, parse(text), 1))

        def members() -> dict[str, set[str]]:
            return {name: set(engine.ids_of(engine.segments.get(name).members))
                    for name in ("recent", "reader", "lapsed", "plain")}

        assert members() == {"recent": {"fresh"}, "reader": {"fresh"}, "lapsed": {"stale"},
                             "plain": {"fresh", "stale"}}
        assert engine.segments.timed() == ["recent", "reader", "lapsed"]
        now[0] += 3 * 86400  # "fresh" visited 3 days ago now: out of the 2-day window
        assert await shard.refresh_timed() == 3  # left recent and reader, entered lapsed
        expected = {"recent": set(), "reader": set(), "lapsed": {"fresh", "stale"},
                    "plain": {"fresh", "stale"}}
        assert members() == expected
        for name, ids in expected.items():  # what a fresh evaluation says
            fresh = engine.segments.evaluate(engine, engine.segments.get(name), engine.live)
            assert set(engine.ids_of(fresh)) == ids, name
        await shard.close()
        shard = await Shard.open(ShardConfig(data_dir=data, clock=lambda: now[0]))
        engine = shard.engine
        assert members() == expected  # replayed as logged
        await shard.close()

    asyncio.run(scenario())


def test_a_fixed_window_segment_breaks_once_the_retention_passes_it(tmp_path: Path) -> None:
    """did(..., from=DAY) windows do not move with the clock: once the retention has
    dropped DAY, the segment cannot be evaluated as defined. It is marked broken with the
    retention's reason (on the timer for one reading the clock, on the next write that
    touches it otherwise), keeps its members less the profiles removed, and the shard
    goes on serving."""
    import asyncio
    import datetime as dt

    from memstore.engine.change import SET, UpsertSpec
    from memstore.query import parse
    from memstore.shard import Shard, ShardConfig

    now = [1_800_000_000.0]

    def day(offset: int) -> str:
        return dt.datetime.fromtimestamp(now[0] + offset * 86400, dt.UTC).date().isoformat()

    async def scenario() -> None:
        shard = await Shard.open(ShardConfig(data_dir=tmp_path / "data",
                                             clock=lambda: now[0], event_days=10))
        engine = shard.engine
        for pid in ("a", "b"):
            await shard.commit(engine.plan_track(pid, "open", int((now[0] - 2 * 86400)
                                                                  * 1_000_000), 1))
        since, until = day(-5), day(-1)
        for name, text in (("since", f'did("open", from="{since}")'),
                           ("between", f'did("open", from="{since}", to="{until}")')):
            await shard.commit(engine.plan_create_segment(name, parse(text), 1))
        assert engine.segments.timed() == ["since"]
        now[0] += 7 * 86400  # `since` is 12 days ago now, past the 10 days kept
        await shard.refresh_timed()
        assert "event retention of 10 days" in engine.segments.get("since").broken
        assert not engine.segments.get("between").broken  # nothing has touched it yet
        await shard.commit(engine.plan_track("a", "open", int(now[0] * 1_000_000), 1))
        await shard.commit(engine.plan_upsert(UpsertSpec("b", [(SET, "x", 1)])))
        assert "event retention of 10 days" in engine.segments.get("between").broken
        await shard.commit(engine.plan_delete("b"))
        for name in ("since", "between"):
            assert engine.ids_of(engine.segments.get(name).members) == ["a"]
        await shard.commit(engine.plan_upsert(UpsertSpec("c", [(SET, "x", 2)])))
        assert engine.dense_of.get("c") is not None  # writes go on
        await shard.close()

    asyncio.run(scenario())


def test_a_broken_segment_still_loses_the_profiles_removed() -> None:
    """A segment whose query stopped evaluating keeps its members, but a profile deleted
    (or merged away) leaves it, with a LEAVE: in_segment(...) never names a profile that
    is gone."""
    from memstore.engine.change import SET, UpsertSpec
    from memstore.engine.core import Engine
    from memstore.engine.schema import Kind, Merge
    from memstore.engine.segments import Touched
    from memstore.query import parse
    from memstore.query.evaluate import count, evaluate

    engine = Engine()

    def commit(change: Any) -> Any:  # what Shard.commit does around Engine.apply
        touched = Touched()
        engine.apply(change, touched)
        deltas = engine.segments.refresh(engine, touched)
        if change.rebuild:
            deltas.update(engine.segments.rebuild(engine, change.rebuild))
        return deltas

    commit(engine.plan_declare([("country", Kind.STRING, True, Merge.DEFAULT)]))
    for pid in ("u1", "u2", "u4"):
        commit(engine.plan_upsert(UpsertSpec(pid, [(SET, "country", "US")])))
    commit(engine.plan_create_segment("us", parse('country = "US" OR x = "a"'), 1))
    commit(engine.plan_upsert(UpsertSpec("u3", [(SET, "x", 5)])))  # x an int: it breaks
    assert engine.segments.get("us").broken
    u1 = engine.dense_of.get("u1")
    deltas = commit(engine.plan_delete("u1"))
    assert list(deltas["us"][1]) == [u1] and not deltas["us"][0]
    node = parse('in_segment("us")')
    assert sorted(engine.ids_of(evaluate(engine, node))) == ["u2", "u4"]
    assert count(engine, node) == 2
    assert count(engine, parse('NOT in_segment("us")')) == 1  # u3
    commit(engine.plan_upsert(UpsertSpec("u4", [(SET, "country", "CA")])))  # not removed:
    assert sorted(engine.ids_of(engine.segments.get("us").members)) == ["u2", "u4"]  # kept


def test_a_router_stream_from_now_names_every_shard_in_every_position(tmp_path: Path
                                                                       ) -> None:
    """Watching through a router from now (no position, no listing): every position it
    hands out, heartbeats' too, names every shard, so resuming from the first one gives
    what happened after it and nothing from before the watch began; heartbeats carry
    the router's time."""
    from memstore.server.watch import decode_token

    cluster = Cluster(tmp_path)
    try:
        with Client(cluster.address) as client:
            client.declare([{"name": "age", "kind": "int"}])
            for i in range(6):  # history on both shards, before the watch
                client.upsert(f"h{i}", {"age": 30})
                client.upsert(f"h{i}", {"age": 5})
            client.create_segment("adults", "age >= 18")
        watcher = Watcher(cluster.address, ("adults",)).started()
        time.sleep(1.5)
        with Client(cluster.address) as client:
            client.upsert("late", {"age": 40})
        eventually(lambda: len(watcher.events) == 1, what="the late ENTER")
        watcher.close()
        positions = [item["position"] for item in watcher.items if item.get("position")]
        assert positions and all(set(decode_token(p)) == {"shard-0", "shard-1"}
                                 for p in positions)
        beats = [item for item in watcher.items if item.get("heartbeat")]
        assert beats and all(b["at"].year >= 2026 for b in beats)
        resumed = Watcher(cluster.address, ("adults",), from_position=positions[0]).started()
        eventually(lambda: len(resumed.events) >= 1, what="the late ENTER again")
        time.sleep(0.5)
        resumed.close()
        assert [(e["id"], e["change"]) for e in resumed.events] == [("late", "enter")]
    finally:
        cluster.stop()


def test_members_aged_out_but_not_yet_refreshed_leave_when_their_slots_move(
        tmp_path: Path) -> None:
    """A did(...) segment's members who aged out since the last timed refresh (up to
    --segment-refresh late) are told to leave when add-shard moves them, not dropped
    quietly with the move: replaying the stream gives the segment as it is."""
    shards = start_shards(tmp_path, 2, "--segment-refresh", "3600")
    new = start_shard(tmp_path / "shard-2", "--name", "shard-2", "--sync", "off",
                      "--segment-refresh", "3600")
    router = start_router([s.address for s in shards])
    try:
        with Client(router.address) as client:
            client.create_segment("recent", 'did("visit", within=2s)', allow_unknown=True)
            client.track_batch([{"id": f"v{i}", "event": "visit"} for i in range(200)])
            assert client.count('in_segment("recent")') == 200
        watcher = Watcher(router.address, ("recent",), initial=True).started()
        time.sleep(2.5)  # every visit is older than the window now; no refresh came
        add_shard(router.address, new.address, "--journal", str(tmp_path / "journal.json"))
        with Client(router.address) as client:
            assert client.count('did("visit", within=2s)') == 0
            truth = members(client, "recent")
        eventually(lambda: replay(watcher.events).get("recent", set()) == truth,
                   what="the stream to reach the segment's members")
        watcher.close()
    finally:
        router.stop()
        for s in [*shards, new]:
            s.stop()
