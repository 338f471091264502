"""The settings every shard takes: one definition for `memstore serve-shard` and for
`memstore serve`, which passes them on to the shards it starts. The query limits are a
router's settings too (`memstore serve-router`, and the router `memstore serve` runs)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from memstore.query.limits import QueryLimits

F = TypeVar("F", bound=Callable[..., Any])

SYNC_HELP = ("When the log is fsynced. always: an acknowledged write survives power loss "
             "(group commit keeps it fast). everysec: at most ~1 s of writes lost on power "
             "loss. off: the OS decides (a crash of the process loses nothing, power loss "
             "may). If unsure: always.")

# The size of work one query may ask for (memstore/query/limits.py); over a limit, a query
# is refused with INVALID_ARGUMENT naming the limit and the flag that raises it.
QUERY_LIMIT_OPTIONS = (
    click.option("--max-query-bytes", type=click.IntRange(1), default=64 << 10,
                 show_default=True,
                 help="Longest text query, in UTF-8 bytes, checked before it is parsed. "
                      "Longer allows bigger hand-written or generated texts; each byte costs "
                      "parse time on the router and on every shard. If unsure: the default "
                      "(programs can send the structured protobuf form instead)."),
    click.option("--max-query-items", type=click.IntRange(1), default=10_000,
                 show_default=True,
                 help="Most literal values in one query, its IN lists together. More "
                      "allows longer IN lists; each item costs time on every shard while "
                      "other calls wait (1,000,000 items once took 11.7 s). If unsure: the "
                      "default; put a bigger audience in an attribute and query that."),
    click.option("--max-query-predicates", type=click.IntRange(1), default=1_000,
                 show_default=True,
                 help="Most predicates (comparisons, IN, exists, did, ALL) in one query. "
                      "Each costs bitmap operations on every shard. If unsure: the default."),
)

_OPTIONS = (
    click.option("--sync", type=click.Choice(["always", "everysec", "off"]), default="always",
                 show_default=True, help=SYNC_HELP),
    click.option("--snapshot-log-mb", type=click.IntRange(1), default=512, show_default=True,
                 help="Take a snapshot when the log has grown by this many MiB."),
    click.option("--snapshot-interval", type=click.FloatRange(1.0), default=3600.0,
                 show_default=True,
                 help="Take a snapshot this many seconds after the last one (if anything "
                      "changed)."),
    click.option("--stop-snapshot-timeout", type=click.FloatRange(0), default=60.0,
                 show_default=True,
                 help="On a clean stop, write a snapshot first if the log has grown since "
                      "the last one, so the next start replays nothing; give up after this "
                      "many seconds (the next start then replays the log; nothing is lost). "
                      "0: never."),
    click.option("--changes-retention", type=click.FloatRange(0), default=24.0,
                 show_default=True,
                 help="Hours of changes the log keeps for `memstore watch` and `changes` "
                      "to resume from (--from); older positions must start again with "
                      "--initial. Costs disk: the log of that many hours stays."),
    click.option("--segment-refresh", type=click.FloatRange(1.0), default=60.0,
                 show_default=True,
                 help="Seconds between re-evaluations of saved segments whose queries "
                      "compare with a relative time (`last_seen > now - 7d`): members who "
                      "age out leave within this time."),
    click.option("--max-identifiers-per-kind", type=click.IntRange(1), default=20,
                 show_default=True,
                 help="Merge protection: a profile never holds more identifiers of one kind."),
    click.option("--blocked-identifier", multiple=True,
                 help="Extra identifier values never linked (added to the built-in list)."),
    *QUERY_LIMIT_OPTIONS,
    click.option("--event-days", type=click.IntRange(1, 36_500), default=180,
                 show_default=True,
                 help="UTC days of events' day records kept for did(...) windows (today "
                      "and the days before it); older days are dropped, "
                      "event.<name>.count/first/last stay. More days: more memory (a few "
                      "bytes per profile and active day). If unsure: 180."),
    click.option("--no-link", is_flag=True,
                 help="Serve over gRPC alone, without the link (a lighter protocol for "
                      "unary calls from routers and clients, on a free port of the same "
                      "host)."),
)
NO_LINK = _OPTIONS[-1]

# serve and serve-router: retention (shards/retention.py), run by the router.
ANONYMOUS_TTL = click.option(
    "--anonymous-ttl", type=click.FloatRange(0, min_open=True), default=None,
    help="Erase anonymous profiles (only anonymous or device identifiers) unchanged for this "
         "many days, in the background (checked every 10 minutes). Default: never. If "
         "unsure: off, or your consent policy's limit for anonymous visitors (e.g. 30).")

# serve-shard and serve-router: where the link listens (`memstore serve` picks free ports).
LINK_PORT = click.option(
    "--link-port", type=click.IntRange(0, 65535), default=0, show_default=True,
    help="Port of the link on the same host, where routers (to a shard) and clients with "
         "link=True send their unary calls; 0 picks a free one. Fix it where they reach the "
         "server through a published port or a firewall.")


def with_options(command: F, options: Sequence[Callable[[F], F]]) -> F:
    """`command` with click `options` added, so --help lists them in the order given."""
    for option in reversed(options):
        command = option(command)
    return command


def shard_settings(command: F) -> F:
    """Add --sync, --snapshot-log-mb, --snapshot-interval, --stop-snapshot-timeout,
    --changes-retention, --segment-refresh, --max-identifiers-per-kind,
    --blocked-identifier, the query limits, --event-days and --no-link to a click
    command."""
    return with_options(command, _OPTIONS)


def query_limit_settings(command: F) -> F:
    """Add --max-query-bytes, --max-query-items and --max-query-predicates (a router)."""
    return with_options(command, QUERY_LIMIT_OPTIONS)


def query_limits(max_query_bytes: int, max_query_items: int, max_query_predicates: int
                 ) -> QueryLimits:
    """The QueryLimits the three flags give."""
    from memstore.query.limits import QueryLimits

    return QueryLimits(max_bytes=max_query_bytes, max_items=max_query_items,
                       max_predicates=max_query_predicates)


def shard_args(snapshot_log_mb: int, snapshot_interval: float, max_identifiers_per_kind: int,
               blocked_identifier: tuple[str, ...], no_link: bool,
               limits: QueryLimits | None = None, stop_snapshot_timeout: float = 60.0,
               event_days: int = 180, changes_retention: float = 24.0,
               segment_refresh: float = 60.0) -> tuple[str, ...]:
    """The same settings as `serve-shard` arguments (--sync goes separately)."""
    return ("--snapshot-log-mb", str(snapshot_log_mb),
            "--snapshot-interval", str(snapshot_interval),
            "--stop-snapshot-timeout", str(stop_snapshot_timeout),
            "--changes-retention", str(changes_retention),
            "--segment-refresh", str(segment_refresh),
            "--max-identifiers-per-kind", str(max_identifiers_per_kind),
            *(arg for value in blocked_identifier for arg in ("--blocked-identifier", value)),
            *(() if limits is None else (
                "--max-query-bytes", str(limits.max_bytes),
                "--max-query-items", str(limits.max_items),
                "--max-query-predicates", str(limits.max_predicates))),
            "--event-days", str(event_days),
            *(("--no-link",) if no_link else ()))


# ---------------------------------------------------------------------- replication

REPLICATION_OPTIONS = (
    click.option("--replica-of", metavar="HOST:PORT", default=None,
                 help="Run as a read-only replica of the shard at HOST:PORT: take its "
                      "snapshot, then follow its log into this --data-dir (a restart "
                      "resumes from where it stopped). Writes are refused naming the "
                      "primary. Default: a primary, which replicas may follow."),
    click.option("--replication", type=click.Choice(["async", "sync"]), default="async",
                 show_default=True,
                 help="A primary's acknowledgement. async: once its own log has the write "
                      "(--sync); a failover may lose the replicas' lag. sync: only once a "
                      "replica also has it in its log, so a failover to that replica loses "
                      "no acknowledged write; writes are refused (UNAVAILABLE) when no "
                      "replica confirms within --replication-timeout. If unsure: async "
                      "with one replica, sync when losing an acknowledged write is worse "
                      "than refusing one."),
    click.option("--replication-timeout", type=click.FloatRange(0.01), default=5.0,
                 show_default=True,
                 help="--replication sync: seconds a write waits for a replica's "
                      "confirmation, and how long no replica may be connected before "
                      "writes are refused at once."),
    click.option("--replication-fallback", is_flag=True,
                 help="--replication sync: when no replica confirms in time, acknowledge "
                      "anyway (as async, logged and counted in Stats) instead of refusing."),
)

# Automatic failover (memstore/replication/coordinator.py): serve-shard and serve.
COORDINATOR_OPTIONS = (
    click.option("--coordinator", metavar="etcd://HOST:PORT", default=None,
                 help="Fail over automatically: etcd decides which member of the shard "
                      "(every process started with the same --name and --coordinator) is "
                      "primary; the others follow it, and one of them takes over when the "
                      "primary's lease expires. Needs a data directory; not with "
                      "--replica-of. Default: no coordinator, failover by hand (`memstore "
                      "cluster failover`)."),
    click.option("--lease-seconds", type=click.IntRange(2, 600), default=5,
                 show_default=True,
                 help="--coordinator: the primary's etcd lease. A dead or cut-off primary "
                      "is replaced about this long after its last refresh (and refuses "
                      "writes a fifth of it earlier); shorter fails over sooner but takes a "
                      "pause of the process (a long garbage collection, a stalled disk) for "
                      "a death. If unsure: 5."),
)
LEASE_SECONDS = COORDINATOR_OPTIONS[-1]


def replication_settings(command: F) -> F:
    """Add --replica-of, --replication, --replication-timeout, --replication-fallback,
    --coordinator and --lease-seconds."""
    return with_options(command, REPLICATION_OPTIONS + COORDINATOR_OPTIONS)


# ---------------------------------------------------------------------- security

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)

SERVER_SECURITY = (
    click.option("--tls-cert", type=_FILE, default=None,
                 help="Serve TLS with this certificate (PEM); every port then speaks TLS "
                      "only (the link is off). Needs --tls-key."),
    click.option("--tls-key", type=_FILE, default=None, help="The --tls-cert's private key."),
    click.option("--tls-client-ca", type=_FILE, default=None,
                 help="Require client certificates signed by this CA (mutual TLS). Without "
                      "--auth-file every such certificate has every role."),
    click.option("--auth-file", type=_FILE, default=None,
                 help="Tokens and their roles, a line each: TOKEN ROLE[,ROLE...] [NAME] "
                      "(roles: read, write, admin, cluster; `cert:CN ROLES` for client "
                      "certificates). Read again on SIGHUP. Default: no authentication "
                      "(loopback only)."),
    click.option("--insecure", is_flag=True,
                 help="Listen on a non-loopback --host without TLS or tokens (only where a "
                      "network you trust protects every port)."),
    click.option("--audit-log", type=click.Path(dir_okay=False, path_type=Path),
                 default=None,
                 help="Also append audit lines (deletes, declarations, cluster changes: who, "
                      "when) to this file. Default: the process log only."),
)


def server_security(command: F) -> F:
    """Add --tls-cert, --tls-key, --tls-client-ca, --auth-file, --insecure, --audit-log."""
    return with_options(command, SERVER_SECURITY)


def security_args(tls_cert: Path | None, tls_key: Path | None, tls_client_ca: Path | None,
                  auth_file: Path | None, insecure: bool, audit_log: Path | None
                  ) -> tuple[str, ...]:
    """The same settings as arguments of the shard processes `memstore serve` starts."""
    pairs = (("--tls-cert", tls_cert), ("--tls-key", tls_key),
             ("--tls-client-ca", tls_client_ca), ("--auth-file", auth_file),
             ("--audit-log", audit_log))
    return (*(arg for flag, value in pairs if value is not None
              for arg in (flag, str(value))), *(("--insecure",) if insecure else ()))


CLIENT_SECURITY = (
    click.option("--tls-ca", type=_FILE, default=None, envvar="MEMSTORE_TLS_CA",
                 show_envvar=True, help="Connect over TLS, trusting this CA (PEM)."),
    click.option("--tls-cert", "client_cert", type=_FILE, default=None,
                 envvar="MEMSTORE_TLS_CERT", show_envvar=True,
                 help="A client certificate, for servers that require one (with --tls-key)."),
    click.option("--tls-key", "client_key", type=_FILE, default=None,
                 envvar="MEMSTORE_TLS_KEY", show_envvar=True,
                 help="The client certificate's private key."),
    click.option("--token", default=None, envvar="MEMSTORE_TOKEN", show_envvar=True,
                 help="Send this token (authorization: Bearer TOKEN) with every call."),
)


@dataclass(frozen=True)
class Connect:
    """Where a command's calls go, and the credentials they present."""

    address: str
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token: str | None = None

    def client(self, **options: Any) -> Any:
        from memstore.client.core import Client

        return Client(self.address, tls_ca=_str(self.tls_ca), tls_cert=_str(self.tls_cert),
                      tls_key=_str(self.tls_key), token=self.token, **options)

    def credentials(self) -> Any:
        from memstore.server.security import Credentials

        return Credentials.load(self.tls_ca, self.tls_cert, self.tls_key, self.token)

    def checked_credentials(self) -> Any:
        """`credentials()`, or a UsageError naming the flags that are wrong and what to
        give: Credentials.load's own messages name its Python arguments, and a key that
        is not the certificate's would fail only at the first call, as a TLS error."""
        from memstore.server.security import check_certificates, check_key_pair

        if (self.tls_cert is None) != (self.tls_key is None):
            raise click.UsageError("--tls-cert and --tls-key ($MEMSTORE_TLS_CERT, "
                                   "$MEMSTORE_TLS_KEY) go together: a client certificate "
                                   "and its private key")
        if self.tls_cert is not None and self.tls_ca is None:
            raise click.UsageError("--tls-cert: a client certificate is presented over "
                                   "TLS: give --tls-ca ($MEMSTORE_TLS_CA), the CA that "
                                   "signed the server's certificate")
        try:
            if self.tls_ca is not None:
                check_certificates(self.tls_ca, "--tls-ca")
            if self.tls_cert is not None and self.tls_key is not None:
                check_key_pair(self.tls_cert, self.tls_key)
            return self.credentials()
        except (ValueError, OSError) as exc:
            raise click.UsageError(str(exc)) from None


