"""The settings every shard takes: one definition for `memstore serve-shard` and for
`memstore serve`, which passes them on to the shards it starts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

SYNC_HELP = ("When the log is fsynced. always: an acknowledged write survives power loss "
             "(group commit keeps it fast). everysec: at most ~1 s of writes lost on power "
             "loss. off: the OS decides (a crash of the process loses nothing, power loss "
             "may). If unsure: always.")

_OPTIONS = (
    click.option("--sync", type=click.Choice(["always", "everysec", "off"]), default="always",
                 show_default=True, help=SYNC_HELP),
    click.option("--snapshot-log-mb", default=512, show_default=True,
                 help="Take a snapshot when the log has grown by this many MiB."),
    click.option("--snapshot-interval", default=3600.0, show_default=True,
                 help="Take a snapshot this many seconds after the last one (if anything "
                      "changed)."),
    click.option("--max-identifiers-per-kind", default=20, show_default=True,
                 help="Merge protection: a profile never holds more identifiers of one kind."),
    click.option("--blocked-identifier", multiple=True,
                 help="Extra identifier values never linked (added to the built-in list)."),
    click.option("--no-link", is_flag=True,
                 help="Serve over gRPC alone, without the link (a lighter protocol for "
                      "unary calls from routers and clients, on a free port of the same "
                      "host)."),
)
NO_LINK = _OPTIONS[-1]

# serve-shard and serve-router: where the link listens (`memstore serve` picks free ports).
LINK_PORT = click.option(
    "--link-port", type=click.IntRange(0, 65535), default=0, show_default=True,
    help="Port of the link on the same host, where routers (to a shard) and clients with "
         "link=True send their unary calls; 0 picks a free one. Fix it where they reach the "
         "server through a published port or a firewall.")


def shard_settings(command: F) -> F:
    """Add --sync, --snapshot-log-mb, --snapshot-interval, --max-identifiers-per-kind,
    --blocked-identifier and --no-link to a click command."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def shard_args(snapshot_log_mb: int, snapshot_interval: float, max_identifiers_per_kind: int,
               blocked_identifier: tuple[str, ...], no_link: bool) -> tuple[str, ...]:
    """The same settings as `serve-shard` arguments (--sync goes separately)."""
    return ("--snapshot-log-mb", str(snapshot_log_mb),
            "--snapshot-interval", str(snapshot_interval),
            "--max-identifiers-per-kind", str(max_identifiers_per_kind),
            *(arg for value in blocked_identifier for arg in ("--blocked-identifier", value)),
            *(("--no-link",) if no_link else ()))
