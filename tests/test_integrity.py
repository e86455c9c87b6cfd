"""Agent integrity checks (RECORD hashes, watched directories) and the SDK fingerprint helpers."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import importlib.metadata as md
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.fingerprint import code_fingerprint, config_fingerprint, param_checksum
from agent.integrity import IntegrityMonitor, record_digest, sha256_file
from console.detect import alerts as K
from console.detect.engine import DetectionEngine
from protos.types import SEVERITY_CRITICAL, SEVERITY_WARNING, Event, Frame

NS = 1_000_000_000
T0 = 1_700_000_000 * NS


def _rec_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_dist(site: Path, name: str = "fakepkg", files: dict[str, bytes] | None = None) -> Path:
    """A wheel-installed-looking distribution: package files plus dist-info with METADATA and RECORD."""
    files = files or {f"{name}/__init__.py": b"from .core import f\n", f"{name}/core.py": b"def f():\n    return 1\n",
                      f"{name}/_ext.so": b"\x7fELF fake"}
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    for rel, data in files.items():
        p = site / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = [f"{rel},{_rec_hash(data)},{len(data)}" for rel, data in files.items()]
    lines += [f"{name}-1.0.dist-info/METADATA,,", f"{name}-1.0.dist-info/RECORD,,",
              f"{name}/__pycache__/core.cpython-311.pyc,,"]
    (info / "RECORD").write_text("\n".join(lines) + "\n")
    return site / name


@pytest.fixture
def fakepkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    pkg = make_dist(site)
    monkeypatch.syspath_prepend(str(site))
    md.distribution("fakepkg")  # importable through importlib.metadata
    return pkg


def test_clean_distribution_has_no_findings(fakepkg: Path) -> None:
    mon = IntegrityMonitor(check_packages=["fakepkg", "surely-not-installed-pkg"])
    assert mon.check() == []
    rep = {r.package: r for r in mon.reports}
    assert rep["fakepkg"].hashed == 3 and rep["fakepkg"].mismatches == 0
    assert rep["surely-not-installed-pkg"].note == "not installed"


def test_modified_file_names_the_file_and_is_critical_for_security_packages(fakepkg: Path) -> None:
    mon = IntegrityMonitor(check_packages=["fakepkg"], security_packages=frozenset({"fakepkg"}))
    mon.check()
    core = fakepkg / "core.py"
    original = core.read_bytes()
    core.write_bytes(b"def f():\n    import time; time.sleep(0.1)\n    return 1\n")
    (ev,) = mon.check()
    assert ev.kind == "record_mismatch" and ev.severity == SEVERITY_CRITICAL
    assert ev.attrs["path"] == str(core) and ev.attrs["package"] == "fakepkg"
    assert ev.attrs["expected_sha256"] == hashlib.sha256(original).hexdigest()
    assert ev.attrs["actual_sha256"] == hashlib.sha256(core.read_bytes()).hexdigest()
    assert "core.py" in ev.detail and "owner_uid" in ev.attrs
    assert mon.check() == []  # reported once


def test_added_and_removed_files(fakepkg: Path) -> None:
    mon = IntegrityMonitor(check_packages=["fakepkg"])
    mon.check()
    (fakepkg / "backdoor.py").write_text("import os\n")
    (fakepkg / "notes.txt").write_text("not code")
    (fakepkg / "_ext.so").unlink()
    found = mon.check()
    assert {(e.kind, Path(e.attrs["path"]).name) for e in found} == {
        ("file_added", "backdoor.py"), ("file_removed", "_ext.so")}
    assert all(e.severity == SEVERITY_WARNING for e in found)  # fakepkg is not a security package


def test_stat_cache_still_sees_same_size_same_mtime_rewrites(fakepkg: Path) -> None:
    mon = IntegrityMonitor(check_packages=["fakepkg"])
    mon.check()
    core = fakepkg / "core.py"
    st = core.stat()
    data = core.read_bytes()
    core.write_bytes(data.replace(b"1", b"2"))
    os.utime(core, ns=(st.st_atime_ns, st.st_mtime_ns))  # hide the mtime; ctime still moves
    assert [e.kind for e in mon.check()] == ["record_mismatch"]


def test_record_digest_roundtrip(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"hello")
    assert record_digest(_rec_hash(b"hello").split("=", 1)[1]) == sha256_file(p)


def test_watched_directory_changes(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "a.pt").write_bytes(b"weights-1")
    (root / "b.pt").write_bytes(b"weights-2")
    (root / "huge.bin").write_bytes(b"x" * 5000)
    mon = IntegrityMonitor(watch_paths=[str(root)], check_packages=[], max_file_bytes=4096)
    first = mon.check()
    assert [e.kind for e in first] == ["integrity_skipped"] and first[0].attrs["size"] == "5000"
    (root / "a.pt").write_bytes(b"weights-1-tampered")
    (root / "b.pt").unlink()
    (root / "c.pt").write_bytes(b"new")
    evs = {e.kind: e for e in mon.check()}
    assert set(evs) == {"file_changed", "file_removed", "file_added"}
    assert evs["file_changed"].attrs["path"] == str(root / "a.pt")
    assert evs["file_changed"].attrs["expected_sha256"] == hashlib.sha256(b"weights-1").hexdigest()
    assert mon.check() == []


def test_file_limit_is_reported(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"f{i}").write_text(str(i))
    mon = IntegrityMonitor(watch_paths=[str(tmp_path)], check_packages=[], max_files=3)
    assert [e.kind for e in mon.check()] == ["integrity_limit"]


def test_background_thread_feeds_a_sink(fakepkg: Path) -> None:
    mon = IntegrityMonitor(check_packages=["fakepkg"], interval_s=0.05)
    got: list[Event] = []
    seen = threading.Event()

    def sink(ev: Event) -> None:
        got.append(ev)
        seen.set()

    (fakepkg / "core.py").write_text("tampered\n")
    th = mon.start(sink)
    assert seen.wait(10)
    mon.stop()
    th.join(5)
    assert got[0].kind == "record_mismatch" and len(got) == 1


def test_integrity_event_becomes_an_alert_naming_the_file(fakepkg: Path) -> None:
    mon = IntegrityMonitor(check_packages=["fakepkg"], security_packages=frozenset({"fakepkg"}))
    (fakepkg / "core.py").write_text("tampered\n")
    events = mon.check()
    eng = DetectionEngine()
    v = np.zeros((1, 16), np.float32)
    eng.on_frame(Frame("gpu-07", "e", 1, T0, False, v, [0], [1], events=events))
    (a,) = eng.evaluate(T0 + NS)
    assert a.kind == K.FILE_INTEGRITY and a.severity == K.CRITICAL and a.host == "gpu-07"
    assert a.evidence["path"].endswith("fakepkg/core.py") and a.evidence["event"] == "record_mismatch"


def test_installed_numpy_verifies_clean() -> None:
    mon = IntegrityMonitor(check_packages=["numpy"])
    assert [e for e in mon.check() if e.kind in ("record_mismatch", "file_removed")] == []
    assert mon.reports[0].hashed > 100


# -- fingerprints ------------------------------------------------------------------------------------------


def test_code_fingerprint_is_content_based(tmp_path: Path) -> None:
    src = tmp_path / "proj"
    (src / "pkg").mkdir(parents=True)
    (src / "train.py").write_text("print('train')\n")
    (src / "pkg" / "model.py").write_text("W = 1\n")
    fp = code_fingerprint([src])
    assert fp.startswith("sha256:") and fp == code_fingerprint([src])
    (src / "pkg" / "__pycache__").mkdir()
    (src / "pkg" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"junk")
    (src / "README.md").write_text("docs do not count")
    assert code_fingerprint([src]) == fp
    (src / "pkg" / "model.py").write_text("W = 2\n")
    assert code_fingerprint([src]) != fp
    assert code_fingerprint([src / "train.py"]) != code_fingerprint([src])


@dataclasses.dataclass
class Cfg:
    lr: float = 3e-4
    layers: int = 12
    tags: frozenset[str] = frozenset({"a", "b"})


def test_config_fingerprint_is_canonical() -> None:
    a = config_fingerprint({"lr": 3e-4, "opt": {"beta": [0.9, 0.95]}, "seed": 1})
    b = config_fingerprint({"seed": 1, "opt": {"beta": [0.9, 0.95]}, "lr": 3e-4})
    assert a == b and a != config_fingerprint({"seed": 2, "opt": {"beta": [0.9, 0.95]}, "lr": 3e-4})
    assert config_fingerprint(Cfg()) == config_fingerprint(Cfg()) != config_fingerprint(Cfg(lr=1e-3))
    ns = argparse.Namespace(lr=0.1, path=Path("/data"), inf=float("inf"))
    assert config_fingerprint(ns) == config_fingerprint(argparse.Namespace(lr=0.1, path=Path("/data"),
                                                                           inf=float("inf")))


class FakeTensor:
    """Just enough of a tensor for the duck-typed checksum path."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def detach(self) -> FakeTensor:
        return self

    def reshape(self, *_: Any) -> FakeTensor:
        return self

    def tolist(self) -> list[float]:
        return list(self.values)


