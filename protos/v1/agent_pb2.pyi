from protos.v1 import telemetry_pb2 as _telemetry_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
