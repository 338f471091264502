"""Cluster commands for the `memstore` tool: serve, serve-router, cluster ...

Plain click commands; memstore/cli/__init__.py registers them on its `main` group.

    memstore serve                      router on 127.0.0.1:7070 + one shard per core
    memstore serve-router --shard HOST:PORT [--shard ...]
    memstore cluster status             shards, slot ranges, profile counts, health
    memstore cluster add-shard HOST:PORT
    memstore cluster remove-shard NAME
    memstore cluster resume             finish a move a crashed add/remove left in flight
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from memstore.cli.options import (
    ANONYMOUS_TTL,
    LEASE_SECONDS,
    LINK_PORT,
    NO_LINK,
    client_security,
    listen_host,
    query_limit_settings,
    query_limits,
    security_args,
    server_security,
    shard_args,
    shard_settings,
)

DEFAULT_ROUTER = "127.0.0.1:7070"
ROUTERS = click.option(
    "--address", "routers", multiple=True, default=(DEFAULT_ROUTER,), show_default=True,
    envvar="MEMSTORE_ADDRESS",
    help="Router(s) of the cluster; the first lists the shards, all learn about changes.")
SHARDS = click.option("--shard", "shard_addresses", multiple=True,
                      help="Shard address(es) to use instead of asking the router.")
JOURNAL = click.option(
    "--journal", type=click.Path(path_type=Path), default=Path("memstore-rebalance.json"),
    show_default=True, help="Where a move in flight is recorded, so an interrupted "
    "add/remove can be finished (cluster resume).")


def _logging(verbose: bool, role: str = "tool") -> None:
    from memstore.server import logs

    logs.setup(verbose, role=role)


def _run(coro: Any) -> Any:
    import uvloop

    try:
        return uvloop.run(coro)
    except (OSError, TimeoutError, RuntimeError, ValueError, KeyError) as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        import grpc

        if isinstance(exc, grpc.aio.AioRpcError):
            raise click.ClickException(f"{exc.code().name}: {exc.details()}") from None
        raise


@click.command()
@click.option("--shards", type=click.IntRange(1, 16384), default=None,
              help="Shard processes on first start [default: one per core]. Later starts "
                   "keep the count recorded in the data directory.")
@click.option("--host", default="127.0.0.1", show_default=True, callback=listen_host,
              help="Address the router and shards listen on (loopback by default).")
@click.option("--port", default=7070, show_default=True,
              help="Router port; shards take the next ports. 0: free ports.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("memstore-data"),
              show_default=True, help="One directory for the cluster; shard i in shard-i/.")
@click.option("--in-memory", is_flag=True,
              help="Keep nothing on disk (tests, benchmarks): a restart starts empty.")
@shard_settings
@click.option("--stop-timeout", default=15.0, show_default=True,
              help="Seconds a shard gets to stop on SIGTERM, beyond its "
                   "--stop-snapshot-timeout, before it is killed.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus metrics: the router's on this port, shard i's on the port "
                   "+ 1 + i (0: free ports, each logged). Default: no metrics endpoint.")
@server_security
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None,
              help="With --tls-cert: the CA the router trusts its shards' certificate by "
                   "(default: --tls-client-ca, else the certificate itself, self-signed).")
@ANONYMOUS_TTL
@click.option("--replicas", type=click.IntRange(0, 16), default=None,
              help="Replica processes a shard, each in DATA/shard-i-replica-j on a free "
                   "port (docs/replication.md): they follow their shard's log, serve "
                   "reads (Client(read_from=\"replica\")) and are there for a failover by "
                   "hand. Default: as the data directory has them (none at first).")
@click.option("--replication", type=click.Choice(["async", "sync"]), default="async",
              show_default=True,
              help="The shards' acknowledgement (serve-shard --replication): sync waits "
                   "for a replica to hold each write. Needs --replicas.")
@click.option("--coordinator", metavar="etcd://HOST:PORT", default=None,
              help="Fail over automatically: etcd elects each shard's primary among the "
                   "shard process and its --replicas, a replica takes over when the primary "
                   "dies, and the router follows (docs/replication.md). Default: failover "
                   "by hand.")
@LEASE_SECONDS
@click.option("--read-from", type=click.Choice(["primary", "replica"]), default="primary",
              show_default=True,
              help="Where the router sends reads (Get, BatchGet, queries, schema, segments): "
                   "replica: to a replica of each shard when one answers, else its primary "
                   "(docs/replication.md). A call's memstore-read-from metadata overrides.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug lines too.")
def serve(shards: int | None, host: str, port: int, data_dir: Path, in_memory: bool, sync: str,
          stop_timeout: float, metrics_port: int | None, snapshot_log_mb: int,
          snapshot_interval: float, stop_snapshot_timeout: float, changes_retention: float,
          segment_refresh: float,
          max_identifiers_per_kind: int, blocked_identifier: tuple[str, ...],
          max_query_bytes: int, max_query_items: int, max_query_predicates: int,
          event_days: int, no_link: bool, tls_cert: Path | None, tls_key: Path | None,
          tls_client_ca: Path | None, auth_file: Path | None, insecure: bool,
          audit_log: Path | None, tls_ca: Path | None, anonymous_ttl: float | None,
          replicas: int | None, replication: str, coordinator: str | None,
          lease_seconds: int, read_from: str, verbose: bool) -> None:
    """Run a router and shard processes on this machine; restart shards that die."""
    from memstore.server import audit
    from memstore.server.security import AuthFileError, Credentials, ServerSecurity, new_token
    from shards.supervisor import Supervisor, run

    _logging(verbose, "supervisor")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # The router's and the shards' own calls: a token only they know (cluster role), and
    # the router's certificate as its client certificate where shards require one.
    internal = new_token() if auth_file is not None else None
    try:
        security = ServerSecurity.configure(tls_cert, tls_key, tls_client_ca, auth_file,
                                            insecure, internal)
        security.check_host(host)
        credentials = Credentials.member(tls_ca, tls_cert, tls_key, tls_client_ca, internal)
    except (AuthFileError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    audit.open_log(audit_log)
    limits = query_limits(max_query_bytes, max_query_items, max_query_predicates)
    args = shard_args(snapshot_log_mb, snapshot_interval, max_identifiers_per_kind,
                      blocked_identifier, no_link or security.guarded, limits,
                      stop_snapshot_timeout, event_days, changes_retention, segment_refresh)
    args += security_args(tls_cert, tls_key, tls_client_ca, auth_file, insecure, audit_log)
    if tls_ca is not None:  # replicas trust their primaries as the router trusts shards
        args += ("--tls-ca", str(tls_ca))
    try:
        supervisor = Supervisor(data_dir, shards, host, port, sync, shard_args=args,
                                stop_timeout=stop_timeout + stop_snapshot_timeout,
                                link=not no_link, security=security,
                                credentials=credentials, cluster_token=internal,
                                metrics_port=metrics_port, in_memory=in_memory, limits=limits,
                                anonymous_ttl=anonymous_ttl, replicas=replicas,
                                replication=replication, coordinator=coordinator,
                                lease_seconds=lease_seconds, read_from=read_from)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    _run(run(supervisor))


@click.command("serve-router")
@click.option("--shard", "shard_addresses", multiple=True, required=True,
              help="A shard's host:port; repeat for each shard.")
@click.option("--host", default="127.0.0.1", show_default=True, callback=listen_host,
              help="Address to listen on (loopback by default).")
@click.option("--port", default=7070, show_default=True, help="Port; 0 picks a free one.")
@click.option("--metrics-port", type=int, default=None,
              help="Serve Prometheus metrics on this port (same host; 0 picks one). "
                   "Default: no metrics endpoint.")
@LINK_PORT
@NO_LINK
@server_security
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None,
              help="Call the shards over TLS, trusting this CA; with shards that require "
                   "client certificates the router presents its --tls-cert.")
@click.option("--cluster-token-file", type=click.Path(exists=True, dir_okay=False,
                                                       path_type=Path), default=None,
              help="A file holding the token (with the cluster role in the shards' auth "
                   "files) the router sends to its shards. Default: $MEMSTORE_CLUSTER_TOKEN, "
                   "else none.")
@query_limit_settings
@ANONYMOUS_TTL
@click.option("--coordinator", metavar="etcd://HOST:PORT", default=None,
              help="Route to the primaries etcd elects for shards started with "
                   "`serve-shard --coordinator` (docs/replication.md): after a failover the "
                   "router switches by itself. Default: as told (`cluster failover`).")
@click.option("--read-from", type=click.Choice(["primary", "replica"]), default="primary",
              show_default=True,
              help="Where the router sends reads (Get, BatchGet, queries, schema, segments): "
                   "replica: to a replica of each shard when one answers, else its primary "
                   "(docs/replication.md). A call's memstore-read-from metadata overrides.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug lines too.")
def serve_router(shard_addresses: tuple[str, ...], host: str, port: int,
                 metrics_port: int | None, link_port: int, no_link: bool,
                 tls_cert: Path | None, tls_key: Path | None, tls_client_ca: Path | None,
                 auth_file: Path | None, insecure: bool, audit_log: Path | None,
                 tls_ca: Path | None, cluster_token_file: Path | None,
                 max_query_bytes: int, max_query_items: int, max_query_predicates: int,
                 anonymous_ttl: float | None, coordinator: str | None, read_from: str,
                 verbose: bool) -> None:
    """Run a router alone in front of shards started with serve-shard (give it the same
    query limits as them)."""
    from memstore.server import audit
    from memstore.server.security import (
        AuthFileError,
        Credentials,
        ServerSecurity,
        cluster_token_from_env,
    )
    from shards.server import serve as serve_router_

    _logging(verbose, "router")
    token = (cluster_token_file.read_text().strip() if cluster_token_file
             else cluster_token_from_env())
    try:
        security = ServerSecurity.configure(tls_cert, tls_key, tls_client_ca, auth_file,
                                            insecure)
        security.check_host(host)
        credentials = Credentials.load(tls_ca, tls_cert if tls_ca else None,
                                       tls_key if tls_ca else None, token)
    except (AuthFileError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    audit.open_log(audit_log)
    _run(serve_router_(list(shard_addresses), host, port, metrics_port,
                       None if no_link else link_port, security, credentials,
                       query_limits(max_query_bytes, max_query_items, max_query_predicates),
                       anonymous_ttl, coordinator, read_from))


@click.group()
def cluster() -> None:
    """Inspect the cluster and move slots between shards while it serves."""


async def _shard_addresses(routers: tuple[str, ...], shards: tuple[str, ...],
                           credentials: Any) -> list[str]:
    return list(await _router_view(routers, shards, credentials))


async def _router_view(routers: tuple[str, ...], shards: tuple[str, ...], credentials: Any
                       ) -> dict[str, dict[str, Any]]:
    """Shard address -> what the first router says of it (nothing when given shards)."""
    if shards:
        return {address: {} for address in shards}
    from shards.admin import admin_call

    listing = await admin_call(routers[0], "ListShards", credentials=credentials)
    return {s["address"]: s for s in listing["shards"]}


async def _tell_routers(routers: tuple[str, ...], method: str, body: dict[str, Any],
                        credentials: Any) -> None:
    import grpc

    from shards.admin import admin_call

    for router in routers:
        try:
            await admin_call(router, method, body, credentials=credentials)
        except grpc.aio.AioRpcError as exc:  # a router that is down learns at its next start
            click.echo(f"warning: router {router}: {exc}", err=True)


async def _status(routers: tuple[str, ...], shards: tuple[str, ...], credentials: Any
                  ) -> list[dict[str, Any]]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from shards.rebalance import Cluster
    from shards.slots import to_ranges

    rows = []
    view = await _router_view(routers, shards, credentials)
    cluster_ = Cluster(list(view), credentials)
    for node in cluster_.nodes:
        # The router's link to the shard: up, down (calls use gRPC) or none.
        row: dict[str, Any] = {"address": node.address, "link": view[node.address].get("link")}
        try:
            info = await node.refresh()
            check = await health_pb2_grpc.HealthStub(node.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5.0)
            row.update(name=info.name, epoch=info.epoch, profiles=info.profiles,
                       claims=info.claims,
                       slots=to_ranges(node.slots), slot_count=len(node.slots),
                       healthy=info.healthy
                       and check.status == health_pb2.HealthCheckResponse.SERVING,
                       merging=[{"loser": h.loser, "survivor": h.survivor, "txn": h.txn,
                                 "age_s": round(h.age_seconds, 1)} for h in info.held])
        except grpc.aio.AioRpcError as exc:
            row.update(name="?", healthy=False, error=exc.details())
        rows.append(row)
    await cluster_.__aexit__()
    return rows


@cluster.command()
@ROUTERS
@SHARDS
@click.option("--json", "as_json", is_flag=True, help="One JSON object per shard.")
@client_security
def status(routers: tuple[str, ...], shard_addresses: tuple[str, ...], as_json: bool,
           credentials: Any) -> None:
    """Show shards, slot ranges, profile counts and health; exit 1 if a shard is down."""
    from shards.slots import SLOT_COUNT, format_ranges

    rows = _run(_status(routers, shard_addresses, credentials))
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        if not all(row["healthy"] for row in rows):
            sys.exit(1)
        return
    click.echo(f"{'NAME':<12} {'ADDRESS':<22} {'EPOCH':>5} {'SLOTS':>6} {'PROFILES':>10} "
               f"{'CLAIMS':>10} {'HEALTH':<8} {'LINK':<5} RANGES")
    owned = 0
    for row in rows:
        ranges = format_ranges(row.get("slots", []))
        owned += row.get("slot_count", 0)
        click.echo(f"{row['name']:<12} {row['address']:<22} {row.get('epoch', '-'):>5} "
                   f"{row.get('slot_count', '-'):>6} {row.get('profiles', '-'):>10} "
                   f"{row.get('claims', '-'):>10} {'ok' if row['healthy'] else 'DOWN':<8} "
                   f"{row.get('link') or '-':<5} {ranges if len(ranges) < 60 else ranges[:57] + '...'}"
                   f"{'  ' + row['error'] if 'error' in row else ''}")
    down = [row["address"] for row in rows if not row["healthy"]]
    hint = ""
    if down:
        hint = f"  ({len(down)} down: their slots are counted only when they answer)"
    elif owned != SLOT_COUNT:
        hint = "  (a move in flight? see cluster resume)"
    click.echo(f"{len(rows)} shards, {owned} of {SLOT_COUNT} slots owned{hint}")
    for row in rows:
        for h in row.get("merging", []):
            click.echo(f"merging on {row['name']}: {h['loser']!r} into {h['survivor']!r} "
                       f"(merge {h['txn']}, {h['age_s']} s old; a router finishes or undoes "
                       "merges older than a few seconds)")
    if down:
        sys.exit(1)


def _progress(total: int, desc: str, disable: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit=" slots", desc=desc, disable=disable, file=sys.stderr)


async def _add(address: str, routers: tuple[str, ...], shards: tuple[str, ...],
               batch_slots: int, journal_path: Path, force: bool, quiet: bool,
               credentials: Any) -> Any:
    from shards import rebalance as rb

    addresses = await _shard_addresses(routers, shards, credentials)
    async with rb.Cluster([*addresses, address], credentials) as cl:
        journal = rb.Journal(journal_path)
        await rb.resume(cl, journal)
        new = cl.node(address)
        await rb.prepare_new_shard(cl, new, force)
        if not shards:
            await _tell_routers(routers, "AddShard", {"address": address}, credentials)
        await cl.refresh()
        moves = rb.plan_for_add(cl, new)
        with _progress(sum(m.count for m in moves), f"moving slots to {new.name}",
                       quiet) as bar:
            report = await rb.run_moves(cl, moves, journal, batch_slots, bar.update)
        return new.name, report


@cluster.command("add-shard")
@click.argument("address")
@ROUTERS
@SHARDS
@click.option("--batch-slots", default=256, show_default=True,
              help="Slots moved per switch: smaller batches mean shorter pauses for writes "
                   "to those slots, more switches in all.")
@JOURNAL
@click.option("--force", is_flag=True, help="Add a shard that already holds profiles.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug lines too.")
@client_security
def add_shard(address: str, routers: tuple[str, ...], shard_addresses: tuple[str, ...],
              batch_slots: int, journal: Path, force: bool, no_progress: bool,
              verbose: bool, credentials: Any) -> None:
    """Add the shard at ADDRESS (started with serve-shard) and move a fair share of slots
    to it while the cluster serves."""
    _logging(verbose)
    name, report = _run(_add(address, routers, shard_addresses, batch_slots, journal, force,
                             no_progress, credentials))
    click.echo(f"added {name}: moved {report.slots} slots, {report.copied} profiles copied, "
               f"{report.caught_up} caught up, {report.repaired_batches} batches recopied, "
               f"writes to moving slots paused {report.frozen_seconds:.2f} s in all")


async def _remove(name: str, routers: tuple[str, ...], shards: tuple[str, ...],
                  batch_slots: int, journal_path: Path, quiet: bool, credentials: Any) -> Any:
    from shards import rebalance as rb

    async with rb.Cluster(await _shard_addresses(routers, shards, credentials),
                          credentials) as cl:
        journal = rb.Journal(journal_path)
        await rb.resume(cl, journal)
        leaving = cl.node(name)
        moves = rb.plan_for_remove(cl, leaving)
        with _progress(sum(m.count for m in moves), f"draining {leaving.name}", quiet) as bar:
            report = await rb.run_moves(cl, moves, journal, batch_slots, bar.update)
        await leaving.refresh()
        if not shards:
            await _tell_routers(routers, "RemoveShard", {"name": leaving.address},
                                credentials)
        return leaving, report


@cluster.command("remove-shard")
@click.argument("name")
@ROUTERS
@SHARDS
@click.option("--batch-slots", default=256, show_default=True, help="Slots moved per switch.")
@JOURNAL
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug lines too.")
@client_security
def remove_shard(name: str, routers: tuple[str, ...], shard_addresses: tuple[str, ...],
                 batch_slots: int, journal: Path, no_progress: bool, verbose: bool,
                 credentials: Any) -> None:
    """Drain shard NAME (or its address): move all its slots to the others, then take it
    out of the routers. Stop its process afterwards."""
    _logging(verbose)
    leaving, report = _run(_remove(name, routers, shard_addresses, batch_slots, journal,
                                   no_progress, credentials))
    click.echo(f"removed {leaving.name} ({leaving.address}): moved {report.slots} slots; "
               f"it now holds {leaving.info.profiles} profiles and can be stopped")


async def _resume(routers: tuple[str, ...], shards: tuple[str, ...], journal_path: Path,
                  credentials: Any) -> bool:
    from shards import rebalance as rb

    journal = rb.Journal(journal_path)
    state = journal.read()
    if state is None:
        return False
    addresses = await _shard_addresses(routers, shards, credentials)
    async with rb.Cluster([*addresses, state["source"], state["target"]], credentials) as cl:
        return await rb.resume(cl, journal)


@cluster.command()
@click.argument("shard")
@ROUTERS
@click.option("--replica", "replicas", multiple=True,
              help="A replica of SHARD that may be promoted (repeat for more). Default: the "
                   "replicas SHARD lists, when it still answers.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds to wait for each shard's answer: a member that has not answered "
                   "by then is taken as down (a dead machine costs this twice).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug lines too.")
@client_security
def failover(shard: str, routers: tuple[str, ...], replicas: tuple[str, ...], timeout: float,
             as_json: bool, verbose: bool, credentials: Any) -> None:
    """Promote the most up-to-date replica of SHARD (a name or address) to primary, by hand
    (docs/replication.md): it takes SHARD's name and a higher epoch, the routers switch to
    it, and the old primary, if it answers, is fenced: it refuses writes and follows the
    new one."""
    from shards.failover import FailoverError, describe
    from shards.failover import failover as run_failover

    _logging(verbose)
    try:
        report = _run(run_failover(shard, list(routers), list(replicas), credentials,
                                   timeout))
    except FailoverError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(describe(report)))
        return
    click.echo(f"{report.shard}: {report.new} is primary at epoch {report.epoch} from "
               f"position {report.position} (was {report.old})")
    for note in report.notes:
        click.echo(f"  {note}")


@cluster.command("rebuild-directory")
@ROUTERS
@client_security
def rebuild_directory(routers: tuple[str, ...], credentials: Any) -> None:
    """Claim, in the identifier directory, every identifier the shards' profiles hold that
    has none: for data written before the directory existed or straight to a shard."""
    from shards.admin import admin_call

    totals = _run(admin_call(routers[0], "RebuildDirectory", timeout=24 * 3600.0,
                             credentials=credentials))
    click.echo(f"{totals['identifiers']} identifiers of {totals['profiles']} profiles: "
               f"{totals['claimed']} claimed now, {totals['held_twice']} held by two profiles")
    if totals["held_twice"]:
        click.echo("the router's log names those held twice; linking one to the profile "
                   "it names there merges the two", err=True)


@cluster.command()
@ROUTERS
@SHARDS
@JOURNAL
@client_security
def resume(routers: tuple[str, ...], shard_addresses: tuple[str, ...], journal: Path,
           credentials: Any) -> None:
    """Finish a slot move that an interrupted add-shard/remove-shard left in flight."""
    done = _run(_resume(routers, shard_addresses, journal, credentials))
    click.echo("finished the interrupted move" if done else "no move in flight")
