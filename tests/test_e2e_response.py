"""End to end: a multi-process training job under the SDK, frozen, resumed, and rolled back over mTLS gRPC.

The job is two worker processes that step in lockstep (an all-reduce every step), log each
step with `agent.sdk`, save a checkpoint every K steps on rank 0, sign it with
`agent.act.checkpoints.sign_checkpoint`, and resume from the path in RESUME_FROM. With torch
installed it is real `torch.distributed` (gloo, CPU); without torch a pure-Python stand-in
does the same over a TCP all-reduce. The agent side is the real runtime, SDK receiver,
controller and gRPC server; the console side is signed envelopes from two operators.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.act.controller import Controller, ControlSettings
from agent.act.freeze import cgroup2_mount, cgroup_members
from agent.buffer import FrameBuffer
from agent.collect.simulated import SimulatedCollector
from agent.pki import channel_credentials, create_dev_pki, create_operator, load_operator_key, server_credentials
from agent.runtime import AgentRuntime
from agent.serve import run_server
from agent.training import TrainingReceiver
from protos import serde, signing
from protos.types import PHASE_EXECUTE, PHASE_PREPARE, PHASE_RESULT, CommandRequest, Receipt, TrainRecord

ROOT = Path(__file__).resolve().parent.parent
HOST = "gpu-e2e"
WORLD = 2
EVERY = 10
HAS_TORCH = importlib.util.find_spec("torch") is not None

WORKER = r'''
"""Training worker for tests/test_e2e_response.py (argv: --ckpt DIR --key PEM --backend torch|python)."""
import argparse, json, os, shutil, socket, struct, sys, time
from pathlib import Path

from agent import sdk
from agent.act.checkpoints import sign_checkpoint

ap = argparse.ArgumentParser()
ap.add_argument("--ckpt", required=True)
ap.add_argument("--key", required=True)
ap.add_argument("--backend", required=True)
ap.add_argument("--every", type=int, default=10)
ap.add_argument("--step-s", type=float, default=0.05)
args = ap.parse_args()
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
job = os.environ["GPUSOC_JOB_ID"]
ckpt = Path(args.ckpt)
sdk.init(rank=rank, world_size=world, info={"checkpoint_dir": str(ckpt), "run_id": "run-1",
                                            "collective_timeout_s": "1800"})

step, weights = 0, [0.0] * 8
marker = Path("RESUME_FROM")
if marker.exists():  # resume only from what the agent verified and staged
    src = Path(marker.read_text().strip())
    step = json.loads((src / "state.json").read_text())["step"]
    raw = (src / "model.bin").read_bytes()
    weights = list(struct.unpack(f"<{len(raw) // 8}d", raw))
    print(f"rank {rank} resumed from {src} at step {step}", flush=True)

if args.backend == "torch":
    import datetime
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
    w = torch.tensor(weights, dtype=torch.float64, requires_grad=True)

    def train_step(s):
        g = torch.Generator().manual_seed(s * 100 + rank)
        x = torch.randn(16, 8, generator=g, dtype=torch.float64)
        y = x.sum(dim=1)
        loss = ((x @ w - y) ** 2).mean()
        w.grad = None
        loss.backward()
        dist.all_reduce(w.grad)
        with torch.no_grad():
            w.sub_(0.05 * w.grad / world)
        return float(loss)

    def snapshot():
        return struct.pack(f"<{w.numel()}d", *w.detach().tolist())

    def barrier():
        dist.barrier()
else:
    # Pure-Python stand-in: rank 0 sums every rank's gradient and sends the total back (an all-reduce).
    import random

    addr = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    if rank == 0:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(addr)
        srv.listen()
        peers = [srv.accept()[0] for _ in range(world - 1)]
    else:
        for _ in range(200):
            try:
                conn = socket.create_connection(addr)
                break
            except OSError:
                time.sleep(0.05)

    def recv_exact(c, n):
        buf = b""
        while len(buf) < n:
            chunk = c.recv(n - len(buf))
            if not chunk:
                raise SystemExit("peer gone")
            buf += chunk
        return buf

    def all_reduce(vals):
        data = struct.pack(f"<{len(vals)}d", *vals)
        if rank == 0:
            total = list(vals)
            for p in peers:
                other = struct.unpack(f"<{len(vals)}d", recv_exact(p, len(data)))
                total = [a + b for a, b in zip(total, other)]
            out = struct.pack(f"<{len(vals)}d", *total)
            for p in peers:
                p.sendall(out)
            return total
        conn.sendall(data)
        return list(struct.unpack(f"<{len(vals)}d", recv_exact(conn, len(data))))

    def train_step(s):
        rng = random.Random(s * 100 + rank)
        x = [rng.gauss(0, 1) for _ in range(8)]
        err = sum(a * b for a, b in zip(x, weights)) - sum(x)
        grad = all_reduce([2 * err * a for a in x])
        for i in range(8):
            weights[i] -= 0.05 * grad[i] / world
        return err * err

    def snapshot():
        return struct.pack(f"<{len(weights)}d", *weights)

    def barrier():
        all_reduce([0.0])

segment = f"{os.getpid()}"
while True:
    step += 1
    loss = train_step(step)
    sdk.log(step=step, loss=loss)
    if step % args.every == 0:
        if rank == 0:
            tmp = ckpt / f".tmp-{step}-{segment}"
            tmp.mkdir(parents=True)
            (tmp / "model.bin").write_bytes(snapshot())
            (tmp / "state.json").write_text(json.dumps({"step": step}))
            final = ckpt / f"step-{step:06d}-{segment}"
            os.rename(tmp, final)
            sign_checkpoint(final, args.key, job, "run-1", step, world)
        barrier()
    time.sleep(args.step_s)
'''


# --------------------------------------------------------------------------- harness


class Tap:
    """The runtime's TrainingSource: the real receiver, with every record kept for the test."""

    def __init__(self, rx: TrainingReceiver) -> None:
        self.rx = rx
        self.records: list[TrainRecord] = []

    @property
    def dropped(self) -> int:
        return self.rx.dropped

    def drain(self) -> list[TrainRecord]:
        out = self.rx.drain()
        self.records.extend(out)
        return out

    def last_steps(self, pids: set[int] | None = None) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in self.records:
            if r.kind == "log" and (pids is None or r.pid in pids):
                out[r.rank] = max(out.get(r.rank, -1), r.step)
        return out

    def first_steps(self, pids: set[int]) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in self.records:
            if r.kind == "log" and r.pid in pids and r.rank not in out:
                out[r.rank] = r.step
        return out


