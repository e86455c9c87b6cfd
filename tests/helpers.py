"""Builders shared by tests: frames with known values, a simulated agent on a loopback port."""

from __future__ import annotations

import time

import numpy as np

from protos.types import GPU_OK, N_METRICS, Event, Frame, GpuProcess, TrainRecord


def make_frame(host: str = "h1", epoch: str = "e1", seq: int = 1, n_gpus: int = 2,
               fill: float = 1.0, simulated: bool = True, ts: int | None = None) -> Frame:
    values = np.full((n_gpus, N_METRICS), fill, dtype=np.float32)
    values[:, 0] = np.arange(n_gpus, dtype=np.float32) + seq
    return Frame(
        host=host, epoch=epoch, seq=seq, ts_unix_ns=ts or time.time_ns(), simulated=simulated,
        gpu_values=values, gpu_index=list(range(n_gpus)), gpu_state=[GPU_OK] * n_gpus,
        processes=[GpuProcess(0, 4242, 1024.0)],
        train=[TrainRecord(time.time_ns(), "job-a", 0, 0, 2, 4242, 1000, seq, loss=2.5, extra={"mfu": 0.4})],
        events=[Event(time.time_ns(), "xid", 3, 1, 0, "XID 79", {"xid": "79"})],
    )
