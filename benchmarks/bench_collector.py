"""Collector at fleet scale: N simulated hosts x 8 GPUs at 1 Hz into DuckDB, on this machine.

Starts `gpusoc-agent fleet-sim` (separate processes: the load generator, CPU reported on its
own), runs the collector core in this process (FleetIngest + StoreWriter, as `gpusoc-console
collect` does) for --seconds after a warm-up, then reads the store: collector CPU (% of one
core) and RSS, sample→committed-row latency p50/p99 (frames.committed_at - frames.ts), and
loss (seq holes per host epoch that no gap record explains).

    python benchmarks/bench_collector.py --hosts 1536 --seconds 60 [--mtls]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import psutil

from console.ingest.fleet import AgentSource, FleetIngest
from console.ingest.tls import ConsoleTls
from console.store.writer import StoreWriter


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=1536)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--processes", type=int, default=4, help="fleet-sim processes")
    ap.add_argument("--base-port", type=int, default=23000)
    ap.add_argument("--mtls", action="store_true", help="mTLS (default: --insecure on loopback)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir with the DB")
    ap.add_argument("--flush-interval", type=float, default=0.25, help="StoreWriter flush_interval_s")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    tmp = Path(tempfile.mkdtemp(prefix="gpusoc-collector-"))
    inv = tmp / "fleet.txt"
    sim_cmd = [sys.executable, "-m", "agent.cli", "fleet-sim", "--hosts", str(args.hosts), "--gpus", str(args.gpus),
               "--base-port", str(args.base_port), "--processes", str(args.processes), "--inventory", str(inv),
               "--buffer-seconds", "300"]
    sim_cmd += ["--pki", str(tmp / "pki")] if args.mtls else ["--insecure"]
    sim = subprocess.Popen(sim_cmd, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not inv.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(5)
    tls = None
    if args.mtls:
        p = tmp / "pki"
        tls = ConsoleTls(str(p / "agent-ca.pem"), str(p / "consoles/console.pem"), str(p / "consoles/console.key"))
    db = tmp / "bench.duckdb"
    writer = StoreWriter(str(db), flush_interval_s=args.flush_interval)
    writer.start()
    fleet = FleetIngest(AgentSource([str(inv)]), writer, tls)
    me = psutil.Process()
    gen = psutil.Process(sim.pid)
    result: dict[str, object] = {}

    async def run() -> None:
        task = asyncio.create_task(fleet.run())
        await asyncio.sleep(args.warmup)
        kids = gen.children(recursive=True)
        t0, c0 = time.monotonic(), cpu_s(me)
        g0 = sum(cpu_s(k) for k in kids)
        start_ns = time.time_ns()
        rss = []
        while time.monotonic() - t0 < args.seconds:
            await asyncio.sleep(2)
            rss.append(me.memory_info().rss)
        t1, c1 = time.monotonic(), cpu_s(me)
        g1 = sum(cpu_s(k) for k in kids)
        end_ns = time.time_ns()
        states: dict[str, int] = {}
        for s in fleet.statuses():
            states[s.state] = states.get(s.state, 0) + 1
        result.update({
            "collector_cpu_pct_of_one_core": round(100 * (c1 - c0) / (t1 - t0), 1),
            "generator_cpu_pct_of_one_core": round(100 * (g1 - g0) / (t1 - t0), 1),
            "collector_rss_mb_max": round(max(rss) / 2**20, 1),
            "states": states, "window_ns": [start_ns, end_ns],
        })
        fleet.stop()
        await task

    asyncio.run(run())
    writer.flush(timeout=60)
    writer.stop()
    sim.terminate()
    sim.wait(30)
    con = duckdb.connect(str(db), read_only=True)
    s0, s1 = result.pop("window_ns")  # type: ignore[misc]
    lat = con.execute(
        "SELECT quantile_cont(ms, 0.5), quantile_cont(ms, 0.99), max(ms), count(*) FROM ("
        " SELECT epoch_ms(committed_at) - epoch_ms(ts) AS ms FROM frames"
        " WHERE ts >= make_timestamp(?::BIGINT // 1000) AND ts < make_timestamp(?::BIGINT // 1000))",
        [s0, s1]).fetchone()
    holes = con.execute(
        "SELECT coalesce(sum(max_seq - min_seq + 1 - n), 0) FROM ("
        " SELECT host, epoch, min(seq) AS min_seq, max(seq) AS max_seq, count(*) AS n FROM frames GROUP BY ALL)"
    ).fetchone()
    gaps = con.execute("SELECT count(*) FROM gaps").fetchone()
    rows = con.execute("SELECT count(*) FROM gpu_samples").fetchone()
    assert lat is not None and holes is not None and gaps is not None and rows is not None
    size = db.stat().st_size + (Path(str(db) + ".wal").stat().st_size if Path(str(db) + ".wal").exists() else 0)
    result.update({
        "hosts": args.hosts, "gpus_per_host": args.gpus, "seconds": args.seconds, "mtls": args.mtls,
        "flush_interval_s": args.flush_interval,
        "commit_latency_ms_p50": round(lat[0] or 0, 1), "commit_latency_ms_p99": round(lat[1] or 0, 1),
        "commit_latency_ms_max": round(lat[2] or 0, 1), "frames_in_window": lat[3],
        "expected_frames_in_window": int(args.hosts * args.seconds),
        "seq_holes": int(holes[0]), "gap_records": int(gaps[0]), "gpu_sample_rows": int(rows[0]),
        "db_bytes": size, "cores": os.cpu_count(), "python": platform.python_version(),
    })
    print(json.dumps(result, indent=1))
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
