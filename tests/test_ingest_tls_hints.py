"""A console pointed at the wrong CA says which file is wrong, not just "certificate verify failed"."""

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
from console.ingest.sink import DISCONNECTED
from console.ingest.tls import ConsoleTls
from tests.test_ingest import MemoryStore


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    create_dev_pki(out, agents=["gpu-a"], consoles=["ops"])
    return out


async def test_console_ca_instead_of_agent_ca_is_named(pki: Path) -> None:
    rt = AgentRuntime("gpu-a", SimulatedCollector(1, host="gpu-a"), FrameBuffer(max_frames=10), 0.1)
    creds = server_credentials(pki / "agents" / "gpu-a.pem", pki / "agents" / "gpu-a.key", pki / "console-ca.pem")
    server, port = await run_server(rt, credentials=creds)
    consoles = pki / "consoles"
    wrong = ConsoleTls(str(pki / "console-ca.pem"), str(consoles / "ops.pem"), str(consoles / "ops.key"))
    client = AgentClient(f"127.0.0.1:{port}", MemoryStore(), wrong)
    task = asyncio.create_task(client.run())
    try:
        for _ in range(200):
            if client.status is not None and client.status.state == DISCONNECTED:
                break
            await asyncio.sleep(0.05)
        assert client.status is not None and client.status.state == DISCONNECTED
        assert "must be the CA that issued the agents' certificates" in client.status.detail
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop(0)
