"""Reading files to load (`memstore load`, `memstore load-events`): JSON Lines, CSV and
Parquet, record by record, each with where it came from, so that a refusal names the file,
the line and the id.

A reader yields `Line`s: a record ready for Client.load, or the reason the line is not one
(malformed JSON, no id, a CSV cell that is not of its attribute's kind), with its position
("people.jsonl:9001", "people.parquet row 17"). Nothing here talks to a server.

How a CSV cell's kind is chosen (docs/user-guide.md "Loading"):
- an attribute the schema declares takes its kind: string cells as they are; int, float,
  bool (true/false, any case) and timestamp (ISO-8601) parsed, a cell that does not parse
  refused; string_list from a JSON array (`["a","b"]`) or items separated by `|`;
- an attribute not declared yet is guessed a column at a time, from every cell of the
  file (a first pass): a column of integers without a leading zero or sign (`0`, `42`,
  `-7`) is int, of numbers (those and `4.5`, `-0.25`, `1e3`) float, of `true` and `false`
  bool, and any other column string, every cell as it is. So a zip code column holding
  `02134` is string, `10001` included; `+1` and `1,000` make their columns strings, and
  so do integers past int64 (ids, most likely: a float would round them);
- an empty cell means "not in this record".
Declare an attribute first (`memstore declare`) when a guess would be wrong: the declared
kind always wins.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from itertools import islice, repeat
from operator import attrgetter, floordiv, methodcaller, sub
from pathlib import Path
from typing import Any, TextIO

import orjson

from memstore.engine.identity import MAX_IDENTIFIER_BYTES, check_identifier
from memstore.engine.schema import INT64_MAX, INT64_MIN, check_name_once
from memstore.engine.values import flatten
from memstore.errors import InvalidArgument

FORMATS = ("jsonl", "csv", "parquet")
_INT = re.compile(r"^-?(0|[1-9][0-9]*)$")
_FLOAT = re.compile(r"^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?$")


@dataclass(slots=True)
class Line:
    """One line (row) of the input: a record, or why it is not one."""

    where: str  # "people.jsonl:9001"
    record: dict[str, Any] | None
    error: str = ""
    text: str = ""  # the line as it was (JSON Lines, CSV), for a rejects file
    # An event line's (key, event, at or None for now, count), checked as
    # Client.load_events takes it: the load sends it as it is, not checking it again
    event: tuple[Any, str, int | None, int] | None = None

    @property
    def id(self) -> str | None:
        """The record's primary id, or (an event's) "kind:value" of its identifier."""
        if self.record is None:
            return None
        pid = self.record.get("id")
        identifier = self.record.get("identifier")
        if pid is None and identifier is not None:
            return f"{identifier[0]}:{identifier[1]}"
        return pid


def format_of(path: Path, given: str | None) -> str:
    return given or {".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower(), "jsonl")


def count_lines(path: Path, fmt: str) -> int | None:
    """How many records the file holds, for a progress bar's total and ETA (CSV: lines
    after the header, an estimate when cells span lines); None if unknown."""
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            return None
        return int(pq.ParquetFile(path).metadata.num_rows)
    lines = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            lines += chunk.count(b"\n")
    if path.stat().st_size and not _ends_with_newline(path):
        lines += 1
    return max(0, lines - 1) if fmt == "csv" else lines


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def header(path: Path, fmt: str) -> list[dict[str, Any]] | None:
    """The declarations an export carries (memstore.client.export): a JSON Lines file's
    first line {"schema": [...]}, a Parquet file's `memstore.schema` metadata; else None.
    ValueError if they are not declarations."""
    if fmt == "jsonl":
        with path.open(encoding="utf-8", errors="surrogateescape") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            raw = json.loads(first) if first.lstrip().startswith('{"schema"') else None
        except ValueError:
            return None
        if not isinstance(raw, dict) or "id" in raw or "schema" not in raw:
            return None
        specs = raw["schema"]
    elif fmt == "parquet":
        meta = _parquet_metadata(path)
        if b"memstore.schema" not in meta:
            return None
        specs = json.loads(meta[b"memstore.schema"])
    else:
        return None
    if not isinstance(specs, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str)
            and isinstance(s.get("kind"), str) for s in specs):
        raise ValueError("the schema line is not a list of {name, kind, ...} declarations")
    return specs


def _parquet_metadata(path: Path) -> dict[bytes, bytes]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("Parquet needs pyarrow: pip install pyarrow") from None
    return dict(pq.ParquetFile(path).schema_arrow.metadata or {})


def read(path: Path, fmt: str, schema: dict[str, str]) -> Iterator[Line]:
    """The lines of `path` in `fmt`; `schema` maps declared attribute names to kinds."""
    if fmt == "jsonl":
        yield from _jsonl(path, schema)
    elif fmt == "csv":
        yield from _csv(path, schema)
    elif fmt == "parquet":
        yield from _parquet(path, schema)
    else:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def _record(raw: Any, where: str, schema: dict[str, str], text: str) -> Line:
    """A JSON object (or Parquet row) as a record to load, or the reason it is not one."""
    if not isinstance(raw, dict):
        return Line(where, None, "a line is a JSON object with an 'id'", text)
    pid = raw.get("id")
    if not isinstance(pid, str) or not pid:
        return Line(where, None, "no 'id' (a non-empty string)", text)
    attributes = raw.get("attributes") or {}
    if not isinstance(attributes, dict):
        return Line(where, None, "'attributes' must be an object", text)
    identifiers = raw.get("identifiers") or []
    if not isinstance(identifiers, list) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p)
            or isinstance(p, dict) and isinstance(p.get("kind"), str)
            and isinstance(p.get("value"), str) for p in identifiers):
        return Line(where, None, "'identifiers' must be [kind, value] pairs", text)
    pairs = [(p["kind"], p["value"]) if isinstance(p, dict) else (p[0], p[1])
             for p in identifiers]
    try:
        flat = flatten(_without_nulls(attributes))
        for name, kind in schema.items():
            value = flat.get(name)
            if kind == "timestamp" and isinstance(value, str):
                flat[name] = _timestamp(value)
        _check_record(flat, pairs)
    except (ValueError, InvalidArgument) as exc:
        return Line(where, {"id": pid}, str(exc), text)
    return Line(where, {"id": pid, "attributes": flat, "identifiers": pairs}, "", text)


_GOOD_KINDS: set[str] = set()  # identifier kinds checked already


def _check_record(attributes: dict[str, Any], identifiers: list[tuple[str, str]]) -> None:
    """What the server would refuse of a record for the record alone, found on its line
    (a refusal then names the file, the line and the id, and --rejects goes on): names,
    identifiers, integers past int64 and NaN."""
    for name, value in attributes.items():
        check_name_once(name, "attributes")
        of = type(value)
        if of is int and not INT64_MIN <= value <= INT64_MAX:
            raise ValueError(f"attributes.{name}: {value} is outside the int64 range")
        if of is float and math.isnan(value):
            raise ValueError(f"attributes.{name}: NaN cannot be stored or compared")
    for kind, text in identifiers:
        if kind not in _GOOD_KINDS or not text or len(text) * 4 > MAX_IDENTIFIER_BYTES:
            check_identifier(kind, text, "identifiers")
            _GOOD_KINDS.add(kind)


def _without_nulls(attributes: dict[str, Any]) -> dict[str, Any]:
    """JSON null means "not given" in a file, as an empty CSV cell or a Parquet null do."""
    return {k: _without_nulls(v) if isinstance(v, dict) else v
            for k, v in attributes.items() if v is not None}


def _timestamp(text: str) -> Any:
    from memstore.query import QueryError, parse_timestamp

    try:
        return parse_timestamp(text)
    except (QueryError, ValueError) as exc:
        raise ValueError(f"not an ISO-8601 timestamp: {exc}") from None


def _jsonl(path: Path, schema: dict[str, str]) -> Iterator[Line]:
    first = True
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            where = f"{path.name}:{n}"
            try:
                raw = json.loads(text)
            except ValueError as exc:
                yield Line(where, None, f"not JSON: {exc}", text.rstrip("\n"))
                continue
            if first and isinstance(raw, dict) and "schema" in raw and "id" not in raw:
                first = False  # an export's schema line: declared before the load (header)
                continue
            first = False
            yield _record(raw, where, schema, text.rstrip("\n"))


def _csv(path: Path, schema: dict[str, str]) -> Iterator[Line]:
    with path.open(encoding="utf-8-sig", newline="") as f:  # (Excel writes a BOM)
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "id" not in reader.fieldnames:
            yield Line(f"{path.name}:1", None, "the header has no 'id' column")
            return
        names = reader.fieldnames
        f.seek(0)
        schema = {**_csv_kinds(f, names, schema), **schema}  # what is declared wins
        f.seek(0)
        reader = csv.DictReader(f)
        for row in reader:
            where = f"{path.name}:{reader.line_num}"
            text = _csv_line(row.values())
            pid = row.pop("id", None)
            if not pid:
                yield Line(where, None, "empty 'id' cell", text)
                continue
            if None in row:  # more cells than the header names
                yield Line(where, {"id": pid}, "more cells than the header has columns", text)
                continue
            try:
                attrs = {name: cell_value(name, cell, schema)
                         for name, cell in row.items() if cell != ""}
            except ValueError as exc:
                yield Line(where, {"id": pid}, str(exc), text)
                continue
            yield Line(where, {"id": pid, "attributes": attrs, "identifiers": []}, "", text)


def _csv_kinds(f: TextIO, names: Sequence[str], schema: dict[str, str]) -> dict[str, str]:
    """The kind of each CSV column the schema does not declare, from all its cells (the
    module docstring): one cell that is not a number makes a column string. Read a block
    of rows at a time, a column at a time (regex matches mapped in C)."""
    reader = csv.reader(f)
    next(reader, None)  # the header
    undecided = {name: i for i, name in enumerate(names) if name != "id" and name not in schema}
    kinds: dict[str, str] = {}
    while undecided and (block := list(islice(reader, 8192))):
        for name, i in list(undecided.items()):
            cells = [row[i] for row in block if len(row) > i and row[i]]
            if not cells:
                continue
            integers = all(map(_INT.match, cells))
            kind = (("int" if all(map(_int64, cells)) else "string") if integers
                    else "float" if all(map(_FLOAT.match, cells))
                    else "bool" if set(cells) <= {"true", "false"} else "string")
            was = kinds.get(name, kind)
            kinds[name] = kind if was == kind else (
                "float" if {was, kind} == {"int", "float"} else "string")
            if kinds[name] == "string":
                del undecided[name]
    return kinds


def _int64(text: str) -> bool:
    """Whether an integer's text is within int64 (up to 18 digits always is)."""
    return len(text) <= 18 or INT64_MIN <= int(text) <= INT64_MAX


