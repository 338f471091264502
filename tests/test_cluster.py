"""The cluster as operators run it: `memstore serve`, and add-shard under load."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest

from memstore.server.logs import listening_address
from memstore.shard import RecentChanges
from memstore.v1 import cluster_pb2 as cpb
from memstore.v1 import cluster_pb2_grpc, memstore_pb2_grpc
from memstore.v1 import memstore_pb2 as pb
from shards.slots import SLOT_COUNT, from_ranges, slot_of, to_ranges
from tests.conftest import ROOT, add_shard, start_shard
from tests.test_router import RouterThread, everything, start_shards, upsert


def _stub(address: str) -> memstore_pb2_grpc.MemstoreStub:
    return memstore_pb2_grpc.MemstoreStub(grpc.insecure_channel(address))


def _info(address: str) -> cpb.ShardInfo:
    with grpc.insecure_channel(address) as ch:
        return cluster_pb2_grpc.ShardControlStub(ch).GetShardInfo(cpb.ShardInfoRequest(),
                                                                  timeout=5)


def test_serve_restarts_a_killed_shard_and_stops_cleanly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "memstore.cli", "serve", "--shards", "2", "--port", "0",
         "--data-dir", str(data), "--sync", "off", "--stop-timeout", "10",
         "--snapshot-interval", "1", "--blocked-identifier", "nobody@example.com",
         "--max-query-items", "3"],
        cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    lines: list[str] = []
    seen = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "restarted" in line:
                seen.set()

    address = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        assert line, "serve exited:\n" + "".join(lines)
        lines.append(line)
        address = listening_address(line, "supervisor") or ""
        if address:
            break
    threading.Thread(target=pump, daemon=True).start()
    try:
        assert address
        pids = {m.group(1): int(m.group(2)) for line in lines
                if (m := re.search(r"(shard-\d) \(pid (\d+)\) serving", line))}
        assert set(pids) == {"shard-0", "shard-1"}
        state = json.loads((data / "cluster.json").read_text())
        assert [s["name"] for s in state["shards"]] == ["shard-0", "shard-1"]
        stub = _stub(address)
        ids = [f"s-{i}" for i in range(200)]
        stub.BatchUpsert(pb.BatchUpsertRequest(requests=[upsert(p, "Oslo", 1) for p in ids]),
                         timeout=10)
        assert stub.Count(everything(), timeout=10).count == 200
        with pytest.raises(grpc.RpcError) as refused:  # --blocked-identifier reached them
            stub.Upsert(upsert("s-new", "Oslo", 1, email="nobody@example.com"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # --max-query-items reached the router and the shards.
        four = pb.QueryRequest(text='city IN ("a", "b", "c", "d")')
        for served in (address, f"127.0.0.1:{state['shards'][0]['port']}"):
            with pytest.raises(grpc.RpcError) as refused:
                _stub(served).Count(four, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "the limit of 3 (--max-query-items)" in refused.value.details()
        # --snapshot-interval reached the shards: each snapshots a second after writes.
        deadline = time.monotonic() + 20
        while not all(list((data / s / "snapshots").glob("snap-*.snap"))
                      for s in ("shard-0", "shard-1")):
            assert time.monotonic() < deadline, "no automatic snapshot on some shard"
            time.sleep(0.2)

        os.kill(pids["shard-1"], signal.SIGKILL)
        assert seen.wait(30), "supervisor did not restart the shard:\n" + "".join(lines)
        deadline = time.monotonic() + 30
        while True:  # the router finds the restarted shard on the same port
            try:
                assert stub.Count(everything(), timeout=10).count == 200
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert any("exited with status" in line for line in lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, "".join(lines)
    for pid in pids.values():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # a zombie is gone for practical purposes; a live shard is not
        assert Path(f"/proc/{pid}/status").read_text().find("State:\tZ") >= 0


class Load:
    """A steady stream of creates, updates and deletes, and exact-count checks, through the
    router. One writer, so the true number of profiles while a query runs lies between
    (creates acked before it - deletes sent by its end) and (creates sent by its end -
    deletes acked before it); an exact count must fall in that range."""

    runs = 0

    def __init__(self, address: str, preloaded: dict[str, int]) -> None:
        Load.runs += 1
        self.prefix = f"live{Load.runs}-"  # new ids, never those of an earlier load
        self.stub = _stub(address)
        self.acked: dict[str, int] = dict(preloaded)  # id -> last acknowledged "n"
        self.base = len(preloaded)
        self.creates_sent = self.creates_acked = self.deletes_sent = self.deletes_acked = 0
        self.deleted: list[str] = []
        self.errors: list[str] = []
        self.counts = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def writer(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            if n % 10 == 0:
                self._delete(f"{self.prefix}{n - 9}")
                continue
            create = n % 3 != 0
            pid = f"{self.prefix}{n}" if create else f"pre-{n % 500}"  # or update one
            request = pb.UpsertRequest(id=pid, operations=[pb.Operation(
                op=pb.Operation.SET, attribute="n", value=pb.Value(int_value=n))])
            with self.lock:
                self.creates_sent += create
            try:
                self.stub.Upsert(request, timeout=30)
            except grpc.RpcError as exc:
                self.errors.append(f"upsert {pid}: {exc.code()} {exc.details()}")
                continue
            with self.lock:
                self.acked[pid] = n
                self.creates_acked += create

    def _delete(self, pid: str) -> None:
        with self.lock:
            if pid not in self.acked:
                return
            self.deletes_sent += 1
        try:
            reply = self.stub.Delete(pb.DeleteRequest(key=pb.ProfileKey(id=pid)), timeout=30)
        except grpc.RpcError as exc:
            self.errors.append(f"delete {pid}: {exc.code()} {exc.details()}")
            return
        if not reply.deleted:
            self.errors.append(f"delete {pid}: not found")
        with self.lock:
            del self.acked[pid]
            self.deleted.append(pid)
            self.deletes_acked += 1

    def reader(self) -> None:
        while not self.stop.is_set():
            with self.lock:  # t0: what was surely applied before the query
                creates_acked, deletes_acked = self.creates_acked, self.deletes_acked
            began = time.monotonic()
            try:
                count = self.stub.Count(everything(), timeout=30).count
            except grpc.RpcError as exc:
                self.errors.append(f"count: {exc.code()} {exc.details()} after "
                                   f"{time.monotonic() - began:.1f} s")
                continue
            with self.lock:  # t1: what may have been applied by the end of it
                low = self.base + creates_acked - self.deletes_sent
                high = self.base + self.creates_sent - deletes_acked
            if not low <= count <= high:
                self.errors.append(f"count {count} outside [{low}, {high}]")
            self.counts += 1


def _under_load(address: str, acked: dict[str, int], *command: str) -> Load:
    """Run a cluster command while a writer and two exact-count readers run."""
    load = Load(address, acked)
    threads = [threading.Thread(target=load.writer), threading.Thread(target=load.reader),
               threading.Thread(target=load.reader)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    result = subprocess.run(
        [sys.executable, "-m", "memstore.cli", "cluster", *command, "--address", address,
         "--batch-slots", "1024", "--no-progress"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=240)
    time.sleep(0.5)
    load.stop.set()
    for t in threads:
        t.join(60)
    assert result.returncode == 0, result.stderr
    assert load.errors == [], (command[0], load.errors[:10])
    assert load.counts > 5
    load.output = result.stdout  # type: ignore[attr-defined]
    return load


def _check_final(address: str, acked: dict[str, int], shard_addresses: list[str]) -> None:
    stub = _stub(address)
    infos = [_info(a) for a in shard_addresses]
    owned = [from_ranges((r.start, r.end) for r in i.slots) for i in infos]
    assert sum(len(o) for o in owned) == SLOT_COUNT
    assert set().union(*owned) == set(range(SLOT_COUNT))
    assert sum(i.profiles for i in infos) == len(acked)
    assert stub.Count(everything(), timeout=30).count == len(acked)
    ids = [i for m in stub.StreamIds(pb.QueryIdsRequest(query=everything()), timeout=30)
           for i in m.ids]
    assert len(ids) == len(set(ids)) and set(ids) == set(acked)
    keys = [pb.ProfileKey(id=p) for p in acked]
    results = stub.BatchGet(pb.BatchGetRequest(keys=keys), timeout=30).results
    got = {r.profile.id: r.profile.attributes["n"].int_value for r in results if r.found}
    assert got == acked


def _check_identifiers(address: str, preloaded: list[tuple[str, int]]) -> None:
    """Every preloaded profile is still found by its identifier (the claims moved too)."""
    keys = [pb.ProfileKey(identifier=pb.Identifier(kind="email", value=f"{p}@x"))
            for p, _ in preloaded]
    results = _stub(address).BatchGet(pb.BatchGetRequest(keys=keys, attributes=["\x00"]),
                                      timeout=30).results
    assert [r.profile.id if r.found else None for r in results] == [p for p, _ in preloaded]


def _check_deleted(address: str, load: Load) -> None:
    assert load.deleted, "the load deleted nothing"
    keys = [pb.ProfileKey(id=p) for p in load.deleted]
    results = _stub(address).BatchGet(pb.BatchGetRequest(keys=keys), timeout=30).results
    assert not any(r.found for r in results)


def _export(address: str, slots: set[int], after: int = 0, fingerprints: bool = False
            ) -> tuple[dict[str, Any], list[str], int]:
    """Profiles (id -> entry), deletions and newest position of an ExportSlots stream."""
    request = cpb.ExportRequest(slots=[cpb.SlotRange(start=a, end=b) for a, b in
                                       to_ranges(slots)], after_lsn=after,
                                fingerprints=fingerprints)
    profiles: dict[str, Any] = {}
    deleted: list[str] = []
    lsn = 0
    with grpc.insecure_channel(address) as ch:
        for chunk in cluster_pb2_grpc.ShardControlStub(ch).ExportSlots(request, timeout=10):
            body = msgpack.unpackb(chunk.packed, strict_map_key=False)
            profiles.update((entry[0], entry) for entry in body["profiles"])
            deleted += body.get("deleted", [])
            lsn = max(lsn, chunk.lsn)
    return profiles, deleted, lsn


@pytest.mark.parametrize("durable", [True, False], ids=["logged", "in-memory"])
def test_export_after_a_position_carries_only_what_changed_deletions_included(
        tmp_path: Path, durable: bool) -> None:
    shard = start_shard(tmp_path / "s" if durable else None, "--sync", "off")
    try:
        stub = _stub(shard.address)
        ids = [f"e-{i}" for i in range(300)]
        stub.BatchUpsert(pb.BatchUpsertRequest(requests=[upsert(p, "Oslo", 1) for p in ids]),
                         timeout=10)
        moving = {slot_of(p) for p in ids[:150]}
        inside = [p for p in ids if slot_of(p) in moving]
        full, deleted, lsn = _export(shard.address, moving)
        assert set(full) == set(inside) and deleted == []
        assert lsn > 0

        changed, gone, outside = inside[0], inside[1], next(
            p for p in ids if slot_of(p) not in moving)
        stub.Upsert(upsert(changed, "Bergen", 2), timeout=10)
        stub.Upsert(upsert(outside, "Bergen", 2), timeout=10)
        assert stub.Delete(pb.DeleteRequest(key=pb.ProfileKey(id=gone)), timeout=10).deleted
        delta, deleted, newer = _export(shard.address, moving, after=lsn)
        assert set(delta) == {changed} and deleted == [gone]
        assert delta[changed][2]["city"] == "Bergen" and newer > lsn
        assert _export(shard.address, moving, after=newer)[:2] == ({}, [])

        prints, _, _ = _export(shard.address, moving, fingerprints=True)
        assert {p: e[1:] for p, e in prints.items()} == {
            p: [e[1]] for p, e in _export(shard.address, moving)[0].items()}
    finally:
        shard.stop()


def test_an_import_never_deletes_a_profile_in_a_slot_the_shard_owns(tmp_path: Path) -> None:
    shard = start_shard(None)
    try:
        _stub(shard.address).Upsert(upsert("kept", "Oslo", 1), timeout=10)
        packed = msgpack.packb({"schema": [], "profiles": [], "deleted": ["kept"]})
        with grpc.insecure_channel(shard.address) as ch, pytest.raises(grpc.RpcError) as err:
            cluster_pb2_grpc.ShardControlStub(ch).ImportProfiles(
                cpb.ImportRequest(packed=packed), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "owns its slot" in (err.value.details() or "")
        got = _stub(shard.address).Get(pb.GetRequest(key=pb.ProfileKey(id="kept")), timeout=10)
        assert got.profile.id == "kept"
    finally:
        shard.stop()


def test_add_and_remove_shard_under_load_lose_nothing_and_count_exactly(tmp_path: Path
                                                                         ) -> None:
    shards = start_shards(tmp_path, 2)
    new = start_shard(tmp_path / "shard-new", "--name", "shard-2", "--sync", "off")
    router = RouterThread([s.address for s in shards])
    try:
        stub = _stub(router.address)
        acked = {f"pre-{i}": 0 for i in range(500)} | {f"bulk-{i}": -1 for i in range(3000)}
        items = list(acked.items())
        for i in range(0, len(items), 1000):
            stub.BatchUpsert(pb.BatchUpsertRequest(requests=[
                pb.UpsertRequest(id=p, operations=[pb.Operation(
                    op=pb.Operation.SET, attribute="n", value=pb.Value(int_value=n))],
                    identifiers=[pb.Identifier(kind="email", value=f"{p}@x")])
                for p, n in items[i:i + 1000]]), timeout=30)

        journal = tmp_path / "journal.json"
        load = _under_load(router.address, acked, "add-shard", new.address,
                           "--journal", str(journal))
        assert "added shard-2" in load.output  # type: ignore[attr-defined]
        # Catch-up rounds carried the deletions too: no batch needed a full second copy.
        assert "0 batches recopied" in load.output  # type: ignore[attr-defined]
        assert not journal.exists()
        everyone = [*(s.address for s in shards), new.address]
        _check_final(router.address, load.acked, everyone)
        _check_deleted(router.address, load)
        _check_identifiers(router.address, items)
        info = _info(new.address)
        assert abs(sum(r.end - r.start + 1 for r in info.slots) - SLOT_COUNT // 3) <= 1
        assert info.profiles > len(load.acked) // 4

        load = _under_load(router.address, load.acked, "remove-shard", "shard-0",
                           "--journal", str(journal))
        assert "removed shard-0" in load.output  # type: ignore[attr-defined]
        assert _info(shards[0].address).profiles == 0
        assert not _info(shards[0].address).slots
        _check_final(router.address, load.acked, everyone[1:])
        _check_deleted(router.address, load)
        _check_identifiers(router.address, items)
        # The router forgot shard-0: stopping it does not make queries fail.
        shards[0].stop()
        assert stub.Count(everything(), timeout=30).count == len(load.acked)
    finally:
        router.stop()
        for s in [*shards, new]:
            s.stop()


def test_a_shard_removed_while_the_map_refreshes_cuts_no_write_to_another(tmp_path: Path
                                                                          ) -> None:
    """RemoveShard arriving while a refresh waits for the shards' infos: the refresh gives
    each answer to the shard it asked, so no shard takes the removed one's name and link,
    and a write in flight on another shard's link is answered, not cut off."""
    import asyncio

    shards = start_shards(tmp_path, 3)
    drained, kept = _info(shards[0].address), _info(shards[1].address)
    with grpc.insecure_channel(shards[0].address) as ch:  # shard-0 gives shard-1 its slots
        cluster_pb2_grpc.ShardControlStub(ch).SetSlots(cpb.SetSlotsRequest(
            epoch=drained.epoch + 1, slots=[]), timeout=10)
    with grpc.insecure_channel(shards[1].address) as ch:
        cluster_pb2_grpc.ShardControlStub(ch).SetSlots(cpb.SetSlotsRequest(
            epoch=drained.epoch + 2, slots=[*kept.slots, *drained.slots]), timeout=10)
    router = RouterThread([s.address for s in shards])
    try:
        stub = _stub(router.address)
        owned = from_ranges((r.start, r.end) for r in kept.slots)
        ids = [p for p in (f"w-{i}" for i in range(30000)) if slot_of(p) in owned]
        stub.Upsert(upsert(ids[0], "Oslo", 1), timeout=10)  # declared; the link is up
        shard_map = router.router.map
        s1 = shard_map.by_name("shard-1")
        assert s1 is not None and router.run(s1.stub.link.ready())
        link = s1.stub.link
        gate, paused, sent = asyncio.Event(), [], asyncio.Event()
        ask = shard_map._ask

        async def paused_ask(shard: Any) -> Any:
            answer = await ask(shard)
            paused.append(shard.address)
            await gate.wait()
            return answer

        send = link.call

        async def call(*args: Any) -> Any:
            sent.set()  # the frame is written before the call first awaits
            return await send(*args)

        async def race() -> list[asyncio.Task[Any]]:
            shard_map._ask = paused_ask
            refreshing = asyncio.ensure_future(shard_map.refresh())
            while len(paused) < 3:
                await asyncio.sleep(0.001)
            removing = asyncio.ensure_future(shard_map.remove(shards[0].address))
            await asyncio.sleep(0.01)
            return [refreshing, removing]

        tasks = router.run(race())
        link.call = call
        write = stub.BatchUpsert.future(pb.BatchUpsertRequest(
            requests=[upsert(p, "Rome", 2) for p in ids]), timeout=30)
        router.run(sent.wait())  # the batch is in flight on shard-1's link

        async def release() -> None:
            gate.set()
            await asyncio.gather(*tasks)
            del shard_map._ask

        router.run(release())
        assert write.result().applied == len(ids)
        assert [(s.name, s.address) for s in shard_map.shards] == [
            ("shard-1", shards[1].address), ("shard-2", shards[2].address)]
        assert s1.stub.link is link and link.is_up
    finally:
        router.stop()
        for s in shards:
            s.stop()


