"""Console store: idempotent Arrow ingest, resume points, faults, retention, export and query."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pytest

from console.store.export import export_db
from console.store.query import QueryError, StoreLockedError, format_json, format_table, run_query
from console.store.schema import SCHEMA_VERSION, TABLES, SchemaVersionError, ensure_schema
from console.store.writer import StoreWriter
from protos.types import (
    GPU_LOST,
    GPU_OK,
    METRIC_INDEX,
    METRIC_NAMES,
    N_METRICS,
    Description,
    Event,
    Frame,
    Gap,
    GpuInfo,
    TrainRecord,
)

REPO = Path(__file__).resolve().parents[1]
T0_NS = 1_699_999_980 * 10**9  # 2023-11-14T22:13:00Z, a whole minute


def frame(host: str = "h1", epoch: str = "e1", seq: int = 1, n_gpus: int = 2, ts_ns: int | None = None,
          simulated: bool = True, fill: float | None = None) -> Frame:
    """A frame whose values encode (seq, gpu, metric) so rows can be checked exactly."""
    values = np.empty((n_gpus, N_METRICS), dtype=np.float32)
    for g in range(n_gpus):
        values[g] = seq * 100 + g * 10 + np.arange(N_METRICS) / 100 if fill is None else fill
    ts = T0_NS + seq * 10**9 if ts_ns is None else ts_ns
    return Frame(
        host=host, epoch=epoch, seq=seq, ts_unix_ns=ts, simulated=simulated, gpu_values=values,
        gpu_index=list(range(n_gpus)), gpu_state=[GPU_OK] * n_gpus,
        train=[TrainRecord(ts + 1000, "job-a", 0, 0, 2, 4242, 1000, seq, loss=2.5, extra={"mfu": 0.4},
                           info={"note": "x"})],
        events=[Event(ts + 2000, "xid", 3, 1, 4242, "XID 79", {"xid": "79"})],
    )


def desc(host: str = "h1", version: str = "0.1.0", gpus: int = 2, simulated: bool = True) -> Description:
    return Description(
        host=host, agent_version=version, epoch="e1", simulated=simulated,
        gpus=[GpuInfo(i, "NVIDIA H100", f"GPU-{host}-{i}", 81559.0, "550.54", f"0000:{i:02x}:00.0")
              for i in range(gpus)],
        capabilities=["nvml"], metric_names=list(METRIC_NAMES), metric_schema=1, sample_interval_s=1.0,
        oldest_seq=1, newest_seq=10, nvml_status="ok",
    )


def count(db: Path | duckdb.DuckDBPyConnection, sql: str) -> int:
    if isinstance(db, duckdb.DuckDBPyConnection):
        row = db.execute(sql).fetchone()
    else:
        _, rows = run_query(db, sql)
        row = rows[0]
    assert row is not None
    return int(row[0])


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store.duckdb"


@pytest.fixture
def writer(db: Path) -> Iterator[StoreWriter]:
    w = StoreWriter(db, flush_interval_s=0.05, retry_interval_s=0.05)
    w.start()
    yield w
    w.stop()


def rows_per_table(db: Path) -> dict[str, int]:
    return {t: count(db, f"SELECT count(*) FROM {t}") for t in ("frames", "gpu_samples", "train_samples", "events")}


# ---------------------------------------------------------------------------- idempotency


def test_same_frame_twice_across_flushes_is_stored_once(db: Path) -> None:
    w = StoreWriter(db, flush_interval_s=0.05)
    w.start()
    w.submit_frame(frame(seq=1), time.time_ns())
    assert w.flush(10)
    w.submit_frame(frame(seq=1), time.time_ns())
    w.submit_frame(frame(seq=2), time.time_ns())
    assert w.flush(10)
    assert w.stats["frames_duplicate"] == 1
    assert w.stop()
    assert rows_per_table(db) == {"frames": 2, "gpu_samples": 4, "train_samples": 2, "events": 2}


def test_same_frame_twice_in_one_batch_is_stored_once(db: Path) -> None:
    w = StoreWriter(db, flush_interval_s=3600)  # nothing flushes until asked: one batch
    w.start()
    with w._cond:  # queue all three before the writer thread can take any
        for _ in range(3):
            w.submit_frame(frame(seq=7), time.time_ns())
    assert w.flush(10)
    assert w.stats["flushes"] == 1
    assert w.stats["frames_duplicate"] == 2
    assert w.stop()
    assert rows_per_table(db) == {"frames": 1, "gpu_samples": 2, "train_samples": 1, "events": 1}


def test_redelivery_after_reopen_is_stored_once(db: Path) -> None:
    with StoreWriter(db) as w:
        for s in range(1, 4):
            w.submit_frame(frame(seq=s), time.time_ns())
        assert w.flush(10)
    with StoreWriter(db) as w:  # fresh process view: the ledger in the file decides
        for s in range(1, 6):  # agent resends 1..3 and sends 4..5
            w.submit_frame(frame(seq=s), time.time_ns())
        assert w.flush(10)
        assert w.stats["frames_duplicate"] == 3
        assert w.last_committed("h1") == ("e1", 5)
    assert rows_per_table(db) == {"frames": 5, "gpu_samples": 10, "train_samples": 5, "events": 5}


def test_stale_memory_fast_path_falls_back_to_ledger(db: Path) -> None:
    with StoreWriter(db) as w:
        w.submit_frame(frame(seq=1), time.time_ns())
        assert w.flush(10)
        w._epoch_max.clear()  # make the writer believe seq 1 is new: the optimistic insert must fail
        w.submit_frame(frame(seq=1), time.time_ns())
        w.submit_frame(frame(seq=2), time.time_ns())
        assert w.flush(10)
        assert w.stats["frames_duplicate"] == 1
    assert rows_per_table(db) == {"frames": 2, "gpu_samples": 4, "train_samples": 2, "events": 2}


def test_out_of_order_gap_fill_is_stored(writer: StoreWriter, db: Path) -> None:
    for s in (1, 2, 4, 5):
        writer.submit_frame(frame(seq=s), time.time_ns())
    assert writer.flush(10)
    writer.submit_frame(frame(seq=3), time.time_ns())  # below the max: goes through the ledger check
    writer.submit_frame(frame(seq=4), time.time_ns())
    assert writer.flush(10)
    writer.stop()
    _, rows = run_query(db, "SELECT seq FROM frames ORDER BY seq")
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------- values


def test_nan_becomes_null_and_values_round_trip(writer: StoreWriter, db: Path) -> None:
    f = frame(seq=3, n_gpus=3)
    f.gpu_values[1, METRIC_INDEX["temp_c"]] = np.nan
    f.gpu_values[:, METRIC_INDEX["ecc_corrected"]] = np.nan
    f.gpu_state = [GPU_OK, GPU_LOST, 9]
    f.train[0].grad_norm = math.nan
    f.train[0].extra = {"mfu": math.nan, "tflops": 312.5}
    writer.submit_frame(f, time.time_ns())
    assert writer.flush(10)
    writer.stop()
    cols, rows = run_query(db, "SELECT * FROM gpu_samples ORDER BY gpu_index")
    got = [dict(zip(cols, r, strict=True)) for r in rows]
    assert [g["gpu_state"] for g in got] == ["ok", "lost", "unknown"]
    assert got[1]["temp_c"] is None and got[0]["temp_c"] is not None
    assert all(g["ecc_corrected"] is None for g in got)
    for g, row in enumerate(got):
        for m, name in enumerate(METRIC_NAMES):
            v = f.gpu_values[g, m]
            assert (row[name] is None) if np.isnan(v) else row[name] == pytest.approx(float(v))
    assert count(db, "SELECT count(*) FROM gpu_samples WHERE isnan(temp_c)") == 0
    _, tr = run_query(db, "SELECT grad_norm, loss, extra, info FROM train_samples")
    assert tr[0][0] is None and tr[0][1] == 2.5
    assert tr[0][2] == {"mfu": None, "tflops": 312.5}
    assert json.loads(tr[0][3]) == {"note": "x"}
    _, ev = run_query(db, "SELECT severity, gpu_index, pid, attrs, ts FROM events")
    assert ev[0][:3] == ("critical", 1, 4242) and json.loads(ev[0][3]) == {"xid": "79"}
    assert ev[0][4].timestamp() == pytest.approx((T0_NS + 3 * 10**9 + 2000) / 1e9)


def test_simulated_flag_propagates_to_every_table(writer: StoreWriter, db: Path) -> None:
    writer.submit_frame(frame(host="real", seq=1, simulated=False), time.time_ns())
    writer.submit_frame(frame(host="sim", seq=1, simulated=True), time.time_ns())
    writer.submit_description("10.0.0.1:50051", desc(host="real", simulated=False))
    assert writer.flush(10)
    writer.stop()
    for table in ("frames", "gpu_samples", "train_samples", "events", "hosts", "gpus"):
        _, rows = run_query(db, f"SELECT DISTINCT host, simulated FROM {table} ORDER BY host")
        expect = [("real", False)] if table == "gpus" else [("real", False), ("sim", True)]
        assert rows == expect, table


def test_malformed_frames_are_refused_at_submit(writer: StoreWriter) -> None:
    bad = frame()
    bad.gpu_values = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError):
        writer.submit_frame(bad, time.time_ns())
    bad = frame()
    bad.gpu_index = [0]
    with pytest.raises(ValueError):
        writer.submit_frame(bad, time.time_ns())
    bad = frame()
    bad.metric_schema = 99
    with pytest.raises(ValueError):
        writer.submit_frame(bad, time.time_ns())


def test_poison_frame_is_isolated_and_recorded_as_gap(writer: StoreWriter, db: Path) -> None:
    poison = frame(seq=2)
    poison.train[0].extra = {"mfu": "not a number"}  # type: ignore[dict-item]
    for f in (frame(seq=1), poison, frame(seq=3)):
        writer.submit_frame(f, time.time_ns())
    assert writer.flush(10)
    assert writer.stats["frames_rejected"] == 1
    assert writer.status == "running"
    writer.stop()
    _, rows = run_query(db, "SELECT seq FROM frames ORDER BY seq")
    assert [r[0] for r in rows] == [1, 3]
    _, gaps = run_query(db, "SELECT first_seq, last_seq, reason FROM gaps")
    assert gaps[0][:2] == (2, 2) and gaps[0][2].startswith("store rejected")


# ---------------------------------------------------------------------------- Arrow path


def test_no_executemany_or_row_loops_in_console() -> None:
    offenders = []
    for path in (REPO / "console").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if "executemany" in text or "con.append(" in text:
            offenders.append(str(path))
    assert offenders == []
    writer_src = (REPO / "console" / "store" / "writer.py").read_text(encoding="utf-8")
    assert "con.register(" in writer_src and "INSERT INTO gpu_samples SELECT * FROM" in writer_src


def test_one_insert_per_table_per_flush(db: Path) -> None:
    """The whole batch goes in with one statement per table, whatever the number of frames."""
    statements: list[str] = []
    w = StoreWriter(db, flush_interval_s=3600)
    w.start()
    assert w._con is not None
    real_con: duckdb.DuckDBPyConnection = w._con

    class Spy:
        def __getattr__(self, name: str) -> object:
            return getattr(real_con, name)

        def execute(self, sql: str, *args: object) -> object:
            statements.append(sql.strip().split("\n")[0])
            return real_con.execute(sql, *args)

    w._con = Spy()  # type: ignore[assignment]
    with w._cond:  # queue the whole batch before the writer thread can take part of it
        for s in range(1, 201):
            w.submit_frame(frame(host=f"h{s % 7}", seq=s), time.time_ns())
    assert w.flush(10)
    w._con = real_con
    w.stop()
    inserts = [s for s in statements if s.startswith("INSERT")]
    assert len(inserts) == 5, inserts  # gpu_samples, train_samples, events, hosts, frames
    assert count(db, "SELECT count(*) FROM gpu_samples") == 400


# ---------------------------------------------------------------------------- resume points


def test_resume_point_survives_kill(db: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, sys, time
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / "tests")!r})
        from test_store import frame
        from console.store.writer import StoreWriter
        w = StoreWriter({str(db)!r})
        w.start()
        for s in range(1, 11):
            w.submit_frame(frame(seq=s), time.time_ns())
        w.submit_frame(frame(epoch="e0", seq=50, ts_ns=1), time.time_ns())  # an older epoch
        assert w.flush(10)
        print("committed", flush=True)
        for s in range(11, 15):  # queued, never flushed: lost with the process, agent still holds them
            w.submit_frame(frame(seq=s), time.time_ns())
        os._exit(137)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "committed" in proc.stdout, proc.stderr
    assert proc.returncode == 137
    with StoreWriter(db) as w:
        assert w.last_committed("h1") == ("e1", 10)
        assert w.last_committed("nope") is None
        assert w.resume_points() == {"h1": ("e1", 10)}
    assert count(db, "SELECT count(*) FROM frames") == 11


def test_on_commit_reports_max_seq_per_host_and_epoch(db: Path) -> None:
    seen: list[tuple[str, str, int, int]] = []
    w = StoreWriter(db, flush_interval_s=3600, on_commit=seen.extend)
    w.start()
    before = time.time_ns()
    with w._cond:  # one batch, whatever the writer thread's timing
        for s in (3, 1, 2):
            w.submit_frame(frame(seq=s), time.time_ns())
        w.submit_frame(frame(host="h2", seq=9), time.time_ns())
    assert w.flush(10)
    w.stop()
    assert sorted((h, e, s) for h, e, s, _ in seen) == [("h1", "e1", 3), ("h2", "e1", 9)]
    assert all(before <= c <= time.time_ns() for *_, c in seen)


def test_commit_latency_is_recorded_per_frame(writer: StoreWriter, db: Path) -> None:
    now = time.time_ns()
    writer.submit_frame(frame(seq=1, ts_ns=now), now)
    assert writer.flush(10)
    writer.stop()
    _, rows = run_query(db, "SELECT epoch_us(committed_at) - epoch_us(ts), epoch_us(received_at) FROM frames")
    latency_us, received_us = rows[0]
    assert 0 <= latency_us < 10_000_000 and received_us == now // 1000


# ---------------------------------------------------------------------------- gaps, descriptions


def test_gaps_are_stored_once(writer: StoreWriter, db: Path) -> None:
    g = Gap("e1", 5, 9, "buffer_full", T0_NS)
    writer.submit_gap("h1", g)
    writer.submit_gap("h1", g)  # reported again after a reconnect
    writer.submit_gap("h1", Gap("e1", 20, 0, "epoch_lost"))
    assert writer.flush(10)
    writer.stop()
    _, rows = run_query(db, "SELECT host, epoch, first_seq, last_seq, reason, detected_at FROM gaps ORDER BY 3")
    assert [r[:5] for r in rows] == [("h1", "e1", 5, 9, "buffer_full"), ("h1", "e1", 20, 0, "epoch_lost")]
    assert rows[0][5].timestamp() == T0_NS / 1e9


def test_description_upserts_host_and_gpus(writer: StoreWriter, db: Path) -> None:
    writer.submit_description("10.0.0.1:50051", desc(version="0.1.0", gpus=2))
    assert writer.flush(10)
    writer.submit_frame(frame(seq=1, n_gpus=2), time.time_ns(), "10.0.0.1:50051")
    writer.submit_description("10.0.0.2:50051", desc(version="0.2.0", gpus=3))
    assert writer.flush(10)
    writer.stop()
    cols, rows = run_query(db, "SELECT * FROM hosts")
    assert len(rows) == 1
    h = dict(zip(cols, rows[0], strict=True))
    assert h["agent_version"] == "0.2.0" and h["address"] == "10.0.0.2:50051" and h["n_gpus"] == 3
    assert h["nvml_status"] == "ok" and h["epoch"] == "e1" and h["simulated"] is True
    assert h["first_seen"].timestamp() == pytest.approx((T0_NS + 10**9) / 1e9)  # the frame's ts
    assert h["last_seen"] >= h["first_seen"]
    _, gpus = run_query(db, "SELECT gpu_index, uuid, memory_total_mib, pci_bus_id FROM gpus ORDER BY 1")
    assert gpus == [(i, f"GPU-h1-{i}", 81559.0, f"0000:{i:02x}:00.0") for i in range(3)]


def test_hosts_last_seen_is_throttled_but_exact_at_export_and_stop(db: Path, tmp_path: Path) -> None:
    w = StoreWriter(db, flush_interval_s=0.01, hosts_refresh_s=3600)
    w.start()
    for s in range(1, 6):
        w.submit_frame(frame(seq=s), time.time_ns())
        assert w.flush(10)
    held = w._call(lambda con: con.execute("SELECT epoch_us(last_seen) FROM hosts").fetchall(), 10)
    assert held == [((T0_NS + 10**9) // 1000,)]  # written once, newer last_seen held in memory
    info = w.export(tmp_path / "e.duckdb")
    con = duckdb.connect(info["path"], read_only=True)
    assert count(con, "SELECT epoch_us(last_seen) FROM hosts") == (T0_NS + 5 * 10**9) // 1000
    con.close()
    w.submit_frame(frame(seq=6), time.time_ns())
    w.submit_frame(frame(seq=7, n_gpus=3), time.time_ns())  # a change is written at once
    assert w.flush(10)
    w.submit_frame(frame(seq=8, n_gpus=3), time.time_ns())
    assert w.stop()
    _, rows = run_query(db, "SELECT epoch_us(last_seen), n_gpus FROM hosts")
    assert rows == [((T0_NS + 8 * 10**9) // 1000, 3)]


def test_hosts_last_seen_refresh_updates_while_running(db: Path) -> None:
    w = StoreWriter(db, flush_interval_s=0.01, hosts_refresh_s=0.0)
    w.start()
    for s in range(1, 4):
        w.submit_frame(frame(seq=s), time.time_ns(), "10.0.0.9:1")
        assert w.flush(10)
        got = w._call(lambda con: con.execute("SELECT epoch_us(last_seen), address FROM hosts").fetchall(), 10)
        assert got == [((T0_NS + s * 10**9) // 1000, "10.0.0.9:1")]
    assert w.stop()


# ---------------------------------------------------------------------------- schema


def test_newer_schema_is_refused(db: Path) -> None:
    con = duckdb.connect(str(db))
    ensure_schema(con)
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    con.close()
    w = StoreWriter(db)
    with pytest.raises(SchemaVersionError, match="newer"):
        w.start()
    with pytest.raises(SchemaVersionError):
        export_db(db, db.with_name("x.duckdb"))


def test_ensure_schema_is_idempotent_and_creates_all_tables(db: Path) -> None:
    con = duckdb.connect(str(db))
    assert ensure_schema(con) == SCHEMA_VERSION
    assert ensure_schema(con) == SCHEMA_VERSION
    names = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert set(TABLES) <= names
    cols = [r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name='gpu_samples'"
                                      " ORDER BY column_index").fetchall()]
    assert cols[7:] == list(METRIC_NAMES)
    con.close()


def test_schema_doc_lists_every_column() -> None:
    doc = (REPO / "docs" / "schema.md").read_text(encoding="utf-8")
    con = duckdb.connect()
    ensure_schema(con)
    missing = []
    for table, column in con.execute(
        "SELECT table_name, column_name FROM duckdb_columns() WHERE NOT internal AND schema_name = 'main' "
        "AND table_name <> 'gpu_samples_1m'"
    ).fetchall():
        if f"`{column}`" not in doc and column not in METRIC_NAMES:
            missing.append(f"{table}.{column}")
        if f"`{table}`" not in doc:
            missing.append(table)
    assert missing == []


# ---------------------------------------------------------------------------- export


def table_rows(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple[object, ...]]:
    return con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()


def fill(w: StoreWriter, n: int = 5) -> None:
    w.submit_description("10.0.0.1:50051", desc())
    for s in range(1, n + 1):
        w.submit_frame(frame(seq=s), time.time_ns(), "10.0.0.1:50051")
    w.submit_gap("h1", Gap("e1", 100, 120, "buffer_full", T0_NS))
    assert w.flush(10)


def test_offline_export_contains_everything_and_opens_read_only(db: Path, tmp_path: Path) -> None:
    with StoreWriter(db) as w:
        fill(w)
    out = tmp_path / "audit" / "export.duckdb"
    info = export_db(db, out)
    assert info["rows"]["gpu_samples"] == 10 and info["method"] == "offline"
    assert not list(out.parent.glob(".*tmp*")) and not Path(str(out) + ".wal").exists()
    src = duckdb.connect(str(db), read_only=True)
    exp = duckdb.connect(str(out), read_only=True)
    try:
        for table in TABLES:
            if table != "meta":
                assert table_rows(exp, table) == table_rows(src, table), table
        meta = dict(exp.execute("SELECT key, value FROM meta").fetchall())
        assert meta["schema_version"] == str(SCHEMA_VERSION)
        assert meta["export_source_path"] == str(db.resolve())
        assert meta["time_range_min"] == "2023-11-14T22:13:01.000000Z"
        assert meta["time_range.events.max"] == "2023-11-14T22:13:05.000002Z"
        assert meta["rows.frames"] == "5" and "exported_at" in meta
        tags = exp.execute("SELECT tags FROM duckdb_databases() WHERE database_name = 'export'").fetchone()
        assert tags == ({"storage_version": "v1.0.0+"},)  # any DuckDB >= 1.0 can open it
        exts = exp.execute("SELECT count(*) FROM duckdb_extensions() WHERE loaded AND extension_name "
                           "NOT IN ('core_functions', 'parquet', 'json', 'icu')").fetchone()
        assert exts == (0,)
        types = {r[0] for r in exp.execute("SELECT DISTINCT data_type FROM duckdb_columns()").fetchall()}
        assert not any("JSON" in t or "ENUM" in t for t in types)
        with pytest.raises(duckdb.Error):
            exp.execute("DELETE FROM frames")
    finally:
        src.close()
        exp.close()
    with pytest.raises(FileExistsError):
        export_db(db, out)


def test_export_while_writer_runs_is_consistent(db: Path, tmp_path: Path) -> None:
    w = StoreWriter(db, flush_interval_s=0.01)
    w.start()
    fill(w)
    stop = threading.Event()

    def produce() -> None:
        s = 1000
        while not stop.is_set():
            w.submit_frame(frame(host="busy", seq=s, n_gpus=4), time.time_ns())
            s += 1
            time.sleep(0.0005)

    t = threading.Thread(target=produce)
    t.start()
    try:
        time.sleep(0.2)
        infos = [w.export(tmp_path / f"live{i}.duckdb") for i in range(3)]
    finally:
        stop.set()
        t.join()
    assert w.flush(10)
    final = w.stats["frames_committed"]
    assert w.stop()
    for info in infos:
        con = duckdb.connect(info["path"], read_only=True)
        n_frames = count(con, "SELECT count(*) FROM frames")
        # every ledger row has exactly its GPU rows: the copy never sees half a flush
        assert count(con, "SELECT count(*) FROM gpu_samples WHERE host = 'busy'") == 4 * (n_frames - 5)
        assert count(con, "SELECT count(*) FROM train_samples") == n_frames
        assert 5 < n_frames <= final
        assert dict(con.execute("SELECT key, value FROM meta").fetchall())["export_method"] == "writer"
        con.close()


def test_offline_export_refuses_locked_source(db: Path, tmp_path: Path) -> None:
    with holder_process(db):
        with pytest.raises(StoreLockedError, match="running gpusoc collector"):
            export_db(db, tmp_path / "x.duckdb")
        with pytest.raises(StoreLockedError, match="export"):
            run_query(db, "SELECT 1")
        with pytest.raises(StoreLockedError):
            StoreWriter(db).start()


# ---------------------------------------------------------------------------- query


class holder_process:
    """Another process holding the store open for writing (a running collector)."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> holder_process:
        code = (
            f"import sys, duckdb; c = duckdb.connect({str(self.db)!r}); "
            "print('ready', flush=True); sys.stdin.read()"
        )
        if not self.db.exists():
            c = duckdb.connect(str(self.db))
            ensure_schema(c)
            c.close()
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def test_query_helper_table_and_json(writer: StoreWriter, db: Path) -> None:
    fill(writer, 2)
    writer.stop()
    cols, rows = run_query(db, "SELECT host, seq, ts, temp_c, NULL AS nothing, gpu_state FROM gpu_samples "
                               "WHERE gpu_index = 0 ORDER BY seq")
    assert cols == ["host", "seq", "ts", "temp_c", "nothing", "gpu_state"]
    assert len(rows) == 2
    table = format_table(cols, rows)
    assert "host" in table.splitlines()[0] and "NULL" in table and table.endswith("(2 rows)")
    assert "2023-11-14T22:13:01.000000Z" in table
    lines = format_json(cols, rows).splitlines()
    first = json.loads(lines[0])
    assert first["ts"] == "2023-11-14T22:13:01.000000Z" and first["nothing"] is None and first["seq"] == 1
    arr = json.loads(format_json(cols, rows, lines=False))
    assert len(arr) == 2
    _, maps = run_query(db, "SELECT extra, prev_hash FROM train_samples, (SELECT '\\xAB'::BLOB AS prev_hash) LIMIT 1")
    assert json.loads(format_json(["extra", "h"], maps)) == {"extra": {"mfu": 0.4}, "h": "ab"}
    with pytest.raises(QueryError):
        run_query(db, "SELEC oops")
    with pytest.raises(QueryError):
        run_query(db, "DELETE FROM frames")  # read-only
    with pytest.raises(QueryError, match="no such"):
        run_query(db.with_name("missing.duckdb"), "SELECT 1")


