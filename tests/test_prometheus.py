"""Prometheus exporter: dcgm-exporter names, units and labels, the simulated label, NaN handling, HTTP."""

from __future__ import annotations

import math
import sys
import time
import urllib.request

import numpy as np
import pytest

from protos.types import (
    GPU_LOST,
    GPU_OK,
    METRIC_INDEX,
    N_METRICS,
    SEVERITY_CRITICAL,
    Event,
    Frame,
    GpuInfo,
    GpuProcess,
    TrainRecord,
)

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from agent.prometheus import (  # noqa: E402
    DCGM_FIELDS,
    TRAIN_SERIES_MAX,
    MetricsExporter,
    MetricsUnavailableError,
)

DCGM_REQUIRED = (
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_MEM_COPY_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_SM_CLOCK",
    "DCGM_FI_DEV_MEM_CLOCK",
    "DCGM_FI_DEV_XID_ERRORS",
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
    "DCGM_FI_DEV_PCIE_TX_THROUGHPUT",
    "DCGM_FI_DEV_PCIE_RX_THROUGHPUT",
)


def gpus(n: int = 2, driver: str = "550.54.15") -> list[GpuInfo]:
    return [
        GpuInfo(i, "NVIDIA H100 80GB HBM3", f"GPU-{i:08x}-aaaa", 81559.0, driver, f"00000000:{0x18 + i:02X}:00.0")
        for i in range(n)
    ]


def frame(n: int = 2, *, simulated: bool = False, seq: int = 1, events: list[Event] | None = None,
          train: list[TrainRecord] | None = None, host: str = "gpu-01") -> Frame:
    v = np.full((n, N_METRICS), np.nan, dtype=np.float32)
    c = METRIC_INDEX
    v[:, c["gpu_util_pct"]] = [87, 12][:n] if n <= 2 else 50
    v[:, c["mem_util_pct"]] = 40
    v[:, c["mem_used_mib"]] = 1000.5
    v[:, c["mem_total_mib"]] = 81559
    v[:, c["temp_c"]] = 61
    v[:, c["power_w"]] = 623.4  # float32: 623.4000244..., must print as 623.4
    v[:, c["power_limit_w"]] = 700
    v[:, c["sm_clock_mhz"]] = 1980
    v[:, c["mem_clock_mhz"]] = 2619
    v[:, c["ecc_corrected"]] = 3
    v[:, c["ecc_uncorrected"]] = 0
    v[:, c["pcie_tx_kbs"]] = 123456
    v[:, c["pcie_rx_kbs"]] = 654321
    return Frame(
        host=host, epoch="e", seq=seq, ts_unix_ns=1_700_000_000_000_000_000, simulated=simulated,
        gpu_values=v, gpu_index=list(range(n)), gpu_state=[GPU_OK] * n,
        processes=[GpuProcess(0, 11, 10.0), GpuProcess(0, 12, 20.0)],
        train=train or [], events=events or [],
    )


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def one(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, gpu: str = "0") -> float:
    got = [v for labels, v in samples[name] if labels.get("gpu") == gpu]
    assert len(got) == 1, (name, samples.get(name))
    return got[0]


def test_dcgm_names_units_and_labels() -> None:
    ex = MetricsExporter(0, "127.0.0.1")
    ex.update(frame(), gpus())
    s = parse(ex.render())
    for name in DCGM_REQUIRED:
        assert name in s, name
    assert one(s, "DCGM_FI_DEV_GPU_UTIL") == 87
    assert one(s, "DCGM_FI_DEV_GPU_UTIL", "1") == 12
    assert one(s, "DCGM_FI_DEV_FB_USED") == 1000.5  # MiB, as dcgm-exporter
    assert one(s, "DCGM_FI_DEV_FB_FREE") == pytest.approx(81559 - 1000.5)
    assert one(s, "DCGM_FI_DEV_POWER_USAGE") == 623.4  # W, rounded from float32
    assert one(s, "DCGM_FI_DEV_SM_CLOCK") == 1980  # MHz
    assert one(s, "DCGM_FI_DEV_PCIE_TX_THROUGHPUT") == 123456  # KB/s
    assert one(s, "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL") == 3
    assert one(s, "DCGM_FI_DEV_XID_ERRORS") == 0  # no XID yet
    labels = next(lab for lab, _ in s["DCGM_FI_DEV_GPU_TEMP"] if lab["gpu"] == "1")
    assert labels == {
        "gpu": "1",
        "UUID": "GPU-00000001-aaaa",
        "pci_bus_id": "00000000:19:00.0",
        "device": "nvidia1",
        "modelName": "NVIDIA H100 80GB HBM3",
        "Hostname": "gpu-01",
        "DCGM_FI_DRIVER_VERSION": "550.54.15",
    }
    # Real GPUs carry no simulated label at all, so their series match dcgm-exporter's label set.
    assert all("simulated" not in lab for lab, _ in s["DCGM_FI_DEV_GPU_TEMP"])
    # Every dcgm-named family is a gauge (a counter would be renamed to *_total by the client).
    text = ex.render()
    for name, _, _ in DCGM_FIELDS:
        assert f"# TYPE {name} gauge" in text


def test_simulated_gpus_are_labelled_everywhere() -> None:
    ex = MetricsExporter(0, "127.0.0.1")
    rec = TrainRecord(time.time_ns(), "job-1", 3, 3, 8, 4242, 1000, 17, loss=2.5, lr=1e-4)
    ex.update(frame(simulated=True, train=[rec]), gpus(driver="simulated"))
    s = parse(ex.render())
    per_gpu = [n for n in s if n.startswith("DCGM_FI_") or n.startswith("gpusoc_gpu_")]
    assert per_gpu
    for name in per_gpu:
        for labels, _ in s[name]:
            assert labels.get("simulated") == "true", name
    info = s["gpusoc_agent_info"][0][0]
    assert info["simulated"] == "true"
    loss = s["gpusoc_train_loss"]
    assert loss == [({"job_id": "job-1", "rank": "3", "Hostname": "gpu-01", "simulated": "true"}, 2.5)]


