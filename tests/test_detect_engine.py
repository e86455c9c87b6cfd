"""DetectionEngine: dedup and alert lifecycle, clock skew, sink behaviour, storage and offline replay."""

from __future__ import annotations

import json
import math
import sys
import threading
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from test_detect_rules import NS, T0, MiniFleet, warm

from console.detect import (
    Alert,
    AlertBook,
    DetectionEngine,
    alerts_to_arrow,
    detect_file,
    list_alerts,
    read_alerts,
    replay_db,
    upsert_alerts,
)
from console.detect import alerts as K
from console.ingest.sink import CONNECTED, DISCONNECTED, HostStatus, IngestSink
from protos.types import (
    GPU_STATE_NAMES,
    METRIC_INDEX,
    METRIC_NAMES,
    SEVERITY_CRITICAL,
    SEVERITY_NAMES,
    Event,
    Frame,
    Gap,
    TrainRecord,
)

C = METRIC_INDEX


def _throttle(v: np.ndarray) -> None:
    v[0, C["throttle_reasons"]] = 0x40


def test_engine_is_an_ingest_sink() -> None:
    sink: IngestSink = DetectionEngine()
    assert sink is not None


def test_persistent_condition_updates_one_alert_without_flooding() -> None:
    fl = warm(MiniFleet())
    fl.on_values[0] = _throttle
    fl.tick(30)
    keys = [a.dedup_key for a in fl.emitted if a.kind == K.THERMAL_THROTTLE]
    assert set(keys) == {"thermal_throttle:h00:0"}
    assert 2 <= len(keys) <= 4  # opened, then refreshed at most every min_update_s (10 s)
    assert len(fl.of(K.THERMAL_THROTTLE)) == 1


def test_resolved_alert_reopens_with_same_id_and_ack_sticks() -> None:
    fl = warm(MiniFleet())
    fl.on_values[0] = _throttle
    fl.tick(3)
    (a,) = fl.of(K.THERMAL_THROTTLE)
    first_id = a.alert_id
    del fl.on_values[0]
    fl.tick(65)
    assert fl.of(K.THERMAL_THROTTLE)[0].state == K.RESOLVED
    fl.on_values[0] = _throttle
    fl.tick(3)
    (b,) = fl.of(K.THERMAL_THROTTLE)
    assert b.state == K.OPEN and b.alert_id == first_id
    acked = fl.eng.acknowledge(first_id, T0 + fl.t * NS)
    assert acked is not None and acked.state == K.ACKNOWLEDGED
    fl.tick(20)
    assert fl.eng.alerts()[0].state == K.ACKNOWLEDGED
    res = fl.eng.resolve(first_id, T0 + fl.t * NS)
    assert res is not None and res.state == K.RESOLVED and res.evidence["resolved_reason"] == "operator"


def test_on_alert_callback_gets_changes_and_failures_do_not_stop_detection() -> None:
    seen: list[Alert] = []

    def cb(a: Alert) -> None:
        seen.append(a)
        raise RuntimeError("consumer broke")

    eng = DetectionEngine(on_alert=cb)
    v = np.zeros((2, len(METRIC_NAMES)), np.float32)
    fr = Frame("h", "e", 1, T0, True, v, [0, 1], [1, 1],
               events=[Event(T0, "xid", SEVERITY_CRITICAL, 0, 0, "XID 48", {"xid": "48"})])
    eng.on_frame(fr)
    out = eng.evaluate(T0 + NS)
    assert [a.kind for a in out] == [K.XID] and seen == out


def test_duplicate_frames_are_ignored() -> None:
    eng = DetectionEngine()
    v = np.zeros((1, len(METRIC_NAMES)), np.float32)
    ev = Event(T0, "xid", SEVERITY_CRITICAL, 0, 0, "XID 48", {"xid": "48"})
    for _ in range(3):
        eng.on_frame(Frame("h", "e", 7, T0, True, v, [0], [1], events=[ev]))
    eng.evaluate(T0 + NS)
    assert eng.alerts()[0].evidence["count"] == 1 and eng.stats()["frames"] == 1


def test_gap_restarts_persistence() -> None:
    fl = warm(MiniFleet())
    fl.on_values[0] = _throttle
    fl.tick(2)
    fl.eng.on_gap("h00", Gap("ep", 1, 2, "buffer overflow"))
    fl.tick(2)
    assert not fl.of(K.THERMAL_THROTTLE)
    fl.tick()
    assert fl.of(K.THERMAL_THROTTLE)


