"""Simulated GPUs: the same Collector interface with plausible, noisy values.

Used by the demo fleet and most tests. Load follows whatever training job logs to this
host's agent (a GPU whose local rank is logging runs hot), and every frame is labelled
simulated on the wire, so simulated data can never pass for real telemetry.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable

import numpy as np

from agent.collect.base import GpuTick
from protos.types import (
    GPU_LOST,
    GPU_OK,
    METRIC_INDEX,
    N_METRICS,
    SEVERITY_CRITICAL,
    Event,
    GpuInfo,
    GpuProcess,
)

# Column indexes, named once.
_C = METRIC_INDEX
_H100_MEM_MIB = 81559.0
_POWER_LIMIT_W = 700.0

LoadSource = Callable[[], dict[int, float]]
"""Returns the current activity in [0, 1] per GPU index (from training records)."""


class SimulatedCollector:
    """N simulated H100-like GPUs; deterministic per (host, seed) so tests can reason about them."""

    simulated = True

    def __init__(self, n_gpus: int, host: str = "sim", seed: int | None = None,
                 load_source: LoadSource | None = None) -> None:
        if not 0 < n_gpus <= 64:
            raise ValueError(f"simulated GPU count must be 1..64, got {n_gpus}")
        self.n_gpus = n_gpus
        self.host = host
        self._rng = np.random.default_rng(zlib.crc32(host.encode()) if seed is None else seed)
        # Set after construction when the load comes from the runtime that owns this collector.
        self.load_source = load_source
        self._temp = np.full(n_gpus, 34.0, dtype=np.float64)
        self._util = np.zeros(n_gpus, dtype=np.float64)
        self._ecc_corrected = np.zeros(n_gpus, dtype=np.float64)
        self._lost = np.zeros(n_gpus, dtype=bool)
        self._lost_reported = np.zeros(n_gpus, dtype=bool)
        self._pending_events: list[Event] = []
        self._processes: dict[int, list[GpuProcess]] = {}
        self._uuid_base = zlib.crc32(host.encode())

    @property
    def status(self) -> str:
        return "simulated"

    def gpus(self) -> list[GpuInfo]:
        return [
            GpuInfo(
                index=i,
                name="Simulated NVIDIA H100 80GB HBM3",
                uuid=f"GPU-sim-{self._uuid_base:08x}-{i:04d}",
                memory_total_mib=_H100_MEM_MIB,
                driver_version="simulated",
                pci_bus_id=f"00000000:{0x18 + i:02X}:00.0",
            )
            for i in range(self.n_gpus)
        ]

    # -- fault injection, for the demo and tests -------------------------------------------

    def inject_xid(self, gpu: int, xid: int = 79) -> None:
        """Queue an XID event as NVML would deliver it."""
        self._pending_events.append(
            Event(time.time_ns(), "xid", SEVERITY_CRITICAL, gpu, 0, f"XID {xid}", {"xid": str(xid)})
        )

    def lose_gpu(self, gpu: int) -> None:
        """Make a GPU fall off the bus: it reports lost and NaN from the next tick."""
        self._lost[gpu] = True

    def heat(self, gpu: int, degrees: float) -> None:
        self._temp[gpu] += degrees

    def set_processes(self, gpu: int, processes: list[GpuProcess]) -> None:
        self._processes[gpu] = processes

    # -- sampling ---------------------------------------------------------------------------

    def sample(self) -> GpuTick:
        n = self.n_gpus
        rng = self._rng
        load = np.zeros(n)
        if self.load_source is not None:
            for gpu, activity in self.load_source().items():
                if 0 <= gpu < n:
                    load[gpu] = min(max(activity, 0.0), 1.0)
        target_util = 3.0 + 94.0 * load
        self._util += 0.5 * (target_util - self._util) + rng.normal(0.0, 1.5, n)
        util = np.clip(self._util, 0.0, 100.0)
        target_temp = 33.0 + 0.42 * util
        self._temp += 0.15 * (target_temp - self._temp) + rng.normal(0.0, 0.2, n)
        self._ecc_corrected += rng.random(n) < 0.0005

        v = np.empty((n, N_METRICS), dtype=np.float32)
        v[:, _C["gpu_util_pct"]] = np.round(util)
        v[:, _C["mem_util_pct"]] = np.clip(np.round(util * 0.6 + rng.normal(0, 2, n)), 0, 100)
        mem_used = 520.0 + load * 61000.0 + rng.normal(0, 30, n)
        v[:, _C["mem_used_mib"]] = np.clip(mem_used, 0, _H100_MEM_MIB)
        v[:, _C["mem_total_mib"]] = _H100_MEM_MIB
        v[:, _C["temp_c"]] = np.round(self._temp)
        v[:, _C["power_w"]] = 70.0 + util * 5.6 + rng.normal(0, 6, n)
        v[:, _C["power_limit_w"]] = _POWER_LIMIT_W
        v[:, _C["sm_clock_mhz"]] = np.where(util > 5, 1980.0, 345.0)
        v[:, _C["mem_clock_mhz"]] = 2619.0
        throttle = np.where(util > 5, 0.0, 1.0)  # GpuIdle when idle, as NVML reports
        throttle = np.where(self._temp > 85, throttle + 0x20, throttle)  # SW thermal slowdown
        v[:, _C["throttle_reasons"]] = throttle
        v[:, _C["ecc_corrected"]] = self._ecc_corrected
        v[:, _C["ecc_uncorrected"]] = 0.0
        v[:, _C["retired_pages"]] = 0.0
        v[:, _C["remap_failure"]] = 0.0
        v[:, _C["pcie_tx_kbs"]] = np.maximum(0, 1000 + load * 9e5 + rng.normal(0, 5e3, n))
        v[:, _C["pcie_rx_kbs"]] = np.maximum(0, 1200 + load * 1.1e6 + rng.normal(0, 5e3, n))

        state = [GPU_OK] * n
        events, self._pending_events = self._pending_events, []
        now = time.time_ns()
        for i in np.flatnonzero(self._lost):
            v[i, :] = np.nan
            state[i] = GPU_LOST
            if not self._lost_reported[i]:
                self._lost_reported[i] = True
                events.append(Event(now, "gpu_lost", SEVERITY_CRITICAL, int(i), 0,
                                    f"GPU {i} fell off the bus (simulated)"))
        processes = [p for gpu in sorted(self._processes) for p in self._processes[gpu]]
        return GpuTick(values=v, gpu_index=list(range(n)), gpu_state=state,
                       processes=processes, events=events)

    def close(self) -> None:
        return None
