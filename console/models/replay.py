"""Replay of an exported audit DuckDB file as the same Frames live ingest delivers.

Opening the file read-only means a replay can never alter evidence, and several consoles can
replay one file at once. For a position t, every host gets one reconstructed `protos.types.Frame`:
its GPU rows come from its newest `gpu_samples` timestamp <= t, its training records and events
from the half-open window (t0, t]. Feeding those frames to the live view models (fleet, training,
host drilldown, events log) replays the incident with the exact panels operators already know.

`simulated` is copied from the stored rows, so a replay of simulated data is still marked as such.
Processes are not stored per sample, so replayed frames carry none.

Threading: the clock (`seek`/`play`/`pause`/`advance`) belongs to the GUI thread; the I/O methods
(`frames_between`, `frames_at`, `query`) serialise on one lock and may run on a worker.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any, Final

import duckdb
import numpy as np

from console.models.alerts import severity_level
from protos.types import GPU_STATE_NAMES, METRIC_NAMES, N_METRICS, Event, Frame, TrainRecord

DEFAULT_WINDOW_NS: Final = 1_000_000_000  # a seek shows records of the last second before t
_STATE_BY_NAME: Final[dict[str, int]] = {name: code for code, name in GPU_STATE_NAMES.items()}


class ReplaySource:
    """A read-only audit file, a replay clock over its time range, and Frames at any position.

    `lookback_s` bounds how old a host's newest GPU sample may be to still appear at t
    (None = any age; the frame's own timestamp shows how stale it is).
    """

    def __init__(self, path: str | Path, *, window_ns: int = DEFAULT_WINDOW_NS,
                 lookback_s: float | None = None) -> None:
        self._path = Path(path)
        if not self._path.exists():
            # duckdb would create an empty file otherwise (not in read-only mode, but be explicit).
            raise FileNotFoundError(self._path)
        self._con = duckdb.connect(str(self._path), read_only=True)
        self._lock = threading.Lock()
        self._window_ns = int(window_ns)
        self._lookback_us = None if lookback_s is None else int(lookback_s * 1e6)
        self._columns = self._read_columns()
        self._start_ns, self._end_ns = self._read_range()
        self._hosts = self._read_hosts()
        self._position_ns = self._start_ns
        self._playing = False
        self._speed = 1.0

    # ---- lifetime ----

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._con.close()

    def __enter__(self) -> ReplaySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what the file holds ----

    @property
    def path(self) -> Path:
        """The audit file."""
        return self._path

    @property
    def start_ns(self) -> int:
        """Oldest timestamp in gpu_samples, train_samples and events (unix ns)."""
        return self._start_ns

    @property
    def end_ns(self) -> int:
        """Newest timestamp in those tables (unix ns)."""
        return self._end_ns

    @property
    def window_ns(self) -> int:
        """Records window a seek delivers, (t - window, t]."""
        return self._window_ns

    def hosts(self) -> list[str]:
        """Hosts with any recorded sample, record or event."""
        return list(self._hosts)

    def query(self, sql: str, params: list[object]) -> list[tuple[Any, ...]]:
        """Run a read-only query on the file; a `console.models.training.Query` for history loads."""
        with self._lock:
            return self._con.execute(sql, params).fetchall()

    # ---- clock (GUI thread) ----

    @property
    def position_ns(self) -> int:
        """Current replay time (unix ns)."""
        return self._position_ns

    @property
    def playing(self) -> bool:
        """True while `advance` moves the clock."""
        return self._playing

    @property
    def speed(self) -> float:
        """Recorded seconds per wall-clock second."""
        return self._speed

    @property
    def at_end(self) -> bool:
        """True when the clock reached the newest recorded time."""
        return self._position_ns >= self._end_ns

    def play(self, speed: float | None = None) -> None:
        """Start (or keep) moving the clock at `speed` x real time."""
        if speed is not None:
            if not speed > 0:
                raise ValueError("speed must be > 0")
            self._speed = float(speed)
        self._playing = not self.at_end

    def pause(self) -> None:
        """Stop the clock where it is."""
        self._playing = False

    def seek(self, t_ns: int) -> tuple[int, int]:
        """Jump to `t_ns` (clamped to the file's range); returns the window (t - window, t] to fetch.

        A seek is a discontinuity: consumers that dedupe by timestamp should be cleared first
        when seeking backwards.
        """
        t = min(max(int(t_ns), self._start_ns), self._end_ns)
        self._position_ns = t
        return t - self._window_ns, t

    def advance(self, wall_dt_s: float) -> tuple[int, int] | None:
        """Move a playing clock by `wall_dt_s * speed`; returns the window (old, new] to fetch.

        Consecutive windows tile time, so every record is delivered exactly once while playing.
        Reaching the end pauses. None when paused or nothing moved.
        """
        if not self._playing or wall_dt_s <= 0:
            return None
        old = self._position_ns
        new = min(old + max(int(wall_dt_s * self._speed * 1e9), 1), self._end_ns)
        self._position_ns = new
        if new >= self._end_ns:
            self._playing = False
        return (old, new) if new > old else None

    # ---- frames (I/O; any thread) ----

    def frames_at(self, t_ns: int, window_ns: int | None = None) -> list[Frame]:
        """Frames of every host at `t_ns`, with records from (t - window, t]."""
        return self.frames_between(t_ns - (self._window_ns if window_ns is None else window_ns), t_ns)

    def frames_between(self, t0_ns: int, t1_ns: int) -> list[Frame]:
        """One Frame per host: GPUs at the newest sample <= t1, train records and events in (t0, t1].

        Sorted by host. Hosts with neither a GPU sample (within `lookback_s`) nor records are omitted.
        """
        t0_us, t1_us = t0_ns // 1000, t1_ns // 1000
        with self._lock:
            gpu_rows = self._gpu_rows(t1_us)
            train_rows = self._train_rows(t0_us, t1_us)
            event_rows = self._event_rows(t0_us, t1_us)
        frames: dict[str, Frame] = {}
        self._add_gpu_rows(frames, gpu_rows)
        for row in train_rows:
            host, epoch, seq, ts_ns, sim = row[0], row[1], row[2], row[3], row[4]
            f = self._frame_for(frames, host, epoch, seq, ts_ns, sim)
            f.train.append(_train_record(row[5:]))
        for row in event_rows:
            host, epoch, seq, ts_ns, sim = row[0], row[1], row[2], row[3], row[4]
            f = self._frame_for(frames, host, epoch, seq, ts_ns, sim)
            f.events.append(_event(row[3], row[5:]))
        return [frames[h] for h in sorted(frames)]

    # ---- internals ----

    def _read_columns(self) -> dict[str, set[str]]:
        rows = self._con.execute(
            "SELECT table_name, column_name FROM duckdb_columns() "
            "WHERE database_name = current_database() AND schema_name = 'main'"
        ).fetchall()
        out: dict[str, set[str]] = {}
        for table, column in rows:
            out.setdefault(str(table), set()).add(str(column))
        for required in ("gpu_samples",):
            if required not in out:
                raise ValueError(f"{self._path}: not a gpusoc audit file (no {required} table)")
        return out

    def _has(self, table: str) -> bool:
        return table in self._columns

    def _read_range(self) -> tuple[int, int]:
        parts = [f"SELECT min(ts) AS a, max(ts) AS b FROM {t}"
                 for t in ("gpu_samples", "train_samples", "events") if self._has(t)]
        row = self._con.execute(
            f"SELECT epoch_ns(min(a)), epoch_ns(max(b)) FROM ({' UNION ALL '.join(parts)})"
        ).fetchone()
        if row is None or row[0] is None:
            return 0, 0
        return int(row[0]), int(row[1])

    def _read_hosts(self) -> list[str]:
        parts = [f"SELECT DISTINCT host FROM {t}" for t in ("gpu_samples", "train_samples", "events") if self._has(t)]
        rows = self._con.execute(f"SELECT DISTINCT host FROM ({' UNION '.join(parts)}) ORDER BY host").fetchall()
        return [str(r[0]) for r in rows]

    def _gpu_rows(self, t1_us: int) -> list[tuple[Any, ...]]:
        have = self._columns["gpu_samples"]
        metric_sql = ", ".join(f"g.{m}" if m in have else "NULL" for m in METRIC_NAMES)
        params: list[object] = [t1_us]
        lookback = ""
        if self._lookback_us is not None:
            lookback = " AND ts > make_timestamptz(?::BIGINT)"
            params.append(t1_us - self._lookback_us)
        return self._con.execute(
            "WITH latest AS (SELECT host, max(ts) AS ts FROM gpu_samples "
            f"WHERE ts <= make_timestamptz(?::BIGINT){lookback} GROUP BY host) "
            "SELECT g.host, g.epoch, g.seq, epoch_ns(g.ts), g.simulated, g.gpu_index, "
            f"CAST(g.gpu_state AS VARCHAR), {metric_sql} "
            "FROM gpu_samples g JOIN latest l ON g.host = l.host AND g.ts = l.ts "
            "ORDER BY g.host, g.gpu_index, g.epoch, g.seq",
            params,
        ).fetchall()

    def _train_rows(self, t0_us: int, t1_us: int) -> list[tuple[Any, ...]]:
        if not self._has("train_samples"):
            return []
        return self._con.execute(
            "SELECT host, epoch, seq, epoch_ns(ts), simulated, "
            "epoch_ns(ts), job_id, rank, local_rank, world_size, pid, uid, step, "
            "CAST(kind AS VARCHAR), loss, grad_norm, lr, tokens, extra, info "
            "FROM train_samples WHERE ts > make_timestamptz(?::BIGINT) AND ts <= make_timestamptz(?::BIGINT) "
            "ORDER BY host, ts, seq",
            [t0_us, t1_us],
        ).fetchall()

    def _event_rows(self, t0_us: int, t1_us: int) -> list[tuple[Any, ...]]:
        if not self._has("events"):
            return []
        return self._con.execute(
            "SELECT host, epoch, seq, epoch_ns(ts), simulated, "
            "kind, CAST(severity AS VARCHAR), gpu_index, pid, detail, attrs "
            "FROM events WHERE ts > make_timestamptz(?::BIGINT) AND ts <= make_timestamptz(?::BIGINT) "
            "ORDER BY host, ts, seq",
            [t0_us, t1_us],
        ).fetchall()

    @staticmethod
    def _add_gpu_rows(frames: dict[str, Frame], rows: list[tuple[Any, ...]]) -> None:
        by_host: dict[str, list[tuple[Any, ...]]] = {}
        for row in rows:
            by_host.setdefault(str(row[0]), []).append(row)
        for host, hrows in by_host.items():
            seen: set[int] = set()
            kept = []
            for r in hrows:  # two epochs with the same timestamp: keep one row per GPU
                if int(r[5]) not in seen:
                    seen.add(int(r[5]))
                    kept.append(r)
            values = np.full((len(kept), N_METRICS), np.nan, dtype=np.float32)
            for i, r in enumerate(kept):
                values[i] = [np.nan if v is None else v for v in r[7:]]
            first = kept[0]
            frames[host] = Frame(
                host=host, epoch=str(first[1]), seq=int(first[2]), ts_unix_ns=int(first[3]),
                simulated=any(bool(r[4]) for r in kept), gpu_values=values,
                gpu_index=[int(r[5]) for r in kept], gpu_state=[_state_code(r[6]) for r in kept],
            )

    @staticmethod
    def _frame_for(frames: dict[str, Frame], host: Any, epoch: Any, seq: Any, ts_ns: Any, sim: Any) -> Frame:
        f = frames.get(str(host))
        if f is None:
            # A host with records but no GPU sample in reach: an empty GPU block, like an agent without NVML.
            f = frames[str(host)] = Frame(
                host=str(host), epoch=str(epoch), seq=int(seq), ts_unix_ns=int(ts_ns), simulated=bool(sim),
                gpu_values=np.empty((0, N_METRICS), dtype=np.float32), gpu_index=[], gpu_state=[],
            )
        else:
            f.simulated = f.simulated or bool(sim)
        return f


def _state_code(state: object) -> int:
    s = str(state or "").strip().lower()
    return int(s) if s.isdigit() else _STATE_BY_NAME.get(s, 0)


def _train_record(row: tuple[Any, ...]) -> TrainRecord:
    ts_ns, job, rank, local_rank, world, pid, uid, step, kind, loss, gn, lr, tokens, extra, info = row
    return TrainRecord(
        ts_unix_ns=int(ts_ns), job_id=str(job or ""), rank=_int(rank, 0), local_rank=_int(local_rank, -1),
        world_size=_int(world, 0), pid=_int(pid, 0), uid=_int(uid, 0), step=_int(step, -1),
        loss=_float(loss), grad_norm=_float(gn), lr=_float(lr), tokens=_float(tokens),
        extra={str(k): _float(v) for k, v in _as_dict(extra).items()},
        kind=str(kind or "log"), info={str(k): str(v) for k, v in _as_dict(info).items()},
    )


def _event(ts_ns: Any, row: tuple[Any, ...]) -> Event:
    kind, severity, gpu, pid, detail, attrs = row
    return Event(
        ts_unix_ns=int(ts_ns), kind=str(kind), severity=severity_level(severity), gpu_index=_int(gpu, -1),
        pid=_int(pid, 0), detail=str(detail or ""), attrs={str(k): str(v) for k, v in _as_dict(attrs).items()},
    )


def _as_dict(value: object) -> dict[Any, Any]:
    """A MAP (dict, or DuckDB's older {'key': [...], 'value': [...]}), or JSON text, as a dict."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    if isinstance(value, dict):
        if set(value) == {"key", "value"} and isinstance(value["key"], list):
            return dict(zip(value["key"], value["value"], strict=False))
        return value
    return {}


def _float(v: Any) -> float:
    try:
        return math.nan if v is None else float(v)
    except (TypeError, ValueError):
        return math.nan


def _int(v: Any, default: int) -> int:
    try:
        return default if v is None else int(v)
    except (TypeError, ValueError):
        return default
