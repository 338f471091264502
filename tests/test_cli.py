"""The `memstore` command through its installed entry point, against a real shard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, ServerProcess


def memstore(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("memstore") or str(Path(sys.executable).parent / "memstore")
    result = subprocess.run([exe, *args], capture_output=True, text=True, timeout=120,
                            check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"memstore {' '.join(args)} failed:\n{result.stderr}")
    return result


def test_load_get_query_count(shard: ServerProcess, tmp_path: Path) -> None:
    address = ["--address", shard.address]
    memstore("declare", "cli.signup", "timestamp", *address)
    memstore("declare", "cli.email", "string", "--not-indexed", *address)
    lines = [
        {"id": f"cli-{i}", "attributes": {"cli": {"n": i, "city": ["Oslo", "Rome"][i % 2],
                                                   "signup": f"2024-01-{i + 1:02d}T00:00:00Z",
                                                   "email": f"p{i}@x.io"}},
         "identifiers": [{"kind": "email", "value": f"p{i}@x.io"}]}
        for i in range(25)
    ]
    lines[5]["attributes"]["cli"]["city"] = None  # JSON null: the attribute is not given
    data = tmp_path / "profiles.jsonl"
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = memstore("load", str(data), *address)
    assert "loaded 25 profiles" in out.stdout
    profile = json.loads(memstore("get", "cli-3", *address).stdout)
    assert profile["attributes"]["cli.city"] == "Rome"
    assert profile["attributes"]["cli.signup"] == "2024-01-04T00:00:00Z"
    assert "cli.city" not in json.loads(memstore("get", "cli-5", *address).stdout)["attributes"]
    by_email = json.loads(memstore("get", "--identifier", "email", "p3@x.io", *address).stdout)
    assert by_email["id"] == "cli-3"
    query = 'cli.city = "Oslo" AND cli.signup >= "2024-01-10"'
    ids = memstore("query", query, *address).stdout.split()
    assert sorted(ids) == sorted(f"cli-{i}" for i in range(25) if i % 2 == 0 and i >= 9)
    rome = memstore("query", "--count", 'cli.city = "Rome"', *address).stdout.strip()
    assert rome == str(sum(1 for i in range(25) if i % 2 and i != 5))
    assert memstore("query", "--count", query, *address).stdout.strip() == str(len(ids))


def test_errors_exit_nonzero_with_the_servers_message(shard: ServerProcess) -> None:
    result = memstore("query", "--count", "cli.n >", "--address", shard.address, check=False)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "column" in result.stderr
    missing = memstore("get", "no-such-profile", "--address", shard.address, check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_bad_input_file_names_the_line(shard: ServerProcess, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"id": "ok", "attributes": {}}\n{not json\n')
    result = memstore("load", str(data), "--address", shard.address, check=False)
    assert result.returncode == 1 and "bad.jsonl:2" in result.stderr


def test_every_command_is_documented_in_the_readme() -> None:
    """sqlite-utils style: a CLI command the README does not mention fails the build."""
    readme = (ROOT / "README.md").read_text()
    help_text = memstore("--help").stdout
    commands = re.findall(r"^  ([a-z][a-z-]+)\s", help_text, flags=re.MULTILINE)
    assert len(commands) >= 8
    missing = [c for c in commands if f"memstore {c}" not in readme]
    assert not missing, f"commands missing from README.md: {missing}"


def test_every_server_option_is_documented_in_operations() -> None:
    """The configuration reference (docs/operations.md) names every option of the three
    server commands, so a new flag (--max-query-items, say) comes with its documentation."""
    import click

    from memstore.cli import main

    reference = (ROOT / "docs" / "operations.md").read_text()
    missing = [f"{name} {opt}" for name in ("serve", "serve-shard", "serve-router")
               for param in main.commands[name].params if isinstance(param, click.Option)
               for opt in param.opts if opt.startswith("--") and opt != "--help"
               and f"`{opt}" not in reference]
    assert not missing, f"options missing from docs/operations.md: {missing}"
def test_the_readme_has_a_data_rights_part_an_operator_can_follow() -> None:
    """Access and erasure requests step by step, what memstore does not cover, the link to
    the full procedure; the options it names exist; the README stays short."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme) <= 15_000
    part = readme.split("\n## Data rights\n", 1)[1].split("\n## ", 1)[0]
    for needle in ("Access request", "memstore export --identifier", "Erasure request",
                   "memstore delete --identifier", "memstore snapshot", "receipt",
                   "Not covered", "Backups", "(docs/data-rights.md)"):
        assert needle in part, needle
    for command, option in (("export", "--query"), ("export", "--output"),
                            ("delete", "--query"), ("delete", "--yes"),
                            ("delete", "--suppress"), ("serve", "--anonymous-ttl"),
                            ("serve", "--audit-log"), ("serve", "--snapshot-interval")):
        assert option in part and option in memstore(command, "--help").stdout, option


@pytest.mark.parametrize("command", ["serve-shard", "load", "get", "query", "check", "repair"])
def test_help_for_every_command(command: str) -> None:
    assert "Usage:" in memstore(command, "--help").stdout


def _commands(group: Any, path: str = "memstore") -> list[tuple[str, Any]]:
    import click

    out = [(path, group)]
    if isinstance(group, click.Group):
        for name, command in group.commands.items():
            out += _commands(command, f"{path} {name}")
    return out


def test_every_option_and_command_has_help() -> None:
    """Each command says what it does and each option what it is for (help text), so
    `--help` is the reference an operator reads."""
    import click

    from memstore.cli import main

    missing = []
    for path, command in _commands(main):
        if not (command.help or "").strip():
            missing.append(path)
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden and not param.help \
                    and "--help" not in param.opts and "--version" not in param.opts:
                missing.append(f"{path} {param.opts[0]}")
    assert not missing, f"without help text: {missing}"


def test_the_client_api_reference_builds(tmp_path: Path) -> None:
    """The Python client's API reference (pdoc, from the docstrings) builds, and documents
    every public method of both clients, each with a docstring."""
    subprocess.run([sys.executable, "-m", "pdoc", "memstore.client", "-o", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    from memstore import AsyncClient, Client

    page = (tmp_path / "memstore" / "client.html").read_text()
    for cls in (Client, AsyncClient):
        for name in dir(cls):
            if not name.startswith("_") and callable(getattr(cls, name)):
                assert f'id="{cls.__name__}.{name}"' in page or \
                    f'id="ClientMethods.{name}"' in page, f"{cls.__name__}.{name} undocumented"
                assert getattr(cls, name).__doc__, f"{cls.__name__}.{name} has no docstring"
