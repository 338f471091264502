"""The `memstore` command: serve, load, get, query, segment, watch, changes, snapshot,
check, repair, cluster.

Every command that talks to a server takes --address (default 127.0.0.1:7070, the router
that `memstore serve` starts). Errors print the server's message and exit with status 1.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator
from datetime import datetime
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any

import click

from memstore.cli.options import (
    LINK_PORT,
    Connect,
    F,
    connection,
    listen_host,
    query_limits,
    replication_settings,
    server_security,
    shard_settings,
    with_options,
)
from memstore.client import loader
from memstore.client.core import LOAD_CHUNK, LOAD_CONCURRENCY, Client, ClientError, LoadError
from memstore.client.events import EVENT_CHUNK


def _logging(verbose: bool, **context: str) -> None:
    from memstore.server import logs

    logs.setup(verbose, **context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="memstore")
def main() -> None:
    """memstore: in-memory real-time customer profiles and segment queries."""
    # Every file memstore writes may hold personal data (logs, snapshots, exports, rejected
    # lines, audit logs): readable by this user only (0600; directories 0700).
    os.umask(0o077)


@main.command("serve-shard")
@click.option("--host", default="127.0.0.1", show_default=True, callback=listen_host,
              help="Address to listen on (loopback by default).")
@click.option("--port", default=7071, show_default=True, help="Port; 0 picks a free one.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("memstore-data"),
              show_default=True,
              help="Log and snapshots of this shard. A `memstore serve` cluster's directory "
                   "is refused: give one of its shard-i directories.")
@click.option("--in-memory", is_flag=True, help="Keep nothing on disk (tests, benchmarks).")
@click.option("--name", default="shard-0", show_default=True, help="Stable shard name.")
@click.option("--slots", default=None,
              help="Slots to own on first start, e.g. 0-8191 (default: all). Later starts "
                   "read ownership from the data directory.")
@shard_settings
@LINK_PORT
@click.option("--metrics-port", type=int, default=None,
              help="Serve Prometheus metrics on this port (same host; 0 picks one). "
                   "Default: no metrics endpoint.")
@click.option("--lock-wait", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Seconds to wait for the data directory when another process owns it "
                   "(0: refuse at once, naming that process).")
@click.option("--stop-on-eof", is_flag=True,
              help="Stop cleanly when standard input closes. `memstore serve` starts its "
                   "shards so, over a pipe it holds: they stop within seconds of its death, "
                   "however it dies.")
@server_security
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None,
              help="Follow a primary (--replica-of, --coordinator) over TLS trusting this "
                   "CA. Default with --tls-cert: --tls-client-ca, else the --tls-cert "
                   "itself (as `serve`'s router). The replica presents its --tls-cert "
                   "where shards require client certificates (--tls-client-ca), and "
                   "$MEMSTORE_CLUSTER_TOKEN.")
@click.option("--salt-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The cluster's salt for suppression entries and the hashes in erasure "
                   "receipts (64 hex digits), made there if missing. Give every shard of a "
                   "cluster the same file (`memstore serve` does). Default: "
                   "DATA_DIR/rights.salt; with --in-memory, a new one each start.")
@replication_settings
@click.option("--advertise", metavar="HOST:PORT", default=None,
              help="Where other processes reach this shard, when not at --host:--port "
                   "(--host 0.0.0.0 in a container): the address a replica gives its "
                   "primary for reads, and a member's under --coordinator. Default: "
                   "--host:--port.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug lines too.")
def serve_shard(host: str, port: int, data_dir: Path, in_memory: bool, name: str,
                slots: str | None, sync: str, snapshot_log_mb: int, snapshot_interval: float,
                stop_snapshot_timeout: float, changes_retention: float,
                segment_refresh: float, max_identifiers_per_kind: int,
                blocked_identifier: tuple[str, ...],
                max_query_bytes: int, max_query_items: int, max_query_predicates: int,
                event_days: int, no_link: bool, link_port: int, metrics_port: int | None,
                lock_wait: float,
                stop_on_eof: bool, tls_cert: Path | None, tls_key: Path | None,
                tls_client_ca: Path | None, auth_file: Path | None, insecure: bool,
                audit_log: Path | None, tls_ca: Path | None, salt_file: Path | None,
                replica_of: str | None,
                replication: str, replication_timeout: float, replication_fallback: bool,
                coordinator: str | None, lease_seconds: int, advertise: str | None,
                verbose: bool) -> None:
    """Run one shard process (the cluster's `serve` starts these for you), or with
    --replica-of a read-only replica of one, or with --coordinator a member of a shard
    that fails over by itself (docs/replication.md)."""
    import uvloop

    from memstore.engine.identity import DEFAULT_BLOCKED, IdentityRules
    from memstore.server import audit, rights
    from memstore.server.heap import manage_heap
    from memstore.server.security import (
        AuthFileError,
        Credentials,
        ServerSecurity,
        cluster_token_from_env,
    )
    from memstore.server.service import serve
    from memstore.shard import ShardConfig
    from memstore.storage.datadir import refuse_cluster_dir
    from memstore.storage.wal_writer import SyncPolicy

    _logging(verbose, role="shard", shard=name)
    manage_heap()  # one arena; glibc's thresholds for recovery, serve() switches after
    try:
        security = ServerSecurity.configure(tls_cert, tls_key, tls_client_ca, auth_file,
                                            insecure, cluster_token_from_env())
        security.check_host(host)
        if not in_memory:  # before the salt file below makes anything there
            refuse_cluster_dir(data_dir)
        if salt_file is None and not in_memory:
            data_dir.mkdir(parents=True, exist_ok=True)
            salt_file = data_dir / rights.SALT_FILE
        salt = rights.load_salt(salt_file) if salt_file else os.urandom(32)
        # what a replica presents to its primary: a router's credentials (docs/security.md)
        primary_credentials = Credentials.member(tls_ca, tls_cert, tls_key, tls_client_ca,
                                                 cluster_token_from_env())
    except (AuthFileError, ValueError, OSError) as exc:
        click.echo(f"memstore: {exc}", err=True)
        sys.exit(1)
    audit.open_log(audit_log)
    rules = IdentityRules(
        max_per_kind=max_identifiers_per_kind,
        blocked=DEFAULT_BLOCKED | {b.strip().lower() for b in blocked_identifier},
    )
    config = ShardConfig(data_dir=None if in_memory else data_dir, name=name,
                         sync=SyncPolicy(sync), snapshot_log_bytes=snapshot_log_mb << 20,
                         snapshot_interval=snapshot_interval, rules=rules,
                         lock_wait=lock_wait, stop_snapshot_timeout=stop_snapshot_timeout,
                         salt=salt, event_days=event_days,
                         changes_retention=changes_retention * 3600.0,
                         segment_refresh=segment_refresh)
    owned = _parse_slots(slots) if slots else None
    try:
        uvloop.run(serve(config, host, port, owned, metrics_port=metrics_port,
                         link_port=None if no_link else link_port, stop_on_eof=stop_on_eof,
                         security=security,
                         limits=query_limits(max_query_bytes, max_query_items,
                                             max_query_predicates),
                         replica_of=replica_of, replication=replication,
                         replication_timeout=replication_timeout,
                         replication_fallback=replication_fallback,
                         primary_credentials=primary_credentials,
                         coordinator=coordinator, lease_seconds=lease_seconds,
                         advertise=advertise))
    except Exception as exc:  # noqa: BLE001 - start-up failures: damaged log, port in use
        click.echo(f"memstore: {exc}", err=True)
        sys.exit(1)


def _parse_slots(text: str) -> Any:
    from pyroaring import BitMap

    from memstore.hashslot import SLOT_COUNT

    bm = BitMap()
    for part in text.split(","):
        start, _, end = part.partition("-")
        try:
            lo, hi = int(start), int(end or start)
        except ValueError:
            raise click.BadParameter(f"slot range {part!r} is not N or N-M (for example "
                                     "0-8191,10000)", param_hint="--slots") from None
        if not 0 <= lo <= hi < SLOT_COUNT:
            raise click.BadParameter(f"slot range {part!r} outside 0-{SLOT_COUNT - 1}")
        bm.add_range(lo, hi + 1)
    return bm


def _file_load_options(chunk_size: int, items: str) -> Callable[[F], F]:
    """FILE and the options `load` and `load-events` share: format, rejects, chunk size
    (`chunk_size` `items` a request), concurrency, progress."""
    decorators = [
        click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path)),
        click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "parquet"]),
                     default=None, help="Input format (default: from the file name; .csv, "
                                        ".parquet, else jsonl)."),
        click.option("--rejects", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Write each refused line (and why) to this file as JSON Lines and "
                          "go on with the rest; exit 1 if any was refused. Default: stop at "
                          "the first refused line (every line before it loaded)."),
        click.option("--chunk-size", default=chunk_size, show_default=True,
                     help=f"{items} a request."),
        click.option("--concurrency", default=LOAD_CONCURRENCY, show_default=True,
                     help="Requests in flight."),
        click.option("--no-progress", is_flag=True, help="No progress bar on stderr."),
    ]

    return lambda command: with_options(command, decorators)


# ---------------------------------------------------------------------- data commands

@main.command()
@_file_load_options(LOAD_CHUNK, "Profiles")
@connection
def load(file: Path, fmt: str | None, rejects: Path | None, chunk_size: int,
         concurrency: int, no_progress: bool, connect: Connect) -> None:
    """Load profiles from FILE: JSON Lines ({"id", "attributes", "identifiers"} per line),
    CSV (an id column, one column per attribute) or Parquet (an id column). Ends with
    `loaded N profiles`, N being what the server applied, also when it stops early; an
    error names the file, the line and the record's id. Attributes the schema declares
    take its kinds (timestamps from ISO-8601 strings); see docs/user-guide.md "Loading"."""
    from tqdm import tqdm

    fmt = loader.format_of(file, fmt)
    with connect.client(timeout=None) as client:
        try:
            declared = loader.header(file, fmt)  # an export's schema line: declared first
            if declared:
                client.declare(declared)
            schema = {a["name"]: a["kind"] for a in client.schema()}
        except ClientError as exc:
            raise click.ClickException(str(exc)) from None
        except ValueError as exc:
            raise click.ClickException(f"{file.name}: {exc}") from None
        with tqdm(unit=" profiles", disable=no_progress, file=sys.stderr,
                  total=loader.count_lines(file, fmt), desc=f"loading {file.name}") as bar:
            run = _LoadRun(file, rejects, chunk_size * (concurrency + 2), bar.update)
            applied = run.send(lambda: client.load(
                run.records(loader.read(file, fmt, schema)), chunk_size=chunk_size,
                concurrency=concurrency, progress=bar.update,
                on_refused=run.refused if rejects else None))
    run.report(applied)


@main.command("load-events")
@_file_load_options(EVENT_CHUNK, "Events")
@connection
def load_events(file: Path, fmt: str | None, rejects: Path | None, chunk_size: int,
                concurrency: int, no_progress: bool, connect: Connect) -> None:
    """Track events from FILE, history included: JSON Lines ({"id" or "identifier",
    "event", "at", "count"} per line), CSV (a header naming those columns) or Parquet.
    "at" is an ISO-8601 time (no offset: UTC; absent: now), "count" defaults to 1, an
    "identifier" is [kind, value] or "kind:value". Ends with `loaded N events`, N being
    what the server applied; an error names the file, the line and the profile. See
    docs/user-guide.md "Events"."""
    from tqdm import tqdm

    fmt = loader.format_of(file, fmt)
    _collect_rarely()
    with connect.client(timeout=None) as client, tqdm(
            unit=" events", disable=no_progress, file=sys.stderr,
            total=loader.count_lines(file, fmt), desc=f"loading {file.name}") as bar:
        run = _LoadRun(file, rejects, chunk_size * (concurrency + 2), bar.update, "events")
        applied = run.send(lambda: client.load_events(  # each line's event, checked once
            run.records(loader.read_event_blocks(file, fmt), attrgetter("event")),
            chunk_size=chunk_size,
            concurrency=concurrency, progress=bar.update,
            on_refused=run.refused if rejects else None))
    run.report(applied)


def _collect_rarely() -> None:
    """For a long load: what start-up built out of the collector's sight, young passes
    every 200,000 net allocations and full ones rarely. A load keeps its window of recent
    lines (~200,000 objects a chunk size of 20,000) alive, and every line makes a few
    containers: at Python's defaults the collector walked that window again and again
    (load-events: 14.6-15.3 -> 9.7-11.1 us of CLI CPU an event, 200,000 events)."""
    gc.freeze()
    gc.set_threshold(200_000, 50, 1000)


class _LoadRun:
    """`memstore load`'s (and load-events') side of a load: lines read, refused lines, where
    each record of the load came from (a window of the latest ones: a refusal comes back
    while at most `window` newer records were read)."""

    def __init__(self, file: Path, rejects: Path | None, window: int,
                 advance: Any, noun: str = "profiles") -> None:
        self.noun = noun
        self.file = file
        self.rejects_path = rejects
        self.rejects = rejects.open("w", encoding="utf-8") if rejects else None
        self.window = window
        self.advance = advance
        self.lines: dict[int, Any] = {}  # load index -> loader.Line
        self.blocks: deque[tuple[int, loader.EventBlock]] = deque()  # (first load index, block)
        self.refused_count = 0
        self.error = ""

    def records(self, lines: Iterator[Any], item: Callable[[Any], Any] = attrgetter("record")
                ) -> Iterator[Any]:
        """What the load sends of each good line (`item`: its record, or an event line's
        checked event); a block of event lines (loader.EventBlock) sends its events."""
        index = 0
        for line in self._good(lines):
            if isinstance(line, loader.EventBlock):
                self.blocks.append((index, line))
                while self.blocks[0][0] + len(self.blocks[0][1].events) <= index - self.window:
                    self.blocks.popleft()
                yield from line.events
                index += len(line.events)
                continue
            self.lines[index] = line
            self.lines.pop(index - self.window, None)
            yield item(line)
            index += 1

    def line(self, index: int) -> Any:
        """The Line of record `index` of the load, if it is still in the window."""
        if index in self.lines:
            return self.lines[index]
        at = bisect_right(self.blocks, index, key=itemgetter(0)) - 1
        if at >= 0:
            start, block = self.blocks[at]
            if index - start < len(block.events):
                return block.line(index - start)
        return None

    def _good(self, lines: Iterator[Any]) -> Iterator[Any]:
        for line in lines:
            if isinstance(line, loader.EventBlock) or not line.error:
                yield line
                continue
            self.advance(1)
            if self.rejects is None:  # stop here: every line before it was sent
                self.error = self._describe(line, line.error)
                return
            self._reject(line, line.error)

    def send(self, load: Callable[[], int | None]) -> int | None:
        """Run the load; what the server applied (None: it did not say). A refusal that
        stops it, or an error, is kept for `report`."""
        try:
            return load()
        except LoadError as exc:
            self.failed(exc)
            return exc.applied
        except (ClientError, ValueError, TypeError) as exc:
            self.error = str(exc)
            return None
        finally:
            self.close()

    def report(self, applied: int | None) -> None:
        """Say what applied and what was refused; exit 1 when anything was."""
        click.echo(f"loaded {applied} {self.noun}" if applied is not None
                   else f"loaded an unknown number of {self.noun} (the server did not say)")
        if self.refused_count:
            lines = "line" if self.refused_count == 1 else "lines"
            click.echo(f"refused {self.refused_count} {lines}: see {self.rejects_path}",
                       err=True)
        if self.error:
            raise click.ClickException(self.error)
        if self.refused_count:
            sys.exit(1)

    def refused(self, index: int, pid: str, error: ClientError) -> None:
        """The server refused record `index` of the load; the load goes on."""
        line = self.line(index)
        self.advance(1)
        self._reject(line, _reason(error.details), pid)

    def failed(self, exc: LoadError) -> None:
        line = None if exc.record is None else self.line(exc.record)
        reason = _reason(exc.details)
        if line is not None:
            message = self._describe(line, f"{exc.code.name}: {reason}", exc.id)
        else:
            message = f"{self.file.name}: {exc.code.name}: {reason}"
        if exc.unknown:
            message += (f" ({exc.unknown} {self.noun} sent were not answered: they may or "
                        "may not have loaded)")
        resume = self.line(exc.sent)  # the first record not sent, if the load read it
        if resume is not None:
            message += f"; nothing from {resume.where} on was sent"
        if not self.error or line is not None:  # the server's refusal came first
            self.error = message

    def _describe(self, line: Any, reason: str, pid: str | None = None) -> str:
        pid = pid or line.id
        label = "identifier" if line.record and "identifier" in line.record else "id"
        return f"{line.where}{f' ({label} {pid!r})' if pid else ''}: {reason}"

    def _reject(self, line: Any, reason: str, pid: str | None = None) -> None:
        self.refused_count += 1
        assert self.rejects is not None
        entry = {"where": line.where if line else "?", "id": pid or (line.id if line else None),
                 "error": reason, "line": line.text if line else ""}
        self.rejects.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.rejects is not None:
            self.rejects.close()


def _reason(details: str) -> str:
    """A server's refusal without the request's own position of the record ("columns[5]
    .attributes.price: ..." -> "attributes.price: ..."): the file's line says where."""
    return re.sub(r"^(requests|packed|columns|events)\[\d+\]\.?", "", details).lstrip(": ")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    raise TypeError(type(value).__name__)


@main.command()
@click.argument("id", required=False)
@click.option("--identifier", nargs=2, metavar="KIND VALUE", default=None,
              help="Look up by an identifier instead of the primary id.")
@click.option("--attribute", "-a", multiple=True, help="Return only these attributes.")
@connection
def get(id: str | None, identifier: tuple[str, str] | None, attribute: tuple[str, ...],
        connect: Connect) -> None:
    """Print the profile ID as JSON."""
    if id is None and identifier is None:
        raise click.UsageError("give an ID or --identifier KIND VALUE")
    with connect.client() as client:
        try:
            profile = client.get(id, identifier=identifier, attributes=attribute)
        except ClientError as exc:
            raise click.ClickException(str(exc)) from None
    if profile is None:
        raise click.ClickException(f"profile {id or identifier} not found")
    click.echo(json.dumps(profile, default=_json_default, ensure_ascii=False))


@main.command()
@click.argument("id", required=False)
@click.option("--identifier", nargs=2, metavar="KIND VALUE", default=None,
              help="The person holding this identifier instead of the primary id.")
@click.option("--query", "expression", default=None, metavar="EXPR",
              help="Bulk: every profile matching EXPR (ALL: every profile), consistent as of "
                   "one moment per shard; written to --output (default: JSON Lines on "
                   "standard output).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --query: the file to write, JSON Lines or Parquet by its suffix "
                   "(.parquet), readable by `memstore load`.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@connection
def export(id: str | None, identifier: tuple[str, str] | None, expression: str | None,
           output: Path | None, no_progress: bool, connect: Connect) -> None:
    """Print everything held about the person ID (or --identifier KIND VALUE) as JSON, or
    write every profile matching --query to --output (docs/data-rights.md)."""
    if (id is not None) + (identifier is not None) + (expression is not None) != 1:
        raise click.UsageError("give one of ID, --identifier KIND VALUE or --query EXPR")
    if output is not None and expression is None:
        raise click.UsageError("--output goes with --query")
    if expression is None:
        with connect.client() as client:
            try:
                found = client.export(id, identifier=identifier)
            except ClientError as exc:
                raise click.ClickException(str(exc)) from None
        if found is None:
            raise click.ClickException(f"profile {id or ' '.join(identifier or ())} not found")
        click.echo(json.dumps(found, default=_json_default, ensure_ascii=False, indent=2))
        return
    _export_many(expression, output, no_progress, connect)


def _export_many(expression: str, output: Path | None, no_progress: bool,
                 connect: Connect) -> None:
    """Write every profile matching `expression` to `output` (None: standard output). A
    file takes the place of one already at `output` only once the export is complete
    (files.replacing): a refused or broken export leaves the earlier one as it was."""
    from memstore.client import export as files

    parquet = output is not None and output.suffix.lower() == ".parquet"
    with connect.client(timeout=None) as client:
        try:
            if output is None:
                written = _export_to(client, expression, None, False, "stdout", no_progress)
            else:
                with files.replacing(output) as partial:
                    written = _export_to(client, expression, partial, parquet, output.name,
                                         no_progress)
        except (ClientError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(f"cannot write the export to {output or 'stdout'}: "
                                       f"{exc}") from None
    click.echo(f"exported {written} profiles", err=True)


def _export_to(client: Client, expression: str, path: Path | None, parquet: bool,
               shown: str, no_progress: bool) -> int:
    """The export itself, to `path` (Parquet or JSON Lines) or to standard output (None:
    JSON Lines), with a progress bar naming `shown`; returns how many profiles."""
    from tqdm import tqdm

    from memstore.client import export as files

    # Day records are not in bulk exports (the shards leave them out): their history loads
    # again with load-events, from the events it was made of.
    schema = [a for a in client.schema() if a["kind"] != "event_days"]
    total = client.count(expression)
    with tqdm(unit=" profiles", disable=no_progress, file=sys.stderr, total=total,
              desc=f"exporting to {shown}") as bar:
        if path is None:
            return files.write_jsonl(sys.stdout.buffer, schema,
                                     client.iter_export_lines(expression), bar.update)
        if parquet:
            names = [a["name"] for a in schema]
            return files.write_parquet(path, schema,
                                       client.iter_export_columns(expression, names),
                                       bar.update)
        with path.open("wb") as out:
            return files.write_jsonl(out, schema, client.iter_export_lines(expression),
                                     bar.update)


@main.command()
@click.argument("id", required=False)
@click.option("--identifier", nargs=2, metavar="KIND VALUE", default=None,
              help="Erase the person holding this identifier.")
@click.option("--query", "expression", default=None, metavar="EXPR",
              help="Bulk: erase every profile matching EXPR (asks first unless --yes).")
@click.option("--yes", is_flag=True, help="With --query: erase without asking.")
@click.option("--suppress", is_flag=True,
              help="Also keep salted hashes of the ids and identifiers erased, so that a "
                   "later write naming one is refused (a re-import from a stale source).")
@connection
def delete(id: str | None, identifier: tuple[str, str] | None, expression: str | None,
           yes: bool, suppress: bool, connect: Connect) -> None:
    """Erase the person ID (or --identifier KIND VALUE, or every profile matching --query)
    and print the receipt as JSON: what was removed, when, and each shard's log position
    after which no snapshot holds it (docs/data-rights.md)."""
    if (id is not None) + (identifier is not None) + (expression is not None) != 1:
        raise click.UsageError("give one of ID, --identifier KIND VALUE or --query EXPR")
    if yes and expression is None:
        raise click.UsageError("--yes goes with --query")
    with connect.client(timeout=None) as client:
        try:
            if expression is None:
                receipt = client.erase(id, identifier=identifier, suppress=suppress)
                if receipt is None:
                    raise click.ClickException(
                        f"profile {id or ' '.join(identifier or ())} not found; nothing erased")
                click.echo(json.dumps(receipt, default=_json_default, ensure_ascii=False,
                                      indent=2))
                return
            if not yes:
                count = client.count(expression)
                click.confirm(f"erase {count} profiles matching {expression!r}?", abort=True,
                              err=True)
            erased = 0
            for receipt in client.iter_erase(expression, suppress=suppress):
                erased += len(receipt["erased"])
                click.echo(json.dumps(receipt, default=_json_default, ensure_ascii=False))
        except ClientError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"erased {erased} profiles", err=True)


@main.command()
@click.argument("expression")
@click.option("--count", "count_only", is_flag=True, help="Print the count alone.")
@click.option("--group-by", default=None, help="Print counts per value of this attribute.")
@click.option("--top", default=10, show_default=True, help="With --group-by: top N values.")
@click.option("--limit", default=0, help="Print at most this many ids (0: all).")
@click.option("--partial", is_flag=True, help="Answer even if some shards are down.")
@connection
def query(expression: str, count_only: bool, group_by: str | None, top: int, limit: int,
          partial: bool, connect: Connect) -> None:
    """Run a segment query (see docs/user-guide.md "Queries") and print matching ids."""
    with connect.client(timeout=None) as client:
        try:
            if count_only:
                click.echo(client.count(expression, allow_partial=partial))
            elif group_by:
                for value, n in client.group_by(expression, group_by, top,
                                                allow_partial=partial):
                    click.echo(f"{json.dumps(value, default=_json_default)}\t{n}")
            else:
                for printed, pid in enumerate(client.iter_ids(expression), 1):
                    click.echo(pid)
                    if limit and printed >= limit:
                        break
        except ClientError as exc:
            raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("name")
@click.argument("kind", type=click.Choice(["string", "int", "float", "bool", "timestamp",
                                           "string_list"]))
@click.option("--not-indexed", is_flag=True,
              help="Store and return the attribute but never query it (free text, PII).")
@click.option("--merge", type=click.Choice(["default", "sum", "min", "max"]), default="default",
              show_default=True, help="How values combine when two profiles merge.")
@connection
def declare(name: str, kind: str, not_indexed: bool, merge: str, connect: Connect) -> None:
    """Declare attribute NAME with a KIND (before its first write fixes it)."""
    with connect.client() as client:
        try:
            client.declare([{"name": name, "kind": kind, "indexed": not not_indexed,
                             "merge": merge}])
        except ClientError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"declared {name} {kind}")


@main.command()
@connection
def schema(connect: Connect) -> None:
    """Print the attribute schema as JSON lines."""
    with connect.client() as client:
        try:
            for spec in client.schema():
                click.echo(json.dumps(spec))
        except ClientError as exc:
            raise click.ClickException(str(exc)) from None


@main.command()
@connection
def snapshot(connect: Connect) -> None:
    """Take a snapshot now (on a router: every shard)."""
    with connect.client(timeout=None) as client:
        try:
            info = client.snapshot()
        except ClientError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(info))


