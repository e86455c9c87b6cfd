"""Console side of signed control commands: operators, payloads, signatures, fan-out and receipts.

The agent enforces every rule itself (docs/response.md §4); this module fails early with a clear
message where the console can tell in advance (viewer role, same operator twice, expired
command), fans one envelope out to every host of a job (EXECUTE for one host, PREPARE with a
shared `commit_at` then RESULT for several), verifies each receipt against the agent's pinned
receipt key and appends every step to the audit chain. Qt-free; blocking calls (use a worker).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from console.ingest.tls import ConsoleTls
from console.respond.audit import ACTION_COMMAND, ACTION_RECEIPT, AuditRecord, AuditTrail
from protos import serde, signing
from protos.types import (
    ACTION_FREEZE,
    ACTION_RESUME,
    ACTION_ROLLBACK,
    ACTIONS,
    MAX_COMMAND_TTL_NS,
    PHASE_ABORT,
    PHASE_EXECUTE,
    PHASE_PREPARE,
    PHASE_RESULT,
    ROLE_ADMIN,
    ROLE_RESPONDER,
    ROLES,
    STATUS_ABORTED,
    STATUS_EXECUTED,
    STATUS_FAILED,
    STATUS_PENDING,
    STATUS_PREPARED,
    STATUS_REFUSED,
    CheckpointList,
    CommandEnvelope,
    CommandPayload,
    CommandRequest,
    ControlState,
    Receipt,
    SignedReceipt,
)

log = logging.getLogger("gpusoc.console.respond")

#: The agent's default policy (agent.act.commands.Policy); ControlState.min_signers overrides it.
DEFAULT_MIN_SIGNERS: Final[Mapping[str, int]] = {ACTION_FREEZE: 1, ACTION_RESUME: 2, ACTION_ROLLBACK: 2}
BREAK_GLASS_ADMINS: Final = 2
#: Roles that may approve each action (mirrors the agent; viewers approve nothing).
ACTION_ROLES: Final[Mapping[str, frozenset[str]]] = {
    ACTION_FREEZE: frozenset({ROLE_RESPONDER, ROLE_ADMIN}),
    ACTION_RESUME: frozenset({ROLE_RESPONDER, ROLE_ADMIN}),
    ACTION_ROLLBACK: frozenset({ROLE_RESPONDER, ROLE_ADMIN}),
}
#: NCCL's default collective timeout, for frozen jobs whose receipt carries none.
NCCL_DEFAULT_TIMEOUT_S: Final = 600
#: Command lifetime: a freeze is signed and sent at once; actions needing a second operator
#: get the protocol's maximum so the approval can be collected inside it.
SINGLE_SIGNER_TTL_S: Final = 60.0
MULTI_SIGNER_TTL_S: Final = MAX_COMMAND_TTL_NS / 1e9

# Audit `action` values written by this module (console/respond/audit.py names the common ones).
AUDIT_KEY_PINNED: Final = "command.key_pinned"
AUDIT_PREPARE: Final = "command.prepare"
AUDIT_NO_ANSWER: Final = "command.no_answer"
AUDIT_ABORT: Final = "command.abort"
AUDIT_OUTCOME: Final = "command.outcome"

# Per-host states of a dispatch (the console's words, not the agent's receipt statuses).
CONFIRMED: Final = "confirmed"
REFUSED: Final = "refused"
FAILED: Final = "failed"
ABORTED: Final = "aborted"
NO_ANSWER: Final = "no answer"
BAD_RECEIPT: Final = "bad receipt"
WAITING: Final = "waiting"
PREPARED: Final = "prepared"
NOT_SENT: Final = "not sent"
FINAL_STATES: Final = frozenset({CONFIRMED, REFUSED, FAILED, ABORTED, NO_ANSWER, BAD_RECEIPT, NOT_SENT})
#: States that need an operator decision now (a host that did not confirm, or did something else).
ALARM_STATES: Final = frozenset({NO_ANSWER, BAD_RECEIPT, FAILED})

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2

_CHANNEL_OPTIONS: Final = [
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

# (sql, params) -> rows: the store's read side (StoreWriter.read_query), callable from a worker.
Query = Callable[[str, list[object]], list[tuple[Any, ...]]]


class CommandError(Exception):
    """A command the console refuses to build, sign or send; the message says why and what to do."""


# --------------------------------------------------------------------------- operators


def _name_attr(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [a.value if isinstance(a.value, str) else a.value.decode() for a in cert.subject.get_attributes_for_oid(oid)]


def _raw(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True, slots=True)
class SignerInfo:
    """Who signed an envelope, read from the certificate it carries (the agent verifies the chain)."""

    name: str
    role: str
    key_id: str
    cert_sha256: str
    signature_ok: bool
    not_after: dt.datetime | None = None

    @property
    def label(self) -> str:
        """"name:role", as receipts and the audit trail write signers."""
        return f"{self.name}:{self.role}"


def read_operator_certificate(cert_pem: bytes, source: str = "certificate") -> tuple[x509.Certificate, str, str,
                                                                                      Ed25519PublicKey]:
    """(certificate, name, role, public key) of an operator certificate; CommandError if it is not one.

    Same shape rules as the agent (one CN, one OU that is a role, Ed25519 key); the chain to the
    operator CA is checked by the agent, and here only when a CA is given to `Operator.load`.
    """
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise CommandError(f"{source}: not a PEM certificate ({exc})") from None
    if len(certs) != 1:
        raise CommandError(f"{source}: expected exactly one certificate, found {len(certs)}")
    cert = certs[0]
    pub = cert.public_key()
    if not isinstance(pub, Ed25519PublicKey):
        raise CommandError(f"{source}: not an operator certificate (key is not Ed25519)")
    roles = _name_attr(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(roles) != 1 or roles[0] not in ROLES:
        raise CommandError(f"{source}: not an operator certificate (OU {roles}, expected one of {', '.join(ROLES)})")
    names = _name_attr(cert, NameOID.COMMON_NAME)
    if len(names) != 1 or not names[0]:
        raise CommandError(f"{source}: operator certificate needs exactly one commonName")
    return cert, names[0], roles[0], pub


@dataclass(frozen=True)
class Operator:
    """One operator's signing identity: certificate (role = subject OU) and Ed25519 private key."""

    name: str
    role: str
    cert_pem: bytes
    key: Ed25519PrivateKey = field(repr=False)
    key_id: str
    cert_sha256: str
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def label(self) -> str:
        """"name:role"."""
        return f"{self.name}:{self.role}"

    @classmethod
    def load(cls, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str], *,
             operator_ca: str | os.PathLike[str] | None = None, now: dt.datetime | None = None) -> Operator:
        """Read `gpusoc-agent pki operator` output; CommandError naming the file when anything is off."""
        cert_p, key_p = Path(cert_path), Path(key_path)
        try:
            cert_pem = cert_p.read_bytes()
        except OSError as exc:
            raise CommandError(f"operator certificate {cert_p}: {exc.strerror or exc}") from None
        try:
            key_pem = key_p.read_bytes()
        except OSError as exc:
            raise CommandError(f"operator key {key_p}: {exc.strerror or exc}") from None
        ca_pem = None
        if operator_ca is not None:
            try:
                ca_pem = Path(operator_ca).read_bytes()
            except OSError as exc:
                raise CommandError(f"operator CA {operator_ca}: {exc.strerror or exc}") from None
        return cls.from_pem(cert_pem, key_pem, source=str(cert_p), key_source=str(key_p), operator_ca_pem=ca_pem,
                            now=now)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes, *, source: str = "operator certificate",
                 key_source: str = "operator key", operator_ca_pem: bytes | None = None,
                 now: dt.datetime | None = None) -> Operator:
        """Parse and cross-check certificate and key (the key must be the certificate's)."""
        cert, name, role, pub = read_operator_certificate(cert_pem, source)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:
            raise CommandError(f"{key_source}: the key is encrypted; give an unencrypted PKCS#8 key") from None
        except ValueError as exc:
            raise CommandError(f"{key_source}: not a PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise CommandError(f"{key_source}: not an Ed25519 private key")
        if _raw(key.public_key()) != _raw(pub):
            raise CommandError(f"{key_source} does not belong to {source}")
        now = now or dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CommandError(
                f"{source}: operator certificate of {name} is not valid now (valid "
                f"{cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}); "
                "ask for a new one (gpusoc-agent pki operator)"
            )
        if operator_ca_pem is not None:
            try:
                cas = x509.load_pem_x509_certificates(operator_ca_pem)
            except ValueError as exc:
                raise CommandError(f"operator CA: not PEM ({exc})") from None
            if not any(_issued_by(cert, ca) for ca in cas):
                raise CommandError(f"{source}: not issued by the given operator CA; agents would refuse it")
        return cls(
            name=name,
            role=role,
            cert_pem=bytes(cert_pem),
            key=key,
            key_id=signing.key_id(key),
            cert_sha256=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )

    def refusal(self, action: str, break_glass: bool = False) -> str | None:
        """Why this operator may not approve `action` (None when the role allows it)."""
        if break_glass and self.role != ROLE_ADMIN:
            return f"{self.label} may not sign a break-glass rollback: it needs two admins"
        if self.role not in ACTION_ROLES.get(action, frozenset()):
            return (f"{self.label} may not sign {action}: role {self.role!r} approves nothing "
                    "(responder or admin needed)")
        return None

    def same_as(self, other: SignerInfo | Operator) -> bool:
        """Same person by name or by key: the agent counts either as one signer."""
        return self.name == other.name or self.key_id == other.key_id


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def envelope_signers(env: CommandEnvelope) -> list[SignerInfo]:
    """Each signature's signer, with whether it verifies over the payload bytes (CommandError if unreadable)."""
    out: list[SignerInfo] = []
    for i, sig in enumerate(env.signatures):
        cert, name, role, pub = read_operator_certificate(sig.certificate_pem, f"signature {i + 1}")
        ok = signing.verify_payload_signature(env.payload, sig.signature, pub)
        out.append(SignerInfo(
            name=name, role=role, key_id=signing.key_id(pub),
            cert_sha256=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
            signature_ok=ok, not_after=cert.not_valid_after_utc,
        ))
    return out


def required_signers(action: str, break_glass: bool = False,
                     policy: Mapping[str, int] = DEFAULT_MIN_SIGNERS) -> int:
    """Distinct operators the agents need for `action` (policy from ControlState when known)."""
    n = int(policy.get(action, DEFAULT_MIN_SIGNERS.get(action, 2)))
    return max(n, BREAK_GLASS_ADMINS) if break_glass else n


# --------------------------------------------------------------------------- payloads and signatures


def build_command(action: str, job: str, hosts: Sequence[str], reason: str, checkpoint_digest: str = "",
                  break_glass: bool = False, *, ttl_s: float | None = None, now_ns: int | None = None
                  ) -> CommandPayload:
    """A fresh payload for every host of the job (CommandError with the rule it breaks).

    Default lifetime: 60 s for a single-signer freeze, the 120 s maximum otherwise so that a
    second operator has time to review and co-sign.
    """
    if action not in ACTIONS:
        raise CommandError(f"unknown action {action!r} (known: {', '.join(ACTIONS)})")
    if ttl_s is None:
        ttl_s = SINGLE_SIGNER_TTL_S if required_signers(action, break_glass) <= 1 else MULTI_SIGNER_TTL_S
    try:
        return signing.make_payload(action, job, sorted(dict.fromkeys(hosts)), reason, ttl_s=ttl_s,
                                    checkpoint_digest=checkpoint_digest, break_glass=break_glass, now_ns=now_ns)
    except signing.SigningError as exc:
        raise CommandError(f"cannot build the {action} command: {exc}") from None


def _check_live(payload: CommandPayload, now_ns: int) -> None:
    if now_ns >= payload.expires_at_ns:
        ago = (now_ns - payload.expires_at_ns) / 1e9
        raise CommandError(f"command {payload.command_id[:8]} expired {ago:.0f} s ago; issue a new one")


def sign(payload: CommandPayload | bytes, operator: Operator, *, now_ns: int | None = None) -> CommandEnvelope:
    """The first signature: the operator's role must allow the action, the command must be live."""
    data = payload if isinstance(payload, bytes) else signing.payload_bytes(payload)
    p = signing.parse_payload(data)
    why = operator.refusal(p.action, p.break_glass)
    if why:
        raise CommandError(why)
    _check_live(p, time.time_ns() if now_ns is None else now_ns)
    return signing.build_envelope(data, [(operator.cert_pem, operator.key)])


def cosign(envelope: CommandEnvelope, operator: Operator, *, now_ns: int | None = None) -> CommandEnvelope:
    """Add a second (third, ...) distinct operator's signature over the same bytes.

    Refuses early what the agent would refuse anyway: the same operator twice (by name or key),
    a role that may not approve, an expired command, or an envelope whose existing signatures
    do not verify (a tampered request file).
    """
    try:
        p = signing.parse_payload(envelope.payload)
    except signing.SigningError as exc:
        raise CommandError(f"the request's payload is not a valid command: {exc}") from None
    signers = envelope_signers(envelope)
    bad = [s.label for s in signers if not s.signature_ok]
    if bad:
        raise CommandError(f"signature of {', '.join(bad)} does not verify over this payload: refusing to co-sign")
    for s in signers:
        if operator.same_as(s):
            raise CommandError(
                f"{operator.label} already signed this command (as {s.label}); a second, different operator "
                "must co-sign (the agents count one person once)"
            )
    why = operator.refusal(p.action, p.break_glass)
    if why:
        raise CommandError(why)
    _check_live(p, time.time_ns() if now_ns is None else now_ns)
    try:
        return signing.add_signature(envelope, operator.cert_pem, operator.key)
    except signing.SigningError as exc:
        raise CommandError(str(exc)) from None


# --------------------------------------------------------------------------- receipt key pins


@dataclass(frozen=True, slots=True)
class PinnedKey:
    """One agent's receipt key as first seen over mTLS (trust on first use)."""

    host: str
    public_key: bytes
    key_id: str
    pinned_at_ns: int
    address: str = ""


class ReceiptKeyPins:
    """host -> pinned receipt key, kept in a JSON file (`<state dir>/receipt-keys.json`) or in memory.

    A pin is taken the first time the console talks to a host (ControlState over mTLS, after
    checking the TLS certificate's CN is that host) and every later receipt must be signed by
    it. A changed key is refused until an operator removes the pin (`command unpin HOST`).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._pins: dict[str, PinnedKey] = {}
        self._load()

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_text("utf-8"))
            for host, v in doc.get("hosts", {}).items():
                raw = bytes.fromhex(v["public_key"])
                if len(raw) != 32 or signing.key_id(raw) != v.get("key_id", signing.key_id(raw)):
                    raise ValueError(f"pin of {host} is malformed")
                self._pins[host] = PinnedKey(host, raw, signing.key_id(raw), int(v.get("pinned_at_ns", 0)),
                                             str(v.get("address", "")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CommandError(f"receipt key pins {self.path} are unreadable ({exc}); fix or remove the file") from None

    def _save(self) -> None:
        if self.path is None:
            return
        doc = {"version": 1, "hosts": {
            h: {"public_key": p.public_key.hex(), "key_id": p.key_id, "pinned_at_ns": p.pinned_at_ns,
                "address": p.address}
            for h, p in sorted(self._pins.items())
        }}
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.tmp")
        try:
            tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", "utf-8")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, host: str) -> PinnedKey | None:
        """The pin of `host`, if any."""
        with self._lock:
            return self._pins.get(host)

    def pin(self, host: str, public_key: bytes, address: str = "") -> PinnedKey:
        """Pin `public_key` for `host` (first use); refuses to replace a different existing pin."""
        with self._lock:
            cur = self._pins.get(host)
            if cur is not None:
                if cur.public_key != public_key:
                    raise CommandError(f"{host} already has a different pinned receipt key")
                return cur
            p = PinnedKey(host, bytes(public_key), signing.key_id(public_key), time.time_ns(), address)
            self._pins[host] = p
            self._save()
            return p

    def unpin(self, host: str) -> bool:
        """Forget `host`'s key (after an agent reinstall); True when there was one."""
        with self._lock:
            if self._pins.pop(host, None) is None:
                return False
            self._save()
            return True

    def all(self) -> dict[str, PinnedKey]:
        """Every pin, by host."""
        with self._lock:
            return dict(self._pins)


def default_state_dir() -> Path:
    """The console's state dir: $GPUSOC_CONSOLE_STATE_DIR, else $XDG_STATE_HOME/gpusoc/console."""
    env = os.environ.get("GPUSOC_CONSOLE_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gpusoc" / "console"


# --------------------------------------------------------------------------- results


@dataclass(slots=True)
class HostResult:
    """One host's row of the confirmation table."""

    host: str
    address: str = ""
    state: str = WAITING
    reason: str = ""
    check: str = ""
    final: Receipt | None = None
    prepared: Receipt | None = None
    rtt_ms: float | None = None
    deadline_ns: int = 0  # when a host still waiting turns into an alarm
    updated_ns: int = 0

    @property
    def alarm(self) -> bool:
        """A host that did not confirm (silent, bad receipt, failed) needs an operator decision."""
        return self.state in ALARM_STATES

    def overdue(self, now_ns: int) -> bool:
        """Still waiting past its deadline: show it as an alarm."""
        return self.state in (WAITING, PREPARED) and self.deadline_ns > 0 and now_ns > self.deadline_ns

    @property
    def executed_at_ns(self) -> int:
        return self.final.executed_at_ns if self.final else 0

    @property
    def confirmed_at_ns(self) -> int:
        return self.final.confirmed_at_ns if self.final else 0

    @property
    def frozen_since_ns(self) -> int:
        return self.final.frozen_since_ns if self.final else 0

    @property
    def collective_timeout_s(self) -> int:
        return self.final.collective_timeout_s if self.final else 0

    @property
    def method(self) -> str:
        r = self.final or self.prepared
        return r.method if r else ""

    def copy(self) -> HostResult:
        """A snapshot to hand to another thread."""
        return replace(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (CLI --json, audit outcome)."""
        return {
            "host": self.host, "address": self.address, "state": self.state, "reason": self.reason,
            "check": self.check, "alarm": self.alarm, "method": self.method,
            "executed_at_ns": self.executed_at_ns, "confirmed_at_ns": self.confirmed_at_ns,
            "frozen_since_ns": self.frozen_since_ns, "collective_timeout_s": self.collective_timeout_s,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "checkpoint_step": self.final.checkpoint_step if self.final else -1,
        }


@dataclass(slots=True)
class DispatchResult:
    """Per-host outcome of one command, plus skew and the audit trail's fate."""

    command_id: str
    action: str
    job: str
    signers: list[str]
    two_phase: bool
    hosts: dict[str, HostResult]
    payload_sha256: str = ""
    commit_at_ns: int = 0
    started_ns: int = 0
    finished_ns: int = 0
    notes: list[str] = field(default_factory=list)
    audit_errors: list[str] = field(default_factory=list)

    @property
    def all_confirmed(self) -> bool:
        return bool(self.hosts) and all(h.state == CONFIRMED for h in self.hosts.values())

    @property
    def partial(self) -> bool:
        """Some hosts confirmed and others did not: the job is half frozen/resumed."""
        states = {h.state for h in self.hosts.values()}
        return CONFIRMED in states and len(states) > 1

    @property
    def alarms(self) -> list[str]:
        return sorted(h.host for h in self.hosts.values() if h.alarm)

    @property
    def skew_ns(self) -> int | None:
        """max - min of executed_at_ns over hosts that executed (agent clocks; needs >= 2 hosts)."""
        ts = [h.executed_at_ns for h in self.hosts.values() if h.executed_at_ns > 0]
        return max(ts) - min(ts) if len(ts) >= 2 else None

    @property
    def exit_code(self) -> int:
        """0 all confirmed, 1 refused/partial/silent."""
        return EXIT_OK if self.all_confirmed else EXIT_REFUSED

    def summary(self) -> str:
        """One line for logs and the status bar."""
        n = len(self.hosts)
        ok = sum(1 for h in self.hosts.values() if h.state == CONFIRMED)
        parts = [f"{self.action} {self.job}: {ok}/{n} confirmed"]
        if self.skew_ns is not None:
            parts.append(f"skew {self.skew_ns / 1e6:.1f} ms")
        if self.alarms:
            parts.append(f"ALARM: {', '.join(self.alarms)} did not confirm")
        if self.partial:
            parts.append("PARTIAL: decide now (retry, or kill and restore)")
        return "; ".join(parts)

    def render(self) -> str:
        """The per-host table as text (CLI)."""
        lines = [f"command {self.command_id} ({'two-phase' if self.two_phase else 'execute'}), "
                 f"signed by {', '.join(self.signers)}"]
        rows = [("host", "state", "method", "executed_at", "detail")]
        for h in sorted(self.hosts.values(), key=lambda x: x.host):
            state = h.state.upper() + (" (ALARM)" if h.alarm else "")
            detail = h.reason
            if h.state == CONFIRMED and h.confirmed_at_ns:
                detail = f"confirmed +{(h.confirmed_at_ns - h.executed_at_ns) / 1e6:.1f} ms" + (
                    f" ({h.reason})" if h.reason else "")
            rows.append((h.host, state, h.method or "-", _iso(h.executed_at_ns), detail))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows]
        lines.append(self.summary())
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"AUDIT ERROR: {e}" for e in self.audit_errors]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "command_id": self.command_id, "action": self.action, "job": self.job, "signers": self.signers,
            "two_phase": self.two_phase, "commit_at_ns": self.commit_at_ns, "skew_ns": self.skew_ns,
            "all_confirmed": self.all_confirmed, "partial": self.partial, "alarms": self.alarms,
            "payload_sha256": self.payload_sha256, "notes": self.notes, "audit_errors": self.audit_errors,
            "hosts": {h: r.to_dict() for h, r in sorted(self.hosts.items())},
        }


