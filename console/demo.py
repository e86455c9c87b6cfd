"""The `--demo` fleet: a local simulated fleet with mTLS, started as a child process.

The console never imports the agent: it runs `gpusoc-agent fleet-sim` (same interpreter) with a
fresh development PKI under the demo directory and subscribes to it like any other fleet.
Everything it produces is labelled simulated on the wire, in the database and in the window.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("gpusoc.console.demo")


def _free_port_block(n: int, start: int = 17000, stop: int = 40000) -> int:
    """First port p such that p..p+n-1 can all be bound on loopback right now."""
    p = start
    while p + n < stop:
        ok = True
        for q in range(p, p + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", q))
                except OSError:
                    ok = False
                    p = q + 1
                    break
        if ok:
            return p
    raise RuntimeError(f"no block of {n} free loopback ports")


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the console dies, so a killed console leaves no fleet behind."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class DemoFleet:
    """A running fleet-sim child process and the files a console needs to reach it."""

    directory: Path
    inventory: Path
    pki: Path
    process: subprocess.Popen[bytes]
    hosts: int

    @property
    def tls_files(self) -> tuple[str, str, str]:
        return (str(self.pki / "agent-ca.pem"), str(self.pki / "consoles" / "console.pem"),
                str(self.pki / "consoles" / "console.key"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_demo_fleet(hosts: int = 32, directory: str | None = None, faults: bool = True,
                     timeout_s: float = 120.0) -> DemoFleet:
    """Start the simulated fleet and wait until its inventory and certificates exist."""
    d = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="gpusoc-demo-"))
    d.mkdir(parents=True, exist_ok=True)
    inventory = d / "fleet.txt"
    if inventory.exists():
        inventory.unlink()
    base = _free_port_block(hosts)
    cmd = [sys.executable, "-m", "agent.cli", "fleet-sim", "--hosts", str(hosts), "--gpus", "8",
           "--base-port", str(base), "--pki", str(d / "pki"), "--inventory", str(inventory),
           "--processes", str(max(1, min(2, hosts // 16)))]
    if faults:
        cmd.append("--faults")
    logf = open(d / "fleet-sim.log", "ab")  # noqa: SIM115 - lives as long as the child
    # Its own session: Ctrl-C in a terminal signals the whole foreground group, and a fleet that
    # stopped with the console cut every stream before ingest stopped (one 'disconnected' warning
    # per host). The console stops ingest first and then the fleet (DemoFleet.stop); if the
    # console dies instead, _die_with_parent ends the fleet.
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=dict(os.environ),
                            preexec_fn=_die_with_parent, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not inventory.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"demo fleet exited with {proc.returncode}; see {d / 'fleet-sim.log'}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError(f"demo fleet did not start in {timeout_s:.0f} s; see {d / 'fleet-sim.log'}")
        time.sleep(0.2)
    log.info("demo fleet: %d simulated hosts on 127.0.0.1:%d.. (mTLS), files in %s", hosts, base, d)
    return DemoFleet(d, inventory, d / "pki", proc, hosts)
