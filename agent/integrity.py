"""Host integrity: notice when framework files or watched directories change (threat T1, T7, T9).

Two checks, both plain hashing (stdlib only):
  * installed distributions (torch, transformers, ...) against their wheel RECORD hashes via
    importlib.metadata: a file whose sha256 differs from what the wheel shipped, a listed file that
    is gone, or a new code file (.py/.so/.pth) inside the package's directories;
  * watched directories (code, checkpoints): sha256 per file against the first scan.
`check()` returns agent Events ('record_mismatch', 'file_changed', 'file_added', 'file_removed',
and notes 'integrity_skipped' / 'integrity_limit') naming the file; the console turns them into
`file_integrity` alerts. Each finding is reported once, again only if it changes. Hashing is
blocking I/O: run `check()` in a worker thread (`start()` does), never on the agent's event loop.
Measured cost is in docs/detection.md.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from protos.types import SEVERITY_CRITICAL, SEVERITY_INFO, SEVERITY_WARNING, Event

log = logging.getLogger("gpusoc.agent.integrity")

DEFAULT_PACKAGES: Final[tuple[str, ...]] = (
    "torch", "transformers", "accelerate", "deepspeed", "megatron-core", "safetensors", "huggingface-hub",
    "tokenizers", "datasets", "numpy", "triton", "nvidia-nccl-cu12", "flash-attn",
)
# A mismatch in these is critical: they run inside every training step.
SECURITY_PACKAGES: Final[frozenset[str]] = frozenset(
    {"torch", "transformers", "accelerate", "deepspeed", "megatron-core", "safetensors", "huggingface-hub",
     "triton", "nvidia-nccl-cu12", "flash-attn", "numpy", "tokenizers", "datasets"}
)
CODE_SUFFIXES: Final[tuple[str, ...]] = (".py", ".so", ".pth", ".pyd", ".dylib")
_CHUNK: Final = 1 << 20


def sha256_file(path: str | Path) -> bytes:
    """Raw sha256 digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.digest()


def record_digest(b64: str) -> bytes:
    """A RECORD hash value (urlsafe base64 without padding) as raw bytes."""
    return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


@dataclass
class PackageReport:
    """One distribution's RECORD check: counts and time, for logs and the benchmark."""

    package: str
    version: str = ""
    files: int = 0
    hashed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    mismatches: int = 0
    missing: int = 0
    added: int = 0
    note: str = ""


