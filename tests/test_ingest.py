"""Console ingest against real agents over mTLS: identity, resume, rejection, backoff, inventory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.buffer import FrameBuffer
from agent.collect.simulated import SimulatedCollector
from agent.pki import create_dev_pki, server_credentials
from agent.runtime import AgentRuntime
from agent.serve import run_server
from console.ingest.client import AgentClient
from console.ingest.fleet import AgentSource, FleetIngest
from console.ingest.inventory import InventoryError, InventoryFile, parse_inventory
from console.ingest.sink import CONNECTED, REJECTED
from console.ingest.tls import ConsoleTls
from protos.types import Description, Frame, Gap


class MemoryStore:
    """The FrameStore protocol in memory, with the same idempotency rule as the DuckDB ledger."""

    def __init__(self) -> None:
        self.frames: dict[tuple[str, str, int], Frame] = {}
        self.gaps: list[tuple[str, Gap]] = []
        self.descriptions: dict[str, Description] = {}
        self.accepting = True

    def submit_frame(self, frame: Frame, received_at_ns: int, address: str = "") -> None:
        self.frames.setdefault((frame.host, frame.epoch, frame.seq), frame)

    def submit_gap(self, host: str, gap: Gap) -> None:
        self.gaps.append((host, gap))

    def submit_description(self, address: str, desc: Description) -> None:
        self.descriptions[address] = desc

    def last_committed(self, host: str) -> tuple[str, int] | None:
        keys = [k for k in self.frames if k[0] == host]
        return max(keys, key=lambda k: k[2])[1:] if keys else None  # type: ignore[return-value]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    create_dev_pki(out, agents=["gpu-a", "gpu-b"], consoles=["ops"])
    return out


def _tls(pki: Path) -> ConsoleTls:
    return ConsoleTls(str(pki / "agent-ca.pem"), str(pki / "consoles" / "ops.pem"), str(pki / "consoles" / "ops.key"))


async def _agent(pki: Path, cert_name: str, claimed_host: str):  # type: ignore[no-untyped-def]
    rt = AgentRuntime(claimed_host, SimulatedCollector(2, host=claimed_host), FrameBuffer(max_frames=100), 0.1)
    creds = server_credentials(pki / "agents" / f"{cert_name}.pem", pki / "agents" / f"{cert_name}.key",
                               pki / "console-ca.pem")
    server, port = await run_server(rt, credentials=creds)
    return rt, server, port


async def _wait(pred, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_mtls_stream_then_resume_without_loss_or_duplicates(pki: Path) -> None:
    rt, server, port = await _agent(pki, "gpu-a", "gpu-a")
    store = MemoryStore()
    client = AgentClient(f"127.0.0.1:{port}", store, _tls(pki), expected_name="gpu-a")
    for _ in range(5):
        await rt.tick()
    task = asyncio.create_task(client.run())
    await _wait(lambda: len(store.frames) == 5)
    assert client.status is not None and client.status.state == CONNECTED and client.host == "gpu-a"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    for _ in range(4):  # produced while the console is away
        await rt.tick()
    task = asyncio.create_task(client.run())
    await _wait(lambda: len(store.frames) == 9)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert sorted(k[2] for k in store.frames) == list(range(1, 10))
    assert client.stats.duplicates == 0 and client.stats.rejected == 0 and store.gaps == []
    await server.stop(0)


async def test_new_console_resumes_from_store_position(pki: Path) -> None:
    rt, server, port = await _agent(pki, "gpu-a", "gpu-a")
    for _ in range(6):
        await rt.tick()
    store = MemoryStore()
    store.frames[("gpu-a", rt.buffer.epoch, 4)] = None  # type: ignore[assignment]  # stored by an earlier run
    client = AgentClient(f"127.0.0.1:{port}", store, _tls(pki))
    task = asyncio.create_task(client.run())
    await _wait(lambda: len(store.frames) == 3)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert sorted(k[2] for k in store.frames) == [4, 5, 6]
    await server.stop(0)


async def test_agent_claiming_another_host_is_rejected(pki: Path) -> None:
    # Certificate says gpu-b, the agent claims to be gpu-a: nothing may be stored.
    rt, server, port = await _agent(pki, "gpu-b", "gpu-a")
    await rt.tick()
    store = MemoryStore()
    client = AgentClient(f"127.0.0.1:{port}", store, _tls(pki))
    task = asyncio.create_task(client.run())
    await _wait(lambda: client.status is not None and client.status.state == REJECTED)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert store.frames == {} and "certificate says 'gpu-b'" in client.status.detail
    await server.stop(0)


async def test_inventory_name_must_match_certificate(pki: Path) -> None:
    _, server, port = await _agent(pki, "gpu-a", "gpu-a")
    store = MemoryStore()
    client = AgentClient(f"127.0.0.1:{port}", store, _tls(pki), expected_name="gpu-b")
    task = asyncio.create_task(client.run())
    await _wait(lambda: client.status is not None and client.status.state == REJECTED)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert store.frames == {}
    await server.stop(0)


async def test_epoch_change_records_gap_and_continues(pki: Path) -> None:
    rt, server, port = await _agent(pki, "gpu-a", "gpu-a")
    for _ in range(3):
        await rt.tick()
    store = MemoryStore()
    client = AgentClient(f"127.0.0.1:{port}", store, _tls(pki))
    task = asyncio.create_task(client.run())
    await _wait(lambda: len(store.frames) == 3)
    # Agent restarts: new buffer, new epoch, same port.
    await server.stop(0)
    rt2 = AgentRuntime("gpu-a", SimulatedCollector(2, host="gpu-a"), FrameBuffer(max_frames=100), 0.1)
    for _ in range(2):
        await rt2.tick()
    creds = server_credentials(pki / "agents" / "gpu-a.pem", pki / "agents" / "gpu-a.key", pki / "console-ca.pem")
    server2, _ = await run_server(rt2, port=port, credentials=creds)
    await _wait(lambda: len(store.frames) == 5, timeout=40)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert [(g.reason, g.first_seq, g.last_seq) for _, g in store.gaps] == [("epoch_changed", 4, 0)]
    await server2.stop(0)


async def test_unreachable_agent_does_not_stall_others(pki: Path, tmp_path: Path) -> None:
    rt, server, port = await _agent(pki, "gpu-a", "gpu-a")
    for _ in range(3):
        await rt.tick()
    inv = tmp_path / "fleet.txt"
    inv.write_text(f"127.0.0.1:1 dead-host\n127.0.0.1:{port} gpu-a\n")
    store = MemoryStore()
    fleet = FleetIngest(AgentSource([str(inv)]), store, _tls(pki), poll_s=0.1)
    task = asyncio.create_task(fleet.run())
    await _wait(lambda: len(store.frames) == 3)
    states = {s.host: s.state for s in fleet.statuses()}
    assert states["gpu-a"] == CONNECTED and states["dead-host"] in ("disconnected", "connecting")
    fleet.stop()
    await asyncio.wait_for(task, 5)
    await server.stop(0)


def test_inventory_parsing_and_errors(tmp_path: Path) -> None:
    entries = parse_inventory("# c\n10.0.0.1:7443 gpu1\n[::1]:7443\n")
    assert [e.address for e in entries] == ["10.0.0.1:7443", "[::1]:7443"]
    with pytest.raises(InventoryError, match=":2: 'nonsense' is not HOST:PORT"):
        parse_inventory("a:1\nnonsense\n", "f")
    f = tmp_path / "inv"
    f.write_text("h:1\n")
    inv = InventoryFile(f)
    assert inv.poll() and [e.address for e in inv.entries] == ["h:1"]
    f.write_text("h:1\nbroken line here\n")
    assert not inv.poll() and inv.entries[0].address == "h:1" and "expected" in inv.last_error
