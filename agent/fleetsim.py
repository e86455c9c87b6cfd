"""`gpusoc-agent fleet-sim`: many simulated agents from a few processes, for load and demos.

Every simulated host is a real AgentRuntime behind its own gRPC server, port and (in
secure mode) its own certificate, so consoles exercise exactly the production path. The
training records come from synthetic multi-host jobs generated in-process instead of the
SDK socket; every frame is labelled simulated on the wire.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import multiprocessing as mp
import os
import random
import signal
import socket
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_any
from pathlib import Path

from agent.buffer import FrameBuffer
from agent.collect.simulated import SimulatedCollector
from agent.runtime import AgentRuntime
from protos.types import TrainRecord

log = logging.getLogger("gpusoc.fleetsim")

NAN = math.nan


@dataclass
class SimJob:
    """A synchronous data-parallel job over consecutive hosts, one rank per GPU."""

    job_id: str
    hosts: list[int]
    gpus_per_host: int
    start_ns: int
    step_s: float = 1.0
    tokens_per_step: float = 8 * 4096.0

    @property
    def world_size(self) -> int:
        return len(self.hosts) * self.gpus_per_host


@dataclass
class SimFaults:
    """Faults a demo or scenario applies to one simulated host."""

    straggle_factor: float = 1.0  # >1: this host's ranks step slower
    nan_at_step: int = -1  # the loss turns NaN from this step on
    frozen: bool = False  # steps stop (a hang) while processes live


@dataclass
class SyntheticTraining:
    """TrainingSource for one simulated host: records for the ranks of its jobs."""

    host_index: int
    jobs: list[SimJob]
    faults: SimFaults = field(default_factory=SimFaults)
    dropped: int = 0
    _last_step: dict[tuple[str, int], int] = field(default_factory=dict)
    _registered: bool = False

    def drain(self) -> list[TrainRecord]:
        now = time.time_ns()
        out: list[TrainRecord] = []
        for job in self.jobs:
            if self.host_index not in job.hosts:
                continue
            slot = job.hosts.index(self.host_index)
            for local in range(job.gpus_per_host):
                rank = slot * job.gpus_per_host + local
                pid = 10_000 + self.host_index * 64 + local
                if not self._registered:
                    out.append(TrainRecord(now, job.job_id, rank, local, job.world_size, pid, 1000, 0, kind="init",
                                           info={"launcher": "simulated", "argv": "train.py --simulated"}))
                if self.faults.frozen:
                    continue
                step_s = job.step_s * self.faults.straggle_factor
                step = int((now - job.start_ns) / 1e9 / step_s)
                key = (job.job_id, rank)
                last = self._last_step.get(key, step - 1)
                for s in range(max(last + 1, step - 5), step + 1):  # at most a few per tick
                    loss = 2.2 + 8.0 / math.sqrt(1.0 + s / 20.0) + random.gauss(0, 0.03)
                    if 0 <= self.faults.nan_at_step <= s:
                        loss = NAN
                    out.append(TrainRecord(
                        now, job.job_id, rank, local, job.world_size, pid, 1000, s,
                        loss=loss, grad_norm=abs(random.gauss(1.0, 0.1)), lr=3e-4,
                        tokens=job.tokens_per_step, extra={"step_time_s": step_s * random.uniform(0.97, 1.03)},
                    ))
                self._last_step[key] = max(last, step)
        self._registered = True
        return out


def host_name(i: int) -> str:
    return f"sim-{i:04d}"


def plan_jobs(n_hosts: int, gpus: int, start_ns: int) -> list[SimJob]:
    """Two multi-host jobs over the first half and the next quarter of the fleet; the rest idle."""
    half = max(1, n_hosts // 2)
    quarter = max(1, n_hosts // 4)
    jobs = [SimJob("llm-pretrain-a", list(range(half)), gpus, start_ns, step_s=1.0)]
    if n_hosts > half:
        jobs.append(SimJob("finetune-b", list(range(half, min(n_hosts, half + quarter))), gpus, start_ns, step_s=0.5))
    return jobs


async def _serve_slice(indices: list[int], args: argparse.Namespace, start_ns: int,
                       ready: mp.synchronize.Event | None) -> None:
    from agent.pki import server_credentials
    from agent.serve import start_server

    jobs = plan_jobs(args.hosts, args.gpus, start_ns)
    max_frames = max(60, int(args.buffer_seconds / args.interval))
    runtimes: list[AgentRuntime] = []
    servers = []
    for i in indices:
        name = host_name(i)
        collector = SimulatedCollector(args.gpus, host=name)
        faults = SimFaults()
        if args.faults and i == 1 and args.hosts > 4:
            faults.straggle_factor = 1.6
        rt = AgentRuntime(name, collector, FrameBuffer(max_frames=max_frames), args.interval,
                          training=SyntheticTraining(i, jobs, faults))
        collector.load_source = rt.gpu_activity  # GPUs run hot while their ranks log
        creds = None
        if not args.insecure:
            pki = Path(args.pki)
            creds = server_credentials(pki / "agents" / f"{name}.pem", pki / "agents" / f"{name}.key",
                                       pki / "console-ca.pem")
        server, _ = await start_server(rt, f"127.0.0.1:{args.base_port + i}", creds)
        servers.append(server)
        runtimes.append(rt)
    tasks = [asyncio.create_task(rt.run(phase_s=random.uniform(0, args.interval))) for rt in runtimes]
    if args.faults:
        tasks.append(asyncio.create_task(_inject_faults(runtimes, args)))
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for rt in runtimes:
        rt.stop()
    for t in tasks[len(runtimes):]:  # the fault injector loops forever
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(s.stop(0.5) for s in servers))


async def _inject_faults(runtimes: list[AgentRuntime], args: argparse.Namespace) -> None:
    """Now and then: an XID, a hot GPU, a lost GPU, a NaN loss (labelled simulated like all else)."""
    rng = random.Random((args.seed or 0) * 7919 + zlib.crc32(runtimes[0].host.encode()))  # differs per process
    while True:
        await asyncio.sleep(rng.uniform(20, 40))
        rt = rng.choice(runtimes)
        col = rt.collector
        if not isinstance(col, SimulatedCollector):
            continue
        kind = rng.choice(["xid", "heat", "lost", "nan"])
        gpu = rng.randrange(col.n_gpus)
        log.info("fault: %s on %s GPU %d", kind, rt.host, gpu)
        if kind == "xid":
            col.inject_xid(gpu, rng.choice([48, 63, 74, 79, 94]))
        elif kind == "heat":
            col.heat(gpu, 40.0)
        elif kind == "lost":
            col.lose_gpu(gpu)
        elif isinstance(rt.training, SyntheticTraining):
            rt.training.faults.nan_at_step = 0


def _run_slice(indices: list[int], args: argparse.Namespace, start_ns: int, ready: mp.synchronize.Event) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fleetsim[%(process)d] %(message)s")
    random.seed((args.seed or 0) + indices[0])
    try:
        asyncio.run(_serve_slice(indices, args, start_ns, ready))
    except KeyboardInterrupt:
        pass
    except (OSError, RuntimeError) as exc:  # e.g. a port taken since the parent checked it
        bind = isinstance(exc, OSError) or "bind" in str(exc)
        (log.error if bind else log.exception)("fleet-sim process for hosts %s failed: %s",
                                                ",".join(map(str, indices)), exc)
        sys.exit(1)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could bind host:port now (as gRPC does: SO_REUSEADDR, no SO_REUSEPORT)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
    except OSError:
        return False
    finally:
        s.close()
    return True


def first_busy_port(base: int, n: int) -> int | None:
    """The first port of base..base+n-1 on 127.0.0.1 that cannot be bound, or None."""
    return next((p for p in range(base, base + n) if not port_free(p)), None)


def next_free_block(after: int, n: int, tries: int = 64) -> int | None:
    """A base port above `after` whose n ports are all free, or None (looks at `tries` blocks)."""
    base = after + 1
    for _ in range(tries):
        if base + n - 1 > 65535:
            return None
        busy = first_busy_port(base, n)
        if busy is None:
            return base
        base = busy + 1
    return None


def check_ports(args: argparse.Namespace) -> str | None:
    """A one-line reason the fleet's ports cannot be used, or None when they all can."""
    base, n = args.base_port, args.hosts
    if n < 1:
        return "--hosts must be at least 1"
    if base < 1 or base + n - 1 > 65535:
        return f"ports {base}..{base + n - 1} are out of range: choose --base-port between 1 and {65536 - n}"
    busy = first_busy_port(base, n)
    if busy is None:
        return None
    free = next_free_block(busy, n)
    hint = f"try --base-port {free}" if free is not None else "choose another --base-port"
    return (f"port {busy} on 127.0.0.1 is in use (the {n} hosts need ports {base}..{base + n - 1}); "
            f"{hint}, or stop what listens there")


