"""`python -m bench.events`: behaviour over time at scale (issue 26).

One job: for seeded events (P profiles x 10 event names over the last 90 UTC days, a
Zipf-like spread: a few people and a few events do most of it), measure

- load-events throughput through a router (`memstore serve --shards K`): Client.load_events,
  the path `memstore load-events` takes, from event dicts, and the CLI itself on a JSON
  Lines file of a slice of them; with each load's CPU an event in the router, the shards
  and the client (on a machine they share, what bounds the rate);
- memory per profile: the growth of the router's and shards' RSS while the events load
  (profiles are created by their first event, so this is everything events cost a
  profile: aggregates, day records, indexes), after the load's snapshots have finished;
- `did("e0", within=30d, at_least=3)` count through the router, from a gRPC client and from
  one on the router's link, against DuckDB over an events table (`GROUP BY id HAVING
  count(*) >= 3` with a date filter) on the same events; the counts must agree before a
  time is reported. A shard keeps the sums of the last windows counted current
  (memstore/index/day_index.py) and moves them to a window near one, so three times are
  reported: cold (windows far from it asked before each timed ask: every cell counted),
  a day on (windows a day or two apart asked in turn, as once the day rolls over) and
  asked again (the kept sums compared).

Days are real UTC days ending today (the shards' own clock), each event one occurrence.
"""

from __future__ import annotations

import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import numpy as np

from bench.cluster import cpu_seconds, descendants
from memstore.index.day_index import WINDOWS

EVENT_NAMES = [f"e{i}" for i in range(10)]
DAYS = 90
DAY_MICROS = 86_400_000_000


def pid(i: int) -> str:
    return f"p{i:08d}"


def generate(profiles: int, per_profile: float, seed: int) -> dict[str, np.ndarray]:
    """Columns of the events: profile index, event index, days ago (0..89), microsecond
    time. Activity per profile is Zipf-like (most do little, a few a lot), event names
    Zipf over the ten, days skewed towards recent ones."""
    rng = np.random.default_rng(seed)
    n = int(profiles * per_profile)
    weights = 1.0 / np.arange(1, profiles + 1) ** 0.6
    who = rng.choice(profiles, size=n, p=weights / weights.sum())
    who = rng.permutation(profiles)[who]  # the busy ones are not the first ids
    names = rng.choice(len(EVENT_NAMES), size=n, p=_zipf(len(EVENT_NAMES), 1.1))
    ago = np.minimum((rng.exponential(30.0, size=n)).astype(np.int64), DAYS - 1)
    today = int(datetime.now(UTC).timestamp() * 1e6) // DAY_MICROS
    second = rng.integers(0, 86_400, size=n)
    at = (today - ago) * DAY_MICROS + second * 1_000_000
    now = int(datetime.now(UTC).timestamp() * 1e6)
    at = np.minimum(at, now - 1_000_000)  # never in the future
    order = np.argsort(at, kind="stable")  # a warehouse export in time order
    return {"who": who[order].astype(np.int64), "name": names[order].astype(np.int8),
            "at": at[order].astype(np.int64)}


