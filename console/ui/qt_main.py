"""Main window: toolbar (metric, sort, SIMULATED badge), the fleet heatmap and status history, panels.

The window only shows models; it never starts ingest or opens the store. The composition root
(console/app.py) builds the models and the bridge, calls `build_main_window(model, bridge)`,
adds its panels with `add_panel` / `add_tab`, then starts ingest with the bridge as the sink.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import (
    QComboBox,
    QDockWidget,
    QLabel,
    QMainWindow,
    QSizePolicy,
    QSplitter,
    QTabWidget,
    QToolBar,
    QWidget,
)

from console.ingest.sink import CONNECTED, CONNECTING, DISCONNECTED, GAP, LAGGING, PAUSED, REJECTED
from console.models.fleet import METRIC_SCALES, SORT_HOST, SORT_JOB, SORT_MODES, SORT_VALUE, FleetModel
from console.ui.bridge import QtIngestBridge
from console.ui.qt_heatmap import QtFleetHeatmap
from console.ui.qt_timeline import QtHostTimeline
from protos.types import METRIC_NAMES

SORT_LABELS = {SORT_HOST: "Host name", SORT_JOB: "Job (grouped)", SORT_VALUE: "Value (highest first)"}
SIMULATED_STYLE = (
    "QLabel { background: #ff8c00; color: black; font-weight: bold; padding: 3px 10px; border-radius: 3px; }"
)
# Always shown in the status bar, in this order; the other states only when non-zero.
_MAIN_STATES = (CONNECTED, LAGGING, GAP, DISCONNECTED)
_OTHER_STATES = (CONNECTING, REJECTED, PAUSED)


class QtMainWindow(QMainWindow):
    """The console's window over a FleetModel; `add_panel`/`add_tab` let other views plug in."""

    def __init__(self, model: FleetModel, bridge: QtIngestBridge | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._model = model
        self._bridge = bridge
        self.setWindowTitle("gpusoc console")
        self.setDockNestingEnabled(True)

        self.heatmap = QtFleetHeatmap(model)
        self.timeline = QtHostTimeline(model, show_labels=False)
        self.timeline.link_rows(self.heatmap.plot_item)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.heatmap)
        split.addWidget(self.timeline)
        split.setStretchFactor(0, 2)
        split.setStretchFactor(1, 3)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(split, "Fleet")
        self.setCentralWidget(self.tabs)

        bar = QToolBar("View")
        bar.setObjectName("view-toolbar")
        bar.setMovable(False)
        self.addToolBar(bar)
        bar.addWidget(QLabel(" Metric "))
        self.metric_combo = QComboBox()
        for name in METRIC_NAMES:
            sc = METRIC_SCALES[name]
            self.metric_combo.addItem(f"{sc.label} ({sc.unit})", name)
        self.metric_combo.setCurrentIndex(METRIC_NAMES.index(model.metric))
        self.metric_combo.currentIndexChanged.connect(self._on_metric_combo)
        bar.addWidget(self.metric_combo)
        bar.addWidget(QLabel("  Sort "))
        self.sort_combo = QComboBox()
        for mode in SORT_MODES:
            self.sort_combo.addItem(SORT_LABELS[mode], mode)
        self.sort_combo.setCurrentIndex(SORT_MODES.index(model.sort))
        self.sort_combo.currentIndexChanged.connect(self._on_sort_combo)
        bar.addWidget(self.sort_combo)
        spacer = QWidget()
        spacer.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        bar.addWidget(spacer)
        self.simulated_badge = QLabel("SIMULATED DATA")
        self.simulated_badge.setObjectName("simulated-badge")
        self.simulated_badge.setStyleSheet(SIMULATED_STYLE)
        self.simulated_badge.setVisible(False)
        self._badge_action = bar.addWidget(self.simulated_badge)
        self._badge_action.setVisible(False)

        self.state_label = QLabel()
        self.statusBar().addPermanentWidget(self.state_label)
        model.events.metric.connect(self._on_model_metric)
        model.events.sort.connect(self._on_model_sort)

        self._status_version = -1
        self._timer = QTimer(self)
        self._timer.setInterval(500)
        self._timer.timeout.connect(self.refresh_status)
        self._timer.start()
        self.refresh_status()

    @property
    def model(self) -> FleetModel:
        """The fleet model shown."""
        return self._model

    def add_panel(self, widget: QWidget, title: str,
                  area: Qt.DockWidgetArea = Qt.DockWidgetArea.RightDockWidgetArea) -> QDockWidget:
        """Dock `widget` (drilldown, training, alerts...) in `area`; returns the dock for further setup."""
        dock = QDockWidget(title, self)
        dock.setObjectName(f"panel-{title}")
        dock.setWidget(widget)
        self.addDockWidget(area, dock)
        return dock

    def add_tab(self, widget: QWidget, title: str) -> int:
        """Add a full-size tab next to "Fleet"; returns its index."""
        return self.tabs.addTab(widget, title)

    def refresh_status(self) -> None:
        """Update the SIMULATED badge and the per-state counts (cheap; skipped when nothing changed)."""
        if self._model.version == self._status_version:
            return
        self._status_version = self._model.version
        n_sim = self._model.n_simulated
        self.simulated_badge.setVisible(n_sim > 0)
        self._badge_action.setVisible(n_sim > 0)
        self.simulated_badge.setToolTip(
            f"{n_sim} of {self._model.n_hosts} hosts send simulated GPU data, not real telemetry")
        counts = self._model.state_counts()
        parts = [f"{s} {counts.get(s, 0)}" for s in _MAIN_STATES]
        parts += [f"{s} {counts[s]}" for s in _OTHER_STATES if counts.get(s)]
        if counts.get("unknown"):
            parts.append(f"unknown {counts['unknown']}")
        parts.append(f"hosts {self._model.n_hosts}")
        if self._bridge is not None and self._bridge.dropped:
            parts.append(f"UI dropped {self._bridge.dropped} frames")
        self.state_label.setText("  ·  ".join(parts))

    def _on_metric_combo(self, index: int) -> None:
        self._model.set_metric(str(self.metric_combo.itemData(index)))

    def _on_sort_combo(self, index: int) -> None:
        self._model.set_sort(str(self.sort_combo.itemData(index)))

    def _on_model_metric(self, metric: str) -> None:
        i = METRIC_NAMES.index(metric)
        if self.metric_combo.currentIndex() != i:
            self.metric_combo.setCurrentIndex(i)

    def _on_model_sort(self, mode: str) -> None:
        i = SORT_MODES.index(mode)
        if self.sort_combo.currentIndex() != i:
            self.sort_combo.setCurrentIndex(i)

    def closeEvent(self, event: QCloseEvent) -> None:
        """Stop the redraw timers; the bridge and ingest belong to the composition root."""
        self._timer.stop()
        self.heatmap.stop()
        self.timeline.stop()
        super().closeEvent(event)


def build_main_window(model: FleetModel, bridge: QtIngestBridge) -> QtMainWindow:
    """The window over `model`, fed by `bridge` (registers the model as a consumer; starts no ingest)."""
    bridge.add_consumer(model)
    return QtMainWindow(model, bridge)
