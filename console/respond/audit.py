"""Tamper-evident audit trail: a SHA-256 hash chain over `audit_log` with Ed25519-signed heads.

Every operator action, command, receipt, alert acknowledgement and rollback decision becomes one
`audit_log` row whose hash covers the previous row's hash. The console signs the head (seq, hash)
every N rows or T seconds, and on export, into `audit_heads`. docs/audit.md specifies the byte
encoding; console/respond/verify.py checks it offline against pinned public keys.

All database work runs on the store's single writer connection through a `Runner` (in the console:
`StoreWriter.run_on_writer`); this module never opens a connection of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import duckdb
import pyarrow as pa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from console.store.export import export_from_connection
from console.store.schema import DDL

T = TypeVar("T")

HASH_LEN: Final = 32
GENESIS_HASH: Final = bytes(HASH_LEN)
ENTRY_DOMAIN: Final = b"gpusoc.audit.entry.v1"
HEAD_DOMAIN: Final = b"gpusoc.audit.head.v1"
_ENTRY_TAG: Final = b"\x00"
_HEAD_TAG: Final = b"\x01"

DEFAULT_SIGN_EVERY_ROWS: Final = 100
DEFAULT_SIGN_EVERY_S: Final = 60.0

# Well-known `action` values (free-form strings are allowed; these keep the trail greppable).
ACTION_OPERATOR: Final = "operator.action"
ACTION_COMMAND: Final = "command.issued"
ACTION_RECEIPT: Final = "command.receipt"
ACTION_ALERT_ACK: Final = "alert.ack"
ACTION_ROLLBACK: Final = "rollback.decision"
ACTION_EXPORT: Final = "store.export"

# Not yet in console/store/schema.py: the schema owner folds this in (docs/audit.md documents it).
AUDIT_HEADS_DDL: Final = """
CREATE TABLE IF NOT EXISTS audit_heads (
    seq BIGINT NOT NULL,
    hash BLOB NOT NULL,
    signed_at TIMESTAMPTZ NOT NULL,
    key_id VARCHAR NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (seq, key_id, signed_at)
)"""

_U32: Final = struct.Struct(">I")
_SEQ_TS: Final = struct.Struct(">IQIq")  # lp(u64 seq) || lp(i64 ts_ns)
_LP_U64: Final = struct.Struct(">IQ")
_LP_I64: Final = struct.Struct(">Iq")
_TS: Final = pa.timestamp("us", tz="UTC")


def _lp(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


_ENTRY_PREFIX: Final = _ENTRY_TAG + _lp(ENTRY_DOMAIN)
_HEAD_PREFIX: Final = _HEAD_TAG + _lp(HEAD_DOMAIN)


class AuditChainError(RuntimeError):
    """The live chain cannot be extended safely (broken head in the database, nothing to sign)."""


class AuditKeyError(RuntimeError):
    """The audit key file is missing, unreadable, too widely readable, or not an Ed25519 key."""


# --------------------------------------------------------------------------- encoding


def canonical_json(value: Any) -> str:
    """Deterministic JSON text (sorted keys, no spaces, UTF-8, no NaN) so a payload hashes one way."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_entry(
    seq: int, ts_ns: int, actor: str, action: str, target: str | None, payload: str, prev_hash: bytes
) -> bytes:
    """The exact bytes an entry hash covers: domain-separated, every field length-prefixed.

    0x00 || lp("gpusoc.audit.entry.v1") || lp(u64 seq) || lp(i64 ts_ns) || lp(actor) || lp(action)
    || (0x00 | 0x01 || lp(target)) || lp(payload) || lp(prev_hash), lp(x) = u32be(len x) || x.
    """
    a = actor.encode("utf-8")
    b = action.encode("utf-8")
    p = payload.encode("utf-8")
    if target is None:
        t = b"\x00"
    else:
        tb = target.encode("utf-8")
        t = b"\x01" + _U32.pack(len(tb)) + tb
    return b"".join(
        (
            _ENTRY_PREFIX,
            _SEQ_TS.pack(8, seq, 8, ts_ns),
            _U32.pack(len(a)),
            a,
            _U32.pack(len(b)),
            b,
            t,
            _U32.pack(len(p)),
            p,
            _U32.pack(len(prev_hash)),
            prev_hash,
        )
    )


