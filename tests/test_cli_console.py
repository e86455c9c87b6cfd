"""`gpusoc-console` headless commands as an operator or auditor runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _console(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "console.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_version_and_help() -> None:
    assert _console("--version").stdout.startswith("gpusoc-console ")
    out = _console("--help").stdout
    for cmd in ("collect", "export", "query", "alerts", "audit", "--demo"):
        assert cmd in out


def test_insecure_refuses_non_loopback_agents(tmp_path: Path) -> None:
    r = _console("collect", "--agents", "10.1.2.3:7443", "--db", str(tmp_path / "x.duckdb"), "--insecure")
    assert r.returncode != 0 and "loopback" in (r.stderr + r.stdout)


def test_missing_tls_files_is_a_clear_error(tmp_path: Path) -> None:
    r = _console("collect", "--agents", "127.0.0.1:7443", "--db", str(tmp_path / "x.duckdb"),
                 "--tls-ca", str(tmp_path / "nope.pem"))
    assert r.returncode != 0 and "nope.pem" in (r.stderr + r.stdout)


def test_bad_inventory_names_the_line(tmp_path: Path) -> None:
    inv = tmp_path / "fleet.txt"
    inv.write_text("127.0.0.1:7443\nnot an address at all\n")
    r = _console("collect", "--agents", str(inv), "--db", str(tmp_path / "x.duckdb"), "--insecure")
    assert r.returncode == 2 and "fleet.txt:2" in r.stderr


@pytest.mark.slow
def test_collect_export_query_alerts_round_trip(tmp_path: Path) -> None:
    """Simulated agents → headless collect → SIGTERM → export → query/alerts on the export."""
    inv = tmp_path / "fleet.txt"
    sim = subprocess.Popen([sys.executable, "-m", "agent.cli", "fleet-sim", "--hosts", "3", "--gpus", "2",
                            "--base-port", "45500", "--processes", "1", "--insecure", "--inventory", str(inv)],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = tmp_path / "store.duckdb"
    env = {**os.environ, "GPUSOC_CONSOLE_STATE_DIR": str(tmp_path / "state")}
    try:
        deadline = time.monotonic() + 60
        while not inv.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        col = subprocess.Popen([sys.executable, "-m", "console.cli", "collect", "--agents", str(inv), "--db", str(db),
                                "--insecure", "--status-every", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
        time.sleep(8)
        col.send_signal(signal.SIGTERM)
        out, _ = col.communicate(timeout=30)
        assert col.returncode == 0, out
        assert "agents 3 (connected 3)" in out
    finally:
        sim.terminate()
        sim.wait(10)
    audit = tmp_path / "audit.duckdb"
    r = _console("export", "--db", str(db), "--out", str(audit))
    assert r.returncode == 0, r.stderr
    r = _console("query", "--db", str(audit), "SELECT count(DISTINCT host) AS hosts, bool_and(simulated) AS sim "
                 "FROM gpu_samples", "--json")
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[0]) == {"hosts": 3, "sim": True}
    r = _console("alerts", "--db", str(audit), "--json")
    assert r.returncode == 0
    # The collector's start/stop are in the signed audit chain; the export verifies against its pinned key.
    pub = tmp_path / "audit.pub"
    assert _console("audit", "pubkey", str(tmp_path / "state" / "audit-key.pem"), "--out", str(pub)).returncode == 0
    r = _console("audit", "verify", str(audit), "--trust", str(pub))
    assert r.returncode == 0, r.stdout + r.stderr
    con = duckdb.connect(str(audit), read_only=True)
    frames = con.execute("SELECT host, count(*), max(seq) - min(seq) + 1 FROM frames GROUP BY host").fetchall()
    assert len(frames) == 3 and all(n == span for _, n, span in frames)  # no holes, no duplicates
