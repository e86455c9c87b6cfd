"""`gpusoc-console --demo` end to end, headless: a simulated mTLS fleet shows up in the window.

Runs in a child process (offscreen Qt) so the demo's window, timers and signal handlers cannot
leak into the other GUI tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r"""
import json, sys, time
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication
import console.app as appmod
from console.cli import build_parser

app = QApplication(sys.argv[:1])
db, png = sys.argv[1], sys.argv[2]
seen = {}
deadline = time.monotonic() + 90

def check():
    run = appmod.LAST_RUN
    win = run.get("window")
    if win is not None:
        counts = win.model.state_counts()
        committed = run["writer"].stats.get("frames_committed", 0)
        if (counts.get("connected", 0) == 4 and committed >= 8) or time.monotonic() > deadline:
            win.grab().save(png)
            seen.update(counts=counts, committed=committed, badge=win.simulated_badge.isVisible(),
                        title=win.windowTitle(), simulated=win.model.any_simulated)
            app.quit()
            return
    QTimer.singleShot(500, check)

QTimer.singleShot(500, check)
rc = appmod.run_desktop(build_parser().parse_args(["--demo", "--demo-hosts", "4", "--db", db]))
seen["rc"] = rc
print("RESULT " + json.dumps(seen))
"""


@pytest.mark.slow
def test_demo_fleet_connects_over_mtls_and_is_labelled_simulated(tmp_path: Path) -> None:
    db, png = tmp_path / "demo.duckdb", tmp_path / "demo.png"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "GPUSOC_CONSOLE_STATE_DIR": str(tmp_path / "state")}
    r = subprocess.run([sys.executable, "-c", DRIVER, str(db), str(png)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=150)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, r.stdout[-2000:] + r.stderr[-2000:]
    seen = json.loads(line[len("RESULT "):])
    assert seen["rc"] == 0 and seen["counts"]["connected"] == 4, seen
    assert seen["committed"] >= 8 and seen["badge"] and seen["simulated"], seen
    assert "DEMO" in seen["title"] and png.stat().st_size > 10_000
    con = duckdb.connect(str(db), read_only=True)
    real, total = con.execute("SELECT count(*) FILTER (WHERE NOT simulated), count(*) FROM gpu_samples").fetchone()  # type: ignore[misc]
    assert real == 0 and total > 0  # simulated rows are labelled in the database too
    # A window's store has a verifiable audit trail even when nobody acted (a trial found it empty
    # and `audit verify` INVALID): its start and stop, signed with the console's audit key.
    rows = con.execute("SELECT seq, epoch_us(ts) * 1000, actor, action, target, payload, prev_hash, hash "
                       "FROM audit_log ORDER BY seq").fetchall()
    heads = con.execute("SELECT seq, hash, epoch_us(signed_at) * 1000, key_id, signature FROM audit_heads").fetchall()
    con.close()
    assert [(r[2], r[3]) for r in rows] == [("console", "console.start"), ("console", "console.stop")]
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from console.respond.verify import verify_rows

    key = serialization.load_pem_private_key((tmp_path / "state" / "audit-key.pem").read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    report = verify_rows(rows, heads, [key.public_key()])
    assert report.ok, report


@pytest.mark.slow
def test_ctrl_c_stops_the_demo_without_disconnect_warnings_or_orphans(tmp_path: Path) -> None:
    """A trial: Ctrl-C signalled the fleet too, which cut every stream first ('disconnected' x hosts)."""
    import signal
    import time

    import psutil

    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "GPUSOC_CONSOLE_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen([sys.executable, "-m", "console.cli", "--demo", "--demo-hosts", "2",
                             "--db", str(tmp_path / "demo.duckdb")], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # "demo: 2 simulated hosts, mTLS, data in DIR"
        assert first.startswith("demo:"), first
        fleet = [c for c in psutil.Process(proc.pid).children(recursive=True) if "fleet-sim" in " ".join(c.cmdline())]
        assert fleet
        time.sleep(8)  # connected and streaming
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "disconnected" not in err, err[-2000:]
    psutil.wait_procs(fleet, timeout=10)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in fleet)
