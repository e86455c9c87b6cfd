from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Metric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_UNSPECIFIED: _ClassVar[Metric]
    METRIC_GPU_UTIL_PCT: _ClassVar[Metric]
    METRIC_MEM_UTIL_PCT: _ClassVar[Metric]
    METRIC_MEM_USED_MIB: _ClassVar[Metric]
    METRIC_MEM_TOTAL_MIB: _ClassVar[Metric]
    METRIC_TEMP_C: _ClassVar[Metric]
    METRIC_POWER_W: _ClassVar[Metric]
    METRIC_POWER_LIMIT_W: _ClassVar[Metric]
    METRIC_SM_CLOCK_MHZ: _ClassVar[Metric]
    METRIC_MEM_CLOCK_MHZ: _ClassVar[Metric]
    METRIC_THROTTLE_REASONS: _ClassVar[Metric]
    METRIC_ECC_CORRECTED: _ClassVar[Metric]
    METRIC_ECC_UNCORRECTED: _ClassVar[Metric]
    METRIC_RETIRED_PAGES: _ClassVar[Metric]
    METRIC_REMAP_FAILURE: _ClassVar[Metric]
    METRIC_PCIE_TX_KBS: _ClassVar[Metric]
    METRIC_PCIE_RX_KBS: _ClassVar[Metric]

class GpuState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GPU_STATE_UNSPECIFIED: _ClassVar[GpuState]
    GPU_STATE_OK: _ClassVar[GpuState]
    GPU_STATE_LOST: _ClassVar[GpuState]
    GPU_STATE_ERROR: _ClassVar[GpuState]

class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEVERITY_UNSPECIFIED: _ClassVar[Severity]
    SEVERITY_INFO: _ClassVar[Severity]
    SEVERITY_WARNING: _ClassVar[Severity]
    SEVERITY_CRITICAL: _ClassVar[Severity]
METRIC_UNSPECIFIED: Metric
METRIC_GPU_UTIL_PCT: Metric
METRIC_MEM_UTIL_PCT: Metric
METRIC_MEM_USED_MIB: Metric
METRIC_MEM_TOTAL_MIB: Metric
METRIC_TEMP_C: Metric
METRIC_POWER_W: Metric
METRIC_POWER_LIMIT_W: Metric
METRIC_SM_CLOCK_MHZ: Metric
METRIC_MEM_CLOCK_MHZ: Metric
METRIC_THROTTLE_REASONS: Metric
METRIC_ECC_CORRECTED: Metric
METRIC_ECC_UNCORRECTED: Metric
METRIC_RETIRED_PAGES: Metric
METRIC_REMAP_FAILURE: Metric
METRIC_PCIE_TX_KBS: Metric
METRIC_PCIE_RX_KBS: Metric
GPU_STATE_UNSPECIFIED: GpuState
GPU_STATE_OK: GpuState
GPU_STATE_LOST: GpuState
GPU_STATE_ERROR: GpuState
SEVERITY_UNSPECIFIED: Severity
SEVERITY_INFO: Severity
SEVERITY_WARNING: Severity
SEVERITY_CRITICAL: Severity

