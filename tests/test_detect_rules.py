"""Detection rules: a positive and a negative case per rule, persistence, and evidence on the alert.

`MiniFleet` builds deterministic frames for a few hosts running one data-parallel job and feeds
them to a DetectionEngine, one simulated second per tick; test_detect_engine.py reuses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from console.detect import alerts as K
from console.detect.alerts import Alert
from console.detect.engine import DetectionEngine
from console.detect.state import DetectConfig
from protos.types import (
    GPU_ERROR,
    GPU_LOST,
    GPU_OK,
    METRIC_INDEX,
    N_METRICS,
    SEVERITY_CRITICAL,
    SEVERITY_INFO,
    SEVERITY_WARNING,
    Event,
    Frame,
    GpuProcess,
    TrainRecord,
)

NS = 1_000_000_000
T0 = 1_700_000_000 * NS
C = METRIC_INDEX
INFO = {"code_fingerprint": "sha256:c0de", "config_fingerprint": "sha256:cf9", "seed": "7"}


@dataclass
class Job:
    """A data-parallel job over some hosts, one rank per GPU."""

    job_id: str
    hosts: list[int]
    gpus: int
    step_s: float = 1.0
    start: int = 0


@dataclass
class MiniFleet:
    """Deterministic hosts x GPUs with one or more jobs; hooks inject faults per host."""

    n_hosts: int = 6
    gpus: int = 4
    jobs: list[Job] | None = None
    skew_s: float = 0.0
    seed: int = 0
    config: DetectConfig | None = None
    processes: bool = True
    eng: DetectionEngine = field(init=False)
    t: int = 0
    alerts: dict[str, Alert] = field(default_factory=dict)
    emitted: list[Alert] = field(default_factory=list)
    on_values: dict[int, Callable[[np.ndarray], None]] = field(default_factory=dict)
    on_record: dict[int, Callable[[TrainRecord], TrainRecord | None]] = field(default_factory=dict)
    events: dict[int, list[Event]] = field(default_factory=dict)
    extra_procs: dict[int, list[GpuProcess]] = field(default_factory=dict)
    state: dict[tuple[int, int], int] = field(default_factory=dict)
    frozen: set[int] = field(default_factory=set)
    stopped: set[tuple[int, int]] = field(default_factory=set)  # (host, gpu) ranks that exited
    info: dict[int, dict[str, str]] = field(default_factory=dict)
    reinit: set[int] = field(default_factory=set)
    step_time: dict[int, float] = field(default_factory=dict)
    rate: dict[str, float] = field(default_factory=dict)  # job -> steps per second factor

    def __post_init__(self) -> None:
        self.eng = DetectionEngine(config=self.config)
        self.rng = np.random.default_rng(self.seed)
        if self.jobs is None:
            self.jobs = [Job("job-a", list(range(self.n_hosts)), self.gpus)]
        srng = np.random.default_rng(self.seed + 99)
        self.skews = [int(srng.uniform(-self.skew_s, self.skew_s) * NS) for _ in range(self.n_hosts)]
        self.seq = [0] * self.n_hosts
        self.progress: dict[str, float] = {}
        self.last_step: dict[tuple[str, int], int] = {}
        self.registered: set[tuple[str, int]] = set()

    @property
    def all_jobs(self) -> list[Job]:
        assert self.jobs is not None
        return self.jobs

    def host(self, i: int) -> str:
        return f"h{i:02d}"

    def pid(self, job: Job, h: int, g: int) -> int:
        return 100_000 + 1000 * self.all_jobs.index(job) + h * 10 + g

    def values(self, h: int) -> np.ndarray:
        n = self.gpus
        r = self.rng
        v = np.zeros((n, N_METRICS), np.float32)
        busy = np.array([any(h in j.hosts and self.t >= j.start and (h, g) not in self.stopped for j in self.all_jobs)
                         for g in range(n)], float)
        if h in self.frozen:
            busy[:] = 0.0
        util = 3 + 92 * busy + r.normal(0, 1.5, n)
        v[:, C["gpu_util_pct"]] = np.clip(np.round(util), 0, 100)
        v[:, C["mem_util_pct"]] = np.clip(util * 0.6 + r.normal(0, 2, n), 0, 100)
        v[:, C["mem_used_mib"]] = 500 + 60000 * busy
        v[:, C["mem_total_mib"]] = 81559
        v[:, C["temp_c"]] = 40 + 30 * busy
        v[:, C["power_w"]] = 70 + 5.6 * util + r.normal(0, 6, n)
        v[:, C["power_limit_w"]] = 700
        v[:, C["sm_clock_mhz"]] = np.where(busy > 0, 1980, 345)
        v[:, C["mem_clock_mhz"]] = 2619
        v[:, C["throttle_reasons"]] = np.where(busy > 0, 0, 1)
        v[:, C["ecc_corrected"]] = 0
        v[:, C["ecc_uncorrected"]] = 0
        v[:, C["retired_pages"]] = 0
        v[:, C["remap_failure"]] = 0
        v[:, C["pcie_tx_kbs"]] = 1000 + 9e5 * busy + r.normal(0, 5e3, n)
        v[:, C["pcie_rx_kbs"]] = 1200 + 1.1e6 * busy + r.normal(0, 5e3, n)
        if h in self.on_values:
            self.on_values[h](v)
        return v

    def records(self, h: int, ts: int) -> list[TrainRecord]:
        out: list[TrainRecord] = []
        for job in self.all_jobs:
            if h not in job.hosts or self.t < job.start:
                continue
            slot = job.hosts.index(h)
            for g in range(job.gpus):
                if (h, g) in self.stopped:
                    continue
                rank = slot * job.gpus + g
                pid = self.pid(job, h, g)
                key = (job.job_id, rank)
                if key not in self.registered or h in self.reinit:
                    self.registered.add(key)
                    out.append(TrainRecord(ts, job.job_id, rank, g, len(job.hosts) * job.gpus, pid, 1000, 0,
                                           kind="init", info={**INFO, **self.info.get(h, {})}))
                if h in self.frozen:
                    continue
                step = int(self.progress.get(job.job_id, 0.0))
                last = self.last_step.get(key, step - 1)
                for s in range(last + 1, step + 1):
                    loss = 2.2 + 8.0 / math.sqrt(1.0 + s / 20.0) + float(self.rng.normal(0, 0.03))
                    rec = TrainRecord(ts, job.job_id, rank, g, len(job.hosts) * job.gpus, pid, 1000, s, loss=loss,
                                      grad_norm=abs(1.0 + float(self.rng.normal(0, 0.05))), lr=3e-4, tokens=4096.0,
                                      extra={"step_time_s": self.step_time.get(h, job.step_s) *
                                             float(self.rng.uniform(0.98, 1.02))})
                    if h in self.on_record:
                        rec2 = self.on_record[h](rec)
                        if rec2 is None:
                            continue
                        rec = rec2
                    out.append(rec)
                self.last_step[key] = max(last, step)
        return out

    def frame(self, h: int) -> Frame:
        ts = T0 + self.t * NS + self.skews[h] + h * 10_000_000
        self.seq[h] += 1
        v = self.values(h)
        state = [self.state.get((h, g), GPU_OK) for g in range(self.gpus)]
        for g, s in enumerate(state):
            if s == GPU_LOST:
                v[g, :] = np.nan
        procs: list[GpuProcess] = []
        if self.processes:
            for job in self.all_jobs:
                if h in job.hosts and self.t >= job.start:
                    procs += [GpuProcess(g, self.pid(job, h, g), 60000.0) for g in range(job.gpus)
                              if (h, g) not in self.stopped]
        procs += self.extra_procs.get(h, [])
        evs = self.events.pop(h, [])
        for e in evs:
            e.ts_unix_ns = ts
        return Frame(self.host(h), "ep", self.seq[h], ts, True, v, list(range(self.gpus)), state, procs,
                     self.records(h, ts), evs)

    def tick(self, n: int = 1) -> list[Alert]:
        """Advance n seconds: every host sends a frame, then the console evaluates."""
        got: list[Alert] = []
        for _ in range(n):
            for job in self.all_jobs:
                if self.t >= job.start:
                    self.progress[job.job_id] = self.progress.get(job.job_id, 0.0) + self.rate.get(
                        job.job_id, 1.0 / job.step_s)
            for h in range(self.n_hosts):
                self.eng.on_frame(self.frame(h))
            self.reinit.clear()
            out = self.eng.evaluate(T0 + (self.t + 1) * NS)
            for a in out:
                self.alerts[a.dedup_key] = a
            got += out
            self.emitted += out
            self.t += 1
        return got

    def of(self, kind: str, state: str | None = None) -> list[Alert]:
        return [a for a in self.alerts.values() if a.kind == kind and (state is None or a.state == state)]


def warm(fl: MiniFleet, n: int = 40) -> MiniFleet:
    fl.tick(n)
    assert fl.alerts == {}, [(a.kind, a.evidence) for a in fl.alerts.values()]
    return fl


# -- GPU health ----------------------------------------------------------------------------------------


def test_xid_raises_with_severity_and_dedups_repeats() -> None:
    fl = warm(MiniFleet())
    fl.events[1] = [Event(0, "xid", SEVERITY_CRITICAL, 2, 0, "XID 79", {"xid": "79"})]
    got = fl.tick()
    (a,) = [x for x in got if x.kind == K.XID]
    assert (a.host, a.gpu_index, a.severity, a.state) == ("h01", 2, K.CRITICAL, K.OPEN)
    assert a.evidence["xid"] == 79 and a.evidence["count"] == 1 and "fallen off the bus" in a.evidence["meaning"]
    assert a.onset_ns == T0 + 40 * NS + fl.skews[1] + 10_000_000  # the host's own clock
    fl.events[1] = [Event(0, "xid", SEVERITY_CRITICAL, 2, 0, "XID 79", {"xid": "79"})]
    fl.tick(12)
    assert len(fl.of(K.XID)) == 1 and fl.of(K.XID)[0].evidence["count"] == 2
    fl.events[1] = [Event(0, "xid", SEVERITY_CRITICAL, 2, 0, "XID 13", {"xid": "13"})]
    fl.tick()
    assert {a.evidence["xid"]: a.severity for a in fl.of(K.XID)} == {79: K.CRITICAL, 13: K.WARNING}


def test_other_events_raise_nothing() -> None:
    fl = warm(MiniFleet())
    fl.events[0] = [Event(0, "agent_start", SEVERITY_INFO, -1, 1, "started"),
                    Event(0, "process_start", SEVERITY_INFO, 0, 5, "pid 5 started on GPU 0")]
    fl.tick(3)
    assert fl.alerts == {}


def test_lost_gpu_from_state_and_event_then_resolves() -> None:
    fl = warm(MiniFleet())
    fl.state[(2, 1)] = GPU_LOST
    fl.events[2] = [Event(0, "gpu_lost", SEVERITY_CRITICAL, 1, 0, "GPU 1 is lost")]
    fl.tick()
    (a,) = fl.of(K.GPU_LOST)
    assert (a.host, a.gpu_index, a.severity) == ("h02", 1, K.CRITICAL)
    fl.tick(30)
    assert fl.of(K.GPU_LOST, K.OPEN)
    del fl.state[(2, 1)]
    fl.tick(65)
    assert fl.of(K.GPU_LOST, K.RESOLVED)


def test_gpu_error_needs_three_samples() -> None:
    fl = warm(MiniFleet())
    fl.state[(0, 3)] = GPU_ERROR
    fl.tick(2)
    assert not fl.of(K.GPU_ERROR)
    fl.tick()
    assert fl.of(K.GPU_ERROR)[0].evidence["samples"] == 3


def test_ecc_uncorrected_remap_and_retired_pages() -> None:
    fl = warm(MiniFleet())
    ecc = {"n": 1.0}

    def bad(v: np.ndarray) -> None:
        v[0, C["ecc_uncorrected"]] = ecc["n"]
        v[1, C["remap_failure"]] = 1
        v[2, C["retired_pages"]] = 2

    fl.on_values[3] = bad
    fl.tick()
    assert {(a.kind, a.gpu_index) for a in fl.alerts.values()} == {
        (K.ECC_UNCORRECTED, 0), (K.ROW_REMAP_FAILURE, 1), (K.RETIRED_PAGES, 2)}
    assert fl.of(K.ECC_UNCORRECTED)[0].evidence["ecc_uncorrected"] == 1.0
    n = len(fl.emitted)
    fl.tick(5)
    assert len(fl.emitted) == n  # steady counters: nothing new
    ecc["n"] = 3.0
    fl.tick(11)
    assert fl.of(K.ECC_UNCORRECTED)[0].evidence["ecc_uncorrected"] == 3.0


def test_retired_pages_at_start_is_baseline_not_alert() -> None:
    fl = MiniFleet()
    fl.on_values[0] = lambda v: v.__setitem__((slice(None), C["retired_pages"]), 4)
    warm(fl)


def test_thermal_throttle_persistence_and_resolution() -> None:
    fl = warm(MiniFleet())
    fl.on_values[4] = lambda v: v.__setitem__((1, C["throttle_reasons"]), 0x20)
    fl.tick(2)
    assert not fl.of(K.THERMAL_THROTTLE)
    fl.tick()
    (a,) = fl.of(K.THERMAL_THROTTLE)
    assert a.evidence["reasons"] == ["sw_thermal"] and a.evidence["samples"] == 3 and a.gpu_index == 1
    assert a.onset_ns == T0 + 40 * NS + fl.skews[4] + 40_000_000  # first throttled sample
    del fl.on_values[4]
    fl.tick(65)
    assert fl.of(K.THERMAL_THROTTLE, K.RESOLVED)


def test_power_brake_alerts_but_sw_power_cap_does_not() -> None:
    fl = warm(MiniFleet())
    fl.on_values[0] = lambda v: v.__setitem__((slice(None), C["throttle_reasons"]), 0x4)
    fl.tick(10)
    assert not fl.alerts
    fl.on_values[1] = lambda v: v.__setitem__((2, C["throttle_reasons"]), 0x80)
    fl.tick(3)
    (a,) = fl.of(K.POWER_THROTTLE)
    assert a.host == "h01" and "hw_power_brake" in a.evidence["reasons"]


# -- peers ---------------------------------------------------------------------------------------------


def test_peer_outlier_host_low_util_and_power() -> None:
    fl = warm(MiniFleet(n_hosts=8))

    def slow(v: np.ndarray) -> None:
        v[:, C["gpu_util_pct"]] = 55
        v[:, C["power_w"]] = 70 + 5.6 * 55

    fl.on_values[5] = slow
    fl.tick(2)
    assert not fl.of(K.PEER_OUTLIER)
    fl.tick()
    (a,) = fl.of(K.PEER_OUTLIER)
    assert a.host == "h05" and a.gpu_index is None and a.job_id == "job-a"
    assert a.evidence["level"] == "host" and "gpu_util_pct" in a.evidence["metrics"] and a.evidence["samples"] == 3


def test_peer_outlier_single_gpu() -> None:
    fl = warm(MiniFleet(n_hosts=4))
    fl.on_values[2] = lambda v: v.__setitem__((3, C["gpu_util_pct"]), 30)
    fl.tick(3)
    (a,) = fl.of(K.PEER_OUTLIER)
    assert (a.host, a.gpu_index, a.evidence["level"], a.rank) == ("h02", 3, "gpu", 11)


def test_peer_outlier_quiet_when_job_is_bimodal_or_clean() -> None:
    fl = warm(MiniFleet(n_hosts=8), 200)
    for h in range(4):
        fl.on_values[h] = lambda v: v.__setitem__((slice(None), C["gpu_util_pct"]), 50)
    fl.tick(10)
    assert not fl.of(K.PEER_OUTLIER)


# -- training loop -------------------------------------------------------------------------------------


RecHook = Callable[[TrainRecord], TrainRecord]


def _set(field_name: str, value: float, from_step: int = -1, until: int = 10**9) -> RecHook:
    def f(rec: TrainRecord) -> TrainRecord:
        if from_step <= rec.step < until:
            setattr(rec, field_name, value)
        return rec
    return f


def _scale_loss(factor: Callable[[int], float]) -> RecHook:
    def f(rec: TrainRecord) -> TrainRecord:
        rec.loss *= factor(rec.step)
        return rec
    return f


def test_nan_loss_alerts_once_per_job() -> None:
    fl = warm(MiniFleet())
    for h in range(6):
        fl.on_record[h] = _set("loss", math.nan)
    got = fl.tick()
    (a,) = [x for x in got if x.kind == K.TRAIN_NONFINITE]
    assert a.job_id == "job-a" and a.evidence["field"] == "loss" and a.evidence["n_ranks"] == 24
    assert a.severity == K.CRITICAL and a.evidence["loss"] == "nan"


def test_nan_loss_from_a_rank_that_never_logged_loss_is_not_an_alert() -> None:
    fl = MiniFleet()
    for h in range(6):
        fl.on_record[h] = _set("loss", math.nan)
    fl.tick(40)
    assert not fl.alerts


def test_alternating_loss_logging_is_not_an_alert() -> None:
    fl = MiniFleet()
    flip = {"n": 0}

    def alt(rec: TrainRecord) -> TrainRecord:
        flip["n"] += 1
        if flip["n"] % 2:
            rec.loss = math.nan
        return rec

    fl.on_record[0] = alt
    fl.tick(60)
    assert not fl.alerts


def test_inf_loss_alerts_without_history() -> None:
    fl = MiniFleet()
    fl.tick(2)
    fl.on_record[3] = _set("loss", math.inf)
    fl.tick()
    (a,) = fl.of(K.TRAIN_NONFINITE)
    assert a.host == "h03" and a.evidence["loss"] == "inf"


def test_nonfinite_grad_needs_three_records() -> None:
    fl = warm(MiniFleet())
    fl.on_record[2] = _set("grad_norm", math.inf)
    fl.tick(2)
    assert not fl.alerts
    fl.tick()
    (a,) = fl.of(K.TRAIN_NONFINITE)
    assert a.evidence["field"] == "grad_norm" and a.host == "h02"


def test_single_inf_grad_from_amp_is_tolerated() -> None:
    fl = warm(MiniFleet())
    fl.on_record[2] = _set("grad_norm", math.inf, 45, 46)
    fl.tick(20)
    assert not fl.alerts


def test_loss_spike_needs_two_records() -> None:
    fl = warm(MiniFleet())
    s = int(fl.progress["job-a"]) + 1
    fl.on_record[1] = _scale_loss(lambda step: 3.0 if step == s else 1.0)
    fl.tick(5)
    assert not fl.alerts
    for h in range(6):
        fl.on_record[h] = _scale_loss(lambda step: 3.0 if s + 5 <= step < s + 8 else 1.0)
    fl.tick(6)
    (a,) = fl.of(K.LOSS_SPIKE)
    assert a.job_id == "job-a" and a.evidence["loss"] > 2 * a.evidence["baseline_mean"]
    assert not fl.of(K.LOSS_DIVERGENCE)


def test_loss_divergence() -> None:
    fl = warm(MiniFleet(), 60)
    s = int(fl.progress["job-a"]) + 1
    for h in range(6):
        fl.on_record[h] = _scale_loss(lambda step: 1 + 0.05 * max(0, step - s))
    fl.tick(40)
    (a,) = fl.of(K.LOSS_DIVERGENCE)
    assert a.severity == K.CRITICAL and a.evidence["loss_fast"] > 1.3 * a.evidence["best"]


def test_grad_explosion() -> None:
    fl = warm(MiniFleet())
    fl.on_record[4] = _set("grad_norm", 40.0, int(fl.progress["job-a"]) + 1, int(fl.progress["job-a"]) + 2)
    fl.tick(5)
    assert not fl.alerts
    for h in range(6):
        fl.on_record[h] = _set("grad_norm", 40.0)
    fl.tick(2)
    (a,) = fl.of(K.GRAD_EXPLOSION)
    assert a.evidence["grad_norm"] == 40.0 and a.evidence["baseline_mean"] < 1.2


def test_straggler_by_step_time() -> None:
    fl = warm(MiniFleet())
    fl.step_time[2] = 1.1
    fl.tick(10)
    assert not fl.alerts
    fl.step_time[2] = 1.6
    fl.tick(5)
    (a,) = fl.of(K.STRAGGLER)
    assert a.host == "h02" and a.evidence["ranks"] == [8, 9, 10, 11] and a.evidence["ratio"] > 1.4
    assert a.evidence["source"] == "step_time_s"


def test_rank_hang_while_peers_step() -> None:
    fl = warm(MiniFleet())
    fl.frozen.add(3)
    fl.tick(3)
    assert not fl.of(K.HANG)
    fl.tick(2)
    (a,) = fl.of(K.HANG)
    assert a.host == "h03" and a.evidence["scope"] == "ranks" and a.evidence["pid_on_gpu"] is True
    fl.frozen.clear()
    fl.tick(70)
    assert fl.of(K.HANG, K.RESOLVED)


def test_job_hang_with_live_processes() -> None:
    fl = warm(MiniFleet())
    fl.frozen.update(range(6))
    fl.tick(25)
    assert not fl.of(K.HANG)
    fl.tick(10)
    (a,) = fl.of(K.HANG)
    assert a.evidence["scope"] == "job" and a.evidence["pids_on_gpu"] == 24 and a.gpu_index is None


def test_job_end_is_not_a_hang_or_rank_exit() -> None:
    fl = warm(MiniFleet())
    for h in range(6):
        fl.events[h] = [Event(0, "process_exit", SEVERITY_INFO, g, fl.pid(fl.all_jobs[0], h, g), "exit")
                        for g in range(4)]
        for g in range(4):
            fl.stopped.add((h, g))
    fl.tick(90)
    assert not fl.alerts


def test_throughput_drop() -> None:
    fl = warm(MiniFleet(), 60)
    fl.rate["job-a"] = 0.5
    fl.tick(12)
    (a,) = fl.of(K.THROUGHPUT_DROP)
    assert a.evidence["drop_pct"] >= 30 and a.evidence["unit"].startswith("tokens")


def test_rank_exit_while_job_continues() -> None:
    fl = warm(MiniFleet())
    fl.stopped.add((1, 2))
    fl.events[1] = [Event(0, "process_exit", SEVERITY_INFO, 2, fl.pid(fl.all_jobs[0], 1, 2), "exit")]
    fl.tick(5)
    assert not fl.of(K.RANK_EXIT)
    fl.tick(8)
    (a,) = fl.of(K.RANK_EXIT)
    assert a.evidence["ranks"] == [6] and a.host == "h01"
    assert not fl.of(K.HANG)


# -- tampering -----------------------------------------------------------------------------------------


def _checksums(bad_hosts: set[int], group: Callable[[int], float] | None = None,
               distinct: bool = False) -> Callable[[int], Callable[[TrainRecord], TrainRecord]]:
    def for_host(h: int) -> Callable[[TrainRecord], TrainRecord]:
        def f(rec: TrainRecord) -> TrainRecord:
            if rec.step % 5 == 0:
                v = 123.456 + rec.step
                if distinct:
                    v += rec.rank
                if h in bad_hosts:
                    v += 0.25
                rec.extra["param_checksum"] = v
                if group is not None:
                    rec.extra["param_group"] = group(rec.rank)
            return rec
        return f
    return for_host


def test_param_checksum_mismatch_names_the_odd_replicas() -> None:
    fl = warm(MiniFleet())
    mk = _checksums({4})
    for h in range(6):
        fl.on_record[h] = mk(h)
    fl.tick(8)
    (a,) = fl.of(K.PARAM_CHECKSUM_MISMATCH)
    assert a.severity == K.CRITICAL and a.host == "h04" and a.rank == 16
    assert [m["rank"] for m in a.evidence["mismatched"]] == [16, 17, 18, 19]
    assert a.evidence["agreeing"] == 20 and a.evidence["reported"] == 24


def test_param_checksums_that_agree_or_cannot_be_judged_raise_nothing() -> None:
    fl = warm(MiniFleet())
    mk = _checksums(set())
    for h in range(6):
        fl.on_record[h] = mk(h)
    fl.tick(12)
    mk2 = _checksums(set(), distinct=True)  # tensor-parallel shards: every rank differs, no replicas known
    for h in range(6):
        fl.on_record[h] = mk2(h)
    fl.tick(12)
    assert not fl.alerts


def test_param_group_compares_declared_replicas() -> None:
    fl = warm(MiniFleet(n_hosts=2, gpus=2))
    mk = _checksums({1}, group=lambda rank: float(rank % 2), distinct=False)
    for h in range(2):
        fl.on_record[h] = mk(h)
    fl.tick(12)
    (a,) = fl.of(K.PARAM_CHECKSUM_MISMATCH)
    assert a.evidence["group"] in ("0", "1") and a.evidence["n_mismatched"] == 2


def test_code_fingerprint_change_is_critical_seed_change_warning() -> None:
    fl = warm(MiniFleet())
    fl.tick(2)
    fl.info[2] = {"code_fingerprint": "sha256:evil"}
    fl.reinit.add(2)
    fl.tick()
    (a,) = fl.of(K.FINGERPRINT_CHANGE)
    assert a.severity == K.CRITICAL and a.evidence["old"] == "sha256:c0de" and a.evidence["new"] == "sha256:evil"
    assert a.host == "h02"
    fl.tick(12)
    (m,) = fl.of(K.FINGERPRINT_MISMATCH)
    assert m.evidence["odd_ranks"] == [8, 9, 10, 11]
    fl.info = {h: {"seed": "99"} for h in range(6)}
    fl.reinit.update(range(6))
    fl.tick()
    seed = [a for a in fl.of(K.FINGERPRINT_CHANGE) if a.evidence["field"] == "seed"]
    assert seed and seed[0].severity == K.WARNING


def test_reinit_with_same_fingerprints_is_quiet() -> None:
    fl = warm(MiniFleet())
    fl.reinit.update(range(6))
    fl.tick(15)
    assert not fl.alerts


def _scale_fleet() -> MiniFleet:
    jobs = [Job("big-1", [0, 1, 2, 3], 4), Job("big-2", [4, 5, 6, 7], 4), Job("small", [8], 4)]
    return MiniFleet(n_hosts=9, jobs=jobs, config=DetectConfig(scale_threshold_gpus=16))


def test_scale_conditional_anomaly_only_in_large_jobs() -> None:
    fl = warm(_scale_fleet())
    for h in range(8):
        fl.on_record[h] = _set("loss", math.nan)
    fl.tick(3)
    (a,) = fl.of(K.SCALE_CONDITIONAL)
    assert a.evidence["anomaly_kind"] == K.TRAIN_NONFINITE
    assert a.evidence["large_jobs"] == {"big-1": 16, "big-2": 16} and a.evidence["small_jobs_clean"] == ["small"]


def test_scale_conditional_quiet_when_small_jobs_fail_too() -> None:
    fl = warm(_scale_fleet())
    for h in range(9):
        fl.on_record[h] = _set("loss", math.nan)
    fl.tick(3)
    assert len(fl.of(K.TRAIN_NONFINITE)) == 3 and not fl.of(K.SCALE_CONDITIONAL)


# -- host integrity ------------------------------------------------------------------------------------


def test_modified_torch_file_is_critical_and_names_the_file() -> None:
    fl = warm(MiniFleet())
    path = "/usr/lib/python3/site-packages/torch/optim/adamw.py"
    fl.events[0] = [Event(0, "record_mismatch", SEVERITY_WARNING, -1, 0, "changed",
                          {"path": path, "package": "torch", "expected_sha256": "aa", "actual_sha256": "bb"})]
    fl.events[1] = [Event(0, "file_changed", SEVERITY_WARNING, -1, 0, "changed", {"path": "/srv/code/notes.txt"})]
    fl.tick()
    by = {a.host: a for a in fl.of(K.FILE_INTEGRITY)}
    assert by["h00"].severity == K.CRITICAL and by["h00"].evidence["path"] == path
    assert by["h00"].evidence["expected_sha256"] == "aa" and by["h00"].evidence["actual_sha256"] == "bb"
    assert by["h01"].severity == K.WARNING
    assert by["h00"].dedup_key == f"file_integrity:h00:{path}"


def test_foreign_process_on_a_job_gpu() -> None:
    fl = warm(MiniFleet())
    fl.extra_procs[3] = [GpuProcess(1, 66_666, 800.0)]
    fl.tick()
    assert not fl.of(K.FOREIGN_PROCESS)
    fl.tick()
    (a,) = fl.of(K.FOREIGN_PROCESS)
    assert (a.host, a.gpu_index, a.job_id) == ("h03", 1, "job-a") and a.evidence["pid"] == 66_666
    assert a.evidence["registered_to"] is None and a.evidence["job_ranks_on_gpu"] == [13]
    del fl.extra_procs[3]
    fl.tick(65)
    assert fl.of(K.FOREIGN_PROCESS, K.RESOLVED)


def test_rank_contexts_on_gpu0_and_idle_gpus_are_not_foreign() -> None:
    jobs = [Job("job-a", [0, 1], 2)]  # GPUs 2 and 3 idle
    fl = warm(MiniFleet(n_hosts=2, jobs=jobs))
    fl.extra_procs[0] = [GpuProcess(0, fl.pid(jobs[0], 0, 1), 500.0),  # rank 1 also holds a context on GPU 0
                         GpuProcess(3, 55_555, 900.0)]  # someone on an idle GPU
    fl.tick(5)
    assert not fl.alerts


@pytest.mark.parametrize("skew", [0.0, 8.0])
def test_clean_fleet_with_clock_skew_raises_nothing(skew: float) -> None:
    fl = MiniFleet(n_hosts=8, skew_s=skew, seed=3)
    fl.tick(300)
    assert fl.alerts == {}


def test_group_median_matches_numpy_per_group() -> None:
    from console.detect.rules import _groups, group_median

    rng = np.random.default_rng(7)
    ids = np.sort(rng.integers(0, 9, 300))
    x = rng.normal(size=(300, 3))
    x[rng.random((300, 3)) < 0.1] = np.nan
    x[ids == 4, 1] = np.nan  # a group/column with no finite value
    starts, counts = _groups(ids)
    got = group_median(x, starts, counts)
    for g, (s, c) in enumerate(zip(starts, counts, strict=True)):
        for col in range(3):
            block = x[s:s + c, col]
            want = np.nanmedian(block) if np.isfinite(block).any() else np.nan
            assert (np.isnan(want) and np.isnan(got[g, col])) or got[g, col] == pytest.approx(want)
