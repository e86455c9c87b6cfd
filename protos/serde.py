"""The one place that converts between protobuf messages and plain Python.

Frames are encoded once by the agent and the bytes are reused for every subscriber;
a stream item wraps those bytes without re-serializing them. Decoding validates
shapes so that a malformed frame raises `WireError` instead of reaching storage.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from protos.types import (
    METRIC_NAMES,
    METRIC_SCHEMA,
    N_METRICS,
    PHASE_NAMES,
    AckResult,
    CheckpointInfo,
    CheckpointList,
    CommandEnvelope,
    CommandRequest,
    CommandSignature,
    ControlState,
    Description,
    Event,
    Frame,
    FrozenJob,
    Gap,
    GpuInfo,
    GpuProcess,
    SignedReceipt,
    SubscribeRequest,
    TrainRecord,
    WireError,
)
from protos.v1 import agent_pb2, telemetry_pb2

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
SUBSCRIBE_METHOD = f"/{SERVICE_NAME}/Subscribe"
DESCRIBE_METHOD = f"/{SERVICE_NAME}/Describe"
ACKNOWLEDGE_METHOD = f"/{SERVICE_NAME}/Acknowledge"
COMMAND_METHOD = f"/{SERVICE_NAME}/Command"
LIST_CHECKPOINTS_METHOD = f"/{SERVICE_NAME}/ListCheckpoints"
CONTROL_STATE_METHOD = f"/{SERVICE_NAME}/ControlState"

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
    if frame.train:
        _encode_train(msg.train, frame.train)
    for e in frame.events:
        msg.events.add(
            ts_unix_ns=e.ts_unix_ns,
            kind=e.kind,
            severity=e.severity,
            gpu_index=e.gpu_index,
            pid=e.pid,
            detail=_utf8(e.detail),
            attrs={_utf8(k): _utf8(v) for k, v in e.attrs.items()},
        )
    return msg.SerializeToString()


def _utf8(text: str) -> str:
    """Text protobuf can carry: file names that are not UTF-8 (surrogate-escaped) become `\\xff` escapes.

    Why: an event naming such a file (integrity checks walk user-writable folders) must be
    stored with an escaped name, not make the whole frame unencodable.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text


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
        train=_decode_train(msg.train) if msg.HasField("train") else [],
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


def _encode_train(tb: telemetry_pb2.TrainBatch, records: list[TrainRecord]) -> None:
    """Columns of a TrainBatch from records: one extend per column, not one message per record."""
    tb.ts_unix_ns.extend([r.ts_unix_ns for r in records])
    tb.job_id.extend([r.job_id for r in records])
    tb.rank.extend([r.rank for r in records])
    tb.local_rank.extend([r.local_rank for r in records])
    tb.world_size.extend([r.world_size for r in records])
    tb.pid.extend([r.pid for r in records])
    tb.uid.extend([r.uid for r in records])
    tb.step.extend([r.step for r in records])
    tb.loss.extend([r.loss for r in records])
    tb.grad_norm.extend([r.grad_norm for r in records])
    tb.lr.extend([r.lr for r in records])
    tb.tokens.extend([r.tokens for r in records])
    tb.kind.extend([r.kind for r in records])
    for i, r in enumerate(records):
        for k, v in r.extra.items():
            tb.extra_row.append(i)
            tb.extra_key.append(k)
            tb.extra_value.append(v)
        for k, sv in r.info.items():
            tb.info_row.append(i)
            tb.info_key.append(k)
            tb.info_value.append(sv)


def _decode_train(tb: telemetry_pb2.TrainBatch) -> list[TrainRecord]:
    n = len(tb.ts_unix_ns)
    cols = (tb.job_id, tb.rank, tb.local_rank, tb.world_size, tb.pid, tb.uid, tb.step, tb.loss, tb.grad_norm,
            tb.lr, tb.tokens, tb.kind)
    if any(len(c) != n for c in cols):
        raise WireError("train batch columns differ in length")
    if not len(tb.extra_row) == len(tb.extra_key) == len(tb.extra_value):
        raise WireError("train batch extra columns differ in length")
    if not len(tb.info_row) == len(tb.info_key) == len(tb.info_value):
        raise WireError("train batch info columns differ in length")
    records = [
        TrainRecord(ts, job, rank, local, world, pid, uid, step, loss, gn, lr, tok, {}, kind or "log", {})
        for ts, job, rank, local, world, pid, uid, step, loss, gn, lr, tok, kind in zip(
            tb.ts_unix_ns, *(list(c) for c in cols), strict=True
        )
    ]
    for row, key, value in zip(tb.extra_row, tb.extra_key, tb.extra_value, strict=True):
        if row >= n:
            raise WireError(f"train extra refers to record {row} of {n}")
        records[row].extra[key] = value
    for row, key, sval in zip(tb.info_row, tb.info_key, tb.info_value, strict=True):
        if row >= n:
            raise WireError(f"train info refers to record {row} of {n}")
        records[row].info[key] = sval
    return records


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


