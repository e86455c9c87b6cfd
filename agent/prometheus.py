"""Prometheus `/metrics` for the agent, named like NVIDIA dcgm-exporter so existing dashboards work.

Off by default; `metrics_listen = "0.0.0.0:9400"` turns it on (9400 is dcgm-exporter's port, so
run one or the other on a host, or pick another port). Fields both tools have keep
dcgm-exporter's metric names, units and GPU labels (`gpu`, `UUID`, `pci_bus_id`, `device`,
`modelName`, `Hostname`, `DCGM_FI_DRIVER_VERSION`); everything else is `gpusoc_*`. A
simulated GPU carries an extra label `simulated="true"` so it is never taken for hardware.
docs/install-agent.md has the table and what was not verified against a live dcgm-exporter.

`prometheus_client` is imported only when an exporter is built, so the agent runs without it
when metrics are off. `update()` runs on the agent's event loop once per tick and only copies
the frame; the text is built when Prometheus scrapes, on the HTTP server's thread.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from agent import __version__
from protos.types import GPU_STATE_NAMES, METRIC_INDEX, SEVERITY_NAMES, Frame, GpuInfo

__all__ = [
    "DCGM_FIELDS",
    "DEFAULT_METRICS_PORT",
    "GPUSOC_GPU_FIELDS",
    "MetricsExporter",
    "MetricsUnavailableError",
]

log = logging.getLogger("gpusoc.agent.metrics")

DEFAULT_METRICS_PORT: Final = 9400  # dcgm-exporter's default; documented, not assumed free

# (metric name, protos.types.METRIC_NAMES column, help). Units are dcgm-exporter's and equal the
# agent's columns, so values pass through unscaled. FB_FREE is derived (total - used), as NVML's
# v1 memory info defines it. All are exposed as gauges: prometheus_client renames a counter
# `X` to `X_total`, which would break the dcgm-exporter names; PromQL's rate()/increase() do
# not look at the declared type.
DCGM_FIELDS: Final[tuple[tuple[str, str, str], ...]] = (
    ("DCGM_FI_DEV_GPU_UTIL", "gpu_util_pct", "GPU utilization (in %)."),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "mem_util_pct", "Memory utilization (in %)."),
    ("DCGM_FI_DEV_FB_USED", "mem_used_mib", "Framebuffer memory used (in MiB)."),
    ("DCGM_FI_DEV_FB_TOTAL", "mem_total_mib", "Framebuffer memory total (in MiB)."),
    ("DCGM_FI_DEV_GPU_TEMP", "temp_c", "GPU temperature (in C)."),
    ("DCGM_FI_DEV_POWER_USAGE", "power_w", "Power draw (in W)."),
    ("DCGM_FI_DEV_SM_CLOCK", "sm_clock_mhz", "SM clock frequency (in MHz)."),
    ("DCGM_FI_DEV_MEM_CLOCK", "mem_clock_mhz", "Memory clock frequency (in MHz)."),
    ("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "ecc_corrected", "Total number of single-bit volatile ECC errors."),
    ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "ecc_uncorrected", "Total number of double-bit volatile ECC errors."),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "remap_failure", "Whether remapping of rows has failed."),
    ("DCGM_FI_DEV_PCIE_TX_THROUGHPUT", "pcie_tx_kbs", "PCIe TX throughput (in KB/s) via NVML."),
    ("DCGM_FI_DEV_PCIE_RX_THROUGHPUT", "pcie_rx_kbs", "PCIe RX throughput (in KB/s) via NVML."),
)
FB_FREE: Final = ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).")
XID: Final = ("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.")

# Agent columns dcgm-exporter has no same-meaning default metric for.
GPUSOC_GPU_FIELDS: Final[tuple[tuple[str, str, str], ...]] = (
    ("gpusoc_gpu_power_limit_watts", "power_limit_w", "Enforced power limit (W); management limit if unknown."),
    ("gpusoc_gpu_clock_event_reasons", "throttle_reasons", "NVML clocks event (throttle) reasons bitmask."),
    ("gpusoc_gpu_retired_pages", "retired_pages", "Remapped rows (Ampere+) or retired pages, all causes."),
)

GPU_LABELS: Final = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION")
TRAIN_FIELDS: Final = (
    ("gpusoc_train_step", "step", "Last step a training process reported through the SDK."),
    ("gpusoc_train_loss", "loss", "Last loss a training process reported."),
    ("gpusoc_train_grad_norm", "grad_norm", "Last gradient norm a training process reported."),
    ("gpusoc_train_learning_rate", "lr", "Last learning rate a training process reported."),
    ("gpusoc_train_tokens", "tokens", "Last token count a training process reported."),
)
# Training series are keyed by (job_id, rank); bound them so a job launcher that invents a new
# job id per restart cannot grow the scrape without limit.
TRAIN_SERIES_MAX: Final = 512
TRAIN_SERIES_TTL_S: Final = 300.0
_DECIMALS: Final = 3  # float32 columns print as e.g. 623.4, not 623.4000244140625


class MetricsUnavailableError(RuntimeError):
    """metrics_listen was set but prometheus-client is not installed; the message says what to do."""


def _import_prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core  # the *MetricFamily classes; the package does not import it
    except ImportError:
        raise MetricsUnavailableError(
            "metrics_listen is set but the prometheus-client package is not installed "
            "(pip install prometheus-client, or clear metrics_listen)"
        ) from None
    return prometheus_client


@dataclass(slots=True)
class _TrainSeries:
    values: dict[str, float]
    seen_monotonic: float


@dataclass(slots=True)
class _Snapshot:
    """What one scrape renders: copied from the latest frame, never shared with the tick loop."""

    host: str
    simulated: bool
    seq: int
    ts_unix_ns: int
    values: np.ndarray  # float64 [n_gpus, N_METRICS], rounded
    indices: list[int]  # GPU index per row of `values`
    labels: list[dict[str, str]]  # per row of `values`
    states: list[int]
    processes: dict[int, int]  # gpu index -> compute process count


class MetricsExporter:
    """Serve the latest frame as Prometheus metrics over HTTP.

    Build it, `start()` it, then call `update(frame, gpus)` after every tick (or register
    `listener(gpus)` with the runtime); `close()` stops the server. Without `start()` nothing
    listens, which tests use to render text directly.
    """

    def __init__(self, port: int = DEFAULT_METRICS_PORT, addr: str = "0.0.0.0") -> None:
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"metrics port must be 0..65535, got {port}")
        self._prom = _import_prometheus()
        self.addr = addr
        self.port = int(port)
        self._lock = threading.Lock()
        self._snapshot: _Snapshot | None = None
        self._last_xid: dict[str, int] = {}  # by UUID, so a re-indexed GPU keeps its own
        self._events: dict[tuple[str, str], int] = {}
        self._sdk_dropped = 0
        self._frames = 0
        self._train: dict[tuple[str, str], _TrainSeries] = {}
        self._label_cache: tuple[tuple[Any, ...], dict[int, dict[str, str]]] | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.registry = self._prom.CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        # The agent's own CPU/RSS/fds, as process_* like every Go/Python exporter has.
        self._prom.ProcessCollector(registry=self.registry)

    @classmethod
    def from_listen(cls, listen: str) -> MetricsExporter:
        """Build from the `metrics_listen` config value, HOST:PORT (IPv6 as [addr]:port)."""
        from agent.config import split_listen

        host, port = split_listen(listen)
        return cls(port, host)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> MetricsExporter:
        """Listen now (port 0 picks a free one; see `.port`); OSError if the port is taken."""
        if self._server is not None:
            return self
        server, thread = self._prom.start_http_server(self.port, addr=self.addr, registry=self.registry)
        self._server, self._thread = server, thread
        self.port = int(server.server_port)
        log.info("Prometheus metrics on http://%s:%d/metrics", _url_host(self.addr), self.port)
        return self

    def close(self) -> None:
        """Stop serving; safe to call twice or when never started."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> MetricsExporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- feeding -------------------------------------------------------------------------

    def listener(self, gpus: Sequence[GpuInfo]) -> Callable[[Frame], None]:
        """A per-frame callback for the runtime; the inventory is static, so it is bound once."""
        inventory = list(gpus)

        def on_frame(frame: Frame) -> None:
            self.update(frame, inventory)

        return on_frame

    def update(self, frame: Frame, gpus: Sequence[GpuInfo]) -> None:
        """Take this tick's frame; `gpus` is the collector's inventory (for labels).

        Never raises: a metrics problem must not stop the tick loop that feeds consoles.
        """
        try:
            self._update(frame, gpus)
        except Exception:
            log.exception("metrics update failed; keeping the previous snapshot")

    def _update(self, frame: Frame, gpus: Sequence[GpuInfo]) -> None:
        by_index = self._labels_for(frame.host, frame.simulated, gpus)
        labels = [by_index.get(i) or _fallback_labels(i, frame.host, frame.simulated) for i in frame.gpu_index]
        values = np.round(np.asarray(frame.gpu_values, dtype=np.float64), _DECIMALS)
        procs: dict[int, int] = {}
        for p in frame.processes:
            procs[p.gpu_index] = procs.get(p.gpu_index, 0) + 1
        snap = _Snapshot(
            host=frame.host,
            simulated=frame.simulated,
            seq=frame.seq,
            ts_unix_ns=frame.ts_unix_ns,
            values=values,
            indices=list(frame.gpu_index),
            labels=labels,
            states=list(frame.gpu_state),
            processes=procs,
        )
        now = time.monotonic()
        with self._lock:
            self._snapshot = snap
            self._frames += 1
            self._sdk_dropped = max(self._sdk_dropped, int(frame.sdk_dropped))
            for ev in frame.events:
                key = (ev.kind, _severity(ev.severity))
                self._events[key] = self._events.get(key, 0) + 1
                if ev.kind == "xid":
                    lab = by_index.get(ev.gpu_index) or _fallback_labels(ev.gpu_index, frame.host, frame.simulated)
                    try:
                        self._last_xid[_xid_key(lab)] = int(ev.attrs.get("xid", ""))
                    except ValueError:
                        pass
            for rec in frame.train:
                if rec.kind != "log":
                    continue
                key = (rec.job_id, str(rec.rank))
                series = self._train.get(key)
                if series is None:
                    if len(self._train) >= TRAIN_SERIES_MAX:
                        self._expire_train(now, force=True)
                    series = self._train[key] = _TrainSeries({}, now)
                series.seen_monotonic = now
                for _, attr, _ in TRAIN_FIELDS:
                    value = float(getattr(rec, attr))
                    if attr == "step" and value < 0:
                        continue
                    if not math.isnan(value):
                        series.values[attr] = value
            self._expire_train(now)

    def _expire_train(self, now: float, force: bool = False) -> None:
        """Drop series idle past the TTL; `force` also drops the oldest to make room for one."""
        stale = [k for k, s in self._train.items() if now - s.seen_monotonic > TRAIN_SERIES_TTL_S]
        for k in stale:
            del self._train[k]
        if force and len(self._train) >= TRAIN_SERIES_MAX:
            oldest = min(self._train, key=lambda k: self._train[k].seen_monotonic)
            del self._train[oldest]

    def _labels_for(self, host: str, simulated: bool, gpus: Sequence[GpuInfo]) -> dict[int, dict[str, str]]:
        """dcgm-exporter's GPU labels by index; rebuilt only when the inventory changes."""
        key = (host, simulated, *((g.index, g.uuid, g.name, g.pci_bus_id, g.driver_version) for g in gpus))
        cached = self._label_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        table: dict[int, dict[str, str]] = {}
        for g in gpus:
            labels = {
                "gpu": str(g.index),
                "UUID": g.uuid,
                "pci_bus_id": g.pci_bus_id,
                # dcgm-exporter uses the device minor number; NVML index equals it on most hosts.
                "device": f"nvidia{g.index}",
                "modelName": g.name,
                "Hostname": host,
                "DCGM_FI_DRIVER_VERSION": g.driver_version,
            }
            if simulated:
                labels["simulated"] = "true"
            table[g.index] = labels
        self._label_cache = (key, table)
        return table

    # -- rendering -----------------------------------------------------------------------

    def render(self) -> str:
        """The Prometheus text format, as a scrape would get it (for tests and debugging)."""
        return str(self._prom.generate_latest(self.registry).decode("utf-8"))

    def families(self) -> Iterator[Any]:
        """Metric families for the current snapshot; called by the registry on each scrape."""
        prom_core = self._prom.core
        gauge, counter = prom_core.GaugeMetricFamily, prom_core.CounterMetricFamily
        with self._lock:
            snap = self._snapshot
            last_xid = dict(self._last_xid)
            events = dict(self._events)
            sdk_dropped = self._sdk_dropped
            frames = self._frames
            train = {k: dict(s.values) for k, s in self._train.items()}
        simulated = bool(snap.simulated) if snap is not None else False
        info = gauge("gpusoc_agent_info", "gpusoc agent build and mode; value is always 1.",
                     labels=["version", "Hostname", "simulated"])
        info.add_metric([__version__, snap.host if snap else "", "true" if simulated else "false"], 1.0)
        yield info
        frames_f = counter("gpusoc_agent_frames", "Frames the agent has produced since it started.")
        frames_f.add_metric([], float(frames))
        yield frames_f
        if snap is None:
            return
        last = gauge("gpusoc_agent_last_frame_timestamp_seconds", "Unix time of the frame these values come from.")
        last.add_metric([], snap.ts_unix_ns / 1e9)
        yield last
        names = _label_names(snap.labels)
        yield from self._gpu_families(gauge, snap, names, last_xid)
        dropped = counter("gpusoc_sdk_dropped_records", "Training SDK records the agent could not accept.")
        dropped.add_metric([], float(sdk_dropped))
        yield dropped
        ev = counter("gpusoc_agent_events", "Events seen in frames since the agent started, by kind and severity.",
                     labels=["kind", "severity"])
        for (kind, severity), n in sorted(events.items()):
            ev.add_metric([kind, severity], float(n))
        yield ev
        yield from _train_families(gauge, snap.host, simulated, train)

    def _gpu_families(
        self, gauge: Any, snap: _Snapshot, names: list[str], last_xid: dict[str, int]
    ) -> Iterator[Any]:
        rows = [[lab.get(n, "") for n in names] for lab in snap.labels]
        for name, column, doc in (*DCGM_FIELDS, *GPUSOC_GPU_FIELDS):
            fam = gauge(name, doc, labels=names)
            col = snap.values[:, METRIC_INDEX[column]]
            for row, value in zip(rows, col.tolist(), strict=True):
                if not math.isnan(value):  # not available: omit, as dcgm-exporter does
                    fam.add_metric(row, value)
            yield fam
        free = gauge(FB_FREE[0], FB_FREE[1], labels=names)
        used = snap.values[:, METRIC_INDEX["mem_used_mib"]]
        total = snap.values[:, METRIC_INDEX["mem_total_mib"]]
        for row, value in zip(rows, np.round(total - used, _DECIMALS).tolist(), strict=True):
            if not math.isnan(value):
                free.add_metric(row, max(value, 0.0))
        yield free
        xid = gauge(XID[0], XID[1], labels=names)
        state = gauge("gpusoc_gpu_state", "GPU state: 0 unknown, 1 ok, 2 lost, 3 error.", labels=names)
        procs = gauge("gpusoc_gpu_processes", "Compute processes on the GPU.", labels=names)
        for row, lab, st, index in zip(rows, snap.labels, snap.states, snap.indices, strict=True):
            xid.add_metric(row, float(last_xid.get(_xid_key(lab), 0)))
            state.add_metric(row, float(st if st in GPU_STATE_NAMES else 0))
            procs.add_metric(row, float(snap.processes.get(index, 0)))
        yield xid
        yield state
        yield procs


