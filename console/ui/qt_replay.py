"""Replay bar: a time slider and play/pause over a `ReplaySource`, feeding the live consumers.

`QtReplayBar` turns slider moves and playback ticks into time windows, reads the frames of each
window on a worker (the GUI thread never reads the audit file) and hands them, on the GUI thread,
to the same consumers the ingest bridge feeds (FleetModel, TrainingModel, HostDrilldownModel,
EventsLogModel): anything with an `on_frame` method. While playing, windows tile time so each
stored record is delivered once; a seek delivers the records of the last `window_ns` before t.
Because the models drop points older than what they hold, a backward seek first calls `clear()`
on every consumer that has one.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Iterable
from typing import Final

import shiboken6
from PySide6.QtCore import Qt as _Qt
from PySide6.QtCore import QThreadPool, QTimer, Signal
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QSlider, QToolButton, QWidget

from console.models.replay import ReplaySource
from console.ui.workers import run_in_pool
from protos.types import Frame

log = logging.getLogger("gpusoc.console.ui")

DEFAULT_SPEEDS: Final[tuple[float, ...]] = (1.0, 2.0, 5.0, 10.0, 60.0, 600.0)
_NS: Final = 1_000_000_000


class QtReplayBar(QWidget):
    """Slider (1 s per step) + play/pause + speed, driving a ReplaySource.

    Signals (GUI thread): `framesReady(object)` with the list of Frames of one window, after the
    consumers got them; `positionChanged(object)` with the replay time in unix ns;
    `seeked(object)` with the new time after a jump; `playingChanged(bool)`.
    """

    framesReady = Signal(object)
    positionChanged = Signal(object)
    seeked = Signal(object)
    playingChanged = Signal(bool)

    def __init__(self, source: ReplaySource, consumers: Iterable[object] = (), parent: QWidget | None = None, *,
                 tick_ms: int = 200, pool: QThreadPool | None = None,
                 speeds: Iterable[float] = DEFAULT_SPEEDS) -> None:
        super().__init__(parent)
        self.source = source
        self._consumers: list[object] = list(consumers)
        self._pool = pool
        self._generation = 0  # bumped by seeks: answers for older windows are dropped
        self._busy = False
        self._pending: tuple[int, int] | None = None
        self._delivered_ns = source.position_ns
        self._last_tick = time.monotonic()
        self._setting_slider = False

        self.play_button = QToolButton()
        self.play_button.setText("▶")
        self.play_button.setToolTip("Play / pause the recording")
        self.play_button.clicked.connect(self.toggle)
        self.slider = QSlider(_Qt.Orientation.Horizontal)
        self.slider.setRange(0, max(0, math.ceil((source.end_ns - source.start_ns) / _NS)))
        self.slider.setSingleStep(1)
        self.slider.setPageStep(60)
        self.slider.valueChanged.connect(self._on_slider)
        self.speed_combo = QComboBox()
        for s in speeds:
            self.speed_combo.addItem(f"{s:g}x", s)
        self.speed_combo.currentIndexChanged.connect(self._on_speed)
        self.time_label = QLabel("")
        self.time_label.setMinimumWidth(170)
        self.replay_label = QLabel("REPLAY")
        self.replay_label.setStyleSheet("color: #faad14; font-weight: bold;")
        self.replay_label.setToolTip(str(source.path))

        layout = QHBoxLayout(self)
        layout.setContentsMargins(4, 2, 4, 2)
        layout.addWidget(self.replay_label)
        layout.addWidget(self.play_button)
        layout.addWidget(self.slider, 1)
        layout.addWidget(self.time_label)
        layout.addWidget(self.speed_combo)

        self._timer = QTimer(self)
        self._timer.setInterval(tick_ms)
        self._timer.timeout.connect(self._on_tick)
        self._update_time_label()

    # ---- public ----

    @property
    def position_ns(self) -> int:
        """Replay time (unix ns)."""
        return self.source.position_ns

    @property
    def busy(self) -> bool:
        """True while a window is being read."""
        return self._busy

    def add_consumer(self, consumer: object) -> None:
        """Also feed `consumer` (anything with on_frame)."""
        if consumer not in self._consumers:
            self._consumers.append(consumer)

    def seek(self, t_ns: int) -> None:
        """Jump to `t_ns` and deliver the frames there (clearing consumers first when going back)."""
        backwards = t_ns < self._delivered_ns
        t0, t1 = self.source.seek(t_ns)
        self._generation += 1
        if backwards:
            for c in self._consumers:
                clear = getattr(c, "clear", None)
                if callable(clear):
                    clear()
        self._pending = (t0, t1)
        self._delivered_ns = t1
        self._sync_slider()
        self.seeked.emit(t1)
        self.positionChanged.emit(t1)
        self._pump()

    def play(self) -> None:
        """Play from the current position (from the start when at the end)."""
        if self.source.at_end:
            self.seek(self.source.start_ns)
        self.source.play(float(self.speed_combo.currentData() or 1.0))
        self._last_tick = time.monotonic()
        self._timer.start()
        self.play_button.setText("⏸")
        self.playingChanged.emit(True)

    def pause(self) -> None:
        """Stop the clock."""
        self.source.pause()
        self._timer.stop()
        self.play_button.setText("▶")
        self.playingChanged.emit(False)

    def toggle(self) -> None:
        """Play if paused, pause if playing."""
        if self.source.playing:
            self.pause()
        else:
            self.play()

    # ---- internals ----

    def _on_slider(self, value: int) -> None:
        if self._setting_slider:
            return
        self.seek(self.source.start_ns + value * _NS)

    def _on_speed(self, index: int) -> None:
        if self.source.playing:
            self.source.play(float(self.speed_combo.itemData(index) or 1.0))

    def _on_tick(self) -> None:
        now = time.monotonic()
        window = self.source.advance(now - self._last_tick)
        self._last_tick = now
        if window is not None:
            t0, t1 = window
            # Extend a queued play window instead of queueing another: windows stay contiguous.
            self._pending = (self._pending[0], t1) if self._pending is not None else (t0, t1)
            self._delivered_ns = t1
            self._sync_slider()
            self.positionChanged.emit(t1)
            self._pump()
        if not self.source.playing:
            self.pause()

    def _pump(self) -> None:
        if self._busy or self._pending is None:
            return
        t0, t1 = self._pending
        self._pending = None
        self._busy = True
        generation = self._generation
        source = self.source
        run_in_pool(lambda: (generation, source.frames_between(t0, t1)), self._on_frames, self._on_error,
                    pool=self._pool)

    def _on_frames(self, result: tuple[int, list[Frame]]) -> None:
        generation, frames = result
        self._busy = False
        if not shiboken6.isValid(self):
            return
        if generation == self._generation:
            for frame in frames:
                for c in self._consumers:
                    on_frame = getattr(c, "on_frame", None)
                    if on_frame is None:
                        continue
                    try:
                        on_frame(frame)
                    except Exception:
                        log.exception("%s.on_frame failed during replay", type(c).__name__)
            self.framesReady.emit(frames)
        self._pump()

    def _on_error(self, exc: BaseException) -> None:
        self._busy = False
        log.error("replay read failed: %r", exc)
        if shiboken6.isValid(self):
            self.time_label.setText(f"read failed: {exc}")
            self._pump()

    def _sync_slider(self) -> None:
        self._setting_slider = True
        try:
            self.slider.setValue(int((self.source.position_ns - self.source.start_ns) // _NS))
        finally:
            self._setting_slider = False
        self._update_time_label()

    def _update_time_label(self) -> None:
        t = self.source.position_ns
        stamp = dt.datetime.fromtimestamp(t / 1e9).strftime("%Y-%m-%d %H:%M:%S") if t else "—"
        self.time_label.setText(stamp)
