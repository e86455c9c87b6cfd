"""Store benchmark: one StoreWriter flush per fleet tick, flush time, commit latency, bytes per sample.

Simulates `--hosts` agents x `--gpus` GPUs reporting once per tick with realistic NVML-like values
(smooth random walks, integer readings where NVML gives integers; not white noise, which would
compress worse than real telemetry). Ticks run back to back (no sleeping) so the figures are
capacity, not a 1 Hz replay.

    python benchmarks/bench_store.py --hosts 1536 --gpus 8 --ticks 600
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from console.store.writer import StoreWriter
from protos.types import GPU_OK, METRIC_INDEX, N_METRICS, Frame


class Fleet:
    """Per-GPU random walks for every metric, advanced once per tick."""

    def __init__(self, hosts: int, gpus: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.hosts, self.gpus = hosts, gpus
        shape = (hosts, gpus)
        r = self.rng
        self.util = r.uniform(60, 100, shape)
        self.mem_used = r.uniform(40_000, 78_000, shape)
        self.temp = r.uniform(45, 75, shape)
        self.power = r.uniform(350, 650, shape)
        self.pcie_tx = r.uniform(1e5, 5e6, shape)
        self.pcie_rx = r.uniform(1e5, 5e6, shape)
        self.ecc = np.zeros(shape)
        self.names = [f"gpu-node-{i:05d}.cluster.example" for i in range(hosts)]
        self.epochs = [f"{r.integers(0, 2**63):016x}{r.integers(0, 2**63):016x}" for _ in range(hosts)]
        self.values = np.empty((hosts, gpus, N_METRICS), dtype=np.float32)

    def step(self) -> np.ndarray:
        r, shape = self.rng, (self.hosts, self.gpus)
        self.util = np.clip(self.util + r.normal(0, 3, shape), 0, 100)
        self.mem_used = np.clip(self.mem_used + r.normal(0, 200, shape), 1_000, 81_000)
        self.temp = np.clip(self.temp + r.normal(0, 0.3, shape), 30, 90)
        self.power = np.clip(self.power + r.normal(0, 15, shape), 80, 700)
        self.pcie_tx = np.clip(self.pcie_tx + r.normal(0, 1e5, shape), 0, 2.5e7)
        self.pcie_rx = np.clip(self.pcie_rx + r.normal(0, 1e5, shape), 0, 2.5e7)
        self.ecc += r.random(shape) < 1e-5
        v = self.values
        m = METRIC_INDEX
        v[..., m["gpu_util_pct"]] = np.rint(self.util)
        v[..., m["mem_util_pct"]] = np.rint(self.util * 0.6)
        v[..., m["mem_used_mib"]] = np.rint(self.mem_used)
        v[..., m["mem_total_mib"]] = 81_559
        v[..., m["temp_c"]] = np.rint(self.temp)
        v[..., m["power_w"]] = np.round(self.power, 3)  # NVML gives mW
        v[..., m["power_limit_w"]] = 700
        v[..., m["sm_clock_mhz"]] = np.where(self.power > 640, 1755, 1980)
        v[..., m["mem_clock_mhz"]] = 2619
        v[..., m["throttle_reasons"]] = np.where(self.power > 640, 4, 0)
        v[..., m["ecc_corrected"]] = self.ecc
        v[..., m["ecc_uncorrected"]] = 0
        v[..., m["retired_pages"]] = 0
        v[..., m["remap_failure"]] = 0
        v[..., m["pcie_tx_kbs"]] = np.rint(self.pcie_tx)
        v[..., m["pcie_rx_kbs"]] = np.rint(self.pcie_rx)
        return v

    def frames(self, seq: int, ts_ns: int) -> list[Frame]:
        v = self.step()
        idx = list(range(self.gpus))
        states = [GPU_OK] * self.gpus
        return [
            Frame(host=self.names[h], epoch=self.epochs[h], seq=seq, ts_unix_ns=ts_ns, simulated=True,
                  gpu_values=v[h].copy(), gpu_index=idx, gpu_state=states)
            for h in range(self.hosts)
        ]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run(hosts: int, gpus: int, ticks: int, db_path: Path) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    fleet = Fleet(hosts, gpus)
    writer = StoreWriter(db_path, flush_interval_s=3600, max_batch_frames=max(20_000, hosts))
    writer.start()
    tick_ms: list[float] = []
    submit_ms: list[float] = []
    flush_cpu_ms: list[float] = []
    t_all = time.perf_counter()
    for seq in range(1, ticks + 1):
        frames = fleet.frames(seq, time.time_ns())
        t0 = time.perf_counter()
        now = time.time_ns()
        for f in frames:
            writer.submit_frame(f, now)
        t1 = time.perf_counter()
        c1 = time.process_time()
        if not writer.flush(60):
            raise RuntimeError(f"flush failed: {writer.status}")
        t2 = time.perf_counter()
        # the main thread only waits during flush(): process CPU here is the writer + DuckDB
        flush_cpu_ms.append((time.process_time() - c1) * 1e3)
        submit_ms.append((t1 - t0) * 1e3)
        tick_ms.append((t2 - t0) * 1e3)
    wall = time.perf_counter() - t_all
    stats = writer.stats
    flush_ms = list(writer._flush_ms)
    if not writer.stop():
        raise RuntimeError("stop did not commit everything")

    rows = hosts * gpus * ticks
    samples = rows * N_METRICS
    size = db_path.stat().st_size
    con = duckdb.connect(str(db_path), read_only=True)
    lat = con.execute(
        "SELECT quantile_cont(epoch_us(committed_at) - epoch_us(ts), [0.5, 0.99]), "
        "max(epoch_us(committed_at) - epoch_us(ts)) FROM frames"
    ).fetchone()
    assert lat is not None
    con.close()
    # footprint of gpu_samples alone (without the frames ledger and its primary-key index)
    only = db_path.with_name("gpu_samples_only.duckdb")
    c2 = duckdb.connect(str(only))
    c2.execute(f"ATTACH '{db_path}' AS src (READ_ONLY)")
    c2.execute("CREATE TABLE gpu_samples AS SELECT * FROM src.gpu_samples")
    c2.execute("DETACH src")
    c2.execute("CHECKPOINT")
    c2.close()
    size_only = only.stat().st_size

    flush_total_s = sum(flush_ms) / 1e3
    return {
        "hosts": hosts,
        "gpus": gpus,
        "ticks": ticks,
        "rows": rows,
        "samples": samples,
        "frames_committed": stats["frames_committed"],
        "flush_ms_p50": pct(flush_ms, 50),
        "flush_ms_p99": pct(flush_ms, 99),
        "flush_ms_max": max(flush_ms),
        "flush_cpu_ms_p50": pct(flush_cpu_ms, 50),
        "flush_cpu_ms_p99": pct(flush_cpu_ms, 99),
        "samples_per_cpu_s_in_flush": samples / (sum(flush_cpu_ms) / 1e3),
        "tick_ms_p50": pct(tick_ms, 50),
        "tick_ms_p99": pct(tick_ms, 99),
        "submit_ms_p50": pct(submit_ms, 50),
        "rows_per_s_in_flush": rows / flush_total_s,
        "samples_per_s_in_flush": samples / flush_total_s,
        "samples_per_s_wall": samples / wall,
        "commit_latency_ms_p50": lat[0][0] / 1e3,
        "commit_latency_ms_p99": lat[0][1] / 1e3,
        "commit_latency_ms_max": lat[1] / 1e3,
        "file_bytes": size,
        "bytes_per_sample": size / samples,
        "gpu_samples_only_bytes": size_only,
        "gpu_samples_only_bytes_per_sample": size_only / samples,
        "wall_s": wall,
        "loadavg_1m_before_after": [load_before, os.getloadavg()[0]],
        "cpus": os.cpu_count(),
        "duckdb": duckdb.__version__,
        "python": platform.python_version(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=1536)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--ticks", type=int, default=600)
    p.add_argument("--dir", default=None, help="where to put the DuckDB file (default: a temp dir)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        result = run(args.hosts, args.gpus, args.ticks, Path(d) / "bench.duckdb")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
