"""Freeze and thaw one job's processes on this host.

The job's processes are the pids its ranks registered through the SDK (the kernel stamped
them) plus their descendants. When those live in a cgroup v2 subtree that holds nothing
else, the cgroup freezer stops them atomically with respect to fork and the kernel confirms
it (`frozen 1` in cgroup.events). Otherwise every process of the tree gets SIGSTOP and is
checked to be stopped. Either way the agent never stops itself, an ancestor of itself, or
pid 1. The cgroup v2 mount is found in /proc/self/mountinfo, never assumed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import psutil

__all__ = [
    "METHOD_CGROUP",
    "METHOD_SIGSTOP",
    "FreezeError",
    "FrozenRecord",
    "FrozenStore",
    "JobTarget",
    "Registration",
    "cgroup2_mount",
    "cgroup_frozen",
    "cgroup_members",
    "pid_cgroup",
    "protected_pids",
    "resolve_job",
    "set_cgroup_freeze",
    "sigcont",
    "sigstop",
    "stopped",
]

METHOD_CGROUP: Final = "cgroup_freezer"
METHOD_SIGSTOP: Final = "sigstop"


class FreezeError(Exception):
    """The job cannot be frozen or thawed safely; the message says why."""


class Registration(Protocol):
    """What freeze needs from an SDK rank registration (agent.training.RankRegistration)."""

    pid: int
    uid: int
    world_size: int
    local_rank: int
    info: dict[str, str]
    last_seen: int


# ---------------------------------------------------------------- cgroup v2


def _unescape(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(path):
        code = path[i + 1 : i + 4]
        if path[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo", mounts: str = "/proc/mounts") -> tuple[Path, str] | None:
    """(mount point, root inside the hierarchy) of the cgroup v2 filesystem, or None.

    Reads /proc/self/mountinfo (which also gives the mount's root); falls back to /proc/mounts.
    """
    with contextlib.suppress(OSError):
        for line in Path(mountinfo).read_text().splitlines():
            left, sep, right = line.partition(" - ")
            if not sep or not right.startswith("cgroup2 "):
                continue
            fields = left.split()
            if len(fields) >= 5:
                return Path(_unescape(fields[4])), _unescape(fields[3])
    with contextlib.suppress(OSError):
        for line in Path(mounts).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "cgroup2":
                return Path(_unescape(parts[1])), "/"
    return None


def pid_cgroup(pid: int) -> str | None:
    """The process's cgroup v2 path ("0::/a/b" line of /proc/<pid>/cgroup), or None."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].split(" ")[0] or "/"
    return None


def cgroup_dir(mount: tuple[Path, str], path: str) -> Path | None:
    """Directory of cgroup `path` (as /proc/<pid>/cgroup names it) under the v2 mount."""
    point, root = mount
    root = root.rstrip("/") or "/"
    if root != "/":
        if path != root and not path.startswith(root + "/"):
            return None
        path = path[len(root) :] or "/"
    return point / path.lstrip("/")


def cgroup_members(directory: Path) -> set[int]:
    """Every pid in the cgroup and all its descendants."""
    pids: set[int] = set()
    for here, _dirs, files in os.walk(directory):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError):
                pids.update(int(x) for x in Path(here, "cgroup.procs").read_text().split())
    return pids


def set_cgroup_freeze(directory: Path, frozen: bool) -> int:
    """Write cgroup.freeze; returns the unix ns right after the kernel accepted it."""
    fd = os.open(directory / "cgroup.freeze", os.O_WRONLY | os.O_NOFOLLOW)
    try:
        os.write(fd, b"1\n" if frozen else b"0\n")
    finally:
        os.close(fd)
    return time.time_ns()


def cgroup_frozen(directory: Path) -> bool:
    """The kernel's view: `frozen 1` in cgroup.events (set asynchronously after cgroup.freeze)."""
    try:
        text = (directory / "cgroup.events").read_text()
    except OSError:
        return False
    return "frozen 1" in text.splitlines()


def cgroup_populated(directory: Path) -> bool:
    try:
        return "populated 1" in (directory / "cgroup.events").read_text().splitlines()
    except OSError:
        return False


# ---------------------------------------------------------------- processes


_PROTECTED: list[tuple[float, int, frozenset[int]]] = []


