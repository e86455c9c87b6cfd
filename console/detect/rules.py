"""Detection rules: each class states its rule (thresholds, persistence) in its docstring.

Rules are fed by `console.detect.engine.DetectionEngine`, which batches what arrived since the
last evaluation: GPU samples as [frames, gpus, metrics] arrays (`on_samples`), agent events one
by one (`on_event`), SDK init records (`on_init`), log records as columns (`on_records`), GPU
process lists (`on_processes`), then `periodic` once per evaluation for cross-host comparisons.
docs/detection.md lists every rule with its evidence fields and the threats (T1..T10) it covers.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from console.detect import alerts as K
from console.detect.state import DetectState, HostState, JobState
from protos.types import GPU_ERROR, GPU_LOST, METRIC_INDEX, SEVERITY_CRITICAL, Event, Frame, TrainRecord

_C: Final = METRIC_INDEX
_MAX_LISTED: Final = 16  # ranks/hosts listed in one alert's evidence


@dataclass(slots=True)
class SampleBatch:
    """One round of frames, at most one per host: host slots, host-clock ts, values, states."""

    slots: np.ndarray  # [n] int
    ts: np.ndarray  # [n] int64, each host's own clock
    values: np.ndarray  # [n, G, M] float32
    state: np.ndarray  # [n, G] int
    present: np.ndarray  # [n, G] bool


@dataclass(slots=True)
class RecordBatch:
    """SDK log records of one evaluation as columns, plus per-rank grouping."""

    ridx: np.ndarray
    step: np.ndarray
    loss: np.ndarray
    grad: np.ndarray
    ts: np.ndarray
    step_time: np.ndarray
    tokens: np.ndarray
    checksums: list[tuple[int, float, str]] = field(default_factory=list)  # (position, value, group)
    uniq: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    inv: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    last_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def group(self) -> None:
        """Compute uniq ranks, the inverse map, counts and each rank's last record position."""
        n = len(self.ridx)
        self.uniq, self.inv, self.counts = np.unique(self.ridx, return_inverse=True, return_counts=True)
        _, first_rev = np.unique(self.ridx[::-1], return_index=True)
        self.last_pos = n - 1 - first_rev

    def per_rank_sum(self, weights: np.ndarray) -> np.ndarray:
        """Sum of `weights` per uniq rank."""
        return np.bincount(self.inv, weights=weights, minlength=len(self.uniq))


class Rule:
    """Base class: every hook is a no-op. `kinds` are the alert kinds the rule raises."""

    kinds: tuple[str, ...] = ()
    auto_resolve: bool = False  # resolve alerts whose condition stopped holding (DetectConfig.resolve_after_s)

    def on_samples(self, st: DetectState, b: SampleBatch) -> None:
        """GPU samples of one round."""

    def on_event(self, st: DetectState, host: HostState, ev: Event) -> None:
        """One agent event."""

    def on_init(self, st: DetectState, host: HostState, rec: TrainRecord, ridx: int) -> None:
        """One SDK init record (already registered as rank `ridx`)."""

    def on_records(self, st: DetectState, b: RecordBatch) -> None:
        """All log records of this evaluation."""

    def on_processes(self, st: DetectState, host: HostState, frame: Frame, changed: bool) -> None:
        """The GPU process list of a frame (after its records were registered)."""

    def periodic(self, st: DetectState) -> None:
        """Once per evaluation, after all inputs."""

    def observe(self, st: DetectState, changed: list[K.Alert]) -> None:
        """Alerts other rules raised or changed in this evaluation (meta rules)."""


# -- helpers -----------------------------------------------------------------------------------------


def _host_name(st: DetectState, slot: int) -> str:
    return st.host_list[int(slot)].name


def _f(v: Any, nd: int = 4) -> float | None:
    x = float(v)
    return round(x, nd) if math.isfinite(x) else None


def _gpu_snapshot(values: np.ndarray) -> dict[str, float | None]:
    return {name: _f(values[_C[name]], 2) for name in ("gpu_util_pct", "temp_c", "power_w", "power_limit_w",
                                                         "sm_clock_mhz", "throttle_reasons")}


def _run_update(run: np.ndarray, onset: np.ndarray, flag: np.ndarray, ts: np.ndarray | int) -> tuple[
        np.ndarray, np.ndarray]:
    """Consecutive-sample counters: +1 where flagged, 0 elsewhere; onset = ts of the first flagged."""
    new_run = np.where(flag, run + 1, 0)
    new_onset = np.where(flag & (run == 0), ts, np.where(flag, onset, 0))
    return new_run, new_onset


# -- GPU health --------------------------------------------------------------------------------------

# XID -> (severity, meaning); NVIDIA's Xid catalog. Unknown XIDs are warnings.
XID_TABLE: Final[dict[int, tuple[str, str]]] = {
    13: (K.WARNING, "graphics engine exception (often the application)"),
    31: (K.WARNING, "GPU memory page fault (often the application)"),
    43: (K.WARNING, "GPU stopped processing (often the application)"),
    45: (K.WARNING, "preemptive cleanup after earlier errors"),
    48: (K.CRITICAL, "double-bit ECC error"),
    61: (K.CRITICAL, "internal micro-controller breakpoint/warning"),
    62: (K.CRITICAL, "internal micro-controller halt"),
    63: (K.WARNING, "ECC page retirement or row remapping recorded"),
    64: (K.CRITICAL, "ECC page retirement or row remapper failure"),
    74: (K.CRITICAL, "NVLink error"),
    79: (K.CRITICAL, "GPU has fallen off the bus"),
    92: (K.WARNING, "high single-bit ECC error rate"),
    94: (K.WARNING, "contained ECC error"),
    95: (K.CRITICAL, "uncontained ECC error"),
    109: (K.WARNING, "context switch timeout"),
    119: (K.CRITICAL, "GSP RPC timeout"),
    120: (K.CRITICAL, "GSP error"),
    140: (K.CRITICAL, "unrecovered ECC error"),
}


def _xid_of(ev: Event) -> int | None:
    raw = ev.attrs.get("xid") or ev.detail.replace("XID", "").strip().split(" ")[0]
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


class XidRule(Rule):
    """XID: every `xid` event raises `xid` for (host, GPU, XID) at once.

    Severity from XID_TABLE (48, 61-62, 64, 74, 79, 95, 119-120, 140 critical; others warning).
    Repeats of the same XID update the one alert (evidence `count`, `last_ns`). No persistence:
    the driver reports an XID once per occurrence. Never auto-resolves (an operator closes it).
    Evidence: xid, meaning, detail, count, first_ns, last_ns.
    """

    kinds = (K.XID,)

    def on_event(self, st: DetectState, host: HostState, ev: Event) -> None:
        if ev.kind != "xid":
            return
        xid = _xid_of(ev)
        sev, meaning = XID_TABLE.get(xid or -1, (K.WARNING, "see NVIDIA's Xid catalog"))
        gpu = ev.gpu_index if ev.gpu_index >= 0 else None
        key = K.dedup_key(K.XID, host.name, gpu, xid)
        prev = st.book.alerts.get(key)
        count = 1
        first = ev.ts_unix_ns
        if prev is not None and prev.state != K.RESOLVED:
            count = int(prev.evidence.get("count", 0)) + 1
            first = int(prev.evidence.get("first_ns", ev.ts_unix_ns))
        st.book.raise_(
            K.XID, st.now_ns, first, {"xid": xid, "meaning": meaning, "detail": ev.detail, "count": count,
                                      "first_ns": first, "last_ns": ev.ts_unix_ns},
            key=key, severity=sev, host=host.name, gpu_index=gpu,
        )


class GpuStateRule(Rule):
    """Lost GPU and failing readings.

    `gpu_lost` (critical): a sample with gpu_state LOST, or a `gpu_lost` event, at once.
    `gpu_error` (warning): gpu_state ERROR in `gpu_error_samples` (3) consecutive samples of the GPU
    (the NVML collector marks ERROR for one tick on an unknown error; one tick is noise).
    Both resolve when the GPU reports OK again for `resolve_after_s`.
    Evidence: gpu_state, samples, detail (event), last readings.
    """

    kinds = (K.GPU_LOST, K.GPU_ERROR)
    auto_resolve = True

    def on_samples(self, st: DetectState, b: SampleBatch) -> None:
        f = st.fleet
        lost = b.present & (b.state == GPU_LOST)
        err = b.present & (b.state == GPU_ERROR)
        run, onset = _run_update(f.ints["err_run"][b.slots], f.ints["err_onset"][b.slots], err, b.ts[:, None])
        f.ints["err_run"][b.slots] = run
        f.ints["err_onset"][b.slots] = onset
        lost_onset = f.ints["lost_seen"][b.slots]
        lost_onset = np.where(lost, np.where(lost_onset == 0, b.ts[:, None], lost_onset), 0)
        f.ints["lost_seen"][b.slots] = lost_onset
        for i, g in zip(*np.nonzero(lost), strict=True):
            host = _host_name(st, int(b.slots[i]))
            st.book.raise_(K.GPU_LOST, st.now_ns, int(lost_onset[i, g]), {"gpu_state": "lost"},
                           key=K.dedup_key(K.GPU_LOST, host, int(g)), host=host, gpu_index=int(g))
        for i, g in zip(*np.nonzero(run >= st.config.gpu_error_samples), strict=True):
            host = _host_name(st, int(b.slots[i]))
            st.book.raise_(K.GPU_ERROR, st.now_ns, int(onset[i, g]),
                           {"gpu_state": "error", "samples": int(run[i, g])},
                           key=K.dedup_key(K.GPU_ERROR, host, int(g)), host=host, gpu_index=int(g))

    def on_event(self, st: DetectState, host: HostState, ev: Event) -> None:
        if ev.kind != "gpu_lost":
            return
        gpu = ev.gpu_index if ev.gpu_index >= 0 else None
        st.book.raise_(K.GPU_LOST, st.now_ns, ev.ts_unix_ns, {"gpu_state": "lost", "detail": ev.detail, **ev.attrs},
                       key=K.dedup_key(K.GPU_LOST, host.name, gpu), host=host.name, gpu_index=gpu)


