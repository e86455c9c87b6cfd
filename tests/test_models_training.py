"""TrainingModel: live records, derived step time/throughput, stragglers, history merge; Qt-free models."""

from __future__ import annotations

import math
import pkgutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest

import console.models
from console.models.training import RingBuffer, TrainingModel, derive
from protos.types import N_METRICS, Frame, TrainRecord

T0 = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z in ns
S = 10**9


def rec(rank: int, step: int, ts_ns: int, *, job: str = "job-a", loss: float = 1.0, tokens: float = 1000.0,
        kind: str = "log", world: int = 4) -> TrainRecord:
    return TrainRecord(ts_ns, job, rank, rank % 8, world, 100 + rank, 1000, step, loss=loss, grad_norm=0.5,
                       lr=1e-4, tokens=tokens, kind=kind)


def frame(records: list[TrainRecord], host: str = "h1", seq: int = 1, simulated: bool = True) -> Frame:
    ts = max((r.ts_unix_ns for r in records), default=T0)
    return Frame(host, "e1", seq, ts, simulated, np.zeros((0, N_METRICS), np.float32), [], [], train=records)


def feed_steps(model: TrainingModel, rank_step_s: dict[int, float], n: int, start_ns: int = T0) -> None:
    """n steps per rank, rank r taking rank_step_s[r] seconds per step."""
    for step in range(n):
        records = [rec(r, step, start_ns + int(step * dt * S)) for r, dt in rank_step_s.items()]
        model.on_frame(frame(records, seq=step + 1))


def test_ring_buffer_keeps_newest_in_order() -> None:
    ring = RingBuffer(3, 2)
    assert ring.last() is None and ring.array().shape == (0, 2)
    for i in range(5):
        ring.append((i, 10 * i))
    assert len(ring) == 3
    assert ring.array()[:, 0].tolist() == [2, 3, 4]
    assert ring.last() is not None and ring.last()[1] == 40  # type: ignore[index]
    ring.replace(np.arange(10, dtype=float).reshape(5, 2))
    assert ring.array()[:, 0].tolist() == [4, 6, 8]
    ring.append((100, 0))
    assert ring.array()[:, 0].tolist() == [6, 8, 100]


def test_derive_step_time_and_throughput() -> None:
    ts = np.array([0.0, 2.0, 3.0, 3.0, 10.0])
    step = np.array([0.0, 2.0, 3.0, 3.0, 1.0])  # a repeat and a restart: no step time
    st, tp = derive(ts, step, np.full(5, 100.0))
    assert math.isnan(st[0]) and st[1] == 1.0 and st[2] == 1.0
    assert math.isnan(st[3]) and math.isnan(st[4])
    assert tp[1] == 100.0 and math.isnan(tp[3])


def test_init_registers_rank_and_log_adds_points() -> None:
    m = TrainingModel()
    m.on_frame(frame([rec(0, -1, T0, kind="init"), rec(1, -1, T0, kind="init")]))
    assert m.jobs() == ["job-a"] and m.ranks("job-a") == [0, 1]
    info = m.rank_info("job-a", 1)
    assert info is not None and info.registered and info.world_size == 4 and info.host == "h1"
    s0 = m.series("job-a", 0)
    assert s0 is not None and s0.step.size == 0

    v = m.version
    m.on_frame(frame([rec(0, 10, T0 + S, tokens=4000.0)]))
    m.on_frame(frame([rec(0, 12, T0 + 3 * S, tokens=4000.0, loss=0.9)]))
    assert m.version > v
    s0 = m.series("job-a", 0)
    assert s0 is not None
    assert s0.step.tolist() == [10, 12]
    assert s0.loss.tolist() == [1.0, 0.9]
    assert math.isnan(s0.step_time[0]) and s0.step_time[1] == pytest.approx(1.0)  # 2 s over 2 steps
    assert s0.throughput[1] == pytest.approx(4000.0)
    assert m.is_simulated("job-a")


def test_unknown_kind_ignored_duplicates_dropped_and_missing_step_implied() -> None:
    m = TrainingModel()
    m.on_frame(frame([rec(0, 5, T0), rec(0, 99, T0 + S, kind="other")]))
    v = m.version
    m.on_frame(frame([rec(0, 5, T0)]))  # at-least-once redelivery
    assert m.version == v
    m.on_frame(frame([rec(0, -1, T0 + 2 * S)]))  # no step given: the one after 5
    s = m.series("job-a", 0)
    assert s is not None and s.step.tolist() == [5, 6]
    assert s.step_time[1] == pytest.approx(2.0)


