"""Snapshot containers: round trip, damage falls back to an older snapshot, CURRENT, prune."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from memstore.storage.snapshot_file import (
    CURRENT,
    SnapshotError,
    SnapshotReader,
    SnapshotWriter,
    load_newest,
    prune,
    snapshot_name,
)

SECTIONS = [("meta", b"{}"), ("profiles", b"a" * 1000), ("profiles", b""), ("index", b"\x00\x01"),
            ("profiles", b"b" * 70_000)]


def make(directory: Path, lsn: int, sections: list[tuple[str, bytes]] = SECTIONS) -> Path:
    with SnapshotWriter.create(directory, lsn) as w:
        for name, payload in sections:
            w.write(name, payload)
        return w.commit()


def test_round_trip_with_repeated_section_names(tmp_path: Path) -> None:
    path = make(tmp_path, 12345)
    assert path.name == "snap-00000000000000012345.snap" == snapshot_name(12345)
    assert (tmp_path / CURRENT).read_text() == path.name + "\n"
    assert not list(tmp_path.glob("*.tmp"))
    reader = load_newest(tmp_path)
    assert reader is not None and reader.path == path and reader.lsn == 12345
    assert list(reader.sections()) == SECTIONS
    assert list(reader.sections()) == SECTIONS  # readable again
    assert reader.section_count == len(SECTIONS) and reader.created_us > 0


def test_empty_directory_has_no_snapshot(tmp_path: Path) -> None:
    assert load_newest(tmp_path) is None
    assert load_newest(tmp_path / "missing") is None


@pytest.mark.parametrize("damage", ["flip_payload", "flip_header", "cut_footer", "cut_middle",
                                    "trailing_garbage", "empty"])
def test_damaged_newest_snapshot_falls_back_to_the_older_one(
        tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    older = make(tmp_path, 100, [("profiles", b"old")])
    newer = make(tmp_path, 200)
    raw = bytearray(newer.read_bytes())
    if damage == "flip_payload":
        raw[len(raw) // 2] ^= 0x01
    elif damage == "flip_header":
        raw[10] ^= 0x01
    elif damage == "cut_footer":
        raw = raw[:-3]
    elif damage == "cut_middle":
        raw = raw[: len(raw) // 2]
    elif damage == "trailing_garbage":
        raw += b"x"
    else:
        raw = bytearray()
    newer.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="memstore.snapshot"):
        reader = load_newest(tmp_path)
    assert reader is not None and reader.path == older and reader.lsn == 100
    assert list(reader.sections()) == [("profiles", b"old")]
    assert any(newer.name in r.getMessage() for r in caplog.records)


def test_huge_section_length_is_damage_not_an_allocation(tmp_path: Path) -> None:
    path = make(tmp_path, 1, [("profiles", b"abc")])
    raw = bytearray(path.read_bytes())
    at = 30 + 4 + len("profiles")  # header, name length, name: then the u64 length
    raw[at: at + 8] = (1 << 31).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    assert load_newest(tmp_path) is None


def test_current_pointing_to_a_missing_file_falls_back(tmp_path: Path) -> None:
    make(tmp_path, 100)
    newer = make(tmp_path, 200)
    newer.unlink()
    reader = load_newest(tmp_path)
    assert reader is not None and reader.lsn == 100


def test_garbage_current_falls_back_to_the_newest_file(tmp_path: Path) -> None:
    make(tmp_path, 100)
    make(tmp_path, 200)
    (tmp_path / CURRENT).write_text("../../etc/passwd\n")
    reader = load_newest(tmp_path)
    assert reader is not None and reader.lsn == 200


def test_current_wins_over_a_newer_uncommitted_pointer(tmp_path: Path) -> None:
    # A crash between renaming snap-200 and replacing CURRENT: both are whole, CURRENT wins.
    make(tmp_path, 200)
    make(tmp_path, 100)
    assert (tmp_path / CURRENT).read_text().strip() == snapshot_name(100)
    reader = load_newest(tmp_path)
    assert reader is not None and reader.lsn == 100


def test_tmp_files_are_never_loaded(tmp_path: Path) -> None:
    w = SnapshotWriter.create(tmp_path, 300)
    w.write("profiles", b"half")
    assert load_newest(tmp_path) is None  # only a .tmp exists
    make(tmp_path, 100)
    reader = load_newest(tmp_path)
    assert reader is not None and reader.lsn == 100
    w.abort()
    assert not list(tmp_path.glob("*.tmp"))


def test_exception_inside_writer_aborts_and_leaves_no_tmp(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), SnapshotWriter.create(tmp_path, 5) as w:
        w.write("profiles", b"x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        w.write("profiles", b"y")


def test_failing_fsync_at_commit_publishes_nothing(tmp_path: Path) -> None:
    make(tmp_path, 100)

    def broken(fd: int) -> None:
        raise OSError(5, "injected fsync failure")

    w = SnapshotWriter.create(tmp_path, 200, fsync=broken)
    w.write("profiles", b"x")
    with pytest.raises(OSError):
        w.commit()
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CURRENT, snapshot_name(100)]
    reader = load_newest(tmp_path)
    assert reader is not None and reader.lsn == 100


def test_prune_keeps_the_newest_good_and_removes_older_and_stray_tmp(tmp_path: Path) -> None:
    for lsn in (100, 200, 300):
        make(tmp_path, lsn)
    (tmp_path / "snap-00000000000000000150.tmp").write_bytes(b"stray")
    in_progress = SnapshotWriter.create(tmp_path, 400)  # newer than any commit: kept
    removed = prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == [snapshot_name(100),
                                               "snap-00000000000000000150.tmp"]
    assert in_progress.tmp.exists()
    in_progress.abort()
    prune(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CURRENT, snapshot_name(300)]


def test_prune_never_deletes_the_only_good_snapshot_behind_a_damaged_one(
        tmp_path: Path) -> None:
    good = make(tmp_path, 100)
    bad = make(tmp_path, 200)
    bad.write_bytes(bad.read_bytes()[:-1])
    assert prune(tmp_path, keep=1) == []
    assert good.exists() and bad.exists()
    reader = load_newest(tmp_path)
    assert reader is not None and reader.path == good


def test_reader_rejects_a_damaged_file_on_construction(tmp_path: Path) -> None:
    from memstore.storage.snapshot_file import SnapshotError

    path = make(tmp_path, 7)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # inside the footer
    path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match=path.name):
        SnapshotReader(path)


def test_sections_read_ahead_by_a_thread_are_the_same_and_damage_still_raises(
        tmp_path: Path) -> None:
    """sections(ahead=N) (start-up's): a thread reads and checks up to N sections ahead;
    the caller gets the same sections, damage raises in the caller once it reaches it, and
    a caller that stops early leaves no thread behind."""
    path = make(tmp_path, 7)
    reader = SnapshotReader(path)
    for ahead in (1, 2, 10):
        assert list(reader.sections(ahead=ahead)) == SECTIONS
    early = reader.sections(ahead=1)
    assert next(early) == SECTIONS[0]
    early.close()
    assert not [t for t in threading.enumerate() if t.name == "snapshot-read-ahead"]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # the footer's crc: every section is handed out before it is checked
    path.write_bytes(bytes(raw))
    got: list[tuple[str, bytes]] = []
    with pytest.raises(SnapshotError, match="footer does not match"):
        got.extend(reader.sections(ahead=2))
    assert got == SECTIONS
    assert not [t for t in threading.enumerate() if t.name == "snapshot-read-ahead"]
