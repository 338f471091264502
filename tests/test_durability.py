"""A shard's log and snapshots: restart equivalence, erasure, torn tails, damage, faults."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pyroaring import BitMap

from memstore.engine.change import ADD_TO_SET, INCREMENT, SET, UNSET, UpsertSpec
from memstore.engine.columnar import Columns
from memstore.errors import InvalidArgument, Unavailable
from memstore.hashslot import SLOT_COUNT
from memstore.pbvalues import datetime_to_micros
from memstore.query import parse
from memstore.query.evaluate import evaluate
from memstore.shard import Shard, ShardConfig
from memstore.storage.snapshot_file import CURRENT, snapshot_name
from memstore.storage.wal_reader import LogCorruptError
from tests.test_cli import memstore

T0 = datetime(2025, 1, 1, tzinfo=UTC)
QUERIES = ['country = "US"', "age BETWEEN 20 AND 40", 'tags HAS "b"', "score > 0.5",
           'NOT country IN ("US","CA") AND exists(age)', f'seen >= "{(T0 + timedelta(days=5)).isoformat()}"',
           "ALL"]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def open_shard(data: Path, **kw: Any) -> Shard:
    return await Shard.open(ShardConfig(data_dir=data, **kw))


def state_of(shard: Shard) -> tuple[Any, ...]:
    engine = shard.engine
    profiles = {}
    for pid, dense in engine.dense_of.items():
        p = engine.profile(dense)
        profiles[pid] = (p.version, p.attributes, sorted(p.identifiers), sorted(p.merged_ids))
    answers = {q: sorted(engine.ids_of(evaluate(engine, parse(q)))) for q in QUERIES}
    claims = dict(sorted(engine.claims.in_slots(range(SLOT_COUNT)).items()))
    even = sorted(engine.ids_of(engine.members_of_slots(range(0, SLOT_COUNT, 2))))
    return profiles, answers, dict(engine.aliases), claims, even


def a_load(rng: random.Random) -> Columns:
    """A columnar bulk batch: mostly new profiles (the fast path), sometimes naming a
    profile or an identifier that exists (the general path)."""
    n = rng.randrange(1, 80)
    ids = [f"L{rng.randrange(10**9)}" for _ in range(n)]
    if rng.random() < 0.3:
        ids[0] = f"p{rng.randrange(40)}"
    return Columns(ids, {
        "country": [rng.choice(["US", "CA", None]) for _ in ids],
        "age": [rng.choice([None, rng.randrange(10, 70)]) for _ in ids],
        "tags": [rng.choice([None, [], ["a", "b"], ["c"]]) for _ in ids],
        "seen": [datetime_to_micros(T0 + timedelta(days=rng.randrange(10))) for _ in ids]},
        [[["email", f"e{rng.randrange(30)}"]] if rng.random() < 0.1 else
         [["device", f"d{rng.randrange(10**9)}"]] for _ in ids], frozenset({"seen"}))


async def random_writes(shard: Shard, rng: random.Random, n: int) -> None:
    engine = shard.engine
    for _ in range(n):
        pid = f"p{rng.randrange(40)}"
        roll = rng.random()
        if roll < 0.05:
            change = engine.plan_columns(a_load(rng))
        elif roll < 0.6:
            ops = [(SET, "country", rng.choice(["US", "CA", "DE"])),
                   (SET, "age", rng.randrange(10, 70)), (SET, "score", rng.random()),
                   (SET, "seen", T0 + timedelta(days=rng.randrange(10))),
                   (ADD_TO_SET, "tags", [rng.choice("abc")]), (INCREMENT, "n", 1)]
            if rng.random() < 0.2:
                ops.append((UNSET, "age", None))
            change = engine.plan_upsert(UpsertSpec(pid, rng.sample(ops, rng.randrange(1, 6))))
        elif roll < 0.7:
            change = engine.plan_link(pid, [("email", f"e{rng.randrange(30)}")], create=True)
        elif roll < 0.8:  # directory claims: make, take over, release
            holder = rng.choice([None, pid, f"p{rng.randrange(40)}"])
            change = engine.plan_claims([["email", f"e{rng.randrange(30)}",
                                          rng.choice([None, pid]), holder]])
        else:
            change = engine.plan_delete(pid)
        await shard.commit(change)


def test_restart_rebuilds_the_same_state_with_and_without_snapshots(tmp_path: Path) -> None:
    data = tmp_path / "data"

    async def scenario() -> None:
        rng = random.Random(7)
        shard = await open_shard(data)
        await random_writes(shard, rng, 300)
        await shard.snapshot()
        await random_writes(shard, rng, 300)  # these live only in the log
        expected = state_of(shard)
        await shard.close()
        again = await open_shard(data)
        assert state_of(again) == expected
        assert again.recovery["snapshot"] is not None and again.recovery["replayed"] > 0
        await random_writes(again, rng, 100)
        expected = state_of(again)
        await again.snapshot()
        await again.close()
        third = await open_shard(data)
        assert state_of(third) == expected
        await third.close()

    run(scenario())


def test_erased_profile_leaves_no_byte_on_disk_after_snapshot(tmp_path: Path) -> None:
    data = tmp_path / "data"
    marker = "MARKER-7f3a9c-erase-me"

    async def scenario() -> None:
        shard = await open_shard(data)
        for i in range(50):
            await shard.commit(shard.engine.plan_upsert(UpsertSpec(f"keep{i}", [(SET, "x", i)])))
        await shard.snapshot()  # an older snapshot exists before the marker is written
        await shard.commit(shard.engine.plan_upsert(UpsertSpec(
            "victim", [(SET, "note", marker), (SET, "city", marker)],
            identifiers=[("email", f"{marker}@x.io")])))
        await shard.snapshot()  # the marker is now in a snapshot and in the log
        await shard.commit(shard.engine.plan_delete("victim"))
        await shard.snapshot()
        await shard.close()

    run(scenario())
    needle = marker.encode()
    for path in data.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), f"erased data still in {path}"
    reopened = run(open_shard(data))
    assert reopened.engine.lookup("victim") is None and len(reopened.engine) == 50


def test_erasure_before_a_restart_is_still_erased_by_the_next_snapshot(tmp_path: Path) -> None:
    data = tmp_path / "data"
    marker = "MARKER-restart-erase"

    async def before_restart() -> None:
        shard = await open_shard(data)
        await shard.commit(shard.engine.plan_upsert(UpsertSpec("victim", [(SET, "n", marker)])))
        await shard.snapshot()
        await shard.commit(shard.engine.plan_delete("victim"))
        await shard.close()

    async def after_restart() -> None:
        shard = await open_shard(data)
        await shard.snapshot()
        await shard.close()

    run(before_restart())
    run(after_restart())
    for path in data.rglob("*"):
        if path.is_file():
            assert marker.encode() not in path.read_bytes(), f"erased data still in {path}"


def _last_segment(data: Path) -> Path:
    return max((data / "log").glob("*.log"))


def test_torn_record_at_the_end_is_cut_and_start_up_continues(tmp_path: Path) -> None:
    data = tmp_path / "data"

    async def write() -> None:
        shard = await open_shard(data)
        for i in range(10):
            await shard.commit(shard.engine.plan_upsert(UpsertSpec(f"u{i}", [(SET, "x", i)])))
        await shard.close()

    run(write())
    segment = _last_segment(data)
    size = segment.stat().st_size
    with segment.open("r+b") as f:  # a crash in the middle of the last record
        f.truncate(size - 7)
    shard = run(open_shard(data))
    assert shard.recovery["torn_bytes"] > 0
    assert len(shard.engine) == 9 and shard.engine.lookup("u9") is None
    run(shard.close())


def test_damage_in_the_middle_stops_start_up_then_check_and_repair(tmp_path: Path) -> None:
    data = tmp_path / "data"

    async def write() -> None:
        shard = await open_shard(data)
        for i in range(30):
            await shard.commit(shard.engine.plan_upsert(UpsertSpec(f"u{i}", [(SET, "x", i)])))
        await shard.close()

    run(write())
    segment = _last_segment(data)
    raw = bytearray(segment.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    segment.write_bytes(bytes(raw))
    with pytest.raises(LogCorruptError) as info:
        run(open_shard(data))
    assert segment.name in str(info.value) and "offset" in str(info.value)
    check = memstore("check", str(data), check=False)
    assert check.returncode == 1 and segment.name in check.stdout
    repaired = memstore("repair", str(data), "--yes", check=False)
    assert repaired.returncode == 0, repaired.stderr
    assert any(p.name.startswith(segment.name + ".broken") for p in segment.parent.iterdir())
    shard = run(open_shard(data))
    assert 0 < len(shard.engine) < 30
    run(shard.close())


def _failing_fsync(fail: Callable[[], bool]) -> Callable[[int], None]:
    import os

    def fsync(fd: int) -> None:
        if fail():
            raise OSError(5, "injected EIO")
        os.fsync(fd)

    return fsync


def test_failing_fsync_refuses_the_write_and_keeps_reads(tmp_path: Path) -> None:
    broken = {"now": False}

    async def scenario() -> None:
        shard = await open_shard(tmp_path / "data", fsync=_failing_fsync(lambda: broken["now"]))
        await shard.commit(shard.engine.plan_upsert(UpsertSpec("ok", [(SET, "x", 1)])))
        broken["now"] = True
        with pytest.raises(Unavailable):
            await shard.commit(shard.engine.plan_upsert(UpsertSpec("lost", [(SET, "x", 2)])))
        # Not acknowledged and not visible: rolled back in memory.
        assert shard.engine.lookup("lost") is None
        assert shard.engine.profile(shard.engine.lookup("ok")).attributes == {"x": 1}
        assert len(evaluate(shard.engine, parse("x = 2"))) == 0
        broken["now"] = False
        with pytest.raises(Unavailable):  # read-only until restart, never retried
            await shard.commit(shard.engine.plan_upsert(UpsertSpec("later", [(SET, "x", 3)])))
        await shard.close()

    run(scenario())
    shard = run(open_shard(tmp_path / "data"))
    assert shard.engine.lookup("ok") is not None and shard.engine.lookup("later") is None
    run(shard.close())


def test_a_bulk_load_whose_fsync_fails_is_undone_whole(tmp_path: Path) -> None:
    broken = {"now": False}

    async def scenario() -> None:
        shard = await open_shard(tmp_path / "data", fsync=_failing_fsync(lambda: broken["now"]))
        engine = shard.engine
        await shard.commit(engine.plan_upsert(UpsertSpec("ok", [(SET, "x", 1)], [("email", "o")])))
        load = engine.plan_columns(Columns(["l1", "l2"], {"x": [5, 6], "y": ["a", None]},
                                           [[["email", "l1@x"]], []]))
        assert load.load is not None  # the fast path, undone through its before-images
        broken["now"] = True
        with pytest.raises(Unavailable):
            await shard.commit(load)
        assert engine.lookup("l1") is None and engine.lookup(identifier=("email", "l1@x")) is None
        assert engine.lookup(identifier=("email", "o")) == engine.lookup("ok")
        assert [len(evaluate(engine, parse(q))) for q in ("x >= 5", "exists(x)", "ALL")] \
            == [0, 1, 1]
        with pytest.raises(InvalidArgument):  # the load declared y: undone with it
            evaluate(engine, parse('y = "a"'))
        await shard.close()

    run(scenario())
    # Not acknowledged, so a restart may or may not find it in the log (the bytes reached
    # the file; only their fsync failed), but only ever whole.
    shard = run(open_shard(tmp_path / "data"))
    assert len(shard.engine) in (1, 3)
    assert (shard.engine.lookup("l1") is None) == (shard.engine.lookup("l2") is None)
    run(shard.close())


def test_concurrent_writes_share_fsyncs(tmp_path: Path) -> None:
    calls = {"n": 0}

    def counting(fd: int) -> None:
        import os

        calls["n"] += 1
        os.fsync(fd)

    async def scenario() -> None:
        shard = await open_shard(tmp_path / "data", fsync=counting)
        before = calls["n"]
        async def one(i: int) -> None:  # plan and commit back to back, as the server does
            await shard.commit(shard.engine.plan_upsert(UpsertSpec(f"u{i}", [(SET, "x", i)])))

        await asyncio.gather(*[one(i) for i in range(200)])
        assert len(shard.engine) == 200
        assert calls["n"] - before < 100, "group commit should cover many writes per fsync"
        await shard.close()

    run(scenario())


def test_snapshot_is_a_point_in_time_while_writes_continue(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes go on while a snapshot is written (by a forked child): the snapshot file
    alone (no log replay) must answer exactly as the shard did when it began."""
    import time

    import memstore.shard as shard_module
    from memstore.engine.core import Engine
    from memstore.shard import load_snapshot
    from memstore.storage.snapshot_file import load_newest
    from memstore.storage.wal_writer import SyncPolicy

    write = shard_module.write_snapshot_file

    def slow_write(*args: Any) -> Any:  # runs in the child: the parent writes meanwhile
        time.sleep(0.3)
        return write(*args)

    monkeypatch.setattr(shard_module, "write_snapshot_file", slow_write)

    async def scenario() -> tuple[Any, Any]:
        shard = await open_shard(tmp_path / "data", sync=SyncPolicy.OFF)
        rng = random.Random(3)
        await random_writes(shard, rng, 400)
        before = state_of(shard)
        task = asyncio.create_task(shard.snapshot())
        await asyncio.sleep(0)  # the snapshot has forked its writer
        rounds = 0
        while not task.done():
            await random_writes(shard, rng, 20)
            await asyncio.sleep(0.001)
            rounds += 1
        await task
        assert rounds >= 3  # writes really went on while the file was written
        assert state_of(shard) != before
        await shard.close()
        return before, tmp_path / "data" / "snapshots"

    before, snaps = run(scenario())
    reader = load_newest(snaps)
    assert reader is not None
    engine = Engine()
    load_snapshot(engine, reader.sections())
    restored = Shard(ShardConfig(), engine, None)
    assert state_of(restored) == before


