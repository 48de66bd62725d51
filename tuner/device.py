"""Which device a run tunes, and what state it is in while it does.

:func:`detect_device` names the GPU through NVML (name, memory bus width, max clocks, driver, compute capability)
and torch (SM count) and builds the table's :class:`~profiles.table.DeviceInfo`. :func:`telemetry` samples what
changes under load (clocks, throttle reasons, temperature, power) so that every timed trial carries the conditions
it was measured in. In interpreter mode the "device" is the CPU and there is nothing to sample.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass
from typing import Any

from gdn2_tune.kernels.spec import family_from_capability
from gdn2_tune.profiles.table import DeviceInfo, device_id_from_name

INTERPRETER_ID = "cpu-interpreter"
# Set by the tuner on each worker process: the NVML index of the GPU behind CUDA_VISIBLE_DEVICES (NVML ignores
# that variable and enumerates every GPU of the host).
NVML_INDEX_ENV = "GDN2_TUNE_NVML_INDEX"

# nvmlClocksThrottleReason* bits (nvml.h); names as nvidia-smi prints them.
_THROTTLE_BITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


@dataclass(frozen=True)
class Telemetry:
    """One NVML sample. None where the driver does not report a field (or in interpreter mode)."""

    sm_clock_mhz: int | None
    mem_clock_mhz: int | None
    throttle_reasons: tuple[str, ...]
    temperature_c: int | None
    power_w: float | None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["throttle_reasons"] = list(self.throttle_reasons)
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Telemetry:
        return Telemetry(
            data.get("sm_clock_mhz"),
            data.get("mem_clock_mhz"),
            tuple(data.get("throttle_reasons") or ()),
            data.get("temperature_c"),
            data.get("power_w"),
        )

    def short(self) -> str:
        """``"1980/2619 MHz 61C 402W"`` plus throttle reasons other than idle: what the progress line shows."""
        if self.sm_clock_mhz is None:
            return "-"
        text = f"{self.sm_clock_mhz}/{self.mem_clock_mhz} MHz"
        if self.temperature_c is not None:
            text += f" {self.temperature_c}C"
        if self.power_w is not None:
            text += f" {self.power_w:.0f}W"
        busy = [r for r in self.throttle_reasons if r != "gpu_idle"]
        return text + (f" [{','.join(busy)}]" if busy else "")


NO_TELEMETRY = Telemetry(None, None, (), None, None)


def decode_throttle_reasons(mask: int) -> tuple[str, ...]:
    names = [name for bit, name in _THROTTLE_BITS.items() if mask & bit]
    unknown = mask & ~sum(_THROTTLE_BITS)
    if unknown:
        names.append(f"unknown_0x{unknown:x}")
    return tuple(names)


def _nvml() -> Any:
    """pynvml, initialised; raises RuntimeError saying what to install when it is missing or has no driver."""
    try:
        import pynvml
    except ImportError as err:
        raise RuntimeError("NVML bindings missing: install nvidia-ml-py (`pip install nvidia-ml-py`)") from err
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        raise RuntimeError(f"NVML cannot start ({err}); is the NVIDIA driver loaded?") from err
    return pynvml


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def visible_gpu(index: int) -> tuple[str, int | None]:
    """``--gpus`` counts the GPUs this process sees, as CUDA and torch number them. The CUDA_VISIBLE_DEVICES entry
    that pins a worker to the index-th of them (the index itself without a mask, else the mask's entry: a number,
    a UUID or a MIG id), and that GPU's NVML index (NVML ignores the mask; None where it cannot be resolved).

    Before 2026-11-30 a worker got the bare index, so ``CUDA_VISIBLE_DEVICES=1 tune.py tune --gpus 0`` tuned on
    GPU 0 (session 9: a tune meant for the second GPU ran beside experiments on the first)."""
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return str(index), index
    entries = [e.strip() for e in mask.split(",") if e.strip()]
    if not 0 <= index < len(entries):
        raise ValueError(f"--gpus: expected an index below {len(entries)} (CUDA_VISIBLE_DEVICES={mask!r} makes "
                         f"{len(entries)} GPU{'s' if len(entries) != 1 else ''} visible), received {index}")
    entry = entries[index]
    if entry.isdigit():
        return entry, int(entry)
    try:
        nv = _nvml()
        return entry, int(nv.nvmlDeviceGetIndex(nv.nvmlDeviceGetHandleByUUID(entry)))
    except Exception:  # noqa: BLE001 - no NVML, or a MIG id it does not resolve: the telemetry falls back
        return entry, None


def nvml_index() -> int:
    """The NVML index of this process's GPU: set by the tuner, else the first of CUDA_VISIBLE_DEVICES, else 0."""
    if os.environ.get(NVML_INDEX_ENV):
        return int(os.environ[NVML_INDEX_ENV])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(visible) if visible.isdigit() else 0


