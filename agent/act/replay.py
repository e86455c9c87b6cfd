"""Persistent single-use command ids, so a captured command cannot be replayed, even after a restart.

Each accepted command id is appended with the time until which it must be remembered
(its expiry plus the allowed clock skew; after that the time-window check refuses it anyway),
and fsync'ed before the command runs. Loading drops entries that have lapsed, so the file
stays bounded by the commands of the last few minutes. An unreadable file refuses every
command (fail closed) rather than forgetting what was already used.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Final

__all__ = ["ReplayError", "ReplayStore"]

_LINE: Final = re.compile(r"^([0-9a-f]{32}) ([0-9]{1,19})$")
DEFAULT_MAX_ENTRIES: Final = 100_000


class ReplayError(Exception):
    """The command id was used before, or replay state cannot be trusted (fail closed)."""


class ReplayStore:
    """Command ids seen, persisted as `<id> <keep_until_ns>` lines under the agent's state dir."""

    def __init__(self, path: str | os.PathLike[str], now_ns: int, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.path = Path(path)
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._broken: str | None = None
        self._appended = 0
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self._load(now_ns)
        except (OSError, ValueError) as exc:
            self._broken = f"replay state {self.path} unreadable: {exc}"
            return
        self._rewrite()

    def _load(self, now_ns: int) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        lines = raw.split(b"\n")
        complete, tail = lines[:-1], lines[-1]
        # A torn last line (crash mid-append) was never fsync'ed, so its command never ran.
        del tail
        for n, line in enumerate(complete, 1):
            m = _LINE.match(line.decode("ascii", "replace"))
            if m is None:
                raise ValueError(f"line {n} is malformed")
            until = int(m.group(2))
            if until >= now_ns:
                self._seen[m.group(1)] = max(until, self._seen.get(m.group(1), 0))

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = "".join(f"{cid} {until}\n" for cid, until in self._seen.items()).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._appended = 0

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, command_id: str, now_ns: int) -> bool:
        """True when the id was accepted before and is still remembered."""
        with self._lock:
            until = self._seen.get(command_id)
            return until is not None and until >= now_ns

    def add(self, command_id: str, keep_until_ns: int, now_ns: int) -> None:
        """Record an id as used, durably, before the command executes; ReplayError if seen or unsafe."""
        if _LINE.match(f"{command_id} {max(0, keep_until_ns)}") is None:
            raise ReplayError("malformed command id")
        with self._lock:
            if self._broken:
                raise ReplayError(self._broken)
            until = self._seen.get(command_id)
            if until is not None and until >= now_ns:
                raise ReplayError(f"command {command_id} was already used")
            if len(self._seen) >= self.max_entries:
                self._seen = {c: u for c, u in self._seen.items() if u >= now_ns}
                if len(self._seen) >= self.max_entries:
                    raise ReplayError(f"more than {self.max_entries} live command ids; refusing new commands")
                self._rewrite()
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                try:
                    os.write(fd, f"{command_id} {keep_until_ns}\n".encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise ReplayError(f"cannot persist command id: {exc.strerror or exc}") from None
            self._seen[command_id] = keep_until_ns
            self._appended += 1
            if self._appended > 2 * max(1024, len(self._seen)):
                self._seen = {c: u for c, u in self._seen.items() if u >= now_ns}
                self._rewrite()