def _csv_line(values: Iterable[Any]) -> str:
    """A row's cells as a CSV line again, quoted where they need it (what --rejects keeps:
    a line that reads back as the same cells)."""
    cells: list[Any] = []
    for value in values:
        if isinstance(value, list):  # DictReader's overflow cells
            cells += value
        else:
            cells.append("" if value is None else value)
    _LINE.seek(0)
    _LINE.truncate()
    _LINE_WRITER.writerow(cells)
    return _LINE.getvalue()


_LINE = io.StringIO()
_LINE_WRITER = csv.writer(_LINE, lineterminator="")


def cell_value(name: str, text: str, schema: dict[str, str]) -> Any:
    """A CSV cell's value: the declared kind wins; undeclared attributes are guessed (see
    the module docstring)."""
    kind = schema.get(name)
    if kind is None:
        if _INT.match(text):
            return int(text)
        if _FLOAT.match(text):
            return float(text)
        if text in ("true", "false"):
            return text == "true"
        return text
    if kind == "string":
        return text
    if kind == "int":
        if not _INT.match(text.strip()):
            raise ValueError(f"{name}: {text!r} is not an int (the attribute is declared int)")
        if not _int64(text.strip()):
            raise ValueError(f"{name}: {text} is outside the int64 range")
        return int(text)
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name}: {text!r} is not a number (the attribute is declared "
                             "float)") from None
    if kind == "bool":
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{name}: {text!r} is not true or false (the attribute is "
                             "declared bool)")
        return text.lower() == "true"
    if kind == "timestamp":
        try:
            return _timestamp(text)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    if kind == "string_list":
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError:
                items = None
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ValueError(f"{name}: {text!r} is not a JSON array of strings")
            return items
        return [item for item in text.split("|") if item]
    return text


