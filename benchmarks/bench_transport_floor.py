"""The floor under the collector: CPU to receive N agents' Subscribe streams with grpc.aio, nothing else.

Why: the collector's CPU goal (docs/benchmarks.md) is only reachable if receiving one frame per
host per second costs less than the goal allows. This starts the same `gpusoc-agent fleet-sim` as
bench_collector.py, opens one grpc.aio stream per agent exactly as console/ingest/client.py does
(same channel options, raw bytes out of the deserializer), and counts frames. `--decode` adds
protos.serde.decode_stream_item per frame. No store, no detection, no identity checks.

    python benchmarks/bench_transport_floor.py --hosts 512 --seconds 30 [--decode] [--sync]

`--sync` uses the blocking gRPC API with one thread per stream instead, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil

from console.ingest.client import CHANNEL_OPTIONS
from console.ingest.inventory import parse_inventory
from protos import serde
from protos.types import SubscribeRequest


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


async def _stream(address: str, decode: bool, counter: list[int]) -> None:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
        sub = ch.unary_stream(
            serde.SUBSCRIBE_METHOD, request_serializer=serde.encode_subscribe_request, response_deserializer=lambda b: b
        )
        async for raw in sub(SubscribeRequest(from_now=True)):
            counter[0] += 1
            if decode:
                serde.decode_stream_item(raw)


def _sync_stream(address: str, decode: bool, counter: list[int], lock: threading.Lock) -> None:
    ch = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    sub = ch.unary_stream(
        serde.SUBSCRIBE_METHOD, request_serializer=serde.encode_subscribe_request, response_deserializer=lambda b: b
    )
    try:
        for raw in sub(SubscribeRequest(from_now=True)):
            with lock:
                counter[0] += 1
            if decode:
                serde.decode_stream_item(raw)
    except grpc.RpcError:
        return  # the generator went away at the end of the run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--processes", type=int, default=4, help="fleet-sim processes")
    ap.add_argument("--base-port", type=int, default=27000)
    ap.add_argument("--decode", action="store_true", help="also decode every frame (protos.serde)")
    ap.add_argument("--sync", action="store_true", help="blocking gRPC API, one thread per stream")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="gpusoc-floor-"))
    inv = tmp / "fleet.txt"
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "fleet-sim",
            "--hosts",
            str(args.hosts),
            "--base-port",
            str(args.base_port),
            "--processes",
            str(args.processes),
            "--inventory",
            str(inv),
            "--insecure",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while not inv.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)
    addresses = [e.address for e in parse_inventory(inv.read_text())]
    me, gen = psutil.Process(), psutil.Process(sim.pid)
    counter = [0]
    result: dict[str, object] = {}

    lock = threading.Lock()

    async def run() -> None:
        if args.sync:
            for a in addresses:
                threading.Thread(target=_sync_stream, args=(a, args.decode, counter, lock), daemon=True).start()
            tasks = []
        else:
            tasks = [asyncio.create_task(_stream(a, args.decode, counter)) for a in addresses]
        await asyncio.sleep(args.warmup)
        kids = gen.children(recursive=True)
        t0, c0, n0 = time.monotonic(), cpu_s(me), counter[0]
        g0 = sum(cpu_s(k) for k in kids)
        await asyncio.sleep(args.seconds)
        t1, c1, n1 = time.monotonic(), cpu_s(me), counter[0]
        g1 = sum(cpu_s(k) for k in kids)
        frames = n1 - n0
        result.update(
            {
                "hosts": len(addresses),
                "api": "sync" if args.sync else "aio",
                "decode": args.decode,
                "frames_per_s": round(frames / (t1 - t0), 1),
                "receiver_cpu_pct_of_one_core": round(100 * (c1 - c0) / (t1 - t0), 1),
                "receiver_cpu_us_per_frame": round(1e6 * (c1 - c0) / max(frames, 1), 1),
                "generator_cpu_pct_of_one_core": round(100 * (g1 - g0) / (t1 - t0), 1),
                "cores": os.cpu_count(),
                "python": platform.python_version(),
                "grpcio": grpc.__version__,
            }
        )
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run(run())
    finally:
        sim.terminate()
        sim.wait(30)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