# ---------------------------------------------------------------- durable position (docs/reliability.md)

# An epoch is 32 hex characters; anything much longer is not a position.
MAX_EPOCH_CHARS = 128


def encode_acknowledge_request(epoch: str, seq: int) -> bytes:
    """The console's durably stored position (same meaning as the x-gpusoc-durable metadata)."""
    return agent_pb2.AcknowledgeRequest(epoch=epoch, seq=seq).SerializeToString()


def decode_acknowledge_request(data: bytes) -> tuple[str, int]:
    """(epoch, seq); both are required."""
    msg = _parse(agent_pb2.AcknowledgeRequest, data, "AcknowledgeRequest")
    if not msg.epoch or len(msg.epoch) > MAX_EPOCH_CHARS:
        raise WireError("Acknowledge needs an epoch")
    if msg.seq < 1:
        raise WireError("Acknowledge seq must be >= 1")
    return msg.epoch, msg.seq


def encode_ack_result(r: AckResult) -> bytes:
    return agent_pb2.AcknowledgeResponse(accepted=r.accepted, acked_seq=r.acked_seq).SerializeToString()


def decode_ack_result(data: bytes) -> AckResult:
    msg = _parse(agent_pb2.AcknowledgeResponse, data, "AcknowledgeResponse")
    return AckResult(accepted=msg.accepted, acked_seq=msg.acked_seq)


# ---------------------------------------------------------------- control (docs/response.md)

# Bounds checked on decode, before any signature work: a command is a few KiB.
MAX_ENVELOPE_PAYLOAD_BYTES = 16 * 1024
MAX_ENVELOPE_SIGNATURES = 8
MAX_CERTIFICATE_BYTES = 8 * 1024
MAX_SIGNATURE_BYTES = 128


def _parse(msg_type: type, data: bytes, what: str) -> Any:
    msg = msg_type()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise WireError(f"undecodable {what}: {exc}") from exc
    return msg


def encode_command_request(req: CommandRequest) -> bytes:
    """A Command RPC request; the envelope's payload bytes are copied, never re-encoded."""
    msg = agent_pb2.CommandRequest(
        phase=req.phase,  # type: ignore[arg-type]
        commit_at_unix_ns=req.commit_at_unix_ns,
        command_id=req.command_id,
        wait_s=req.wait_s,
    )
    if req.envelope is not None:
        msg.envelope.payload = req.envelope.payload
        for sig in req.envelope.signatures:
            msg.envelope.signatures.add(certificate_pem=sig.certificate_pem, signature=sig.signature)
    return msg.SerializeToString()


def decode_command_request(data: bytes) -> CommandRequest:
    """Parse a Command request and bound its sizes; signatures are checked by the agent later."""
    msg = _parse(agent_pb2.CommandRequest, data, "CommandRequest")
    if msg.phase not in PHASE_NAMES:
        raise WireError(f"unknown command phase {msg.phase}")
    envelope = None
    if msg.HasField("envelope"):
        env = msg.envelope
        if len(env.payload) > MAX_ENVELOPE_PAYLOAD_BYTES:
            raise WireError(f"payload of {len(env.payload)} bytes exceeds {MAX_ENVELOPE_PAYLOAD_BYTES}")
        if len(env.signatures) > MAX_ENVELOPE_SIGNATURES:
            raise WireError(f"{len(env.signatures)} signatures exceed {MAX_ENVELOPE_SIGNATURES}")
        sigs = []
        for s in env.signatures:
            if len(s.certificate_pem) > MAX_CERTIFICATE_BYTES or len(s.signature) > MAX_SIGNATURE_BYTES:
                raise WireError("signature or certificate too large")
            sigs.append(CommandSignature(certificate_pem=bytes(s.certificate_pem), signature=bytes(s.signature)))
        envelope = CommandEnvelope(payload=bytes(env.payload), signatures=tuple(sigs))
    if not math.isfinite(msg.wait_s) or msg.wait_s < 0:
        raise WireError("wait_s must be a finite number >= 0")
    return CommandRequest(
        phase=msg.phase,
        envelope=envelope,
        commit_at_unix_ns=msg.commit_at_unix_ns,
        command_id=msg.command_id,
        wait_s=msg.wait_s,
    )


def encode_signed_receipt(r: SignedReceipt) -> bytes:
    return agent_pb2.CommandReceipt(
        receipt=r.receipt, signature=r.signature, agent_public_key=r.agent_public_key
    ).SerializeToString()


def decode_signed_receipt(data: bytes) -> SignedReceipt:
    """The receipt bytes as signed; verify them with protos.signing.verify_receipt."""
    msg = _parse(agent_pb2.CommandReceipt, data, "CommandReceipt")
    return SignedReceipt(
        receipt=bytes(msg.receipt), signature=bytes(msg.signature), agent_public_key=bytes(msg.agent_public_key)
    )