# ---------------------------------------------------------------------------- faults


class DiskFull:
    """Fault hook: the next `times` commits fail like a full disk."""

    def __init__(self, stage: str = "commit", times: int = 3, exc: type[Exception] = duckdb.IOException) -> None:
        self.stage, self.times, self.exc, self.calls = stage, times, exc, 0

    def __call__(self, stage: str) -> None:
        if stage == self.stage and self.times > 0:
            self.times -= 1
            self.calls += 1
            raise self.exc('Could not write file "store.duckdb.wal": No space left on device')


def test_disk_full_pauses_applies_backpressure_and_loses_nothing(db: Path) -> None:
    hook = DiskFull(times=1_000_000)
    statuses: list[str] = []
    w = StoreWriter(db, flush_interval_s=0.02, retry_interval_s=0.05, max_queue_frames=5,
                    fault_hook=hook, on_status=statuses.append)
    w.start()
    assert w.accepting
    for s in range(1, 4):
        w.submit_frame(frame(seq=s), time.time_ns())
    assert not w.flush(0.5)  # cannot commit
    assert w.status.startswith("paused: IOException") and "No space left" in w.status
    assert not w.accepting and not w.wait_accepting(0.05)
    assert w.stats["pauses"] == 1 and "No space" in (w.stats["last_error"] or "")
    for s in range(4, 11):  # ingest ignoring backpressure still loses nothing
        w.submit_frame(frame(seq=s), time.time_ns())
    st = w.stats
    assert st["queue_frames"] + st["held_items"] + st["inflight_items"] == 10
    time.sleep(0.2)
    assert hook.calls > 1  # retried periodically
    assert w.stats["frames_committed"] == 0
    hook.times = 0  # space freed
    assert w.wait_accepting(5)
    assert w.flush(10)
    assert w.status == "running" and w.accepting
    assert w.stop()
    assert rows_per_table(db) == {"frames": 10, "gpu_samples": 20, "train_samples": 10, "events": 10}
    assert statuses[0] == "running" and statuses[1].startswith("paused") and "running" in statuses[2:]


