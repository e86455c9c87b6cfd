"""Problems from a new-user trial: a spool reused under another host name, a busy fleet-sim port,
and the training socket a crashed agent leaves behind.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import sdk
from agent.buffer import StreamItem
from agent.fleetsim import check_ports, port_free, run_fleet
from agent.spool import SpoolBuffer, kept_aside
from agent.training import TrainingReceiver
from protos import serde
from protos.types import TrainRecord
from tests.test_spool import drain, frame_bytes

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- spool and host name


def fill_as(buf: SpoolBuffer, host: str, n: int) -> dict[int, bytes]:
    out = {}
    for _ in range(n):
        s = buf.next_seq
        out[s] = frame_bytes(s, buf.epoch, host=host)
        buf.append_nowait(s, out[s])
    return out


def hosts_in(items: list[StreamItem]) -> set[str]:
    return {serde.decode_frame(i.frame_bytes).host for i in items if i.frame_bytes}


async def test_other_host_spool_is_moved_aside_not_replayed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "spool"
    old = SpoolBuffer(d, host="gpu-node-01", fsync=False)
    assert (d / "host").read_text() == "gpu-node-01\n"
    frames = fill_as(old, "gpu-node-01", 7)
    old_epoch = old.epoch
    old.close()

    with caplog.at_level(logging.WARNING, logger="gpusoc.agent.spool"):
        new = SpoolBuffer(d, host="vm", fsync=False)
    try:
        assert new.epoch != old_epoch
        assert (new.next_seq, len(new)) == (1, 0)
        assert "gpu-node-01" in new.reset_reason and "'vm'" in new.reset_reason
        assert (d / "host").read_text() == "vm\n"
        # Nothing of the old host comes out, whatever position a console resumes from.
        assert await drain(new, 1) == []
        cursor, gaps = new.start_cursor(old_epoch, 3, False)
        assert [g.reason for g in gaps] == ["epoch_changed"] and cursor == 1
        fill_as(new, "vm", 2)
        items = await drain(new, cursor)
        assert [i.seq for i in items] == [1, 2] and hosts_in(items) == {"vm"}
    finally:
        new.close()

    # The old spool is kept next to the new one, whole, and names its host.
    aside = new.moved_aside
    assert aside is not None and aside.parent == d.parent and aside.name.startswith("spool.gpu-node-01.")
    assert aside.name.endswith("Z") and [p.name for p in d.parent.iterdir() if p.name.startswith("spool.")] == [
        aside.name
    ]
    text = caplog.text
    assert "gpu-node-01" in text and "'vm'" in text and str(aside) in text
    kept = SpoolBuffer(aside, host="gpu-node-01", fsync=False)
    try:
        assert kept.epoch == old_epoch and (kept.oldest_seq, kept.newest_seq) == (1, 7)
        items = await drain(kept, 1)
        assert {i.seq: i.frame_bytes for i in items} == frames
    finally:
        kept.close()


async def test_same_host_keeps_epoch_and_data(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    buf = SpoolBuffer(d, host="gpu-node-01", fsync=False)
    frames = fill_as(buf, "gpu-node-01", 5)
    epoch = buf.epoch
    del buf  # as after a crash: no close()
    again = SpoolBuffer(d, host="gpu-node-01", fsync=False)
    try:
        assert again.epoch == epoch and again.reset_reason == "" and again.moved_aside is None
        assert {i.seq: i.frame_bytes for i in await drain(again, 1)} == frames
        assert again.next_seq == 6
    finally:
        again.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool"]


async def test_legacy_spool_without_host_file_adopts_the_host(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    buf = SpoolBuffer(d, fsync=False)  # host=None: as an older version wrote it
    frames = fill_as(buf, "gpu-node-01", 4)
    epoch = buf.epoch
    buf.close()
    assert not (d / "host").exists()
    again = SpoolBuffer(d, host="gpu-node-01", fsync=False)
    try:
        assert again.epoch == epoch and again.reset_reason == ""
        assert {i.seq: i.frame_bytes for i in await drain(again, 1)} == frames
    finally:
        again.close()
    assert (d / "host").read_text() == "gpu-node-01\n"


def test_legacy_spool_of_another_host_is_moved_aside(tmp_path: Path) -> None:
    """No host file, but its frames name another host: replaying them would be the same bug."""
    d = tmp_path / "spool"
    buf = SpoolBuffer(d, fsync=False)
    fill_as(buf, "gpu-node-01", 4)
    epoch = buf.epoch
    buf.close()
    again = SpoolBuffer(d, host="vm", fsync=False)
    try:
        assert again.epoch != epoch and len(again) == 0 and again.moved_aside is not None
        assert again.moved_aside.name.startswith("spool.gpu-node-01.")
        assert len(list(again.moved_aside.glob("seg-*.log"))) >= 1
    finally:
        again.close()


def test_empty_legacy_spool_adopts_and_host_none_skips_the_check(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    SpoolBuffer(d, fsync=False).close()  # epoch, no frames, no host file
    epoch = (d / "epoch").read_text()
    buf = SpoolBuffer(d, host="vm", fsync=False)
    buf.close()
    assert (d / "epoch").read_text() == epoch and (d / "host").read_text() == "vm\n"
    # host=None neither checks nor rewrites the file.
    SpoolBuffer(d, fsync=False).close()
    assert (d / "host").read_text() == "vm\n" and (d / "epoch").read_text() == epoch


def test_odd_host_names_make_safe_aside_names_and_repeat_changes_keep_every_spool(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    for i, host in enumerate(["../etc/x y", "b", "../etc/x y", "c"]):
        buf = SpoolBuffer(d, host=host, fsync=False)
        fill_as(buf, host, i + 1)
        buf.close()
    kept = sorted(p for p in tmp_path.iterdir() if p.name != "spool")
    assert len(kept) == 3 and all(p.parent == tmp_path and p.is_dir() for p in kept)
    assert all("/" not in p.name and not p.name.startswith("..") for p in kept)
    assert all((p / "epoch").is_file() and list(p.glob("seg-*.log")) for p in kept)
    listed = kept_aside(d)  # what the agent names at every start
    assert [p for p, _ in listed] == kept and all(n > 0 for _, n in listed)


def test_unreadable_host_file_is_not_trusted(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    buf = SpoolBuffer(d, host="vm", fsync=False)
    fill_as(buf, "vm", 2)
    buf.close()
    (d / "host").write_bytes(b"\xff\xfe")
    again = SpoolBuffer(d, host="vm", fsync=False)
    try:
        assert len(again) == 0 and again.moved_aside is not None and again.moved_aside.name.startswith("spool.unknown.")
    finally:
        again.close()


# --------------------------------------------------------------------------- fleet-sim ports


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something else listens on, for the test's duration."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def test_fleet_sim_on_a_busy_port_exits_2_at_once_naming_base_port(busy_port: int) -> None:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "agent.cli", "fleet-sim", "--hosts", "2", "--gpus", "1",
                        "--base-port", str(busy_port), "--insecure"],
                       cwd=ROOT, capture_output=True, text=True, timeout=20)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    assert f"port {busy_port}" in r.stderr and "--base-port" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert elapsed < 15  # the interpreter's start-up; the check itself takes milliseconds


def test_check_ports_names_the_first_busy_port_and_a_free_block(busy_port: int) -> None:
    base = busy_port - 1
    if not port_free(base):
        pytest.skip(f"port {base} is busy too")
    msg = check_ports(argparse.Namespace(base_port=base, hosts=3))
    assert msg is not None and f"port {busy_port} " in msg
    suggested = int(msg.split("--base-port ")[1].split(",")[0])
    assert suggested > busy_port and all(port_free(p) for p in range(suggested, suggested + 3))
    assert check_ports(argparse.Namespace(base_port=65535, hosts=2)) is not None
    assert check_ports(argparse.Namespace(base_port=busy_port + 1, hosts=1)) is None or not port_free(busy_port + 1)


def test_a_child_that_cannot_bind_ends_the_fleet_promptly(busy_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The port is taken after the check (a race): the parent notices the dead child, no 120 s wait."""
    monkeypatch.setattr("agent.fleetsim.check_ports", lambda args: None)
    args = argparse.Namespace(hosts=1, gpus=1, base_port=busy_port, processes=1, interval=1.0, buffer_seconds=60.0,
                              pki=None, insecure=True, inventory=None, faults=False, seed=0)
    t0 = time.monotonic()
    assert run_fleet(args, ready_timeout=45) == 1
    assert time.monotonic() - t0 < 30  # a child dead before listening is noticed, not waited out


