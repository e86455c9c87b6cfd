"""Fleet heatmap: one row per host, one column per GPU, colored by the selected metric.

`QtFleetHeatmap` wraps a `console.models.fleet.FleetModel`. One ImageItem is created once and
fed ARGB32 pixel words that this module encodes with numpy (256-entry LUT, fixed per-metric
levels, grey / N/A cells written directly). Measured (benchmarks/bench_heatmap.py,
docs/benchmarks-ui.md) against pyqtgraph's float32 + LUT path (an indexed image, slow to paint),
float32 + NaN over a second grey-mask item, and pyqtgraph's RGBA path (converted on every
paint), it is the cheapest to paint. A QTimer polls `model.version` and redraws only when it
moved, so a burst of batches costs one repaint.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt
import pyqtgraph as pg
import shiboken6
from PySide6.QtCore import QPoint, QPointF, QRectF, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QCursor, QImage, QPen, QResizeEvent
from PySide6.QtWidgets import QGraphicsRectItem, QToolTip, QWidget

from console.models.fleet import SORT_JOB, CellInfo, FleetModel

COLORMAP_NAME: Final = "plasma"
LUT_SIZE: Final = 256
GREY_RGBA: Final = (128, 128, 128, 255)  # no live data: host offline/stale, or GPU lost
NA_RGBA: Final = (52, 52, 60, 255)  # live host, metric not available on that GPU
ABSENT_RGBA: Final = (0, 0, 0, 0)  # the host has no GPU at that index
SELECTION_COLOR: Final = "#00e5ff"
LABEL_PX: Final = 13  # minimum pixels per axis label


def colormap() -> pg.ColorMap:
    """The one colormap every metric uses (fixed levels differ per metric)."""
    cmap = pg.colormap.get(COLORMAP_NAME)
    assert cmap is not None
    return cmap


def make_lut(cmap: pg.ColorMap | None = None, n: int = LUT_SIZE) -> npt.NDArray[np.uint8]:
    """uint8 [n, 4] RGBA lookup table; 256 entries, as pyqtgraph's docs advise."""
    lut = (cmap or colormap()).getLookupTable(0.0, 1.0, n, alpha=True)
    return np.ascontiguousarray(lut, dtype=np.uint8)


def argb_word(color: tuple[int, int, int, int]) -> np.uint32:
    """One RGBA color as a QImage ARGB32 pixel value 0xAARRGGBB (opaque or fully transparent only)."""
    r, g, b, a = color
    return np.uint32((a << 24) | (r << 16) | (g << 8) | b)


def lut_words(lut: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint32]:
    """RGBA uint8 [n, 4] LUT -> ARGB32 words [n]: one gather per cell instead of four."""
    c = np.asarray(lut, dtype=np.uint32)
    alpha = c[:, 3] if c.shape[1] > 3 else np.full(len(c), 255, dtype=np.uint32)
    return np.ascontiguousarray((alpha << 24) | (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2])


GREY_WORD: Final = argb_word(GREY_RGBA)
NA_WORD: Final = argb_word(NA_RGBA)
ABSENT_WORD: Final = argb_word(ABSENT_RGBA)


def encode_words(values: npt.NDArray[np.float32], levels: tuple[float, float], lut: npt.NDArray[np.uint32],
                 grey: npt.NDArray[np.bool_] | None = None, na: npt.NDArray[np.bool_] | None = None,
                 absent: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.uint32]:
    """Values -> ARGB32 pixel words (same shape) with fixed levels; masks painted grey / N/A / transparent.

    The index math matches pyqtgraph's LUT mapping: lo -> first entry, hi and above -> last.
    NaN outside the masks is transparent (the status history's "no sample in that second").
    Every color is opaque or fully transparent, so the words are valid premultiplied ARGB too.
    """
    lo, hi = levels
    n = len(lut)
    nan = np.isnan(values)
    x = np.subtract(values, np.float32(lo), dtype=np.float32)
    x *= np.float32(n / (hi - lo) if hi > lo else 0.0)
    np.fmax(x, 0.0, out=x)  # also turns NaN into 0
    np.fmin(x, n - 1, out=x)
    out = lut[x.astype(np.uint8 if n <= 256 else np.uint16)]
    out[nan] = ABSENT_WORD
    if grey is not None:
        out[grey] = GREY_WORD
    if na is not None:
        out[na] = NA_WORD
    if absent is not None:
        out[absent] = ABSENT_WORD
    return out


