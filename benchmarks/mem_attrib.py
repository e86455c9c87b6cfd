"""Where a console's memory goes: split RSS by allocator, to attribute growth a soak shows.

RSS alone cannot say who grows. This samples, once a minute, the desktop console on the demo
fleet (as benchmarks/soak_demo.py runs it) and writes JSON lines with:

* `rss`: the process's resident memory (MB);
* `je`: DuckDB's bundled jemalloc (`stats.allocated`, `active`, `resident`, `retained`,
  `metadata`), read through the `duckdb_je_mallctl` symbol the DuckDB wheel exports (absent in
  other builds: then `je` is null). `resident - active` is dirty memory jemalloc keeps;
* `glibc`: `mallinfo2()`: `used` (live malloc'd bytes: Qt, gRPC, DuckDB's C++ objects, Python
  objects over 512 bytes), `arena` (heap held, used + free), `mmap` (large blocks);
* `duckdb`: DuckDB's own accounting (`duckdb_memory()`, buffer pool and tracked allocations);
* `py_traced` with `--tracemalloc`: Python and numpy allocations (slows the console ~2x).

    python benchmarks/mem_attrib.py desktop --minutes 30 --out mem.jsonl
    python benchmarks/mem_attrib.py queries          # glibc bytes kept per DuckDB query

`queries` runs one DuckDB query shape 3 x 10,000 times on one connection and prints the live
glibc bytes per query, cumulative: a cache fills and the figure falls; a leak keeps it flat.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo() -> _MallInfo2 | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()  # type: ignore[no-any-return]


def _jemalloc() -> Any:
    """DuckDB's jemalloc `mallctl`, or None where the wheel does not export it."""
    try:
        import _duckdb

        fn = ctypes.CDLL(_duckdb.__file__).duckdb_je_mallctl
    except (ImportError, OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p,
                   ctypes.c_size_t]
    return fn


def _mb(n: float) -> float:
    return round(n / 2**20, 2)


def jemalloc_stats(mallctl: Any) -> dict[str, float] | None:
    if mallctl is None:
        return None
    epoch = ctypes.c_uint64(1)
    size = ctypes.c_size_t(8)
    mallctl(b"epoch", ctypes.byref(epoch), ctypes.byref(size), ctypes.byref(epoch), 8)  # refresh the stats
    out: dict[str, float] = {}
    for key in ("allocated", "active", "resident", "retained", "metadata"):
        value = ctypes.c_size_t(0)
        size = ctypes.c_size_t(ctypes.sizeof(value))
        if mallctl(f"stats.{key}".encode(), ctypes.byref(value), ctypes.byref(size), None, 0) == 0:
            out[key] = _mb(value.value)
    return out


def desktop(args: argparse.Namespace) -> int:
    import tracemalloc

    if args.tracemalloc:
        tracemalloc.start(1)
    import psutil
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    import console.app as appmod
    from console.cli import build_parser

    app = QApplication(sys.argv[:1])
    proc = psutil.Process()
    mallctl = _jemalloc()
    started = time.monotonic()
    out = open(args.out, "w")  # noqa: SIM115 - closed after the run

    def sample() -> None:
        t = (time.monotonic() - started) / 60
        rec: dict[str, Any] = {"t_min": round(t, 1), "rss": _mb(proc.memory_info().rss), "je": jemalloc_stats(mallctl)}
        mi = _mallinfo()
        if mi is not None:
            rec["glibc"] = {"used": _mb(mi.uordblks), "arena": _mb(mi.arena), "mmap": _mb(mi.hblkhd)}
        if args.tracemalloc:
            rec["py_traced"] = _mb(tracemalloc.get_traced_memory()[0])
        st = appmod.LAST_RUN
        if st:
            rows = st["writer"].read_query("SELECT tag, memory_usage_bytes FROM duckdb_memory()")
            rec["duckdb"] = _mb(sum(float(b or 0) for _, b in rows))
        out.write(json.dumps(rec) + "\n")
        out.flush()
        if t >= args.minutes:
            app.quit()

    timer = QTimer()
    timer.timeout.connect(sample)
    timer.start(int(args.every * 1000))
    rc = appmod.run_desktop(build_parser().parse_args(["--demo", "--demo-hosts", str(args.hosts)]))
    out.close()
    return rc


def queries(args: argparse.Namespace) -> int:
    import duckdb

    if _mallinfo() is None:
        print("needs glibc (mallinfo2)")
        return 2
    con = duckdb.connect(os.path.join(tempfile.mkdtemp(), "q.duckdb"))
    con.execute("CREATE TABLE frames (host VARCHAR, ts TIMESTAMPTZ)")
    con.execute("INSERT INTO frames SELECT 'h' || (i % 32), now() FROM range(100000) t(i)")
    for sql in ("SELECT 1", "SELECT count(*) FROM frames",
                "SELECT host, count(*) FROM frames WHERE ts > now() - INTERVAL 2 MINUTE GROUP BY host"):
        for _ in range(2000):  # warm
            con.execute(sql).fetchall()
        used0 = _mallinfo().uordblks  # type: ignore[union-attr]
        per = []
        for batch in range(1, 4):
            for _ in range(args.n):
                con.execute(sql).fetchall()
            per.append(round((_mallinfo().uordblks - used0) / (batch * args.n)))  # type: ignore[union-attr]
        print(json.dumps({"sql": sql, "glibc_bytes_per_query_cumulative": per, "queries_per_batch": args.n}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("desktop", help="the demo desktop, sampled once a minute")
    d.add_argument("--minutes", type=float, default=30.0)
    d.add_argument("--hosts", type=int, default=32)
    d.add_argument("--every", type=float, default=60.0)
    d.add_argument("--tracemalloc", action="store_true")
    d.add_argument("--out", default="mem-attrib.jsonl")
    q = sub.add_parser("queries", help="glibc bytes kept per DuckDB query")
    q.add_argument("--n", type=int, default=10000)
    args = ap.parse_args()
    return desktop(args) if args.cmd == "desktop" else queries(args)


if __name__ == "__main__":
    sys.exit(main())
