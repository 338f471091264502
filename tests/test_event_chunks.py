"""A load's event records become request columns: read a column at a time when the chunk
allows it, one record at a time otherwise, and the same events either way."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memstore.client import events as client_events
from memstore.client.events import event_chunks, event_of

NOW = 1_767_323_045_000_000

ids = st.sampled_from(["a", "b", "c-1", ""])
times = st.one_of(st.none(), st.integers(0, 2**62), st.booleans(),
                  st.just("2026-01-02T03:04:05"), st.just(datetime(2026, 1, 2, tzinfo=UTC)))
counts = st.one_of(st.none(), st.integers(-2, 5))


@st.composite
def records(draw: Any) -> Any:
    if draw(st.integers(0, 9)) == 0:  # a Parsed tuple, now and then one of the wrong length
        return draw(st.tuples(ids, st.just("buy"), st.one_of(st.none(), st.integers(0, 10)),
                              st.integers(1, 3), *([st.just(0)] * draw(st.sampled_from(
                                  [0, 0, 0, 1])))))
    record: dict[str, Any] = {"event": draw(st.sampled_from(["buy", "open", ""]))}
    who = draw(st.sampled_from(["id", "id", "id", "identifier", "both", "neither",
                                "id and a null identifier"]))
    if who in ("id", "both", "id and a null identifier"):
        record["id"] = draw(ids)
    if who in ("identifier", "both"):
        record["identifier"] = draw(st.sampled_from([("email", "a@x"), ["crm", 7], "bad"]))
    if who == "id and a null identifier":
        record["identifier"] = None
    if draw(st.booleans()):
        record["at"] = draw(times)
    if draw(st.booleans()):
        record["count"] = draw(counts)
    return record


def reference(batch: list[Any]) -> list[tuple[Any, ...]] | str:
    """The events the records stand for, or the error of the first refused (naming it)."""
    out: list[tuple[Any, ...]] = []
    for i, record in enumerate(batch):
        if isinstance(record, tuple):
            if len(record) != 4:
                return "unpack"
            key, event, at, count = record
            out.append((key, event, NOW if at is None else at, count))
            continue
        try:
            out.append(event_of(record, NOW))
        except (ValueError, TypeError) as exc:
            return f"events[{i}]: {exc}"
    return out


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # one constant patched
@given(batch=st.lists(records(), max_size=12), size=st.integers(1, 5),
       same=st.booleans())
def test_chunks_hold_what_each_record_says(monkeypatch: pytest.MonkeyPatch, batch: list[Any],
                                           size: int, same: bool) -> None:
    if same:  # every record alike: the chunks a column path reads, valid or not
        batch = [batch[0]] * len(batch) if batch else batch
    monkeypatch.setattr(client_events, "now_micros", lambda: NOW)
    expected = reference(batch)
    if isinstance(expected, str):
        with pytest.raises(ValueError) as refused:
            list(event_chunks(batch, size))
        if expected != "unpack":  # (a tuple of the wrong length: Python's own message)
            assert str(refused.value) == expected
        return
    chunks = list(event_chunks(batch, size))
    assert [c.base for c in chunks] == list(range(0, len(batch), size))
    assert [e for c in chunks for e in c.events] == expected
    for c in chunks:  # the columns are what a request carries
        assert c.packed() == client_events.eventpack.pack(
            *map(list, zip(*c.events, strict=True)))
        assert c.packed([c.count - 1]) == client_events.eventpack.pack(
            *map(list, zip(c.events[-1], strict=True)))


def test_a_chunk_of_plain_dicts_is_read_as_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The usual load (ids, int times, some counts) takes the column path, which never
    calls event_of."""
    monkeypatch.setattr(client_events, "now_micros", lambda: NOW)

    def refuse(*_: Any) -> Any:
        raise AssertionError("read one by one")

    monkeypatch.setattr(client_events, "event_of", refuse)
    batch = [{"id": f"u{i}", "event": "buy", "at": i or None, "count": i % 3 or None}
             for i in range(5)]
    [chunk] = event_chunks(batch, 10)
    assert chunk.events == [(f"u{i}", "buy", i or NOW, i % 3 or 1) for i in range(5)]


