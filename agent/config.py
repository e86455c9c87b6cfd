"""Agent configuration: defaults < TOML file < environment (GPUSOC_AGENT_*) < command-line flags.

The file holds one table, ``[agent]``, whose keys are exactly the `AgentConfig` field names
(flat; TLS paths are ``tls_cert``/``tls_key``/``tls_client_ca``). See docs/config.md.
Every error is a `ConfigError` naming the key and where the bad value came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import socket
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_CONFIG_PATH",
    "ENV_PREFIX",
    "AgentConfig",
    "ConfigError",
    "enforce_insecure_loopback",
    "env_var_name",
    "is_loopback",
    "load_config",
    "split_listen",
]

DEFAULT_CONFIG_PATH = "/etc/gpusoc/agent.toml"
ENV_PREFIX = "GPUSOC_AGENT_"
#: Names the config file when `load_config(path=None)`; such a path is explicit, so it must exist.
ENV_CONFIG_PATH = "GPUSOC_AGENT_CONFIG"
# Same prefix, not config keys: the training SDK reads GPUSOC_AGENT_SOCKET (docs/sdk.md).
ENV_NOT_CONFIG = frozenset({ENV_CONFIG_PATH, "GPUSOC_AGENT_SOCKET"})
MIB = 1024 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """Bad configuration; `key` and `source` say which setting and where it came from."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.source = source


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the agent reads at start-up; immutable so it can be shared across threads."""

    host: str = field(default_factory=socket.gethostname)  # identity in frames; = agent cert CN in mTLS
    listen: str = "0.0.0.0:7443"  # HOST:PORT, IPv6 in brackets; port 0 = pick a free port
    insecure: bool = False  # plaintext gRPC, loopback only (see enforce_insecure_loopback)
    tls_cert: str = "/etc/gpusoc/tls/agent.pem"
    tls_key: str = "/etc/gpusoc/tls/agent.key"
    tls_client_ca: str = "/etc/gpusoc/tls/console-ca.pem"
    sample_interval_s: float = 1.0  # 0.1 .. 60
    simulate_gpus: int = 0  # 0 = real NVML; 1..64 simulated GPUs
    training_socket: str = ""  # "" = the SDK's default socket path
    buffer_seconds: float = 3600.0  # history kept (spool: soft age bound), >= 60
    buffer_max_bytes: int = 64 * MIB  # spool: soft size bound; hard bound 2x for frames no console stored
    spool: bool = True  # durable on-disk spool under <state_dir>/spool; false = memory only
    state_dir: str = "/var/lib/gpusoc"
    log_level: str = "info"  # debug | info | warning | error
    # Response (docs/response.md): signed control commands and signed-checkpoint rollback.
    operator_ca: str = "/etc/gpusoc/tls/operator-ca.pem"  # operator signatures must chain here; absent = no commands
    checkpoint_root: str = ""  # checkpoints of job J live in <checkpoint_root>/J/<name>/; "" = SDK-registered only
    trusted_checkpoint_keys: str = ""  # comma-separated Ed25519 public key/cert PEM files (+ state_dir ones)
    freeze_signers: int = 1  # distinct operators a freeze needs
    resume_signers: int = 2  # ... a resume
    rollback_signers: int = 2  # ... a rollback (break-glass: two admins, always)
    rollback_max_steps_back: int = 0  # > 0: floor = newest signed step - this; 0 = only the persisted floor
    watch_paths: str = ""  # comma-separated folders (job code, shared envs) fingerprinted for changes
    integrity_packages: str = "torch,transformers,accelerate,deepspeed,megatron-core,numpy"  # RECORD-checked
    integrity_interval_s: float = 300.0  # seconds between integrity checks, >= 10
    metrics_listen: str = ""  # Prometheus /metrics with dcgm-exporter names, e.g. "0.0.0.0:9400"; "" = off


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AgentConfig))
_NO_OVERRIDES: Mapping[str, object] = MappingProxyType({})


def env_var_name(key: str) -> str:
    """The environment variable for a config key, e.g. sample_interval_s -> GPUSOC_AGENT_SAMPLE_INTERVAL_S."""
    return ENV_PREFIX + key.upper()


# --------------------------------------------------------------------------- listen addresses

_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$"
)


def split_listen(listen: str) -> tuple[str, int]:
    """Split HOST:PORT (``[v6]:PORT`` for IPv6) so the server and the loopback check agree on parsing.

    Raises ValueError with a one-line reason; the host comes back without brackets.
    """
    if not isinstance(listen, str):
        raise ValueError(f"expected HOST:PORT, got {type(listen).__name__}")
    if listen.startswith("["):
        end = listen.find("]")
        if end < 0 or not listen[end + 1 :].startswith(":"):
            raise ValueError("expected [IPv6]:PORT")
        host, port_s = listen[1:end], listen[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_s = listen.rpartition(":")
        if not sep or not host:
            raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:7443 or [::]:7443")
        if ":" in host:
            raise ValueError("IPv6 addresses must be in brackets, e.g. [::1]:7443")
        if _HOSTNAME_RE.match(host) is None:
            raise ValueError(f"{host!r} is not a valid host name or address")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"port {port_s!r} must be an integer 0..65535")
    return host, int(port_s)


def is_loopback(listen: str) -> bool:
    """True when HOST:PORT binds loopback only; unparsable or wildcard addresses count as not loopback."""
    try:
        host, _ = split_listen(listen)
    except ValueError:
        return False
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def enforce_insecure_loopback(cfg: AgentConfig) -> tuple[AgentConfig, str | None]:
    """Keep plaintext gRPC off the network: insecure mode is rebound to 127.0.0.1 (same port).

    Returns the possibly rewritten config and a warning for the operator, or None when unchanged.
    """
    if not cfg.insecure or is_loopback(cfg.listen):
        return cfg, None
    try:
        _, port = split_listen(cfg.listen)
    except ValueError:
        port = 0
    new_listen = f"127.0.0.1:{port}"
    warning = (
        f"insecure mode serves plaintext gRPC on loopback only: listen {cfg.listen} rewritten to {new_listen}"
    )
    return dataclasses.replace(cfg, listen=new_listen), warning


# --------------------------------------------------------------------------- per-key parsing

# Each checker takes an already-typed value and returns it normalised, or raises ValueError(reason).
_Checker = Callable[[Any], Any]


def _range(lo: float, hi: float | None, unit: str = "") -> _Checker:
    def check(v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        if v < lo or (hi is not None and v > hi):
            raise ValueError(
                f"must be between {_num(lo)} and {_num(hi)}{unit}"
                if hi is not None
                else f"must be >= {_num(lo)}{unit}"
            )
        return v

    return check


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _non_empty(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    return v


def _host(v: str) -> str:
    if not v or len(v) > 253 or any(c.isspace() or not c.isprintable() for c in v):
        raise ValueError("must be 1-253 printable characters without spaces")
    return v


def _listen(v: str) -> str:
    split_listen(v)
    return v


def _log_level(v: str) -> str:
    level = v.strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return level


def _any(v: Any) -> Any:
    return v


def _metrics_listen(v: str) -> str:
    return v if v == "" else _listen(v)


_CHECKS: dict[str, _Checker] = {
    "host": _host,
    "listen": _listen,
    "insecure": _any,
    "tls_cert": _non_empty,
    "tls_key": _non_empty,
    "tls_client_ca": _non_empty,
    "sample_interval_s": _range(0.1, 60),
    "simulate_gpus": _range(0, 64),
    "training_socket": _any,
    "buffer_seconds": _range(60, None),
    "buffer_max_bytes": _range(MIB, None, " (1 MiB)"),
    "state_dir": _non_empty,
    "log_level": _log_level,
    "operator_ca": _any,
    "checkpoint_root": _any,
    "trusted_checkpoint_keys": _any,
    "freeze_signers": _range(1, 8),
    "resume_signers": _range(1, 8),
    "rollback_signers": _range(1, 8),
    "rollback_max_steps_back": _range(0, None),
    "metrics_listen": _metrics_listen,
    "spool": _any,
    "watch_paths": _any,
    "integrity_packages": _any,
    "integrity_interval_s": _range(10, None),
}
_TYPES: dict[str, type] = typing.get_type_hints(AgentConfig)


def _from_string(key: str, text: str) -> object:
    """Parse an environment/flag string into the key's type; ValueError carries the reason."""
    kind = _TYPES[key]
    if kind is bool:
        word = text.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
        raise ValueError("not a boolean (use 1/0, true/false, yes/no, on/off)")
    if kind is int:
        try:
            return int(text.strip())
        except ValueError:
            raise ValueError("not an integer") from None
    if kind is float:
        try:
            return float(text.strip())
        except ValueError:
            raise ValueError("not a number") from None
    return text


