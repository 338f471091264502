"""Markdown report and PNG plots from a results dict (the one written to results.json).

Every figure comes with ratios "reference ÷ peer": the reference is memstore when it ran,
otherwise DuckDB (so that the peer-only runs still print comparable ratios).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.queries import BY_NAME, GROUP_BYS, QUERIES

# results["lookups"][system] keys, and how the report names them ("concurrency" is
# client threads for the first two, client processes for the third)
LOOKUP_OPS = {"get": "get", "batch_get": "batch_get",
              "batch_get_processes": "batch_get (processes)"}


def _ref(systems: list[str]) -> str:
    for s in ("memstore", "duckdb", "redis", "numpy"):
        if s in systems:
            return s
    return systems[0]


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _stat_table(title: str, rows: dict[str, dict[str, Any]], note: str = "") -> list[str]:
    systems = sorted({s for r in rows.values() for s in r}, key=lambda s: (
        ["memstore", "duckdb", "redis", "numpy"] + [s]).index(s))
    if not systems:
        return []
    ref = _ref(systems)
    others = [s for s in systems if s != ref]
    out = [f"### {title}", ""]
    if note:
        out += [note, ""]
    head = ["query"] + [f"{s} median ms" for s in systems] + [f"{ref} ÷ {s}" for s in others]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name] + [_fmt(r.get(s, {}).get("median_ms"), 3) for s in systems]
        for s in others:
            a, b = r.get(ref, {}).get("median_ms"), r.get(s, {}).get("median_ms")
            cells.append(_fmt(a / b, 3) if a and b else "–")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "<details><summary>p95 / p99 / max (ms)</summary>", ""]
    head = ["query"] + systems
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name] + ["/".join(_fmt(r.get(s, {}).get(k), 2) for k in (
            "p95_ms", "p99_ms", "max_ms")) for s in systems]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "</details>", ""]
    return out


def markdown(res: dict[str, Any]) -> str:
    m = res["meta"]
    mach = m["machine"]
    out = [f"# memstore benchmark — {m['size']:,} profiles (seed {m['seed']})", "",
           f"Command: `{m['command']}`  ", (f"Machine: {mach['cpus']} CPUs, {mach['cpu']}, "
           f"{mach['memory_bytes'] / 2**30:.0f} GiB, Python {mach['python']}  "),
           f"Started {m['started']}, took {m.get('total_s', '?')} s.", ""]
    for name, why in res.get("unavailable", {}).items():
        out.append(f"- **{name} unavailable**: {why}")
    cc = res.get("crosscheck")
    if cc:
        verdict = "FAILED" if cc["problems"] else "passed"
        out += ["", (f"Cross-check {verdict} across {', '.join(cc['systems'])}: every "
                     "query's count, every group-by and every first id page agree."), ""]
        out += ["| query | count | memstore text |", "|---|---|---|"]
        for q in QUERIES:
            count = cc["counts"].get(q.name, {}).get("numpy")
            out.append(f"| {q.name} | {count} | `{q.memstore}` |")
        out.append("")
        for p in cc["problems"]:
            out.append(f"- MISMATCH {p}")
    for k, v in res.get("errors", {}).items():
        out.append(f"- workload **{k}** failed: {v}")
    out.append("")
    out += ["## Load", "", "| system | seconds | profiles/s | bytes/profile |", "|---|---|---|---|"]
    for name, load in res.get("load", {}).items():
        if load:
            mem = res.get("memory", {}).get(name, {}).get("bytes_per_profile")
            batch = f" ({load['chunk_size']:,} a batch)" if load.get("chunk_size") else ""
            out.append(f"| {name}{batch} | {_fmt(load.get('seconds'))} | "
                       f"{_fmt(load.get('rows_per_s'))} | {_fmt(mem, 0)} |")
    out += ["", *_load_ratios(res), ""]
    qres = res.get("queries")
    if qres:
        out += ["## Segment queries", ""]
        out += _stat_table("Counts", qres["counts"])
        out += _stat_table(f"First id page ({1000} ids)", qres["id_pages"])
        out += _stat_table("Group-by (top 10)", qres["group_bys"],
                           "; ".join(f"{g.name}: {g.attr} over {g.query.name}"
                                     for g in GROUP_BYS))
    lk = res.get("lookups")
    if lk:
        out += ["## Look-ups", "", ("| system | op | concurrency | median ms | p95 | p99 | max"
                                    " | profiles/s |"), "|---|---|---|---|---|---|---|---|"]
        for name, r in lk.items():
            if not r:
                continue
            for op, label in LOOKUP_OPS.items():
                for c, s in r.get(op, {}).items():
                    out.append(f"| {name} | {label} | {c} | {_fmt(s.get('median_ms'), 3)} | "
                               f"{_fmt(s.get('p95_ms'))} | {_fmt(s.get('p99_ms'))} | "
                               f"{_fmt(s.get('max_ms'))} | {_fmt(s.get('throughput_per_s'))} |")
        if "memstore" in lk and "redis" in lk and lk["memstore"] and lk["redis"]:
            ms, rd = lk["memstore"], lk["redis"]
            out += ["", "memstore ÷ redis throughput: " + ", ".join(
                f"{label} c={c}: "
                f"{_fmt(s['throughput_per_s'] / rd[op][c]['throughput_per_s'])}"
                for op, label in LOOKUP_OPS.items() for c, s in ms.get(op, {}).items()
                if c in rd.get(op, {}))]
        out.append("")
    ratios = {"ingest": _ingest_ratios, "mixed": _mixed_ratios}
    for key, title in (("ingest", "Ingest (durable)"), ("mixed", "Mixed 90/10 with queries")):
        block = res.get(key)
        if block:
            out += [f"## {title}", "", "```"]
            for name, r in block.items():
                out.append(f"{name}: {_short(r)}")
            out += ["```", "", *ratios[key](block), ""]
    ratios = {"recovery": _recovery_ratios, "snapshot": _snapshot_ratios}
    for key, title in (("recovery", "Recovery"), ("snapshot", "Latency during a snapshot")):
        if res.get(key):
            out += [f"## {title}", "", "```", _short(res[key]), "```", "",
                    *ratios[key](res), ""]
    return "\n".join(out)


def _ratio(a: float | None, b: float | None) -> str:
    return _fmt(a / b) if a and b else "–"


def _load_ratios(res: dict[str, Any]) -> list[str]:
    load, memory = res.get("load", {}), res.get("memory", {})
    ms = load.get("memstore")
    if not ms:
        return []
    mine = memory.get("memstore", {}).get("bytes_per_profile")
    return [f"memstore ÷ {name}: profiles/s {_ratio(ms.get('rows_per_s'), r.get('rows_per_s'))}, "
            f"bytes/profile {_ratio(mine, memory.get(name, {}).get('bytes_per_profile'))}"
            for name, r in load.items() if r and name != "memstore"]


def _ingest_ratios(block: dict[str, Any]) -> list[str]:
    ms, redis = block.get("memstore") or {}, block.get("redis_aof_always") or {}
    if not ms or not redis:
        return []
    mine, theirs = ms.get("steady_upserts") or {}, redis.get("steady_upserts") or {}
    return [("memstore ÷ redis (AOF always): bulk profiles/s "
             f"{_ratio(ms.get('bulk', {}).get('rows_per_s'), redis['bulk'].get('rows_per_s'))}, "
             f"single upserts/s {_ratio(mine.get('throughput_per_s'), theirs.get('throughput_per_s'))}, "
             f"single upsert p99 {_ratio(mine.get('p99_ms'), theirs.get('p99_ms'))}")]


def _mixed_ratios(block: dict[str, Any]) -> list[str]:
    ms, redis = block.get("memstore") or {}, block.get("redis") or {}
    if not ms or not redis:
        return []
    return ["memstore ÷ redis: " + ", ".join(
        f"{op} p99 {_ratio(ms[op].get('p99_ms'), redis[op].get('p99_ms'))} and per second "
        f"{_ratio(ms[op].get('throughput_per_s'), redis[op].get('throughput_per_s'))}"
        for op in ("get", "upsert", "count") if op in ms and op in redis)]


def _recovery_ratios(res: dict[str, Any]) -> list[str]:
    """Per million profiles: the two systems recover different numbers of profiles."""
    ms = res["recovery"].get("memstore_SIGKILL") or {}
    redis = (res.get("ingest", {}).get("redis_aof_always") or {})
    if not ms or not redis.get("restart_answered_s"):
        return []
    mine = ms["answered_s"] / res["meta"]["size"] * 1e6
    theirs = redis["restart_answered_s"] / redis["recovery_profiles"] * 1e6
    return [(f"seconds per million profiles until the first answer after a restart: memstore "
            f"{_fmt(mine)} (SIGKILL), redis AOF {_fmt(theirs)}; memstore ÷ redis "
            f"{_ratio(mine, theirs)}")]


def _snapshot_ratios(res: dict[str, Any]) -> list[str]:
    snap = res["snapshot"]
    base, during = snap.get("baseline", {}), snap.get("during", {})
    return [(f"during ÷ before (memstore's own baseline is the peer here): median "
            f"{_ratio(during.get('median_ms'), base.get('median_ms'))}, p99 "
            f"{_ratio(during.get('p99_ms'), base.get('p99_ms'))}")]


def _short(o: Any) -> str:
    """Nested results without the raw samples."""
    if isinstance(o, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in o.items()
                               if k != "samples_ms") + "}"
    if isinstance(o, float):
        return _fmt(o, 3)
    return str(o)


def plots(res: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    q = res.get("queries")
    if q:
        systems = sorted({s for r in q["counts"].values() for s in r})
        fig, ax = plt.subplots(figsize=(14, 6))
        width = 0.8 / len(systems)
        for k, s in enumerate(systems):
            data = [q["counts"][qn.name].get(s, {}).get("samples_ms", [0]) for qn in QUERIES]
            pos = [i + k * width for i in range(len(QUERIES))]
            bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True,
                            showfliers=False)
            for b in bp["boxes"]:
                b.set_facecolor(f"C{k}")
            ax.plot([], [], color=f"C{k}", label=s, linewidth=6)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(QUERIES))])
        ax.set_xticklabels([qn.name for qn in QUERIES], rotation=45, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("count latency, ms (log)")
        ax.set_title(f"Segment count latency, {res['meta']['size']:,} profiles")
        ax.legend()
        fig.tight_layout()
        p = out / "query_latency.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    lk = {k: v for k, v in res.get("lookups", {}).items() if v}
    if lk:
        fig, axes = plt.subplots(1, 2, figsize=(12, 5))
        for ax, op in zip(axes, ("get", "batch_get"), strict=True):
            for name, r in lk.items():
                cs = sorted(r[op], key=int)
                ax.plot([int(c) for c in cs], [r[op][c]["throughput_per_s"] for c in cs],
                        marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("client concurrency")
            ax.set_ylabel("profiles / s")
            ax.set_title(op)
            ax.legend()
        fig.tight_layout()
        p = out / "lookup_throughput.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, r in lk.items():
            c = max(r["get"], key=int)
            ax.hist(r["get"][c]["samples_ms"], bins=60, alpha=0.5, label=f"{name} get c={c}")
        ax.set_xlabel("ms")
        ax.set_title("Get latency distribution")
        ax.legend()
        fig.tight_layout()
        p = out / "get_latency.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    return written


__all__ = ["BY_NAME", "markdown", "plots"]
