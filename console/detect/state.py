"""What the detectors remember between evaluations: per-host, per-GPU, per-rank and per-job state.

Per-GPU and per-rank state lives in numpy arrays indexed by a host slot / rank index, so a rule
evaluates the whole fleet with a handful of vectorized operations instead of a Python loop per
GPU. Host timestamps are only ever compared with timestamps of the same host (clocks of different
hosts may disagree by seconds); cross-host freshness uses the console's own clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from console.detect.alerts import Alert, AlertBook
from protos.types import N_METRICS


@dataclass
class DetectConfig:
    """Thresholds of every rule (docs/detection.md explains each). Times are seconds."""

    # freshness / housekeeping
    stale_s: float = 3.5  # a host without a frame for this long (console clock) is left out of peer rules
    resolve_after_s: float = 60.0  # condition alerts resolve after their condition was absent this long
    min_update_s: float = 10.0  # a refreshed alert is re-emitted at most this often (unless it escalates)
    rank_active_s: float = 30.0  # a rank that logged within this (host clock) is active
    rank_forget_s: float = 600.0  # a silent rank is dropped from job rules after this
    compact_every_s: float = 600.0  # how often silent ranks and empty jobs are forgotten
    # GPU health
    throttle_samples: int = 3
    gpu_error_samples: int = 3
    # peers (Minder-style)
    peer_min_gpus: int = 4
    peer_min_hosts: int = 3
    peer_z: float = 6.0
    peer_samples: int = 3
    peer_warmup_s: float = 15.0
    peer_max_fraction: float = 0.25  # more outliers than this share of the job = no outlier (bimodal job)
    # training loop
    nonfinite_after_finite: int = 3  # NaN counts once the rank reported this many finite values in a row
    grad_nonfinite_records: int = 3  # AMP skips a step on inf grads now and then: need this many in a row
    loss_warmup: int = 20
    loss_alpha: float = 0.05
    spike_sigma: float = 6.0
    spike_rel: float = 0.2
    spike_records: int = 2
    div_alpha_fast: float = 0.1
    div_ratio: float = 1.3
    div_records: int = 20
    grad_factor: float = 10.0
    grad_sigma: float = 10.0
    grad_records: int = 2
    straggler_ratio: float = 1.25
    straggler_abs_s: float = 0.05
    straggler_samples: int = 3
    straggler_min_ranks: int = 3
    hang_rank_min_s: float = 3.0
    hang_rank_factor: float = 3.0
    hang_rank_lag_steps: int = 2
    hang_job_min_s: float = 30.0
    hang_job_factor: float = 10.0
    tput_warmup: int = 30
    tput_alpha_base: float = 0.02
    tput_alpha_fast: float = 0.3
    tput_drop: float = 0.3
    tput_samples: int = 3
    rank_exit_grace_s: float = 10.0
    rank_exit_job_fraction: float = 0.5
    # tampering
    checksum_wait_s: float = 5.0
    scale_threshold_gpus: int = 256
    scale_min_large_jobs: int = 2
    scale_min_small_jobs: int = 1
    scale_window_s: float = 3600.0
    scale_every_s: float = 10.0
    # host integrity
    foreign_samples: int = 2
    security_packages: tuple[str, ...] = (
        "torch", "transformers", "accelerate", "deepspeed", "megatron", "megatron-core", "safetensors",
        "numpy", "triton", "nvidia-nccl-cu12", "flash-attn", "huggingface-hub", "tokenizers", "datasets",
    )

    def ns(self, seconds: float) -> int:
        """Seconds to integer nanoseconds."""
        return int(seconds * 1e9)


def _grow(a: np.ndarray, n: int, fill: Any, axis: int = 0) -> np.ndarray:
    if a.shape[axis] >= n:
        return a
    shape = list(a.shape)
    shape[axis] = max(n, 2 * a.shape[axis], 16)
    out = np.full(shape, fill, dtype=a.dtype)
    idx = [slice(None)] * a.ndim
    idx[axis] = slice(0, a.shape[axis])
    out[tuple(idx)] = a
    return out


@dataclass
class HostState:
    """One agent: identity, sequence, clocks and what it runs."""

    name: str
    slot: int
    epoch: str = ""
    last_seq: int = -1
    first_ts: int = 0  # host clock
    last_ts: int = 0  # host clock, newest frame
    last_arrival: int = 0  # console clock when its newest frame was evaluated
    fresh_frame: bool = False  # a frame arrived in the current evaluation
    connected: bool = True
    n_gpus: int = 0
    simulated: bool = False  # its newest frame said simulated (alerts about it are labelled so)
    proc_pids: list[int] = field(default_factory=list)  # process list of the newest frame
    proc_gpus: list[int] = field(default_factory=list)
    ranks_changed: bool = False  # a rank registered since the process list was last checked
    pid_gpu: dict[int, int] = field(default_factory=dict)  # pids on GPUs (newest frame)
    proc_mem: dict[int, float] = field(default_factory=dict)
    pids: dict[int, int] = field(default_factory=dict)  # registered rank pid -> rank index
    exited: set[int] = field(default_factory=set)
    suspects: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # (gpu, pid) -> [count, onset]


@dataclass
class JobState:
    """One training job as seen through its ranks' records."""

    job_id: str
    index: int
    world_size: int = 0
    ranks: dict[int, int] = field(default_factory=dict)  # rank -> rank index
    _ridx: np.ndarray | None = None
    fp_rank: dict[tuple[int, str], str] = field(default_factory=dict)  # (rank, field) -> value
    checksums: dict[tuple[int, str], dict[int, tuple[float, int, int]]] = field(default_factory=dict)
    checksum_first: dict[tuple[int, str], int] = field(default_factory=dict)  # -> console ns first seen
    checksum_sizes: dict[str, int] = field(default_factory=dict)  # param_group -> ranks seen in it
    tput_base: float = math.nan
    tput_fast: float = math.nan
    tput_n: int = 0
    tput_run: int = 0
    tput_onset: int = 0
    pending_exits: list[tuple[int, int, int]] = field(default_factory=list)  # (rank idx, host ts, console ns)
    last_record_arrival: int = 0  # console ns
    first_arrival: int = 0

    def rank_indices(self) -> np.ndarray:
        """Rank-table indices of this job's ranks (cached until a rank joins)."""
        if self._ridx is None or len(self._ridx) != len(self.ranks):
            self._ridx = np.fromiter(self.ranks.values(), dtype=np.int64, count=len(self.ranks))
        return self._ridx


