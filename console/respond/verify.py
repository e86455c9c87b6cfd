"""Offline verifier of the audit trail in an exported DuckDB file, against PINNED public keys only.

`ChainVerifier` is the single verification core: `verify_rows` runs it over in-memory rows (tests,
fuzzing) and `verify_audit_file` streams an exported file through it in Arrow batches. The file
is untrusted input: it is attached read-only into an in-memory database with file access then
switched off, every name is fully qualified (so macros stored in the file cannot shadow built-in
functions), and keys found in the file are never used.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import duckdb
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from console.respond.audit import (
    GENESIS_HASH,
    HASH_LEN,
    canonical_json,
    entry_hash,
    head_message,
    load_public_key,
    public_key_id,
)

# (seq, ts_ns, actor, action, target, payload, prev_hash, hash): an audit_log row as read.
Row = tuple[Any, Any, Any, Any, Any, Any, Any, Any]
# (seq, hash, signed_at_ns, key_id, signature): an audit_heads row as read.
HeadRow = tuple[Any, Any, Any, Any, Any]

MAX_PROBLEMS: Final = 200
_ALIAS: Final = "gpusoc_audit_src"
_ENCODE_ERRORS: Final = (ValueError, OverflowError, struct.error, UnicodeError, TypeError)

EXPECTED_COLUMNS: Final[dict[str, dict[str, str]]] = {
    "audit_log": {
        "seq": "BIGINT",
        "ts": "TIMESTAMP WITH TIME ZONE",
        "actor": "VARCHAR",
        "action": "VARCHAR",
        "target": "VARCHAR",
        "payload": "VARCHAR",
        "prev_hash": "BLOB",
        "hash": "BLOB",
    },
    "audit_heads": {
        "seq": "BIGINT",
        "hash": "BLOB",
        "signed_at": "TIMESTAMP WITH TIME ZONE",
        "key_id": "VARCHAR",
        "signature": "BLOB",
    },
}


# The by-hand checks of docs/audit.md, for a file attached as `audit` in an in-memory DuckDB CLI
# session (never `USE audit` or open the file directly: macros stored in it could shadow
# built-in functions). tests/test_audit_chain.py runs them and checks the doc quotes them verbatim.
MANUAL_CHAIN_SQL: Final = """\
SELECT seq,
       lower(hex(hash)) = sha256(
           unhex('00') || unhex(printf('%08x', 21)) || encode('gpusoc.audit.entry.v1')
        || unhex('00000008') || unhex(printf('%016x', seq))
        || unhex('00000008') || unhex(printf('%016x', epoch_us(ts) * 1000))
        || unhex(printf('%08x', octet_length(encode(actor)))) || encode(actor)
        || unhex(printf('%08x', octet_length(encode(action)))) || encode(action)
        || CASE WHEN target IS NULL THEN unhex('00')
                ELSE unhex('01') || unhex(printf('%08x', octet_length(encode(target)))) || encode(target) END
        || unhex(printf('%08x', octet_length(encode(payload)))) || encode(payload)
        || unhex(printf('%08x', octet_length(prev_hash))) || prev_hash
       ) AS hash_ok,
       prev_hash = coalesce(lag(hash) OVER (ORDER BY seq), unhex(repeat('00', 32))) AS link_ok,
       seq = row_number() OVER (ORDER BY seq) AS seq_ok
FROM audit.audit_log
ORDER BY seq;"""

MANUAL_HEADS_SQL: Final = """\
SELECT seq, lower(hex(hash)) AS hash, signed_at, key_id,
       lower(hex(
           unhex('01') || unhex(printf('%08x', 20)) || encode('gpusoc.audit.head.v1')
        || unhex('00000008') || unhex(printf('%016x', seq))
        || unhex(printf('%08x', octet_length(hash))) || hash
        || unhex('00000008') || unhex(printf('%016x', epoch_us(signed_at) * 1000))
        || unhex(printf('%08x', octet_length(encode(key_id)))) || encode(key_id)
       )) AS message_hex,
       lower(hex(signature)) AS signature_hex
