from protos.v1 import telemetry_pb2 as _telemetry_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CommandPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMAND_PHASE_UNSPECIFIED: _ClassVar[CommandPhase]
    COMMAND_PHASE_EXECUTE: _ClassVar[CommandPhase]
    COMMAND_PHASE_PREPARE: _ClassVar[CommandPhase]
    COMMAND_PHASE_RESULT: _ClassVar[CommandPhase]
    COMMAND_PHASE_ABORT: _ClassVar[CommandPhase]
COMMAND_PHASE_UNSPECIFIED: CommandPhase
COMMAND_PHASE_EXECUTE: CommandPhase
COMMAND_PHASE_PREPARE: CommandPhase
COMMAND_PHASE_RESULT: CommandPhase
COMMAND_PHASE_ABORT: CommandPhase

class SubscribeRequest(_message.Message):
    __slots__ = ("epoch", "after_seq", "from_now")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    FROM_NOW_FIELD_NUMBER: _ClassVar[int]
    epoch: str
    after_seq: int
    from_now: bool
    def __init__(self, epoch: _Optional[str] = ..., after_seq: _Optional[int] = ..., from_now: _Optional[bool] = ...) -> None: ...

class SubscribeResponse(_message.Message):
    __slots__ = ("frame", "gap")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    GAP_FIELD_NUMBER: _ClassVar[int]
    frame: _telemetry_pb2.Frame
    gap: _telemetry_pb2.Gap
    def __init__(self, frame: _Optional[_Union[_telemetry_pb2.Frame, _Mapping]] = ..., gap: _Optional[_Union[_telemetry_pb2.Gap, _Mapping]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GpuInfo(_message.Message):
    __slots__ = ("index", "name", "uuid", "memory_total_mib", "driver_version", "pci_bus_id")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_MIB_FIELD_NUMBER: _ClassVar[int]
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    PCI_BUS_ID_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    uuid: str
    memory_total_mib: float
    driver_version: str
    pci_bus_id: str
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., uuid: _Optional[str] = ..., memory_total_mib: _Optional[float] = ..., driver_version: _Optional[str] = ..., pci_bus_id: _Optional[str] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("host", "agent_version", "epoch", "simulated", "gpus", "capabilities", "metric_names", "metric_schema", "sample_interval_s", "oldest_seq", "newest_seq", "nvml_status")
    HOST_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    METRIC_NAMES_FIELD_NUMBER: _ClassVar[int]
    METRIC_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    OLDEST_SEQ_FIELD_NUMBER: _ClassVar[int]
    NEWEST_SEQ_FIELD_NUMBER: _ClassVar[int]
    NVML_STATUS_FIELD_NUMBER: _ClassVar[int]
    host: str
    agent_version: str
    epoch: str
    simulated: bool
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInfo]
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    metric_names: _containers.RepeatedScalarFieldContainer[str]
    metric_schema: int
    sample_interval_s: float
    oldest_seq: int
    newest_seq: int
    nvml_status: str
    def __init__(self, host: _Optional[str] = ..., agent_version: _Optional[str] = ..., epoch: _Optional[str] = ..., simulated: _Optional[bool] = ..., gpus: _Optional[_Iterable[_Union[GpuInfo, _Mapping]]] = ..., capabilities: _Optional[_Iterable[str]] = ..., metric_names: _Optional[_Iterable[str]] = ..., metric_schema: _Optional[int] = ..., sample_interval_s: _Optional[float] = ..., oldest_seq: _Optional[int] = ..., newest_seq: _Optional[int] = ..., nvml_status: _Optional[str] = ...) -> None: ...

class AcknowledgeRequest(_message.Message):
    __slots__ = ("epoch", "seq")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    epoch: str
    seq: int
    def __init__(self, epoch: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class AcknowledgeResponse(_message.Message):
    __slots__ = ("accepted", "acked_seq")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    acked_seq: int
    def __init__(self, accepted: _Optional[bool] = ..., acked_seq: _Optional[int] = ...) -> None: ...

class CommandSignature(_message.Message):
    __slots__ = ("certificate_pem", "signature")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    signature: bytes
    def __init__(self, certificate_pem: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class CommandEnvelope(_message.Message):
    __slots__ = ("payload", "signatures")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    signatures: _containers.RepeatedCompositeFieldContainer[CommandSignature]
    def __init__(self, payload: _Optional[bytes] = ..., signatures: _Optional[_Iterable[_Union[CommandSignature, _Mapping]]] = ...) -> None: ...

class CommandRequest(_message.Message):
    __slots__ = ("phase", "envelope", "commit_at_unix_ns", "command_id", "wait_s")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_AT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    phase: CommandPhase
    envelope: CommandEnvelope
    commit_at_unix_ns: int
    command_id: str
    wait_s: float
    def __init__(self, phase: _Optional[_Union[CommandPhase, str]] = ..., envelope: _Optional[_Union[CommandEnvelope, _Mapping]] = ..., commit_at_unix_ns: _Optional[int] = ..., command_id: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class CommandReceipt(_message.Message):
    __slots__ = ("receipt", "signature", "agent_public_key")
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    AGENT_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    receipt: bytes
    signature: bytes
    agent_public_key: bytes
    def __init__(self, receipt: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., agent_public_key: _Optional[bytes] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("job", "deep")
    JOB_FIELD_NUMBER: _ClassVar[int]
    DEEP_FIELD_NUMBER: _ClassVar[int]
    job: str
    deep: bool
    def __init__(self, job: _Optional[str] = ..., deep: _Optional[bool] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("path", "manifest_digest", "job", "run", "step", "world_size", "status", "reason", "signer_key_id", "below_floor", "created_unix_ns")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SIGNER_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    BELOW_FLOOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    path: str
    manifest_digest: str
    job: str
    run: str
    step: int
    world_size: int
    status: str
    reason: str
    signer_key_id: str
    below_floor: bool
    created_unix_ns: int
    def __init__(self, path: _Optional[str] = ..., manifest_digest: _Optional[str] = ..., job: _Optional[str] = ..., run: _Optional[str] = ..., step: _Optional[int] = ..., world_size: _Optional[int] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., signer_key_id: _Optional[str] = ..., below_floor: _Optional[bool] = ..., created_unix_ns: _Optional[int] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("host", "job", "step_floor", "checkpoints")
    HOST_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FLOOR_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    host: str
    job: str
    step_floor: int
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointInfo]
    def __init__(self, host: _Optional[str] = ..., job: _Optional[str] = ..., step_floor: _Optional[int] = ..., checkpoints: _Optional[_Iterable[_Union[CheckpointInfo, _Mapping]]] = ...) -> None: ...

class ControlStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FrozenJob(_message.Message):
    __slots__ = ("job", "method", "frozen_since_unix_ns", "collective_timeout_s", "pids", "cgroup", "command_id")
    JOB_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    FROZEN_SINCE_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    CGROUP_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    job: str
    method: str
    frozen_since_unix_ns: int
    collective_timeout_s: float
    pids: _containers.RepeatedScalarFieldContainer[int]
    cgroup: str
    command_id: str
    def __init__(self, job: _Optional[str] = ..., method: _Optional[str] = ..., frozen_since_unix_ns: _Optional[int] = ..., collective_timeout_s: _Optional[float] = ..., pids: _Optional[_Iterable[int]] = ..., cgroup: _Optional[str] = ..., command_id: _Optional[str] = ...) -> None: ...

class ControlStateResponse(_message.Message):
    __slots__ = ("host", "agent_public_key", "agent_key_id", "commands_enabled", "frozen", "min_signers", "now_unix_ns", "armed_command_ids")
    class MinSignersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    HOST_FIELD_NUMBER: _ClassVar[int]
    AGENT_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    AGENT_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    COMMANDS_ENABLED_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    MIN_SIGNERS_FIELD_NUMBER: _ClassVar[int]
    NOW_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    ARMED_COMMAND_IDS_FIELD_NUMBER: _ClassVar[int]
    host: str
    agent_public_key: bytes
    agent_key_id: str
    commands_enabled: bool
    frozen: _containers.RepeatedCompositeFieldContainer[FrozenJob]
    min_signers: _containers.ScalarMap[str, int]
    now_unix_ns: int
    armed_command_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, host: _Optional[str] = ..., agent_public_key: _Optional[bytes] = ..., agent_key_id: _Optional[str] = ..., commands_enabled: _Optional[bool] = ..., frozen: _Optional[_Iterable[_Union[FrozenJob, _Mapping]]] = ..., min_signers: _Optional[_Mapping[str, int]] = ..., now_unix_ns: _Optional[int] = ..., armed_command_ids: _Optional[_Iterable[str]] = ...) -> None: ...
