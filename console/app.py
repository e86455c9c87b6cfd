"""The desktop console's composition root: store, ingest, detection and window wired together.

Threads: ingest (its own asyncio loop), the single DuckDB writer, the UI bridge's flusher and
the Qt GUI thread. The GUI thread never does gRPC or DuckDB I/O: history queries run on
QThreadPool workers and everything reaches widgets through queued signals.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("gpusoc.console.app")

# The running desktop's parts, for the soak script and debugging: writer, fleet, bridge, detection.
LAST_RUN: dict[str, Any] = {}

Query = Callable[[str, list[object]], list[tuple[Any, ...]]]


def _qt_app() -> Any:
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("gpusoc-console")
    app.setOrganizationName("gpusoc")
    _quit_on_signals(app)
    return app


def _quit_on_signals(app: Any) -> None:
    """Ctrl-C / SIGTERM close the window cleanly (Qt's loop would otherwise swallow them)."""
    import signal

    from PySide6.QtCore import QTimer

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: app.quit())
    timer = QTimer(app)  # wakes the interpreter so Python signal handlers get to run
    timer.timeout.connect(lambda: None)
    timer.start(250)


def build_panels(window: Any, query: Query | None, bridge: Any | None) -> dict[str, Any]:
    """Training, drilldown, alerts and events panels, registered as consumers of the bridge."""
    from PySide6.QtCore import Qt

    from console.models.alerts import AlertsModel, EventsLogModel
    from console.models.host import HostDrilldownModel
    from console.models.training import TrainingModel
    from console.ui.qt_alerts import QtAlertsPanel, QtEventsLog
    from console.ui.qt_host import QtHostDrilldown
    from console.ui.qt_training import QtTrainingView

    training = TrainingModel(query)
    host = HostDrilldownModel(query)
    events = EventsLogModel(query)
    panels: dict[str, Any] = {"training_model": training, "host_model": host, "events_model": events}
    panels["training"] = QtTrainingView(training)
    panels["host"] = QtHostDrilldown(host)
    panels["events"] = QtEventsLog(events)
    window.add_tab(panels["training"], "Training")
    window.add_tab(panels["host"], "Host")
    if query is not None:
        alerts = AlertsModel(query)
        panels["alerts_model"] = alerts
        panels["alerts"] = QtAlertsPanel(alerts)
        window.add_panel(panels["alerts"], "Alerts", Qt.DockWidgetArea.BottomDockWidgetArea)
    window.add_panel(panels["events"], "Events", Qt.DockWidgetArea.BottomDockWidgetArea)

    def drill(host_name: str, gpu: int) -> None:
        panels["host"].set_host(host_name)
        window.tabs.setCurrentWidget(panels["host"])

    window.heatmap.cellActivated.connect(drill)
    if bridge is not None:
        for consumer in (training, host, events):
            bridge.add_consumer(consumer)
    return panels


def run_replay(path: str) -> int:
    """Open an exported audit file read-only and replay it through the same views."""
    from console.models.fleet import FleetModel
    from console.models.replay import ReplaySource
    from console.ui.qt_main import QtMainWindow
    from console.ui.qt_replay import QtReplayBar

    p = Path(path)
    if not p.is_file():
        print(f"gpusoc-console: --open {path}: {'not a file' if p.exists() else 'no such file'}", file=sys.stderr)
        return 2
    try:
        source = ReplaySource(path)
    except Exception as exc:  # not a DuckDB file, a newer format, locked by a running console...
        hint = ""
        if "lock" in str(exc).lower():
            hint = f" (a running console holds it: replay an export, `gpusoc-console export --db {path} --out FILE`)"
        print(f"gpusoc-console: --open {path}: cannot open it read-only: {str(exc).splitlines()[0]}{hint}",
              file=sys.stderr)
        return 2
    app = _qt_app()
    model = FleetModel(clock=lambda: source.position_ns)
    window = QtMainWindow(model, None)
    window.setWindowTitle(f"gpusoc console: replay of {Path(path).name} (read-only)")
    panels = build_panels(window, source.query, None)
    panels["host"].history_end = lambda: source.position_ns
    bar = QtReplayBar(source, [model, panels["training_model"], panels["host_model"], panels["events_model"]])
    from PySide6.QtCore import Qt

    window.add_panel(bar, "Replay", Qt.DockWidgetArea.TopDockWidgetArea)
    window.resize(1500, 950)
    window.show()
    bar.seek(source.start_ns)
    return int(app.exec())


