"""Host drilldown panel: one host's per-GPU curves, its GPU processes and its recent events.

`QtHostDrilldown` wraps a `HostDrilldownModel`. `set_host` clears the panel, starts the store
query for the last `window_s` on a worker, and keeps drawing live frames meanwhile; history is
merged under them when it arrives. One curve per (metric, GPU) is created once and reused;
curves of GPUs the next host lacks are emptied rather than removed (pyqtgraph#2665).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import numpy as np
import pyqtgraph as pg
import shiboken6
from PySide6.QtCore import Qt as _Qt
from PySide6.QtCore import QThreadPool, QTimer, Signal
from PySide6.QtGui import QShowEvent
from PySide6.QtWidgets import QHBoxLayout, QLabel, QSplitter, QVBoxLayout, QWidget

from console.models.host import HostDrilldownModel, HostHistory
from console.ui.qt_alerts import EVENT_HEADERS, RowsTableModel, event_cell, event_color, make_table
from console.ui.workers import run_in_pool
from protos.types import GPU_STATE_NAMES, GpuProcess

_TITLES: Final[dict[str, str]] = {
    "gpu_util_pct": "GPU util (%)",
    "mem_util_pct": "memory util (%)",
    "mem_used_mib": "memory used (MiB)",
    "temp_c": "temperature (°C)",
    "power_w": "power (W)",
    "sm_clock_mhz": "SM clock (MHz)",
}
PROCESS_HEADERS: Final = ("gpu", "pid", "memory (MiB)")


_GPU_COLORS: Final[tuple[str, ...]] = (
    "#5b8ff9", "#5ad8a6", "#f6bd16", "#9a8bd6", "#6dc8ec", "#ff9d4d", "#269a99", "#ff99c3",
)


def gpu_color(gpu: int) -> str:
    """Stable color per GPU index, the same in every plot; no pure red (that means 'alert')."""
    return _GPU_COLORS[gpu % len(_GPU_COLORS)]


def _process_cell(p: GpuProcess, col: int) -> str:
    mem = "" if not np.isfinite(p.used_memory_mib) else f"{p.used_memory_mib:.0f}"
    return (str(p.gpu_index), str(p.pid), mem)[col]


class QtHostDrilldown(QWidget):
    """Per-GPU time series, processes table and events list of the selected host.

    Signals: `hostChanged(str)` after `set_host`; `historyLoaded(str)` once the store's history
    for that host was merged (not emitted for a history that arrives after another host was chosen).
    """

    hostChanged = Signal(str)
    historyLoaded = Signal(str)

    def __init__(self, model: HostDrilldownModel, parent: QWidget | None = None, *, refresh_ms: int = 500,
                 pool: QThreadPool | None = None, history_end: Callable[[], int | None] | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self._pool = pool
        # Where loaded history ends (unix ns), asked at each set_host; None = the host's newest
        # stored sample. A replay passes `lambda: source.position_ns` so history stops at "now".
        self._history_end = history_end
        self._drawn_version = -1
        self._pending_history = 0

        self.title = QLabel("no host selected")
        self.title.setStyleSheet("font-weight: bold;")
        self.status = QLabel("")
        self.gpu_key = QLabel("")  # color key; a pyqtgraph legend would keep entries of the previous host

        self.plots_widget = pg.GraphicsLayoutWidget()
        self.plots: dict[str, pg.PlotItem] = {}
        for i, metric in enumerate(model.metrics):
            plot = self.plots_widget.addPlot(row=i, col=0, title=_TITLES.get(metric, metric),
                                             axisItems={"bottom": pg.DateAxisItem()})
            plot.showGrid(x=True, y=True, alpha=0.2)
            plot.setClipToView(True)
            plot.setDownsampling(auto=True, mode="peak")
            if i:
                plot.setXLink(self.plots[model.metrics[0]])
            self.plots[metric] = plot
        self._curves: dict[int, list[pg.PlotDataItem]] = {}  # gpu -> one curve per metric

        self.processes_model = RowsTableModel(PROCESS_HEADERS, _process_cell)
        self.processes_table = make_table(self.processes_model)
        self.events_model = RowsTableModel(EVENT_HEADERS, event_cell, event_color)
        self.events_table = make_table(self.events_model)

        side = QSplitter(_Qt.Orientation.Vertical)
        side.addWidget(self._titled("Processes (latest frame)", self.processes_table))
        side.addWidget(self._titled("Recent events", self.events_table))
        split = QSplitter(_Qt.Orientation.Horizontal)
        split.addWidget(self.plots_widget)
        split.addWidget(side)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)

        header = QHBoxLayout()
        header.addWidget(self.title)
        header.addWidget(self.status, 1)
        header.addWidget(self.gpu_key)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(header)
        layout.addWidget(split, 1)

        self._timer = QTimer(self)
        self._timer.setInterval(refresh_ms)
        self._timer.timeout.connect(self._on_timer)
        self._timer.start()

    # ---- public ----

    def set_host(self, host: str | None) -> None:
        """Show `host`: clear, then load its stored history on a worker while live frames keep coming."""
        if host == self.model.host:
            return
        self.model.select_host(host)
        self.hostChanged.emit(host or "")
        if host is not None:
            self._pending_history += 1
            until = self._history_end() if self._history_end is not None else None
            run_in_pool(lambda: self.model.fetch_history(host, until), self._on_history, self._on_history_error,
                        pool=self._pool)
        self.refresh(force=True)

    def curve(self, gpu: int, metric: str) -> pg.PlotDataItem | None:
        """The curve of `metric` for `gpu`, if drawn."""
        curves = self._curves.get(gpu)
        return None if curves is None else curves[self.model.metrics.index(metric)]

    def refresh(self, force: bool = False) -> None:
        """Redraw now if the model changed since the last redraw (or always with `force`)."""
        if not force and self.model.version == self._drawn_version:
            return
        self._drawn_version = self.model.version
        self._draw()

    # ---- internals ----

    @staticmethod
    def _titled(title: str, body: QWidget) -> QWidget:
        w = QWidget()
        lay = QVBoxLayout(w)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(QLabel(title))
        lay.addWidget(body, 1)
        return w

    def _on_timer(self) -> None:
        if self.isVisible():
            self.refresh()

    def showEvent(self, event: QShowEvent) -> None:
        """Catch up with changes made while hidden."""
        super().showEvent(event)
        self.refresh()

    def _on_history(self, hist: HostHistory) -> None:
        self._pending_history = max(0, self._pending_history - 1)
        applied = self.model.apply_history(hist)
        if not shiboken6.isValid(self):
            return
        if self.isVisible():
            # A hidden or closed panel does not draw; showEvent catches up.
            self.refresh()
        if applied:
            self.historyLoaded.emit(hist.host)

    def _on_history_error(self, exc: BaseException) -> None:
        self._pending_history = max(0, self._pending_history - 1)
        if shiboken6.isValid(self):
            self.status.setText(f"history unavailable: {exc}")

    def _ensure_curves(self, gpu: int) -> list[pg.PlotDataItem]:
        curves = self._curves.get(gpu)
        if curves is None:
            pen = pg.mkPen(gpu_color(gpu), width=1)
            curves = []
            for metric in self.model.metrics:
                curve = pg.PlotDataItem(pen=pen)
                self.plots[metric].addItem(curve)
                curves.append(curve)
            self._curves[gpu] = curves
        return curves

    def _draw(self) -> None:
        model = self.model
        host = model.host
        self.title.setText(host or "no host selected")
        gpus = model.gpus()
        for gpu in gpus:
            t, values = model.series(gpu)
            for j, curve in enumerate(self._ensure_curves(gpu)):
                curve.setData(t, values[:, j], connect="finite")
        for gpu, curves in self._curves.items():
            if gpu not in gpus:  # kept for reuse by the next host, just emptied
                for curve in curves:
                    curve.setData(np.empty(0), np.empty(0))
        self.processes_model.set_rows(model.processes())
        self.events_model.set_rows(model.events())
        parts = []
        if host is not None:
            lost = [g for g in gpus if GPU_STATE_NAMES.get(model.gpu_state(g)) in ("lost", "error")]
            parts.append(f"{len(gpus)} GPUs")
            if lost:
                parts.append("GPU " + ", ".join(map(str, lost)) + " lost/error")
            parts.append("history loaded" if model.history_loaded else "loading history…")
            if model.simulated:
                parts.append("SIMULATED")
        self.status.setText(" · ".join(parts))
        self.gpu_key.setText("  ".join(
            f'<span style="color:{gpu_color(g)}">■</span> GPU {g}' for g in gpus
        ))