@dataclass
class Rig:
    runtime: AgentRuntime
    tap: Tap
    ctl: Controller
    channel: grpc.aio.Channel
    ops: dict[str, tuple[bytes, Ed25519PrivateKey]]
    ckpt: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    cgroup: Path | None = None

    async def command(self, req: CommandRequest) -> Receipt:
        raw = await self.channel.unary_unary(
            serde.COMMAND_METHOD, request_serializer=serde.encode_command_request,
            response_deserializer=serde.decode_signed_receipt)(req, timeout=60)
        return signing.verify_receipt(raw, self.ctl.public_key)

    def envelope(self, action: str, signers: list[str], **kw: object):  # type: ignore[no-untyped-def]
        payload = signing.make_payload(action, "e2e-job", [HOST], f"e2e {action}", **kw)  # type: ignore[arg-type]
        return signing.build_envelope(payload, [self.ops[s] for s in signers])

    async def wait_for(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        import asyncio

        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-2000:] for p in self.ckpt.parent.glob("worker-*.log"))
                pytest.fail(f"timed out waiting for {what}; steps {self.tap.last_steps()}\n{logs}")
            await asyncio.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make_cgroup() -> Path | None:
    mount = cgroup2_mount()
    if mount is None or os.geteuid() != 0:
        return None
    d = mount[0] / f"gpusoc-e2e-{uuid.uuid4().hex[:8]}"
    try:
        d.mkdir()
    except OSError:
        return None
    return d if (d / "cgroup.freeze").exists() else None


