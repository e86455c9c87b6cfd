"""The agent's tick loop: sample GPUs, gather training records, emit one frame per tick.

NVML calls can jitter, so sampling runs in a worker thread and never delays the event
loop that streams frames to consoles.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from agent import __version__
from agent.buffer import FrameBuffer
from agent.collect.base import Collector
from protos import serde
from protos.types import (
    METRIC_NAMES,
    METRIC_SCHEMA,
    SEVERITY_INFO,
    SEVERITY_WARNING,
    Description,
    Event,
    Frame,
    TrainRecord,
)

log = logging.getLogger("gpusoc.agent")

MAX_CARRIED_RECORDS = 4096  # SDK records kept across ticks that could not be buffered
MAX_CARRIED_EVENTS = 1024  # events likewise (security events are few; this bounds a storm)

CAPABILITIES = ["subscribe", "describe", "health", "gap_records", "training_sdk"]


class TrainingSource(Protocol):
    """What the runtime needs from the SDK receiver (agent.training.TrainingReceiver)."""

    @property
    def dropped(self) -> int: ...

    def drain(self) -> list[TrainRecord]: ...


@dataclass
class AgentState:
    """Counters a health check or the Describe RPC can report."""

    started_ns: int = field(default_factory=time.time_ns)
    ticks: int = 0
    late_ticks: int = 0
    sample_errors: int = 0


class AgentRuntime:
    """Owns the collector, the SDK receiver and the buffer; runs on one asyncio loop."""

    def __init__(self, host: str, collector: Collector, buffer: FrameBuffer,
                 sample_interval_s: float = 1.0, training: TrainingSource | None = None) -> None:
        if not 0.1 <= sample_interval_s <= 60:
            raise ValueError("sample_interval_s must be between 0.1 and 60")
        self.host = host
        self.collector = collector
        self.buffer = buffer
        self.interval = sample_interval_s
        self.training = training
        self.state = AgentState()
        self._pending_events: list[Event] = [
            Event(time.time_ns(), "agent_start", SEVERITY_INFO, -1, os.getpid(),
                  f"gpusoc-agent {__version__} started on {host} (epoch {buffer.epoch[:8]})",
                  {"version": __version__, "collector": collector.status})
        ]
        # Ticks whose frame could not be buffered (disk full with nothing left to evict, I/O
        # error): no seq was consumed, so no gap can say so; the next stored frame carries a
        # `ticks_not_stored` event instead, plus the events and SDK records of the lost ticks.
        self._unstored: tuple[int, int, str] | None = None  # (count, first ts ns, last error)
        self._carry_records: list[TrainRecord] = []
        # GPU activity by local rank, for the simulator's load (GPU i ~ local rank i).
        self._last_record_ns: dict[int, int] = {}
        self._stop = asyncio.Event()
        # Called with each new frame on the agent's loop (e.g. the Prometheus exporter); must not block.
        self.frame_listeners: list[Callable[[Frame], None]] = []

    def describe(self) -> Description:
        return Description(
            host=self.host,
            agent_version=__version__,
            epoch=self.buffer.epoch,
            simulated=self.collector.simulated,
            gpus=self.collector.gpus(),
            capabilities=[*CAPABILITIES, "nvml" if not self.collector.simulated else "simulated_gpus"],
            metric_names=list(METRIC_NAMES),
            metric_schema=METRIC_SCHEMA,
            sample_interval_s=self.interval,
            oldest_seq=self.buffer.oldest_seq,
            newest_seq=self.buffer.newest_seq,
            nvml_status=self.collector.status,
        )

    def add_event(self, event: Event) -> None:
        """Queue an event for the next frame (used by other agent parts, e.g. integrity checks)."""
        self._pending_events.append(event)

    def gpu_activity(self) -> dict[int, float]:
        """1.0 for GPUs whose local rank logged in the last 3 s; feeds the simulator's load."""
        now = time.time_ns()
        return {lr: 1.0 for lr, ts in self._last_record_ns.items() if now - ts < 3_000_000_000}

    async def tick(self) -> Frame:
        """Build, encode and buffer one frame."""
        ts = time.time_ns()
        if self.collector.simulated:  # numpy only: cheaper inline than a thread hop
            gpu = self.collector.sample()
        else:
            gpu = await asyncio.get_running_loop().run_in_executor(None, self.collector.sample)
        records, self._carry_records = self._carry_records, []
        dropped = 0
        if self.training is not None:
            records.extend(self.training.drain())
            dropped = self.training.dropped
            for r in records:
                if r.kind == "log":
                    self._last_record_ns[r.local_rank] = r.ts_unix_ns
        events, self._pending_events = self._pending_events, []
        events.extend(gpu.events)
        if self._unstored is not None:
            n, since_ns, error = self._unstored
            events.append(Event(ts, "ticks_not_stored", SEVERITY_WARNING, -1, os.getpid(),
                                f"{n} tick(s) since {time.strftime('%H:%M:%S', time.gmtime(since_ns / 1e9))}Z "
                                f"could not be buffered: {error}",
                                {"count": str(n), "since_unix_ns": str(since_ns), "error": error}))
        frame = Frame(
            host=self.host,
            epoch=self.buffer.epoch,
            seq=self.buffer.next_seq,
            ts_unix_ns=ts,
            simulated=self.collector.simulated,
            gpu_values=gpu.values,
            gpu_index=gpu.gpu_index,
            gpu_state=gpu.gpu_state,
            processes=gpu.processes,
            train=records,
            events=events,
            sdk_dropped=dropped,
        )
        # Encoded outside the try: content that cannot be encoded must not be carried into every
        # later tick (one bad event would stop the agent storing anything).
        data = serde.encode_frame(frame)
        try:
            await self.buffer.append(frame.seq, data)
        except Exception as exc:
            if self.buffer.next_seq != frame.seq:
                raise  # the frame got its seq (it failed after the write): it is stored, carry nothing
            # Keep what this tick carried for the next one; the GPU sample itself is lost.
            carried = [e for e in events if e.kind != "ticks_not_stored"]
            self._pending_events[:0] = carried[-MAX_CARRIED_EVENTS:]
            self._carry_records = records[-MAX_CARRIED_RECORDS:]  # bounded while the disk stays full
            n, since_ns, _ = self._unstored or (0, ts, "")
            self._unstored = (n + 1, since_ns, f"{type(exc).__name__}: {exc}"[:300])
            raise
        self._unstored = None
        self.state.ticks += 1
        for listener in self.frame_listeners:
            listener(frame)
        return frame

    async def run(self, phase_s: float = 0.0) -> None:
        """Tick on a fixed schedule (no drift) until stop(); a slow tick skips, never bunches."""
        next_at = time.monotonic() + phase_s
        if phase_s:
            await asyncio.sleep(phase_s)
        while not self._stop.is_set():
            try:
                await self.tick()
            except Exception:  # one bad tick must not end collection
                self.state.sample_errors += 1
                log.exception("tick failed")
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay < 0:
                self.state.late_ticks += 1
                next_at = time.monotonic()
                delay = 0
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stop.set()


def default_host() -> str:
    return socket.gethostname()
