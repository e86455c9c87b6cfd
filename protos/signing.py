"""Canonical bytes and Ed25519 signatures for control commands and their receipts.

Both sides use this module: the console builds a `CommandPayload`, turns it into canonical
JSON once (`payload_bytes`), collects one Ed25519 signature per operator over
``b"gpusoc-command-v1\\x00" + payload`` and sends those exact bytes; the agent verifies the
bytes it received and only then parses them (`parse_payload`), refusing anything that is not
in canonical form. Receipts go the other way with their own domain prefix, so a signature
made for one purpose can never be replayed as the other. docs/response.md has the format.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protos.types import (
    ACTION_ROLLBACK,
    ACTIONS,
    MAX_COMMAND_TTL_NS,
    CommandEnvelope,
    CommandPayload,
    CommandSignature,
    Receipt,
    SignedReceipt,
)

__all__ = [
    "COMMAND_DOMAIN",
    "MAX_PAYLOAD_BYTES",
    "MAX_SIGNATURES",
    "PAYLOAD_TYPE",
    "RECEIPT_DOMAIN",
    "RECEIPT_TYPE",
    "SigningError",
    "add_signature",
    "build_envelope",
    "canonical_json",
    "key_id",
    "make_payload",
    "new_command_id",
    "parse_canonical",
    "parse_payload",
    "parse_receipt",
    "payload_bytes",
    "payload_sha256",
    "public_key_raw",
    "receipt_bytes",
    "sign_payload",
    "sign_receipt",
    "verify_payload_signature",
    "verify_receipt",
]

COMMAND_DOMAIN: Final = b"gpusoc-command-v1\x00"
RECEIPT_DOMAIN: Final = b"gpusoc-receipt-v1\x00"
PAYLOAD_TYPE: Final = "gpusoc.command.v1"
RECEIPT_TYPE: Final = "gpusoc.receipt.v1"
MAX_PAYLOAD_BYTES: Final = 16 * 1024
MAX_SIGNATURES: Final = 8
MAX_HOSTS: Final = 4096
MAX_REASON_CHARS: Final = 1024
MAX_NAME_CHARS: Final = 255
_INT64_MAX: Final = (1 << 63) - 1
_COMMAND_ID_RE: Final = re.compile(r"^[0-9a-f]{32}$")
_DIGEST_RE: Final = re.compile(r"^sha256:[0-9a-f]{64}$")
_PAYLOAD_KEYS: Final = frozenset(
    {
        "type",
        "command_id",
        "action",
        "job",
        "target_hosts",
        "issued_at_ns",
        "expires_at_ns",
        "reason",
        "checkpoint_digest",
        "break_glass",
    }
)


class SigningError(ValueError):
    """Bytes that are not a valid, canonical, correctly signed payload or receipt."""


# ---------------------------------------------------------------- canonical JSON


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a JSON value: sorted keys, no whitespace, UTF-8, no floats/NaN.

    Integers, strings, booleans, lists and objects only, so every implementation agrees.
    """
    _check_no_floats(obj)
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise SigningError(f"not canonical-JSON encodable: {exc}") from exc


def _check_no_floats(obj: Any) -> None:
    if isinstance(obj, float):
        raise SigningError("floats are not allowed in signed JSON (use integers)")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise SigningError("object keys must be strings")
            _check_no_floats(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _check_no_floats(v)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise SigningError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_float(text: str) -> Any:
    raise SigningError(f"float {text} in signed JSON")


def _no_constant(text: str) -> Any:
    raise SigningError(f"{text} in signed JSON")


def parse_canonical(data: bytes) -> Any:
    """Parse JSON that must already be in canonical form; anything else is a SigningError.

    Re-encoding and comparing rules out duplicate keys, whitespace and alternative escapes,
    so two parsers can never read different values from the same signed bytes.
    """
    try:
        obj = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_reject_duplicates,
            parse_float=_no_float,
            parse_constant=_no_constant,
        )
    except SigningError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SigningError(f"not JSON: {exc}") from exc
    if canonical_json(obj) != data:
        raise SigningError("JSON is not in canonical form")
    return obj


# ---------------------------------------------------------------- keys


