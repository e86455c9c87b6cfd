"""The agent's gRPC server: Subscribe, Describe, Acknowledge, the control RPCs and the health service.

Handlers exchange bytes produced by `protos.serde`; frames are encoded once when they are
made and the same bytes go to every subscriber. Command, ListCheckpoints and ControlState
go to an `agent.act.controller.Controller` when one is given (docs/response.md); without
one they answer FAILED_PRECONDITION. `run_server(port=0)` is the test helper.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from agent.runtime import AgentRuntime
from protos import serde
from protos.types import SEVERITY_WARNING, AckResult, Event, WireError

if TYPE_CHECKING:
    from agent.act.commands import Peer
    from agent.act.controller import Controller

log = logging.getLogger("gpusoc.agent.serve")

MAX_SUBSCRIBERS = 32
DURABLE_METADATA_KEY = "x-gpusoc-durable"  # the console's durably stored position, "EPOCH:SEQ"
# Keepalive: notice a dead console within ~30 s; allow consoles to ping every 10 s.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024),
    # A second agent on a port in use must fail, not share connections with the first.
    ("grpc.so_reuseport", 0),
]


def _identity(b: bytes) -> bytes:
    return b


def peer_of(context: grpc.aio.ServicerContext) -> Peer:
    """The TLS peer: authenticated only when the handshake verified a client certificate.

    The server's credentials already require that certificate to chain to the console CA;
    a plaintext (insecure) connection is never authenticated.
    """
    from agent.act.commands import Peer

    try:
        auth = context.auth_context() or {}
    except Exception:  # a context without transport details
        auth = {}
    transport = b"".join(auth.get("transport_security_type", [])).decode(errors="replace")
    names = list(auth.get("x509_common_name", []))
    name = names[0].decode(errors="replace") if names else ""
    has_cert = bool(auth.get("x509_pem_cert")) and context.peer_identities() is not None
    return Peer(authenticated=transport == "ssl" and has_cert, name=name or context.peer(), transport=transport)


def acknowledge_position(buffer: object, epoch: str, seq: int) -> AckResult:
    """Tell a spool that a console durably stored everything of `epoch` up to `seq`.

    Data at or below that position may then be evicted first (docs/reliability.md). The spool
    ignores other epochs and positions beyond what it sent (accepted False); a buffer without
    `acknowledge` (the in-memory FrameBuffer) takes nothing: (False, 0). Shared by the
    `x-gpusoc-durable` metadata on Subscribe and the Acknowledge RPC.
    """
    acknowledge = getattr(buffer, "acknowledge", None)
    if acknowledge is None:
        return AckResult(accepted=False, acked_seq=0)
    accepted = bool(acknowledge(epoch, seq))
    return AckResult(accepted=accepted, acked_seq=int(getattr(buffer, "acked_seq", 0)))


def parse_durable_position(value: object) -> tuple[str, int] | None:
    """`EPOCH:SEQ` from the `x-gpusoc-durable` metadata; None when malformed."""
    if not isinstance(value, str):
        return None
    epoch, _, seq = value.rpartition(":")
    if epoch and seq.isdigit() and len(seq) < 20:
        return epoch, int(seq)
    return None


def apply_durable_position(buffer: object, context: grpc.aio.ServicerContext) -> None:
    """Apply the console's durably stored position sent as metadata `x-gpusoc-durable: EPOCH:SEQ`.

    Malformed values are ignored; see `acknowledge_position` for the rest.
    """
    if getattr(buffer, "acknowledge", None) is None:
        return
    for key, value in context.invocation_metadata() or ():
        if key == DURABLE_METADATA_KEY:
            position = parse_durable_position(value)
            if position is not None:
                acknowledge_position(buffer, *position)


class AgentService:
    """Subscribe/Describe handlers over an AgentRuntime's buffer, plus the control RPCs."""

    def __init__(self, runtime: AgentRuntime, control: Controller | None = None) -> None:
        self.runtime = runtime
        self.control = control
        self.subscribers = 0

    async def subscribe(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            req = serde.decode_subscribe_request(request)
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        buf = self.runtime.buffer
        apply_durable_position(buf, context)
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
        desc = self.runtime.describe()
        if self.control is not None:
            desc.capabilities = [
                *desc.capabilities,
                "commands",
                "checkpoints",
                f"command_key:{self.control.key_id}",
            ]
        return serde.encode_description(desc)

    async def acknowledge(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """The console's durably stored position, reported while its stream is open.

        Same authorization as Subscribe (the transport's mTLS): a position can only allow the
        eviction of data this agent already sent, and the spool ignores anything beyond that.
        """
        try:
            epoch, seq = serde.decode_acknowledge_request(request)
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return b""
        result = acknowledge_position(self.runtime.buffer, epoch, seq)
        log.debug("acknowledge %s:%d from %s: accepted=%s acked_seq=%d", epoch[:8], seq, context.peer(),
                  result.accepted, result.acked_seq)
        return serde.encode_ack_result(result)

    async def _no_control(self, context: grpc.aio.ServicerContext, what: str) -> None:
        peer = peer_of(context)
        self.runtime.add_event(
            Event(
                ts_unix_ns=time.time_ns(),
                kind="command_refused",
                severity=SEVERITY_WARNING,
                detail=f"{what} refused: control commands are not configured on this agent",
                attrs={"check": "config", "reason": "no operator CA configured", "peer": peer.name},
            )
        )
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION, "control commands are not configured on this agent (operator_ca)"
        )

    async def command(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Signed command in, signed receipt out; refusals are receipts too (and events)."""
        if self.control is None:
            await self._no_control(context, "Command")
            return b""
        from agent.act.controller import UnknownCommand

        try:
            req = serde.decode_command_request(request)
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return b""
        try:
            receipt = await self.control.handle(req, peer_of(context))
        except UnknownCommand as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no command {exc.args[0]!r} on this agent")
            return b""
        return serde.encode_signed_receipt(receipt)

    async def list_checkpoints(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if self.control is None:
            await self._no_control(context, "ListCheckpoints")
            return b""
        try:
            job, deep = serde.decode_list_checkpoints_request(request)
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return b""
        control, peer = self.control, peer_of(context)
        try:
            listing = await asyncio.get_running_loop().run_in_executor(
                None, control.list_checkpoints, job, deep, peer
            )
        except PermissionError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            return b""
        return serde.encode_checkpoint_list(listing)

    async def control_state(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if self.control is None:
            await self._no_control(context, "ControlState")
            return b""
        try:
            serde.decode_control_state_request(request)
        except WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return b""
        return serde.encode_control_state(self.control.control_state())

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
                "Acknowledge": grpc.unary_unary_rpc_method_handler(
                    self.acknowledge, request_deserializer=_identity, response_serializer=_identity
                ),
                "Command": grpc.unary_unary_rpc_method_handler(
                    self.command, request_deserializer=_identity, response_serializer=_identity
                ),
                "ListCheckpoints": grpc.unary_unary_rpc_method_handler(
                    self.list_checkpoints, request_deserializer=_identity, response_serializer=_identity
                ),
                "ControlState": grpc.unary_unary_rpc_method_handler(
                    self.control_state, request_deserializer=_identity, response_serializer=_identity
                ),
            },
        )


async def start_server(runtime: AgentRuntime, listen: str,
                       credentials: grpc.ServerCredentials | None,
                       control: Controller | None = None) -> tuple[grpc.aio.Server, int]:
    """Start serving on `listen` (HOST:PORT, port 0 = any); credentials None = plaintext.

    `control` enables Command/ListCheckpoints/ControlState. Returns the server and the bound port.
    """
    server = grpc.aio.server(options=SERVER_OPTIONS)
    service = AgentService(runtime, control)
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
                     credentials: grpc.ServerCredentials | None = None,
                     control: Controller | None = None) -> tuple[grpc.aio.Server, int]:
    """Test helper in the style of gRPC's examples: serve on a free loopback port."""
    return await start_server(runtime, f"{host}:{port}", credentials, control)