def _parquet(path: Path, schema: dict[str, str]) -> Iterator[Line]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("Parquet needs pyarrow: pip install pyarrow") from None
    row = 0
    file = pq.ParquetFile(path)
    meta = json.loads((file.schema_arrow.metadata or {}).get(b"memstore.meta_columns", b"[]"))
    for batch in file.iter_batches():
        for values in batch.to_pylist():
            row += 1
            where = f"{path.name} row {row}"
            for column in meta:  # an export's own columns (version, times): not attributes
                values.pop(column, None)
            idents = values.pop("identifiers", None) or []
            pid = values.pop("id", None)
            raw = {"id": pid, "identifiers": idents,
                   "attributes": {k: _parquet_value(v) for k, v in values.items()
                                  if v is not None}}
            yield _record(raw, where, schema, "")


def _parquet_value(value: Any) -> Any:
    """A Parquet cell as a value to send: a timestamp without a time zone (what pandas
    and Spark's TIMESTAMP_NTZ write) is UTC, and a date its midnight UTC, as load-events
    reads them."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    return value


# ---------------------------------------------------------------------- events

EVENT_COLUMNS = ("id", "identifier", "event", "at", "count")


def read_events(path: Path, fmt: str) -> Iterator[Line]:
    """The events of `path` in `fmt`: records {"id" or "identifier", "event", "at" (int
    microseconds since the epoch), "count"} for Client.load_events, or why a line is not
    one. JSON Lines: one object a line; "identifier" a [kind, value] pair, an object
    {"kind", "value"} or "kind:value"; "at" an ISO-8601 string (no offset: UTC), absent
    meaning now; "count" a whole number, absent meaning 1. CSV: a header naming those
    columns (an empty cell: absent). Parquet: those columns ("at" a timestamp or a string).
    A good line's `event` is the same event as a checked tuple, which Client.load_events
    takes as it is (the record is for messages about the line)."""
    if fmt == "jsonl":
        yield from _jsonl_events(path)
    elif fmt == "csv":
        yield from _csv_events(path)
    elif fmt == "parquet":
        yield from _parquet_events(path)
    else:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def _event_record(raw: Any, where: str, text: str) -> Line:
    """A JSON object (CSV, Parquet row) as an event to load, or the reason it is not one."""
    if not isinstance(raw, dict):
        return Line(where, None, "a line is a JSON object with an 'event'", text)
    pid, identifier = raw.get("id"), raw.get("identifier")
    record: dict[str, Any] = {}
    key: Any
    if identifier is not None:
        if pid is not None:
            return Line(where, None, "give 'id' or 'identifier', not both", text)
        if isinstance(identifier, str) and ":" in identifier:
            identifier = identifier.split(":", 1)
        elif isinstance(identifier, dict):
            identifier = [identifier.get("kind"), identifier.get("value")]
        if not (isinstance(identifier, list | tuple) and len(identifier) == 2
                and all(isinstance(x, str) and x for x in identifier)):
            return Line(where, None, "'identifier' must be [kind, value], {\"kind\", "
                        "\"value\"} or \"kind:value\"", text)
        key = record["identifier"] = (identifier[0], identifier[1])
    elif not isinstance(pid, str) or not pid:
        return Line(where, None, "no 'id' (a non-empty string) or 'identifier'", text)
    else:
        key = record["id"] = pid
    event = raw.get("event")
    if not isinstance(event, str) or not event:
        return Line(where, record, "no 'event' (a non-empty string)", text)
    record["event"] = event
    at = raw.get("at")
    if at is not None:
        try:
            at = record["at"] = _event_time(at)
        except ValueError as exc:
            return Line(where, record, f"at: {exc}", text)
    count = raw.get("count")
    if count is None:
        count = 1
    else:
        count = _whole(count)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            return Line(where, record, f"count: {count!r} is not a whole number from 1", text)
        record["count"] = count
    return Line(where, record, "", text, (key, event, at, count))


def _whole(count: Any) -> Any:
    """An event's count as an int where it is a whole number however written: 3, "3",
    3.0 or "3.0" (pandas writes an integer column with gaps as floats, in JSON, CSV and
    Parquet alike); anything else as it is, for the caller to refuse."""
    if isinstance(count, str):
        text = count.strip()
        if _INT.match(text):
            return int(text)
        if _WHOLE_FLOAT.match(text):
            count = float(text)
    if isinstance(count, float) and count.is_integer():
        return int(count)
    return count


_WHOLE_FLOAT = re.compile(r"^[0-9]+\.0*$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


def _event_time(value: Any) -> int:
    """An event's time as int microseconds since the epoch."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO-8601 time") from None
    if not isinstance(value, datetime):  # a number: seconds? microseconds? refused
        raise ValueError(f"{value!r} is not an ISO-8601 time")  # noqa: TRY004 - a value
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH  # exact in whole numbers (a timedelta's floor division was
    # most of a line's time here)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _jsonl_events(path: Path) -> Iterator[Line]:
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        yield from _jsonl_lines(f, 1, path.name)


