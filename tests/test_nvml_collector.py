"""NvmlCollector against a fake pynvml: values, units, NaN policy, lost GPUs, XID, processes, no driver."""

from __future__ import annotations

import math

import numpy as np
import pynvml
import pytest
from fake_pynvml import MIB, FakeGpu, make_fake_pynvml

from agent.collect.base import NoDriverError
from agent.collect.nvml import NvmlCollector
from protos.types import (
    GPU_ERROR,
    GPU_LOST,
    GPU_OK,
    METRIC_INDEX,
    N_METRICS,
    SEVERITY_CRITICAL,
    SEVERITY_INFO,
)

C = METRIC_INDEX


def _col(values: np.ndarray, gpu: int, name: str) -> float:
    return float(values[gpu, C[name]])


def test_healthy_two_gpus_fill_every_column_with_converted_units() -> None:
    fake = make_fake_pynvml(gpus=2)
    col = NvmlCollector(nvml_module=fake)
    tick = col.sample()
    assert tick.values.shape == (2, N_METRICS)
    assert tick.values.dtype == np.float32
    assert tick.gpu_index == [0, 1]
    assert tick.gpu_state == [GPU_OK, GPU_OK]
    assert not np.isnan(tick.values).any()
    g = FakeGpu()
    for gpu in (0, 1):
        v = tick.values
        assert _col(v, gpu, "gpu_util_pct") == g.util_gpu
        assert _col(v, gpu, "mem_util_pct") == g.util_mem
        assert _col(v, gpu, "mem_used_mib") == pytest.approx(1024.0)
        assert _col(v, gpu, "mem_total_mib") == pytest.approx(81559.0)
        assert _col(v, gpu, "temp_c") == g.temp
        assert _col(v, gpu, "power_w") == pytest.approx(312.5)
        assert _col(v, gpu, "power_limit_w") == pytest.approx(700.0)
        assert _col(v, gpu, "sm_clock_mhz") == g.sm_clock
        assert _col(v, gpu, "mem_clock_mhz") == g.mem_clock
        assert _col(v, gpu, "throttle_reasons") == g.throttle
        assert _col(v, gpu, "ecc_corrected") == g.ecc_corrected
        assert _col(v, gpu, "ecc_uncorrected") == g.ecc_uncorrected
        assert _col(v, gpu, "retired_pages") == 3.0  # 2 corrected + 1 uncorrected remapped rows
        assert _col(v, gpu, "remap_failure") == 0.0
        assert _col(v, gpu, "pcie_tx_kbs") == g.pcie_tx
        assert _col(v, gpu, "pcie_rx_kbs") == g.pcie_rx
    assert col.status == "ok"
    assert col.simulated is False
    col.close()


def test_gpus_inventory_decodes_bytes_from_old_pynvml() -> None:
    fake = make_fake_pynvml(gpus=2, bytes_strings=True, driver_version="535.104.05")
    col = NvmlCollector(nvml_module=fake)
    infos = col.gpus()
    assert [i.index for i in infos] == [0, 1]
    assert infos[0].name == "NVIDIA H100 80GB HBM3"
    assert infos[1].uuid == "GPU-fake-0001"
    assert infos[1].pci_bus_id == "00000000:19:00.0"
    assert infos[0].driver_version == "535.104.05"
    assert infos[0].memory_total_mib == pytest.approx(81559.0)
    assert all(isinstance(i.name, str) and isinstance(i.uuid, str) for i in infos)
    calls = fake.calls[("nvmlDeviceGetName", 0)]
    col.gpus()
    assert fake.calls[("nvmlDeviceGetName", 0)] == calls  # cached: static facts are read once


def test_unsupported_field_is_nan_not_zero_and_not_called_again() -> None:
    fake = make_fake_pynvml(gpus=2, unsupported={(1, "nvmlDeviceGetPcieThroughput"),
                                                 "nvmlDeviceGetTotalEccErrors"})
    col = NvmlCollector(nvml_module=fake)
    tick = col.sample()
    assert tick.gpu_state == [GPU_OK, GPU_OK]  # not supported is not an error
    assert math.isnan(_col(tick.values, 1, "pcie_tx_kbs"))
    assert math.isnan(_col(tick.values, 1, "pcie_rx_kbs"))
    assert _col(tick.values, 0, "pcie_tx_kbs") == 1500.0
    for gpu in (0, 1):
        assert math.isnan(_col(tick.values, gpu, "ecc_corrected"))
        assert math.isnan(_col(tick.values, gpu, "ecc_uncorrected"))
        assert _col(tick.values, gpu, "temp_c") == 55.0
    before_pcie1 = fake.calls[("nvmlDeviceGetPcieThroughput", 1)]
    before_pcie0 = fake.calls[("nvmlDeviceGetPcieThroughput", 0)]
    before_ecc = fake.calls[("nvmlDeviceGetTotalEccErrors", 0)]
    assert before_pcie1 == 2  # TX and RX each tried once
    tick2 = col.sample()
    assert fake.calls[("nvmlDeviceGetPcieThroughput", 1)] == before_pcie1
    assert fake.calls[("nvmlDeviceGetTotalEccErrors", 0)] == before_ecc
    assert fake.calls[("nvmlDeviceGetPcieThroughput", 0)] == before_pcie0 + 2
    assert math.isnan(_col(tick2.values, 1, "pcie_tx_kbs"))


