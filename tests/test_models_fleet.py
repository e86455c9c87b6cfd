"""FleetModel and HostTimeline, headless: no Qt is imported or needed."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from console.ingest.sink import CONNECTED, DISCONNECTED, GAP, LAGGING, HostStatus
from console.models.fleet import (
    METRIC_SCALES,
    NO_JOB_LABEL,
    SORT_HOST,
    SORT_JOB,
    SORT_VALUE,
    Emitter,
    FleetModel,
    natural_key,
)
from console.models.timeline import HostTimeline
from protos.types import (
    GPU_LOST,
    GPU_OK,
    METRIC_INDEX,
    METRIC_NAMES,
    N_METRICS,
    Description,
    Frame,
    Gap,
    GpuInfo,
    TrainRecord,
)

S = 1_000_000_000
T0 = 1_700_000_000 * S
TEMP = METRIC_INDEX["temp_c"]
UTIL = METRIC_INDEX["gpu_util_pct"]


class Clock:
    """A settable unix-ns clock."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def frame(host: str, temps: list[float] | None = None, n_gpus: int = 8, ts: int = T0, seq: int = 1,
          simulated: bool = False, states: list[int] | None = None, jobs: list[tuple[str, int, int]] | None = None,
          gpu_index: list[int] | None = None) -> Frame:
    """A frame with temp_c = temps (default 40) and util = 50; jobs = [(job, rank, local_rank)]."""
    values = np.full((n_gpus, N_METRICS), np.nan, dtype=np.float32)
    values[:, TEMP] = temps if temps is not None else 40.0
    values[:, UTIL] = 50.0
    train = [TrainRecord(ts, job, rank, lr, 64, 100 + lr, 1000, 1) for job, rank, lr in (jobs or [])]
    return Frame(host=host, epoch="e", seq=seq, ts_unix_ns=ts, simulated=simulated, gpu_values=values,
                 gpu_index=gpu_index if gpu_index is not None else list(range(n_gpus)),
                 gpu_state=states or [GPU_OK] * n_gpus, train=train)


def status(host: str, state: str = CONNECTED, address: str | None = None) -> HostStatus:
    return HostStatus(address or f"{host}:50051", host, state)


def model(**kw: Any) -> tuple[FleetModel, Clock]:
    clock = Clock()
    kw.setdefault("metric", "temp_c")
    return FleetModel(clock=clock, **kw), clock