class EccRule(Rule):
    """Memory errors, per GPU, at the first sample that shows them (no persistence: counters only grow).

    `ecc_uncorrected` (critical): ecc_uncorrected (volatile, since driver load) > 0, re-emitted when
    it grows. `row_remap_failure` (critical): remap_failure >= 1. `retired_pages` (warning):
    retired_pages / remapped rows above the first value seen for the GPU. Never auto-resolve.
    Evidence: the counter, its previous value, temp/power/clock snapshot.
    """

    kinds = (K.ECC_UNCORRECTED, K.ROW_REMAP_FAILURE, K.RETIRED_PAGES)

    def on_samples(self, st: DetectState, b: SampleBatch) -> None:
        fl = st.fleet.floats
        v = b.values
        ecc = v[:, :, _C["ecc_uncorrected"]]
        remap = v[:, :, _C["remap_failure"]]
        ret = v[:, :, _C["retired_pages"]]
        ecc_prev = fl["ecc_alerted"][b.slots]
        remap_prev = fl["remap_alerted"][b.slots]
        base = fl["retired_base"][b.slots]
        base = np.where(np.isnan(base) & np.isfinite(ret), ret, base)
        fl["retired_base"][b.slots] = base
        ret_prev = np.maximum(np.nan_to_num(base, nan=np.inf), fl["retired_alerted"][b.slots])
        with np.errstate(invalid="ignore"):
            hit_ecc = ecc > ecc_prev
            hit_remap = (remap >= 1) & (remap_prev < 1)
            hit_ret = ret > ret_prev
        if not (hit_ecc.any() or hit_remap.any() or hit_ret.any()):
            return
        for mask, kind, col, arr_name in (
            (hit_ecc, K.ECC_UNCORRECTED, ecc, "ecc_alerted"),
            (hit_remap, K.ROW_REMAP_FAILURE, remap, "remap_alerted"),
            (hit_ret, K.RETIRED_PAGES, ret, "retired_alerted"),
        ):
            for i, g in zip(*np.nonzero(mask), strict=True):
                slot = int(b.slots[i])
                host = _host_name(st, slot)
                prev = float(fl[arr_name][slot, g])
                fl[arr_name][slot, g] = float(col[i, g])
                ev: dict[str, Any] = {kind if kind != K.RETIRED_PAGES else "retired_pages": float(col[i, g]),
                                      "previous": prev, **_gpu_snapshot(v[i, g])}
                if kind == K.RETIRED_PAGES:
                    ev["at_first_sample"] = _f(base[i, g])
                st.book.raise_(kind, st.now_ns, int(b.ts[i]), ev, key=K.dedup_key(kind, host, int(g)),
                               host=host, gpu_index=int(g))


THERMAL_BITS: Final = 0x20 | 0x40  # SW thermal slowdown, HW thermal slowdown
POWER_BITS: Final = 0x08 | 0x80  # HW slowdown, HW power brake slowdown
_REASONS: Final = {0x1: "gpu_idle", 0x2: "app_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
                   0x10: "sync_boost", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake",
                   0x100: "display_clocks"}


def decode_throttle(bits: int) -> list[str]:
    """Names of the set clock-event-reason bits."""
    return [name for bit, name in _REASONS.items() if bits & bit]


class ThrottleRule(Rule):
    """Clock throttling that costs performance, per GPU.

    `thermal_throttle`: reasons & (SW thermal 0x20 | HW thermal 0x40) in `throttle_samples` (3)
    consecutive samples. `power_throttle`: reasons & (HW slowdown 0x08 | HW power brake 0x80) in 3
    consecutive samples. SW power cap (0x04) is normal at full load and is not alerted. Both are
    warnings and resolve after `resolve_after_s` without the bits.
    Evidence: reasons (names), samples, temp_c, power_w, power_limit_w, sm_clock_mhz.
    """

    kinds = (K.THERMAL_THROTTLE, K.POWER_THROTTLE)
    auto_resolve = True

    def on_samples(self, st: DetectState, b: SampleBatch) -> None:
        f = st.fleet
        raw = b.values[:, :, _C["throttle_reasons"]]
        bits = np.nan_to_num(raw, nan=0.0).astype(np.int64)
        for kind, mask_bits, prefix in ((K.THERMAL_THROTTLE, THERMAL_BITS, "therm"),
                                        (K.POWER_THROTTLE, POWER_BITS, "power")):
            flag = b.present & ((bits & mask_bits) != 0)
            run_a, onset_a = f.ints[f"{prefix}_run"], f.ints[f"{prefix}_onset"]
            run, onset = _run_update(run_a[b.slots], onset_a[b.slots], flag, b.ts[:, None])
            run_a[b.slots] = run
            onset_a[b.slots] = onset
            for i, g in zip(*np.nonzero(run >= st.config.throttle_samples), strict=True):
                host = _host_name(st, int(b.slots[i]))
                ev = {"reasons": decode_throttle(int(bits[i, g])), "samples": int(run[i, g]),
                      **_gpu_snapshot(b.values[i, g])}
                st.book.raise_(kind, st.now_ns, int(onset[i, g]), ev, key=K.dedup_key(kind, host, int(g)),
                               host=host, gpu_index=int(g))


# -- peers (Minder-style) ----------------------------------------------------------------------------

# (name, floor of the robust scale). Features per GPU; a job's GPUs are compared with each other.
PEER_FEATURES: Final[tuple[tuple[str, float], ...]] = (
    ("gpu_util_pct", 5.0),
    ("power_frac", 0.03),
    ("sm_clock_mhz", 75.0),
    ("mem_util_pct", 5.0),
    ("pcie_log", 0.5),
)


