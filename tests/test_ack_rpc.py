"""The Acknowledge RPC: the console reports its durable position while one stream stays open.

docs/reliability.md (the durable-position protocol): without it the agent learns what a console
stored only at (re)subscribe, and its spool's soft bounds never apply on a long-lived stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from agent.buffer import FrameBuffer
from agent.collect.simulated import SimulatedCollector
from agent.runtime import AgentRuntime
from agent.serve import AgentService, acknowledge_position, parse_durable_position, run_server
from agent.spool import SpoolBuffer
from console.ingest.client import AgentClient
from protos import serde
from protos.types import AckResult, Description, Frame, Gap, WireError
from protos.v1 import agent_pb2

HOST = "gpu-ack"


class Store:
    """FrameStore in memory; `checkpointed` is what it reports as durably stored."""

    def __init__(self) -> None:
        self.seqs: dict[str, list[int]] = {}
        self.epoch = ""
        self.gaps: list[Gap] = []
        self.checkpointed: dict[str, tuple[str, int]] = {}
        self.accepting = True

    def submit_frame(self, frame: Frame, received_at_ns: int, address: str = "") -> None:
        self.epoch = frame.epoch
        self.seqs.setdefault(frame.host, []).append(frame.seq)

    def submit_gap(self, host: str, gap: Gap) -> None:
        self.gaps.append(gap)

    def submit_description(self, address: str, desc: Description) -> None:
        pass

    def last_committed(self, host: str) -> tuple[str, int] | None:
        seqs = self.seqs.get(host)
        return (self.epoch, max(seqs)) if seqs else None

    def last_checkpointed(self, host: str) -> tuple[str, int] | None:
        return self.checkpointed.get(host)

    def newest(self, host: str = HOST) -> int:
        return max(self.seqs.get(host, [0]))


async def wait_for(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def ticks(rt: AgentRuntime, n: int) -> None:
    for _ in range(n):
        await rt.tick()


async def call_acknowledge(port: int, request: bytes) -> AckResult:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        ack = channel.unary_unary(
            serde.ACKNOWLEDGE_METHOD, request_serializer=lambda b: b, response_deserializer=serde.decode_ack_result
        )
        result: AckResult = await ack(request, timeout=10)
        return result


# --------------------------------------------------------------------------- serde


def test_acknowledge_request_and_result_round_trip() -> None:
    epoch = "ab" * 16
    data = serde.encode_acknowledge_request(epoch, 2**63 + 5)
    assert serde.decode_acknowledge_request(data) == (epoch, 2**63 + 5)
    msg = agent_pb2.AcknowledgeRequest.FromString(data)
    assert (msg.epoch, msg.seq) == (epoch, 2**63 + 5)

    for result in (AckResult(True, 41), AckResult(False, 0), AckResult(False, 7)):
        assert serde.decode_ack_result(serde.encode_ack_result(result)) == result
    assert serde.decode_ack_result(b"") == AckResult(False, 0)
    assert serde.ACKNOWLEDGE_METHOD == "/gpusoc.v1.AgentService/Acknowledge"


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xff\xff",  # not protobuf
        b"\x0a\x05ab",  # field 1 claims 5 bytes, holds 2
        b"",  # no epoch, no seq
        serde.encode_acknowledge_request("e" * 32, 0),  # seq 0 is no position
        serde.encode_acknowledge_request("", 5),  # no epoch
        serde.encode_acknowledge_request("e" * 1000, 5),  # not an epoch
    ],
)
def test_malformed_acknowledge_request_is_a_wire_error(data: bytes) -> None:
    with pytest.raises(WireError):
        serde.decode_acknowledge_request(data)


def test_malformed_ack_result_is_a_wire_error() -> None:
    with pytest.raises(WireError):
        serde.decode_ack_result(b"\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")  # varint too long
    with pytest.raises(WireError):
        serde.decode_ack_result(b"\x0a")  # length-delimited field 1 without its length


def test_durable_metadata_and_rpc_share_one_path(tmp_path: Path) -> None:
    assert parse_durable_position("ab:12") == ("ab", 12)
    assert parse_durable_position("a:b:12") == ("a:b", 12)
    for bad in ("12", ":12", "ab:", "ab:-1", "ab:1x", "ab:" + "9" * 20, b"ab:12", None):
        assert parse_durable_position(bad) is None
    assert acknowledge_position(FrameBuffer(), "e" * 32, 1) == AckResult(False, 0)
    buf = SpoolBuffer(tmp_path / "s", fsync=False)
    try:
        assert acknowledge_position(buf, buf.epoch, 1) == AckResult(False, 0)  # nothing sent yet
    finally:
        buf.close()


# --------------------------------------------------------------------------- end to end


async def test_one_long_lived_stream_keeps_acknowledging_and_soft_bound_applies(tmp_path: Path) -> None:
    buf = SpoolBuffer(tmp_path / "s", max_bytes=24_000, max_age_s=0, segment_bytes=3000, fsync=False)
    rt = AgentRuntime(HOST, SimulatedCollector(2, host=HOST), buf, 0.1)
    server, port = await run_server(rt)
    store = Store()
    client = AgentClient(f"127.0.0.1:{port}", store, None, ack_interval_s=0.2)
    task = asyncio.create_task(client.run())
    try:
        await ticks(rt, 10)
        await wait_for(lambda: store.newest() == 10)
        assert client.stats.connects == 1
        assert buf.acked_seq == 0  # nothing was durable when the stream opened

        # The store checkpoints during the stream: the agent learns it without a resubscribe.
        store.checkpointed[HOST] = (buf.epoch, 6)
        await wait_for(lambda: buf.acked_seq == 6, timeout=10)
        await ticks(rt, 10)
        await wait_for(lambda: store.newest() == 20)
        store.checkpointed[HOST] = (buf.epoch, 20)
        await wait_for(lambda: buf.acked_seq == 20, timeout=10)
        # The agent applies an ack before the client has read the answer: wait for the client's count.
        await wait_for(lambda: client.stats.acks >= 2, timeout=10)
        acks = client.stats.acks

        # Unchanged position: no more calls.
        await asyncio.sleep(0.7)
        assert client.stats.acks == acks

        # Over the soft bound: what is acknowledged may go, nothing after it does.
        for _ in range(2000):
            await rt.tick()
            if buf.nbytes > buf.max_bytes:
                break
        assert buf.max_bytes < buf.nbytes < buf.hard_max_bytes
        await wait_for(lambda: store.newest() == buf.newest_seq)
        assert buf.oldest_seq <= 21  # unacknowledged data is kept beyond the soft bound
        # Once stored, the periodic report lets the soft bound evict it.
        newest = buf.newest_seq
        store.checkpointed[HOST] = (buf.epoch, newest)
        await wait_for(lambda: buf.acked_seq == newest, timeout=10)
        assert buf.oldest_seq > 21 and buf.evicted == buf.oldest_seq - 1
        assert buf.nbytes <= buf.max_bytes
        assert client.stats.connects == 1  # the same stream throughout
        assert store.seqs[HOST] == list(range(1, newest + 1))
        assert store.gaps == []
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop(0)
        buf.close()


async def test_acknowledge_rpc_answers_with_the_spool_position(tmp_path: Path) -> None:
    buf = SpoolBuffer(tmp_path / "s", fsync=False)
    rt = AgentRuntime(HOST, SimulatedCollector(1, host=HOST), buf, 0.1)
    await ticks(rt, 5)
    server, port = await run_server(rt)
    try:
        assert await call_acknowledge(port, serde.encode_acknowledge_request(buf.epoch, 3)) == AckResult(True, 3)
        assert buf.acked_seq == 3
        # Never backwards; another epoch or an unsent seq is not accepted.
        assert await call_acknowledge(port, serde.encode_acknowledge_request(buf.epoch, 2)) == AckResult(True, 3)
        assert await call_acknowledge(port, serde.encode_acknowledge_request("f" * 32, 5)) == AckResult(False, 3)
        assert await call_acknowledge(port, serde.encode_acknowledge_request(buf.epoch, 6)) == AckResult(False, 3)
        assert buf.acked_seq == 3
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call_acknowledge(port, b"\xff\xff")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop(0)
        buf.close()


async def test_a_buffer_without_acknowledge_answers_not_accepted() -> None:
    buf = FrameBuffer()
    rt = AgentRuntime(HOST, SimulatedCollector(1, host=HOST), buf, 0.1)
    await ticks(rt, 5)
    server, port = await run_server(rt)
    try:
        result = await call_acknowledge(port, serde.encode_acknowledge_request(buf.epoch, 3))
        assert result == AckResult(False, 0)
    finally:
        await server.stop(0)


class _OldAgentService(AgentService):
    """An agent from before the Acknowledge RPC."""

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            serde.SERVICE_NAME,
            {
                "Subscribe": grpc.unary_stream_rpc_method_handler(
                    self.subscribe, request_deserializer=lambda b: b, response_serializer=lambda b: b
                ),
                "Describe": grpc.unary_unary_rpc_method_handler(
                    self.describe, request_deserializer=lambda b: b, response_serializer=lambda b: b
                ),
            },
        )


async def test_an_old_agent_without_the_rpc_keeps_streaming(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    buf = SpoolBuffer(tmp_path / "s", fsync=False)
    rt = AgentRuntime(HOST, SimulatedCollector(1, host=HOST), buf, 0.1)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_OldAgentService(rt).handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    store = Store()
    client = AgentClient(f"127.0.0.1:{port}", store, None, ack_interval_s=0.1)
    task = asyncio.create_task(client.run())
    caplog.set_level(logging.INFO, logger="gpusoc.console.ingest")
    try:
        await ticks(rt, 3)
        await wait_for(lambda: store.newest() == 3)
        store.checkpointed[HOST] = (buf.epoch, 3)
        await wait_for(lambda: any("no Acknowledge RPC" in r.getMessage() for r in caplog.records), timeout=10)
        store.checkpointed[HOST] = (buf.epoch, 2)  # changed again: still nothing sent to this agent
        await ticks(rt, 3)
        await wait_for(lambda: store.newest() == 6)
        await asyncio.sleep(0.4)
        assert sum("no Acknowledge RPC" in r.getMessage() for r in caplog.records) == 1
        assert client.stats.connects == 1 and client.stats.acks == 0
        assert buf.acked_seq == 0
        assert store.seqs[HOST] == [1, 2, 3, 4, 5, 6]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop(0)
        buf.close()