@main.command()
@connection
def stats(connect: Connect) -> None:
    """Print counts and state of the server."""
    with connect.client() as client:
        try:
            click.echo(json.dumps(client.stats(), indent=2))
        except ClientError as exc:
            raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--timeout", type=click.FloatRange(0.1), default=3.0, show_default=True,
              help="Seconds to wait for the answer.")
@connection
def health(timeout: float, connect: Connect) -> None:
    """Ask a server's health check (gRPC grpc.health.v1): exit 0 if it is serving, 1 if not
    or if it does not answer. For load balancers and container health checks."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = connect.credentials().channel(connect.address)
    try:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=timeout)
    except grpc.RpcError as exc:
        click.echo(f"{connect.address}: {exc.code().name}: {exc.details()}", err=True)  # type: ignore[attr-defined]
        sys.exit(1)
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    click.echo(f"{connect.address}: {status}")
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        sys.exit(1)


@main.command()
@click.argument("roles", default="read")
@click.argument("name", required=False)
def token(roles: str, name: str | None) -> None:
    """Print a new random token as a line for an --auth-file: TOKEN ROLES [NAME] (roles:
    read, write, admin, cluster; comma-separated)."""
    from memstore.server.security import ROLES, new_token

    unknown = sorted(set(roles.split(",")) - set(ROLES))
    if unknown:
        raise click.BadParameter(f"unknown role {unknown[0]!r}; roles are {', '.join(ROLES)}")
    click.echo(" ".join([new_token(), roles, *([name] if name else [])]))


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def check(data_dir: Path) -> None:
    """Verify a shard's snapshots and log; exit 1 if anything is damaged or start-up
    would fail (for example: the log no longer reaches back to the usable snapshot).
    Given the directory of a `memstore serve` cluster, check each shard's directory in
    it (replicas' too) and exit 1 if any fails."""
    from memstore.storage.datadir import is_cluster_dir

    ok = _check_cluster(data_dir) if is_cluster_dir(data_dir) else _check_shard(data_dir)
    if not ok:
        sys.exit(1)


def _check_cluster(root: Path) -> bool:
    """`memstore check` on a cluster's directory: each shard's directory its cluster.json
    names or it holds, in turn, then a line a shard. A directory cluster.json names and
    that is missing fails: that shard would start empty."""
    from memstore.storage.datadir import cluster_members

    members = cluster_members(root)
    click.echo(f"{root} is a `memstore serve` cluster: checking {len(members)} shard "
               "directories")
    results: dict[str, str] = {}
    for member in members:
        click.echo(f"== {member.name} ({member})")
        if not member.is_dir():
            click.echo(f"MISSING: {member} does not exist; the cluster names it, so that "
                       "shard would start empty (restore it from a backup)")
            results[member.name] = "MISSING"
            continue
        results[member.name] = "ok" if _check_shard(member) else "FAILED"
    click.echo("cluster: " + (", ".join(f"{n} {r}" for n, r in results.items())
                              or f"no shard directories in {root}"))
    return bool(results) and all(r == "ok" for r in results.values())


def _check_shard(data_dir: Path) -> bool:
    """`memstore check` on one shard's directory, printed; whether start-up would succeed
    with nothing damaged."""
    from memstore.storage.dirlock import holder
    from memstore.storage.snapshot_file import SnapshotError, SnapshotReader, load_newest
    from memstore.storage.wal_reader import LogCorruptError, read_log
    from memstore.storage.wal_reader import check as check_log

    owner = holder(data_dir)
    if owner is not None:
        click.echo(f"in use: process {owner or '?'} owns {data_dir} (a running shard); "
                   "what follows is read while it writes, so its newest records may be "
                   "incomplete")
    bad = False
    for path in sorted((data_dir / "snapshots").glob("snap-*.snap")):
        try:
            SnapshotReader(path)
            click.echo(f"snapshot {path.name}: ok")
        except (SnapshotError, OSError) as exc:
            click.echo(f"snapshot {path.name}: DAMAGED: {exc}")
            bad = True
    reader = load_newest(data_dir / "snapshots")
    click.echo(f"start-up would load: {reader.path.name if reader else 'no snapshot'}"
               + (f" (lsn {reader.lsn})" if reader else ""))
    report = check_log(data_dir / "log")
    click.echo(str(report))
    if report.ok:
        try:  # replay exactly as start-up would, from the snapshot's position
            for _ in read_log(data_dir / "log", reader.lsn if reader else 0):
                pass
        except LogCorruptError as exc:
            click.echo(f"start-up would fail: {exc}")
            bad = True
    return report.ok and not bad


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--yes", is_flag=True, help="Do it without asking.")
def repair(data_dir: Path, yes: bool) -> None:
    """Cut a damaged log at its last good record, keeping a backup of what is cut."""
    from memstore.storage.datadir import WrongDataDirectory, refuse_cluster_dir
    from memstore.storage.dirlock import DirectoryLocked, DirLock
    from memstore.storage.wal_reader import check as check_log
    from memstore.storage.wal_reader import repair as repair_log

    try:  # a cluster's directory has no log of its own: one shard's is meant
        refuse_cluster_dir(data_dir, "memstore repair", serve_hint=False)
    except WrongDataDirectory as exc:
        raise click.ClickException(str(exc)) from None
    try:
        lock = DirLock.acquire(data_dir)  # never cut a log that a running shard appends to
    except DirectoryLocked as exc:
        raise click.ClickException(f"{exc}; repair needs the shard stopped") from None
    report = check_log(data_dir / "log")
    click.echo(str(report))
    if report.ok:
        click.echo("nothing to repair")
        return
    if not yes:
        click.confirm("cut the log at the last good record (a backup is kept)?", abort=True)
    click.echo(str(repair_log(data_dir / "log")))
    lock.release()


def _register_stream_commands() -> None:
    from memstore.cli import streams

    for command in (streams.segment, streams.watch, streams.changes):
        main.add_command(command)


_register_stream_commands()


def _register_cluster_commands() -> None:
    try:
        from shards import cli as shards_cli
    except ImportError:  # pragma: no cover - shards/ ships with memstore
        return
    for name in ("serve", "serve_router", "cluster"):
        command = getattr(shards_cli, name, None)
        if command is not None:
            main.add_command(command)


_register_cluster_commands()