def peer_features(v: np.ndarray) -> np.ndarray:
    """[k, M] samples -> [k, F] features (util, power/limit, SM clock, mem util, log PCIe)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        power_frac = v[:, _C["power_w"]] / v[:, _C["power_limit_w"]]
        pcie = np.log1p(np.maximum(v[:, _C["pcie_tx_kbs"]] + v[:, _C["pcie_rx_kbs"]], 0.0))
    return np.stack([v[:, _C["gpu_util_pct"]], power_frac, v[:, _C["sm_clock_mhz"]], v[:, _C["mem_util_pct"]],
                     pcie], axis=1).astype(np.float64)


_FLOORS: Final = np.array([fl for _, fl in PEER_FEATURES])
_FNAMES: Final = [n for n, _ in PEER_FEATURES]


def robust_z(x: np.ndarray, floors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """|x - median| / max(1.4826 MAD, floor) per column; returns (z, median, scale)."""
    med = np.median(x, axis=0)
    mad = np.median(np.abs(x - med), axis=0)
    scale = np.maximum(1.4826 * mad, floors)
    return np.abs(x - med) / scale, med, scale


class PeerOutlierRule(Rule):
    """Minder-style machine-level similarity with continuity, per job.

    Every evaluation, for each job with >= `peer_min_gpus` (4) active GPUs (a rank logged within
    `rank_active_s`, for at least `peer_warmup_s`, on a host with a fresh frame), each GPU's features
    (gpu_util_pct, power_w/power_limit_w, sm_clock_mhz, mem_util_pct, log PCIe tx+rx) are turned into
    robust z-scores against the job's GPUs: |x - median| / max(1.4826 MAD, floor), floors
    (5 pts, 0.03, 75 MHz, 5 pts, 0.5). A GPU's score is its largest z; the same is done on
    per-host means when the job spans >= `peer_min_hosts` (3) hosts. Score > `peer_z` (6) in
    `peer_samples` (3) consecutive fresh samples raises `peer_outlier` for the host (gpu_index None)
    or, when the host as a whole is not an outlier, for the GPU. If more than `peer_max_fraction`
    (25%) of a job's hosts/GPUs score high, the job is bimodal and nothing is flagged. NaN features
    (lost GPU, unsupported field) drop out. Resolves after `resolve_after_s` back in line.
    Evidence: job, score, metrics {name: value, median, z} (top 3), peers, samples.
    """

    kinds = (K.PEER_OUTLIER,)
    auto_resolve = True

    def periodic(self, st: DetectState) -> None:
        r = st.ranks
        n = r.n
        if n == 0:
            return
        cfg = st.config
        f = st.fleet
        fresh = st.fresh_slots()
        slot = r.slot[:n]
        gpu = r.gpu[:n]
        host_ts = f.host_ints["last_ts"][slot]
        active = (
            ~r.exited[:n] & fresh[slot] & (gpu >= 0) & (gpu < f.G)
            & (host_ts - r.i("last_ts")[:n] <= cfg.ns(cfg.rank_active_s))
            & (host_ts - r.i("first_ts")[:n] >= cfg.ns(cfg.peer_warmup_s))
        )
        idx = np.flatnonzero(active)
        if len(idx) < cfg.peer_min_gpus:
            return
        # every job at once: rows sorted by job, medians per job via group_median
        idx = idx[np.argsort(r.job[idx], kind="stable")]
        jobs = r.job[idx]
        starts, counts = _groups(jobs)
        big = np.repeat(counts >= cfg.peer_min_gpus, counts)
        idx, jobs = idx[big], jobs[big]
        if len(idx) == 0:
            return
        starts, counts = _groups(jobs)
        x = peer_features(f.values[slot[idx], gpu[idx]])
        fin = np.isfinite(x)
        frac = np.add.reduceat(fin.astype(np.float64), starts, axis=0) / counts[:, None]
        use = np.repeat(frac >= 0.9, counts, axis=0)  # [rows, F]: a feature most of the job reports
        valid = (fin | ~use).all(axis=1)  # rows with a NaN in a used feature sit out
        xv = np.where(use & valid[:, None], x, np.nan)
        med = group_median(xv, starts, counts)
        medr = np.repeat(med, counts, axis=0)
        mad = group_median(np.abs(xv - medr), starts, counts)
        scale = np.maximum(1.4826 * np.nan_to_num(mad, nan=0.0), _FLOORS)
        z = np.where(use, np.abs(x - medr) / np.repeat(scale, counts, axis=0), 0.0)
        z = np.where(valid[:, None], np.nan_to_num(z, nan=0.0), 0.0)
        gscore = z.max(axis=1)
        gflag = valid & (gscore > cfg.peer_z)
        gfrac = np.add.reduceat(gflag.astype(np.float64), starts) / counts
        gflag &= np.repeat(gfrac <= cfg.peer_max_fraction, counts)
        new_frame = np.zeros(f.S, bool)
        new_frame[: len(st.host_list)] = np.fromiter((h.fresh_frame for h in st.host_list), bool, len(st.host_list))
        slots = slot[idx]
        gpus = gpu[idx]
        # host level: per (job, host) means of valid rows, compared within the job
        hkey = jobs * f.S + slots
        uh, hinv = np.unique(hkey, return_inverse=True)
        hjob = uh // f.S
        hslot = uh % f.S
        w = valid.astype(np.float64)
        hcnt = np.bincount(hinv, weights=w, minlength=len(uh))
        hsum = np.stack([np.bincount(hinv, weights=np.where(valid, np.nan_to_num(x[:, c]), 0.0),
                                     minlength=len(uh)) for c in range(x.shape[1])], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            hx: np.ndarray = hsum / hcnt[:, None]
        hx[hcnt == 0] = np.nan
        hstarts, hcounts = _groups(hjob)
        huse = np.repeat(np.add.reduceat(use.astype(np.float64), starts, axis=0) > 0, hcounts, axis=0)
        hxv = np.where(huse, hx, np.nan)
        hmed = group_median(hxv, hstarts, hcounts)
        hmedr = np.repeat(hmed, hcounts, axis=0)
        hmad = group_median(np.abs(hxv - hmedr), hstarts, hcounts)
        hscale = np.maximum(1.4826 * np.nan_to_num(hmad, nan=0.0), _FLOORS)
        hz = np.nan_to_num(np.where(huse, np.abs(hx - hmedr) / np.repeat(hscale, hcounts, axis=0), 0.0), nan=0.0)
        hscore = hz.max(axis=1)
        enough = np.repeat(hcounts >= cfg.peer_min_hosts, hcounts)
        hflag = enough & (hcnt > 0) & (hscore > cfg.peer_z)
        hfrac = np.add.reduceat(hflag.astype(np.float64), hstarts) / hcounts
        hflag &= np.repeat(hfrac <= cfg.peer_max_fraction, hcounts)
        # persistence, counted only on hosts that sent a new frame
        hi = f.host_ints
        upd = new_frame[hslot]
        run, onset = _run_update(hi["peer_run"][hslot], hi["peer_onset"][hslot], hflag, hi["last_ts"][hslot])
        hi["peer_run"][hslot] = np.where(upd, run, hi["peer_run"][hslot])
        hi["peer_onset"][hslot] = np.where(upd, onset, hi["peer_onset"][hslot])
        names = _FNAMES
        for h in np.flatnonzero(hflag & (hi["peer_run"][hslot] >= cfg.peer_samples)).tolist():
            s = int(hslot[h])
            job = st.job_list[int(hjob[h])]
            jm = int(np.searchsorted(hstarts, h, side="right") - 1)
            top = [c for c in np.argsort(-hz[h])[:3].tolist() if hz[h, c] > 0]
            host = _host_name(st, s)
            ev = {
                "job": job.job_id, "level": "host", "score": _f(hscore[h], 2),
                "metrics": {names[c]: {"value": _f(hx[h, c]), "median": _f(hmed[jm, c]), "z": _f(hz[h, c], 2)}
                            for c in top},
                "peers": int(hcounts[jm]), "samples": int(hi["peer_run"][s]),
            }
            st.book.raise_(K.PEER_OUTLIER, st.now_ns, int(hi["peer_onset"][s]), ev,
                           key=K.dedup_key(K.PEER_OUTLIER, host, None), host=host, job_id=job.job_id)
        # GPU level, skipped on hosts that are outliers as a whole
        run_a, onset_a = f.ints["peer_run"], f.ints["peer_onset"]
        upd_g = new_frame[slots]
        run_g, onset_g = _run_update(run_a[slots, gpus], onset_a[slots, gpus], gflag, hi["last_ts"][slots])
        run_a[slots, gpus] = np.where(upd_g, run_g, run_a[slots, gpus])
        onset_a[slots, gpus] = np.where(upd_g, onset_g, onset_a[slots, gpus])
        host_out = np.zeros(f.S, bool)
        host_out[hslot[hflag]] = True
        for k in np.flatnonzero(gflag & (run_a[slots, gpus] >= cfg.peer_samples) & ~host_out[slots]).tolist():
            s, g = int(slots[k]), int(gpus[k])
            jm = int(np.searchsorted(starts, k, side="right") - 1)
            job = st.job_list[int(jobs[k])]
            host = _host_name(st, s)
            top = [c for c in np.argsort(-z[k])[:3].tolist() if z[k, c] > 0]
            rank = int(r.rank[idx[k]])
            ev = {
                "job": job.job_id, "level": "gpu", "score": _f(gscore[k], 2), "rank": rank,
                "metrics": {names[c]: {"value": _f(x[k, c]), "median": _f(med[jm, c]), "z": _f(z[k, c], 2)}
                            for c in top},
                "peers": int(counts[jm]), "samples": int(run_a[s, g]),
            }
            st.book.raise_(K.PEER_OUTLIER, st.now_ns, int(onset_a[s, g]), ev,
                           key=K.dedup_key(K.PEER_OUTLIER, host, g), host=host, gpu_index=g, job_id=job.job_id,
                           rank=rank)


def _groups(sorted_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, counts) of the runs of equal values in a sorted id array."""
    n = len(sorted_ids)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.concatenate(([0], np.flatnonzero(np.diff(sorted_ids)) + 1))
    counts = np.diff(np.concatenate((starts, [n])))
    return starts, counts


