"""The interface every GPU collector offers, so the agent loop cannot tell NVML from simulation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from protos.types import N_METRICS, Event, GpuInfo, GpuProcess


@dataclass(slots=True)
class GpuTick:
    """All GPUs of a host at one instant: float32 [n_gpus, N_METRICS], NaN = not available."""

    values: np.ndarray
    gpu_index: list[int]
    gpu_state: list[int]
    processes: list[GpuProcess] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @classmethod
    def empty(cls, n_gpus: int) -> GpuTick:
        return cls(
            values=np.full((n_gpus, N_METRICS), np.nan, dtype=np.float32),
            gpu_index=list(range(n_gpus)),
            gpu_state=[0] * n_gpus,
        )


class Collector(Protocol):
    """What the agent needs from a source of GPU samples."""

    simulated: bool

    @property
    def status(self) -> str:
        """'ok', 'simulated', or a one-line reason the source is degraded."""
        ...

    def gpus(self) -> list[GpuInfo]:
        """Static inventory, for Describe."""
        ...

    def sample(self) -> GpuTick:
        """One reading of every GPU; never raises for a single bad GPU or field."""
        ...

    def close(self) -> None: ...


class NoDriverError(RuntimeError):
    """No NVIDIA driver / NVML library on this host; the message is one line for the operator."""