def run_desktop(args: argparse.Namespace) -> int:
    """`gpusoc-console [--agents ...] [--demo] [--open FILE]`."""
    if args.open:
        return run_replay(args.open)
    from console.cli import tls_from_args
    from console.detect.runner import DetectionRunner
    from console.ingest.fleet import AgentSource, FleetIngest
    from console.ingest.inventory import InventoryError
    from console.ingest.sink import FanoutSink
    from console.ingest.tls import ConsoleTls
    from console.store.control import start_control_server
    from console.store.writer import StoreWriter

    demo = None
    if args.demo:
        from console.demo import start_demo_fleet

        demo = start_demo_fleet(hosts=args.demo_hosts)
        agents = [str(demo.inventory)]
        tls: ConsoleTls | None = ConsoleTls(*demo.tls_files)
        db = args.db or str(demo.directory / "demo.duckdb")
        print(f"demo: {args.demo_hosts} simulated hosts, mTLS, data in {demo.directory}", flush=True)
    else:
        agents = args.agents or [os.environ.get("GPUSOC_CONSOLE_AGENTS", "fleet.txt")]
        db = args.db or "gpusoc.duckdb"
        try:
            entries, _ = AgentSource(agents).entries()
        except InventoryError as exc:
            print(f"gpusoc-console: {exc}", file=sys.stderr)
            return 2
        tls = tls_from_args(args, [e.address for e in entries])  # type: ignore[assignment]
    writer = StoreWriter(db)
    try:
        writer.start()
    except Exception as exc:
        print(f"gpusoc-console: cannot open store {db}: {exc}", file=sys.stderr)
        if demo:
            demo.stop()
        return 2

    from console.models.fleet import FleetModel
    from console.ui.bridge import QtIngestBridge
    from console.ui.qt_main import build_main_window

    app = _qt_app()
    model = FleetModel()
    bridge = QtIngestBridge(model)
    window = build_main_window(model, bridge)
    panels = build_panels(window, writer.read_query, bridge)
    detection = DetectionRunner(writer).start()
    respond = _build_response(window, writer, tls, panels, bridge)
    _audit_session(respond["audit"], "console.start", {"agents": agents, "demo": bool(demo)})
    panels["alerts_model"].change_state = _alert_state_changer(writer, detection, respond["audit"])
    panels["alerts"].ack_button.setEnabled(True)
    panels["alerts"].resolve_button.setEnabled(True)
    fleet = FleetIngest(AgentSource(agents), writer, tls, sink=FanoutSink(detection, bridge))
    fleet.start_thread()
    # `gpusoc-console query/export/alerts --db` from other processes (its own threads, no Qt);
    # exports through it are audited and signed like the Response tab's actions.
    control = start_control_server(writer, audit=respond["audit"])
    LAST_RUN.update(writer=writer, fleet=fleet, bridge=bridge, detection=detection, window=window, control=control)
    window.setWindowTitle(f"gpusoc console: {db}" + ("  [DEMO: simulated fleet]" if demo else ""))
    window.resize(1500, 950)
    window.show()
    status_timer = _terminal_status(window, model, writer, detection, every_s=60.0)
    try:
        rc = int(app.exec())
    finally:
        if control is not None:
            control.stop()  # before the writer stops: requests in flight fail cleanly
        status_timer.stop()
        fleet.stop()
        fleet.join(10)
        detection.stop()
        respond["timer"].stop()
        respond["dispatcher"].close()
        bridge.close()
        if writer.flush(timeout=30):  # else the writer is stuck: do not wait on it again for a row
            _audit_session(respond["audit"], "console.stop", {"flushed": True})
        else:
            log.error("store not flushed at exit; console.stop not recorded in the audit chain")
        writer.stop()
        if demo:
            demo.stop()
    return rc


