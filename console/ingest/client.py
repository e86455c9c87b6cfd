"""One subscriber per agent: connect, check identity, resume from the last stored position.

Reconnects use jittered exponential backoff so a console restart does not storm the fleet.
Malformed frames are rejected and logged, never stored; a frame claiming another host is
rejected. When the store stops accepting (disk full), the client stops reading and the
agent keeps the data in its buffer until the store recovers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from console.ingest.sink import (
    CONNECTED,
    CONNECTING,
    DISCONNECTED,
    GAP,
    LAGGING,
    PAUSED,
    REJECTED,
    HostStatus,
    IngestSink,
)
from console.ingest.tls import ConsoleTls
from protos import serde
from protos.types import AckResult, Description, Frame, Gap, SubscribeRequest, WireError

log = logging.getLogger("gpusoc.console.ingest")

# gRPC metadata on Subscribe: "EPOCH:SEQ" this console has durably stored (agent/serve.py reads it).
# While the stream is open the same position is reported periodically over the Acknowledge RPC.
DURABLE_METADATA_KEY = "x-gpusoc-durable"

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 15_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", serde.MAX_FRAME_BYTES + 1024),
    # Our own backoff governs reconnects; keep gRPC's from piling on top of it.
    ("grpc.initial_reconnect_backoff_ms", 1000),
    ("grpc.max_reconnect_backoff_ms", 30_000),
]


class FrameStore(Protocol):
    """What a client needs from the store writer (console.store.writer.StoreWriter)."""

    @property
    def accepting(self) -> bool: ...

    def submit_frame(self, frame: Frame, received_at_ns: int, address: str = "") -> None: ...

    def submit_gap(self, host: str, gap: Gap) -> None: ...

    def submit_description(self, address: str, desc: Description) -> None: ...

    def last_committed(self, host: str) -> tuple[str, int] | None: ...


class IdentityError(Exception):
    """The agent is not who the inventory or its certificate says."""


@dataclass
class ClientStats:
    frames: int = 0
    duplicates: int = 0
    rejected: int = 0
    gaps: int = 0
    connects: int = 0
    missing: int = 0
    acks: int = 0  # Acknowledge calls the agent answered


def _tls_hint(exc: BaseException) -> str:
    """What an operator most likely got wrong, for the TLS failures a wrong file produces."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (" (--tls-ca must be the CA that issued the agents' certificates, e.g. pki/agent-ca.pem,"
                " not the console CA)")
    if isinstance(exc, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(exc):
        return " (the agent speaks plaintext: was it started with --insecure? then use --insecure here too)"
    return ""


def _backoff(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Full-jitter exponential backoff (AWS architecture blog): uniform in [0, min(cap, base*2^n)]."""
    return random.uniform(0, min(cap, base * (2**attempt)))


@dataclass
class AgentClient:
    address: str
    store: FrameStore
    tls: ConsoleTls | None  # None = plaintext (only with --insecure)
    expected_name: str = ""
    sink: IngestSink | None = None
    on_status: Callable[[HostStatus], None] | None = None
    stats: ClientStats = field(default_factory=ClientStats)
    host: str = ""
    position: tuple[str, int] | None = None
    status: HostStatus | None = None
    interval_s: float = 1.0
    last_frame_mono: float = 0.0
    last_frame_ns: int = 0
    # While a stream is open, report the durable position over Acknowledge this often (seconds).
    ack_interval_s: float = 10.0

    def __post_init__(self) -> None:
        self._set(CONNECTING if not self.status else self.status.state, "")

    def _set(self, state: str, detail: str) -> None:
        st = HostStatus(self.address, self.host or self.expected_name or self.address, state, detail,
                        self.last_frame_ns)
        if self.status is not None and (self.status.state, self.status.detail) == (state, detail):
            return
        self.status = st
        if state in (DISCONNECTED, REJECTED):
            log.warning("%s (%s): %s %s", self.address, st.host, state, detail)
        else:
            log.debug("%s (%s): %s %s", self.address, st.host, state, detail)
        if self.on_status:
            self.on_status(st)
        if self.sink:
            self.sink.on_status(st)

    def check_lag(self) -> None:
        """Called periodically: a connected stream with no frame for 3 intervals is lagging."""
        if not (self.status and self.status.state == CONNECTED and self.last_frame_mono):
            return
        silent = time.monotonic() - self.last_frame_mono
        if silent > max(3 * self.interval_s, 3.0):
            self._set(LAGGING, f"no frame for {silent:.0f} s")

    async def run(self, initial_delay: float = 0.0) -> None:
        """Connect and stream until cancelled, reconnecting with backoff."""
        if initial_delay:
            await asyncio.sleep(initial_delay)
        attempt = 0
        while True:
            try:
                await self._session()
                attempt = 0
            except asyncio.CancelledError:
                raise
            except IdentityError as exc:
                self._set(REJECTED, str(exc))
                attempt = min(attempt + 1, 8)
                await asyncio.sleep(max(_backoff(attempt), 30.0))
                continue
            except grpc.aio.AioRpcError as exc:
                self._set(DISCONNECTED, f"{exc.code().name}: {exc.details()}")
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                self._set(DISCONNECTED, f"{type(exc).__name__}: {exc}{_tls_hint(exc)}")
            attempt = min(attempt + 1, 8)
            await asyncio.sleep(_backoff(attempt))

    async def _identity(self) -> str:
        if self.tls is None:
            return ""
        return await self.tls.peer_identity(self.address)

    async def _session(self) -> None:
        self._set(CONNECTING, "")
        identity = await self._identity()
        if self.expected_name and identity and identity != self.expected_name:
            raise IdentityError(f"certificate says {identity!r}, inventory expects {self.expected_name!r}")
        if self.tls is None:
            channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        else:
            channel = grpc.aio.secure_channel(self.address, self.tls.channel_credentials(), options=CHANNEL_OPTIONS)
        async with channel:
            describe = channel.unary_unary(serde.DESCRIBE_METHOD,
                                           request_serializer=lambda _: serde.encode_describe_request(),
                                           response_deserializer=serde.decode_description)
            desc: Description = await describe(None, timeout=10)
            if identity and desc.host != identity:
                raise IdentityError(f"agent calls itself {desc.host!r} but its certificate says {identity!r}")
            if not identity and self.expected_name and desc.host != self.expected_name:
                raise IdentityError(f"agent calls itself {desc.host!r}, inventory expects {self.expected_name!r}")
            self.host = identity or desc.host
            self.interval_s = desc.sample_interval_s or 1.0
            self.store.submit_description(self.address, desc)
            if self.sink:
                self.sink.on_description(self.address, desc)
            if self.position is None:
                self.position = self.store.last_committed(self.host)
            epoch, after = self.position or ("", 0)
            subscribe = channel.unary_stream(serde.SUBSCRIBE_METHOD, request_serializer=serde.encode_subscribe_request,
                                             response_deserializer=lambda b: b)
            durable = self._durable_position()
            metadata = ((DURABLE_METADATA_KEY, f"{durable[0]}:{durable[1]}"),) if durable else None
            call = subscribe(SubscribeRequest(epoch=epoch, after_seq=after), metadata=metadata)
            self.stats.connects += 1
            self._set(CONNECTED, f"resumed after {epoch[:8]}:{after}" if epoch else "from oldest held")
            acks = asyncio.create_task(self._ack_loop(channel, durable), name=f"ack {self.address}")
            try:
                async for raw in call:
                    await self._handle(raw)
            finally:
                acks.cancel()
                await asyncio.gather(acks, return_exceptions=True)

    async def _ack_loop(self, channel: grpc.aio.Channel, reported: tuple[str, int] | None) -> None:
        """While the stream is open, tell the agent what the store holds durably (Acknowledge).

        Sends `_durable_position()` every `ack_interval_s` when it differs from the last position
        the agent accepted (`reported` starts as the one sent on Subscribe). Failures never touch
        the stream: they are logged at debug and retried next time. An agent without the method
        (UNIMPLEMENTED) gets no more acknowledgements in this session.
        """
        if self.ack_interval_s <= 0:
            return
        acknowledge = channel.unary_unary(serde.ACKNOWLEDGE_METHOD,
                                          request_serializer=lambda p: serde.encode_acknowledge_request(*p),
                                          response_deserializer=serde.decode_ack_result)
        timeout = max(1.0, min(10.0, self.ack_interval_s))
        while True:
            await asyncio.sleep(self.ack_interval_s)
            try:
                position = self._durable_position()
            except Exception as exc:  # e.g. the store is stopping: try again next interval
                log.debug("%s (%s): durable position unavailable: %s", self.address, self.host, exc)
                continue
            if position is None or position == reported or position[1] < 1:
                continue
            try:
                result: AckResult = await acknowledge(position, timeout=timeout)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.info("%s (%s): agent has no Acknowledge RPC; its spool learns the durable position "
                             "only on (re)subscribe", self.address, self.host)
                    return
                log.debug("%s (%s): acknowledge %s:%d failed: %s %s", self.address, self.host, position[0][:8],
                          position[1], exc.code().name, exc.details())
                continue
            except Exception as exc:  # e.g. an undecodable answer: the next interval tries again
                log.debug("%s (%s): acknowledge %s:%d failed: %s", self.address, self.host, position[0][:8],
                          position[1], exc)
                continue
            self.stats.acks += 1
            if result.accepted:
                reported = position
            else:
                log.debug("%s (%s): agent did not accept durable position %s:%d (acked %d)", self.address,
                          self.host, position[0][:8], position[1], result.acked_seq)

    def _durable_position(self) -> tuple[str, int] | None:
        """What the store holds durably for this host, for the agent's spool (docs/reliability.md).

        The checkpointed position when the store tracks one (its WAL alone may not replay),
        else the committed one; the agent may evict data at or below it first.
        """
        checkpointed = getattr(self.store, "last_checkpointed", None)
        if checkpointed is not None:
            pos: tuple[str, int] | None = checkpointed(self.host)
            return pos
        return self.store.last_committed(self.host)

    async def _handle(self, raw: bytes) -> None:
        while not self.store.accepting:
            self._set(PAUSED, "store is not accepting (see collector status); agent keeps buffering")
            await asyncio.sleep(0.25)
        try:
            item = serde.decode_stream_item(raw)
        except WireError as exc:
            self.stats.rejected += 1
            log.error("%s (%s): rejected malformed frame: %s", self.address, self.host, exc)
            return
        now = time.time_ns()
        if isinstance(item, Gap):
            self.stats.gaps += 1
            self.store.submit_gap(self.host, item)
            if self.sink:
                self.sink.on_gap(self.host, item)
            if self.position is not None and item.epoch == self.position[0] and item.last_seq:
                self.position = (item.epoch, max(self.position[1], item.last_seq))  # recorded once, not again
            self._set(GAP, f"agent no longer holds {item.epoch[:8]}:{item.first_seq}..{item.last_seq or 'end'}"
                      f" ({item.reason})")
            return
        frame = item
        if frame.host != self.host:
            self.stats.rejected += 1
            log.error("%s: rejected frame claiming host %r (certified identity %r)", self.address, frame.host,
                      self.host)
            return
        pos = self.position
        if pos is not None and pos[0] == frame.epoch:
            if frame.seq <= pos[1]:
                self.stats.duplicates += 1
                return
            if frame.seq > pos[1] + 1:
                # Frames skipped without a gap record (e.g. a malformed one was rejected): record it.
                missing = Gap(frame.epoch, pos[1] + 1, frame.seq - 1, "missing", now)
                self.stats.missing += frame.seq - 1 - pos[1]
                self.store.submit_gap(self.host, missing)
        try:
            self.store.submit_frame(frame, now, self.address)
        except ValueError as exc:  # the store refuses a frame the wire check let through
            self.stats.rejected += 1
            log.error("%s (%s): store refused frame %s:%d: %s", self.address, self.host, frame.epoch[:8],
                      frame.seq, exc)
            return
        self.position = (frame.epoch, frame.seq)
        self.stats.frames += 1
        self.last_frame_mono = time.monotonic()
        self.last_frame_ns = now
        if self.sink:
            self.sink.on_frame(frame)
        if self.status is not None and self.status.state != CONNECTED:
            self._set(CONNECTED, "")