def group_median(x: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-group, per-column median of x [rows, F] (rows grouped contiguously), ignoring NaN.

    One sort for all groups: rows are ordered by (group, value) per column; NaN sorts last in its
    group and is left out. A group/column without finite values gives NaN.
    """
    rows, nf = x.shape
    gid = np.repeat(np.arange(len(starts)), counts)
    out = np.full((len(starts), nf), np.nan)
    for c in range(nf):
        col = x[:, c]
        order = np.lexsort((col, gid))
        xs = col[order]
        nfin = np.add.reduceat(np.isfinite(xs).astype(np.int64), starts) if rows else np.zeros(0, np.int64)
        ok = nfin > 0
        lo = starts + np.maximum(nfin - 1, 0) // 2
        hi = starts + nfin // 2
        hi = np.where(ok, hi, starts)
        out[:, c] = np.where(ok, (xs[lo] + xs[hi]) / 2.0, np.nan)
    return out


# -- training loop -----------------------------------------------------------------------------------


def _raise_by_job(st: DetectState, kind: str, b: RecordBatch, pos: np.ndarray, what: str,
                  values: np.ndarray, extra: dict[str, Any], onset: np.ndarray | None = None,
                  severity: str | None = None, scope: str | None = None) -> None:
    """One alert per job for flagged record positions `pos`; names the earliest-step rank."""
    r = st.ranks
    if len(pos) == 0:
        return
    jobs = r.job[b.ridx[pos]]
    for j in np.unique(jobs):
        pj = pos[jobs == j]
        first = int(pj[np.argmin(b.step[pj])])
        ri = int(b.ridx[first])
        ranks = sorted({int(x) for x in r.rank[b.ridx[pj]]})
        job = st.job_list[int(j)]
        ev = {what: _f(values[first], 6) if math.isfinite(float(values[first])) else str(float(values[first])),
              "step": int(b.step[first]), "ranks": ranks[:_MAX_LISTED], "n_ranks": len(ranks),
              "world_size": job.world_size, **extra}
        for k, arr in extra.items():
            if isinstance(arr, np.ndarray):
                ev[k] = _f(arr[first], 6)
        t0 = int(onset[first]) if onset is not None and onset[first] else int(b.ts[first])
        st.book.raise_(kind, st.now_ns, t0, ev, key=K.dedup_key(kind, job.job_id, scope), severity=severity,
                       host=_host_name(st, int(r.slot[ri])), job_id=job.job_id, rank=int(r.rank[ri]))


class NonFiniteRule(Rule):
    """NaN or Inf in loss or grad norm.

    The SDK sends NaN for "not given", so a NaN counts only for a rank that has reported a finite
    value of that field in >= `nonfinite_after_finite` (3) consecutive records before (it is
    "armed"); +/-Inf loss counts always. Loss: one record is enough (critical). Grad norm: AMP loss
    scaling skips a step on an inf/NaN grad now and then, so `grad_nonfinite_records` (3)
    consecutive non-finite records are needed. One alert per (job, field), naming the earliest
    step's rank. Evidence: loss|grad_norm, step, ranks, n_ranks, world_size.
    """

    kinds = (K.TRAIN_NONFINITE,)

    def on_records(self, st: DetectState, b: RecordBatch) -> None:
        r = st.ranks
        need = st.config.nonfinite_after_finite
        for name, vals, run_n, armed_n in (("loss", b.loss, "fin_run", "l_armed"),
                                          ("grad_norm", b.grad, "gfin_run", "g_armed")):
            fin = np.isfinite(vals)
            run = r.i(run_n)
            armed = r.i(armed_n)
            armed_b = (armed[b.ridx] > 0) | (run[b.ridx] >= need)
            nonfin = ~fin & armed_b
            cnt_fin = b.per_rank_sum(fin.astype(np.float64)).astype(np.int64)
            all_fin = cnt_fin == b.counts
            run[b.uniq] = np.where(all_fin, run[b.uniq] + cnt_fin, 0)
            armed[b.uniq] = np.where(run[b.uniq] >= need, 1, armed[b.uniq])
            if name == "loss":
                flagged = nonfin | np.isinf(vals)
            else:
                nf_run = r.i("gnf_run")
                nf_onset = r.i("gnf_onset")
                cnt_nf = b.counts - cnt_fin
                last_nf = ~fin[b.last_pos]
                prev = nf_run[b.uniq]
                new = np.where(cnt_nf == b.counts, prev + cnt_nf, np.where(last_nf, 1, 0))
                first_ts = np.where(prev == 0, b.ts[b.last_pos], nf_onset[b.uniq])
                nf_onset[b.uniq] = np.where(new > 0, first_ts, 0)
                nf_run[b.uniq] = new
                flagged = nonfin & (nf_run[b.ridx] >= st.config.grad_nonfinite_records)
            pos = np.nonzero(flagged)[0]
            if len(pos):
                onset = r.i("gnf_onset")[b.ridx] if name == "grad_norm" else None
                _raise_by_job(st, K.TRAIN_NONFINITE, b, pos, name, vals, {"field": name}, onset=onset, scope=name)


class LossSpikeRule(Rule):
    """Loss spike, per rank against its own recent level.

    Baseline: EWMA mean/variance of the rank's finite, non-spiking losses (alpha `loss_alpha` 0.05
    per record). After `loss_warmup` (20) records, a loss > mean + max(`spike_sigma` (6) sigma,
    `spike_rel` (0.2) |mean|, 1e-3) is a spiking record; `spike_records` (2) consecutive spiking
    records raise `loss_spike` (one per job). Spiking records do not move the baseline. Resolves
    after `resolve_after_s` without spikes. Evidence: loss, baseline_mean, baseline_std, step, ranks.
    """

    kinds = (K.LOSS_SPIKE,)
    auto_resolve = True

    def on_records(self, st: DetectState, b: RecordBatch) -> None:
        cfg = st.config
        r = st.ranks
        loss = b.loss
        fin = np.isfinite(loss)
        m = r.f("l_mean")[b.ridx]
        sd = np.sqrt(np.nan_to_num(r.f("l_var")[b.ridx], nan=0.0))
        n = r.i("l_n")[b.ridx]
        thr = m + np.maximum(np.maximum(cfg.spike_sigma * sd, cfg.spike_rel * np.abs(m)), 1e-3)
        with np.errstate(invalid="ignore"):
            spike = fin & (n >= cfg.loss_warmup) & (loss > thr)
        ok = fin & ~spike
        # baseline update from non-spiking finite records
        cnt_ok = b.per_rank_sum(ok.astype(np.float64))
        sum_ok = b.per_rank_sum(np.where(ok, loss, 0.0))
        mean_b = r.f("l_mean")[b.uniq]
        have = cnt_ok > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            xbar = sum_ok / np.maximum(cnt_ok, 1)
            d2 = b.per_rank_sum(np.where(ok, (loss - np.nan_to_num(m, nan=0.0)) ** 2, 0.0)) / np.maximum(cnt_ok, 1)
        a = 1.0 - (1.0 - cfg.loss_alpha) ** cnt_ok
        first = np.isnan(mean_b) & have
        new_mean = np.where(first, xbar, np.where(have, mean_b + a * (xbar - mean_b), mean_b))
        var_b = np.nan_to_num(r.f("l_var")[b.uniq], nan=0.0)
        new_var = np.where(first, 0.0, np.where(have, (1 - a) * var_b + a * d2, var_b))
        r.f("l_mean")[b.uniq] = new_mean
        r.f("l_var")[b.uniq] = new_var
        r.i("l_n")[b.uniq] += cnt_ok.astype(np.int64)
        # persistence
        n_sp = b.per_rank_sum(spike.astype(np.float64)).astype(np.int64)
        run = r.i("spike_run")
        on = r.i("spike_onset")
        prev = run[b.uniq]
        first_spike_ts = b.ts[b.last_pos]
        new_run = np.where(n_sp > 0, np.where(cnt_ok == 0, prev + n_sp, n_sp), 0)
        on[b.uniq] = np.where(new_run > 0, np.where(prev > 0, on[b.uniq], first_spike_ts), 0)
        run[b.uniq] = new_run
        flagged = spike & (run[b.ridx] >= cfg.spike_records)
        _raise_by_job(st, K.LOSS_SPIKE, b, np.nonzero(flagged)[0], "loss", loss,
                      {"baseline_mean": m, "baseline_std": sd}, onset=on[b.ridx])


class LossDivergenceRule(Rule):
    """Loss divergence: the loss trends up away from the best level it reached.

    Per rank: EWMA (alpha `div_alpha_fast` 0.1, ~10 records) of finite losses; best = its lowest
    value after 2 x `loss_warmup` records. EWMA > best + (`div_ratio` - 1)
    x |best| (30% above) for `div_records` (20) consecutive records raises `loss_divergence`
    (critical, one per job). A short spike (< ~15 records) does not. Resolves after
    `resolve_after_s` back in range. Evidence: loss, loss_fast, best, step, ranks.
    """

    kinds = (K.LOSS_DIVERGENCE,)
    auto_resolve = True

    def on_records(self, st: DetectState, b: RecordBatch) -> None:
        cfg = st.config
        r = st.ranks
        fin = np.isfinite(b.loss)
        cnt = b.per_rank_sum(fin.astype(np.float64))
        have = cnt > 0
        xbar = b.per_rank_sum(np.where(fin, b.loss, 0.0)) / np.maximum(cnt, 1)
        fast, best = r.f("l_fast"), r.f("l_best")
        u = b.uniq
        a = 1.0 - (1.0 - cfg.div_alpha_fast) ** cnt
        cur = fast[u]
        fast[u] = np.where(have, np.where(np.isnan(cur), xbar, cur + a * (xbar - cur)), cur)
        warm = r.i("l_n")[u] >= 2 * cfg.loss_warmup
        bcur = best[u]
        best[u] = np.where(warm & have, np.fmin(bcur, fast[u]), bcur)
        with np.errstate(invalid="ignore"):
            div = warm & have & (fast[u] > best[u] + (cfg.div_ratio - 1.0) * np.abs(best[u]) + 1e-9)
        run, on = r.i("div_run"), r.i("div_onset")
        prev = run[u]
        run[u] = np.where(div, prev + cnt.astype(np.int64), np.where(have, 0, prev))
        on[u] = np.where(div, np.where(prev > 0, on[u], b.ts[b.last_pos]), np.where(have, 0, on[u]))
        hit = u[run[u] >= cfg.div_records]
        if len(hit) == 0:
            return
        mask = np.isin(b.ridx, hit) & fin
        pos = np.nonzero(mask)[0]
        _raise_by_job(st, K.LOSS_DIVERGENCE, b, pos, "loss", b.loss,
                      {"loss_fast": fast[b.ridx], "best": best[b.ridx]}, onset=on[b.ridx])


class GradExplosionRule(Rule):
    """Grad-norm explosion, per rank against its own recent level.

    Baseline: EWMA mean/variance (alpha `loss_alpha` 0.05) of the rank's finite, non-exploding grad
    norms. After `loss_warmup` (20) records, grad_norm > max(`grad_factor` (10) x mean,
    mean + `grad_sigma` (10) sigma) is exploding; `grad_records` (2) consecutive ones raise
    `grad_explosion` (one per job). Resolves after `resolve_after_s` without. Evidence: grad_norm,
    baseline_mean, baseline_std, step, ranks.
    """

    kinds = (K.GRAD_EXPLOSION,)
    auto_resolve = True

    def on_records(self, st: DetectState, b: RecordBatch) -> None:
        cfg = st.config
        r = st.ranks
        g = b.grad
        fin = np.isfinite(g)
        m = r.f("g_mean")[b.ridx]
        sd = np.sqrt(np.nan_to_num(r.f("g_var")[b.ridx], nan=0.0))
        n = r.i("g_n")[b.ridx]
        with np.errstate(invalid="ignore"):
            ex = fin & (n >= cfg.loss_warmup) & (g > np.maximum(cfg.grad_factor * m, m + cfg.grad_sigma * sd))
        ok = fin & ~ex
        cnt_ok = b.per_rank_sum(ok.astype(np.float64))
        have = cnt_ok > 0
        xbar = b.per_rank_sum(np.where(ok, g, 0.0)) / np.maximum(cnt_ok, 1)
        d2 = b.per_rank_sum(np.where(ok, (g - np.nan_to_num(m, nan=0.0)) ** 2, 0.0)) / np.maximum(cnt_ok, 1)
        a = 1.0 - (1.0 - cfg.loss_alpha) ** cnt_ok
        u = b.uniq
        mb = r.f("g_mean")[u]
        vb = np.nan_to_num(r.f("g_var")[u], nan=0.0)
        first = np.isnan(mb) & have
        r.f("g_mean")[u] = np.where(first, xbar, np.where(have, mb + a * (xbar - mb), mb))
        r.f("g_var")[u] = np.where(first, 0.0, np.where(have, (1 - a) * vb + a * d2, vb))
        r.i("g_n")[u] += cnt_ok.astype(np.int64)
        n_ex = b.per_rank_sum(ex.astype(np.float64)).astype(np.int64)
        run, on = r.i("gx_run"), r.i("gx_onset")
        prev = run[u]
        new = np.where(n_ex > 0, np.where(cnt_ok == 0, prev + n_ex, n_ex), 0)
        on[u] = np.where(new > 0, np.where(prev > 0, on[u], b.ts[b.last_pos]), 0)
        run[u] = new
        flagged = ex & (run[b.ridx] >= cfg.grad_records)
        _raise_by_job(st, K.GRAD_EXPLOSION, b, np.nonzero(flagged)[0], "grad_norm", g,
                      {"baseline_mean": m, "baseline_std": sd}, onset=on[b.ridx])


class StepTimingRule(Rule):
    """Keeps each rank's step interval (host clock) and step time; raises nothing itself.

    interval: EWMA (alpha 0.3) of (ts_last - ts_prev_advance) / (step_last - step_prev) each time
    a rank's step advances, both timestamps from that rank's host (iv_last keeps the latest raw
    value). step_time: EWMA (0.5) of the SDK's extra['step_time_s'] when present. Also records the
    last step, last record ts and tokens per step.
    """

    def on_records(self, st: DetectState, b: RecordBatch) -> None:
        r = st.ranks
        u = b.uniq
        lp = b.last_pos
        step_new = b.step[lp]
        ts_new = b.ts[lp]
        old = r.last_step[u]
        adv = step_new > old
        adv_ts = r.i("adv_ts")
        with np.errstate(invalid="ignore", divide="ignore"):
            sample = (ts_new - adv_ts[u]) / 1e9 / np.maximum(step_new - old, 1)
        ok = adv & (old >= 0) & (sample > 0)
        iv = r.f("interval")
        cur = iv[u]
        iv[u] = np.where(ok, np.where(np.isnan(cur), sample, cur + 0.3 * (sample - cur)), cur)
        r.f("iv_last")[u] = np.where(ok, sample, r.f("iv_last")[u])
        adv_ts[u] = np.where(adv, ts_new, adv_ts[u])
        r.last_step[u] = np.maximum(old, step_new)
        r.i("last_ts")[u] = np.maximum(r.i("last_ts")[u], b.ts[lp])
        stf = np.isfinite(b.step_time)
        cnt = b.per_rank_sum(stf.astype(np.float64))
        mean = b.per_rank_sum(np.where(stf, b.step_time, 0.0)) / np.maximum(cnt, 1)
        sdt = r.f("step_time")
        cur = sdt[u]
        sdt[u] = np.where(cnt > 0, np.where(np.isnan(cur), mean, cur + 0.5 * (mean - cur)), cur)
        tok = b.tokens[lp]
        r.f("tokens")[u] = np.where(np.isfinite(tok), tok, r.f("tokens")[u])


def _job_view(st: DetectState, job: JobState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rank indices, alive mask, host clock of each rank's host) for a job."""
    r = st.ranks
    ri = job.rank_indices()
    fresh = st.fresh_slots()
    slot = r.slot[ri]
    host_ts = st.fleet.host_ints["last_ts"][slot]
    alive = ~r.exited[ri] & fresh[slot] & (host_ts - r.i("last_ts")[ri] <= st.config.ns(st.config.rank_forget_s))
    return ri, alive, host_ts


