"""Measured ceilings of the GPU a tuning run is on: what the roofline report draws its roofs from.

The tuner calls :func:`measure_roofs` once per run and stores the result in ``Profile.roofs``. Four probes, each
timed with ``triton.testing.do_bench`` (median) on random data (zeros could let the hardware or a library take
shortcuts, e.g. sparse-aware power management that lifts clocks):

- a device-to-device copy of 1 GiB, counting read + write bytes (the figure BASELINE.md quotes as 3.02 TB/s);
- a bf16 matmul of 8192³ through cuBLAS (big enough that tile quantisation and launch costs vanish);
- the same in fp32 with ``allow_tf32`` (tf32 tensor cores);
- an fp32 FMA loop in Triton: independent FMA chains on data held in registers, so no memory traffic counts.

Needs CUDA; raises ``RuntimeError`` with what to do when there is none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from gdn2_tune.profiles.table import Roofs

if TYPE_CHECKING:
    from gdn2_tune.profiles.table import DeviceInfo

COPY_BYTES = 1 << 30  # 1 GiB: twenty times the 50 MB L2 of an H100, so the copy streams from and to DRAM
MATMUL_N = 8192  # 2·8192³ = 1.1 TFLOP per bf16 product: ~1 ms on an H100, long against launch overheads
# FMA loop: each program keeps FMA_CHAINS independent accumulators per element so that the FMA pipeline's latency
# (4 cycles on sm80/sm90) is hidden by independent work, and loops FMA_ITERS times with no memory access.
FMA_BLOCK = 1024
FMA_CHAINS = 4
FMA_ITERS = 4096
FMA_WAVES = 16  # programs per SM: enough resident warps to fill every scheduler
BENCH_WARMUP_MS = 100
BENCH_REP_MS = 500


@triton.jit
def _fma_kernel(x, out, a, b, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    i_p = tl.program_id(0)
    o_x = i_p * BLOCK + tl.arange(0, BLOCK)
    b_x = tl.load(x + o_x)
    # Four chains seeded differently from the data: the compiler cannot merge them or fold the loop away.
    c0 = b_x
    c1 = b_x + 1.0
    c2 = b_x + 2.0
    c3 = b_x + 3.0
    for _ in range(ITERS):
        c0 = c0 * a + b
        c1 = c1 * a + b
        c2 = c2 * a + b
        c3 = c3 * a + b
    # Storing the sum keeps every chain live.
    tl.store(out + o_x, c0 + c1 + c2 + c3)


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _median_ms(fn: Callable[[], object]) -> float:
    return float(triton.testing.do_bench(fn, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, return_mode="median"))


def measure_copy_gbps(device: torch.device) -> float:
    n = COPY_BYTES // 4
    src = torch.rand(n, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * COPY_BYTES / (ms * 1e-3) / 1e9  # each byte is read once and written once


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, *, tf32: bool = False) -> float:
    n = MATMUL_N
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    c = torch.empty(n, n, device=device, dtype=dtype)
    with _tf32(tf32):
        ms = _median_ms(lambda: torch.mm(a, b, out=c))
    return 2 * n**3 / (ms * 1e-3) / 1e12  # n³ FMAs, 2 FLOP each


def measure_fma_tflops(device: torch.device, sm_count: int) -> float:
    programs = sm_count * FMA_WAVES
    n = programs * FMA_BLOCK
    x = torch.rand(n, device=device, dtype=torch.float32)
    out = torch.empty_like(x)
    # |a| < 1 keeps the chains bounded (no inf/NaN, whose handling could differ in speed).
    a, b = 0.999, 0.001

    def run() -> None:
        _fma_kernel[(programs,)](x, out, a, b, ITERS=FMA_ITERS, BLOCK=FMA_BLOCK, num_warps=4)

    ms = _median_ms(run)
    if not torch.isfinite(out).all():
        raise RuntimeError("fp32 FMA probe produced non-finite values; its timing is not trustworthy")
    return 2 * FMA_CHAINS * FMA_ITERS * n / (ms * 1e-3) / 1e12


def measure_roofs(device_info: DeviceInfo | None = None) -> Roofs:
    """Measure the four ceilings on the current CUDA device (a few seconds).

    ``device_info`` supplies the SM count for the FMA probe's grid; without it the CUDA properties are asked.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "measure_roofs: expected a CUDA device, found none; run on a GPU machine (reports use the roofs stored "
            "in the profile instead)"
        )
    device = torch.device("cuda", torch.cuda.current_device())
    sm_count = (device_info.sm_count if device_info else None) or torch.cuda.get_device_properties(
        device
    ).multi_processor_count
    roofs = Roofs(
        copy_gbps=measure_copy_gbps(device),
        bf16_tflops=measure_matmul_tflops(device, torch.bfloat16),
        tf32_tflops=measure_matmul_tflops(device, torch.float32, tf32=True),
        fp32_tflops=measure_fma_tflops(device, sm_count),
    )
    torch.cuda.empty_cache()  # give the probes' ~2.5 GB back before the tuner's trials
    return roofs