def words_to_rgba(words: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint8]:
    """ARGB32 words [rows, cols] -> RGBA uint8 [rows, cols, 4] (for tests and non-Qt consumers)."""
    w = np.asarray(words, dtype=np.uint32)
    return np.stack([(w >> 16) & 255, (w >> 8) & 255, w & 255, w >> 24], axis=-1).astype(np.uint8)


def encode_rgba(values: npt.NDArray[np.float32], levels: tuple[float, float], lut: npt.NDArray[np.uint8],
                grey: npt.NDArray[np.bool_] | None = None, na: npt.NDArray[np.bool_] | None = None,
                absent: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.uint8]:
    """Values -> RGBA uint8 [rows, cols, 4]; see encode_words for the mapping and the masks."""
    return words_to_rgba(encode_words(values, levels, lut_words(lut), grey, na, absent))


class ArgbImageItem(pg.ImageItem):
    """An ImageItem drawn from ARGB32-premultiplied words with no per-paint conversion.

    pyqtgraph turns an RGBA uint8 image into a Format_RGBA8888 QImage, which the raster engine
    converts on every paint; a premultiplied ARGB32 QImage is blitted directly (~4x cheaper to
    paint at 1,536 x 8, see docs/benchmarks-ui.md). `set_words` goes through setImage, so
    bounds, shape changes and update() behave as usual; only `render` is replaced.
    """

    def __init__(self) -> None:
        super().__init__(axisOrder="row-major")
        self._words = np.zeros((0, 0), dtype=np.uint32)

    @property
    def words(self) -> npt.NDArray[np.uint32]:
        """The ARGB32 words shown, [rows, cols]."""
        return self._words

    def set_words(self, words: npt.NDArray[np.uint32]) -> None:
        """Show [rows, cols] ARGB32 words (row 0 at y=0, column 0 at x=0)."""
        self._words = np.ascontiguousarray(words, dtype=np.uint32)
        rows, cols = self._words.shape
        self.setImage(self._words.view(np.uint8).reshape(rows, cols, 4), autoLevels=False)

    def render(self) -> None:
        """Wrap the words in a QImage; no LUT, levels or format conversion."""
        words = self._words
        if self.image is None or words.size == 0:
            self._unrenderable = True
            return
        rows, cols = words.shape
        self.qimage = QImage(words.data, cols, rows, cols * 4, QImage.Format.Format_ARGB32_Premultiplied)
        self._renderRequired = False
        self._unrenderable = False


def format_cell(info: CellInfo) -> str:
    """Tooltip text for one heatmap cell."""
    if info["value"] is not None:
        value = f"{info['value']:.4g} {info['unit']}"
    elif info["state"] not in ("connected", "gap") or info["gpu_state"] in ("lost", "absent"):
        last = "" if info["last_value"] is None else f" (last {info['last_value']:.4g} {info['unit']})"
        value = f"no live data{last}"
    else:
        value = "not available"
    job = "none" if info["job"] is None else f"{info['job']} rank {info['rank']}"
    lines = [
        f"{info['host']}  GPU {info['gpu']}" + ("  [SIMULATED]" if info["simulated"] else ""),
        f"{info['label']}: {value}",
        f"job: {job}",
        f"state: {info['state']}" + (f" ({info['detail']})" if info["detail"] else ""),
        f"GPU state: {info['gpu_state']}",
    ]
    if info["age_s"] is not None:
        lines.append(f"last frame: {info['age_s']:.1f} s ago")
    return "\n".join(lines)


def row_ticks(labels: list[str], first: float, last: float, px_per_row: float) -> list[tuple[float, str]]:
    """Every k-th visible row label, k chosen so labels are >= LABEL_PX pixels apart."""
    if not labels:
        return []
    step = max(1, math.ceil(LABEL_PX / max(px_per_row, 1e-6)))
    lo = max(0, int(first))
    hi = min(len(labels), math.ceil(last) + 1)
    lo -= lo % step
    return [(i + 0.5, labels[i]) for i in range(lo, hi, step)]