# --------------------------------------------------------------------------- training socket


_CRASHING_AGENT = """
import os, sys
from agent.training import TrainingReceiver
TrainingReceiver(sys.argv[1], background=False)
print("bound", flush=True)
os.kill(os.getpid(), 9)
"""


async def test_socket_left_by_a_crashed_agent_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "train.sock")
    r = subprocess.run([sys.executable, "-c", _CRASHING_AGENT, path], cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == -signal.SIGKILL and "bound" in r.stdout, r.stderr
    assert os.path.exists(path)  # the crash left the socket file behind
    rx = TrainingReceiver(path, background=False)
    try:
        client = sdk.Client(socket_path=path, job_id="j", rank=0, local_rank=0, world_size=1)
        client.log(step=1, loss=1.0)
        client.close()
        got: list[TrainRecord] = []
        for _ in range(100):
            got += rx.drain()
            if any(rec.step == 1 for rec in got):
                break
            await asyncio.sleep(0.01)
        assert any(rec.step == 1 and rec.pid == os.getpid() for rec in got)
    finally:
        rx.close()
    assert not os.path.exists(path)


def test_live_training_socket_is_an_error_naming_it(tmp_path: Path) -> None:
    path = str(tmp_path / "train.sock")
    rx = TrainingReceiver(path, background=False)
    try:
        with pytest.raises(OSError, match="another receiver") as err:
            TrainingReceiver(path, background=False)
        assert path in str(err.value) and "--training-socket" in str(err.value)
        assert os.path.exists(path)  # the live agent's socket is left alone
    finally:
        rx.close()
