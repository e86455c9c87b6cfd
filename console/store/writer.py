"""The console's single DuckDB writer thread: batched, idempotent, pausing on disk faults.

Ingest code calls `submit_*` from any thread; they only append to an in-memory queue. The writer
thread takes everything queued every `flush_interval_s`, builds ONE Arrow table per target table
and inserts each with a single `INSERT ... SELECT` inside one transaction (never row-at-a-time:
see docs/benchmarks.md). The `frames` ledger (PRIMARY KEY host, epoch, seq) makes delivery
idempotent: a frame seen before, in an earlier flush or twice in the same batch, adds no rows.

Backpressure contract (for the ingest side):
  * `submit_*` never blocks and never drops; it raises only for a malformed frame or after stop().
  * `accepting` turns False while the store is paused (disk full, I/O error) or more than
    `max_queue_frames` frames wait. Ingest must then stop reading from agents (stop granting
    credit / stop pulling the stream) - the agents keep the data in their own buffers - and
    resume when `accepting` is True again (`wait_accepting()` blocks for that).
  * Tell an agent to drop data only up to `last_committed(host)` (in the DB's WAL) or, safer,
    `last_checkpointed(host)` (in the main file after CHECKPOINT; see reliability notes 6.2).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as dt
import json
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Final, TypeVar

import duckdb
import numpy as np
import pyarrow as pa

from console.store.export import EXPORT_STORAGE_VERSION, export_from_connection
from console.store.query import StoreLockedError, locked_message
from console.store.schema import GPU_STATE_VALUES, ROLLUP_SUFFIXES, ensure_schema
from protos.types import METRIC_NAMES, METRIC_SCHEMA, N_METRICS, SEVERITY_NAMES, Description, Frame, Gap

log = logging.getLogger(__name__)

T = TypeVar("T")

# (host, epoch, highest seq committed in this flush, committed_at in unix ns)
CommitInfo = tuple[str, str, int, int]

ROLLUP_BUCKET_S: Final = 60
DEFAULT_MEMORY_LIMIT: Final = "256MB"  # DuckDB buffer pool of the console's store
# What the block cache is trimmed back to after each maintenance checkpoint (docs/soak.md):
# DuckDB keeps every block it writes cached until the pool is full, so without a trim a
# console's RSS climbs ~1 MB/min at 32 hosts until it reaches memory_limit.
DEFAULT_CACHE_LIMIT: Final = "8MB"
_SIZE_RE: Final = re.compile(r"\d+(\.\d+)?\s*(B|[KMGT]i?B)", re.IGNORECASE)
_TS: Final = pa.timestamp("us", tz="UTC")
_MAX_SEQ: Final = 2**63 - 1

STATUS_NEW: Final = "new"
STATUS_RUNNING: Final = "running"
STATUS_STOPPED: Final = "stopped"
PAUSED_PREFIX: Final = "paused: "

# Errors caused by the content of a batch: retrying cannot help, so the batch is split to find
# and reject the offending item. Everything else (I/O, disk full, commit failure, OOM, fatal
# invalidation, bugs) pauses the writer and is retried with the batch intact.
_DATA_ERRORS: Final = (
    duckdb.IntegrityError,
    duckdb.DataError,
    duckdb.InvalidInputException,
    pa.ArrowInvalid,
    pa.ArrowTypeError,
    ValueError,
    TypeError,
    OverflowError,
)


@dataclass(slots=True)
class _FrameItem:
    frame: Frame
    values: np.ndarray  # float32 [n_gpus, N_METRICS]
    received_at_ns: int
    address: str


@dataclass(slots=True)
class _GapItem:
    host: str
    gap: Gap
    detected_at_ns: int


@dataclass(slots=True)
class _DescItem:
    address: str
    desc: Description
    received_at_ns: int


_Item = _FrameItem | _GapItem | _DescItem


@dataclass(slots=True)
class _Resume:
    epoch: str
    seq: int
    ts_ns: int


@dataclass(slots=True)
class _HostPlan:
    rows: list[list[Any]] = field(default_factory=list)  # hosts columns in table order, ts in ns
    touch: dict[str, int] = field(default_factory=dict)  # host -> last_seen to UPDATE now
    pending: dict[str, int] = field(default_factory=dict)  # host -> last_seen held back


class _DuplicateInFastPath(Exception):
    """The optimistic ledger insert hit a key that exists: redo the batch on the careful path."""


def _us(ns: int) -> int:
    return ns // 1000


def _utc(ns: int) -> dt.datetime:
    """An aware UTC datetime, so DuckDB binds it as TIMESTAMPTZ whatever the session zone is."""
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=ns // 1000)


def _ts_array(ns: Iterable[int] | np.ndarray) -> pa.Array:
    arr = np.asarray(ns if isinstance(ns, np.ndarray) else list(ns), dtype=np.int64) // 1000
    return pa.array(arr, type=_TS)


def _nullable_f64(values: list[float]) -> pa.Array:
    arr = np.asarray(values, dtype=np.float64)
    return pa.array(arr, mask=np.isnan(arr))


def _json(obj: dict[str, str]) -> str:
    if not obj:  # most records carry none; skip the encoder (a third of a flush's CPU otherwise)
        return "{}"
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _is_data_error(exc: BaseException) -> bool:
    return isinstance(exc, _DATA_ERRORS) and not isinstance(exc, duckdb.OperationalError)


def _percentile(values: Iterable[float], q: float) -> float | None:
    arr = np.fromiter(values, dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else None


class StoreWriter:
    """Owns the DuckDB connection of the console and is the only code that writes to it.

    Everything touching the connection runs on the writer thread; other threads talk to it
    through `submit_*`, `flush`, `export`, `run_maintenance` and the read-only accessors.
    """

    def __init__(
        self,
        db_path: str | Path,
        flush_interval_s: float = 0.25,
        max_batch_frames: int = 20000,
        *,
        max_queue_frames: int | None = None,
        raw_retention_s: float | None = None,
        rollup_interval_s: float = 60.0,
        retry_interval_s: float = 2.0,
        hosts_refresh_s: float = 5.0,
        on_commit: Callable[[list[CommitInfo]], None] | None = None,
        on_status: Callable[[str], None] | None = None,
        fault_hook: Callable[[str], None] | None = None,
        threads: int | None = None,
        memory_limit: str | None = DEFAULT_MEMORY_LIMIT,
        cache_limit: str | None = DEFAULT_CACHE_LIMIT,
        trim_retry_s: float = 5.0,
    ) -> None:
        self.db_path = Path(db_path)
        # A trim skipped (a read was running, or DuckDB could not evict enough) is tried again this
        # soon rather than at the next maintenance: under load, reads can cover every maintenance
        # for minutes while the cache grows (seen in a soak beside a CI run).
        self.trim_retry_s = float(trim_retry_s)
        self._trim_retry_at: float | None = None
        self.memory_limit = memory_limit
        self.cache_limit = cache_limit if memory_limit else None
        for what, size in (("memory_limit", memory_limit), ("cache_limit", self.cache_limit)):
            if size is not None and not _SIZE_RE.fullmatch(size):
                raise ValueError(f"{what} {size!r} is not a size like '256MB' or '1GiB'")
        self.flush_interval_s = float(flush_interval_s)
        self.max_batch_frames = int(max_batch_frames)
        self.max_queue_frames = int(max_queue_frames if max_queue_frames is not None else 2 * max_batch_frames)
        self.raw_retention_s = raw_retention_s
        self.rollup_interval_s = float(rollup_interval_s)
        self.retry_interval_s = float(retry_interval_s)
        self.hosts_refresh_s = float(hosts_refresh_s)
        self.on_commit = on_commit
        self.on_status = on_status
        # Test hook: called with a stage name ("begin", "insert", "commit", "maintenance",
        # "export", "reconnect"); raising from it simulates a fault at that point.
        self.fault_hook = fault_hook
        self._threads = threads

        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._queued_frames = 0
        self._submitted = 0
        self._done = 0
        self._flush_requested = False
        self._stopping = False
        self._requests: deque[tuple[Callable[[duckdb.DuckDBPyConnection], Any], Future[Any]]] = deque()
        self._accepting_event = threading.Event()

        self._con: duckdb.DuckDBPyConnection | None = None
        self._thread: threading.Thread | None = None
        self._status = STATUS_NEW
        self._held: list[_Item] | None = None  # batch that failed to commit, retried as-is
        self._inflight = 0  # items of the batch being committed right now
        self._retry_at = 0.0
        self._last_flush_mono = 0.0
        self._next_maintenance = 0.0

        self._state_lock = threading.Lock()
        self._reader_lock = threading.Lock()
        self._reader_lock_cond = threading.Condition(self._reader_lock)
        self._readers_active = 0  # read_query calls running now (a cache trim waits for none)
        self._trimming = False
        self._limit_restore_pending = False  # writer thread only
        self._reader_local = threading.local()
        self._reader_generation = 0
        self._resume: dict[str, _Resume] = {}
        self._checkpointed: dict[str, tuple[str, int]] = {}
        self._epoch_max: dict[tuple[str, str], int] = {}  # writer thread only
        self._compacted: dict[tuple[str, str], int] = {}  # writer thread only
        # hosts rows as last written (first_seen, last_seen, (simulated, epoch, address, n_gpus))
        self._host_written: dict[str, tuple[int, int, tuple[Any, ...]]] = {}  # writer thread only
        self._host_pending: dict[str, int] = {}  # writer thread only
        self._last_commit_us = 0
        self._flush_ms: deque[float] = deque(maxlen=4096)
        self._counters: dict[str, int] = {
            "frames_committed": 0,
            "frames_duplicate": 0,
            "frames_expired": 0,
            "frames_rejected": 0,
            "gaps_committed": 0,
            "descriptions_committed": 0,
            "flushes": 0,
            "pauses": 0,
            "maintenance_runs": 0,
            "rows_rolled_up": 0,
            "raw_rows_deleted": 0,
            "ledger_rows_compacted": 0,
            "cache_trims": 0,
            "cache_trims_skipped": 0,
        }
        self._rows: dict[str, int] = {t: 0 for t in ("frames", "gpu_samples", "train_samples", "events", "gaps")}
        self._last_error: str | None = None
        self._last_checkpoint_ns: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open the file, create/check the schema, load resume points, start the thread.

        Done synchronously so a bad path or a newer schema fails here, in the caller.
        """
        if self._thread is not None:
            raise RuntimeError("StoreWriter already started")
        self._open()
        assert self._con is not None
        self._load_state(self._con)
        with contextlib.suppress(duckdb.Error):
            self._con.execute("CHECKPOINT")  # a replayed WAL is now in the main file
        with self._state_lock:
            self._checkpointed = {h: (r.epoch, r.seq) for h, r in self._resume.items()}
            self._last_checkpoint_ns = time.time_ns()
        self._next_maintenance = time.monotonic() + self.rollup_interval_s
        self._set_status(STATUS_RUNNING)
        self._thread = threading.Thread(target=self._run, name="gpusoc-store-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Commit what is queued (one retry if paused), checkpoint and close.

        Returns True when everything submitted was committed (or rejected as invalid); False
        means some data was not stored - the agents still hold it because it was never acked.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        elif self._con is not None:
            self._close()
        with self._cond:
            return self._done >= self._submitted

    def __enter__(self) -> StoreWriter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ submit (any thread)

    def submit_frame(self, frame: Frame, received_at_ns: int, address: str = "") -> None:
        """Queue one frame for the next flush. The writer keeps a reference: do not mutate it."""
        values = self._check_frame(frame)
        self._enqueue(_FrameItem(frame, values, int(received_at_ns), address), 1)

    def submit_gap(self, host: str, gap: Gap) -> None:
        """Queue a gap report; gaps are data (what the fleet could not deliver is evidence)."""
        if not host or not gap.epoch:
            raise ValueError("gap needs a host and an epoch")
        self._enqueue(_GapItem(host, gap, time.time_ns()), 0)

    def submit_description(self, address: str, desc: Description) -> None:
        """Queue an agent's self-description: upserts its `hosts` row and its `gpus` rows."""
        if not desc.host:
            raise ValueError("description without a host")
        self._enqueue(_DescItem(address, desc, time.time_ns()), 0)

    @staticmethod
    def _check_frame(frame: Frame) -> np.ndarray:
        if not frame.host or not frame.epoch:
            raise ValueError("frame needs a host and an epoch")
        if frame.metric_schema != METRIC_SCHEMA:
            raise ValueError(f"frame metric_schema {frame.metric_schema} != {METRIC_SCHEMA}")
        if not 0 <= frame.seq <= _MAX_SEQ:
            raise ValueError(f"frame seq out of range: {frame.seq}")
        values = np.asarray(frame.gpu_values, dtype=np.float32)
        if values.ndim != 2 or values.shape[1] != N_METRICS:
            raise ValueError(f"gpu_values must be [n_gpus, {N_METRICS}], got {values.shape}")
        n = values.shape[0]
        if len(frame.gpu_index) != n or len(frame.gpu_state) != n:
            raise ValueError("gpu_index/gpu_state length does not match gpu_values rows")
        return values

    def _enqueue(self, item: _Item, n_frames: int) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("StoreWriter is stopped")
            was_empty = not self._queue
            self._queue.append(item)
            self._queued_frames += n_frames
            self._submitted += 1
            if was_empty or self._queued_frames >= self.max_batch_frames:
                self._cond.notify_all()  # the writer may be asleep until the next maintenance
            self._update_accepting_locked()

    # ------------------------------------------------------------------ progress (any thread)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Block until everything submitted so far is committed; False on timeout or pause."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._submitted
            self._flush_requested = True
            self._cond.notify_all()
            while self._done < target:
                if self._thread is None or not self._thread.is_alive():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is None else min(remaining, 0.5))
            return True

    @property
    def status(self) -> str:
        """'new', 'running', 'paused: <reason>' or 'stopped'."""
        return self._status

    @property
    def paused(self) -> bool:
        return self._status.startswith(PAUSED_PREFIX)

    @property
    def accepting(self) -> bool:
        """False while paused or backlogged: ingest must stop reading from agents until True."""
        return self._accepting_event.is_set()

    def wait_accepting(self, timeout: float | None = None) -> bool:
        """Block until the writer accepts data again (for an ingest thread applying backpressure)."""
        return self._accepting_event.wait(timeout)

    def last_committed(self, host: str) -> tuple[str, int] | None:
        """The agent's resume point: (epoch, highest committed seq) of its newest epoch."""
        with self._state_lock:
            r = self._resume.get(host)
            return None if r is None else (r.epoch, r.seq)

    def last_checkpointed(self, host: str) -> tuple[str, int] | None:
        """Like last_committed, but only what a CHECKPOINT has moved into the main file."""
        with self._state_lock:
            return self._checkpointed.get(host)

    def resume_points(self) -> dict[str, tuple[str, int]]:
        """All hosts' resume points at once (for reconnecting a whole fleet)."""
        with self._state_lock:
            return {h: (r.epoch, r.seq) for h, r in self._resume.items()}

    @property
    def stats(self) -> dict[str, Any]:
        """Counters for dashboards and benchmarks; safe to read from any thread."""
        with self._state_lock:
            out: dict[str, Any] = dict(self._counters)
            out["rows"] = dict(self._rows)
            flush_ms = list(self._flush_ms)
            out["last_error"] = self._last_error
            out["last_checkpoint_ns"] = self._last_checkpoint_ns
        out["flush_ms_p50"] = _percentile(flush_ms, 50)
        out["flush_ms_p99"] = _percentile(flush_ms, 99)
        out["flush_ms_max"] = max(flush_ms) if flush_ms else None
        out["last_flush_ms"] = flush_ms[-1] if flush_ms else None
        with self._cond:
            out["queue_items"] = len(self._queue)
            out["queue_frames"] = self._queued_frames
            out["held_items"] = len(self._held) if self._held else 0
            out["inflight_items"] = self._inflight
        out["status"] = self._status
        out["accepting"] = self.accepting
        return out

    # ------------------------------------------------------------------ work on the writer thread

    def export(
        self, out_path: str | Path, timeout: float | None = 300.0, storage_version: str | None = EXPORT_STORAGE_VERSION
    ) -> dict[str, Any]:
        """Write a consistent audit copy of the live database (runs between two flushes).

        Same file as `export_db` produces; this is the way while the console holds the file.
        """
        return self._call(lambda con: self._export(con, out_path, storage_version), timeout)

    def run_maintenance(self, now: float | None = None, timeout: float | None = 300.0) -> dict[str, Any]:
        """Roll raw samples older than the retention window into gpu_samples_1m, then CHECKPOINT.

        `now` (unix seconds) lets tests move the clock. Runs on the writer thread.
        """
        return self._call(lambda con: self._maintain(con, time.time() if now is None else now), timeout)

    def run_on_writer(self, fn: Callable[[duckdb.DuckDBPyConnection], T], timeout: float | None = 30.0) -> T:
        """Run fn with the writer connection on the writer thread (audit appends, alert upserts)."""
        return self._call(fn, timeout)

    def submit_on_writer(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> Future[T]:
        """Queue fn for the writer thread without waiting (detection's alert upserts)."""
        fut: Future[T] = Future()
        with self._cond:
            if self._stopping or self._thread is None:
                fut.set_exception(RuntimeError("StoreWriter is not running"))
                return fut
            self._requests.append((fn, fut))
            self._cond.notify_all()
        return fut

    def read_query(self, sql: str, params: list[object] | None = None) -> list[tuple[Any, ...]]:
        """Read from the live store from any thread (UI workers, detection) without blocking the writer.

        Each thread gets its own cursor on the writer's database (DuckDB's in-process MVCC: readers
        see committed data and never wait for the writer's lock). Statements are not restricted;
        use it for SELECTs.
        """
        with self.reading():
            for attempt in (0, 1):
                cur = self._thread_cursor(fresh=attempt == 1)
                try:
                    return cur.execute(sql, params or []).fetchall()
                except (duckdb.ConnectionException, duckdb.InvalidInputException):
                    if attempt == 1:
                        raise
            raise AssertionError("unreachable")

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Mark a read in progress on any cursor of this store (read_query, the control socket).

        A cache trim lowers DuckDB's database-wide memory_limit for a moment; it is skipped while
        a read runs, and a read that starts during one waits for it to end.
        """
        with self._reader_lock:
            while self._trimming:
                self._reader_lock_cond.wait(1.0)
            self._readers_active += 1
        try:
            yield
        finally:
            with self._reader_lock:
                self._readers_active -= 1

    def _thread_cursor(self, fresh: bool = False) -> duckdb.DuckDBPyConnection:
        local = self._reader_local
        with self._reader_lock:
            if self._con is None:
                raise RuntimeError("StoreWriter is not running")
            if fresh or getattr(local, "generation", None) != self._reader_generation:
                local.cursor = self._con.cursor()
                local.cursor.execute("SET TimeZone = 'UTC'")
                local.generation = self._reader_generation
            return local.cursor  # type: ignore[no-any-return]

    def _call(self, fn: Callable[[duckdb.DuckDBPyConnection], T], timeout: float | None) -> T:
        if threading.current_thread() is self._thread:
            assert self._con is not None
            return fn(self._con)  # e.g. from an on_commit callback
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("StoreWriter is not running")
        fut: Future[T] = Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("StoreWriter is stopping")
            self._requests.append((fn, fut))
            self._cond.notify_all()
        return fut.result(timeout)

    def _export(
        self, con: duckdb.DuckDBPyConnection, out_path: str | Path, storage_version: str | None
    ) -> dict[str, Any]:
        self._fault("export")
        self._write_pending_hosts(con)
        return export_from_connection(
            con, out_path, source_path=str(self.db_path.resolve()), method="writer", storage_version=storage_version
        )

    # ------------------------------------------------------------------ internals

    def _fault(self, stage: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(stage)

    def _set_status(self, status: str) -> None:
        changed = status != self._status
        self._status = status
        with self._cond:
            self._update_accepting_locked()
        if changed and self.on_status is not None:
            try:
                self.on_status(status)
            except Exception:
                log.exception("on_status callback failed")

    def _update_accepting_locked(self) -> None:
        ok = (
            self._status in (STATUS_NEW, STATUS_RUNNING)
            and not self._stopping
            and self._queued_frames <= self.max_queue_frames
        )
        if ok:
            self._accepting_event.set()
        else:
            self._accepting_event.clear()

    def _open(self) -> None:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {}
        if self._threads:
            config["threads"] = self._threads
        if self.memory_limit:
            # DuckDB's default (80% of RAM) lets its block cache grow with the file: a console's
            # RSS would climb for as long as it runs. Bounded here; queries spill beyond it.
            config["memory_limit"] = self.memory_limit
        try:
            con = duckdb.connect(str(self.db_path), config=config)
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            text = str(exc).lower()
            if "lock" in text or "different configuration" in text:
                raise StoreLockedError(locked_message(self.db_path, exc)) from exc
            raise
        try:
            con.execute("SET TimeZone = 'UTC'")
            ensure_schema(con)
        except BaseException:
            con.close()
            raise
        self._con = con
        with self._reader_lock:
            self._reader_generation += 1

    def _close(self) -> None:
        if self._con is not None:
            with contextlib.suppress(duckdb.Error):
                self._con.close()
            self._con = None

    def _load_state(self, con: duckdb.DuckDBPyConnection) -> None:
        """Read resume points and ledger watermarks from the file (one scan of the ledger)."""
        per_epoch = con.execute(
            """
            WITH per AS (
                SELECT host, epoch, max(seq) AS seq, max(ts) AS ts FROM frames GROUP BY host, epoch
                UNION ALL
                SELECT host, epoch, max_seq, max_ts FROM frames_compacted
            )
            SELECT host, epoch, max(seq), epoch_us(max(ts)) FROM per GROUP BY host, epoch
            """
        ).fetchall()
        resume: dict[str, _Resume] = {}
        epoch_max: dict[tuple[str, str], int] = {}
        for host, epoch, seq, ts_us in per_epoch:
            epoch_max[(host, epoch)] = int(seq)
            cur = resume.get(host)
            if cur is None or int(ts_us) * 1000 >= cur.ts_ns:
                resume[host] = _Resume(epoch, int(seq), int(ts_us) * 1000)
        self._epoch_max = epoch_max
        self._compacted = {
            (h, e): int(s) for h, e, s in con.execute("SELECT host, epoch, max_seq FROM frames_compacted").fetchall()
        }
        got = con.execute("SELECT epoch_us(max(committed_at)) FROM frames").fetchone()
        self._last_commit_us = int(got[0]) if got and got[0] is not None else 0
        with self._state_lock:
            self._resume = resume

    def _run(self) -> None:
        try:
            while True:
                self._wait_for_work()
                self._run_requests()
                with self._cond:
                    stopping = self._stopping
                if self._held is not None and (stopping or time.monotonic() >= self._retry_at):
                    self._retry_held()
                if self._held is None:
                    self._drain(stopping)
                if self._held is None and not stopping and time.monotonic() >= self._next_maintenance:
                    self._periodic_maintenance()
                elif (self._held is None and not stopping and self._trim_retry_at is not None
                      and time.monotonic() >= self._trim_retry_at and self._con is not None):
                    self._trim_cache(self._con)
                if stopping:
                    with self._cond:
                        empty = not self._queue
                    if self._held is not None or empty:
                        self._run_requests()
                        break
        except BaseException:  # pragma: no cover - a bug; keep the reason visible
            log.exception("store writer thread crashed")
            with self._state_lock:
                self._last_error = "writer thread crashed (see log)"
            self._status = PAUSED_PREFIX + "writer thread crashed"
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._con is not None and self._held is None:
            with contextlib.suppress(duckdb.Error):
                self._write_pending_hosts(self._con)
                self._con.execute("CHECKPOINT")
                self._mark_checkpointed()
        self._close()
        self._status = STATUS_STOPPED
        with self._cond:
            self._update_accepting_locked()
            self._cond.notify_all()
            pending = list(self._requests)
            self._requests.clear()
        for _, fut in pending:
            fut.set_exception(RuntimeError("StoreWriter stopped"))
        if self.on_status is not None:
            with contextlib.suppress(Exception):
                self.on_status(STATUS_STOPPED)

    def _wait_for_work(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                if self._stopping or self._requests:
                    return
                if self._held is not None:
                    wake = self._retry_at
                else:
                    if self._queue and (
                        self._flush_requested or self._queued_frames >= self.max_batch_frames
                    ):
                        return
                    wake = self._next_maintenance
                    if self._trim_retry_at is not None:
                        wake = min(wake, self._trim_retry_at)
                    if self._queue:
                        wake = min(wake, self._last_flush_mono + self.flush_interval_s)
                if now >= wake:
                    return
                self._cond.wait(wake - now)

    def _run_requests(self) -> None:
        while True:
            with self._cond:
                if not self._requests:
                    return
                fn, fut = self._requests.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                if self._con is None:
                    self._reconnect()
                assert self._con is not None
                fut.set_result(fn(self._con))
            except BaseException as exc:
                if isinstance(exc, duckdb.FatalException):
                    self._close()
                fut.set_exception(exc)

    def _take_batch(self) -> list[_Item]:
        batch: list[_Item] = []
        frames = 0
        with self._cond:
            while self._queue and frames < self.max_batch_frames:
                item = self._queue.popleft()
                if isinstance(item, _FrameItem):
                    frames += 1
                batch.append(item)
            self._queued_frames -= frames
            if not self._queue:
                self._flush_requested = False
            self._update_accepting_locked()
        return batch

    def _drain(self, stopping: bool) -> None:
        """Flush one batch (or everything while stopping / backlogged)."""
        if self._limit_restore_pending and self._con is not None:
            self._restore_memory_limit(self._con)
        while True:
            batch = self._take_batch()
            self._last_flush_mono = time.monotonic()
            if not batch:
                return
            self._process(batch)
            if self._held is not None:
                return
            with self._cond:
                more = bool(self._queue) and (
                    stopping or self._flush_requested or self._queued_frames >= self.max_batch_frames
                )
            if not more:
                return

    def _retry_held(self) -> None:
        with self._cond:
            held, self._held = self._held, None
            assert held is not None
            self._inflight = len(held)
        if self._con is None:
            try:
                self._reconnect()
            except Exception as exc:
                self._pause(held, exc)
                return
        else:
            with contextlib.suppress(Exception):
                self._con.execute("ROLLBACK")  # in case a failed flush left a transaction open
        self._process(held)

    def _reconnect(self) -> None:
        self._close()
        self._fault("reconnect")
        self._open()
        assert self._con is not None
        self._load_state(self._con)

    def _pause(self, remaining: list[_Item], exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        with self._cond:
            self._held = remaining
            self._inflight = 0
        self._retry_at = time.monotonic() + self.retry_interval_s
        with self._state_lock:
            self._last_error = reason
            if not self.paused:
                self._counters["pauses"] += 1
        if isinstance(exc, duckdb.FatalException):
            self._close()  # the database instance is invalidated; reopen on retry
        log.warning("store writer paused (%d items held): %s", len(remaining), reason)
        self._set_status(PAUSED_PREFIX + reason)

    def _finish(self, n_items: int) -> None:
        with self._cond:
            self._done += n_items
            self._inflight -= n_items
            self._cond.notify_all()

    def _process(self, batch: list[_Item]) -> None:
        """Commit `batch`; isolate and reject items with bad content; pause on any other error."""
        work: list[list[_Item]] = [batch]
        with self._cond:
            self._inflight = len(batch)
        while work:
            part = work.pop(0)
            try:
                self._commit(part)
            except Exception as exc:
                if _is_data_error(exc):
                    if len(part) > 1:
                        mid = len(part) // 2
                        work[:0] = [part[:mid], part[mid:]]
                        continue
                    self._reject(part[0], exc)
                    self._finish(1)
                    continue
                self._pause([item for p in [part, *work] for item in p], exc)
                return
            self._finish(len(part))
        if self.paused:
            self._set_status(STATUS_RUNNING)

    def _reject(self, item: _Item, exc: BaseException) -> None:
        reason = f"store rejected: {type(exc).__name__}: {exc}".splitlines()[0][:300]
        log.error("%s (%s)", reason, type(item).__name__)
        with self._state_lock:
            self._last_error = reason
            if isinstance(item, _FrameItem):
                self._counters["frames_rejected"] += 1
        if isinstance(item, _FrameItem) and self._con is not None:
            # Record the loss as a gap so it stays visible to auditors.
            f = item.frame
            with contextlib.suppress(duckdb.Error):
                self._con.execute(
                    "INSERT OR IGNORE INTO gaps VALUES (?, ?, ?, ?, ?, ?)",
                    [f.host, f.epoch, f.seq, f.seq, reason, _utc(time.time_ns())],
                )

    # ------------------------------------------------------------------ one flush

    def _next_commit_us(self) -> int:
        us = max(_us(time.time_ns()), self._last_commit_us + 1)
        self._last_commit_us = us
        return us

    def _commit(self, items: list[_Item]) -> None:
        con = self._con
        if con is None:
            raise duckdb.ConnectionException("store connection is closed")
        t_start = time.perf_counter()
        frames: list[_FrameItem] = []
        gaps: list[_GapItem] = []
        descs: list[_DescItem] = []
        dup = expired = 0
        seen: set[tuple[str, str, int]] = set()
        careful = False
        for item in items:
            if isinstance(item, _FrameItem):
                f = item.frame
                key = (f.host, f.epoch, f.seq)
                if key in seen:
                    dup += 1
                    continue
                seen.add(key)
                wm = self._compacted.get((f.host, f.epoch))
                if wm is not None and f.seq <= wm:
                    expired += 1
                    continue
                if f.seq <= self._epoch_max.get((f.host, f.epoch), -1):
                    careful = True  # might be a re-delivery: let the ledger decide
                frames.append(item)
            elif isinstance(item, _GapItem):
                gaps.append(item)
            else:
                descs.append(item)
        try:
            stored, commit_us, hosts = self._transaction(con, frames, gaps, descs, careful)
        except _DuplicateInFastPath:
            stored, commit_us, hosts = self._transaction(con, frames, gaps, descs, True)
        dup += len(frames) - len(stored)
        self._apply_host_plan(hosts)
        self._after_commit(stored, gaps, descs, commit_us, dup, expired, time.perf_counter() - t_start)

    def _transaction(
        self,
        con: duckdb.DuckDBPyConnection,
        frames: list[_FrameItem],
        gaps: list[_GapItem],
        descs: list[_DescItem],
        careful: bool,
    ) -> tuple[list[_FrameItem], int, _HostPlan]:
        con.execute("BEGIN TRANSACTION")
        try:
            self._fault("begin")
            commit_us = 0
            if careful and frames:
                # Ledger first: INSERT OR IGNORE tells us which frames are new.
                commit_us = self._next_commit_us()
                self._register(con, "_gpusoc_frames", self._frames_table(frames, commit_us))
                new = {
                    (h, e, s)
                    for h, e, s in con.sql(
                        "INSERT OR IGNORE INTO frames SELECT * FROM _gpusoc_frames RETURNING host, epoch, seq"
                    ).fetchall()
                }
                self._unregister(con, "_gpusoc_frames")
                frames = [it for it in frames if (it.frame.host, it.frame.epoch, it.frame.seq) in new]
            hosts = self._insert_rows(con, frames, gaps, descs)
            if frames and not careful:
                # Fast path: plain INSERT (cheaper than OR IGNORE); committed_at is taken as
                # late as possible. A duplicate here means our in-memory view was stale.
                commit_us = self._next_commit_us()
                self._register(con, "_gpusoc_frames", self._frames_table(frames, commit_us))
                try:
                    con.execute("INSERT INTO frames SELECT * FROM _gpusoc_frames")
                except duckdb.ConstraintException as exc:
                    raise _DuplicateInFastPath() from exc
                finally:
                    self._unregister(con, "_gpusoc_frames")
            self._fault("commit")
            con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                con.execute("ROLLBACK")
            raise
        return frames, commit_us or _us(time.time_ns()), hosts

    @staticmethod
    def _register(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> None:
        con.register(name, table)

    @staticmethod
    def _unregister(con: duckdb.DuckDBPyConnection, name: str) -> None:
        # May run inside an aborted transaction; the error that aborted it is what matters.
        with contextlib.suppress(duckdb.Error):
            con.unregister(name)

    def _insert_rows(
        self,
        con: duckdb.DuckDBPyConnection,
        frames: list[_FrameItem],
        gaps: list[_GapItem],
        descs: list[_DescItem],
    ) -> _HostPlan:
        self._fault("insert")
        plan = self._plan_hosts(frames, descs)
        tables: list[tuple[str, pa.Table | None, str]] = []
        if frames:
            tables.append(("gpu_samples", self._gpu_table(frames), "INSERT INTO gpu_samples SELECT * FROM {v}"))
            tables.append(("train_samples", self._train_table(frames), "INSERT INTO train_samples SELECT * FROM {v}"))
            tables.append(("events", self._events_table(frames), "INSERT INTO events SELECT * FROM {v}"))
        if gaps:
            tables.append(("gaps", self._gaps_table(gaps), "INSERT OR IGNORE INTO gaps SELECT * FROM {v}"))
        if plan.rows:
            tables.append(("hosts", _hosts_table(plan.rows), _HOSTS_UPSERT))
        if plan.touch:
            tables.append(("touch", _touch_table(plan.touch), _HOSTS_TOUCH))
        if descs:
            tables.append(("gpus", self._gpus_table(descs), _GPUS_UPSERT))
        for name, table, sql in tables:
            if table is None or table.num_rows == 0:
                continue
            view = f"_gpusoc_{name}"
            con.register(view, table)
            try:
                con.execute(sql.format(v=view))
            finally:
                self._unregister(con, view)
        return plan

    # ------------------------------------------------------------------ Arrow builders

    @staticmethod
    def _frames_table(frames: list[_FrameItem], commit_us: int) -> pa.Table:
        n = len(frames)
        return pa.table(
            {
                "host": pa.array([it.frame.host for it in frames], pa.string()),
                "epoch": pa.array([it.frame.epoch for it in frames], pa.string()),
                "seq": pa.array(np.fromiter((it.frame.seq for it in frames), np.int64, n)),
                "ts": _ts_array(np.fromiter((it.frame.ts_unix_ns for it in frames), np.int64, n)),
                "received_at": _ts_array(np.fromiter((it.received_at_ns for it in frames), np.int64, n)),
                "committed_at": pa.array(np.full(n, commit_us, np.int64), type=_TS),
                "n_gpus": pa.array(np.fromiter((it.values.shape[0] for it in frames), np.int16, n)),
                "simulated": pa.array([bool(it.frame.simulated) for it in frames], pa.bool_()),
            }
        )

    @staticmethod
    def _gpu_table(frames: list[_FrameItem]) -> pa.Table:
        n = len(frames)
        counts = np.fromiter((it.values.shape[0] for it in frames), np.int64, n)
        rep = pa.array(np.repeat(np.arange(n, dtype=np.int64), counts))
        values = np.concatenate([it.values for it in frames]) if n else np.empty((0, N_METRICS), np.float32)
        columns = np.ascontiguousarray(values.T)
        total = int(counts.sum())
        states = np.fromiter(chain.from_iterable(it.frame.gpu_state for it in frames), np.int64, total)
        states = np.where((states >= 0) & (states < len(GPU_STATE_VALUES)), states, 0)
        data: dict[str, pa.Array] = {
            "host": pa.array([it.frame.host for it in frames], pa.string()).take(rep),
            "epoch": pa.array([it.frame.epoch for it in frames], pa.string()).take(rep),
            "seq": pa.array(np.repeat(np.fromiter((it.frame.seq for it in frames), np.int64, n), counts)),
            "ts": _ts_array(np.repeat(np.fromiter((it.frame.ts_unix_ns for it in frames), np.int64, n), counts)),
            "gpu_index": pa.array(
                np.fromiter(chain.from_iterable(it.frame.gpu_index for it in frames), np.int16, total)
            ),
            "gpu_state": pa.array(GPU_STATE_VALUES, pa.string()).take(pa.array(states)),
            "simulated": pa.array(np.repeat(np.fromiter((it.frame.simulated for it in frames), np.bool_, n), counts)),
        }
        for i, name in enumerate(METRIC_NAMES):
            col = columns[i]
            data[name] = pa.array(col, type=pa.float32(), mask=np.isnan(col))
        return pa.table(data)

    @staticmethod
    def _train_table(frames: list[_FrameItem]) -> pa.Table | None:
        recs = [(it.frame, r) for it in frames for r in it.frame.train]
        if not recs:
            return None
        extra = [
            [(str(k), None if math.isnan(float(v)) else float(v)) for k, v in r.extra.items()] for _, r in recs
        ]
        return pa.table(
            {
                "host": pa.array([f.host for f, _ in recs], pa.string()),
                "epoch": pa.array([f.epoch for f, _ in recs], pa.string()),
                "seq": pa.array([f.seq for f, _ in recs], pa.int64()),
                "ts": _ts_array([r.ts_unix_ns for _, r in recs]),
                "job_id": pa.array([r.job_id for _, r in recs], pa.string()),
                "rank": pa.array([r.rank for _, r in recs], pa.int32()),
                "local_rank": pa.array([r.local_rank for _, r in recs], pa.int32()),
                "world_size": pa.array([r.world_size for _, r in recs], pa.int32()),
                "pid": pa.array([r.pid for _, r in recs], pa.int64()),
                "uid": pa.array([r.uid for _, r in recs], pa.int64()),
                "step": pa.array([r.step for _, r in recs], pa.int64()),
                "kind": pa.array([r.kind for _, r in recs], pa.string()),
                "loss": _nullable_f64([r.loss for _, r in recs]),
                "grad_norm": _nullable_f64([r.grad_norm for _, r in recs]),
                "lr": _nullable_f64([r.lr for _, r in recs]),
                "tokens": _nullable_f64([r.tokens for _, r in recs]),
                "extra": pa.array(extra, pa.map_(pa.string(), pa.float64())),
                "info": pa.array([_json(r.info) for _, r in recs], pa.string()),
                "simulated": pa.array([bool(f.simulated) for f, _ in recs], pa.bool_()),
            }
        )

    @staticmethod
    def _events_table(frames: list[_FrameItem]) -> pa.Table | None:
        evs = [(it.frame, e) for it in frames for e in it.frame.events]
        if not evs:
            return None
        return pa.table(
            {
                "host": pa.array([f.host for f, _ in evs], pa.string()),
                "epoch": pa.array([f.epoch for f, _ in evs], pa.string()),
                "seq": pa.array([f.seq for f, _ in evs], pa.int64()),
                "ts": _ts_array([e.ts_unix_ns for _, e in evs]),
                "kind": pa.array([e.kind for _, e in evs], pa.string()),
                "severity": pa.array([SEVERITY_NAMES.get(e.severity, str(e.severity)) for _, e in evs], pa.string()),
                "gpu_index": pa.array([None if e.gpu_index < 0 else e.gpu_index for _, e in evs], pa.int16()),
                "pid": pa.array([e.pid or None for _, e in evs], pa.int64()),
                "detail": pa.array([e.detail for _, e in evs], pa.string()),
                "attrs": pa.array([_json(e.attrs) for _, e in evs], pa.string()),
                "simulated": pa.array([bool(f.simulated) for f, _ in evs], pa.bool_()),
            }
        )

    @staticmethod
    def _gaps_table(gaps: list[_GapItem]) -> pa.Table:
        return pa.table(
            {
                "host": pa.array([g.host for g in gaps], pa.string()),
                "epoch": pa.array([g.gap.epoch for g in gaps], pa.string()),
                "first_seq": pa.array([g.gap.first_seq for g in gaps], pa.int64()),
                "last_seq": pa.array([g.gap.last_seq for g in gaps], pa.int64()),
                "reason": pa.array([g.gap.reason for g in gaps], pa.string()),
                "detected_at": _ts_array([g.gap.ts_unix_ns or g.detected_at_ns for g in gaps]),
            }
        )

    # ------------------------------------------------------------------ hosts summary

    def _plan_hosts(self, frames: list[_FrameItem], descs: list[_DescItem]) -> _HostPlan:
        """Which `hosts` rows this flush must write, and how.

        Upserting every host on every tick costs as much as the ledger insert, so: a new,
        changed or described host is upserted; an unchanged host whose last_seen is
        `hosts_refresh_s` behind gets a cheap last_seen UPDATE; otherwise its newer last_seen
        waits in memory (`_host_pending`) for maintenance, an export or stop to write it.
        """
        plan = _HostPlan()
        merged: dict[str, list[Any]] = {}
        written = self._host_written
        refresh = int(self.hosts_refresh_s * 1e9)
        touch, hold = plan.touch, plan.pending
        for it in frames:
            f = it.frame
            host, ts, n = f.host, f.ts_unix_ns, int(it.values.shape[0])
            known = written.get(host)
            if known is not None and host not in merged:
                first, last, (sim, epoch, addr, n_known) = known
                if (
                    bool(f.simulated) == sim and f.epoch == epoch and n == n_known
                    and (not it.address or it.address == addr) and ts >= first
                ):
                    if ts - last >= refresh:
                        touch[host] = max(ts, touch.get(host, 0))
                    else:
                        hold[host] = max(ts, hold.get(host, 0))
                    continue
            r = merged.get(host)
            if r is None:
                merged[host] = [None, ts, ts, bool(f.simulated), f.epoch, it.address or None, n, None]
                continue
            r[1], r[2] = min(r[1], ts), max(r[2], ts)
            r[3], r[4], r[6] = bool(f.simulated), f.epoch, n
            if it.address:
                r[5] = it.address
        for d in descs:
            host, ts = d.desc.host, d.received_at_ns
            r = merged.get(host)
            if r is None:
                r = merged[host] = [None, ts, ts, None, None, None, None, None]
            r[1], r[2] = min(r[1], ts), max(r[2], ts)
            r[0], r[3], r[6], r[7] = d.desc.agent_version, bool(d.desc.simulated), len(d.desc.gpus), d.desc.nvml_status
            if d.desc.epoch:
                r[4] = d.desc.epoch
            if d.address:
                r[5] = d.address
        pending = self._host_pending
        for host, r in merged.items():
            r[2] = max(r[2], pending.get(host, 0), hold.pop(host, 0), touch.pop(host, 0))
            plan.rows.append([host, *r])
        for host in touch:
            hold.pop(host, None)
            touch[host] = max(touch[host], pending.get(host, 0))
        return plan

    def _apply_host_plan(self, plan: _HostPlan) -> None:
        """After COMMIT only: remember what the hosts table now holds."""
        for row in plan.rows:
            host, _ver, first, last, sim, epoch, addr, n_gpus, _nvml = row
            old = self._host_written.get(host)
            if old is not None:
                first = min(first, old[0])
                last = max(last, old[1])
                sim = old[2][0] if sim is None else sim
                epoch = epoch or old[2][1]
                addr = addr or old[2][2]
                n_gpus = old[2][3] if n_gpus is None else n_gpus
            self._host_written[host] = (first, last, (sim, epoch, addr, n_gpus))
            self._host_pending.pop(host, None)
        for host, ts in plan.touch.items():
            first, last, fields = self._host_written[host]
            self._host_written[host] = (first, max(last, ts), fields)
            self._host_pending.pop(host, None)
        for host, ts in plan.pending.items():
            self._host_pending[host] = max(ts, self._host_pending.get(host, 0))

    def _write_pending_hosts(self, con: duckdb.DuckDBPyConnection) -> int:
        """Write the last_seen values held back by _plan_hosts (one UPDATE)."""
        pending = {h: ts for h, ts in self._host_pending.items() if h in self._host_written}
        if not pending:
            return 0
        con.register("_gpusoc_touch", _touch_table(pending))
        try:
            con.execute(_HOSTS_TOUCH.format(v="_gpusoc_touch"))
        finally:
            self._unregister(con, "_gpusoc_touch")
        self._apply_host_plan(_HostPlan(touch=pending))
        return len(pending)

    @staticmethod
    def _gpus_table(descs: list[_DescItem]) -> pa.Table:
        rows: dict[tuple[str, int], tuple[Any, ...]] = {}
        for d in descs:
            for g in d.desc.gpus:
                mem = float(g.memory_total_mib)
                rows[(d.desc.host, int(g.index))] = (
                    g.uuid, g.name, None if math.isnan(mem) else mem, g.driver_version, g.pci_bus_id,
                    bool(d.desc.simulated),
                )
        keys = list(rows)
        vals = [rows[k] for k in keys]
        return pa.table(
            {
                "host": pa.array([k[0] for k in keys], pa.string()),
                "gpu_index": pa.array([k[1] for k in keys], pa.int16()),
                "uuid": pa.array([v[0] for v in vals], pa.string()),
                "name": pa.array([v[1] for v in vals], pa.string()),
                "memory_total_mib": pa.array([v[2] for v in vals], pa.float32()),
                "driver_version": pa.array([v[3] for v in vals], pa.string()),
                "pci_bus_id": pa.array([v[4] for v in vals], pa.string()),
                "simulated": pa.array([v[5] for v in vals], pa.bool_()),
            }
        )

    # ------------------------------------------------------------------ after a commit

    def _after_commit(
        self,
        frames: list[_FrameItem],
        gaps: list[_GapItem],
        descs: list[_DescItem],
        commit_us: int,
        dup: int,
        expired: int,
        seconds: float,
    ) -> None:
        per: dict[tuple[str, str], tuple[int, int]] = {}
        gpu_rows = train_rows = event_rows = 0
        for it in frames:
            f = it.frame
            key = (f.host, f.epoch)
            seq, ts = per.get(key, (-1, 0))
            per[key] = (max(seq, f.seq), max(ts, f.ts_unix_ns))
            gpu_rows += it.values.shape[0]
            train_rows += len(f.train)
            event_rows += len(f.events)
        committed_ns = commit_us * 1000
        with self._state_lock:
            for (host, epoch), (seq, ts) in per.items():
                if seq > self._epoch_max.get((host, epoch), -1):
                    self._epoch_max[(host, epoch)] = seq
                cur = self._resume.get(host)
                if cur is None or (cur.epoch != epoch and ts >= cur.ts_ns):
                    self._resume[host] = _Resume(epoch, seq, ts)
                elif cur.epoch == epoch:
                    self._resume[host] = _Resume(epoch, max(seq, cur.seq), max(ts, cur.ts_ns))
            c = self._counters
            c["frames_committed"] += len(frames)
            c["frames_duplicate"] += dup
            c["frames_expired"] += expired
            c["gaps_committed"] += len(gaps)
            c["descriptions_committed"] += len(descs)
            c["flushes"] += 1
            self._rows["frames"] += len(frames)
            self._rows["gpu_samples"] += gpu_rows
            self._rows["train_samples"] += train_rows
            self._rows["events"] += event_rows
            self._rows["gaps"] += len(gaps)
            self._flush_ms.append(seconds * 1000.0)
        if per and self.on_commit is not None:
            info = [(h, e, s, committed_ns) for (h, e), (s, _) in per.items()]
            try:
                self.on_commit(info)
            except Exception:
                log.exception("on_commit callback failed")

    # ------------------------------------------------------------------ maintenance

    def _periodic_maintenance(self) -> None:
        self._next_maintenance = time.monotonic() + self.rollup_interval_s
        try:
            if self._con is None:
                self._reconnect()
            assert self._con is not None
            self._maintain(self._con, time.time())
        except Exception as exc:
            with self._state_lock:
                self._last_error = f"maintenance: {type(exc).__name__}: {exc}".splitlines()[0][:300]
            log.warning("store maintenance failed: %s", exc)
            if isinstance(exc, duckdb.FatalException):
                self._close()

    def _maintain(self, con: duckdb.DuckDBPyConnection, now: float) -> dict[str, Any]:
        self._fault("maintenance")
        result: dict[str, Any] = {"rolled_up_rows": 0, "raw_rows_deleted": 0, "ledger_rows_compacted": 0}
        result["hosts_refreshed"] = self._write_pending_hosts(con)
        if self.raw_retention_s is not None:
            cutoff_s = math.floor((now - self.raw_retention_s) / ROLLUP_BUCKET_S) * ROLLUP_BUCKET_S
            cutoff = _utc(int(cutoff_s) * 1_000_000_000)
            result["cutoff_unix_s"] = cutoff_s
            con.execute("BEGIN TRANSACTION")
            try:
                got = con.execute(_ROLLUP_SQL, [cutoff]).fetchone()
                result["rollup_rows_written"] = int(got[0]) if got else 0
                got = con.execute("DELETE FROM gpu_samples WHERE ts < ?", [cutoff]).fetchone()
                result["raw_rows_deleted"] = result["rolled_up_rows"] = int(got[0]) if got else 0
                con.execute(_COMPACT_SQL, [_utc(time.time_ns()), cutoff])
                got = con.execute("DELETE FROM frames WHERE ts < ?", [cutoff]).fetchone()
                result["ledger_rows_compacted"] = int(got[0]) if got else 0
                con.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                raise
            self._compacted = {
                (h, e): int(s)
                for h, e, s in con.execute("SELECT host, epoch, max_seq FROM frames_compacted").fetchall()
            }
        con.execute("CHECKPOINT")
        self._mark_checkpointed()
        result["cache_trimmed"] = self._trim_cache(con)
        result["heap_released"] = release_free_heap()
        with self._state_lock:
            self._counters["maintenance_runs"] += 1
            self._counters["rows_rolled_up"] += result["rolled_up_rows"]
            self._counters["raw_rows_deleted"] += result["raw_rows_deleted"]
            self._counters["ledger_rows_compacted"] += result["ledger_rows_compacted"]
        return result

    def _trim_cache(self, con: duckdb.DuckDBPyConnection) -> bool:
        """Evict cached blocks down to `cache_limit`, then restore `memory_limit` for queries.

        Why: blocks the writer appends stay in DuckDB's buffer pool after a checkpoint, so the
        pool (and the process RSS) grows with the data written until it reaches memory_limit,
        about 130 MB in two hours of a 32-host demo. Lowering the limit makes DuckDB evict
        unpinned blocks, least recently used first, and free them; raising it again keeps the
        headroom for large queries. If readers have too much pinned for the lower limit, DuckDB
        refuses the change and the trim is skipped until the next maintenance.
        """
        if not (self.cache_limit and self.memory_limit):
            return False
        with self._reader_lock:
            busy = self._readers_active > 0
            if not busy:
                self._trimming = True  # readers starting now wait (briefly) for the trim to end
        if busy:  # the limit is database-wide: a reader's query could fail under the low one
            with self._state_lock:
                self._counters["cache_trims_skipped"] += 1
            self._trim_retry_at = time.monotonic() + self.trim_retry_s
            return False
        trimmed = False
        try:
            con.execute(f"SET memory_limit = '{self.cache_limit}'")
            trimmed = True
        except duckdb.Error as exc:
            log.debug("block cache not trimmed (pinned by running queries?): %s", exc)
        finally:
            self._restore_memory_limit(con)
            with self._reader_lock:
                self._trimming = False
                self._reader_lock_cond.notify_all()
        with self._state_lock:
            self._counters["cache_trims" if trimmed else "cache_trims_skipped"] += 1
        self._trim_retry_at = None if trimmed else time.monotonic() + self.trim_retry_s
        return trimmed

    def _restore_memory_limit(self, con: duckdb.DuckDBPyConnection) -> None:
        """Put memory_limit back after a trim; on failure, retry before every flush until it holds."""
        try:
            con.execute(f"SET memory_limit = '{self.memory_limit}'")
            self._limit_restore_pending = False
        except duckdb.Error as exc:
            self._limit_restore_pending = True
            log.error("store memory_limit not restored to %s after a cache trim (retrying): %s",
                      self.memory_limit, exc)

    def _mark_checkpointed(self) -> None:
        with self._state_lock:
            self._checkpointed = {h: (r.epoch, r.seq) for h, r in self._resume.items()}
            self._last_checkpoint_ns = time.time_ns()


def release_free_heap() -> bool:
    """Hand glibc's free heap pages back to the OS (`malloc_trim(0)`); False where there is no glibc.

    Why: ingest churns many short-lived buffers on several threads (gRPC, Arrow, numpy, Qt); glibc
    keeps freed pages in its per-thread arenas, so a long-running console's RSS creeps although
    its live heap is flat (docs/soak.md). Called once per maintenance run; costs milliseconds.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim is False:
        return False
    _malloc_trim(0)
    return True


_malloc_trim: Any = None  # libc's malloc_trim once looked up; False where unavailable


def _hosts_table(rows: list[list[Any]]) -> pa.Table:
    cols = list(zip(*rows, strict=True))

    def ts(i: int) -> pa.Array:
        return pa.array([None if v is None else v // 1000 for v in cols[i]], type=_TS)

    return pa.table(
        {
            "host": pa.array(cols[0], pa.string()),
            "agent_version": pa.array(cols[1], pa.string()),
            "first_seen": ts(2),
            "last_seen": ts(3),
            "simulated": pa.array(cols[4], pa.bool_()),
            "epoch": pa.array(cols[5], pa.string()),
            "address": pa.array(cols[6], pa.string()),
            "n_gpus": pa.array(cols[7], pa.int32()),
            "nvml_status": pa.array(cols[8], pa.string()),
        }
    )


_HOSTS_UPSERT: Final = """
INSERT INTO hosts SELECT * FROM {v}
ON CONFLICT (host) DO UPDATE SET
    agent_version = coalesce(excluded.agent_version, hosts.agent_version),
    first_seen = least(hosts.first_seen, excluded.first_seen),
    last_seen = greatest(hosts.last_seen, excluded.last_seen),
    simulated = coalesce(excluded.simulated, hosts.simulated),
    epoch = coalesce(excluded.epoch, hosts.epoch),
    address = coalesce(excluded.address, hosts.address),
    n_gpus = coalesce(excluded.n_gpus, hosts.n_gpus),
    nvml_status = coalesce(excluded.nvml_status, hosts.nvml_status)
"""

def _touch_table(last_seen: dict[str, int]) -> pa.Table:
    return pa.table(
        {
            "host": pa.array(list(last_seen), pa.string()),
            "last_seen": pa.array([v // 1000 for v in last_seen.values()], type=_TS),
        }
    )


_HOSTS_TOUCH: Final = """
UPDATE hosts SET last_seen = greatest(hosts.last_seen, t.last_seen)
FROM {v} AS t WHERE hosts.host = t.host
"""

_GPUS_UPSERT: Final = """
INSERT INTO gpus SELECT * FROM {v}
ON CONFLICT (host, gpu_index) DO UPDATE SET
    uuid = excluded.uuid,
    name = excluded.name,
    memory_total_mib = excluded.memory_total_mib,
    driver_version = excluded.driver_version,
    pci_bus_id = excluded.pci_bus_id,
    simulated = excluded.simulated
"""


def _rollup_sql() -> str:
    aggs = ",\n        ".join(
        f"min({m})::REAL, avg({m})::REAL, max({m})::REAL" for m in METRIC_NAMES
    )
    old, new = "gpu_samples_1m", "excluded"
    sets = []
    for m in METRIC_NAMES:
        lo, mean, hi = (f"{m}_{s}" for s in ROLLUP_SUFFIXES)
        sets.append(f"{lo} = least({old}.{lo}, {new}.{lo})")
        sets.append(f"{hi} = greatest({old}.{hi}, {new}.{hi})")
        # Late raw rows for an already rolled-up bucket: mean weighted by row count.
        sets.append(
            f"{mean} = CASE WHEN {old}.{mean} IS NULL THEN {new}.{mean} "
            f"WHEN {new}.{mean} IS NULL THEN {old}.{mean} "
            f"ELSE (({old}.{mean} * {old}.n + {new}.{mean} * {new}.n) / ({old}.n + {new}.n))::REAL END"
        )
    return f"""
INSERT INTO gpu_samples_1m
SELECT host, gpu_index,
        to_timestamp((epoch_us(ts) // {ROLLUP_BUCKET_S * 1_000_000}) * {ROLLUP_BUCKET_S}) AS bucket,
        bool_or(simulated), count(*),
        {aggs}
FROM gpu_samples WHERE ts < ?
GROUP BY host, gpu_index, bucket
ON CONFLICT (host, gpu_index, bucket) DO UPDATE SET
    simulated = {old}.simulated OR {new}.simulated,
    n = {old}.n + {new}.n,
    {", ".join(sets)}
"""


_ROLLUP_SQL: Final = _rollup_sql()

_COMPACT_SQL: Final = """
INSERT INTO frames_compacted
SELECT host, epoch, max(seq), max(ts), count(*), ?
FROM frames WHERE ts < ? GROUP BY host, epoch
ON CONFLICT (host, epoch) DO UPDATE SET
    max_seq = greatest(frames_compacted.max_seq, excluded.max_seq),
    max_ts = greatest(frames_compacted.max_ts, excluded.max_ts),
    n_frames = frames_compacted.n_frames + excluded.n_frames,
    compacted_at = excluded.compacted_at
"""
