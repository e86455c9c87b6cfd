"""Training panel: loss, grad norm, step time and throughput per rank of one job.

`QtTrainingView` wraps a `console.models.training.TrainingModel`. Curves are created once per
rank slot and only `setData` is called afterwards (no clear()/plot() churn, pyqtgraph#2348).
Redraws are coalesced: a timer polls `model.version` and redraws only when it moved. Straggler
ranks (see `TrainingModel.straggler_ranks`) are drawn thick in the highlight color on top of the
others, and the note above the plots names them.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import pyqtgraph as pg
import shiboken6
from PySide6.QtCore import QThreadPool, QTimer, Signal
from PySide6.QtGui import QShowEvent
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from console.models.training import SERIES_NAMES, STRAGGLER_THRESHOLD, TrainHistory, TrainingModel
from console.ui.workers import SingleFlight, run_in_pool

HIGHLIGHT_COLOR: Final = "#ff4d4f"
_NORMAL_COLORS: Final[tuple[str, ...]] = (
    "#5b8ff9", "#5ad8a6", "#9a8bd6", "#6dc8ec", "#8fa3b8", "#74b07a", "#b39ddb", "#7fb3d5",
)
_TITLES: Final[dict[str, str]] = {
    "loss": "loss",
    "grad_norm": "grad norm",
    "step_time": "step time (s)",
    "throughput": "throughput (tokens/s)",
}
MAX_RANKS_DRAWN: Final = 64


def normal_color(rank: int) -> str:
    """Muted per-rank color, so the highlight color stays unambiguous."""
    return _NORMAL_COLORS[rank % len(_NORMAL_COLORS)]


class QtTrainingView(QWidget):
    """Per-job training curves over a TrainingModel.

    Signals: `jobSelected(str)` when the shown job changes; `historyLoaded(str)` when the store's
    history of a job was merged into the model; `stragglersChanged(object)` with the new list of
    straggler ranks of the shown job.
    """

    jobSelected = Signal(str)
    historyLoaded = Signal(str)
    stragglersChanged = Signal(object)

    def __init__(self, model: TrainingModel, parent: QWidget | None = None, *, refresh_ms: int = 500,
                 pool: QThreadPool | None = None, load_stored_jobs: bool = True,
                 max_ranks: int = MAX_RANKS_DRAWN) -> None:
        super().__init__(parent)
        self.model = model
        self._pool = pool
        self._history = SingleFlight(pool)
        self._max_ranks = max_ranks
        self._job: str | None = None
        self._history_requested: set[str] = set()
        self._drawn_version = -1
        self._jobs_shown: list[str] = []
        self._stragglers: list[int] = []
        self._slot_rank: list[int | None] = []  # slot -> rank drawn there

        self.job_combo = QComboBox()
        self.job_combo.setMinimumContentsLength(16)
        self.job_combo.currentTextChanged.connect(self._on_combo)
        self.info_label = QLabel("no training jobs yet")
        self.straggler_label = QLabel("")
        self.straggler_label.setStyleSheet(f"color: {HIGHLIGHT_COLOR}; font-weight: bold;")
        top = QHBoxLayout()
        top.addWidget(QLabel("Job"))
        top.addWidget(self.job_combo)
        top.addWidget(self.info_label, 1)
        top.addWidget(self.straggler_label)

        self.plots_widget = pg.GraphicsLayoutWidget()
        self.plots: dict[str, pg.PlotItem] = {}
        for i, name in enumerate(SERIES_NAMES):
            plot = self.plots_widget.addPlot(row=i // 2, col=i % 2, title=_TITLES[name])
            plot.showGrid(x=True, y=True, alpha=0.2)
            plot.setLabel("bottom", "step")
            plot.setClipToView(True)
            plot.setDownsampling(auto=True, mode="peak")
            self.plots[name] = plot
        first = self.plots[SERIES_NAMES[0]]
        for name in SERIES_NAMES[1:]:
            self.plots[name].setXLink(first)
        self._curves: dict[str, list[pg.PlotDataItem]] = {name: [] for name in SERIES_NAMES}

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addWidget(self.plots_widget, 1)

        self._timer = QTimer(self)
        self._timer.setInterval(refresh_ms)
        self._timer.timeout.connect(self._on_timer)
        self._timer.start()
        if load_stored_jobs:
            run_in_pool(model.fetch_jobs, self._on_jobs_fetched, pool=pool)
        self.refresh()

    # ---- public ----

    @property
    def job(self) -> str | None:
        """The job shown."""
        return self._job

    @property
    def stragglers(self) -> list[int]:
        """Straggler ranks of the shown job at the last redraw."""
        return list(self._stragglers)

    def select_job(self, job_id: str | None) -> None:
        """Show `job_id`, loading its stored history once per session on a worker."""
        if job_id == self._job:
            return
        self._job = job_id
        if job_id is not None and self.job_combo.currentText() != job_id:
            self._sync_combo(force=True)
            self.job_combo.setCurrentText(job_id)
        if job_id is not None and job_id not in self._history_requested:
            self._history_requested.add(job_id)
            self._history.submit(lambda: self.model.fetch_history(job_id), self._on_history)
        self.jobSelected.emit(job_id or "")
        self.refresh(force=True)

    def curves_for_rank(self, rank: int) -> dict[str, pg.PlotDataItem]:
        """The curve of each plot that draws `rank` of the shown job (empty if not drawn)."""
        if rank not in self._slot_rank:
            return {}
        slot = self._slot_rank.index(rank)
        return {name: self._curves[name][slot] for name in SERIES_NAMES}

    def refresh(self, force: bool = False) -> None:
        """Redraw now if the model changed since the last redraw (or always with `force`)."""
        version = self.model.version
        if not force and version == self._drawn_version:
            return
        self._drawn_version = version
        self._sync_combo()
        self._draw()

    # ---- internals ----

    def _on_timer(self) -> None:
        if self.isVisible() or self._drawn_version < 0:
            self.refresh()

    def _on_combo(self, text: str) -> None:
        if text:
            self.select_job(text)

    def _on_jobs_fetched(self, jobs: list[tuple[str, int]]) -> None:
        self.model.apply_jobs(jobs)
        if shiboken6.isValid(self) and self.isVisible():
            self.refresh()

    def _on_history(self, hist: TrainHistory) -> None:
        self.model.apply_history(hist)
        if not shiboken6.isValid(self):
            return
        if self.isVisible():
            # A hidden or closed panel does not draw; showEvent catches up.
            self.refresh()
        self.historyLoaded.emit(hist.job_id)

    def showEvent(self, event: QShowEvent) -> None:
        """Catch up with changes made while hidden."""
        super().showEvent(event)
        self.refresh()

    def _sync_combo(self, force: bool = False) -> None:
        jobs = self.model.jobs()
        if jobs == self._jobs_shown and not force:
            return
        if set(jobs) == set(self._jobs_shown) and not force:
            return  # only activity order changed: keep the list stable under the operator's cursor
        self._jobs_shown = jobs
        self.job_combo.blockSignals(True)
        self.job_combo.clear()
        self.job_combo.addItems(sorted(jobs))
        if self._job is not None:
            self.job_combo.setCurrentText(self._job)
        self.job_combo.blockSignals(False)
        if self._job is None and jobs:
            self.select_job(jobs[0])  # the most recently active job

    def _ensure_slots(self, n: int) -> None:
        while len(self._slot_rank) < n:
            for name in SERIES_NAMES:
                curve = pg.PlotDataItem(pen=pg.mkPen(normal_color(len(self._slot_rank)), width=1))
                self.plots[name].addItem(curve)
                self._curves[name].append(curve)
            self._slot_rank.append(None)

    def _draw(self) -> None:
        job = self._job
        model = self.model
        ranks = model.ranks(job) if job else []
        stragglers = model.straggler_ranks(job) if job else []
        straggler_set = set(stragglers)
        # Stragglers first, then the lowest ranks, up to the drawing budget.
        shown = (stragglers + [r for r in ranks if r not in straggler_set])[: self._max_ranks]
        shown.sort()
        self._ensure_slots(len(shown))
        for slot in range(len(self._slot_rank)):
            rank = shown[slot] if slot < len(shown) else None
            self._slot_rank[slot] = rank
            series = model.series(job, rank) if job is not None and rank is not None else None
            is_straggler = rank in straggler_set
            pen = pg.mkPen(HIGHLIGHT_COLOR, width=3) if is_straggler else pg.mkPen(
                normal_color(rank if rank is not None else slot), width=1)
            for name in SERIES_NAMES:
                curve = self._curves[name][slot]
                if series is None or series.step.size == 0:
                    curve.setData(np.empty(0), np.empty(0))  # slot unused: emptied, kept for reuse
                    continue
                curve.setPen(pen)
                curve.setZValue(10 if is_straggler else 0)
                curve.setData(series.step, series.get(name), connect="finite")
        self._update_labels(job, ranks, stragglers)
        if stragglers != self._stragglers:
            self._stragglers = stragglers
            self.stragglersChanged.emit(list(stragglers))

    def _update_labels(self, job: str | None, ranks: list[int], stragglers: list[int]) -> None:
        if job is None:
            self.info_label.setText("no training jobs yet")
            self.straggler_label.setText("")
            return
        world = max((info.world_size for r in ranks if (info := self.model.rank_info(job, r))), default=0)
        hosts = self.model.hosts(job)
        parts = [f"{len(ranks)} ranks" + (f" of {world}" if world else ""), f"{len(hosts)} hosts"]
        if len(ranks) > self._max_ranks:
            parts.append(f"drawing {self._max_ranks} (stragglers first)")
        if self.model.is_simulated(job):
            parts.append("SIMULATED")
        self.info_label.setText(" · ".join(parts))
        if stragglers:
            medians = self.model.rank_step_time_medians(job)
            job_median = float(np.median(list(medians.values()))) if medians else float("nan")
            names = ", ".join(str(r) for r in stragglers[:12]) + ("…" if len(stragglers) > 12 else "")
            self.straggler_label.setText(
                f"■ straggler ranks {names}: median step time > {STRAGGLER_THRESHOLD:.0%} above "
                f"job median ({job_median:.3g} s)"
            )
            self.straggler_label.setToolTip(
                "\n".join(f"rank {r}: {medians.get(r, float('nan')):.3g} s/step" for r in stragglers)
            )
        else:
            self.straggler_label.setText("")
            self.straggler_label.setToolTip("")
