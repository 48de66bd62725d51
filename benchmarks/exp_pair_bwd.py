"""The pair backward alone (kernels/pairwise.py ``pairs_bwd``), each method and tiling, at the chunk-major sizes the
backward hands it (GPU only, not a test).

    python benchmarks/exp_pair_bwd.py [SHAPE ...]      # default the anchor and 16x2048x8x256x256 (chunk 32)

Inputs as the backward forms them: G the within-chunk prefix sum of g (uniform in [-0.5, 0] per step, or in [-10, 0]
with strong decay, where the dot method's sub-blocks take the exact per-column loop), random factors, dM strictly
lower / lower. Every variant is checked against the first (elementwise) one, then timed (median of
triton.testing.do_bench). Prints one JSON line per measurement (and appends it to $OUT/exp_pair_bwd.jsonl when OUT
is set): ms, the byte floor's ms at 4.8 TB/s (dM, four factors read, three results written, fp32), and the
variant's error relative to the first.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdn2_tune.kernels.config import Shape
from gdn2_tune.kernels.pairwise import pairs_bwd
from gdn2_tune.tuner.suite import parse_shape

CHUNK = 32
PEAK_BYTES_PER_S = 4.8e12  # H200 HBM3e, NVIDIA's datasheet
VARIANTS = {  # name: (method, BK, num_warps)
    "elementwise-BK16-w2": ("elementwise", 16, 2),  # the built-in default
    "elementwise-BK32-w4": ("elementwise", 32, 4),
    "dot-BK32-w2": ("dot", 32, 2),
    "dot-BK32-w4": ("dot", 32, 4),
    "dot-BK64-w4": ("dot", 64, 4),
    "dot-BK64-w8": ("dot", 64, 8),
    "dot-BK16-w2": ("dot", 16, 2),
}


def emit(row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "exp_pair_bwd.jsonl", "a") as f:
            f.write(line + "\n")


def measure(shape: Shape, strong: bool) -> None:
    N, H, K = shape.B * triton.cdiv(shape.T, CHUNK), shape.H, shape.K
    gen = torch.Generator(device="cuda").manual_seed(0)
    g = -torch.rand(N, H, CHUNK, K, generator=gen, device="cuda") * (10.0 if strong else 0.5)
    G = g.cumsum(-2).contiguous()
    x1, x2, y = (torch.randn(N, H, CHUNK, K, generator=gen, device="cuda") for _ in range(3))
    dm1 = torch.randn(N, H, CHUNK, CHUNK, generator=gen, device="cuda").tril(-1)
    dm2 = torch.randn(N, H, CHUNK, CHUNK, generator=gen, device="cuda").tril()
    args = (dm1, dm2, x1, x2, y, G)
    nbytes = 4 * (2 * N * H * CHUNK * CHUNK + 7 * N * H * CHUNK * K)
    first = None
    for name, (method, BK, warps) in VARIANTS.items():
        row = {"shape": shape.label(), "strong_decay": strong, "variant": name,
               "floor_ms": nbytes / PEAK_BYTES_PER_S * 1e3}

        def fn(method: str = method, BK: int = BK, warps: int = warps) -> tuple[torch.Tensor, ...]:
            return pairs_bwd(*args, BC=16, BK=BK, num_warps=warps, precision="tf32x3", method=method)

        try:
            got = fn()
            if first is None:
                first = got
            row["rel_err_vs_first"] = [float((a - b).norm() / b.norm()) for a, b in zip(got, first)]
            row["ms"] = triton.testing.do_bench(fn, warmup=10, rep=100)
        except Exception as exc:  # noqa: BLE001 - a variant that fails is a recorded outcome
            row["error"] = repr(exc)[:300]
        emit(row)


def main() -> None:
    for text in sys.argv[1:] or ["8x4096x16x128x128", "16x2048x8x256x256"]:
        for strong in (False, True):
            measure(parse_shape(text), strong)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
