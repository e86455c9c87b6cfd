"""Detection inside a running console: a thread that evaluates the rules once a second.

The engine's on_* methods only queue (cheap, ingest thread); evaluation is CPU work and runs on
its own thread so it never delays ingest or the GUI. New or changed alerts are upserted into
the alerts table on the store's writer thread, without waiting for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from console.detect.alerts import OPEN, Alert, upsert_alerts
from console.detect.engine import DetectionEngine
from console.ingest.sink import HostStatus
from protos.types import Description, Frame, Gap

log = logging.getLogger("gpusoc.console.detect")


class WriterCalls(Protocol):
    def submit_on_writer(self, fn: Callable[[Any], Any]) -> Future[Any]: ...


class DetectionRunner:
    """IngestSink that feeds a DetectionEngine and stores what it raises."""

    def __init__(self, writer: WriterCalls | None, interval_s: float = 1.0,
                 on_alerts: Callable[[list[Alert]], None] | None = None,
                 engine: DetectionEngine | None = None) -> None:
        self.engine = engine or DetectionEngine()
        self.writer = writer
        self.interval_s = interval_s
        self.on_alerts = on_alerts
        self.raised = 0  # alert raise/update events handed to the store
        # (open, held) after the last evaluation: one tuple, replaced whole on the detection thread,
        # so a reader on another thread never sees one count from one evaluation and one from the next
        self.alert_counts: tuple[int, int] = (0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpusoc-detect", daemon=True)

    def start(self) -> DetectionRunner:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def summary(self) -> str:
        """`alerts open N of M (alert updates K)` for status lines, from counters (any thread)."""
        n_open, held = self.alert_counts
        return f"alerts open {n_open} of {held} (alert updates {self.raised})"

    # IngestSink (ingest thread): queue only.
    def on_description(self, address: str, desc: Description) -> None:
        self.engine.on_description(address, desc)

    def on_frame(self, frame: Frame) -> None:
        self.engine.on_frame(frame)

    def on_gap(self, host: str, gap: Gap) -> None:
        self.engine.on_gap(host, gap)

    def on_status(self, status: HostStatus) -> None:
        self.engine.on_status(status)

    def tick(self, now_ns: int | None = None) -> list[Alert]:
        """Evaluate once and hand new/changed alerts to the store and the listener."""
        alerts = self.engine.evaluate(now_ns)
        held = self.engine.alerts()
        self.alert_counts = (sum(1 for a in held if a.state == OPEN), len(held))
        if alerts:
            self.raised += len(alerts)
            if self.writer is not None:
                batch = list(alerts)
                fut = self.writer.submit_on_writer(lambda con: upsert_alerts(con, batch))
                fut.add_done_callback(_log_failure)
            if self.on_alerts is not None:
                self.on_alerts(alerts)
        return alerts

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("detection evaluation failed")
            next_at += self.interval_s
            self._stop.wait(max(0.0, next_at - time.monotonic()))


def _log_failure(fut: Future[Any]) -> None:
    exc = fut.exception()
    if exc is not None:
        log.error("could not store alerts: %s", exc)
