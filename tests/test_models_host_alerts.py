"""HostDrilldownModel (history then live), AlertsModel (store rows, state filter), EventsLogModel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import duckdb
import numpy as np
import pytest

from console.models.alerts import AlertsModel, EventRow, EventsLogModel, severity_level
from console.models.host import HostDrilldownModel
from protos.types import GPU_LOST, GPU_OK, METRIC_INDEX, METRIC_NAMES, N_METRICS, Event, Frame, GpuProcess

T0 = 1_767_225_600 * 10**9
S = 10**9

DDL = f"""
CREATE TABLE gpu_samples (host VARCHAR, epoch VARCHAR, seq BIGINT, ts TIMESTAMPTZ, gpu_index SMALLINT,
    gpu_state VARCHAR, simulated BOOLEAN, {", ".join(f"{m} REAL" for m in METRIC_NAMES)});
CREATE TABLE events (host VARCHAR, epoch VARCHAR, seq BIGINT, ts TIMESTAMPTZ, kind VARCHAR, severity VARCHAR,
    gpu_index SMALLINT, pid BIGINT, detail VARCHAR, attrs VARCHAR, simulated BOOLEAN);
CREATE TABLE alerts (alert_id VARCHAR, kind VARCHAR, severity VARCHAR, state VARCHAR, host VARCHAR,
    gpu_index SMALLINT, job_id VARCHAR, rank INTEGER, onset_ts TIMESTAMPTZ, detected_ts TIMESTAMPTZ,
    evidence VARCHAR, dedup_key VARCHAR, updated_at TIMESTAMPTZ);
