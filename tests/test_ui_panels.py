"""Qt panels offscreen: straggler highlight, drilldown history on a worker then live, alerts, replay bar."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
from PySide6.QtCore import QThreadPool

from console.models.alerts import AlertsModel, EventsLogModel
from console.models.host import HostDrilldownModel
from console.models.replay import ReplaySource
from console.models.training import TrainingModel
from console.ui.qt_alerts import ALERT_HEADERS, QtAlertsPanel, QtEventsLog
from console.ui.qt_host import QtHostDrilldown
from console.ui.qt_replay import QtReplayBar
from console.ui.qt_training import HIGHLIGHT_COLOR, QtTrainingView
from console.ui.workers import SingleFlight, run_in_pool
from protos.types import METRIC_NAMES, N_METRICS, Event, Frame, GpuProcess, TrainRecord

T0 = 1_767_225_600 * 10**9
S = 10**9

DDL = f"""
CREATE TABLE gpu_samples (host VARCHAR, epoch VARCHAR, seq BIGINT, ts TIMESTAMPTZ, gpu_index SMALLINT,
    gpu_state VARCHAR, simulated BOOLEAN, {", ".join(f"{m} REAL" for m in METRIC_NAMES)});
CREATE TABLE train_samples (host VARCHAR, epoch VARCHAR, seq BIGINT, ts TIMESTAMPTZ, job_id VARCHAR, rank INTEGER,
    local_rank INTEGER, world_size INTEGER, pid BIGINT, uid BIGINT, step BIGINT, kind VARCHAR, loss DOUBLE,
    grad_norm DOUBLE, lr DOUBLE, tokens DOUBLE, extra MAP(VARCHAR, DOUBLE), info VARCHAR, simulated BOOLEAN);
CREATE TABLE events (host VARCHAR, epoch VARCHAR, seq BIGINT, ts TIMESTAMPTZ, kind VARCHAR, severity VARCHAR,
    gpu_index SMALLINT, pid BIGINT, detail VARCHAR, attrs VARCHAR, simulated BOOLEAN);
CREATE TABLE alerts (alert_id VARCHAR, kind VARCHAR, severity VARCHAR, state VARCHAR, host VARCHAR,
    gpu_index SMALLINT, job_id VARCHAR, rank INTEGER, onset_ts TIMESTAMPTZ, detected_ts TIMESTAMPTZ,
    evidence VARCHAR, dedup_key VARCHAR, updated_at TIMESTAMPTZ);