def _iso(ns: int) -> str:
    if ns <= 0:
        return "-"
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%H:%M:%S.%f")[:-3] + "Z"


@dataclass(slots=True)
class CheckpointRow:
    """One checkpoint digest across the job's hosts."""

    digest: str
    step: int
    run: str
    world_size: int
    statuses: dict[str, str]  # host -> verified|signed|unsigned|untrusted|invalid|missing
    reasons: dict[str, str]
    below_floor: bool
    created_unix_ns: int = 0
    paths: dict[str, str] = field(default_factory=dict)

    @property
    def eligible(self) -> bool:
        """Verified (signature and every hash) on every host and not below any host's floor."""
        return bool(self.statuses) and all(s == "verified" for s in self.statuses.values()) and not self.below_floor

    @property
    def signed_everywhere(self) -> bool:
        """Signature and file set check out on every host (a shallow listing: not re-hashed yet)."""
        return bool(self.statuses) and all(s in ("verified", "signed") for s in self.statuses.values())

    def status_text(self) -> str:
        """"verified on 2/2" or the first problem."""
        n = len(self.statuses)
        ok = sum(1 for s in self.statuses.values() if s == "verified")
        if ok == n:
            return f"verified on {ok}/{n}" + (" (below floor)" if self.below_floor else "")
        if self.signed_everywhere:
            return (f"signed on {n}/{n}, not re-hashed (rollback verifies every file first)"
                    + (" (below floor)" if self.below_floor else ""))
        bad = sorted((h, s) for h, s in self.statuses.items() if s != "verified")
        h, s = bad[0]
        why = self.reasons.get(h, "")
        return f"{s} on {h}" + (f": {why}" if why else "") + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")


