"""ReplaySource: read-only audit file, frames at a time, the replay clock, and driving the live models."""

from __future__ import annotations

import itertools
from pathlib import Path

import duckdb
import numpy as np
import pytest

from console.models.alerts import EventsLogModel
from console.models.host import HostDrilldownModel
from console.models.replay import ReplaySource
from console.models.training import TrainingModel
from protos.types import GPU_LOST, GPU_OK, METRIC_INDEX, METRIC_NAMES

T0 = 1_767_225_600 * 10**9
S = 10**9

DDL = f"""
CREATE TABLE gpu_samples (host VARCHAR NOT NULL, epoch VARCHAR NOT NULL, seq BIGINT NOT NULL, ts TIMESTAMPTZ NOT NULL,
    gpu_index SMALLINT NOT NULL, gpu_state VARCHAR NOT NULL, simulated BOOLEAN NOT NULL,
    {", ".join(f"{m} REAL" for m in METRIC_NAMES)});
CREATE TABLE train_samples (host VARCHAR NOT NULL, epoch VARCHAR NOT NULL, seq BIGINT NOT NULL,
    ts TIMESTAMPTZ NOT NULL, job_id VARCHAR, rank INTEGER, local_rank INTEGER, world_size INTEGER, pid BIGINT,
    uid BIGINT, step BIGINT, kind VARCHAR, loss DOUBLE, grad_norm DOUBLE, lr DOUBLE, tokens DOUBLE,
    extra MAP(VARCHAR, DOUBLE), info VARCHAR, simulated BOOLEAN NOT NULL);
CREATE TABLE events (host VARCHAR NOT NULL, epoch VARCHAR NOT NULL, seq BIGINT NOT NULL, ts TIMESTAMPTZ NOT NULL,
    kind VARCHAR NOT NULL, severity VARCHAR NOT NULL, gpu_index SMALLINT, pid BIGINT, detail VARCHAR, attrs VARCHAR,
    simulated BOOLEAN NOT NULL);
"""


def ts_us(ns: int) -> int:
    return ns // 1000