def detect_device(index: int | None = None, *, interpret: bool = False) -> DeviceInfo:
    """The DeviceInfo of GPU ``index`` (NVML numbering; default :func:`nvml_index`), or of the interpreter."""
    if interpret:
        return DeviceInfo(
            device_id=INTERPRETER_ID,
            name=f"Triton interpreter on {platform.machine() or 'cpu'}",
            family="cpu",
            compute_capability=None,
            sm_count=os.cpu_count(),
            sm_clock_mhz=None,
            mem_clock_mhz=None,
            bus_width_bits=None,
            driver=None,
        )
    nv = _nvml()
    idx = nvml_index() if index is None else index
    handle = nv.nvmlDeviceGetHandleByIndex(idx)
    name = _decode(nv.nvmlDeviceGetName(handle))
    major, minor = nv.nvmlDeviceGetCudaComputeCapability(handle)

    def optional(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except nv.NVMLError:  # fields some boards or drivers do not report
            return None

    sm_count = None
    try:
        import torch

        if torch.cuda.is_available():
            # NVML does not report SMs; the CUDA device of this process is the same GPU when the tuner set
            # CUDA_VISIBLE_DEVICES, else look it up by index.
            local = 0 if os.environ.get("CUDA_VISIBLE_DEVICES") else idx
            sm_count = torch.cuda.get_device_properties(local).multi_processor_count
    except (RuntimeError, AssertionError):
        sm_count = None
    return DeviceInfo(
        device_id=device_id_from_name(name),
        name=name,
        family=family_from_capability((int(major), int(minor))),
        compute_capability=(int(major), int(minor)),
        sm_count=sm_count,
        sm_clock_mhz=optional(nv.nvmlDeviceGetMaxClockInfo, handle, nv.NVML_CLOCK_SM),
        mem_clock_mhz=optional(nv.nvmlDeviceGetMaxClockInfo, handle, nv.NVML_CLOCK_MEM),
        bus_width_bits=optional(nv.nvmlDeviceGetMemoryBusWidth, handle),
        driver=_decode(nv.nvmlSystemGetDriverVersion()),
    )


def telemetry(index: int | None = None, *, interpret: bool = False) -> Telemetry:
    """A sample of clocks, throttle reasons, temperature and power. Never raises: a tuning run must not stop
    because a sensor is unreadable, so any failure gives :data:`NO_TELEMETRY`."""
    if interpret:
        return NO_TELEMETRY
    try:
        nv = _nvml()
        handle = nv.nvmlDeviceGetHandleByIndex(nvml_index() if index is None else index)
    except Exception:  # noqa: BLE001 - see docstring
        return NO_TELEMETRY

    def optional(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001
            return None

    # The name changed from "Clocks Throttle" to "Clocks Event" reasons in recent drivers; try both.
    reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or nv.nvmlDeviceGetCurrentClocksThrottleReasons
    mask = optional(reasons_fn, handle)
    power_mw = optional(nv.nvmlDeviceGetPowerUsage, handle)
    return Telemetry(
        sm_clock_mhz=optional(nv.nvmlDeviceGetClockInfo, handle, nv.NVML_CLOCK_SM),
        mem_clock_mhz=optional(nv.nvmlDeviceGetClockInfo, handle, nv.NVML_CLOCK_MEM),
        throttle_reasons=() if mask is None else decode_throttle_reasons(int(mask)),
        temperature_c=optional(nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU),
        power_w=None if power_mw is None else power_mw / 1000.0,
    )
