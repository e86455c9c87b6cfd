"""Real GPUs through NVML (package nvidia-ml-py, module `pynvml`), modelled on nvitop's libnvml.

Every pynvml call goes through one choke point, `NvmlCollector._call`, so the error policy lives in
one place: a field the GPU or driver cannot give becomes NOT_AVAILABLE (NaN on the wire, never 0)
and, when the answer is permanent (NotSupported and the like), that (GPU, call) is never asked
again; "GPU is lost" marks the GPU lost for good and raises one critical event; anything else marks
the GPU GPU_ERROR for the tick. `sample()` never raises for one GPU or one field. A host with no
usable NVML raises `NoDriverError` with a one-line message when the collector is opened.
NVML is never reached through `nvidia-smi` (too slow, see docs/nvml.md).
"""

from __future__ import annotations

import ctypes
import importlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import numpy as np

from agent.collect.base import GpuTick, NoDriverError
from protos.types import (
    GPU_ERROR,
    GPU_LOST,
    GPU_OK,
    METRIC_INDEX,
    SEVERITY_CRITICAL,
    SEVERITY_INFO,
    Event,
    GpuInfo,
    GpuProcess,
)

_C = METRIC_INDEX
_MIB: Final = 1024.0 * 1024.0
_MAX_EVENTS_PER_TICK: Final = 1024  # bounds the XID drain if the event set never times out
_NO_DRIVER_HINT: Final = "install the NVIDIA driver, or run with --simulate-gpus N"
_ULL_NOT_AVAILABLE: Final = (1 << 64) - 1  # NVML_VALUE_NOT_AVAILABLE as an unsigned long long

# Error codes by what they mean for us. Looked up by name so an older pynvml lacking one still works.
_STICKY_UNAVAILABLE_NAMES: Final = (  # the answer will not change while the driver is loaded
    "NVML_ERROR_NOT_SUPPORTED",
    "NVML_ERROR_FUNCTION_NOT_FOUND",
    "NVML_ERROR_ARGUMENT_VERSION_MISMATCH",
    "NVML_ERROR_DEPRECATED",
    "NVML_ERROR_VGPU_ECC_NOT_SUPPORTED",
)
_TRANSIENT_UNAVAILABLE_NAMES: Final = (  # no value now; ask again next tick
    "NVML_ERROR_NO_PERMISSION",
    "NVML_ERROR_NOT_FOUND",
    "NVML_ERROR_NO_DATA",
    "NVML_ERROR_NOT_READY",
)


class _NotAvailable:
    """Type of NOT_AVAILABLE; falsy so `if value:` reads naturally."""

    _instance: _NotAvailable | None = None

    def __new__(cls) -> _NotAvailable:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NOT_AVAILABLE"


NOT_AVAILABLE: Final = _NotAvailable()
"""What `_call` returns when NVML has no value for this GPU/field; stored as NaN, never as 0."""


class _GpuLostSignal(Exception):
    """Internal: unwinds one GPU's reading as soon as NVML says that GPU is lost."""