def _jsonl_lines(texts: Iterable[str], first: int, name: str) -> Iterator[Line]:
    """The Line of each event line of `texts`, the first being line `first` of `name`."""
    # orjson: a quarter of `memstore load-events`' own CPU went to the json module. Lines
    # orjson refuses that json takes (NaN, integers past 64 bits) are not events either.
    loads = orjson.loads
    for n, text in enumerate(texts, first):
        if text.isspace():
            continue
        where = f"{name}:{n}"
        text = text.rstrip("\n")
        try:
            raw = loads(text)
        except ValueError as exc:
            yield Line(where, None, f"not JSON: {exc}", text)
            continue
        yield _event_record(raw, where, text)


# ------------------------------------------------------------ event lines in blocks

BLOCK_LINES = 4096  # JSON lines read as one EventBlock


@dataclass(slots=True)
class EventBlock:
    """Consecutive JSON lines that are all good events, read a column at a time: `events`
    as Client.load_events takes them, the first being line `first` of `name`. A line's
    Line is made only when a message needs it (`line`): the same Line `read_events` gives
    for it."""

    name: str
    first: int
    texts: list[str]
    raws: list[dict[str, Any]]
    events: list[tuple[str, str, int, int]]

    def line(self, i: int) -> Line:
        return _event_record(self.raws[i], f"{self.name}:{self.first + i}",
                             self.texts[i].rstrip("\n"))


