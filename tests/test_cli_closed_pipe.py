"""`gpusoc-console alerts ... | head` ends quietly (a trial saw `[Errno 32] Broken pipe`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb

from console.detect import upsert_alerts
from console.detect.alerts import OPEN, Alert
from console.store.schema import ensure_schema

T0 = 1_700_000_000 * 10**9


def test_alerts_into_a_closed_pipe_prints_no_error(tmp_path: Path) -> None:
    db = tmp_path / "store.duckdb"
    con = duckdb.connect(str(db))
    ensure_schema(con)
    upsert_alerts(con, [Alert(f"a{i}", "xid", "critical", OPEN, f"h{i}", 0, None, None, T0, T0 + i,
                              {"pad": "x" * 200}, f"k{i}", T0 + i, True) for i in range(3000)])
    con.close()
    proc = subprocess.Popen([sys.executable, "-m", "console.cli", "alerts", "--db", str(db), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=60)
    assert first.startswith(b"{")
    assert "Broken pipe" not in err and "Traceback" not in err, err
    assert rc in (0, -13)  # -13: ended by SIGPIPE, like any Unix filter