@contextlib.asynccontextmanager
async def _rig(tmp_path: Path, backend: str) -> AsyncIterator[Rig]:
    import asyncio

    pki = tmp_path / "pki"
    create_dev_pki(pki, agents=[HOST], consoles=["console"])
    ops = {}
    for name in ("alice", "bob"):
        p = create_operator(pki, name, "responder")
        ops[name] = (p.cert.read_bytes(), load_operator_key(p.key))
    signer = create_operator(pki, "ckpt-signer", "viewer")  # the pipeline's signing identity
    sock = str(tmp_path / "agent.sock")
    rx = TrainingReceiver(sock)
    rx.start()
    tap = Tap(rx)
    rt = AgentRuntime(HOST, SimulatedCollector(2, host=HOST), FrameBuffer(max_frames=2000), 0.1, training=tap)
    ckpt = tmp_path / "ckpts"
    ckpt.mkdir()
    settings = ControlSettings(host=HOST, state_dir=tmp_path / "state", operator_ca=pki / "operator-ca.pem",
                               trusted_checkpoint_keys=(signer.cert,), stop_grace_s=5.0)
    ctl = Controller(settings, rx.jobs, rt.add_event)
    creds = server_credentials(pki / "agents" / f"{HOST}.pem", pki / "agents" / f"{HOST}.key", pki / "console-ca.pem")
    server, port = await run_server(rt, credentials=creds, control=ctl)
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        channel_credentials(pki / "agent-ca.pem", pki / "consoles" / "console.pem", pki / "consoles" / "console.key"),
        options=[("grpc.ssl_target_name_override", HOST)])
    ticker = asyncio.create_task(rt.run())
    rig = Rig(rt, tap, ctl, channel, ops, ckpt, cgroup=_make_cgroup())
    work = tmp_path / "work"
    work.mkdir()
    (work / "worker.py").write_text(WORKER)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
           "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(WORLD), "GPUSOC_JOB_ID": "e2e-job", "GPUSOC_AGENT_SOCKET": sock,
           "OMP_NUM_THREADS": "1"}
    for rank in range(WORLD):
        out = open(tmp_path / f"worker-{rank}.log", "wb")  # noqa: SIM115 - closed with the process
        rig.workers.append(subprocess.Popen(
            [sys.executable, str(work / "worker.py"), "--ckpt", str(ckpt), "--key", str(signer.key),
             "--backend", backend, "--every", str(EVERY)],
            cwd=work, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=out, stderr=subprocess.STDOUT))
        out.close()
    if rig.cgroup is not None:
        for w in rig.workers:
            (rig.cgroup / "cgroup.procs").write_text(f"{w.pid}\n")
    try:
        yield rig
    finally:
        rt.stop()
        await ticker
        await channel.close()
        await ctl.close()
        await server.stop(0)
        rx.close()
        pids = {w.pid for w in rig.workers} | {c.pid for c in ctl._children}
        if rig.cgroup is not None:
            with contextlib.suppress(OSError):
                (rig.cgroup / "cgroup.freeze").write_text("0")
            pids |= cgroup_members(rig.cgroup)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
        for w in rig.workers:
            w.wait()
        for c in ctl._children:
            c.wait()
        if rig.cgroup is not None:
            for _ in range(100):
                try:
                    rig.cgroup.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)


