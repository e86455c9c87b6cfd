"""Acknowledging or resolving an alert from the console is stored, told to detection, and audited."""

from __future__ import annotations

import time
from pathlib import Path

from console.app import _alert_state_changer
from console.detect.alerts import Alert, upsert_alerts
from console.detect.runner import DetectionRunner
from console.models.alerts import AlertsModel
from console.respond.audit import AuditChain, load_or_create_audit_key
from console.store.writer import StoreWriter
from console.ui.qt_alerts import QtAlertsPanel


def _alert(alert_id: str) -> Alert:
    now = time.time_ns()
    return Alert(alert_id, "xid", "critical", "open", "h1", 0, None, None, now, now, {"xid": 79},
                 f"xid:h1:0:{alert_id}", now)


def test_acknowledge_is_stored_and_audited(tmp_path: Path) -> None:
    w = StoreWriter(tmp_path / "s.duckdb")
    w.start()
    try:
        w.run_on_writer(lambda con: upsert_alerts(con, [_alert("a1")]))
        audit = AuditChain(w.run_on_writer, signing_key=load_or_create_audit_key(tmp_path / "audit-key.pem"))
        change = _alert_state_changer(w, DetectionRunner(None), audit)
        change("a1", "acknowledged")
        assert w.read_query("SELECT state FROM alerts WHERE alert_id = 'a1'") == [("acknowledged",)]
        rows = w.read_query("SELECT action, target FROM audit_log ORDER BY seq")
        assert ("alert.acknowledged", "a1") in rows
    finally:
        w.stop()


def test_panel_buttons_change_the_selected_alert(qtbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    w = StoreWriter(tmp_path / "s.duckdb")
    w.start()
    calls: list[tuple[str, str]] = []
    try:
        w.run_on_writer(lambda con: upsert_alerts(con, [_alert("a1"), _alert("a2")]))
        model = AlertsModel(w.read_query, change_state=lambda i, s: calls.append((i, s)))
        panel = QtAlertsPanel(model, refresh_ms=60_000)
        qtbot.addWidget(panel)
        qtbot.waitUntil(lambda: len(model.rows()) == 2, timeout=5000)
        panel.table.selectRow(0)
        panel.ack_button.click()
        qtbot.waitUntil(lambda: len(calls) == 1, timeout=5000)
        assert calls[0][1] == "acknowledged" and calls[0][0] in ("a1", "a2")
    finally:
        w.stop()