def protected_pids() -> set[int]:
    """The agent, every ancestor of it, and pid 1: never frozen, never killed.

    Cached for a few seconds: a process's ancestry can only shrink (reparenting), so a cached
    set is never missing a current ancestor.
    """
    now, me = time.monotonic(), os.getpid()
    if _PROTECTED and _PROTECTED[0][1] == me and now - _PROTECTED[0][0] < 5.0:
        return set(_PROTECTED[0][2])
    out = {me, 1} | _ancestors([me])
    _PROTECTED[:] = [(now, me, frozenset(out))]
    return out


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _ppid(pid: int) -> int:
    """Parent pid from /proc/<pid>/stat; 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    fields = data[data.rfind(b")") + 2 :].split()
    return int(fields[1]) if len(fields) > 1 else 0


def _children(pid: int) -> list[int]:
    """Direct children from /proc/<pid>/task/*/children (CONFIG_PROC_CHILDREN); a full scan otherwise."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue
            return [c for c, parent in _ppid_map().items() if parent == pid]
        except OSError:
            continue
    return out


def _ppid_map() -> dict[int, int]:
    """pid -> parent pid for every process: the fallback when the kernel has no children files."""
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            parent = _ppid(int(name))
            if parent:
                out[int(name)] = parent
    return out


def _descendants(pids: Iterable[int]) -> set[int]:
    roots = set(pids)
    out: set[int] = set()
    stack = list(roots)
    while stack:
        for c in _children(stack.pop()):
            if c not in out and c not in roots:
                out.add(c)
                stack.append(c)
    return out


def _ancestors(pids: Iterable[int]) -> set[int]:
    out: set[int] = set()
    for pid in pids:
        parent, hops = _ppid(pid), 0
        while parent > 0 and parent not in out and hops < 4096:
            out.add(parent)
            parent, hops = _ppid(parent), hops + 1
    return out


def _state(pid: int) -> str | None:
    """One-letter state from /proc/<pid>/stat ('T' stopped, 't' traced, 'Z' zombie), None if gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    end = data.rfind(b")")
    return data[end + 2 : end + 3].decode() if end >= 0 else None


def stopped(pids: Iterable[int]) -> bool:
    """True when every listed process is stopped (or has exited)."""
    return all(_state(p) in (None, "T", "t", "Z", "X") for p in pids)


def sigstop(pids: Iterable[int]) -> tuple[int, list[int]]:
    """SIGSTOP each pid; returns (unix ns after the last signal, pids signalled)."""
    done = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGSTOP)
            done.append(pid)
        except ProcessLookupError:
            continue
    return time.time_ns(), done


def sigcont(pids: Iterable[int]) -> list[int]:
    done = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
            done.append(pid)
        except ProcessLookupError:
            continue
    return done


# ---------------------------------------------------------------- resolving a job


@dataclass(slots=True)
class JobTarget:
    """A job's processes on this host and how they would be frozen."""

    job: str
    pids: tuple[int, ...]  # registered rank pids that are alive
    tree: tuple[int, ...]  # pids + descendants
    method: str
    cgroup: str = ""  # cgroup path (as in /proc/<pid>/cgroup) when method is cgroup_freezer
    cgroup_dir: Path | None = None
    note: str = ""  # why the cgroup freezer was not used
    uids: tuple[int, ...] = ()
    start_times: dict[int, float] = field(default_factory=dict)


def resolve_job(
    job: str,
    ranks: Mapping[int, Registration],
    protected: set[int],
    mount: tuple[Path, str] | None,
) -> JobTarget:
    """Map a job's registrations to live processes and pick the freeze method; FreezeError if unsafe."""
    pids: list[int] = []
    uids: set[int] = set()
    starts: dict[int, float] = {}
    for _rank, reg in sorted(ranks.items()):
        created = _create_time(reg.pid)
        # A pid created after the rank's last datagram is a reused pid, not the rank.
        if created is None or created > reg.last_seen / 1e9 + 1.0:
            continue
        if reg.pid not in pids:
            pids.append(reg.pid)
            uids.add(reg.uid)
            starts[reg.pid] = created
    if not pids:
        raise FreezeError(f"job {job!r} has no live registered process on this host")
    tree = list(pids)
    for d in sorted(_descendants(pids)):
        if d not in tree:
            tree.append(d)
            ct = _create_time(d)
            if ct is not None:
                starts[d] = ct
    hit = protected.intersection(tree)
    if hit:
        raise FreezeError(f"job {job!r} includes the agent or an ancestor of it (pid {min(hit)}); refusing")
    target = JobTarget(job, tuple(pids), tuple(tree), METHOD_SIGSTOP, uids=tuple(sorted(uids)), start_times=starts)
    target.note = _own_cgroup(target, protected, mount)
    return target


def _own_cgroup(t: JobTarget, protected: set[int], mount: tuple[Path, str] | None) -> str:
    """Switch `t` to the cgroup freezer when the job has a cgroup of its own; else say why not."""
    if mount is None:
        return "no cgroup v2 mount"
    paths = []
    for pid in t.pids:
        p = pid_cgroup(pid)
        if p is None:
            return f"cgroup of pid {pid} unknown"
        paths.append([s for s in p.split("/") if s])
    common: list[str] = []
    for parts in zip(*paths, strict=False):
        if all(x == parts[0] for x in parts):
            common.append(parts[0])
        else:
            break
    path = "/" + "/".join(common)
    if path == "/":
        return "job shares the root cgroup"
    directory = cgroup_dir(mount, path)
    if directory is None or not (directory / "cgroup.freeze").exists():
        return f"cgroup {path} has no cgroup.freeze"
    members = cgroup_members(directory)
    if protected & members:
        return f"cgroup {path} holds the agent or an ancestor of it"
    allowed = set(t.tree) | (_ancestors(t.pids) - protected)
    others = sorted(members - allowed)
    if others:
        name = ""
        with contextlib.suppress(psutil.Error):
            name = f" ({psutil.Process(others[0]).name()})"
        return f"cgroup {path} also holds pid {others[0]}{name}"
    if not os.access(directory / "cgroup.freeze", os.W_OK):
        return f"cgroup {path}: cgroup.freeze not writable"
    t.method, t.cgroup, t.cgroup_dir = METHOD_CGROUP, path, directory
    return ""


def sweep_new_children(t: JobTarget, already: set[int], protected: set[int]) -> list[int]:
    """Children forked during a SIGSTOP sweep: stop them too (bounded rounds)."""
    added: list[int] = []
    for _ in range(5):
        fresh = sorted(_descendants(t.pids) - already - protected)
        if not fresh:
            break
        _, done = sigstop(fresh)
        already.update(fresh)
        added.extend(done)
    return added


# ---------------------------------------------------------------- persisted frozen state


@dataclass(slots=True)
class FrozenRecord:
    """A job this agent froze: enough to thaw it after an agent restart, and to report the clock."""

    job: str
    method: str
    frozen_since_ns: int
    command_id: str
    collective_timeout_s: int
    pids: list[int] = field(default_factory=list)
    start_times: dict[str, float] = field(default_factory=dict)  # str(pid) -> create time
    cgroup: str = ""
    cgroup_dir: str = ""
    confirmed: bool = False


class FrozenStore:
    """frozen.json in the state dir: job -> FrozenRecord, rewritten atomically on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, FrozenRecord] = {}
        self._lock = threading.Lock()
        try:
            raw: Any = json.loads(path.read_text())
            for job, rec in raw.items():
                self.records[job] = FrozenRecord(**rec)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError) as exc:
            raise FreezeError(f"frozen-job state {path} unreadable: {exc}") from None

    def put(self, rec: FrozenRecord) -> None:
        with self._lock:
            self.records[rec.job] = rec
            self._save()

    def pop(self, job: str) -> FrozenRecord | None:
        with self._lock:
            rec = self.records.pop(job, None)
            self._save()
            return rec

    def _save(self) -> None:
        # Atomic rename, no fsync: the record matters across agent restarts (page cache survives);
        # after a power loss the frozen processes are gone anyway.
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = json.dumps({j: asdict(r) for j, r in self.records.items()}, sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)


def live_recorded_pids(rec: FrozenRecord) -> list[int]:
    """Recorded pids that are still the same processes (create time unchanged): safe to signal."""
    out = []
    for pid in rec.pids:
        want = rec.start_times.get(str(pid))
        got = _create_time(pid)
        if got is not None and (want is None or abs(got - want) < 0.05):
            out.append(pid)
    return out
