"""Response panel: freeze, resume and rollback one job, with the second operator's approval.

`QtResponsePanel` draws a `console.models.respond.ResponseModel`. Every gRPC and DuckDB call
(signing, dispatch, checkpoint listing, ControlState, the pending_commands table) runs on a
worker through `run_in_pool`; the GUI thread only drains the model's progress queue on a timer,
so the per-host confirmation table fills in while receipts arrive and countdowns keep ticking.
Operator identities are files (certificate + key): the panel asks for them with file dialogs,
or through an injected `choose_operator_files(purpose)` (tests, smart-card helpers).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Final

import shiboken6
from PySide6.QtCore import Qt, QThreadPool, QTimer, Signal
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from console.models.respond import AMBER, GREEN, GREY, RED, FrozenFetch, IssueOutcome, ResponseModel
from console.models.training import TrainingModel
from console.respond.approvals import PendingRequest
from console.respond.commands import CheckpointReport, Operator
from console.ui.workers import SingleFlight, run_in_pool
from protos.types import ACTION_FREEZE, ACTION_RESUME, ACTION_ROLLBACK

COLORS: Final[dict[str, str]] = {GREEN: "#b7e1b0", RED: "#f4a6a6", AMBER: "#ffd591", GREY: "#d9d9d9"}
ALERT_STYLE: Final = "QLabel { background: #ff4d4f; color: white; font-weight: bold; padding: 3px; }"
FROZEN_STYLE: Final = "QLabel { background: #1f6feb; color: white; font-weight: bold; padding: 3px; }"
FROZEN_WARN_STYLE: Final = "QLabel { background: #ff4d4f; color: white; font-weight: bold; padding: 3px; }"
PENDING_REFRESH_TICKS: Final = 20

# (purpose) -> (certificate path, key path), or None when the operator cancelled.
ChooseFiles = Callable[[str], "tuple[str, str] | None"]


def _hms(ns: int) -> str:
    if ns <= 0:
        return "-"
    return dt.datetime.fromtimestamp(ns / 1e9).strftime("%H:%M:%S.%f")[:-3]


def _item(text: str, color: str | None = None) -> QTableWidgetItem:
    it = QTableWidgetItem(text)
    it.setFlags(Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemIsEnabled)
    if color:
        it.setBackground(QBrush(QColor(COLORS.get(color, color))))
        it.setForeground(QBrush(QColor("black")))
    return it


def _table(headers: list[str]) -> QTableWidget:
    t = QTableWidget(0, len(headers))
    t.setHorizontalHeaderLabels(headers)
    t.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    t.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    t.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    t.verticalHeader().setVisible(False)
    t.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    t.horizontalHeader().setStretchLastSection(True)
    return t


class QtResponsePanel(QWidget):
    """Freeze / Resume / Rollback of the selected job, pending approvals, per-host confirmations.

    Signals: `outcomeReady(object)` with each IssueOutcome (after the tables were updated);
    `failed(str)` when a press ended in an error before anything was sent.
    """

    outcomeReady = Signal(object)
    failed = Signal(str)

    def __init__(self, model: ResponseModel, parent: QWidget | None = None, *,
                 training: TrainingModel | None = None, pool: QThreadPool | None = None,
                 refresh_ms: int = 250, choose_operator_files: ChooseFiles | None = None,
                 load_pending: bool = True) -> None:
        super().__init__(parent)
        self.model = model
        self.training = training
        self._pool = pool
        self.choose_operator_files: ChooseFiles = choose_operator_files or self._dialog_files
        self._job: str | None = None
        self._drawn_version = -1
        self._ticks = 0
        self._pending_shown: list[PendingRequest] = []
        self._checkpoint_digests: list[str] = []
        self._hosts_waiting = False
        self._pending_flight = SingleFlight(pool)
        self._ckpt_flight = SingleFlight(pool)
        self._frozen_flight = SingleFlight(pool)

        # -- top: job, operator, reason
        self.job_combo = QComboBox()
        self.job_combo.setMinimumContentsLength(16)
        self.job_combo.currentTextChanged.connect(self._on_combo)
        self.operator_label = QLabel("operator: none loaded")
        self.load_operator_button = QPushButton("Load operator…")
        self.load_operator_button.clicked.connect(self._on_load_operator)
        top = QHBoxLayout()
        top.addWidget(QLabel("Job"))
        top.addWidget(self.job_combo, 1)
        top.addWidget(self.operator_label)
        top.addWidget(self.load_operator_button)
        self.reason_edit = QLineEdit()
        self.reason_edit.setPlaceholderText("reason (recorded in the command, the receipts and the audit trail)")
        reason = QHBoxLayout()
        reason.addWidget(QLabel("Reason"))
        reason.addWidget(self.reason_edit, 1)

        # -- actions
        self.freeze_button = QPushButton("Freeze")
        self.resume_button = QPushButton("Resume")
        self.rollback_button = QPushButton("Rollback to selected checkpoint")
        self.break_glass_check = QCheckBox("break-glass (two admins)")
        self.refresh_button = QPushButton("Refresh (verify checkpoints deeply)")
        self.freeze_button.clicked.connect(lambda: self.start(ACTION_FREEZE))
        self.resume_button.clicked.connect(lambda: self.start(ACTION_RESUME))
        self.rollback_button.clicked.connect(lambda: self.start(ACTION_ROLLBACK))
        self.refresh_button.clicked.connect(lambda: self.refresh_remote(deep=True))
        actions = QHBoxLayout()
        for w in (self.freeze_button, self.resume_button, self.rollback_button, self.break_glass_check):
            actions.addWidget(w)
        actions.addStretch(1)
        actions.addWidget(self.refresh_button)

        # -- status lines
        self.frozen_label = QLabel("")
        self.frozen_label.setVisible(False)
        self.alert_label = QLabel("")
        self.alert_label.setStyleSheet(ALERT_STYLE)
        self.alert_label.setWordWrap(True)
        self.alert_label.setVisible(False)
        self.summary_label = QLabel("")
        self.summary_label.setWordWrap(True)
        self.message_label = QLabel("")
        self.message_label.setWordWrap(True)
        self.message_label.setStyleSheet("color: #cf1322;")

        # -- tables
        self.host_table = _table(["Host", "State", "Method", "Executed at", "Detail"])
        self.checkpoint_table = _table(["Step", "Verification", "Digest", "Run"])
        self.checkpoint_table.itemSelectionChanged.connect(self._update_buttons)
        self.pending_table = _table(["Action", "Job", "Requested by", "Signed", "Expires in", "Reason", "Command"])
        self.pending_table.itemSelectionChanged.connect(self._update_buttons)
        self.cosign_button = QPushButton("Review and co-sign…")
        self.cosign_button.clicked.connect(self._on_cosign)
        self.cancel_button = QPushButton("Withdraw")
        self.cancel_button.clicked.connect(self._on_cancel)

        conf = QGroupBox("Confirmations")
        cl = QVBoxLayout(conf)
        cl.addWidget(self.summary_label)
        cl.addWidget(self.host_table)
        ckpt = QGroupBox("Checkpoints on every host of the job (a rollback re-verifies every file first)")
        kl = QVBoxLayout(ckpt)
        kl.addWidget(self.checkpoint_table)
        pend = QGroupBox("Pending approvals")
        pl = QVBoxLayout(pend)
        pl.addWidget(self.pending_table)
        pb = QHBoxLayout()
        pb.addStretch(1)
        pb.addWidget(self.cancel_button)
        pb.addWidget(self.cosign_button)
        pl.addLayout(pb)
        split = QSplitter(Qt.Orientation.Vertical)
        for g in (conf, pend, ckpt):
            split.addWidget(g)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addLayout(reason)
        layout.addLayout(actions)
        layout.addWidget(self.frozen_label)
        layout.addWidget(self.alert_label)
        layout.addWidget(self.message_label)
        layout.addWidget(split, 1)

        self._timer = QTimer(self)
        self._timer.setInterval(refresh_ms)
        self._timer.timeout.connect(self._on_timer)
        self._timer.start()
        if load_pending:
            self.refresh_pending()
        self._sync_jobs()
        self.redraw(force=True)

    # ---------------------------------------------------------------- public

    @property
    def job(self) -> str | None:
        """The job acted on."""
        return self._job

    def set_jobs(self, jobs: list[str]) -> None:
        """Replace the job list (without a TrainingModel); keeps the selection."""
        self.job_combo.blockSignals(True)
        self.job_combo.clear()
        self.job_combo.addItems(sorted(jobs))
        if self._job is not None:
            self.job_combo.setCurrentText(self._job)
        self.job_combo.blockSignals(False)
        if self._job is None and jobs:
            self.select_job(sorted(jobs)[0])

    def select_job(self, job: str | None) -> None:
        """Act on `job` (e.g. connected to QtTrainingView.jobSelected); refreshes its remote state."""
        job = job or None
        if job == self._job:
            return
        self._job = job
        if job is not None and self.job_combo.findText(job) < 0:
            self.job_combo.addItem(job)
        if job is not None and self.job_combo.currentText() != job:
            self.job_combo.blockSignals(True)
            self.job_combo.setCurrentText(job)
            self.job_combo.blockSignals(False)
        self.refresh_remote()
        self.redraw(force=True)

    def load_operator_files(self, cert: str, key: str) -> None:
        """Load the operator who signs this console's commands (on a worker)."""
        run_in_pool(lambda: self.model.load_operator(cert, key), self._on_operator_loaded, self._on_error,
                    pool=self._pool)

    def start(self, action: str) -> None:
        """Build, sign and send (or queue for approval) `action` on the selected job."""
        job, op = self._job, self.model.operator
        if job is None:
            self._message("select a job first")
            return
        if op is None:
            self._message("load an operator identity first (Load operator…)")
            return
        digest = ""
        if action == ACTION_ROLLBACK:
            digest = self.selected_checkpoint() or ""
            if not digest:
                self._message("select a checkpoint to roll back to")
                return
        reason = self.reason_edit.text().strip() or f"{action} from the gpusoc console by {op.label}"
        break_glass = action == ACTION_ROLLBACK and self.break_glass_check.isChecked()
        self._message("")
        self.model.begin(job, action)
        self.redraw(force=True)
        model = self.model
        run_in_pool(lambda: model.issue(op, action, job, reason, digest, break_glass), self._on_outcome,
                    lambda exc: self._on_press_error(job, exc), pool=self._pool)

    def selected_checkpoint(self) -> str | None:
        """Digest of the selected checkpoint row."""
        rows = {i.row() for i in self.checkpoint_table.selectedIndexes()}
        if not rows:
            return None
        r = min(rows)
        return self._checkpoint_digests[r] if r < len(self._checkpoint_digests) else None

    def selected_pending(self) -> PendingRequest | None:
        """The selected pending request."""
        rows = {i.row() for i in self.pending_table.selectedIndexes()}
        if not rows:
            return None
        r = min(rows)
        return self._pending_shown[r] if r < len(self._pending_shown) else None

    def cosign(self, request: PendingRequest, cert: str, key: str) -> None:
        """The second operator co-signs `request` with their own files, then it is dispatched."""
        model = self.model
        job = request.command.job
        model.begin(job, request.command.action)
        self.redraw(force=True)

        def work() -> IssueOutcome:
            return model.cosign_and_dispatch(request, model.load_operator(cert, key))

        run_in_pool(work, self._on_outcome, lambda exc: self._on_press_error(job, exc), pool=self._pool)

    def refresh_pending(self) -> None:
        """Re-read pending_commands (worker)."""
        self._pending_flight.submit(self.model.fetch_pending, self._on_pending, self._on_error)

    def refresh_remote(self, deep: bool = False) -> None:
        """Re-read checkpoints (deep: re-hash every file) and frozen state of the job, and the pending list."""
        job = self._job
        self.refresh_pending()
        if job is None or self.model.dispatcher is None:
            return
        model = self.model
        self._ckpt_flight.submit(lambda: model.fetch_checkpoints(job, deep), self._on_checkpoints, self._on_error)
        self._frozen_flight.submit(lambda: model.fetch_frozen(job), self._on_frozen, self._on_error)

    def redraw(self, force: bool = False) -> None:
        """Tables when the model changed; countdowns and colours always."""
        changed = force or self.model.version != self._drawn_version
        if changed:
            self._drawn_version = self.model.version
            self._draw_checkpoints()
        if changed or self._hosts_waiting:
            self._draw_hosts()
        self._draw_pending()
        self._draw_status()
        self._update_buttons()

    # ---------------------------------------------------------------- callbacks (GUI thread)

    def _alive(self) -> bool:
        return shiboken6.isValid(self)

    def _on_timer(self) -> None:
        self.model.drain_updates()
        self._ticks += 1
        if self._ticks % PENDING_REFRESH_TICKS == 0:
            self.refresh_pending()
        if self.training is not None and self._ticks % 4 == 0:
            self._sync_jobs()
        self.redraw()

    def _sync_jobs(self) -> None:
        if self.training is None:
            return
        jobs = self.training.jobs()
        have = {self.job_combo.itemText(i) for i in range(self.job_combo.count())}
        if set(jobs) - have:
            self.set_jobs(sorted(have | set(jobs)))

    def _on_combo(self, text: str) -> None:
        if text:
            self.select_job(text)

    def _on_load_operator(self) -> None:
        files = self.choose_operator_files("sign commands")
        if files:
            self.load_operator_files(*files)

    def _on_operator_loaded(self, op: Operator) -> None:
        self.model.set_operator(op)
        if self._alive():
            self.operator_label.setText(f"operator: {op.label} (until {op.not_after:%Y-%m-%d %H:%M}Z)")
            self._message("")
            self.redraw()

    def _on_cosign(self) -> None:
        req = self.selected_pending()
        if req is None:
            self._message("select a pending request to co-sign")
            return
        files = self.choose_operator_files(f"co-sign {req.command.action} of {req.command.job}")
        if files:
            self.cosign(req, *files)

    def _on_cancel(self) -> None:
        req, op = self.selected_pending(), self.model.operator
        if req is None:
            return
        label = op.label if op is not None else "console"
        run_in_pool(lambda: self.model.cancel(req, label), lambda _r: self.refresh_pending(), self._on_error,
                    pool=self._pool)

    def _on_outcome(self, outcome: IssueOutcome) -> None:
        self.model.apply_outcome(outcome)
        if not self._alive():
            return
        if outcome.refused:
            self._message(outcome.refused)
        elif outcome.pending is not None and outcome.result is None:
            self._message(f"{outcome.action} of {outcome.job} waits for {outcome.pending.missing} more "
                          f"operator(s): co-sign it in Pending approvals within {outcome.pending.countdown()}")
        self.redraw(force=True)
        self.outcomeReady.emit(outcome)

    def _on_press_error(self, job: str, exc: BaseException) -> None:
        self.model.fail(job, str(exc))
        if self._alive():
            self._message(str(exc))
            self.redraw(force=True)
            self.failed.emit(str(exc))

    def _on_error(self, exc: BaseException) -> None:
        if self._alive():
            self._message(str(exc))

    def _on_pending(self, requests: list[PendingRequest]) -> None:
        self.model.apply_pending(requests)
        if self._alive():
            self.redraw()

    def _on_checkpoints(self, report: CheckpointReport) -> None:
        self.model.apply_checkpoints(report)
        if self._alive():
            self.redraw()

    def _on_frozen(self, fetched: FrozenFetch) -> None:
        self.model.apply_frozen(fetched)
        if self._alive():
            self.redraw()

    def _message(self, text: str) -> None:
        self.message_label.setText(text)

    @staticmethod
    def _dialog_files(purpose: str) -> tuple[str, str] | None:
        cert, _ = QFileDialog.getOpenFileName(None, f"Operator certificate to {purpose}", "",
                                              "Certificates (*.pem *.crt);;All files (*)")
        if not cert:
            return None
        key, _ = QFileDialog.getOpenFileName(None, f"Operator private key to {purpose}", "",
                                             "Keys (*.key *.pem);;All files (*)")
        return (cert, key) if key else None

    # ---------------------------------------------------------------- drawing

    def _draw_hosts(self) -> None:
        job = self._job
        rows = self.model.host_rows(job) if job else []
        self._hosts_waiting = any(r.color == AMBER for r in rows)  # keep redrawing: may turn into an alarm
        t = self.host_table
        if t.rowCount() != len(rows):
            t.setRowCount(len(rows))
        for i, r in enumerate(rows):
            t.setItem(i, 0, _item(r.host))
            t.setItem(i, 1, _item(r.state, r.color))
            t.setItem(i, 2, _item(r.method or "-"))
            t.setItem(i, 3, _item(_hms(r.executed_at_ns)))
            t.setItem(i, 4, _item(r.detail))
        res = self.model.last_result(job) if job else None
        flight = self.model.in_flight(job) if job else ""
        if flight:
            self.summary_label.setText(f"{flight} in progress…")
        elif res is not None and res.job == job:
            self.summary_label.setText(res.summary() + (f" — {'; '.join(res.notes)}" if res.notes else ""))
        else:
            self.summary_label.setText("")

    def _draw_checkpoints(self) -> None:
        job = self._job
        report = self.model.checkpoints(job) if job else None
        t = self.checkpoint_table
        selected = self.selected_checkpoint()
        rows = report.rows if report else []
        t.setRowCount(len(rows) + (len(report.errors) if report else 0))
        self._checkpoint_digests = []
        for i, r in enumerate(rows):
            color = GREEN if r.eligible else (AMBER if r.signed_everywhere else RED)
            t.setItem(i, 0, _item(str(r.step)))
            t.setItem(i, 1, _item(r.status_text(), color))
            t.setItem(i, 2, _item(r.digest))
            t.setItem(i, 3, _item(r.run))
            self._checkpoint_digests.append(r.digest)
        if report:
            for j, (host, err) in enumerate(sorted(report.errors.items()), start=len(rows)):
                t.setItem(j, 0, _item("-"))
                t.setItem(j, 1, _item(f"{host}: cannot list", RED))
                t.setItem(j, 2, _item(err))
                t.setItem(j, 3, _item(""))
        if selected in self._checkpoint_digests:
            t.selectRow(self._checkpoint_digests.index(selected))

    def _draw_pending(self) -> None:
        reqs = self.model.pending()
        selected = self.selected_pending()
        t = self.pending_table
        same = [p.command_id for p in reqs] == [p.command_id for p in self._pending_shown]
        self._pending_shown = reqs
        if not same:
            t.setRowCount(len(reqs))
        for i, p in enumerate(reqs):
            left = p.seconds_left()
            color = RED if left <= 0 else (AMBER if left < 30 else None)
            if not same:
                c = p.command
                t.setItem(i, 0, _item(c.action.upper() + (" (break-glass)" if c.break_glass else "")))
                t.setItem(i, 1, _item(c.job))
                t.setItem(i, 2, _item(p.requested_by))
                t.setItem(i, 3, _item(f"{len(p.signatures)}/{p.required_signers}"))
                t.setItem(i, 5, _item(c.reason))
                t.setItem(i, 6, _item(c.command_id))
            t.setItem(i, 4, _item(p.countdown(), color))
        if not same and selected is not None:
            ids = [p.command_id for p in reqs]
            if selected.command_id in ids:
                t.selectRow(ids.index(selected.command_id))

    def _draw_status(self) -> None:
        job = self._job
        st = self.model.frozen_status(job) if job else None
        if st is None:
            self.frozen_label.setVisible(False)
        else:
            self.frozen_label.setText(st.text())
            self.frozen_label.setStyleSheet(FROZEN_WARN_STYLE if st.warning else FROZEN_STYLE)
            self.frozen_label.setVisible(True)
        alert = self.model.advance_alert(job) if job else None
        if alert is None:
            self.alert_label.setVisible(False)
        else:
            self.alert_label.setText(alert.text())
            self.alert_label.setVisible(True)

    def _update_buttons(self) -> None:
        idle = self._job is not None and not self.model.in_flight(self._job)
        for b in (self.freeze_button, self.resume_button):
            b.setEnabled(idle)
        self.rollback_button.setEnabled(idle and self.selected_checkpoint() is not None)
        sel = self.selected_pending()
        self.cosign_button.setEnabled(sel is not None and not sel.expired())
        self.cancel_button.setEnabled(sel is not None)
