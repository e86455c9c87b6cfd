"""What ingest tells the rest of the console, without knowing whether a window exists.

The headless collector passes no sink; the desktop console passes one that forwards to the
GUI thread through queued Qt signals. Calls arrive on the ingest thread and must not block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from protos.types import Description, Frame, Gap

# Connection states, as shown in the UI and in `collect` logs.
CONNECTING = "connecting"
CONNECTED = "connected"
LAGGING = "lagging"  # connected, but the newest frame is older than 3 sample intervals
GAP = "gap"  # connected; the agent reported frames it no longer holds
DISCONNECTED = "disconnected"
REJECTED = "rejected"  # identity or contract check failed; not retried until the inventory changes
PAUSED = "paused"  # the store cannot accept data (e.g. disk full); agents keep buffering

STATES = (CONNECTING, CONNECTED, LAGGING, GAP, DISCONNECTED, REJECTED, PAUSED)


@dataclass(slots=True, frozen=True)
class HostStatus:
    """One agent connection as an operator sees it."""

    address: str
    host: str  # identity from the certificate, or the inventory name before connecting
    state: str
    detail: str = ""
    last_frame_ns: int = 0


class IngestSink(Protocol):
    """Receives live data after it has been handed to the store writer."""

    def on_description(self, address: str, desc: Description) -> None: ...

    def on_frame(self, frame: Frame) -> None: ...

    def on_gap(self, host: str, gap: Gap) -> None: ...

    def on_status(self, status: HostStatus) -> None: ...


class FanoutSink:
    """Hands every callback to several sinks in order (e.g. detection, then the GUI bridge)."""

    def __init__(self, *sinks: IngestSink) -> None:
        self.sinks = list(sinks)

    def on_description(self, address: str, desc: Description) -> None:
        for s in self.sinks:
            s.on_description(address, desc)

    def on_frame(self, frame: Frame) -> None:
        for s in self.sinks:
            s.on_frame(frame)

    def on_gap(self, host: str, gap: Gap) -> None:
        for s in self.sinks:
            s.on_gap(host, gap)

    def on_status(self, status: HostStatus) -> None:
        for s in self.sinks:
            s.on_status(status)
