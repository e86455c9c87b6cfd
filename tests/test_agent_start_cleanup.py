"""A part of `gpusoc-agent run` that fails to start undoes what started before it.

Review finding: a /metrics port in use (or a bad operator CA) after the training socket, the spool
and the gRPC server were up left the socket file behind and the spool unflushed; the error read
"[Errno 98] Address already in use" without saying which flag.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.collect.simulated import SimulatedCollector
from agent.config import load_config
from agent.main import serve_forever


def _busy_port() -> socket.socket:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


def test_metrics_port_in_use_exits_4_naming_the_flag_and_leaves_no_socket(tmp_path: Path) -> None:
    sock = tmp_path / "train.sock"
    with _busy_port() as holder:
        metrics = f"127.0.0.1:{holder.getsockname()[1]}"
        cmd = [sys.executable, "-m", "agent.cli", "run", "--simulate-gpus", "1", "--host", "gpu-01", "--insecure",
               "--listen", "127.0.0.1:0", "--training-socket", str(sock), "--metrics-listen", metrics]
        env = {**os.environ, "GPUSOC_AGENT_STATE_DIR": str(tmp_path / "state"), "GPUSOC_AGENT_OPERATOR_CA": ""}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("gpusoc-agent:")]
    assert ours == [f"gpusoc-agent: cannot serve /metrics on {metrics} (--metrics-listen): Address already in use"]
    assert not sock.exists()
    assert (tmp_path / "state" / "spool").is_dir()  # the failure came after the spool had opened


def test_failed_start_stops_the_server_and_the_integrity_thread(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        grpc_port = probe.getsockname()[1]
    with _busy_port() as holder:
        cfg = load_config(None, env={}, overrides={
            "listen": f"127.0.0.1:{grpc_port}", "host": "gpu-01", "insecure": True,
            "training_socket": str(tmp_path / "train.sock"), "metrics_listen": f"127.0.0.1:{holder.getsockname()[1]}",
            "state_dir": str(tmp_path / "state"), "operator_ca": "",
        })
        collector = SimulatedCollector(1, host="gpu-01")
        with pytest.raises(OSError, match="--metrics-listen"):
            asyncio.run(serve_forever(cfg, collector))
    assert not (tmp_path / "train.sock").exists()
    for t in threading.enumerate():  # told to stop; it ends after the check under way
        if t.name == "gpusoc-integrity":
            t.join(timeout=60)
            assert not t.is_alive()
    with socket.socket() as again:  # the gRPC server let go of its port
        again.bind(("127.0.0.1", grpc_port))
    # and the spool was closed: its lock is free for another process (POSIX locks are per process,
    # so only a probe from outside can tell)
    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
             "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)")
    lock = tmp_path / "state" / "spool" / "lock"
    assert lock.exists()
    assert subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True, timeout=30).returncode == 0


def test_unreadable_operator_ca_exits_2_in_one_line_and_leaves_no_socket(tmp_path: Path) -> None:
    ca = tmp_path / "operator-ca.pem"
    ca.write_text("not a certificate\n")
    sock = tmp_path / "train.sock"
    cmd = [sys.executable, "-m", "agent.cli", "run", "--simulate-gpus", "1", "--host", "gpu-01", "--insecure",
           "--listen", "127.0.0.1:0", "--training-socket", str(sock)]
    env = {**os.environ, "GPUSOC_AGENT_STATE_DIR": str(tmp_path / "state"), "GPUSOC_AGENT_OPERATOR_CA": str(ca)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("gpusoc-agent:")]
    assert line.startswith("gpusoc-agent: operator CA unusable") and str(ca) in line
    assert "not a PEM certificate" in line and "https://" not in line  # no library FAQ link in our line
    assert not sock.exists()


def test_start_names_spools_kept_after_a_host_change(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = tmp_path / "state" / "spool.old-host.20260101T000000Z"
    old.mkdir(parents=True)
    (old / "seg-00000000000000000001.log").write_bytes(b"x" * 2_000_000)
    with _busy_port() as holder:  # ends the start right after the spool opened
        cfg = load_config(None, env={}, overrides={
            "listen": "127.0.0.1:0", "host": "gpu-01", "insecure": True,
            "training_socket": str(tmp_path / "train.sock"), "metrics_listen": f"127.0.0.1:{holder.getsockname()[1]}",
            "state_dir": str(tmp_path / "state"), "operator_ca": "",
        })
        with caplog.at_level(logging.WARNING, logger="gpusoc.agent"), pytest.raises(OSError):
            asyncio.run(serve_forever(cfg, SimulatedCollector(1, host="gpu-01")))
    (msg,) = [r.getMessage() for r in caplog.records if "kept after a host change" in r.getMessage()]
    assert str(old) in msg and "(2.0 MB)" in msg


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "agent.cli", "run", "--simulate-gpus", "1", "--host", "gpu-01", "--insecure",
           "--listen", "127.0.0.1:0", *extra]
    env = {**os.environ, "GPUSOC_AGENT_STATE_DIR": str(tmp_path / "state"), "GPUSOC_AGENT_OPERATOR_CA": ""}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def test_resources_held_by_another_agent_are_named_without_errno_noise(tmp_path: Path) -> None:
    """A trial found `gpusoc-agent: [Errno 98] ...` and `[Errno 16] ...`: the sentence alone, exit 4."""
    from agent.spool import SpoolBuffer
    from agent.training import TrainingReceiver

    sock = tmp_path / "train.sock"
    live = TrainingReceiver(str(sock), background=False)
    try:
        proc = _run(tmp_path, "--no-spool", "--training-socket", str(sock))
    finally:
        live.close()
    assert proc.returncode == 4, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("gpusoc-agent:")]
    assert line == (f"gpusoc-agent: training socket {sock} is in use: another receiver (a running agent?) is bound "
                    "to it; stop it or give this agent its own --training-socket")

    held = SpoolBuffer(tmp_path / "state" / "spool", host="gpu-01", fsync=False)
    try:
        proc = _run(tmp_path, "--training-socket", str(tmp_path / "other.sock"))
    finally:
        held.close()
    assert proc.returncode == 4, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("gpusoc-agent:")]
    assert line.startswith(f"gpusoc-agent: spool {tmp_path / 'state' / 'spool'} is in use by another agent (pid ")
    assert "[Errno" not in proc.stderr
    assert not (tmp_path / "other.sock").exists()


def test_operator_ca_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "agent.cli", "run", "--simulate-gpus", "1", "--host", "gpu-01", "--insecure",
           "--listen", "127.0.0.1:0", "--training-socket", str(tmp_path / "t.sock")]
    env = {**os.environ, "GPUSOC_AGENT_STATE_DIR": str(tmp_path / "state"), "GPUSOC_AGENT_OPERATOR_CA": str(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("gpusoc-agent:")]
    assert line.startswith(f"gpusoc-agent: operator CA {tmp_path} is not a file")
    assert not (tmp_path / "t.sock").exists()
    assert not (tmp_path / "state" / "spool").exists()  # refused before the spool was touched


def test_listen_check_accepts_a_name_that_binds_on_one_address_and_names_resolution_errors() -> None:
    from agent.main import _listen_problem

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert _listen_problem(f"localhost:{port}") is None  # ::1 may be missing; 127.0.0.1 binds
    bad = _listen_problem("no-such-host.invalid:7443")
    assert bad is not None and "cannot resolve 'no-such-host.invalid'" in str(bad)
    with _busy_port() as holder:
        busy = _listen_problem(f"127.0.0.1:{holder.getsockname()[1]}")
    assert busy is not None and "in use" in str(busy)


def test_agent_ca_given_as_operator_ca_is_flagged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A trial pointed GPUSOC_AGENT_OPERATOR_CA at agent-ca.pem: accepted without a word."""
    from agent.pki import create_dev_pki

    pki = tmp_path / "pki"
    create_dev_pki(pki, agents=["gpu-01"], consoles=["ops"])
    with _busy_port() as holder:  # ends the start after the controller was built
        cfg = load_config(None, env={}, overrides={
            "listen": "127.0.0.1:0", "host": "gpu-01",
            "tls_cert": str(pki / "agents" / "gpu-01.pem"), "tls_key": str(pki / "agents" / "gpu-01.key"),
            "tls_client_ca": str(pki / "console-ca.pem"), "operator_ca": str(pki / "agent-ca.pem"),
            "training_socket": str(tmp_path / "t.sock"), "metrics_listen": f"127.0.0.1:{holder.getsockname()[1]}",
            "state_dir": str(tmp_path / "state"),
        })
        with caplog.at_level(logging.INFO, logger="gpusoc.agent"), pytest.raises(OSError):
            asyncio.run(serve_forever(cfg, SimulatedCollector(1, host="gpu-01")))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "control commands enabled: operator CA" in text
    assert "is the CA that issued this agent's own certificate" in text


def test_serving_line_says_the_gpus_are_simulated(tmp_path: Path) -> None:
    """A trial: the start-up line named the host and TLS mode but not that the GPUs were simulated."""
    cmd = [sys.executable, "-m", "agent.cli", "run", "--simulate-gpus", "2", "--host", "gpu-01", "--insecure",
           "--listen", "127.0.0.1:0", "--no-spool", "--training-socket", str(tmp_path / "t.sock")]
    env = {**os.environ, "GPUSOC_AGENT_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        line = ""
        for line in proc.stderr:
            if "serving gpu-01" in line:
                break
        assert "2 SIMULATED GPUs" in line, line
    finally:
        proc.terminate()
        proc.wait(30)
