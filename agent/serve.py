"""The agent's gRPC server: Subscribe, Describe and the standard health service.

Handlers exchange bytes produced by `protos.serde`; frames are encoded once when they are
made and the same bytes go to every subscriber. `run_server(port=0)` is the test helper.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from agent.runtime import AgentRuntime
from protos import serde
from protos.types import WireError

log = logging.getLogger("gpusoc.agent.serve")

MAX_SUBSCRIBERS = 32
# Keepalive: notice a dead console within ~30 s; allow consoles to ping every 10 s.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024),
]


def _identity(b: bytes) -> bytes:
    return b


class AgentService:
    """Subscribe/Describe handlers over an AgentRuntime's buffer."""

    def __init__(self, runtime: AgentRuntime) -> None:
        self.runtime = runtime
        self.subscribers = 0

    async def subscribe(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            req = serde.decode_subscribe_request(request)
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        buf = self.runtime.buffer
        try:
            cursor, gaps = buf.start_cursor(req.epoch, req.after_seq, req.from_now)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))
            return
        if self.subscribers >= MAX_SUBSCRIBERS:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"agent already serves {MAX_SUBSCRIBERS} subscribers")
            return
        self.subscribers += 1
        peer = context.peer()
        log.info("subscriber %s from epoch=%s after_seq=%d (cursor %d)",
                 peer, req.epoch[:8] or "-", req.after_seq, cursor)

        def _done(_: object) -> None:  # cancellation or end of stream
            log.info("subscriber %s left", peer)

        context.add_done_callback(_done)  # type: ignore[arg-type]
        try:
            for gap in gaps:
                yield serde.encode_gap(gap)
            async for item in buf.stream(cursor):
                if item.gap is not None:
                    yield serde.encode_gap(item.gap)
                elif item.frame_bytes is not None:
                    yield serde.wrap_frame(item.frame_bytes)
        finally:
            self.subscribers -= 1

    async def describe(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            serde.decode_describe_request(request)
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return serde.encode_description(self.runtime.describe())

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            serde.SERVICE_NAME,
            {
                "Subscribe": grpc.unary_stream_rpc_method_handler(
                    self.subscribe, request_deserializer=_identity, response_serializer=_identity
                ),
                "Describe": grpc.unary_unary_rpc_method_handler(
                    self.describe, request_deserializer=_identity, response_serializer=_identity
                ),
            },
        )


async def start_server(runtime: AgentRuntime, listen: str,
                       credentials: grpc.ServerCredentials | None) -> tuple[grpc.aio.Server, int]:
    """Start serving on `listen` (HOST:PORT, port 0 = any); credentials None = plaintext.

    Returns the server and the bound port.
    """
    server = grpc.aio.server(options=SERVER_OPTIONS)
    service = AgentService(runtime)
    server.add_generic_rpc_handlers((service.handler(),))
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is None:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, credentials)
    if port == 0:
        raise OSError(f"could not bind {listen}")
    await server.start()
    await health_servicer.set(serde.SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port


async def run_server(runtime: AgentRuntime, port: int = 0, host: str = "127.0.0.1",
                     credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.aio.Server, int]:
    """Test helper in the style of gRPC's examples: serve on a free loopback port."""
    return await start_server(runtime, f"{host}:{port}", credentials)
