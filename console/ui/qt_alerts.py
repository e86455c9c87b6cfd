"""Alerts table and live events log.

`QtAlertsPanel` wraps an `AlertsModel`: the store is queried on a worker every `refresh_ms` (and
on demand), never on the GUI thread. `QtEventsLog` wraps an `EventsLogModel` fed live by the
ingest bridge. Both tables are `QAbstractTableModel`s over plain row lists, so a redraw is a
model reset and Qt only asks for the visible cells.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any, Final

import shiboken6
from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt, QThreadPool, QTimer, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from console.models.alerts import AlertRow, AlertsModel, EventRow, EventsLogModel
from console.ui.workers import SingleFlight
from protos.types import SEVERITY_CRITICAL, SEVERITY_NAMES, SEVERITY_WARNING

SEVERITY_COLORS: Final[dict[int, str]] = {SEVERITY_CRITICAL: "#ff4d4f", SEVERITY_WARNING: "#faad14"}
ALL_STATES: Final = "all"

_Index = QModelIndex | QPersistentModelIndex


def format_ns(ts_ns: int | None) -> str:
    """Local wall time of a unix-ns timestamp, as operators read it ('' for none)."""
    if not ts_ns:
        return ""
    return dt.datetime.fromtimestamp(ts_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


class RowsTableModel(QAbstractTableModel):
    """Read-only table over a list of rows; `cell(row, col)` gives text, `color(row)` a foreground."""

    def __init__(self, headers: Sequence[str], cell: Callable[[Any, int], str],
                 color: Callable[[Any], str | None] | None = None) -> None:
        super().__init__()
        self._headers = list(headers)
        self._cell = cell
        self._color = color
        self._rows: list[Any] = []

    def set_rows(self, rows: list[Any]) -> None:
        """Replace every row (one reset; views keep their column sizes)."""
        self.beginResetModel()
        self._rows = rows
        self.endResetModel()

    def row(self, i: int) -> Any:
        """The object behind table row `i`."""
        return self._rows[i]

    def rowCount(self, parent: _Index = QModelIndex()) -> int:  # noqa: B008 - Qt override
        return 0 if parent.isValid() else len(self._rows)

    def columnCount(self, parent: _Index = QModelIndex()) -> int:  # noqa: B008 - Qt override
        return 0 if parent.isValid() else len(self._headers)

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or index.row() >= len(self._rows):
            return None
        row = self._rows[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            return self._cell(row, index.column())
        if role == Qt.ItemDataRole.ForegroundRole and self._color is not None:
            color = self._color(row)
            return QColor(color) if color else None
        return None

    def headerData(self, section: int, orientation: Qt.Orientation,
                   role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return self._headers[section]
        return None


def make_table(model: RowsTableModel) -> QTableView:
    """A compact read-only table view over `model`."""
    view = QTableView()
    view.setModel(model)
    view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    view.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    view.verticalHeader().setVisible(False)
    view.horizontalHeader().setStretchLastSection(True)
    view.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
    view.setWordWrap(False)
    fitted = [False]

    def fit_once() -> None:
        # Size columns to the first real rows only: re-measuring every refresh would scan all rows.
        if not fitted[0] and model.rowCount() > 0:
            fitted[0] = True
            view.resizeColumnsToContents()

    model.modelReset.connect(fit_once)
    return view


def _severity_color(row: AlertRow | EventRow) -> str | None:
    return SEVERITY_COLORS.get(row.severity)


ALERT_HEADERS: Final = ("detected", "state", "severity", "kind", "host", "gpu", "job", "rank", "data", "evidence")


def _alert_cell(row: AlertRow, col: int) -> str:
    values = (
        format_ns(row.detected_ns), row.state, row.severity_name, row.kind, row.host or "",
        "" if row.gpu_index is None else str(row.gpu_index), row.job_id or "",
        "" if row.rank is None else str(row.rank), row.data_label, row.evidence,
    )
    return values[col]


EVENT_HEADERS: Final = ("time", "host", "severity", "kind", "gpu", "pid", "detail")


def event_cell(row: EventRow, col: int) -> str:
    """Text of one events-table cell (shared with the host drilldown)."""
    values = (
        format_ns(row.ts_ns), row.host, row.severity_name, row.kind,
        "" if row.gpu_index < 0 else str(row.gpu_index), str(row.pid) if row.pid else "", row.detail,
    )
    return values[col]


def event_color(row: EventRow) -> str | None:
    """Foreground color for an event row by severity."""
    return _severity_color(row)


class QtAlertsPanel(QWidget):
    """Alerts from the store with a state filter; refreshed on a worker every `refresh_ms`.

    Signals: `refreshed(int)` with the number of rows shown after each applied refresh;
    `alertActivated(object)` with the AlertRow the operator double-clicked.
    """

    refreshed = Signal(int)
    alertActivated = Signal(object)

    def __init__(self, model: AlertsModel, parent: QWidget | None = None, *, refresh_ms: int = 5000,
                 pool: QThreadPool | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self._flight = SingleFlight(pool)
        self._drawn_version = -1

        self.state_combo = QComboBox()
        self.state_combo.currentTextChanged.connect(self._on_state)
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.clicked.connect(self.request_refresh)
        self.count_label = QLabel("")
        top = QHBoxLayout()
        top.addWidget(QLabel("State"))
        top.addWidget(self.state_combo)
        top.addWidget(self.count_label, 1)
        self.ack_button = QPushButton("Acknowledge")
        self.resolve_button = QPushButton("Resolve")
        for button, state in ((self.ack_button, "acknowledged"), (self.resolve_button, "resolved")):
            button.setEnabled(model.change_state is not None)
            button.clicked.connect(lambda _=False, st=state: self.set_selected_state(st))
            top.addWidget(button)
        top.addWidget(self.refresh_button)

        self.table_model = RowsTableModel(ALERT_HEADERS, _alert_cell, _severity_color)
        self.table = make_table(self.table_model)
        self.table.doubleClicked.connect(lambda idx: self.alertActivated.emit(self.table_model.row(idx.row())))

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addWidget(self.table, 1)
        self._sync_states()

        self._timer = QTimer(self)
        self._timer.setInterval(refresh_ms)
        self._timer.timeout.connect(self.request_refresh)
        self._timer.start()
        self.request_refresh()

    def request_refresh(self) -> None:
        """Query the store on a worker; the table updates when the answer arrives."""
        state = self.model.state_filter
        self._flight.submit(lambda: (state, self.model.fetch(state)), self._on_fetched)

    def set_selected_state(self, state: str) -> None:
        """Acknowledge or resolve the selected alerts (stored, told to detection, audited) on a worker."""
        change = self.model.change_state
        if change is None:
            return
        ids = sorted({self.table_model.row(i.row()).alert_id for i in self.table.selectionModel().selectedRows()})
        if not ids:
            return

        def work() -> None:
            for alert_id in ids:
                change(alert_id, state)

        self._flight.submit(work, lambda _r: self.request_refresh())

    def set_state_filter(self, state: str | None) -> None:
        """Show only alerts in `state` (None = all) and refresh."""
        self.state_combo.setCurrentText(state or ALL_STATES)

    def redraw(self) -> None:
        """Update the table from the model if it changed."""
        if self.model.version == self._drawn_version:
            return
        self._drawn_version = self.model.version
        rows = self.model.rows()
        self.table_model.set_rows(rows)
        self._sync_states()
        flt = self.model.state_filter
        self.count_label.setText(f"{len(rows)} alerts" + (f" ({flt})" if flt else ""))

    def _on_state(self, text: str) -> None:
        state = None if text in ("", ALL_STATES) else text
        if state != self.model.state_filter:
            self.model.set_state_filter(state)
            self.redraw()  # immediate, from the rows held
            self.request_refresh()

    def _on_fetched(self, result: tuple[str | None, list[AlertRow]]) -> None:
        state, rows = result
        if state != self.model.state_filter:
            return  # the filter changed while querying; a newer request is queued
        self.model.apply(rows)
        if shiboken6.isValid(self):
            self.redraw()
            self.refreshed.emit(len(self.model.rows()))

    def _sync_states(self) -> None:
        wanted = [ALL_STATES, *self.model.states()]
        current = [self.state_combo.itemText(i) for i in range(self.state_combo.count())]
        if wanted == current:
            return
        self.state_combo.blockSignals(True)
        self.state_combo.clear()
        self.state_combo.addItems(wanted)
        self.state_combo.setCurrentText(self.model.state_filter or ALL_STATES)
        self.state_combo.blockSignals(False)


class QtEventsLog(QWidget):
    """Live agent events, newest first, colored by severity, with a minimum-severity filter."""

    def __init__(self, model: EventsLogModel, parent: QWidget | None = None, *, refresh_ms: int = 500) -> None:
        super().__init__(parent)
        self.model = model
        self._drawn_version = -1

        self.severity_combo = QComboBox()
        for level in sorted(SEVERITY_NAMES):
            self.severity_combo.addItem("all" if level == 0 else f"≥ {SEVERITY_NAMES[level]}", level)
        self.severity_combo.currentIndexChanged.connect(self._on_severity)
        self.count_label = QLabel("")
        top = QHBoxLayout()
        top.addWidget(QLabel("Severity"))
        top.addWidget(self.severity_combo)
        top.addWidget(self.count_label, 1)

        self.table_model = RowsTableModel(EVENT_HEADERS, event_cell, event_color)
        self.table = make_table(self.table_model)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addWidget(self.table, 1)

        self._timer = QTimer(self)
        self._timer.setInterval(refresh_ms)
        self._timer.timeout.connect(self.redraw)
        self._timer.start()
        self.redraw()

    def redraw(self) -> None:
        """Update the table from the model if it changed."""
        if self.model.version == self._drawn_version:
            return
        self._drawn_version = self.model.version
        rows = self.model.rows()
        self.table_model.set_rows(rows)
        self.count_label.setText(f"{len(rows)} events (newest first, last {self.model.max_rows} kept)")

    def _on_severity(self, index: int) -> None:
        self.model.set_min_severity(int(self.severity_combo.itemData(index) or 0))
        self.redraw()
