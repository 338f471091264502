"""DuckDB in-process over the same profiles: table `profiles`, the same queries as SQL.

Columns hold what a user loading the data would hold: VARCHAR for strings, INTEGER / DOUBLE,
TIMESTAMP (UTC, whole seconds), BOOLEAN, and VARCHAR[] LIST columns for interests and tags.
An absent attribute (and an empty list) is NULL. The table is built from Arrow arrays made
straight from the numpy columns, chunk by chunk, so 10M rows never pass through Python objects.
"""

from __future__ import annotations

import time
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from bench.datagen import SCHEMA, Dataset
from bench.queries import Query, sql_col

CHUNK = 1_000_000


def _list_array(mask: np.ndarray, vocab: tuple[str, ...]) -> pa.Array:
    bits = np.unpackbits(mask.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    rows, ks = np.nonzero(bits)
    counts = np.bincount(rows, minlength=mask.size)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    values = pa.array(np.asarray(vocab, dtype=object)[ks], type=pa.string())
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(mask == 0))


def _arrow_chunk(ds: Dataset, lo: int, hi: int) -> pa.RecordBatch:
    arrays: list[pa.Array] = []
    names: list[str] = []
    ids = np.char.add("u", np.char.zfill(np.arange(lo, hi).astype(str), 8))
    arrays.append(pa.array(ids, type=pa.string()))
    names.append("id")
    for a in SCHEMA:
        col = ds.cols[a.name][lo:hi]
        absent = ~ds.present[a.name][lo:hi] if a.name in ds.present else None
        if a.storage == "cat":
            vocab = np.asarray(a.vocab, dtype=object)
            arr = pa.array(vocab[np.maximum(col, 0)], type=pa.string(), mask=col < 0)
        elif a.storage == "list":
            arr = _list_array(col, a.vocab)
        elif a.storage == "int":
            arr = pa.array(col.astype(np.int32), mask=absent)
        elif a.storage == "float":
            arr = pa.array(col.astype(np.float64), mask=absent)
        elif a.storage == "ts":
            arr = pa.array(col.astype("datetime64[s]"), type=pa.timestamp("s"), mask=absent)
        elif a.storage == "bool":
            arr = pa.array(col.astype(bool))
        elif a.storage == "text":
            i = np.arange(lo, hi).astype(str)
            from bench.datagen import EMAIL_DOMAINS

            dom = np.asarray(EMAIL_DOMAINS, dtype=object)[col]
            arr = pa.array(np.char.add(np.char.add("user", i), "@").astype(object) + dom,
                           type=pa.string())
        else:
            raise ValueError(a.storage)
        arrays.append(arr)
        names.append(a.name)
    return pa.RecordBatch.from_arrays(arrays, names=names)


class DuckDBPeer:
    name = "duckdb"
    available = True
    reason = ""

    def __init__(self, ds: Dataset, threads: int | None = None) -> None:
        self.ds = ds
        self.con = duckdb.connect(":memory:")
        if threads:
            self.con.execute(f"SET threads = {int(threads)}")

    def load(self) -> dict[str, Any]:
        t = time.perf_counter()
        first = True
        for lo in range(0, self.ds.size, CHUNK):
            batch = _arrow_chunk(self.ds, lo, min(lo + CHUNK, self.ds.size))
            tbl = pa.Table.from_batches([batch])  # noqa: F841 - read by DuckDB by name
            if first:
                self.con.execute("CREATE TABLE profiles AS SELECT * FROM tbl")
                first = False
            else:
                self.con.execute("INSERT INTO profiles SELECT * FROM tbl")
        seconds = time.perf_counter() - t
        size = self.con.execute(
            "SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchone()
        return {"seconds": seconds, "rows_per_s": self.ds.size / seconds,
                "bytes": int(size[0]) if size and size[0] is not None else None}

    def count(self, q: Query) -> int:
        row = self.con.execute(f"SELECT count(*) FROM profiles WHERE {q.sql}").fetchone()
        assert row is not None
        return int(row[0])

    def ids(self, q: Query, limit: int) -> list[str]:
        rows = self.con.execute(
            f"SELECT id FROM profiles WHERE {q.sql} LIMIT {int(limit)}").fetchall()
        return [r[0] for r in rows]

    def group_by(self, q: Query, attr: str, top_n: int) -> list[tuple[Any, int]]:
        c = sql_col(attr)
        return [(v, int(n)) for v, n in self.con.execute(
            f"SELECT {c}, count(*) AS n FROM profiles WHERE ({q.sql}) AND {c} IS NOT NULL "
            f"GROUP BY 1 ORDER BY n DESC, 1 LIMIT {int(top_n)}").fetchall()]

    def get(self, pid: str) -> dict[str, Any] | None:
        cur = self.con.execute("SELECT * FROM profiles WHERE id = ?", [pid])
        row = cur.fetchone()
        if row is None:
            return None
        return dict(zip([d[0] for d in cur.description], row, strict=True))

    def close(self) -> None:
        self.con.close()
