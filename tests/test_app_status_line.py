"""The desktop console tells its terminal how ingest is going (a window may not be on screen)."""

from __future__ import annotations

from console.app import terminal_status_line


def test_status_line_counts_hosts_frames_and_rate() -> None:
    line = terminal_status_line({"connected": 30, "disconnected": 2}, 32,
                                {"frames_committed": 1920, "status": "running"}, 7, frames_before=0, seconds=60.0)
    assert line == ("gpusoc-console: hosts connected 30/32, frames stored 1920 (32.0/s), alerts raised 7, "
                    "store running")