def public_key_raw(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key, the form receipts carry."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey | bytes) -> str:
    """Hex SHA-256 of the raw public key (same convention as the console's audit keys)."""
    raw = key if isinstance(key, bytes) else public_key_raw(key)
    return hashlib.sha256(raw).hexdigest()


# ---------------------------------------------------------------- commands


def new_command_id() -> str:
    """128 random bits as 32 hex characters: unguessable and single-use."""
    return secrets.token_hex(16)


def make_payload(
    action: str,
    job: str,
    target_hosts: Sequence[str],
    reason: str,
    *,
    ttl_s: float = 60.0,
    checkpoint_digest: str = "",
    break_glass: bool = False,
    now_ns: int | None = None,
    command_id: str | None = None,
) -> CommandPayload:
    """A fresh payload with a new id, issued now and expiring `ttl_s` later (at most 120 s)."""
    issued = time.time_ns() if now_ns is None else now_ns
    payload = CommandPayload(
        command_id=command_id or new_command_id(),
        action=action,
        job=job,
        target_hosts=tuple(target_hosts),
        issued_at_ns=issued,
        expires_at_ns=issued + int(ttl_s * 1e9),
        reason=reason,
        checkpoint_digest=checkpoint_digest,
        break_glass=break_glass,
    )
    _validate_payload(payload)
    return payload


def _validate_payload(p: CommandPayload) -> None:
    if not _COMMAND_ID_RE.match(p.command_id):
        raise SigningError("command_id must be 32 lowercase hex characters")
    if p.action not in ACTIONS:
        raise SigningError(f"unknown action {p.action!r} (known: {', '.join(ACTIONS)})")
    if not p.job or len(p.job) > MAX_NAME_CHARS:
        raise SigningError(f"job must be 1-{MAX_NAME_CHARS} characters")
    hosts = p.target_hosts
    if not hosts or len(hosts) > MAX_HOSTS:
        raise SigningError(f"target_hosts must list 1-{MAX_HOSTS} hosts")
    if any(not isinstance(h, str) or not h or len(h) > MAX_NAME_CHARS for h in hosts):
        raise SigningError("every target host must be a non-empty string")
    if len(set(hosts)) != len(hosts):
        raise SigningError("target_hosts lists a host twice")
    for name in ("issued_at_ns", "expires_at_ns"):
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= _INT64_MAX:
            raise SigningError(f"{name} must be a positive 64-bit integer")
    if p.expires_at_ns <= p.issued_at_ns:
        raise SigningError("expires_at_ns must be after issued_at_ns")
    if p.expires_at_ns - p.issued_at_ns > MAX_COMMAND_TTL_NS:
        raise SigningError(f"command lifetime exceeds {MAX_COMMAND_TTL_NS // 1_000_000_000} s")
    if not isinstance(p.reason, str) or not p.reason.strip() or len(p.reason) > MAX_REASON_CHARS:
        raise SigningError(f"reason must be 1-{MAX_REASON_CHARS} characters")
    if not isinstance(p.break_glass, bool):
        raise SigningError("break_glass must be a boolean")
    if p.action == ACTION_ROLLBACK:
        if not isinstance(p.checkpoint_digest, str) or not _DIGEST_RE.match(p.checkpoint_digest):
            raise SigningError("rollback needs checkpoint_digest 'sha256:<64 hex>'")
    else:
        if p.checkpoint_digest:
            raise SigningError("checkpoint_digest is only for rollback")
        if p.break_glass:
            raise SigningError("break_glass only applies to rollback")


def payload_bytes(payload: CommandPayload) -> bytes:
    """The canonical bytes operators sign and the agent receives."""
    _validate_payload(payload)
    obj = {
        "type": PAYLOAD_TYPE,
        "command_id": payload.command_id,
        "action": payload.action,
        "job": payload.job,
        "target_hosts": list(payload.target_hosts),
        "issued_at_ns": payload.issued_at_ns,
        "expires_at_ns": payload.expires_at_ns,
        "reason": payload.reason,
        "checkpoint_digest": payload.checkpoint_digest,
        "break_glass": payload.break_glass,
    }
    data = canonical_json(obj)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise SigningError(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return data


def parse_payload(data: bytes) -> CommandPayload:
    """Strictly parse payload bytes (call only after their signatures verified)."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise SigningError(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    obj = parse_canonical(data)
    if not isinstance(obj, dict):
        raise SigningError("payload is not a JSON object")
    if set(obj) != _PAYLOAD_KEYS:
        missing = sorted(_PAYLOAD_KEYS - set(obj))
        extra = sorted(set(obj) - _PAYLOAD_KEYS)
        raise SigningError(f"payload keys differ (missing {missing}, unexpected {extra})")
    if obj["type"] != PAYLOAD_TYPE:
        raise SigningError(f"payload type {obj['type']!r} is not {PAYLOAD_TYPE!r}")
    for k in ("command_id", "action", "job", "reason", "checkpoint_digest"):
        if not isinstance(obj[k], str):
            raise SigningError(f"{k} must be a string")
    if not isinstance(obj["target_hosts"], list):
        raise SigningError("target_hosts must be a list")
    payload = CommandPayload(
        command_id=obj["command_id"],
        action=obj["action"],
        job=obj["job"],
        target_hosts=tuple(obj["target_hosts"]),
        issued_at_ns=obj["issued_at_ns"],
        expires_at_ns=obj["expires_at_ns"],
        reason=obj["reason"],
        checkpoint_digest=obj["checkpoint_digest"],
        break_glass=obj["break_glass"],
    )
    _validate_payload(payload)
    return payload


def payload_sha256(data: bytes) -> str:
    """Hex SHA-256 of payload bytes: binds a receipt or an audit row to one exact command."""
    return hashlib.sha256(data).hexdigest()


def sign_payload(data: bytes, key: Ed25519PrivateKey) -> bytes:
    """One operator's Ed25519 signature over the domain-separated payload bytes."""
    return key.sign(COMMAND_DOMAIN + data)


def verify_payload_signature(data: bytes, signature: bytes, public_key: Ed25519PublicKey) -> bool:
    """True when `signature` is `public_key`'s signature over these payload bytes."""
    try:
        public_key.verify(signature, COMMAND_DOMAIN + data)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def build_envelope(
    payload: CommandPayload | bytes, signers: Sequence[tuple[bytes, Ed25519PrivateKey]]
) -> CommandEnvelope:
    """Sign `payload` once per (operator certificate PEM, operator private key) pair.

    Pass the bytes from `payload_bytes` (or a CommandPayload, encoded here) so that every
    approval, possibly collected on different consoles, covers the same bytes.
    """
    data = payload if isinstance(payload, bytes) else payload_bytes(payload)
    env = CommandEnvelope(payload=data)
    for cert_pem, key in signers:
        env = add_signature(env, cert_pem, key)
    return env


def add_signature(env: CommandEnvelope, cert_pem: bytes, key: Ed25519PrivateKey) -> CommandEnvelope:
    """A second (third, ...) approver adds a signature without touching the payload bytes."""
    if len(env.signatures) >= MAX_SIGNATURES:
        raise SigningError(f"at most {MAX_SIGNATURES} signatures")
    sig = CommandSignature(certificate_pem=bytes(cert_pem), signature=sign_payload(env.payload, key))
    return replace(env, signatures=(*env.signatures, sig))


# ---------------------------------------------------------------- receipts

_RECEIPT_FIELDS: Final = {f.name: f for f in fields(Receipt)}
_TUPLE_FIELDS: Final = frozenset({"signers", "pids", "restarted_pids"})


def receipt_bytes(receipt: Receipt) -> bytes:
    """Canonical JSON of a receipt (the bytes the agent signs)."""
    obj: dict[str, Any] = {"type": RECEIPT_TYPE}
    for k, v in asdict(receipt).items():
        obj[k] = list(v) if isinstance(v, tuple) else v
    return canonical_json(obj)


def parse_receipt(data: bytes) -> Receipt:
    """Parse receipt bytes; unknown keys (from newer agents) are ignored, wrong types refused."""
    obj = parse_canonical(data)
    if not isinstance(obj, dict) or obj.get("type") != RECEIPT_TYPE:
        raise SigningError(f"not a {RECEIPT_TYPE} object")
    kwargs: dict[str, Any] = {}
    for name in _RECEIPT_FIELDS:
        if name not in obj:
            continue
        v = obj[name]
        if name in _TUPLE_FIELDS:
            if not isinstance(v, list):
                raise SigningError(f"receipt {name} must be a list")
            v = tuple(v)
        kwargs[name] = v
    for required in ("command_id", "host", "phase", "status"):
        if not isinstance(kwargs.get(required), str):
            raise SigningError(f"receipt lacks {required}")
    return Receipt(**kwargs)


def sign_receipt(receipt: Receipt, key: Ed25519PrivateKey) -> SignedReceipt:
    """Agent side: encode and sign; the raw public key travels along for pinning checks."""
    data = receipt_bytes(receipt)
    return SignedReceipt(receipt=data, signature=key.sign(RECEIPT_DOMAIN + data), agent_public_key=public_key_raw(key))


def verify_receipt(signed: SignedReceipt, pinned_public_key: bytes | None = None) -> Receipt:
    """Console side: check the agent's signature (against the pinned key when given) and parse.

    Without a pinned key the receipt only proves self-consistency; pin the key from
    ControlState (trust on first use over mTLS) or from the agent's enrolment.
    """
    if pinned_public_key is not None and signed.agent_public_key != pinned_public_key:
        raise SigningError("receipt signed by a key other than the pinned agent key")
    try:
        pub = Ed25519PublicKey.from_public_bytes(signed.agent_public_key)
        pub.verify(signed.signature, RECEIPT_DOMAIN + signed.receipt)
    except (InvalidSignature, ValueError) as exc:
        raise SigningError("receipt signature does not verify") from exc
    receipt = parse_receipt(signed.receipt)
    if receipt.agent_key_id and receipt.agent_key_id != key_id(signed.agent_public_key):
        raise SigningError("receipt names a different agent key")
    return receipt
