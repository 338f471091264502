"""DATA/HISTORY (memstore/replication/history.py): which positions a primary may stream
from, and what a replica's directory may hold before it follows."""

from __future__ import annotations

from pathlib import Path

import pytest

from memstore.replication import history
from memstore.replication.history import History, HistoryError


def test_a_primary_keeps_its_history_only_where_its_log_keeps_what_it_streamed(
        tmp_path: Path) -> None:
    first = history.for_primary(tmp_path, keep=True, end_lsn=0)
    assert history.for_primary(tmp_path, keep=True, end_lsn=100) == first
    renewed = history.for_primary(tmp_path, keep=False, end_lsn=100)  # --sync everysec/off
    assert renewed.history != first.history  # what it writes from 100 on is another history
    assert (renewed.previous, renewed.until) == (first.history, 100)
    assert renewed.continues(first.history, 100) and not renewed.continues(first.history, 101)
    assert history.read(tmp_path) == renewed


def test_a_promoted_replica_continues_the_history_up_to_its_end(tmp_path: Path) -> None:
    history.write(tmp_path, history.replica_of("old"))
    promoted = history.for_primary(tmp_path, keep=True, end_lsn=5120, shard="shard-0")
    assert (promoted.previous, promoted.until, promoted.shard) == ("old", 5120, "shard-0")
    assert promoted.continues("old", 5120) and promoted.continues("old", 0)
    assert not promoted.continues("old", 5121)  # records the new primary never had
    assert not promoted.continues("other", 10)
    assert promoted.continues(promoted.history or "", 99_999)
    assert history.read(tmp_path) == promoted  # and it is on disk
    assert history.for_primary(tmp_path, keep=True, end_lsn=6000) == promoted


def test_an_interrupted_full_resync_is_emptied_and_refused_as_a_primary(
        tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "00000000000000000000.log").write_bytes(b"x")
    history.write(tmp_path, history.replica_of(None))
    with pytest.raises(HistoryError, match="interrupted full resync"):
        history.for_primary(tmp_path, keep=True, end_lsn=0)
    assert history.for_replica(tmp_path) is None
    assert not (tmp_path / "log").exists()


def test_a_replica_refuses_a_directory_of_a_shard_that_never_replicated(
        tmp_path: Path) -> None:
    assert history.for_replica(tmp_path) is None  # empty: fine
    (tmp_path / "snapshots").mkdir()
    (tmp_path / "snapshots" / "CURRENT").write_text("snap-00000000000000000000.snap\n")
    with pytest.raises(HistoryError, match="Give a replica an empty directory"):
        history.for_replica(tmp_path)
    assert (tmp_path / "snapshots" / "CURRENT").exists()  # nothing deleted


def test_a_damaged_history_file_is_named(tmp_path: Path) -> None:
    (tmp_path / history.FILE).write_text("{not json")
    with pytest.raises(HistoryError, match="HISTORY is damaged"):
        history.read(tmp_path)
    assert History("a").continues("a", 1)