"""

Query = Callable[[str, list[object]], list[tuple[Any, ...]]]


def build_db(path: Path, seconds: int = 30) -> Path:
    """Host h1: 2 GPUs at 1 Hz for `seconds`; job-a ranks 0..3 one step/s (rank 3 at 1.5 s/step);
    one event; three alerts."""
    con = duckdb.connect(str(path))
    con.execute(DDL)
    cols = ", ".join("?" for _ in METRIC_NAMES)
    rows = [["h1", "e1", s + 1, (T0 + s * S) // 1000, g, "ok", True, *([float(s * 10 + g)] * len(METRIC_NAMES))]
            for s in range(seconds) for g in range(2)]
    con.executemany(f"INSERT INTO gpu_samples VALUES (?, ?, ?, make_timestamptz(?::BIGINT), ?, ?, ?, {cols})", rows)
    train = []
    for r in range(4):
        dt = 1.5 if r == 3 else 1.0
        for step in range(int(seconds / dt)):
            train.append(("h1", step + 1, (T0 + int(step * dt * S)) // 1000, "job-a", r, r, 4, step, 2.0, 1000.0))
    con.executemany(
        "INSERT INTO train_samples VALUES (?, 'e1', ?, make_timestamptz(?::BIGINT), ?, ?, ?, ?, 1, 1, ?, 'log', ?, "
        "0.5, 1e-4, ?, MAP {}, NULL, true)",
        train,
    )
    con.execute("INSERT INTO events VALUES ('h1', 'e1', 3, make_timestamptz(?::BIGINT), 'xid', 'critical', 0, 0, "
                "'XID 48', '{}', true)", [(T0 + 2 * S) // 1000])
    for aid, state, sev, s in (("a1", "open", "critical", 5), ("a2", "resolved", "warning", 6),
                               ("a3", "acknowledged", "info", 7)):
        ts = (T0 + s * S) // 1000
        con.execute("INSERT INTO alerts VALUES (?, 'straggler', ?, ?, 'h1', 0, 'job-a', 3, "
                    "make_timestamptz(?::BIGINT), make_timestamptz(?::BIGINT), 'rank 3 slow', ?, "
                    "make_timestamptz(?::BIGINT))",
                    [aid, sev, state, ts, ts, aid, ts])
    con.close()
    return path


@pytest.fixture(autouse=True)
def _drain_pool() -> Iterator[None]:
    yield
    assert QThreadPool.globalInstance().waitForDone(5000)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[Path, Query, list[bool]]]:
    """A temp store file and a read-only query that records whether it ran off the GUI thread."""
    path = build_db(tmp_path / "store.duckdb")
    con = duckdb.connect(str(path), read_only=True)
    off_gui: list[bool] = []
    lock = threading.Lock()

    def query(sql: str, params: list[object]) -> list[tuple[Any, ...]]:
        off_gui.append(threading.current_thread() is not threading.main_thread())
        with lock:
            cur = con.cursor()
        return cur.execute(sql, params).fetchall()

    yield path, query, off_gui
    QThreadPool.globalInstance().waitForDone(5000)
    con.close()


def train_frame(records: list[TrainRecord], host: str = "h1") -> Frame:
    return Frame(host, "e1", 1, max(r.ts_unix_ns for r in records), True, np.zeros((0, N_METRICS), np.float32),
                 [], [], train=records)


def gpu_frame(second: int, host: str = "h1", events: list[Event] | None = None,
              processes: list[GpuProcess] | None = None) -> Frame:
    values = np.zeros((2, N_METRICS), np.float32)
    values[:, :] = [[second * 10.0], [second * 10.0 + 1]]
    return Frame(host, "e1", second + 1, T0 + second * S, False, values, [0, 1], [1, 1],
                 processes or [], [], events or [])


def _data(curve: Any) -> tuple[Any, Any]:
    """All data of a curve (getData() is clipped to the current view range)."""
    return curve.xData, curve.yData


# ---- workers ----


def test_run_in_pool_delivers_on_gui_thread(qtbot: Any) -> None:
    ran_on: list[bool] = []
    got: list[tuple[object, bool]] = []

    def work() -> int:
        ran_on.append(threading.current_thread() is threading.main_thread())
        return 42

    task = run_in_pool(work, lambda r: got.append((r, threading.current_thread() is threading.main_thread())))
    with qtbot.waitSignal(task.done, timeout=5000):
        pass
    assert ran_on == [False] and got == [(42, True)]

    errors: list[BaseException] = []
    task = run_in_pool(lambda: 1 / 0, None, errors.append)
    qtbot.waitUntil(lambda: task.finished, timeout=5000)
    assert isinstance(errors[0], ZeroDivisionError)


def test_single_flight_runs_only_newest_queued(qtbot: Any) -> None:
    gate = threading.Event()
    flight = SingleFlight()
    results: list[int] = []
    flight.submit(lambda: gate.wait(5) and 1, results.append)
    flight.submit(lambda: 2, results.append)
    flight.submit(lambda: 3, results.append)  # replaces 2
    assert flight.busy
    gate.set()
    qtbot.waitUntil(lambda: not flight.busy and len(results) == 2, timeout=5000)
    assert results == [1, 3]


# ---- training ----


def test_training_view_highlights_straggler(qtbot: Any) -> None:
    model = TrainingModel()
    for step in range(30):
        model.on_frame(train_frame([
            TrainRecord(T0 + int(step * (1.5 if r == 2 else 1.0) * S), "job-a", r, r, 4, 10 + r, 1, step,
                        loss=2.0 - step / 100, grad_norm=0.3, tokens=2048.0)
            for r in range(4)
        ]))
    view = QtTrainingView(model, load_stored_jobs=False)
    qtbot.addWidget(view)
    view.show()
    view.refresh(force=True)
    assert view.job == "job-a" and view.job_combo.currentText() == "job-a"
    assert view.stragglers == [2]
    slow = view.curves_for_rank(2)
    fast = view.curves_for_rank(0)
    assert set(slow) == {"loss", "grad_norm", "step_time", "throughput"}
    for name in slow:
        assert slow[name].opts["pen"].color().name() == HIGHLIGHT_COLOR
        assert fast[name].opts["pen"].color().name() != HIGHLIGHT_COLOR
        assert slow[name].zValue() > fast[name].zValue()
    x, y = _data(slow["step_time"])
    assert x is not None and y is not None and x.size == 30 and np.nanmedian(y) == pytest.approx(1.5)
    assert "2" in view.straggler_label.text() and "20%" in view.straggler_label.text()
    assert view.straggler_label.isVisibleTo(view)

    # The straggler recovers: after 50 fast steps the highlight goes away.
    with qtbot.waitSignal(view.stragglersChanged, timeout=3000) as blocker:
        for step in range(30, 90):
            model.on_frame(train_frame([
                TrainRecord(T0 + 100 * S + step * S, "job-a", r, r, 4, 10 + r, 1, step, loss=1.0, tokens=2048.0)
                for r in range(4)
            ]))
    assert blocker.args == [[]]
    assert view.curves_for_rank(2)["loss"].opts["pen"].color().name() != HIGHLIGHT_COLOR
    assert view.straggler_label.text() == ""


def test_training_view_loads_jobs_and_history_on_worker(qtbot: Any, db: tuple[Path, Query, list[bool]]) -> None:
    _, query, off_gui = db
    model = TrainingModel(query)
    view = QtTrainingView(model)
    qtbot.addWidget(view)
    view.show()
    with qtbot.waitSignal(view.historyLoaded, timeout=5000) as blocker:
        pass  # jobs are fetched on a worker, the newest is selected, then its history loads
    assert blocker.args == ["job-a"]
    assert off_gui and all(off_gui)
    assert model.ranks("job-a") == [0, 1, 2, 3]
    assert view.stragglers == [3]
    assert view.curves_for_rank(3)["step_time"].opts["pen"].color().name() == HIGHLIGHT_COLOR
    x, _ = view.curves_for_rank(0)["loss"].getData()
    assert x is not None and x.size == 30


# ---- host drilldown ----


def test_drilldown_loads_history_on_worker_then_appends_live(qtbot: Any, db: tuple[Path, Query, list[bool]]) -> None:
    _, query, off_gui = db
    model = HostDrilldownModel(query, window_s=3600)
    view = QtHostDrilldown(model)
    qtbot.addWidget(view)
    view.show()
    with qtbot.waitSignal(view.historyLoaded, timeout=5000) as blocker:
        view.set_host("h1")
        assert not model.history_loaded  # the query did not run on the GUI thread
    assert blocker.args == ["h1"]
    assert off_gui and all(off_gui)
    curve = view.curve(1, "temp_c")
    assert curve is not None
    x, y = _data(curve)
    assert x is not None and y is not None and x.size == 30 and y[-1] == 291.0
    assert view.events_model.rowCount() == 1 and "XID 48" in view.events_model.data(view.events_model.index(0, 6))
    assert "history loaded" in view.status.text()

    procs = [GpuProcess(0, 4242, 1024.0), GpuProcess(1, 4343, 2048.0)]
    model.on_frame(gpu_frame(30, processes=procs))
    model.on_frame(gpu_frame(31, events=[Event(T0 + 31 * S, "proc_start", 1, 1, 4343, "python train.py")],
                             processes=procs))
    model.on_frame(gpu_frame(31, host="h2"))  # not the selected host
    view.refresh()
    x, y = _data(curve)
    assert x is not None and y is not None and x.size == 32 and y[-1] == 311.0
    assert x[-1] == (T0 + 31 * S) / 1e9
    assert view.processes_model.rowCount() == 2
    assert view.processes_model.data(view.processes_model.index(1, 1)) == "4343"
    assert view.events_model.rowCount() == 2
    assert view.events_model.data(view.events_model.index(0, 3)) == "proc_start"

    view.set_host("h2")
    view.refresh(force=True)
    assert view.curve(1, "temp_c") is curve  # reused, emptied
    x, _ = _data(curve)
    assert x is None or x.size == 0
    assert "GPU 1" not in view.gpu_key.text()


def test_drilldown_history_can_end_at_replay_time(qtbot: Any, db: tuple[Path, Query, list[bool]]) -> None:
    _, query, _ = db
    model = HostDrilldownModel(query, window_s=5)
    view = QtHostDrilldown(model, history_end=lambda: T0 + 10 * S)
    qtbot.addWidget(view)
    view.show()
    with qtbot.waitSignal(view.historyLoaded, timeout=5000):
        view.set_host("h1")
    t, _ = model.series(0)
    assert t.tolist() == [(T0 + s * S) / 1e9 for s in range(6, 11)]


# ---- alerts and events ----


def test_alerts_panel_refreshes_on_worker_and_filters(qtbot: Any, db: tuple[Path, Query, list[bool]]) -> None:
    _, query, off_gui = db
    model = AlertsModel(query)
    panel = QtAlertsPanel(model, refresh_ms=60_000)
    qtbot.addWidget(panel)
    qtbot.waitUntil(lambda: panel.table_model.rowCount() == 3, timeout=5000)
    assert off_gui and all(off_gui)
    assert [panel.table_model.row(i).alert_id for i in range(3)] == ["a3", "a2", "a1"]
    assert panel.table_model.data(panel.table_model.index(2, 1)) == "open"
    assert panel.table_model.data(panel.table_model.index(2, 2)) == "critical"
    # this table predates alerts.simulated (schema 1): the data column says "not recorded"
    assert panel.table_model.data(panel.table_model.index(2, ALERT_HEADERS.index("data"))) == "-"
    assert [panel.state_combo.itemText(i) for i in range(panel.state_combo.count())] == [
        "all", "open", "acknowledged", "resolved"]
    with qtbot.waitSignal(panel.refreshed, timeout=5000) as blocker:
        panel.set_state_filter("open")
        assert panel.table_model.rowCount() == 1  # filtered at once, before the refetch returns
    assert blocker.args == [1]
    assert panel.table_model.row(0).alert_id == "a1"
    assert "1 alerts (open)" in panel.count_label.text()


def test_events_log_view(qtbot: Any) -> None:
    model = EventsLogModel(max_rows=100)
    view = QtEventsLog(model)
    qtbot.addWidget(view)
    model.on_frame(gpu_frame(1, events=[Event(T0 + S, "xid", 3, 0, 0, "XID 79"),
                                        Event(T0 + S + 1, "proc_start", 1, 1, 99, "python")]))
    view.redraw()
    assert view.table_model.rowCount() == 2
    assert view.table_model.data(view.table_model.index(0, 3)) == "proc_start"
    view.severity_combo.setCurrentIndex(3)  # ≥ critical
    assert view.table_model.rowCount() == 1
    assert view.table_model.data(view.table_model.index(0, 6)) == "XID 79"


# ---- replay ----


def test_replay_bar_slider_produces_frames_at_that_time(qtbot: Any, tmp_path: Path) -> None:
    path = build_db(tmp_path / "audit.duckdb", seconds=10)
    src = ReplaySource(path)
    training = TrainingModel()
    log = EventsLogModel()
    bar = QtReplayBar(src, [training, log], tick_ms=20)
    qtbot.addWidget(bar)
    assert bar.slider.maximum() == 9

    with qtbot.waitSignal(bar.framesReady, timeout=5000) as blocker:
        bar.slider.setValue(5)
    (frame,) = blocker.args[0]
    assert bar.position_ns == T0 + 5 * S
    assert frame.host == "h1" and frame.ts_unix_ns == T0 + 5 * S and frame.simulated
    assert frame.gpu_values[1, 0] == 51.0
    # Records in (4 s, 5 s]: step 5 of ranks 0..2, and step 3 of rank 3 (1.5 s/step, at 4.5 s).
    assert sorted((r.rank, r.step) for r in frame.train) == [(0, 5), (1, 5), (2, 5), (3, 3)]
    s = training.series("job-a", 0)
    assert s is not None and s.step.tolist() == [5]

    # Play at 600x to the end: every later record arrives once, in order.
    bar.speed_combo.setCurrentIndex(bar.speed_combo.count() - 1)
    with qtbot.waitSignal(bar.playingChanged, timeout=5000, check_params_cb=lambda p: p is False):
        bar.play()
    qtbot.waitUntil(lambda: not bar.busy, timeout=5000)
    s = training.series("job-a", 0)
    assert s is not None and s.step.tolist() == [5, 6, 7, 8, 9]
    assert bar.slider.value() == 9 and src.at_end

    # Seeking back clears the consumers, then delivers the frames there.
    with qtbot.waitSignal(bar.framesReady, timeout=5000):
        bar.slider.setValue(2)
    s = training.series("job-a", 0)
    assert s is not None and s.step.tolist() == [2]
    assert [r.detail for r in log.rows()] == ["XID 48"]  # event at t=2 s
    src.close()
