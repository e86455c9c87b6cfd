"""Two-person approval: operator A signs a pending request, a different operator B reviews and co-signs.

A request is the exact payload bytes plus A's signature. It lives in the store's
`pending_commands` table (the desktop console: B picks it from the pending list) and/or in a
JSON request file (two operators' shells: `command request --out FILE`, then `command approve
FILE`). Only the payload bytes and signatures are trusted: the table's other columns and the
file's decoded "payload" are for listing, and are re-derived from the bytes when read. The
agents enforce the 120 s lifetime; the console shows it as a countdown and refuses early.
Qt-free; the table methods block on the store writer (call them from a worker thread).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, TypeVar

import duckdb

from console.respond.audit import AuditTrail, Runner
from console.respond.commands import (
    CommandError,
    Operator,
    SignerInfo,
    cosign,
    envelope_signers,
    required_signers,
    sign,
)
from protos import signing
from protos.types import CommandEnvelope, CommandPayload, CommandSignature

T = TypeVar("T")

REQUEST_TYPE: Final = "gpusoc.command-request.v1"

# pending_commands.state values.
PENDING: Final = "pending"
DISPATCHED: Final = "dispatched"
CANCELLED: Final = "cancelled"
EXPIRED: Final = "expired"
STATES: Final[tuple[str, ...]] = (PENDING, DISPATCHED, CANCELLED, EXPIRED)

# Audit actions of the approval flow.
AUDIT_REQUESTED: Final = "command.requested"
AUDIT_COSIGNED: Final = "command.cosigned"
AUDIT_COSIGN_REFUSED: Final = "command.cosign_refused"
AUDIT_CANCELLED: Final = "command.cancelled"

#: Owned by this module (not yet in console/store/schema.py); created on first use, idempotent.
PENDING_COMMANDS_DDL: Final = """
CREATE TABLE IF NOT EXISTS pending_commands (
    command_id VARCHAR PRIMARY KEY,
    action VARCHAR NOT NULL,
    job VARCHAR NOT NULL,
    target_hosts VARCHAR NOT NULL,
    reason VARCHAR NOT NULL,
    checkpoint_digest VARCHAR NOT NULL,
    break_glass BOOLEAN NOT NULL,
    payload BLOB NOT NULL,
    signatures VARCHAR NOT NULL,
    required_signers INTEGER NOT NULL,
    requested_by VARCHAR NOT NULL,
    agents VARCHAR NOT NULL,
    issued_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    state VARCHAR NOT NULL CHECK (state IN ('pending', 'dispatched', 'cancelled', 'expired')),
    decided_by VARCHAR,
    decided_at TIMESTAMPTZ,
    outcome VARCHAR
)"""

_COLUMNS: Final = (
    "command_id, action, job, target_hosts, reason, checkpoint_digest, break_glass, payload, signatures, "
    "required_signers, requested_by, agents, issued_at, expires_at, state, decided_by, decided_at, outcome"
)


class ApprovalError(CommandError):
    """A request that cannot be created, read or co-signed; the message says why."""


def _utc(ns: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=ns // 1000)


def _ns(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return round(value.timestamp() * 1_000_000) * 1000
    return int(value)


def countdown(seconds: float) -> str:
    """"1:05" left, or "expired"."""
    if seconds <= 0:
        return "expired"
    s = int(seconds)
    return f"{s // 60}:{s % 60:02d}"


@dataclass(frozen=True)
class PendingRequest:
    """A signed command waiting for more approvers; `command` is parsed from `payload`, never stored apart."""

    payload: bytes
    signatures: tuple[CommandSignature, ...]
    command: CommandPayload
    required_signers: int
    requested_by: str
    agents: Mapping[str, str] = field(default_factory=dict)  # host -> address hint for the approver
    state: str = PENDING
    decided_by: str = ""
    decided_at_ns: int = 0
    outcome: str = ""

    @classmethod
    def from_envelope(cls, env: CommandEnvelope, required: int, requested_by: str = "",
                      agents: Mapping[str, str] | None = None, **kw: Any) -> PendingRequest:
        """Parse (and bound) the payload bytes; ApprovalError if they are not a valid command."""
        try:
            command = signing.parse_payload(env.payload)
        except signing.SigningError as exc:
            raise ApprovalError(f"the request's payload is not a valid command: {exc}") from None
        return cls(env.payload, tuple(env.signatures), command, int(required), requested_by,
                   dict(agents or {}), **kw)

    @property
    def command_id(self) -> str:
        return self.command.command_id

    @property
    def envelope(self) -> CommandEnvelope:
        """The envelope to co-sign and send."""
        return CommandEnvelope(self.payload, self.signatures)

    def signers(self) -> list[SignerInfo]:
        """Who signed so far (each signature checked over the payload bytes)."""
        return envelope_signers(self.envelope)

    @property
    def missing(self) -> int:
        """Approvals still needed."""
        return max(0, self.required_signers - len(self.signatures))

    def seconds_left(self, now_ns: int | None = None) -> float:
        """Until the agents stop accepting it."""
        now = time.time_ns() if now_ns is None else now_ns
        return (self.command.expires_at_ns - now) / 1e9

    def expired(self, now_ns: int | None = None) -> bool:
        return self.seconds_left(now_ns) <= 0

    def countdown(self, now_ns: int | None = None) -> str:
        """Time left as m:ss, or "expired"."""
        return countdown(self.seconds_left(now_ns))

    def describe(self) -> dict[str, Any]:
        """The decoded payload, for the approver to read before co-signing."""
        c = self.command
        return {
            "command_id": c.command_id, "action": c.action, "job": c.job, "target_hosts": list(c.target_hosts),
            "reason": c.reason, "checkpoint_digest": c.checkpoint_digest, "break_glass": c.break_glass,
            "issued_at": _utc(c.issued_at_ns).isoformat(), "expires_at": _utc(c.expires_at_ns).isoformat(),
            "payload_sha256": signing.payload_sha256(self.payload),
        }

    def render(self, now_ns: int | None = None) -> str:
        """What `command approve` prints before co-signing."""
        d = self.describe()
        try:
            who = ", ".join(s.label + ("" if s.signature_ok else " (BAD SIGNATURE)") for s in self.signers())
        except CommandError as exc:
            who = f"unreadable ({exc})"
        lines = [f"{d['action'].upper()} job {d['job']} on {len(d['target_hosts'])} host(s): "
                 f"{', '.join(d['target_hosts'])}",
                 f"  reason: {d['reason']}"]
        if d["checkpoint_digest"]:
            lines.append(f"  checkpoint: {d['checkpoint_digest']}" + ("  BREAK-GLASS" if d["break_glass"] else ""))
        lines += [f"  command {d['command_id']}  payload sha256 {d['payload_sha256']}",
                  f"  signed by: {who}  (needs {self.required_signers})",
                  f"  expires in {self.countdown(now_ns)} ({d['expires_at']})"]
        return "\n".join(lines)


# --------------------------------------------------------------------------- the flow


def create_request(operator: Operator, payload: CommandPayload, required: int | None = None, *,
                   agents: Mapping[str, str] | None = None, audit: AuditTrail | None = None,
                   now_ns: int | None = None) -> PendingRequest:
    """Operator A signs `payload`; the request waits for `required - 1` more distinct operators."""
    need = required if required is not None else required_signers(payload.action, payload.break_glass)
    env = sign(payload, operator, now_ns=now_ns)
    req = PendingRequest.from_envelope(env, need, operator.label, agents)
    if audit is not None:
        audit.append(operator.label, AUDIT_REQUESTED, payload.job, {
            **req.describe(), "required_signers": need, "requested_by": operator.label,
            "payload_b64": base64.b64encode(req.payload).decode("ascii"),
            "signature_b64": base64.b64encode(env.signatures[0].signature).decode("ascii"),
        })
    return req


def approve(request: PendingRequest, operator: Operator, *, audit: AuditTrail | None = None,
            now_ns: int | None = None) -> CommandEnvelope:
    """Operator B reviews and co-signs: refused (ApprovalError, audited) for the same operator, an
    operator whose role may not approve, an expired or already decided request, or a bad signature."""
    now = time.time_ns() if now_ns is None else now_ns
    try:
        if request.state != PENDING:
            raise ApprovalError(f"request {request.command_id[:8]} is {request.state}, not pending")
        if request.expired(now):
            raise ApprovalError(
                f"request {request.command_id[:8]} expired {-request.seconds_left(now):.0f} s ago (commands live "
                "at most 120 s); ask the requester to issue it again")
        env = cosign(request.envelope, operator, now_ns=now)
    except CommandError as exc:
        if audit is not None:
            audit.append(operator.label, AUDIT_COSIGN_REFUSED, request.command.job,
                         {"command_id": request.command_id, "reason": str(exc)})
        raise ApprovalError(str(exc)) from None
    if audit is not None:
        audit.append(operator.label, AUDIT_COSIGNED, request.command.job, {
            "command_id": request.command_id, "action": request.command.action,
            "payload_sha256": signing.payload_sha256(request.payload),
            "signers": [s.label for s in envelope_signers(env)],
            "signature_b64": base64.b64encode(env.signatures[-1].signature).decode("ascii"),
        })
    return env


# --------------------------------------------------------------------------- request files


def request_to_json(req: PendingRequest) -> dict[str, Any]:
    """The request file's JSON object (payload bytes base64; `payload` decoded for humans only)."""
    return {
        "type": REQUEST_TYPE,
        "payload_b64": base64.b64encode(req.payload).decode("ascii"),
        "payload": req.describe(),
        "signatures": [
            {"certificate_pem": s.certificate_pem.decode("ascii"),
             "signature_b64": base64.b64encode(s.signature).decode("ascii")}
            for s in req.signatures
        ],
        "required_signers": req.required_signers,
        "requested_by": req.requested_by,
        "agents": dict(req.agents),
    }


