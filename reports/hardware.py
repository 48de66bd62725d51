"""Theoretical peaks of a GPU from what NVML and the driver report (profiles.table.DeviceInfo).

    memory bandwidth = 2 (double data rate) × memory clock × bus width / 8
    compute          = SMs × SM clock × per-SM rate (FLOP per clock per SM, from the table below)

Every per-SM rate is dense (no 2:4 sparsity) with fp32 accumulation, the way Triton's ``tl.dot`` runs, and is
checked against a figure NVIDIA publishes for one card of the family (the comment shows the arithmetic). The
peaks use whatever SM clock the profile recorded: NVIDIA quotes H100 SXM5 tensor-core peaks at 1830 MHz, while
NVML's maximum SM clock on that card is 1980 MHz (which gives 1070 bf16 TFLOP/s, not 989.4).

An architecture missing from the table gets no compute peaks and a reason, never a guess.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gdn2_tune.kernels.spec import family_of

if TYPE_CHECKING:
    from gdn2_tune.profiles.table import DeviceInfo


@dataclass(frozen=True)
class SmRates:
    """Dense FLOP per clock per SM (an FMA is 2 FLOP)."""

    bf16: int  # bf16/fp16 tensor core, fp32 accumulate
    tf32: int  # tf32 tensor core
    fp32: int  # fp32 FMA on the CUDA cores
    source: str


# Per-architecture rates. GeForce boards of sm86/sm89 run fp32-accumulate tensor MMAs (fp16/bf16 and tf32) at half
# the rate of the data-centre and workstation boards of the same chip (GA102 and Ada whitepapers), hence two rows.
SM_RATES: dict[str, SmRates] = {
    # A100 SXM4: 312 TFLOP/s bf16 dense = 108 SMs × 1410 MHz × 2048; tf32 156 = × 1024; fp32 19.5 = × 128
    # (64 FP32 lanes × 2). A30 checks too: 165 = 56 × 1440 MHz × 2048.
    "sm80": SmRates(2048, 1024, 128, "NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020), Table 1"),
    # A10: 125 TFLOP/s bf16 dense = 72 SMs × 1695 MHz × 1024; tf32 62.5 = × 512; fp32 31.2 = × 256 (128 lanes).
    "sm86": SmRates(1024, 512, 256, "NVIDIA Ampere GA102 GPU Architecture whitepaper (2021); NVIDIA A10 datasheet"),
    # RTX 3090: 71 TFLOP/s fp16 tensor with fp32 accumulate = 82 SMs × 1695 MHz × 512; tf32 35.6 = × 256.
    "sm86-geforce": SmRates(512, 256, 256, "NVIDIA Ampere GA102 GPU Architecture whitepaper (2021), RTX 3090 table"),
    # L4: 121 TFLOP/s bf16 dense = 58 SMs × 2040 MHz × 1024; tf32 60 = × 512; fp32 30.3 = × 256.
    "sm89": SmRates(1024, 512, 256, "NVIDIA Ada GPU Architecture whitepaper (2023); NVIDIA L4 datasheet"),
    # RTX 4090: 165.2 TFLOP/s fp16 tensor with fp32 accumulate = 128 SMs × 2520 MHz × 512; tf32 82.6 = × 256;
    # fp32 82.6 = × 256.
    "sm89-geforce": SmRates(512, 256, 256, "NVIDIA Ada GPU Architecture whitepaper (2023), RTX 4090 table"),
    # H100 SXM5: 989.4 TFLOP/s bf16 dense = 132 SMs × 1830 MHz × 4096 (2048 dense bf16 FMA/clk/SM, twice A100's);
    # tf32 494.7 = × 2048; fp32 66.9 = 132 × 1980 MHz × 256 (128 FP32 lanes × 2).
    "sm90": SmRates(4096, 2048, 256, "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022), Table 3"),
}
# Not in the table: sm100/sm120 (Blackwell; per-SM dense rates vary by SKU and power limit in NVIDIA's figures, so
# we do not trust one number yet), and everything before sm80 (Triton's tl.dot paths there are not ours to tune).


@dataclass(frozen=True)
class Peaks:
    """Theoretical ceilings of one device. Compute fields are None (with ``reason``) for an unknown architecture."""

    memory_gbps: float | None
    bf16_tflops: float | None
    fp16_tflops: float | None
    tf32_tflops: float | None
    fp32_tflops: float | None
    source: str
    reason: str | None = None

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict[str, object]) -> Peaks:
        return Peaks(**data)  # type: ignore[arg-type]


def sm_rates(family: str | None, name: str = "") -> tuple[SmRates | None, str | None]:
    """Per-SM rates of a family (e.g. "sm90"), or (None, reason) when the table has none."""
    if not family:
        return None, "unknown architecture (the profile names no compute capability)"
    key = f"{family}-geforce" if "geforce" in name.lower() and f"{family}-geforce" in SM_RATES else family
    rates = SM_RATES.get(key)
    if rates is None:
        return None, f"unknown architecture (no per-SM rates for {family})"
    return rates, None


def memory_gbps(mem_clock_mhz: float | None, bus_width_bits: int | None) -> float | None:
    """2 transfers per memory clock (DDR, as NVML reports the clock of HBM and GDDR) × bus width in bytes."""
    if not mem_clock_mhz or not bus_width_bits:
        return None
    return 2 * mem_clock_mhz * 1e6 * bus_width_bits / 8 / 1e9


def theoretical_peaks(device: DeviceInfo) -> Peaks:
    family = family_of(getattr(device, "family", None), getattr(device, "compute_capability", None))
    bw = memory_gbps(device.mem_clock_mhz, device.bus_width_bits)
    rates, reason = sm_rates(family, device.name or "")
    if rates is None or not device.sm_count or not device.sm_clock_mhz:
        reason = reason or "unknown SM count or clock"
        return Peaks(bw, None, None, None, None, "memory: 2 × memory clock × bus width / 8", reason)
    per_clock = device.sm_count * device.sm_clock_mhz * 1e6 / 1e12  # SM-clocks per second, in tera

    return Peaks(
        memory_gbps=bw,
        bf16_tflops=per_clock * rates.bf16,
        fp16_tflops=per_clock * rates.bf16,  # fp16 and bf16 share the tensor-core rate on every family above
        tf32_tflops=per_clock * rates.tf32,
        fp32_tflops=per_clock * rates.fp32,
        source=f"{device.sm_count} SMs × {device.sm_clock_mhz:g} MHz × per-SM rates of {family} ({rates.source})",
    )