def listen_host(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A --host as every HOST:PORT a process forms and prints takes it: an IPv6 address
    in brackets ("::1" -> "[::1]"), so that gRPC, routers and clients read the address
    back as one host and a port. (The link and metrics sockets take it without.)"""
    import ipaddress

    try:
        bare = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return value  # a name or an IPv4 address: as given
    return f"[{bare}]" if bare.version == 6 else value


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def client_security(command: F) -> F:
    """Add --tls-ca, --tls-cert, --tls-key and --token (each also from its environment
    variable) to a command; it receives them as one `credentials` (memstore.server.security)."""
    @functools.wraps(command)
    def wrapper(*args: Any, tls_ca: Path | None, client_cert: Path | None,
                client_key: Path | None, token: str | None, **kwargs: Any) -> Any:
        credentials = Connect("", tls_ca, client_cert, client_key, token).checked_credentials()
        return command(*args, credentials=credentials, **kwargs)

    return with_options(wrapper, CLIENT_SECURITY)  # type: ignore[return-value]


def connection(command: F) -> F:
    """Add --address ($MEMSTORE_ADDRESS) and the client security options to a command; it
    receives them as one `connect` (a Connect)."""
    @functools.wraps(command)
    def wrapper(*args: Any, address: str, tls_ca: Path | None, client_cert: Path | None,
                client_key: Path | None, token: str | None, **kwargs: Any) -> Any:
        connect = Connect(address, tls_ca, client_cert, client_key, token)
        connect.checked_credentials()
        return command(*args, connect=connect, **kwargs)

    wrapper = with_options(wrapper, CLIENT_SECURITY)
    wrapper = click.option(
        "--address", default=DEFAULT_ADDRESS, show_default=True, envvar="MEMSTORE_ADDRESS",
        show_envvar=True, help="The server or router to talk to.")(wrapper)
    return wrapper  # type: ignore[return-value]


DEFAULT_ADDRESS = "127.0.0.1:7070"