def test_a_move_interrupted_after_the_freeze_is_finished_by_resume(tmp_path: Path) -> None:
    import asyncio

    from shards import rebalance as rb

    shards = start_shards(tmp_path, 2)
    router = RouterThread([s.address for s in shards])
    try:
        stub = _stub(router.address)
        ids = [f"r-{i}" for i in range(1000)]
        stub.BatchUpsert(pb.BatchUpsertRequest(requests=[upsert(p, "Oslo", 1) for p in ids]),
                         timeout=30)
        journal = rb.Journal(tmp_path / "journal.json")
        moving = set(range(8192 - 300, 8192))  # the last 300 slots of shard-0 go to shard-1

        async def crash_after_freeze() -> None:
            async with rb.Cluster([s.address for s in shards]) as cluster:
                source, target = cluster.nodes
                await rb._copy(source, target, moving)
                epoch = cluster.next_epoch()
                journal.write(source, target, moving, epoch)
                await source.stub.SetSlots(cpb.SetSlotsRequest(
                    epoch=epoch, slots=rb._ranges_pb(source.slots - moving)))
                # ... and the rebalancer dies here: nobody owns `moving`.

        asyncio.run(crash_after_freeze())
        # Writes to a frozen slot wait for an owner; resume gives them one.
        frozen = next(p for p in ids if 8192 - 300 <= slot_of(p) < 8192)
        write = threading.Thread(target=lambda: stub.Upsert(upsert(frozen, "Rome", 2),
                                                            timeout=60))
        write.start()
        result = subprocess.run(
            [sys.executable, "-m", "memstore.cli", "cluster", "resume", "--address",
             router.address, "--journal", str(journal.path)],
            check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "finished the interrupted move" in result.stdout
        write.join(60)
        assert not journal.path.exists()  # type: ignore[union-attr]
        owned = [from_ranges((r.start, r.end) for r in _info(s.address).slots)
                 for s in shards]
        assert moving <= owned[1] and not moving & owned[0]
        assert sum(len(o) for o in owned) == SLOT_COUNT
        assert stub.Count(everything(), timeout=30).count == len(ids)
        got = stub.Get(pb.GetRequest(key=pb.ProfileKey(id=frozen)), timeout=10).profile
        assert got.attributes["city"].string_value == "Rome"
    finally:
        router.stop()
        for s in shards:
            s.stop()


@pytest.mark.parametrize("victim", ["source", "target"])
def test_a_shard_killed_mid_move_restarts_into_a_consistent_cluster(tmp_path: Path,
                                                                    victim: str) -> None:
    """SIGKILL the source or the target between freeze and switch, restart it from its data
    directory on the same port, and `cluster resume` completes the move exactly."""
    import asyncio

    from shards import rebalance as rb

    shards = [start_shard(tmp_path / f"shard-{i}", "--name", f"shard-{i}", "--slots", slots,
                          "--sync", "always")
              for i, slots in enumerate(["0-8191", "8192-16383"])]
    router = RouterThread([s.address for s in shards])
    try:
        stub = _stub(router.address)
        ids = [f"k-{i}" for i in range(1000)]
        stub.BatchUpsert(pb.BatchUpsertRequest(requests=[upsert(p, "Oslo", 1) for p in ids]),
                         timeout=30)
        journal = rb.Journal(tmp_path / "journal.json")
        moving = set(range(8192 - 500, 8192))

        async def crash_after_freeze() -> None:
            async with rb.Cluster([s.address for s in shards]) as cluster:
                source, target = cluster.nodes
                await rb._copy(source, target, moving)
                epoch = cluster.next_epoch()
                journal.write(source, target, moving, epoch)
                await source.stub.SetSlots(cpb.SetSlotsRequest(
                    epoch=epoch, slots=rb._ranges_pb(source.slots - moving)))

        asyncio.run(crash_after_freeze())
        index = 0 if victim == "source" else 1
        dead = shards[index]
        dead.stop(signal.SIGKILL)
        port = dead.address.rsplit(":", 1)[1]
        shards[index] = start_shard(dead.data_dir, "--name", f"shard-{index}", "--sync",
                                    "always", "--port", port)
        assert shards[index].address == dead.address
        result = subprocess.run(
            [sys.executable, "-m", "memstore.cli", "cluster", "resume", "--address",
             router.address, "--journal", str(journal.path)],
            check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "finished the interrupted move" in result.stdout
        owned = [from_ranges((r.start, r.end) for r in _info(s.address).slots)
                 for s in shards]
        assert moving <= owned[1] and not moving & owned[0]
        assert sum(len(o) for o in owned) == SLOT_COUNT
        assert sum(_info(s.address).profiles for s in shards) == len(ids)
        assert stub.Count(everything(), timeout=30).count == len(ids)
        results = stub.BatchGet(pb.BatchGetRequest(keys=[pb.ProfileKey(id=p) for p in ids]),
                                timeout=30).results
        assert all(r.found for r in results)
    finally:
        router.stop()
        for s in shards:
            s.stop()


def test_recent_changes_forget_the_oldest_and_then_say_so() -> None:
    recent = RecentChanges(floor=10, limit=4)
    recent.record(11, ["a", "b"])
    recent.record(12, ["c"])
    assert recent.since(10) == {"a", "b", "c"} and recent.since(11) == {"c"}
    recent.record(13, ["d", "e"])  # 5 ids > limit 4: position 11 is forgotten
    assert recent.floor == 11
    assert recent.since(10) is None  # the caller must copy in full
    assert recent.since(11) == {"c", "d", "e"} and recent.since(13) == set()


def test_a_move_that_separates_merged_ids_from_their_profile_keeps_them_resolving(
        tmp_path: Path) -> None:
    """Merges inside one shard, then add-shard moves the survivor's slot and not the merged
    id's (A), or the merged id's and not the survivor's (B): the merged id and its
    identifier still find the survivor, and writing the id does not make a second
    profile. A survivor erased after a cross-shard merge (its decision kept as a slot,
    --sync off) does not stop the move. Adding the same shard again moves nothing."""
    from memstore import Client
    from shards.slots import plan_add

    shards = start_shards(tmp_path, 2)
    new = start_shard(tmp_path / "shard-new", "--name", "shard-2", "--sync", "off")
    router = RouterThread([s.address for s in shards])
    try:
        moves = plan_add({"shard-0": range(8192), "shard-1": range(8192, SLOT_COUNT)},
                         "shard-2")
        moving = set().union(*(from_ranges(m.slots) for m in moves if m.source == "shard-0"))
        on_0 = [p for p in (f"m-{i}" for i in range(5000)) if slot_of(p) < 8192]
        going = [p for p in on_0 if slot_of(p) in moving]
        staying = [p for p in on_0 if slot_of(p) not in moving]
        cases = [(going[0], staying[0]), (staying[1], going[1])]  # (survivor, merged id)
        with Client(router.address) as c:
            for survivor, merged in cases:
                c.upsert(survivor, {"n": 1})
                c.upsert(merged, {"n": 2}, identifiers=[("email", f"{merged}@x")])
                assert c.link(survivor, [("email", f"{merged}@x")]).merged_ids == [merged]
            loser = next(p for p in (f"x-{i}" for i in range(100)) if slot_of(p) >= 8192)
            c.upsert(loser, {"n": 3}, identifiers=[("email", "cross@x")])
            c.upsert(going[2], {"n": 4})
            c.link(going[2], [("email", "cross@x")])  # a cross-shard merge into going[2]
            c.erase(going[2])  # its decision on shard-0 keeps its slot, not its id
        add_shard(router.address, new.address, "--journal", str(tmp_path / "j.json"))
        with Client(router.address) as c:
            for survivor, merged in cases:
                assert c.get(merged)["id"] == survivor
                assert c.get(identifier=("email", f"{merged}@x"))["id"] == survivor
                assert c.upsert(merged, {"n": 5}).id == survivor  # no second profile
            assert c.count("ALL") == 2  # the two survivors (going[2] and x- erased)
        share = sum(r.end - r.start + 1 for r in _info(new.address).slots)
        add_shard(router.address, new.address, "--journal", str(tmp_path / "j.json"),
                  "--force")
        assert sum(r.end - r.start + 1 for r in _info(new.address).slots) == share
    finally:
        router.stop()
        for s in [*shards, new]:
            s.stop()
