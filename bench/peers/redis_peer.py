"""Redis with RediSearch, started by the suite on a loopback port in a temporary directory.

Debian ships RediSearch 1.2 (`redis-redisearch`), whose documents are added with FT.ADD (it
stores the hash under the document id and indexes it; a plain HSET is not indexed in 1.x).
Strings, bools and lists are TAG fields (lists comma-separated), numbers and timestamps
(epoch seconds) NUMERIC fields, and `_has` lists the attributes a document holds, because
1.x has no exists operator. The module runs with TIMEOUT 0 and SAFEMODE: its default policy returns
partial results on timeout, which would make counts silently wrong.

With `attributes`, documents hold and the index covers only those attributes (`_has` too):
the narrow form that lets RediSearch hold 10M profiles here for one query's timing. A query
reads the same posting lists and numeric ranges either way, and the smaller documents and
index only favour RediSearch.

If redis-server or the module is missing, the peer says so in `reason` and is skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

from bench.datagen import SCHEMA, Dataset, iter_records
from bench.queries import Query, redis_field

MODULE_PATHS = ("/usr/lib/redis/modules/redisearch.so", "/usr/lib/redis/redisearch.so")
INDEX = "idx"
BATCH = 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _field_args(attrs: dict[str, Any], keep: frozenset[str] | None = None) -> list[Any]:
    args: list[Any] = []
    has = []
    for name, v in attrs.items():
        if keep is not None and name not in keep:
            continue
        f = redis_field(name)
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, list):
            v = ",".join(v)
        elif hasattr(v, "timestamp"):
            v = int(v.timestamp())
        elif isinstance(v, float):
            v = repr(v)
        args += [f, v]
        has.append(f)
    args += ["_has", ",".join(has)]
    return args


class RedisPeer:
    name = "redis"

    def __init__(self, ds: Dataset, aof_always: bool = False,
                 attributes: frozenset[str] | None = None) -> None:
        self.ds = ds
        self.aof_always = aof_always
        self.attributes = attributes  # None: every attribute of the schema
        # SAFEMODE: index and query on the main thread. 1.2's concurrent mode spends most
        # of FT.ADD in thread hand-offs (3k/s against 13k/s here).
        self.module_args: list[str] = ["SAFEMODE"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: str | None = None
        self.available = True
        self.reason = ""
        self.server = shutil.which("redis-server")
        self.module = next((p for p in MODULE_PATHS if os.path.exists(p)), None)
        if self.server is None:
            self.available, self.reason = False, "redis-server not installed (apt redis-server)"
        elif self.module is None:
            self.available = False
            self.reason = "RediSearch module not installed (apt redis-redisearch)"
        try:
            import redis  # noqa: F401
        except ImportError:
            self.available, self.reason = False, "python package redis missing (pip install redis)"
        if self.available:
            self.start()

    # ---- process -------------------------------------------------------------------------
    def start(self, keep_dir: bool = False) -> None:
        import redis

        if not keep_dir or self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.port = _free_port()
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof_always else [
            "--appendonly", "no"]
        assert self.server is not None and self.module is not None
        self.proc = subprocess.Popen(
            [self.server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", self.dir, *aof, "--loadmodule", self.module, "TIMEOUT", "0", *self.module_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.r = redis.Redis(port=self.port, decode_responses=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.r.ping():
                    break
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None:
                    raise RuntimeError("redis-server exited at start") from None
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer in 60 s")
            time.sleep(0.02)

    def connection(self) -> Any:
        """A new client connection (one per benchmark thread)."""
        import redis

        return redis.Redis(port=self.port, decode_responses=True)

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def restart_time(self) -> float:
        """Kill -9 and restart over the same directory; seconds until it answers a count."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        t = time.perf_counter()
        self.start(keep_dir=True)
        self.r.execute_command("FT.SEARCH", INDEX, "*", "NOCONTENT", "LIMIT", "0", "1")
        return time.perf_counter() - t

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    # ---- data --------------------------------------------------------------------------------
    def create_index(self) -> None:
        fields: list[str] = []
        for a in SCHEMA:
            if not a.indexed or (self.attributes is not None and a.name not in self.attributes):
                continue
            f = redis_field(a.name)
            if a.storage in ("int", "float", "ts"):
                fields += [f, "NUMERIC"]
            elif a.storage == "cat":
                fields += [f, "TAG", "SORTABLE"]
            else:
                fields += [f, "TAG"]
        fields += ["_has", "TAG"]
        self.r.execute_command("FT.CREATE", INDEX, "SCHEMA", *fields)

    def add(self, records: Iterable[dict[str, Any]], conn: Any = None,
            batch: int = BATCH) -> int:
        """FT.ADD records, pipelined `batch` at a time; returns how many."""
        conn = conn or self.r
        n = 0
        pipe = conn.pipeline(transaction=False)
        for rec in records:
            pipe.execute_command("FT.ADD", INDEX, rec["id"], "1.0", "REPLACE", "FIELDS",
                                 *_field_args(rec["attributes"], self.attributes))
            n += 1
            if n % batch == 0:
                pipe.execute()
        pipe.execute()
        return n

    def load(self) -> dict[str, Any]:
        self.create_index()
        before = rss_bytes(self.pid())
        t = time.perf_counter()
        self.add(iter_records(self.ds))
        seconds = time.perf_counter() - t
        info = self.r.info("memory")
        after = rss_bytes(self.pid())
        return {"seconds": seconds, "rows_per_s": self.ds.size / seconds,
                "used_memory": info.get("used_memory"), "rss_growth": after - before,
                "bytes_per_profile": (after - before) / max(self.ds.size, 1),
                "aof_always": self.aof_always}

    # ---- queries -----------------------------------------------------------------------------
    def count(self, q: Query, conn: Any = None) -> int:
        res = (conn or self.r).execute_command(
            "FT.SEARCH", INDEX, q.redis, "NOCONTENT", "LIMIT", "0", "1")
        return int(res[0])

    def ids(self, q: Query, limit: int) -> list[str]:
        res = self.r.execute_command(
            "FT.SEARCH", INDEX, q.redis, "NOCONTENT", "LIMIT", "0", str(limit))
        return list(res[1:])

    def group_by(self, q: Query, attr: str, top_n: int) -> list[tuple[Any, int]]:
        f = redis_field(attr)
        res = self.r.execute_command(
            "FT.AGGREGATE", INDEX, q.redis, "GROUPBY", "1", f"@{f}", "REDUCE", "COUNT", "0",
            "AS", "n", "SORTBY", "2", "@n", "DESC", "LIMIT", "0", str(top_n + 1))
        vocab = {v.lower(): v for a in SCHEMA if a.name == attr for v in a.vocab}
        out = []
        for row in res[1:]:
            d = dict(zip(row[::2], row[1::2], strict=True))
            value = d.get(f)
            if value is None or value == "":
                continue  # the group of documents without the attribute
            out.append((vocab.get(value, value), int(d["n"])))
        return out[:top_n]

    def get(self, pid: str, conn: Any = None) -> dict[str, Any]:
        return dict((conn or self.r).hgetall(pid))

    def batch_get(self, ids: list[str], conn: Any = None) -> list[dict[str, Any]]:
        return pipelined_hgetall(conn or self.r, ids)

    def batch_getter(self) -> Callable[[], Callable[[list[str]], Any]]:
        """What a client process calls for a batch get of its own (it pickles)."""
        return partial(_client_batch_get, self.port)

    def upsert(self, pid: str, attrs: dict[str, Any], conn: Any = None) -> None:
        args: list[Any] = []
        for k, v in attrs.items():
            args += [redis_field(k), v]
        (conn or self.r).execute_command("FT.ADD", INDEX, pid, "1.0", "REPLACE", "PARTIAL",
                                         "FIELDS", *args)

    def data_dir(self) -> Path | None:
        return Path(self.dir) if self.dir else None


def pipelined_hgetall(conn: Any, ids: list[str]) -> list[dict[str, Any]]:
    pipe = conn.pipeline(transaction=False)
    for i in ids:
        pipe.hgetall(i)
    return list(pipe.execute())


def _client_batch_get(port: int) -> Callable[[list[str]], Any]:
    import redis

    return partial(pipelined_hgetall, redis.Redis(port=port, decode_responses=True))