class _Collector:
    """Adapter so a prometheus_client registry can pull from the exporter."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterable[Any]:
        return list(self._exporter.families())


def _train_families(
    gauge: Any, host: str, simulated: bool, train: dict[tuple[str, str], dict[str, float]]
) -> Iterator[Any]:
    names = ["job_id", "rank", "Hostname", *(["simulated"] if simulated else [])]
    for name, attr, doc in TRAIN_FIELDS:
        fam = gauge(name, doc, labels=names)
        for (job, rank), values in sorted(train.items()):
            if attr in values:
                fam.add_metric([job, rank, host, *(["true"] if simulated else [])], values[attr])
        yield fam


def _label_names(labels: list[dict[str, str]]) -> list[str]:
    names = list(GPU_LABELS)
    if any("simulated" in lab for lab in labels):
        names.append("simulated")
    return names


def _fallback_labels(index: int, host: str, simulated: bool) -> dict[str, str]:
    """Labels for a frame row the inventory does not list (should not happen; keeps series apart)."""
    labels = dict.fromkeys(GPU_LABELS, "")
    labels.update(gpu=str(index), device=f"nvidia{index}", Hostname=host)
    if simulated:
        labels["simulated"] = "true"
    return labels


def _severity(code: int) -> str:
    return SEVERITY_NAMES.get(code, "unknown")


def _xid_key(labels: dict[str, str]) -> str:
    """Last-XID memory is per UUID, so a GPU that changes index after a reset keeps its own."""
    return labels.get("UUID") or f"index-{labels.get('gpu', '?')}"


def _url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr
