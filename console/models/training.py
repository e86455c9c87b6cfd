"""Training-loop view model: per job, per rank series of loss, grad norm, step time and throughput.

Qt-free (napari style): `console.ui.qt_training.QtTrainingView` draws it. Live records arrive via
`on_frame` on the GUI thread; history comes from the store through an injected `Query`, split into
`fetch_history` (I/O, safe on a worker thread, touches no model state) and `apply_history` (GUI
thread), so the GUI thread never waits on DuckDB.

Definitions used by every panel and by `docs/ui-panels.md`:

* step time: seconds per step between two consecutive "log" records of one rank,
  ``(ts - ts_prev) / (step - step_prev)``; NaN for the first record and whenever the step does
  not increase (restart from a checkpoint, duplicate). A record without a step (``step == -1``)
  counts as the step after the previous one.
* throughput: tokens per second, ``tokens / step_time``. The SDK's ``tokens`` is the number of
  tokens in one step, so this holds even when a job logs only every k-th step.
* straggler: a rank whose median step time over its last ``window`` points exceeds the job's
  median step time (the median of the per-rank medians) by more than ``threshold`` (20 %).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from protos.types import Frame, TrainRecord

# The store's read side, injected by the composition root: (sql, params) -> rows as tuples.
# Implementations must be callable from a worker thread (e.g. a fresh `con.cursor()` per call).
Query = Callable[[str, list[object]], list[tuple[Any, ...]]]

DEFAULT_CAPACITY: Final = 2000
STORE_RESOLUTION_S: Final = 1e-6  # TIMESTAMPTZ keeps microseconds
STRAGGLER_WINDOW: Final = 50  # points per rank
STRAGGLER_THRESHOLD: Final = 0.20  # 20 % slower than the job median
STRAGGLER_MIN_POINTS: Final = 5  # a rank needs this many finite step times to be judged

# Columns of a rank's ring buffer.
COL_TS: Final = 0  # unix seconds (float64)
COL_STEP: Final = 1
COL_LOSS: Final = 2
COL_GRAD_NORM: Final = 3
COL_TOKENS: Final = 4
COL_STEP_TIME: Final = 5
COL_THROUGHPUT: Final = 6
N_COLS: Final = 7
_RAW_COLS: Final = 5  # ts, step, loss, grad_norm, tokens: what the derived columns are computed from

SERIES_NAMES: Final[tuple[str, ...]] = ("loss", "grad_norm", "step_time", "throughput")
_SERIES_COL: Final[dict[str, int]] = {
    "loss": COL_LOSS,
    "grad_norm": COL_GRAD_NORM,
    "step_time": COL_STEP_TIME,
    "throughput": COL_THROUGHPUT,
}


class RingBuffer:
    """Fixed-capacity float64 rows, allocated once; the oldest rows are overwritten.

    Live telemetry never stops, so every per-series store in the console models is bounded and
    never reallocates on the hot path.
    """

    __slots__ = ("_data", "_head", "_len")

    def __init__(self, capacity: int, n_cols: int) -> None:
        if capacity < 1 or n_cols < 1:
            raise ValueError("capacity and n_cols must be >= 1")
        self._data = np.full((capacity, n_cols), np.nan, dtype=np.float64)
        self._head = 0  # next write position
        self._len = 0

    @property
    def capacity(self) -> int:
        """Most rows kept."""
        return int(self._data.shape[0])

    @property
    def n_cols(self) -> int:
        """Values per row."""
        return int(self._data.shape[1])

    def __len__(self) -> int:
        return self._len

    def clear(self) -> None:
        """Forget every row (keeps the allocation)."""
        self._head = 0
        self._len = 0

    def append(self, row: Sequence[float] | np.ndarray) -> None:
        """Add one row, dropping the oldest when full."""
        self._data[self._head] = row
        self._head = (self._head + 1) % self.capacity
        if self._len < self.capacity:
            self._len += 1

    def replace(self, rows: np.ndarray) -> None:
        """Make the buffer hold the last `capacity` of `rows` (oldest first), e.g. after a merge."""
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, self.n_cols)[-self.capacity :]
        n = rows.shape[0]
        self._data[:n] = rows
        self._len = n
        self._head = n % self.capacity

    def array(self) -> np.ndarray:
        """Rows oldest first, as a new array the caller may keep (plots hold on to it)."""
        if self._len < self.capacity:
            return self._data[: self._len].copy()
        return np.concatenate((self._data[self._head :], self._data[: self._head]))

    def last(self) -> np.ndarray | None:
        """The newest row (a view), or None when empty."""
        if self._len == 0:
            return None
        return self._data[(self._head - 1) % self.capacity]


def stored_ns_ceiling(ts_s: float) -> int:
    """Last unix ns a stored (microsecond) timestamp may stand for.

    The store keeps microseconds, live records carry nanoseconds: a live record within the same
    microsecond as a stored one is the same record delivered twice.
    """
    return round(ts_s * 1e6) * 1000 + 999


def derive(ts: np.ndarray, step: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step time and throughput for consecutive records of one rank (module docstring rules)."""
    step_time = np.full(ts.shape, np.nan)
    if ts.size > 1:
        dt = np.diff(ts)
        ds = np.diff(step)
        ok = (ds > 0) & (dt > 0)
        step_time[1:] = np.where(ok, dt / np.where(ok, ds, 1.0), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        throughput = np.where(step_time > 0, tokens / step_time, np.nan)
    return step_time, throughput


@dataclass(slots=True)
class RankSeries:
    """One rank's points, oldest first; arrays are copies the view may keep."""

    job_id: str
    rank: int
    ts: np.ndarray  # unix seconds
    step: np.ndarray
    loss: np.ndarray
    grad_norm: np.ndarray
    step_time: np.ndarray
    throughput: np.ndarray

    def get(self, name: str) -> np.ndarray:
        """Series by name (one of SERIES_NAMES)."""
        return {
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "step_time": self.step_time,
            "throughput": self.throughput,
        }[name]


@dataclass(slots=True)
class RankInfo:
    """What is known about one rank besides its series."""

    rank: int
    local_rank: int = -1
    world_size: int = 0
    host: str = ""
    pid: int = 0
    registered: bool = False  # an "init" record was seen


@dataclass(slots=True)
class _RankState:
    info: RankInfo
    ring: RingBuffer
    last_ts_ns: int = -1
    last_step: float = math.nan


@dataclass(slots=True)
class _JobState:
    job_id: str
    ranks: dict[int, _RankState] = field(default_factory=dict)
    hosts: set[str] = field(default_factory=set)
    simulated: bool = False
    last_ts_ns: int = 0


@dataclass(slots=True)
class TrainHistory:
    """Result of `fetch_history`: raw rows per rank (ts_s, step, loss, grad_norm, tokens)."""

    job_id: str
    rows: dict[int, np.ndarray]
    infos: dict[int, RankInfo]
    simulated: bool = False


class TrainingModel:
    """Per-job, per-rank training series, fed live by `on_frame` and from the store by history.

    Implements the `on_frame` part of `console.ingest.sink.IngestSink`. Not thread-safe: call
    everything except `fetch_history`/`fetch_jobs` on the GUI thread.
    """

    def __init__(self, query: Query | None = None, capacity: int = DEFAULT_CAPACITY) -> None:
        self._query = query
        self._capacity = capacity
        self._jobs: dict[str, _JobState] = {}
        self._version = 0

    # ---- state the views poll ----

    @property
    def version(self) -> int:
        """Bumped on every change; views redraw on a timer only when it moved (coalesced redraw)."""
        return self._version

    @property
    def capacity(self) -> int:
        """Points kept per rank series."""
        return self._capacity

    def jobs(self) -> list[str]:
        """Known job ids, most recently active first."""
        return [j.job_id for j in sorted(self._jobs.values(), key=lambda j: (-j.last_ts_ns, j.job_id))]

    def ranks(self, job_id: str) -> list[int]:
        """Ranks seen for a job, ascending."""
        job = self._jobs.get(job_id)
        return sorted(job.ranks) if job else []

    def rank_info(self, job_id: str, rank: int) -> RankInfo | None:
        """Host, pid, world size of a rank."""
        job = self._jobs.get(job_id)
        st = job.ranks.get(rank) if job else None
        return st.info if st else None

    def hosts(self, job_id: str) -> list[str]:
        """Hosts that reported records of the job."""
        job = self._jobs.get(job_id)
        return sorted(job.hosts) if job else []

    def is_simulated(self, job_id: str) -> bool:
        """True when any record of the job came from a simulated agent."""
        job = self._jobs.get(job_id)
        return bool(job and job.simulated)

    def series(self, job_id: str, rank: int) -> RankSeries | None:
        """The rank's points oldest first, or None for an unknown rank."""
        job = self._jobs.get(job_id)
        st = job.ranks.get(rank) if job else None
        if st is None:
            return None
        a = st.ring.array()
        return RankSeries(
            job_id, rank, a[:, COL_TS], a[:, COL_STEP], a[:, COL_LOSS], a[:, COL_GRAD_NORM],
            a[:, COL_STEP_TIME], a[:, COL_THROUGHPUT],
        )

    def rank_step_time_medians(self, job_id: str, window: int = STRAGGLER_WINDOW,
                               min_points: int = STRAGGLER_MIN_POINTS) -> dict[int, float]:
        """Median step time of each rank over its last `window` points (ranks with too few omitted)."""
        job = self._jobs.get(job_id)
        if job is None:
            return {}
        out: dict[int, float] = {}
        for rank, st in job.ranks.items():
            n = len(st.ring)
            if n == 0:
                continue
            recent = st.ring.array()[-window:, COL_STEP_TIME]
            recent = recent[np.isfinite(recent)]
            if recent.size >= min_points:
                out[rank] = float(np.median(recent))
        return out

    def straggler_ranks(self, job_id: str, window: int = STRAGGLER_WINDOW,
                        threshold: float = STRAGGLER_THRESHOLD,
                        min_points: int = STRAGGLER_MIN_POINTS) -> list[int]:
        """Ranks whose recent median step time is > `threshold` above the job's median.

        The job median is the median of the per-rank medians, so one slow rank cannot drag the
        reference up; a job needs at least two judged ranks. With exactly two ranks the job median
        is their mean, so only a rank more than ~50 % slower than its peer is flagged.
        """
        medians = self.rank_step_time_medians(job_id, window, min_points)
        if len(medians) < 2:
            return []
        job_median = float(np.median(list(medians.values())))
        if not job_median > 0:
            return []
        return sorted(r for r, m in medians.items() if m > job_median * (1.0 + threshold))

    def clear(self) -> None:
        """Forget all jobs, e.g. before a replay seeks backwards (points are deduped by time)."""
        self._jobs.clear()
        self._version += 1

    # ---- IngestSink ----

    def on_frame(self, frame: Frame) -> None:
        """Take the frame's training records: "init" registers a rank, "log" adds a point."""
        if not frame.train:
            return
        changed = False
        for rec in frame.train:
            if rec.kind == "log":
                changed |= self._add_log(frame.host, frame.simulated, rec)
            elif rec.kind == "init":
                self._register(frame.host, frame.simulated, rec)
                changed = True
        if changed:
            self._version += 1

    def on_frames(self, frames: Iterable[Frame]) -> None:
        """Batch form of `on_frame`."""
        for f in frames:
            self.on_frame(f)

    # ---- history ----

    def fetch_jobs(self, limit: int = 200) -> list[tuple[str, int]]:
        """(job_id, newest unix ns) of jobs in the store, newest first. I/O: run on a worker."""
        if self._query is None:
            return []
        rows = self._query(
            "SELECT job_id, epoch_ns(max(ts)) FROM train_samples WHERE job_id IS NOT NULL "
            "GROUP BY job_id ORDER BY max(ts) DESC LIMIT ?",
            [limit],
        )
        return [(str(r[0]), int(r[1])) for r in rows]

    def apply_jobs(self, jobs: Iterable[tuple[str, int]]) -> None:
        """Make stored jobs selectable before any live record of them arrives (GUI thread)."""
        for job_id, last_ns in jobs:
            job = self._job(job_id)
            job.last_ts_ns = max(job.last_ts_ns, last_ns)
        self._version += 1

    def fetch_history(self, job_id: str) -> TrainHistory:
        """Read the newest `capacity` records per rank of a job. I/O only: safe on a worker."""
        if self._query is None:
            return TrainHistory(job_id, {}, {})
        rows = self._query(
            "SELECT rank, local_rank, world_size, host, pid, CAST(kind AS VARCHAR), epoch_ns(ts), "
            "step, loss, grad_norm, tokens, simulated FROM train_samples WHERE job_id = ? "
            "QUALIFY row_number() OVER (PARTITION BY rank ORDER BY ts DESC) <= ? "
            "ORDER BY rank, ts",
            [job_id, self._capacity],
        )
        per_rank: dict[int, list[tuple[float, float, float, float, float]]] = {}
        infos: dict[int, RankInfo] = {}
        simulated = False
        for rank, local_rank, world, host, pid, kind, ts_ns, step, loss, gn, tokens, sim in rows:
            if rank is None or ts_ns is None:
                continue
            r = int(rank)
            info = infos.setdefault(r, RankInfo(r))
            info.local_rank = _int(local_rank, info.local_rank)
            info.world_size = _int(world, info.world_size)
            info.host = str(host or info.host)
            info.pid = _int(pid, info.pid)
            simulated = simulated or bool(sim)
            if kind == "init":
                info.registered = True
                continue
            if kind not in ("log", None):
                continue
            per_rank.setdefault(r, []).append(
                (int(ts_ns) / 1e9, _float(step), _float(loss), _float(gn), _float(tokens))
            )
        arrays = {r: _fill_steps(np.asarray(v, dtype=np.float64).reshape(-1, _RAW_COLS)) for r, v in per_rank.items()}
        return TrainHistory(job_id, arrays, infos, simulated)

    def apply_history(self, hist: TrainHistory) -> None:
        """Merge fetched history under the live points already held (GUI thread).

        History rows at or after a rank's oldest live point are dropped, so records the live
        stream already delivered are not counted twice.
        """
        job = self._job(hist.job_id)
        job.simulated = job.simulated or hist.simulated
        for rank, info in hist.infos.items():
            st = self._rank(job, rank)
            live = st.info
            live.registered = live.registered or info.registered
            if live.world_size == 0:
                live.world_size = info.world_size
            if live.local_rank < 0:
                live.local_rank = info.local_rank
            if not live.host:
                live.host = info.host
                if info.host:
                    job.hosts.add(info.host)
            if not live.pid:
                live.pid = info.pid
        for rank, raw in hist.rows.items():
            if raw.size == 0:
                continue
            st = self._rank(job, rank)
            current = st.ring.array()
            if len(current):
                raw = raw[raw[:, COL_TS] < current[0, COL_TS] - STORE_RESOLUTION_S]
                merged_raw = np.concatenate((raw, current[:, :_RAW_COLS]))
            else:
                merged_raw = raw
            merged_raw = merged_raw[-self._capacity :]
            step_time, throughput = derive(merged_raw[:, COL_TS], merged_raw[:, COL_STEP], merged_raw[:, COL_TOKENS])
            st.ring.replace(np.column_stack((merged_raw, step_time, throughput)))
            last = merged_raw[-1]
            st.last_ts_ns = max(st.last_ts_ns, stored_ns_ceiling(float(last[COL_TS])))
            st.last_step = float(last[COL_STEP])
            job.last_ts_ns = max(job.last_ts_ns, st.last_ts_ns)
        self._version += 1

    def load_history(self, job_id: str) -> None:
        """Fetch and apply in one call, for headless use and tests (blocks on the query)."""
        self.apply_history(self.fetch_history(job_id))

    # ---- internals ----

    def _job(self, job_id: str) -> _JobState:
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = _JobState(job_id)
        return job

    def _rank(self, job: _JobState, rank: int) -> _RankState:
        st = job.ranks.get(rank)
        if st is None:
            st = job.ranks[rank] = _RankState(RankInfo(rank), RingBuffer(self._capacity, N_COLS))
        return st

    def _touch(self, job: _JobState, st: _RankState, host: str, simulated: bool, rec: TrainRecord) -> None:
        job.hosts.add(host)
        job.simulated = job.simulated or simulated
        job.last_ts_ns = max(job.last_ts_ns, rec.ts_unix_ns)
        st.info.host = host
        st.info.pid = rec.pid
        st.info.local_rank = rec.local_rank
        st.info.world_size = rec.world_size

    def _register(self, host: str, simulated: bool, rec: TrainRecord) -> None:
        job = self._job(rec.job_id)
        st = self._rank(job, rec.rank)
        self._touch(job, st, host, simulated, rec)
        st.info.registered = True

    def _add_log(self, host: str, simulated: bool, rec: TrainRecord) -> bool:
        job = self._job(rec.job_id)
        st = self._rank(job, rec.rank)
        if rec.ts_unix_ns <= st.last_ts_ns:
            return False  # duplicate (at-least-once delivery) or older than what is held
        step = float(rec.step) if rec.step >= 0 else (st.last_step + 1 if math.isfinite(st.last_step) else 0.0)
        ts = rec.ts_unix_ns / 1e9
        step_time = math.nan
        throughput = math.nan
        prev = st.ring.last()
        if prev is not None:
            dt = ts - float(prev[COL_TS])
            ds = step - float(prev[COL_STEP])
            if dt > 0 and ds > 0:
                step_time = dt / ds
                if math.isfinite(rec.tokens):
                    throughput = rec.tokens / step_time
        st.ring.append((ts, step, rec.loss, rec.grad_norm, rec.tokens, step_time, throughput))
        st.last_ts_ns = rec.ts_unix_ns
        st.last_step = step
        self._touch(job, st, host, simulated, rec)
        return True


def _fill_steps(raw: np.ndarray) -> np.ndarray:
    """Give step-less records (NaN or -1) the step after the previous one, as live ingest does."""
    steps = raw[:, COL_STEP]
    prev = math.nan
    for i in range(steps.size):
        s = steps[i]
        if not math.isfinite(s) or s < 0:
            steps[i] = prev + 1 if math.isfinite(prev) else 0.0
        prev = steps[i]
    return raw


def _float(v: object) -> float:
    if v is None:
        return math.nan
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _int(v: object, default: int) -> int:
    if v is None:
        return default
    try:
        return int(v)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return default
