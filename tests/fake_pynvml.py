"""A fake `pynvml` module, so the NVML collector can be tested on machines without a GPU.

It reuses the real pynvml's constants and NVMLError classes (raised through the real
`NVMLError(code)` factory), so `except pynvml.NVMLError_NotSupported` behaves exactly as on a
GPU host. Only the functions the collector calls exist; state is plain attributes tests can poke.
"""

from __future__ import annotations

import types
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pynvml as _real

MIB = 1024 * 1024


@dataclass
class FakeGpu:
    """What one fake GPU reports, in NVML's own units (bytes, mW, KB/s)."""

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    pci_bus_id: str = "00000000:18:00.0"
    mem_total: int = 81559 * MIB
    mem_used: int = 1024 * MIB
    util_gpu: int = 42
    util_mem: int = 17
    temp: int = 55
    power_mw: int = 312_500
    power_limit_mw: int = 700_000
    sm_clock: int = 1980
    mem_clock: int = 2619
    throttle: int = 0x1
    ecc_corrected: int = 3
    ecc_uncorrected: int = 0
    # Ampere+: (corrected, uncorrected, pending, failure); None makes the GPU pre-Ampere.
    remapped_rows: tuple[int, int, int, int] | None = (2, 1, 0, 0)
    retired_sbe: int = 0
    retired_dbe: int = 0
    pcie_tx: int = 1500
    pcie_rx: int = 2500
    processes: list[tuple[int, int | None]] = field(default_factory=list)