@given(when=st.datetimes(timezones=st.sampled_from([None, UTC])))
def test_event_times_are_exact_microseconds(when: datetime) -> None:
    from datetime import timedelta

    from memstore.client.loader import _event_time

    aware = when if when.tzinfo else when.replace(tzinfo=UTC)
    exact = (aware - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert _event_time(when.isoformat()) == _event_time(when) == exact


# ------------------------------------------------------------ `memstore load-events` blocks

def _line_text(kind: str, i: int) -> str:
    import json

    at = f"2026-0{1 + i % 9}-1{i % 10}T0{i % 10}:3{i % 10}:00.00000{i % 10}"
    usual = {"id": f"u{i}", "event": "buy", "at": at + "+00:00"}
    return {
        "usual": json.dumps(usual),
        "count": json.dumps({**usual, "count": 1 + i % 3}),
        "naive": json.dumps({**usual, "at": at}),
        "offset": json.dumps({**usual, "at": at + "+02:00"}),
        "identifier": json.dumps({"identifier": f"email:{i}@x", "event": "buy", "at": at}),
        "both": json.dumps({**usual, "identifier": f"email:{i}@x"}),
        "no time": json.dumps({"id": f"u{i}", "event": "buy"}),
        "bad time": json.dumps({**usual, "at": "yesterday"}),
        "bad count": json.dumps({**usual, "count": 0}),
        "string count": json.dumps({**usual, "count": "2"}),
        "no id": json.dumps({"event": "buy", "at": at}),
        "blank": "   ",
        "not json": "{nope",
        "not an object": "[1, 2]",
    }[kind]


@settings(max_examples=150, deadline=None)
@given(kinds=st.lists(st.sampled_from(
    ["usual"] * 12 + ["count", "naive", "offset", "identifier", "both", "no time", "bad time",
                      "bad count", "string count", "no id", "blank", "not json",
                      "not an object"]), max_size=40),
    size=st.integers(1, 9), uniform=st.booleans())
def test_blocks_read_what_lines_read(tmp_path_factory: pytest.TempPathFactory,
                                     kinds: list[str], size: int, uniform: bool) -> None:
    """read_event_blocks gives the Lines read_events gives, in order: a block's Lines
    made from it (its events are theirs), any other line as read_events reads it."""
    from memstore.client.loader import EventBlock, read_event_blocks, read_events

    if uniform and kinds:  # whole blocks of one kind: blocks that may be read as columns
        kinds = [kinds[0]] * len(kinds)
    path = tmp_path_factory.mktemp("blocks") / "e.jsonl"
    path.write_text("".join(_line_text(kind, i) + "\n" for i, kind in enumerate(kinds)))
    expected = [line for line in read_events(path, "jsonl") if line.event is not None
                or line.error]
    got: list[Any] = []
    for item in read_event_blocks(path, "jsonl", size):
        if isinstance(item, EventBlock):
            lines = [item.line(i) for i in range(len(item.events))]
            assert [line.event for line in lines] == item.events
            got += lines
        else:
            got.append(item)
    assert got == expected


@pytest.mark.parametrize("kinds", [["naive", "offset", "usual"], ["usual", "both", "usual"],
                                   ["count", "usual", "count"]])
def test_a_mixed_block_reads_as_its_lines(tmp_path: Path, kinds: list[str]) -> None:
    from memstore.client.loader import EventBlock, read_event_blocks, read_events

    path = tmp_path / "e.jsonl"
    path.write_text("".join(_line_text(kind, i) + "\n" for i, kind in enumerate(kinds)))
    items = list(read_event_blocks(path, "jsonl", 3))
    lines = list(read_events(path, "jsonl"))
    if isinstance(items[0], EventBlock):  # read as columns: the events its lines hold
        assert items[0].events == [line.event for line in lines]
        items = [items[0].line(i) for i in range(len(lines))]
    assert items == lines


def test_usual_lines_are_read_in_blocks(tmp_path: Path) -> None:
    """A file of usual lines (with or without counts, UTC or no offset) comes as blocks."""
    from memstore.client.loader import EventBlock, read_event_blocks

    path = tmp_path / "e.jsonl"
    kinds = ["usual"] * 5 + ["count"] * 5 + ["naive"] * 5 + ["offset"] * 5
    path.write_text("".join(_line_text(kind, i) + "\n" for i, kind in enumerate(kinds)))
    blocks = list(read_event_blocks(path, "jsonl", 5))
    assert all(isinstance(b, EventBlock) for b in blocks) and len(blocks) == 4
