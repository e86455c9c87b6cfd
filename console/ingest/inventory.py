"""The fleet inventory: a plain text file of agent addresses, re-read when it changes.

One agent per line: `ADDRESS [NAME]`, where ADDRESS is HOST:PORT ([v6]:PORT for IPv6) and
NAME, if given, is the identity the agent's certificate must carry. `#` starts a comment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class InventoryError(ValueError):
    """A line that is not an agent address; the message names file and line."""


@dataclass(frozen=True, slots=True)
class AgentEntry:
    address: str
    expected_name: str = ""


def parse_address(text: str) -> tuple[str, int]:
    """Split HOST:PORT (or [v6]:PORT); ValueError with the reason when it is not one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write IPv6 addresses as [ADDR]:PORT")
    return host, int(port)


def parse_inventory(text: str, source: str = "<inventory>") -> list[AgentEntry]:
    entries: list[AgentEntry] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2:
            raise InventoryError(f"{source}:{lineno}: expected 'ADDRESS [NAME]', got {line!r}")
        try:
            parse_address(parts[0])
        except ValueError as exc:
            raise InventoryError(f"{source}:{lineno}: {exc}") from exc
        if parts[0] in seen:
            raise InventoryError(f"{source}:{lineno}: {parts[0]} listed twice")
        seen.add(parts[0])
        entries.append(AgentEntry(parts[0], parts[1] if len(parts) == 2 else ""))
    return entries


class InventoryFile:
    """Re-reads a file when its mtime or size changes; a bad edit keeps the last good list."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self.entries: list[AgentEntry] = []
        self.last_error = ""

    def poll(self) -> bool:
        """Reload if changed; True when the entry list changed. Raises only on the first load."""
        try:
            st = self.path.stat()
        except OSError as exc:
            if self._stamp is None:
                raise InventoryError(f"{self.path}: {exc.strerror}") from exc
            self.last_error = f"{self.path}: {exc.strerror}"
            return False
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        first = self._stamp is None
        self._stamp = stamp
        try:
            entries = parse_inventory(self.path.read_text(), str(self.path))
        except (InventoryError, OSError, UnicodeDecodeError) as exc:
            if first:
                raise InventoryError(str(exc)) from exc
            self.last_error = str(exc)
            return False
        self.last_error = ""
        changed = entries != self.entries
        self.entries = entries
        return changed
