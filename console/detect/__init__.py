"""Detection: turn the live telemetry stream into alerts an operator can act on, with evidence.

`DetectionEngine` is an IngestSink: the console feeds it frames, calls `evaluate()` about once a
second, and stores the alerts it returns (`alerts_to_arrow` / `upsert_alerts`). `detect_file`
runs the same rules over a stored DuckDB file; `list_alerts` formats a file's alerts table.
Rules are documented in docs/detection.md. Qt-free and agent-free.
"""

from console.detect.alerts import (
    ACKNOWLEDGED,
    ALERT_KINDS,
    CRITICAL,
    INFO,
    KINDS,
    OPEN,
    RESOLVED,
    WARNING,
    Alert,
    AlertBook,
    alerts_to_arrow,
    dedup_key,
    format_alerts,
    list_alerts,
    read_alerts,
    upsert_alerts,
)
from console.detect.engine import DetectionEngine, detect_file, frames_from_db, replay_db
from console.detect.state import DetectConfig

__all__ = [
    "ACKNOWLEDGED",
    "ALERT_KINDS",
    "CRITICAL",
    "INFO",
    "KINDS",
    "OPEN",
    "RESOLVED",
    "WARNING",
    "Alert",
    "AlertBook",
    "DetectConfig",
    "DetectionEngine",
    "alerts_to_arrow",
    "dedup_key",
    "detect_file",
    "format_alerts",
    "frames_from_db",
    "list_alerts",
    "read_alerts",
    "replay_db",
    "upsert_alerts",
]