class Frame(_message.Message):
    __slots__ = ("host", "epoch", "seq", "ts_unix_ns", "simulated", "metric_schema", "n_gpus", "n_metrics", "gpu_values", "gpu_index", "gpu_state", "processes", "events", "sdk_dropped", "train")
    HOST_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TS_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    METRIC_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    N_GPUS_FIELD_NUMBER: _ClassVar[int]
    N_METRICS_FIELD_NUMBER: _ClassVar[int]
    GPU_VALUES_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    GPU_STATE_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    SDK_DROPPED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    host: str
    epoch: str
    seq: int
    ts_unix_ns: int
    simulated: bool
    metric_schema: int
    n_gpus: int
    n_metrics: int
    gpu_values: bytes
    gpu_index: _containers.RepeatedScalarFieldContainer[int]
    gpu_state: _containers.RepeatedScalarFieldContainer[GpuState]
    processes: _containers.RepeatedCompositeFieldContainer[GpuProcess]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    sdk_dropped: int
    train: TrainBatch
    def __init__(self, host: _Optional[str] = ..., epoch: _Optional[str] = ..., seq: _Optional[int] = ..., ts_unix_ns: _Optional[int] = ..., simulated: _Optional[bool] = ..., metric_schema: _Optional[int] = ..., n_gpus: _Optional[int] = ..., n_metrics: _Optional[int] = ..., gpu_values: _Optional[bytes] = ..., gpu_index: _Optional[_Iterable[int]] = ..., gpu_state: _Optional[_Iterable[_Union[GpuState, str]]] = ..., processes: _Optional[_Iterable[_Union[GpuProcess, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., sdk_dropped: _Optional[int] = ..., train: _Optional[_Union[TrainBatch, _Mapping]] = ...) -> None: ...

class GpuProcess(_message.Message):
    __slots__ = ("gpu_index", "pid", "used_memory_mib")
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    USED_MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    gpu_index: int
    pid: int
    used_memory_mib: float
    def __init__(self, gpu_index: _Optional[int] = ..., pid: _Optional[int] = ..., used_memory_mib: _Optional[float] = ...) -> None: ...

class TrainBatch(_message.Message):
    __slots__ = ("ts_unix_ns", "job_id", "rank", "local_rank", "world_size", "pid", "uid", "step", "loss", "grad_norm", "lr", "tokens", "kind", "extra_row", "extra_key", "extra_value", "info_row", "info_key", "info_value")
    TS_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EXTRA_ROW_FIELD_NUMBER: _ClassVar[int]
    EXTRA_KEY_FIELD_NUMBER: _ClassVar[int]
    EXTRA_VALUE_FIELD_NUMBER: _ClassVar[int]
    INFO_ROW_FIELD_NUMBER: _ClassVar[int]
    INFO_KEY_FIELD_NUMBER: _ClassVar[int]
    INFO_VALUE_FIELD_NUMBER: _ClassVar[int]
    ts_unix_ns: _containers.RepeatedScalarFieldContainer[int]
    job_id: _containers.RepeatedScalarFieldContainer[str]
    rank: _containers.RepeatedScalarFieldContainer[int]
    local_rank: _containers.RepeatedScalarFieldContainer[int]
    world_size: _containers.RepeatedScalarFieldContainer[int]
    pid: _containers.RepeatedScalarFieldContainer[int]
    uid: _containers.RepeatedScalarFieldContainer[int]
    step: _containers.RepeatedScalarFieldContainer[int]
    loss: _containers.RepeatedScalarFieldContainer[float]
    grad_norm: _containers.RepeatedScalarFieldContainer[float]
    lr: _containers.RepeatedScalarFieldContainer[float]
    tokens: _containers.RepeatedScalarFieldContainer[float]
    kind: _containers.RepeatedScalarFieldContainer[str]
    extra_row: _containers.RepeatedScalarFieldContainer[int]
    extra_key: _containers.RepeatedScalarFieldContainer[str]
    extra_value: _containers.RepeatedScalarFieldContainer[float]
    info_row: _containers.RepeatedScalarFieldContainer[int]
    info_key: _containers.RepeatedScalarFieldContainer[str]
    info_value: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ts_unix_ns: _Optional[_Iterable[int]] = ..., job_id: _Optional[_Iterable[str]] = ..., rank: _Optional[_Iterable[int]] = ..., local_rank: _Optional[_Iterable[int]] = ..., world_size: _Optional[_Iterable[int]] = ..., pid: _Optional[_Iterable[int]] = ..., uid: _Optional[_Iterable[int]] = ..., step: _Optional[_Iterable[int]] = ..., loss: _Optional[_Iterable[float]] = ..., grad_norm: _Optional[_Iterable[float]] = ..., lr: _Optional[_Iterable[float]] = ..., tokens: _Optional[_Iterable[float]] = ..., kind: _Optional[_Iterable[str]] = ..., extra_row: _Optional[_Iterable[int]] = ..., extra_key: _Optional[_Iterable[str]] = ..., extra_value: _Optional[_Iterable[float]] = ..., info_row: _Optional[_Iterable[int]] = ..., info_key: _Optional[_Iterable[str]] = ..., info_value: _Optional[_Iterable[str]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("ts_unix_ns", "kind", "severity", "gpu_index", "pid", "detail", "attrs")
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TS_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    ts_unix_ns: int
    kind: str
    severity: Severity
    gpu_index: int
    pid: int
    detail: str
    attrs: _containers.ScalarMap[str, str]
    def __init__(self, ts_unix_ns: _Optional[int] = ..., kind: _Optional[str] = ..., severity: _Optional[_Union[Severity, str]] = ..., gpu_index: _Optional[int] = ..., pid: _Optional[int] = ..., detail: _Optional[str] = ..., attrs: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Gap(_message.Message):
    __slots__ = ("epoch", "first_seq", "last_seq", "reason", "ts_unix_ns")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TS_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    epoch: str
    first_seq: int
    last_seq: int
    reason: str
    ts_unix_ns: int
    def __init__(self, epoch: _Optional[str] = ..., first_seq: _Optional[int] = ..., last_seq: _Optional[int] = ..., reason: _Optional[str] = ..., ts_unix_ns: _Optional[int] = ...) -> None: ...