class RankTable:
    """Per-rank state in parallel arrays (index = rank index)."""

    _FLOAT_NAN = (
        "interval", "iv_last", "step_time", "tokens", "l_mean", "l_var", "l_fast", "l_best",
        "g_mean", "g_var",
    )
    _INT_ZERO = (
        "first_ts", "last_ts", "adv_ts", "l_n", "g_n", "fin_run", "gfin_run", "gnf_run", "spike_run",
        "spike_onset", "div_run", "div_onset", "gx_run", "gx_onset", "strag_run", "strag_onset", "pid",
        "nf_onset", "gnf_onset", "l_armed", "g_armed", "init_arrival",
    )

    def __init__(self) -> None:
        self.n = 0
        self.cap = 0
        self.job = np.zeros(0, np.int64)
        self.rank = np.zeros(0, np.int64)
        self.slot = np.zeros(0, np.int64)
        self.gpu = np.zeros(0, np.int64)
        self.last_step = np.zeros(0, np.int64)
        self.exited = np.zeros(0, bool)
        self.new = np.zeros(0, bool)  # got records in the current evaluation
        self.arrays_f: dict[str, np.ndarray] = {k: np.zeros(0, np.float64) for k in self._FLOAT_NAN}
        self.arrays_i: dict[str, np.ndarray] = {k: np.zeros(0, np.int64) for k in self._INT_ZERO}
        self.key: dict[tuple[str, int], int] = {}
        self.by_slot_pid: dict[int, int] = {}  # (host slot << 32) | pid -> rank index
        self.pid_list: list[int] = []
        self.slot_list: list[int] = []

    def f(self, name: str) -> np.ndarray:
        """Float array by name."""
        return self.arrays_f[name]

    def i(self, name: str) -> np.ndarray:
        """Int array by name."""
        return self.arrays_i[name]

    def add(self, job: int, rank: int, slot: int, gpu: int, pid: int, ts: int) -> int:
        """Register a rank; returns its index."""
        r = self.n
        if r >= self.cap:
            cap = max(64, 2 * self.cap)
            self.job = _grow(self.job, cap, -1)
            self.rank = _grow(self.rank, cap, -1)
            self.slot = _grow(self.slot, cap, -1)
            self.gpu = _grow(self.gpu, cap, -1)
            self.last_step = _grow(self.last_step, cap, -1)
            self.exited = _grow(self.exited, cap, False)
            self.new = _grow(self.new, cap, False)
            for k in self.arrays_f:
                self.arrays_f[k] = _grow(self.arrays_f[k], cap, np.nan)
            for k in self.arrays_i:
                self.arrays_i[k] = _grow(self.arrays_i[k], cap, 0)
            self.cap = cap
        self.n += 1
        self.reset(r, job, rank, slot, gpu, pid, ts)
        self.pid_list.append(pid)
        self.slot_list.append(slot)
        return r

    def reset(self, r: int, job: int, rank: int, slot: int, gpu: int, pid: int, ts: int) -> None:
        """Fresh state for a rank (new or restarted process)."""
        self.job[r], self.rank[r], self.slot[r], self.gpu[r] = job, rank, slot, gpu
        self.last_step[r] = -1
        self.exited[r] = False
        for a in self.arrays_f.values():
            a[r] = np.nan
        for b in self.arrays_i.values():
            b[r] = 0
        self.arrays_i["pid"][r] = pid
        self.arrays_i["first_ts"][r] = ts
        self.arrays_i["last_ts"][r] = ts
        self.arrays_i["adv_ts"][r] = ts
        if r < len(self.pid_list):
            self.pid_list[r] = pid
            self.slot_list[r] = slot