def test_models_import_without_qt() -> None:
    code = (
        "import sys\n"
        "import console.models.fleet, console.models.timeline\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph', 'shiboken6')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_metric_has_a_fixed_scale() -> None:
    assert set(METRIC_SCALES) == set(METRIC_NAMES)
    for sc in METRIC_SCALES.values():
        assert sc.lo < sc.hi and sc.unit and sc.label and sc.reduce in ("mean", "max")
    assert (METRIC_SCALES["temp_c"].lo, METRIC_SCALES["temp_c"].hi) == (20.0, 95.0)
    assert (METRIC_SCALES["gpu_util_pct"].lo, METRIC_SCALES["gpu_util_pct"].hi) == (0.0, 100.0)


def test_frame_values_reach_the_image() -> None:
    m, _ = model()
    m.on_status(status("h1"))
    m.on_frame(frame("h1", [30, 31, 32, 33, 34, 35, 36, 94]))
    img = m.image()
    assert img.values.dtype == np.float32 and img.values.flags.c_contiguous
    assert img.values.shape == (1, 8)
    assert img.values[0, 7] == pytest.approx(94.0)
    assert not img.grey.any() and not img.na.any() and not img.absent.any()


def test_version_moves_only_on_change() -> None:
    m, _ = model()
    v0 = m.version
    m.on_frame(frame("h1"))
    v1 = m.version
    assert v1 > v0
    m.set_metric("temp_c")  # same metric: nothing changes
    m.set_sort(SORT_HOST)
    assert m.version == v1
    m.advance()  # same clock, nothing stale: no change
    assert m.version == v1


def test_disconnected_host_is_grey_not_stale_colors() -> None:
    m, _ = model()
    for h in ("a", "b"):
        m.on_status(status(h))
        m.on_frame(frame(h, [80.0] * 8))
    m.on_status(status("b", DISCONNECTED))
    img = m.image()
    row_b = m.host_row("b")
    assert img.grey[row_b].all()
    assert np.isnan(img.values[row_b]).all()
    assert not img.grey[m.host_row("a")].any()
    info = m.cell_info(row_b, 3)
    assert info["value"] is None and info["last_value"] == pytest.approx(80.0)
    assert info["state"] == DISCONNECTED
    m.on_status(status("b", CONNECTED))
    assert not m.image().grey[row_b].any()


@pytest.mark.parametrize("state", ["connecting", "rejected", "paused", LAGGING])
def test_every_non_live_state_is_grey(state: str) -> None:
    m, _ = model()
    m.on_status(status("a"))
    m.on_frame(frame("a"))
    m.on_status(status("a", state))
    assert m.image().grey.all()


def test_gap_state_keeps_colors() -> None:
    m, _ = model()
    m.on_status(status("a"))
    m.on_frame(frame("a"))
    m.on_gap("a", Gap("e", 1, 5, "evicted"))
    m.on_status(status("a", GAP))
    assert not m.image().grey.any()


def test_lost_gpu_is_grey_and_missing_metric_is_na() -> None:
    m, _ = model()
    m.on_status(status("a"))
    f = frame("a", states=[GPU_OK, GPU_LOST, GPU_OK, GPU_OK], n_gpus=4)
    f.gpu_values[2, TEMP] = np.nan
    m.on_frame(f)
    img = m.image()
    assert img.grey[0].tolist() == [False, True, False, False]
    assert img.na[0].tolist() == [False, False, True, False]
    assert m.cell_info(0, 1)["gpu_state"] == "lost"


def test_silent_host_goes_grey_after_stale_after_s() -> None:
    m, clock = model(stale_after_s=5.0)
    m.on_status(status("a"))
    m.on_frame(frame("a"))
    clock.now += 6 * S
    assert m.advance()
    assert m.image().grey.all()
    assert m.state_counts()[LAGGING] == 1
    assert m.cell_info(0, 0)["state"] == "stale"
    clock.now += S
    m.on_frame(frame("a", ts=clock.now))
    assert not m.image().grey.any()


def test_fewer_gpus_than_columns_are_absent() -> None:
    m, _ = model()
    m.on_status(status("big"))
    m.on_status(status("small"))
    m.on_frame(frame("big", n_gpus=8))
    m.on_frame(frame("small", n_gpus=4))
    img = m.image()
    small = m.host_row("small")
    assert img.absent[small].tolist() == [False] * 4 + [True] * 4
    assert not img.grey[small].any() and not img.na[small].any()
    assert m.cell_info(small, 6)["gpu_state"] == "absent"


def test_gpu_columns_grow_beyond_max_gpus() -> None:
    m, _ = model(max_gpus=8)
    m.on_frame(frame("a", n_gpus=16))
    assert m.n_gpus == 16
    assert m.image().values.shape == (1, 16)


def test_host_capacity_grows() -> None:
    m, _ = model(max_hosts=4)
    for i in range(10):
        m.on_status(status(f"h{i}"))
        m.on_frame(frame(f"h{i}", [20.0 + i] * 8))
    assert m.n_hosts == 10
    img = m.image()
    assert img.values.shape == (10, 8)
    assert img.values[m.host_row("h9"), 0] == pytest.approx(29.0)
    assert m.timeline.capacity >= 10


def test_sort_by_host_is_natural() -> None:
    m, _ = model()
    for h in ("node-10", "node-2", "node-1"):
        m.on_frame(frame(h))
    assert m.row_labels() == ["node-1", "node-2", "node-10"]
    assert natural_key("a2") < natural_key("a10")


def test_sort_by_job_groups_rows_and_maps_local_rank_to_gpu() -> None:
    m, _ = model(sort=SORT_JOB)
    # host c runs job-b on GPUs 0..1; host a runs job-a (ranks 8..9); host b has no job.
    m.on_frame(frame("c", n_gpus=2, jobs=[("job-b", 0, 0), ("job-b", 1, 1)]))
    m.on_frame(frame("b", n_gpus=2))
    m.on_frame(frame("a", n_gpus=2, jobs=[("job-a", 8, 0), ("job-a", 9, 1)]))
    assert m.row_labels() == ["a", "c", "b"]
    groups = m.groups()
    assert [(g.label, g.start, g.n_rows) for g in groups] == [("job-a", 0, 1), ("job-b", 1, 1), (NO_JOB_LABEL, 2, 1)]
    info = m.cell_info(0, 1)
    assert (info["host"], info["gpu"], info["job"], info["rank"]) == ("a", 1, "job-a", 9)
    assert m.cell_info(2, 0)["job"] is None and m.cell_info(2, 0)["rank"] is None
    assert m.gpu_job("c", 1) == ("job-b", 1)
    assert m.host_job("c") == "job-b"


def test_latest_train_record_wins_and_frames_without_records_keep_the_mapping() -> None:
    m, _ = model()
    f = frame("a", n_gpus=2, jobs=[("old", 0, 0)])
    f.train.append(TrainRecord(T0 + 5, "new", 3, 0, 4, 1, 1, 2))
    m.on_frame(f)
    assert m.gpu_job("a", 0) == ("new", 3)
    m.on_frame(frame("a", n_gpus=2, seq=2))
    assert m.gpu_job("a", 0) == ("new", 3)


def test_job_mapping_expires() -> None:
    m, clock = model(job_ttl_s=60.0)
    m.on_frame(frame("a", n_gpus=1, jobs=[("j", 0, 0)]))
    clock.now += 61 * S
    m.advance()
    assert m.gpu_job("a", 0) is None


def test_sort_by_value_descending_with_grey_last() -> None:
    m, _ = model(sort=SORT_VALUE)
    for h, t in (("cool", 30.0), ("hot", 90.0), ("warm", 60.0), ("off", 99.0)):
        m.on_status(status(h))
        m.on_frame(frame(h, [t] * 8))
    m.on_status(status("off", DISCONNECTED))
    assert m.row_labels() == ["hot", "warm", "cool", "off"]
    layout = m.layout_version
    m.on_frame(frame("cool", [95.0] * 8, seq=2))
    assert m.row_labels()[0] == "cool"
    assert m.layout_version > layout


def test_select_emits_host_and_gpu_and_follows_resort() -> None:
    m, _ = model()
    for h in ("b", "a"):
        m.on_frame(frame(h))
    seen: list[tuple[Any, Any]] = []
    m.events.selection.connect(lambda host, gpu: seen.append((host, gpu)))
    m.select(1, 3)
    assert seen == [("b", 3)] and m.selection == ("b", 3)
    m.select(1, 3)  # unchanged: no event
    m.select(None)
    assert seen == [("b", 3), (None, None)]
    m.select_host("a", 2)
    assert m.selection == ("a", 2)


def test_emitter_holds_bound_methods_weakly_and_survives_failures() -> None:
    calls: list[int] = []

    class Sink:
        def on(self, x: int) -> None:
            calls.append(x)

    def boom(x: int) -> None:
        raise RuntimeError("boom")

    e = Emitter("test")
    sink = Sink()
    e.connect(boom)
    e.connect(sink.on)
    e.emit(1)
    assert calls == [1]
    del sink
    e.emit(2)
    assert calls == [1] and len(e) == 1
    e.disconnect(boom)
    assert len(e) == 0


def test_simulated_flag_per_host() -> None:
    m, _ = model()
    m.on_frame(frame("real"))
    assert not m.any_simulated
    m.on_frame(frame("sim", simulated=True))
    assert m.any_simulated and m.n_simulated == 1
    assert m.is_simulated("sim") and not m.is_simulated("real")
    assert m.cell_info(m.host_row("sim"), 0)["simulated"]


def test_status_by_address_then_description_keeps_one_row() -> None:
    m, _ = model()
    m.on_status(HostStatus("10.0.0.7:50051", "10.0.0.7:50051", "connecting"))
    desc = Description("gpu-node-7", "0.1", "e", False, [GpuInfo(i, "H100", f"u{i}", 81559.0, "550") for i in range(8)],
                       [], list(METRIC_NAMES), 1, 1.0, 0, 0, "ok")
    m.on_description("10.0.0.7:50051", desc)
    m.on_status(HostStatus("10.0.0.7:50051", "gpu-node-7", CONNECTED))
    assert m.hosts == ["gpu-node-7"]
    assert m.n_gpus == 8
    img = m.image()
    assert img.na.all()  # described GPUs, no frame yet: live but not available
    m.on_frame(frame("gpu-node-7"))
    assert m.n_hosts == 1 and not m.image().na.any()
    assert m.cell_info(0, 0)["address"] == "10.0.0.7:50051"


def test_state_counts() -> None:
    m, _ = model()
    m.on_status(status("a"))
    m.on_status(status("b", DISCONNECTED))
    m.on_status(status("c", LAGGING))
    counts = m.state_counts()
    assert counts[CONNECTED] == 1 and counts[DISCONNECTED] == 1 and counts[LAGGING] == 1 and counts[GAP] == 0


def test_cell_info_outside_grid_raises() -> None:
    m, _ = model()
    m.on_frame(frame("a", n_gpus=2))
    with pytest.raises(IndexError):
        m.cell_info(0, 2)
    with pytest.raises(ValueError):
        m.set_metric("nope")
    with pytest.raises(ValueError):
        m.set_sort("nope")


# ---- status history ---------------------------------------------------------------------------


def test_timeline_buckets_by_time_not_arrival() -> None:
    m, clock = model()
    m.on_status(status("a"))
    m.on_frame(frame("a", [30.0] * 8, ts=T0))
    clock.now = T0 + 300_000_000
    m.on_frame(frame("a", [50.0] * 8, ts=clock.now, seq=2))  # same second: replaces
    tl = m.timeline_image()
    assert tl.values.shape == (1, 300)
    assert tl.values[0, -1] == pytest.approx(50.0)
    assert np.isnan(tl.values[0, :-1]).all()
    clock.now = T0 + 3 * S + 1
    m.on_frame(frame("a", [70.0] * 8, ts=clock.now, seq=3))
    tl = m.timeline_image()
    assert tl.values[0, -1] == pytest.approx(70.0)
    assert np.isnan(tl.values[0, -3:-1]).all()  # two seconds without frames
    assert tl.values[0, -4] == pytest.approx(50.0)
    assert tl.head_ns == (T0 // S + 3) * S


def test_timeline_late_frame_lands_in_its_own_bucket() -> None:
    m, clock = model()
    m.on_status(status("a"))
    clock.now = T0 + 10 * S
    m.advance()
    m.on_frame(frame("a", [60.0] * 8, ts=T0 + 5 * S))  # replayed after a reconnect
    tl = m.timeline_image()
    assert tl.values[0, -6] == pytest.approx(60.0)
    assert np.isnan(tl.values[0, -1])


def test_timeline_scrolls_without_frames_and_greys_offline_hosts() -> None:
    m, clock = model()
    m.on_status(status("a"))
    m.on_status(status("b"))
    m.on_frame(frame("a"))
    m.on_frame(frame("b"))
    m.on_status(status("b", DISCONNECTED))
    clock.now += 4 * S
    assert m.advance()
    tl = m.timeline_image()
    b = m.host_row("b")
    assert tl.grey[b, -4:].all()  # offline since then
    assert not tl.grey[m.host_row("a"), -4:].any()
    assert np.isnan(tl.values[:, -4:]).all()


def test_timeline_uses_mean_for_levels_and_max_for_counters() -> None:
    m, _ = model()
    m.on_frame(frame("a", [30.0, 50.0, np.nan, 70.0], n_gpus=4))
    assert m.timeline_image().values[0, -1] == pytest.approx(50.0)
    m2, _ = model(metric="ecc_uncorrected")
    f = frame("a", n_gpus=4)
    f.gpu_values[:, METRIC_INDEX["ecc_uncorrected"]] = [0, 0, 1, 0]
    m2.on_frame(f)
    assert m2.timeline_image().values[0, -1] == pytest.approx(1.0)


def test_metric_change_restarts_history() -> None:
    m, _ = model()
    m.on_frame(frame("a"))
    m.set_metric("gpu_util_pct")
    assert np.isnan(m.timeline_image().values).all()
    assert m.scale.unit == "%"
    m.on_frame(frame("a", seq=2))
    assert m.timeline_image().values[0, -1] == pytest.approx(50.0)


def test_host_timeline_window_and_clock_skew() -> None:
    tl = HostTimeline(capacity=2, n_buckets=10, bucket_ns=S)
    assert tl.advance(T0, np.zeros(2, dtype=bool))
    assert not tl.advance(T0 + S // 2, np.zeros(2, dtype=bool))
    assert tl.put(0, T0 + 100 * S, 1.0)  # host clock ahead: clamped to now
    assert not tl.put(0, T0 - 10 * S, 2.0)  # older than the window
    values, grey = tl.matrix(np.array([0, 1]))
    assert values[0, -1] == 1.0 and math.isnan(values[1, -1]) and not grey.any()
    tl.advance(T0 + 50 * S, np.array([False, True]))  # more than a window later
    values, grey = tl.matrix(np.array([0, 1]))
    assert np.isnan(values).all() and grey[1].all() and not grey[0].any()


def test_gpu_index_places_columns_and_layout_changes_clear_old_columns() -> None:
    m, _ = model()
    m.on_status(status("a"))
    m.on_frame(frame("a", [50.0, 60.0], n_gpus=2, gpu_index=[1, 3]))
    img = m.image()
    assert img.values.shape == (1, 4)
    assert img.absent[0].tolist() == [True, False, True, False]
    assert img.values[0, 3] == pytest.approx(60.0)
    m.on_frame(frame("a", [40.0] * 8, seq=2))
    m.on_frame(frame("a", [41.0] * 4, n_gpus=4, seq=3))  # four GPUs gone (e.g. fell off the bus)
    img = m.image()
    assert img.absent[0].tolist() == [False] * 4 + [True] * 4
    assert np.isnan(img.values[0, 4:]).all() and (img.values[0, :4] == 41.0).all()