@dataclass(slots=True)
class CheckpointReport:
    """ListCheckpoints of every host of a job, merged by manifest digest (newest step first)."""

    job: str
    hosts: list[str]
    listings: dict[str, CheckpointList]
    errors: dict[str, str]
    rows: list[CheckpointRow] = field(default_factory=list)

    @classmethod
    def merge(cls, job: str, hosts: Sequence[str], listings: Mapping[str, CheckpointList],
              errors: Mapping[str, str]) -> CheckpointReport:
        rows: dict[str, CheckpointRow] = {}
        for host, lst in listings.items():
            for c in lst.checkpoints:
                key = c.manifest_digest or f"unsigned:{host}:{c.path}"
                row = rows.get(key)
                if row is None:
                    row = rows[key] = CheckpointRow(key, c.step, c.run, c.world_size, {}, {}, False,
                                                    c.created_unix_ns)
                row.statuses[host] = c.status
                if c.reason:
                    row.reasons[host] = c.reason
                row.paths[host] = c.path
                row.below_floor |= c.below_floor
        for row in rows.values():
            for host in hosts:
                if host not in row.statuses:
                    row.statuses[host] = "missing" if host in listings else "unknown"
                    row.reasons.setdefault(host, "not listed on this host" if host in listings
                                           else errors.get(host, "no listing"))
        ordered = sorted(rows.values(), key=lambda r: (-r.step, r.digest))
        return cls(job, list(hosts), dict(listings), dict(errors), ordered)

    def find(self, digest: str) -> CheckpointRow | None:
        """The row of a manifest digest."""
        return next((r for r in self.rows if r.digest == digest), None)

    def refusal(self, digest: str) -> str | None:
        """Why a rollback to `digest` must be refused (None when every host verified it)."""
        if self.errors:
            h, e = sorted(self.errors.items())[0]
            return f"cannot list checkpoints on {h}: {e}"
        row = self.find(digest)
        if row is None:
            return f"checkpoint {digest} is not listed on any host of job {self.job}"
        bad = sorted((h, s) for h, s in row.statuses.items() if s != "verified")
        if bad:
            h, s = bad[0]
            why = row.reasons.get(h, "")
            return f"checkpoint step {row.step} is {s} on {h}" + (f" ({why})" if why else "") + \
                "; every host must verify it strictly"
        if row.below_floor:
            return f"checkpoint step {row.step} is below the job's rollback floor (break-glass needs two admins)"
        return None

    def render(self) -> str:
        """Text table (CLI)."""
        if not self.rows and not self.errors:
            return f"no checkpoints listed for job {self.job} on {', '.join(self.hosts)}"
        out = [("step", "status", "digest", "run")]
        for r in self.rows:
            out.append((str(r.step), r.status_text(), r.digest, r.run))
        widths = [max(len(x[i]) for x in out) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(x[:3], widths, strict=True)) + "  " + x[3] for x in out]
        lines += [f"{h}: ERROR {e}" for h, e in sorted(self.errors.items())]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job, "hosts": self.hosts, "errors": self.errors,
            "checkpoints": [
                {"digest": r.digest, "step": r.step, "run": r.run, "world_size": r.world_size,
                 "eligible": r.eligible, "below_floor": r.below_floor, "statuses": r.statuses,
                 "reasons": r.reasons, "paths": r.paths}
                for r in self.rows
            ],
        }


