"""Saved segments and change streams from the command line: `memstore segment create|list|
delete`, `memstore watch` and `memstore changes`.

The two streams print one JSON object per line, flushed as each arrives, so they pipe into
`jq`, a file or another program; every line carries the position to pass to --from to
resume after it. Ctrl-C ends a stream cleanly (exit status 0).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import click

from memstore.cli.options import Connect, connection
from memstore.client.core import ClientError


def _json(value: Any) -> str:
    def default(item: Any) -> Any:
        if isinstance(item, datetime):
            return item.isoformat().replace("+00:00", "Z")
        raise TypeError(type(item).__name__)

    return json.dumps(value, default=default, ensure_ascii=False)


@click.group()
def segment() -> None:
    """Saved segments: queries whose members are kept current on every write, read by
    `in_segment("NAME")` in queries and streamed by `memstore watch`."""


@segment.command("create")
@click.argument("name")
@click.argument("expression")
@click.option("--allow-unknown", is_flag=True,
              help="Accept attributes and events nobody has had yet (a segment defined "
                   "before its data); without it they are refused, as typos.")
@connection
def create(name: str, expression: str, allow_unknown: bool, connect: Connect) -> None:
    """Save EXPRESSION (a query, see `memstore query`) as segment NAME and print it with
    its member count. The same definition again is a no-op; a different one for an
    existing NAME is refused (delete it first)."""
    with connect.client(timeout=None) as client:
        try:
            click.echo(_json(client.create_segment(name, expression,
                                                   allow_unknown=allow_unknown)))
        except ClientError as exc:
            raise click.ClickException(str(exc)) from None


@segment.command("list")
@connection
def list_segments(connect: Connect) -> None:
    """Print every saved segment as a JSON line: name, query, members, created_at, broken
    (a definition that names a dropped attribute or segment matches nobody)."""
    with connect.client() as client:
        try:
            for info in client.segments():
                click.echo(_json(info))
        except ClientError as exc:
            raise click.ClickException(str(exc)) from None


@segment.command("delete")
@click.argument("name")
@connection
def delete(name: str, connect: Connect) -> None:
    """Forget saved segment NAME (its profiles stay; watchers of it see each member leave)."""
    with connect.client() as client:
        try:
            deleted = client.delete_segment(name)
        except ClientError as exc:
            raise click.ClickException(str(exc)) from None
    if not deleted:
        raise click.ClickException(f"no segment {name!r}")
    click.echo(f"deleted {name}")


FROM = click.option("--from", "from_position", default=None, metavar="POSITION",
                    help="Resume after this position (the `position` of the last line you "
                         "processed): nothing in between is lost, also across restarts.")
INITIAL = click.option("--initial", is_flag=True,
                       help="First list what is there now (lines with \"initial\": true), "
                            "then follow on from that moment. Not with --from.")
HEARTBEATS = click.option("--heartbeats", is_flag=True,
                          help="Also print {\"heartbeat\": true, \"position\"} lines when the "
                               "stream is quiet, so a resumable position stays recent.")


def _follow(lines: Iterator[dict[str, Any]]) -> None:
    try:
        for line in lines:
            click.echo(_json(line))
            sys.stdout.flush()
    except ClientError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `memstore watch ... | head`
        sys.stderr.close()


def _check_start(from_position: str | None, initial: bool) -> None:
    if from_position and initial:
        raise click.UsageError("--initial lists the present and follows from now; --from "
                               "resumes from a position: give one of them")


@click.command()
@click.argument("segments", nargs=-1)
@FROM
@INITIAL
@HEARTBEATS
@connection
def watch(segments: tuple[str, ...], from_position: str | None, initial: bool,
          heartbeats: bool, connect: Connect) -> None:
    """Print who enters and leaves the saved SEGMENTS (none: all) as they change, one JSON
    line each: segment, id, change ("enter" or "leave"), position, at."""
    _check_start(from_position, initial)
    with connect.client(timeout=None) as client:
        _follow(client.watch(segments, from_position=from_position, initial=initial,
                             heartbeats=heartbeats))


@click.command()
@click.option("--query", "expression", default=None,
              help="Only profiles matching this query when changed (deletions and merges "
                   "always).")
@click.option("--attribute", "-a", multiple=True,
              help="Only changes of these attributes (repeat; default: all).")
@FROM
@INITIAL
@HEARTBEATS
@connection
def changes(expression: str | None, attribute: tuple[str, ...], from_position: str | None,
            initial: bool, heartbeats: bool, connect: Connect) -> None:
    """Print every change of a profile as it happens, one JSON line each: id, version, set
    (attributes set, with their values), unset, created, deleted, merged_into, position,
    at."""
    _check_start(from_position, initial)
    with connect.client(timeout=None) as client:
        _follow(client.changes(expression, attributes=attribute, from_position=from_position,
                               initial=initial, heartbeats=heartbeats))
