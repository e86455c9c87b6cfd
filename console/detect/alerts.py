"""Alerts: the record an operator acts on, their kinds, dedup keys and the in-memory alert book.

A detector never writes rows itself: it asks the `AlertBook` to raise, refresh or resolve the
alert for a dedup key, so a persistent condition updates one alert instead of flooding. The book
hands back what changed; the host application stores those rows (`alerts_to_arrow` /
`upsert_alerts`) into the store's `alerts` table, whose `dedup_key` column is UNIQUE.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

# -- severities and states (text, as stored) ---------------------------------------------------

INFO: Final = "info"
WARNING: Final = "warning"
CRITICAL: Final = "critical"
SEVERITIES: Final[tuple[str, ...]] = (INFO, WARNING, CRITICAL)
_SEVERITY_RANK: Final[dict[str, int]] = {INFO: 1, WARNING: 2, CRITICAL: 3}

OPEN: Final = "open"
ACKNOWLEDGED: Final = "acknowledged"
RESOLVED: Final = "resolved"
STATES: Final[tuple[str, ...]] = (OPEN, ACKNOWLEDGED, RESOLVED)

# -- alert kinds -----------------------------------------------------------------------------------
# GPU health
XID: Final = "xid"
ECC_UNCORRECTED: Final = "ecc_uncorrected"
ROW_REMAP_FAILURE: Final = "row_remap_failure"
RETIRED_PAGES: Final = "retired_pages"
THERMAL_THROTTLE: Final = "thermal_throttle"
POWER_THROTTLE: Final = "power_throttle"
GPU_LOST: Final = "gpu_lost"
GPU_ERROR: Final = "gpu_error"
# peers
PEER_OUTLIER: Final = "peer_outlier"
# training loop
TRAIN_NONFINITE: Final = "train_nonfinite"
LOSS_SPIKE: Final = "loss_spike"
LOSS_DIVERGENCE: Final = "loss_divergence"
GRAD_EXPLOSION: Final = "grad_explosion"
STRAGGLER: Final = "straggler"
HANG: Final = "hang"
THROUGHPUT_DROP: Final = "throughput_drop"
RANK_EXIT: Final = "rank_exit"
# training-semantics tampering
PARAM_CHECKSUM_MISMATCH: Final = "param_checksum_mismatch"
FINGERPRINT_CHANGE: Final = "fingerprint_change"
FINGERPRINT_MISMATCH: Final = "fingerprint_mismatch"
SCALE_CONDITIONAL: Final = "scale_conditional_anomaly"
# host integrity
FILE_INTEGRITY: Final = "file_integrity"
FOREIGN_PROCESS: Final = "foreign_process"


@dataclass(frozen=True, slots=True)
class KindInfo:
    """What an alert kind means: default severity, the threats it addresses, one line for humans."""

    severity: str
    threats: tuple[str, ...]
    summary: str


KINDS: Final[dict[str, KindInfo]] = {
    XID: KindInfo(CRITICAL, ("health",), "NVIDIA XID error reported by the driver"),
    ECC_UNCORRECTED: KindInfo(CRITICAL, ("health",), "uncorrectable (double-bit) ECC errors"),
    ROW_REMAP_FAILURE: KindInfo(CRITICAL, ("health",), "HBM row remapping failed; the GPU needs service"),
    RETIRED_PAGES: KindInfo(WARNING, ("health",), "new retired pages / remapped rows"),
    THERMAL_THROTTLE: KindInfo(WARNING, ("health", "T3"), "clocks held down by a thermal slowdown"),
    POWER_THROTTLE: KindInfo(WARNING, ("health", "T3"), "clocks held down by HW slowdown or power brake"),
    GPU_LOST: KindInfo(CRITICAL, ("health", "T6"), "GPU fell off the bus"),
    GPU_ERROR: KindInfo(WARNING, ("health",), "GPU readings keep failing"),
    PEER_OUTLIER: KindInfo(WARNING, ("T3", "T6", "health"), "host or GPU departs from its job's peers"),
    TRAIN_NONFINITE: KindInfo(CRITICAL, ("T4", "T1"), "NaN/Inf loss or grad norm"),
    LOSS_SPIKE: KindInfo(WARNING, ("T4", "T1"), "loss jumped far above its recent level"),
    LOSS_DIVERGENCE: KindInfo(CRITICAL, ("T4", "T1"), "loss trends upward away from its best level"),
    GRAD_EXPLOSION: KindInfo(WARNING, ("T4",), "grad norm far above its recent level"),
    STRAGGLER: KindInfo(WARNING, ("T3",), "rank steps slower than its peers"),
    HANG: KindInfo(CRITICAL, ("T3", "T6"), "steps stopped while processes live"),
    THROUGHPUT_DROP: KindInfo(WARNING, ("T3", "T1"), "job throughput fell below its baseline"),
    RANK_EXIT: KindInfo(WARNING, ("T6",), "a rank's process left its GPU while the job went on"),
    PARAM_CHECKSUM_MISMATCH: KindInfo(CRITICAL, ("T4", "T9", "T1"), "replicas disagree on parameters"),
    FINGERPRINT_CHANGE: KindInfo(CRITICAL, ("T1", "T2"), "code/config/seed fingerprint changed mid-run"),
    FINGERPRINT_MISMATCH: KindInfo(CRITICAL, ("T1", "T2"), "ranks of one job run different code/config"),
    SCALE_CONDITIONAL: KindInfo(WARNING, ("T5",), "an anomaly appears only in jobs above a size threshold"),
    FILE_INTEGRITY: KindInfo(WARNING, ("T1", "T7", "T9"), "a watched or packaged file changed"),
    FOREIGN_PROCESS: KindInfo(CRITICAL, ("T10", "T7", "T3"), "a process on a job's GPU is not a rank of the job"),
}
ALERT_KINDS: Final[tuple[str, ...]] = tuple(KINDS)


def dedup_key(kind: str, *scope: object) -> str:
    """`kind:scope1:scope2...`; None becomes '-'. One key = one alert row, updated in place."""
    return ":".join([kind, *("-" if s is None else str(s) for s in scope)])


def alert_id_for(key: str) -> str:
    """Stable id from the dedup key, so replaying the same data gives the same ids."""
    return "a" + hashlib.sha256(key.encode()).hexdigest()[:23]


def severity_max(a: str, b: str) -> str:
    """The higher of two severities (unknown text ranks lowest)."""
    return a if _SEVERITY_RANK.get(a, 0) >= _SEVERITY_RANK.get(b, 0) else b


@dataclass(slots=True)
class Alert:
    """One alert row; timestamps are unix ns. `onset_ns` is on the reporting host's clock."""

    alert_id: str
    kind: str
    severity: str
    state: str
    host: str | None
    gpu_index: int | None
    job_id: str | None
    rank: int | None
    onset_ns: int
    detected_ns: int
    evidence: dict[str, Any]
    dedup_key: str
    updated_ns: int
    # True when the evidence came from simulated GPUs (demo fleets, fleet-sim); None = not known
    # (rows stored before schema version 2 whose host the store never saw).
    simulated: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (evidence kept as an object)."""
        return {
            "alert_id": self.alert_id,
            "kind": self.kind,
            "severity": self.severity,
            "state": self.state,
            "host": self.host,
            "gpu_index": self.gpu_index,
            "job_id": self.job_id,
            "rank": self.rank,
            "onset_ns": self.onset_ns,
            "detected_ns": self.detected_ns,
            "evidence": self.evidence,
            "dedup_key": self.dedup_key,
            "updated_ns": self.updated_ns,
            "simulated": self.simulated,
        }


def _clean(value: Any) -> Any:
    """Evidence as strict JSON: NaN/Inf become strings, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def evidence_json(evidence: dict[str, Any]) -> str:
    """Stable JSON text of an evidence dict, as stored."""
    return json.dumps(_clean(evidence), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass
class AlertBook:
    """Alerts by dedup key, with the rule for when a change is worth emitting again.

    A raise on an open alert refreshes its evidence; the change is emitted when the severity
    rises, the state changes, or `min_update_ns` passed since the last emission with changed
    evidence. A resolved alert that fires again re-opens (same row); an acknowledged one stays
    acknowledged while its condition persists.

    `simulated_of`, when set, labels each alert as it is taken (`take_changed`): whether the data
    behind it now comes from simulated GPUs (a host name that moves to real hardware makes its
    next update real).
    """

    min_update_ns: int = 10_000_000_000
    alerts: dict[str, Alert] = field(default_factory=dict)
    simulated_of: Callable[[Alert], bool] | None = None
    _changed: dict[str, Alert] = field(default_factory=dict)
    _last_emit: dict[str, int] = field(default_factory=dict)
    _active: dict[str, int] = field(default_factory=dict)  # key -> last time its condition held
    _dirty: set[str] = field(default_factory=set)  # evidence changed, emission held back by min_update_ns

    def raise_(
        self,
        kind: str,
        now_ns: int,
        onset_ns: int,
        evidence: dict[str, Any],
        *,
        key: str,
        severity: str | None = None,
        host: str | None = None,
        gpu_index: int | None = None,
        job_id: str | None = None,
        rank: int | None = None,
    ) -> Alert:
        """Open (or refresh) the alert for `key`; returns the alert."""
        sev = severity or KINDS[kind].severity
        self._active[key] = now_ns
        a = self.alerts.get(key)
        if a is None:
            a = Alert(
                alert_id_for(key), kind, sev, OPEN, host, gpu_index, job_id, rank,
                int(onset_ns), int(now_ns), dict(evidence), key, int(now_ns),
            )
            self.alerts[key] = a
            self._emit(a, now_ns)
            return a
        if a.state == RESOLVED:
            a.state = OPEN
            a.severity = sev
            a.onset_ns = int(onset_ns)
            a.detected_ns = int(now_ns)
            a.evidence = dict(evidence)
            a.host, a.gpu_index, a.job_id, a.rank = host, gpu_index, job_id, rank
            a.updated_ns = int(now_ns)
            self._emit(a, now_ns)
            return a
        important = severity_max(sev, a.severity) != a.severity
        if important:
            a.severity = sev
        if evidence != a.evidence:
            a.evidence = dict(evidence)
            if now_ns - self._last_emit.get(key, 0) >= self.min_update_ns:
                important = True
            else:
                self._dirty.add(key)
        if important:
            a.updated_ns = int(now_ns)
            self._emit(a, now_ns)
        return a

    def holds(self, key: str, now_ns: int) -> None:
        """The condition behind `key` still holds (keeps it from auto-resolving)."""
        if key in self.alerts:
            self._active[key] = now_ns

    def resolve(self, key: str, now_ns: int, reason: str = "condition cleared") -> Alert | None:
        """Mark resolved (if it is not already); returns the alert when it changed."""
        a = self.alerts.get(key)
        if a is None or a.state == RESOLVED:
            return None
        a.state = RESOLVED
        a.evidence = {**a.evidence, "resolved_reason": reason}
        a.updated_ns = int(now_ns)
        self._active.pop(key, None)
        self._emit(a, now_ns)
        return a

    def last_held(self, key: str) -> int:
        """When the condition behind `key` last held (raise_ or holds), or its last update."""
        a = self.alerts.get(key)
        return self._active.get(key, a.updated_ns if a is not None else 0)

    def resolve_stale(self, kinds: Iterable[str], quiet_ns: int, now_ns: int) -> None:
        """Resolve alerts of `kinds` whose condition has not held for `quiet_ns`."""
        ks = set(kinds)
        for key, a in list(self.alerts.items()):
            if a.kind in ks and a.state != RESOLVED and now_ns - self.last_held(key) >= quiet_ns:
                self.resolve(key, now_ns)

    def acknowledge(self, alert_id: str, now_ns: int) -> Alert | None:
        """Operator acknowledged: keep the row, stop treating it as new."""
        for a in self.alerts.values():
            if a.alert_id == alert_id and a.state == OPEN:
                a.state = ACKNOWLEDGED
                a.updated_ns = int(now_ns)
                self._emit(a, now_ns)
                return a
        return None

    def _emit(self, a: Alert, now_ns: int) -> None:
        self._changed[a.dedup_key] = a
        self._last_emit[a.dedup_key] = now_ns
        self._dirty.discard(a.dedup_key)

    def flush_due(self, now_ns: int) -> None:
        """Emit alerts whose held-back evidence update is now `min_update_ns` old."""
        for key in [k for k in self._dirty if now_ns - self._last_emit.get(k, 0) >= self.min_update_ns]:
            a = self.alerts[key]
            a.updated_ns = int(now_ns)
            self._emit(a, now_ns)

    def take_changed(self) -> list[Alert]:
        """Alerts changed since the last call (copies, so callers may keep them)."""
        if self.simulated_of is not None:
            for a in self._changed.values():
                a.simulated = self.simulated_of(a)
        out = [
            Alert(a.alert_id, a.kind, a.severity, a.state, a.host, a.gpu_index, a.job_id, a.rank, a.onset_ns,
                  a.detected_ns, dict(a.evidence), a.dedup_key, a.updated_ns, a.simulated)
            for a in self._changed.values()
        ]
        self._changed = {}
        return out


# -- storage ------------------------------------------------------------------------------------

ALERT_COLUMNS: Final[tuple[str, ...]] = (
    "alert_id", "kind", "severity", "state", "host", "gpu_index", "job_id", "rank",
    "onset_ts", "detected_ts", "evidence", "dedup_key", "updated_at", "simulated",
)


def alerts_to_arrow(alerts: Sequence[Alert]) -> Any:
    """A pyarrow.Table with the alerts table's columns, for one batched INSERT OR REPLACE."""
    import pyarrow as pa

    ts = pa.timestamp("us", tz="UTC")
    return pa.table(
        {
            "alert_id": pa.array([a.alert_id for a in alerts], pa.string()),
            "kind": pa.array([a.kind for a in alerts], pa.string()),
            "severity": pa.array([a.severity for a in alerts], pa.string()),
            "state": pa.array([a.state for a in alerts], pa.string()),
            "host": pa.array([a.host for a in alerts], pa.string()),
            "gpu_index": pa.array([a.gpu_index for a in alerts], pa.int16()),
            "job_id": pa.array([a.job_id for a in alerts], pa.string()),
            "rank": pa.array([a.rank for a in alerts], pa.int32()),
            "onset_ts": pa.array([a.onset_ns // 1000 if a.onset_ns else None for a in alerts], ts),
            "detected_ts": pa.array([a.detected_ns // 1000 for a in alerts], ts),
            "evidence": pa.array([evidence_json(a.evidence) for a in alerts], pa.string()),
            "dedup_key": pa.array([a.dedup_key for a in alerts], pa.string()),
            "updated_at": pa.array([a.updated_ns // 1000 for a in alerts], ts),
            "simulated": pa.array([a.simulated for a in alerts], pa.bool_()),
        }
    )


def upsert_alerts(con: Any, alerts: Sequence[Alert]) -> int:
    """Insert or update rows by alert_id on an open DuckDB connection; returns rows written.

    The store writer can call this inside its own transaction. The last version of a key in
    `alerts` wins. Creates the table (the store's DDL) if it is missing.
    """
    from console.store.schema import DDL

    if not alerts:
        return 0
    latest: dict[str, Alert] = {}
    for a in alerts:
        latest[a.dedup_key] = a
    table = alerts_to_arrow(list(latest.values()))
    con.execute(DDL["alerts"])
    con.register("_gpusoc_alerts_in", table)
    try:
        # DuckDB's INSERT OR REPLACE handles one conflict target; ids derive from dedup keys,
        # so deleting by id first keeps both unique columns consistent.
        con.execute("DELETE FROM alerts WHERE alert_id IN (SELECT alert_id FROM _gpusoc_alerts_in)")
        con.execute(f"INSERT INTO alerts ({', '.join(ALERT_COLUMNS)}) SELECT * FROM _gpusoc_alerts_in")
    finally:
        con.unregister("_gpusoc_alerts_in")
    return len(latest)


def _ns(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, dt.datetime):
        return int(value.timestamp() * 1_000_000) * 1000
    return int(value)


def query_alerts(
    query: Callable[[str, list[Any]], list[tuple[Any, ...]]], state: str | None = None, limit: int | None = None
) -> list[Alert]:
    """Stored alerts through any `query(sql, params) -> rows` (a file, or a live store's reader)."""
    has = query("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'main' AND table_name = 'alerts'", [])
    if not has or not has[0][0]:
        return []
    sim = query(HAS_SIMULATED_SQL, [])
    sim_col = "simulated" if sim and sim[0][0] else "NULL"
    sql = (
        "SELECT alert_id, kind, severity, state, host, gpu_index, job_id, rank, epoch_ns(onset_ts), "
        f"epoch_ns(detected_ts), evidence, dedup_key, epoch_ns(updated_at), {sim_col} FROM alerts"
    )
    params: list[Any] = []
    if state:
        sql += " WHERE state = ?"
        params.append(state)
    sql += " ORDER BY detected_ts DESC, alert_id"
    if limit:
        sql += f" LIMIT {int(limit)}"
    out = []
    for aid, kind, sev, st, host, gpu, job, rank, onset, det, ev, key, upd, simulated in query(sql, params):
        try:
            evidence = json.loads(ev) if ev else {}
        except (TypeError, ValueError):
            evidence = {"raw": str(ev)}
        out.append(Alert(
            str(aid), str(kind), str(sev), str(st), host, None if gpu is None else int(gpu), job,
            None if rank is None else int(rank), _ns(onset), _ns(det), evidence, str(key), _ns(upd),
            None if simulated is None else bool(simulated),
        ))
    return out


def read_alerts(db_path: str | Path, state: str | None = None, limit: int | None = None) -> list[Alert]:
    """Alerts stored in a DuckDB file (opened read-only), newest detection first."""
    import duckdb

    path = Path(db_path)
    if not path.exists():
        raise FileNotFoundError(f"no such database file: {path}")
    con = duckdb.connect(str(path), read_only=True)
    try:
        return query_alerts(lambda sql, params: con.execute(sql, params).fetchall(), state, limit)
    finally:
        con.close()


# Files written before schema version 2 have no alerts.simulated column: readers ask first.
HAS_SIMULATED_SQL: Final = (
    "SELECT count(*) FROM duckdb_columns() WHERE schema_name = 'main' AND table_name = 'alerts' "
    "AND column_name = 'simulated'"
)


def data_label(simulated: bool | None) -> str:
    """How tables show an alert's data source: SIMULATED, real, or - (not recorded)."""
    return "-" if simulated is None else ("SIMULATED" if simulated else "real")


def _fmt_ts(ns: int) -> str:
    if not ns:
        return "-"
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def format_alerts(alerts: Sequence[Alert], as_json: bool = False) -> str:
    """Alerts as JSON lines, or as a fixed-width table with a short evidence summary."""
    if as_json:
        return "\n".join(json.dumps(_clean(a.to_dict()), sort_keys=True) for a in alerts)
    if not alerts:
        return "no alerts"
    header = ("detected", "severity", "state", "kind", "host", "gpu", "job", "rank", "data", "evidence")
    rows = []
    for a in alerts:
        ev = evidence_json(a.evidence)
        rows.append((
            _fmt_ts(a.detected_ns), a.severity, a.state, a.kind, a.host or "-",
            "-" if a.gpu_index is None else str(a.gpu_index), a.job_id or "-",
            "-" if a.rank is None else str(a.rank), data_label(a.simulated),
            ev if len(ev) <= 100 else ev[:97] + "...",
        ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def list_alerts(db_path: str | Path, json: bool = False, state: str | None = None, limit: int | None = None) -> str:
    """Text for `gpusoc-console alerts --db PATH [--json]`: the stored alerts table, read-only."""
    return format_alerts(read_alerts(db_path, state=state, limit=limit), as_json=json)