def request_from_json(doc: Any, source: str = "request") -> PendingRequest:
    """Parse a request file's object; ApprovalError naming what is wrong."""
    if not isinstance(doc, dict) or doc.get("type") != REQUEST_TYPE:
        raise ApprovalError(f"{source}: not a {REQUEST_TYPE} file")
    try:
        payload = base64.b64decode(doc["payload_b64"], validate=True)
        sigs = tuple(
            CommandSignature(str(s["certificate_pem"]).encode("ascii"),
                             base64.b64decode(s["signature_b64"], validate=True))
            for s in doc["signatures"]
        )
        required = int(doc["required_signers"])
        agents = {str(k): str(v) for k, v in dict(doc.get("agents") or {}).items()}
        requested_by = str(doc.get("requested_by", ""))
    except (KeyError, TypeError, ValueError, UnicodeError) as exc:
        raise ApprovalError(f"{source}: malformed request ({exc})") from None
    return PendingRequest.from_envelope(CommandEnvelope(payload, sigs), required, requested_by, agents)


def write_request_file(req: PendingRequest, path: str | os.PathLike[str]) -> Path:
    """Write the request for the second operator (atomic; never overwrites an existing file)."""
    out = Path(path)
    if out.exists():
        raise ApprovalError(f"{out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
    try:
        tmp.write_text(json.dumps(request_to_json(req), indent=1, sort_keys=True) + "\n", "utf-8")
        os.chmod(tmp, 0o644)
        os.link(tmp, out)
    except FileExistsError:
        raise ApprovalError(f"{out} already exists") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def read_request_file(path: str | os.PathLike[str]) -> PendingRequest:
    """Read a request file written by `write_request_file`."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text("utf-8"))
    except OSError as exc:
        raise ApprovalError(f"{p}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ApprovalError(f"{p}: not JSON ({exc})") from None
    return request_from_json(doc, str(p))


# --------------------------------------------------------------------------- the pending_commands table


class ApprovalStore:
    """`pending_commands` rows through the store's writer (`StoreWriter.run_on_writer`). Blocking."""

    def __init__(self, run: Runner) -> None:
        # The table is created by the first call (on a worker), so building the store costs the
        # composition root no database round trip on the GUI thread.
        self._user_run = run
        self._ready = False

    def _run(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        def work(con: duckdb.DuckDBPyConnection) -> T:
            if not self._ready:
                con.execute(PENDING_COMMANDS_DDL)
                self._ready = True
            return fn(con)

        return self._user_run(work)

    def add(self, req: PendingRequest) -> None:
        """Store a new request (a command id is stored once)."""
        c = req.command
        sigs = json.dumps([
            {"certificate_pem": s.certificate_pem.decode("ascii"),
             "signature_b64": base64.b64encode(s.signature).decode("ascii")} for s in req.signatures
        ])
        params = [
            c.command_id, c.action, c.job, json.dumps(list(c.target_hosts)), c.reason, c.checkpoint_digest,
            c.break_glass, req.payload, sigs, req.required_signers, req.requested_by, json.dumps(dict(req.agents)),
            _utc(c.issued_at_ns), _utc(c.expires_at_ns), req.state, req.decided_by or None,
            _utc(req.decided_at_ns) if req.decided_at_ns else None, req.outcome or None,
        ]

        def work(con: duckdb.DuckDBPyConnection) -> None:
            con.execute(f"INSERT INTO pending_commands ({_COLUMNS}) VALUES ({', '.join('?' * 18)})", params)

        try:
            self._run(work)
        except duckdb.ConstraintException:
            raise ApprovalError(f"request {c.command_id} is already stored") from None

    def get(self, command_id: str) -> PendingRequest | None:
        """One request, or None."""
        rows = self._run(lambda con: con.execute(
            f"SELECT {_COLUMNS} FROM pending_commands WHERE command_id = ?", [command_id]).fetchall())
        return _from_row(rows[0]) if rows else None

    def list_requests(self, *, include_done: bool = False, now_ns: int | None = None,
                      limit: int = 200) -> list[PendingRequest]:
        """Requests newest first; pending ones past their expiry are marked expired first."""
        now = time.time_ns() if now_ns is None else now_ns

        def work(con: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
            con.execute("UPDATE pending_commands SET state = 'expired' WHERE state = 'pending' AND expires_at <= ?",
                        [_utc(now)])
            where = "" if include_done else "WHERE state = 'pending'"
            return con.execute(
                f"SELECT {_COLUMNS} FROM pending_commands {where} ORDER BY issued_at DESC LIMIT ?", [limit]
            ).fetchall()

        return [_from_row(r) for r in self._run(work)]

    def set_state(self, command_id: str, state: str, decided_by: str = "", outcome: str = "",
                  now_ns: int | None = None, signatures: tuple[CommandSignature, ...] | None = None) -> None:
        """Record the decision (dispatched with its outcome, cancelled, expired)."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        now = time.time_ns() if now_ns is None else now_ns
        sets = "state = ?, decided_by = ?, decided_at = ?, outcome = ?"
        params: list[Any] = [state, decided_by or None, _utc(now), outcome or None]
        if signatures is not None:
            sets += ", signatures = ?"
            params.append(json.dumps([
                {"certificate_pem": s.certificate_pem.decode("ascii"),
                 "signature_b64": base64.b64encode(s.signature).decode("ascii")} for s in signatures]))
        params.append(command_id)
        self._run(lambda con: con.execute(f"UPDATE pending_commands SET {sets} WHERE command_id = ?", params))

    def cancel(self, command_id: str, operator: str, audit: AuditTrail | None = None) -> None:
        """Withdraw a pending request (audited)."""
        self.set_state(command_id, CANCELLED, operator, "cancelled by operator")
        if audit is not None:
            audit.append(operator, AUDIT_CANCELLED, None, {"command_id": command_id})


def _from_row(r: tuple[Any, ...]) -> PendingRequest:
    (command_id, _action, _job, _hosts, _reason, _digest, _bg, payload, sigs_json, required, requested_by,
     agents_json, _issued, _expires, state, decided_by, decided_at, outcome) = r
    try:
        sigs = tuple(CommandSignature(str(s["certificate_pem"]).encode("ascii"),
                                      base64.b64decode(s["signature_b64"], validate=True))
                     for s in json.loads(sigs_json))
        agents = {str(k): str(v) for k, v in json.loads(agents_json or "{}").items()}
    except (TypeError, ValueError, KeyError) as exc:
        raise ApprovalError(f"pending_commands row {command_id}: malformed ({exc})") from None
    req = PendingRequest.from_envelope(CommandEnvelope(bytes(payload), sigs), int(required), str(requested_by),
                                       agents, state=str(state), decided_by=str(decided_by or ""),
                                       decided_at_ns=_ns(decided_at), outcome=str(outcome or ""))
    if req.command_id != command_id:  # the listing columns must agree with the signed bytes
        raise ApprovalError(f"pending_commands row {command_id} holds the payload of {req.command_id}")
    return req


def with_state(req: PendingRequest, state: str, decided_by: str = "", outcome: str = "") -> PendingRequest:
    """A copy with a new decision (what the view shows before the store confirms)."""
    return replace(req, state=state, decided_by=decided_by, decided_at_ns=time.time_ns(), outcome=outcome)
