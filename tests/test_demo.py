"""`gpusoc-console --demo` end to end, headless: a simulated mTLS fleet shows up in the window."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication

import console.app as appmod
from console.cli import build_parser


@pytest.mark.slow
def test_demo_fleet_connects_over_mtls_and_is_labelled_simulated(qapp: QApplication, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + 90

    def check() -> None:
        run = appmod.LAST_RUN
        win = run.get("window")
        if win is not None:
            counts = win.model.state_counts()
            committed = run["writer"].stats.get("frames_committed", 0)
            if (counts.get("connected", 0) == 4 and committed >= 8) or time.monotonic() > deadline:
                seen.update(counts=counts, committed=committed, badge=win.simulated_badge.isVisible(),
                            title=win.windowTitle(), simulated=win.model.any_simulated)
                png = tmp_path / "demo.png"
                win.grab().save(str(png))
                seen["png"] = png.stat().st_size
                qapp.quit()
                return
        QTimer.singleShot(500, check)

    QTimer.singleShot(500, check)
    args = build_parser().parse_args(["--demo", "--demo-hosts", "4", "--db", str(tmp_path / "demo.duckdb")])
    assert appmod.run_desktop(args) == 0
    assert seen["counts"]["connected"] == 4, seen
    assert seen["committed"] >= 8 and seen["badge"] and seen["simulated"], seen
    assert "DEMO" in seen["title"] and seen["png"] > 10_000
    # Simulated rows are labelled in the database too.
    import duckdb

    con = duckdb.connect(str(tmp_path / "demo.duckdb"), read_only=True)
    real, total = con.execute("SELECT count(*) FILTER (WHERE NOT simulated), count(*) FROM gpu_samples").fetchone()  # type: ignore[misc]
    assert real == 0 and total > 0