def _zipf(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def records(ev: dict[str, np.ndarray], lo: int = 0, hi: int | None = None
            ) -> Iterator[dict[str, Any]]:
    who, name, at = (ev[k][lo:hi].tolist() for k in ("who", "name", "at"))
    for w, e, t in zip(who, name, at, strict=True):
        yield {"id": pid(w), "event": EVENT_NAMES[e], "at": t}


def write_jsonl(ev: dict[str, np.ndarray], path: Path, lo: int, hi: int) -> int:
    with path.open("w") as f:
        for r in records(ev, lo, hi):
            at = datetime.fromtimestamp(r["at"] / 1e6, UTC).isoformat()
            f.write(json.dumps({"id": r["id"], "event": r["event"], "at": at}) + "\n")
    return hi - lo


def _varint_bytes(x: np.ndarray) -> np.ndarray:
    """LEB128 length of each value (7 bits a byte)."""
    n = np.ones(len(x), dtype=np.int64)
    for shift in (7, 14, 21, 28, 35, 42, 49, 56, 63):
        n += x >= (1 << shift)
    return n


def day_record_bytes(ev: dict[str, np.ndarray]) -> dict[str, Any]:
    """What the day records of these events hold, computed from the events (the shards'
    state is these records, so no server is asked): the bytes of the records in the
    profile blobs (memstore/engine/days.py's format, exactly) and of the day bitmaps
    (memstore.index.day_index.DayIndex, roaring's own container bytes), over profiles.
    Dense ids are taken as the profile index, as a shard numbers them in arrival order."""
    from memstore.index.day_index import DayIndex

    day = ev["at"] // DAY_MICROS
    key = (ev["who"] * len(EVENT_NAMES) + ev["name"]) * 100_000 + (day % 100_000)
    cells, counts = np.unique(key, return_counts=True)
    record, cell_day = cells // 100_000, cells % 100_000
    # newest first within a record: sort by record, then day descending
    order = np.lexsort((-cell_day, record))
    record, cell_day, counts = record[order], cell_day[order], counts[order]
    first = np.concatenate(([True], record[1:] != record[:-1]))
    gap = np.concatenate(([0], cell_day[:-1] - cell_day[1:]))
    blob = np.where(first, 4, _varint_bytes(gap)) + _varint_bytes(counts)
    who, name = record // len(EVENT_NAMES), record % len(EVENT_NAMES)
    bitmaps = 0
    for e in range(len(EVENT_NAMES)):
        mine = name == e
        index = DayIndex()
        index.add_many(who[mine].astype(np.uint32), cell_day[mine], counts[mine])
        bitmaps += index.memory_bytes()
    profiles = len(np.unique(who))
    return {"cells": len(cells), "records": int(first.sum()), "blob_bytes": int(blob.sum()),
            "bitmap_bytes": bitmaps, "bytes_per_profile": (int(blob.sum()) + bitmaps)
            / profiles, "blob_bytes_per_profile": int(blob.sum()) / profiles,
            "bitmap_bytes_per_profile": bitmaps / profiles}


def duckdb_events(ev: dict[str, np.ndarray]) -> Any:
    import duckdb
    import pyarrow as pa

    con = duckdb.connect()
    day = (ev["at"] // DAY_MICROS).astype("datetime64[D]")
    table = pa.table({"id": ev["who"], "event": np.array(EVENT_NAMES)[ev["name"]],
                      "day": day})
    con.register("events_arrow", table)
    con.execute("CREATE TABLE events AS SELECT * FROM events_arrow")
    con.unregister("events_arrow")
    return con


def duckdb_sql(event: str, within: int, at_least: int) -> str:
    first = (datetime.now(UTC).date() - timedelta(days=within - 1)).isoformat()
    return (f"SELECT count(*) FROM (SELECT id FROM events WHERE event = '{event}' AND "
            f"day >= DATE '{first}' GROUP BY id HAVING count(*) >= {at_least})")


def median_ms(fn: Callable[[], Any], reps: int) -> float:
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e3


def run(profiles: int, per_profile: float, shards: int, seed: int, reps: int,
        cli_events: int, log: Callable[[str], None]) -> dict[str, Any]:
    from bench.cluster import Proc, client, tree_rss, wait_quiet

    t = time.perf_counter()
    ev = generate(profiles, per_profile, seed)
    n = len(ev["who"])
    active = len(np.unique(ev["who"]))
    res: dict[str, Any] = {"profiles": profiles, "active_profiles": active, "events": n,
                           "event_names": len(EVENT_NAMES), "days": DAYS, "shards": shards}
    log(f"{n:,} events of {active:,} profiles generated in {time.perf_counter() - t:.1f}s")
    tmp = tempfile.TemporaryDirectory(prefix="bench-events-")
    proc = Proc(["serve", "--shards", str(shards), "--port", "0", "--data-dir",
                 str(Path(tmp.name) / "data"), "--sync", "off"],
                f"memstore serve --shards {shards}")
    try:
        c = client(proc.addr)
        rss0 = tree_rss(proc.proc.pid)
        cli_n = min(cli_events, n // 10)
        main_hi = n - cli_n
        cpu = _CpuSplit(proc.proc.pid)
        t = time.perf_counter()
        loaded = c.load_events(records(ev, 0, main_hi), progress=False)
        secs = time.perf_counter() - t
        res["load_client"] = {"events": loaded, "seconds": secs, "events_per_s": loaded / secs,
                              "cpu_us": cpu.per_event(loaded)}
        log(f"  Client.load_events: {loaded:,} events in {secs:.1f}s = "
            f"{loaded / secs:,.0f}/s (CPU an event: {_cpu_text(res['load_client'])})")
        if cli_n:
            path = Path(tmp.name) / "events.jsonl"
            write_jsonl(ev, path, main_hi, n)
            cpu = _CpuSplit(proc.proc.pid)
            t = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "memstore.cli", "load-events",
                                   str(path), "--address", proc.addr, "--no-progress"],
                                  check=True, capture_output=True, text=True)
            secs = time.perf_counter() - t
            res["load_cli"] = {"events": cli_n, "seconds": secs, "events_per_s": cli_n / secs,
                               "output": done.stdout.strip(), "cpu_us": cpu.per_event(cli_n)}
            log(f"  memstore load-events (JSON Lines): {cli_n:,} events in {secs:.1f}s = "
                f"{cli_n / secs:,.0f}/s ({done.stdout.strip()}; CPU an event: "
                f"{_cpu_text(res['load_cli'])})")
        res["waited_for_snapshots_s"] = wait_quiet(proc.proc.pid)
        rss = tree_rss(proc.proc.pid)
        res["memory"] = {"rss_before": rss0, "rss_after": rss,
                         "bytes_per_profile": (rss - rss0) / active,
                         "bytes_per_event": (rss - rss0) / n}
        log(f"  RSS growth {(rss - rss0) / 2**20:,.0f} MiB: "
            f"{(rss - rss0) / active:,.0f} bytes a profile, {(rss - rss0) / n:,.1f} an event")
        res["day_records"] = d = day_record_bytes(ev)
        log(f"  day records: {d['bytes_per_profile']:,.1f} bytes a profile "
            f"({d['blob_bytes_per_profile']:,.1f} in blobs, {d['bitmap_bytes_per_profile']:,.1f}"
            f" in day bitmaps; {d['cells']:,} (profile, event, day) cells)")
        con = duckdb_events(ev)
        fast = client(proc.addr, link=True)  # the same counts over the router's link
        queries = []
        today = datetime.fromtimestamp(time.time(), UTC).date()
        for event, within, least in (("e0", 30, 3), ("e3", 30, 3), ("e0", 90, 10),
                                     ("e1", 7, 1)):
            text, sql = f'did("{event}", within={within}d, at_least={least})', \
                duckdb_sql(event, within, least)
            # A shard keeps the sums of the last WINDOWS windows counted and moves a kept
            # window's sums to a window near it. Cold: before each timed ask, WINDOWS
            # windows far from it are asked (their days hold few of its cells), so it
            # counts every cell. A day on: windows a day or two apart asked in turn, as
            # after the day rolls over. Again: the same window asked again.
            far = [f'did("{event}", from="{today - timedelta(DAYS - 1 - 10 * k)}", '
                   f'to="{today - timedelta(DAYS - 10 - 10 * k)}", at_least=2)'
                   for k in range(WINDOWS)]
            near = [f'did("{event}", within={within + k}d, at_least={least})'
                    for k in range(WINDOWS + 1)]
            for k, asked in enumerate(near):
                got = int(c.count(asked))
                want = int(con.execute(duckdb_sql(event, within + k, least)).fetchone()[0])
                if got != want:
                    raise RuntimeError(f"{asked}: memstore counts {got}, DuckDB {want}")

            def cold(text: str = text, far: list[str] = far) -> float:
                for asked in far:
                    c.count(asked)
                t = time.perf_counter()
                c.count(text)
                return time.perf_counter() - t
            cold_ms = statistics.median(cold() for _ in range(reps)) * 1e3
            turn = itertools.cycle(near)
            near_ms = median_ms(lambda turn=turn: c.count(next(turn)), reps)  # type: ignore[misc]
            got = int(c.count(text))
            router_ms = median_ms(lambda text=text: c.count(text), reps)  # type: ignore[misc]
            link_ms = median_ms(lambda text=text: fast.count(text), reps)  # type: ignore[misc]
            duck_ms = median_ms(lambda sql=sql: con.execute(sql).fetchone(), reps)  # type: ignore[misc]
            queries.append({"query": text, "sql": sql, "count": got, "router_ms": router_ms,
                            "link_ms": link_ms, "cold_ms": cold_ms, "near_ms": near_ms,
                            "duckdb_ms": duck_ms})
            log(f"  {text}: {got:,} profiles; router {router_ms:.2f} ms (its link "
                f"{link_ms:.2f} ms; cold {cold_ms:.2f} ms; a day on {near_ms:.2f} ms), "
                f"DuckDB {duck_ms:.2f} ms")
        res["queries"] = queries
        con.close()
        c.close()
        fast.close()
        return res
    finally:
        proc.stop()
        tmp.cleanup()


class _CpuSplit:
    """CPU seconds spent from now on by the router (the `serve` process), its shards (its
    children) and this side (this process and the commands it ran): where a load's CPU
    goes on a machine they share, and what bounds the rate when it is saturated."""

    def __init__(self, serve: int) -> None:
        self.router = serve
        self.shards = [pid for pid, depth in descendants(serve).items() if depth == 1]
        self.start = self._now()

    def _now(self) -> tuple[float, float, float]:
        mine = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (cpu_seconds(self.router), sum(map(cpu_seconds, self.shards)),
                mine.ru_utime + mine.ru_stime + kids.ru_utime + kids.ru_stime)

    def per_event(self, events: int) -> dict[str, float]:
        """µs of CPU an event since the start: router, shards (together), client."""
        spent = [(b - a) / max(events, 1) * 1e6
                 for a, b in zip(self.start, self._now(), strict=True)]
        return dict(zip(("router", "shards", "client"), spent, strict=True))


def _cpu_text(load: dict[str, Any]) -> str:
    cpu = load["cpu_us"]
    return (f"router {cpu['router']:.2f} µs, shards {cpu['shards']:.2f}, "
            f"client {cpu['client']:.2f}, {sum(cpu.values()):.2f} in all")


def markdown(res: dict[str, Any]) -> str:
    head = (f"{res['events']:,} events of {res['active_profiles']:,} profiles (of "
            f"{res['profiles']:,} drawn), {res['event_names']} event names over "
            f"{res['days']} days, {res['shards']} shards behind the router.")
    lines = [head, ""]
    lc = res["load_client"]
    lines.append(f"- Client.load_events through the router: {lc['events_per_s']:,.0f} "
                 f"events/s ({lc['events']:,} in {lc['seconds']:.1f} s; CPU an event: "
                 f"{_cpu_text(lc)})")
    if "load_cli" in res:
        cl = res["load_cli"]
        lines.append(f"- `memstore load-events` (JSON Lines): {cl['events_per_s']:,.0f} "
                     f"events/s ({cl['events']:,} in {cl['seconds']:.1f} s; CPU an event: "
                     f"{_cpu_text(cl)})")
    m = res["memory"]
    lines.append(f"- memory: {m['bytes_per_profile']:,.0f} bytes a profile "
                 f"({m['bytes_per_event']:,.1f} an event), RSS of router and shards")
    if "day_records" in res:
        d = res["day_records"]
        lines.append(f"- day records alone: {d['bytes_per_profile']:,.1f} bytes a profile "
                     f"({d['blob_bytes_per_profile']:,.1f} in profile blobs, "
                     f"{d['bitmap_bytes_per_profile']:,.1f} in day bitmaps), "
                     f"{d['cells']:,} (profile, event, day) cells")
    lines += ["", ("| query | profiles | cold ms, gRPC | a day on ms, gRPC | asked again ms, "
                   "gRPC | asked again ms, router's link | DuckDB ms |"),
              "|---|---|---|---|---|---|---|"]
    for q in res["queries"]:
        lines.append(f"| `{q['query']}` | {q['count']:,} | {q['cold_ms']:.2f} | "
                     f"{q['near_ms']:.2f} | {q['router_ms']:.2f} | {q['link_ms']:.2f} | "
                     f"{q['duckdb_ms']:.2f} |")
    return "\n".join(lines)


@click.command()
@click.option("--profiles", type=int, default=1_000_000, show_default=True)
@click.option("--per-profile", type=float, default=5.0, show_default=True,
              help="Events a profile on average.")
@click.option("--shards", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=26, show_default=True)
@click.option("--reps", type=int, default=30, show_default=True,
              help="Repetitions of each timed query.")
@click.option("--cli-events", type=int, default=500_000, show_default=True,
              help="Events loaded with `memstore load-events` from JSON Lines (the rest "
                   "through Client.load_events).")
@click.option("--out", type=click.Path(path_type=Path), default=None)
def main(profiles: int, per_profile: float, shards: int, seed: int, reps: int,
         cli_events: int, out: Path | None) -> None:
    """Events at scale: load throughput, memory a profile, did() counts against DuckDB."""
    res = run(profiles, per_profile, shards, seed, reps, cli_events,
              lambda s: print(s, file=sys.stderr, flush=True))
    if out is not None:
        out.write_text(json.dumps(res, indent=1))
    click.echo(markdown(res))


if __name__ == "__main__":
    main()