def test_disconnected_host_leaves_peer_rules_and_keeps_its_alerts_open() -> None:
    fl = warm(MiniFleet(n_hosts=6))
    fl.on_values[0] = _throttle
    fl.tick(3)
    assert fl.of(K.THERMAL_THROTTLE, K.OPEN)
    fl.eng.on_status(HostStatus("127.0.0.1:1", "h00", DISCONNECTED))
    real = fl.n_hosts
    fl.n_hosts = 0  # nothing arrives any more
    fl.tick(90)
    assert fl.of(K.THERMAL_THROTTLE, K.OPEN)  # no news is not a resolution
    fl.n_hosts = real
    fl.eng.on_status(HostStatus("127.0.0.1:1", "h00", CONNECTED))
    assert fl.eng.state.fresh_slots().sum() == 0


@pytest.mark.parametrize("skew", [3.0, 9.0])
def test_detection_works_under_clock_skew(skew: float) -> None:
    fl = warm(MiniFleet(n_hosts=8, skew_s=skew, seed=5), 60)
    assert max(fl.skews) - min(fl.skews) > skew * NS / 2
    fl.frozen.add(6)  # hang: stall measured on host 6's own clock
    fl.on_values[2] = lambda v: v.__setitem__((slice(None), C["gpu_util_pct"]), 40)
    fl.tick(8)
    kinds = {(a.kind, a.host) for a in fl.alerts.values()}
    assert (K.HANG, "h06") in kinds and (K.PEER_OUTLIER, "h02") in kinds
    hang = next(a for a in fl.alerts.values() if a.kind == K.HANG)
    assert 3 < hang.evidence["stall_s"] < 10


def test_on_frame_from_another_thread_while_evaluating() -> None:
    fl = MiniFleet(n_hosts=4)
    frames = []
    for _ in range(30):
        fl.t += 1
        for job in fl.all_jobs:
            fl.progress[job.job_id] = fl.progress.get(job.job_id, 0.0) + 1
        frames += [fl.frame(h) for h in range(4)]
    eng = DetectionEngine()

    def feed() -> None:
        for fr in frames:
            eng.on_frame(fr)

    t = threading.Thread(target=feed)
    t.start()
    for k in range(50):
        eng.evaluate(T0 + k * NS)
    t.join()
    eng.evaluate(T0 + 60 * NS)
    assert eng.stats()["frames"] == len(frames) and eng.pending() == 0


def test_silent_ranks_and_ended_jobs_are_forgotten_and_detection_goes_on() -> None:
    from test_detect_rules import Job

    fl = MiniFleet(n_hosts=4, jobs=[Job("old", [0, 1, 2, 3], 4), Job("new", [0, 1, 2, 3], 4, start=10**6)])
    warm(fl, 30)
    assert fl.eng.state.ranks.n == 16
    for h in range(4):
        fl.events[h] = [Event(0, "process_exit", 1, g, fl.pid(fl.all_jobs[0], h, g), "exit") for g in range(4)]
        fl.stopped.update((h, g) for g in range(4))
    fl.tick(1300)
    assert fl.eng.state.ranks.n == 0 and fl.eng.state.jobs == {}
    fl.stopped.clear()
    fl.all_jobs[0].hosts = []
    fl.all_jobs[1].start = fl.t
    fl.tick(40)
    assert fl.eng.state.ranks.n == 16 and set(fl.eng.state.jobs) == {"new"}
    fl.on_record[2] = lambda r: TrainRecord(r.ts_unix_ns, r.job_id, r.rank, r.local_rank, r.world_size, r.pid, r.uid,
                                            r.step, loss=math.inf, extra=r.extra)
    fl.tick()
    assert [a.job_id for a in fl.of(K.TRAIN_NONFINITE)] == ["new"]
    assert not [a for a in fl.alerts.values() if a.kind != K.TRAIN_NONFINITE]


def test_alert_book_emission_rules() -> None:
    book = AlertBook(min_update_ns=10 * NS)
    a = book.raise_(K.XID, T0, T0, {"n": 1}, key="k")
    assert [x.alert_id for x in book.take_changed()] == [a.alert_id]
    book.raise_(K.XID, T0 + NS, T0, {"n": 2}, key="k")
    assert book.take_changed() == []
    book.flush_due(T0 + 11 * NS)
    (b,) = book.take_changed()
    assert b.evidence == {"n": 2} and b.updated_ns == T0 + 11 * NS
    book.raise_(K.XID, T0 + 12 * NS, T0, {"n": 2}, key="k", severity=K.CRITICAL)
    assert book.take_changed() == []  # same severity (xid default is critical), same evidence
    assert K.dedup_key(K.PEER_OUTLIER, "h1", None) == "peer_outlier:h1:-"


