"""Prometheus metrics of a shard or router process (served on --metrics-port, loopback by
default).

memstore_requests_total{method,code}   calls answered, by gRPC status (shards and routers)
memstore_request_seconds{method}       latency histogram (shards and routers)
memstore_profiles / memstore_log_bytes gauges read at scrape time (shards)
memstore_merges_total{outcome}         cross-shard merges a router committed, and holds it
                                       settled for a coordinator that went away: finished
                                       (committed before), aborted (undone); restarted: a
                                       merge that lost a race and began again
memstore_claim_waits_total             writes a router made wait for another write's young
                                       claim of an identifier they name
memstore_claim_wait_seconds            how long those writes waited (histogram)
memstore_auth_refusals_total{method,code}  calls refused before they ran: UNAUTHENTICATED
                                       (no or unknown credential), PERMISSION_DENIED (a role
                                       missing)
memstore_erased_profiles_total{reason} profiles erased: delete (one person), query (a bulk
                                       erasure), retention (anonymous profiles past
                                       --anonymous-ttl); shards count what they erased,
                                       routers what they asked for
memstore_replicas                      replicas following this primary (docs/replication.md)
memstore_replication_lag_bytes         a replica: log bytes behind its primary; a primary:
                                       how far its furthest-behind replica is
memstore_replication_lag_seconds       a replica: seconds since it last held all its
                                       primary had (0 while caught up)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

REQUESTS = Counter("memstore_requests", "Calls answered, by method and status code",
                   ["method", "code"])
LATENCY = Histogram("memstore_request_seconds", "Time to answer a call", ["method"],
                    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                             0.05, 0.1, 0.25, 1.0, 5.0))
MERGES = Counter("memstore_merges", "Cross-shard merges, by outcome", ["outcome"])
CLAIM_WAITS = Counter("memstore_claim_waits", "Writes that waited for another write's young "
                      "claim of an identifier")
CLAIM_WAIT_SECONDS = Histogram("memstore_claim_wait_seconds", "Time a write waited for "
                               "another write's young claim",
                               buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0,
                                        60.0))
AUTH_REFUSALS = Counter("memstore_auth_refusals", "Calls refused for their credentials",
                        ["method", "code"])
ERASED = Counter("memstore_erased_profiles", "Profiles erased, by reason", ["reason"])
PROFILES = Gauge("memstore_profiles", "Live profiles held by this shard")
LOG_BYTES = Gauge("memstore_log_bytes", "Bytes in this shard's log segments")
REPLICAS = Gauge("memstore_replicas", "Replicas following this primary")
REPLICATION_LAG_BYTES = Gauge("memstore_replication_lag_bytes",
                              "Log bytes a replica is behind its primary (a primary: its "
                              "furthest-behind replica)")
REPLICATION_LAG_SECONDS = Gauge("memstore_replication_lag_seconds",
                                "Seconds since this replica last held all its primary had")


def serve_metrics(host: str, port: int, profiles: Callable[[], float] | None = None,
                  log_bytes: Callable[[], float] | None = None,
                  tls: dict[str, Any] | None = None) -> int:
    """Start the scrape endpoint (HTTPS with `tls`: start_http_server's certfile, keyfile
    and client CA arguments); returns the port it listens on."""
    if profiles is not None:
        PROFILES.set_function(profiles)
    if log_bytes is not None:
        LOG_BYTES.set_function(log_bytes)
    # the socket takes an IPv6 host bare ("::1"), not as gRPC's HOST:PORT writes it
    server, _ = start_http_server(port, addr=host.strip("[]"), **(tls or {}))
    return int(server.server_port)


def observe(method: str, code: str, seconds: float) -> None:
    REQUESTS.labels(method, code).inc()
    LATENCY.labels(method).observe(seconds)