def test_fatal_error_reopens_the_database(db: Path) -> None:
    hook = DiskFull(stage="insert", times=2, exc=duckdb.FatalException)
    w = StoreWriter(db, flush_interval_s=0.02, retry_interval_s=0.05, fault_hook=hook)
    w.start()
    w.submit_frame(frame(seq=1), time.time_ns())
    assert w.flush(10)
    assert hook.calls == 2 and w.stats["pauses"] == 1
    assert w.last_committed("h1") == ("e1", 1)
    assert w.stop()
    assert rows_per_table(db)["gpu_samples"] == 2


def test_stop_while_paused_reports_failure(db: Path) -> None:
    w = StoreWriter(db, flush_interval_s=0.02, retry_interval_s=0.05, fault_hook=DiskFull(times=1_000_000))
    w.start()
    w.submit_frame(frame(seq=1), time.time_ns())
    time.sleep(0.1)
    assert w.paused
    assert w.stop(10) is False
    assert w.status == "stopped"
    with pytest.raises(RuntimeError):
        w.submit_frame(frame(seq=2), time.time_ns())


def test_backlog_turns_accepting_off(db: Path) -> None:
    w = StoreWriter(db, max_queue_frames=3)  # not started: the queue only grows
    for s in range(1, 4):
        w.submit_frame(frame(seq=s), time.time_ns())
    assert w.accepting
    w.submit_frame(frame(seq=4), time.time_ns())
    assert not w.accepting
    w.start()
    assert w.flush(10) and w.accepting
    assert w.stop()




