"""Training SDK: two lines in a training loop send step metrics to the local gpusoc agent.

    from agent import sdk
    sdk.init()
    sdk.log(step=step, loss=loss, grad_norm=gn, lr=lr, tokens=n, mfu=0.41)

Stdlib only, so importing it costs a training job nothing. Records go to the agent as Unix
datagrams (AF_UNIX, SOCK_DGRAM, non-blocking; records logged within 5 ms of the previous send
share the next one); the kernel stamps the sender's pid/uid on every datagram, so the payload
carries no identity. `log()` never blocks and never raises: whatever cannot be sent (no agent,
full queue, non-numeric value) is counted in `stats()["dropped"]`. See docs/sdk.md for the
datagram layout, the guarantees and the measured cost.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import shlex
import socket
import struct
import sys
import time
from typing import Any, Final

__all__ = [
    "ENV_DISABLED",
    "ENV_JOB_ID",
    "ENV_SOCKET",
    "SYSTEM_SOCKET_PATH",
    "Client",
    "close",
    "default_socket_path",
    "flush",
    "init",
    "log",
    "stats",
]

SYSTEM_SOCKET_PATH: Final = "/run/gpusoc/agent.sock"
USER_SOCKET_SUBPATH: Final = os.path.join("gpusoc", "agent.sock")  # under $XDG_RUNTIME_DIR
ENV_SOCKET: Final = "GPUSOC_AGENT_SOCKET"
ENV_JOB_ID: Final = "GPUSOC_JOB_ID"
ENV_DISABLED: Final = "GPUSOC_SDK_DISABLED"

# ---- wire format, version 1 (all little-endian; docs/sdk.md has the table) ----
MAGIC: Final = b"GS"
VERSION: Final = 1
KIND_LOG: Final = 1
KIND_INIT: Final = 2
KIND_NAMES: Final[dict[int, str]] = {KIND_LOG: "log", KIND_INIT: "init"}
# magic, version, kind, rank, local_rank, world_size, len(job_id); then job_id bytes, then records.
HEADER: Final = struct.Struct("<2sBBiiiH")
# One record: its own length in bytes (this field and extras included), ts_unix_ns (0 = stamp on
# receipt), step (-1 = not given), loss, grad_norm, lr, tokens (NaN = not given). A log datagram
# holds one or more records; an init datagram holds one record followed by JSON info.
RECORD: Final = struct.Struct("<Hqqdddd")
MAX_JOB_ID_BYTES: Final = 255
MAX_EXTRA: Final = 255  # extras after a record: u8 count, count x (u8 len + utf-8 name), count x f64
MAX_NAME_BYTES: Final = 255
MAX_RECORD: Final = 16_000  # bytes, extras included
MAX_DATAGRAM: Final = 60_000  # the receiver reads 64 KiB; init info is trimmed to fit
MAX_INFO_VALUE_CHARS: Final = 4096

# Records logged less than this long after the previous send are held and go out, several to
# one datagram, with the next call that comes later (or on flush()/exit). At most one send()
# per window: the overhead stays near send-cost / window however often log() is called.
COALESCE_S: float = 0.005
MAX_BATCH_BYTES: Final = 32_000
RETRY_INTERVAL_S: float = 1.0  # reconnect attempts when the agent is absent, at most this often
SNDBUF_BYTES: Final = 1 << 20  # in-flight datagrams are charged to the sender's buffer
ENV_COALESCE_MS: Final = "GPUSOC_SDK_COALESCE_MS"

_NAN: Final = math.nan
_time_ns = time.time_ns
_TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})


def default_socket_path(*, for_agent: bool = False) -> str:
    """The one place both sides agree on where the agent listens.

    `GPUSOC_AGENT_SOCKET` wins. Otherwise the agent binds `/run/gpusoc/agent.sock` when it may
    create that, else `$XDG_RUNTIME_DIR/gpusoc/agent.sock` (unprivileged agent); the SDK uses
    the system path unless only the per-user socket exists.
    """
    env = os.environ.get(ENV_SOCKET)
    if env:
        return env
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    user_path = os.path.join(xdg, USER_SOCKET_SUBPATH) if xdg else None
    if for_agent:
        if user_path is None or _dir_usable(os.path.dirname(SYSTEM_SOCKET_PATH)):
            return SYSTEM_SOCKET_PATH
        return user_path
    if user_path and not os.path.exists(SYSTEM_SOCKET_PATH) and os.path.exists(user_path):
        return user_path
    return SYSTEM_SOCKET_PATH


def _dir_usable(path: str) -> bool:
    """True when `path` is a writable directory, or could be created under its nearest ancestor."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        raw = os.environ.get(name)
        if raw is None or raw.strip() == "":
            continue
        try:
            return int(raw.strip())
        except ValueError:
            continue
    return default