def entry_hash(
    seq: int, ts_ns: int, actor: str, action: str, target: str | None, payload: str, prev_hash: bytes
) -> bytes:
    """SHA-256 of `encode_entry`: the row's `hash` column, and the next row's `prev_hash`."""
    return hashlib.sha256(encode_entry(seq, ts_ns, actor, action, target, payload, prev_hash)).digest()


def head_message(seq: int, head_hash: bytes, signed_at_ns: int, key_id: str) -> bytes:
    """The bytes a head signature covers; a different domain tag so no entry can pose as a head.

    0x01 || lp("gpusoc.audit.head.v1") || lp(u64 seq) || lp(hash) || lp(i64 signed_at_ns) || lp(key_id).
    """
    return b"".join(
        (
            _HEAD_PREFIX,
            _LP_U64.pack(8, seq),
            _lp(head_hash),
            _LP_I64.pack(8, signed_at_ns),
            _lp(key_id.encode("ascii")),
        )
    )


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit_log row as hashed: ts in ns (a whole number of µs, what TIMESTAMPTZ keeps)."""

    seq: int
    ts_ns: int
    actor: str
    action: str
    target: str | None
    payload: str
    prev_hash: bytes
    hash: bytes

    def compute_hash(self) -> bytes:
        """Recompute the hash from the other fields (what a verifier does)."""
        return entry_hash(self.seq, self.ts_ns, self.actor, self.action, self.target, self.payload, self.prev_hash)

    @property
    def hash_hex(self) -> str:
        """The hash as auditors write it down (lower-case hex)."""
        return self.hash.hex()


@dataclass(frozen=True, slots=True)
class SignedHead:
    """One audit_heads row: the console's signature over (seq, hash) of the chain at signed_at."""

    seq: int
    hash: bytes
    signed_at_ns: int
    key_id: str
    signature: bytes

    def message(self) -> bytes:
        """The signed bytes (see `head_message`)."""
        return head_message(self.seq, self.hash, self.signed_at_ns, self.key_id)

    def verify(self, public_key: Ed25519PublicKey) -> bool:
        """True when `signature` is this key's signature over `message()`."""
        try:
            public_key.verify(self.signature, self.message())
        except InvalidSignature:
            return False
        return True


