"""Soak: the real demo (fleet-sim child + full desktop console, offscreen) for --minutes.

Samples the console process every --every seconds and writes JSON lines: RSS, CPU, frames
ingested, rows committed, writer queue, bridge backlog, alerts raised, connection states. At the
end prints a summary and exits non-zero if RSS grew more than 10% after the warm-up or the
console stopped ingesting.

    python benchmarks/soak_demo.py --minutes 120 --hosts 32 --out docs/soak-demo.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=120.0)
    ap.add_argument("--hosts", type=int, default=32)
    ap.add_argument("--every", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=120.0, help="seconds before the RSS baseline is taken")
    ap.add_argument("--out", default="soak-demo.jsonl")
    args = ap.parse_args()

    import psutil
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    import console.app as appmod
    from console.cli import build_parser

    app = QApplication(sys.argv[:1])
    proc = psutil.Process()
    started = time.monotonic()
    samples: list[dict[str, object]] = []
    out = open(args.out, "w")  # noqa: SIM115

    def window() -> object | None:
        for w in app.topLevelWidgets():
            if w.isVisible() and w.windowTitle().startswith("gpusoc"):
                return w
        return None

    def sample() -> None:
        w = window()
        t = time.monotonic() - started
        cpu = proc.cpu_times()
        rec: dict[str, object] = {
            "t_s": round(t, 1),
            "rss_mb": round(proc.memory_info().rss / 2**20, 1),
            "cpu_s": round(cpu.user + cpu.system, 1),
            "threads": proc.num_threads(),
        }
        if w is not None:
            model = w.model  # type: ignore[attr-defined]
            rec["states"] = model.state_counts()
            rec["hosts"] = model.n_hosts
        st = appmod.LAST_RUN
        if st:
            rec["frames_committed"] = st["writer"].stats.get("frames_committed")
            rec["writer_queue"] = st["writer"].stats.get("queue_frames")
            rec["bridge_dropped"] = st["bridge"].dropped
            rec["alerts_raised"] = st["detection"].raised
            rec["cache_trims"] = st["writer"].stats.get("cache_trims")
            try:  # DuckDB's own accounting (buffer pool + tracked allocations), to attribute RSS growth
                rows = st["writer"].read_query("SELECT tag, memory_usage_bytes FROM duckdb_memory()")
                rec["duckdb_mb"] = round(sum(float(b or 0) for _, b in rows) / 2**20, 1)
                rec["duckdb_tags_mb"] = {t: round(float(b) / 2**20, 1) for t, b in rows if b}
            except Exception as exc:  # a sample must not end the soak
                rec["duckdb_mb"] = f"error: {exc}"
        samples.append(rec)
        out.write(json.dumps(rec) + "\n")
        out.flush()
        if t >= args.minutes * 60:
            app.quit()

    timer = QTimer()
    timer.timeout.connect(sample)
    timer.start(int(args.every * 1000))
    parsed = build_parser().parse_args(["--demo", "--demo-hosts", str(args.hosts)])
    rc = appmod.run_desktop(parsed)
    out.close()
    base = [s for s in samples if float(s["t_s"]) >= args.warmup]  # type: ignore[arg-type]
    if len(base) < 2:
        print("soak too short for a baseline")
        return 1
    r0, r1 = float(base[0]["rss_mb"]), float(base[-1]["rss_mb"])  # type: ignore[arg-type]
    growth = 100 * (r1 - r0) / r0
    f0, f1 = base[0].get("frames_committed") or 0, base[-1].get("frames_committed") or 0
    summary = {
        "minutes": round(float(samples[-1]["t_s"]) / 60, 1),  # type: ignore[arg-type]
        "rss_start_mb": r0,
        "rss_end_mb": r1,
        "rss_growth_pct": round(growth, 2),
        "frames_committed_after_warmup": int(f1) - int(f0),  # type: ignore[call-overload]
        "rc": rc,
    }
    print(json.dumps(summary))
    return 0 if growth < 10 and int(f1) > int(f0) else 1  # type: ignore[call-overload]


if __name__ == "__main__":
    sys.exit(main())
