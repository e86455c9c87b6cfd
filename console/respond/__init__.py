"""Response side of the console: the tamper-evident audit trail and its offline verifier."""

from console.respond.audit import (
    GENESIS_HASH,
    AuditChain,
    AuditChainError,
    AuditEntry,
    AuditKeyError,
    SignedHead,
    canonical_json,
    connection_runner,
    export_public_key,
    load_audit_key,
    load_or_create_audit_key,
    load_public_key,
    public_key_id,
    public_key_pem,
)
from console.respond.verify import Problem, VerifyReport, load_audit_file, verify_audit_file, verify_rows

__all__ = [
    "GENESIS_HASH",
    "AuditChain",
    "AuditChainError",
    "AuditEntry",
    "AuditKeyError",
    "Problem",
    "SignedHead",
    "VerifyReport",
    "canonical_json",
    "connection_runner",
    "export_public_key",
    "load_audit_file",
    "load_audit_key",
    "load_or_create_audit_key",
    "load_public_key",
    "public_key_id",
    "public_key_pem",
    "verify_audit_file",
    "verify_rows",
]