def make_entry(
    prev_hash: bytes, seq: int, ts_ns: int, actor: str, action: str, target: str | None, payload: Any
) -> AuditEntry:
    """Build the next entry (payload is any JSON value; it is stored as canonical JSON text)."""
    if seq < 1:
        raise ValueError("audit seq starts at 1")
    if len(prev_hash) != HASH_LEN:
        raise ValueError("prev_hash must be 32 bytes")
    if not isinstance(actor, str) or not actor:
        raise ValueError("audit actor must be a non-empty string")
    if not isinstance(action, str) or not action:
        raise ValueError("audit action must be a non-empty string")
    if target is not None and not isinstance(target, str):
        raise ValueError("audit target must be a string or None")
    text = canonical_json(payload)
    ts_ns = (ts_ns // 1000) * 1000
    return AuditEntry(
        seq,
        ts_ns,
        actor,
        action,
        target,
        text,
        prev_hash,
        entry_hash(seq, ts_ns, actor, action, target, text, prev_hash),
    )


def sign_head_record(private_key: Ed25519PrivateKey, seq: int, head_hash: bytes, signed_at_ns: int) -> SignedHead:
    """Sign (seq, hash) of a chain head; signed_at is cut to µs so it survives TIMESTAMPTZ."""
    signed_at_ns = (signed_at_ns // 1000) * 1000
    key_id = public_key_id(private_key.public_key())
    sig = private_key.sign(head_message(seq, head_hash, signed_at_ns, key_id))
    return SignedHead(seq, head_hash, signed_at_ns, key_id, sig)


# --------------------------------------------------------------------------- keys


def public_key_id(public_key: Ed25519PublicKey) -> str:
    """Hex SHA-256 of the raw 32-byte public key: names the key in audit_heads.key_id."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The SubjectPublicKeyInfo PEM that auditors pin (`audit verify --trust`)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def export_public_key(key: Ed25519PrivateKey | Ed25519PublicKey, path: str | Path) -> str:
    """Write the public key PEM (0644) for auditors to pin; returns its key id."""
    out = Path(path)
    pem = public_key_pem(key)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
    try:
        tmp.write_bytes(pem)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return public_key_id(key.public_key() if isinstance(key, Ed25519PrivateKey) else key)


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Load a pinned Ed25519 public key PEM; raise AuditKeyError for anything else."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise AuditKeyError(f"cannot read public key {p}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise AuditKeyError(f"{p} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise AuditKeyError(f"{p} is a {type(key).__name__}, not an Ed25519 public key")
    return key


def load_or_create_audit_key(path: str | Path, password: bytes | None = None) -> Ed25519PrivateKey:
    """The console's Ed25519 audit signing key: created 0600 on first use, refused if others can read it.

    Creation is atomic and never overwrites: two consoles racing on one path end up with one key.
    """
    p = Path(path)
    if not p.exists():
        key = Ed25519PrivateKey.generate()
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        )
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
        if _create_exclusive(p, pem):
            return key
    return _load_private_key(p, password)


def load_audit_key(path: str | Path, password: bytes | None = None) -> Ed25519PrivateKey:
    """Load an existing audit key (never creates one), with the same permission checks."""
    return _load_private_key(Path(path), password)


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Write `data` to a new 0600 file at `path`; False when another process created it first."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # umask-proof
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic create-if-absent
        except FileExistsError:
            return False
        return True
    except OSError as exc:
        raise AuditKeyError(f"cannot create audit key {path}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _load_private_key(path: Path, password: bytes | None) -> Ed25519PrivateKey:
    try:
        st = path.stat()
    except OSError as exc:
        raise AuditKeyError(f"cannot stat audit key {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise AuditKeyError(f"audit key {path} is not a regular file")
    if st.st_mode & 0o077:
        raise AuditKeyError(
            f"audit key {path} has mode {stat.S_IMODE(st.st_mode):04o}; group/other access is refused "
            f"(chmod 600 {path})"
        )
    try:
        data = path.read_bytes()
        key = serialization.load_pem_private_key(data, password=password)
    except OSError as exc:
        raise AuditKeyError(f"cannot read audit key {path}: {exc.strerror or exc}") from exc
    except (ValueError, TypeError) as exc:
        raise AuditKeyError(f"cannot load audit key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditKeyError(f"audit key {path} is a {type(key).__name__}, not Ed25519")
    return key


# --------------------------------------------------------------------------- running on the writer


class Runner(Protocol):
    """Runs `fn` with the store's writer connection and returns its result (StoreWriter.run_on_writer)."""

    def __call__(self, fn: Callable[[duckdb.DuckDBPyConnection], T], /) -> T: ...


class _ConnectionRunner:
    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self._con = con
        self._lock = threading.RLock()

    def __call__(self, fn: Callable[[duckdb.DuckDBPyConnection], T], /) -> T:
        with self._lock:
            return fn(self._con)


def connection_runner(con: duckdb.DuckDBPyConnection) -> Runner:
    """A Runner over a plain connection, for tools and tests that own the database outright."""
    return _ConnectionRunner(con)


# --------------------------------------------------------------------------- the chain

# (actor, action, target, payload) of one entry to append.
AuditRecord = tuple[str, str, str | None, Any]

_LOG_COLUMNS: Final = "seq, ts, actor, action, target, payload, prev_hash, hash"
_HEAD_COLUMNS: Final = "seq, hash, signed_at, key_id, signature"


def _entries_table(entries: Sequence[AuditEntry]) -> pa.Table:
    return pa.table(
        {
            "seq": pa.array([e.seq for e in entries], pa.int64()),
            "ts": pa.array([e.ts_ns // 1000 for e in entries], _TS),
            "actor": pa.array([e.actor for e in entries], pa.string()),
            "action": pa.array([e.action for e in entries], pa.string()),
            "target": pa.array([e.target for e in entries], pa.string()),
            "payload": pa.array([e.payload for e in entries], pa.string()),
            "prev_hash": pa.array([e.prev_hash for e in entries], pa.binary()),
            "hash": pa.array([e.hash for e in entries], pa.binary()),
        }
    )


def _heads_table(heads: Sequence[SignedHead]) -> pa.Table:
    return pa.table(
        {
            "seq": pa.array([h.seq for h in heads], pa.int64()),
            "hash": pa.array([h.hash for h in heads], pa.binary()),
            "signed_at": pa.array([h.signed_at_ns // 1000 for h in heads], _TS),
            "key_id": pa.array([h.key_id for h in heads], pa.string()),
            "signature": pa.array([h.signature for h in heads], pa.binary()),
        }
    )


def _insert_arrow(con: duckdb.DuckDBPyConnection, table_name: str, columns: str, data: pa.Table) -> None:
    view = _view_name(table_name)
    con.register(view, data)
    try:
        con.execute(f"INSERT INTO {table_name} ({columns}) SELECT {columns} FROM {view}")
    finally:
        # Fails inside an aborted transaction; the caller's rollback path unregisters again.
        with contextlib.suppress(duckdb.Error):
            con.unregister(view)


def _view_name(table_name: str) -> str:
    return f"_gpusoc_{table_name}_batch"


def _unregister_views(con: duckdb.DuckDBPyConnection) -> None:
    for table_name in ("audit_log", "audit_heads"):
        with contextlib.suppress(duckdb.Error):
            con.unregister(_view_name(table_name))


def _one(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> tuple[Any, ...] | None:
    rows = con.execute(sql, params or []).fetchall()
    return tuple(rows[0]) if rows else None


def ensure_audit_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create audit_log (schema.py's DDL) and audit_heads if missing; idempotent."""
    con.execute(DDL["audit_log"])
    con.execute(AUDIT_HEADS_DDL)


class AuditTrail(Protocol):
    """What code that records actions needs of a chain: AuditChain in the process that owns the
    store, ControlSocketAudit in a CLI while another process (collect, a window) owns it."""

    def append(self, actor: str, action: str, target: str | None = None, payload: Any = None) -> object: ...

    def append_many(self, records: Iterable[AuditRecord]) -> object: ...

    def sign_head(self) -> object: ...


class ControlSocketAudit:
    """Appends through the control socket of the console that holds the store (`<db>.ctl`).

    That console's AuditChain stays the chain's only writer: rows are hashed, stored and signed
    there, in order with its own. Payloads travel as the JSON the chain would hash, so a row reads
    the same as if it had been appended locally.
    """

    def __init__(self, socket_path: str | Path, timeout: float = 60.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def append(self, actor: str, action: str, target: str | None = None, payload: Any = None) -> object:
        """Append one row; returns {"seq", "hash"} once the console committed it."""
        rows = self.append_many([(actor, action, target, payload)])
        return rows[0]

    def append_many(self, records: Iterable[AuditRecord]) -> list[dict[str, Any]]:
        """Append rows in one transaction of the console; raises ControlError when it cannot."""
        from console.store.control import request

        recs = [[actor, action, target, json.loads(canonical_json(payload))]
                for actor, action, target, payload in records]
        if not recs:
            return []
        result, _pid = request(self.socket_path, {"op": "audit_append", "records": recs}, timeout=self.timeout)
        return list(result)

    def sign_head(self) -> object:
        """Ask the console to sign its head now."""
        from console.store.control import request

        result, _pid = request(self.socket_path, {"op": "audit_sign_head"}, timeout=self.timeout)
        return result


class AuditChain:
    """Appends hash-chained audit rows and signs the head every N rows / T seconds / on export.

    The instance caches the head (seq, hash), loaded from the database at construction, so it
    must be the only code that appends to audit_log. Methods may be called from any thread:
    the work itself runs through `run` on the writer connection.
    """

    def __init__(
        self,
        run: Runner,
        *,
        signing_key: Ed25519PrivateKey | None = None,
        sign_every_rows: int = DEFAULT_SIGN_EVERY_ROWS,
        sign_every_s: float = DEFAULT_SIGN_EVERY_S,
        clock_ns: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if sign_every_rows < 1:
            raise ValueError("sign_every_rows must be >= 1")
        self._run = run
        self._key = signing_key
        self._key_id = public_key_id(signing_key.public_key()) if signing_key is not None else None
        self.sign_every_rows = int(sign_every_rows)
        self.sign_every_s = float(sign_every_s)
        self._clock_ns = clock_ns
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._seq = 0
        self._hash = GENESIS_HASH
        self._signed_seq = 0
        self._last_head: SignedHead | None = None
        self._unsigned_since = math.inf  # monotonic time the oldest unsigned row was appended
        self._run(self._open_on)

    # ---------------------------------------------------------------- state

    @property
    def head(self) -> tuple[int, bytes]:
        """(seq, hash) of the newest row; (0, 32 zero bytes) for an empty chain."""
        with self._lock:
            return self._seq, self._hash

    @property
    def signed_seq(self) -> int:
        """Highest seq signed with this chain's key (0 when none)."""
        with self._lock:
            return self._signed_seq

    @property
    def unsigned_rows(self) -> int:
        """Rows appended since the last head signed with this chain's key."""
        with self._lock:
            return self._seq - self._signed_seq

    @property
    def last_signed_head(self) -> SignedHead | None:
        """The newest head this instance signed (None until it signs one)."""
        with self._lock:
            return self._last_head

    @property
    def key_id(self) -> str | None:
        """Key id of the signing key (None when this chain cannot sign)."""
        return self._key_id

    # ---------------------------------------------------------------- public operations

    def append(self, actor: str, action: str, target: str | None = None, payload: Any = None) -> AuditEntry:
        """Append one entry (and sign the head if due); returns it once committed."""
        return self.append_many([(actor, action, target, payload)])[0]

    def append_many(self, records: Iterable[AuditRecord]) -> list[AuditEntry]:
        """Append several entries in one transaction (one Arrow batch); all or none are stored."""
        recs = list(records)
        if not recs:
            return []
        return self._run(lambda con: self._append_on(con, recs))

    def sign_head(self, private_key: Ed25519PrivateKey | None = None) -> SignedHead | None:
        """Sign the current head now (default: this chain's key); None for an empty chain."""
        key = private_key if private_key is not None else self._key
        if key is None:
            raise AuditChainError("no audit signing key: pass one to sign_head() or AuditChain(signing_key=...)")
        return self._run(lambda con: self._sign_on(con, key))

    def sign_if_due(self) -> SignedHead | None:
        """Sign the head when unsigned rows are older than sign_every_s; call it from a timer."""
        if self._key is None:
            return None
        with self._lock:
            due = self._seq > self._signed_seq and self._monotonic() - self._unsigned_since >= self.sign_every_s
        if not due:
            return None
        return self._run(lambda con: self._sign_if_due_on(con))

    def export_signed(
        self, out_path: str | Path, *, actor: str, source_path: str, method: str = "writer"
    ) -> dict[str, Any]:
        """Audit the export, sign the head and copy the database, all in one writer call.

        The returned summary carries `audit_head` ("SEQ:HASH"): hand it to auditors, or keep it
        outside the console, so a later export that lost rows fails `--expect-head`.
        """
        key = self._key
        if key is None:
            raise AuditChainError("export_signed needs the audit signing key")
        out = str(Path(out_path).resolve())
        if Path(out).exists():
            raise FileExistsError(f"export target already exists: {out}")

        def work(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
            self._append_on(con, [(actor, ACTION_EXPORT, out, {"source": source_path})], auto_sign=False)
            head = self._sign_on(con, key)
            assert head is not None
            summary = export_from_connection(con, out, source_path=source_path, method=method)
            summary["audit_head"] = f"{head.seq}:{head.hash.hex()}"
            summary["audit_key_id"] = head.key_id
            return summary

        return self._run(work)

    # ---------------------------------------------------------------- on the writer connection

    def _open_on(self, con: duckdb.DuckDBPyConnection) -> None:
        ensure_audit_tables(con)
        self._load_on(con)
        if self._key is not None and self._seq > self._signed_seq:
            self._sign_on(con, self._key)  # tail left unsigned by a crash or a key change

    def _load_on(self, con: duckdb.DuckDBPyConnection) -> None:
        # fetchall, not fetchone: DuckDB 2 refuses further work (register) on a half-read result.
        got = _one(con, "SELECT count(*), max(seq) FROM audit_log")
        count, max_seq = (int(got[0]), got[1]) if got else (0, None)
        seq, head_hash = 0, GENESIS_HASH
        if count:
            if max_seq != count:
                raise AuditChainError(
                    f"audit_log holds {count} rows but its highest seq is {max_seq}: the chain is broken; "
                    "run `gpusoc-console audit verify` on an export before appending"
                )
            row = _one(
                con,
                "SELECT seq, epoch_us(ts), actor, action, target, payload, prev_hash, hash "
                "FROM audit_log WHERE seq = ?",
                [max_seq],
            )
            assert row is not None
            entry = AuditEntry(
                int(row[0]), int(row[1]) * 1000, row[2], row[3], row[4], row[5], bytes(row[6] or b""), bytes(row[7])
            )
            if entry.compute_hash() != entry.hash:
                raise AuditChainError(f"audit_log head row seq {entry.seq} does not match its hash")
            seq, head_hash = entry.seq, entry.hash
        if self._key_id is not None:
            got = _one(con, "SELECT max(seq) FROM audit_heads WHERE key_id = ?", [self._key_id])
        else:
            got = _one(con, "SELECT max(seq) FROM audit_heads")
        signed = int(got[0]) if got and got[0] is not None else 0
        with self._lock:
            self._seq, self._hash = seq, head_hash
            self._signed_seq = min(signed, seq)
            self._unsigned_since = -math.inf if seq > self._signed_seq else math.inf

    def _append_on(
        self, con: duckdb.DuckDBPyConnection, recs: Sequence[AuditRecord], *, auto_sign: bool = True
    ) -> list[AuditEntry]:
        with self._lock:
            seq, prev = self._seq, self._hash
        ts_ns = self._clock_ns()
        entries: list[AuditEntry] = []
        for actor, action, target, payload in recs:
            seq += 1
            entry = make_entry(prev, seq, ts_ns, actor, action, target, payload)
            entries.append(entry)
            prev = entry.hash
        now = self._monotonic()
        with self._lock:
            unsigned_since = self._unsigned_since if self._seq > self._signed_seq else now
            unsigned = seq - self._signed_seq
        head: SignedHead | None = None
        if (
            auto_sign
            and self._key is not None
            and (unsigned >= self.sign_every_rows or now - unsigned_since >= self.sign_every_s)
        ):
            head = sign_head_record(self._key, seq, prev, self._clock_ns())
        con.execute("BEGIN TRANSACTION")
        try:
            _insert_arrow(con, "audit_log", _LOG_COLUMNS, _entries_table(entries))
            if head is not None:
                _insert_arrow(con, "audit_heads", _HEAD_COLUMNS, _heads_table([head]))
            con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            _unregister_views(con)
            with contextlib.suppress(duckdb.Error, AuditChainError):
                self._load_on(con)  # someone else may have appended: resync before the next try
            raise
        with self._lock:
            self._seq, self._hash = seq, prev
            if head is not None:
                self._signed_seq, self._last_head = head.seq, head
                self._unsigned_since = math.inf
            else:
                self._unsigned_since = unsigned_since
        return entries

    def _sign_if_due_on(self, con: duckdb.DuckDBPyConnection) -> SignedHead | None:
        with self._lock:
            due = self._seq > self._signed_seq and self._monotonic() - self._unsigned_since >= self.sign_every_s
        if not due or self._key is None:
            return None
        return self._sign_on(con, self._key)

    def _sign_on(self, con: duckdb.DuckDBPyConnection, key: Ed25519PrivateKey) -> SignedHead | None:
        with self._lock:
            seq, head_hash = self._seq, self._hash
        if seq == 0:
            return None
        head = sign_head_record(key, seq, head_hash, self._clock_ns())
        _insert_arrow(con, "audit_heads", _HEAD_COLUMNS, _heads_table([head]))
        if head.key_id == self._key_id:
            with self._lock:
                self._signed_seq, self._last_head = seq, head
                self._unsigned_since = math.inf
        return head
