"""The one place that converts between protobuf messages and plain Python.

Frames are encoded once by the agent and the bytes are reused for every subscriber;
a stream item wraps those bytes without re-serializing them. Decoding validates
shapes so that a malformed frame raises `WireError` instead of reaching storage.
"""

from __future__ import annotations

import math

import numpy as np
from google.protobuf.message import DecodeError

from protos.types import (
    METRIC_NAMES,
    METRIC_SCHEMA,
    N_METRICS,
    Description,
    Event,
    Frame,
    Gap,
    GpuInfo,
    GpuProcess,
    SubscribeRequest,
    TrainRecord,
    WireError,
)
from protos.v1 import agent_pb2, telemetry_pb2

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
SUBSCRIBE_METHOD = f"/{SERVICE_NAME}/Subscribe"
DESCRIBE_METHOD = f"/{SERVICE_NAME}/Describe"

# Largest frame a console accepts: 64 GPUs x 16 metrics is 4 KiB; records and events dominate.
MAX_FRAME_BYTES = 4 * 1024 * 1024
_MAX_GPUS = 1024

# SubscribeResponse field numbers, for wrapping pre-encoded frames (see wrap_frame).
_FRAME_FIELD = agent_pb2.SubscribeResponse.DESCRIPTOR.fields_by_name["frame"].number
_LEN_DELIMITED = 2


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_FRAME_TAG = _varint((_FRAME_FIELD << 3) | _LEN_DELIMITED)


def metric_names_from_proto() -> list[str]:
    """Column names as the .proto enum declares them, to check protos.types against."""
    values = telemetry_pb2.Metric.DESCRIPTOR.values
    return [v.name.removeprefix("METRIC_").lower() for v in sorted(values, key=lambda v: v.number) if v.number]


# ---------------------------------------------------------------- frames


def encode_frame(frame: Frame) -> bytes:
    """Serialize a frame once; the agent buffers these bytes."""
    values = np.ascontiguousarray(frame.gpu_values, dtype="<f4")
    if values.ndim != 2 or values.shape[1] != N_METRICS or values.shape[0] != len(frame.gpu_index):
        raise WireError(f"gpu_values shape {values.shape} does not match {len(frame.gpu_index)} GPUs")
    msg = telemetry_pb2.Frame(
        host=frame.host,
        epoch=frame.epoch,
        seq=frame.seq,
        ts_unix_ns=frame.ts_unix_ns,
        simulated=frame.simulated,
        metric_schema=frame.metric_schema,
        n_gpus=values.shape[0],
        n_metrics=values.shape[1],
        gpu_values=values.tobytes(),
        gpu_index=frame.gpu_index,
        gpu_state=frame.gpu_state,  # type: ignore[arg-type]
        sdk_dropped=frame.sdk_dropped,
    )
    for p in frame.processes:
        msg.processes.add(gpu_index=p.gpu_index, pid=p.pid, used_memory_mib=p.used_memory_mib)
    for r in frame.train:
        msg.train.add(
            ts_unix_ns=r.ts_unix_ns,
            job_id=r.job_id,
            rank=r.rank,
            local_rank=r.local_rank,
            world_size=r.world_size,
            pid=r.pid,
            uid=r.uid,
            step=r.step,
            loss=r.loss,
            grad_norm=r.grad_norm,
            lr=r.lr,
            tokens=r.tokens,
            extra=r.extra,
            kind=r.kind,
            info=r.info,
        )
    for e in frame.events:
        msg.events.add(
            ts_unix_ns=e.ts_unix_ns,
            kind=e.kind,
            severity=e.severity,
            gpu_index=e.gpu_index,
            pid=e.pid,
            detail=e.detail,
            attrs=e.attrs,
        )
    return msg.SerializeToString()


def _frame_from_msg(msg: telemetry_pb2.Frame) -> Frame:
    if not msg.host:
        raise WireError("frame has no host")
    if not msg.epoch:
        raise WireError("frame has no epoch")
    if msg.seq < 1:
        raise WireError("frame seq must be >= 1")
    if msg.metric_schema != METRIC_SCHEMA:
        raise WireError(f"unknown metric schema {msg.metric_schema} (this build reads {METRIC_SCHEMA})")
    n, m = msg.n_gpus, msg.n_metrics
    if m != N_METRICS or n > _MAX_GPUS:
        raise WireError(f"frame shape {n}x{m} is not {N_METRICS} metrics for at most {_MAX_GPUS} GPUs")
    if len(msg.gpu_values) != n * m * 4:
        raise WireError(f"gpu_values holds {len(msg.gpu_values)} bytes, expected {n * m * 4}")
    if len(msg.gpu_index) != n or len(msg.gpu_state) != n:
        raise WireError("gpu_index/gpu_state length differs from n_gpus")
    values = np.frombuffer(msg.gpu_values, dtype="<f4").reshape(n, m)
    return Frame(
        host=msg.host,
        epoch=msg.epoch,
        seq=msg.seq,
        ts_unix_ns=msg.ts_unix_ns,
        simulated=msg.simulated,
        gpu_values=values,
        gpu_index=list(msg.gpu_index),
        gpu_state=list(msg.gpu_state),
        processes=[GpuProcess(p.gpu_index, p.pid, p.used_memory_mib) for p in msg.processes],
        train=[
            TrainRecord(
                ts_unix_ns=r.ts_unix_ns,
                job_id=r.job_id,
                rank=r.rank,
                local_rank=r.local_rank,
                world_size=r.world_size,
                pid=r.pid,
                uid=r.uid,
                step=r.step,
                loss=r.loss,
                grad_norm=r.grad_norm,
                lr=r.lr,
                tokens=r.tokens,
                extra=dict(r.extra),
                kind=r.kind or "log",
                info=dict(r.info),
            )
            for r in msg.train
        ],
        events=[
            Event(
                ts_unix_ns=e.ts_unix_ns,
                kind=e.kind,
                severity=e.severity,
                gpu_index=e.gpu_index,
                pid=e.pid,
                detail=e.detail,
                attrs=dict(e.attrs),
            )
            for e in msg.events
        ],
        sdk_dropped=msg.sdk_dropped,
        metric_schema=msg.metric_schema,
    )


