"""Committed generated code matches the .proto files and the version floors pyproject allows."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = sorted((ROOT / "protos" / "v1").glob("*_pb2*.py*"))


def _floor(requirement_prefix: str) -> tuple[int, ...]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        m = re.match(rf"^{re.escape(requirement_prefix)}\s*>=\s*([0-9.]+)", dep)
        if m:
            return tuple(int(x) for x in m.group(1).split("."))
    raise AssertionError(f"pyproject has no '{requirement_prefix}>=' floor")


def test_generated_code_has_not_drifted(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    work = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", work / "protos", ignore=shutil.ignore_patterns("*_pb2*", "__pycache__"))
    protos = sorted(str(p.relative_to(work)) for p in (work / "protos" / "v1").glob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
                    "--grpc_python_out=.", *protos], cwd=work, check=True)
    fresh = sorted((work / "protos" / "v1").glob("*_pb2*.py*"))
    assert [p.name for p in fresh] == [p.name for p in GENERATED], "file set differs: run scripts/gen_protos.sh"
    for new in fresh:
        old = ROOT / "protos" / "v1" / new.name
        assert new.read_text() == old.read_text(), f"{old} is stale: run scripts/gen_protos.sh and commit"


def test_grpc_floor_covers_generated_code() -> None:
    versions = set()
    for f in GENERATED:
        m = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", f.read_text())
        if m:
            versions.add(tuple(int(x) for x in m.group(1).split(".")))
    assert versions, "no grpc stubs found"
    assert max(versions) <= _floor("grpcio"), "generated stubs need a newer grpcio than pyproject's floor"


def test_protobuf_floor_covers_generated_code() -> None:
    needed = set()
    for f in GENERATED:
        pattern = r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),"
        m = re.search(pattern, f.read_text())
        if m:
            needed.add(tuple(int(x) for x in m.groups()))
    assert needed, "no protobuf gencode version found"
    floor = _floor("protobuf")
    assert max(needed) <= floor, f"gencode {max(needed)} needs protobuf>={max(needed)}, pyproject allows {floor}"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    cap = next(re.search(r"<\s*(\d+)", d) for d in deps if d.startswith("protobuf"))
    assert cap is not None and int(cap.group(1)) == max(needed)[0] + 1, "protobuf must be capped below the next major"