def test_not_available_is_omitted_and_lost_gpu_reported() -> None:
    f = frame()
    f.gpu_values[1, :] = np.nan
    f.gpu_state[1] = GPU_LOST
    f.gpu_values[0, METRIC_INDEX["ecc_corrected"]] = np.nan  # e.g. consumer GPU without ECC
    ex = MetricsExporter(0, "127.0.0.1")
    ex.update(f, gpus())
    s = parse(ex.render())
    assert [lab["gpu"] for lab, _ in s["DCGM_FI_DEV_GPU_TEMP"]] == ["0"]
    assert "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL" not in s  # NaN is "unknown", never a fake 0
    assert [lab["gpu"] for lab, _ in s["DCGM_FI_DEV_FB_FREE"]] == ["0"]
    assert one(s, "gpusoc_gpu_state", "1") == GPU_LOST
    assert one(s, "gpusoc_gpu_state", "0") == GPU_OK
    for values in s.values():
        assert all(not math.isnan(v) for _, v in values)


def test_last_xid_is_kept_per_gpu_and_events_counted() -> None:
    ex = MetricsExporter(0, "127.0.0.1")
    xid = Event(time.time_ns(), "xid", SEVERITY_CRITICAL, 1, 0, "XID 79", {"xid": "79"})
    ex.update(frame(events=[xid]), gpus())
    ex.update(frame(seq=2), gpus())  # later frame without events: the last XID stays
    s = parse(ex.render())
    assert one(s, "DCGM_FI_DEV_XID_ERRORS", "1") == 79
    assert one(s, "DCGM_FI_DEV_XID_ERRORS", "0") == 0
    ev = s["gpusoc_agent_events_total"]
    assert ev == [({"kind": "xid", "severity": "critical"}, 1.0)]
    assert s["gpusoc_agent_frames_total"][0][1] == 2
    assert one(s, "gpusoc_gpu_processes", "0") == 2


def test_training_series_are_bounded() -> None:
    ex = MetricsExporter(0, "127.0.0.1")
    recs = [TrainRecord(time.time_ns(), f"job-{i}", 0, 0, 1, 1, 0, i, loss=float(i))
            for i in range(TRAIN_SERIES_MAX + 10)]
    ex.update(frame(train=recs), gpus())
    s = parse(ex.render())
    assert len(s["gpusoc_train_loss"]) == TRAIN_SERIES_MAX
    assert len(s["gpusoc_train_step"]) == TRAIN_SERIES_MAX


def test_update_never_raises() -> None:
    ex = MetricsExporter(0, "127.0.0.1")
    bad = frame()
    bad.gpu_index = [0]  # row count mismatch: a bug elsewhere must not stop the tick loop
    ex.update(bad, gpus())
    ex.update(frame(), gpus())
    assert "DCGM_FI_DEV_GPU_UTIL" in parse(ex.render())


def test_serves_http_and_openmetrics() -> None:
    with MetricsExporter.from_listen("127.0.0.1:0") as ex:
        assert ex.port > 0
        ex.update(frame(), gpus())
        url = f"http://127.0.0.1:{ex.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = resp.read().decode()
        assert 'DCGM_FI_DEV_GPU_UTIL{' in body and "process_resident_memory_bytes" in body
        req = urllib.request.Request(url, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            om = resp.read().decode()
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse

        names = {f.name for f in om_parse(om)}
        assert "DCGM_FI_DEV_GPU_UTIL" in names
    ex.close()  # second close is harmless


def test_bind_conflict_is_an_oserror() -> None:
    with MetricsExporter(0, "127.0.0.1") as first, pytest.raises(OSError):
        MetricsExporter(first.port, "127.0.0.1").start()


def test_from_listen_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        MetricsExporter.from_listen("9400")
    with pytest.raises(ValueError):
        MetricsExporter(70000)


def test_missing_prometheus_client_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(MetricsUnavailableError, match="pip install prometheus-client"):
        MetricsExporter(0)


def test_importing_the_agent_does_not_import_prometheus_client() -> None:
    import subprocess

    code = (
        "import sys, agent.prometheus, agent.main, agent.cli; "
        "print('prometheus_client' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_with_the_simulated_collector() -> None:
    """End to end with the real simulated collector and runtime tick, as the agent wires it."""
    import asyncio

    from agent.buffer import FrameBuffer
    from agent.collect.simulated import SimulatedCollector
    from agent.runtime import AgentRuntime

    async def go() -> str:
        col = SimulatedCollector(4, host="sim-host")
        col.inject_xid(2, 48)
        rt = AgentRuntime("sim-host", col, FrameBuffer(max_frames=100, max_bytes=1 << 20), 1.0)
        ex = MetricsExporter(0, "127.0.0.1")
        on_frame = ex.listener(col.gpus())  # what agent/main.py registers with the runtime
        for _ in range(3):
            on_frame(await rt.tick())
        return ex.render()

    s = parse(asyncio.run(go()))
    assert len(s["DCGM_FI_DEV_GPU_TEMP"]) == 4
    assert one(s, "DCGM_FI_DEV_XID_ERRORS", "2") == 48
    assert all(lab["simulated"] == "true" and lab["Hostname"] == "sim-host" for lab, _ in s["DCGM_FI_DEV_SM_CLOCK"])