class StragglerRule(Rule):
    """Straggler rank: slower steps than its job's peers (NVRx-style relative score).

    Per job with >= `straggler_min_ranks` (3) active ranks: each rank's step time (the SDK's
    extra['step_time_s'] EWMA, else its step-interval EWMA) against the job median. A rank with
    ratio >= `straggler_ratio` (1.25) and at least `straggler_abs_s` (0.05 s) slower, in
    `straggler_samples` (3) consecutive evaluations in which it logged, is a straggler. One alert per
    (job, host) listing the host's straggling ranks; resolves after `resolve_after_s`.
    Evidence: job, ranks, step_time_s, job_median_s, ratio, source (step_time_s|interval), samples.
    """

    kinds = (K.STRAGGLER,)
    auto_resolve = True

    def periodic(self, st: DetectState) -> None:
        cfg = st.config
        r = st.ranks
        for job in st.job_list:
            if job.last_record_arrival != st.now_ns:
                continue
            ri, alive, host_ts = _job_view(st, job)
            active = alive & (host_ts - r.i("last_ts")[ri] <= cfg.ns(cfg.rank_active_s))
            stime = r.f("step_time")[ri]
            use_st = np.isfinite(stime)
            metric = np.where(use_st, stime, r.f("interval")[ri])
            valid = active & np.isfinite(metric)
            if valid.sum() < cfg.straggler_min_ranks:
                continue
            med = float(np.median(metric[valid]))
            if med <= 0:
                continue
            with np.errstate(invalid="ignore"):
                flag = valid & (metric >= cfg.straggler_ratio * med) & (metric - med >= cfg.straggler_abs_s)
            upd = valid & r.new[ri]
            run, on = r.i("strag_run"), r.i("strag_onset")
            prev = run[ri]
            new_run = np.where(upd, np.where(flag, prev + 1, 0), np.where(valid, prev, 0))
            run[ri] = new_run
            on[ri] = np.where(new_run > 0, np.where(prev > 0, on[ri], r.i("last_ts")[ri]), 0)
            hit = flag & (new_run >= cfg.straggler_samples)
            if not hit.any():
                continue
            hits = ri[hit]
            for s in np.unique(r.slot[hits]):
                hs = ri[flag & (r.slot[ri] == s)]  # every currently slow rank of the host
                worst = int(hs[np.argmax(metric[np.isin(ri, hs)])])
                mw = float(metric[ri == worst][0])
                host = _host_name(st, int(s))
                ev = {"job": job.job_id, "ranks": sorted(int(x) for x in r.rank[hs])[:_MAX_LISTED],
                      "step_time_s": _f(mw), "job_median_s": _f(med), "ratio": _f(mw / med, 3),
                      "source": "step_time_s" if bool(np.isfinite(r.f("step_time")[worst])) else "interval",
                      "samples": int(run[worst]), "active_ranks": int(valid.sum())}
                st.book.raise_(K.STRAGGLER, st.now_ns, int(on[hs].min() or r.i("last_ts")[worst]), ev,
                               key=K.dedup_key(K.STRAGGLER, job.job_id, host), host=host, job_id=job.job_id,
                               rank=int(r.rank[worst]), gpu_index=int(r.gpu[worst]))


