"""Agent footprint: CPU (% of one core) and RSS of `gpusoc-agent run` with simulated GPUs.

Starts the real agent as a subprocess (mTLS with a throwaway dev PKI, or --insecure), attaches
one subscriber that decodes every frame (as a console would), optionally has a training loop
log through the SDK, and samples the agent's CPU time and RSS with psutil.

    python benchmarks/bench_agent.py --gpus 8 --seconds 60 [--interval 1.0] [--sdk-rate 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil

from protos import serde
from protos.types import Gap, SubscribeRequest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def subscribe(address: str, creds: grpc.ChannelCredentials | None, seconds: float) -> int:
    channel = grpc.aio.secure_channel(address, creds) if creds else grpc.aio.insecure_channel(address)
    n = 0
    async with channel:
        stub = channel.unary_stream(serde.SUBSCRIBE_METHOD, request_serializer=serde.encode_subscribe_request,
                                    response_deserializer=serde.decode_stream_item)
        deadline = time.monotonic() + seconds
        call = stub(SubscribeRequest(from_now=True))
        async for item in call:
            if not isinstance(item, Gap):
                n += 1
            if time.monotonic() > deadline:
                call.cancel()
                break
    return n


def sdk_loop(sock: str, rate: float, seconds: float) -> subprocess.Popen[bytes]:
    code = (
        "import time,sys\nfrom agent import sdk\n"
        f"sdk.init(job_id='bench', rank=0, local_rank=0, world_size=1, socket_path={sock!r})\n"
        f"end=time.time()+{seconds}\nstep=0\n"
        f"while time.time()<end:\n  sdk.log(step=step, loss=1.0, grad_norm=1.0, lr=1e-4, tokens=4096); step+=1; "
        f"time.sleep({1.0 / rate})\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--sdk-rate", type=float, default=0.0, help="SDK log() calls per second (0 = no job)")
    ap.add_argument("--insecure", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="gpusoc-bench-"))
    port = free_port()
    sock = str(tmp / "agent.sock")
    cmd = [sys.executable, "-m", "agent.cli", "run", "--simulate-gpus", str(args.gpus), "--listen",
           f"127.0.0.1:{port}", "--training-socket", sock, "--sample-interval", str(args.interval),
           "--host", "bench-host"]
    creds = None
    if args.insecure:
        cmd.append("--insecure")
    else:
        from agent.pki import channel_credentials, create_dev_pki

        create_dev_pki(tmp / "pki", agents=["bench-host"], consoles=["bench"])
        p = tmp / "pki"
        cmd += ["--tls-cert", str(p / "agents/bench-host.pem"), "--tls-key", str(p / "agents/bench-host.key"),
                "--tls-client-ca", str(p / "console-ca.pem")]
        creds = channel_credentials(p / "agent-ca.pem", p / "consoles/bench.pem", p / "consoles/bench.key")
    env = dict(os.environ, GPUSOC_AGENT_STATE_DIR=str(tmp / "state"))
    agent = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    proc = psutil.Process(agent.pid)
    time.sleep(2.0)
    job = sdk_loop(sock, args.sdk_rate, args.seconds + args.warmup + 5) if args.sdk_rate else None

    async def measure() -> dict[str, float]:
        sub = asyncio.create_task(subscribe(f"127.0.0.1:{port}", creds, args.seconds + args.warmup + 1))
        await asyncio.sleep(args.warmup)
        t0, c0 = time.monotonic(), sum(proc.cpu_times()[:2])
        rss: list[int] = []
        while time.monotonic() - t0 < args.seconds:
            rss.append(proc.memory_info().rss)
            await asyncio.sleep(1.0)
        c1, t1 = sum(proc.cpu_times()[:2]), time.monotonic()
        frames = await sub
        return {"cpu_pct_of_one_core": 100.0 * (c1 - c0) / (t1 - t0),
                "rss_mb_median": sorted(rss)[len(rss) // 2] / 2**20,
                "rss_mb_max": max(rss) / 2**20, "frames_received": frames}

    try:
        result = asyncio.run(measure())
    finally:
        agent.terminate()
        agent.wait(10)
        if job:
            job.kill()
    result.update({"gpus": args.gpus, "interval_s": args.interval, "seconds": args.seconds, "sdk_rate": args.sdk_rate,
                   "mtls": not args.insecure, "python": platform.python_version(),
                   "machine": platform.processor() or platform.machine(), "cores": os.cpu_count() or 0})
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