def test_fallbacks_for_old_names_and_pre_ampere_retired_pages() -> None:
    old = FakeGpu(remapped_rows=None, retired_sbe=2, retired_dbe=1, throttle=0x20)
    fake = make_fake_pynvml(gpus=[old], unsupported={"nvmlDeviceGetCurrentClocksEventReasons",
                                                     "nvmlDeviceGetEnforcedPowerLimit"})
    col = NvmlCollector(nvml_module=fake)
    v = col.sample().values
    assert _col(v, 0, "throttle_reasons") == 0x20
    assert _col(v, 0, "power_limit_w") == pytest.approx(700.0)
    assert _col(v, 0, "retired_pages") == 3.0
    assert math.isnan(_col(v, 0, "remap_failure"))  # page retirement has no failure flag
    col.sample()
    assert fake.calls[("nvmlDeviceGetCurrentClocksEventReasons", 0)] == 1
    assert fake.calls[("nvmlDeviceGetRemappedRows", 0)] == 1
    assert fake.calls[("nvmlDeviceGetCurrentClocksThrottleReasons", 0)] == 2


def test_remap_failure_flag_reported() -> None:
    fake = make_fake_pynvml(gpus=[FakeGpu(remapped_rows=(0, 5, 1, 1))])
    v = NvmlCollector(nvml_module=fake).sample().values
    assert _col(v, 0, "retired_pages") == 5.0
    assert _col(v, 0, "remap_failure") == 1.0


def test_gpu_lost_mid_run_reports_once_and_others_keep_reporting() -> None:
    fake = make_fake_pynvml(gpus=2)
    col = NvmlCollector(nvml_module=fake)
    col.gpus()
    assert col.sample().gpu_state == [GPU_OK, GPU_OK]
    fake.lose_gpu(1)
    tick = col.sample()
    assert tick.gpu_state == [GPU_OK, GPU_LOST]
    assert np.isnan(tick.values[1]).all()
    assert not np.isnan(tick.values[0]).any()
    lost = [e for e in tick.events if e.kind == "gpu_lost"]
    assert len(lost) == 1
    assert lost[0].gpu_index == 1 and lost[0].severity == SEVERITY_CRITICAL
    assert lost[0].attrs.get("uuid") == "GPU-fake-0001"
    calls_after_loss = sum(n for (fn, gpu), n in fake.calls.items() if gpu == 1)
    for _ in range(3):
        later = col.sample()
        assert later.gpu_state == [GPU_OK, GPU_LOST]
        assert not [e for e in later.events if e.kind == "gpu_lost"]
        assert _col(later.values, 0, "temp_c") == 55.0
    assert sum(n for (fn, gpu), n in fake.calls.items() if gpu == 1) == calls_after_loss
    assert "GPU 1 lost" in col.status
    assert [g.uuid for g in col.gpus()] == ["GPU-fake-0000", "GPU-fake-0001"]


def test_gpu_lost_before_start_is_reported_on_first_tick() -> None:
    fake = make_fake_pynvml(gpus=2, lost={0})
    col = NvmlCollector(nvml_module=fake)
    tick = col.sample()
    assert tick.gpu_state == [GPU_LOST, GPU_OK]
    assert [e.gpu_index for e in tick.events if e.kind == "gpu_lost"] == [0]
    assert col.gpus()[0].uuid == ""


def test_other_error_marks_gpu_error_for_that_tick_only() -> None:
    fake = make_fake_pynvml(gpus=2)
    fake.fail(0, "nvmlDeviceGetTemperature", pynvml.NVML_ERROR_UNKNOWN)
    col = NvmlCollector(nvml_module=fake)
    tick = col.sample()
    assert tick.gpu_state == [GPU_ERROR, GPU_OK]
    assert math.isnan(_col(tick.values, 0, "temp_c"))
    assert _col(tick.values, 0, "gpu_util_pct") == 42.0  # the other fields still arrive
    del fake.failing[(0, "nvmlDeviceGetTemperature")]
    tick2 = col.sample()  # transient errors are retried, unlike NotSupported
    assert tick2.gpu_state == [GPU_OK, GPU_OK]
    assert _col(tick2.values, 0, "temp_c") == 55.0


def test_non_nvml_exception_from_binding_never_escapes() -> None:
    fake = make_fake_pynvml(gpus=1)

    def broken(handle: object) -> int:
        raise TypeError("ctypes says no")

    setattr(fake, "nvmlDeviceGetPowerUsage", broken)  # noqa: B010 (a binding that misbehaves)
    tick = NvmlCollector(nvml_module=fake).sample()
    assert tick.gpu_state == [GPU_ERROR]
    assert math.isnan(_col(tick.values, 0, "power_w"))