def test_a_snapshot_holds_exactly_the_log_before_its_lsn_while_writes_arrive(
        tmp_path: Path) -> None:
    """Writes that land while a snapshot waits for the log's fsync are in the snapshot or
    after its LSN, never both: replay applies each record once. (A tracked batch's index
    columns are deltas: one replayed over a snapshot that held it left counts indexed
    as other numbers than the profiles held, found only by a query after a crash.)"""
    now = int(datetime.now(UTC).timestamp() * 1_000_000) - 3_600_000_000
    pids = [f"p{i}" for i in range(100)]  # a batch of 100 events: the column-at-a-time path

    def batch(shard: Shard) -> Any:
        return shard.commit(shard.engine.plan_track_batch([(p, "buy", now, 1) for p in pids]))

    def counted(shard: Shard, query: str) -> set[str]:
        return set(shard.engine.ids_of(evaluate(shard.engine, parse(query))))

    async def scenario() -> None:
        data = tmp_path / "data"
        shard = await open_shard(data)
        for _ in range(8):
            await batch(shard)
        real_sync, arriving, landed = shard.log.sync_to, [2], []
        snapshot: list[asyncio.Task[Any]] = []

        async def sync_to(lsn: int) -> None:
            await real_sync(lsn)
            if snapshot and asyncio.current_task() is snapshot[0] and arriving[0]:
                arriving[0] -= 1  # a write lands while the snapshot waits for the log
                landed.append(asyncio.create_task(batch(shard)))
                await asyncio.sleep(0)  # planned, logged and applied; its fsync pending

        shard.log.sync_to = sync_to  # type: ignore[method-assign]
        snapshot.append(asyncio.create_task(shard.snapshot()))
        taken = await snapshot[0]
        await asyncio.gather(*landed)
        assert landed  # (as many as the snapshot waited for the log: one, or two)
        count = 8 + len(landed)
        assert counted(shard, f"event.buy.count = {count}") == set(pids)
        await shard.log.close()  # a crash: nothing more reaches the disk
        shard.lock.release()
        again = await open_shard(data)
        assert again.recovery["snapshot"] == taken["path"]
        assert again.recovery["replayed"] == 0  # the snapshot held every record
        assert counted(again, f"event.buy.count = {count}") == set(pids)
        assert not counted(again, f"event.buy.count != {count}")
        await again.close()

    run(scenario())