# -- storage ---------------------------------------------------------------------------------------------


def _sample_alerts() -> list[Alert]:
    book = AlertBook()
    book.raise_(K.XID, T0 + NS, T0, {"xid": 79, "ratio": math.nan}, key="xid:h1:0:79", host="h1", gpu_index=0)
    book.raise_(K.PARAM_CHECKSUM_MISMATCH, T0 + 2 * NS, T0 + NS, {"step": 10}, key="param:j", job_id="j", rank=3)
    return book.take_changed()


def _store(tmp_path: Path) -> Path:
    from console.store.schema import ensure_schema

    db = tmp_path / "store.duckdb"
    con = duckdb.connect(str(db))
    ensure_schema(con)
    con.close()
    return db


def test_alerts_to_arrow_matches_the_alerts_table(tmp_path: Path) -> None:
    db = _store(tmp_path)
    con = duckdb.connect(str(db))
    cols = [r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name='alerts' "
                                      "ORDER BY column_index").fetchall()]
    table = alerts_to_arrow(_sample_alerts())
    assert table.column_names == cols
    assert table.schema.field("onset_ts").type == pa.timestamp("us", tz="UTC")
    assert upsert_alerts(con, _sample_alerts()) == 2
    alerts = _sample_alerts()
    alerts[0].state = K.RESOLVED
    assert upsert_alerts(con, alerts) == 2  # same dedup keys: rows updated, not duplicated
    rows = con.execute("SELECT kind, state, evidence FROM alerts ORDER BY kind").fetchall()
    con.close()
    assert [(r[0], r[1]) for r in rows] == [(K.PARAM_CHECKSUM_MISMATCH, K.OPEN), (K.XID, K.RESOLVED)]
    assert json.loads(rows[1][2]) == {"xid": 79, "ratio": "nan"}


def test_list_alerts_text_and_json(tmp_path: Path) -> None:
    db = _store(tmp_path)
    con = duckdb.connect(str(db))
    upsert_alerts(con, _sample_alerts())
    con.close()
    text = list_alerts(db)
    assert "param_checksum_mismatch" in text.splitlines()[1] and "xid" in text and "detected" in text
    lines = [json.loads(x) for x in list_alerts(db, json=True).splitlines()]
    assert {x["kind"] for x in lines} == {K.XID, K.PARAM_CHECKSUM_MISMATCH}
    assert read_alerts(db, state="open")[0].detected_ns == T0 + 2 * NS
    empty = tmp_path / "empty.duckdb"
    duckdb.connect(str(empty)).close()
    assert list_alerts(empty) == "no alerts"