class HangRule(Rule):
    """Hang: steps stop while the processes live. Stall times use each rank's own host clock.

    stall = host's newest frame ts - ts of the rank's last step advance (same host). interval =
    job median step interval (1 s if unknown).
    Rank hang: a live rank (not exited, host fresh) stalled > max(`hang_rank_min_s` 3 s,
    `hang_rank_factor` 3 x interval) while the job's median step is >= `hang_rank_lag_steps` (2)
    ahead of it; one alert per (job, host).
    Job hang: every live rank stalled > max(`hang_job_min_s` 30 s, `hang_job_factor` 10 x interval)
    and at least one rank's pid is still on a GPU (process list); one alert per job. (A checkpoint
    save that stalls all ranks longer than that reads as a hang.) Resolves once steps move again.
    Evidence: job, ranks, last_step, job_median_step, stall_s, threshold_s, pid_on_gpu.
    """

    kinds = (K.HANG,)
    auto_resolve = True

    def periodic(self, st: DetectState) -> None:
        cfg = st.config
        r = st.ranks
        for job in st.job_list:
            ri, alive, host_ts = _job_view(st, job)
            alive &= r.last_step[ri] >= 0
            if not alive.any():
                continue
            stall = (host_ts - r.i("adv_ts")[ri]) / 1e9
            ivs = r.f("interval")[ri][alive]
            ivs = ivs[np.isfinite(ivs)]
            interval = float(np.median(ivs)) if len(ivs) else 1.0
            steps = r.last_step[ri]
            med_step = float(np.median(steps[alive]))
            rank_thr = max(cfg.hang_rank_min_s, cfg.hang_rank_factor * interval)
            job_thr = max(cfg.hang_job_min_s, cfg.hang_job_factor * interval)
            rank_hang = alive & (stall > rank_thr) & (med_step - steps >= cfg.hang_rank_lag_steps)
            for s in np.unique(r.slot[ri[rank_hang]]):
                sel = rank_hang & (r.slot[ri] == s)
                hs = ri[sel]
                host = st.host_list[int(s)]
                k = int(hs[np.argmin(steps[sel])])
                ev = {"job": job.job_id, "scope": "ranks", "ranks": sorted(int(x) for x in r.rank[hs])[:_MAX_LISTED],
                      "last_step": int(r.last_step[k]), "job_median_step": med_step,
                      "stall_s": _f(float(stall[sel].max()), 2), "threshold_s": _f(rank_thr, 2),
                      "pid_on_gpu": int(r.i("pid")[k]) in host.pid_gpu}
                st.book.raise_(K.HANG, st.now_ns, int(r.i("adv_ts")[k] + interval * 1e9), ev,
                               key=K.dedup_key(K.HANG, job.job_id, host.name), host=host.name, job_id=job.job_id,
                               rank=int(r.rank[k]), gpu_index=int(r.gpu[k]))
            if alive.sum() >= 1 and bool((stall[alive] > job_thr).all()):
                live_pids = [int(r.i("pid")[x]) for x in ri[alive]
                             if int(r.i("pid")[x]) in st.host_list[int(r.slot[x])].pid_gpu]
                if not live_pids:
                    continue
                k = int(ri[alive][np.argmax(r.i("adv_ts")[ri][alive])])
                ev = {"job": job.job_id, "scope": "job", "ranks_stalled": int(alive.sum()),
                      "last_step": int(med_step), "stall_s": _f(float(stall[alive].min()), 2),
                      "threshold_s": _f(job_thr, 2), "pids_on_gpu": len(live_pids)}
                st.book.raise_(K.HANG, st.now_ns, int(r.i("adv_ts")[k] + interval * 1e9), ev,
                               key=K.dedup_key(K.HANG, job.job_id, None), host=_host_name(st, int(r.slot[k])),
                               job_id=job.job_id)


class ThroughputRule(Rule):
    """Throughput drop of a job against its own baseline.

    Each evaluation in which the job logged: rate = median over active ranks of tokens_per_step /
    the rank's latest step interval (steps/s when tokens are not reported); a pause of the whole
    job (checkpoint save) is one long interval and the hang rule's business. Baseline: mean of
    the first `tput_warmup` (30) evaluations, then EWMA (alpha `tput_alpha_base` 0.02) while not in
    a drop. rate < (1 - `tput_drop` 0.3) x baseline in `tput_samples` (3) consecutive evaluations
    raises `throughput_drop` (one per job). Resolves after `resolve_after_s` back above.
    Evidence: job, rate, baseline, drop_pct, unit (tokens/s|steps/s), samples.
    """

    kinds = (K.THROUGHPUT_DROP,)
    auto_resolve = True

    def periodic(self, st: DetectState) -> None:
        cfg = st.config
        r = st.ranks
        for job in st.job_list:
            if job.last_record_arrival != st.now_ns:
                continue
            ri, alive, host_ts = _job_view(st, job)
            active = alive & (host_ts - r.i("last_ts")[ri] <= cfg.ns(cfg.rank_active_s)) & (r.last_step[ri] >= 0)
            iv = r.f("interval")[ri]
            ok = active & np.isfinite(iv)
            if not ok.any():
                continue
            last_iv = r.f("iv_last")[ri]
            ok &= np.isfinite(last_iv)
            if not ok.any():
                continue
            tok = r.f("tokens")[ri][ok]
            has_tok = bool(np.isfinite(tok).all())
            per = (tok if has_tok else 1.0) / np.maximum(last_iv[ok], 1e-6)
            rate = float(np.median(per))
            job.tput_n += 1
            if job.tput_n <= cfg.tput_warmup:
                job.tput_base = rate if job.tput_n == 1 else job.tput_base + (rate - job.tput_base) / job.tput_n
                continue
            drop = rate < (1.0 - cfg.tput_drop) * job.tput_base
            if drop:
                job.tput_run += 1
                if job.tput_run == 1:
                    job.tput_onset = int(np.median(host_ts[ok]))
            else:
                job.tput_run = 0
                job.tput_base += cfg.tput_alpha_base * (rate - job.tput_base)
            if job.tput_run >= cfg.tput_samples:
                k = int(ri[ok][0])
                ev = {"job": job.job_id, "rate": _f(rate), "baseline": _f(job.tput_base),
                      "drop_pct": _f(100.0 * (1 - rate / job.tput_base), 1) if job.tput_base > 0 else None,
                      "unit": "tokens/s per rank" if has_tok else "steps/s", "samples": job.tput_run,
                      "active_ranks": int(ok.sum())}
                st.book.raise_(K.THROUGHPUT_DROP, st.now_ns, job.tput_onset, ev,
                               key=K.dedup_key(K.THROUGHPUT_DROP, job.job_id), host=_host_name(st, int(r.slot[k])),
                               job_id=job.job_id)


class RankExitRule(Rule):
    """A rank's process left its GPU while the rest of the job went on (T6: killed processes).

    A `process_exit` event for the pid of a rank that logged within `rank_active_s` marks it exited.
    After `rank_exit_grace_s` (10 s, console clock), if fewer than max(2, `rank_exit_job_fraction`
    (50%) of the job's ranks) exited too, `rank_exit` is raised for the job (a normal end stops all
    ranks together and is not alerted). Evidence: job, ranks, hosts, pids, exited, world_size.
    """

    kinds = (K.RANK_EXIT,)

    def on_event(self, st: DetectState, host: HostState, ev: Event) -> None:
        if ev.kind != "process_exit":
            return
        host.pid_gpu.pop(ev.pid, None)
        host.exited.add(ev.pid)
        ridx = host.pids.get(ev.pid)
        if ridx is None:
            return
        r = st.ranks
        was_active = host.last_ts - int(r.i("last_ts")[ridx]) <= st.config.ns(st.config.rank_active_s)
        already = bool(r.exited[ridx])
        r.exited[ridx] = True
        if was_active and not already:
            st.job_list[int(r.job[ridx])].pending_exits.append((ridx, ev.ts_unix_ns, st.now_ns))

    def periodic(self, st: DetectState) -> None:
        cfg = st.config
        r = st.ranks
        for job in st.job_list:
            if not job.pending_exits:
                continue
            oldest = min(p[2] for p in job.pending_exits)
            if st.now_ns - oldest < cfg.ns(cfg.rank_exit_grace_s):
                continue
            pend, job.pending_exits = job.pending_exits, []
            n_ranks = max(len(job.ranks), job.world_size)
            if len(pend) >= max(2, cfg.rank_exit_job_fraction * n_ranks):
                continue  # the job ended
            ridx = [p[0] for p in pend]
            ev = {"job": job.job_id, "ranks": sorted(int(r.rank[x]) for x in ridx)[:_MAX_LISTED],
                  "hosts": sorted({_host_name(st, int(r.slot[x])) for x in ridx})[:_MAX_LISTED],
                  "pids": [int(r.i("pid")[x]) for x in ridx][:_MAX_LISTED], "exited": len(pend),
                  "world_size": job.world_size}
            first = min(pend, key=lambda p: p[1])
            st.book.raise_(K.RANK_EXIT, st.now_ns, first[1], ev, key=K.dedup_key(K.RANK_EXIT, job.job_id),
                           host=_host_name(st, int(r.slot[first[0]])), job_id=job.job_id,
                           rank=int(r.rank[first[0]]))


