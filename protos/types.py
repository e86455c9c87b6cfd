"""Plain-Python shapes of everything on the wire.

Agent and console build and read these; only `protos.serde` converts them to and from
protobuf, so a contract change touches one module instead of every caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

import numpy as np

NAN: Final = math.nan

# Column order of Frame.gpu_values for METRIC_SCHEMA 1 (matches enum Metric in telemetry.proto;
# tests/test_serde.py checks the two agree).
METRIC_SCHEMA: Final = 1
METRIC_NAMES: Final[tuple[str, ...]] = (
    "gpu_util_pct",
    "mem_util_pct",
    "mem_used_mib",
    "mem_total_mib",
    "temp_c",
    "power_w",
    "power_limit_w",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "throttle_reasons",
    "ecc_corrected",
    "ecc_uncorrected",
    "retired_pages",
    "remap_failure",
    "pcie_tx_kbs",
    "pcie_rx_kbs",
)
N_METRICS: Final = len(METRIC_NAMES)
METRIC_INDEX: Final[dict[str, int]] = {name: i for i, name in enumerate(METRIC_NAMES)}

GPU_OK: Final = 1
GPU_LOST: Final = 2
GPU_ERROR: Final = 3
GPU_STATE_NAMES: Final = {0: "unknown", GPU_OK: "ok", GPU_LOST: "lost", GPU_ERROR: "error"}

SEVERITY_INFO: Final = 1
SEVERITY_WARNING: Final = 2
SEVERITY_CRITICAL: Final = 3
SEVERITY_NAMES: Final = {0: "unknown", 1: "info", 2: "warning", 3: "critical"}


@dataclass(slots=True)
class GpuProcess:
    gpu_index: int
    pid: int
    used_memory_mib: float = NAN


@dataclass(slots=True)
class TrainRecord:
    """One SDK record; pid/uid come from the kernel, not from the sender's payload."""

    ts_unix_ns: int
    job_id: str
    rank: int
    local_rank: int
    world_size: int
    pid: int
    uid: int
    step: int
    loss: float = NAN
    grad_norm: float = NAN
    lr: float = NAN
    tokens: float = NAN
    extra: dict[str, float] = field(default_factory=dict)
    kind: str = "log"
    info: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Event:
    ts_unix_ns: int
    kind: str
    severity: int = SEVERITY_INFO
    gpu_index: int = -1
    pid: int = 0
    detail: str = ""
    attrs: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Frame:
    """One host, one tick. `gpu_values` is float32 [n_gpus, N_METRICS]; NaN = not available."""

    host: str
    epoch: str
    seq: int
    ts_unix_ns: int
    simulated: bool
    gpu_values: np.ndarray
    gpu_index: list[int]
    gpu_state: list[int]
    processes: list[GpuProcess] = field(default_factory=list)
    train: list[TrainRecord] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    sdk_dropped: int = 0
    metric_schema: int = METRIC_SCHEMA


@dataclass(slots=True)
class Gap:
    """Frames the agent no longer holds. last_seq == 0 means 'to the end of that epoch'."""

    epoch: str
    first_seq: int
    last_seq: int
    reason: str
    ts_unix_ns: int = 0


@dataclass(slots=True)
class SubscribeRequest:
    epoch: str = ""
    after_seq: int = 0
    from_now: bool = False


@dataclass(frozen=True, slots=True)
class AckResult:
    """The agent's answer to Acknowledge: whether it took the position, and its acknowledged seq."""

    accepted: bool
    acked_seq: int