def encode_list_checkpoints_request(job: str, deep: bool = False) -> bytes:
    return agent_pb2.ListCheckpointsRequest(job=job, deep=deep).SerializeToString()


def decode_list_checkpoints_request(data: bytes) -> tuple[str, bool]:
    """(job, deep); a job id is required."""
    msg = _parse(agent_pb2.ListCheckpointsRequest, data, "ListCheckpointsRequest")
    if not msg.job:
        raise WireError("ListCheckpoints needs a job")
    return msg.job, msg.deep


def encode_checkpoint_list(c: CheckpointList) -> bytes:
    msg = agent_pb2.ListCheckpointsResponse(host=c.host, job=c.job, step_floor=c.step_floor)
    for i in c.checkpoints:
        msg.checkpoints.add(
            path=i.path,
            manifest_digest=i.manifest_digest,
            job=i.job,
            run=i.run,
            step=i.step,
            world_size=i.world_size,
            status=i.status,
            reason=i.reason,
            signer_key_id=i.signer_key_id,
            below_floor=i.below_floor,
            created_unix_ns=i.created_unix_ns,
        )
    return msg.SerializeToString()


def decode_checkpoint_list(data: bytes) -> CheckpointList:
    msg = _parse(agent_pb2.ListCheckpointsResponse, data, "ListCheckpointsResponse")
    return CheckpointList(
        host=msg.host,
        job=msg.job,
        step_floor=msg.step_floor,
        checkpoints=tuple(
            CheckpointInfo(
                path=i.path,
                manifest_digest=i.manifest_digest,
                job=i.job,
                run=i.run,
                step=i.step,
                world_size=i.world_size,
                status=i.status,
                reason=i.reason,
                signer_key_id=i.signer_key_id,
                below_floor=i.below_floor,
                created_unix_ns=i.created_unix_ns,
            )
            for i in msg.checkpoints
        ),
    )


def encode_control_state_request() -> bytes:
    return agent_pb2.ControlStateRequest().SerializeToString()


def decode_control_state_request(data: bytes) -> None:
    _parse(agent_pb2.ControlStateRequest, data, "ControlStateRequest")


def encode_control_state(s: ControlState) -> bytes:
    msg = agent_pb2.ControlStateResponse(
        host=s.host,
        agent_public_key=s.agent_public_key,
        agent_key_id=s.agent_key_id,
        commands_enabled=s.commands_enabled,
        min_signers=s.min_signers,
        now_unix_ns=s.now_unix_ns,
        armed_command_ids=list(s.armed_command_ids),
    )
    for f in s.frozen:
        msg.frozen.add(
            job=f.job,
            method=f.method,
            frozen_since_unix_ns=f.frozen_since_unix_ns,
            collective_timeout_s=f.collective_timeout_s,
            pids=list(f.pids),
            cgroup=f.cgroup,
            command_id=f.command_id,
        )
    return msg.SerializeToString()


def decode_control_state(data: bytes) -> ControlState:
    msg = _parse(agent_pb2.ControlStateResponse, data, "ControlStateResponse")
    return ControlState(
        host=msg.host,
        agent_public_key=bytes(msg.agent_public_key),
        agent_key_id=msg.agent_key_id,
        commands_enabled=msg.commands_enabled,
        frozen=tuple(
            FrozenJob(
                job=f.job,
                method=f.method,
                frozen_since_unix_ns=f.frozen_since_unix_ns,
                collective_timeout_s=f.collective_timeout_s,
                pids=tuple(f.pids),
                cgroup=f.cgroup,
                command_id=f.command_id,
            )
            for f in msg.frozen
        ),
        min_signers=dict(msg.min_signers),
        now_unix_ns=msg.now_unix_ns,
        armed_command_ids=tuple(msg.armed_command_ids),
    )


def protobuf_backend() -> str:
    """'upb' in a healthy install; the pure-Python fallback parses ~500x slower."""
    from google.protobuf.internal import api_implementation

    return str(api_implementation.Type())


__all__ = [
    "ACKNOWLEDGE_METHOD",
    "COMMAND_METHOD",
    "CONTROL_STATE_METHOD",
    "DESCRIBE_METHOD",
    "LIST_CHECKPOINTS_METHOD",
    "METRIC_NAMES",
    "SERVICE_NAME",
    "SUBSCRIBE_METHOD",
    "decode_ack_result",
    "decode_acknowledge_request",
    "decode_checkpoint_list",
    "decode_command_request",
    "decode_control_state",
    "decode_control_state_request",
    "decode_description",
    "decode_frame",
    "decode_list_checkpoints_request",
    "decode_signed_receipt",
    "decode_stream_item",
    "decode_subscribe_request",
    "encode_ack_result",
    "encode_acknowledge_request",
    "encode_checkpoint_list",
    "encode_command_request",
    "encode_control_state",
    "encode_control_state_request",
    "encode_description",
    "encode_frame",
    "encode_gap",
    "encode_list_checkpoints_request",
    "encode_signed_receipt",
    "encode_subscribe_request",
    "wrap_frame",
]