@dataclass
class IntegrityMonitor:
    """Periodic file-integrity checks; `check()` returns new findings as agent Events.

    watch_paths: directories (or files) fingerprinted at the first check and compared after.
    check_packages: distributions checked against their RECORD every time.
    Bounds: at most `max_files` files per watched path, files above `max_file_bytes` are not
    hashed (an 'integrity_skipped' note names them once). RECORD files are hashed whatever size.
    """

    watch_paths: list[str] = field(default_factory=list)
    check_packages: list[str] = field(default_factory=lambda: list(DEFAULT_PACKAGES))
    interval_s: float = 300.0
    max_files: int = 100_000
    max_file_bytes: int = 512 << 20
    security_packages: frozenset[str] = SECURITY_PACKAGES
    stat_cache: bool = True  # between full passes, skip re-hashing files whose stat did not change
    full_every: int = 12  # every Nth check re-hashes everything (12 x 300 s = hourly)
    clock: Callable[[], int] = time.time_ns
    reports: list[PackageReport] = field(default_factory=list)
    _baseline: dict[str, dict[str, bytes]] = field(default_factory=dict)
    _reported: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, path) -> actual
    _last_check: float = 0.0
    _checks: int = 0
    _digests: dict[str, tuple[tuple[int, int, int, int, int], bytes]] = field(default_factory=dict)
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    # -- public ------------------------------------------------------------------------------------

    def due(self, now_s: float | None = None) -> bool:
        """True when `interval_s` passed since the last check (or none ran yet)."""
        now = time.monotonic() if now_s is None else now_s
        return not self._last_check or now - self._last_check >= self.interval_s

    def check(self) -> list[Event]:
        """One full pass over packages and watched paths; returns findings not reported before."""
        self._last_check = time.monotonic()
        self._checks += 1
        if self.full_every and self._checks % self.full_every == 1:
            self._digests.clear()
        events: list[Event] = []
        self.reports = []
        for pkg in self.check_packages:
            events.extend(self.check_package(pkg))
        for path in self.watch_paths:
            events.extend(self._check_watch(path))
        return events

    def check_package(self, name: str) -> list[Event]:
        """Compare one installed distribution's files with its RECORD hashes."""
        rep = PackageReport(name)
        self.reports.append(rep)
        t0 = time.perf_counter()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            rep.note = "not installed"
            return []
        rep.version = dist.version
        files = dist.files
        if files is None:
            rep.note = "no RECORD"
            ev = self._once("integrity_skipped", f"{name}:RECORD", "none", SEVERITY_WARNING,
                            f"{name} {dist.version} has no RECORD file; cannot verify", {"package": name})
            return [ev] if ev.kind else []
        severity = SEVERITY_CRITICAL if _norm(name) in {_norm(p) for p in self.security_packages} else SEVERITY_WARNING
        events: list[Event] = []
        listed: set[str] = set()
        roots: set[str] = set()
        base = os.path.abspath(str(dist.locate_file("")))
        norm = os.path.normpath
        join = os.path.join
        for f in files:
            rep.files += 1
            rel = str(f)
            path = norm(join(base, rel))
            listed.add(path)
            head = rel.split("/", 1)[0]
            if "/" in rel and head != ".." and not head.endswith((".dist-info", ".data")):
                roots.add(norm(join(base, head)))
            if f.hash is None or f.hash.mode != "sha256":
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                rep.missing += 1
                events.append(self._once("file_removed", path, "missing", severity,
                                         f"{path} listed in {name}'s RECORD is missing",
                                         {"package": name, "expected_sha256": record_digest(f.hash.value).hex()}))
                continue
            except OSError:
                continue
            try:
                digest, fresh = self._digest(path, st)
            except OSError:
                continue
            if fresh:
                rep.hashed += 1
                rep.bytes += st.st_size
            expected = record_digest(f.hash.value)
            if digest != expected:
                rep.mismatches += 1
                events.append(self._once(
                    "record_mismatch", path, digest.hex(), severity,
                    f"{path} differs from the {name} {dist.version} wheel",
                    {"package": name, "version": dist.version, "expected_sha256": expected.hex(),
                     "actual_sha256": digest.hex(), **_owner(st)},
                ))
        for root in sorted(roots):
            for p in _walk(Path(root), self.max_files):
                sp = str(p)
                if sp.endswith(CODE_SUFFIXES) and "__pycache__" not in sp and sp not in listed:
                    rep.added += 1
                    try:
                        actual = sha256_file(p).hex()
                        extra = _owner(p.stat())
                    except OSError:
                        actual, extra = "unreadable", {}
                    events.append(self._once("file_added", sp, actual, severity,
                                             f"{sp} is not part of the {name} {dist.version} wheel",
                                             {"package": name, "actual_sha256": actual, **extra}))
        rep.seconds = time.perf_counter() - t0
        return [e for e in events if e.kind]

    def start(self, sink: Callable[[Event], None], stop: threading.Event | None = None) -> threading.Thread:
        """Check now and every interval_s in a daemon thread; each finding goes to `sink`.

        `sink` runs on that thread: from an asyncio agent pass e.g.
        `lambda ev: loop.call_soon_threadsafe(runtime.add_event, ev)`.
        """
        stop_ev = stop or self._stop

        def run() -> None:
            while not stop_ev.is_set():
                try:
                    for ev in self.check():
                        sink(ev)
                except Exception:  # a failing check must not kill the agent
                    log.exception("integrity check failed")
                stop_ev.wait(self.interval_s)

        self._thread = threading.Thread(target=run, name="gpusoc-integrity", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """Stop the thread started by start()."""
        self._stop.set()

    # -- internals ---------------------------------------------------------------------------------

    def _digest(self, path: str | Path, st: os.stat_result) -> tuple[bytes, bool]:
        """sha256 of path; from the stat cache when size/mtime/ctime/inode/device are unchanged."""
        key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
        if self.stat_cache:
            hit = self._digests.get(str(path))
            if hit is not None and hit[0] == key:
                return hit[1], False
        digest = sha256_file(path)
        if self.stat_cache:
            self._digests[str(path)] = (key, digest)
        return digest, True

    def _once(self, kind: str, path: str, actual: str, severity: int, detail: str, attrs: dict[str, str]) -> Event:
        ev = Event(self.clock(), kind, severity, -1, 0, detail, {"path": path, **attrs})
        key = (kind, path)
        if self._reported.get(key) == actual:
            ev.kind = ""  # already reported: filtered below
        self._reported[key] = actual
        return ev

    def _check_watch(self, root: str) -> list[Event]:
        current: dict[str, bytes] = {}
        events: list[Event] = []
        files = list(_walk(Path(root), self.max_files + 1))
        if len(files) > self.max_files:
            events.append(self._once("integrity_limit", root, str(self.max_files), SEVERITY_WARNING,
                                     f"{root}: more than {self.max_files} files; only the first are checked",
                                     {"max_files": str(self.max_files)}))
            files = files[: self.max_files]
        for p in files:
            try:
                st = p.stat()
                if st.st_size > self.max_file_bytes:
                    events.append(self._once("integrity_skipped", str(p), str(st.st_size), SEVERITY_INFO,
                                             f"{p} not hashed: {st.st_size} bytes > {self.max_file_bytes}",
                                             {"size": str(st.st_size)}))
                    continue
                current[str(p)] = self._digest(p, st)[0]
            except OSError:
                continue
        base = self._baseline.get(root)
        if base is None:
            self._baseline[root] = current
            return [e for e in events if e.kind]
        for path, digest in current.items():
            old = base.get(path)
            if old is None:
                events.append(self._once("file_added", path, digest.hex(), SEVERITY_WARNING,
                                         f"{path} appeared under {root}",
                                         {"watch": root, "actual_sha256": digest.hex(), **_owner_path(path)}))
            elif old != digest:
                events.append(self._once("file_changed", path, digest.hex(), SEVERITY_WARNING,
                                         f"{path} changed under {root}",
                                         {"watch": root, "expected_sha256": old.hex(), "actual_sha256": digest.hex(),
                                          **_owner_path(path)}))
        for path, old in base.items():
            if path not in current:
                events.append(self._once("file_removed", path, "missing", SEVERITY_WARNING,
                                         f"{path} removed from {root}", {"watch": root, "expected_sha256": old.hex()}))
        return [e for e in events if e.kind]


def _walk(root: Path, limit: int) -> Iterable[Path]:
    """Regular files under root (or root itself), sorted per directory, at most `limit`; no symlinks."""
    if root.is_file():
        yield root
        return
    n = 0
    stack = [str(root)]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    subdirs.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    yield Path(e.path)
                    n += 1
                    if n >= limit:
                        return
            except OSError:
                continue
        stack.extend(reversed(subdirs))


def _owner(st: os.stat_result) -> dict[str, str]:
    return {"owner_uid": str(st.st_uid), "mtime_ns": str(st.st_mtime_ns), "size": str(st.st_size)}


def _owner_path(path: str) -> dict[str, str]:
    try:
        return _owner(os.stat(path))
    except OSError:
        return {}


def time_record_check(packages: Iterable[str], passes: int = 2) -> list[list[PackageReport]]:
    """RECORD-check `packages` `passes` times (the first hashes all, later ones use the stat cache)."""
    mon = IntegrityMonitor(check_packages=list(packages))
    out = []
    for _ in range(passes):
        mon.check()
        out.append(list(mon.reports))
    return out


if __name__ == "__main__":  # python -m agent.integrity numpy grpcio torch
    import sys

    for i, reports in enumerate(time_record_check(sys.argv[1:] or ["numpy", "grpcio"])):
        for r in reports:
            print(f"pass {i + 1} {r.package} {r.version}: {r.files} files, {r.hashed} hashed, {r.bytes / 1e6:.1f} MB"
                  f" in {r.seconds:.2f} s; mismatches {r.mismatches} missing {r.missing} added {r.added} {r.note}")