class FleetArrays:
    """Per-GPU state: [slot, gpu] arrays, grown as hosts and GPUs appear."""

    def __init__(self) -> None:
        self.S = 0
        self.G = 0
        self.values = np.zeros((0, 0, N_METRICS), np.float32)
        self.present = np.zeros((0, 0), bool)
        self.state = np.zeros((0, 0), np.int64)
        self.ints: dict[str, np.ndarray] = {}
        self.floats: dict[str, np.ndarray] = {}
        self.host_ints: dict[str, np.ndarray] = {}
        for k in ("therm_run", "therm_onset", "power_run", "power_onset", "err_run", "err_onset",
                  "peer_run", "peer_onset", "lost_seen"):
            self.ints[k] = np.zeros((0, 0), np.int64)
        for k in ("ecc_alerted", "retired_base", "retired_alerted", "remap_alerted"):
            self.floats[k] = np.zeros((0, 0), np.float64)
        for k in ("peer_run", "peer_onset", "last_ts", "last_arrival"):
            self.host_ints[k] = np.zeros(0, np.int64)

    def ensure(self, slots: int, gpus: int) -> None:
        """Make room for `slots` hosts with up to `gpus` GPUs each."""
        if slots <= self.S and gpus <= self.G:
            return
        s = self.S if slots <= self.S else max(slots, 2 * self.S, 16)
        g = max(gpus, self.G)

        def grow2(a: np.ndarray, fill: Any) -> np.ndarray:
            out = np.full((s, g, *a.shape[2:]), fill, dtype=a.dtype)
            out[: a.shape[0], : a.shape[1]] = a
            return out

        self.values = grow2(self.values, np.nan)
        self.present = grow2(self.present, False)
        self.state = grow2(self.state, 0)
        for k, a in self.ints.items():
            self.ints[k] = grow2(a, 0)
        for k, b in self.floats.items():
            self.floats[k] = grow2(b, np.nan if k == "retired_base" else 0.0)
        for k, c in self.host_ints.items():
            out = np.zeros(s, c.dtype)
            out[: c.shape[0]] = c
            self.host_ints[k] = out
        self.S, self.G = s, g


