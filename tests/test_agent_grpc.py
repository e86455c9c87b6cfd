"""A simulated agent over real gRPC: subscribe, resume without loss, gaps, describe, health."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.buffer import FrameBuffer
from agent.collect.simulated import SimulatedCollector
from agent.runtime import AgentRuntime
from agent.serve import run_server
from protos import serde
from protos.types import Frame, Gap, SubscribeRequest


def _subscribe(channel: grpc.aio.Channel):  # type: ignore[no-untyped-def]
    return channel.unary_stream(serde.SUBSCRIBE_METHOD, request_serializer=serde.encode_subscribe_request,
                                response_deserializer=serde.decode_stream_item)


async def _take(call, n: int) -> list:  # type: ignore[no-untyped-def]
    out = []
    async for item in call:
        out.append(item)
        if len(out) == n:
            call.cancel()
            break
    return out


@pytest.fixture
async def agent():  # type: ignore[no-untyped-def]
    rt = AgentRuntime("sim-host-1", SimulatedCollector(4, host="sim-host-1"), FrameBuffer(max_frames=50), 0.1)
    server, port = await run_server(rt)
    yield rt, port
    await server.stop(0)


async def test_stream_resume_and_describe(agent) -> None:  # type: ignore[no-untyped-def]
    rt, port = agent
    for _ in range(10):
        await rt.tick()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        first = await _take(_subscribe(ch)(SubscribeRequest()), 6)
        assert [f.seq for f in first] == [1, 2, 3, 4, 5, 6]
        assert all(isinstance(f, Frame) and f.simulated and f.host == "sim-host-1" for f in first)
        # "Disconnect" after 6, more frames arrive, reconnect from the last stored position.
        for _ in range(5):
            await rt.tick()
        rest = await _take(_subscribe(ch)(SubscribeRequest(first[-1].epoch, 6)), 9)
        assert [f.seq for f in rest] == list(range(7, 16))
        desc = serde.decode_description(await ch.unary_unary(
            serde.DESCRIBE_METHOD, request_serializer=lambda _: serde.encode_describe_request(),
            response_deserializer=lambda b: b)(None))
        assert desc.host == "sim-host-1" and desc.simulated and len(desc.gpus) == 4
        assert desc.newest_seq == 15 and desc.epoch == first[0].epoch
        health = health_pb2_grpc.HealthStub(ch)
        resp = await health.Check(health_pb2.HealthCheckRequest(service=serde.SERVICE_NAME))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_live_frames_follow_ticks(agent) -> None:  # type: ignore[no-untyped-def]
    rt, port = agent
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = _subscribe(ch)(SubscribeRequest(from_now=True))
        reader = asyncio.create_task(_take(call, 3))
        await asyncio.sleep(0.2)
        for _ in range(3):
            await rt.tick()
        got = await asyncio.wait_for(reader, 5)
        assert [f.seq for f in got] == [1, 2, 3]


async def test_gap_when_range_is_gone(agent) -> None:  # type: ignore[no-untyped-def]
    rt, port = agent
    for _ in range(60):  # buffer holds 50
        await rt.tick()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        got = await _take(_subscribe(ch)(SubscribeRequest(rt.buffer.epoch, 3)), 2)
    assert isinstance(got[0], Gap) and (got[0].first_seq, got[0].last_seq, got[0].reason) == (4, 10, "evicted")
    assert isinstance(got[1], Frame) and got[1].seq == 11


async def test_malformed_request_is_invalid_argument(agent) -> None:  # type: ignore[no-untyped-def]
    _, port = agent
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        raw = ch.unary_stream(serde.SUBSCRIBE_METHOD, request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in raw(b"\xff\xff\xff"):
                pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_future_position_is_out_of_range(agent) -> None:  # type: ignore[no-untyped-def]
    rt, port = agent
    await rt.tick()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in _subscribe(ch)(SubscribeRequest(rt.buffer.epoch, 99)):
                pass
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