def _as_int(value: object, fallback: int) -> int:
    if value is None:
        return fallback
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return fallback


def _env_job_id() -> str:
    """GPUSOC_JOB_ID, then the Slurm job, then the torchrun run id, then a local name.

    Slurm comes before torchrun because torchrun's default run id is the literal "none" and
    the Slurm id is what operators see in the scheduler. Without either, processes started by
    a launcher (RANK set) share `local-<host>-<launcher pid>`, a plain script gets its own pid.
    """
    for name in (ENV_JOB_ID, "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        raw = os.environ.get(name, "").strip()
        if raw and raw.lower() != "none":
            return raw
    pid = os.getppid() if "RANK" in os.environ else os.getpid()
    return f"local-{socket.gethostname()}-{pid}"


def _launcher() -> str:
    if "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ:
        return "torchrun"
    if "SLURM_JOB_ID" in os.environ:
        return "slurm"
    return "RANK" if "RANK" in os.environ else "none"


def _default_info() -> dict[str, str]:
    info = {
        "argv": shlex.join(str(a) for a in getattr(sys, "argv", ())),
        "executable": sys.executable,
        "python": sys.version.split()[0],
        "ppid": str(os.getppid()),
        "launcher": _launcher(),
        "sdk_wire_version": str(VERSION),
    }
    with contextlib.suppress(OSError):
        info["cwd"] = os.getcwd()
    return info


def _encode_info(info: dict[str, str], room: int) -> bytes:
    """JSON of `info`, trimmed entry by entry so the init datagram stays under MAX_DATAGRAM."""
    kept: dict[str, str] = {}
    for key, value in info.items():
        trial = dict(kept)
        trial[str(key)[:MAX_NAME_BYTES]] = str(value)[:MAX_INFO_VALUE_CHARS]
        if len(json.dumps(trial).encode()) > room:
            kept["info_truncated"] = "1"
            break
        kept = trial
    return json.dumps(kept).encode()


def _extras_codec(keys: tuple[str, ...]) -> tuple[bytes, struct.Struct] | None:
    """Names block and value packer for one set of extra keyword names; None if unencodable."""
    if len(keys) > MAX_EXTRA:
        return None
    parts = [bytes((len(keys),))]
    for key in keys:
        try:
            raw = key.encode("utf-8")
        except UnicodeEncodeError:
            return None
        if len(raw) > MAX_NAME_BYTES:
            return None
        parts.append(bytes((len(raw),)))
        parts.append(raw)
    names = b"".join(parts)
    if RECORD.size + len(names) + 8 * len(keys) > MAX_RECORD:
        return None
    return names, struct.Struct(f"<{len(keys)}d")


def _env_coalesce_s() -> float:
    raw = os.environ.get(ENV_COALESCE_MS, "").strip()
    try:
        return max(0.0, float(raw) / 1000.0) if raw else COALESCE_S
    except ValueError:
        return COALESCE_S


class Client:
    """One process's connection to the agent; `init()` keeps one per process."""

    __slots__ = (
        "__weakref__",
        "_buf",
        "_buf_bytes",
        "_codecs",
        "_enabled",
        "_explicit_path",
        "_init_datagram",
        "_last_send_ns",
        "_next_try",
        "_pack",
        "_prefix",
        "_sock",
        "_window_ns",
        "dropped",
        "info",
        "job_id",
        "local_rank",
        "rank",
        "retry_interval_s",
        "sent",
        "socket_path",
        "world_size",
    )

    def __init__(
        self,
        *,
        job_id: str | None = None,
        rank: int | None = None,
        local_rank: int | None = None,
        world_size: int | None = None,
        socket_path: str | None = None,
        enabled: bool | None = None,
        info: dict[str, Any] | None = None,
        coalesce_s: float | None = None,
    ) -> None:
        if enabled is None:
            enabled = os.environ.get(ENV_DISABLED, "").strip().lower() not in _TRUE_WORDS
        self._enabled = bool(enabled)
        job = str(job_id) if job_id else _env_job_id()
        # Trim to MAX_JOB_ID_BYTES without splitting a UTF-8 sequence.
        self.job_id = job.encode("utf-8", "replace")[:MAX_JOB_ID_BYTES].decode("utf-8", "ignore")
        self.rank = _as_int(rank, _env_int(("RANK", "SLURM_PROCID"), 0))
        self.local_rank = _as_int(local_rank, _env_int(("LOCAL_RANK", "SLURM_LOCALID"), 0))
        self.world_size = _as_int(world_size, _env_int(("WORLD_SIZE", "SLURM_NTASKS"), 1))
        merged = _default_info()
        merged.update({str(k): str(v) for k, v in (info or {}).items()})
        self.info = merged
        self._explicit_path = socket_path
        self.socket_path = socket_path or default_socket_path()
        self.sent = 0
        self.dropped = 0
        self.retry_interval_s = RETRY_INTERVAL_S
        self._window_ns = int((_env_coalesce_s() if coalesce_s is None else coalesce_s) * 1e9)
        self._sock: socket.socket | None = None
        self._next_try = 0.0
        self._last_send_ns = 0
        self._buf: list[bytes] = []
        self._buf_bytes = 0
        self._codecs: dict[tuple[str, ...], tuple[bytes, struct.Struct] | None] = {}
        self._pack = RECORD.pack

        jb = self.job_id.encode()
        ids = (self.rank, self.local_rank, self.world_size, len(jb))
        self._prefix = HEADER.pack(MAGIC, VERSION, KIND_LOG, *ids) + jb
        head = HEADER.pack(MAGIC, VERSION, KIND_INIT, *ids) + jb
        head += RECORD.pack(RECORD.size, 0, -1, _NAN, _NAN, _NAN, _NAN)  # ts 0: stamped on receipt
        self._init_datagram = head + _encode_info(merged, MAX_DATAGRAM - len(head))
        if self._enabled:
            self._connect()

    @property
    def enabled(self) -> bool:
        """Whether log() does anything at all."""
        return self._enabled

    @property
    def connected(self) -> bool:
        """Whether a socket to the agent is open now (it may still refuse a datagram)."""
        return self._sock is not None

    def _connect(self) -> socket.socket | None:
        """Open, connect and register; on failure arm the retry timer and return None."""
        self._next_try = time.monotonic() + self.retry_interval_s
        if self._explicit_path is None:
            self.socket_path = default_socket_path()
        sock = None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF_BYTES)
            sock.connect(self.socket_path)
            # Registration first, so the agent learns this pid before its first record.
            with contextlib.suppress(BlockingIOError):
                sock.send(self._init_datagram)
        except Exception:
            if sock is not None:
                sock.close()
            return None
        self._sock = sock
        return sock

    def update_info(self, info: dict[str, str]) -> None:
        """Merge strings into the registration and send it again (fingerprints, seeds, checkpoints)."""
        self.info.update({str(k): str(v) for k, v in info.items()})
        head = HEADER.pack(MAGIC, VERSION, KIND_INIT, self.rank, self.local_rank, self.world_size,
                           len(self.job_id.encode())) + self.job_id.encode()
        head += RECORD.pack(RECORD.size, 0, -1, _NAN, _NAN, _NAN, _NAN)
        self._init_datagram = head + _encode_info(self.info, MAX_DATAGRAM - len(head))
        if not self._enabled:
            return
        sock = self._sock or self._connect()
        if sock is None:
            self.dropped += 1
            return
        try:
            sock.send(self._init_datagram)
        except OSError:
            self.dropped += 1
            self._disconnect()

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        self._next_try = time.monotonic() + self.retry_interval_s
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def log(
        self,
        step: int | None = None,
        loss: float | None = None,
        grad_norm: float | None = None,
        lr: float | None = None,
        tokens: float | None = None,
        **more: float,
    ) -> None:
        """Record one step; see the module-level `log`."""
        self._log(step, loss, grad_norm, lr, tokens, more)

    def _log(
        self,
        step: Any,
        loss: Any,
        grad_norm: Any,
        lr: Any,
        tokens: Any,
        more: dict[str, Any],
    ) -> None:
        # Hot path: one clock read, one struct pack, then either an append or one send().
        if not self._enabled:
            return
        ts = _time_ns()
        try:
            if more:
                rec = self._pack_extras(ts, step, loss, grad_norm, lr, tokens, more)
                if rec is None:
                    self.dropped += 1
                    return
            else:
                try:
                    rec = self._pack(
                        50,  # RECORD.size
                        ts,
                        -1 if step is None else step,
                        _NAN if loss is None else loss,
                        _NAN if grad_norm is None else grad_norm,
                        _NAN if lr is None else lr,
                        _NAN if tokens is None else tokens,
                    )
                except (struct.error, TypeError, ValueError, OverflowError):
                    rec = self._pack_slow(RECORD.size, ts, step, loss, grad_norm, lr, tokens)
        except Exception:
            self.dropped += 1
            return
        buf = self._buf
        buf.append(rec)
        self._buf_bytes += len(rec)
        if 0 <= ts - self._last_send_ns < self._window_ns and self._buf_bytes < MAX_BATCH_BYTES:
            return  # coalesce: goes out with a later call, flush() or exit
        self._flush(ts)

    def _pack_extras(
        self, ts: int, step: Any, loss: Any, grad_norm: Any, lr: Any, tokens: Any, more: dict[str, Any]
    ) -> bytes | None:
        keys = tuple(more)
        codec = self._codecs.get(keys, False)
        if codec is False:
            codec = _extras_codec(keys)
            if len(self._codecs) >= 256:
                self._codecs.clear()
            self._codecs[keys] = codec
        if codec is None:
            return None
        names, packer = codec  # type: ignore[misc]
        size = RECORD.size + len(names) + packer.size
        try:
            head = self._pack(
                size,
                ts,
                -1 if step is None else step,
                _NAN if loss is None else loss,
                _NAN if grad_norm is None else grad_norm,
                _NAN if lr is None else lr,
                _NAN if tokens is None else tokens,
            )
        except (struct.error, TypeError, ValueError, OverflowError):
            head = self._pack_slow(size, ts, step, loss, grad_norm, lr, tokens)
        return head + names + packer.pack(*more.values())

    def _pack_slow(self, size: int, ts: int, step: Any, loss: Any, grad_norm: Any, lr: Any, tokens: Any) -> bytes:
        """Accept a float step that is integral (100.0); anything else non-numeric raises."""
        if any(isinstance(v, (str, bytes)) for v in (step, loss, grad_norm, lr, tokens)):
            raise TypeError("strings are not metrics")
        if step is None:
            istep = -1
        else:
            fstep = float(step)
            if not fstep.is_integer():
                raise ValueError("step must be an integer")
            istep = int(fstep)
        vals = [_NAN if v is None else float(v) for v in (loss, grad_norm, lr, tokens)]
        return self._pack(size, ts, istep, *vals)

    def _flush(self, now_ns: int) -> None:
        """Send everything held as one datagram; count it sent or dropped."""
        buf = self._buf
        n = len(buf)
        if not n:
            return
        data = self._prefix + (buf[0] if n == 1 else b"".join(buf))
        buf.clear()
        self._buf_bytes = 0
        self._last_send_ns = now_ns
        sock = self._sock
        if sock is None:
            if time.monotonic() < self._next_try:
                self.dropped += n
                return
            sock = self._connect()
            if sock is None:
                self.dropped += n
                return
        try:
            sock.send(data)
        except BlockingIOError:  # the agent's queue is full: drop, keep the connection
            self.dropped += n
        except Exception:  # agent gone or restarted: reconnect later, re-registering
            self._disconnect()
            self.dropped += n
        else:
            self.sent += n

    def flush(self) -> None:
        """Send records held back by coalescing now (before a long pause, at exit)."""
        try:
            self._flush(time.time_ns())
        except Exception:
            self.dropped += len(self._buf)
            self._buf.clear()
            self._buf_bytes = 0

    def stats(self) -> dict[str, int]:
        """log() records handed to the kernel, dropped, and held for coalescing (not init)."""
        return {"sent": self.sent, "dropped": self.dropped, "pending": len(self._buf)}

    def _forget_buffer(self) -> None:
        """In a forked child: records held belong to the parent, which will send them."""
        self._buf.clear()
        self._buf_bytes = 0

    def close(self) -> None:
        """Flush, close the socket; a later log() reconnects."""
        self.flush()
        self._disconnect()
        self._next_try = 0.0


