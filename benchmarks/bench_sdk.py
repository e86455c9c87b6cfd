"""Cost of one `sdk.log()` call, with the agent's receiver running and with no agent at all.

Run from the repository root (about 30 s):

    python benchmarks/bench_sdk.py               # table, then one JSON document
    python benchmarks/bench_sdk.py --json-only   # JSON only
    python benchmarks/bench_sdk.py --calls 20000 --paced-calls 5000

Every call is timed alone with perf_counter_ns around `sdk.log(step=, loss=, grad_norm=,
lr=, tokens=)`, so timer overhead (~60-130 ns) is included. The receiver is an
agent-like process (TrainingReceiver with its reader thread, drained every 50 ms), which is
how production runs it.

Scenarios:
  flood      calls back to back (hot caches); coalescing packs them into few datagrams
  paced-200us / paced-2ms   one call every 200 us / 2 ms, spinning in between. On small VMs a
             call made after a pause runs on cold caches; the "null p50" column times an empty
             function call under the same pacing, i.e. what the machine charges any code
  no-coalesce  GPUSOC_SDK_COALESCE_MS=0 semantics: one send() per call (the syscall's cost)
  no-agent   nothing listens: each call is a counted drop
  disabled   init(enabled=False)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import sdk  # noqa: E402

RECEIVER_SCRIPT = """
import sys, time
from agent.training import TrainingReceiver
rx = TrainingReceiver(sys.argv[1])  # background reader thread on by default
print("ready", flush=True)
while True:  # the agent's tick loop
    time.sleep(0.05)
    rx.drain()
"""


def _receiver_process(path: str) -> subprocess.Popen[str]:
    """A separate agent-like process, so the receiver does not share this process's GIL."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER_SCRIPT, path], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("receiver process did not start")
    return proc


def _null() -> None:
    return None


def _time_calls(n: int, interval_ns: int, fn: Callable[..., None]) -> list[int]:
    """Per-call durations of fn(step=, loss=, grad_norm=, lr=, tokens=)."""
    clock = time.perf_counter_ns
    out = [0] * n
    next_at = clock()
    for i in range(n):
        if interval_ns:
            while clock() < next_at:
                pass
            next_at += interval_ns
        t0 = clock()
        fn(step=i, loss=2.3, grad_norm=1.1, lr=3e-4, tokens=4096)
        out[i] = clock() - t0
    return out


def _pct(samples: list[int], q: float) -> int:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))]


def _run(name: str, setup: Callable[[], object], n: int, interval_ns: int) -> dict[str, object]:
    setup()
    _time_calls(min(n, 1000), interval_ns, sdk.log)  # warm-up: connect, caches
    sdk.flush()
    client = sdk._client
    assert client is not None
    client.sent = client.dropped = 0
    samples = _time_calls(n, interval_ns, sdk.log)
    sdk.flush()
    st = sdk.stats()
    null = _time_calls(min(n, 2000), interval_ns, lambda **_: _null()) if interval_ns else []
    sdk.close()
    return {
        "scenario": name,
        "calls": n,
        "interval_us": interval_ns / 1000,
        "p50_ns": _pct(samples, 0.50),
        "p99_ns": _pct(samples, 0.99),
        "mean_ns": round(statistics.fmean(samples)),
        "null_p50_ns": _pct(null, 0.50) if null else None,
        "sent": st["sent"],
        "dropped": st["dropped"],
    }


def main() -> None:
    """Run all scenarios, print a table and one JSON document."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=100_000, help="calls in flood scenarios")
    ap.add_argument("--paced-calls", type=int, default=10_000, help="calls in paced scenarios")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args()
    n, m = args.calls, args.paced_calls

    results = []
    with tempfile.TemporaryDirectory(prefix="gpusoc-bench-") as tmp:
        path = os.path.join(tmp, "agent.sock")
        proc = _receiver_process(path)

        def connect(coalesce: bool = True) -> Callable[[], object]:
            def setup() -> object:
                client = sdk.init(socket_path=path, job_id="bench")
                if not coalesce:
                    client._window_ns = 0
                return client

            return setup

        try:
            results.append(_run("receiver flood", connect(), n, 0))
            results.append(_run("receiver paced-200us", connect(), m, 200_000))
            results.append(_run("receiver paced-2ms", connect(), m // 4, 2_000_000))
            results.append(_run("receiver no-coalesce", connect(False), m, 200_000))
        finally:
            proc.kill()
            proc.wait()
        missing = os.path.join(tmp, "absent", "agent.sock")
        results.append(_run("no-agent flood", lambda: sdk.init(socket_path=missing), n, 0))
        results.append(_run("no-agent paced-2ms", lambda: sdk.init(socket_path=missing), m // 4, 2_000_000))
        results.append(_run("disabled flood", lambda: sdk.init(enabled=False), n, 0))

    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "nproc": os.cpu_count(),
        "coalesce_ms": sdk.COALESCE_S * 1000,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if not args.json_only:
        cols = ("scenario", "calls", "p50_ns", "p99_ns", "mean_ns", "null_p50_ns", "sent", "dropped")
        print(f"{cols[0]:<22}" + "".join(f"{c:>12}" for c in cols[1:]))
        for r in results:
            print(f"{r['scenario']:<22}" + "".join(f"{'-' if r[c] is None else r[c]!s:>12}" for c in cols[1:]))
    print(json.dumps({"meta": meta, "results": results}, indent=None if args.json_only else 2))


if __name__ == "__main__":
    main()