class QtFleetHeatmap(pg.GraphicsLayoutWidget):
    """Hosts x GPUs heatmap of a FleetModel, redrawn at most every `refresh_ms` when the model changed.

    Signals: `cellActivated(host, gpu)` when a cell is selected (click, or model.select elsewhere).
    Rows follow the model's sort; in job sort, separators and the right axis mark the jobs.
    """

    cellActivated = Signal(str, int)

    def __init__(self, model: FleetModel, refresh_ms: int = 100, parent: QWidget | None = None) -> None:
        super().__init__(parent=parent)
        self._model = model
        self._lut = lut_words(make_lut())
        self._drawn_version = -1
        self._drawn_layout = -1
        self._shape = (0, 0)
        self._labels: list[str] = []
        self.redraws = 0

        self._plot: pg.PlotItem = self.addPlot(row=0, col=0)
        plot = self._plot
        plot.setMenuEnabled(False)
        plot.hideButtons()
        plot.showAxis("right")
        plot.getAxis("right").setStyle(tickLength=0)
        plot.getAxis("left").setStyle(tickLength=0)
        plot.setLabel("bottom", "GPU")
        vb = plot.getViewBox()
        vb.invertY(True)
        vb.setMouseEnabled(x=False, y=True)
        vb.setDefaultPadding(0.0)
        self._vb = vb

        self._image = ArgbImageItem()
        plot.addItem(self._image)
        self._separators = pg.PlotCurveItem(pen=pg.mkPen("#e0e0e0", width=1), connect="pairs")
        plot.addItem(self._separators)
        self._selection = QGraphicsRectItem()
        pen = QPen(QColor(SELECTION_COLOR))
        pen.setWidth(2)
        pen.setCosmetic(True)
        self._selection.setPen(pen)
        self._selection.setZValue(10)
        self._selection.hide()
        plot.addItem(self._selection)

        sc = model.scale
        self._bar = pg.ColorBarItem(values=(sc.lo, sc.hi), colorMap=colormap(), interactive=False,
                                    label=self._bar_label(), colorMapMenu=False)
        self.addItem(self._bar, row=0, col=1)

        self.scene().sigMouseMoved.connect(self._on_mouse_moved)
        self.scene().sigMouseClicked.connect(self._on_mouse_clicked)
        vb.sigYRangeChanged.connect(self._update_ticks)
        model.events.selection.connect(self._on_selection)
        model.events.metric.connect(self._on_metric)

        self._timer = QTimer(self)
        self._timer.setInterval(refresh_ms)
        self._timer.timeout.connect(self._on_timer)
        self._timer.start()
        self.redraw()

    # ---- public ----------------------------------------------------------------------------

    @property
    def model(self) -> FleetModel:
        """The model drawn."""
        return self._model

    @property
    def image_item(self) -> ArgbImageItem:
        """The single ImageItem (tests map cells to pixels through it)."""
        return self._image

    @property
    def plot_item(self) -> pg.PlotItem:
        """The PlotItem, e.g. to link the status history's rows to this view."""
        return self._plot

    def redraw(self) -> None:
        """Encode the model's current image and hand it to the ImageItem (one setImage, no new items)."""
        if self.closed:
            return
        img = self._model.image()
        rows, cols = img.values.shape
        sc = self._model.scale
        if rows and cols:
            self._image.set_words(encode_words(img.values, (sc.lo, sc.hi), self._lut, img.grey, img.na, img.absent))
        else:
            self._image.clear()
        if (rows, cols) != self._shape:
            self._shape = (rows, cols)
            self._vb.setLimits(xMin=0, xMax=max(cols, 1), yMin=0, yMax=max(rows, 1))
            self._vb.setRange(xRange=(0, max(cols, 1)), yRange=(0, max(rows, 1)), padding=0)
            self._plot.getAxis("bottom").setTicks([[(c + 0.5, str(c)) for c in range(cols)]])
            self._drawn_layout = -1
        if self._model.layout_version != self._drawn_layout:
            self._drawn_layout = self._model.layout_version
            self._labels = self._model.row_labels()
            self._update_separators()
            self._update_ticks()
        self._update_selection_rect()
        self._drawn_version = img.version
        self.redraws += 1

    def cell_at(self, scene_pos: QPointF) -> tuple[int, int] | None:
        """(row, col) under a scene position, or None outside the grid."""
        if not self._plot.sceneBoundingRect().contains(scene_pos):
            return None
        p = self._vb.mapSceneToView(scene_pos)
        row, col = math.floor(p.y()), math.floor(p.x())
        rows, cols = self._shape
        if 0 <= row < rows and 0 <= col < cols:
            return row, col
        return None

    def cell_center(self, row: int, col: int) -> QPoint:
        """Widget pixel coordinates of a cell's center (through the ImageItem's device mapping)."""
        dev = self._image.mapToDevice(QPointF(col + 0.5, row + 0.5))
        assert dev is not None
        return self.viewport().mapTo(self, dev.toPoint())

    def tooltip_text(self, row: int, col: int) -> str:
        """What the hover tooltip says about a cell."""
        return format_cell(self._model.cell_info(row, col))

    def stop(self) -> None:
        """Stop the redraw timer (the window calls it on close)."""
        self._timer.stop()

    def close(self) -> bool:
        """Detach from the model before pyqtgraph clears the scene, so no callback touches deleted items."""
        self._timer.stop()
        model = self._model
        model.events.selection.disconnect(self._on_selection)
        model.events.metric.disconnect(self._on_metric)
        return bool(super().close())

    # ---- internals -------------------------------------------------------------------------

    def _bar_label(self) -> str:
        sc = self._model.scale
        return f"{sc.label} ({sc.unit})"

    def _on_timer(self) -> None:
        self._model.advance()
        if self._model.version != self._drawn_version:
            self.redraw()

    def _alive(self) -> bool:
        """False once closed or deleted: model callbacks must not touch freed scene items."""
        return shiboken6.isValid(self) and not self.closed

    def _on_metric(self, _metric: str) -> None:
        if not self._alive():
            return
        sc = self._model.scale
        self._bar.setLevels(values=(sc.lo, sc.hi))
        self._bar.axis.setLabel(self._bar_label())
        self.redraw()

    def _on_selection(self, host: str | None, gpu: int | None) -> None:
        if not self._alive():
            return
        self._update_selection_rect()
        if host is not None and gpu is not None:
            self.cellActivated.emit(host, gpu)

    def _update_selection_rect(self) -> None:
        sel = self._model.selection
        if sel is None or sel[0] not in self._labels:
            self._selection.hide()
            return
        row = self._model.host_row(sel[0])
        self._selection.setRect(QRectF(sel[1], row, 1, 1))
        self._selection.show()

    def _update_separators(self) -> None:
        groups = self._model.groups() if self._model.sort == SORT_JOB else []
        cols = max(self._shape[1], 1)
        ys = [g.start for g in groups[1:]]
        x = np.repeat(np.array([[0.0, float(cols)]]), len(ys), axis=0).ravel()
        y = np.repeat(np.asarray(ys, dtype=float), 2)
        self._separators.setData(x=x, y=y, connect="pairs")

    def _update_ticks(self, *_args: object) -> None:
        if self.closed:
            return
        (y0, y1) = self._vb.viewRange()[1]
        height = max(self._vb.height(), 1.0)
        px_per_row = height / max(y1 - y0, 1e-6)
        self._plot.getAxis("left").setTicks([row_ticks(self._labels, y0, y1, px_per_row)])
        right: list[tuple[float, str]] = []
        if self._model.sort == SORT_JOB:
            for g in self._model.groups():
                if g.n_rows * px_per_row >= LABEL_PX and g.start + g.n_rows > y0 and g.start < y1:
                    right.append((g.start + g.n_rows / 2, g.label))
        self._plot.getAxis("right").setTicks([right])

    def resizeEvent(self, ev: QResizeEvent) -> None:
        """Tick density depends on pixels per row."""
        super().resizeEvent(ev)
        if hasattr(self, "_labels") and not self.closed:
            self._update_ticks()

    def _on_mouse_moved(self, pos: QPointF) -> None:
        cell = self.cell_at(pos)
        if cell is None:
            QToolTip.hideText()
            return
        QToolTip.showText(QCursor.pos(), self.tooltip_text(*cell), self)

    def _on_mouse_clicked(self, ev: object) -> None:
        button = getattr(ev, "button", None)
        scene_pos = getattr(ev, "scenePos", None)
        if button is None or scene_pos is None or button() != Qt.MouseButton.LeftButton:
            return
        cell = self.cell_at(scene_pos())
        if cell is not None:
            self._model.select(*cell)
