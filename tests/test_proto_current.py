"""The committed generated protobuf code must match proto/: regenerate and compare."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["memstore", "cluster", "replication"])
def test_generated_code_is_current(tmp_path: Path, name: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         str(ROOT / "proto" / "memstore" / "v1" / f"{name}.proto")],
        check=True,
    )
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
        fresh = (tmp_path / "memstore" / "v1" / f"{name}{suffix}").read_text()
        committed = (ROOT / "memstore" / "v1" / f"{name}{suffix}").read_text()
        assert fresh == committed, (
            f"memstore/v1/{name}{suffix} is stale: run `python -m grpc_tools.protoc -Iproto "
            "--python_out=. --pyi_out=. --grpc_python_out=. proto/memstore/v1/*.proto`"
        )