def _typed(key: str, value: object) -> object:
    """Check a TOML/flag value has the key's type; ints are fine where floats are expected."""
    kind = _TYPES[key]
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("not an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("not a number")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _known(key: str, names: tuple[str, ...] = FIELD_NAMES) -> str:
    """The known names, led by a guess at what a typo meant."""
    guess = difflib.get_close_matches(key, names, n=1)
    return (f"did you mean {guess[0]!r}? " if guess else "") + "known: " + ", ".join(names)


# --------------------------------------------------------------------------- sources


def _read_file(path: str, explicit: bool) -> dict[str, object]:
    """The [agent] table of a TOML file; {} when the default path is absent."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file not found: {path}", source=path) from None
        return {}
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory", source=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}", source=path) from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 (byte {exc.start})", source=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}", source=path) from None
    for top, value in doc.items():
        if top != "agent":
            where = "table" if isinstance(value, dict) else "key"
            hint = "; agent settings go under [agent]" if top in FIELD_NAMES else " (only [agent] is read)"
            raise ConfigError(f"{path}: unknown {where} {top!r} at top level{hint}", key=top, source=path)
    table = doc.get("agent", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: 'agent' must be a table ([agent])", key="agent", source=path)
    return table


def load_config(
    path: str | None,
    env: Mapping[str, str] = os.environ,
    overrides: Mapping[str, object] = _NO_OVERRIDES,
) -> AgentConfig:
    """Merge defaults, file, environment and flags, validating each value where it was set.

    `path=None` means $GPUSOC_AGENT_CONFIG if set, else /etc/gpusoc/agent.toml; only the latter may be
    absent. `overrides` are argparse values keyed by field name, None meaning "flag not given".
    """
    values: dict[str, object] = {}

    explicit = path is not None
    if path is None and env.get(ENV_CONFIG_PATH):
        path, explicit = env[ENV_CONFIG_PATH], True
    file_path = path if path is not None else DEFAULT_CONFIG_PATH
    for key, raw in _read_file(file_path, explicit).items():
        where = f"{file_path}: [agent] {key}"
        if key not in _CHECKS:
            raise ConfigError(
                f"{file_path}: unknown key {key!r} in [agent] ({_known(key)})", key=key, source=file_path
            )
        values[key] = _validate(key, raw, _typed, f"{where} = {_show(raw)}", file_path)

    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_CONFIG:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in _CHECKS:
            known = _known(name, tuple(env_var_name(k) for k in FIELD_NAMES))
            raise ConfigError(f"unknown environment variable {name} ({known})", key=key, source=name)
        text = env[name]
        values[key] = _validate(key, text, _from_string, f"{name}={text!r}", name)

    for key, raw in overrides.items():
        if raw is None:
            continue
        if key not in _CHECKS:
            raise ConfigError(f"unknown override {key!r} ({_known(key)})", key=key, source="command line")
        conv = _from_string if isinstance(raw, str) else _typed
        values[key] = _validate(key, raw, conv, f"command line: {key} = {_show(raw)}", "command line")

    return AgentConfig(**values)  # type: ignore[arg-type]


def _validate(
    key: str, raw: object, convert: Callable[[str, Any], object], where: str, source: str
) -> object:
    try:
        return _CHECKS[key](convert(key, raw))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}", key=key, source=source) from None


def _show(value: object) -> str:
    """Render a value the way TOML would spell it, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
