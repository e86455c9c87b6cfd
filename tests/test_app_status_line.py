"""The desktop console tells its terminal how ingest is going (a window may not be on screen)."""

from __future__ import annotations

import numpy as np

from console.app import terminal_status_line
from console.detect.runner import DetectionRunner
from protos.types import METRIC_NAMES, SEVERITY_CRITICAL, Event, Frame


def test_status_line_counts_hosts_frames_and_rate() -> None:
    line = terminal_status_line({"connected": 30, "disconnected": 2}, 32,
                                {"frames_committed": 1920, "status": "running"}, "alerts open 1 of 2 (alert updates 7)",
                                frames_before=0, seconds=60.0)
    assert line == ("gpusoc-console: hosts connected 30/32, frames stored 1920 (32.0/s), "
                    "alerts open 1 of 2 (alert updates 7), store running")


def test_alert_summary_counts_alerts_not_updates() -> None:
    """A new-user trial read "alerts raised 54" while the store held 14 alerts: updates were counted."""
    runner = DetectionRunner(writer=None)
    t0 = 1_700_000_000 * 10**9
    for seq in range(1, 4):  # one condition, seen three times: one alert
        ev = Event(t0 + seq, "xid", SEVERITY_CRITICAL, 0, 0, "XID 79", {"xid": "79"})
        runner.on_frame(Frame("h1", "e", seq, t0 + seq * 10**9, True, np.zeros((1, len(METRIC_NAMES)), np.float32),
                              [0], [1], events=[ev]))
        runner.tick(t0 + (seq + 30) * 10**9)
    assert runner.alert_counts == (1, 1)
    assert runner.summary() == f"alerts open 1 of 1 (alert updates {runner.raised})"