@dataclass(slots=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    memory_total_mib: float
    driver_version: str
    pci_bus_id: str = ""


@dataclass(slots=True)
class Description:
    host: str
    agent_version: str
    epoch: str
    simulated: bool
    gpus: list[GpuInfo]
    capabilities: list[str]
    metric_names: list[str]
    metric_schema: int
    sample_interval_s: float
    oldest_seq: int
    newest_seq: int
    nvml_status: str


class WireError(ValueError):
    """Bytes or values that do not form a valid message of the contract."""


# ---------------------------------------------------------------- control (docs/response.md)

ACTION_FREEZE: Final = "freeze"
ACTION_RESUME: Final = "resume"
ACTION_ROLLBACK: Final = "rollback"
ACTIONS: Final[tuple[str, ...]] = (ACTION_FREEZE, ACTION_RESUME, ACTION_ROLLBACK)

ROLE_VIEWER: Final = "viewer"
ROLE_RESPONDER: Final = "responder"
ROLE_ADMIN: Final = "admin"
ROLES: Final[tuple[str, ...]] = (ROLE_VIEWER, ROLE_RESPONDER, ROLE_ADMIN)

#: CommandRequest.phase values (enum CommandPhase in agent.proto).
PHASE_EXECUTE: Final = 1
PHASE_PREPARE: Final = 2
PHASE_RESULT: Final = 3
PHASE_ABORT: Final = 4
PHASE_NAMES: Final = {PHASE_EXECUTE: "execute", PHASE_PREPARE: "prepare", PHASE_RESULT: "result", PHASE_ABORT: "abort"}

#: Longest a command may live (expires_at - issued_at).
MAX_COMMAND_TTL_NS: Final = 120 * 1_000_000_000

#: Receipt statuses.
STATUS_PREPARED: Final = "prepared"
STATUS_EXECUTED: Final = "executed"
STATUS_REFUSED: Final = "refused"
STATUS_FAILED: Final = "failed"
STATUS_ABORTED: Final = "aborted"
STATUS_PENDING: Final = "pending"


@dataclass(frozen=True, slots=True)
class CommandPayload:
    """What operators sign: one action on one job, for listed hosts, inside a short time window.

    `protos.signing.payload_bytes` turns it into the canonical bytes that are signed and sent;
    the agent parses those exact bytes back with `protos.signing.parse_payload`.
    """

    command_id: str  # 32 lowercase hex characters (128 random bits), single-use
    action: str  # one of ACTIONS
    job: str
    target_hosts: tuple[str, ...]
    issued_at_ns: int  # unix ns
    expires_at_ns: int  # unix ns, at most MAX_COMMAND_TTL_NS after issued_at_ns
    reason: str
    checkpoint_digest: str = ""  # rollback only: "sha256:<hex>" of the checkpoint's manifest file
    break_glass: bool = False  # rollback below the step floor; needs two admins


@dataclass(frozen=True, slots=True)
class CommandSignature:
    certificate_pem: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class CommandEnvelope:
    """The payload bytes exactly as signed, plus one signature per approving operator."""

    payload: bytes
    signatures: tuple[CommandSignature, ...] = ()


@dataclass(frozen=True, slots=True)
class CommandRequest:
    phase: int
    envelope: CommandEnvelope | None = None
    commit_at_unix_ns: int = 0
    command_id: str = ""
    wait_s: float = 0.0


@dataclass(frozen=True, slots=True)
class SignedReceipt:
    """A receipt as it travels: canonical JSON bytes, the agent's signature, its raw public key."""

    receipt: bytes
    signature: bytes
    agent_public_key: bytes


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    path: str
    manifest_digest: str
    job: str
    run: str
    step: int
    world_size: int
    status: str  # verified | signed | unsigned | untrusted | invalid
    reason: str = ""
    signer_key_id: str = ""
    below_floor: bool = False
    created_unix_ns: int = 0


@dataclass(frozen=True, slots=True)
class CheckpointList:
    host: str
    job: str
    step_floor: int
    checkpoints: tuple[CheckpointInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class FrozenJob:
    job: str
    method: str  # cgroup_freezer | sigstop
    frozen_since_unix_ns: int
    collective_timeout_s: float
    pids: tuple[int, ...] = ()
    cgroup: str = ""
    command_id: str = ""


@dataclass(frozen=True, slots=True)
class ControlState:
    host: str
    agent_public_key: bytes
    agent_key_id: str
    commands_enabled: bool
    frozen: tuple[FrozenJob, ...] = ()
    min_signers: dict[str, int] = field(default_factory=dict)
    now_unix_ns: int = 0
    armed_command_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Receipt:
    """The agent's signed answer to one command request (the JSON inside SignedReceipt.receipt).

    Times are unix ns on the agent's clock; a console computes cross-host skew from
    `executed_at_ns` and the time left before the job's collective timeout from
    `frozen_since_ns` and `collective_timeout_s`.
    """

    command_id: str
    host: str
    phase: str  # execute | prepare | result | abort
    status: str  # prepared | executed | refused | failed | aborted | pending
    payload_sha256: str = ""  # hex SHA-256 of the payload bytes the receipt answers ("" if none)
    action: str = ""
    job: str = ""
    reason: str = ""
    check: str = ""  # the check that refused (peer, envelope, certificate, signature, ...)
    signers: tuple[str, ...] = ()  # "name:role" of each verified signer
    peer: str = ""  # mTLS common name of the console that sent it
    method: str = ""  # cgroup_freezer | sigstop | restore
    pids: tuple[int, ...] = ()
    cgroup: str = ""
    received_at_ns: int = 0
    commit_at_ns: int = 0
    executed_at_ns: int = 0
    confirmed_at_ns: int = 0
    frozen_since_ns: int = 0
    collective_timeout_s: int = 0
    checkpoint_digest: str = ""
    checkpoint_step: int = -1
    checkpoint_path: str = ""
    restarted_pids: tuple[int, ...] = ()
    agent_key_id: str = ""
    signed_at_ns: int = 0
