"""`gpusoc-console audit ...`: verify an exported audit file offline, print the audit public key.

The console CLI wires this in with `add_audit_parser(subparsers)` and dispatches `cmd == "audit"`
to `run_audit(args)`. Exit codes: 0 valid, 1 invalid (reasons printed), 2 usage or I/O error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from console.respond.audit import AuditKeyError, export_public_key, load_audit_key, public_key_id, public_key_pem
from console.respond.verify import AuditFileError, parse_expected_head, verify_audit_file

EXIT_VALID = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


def add_audit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `audit` command (verify, pubkey) to the console's subparsers; returns its parser."""
    a = subparsers.add_parser("audit", help="verify the tamper-evident audit trail of an exported DuckDB file")
    sub = a.add_subparsers(dest="audit_cmd", metavar="{verify,pubkey}")
    sub.required = True

    v = sub.add_parser(
        "verify",
        help="check the hash chain and signed heads of an exported file against pinned keys",
        description="Exit 0: valid. 1: invalid (every reason is printed). 2: usage or I/O error.",
    )
    v.add_argument("file", metavar="FILE", help="exported DuckDB file (opened read-only)")
    v.add_argument(
        "--trust",
        required=True,
        nargs="+",
        action="extend",
        metavar="KEY",
        help="pinned Ed25519 public key PEM(s) of the console; keys in the file are never used",
    )
    v.add_argument(
        "--expect-head",
        metavar="SEQ:HASH",
        help="a head from an earlier export: the chain must still contain it (detects truncation)",
    )
    v.add_argument(
        "--allow-unsigned-tail",
        action="store_true",
        help="accept rows after the last signed head (reported as a warning instead)",
    )
    v.add_argument(
        "--check-payload",
        action="store_true",
        help="also require every payload to be canonical JSON (finds producer bugs; slower)",
    )
    v.add_argument("--json", action="store_true", help="print the report as JSON")

    k = sub.add_parser("pubkey", help="print (or write) the public key PEM of the console's audit key, to pin")
    k.add_argument("key", metavar="KEYFILE", help="the console's audit private key (PEM, mode 0600)")
    k.add_argument("--out", metavar="FILE", help="write the PEM here instead of stdout")
    return a


def _err(msg: str) -> int:
    print(f"gpusoc-console audit: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _verify(args: argparse.Namespace) -> int:
    expected = None
    if args.expect_head:
        try:
            expected = parse_expected_head(args.expect_head)
        except ValueError as exc:
            return _err(str(exc))
    try:
        report = verify_audit_file(
            args.file,
            [Path(p) for p in args.trust],
            expected,
            allow_unsigned_tail=args.allow_unsigned_tail,
            check_payload=args.check_payload,
        )
    except (AuditKeyError, AuditFileError, OSError) as exc:
        return _err(str(exc))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        print(report.render())
    return EXIT_VALID if report.ok else EXIT_INVALID


def _pubkey(args: argparse.Namespace) -> int:
    try:
        key = load_audit_key(args.key)
    except AuditKeyError as exc:
        return _err(str(exc))
    pem = public_key_pem(key)
    kid = public_key_id(key.public_key())
    if args.out:
        try:
            export_public_key(key, args.out)
        except OSError as exc:
            return _err(f"cannot write {args.out}: {exc.strerror or exc}")
        print(f"wrote {args.out} (key_id {kid})")
    else:
        sys.stdout.write(pem.decode("ascii"))
        print(f"# key_id {kid}", file=sys.stderr)
    return EXIT_VALID


def run_audit(args: argparse.Namespace) -> int:
    """Run the parsed `audit` command; returns the process exit code (0 / 1 / 2)."""
    cmd = getattr(args, "audit_cmd", None)
    if cmd == "verify":
        return _verify(args)
    if cmd == "pubkey":
        return _pubkey(args)
    return _err("choose a command: audit verify | audit pubkey")
