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


def test_restarts_that_may_lose_a_tail_keep_the_line_of_histories(tmp_path: Path) -> None:
    """Under --sync everysec/off each start continues the history before up to the log's
    end then: a position of any earlier history is valid at or before every point where
    the line to the newest split off, however many restarts ago (up to OLDER)."""
    first = history.for_primary(tmp_path, keep=True, end_lsn=0)
    ends = [400, 300, 350]  # the second restart's crash lost a tail of 100
    line = [first]
    for end in ends:
        line.append(history.for_primary(tmp_path, keep=False, end_lsn=end))
    newest = history.read(tmp_path)
    assert newest == line[-1] and len({h.history for h in line}) == 4
    assert newest.continues(first.history, 300) and not newest.continues(first.history, 301)
    assert newest.continues(line[1].history, 300) and not newest.continues(line[1].history, 301)
    assert newest.continues(line[2].history, 350) and not newest.continues(line[2].history, 351)
    assert not newest.continues("unrelated", 0)
    for end in range(history.OLDER + 2):  # the oldest fall out of the line
        newest = history.for_primary(tmp_path, keep=False, end_lsn=1000 + end)
    assert len(newest.older) == history.OLDER and not newest.continues(first.history, 0)
    assert newest.continues(newest.older[-1][0], 0)


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


def test_a_replica_keeps_the_line_when_its_primary_continues_its_history(
        tmp_path: Path) -> None:
    """A replica following history A from position 700 on the history B its primary
    continues A with (a restart under everysec, a promotion) keeps A up to 700 in its
    line, and a promotion of that replica keeps the whole line: positions a watcher read
    from A stay valid wherever the log went."""
    history.write(tmp_path, History("A", "primary", "Z", 400))  # A continues Z up to 400
    history.write(tmp_path, history.replica_of("A"))
    history.write(tmp_path, History("A", "replica", "Z", 400))
    followed = history.followed_on(tmp_path, "B", 700)
    assert (followed.history, followed.role, followed.previous, followed.until) == \
        ("B", "replica", "A", 700)
    assert followed.continues("A", 700) and not followed.continues("A", 701)
    assert followed.continues("Z", 400) and not followed.continues("Z", 401)
    history.write(tmp_path, followed)
    promoted = history.for_primary(tmp_path, keep=True, end_lsn=900, shard="shard-0")
    assert (promoted.previous, promoted.until, promoted.shard) == ("B", 900, "shard-0")
    assert promoted.continues("A", 700) and promoted.continues("Z", 400)
    assert not promoted.continues("A", 701)
    assert history.followed_on(tmp_path / "none", "C", 5) == history.replica_of("C")


def test_a_start_under_sync_always_after_a_run_under_everysec_begins_a_history(
        tmp_path: Path) -> None:
    """The history is kept across a start only when both runs made records durable
    before streaming them: after a run under everysec or off (whose crash may have lost a
    tail that replicas and watchers saw), a start under always still begins a history
    continuing the old one up to its log's end, and only the start after keeps it."""
    first = history.for_primary(tmp_path, keep=False, end_lsn=0)  # a run under everysec
    assert not first.synced and not history.read(tmp_path).synced
    second = history.for_primary(tmp_path, keep=True, end_lsn=300)  # always, after it
    assert second.history != first.history and second.synced
    assert second.continues(first.history, 300) and not second.continues(first.history, 301)
    assert history.for_primary(tmp_path, keep=True, end_lsn=500) == second  # always again
    assert history.read(tmp_path) == second