_client: Client | None = None


def init(
    *,
    job_id: str | None = None,
    rank: int | None = None,
    local_rank: int | None = None,
    world_size: int | None = None,
    socket_path: str | None = None,
    enabled: bool | None = None,
    info: dict[str, Any] | None = None,
) -> Client:
    """Set this process's identity and register with the agent; never raises.

    Unset arguments come from the environment: RANK/LOCAL_RANK/WORLD_SIZE (torchrun), else
    SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, else 0/0/1; the job id as in `_env_job_id`;
    `enabled=None` means "on unless GPUSOC_SDK_DISABLED=1". Calling it again replaces the
    previous identity.
    """
    global _client
    old = _client
    try:
        client = Client(
            job_id=job_id,
            rank=rank,
            local_rank=local_rank,
            world_size=world_size,
            socket_path=socket_path,
            enabled=enabled,
            info=info,
        )
    except Exception:  # nothing about the environment may break a training job
        client = Client(job_id=f"local-{os.getpid()}", enabled=False)
    _client = client
    if old is not None:
        old.close()
    return client


def log(
    step: int | None = None,
    loss: float | None = None,
    grad_norm: float | None = None,
    lr: float | None = None,
    tokens: float | None = None,
    **more: float,
) -> None:
    """Send one step's metrics to the agent without blocking or raising.

    Missing values travel as NaN (step as -1); `more` is any other numeric keyword. A record
    with a non-numeric value, or one that cannot be sent, is counted as dropped. Records
    logged within COALESCE_S of the previous send ride along with the next call. Tensors are
    accepted via float(), which waits for a CUDA tensor: pass `.item()` values you already
    have. Calls before `init()` initialise from the environment.
    """
    client = _client
    if client is None:
        client = init()
    client._log(step, loss, grad_norm, lr, tokens, more)


