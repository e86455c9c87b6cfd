"""Plain-Python shapes of everything on the wire.

Agent and console build and read these; only `protos.serde` converts them to and from
protobuf, so a contract change touches one module instead of every caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

import numpy as np

NAN: Final = math.nan

# Column order of Frame.gpu_values for METRIC_SCHEMA 1 (matches enum Metric in telemetry.proto;
# tests/test_serde.py checks the two agree).
METRIC_SCHEMA: Final = 1
METRIC_NAMES: Final[tuple[str, ...]] = (
    "gpu_util_pct",
    "mem_util_pct",
    "mem_used_mib",
    "mem_total_mib",
    "temp_c",
    "power_w",
    "power_limit_w",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "throttle_reasons",
    "ecc_corrected",
    "ecc_uncorrected",
    "retired_pages",
    "remap_failure",
    "pcie_tx_kbs",
    "pcie_rx_kbs",
)
N_METRICS: Final = len(METRIC_NAMES)
METRIC_INDEX: Final[dict[str, int]] = {name: i for i, name in enumerate(METRIC_NAMES)}

GPU_OK: Final = 1
GPU_LOST: Final = 2
GPU_ERROR: Final = 3
GPU_STATE_NAMES: Final = {0: "unknown", GPU_OK: "ok", GPU_LOST: "lost", GPU_ERROR: "error"}

SEVERITY_INFO: Final = 1
SEVERITY_WARNING: Final = 2
SEVERITY_CRITICAL: Final = 3
SEVERITY_NAMES: Final = {0: "unknown", 1: "info", 2: "warning", 3: "critical"}


@dataclass(slots=True)
class GpuProcess:
    gpu_index: int
    pid: int
    used_memory_mib: float = NAN


@dataclass(slots=True)
class TrainRecord:
    """One SDK record; pid/uid come from the kernel, not from the sender's payload."""

    ts_unix_ns: int
    job_id: str
    rank: int
    local_rank: int
    world_size: int
    pid: int
    uid: int
    step: int
    loss: float = NAN
    grad_norm: float = NAN
    lr: float = NAN
    tokens: float = NAN
    extra: dict[str, float] = field(default_factory=dict)
    kind: str = "log"
    info: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Event:
    ts_unix_ns: int
    kind: str
    severity: int = SEVERITY_INFO
    gpu_index: int = -1
    pid: int = 0
    detail: str = ""
    attrs: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Frame:
    """One host, one tick. `gpu_values` is float32 [n_gpus, N_METRICS]; NaN = not available."""

    host: str
    epoch: str
    seq: int
    ts_unix_ns: int
    simulated: bool
    gpu_values: np.ndarray
    gpu_index: list[int]
    gpu_state: list[int]
    processes: list[GpuProcess] = field(default_factory=list)
    train: list[TrainRecord] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    sdk_dropped: int = 0
    metric_schema: int = METRIC_SCHEMA


@dataclass(slots=True)
class Gap:
    """Frames the agent no longer holds. last_seq == 0 means 'to the end of that epoch'."""

    epoch: str
    first_seq: int
    last_seq: int
    reason: str
    ts_unix_ns: int = 0


@dataclass(slots=True)
class SubscribeRequest:
    epoch: str = ""
    after_seq: int = 0
    from_now: bool = False


@dataclass(slots=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    memory_total_mib: float
    driver_version: str
    pci_bus_id: str = ""


@dataclass(slots=True)
class Description:
    host: str
    agent_version: str
    epoch: str
    simulated: bool
    gpus: list[GpuInfo]
    capabilities: list[str]
    metric_names: list[str]
    metric_schema: int
    sample_interval_s: float
    oldest_seq: int
    newest_seq: int
    nvml_status: str


class WireError(ValueError):
    """Bytes or values that do not form a valid message of the contract."""