"""

Query = Callable[[str, list[object]], list[tuple[Any, ...]]]


def make_db() -> tuple[duckdb.DuckDBPyConnection, Query]:
    con = duckdb.connect()
    con.execute(DDL)
    return con, lambda sql, params: con.cursor().execute(sql, params).fetchall()


def insert_gpu(con: duckdb.DuckDBPyConnection, host: str, seconds: range, n_gpus: int = 2) -> None:
    cols = ", ".join("?" for _ in METRIC_NAMES)
    rows = []
    for s in seconds:
        for g in range(n_gpus):
            vals = [float(s * 10 + g)] * len(METRIC_NAMES)
            rows.append([host, "e1", s + 1, (T0 + s * S) // 1000, g, "ok", True, *vals])
    con.executemany(
        f"INSERT INTO gpu_samples VALUES (?, ?, ?, make_timestamptz(?::BIGINT), ?, ?, ?, {cols})", rows
    )


def gpu_frame(host: str, second: int, n_gpus: int = 2, events: list[Event] | None = None,
              processes: list[GpuProcess] | None = None, states: list[int] | None = None) -> Frame:
    values = np.zeros((n_gpus, N_METRICS), np.float32)
    for g in range(n_gpus):
        values[g, :] = second * 10 + g
    return Frame(host, "e1", second + 1, T0 + second * S, False, values, list(range(n_gpus)),
                 states or [GPU_OK] * n_gpus, processes or [], [], events or [])


# ---- host drilldown ----


def test_drilldown_history_then_live() -> None:
    con, query = make_db()
    insert_gpu(con, "h1", range(0, 20))
    insert_gpu(con, "h2", range(0, 20))
    con.execute("INSERT INTO events VALUES ('h1', 'e1', 5, make_timestamptz(?::BIGINT), 'xid', 'critical', 1, 7, "
                "'XID 79', '{}', true)", [(T0 + 5 * S) // 1000])
    m = HostDrilldownModel(query, window_s=10.0)
    m.select_host("h1")
    m.on_frame(gpu_frame("h2", 20))  # other host: ignored
    assert m.gpus() == []
    assert m.load_history()
    assert m.history_loaded and m.gpus() == [0, 1]
    t, v = m.series(1)
    # The window is the 10 s back from the newest stored sample (t=19): seconds 10..19.
    assert t.tolist() == [(T0 + s * S) / 1e9 for s in range(10, 20)]
    assert v.shape == (10, 4)
    assert v[:, m.metrics.index("temp_c")].tolist() == [s * 10 + 1 for s in range(10, 20)]
    assert [e.detail for e in m.events()] == ["XID 79"]
    assert m.events()[0].severity == 3

    procs = [GpuProcess(1, 42, 512.0), GpuProcess(0, 41, 256.0)]
    ev = Event(T0 + 21 * S, "ecc", 2, 0, 0, "DBE")
    m.on_frame(gpu_frame("h1", 20))
    m.on_frame(gpu_frame("h1", 20))  # redelivered
    m.on_frame(gpu_frame("h1", 21, events=[ev], processes=procs, states=[GPU_OK, GPU_LOST]))
    t, v = m.series(0)
    assert t[-2:].tolist() == [(T0 + 20 * S) / 1e9, (T0 + 21 * S) / 1e9]
    assert t.size == 10  # still the last 10 s window: seconds 12..21
    assert [(p.gpu_index, p.pid) for p in m.processes()] == [(0, 41), (1, 42)]
    assert [p.pid for p in m.processes(1)] == [42]
    assert [e.kind for e in m.events()] == ["ecc", "xid"]
    assert m.gpu_state(1) == GPU_LOST
    assert m.last_frame_ns == T0 + 21 * S


def test_drilldown_live_first_then_history_merges_without_duplicates() -> None:
    con, query = make_db()
    insert_gpu(con, "h1", range(0, 10))
    m = HostDrilldownModel(query, metrics=("gpu_util_pct", "power_w"), window_s=60.0)
    m.select_host("h1")
    for s in (9, 10, 11):  # second 9 is also stored
        m.on_frame(gpu_frame("h1", s))
    hist = m.fetch_history("h1")
    assert m.apply_history(hist)
    t, v = m.series(0)
    assert t.tolist() == [(T0 + s * S) / 1e9 for s in range(0, 12)]
    assert v[:, 1].tolist() == [s * 10.0 for s in range(0, 12)]


def test_drilldown_stale_history_and_bad_metrics() -> None:
    con, query = make_db()
    insert_gpu(con, "h1", range(0, 3))
    m = HostDrilldownModel(query)
    m.select_host("h1")
    hist = m.fetch_history("h1")
    m.select_host("h2")
    assert not m.apply_history(hist)
    assert m.gpus() == []
    with pytest.raises(ValueError):
        HostDrilldownModel(query, metrics=("gpu_util_pct; DROP TABLE x",))
    # An explicit end time bounds the window too.
    m.select_host("h1")
    hist = m.fetch_history("h1", until_ns=T0 + 1 * S)
    assert hist.rows[0][:, 0].tolist() == [T0 / 1e9, (T0 + S) / 1e9]


def test_drilldown_capacity_bound() -> None:
    m = HostDrilldownModel(None, capacity=50, window_s=1e9)
    m.select_host("h1")
    for s in range(120):
        m.on_frame(gpu_frame("h1", s))
    t, _ = m.series(0)
    assert t.size == 50 and t[-1] == (T0 + 119 * S) / 1e9
    assert METRIC_INDEX["gpu_util_pct"] == 0


# ---- alerts ----


def insert_alert(con: duckdb.DuckDBPyConnection, aid: str, state: str, severity: str, detected_s: int) -> None:
    con.execute(
        "INSERT INTO alerts VALUES (?, 'straggler', ?, ?, 'h1', 3, 'job-a', 7, make_timestamptz(?::BIGINT), "
        "make_timestamptz(?::BIGINT), '{\"ratio\": 1.5}', ?, make_timestamptz(?::BIGINT))",
        [aid, severity, state, (T0 + (detected_s - 5) * S) // 1000, (T0 + detected_s * S) // 1000, aid,
         (T0 + detected_s * S) // 1000],
    )


def test_alerts_fetch_filter_and_states() -> None:
    con, query = make_db()
    insert_alert(con, "a1", "open", "critical", 10)
    insert_alert(con, "a2", "resolved", "warning", 20)
    insert_alert(con, "a3", "open", "2", 30)
    m = AlertsModel(query)
    assert not m.refreshed
    m.refresh()
    assert m.refreshed
    assert [r.alert_id for r in m.rows()] == ["a3", "a2", "a1"]
    a1 = m.rows()[-1]
    assert a1.severity == 3 and a1.severity_name == "critical"
    assert a1.gpu_index == 3 and a1.rank == 7 and a1.job_id == "job-a"
    assert a1.detected_ns == T0 + 10 * S and a1.onset_ns == T0 + 5 * S
    assert "ratio" in a1.evidence
    assert m.rows()[0].severity == 2

    v = m.version
    m.set_state_filter("open")
    assert m.version > v
    assert [r.alert_id for r in m.rows()] == ["a3", "a1"]  # in memory, before any refetch
    rows = m.fetch("resolved")
    assert [r.alert_id for r in rows] == ["a2"]
    m.set_state_filter(None)
    assert m.states() == ["open", "acknowledged", "resolved"]


def test_severity_level_parsing() -> None:
    assert severity_level(3) == 3
    assert severity_level("critical") == 3
    assert severity_level("WARN") == 2
    assert severity_level("1") == 1
    assert severity_level("bogus") == 0
    assert severity_level(None) == 0
    assert severity_level(True) == 0


# ---- events log ----


def test_events_log_newest_first_bounded_filtered() -> None:
    m = EventsLogModel(max_rows=5)
    for s in range(4):
        evs = [Event(T0 + s * S, "proc_start", 1, 0, 100 + s, f"start {s}"),
               Event(T0 + s * S + 1, "xid", 3 if s == 2 else 2, 1, 0, f"xid {s}")]
        m.on_frame(gpu_frame(f"h{s % 2}", s, events=evs))
    assert len(m) == 5
    rows = m.rows()
    assert [r.detail for r in rows] == ["xid 3", "start 3", "xid 2", "start 2", "xid 1"]
    m.set_min_severity(3)
    assert [r.detail for r in m.rows()] == ["xid 2"]
    m.set_min_severity(0)
    m.set_host_filter("h1")
    assert {r.host for r in m.rows()} == {"h1"}
    m.set_host_filter(None)
    m.clear()
    assert m.rows() == []


def test_events_log_history_behind_live() -> None:
    con, query = make_db()
    for s in range(3):
        con.execute("INSERT INTO events VALUES ('h1', 'e1', ?, make_timestamptz(?::BIGINT), 'xid', 'warning', 0, 0, "
                    "?, '{}', false)", [s, (T0 + s * S) // 1000, f"stored {s}"])
    m = EventsLogModel(query, max_rows=10)
    m.on_frame(gpu_frame("h1", 2, events=[Event(T0 + 2 * S + 500, "xid", 2, 0, 0, "stored 2")]))
    m.on_frame(gpu_frame("h1", 3, events=[Event(T0 + 3 * S, "xid", 2, 0, 0, "live 3")]))
    m.apply_history(m.fetch_history())
    assert [r.detail for r in m.rows()] == ["live 3", "stored 2", "stored 1", "stored 0"]
    assert isinstance(m.rows()[-1], EventRow) and m.rows()[-1].severity_name == "warning"
