"""The store's control socket: other processes read a store that a running console holds open.

DuckDB lets one process open a file while it is written, so while `gpusoc-console collect` or the
desktop console runs, `gpusoc-console query/export/alerts --db SAME` cannot open the file. The
process that holds the store therefore listens on a Unix socket next to it, `<db>.ctl` (mode
0600, same user only, checked with SO_PEERCRED), and those commands ask it instead:

* `query`: one read statement (SELECT, WITH ... SELECT, EXPLAIN, DESCRIBE, SHOW, SUMMARIZE or a
  read-only PRAGMA), run on a reader cursor of the writer's database inside a READ ONLY
  transaction. DuckDB's MVCC means it never waits for the writer, nor the writer for it; a
  query is interrupted after `query_timeout_s`.
* `export`: a consistent snapshot taken on the writer thread between two flushes, the same
  summary dict as the offline export. With the process's `AuditChain` (collect and the desktop
  pass theirs) it is `AuditChain.export_signed`: a `store.export` row naming the requesting user
  is appended and the head signed in the same writer call, so the file ends in a fresh signed head
  (docs/audit.md); without one it is plain `StoreWriter.export`.
* `alerts`: the stored alerts, the data `gpusoc-console alerts` prints.
* `audit_append` / `audit_sign_head`: rows for `gpusoc-console command --db` (records of
  [actor, action, target, payload]; `command.*` and `rollback.decision` only, not as `console` or
  `collector`) go through this process's AuditChain, the chain's only writer, followed by a
  `control.audit_append` row naming the sending user and pid; `query` takes `params` for that
  command's job-hosts lookup.
* `ping`: pid, store path and writer status.

Wire format: one JSON object per line. The client sends one request line, the server answers
with one line and closes: `{"ok": true, "pid": N, "result": ...}` or `{"ok": false, "pid": N,
"error": "...", "refused": bool}`. Query results are `{"columns", "types", "rows", "truncated"}`
with JSON-safe values (timestamps ISO-8601 UTC, bytes hex, decimals as strings, intervals in
seconds, non-finite floats as "NaN"/"Infinity"/"-Infinity"); `decode_rows` turns them back into
values that print exactly as the offline path prints them.

Qt-free, no asyncio: one accept thread and one short-lived thread per connection (at most
`max_clients` at once). Nothing here touches Qt objects, so the desktop app can run it as is.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import decimal
import json
import logging
import math
import os
import re
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import duckdb

from console import __version__
from console.store.query import to_jsonable

if TYPE_CHECKING:
    from console.respond.audit import AuditChain

log = logging.getLogger("gpusoc.console.control")

SOCKET_SUFFIX: Final = ".ctl"
# What `audit_append` accepts from other processes (what `gpusoc-console command` records).
REMOTE_AUDIT_PREFIXES: Final = ("command.",)
REMOTE_AUDIT_ACTIONS: Final = frozenset({"rollback.decision"})
RESERVED_AUDIT_ACTORS: Final = frozenset({"console", "collector"})
PROTOCOL: Final = 1
MAX_REQUEST_BYTES: Final = 1 << 20
DEFAULT_QUERY_TIMEOUT_S: Final = 300.0
DEFAULT_EXPORT_TIMEOUT_S: Final = 600.0
DEFAULT_MAX_ROWS: Final = 100_000  # the result is built in the console's memory
DEFAULT_MAX_CLIENTS: Final = 4

# Read-only PRAGMAs (the others change settings of the console's connection).
READ_PRAGMAS: Final = frozenset({
    "collations", "database_list", "database_size", "functions", "metadata_info", "platform", "show",
    "show_databases", "show_tables", "show_tables_expanded", "storage_info", "table_info", "user_agent",
    "version",
})
ALLOWED_STATEMENTS: Final = "SELECT, WITH ... SELECT, EXPLAIN, DESCRIBE, SHOW, SUMMARIZE, read-only PRAGMA"

_EXPLAIN_PREFIX: Final = re.compile(r"^\s*EXPLAIN\s+(?:ANALYZE\s+)?(?:\([^)]*\)\s*)?(?:ANALYZE\s+)?", re.IGNORECASE)
_PRAGMA_NAME: Final = re.compile(r"^\s*PRAGMA\s+([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE)
_DECIMAL_TYPE: Final = re.compile(r"^DECIMAL\(\d+,\s*\d+\)$")
_FLOAT_TYPES: Final = frozenset({"DOUBLE", "FLOAT", "REAL"})
_NON_FINITE: Final = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_LOCK_PID: Final = re.compile(r"Conflicting lock is held in (.*?) \(PID (\d+)\)")
_UCRED: Final = struct.Struct("3i")
_SUN_PATH_MAX: Final = 100  # sockaddr_un.sun_path is 108 bytes on Linux, NUL included


class ControlError(RuntimeError):
    """A request failed; the message is for the operator (a SQL error, a refused statement...)."""

    def __init__(self, message: str, *, refused: bool = False, pid: int | None = None) -> None:
        super().__init__(message)
        self.refused = refused
        self.pid = pid  # the console that answered, when one did


class ControlUnavailable(ControlError):
    """No console answers on the socket (missing, stale, refused, or not a gpusoc control socket)."""


class StoreCalls(Protocol):
    """What the server needs from StoreWriter."""

    db_path: Path

    @property
    def status(self) -> str: ...

    def run_on_writer(self, fn: Callable[[duckdb.DuckDBPyConnection], Any], timeout: float | None = ...) -> Any: ...

    def read_query(self, sql: str, params: list[object] | None = None) -> list[tuple[Any, ...]]: ...

    def export(self, out_path: str | Path, timeout: float | None = ...) -> dict[str, Any]: ...


def socket_path(db_path: str | Path) -> Path:
    """`<db>.ctl` next to the store (absolute, so the console and the CLI agree whatever their cwd)."""
    db = Path(db_path).expanduser().resolve()
    return db.with_name(db.name + SOCKET_SUFFIX)


@contextlib.contextmanager
def _sun_path(path: Path) -> Iterator[str]:
    """An address for bind/connect: the path itself, or via /proc/self/fd when it is too long."""
    text = str(path)
    if len(os.fsencode(text)) < _SUN_PATH_MAX:
        yield text
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- statements


_STATEFUL_FUNCTION: Final = re.compile(
    r"\b(checkpoint|force_checkpoint|enable_logging|disable_logging|truncate_duckdb_logs|enable_profiling|"
    r"disable_profiling|enable_checkpoint_on_shutdown|enable_object_cache)\s*\(",
    re.IGNORECASE,
)


def check_read_only(sql: str, con: duckdb.DuckDBPyConnection | None = None) -> None:
    """Raise ControlError(refused=True) unless `sql` is exactly one read statement."""
    own = con is None
    parser = duckdb.connect(":memory:") if con is None else con
    try:
        try:
            statements = parser.extract_statements(sql)
        except duckdb.Error as exc:
            raise ControlError(str(exc)) from exc
        if len(statements) != 1:
            raise ControlError(
                f"refused: one statement per query, got {len(statements)}; run them one at a time", refused=True
            )
        _check_statement(parser, statements[0], 0)
    finally:
        if own:
            parser.close()


def _check_statement(parser: duckdb.DuckDBPyConnection, st: Any, depth: int) -> None:
    kind = str(st.type).rsplit(".", 1)[-1]
    if kind == "SELECT":  # also WITH, DESCRIBE, SHOW, SUMMARIZE, FROM, VALUES
        m = _STATEFUL_FUNCTION.search(st.query)
        if m:  # table functions that act on the database or its settings, even inside a SELECT
            raise ControlError(f"refused: {m.group(1)}() changes the database or its settings; "
                               "the store is read-only from here", refused=True)
        return
    if kind == "PRAGMA":
        m = _PRAGMA_NAME.match(st.query)
        if m and m.group(1).lower() in READ_PRAGMAS:
            return
        name = m.group(1) if m else "?"
        raise ControlError(
            f"refused: PRAGMA {name} is not a read-only PRAGMA; allowed over the control socket: "
            f"{ALLOWED_STATEMENTS} (PRAGMA {', '.join(sorted(READ_PRAGMAS))})",
            refused=True,
        )
    if kind == "EXPLAIN" and depth == 0:
        inner = _EXPLAIN_PREFIX.sub("", st.query, count=1)
        try:
            inner_statements = parser.extract_statements(inner)
        except duckdb.Error:
            inner_statements = []
        if len(inner_statements) == 1:
            _check_statement(parser, inner_statements[0], depth + 1)
            return
    raise ControlError(
        f"refused: {kind} statement; the store is read-only from here (allowed: {ALLOWED_STATEMENTS}). "
        "A running console's store is changed only by the console itself.",
        refused=True,
    )


# --------------------------------------------------------------------------- values


def encode_value(value: Any) -> Any:
    """One result cell as JSON-safe data (see the module docstring)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return to_jsonable(value)


