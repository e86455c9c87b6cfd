"""Freeze a job that spans 64 simulated hosts: time from command to all-confirmed-frozen, and skew.

Run from the repository root, as root on a machine with cgroup v2 (falls back to SIGSTOP otherwise):

    python benchmarks/bench_freeze.py                  # 64 hosts, 30 freeze/resume rounds
    python benchmarks/bench_freeze.py --hosts 16 --rounds 10 --commit-delay-ms 200 --json-only

Each simulated host is a real agent control plane (Controller behind its own mTLS gRPC server
on 127.0.0.1), spread over a few agent processes like `gpusoc-agent fleet-sim`. Each host's
job is a real process (a Python loop) in a cgroup of its own, registered to that host the way
the SDK would register it (pid, uid). The "console" in this process signs one freeze envelope
per round (target_hosts = all hosts), sends PREPARE with commit_at = now + delay to every
host at once, then RESULT; resume is the same with two operators. Reported per round:

  command->all frozen  max(confirmed_at) - the instant the console started sending
  confirm after commit max(confirmed_at) - commit_at (kernel confirmation latency)
  skew                 max(executed_at) - min(executed_at) over hosts

All hosts share one clock here, so skew is scheduling skew only; across machines add the clock
offset (chrony/PTP). Results go to stdout (table + JSON); docs/benchmarks-response.md has runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from agent.act.freeze import cgroup2_mount, cgroup_members  # noqa: E402
from agent.pki import (  # noqa: E402
    channel_credentials,
    create_dev_pki,
    create_operator,
    load_operator_key,
    server_credentials,
)
from protos import serde, signing  # noqa: E402
from protos.types import PHASE_PREPARE, PHASE_RESULT, CommandRequest, Receipt  # noqa: E402

JOB = "bench-job"
# A job process: sleeps in a loop and exits by itself if the bench dies (reparented).
LOOP = "import os, time\nparent = os.getppid()\nwhile os.getppid() == parent: time.sleep(0.01)"


def host_name(i: int) -> str:
    return f"bench-{i:03d}"


# --------------------------------------------------------------------------- agent processes


def _agent_slice(indices: list[int], pids: dict[int, int], pki: str, state: str, base_port: int, ready: Any) -> None:
    asyncio.run(_serve(indices, pids, Path(pki), Path(state), base_port, ready))


async def _serve(indices: list[int], pids: dict[int, int], pki: Path, state: Path, base_port: int, ready: Any) -> None:
    from agent.act.controller import Controller, ControlSettings
    from agent.buffer import FrameBuffer
    from agent.collect.simulated import SimulatedCollector
    from agent.runtime import AgentRuntime
    from agent.serve import start_server
    from agent.training import RankRegistration

    servers = []
    for i in indices:
        name = host_name(i)
        rt = AgentRuntime(name, SimulatedCollector(1, host=name), FrameBuffer(max_frames=100), 1.0)
        reg = {JOB: {0: RankRegistration(pids[i], os.getuid(), len(pids), 0, {}, time.time_ns())}}
        settings = ControlSettings(host=name, state_dir=state / name, operator_ca=pki / "operator-ca.pem")
        ctl = Controller(settings, lambda r=reg: r, rt.add_event)  # type: ignore[misc]
        creds = server_credentials(pki / "agents" / f"{name}.pem", pki / "agents" / f"{name}.key",
                                   pki / "console-ca.pem")
        server, _ = await start_server(rt, f"127.0.0.1:{base_port + i}", creds, ctl)
        servers.append(server)
    ready.set()
    await asyncio.Event().wait()


# --------------------------------------------------------------------------- console side


async def _round(stubs: list[Any], ops: list[tuple[bytes, Any]], action: str, hosts: list[str],
                 delay_ms: float) -> dict[str, float]:
    payload = signing.make_payload(action, JOB, hosts, f"bench {action}")
    env = signing.build_envelope(payload, ops)
    t0 = time.time_ns()
    commit_at = t0 + int(delay_ms * 1e6)
    preps = await asyncio.gather(*(s(CommandRequest(PHASE_PREPARE, env, commit_at_unix_ns=commit_at), timeout=10)
                                   for s in stubs))
    t_prepared = time.time_ns()
    bodies = [signing.parse_receipt(p.receipt) for p in preps]
    bad = [b for b in bodies if b.status != "prepared"]
    if bad:
        raise SystemExit(f"prepare failed on {bad[0].host}: {bad[0].status} {bad[0].check} {bad[0].reason}")
    finals = await asyncio.gather(*(s(CommandRequest(PHASE_RESULT, command_id=payload.command_id, wait_s=10),
                                      timeout=15) for s in stubs))
    t_results = time.time_ns()
    rs: list[Receipt] = [signing.parse_receipt(f.receipt) for f in finals]
    bad = [r for r in rs if r.status != "executed"]
    if bad:
        raise SystemExit(f"{action} failed on {bad[0].host}: {bad[0].status} {bad[0].reason}")
    executed = [r.executed_at_ns for r in rs]
    confirmed = [r.confirmed_at_ns for r in rs]
    return {
        "all_confirmed_ms": (max(confirmed) - t0) / 1e6,
        "confirm_after_commit_ms": (max(confirmed) - commit_at) / 1e6,
        "skew_ms": (max(executed) - min(executed)) / 1e6,
        "late_max_ms": (max(executed) - commit_at) / 1e6,
        "prepare_rtt_ms": (t_prepared - t0) / 1e6,
        "console_seen_ms": (t_results - t0) / 1e6,
        "methods": sorted({r.method for r in rs}),  # type: ignore[dict-item]
    }


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


async def _console(args: argparse.Namespace, pki: Path) -> dict[str, Any]:
    consoles = pki / "consoles"
    creds = channel_credentials(pki / "agent-ca.pem", consoles / "console.pem", consoles / "console.key")
    channels, stubs = [], []
    for i in range(args.hosts):
        # Agent certificates carry 127.0.0.1 as a SAN: normal hostname verification applies.
        ch = grpc.aio.secure_channel(f"127.0.0.1:{args.base_port + i}", creds)
        channels.append(ch)
        stubs.append(ch.unary_unary(serde.COMMAND_METHOD, request_serializer=serde.encode_command_request,
                                    response_deserializer=serde.decode_signed_receipt))
    await asyncio.gather(*(ch.channel_ready() for ch in channels))
    alice = create_or_load(pki, "alice")
    bob = create_or_load(pki, "bob")
    hosts = [host_name(i) for i in range(args.hosts)]
    freezes, resumes = [], []
    for n in range(args.rounds + 1):
        f = await _round(stubs, [alice], "freeze", hosts, args.commit_delay_ms)
        await asyncio.sleep(0.1)
        r = await _round(stubs, [alice, bob], "resume", hosts, args.commit_delay_ms)
        if n:  # round 0 warms up connections and code paths
            freezes.append(f)
            resumes.append(r)
        await asyncio.sleep(0.05)
    for ch in channels:
        await ch.close()

    def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"methods": sorted({m for r in rows for m in r["methods"]})}
        for key in ("all_confirmed_ms", "confirm_after_commit_ms", "skew_ms", "late_max_ms", "prepare_rtt_ms",
                    "console_seen_ms"):
            xs = [float(r[key]) for r in rows]
            out[key] = {"p50": round(statistics.median(xs), 2), "p99": round(_pct(xs, 99), 2),
                        "max": round(max(xs), 2)}
        return out

    return {"freeze": summary(freezes), "resume": summary(resumes)}


def create_or_load(pki: Path, name: str) -> tuple[bytes, Any]:
    cert = pki / "operators" / f"{name}.pem"
    if not cert.exists():
        create_operator(pki, name, "responder")
    return cert.read_bytes(), load_operator_key(pki / "operators" / f"{name}.key")


# --------------------------------------------------------------------------- main


def machine() -> str:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=30, help="measured freeze/resume rounds (plus one warm-up)")
    ap.add_argument("--processes", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                    help="agent processes the hosts are spread over")
    ap.add_argument("--commit-delay-ms", type=float, default=300.0, help="commit_at = now + this")
    ap.add_argument("--base-port", type=int, default=18600)
    ap.add_argument("--no-cgroup", action="store_true", help="leave jobs in the root cgroup (SIGSTOP path)")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gpusoc-bench-freeze-"))
    pki = work / "pki"
    create_dev_pki(pki, agents=[host_name(i) for i in range(args.hosts)], consoles=["console"])
    create_or_load(pki, "alice")
    create_or_load(pki, "bob")

    mount = None if args.no_cgroup else cgroup2_mount()
    parent: Path | None = None
    if mount is not None and os.geteuid() == 0:
        parent = mount[0] / f"gpusoc-bench-{uuid.uuid4().hex[:8]}"
        try:
            parent.mkdir()
        except OSError:
            parent = None
    jobs = [subprocess.Popen([sys.executable, "-c", LOOP]) for _ in range(args.hosts)]
    cgroups: list[Path] = []
    if parent is not None:
        for i, p in enumerate(jobs):
            cg = parent / f"host-{i:03d}"
            cg.mkdir()
            (cg / "cgroup.procs").write_text(f"{p.pid}\n")
            cgroups.append(cg)
    pids = {i: p.pid for i, p in enumerate(jobs)}

    ctx = mp.get_context("spawn")
    n = max(1, min(args.processes, args.hosts))
    procs = []
    for k in range(n):
        ready = ctx.Event()
        proc = ctx.Process(target=_agent_slice, daemon=True,
                           args=(list(range(args.hosts))[k::n], pids, str(pki), str(work / "state"), args.base_port,
                                 ready))
        proc.start()
        procs.append((proc, ready))
    try:
        for _proc, ready in procs:
            if not ready.wait(120):
                raise SystemExit("agent process did not start")
        t = time.time()
        results = asyncio.run(_console(args, pki))
        elapsed = time.time() - t
    finally:
        for proc, _ in procs:
            proc.terminate()
        for cg in cgroups:
            with contextlib.suppress(OSError):
                (cg / "cgroup.freeze").write_text("0")
        for p in jobs:
            p.kill()
            p.wait()
        if parent is not None:
            for cg in cgroups:
                for _ in range(50):
                    if not cgroup_members(cg):
                        break
                    time.sleep(0.02)
                with contextlib.suppress(OSError):
                    cg.rmdir()
            with contextlib.suppress(OSError):
                parent.rmdir()

    report = {
        "command": "python benchmarks/bench_freeze.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "hosts": args.hosts,
        "rounds": args.rounds,
        "agent_processes": n,
        "commit_delay_ms": args.commit_delay_ms,
        "elapsed_s": round(elapsed, 1),
        **results,
    }
    if not args.json_only:
        print(f"{args.hosts} hosts, {args.rounds} rounds, {n} agent processes, commit delay {args.commit_delay_ms} ms")
        print(f"{'':8} {'metric':26} {'p50':>9} {'p99':>9} {'max':>9}")
        for action in ("freeze", "resume"):
            for key in ("all_confirmed_ms", "confirm_after_commit_ms", "skew_ms", "late_max_ms", "prepare_rtt_ms"):
                row = results[action][key]
                print(f"{action:8} {key:26} {row['p50']:9.2f} {row['p99']:9.2f} {row['max']:9.2f}")
            print(f"{action:8} methods: {', '.join(results[action]['methods'])}")
    print(json.dumps(report, indent=None if args.json_only else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
