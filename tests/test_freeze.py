"""Freeze/resume of real processes: cgroup v2 freezer, SIGSTOP fallback, two-phase timing, safety refusals."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.act.commands import Peer
from agent.act.controller import Controller, ControlSettings
from agent.act.freeze import cgroup2_mount, cgroup_frozen, cgroup_members
from agent.pki import create_operator, load_operator_key
from agent.training import RankRegistration
from protos import signing
from protos.types import PHASE_ABORT, PHASE_EXECUTE, PHASE_PREPARE, PHASE_RESULT, CommandRequest, Event, Receipt

HOST = "gpu-01"
PEER = Peer(authenticated=True, name="console")
COUNTER = """
import os, sys, time
path = sys.argv[1]
if len(sys.argv) > 2:  # also run a child that counts into path + ".child"
    import subprocess
    subprocess.Popen([sys.executable, sys.argv[2], path + ".child"])
i = 0
while True:
    i += 1
    with open(path + ".tmp", "w") as f:
        f.write(str(i))
    os.replace(path + ".tmp", path)
    time.sleep(0.01)
"""


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[bytes, Ed25519PrivateKey]]]:
    root = tmp_path_factory.mktemp("pki")
    out = {}
    for name, role in [("alice", "responder"), ("bob", "responder")]:
        p = create_operator(root, name, role)
        out[name] = (p.cert.read_bytes(), load_operator_key(p.key))
    return root / "operator-ca.pem", out


@dataclass
class Job:
    procs: list[subprocess.Popen[bytes]]
    counters: list[Path]
    regs: dict[int, RankRegistration]

    def progress(self) -> list[int]:
        out = []
        for c in self.counters:
            try:
                out.append(int(c.read_text() or 0))
            except (OSError, ValueError):
                out.append(-1)
        return out


def _start(tmp: Path, n: int = 1, with_child: bool = False) -> Job:
    script = tmp / "counter.py"
    script.write_text(COUNTER)
    procs, counters = [], []
    for i in range(n):
        c = tmp / f"count-{i}-{uuid.uuid4().hex[:6]}"
        args = [sys.executable, str(script), str(c)] + ([str(script)] if with_child else [])
        procs.append(subprocess.Popen(args))
        counters.append(c)
        if with_child:
            counters.append(Path(str(c) + ".child"))
    deadline = time.monotonic() + 10
    while not all(c.exists() for c in counters) and time.monotonic() < deadline:
        time.sleep(0.02)
    regs = {i: RankRegistration(p.pid, os.getuid(), n, i, {}, time.time_ns()) for i, p in enumerate(procs)}
    return Job(procs, counters, regs)


@pytest.fixture
def job(tmp_path: Path) -> Iterator[Job]:
    j = _start(tmp_path, n=2)
    yield j
    _kill(j)


def _kill(j: Job) -> None:
    import psutil

    for p in j.procs:
        with contextlib.suppress(psutil.Error):
            for c in psutil.Process(p.pid).children(recursive=True):
                c.kill()
        p.kill()
        p.wait()


def _state(pid: int) -> str:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return data[data.rfind(b")") + 2 :][:1].decode()


def _advancing(job: Job, wait: float = 0.3) -> list[bool]:
    before = job.progress()
    time.sleep(wait)
    return [a > b for a, b in zip(job.progress(), before, strict=True)]


@pytest.fixture
def cgroup() -> Iterator[Path]:
    mount = cgroup2_mount()
    if mount is None or os.geteuid() != 0:
        pytest.skip("needs root and a cgroup v2 mount")
    d = mount[0] / f"gpusoc-test-{uuid.uuid4().hex[:8]}"
    try:
        d.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup: {exc}")
    if not (d / "cgroup.freeze").exists():
        d.rmdir()
        pytest.skip("cgroup v2 freezer not available")
    yield d
    with contextlib.suppress(OSError):
        (d / "cgroup.freeze").write_text("0")
    for pid in cgroup_members(d):
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    for _ in range(100):
        try:
            d.rmdir()
            break
        except OSError:
            time.sleep(0.02)


def _move(cg: Path, pids: list[int]) -> None:
    for pid in pids:
        (cg / "cgroup.procs").write_text(f"{pid}\n")


class Agent:
    def __init__(self, state: Path, ops: tuple[Path, dict], regs: dict[str, dict[int, RankRegistration]]) -> None:
        self.ops = ops[1]
        self.regs = regs
        self.events: list[Event] = []
        settings = ControlSettings(host=HOST, state_dir=state, operator_ca=ops[0], confirm_timeout_s=5.0)
        self.ctl = Controller(settings, lambda: self.regs, self.events.append)

    def env(self, action: str, signers: list[str], job: str = "j1"):  # type: ignore[no-untyped-def]
        payload = signing.make_payload(action, job, [HOST], f"test {action}")
        return signing.build_envelope(payload, [self.ops[s] for s in signers])

    async def run(self, req: CommandRequest) -> Receipt:
        return signing.verify_receipt(await self.ctl.handle(req, PEER), self.ctl.public_key)

    async def execute(self, action: str, signers: list[str], job: str = "j1") -> Receipt:
        return await self.run(CommandRequest(PHASE_EXECUTE, self.env(action, signers, job)))


# --------------------------------------------------------------------------- mount discovery


def test_cgroup2_mount_from_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /sys/fs/cgroup rw shared:7 - tmpfs tmpfs rw\n"
        "30 22 0:26 /ns /sys/fs/cgroup/my\\040unified rw shared:9 - cgroup2 cgroup2 rw\n"
    )
    assert cgroup2_mount(str(info), "/nonexistent") == (Path("/sys/fs/cgroup/my unified"), "/ns")
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n")
    assert cgroup2_mount("/nonexistent", str(mounts)) == (Path("/sys/fs/cgroup/unified"), "/")
    assert cgroup2_mount("/nonexistent", "/nonexistent") is None


# --------------------------------------------------------------------------- cgroup freezer


async def test_freeze_and_resume_with_cgroup_freezer(tmp_path: Path, ops, cgroup: Path, job: Job) -> None:  # type: ignore[no-untyped-def]
    _move(cgroup, [p.pid for p in job.procs])
    agent = Agent(tmp_path / "state", ops, {"j1": job.regs})
    assert all(_advancing(job))
    r = await agent.execute("freeze", ["alice"])
    assert r.status == "executed", r
    assert r.method == "cgroup_freezer" and r.cgroup == "/" + cgroup.name
    assert r.confirmed_at_ns >= r.executed_at_ns > 0
    assert sorted(r.pids) == sorted(p.pid for p in job.procs)
    assert cgroup_frozen(cgroup)
    assert not any(_advancing(job))
    state = agent.ctl.control_state()
    assert state.frozen[0].method == "cgroup_freezer" and state.frozen[0].frozen_since_unix_ns == r.frozen_since_ns
    assert state.frozen[0].collective_timeout_s == 600  # NCCL default when the job registered none
    r2 = await agent.execute("resume", ["alice", "bob"])
    assert r2.status == "executed", r2
    assert r2.frozen_since_ns == r.frozen_since_ns and r2.executed_at_ns > r.executed_at_ns
    assert not cgroup_frozen(cgroup)
    assert all(_advancing(job))
    kinds = [e.kind for e in agent.events]
    assert kinds.count("command_executed") == 2


async def test_cgroup_with_other_processes_falls_back_to_sigstop(
    tmp_path: Path, ops, cgroup: Path, job: Job  # type: ignore[no-untyped-def]
) -> None:
    bystander = _start(tmp_path, n=1)
    try:
        _move(cgroup, [p.pid for p in job.procs] + [bystander.procs[0].pid])
        agent = Agent(tmp_path / "state", ops, {"j1": job.regs})
        r = await agent.execute("freeze", ["alice"])
        assert r.status == "executed" and r.method == "sigstop", r
        assert "also holds pid" in r.reason
        assert not cgroup_frozen(cgroup)
        assert all(_state(p.pid) == "T" for p in job.procs)
        assert all(_advancing(bystander))
        assert (await agent.execute("resume", ["alice", "bob"])).status == "executed"
        assert all(_advancing(job))
    finally:
        _kill(bystander)


# --------------------------------------------------------------------------- SIGSTOP


async def test_sigstop_stops_the_whole_tree(tmp_path: Path, ops) -> None:  # type: ignore[no-untyped-def]
    j = _start(tmp_path, n=1, with_child=True)
    try:
        agent = Agent(tmp_path / "state", ops, {"j1": j.regs})
        assert all(_advancing(j))
        r = await agent.execute("freeze", ["alice"])
        assert r.status == "executed" and r.method == "sigstop", r
        assert "root cgroup" in r.reason or "cgroup" in r.reason
        assert len(r.pids) == 2  # the rank and the child it started
        assert not any(_advancing(j))
        r2 = await agent.execute("resume", ["alice", "bob"])
        assert r2.status == "executed", r2
        assert all(_advancing(j))
    finally:
        _kill(j)


@pytest.mark.parametrize("who", ["agent", "ancestor"])
async def test_never_freezes_the_agent_or_its_ancestors(tmp_path: Path, ops, who: str) -> None:  # type: ignore[no-untyped-def]
    pid = os.getpid() if who == "agent" else os.getppid()
    regs = {0: RankRegistration(pid, os.getuid(), 1, 0, {}, time.time_ns())}
    agent = Agent(tmp_path / "state", ops, {"j1": regs})
    r = await agent.execute("freeze", ["alice"])
    assert r.status == "refused" and r.check == "job" and "agent" in r.reason, r
    assert _state(os.getpid()) != "T"
    assert agent.events[-1].kind == "command_refused"


async def test_resume_of_a_job_not_frozen_is_refused(tmp_path: Path, ops, job: Job) -> None:  # type: ignore[no-untyped-def]
    agent = Agent(tmp_path / "state", ops, {"j1": job.regs})
    r = await agent.execute("resume", ["alice", "bob"])
    assert r.status == "refused" and "not frozen" in r.reason


async def test_stale_pid_is_not_the_rank(tmp_path: Path, ops, job: Job) -> None:  # type: ignore[no-untyped-def]
    """A registration older than the process behind its pid (pid reuse) matches nothing."""
    regs = {0: RankRegistration(job.procs[0].pid, os.getuid(), 1, 0, {}, time.time_ns() - 3600 * 10**9)}
    agent = Agent(tmp_path / "state", ops, {"j1": regs})
    r = await agent.execute("freeze", ["alice"])
    assert r.status == "refused" and "no live registered process" in r.reason


# --------------------------------------------------------------------------- two-phase timing


async def test_prepare_then_commit_at_deadline(tmp_path: Path, ops, job: Job) -> None:  # type: ignore[no-untyped-def]
    agent = Agent(tmp_path / "state", ops, {"j1": job.regs})
    env = agent.env("freeze", ["alice"])
    commit_at = time.time_ns() + 300_000_000
    prep = await agent.run(CommandRequest(PHASE_PREPARE, env, commit_at_unix_ns=commit_at))
    assert prep.status == "prepared" and prep.commit_at_ns == commit_at, prep
    assert prep.method in ("sigstop", "cgroup_freezer") and set(prep.pids) >= {p.pid for p in job.procs}
    assert all(_state(p.pid) != "T" for p in job.procs)
    assert prep.command_id in agent.ctl.control_state().armed_command_ids
    final = await agent.run(CommandRequest(PHASE_RESULT, command_id=prep.command_id, wait_s=5))
    assert final.status == "executed", final
    late_ms = (final.executed_at_ns - commit_at) / 1e6
    assert 0 <= late_ms < 30, late_ms
    assert [e.kind for e in agent.events] == ["command_prepared", "command_executed"]
    # The final receipt stays available.
    again = await agent.run(CommandRequest(PHASE_RESULT, command_id=prep.command_id))
    assert again.executed_at_ns == final.executed_at_ns
    assert (await agent.execute("resume", ["alice", "bob"])).status == "executed"


async def test_abort_before_commit(tmp_path: Path, ops, job: Job) -> None:  # type: ignore[no-untyped-def]
    agent = Agent(tmp_path / "state", ops, {"j1": job.regs})
    env = agent.env("freeze", ["alice"])
    prep = await agent.run(CommandRequest(PHASE_PREPARE, env, commit_at_unix_ns=time.time_ns() + 400_000_000))
    assert prep.status == "prepared"
    # A second command for the same job while one is armed is refused.
    busy = await agent.execute("freeze", ["bob"])
    assert busy.status == "refused" and busy.check == "busy"
    ab = await agent.run(CommandRequest(PHASE_ABORT, env))
    assert ab.status == "aborted", ab
    time.sleep(0.6)
    assert all(_advancing(job))
    res = await agent.run(CommandRequest(PHASE_RESULT, command_id=prep.command_id))
    assert res.status == "aborted"
    # Aborting something never armed is refused.
    other = await agent.run(CommandRequest(PHASE_ABORT, agent.env("freeze", ["alice"])))
    assert other.status == "refused" and other.check == "abort"


@pytest.mark.parametrize(("offset_s", "why"), [(200, "expires"), (-5, "past")])
async def test_commit_at_must_fall_inside_the_window(tmp_path: Path, ops, job: Job, offset_s: float,  # type: ignore[no-untyped-def]
                                                     why: str) -> None:
    agent = Agent(tmp_path / "state", ops, {"j1": job.regs})
    req = CommandRequest(PHASE_PREPARE, agent.env("freeze", ["alice"]), commit_at_unix_ns=time.time_ns() +
                         int(offset_s * 1e9))
    r = await agent.run(req)
    assert r.status == "refused" and r.check == "commit" and why in r.reason


async def test_frozen_state_survives_an_agent_restart(tmp_path: Path, ops, job: Job) -> None:  # type: ignore[no-untyped-def]
    first = Agent(tmp_path / "state", ops, {"j1": job.regs})
    r = await first.execute("freeze", ["alice"])
    assert r.status == "executed"
    await first.ctl.close()
    second = Agent(tmp_path / "state", ops, {})  # the new agent has not heard from the job yet
    assert [f.job for f in second.ctl.control_state().frozen] == ["j1"]
    assert second.ctl.key_id == first.ctl.key_id  # same receipt key across restarts
    r2 = await second.execute("resume", ["alice", "bob"])
    assert r2.status == "executed", r2
    assert all(_advancing(job))