# -- training-semantics tampering -------------------------------------------------------------------


class ParamChecksumRule(Rule):
    """Data-parallel replicas must hold identical parameters after a step (T4, T9).

    Records carrying extra['param_checksum'] are grouped by (job, step, extra['param_group'] if
    given). A group is judged when all `world_size` ranks reported or `checksum_wait_s` (5 s,
    console clock) after its first value. Values equal to 12 significant digits agree. Without
    param_group the ranks are taken to be replicas: with >= 3 values and a strict majority value,
    every rank off the majority is mismatched. With param_group, any rank off the group's majority
    (or every rank, if there is none) is. One critical alert per job.
    Evidence: step, group, mismatched [{rank, host, value}], majority_value, agreeing, reported.
    """

    kinds = (K.PARAM_CHECKSUM_MISMATCH,)

    def on_records(self, st: DetectState, b: RecordBatch) -> None:
        if not b.checksums:
            return
        r = st.ranks
        pos = np.fromiter((c[0] for c in b.checksums), np.int64, len(b.checksums))
        values = [c[1] for c in b.checksums]
        groups = [c[2] for c in b.checksums]
        ridx = b.ridx[pos]
        jobs = r.job[ridx]
        steps = b.step[pos]
        ranks = r.rank[ridx].tolist()
        ts = b.ts[pos].tolist()
        ridl = ridx.tolist()
        if not any(groups):  # the common case: group by (job, step) with numpy
            combo = jobs * (1 << 40) + steps
            _, inv = np.unique(combo, return_inverse=True)
            order = np.argsort(inv, kind="stable")
            bounds = np.flatnonzero(np.diff(inv[order])) + 1
            for sel in np.split(order, bounds):
                k0 = int(sel[0])
                job = st.job_list[int(jobs[k0])]
                key = (int(steps[k0]), "")
                d = job.checksums.setdefault(key, {})
                if not d:
                    job.checksum_first[key] = st.now_ns
                for k in sel.tolist():
                    d[ranks[k]] = (values[k], ridl[k], ts[k])
            return
        for k in range(len(pos)):
            job = st.job_list[int(jobs[k])]
            key = (int(steps[k]), groups[k])
            d = job.checksums.setdefault(key, {})
            if not d:
                job.checksum_first[key] = st.now_ns
            d[ranks[k]] = (values[k], ridl[k], ts[k])

    def periodic(self, st: DetectState) -> None:
        wait = st.config.ns(st.config.checksum_wait_s)
        for job in st.job_list:
            if not job.checksums:
                continue
            for key in list(job.checksums):
                d = job.checksums[key]
                want = job.checksum_sizes.get(key[1], 0) if key[1] else job.world_size
                if (want < 2 or len(d) < want) and st.now_ns - job.checksum_first[key] < wait:
                    continue
                job.checksum_sizes[key[1]] = max(job.checksum_sizes.get(key[1], 0), len(d))
                del job.checksums[key]
                del job.checksum_first[key]
                self._judge(st, job, key, d)

    def _judge(self, st: DetectState, job: JobState, key: tuple[int, str],
               d: dict[int, tuple[float, int, int]]) -> None:
        step, group = key
        qv = {rank: float(f"{v[0]:.12g}") for rank, v in d.items()}
        counts = Counter(qv.values())
        if not counts:
            return
        maj, c = counts.most_common(1)[0]
        n = len(qv)
        if group:
            if len(counts) == 1 or n < 2:
                return
            bad = [rk for rk, v in qv.items() if v != maj] if c > n / 2 else list(qv)
        else:
            if n < 3 or c <= n / 2 or len(counts) == 1:
                return
            bad = [rk for rk, v in qv.items() if v != maj]
        r = st.ranks
        bad.sort()
        ridx0 = d[bad[0]][1]
        ev = {"step": step, "group": group or None, "majority_value": maj if c > n / 2 else None,
              "agreeing": c if c > n / 2 else 0, "reported": n, "world_size": job.world_size,
              "mismatched": [{"rank": rk, "host": _host_name(st, int(r.slot[d[rk][1]])), "value": d[rk][0]}
                             for rk in bad[:_MAX_LISTED]], "n_mismatched": len(bad)}
        st.book.raise_(K.PARAM_CHECKSUM_MISMATCH, st.now_ns, min(d[rk][2] for rk in bad), ev,
                       key=K.dedup_key(K.PARAM_CHECKSUM_MISMATCH, job.job_id),
                       host=_host_name(st, int(r.slot[ridx0])), job_id=job.job_id, rank=bad[0],
                       gpu_index=int(r.gpu[ridx0]))


FP_FIELDS: Final[tuple[str, ...]] = ("code_fingerprint", "config_fingerprint", "seed")
_FP_SEVERITY: Final = {"code_fingerprint": K.CRITICAL, "config_fingerprint": K.WARNING, "seed": K.WARNING}
_FP_CROSS_RANK: Final = ("code_fingerprint", "config_fingerprint")  # seeds differ per rank legitimately


class FingerprintRule(Rule):
    """Code / config / seed fingerprints from SDK init records (T1, T2).

    `fingerprint_change`: a rank of a job reports, in a later init record, a different value of
    code_fingerprint (critical), config_fingerprint or seed (warning) than it reported before
    (any key ending in '_fingerprint' counts as code). One alert per (job, field); at once.
    `fingerprint_mismatch` (critical): 10 s after a job's newest init record, its live ranks hold
    more than one code_fingerprint or config_fingerprint (seeds may differ per rank); names the
    ranks off the majority. Evidence: field, old, new (change) / values {value: ranks} (mismatch).
    """

    kinds = (K.FINGERPRINT_CHANGE, K.FINGERPRINT_MISMATCH)
    settle_s: float = 10.0

    def __init__(self) -> None:
        self._dirty: dict[str, int] = {}  # job -> console ns of the newest init

    def on_init(self, st: DetectState, host: HostState, rec: TrainRecord, ridx: int) -> None:
        job = st.job(rec.job_id)
        fields = [k for k in rec.info if k in FP_FIELDS or k.endswith("_fingerprint")]
        for fld in fields:
            val = str(rec.info[fld])
            prev = job.fp_rank.get((rec.rank, fld))
            job.fp_rank[(rec.rank, fld)] = val
            if prev is not None and prev != val:
                key = K.dedup_key(K.FINGERPRINT_CHANGE, job.job_id, fld)
                old = st.book.alerts.get(key)
                ranks = {rec.rank}
                if old is not None and old.state != K.RESOLVED:
                    ranks |= set(old.evidence.get("ranks", []))
                ev = {"field": fld, "old": prev, "new": val, "ranks": sorted(ranks)[:_MAX_LISTED],
                      "pid": rec.pid, "launcher": rec.info.get("launcher"), "argv": rec.info.get("argv")}
                st.book.raise_(K.FINGERPRINT_CHANGE, st.now_ns, rec.ts_unix_ns, ev, key=key,
                               severity=_FP_SEVERITY.get(fld, K.CRITICAL), host=host.name, job_id=job.job_id,
                               rank=rec.rank)
        if fields:
            self._dirty[job.job_id] = st.now_ns

    def periodic(self, st: DetectState) -> None:
        for job_id, t in list(self._dirty.items()):
            if st.now_ns - t < st.config.ns(self.settle_s):
                continue
            del self._dirty[job_id]
            job = st.jobs.get(job_id)
            if job is None:
                continue
            r = st.ranks
            live = {rank for rank, ri in job.ranks.items() if not r.exited[ri]}
            for fld in {f for (_, f) in job.fp_rank}:
                if fld not in _FP_CROSS_RANK and not (fld.endswith("_fingerprint")):
                    continue
                vals = {rank: v for (rank, f), v in job.fp_rank.items() if f == fld and rank in live}
                counts = Counter(vals.values())
                if len(counts) < 2:
                    continue
                maj = counts.most_common(1)[0][0]
                odd = sorted(rk for rk, v in vals.items() if v != maj)
                groups: dict[str, list[int]] = {}
                for rk, v in vals.items():
                    groups.setdefault(v, []).append(rk)
                ri = job.ranks[odd[0]]
                ev = {"field": fld, "majority": maj, "odd_ranks": odd[:_MAX_LISTED],
                      "values": {v: sorted(rs)[:_MAX_LISTED] for v, rs in groups.items()}}
                st.book.raise_(K.FINGERPRINT_MISMATCH, st.now_ns, int(r.i("first_ts")[ri]), ev,
                               key=K.dedup_key(K.FINGERPRINT_MISMATCH, job_id, fld),
                               host=_host_name(st, int(r.slot[ri])), job_id=job_id, rank=odd[0])