@dataclass(slots=True)
class Probe:
    """ControlState of one host as seen just before sending (key checked against the pin)."""

    host: str
    address: str
    state: ControlState | None = None
    rtt_s: float = 0.0
    error: str = ""
    bad_key: bool = False

    @property
    def ok(self) -> bool:
        return self.state is not None and not self.error


# --------------------------------------------------------------------------- store helpers


def job_hosts(query: Query, job: str, window_s: float = 3600.0) -> list[str]:
    """Hosts of `job` from the store: those whose newest record of it is within `window_s` of the job's newest.

    The window drops hosts a job left long ago (a restart elsewhere) while keeping every host of
    a job that is frozen right now (its newest records all stopped at about the same time).
    """
    rows = query(
        "SELECT host FROM train_samples WHERE job_id = ? GROUP BY host "
        "HAVING epoch_ns(max(ts)) >= (SELECT epoch_ns(max(ts)) FROM train_samples WHERE job_id = ?) - ? "
        "ORDER BY host",
        [job, job, int(window_s * 1e9)],
    )
    return [str(r[0]) for r in rows]


def store_address_of(query: Query) -> Callable[[str], str]:
    """host -> the address the console ingests it from (the store's `hosts.address`)."""

    def address_of(host: str) -> str:
        rows = query("SELECT address FROM hosts WHERE host = ?", [host])
        if not rows or not rows[0][0]:
            raise KeyError(f"no address known for host {host} (is it in the inventory?)")
        return str(rows[0][0])

    return address_of


