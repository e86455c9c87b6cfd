"""Restore a job from a verified checkpoint: stop it, point its resume marker, restart it.

The launch command comes from what the kernel says about the running ranks
(/proc/<pid>/cmdline, cwd and an allow-listed subset of the environment), falling back to
what the SDK registered (`executable`, `argv`, `cwd`) when the processes are already gone; a
job may register one host-level `launch_cmd` (e.g. its torchrun line) instead. Restarted
processes run as the job's own uid/gid, never as the agent's, and rejoin the job's cgroup.
The resume marker is written without following links, only into a directory the job's
user owns.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shlex
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

import psutil

from agent.act.freeze import Registration, cgroup_dir, cgroup_populated, set_cgroup_freeze

__all__ = [
    "ENV_KEEP_NAMES",
    "ENV_KEEP_PREFIXES",
    "MARKER_NAME",
    "LaunchSpec",
    "RestoreError",
    "capture_launch",
    "marker_paths",
    "restart",
    "stop_processes",
    "write_resume_marker",
]

MARKER_NAME: Final = "RESUME_FROM"
ENV_KEEP_NAMES: Final = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LC_ALL",
        "TZ",
        "PYTHONPATH",
        "VIRTUAL_ENV",
        "MASTER_ADDR",
        "MASTER_PORT",
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "NODE_RANK",
    }
)
ENV_KEEP_PREFIXES: Final = ("GPUSOC_", "NCCL_", "TORCH_", "CUDA_", "OMP_", "MKL_", "GLOO_")


class RestoreError(Exception):
    """The restore cannot proceed safely; the message says why."""


@dataclass(slots=True)
class LaunchSpec:
    """How to start one process of the job again."""

    rank: int  # -1 for a host-level launcher command
    argv: list[str]
    cwd: str
    env: dict[str, str]
    uid: int
    gid: int
    source: str  # proc | sdk | launch_cmd
    marker: str = ""  # resume marker path for this process (absolute)
    extra: dict[str, str] = field(default_factory=dict)


def _keep_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k in ENV_KEEP_NAMES or k.startswith(ENV_KEEP_PREFIXES)}


def _gid_of(pid: int, uid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Gid:"):
                return int(line.split()[1])
    with contextlib.suppress(KeyError):
        return pwd.getpwuid(uid).pw_gid
    return uid


def _proc_launch(pid: int) -> tuple[list[str], str, dict[str, str]] | None:
    try:
        p = psutil.Process(pid)
        argv = p.cmdline()
        cwd = p.cwd()
        env = p.environ()
    except psutil.Error:
        return None
    if not argv or not cwd:
        return None
    return argv, cwd, _keep_env(env)


def marker_paths(info: Mapping[str, str], cwd: str) -> str:
    """The job's resume marker: the registered `resume_marker` (absolute), else <cwd>/RESUME_FROM."""
    registered = info.get("resume_marker", "")
    if registered and os.path.isabs(registered):
        return os.path.normpath(registered)
    return os.path.join(cwd, MARKER_NAME)


def capture_launch(ranks: Mapping[int, Registration]) -> list[LaunchSpec]:
    """Launch specs for the job's processes on this host (one per rank, or one launcher command)."""
    specs: list[LaunchSpec] = []
    ordered = sorted(ranks.items(), key=lambda kv: (kv[1].local_rank, kv[0]))
    for rank, reg in ordered:
        launch_cmd = reg.info.get("launch_cmd", "")
        if launch_cmd:
            cwd = reg.info.get("launch_cwd") or reg.info.get("cwd", "/")
            proc = _proc_launch(reg.pid)
            env = proc[2] if proc else _env_from_info(reg.info)
            return [
                LaunchSpec(
                    -1,
                    shlex.split(launch_cmd),
                    cwd,
                    env,
                    reg.uid,
                    _gid_of(reg.pid, reg.uid),
                    "launch_cmd",
                    marker_paths(reg.info, cwd),
                )
            ]
        proc = _proc_launch(reg.pid)
        if proc is not None:
            argv, cwd, env = proc
            source = "proc"
        else:
            exe, args, cwd = reg.info.get("executable", ""), reg.info.get("argv", ""), reg.info.get("cwd", "")
            if not exe or not args or not cwd:
                raise RestoreError(f"rank {rank} is gone and registered no executable/argv/cwd to restart it with")
            argv, env, source = [exe, *shlex.split(args)], _env_from_info(reg.info), "sdk"
        specs.append(
            LaunchSpec(rank, argv, cwd, env, reg.uid, _gid_of(reg.pid, reg.uid), source, marker_paths(reg.info, cwd))
        )
    if not specs:
        raise RestoreError("no registered process to restart")
    return specs