@dataclass
class DetectState:
    """Everything rules read and write; the engine owns one."""

    config: DetectConfig
    book: AlertBook
    now_ns: int = 0
    hosts: dict[str, HostState] = field(default_factory=dict)
    host_list: list[HostState] = field(default_factory=list)
    fleet: FleetArrays = field(default_factory=FleetArrays)
    ranks: RankTable = field(default_factory=RankTable)
    jobs: dict[str, JobState] = field(default_factory=dict)
    job_list: list[JobState] = field(default_factory=list)
    evaluations: int = 0
    _fresh: np.ndarray | None = None
    _fresh_key: tuple[int, int, int] = (0, 0, 0)

    def host(self, name: str) -> HostState:
        """The state of `name`, created on first sight."""
        h = self.hosts.get(name)
        if h is None:
            h = HostState(name, len(self.host_list))
            self.hosts[name] = h
            self.host_list.append(h)
            self.fleet.ensure(len(self.host_list), max(self.fleet.G, 1))
        return h

    def job(self, job_id: str) -> JobState:
        """The state of `job_id`, created on first sight."""
        j = self.jobs.get(job_id)
        if j is None:
            j = JobState(job_id, len(self.job_list), first_arrival=self.now_ns)
            self.jobs[job_id] = j
            self.job_list.append(j)
        return j

    def alert_is_simulated(self, alert: Alert) -> bool:
        """Whether the data behind `alert` is simulated: its host's or its job's frames said so.

        An alert with neither host nor job (fleet-wide) is simulated when every host seen is.
        """
        h = self.hosts.get(alert.host) if alert.host else None
        j = self.jobs.get(alert.job_id) if alert.job_id else None
        if h is not None or j is not None:
            # a job is simulated when a host of one of its ranks is (worked out here, when an
            # alert is labelled, rather than per record on the hot path)
            job_sim = j is not None and any(
                self.host_list[int(self.ranks.slot[i])].simulated for i in j.ranks.values()
            )
            return bool((h is not None and h.simulated) or job_sim)
        if alert.host or alert.job_id:
            return False
        return bool(self.host_list) and all(x.simulated for x in self.host_list)

    def compact(self) -> int:
        """Forget ranks silent for `rank_forget_s` (host clock) and jobs left without ranks.

        Keeps a console that runs for months at the size of what is live; returns ranks dropped.
        """
        r = self.ranks
        n = r.n
        if n == 0:
            return 0
        forget = self.config.ns(self.config.rank_forget_s)
        f = self.fleet
        host_ts = f.host_ints["last_ts"][r.slot[:n]]
        host_gone = self.now_ns - f.host_ints["last_arrival"][r.slot[:n]] > forget
        dead = (host_ts - r.i("last_ts")[:n] > forget) | host_gone
        if not dead.any():
            return 0
        keep = np.flatnonzero(~dead)
        new_of = np.full(n, -1, np.int64)
        new_of[keep] = np.arange(len(keep))
        live_jobs = sorted({int(j) for j in r.job[keep]})
        job_new = {old: i for i, old in enumerate(live_jobs)}
        # jobs
        jobs = [self.job_list[j] for j in live_jobs]
        for i, job in enumerate(jobs):
            job.index = i
            job.ranks = {rk: int(new_of[ri]) for rk, ri in job.ranks.items() if new_of[ri] >= 0}
            job._ridx = None
            job.pending_exits = [(int(new_of[a]), b, c) for a, b, c in job.pending_exits if new_of[a] >= 0]
            job.checksums = {k: {rk: (v[0], int(new_of[v[1]]), v[2]) for rk, v in d.items() if new_of[v[1]] >= 0}
                             for k, d in job.checksums.items()}
            job.checksum_first = {k: t for k, t in job.checksum_first.items() if k in job.checksums}
        self.job_list = jobs
        self.jobs = {j.job_id: j for j in jobs}
        # rank arrays
        r.job = _grow(np.array([job_new[int(j)] for j in r.job[keep]], np.int64), r.cap, -1)
        for name in ("rank", "slot", "gpu", "last_step"):
            setattr(r, name, _grow(getattr(r, name)[keep], r.cap, -1))
        r.exited = _grow(r.exited[keep], r.cap, False)
        r.new = _grow(r.new[keep], r.cap, False)
        for k in r.arrays_f:
            r.arrays_f[k] = _grow(r.arrays_f[k][keep], r.cap, np.nan)
        for k in r.arrays_i:
            r.arrays_i[k] = _grow(r.arrays_i[k][keep], r.cap, 0)
        r.key = {key: int(new_of[ri]) for key, ri in r.key.items() if new_of[ri] >= 0}
        r.by_slot_pid = {k: int(new_of[ri]) for k, ri in r.by_slot_pid.items() if new_of[ri] >= 0}
        r.pid_list = [r.pid_list[i] for i in keep.tolist()]
        r.slot_list = [r.slot_list[i] for i in keep.tolist()]
        r.n = len(keep)
        for h in self.host_list:
            h.pids = {pid: int(new_of[ri]) for pid, ri in h.pids.items() if new_of[ri] >= 0}
            if len(h.exited) > 4096:
                h.exited = set(sorted(h.exited)[-1024:])
        return int(dead.sum())

    def fresh_slots(self) -> np.ndarray:
        """Bool [S]: hosts connected that sent a frame within stale_s (console clock); cached per evaluation."""
        key = (self.now_ns, self.evaluations, len(self.host_list))
        if self._fresh_key == key and self._fresh is not None:
            return self._fresh
        f = self.fleet
        n = len(self.host_list)
        out = np.zeros(f.S, bool)
        arr = f.host_ints["last_arrival"][:n]
        ok = (arr > 0) & (self.now_ns - arr <= self.config.ns(self.config.stale_s))
        conn = np.fromiter((h.connected for h in self.host_list), bool, n)
        out[:n] = ok & conn
        self._fresh, self._fresh_key = out, key
        return out