# --------------------------------------------------------------------------- dispatcher


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _rpc_error(exc: BaseException) -> tuple[str, grpc.StatusCode | None]:
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else ""
        name = code.name if code is not None else "ERROR"
        return f"{name}: {details or 'no details'}", code
    if isinstance(exc, concurrent.futures.TimeoutError | TimeoutError):
        return "no answer before the deadline", grpc.StatusCode.DEADLINE_EXCEEDED
    return f"{type(exc).__name__}: {exc}", None


class CommandDispatcher:
    """Sends a signed envelope to every host of a job and collects verified receipts.

    Single host: EXECUTE. Several hosts: PREPARE everywhere with commit_at = now +
    max(min_commit_delay, 2 x the slowest measured round trip); if any host refuses or is silent
    by shortly before commit_at, ABORT every other host; otherwise RESULT until each host
    confirmed or `confirm_timeout_s` passed. Blocking; call from a worker thread (never the GUI
    thread, never a running event loop). Thread-safe: one dispatcher can serve several workers.
    """

    def __init__(
        self,
        address_of: Callable[[str], str],
        tls: ConsoleTls | None,
        audit: AuditTrail | None = None,
        *,
        pins: ReceiptKeyPins | None = None,
        actor: str = "console",
        min_commit_delay_s: float = 0.3,
        rpc_timeout_s: float = 5.0,
        execute_timeout_s: float = 60.0,
        confirm_timeout_s: float = 20.0,
        result_wait_s: float = 5.0,
        verify_tls_identity: bool = True,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.address_of = address_of
        self.tls = tls
        self.audit = audit
        self.pins = pins if pins is not None else ReceiptKeyPins(None)
        self.actor = actor
        self.min_commit_delay_s = float(min_commit_delay_s)
        self.rpc_timeout_s = float(rpc_timeout_s)
        self.execute_timeout_s = float(execute_timeout_s)
        self.confirm_timeout_s = float(confirm_timeout_s)
        self.result_wait_s = float(result_wait_s)
        self.verify_tls_identity = verify_tls_identity
        self.clock_ns = clock_ns
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._prepare_rtt: dict[str, float] = {}  # host -> last PREPARE round trip (s)

    # ---------------------------------------------------------------- plumbing

    def close(self) -> None:
        """Close every channel."""
        with self._lock:
            chans, self._channels = list(self._channels.values()), {}
        for ch in chans:
            ch.close()

    def __enter__(self) -> CommandDispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                if self.tls is None:
                    ch = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
                else:
                    ch = grpc.secure_channel(address, self.tls.channel_credentials(), options=_CHANNEL_OPTIONS)
                self._channels[address] = ch
            return ch

    def _address(self, host: str) -> str:
        try:
            addr = self.address_of(host)
        except (LookupError, ValueError) as exc:
            detail = str(exc.args[0]) if exc.args and exc.args[0] != host else ""
            raise CommandError(f"no address known for host {host}" + (f" ({detail})" if detail else "")) from None
        if not addr:
            raise CommandError(f"no address known for host {host}")
        return str(addr)

    def _command_future(self, address: str, req: CommandRequest, timeout: float) -> grpc.Future:
        call = self._channel(address).unary_unary(
            serde.COMMAND_METHOD, request_serializer=serde.encode_command_request,
            response_deserializer=serde.decode_signed_receipt)
        return call.future(req, timeout=timeout)

    def _state_future(self, address: str, timeout: float) -> grpc.Future:
        call = self._channel(address).unary_unary(
            serde.CONTROL_STATE_METHOD, request_serializer=lambda _r: serde.encode_control_state_request(),
            response_deserializer=serde.decode_control_state)
        return call.future(b"", timeout=timeout)

    def _checkpoints_future(self, address: str, job: str, deep: bool, timeout: float) -> grpc.Future:
        call = self._channel(address).unary_unary(
            serde.LIST_CHECKPOINTS_METHOD, request_serializer=lambda r: serde.encode_list_checkpoints_request(*r),
            response_deserializer=serde.decode_checkpoint_list)
        return call.future((job, deep), timeout=timeout)

    def _audit(self, records: Iterable[AuditRecord], errors: list[str] | None = None) -> None:
        recs = list(records)
        if self.audit is None or not recs:
            return
        try:
            self.audit.append_many(recs)
        except Exception as exc:  # a failed append must not hide what the agents did
            log.exception("audit append failed")
            if errors is not None:
                errors.append(f"{type(exc).__name__}: {exc}")

    # ---------------------------------------------------------------- discovery, state, pins

    def discover(self, addresses: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
        """({host: address}, {address: error}) from each agent's ControlState (host names we then target)."""
        futs = {a: self._state_future(a, self.rpc_timeout_s) for a in addresses}
        found: dict[str, str] = {}
        errors: dict[str, str] = {}
        for a, f in futs.items():
            try:
                st: ControlState = f.result()
            except Exception as exc:
                errors[a] = _rpc_error(exc)[0]
                continue
            if st.host in found and found[st.host] != a:
                errors[a] = f"answers as {st.host}, like {found[st.host]}"
                continue
            found[st.host] = a
        return found, errors

    def probe(self, hosts: Sequence[str]) -> dict[str, Probe]:
        """ControlState of every host, its round trip, and its receipt key pinned or checked.

        First use pins the key, after checking that the agent's TLS certificate names that host
        (so a console talking to the wrong address never pins a stranger's key).
        """
        out: dict[str, Probe] = {}
        futs: dict[str, tuple[grpc.Future, float]] = {}
        for h in hosts:
            try:
                addr = self._address(h)
            except CommandError as exc:
                out[h] = Probe(h, "", error=str(exc))
                continue
            out[h] = Probe(h, addr)
            futs[h] = (self._state_future(addr, self.rpc_timeout_s), time.monotonic())
        audit: list[AuditRecord] = []
        for h, (f, t0) in futs.items():
            pr = out[h]
            try:
                st: ControlState = f.result()
            except Exception as exc:
                msg, code = _rpc_error(exc)
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    msg = f"agent has control commands disabled (no operator_ca configured): {msg}"
                pr.error = msg
                continue
            pr.rtt_s = time.monotonic() - t0
            pr.state = st
            pr.error, pr.bad_key = self._check_pin(h, pr.address, st, audit)
        self._audit(audit)
        return out

    def _check_pin(self, host: str, address: str, st: ControlState, audit: list[AuditRecord]) -> tuple[str, bool]:
        if st.host != host:
            return f"agent at {address} answers as {st.host!r}, not {host!r}", True
        if len(st.agent_public_key) != 32 or signing.key_id(st.agent_public_key) != st.agent_key_id:
            return "agent reports a malformed receipt key", True
        if not st.commands_enabled:
            return "agent has control commands disabled", False
        pinned = self.pins.get(host)
        if pinned is not None:
            if pinned.public_key != st.agent_public_key:
                return (f"receipt key of {host} changed (pinned {pinned.key_id[:16]}, now {st.agent_key_id[:16]}); "
                        "refusing: if the agent was reinstalled, check it and remove the pin "
                        f"(gpusoc-console command unpin {host})"), True
            return "", False
        if self.verify_tls_identity and self.tls is not None:
            try:
                cn = asyncio.run(self.tls.peer_identity(address, timeout=self.rpc_timeout_s))
            except Exception as exc:
                return f"cannot read the TLS identity of {address} to pin its key: {exc}", False
            if cn != host:
                return f"agent at {address} has TLS certificate CN {cn!r}, not {host!r}: not pinning its key", True
        self.pins.pin(host, st.agent_public_key, address)
        audit.append((self.actor, AUDIT_KEY_PINNED, host,
                      {"host": host, "address": address, "key_id": st.agent_key_id,
                       "public_key": st.agent_public_key.hex()}))
        return "", False

    def control_states(self, hosts: Sequence[str]) -> dict[str, ControlState | str]:
        """ControlState per host (pinned keys checked), or the error text."""
        return {h: (p.state if p.ok and p.state is not None else p.error) for h, p in self.probe(hosts).items()}

    def min_signers(self, action: str, hosts: Sequence[str], break_glass: bool = False,
                    probes: Mapping[str, Probe] | None = None) -> int:
        """The strictest policy among the job's agents (defaults where a host did not say)."""
        probes = probes if probes is not None else self.probe(hosts)
        n = required_signers(action, break_glass)
        for p in probes.values():
            if p.state is not None and p.state.min_signers:
                n = max(n, required_signers(action, break_glass, p.state.min_signers))
        return n

    def list_checkpoints(self, job: str, hosts: Sequence[str], deep: bool = True) -> CheckpointReport:
        """Every host's checkpoints of `job` (deep = every file re-hashed), merged by digest."""
        futs: dict[str, grpc.Future] = {}
        errors: dict[str, str] = {}
        for h in hosts:
            try:
                futs[h] = self._checkpoints_future(self._address(h), job, deep, self.execute_timeout_s)
            except CommandError as exc:
                errors[h] = str(exc)
        listings: dict[str, CheckpointList] = {}
        for h, f in futs.items():
            try:
                lst: CheckpointList = f.result()
            except Exception as exc:
                errors[h] = _rpc_error(exc)[0]
                continue
            if lst.host and lst.host != h:
                errors[h] = f"answered as {lst.host!r}"
                continue
            listings[h] = lst
        return CheckpointReport.merge(job, hosts, listings, errors)

    # ---------------------------------------------------------------- receipts

    def _verify(self, host: str, signed: SignedReceipt, command_id: str, sha: str) -> Receipt:
        pinned = self.pins.get(host)
        if pinned is None:
            raise signing.SigningError(f"no pinned receipt key for {host}")
        r = signing.verify_receipt(signed, pinned.public_key)
        if r.host != host:
            raise signing.SigningError(f"receipt is from {r.host!r}, not {host!r}")
        if r.command_id != command_id:
            raise signing.SigningError(f"receipt answers command {r.command_id!r}, not {command_id!r}")
        if r.payload_sha256 and r.payload_sha256 != sha:
            raise signing.SigningError("receipt answers different payload bytes")
        return r

    def _receipt_record(self, host: str, job: str, signed: SignedReceipt | None, r: Receipt | None,
                        error: str = "") -> AuditRecord:
        body: dict[str, Any] = {"host": host, "verified": r is not None}
        if r is not None:
            body.update(command_id=r.command_id, phase=r.phase, status=r.status, check=r.check, reason=r.reason,
                        method=r.method, executed_at_ns=r.executed_at_ns, confirmed_at_ns=r.confirmed_at_ns,
                        agent_key_id=r.agent_key_id, signers=list(r.signers))
        if error:
            body["error"] = error
        if signed is not None:
            body.update(receipt_b64=_b64(signed.receipt), signature_b64=_b64(signed.signature),
                        agent_public_key=signed.agent_public_key.hex())
        return (f"agent:{host}", ACTION_RECEIPT, job, body)

    @staticmethod
    def _apply_receipt(hr: HostResult, r: Receipt) -> None:
        hr.check, hr.reason = r.check, r.reason
        if r.status == STATUS_PREPARED:
            hr.prepared, hr.state = r, PREPARED
        elif r.status == STATUS_PENDING:
            hr.state = PREPARED if hr.prepared is not None else WAITING
        else:
            hr.final = r
            hr.state = {STATUS_EXECUTED: CONFIRMED, STATUS_FAILED: FAILED, STATUS_REFUSED: REFUSED,
                        STATUS_ABORTED: ABORTED}.get(r.status, BAD_RECEIPT)
            if hr.state == REFUSED and r.check:
                hr.reason = f"{r.check}: {r.reason}"
            if hr.state == CONFIRMED and not r.reason:
                hr.reason = ""

    # ---------------------------------------------------------------- dispatch

    def dispatch(self, envelope: CommandEnvelope, on_update: Callable[[HostResult], None] | None = None, *,
                 two_phase: bool | None = None) -> DispatchResult:
        """Send `envelope` to every target host; the per-host table once every host answered or timed out.

        CommandError (nothing sent) for an envelope that is not a valid live command or when the
        audit trail cannot record it. Everything after the first byte went out is reported in the
        result instead, never raised.
        """
        try:
            payload = signing.parse_payload(envelope.payload)
        except signing.SigningError as exc:
            raise CommandError(f"not a valid command payload: {exc}") from None
        signers = envelope_signers(envelope)
        if not signers:
            raise CommandError("the command carries no signature")
        bad = [s.label for s in signers if not s.signature_ok]
        if bad:
            raise CommandError(f"signature of {', '.join(bad)} does not verify over the payload")
        _check_live(payload, self.clock_ns())
        sha = signing.payload_sha256(envelope.payload)
        hosts = list(payload.target_hosts)
        two = len(hosts) > 1 if two_phase is None else two_phase
        res = DispatchResult(payload.command_id, payload.action, payload.job, [s.label for s in signers], two,
                             {h: HostResult(h) for h in hosts}, payload_sha256=sha, started_ns=self.clock_ns())

        def update(hr: HostResult) -> None:
            hr.updated_ns = self.clock_ns()
            if on_update is not None:
                try:
                    on_update(hr.copy())
                except Exception:
                    log.exception("on_update failed")

        issued: AuditRecord = ("+".join(res.signers), ACTION_COMMAND, payload.job, {
            "command_id": payload.command_id, "action": payload.action, "job": payload.job,
            "target_hosts": hosts, "reason": payload.reason, "checkpoint_digest": payload.checkpoint_digest,
            "break_glass": payload.break_glass, "issued_at_ns": payload.issued_at_ns,
            "expires_at_ns": payload.expires_at_ns, "mode": "two-phase" if two else "execute",
            "console": self.actor, "payload_b64": _b64(envelope.payload), "payload_sha256": sha,
            "signers": [{"signer": s.label, "key_id": s.key_id, "cert_sha256": s.cert_sha256}
                        for s in signers],
            "signatures": [{"certificate_pem": sig.certificate_pem.decode("ascii", "replace"),
                            "signature_b64": _b64(sig.signature)} for sig in envelope.signatures],
        })
        if self.audit is not None:
            try:  # fail closed: a command the trail cannot record is not sent
                self.audit.append_many([issued])
            except Exception as exc:
                raise CommandError(f"the audit trail cannot record the command, so it was not sent: {exc}") from exc
        for hr in res.hosts.values():
            update(hr)

        probes = self.probe(hosts)
        failed = {h: p for h, p in probes.items() if not p.ok}
        for h, p in probes.items():
            res.hosts[h].address = p.address
            res.hosts[h].rtt_ms = p.rtt_s * 1000 if p.ok else None
        if failed:
            for h, hr in res.hosts.items():
                bad_probe = failed.get(h)
                if bad_probe is not None:
                    hr.state = BAD_RECEIPT if bad_probe.bad_key else NO_ANSWER
                    hr.reason = bad_probe.error
                else:
                    hr.state = NOT_SENT
                    hr.reason = f"not sent: {', '.join(sorted(failed))} could not be checked first"
                update(hr)
            res.notes.append("nothing was sent: every host of the job must be reachable and pinned first")
            return self._finish(res, payload)
        try:
            if two:
                self._two_phase(envelope, payload, sha, res, probes, update)
            else:
                self._execute(envelope, payload, sha, res, update)
        except Exception as exc:  # report, never leave the operator without a table
            log.exception("dispatch failed")
            res.notes.append(f"console error while dispatching: {type(exc).__name__}: {exc}")
            for hr in res.hosts.values():
                if hr.state not in FINAL_STATES:
                    hr.state, hr.reason = NO_ANSWER, f"console error: {exc}"
                    update(hr)
        return self._finish(res, payload)

    def _finish(self, res: DispatchResult, payload: CommandPayload) -> DispatchResult:
        res.finished_ns = self.clock_ns()
        outcome: AuditRecord = (self.actor, AUDIT_OUTCOME, payload.job, {
            "command_id": res.command_id, "action": res.action, "job": res.job,
            "all_confirmed": res.all_confirmed, "partial": res.partial, "alarms": res.alarms,
            "skew_ns": res.skew_ns, "commit_at_ns": res.commit_at_ns, "notes": res.notes,
            "hosts": {h: {"state": r.state, "reason": r.reason, "executed_at_ns": r.executed_at_ns}
                      for h, r in sorted(res.hosts.items())},
        })
        self._audit([outcome], res.audit_errors)
        log.info("%s", res.summary())
        return res

    def _handle_answer(self, host: str, fut: grpc.Future, res: DispatchResult, sha: str, job: str,
                       audit: list[AuditRecord], update: Callable[[HostResult], None]) -> Receipt | None:
        """Turn one finished RPC into the host's new state; the verified receipt or None."""
        hr = res.hosts[host]
        try:
            signed: SignedReceipt = fut.result(timeout=0)
        except Exception as exc:
            msg, code = _rpc_error(exc)
            if code == grpc.StatusCode.NOT_FOUND:
                msg = f"agent no longer knows the command (restarted?): {msg}"
            elif code == grpc.StatusCode.FAILED_PRECONDITION:
                hr.state, hr.reason = REFUSED, f"agent has control commands disabled: {msg}"
                audit.append((self.actor, AUDIT_NO_ANSWER, job, {"host": host, "command_id": res.command_id,
                                                                  "error": msg}))
                update(hr)
                return None
            hr.state, hr.reason = NO_ANSWER, msg
            audit.append((self.actor, AUDIT_NO_ANSWER, job, {"host": host, "command_id": res.command_id,
                                                              "error": msg}))
            update(hr)
            return None
        try:
            r = self._verify(host, signed, res.command_id, sha)
        except signing.SigningError as exc:
            hr.state, hr.reason = BAD_RECEIPT, f"receipt does not verify: {exc}"
            audit.append(self._receipt_record(host, job, signed, None, str(exc)))
            update(hr)
            return None
        audit.append(self._receipt_record(host, job, signed, r))
        self._apply_receipt(hr, r)
        update(hr)
        return r

    def _execute(self, env: CommandEnvelope, payload: CommandPayload, sha: str, res: DispatchResult,
                 update: Callable[[HostResult], None]) -> None:
        if len(res.hosts) != 1:
            raise CommandError("EXECUTE is the single-host shortcut; use two phases for several hosts")
        host = next(iter(res.hosts))
        hr = res.hosts[host]
        hr.deadline_ns = self.clock_ns() + int(self.execute_timeout_s * 1e9)
        update(hr)
        fut = self._command_future(hr.address, CommandRequest(PHASE_EXECUTE, env), self.execute_timeout_s)
        concurrent.futures.wait([_as_cf(fut)], timeout=self.execute_timeout_s + 1)
        audit: list[AuditRecord] = []
        self._handle_answer(host, fut, res, sha, payload.job, audit, update)
        self._audit(audit, res.audit_errors)

    def _two_phase(self, env: CommandEnvelope, payload: CommandPayload, sha: str, res: DispatchResult,
                   probes: Mapping[str, Probe], update: Callable[[HostResult], None]) -> None:
        hosts = list(res.hosts)
        rtt = max([p.rtt_s for p in probes.values()] + [self._prepare_rtt.get(h, 0.0) for h in hosts])
        delay = max(self.min_commit_delay_s, 2.0 * rtt)
        margin = max(0.05, 1.5 * rtt, 0.25 * delay)  # time an ABORT needs to arrive before commit_at
        now = self.clock_ns()
        commit_at = now + int(delay * 1e9)
        if commit_at >= payload.expires_at_ns:
            for hr in res.hosts.values():
                hr.state, hr.reason = NOT_SENT, "the command expires before the commit deadline"
                update(hr)
            res.notes.append("not sent: the command expires before it could be committed; issue a new one")
            return
        res.commit_at_ns = commit_at
        confirm_deadline = commit_at + int(self.confirm_timeout_s * 1e9)
        for hr in res.hosts.values():
            hr.deadline_ns = confirm_deadline
        self._audit([(self.actor, AUDIT_PREPARE, payload.job, {
            "command_id": payload.command_id, "commit_at_ns": commit_at, "delay_ms": round(delay * 1000, 3),
            "max_rtt_ms": round(rtt * 1000, 3), "hosts": hosts})], res.audit_errors)
        # The audit append took time: keep at least the margin between now and commit_at.
        if self.clock_ns() > commit_at - int(margin * 1e9):
            for hr in res.hosts.values():
                hr.state, hr.reason = NOT_SENT, "the audit trail was too slow to commit in time; retry"
                update(hr)
            res.notes.append("not sent: recording the command took longer than the commit delay; retry")
            return

        req = CommandRequest(PHASE_PREPARE, env, commit_at_unix_ns=commit_at)
        sent_at = time.monotonic()
        prepares = {h: self._command_future(res.hosts[h].address, req, max(delay, self.rpc_timeout_s))
                    for h in hosts}
        cfs = {h: _as_cf(f) for h, f in prepares.items()}
        answered_at: dict[str, float] = {}

        def stamp(host: str) -> Callable[[concurrent.futures.Future[Any]], None]:
            def done(_f: concurrent.futures.Future[Any]) -> None:
                answered_at.setdefault(host, time.monotonic())

            return done

        for h, cf in cfs.items():
            cf.add_done_callback(stamp(h))
        prepare_deadline_s = (commit_at - self.clock_ns()) / 1e9 - margin
        concurrent.futures.wait(list(cfs.values()), timeout=max(0.0, prepare_deadline_s))
        audit: list[AuditRecord] = []
        outstanding: list[str] = []
        for h in hosts:
            if not cfs[h].done():
                outstanding.append(h)
                continue
            self._handle_answer(h, prepares[h], res, sha, payload.job, audit, update)
            if h in answered_at:
                self._prepare_rtt[h] = answered_at[h] - sent_at
        all_prepared = not outstanding and all(res.hosts[h].state == PREPARED for h in hosts)
        if not all_prepared:
            self._abort(env, payload, sha, res, prepares, cfs, outstanding, commit_at, audit, update)
            self._audit(audit, res.audit_errors)
            return
        self._audit(audit, res.audit_errors)
        self._collect_results(payload, sha, res, hosts, confirm_deadline, update)

    def _abort(self, env: CommandEnvelope, payload: CommandPayload, sha: str, res: DispatchResult,
               prepares: Mapping[str, grpc.Future], cfs: Mapping[str, concurrent.futures.Future[Any]],
               outstanding: list[str], commit_at: int, audit: list[AuditRecord],
               update: Callable[[HostResult], None]) -> None:
        """Some host refused or is silent: disarm everyone else before commit_at, then learn what happened."""
        refused = sorted(h for h, r in res.hosts.items() if r.state not in (PREPARED,) and h not in outstanding)
        targets = [h for h in res.hosts if h not in refused]  # prepared and silent ones (abort is harmless)
        why = ", ".join([f"{h} {res.hosts[h].state}" for h in refused] + [f"{h} silent" for h in outstanding])
        if not targets:
            res.notes.append(f"nothing to abort: {why}")
            return
        abort_req = CommandRequest(PHASE_ABORT, env)
        aborts = {h: self._command_future(res.hosts[h].address, abort_req, self.rpc_timeout_s) for h in targets}
        audit.append((self.actor, AUDIT_ABORT, payload.job, {
            "command_id": payload.command_id, "hosts": targets, "why": why,
            "before_commit_ms": round((commit_at - self.clock_ns()) / 1e6, 3)}))
        res.notes.append(f"aborted on every other host because: {why}")
        # Silent PREPAREs may still land: wait for them until shortly after commit_at, abort again if armed.
        late_wait = max(0.0, (commit_at - self.clock_ns()) / 1e9) + self.rpc_timeout_s
        concurrent.futures.wait([cfs[h] for h in outstanding], timeout=late_wait)
        concurrent.futures.wait([_as_cf(f) for f in aborts.values()], timeout=self.rpc_timeout_s + 1)
        for h in outstanding:
            hr = res.hosts[h]
            if cfs[h].done():
                r = self._handle_answer(h, prepares[h], res, sha, payload.job, audit, update)
                if r is not None and r.status == STATUS_PREPARED:
                    again = self._command_future(hr.address, abort_req, self.rpc_timeout_s)
                    concurrent.futures.wait([_as_cf(again)], timeout=self.rpc_timeout_s + 1)
                    aborts = {**aborts, h: again}
            else:
                hr.state, hr.reason = NO_ANSWER, "no answer to PREPARE before the commit deadline"
                audit.append((self.actor, AUDIT_NO_ANSWER, payload.job,
                              {"host": h, "command_id": payload.command_id, "phase": "prepare",
                               "error": hr.reason}))
                update(hr)
        for h, f in aborts.items():
            hr = res.hosts[h]
            was = hr.state
            if not _as_cf(f).done():
                if was == PREPARED:
                    hr.state, hr.reason = NO_ANSWER, "prepared, then no answer to ABORT: may execute at commit_at"
                    update(hr)
                continue
            try:
                signed: SignedReceipt = f.result(timeout=0)
                r = self._verify(h, signed, payload.command_id, sha)
            except Exception as exc:
                if was == PREPARED:
                    hr.state, hr.reason = NO_ANSWER, f"ABORT failed: {_rpc_error(exc)[0]}"
                    update(hr)
                continue
            audit.append(self._receipt_record(h, payload.job, signed, r))
            if r.status == STATUS_ABORTED:
                hr.state, hr.reason = ABORTED, f"aborted ({why})"
                update(hr)
            elif was == PREPARED:
                # Too late to disarm (already started): find out how it ended.
                self._collect_results(payload, sha, res, [h], self.clock_ns() + int(self.confirm_timeout_s * 1e9),
                                      update)
        if any(r.state == CONFIRMED for r in res.hosts.values()):
            res.notes.append("PARTIAL: some hosts executed before the abort arrived; decide now")

    def _collect_results(self, payload: CommandPayload, sha: str, res: DispatchResult, hosts: Sequence[str],
                         deadline_ns: int, update: Callable[[HostResult], None]) -> None:
        """RESULT long-polls until each host has a final receipt or the deadline passed (alarm)."""
        waiting = [h for h in hosts if res.hosts[h].state not in FINAL_STATES]
        audit: list[AuditRecord] = []
        while waiting:
            left = (deadline_ns - self.clock_ns()) / 1e9
            if left <= 0:
                break
            wait_s = max(0.1, min(self.result_wait_s, left))
            req = CommandRequest(PHASE_RESULT, command_id=payload.command_id, wait_s=wait_s)
            futs = {h: self._command_future(res.hosts[h].address, req, wait_s + self.rpc_timeout_s) for h in waiting}
            concurrent.futures.wait([_as_cf(f) for f in futs.values()], timeout=wait_s + self.rpc_timeout_s + 1)
            still: list[str] = []
            for h, f in futs.items():
                hr = res.hosts[h]
                if not _as_cf(f).done():
                    f.cancel()
                    still.append(h)
                    continue
                try:
                    signed: SignedReceipt = f.result(timeout=0)
                except Exception as exc:
                    msg, code = _rpc_error(exc)
                    if code == grpc.StatusCode.NOT_FOUND:
                        hr.state, hr.reason = NO_ANSWER, f"agent no longer knows the command (restarted?): {msg}"
                        audit.append((self.actor, AUDIT_NO_ANSWER, payload.job,
                                      {"host": h, "command_id": payload.command_id, "phase": "result", "error": msg}))
                        update(hr)
                    else:
                        hr.reason = f"no answer yet ({msg})"
                        update(hr)
                        still.append(h)
                    continue
                try:
                    r = self._verify(h, signed, payload.command_id, sha)
                except signing.SigningError as exc:
                    hr.state, hr.reason = BAD_RECEIPT, f"receipt does not verify: {exc}"
                    audit.append(self._receipt_record(h, payload.job, signed, None, str(exc)))
                    update(hr)
                    continue
                if r.status != STATUS_PENDING:
                    audit.append(self._receipt_record(h, payload.job, signed, r))
                self._apply_receipt(hr, r)
                update(hr)
                if hr.state not in FINAL_STATES:
                    still.append(h)
            waiting = still
        for h in waiting:
            hr = res.hosts[h]
            hr.state = NO_ANSWER
            hr.reason = "did not confirm before the deadline" + (f" ({hr.reason})" if hr.reason else "")
            audit.append((self.actor, AUDIT_NO_ANSWER, payload.job,
                          {"host": h, "command_id": payload.command_id, "phase": "result", "error": hr.reason}))
            update(hr)
        self._audit(audit, res.audit_errors)


def _as_cf(f: grpc.Future) -> concurrent.futures.Future[Any]:
    """A concurrent.futures view of a gRPC future, so several can be waited on with one deadline."""
    cf: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def done(_g: grpc.Future) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            cf.set_result(None)

    f.add_done_callback(done)
    return cf