def read_event_blocks(path: Path, fmt: str, size: int = BLOCK_LINES
                      ) -> Iterator[Line | EventBlock]:
    """`read_events` for a load: JSON Lines in blocks of `size` lines, each block whose
    lines are all the usual event (an id, an event, an ISO time, a count or none) as one
    EventBlock, any other block line by line as `read_events` reads it. The same events
    in the same order either way, with no Python frame per line in a block: `memstore
    load-events`' own CPU is a share of what the machine gives the load. CSV and Parquet
    come line by line."""
    if fmt != "jsonl":
        yield from read_events(path, fmt)
        return
    name = path.name
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        first = 1
        while texts := list(islice(f, size)):
            block = _event_block(texts, first, name)
            if block is not None:
                yield block
            else:
                yield from _jsonl_lines(texts, first, name)
            first += len(texts)


def _event_block(texts: list[str], first: int, name: str) -> EventBlock | None:
    """The block of `texts` if every line is the usual event, else None (blank lines, bad
    JSON, an identifier, any field _event_record would read otherwise or refuse)."""
    try:
        raws = list(map(orjson.loads, texts))  # (a blank line is not JSON either)
    except ValueError:
        return None
    if set(map(type, raws)) != {dict}:
        return None
    count = len(raws)
    get: Any = dict.get  # (the columns' types are checked here, not declared)
    ids = list(map(get, raws, repeat("id")))
    names = list(map(get, raws, repeat("event")))
    if (set(map(type, ids)) != {str} or "" in ids or set(map(type, names)) != {str}
            or "" in names or list(map(get, raws, repeat("identifier"))).count(None) != count):
        return None
    counts = list(map(get, raws, repeat("count")))
    if counts.count(None) == count:
        counts = [1] * count
    elif set(map(type, counts)) != {int} or min(counts) < 1:
        return None  # (a bool's type is bool; some given, some not: line by line)
    times = list(map(get, raws, repeat("at")))
    if set(map(type, times)) != {str}:
        return None
    try:
        stamps = list(map(datetime.fromisoformat, times))
    except ValueError:
        return None
    zones = list(map(attrgetter("tzinfo"), stamps))
    if None in zones:  # no offset: UTC
        if zones.count(None) != count:
            return None
        stamps = list(map(methodcaller("replace", tzinfo=UTC), stamps))
    micros = list(map(floordiv, map(sub, stamps, repeat(_EPOCH)), repeat(_MICRO)))
    return EventBlock(name, first, texts, raws, list(zip(ids, names, micros, counts)))