def write_inventory(path: Path, args: argparse.Namespace) -> None:
    lines = [f"127.0.0.1:{args.base_port + i} {host_name(i)}" for i in range(args.hosts)]
    path.write_text("# simulated fleet (gpusoc-agent fleet-sim)\n" + "\n".join(lines) + "\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hosts", type=int, default=32, help="simulated hosts")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per host")
    p.add_argument("--base-port", type=int, default=17000, help="host i listens on 127.0.0.1:BASE+i")
    p.add_argument("--processes", type=int, default=max(1, min(4, (os.cpu_count() or 2))),
                   help="processes to spread hosts over")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    p.add_argument("--buffer-seconds", type=float, default=300.0, help="history each agent holds")
    p.add_argument("--pki", help="PKI dir (gpusoc-agent pki init); certs for sim-NNNN are created if missing")
    p.add_argument("--insecure", action="store_true", help="plaintext on loopback (no --pki needed)")
    p.add_argument("--inventory", help="write the fleet's inventory file here for gpusoc-console")
    p.add_argument("--faults", action="store_true", help="inject faults now and then (XID, heat, lost GPU, NaN)")
    p.add_argument("--seed", type=int, default=0)


def run_fleet(args: argparse.Namespace, ready_timeout: float = 120.0) -> int:
    """Start the slices, wait for them to listen, then wait for a signal.

    Returns 2 at once when a port of the fleet is busy, 1 when a process fails to start or dies.
    """
    if not args.insecure and not args.pki:
        raise SystemExit("gpusoc-agent fleet-sim: give --pki DIR (mTLS) or --insecure")
    problem = check_ports(args)
    if problem is not None:
        print(f"gpusoc-agent fleet-sim: {problem}", file=sys.stderr)
        return 2
    if not args.insecure:
        from agent.pki import create_dev_pki

        pki = Path(args.pki)
        missing = [host_name(i) for i in range(args.hosts) if not (pki / "agents" / f"{host_name(i)}.pem").exists()]
        create_dev_pki(pki, agents=missing, consoles=[] if (pki / "consoles").exists() else ["console"])
    start_ns = time.time_ns()
    n = max(1, min(args.processes, args.hosts))
    slices = [list(range(args.hosts))[k::n] for k in range(n)]
    ctx = mp.get_context("spawn")
    procs = []
    for sl in slices:
        ready = ctx.Event()
        p = ctx.Process(target=_run_slice, args=(sl, args, start_ns, ready), daemon=True)
        p.start()
        procs.append((p, ready))
    deadline = time.monotonic() + ready_timeout
    waiting = procs
    while waiting:
        waiting = [(p, ready) for p, ready in waiting if not ready.is_set()]
        dead = [p for p, _ in waiting if p.exitcode is not None]
        late = bool(waiting) and time.monotonic() > deadline
        if dead or late:
            if dead:
                log.error("a fleet-sim process exited (code %s) before its hosts listened", dead[0].exitcode)
            else:
                log.error("a fleet-sim process did not start in %.0f s", ready_timeout)
            _end(procs)
            return 1
        if waiting:
            wait_any([p.sentinel for p, _ in waiting], timeout=0.1)
    if args.inventory:  # written once every host listens, so a console finds them all up
        tmp = Path(args.inventory + ".tmp")
        write_inventory(tmp, args)
        tmp.replace(args.inventory)
    log.info("fleet-sim: %d hosts x %d GPUs on 127.0.0.1:%d..%d in %d processes (%s)", args.hosts, args.gpus,
             args.base_port, args.base_port + args.hosts - 1, n, "INSECURE" if args.insecure else "mTLS")
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    while not stop and all(p.is_alive() for p, _ in procs):
        time.sleep(0.5)
    died = [p for p, _ in procs if not p.is_alive()]
    if not stop and died:
        log.error("a fleet-sim process exited (code %s): stopping the fleet", died[0].exitcode)
    _end(procs)
    return 0 if stop or not died else 1


def _end(procs: Sequence[tuple[mp.process.BaseProcess, mp.synchronize.Event]]) -> None:
    for p, _ in procs:
        if p.is_alive():
            p.terminate()
    for p, _ in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
