"""Fleet views under pytest-qt (offscreen): bridge threading, heatmap pixels, main window controls."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import shiboken6
from PySide6.QtCore import QEvent, QPoint, Qt
from PySide6.QtGui import QColor, QGuiApplication
from PySide6.QtWidgets import QLabel

from console.ingest.sink import CONNECTED, DISCONNECTED, HostStatus
from console.models.fleet import SORT_JOB, SORT_VALUE, FleetModel
from console.ui.bridge import QtIngestBridge
from console.ui.qt_heatmap import GREY_RGBA, QtFleetHeatmap, encode_rgba, make_lut, words_to_rgba
from console.ui.qt_main import QtMainWindow, build_main_window
from console.ui.qt_timeline import QtHostTimeline
from protos.types import GPU_OK, METRIC_INDEX, N_METRICS, Frame, TrainRecord

TEMP = METRIC_INDEX["temp_c"]


def make_frame(host: str, temps: list[float] | float = 40.0, n_gpus: int = 8, seq: int = 1,
               simulated: bool = False, job: str | None = None) -> Frame:
    values = np.full((n_gpus, N_METRICS), np.nan, dtype=np.float32)
    values[:, TEMP] = temps
    values[:, METRIC_INDEX["gpu_util_pct"]] = 50.0
    now = time.time_ns()
    train = [TrainRecord(now, job, i, i, n_gpus, 1, 1, seq) for i in range(n_gpus)] if job else []
    return Frame(host, "e", seq, now, simulated, values, list(range(n_gpus)), [GPU_OK] * n_gpus, train=train)


@pytest.fixture
def bridge() -> Iterator[QtIngestBridge]:
    b = QtIngestBridge()
    yield b
    b.close()


def _feed(bridge: QtIngestBridge, n_hosts: int, ticks: int, spread_s: float = 0.0) -> threading.Thread:
    def run() -> None:
        for h in range(n_hosts):
            bridge.on_status(HostStatus(f"10.0.{h // 256}.{h % 256}:50051", f"node-{h}", CONNECTED))
        for t in range(ticks):
            for h in range(n_hosts):
                bridge.on_frame(make_frame(f"node-{h}", 30.0 + (h % 50), seq=t + 1))
                if spread_s:
                    time.sleep(spread_s / n_hosts)

    th = threading.Thread(target=run, name="fake-ingest")
    th.start()
    return th


def test_bridge_batches_frames_from_an_ingest_thread(qtbot, bridge: QtIngestBridge) -> None:
    model = FleetModel(metric="temp_c")
    bridge.add_consumer(model)
    heat = QtFleetHeatmap(model)
    qtbot.addWidget(heat)
    th = _feed(bridge, n_hosts=300, ticks=3)
    th.join(10)
    qtbot.waitUntil(lambda: model.n_hosts == 300 and model.version > 0 and bridge.items == 1200
                    and not bridge._pending, timeout=5000)
    qtbot.waitUntil(lambda: heat.image_item.image is not None and heat.image_item.image.shape[:2] == (300, 8),
                    timeout=5000)
    assert model.state_counts()[CONNECTED] == 300
    # 1,200 calls in well under a second: a handful of queued signals, not 1,200.
    assert 1 <= bridge.emitted <= 20
    row = model.host_row("node-7")
    assert model.image().values[row, 0] == pytest.approx(37.0)


def test_bridge_emits_at_most_every_interval(qtbot, bridge: QtIngestBridge) -> None:
    model = FleetModel()
    bridge.add_consumer(model)
    t0 = time.monotonic()
    th = _feed(bridge, n_hosts=400, ticks=1, spread_s=0.6)
    th.join(10)
    qtbot.waitUntil(lambda: model.n_hosts == 400 and not bridge._pending and model.latest("node-399") is not None,
                    timeout=5000)
    elapsed = time.monotonic() - t0
    assert bridge.emitted <= elapsed / 0.1 + 2


def test_bridge_compacts_when_the_gui_falls_behind(qtbot) -> None:
    model = FleetModel()
    b = QtIngestBridge(model, max_pending=50)
    try:
        # no event loop turns here: the GUI is "busy", so items pile up in pending / in flight
        for t in range(1, 11):
            for h in range(10):
                b.on_frame(make_frame(f"n{h}", seq=t))
        qtbot.waitUntil(lambda: model.n_hosts == 10 and not b._pending, timeout=5000)
        assert b.dropped > 0
        assert all(model.latest(f"n{h}") is not None for h in range(10))
    finally:
        b.close()
    assert not b._thread.is_alive()
    b.on_frame(make_frame("late"))  # ignored after close
    assert b.flush() == 0


def test_bridge_feeds_every_consumer_and_skips_missing_methods(qtbot, bridge: QtIngestBridge) -> None:
    class FramesOnly:
        def __init__(self) -> None:
            self.frames: list[str] = []

        def on_frame(self, frame: Frame) -> None:
            self.frames.append(frame.host)

    model, other = FleetModel(), FramesOnly()
    bridge.add_consumer(model)
    bridge.add_consumer(other)
    bridge.on_status(HostStatus("a:1", "a", CONNECTED))
    bridge.on_frame(make_frame("a"))
    qtbot.waitUntil(lambda: other.frames == ["a"] and model.n_hosts == 1, timeout=3000)


def _hot_fleet() -> tuple[FleetModel, int, int]:
    model = FleetModel(metric="temp_c")
    rng = np.random.default_rng(7)
    for h in range(40):
        model.on_status(HostStatus(f"10.0.0.{h}:50051", f"node-{h:02d}", CONNECTED))
        temps = rng.uniform(28.0, 34.0, 8).astype(np.float32)
        if h == 17:
            temps[5] = 94.0
        model.on_frame(make_frame(f"node-{h:02d}", list(temps)))
    model.on_status(HostStatus("10.0.0.30:50051", "node-30", DISCONNECTED))
    return model, model.host_row("node-17"), 5


def _pixel(img, pt: QPoint) -> tuple[int, int, int]:
    c = QColor(img.pixelColor(pt))
    return c.red(), c.green(), c.blue()


def _close(a: tuple[int, int, int], b: tuple[int, ...], tol: int = 16) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b[:3], strict=True))


def test_screenshot_hot_gpu_is_the_hot_end_of_the_colormap(qtbot) -> None:
    model, row, col = _hot_fleet()
    heat = QtFleetHeatmap(model)
    qtbot.addWidget(heat)
    heat.resize(700, 900)
    heat.show()
    qtbot.waitExposed(heat)
    heat.redraw()
    for _ in range(3):  # let axes settle their widths
        QGuiApplication.processEvents()
        heat.grab()
    img = heat.grab().toImage()
    lut = make_lut()
    hot, cool_end = tuple(lut[-1][:3]), tuple(lut[0][:3])
    hot_px = _pixel(img, heat.cell_center(row, col))
    assert _close(hot_px, hot), (hot_px, hot)
    for r, c in ((row, col - 1), (row, col + 1), (row - 1, col), (row + 1, col)):
        px = _pixel(img, heat.cell_center(r, c))
        assert not _close(px, hot, 60), (r, c, px)
        assert _close(px, tuple(lut[int(256 * (31 - 20) / 75)][:3]), 60)  # near the cool end, ~31 °C
    assert not _close(cool_end, hot, 60)
    grey_px = _pixel(img, heat.cell_center(model.host_row("node-30"), 2))
    assert _close(grey_px, GREY_RGBA, 2), grey_px


def test_click_selects_and_emits_cell_activated(qtbot) -> None:
    model, row, col = _hot_fleet()
    heat = QtFleetHeatmap(model)
    qtbot.addWidget(heat)
    heat.resize(700, 900)
    heat.show()
    qtbot.waitExposed(heat)
    heat.redraw()
    QGuiApplication.processEvents()
    pos = heat.viewport().mapFrom(heat, heat.cell_center(row, col))
    with qtbot.waitSignal(heat.cellActivated, timeout=3000) as sig:
        qtbot.mouseClick(heat.viewport(), Qt.MouseButton.LeftButton, pos=pos)
    assert sig.args == ["node-17", 5]
    assert model.selection == ("node-17", 5)
    text = heat.tooltip_text(row, col)
    assert "node-17" in text and "GPU 5" in text and "94" in text and "°C" in text


def test_tooltip_names_job_and_rank(qtbot) -> None:
    model = FleetModel(sort=SORT_JOB)
    model.on_status(HostStatus("a:1", "a", CONNECTED))
    model.on_frame(make_frame("a", job="llama-70b"))
    heat = QtFleetHeatmap(model)
    qtbot.addWidget(heat)
    text = heat.tooltip_text(0, 3)
    assert "llama-70b rank 3" in text


def test_heatmap_redraws_only_when_the_model_changed(qtbot) -> None:
    now = [time.time_ns()]
    model = FleetModel(clock=lambda: now[0])
    model.on_frame(make_frame("a"))
    heat = QtFleetHeatmap(model, refresh_ms=10)
    qtbot.addWidget(heat)
    qtbot.waitUntil(lambda: heat.redraws >= 1)
    n = heat.redraws
    qtbot.wait(150)
    assert heat.redraws == n
    model.on_frame(make_frame("a", 90.0, seq=2))
    qtbot.waitUntil(lambda: heat.redraws == n + 1, timeout=2000)


def test_metric_switch_updates_colorbar_and_image(qtbot) -> None:
    model = FleetModel(metric="temp_c")
    model.on_status(HostStatus("a:1", "a", CONNECTED))
    model.on_frame(make_frame("a"))
    heat = QtFleetHeatmap(model)
    qtbot.addWidget(heat)
    model.set_metric("gpu_util_pct")
    assert tuple(heat._bar.levels()) == (0.0, 100.0)
    assert heat.image_item.image is not None
    assert "utilisation" in heat._bar.axis.labelText


def test_encode_rgba_masks() -> None:
    lut = make_lut()
    values = np.array([[0.0, 100.0, np.nan, np.nan, np.nan]], dtype=np.float32)
    grey = np.array([[False, False, True, False, False]])
    na = np.array([[False, False, False, True, False]])
    rgba = encode_rgba(values, (0.0, 100.0), lut, grey, na)
    assert rgba.shape == (1, 5, 4) and rgba.dtype == np.uint8
    assert tuple(rgba[0, 0]) == tuple(lut[0]) and tuple(rgba[0, 1]) == tuple(lut[-1])
    assert tuple(rgba[0, 2]) == GREY_RGBA
    assert rgba[0, 4, 3] == 0  # NaN outside the masks: transparent


def test_timeline_widget_shows_history(qtbot) -> None:
    now = [time.time_ns()]
    model = FleetModel(metric="temp_c", sort=SORT_VALUE, clock=lambda: now[0])
    for h in range(5):
        model.on_status(HostStatus(f"h{h}:1", f"h{h}", CONNECTED))
        model.on_frame(make_frame(f"h{h}", 30.0 + h))
    tl = QtHostTimeline(model, refresh_ms=20)
    qtbot.addWidget(tl)
    rgba = words_to_rgba(tl.image_item.words)
    assert rgba.shape == (5, 300, 4)
    assert rgba[0, -1, 3] == 255  # newest second drawn
    assert rgba[0, 0, 3] == 0  # no data 5 minutes ago
    text = tl.tooltip_text(0, 0.5)
    assert "h4" in text and "34 °C" in text
    assert "no data" in tl.tooltip_text(0, 200.0)
    model.on_status(HostStatus("h0:1", "h0", DISCONNECTED))
    now[0] += 2_000_000_000
    model.advance()
    assert "no live connection" in tl.tooltip_text(model.host_row("h0"), 0.2)
    assert "30 °C" in tl.tooltip_text(model.host_row("h0"), 2.2)  # before it dropped
    qtbot.waitUntil(lambda: words_to_rgba(tl.image_item.words)[model.host_row("h0"), -1, 0] == 128, timeout=2000)


def test_main_window_controls_badge_and_status(qtbot, bridge: QtIngestBridge) -> None:
    model = FleetModel()
    win = build_main_window(model, bridge)
    qtbot.addWidget(win)
    assert isinstance(win, QtMainWindow)
    assert not win.simulated_badge.isVisibleTo(win)
    bridge.on_status(HostStatus("a:1", "a", CONNECTED))
    bridge.on_status(HostStatus("b:1", "b", DISCONNECTED))
    bridge.on_frame(make_frame("a", simulated=True))
    qtbot.waitUntil(lambda: model.n_hosts == 2, timeout=3000)
    win.refresh_status()
    assert win.simulated_badge.isVisibleTo(win)
    assert win.simulated_badge.text() == "SIMULATED DATA"
    text = win.state_label.text()
    assert "connected 1" in text and "disconnected 1" in text and "lagging 0" in text and "gap 0" in text
    win.metric_combo.setCurrentIndex(win.metric_combo.findData("power_w"))
    assert model.metric == "power_w"
    win.sort_combo.setCurrentIndex(win.sort_combo.findData(SORT_JOB))
    assert model.sort == SORT_JOB
    model.set_metric("temp_c")
    assert win.metric_combo.currentData() == "temp_c"
    dock = win.add_panel(QLabel("drilldown"), "Drilldown")
    assert dock.widget() is not None and dock.windowTitle() == "Drilldown"
    assert win.add_tab(QLabel("alerts"), "Alerts") == 1
    win.close()


@pytest.mark.xcb
def test_main_window_under_xcb(qtbot, bridge: QtIngestBridge) -> None:
    if QGuiApplication.platformName() != "xcb":
        pytest.skip(f"needs the xcb platform, running on {QGuiApplication.platformName()!r}")
    model, row, col = _hot_fleet()
    win = build_main_window(model, bridge)
    qtbot.addWidget(win)
    win.resize(1400, 900)
    win.show()
    qtbot.waitExposed(win)
    win.heatmap.redraw()
    qtbot.wait(200)
    pix = win.grab()
    assert pix.width() >= 1000 and pix.height() >= 600
    img = win.heatmap.grab().toImage()
    hot = tuple(make_lut()[-1][:3])
    assert _close(_pixel(img, win.heatmap.cell_center(row, col)), hot)
    win.close()


def test_model_events_after_views_are_gone_do_not_crash(qtbot) -> None:
    model, row, col = _hot_fleet()
    closed, deleted = QtFleetHeatmap(model), QtFleetHeatmap(model)
    timeline = QtHostTimeline(model)
    closed.close()  # pyqtgraph clears the scene: the view must detach first
    deleted.deleteLater()
    timeline.deleteLater()
    QGuiApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete.value)
    assert not shiboken6.isValid(deleted) and not shiboken6.isValid(timeline)
    model.select(row, col)
    model.set_metric("power_w")
    model.set_sort(SORT_JOB)
    assert model.selection == ("node-17", 5)