@pytest.mark.parametrize(("code", "needle"), [
    (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML shared library not found"),
    (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "kernel driver is not loaded"),
    (pynvml.NVML_ERROR_UNKNOWN, "NVML initialisation failed"),
])
def test_no_driver_raises_one_line_no_driver_error(code: int, needle: str) -> None:
    fake = make_fake_pynvml(no_driver=code)
    col = NvmlCollector(nvml_module=fake)
    with pytest.raises(NoDriverError) as info:
        col.open()
    message = str(info.value)
    assert needle in message
    assert "\n" not in message
    assert "--simulate-gpus" in message
    with pytest.raises(NoDriverError):
        col.sample()
    assert col.status == message  # status explains instead of raising
    col.close()
    col.close()
    assert fake.calls[("nvmlShutdown", None)] == 0


def test_real_pynvml_without_driver_gives_no_driver_error() -> None:
    col = NvmlCollector()
    try:
        col.open()
    except NoDriverError as exc:
        assert str(exc).startswith(("no NVIDIA driver", "NVIDIA driver/library", "no permission",
                                    "NVML initialisation failed"))
        assert "\n" not in str(exc)
        return
    finally:
        col.close()
    pytest.skip("an NVIDIA driver is present on this machine")


def test_xid_events_are_drained_into_events() -> None:
    fake = make_fake_pynvml(gpus=2)
    col = NvmlCollector(nvml_module=fake)
    assert col.sample().events == []
    fake.push_xid(1, 79)
    fake.push_xid(0, 48)
    tick = col.sample()
    xids = [e for e in tick.events if e.kind == "xid"]
    assert [(e.gpu_index, e.detail, e.attrs) for e in xids] == [
        (1, "XID 79", {"xid": "79"}), (0, "XID 48", {"xid": "48"})]
    assert all(e.severity == SEVERITY_CRITICAL for e in xids)
    assert fake.event_queue == []
    assert not [e for e in col.sample().events if e.kind == "xid"]
    assert col.status == "ok"


def test_xid_registration_not_supported_is_reported_in_status() -> None:
    fake = make_fake_pynvml(gpus=2, unsupported={(1, "nvmlDeviceRegisterEvents")})
    col = NvmlCollector(nvml_module=fake)
    col.sample()
    assert col.status == "xid events unavailable on GPU 1"
    fake2 = make_fake_pynvml(gpus=2, unsupported={"nvmlDeviceRegisterEvents"})
    col2 = NvmlCollector(nvml_module=fake2)
    assert col2.sample().gpu_state == [GPU_OK, GPU_OK]
    assert col2.status == "xid events unavailable"


def test_process_start_and_exit_events() -> None:
    fake = make_fake_pynvml(gpus=2)
    fake.gpus[0].processes = [(100, 512 * MIB)]
    col = NvmlCollector(nvml_module=fake)
    tick = col.sample()
    assert [(p.gpu_index, p.pid, p.used_memory_mib) for p in tick.processes] == [(0, 100, 512.0)]
    starts = [e for e in tick.events if e.kind == "process_start"]
    assert [(e.gpu_index, e.pid, e.attrs, e.severity) for e in starts] == [
        (0, 100, {"initial": "1"}, SEVERITY_INFO)]

    fake.gpus[1].processes = [(200, None)]
    tick = col.sample()
    assert [(e.kind, e.gpu_index, e.pid, e.attrs) for e in tick.events] == [
        ("process_start", 1, 200, {})]
    p200 = next(p for p in tick.processes if p.pid == 200)
    assert math.isnan(p200.used_memory_mib)

    assert [e for e in col.sample().events if e.kind.startswith("process")] == []

    fake.gpus[0].processes = []
    tick = col.sample()
    assert [(e.kind, e.gpu_index, e.pid) for e in tick.events] == [("process_exit", 0, 100)]


def test_close_twice_is_safe_and_frees_everything() -> None:
    fake = make_fake_pynvml(gpus=2)
    col = NvmlCollector(nvml_module=fake)
    col.sample()
    col.close()
    col.close()
    assert fake.calls[("nvmlShutdown", None)] == 1
    assert fake.calls[("nvmlEventSetFree", None)] == 1
    assert fake.init_count == 0
    assert fake.event_sets == {}
    assert col.status == "closed"
    late = col.sample()  # a tick racing shutdown gets NaN, not an exception
    assert np.isnan(late.values).all()
    NvmlCollector(nvml_module=make_fake_pynvml()).close()  # never opened: nothing to do


def test_lazy_init_touches_nothing_until_first_use() -> None:
    fake = make_fake_pynvml(gpus=1)
    col = NvmlCollector(nvml_module=fake)
    assert sum(fake.calls.values()) == 0
    col.sample()
    col.sample()
    assert fake.calls[("nvmlInit", None)] == 1
