"""Fault tests of the whole data path: collector kill -9 loop, network partition, console disk full, clock skew.

Each test checks the DuckDB frames ledger at the end: every (host, epoch) holds contiguous seqs
from 1 to at least what the agents reported as newest, no duplicates (the PRIMARY KEY, plus the
per-frame sample rows), and no hole that a gap row does not cover. Agents are spool-backed
(agent/spool.py) simulated agents in a subprocess (tests/test_spool.py run as a script) or in
this process. CI runs short versions; the full runs are the same tests with:

    GPUSOC_FAULT_KILLS=50    collector kill -9 loop iterations (CI: 10)
    GPUSOC_PARTITION_S=600   partition length in seconds (CI: 10)
    GPUSOC_FAULT_SEED=N      replay a run's random kill moments (printed by each run)
    GPUSOC_FAULT_REPORT=F    append one JSON line of figures per test to F (docs/reliability.md)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pytest
from test_spool import ROOT, describe, free_port, reaped, start_agents, wait_listening

from agent.collect.simulated import SimulatedCollector
from agent.runtime import AgentRuntime
from agent.serve import run_server
from agent.spool import SpoolBuffer
from console.ingest.fleet import AgentSource, FleetIngest
from console.ingest.sink import PAUSED
from console.store.writer import StoreWriter
from protos import serde

KILLS = int(os.environ.get("GPUSOC_FAULT_KILLS", "10"))
PARTITION_S = float(os.environ.get("GPUSOC_PARTITION_S", "10"))
SEED = int(os.environ.get("GPUSOC_FAULT_SEED", str(random.randrange(1 << 30))))
GPUS = 2


def report(test: str, **figures: object) -> None:
    """Print the figures (pytest -s shows them) and append them to $GPUSOC_FAULT_REPORT."""
    line = json.dumps({"test": test, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seed": SEED, **figures})
    print(line)
    path = os.environ.get("GPUSOC_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


# --------------------------------------------------------------------------- the ledger check


@dataclass
class Ledger:
    frames: int = 0
    gap_rows: int = 0
    holes: int = 0
    per_host: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # host -> (epoch, min, max)


def check_ledger(db: Path, newest: dict[str, tuple[str, int]], gpus: int = GPUS, allow_gaps: bool = False) -> Ledger:
    """Assert the store holds every frame each agent made, exactly once; returns the figures."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        out = Ledger()
        rows = con.execute("SELECT host, epoch, seq FROM frames ORDER BY host, epoch, seq").fetchall()
        seqs: dict[tuple[str, str], list[int]] = {}
        for host, epoch, seq in rows:
            seqs.setdefault((host, epoch), []).append(int(seq))
        gaps: dict[tuple[str, str], set[int]] = {}
        for host, epoch, first, last in con.execute("SELECT host, epoch, first_seq, last_seq FROM gaps").fetchall():
            if last >= first:
                gaps.setdefault((host, epoch), set()).update(range(int(first), int(last) + 1))
        out.gap_rows = int(con.execute("SELECT count(*) FROM gaps").fetchone()[0])  # type: ignore[index]
        out.frames = len(rows)
        for host, (epoch, newest_seq) in newest.items():
            got = seqs.get((host, epoch), [])
            assert got, f"{host}: nothing stored for epoch {epoch[:8]}"
            assert len(got) == len(set(got)), f"{host}: duplicate seqs"
            assert got[-1] >= newest_seq, f"{host}: stored up to {got[-1]}, the agent had {newest_seq}"
            held = set(got)
            missing = set(range(1, got[-1] + 1)) - held
            uncovered = missing - gaps.get((host, epoch), set())
            assert not uncovered, f"{host}: {len(uncovered)} seqs lost without a gap row: {sorted(uncovered)[:5]}"
            out.holes += len(missing)
            out.per_host[host] = (epoch, got[0], got[-1])
            assert len([k for k in seqs if k[0] == host]) == 1, f"{host}: more than one epoch stored"
        if not allow_gaps:
            assert out.gap_rows == 0 and out.holes == 0, f"unexpected gaps: {out.gap_rows} rows, {out.holes} seqs"
        dup = con.execute(
            "SELECT count(*) FROM (SELECT host, epoch, seq, count(*) AS n FROM gpu_samples GROUP BY ALL)"
            f" WHERE n <> {gpus}"
        ).fetchone()
        assert dup is not None and dup[0] == 0, "a frame's GPU samples were stored twice or partly"
        n_samples = con.execute("SELECT count(*) FROM gpu_samples").fetchone()
        assert n_samples is not None and n_samples[0] == gpus * out.frames
        dup_ev = con.execute(
            "SELECT count(*) FROM (SELECT host, epoch, seq, kind, detail, count(*) AS n FROM events GROUP BY ALL)"
            " WHERE n > 1"
        ).fetchone()
        assert dup_ev is not None and dup_ev[0] == 0, "an event was stored twice"
        return out
    finally:
        con.close()


