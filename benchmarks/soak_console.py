"""Console soak: the real main window fed N synthetic hosts at 1 Hz through the bridge, RSS sampled.

Run from the repository root:

    QT_QPA_PLATFORM=offscreen python benchmarks/soak_console.py                  # 1,536 hosts, 120 min
    QT_QPA_PLATFORM=offscreen python benchmarks/soak_console.py --minutes 3      # smoke run

What runs: FleetModel + QtIngestBridge + QtMainWindow (heatmap redraw timer 100 ms, status history
250 ms), exactly as the composition root wires them. A feeder thread plays the ingest thread:
every second it sends one fresh Frame per host (8 GPUs, training records, spread over the
second as real agents are), and every 30 s flips a few hosts to disconnected and back. Unless
--no-churn, the metric and sort mode change every 60 s (relayout paths included). Every
--sample-s it prints a JSON line: RSS, CPU (% of one core since the last sample, feeder thread
included), paints of the two image items (heatmap + status history), redraws, frames sent. At
the end it prints a summary line and exits 1 if RSS grew more than --max-growth-pct from the
median of the first 3 samples after warm-up to the median of the last 3 (or if nothing was
painted), else 0.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from PySide6 import __version__ as PYSIDE_VERSION  # noqa: E402
from PySide6.QtCore import QTimer  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from console.ingest.sink import CONNECTED, DISCONNECTED, HostStatus  # noqa: E402
from console.models.fleet import SORT_MODES, FleetModel  # noqa: E402
from console.ui.bridge import QtIngestBridge  # noqa: E402
from console.ui.qt_heatmap import ArgbImageItem  # noqa: E402
from console.ui.qt_main import build_main_window  # noqa: E402
from protos.types import GPU_OK, METRIC_INDEX, N_METRICS, Frame, TrainRecord  # noqa: E402

PAINTS = [0]
_orig_paint = ArgbImageItem.paint


def _counting_paint(self: ArgbImageItem, *args: Any) -> None:
    PAINTS[0] += 1
    _orig_paint(self, *args)


ArgbImageItem.paint = _counting_paint  # type: ignore[method-assign]  # proves Qt really repaints


class Feeder(threading.Thread):
    """Plays the ingest thread: 1 Hz frames for every host, spread over each second."""

    def __init__(self, bridge: QtIngestBridge, n_hosts: int, n_gpus: int = 8) -> None:
        super().__init__(name="soak-ingest", daemon=True)
        self.bridge, self.n_hosts, self.n_gpus = bridge, n_hosts, n_gpus
        self.stop = threading.Event()
        self.sent = 0
        self.rng = np.random.default_rng(1)

    def frame(self, h: int, seq: int) -> Frame:
        g = self.n_gpus
        values = np.full((g, N_METRICS), np.nan, dtype=np.float32)
        values[:, METRIC_INDEX["gpu_util_pct"]] = self.rng.uniform(80, 100, g)
        values[:, METRIC_INDEX["temp_c"]] = self.rng.uniform(45, 80, g)
        values[:, METRIC_INDEX["power_w"]] = self.rng.uniform(400, 700, g)
        values[:, METRIC_INDEX["mem_used_mib"]] = self.rng.uniform(60000, 80000, g)
        now = time.time_ns()
        job = f"job-{h // 64}"
        train = [TrainRecord(now, job, (h % 64) * g + i, i, 64 * g, 1000 + i, 1000, seq, loss=2.0) for i in range(g)]
        return Frame(f"gpu-{h:05d}", "soak", seq, now, True, values, list(range(g)), [GPU_OK] * g, train=train)

    def run(self) -> None:
        hosts = range(self.n_hosts)
        for h in hosts:
            self.bridge.on_status(HostStatus(f"10.0.{h // 256}.{h % 256}:50051", f"gpu-{h:05d}", CONNECTED))
        seq = 0
        slices = 20  # spread each second's frames over 20 slices of 50 ms
        per = -(-self.n_hosts // slices)
        t_next = time.monotonic()
        while not self.stop.is_set():
            seq += 1
            for k in range(slices):
                for h in range(k * per, min(self.n_hosts, (k + 1) * per)):
                    self.bridge.on_frame(self.frame(h, seq))
                    self.sent += 1
                t_next += 1.0 / slices
                delay = t_next - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    return
            if seq % 30 == 0:  # a few hosts drop and come back
                for h in range(seq % 97, self.n_hosts, 211):
                    state = DISCONNECTED if (seq // 30) % 2 else CONNECTED
                    self.bridge.on_status(HostStatus(f"10.0.{h // 256}.{h % 256}:50051", f"gpu-{h:05d}", state))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=1536)
    p.add_argument("--minutes", type=float, default=120.0)
    p.add_argument("--sample-s", type=float, default=30.0)
    p.add_argument("--warmup-s", type=float, default=None, help="default: min(300, a third of the run)")
    p.add_argument("--max-growth-pct", type=float, default=10.0)
    p.add_argument("--no-churn", action="store_true", help="keep metric and sort fixed")
    args = p.parse_args(argv)
    duration_s = args.minutes * 60.0
    warmup_s = args.warmup_s if args.warmup_s is not None else min(300.0, duration_s / 3)

    app = QApplication.instance() or QApplication([])
    model = FleetModel(max_hosts=args.hosts)
    bridge = QtIngestBridge()
    win = build_main_window(model, bridge)
    win.resize(1600, 1000)
    win.show()
    feeder = Feeder(bridge, args.hosts)
    proc = psutil.Process()
    proc.cpu_percent(None)
    t0 = time.monotonic()
    samples: list[dict[str, Any]] = []
    churn = [0]
    metrics = ("temp_c", "gpu_util_pct", "power_w", "mem_used_mib")

    def sample() -> None:
        s = {"t_s": round(time.monotonic() - t0, 1), "rss_mb": round(proc.memory_info().rss / 2**20, 1),
             "cpu_pct": round(proc.cpu_percent(None), 1), "image_paints": PAINTS[0],
             "heatmap_redraws": win.heatmap.redraws, "timeline_redraws": win.timeline.redraws,
             "frames_sent": feeder.sent, "bridge_batches": bridge.emitted, "bridge_items": bridge.items,
             "bridge_dropped": bridge.dropped, "bridge_pending": len(bridge._pending), "hosts": model.n_hosts,
             "threads": threading.active_count(), "py_objects": len(gc.get_objects())}
        samples.append(s)
        print(json.dumps(s), flush=True)

    def do_churn() -> None:
        churn[0] += 1
        model.set_metric(metrics[churn[0] % len(metrics)])
        model.set_sort(SORT_MODES[churn[0] % len(SORT_MODES)])

    sampler = QTimer()
    sampler.timeout.connect(sample)
    sampler.start(int(args.sample_s * 1000))
    churner = QTimer()
    churner.timeout.connect(do_churn)
    if not args.no_churn:
        churner.start(60_000)
    QTimer.singleShot(int(duration_s * 1000), app.quit)
    feeder.start()
    sample()
    app.exec()
    if time.monotonic() - t0 - samples[-1]["t_s"] > 1.0:
        sample()
    feeder.stop.set()
    feeder.join(5)
    bridge.close()
    win.close()

    after = [s for s in samples if s["t_s"] >= warmup_s] or samples[-1:]
    last = samples[-1]
    # medians of the first and last k samples after warm-up: one sample taken while a batch is in
    # flight reads a few MB high, which is noise, not growth
    k = max(1, min(3, len(after) // 2))
    base_mb = float(np.median([s["rss_mb"] for s in after[:k]]))
    final_mb = float(np.median([s["rss_mb"] for s in after[-k:]]))
    growth = 100.0 * (final_mb - base_mb) / base_mb
    elapsed = last["t_s"]
    cpu = [s["cpu_pct"] for s in samples[1:]]
    summary = {
        "summary": True, "hosts": args.hosts, "minutes": args.minutes, "warmup_s": warmup_s,
        "rss_baseline_mb": base_mb, "rss_final_mb": final_mb, "rss_window_samples": k,
        "rss_max_after_warmup_mb": max(s["rss_mb"] for s in after), "rss_growth_pct": round(growth, 2),
        "cpu_pct_median": float(np.median(cpu)) if cpu else None,
        "image_paints_per_s": round(last["image_paints"] / max(elapsed, 1e-9), 2),
        "heatmap_redraws_per_s": round(last["heatmap_redraws"] / max(elapsed, 1e-9), 2),
        "frames_per_s": round(last["frames_sent"] / max(elapsed, 1e-9), 1),
        "bridge_batches_per_s": round(last["bridge_batches"] / max(elapsed, 1e-9), 2),
        "bridge_dropped": last["bridge_dropped"],
        "machine": {"python": platform.python_version(), "pyside6": PYSIDE_VERSION, "nproc": os.cpu_count(),
                    "platform": os.environ.get("QT_QPA_PLATFORM", "")},
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    ok = growth <= args.max_growth_pct and last["image_paints"] > 0
    summary["pass"] = ok
    print(json.dumps(summary), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
