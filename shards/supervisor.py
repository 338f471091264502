"""One machine, one command: shard processes plus a router, kept running.

`memstore serve` runs this. Layout of the data directory (default ./memstore-data):

    memstore-data/
      cluster.json      shard names and ports, their replicas', and shards added from
                        elsewhere
      shard-0/          one shard's log and snapshots (its slots and epoch live there)
      shard-0-replica-0/  with --replicas N: N replicas of each shard (docs/replication.md)
      shard-1/
      ...

First start: N shard processes (`sys.executable -m memstore.cli serve-shard`), shard i in
DATA/shard-i, slots split evenly (contiguous blocks), router on --port, shards on the next
ports (or free ports with --port 0). Later starts read cluster.json, so the shard count and
ports stay as they were; each shard reads its slots from its own directory.

Invariants:
- The router starts only after every shard answered a health check, and stops before them.
- A shard process that exits while the cluster runs is restarted on the same port and data
  directory, after a backoff that doubles on each quick death (1 s .. 30 s) and resets once
  it has stayed up a minute. Every death and restart is logged.
- Stop (SIGTERM/SIGINT): router first (draining calls), then SIGTERM to every shard, then
  SIGKILL to any still running after `stop_timeout` seconds.
- Shards run in their own session, so a terminal's Ctrl-C reaches only the supervisor, which
  stops things in order. No preexec hook (it would force a plain fork() of a process running
  gRPC): instead each shard's standard input is a pipe whose write end only the supervisor
  holds (`serve-shard --stop-on-eof`). When the supervisor dies, however it dies, the kernel
  closes it and the shard stops cleanly within seconds, flushing what it acknowledged.
- One supervisor per data directory (DATA/LOCK, memstore.storage.dirlock), and one process per
  shard directory. A supervisor started right after one that was killed finds its shards
  still stopping: each new shard waits up to SHARD_LOCK_WAIT seconds for its directory.
- A shard's own directory (log/, snapshots/ or HISTORY; no cluster.json) is refused before
  anything is made in it, naming `serve-shard` (memstore.storage.datadir).
- Every line a shard logs, from its first, goes to the supervisor's stderr.
- With --replicas N, each shard gets N replica processes (`serve-shard --replica-of`), on
  free ports kept in cluster.json, started once every shard serves and restarted like
  them. The router knows only the shards (primaries) and finds their replicas through
  them: replicas are for reads (`--read-from replica`, or a client's
  `read_from="replica"`) and for failover by hand. `--replication sync` goes to the shards.
- With --coordinator etcd://HOST:PORT, a shard and its replicas run as members of one
  shard (`serve-shard --coordinator`, the shard's --name, no --replica-of): etcd elects
  their primary, which the shard process becomes at the first start, and a replica takes
  over when it dies; the router follows etcd's choice (shards/coordinated.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memstore.gcpause import settle_heap
from memstore.query import DEFAULT_LIMITS, QueryLimits
from memstore.server import logs, metrics
from memstore.server.rights import SALT_FILE, load_salt
from memstore.server.security import Credentials, ServerSecurity
from memstore.storage.datadir import CLUSTER_FILE, refuse_shard_dir
from memstore.storage.dirlock import DirLock
from shards.calls import Background
from shards.server import start_router, stop_router
from shards.slots import format_ranges, split_even

log = logging.getLogger("memstore.supervisor")

START_TIMEOUT = 60.0
SHARD_LOCK_WAIT = 30.0  # a killed supervisor's shards take a few seconds to stop
MIN_BACKOFF, MAX_BACKOFF, STABLE_AFTER = 1.0, 30.0, 60.0


@dataclass
class ShardProcess:
    name: str
    data_dir: Path
    port: int
    slots: str  # first start only; later starts read ownership from data_dir
    host: str = "127.0.0.1"
    proc: asyncio.subprocess.Process | None = None
    address: str = ""
    restarts: int = 0
    started_at: float = 0.0
    backoff: float = MIN_BACKOFF
    pump: asyncio.Task[None] | None = field(default=None, repr=False)
    primary: ShardProcess | None = field(default=None, repr=False)  # a replica's shard


class Supervisor:
    def __init__(self, data_dir: Path, shards: int | None = None, host: str = "127.0.0.1",
                 port: int = 7070, sync: str = "always", shard_args: tuple[str, ...] = (),
                 stop_timeout: float = 15.0, link: bool = True,
                 security: ServerSecurity | None = None,
                 credentials: Credentials | None = None,
                 cluster_token: str | None = None, metrics_port: int | None = None,
                 in_memory: bool = False, limits: QueryLimits = DEFAULT_LIMITS,
                 anonymous_ttl: float | None = None, replicas: int | None = None,
                 replication: str = "async", coordinator: str | None = None,
                 lease_seconds: int = 5, read_from: str = "primary") -> None:
        self.data_dir = data_dir
        self.limits = limits  # the router's; the shards have theirs in shard_args
        self.anonymous_ttl = anonymous_ttl  # the router's retention (shards/retention.py)
        self.security = security or ServerSecurity()  # the router's; shards get the flags
        self.credentials = credentials or Credentials()  # the router's calls to its shards
        self.cluster_token = cluster_token  # given to the shards: they accept it as cluster
        # Prometheus: the router on metrics_port, shard i on metrics_port + 1 + i (0: every
        # process on a free port, each logged); None: no endpoint.
        self.metrics_port = metrics_port
        self.in_memory = in_memory  # shards keep nothing on disk; neither does this
        # the router's link for clients (--no-link turns both off; so do TLS and tokens)
        self.link = link and not self.security.guarded
        self.host, self.port, self.sync = host, port, sync
        self.shard_args = shard_args
        self.stop_timeout = stop_timeout
        self.shards: list[ShardProcess] = []
        self.replicas: list[ShardProcess] = []  # each names its shard (`primary`)
        self.replication = replication  # the shards' --replication
        self.coordinator, self.lease_seconds = coordinator, lease_seconds  # automatic failover
        self.read_from = read_from  # the router's: "replica" sends reads to the replicas
        self.external: list[str] = []  # shards added with `cluster add-shard` from elsewhere
        self.router_port = 0
        self._server: Any = None
        self._router: Any = None
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False
        self.directory_built = True  # False: data from before the identifier directory
        self._lock: DirLock | None = None
        if replicas and in_memory:
            raise ValueError("--replicas: a replica keeps its own log and snapshots; not "
                             "with --in-memory")
        if not in_memory:  # before anything is made there (memstore.storage.datadir)
            refuse_shard_dir(data_dir)
        self._configure(shards)
        self._configure_replicas(replicas)
        if replication == "sync" and not self.replicas:
            raise ValueError("--replication sync: every write would wait for a replica; "
                             "start some with --replicas N")

    # ------------------------------------------------------------------ layout
    def _configure(self, shards: int | None) -> None:
        path = self.data_dir / CLUSTER_FILE
        if path.exists() and not self.in_memory:
            state = json.loads(path.read_text())
            if shards is not None and shards != len(state["shards"]):
                log.warning("%s has %d shards; ignoring --shards %d (use cluster add-shard)",
                            path, len(state["shards"]), shards)
            for s in state["shards"]:
                shard = ShardProcess(s["name"], self.data_dir / s["name"], s["port"], "",
                                     self.host)
                self.shards.append(shard)
                self.replicas += [ShardProcess(r["name"], self.data_dir / r["name"],
                                               r["port"], "", self.host, primary=shard)
                                  for r in s.get("replicas", [])]
            self.external = list(state.get("external", []))
            self.directory_built = bool(state.get("directory"))
            return
        n = shards or usable_cpus()
        for i, ranges in enumerate(split_even(n)):
            port = self.port + 1 + i if self.port else 0
            self.shards.append(ShardProcess(f"shard-{i}", self.data_dir / f"shard-{i}", port,
                                            format_ranges(ranges), self.host))

    def _configure_replicas(self, count: int | None) -> None:
        """`count` replicas a shard (None: as cluster.json has them): the missing ones
        made, on free ports; the ones beyond it no longer started (their directories stay).
        """
        if count is None:
            return
        kept: list[ShardProcess] = []
        for shard in self.shards:
            mine = [r for r in self.replicas if r.primary is shard]
            for j in range(len(mine), count):
                name = f"{shard.name}-replica-{j}"
                mine.append(ShardProcess(name, self.data_dir / name, 0, "", self.host,
                                         primary=shard))
            kept += mine[:count]
        self.replicas = kept

    def _save(self) -> None:
        if self.in_memory:
            return
        state = {"shards": [{"name": s.name, "port": s.port,
                             "replicas": [{"name": r.name, "port": r.port}
                                          for r in self.replicas if r.primary is s]}
                            for s in self.shards],
                 "external": self.external, "directory": self.directory_built}
        path = self.data_dir / CLUSTER_FILE
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _member_of(self, process: ShardProcess) -> ShardProcess:
        """The shard a process serves under: with a coordinator, a replica is a member of
        its shard and takes its name (the etcd key's); else each process has its own."""
        if self.coordinator is not None and process.primary is not None:
            return process.primary
        return process

    def _membership(self, addresses: list[str]) -> None:
        """The router's shard list changed (add-shard/remove-shard, a failover): remember
        the others."""
        mine = {s.address for s in self.shards + self.replicas}
        self.external = [a for a in addresses if a not in mine]
        self._save()

    # ------------------------------------------------------------------ shards
    async def _spawn(self, shard: ShardProcess) -> None:
        args = [sys.executable, "-m", "memstore.cli", "serve-shard", "--host", shard.host,
                "--port", str(shard.port), "--data-dir", str(shard.data_dir),
                "--name", self._member_of(shard).name, "--sync", self.sync, "--stop-on-eof",
                "--lock-wait", str(SHARD_LOCK_WAIT), *self.shard_args]
        if self.in_memory:
            args += ["--in-memory"]
        else:  # one salt for the cluster (memstore.server.rights), made once
            args += ["--salt-file", str(self.data_dir / SALT_FILE)]
        if self.coordinator is not None:  # every member may become primary
            args += ["--coordinator", self.coordinator, "--lease-seconds",
                     str(self.lease_seconds), "--replication", self.replication]
        elif shard.primary is not None:
            args += ["--replica-of", shard.primary.address]
        else:
            args += ["--replication", self.replication]
        if shard.slots and (self.in_memory or not shard.data_dir.exists()):
            args += ["--slots", shard.slots]
        if self.metrics_port is not None:
            port = 0 if shard.primary is not None or not self.metrics_port \
                else self.metrics_port + 1 + self.shards.index(shard)
            args += ["--metrics-port", str(port)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.cluster_token:
            env["MEMSTORE_CLUSTER_TOKEN"] = self.cluster_token
        # stdin: a pipe only this process holds open (--stop-on-eof), so the shard stops
        # when the supervisor dies however it dies
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)
        assert proc.stderr is not None
        lines: list[str] = []
        try:
            async with asyncio.timeout(START_TIMEOUT + SHARD_LOCK_WAIT):
                while True:
                    raw = await proc.stderr.readline()
                    if not raw:
                        raise RuntimeError(f"{shard.name} exited during start-up:\n"
                                           + "".join(lines[-20:]))
                    line = raw.decode(errors="replace")
                    lines.append(line)
                    _pass_on(shard, line)  # recovery, a torn tail cut: the operator sees it
                    address = logs.listening_address(line)
                    if address is not None:
                        break
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        shard.address = address
        shard.port = int(shard.address.rsplit(":", 1)[1])
        shard.proc, shard.started_at = proc, time.monotonic()
        shard.pump = asyncio.create_task(self._forward(shard, proc))
        await self._healthy(shard)
        log.info("%s (pid %d) serving on %s", shard.name, proc.pid, shard.address)

    async def _forward(self, shard: ShardProcess, proc: asyncio.subprocess.Process) -> None:
        """Pass the shard's log lines on (prefixed) so its pipe never fills."""
        assert proc.stderr is not None
        async for raw in proc.stderr:
            _pass_on(shard, raw.decode(errors="replace"))

    async def _healthy(self, shard: ShardProcess) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        async with self.credentials.aio_channel(shard.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{shard.name} never became healthy")
                await asyncio.sleep(0.1)

    async def _watch(self, shard: ShardProcess) -> None:
        while not self._stopping:
            assert shard.proc is not None
            code = await shard.proc.wait()
            if shard.proc.stdin is not None:
                shard.proc.stdin.close()  # the dead shard's pipe
            if self._stopping:
                return
            if time.monotonic() - shard.started_at > STABLE_AFTER:
                shard.backoff = MIN_BACKOFF
            log.error("%s (pid %d) exited with status %s; restarting in %.0f s", shard.name,
                      shard.proc.pid, code, shard.backoff)
            await asyncio.sleep(shard.backoff)
            shard.backoff = min(shard.backoff * 2, MAX_BACKOFF)
            while not self._stopping:
                try:
                    await self._spawn(shard)
                    shard.restarts += 1
                    log.info("%s restarted (restart #%d)", shard.name, shard.restarts)
                    break
                except (OSError, RuntimeError, TimeoutError) as exc:
                    log.error("%s failed to restart: %s; retrying in %.0f s", shard.name,
                              exc, shard.backoff)
                    await asyncio.sleep(shard.backoff)
                    shard.backoff = min(shard.backoff * 2, MAX_BACKOFF)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> int:
        """Start shards (concurrently), then the router; returns the router's port. Raises
        DirectoryLocked if another supervisor owns the data directory."""
        if not self.in_memory:
            self._lock = DirLock.acquire(self.data_dir)
            load_salt(self.data_dir / SALT_FILE)
        try:
            await asyncio.gather(*(self._spawn(s) for s in self.shards))
            await asyncio.gather(*(self._spawn(r) for r in self.replicas))
        except BaseException:
            await self._stop_shards()
            raise
        if not self.in_memory:
            self._save()  # ports chosen by the OS on first start are kept from now on
        self._watchers = [asyncio.create_task(self._watch(s))
                          for s in self.shards + self.replicas]
        addresses = [s.address for s in self.shards] + self.external
        try:
            self._server, self.router_port, self._router = await start_router(
                addresses, self.host, self.port, on_membership=self._membership,
                link_port=0 if self.link else None, security=self.security,
                credentials=self.credentials, limits=self.limits,
                anonymous_ttl=self.anonymous_ttl, coordinator=self.coordinator,
                read_from=self.read_from)
        except BaseException:
            await self.stop()
            raise
        if not self.directory_built:
            await self._build_directory()
        if self.metrics_port is not None:
            scrape = metrics.serve_metrics(self.host, self.metrics_port,
                                           tls=self.security.metrics_tls())
            scheme = "https" if self.security.tls else "http"
            url = f"{scheme}://{self.host}:{scrape}/metrics"
            log.info(f"metrics on {url} (the router's; each shard logs its own)",
                     extra={"url": url})
        settle_heap()
        return self.router_port

    async def _build_directory(self) -> None:
        """A data directory from before the identifier directory existed: claim its
        profiles' identifiers before serving (once; `memstore cluster rebuild-directory`
        does the same by hand)."""
        log.info("claiming the identifiers of existing profiles in the identifier directory")
        try:
            totals = await self._router.directory.rebuild(Background())
        except BaseException:
            await self.stop()
            raise
        log.info("identifier directory built: %s", totals)
        self.directory_built = True
        self._save()

    def reload(self) -> None:
        """SIGHUP: the router and every shard read their auth file again."""
        self.security.reload()
        for shard in self.shards + self.replicas:
            if shard.proc is not None and shard.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    shard.proc.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            await stop_router(self._server, self._router)
            self._server = None
        for task in self._watchers:
            task.cancel()
        await self._stop_shards()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    async def _stop_shards(self) -> None:
        self._stopping = True
        running = [s for s in self.shards + self.replicas
                   if s.proc is not None and s.proc.returncode is None]
        for shard in running:
            with contextlib.suppress(ProcessLookupError):
                shard.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

        async def reap(shard: ShardProcess) -> None:
            assert shard.proc is not None
            try:
                await asyncio.wait_for(shard.proc.wait(), self.stop_timeout)
            except TimeoutError:
                log.warning("%s did not stop in %.0f s; killing it", shard.name,
                            self.stop_timeout)
                with contextlib.suppress(ProcessLookupError):
                    shard.proc.kill()
                await shard.proc.wait()
            if shard.pump is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(shard.pump, 1.0)

        await asyncio.gather(*(reap(s) for s in running))


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity, bounded by a cgroup (v2) CPU quota
    (a container limited to 1.5 CPUs gets 1), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, int(int(quota) // int(period)) or 1)
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def _pass_on(shard: ShardProcess, line: str) -> None:
    """A shard's log line, on our stderr: as it is when it is a JSON log line (it names its
    shard), else (gRPC's own C-core messages) made one."""
    text = line.rstrip("\n")
    if not text.startswith("{"):
        text = json.dumps({"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "level": "INFO", "logger": "stderr", "msg": text,
                           "role": "shard", "shard": shard.name})
    sys.stderr.write(text + "\n")


async def run(supervisor: Supervisor) -> None:
    """`memstore serve`: start everything, print where the router listens, run until a
    signal, then stop in order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, supervisor.reload)
    port = await supervisor.start()
    log.info("%d shards in %s", len(supervisor.shards), supervisor.data_dir)
    logs.ready(log, f"{supervisor.host}:{port}")
    await stop.wait()
    log.info("stopping: router, then shards")
    await supervisor.stop()
    log.info("stopped")
