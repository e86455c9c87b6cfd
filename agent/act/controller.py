"""The agent's control plane: signed commands in, signed receipts and audit events out.

`Controller.handle` takes one Command RPC (already decoded by protos.serde) and the TLS
peer. EXECUTE verifies and runs now; PREPARE verifies, resolves what it would do and arms a
timer for the shared `commit_at` so every host of a job acts within a few milliseconds;
RESULT returns the final receipt of an armed command; ABORT disarms one. Every refusal and
every outcome becomes an Event through the runtime (kinds command_refused,
command_prepared, command_executed, command_failed, command_aborted), so it lands in the
console's events table and audit trail. docs/response.md is the operator-facing spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.act.checkpoints import (
    CheckpointError,
    Manifest,
    discover_checkpoints,
    inspect_checkpoint,
    load_trusted_keys,
    manifest_digest,
    stage_checkpoint,
    verify_checkpoint,
)
from agent.act.commands import Authorized, CommandVerifier, Peer, Policy, Refusal, peek_payload
from agent.act.freeze import (
    METHOD_CGROUP,
    FreezeError,
    FrozenRecord,
    FrozenStore,
    JobTarget,
    Registration,
    cgroup2_mount,
    cgroup_frozen,
    cgroup_members,
    live_recorded_pids,
    protected_pids,
    resolve_job,
    set_cgroup_freeze,
    sigcont,
    sigstop,
    stopped,
    sweep_new_children,
)
from agent.act.replay import ReplayStore
from agent.act.restore import (
    LaunchSpec,
    RestoreError,
    capture_launch,
    restart,
    specs_from_json,
    specs_to_json,
    stop_processes,
    thaw_empty_cgroup,
    write_resume_marker,
)
from agent.pki import PkiError, load_operator_cas
from protos import signing
from protos.types import (
    ACTION_FREEZE,
    ACTION_RESUME,
    ACTION_ROLLBACK,
    PHASE_NAMES,
    SEVERITY_CRITICAL,
    SEVERITY_INFO,
    SEVERITY_WARNING,
    STATUS_ABORTED,
    STATUS_EXECUTED,
    STATUS_FAILED,
    STATUS_PENDING,
    STATUS_PREPARED,
    STATUS_REFUSED,
    CheckpointInfo,
    CheckpointList,
    CommandEnvelope,
    CommandRequest,
    ControlState,
    Event,
    FrozenJob,
    Receipt,
    SignedReceipt,
)

__all__ = [
    "NCCL_DEFAULT_TIMEOUT_S",
    "ControlSettings",
    "Controller",
    "UnknownCommand",
    "controller_from_config",
    "load_or_create_agent_key",
]

log = logging.getLogger("gpusoc.agent.act")

#: ProcessGroupNCCL's default collective timeout: a freeze longer than this kills the job on resume.
NCCL_DEFAULT_TIMEOUT_S: Final = 600
MAX_WAIT_S: Final = 60.0
_RECEIPTS_KEPT: Final = 1024
_LEAD_S: Final = 0.005  # the commit timer fires this early and spins to the instant
_POLL_S: Final = 0.001
_SAFE_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+=-]{0,254}$")

JobsSource = Callable[[], Mapping[str, Mapping[int, Registration]]]
EventSink = Callable[[Event], None]


class UnknownCommand(KeyError):
    """RESULT for a command id this agent has no receipt for."""


@dataclass(slots=True)
class ControlSettings:
    """Everything the control plane needs; `controller_from_config` maps AgentConfig onto it."""

    host: str
    state_dir: Path
    operator_ca: Path
    checkpoint_root: Path | None = None
    trusted_checkpoint_keys: tuple[Path, ...] = ()
    policy: Policy = field(default_factory=Policy)
    require_mtls: bool = True
    confirm_timeout_s: float = 5.0
    stop_grace_s: float = 10.0
    collective_timeout_s: int = NCCL_DEFAULT_TIMEOUT_S
    rollback_max_steps_back: int = 0
    max_commit_delay_s: float = 60.0


@dataclass(slots=True)
class _Plan:
    """What a verified command will do, decided at PREPARE/EXECUTE before anything happens."""

    target: JobTarget | None = None
    record: FrozenRecord | None = None
    manifest: Manifest | None = None
    staged: Path | None = None
    specs: list[LaunchSpec] = field(default_factory=list)
    collective_timeout_s: int = NCCL_DEFAULT_TIMEOUT_S
    pids: list[int] = field(default_factory=list)  # resume by SIGCONT: decided before commit_at


@dataclass(slots=True)
class _Armed:
    auth: Authorized
    phase: str
    received_ns: int
    commit_at_ns: int
    plan: _Plan
    done: asyncio.Future[SignedReceipt]
    task: asyncio.Task[None] | None = None
    started: bool = False
    batch: int = 0  # commit_at of the timer batch it waits in


def load_or_create_agent_key(path: Path) -> Ed25519PrivateKey:
    """The agent's receipt-signing key: created once (0600) in the state dir, then reused."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # another process may have won the race: use its key
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        data = path.read_bytes()
    loaded = serialization.load_pem_private_key(data, password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise PkiError(f"{path}: the agent command key must be Ed25519")
    return loaded


def _slug(job: str) -> str:
    """A file-name-safe, collision-free name for a job id."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", job)[:48]
    return f"{clean}-{hashlib.sha256(job.encode()).hexdigest()[:12]}"


class StepFloors:
    """Per-job rollback floor, persisted: raised to the step of every executed rollback."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            raw = json.loads(path.read_text())
            self.floors: dict[str, int] = {str(k): int(v) for k, v in raw.items()}
        except FileNotFoundError:
            self.floors = {}

    def get(self, job: str) -> int:
        return self.floors.get(job, 0)

    def raise_to(self, job: str, step: int) -> None:
        """Rolling back past an earlier rollback target then needs break-glass."""
        if step <= self.floors.get(job, -1):
            return
        self.floors[job] = step
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.floors, sort_keys=True))
        os.replace(tmp, self.path)