def flush() -> None:
    """Send held records now, e.g. before a long evaluation pause; never raises."""
    if _client is not None:
        _client.flush()


def fingerprint(code_paths: list[str] | None = None, config: Any = None, seed: int | None = None) -> dict[str, str]:
    """Report what this run is: a hash of its code, of its config and its seed; call again on change.

    The agent attaches them to the job's registration; the console alerts when they change during a
    run or differ between ranks (docs/detection.md). Default code path: the entry script's folder.
    Never raises into the training loop; returns what was sent.
    """
    try:
        from agent import fingerprint as fp

        paths = code_paths if code_paths is not None else [os.path.dirname(os.path.abspath(sys.argv[0] or "."))]
        info = {"code_fingerprint": fp.code_fingerprint(paths)}
        if config is not None:
            info["config_fingerprint"] = fp.config_fingerprint(config)
        if seed is not None:
            info["seed"] = str(int(seed))
        client = _client or init()
        client.update_info(info)
        return info
    except Exception:
        return {}


def param_checksum(model: Any, sample: int = 4096) -> float:
    """A cheap checksum of a PyTorch model's parameters: log it as `sdk.log(..., param_checksum=...)`.

    Data-parallel replicas hold identical parameters after each step, so replicas that disagree
    at the same step are flagged (T4: flipped update directions). NaN if it cannot be computed.
    """
    try:
        from agent.fingerprint import param_checksum as _checksum

        return float(_checksum(model, sample=sample))
    except Exception:
        return math.nan


