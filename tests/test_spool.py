"""The durable agent spool: restart without loss, torn tails, bounds with gaps, priority, acknowledgements.

Also a SIGKILL'ed agent process that restarts on its spool, with a console client resuming
across it. Run as a script this module is that agent process:

    python tests/test_spool.py --agents sim-a:30001,sim-b:30002 --state DIR [--interval 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.spool import PRIO_FILE, SpoolBuffer, encode_record, is_priority_frame
from protos import serde
from protos.types import GPU_OK, N_METRICS, Description, Event, Frame, Gap

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers


def frame_bytes(seq: int, epoch: str = "e" * 32, kinds: tuple[str, ...] = (), host: str = "h") -> bytes:
    values = np.full((2, N_METRICS), float(seq), dtype=np.float32)
    events = [Event(time.time_ns(), k, 3, 0, 0, f"{k} at {seq}", {}) for k in kinds]
    f = Frame(host=host, epoch=epoch, seq=seq, ts_unix_ns=time.time_ns(), simulated=True, gpu_values=values,
              gpu_index=[0, 1], gpu_state=[GPU_OK, GPU_OK], processes=[], train=[], events=events)
    return serde.encode_frame(f)


def fill(buf: SpoolBuffer, n: int, prio_every: int = 0, kinds: tuple[str, ...] = ("xid",)) -> dict[int, bytes]:
    out = {}
    for _ in range(n):
        s = buf.next_seq
        k = kinds if prio_every and s % prio_every == 0 else ()
        out[s] = frame_bytes(s, buf.epoch, k)
        buf.append_nowait(s, out[s])
    return out


async def drain(buf: SpoolBuffer, cursor: int, idle_s: float = 0.05) -> list:
    """Every item the stream yields until it would wait."""
    out = []
    agen = buf.stream(cursor)
    try:
        while True:
            try:
                out.append(await asyncio.wait_for(agen.__anext__(), idle_s))
            except (TimeoutError, StopAsyncIteration):
                break
    finally:
        await agen.aclose()
    return out


def summary(items: list) -> list:
    return [("gap", i.gap.first_seq, i.gap.last_seq, i.gap.reason) if i.gap else i.seq for i in items]


def segments(d: Path) -> list[Path]:
    return sorted(d.glob("seg-*.log"))


# --------------------------------------------------------------------------- restart


async def test_restart_keeps_epoch_and_every_frame(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    buf = SpoolBuffer(d, max_bytes=1 << 20, segment_bytes=4096)
    assert buf.reset_reason == "no spool yet"
    frames = fill(buf, 60)
    epoch = buf.epoch
    assert len(segments(d)) > 3
    del buf  # no close(): as after a crash, only what os.write handed the kernel exists
    again = SpoolBuffer(d, max_bytes=1 << 20, segment_bytes=4096)
    assert again.epoch == epoch and again.reset_reason == ""
    assert (again.oldest_seq, again.newest_seq, again.next_seq, len(again)) == (1, 60, 61, 60)
    cursor, gaps = again.start_cursor(epoch, 20, False)
    assert gaps == []
    items = await drain(again, cursor)
    assert [i.seq for i in items] == list(range(21, 61))
    assert all(i.frame_bytes == frames[i.seq] for i in items)
    more = fill(again, 5)
    assert sorted(more) == [61, 62, 63, 64, 65]
    again.close()


async def test_live_subscriber_sees_appends_after_fsync(tmp_path: Path) -> None:
    buf = SpoolBuffer(tmp_path / "s", max_bytes=1 << 20)
    got: list[int] = []

    async def sub() -> None:
        async for item in buf.stream(1):
            got.append(item.seq)
            if len(got) == 5:
                return

    task = asyncio.create_task(sub())
    for s in range(1, 6):
        await buf.append(s, frame_bytes(s, buf.epoch))
    await asyncio.wait_for(task, 5)
    assert got == [1, 2, 3, 4, 5] and buf.visible_seq == 5
    await buf.aclose()


def test_unreadable_epoch_file_starts_a_new_epoch(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    buf = SpoolBuffer(d)
    fill(buf, 3)
    old = buf.epoch
    buf.close()
    (d / "epoch").write_text("not an epoch\n")
    fresh = SpoolBuffer(d)
    assert fresh.epoch != old and fresh.reset_reason and fresh.next_seq == 1 and len(fresh) == 0
    fresh.close()


def test_unusable_directory_raises_spool_error(tmp_path: Path) -> None:
    from agent.spool import SpoolError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpoolError):
        SpoolBuffer(blocker / "spool")


# --------------------------------------------------------------------------- torn and corrupt data


async def test_torn_last_record_is_truncated_and_its_seq_reused(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    buf = SpoolBuffer(d, segment_bytes=1 << 20)
    frames = fill(buf, 10)
    buf.close()
    last = segments(d)[-1]
    size = last.stat().st_size
    with open(last, "r+b") as f:
        f.truncate(size - 7)  # half-written final record (power cut)
    again = SpoolBuffer(d, segment_bytes=1 << 20)
    assert again.newest_seq == 9 and again.truncated_bytes > 0 and again.epoch == buf.epoch
    items = await drain(again, 1)
    assert [i.seq for i in items] == list(range(1, 10))
    assert all(i.frame_bytes == frames[i.seq] for i in items)
    fill(again, 1)
    assert again.newest_seq == 10
    again.close()


async def test_bad_checksum_ends_the_log_there(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    buf = SpoolBuffer(d, segment_bytes=1 << 20)
    fill(buf, 10)
    buf.close()
    seg = segments(d)[-1]
    data = bytearray(seg.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the last frame's payload
    seg.write_bytes(bytes(data))
    again = SpoolBuffer(d, segment_bytes=1 << 20)
    assert again.newest_seq == 9 and again.truncated_bytes > 0
    again.close()


async def test_corrupt_older_segment_keeps_newest_run_gap_and_security_frames(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    buf = SpoolBuffer(d, max_bytes=1 << 20, segment_bytes=3000)
    frames = fill(buf, 80, prio_every=4)
    buf.close()
    segs = segments(d)
    assert len(segs) >= 4
    second = segs[1]
    data = bytearray(second.read_bytes())
    data[70] ^= 0x55  # inside its first record: the rest of this segment is unreadable
    second.write_bytes(bytes(data))
    again = SpoolBuffer(d, max_bytes=1 << 20, segment_bytes=3000)
    first_kept = int(segs[2].name[4:24])
    assert again.newest_seq == 80 and again.evicted > 0
    items = await drain(again, 1)
    got_frames = [i.seq for i in items if i.gap is None]
    # Everything from the third segment on, and below it only the security frames.
    assert [s for s in got_frames if s >= first_kept] == list(range(first_kept, 81))
    below = [s for s in got_frames if s < first_kept]
    assert below and all(s % 4 == 0 for s in below)
    held = set(got_frames)
    gaps = [i.gap for i in items if i.gap is not None]
    covered = {s for g in gaps for s in range(g.first_seq, g.last_seq + 1)}
    assert held | covered == set(range(1, 81)) and not held & covered
    assert all(i.frame_bytes == frames[i.seq] for i in items if i.gap is None)
    again.close()


@settings(max_examples=int(os.environ.get("GPUSOC_FUZZ_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cuts=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
       truncate=st.integers(0, 400))
def test_random_damage_never_crashes_and_never_invents_frames(tmp_path: Path, cuts: list[tuple[int, int]],
                                                             truncate: int) -> None:
    d = tmp_path / f"spool-{uuid.uuid4().hex}"
    buf = SpoolBuffer(d, max_bytes=1 << 20, segment_bytes=2500, fsync=False)
    frames = fill(buf, 30, prio_every=5)
    buf.close()
    segs = segments(d)
    for pos, val in cuts:
        seg = segs[pos % len(segs)]
        data = bytearray(seg.read_bytes())
        if data:
            data[pos % len(data)] = val
        seg.write_bytes(bytes(data))
    last = segs[-1]
    last.write_bytes(last.read_bytes()[: max(0, last.stat().st_size - truncate)])
    again = SpoolBuffer(d, max_bytes=1 << 20, segment_bytes=2500, fsync=False)
    items = asyncio.run(drain(again, 1, idle_s=0.01))
    for i in items:
        if i.gap is None:
            assert i.frame_bytes == frames[i.seq], "a damaged spool returned bytes that were never written"
    if again.epoch == buf.epoch:
        fill(again, 2)  # and it keeps working
    again.close()


# --------------------------------------------------------------------------- bounds, priority, acknowledgement


async def test_hard_bound_drops_oldest_segments_with_a_gap(tmp_path: Path) -> None:
    buf = SpoolBuffer(tmp_path / "s", max_bytes=16_000, segment_bytes=4000, fsync=False)
    fill(buf, 200)  # ~70 KB of frames, nothing acknowledged, no security frames
    assert buf.nbytes <= buf.hard_max_bytes + 4000
    assert buf.evicted > 0 and buf.oldest_seq == buf.evicted + 1
    items = await drain(buf, 1)
    assert summary(items)[0] == ("gap", 1, buf.oldest_seq - 1, "evicted")
    assert [i.seq for i in items[1:]] == list(range(buf.oldest_seq, 201))
    cursor, gaps = buf.start_cursor(buf.epoch, 0, False)
    assert cursor == 1 and gaps == []  # the stream announces the evicted range, as above


async def test_unacknowledged_data_is_kept_beyond_the_soft_bound(tmp_path: Path) -> None:
    buf = SpoolBuffer(tmp_path / "s", max_bytes=16_000, segment_bytes=4000, fsync=False)
    fill(buf, 100)  # ~22 KB: over the soft bound, under the hard one
    assert buf.max_bytes < buf.nbytes < buf.hard_max_bytes and buf.evicted == 0
    assert buf.acknowledge(buf.epoch, 50)
    assert buf.acked_seq == 50 and buf.evicted > 0
    assert buf.oldest_seq <= 51  # nothing above the acknowledged position went
    assert buf.nbytes <= buf.max_bytes or buf.oldest_seq > 1


def test_acknowledge_rejects_other_epochs_and_unsent_positions(tmp_path: Path) -> None:
    buf = SpoolBuffer(tmp_path / "s", fsync=False)
    fill(buf, 5)
    assert not buf.acknowledge("f" * 32, 3)
    assert not buf.acknowledge(buf.epoch, 6)  # beyond what any console could have received
    assert not buf.acknowledge(buf.epoch, 0)
    assert buf.acknowledge(buf.epoch, 4) and buf.acknowledge(buf.epoch, 2)
    assert buf.acked_seq == 4  # never moves back


def test_age_bound_applies_to_acknowledged_data_only(tmp_path: Path) -> None:
    buf = SpoolBuffer(tmp_path / "s", max_bytes=1 << 20, max_age_s=60, segment_bytes=3000, fsync=False)
    fill(buf, 40)
    later = time.time_ns() + 3600 * 10**9
    buf._enforce_bounds(later)  # an hour on: nothing acknowledged, nothing goes
    assert buf.evicted == 0
    buf.acknowledge(buf.epoch, 40)
    buf._enforce_bounds(later)
    assert len(list((tmp_path / "s").glob("seg-*.log"))) == 1 and buf.evicted > 0


async def test_security_frames_outlive_metrics_under_pressure(tmp_path: Path) -> None:
    d = tmp_path / "s"
    buf = SpoolBuffer(d, max_bytes=16_000, segment_bytes=4000, fsync=False)
    kinds = ("command_executed", "file_changed", "record_mismatch", "xid", "gpu_lost")
    frames = {}
    for _ in range(300):
        s = buf.next_seq
        k = (kinds[(s // 10) % len(kinds)],) if s % 10 == 0 else ()
        frames[s] = frame_bytes(s, buf.epoch, k)
        buf.append_nowait(s, frames[s])
    assert buf.evicted > 0 and buf.rescued > 0
    prio_seqs = [s for s in range(10, 301, 10)]
    items = await drain(buf, 1)
    held = [i.seq for i in items if i.gap is None]
    assert set(prio_seqs) <= set(held), "a security frame was dropped while metric frames remain"
    assert held[0] == 10 and all(s % 10 == 0 for s in held if s < buf._segments[0].first_seq)
    gaps = [i.gap for i in items if i.gap is not None]
    covered = {s for g in gaps for s in range(g.first_seq, g.last_seq + 1)}
    assert covered | set(held) == set(range(1, 301)) and not covered & set(held)
    assert all(g.reason == "evicted" for g in gaps)
    # the rescued frames survive a restart too
    buf.close()
    again = SpoolBuffer(d, max_bytes=16_000, segment_bytes=4000, fsync=False)
    again_held = [i.seq for i in await drain(again, 1) if i.gap is None]
    assert again_held == held
    # once a console has stored them, they are released
    again.acknowledge(again.epoch, 150)
    assert (d / PRIO_FILE).stat().st_size < 4000 and again.oldest_seq > 150
    again.close()


def test_security_frames_go_last_when_they_alone_exceed_the_hard_bound(tmp_path: Path) -> None:
    buf = SpoolBuffer(tmp_path / "s", max_bytes=8_000, segment_bytes=2000, fsync=False)
    fill(buf, 200, prio_every=1)  # every frame is a security frame
    assert buf.nbytes <= buf.hard_max_bytes + 2000
    assert buf.evicted > 0 and buf.newest_seq == 200


def test_priority_detection_is_exact() -> None:
    assert is_priority_frame(frame_bytes(1, kinds=("command_refused",)))
    assert is_priority_frame(frame_bytes(1, kinds=("xid",)))
    assert not is_priority_frame(frame_bytes(1, kinds=("process_start", "agent_start")))
    assert not is_priority_frame(frame_bytes(1, host="xid-host"))  # the token alone is not enough
    assert encode_record(1, 2, 0, b"x") != encode_record(1, 2, 1, b"x")


# --------------------------------------------------------------------------- over gRPC: durable position


class Store:
    """FrameStore in memory; `checkpointed` is what it reports as durable (x-gpusoc-durable)."""

    def __init__(self) -> None:
        self.frames: dict[tuple[str, str, int], bytes | None] = {}
        self.gaps: list[tuple[str, Gap]] = []
        self.checkpointed: dict[str, tuple[str, int]] = {}
        self.accepting = True

    def submit_frame(self, frame: Frame, received_at_ns: int, address: str = "") -> None:
        self.frames.setdefault((frame.host, frame.epoch, frame.seq), None)

    def submit_gap(self, host: str, gap: Gap) -> None:
        self.gaps.append((host, gap))

    def submit_description(self, address: str, desc: Description) -> None:
        pass

    def last_committed(self, host: str) -> tuple[str, int] | None:
        keys = [k for k in self.frames if k[0] == host]
        return max(keys, key=lambda k: k[2])[1:] if keys else None  # type: ignore[return-value]

    def last_checkpointed(self, host: str) -> tuple[str, int] | None:
        return self.checkpointed.get(host)

    def seqs(self, host: str) -> list[int]:
        return sorted(k[2] for k in self.frames if k[0] == host)

    def epochs(self, host: str) -> set[str]:
        return {k[1] for k in self.frames if k[0] == host}


async def _wait(pred, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_console_durable_position_reaches_the_spool(tmp_path: Path) -> None:
    from agent.collect.simulated import SimulatedCollector
    from agent.runtime import AgentRuntime
    from agent.serve import run_server
    from console.ingest.client import AgentClient

    buf = SpoolBuffer(tmp_path / "s", fsync=False)
    rt = AgentRuntime("gpu-a", SimulatedCollector(2, host="gpu-a"), buf, 0.1)
    for _ in range(8):
        await rt.tick()
    server, port = await run_server(rt)
    store = Store()
    store.checkpointed["gpu-a"] = (buf.epoch, 5)
    client = AgentClient(f"127.0.0.1:{port}", store, None)
    task = asyncio.create_task(client.run())
    await _wait(lambda: len(store.frames) == 8)
    assert buf.acked_seq == 5
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await server.stop(0)
    buf.close()


# --------------------------------------------------------------------------- a real agent process, kill -9


def free_port() -> int:
    """A free loopback port in 30000-39999 (away from the demo soak's ports)."""
    for _ in range(200):
        port = random.randint(30000, 39999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 30000-39999")


def start_agents(specs: list[tuple[str, int]], state: Path, interval: float = 0.1, gpus: int = 2,
                 log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """This module as a process serving spool-backed simulated agents (HOST:PORT each)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--agents", ",".join(f"{h}:{p}" for h, p in specs),
           "--state", str(state), "--interval", str(interval), "--gpus", str(gpus)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_listening(ports: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"agent on port {port} did not start")
            time.sleep(0.05)


async def describe(port: int) -> Description:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(serde.DESCRIBE_METHOD, request_serializer=lambda _: serde.encode_describe_request(),
                              response_deserializer=serde.decode_description)
        desc: Description = await call(None, timeout=10)
        return desc


@contextlib.contextmanager
def reaped(*procs: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


async def test_agent_killed_mid_stream_restarts_on_its_spool_without_loss(tmp_path: Path) -> None:
    from console.ingest.client import AgentClient

    port = free_port()
    state = tmp_path / "state"
    proc = start_agents([("spool-a", port)], state, log_path=tmp_path / "agent.log")
    procs = [proc]
    with reaped(*procs):
        wait_listening([port])
        store = Store()
        client = AgentClient(f"127.0.0.1:{port}", store, None)
        task = asyncio.create_task(client.run())
        for _ in range(3):  # three crashes at random points of the stream
            await _wait(lambda: len(store.frames) >= 10)
            await asyncio.sleep(random.uniform(0.2, 1.5))
            procs[-1].send_signal(signal.SIGKILL)
            procs[-1].wait(10)
            await asyncio.sleep(random.uniform(0.0, 0.5))
            procs.append(start_agents([("spool-a", port)], state, log_path=tmp_path / "agent.log"))
            wait_listening([port])
        desc = await describe(port)
        await _wait(lambda: len(store.seqs("spool-a")) and store.seqs("spool-a")[-1] >= desc.newest_seq, 60)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for p in procs:
            if p.poll() is None:
                p.kill()
    seqs = store.seqs("spool-a")
    assert store.epochs("spool-a") == {desc.epoch}, "the agent restarted with a new epoch"
    assert seqs == list(range(1, seqs[-1] + 1)), "a spooled frame was lost across kill -9"
    assert store.gaps == [] and client.stats.missing == 0


# --------------------------------------------------------------------------- the agent process itself


async def _serve(specs: list[tuple[str, int]], state: Path, interval: float, gpus: int) -> None:
    from agent.collect.simulated import SimulatedCollector
    from agent.runtime import AgentRuntime
    from agent.serve import run_server

    runtimes, servers, spools = [], [], []
    for host, port in specs:
        spool = SpoolBuffer(state / host / "spool", max_bytes=64 << 20)
        rt = AgentRuntime(host, SimulatedCollector(gpus, host=host), spool, interval)
        server, _ = await run_server(rt, port=port)
        runtimes.append(rt)
        servers.append(server)
        spools.append(spool)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(rt.run()) for rt in runtimes]
    await stop.wait()
    for rt in runtimes:
        rt.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    for spool in spools:
        await spool.aclose()
    await asyncio.gather(*(s.stop(0.5) for s in servers))


def main(argv: list[str] | None = None) -> int:
    import logging

    ap = argparse.ArgumentParser(description="spool-backed simulated agents for fault tests")
    ap.add_argument("--agents", required=True, help="HOST:PORT[,HOST:PORT...]")
    ap.add_argument("--state", required=True, type=Path)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--gpus", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agents[%(process)d] %(name)s: %(message)s")
    specs = [(h, int(p)) for h, p in (a.rsplit(":", 1) for a in args.agents.split(","))]
    asyncio.run(_serve(specs, args.state, args.interval, args.gpus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
