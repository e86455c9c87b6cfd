"""From the ingest thread to the GUI thread: batched, at most one queued signal per interval.

`QtIngestBridge` is the `IngestSink` the desktop console hands to ingest. Its `on_*` methods run
on the ingest thread: they only append to a lock-protected list. A small flusher thread swaps
that list out at most every `interval_ms` (100 ms) and emits ONE queued signal carrying the
batch; the GUI-thread slot applies it to every registered consumer (the FleetModel, the
training model, ...). 1,536 hosts at 1 Hz therefore cost ~10 signal deliveries per second,
not 1,536. At most one batch is in flight: while the GUI is busy, new items coalesce into the
next batch instead of queueing events, and past `max_pending` items older frames of a host are
dropped (the store already has them; the views only need the newest).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Final

from PySide6.QtCore import QObject, Qt, Signal

from console.ingest.sink import HostStatus
from protos.types import Description, Frame, Gap

log = logging.getLogger("gpusoc.console.ui")

# Item kinds in a batch: (kind, args).
DESCRIPTION: Final = "on_description"
FRAME: Final = "on_frame"
GAP: Final = "on_gap"
STATUS: Final = "on_status"

Item = tuple[str, tuple[Any, ...]]


class QtIngestBridge(QObject):
    """IngestSink for the ingest thread that feeds GUI-thread consumers in batches.

    Signals (GUI thread): `batchApplied(int)` with the number of items after each batch was
    applied. Call `close()` when the console exits (stops the flusher thread).
    """

    batchApplied = Signal(int)
    _batchReady = Signal(object)  # emitted by the flusher thread, delivered queued

    def __init__(self, *consumers: object, interval_ms: int = 100, max_pending: int = 200_000,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.interval_s = max(0.0, interval_ms / 1000.0)
        self.max_pending = max_pending
        self._consumers: list[object] = list(consumers)
        self._cond = threading.Condition()
        self._pending: list[Item] = []
        self._compact_at = max_pending
        self._in_flight = False
        self._closed = False
        self.emitted = 0  # batches sent to the GUI thread (for tests and the soak script)
        self.items = 0  # items received from ingest
        self.dropped = 0  # frames dropped because the GUI fell behind
        self._batchReady.connect(self._apply, Qt.ConnectionType.QueuedConnection)
        self._thread = threading.Thread(target=self._run, name="gpusoc-ui-bridge", daemon=True)
        self._thread.start()

    # ---- consumers (GUI thread) ------------------------------------------------------------

    def add_consumer(self, consumer: object) -> None:
        """Register an object with some of on_description/on_frame/on_gap/on_status, called on the GUI thread."""
        if consumer not in self._consumers:
            self._consumers.append(consumer)

    def remove_consumer(self, consumer: object) -> None:
        """Stop feeding `consumer`; unknown ones are ignored."""
        if consumer in self._consumers:
            self._consumers.remove(consumer)

    # ---- IngestSink (ingest thread; never blocks) ------------------------------------------

    def on_description(self, address: str, desc: Description) -> None:
        """Queued for the GUI thread."""
        self._push((DESCRIPTION, (address, desc)))

    def on_frame(self, frame: Frame) -> None:
        """Queued for the GUI thread."""
        self._push((FRAME, (frame,)))

    def on_gap(self, host: str, gap: Gap) -> None:
        """Queued for the GUI thread."""
        self._push((GAP, (host, gap)))

    def on_status(self, status: HostStatus) -> None:
        """Queued for the GUI thread."""
        self._push((STATUS, (status,)))

    def _push(self, item: Item) -> None:
        with self._cond:
            if self._closed:
                return
            self._pending.append(item)
            self.items += 1
            if len(self._pending) > self._compact_at:
                self._compact()
            if len(self._pending) == 1:
                self._cond.notify()

    def _compact(self) -> None:
        """Keep every non-frame item and the newest frame per host, in order (called with the lock held)."""
        newest: dict[str, int] = {}
        for i, (kind, args) in enumerate(self._pending):
            if kind == FRAME:
                newest[args[0].host] = i
        keep = set(newest.values())
        before = len(self._pending)
        self._pending = [it for i, it in enumerate(self._pending) if it[0] != FRAME or i in keep]
        self.dropped += before - len(self._pending)
        # a fleet larger than max_pending would otherwise compact on every call
        self._compact_at = max(self.max_pending, 2 * len(self._pending))

    # ---- flusher thread --------------------------------------------------------------------

    def _run(self) -> None:
        last = 0.0
        while True:
            with self._cond:
                while not self._closed and (not self._pending or self._in_flight):
                    self._cond.wait()
                if self._closed:
                    return
            wait = last + self.interval_s - time.monotonic()
            if wait > 0:  # let items accumulate until the interval is over
                with self._cond:
                    self._cond.wait_for(lambda: self._closed, timeout=wait)
            with self._cond:
                if self._closed:
                    return
                batch, self._pending = self._pending, []
                self._compact_at = self.max_pending
                if not batch:  # flush() on the GUI thread took it meanwhile
                    continue
                self._in_flight = True
            last = time.monotonic()
            try:
                self._batchReady.emit(batch)
            except RuntimeError:  # the QObject was deleted under us: nothing left to feed
                return
            self.emitted += 1

    # ---- GUI thread ------------------------------------------------------------------------

    def _apply(self, batch: list[Item]) -> None:
        """Slot for the flusher's queued signal."""
        try:
            self._deliver(batch)
        finally:
            with self._cond:
                self._in_flight = False
                self._cond.notify()

    def _deliver(self, batch: list[Item]) -> None:
        consumers = list(self._consumers)
        for kind, args in batch:
            for consumer in consumers:
                method = getattr(consumer, kind, None)
                if method is None:
                    continue
                try:
                    method(*args)
                except Exception:
                    log.exception("%s.%s failed", type(consumer).__name__, kind)
        self.batchApplied.emit(len(batch))

    def flush(self) -> int:
        """Apply everything pending now, on the calling (GUI) thread; for tests and shutdown."""
        with self._cond:
            batch, self._pending = self._pending, []
        if batch:
            self._deliver(batch)
        return len(batch)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the flusher thread; later ingest calls are ignored."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