def checkpoint_saved(directory: str, step: int, key_path: str, run: str = "") -> str:
    """Sign a checkpoint directory right after saving it (manifest of SHA-256s + Ed25519).

    Rollbacks only restore signed checkpoints (docs/response.md). Returns the manifest digest, or
    "" if signing failed (the failure is counted as a drop; the training loop is never interrupted).
    """
    client = _client or init()
    try:
        from agent.act.checkpoints import sign_checkpoint

        digest = sign_checkpoint(directory, key_path, client.job_id, run or client.job_id, int(step),
                                 client.world_size)
        client.update_info({"last_checkpoint": os.path.abspath(directory), "last_checkpoint_step": str(step)})
        return digest
    except Exception:
        client.dropped += 1
        return ""


def stats() -> dict[str, int]:
    """{'sent', 'dropped', 'pending'} counts of this process's log() records."""
    client = _client
    return client.stats() if client is not None else {"sent": 0, "dropped": 0, "pending": 0}


def close() -> None:
    """Flush and forget the current client; the next log() auto-initialises again."""
    global _client
    client, _client = _client, None
    if client is not None:
        client.close()


def _after_fork_in_child() -> None:
    if _client is not None:
        _client._forget_buffer()


atexit.register(flush)
os.register_at_fork(after_in_child=_after_fork_in_child)
