"""What kind of data directory a path is, so that a command given the other kind refuses it
before it creates or writes anything.

There are two kinds, and the same default name (`memstore-data`) for both:

    a shard's directory (`memstore serve-shard`, `memstore check`, `memstore repair`):
      log/  snapshots/  HISTORY  LOCK  [rights.salt]

    a cluster's directory (`memstore serve`, shards/supervisor.py):
      cluster.json  shard-0/  shard-0-replica-0/  shard-1/ ...  LOCK  rights.salt
      each shard-*/ being a shard's directory

A shard started on a cluster's directory would start empty, own every slot and write its
log beside cluster.json; a cluster started on a shard's directory would build a new, empty
cluster inside it. Either looks like lost data to whoever connects next, so both refuse.

A shard's directory is recognized by any of log/, snapshots/ or HISTORY at its top level.
A cluster's directory is recognized by cluster.json, or, for a first start that stopped
before writing it, by a `shard-*` subdirectory that is a shard's directory (and no shard
data of its own). A missing or empty directory is neither, and suits both.
"""

from __future__ import annotations

import json
from pathlib import Path

CLUSTER_FILE = "cluster.json"  # the supervisor's: shard names and ports
SHARD_MARKS = ("log", "snapshots", "HISTORY")  # what a shard's start-up makes at once


class WrongDataDirectory(ValueError):
    """The data directory is of the other kind (the message says which command fits)."""


def is_shard_dir(directory: Path) -> bool:
    """Whether `directory` holds a shard's data: its log, snapshots or history."""
    return any((directory / mark).exists() for mark in SHARD_MARKS)


def shard_dirs(directory: Path) -> list[Path]:
    """The `shard-*` subdirectories of `directory` that are shards' directories (the
    supervisor's names: shard-0, shard-0-replica-0, ...), sorted by name."""
    try:
        children = sorted(p for p in directory.glob("shard-*") if p.is_dir())
    except OSError:
        return []
    return [p for p in children if is_shard_dir(p)]


def is_cluster_dir(directory: Path) -> bool:
    """Whether `directory` is the data directory of a `memstore serve` cluster."""
    if (directory / CLUSTER_FILE).exists():
        return True
    return not is_shard_dir(directory) and bool(shard_dirs(directory))


def cluster_members(directory: Path) -> list[Path]:
    """The shards' directories of a cluster's directory: those its cluster.json names
    (shards and their replicas; present or not) and those it holds, sorted by name."""
    named: set[Path] = set(shard_dirs(directory))
    try:
        state = json.loads((directory / CLUSTER_FILE).read_text())
        for shard in state["shards"]:
            named.add(directory / shard["name"])
            named.update(directory / r["name"] for r in shard.get("replicas", []))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no or unreadable cluster.json: the directories are all there is to go by
    return sorted(named)


def refuse_cluster_dir(directory: Path, command: str = "memstore serve-shard",
                       serve_hint: bool = True) -> None:
    """Raise WrongDataDirectory if `directory` is a cluster's: `command` wants a shard's.
    `serve_hint`: the message also says how to serve the cluster instead."""
    if not is_cluster_dir(directory):
        return
    shards = shard_dirs(directory)
    example = shards[0] if shards else directory / "shard-0"
    instead = (f", or serve the whole cluster with `memstore serve --data-dir {directory}`"
               if serve_hint else "")
    raise WrongDataDirectory(
        f"{directory} is the data directory of a `memstore serve` cluster "
        f"({_contents(directory)}), not a shard's: give `{command}` one shard's directory, "
        f"such as {example}{instead}")


def refuse_shard_dir(directory: Path) -> None:
    """Raise WrongDataDirectory if `directory` is a shard's: `memstore serve` wants a new
    or empty directory, or a cluster's."""
    if (directory / CLUSTER_FILE).exists() or not is_shard_dir(directory):
        return
    raise WrongDataDirectory(
        f"{directory} is the data directory of a single shard ({_contents(directory)}; no "
        f"{CLUSTER_FILE}), not a cluster's: serve it with `memstore serve-shard --data-dir "
        f"{directory}`, or give `memstore serve` a new or empty directory, or a cluster's")


def _contents(directory: Path) -> str:
    """The entries that told what `directory` is, for the error message."""
    found = [CLUSTER_FILE] if (directory / CLUSTER_FILE).exists() else []
    found += [m for m in SHARD_MARKS if (directory / m).exists()]
    found += [p.name for p in shard_dirs(directory)]
    return ", ".join(found)
