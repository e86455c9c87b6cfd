"""Verify and authorize one signed control command, failing closed at the first failed check.

Checks, in this order (docs/response.md):

 1. peer        the RPC came over mTLS from a console certificate (the server enforces the chain)
 2. envelope    a payload of bounded size and 1..8 signatures
 3. certificate every signer certificate is issued by the pinned operator CA, valid now,
                Ed25519, carries a role, and is not on the denylist
 4. signature   every signature verifies over the exact payload bytes received
 5. payload     the bytes are canonical JSON with exactly the known fields, lifetime <= 120 s
 6. role        every signer's role allows the action (viewer: nothing; responder: freeze,
                resume, rollback; admin: all of those and break-glass rollback)
 7. signers     distinct operators (by name and by key), at least the policy's number
 8. time        issued_at - skew <= now <= expires_at
 9. host        this agent's host is in target_hosts
10. replay      the command id was never accepted before (persisted, survives restarts)

Only after all of these does the controller look at the job itself.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509

from agent.act.replay import ReplayError, ReplayStore
from agent.pki import OperatorIdentity, PkiError, verify_operator_certificate
from protos import signing
from protos.types import (
    ACTION_FREEZE,
    ACTION_RESUME,
    ACTION_ROLLBACK,
    ROLE_ADMIN,
    ROLE_RESPONDER,
    CommandEnvelope,
    CommandPayload,
)

__all__ = [
    "ACTION_ROLES",
    "Authorized",
    "CommandVerifier",
    "Peer",
    "Policy",
    "Refusal",
    "load_revoked",
]

#: Roles that may approve each action. Break-glass rollback additionally needs admins only.
ACTION_ROLES: Final[Mapping[str, frozenset[str]]] = {
    ACTION_FREEZE: frozenset({ROLE_RESPONDER, ROLE_ADMIN}),
    ACTION_RESUME: frozenset({ROLE_RESPONDER, ROLE_ADMIN}),
    ACTION_ROLLBACK: frozenset({ROLE_RESPONDER, ROLE_ADMIN}),
}


@dataclass(frozen=True, slots=True)
class Policy:
    """How many distinct operators each action needs (defaults: freeze 1, resume 2, rollback 2)."""

    min_signers: Mapping[str, int] = field(
        default_factory=lambda: {ACTION_FREEZE: 1, ACTION_RESUME: 2, ACTION_ROLLBACK: 2}
    )
    break_glass_admins: int = 2
    max_clock_skew_ns: int = 5_000_000_000

    def required(self, action: str, break_glass: bool) -> int:
        n = self.min_signers.get(action, 2)
        return max(n, self.break_glass_admins) if break_glass else n


@dataclass(frozen=True, slots=True)
class Peer:
    """Who sent the RPC, from the TLS layer: `authenticated` only for a verified client certificate."""

    authenticated: bool
    name: str = ""
    transport: str = ""


@dataclass(frozen=True, slots=True)
class Authorized:
    """A command that passed every check; its id is already recorded as used."""

    payload: CommandPayload
    payload_bytes: bytes
    signers: tuple[OperatorIdentity, ...]
    peer: Peer

    @property
    def signer_labels(self) -> tuple[str, ...]:
        return tuple(f"{s.name}:{s.role}" for s in self.signers)


class Refusal(Exception):
    """A failed check: `check` names it, the message is the reason an operator reads."""

    def __init__(self, check: str, reason: str, signers: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.check = check
        self.reason = reason
        self.signers = signers


def load_revoked(path: Path) -> set[str]:
    """Denylisted operators: one hex SHA-256 per line (certificate DER or raw key), '#' comments."""
    out: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            word = line.split("#", 1)[0].strip().lower()
            if word:
                out.add(word)
    return out


class CommandVerifier:
    """Runs checks 1-10 for one agent host; pure apart from the replay store it writes to."""

    def __init__(
        self,
        host: str,
        operator_cas: list[x509.Certificate],
        replay: ReplayStore,
        *,
        policy: Policy | None = None,
        revoked_path: Path | None = None,
        require_mtls: bool = True,
        clock: Callable[[], int],
    ) -> None:
        self.host = host
        self.operator_cas = operator_cas
        self.replay = replay
        self.policy = policy or Policy()
        self.revoked_path = revoked_path
        self.require_mtls = require_mtls
        self.clock = clock
        self._revoked: set[str] = set()
        self._revoked_mtime: float | None = None

    def _revoked_now(self) -> set[str]:
        if self.revoked_path is None:
            return set()
        try:
            mtime = os.stat(self.revoked_path).st_mtime
        except FileNotFoundError:
            return set()
        if mtime != self._revoked_mtime:
            self._revoked, self._revoked_mtime = load_revoked(self.revoked_path), mtime
        return self._revoked

    def verify(self, env: CommandEnvelope | None, peer: Peer) -> Authorized:
        """Return an Authorized command or raise Refusal for the first failed check."""
        now_ns = self.clock()
        # 1. peer
        if self.require_mtls and not peer.authenticated:
            raise Refusal("peer", "control commands need an mTLS console peer; this connection has no client cert")
        # 2. envelope
        if env is None or not env.payload:
            raise Refusal("envelope", "no signed envelope")
        if len(env.payload) > signing.MAX_PAYLOAD_BYTES:
            raise Refusal("envelope", f"payload exceeds {signing.MAX_PAYLOAD_BYTES} bytes")
        if not env.signatures:
            raise Refusal("envelope", "the command carries no signature")
        if len(env.signatures) > signing.MAX_SIGNATURES:
            raise Refusal("envelope", f"more than {signing.MAX_SIGNATURES} signatures")
        # 3. certificates, 4. signatures
        now = dt.datetime.fromtimestamp(now_ns / 1e9, dt.UTC)
        revoked = self._revoked_now()
        signers: list[OperatorIdentity] = []
        for i, sig in enumerate(env.signatures, 1):
            try:
                ident = verify_operator_certificate(sig.certificate_pem, self.operator_cas, now)
            except PkiError as exc:
                raise Refusal("certificate", f"signature {i}: {exc}", _labels(signers)) from None
            if ident.cert_sha256 in revoked or ident.key_id in revoked:
                raise Refusal("certificate", f"signature {i}: operator {ident.name} is revoked", _labels(signers))
            if not signing.verify_payload_signature(env.payload, sig.signature, ident.public_key):
                raise Refusal(
                    "signature",
                    f"signature {i} by {ident.name} does not verify over the payload (tampered or wrong key)",
                    _labels(signers),
                )
            signers.append(ident)
        labels = _labels(signers)
        # 5. payload
        try:
            payload = signing.parse_payload(env.payload)
        except signing.SigningError as exc:
            raise Refusal("payload", str(exc), labels) from None
        # 6. roles
        allowed = ACTION_ROLES.get(payload.action, frozenset())
        if payload.break_glass:
            allowed = frozenset({ROLE_ADMIN})
        for s in signers:
            if s.role not in allowed:
                what = f"break-glass {payload.action}" if payload.break_glass else payload.action
                raise Refusal("role", f"operator {s.name} has role {s.role}, which may not approve {what}", labels)
        # 7. distinct signers
        names: set[str] = set()
        keys: set[str] = set()
        for s in signers:
            if s.name in names or s.key_id in keys:
                raise Refusal("signers", f"operator {s.name} signed more than once; approvals must be distinct", labels)
            names.add(s.name)
            keys.add(s.key_id)
        need = self.policy.required(payload.action, payload.break_glass)
        if len(signers) < need:
            raise Refusal(
                "signers",
                f"{payload.action}{' (break-glass)' if payload.break_glass else ''} needs {need} distinct "
                f"operator(s), got {len(signers)}",
                labels,
            )
        # 8. time window
        skew = self.policy.max_clock_skew_ns
        if now_ns < payload.issued_at_ns - skew:
            raise Refusal("time", f"command issued {(payload.issued_at_ns - now_ns) / 1e9:.1f} s in the future", labels)
        if now_ns > payload.expires_at_ns:
            raise Refusal("time", f"command expired {(now_ns - payload.expires_at_ns) / 1e9:.1f} s ago", labels)
        # 9. target host
        if self.host not in payload.target_hosts:
            raise Refusal("host", f"this host ({self.host}) is not among the command's target hosts", labels)
        # 10. replay (recorded durably before anything runs)
        try:
            self.replay.add(payload.command_id, payload.expires_at_ns + skew, now_ns)
        except ReplayError as exc:
            raise Refusal("replay", str(exc), labels) from None
        return Authorized(payload, env.payload, tuple(signers), peer)


def _labels(signers: list[OperatorIdentity]) -> tuple[str, ...]:
    return tuple(f"{s.name}:{s.role}" for s in signers)


def peek_payload(data: bytes) -> dict[str, str]:
    """Unverified command id / action / job, only to label a refusal event (marked unverified)."""
    out: dict[str, str] = {}
    if len(data) > signing.MAX_PAYLOAD_BYTES:
        return out
    with contextlib.suppress(ValueError, RecursionError):
        obj = json.loads(data.decode("utf-8", "replace"))
        if isinstance(obj, dict):
            for k in ("command_id", "action", "job"):
                v = obj.get(k)
                if isinstance(v, str):
                    out[k] = v[:128]
    return out
