"""Fleet view model: the latest value of every GPU of every host, for the heatmap and status history.

Qt-free (napari style): `console.ui.qt_heatmap.QtFleetHeatmap` and `console.ui.qt_timeline.QtHostTimeline`
draw it. The `on_*` methods mirror `console.ingest.sink.IngestSink` but are called on the GUI
thread by `console.ui.bridge.QtIngestBridge`, in batches, so the model takes no locks.

Storage is preallocated: host *slots* are assigned once per host in arrival order and never
move; the display order is a separate permutation (`order()`) recomputed only when the sort
inputs change. Widgets poll `version` on a timer and redraw only when it moved.

Colors are never stale: a host that is not live (disconnected, rejected, paused, still
connecting, lagging, or silent for `stale_after_s`) and a GPU reported lost are returned as
NaN with `grey=True`, whatever their last value was.

Job/rank of a GPU (kept simple on purpose): the training SDK reports `local_rank` per process,
and ranks are launched one per GPU, so GPU *i* of host *h* belongs to the job whose latest
record from *h* carries `local_rank == i`, with that record's global `rank`. A mapping not
refreshed for `job_ttl_s` is dropped (the job ended or moved).
"""

from __future__ import annotations

import logging
import math
import re
import time
import types
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, TypedDict

import numpy as np
import numpy.typing as npt

from console.ingest.sink import CONNECTED, CONNECTING, GAP, LAGGING, STATES, HostStatus
from console.models.timeline import DEFAULT_BUCKET_NS, DEFAULT_BUCKETS, HostTimeline
from protos.types import GPU_LOST, GPU_STATE_NAMES, METRIC_INDEX, N_METRICS, Description, Frame, Gap

log = logging.getLogger("gpusoc.console.models")

# States whose hosts show colors. Everything else (and a host silent for stale_after_s) is grey.
LIVE_STATES: Final = frozenset({CONNECTED, GAP})
NO_STATUS: Final = "unknown"  # a host seen only through frames or a description so far

SORT_HOST: Final = "host"
SORT_JOB: Final = "job"
SORT_VALUE: Final = "value"
SORT_MODES: Final = (SORT_HOST, SORT_JOB, SORT_VALUE)

NO_JOB_LABEL: Final = "(no job)"


@dataclass(frozen=True, slots=True)
class MetricScale:
    """Fixed color scale of one metric: the same color means the same value on every host, always.

    `reduce` is how the status history folds a host's GPUs into one value: "mean" for levels,
    "max" for counters and flags, where a mean would hide the one bad GPU.
    """

    lo: float
    hi: float
    unit: str
    label: str
    reduce: str = "mean"


# One entry per METRIC_NAMES; tests check they agree.
METRIC_SCALES: Final[dict[str, MetricScale]] = {
    "gpu_util_pct": MetricScale(0.0, 100.0, "%", "GPU utilisation"),
    "mem_util_pct": MetricScale(0.0, 100.0, "%", "Memory bandwidth utilisation"),
    "mem_used_mib": MetricScale(0.0, 81920.0, "MiB", "Memory used"),
    "mem_total_mib": MetricScale(0.0, 81920.0, "MiB", "Memory total"),
    "temp_c": MetricScale(20.0, 95.0, "°C", "Temperature"),
    "power_w": MetricScale(0.0, 750.0, "W", "Power"),
    "power_limit_w": MetricScale(0.0, 750.0, "W", "Power limit"),
    "sm_clock_mhz": MetricScale(0.0, 2100.0, "MHz", "SM clock"),
    "mem_clock_mhz": MetricScale(0.0, 3000.0, "MHz", "Memory clock"),
    "throttle_reasons": MetricScale(0.0, 256.0, "bitmask", "Throttle reasons", "max"),
    "ecc_corrected": MetricScale(0.0, 100.0, "errors", "ECC corrected", "max"),
    "ecc_uncorrected": MetricScale(0.0, 1.0, "errors", "ECC uncorrected", "max"),
    "retired_pages": MetricScale(0.0, 64.0, "pages", "Retired pages", "max"),
    "remap_failure": MetricScale(0.0, 1.0, "flag", "Row-remap failure", "max"),
    "pcie_tx_kbs": MetricScale(0.0, 64_000_000.0, "KB/s", "PCIe TX"),
    "pcie_rx_kbs": MetricScale(0.0, 64_000_000.0, "KB/s", "PCIe RX"),
}