def decode_frame(data: bytes) -> Frame:
    """Parse and validate one frame; raises WireError on anything malformed."""
    if len(data) > MAX_FRAME_BYTES:
        raise WireError(f"frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    msg = telemetry_pb2.Frame()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise WireError(f"undecodable frame: {exc}") from exc
    return _frame_from_msg(msg)


# ---------------------------------------------------------------- stream items


def wrap_frame(frame_bytes: bytes) -> bytes:
    """A SubscribeResponse holding an already-encoded frame, without re-serializing it."""
    return _FRAME_TAG + _varint(len(frame_bytes)) + frame_bytes


def encode_gap(gap: Gap) -> bytes:
    """A SubscribeResponse holding a gap record."""
    return agent_pb2.SubscribeResponse(
        gap=telemetry_pb2.Gap(
            epoch=gap.epoch,
            first_seq=gap.first_seq,
            last_seq=gap.last_seq,
            reason=gap.reason,
            ts_unix_ns=gap.ts_unix_ns,
        )
    ).SerializeToString()


def decode_stream_item(data: bytes) -> Frame | Gap:
    """Parse one Subscribe stream item into a Frame or a Gap; WireError if it is neither."""
    msg = agent_pb2.SubscribeResponse()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise WireError(f"undecodable stream item: {exc}") from exc
    which = msg.WhichOneof("item")
    if which == "frame":
        return _frame_from_msg(msg.frame)
    if which == "gap":
        g = msg.gap
        if not g.epoch or g.first_seq < 1:
            raise WireError("gap without epoch or first_seq")
        return Gap(g.epoch, g.first_seq, g.last_seq, g.reason, g.ts_unix_ns)
    raise WireError("stream item holds neither frame nor gap")


# ---------------------------------------------------------------- requests


def encode_subscribe_request(req: SubscribeRequest) -> bytes:
    return agent_pb2.SubscribeRequest(
        epoch=req.epoch, after_seq=req.after_seq, from_now=req.from_now
    ).SerializeToString()


def decode_subscribe_request(data: bytes) -> SubscribeRequest:
    msg = agent_pb2.SubscribeRequest()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise WireError(f"undecodable SubscribeRequest: {exc}") from exc
    return SubscribeRequest(epoch=msg.epoch, after_seq=msg.after_seq, from_now=msg.from_now)


def encode_describe_request() -> bytes:
    return agent_pb2.DescribeRequest().SerializeToString()


def decode_describe_request(data: bytes) -> None:
    try:
        agent_pb2.DescribeRequest().ParseFromString(data)
    except DecodeError as exc:
        raise WireError(f"undecodable DescribeRequest: {exc}") from exc


def encode_description(d: Description) -> bytes:
    return agent_pb2.DescribeResponse(
        host=d.host,
        agent_version=d.agent_version,
        epoch=d.epoch,
        simulated=d.simulated,
        gpus=[
            agent_pb2.GpuInfo(
                index=g.index,
                name=g.name,
                uuid=g.uuid,
                memory_total_mib=g.memory_total_mib if not math.isnan(g.memory_total_mib) else 0.0,
                driver_version=g.driver_version,
                pci_bus_id=g.pci_bus_id,
            )
            for g in d.gpus
        ],
        capabilities=d.capabilities,
        metric_names=d.metric_names,
        metric_schema=d.metric_schema,
        sample_interval_s=d.sample_interval_s,
        oldest_seq=d.oldest_seq,
        newest_seq=d.newest_seq,
        nvml_status=d.nvml_status,
    ).SerializeToString()


def decode_description(data: bytes) -> Description:
    msg = agent_pb2.DescribeResponse()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise WireError(f"undecodable DescribeResponse: {exc}") from exc
    return Description(
        host=msg.host,
        agent_version=msg.agent_version,
        epoch=msg.epoch,
        simulated=msg.simulated,
        gpus=[
            GpuInfo(g.index, g.name, g.uuid, g.memory_total_mib, g.driver_version, g.pci_bus_id)
            for g in msg.gpus
        ],
        capabilities=list(msg.capabilities),
        metric_names=list(msg.metric_names),
        metric_schema=msg.metric_schema,
        sample_interval_s=msg.sample_interval_s,
        oldest_seq=msg.oldest_seq,
        newest_seq=msg.newest_seq,
        nvml_status=msg.nvml_status,
    )


def protobuf_backend() -> str:
    """'upb' in a healthy install; the pure-Python fallback parses ~500x slower."""
    from google.protobuf.internal import api_implementation

    return str(api_implementation.Type())


__all__ = [
    "DESCRIBE_METHOD",
    "METRIC_NAMES",
    "SERVICE_NAME",
    "SUBSCRIBE_METHOD",
    "decode_description",
    "decode_frame",
    "decode_stream_item",
    "decode_subscribe_request",
    "encode_description",
    "encode_frame",
    "encode_gap",
    "encode_subscribe_request",
    "wrap_frame",
]