def _csv_events(path: Path) -> Iterator[Line]:
    with path.open(encoding="utf-8-sig", newline="") as f:  # (Excel writes a BOM)
        reader = csv.DictReader(f)
        names = reader.fieldnames or []
        if "event" not in names or not ({"id", "identifier"} & set(names)):
            yield Line(f"{path.name}:1", None, "the header needs an 'event' column and an "
                       "'id' or 'identifier' column")
            return
        unknown = [n for n in names if n not in EVENT_COLUMNS]
        if unknown:
            yield Line(f"{path.name}:1", None, f"unknown column {unknown[0]!r} (an event "
                       f"has {', '.join(EVENT_COLUMNS)})")
            return
        for row in reader:
            where = f"{path.name}:{reader.line_num}"
            text = _csv_line(row.values())
            if None in row:
                yield Line(where, None, "more cells than the header has columns", text)
                continue
            yield _event_record({k: v for k, v in row.items() if v != ""}, where, text)


def _parquet_events(path: Path) -> Iterator[Line]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("Parquet needs pyarrow: pip install pyarrow") from None
    row = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for values in batch.to_pylist():
            row += 1
            yield _event_record(_parquet_event(values), f"{path.name} row {row}", "")


def _parquet_event(values: dict[str, Any]) -> dict[str, Any]:
    """A Parquet row's fields as _event_record reads them: nulls left out, a date
    (date32) as its midnight UTC (a JSON line's "2026-09-01" is too)."""
    row = {k: v for k, v in values.items() if v is not None}
    at = row.get("at")
    if isinstance(at, date) and not isinstance(at, datetime):
        row["at"] = datetime(at.year, at.month, at.day, tzinfo=UTC)
    return row