def _text(value: Any) -> str:
    """NVML strings come back as bytes from older pynvml and str from newer; the wire wants str."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").rstrip("\x00")
    return str(value)


def _handle_key(handle: Any) -> int:
    """A stable key for a device handle: the address behind a ctypes pointer, else the object id.

    Event data carries a fresh pointer object for the same device, so identity does not work.
    """
    try:
        value = ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return id(handle)
    return int(value) if value is not None else id(handle)


def _num(value: Any, scale: float = 1.0) -> float:
    """A pynvml number as float, NaN for NOT_AVAILABLE or the NVML 'not available' marker."""
    if value is NOT_AVAILABLE or value is None:
        return math.nan
    number = int(value) if isinstance(value, int) else float(value)
    if number == _ULL_NOT_AVAILABLE:
        return math.nan
    return number / scale if scale != 1.0 else float(number)


class NvmlCollector:
    """All NVIDIA GPUs of this host through NVML, with nvitop's lazy, forgiving error policy."""

    simulated = False

    def __init__(self, nvml_module: Any = None, *, xid_events: bool = True) -> None:
        """Nothing touches NVML here (lazy init); pass `nvml_module` to substitute a fake pynvml."""
        self._nvml: Any = nvml_module
        self._want_xid = xid_events
        self._lock = threading.RLock()
        self._opened = False
        self._closed = False
        self._open_error: str | None = None
        self._handles: list[Any] = []
        self._handle_to_index: dict[int, int] = {}
        self._unsupported: set[tuple[int | None, str, str]] = set()
        self._lost: set[int] = set()
        self._errors: dict[int, str] = {}
        self._pending_events: list[Event] = []
        self._event_set: Any = None
        self._xid_note = ""
        self._known_procs: dict[int, set[int]] = {}
        self._first_proc_tick = True
        self._info_cache: dict[int, GpuInfo] = {}
        self._driver_version: str | None = None
        self._sticky_codes: frozenset[int] = frozenset()
        self._transient_codes: frozenset[int] = frozenset()

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        """Initialise NVML once; raise NoDriverError (one line) when this host has no usable driver.

        Called implicitly by gpus()/sample(); call it early to fail fast at agent start-up.
        """
        with self._lock:
            if self._opened:
                return
            if self._closed:
                raise RuntimeError("NvmlCollector is closed")
            if self._open_error is not None:
                raise NoDriverError(self._open_error)
            try:
                self._open()
            except NoDriverError as exc:
                self._open_error = str(exc)
                raise

    def _open(self) -> None:
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError:
                raise NoDriverError(
                    "no NVML bindings: the nvidia-ml-py package is not installed "
                    "(pip install nvidia-ml-py, or run with --simulate-gpus N)"
                ) from None
        nv = self._nvml
        self._sticky_codes = self._codes(_STICKY_UNAVAILABLE_NAMES)
        self._transient_codes = self._codes(_TRANSIENT_UNAVAILABLE_NAMES)
        try:
            self._call("nvmlInit", strict=True)
        except nv.NVMLError as exc:
            raise NoDriverError(self._no_driver_message(exc)) from None
        try:
            count = int(self._call("nvmlDeviceGetCount", strict=True))
        except nv.NVMLError as exc:
            self._call("nvmlShutdown")
            raise NoDriverError(f"NVML initialised but cannot count GPUs: {_text(exc)}") from None
        self._opened = True
        for index in range(count):
            handle = self._call("nvmlDeviceGetHandleByIndex", index, gpu=index, what="handle",
                                lost_ok=True)
            self._handles.append(handle)
            if handle is not NOT_AVAILABLE:
                self._handle_to_index[_handle_key(handle)] = index
        if self._want_xid:
            self._register_xid_events()
        else:
            self._xid_note = "xid events disabled"

    def _codes(self, names: tuple[str, ...]) -> frozenset[int]:
        return frozenset(int(getattr(self._nvml, n)) for n in names if hasattr(self._nvml, n))

    def _no_driver_message(self, exc: Any) -> str:
        """One line an operator can act on, by why nvmlInit failed."""
        nv = self._nvml
        code = getattr(exc, "value", None)
        if code == getattr(nv, "NVML_ERROR_LIBRARY_NOT_FOUND", None):
            return f"no NVIDIA driver: NVML shared library not found ({_NO_DRIVER_HINT})"
        if code == getattr(nv, "NVML_ERROR_DRIVER_NOT_LOADED", None):
            return f"no NVIDIA driver: the NVIDIA kernel driver is not loaded ({_NO_DRIVER_HINT})"
        if code == getattr(nv, "NVML_ERROR_LIB_RM_VERSION_MISMATCH", None):
            return ("NVIDIA driver/library version mismatch: reload the nvidia kernel modules or reboot "
                    "(or run with --simulate-gpus N)")
        if code == getattr(nv, "NVML_ERROR_NO_PERMISSION", None):
            return ("no permission to open NVIDIA devices: run the agent with access to /dev/nvidia* "
                    "(or run with --simulate-gpus N)")
        reason = " ".join(_text(exc).split()) or f"NVML error {code}"
        return f"NVML initialisation failed: {reason} ({_NO_DRIVER_HINT})"

    def _register_xid_events(self) -> None:
        nv = self._nvml
        event_type = getattr(nv, "nvmlEventTypeXidCriticalError", None)
        event_set = self._call("nvmlEventSetCreate", what="xid")
        if event_type is None or event_set is NOT_AVAILABLE:
            self._xid_note = "xid events unavailable"
            return
        self._event_set = event_set
        skipped: list[int] = []
        for index, handle in enumerate(self._handles):
            if handle is NOT_AVAILABLE or index in self._lost:
                skipped.append(index)
                continue
            try:
                ok = self._call("nvmlDeviceRegisterEvents", handle, event_type, event_set,
                                gpu=index, what="xid")
            except _GpuLostSignal:
                ok = NOT_AVAILABLE
            if ok is NOT_AVAILABLE:
                skipped.append(index)
        if self._handles and len(skipped) == len(self._handles):
            self._xid_note = "xid events unavailable"
        elif skipped:
            self._xid_note = "xid events unavailable on GPU " + ",".join(map(str, skipped))

    def close(self) -> None:
        """Free the event set and shut NVML down; safe to call twice or without open()."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._opened:
                return
            if self._event_set is not None:
                self._call("nvmlEventSetFree", self._event_set)
                self._event_set = None
            self._call("nvmlShutdown")
            self._opened = False

    # -- the choke point --------------------------------------------------------------------

    def _call(self, fn_name: str, *args: Any, gpu: int | None = None, what: str = "",
              strict: bool = False, lost_ok: bool = False) -> Any:
        """Every pynvml call goes through here, so the error policy cannot drift between fields.

        Returns the value or NOT_AVAILABLE. `strict` lets NVMLError through (init, event waits).
        GPU-is-lost marks `gpu` lost and raises _GpuLostSignal (or returns NOT_AVAILABLE with
        `lost_ok`); other failures mark `gpu` GPU_ERROR for this tick. Never raises otherwise.
        """
        key = (gpu, fn_name, what)
        if key in self._unsupported:
            return NOT_AVAILABLE
        nv = self._nvml
        fn: Callable[..., Any] | None = getattr(nv, fn_name, None)
        if fn is None:  # this pynvml has no such binding: as permanent as FunctionNotFound
            self._unsupported.add(key)
            return NOT_AVAILABLE
        try:
            return fn(*args)
        except nv.NVMLError as exc:
            if strict:
                raise
            code = getattr(exc, "value", None)
            if code in self._sticky_codes:
                self._unsupported.add(key)
                return NOT_AVAILABLE
            if code in self._transient_codes:
                return NOT_AVAILABLE
            if code == getattr(nv, "NVML_ERROR_GPU_IS_LOST", None) and gpu is not None:
                self._mark_lost(gpu)
                if lost_ok:
                    return NOT_AVAILABLE
                raise _GpuLostSignal(gpu) from None
            self._note_error(gpu, f"{fn_name}: {_text(exc)}")
            return NOT_AVAILABLE
        except Exception as exc:
            mismatch = getattr(nv, "NVMLLibraryMismatchError", None)
            if isinstance(mismatch, type) and isinstance(exc, mismatch):
                self._unsupported.add(key)  # unversioned binding newer than the driver
                return NOT_AVAILABLE
            if strict:
                raise
            self._note_error(gpu, f"{fn_name}: {type(exc).__name__}: {exc}")
            return NOT_AVAILABLE

    def _note_error(self, gpu: int | None, reason: str) -> None:
        if gpu is not None:
            self._errors.setdefault(gpu, reason)

    def _mark_lost(self, gpu: int) -> None:
        """A GPU that fell off the bus stays lost (NVML needs a reset/reboot); report it once."""
        if gpu in self._lost:
            return
        self._lost.add(gpu)
        info = self._info_cache.get(gpu)
        attrs = {"uuid": info.uuid} if info is not None and info.uuid else {}
        self._pending_events.append(Event(
            time.time_ns(), "gpu_lost", SEVERITY_CRITICAL, gpu, 0,
            f"GPU {gpu} is lost (fell off the bus or needs a reset)", attrs,
        ))

    # -- Collector protocol -----------------------------------------------------------------

    @property
    def status(self) -> str:
        """'ok' or one line saying what is degraded (no driver, lost GPUs, no XID events)."""
        with self._lock:
            if self._closed:
                return "closed"
            try:
                self.open()
            except NoDriverError as exc:
                return str(exc)
            problems: list[str] = []
            if not self._handles:
                problems.append("no NVIDIA GPUs found")
            if self._lost:
                problems.append("GPU " + ",".join(map(str, sorted(self._lost))) + " lost")
            if self._xid_note:
                problems.append(self._xid_note)
            return "ok" if not problems else "; ".join(problems)

    def gpus(self) -> list[GpuInfo]:
        """Static inventory for Describe; cached per GPU because none of it changes at runtime."""
        with self._lock:
            if self._closed:  # no NVML any more; what was learnt before is still true
                return [self._info_cache[i] for i in sorted(self._info_cache)]
            self.open()
            if self._driver_version is None:
                version = self._call("nvmlSystemGetDriverVersion", what="inventory")
                self._driver_version = "" if version is NOT_AVAILABLE else _text(version)
            out: list[GpuInfo] = []
            for index, handle in enumerate(self._handles):
                cached = self._info_cache.get(index)
                if cached is None:
                    cached = self._read_info(index, handle)
                    if index not in self._lost and handle is not NOT_AVAILABLE:
                        self._info_cache[index] = cached
                out.append(cached)
            return out

    def _read_info(self, index: int, handle: Any) -> GpuInfo:
        info = GpuInfo(index=index, name="", uuid="", memory_total_mib=math.nan,
                       driver_version=self._driver_version or "")
        if handle is NOT_AVAILABLE or index in self._lost:
            return info
        try:
            name = self._call("nvmlDeviceGetName", handle, gpu=index, what="inventory")
            uuid = self._call("nvmlDeviceGetUUID", handle, gpu=index, what="inventory")
            mem = self._call("nvmlDeviceGetMemoryInfo", handle, gpu=index, what="inventory")
            pci = self._call("nvmlDeviceGetPciInfo", handle, gpu=index, what="inventory")
        except _GpuLostSignal:
            return info
        info.name = "" if name is NOT_AVAILABLE else _text(name)
        info.uuid = "" if uuid is NOT_AVAILABLE else _text(uuid)
        if mem is not NOT_AVAILABLE:
            info.memory_total_mib = _num(mem.total, _MIB)
        if pci is not NOT_AVAILABLE:
            info.pci_bus_id = _text(getattr(pci, "busId", b""))
        return info

    def sample(self) -> GpuTick:
        """One reading of every GPU plus XID/process/lost events since the last tick."""
        with self._lock:
            if self._closed:  # a late tick racing shutdown: report nothing rather than crash
                return GpuTick.empty(len(self._handles))
            self.open()
            n = len(self._handles)
            tick = GpuTick.empty(n)
            self._errors = {}
            now = time.time_ns()
            xid_events = self._drain_xid(now)
            observed: dict[int, dict[int, float]] = {}
            for index, handle in enumerate(self._handles):
                if index in self._lost:
                    continue
                if handle is NOT_AVAILABLE:
                    self._note_error(index, "no device handle")
                    continue
                try:
                    self._read_metrics(index, handle, tick.values[index])
                    procs = self._read_processes(index, handle)
                except _GpuLostSignal:
                    continue
                if procs is not None:
                    observed[index] = procs
            for index in range(n):
                if index in self._lost:
                    tick.values[index, :] = np.nan
                    tick.gpu_state[index] = GPU_LOST
                elif index in self._errors:
                    tick.gpu_state[index] = GPU_ERROR
                else:
                    tick.gpu_state[index] = GPU_OK
            for gpu in sorted(observed):
                tick.processes.extend(GpuProcess(gpu, pid, mem) for pid, mem in observed[gpu].items())
            events, self._pending_events = self._pending_events, []
            events.extend(xid_events)
            events.extend(self._process_events(observed, now))
            tick.events = events
            return tick

    # -- per-GPU reading --------------------------------------------------------------------

    def _first(self, index: int, what: str, candidates: tuple[tuple[str, tuple[Any, ...]], ...]) -> Any:
        """The first candidate call that yields a value: new NVML names first, old ones as fallback."""
        for fn_name, args in candidates:
            value = self._call(fn_name, *args, gpu=index, what=what)
            if value is not NOT_AVAILABLE:
                return value
        return NOT_AVAILABLE

    def _read_metrics(self, index: int, h: Any, row: np.ndarray) -> None:
        """Fill one float32 row of METRIC_NAMES; anything unavailable stays NaN."""
        nv = self._nvml

        def call(fn_name: str, *args: Any, what: str = "") -> Any:
            return self._call(fn_name, h, *args, gpu=index, what=what)

        def const(name: str) -> Any:
            return getattr(nv, name, None)

        util = call("nvmlDeviceGetUtilizationRates")
        if util is not NOT_AVAILABLE:
            row[_C["gpu_util_pct"]] = _num(util.gpu)
            row[_C["mem_util_pct"]] = _num(util.memory)
        mem = call("nvmlDeviceGetMemoryInfo")
        if mem is not NOT_AVAILABLE:
            row[_C["mem_used_mib"]] = _num(mem.used, _MIB)
            row[_C["mem_total_mib"]] = _num(mem.total, _MIB)
        row[_C["temp_c"]] = _num(call("nvmlDeviceGetTemperature", const("NVML_TEMPERATURE_GPU")))
        row[_C["power_w"]] = _num(call("nvmlDeviceGetPowerUsage"), 1000.0)
        row[_C["power_limit_w"]] = _num(self._first(index, "power_limit", (
            ("nvmlDeviceGetEnforcedPowerLimit", (h,)),
            ("nvmlDeviceGetPowerManagementLimit", (h,)),
        )), 1000.0)
        row[_C["sm_clock_mhz"]] = _num(call("nvmlDeviceGetClockInfo", const("NVML_CLOCK_SM"), what="sm"))
        row[_C["mem_clock_mhz"]] = _num(call("nvmlDeviceGetClockInfo", const("NVML_CLOCK_MEM"), what="mem"))
        row[_C["throttle_reasons"]] = _num(self._first(index, "throttle", (
            ("nvmlDeviceGetCurrentClocksEventReasons", (h,)),
            ("nvmlDeviceGetCurrentClocksThrottleReasons", (h,)),
        )))
        volatile = const("NVML_VOLATILE_ECC")
        row[_C["ecc_corrected"]] = _num(call(
            "nvmlDeviceGetTotalEccErrors", const("NVML_MEMORY_ERROR_TYPE_CORRECTED"), volatile,
            what="corrected"))
        row[_C["ecc_uncorrected"]] = _num(call(
            "nvmlDeviceGetTotalEccErrors", const("NVML_MEMORY_ERROR_TYPE_UNCORRECTED"), volatile,
            what="uncorrected"))
        remapped = call("nvmlDeviceGetRemappedRows")
        if remapped is not NOT_AVAILABLE:  # Ampere+: (corrected, uncorrected, pending, failure)
            row[_C["retired_pages"]] = _num(remapped[0]) + _num(remapped[1])
            row[_C["remap_failure"]] = _num(remapped[3])
        else:  # pre-Ampere page retirement; there is no failure flag there
            total = 0.0
            for cause in ("NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS",
                          "NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR"):
                pages = call("nvmlDeviceGetRetiredPages", const(cause), what=cause)
                if pages is NOT_AVAILABLE:
                    total = math.nan
                    break
                total += len(pages)
            row[_C["retired_pages"]] = total
        row[_C["pcie_tx_kbs"]] = _num(call("nvmlDeviceGetPcieThroughput", const("NVML_PCIE_UTIL_TX_BYTES"),
                                           what="tx"))
        row[_C["pcie_rx_kbs"]] = _num(call("nvmlDeviceGetPcieThroughput", const("NVML_PCIE_UTIL_RX_BYTES"),
                                           what="rx"))

    def _read_processes(self, index: int, h: Any) -> dict[int, float] | None:
        """pid -> used MiB (NaN when NVML hides it); None when the list itself is unavailable."""
        procs = self._first(index, "processes", (
            ("nvmlDeviceGetComputeRunningProcesses", (h,)),
            ("nvmlDeviceGetComputeRunningProcesses_v3", (h,)),
            ("nvmlDeviceGetComputeRunningProcesses_v2", (h,)),
        ))
        if procs is NOT_AVAILABLE:
            return None
        out: dict[int, float] = {}
        for proc in procs:
            pid = int(proc.pid)
            mib = _num(getattr(proc, "usedGpuMemory", None), _MIB)
            if pid in out:  # the same pid on several MIG instances of one GPU: add them up
                prev = out[pid]
                mib = mib if math.isnan(prev) else (prev if math.isnan(mib) else prev + mib)
            out[pid] = mib
        return out

    def _process_events(self, observed: dict[int, dict[int, float]], now: int) -> Iterator[Event]:
        """process_start / process_exit from the change in (gpu, pid); GPUs not read keep their set."""
        initial = self._first_proc_tick
        self._first_proc_tick = False
        for gpu in sorted(observed):
            before = self._known_procs.get(gpu, set())
            after = set(observed[gpu])
            for pid in sorted(after - before):
                attrs = {"initial": "1"} if initial else {}
                yield Event(now, "process_start", SEVERITY_INFO, gpu, pid,
                            f"pid {pid} started on GPU {gpu}", attrs)
            for pid in sorted(before - after):
                yield Event(now, "process_exit", SEVERITY_INFO, gpu, pid, f"pid {pid} left GPU {gpu}")
            self._known_procs[gpu] = after

    def _drain_xid(self, now: int) -> list[Event]:
        """Collect queued XID events without blocking (timeout 0) until NVML says Timeout."""
        if self._event_set is None:
            return []
        nv = self._nvml
        timeout_code = getattr(nv, "NVML_ERROR_TIMEOUT", None)
        xid_type = getattr(nv, "nvmlEventTypeXidCriticalError", None)
        wait = "nvmlEventSetWait_v2" if hasattr(nv, "nvmlEventSetWait_v2") else "nvmlEventSetWait"
        events: list[Event] = []
        for _ in range(_MAX_EVENTS_PER_TICK):
            try:
                data = self._call(wait, self._event_set, 0, what="xid", strict=True)
            except nv.NVMLError as exc:
                if getattr(exc, "value", None) != timeout_code:
                    # e.g. a GPU fell off the bus: the per-GPU reads will find out which one
                    self._xid_note = self._xid_note or f"xid event wait failed: {_text(exc)}"
                break
            except Exception as exc:  # a broken binding must not stop sampling
                self._xid_note = f"xid event wait failed: {type(exc).__name__}"
                break
            if data is NOT_AVAILABLE:
                break
            if xid_type is not None and int(getattr(data, "eventType", xid_type)) != int(xid_type):
                continue
            xid = int(data.eventData)
            gpu = self._handle_to_index.get(_handle_key(data.device), -1)
            events.append(Event(now, "xid", SEVERITY_CRITICAL, gpu, 0, f"XID {xid}", {"xid": str(xid)}))
        return events