class Controller:
    """Verifies, plans, times and executes control commands for one agent host."""

    def __init__(
        self,
        settings: ControlSettings,
        jobs: JobsSource,
        emit: EventSink,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.settings = settings
        self.host = settings.host
        self.jobs = jobs
        self.emit = emit
        self.clock = clock
        state = Path(settings.state_dir)
        state.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.state_dir = state
        self.key = load_or_create_agent_key(state / "command-key.pem")
        self.public_key = signing.public_key_raw(self.key)
        self.key_id = signing.key_id(self.public_key)
        self.replay = ReplayStore(state / "commands-seen.log", clock())
        self.verifier = CommandVerifier(
            settings.host,
            load_operator_cas(settings.operator_ca),
            self.replay,
            policy=settings.policy,
            revoked_path=state / "revoked-operators.txt",
            require_mtls=settings.require_mtls,
            clock=clock,
        )
        self.frozen = FrozenStore(state / "frozen.json")
        self.floors = StepFloors(state / "step-floors.json")
        self.restore_dir = state / "restore"
        self.launch_dir = state / "launch"
        self.mount = cgroup2_mount()
        self._armed: dict[str, _Armed] = {}
        self._busy: set[str] = set()
        self._receipts: OrderedDict[str, SignedReceipt] = OrderedDict()
        # Armed commands grouped by commit_at: one timer starts them all back to back.
        self._batches: dict[int, list[_Armed]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._children: list[subprocess.Popen[bytes]] = []

    # ------------------------------------------------------------ entry points

    async def handle(self, req: CommandRequest, peer: Peer) -> SignedReceipt:
        """One Command RPC: always a signed receipt (refusals included), or UnknownCommand for RESULT."""
        self._reap()
        phase = PHASE_NAMES.get(req.phase, "")
        received = self.clock()
        if phase == "result":
            return await self._result(req, peer, received)
        if phase == "abort":
            return self._abort(req, peer, received)
        if phase not in ("execute", "prepare"):
            return self._refuse(phase, req.envelope, peer, Refusal("envelope", f"unknown phase {req.phase}"), received)
        loop = asyncio.get_running_loop()
        try:
            # Off the event loop: the replay record is fsync'ed, and other hosts' timers must not wait.
            auth = await loop.run_in_executor(None, self.verifier.verify, req.envelope, peer)
        except Refusal as r:
            return self._refuse(phase, req.envelope, peer, r, received)
        except Exception as exc:  # a bug in verification refuses, it never lets a command through
            log.exception("verifying a command failed")
            return self._refuse(phase, req.envelope, peer, Refusal("internal", f"{type(exc).__name__}"), received)
        p = auth.payload
        commit_at = received
        if phase == "prepare":
            commit_at = req.commit_at_unix_ns
            why = ""
            if commit_at <= 0:
                why = "PREPARE needs commit_at_unix_ns"
            elif commit_at > p.expires_at_ns:
                why = "commit_at is after the command expires"
            elif commit_at < received - 1_000_000_000:
                why = "commit_at is more than 1 s in the past"
            elif commit_at > received + int(self.settings.max_commit_delay_s * 1e9):
                why = f"commit_at is more than {self.settings.max_commit_delay_s:.0f} s ahead"
            if why:
                refusal = Refusal("commit", why, auth.signer_labels)
                return self._refuse(phase, req.envelope, peer, refusal, received, auth)
        if p.job in self._busy:
            refusal = Refusal("busy", f"another command for job {p.job!r} is armed or running", auth.signer_labels)
            return self._refuse(phase, req.envelope, peer, refusal, received, auth)
        self._busy.add(p.job)
        try:
            plan = await self._plan(auth)
        except Refusal as r:
            self._busy.discard(p.job)
            return self._refuse(phase, req.envelope, peer, r, received, auth)
        except Exception as exc:  # a bug must refuse, never execute
            self._busy.discard(p.job)
            log.exception("planning %s failed", p.command_id)
            refusal = Refusal("internal", f"{type(exc).__name__}: {exc}", auth.signer_labels)
            return self._refuse(phase, req.envelope, peer, refusal, received, auth)
        armed = _Armed(auth, phase, received, commit_at, plan, loop.create_future())
        self._armed[p.command_id] = armed
        if phase == "execute":
            await self._run(armed)
            return armed.done.result()
        self._arm(armed, loop)
        receipt = self._receipt(
            armed,
            STATUS_PREPARED,
            method=self._method_of(plan),
            pids=self._pids_of(plan),
        )
        self._event(
            "command_prepared",
            SEVERITY_INFO,
            f"{p.action} of {p.job} armed for {commit_at} by {', '.join(auth.signer_labels)}",
            self._attrs(armed, reason=p.reason, commit_at=str(commit_at)),
        )
        return receipt

    def list_checkpoints(self, job: str, deep: bool, peer: Peer) -> CheckpointList:
        """Checkpoints of `job` with verification status (blocking: hashing when deep)."""
        if self.settings.require_mtls and not peer.authenticated:
            raise PermissionError("ListCheckpoints needs an mTLS console peer")
        regs = dict(self.jobs().get(job, {}))
        dirs = self._checkpoint_dirs(job, regs)
        try:
            trusted = self._trusted_keys()
        except CheckpointError:
            trusted = {}
        floor = self._floor(job, trusted, dirs)
        out = []
        for d in dirs:
            status, reason, m = inspect_checkpoint(d, trusted, deep=deep)
            digest = ""
            with contextlib.suppress(CheckpointError, OSError):
                digest = manifest_digest(d) or ""
            if m is not None and m.job != job and status in ("verified", "signed"):
                status, reason = "invalid", f"binding: checkpoint belongs to job {m.job!r}"
            out.append(
                CheckpointInfo(
                    path=str(d),
                    manifest_digest=digest,
                    job=m.job if m else "",
                    run=m.run if m else "",
                    step=m.step if m else -1,
                    world_size=m.world_size if m else 0,
                    status=status,
                    reason=reason,
                    signer_key_id=m.signer_key_id if m else "",
                    below_floor=bool(m and m.step < floor),
                    created_unix_ns=m.created_unix_ns if m else 0,
                )
            )
        out.sort(key=lambda c: (c.step, c.path))
        return CheckpointList(host=self.host, job=job, step_floor=floor, checkpoints=tuple(out))

    def control_state(self) -> ControlState:
        """Receipt key, frozen jobs with their clocks, policy: what a console pins and displays."""
        self._reap()
        frozen = tuple(
            FrozenJob(
                job=r.job,
                method=r.method,
                frozen_since_unix_ns=r.frozen_since_ns,
                collective_timeout_s=float(r.collective_timeout_s),
                pids=tuple(r.pids),
                cgroup=r.cgroup,
                command_id=r.command_id,
            )
            for r in self.frozen.records.values()
        )
        return ControlState(
            host=self.host,
            agent_public_key=self.public_key,
            agent_key_id=self.key_id,
            commands_enabled=True,
            frozen=frozen,
            min_signers=dict(self.settings.policy.min_signers),
            now_unix_ns=self.clock(),
            armed_command_ids=tuple(c for c, a in self._armed.items() if not a.started),
        )

    async def close(self) -> None:
        """Disarm everything (armed commands are not executed after shutdown)."""
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self._batches.clear()
        self._armed.clear()

    # ------------------------------------------------------------ phases

    async def _result(self, req: CommandRequest, peer: Peer, received: int) -> SignedReceipt:
        if self.settings.require_mtls and not peer.authenticated:
            return self._refuse("result", None, peer, Refusal("peer", "RESULT needs an mTLS console peer"), received)
        cid = req.command_id
        armed = self._armed.get(cid)
        if armed is not None:
            wait = min(MAX_WAIT_S, req.wait_s or 10.0)
            try:
                return await asyncio.wait_for(asyncio.shield(armed.done), wait)
            except TimeoutError:
                return self._receipt(armed, STATUS_PENDING, phase="result", store=False)
        if cid in self._receipts:
            return self._receipts[cid]
        raise UnknownCommand(cid)

    def _abort(self, req: CommandRequest, peer: Peer, received: int) -> SignedReceipt:
        if self.settings.require_mtls and not peer.authenticated:
            r = Refusal("peer", "ABORT needs an mTLS console peer")
            return self._refuse("abort", req.envelope, peer, r, received)
        env = req.envelope
        digest = signing.payload_sha256(env.payload) if env is not None else ""
        armed = next((a for a in self._armed.values() if signing.payload_sha256(a.auth.payload_bytes) == digest), None)
        if armed is None:
            r = Refusal("abort", "no armed command with exactly this payload")
            return self._refuse("abort", env, peer, r, received)
        if armed.started:
            r = Refusal("abort", "too late: the command is already executing or done", armed.auth.signer_labels)
            return self._refuse("abort", env, peer, r, received, armed.auth)
        batch = self._batches.get(armed.batch, [])
        if armed in batch:
            batch.remove(armed)
        if not batch and armed.batch in self._timers:
            self._timers.pop(armed.batch).cancel()
            self._batches.pop(armed.batch, None)
        p = armed.auth.payload
        self._armed.pop(p.command_id, None)
        self._busy.discard(p.job)
        receipt = self._receipt(armed, STATUS_ABORTED, phase="abort", reason="aborted by console before commit_at")
        if not armed.done.done():
            armed.done.set_result(receipt)
        self._event("command_aborted", SEVERITY_INFO, f"{p.action} of {p.job} disarmed", self._attrs(armed))
        return receipt

    def _arm(self, armed: _Armed, loop: asyncio.AbstractEventLoop) -> None:
        """Join (or open) the timer batch for this commit_at; the timer fires _LEAD_S early."""
        at = armed.commit_at_ns
        armed.batch = at
        if at not in self._batches:
            self._batches[at] = []
            at_monotonic = loop.time() + (at - self.clock()) / 1e9
            self._timers[at] = loop.call_at(at_monotonic - _LEAD_S, self._fire, at, at_monotonic)
        self._batches[at].append(armed)

    def _fire(self, at: int, at_monotonic: float) -> None:
        """Spin to the instant, then start every command of the batch before doing anything else.

        Only the critical syscall (cgroup.freeze write, or the signals) runs here; confirming,
        persisting and signing follow in tasks, so no job waits for another's bookkeeping.
        """
        self._timers.pop(at, None)
        batch = self._batches.pop(at, [])
        loop = asyncio.get_running_loop()
        while loop.time() < at_monotonic:
            pass
        for armed in batch:
            armed.started = True
            started = self._start(armed)
            armed.task = loop.create_task(self._run(armed, started))

    def _start(self, armed: _Armed) -> dict[str, Any]:
        """The time-critical part of an action: one write or one round of signals, nothing else."""
        p = armed.auth.payload
        try:
            if p.action == ACTION_FREEZE and armed.plan.target is not None:
                t = armed.plan.target
                if t.method == METHOD_CGROUP and t.cgroup_dir is not None:
                    return {"executed": set_cgroup_freeze(t.cgroup_dir, True)}
                executed, done = sigstop(t.tree)
                return {"executed": executed, "done": done}
            if p.action == ACTION_RESUME and armed.plan.record is not None:
                rec = armed.plan.record
                if rec.method == METHOD_CGROUP:
                    return {"executed": set_cgroup_freeze(Path(rec.cgroup_dir), False)}
                sigcont(armed.plan.pids)
                return {"executed": time.time_ns()}
        except OSError as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {}

    async def _run(self, armed: _Armed, started: dict[str, Any] | None = None) -> None:
        armed.started = True
        p = armed.auth.payload
        try:
            if started is None:
                started = self._start(armed)
            await asyncio.sleep(0)  # let other commands due at the same instant start first
            if "error" in started:
                fields: dict[str, Any] = {"status": STATUS_FAILED, "reason": started["error"]}
            elif p.action == ACTION_FREEZE:
                fields = await self._freeze(armed, started)
            elif p.action == ACTION_RESUME:
                fields = await self._resume(armed, started)
            else:
                fields = await self._rollback(armed)
        except Exception as exc:
            log.exception("executing %s failed", p.command_id)
            fields = {"status": STATUS_FAILED, "reason": f"{type(exc).__name__}: {exc}"}
        finally:
            self._busy.discard(p.job)
            self._armed.pop(p.command_id, None)
        status = str(fields.pop("status"))
        receipt = self._receipt(armed, status, **fields)
        ok = status == STATUS_EXECUTED
        kind = "command_executed" if ok else "command_failed"
        sev = SEVERITY_CRITICAL if not ok else (SEVERITY_INFO if p.action == ACTION_RESUME else SEVERITY_WARNING)
        body = signing.parse_receipt(receipt.receipt)
        detail = f"{p.action} of {p.job}: {status}" + (f" ({body.reason})" if body.reason else "")
        attrs = self._attrs(
            armed,
            reason=p.reason if ok else body.reason,
            method=body.method,
            executed_at_ns=str(body.executed_at_ns),
            pids=",".join(map(str, body.pids[:64])),
        )
        if p.action == ACTION_ROLLBACK:
            attrs.update(checkpoint_digest=p.checkpoint_digest, checkpoint_step=str(body.checkpoint_step))
        self._event(kind, sev, detail, attrs)
        if not armed.done.done():
            armed.done.set_result(receipt)

    # ------------------------------------------------------------ planning (before anything changes)

    async def _plan(self, auth: Authorized) -> _Plan:
        p = auth.payload
        labels = auth.signer_labels
        if p.action == ACTION_FREEZE:
            if p.job in self.frozen.records:
                raise Refusal("job", f"job {p.job!r} is already frozen on this host", labels)
            ranks = self.jobs().get(p.job)
            if not ranks:
                raise Refusal("job", f"job {p.job!r} is not registered on this host", labels)
            try:
                target = resolve_job(p.job, ranks, protected_pids(), self.mount)
            except FreezeError as exc:
                raise Refusal("job", str(exc), labels) from None
            return _Plan(target=target, collective_timeout_s=self._collective_timeout(ranks))
        if p.action == ACTION_RESUME:
            rec = self.frozen.records.get(p.job)
            if rec is None:
                raise Refusal("job", f"job {p.job!r} is not frozen by this agent", labels)
            pids: list[int] = []
            if rec.method != METHOD_CGROUP:
                pids = live_recorded_pids(rec)
                ranks = self.jobs().get(rec.job)
                if ranks:
                    with contextlib.suppress(FreezeError):
                        pids = sorted(set(pids) | set(resolve_job(rec.job, ranks, protected_pids(), None).tree))
            return _Plan(record=rec, collective_timeout_s=rec.collective_timeout_s, pids=pids)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._plan_rollback, auth)

    def _plan_rollback(self, auth: Authorized) -> _Plan:
        p = auth.payload
        labels = auth.signer_labels
        ranks = dict(self.jobs().get(p.job, {}))
        dirs = self._checkpoint_dirs(p.job, ranks)
        match = []
        for d in dirs:
            with contextlib.suppress(CheckpointError, OSError):
                if manifest_digest(d) == p.checkpoint_digest:
                    match.append(d)
        if not match:
            raise Refusal("checkpoint", f"no checkpoint of job {p.job!r} has manifest {p.checkpoint_digest}", labels)
        try:
            trusted = self._trusted_keys()
        except CheckpointError as exc:
            raise Refusal("checkpoint", str(exc), labels) from None
        if not trusted:
            raise Refusal("checkpoint", "no pinned checkpoint signer keys are configured on this agent", labels)
        worlds = {r.world_size for r in ranks.values()}
        runs = {r.info.get("run_id", "") for r in ranks.values()} - {""}
        dest = self.restore_dir / _slug(p.job) / f"{p.checkpoint_digest[7:23]}-{p.command_id[:8]}"
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        os.chmod(self.restore_dir, 0o755)
        try:
            m = stage_checkpoint(
                match[0],
                trusted,
                dest,
                expect_job=p.job,
                expect_run=runs.pop() if len(runs) == 1 else None,
                expect_world_size=worlds.pop() if len(worlds) == 1 else None,
                expect_digest=p.checkpoint_digest,
            )
        except CheckpointError as exc:
            raise Refusal("checkpoint", f"{exc.code}: {exc}", labels) from None
        try:
            floor = self._floor(p.job, trusted, dirs)
            if m.step < floor and not p.break_glass:
                raise Refusal(
                    "floor",
                    f"checkpoint step {m.step} is below the job's floor {floor}; needs break-glass by two admins",
                    labels,
                )
            target = None
            if ranks:
                with contextlib.suppress(FreezeError):
                    target = resolve_job(p.job, ranks, protected_pids(), self.mount)
            try:
                specs = capture_launch(ranks) if target is not None else self._cached_launch(p.job)
            except RestoreError as exc:
                raise Refusal("restore", str(exc), labels) from None
            if not specs:
                raise Refusal("restore", f"no launch command known for job {p.job!r} on this host", labels)
            if target is not None:
                self._remember_launch(p.job, ranks, specs)
        except Refusal:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        timeout = self._collective_timeout(ranks)
        return _Plan(target=target, manifest=m, staged=dest, specs=specs, collective_timeout_s=timeout)

    # ------------------------------------------------------------ execution

    async def _poll(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)

    async def _freeze(self, armed: _Armed, started: dict[str, Any]) -> dict[str, Any]:
        t = armed.plan.target
        assert t is not None
        p = armed.auth.payload
        timeout = self.settings.confirm_timeout_s
        executed = int(started["executed"])
        if t.method == METHOD_CGROUP and t.cgroup_dir is not None:
            directory = t.cgroup_dir
            ok = await self._poll(lambda: cgroup_frozen(directory), timeout)
            pids = sorted(cgroup_members(directory))
        else:
            done = list(started["done"])
            already = set(t.tree)
            done += sweep_new_children(t, already, protected_pids())
            pids = sorted(done)
            ok = await self._poll(lambda: stopped(pids), timeout)
        confirmed = self.clock() if ok else 0
        starts = {str(pid): t.start_times[pid] for pid in pids if pid in t.start_times}
        record = FrozenRecord(
            job=p.job,
            method=t.method,
            frozen_since_ns=executed,
            command_id=p.command_id,
            collective_timeout_s=armed.plan.collective_timeout_s,
            pids=pids,
            start_times=starts,
            cgroup=t.cgroup,
            cgroup_dir=str(t.cgroup_dir or ""),
            confirmed=ok,
        )
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.frozen.put, record)
        ranks = self.jobs().get(p.job)
        if ranks:  # how to restart it, should its processes die while frozen (rollback later)
            await loop.run_in_executor(None, self._remember_launch, p.job, ranks)
        out: dict[str, Any] = {
            "status": STATUS_EXECUTED if ok else STATUS_FAILED,
            "method": t.method,
            "pids": tuple(pids),
            "cgroup": t.cgroup,
            "executed_at_ns": executed,
            "confirmed_at_ns": confirmed,
            "frozen_since_ns": executed,
            "collective_timeout_s": armed.plan.collective_timeout_s,
            "reason": t.note and f"sigstop because {t.note}",
        }
        if not ok:
            out["reason"] = f"freeze requested but not confirmed within {timeout:.0f} s; left in place"
        return out

    async def _resume(self, armed: _Armed, started: dict[str, Any]) -> dict[str, Any]:
        rec = armed.plan.record
        assert rec is not None
        timeout = self.settings.confirm_timeout_s
        executed = int(started["executed"])
        if rec.method == METHOD_CGROUP:
            directory = Path(rec.cgroup_dir)
            ok = await self._poll(lambda: not cgroup_frozen(directory), timeout)
            pids = sorted(cgroup_members(directory))
        else:
            pids = armed.plan.pids

            def running() -> bool:
                return not any(_state_stopped(pid) for pid in pids)

            ok = await self._poll(running, timeout)
        await asyncio.get_running_loop().run_in_executor(None, self.frozen.pop, rec.job)
        return {
            "status": STATUS_EXECUTED if ok else STATUS_FAILED,
            "method": rec.method,
            "pids": tuple(pids),
            "cgroup": rec.cgroup,
            "executed_at_ns": executed,
            "confirmed_at_ns": self.clock() if ok else 0,
            "frozen_since_ns": rec.frozen_since_ns,
            "collective_timeout_s": rec.collective_timeout_s,
            "reason": "" if ok else f"resume not confirmed within {timeout:.0f} s",
        }

    async def _rollback(self, armed: _Armed) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        p = armed.auth.payload
        rec = self.frozen.records.get(p.job)
        result = await loop.run_in_executor(None, self._rollback_blocking, armed, rec)
        if rec is not None:
            self.frozen.pop(p.job)
        return result

    def _rollback_blocking(self, armed: _Armed, rec: FrozenRecord | None) -> dict[str, Any]:
        plan = armed.plan
        p = armed.auth.payload
        assert plan.manifest is not None and plan.staged is not None
        protected = protected_pids()
        pids: set[int] = set(plan.target.tree) if plan.target else set()
        if plan.target is not None:  # re-read: children may have come and gone since PREPARE
            ranks = self.jobs().get(p.job)
            if ranks:
                with contextlib.suppress(FreezeError):
                    pids |= set(resolve_job(p.job, ranks, protected, None).tree)
        if rec is not None:
            pids |= set(live_recorded_pids(rec))
        cg_dir: Path | None = None
        cg_path = ""
        if plan.target is not None and plan.target.method == METHOD_CGROUP:
            cg_dir, cg_path = plan.target.cgroup_dir, plan.target.cgroup
        elif rec is not None and rec.method == METHOD_CGROUP:
            cg_dir, cg_path = Path(rec.cgroup_dir), rec.cgroup
        if cg_dir is not None and cg_dir.is_dir():
            pids |= cgroup_members(cg_dir) - protected
        executed = time.time_ns()
        stop_processes(sorted(pids), protected, self.settings.stop_grace_s, frozen=rec is not None)
        if cg_dir is not None and cg_dir.is_dir():
            thaw_empty_cgroup(cg_dir)
        staged = str(plan.staged)
        for marker in dict.fromkeys(s.marker for s in plan.specs if s.marker):
            spec = next(s for s in plan.specs if s.marker == marker)
            write_resume_marker(marker, staged, spec.uid, spec.gid)
        cgroup = (self.mount, cg_path) if (self.mount is not None and cg_path) else None
        procs = restart(plan.specs, cgroup, plan.staged.parent / "logs")
        self._children.extend(procs)
        self.floors.raise_to(p.job, plan.manifest.step)
        self._prune_staged(p.job, keep=plan.staged)
        return {
            "status": STATUS_EXECUTED,
            "method": "restore",
            "pids": tuple(sorted(pids)),
            "cgroup": cg_path,
            "executed_at_ns": executed,
            "confirmed_at_ns": self.clock(),
            "checkpoint_step": plan.manifest.step,
            "checkpoint_path": staged,
            "restarted_pids": tuple(pr.pid for pr in procs),
            "collective_timeout_s": plan.collective_timeout_s,
        }

    # ------------------------------------------------------------ helpers

    def _checkpoint_dirs(self, job: str, ranks: Mapping[int, Registration]) -> list[Path]:
        roots: list[Path] = []
        root = self.settings.checkpoint_root
        if root is not None and _SAFE_NAME.match(job) and job not in (".", ".."):
            roots.append(root / job)
        for reg in ranks.values():
            d = reg.info.get("checkpoint_dir", "")
            if not d or not os.path.isabs(d):
                continue
            with contextlib.suppress(OSError):
                st = os.stat(d)
                # A job may only point the agent at its own directories.
                if reg.uid == 0 or st.st_uid == reg.uid:
                    roots.append(Path(d))
        return discover_checkpoints(dict.fromkeys(roots))

    def _trusted_keys(self) -> dict[str, Any]:
        paths = list(self.settings.trusted_checkpoint_keys)
        pinned = self.state_dir / "trusted-checkpoint-keys"
        if pinned.is_dir():
            paths += sorted(pinned.glob("*.pem"))
        return load_trusted_keys(paths)

    def _floor(self, job: str, trusted: Mapping[str, Any], dirs: Sequence[Path]) -> int:
        floor = self.floors.get(job)
        back = self.settings.rollback_max_steps_back
        if back > 0 and trusted:
            newest = -1
            for d in dirs:
                with contextlib.suppress(CheckpointError, OSError):
                    m = verify_checkpoint(d, trusted, expect_job=job, rehash=False)
                    newest = max(newest, m.step)
            if newest >= 0:
                floor = max(floor, newest - back)
        return floor

    def _collective_timeout(self, ranks: Mapping[int, Registration]) -> int:
        for reg in ranks.values():
            raw = reg.info.get("collective_timeout_s", "")
            with contextlib.suppress(ValueError):
                if raw and 0 < float(raw) < 1e7:
                    return int(float(raw))
        return self.settings.collective_timeout_s

    def _remember_launch(
        self, job: str, ranks: Mapping[int, Registration], specs: list[LaunchSpec] | None = None
    ) -> None:
        """Keep how to restart the job, so a rollback works even after its processes died."""
        try:
            specs = specs if specs is not None else capture_launch(ranks)
        except RestoreError:
            return
        self.launch_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.launch_dir / f"{_slug(job)}.json"
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, specs_to_json(specs).encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _cached_launch(self, job: str) -> list[LaunchSpec]:
        path = self.launch_dir / f"{_slug(job)}.json"
        try:
            return specs_from_json(path.read_text())
        except FileNotFoundError:
            raise RestoreError(f"job {job!r} has no live process and no recorded launch command") from None
        except (ValueError, TypeError) as exc:
            raise RestoreError(f"recorded launch command for {job!r} unreadable: {exc}") from None

    def _prune_staged(self, job: str, keep: Path) -> None:
        base = self.restore_dir / _slug(job)
        with contextlib.suppress(OSError):
            for d in base.iterdir():
                if d.is_dir() and d != keep and d.name != "logs" and not d.is_symlink():
                    shutil.rmtree(d, ignore_errors=True)

    def _reap(self) -> None:
        self._children = [c for c in self._children if c.poll() is None]

    @staticmethod
    def _method_of(plan: _Plan) -> str:
        if plan.manifest is not None:
            return "restore"
        if plan.target is not None:
            return plan.target.method
        return plan.record.method if plan.record is not None else ""

    @staticmethod
    def _pids_of(plan: _Plan) -> tuple[int, ...]:
        if plan.target is not None:
            return plan.target.tree
        return tuple(plan.record.pids) if plan.record is not None else ()

    def _receipt(
        self, armed: _Armed, status: str, *, phase: str | None = None, store: bool = True, **fields: Any
    ) -> SignedReceipt:
        p = armed.auth.payload
        body = Receipt(
            command_id=p.command_id,
            host=self.host,
            phase=phase or armed.phase,
            status=status,
            payload_sha256=signing.payload_sha256(armed.auth.payload_bytes),
            action=p.action,
            job=p.job,
            signers=armed.auth.signer_labels,
            peer=armed.auth.peer.name,
            received_at_ns=armed.received_ns,
            commit_at_ns=armed.commit_at_ns,
            checkpoint_digest=p.checkpoint_digest,
            agent_key_id=self.key_id,
            signed_at_ns=self.clock(),
        )
        if armed.plan.manifest is not None and "checkpoint_step" not in fields:
            fields.setdefault("checkpoint_step", armed.plan.manifest.step)
            fields.setdefault("checkpoint_path", str(armed.plan.staged or ""))
        body = replace(body, **fields)
        signed = signing.sign_receipt(body, self.key)
        if store:
            self._store(p.command_id, signed)
        return signed

    def _store(self, key: str, signed: SignedReceipt) -> None:
        self._receipts[key] = signed
        self._receipts.move_to_end(key)
        while len(self._receipts) > _RECEIPTS_KEPT:
            self._receipts.popitem(last=False)

    def _refuse(
        self,
        phase: str,
        env: CommandEnvelope | None,
        peer: Peer,
        r: Refusal,
        received: int,
        auth: Authorized | None = None,
    ) -> SignedReceipt:
        if auth is not None:
            p = auth.payload
            cid, action, job, verified = p.command_id, p.action, p.job, "true"
        else:
            claimed = peek_payload(env.payload) if env is not None else {}
            cid, action, job, verified = claimed.get("command_id", ""), claimed.get("action", ""), "", "false"
            job = claimed.get("job", "")
        payload_hash = signing.payload_sha256(env.payload) if env is not None and env.payload else ""
        signers = auth.signer_labels if auth is not None else r.signers
        body = Receipt(
            command_id=cid,
            host=self.host,
            phase=phase or "unknown",
            status=STATUS_REFUSED,
            payload_sha256=payload_hash,
            action=action,
            job=job,
            reason=r.reason,
            check=r.check,
            signers=signers,
            peer=peer.name,
            received_at_ns=received,
            checkpoint_digest=auth.payload.checkpoint_digest if auth is not None else "",
            agent_key_id=self.key_id,
            signed_at_ns=self.clock(),
        )
        signed = signing.sign_receipt(body, self.key)
        if auth is not None:
            self._store(cid, signed)
        attrs = {
            "command_id": cid,
            "action": action,
            "job": job,
            "phase": phase,
            "check": r.check,
            "reason": r.reason,
            "signers": ",".join(signers),
            "peer": peer.name,
            "payload_sha256": payload_hash,
            "verified": verified,
            "host": self.host,
        }
        self._event(
            "command_refused",
            SEVERITY_WARNING,
            f"refused {action or 'command'}{' of ' + job if job else ''} ({r.check}): {r.reason}",
            attrs,
        )
        log.warning("refused command %s (%s): %s", cid or "?", r.check, r.reason)
        return signed

    def _attrs(self, armed: _Armed, **extra: str) -> dict[str, str]:
        p = armed.auth.payload
        attrs = {
            "command_id": p.command_id,
            "action": p.action,
            "job": p.job,
            "phase": armed.phase,
            "reason": p.reason,
            "signers": ",".join(armed.auth.signer_labels),
            "peer": armed.auth.peer.name,
            "payload_sha256": signing.payload_sha256(armed.auth.payload_bytes),
            "host": self.host,
        }
        attrs.update({k: v for k, v in extra.items() if v is not None})
        return attrs

    def _event(self, kind: str, severity: int, detail: str, attrs: dict[str, str]) -> None:
        self.emit(Event(self.clock(), kind, severity, -1, 0, detail[:500], attrs))