FROM audit.audit_heads
ORDER BY seq, signed_at;"""


class AuditFileError(RuntimeError):
    """The file could not be opened as a DuckDB database (missing, unreadable, not DuckDB)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason the trail is not valid: a stable `kind`, the row seq it concerns, and details."""

    kind: str
    seq: int | None
    detail: str

    def __str__(self) -> str:
        where = f"seq {self.seq}" if self.seq is not None else "file"
        return f"{where}: [{self.kind}] {self.detail}"


@dataclass(slots=True)
class VerifyReport:
    """Outcome of a verification; `ok` is True only when `problems` is empty."""

    ok: bool
    source: str
    rows: int
    last_seq: int | None
    head_hash: str | None
    heads_total: int
    heads_verified: int
    signed_seq: int
    signed_hash: str | None
    signed_at: str | None
    unsigned_tail: int
    trusted_key_ids: list[str]
    expected_head: str | None
    problems: list[Problem]
    problem_count: int
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    file_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the CLI's --json output)."""
        out = asdict(self)
        out["problems"] = [asdict(p) for p in self.problems]
        return out

    def render(self) -> str:
        """Human-readable report: verdict, chain and head facts, then every problem."""
        lines = [f"{'VALID' if self.ok else 'INVALID'}: {self.source}"]
        lines.append(f"  rows: {self.rows}  last seq: {self.last_seq}  head hash: {self.head_hash}")
        lines.append(
            f"  signed heads: {self.heads_verified}/{self.heads_total} verified with pinned keys; "
            f"covered up to seq {self.signed_seq} (hash {self.signed_hash}, newest signature {self.signed_at})"
        )
        lines.append(f"  unsigned tail: {self.unsigned_tail} row(s)")
        if self.expected_head:
            lines.append(f"  expected head: {self.expected_head}")
        if self.file_sha256:
            lines.append(f"  file sha256: {self.file_sha256}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        for p in self.problems:
            lines.append(f"  {p}")
        if self.problem_count > len(self.problems):
            lines.append(f"  ... and {self.problem_count - len(self.problems)} more problem(s)")
        return "\n".join(lines)


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_hash(v: Any) -> bool:
    return type(v) is bytes and len(v) == HASH_LEN


def _is_canonical(payload: str) -> bool:
    try:
        return canonical_json(json.loads(payload)) == payload
    except (ValueError, RecursionError):
        return False


def _malformed_fields(*row: Any) -> list[str]:
    seq, ts_ns, actor, action, target, payload, prev_hash, stored = row
    checks = (
        ("seq", _is_int(seq)),
        ("ts", _is_int(ts_ns)),
        ("actor", isinstance(actor, str)),
        ("action", isinstance(action, str)),
        ("target", target is None or isinstance(target, str)),
        ("payload", isinstance(payload, str)),
        ("prev_hash", _is_hash(prev_hash)),
        ("hash", _is_hash(stored)),
    )
    return [name for name, good in checks if not good]


def _short(v: Any) -> str:
    return v.hex() if isinstance(v, bytes) else repr(v)


def _iso_ns(ns: int) -> str:
    try:
        when = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=ns // 1000)
    except (OverflowError, ValueError):
        return f"{ns}ns"
    return when.isoformat().replace("+00:00", "Z")


class ChainVerifier:
    """Streaming verification core: give it the heads up front, feed rows in seq order, then finish().

    Checks: seq contiguous from 1; prev_hash links (genesis = 32 zero bytes); every hash
    recomputes; (optionally) payload is canonical JSON; every head is signed by a pinned key and matches the
    chain at its seq; the last row is covered by such a head; an expected head is present.
    """

    def __init__(
        self,
        heads: Iterable[HeadRow],
        trusted_keys: Sequence[Ed25519PublicKey],
        expected_head: tuple[int, bytes] | None = None,
        *,
        allow_unsigned_tail: bool = False,
        check_payload: bool = False,
        max_problems: int = MAX_PROBLEMS,
    ) -> None:
        self._trusted = {public_key_id(k): k for k in trusted_keys}
        self._expected = expected_head
        self._allow_tail = allow_unsigned_tail
        # The hash covers the payload text byte for byte, so this adds no tamper evidence; it finds
        # producer bugs and costs ~4x the rest of verification, hence opt-in.
        self._check_payload = check_payload
        self._max_problems = max_problems
        self.problems: list[Problem] = []
        self.problem_count = 0
        self.rows = 0
        self.heads_total = 0
        self.heads_verified = 0
        self._heads_at: dict[int, list[bytes]] = {}
        self._signed_at_max: int | None = None
        self._seen_head_seqs: set[int] = set()
        self._next = 1
        self._prev: Any = GENESIS_HASH
        self._prev_seq = 0
        self._last_seq: Any = None
        self._last_hash: Any = None
        self._covered_rows = 0
        self._covered_seq = 0
        self._covered_hash: bytes | None = None
        self._expected_seen = False
        if not self._trusted:
            self.add_problem("no_pinned_key", None, "no trusted public key given: nothing can vouch for the chain")
        for head in heads:
            self._check_head(head)

    def add_problem(self, kind: str, seq: int | None, detail: str) -> None:
        """Record a problem found outside the core (schema, read errors); keeps the first MAX_PROBLEMS."""
        self.problem_count += 1
        if len(self.problems) < self._max_problems:
            self.problems.append(Problem(kind, seq, detail))

    def _check_head(self, head: HeadRow) -> None:
        self.heads_total += 1
        seq, head_hash, signed_at, key_id, sig = head
        where = seq if _is_int(seq) else None
        if not (
            _is_int(seq)
            and seq >= 1
            and _is_hash(head_hash)
            and _is_int(signed_at)
            and isinstance(key_id, str)
            and isinstance(sig, bytes)
        ):
            self.add_problem(
                "head_format",
                where,
                f"signed head row #{self.heads_total} is malformed: "
                f"seq={seq!r} hash={_short(head_hash)} signed_at={signed_at!r} key_id={key_id!r}",
            )
            return
        key = self._trusted.get(key_id)
        if key is None:
            self.add_problem(
                "head_key",
                seq,
                f"head is signed by key_id {key_id[:16]}..., which is not pinned "
                "(keys stored in the file are never trusted)",
            )
            return
        try:
            key.verify(sig, head_message(seq, head_hash, signed_at, key_id))
        except InvalidSignature:
            self.add_problem(
                "head_signature",
                seq,
                f"signature of head (seq {seq}, hash {head_hash.hex()}, "
                f"signed_at {_iso_ns(signed_at)}) does not verify with pinned key {key_id[:16]}...",
            )
            return
        except _ENCODE_ERRORS as exc:
            self.add_problem("head_format", seq, f"signed head cannot be encoded: {exc}")
            return
        self.heads_verified += 1
        self._heads_at.setdefault(seq, []).append(head_hash)
        if self._signed_at_max is None or signed_at > self._signed_at_max:
            self._signed_at_max = signed_at

    def feed(self, rows: Iterable[Row]) -> None:
        """Check rows, which must come in the order of their seq column (ORDER BY seq)."""
        heads_at = self._heads_at
        expected = self._expected
        for seq, ts_ns, actor, action, target, payload, prev_hash, stored in rows:
            self.rows += 1
            want = self._next
            seq_ok = _is_int(seq)
            where = seq if seq_ok else want
            if seq != want or not seq_ok:
                self.add_problem(
                    "seq",
                    want,
                    f"found seq {seq!r} where {want} was expected (row deleted, inserted, duplicated or renumbered)",
                )
            self._next = seq + 1 if seq_ok else want + 1
            well_formed = (
                seq_ok
                and type(ts_ns) is int
                and type(actor) is str
                and type(action) is str
                and (target is None or type(target) is str)
                and type(payload) is str
                and _is_hash(prev_hash)
                and _is_hash(stored)
            )
            if not well_formed:
                bad = _malformed_fields(seq, ts_ns, actor, action, target, payload, prev_hash, stored)
                self.add_problem(
                    "format",
                    where,
                    f"malformed field(s) {', '.join(bad)} (prev_hash={_short(prev_hash)}, hash={_short(stored)})",
                )
            else:
                if prev_hash != self._prev:
                    self.add_problem(
                        "prev_hash",
                        where,
                        f"prev_hash {prev_hash.hex()} does not link to the hash "
                        f"of the previous row (seq {self._prev_seq}: {_short(self._prev)})",
                    )
                try:
                    computed = entry_hash(seq, ts_ns, actor, action, target, payload, prev_hash)
                except _ENCODE_ERRORS as exc:
                    self.add_problem("format", where, f"row cannot be encoded: {exc}")
                else:
                    if computed != stored:
                        self.add_problem(
                            "hash",
                            where,
                            f"stored hash {stored.hex()} but the row content hashes to "
                            f"{computed.hex()} (a field was edited)",
                        )
                if self._check_payload and not _is_canonical(payload):
                    self.add_problem("payload", where, "payload is not canonical JSON")
            if seq_ok:
                signed = heads_at.get(seq)
                if signed is not None:
                    self._seen_head_seqs.add(seq)
                    for head_hash in signed:
                        if head_hash == stored:
                            self._covered_rows, self._covered_seq, self._covered_hash = self.rows, seq, head_hash
                        else:
                            self.add_problem(
                                "head_mismatch",
                                seq,
                                f"pinned signed head says hash {head_hash.hex()} but the chain has {_short(stored)}",
                            )
                if expected is not None and seq == expected[0]:
                    self._expected_seen = True
                    if stored != expected[1]:
                        self.add_problem(
                            "expected_head",
                            seq,
                            f"expected head hash {expected[1].hex()} but the chain "
                            f"has {_short(stored)} (history rewritten)",
                        )
            self._prev, self._prev_seq = stored, seq
            self._last_seq, self._last_hash = seq, stored

    def finish(
        self, source: str = "<memory>", started: float | None = None, *, chain_read: bool = True
    ) -> VerifyReport:
        """End-of-chain checks (heads past the end, coverage, truncation) and the report.

        chain_read=False (the tables could not be read) reports only the problems added so far.
        """
        last = self._last_seq if _is_int(self._last_seq) else None
        if chain_read and self.rows == 0:
            self.add_problem("empty", None, "audit_log has no rows")
        for seq in sorted(self._heads_at) if chain_read else ():
            if seq in self._seen_head_seqs:
                continue
            if last is None or seq > last:
                self.add_problem(
                    "head_beyond_end",
                    seq,
                    f"a pinned signed head covers seq {seq} but the chain ends at "
                    f"{last}: rows were truncated or deleted",
                )
            else:
                self.add_problem("head_unmatched", seq, "a pinned signed head names this seq but no row has it")
        if self.heads_verified == 0 and chain_read:
            self.add_problem(
                "no_signed_head",
                None,
                f"no signed head verifies with a pinned key ({self.heads_total} head row(s) in the file)",
            )
        tail = self.rows - self._covered_rows
        warnings: list[str] = []
        if chain_read and self.rows and tail:
            msg = f"{tail} row(s) after seq {self._covered_seq} are not covered by a pinned signed head"
            if self._allow_tail:
                warnings.append(msg)
            else:
                self.add_problem("unsigned_tail", self._covered_seq + 1, msg)
        exp_text = None
        if self._expected is not None:
            exp_seq, exp_hash = self._expected
            exp_text = f"{exp_seq}:{exp_hash.hex()}"
            if not self._expected_seen and chain_read:
                self.add_problem(
                    "expected_head",
                    exp_seq,
                    f"expected head seq {exp_seq} is not in the chain, which ends at {last}: the log was truncated",
                )
        return VerifyReport(
            ok=self.problem_count == 0,
            source=source,
            rows=self.rows,
            last_seq=last,
            head_hash=_short(self._last_hash) if self._last_hash is not None else None,
            heads_total=self.heads_total,
            heads_verified=self.heads_verified,
            signed_seq=self._covered_seq,
            signed_hash=self._covered_hash.hex() if self._covered_hash else None,
            signed_at=_iso_ns(self._signed_at_max) if self._signed_at_max is not None else None,
            unsigned_tail=tail,
            trusted_key_ids=sorted(self._trusted),
            expected_head=exp_text,
            problems=list(self.problems),
            problem_count=self.problem_count,
            warnings=warnings,
            seconds=time.perf_counter() - started if started is not None else 0.0,
        )


def verify_rows(
    rows: Iterable[Row],
    heads: Iterable[HeadRow],
    trusted_keys: Sequence[Ed25519PublicKey],
    expected_head: tuple[int, bytes] | None = None,
    *,
    allow_unsigned_tail: bool = False,
    check_payload: bool = False,
    source: str = "<memory>",
) -> VerifyReport:
    """Verify an in-memory chain with exactly the checks `verify_audit_file` applies to a file."""
    started = time.perf_counter()
    v = ChainVerifier(
        heads, trusted_keys, expected_head, allow_unsigned_tail=allow_unsigned_tail, check_payload=check_payload
    )
    v.feed(rows)
    return v.finish(source, started)


def parse_expected_head(text: str) -> tuple[int, bytes]:
    """Parse "SEQ:HASH" (decimal seq, 64 hex digits) as printed by exports and reports."""
    seq_s, sep, hash_s = text.strip().partition(":")
    if not sep:
        raise ValueError(f"expected head must be SEQ:HASH, got {text!r}")
    try:
        seq = int(seq_s)
        digest = bytes.fromhex(hash_s)
    except ValueError as exc:
        raise ValueError(f"expected head must be SEQ:HASH with a decimal seq and hex hash: {exc}") from exc
    if seq < 1 or len(digest) != HASH_LEN:
        raise ValueError("expected head needs seq >= 1 and a 32-byte (64 hex digit) hash")
    return seq, digest


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _open_untrusted(path: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the file attached read-only and file access then disabled."""
    config: dict[str, str | bool | int | float | list[str]] = {
        "autoload_known_extensions": False,
        "autoinstall_known_extensions": False,
    }
    con = duckdb.connect(":memory:", config=config)
    try:
        literal = "'" + str(path).replace("'", "''") + "'"
        con.execute(f"ATTACH {literal} AS {_ALIAS} (READ_ONLY)")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except duckdb.Error as exc:
        con.close()
        raise AuditFileError(f"cannot open {path} as a DuckDB database: {str(exc).splitlines()[0]}") from exc
    return con


def _schema_problems(con: duckdb.DuckDBPyConnection) -> list[Problem]:
    problems: list[Problem] = []
    tables = {
        r[0]
        for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'main'", [_ALIAS]
        ).fetchall()
    }
    cols: dict[str, dict[str, str]] = {}
    for table, column, dtype in con.execute(
        "SELECT table_name, column_name, data_type FROM duckdb_columns() "
        "WHERE database_name = ? AND schema_name = 'main'",
        [_ALIAS],
    ).fetchall():
        cols.setdefault(table, {})[column] = dtype
    for table, want in EXPECTED_COLUMNS.items():
        if table not in tables:
            problems.append(Problem("schema", None, f"no base table main.{table} in the file"))
            continue
        have = cols.get(table, {})
        for column, dtype in want.items():
            if have.get(column) != dtype:
                problems.append(Problem("schema", None, f"{table}.{column} is {have.get(column)!r}, expected {dtype}"))
    return problems


def _iter_rows(con: duckdb.DuckDBPyConnection, batch_rows: int) -> Iterable[Row]:
    sql = (
        f"SELECT seq, epoch_us(ts), actor, action, target, payload, prev_hash, hash "
        f"FROM {_ALIAS}.main.audit_log ORDER BY seq NULLS LAST"
    )
    rel = con.sql(sql)
    reader = rel.to_arrow_reader(batch_rows) if hasattr(rel, "to_arrow_reader") else rel.fetch_arrow_reader(batch_rows)
    for batch in reader:
        cols = [c.to_pylist() for c in batch.columns]
        ts = [None if v is None else v * 1000 for v in cols[1]]
        yield from zip(cols[0], ts, cols[2], cols[3], cols[4], cols[5], cols[6], cols[7], strict=True)


def _read_heads(con: duckdb.DuckDBPyConnection) -> list[HeadRow]:
    rows = con.execute(
        f"SELECT seq, hash, epoch_us(signed_at), key_id, signature "
        f"FROM {_ALIAS}.main.audit_heads ORDER BY seq, signed_at"
    ).fetchall()
    return [(r[0], r[1], None if r[2] is None else r[2] * 1000, r[3], r[4]) for r in rows]


def load_audit_file(db_path: str | Path) -> tuple[list[Row], list[HeadRow]]:
    """Read an exported file's chain and heads into memory (for tools, fuzzing and benchmarks).

    Opens the file the same guarded way as verify_audit_file; does not check anything.
    """
    path = Path(db_path)
    if not path.is_file():
        raise AuditFileError(f"no such file: {path}")
    con = _open_untrusted(path)
    try:
        return list(_iter_rows(con, 65536)), _read_heads(con)
    finally:
        con.close()


def verify_audit_file(
    db_path: str | Path,
    trusted_keys: Sequence[str | Path | Ed25519PublicKey],
    expected_head: tuple[int, str | bytes] | None = None,
    *,
    allow_unsigned_tail: bool = False,
    check_payload: bool = False,
    batch_rows: int = 65536,
) -> VerifyReport:
    """Verify the audit trail of an EXPORTED DuckDB file against pinned public keys.

    Raises AuditKeyError for an unusable key file and AuditFileError when the file cannot be
    opened; everything wrong *inside* the file is reported as a Problem (report.ok False).
    """
    started = time.perf_counter()
    keys = [k if isinstance(k, Ed25519PublicKey) else load_public_key(k) for k in trusted_keys]
    exp: tuple[int, bytes] | None = None
    if expected_head is not None:
        seq, digest = expected_head
        exp = (int(seq), bytes.fromhex(digest) if isinstance(digest, str) else bytes(digest))
    path = Path(db_path)
    if not path.is_file():
        raise AuditFileError(f"no such file: {path}")
    digest_hex = _file_sha256(path)
    con = _open_untrusted(path)
    try:
        schema = _schema_problems(con)
        chain_read = not schema
        v = ChainVerifier([], keys, exp, allow_unsigned_tail=allow_unsigned_tail)
        for p in schema:
            v.add_problem(p.kind, p.seq, p.detail)
        if chain_read:
            try:
                v = ChainVerifier(
                    _read_heads(con), keys, exp, allow_unsigned_tail=allow_unsigned_tail, check_payload=check_payload
                )
                v.feed(_iter_rows(con, batch_rows))
            except duckdb.Error as exc:
                v = ChainVerifier([], keys, exp, allow_unsigned_tail=allow_unsigned_tail)
                v.add_problem("read", None, f"cannot read the audit tables: {str(exc).splitlines()[0]}")
                chain_read = False
        report = v.finish(str(path), started, chain_read=chain_read)
    finally:
        con.close()
    report.file_sha256 = digest_hex
    return report