def _audit_session(audit: Any, action: str, payload: dict[str, Any]) -> None:
    """A window's start and stop in the audit chain, signed, as `collect` does: every store a
    console wrote has a verifiable trail, even when nobody acted in it."""
    try:
        audit.append("console", action, None, payload)
        audit.sign_head()
    except Exception as exc:  # an unusable audit key must not keep the window from opening
        log.error("audit %s not recorded: %s", action, exc)



def terminal_status_line(counts: dict[str, int], n_hosts: int, writer_stats: dict[str, Any], alerts: str,
                         frames_before: int, seconds: float) -> str:
    """One line for the terminal the console was started from (a window may not be visible)."""
    frames = int(writer_stats.get("frames_committed") or 0)
    rate = (frames - frames_before) / seconds if seconds > 0 else 0.0
    return (f"gpusoc-console: hosts connected {counts.get('connected', 0)}/{n_hosts}, "
            f"frames stored {frames} ({rate:.1f}/s), {alerts}, "
            f"store {writer_stats.get('status', '?')}")


def _terminal_status(window: Any, model: Any, writer: Any, detection: Any, every_s: float) -> Any:
    """Print a status line every `every_s` from in-memory counters (no I/O on the GUI thread)."""
    from PySide6.QtCore import QTimer

    last = {"frames": 0}

    def tick() -> None:
        stats = writer.stats
        print(terminal_status_line(model.state_counts(), model.n_hosts, stats, detection.summary(),
                                   last["frames"], every_s), flush=True)
        last["frames"] = int(stats.get("frames_committed") or 0)

    timer = QTimer(window)
    timer.timeout.connect(tick)
    timer.start(int(every_s * 1000))
    return timer


def _build_response(window: Any, writer: Any, tls: Any, panels: dict[str, Any], bridge: Any) -> dict[str, Any]:
    """The Response tab: signed freeze/resume/rollback with two-person approval, audited."""
    from PySide6.QtCore import QTimer

    from console.models.respond import ResponseModel
    from console.respond.approvals import ApprovalStore
    from console.respond.audit import AuditChain, load_or_create_audit_key
    from console.respond.commands import (
        CommandDispatcher,
        ReceiptKeyPins,
        default_state_dir,
        job_hosts,
        store_address_of,
    )
    from console.ui.qt_respond import QtResponsePanel

    state_dir = default_state_dir()  # $GPUSOC_CONSOLE_STATE_DIR or ~/.local/state/gpusoc/console
    audit = AuditChain(writer.run_on_writer, signing_key=load_or_create_audit_key(state_dir / "audit-key.pem"))
    dispatcher = CommandDispatcher(store_address_of(writer.read_query), tls, audit,
                                   pins=ReceiptKeyPins(state_dir / "receipt-keys.json"), actor="console")
    model = ResponseModel(dispatcher, hosts_of=lambda job: job_hosts(writer.read_query, job),
                          approvals=ApprovalStore(writer.run_on_writer), audit=audit,
                          submit_on_writer=writer.submit_on_writer, query=writer.read_query)
    panel = QtResponsePanel(model, training=panels["training_model"])
    window.add_tab(panel, "Response")
    panels["training"].jobSelected.connect(panel.select_job)
    bridge.add_consumer(model)  # the "telemetry advanced while frozen" rule watches live frames
    timer = QTimer(window)  # signs the audit chain's head every so often (off the GUI thread)
    timer.timeout.connect(lambda: writer.submit_on_writer(lambda _con: audit.sign_if_due()))
    timer.start(5000)
    return {"audit": audit, "dispatcher": dispatcher, "model": model, "panel": panel, "timer": timer}


def _alert_state_changer(writer: Any, detection: Any, audit: Any) -> Callable[[str, str], None]:
    """Acknowledge/resolve from the alerts panel: stored, known to detection, and audited."""
    import getpass

    operator = getpass.getuser()

    def change(alert_id: str, state: str) -> None:  # on a worker thread
        writer.run_on_writer(lambda con: con.execute(
            "UPDATE alerts SET state = ?, updated_at = now() WHERE alert_id = ?", [state, alert_id]))
        if state == "acknowledged":
            detection.engine.acknowledge(alert_id)
        elif state == "resolved":
            detection.engine.resolve(alert_id)
        audit.append(operator, f"alert.{state}", alert_id, {"alert_id": alert_id, "state": state})

    return change
