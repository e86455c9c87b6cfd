"""Status history: hosts x last N seconds of the selected metric, scrolling live (Grafana style).

`QtHostTimeline` wraps the same `FleetModel` as the heatmap: same rows, same metric, same fixed
color scale and the same grey for "no live connection at that time". One ImageItem, created
once, gets an RGBA image per redraw; x is seconds relative to the newest bucket (0 = now).
The widget keeps the encoded colors per ring column and re-encodes only the columns the
model changed since the last redraw (normally the newest one or two), so a redraw is a row
gather plus a column rotation of packed RGBA words.
"""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
import shiboken6
from PySide6.QtCore import QPointF, QRectF, QTimer, Signal
from PySide6.QtGui import QCursor, QResizeEvent
from PySide6.QtWidgets import QToolTip, QWidget

from console.models.fleet import FleetModel
from console.ui.qt_heatmap import ArgbImageItem, encode_words, lut_words, make_lut, row_ticks


class QtHostTimeline(pg.GraphicsLayoutWidget):
    """Host x time image of a FleetModel's history; redraws at most every `refresh_ms` when it changed.

    Signals: `hostActivated(host)` when a row is clicked. `link_rows(plot)` shares the row axis
    with the heatmap so zooming one scrolls the other.
    """

    hostActivated = Signal(str)

    def __init__(self, model: FleetModel, refresh_ms: int = 250, show_labels: bool = True,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent=parent)
        self._model = model
        self._lut = lut_words(make_lut())
        self._ring = np.zeros((0, 0), dtype=np.uint32)  # encoded colors, [slot, ring column]
        self._ring_version = -1  # timeline version encoded into _ring
        self._drawn = (-1, -1)
        self._shape = (0, 0)
        self._labels: list[str] = []
        self._drawn_layout = -1
        self._show_labels = show_labels
        self.redraws = 0

        self._plot: pg.PlotItem = self.addPlot(row=0, col=0)
        plot = self._plot
        plot.setMenuEnabled(False)
        plot.hideButtons()
        plot.setLabel("bottom", "time (s, 0 = now)")
        plot.getAxis("left").setStyle(tickLength=0, showValues=show_labels)
        vb = plot.getViewBox()
        vb.invertY(True)
        vb.setMouseEnabled(x=False, y=True)
        vb.setDefaultPadding(0.0)
        self._vb = vb
        self._image = ArgbImageItem()
        plot.addItem(self._image)

        self.scene().sigMouseMoved.connect(self._on_mouse_moved)
        self.scene().sigMouseClicked.connect(self._on_mouse_clicked)
        vb.sigYRangeChanged.connect(self._update_ticks)
        model.events.metric.connect(self._on_metric)

        self._timer = QTimer(self)
        self._timer.setInterval(refresh_ms)
        self._timer.timeout.connect(self._on_timer)
        self._timer.start()
        self.redraw()

    @property
    def image_item(self) -> ArgbImageItem:
        """The single ImageItem."""
        return self._image

    @property
    def plot_item(self) -> pg.PlotItem:
        """The PlotItem."""
        return self._plot

    def link_rows(self, plot: pg.PlotItem) -> None:
        """Share the y (host) axis with another plot, e.g. QtFleetHeatmap.plot_item."""
        self._plot.setYLink(plot)

    def redraw(self) -> None:
        """Encode the model's history and hand it to the ImageItem."""
        if self.closed:
            return
        timeline = self._model.timeline
        order = self._model.order()
        rows, n = len(order), timeline.n_buckets
        seconds = n * timeline.bucket_ns / 1e9
        self._encode_changed_columns()
        if rows and n:
            words = self._ring.take(order, axis=0)
            start = ((timeline.head or 0) + 1) % n  # ring position of the oldest bucket
            if start:
                words = np.concatenate((words[:, start:], words[:, :start]), axis=1)
            self._image.set_words(words)
            self._image.setRect(QRectF(-seconds, 0, seconds, rows))
        else:
            self._image.clear()
        if (rows, n) != self._shape:
            self._shape = (rows, n)
            self._vb.setLimits(xMin=-seconds, xMax=0, yMin=0, yMax=max(rows, 1))
            self._vb.setRange(xRange=(-seconds, 0), yRange=(0, max(rows, 1)), padding=0)
            self._drawn_layout = -1
        if self._model.layout_version != self._drawn_layout:
            self._drawn_layout = self._model.layout_version
            self._labels = self._model.row_labels()
            self._update_ticks()
        self._drawn = (self._model.timeline.version, self._model.layout_version)
        self.redraws += 1

    def _encode_changed_columns(self) -> None:
        timeline = self._model.timeline
        values, grey = timeline.ring()
        if self._ring.shape != values.shape:
            self._ring = np.zeros(values.shape, dtype=np.uint32)
            self._ring_version = -1
        cols = np.flatnonzero(timeline.col_version > self._ring_version)
        if len(cols):
            sc = self._model.scale
            self._ring[:, cols] = encode_words(values[:, cols], (sc.lo, sc.hi), self._lut, grey[:, cols])
        self._ring_version = timeline.version

    def stop(self) -> None:
        """Stop the redraw timer (the window calls it on close)."""
        self._timer.stop()

    def close(self) -> bool:
        """Detach from the model before pyqtgraph clears the scene, so no callback touches deleted items."""
        self._timer.stop()
        model = self._model
        model.events.metric.disconnect(self._on_metric)
        return bool(super().close())

    def _on_timer(self) -> None:
        self._model.advance()
        self._model.order()  # refresh layout_version before comparing
        if (self._model.timeline.version, self._model.layout_version) != self._drawn:
            self.redraw()

    def _on_metric(self, _metric: str) -> None:
        if shiboken6.isValid(self):
            self.redraw()

    def _update_ticks(self, *_args: object) -> None:
        if self.closed:
            return
        if not self._show_labels:
            return
        (y0, y1) = self._vb.viewRange()[1]
        px_per_row = max(self._vb.height(), 1.0) / max(y1 - y0, 1e-6)
        self._plot.getAxis("left").setTicks([row_ticks(self._labels, y0, y1, px_per_row)])

    def resizeEvent(self, ev: QResizeEvent) -> None:
        """Tick density depends on pixels per row."""
        super().resizeEvent(ev)
        if hasattr(self, "_labels") and not self.closed:
            self._update_ticks()

    def cell_at(self, scene_pos: QPointF) -> tuple[int, float] | None:
        """(row, seconds ago) under a scene position, or None outside the image."""
        if not self._plot.sceneBoundingRect().contains(scene_pos):
            return None
        p = self._vb.mapSceneToView(scene_pos)
        row = math.floor(p.y())
        rows, n = self._shape
        if 0 <= row < rows and -n * self._model.timeline.bucket_ns / 1e9 <= p.x() <= 0:
            return row, -p.x()
        return None

    def tooltip_text(self, row: int, seconds_ago: float) -> str:
        """Host, time and value of one history cell."""
        timeline = self._model.timeline
        n = timeline.n_buckets
        ago = min(n - 1, max(0, int(seconds_ago * 1e9 // timeline.bucket_ns)))
        col = ((timeline.head or 0) - ago) % n
        slot = int(self._model.order()[row])
        values, grey = timeline.ring()
        value = float(values[slot, col])
        sc = self._model.scale
        if bool(grey[slot, col]):
            text = "no live connection"
        elif math.isnan(value):
            text = "no data"
        else:
            text = f"{value:.4g} {sc.unit}"
        return f"{self._model.row_host(row)}  {int(seconds_ago)} s ago\n{sc.label} ({sc.reduce} of GPUs): {text}"

    def _on_mouse_moved(self, pos: QPointF) -> None:
        cell = self.cell_at(pos)
        if cell is None:
            QToolTip.hideText()
            return
        QToolTip.showText(QCursor.pos(), self.tooltip_text(*cell), self)

    def _on_mouse_clicked(self, ev: object) -> None:
        scene_pos = getattr(ev, "scenePos", None)
        if scene_pos is None:
            return
        cell = self.cell_at(scene_pos())
        if cell is not None:
            self.hostActivated.emit(self._model.row_host(cell[0]))