BACKENDS = [
    pytest.param("python", id="python-standin"),
    pytest.param("torch", id="torch-gloo", marks=[
        pytest.mark.slow, pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")]),
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_freeze_resume_tamper_rollback(tmp_path: Path, backend: str) -> None:
    async with _rig(tmp_path, backend) as rig:
        await _scenario(rig)


async def _scenario(rig: Rig) -> None:
    import asyncio

    tap = rig.tap
    first_pids = {w.pid for w in rig.workers}

    def all_past(n: int, pids: set[int] | None = None) -> Callable[[], bool]:
        return lambda: (lambda s: len(s) == WORLD and min(s.values()) >= n)(tap.last_steps(pids))

    await rig.wait_for(all_past(2 * EVERY + 5), 90, "training to pass step 25")
    reg = rig.ctl.jobs()["e2e-job"]
    assert {r.pid for r in reg.values()} == first_pids  # kernel-attested pids of the ranks

    # ---- freeze: two-phase, commit at a shared deadline
    commit_at = time.time_ns() + 300_000_000
    env = rig.envelope("freeze", ["alice"])
    prep = await rig.command(CommandRequest(PHASE_PREPARE, env, commit_at_unix_ns=commit_at))
    assert prep.status == "prepared", prep
    frozen = await rig.command(CommandRequest(PHASE_RESULT, command_id=prep.command_id, wait_s=10))
    assert frozen.status == "executed", frozen
    assert frozen.method == ("cgroup_freezer" if rig.cgroup is not None else "sigstop")
    assert 0 <= frozen.executed_at_ns - commit_at < 50_000_000
    await asyncio.sleep(0.5)  # records already in flight drain
    stopped_at = tap.last_steps()
    await asyncio.sleep(1.5)
    assert tap.last_steps() == stopped_at, "steps advanced while frozen"
    state = serde.decode_control_state(await rig.channel.unary_unary(serde.CONTROL_STATE_METHOD)(
        serde.encode_control_state_request(), timeout=10))
    assert state.frozen[0].job == "e2e-job" and state.frozen[0].collective_timeout_s == 1800

    # ---- resume: two operators
    resumed = await rig.command(CommandRequest(PHASE_EXECUTE, rig.envelope("resume", ["alice", "bob"])))
    assert resumed.status == "executed", resumed
    assert resumed.frozen_since_ns == frozen.frozen_since_ns
    await rig.wait_for(all_past(max(stopped_at.values()) + 3), 30, "steps to advance after resume")
    await rig.wait_for(all_past(4 * EVERY + 2), 90, "training to pass step 42")

    # ---- checkpoints as the agent sees them
    listing = serde.decode_checkpoint_list(await rig.channel.unary_unary(serde.LIST_CHECKPOINTS_METHOD)(
        serde.encode_list_checkpoints_request("e2e-job", True), timeout=30))
    by_step = {c.step: c for c in listing.checkpoints if c.status == "verified"}
    assert {10, 20, 30, 40} <= set(by_step), [(c.step, c.status, c.reason) for c in listing.checkpoints]

    # ---- tampered checkpoint: refused, nothing stopped
    bad = Path(by_step[30].path) / "state.json"
    bad.write_text('{"step": 30, "poisoned": true}')
    refused = await rig.command(CommandRequest(PHASE_EXECUTE, rig.envelope(
        "rollback", ["alice", "bob"], checkpoint_digest=by_step[30].manifest_digest)))
    assert refused.status == "refused" and refused.check == "checkpoint", refused
    assert "hash_mismatch" in refused.reason
    assert all(w.poll() is None for w in rig.workers)

    # ---- rollback to a good one: the job restarts from step 20
    before = tap.last_steps()
    rolled = await rig.command(CommandRequest(PHASE_EXECUTE, rig.envelope(
        "rollback", ["alice", "bob"], checkpoint_digest=by_step[20].manifest_digest)))
    assert rolled.status == "executed", rolled
    assert rolled.checkpoint_step == 20 and len(rolled.restarted_pids) == WORLD
    assert all(w.wait(10) is not None for w in rig.workers)
    new_pids = set(rolled.restarted_pids)
    assert not new_pids & first_pids
    await rig.wait_for(all_past(25, new_pids), 90, "restarted training to pass step 25")
    assert tap.first_steps(new_pids) == {0: 21, 1: 21}  # continued from the checkpoint, not from scratch
    assert min(before.values()) > 25
    if rig.cgroup is not None:
        assert new_pids <= cgroup_members(rig.cgroup)
    kinds = [(e.attrs.get("action"), e.kind) for e in _events(rig)]
    for expected in [("freeze", "command_prepared"), ("freeze", "command_executed"),
                     ("resume", "command_executed"), ("rollback", "command_refused"),
                     ("rollback", "command_executed")]:
        assert expected in kinds, kinds


def _events(rig: Rig) -> list:  # type: ignore[type-arg]
    """Events that went out in frames (what a console stores), decoded from the agent's buffer."""
    out = []
    buf = rig.runtime.buffer
    for seq in range(buf.oldest_seq, buf.newest_seq + 1):
        frame_bytes = buf._frames[seq - buf.oldest_seq]
        out.extend(serde.decode_frame(frame_bytes).events)
    return out