DEFAULT_METRIC: Final = "gpu_util_pct"


class Emitter:
    """A minimal observer list (the idea of napari's EventedModel events, without pydantic or Qt).

    Bound methods are held weakly, so a closed widget never keeps a model alive or gets called
    after its C++ side is gone. A failing callback is logged and does not starve the others.
    """

    __slots__ = ("_callbacks", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._callbacks: list[Callable[..., Any] | weakref.WeakMethod[Any]] = []

    def connect(self, callback: Callable[..., Any]) -> Callable[..., Any]:
        """Call `callback(*args)` on every emit; returns it, so it can be used as a decorator."""
        ref: Callable[..., Any] | weakref.WeakMethod[Any]
        ref = weakref.WeakMethod(callback) if isinstance(callback, types.MethodType) else callback
        self._callbacks.append(ref)
        return callback

    def disconnect(self, callback: Callable[..., Any]) -> None:
        """Stop calling `callback`; unknown callbacks are ignored."""
        self._callbacks = [c for c in self._callbacks if self._resolve(c) not in (callback, None)]

    def __len__(self) -> int:
        return sum(1 for c in self._callbacks if self._resolve(c) is not None)

    @staticmethod
    def _resolve(ref: Callable[..., Any] | weakref.WeakMethod[Any]) -> Callable[..., Any] | None:
        if isinstance(ref, weakref.WeakMethod):
            target: Callable[..., Any] | None = ref()
            return target
        return ref

    def emit(self, *args: Any) -> None:
        """Call every live callback in connection order."""
        dead = False
        for ref in list(self._callbacks):
            cb = self._resolve(ref)
            if cb is None:
                dead = True
                continue
            try:
                cb(*args)
            except Exception:
                log.exception("callback for %s event failed", self.name)
        cb = None  # a logged traceback keeps this frame alive: do not let it pin the last callback
        if dead:
            self._callbacks = [c for c in self._callbacks if self._resolve(c) is not None]


class ModelEvents:
    """The model's events, one Emitter each (napari's `model.events.<name>`)."""

    __slots__ = ("hosts", "metric", "selection", "sort")

    def __init__(self) -> None:
        self.selection = Emitter("selection")  # (host: str | None, gpu: int | None)
        self.metric = Emitter("metric")  # (metric: str)
        self.sort = Emitter("sort")  # (mode: str)
        self.hosts = Emitter("hosts")  # (n_hosts: int) a host row was added or renamed


@dataclass(slots=True)
class _GpuJob:
    job: str
    rank: int
    seen_ns: int  # console clock when a record last confirmed it


class _Layout(NamedTuple):
    gpu_index: list[int]  # the frame's gpu_index list this was computed for
    cols: slice | npt.NDArray[np.intp]  # heatmap columns of the frame's rows
    n: int  # rows of gpu_values used


class FleetImage(NamedTuple):
    """One frame of the heatmap, rows in display order, columns = GPU index.

    values: float32 [rows, cols], NaN wherever no color may be shown.
    grey:   no live data (host offline/stale, or GPU lost): draw grey, never the last value.
    na:     host is live but the metric is not available for that GPU (NaN from the agent).
    absent: the host has no GPU at that index (fewer GPUs than the widest host).
    """

    values: npt.NDArray[np.float32]
    grey: npt.NDArray[np.bool_]
    na: npt.NDArray[np.bool_]
    absent: npt.NDArray[np.bool_]
    version: int


class TimelineImage(NamedTuple):
    """The status history: values/grey as [rows, buckets], oldest bucket first; rows as in `order()`."""

    values: npt.NDArray[np.float32]
    grey: npt.NDArray[np.bool_]
    head_ns: int  # start time of the newest bucket
    bucket_ns: int


class RowGroup(NamedTuple):
    """Consecutive display rows sharing one job (sort mode "job")."""

    label: str
    start: int
    n_rows: int


class CellInfo(TypedDict):
    """What a tooltip or drilldown needs about one cell."""

    host: str
    gpu: int
    value: float | None  # None when not available or not live (see `state`, `last_value`)
    unit: str
    label: str
    job: str | None
    rank: int | None
    state: str  # connection state of the host ("stale" when silent for stale_after_s)
    gpu_state: str
    last_value: float | None  # the last received value, even when greyed out
    age_s: float | None  # seconds since the last frame of this host arrived
    simulated: bool
    address: str
    detail: str


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key so that gpu-2 comes before gpu-10, as operators read host names."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in _DIGITS.split(name) if p)


class FleetModel:
    """Latest per-GPU values of the whole fleet, connection states, jobs, and one metric's history.

    Not thread-safe by design: everything runs on the GUI thread (the bridge batches ingest
    calls there). `clock` returns unix ns and is injectable for tests.
    """

    def __init__(self, max_hosts: int = 2048, max_gpus: int = 8, history_buckets: int = DEFAULT_BUCKETS,
                 bucket_ns: int = DEFAULT_BUCKET_NS, metric: str = DEFAULT_METRIC, sort: str = SORT_HOST,
                 stale_after_s: float = 5.0, job_ttl_s: float = 300.0,
                 clock: Callable[[], int] = time.time_ns) -> None:
        if metric not in METRIC_INDEX:
            raise ValueError(f"unknown metric {metric!r}")
        if sort not in SORT_MODES:
            raise ValueError(f"unknown sort mode {sort!r}")
        self.events = ModelEvents()
        self._clock = clock
        self._metric = metric
        self._sort = sort
        self.stale_after_ns = int(stale_after_s * 1e9)
        self.job_ttl_ns = int(job_ttl_s * 1e9)
        cap_h, cap_g = max(1, max_hosts), max(1, max_gpus)
        self._values = np.full((cap_h, cap_g, N_METRICS), np.nan, dtype=np.float32)
        self._gpu_state = np.zeros((cap_h, cap_g), dtype=np.uint8)
        self._present = np.zeros((cap_h, cap_g), dtype=bool)
        self._last_ns = np.zeros(cap_h, dtype=np.int64)  # console clock at the last frame's arrival
        self._frame_ts = np.zeros(cap_h, dtype=np.int64)  # the agent's timestamp of that frame
        self._live_ns = np.zeros(cap_h, dtype=np.int64)  # console clock when the state last became live
        self._simulated = np.zeros(cap_h, dtype=bool)
        self._offline = np.ones(cap_h, dtype=bool)  # by connection state
        self._stale = np.zeros(cap_h, dtype=bool)  # live state but silent for stale_after_s
        self._hosts: list[str] = []
        self._slot: dict[str, int] = {}
        self._state: list[str] = []
        self._detail: list[str] = []
        self._address: list[str] = []
        self._gaps: list[int] = []
        self._jobs: list[dict[int, _GpuJob]] = []  # per slot: GPU index -> job on it
        self._layout: list[_Layout] = []  # per slot: the gpu_index list last seen -> columns
        self._gpu_state_seen: list[list[int]] = []  # per slot: the last gpu_state list copied
        self._addr_host: dict[str, str] = {}
        self._descriptions: dict[str, Description] = {}
        self._n_cols = 0
        self._next_expiry_ns = 0
        self._next_bucket_ns = 0  # on_frame advances the history only when the clock passes this
        self._name_order: npt.NDArray[np.intp] = np.zeros(0, dtype=np.intp)  # slots by natural host name
        self._name_rank: npt.NDArray[np.intp] = np.zeros(0, dtype=np.intp)  # slot -> position in that order
        self._names_key = -1
        self.timeline = HostTimeline(cap_h, history_buckets, bucket_ns)
        self._selection: tuple[str, int] | None = None
        self._order: npt.NDArray[np.intp] = np.zeros(0, dtype=np.intp)
        self._order_key: tuple[int, ...] | None = None
        self._groups: list[RowGroup] = []
        self.version = 0  # bumped on every visible change: widgets redraw when it moved
        self.layout_version = 0  # bumped when row order, row labels or the column count changed
        self._structure = 0  # inputs of the host/job sort (hosts, jobs, sort mode)
        self.timeline.advance(self._clock(), self._offline)

    # ---- properties -------------------------------------------------------------------------

    @property
    def metric(self) -> str:
        """The metric shown by the heatmap and buffered by the status history."""
        return self._metric

    @property
    def scale(self) -> MetricScale:
        """Fixed color scale of the current metric."""
        return METRIC_SCALES[self._metric]

    @property
    def sort(self) -> str:
        """Current row order: one of SORT_MODES."""
        return self._sort

    @property
    def n_hosts(self) -> int:
        """Host rows (every host ever seen, live or not)."""
        return len(self._hosts)

    @property
    def n_gpus(self) -> int:
        """Heatmap columns: the largest GPU index seen + 1."""
        return self._n_cols

    @property
    def hosts(self) -> list[str]:
        """Hosts in slot (arrival) order; see `order()` for display order."""
        return list(self._hosts)

    @property
    def selection(self) -> tuple[str, int] | None:
        """(host, gpu) selected for drilldown, or None."""
        return self._selection

    @property
    def any_simulated(self) -> bool:
        """True if any host's latest data is simulated: the UI must say so, prominently."""
        n = len(self._hosts)
        return bool(self._simulated[:n].any())

    @property
    def n_simulated(self) -> int:
        """Hosts whose latest data is simulated (for the badge's tooltip)."""
        return int(self._simulated[: len(self._hosts)].sum())

    def is_simulated(self, host: str) -> bool:
        """Whether this host's latest frame or description was flagged simulated."""
        slot = self._slot.get(host)
        return slot is not None and bool(self._simulated[slot])

    def state(self, host: str) -> str:
        """Connection state as last reported by ingest (NO_STATUS if none yet)."""
        slot = self._slot.get(host)
        return NO_STATUS if slot is None else self._state[slot]

    def state_counts(self) -> dict[str, int]:
        """Hosts per connection state for the status bar; live hosts gone silent count as lagging."""
        counts: Counter[str] = Counter()
        for slot, st in enumerate(self._state):
            counts[LAGGING if st in LIVE_STATES and self._stale[slot] else st] += 1
        return {s: counts.get(s, 0) for s in (*STATES, NO_STATUS) if counts.get(s, 0) or s in STATES}

    # ---- IngestSink mirror (GUI thread) -------------------------------------------------------

    def on_description(self, address: str, desc: Description) -> None:
        """An agent (re)connected and described itself: name its row, pre-create its GPU columns."""
        prev = self._addr_host.get(address)
        if prev is not None and prev != desc.host and desc.host not in self._slot and prev in self._slot:
            self._rename(prev, desc.host)
        self._addr_host[address] = desc.host
        slot = self._ensure(desc.host)
        self._address[slot] = address
        self._descriptions[desc.host] = desc
        self._simulated[slot] = desc.simulated
        for gpu in desc.gpus:
            if gpu.index >= 0:
                self._ensure_cols(gpu.index + 1)
                if not self._present[slot, gpu.index]:
                    self._present[slot, gpu.index] = True
                    self._bump()
        self._bump()

    def on_frame(self, frame: Frame) -> None:
        """Copy the frame's values into the host's slot; update its jobs and the status history.

        The hot path of the console (one call per host per tick): a few slice assignments, no
        per-GPU Python loop unless the host's GPU layout changed.
        """
        now = self._clock()
        slot = self._slot.get(frame.host)
        if slot is None:
            slot = self._ensure(frame.host)
        layout = self._layout[slot]
        if frame.gpu_index != layout.gpu_index:
            layout = self._set_layout(slot, frame)
        values, cols, n = frame.gpu_values, layout.cols, layout.n
        if n:
            if values.shape[1] == N_METRICS:
                self._values[slot, cols] = values[:n]
            else:  # a schema with fewer/more columns: copy what both know
                m = min(values.shape[1], N_METRICS)
                self._values[slot, cols, :m] = values[:n, :m]
            if frame.gpu_state != self._gpu_state_seen[slot]:
                self._gpu_state[slot, cols] = frame.gpu_state[:n]
                self._gpu_state_seen[slot] = list(frame.gpu_state)
        self._simulated[slot] = frame.simulated
        self._last_ns[slot] = now
        self._frame_ts[slot] = frame.ts_unix_ns
        state = self._state[slot]
        if state in (NO_STATUS, CONNECTING):
            self._set_state(slot, CONNECTED, "")
        if self._stale[slot]:
            self._stale[slot] = False
            self.timeline.mark_grey(slot, bool(self._offline[slot]))
        if frame.train:
            self._apply_train(slot, frame, now)
        if now >= self._next_bucket_ns:
            self.timeline.advance(now, self._grey_hosts())
            self._next_bucket_ns = ((self.timeline.head or 0) + 1) * self.timeline.bucket_ns
        if n:
            self.timeline.put(slot, min(frame.ts_unix_ns, now), self._reduce(frame, n))
        self.version += 1

    def _set_layout(self, slot: int, frame: Frame) -> _Layout:
        """The host's GPU indexes changed (first frame, GPU added or gone): recompute its columns."""
        index = list(frame.gpu_index)
        n = min(len(index), int(frame.gpu_values.shape[0]) if frame.gpu_values.ndim == 2 else 0)
        index = index[:n]
        cols: slice | npt.NDArray[np.intp]
        if index == list(range(n)):
            cols = slice(0, n)
        elif n and min(index) >= 0 and len(set(index)) == n:
            cols = np.asarray(index, dtype=np.intp)
        else:  # unusable indexes: use positions
            cols = slice(0, n)
            index = list(range(n))
        width = (max(index) + 1) if index else 0
        self._ensure_cols(width)
        present = np.zeros(self._values.shape[1], dtype=bool)
        present[cols] = True
        self._present[slot] = present
        self._values[slot, ~present] = np.nan
        self._gpu_state[slot, ~present] = 0
        self._gpu_state_seen[slot] = []
        layout = _Layout(list(frame.gpu_index), cols, n)
        self._layout[slot] = layout
        self._structure += 1
        return layout

    def on_gap(self, host: str, gap: Gap) -> None:
        """Counted for the tooltip; the connection state (GAP) arrives through on_status."""
        slot = self._ensure(host)
        self._gaps[slot] += 1
        self._bump()

    def on_status(self, status: HostStatus) -> None:
        """Connection state changed: offline hosts turn grey at once, in the heatmap and the history."""
        host = self._addr_host.get(status.address) or status.host
        if status.address and status.address not in self._addr_host:
            self._addr_host[status.address] = host
        slot = self._ensure(host)
        self._address[slot] = status.address
        self._set_state(slot, status.state, status.detail)
        self._bump()

    # ---- controls -----------------------------------------------------------------------------

    def set_metric(self, metric: str) -> None:
        """Show another metric. The status history restarts: only one metric is buffered."""
        if metric not in METRIC_INDEX:
            raise ValueError(f"unknown metric {metric!r}")
        if metric == self._metric:
            return
        self._metric = metric
        self.timeline.clear()
        self._structure += 1
        self._bump()
        self.events.metric.emit(metric)

    def set_sort(self, mode: str) -> None:
        """Order rows by host name, by job (grouped), or by the current value (hottest first)."""
        if mode not in SORT_MODES:
            raise ValueError(f"unknown sort mode {mode!r}")
        if mode == self._sort:
            return
        self._sort = mode
        self._structure += 1
        self._bump()
        self.events.sort.emit(mode)

    def select(self, row: int | None, col: int | None = None) -> None:
        """Select a cell for drilldown (None clears); emits events.selection(host, gpu)."""
        if row is None or col is None or not (0 <= row < self.n_hosts) or not (0 <= col < self._n_cols):
            new: tuple[str, int] | None = None
        else:
            new = (self.row_host(row), int(col))
        if new == self._selection:
            return
        self._selection = new
        self._bump()
        self.events.selection.emit(*(new if new is not None else (None, None)))

    def select_host(self, host: str, gpu: int) -> None:
        """Select by name (e.g. from an alert); ignored for unknown hosts."""
        if host in self._slot:
            self.select(self.host_row(host), gpu)

    def advance(self, now_ns: int | None = None) -> bool:
        """Time passes without frames: scroll the history, grey out silent hosts, expire job mappings.

        Called by the views' redraw timer; cheap when nothing changed. Returns whether anything did.
        """
        now = self._clock() if now_ns is None else now_ns
        n = len(self._hosts)
        changed = False
        if n:
            seen = np.maximum(self._last_ns[:n], self._live_ns[:n])
            stale = (~self._offline[:n]) & (seen > 0) & (now - seen > self.stale_after_ns)
            diff = np.flatnonzero(stale != self._stale[:n])
            if len(diff):
                self._stale[:n] = stale
                for slot in diff:
                    self.timeline.mark_grey(int(slot), bool(stale[slot]) or bool(self._offline[slot]))
                changed = True
            if now >= self._next_expiry_ns:
                self._next_expiry_ns = now + min(self.job_ttl_ns, 1_000_000_000)
                if self._expire_jobs(now - self.job_ttl_ns):
                    changed = True
        if self.timeline.advance(now, self._grey_hosts()):
            changed = True
        self._next_bucket_ns = ((self.timeline.head or 0) + 1) * self.timeline.bucket_ns
        if changed:
            self._bump()
        return changed

    # ---- queries ----------------------------------------------------------------------------

    def order(self) -> npt.NDArray[np.intp]:
        """Host slots in display order; recomputed only when the sort's inputs changed."""
        key: tuple[int, ...] = (self._structure, len(self._hosts))
        if self._sort == SORT_VALUE:
            key = (*key, self.version)
        if key == self._order_key:
            return self._order
        n = len(self._hosts)
        groups: list[RowGroup] = []
        by_name, name_rank = self._names()
        if self._sort == SORT_HOST:
            order = by_name
        elif self._sort == SORT_JOB:
            jobs = [self._primary_job(s) for s in range(n)]
            order = np.asarray(sorted(range(n), key=lambda s: (jobs[s] is None, jobs[s] or "", int(name_rank[s]))),
                               dtype=np.intp)
            for s in order:
                label = jobs[s] or NO_JOB_LABEL
                if groups and groups[-1].label == label:
                    groups[-1] = groups[-1]._replace(n_rows=groups[-1].n_rows + 1)
                else:
                    start = groups[-1].start + groups[-1].n_rows if groups else 0
                    groups.append(RowGroup(label, start, 1))
        else:
            mi = METRIC_INDEX[self._metric]
            grey = self._grey_hosts()[:n]
            vals = self._values[:n, :, mi]
            has = ~np.isnan(vals).all(axis=1) & ~grey if n else np.zeros(0, dtype=bool)
            peak = np.full(n, -np.inf)
            if has.any():
                peak[has] = np.nanmax(vals[has], axis=1)
            order = np.lexsort((name_rank, -peak)).astype(np.intp)
        self._order_key = key
        if not np.array_equal(order, self._order) or groups != self._groups:
            self._order = order
            self._groups = groups
            self.layout_version += 1
        return self._order

    def _names(self) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        if self._names_key != self._structure:
            n = len(self._hosts)
            by_name = np.asarray(sorted(range(n), key=lambda s: natural_key(self._hosts[s])), dtype=np.intp)
            rank = np.empty(n, dtype=np.intp)
            rank[by_name] = np.arange(n, dtype=np.intp)
            self._name_order, self._name_rank, self._names_key = by_name, rank, self._structure
        return self._name_order, self._name_rank

    def groups(self) -> list[RowGroup]:
        """Job groups of the current order (empty unless sorting by job)."""
        self.order()
        return list(self._groups)

    def row_host(self, row: int) -> str:
        """Host shown at display row `row`."""
        return self._hosts[int(self.order()[row])]

    def host_row(self, host: str) -> int:
        """Display row of `host` (KeyError if unknown)."""
        slot = self._slot[host]
        return int(np.flatnonzero(self.order() == slot)[0])

    def row_labels(self) -> list[str]:
        """Host names in display order."""
        return [self._hosts[int(s)] for s in self.order()]

    def image(self) -> FleetImage:
        """The heatmap matrix for setImage: float32 [rows, gpus] of the current metric, plus masks."""
        order = self.order()
        cols = self._n_cols
        mi = METRIC_INDEX[self._metric]
        values = np.ascontiguousarray(self._values[order, :cols, mi])
        absent = ~self._present[order, :cols]
        grey = (self._grey_hosts()[order][:, None] | (self._gpu_state[order, :cols] == GPU_LOST)) & ~absent
        values[grey | absent] = np.nan
        na = np.isnan(values) & ~grey & ~absent
        return FleetImage(values, grey, na, absent, self.version)

    def timeline_image(self) -> TimelineImage:
        """The status history in the heatmap's row order."""
        values, grey = self.timeline.matrix(self.order())
        head = self.timeline.head or 0
        return TimelineImage(values, grey, head * self.timeline.bucket_ns, self.timeline.bucket_ns)

    def cell_info(self, row: int, col: int) -> CellInfo:
        """Everything a tooltip shows about one cell (IndexError outside the grid)."""
        if not (0 <= row < self.n_hosts) or not (0 <= col < self._n_cols):
            raise IndexError(f"cell ({row}, {col}) outside {self.n_hosts} x {self._n_cols}")
        slot = int(self.order()[row])
        host = self._hosts[slot]
        sc = self.scale
        raw = float(self._values[slot, col, METRIC_INDEX[self._metric]])
        last = None if math.isnan(raw) else raw
        gpu_state = int(self._gpu_state[slot, col])
        live = not self._grey_hosts()[slot] and gpu_state != GPU_LOST and bool(self._present[slot, col])
        gj = self._jobs[slot].get(int(col))
        state = self._state[slot]
        if state in LIVE_STATES and self._stale[slot]:
            state = "stale"
        age = (self._clock() - int(self._last_ns[slot])) / 1e9 if self._last_ns[slot] else None
        return CellInfo(
            host=host, gpu=int(col), value=last if live else None, unit=sc.unit, label=sc.label,
            job=None if gj is None else gj.job, rank=None if gj is None else gj.rank, state=state,
            gpu_state=GPU_STATE_NAMES.get(gpu_state, "unknown") if self._present[slot, col] else "absent",
            last_value=last, age_s=age, simulated=bool(self._simulated[slot]), address=self._address[slot],
            detail=self._detail[slot],
        )

    def host_job(self, host: str) -> str | None:
        """The job most of this host's GPUs belong to (what "sort by job" groups on)."""
        slot = self._slot.get(host)
        return None if slot is None else self._primary_job(slot)

    def gpu_job(self, host: str, gpu: int) -> tuple[str, int] | None:
        """(job_id, rank) running on that GPU, or None."""
        slot = self._slot.get(host)
        gj = None if slot is None else self._jobs[slot].get(gpu)
        return None if gj is None else (gj.job, gj.rank)

    def latest(self, host: str) -> npt.NDArray[np.float32] | None:
        """The host's latest [gpus, N_METRICS] values (a copy), e.g. for a drilldown's first paint."""
        slot = self._slot.get(host)
        return None if slot is None else self._values[slot, : self._n_cols].copy()

    # ---- internals ----------------------------------------------------------------------------

    def _bump(self) -> None:
        self.version += 1

    def _grey_hosts(self) -> npt.NDArray[np.bool_]:
        return self._offline | self._stale

    def _set_state(self, slot: int, state: str, detail: str) -> None:
        self._state[slot] = state
        self._detail[slot] = detail
        offline = state not in LIVE_STATES
        if offline != bool(self._offline[slot]):
            self._offline[slot] = offline
            if not offline:  # a fresh grace period before "silent" applies
                self._live_ns[slot] = self._clock()
                self._stale[slot] = False
        self.timeline.mark_grey(slot, offline or bool(self._stale[slot]))

    def _ensure(self, host: str) -> int:
        slot = self._slot.get(host)
        if slot is not None:
            return slot
        slot = len(self._hosts)
        if slot >= self._values.shape[0]:
            self._grow_hosts(2 * self._values.shape[0])
        self._hosts.append(host)
        self._slot[host] = slot
        self._state.append(NO_STATUS)
        self._detail.append("")
        self._address.append("")
        self._gaps.append(0)
        self._jobs.append({})
        self._layout.append(_Layout([], slice(0, 0), 0))
        self._gpu_state_seen.append([])
        self._offline[slot] = True
        self._structure += 1
        self.events.hosts.emit(len(self._hosts))
        return slot

    def _rename(self, old: str, new: str) -> None:
        slot = self._slot.pop(old)
        self._hosts[slot] = new
        self._slot[new] = slot
        self._structure += 1
        if self._selection is not None and self._selection[0] == old:
            self._selection = (new, self._selection[1])
        self.events.hosts.emit(len(self._hosts))

    def _grow_hosts(self, cap: int) -> None:
        def grow(a: npt.NDArray[Any], fill: Any) -> npt.NDArray[Any]:
            out = np.full((cap, *a.shape[1:]), fill, dtype=a.dtype)
            out[: a.shape[0]] = a
            return out

        self._values = grow(self._values, np.nan)
        self._gpu_state = grow(self._gpu_state, 0)
        self._present = grow(self._present, False)
        self._last_ns = grow(self._last_ns, 0)
        self._frame_ts = grow(self._frame_ts, 0)
        self._live_ns = grow(self._live_ns, 0)
        self._simulated = grow(self._simulated, False)
        self._offline = grow(self._offline, True)
        self._stale = grow(self._stale, False)
        self.timeline.grow(cap)

    def _ensure_cols(self, n: int) -> None:
        if n > self._values.shape[1]:
            cap = max(n, 2 * self._values.shape[1])
            h = self._values.shape[0]

            def widen(a: npt.NDArray[Any], fill: Any) -> npt.NDArray[Any]:
                out = np.full((h, cap, *a.shape[2:]), fill, dtype=a.dtype)
                out[:, : a.shape[1]] = a
                return out

            self._values = widen(self._values, np.nan)
            self._gpu_state = widen(self._gpu_state, 0)
            self._present = widen(self._present, False)
        if n > self._n_cols:
            self._n_cols = n
            self.layout_version += 1

    def _apply_train(self, slot: int, frame: Frame, now: int) -> None:
        jobs = self._jobs[slot]
        changed = False
        for rec in frame.train:  # records arrive in order: the last one per local rank wins
            lr = rec.local_rank
            if lr < 0 or not rec.job_id:
                continue
            gj = jobs.get(lr)
            if gj is None:
                jobs[lr] = _GpuJob(rec.job_id, rec.rank, now)
                changed = True
            else:
                if gj.job != rec.job_id or gj.rank != rec.rank:
                    gj.job, gj.rank = rec.job_id, rec.rank
                    changed = True
                gj.seen_ns = now
        if changed:
            self._structure += 1

    def _expire_jobs(self, cutoff_ns: int) -> bool:
        removed = False
        for jobs in self._jobs:
            if jobs and any(gj.seen_ns < cutoff_ns for gj in jobs.values()):
                for gpu in [g for g, gj in jobs.items() if gj.seen_ns < cutoff_ns]:
                    del jobs[gpu]
                removed = True
        if removed:
            self._structure += 1
        return removed

    def _primary_job(self, slot: int) -> str | None:
        jobs = self._jobs[slot]
        if not jobs:
            return None
        counts = Counter(gj.job for gj in jobs.values())
        best = max(counts.values())
        return min(j for j, c in counts.items() if c == best)

    def _reduce(self, frame: Frame, n: int) -> float:
        """The host's value for the status history, from the frame's own row (plain Python: 8 floats)."""
        col = frame.gpu_values[:n, METRIC_INDEX[self._metric]].tolist()
        ok = [v for v, st in zip(col, frame.gpu_state, strict=False) if v == v and st != GPU_LOST]
        if not ok:
            return math.nan
        return max(ok) if self.scale.reduce == "max" else sum(ok) / len(ok)
