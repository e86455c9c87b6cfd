"""The store's control socket: `gpusoc-console query/export/alerts --db` while a console holds the store.

A StoreWriter (and its control server) runs in this process, so DuckDB's file lock is held; the
CLI runs as a subprocess, fails to open the file, and must ask over `<db>.ctl` instead.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pytest

from console.detect.alerts import Alert, upsert_alerts
from console.respond.audit import AuditChain, export_public_key, load_or_create_audit_key
from console.store.control import (
    ControlError,
    ControlServer,
    check_read_only,
    decode_rows,
    encode_value,
    request,
    socket_path,
    start_control_server,
)
from console.store.writer import StoreWriter
from protos.types import GPU_OK, N_METRICS, Frame

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}

# Literal values whose printing depends on their type: both paths must print them the same way.
TYPED_SQL = (
    "SELECT 1.50::DECIMAL(5,2) AS d, 'nan'::DOUBLE AS f, 'inf'::FLOAT AS r, INTERVAL 3 DAY AS i, "
    "'\\xAA\\x01'::BLOB AS b, TIMESTAMPTZ '2020-01-01 10:00:00+00' AS t, DATE '2020-01-02' AS dt, "
    "[1.5::DECIMAL(3,1)] AS l, {'k': 'v'} AS s, NULL AS n, true AS yes, 'x' AS x, 12 AS x"
)


def _console(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "console.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=ENV)


def _frame(seq: int, host: str = "h1") -> Frame:
    values = np.full((2, N_METRICS), float(seq), dtype=np.float32)
    return Frame(host=host, epoch="e1", seq=seq, ts_unix_ns=time.time_ns(), simulated=True,
                 gpu_values=values, gpu_index=[0, 1], gpu_state=[GPU_OK, GPU_OK])


def _alert(aid: str, state: str, detected_ns: int) -> Alert:
    return Alert(aid, "xid", "critical", state, "h1", 0, "job-a", 3, detected_ns - 10**9, detected_ns,
                 {"xid": 79, "detail": "XID 79", "ratio": float("nan")}, f"key-{aid}", detected_ns)


@dataclass
class Live:
    db: Path
    writer: StoreWriter
    chain: AuditChain
    server: ControlServer
    pub: Path


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    db = tmp_path / "store.duckdb"
    writer = StoreWriter(db, flush_interval_s=0.05)
    writer.start()
    server: ControlServer | None = None
    try:
        for seq in range(1, 6):
            writer.submit_frame(_frame(seq), time.time_ns())
        assert writer.flush(10)
        now = time.time_ns()
        alerts = [_alert("a-open", "open", now), _alert("a-done", "resolved", now - 5 * 10**9)]
        writer.run_on_writer(lambda con: upsert_alerts(con, alerts))
        key = load_or_create_audit_key(tmp_path / "state" / "audit-key.pem")
        pub = tmp_path / "audit.pub"
        export_public_key(key, pub)
        chain = AuditChain(writer.run_on_writer, signing_key=key)
        chain.append("collector", "collect.start", None, {"agents": ["127.0.0.1:1"]})
        chain.sign_head()
        chain.append("alice", "alert.acknowledged", "a-open", {"alert_id": "a-open"})  # an unsigned tail
        server = ControlServer(writer, audit=chain).start()
        yield Live(db, writer, chain, server, pub)
    finally:
        if server is not None:
            server.stop()
        writer.stop()


def _notice_ok(stderr: str, db: Path) -> None:
    first = stderr.splitlines()[0]
    assert f"running console (pid {os.getpid()})" in first
    assert f"{db}.ctl" in first


# --------------------------------------------------------------------------- the socket itself


def test_socket_is_private_and_removed_on_stop(live: Live) -> None:
    path = socket_path(live.db)
    assert live.server.path == path == live.db.with_name("store.duckdb.ctl")
    st = path.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    live.server.stop()
    assert not path.exists()


def test_query_plain_and_json_while_the_writer_holds_the_lock(live: Live) -> None:
    with pytest.raises(duckdb.IOException, match="lock"):  # the premise: no other process can open it
        _open_elsewhere(live.db)
    r = _console("query", "--db", str(live.db), "SELECT seq, host FROM frames ORDER BY seq")
    assert r.returncode == 0, r.stderr
    _notice_ok(r.stderr, live.db)
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["seq", "|", "host"] and lines[-1] == "(5 rows)"
    assert [ln.split()[0] for ln in lines[2:-1]] == ["1", "2", "3", "4", "5"]

    r = _console("query", "--db", str(live.db), "SELECT host, count(*) AS n, max(seq) AS top FROM frames "
                 "GROUP BY host", "--json")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x) for x in r.stdout.splitlines()] == [{"host": "h1", "n": 5, "top": 5}]


def _open_elsewhere(db: Path) -> None:
    r = subprocess.run([sys.executable, "-c", f"import duckdb; duckdb.connect({str(db)!r}, read_only=True)"],
                       capture_output=True, text=True, timeout=60, env=ENV)
    if r.returncode != 0 and "lock" in r.stderr.lower():
        raise duckdb.IOException(r.stderr.strip().splitlines()[-1])


def test_output_is_identical_through_the_socket_and_offline(live: Live) -> None:
    live_out = {fmt: _console("query", "--db", str(live.db), TYPED_SQL, *fmt) for fmt in ((), ("--json",))}
    live_alerts = {fmt: _console("alerts", "--db", str(live.db), *fmt) for fmt in ((), ("--json",))}
    for r in (*live_out.values(), *live_alerts.values()):
        assert r.returncode == 0, r.stderr
        _notice_ok(r.stderr, live.db)
    live.server.stop()
    live.writer.stop()
    for fmt, r in live_out.items():
        off = _console("query", "--db", str(live.db), TYPED_SQL, *fmt)
        assert off.returncode == 0 and off.stderr == "", off.stderr
        assert r.stdout == off.stdout
    for fmt, r in live_alerts.items():
        off = _console("alerts", "--db", str(live.db), *fmt)
        assert off.returncode == 0 and off.stderr == "", off.stderr
        assert r.stdout == off.stdout
    assert "1.50" in live_out[()].stdout and "nan" in live_out[()].stdout and "3 days" in live_out[()].stdout


def test_alerts_through_the_socket(live: Live) -> None:
    r = _console("alerts", "--db", str(live.db), "--json")
    assert r.returncode == 0, r.stderr
    _notice_ok(r.stderr, live.db)
    got = [json.loads(x) for x in r.stdout.splitlines()]
    assert [a["alert_id"] for a in got] == ["a-open", "a-done"]  # newest detection first
    assert got[0]["evidence"]["xid"] == 79 and got[0]["rank"] == 3
    r = _console("alerts", "--db", str(live.db), "--state", "resolved")
    assert r.returncode == 0, r.stderr
    body = r.stdout.splitlines()
    assert body[0].split()[:4] == ["detected", "severity", "state", "kind"]
    assert len(body) == 2 and "resolved" in body[1] and "XID 79" in body[1]


def test_export_through_the_socket_is_signed_and_prints_the_head(live: Live, tmp_path: Path) -> None:
    live.writer.submit_frame(_frame(6), time.time_ns())  # ingest goes on
    out = tmp_path / "audit" / "export.duckdb"
    out.parent.mkdir()
    r = subprocess.run([sys.executable, "-m", "console.cli", "export", "--db", str(live.db), "--out",
                        "audit/export.duckdb"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**ENV, "PYTHONPATH": str(ROOT)})  # a relative --out is the CLI's cwd
    assert r.returncode == 0, r.stderr
    _notice_ok(r.stderr, live.db)
    info = json.loads(r.stdout)
    assert info["path"] == str(out) and info["method"] == "writer" and info["rows"]["alerts"] == 2
    con = duckdb.connect(str(out), read_only=True)  # stock duckdb, nobody holds it
    try:
        assert con.execute("SELECT count(*) FROM frames").fetchone() == (info["rows"]["frames"],)
        assert info["rows"]["frames"] >= 5
        seq, digest, action, actor, target = con.execute(
            "SELECT seq, lower(hex(hash)), action, actor, target FROM audit_log ORDER BY seq DESC LIMIT 1"
        ).fetchall()[0]
        head_seq, head_hash = con.execute(
            "SELECT seq, lower(hex(hash)) FROM audit_heads ORDER BY seq DESC, signed_at DESC LIMIT 1").fetchall()[0]
    finally:
        con.close()
    # export_signed: the export itself is the last row, names who asked, and is signed.
    assert action == "store.export" and target == str(out) and "control socket" in actor
    assert info["audit_head"] == f"{seq}:{digest}" == info["audit_signed_head"] == f"{head_seq}:{head_hash}"
    assert info["audit_unsigned_rows"] == 0 and info["audit_rows"] == seq == 3
    assert f"audit_head {seq}:{digest}" in r.stderr
    v = _console("audit", "verify", str(out), "--trust", str(live.pub), "--expect-head", info["audit_head"])
    assert v.returncode == 0, v.stdout + v.stderr
    # The live chain knows about the export row: appending goes on after it.
    assert live.chain.head[0] == seq


def test_plain_export_without_a_chain_reports_the_unsigned_tail(live: Live, tmp_path: Path) -> None:
    live.server.audit = None  # StoreWriter.export: no audit row, the head is whatever the store has
    out = tmp_path / "plain.duckdb"
    r = _console("export", "--db", str(live.db), "--out", str(out))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["audit_head"] == f"2:{live.chain.head[1].hex()}"
    assert info["audit_signed_head"].startswith("1:") and info["audit_unsigned_rows"] == 1
    assert "1 row(s) after it are not signed yet" in r.stderr
    r = _console("export", "--db", str(live.db), "--out", str(out))  # never overwrites
    assert r.returncode == 1 and "already exists" in r.stderr


def test_write_statements_are_refused(live: Live) -> None:
    r = _console("query", "--db", str(live.db), "DELETE FROM frames")
    assert r.returncode == 1 and r.stdout == ""
    assert "refused: DELETE statement" in r.stderr  # the CLI refuses before asking; the server checks again:
    for sql in ("EXPLAIN ANALYZE DELETE FROM frames", "SELECT 1; DELETE FROM frames", "PRAGMA enable_profiling",
                "INSERT INTO frames SELECT * FROM frames", "COPY frames TO '/tmp/x.csv'", "CHECKPOINT",
                "SET threads = 1", "ATTACH ':memory:' AS m", "CREATE TABLE x AS SELECT 1",
                "UPDATE alerts SET state = 'x'", "SELECT * FROM checkpoint()", "SELECT enable_logging()"):
        with pytest.raises(ControlError) as err:
            live.server.query(sql)
        assert err.value.refused, sql
    assert live.writer.read_query("SELECT count(*) FROM frames") == [(5,)]
    assert live.writer.read_query("SELECT count(*) FROM alerts WHERE state = 'x'") == [(0,)]


def test_read_statements_pass_the_check() -> None:
    for sql in ("SELECT 1", "WITH q AS (SELECT 1 AS a) SELECT * FROM q", "EXPLAIN SELECT 1", "DESCRIBE SELECT 1",
                "SHOW TABLES", "SUMMARIZE SELECT 1 AS a", "PRAGMA table_info('frames')", "PRAGMA database_size",
                "FROM range(3)", "VALUES (1), (2)"):
        check_read_only(sql)


def test_a_statement_that_writes_under_a_select_is_stopped_by_the_read_only_transaction(live: Live) -> None:
    live.writer.run_on_writer(lambda con: con.execute("CREATE SEQUENCE IF NOT EXISTS s_test"))
    with pytest.raises(ControlError, match="read-only"):
        live.server.query("SELECT nextval('s_test')")
    assert live.server.query("SELECT 41 + 1 AS answer")["rows"] == [[42]]


def test_query_errors_and_truncation(live: Live) -> None:
    with pytest.raises(ControlError, match="no_such_table"):
        live.server.query("SELECT * FROM no_such_table")
    res = live.server.query("SELECT seq FROM frames ORDER BY seq", max_rows=2)
    assert res["rows"] == [[1], [2]] and res["truncated"] is True
    assert live.server.handle({"op": "nope"})["ok"] is False
    assert live.server.handle({"op": "export", "out": "relative.duckdb"})["ok"] is False


def test_values_round_trip_for_printing() -> None:
    types = ["DECIMAL(5,2)", "DOUBLE", "INTERVAL", "VARCHAR", "FLOAT"]
    import datetime as dt
    import decimal
    row = (decimal.Decimal("1.50"), float("-inf"), dt.timedelta(days=2, microseconds=5), "NaN", float("nan"))
    wire = json.loads(json.dumps([encode_value(v) for v in row]))
    back = decode_rows(types, [wire])[0]
    assert back[0] == decimal.Decimal("1.50") and back[1] == float("-inf") and back[2] == row[2]
    assert back[3] == "NaN" and isinstance(back[4], float) and back[4] != back[4]


def test_long_queries_are_interrupted_by_the_limit_and_by_stop(live: Live) -> None:
    import threading

    endless = "SELECT count(*) FROM range(1000000000000) a"
    live.server.query_timeout_s = 0.3
    t0 = time.monotonic()
    with pytest.raises(ControlError, match=r"interrupted after 0\.3 s"):
        live.server.query(endless)
    assert time.monotonic() - t0 < 30
    live.server.query_timeout_s = 600
    got: list[BaseException] = []

    def run() -> None:
        try:
            request(live.server.path, {"op": "query", "sql": endless}, timeout=60)
        except BaseException as exc:
            got.append(exc)

    th = threading.Thread(target=run)
    th.start()
    deadline = time.monotonic() + 30
    while not live.server._running and time.monotonic() < deadline:
        time.sleep(0.02)
    t0 = time.monotonic()
    live.server.stop(timeout=20)
    th.join(30)
    assert time.monotonic() - t0 < 20
    assert len(got) == 1 and isinstance(got[0], ControlError) and "shutting down" in str(got[0])
    assert not live.server.path.exists()


def test_a_socket_path_longer_than_sun_path_works(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    db = deep / "store.duckdb"
    assert len(str(socket_path(db))) > 108
    with StoreWriter(db) as writer, ControlServer(writer) as server:
        result, pid = request(server.path, {"op": "ping"})
        assert pid == os.getpid() and result["db"] == str(db) and result["writer_status"] == "running"


# --------------------------------------------------------------------------- stale and missing sockets


def _stale_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nothing listens: what a crashed console leaves behind


def test_stale_socket_is_replaced_at_start(tmp_path: Path) -> None:
    db = tmp_path / "store.duckdb"
    _stale_socket(socket_path(db))
    with StoreWriter(db) as writer:
        server = start_control_server(writer)
        assert server is not None
        try:
            assert stat.S_IMODE(socket_path(db).stat().st_mode) == 0o600
            r = _console("query", "--db", str(db), "SELECT count(*) AS n FROM frames", "--json")
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout) == {"n": 0}
            # A second server on the same path does not steal a live socket.
            with pytest.raises(ControlError, match="already answers"):
                ControlServer(writer).start()
        finally:
            server.stop()
        assert not socket_path(db).exists()


def test_something_else_at_the_socket_path_is_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "store.duckdb"
    socket_path(db).write_text("not a socket")
    with StoreWriter(db) as writer:
        assert start_control_server(writer) is None
    assert socket_path(db).read_text() == "not a socket"


def test_locked_without_a_console_answering_names_the_holder(live: Live) -> None:
    live.server.stop()
    _stale_socket(socket_path(live.db))
    for cmd in (("alerts", "--db", str(live.db)), ("query", "--db", str(live.db), "SELECT 1"),
                ("export", "--db", str(live.db), "--out", str(live.db.with_name("x.duckdb")))):
        r = _console(*cmd)
        assert r.returncode == 1 and r.stdout == ""
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"locked by pid {os.getpid()}" in r.stderr and "no gpusoc console answers" in r.stderr
        assert "stale" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- collect's status line, --open


def test_status_line_rates_and_alert_labels() -> None:
    from console.collect import StatusLine

    class Stats:
        frames = 0
        rejected = 0

    class Client:
        stats = Stats()

    from console.detect.runner import DetectionRunner

    sink = DetectionRunner(writer=None)
    sink.alert_counts, sink.raised = (1, 2), 7

    class Fleet:
        clients = {"h1": Client()}

        def statuses(self) -> list[object]:
            return []

    fleet = Fleet()
    fleet.sink = sink  # type: ignore[attr-defined]
    line = StatusLine(fleet, object(), started=time.monotonic() - 100)  # type: ignore[arg-type]
    Client.stats.frames = 10_000  # the backlog replayed right after start
    line()
    line._last = (line._last[0] - 10, line._last[1])  # pretend the last report was 10 s ago
    Client.stats.frames = 10_100
    text = line()
    assert "(10/s last 10s," in text and "/s since start)" in text
    assert "alerts open 1 of 2 (alert updates 7)" in text


def test_open_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    r = _console("--open", str(tmp_path / "nonexistent.duckdb"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"gpusoc-console: --open {tmp_path / 'nonexistent.duckdb'}: no such file"


def test_offline_query_applies_the_same_read_only_rules(tmp_path: Path) -> None:
    import subprocess
    import sys

    import duckdb

    db = tmp_path / "offline.duckdb"
    duckdb.connect(str(db)).execute("CREATE TABLE t AS SELECT 1 AS x").close()
    out = tmp_path / "x.csv"
    for sql in (f"COPY (SELECT 1) TO '{out}'", "SELECT 1; SELECT 2", "DELETE FROM t"):
        proc = subprocess.run([sys.executable, "-m", "console.cli", "query", "--db", str(db), sql],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and "refused" in proc.stderr, (sql, proc.stderr)
    assert not out.exists()
    ok = subprocess.run([sys.executable, "-m", "console.cli", "query", "--db", str(db), "SELECT x FROM t"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "1" in ok.stdout


# --------------------------------------------------------------------------- audit rows and parameters for `command`


def test_audit_rows_from_another_process_join_the_chain(live: Live) -> None:
    from console.respond.audit import ControlSocketAudit

    remote = ControlSocketAudit(socket_path(live.db))
    seq0 = live.chain.head[0]
    got = remote.append_many([("alice:responder", "command.issued", "job-a", {"n": 1, "x": [1.5, "é"]}),
                              ("alice:responder", "command.outcome", "job-a", None)])
    assert [r["seq"] for r in got] == [seq0 + 1, seq0 + 2]
    assert remote.sign_head() == {"seq": seq0 + 3}  # the owner's chain moved on, by one more row:
    rows = live.writer.read_query("SELECT seq, actor, action, payload FROM audit_log WHERE seq > ? ORDER BY seq",
                                  [seq0])
    assert rows[0][3] == '{"n":1,"x":[1.5,"é"]}'  # the JSON the chain hashes, as if appended locally
    peer, action, payload = rows[2][1], rows[2][2], json.loads(rows[2][3])
    assert action == "control.audit_append" and payload == {"rows": 2}  # who sent the rows above
    assert f"(pid {os.getpid()}, control socket)" in peer


def test_other_processes_may_record_command_rows_only(live: Live) -> None:
    seq0 = live.chain.head[0]
    for actor, action in (("alice", "collect.stop"), ("alice", "store.export"), ("console", "command.outcome"),
                          ("collector", "command.issued")):
        resp = live.server.handle({"op": "audit_append", "records": [[actor, action, None, None]]})
        assert not resp["ok"] and resp["refused"], (actor, action)
    assert live.chain.head[0] == seq0
    ok = live.server.handle({"op": "audit_append", "records": [["agent:gpu-a", "command.receipt", "j", {}],
                                                               ["alice", "rollback.decision", "j", {}]]})
    assert ok["ok"] and live.chain.head[0] == seq0 + 3


def test_bad_audit_requests_are_refused_and_append_nothing(live: Live) -> None:
    seq0 = live.chain.head[0]
    for bad in (None, [], [["only", "three", None]], [[1, "a", None, None]], [["a", "b", 3, None]]):
        resp = live.server.handle({"op": "audit_append", "records": bad})
        assert not resp["ok"] and "records" in resp["error"]
    assert live.chain.head[0] == seq0
    chainless = ControlServer(live.writer)
    resp = chainless.handle({"op": "audit_append", "records": [["a", "command.issued", None, None]]})
    assert not resp["ok"] and resp["refused"] and "no audit chain" in resp["error"]
    assert chainless.handle({"op": "ping"})["result"]["audit_chain"] is False  # `command` checks this first


def test_query_parameters_through_the_socket(live: Live) -> None:
    res, _pid = request(socket_path(live.db), {"op": "query", "sql": "SELECT count(*) FROM frames WHERE seq > ?",
                                               "params": [2]})
    assert res["rows"] == [[3]]
    resp = live.server.handle({"op": "query", "sql": "SELECT ?", "params": [{"not": "a scalar"}]})
    assert not resp["ok"] and "params" in resp["error"]