def test_real_disk_full_on_tmpfs(tiny_fs: Path) -> None:
    db = tiny_fs / "store.duckdb"
    w = StoreWriter(db, flush_interval_s=0.02, retry_interval_s=0.1, threads=1)
    w.start()
    ballast = tiny_fs / "ballast"
    free = os.statvfs(tiny_fs).f_bavail * os.statvfs(tiny_fs).f_frsize
    ballast.write_bytes(b"\0" * max(free - 600_000, 0))
    submitted = 0
    deadline = time.monotonic() + 60
    while not w.paused and time.monotonic() < deadline:
        for _ in range(50):
            submitted += 1
            w.submit_frame(frame(host="big", seq=submitted, n_gpus=8), time.time_ns())
        w.flush(2)
    assert w.paused, f"never filled the disk after {submitted} frames"
    assert not w.accepting
    ballast.unlink()  # operator frees space
    assert w.wait_accepting(30)
    assert w.flush(30), w.status
    assert w.stop()
    con = duckdb.connect(str(db), read_only=True)
    assert count(con, "SELECT count(*) FROM frames") == submitted
    assert count(con, "SELECT count(DISTINCT seq) FROM gpu_samples") == submitted
    assert count(con, "SELECT count(*) FROM gpu_samples") == 8 * submitted
    con.close()


