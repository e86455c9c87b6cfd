"""Ingest for a whole fleet: one AgentClient task per inventory entry on one asyncio loop.

The loop runs in the calling thread (`gpusoc-console collect`) or in a background thread
(the desktop console, so the GUI thread never does gRPC). Inventory edits are picked up
while running; a slow or broken agent only ever affects its own task.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Callable

from console.ingest.client import AgentClient, FrameStore
from console.ingest.inventory import AgentEntry, InventoryError, InventoryFile, parse_inventory
from console.ingest.sink import HostStatus, IngestSink
from console.ingest.tls import ConsoleTls

log = logging.getLogger("gpusoc.console.ingest")


class AgentSource:
    """Agents given as a file (watched) or as a fixed list of addresses."""

    def __init__(self, specs: list[str]) -> None:
        self.file: InventoryFile | None = None
        self.fixed: list[AgentEntry] = []
        if len(specs) == 1 and ":" not in specs[0]:
            self.file = InventoryFile(specs[0])
        else:
            for s in specs:
                if ":" not in s:
                    raise InventoryError(f"{s!r}: give one inventory FILE, or HOST:PORT addresses")
            self.fixed = parse_inventory("\n".join(specs), "--agents")

    def entries(self) -> tuple[list[AgentEntry], bool]:
        """Current entries and whether they changed since the last call."""
        if self.file is None:
            return self.fixed, False
        changed = self.file.poll()
        return self.file.entries, changed


class FleetIngest:
    """Runs every AgentClient; exposes per-host status for the UI and the collector's log."""

    def __init__(self, source: AgentSource, store: FrameStore, tls: ConsoleTls | None,
                 sink: IngestSink | None = None, poll_s: float = 1.0) -> None:
        self.source = source
        self.store = store
        self.tls = tls
        self.sink = sink
        self.poll_s = poll_s
        self.clients: dict[str, AgentClient] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.on_status: Callable[[HostStatus], None] | None = None
        self._periodic: list[Callable[[], object]] = []

    def add_periodic(self, fn: Callable[[], object]) -> None:
        """Run fn on the ingest loop every poll_s (e.g. detection's evaluate); exceptions are logged."""
        self._periodic.append(fn)

    def statuses(self) -> list[HostStatus]:
        return [c.status for c in self.clients.values() if c.status is not None]

    def _sync(self, entries: list[AgentEntry]) -> None:
        wanted = {e.address: e for e in entries}
        for addr in list(self._tasks):
            if addr not in wanted or wanted[addr].expected_name != self.clients[addr].expected_name:
                log.info("inventory: dropping %s", addr)
                self._tasks.pop(addr).cancel()
                self.clients.pop(addr, None)
        # Spread first connects over a few seconds so thousands of agents are not dialled at once.
        spread = min(5.0, len(wanted) / 500.0)
        for addr, entry in wanted.items():
            if addr in self._tasks:
                continue
            client = AgentClient(addr, self.store, self.tls, entry.expected_name, self.sink, self.on_status)
            self.clients[addr] = client
            self._tasks[addr] = asyncio.create_task(client.run(random.uniform(0, spread)), name=f"agent {addr}")

    async def run(self) -> None:
        """Run until stop(); re-read the inventory and mark lagging hosts every poll_s."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        entries, _ = self.source.entries()
        self._sync(entries)
        try:
            while not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=self.poll_s)
                except TimeoutError:
                    pass
                entries, changed = self.source.entries()
                if changed:
                    self._sync(entries)
                for c in self.clients.values():
                    c.check_lag()
                for fn in self._periodic:
                    try:
                        fn()
                    except Exception:
                        log.exception("periodic task %r failed", fn)
        finally:
            for t in self._tasks.values():
                t.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            self._tasks.clear()

    def stop(self) -> None:
        """Thread-safe stop."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def start_thread(self) -> threading.Thread:
        """Run on a background thread with its own event loop (desktop console)."""
        self._thread = threading.Thread(target=lambda: asyncio.run(self.run()), name="gpusoc-ingest", daemon=True)
        self._thread.start()
        return self._thread

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
