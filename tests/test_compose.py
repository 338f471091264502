"""compose.yaml, checked without Docker: every service's command parses as the memstore
CLI would take it, every address a command names is a service of the file on the port it
serves, every data volume is declared and mounted by one service alone, and the cluster's
salt is one volume every shard and replica reads."""

from __future__ import annotations

from typing import Any

import click
import yaml

from memstore.cli import main
from tests.conftest import ROOT


def _services() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]  # type: ignore[no-any-return]


def _values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == flag]


def test_every_command_parses_and_names_services_of_the_file() -> None:
    services = _services()
    served = {f"{name}:{_values(s['command'], '--port')[0]}" for name, s in services.items()}
    for name, service in services.items():
        args = service["command"]
        command = main.commands[args[0]]
        with click.Context(command) as context:
            command.parse_args(context, list(args[1:]))  # an unknown flag raises
        for flag in ("--replica-of", "--shard", "--advertise"):
            for address in _values(args, flag):
                assert address in served, (name, flag, address)
        for address in _values(args, "--replica-of"):
            assert address.split(":")[0] in service.get("depends_on", []), name


def test_a_replica_runs_beside_its_primary_on_a_volume_of_its_own() -> None:
    services = _services()
    replicas = {name: _values(s["command"], "--replica-of") for name, s in services.items()}
    assert replicas["shard-0-replica"] == ["shard-0:7071"]
    data = [volume.split(":")[0] for s in services.values()
            for volume in s.get("volumes", []) if volume.endswith(":/data")]
    assert len(data) == len(set(data))  # no two processes on one data directory
    # one salt, shared by every shard and replica (slot moves and failovers carry salted
    # suppression entries), from the one volume that is shared
    shards = {n: s for n, s in services.items() if s["command"][0] == "serve-shard"}
    assert all(_values(s["command"], "--salt-file") == ["/salt/rights.salt"]
               and "salt:/salt" in s["volumes"] for s in shards.values())
    declared = yaml.safe_load((ROOT / "compose.yaml").read_text())["volumes"]
    assert {*data, "salt"} == set(declared)