# ---------------------------------------------------------------------------- retention


def test_retention_rolls_up_min_mean_max_and_deletes_raw(db: Path) -> None:
    w = StoreWriter(db, raw_retention_s=600, rollup_interval_s=3600)
    w.start()
    # minute 0: seqs 1..6 at 10 s steps; minute 1: seqs 7..12; "now" is 20 min later
    temps = {}
    for s in range(1, 13):
        f = frame(seq=s, n_gpus=2, ts_ns=T0_NS + (s - 1) * 10 * 10**9)
        f.gpu_values[0, METRIC_INDEX["temp_c"]] = 40 + s
        f.gpu_values[1, METRIC_INDEX["temp_c"]] = np.nan if s % 2 else 70.0
        f.gpu_values[:, METRIC_INDEX["ecc_corrected"]] = np.nan
        temps[s] = 40 + s
        w.submit_frame(f, time.time_ns())
    recent = frame(seq=13, ts_ns=T0_NS + 19 * 60 * 10**9)  # inside the retention window
    w.submit_frame(recent, time.time_ns())
    assert w.flush(10)
    result = w.run_maintenance(now=T0_NS / 1e9 + 20 * 60)
    assert result["raw_rows_deleted"] == 24 and result["ledger_rows_compacted"] == 12
    assert w.last_checkpointed("h1") == ("e1", 13)
    # re-delivering a compacted frame neither duplicates nor resurrects it
    w.submit_frame(frame(seq=3, ts_ns=T0_NS + 20 * 10**9), time.time_ns())
    assert w.flush(10)
    assert w.stats["frames_expired"] == 1
    w.stop()
    cols, rows = run_query(db, "SELECT * FROM gpu_samples_1m ORDER BY bucket, gpu_index")
    got = [dict(zip(cols, r, strict=True)) for r in rows]
    assert len(got) == 4
    m0g0, m0g1, m1g0, _ = got
    assert m0g0["bucket"].timestamp() == T0_NS / 1e9 and m0g0["n"] == 6 and m0g0["simulated"] is True
    assert (m0g0["temp_c_min"], m0g0["temp_c_max"]) == (41.0, 46.0)
    assert m0g0["temp_c_mean"] == pytest.approx(np.mean([41, 42, 43, 44, 45, 46]))
    assert (m0g1["temp_c_min"], m0g1["temp_c_mean"], m0g1["temp_c_max"]) == (70.0, 70.0, 70.0)
    assert m0g0["ecc_corrected_min"] is None and m0g0["ecc_corrected_mean"] is None
    assert m1g0["bucket"].timestamp() == T0_NS / 1e9 + 60 and m1g0["temp_c_mean"] == pytest.approx(49.5)
    assert m0g0["gpu_util_pct_min"] == pytest.approx(100.0) and m0g0["gpu_util_pct_max"] == pytest.approx(600.0)
    assert count(db, "SELECT count(*) FROM gpu_samples") == 2  # only seq 13 left raw
    assert count(db, "SELECT count(*) FROM frames") == 1
    assert count(db, "SELECT count(*) FROM train_samples") == 13  # retention applies to GPU samples only
    _, comp = run_query(db, "SELECT host, epoch, max_seq, n_frames FROM frames_compacted")
    assert comp == [("h1", "e1", 12, 12)]
    with StoreWriter(db) as w2:  # resume point and watermark survive reopening
        assert w2.last_committed("h1") == ("e1", 13)
        w2.submit_frame(frame(seq=5, ts_ns=T0_NS), time.time_ns())
        assert w2.flush(10)
        assert w2.stats["frames_expired"] == 1


