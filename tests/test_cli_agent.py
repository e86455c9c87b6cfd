"""`gpusoc-agent` as an operator runs it: versions, help, bad config, no driver, insecure loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _agent(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def test_version_and_help() -> None:
    assert _agent("--version").stdout.startswith("gpusoc-agent ")
    out = _agent("run", "--help").stdout
    for flag in ("--config", "--listen", "--simulate-gpus", "--training-socket", "--insecure"):
        assert flag in out


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[agent]\nsample_interval_s = 0.01\n")
    r = _agent("run", "--config", str(cfg), "--simulate-gpus", "2", "--insecure")
    assert r.returncode == 2 and "sample_interval_s" in r.stderr


def test_no_driver_is_one_clear_line() -> None:
    r = _agent("run", "--insecure", "--listen", "127.0.0.1:0", env={"GPUSOC_AGENT_STATE_DIR": "/tmp"})
    # This machine has no NVIDIA driver: the agent must say so and exit non-zero, unless asked to simulate.
    if r.returncode == 3:
        assert "no NVIDIA driver" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    else:  # a GPU host running the suite
        assert r.returncode == 0


def test_agent_imports_neither_qt_nor_duckdb() -> None:
    code = ("import sys, agent.cli, agent.main, agent.serve, agent.runtime, agent.sdk, agent.training, "
            "agent.collect.nvml, agent.collect.simulated, agent.fleetsim, agent.watch, agent.pki, agent.config\n"
            "bad = [m for m in ('PySide6', 'pyqtgraph', 'duckdb', 'pyarrow', 'console') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_base_install_does_not_pull_console_dependencies() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lowered = " ".join(deps).lower()
    for heavy in ("pyside6", "duckdb", "pyqtgraph", "pyarrow"):
        assert heavy not in lowered


def test_watch_headers_are_whole_words_with_units_aligned_to_the_values() -> None:
    """A trial: the headers were metric names cut to 10 characters (`gpu_util_p`, `ecc_uncorr`)."""
    from agent.watch import render
    from tests.helpers import make_frame

    lines = render(make_frame(n_gpus=2)).splitlines()
    header, row = lines[1], lines[2]
    assert header.split()[:4] == ["gpu", "state", "util", "%"]
    assert "gpu_util_p" not in header and "ecc_uncorr" not in header
    for label in ("mem MiB", "temp C", "power W", "sm MHz", "ecc uncor"):
        assert label in header
    assert len(header) == len(row)  # each value sits under its header