TRAINING_KINDS: Final[tuple[str, ...]] = (
    K.TRAIN_NONFINITE, K.LOSS_SPIKE, K.LOSS_DIVERGENCE, K.GRAD_EXPLOSION, K.STRAGGLER, K.HANG,
    K.THROUGHPUT_DROP, K.PARAM_CHECKSUM_MISMATCH, K.PEER_OUTLIER,
)


class ScaleConditionalRule(Rule):
    """An anomaly that appears only in jobs above a size threshold (T5: ">256 GPUs only" trigger).

    Over the last `scale_window_s` (1 h, console clock), per training alert kind: if >=
    `scale_min_large_jobs` (2) distinct jobs with world_size >= `scale_threshold_gpus` (256) raised
    it, no smaller job did, and >= `scale_min_small_jobs` (1) smaller jobs were logging in that
    window, raise `scale_conditional_anomaly` for that kind. Evidence: anomaly_kind, threshold,
    large_jobs {job: world_size}, small_jobs_clean.
    """

    kinds = (K.SCALE_CONDITIONAL,)

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], tuple[int, int]] = {}  # (kind, job) -> (onset, detected)

    def observe(self, st: DetectState, changed: list[K.Alert]) -> None:
        fresh = False
        for a in changed:
            if a.kind in TRAINING_KINDS and a.job_id and a.state != K.RESOLVED:
                if (a.kind, a.job_id) not in self._seen:
                    fresh = True
                self._seen[(a.kind, a.job_id)] = (a.onset_ns, a.detected_ns)
        cutoff = st.now_ns - st.config.ns(st.config.scale_window_s)
        self._seen = {k: v for k, v in self._seen.items() if v[1] >= cutoff}
        if fresh:
            self._check(st, cutoff)

    def _check(self, st: DetectState, cutoff: int) -> None:
        cfg = st.config
        thr = cfg.scale_threshold_gpus
        by_kind: dict[str, list[str]] = {}
        for kind, job in self._seen:
            by_kind.setdefault(kind, []).append(job)
        small_running = [j.job_id for j in st.job_list
                         if 0 < j.world_size < thr and j.last_record_arrival >= cutoff]
        for kind, jobs in by_kind.items():
            large = [j for j in jobs if j in st.jobs and st.jobs[j].world_size >= thr]
            small_hit = [j for j in jobs if j in st.jobs and st.jobs[j].world_size < thr]
            clean_small = [j for j in small_running if j not in small_hit]
            if len(large) < cfg.scale_min_large_jobs or small_hit or len(clean_small) < cfg.scale_min_small_jobs:
                continue
            ev = {"anomaly_kind": kind, "threshold_gpus": thr,
                  "large_jobs": {j: st.jobs[j].world_size for j in sorted(large)[:_MAX_LISTED]},
                  "small_jobs_clean": sorted(clean_small)[:_MAX_LISTED], "window_s": cfg.scale_window_s}
            onset = min(self._seen[(kind, j)][0] for j in large)
            st.book.raise_(K.SCALE_CONDITIONAL, st.now_ns, onset, ev, key=K.dedup_key(K.SCALE_CONDITIONAL, kind))


# -- host integrity -----------------------------------------------------------------------------------

FILE_EVENT_KINDS: Final[frozenset[str]] = frozenset({"file_changed", "file_added", "file_removed", "record_mismatch"})


class FileIntegrityRule(Rule):
    """File integrity events from the agent (agent/integrity.py) become `file_integrity` alerts.

    At once, one alert per (host, path). Critical when the event is critical, or the package (attr
    'package', or a site-packages path component) is in `security_packages` (torch, transformers,
    ...); warning otherwise. Evidence: event, path, package, expected_sha256, actual_sha256, detail.
    """

    kinds = (K.FILE_INTEGRITY,)

    def on_event(self, st: DetectState, host: HostState, ev: Event) -> None:
        if ev.kind not in FILE_EVENT_KINDS:
            return
        path = ev.attrs.get("path", ev.detail)
        pkg = ev.attrs.get("package", "")
        parts = set(path.replace("\\", "/").split("/"))
        sec = {p.lower() for p in st.config.security_packages}
        security = pkg.lower() in sec or any(p.lower() in sec for p in parts)
        sev = K.CRITICAL if ev.severity >= SEVERITY_CRITICAL or security else K.WARNING
        evd = {"event": ev.kind, "path": path, "package": pkg or None, "detail": ev.detail,
               **{k: v for k, v in ev.attrs.items() if k not in ("path", "package")}}
        st.book.raise_(K.FILE_INTEGRITY, st.now_ns, ev.ts_unix_ns, evd,
                       key=K.dedup_key(K.FILE_INTEGRITY, host.name, path), severity=sev, host=host.name,
                       gpu_index=ev.gpu_index if ev.gpu_index >= 0 else None)


class ForeignProcessRule(Rule):
    """A process on a job's GPU that is not a registered rank of that job (T10, T7, T3).

    A GPU belongs to a job while one of the job's active ranks runs on it (its pid is on that GPU in
    the process list, or else GPU = local_rank). A pid on such a GPU that no SDK record on this host
    registered, or that is registered to another job that has no rank on that GPU, in
    `foreign_samples` (2) consecutive frames of the host, raises `foreign_process` (critical) per
    (host, GPU, pid). Resolves after `resolve_after_s` once the pid is gone.
    Evidence: pid, gpu, used_memory_mib, job, job_ranks_on_gpu, registered_to.
    """

    kinds = (K.FOREIGN_PROCESS,)
    auto_resolve = True

    def on_processes(self, st: DetectState, host: HostState, frame: Frame, changed: bool) -> None:
        if not frame.processes or (not changed and not host.suspects):
            if not frame.processes:
                host.suspects.clear()
            return
        r = st.ranks
        active_ns = st.config.ns(st.config.rank_active_s)
        gpu_jobs: dict[int, dict[int, list[int]]] = {}  # gpu -> job -> ranks
        for ri in host.pids.values():
            if r.exited[ri] or host.last_ts - int(r.i("last_ts")[ri]) > active_ns:
                continue
            gpu_jobs.setdefault(int(r.gpu[ri]), {}).setdefault(int(r.job[ri]), []).append(int(r.rank[ri]))
        seen: set[tuple[int, int]] = set()
        for p in frame.processes:
            jobs_here = gpu_jobs.get(p.gpu_index)
            if not jobs_here:
                continue
            reg = host.pids.get(p.pid)
            if reg is not None and (int(r.job[reg]) in jobs_here or r.exited[reg]):
                continue
            key = (p.gpu_index, p.pid)
            seen.add(key)
            cnt = host.suspects.get(key)
            if cnt is None:
                host.suspects[key] = [1, frame.ts_unix_ns]
                continue
            cnt[0] += 1
            if cnt[0] >= st.config.foreign_samples:
                j = next(iter(jobs_here))
                job = st.job_list[j]
                ev = {"pid": p.pid, "gpu": p.gpu_index, "used_memory_mib": _f(p.used_memory_mib, 1),
                      "job": job.job_id, "job_ranks_on_gpu": jobs_here[j][:_MAX_LISTED],
                      "registered_to": None if reg is None else st.job_list[int(r.job[reg])].job_id,
                      "frames": cnt[0]}
                st.book.raise_(K.FOREIGN_PROCESS, st.now_ns, cnt[1], ev,
                               key=K.dedup_key(K.FOREIGN_PROCESS, host.name, p.gpu_index, p.pid), host=host.name,
                               gpu_index=p.gpu_index, job_id=job.job_id)
        for key in list(host.suspects):
            if key not in seen:
                del host.suspects[key]


def default_rules() -> list[Rule]:
    """Every rule, in the order the engine runs them (timing before rules that read it)."""
    return [
        XidRule(), GpuStateRule(), EccRule(), ThrottleRule(), FileIntegrityRule(), RankExitRule(),
        StepTimingRule(), NonFiniteRule(), LossDivergenceRule(), LossSpikeRule(), GradExplosionRule(),
        ParamChecksumRule(), FingerprintRule(), ForeignProcessRule(),
        PeerOutlierRule(), StragglerRule(), HangRule(), ThroughputRule(), ScaleConditionalRule(),
    ]


__all__ = [
    "FILE_EVENT_KINDS", "FP_FIELDS", "PEER_FEATURES", "TRAINING_KINDS", "XID_TABLE",
    "EccRule", "FileIntegrityRule", "FingerprintRule", "ForeignProcessRule", "GpuStateRule", "GradExplosionRule",
    "HangRule", "LossDivergenceRule", "LossSpikeRule", "NonFiniteRule", "ParamChecksumRule", "PeerOutlierRule",
    "RankExitRule", "RecordBatch", "Rule", "SampleBatch", "ScaleConditionalRule", "StepTimingRule",
    "StragglerRule", "ThrottleRule", "ThroughputRule", "XidRule", "decode_throttle", "default_rules",
    "peer_features", "robust_z",
]