def test_late_rows_merge_into_existing_bucket(db: Path) -> None:
    w = StoreWriter(db, raw_retention_s=60, rollup_interval_s=3600)
    w.start()
    for s, temp in ((1, 10.0), (2, 20.0)):
        f = frame(seq=s, n_gpus=1, ts_ns=T0_NS + s * 10**9)
        f.gpu_values[0, METRIC_INDEX["temp_c"]] = temp
        w.submit_frame(f, time.time_ns())
    assert w.flush(10)
    w.run_maintenance(now=T0_NS / 1e9 + 600)
    late = frame(epoch="e2", seq=1, n_gpus=1, ts_ns=T0_NS + 30 * 10**9)  # same minute, arrives later
    late.gpu_values[0, METRIC_INDEX["temp_c"]] = 60.0
    w.submit_frame(late, time.time_ns())
    assert w.flush(10)
    w.run_maintenance(now=T0_NS / 1e9 + 600)
    w.stop()
    _, rows = run_query(db, "SELECT n, temp_c_min, temp_c_mean, temp_c_max FROM gpu_samples_1m")
    assert rows == [(3, 10.0, pytest.approx(30.0), 60.0)]


def test_periodic_maintenance_runs_on_its_own(db: Path) -> None:
    w = StoreWriter(db, flush_interval_s=0.01, raw_retention_s=0.0, rollup_interval_s=0.1)
    w.start()
    w.submit_frame(frame(seq=1, ts_ns=T0_NS), time.time_ns())
    assert w.flush(10)
    deadline = time.monotonic() + 10
    while w.stats["raw_rows_deleted"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert w.stats["maintenance_runs"] >= 1 and w.stats["raw_rows_deleted"] == 2
    assert w.stop()


def test_store_never_imports_agent_or_qt() -> None:
    for path in (REPO / "console" / "store").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in {"agent", "PySide6", "pyqtgraph"}, (path, name)
    code = ("import sys, console.store; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('agent', 'PySide6', 'pyqtgraph')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