class FakeModel:
    def __init__(self, params: dict[str, list[float]]) -> None:
        self.params = params

    def named_parameters(self) -> list[tuple[str, FakeTensor]]:
        return [(k, FakeTensor(v)) for k, v in self.params.items()]


def test_param_checksum_duck_typed() -> None:
    base = {"w": [0.1 * i for i in range(10_000)], "b": [1.0, 2.0, 3.0]}
    c = param_checksum(FakeModel(base))
    assert c == param_checksum(FakeModel({k: list(v) for k, v in base.items()}))
    swapped = {"w": base["w"], "b": [2.0, 1.0, 3.0]}
    assert param_checksum(FakeModel(swapped)) != c
    bumped = {"w": [x + (1e-3 if i == 0 else 0.0) for i, x in enumerate(base["w"])], "b": base["b"]}
    assert param_checksum(FakeModel(bumped)) != c
    with pytest.raises(TypeError):
        param_checksum(object())


def test_param_checksum_torch_replicas_agree() -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    m2 = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    m2.load_state_dict(m1.state_dict())
    assert param_checksum(m1) == param_checksum(m2)
    assert param_checksum(m1.state_dict()) == param_checksum(m2.state_dict())
    with torch.no_grad():
        m2[0].weight.mul_(1.0001)  # an update in a slightly different direction touches every element
    assert param_checksum(m1) != param_checksum(m2)