def test_series_are_bounded() -> None:
    m = TrainingModel(capacity=2000)
    for i in range(2100):
        m.on_frame(frame([rec(0, i, T0 + i * S // 10)]))
    s = m.series("job-a", 0)
    assert s is not None and s.step.size == 2000
    assert s.step[0] == 100 and s.step[-1] == 2099
    assert np.allclose(s.step_time[1:], 0.1)


def test_straggler_ranks() -> None:
    m = TrainingModel()
    feed_steps(m, {0: 1.0, 1: 1.0, 2: 1.5, 3: 1.02}, 30)
    assert m.straggler_ranks("job-a") == [2]
    medians = m.rank_step_time_medians("job-a")
    assert medians[2] == pytest.approx(1.5) and medians[0] == pytest.approx(1.0)
    # 1.15 is within 20 % of the median: not a straggler.
    m2 = TrainingModel()
    feed_steps(m2, {0: 1.0, 1: 1.0, 2: 1.15, 3: 1.0}, 30)
    assert m2.straggler_ranks("job-a") == []
    # Too few points or a single rank: no verdict.
    m3 = TrainingModel()
    feed_steps(m3, {0: 1.0, 1: 3.0}, 3)
    assert m3.straggler_ranks("job-a") == []
    assert m3.straggler_ranks("nope") == []


def test_straggler_uses_recent_window() -> None:
    m = TrainingModel()
    # rank 1 was slow long ago, then recovered: the last 50 points decide.
    feed_steps(m, {0: 1.0, 1: 2.0, 2: 1.0}, 40)
    start = T0 + 200 * S
    feed_steps(m, {0: 1.0, 1: 1.0, 2: 1.0}, 60, start_ns=start)
    assert m.straggler_ranks("job-a") == []


TRAIN_DDL = """
CREATE TABLE train_samples (
    host VARCHAR, epoch VARCHAR, seq BIGINT, ts TIMESTAMPTZ, job_id VARCHAR, rank INTEGER,
    local_rank INTEGER, world_size INTEGER, pid BIGINT, uid BIGINT, step BIGINT, kind VARCHAR,
    loss DOUBLE, grad_norm DOUBLE, lr DOUBLE, tokens DOUBLE, extra MAP(VARCHAR, DOUBLE), info VARCHAR,
    simulated BOOLEAN)
"""


def _query(con: duckdb.DuckDBPyConnection):  # type: ignore[no-untyped-def]
    return lambda sql, params: con.cursor().execute(sql, params).fetchall()


def _insert(con: duckdb.DuckDBPyConnection, rows: list[tuple[object, ...]]) -> None:
    con.executemany(
        "INSERT INTO train_samples VALUES (?, 'e1', ?, make_timestamptz(?::BIGINT), ?, ?, ?, 2, ?, 1000, ?, ?, "
        "?, 0.5, 1e-4, ?, MAP {}, NULL, true)",
        rows,
    )


def test_load_history_then_live_without_duplicates() -> None:
    con = duckdb.connect()
    con.execute(TRAIN_DDL)
    rows: list[tuple[object, ...]] = [("h1", 1, T0 // 1000, "job-a", 0, 0, 100, -1, "init", None, None)]
    for step in range(10):
        ts_ns = T0 + step * S + 123  # live ns; the store keeps microseconds
        rows.append(("h1", step + 2, ts_ns // 1000, "job-a", 0, 0, 100, step, "log", 2.0 - step / 10, 500.0))
        rows.append(("h2", step + 2, ts_ns // 1000, "job-a", 1, 0, 101, step, "log", 2.0, 500.0))
    rows.append(("h1", 99, T0 // 1000, "job-b", 0, 0, 100, 0, "log", 1.0, 1.0))
    _insert(con, rows)

    m = TrainingModel(_query(con))
    jobs = m.fetch_jobs()
    assert [j for j, _ in jobs] == ["job-a", "job-b"]
    m.apply_jobs(jobs)
    assert set(m.jobs()) == {"job-a", "job-b"}

    m.load_history("job-a")
    assert m.ranks("job-a") == [0, 1]
    info = m.rank_info("job-a", 0)
    assert info is not None and info.registered and info.host == "h1" and info.world_size == 2
    s = m.series("job-a", 0)
    assert s is not None and s.step.tolist() == list(range(10))
    assert np.allclose(s.step_time[1:], 1.0) and np.allclose(s.throughput[1:], 500.0)

    # The live stream redelivers step 9 (same record, ns precision), then goes on.
    m.on_frame(frame([rec(0, 9, T0 + 9 * S + 123, world=2)]))
    m.on_frame(frame([rec(0, 10, T0 + 10 * S + 123, world=2)]))
    s = m.series("job-a", 0)
    assert s is not None and s.step.tolist() == list(range(11))
    assert s.step_time[-1] == pytest.approx(1.0)


def test_history_merges_under_live_points() -> None:
    con = duckdb.connect()
    con.execute(TRAIN_DDL)
    _insert(con, [("h1", i + 1, (T0 + i * S) // 1000, "job-a", 0, 0, 100, i, "log", 1.0, 10.0) for i in range(5)])
    m = TrainingModel(_query(con))
    # Live arrived first (steps 4..6, step 4 also stored), history is applied later.
    for step in (4, 5, 6):
        m.on_frame(frame([rec(0, step, T0 + step * S)]))
    hist = m.fetch_history("job-a")
    m.apply_history(hist)
    s = m.series("job-a", 0)
    assert s is not None and s.step.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert np.allclose(s.step_time[1:], 1.0)  # recomputed across the seam


def test_models_import_without_qt() -> None:
    """Every console.models module imports with neither PySide6 nor pyqtgraph loaded."""
    names = [f"console.models.{m.name}" for m in pkgutil.iter_modules(console.models.__path__)]
    assert {"console.models.training", "console.models.host", "console.models.alerts",
            "console.models.replay"} <= set(names)
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph', 'shiboken6'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