def test_check_reports_a_damaged_snapshot(tmp_path: Path) -> None:
    data = tmp_path / "data"

    async def write() -> None:
        shard = await open_shard(data)
        await shard.commit(shard.engine.plan_upsert(UpsertSpec("u", [(SET, "x", 1)])))
        await shard.snapshot()
        await shard.close()

    run(write())
    assert memstore("check", str(data)).returncode == 0
    snap = next((data / "snapshots").glob("snap-*.snap"))
    raw = bytearray(snap.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    snap.write_bytes(bytes(raw))
    result = memstore("check", str(data), check=False)
    assert result.returncode == 1 and "DAMAGED" in result.stdout and snap.name in result.stdout


@pytest.mark.parametrize("trigger", ["log size", "time"])
def test_snapshots_are_taken_automatically(tmp_path: Path, trigger: str) -> None:
    data = tmp_path / "data"
    settings = ({"snapshot_log_bytes": 1024, "snapshot_interval": 3600.0}
                if trigger == "log size" else
                {"snapshot_log_bytes": 1 << 30, "snapshot_interval": 0.5})

    async def scenario() -> None:
        shard = await open_shard(data, **settings)
        shard.start_background()
        for i in range(100):
            await shard.commit(shard.engine.plan_upsert(UpsertSpec(f"u{i}", [(SET, "x", i)])))
        for _ in range(50):  # the background task checks once a second
            if list((data / "snapshots").glob("snap-*.snap")):
                break
            await asyncio.sleep(0.1)
        await shard.close()

    run(scenario())
    assert list((data / "snapshots").glob("snap-*.snap")), f"no snapshot by {trigger}"
    reopened = run(open_shard(data))
    assert reopened.recovery["snapshot"] is not None and len(reopened.engine) == 100
    run(reopened.close())



@pytest.mark.parametrize("failure", ["raises", "killed"])
def test_a_failed_snapshot_writer_is_reported_and_the_shard_serves_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """The snapshot is written by a forked child; if it fails or dies, the snapshot call
    says why, nothing is published, and the shard keeps working (the next one succeeds)."""
    import os
    import signal

    import memstore.shard as shard_module

    real = shard_module.write_snapshot_file

    def broken(*args: Any) -> Any:
        if failure == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError("disk on fire")

    async def scenario() -> None:
        shard = await open_shard(tmp_path / "data")
        rng = random.Random(5)
        await random_writes(shard, rng, 100)
        monkeypatch.setattr(shard_module, "write_snapshot_file", broken)
        with pytest.raises(Unavailable) as err:
            await shard.snapshot()
        assert ("disk on fire" if failure == "raises" else "killed by signal 9") in str(err.value)
        assert not list((tmp_path / "data" / "snapshots").glob("snap-*.snap"))
        await random_writes(shard, rng, 20)  # still writable
        monkeypatch.setattr(shard_module, "write_snapshot_file", real)
        info = await shard.snapshot()
        assert Path(info["path"]).exists() and info["profiles"] == len(shard.engine)
        await shard.close()

    run(scenario())


def test_decide_never_answers_committed_for_an_absorb_not_yet_durable(tmp_path: Path) -> None:
    """Decide reads a decision an Absorb applied in memory; if that Absorb's fsync then
    fails, Decide must not have answered "committed" (the loser's shard would drop it)."""
    import threading

    from memstore.engine.core import Engine

    gate = threading.Event()
    armed = {"on": False}

    def fsync(fd: int) -> None:
        if armed["on"]:
            gate.wait(10)
            raise OSError(5, "injected EIO")
        import os

        os.fsync(fd)

    async def scenario() -> None:
        shard = await open_shard(tmp_path / "data", fsync=fsync)
        await shard.commit(shard.engine.plan_upsert(UpsertSpec("s", [(SET, "x", 1)])))
        side = Engine()
        side.apply(side.plan_upsert(UpsertSpec("l", [(SET, "y", 2)], [("email", "l")])))
        loser = side.plan_hold("l", "t1", "s").result
        armed["on"] = True
        absorb = asyncio.ensure_future(shard.commit(shard.engine.plan_absorb(
            "t1", [loser], link=("s", [("email", "l")], False))))
        await asyncio.sleep(0.05)  # the absorb is applied and waits for its fsync
        assert shard.engine.decided["t1"] == ["s", True]
        decide = asyncio.ensure_future(shard.commit(shard.engine.plan_decide("t1", "s")))
        await asyncio.sleep(0.05)
        assert not decide.done(), "Decide answered before the decision was durable"
        gate.set()
        for task in (absorb, decide):
            with pytest.raises(Unavailable):
                await task
        assert "t1" not in shard.engine.decided  # rolled back with the absorb
        await shard.close()

    run(scenario())


@pytest.mark.parametrize("damage", ["a middle byte", "the footer"])
def test_a_snapshot_found_damaged_while_it_loads_is_dropped_whole_for_the_older_one(
        tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    """Start-up reads its snapshot once, checking each section as it loads it: damage
    found after sections were loaded (the footer: after all of them) drops what they
    loaded, and the older snapshot is loaded into a new engine and the log replayed from
    it. (The damaged newest one here is another shard's, so anything of it left behind
    shows.)"""
    data, other = tmp_path / "data", tmp_path / "other"
    rng = random.Random(11)

    async def writes(shard: Shard, n: int, prefix: str) -> None:
        for _ in range(n):  # nothing erased: the older snapshot is kept
            if rng.random() < 0.2:  # new profiles: a load, `rows` in the snapshot
                ids = [f"{prefix}{rng.randrange(10**9)}" for _ in range(rng.randrange(1, 80))]
                await shard.commit(shard.engine.plan_columns(Columns(ids, {
                    "tags": [rng.choice([["a"], ["b", "c"]]) for _ in ids],
                    "age": [rng.randrange(10, 70) for _ in ids],
                    "seen": [datetime_to_micros(T0) for _ in ids]}, [[] for _ in ids],
                    frozenset({"seen"}))))
            else:
                await shard.commit(shard.engine.plan_upsert(UpsertSpec(
                    f"{prefix}{rng.randrange(60)}", [(SET, "country", rng.choice(["US", "CA"])),
                                                     (SET, "score", rng.random())])))

    async def scenario() -> None:
        foreign = await open_shard(other)
        await writes(foreign, 300, "other-")
        foreign_snapshot = Path((await foreign.snapshot())["path"])
        await foreign.close()
        shard = await open_shard(data)
        await writes(shard, 150, "p")
        older = (await shard.snapshot())["path"]
        await writes(shard, 150, "p")
        expected = state_of(shard)
        newer = Path(older).parent / snapshot_name(shard.position + 1)
        await shard.close()
        raw = bytearray(foreign_snapshot.read_bytes())
        raw[len(raw) // 2 if damage == "a middle byte" else -1] ^= 0x01
        newer.write_bytes(bytes(raw))
        (newer.parent / CURRENT).write_text(newer.name + "\n")
        with caplog.at_level("WARNING", logger="memstore.snapshot"):
            again = await open_shard(data)
        assert again.recovery["snapshot"] == older and again.recovery["replayed"] > 0
        assert state_of(again) == expected
        assert len(again.engine.live) == len(expected[0])
        await again.close()
        assert any(newer.name in r.getMessage() and "trying an older one" in r.getMessage()
                   for r in caplog.records)

    run(scenario())


def test_ownership_is_in_memory_while_its_record_syncs_and_taken_back_if_that_fails(
        tmp_path: Path) -> None:
    """set_ownership changes the shard's epoch and slots as its record goes into the log,
    before the sync's await (nothing reads a promoted replica saying "primary" at its old
    epoch in between), and a sync that fails restores both and says so (UNAVAILABLE)."""
    async def scenario() -> None:
        shard = await open_shard(tmp_path / "d")
        await shard.set_ownership(3, BitMap(range(0, SLOT_COUNT, 2)))
        assert shard.log is not None
        real = shard.log.sync_to
        seen: list[tuple[int, int | None]] = []

        async def watched(lsn: int) -> None:
            owned = shard.engine.owned_slots
            seen.append((shard.engine.epoch, None if owned is None else len(owned)))
            await real(lsn)

        shard.log.sync_to = watched  # type: ignore[method-assign]
        await shard.set_ownership(4, BitMap(range(10)))
        assert seen == [(4, 10)]

        async def failing(lsn: int) -> None:
            raise OSError("disk gone")

        shard.log.sync_to = failing  # type: ignore[method-assign]
        with pytest.raises(Unavailable, match="ownership not persisted: disk gone"):
            await shard.set_ownership(5, BitMap(range(3)))
        assert shard.engine.epoch == 4 and shard.engine.owned_slots == BitMap(range(10))
        assert shard.engine.visible() == shard.engine.live - shard.engine.foreign
        shard.log.sync_to = real  # type: ignore[method-assign]
        await shard.close()

    run(scenario())


def test_changes_of_ownership_run_one_at_a_time(tmp_path: Path) -> None:
    """Two changes of ownership at once: the second waits for the first's sync, so when
    both syncs fail each takes back only its own change (the shard ends where it was,
    not at the first's unacknowledged epoch), and one asking for a newer epoch compares
    with the epoch the first left."""
    async def scenario() -> None:
        shard = await open_shard(tmp_path / "d")
        await shard.set_ownership(4, BitMap(range(100)))
        assert shard.log is not None
        real = shard.log.sync_to

        async def failing(lsn: int) -> None:
            await asyncio.sleep(0.01)
            raise OSError("disk gone")

        shard.log.sync_to = failing  # type: ignore[method-assign]
        first, second = await asyncio.gather(
            shard.set_ownership(5, BitMap(range(50))),
            shard.set_ownership(6, BitMap(range(10)), newer=True), return_exceptions=True)
        assert isinstance(first, Unavailable) and isinstance(second, Unavailable)
        assert shard.engine.epoch == 4 and shard.engine.owned_slots == BitMap(range(100))
        shard.log.sync_to = real  # type: ignore[method-assign]
        first, second = await asyncio.gather(
            shard.set_ownership(7, BitMap(range(20)), newer=True),
            shard.set_ownership(7, BitMap(range(30)), newer=True), return_exceptions=True)
        assert first is None and "epoch 7 is not newer than this shard's epoch 7" in str(
            second)
        assert shard.engine.epoch == 7 and shard.engine.owned_slots == BitMap(range(20))
        await shard.close()

    run(scenario())
