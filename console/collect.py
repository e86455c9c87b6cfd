"""`gpusoc-console collect`: the headless data path (servers, CI, audits).

Subscribes to every agent, stores into DuckDB through the single writer thread, prints a
status line now and then, and on SIGINT/SIGTERM commits what it holds before exiting. While it
runs, its control socket `<db>.ctl` answers `gpusoc-console query/export/alerts --db` from other
processes (console/store/control.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from console.ingest.fleet import AgentSource, FleetIngest
from console.ingest.inventory import AgentEntry, InventoryError
from console.respond.audit import AuditChain

log = logging.getLogger("gpusoc.console.collect")


class StatusLine:
    """The periodic status line: fleet states, frame rates, store progress and alerts.

    The frame rate is shown over the last interval and since start: right after start the
    agents replay their backlog, which inflates the since-start figure for a long while.
    """

    def __init__(self, fleet: FleetIngest, writer: object, started: float | None = None) -> None:
        self.fleet = fleet
        self.writer = writer
        self.started = time.monotonic() if started is None else started
        self._last = (self.started, 0)

    def __call__(self) -> str:
        fleet, writer = self.fleet, self.writer
        states = Counter(s.state for s in fleet.statuses())
        frames = sum(c.stats.frames for c in fleet.clients.values())
        rejected = sum(c.stats.rejected for c in fleet.clients.values())
        stats = getattr(writer, "stats", {})
        now = time.monotonic()
        last_t, last_frames = self._last
        self._last = (now, frames)
        window = max(now - last_t, 1e-9)
        elapsed = max(now - self.started, 1e-9)
        return (
            f"agents {len(fleet.clients)} ({', '.join(f'{k} {v}' for k, v in sorted(states.items())) or '-'})"
            f" | frames {frames} ({(frames - last_frames) / window:.0f}/s last {window:.0f}s,"
            f" {frames / elapsed:.0f}/s since start) rejected {rejected}"
            f" | store {getattr(writer, 'status', '?')} committed {stats.get('frames_committed', '?')}"
            f" | {_alerts_text(fleet.sink)}"
        )


def _alerts_text(sink: object) -> str:
    """Alerts open now (this run's detection) and how many raise/update events it stored."""
    summary = getattr(sink, "summary", None)
    return summary() if callable(summary) else f"alert updates {getattr(sink, 'raised', 0)}"


async def collect(fleet: FleetIngest, writer: object, status_every: float) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, fleet.stop)
    line = StatusLine(fleet, writer)

    async def report() -> None:
        while True:
            await asyncio.sleep(status_every)
            log.info("%s", line())

    reporter = asyncio.create_task(report())
    try:
        await fleet.run()
    finally:
        reporter.cancel()
        log.info("%s", line())


def run_collect(args: argparse.Namespace) -> int:
    from console.cli import tls_from_args
    from console.store.control import start_control_server
    from console.store.writer import StoreWriter

    try:
        source = AgentSource(args.agents)
        entries, _ = source.entries()
    except InventoryError as exc:
        print(f"gpusoc-console collect: {exc}", file=sys.stderr)
        return 2
    tls = tls_from_args(args, [e.address for e in entries])
    from console.detect.runner import DetectionRunner

    writer = StoreWriter(args.db, raw_retention_s=args.raw_retention)
    writer.start()
    detection = DetectionRunner(writer).start()  # alerts land in the alerts table
    audit = _start_audit(writer, entries)
    # `gpusoc-console query/export/alerts --db` from other processes while this runs (<db>.ctl);
    # exports through it are audited and signed with the chain's key.
    control = start_control_server(writer, audit=audit)
    fleet = FleetIngest(source, writer, tls, sink=detection)  # type: ignore[arg-type]
    log.info("collecting from %d agents into %s (%s)", len(entries), args.db, "INSECURE" if tls is None else "mTLS")
    try:
        asyncio.run(collect(fleet, writer, args.status_every))
    finally:
        if control is not None:
            control.stop()  # before the writer stops; removes the socket file
        detection.stop()
        ok = writer.flush(timeout=30)
        if audit is not None:
            audit.append("collector", "collect.stop", None, {"flushed": ok})
            audit.sign_head()
        writer.stop()
        if not ok:
            log.error("could not commit everything before exit; agents still hold the rest")
    return 0


def _start_audit(writer: Any, entries: Sequence[AgentEntry]) -> AuditChain | None:
    """Audit the collector's own start/stop with signed heads, so exports verify (docs/audit.md)."""
    from console.respond.audit import load_or_create_audit_key
    from console.respond.commands import default_state_dir

    try:
        key_path = default_state_dir() / "audit-key.pem"
        chain = AuditChain(writer.run_on_writer, signing_key=load_or_create_audit_key(key_path))
        chain.append("collector", "collect.start", None, {"agents": [e.address for e in entries]})
        chain.sign_head()
        log.info("audit chain head signed with %s (pin its public key: gpusoc-console audit pubkey %s)",
                 (chain.key_id or "?")[:16], key_path)
        return chain
    except Exception as exc:  # the audit key is unusable: say so, keep collecting
        log.error("audit chain disabled: %s", exc)
        return None
