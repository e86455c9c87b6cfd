"""Start-up checks that turn a silently unreachable agent into a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.pki import create_dev_pki
from agent.tls import TlsFileError, certificate_common_name, check_host_matches_certificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    create_dev_pki(out, agents=["gpu-01"], consoles=["ops"])
    return out


def test_common_name_is_read_without_cryptography(pki: Path) -> None:
    assert certificate_common_name(pki / "agents" / "gpu-01.pem") == "gpu-01"
    assert certificate_common_name(pki / "missing.pem") is None


def test_host_differing_from_certificate_is_refused(pki: Path) -> None:
    check_host_matches_certificate("gpu-01", pki / "agents" / "gpu-01.pem")
    with pytest.raises(TlsFileError, match=r"issued to 'gpu-01'.*'gpu-02'"):
        check_host_matches_certificate("gpu-02", pki / "agents" / "gpu-01.pem")


def test_agent_run_exits_with_clear_error_on_name_mismatch(pki: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "agent.cli",
        "run",
        "--simulate-gpus",
        "1",
        "--host",
        "gpu-02",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        str(pki / "agents" / "gpu-01.pem"),
        "--tls-key",
        str(pki / "agents" / "gpu-01.key"),
        "--tls-client-ca",
        str(pki / "console-ca.pem"),
        "--no-spool",
        "--training-socket",
        str(tmp_path / "train.sock"),
    ]
    env = {**os.environ, "GPUSOC_AGENT_STATE_DIR": str(tmp_path / "state"), "GPUSOC_AGENT_OPERATOR_CA": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "issued to 'gpu-01'" in proc.stderr and "--host gpu-01" in proc.stderr


def test_watch_defaults_to_the_console_tls_dir(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "watch", "127.0.0.1:1", "--count", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode != 0
    assert str(tmp_path / "cfg" / "gpusoc" / "tls" / "agent-ca.pem") in proc.stderr


def test_refused_start_leaves_the_spool_alone(pki: Path, tmp_path: Path) -> None:
    """A --host typo is refused before the spool is opened, so it is not moved aside."""
    from agent.spool import SpoolBuffer

    state = tmp_path / "state"
    spool = SpoolBuffer(state / "spool", host="gpu-01", fsync=False)
    spool.append_nowait(1, b"frame-1")
    epoch = spool.epoch
    spool.close()
    cmd = [
        sys.executable, "-m", "agent.cli", "run", "--simulate-gpus", "1", "--host", "gpu-1",
        "--listen", "127.0.0.1:0", "--tls-cert", str(pki / "agents" / "gpu-01.pem"),
        "--tls-key", str(pki / "agents" / "gpu-01.key"), "--tls-client-ca", str(pki / "console-ca.pem"),
        "--training-socket", str(tmp_path / "train.sock"),
    ]
    env = {**os.environ, "GPUSOC_AGENT_STATE_DIR": str(state), "GPUSOC_AGENT_OPERATOR_CA": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    assert sorted(p.name for p in state.iterdir()) == ["spool"]  # nothing moved aside
    again = SpoolBuffer(state / "spool", host="gpu-01", fsync=False)
    try:
        assert again.epoch == epoch and again.newest_seq == 1
    finally:
        again.close()


def test_second_agent_on_a_state_dir_does_not_start(tmp_path: Path) -> None:
    from agent.spool import SpoolBuffer

    state = tmp_path / "state"
    held = SpoolBuffer(state / "spool", fsync=False)  # the first agent
    try:
        cmd = [sys.executable, "-m", "agent.cli", "run", "--simulate-gpus", "1", "--insecure", "--listen",
               "127.0.0.1:0", "--training-socket", str(tmp_path / "train.sock")]
        env = {**os.environ, "GPUSOC_AGENT_STATE_DIR": str(state), "GPUSOC_AGENT_OPERATOR_CA": ""}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    finally:
        held.close()
    assert proc.returncode == 4, proc.stderr
    assert "in use by another agent" in proc.stderr and "own state_dir" in proc.stderr