class _Handle:
    """Opaque like NVML's device pointer; only the fake looks inside."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<fake nvmlDevice {self.index}>"


class FakePynvml(types.ModuleType):
    """Module object standing in for `pynvml`; see make_fake_pynvml for the knobs."""

    def __init__(self, gpus: list[FakeGpu], unsupported: set[Any], lost: set[int],
                 no_driver: int | None, bytes_strings: bool, driver_version: str) -> None:
        super().__init__("pynvml")
        for name in dir(_real):
            if name.startswith(("NVML_", "NVMLError", "nvmlEventType", "nvmlClocks")) or \
                    name == "NVMLLibraryMismatchError":
                setattr(self, name, getattr(_real, name))
        self.gpus = gpus
        self.unsupported = unsupported
        self.lost = lost
        self.no_driver = no_driver
        self.bytes_strings = bytes_strings
        self.driver_version = driver_version
        self.failing: dict[tuple[int, str], int] = {}
        self.calls: Counter[tuple[str, int | None]] = Counter()
        self.init_count = 0
        self.event_sets: dict[int, set[int]] = {}
        self.event_queue: list[tuple[int, int]] = []
        self._handles = [_Handle(i) for i in range(len(gpus))]

    # -- test controls ----------------------------------------------------------------------

    def lose_gpu(self, index: int) -> None:
        """From now on every call on this GPU raises GPU is lost."""
        self.lost.add(index)

    def push_xid(self, index: int, xid: int) -> None:
        """Queue an XID as the driver would, delivered to event sets that registered the GPU."""
        self.event_queue.append((index, xid))

    def fail(self, index: int, fn_name: str, code: int) -> None:
        """Make one function on one GPU raise NVMLError(code) from now on."""
        self.failing[(index, fn_name)] = code

    # -- helpers ----------------------------------------------------------------------------

    def _raise(self, code: int) -> None:
        raise _real.NVMLError(code)

    def _s(self, text: str) -> Any:
        return text.encode() if self.bytes_strings else text

    def _enter(self, fn_name: str, handle: _Handle | None = None) -> FakeGpu | None:
        """Common checks in the order real NVML applies them."""
        index = handle.index if handle is not None else None
        self.calls[(fn_name, index)] += 1
        if self.init_count <= 0:
            self._raise(_real.NVML_ERROR_UNINITIALIZED)
        if index is not None and index in self.lost:
            self._raise(_real.NVML_ERROR_GPU_IS_LOST)
        if fn_name in self.unsupported or (index, fn_name) in self.unsupported:
            self._raise(_real.NVML_ERROR_NOT_SUPPORTED)
        if index is None:
            return None
        if (index, fn_name) in self.failing:
            self._raise(self.failing[(index, fn_name)])
        return self.gpus[index]

    # -- lifecycle --------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.calls[("nvmlInit", None)] += 1
        if self.no_driver is not None:
            self._raise(self.no_driver)
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self.calls[("nvmlShutdown", None)] += 1
        if self.init_count <= 0:
            self._raise(_real.NVML_ERROR_UNINITIALIZED)
        self.init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> Any:
        self._enter("nvmlSystemGetDriverVersion")
        return self._s(self.driver_version)

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self.calls[("nvmlDeviceGetHandleByIndex", index)] += 1
        if self.init_count <= 0:
            self._raise(_real.NVML_ERROR_UNINITIALIZED)
        if not 0 <= index < len(self.gpus):
            self._raise(_real.NVML_ERROR_INVALID_ARGUMENT)
        if index in self.lost:
            self._raise(_real.NVML_ERROR_GPU_IS_LOST)
        return self._handles[index]

    # -- inventory --------------------------------------------------------------------------

    def nvmlDeviceGetName(self, h: _Handle) -> Any:
        g = self._enter("nvmlDeviceGetName", h)
        assert g is not None
        return self._s(g.name)

    def nvmlDeviceGetUUID(self, h: _Handle) -> Any:
        g = self._enter("nvmlDeviceGetUUID", h)
        assert g is not None
        return self._s(g.uuid)

    def nvmlDeviceGetPciInfo(self, h: _Handle) -> Any:
        g = self._enter("nvmlDeviceGetPciInfo", h)
        assert g is not None
        return types.SimpleNamespace(busId=g.pci_bus_id.encode(), busIdLegacy=g.pci_bus_id[4:].encode())

    # -- metrics ----------------------------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, h: _Handle) -> Any:
        g = self._enter("nvmlDeviceGetUtilizationRates", h)
        assert g is not None
        return types.SimpleNamespace(gpu=g.util_gpu, memory=g.util_mem)

    def nvmlDeviceGetMemoryInfo(self, h: _Handle, version: int | None = None) -> Any:
        g = self._enter("nvmlDeviceGetMemoryInfo", h)
        assert g is not None
        return types.SimpleNamespace(total=g.mem_total, used=g.mem_used, free=g.mem_total - g.mem_used)

    def nvmlDeviceGetTemperature(self, h: _Handle, sensor: int) -> int:
        g = self._enter("nvmlDeviceGetTemperature", h)
        assert g is not None
        if sensor != _real.NVML_TEMPERATURE_GPU:
            self._raise(_real.NVML_ERROR_INVALID_ARGUMENT)
        return g.temp

    def nvmlDeviceGetPowerUsage(self, h: _Handle) -> int:
        g = self._enter("nvmlDeviceGetPowerUsage", h)
        assert g is not None
        return g.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h: _Handle) -> int:
        g = self._enter("nvmlDeviceGetEnforcedPowerLimit", h)
        assert g is not None
        return g.power_limit_mw

    def nvmlDeviceGetPowerManagementLimit(self, h: _Handle) -> int:
        g = self._enter("nvmlDeviceGetPowerManagementLimit", h)
        assert g is not None
        return g.power_limit_mw

    def nvmlDeviceGetClockInfo(self, h: _Handle, clock: int) -> int:
        g = self._enter("nvmlDeviceGetClockInfo", h)
        assert g is not None
        if clock == _real.NVML_CLOCK_SM:
            return g.sm_clock
        if clock == _real.NVML_CLOCK_MEM:
            return g.mem_clock
        self._raise(_real.NVML_ERROR_INVALID_ARGUMENT)
        return 0

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: _Handle) -> int:
        g = self._enter("nvmlDeviceGetCurrentClocksEventReasons", h)
        assert g is not None
        return g.throttle

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: _Handle) -> int:
        g = self._enter("nvmlDeviceGetCurrentClocksThrottleReasons", h)
        assert g is not None
        return g.throttle

    def nvmlDeviceGetTotalEccErrors(self, h: _Handle, error_type: int, counter_type: int) -> int:
        g = self._enter("nvmlDeviceGetTotalEccErrors", h)
        assert g is not None
        if counter_type != _real.NVML_VOLATILE_ECC:
            self._raise(_real.NVML_ERROR_INVALID_ARGUMENT)
        if error_type == _real.NVML_MEMORY_ERROR_TYPE_CORRECTED:
            return g.ecc_corrected
        return g.ecc_uncorrected

    def nvmlDeviceGetRemappedRows(self, h: _Handle) -> tuple[int, int, int, int]:
        g = self._enter("nvmlDeviceGetRemappedRows", h)
        assert g is not None
        if g.remapped_rows is None:
            self._raise(_real.NVML_ERROR_NOT_SUPPORTED)
            raise AssertionError("unreachable")
        return g.remapped_rows

    def nvmlDeviceGetRetiredPages(self, h: _Handle, cause: int) -> list[int]:
        g = self._enter("nvmlDeviceGetRetiredPages", h)
        assert g is not None
        n = g.retired_sbe if cause == _real.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS \
            else g.retired_dbe
        return [0x1000 * (i + 1) for i in range(n)]

    def nvmlDeviceGetPcieThroughput(self, h: _Handle, counter: int) -> int:
        g = self._enter("nvmlDeviceGetPcieThroughput", h)
        assert g is not None
        return g.pcie_tx if counter == _real.NVML_PCIE_UTIL_TX_BYTES else g.pcie_rx

    def nvmlDeviceGetComputeRunningProcesses(self, h: _Handle) -> list[Any]:
        g = self._enter("nvmlDeviceGetComputeRunningProcesses", h)
        assert g is not None
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=mem, gpuInstanceId=0xFFFFFFFF,
                                      computeInstanceId=0xFFFFFFFF)
                for pid, mem in g.processes]

    # -- events -----------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> int:
        self._enter("nvmlEventSetCreate")
        key = len(self.event_sets) + 1
        self.event_sets[key] = set()
        return key

    def nvmlDeviceRegisterEvents(self, h: _Handle, event_types: int, event_set: int) -> None:
        self._enter("nvmlDeviceRegisterEvents", h)
        self.event_sets[event_set].add(h.index)

    def nvmlEventSetWait_v2(self, event_set: int, timeout_ms: int) -> Any:
        self._enter("nvmlEventSetWait_v2")
        registered = self.event_sets.get(event_set)
        if registered is None:
            self._raise(_real.NVML_ERROR_INVALID_ARGUMENT)
            raise AssertionError("unreachable")
        for pos, (index, xid) in enumerate(self.event_queue):
            if index in registered:
                del self.event_queue[pos]
                return types.SimpleNamespace(device=self._handles[index],
                                             eventType=_real.nvmlEventTypeXidCriticalError,
                                             eventData=xid, gpuInstanceId=0, computeInstanceId=0)
        self._raise(_real.NVML_ERROR_TIMEOUT)
        raise AssertionError("unreachable")

    def nvmlEventSetWait(self, event_set: int, timeout_ms: int) -> Any:
        return self.nvmlEventSetWait_v2(event_set, timeout_ms)

    def nvmlEventSetFree(self, event_set: int) -> None:
        self._enter("nvmlEventSetFree")
        if self.event_sets.pop(event_set, None) is None:
            self._raise(_real.NVML_ERROR_INVALID_ARGUMENT)


def make_fake_pynvml(gpus: int | list[FakeGpu] = 2, unsupported: Iterable[Any] = (),
                     lost: Iterable[int] = (), no_driver: bool | int = False,
                     bytes_strings: bool = False, driver_version: str = "550.54.15") -> FakePynvml:
    """Build a fake pynvml.

    gpus: a count of default GPUs or explicit FakeGpu specs. unsupported: function names
    (all GPUs) or (gpu_index, function_name) pairs that raise NotSupported. lost: GPU indexes lost
    from the start. no_driver: True (library not found) or an NVML_ERROR_* code nvmlInit raises.
    bytes_strings: return bytes for names like pynvml before 11.5 did.
    """
    if isinstance(gpus, int):
        specs = [FakeGpu(uuid=f"GPU-fake-{i:04d}", pci_bus_id=f"00000000:{0x18 + i:02X}:00.0")
                 for i in range(gpus)]
    else:
        specs = list(gpus)
    code: int | None
    if no_driver is True:
        code = _real.NVML_ERROR_LIBRARY_NOT_FOUND
    elif no_driver is False:
        code = None
    else:
        code = int(no_driver)
    return FakePynvml(specs, set(unsupported), set(lost), code, bytes_strings, driver_version)