def _write_frames(db: Path, frames: list[Frame]) -> None:
    """A minimal stand-in for the store writer: frames into gpu_samples/train_samples/events."""
    ts = pa.timestamp("us", tz="UTC")
    con = duckdb.connect(str(db))
    g: dict[str, list[object]] = {k: [] for k in ("host", "epoch", "seq", "ts", "gpu_index", "gpu_state", "simulated")}
    m: dict[str, list[object]] = {name: [] for name in METRIC_NAMES}
    t: dict[str, list[object]] = {k: [] for k in ("host", "epoch", "seq", "ts", "job_id", "rank", "local_rank",
                                                  "world_size", "pid", "uid", "step", "kind", "loss", "grad_norm",
                                                  "lr", "tokens", "extra", "info", "simulated")}
    e: dict[str, list[object]] = {k: [] for k in ("host", "epoch", "seq", "ts", "kind", "severity", "gpu_index", "pid",
                                                  "detail", "attrs", "simulated")}

    def nn(x: float) -> float | None:
        return None if math.isnan(x) else x

    for fr in frames:
        for row, gi in enumerate(fr.gpu_index):
            for k, val in zip(("host", "epoch", "seq", "ts", "gpu_index", "gpu_state", "simulated"),
                              (fr.host, fr.epoch, fr.seq, fr.ts_unix_ns // 1000, gi,
                               GPU_STATE_NAMES[fr.gpu_state[row]], True), strict=True):
                g[k].append(val)
            for i, name in enumerate(METRIC_NAMES):
                m[name].append(nn(float(fr.gpu_values[row, i])))
        for r in fr.train:
            vals = (fr.host, fr.epoch, fr.seq, r.ts_unix_ns // 1000, r.job_id, r.rank, r.local_rank, r.world_size,
                    r.pid, r.uid, r.step, r.kind, nn(r.loss), nn(r.grad_norm), nn(r.lr), nn(r.tokens),
                    list(r.extra.items()), json.dumps(r.info), True)
            for k, val in zip(t, vals, strict=True):
                t[k].append(val)
        for ev in fr.events:
            vals2 = (fr.host, fr.epoch, fr.seq, ev.ts_unix_ns // 1000, ev.kind, SEVERITY_NAMES[ev.severity],
                     None if ev.gpu_index < 0 else ev.gpu_index, ev.pid or None, ev.detail, json.dumps(ev.attrs), True)
            for k, val in zip(e, vals2, strict=True):
                e[k].append(val)
    gt = pa.table({**{k: pa.array(v, ts if k == "ts" else None) for k, v in g.items()},
                   **{k: pa.array(v, pa.float32()) for k, v in m.items()}})
    tt = pa.table({k: pa.array(v, ts if k == "ts" else (pa.map_(pa.string(), pa.float64()) if k == "extra" else None))
                   for k, v in t.items()})
    et = pa.table({k: pa.array(v, ts if k == "ts" else None) for k, v in e.items()})
    for name, tbl in (("gpu_samples", gt), ("train_samples", tt), ("events", et)):
        con.register("src", tbl)
        con.execute(f"INSERT INTO {name} ({', '.join(tbl.column_names)}) SELECT * FROM src")
        con.unregister("src")
    con.close()


def test_replay_db_finds_the_same_faults_offline(tmp_path: Path) -> None:
    fl = MiniFleet(n_hosts=5, skew_s=4.0, seed=2)
    frames: list[Frame] = []
    for t in range(120):
        fl.t = t
        for job in fl.all_jobs:
            fl.progress[job.job_id] = fl.progress.get(job.job_id, 0.0) + 1
        if t == 60:
            fl.events[1] = [Event(0, "xid", SEVERITY_CRITICAL, 3, 0, "XID 94", {"xid": "94"}),
                            Event(0, "file_changed", SEVERITY_CRITICAL, -1, 0, "torch changed",
                                  {"path": "/x/site-packages/torch/__init__.py", "package": "torch"})]
            fl.frozen.add(4)
        if t == 80:
            for h in range(5):
                fl.on_record[h] = lambda r: TrainRecord(r.ts_unix_ns, r.job_id, r.rank, r.local_rank, r.world_size,
                                                        r.pid, r.uid, r.step, loss=math.nan, grad_norm=r.grad_norm,
                                                        tokens=r.tokens, extra=r.extra)
        frames += [fl.frame(h) for h in range(5)]
    db = _store(tmp_path)
    _write_frames(db, frames)
    alerts = replay_db(db)
    kinds = {(a.kind, a.host) for a in alerts}
    assert (K.XID, "h01") in kinds and (K.FILE_INTEGRITY, "h01") in kinds and (K.HANG, "h04") in kinds
    assert any(a.kind == K.TRAIN_NONFINITE for a in alerts)
    nan_alert = next(a for a in alerts if a.kind == K.TRAIN_NONFINITE)
    assert nan_alert.evidence["step"] >= 80
    stored = detect_file(db, store=True)
    assert {a.dedup_key for a in stored} == {a.dedup_key for a in read_alerts(db)}
    assert "file_integrity" in list_alerts(db)


def test_replay_of_a_file_without_data_returns_nothing(tmp_path: Path) -> None:
    assert replay_db(_store(tmp_path)) == []


def test_scenario_runner_smoke() -> None:
    """The benchmark's simulated agents (agent/ SimulatedCollector + SyntheticTraining) and scoring work."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "scenarios.py"
    spec = importlib.util.spec_from_file_location("gpusoc_bench_scenarios", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    by_name = {s.name: s for s in mod.SCENARIOS}
    for name in ("torch-file-modified", "nan-loss"):
        sc = by_name[name]
        sc.inject_at, sc.duration = 60, 75
        r = mod.run_scenario(sc, seed=0)
        assert r.detected and r.false_alerts == [] and r.latency_s is not None and r.latency_s < 2.0
