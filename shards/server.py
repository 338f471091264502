"""Running a router: its gRPC server assembled, started, served until a signal, stopped.

`start_router` waits for every shard to answer once, then serves on one port the
Memstore service (RouterService, shards/router.py), the RouterAdmin service
(shards/admin.py), health and reflection, and (unless TLS or tokens guard it) the link
for clients' unary calls (memstore/server/link.py); every unary call is counted and timed
(`_Metered`), and the guard maps what no handler mapped (memstore/server/guard.py). In the
background it sweeps up merges a dead router left (shards/routing.py) and, with
--anonymous-ttl, erases anonymous profiles nobody touched (shards/retention.py).
`serve` runs one until SIGTERM or SIGINT and drains in-flight calls; SIGHUP reads the
auth file again.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from memstore.gcpause import settle_heap
from memstore.query import DEFAULT_LIMITS, QueryLimits
from memstore.server import logs, metrics, reflection
from memstore.server.guard import Guard
from memstore.server.link import LinkServer, describe_handler
from memstore.server.security import AUDITED, Credentials, ServerSecurity
from memstore.v1 import memstore_pb2 as pb
from memstore.v1 import memstore_pb2_grpc
from shards import admin
from shards.calls import Code
from shards.router import RouterService
from shards.shard_map import CHANNEL_OPTIONS, ShardMap

log = logging.getLogger("memstore.router")


async def start_router(addresses: Iterable[str], host: str = "127.0.0.1", port: int = 7070,
                       on_membership: Callable[[list[str]], None] | None = None,
                       wait_timeout: float = 30.0, link_port: int | None = 0,
                       security: ServerSecurity | None = None,
                       credentials: Credentials | None = None,
                       limits: QueryLimits = DEFAULT_LIMITS,
                       anonymous_ttl: float | None = None, coordinator: str | None = None,
                       read_from: str = "primary"
                       ) -> tuple[grpc.aio.Server, int, RouterService]:
    """Build and start a router server (after every shard answered once). `link_port`:
    where clients' unary calls may come over the link (memstore/server/link.py; 0 picks a free
    port), on the same host; None serves gRPC alone (and so does a router under TLS or
    tokens). `security`: how it listens and whom it answers; `credentials`: what it
    presents to its shards (memstore/server/security.py). `limits`: the size of work one
    query may ask for (give the shards the same). `coordinator` (etcd://HOST:PORT): switch
    to the primaries etcd elects (shards/coordinated.py). `read_from` "replica": reads go
    to the shards' replicas unless the call says otherwise (shards/replica_reads.py)."""
    from shards.shard_map import wait_for

    security = security or ServerSecurity()
    security.check_host(host)
    if security.guarded:
        link_port = None
    shard_map = ShardMap(addresses, credentials)
    down = await wait_for(shard_map, wait_timeout)
    if down:
        log.warning("starting without shards %s: their calls get UNAVAILABLE until they "
                    "answer", ", ".join(down))
    router = RouterService(shard_map, on_membership, limits, read_from)
    await router.operations.bootstrap_schema()
    # Guard last: authentication answers first, so a caller without credentials learns
    # nothing of how its request parsed (memstore/server/guard.py).
    server = grpc.aio.server(options=CHANNEL_OPTIONS[:2],
                             interceptors=[*security.interceptors(), _Metered(), Guard()])
    memstore_pb2_grpc.add_MemstoreServicer_to_server(router, server)
    server.add_generic_rpc_handlers((admin.handler(router.admin),))
    if link_port is not None:
        router.link = LinkServer(router, pb.DESCRIPTOR.services_by_name["Memstore"],
                                 metered=True, audited=AUDITED)
        server.add_generic_rpc_handlers((describe_handler(router.link),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable(server, (pb.DESCRIPTOR.services_by_name["Memstore"].full_name,
                               health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    bound = security.bind(server, f"{host}:{port}")
    await server.start()
    if router.link is not None:
        try:
            await router.link.start(host, link_port or 0)
        except BaseException:
            await server.stop(grace=None)
            raise
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("memstore.v1.Memstore", health_pb2.HealthCheckResponse.SERVING)
    server._memstore_health = health_servicer  # type: ignore[attr-defined]
    router.sweeper = asyncio.get_running_loop().create_task(router.routing.sweep())
    if coordinator is not None:
        from shards.coordinated import follow_primaries

        router.coordinated = asyncio.get_running_loop().create_task(
            follow_primaries(router.admin, coordinator))
    if anonymous_ttl:
        from shards.retention import Retention

        router.retention = Retention(router, anonymous_ttl)
        router.retention_task = asyncio.get_running_loop().create_task(router.retention.run())
    return server, bound, router


async def stop_router(server: grpc.aio.Server, router: RouterService, grace: float = 5.0
                      ) -> None:
    health_servicer = getattr(server, "_memstore_health", None)
    if health_servicer is not None:
        await health_servicer.enter_graceful_shutdown()
    await asyncio.gather(server.stop(grace=grace),
                         *([router.link.stop(grace)] if router.link is not None else []))
    if router.sweeper is not None:
        router.sweeper.cancel()
    for task in (router.retention_task, router.coordinated):
        if task is not None:
            task.cancel()
    await router.map.close()


async def serve(addresses: list[str], host: str = "127.0.0.1", port: int = 7070,
                metrics_port: int | None = None, link_port: int | None = 0,
                security: ServerSecurity | None = None,
                credentials: Credentials | None = None,
                limits: QueryLimits = DEFAULT_LIMITS,
                anonymous_ttl: float | None = None, coordinator: str | None = None,
                read_from: str = "primary") -> None:
    """Run a router until SIGTERM/SIGINT, then drain in-flight calls. The auth file is read
    again on SIGHUP."""
    security = security or ServerSecurity()
    server, bound, router = await start_router(addresses, host, port, link_port=link_port,
                                               security=security, credentials=credentials,
                                               limits=limits, anonymous_ttl=anonymous_ttl,
                                               coordinator=coordinator,
                                               read_from=read_from)
    settle_heap()
    if metrics_port is not None:
        scrape = metrics.serve_metrics(host, metrics_port, tls=security.metrics_tls())
        scheme = "https" if security.tls else "http"
        url = f"{scheme}://{host}:{scrape}/metrics"
        log.info(f"metrics on {url}", extra={"url": url})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, security.reload)  # never the default (exit)
    if router.link is not None:
        log.info(f"link on {host}:{router.link.port}", extra={"port": router.link.port})
    logs.ready(log, f"{host}:{bound}")
    await stop.wait()
    started = time.monotonic()
    await stop_router(server, router)
    log.info("router stopped in %.2fs", time.monotonic() - started)

class _Metered(grpc.aio.ServerInterceptor):
    """Count and time every unary call of the public API (memstore.server.metrics)."""

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or handler.unary_unary is None or "/memstore.v1." not in method:
            return handler
        name = method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        async def timed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            code = "UNKNOWN"
            try:
                response = await inner(request, context)
                code = "OK"
                return response
            finally:
                aborted = context.code()
                if aborted is not None and aborted != Code.OK:
                    code = aborted.name if isinstance(aborted, grpc.StatusCode) else str(aborted)
                metrics.observe(name, code, time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            timed, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