def _state_stopped(pid: int) -> bool:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    end = data.rfind(b")")
    return data[end + 2 : end + 3] in (b"T", b"t")


def controller_from_config(cfg: Any, jobs: JobsSource, emit: EventSink) -> Controller | None:
    """Build the controller from an AgentConfig; None (commands disabled) without an operator CA.

    Insecure (plaintext) agents never accept commands: the mTLS peer check refuses them.
    """
    if not cfg.operator_ca or not Path(cfg.operator_ca).is_file():
        log.warning("control commands disabled: operator CA %s not found", cfg.operator_ca or "(unset)")
        return None
    keys = tuple(Path(k.strip()) for k in cfg.trusted_checkpoint_keys.split(",") if k.strip())
    settings = ControlSettings(
        host=cfg.host,
        state_dir=Path(cfg.state_dir),
        operator_ca=Path(cfg.operator_ca),
        checkpoint_root=Path(cfg.checkpoint_root) if cfg.checkpoint_root else None,
        trusted_checkpoint_keys=keys,
        policy=Policy(
            min_signers={
                ACTION_FREEZE: cfg.freeze_signers,
                ACTION_RESUME: cfg.resume_signers,
                ACTION_ROLLBACK: cfg.rollback_signers,
            }
        ),
        require_mtls=True,
        rollback_max_steps_back=cfg.rollback_max_steps_back,
    )
    return Controller(settings, jobs, emit)
