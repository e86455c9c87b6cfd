"""alerts.simulated: detection labels alerts from simulated data, the store keeps the label, a
schema-1 file migrates (old rows labelled from `hosts`, never guessed), and every reader shows it."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest

from console.detect import DetectionEngine, read_alerts, upsert_alerts
from console.detect import alerts as K
from console.detect.alerts import Alert, format_alerts
from console.detect.state import DetectConfig, DetectState
from console.models.alerts import AlertsModel
from console.store.export import export_db
from console.store.schema import DDL, SCHEMA_VERSION, TABLES, ensure_schema, read_schema_version
from protos.types import METRIC_NAMES, SEVERITY_CRITICAL, Event, Frame, TrainRecord

NS = 1_000_000_000
T0 = 1_700_000_000 * NS


def _xid_frame(host: str, simulated: bool, seq: int = 1) -> Frame:
    v = np.zeros((1, len(METRIC_NAMES)), np.float32)
    ev = Event(T0, "xid", SEVERITY_CRITICAL, 0, 0, "XID 79", {"xid": "79"})
    return Frame(host, "e", seq, T0, simulated, v, [0], [1], events=[ev])


def test_engine_labels_alerts_by_the_frames_behind_them() -> None:
    eng = DetectionEngine()
    eng.on_frame(_xid_frame("sim-host", True))
    eng.on_frame(_xid_frame("real-host", False))
    out = {a.host: a for a in eng.evaluate(T0 + NS)}
    assert out["sim-host"].kind == K.XID and out["sim-host"].simulated is True
    assert out["real-host"].simulated is False
    assert out["sim-host"].to_dict()["simulated"] is True


def test_job_and_fleet_wide_alerts_follow_their_jobs_and_hosts() -> None:
    eng = DetectionEngine()
    rec = TrainRecord(T0, "job-sim", 0, 0, 1, 4242, 1000, 1, loss=1.0)
    v = np.zeros((1, len(METRIC_NAMES)), np.float32)
    eng.on_frame(Frame("h1", "e", 1, T0, True, v, [0], [1], train=[rec]))
    eng.evaluate(T0 + NS)
    st: DetectState = eng.state
    assert "job-sim" in st.jobs and st.hosts["h1"].simulated

    def alert(host: str | None, job: str | None) -> Alert:
        return Alert("a", K.XID, "critical", K.OPEN, host, None, job, None, T0, T0, {}, "k", T0)

    assert st.alert_is_simulated(alert(None, "job-sim"))
    assert st.alert_is_simulated(alert(None, None))  # every host seen is simulated
    assert not st.alert_is_simulated(alert("unknown-host", None))
    eng.on_frame(_xid_frame("real-host", False))
    eng.evaluate(T0 + 2 * NS)
    assert not st.alert_is_simulated(alert(None, None))  # a mixed fleet: not labelled simulated


def test_label_follows_the_newest_data_of_a_host() -> None:
    """A host name that ran simulated and comes back on real hardware: its real alerts say real."""
    eng = DetectionEngine()
    eng.on_frame(_xid_frame("gpu-07", True))
    (first,) = eng.evaluate(T0 + NS)
    assert first.simulated is True
    v = np.zeros((1, len(METRIC_NAMES)), np.float32)
    ev = Event(T0 + 20 * NS, "xid", SEVERITY_CRITICAL, 0, 0, "XID 48", {"xid": "48"})
    eng.on_frame(Frame("gpu-07", "real-epoch", 1, T0 + 20 * NS, False, v, [0], [1], events=[ev]))
    changed = eng.evaluate(T0 + 21 * NS)
    assert changed and all(a.simulated is False for a in changed)


def _v1_store(path: Path) -> None:
    """A store as schema version 1 wrote it: alerts without `simulated`."""
    con = duckdb.connect(str(path))
    for t in TABLES:
        ddl = DDL[t]
        if t == "alerts":
            ddl = ddl.replace(",\n    simulated BOOLEAN", "")
            assert "simulated" not in ddl
        con.execute(ddl)
    con.execute("INSERT INTO meta VALUES ('schema_version', '1'), ('created_at', '2026-01-01T00:00:00+00:00')")
    con.execute("INSERT INTO hosts (host, simulated) VALUES ('sim', true), ('real', false)")
    for i, host in enumerate(("sim", "real", "gone", None)):
        con.execute(
            "INSERT INTO alerts (alert_id, kind, severity, state, host, detected_ts, dedup_key, updated_at) "
            "VALUES (?, 'xid', 'critical', 'open', ?, now() - INTERVAL (?) SECOND, ?, now())",
            [f"a{i}", host, i, f"k{i}"],
        )
    con.close()


def test_schema_1_file_reads_as_unknown_and_offline_export_keeps_its_version(tmp_path: Path) -> None:
    db = tmp_path / "v1.duckdb"
    _v1_store(db)
    assert {a.alert_id: a.simulated for a in read_alerts(db)} == {"a0": None, "a1": None, "a2": None, "a3": None}
    con = duckdb.connect(str(db), read_only=True)
    rows = AlertsModel(lambda sql, params: con.execute(sql, params).fetchall()).fetch()
    con.close()
    assert {r.data_label for r in rows} == {"-"}
    out = tmp_path / "v1-export.duckdb"
    summary = export_db(db, out)
    assert summary["schema_version"] == 1
    con = duckdb.connect(str(out), read_only=True)
    assert read_schema_version(con) == 1
    con.close()


def test_opening_a_schema_1_store_migrates_it_from_what_the_file_knows(tmp_path: Path) -> None:
    db = tmp_path / "v1.duckdb"
    _v1_store(db)
    con = duckdb.connect(str(db))
    assert ensure_schema(con) == SCHEMA_VERSION == 2
    got = dict(con.execute("SELECT alert_id, simulated FROM alerts").fetchall())
    meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
    assert ensure_schema(con) == 2  # idempotent
    con.close()
    assert got == {"a0": True, "a1": False, "a2": None, "a3": None}
    assert meta["schema_version"] == "2" and "migrated_from_1" in meta


def test_store_round_trip_and_every_reader_shows_the_label(tmp_path: Path) -> None:
    db = tmp_path / "store.duckdb"
    con = duckdb.connect(str(db))
    ensure_schema(con)
    eng = DetectionEngine(config=DetectConfig())
    eng.on_frame(_xid_frame("sim-host", True))
    eng.on_frame(_xid_frame("real-host", False))
    upsert_alerts(con, eng.evaluate(T0 + NS))
    rows = AlertsModel(lambda sql, params: con.execute(sql, params).fetchall()).fetch()
    con.close()
    assert {r.host: r.data_label for r in rows} == {"sim-host": "SIMULATED", "real-host": "real"}
    stored = read_alerts(db)
    assert {a.host: a.simulated for a in stored} == {"sim-host": True, "real-host": False}
    table = format_alerts(stored)
    header, *lines = table.splitlines()
    col = header.index("data")  # fixed-width columns: the label sits under its header
    by_host = {("sim-host" if "sim-host" in line else "real-host"): line[col:].split()[0] for line in lines}
    assert by_host == {"sim-host": "SIMULATED", "real-host": "real"}
    as_json = [json.loads(x) for x in format_alerts(stored, as_json=True).splitlines()]
    assert {x["host"]: x["simulated"] for x in as_json} == {"sim-host": True, "real-host": False}


def test_detect_store_into_a_schema_1_file_migrates_it_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import console.detect.engine as engine_mod

    db = tmp_path / "v1.duckdb"
    _v1_store(db)
    found = [Alert("n1", K.XID, "critical", K.OPEN, "sim", 0, None, None, T0, T0, {}, "new", T0, True)]
    monkeypatch.setattr(engine_mod, "replay_db", lambda *a, **k: found)
    engine_mod.detect_file(db, store=True)
    assert {a.alert_id: a.simulated for a in read_alerts(db)}["n1"] is True


def test_an_unstamped_file_with_an_old_alerts_table_gains_the_column(tmp_path: Path) -> None:
    db = tmp_path / "unstamped.duckdb"
    _v1_store(db)
    con = duckdb.connect(str(db))
    con.execute("DELETE FROM meta")  # tables, but no schema_version
    assert ensure_schema(con) == 2
    upsert_alerts(con, [Alert("n", K.XID, "critical", K.OPEN, "sim", 0, None, None, T0, T0, {}, "new", T0, True)])
    got = dict(con.execute("SELECT alert_id, simulated FROM alerts").fetchall())
    assert read_schema_version(con) == 2
    con.close()
    assert got["n"] is True and got["a0"] is True and got["a2"] is None