def _env_from_info(info: Mapping[str, str]) -> dict[str, str]:
    """An env subset the SDK may have registered as JSON under `env`."""
    with contextlib.suppress(ValueError, TypeError):
        raw = json.loads(info.get("env", "{}"))
        if isinstance(raw, dict):
            return _keep_env({str(k): str(v) for k, v in raw.items()})
    return {}


def specs_to_json(specs: Iterable[LaunchSpec]) -> str:
    return json.dumps([asdict(s) for s in specs])


def specs_from_json(text: str) -> list[LaunchSpec]:
    return [LaunchSpec(**d) for d in json.loads(text)]


# ---------------------------------------------------------------- stop


def stop_processes(pids: Iterable[int], protected: set[int], grace_s: float, frozen: bool) -> list[int]:
    """Terminate the job's processes: SIGTERM then SIGKILL after `grace_s` (SIGKILL at once if frozen).

    A frozen process cannot act on SIGTERM, so frozen jobs are killed directly. Returns the pids
    that were signalled; waits until they are gone.
    """
    procs: list[psutil.Process] = []
    for pid in pids:
        if pid in protected:
            raise RestoreError(f"refusing to stop pid {pid}: the agent or an ancestor of it")
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    first = signal.SIGKILL if frozen else signal.SIGTERM
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(first)
    _gone, alive = psutil.wait_procs(procs, timeout=0.2 if frozen else grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    _gone, alive = psutil.wait_procs(alive, timeout=10)
    alive = [p for p in alive if _is_alive(p)]
    if alive:
        raise RestoreError(f"pid(s) {[p.pid for p in alive]} did not exit")
    return [p.pid for p in procs]


def _is_alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def thaw_empty_cgroup(directory: Path, timeout_s: float = 5.0) -> None:
    """After a kill, wait for the cgroup to empty and unfreeze it so restarted processes run."""
    deadline = time.monotonic() + timeout_s
    while cgroup_populated(directory) and time.monotonic() < deadline:
        time.sleep(0.01)
    with contextlib.suppress(OSError):
        set_cgroup_freeze(directory, False)


# ---------------------------------------------------------------- marker


def write_resume_marker(marker: str, target: str, uid: int, gid: int) -> None:
    """Atomically make `marker` contain `target` + newline, owned by the job's user.

    Refuses a directory the job's user does not own (unless the job runs as root), so a job
    cannot aim the root agent at /etc; the final component is replaced by rename, never
    followed if it is a symlink.
    """
    directory, name = os.path.split(marker)
    if not name or name in (".", ".."):
        raise RestoreError(f"bad resume marker path {marker!r}")
    try:
        dfd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise RestoreError(f"cannot open marker directory {directory}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(dfd)
        if uid != 0 and st.st_uid != uid:
            raise RestoreError(f"marker directory {directory} is not owned by the job's user (uid {uid})")
        tmp = f".{name}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dfd)
        try:
            os.write(fd, (target + "\n").encode())
            if os.geteuid() == 0:
                os.fchown(fd, uid, gid)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ---------------------------------------------------------------- restart


def restart(
    specs: Iterable[LaunchSpec], cgroup: tuple[tuple[Path, str], str] | None, log_dir: Path
) -> list[subprocess.Popen[bytes]]:
    """Start each spec as its job user in a new session; output goes to a log under `log_dir`.

    `cgroup` is (v2 mount, cgroup path): new processes are moved there straight away, before
    the interpreter has started, so their children are born inside it.
    """
    log_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    procs: list[subprocess.Popen[bytes]] = []
    target_dir = cgroup_dir(*cgroup) if cgroup else None
    for spec in specs:
        kwargs: dict[str, object] = {}
        if spec.uid != os.geteuid():
            if os.geteuid() != 0:
                raise RestoreError(f"cannot restart as uid {spec.uid}: the agent is not root")
            kwargs.update(user=spec.uid, group=spec.gid, extra_groups=[])
        name = f"restart-rank{spec.rank}-{time.strftime('%Y%m%dT%H%M%S')}.log"
        with open(log_dir / name, "ab") as out:
            try:
                proc = subprocess.Popen(  # argv captured from the job's own process
                    spec.argv,
                    cwd=spec.cwd,
                    env=spec.env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    **kwargs,  # type: ignore[call-overload]
                )
            except OSError as exc:
                raise RestoreError(f"cannot restart rank {spec.rank} ({spec.argv[0]}): {exc}") from None
        if target_dir is not None and target_dir.is_dir():
            with contextlib.suppress(OSError):
                (target_dir / "cgroup.procs").write_text(f"{proc.pid}\n")
        procs.append(proc)
    return procs
