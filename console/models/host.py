"""Host drilldown view model (Qt-free): one selected host's GPUs, processes and recent events.

Selecting a host starts empty; live frames for it are kept from that moment, and the store's
last `window_s` seconds are merged underneath once `fetch_history` (worker thread) returns and
`apply_history` (GUI thread) runs. So the panel fills from history first, then keeps scrolling
live, with no duplicate points where the two overlap.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from console.models.alerts import EVENT_COLUMNS, EventRow, event_key, event_row_from_db
from console.models.training import STORE_RESOLUTION_S, Query, RingBuffer, stored_ns_ceiling
from protos.types import GPU_STATE_NAMES, METRIC_INDEX, Frame, GpuProcess

DEFAULT_METRICS: Final[tuple[str, ...]] = ("gpu_util_pct", "mem_used_mib", "temp_c", "power_w")
DEFAULT_WINDOW_S: Final = 600.0
DEFAULT_CAPACITY: Final = 3600  # points per GPU: an hour at 1 Hz, so a 10-min window never runs short
_STATE_BY_NAME: Final[dict[str, int]] = {name: code for code, name in GPU_STATE_NAMES.items()}


@dataclass(slots=True)
class HostHistory:
    """Result of `fetch_history`: rows per GPU (ts_s, metric...) plus stored events, newest first."""

    host: str
    rows: dict[int, np.ndarray]
    states: dict[int, int]
    events: list[EventRow] = field(default_factory=list)


@dataclass(slots=True)
class _Gpu:
    ring: RingBuffer
    last_ts_ns: int = -1
    state: int = 0


class HostDrilldownModel:
    """Per-GPU metric series of one host over the last `window_s`, its processes and events.

    Implements the `on_frame` part of `console.ingest.sink.IngestSink`; frames of other hosts are
    ignored. Everything except `fetch_history` runs on the GUI thread.
    """

    def __init__(self, query: Query | None = None, metrics: Sequence[str] = DEFAULT_METRICS,
                 window_s: float = DEFAULT_WINDOW_S, capacity: int = DEFAULT_CAPACITY,
                 max_events: int = 200) -> None:
        unknown = [m for m in metrics if m not in METRIC_INDEX]
        if unknown:
            # Metric names become SQL column names: only the contract's names are allowed.
            raise ValueError(f"unknown metrics: {unknown}")
        self._query = query
        self._metrics = tuple(metrics)
        self._cols = np.array([METRIC_INDEX[m] for m in self._metrics], dtype=np.intp)
        self._window_s = float(window_s)
        self._capacity = capacity
        self._host: str | None = None
        self._gpus: dict[int, _Gpu] = {}
        self._processes: list[GpuProcess] = []
        self._events: collections.deque[EventRow] = collections.deque(maxlen=max_events)
        self._history_loaded = False
        self._simulated = False
        self._last_frame_ns = 0
        self._version = 0

    # ---- selection and state ----

    @property
    def version(self) -> int:
        """Bumped on every change; views redraw only when it moved."""
        return self._version

    @property
    def host(self) -> str | None:
        """The selected host, or None."""
        return self._host

    @property
    def metrics(self) -> tuple[str, ...]:
        """Metric names kept per GPU, in column order of `series`."""
        return self._metrics

    @property
    def window_s(self) -> float:
        """Seconds of history shown, back from the newest point."""
        return self._window_s

    @property
    def history_loaded(self) -> bool:
        """True once the store's history for the selected host was merged."""
        return self._history_loaded

    @property
    def simulated(self) -> bool:
        """True when the newest live frame came from a simulated agent."""
        return self._simulated

    @property
    def last_frame_ns(self) -> int:
        """Timestamp of the newest live frame of the host (0 = none yet)."""
        return self._last_frame_ns

    def select_host(self, host: str | None) -> None:
        """Switch to `host` and drop everything held for the previous one."""
        if host == self._host:
            return
        self._host = host
        self.clear()

    def clear(self) -> None:
        """Drop all points, processes and events but keep the selection (replay seeks backwards)."""
        self._gpus.clear()
        self._processes = []
        self._events.clear()
        self._history_loaded = False
        self._simulated = False
        self._last_frame_ns = 0
        self._version += 1

    def gpus(self) -> list[int]:
        """GPU indices seen for the host, ascending."""
        return sorted(self._gpus)

    def gpu_state(self, gpu: int) -> int:
        """Latest protos.types GPU state code (0 = unknown)."""
        g = self._gpus.get(gpu)
        return g.state if g else 0

    def series(self, gpu: int) -> tuple[np.ndarray, np.ndarray]:
        """(unix seconds [n], values [n, len(metrics)]) of one GPU within the window, oldest first."""
        g = self._gpus.get(gpu)
        if g is None or len(g.ring) == 0:
            return np.empty(0), np.empty((0, len(self._metrics)))
        a = g.ring.array()
        newest = max(x.last_ts_ns for x in self._gpus.values()) / 1e9
        a = a[a[:, 0] > newest - self._window_s]
        return a[:, 0], a[:, 1:]

    def processes(self, gpu: int | None = None) -> list[GpuProcess]:
        """Processes of the newest frame (all GPUs, or one), by GPU then pid."""
        return [p for p in self._processes if gpu is None or p.gpu_index == gpu]

    def events(self) -> list[EventRow]:
        """Recent events of the host, newest first."""
        return list(self._events)

    # ---- IngestSink ----

    def on_frame(self, frame: Frame) -> None:
        """Append the selected host's frame: one point per GPU, processes, events."""
        if frame.host != self._host:
            return
        ts = frame.ts_unix_ns / 1e9
        values = frame.gpu_values
        for i, gpu in enumerate(frame.gpu_index):
            g = self._gpu(gpu)
            if i < len(frame.gpu_state):
                g.state = frame.gpu_state[i]
            if frame.ts_unix_ns <= g.last_ts_ns or i >= values.shape[0]:
                continue  # duplicate delivery, or older than what is held
            row = np.empty(1 + len(self._cols))
            row[0] = ts
            row[1:] = values[i, self._cols]
            g.ring.append(row)
            g.last_ts_ns = frame.ts_unix_ns
        self._processes = sorted(frame.processes, key=lambda p: (p.gpu_index, p.pid))
        for ev in sorted(frame.events, key=lambda e: e.ts_unix_ns):
            self._events.appendleft(EventRow.from_event(frame.host, ev))
        self._simulated = frame.simulated
        self._last_frame_ns = max(self._last_frame_ns, frame.ts_unix_ns)
        self._version += 1

    def on_frames(self, frames: Iterable[Frame]) -> None:
        """Batch form of `on_frame`."""
        for f in frames:
            self.on_frame(f)

    # ---- history ----

    def fetch_history(self, host: str, until_ns: int | None = None) -> HostHistory:
        """Read the host's last `window_s` of samples and its newest events. I/O: safe on a worker.

        The window ends at `until_ns`, or at the host's newest stored sample when None (so a
        host that went quiet still shows its last minutes).
        """
        if self._query is None:
            return HostHistory(host, {}, {})
        cols = ", ".join(self._metrics)
        if until_ns is None:
            end_sql = "(SELECT max(ts) FROM gpu_samples WHERE host = ?)"
            end_params: list[object] = [host]
        else:
            end_sql = "make_timestamptz(?::BIGINT)"
            end_params = [until_ns // 1000]
        rows = self._query(
            f"WITH w AS (SELECT {end_sql} AS t1) "
            f"SELECT gpu_index, epoch_ns(ts), CAST(gpu_state AS VARCHAR), {cols} FROM gpu_samples, w "
            "WHERE host = ? AND ts <= w.t1 AND ts > w.t1 - to_microseconds(?::BIGINT) "
            "QUALIFY row_number() OVER (PARTITION BY gpu_index ORDER BY ts DESC) <= ? "
            "ORDER BY gpu_index, ts",
            [*end_params, host, int(self._window_s * 1e6), self._capacity],
        )
        per_gpu: dict[int, list[list[float]]] = {}
        states: dict[int, int] = {}
        for gpu, ts_ns, state, *vals in rows:
            g = int(gpu)
            per_gpu.setdefault(g, []).append([int(ts_ns) / 1e9, *(np.nan if v is None else float(v) for v in vals)])
            states[g] = _state_code(state)
        arrays = {g: np.asarray(v, dtype=np.float64).reshape(-1, 1 + len(self._metrics)) for g, v in per_gpu.items()}
        ev_rows = self._query(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE host = ? ORDER BY ts DESC LIMIT ?",
            [host, self._events.maxlen or 0],
        )
        return HostHistory(host, arrays, states, [event_row_from_db(r) for r in ev_rows])

    def apply_history(self, hist: HostHistory) -> bool:
        """Merge fetched history under the live points (GUI thread); False if the host changed since."""
        if hist.host != self._host:
            return False
        for gpu, raw in hist.rows.items():
            g = self._gpu(gpu)
            current = g.ring.array()
            if len(current):
                raw = raw[raw[:, 0] < current[0, 0] - STORE_RESOLUTION_S]
                merged = np.concatenate((raw, current))
            else:
                merged = raw
                if raw.size:
                    g.last_ts_ns = stored_ns_ceiling(float(raw[-1, 0]))
            g.ring.replace(merged)
            if g.state == 0:
                g.state = hist.states.get(gpu, 0)
        held = {event_key(e) for e in self._events}
        oldest_live = min((e.ts_ns for e in self._events), default=None)
        older = [e for e in hist.events if event_key(e) not in held and (oldest_live is None or e.ts_ns <= oldest_live)]
        room = (self._events.maxlen or 0) - len(self._events)
        self._events.extend(older[: max(room, 0)])
        self._history_loaded = True
        self._version += 1
        return True

    def load_history(self) -> bool:
        """Fetch and apply for the selected host in one blocking call (headless use and tests)."""
        if self._host is None:
            return False
        return self.apply_history(self.fetch_history(self._host))

    def _gpu(self, gpu: int) -> _Gpu:
        g = self._gpus.get(gpu)
        if g is None:
            g = self._gpus[gpu] = _Gpu(RingBuffer(self._capacity, 1 + len(self._metrics)))
        return g


def _state_code(state: object) -> int:
    if isinstance(state, int):
        return state
    s = str(state or "").strip().lower()
    if s.isdigit():
        return int(s)
    return _STATE_BY_NAME.get(s, 0)