async def newest_of(ports: dict[str, int]) -> dict[str, tuple[str, int]]:
    out = {}
    for host, port in ports.items():
        d = await describe(port)
        assert d.host == host
        out[host] = (d.epoch, d.newest_seq)
    return out


@contextlib.contextmanager
def spool_agents(tmp: Path, n: int = 4, interval: float = 0.1) -> Iterator[dict[str, int]]:
    """n spool-backed simulated agents in one subprocess: {host: port}."""
    ports = {f"fault-{i}": free_port() for i in range(n)}
    proc = start_agents(list(ports.items()), tmp / "agent-state", interval=interval, gpus=GPUS,
                        log_path=tmp / "agents.log")
    with reaped(proc):
        wait_listening(list(ports.values()))
        yield ports
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)


# --------------------------------------------------------------------------- (a) collector kill -9 loop


def _collector(addrs: list[str], db: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "console.cli", "collect", "--agents", *addrs, "--db", str(db), "--insecure",
           "--status-every", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


@pytest.mark.timeout(120 + KILLS * 10)
async def test_collector_kill9_loop_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    db = tmp_path / "console.duckdb"
    log = tmp_path / "collector.log"
    t0 = time.monotonic()
    wal_at_kill = 0
    with spool_agents(tmp_path) as ports:
        addrs = [f"127.0.0.1:{p}" for p in ports.values()]
        for _ in range(KILLS):
            proc = _collector(addrs, db, log)
            with reaped(proc):
                # Random moments: during start-up, connect, resume, steady flushing.
                await asyncio.sleep(rng.uniform(0.2, 4.0))
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            wal_at_kill += Path(str(db) + ".wal").exists()
        newest: dict[str, tuple[str, int]] = {}
        for _attempt in range(3):  # a final clean run, long enough to catch up
            proc = _collector(addrs, db, log)
            with reaped(proc):
                await asyncio.sleep(3.0)
                newest = await newest_of(ports)
                await asyncio.sleep(4.0)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(60) == 0, log.read_text()[-2000:]
            con = duckdb.connect(str(db), read_only=True)
            stored = dict(con.execute("SELECT host, max(seq) FROM frames GROUP BY host").fetchall())
            con.close()
            if all(stored.get(h, 0) >= s for h, (_, s) in newest.items()):
                break
    ledger = check_ledger(db, newest)
    report("collector_kill9_loop", kills=KILLS, agents=len(ports), interval_s=0.1, frames=ledger.frames,
           lost=0, duplicated=0, kills_with_uncheckpointed_wal=wal_at_kill, seconds=round(time.monotonic() - t0, 1))


# --------------------------------------------------------------------------- (b) network partition


class PartitionProxy:
    """A loopback TCP forwarder that can blackhole: bytes and new connections wait, nothing is refused.

    That is what a partition looks like to both ends (no RST, no FIN): keepalives time out and
    retries hang until the network heals, then whatever TCP still holds flows again.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0

    async def start(self) -> int:
        self.port = free_port()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self.port

    def partition(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._open.wait()
            self.connections += 1
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                return
            await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer), return_exceptions=True)
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                await self._open.wait()
                w.write(data)
                await w.drain()
        finally:
            w.close()


@contextlib.asynccontextmanager
async def in_process_collector(db: Path, addrs: list[str], **writer_kw: object) -> AsyncIterator[
        tuple[StoreWriter, FleetIngest]]:
    """StoreWriter + FleetIngest as `gpusoc-console collect` runs them, on this loop."""
    writer = StoreWriter(db, **writer_kw)  # type: ignore[arg-type]
    writer.start()
    fleet = FleetIngest(AgentSource(addrs), writer, None, poll_s=0.2)
    task = asyncio.create_task(fleet.run())
    try:
        yield writer, fleet
    finally:
        fleet.stop()
        await asyncio.wait_for(task, 30)
        writer.flush(30)
        writer.stop()


async def wait_for(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)


def caught_up(writer: StoreWriter, newest: dict[str, tuple[str, int]]) -> bool:
    for host, (epoch, seq) in newest.items():
        pos = writer.last_committed(host)
        if pos is None or pos[0] != epoch or pos[1] < seq:
            return False
    return True


@pytest.mark.timeout(180 + PARTITION_S * 1.5)
async def test_partition_then_heal_delivers_everything(tmp_path: Path) -> None:
    db = tmp_path / "console.duckdb"
    with spool_agents(tmp_path) as ports:
        proxies = {h: PartitionProxy(p) for h, p in ports.items()}
        addrs = [f"127.0.0.1:{await px.start()}" for px in proxies.values()]
        try:
            async with in_process_collector(db, addrs) as (writer, fleet):
                await wait_for(lambda: all((writer.last_committed(h) or ("", 0))[1] >= 20 for h in ports), 60,
                               "first frames")
                before = sum(c.stats.connects for c in fleet.clients.values())
                for px in proxies.values():
                    px.partition()
                t0 = time.monotonic()
                states: set[str] = set()
                while time.monotonic() - t0 < PARTITION_S:
                    await asyncio.sleep(0.5)
                    states |= {s.state for s in fleet.statuses()}
                during = await newest_of(ports)  # what the agents spooled meanwhile (direct, not via proxy)
                for px in proxies.values():
                    px.heal()
                healed = time.monotonic()
                newest = await newest_of(ports)
                await wait_for(lambda: caught_up(writer, newest), 120 + min(PARTITION_S, 60), "catch-up after heal")
                catch_up_s = time.monotonic() - healed
                reconnects = sum(c.stats.connects for c in fleet.clients.values()) - before
        finally:
            for px in proxies.values():
                await px.close()
    ledger = check_ledger(db, newest)
    spooled = sum(s for _, s in during.values())
    report("partition", partition_s=PARTITION_S, agents=len(ports), frames=ledger.frames, lost=0,
           frames_spooled_by_end_of_partition=spooled, reconnects=reconnects, catch_up_s=round(catch_up_s, 1),
           states_seen=sorted(states))


# --------------------------------------------------------------------------- (c) console disk full




@pytest.mark.timeout(150)
async def test_console_disk_full_pauses_then_resumes_without_loss(tmp_path: Path, tiny_fs: Path) -> None:
    db = tiny_fs / "console.duckdb"
    statuses: list[str] = []
    with spool_agents(tmp_path) as ports:
        addrs = [f"127.0.0.1:{p}" for p in ports.values()]
        async with in_process_collector(db, addrs, flush_interval_s=0.1, retry_interval_s=0.3,
                                        on_status=statuses.append, threads=1) as (writer, fleet):
            await wait_for(lambda: all((writer.last_committed(h) or ("", 0))[1] >= 10 for h in ports), 60,
                           "first frames")
            ballast = tiny_fs / "ballast"
            vfs = os.statvfs(tiny_fs)
            ballast.write_bytes(b"\0" * max(vfs.f_bavail * vfs.f_frsize - 200_000, 0))
            await wait_for(lambda: writer.paused, 60, "the store to pause on a full disk")
            await wait_for(lambda: any(s.state == PAUSED for s in fleet.statuses()), 10, "ingest to pause")
            paused_status = writer.status
            client_detail = next(s.detail for s in fleet.statuses() if s.state == PAUSED)
            assert not writer.accepting
            await asyncio.sleep(3)  # agents go on producing and spooling meanwhile
            ballast.unlink()  # the operator frees space
            freed = time.monotonic()
            await wait_for(lambda: writer.accepting, 30, "the store to resume")
            newest = await newest_of(ports)
            await wait_for(lambda: caught_up(writer, newest), 60, "catch-up after the disk was freed")
            resume_s = time.monotonic() - freed
    assert paused_status.startswith("paused: ")
    ledger = check_ledger(db, newest)
    report("console_disk_full", agents=len(ports), frames=ledger.frames, lost=0, writer_status=paused_status,
           client_detail=client_detail, resume_s=round(resume_s, 1),
           status_sequence=[s[:60] for s in statuses][:8])


# --------------------------------------------------------------------------- (d) clock skew


class SkewedSpool(SpoolBuffer):
    """A spool whose host clock is off: every timestamp in each frame is shifted before spooling."""

    skew_ns = 0

    def _shift(self, frame_bytes: bytes) -> bytes:
        f = serde.decode_frame(frame_bytes)
        f.ts_unix_ns += self.skew_ns
        for e in f.events:
            e.ts_unix_ns += self.skew_ns
        for r in f.train:
            r.ts_unix_ns += self.skew_ns
        return serde.encode_frame(f)

    async def append(self, seq: int, frame_bytes: bytes) -> None:
        await super().append(seq, self._shift(frame_bytes))

    def append_nowait(self, seq: int, frame_bytes: bytes) -> None:
        super().append_nowait(seq, self._shift(frame_bytes))


@pytest.mark.timeout(120)
async def test_clock_skew_keeps_order_and_detection(tmp_path: Path) -> None:
    try:
        from console.detect import alerts as K
        from console.detect.engine import DetectionEngine
    except ImportError:  # detection not part of this build
        DetectionEngine = None  # type: ignore[misc,assignment]
    skews_s = {"skew-a": -5.0, "skew-b": -2.0, "skew-c": 2.0, "skew-d": 5.0}
    stepped = "skew-b"  # NTP steps this host's clock back 7 s mid-run
    runtimes: dict[str, AgentRuntime] = {}
    spools: dict[str, SkewedSpool] = {}
    servers = []
    addrs = []
    for host, skew in skews_s.items():
        spool = SkewedSpool(tmp_path / host / "spool", fsync=False)
        spool.skew_ns = int(skew * 1e9)
        rt = AgentRuntime(host, SimulatedCollector(GPUS, host=host), spool, 0.1)
        server, port = await run_server(rt, port=free_port())
        runtimes[host], spools[host] = rt, spool
        servers.append(server)
        addrs.append(f"127.0.0.1:{port}")
    tasks = [asyncio.create_task(rt.run()) for rt in runtimes.values()]
    engine = DetectionEngine() if DetectionEngine is not None else None
    db = tmp_path / "console.duckdb"
    writer = StoreWriter(db)
    writer.start()
    fleet = FleetIngest(AgentSource(addrs), writer, None, sink=engine, poll_s=0.2)
    if engine is not None:
        fleet.add_periodic(engine.evaluate)
    ftask = asyncio.create_task(fleet.run())
    try:
        await wait_for(lambda: all((writer.last_committed(h) or ("", 0))[1] >= 30 for h in skews_s), 60, "warm-up")
        spools[stepped].skew_ns -= 7_000_000_000
        col_d = runtimes["skew-d"].collector
        col_a = runtimes["skew-a"].collector
        assert isinstance(col_d, SimulatedCollector) and isinstance(col_a, SimulatedCollector)
        col_d.inject_xid(1, 79)  # a host 5 s ahead reports an XID
        col_a.lose_gpu(0)  # a host 5 s behind loses a GPU
        if engine is not None:
            eng = engine
            await wait_for(lambda: {(a.kind, a.host) for a in eng.alerts()} >= {(K.XID, "skew-d"),
                                                                                 (K.GPU_LOST, "skew-a")},
                           30, "XID and GPU-lost alerts")
        await asyncio.sleep(1.0)
        newest = {h: (spools[h].epoch, spools[h].newest_seq) for h in skews_s}
        await wait_for(lambda: caught_up(writer, newest), 30, "catch-up")
    finally:
        fleet.stop()
        await asyncio.wait_for(ftask, 30)
        for rt in runtimes.values():
            rt.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(s.stop(0) for s in servers))
        writer.flush(30)
        writer.stop()
    ledger = check_ledger(db, newest)
    con = duckdb.connect(str(db), read_only=True)
    offsets = {}
    for host in skews_s:
        ts, rx = (np.array(c, dtype=np.int64) for c in zip(*con.execute(
            "SELECT epoch_us(ts), epoch_us(received_at) FROM frames WHERE host = ? ORDER BY seq", [host]
        ).fetchall(), strict=True))
        steps_back = int((np.diff(ts) < 0).sum())
        offsets[host] = round(float(np.median(ts - rx)) / 1e6, 1)
        if host == stepped:
            assert steps_back == 1, f"{host}: the clock step should show as exactly one step back in seq order"
        else:
            assert steps_back == 0, f"{host}: timestamps out of order in seq order"
    xid_rows = con.execute("SELECT count(*) FROM events WHERE host = 'skew-d' AND kind = 'xid'").fetchone()
    con.close()
    assert xid_rows is not None and xid_rows[0] == 1
    assert offsets["skew-d"] > 4 and offsets["skew-a"] < -4  # the skew really was on the wire
    alerts = sorted({(a.kind, a.host) for a in engine.alerts()}) if engine is not None else "detection missing"
    report("clock_skew", skews_s=skews_s, stepped_back_s={stepped: 7}, median_ts_minus_received_s=offsets,
           frames=ledger.frames, alerts=alerts)


if __name__ == "__main__":  # pragma: no cover - convenience: run the full versions
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "-s", __file__], cwd=ROOT))