def make_audit_file(path: Path, seconds: int = 10) -> Path:
    """Host 'a' (simulated) from t=0, host 'b' (real) from t=3; 2 GPUs each at 1 Hz; 2 train records per
    second on 'a' (ranks 0, 1 at +0.25 s and +0.75 s), one event on 'b' at t=6.5 s."""
    con = duckdb.connect(str(path))
    con.execute(DDL)
    cols = ", ".join("?" for _ in METRIC_NAMES)
    rows = []
    for host, first, sim in (("a", 0, True), ("b", 3, False)):
        for s in range(first, seconds):
            for g in range(2):
                vals = [float(100 * s + g)] * len(METRIC_NAMES)
                state = "lost" if (host == "b" and g == 1 and s >= 8) else "ok"
                rows.append([host, "ep-" + host, s + 1, ts_us(T0 + s * S), g, state, sim, *vals])
    con.executemany(f"INSERT INTO gpu_samples VALUES (?, ?, ?, make_timestamptz(?::BIGINT), ?, ?, ?, {cols})", rows)
    train: list[tuple[object, ...]] = [
        ("a", 1, ts_us(T0), "job-x", r, r, 2, 10 + r, 1000, -1, "init", None, None, '{"cmd": "train.py"}')
        for r in range(2)
    ]
    for s in range(seconds):
        for r, frac in ((0, 0.25), (1, 0.75)):
            train.append(("a", s + 1, ts_us(T0 + s * S + int(frac * S)), "job-x", r, r, 2, 10 + r, 1000, s, "log",
                          3.0 - 0.1 * s, 4096.0, None))
    con.executemany(
        "INSERT INTO train_samples VALUES (?, 'ep-a', ?, make_timestamptz(?::BIGINT), ?, ?, ?, ?, ?, ?, ?, ?, ?, "
        "0.5, 1e-4, ?, MAP {'mfu': 0.4}, ?, true)",
        train,
    )
    con.execute(
        "INSERT INTO events VALUES ('b', 'ep-b', 7, make_timestamptz(?::BIGINT), 'xid', 'critical', 1, 0, 'XID 79', "
        "'{\"xid\": \"79\"}', false)",
        [ts_us(T0 + 6 * S + S // 2)],
    )
    con.close()
    return path


@pytest.fixture
def audit(tmp_path: Path) -> Path:
    return make_audit_file(tmp_path / "audit.duckdb")


def test_opens_read_only_and_reads_range(audit: Path) -> None:
    with ReplaySource(audit) as src:
        assert src.start_ns == T0 and src.end_ns == T0 + 9 * S + 3 * S // 4
        assert src.hosts() == ["a", "b"]
        with pytest.raises(duckdb.Error):
            src.query("CREATE TABLE evil (i INTEGER)", [])
        assert src.query("SELECT count(*) FROM gpu_samples", []) == [(34,)]
    with pytest.raises(FileNotFoundError):
        ReplaySource(audit.parent / "missing.duckdb")
    other = audit.parent / "other.duckdb"
    duckdb.connect(str(other)).close()
    with pytest.raises(ValueError):
        ReplaySource(other)


def test_frames_at_reconstructs_every_host(audit: Path) -> None:
    src = ReplaySource(audit)
    frames = src.frames_at(T0 + 5 * S + S // 2)  # records in (4.5 s, 5.5 s]
    assert [f.host for f in frames] == ["a", "b"]
    a, b = frames
    assert a.ts_unix_ns == T0 + 5 * S and b.ts_unix_ns == T0 + 5 * S
    assert a.simulated and not b.simulated
    assert a.epoch == "ep-a" and a.seq == 6
    assert a.gpu_index == [0, 1] and a.gpu_state == [GPU_OK, GPU_OK]
    assert a.gpu_values.dtype == np.float32 and a.gpu_values.shape == (2, len(METRIC_NAMES))
    assert a.gpu_values[1, METRIC_INDEX["temp_c"]] == 501.0
    assert [(r.rank, r.step, r.ts_unix_ns) for r in a.train] == [(1, 4, T0 + 4 * S + 3 * S // 4),
                                                                 (0, 5, T0 + 5 * S + S // 4)]
    rec0 = a.train[1]
    assert rec0.kind == "log" and rec0.job_id == "job-x" and rec0.extra == {"mfu": 0.4}
    assert rec0.loss == pytest.approx(2.5) and rec0.tokens == 4096.0
    assert b.train == [] and b.events == []

    # Before host b's first sample it is absent; the init records come with the first frame.
    early = src.frames_at(T0 + S // 2)
    assert [f.host for f in early] == ["a"]
    assert sorted((r.kind, r.rank) for r in early[0].train) == [("init", 0), ("init", 1), ("log", 0)]
    assert early[0].train[0].info == {"cmd": "train.py"}

    ev_frames = {f.host: f for f in src.frames_between(T0 + 6 * S, T0 + 7 * S)}
    (ev,) = ev_frames["b"].events
    assert ev.kind == "xid" and ev.severity == 3 and ev.gpu_index == 1 and ev.attrs == {"xid": "79"}
    late = {f.host: f for f in src.frames_at(T0 + 8 * S)}
    assert late["b"].gpu_state == [GPU_OK, GPU_LOST]
    src.close()


def test_lookback_hides_silent_hosts(audit: Path) -> None:
    src = ReplaySource(audit, lookback_s=2.0)
    # 20 s after the end nobody has a sample within 2 s.
    assert src.frames_at(T0 + 30 * S) == []
    assert [f.host for f in ReplaySource(audit).frames_at(T0 + 30 * S)] == ["a", "b"]


def test_clock_play_tiles_windows_and_pauses_at_end(audit: Path) -> None:
    src = ReplaySource(audit)
    assert src.position_ns == src.start_ns and not src.playing
    assert src.advance(1.0) is None  # paused
    t0, t1 = src.seek(T0 - 100 * S)  # clamped to the start
    assert t1 == src.start_ns and t1 - t0 == src.window_ns
    with pytest.raises(ValueError):
        src.play(0)
    src.play(speed=4.0)
    windows: list[tuple[int, int]] = []
    while src.playing:
        w = src.advance(0.3)  # 1.2 recorded seconds per tick
        assert w is not None
        windows.append(w)
    assert src.at_end and src.position_ns == src.end_ns
    assert all(a[1] == b[0] for a, b in itertools.pairwise(windows))  # contiguous
    assert windows[0][1] - windows[0][0] == int(1.2 * S)
    # Every stored record is delivered exactly once over the tiled windows (plus the seek window).
    seen = [(r.rank, r.step, r.kind) for f in src.frames_between(*src.seek(src.start_ns)) for r in f.train]
    for w in windows:
        seen += [(r.rank, r.step, r.kind) for f in src.frames_between(*w) for r in f.train]
    assert len(seen) == len(set(seen)) == 2 + 20
    src.seek(src.end_ns + S)  # clamped to the end
    src.play()  # at the end: stays paused
    assert not src.playing and src.at_end


def test_replay_drives_the_live_models(audit: Path) -> None:
    src = ReplaySource(audit)
    training = TrainingModel()
    host = HostDrilldownModel(None, window_s=600)
    host.select_host("b")
    log = EventsLogModel()
    src.seek(src.start_ns)
    src.play(speed=1.0)
    window = src.frames_at(src.start_ns)
    while True:
        for f in window:
            for consumer in (training, host, log):
                consumer.on_frame(f)
        w = src.advance(1.0)
        if w is None:
            break
        window = src.frames_between(*w)
    s = training.series("job-x", 0)
    assert s is not None and s.step.tolist() == list(range(10))
    assert np.allclose(s.step_time[1:], 1.0)
    assert training.straggler_ranks("job-x") == []
    assert training.is_simulated("job-x")
    t, v = host.series(1)
    assert t.size == 7 and v[-1, host.metrics.index("temp_c")] == 901.0
    assert host.gpu_state(1) == GPU_LOST
    assert [r.detail for r in log.rows()] == ["XID 79"]