def decode_rows(types: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """Undo `encode_value` where printing differs (decimals, intervals, non-finite floats)."""
    decoders: list[Callable[[Any], Any] | None] = []
    for t in types:
        if _DECIMAL_TYPE.match(t):
            decoders.append(lambda v: decimal.Decimal(v) if isinstance(v, str) else v)
        elif t == "INTERVAL":
            decoders.append(lambda v: dt.timedelta(seconds=v) if isinstance(v, int | float) else v)
        elif t in _FLOAT_TYPES:
            decoders.append(lambda v: _NON_FINITE.get(v, v) if isinstance(v, str) else v)
        else:
            decoders.append(None)
    if not any(decoders):
        return [tuple(r) for r in rows]
    return [tuple(v if v is None or f is None else f(v) for f, v in zip(decoders, r, strict=True)) for r in rows]


# --------------------------------------------------------------------------- alerts


def alerts_from_query(
    query: Callable[[str, list[object]], list[tuple[Any, ...]]], state: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """The stored alerts as `Alert.to_dict()` dicts, newest detection first (what `alerts` prints)."""
    from console.detect.alerts import query_alerts

    return [a.to_dict() for a in query_alerts(query, state, limit)]


# --------------------------------------------------------------------------- audit head


def audit_head_of(db_path: str | Path) -> dict[str, Any]:
    """The audit-log head of a store or export file (opened read-only), in `audit verify`'s form.

    `audit_head` is "SEQ:HASH" of the last audit_log row (what `--expect-head` takes); the
    `audit_signed_*` keys describe the newest row of audit_heads, and `audit_unsigned_rows` counts
    rows after it. Values are None when the file has no audit trail.
    """
    out: dict[str, Any] = {
        "audit_head": None, "audit_rows": 0, "audit_signed_head": None, "audit_key_id": None,
        "audit_signed_at": None, "audit_unsigned_rows": None,
    }
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        con.execute("SET TimeZone = 'UTC'")
        tables = {r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' "
            "AND table_name IN ('audit_log', 'audit_heads')").fetchall()}
        if "audit_log" not in tables:
            return out
        rows = con.execute("SELECT seq, hash, (SELECT count(*) FROM audit_log) FROM audit_log "
                           "ORDER BY seq DESC LIMIT 1").fetchall()
        if rows:
            seq, digest, n = rows[0]
            out.update(audit_head=f"{int(seq)}:{bytes(digest).hex()}", audit_rows=int(n))
        if "audit_heads" in tables:
            heads = con.execute("SELECT seq, hash, signed_at, key_id FROM audit_heads "
                                "ORDER BY seq DESC, signed_at DESC LIMIT 1").fetchall()
            if heads:
                hseq, hdigest, signed_at, key_id = heads[0]
                out.update(audit_signed_head=f"{int(hseq)}:{bytes(hdigest).hex()}", audit_key_id=key_id,
                           audit_signed_at=to_jsonable(signed_at))
                if rows:
                    out["audit_unsigned_rows"] = max(0, int(rows[0][0]) - int(hseq))
    finally:
        con.close()
    return out


def audit_head_note(head: dict[str, Any]) -> str:
    """One line for stderr: the head an auditor records and passes to `audit verify --expect-head`."""
    if not head.get("audit_head"):
        return "audit_head: none (the store has no audit trail yet)"
    text = f"audit_head {head['audit_head']}"
    signed = head.get("audit_signed_head")
    if not signed:
        return text + " (no signed head in the store; verify needs --allow-unsigned-tail). Record it for auditors."
    text += f" (signed head {signed}, key {str(head.get('audit_key_id') or '?')[:16]}"
    if head.get("audit_unsigned_rows"):
        text += f"; {head['audit_unsigned_rows']} row(s) after it are not signed yet"
    return text + "). Record it for auditors: `gpusoc-console audit verify FILE --trust KEY --expect-head SEQ:HASH`."


# --------------------------------------------------------------------------- lock holder


def lock_holder(error_text: str) -> tuple[int | None, str]:
    """(pid, description) of the process DuckDB names in a lock error ('?' when unknown)."""
    m = _LOCK_PID.search(error_text)
    if not m:
        return None, "another process"
    exe, pid = m.group(1), int(m.group(2))
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        cmd = " ".join(p.decode(errors="replace") for p in raw.split(b"\0") if p)
    except OSError:
        cmd = exe
    if len(cmd) > 160:
        cmd = cmd[:157] + "..."
    return pid, f"pid {pid}: {cmd or exe}"


# --------------------------------------------------------------------------- client


def _check_server_owner(sock: socket.socket, path: Path) -> None:
    """Only a console of this user (or root) may answer: a socket planted by another user in a
    shared folder could otherwise return fake rows or a fake audit head."""
    if not hasattr(socket, "SO_PEERCRED"):
        return
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid not in (os.getuid(), 0):
        raise ControlUnavailable(f"control socket {path} is served by another user (uid {uid}); not asking it")


def request(path: str | Path, payload: dict[str, Any], timeout: float = 60.0) -> tuple[Any, int | None]:
    """Send one request; returns (result, server pid). ControlUnavailable when nobody answers."""
    p = Path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(10.0)
        try:
            with _sun_path(p) as addr:
                sock.connect(addr)
        except FileNotFoundError as exc:
            raise ControlUnavailable(f"no control socket {p}") from exc
        except ConnectionRefusedError as exc:
            raise ControlUnavailable(f"control socket {p} is stale (nothing listens on it)") from exc
        except OSError as exc:
            raise ControlUnavailable(f"cannot connect to {p}: {exc.strerror or exc}") from exc
        _check_server_owner(sock, p)
        sock.settimeout(timeout)
        try:
            sock.sendall(json.dumps(payload).encode() + b"\n", getattr(socket, "MSG_NOSIGNAL", 0))
            chunks = []
            while True:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        except TimeoutError as exc:
            raise ControlError(f"no answer from the console on {p} within {timeout:g} s") from exc
        except OSError as exc:
            raise ControlUnavailable(f"lost the connection to {p}: {exc.strerror or exc}") from exc
    finally:
        sock.close()
    try:
        resp = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise ControlUnavailable(f"{p} did not answer like a gpusoc console") from exc
    if not isinstance(resp, dict):
        raise ControlUnavailable(f"{p} did not answer like a gpusoc console")
    pid = resp.get("pid") if isinstance(resp.get("pid"), int) else None
    if not resp.get("ok"):
        raise ControlError(str(resp.get("error") or "request failed"), refused=bool(resp.get("refused")), pid=pid)
    return resp.get("result"), pid


# --------------------------------------------------------------------------- server


class ControlServer:
    """Listens on `<db>.ctl` for the process that owns `writer`; start() after the writer, stop() before it."""

    def __init__(
        self,
        writer: StoreCalls,
        path: str | Path | None = None,
        *,
        audit: AuditChain | None = None,
        query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S,
        export_timeout_s: float = DEFAULT_EXPORT_TIMEOUT_S,
        max_rows: int = DEFAULT_MAX_ROWS,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        self.writer = writer
        self.audit = audit  # AuditChain with a signing key: exports are audited and signed
        self.path = Path(path) if path is not None else socket_path(writer.db_path)
        self.query_timeout_s = float(query_timeout_s)
        self.export_timeout_s = float(export_timeout_s)
        self.max_rows = int(max_rows)
        self._slots = threading.BoundedSemaphore(max_clients)
        self._stopping = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._ident: tuple[int, int] | None = None
        self._root: duckdb.DuckDBPyConnection | None = None
        self._root_lock = threading.Lock()
        self._busy = 0  # connections being served
        self._idle = threading.Condition()
        self._running: set[duckdb.DuckDBPyConnection] = set()  # cursors with a query running
        self.requests = 0

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> ControlServer:
        """Bind (replacing a stale socket left by a crashed console) and start the accept thread.

        Raises ControlError when the path is taken by something that is not a stale socket.
        """
        if self._thread is not None:
            raise RuntimeError("ControlServer already started")
        path = self.path
        if path.is_symlink() or path.exists():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ControlError(f"{path} exists and is not a socket; not replacing it")
            if _answers(path):
                raise ControlError(f"another process already answers on {path}")
            log.warning("replacing stale control socket %s (left by a console that did not exit cleanly)", path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _sun_path(tmp) as addr:
                sock.bind(addr)
            os.chmod(tmp, 0o600)  # before listen(): nobody else can connect in between
            sock.listen(16)
            os.replace(tmp, path)
            st = path.stat()
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._ident = (st.st_dev, st.st_ino)
        sock.settimeout(0.5)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="gpusoc-control", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, interrupt running queries, wait up to `timeout` for requests in flight,
        remove the socket file (if it is still ours) and drop the reader cursor."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._ident is not None:
            try:
                st = self.path.stat()
                if (st.st_dev, st.st_ino) == self._ident:  # not a newer console's socket
                    self.path.unlink()
            except OSError:
                pass
            self._ident = None
        with self._idle:
            for cur in list(self._running):
                with contextlib.suppress(duckdb.Error):
                    cur.interrupt()
            if not self._idle.wait_for(lambda: self._busy == 0, timeout):
                log.warning("control socket stopped with %d request(s) still running", self._busy)
        with self._root_lock:
            if self._root is not None:
                with contextlib.suppress(duckdb.Error):
                    self._root.close()
                self._root = None

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- connections

    def _accept_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                log.warning("control socket accept failed: %s", exc)
                self._stopping.wait(0.2)
                continue
            if not self._slots.acquire(blocking=False):
                with conn:
                    conn.settimeout(2.0)
                    with contextlib.suppress(OSError):
                        conn.sendall(self._encode(self._error("the console is busy with other requests; retry")))
                continue
            with self._idle:
                self._busy += 1
            threading.Thread(target=self._serve, args=(conn,), name="gpusoc-control-client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(10.0)
                resp, peer = self._check_peer(conn)
                if resp is None:
                    try:
                        req = json.loads(_read_line(conn))
                    except (ValueError, OSError) as exc:
                        resp = self._error(f"bad request: {exc}")
                    else:
                        resp = self.handle(req, peer=peer)
                conn.settimeout(120.0)
                conn.sendall(self._encode(resp))
        except OSError as exc:
            log.debug("control client went away: %s", exc)
        except Exception:
            log.exception("control request failed")
        finally:
            self._slots.release()
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    @staticmethod
    def _check_peer(conn: socket.socket) -> tuple[dict[str, Any] | None, str]:
        """(an error response or None, "user (pid N)" of the client for the audit trail)."""
        try:
            pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except (OSError, AttributeError, struct.error):
            return None, "control socket client"  # not Linux: the socket's 0600 mode is the check
        if uid not in (os.getuid(), 0):
            return ControlServer._error(f"uid {uid} may not use this console's control socket"), ""
        try:
            import pwd

            user = pwd.getpwuid(uid).pw_name
        except (ImportError, KeyError):
            user = f"uid {uid}"
        return None, f"{user} (pid {pid}, control socket)"

    @staticmethod
    def _encode(resp: dict[str, Any]) -> bytes:
        return json.dumps(resp, ensure_ascii=False, default=str).encode() + b"\n"

    @staticmethod
    def _error(message: str, refused: bool = False) -> dict[str, Any]:
        return {"ok": False, "pid": os.getpid(), "error": message, "refused": refused}

    # ---------------------------------------------------------------- requests

    def handle(self, req: Any, peer: str = "control socket client") -> dict[str, Any]:
        """Answer one decoded request (also callable directly, e.g. from tests)."""
        self.requests += 1
        if not isinstance(req, dict):
            return self._error("bad request: expected a JSON object")
        op = req.get("op")
        try:
            if op == "ping":
                result: Any = {"db": str(self.writer.db_path), "protocol": PROTOCOL, "version": __version__,
                               "writer_status": self.writer.status, "audit_chain": self.audit is not None}
            elif op == "query":
                sql = req.get("sql")
                params = req.get("params", [])
                if not isinstance(sql, str):
                    return self._error("bad request: query needs 'sql'")
                if not isinstance(params, list) or not all(
                        v is None or isinstance(v, str | int | float | bool) for v in params):
                    return self._error("bad request: 'params' must be a list of JSON scalars")
                result = self.query(sql, max_rows=_int_or(req.get("max_rows"), self.max_rows), params=params)
            elif op == "audit_append":
                result = self.audit_append(req.get("records"), peer)
            elif op == "audit_sign_head":
                result = self.audit_sign_head(peer)
            elif op == "export":
                out = req.get("out")
                if not isinstance(out, str) or not os.path.isabs(out):
                    return self._error("bad request: export needs an absolute 'out' path")
                log.info("control socket: export to %s for %s", out, peer)
                result = to_jsonable(self.export(out, actor=peer))
            elif op == "alerts":
                state = req.get("state")
                result = alerts_from_query(
                    self.writer.read_query, state=state if isinstance(state, str) else None,
                    limit=_int_or(req.get("limit"), None),
                )
            else:
                return self._error(
                    f"bad request: unknown op {op!r} (ping, query, export, alerts, audit_append, audit_sign_head)")
        except ControlError as exc:
            return self._error(str(exc), refused=exc.refused)
        except Exception as exc:
            log.debug("control %s failed", op, exc_info=True)
            return self._error(str(exc).strip() or type(exc).__name__)
        return {"ok": True, "pid": os.getpid(), "result": result}

    def export(self, out: str, actor: str) -> dict[str, Any]:
        """Export the live store to `out` (absolute); audited and signed when the chain can sign."""
        audit = self.audit
        try:
            if audit is not None and audit.key_id:
                source = str(Path(self.writer.db_path).resolve())
                # Submitted as one writer call with our own timeout: on the writer thread the
                # chain's run_on_writer runs inline (its default 30 s wait would be too short).
                summary: dict[str, Any] = self.writer.run_on_writer(
                    lambda _con: audit.export_signed(out, actor=actor, source_path=source),
                    timeout=self.export_timeout_s,
                )
                return summary
            return self.writer.export(out, timeout=self.export_timeout_s)
        except (TimeoutError, concurrent.futures.TimeoutError) as exc:
            raise ControlError(
                f"the export to {out} was still running after {self.export_timeout_s:g} s; it goes on in the "
                "console and the file appears when it is complete"
            ) from exc

    def audit_append(self, records: Any, peer: str) -> list[dict[str, Any]]:
        """Append rows for another process (`gpusoc-console command --db` while this console runs).

        Rows go through this process's AuditChain, the only writer of the chain, in one
        transaction; the answer carries each row's seq and hash once committed.
        """
        audit = self._chain()
        if not isinstance(records, list) or not records or not all(
                isinstance(r, list) and len(r) == 4 and isinstance(r[0], str) and isinstance(r[1], str)
                and (r[2] is None or isinstance(r[2], str)) for r in records):
            raise ControlError("bad request: 'records' must be a non-empty list of [actor, action, target, payload]")
        for actor, action, _target, _payload in records:
            if not (action.startswith(REMOTE_AUDIT_PREFIXES) or action in REMOTE_AUDIT_ACTIONS):
                raise ControlError(f"refused: {action!r} is not an action other processes may record here "
                                   "(command.* and rollback.decision only)", refused=True)
            if actor in RESERVED_AUDIT_ACTORS:
                raise ControlError(f"refused: actor {actor!r} is this console's own name", refused=True)
        # The rows keep their payloads (and so their hashes) exactly; a last row says who sent them.
        recs = [(r[0], r[1], r[2], r[3]) for r in records]
        recs.append((peer, "control.audit_append", None, {"rows": len(records)}))
        entries = audit.append_many(recs)[:-1]
        log.info("control socket: %d audit row(s) appended for %s (last seq %d)",
                 len(entries), peer, entries[-1].seq)
        return [{"seq": e.seq, "hash": e.hash.hex()} for e in entries]

    def audit_sign_head(self, peer: str) -> dict[str, Any]:
        """Sign the chain's head now (a CLI command ends with a signed head, as offline)."""
        head = self._chain().sign_head()
        log.info("control socket: audit head signed for %s", peer)
        return {"seq": head.seq if head is not None else 0}

    def _chain(self) -> AuditChain:
        if self.audit is None:
            raise ControlError("this console keeps no audit chain, so it cannot record for other processes",
                               refused=True)
        return self.audit

    def query(self, sql: str, max_rows: int | None = None, params: Sequence[Any] = ()) -> dict[str, Any]:
        """Run one read statement on a reader cursor; {"columns", "types", "rows", "truncated"}."""
        limit = self.max_rows if max_rows is None else max(1, min(int(max_rows), self.max_rows))
        for attempt in (0, 1):
            cur = self._reader_cursor(fresh=attempt == 1)
            try:
                check_read_only(sql, cur)
                return self._run_read(cur, sql, limit, list(params))
            except duckdb.ConnectionException:
                if attempt == 1:
                    raise
            finally:
                with contextlib.suppress(duckdb.Error):
                    cur.close()
        raise AssertionError("unreachable")

    def _reader_cursor(self, fresh: bool) -> duckdb.DuckDBPyConnection:
        """A new cursor on the writer's database; its parent is made once, on the writer thread."""
        with self._root_lock:
            if self._root is None or fresh:
                self._root = self.writer.run_on_writer(lambda con: con.cursor(), timeout=60.0)
            assert self._root is not None
            try:
                cur = self._root.cursor()
            except duckdb.Error:  # the writer reconnected since: its old cursors are closed
                self._root = self.writer.run_on_writer(lambda con: con.cursor(), timeout=60.0)
                assert self._root is not None
                cur = self._root.cursor()
        cur.execute("SET TimeZone = 'UTC'")
        return cur

    def _run_read(self, cur: duckdb.DuckDBPyConnection, sql: str, limit: int,
                  params: list[Any] | None = None) -> dict[str, Any]:
        if self._stopping.is_set():
            raise ControlError("the console is shutting down")
        cur.execute("BEGIN TRANSACTION READ ONLY")  # a second guard: nothing it runs can write
        timer = threading.Timer(self.query_timeout_s, cur.interrupt)
        timer.daemon = True
        timer.start()
        with self._idle:
            self._running.add(cur)
        reading = getattr(self.writer, "reading", None)  # a cache trim waits while this runs
        try:
            with reading() if reading is not None else contextlib.nullcontext():
                cur.execute(sql, params or None)
                desc = cur.description
                rows = cur.fetchmany(limit + 1) if desc else []
        except duckdb.InterruptException as exc:
            if self._stopping.is_set():
                raise ControlError("query interrupted: the console is shutting down") from exc
            raise ControlError(
                f"query interrupted after {self.query_timeout_s:g} s (the console's limit); "
                "export the store and query the copy for long analyses"
            ) from exc
        except duckdb.TransactionException as exc:
            if "read-only" in str(exc):
                raise ControlError(f"refused: the statement tries to write: {exc}", refused=True) from exc
            raise ControlError(str(exc)) from exc
        except duckdb.Error as exc:
            raise ControlError(str(exc)) from exc
        finally:
            timer.cancel()
            with self._idle:
                self._running.discard(cur)
            with contextlib.suppress(duckdb.Error):
                cur.execute("ROLLBACK")
        if not desc:
            return {"columns": [], "types": [], "rows": [], "truncated": False}
        truncated = len(rows) > limit
        return {
            "columns": [str(d[0]) for d in desc],
            "types": [str(d[1]) for d in desc],
            "rows": [[encode_value(v) for v in r] for r in rows[:limit]],
            "truncated": truncated,
        }


def _int_or(value: Any, default: int | None) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _read_line(conn: socket.socket) -> bytes:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST_BYTES:
            raise ValueError(f"request larger than {MAX_REQUEST_BYTES} bytes")
    return bytes(buf).split(b"\n", 1)[0]


def _answers(path: Path) -> bool:
    """True when something accepts connections on the socket at `path`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(1.0)
        with _sun_path(path) as addr:
            sock.connect(addr)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def start_control_server(writer: StoreCalls, **kwargs: Any) -> ControlServer | None:
    """Start a ControlServer for `writer`, or log why not and return None (the console runs on)."""
    try:
        server = ControlServer(writer, **kwargs).start()
    except (ControlError, OSError) as exc:
        log.warning("no control socket (query/export/alerts from other processes will not work): %s", exc)
        return None
    log.info("control socket %s: `gpusoc-console query/export/alerts --db %s` work while this runs",
             server.path, writer.db_path)
    return server
